//! The access key pair that signs requests to Mooring's HTTP APIs.
//!
//! On first start Mooring generates an access key id and secret and writes them to
//! `DATA_DIR/credentials` in the AWS shared-credentials format under the profile `mooring`,
//! next to `DATA_DIR/aws-config` holding the profile's region and endpoint. Later starts read
//! the same file back, so clients configured once keep working. Keys fixed in the
//! configuration take precedence and are written to the same files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;

/// The profile name used in the generated credentials and config files.
pub const PROFILE: &str = "mooring";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// When set, requests must carry it as `X-Amz-Security-Token`.
    pub session_token: Option<String>,
}

impl Credentials {
    /// A fresh random key pair in AWS's shapes (`AKIA` + 16, and 40 characters).
    pub fn generate() -> Self {
        const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut rng = rand::thread_rng();
        let pick = |set: &[u8], n: usize, rng: &mut rand::rngs::ThreadRng| -> String {
            (0..n)
                .map(|_| set[rng.gen_range(0..set.len())] as char)
                .collect()
        };
        Credentials {
            access_key_id: format!("AKIA{}", pick(UPPER, 16, &mut rng)),
            secret_access_key: pick(SECRET, 40, &mut rng),
            session_token: None,
        }
    }

    /// Reads the `mooring` profile from a shared-credentials file, if present and complete.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut in_profile = false;
        let (mut key, mut secret, mut token) = (None, None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_profile = line == format!("[{PROFILE}]");
                continue;
            }
            if !in_profile {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().to_string();
                match k.trim() {
                    "aws_access_key_id" => key = Some(v),
                    "aws_secret_access_key" => secret = Some(v),
                    "aws_session_token" => token = Some(v),
                    _ => {}
                }
            }
        }
        Ok(match (key, secret) {
            (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
                access_key_id,
                secret_access_key,
                session_token: token,
            }),
            _ => None,
        })
    }

    /// Writes the shared-credentials file (mode 0600) and the matching config file.
    pub fn write_files(&self, data_dir: &Path, region: &str, endpoint_url: &str) -> Result<()> {
        let mut credentials = format!(
            "# Written by Mooring. Use with AWS_SHARED_CREDENTIALS_FILE={} AWS_PROFILE={PROFILE}\n[{PROFILE}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            credentials_path(data_dir).display(),
            self.access_key_id,
            self.secret_access_key
        );
        if let Some(token) = &self.session_token {
            credentials.push_str(&format!("aws_session_token = {token}\n"));
        }
        write_private(&credentials_path(data_dir), &credentials)?;
        let config = format!(
            "# Written by Mooring. Use with AWS_CONFIG_FILE={} AWS_PROFILE={PROFILE}\n[profile {PROFILE}]\nregion = {region}\nendpoint_url = {endpoint_url}\n",
            aws_config_path(data_dir).display()
        );
        write_private(&aws_config_path(data_dir), &config)
    }

    /// The credentials to serve with: fixed ones from the configuration, else the ones kept
    /// in the data directory, else newly generated ones. Returns whether they are new.
    pub fn load_or_create(
        data_dir: &Path,
        configured: Option<Credentials>,
    ) -> Result<(Credentials, bool)> {
        if let Some(configured) = configured {
            return Ok((configured, false));
        }
        if let Some(existing) = Self::read(&credentials_path(data_dir))? {
            return Ok((existing, false));
        }
        Ok((Self::generate(), true))
    }
}

pub fn credentials_path(data_dir: &Path) -> PathBuf {
    data_dir.join("credentials")
}

pub fn aws_config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("aws-config")
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (creds, fresh) = Credentials::load_or_create(dir.path(), None).unwrap();
        assert!(fresh);
        assert!(creds.access_key_id.starts_with("AKIA"));
        assert_eq!(creds.access_key_id.len(), 20);
        assert_eq!(creds.secret_access_key.len(), 40);
        creds
            .write_files(dir.path(), "us-east-1", "http://127.0.0.1:4566")
            .unwrap();
        let (again, fresh) = Credentials::load_or_create(dir.path(), None).unwrap();
        assert!(!fresh);
        assert_eq!(again, creds);
        let config = std::fs::read_to_string(aws_config_path(dir.path())).unwrap();
        assert!(config.contains("[profile mooring]"));
        assert!(config.contains("endpoint_url = http://127.0.0.1:4566"));
    }
}
