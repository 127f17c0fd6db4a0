//! Plain-text views of the stored jobs for `mooring jobs ls` and `mooring jobs show ID`:
//! read straight from the metadata database (safe while the server runs), with per-status
//! execution counts.

use std::fmt::Write as _;

use mooring_core::{Arns, Db};

use super::model::ExecutionStatus;
use super::state::JobsState;
use super::store::{JobStore, SqliteJobStore};

fn load(db: &Db) -> anyhow::Result<JobsState> {
    let loaded = SqliteJobStore::open(db.clone())?.load()?;
    let mut state = JobsState::new(Arns::new("", ""), 60_000);
    state.load(loaded.jobs, loaded.executions);
    Ok(state)
}

fn counts_line(state: &JobsState, job: &str) -> String {
    let counts = state.counts.get(job).cloned().unwrap_or_default();
    ExecutionStatus::ALL
        .iter()
        .map(|s| format!("{}={}", s.as_str(), counts.get(*s)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line per job: id, status, target selection, backlog, per-status counts.
pub fn list(db: &Db) -> anyhow::Result<String> {
    let state = load(db)?;
    let mut out = String::new();
    writeln!(
        out,
        "{:<40} {:<12} {:<10} {:>7}  EXECUTIONS",
        "JOB", "STATUS", "TARGETS", "BACKLOG"
    )?;
    for job in state.jobs.values() {
        writeln!(
            out,
            "{:<40} {:<12} {:<10} {:>7}  {}",
            job.job_id,
            job.status.as_str(),
            if job.continuous {
                "CONTINUOUS"
            } else {
                "SNAPSHOT"
            },
            job.backlog.len(),
            counts_line(&state, &job.job_id)
        )?;
    }
    Ok(out)
}

/// The job, its counts and every execution's latest state.
pub fn show(db: &Db, job_id: &str) -> anyhow::Result<String> {
    let state = load(db)?;
    let Some(job) = state.jobs.get(job_id) else {
        anyhow::bail!("no job {job_id}");
    };
    let mut out = String::new();
    writeln!(out, "job:        {}", job.job_id)?;
    writeln!(out, "status:     {}", job.status.as_str())?;
    writeln!(
        out,
        "selection:  {}",
        if job.continuous {
            "CONTINUOUS"
        } else {
            "SNAPSHOT"
        }
    )?;
    if let Some(d) = &job.description {
        writeln!(out, "description: {d}")?;
    }
    writeln!(out, "targets:    {}", job.targets.join(", "))?;
    writeln!(out, "backlog:    {}", job.backlog.len())?;
    writeln!(out, "counts:     {}", counts_line(&state, job_id))?;
    writeln!(out, "document:   {}", job.document.as_deref().unwrap_or(""))?;
    writeln!(
        out,
        "{:<40} {:>4} {:<12} {:>7}",
        "THING", "EXEC", "STATUS", "VERSION"
    )?;
    for thing in state.things_of_job.get(job_id).into_iter().flatten() {
        if let Some(e) = state.latest(thing, job_id) {
            writeln!(
                out,
                "{:<40} {:>4} {:<12} {:>7}",
                thing,
                e.execution_number,
                e.status.as_str(),
                e.version_number
            )?;
        }
    }
    Ok(out)
}
