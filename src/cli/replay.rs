//! `snapshotd verify --replay`: rebuild each snapshot's state from
//! stabilize's `events` table with the daemon's own reducer and compare it
//! with the stored state, text-exact (see [`crate::verify`]).

use super::{CommandError, open_store};
use crate::reducer::Reducer;
use crate::settings::Settings;
use crate::verify::{check_workflow, sampled};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Only these workflows (every snapshotted workflow when empty).
    pub workflows: Vec<String>,
    /// The fraction of workflows checked (1.0: all), chosen by a stable
    /// hash of the id so a run can be repeated.
    pub sample: f64,
}

/// `snapshotd verify --replay`.
pub async fn verify_replay(
    settings: &Settings,
    options: &ReplayOptions,
) -> Result<(), CommandError> {
    let store = open_store(settings).await?;
    if !store.has_events_table().await? {
        return Err(CommandError::Usage(format!(
            "{} holds no stabilize events table to replay from",
            crate::store::redact(&settings.database.url)
        )));
    }
    let workflows = if options.workflows.is_empty() {
        store.workflows_with_snapshots().await?
    } else {
        options.workflows.clone()
    };
    let reducer = Reducer::Stabilize;
    let (mut rows, mut bad, mut superseded, mut checked_workflows) = (0u64, 0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    let mut last_line = started;
    for (i, id) in workflows.iter().enumerate() {
        if !sampled(id, options.sample, 0) {
            continue;
        }
        checked_workflows += 1;
        let check = check_workflow(&store, reducer, id).await?;
        rows += check.rows;
        superseded += check.superseded;
        bad += check.mismatches.len() as u64;
        for mismatch in &check.mismatches {
            eprintln!("{mismatch}");
        }
        if last_line.elapsed().as_secs() >= 2 {
            last_line = std::time::Instant::now();
            eprintln!(
                "verify --replay: {}/{} workflows, {rows} rows, {bad} mismatches",
                i + 1,
                workflows.len()
            );
        }
    }
    store.close().await;
    if bad > 0 {
        return Err(CommandError::VerifyFailed { rows, bad });
    }
    if superseded > 0 {
        println!(
            "{superseded} older rows were outgrown by events committed after them (a newer version of each is stored)"
        );
    }
    println!(
        "{} snapshot rows of {checked_workflows} workflows equal stabilize's replay of the events table",
        rows - superseded
    );
    Ok(())
}
