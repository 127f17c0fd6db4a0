//! Device certificates: issuing a fresh RSA 2048 key pair and certificate from Mooring's CA
//! (CreateKeysAndCertificate), checking a PEM certificate for RegisterCertificate (signed by
//! Mooring's CA or by the given CA certificate), and reading the fields that policy
//! variables expose (`iot:Certificate.Subject.CommonName`, validity, serial number, ...).

use std::collections::BTreeMap;

use mooring_core::pki::{pem_to_der, CertificateAuthority};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

/// Certificate status as AWS IoT names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    Active,
    Inactive,
    Revoked,
    PendingTransfer,
    RegisterInactive,
    PendingActivation,
}

impl CertificateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Active => "ACTIVE",
            CertificateStatus::Inactive => "INACTIVE",
            CertificateStatus::Revoked => "REVOKED",
            CertificateStatus::PendingTransfer => "PENDING_TRANSFER",
            CertificateStatus::RegisterInactive => "REGISTER_INACTIVE",
            CertificateStatus::PendingActivation => "PENDING_ACTIVATION",
        }
    }

    pub fn parse(text: &str) -> Option<CertificateStatus> {
        Some(match text {
            "ACTIVE" => CertificateStatus::Active,
            "INACTIVE" => CertificateStatus::Inactive,
            "REVOKED" => CertificateStatus::Revoked,
            "PENDING_TRANSFER" => CertificateStatus::PendingTransfer,
            "REGISTER_INACTIVE" => CertificateStatus::RegisterInactive,
            "PENDING_ACTIVATION" => CertificateStatus::PendingActivation,
            _ => return None,
        })
    }
}

/// What a certificate says about itself, read once when it is registered or loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CertificateFacts {
    /// `Subject.<Attribute>` and `Issuer.<Attribute>` values in order, by AWS attribute name.
    pub subject: BTreeMap<&'static str, Vec<String>>,
    pub issuer: BTreeMap<&'static str, Vec<String>>,
    /// `SubjectAlternativeName.<Kind>` values.
    pub alternative_names: BTreeMap<&'static str, Vec<String>>,
    /// Decimal serial number.
    pub serial_number: String,
    /// Validity bounds, epoch seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// A freshly issued key pair and certificate.
#[derive(Debug, Clone)]
pub struct IssuedKeys {
    pub certificate_pem: String,
    pub public_key_pem: String,
    pub private_key_pem: String,
}

/// AWS's certificate id: lowercase hex SHA-256 of the DER.
pub fn certificate_id_of_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.46" => "DistinguishedNameQualifier",
        "2.5.4.6" => "Country",
        "2.5.4.10" => "Organization",
        "2.5.4.11" => "OrganizationalUnit",
        "2.5.4.8" => "State",
        "2.5.4.3" => "CommonName",
        "2.5.4.5" => "SerialNumber",
        "2.5.4.12" => "Title",
        "2.5.4.4" => "Surname",
        "2.5.4.42" => "GivenName",
        "2.5.4.43" => "Initials",
        "2.5.4.65" => "Pseudonym",
        "2.5.4.44" => "GenerationQualifier",
        _ => return None,
    })
}

