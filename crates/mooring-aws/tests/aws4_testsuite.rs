//! Runs every case of AWS's SigV4 test suite (`../shared/testdata/sigv4/aws4_testsuite`)
//! through Mooring's canonicalization and verifier: the canonical request, the string to
//! sign and the signature must match the suite's files byte for byte, and the signed request
//! (`.sreq`) must verify, while a tampered copy must not.

use std::path::{Path, PathBuf};

use mooring_aws::sigv4::{self, AuthFailure, RequestParts};

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/sigv4/aws4_testsuite")
}

struct RawRequest {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Parses the suite's raw HTTP request format, where a header line that starts with
/// whitespace continues the previous header.
fn parse_raw(text: &str) -> RawRequest {
    let (head, body) = match text.split_once("\n\n") {
        Some((h, b)) => (h, b),
        None => (text, ""),
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap();
    let mut pieces = request_line.splitn(2, ' ');
    let method = pieces.next().unwrap().to_string();
    let target = pieces
        .next()
        .unwrap()
        .trim_end_matches(" HTTP/1.1")
        .to_string();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            let last = headers.last_mut().unwrap();
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            let (k, v) = line.split_once(':').unwrap();
            // HTTP strips optional whitespace around field values, as hyper does.
            headers.push((k.to_string(), v.trim().to_string()));
        }
    }
    RawRequest {
        method,
        path,
        query,
        headers,
        body: body.as_bytes().to_vec(),
    }
}

fn cases() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![suite_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                if path.join(format!("{name}.sreq")).exists() {
                    out.push(path.clone());
                }
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(case: &Path, ext: &str) -> String {
    let name = case.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(case.join(format!("{name}.{ext}"))).unwrap()
}

#[test]
fn every_case_of_the_suite_canonicalizes_signs_and_verifies() {
    let cases = cases();
    assert!(
        cases.len() >= 30,
        "expected the whole suite, found {} cases under {}",
        cases.len(),
        suite_dir().display()
    );
    let now = sigv4::parse_amz_date("20150830T123600Z").unwrap();
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        let mut raw = parse_raw(&read(case, "sreq"));
        // The signed request is the .sreq with the suite's expected Authorization (.authz);
        // get-vanilla-with-session-token's .sreq carries a garbled signature of its own.
        let authz = read(case, "authz");
        for header in raw.headers.iter_mut() {
            if header.0.eq_ignore_ascii_case("authorization") {
                header.1 = authz
                    .trim()
                    .trim_start_matches("Authorization:")
                    .trim()
                    .to_string();
            }
        }
        let parts = RequestParts {
            method: &raw.method,
            raw_path: &raw.path,
            raw_query: &raw.query,
            headers: raw.headers.clone(),
        };
        let sig = sigv4::parse(&parts)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
            .unwrap_or_else(|| panic!("{name}: no signature found"));
        let body_hash = sigv4::sha256_hex(&raw.body);
        let canonical = sigv4::canonical_request(&parts, &sig.signed_headers, &body_hash, false);
        // get-vanilla-with-session-token's .creq signs a header its .req lacks; the .sreq
        // carries it, so canonicalizing the signed request matches either way.
        assert_eq!(canonical, read(case, "creq"), "{name}: canonical request");
        let sts = sigv4::string_to_sign(&sig.amz_date, &sig.scope(), &canonical);
        assert_eq!(sts, read(case, "sts"), "{name}: string to sign");
        let key = sigv4::signing_key(SECRET, &sig.scope_date, &sig.region, &sig.service);
        assert!(
            authz.ends_with(&format!("Signature={}", sigv4::sign(&key, &sts))),
            "{name}: signature, expected {authz}"
        );
        sigv4::verify(&parts, &sig, SECRET, &[&body_hash], now)
            .unwrap_or_else(|e| panic!("{name}: did not verify: {e:?}"));
        assert!(
            matches!(
                sigv4::verify(&parts, &sig, "wrong-secret", &[&body_hash], now),
                Err(AuthFailure::SignatureMismatch(_))
            ),
            "{name}: a wrong secret must not verify"
        );
        let mut tampered = parts.clone();
        tampered.raw_path = "/tampered";
        assert!(
            sigv4::verify(&tampered, &sig, SECRET, &[&body_hash], now).is_err(),
            "{name}: a changed path must not verify"
        );
    }
}

