//! Playback sessions: the parameters of a GetHLSStreamingSessionURL /
//! GetDASHStreamingSessionURL call, carried in the session URL's `SessionToken`.
//!
//! A token is the session as compact JSON, base64url-encoded, followed by an HMAC-SHA256 of
//! it under a key kept in the data directory (created on first use, so tokens survive a
//! restart). The session endpoints are unsigned GET requests: the token alone authorizes
//! them until it expires; a forged, altered or expired token gets NotAuthorizedException.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::{ErrorKind, VideoError, VideoResult};
use crate::store::TimeClock;

/// How a session chooses its fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlaybackMode {
    Live,
    LiveReplay,
    OnDemand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Container {
    FragmentedMp4,
    MpegTs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Discontinuity {
    Always,
    Never,
    OnDiscontinuity,
}

/// Everything a session's resources need, as signed into its token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Random id (per-session state such as media sequence numbering is keyed by it).
    pub id: String,
    /// `hls` or `dash`.
    pub kind: String,
    pub stream_arn: String,
    pub mode: PlaybackMode,
    /// Producer (true) or server (false) timestamps select fragments and time the media.
    pub producer_clock: bool,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub container: Container,
    pub discontinuity: Discontinuity,
    pub display_timestamp: bool,
    pub display_fragment_number: bool,
    pub max_fragments: usize,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// Mooring option: low-latency HLS (partial segments) for LIVE sessions.
    #[serde(default)]
    pub low_latency: bool,
}

impl Session {
    pub fn clock(&self) -> TimeClock {
        if self.producer_clock {
            TimeClock::Producer
        } else {
            TimeClock::Server
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks session tokens.
pub struct SessionKeys {
    key: Vec<u8>,
}

impl SessionKeys {
    /// Loads the signing key from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> std::io::Result<SessionKeys> {
        let path = dir.join("session-token.key");
        if let Ok(key) = std::fs::read(&path) {
            if key.len() == 32 {
                return Ok(SessionKeys { key });
            }
        }
        let key: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let tmp = dir.join("session-token.key.tmp");
        std::fs::write(&tmp, &key)?;
        std::fs::rename(&tmp, &path)?;
        Ok(SessionKeys { key })
    }

    pub fn from_key(key: Vec<u8>) -> SessionKeys {
        SessionKeys { key }
    }

    fn mac(&self, payload: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length works");
        mac.update(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn sign(&self, session: &Session) -> String {
        let json = serde_json::to_vec(session).expect("sessions serialize");
        let payload = URL_SAFE_NO_PAD.encode(json);
        let mac = self.mac(&payload);
        format!("{payload}.{mac}")
    }

    /// The session of a token, if it is genuine and has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> VideoResult<Session> {
        let denied = |why: &str| {
            VideoError::new(
                ErrorKind::NotAuthorized,
                format!("Unauthorized: the session token {why}"),
            )
        };
        let (payload, mac) = token
            .split_once('.')
            .ok_or_else(|| denied("is malformed"))?;
        let expected = self.mac(payload);
        if !constant_time_eq(expected.as_bytes(), mac.as_bytes()) {
            return Err(denied("is not valid"));
        }
        let session: Session = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| denied("is malformed"))?;
        if now_ms >= session.expires_ms {
            return Err(denied("has expired"));
        }
        Ok(session)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            id: "abc".into(),
            kind: "hls".into(),
            stream_arn: "arn:aws:kinesisvideo:us-east-1:1:stream/s/1".into(),
            mode: PlaybackMode::Live,
            producer_clock: false,
            start_ms: None,
            end_ms: None,
            container: Container::FragmentedMp4,
            discontinuity: Discontinuity::Always,
            display_timestamp: false,
            display_fragment_number: false,
            max_fragments: 5,
            created_ms: 0,
            expires_ms: 300_000,
            low_latency: false,
        }
    }

    #[test]
    fn tokens_verify_until_they_expire_and_resist_tampering() {
        let keys = SessionKeys::from_key(vec![7; 32]);
        let token = keys.sign(&session());
        assert_eq!(keys.verify(&token, 1).unwrap(), session());
        let expired = keys.verify(&token, 300_000).unwrap_err();
        assert_eq!(expired.kind, ErrorKind::NotAuthorized);
        assert!(expired.message.contains("expired"));
        let mut forged = session();
        forged.expires_ms = i64::MAX;
        let forged_payload = keys.sign(&forged);
        let tampered = format!(
            "{}.{}",
            forged_payload.split('.').next().unwrap(),
            token.split('.').nth(1).unwrap()
        );
        assert!(keys.verify(&tampered, 1).is_err());
        let other = SessionKeys::from_key(vec![8; 32]);
        assert!(other.verify(&token, 1).is_err());
        assert!(keys.verify("garbage", 1).is_err());
    }
}
