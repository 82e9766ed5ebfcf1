//! Deep verification: rebuild stored snapshots from stabilize's `events`
//! table with the daemon's own reducer and compare them, text-exact.
//! Recomputing a row's hash (plain `verify`) cannot catch a row whose state
//! and hash were both written wrong; this can.
//!
//! [`replay_rows`] is the pure core (rows and events in, findings out);
//! [`check_workflow`] reads one workflow and calls it; `snapshotd verify
//! --replay` and the daemon's background [`scrub`] are loops around that.
//!
//! # Superseded rows
//!
//! stabilize assigns sequences at insert, not at commit, so an event with a
//! lower sequence can become visible after a snapshot above it was written
//! (the writer's coverage check saw the table as it was). The daemon then
//! folds the late event and writes a newer version, but the older row stays
//! (until pruned) and its replay now counts more events than its version.
//! Such a row, when a newer version of the entity exists, is reported as
//! superseded, not as a mismatch; a row whose count agrees but whose state
//! differs is always a mismatch.

use crate::error::chain;
use crate::model::canonical::canonical_json;
use crate::model::event::Event;
use crate::model::{EntityKey, EntityType, Snapshot};
use crate::reducer::{Reducer, State};
use crate::settings::VerifySettings;
use crate::stats::Stats;
use crate::store::{Store, StoreError};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What replaying one workflow's rows found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkflowCheck {
    /// Rows compared (unreadable ones included).
    pub rows: u64,
    /// Rows that differ from the replay, or cannot be read: one line each.
    pub mismatches: Vec<String>,
    /// Rows the table has since outgrown, with a newer version stored.
    pub superseded: u64,
}

/// Replay `events` (the workflow's, in sequence order, up to the newest
/// row's sequence) and compare each row of `rows` (oldest version first)
/// with the state folded up to its sequence. Pure: no I/O.
pub fn replay_rows(
    reducer: Reducer,
    key: &EntityKey,
    rows: &[Snapshot],
    events: &[Event],
) -> WorkflowCheck {
    let mut check = WorkflowCheck::default();
    let newest_version = rows.iter().map(|r| r.version).max().unwrap_or(0);
    let mut state = reducer.initial(key);
    let mut folded = 0;
    for row in rows {
        check.rows += 1;
        while folded < events.len() && events[folded].sequence <= row.sequence {
            reducer.fold(&mut state, &events[folded]);
            folded += 1;
        }
        let problem = if row.version as usize != folded {
            if folded > row.version as usize && row.version < newest_version {
                check.superseded += 1;
                continue;
            }
            format!(
                "version {} but the table holds {folded} events up to sequence {}",
                row.version, row.sequence
            )
        } else if let Some(path) = state_difference(&row.state, &state) {
            format!("state differs from the replay at `{path}`")
        } else {
            continue;
        };
        check.mismatches.push(format!(
            "{key} version {} sequence {}: {problem}",
            row.version, row.sequence
        ));
    }
    check
}

/// Where the stored state differs from the rebuilt one (text-exact), if it
/// does.
fn state_difference(stored: &Value, rebuilt: &State) -> Option<String> {
    let same = rebuilt.texts().ok().map(|(canonical, _)| canonical) == canonical_json(stored).ok();
    if same {
        return None;
    }
    let rebuilt = Value::Object(rebuilt.to_map());
    Some(first_difference(stored, &rebuilt, "").unwrap_or_else(|| "(numbers)".into()))
}

