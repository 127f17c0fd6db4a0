//! AWS Signature Version 4 verification.
//!
//! A request is signed either in the `Authorization` header or in the query string
//! (presigned URLs). Verification rebuilds the canonical request from what arrived on the
//! wire, derives the signing key from the secret of the named access key and compares
//! signatures in constant time. The rules follow AWS's published algorithm as botocore and
//! the other SDKs implement it for every service except S3: the path is normalized and its
//! bytes URI-encoded once more, query parameters are decoded, re-encoded strictly and
//! sorted, header values are trimmed with inner runs of whitespace folded, and repeated
//! headers are joined with commas.
//!
//! The payload hash is the request's `x-amz-content-sha256` value when present (so
//! `UNSIGNED-PAYLOAD` and the empty-body hash used by streaming uploads verify without
//! reading the stream); otherwise the caller supplies the hashes to try.

use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// SHA-256 of the empty string.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Allowed clock difference between client and server, in seconds.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// Longest lifetime of a presigned URL, in seconds (7 days).
pub const MAX_PRESIGNED_EXPIRES: i64 = 7 * 24 * 3600;

/// Characters left as they are by SigV4's URI encoding: `A-Z a-z 0-9 - _ . ~`.
const STRICT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// The same, keeping `/` for paths.
const PATH: &AsciiSet = &STRICT.remove(b'/');

/// Why a request failed authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// The request carries no signature at all.
    Missing,
    /// The signature parts are malformed or incomplete.
    Incomplete(String),
    /// The access key id is not known.
    UnknownAccessKey,
    /// A session token is required and missing or wrong.
    InvalidToken,
    /// The signature does not match.
    SignatureMismatch(String),
    /// The request date is outside the allowed window, or a presigned URL expired.
    Expired(String),
}

/// Where the signature was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureLocation {
    Header,
    Query,
}

/// A signature as found on the request, before verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSignature {
    pub location: SignatureLocation,
    pub access_key_id: String,
    pub scope_date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
    /// The `YYYYMMDDTHHMMSSZ` timestamp that was signed.
    pub amz_date: String,
    /// Presigned URLs only: seconds of validity.
    pub expires: Option<i64>,
    pub session_token: Option<String>,
}

impl ParsedSignature {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.scope_date, self.region, self.service
        )
    }
}

/// The parts of an HTTP request that SigV4 covers, as received.
#[derive(Debug, Clone)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// The path exactly as it arrived (still percent-encoded).
    pub raw_path: &'a str,
    /// The query string exactly as it arrived, without `?`.
    pub raw_query: &'a str,
    /// Every header; names in any case, repeated names allowed.
    pub headers: Vec<(String, String)>,
}

impl RequestParts<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn query_pairs(&self) -> Vec<(String, String)> {
        query_pairs(self.raw_query)
    }
}