#[test]
fn presigned_query_form_verifies_and_expires() {
    // Sign a GET as a presigned URL the way SDKs do, then verify it through `parse`.
    let amz_date = "20150830T123600Z";
    let scope = "20150830/us-east-1/iotdevicegateway/aws4_request";
    let base_query = format!(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F{}&X-Amz-Date={amz_date}&X-Amz-Expires=60&X-Amz-SignedHeaders=host",
        scope.replace('/', "%2F")
    );
    let headers = vec![("Host".to_string(), "127.0.0.1:4566".to_string())];
    let unsigned = RequestParts {
        method: "GET",
        raw_path: "/mqtt",
        raw_query: &base_query,
        headers: headers.clone(),
    };
    let canonical =
        sigv4::canonical_request(&unsigned, &["host".to_string()], sigv4::EMPTY_SHA256, true);
    let sts = sigv4::string_to_sign(amz_date, scope, &canonical);
    let key = sigv4::signing_key(SECRET, "20150830", "us-east-1", "iotdevicegateway");
    let query = format!("{base_query}&X-Amz-Signature={}", sigv4::sign(&key, &sts));
    let parts = RequestParts {
        method: "GET",
        raw_path: "/mqtt",
        raw_query: &query,
        headers,
    };
    let sig = sigv4::parse(&parts).unwrap().unwrap();
    assert_eq!(sig.location, sigv4::SignatureLocation::Query);
    assert_eq!(sig.expires, Some(60));
    let at = sigv4::parse_amz_date(amz_date).unwrap();
    sigv4::verify(&parts, &sig, SECRET, &[sigv4::EMPTY_SHA256], at).unwrap();
    let later = at + time::Duration::seconds(61);
    assert!(matches!(
        sigv4::verify(&parts, &sig, SECRET, &[sigv4::EMPTY_SHA256], later),
        Err(AuthFailure::Expired(m)) if m.starts_with("Request has expired")
    ));
}

#[test]
fn malformed_authorization_headers_are_incomplete() {
    for header in [
        "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/service/aws4_request",
        "AWS4-HMAC-SHA256 Credential=AKID/bad, SignedHeaders=host, Signature=00",
        "AWS3 whatever",
    ] {
        let parts = RequestParts {
            method: "GET",
            raw_path: "/",
            raw_query: "",
            headers: vec![
                ("Authorization".into(), header.into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
            ],
        };
        assert!(
            matches!(sigv4::parse(&parts), Err(AuthFailure::Incomplete(_))),
            "{header}"
        );
    }
}

/// The deterministic cousin of the fuzz target: many random, mostly-broken signed requests
/// built from fragments of real ones must all be answered without a panic.
#[test]
fn random_signature_inputs_never_panic() {
    use rand::{Rng, SeedableRng};
    let fragments = [
        "AWS4-HMAC-SHA256",
        " Credential=",
        "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request",
        "/",
        ", SignedHeaders=",
        "host;x-amz-date",
        ", Signature=",
        "deadbeef",
        "=",
        "%",
        "%E1%88",
        "\u{1234}",
        "..",
        "//",
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&",
        "X-Amz-Expires=",
        "99999999999999999999",
        "&X-Amz-Date=20150830T123600Z",
        "20150830T123600Z",
        " ",
        "\t",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5167_0004);
    let pick = |rng: &mut rand::rngs::StdRng| {
        let n = rng.gen_range(0..8);
        (0..n)
            .map(|_| fragments[rng.gen_range(0..fragments.len())])
            .collect::<String>()
    };
    let now = sigv4::parse_amz_date("20150830T123600Z").unwrap();
    for _ in 0..20_000 {
        let path = pick(&mut rng);
        let query = pick(&mut rng);
        let parts = RequestParts {
            method: "GET",
            raw_path: &path,
            raw_query: &query,
            headers: vec![
                ("Authorization".into(), pick(&mut rng)),
                ("X-Amz-Date".into(), pick(&mut rng)),
                ("Host".into(), pick(&mut rng)),
            ],
        };
        if let Ok(Some(sig)) = sigv4::parse(&parts) {
            assert!(sigv4::verify(&parts, &sig, SECRET, &[sigv4::EMPTY_SHA256], now).is_err());
        }
        let uri = sigv4::canonical_uri(&path);
        assert!(uri.starts_with('/'));
    }
}