/// Read one workflow's rows and events and replay them.
pub async fn check_workflow(
    store: &Store,
    reducer: Reducer,
    workflow_id: &str,
) -> Result<WorkflowCheck, StoreError> {
    let key = EntityKey::new(EntityType::Workflow, workflow_id.to_string());
    let mut rows = Vec::new();
    let mut unreadable = Vec::new();
    for row in store.snapshots_of(&key).await? {
        match row {
            Ok(row) => rows.push(row),
            Err(error) => unreadable.push(chain(&error)),
        }
    }
    let mut check = match rows.iter().map(|r| r.sequence).max() {
        Some(upto) => {
            let events = store.workflow_events(workflow_id, 0, upto).await?;
            replay_rows(reducer, &key, &rows, &events)
        }
        None => WorkflowCheck::default(),
    };
    check.rows += unreadable.len() as u64;
    check.mismatches.extend(unreadable);
    Ok(check)
}

/// Whether `id` is in a `fraction` sample drawn with `salt`: FNV-1a of the
/// id and the salt, its bits mixed (ids differ in their last characters),
/// so a pick is stable for one salt and about the right size.
pub fn sampled(id: &str, fraction: f64, salt: u64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let mut h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ salt, |h, b| {
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

/// Workflows listed per query while scrubbing.
const SCRUB_PAGE: i64 = 1000;

/// The daemon's background scrub (`[verify] interval_secs > 0`): every
/// interval, replay a fresh sample of the snapshotted workflows and count
/// `verify_checked` / `verify_mismatch`, warning for each mismatch. It runs
/// at low priority: after each workflow it rests as long as the check took,
/// so it holds one store connection at most half the time.
pub async fn scrub(
    store: Store,
    reducer: Reducer,
    settings: VerifySettings,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(settings.interval_secs);
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        round += 1;
        // A new salt each round, so successive samples cover everything.
        let salt = round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match scrub_round(&store, reducer, &settings, &stats, &mut stop, salt).await {
            Ok(Some((workflows, rows, bad))) => tracing::info!(
                workflows,
                rows,
                mismatches = bad,
                "Verify scrub round done."
            ),
            Ok(None) => return,
            Err(error) => tracing::warn!(
                error = %chain(&error),
                "Verify scrub round stopped early; the next round starts over."
            ),
        }
    }
}

/// One round; `None` when asked to stop.
async fn scrub_round(
    store: &Store,
    reducer: Reducer,
    settings: &VerifySettings,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
    salt: u64,
) -> Result<Option<(u64, u64, u64)>, StoreError> {
    if !store.has_events_table().await? {
        tracing::warn!(
            "Verify scrub skipped: the database holds no stabilize events table to replay from."
        );
        return Ok(Some((0, 0, 0)));
    }
    let (mut workflows, mut rows, mut bad) = (0, 0, 0);
    let mut after = String::new();
    loop {
        let page = store
            .workflows_with_snapshots_after(&after, SCRUB_PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(Some((workflows, rows, bad)));
        };
        after = last.clone();
        for id in page.iter().filter(|id| sampled(id, settings.sample, salt)) {
            if *stop.borrow() {
                return Ok(None);
            }
            let started = Instant::now();
            let check = check_workflow(store, reducer, id).await?;
            workflows += 1;
            rows += check.rows;
            bad += check.mismatches.len() as u64;
            stats.verify_checked.inc_by(check.rows);
            stats.verify_mismatch.inc_by(check.mismatches.len() as u64);
            for mismatch in &check.mismatches {
                tracing::error!(
                    workflow_id = %id,
                    "Verify scrub: a stored snapshot differs from the events table's replay: {mismatch}"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(started.elapsed()) => {}
                _ = stop.changed() => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::canonical::NumberForm;
    use crate::model::event::parse_timestamp;
    use crate::model::payload::Payload;
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
        let picked = ids.iter().filter(|id| sampled(id, 0.1, 0)).count();
        assert!((800..1200).contains(&picked), "{picked}");
        assert!(ids.iter().all(|id| sampled(id, 1.0, 7)));
        assert_eq!(sampled("wf7", 0.1, 3), sampled("wf7", 0.1, 3));
        // Another salt draws another sample.
        let other = ids.iter().filter(|id| sampled(id, 0.1, 1)).count();
        let both = ids
            .iter()
            .filter(|id| sampled(id, 0.1, 0) && sampled(id, 0.1, 1))
            .count();
        assert!((800..1200).contains(&other), "{other}");
        assert!(both < 300, "samples overlap in {both} of ~100 expected");
    }

    /// A workflow event setting `context.<field>` to `value`.
    fn event(sequence: i64, field: &str, value: &str) -> Event {
        let Value::Object(data) = json!({"context": {field: value}}) else {
            unreachable!()
        };
        Event {
            event_type: "context.updated".into(),
            timestamp: parse_timestamp("2026-11-26T03:59:48.120000+00:00").unwrap(),
            sequence,
            entity_type: EntityType::Workflow,
            entity_id: "wf1".into(),
            workflow_id: "wf1".into(),
            data: Payload::from_map(&data),
            schema_version: 1,
            numbers: NumberForm::Jsonb,
        }
    }

    fn row(key: &EntityKey, version: i32, sequence: i64, state: State) -> Snapshot {
        Snapshot::new(
            key.clone(),
            "wf1",
            version,
            sequence,
            Value::Object(state.to_map()),
        )
        .unwrap()
    }

    #[test]
    fn rows_equal_to_the_replay_pass_and_a_rewritten_state_is_named() {
        let reducer = Reducer::Stabilize;
        let key = EntityKey::new(EntityType::Workflow, "wf1");
        let events = [event(3, "t1", "RUNNING"), event(7, "t1", "SUCCEEDED")];
        let mut state = reducer.initial(&key);
        reducer.fold(&mut state, &events[0]);
        let first = row(&key, 1, 3, state.clone());
        reducer.fold(&mut state, &events[1]);
        let second = row(&key, 2, 7, state.clone());
        let check = replay_rows(reducer, &key, &[first.clone(), second.clone()], &events);
        assert_eq!(check.rows, 2);
        assert!(check.mismatches.is_empty(), "{:?}", check.mismatches);

        // State and hash rewritten together: the hash is consistent, the
        // replay is not.
        let forged = state.clone();
        let mut forged = forged.to_map();
        forged["context"]["t1"] = json!("FAILED");
        let forged = State::Tree(forged);
        let forged = row(&key, 2, 7, forged);
        let check = replay_rows(reducer, &key, &[first.clone(), forged], &events);
        assert_eq!(check.mismatches.len(), 1, "{:?}", check.mismatches);
        assert!(
            check.mismatches[0].contains("context.t1"),
            "{}",
            check.mismatches[0]
        );

        // The newest row counting fewer events than the table: a mismatch.
        let short = row(&key, 1, 7, state.clone());
        let check = replay_rows(reducer, &key, &[short], &events);
        assert_eq!(check.mismatches.len(), 1);
        assert!(check.mismatches[0].contains("version 1 but the table holds 2 events"));
    }

    #[test]
    fn a_row_outgrown_by_a_late_event_is_superseded_when_a_newer_version_exists() {
        let reducer = Reducer::Stabilize;
        let key = EntityKey::new(EntityType::Workflow, "wf1");
        // Sequence 5 committed after the snapshot at 7 (version 1) was taken.
        let late = [event(5, "t0", "RUNNING"), event(7, "t1", "RUNNING")];
        let mut without = reducer.initial(&key);
        reducer.fold(&mut without, &late[1]);
        let old = row(&key, 1, 7, without);
        let mut with = reducer.initial(&key);
        reducer.fold(&mut with, &late[0]);
        reducer.fold(&mut with, &late[1]);
        let new = row(&key, 2, 7, with);
        let check = replay_rows(reducer, &key, &[old.clone(), new], &late);
        assert_eq!((check.rows, check.superseded), (2, 1));
        assert!(check.mismatches.is_empty(), "{:?}", check.mismatches);
        // Alone, the same row is wrong.
        let check = replay_rows(reducer, &key, &[old], &late);
        assert_eq!(check.mismatches.len(), 1);
    }
}