/// Decoded `key=value` pairs of a raw query string.
pub fn query_pairs(raw_query: &str) -> Vec<(String, String)> {
    raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Finds the signature on a request: `Ok(None)` when it is unsigned.
pub fn parse(parts: &RequestParts<'_>) -> Result<Option<ParsedSignature>, AuthFailure> {
    if let Some(auth) = parts.header("authorization") {
        return parse_header(parts, auth).map(Some);
    }
    let query = parts.query_pairs();
    if query.iter().any(|(k, _)| k == "X-Amz-Algorithm") {
        return parse_query(parts, &query).map(Some);
    }
    Ok(None)
}

fn parse_credential(credential: &str) -> Result<(String, String, String, String), AuthFailure> {
    let pieces: Vec<&str> = credential.split('/').collect();
    if pieces.len() != 5 || pieces[4] != "aws4_request" || pieces.iter().any(|p| p.is_empty()) {
        return Err(AuthFailure::Incomplete(format!(
            "Credential should be scoped to a valid region, not '{credential}'."
        )));
    }
    Ok((
        pieces[0].to_string(),
        pieces[1].to_string(),
        pieces[2].to_string(),
        pieces[3].to_string(),
    ))
}

fn parse_header(parts: &RequestParts<'_>, auth: &str) -> Result<ParsedSignature, AuthFailure> {
    let rest = auth
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| {
            AuthFailure::Incomplete(format!(
                "Authorization header requires the {ALGORITHM} algorithm."
            ))
        })?
        .trim();
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for field in rest.split(',') {
        let field = field.trim();
        if let Some((k, v)) = field.split_once('=') {
            match k.trim() {
                "Credential" => credential = Some(v.trim()),
                "SignedHeaders" => signed_headers = Some(v.trim()),
                "Signature" => signature = Some(v.trim()),
                _ => {}
            }
        }
    }
    let missing: Vec<&str> = [
        ("Credential", credential.is_none()),
        ("Signature", signature.is_none()),
        ("SignedHeaders", signed_headers.is_none()),
    ]
    .iter()
    .filter(|(_, m)| *m)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        return Err(AuthFailure::Incomplete(format!(
            "Authorization header requires {} parameter(s). Authorization={auth}",
            missing.join(", ")
        )));
    }
    let (access_key_id, scope_date, region, service) = parse_credential(credential.unwrap())?;
    let amz_date = match parts.header("x-amz-date") {
        Some(d) => d.trim().to_string(),
        None => match parts.header("date").and_then(http_date_to_amz) {
            Some(d) => d,
            None => {
                return Err(AuthFailure::Incomplete(
                    "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
                        .into(),
                ))
            }
        },
    };
    Ok(ParsedSignature {
        location: SignatureLocation::Header,
        access_key_id,
        scope_date,
        region,
        service,
        signed_headers: split_signed_headers(signed_headers.unwrap()),
        signature: signature.unwrap().to_ascii_lowercase(),
        amz_date,
        expires: None,
        session_token: parts.header("x-amz-security-token").map(str::to_string),
    })
}

fn parse_query(
    parts: &RequestParts<'_>,
    query: &[(String, String)],
) -> Result<ParsedSignature, AuthFailure> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let algorithm = get("X-Amz-Algorithm").unwrap_or_default();
    if algorithm != ALGORITHM {
        return Err(AuthFailure::Incomplete(format!(
            "X-Amz-Algorithm only supports \"{ALGORITHM}\""
        )));
    }
    let mut missing = Vec::new();
    for name in [
        "X-Amz-Credential",
        "X-Amz-Signature",
        "X-Amz-SignedHeaders",
        "X-Amz-Date",
    ] {
        if get(name).is_none() {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(AuthFailure::Incomplete(format!(
            "AWS query-string parameters must include {}.",
            missing.join(", ")
        )));
    }
    let (access_key_id, scope_date, region, service) =
        parse_credential(get("X-Amz-Credential").unwrap())?;
    let expires = match get("X-Amz-Expires") {
        None => None,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (1..=MAX_PRESIGNED_EXPIRES).contains(&n) => Some(n),
            _ => {
                return Err(AuthFailure::Incomplete(format!(
                    "X-Amz-Expires must be between 1 and {MAX_PRESIGNED_EXPIRES} seconds, not '{text}'."
                )))
            }
        },
    };
    Ok(ParsedSignature {
        location: SignatureLocation::Query,
        access_key_id,
        scope_date,
        region,
        service,
        signed_headers: split_signed_headers(get("X-Amz-SignedHeaders").unwrap()),
        signature: get("X-Amz-Signature").unwrap().to_ascii_lowercase(),
        amz_date: get("X-Amz-Date").unwrap().to_string(),
        expires,
        session_token: get("X-Amz-Security-Token")
            .map(str::to_string)
            .or_else(|| parts.header("x-amz-security-token").map(str::to_string)),
    })
}

fn split_signed_headers(list: &str) -> Vec<String> {
    list.split(';')
        .filter(|h| !h.is_empty())
        .map(|h| h.trim().to_ascii_lowercase())
        .collect()
}