fn name_attributes(name: &X509Name<'_>) -> BTreeMap<&'static str, Vec<String>> {
    let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for attribute in name.iter_attributes() {
        let Some(key) = attribute_name(&attribute.attr_type().to_id_string()) else {
            continue;
        };
        if let Ok(value) = attribute.as_str() {
            out.entry(key).or_default().push(value.to_string());
        }
    }
    out
}

/// Reads the facts policy variables need from a DER certificate.
pub fn facts_of_der(der: &[u8]) -> Result<CertificateFacts, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("{e}"))?;
    let mut alternative_names: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let (kind, value) = match name {
                GeneralName::DNSName(d) => ("DNSName", d.to_string()),
                GeneralName::RFC822Name(e) => ("RFC822Name", e.to_string()),
                GeneralName::URI(u) => ("UniformResourceIdentifier", u.to_string()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => (
                        "IPAddress",
                        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
                    ),
                    16 => {
                        let mut octets = [0u8; 16];
                        octets.copy_from_slice(bytes);
                        ("IPAddress", std::net::Ipv6Addr::from(octets).to_string())
                    }
                    _ => continue,
                },
                _ => continue,
            };
            alternative_names.entry(kind).or_default().push(value);
        }
    }
    Ok(CertificateFacts {
        subject: name_attributes(cert.subject()),
        issuer: name_attributes(cert.issuer()),
        alternative_names,
        serial_number: cert.tbs_certificate.serial.to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Why RegisterCertificate refuses a certificate (`CertificateValidationException`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidCertificate(pub String);

/// Checks `certificate_pem` for registration: it parses, is within its validity period, and
/// is signed by Mooring's CA or by `ca_certificate_pem` when given. Returns its DER.
pub fn verify_for_registration(
    certificate_pem: &str,
    ca_certificate_pem: Option<&str>,
    mooring_ca_pem: &str,
) -> Result<Vec<u8>, InvalidCertificate> {
    let der = pem_to_der(certificate_pem)
        .map_err(|e| InvalidCertificate(format!("The certificate is not a valid PEM: {e}")))?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| InvalidCertificate(format!("The certificate could not be parsed: {e}")))?;
    if !cert.validity().is_valid() {
        return Err(InvalidCertificate(
            "The certificate is expired or not yet valid".into(),
        ));
    }
    let issuers: Vec<String> = match ca_certificate_pem {
        Some(ca) => vec![ca.to_string()],
        None => vec![mooring_ca_pem.to_string()],
    };
    for issuer_pem in issuers {
        let issuer_der = pem_to_der(&issuer_pem).map_err(|e| {
            InvalidCertificate(format!("The CA certificate is not a valid PEM: {e}"))
        })?;
        let (_, issuer) = X509Certificate::from_der(&issuer_der).map_err(|e| {
            InvalidCertificate(format!("The CA certificate could not be parsed: {e}"))
        })?;
        if cert.verify_signature(Some(issuer.public_key())).is_ok() {
            return Ok(der);
        }
    }
    Err(InvalidCertificate(
        "The certificate is not signed by Mooring's CA or by the given CA certificate".into(),
    ))
}

/// Issues an RSA 2048 key pair and a certificate for it signed by Mooring's CA, as
/// CreateKeysAndCertificate does. Slow (RSA key generation): call it off the runtime.
pub fn issue_keys_and_certificate(ca: &CertificateAuthority) -> Result<IssuedKeys, String> {
    let mut rng = rand::thread_rng();
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string())?;
    let pkcs8 = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let private_key_pem = key
        .to_pkcs1_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let public_key_pem = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let signer = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "AWS IoT Certificate");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&signer)
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    let certificate_pem = ca.sign_csr(&csr).map_err(|e| e.to_string())?;
    Ok(IssuedKeys {
        certificate_pem,
        public_key_pem,
        private_key_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_verify_and_expose_their_facts() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let keys = issue_keys_and_certificate(&ca).unwrap();
        assert!(keys
            .private_key_pem
            .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert!(keys
            .public_key_pem
            .starts_with("-----BEGIN PUBLIC KEY-----"));
        let der =
            verify_for_registration(&keys.certificate_pem, None, ca.certificate_pem()).unwrap();
        let facts = facts_of_der(&der).unwrap();
        assert_eq!(facts.subject["CommonName"], ["AWS IoT Certificate"]);
        assert_eq!(facts.issuer["CommonName"], ["Mooring Root CA"]);
        assert!(facts.not_after > facts.not_before);
        // Signed by a different CA: refused unless that CA is given.
        let other_dir = tempfile::tempdir().unwrap();
        let (other, _) = CertificateAuthority::load_or_create(other_dir.path()).unwrap();
        let foreign = other.issue_device_certificate().unwrap();
        assert!(
            verify_for_registration(&foreign.certificate_pem, None, ca.certificate_pem()).is_err()
        );
        assert!(verify_for_registration(
            &foreign.certificate_pem,
            Some(other.certificate_pem()),
            ca.certificate_pem()
        )
        .is_ok());
        assert!(verify_for_registration("garbage", None, ca.certificate_pem()).is_err());
    }
}
