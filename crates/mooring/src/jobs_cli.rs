//! `mooring jobs ls` and `mooring jobs show ID`: the stored jobs with per-status execution
//! counts, read from the data directory's metadata database.

use std::path::Path;

use anyhow::{Context, Result};
use mooring_core::Db;

fn open(data_dir: &Path) -> Result<Db> {
    let path = data_dir.join("metadata.db");
    anyhow::ensure!(path.exists(), "no metadata database at {}", path.display());
    Db::open(&path).with_context(|| format!("opening {}", path.display()))
}

/// Prints every job.
pub fn ls(data_dir: &Path) -> Result<()> {
    print!("{}", mooring_iot::jobs::report::list(&open(data_dir)?)?);
    Ok(())
}

/// Prints one job and its executions.
pub fn show(data_dir: &Path, job_id: &str) -> Result<()> {
    print!(
        "{}",
        mooring_iot::jobs::report::show(&open(data_dir)?, job_id)?
    );
    Ok(())
}
