//! `mooring events tail BUS`: prints the events arriving on a bus, one JSON document per line.
//!
//! Every event accepted on a bus is written to a bounded log in the metadata database in the
//! same transaction that makes its deliveries durable; tail reads that log from a second
//! (read-only in effect) connection while the server runs, starting at the newest event or,
//! with `from_start`, at the oldest one kept.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use mooring_core::Db;

use crate::store::{EventsStore, SqliteEventsStore};

/// Prints events of `bus` to `out`; with `follow`, keeps polling until `stop` returns true.
pub fn run(
    data_dir: &Path,
    bus: &str,
    from_start: bool,
    follow: bool,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let path = data_dir.join("metadata.db");
    if !path.exists() {
        anyhow::bail!(
            "no Mooring data at {} (is --data-dir right?)",
            data_dir.display()
        );
    }
    let store = SqliteEventsStore::open(Db::open(&path)?)?;
    let mut after = if from_start {
        0
    } else {
        store
            .log_after(bus, 0, usize::MAX)?
            .last()
            .map_or(0, |(seq, _)| *seq)
    };
    loop {
        let rows = store.log_after(bus, after, 500)?;
        for (seq, event) in &rows {
            writeln!(out, "{event}")?;
            after = *seq;
        }
        out.flush()?;
        if rows.len() == 500 {
            continue;
        }
        if !follow || stop() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
