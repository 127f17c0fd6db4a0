//! Everything a service needs from the process, handed to it at wiring time.
//!
//! `mooring serve` builds one [`ServiceContext`] and passes it to every service's
//! constructor. It carries the merged configuration, the data directory, the metadata
//! database, ARN construction, the clock, the shutdown signal, the metrics registry, the
//! late-bound handles to the other services and Mooring's certificate authority.

use std::path::PathBuf;
use std::sync::Arc;

use crate::handles::ServiceHandles;
use crate::metrics::Metrics;
use crate::pki::CertificateAuthority;
use crate::{Arns, Clock, Config, Db, Shutdown};

#[derive(Clone)]
pub struct ServiceContext {
    pub config: Arc<Config>,
    pub data_dir: PathBuf,
    pub db: Db,
    pub arns: Arns,
    pub clock: Arc<dyn Clock>,
    pub shutdown: Shutdown,
    pub metrics: Metrics,
    pub handles: Arc<ServiceHandles>,
    pub ca: Arc<CertificateAuthority>,
}

impl ServiceContext {
    /// A service's own directory under the data directory, created if missing.
    pub fn service_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        let dir = self.data_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A context over a fresh temporary data directory with an on-disk database; for tests.
    pub fn for_tests(data_dir: &std::path::Path) -> anyhow::Result<ServiceContext> {
        let config = Config {
            data_dir: data_dir.to_path_buf(),
            ..Config::default()
        };
        let db = Db::open(&data_dir.join("metadata.db"))?;
        let (ca, _) = CertificateAuthority::load_or_create(data_dir)?;
        Ok(ServiceContext {
            arns: Arns::new(config.account_id.clone(), config.region.clone()),
            config: Arc::new(config),
            data_dir: data_dir.to_path_buf(),
            db,
            clock: Arc::new(crate::SystemClock),
            shutdown: Shutdown::new(),
            metrics: Metrics::new(),
            handles: ServiceHandles::new(),
            ca: Arc::new(ca),
        })
    }
}
