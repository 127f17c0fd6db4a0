//! Fuzzes SigV4 parsing and verification with arbitrary request lines, headers and queries:
//! whatever arrives, the verifier answers with an error or success and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_aws::sigv4::{self, RequestParts};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let path = lines.next().unwrap_or("/");
    let query = lines.next().unwrap_or("");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let parts = RequestParts {
        method: "POST",
        raw_path: path,
        raw_query: query,
        headers,
    };
    if let Ok(Some(sig)) = sigv4::parse(&parts) {
        let now = time::OffsetDateTime::from_unix_timestamp(1_440_938_160).unwrap();
        let _ = sigv4::verify(&parts, &sig, "secret", &[sigv4::EMPTY_SHA256], now);
    }
    let _ = sigv4::canonical_uri(path);
    let _ = sigv4::canonical_query(query, true);
});
