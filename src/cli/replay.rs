//! `snapshotd verify --replay`: rebuild each snapshot's state from
//! stabilize's `events` table with the daemon's own reducer and compare it
//! with the stored state, text-exact. Plain `verify` only recomputes
//! hashes, so a row whose state and hash were both written wrong passes
//! it; this does not.

use super::{CommandError, chain, open_store};
use crate::model::canonical::canonical_json;
use crate::model::{EntityKey, EntityType};
use crate::reducer::Reducer;
use crate::settings::Settings;
use serde_json::{Map, Value};

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
    let (mut rows, mut bad, mut checked_workflows) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    let mut last_line = started;
    for (i, id) in workflows.iter().enumerate() {
        if !sampled(id, options.sample) {
            continue;
        }
        checked_workflows += 1;
        let key = EntityKey::new(EntityType::Workflow, id.clone());
        let snapshots = store.snapshots_of(&key).await?;
        let Some(upto) = snapshots.iter().flatten().map(|s| s.sequence).max() else {
            bad += snapshots.len() as u64;
            rows += snapshots.len() as u64;
            for snapshot in snapshots.into_iter().filter_map(Result::err) {
                eprintln!("{}", chain(&snapshot));
            }
            continue;
        };
        let events = store.workflow_events(id, 0, upto).await?;
        let mut state = reducer.initial(&key);
        let mut folded = 0;
        for snapshot in snapshots {
            rows += 1;
            let snapshot = match snapshot {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    bad += 1;
                    eprintln!("{}", chain(&error));
                    continue;
                }
            };
            while folded < events.len() && events[folded].sequence <= snapshot.sequence {
                reducer.fold(&mut state, &events[folded]);
                folded += 1;
            }
            let problem = if snapshot.version as usize != folded {
                Some(format!(
                    "version {} but the table holds {folded} events up to sequence {}",
                    snapshot.version, snapshot.sequence
                ))
            } else {
                let rebuilt = Value::Object(state.clone());
                let same = canonical_json(&rebuilt).ok() == canonical_json(&snapshot.state).ok();
                (!same).then(|| {
                    format!(
                        "state differs from the replay at `{}`",
                        first_difference(&snapshot.state, &rebuilt, "")
                            .unwrap_or_else(|| "(numbers)".into())
                    )
                })
            };
            if let Some(problem) = problem {
                bad += 1;
                eprintln!(
                    "{key} version {} sequence {}: {problem}",
                    snapshot.version, snapshot.sequence
                );
            }
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
    println!(
        "{rows} snapshot rows of {checked_workflows} workflows equal stabilize's replay of the events table"
    );
    Ok(())
}

/// Whether `id` is in a `fraction` sample: FNV-1a of the id, its bits
/// mixed (ids differ in their last characters), so the pick is stable and
/// about the right size.
fn sampled(id: &str, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h as f64 / u64::MAX as f64) < fraction
}

/// The path (`a.b[2].c`) of the first place two JSON values differ.
pub fn first_difference(stored: &Value, rebuilt: &Value, path: &str) -> Option<String> {
    let here = || {
        if path.is_empty() {
            "(root)".to_string()
        } else {
            path.to_string()
        }
    };
    match (stored, rebuilt) {
        (Value::Object(a), Value::Object(b)) => first_in_objects(a, b, path)
            .or_else(|| (canonical_json(stored).ok() != canonical_json(rebuilt).ok()).then(here)),
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if let Some(found) = first_difference(x, y, &format!("{path}[{i}]")) {
                    return Some(found);
                }
            }
            (a.len() != b.len()).then(here)
        }
        (a, b) => (canonical_json(a).ok() != canonical_json(b).ok()).then(here),
    }
}

fn first_in_objects(a: &Map<String, Value>, b: &Map<String, Value>, path: &str) -> Option<String> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    for (k, x) in a {
        match b.get(k) {
            Some(y) => {
                if let Some(found) = first_difference(x, y, &join(k)) {
                    return Some(found);
                }
            }
            None => return Some(join(k)),
        }
    }
    b.keys().find(|k| !a.contains_key(*k)).map(|k| join(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_difference_is_named_by_its_path() {
        let a = json!({"tasks": {"t": {"status": "RUNNING", "n": [1, 2]}}, "x": 1});
        let b = json!({"tasks": {"t": {"status": "SUCCEEDED", "n": [1, 2]}}, "x": 1});
        assert_eq!(
            first_difference(&a, &b, "").as_deref(),
            Some("tasks.t.status")
        );
        let c = json!({"tasks": {"t": {"status": "RUNNING", "n": [1, 3]}}, "x": 1});
        assert_eq!(
            first_difference(&a, &c, "").as_deref(),
            Some("tasks.t.n[1]")
        );
        assert_eq!(first_difference(&a, &a, ""), None);
        let d = json!({"tasks": {"t": {"status": "RUNNING", "n": [1, 2]}}, "x": 1, "y": 2});
        assert_eq!(first_difference(&a, &d, "").as_deref(), Some("y"));
    }

    #[test]
    fn a_sample_is_stable_and_about_its_size() {
        // Ids that differ only in their last characters, as ULIDs and
        // padded ids do.
        let ids: Vec<String> = (0..10_000)
            .map(|i| format!("{:0>26}", format!("W{i:x}")))
            .collect();
        let picked = ids.iter().filter(|id| sampled(id, 0.1)).count();
        assert!((800..1200).contains(&picked), "{picked}");
        assert!(ids.iter().all(|id| sampled(id, 1.0)));
        assert_eq!(sampled("wf7", 0.1), sampled("wf7", 0.1));
    }
}
