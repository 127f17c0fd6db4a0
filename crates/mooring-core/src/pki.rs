//! Mooring's own certificate authority for MQTT over TLS.
//!
//! On first start a CA key and self-signed CA certificate are created under `DATA_DIR/ca/`
//! and reused on every later start. The CA issues the server certificate of the MQTTS
//! listener and the device certificates of `CreateKeysAndCertificate` and
//! `CreateCertificateFromCsr`. Certificate ids are, as in AWS IoT, the lowercase hex SHA-256
//! of the certificate's DER encoding.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub public_key_pem: String,
}

pub struct CertificateAuthority {
    dir: PathBuf,
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `DATA_DIR/ca`, creating it when absent. Returns whether it is new.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool)> {
        let dir = data_dir.join("ca");
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let certificate_pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
            let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key)
                .context("parsing the CA certificate")?;
            return Ok((
                CertificateAuthority {
                    dir,
                    certificate_pem,
                    issuer,
                },
                false,
            ));
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Mooring");
        name.push(DnType::CommonName, "Mooring Root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let certificate_pem = cert.pem();
        write_file(&key_path, &key.serialize_pem(), true)?;
        write_file(&cert_path, &certificate_pem, false)?;
        let issuer = Issuer::new(params, key);
        Ok((
            CertificateAuthority {
                dir,
                certificate_pem,
                issuer,
            },
            true,
        ))
    }

    /// The CA certificate, PEM; clients trust it to reach the MQTTS listener.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// Where the CA certificate is kept.
    pub fn certificate_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate for the TLS listeners, issued once for `names` (DNS names or
    /// IP addresses) and kept under `DATA_DIR/ca/server.{pem,key}`; reissued when the names
    /// change.
    pub fn server_certificate(&self, names: &[String]) -> Result<(String, String)> {
        let cert_path = self.dir.join("server.pem");
        let key_path = self.dir.join("server.key");
        let names_path = self.dir.join("server.names");
        let wanted = names.join(",");
        if cert_path.exists()
            && key_path.exists()
            && std::fs::read_to_string(&names_path).ok().as_deref() == Some(wanted.as_str())
        {
            return Ok((
                std::fs::read_to_string(&cert_path)?,
                std::fs::read_to_string(&key_path)?,
            ));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        write_file(&key_path, &key_pem, true)?;
        write_file(&cert_path, &cert_pem, false)?;
        write_file(&names_path, &wanted, false)?;
        Ok((cert_pem, key_pem))
    }

    /// Issues a device certificate with a fresh key pair (as `CreateKeysAndCertificate`).
    pub fn issue_device_certificate(&self) -> Result<IssuedCertificate> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            "AWS IoT Certificate (issued by Mooring)",
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            certificate_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            public_key_pem: key.public_key_pem(),
        })
    }

    /// Signs a PEM certificate signing request (as `CreateCertificateFromCsr`).
    pub fn sign_csr(&self, csr_pem: &str) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow!("invalid certificate signing request: {e}"))?;
        csr.params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        csr.params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        csr.params.is_ca = IsCa::NoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// AWS IoT's certificate id: lowercase hex SHA-256 of the DER certificate.
pub fn certificate_id(certificate_pem: &str) -> Result<String> {
    let der = pem_to_der(certificate_pem)?;
    Ok(hex::encode(Sha256::digest(der)))
}

/// The DER bytes of the first PEM block in `pem`.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(anyhow!("no PEM block found"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| anyhow!("invalid base64 in PEM block: {e}"))
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, fresh) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(fresh);
        let first = ca.certificate_pem().to_string();
        let (again, fresh) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(!fresh);
        assert_eq!(again.certificate_pem(), first);
        let id = certificate_id(&first).unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn issues_server_and_device_certificates_and_signs_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (cert, key) = ca
            .server_certificate(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        let (same, _) = ca
            .server_certificate(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(same, cert, "server certificate is kept across calls");
        let device = ca.issue_device_certificate().unwrap();
        assert_ne!(
            certificate_id(&device.certificate_pem).unwrap(),
            certificate_id(&cert).unwrap()
        );
        let csr_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["device-1".to_string()])
            .unwrap()
            .serialize_request(&csr_key)
            .unwrap()
            .pem()
            .unwrap();
        let signed = ca.sign_csr(&csr).unwrap();
        assert!(signed.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.sign_csr("garbage").is_err());
    }
}