/// Converts an RFC 7231 `Date` header to `YYYYMMDDTHHMMSSZ`.
fn http_date_to_amz(date: &str) -> Option<String> {
    let format = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let parsed = PrimitiveDateTime::parse(date.trim(), format).ok()?;
    Some(format_amz_date(parsed.assume_utc()))
}

pub fn format_amz_date(t: OffsetDateTime) -> String {
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    t.format(format).unwrap_or_default()
}

pub fn parse_amz_date(s: &str) -> Option<OffsetDateTime> {
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    PrimitiveDateTime::parse(s, format)
        .ok()
        .map(|t| t.assume_utc())
}

/// The canonical URI: dot segments removed, repeated slashes folded, every byte outside the
/// unreserved set (and `/`) percent-encoded, including the `%` of existing escapes.
pub fn canonical_uri(raw_path: &str) -> String {
    let path = if raw_path.is_empty() { "/" } else { raw_path };
    let trailing = path.ends_with('/') && path != "/";
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::from("/");
    normalized.push_str(&segments.join("/"));
    if trailing && normalized != "/" {
        normalized.push('/');
    }
    utf8_percent_encode(&normalized, PATH).to_string()
}

/// The canonical query string; for presigned URLs the signature itself is left out.
pub fn canonical_query(raw_query: &str, drop_signature: bool) -> String {
    let mut pairs: Vec<(String, String)> = query_pairs(raw_query)
        .into_iter()
        .filter(|(k, _)| !(drop_signature && k == "X-Amz-Signature"))
        .map(|(k, v)| {
            (
                utf8_percent_encode(&k, STRICT).to_string(),
                utf8_percent_encode(&v, STRICT).to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn canonical_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The full canonical request for the given signed headers and payload hash.
pub fn canonical_request(
    parts: &RequestParts<'_>,
    signed_headers: &[String],
    payload_hash: &str,
    drop_signature_from_query: bool,
) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(parts.method);
    out.push('\n');
    out.push_str(&canonical_uri(parts.raw_path));
    out.push('\n');
    out.push_str(&canonical_query(parts.raw_query, drop_signature_from_query));
    out.push('\n');
    for name in signed_headers {
        let values: Vec<String> = parts
            .header_values(name)
            .map(canonical_header_value)
            .collect();
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

pub fn sign(key: &[u8; 32], string_to_sign: &str) -> String {
    hex::encode(hmac(key, string_to_sign.as_bytes()))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The payload hash that a request declares, if any: the `x-amz-content-sha256` header or,
/// on presigned URLs, the `X-Amz-Content-Sha256` query parameter.
pub fn declared_payload_hash(parts: &RequestParts<'_>) -> Option<String> {
    parts
        .header("x-amz-content-sha256")
        .map(|v| v.trim().to_string())
        .or_else(|| {
            parts
                .query_pairs()
                .into_iter()
                .find(|(k, _)| k == "X-Amz-Content-Sha256")
                .map(|(_, v)| v)
        })
}

/// Checks `signature` against the request. `payload_hashes` are tried in order when the
/// request declares no payload hash of its own; `now` is the server's time.
pub fn verify(
    parts: &RequestParts<'_>,
    signature: &ParsedSignature,
    secret: &str,
    payload_hashes: &[&str],
    now: OffsetDateTime,
) -> Result<(), AuthFailure> {
    let Some(signed_at) = parse_amz_date(&signature.amz_date) else {
        return Err(AuthFailure::Incomplete(format!(
            "Date must be in ISO-8601 'basic format'. Got '{}'.",
            signature.amz_date
        )));
    };
    if !signature.amz_date.starts_with(&signature.scope_date) {
        return Err(AuthFailure::SignatureMismatch(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{}'.",
            signature.scope_date,
            &signature.amz_date[..8.min(signature.amz_date.len())],
            signature.amz_date
        )));
    }
    if !signature.signed_headers.iter().any(|h| h == "host") {
        return Err(AuthFailure::SignatureMismatch(
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    let skew = (now - signed_at).whole_seconds();
    let now_text = format_amz_date(now);
    match signature.expires {
        None if skew > MAX_SKEW_SECS => {
            return Err(AuthFailure::Expired(format!(
                "Signature expired: {} is now earlier than {} ({} - 15 min.)",
                signature.amz_date,
                format_amz_date(now - time::Duration::seconds(MAX_SKEW_SECS)),
                now_text
            )))
        }
        Some(expires) if skew > expires => {
            return Err(AuthFailure::Expired(format!(
                "Request has expired: signed at {} for {expires} seconds, now {now_text}.",
                signature.amz_date
            )))
        }
        _ if skew < -MAX_SKEW_SECS => {
            return Err(AuthFailure::Expired(format!(
                "Signature not yet current: {} is still later than {} ({} + 15 min.)",
                signature.amz_date,
                format_amz_date(now + time::Duration::seconds(MAX_SKEW_SECS)),
                now_text
            )))
        }
        _ => {}
    }
    let key = signing_key(
        secret,
        &signature.scope_date,
        &signature.region,
        &signature.service,
    );
    let declared = declared_payload_hash(parts);
    let candidates: Vec<&str> = match &declared {
        Some(hash) => vec![hash.as_str()],
        None => payload_hashes.to_vec(),
    };
    let drop_signature = signature.location == SignatureLocation::Query;
    let mut last_canonical = String::new();
    for payload_hash in candidates {
        let canonical = canonical_request(
            parts,
            &signature.signed_headers,
            payload_hash,
            drop_signature,
        );
        let sts = string_to_sign(&signature.amz_date, &signature.scope(), &canonical);
        let expected = sign(&key, &sts);
        if constant_time_eq(expected.as_bytes(), signature.signature.as_bytes()) {
            return Ok(());
        }
        last_canonical = canonical;
    }
    Err(AuthFailure::SignatureMismatch(format!(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.\n\nThe Canonical String for this request should have been\n'{last_canonical}'\n"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uri_normalizes_and_double_encodes() {
        assert_eq!(canonical_uri("/example/.."), "/");
        assert_eq!(canonical_uri("//example//"), "/example/");
        assert_eq!(canonical_uri("/./example"), "/example");
        assert_eq!(canonical_uri("/things/a%20b"), "/things/a%2520b");
        assert_eq!(canonical_uri("/example/$delete"), "/example/%24delete");
        assert_eq!(canonical_uri(""), "/");
    }

    #[test]
    fn canonical_query_sorts_and_reencodes() {
        assert_eq!(
            canonical_query("b=2&a=1&a=0&c=%7E%20+", false),
            "a=0&a=1&b=2&c=~%20%2B"
        );
        assert_eq!(canonical_query("Param1", false), "Param1=");
        assert_eq!(
            canonical_query("X-Amz-Signature=abc&X-Amz-Date=1", true),
            "X-Amz-Date=1"
        );
    }

    #[test]
    fn expired_and_future_dates_are_refused() {
        let parts = RequestParts {
            method: "GET",
            raw_path: "/",
            raw_query: "",
            headers: vec![
                ("Host".into(), "example.amazonaws.com".into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
            ],
        };
        let sig = ParsedSignature {
            location: SignatureLocation::Header,
            access_key_id: "AKIDEXAMPLE".into(),
            scope_date: "20150830".into(),
            region: "us-east-1".into(),
            service: "service".into(),
            signed_headers: vec!["host".into(), "x-amz-date".into()],
            signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".into(),
            amz_date: "20150830T123600Z".into(),
            expires: None,
            session_token: None,
        };
        let at = parse_amz_date("20150830T123600Z").unwrap();
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let late = at + time::Duration::minutes(16);
        assert!(matches!(
            verify(&parts, &sig, secret, &[EMPTY_SHA256], late),
            Err(AuthFailure::Expired(m)) if m.starts_with("Signature expired")
        ));
        let early = at - time::Duration::minutes(16);
        assert!(matches!(
            verify(&parts, &sig, secret, &[EMPTY_SHA256], early),
            Err(AuthFailure::Expired(m)) if m.starts_with("Signature not yet current")
        ));
    }
}
