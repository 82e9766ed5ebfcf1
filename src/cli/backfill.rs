//! `snapshotd backfill`: snapshots for history written before the daemon
//! ran (or that it missed), straight from stabilize's `events` table.
//!
//! The plan is every workflow with events beyond its latest snapshot (or
//! the ones named). Workflows are done in batches: each batch reads its
//! workflows' latest snapshots (verified) and the events after them in one
//! query, folds them with the daemon's own reducer, and commits the
//! snapshots with the writer's coverage check (a snapshot whose version is
//! not the table's count of events up to its sequence is not written; that
//! workflow is folded again from its first event). With `--every N` the
//! snapshots at every N-th version are written too, oldest first, so old
//! `as_of_sequence` replays start from a checkpoint as well.
//!
//! Re-running is cheap and safe: a finished workflow is no longer in the
//! plan, the store never replaces a newer snapshot with an older one, and
//! an interrupted run loses at most the batch it was in. It may run while
//! the daemon runs.

use super::{CommandError, open_store};
use crate::model::canonical::CanonicalError;
use crate::model::event::Event;
use crate::model::{EntityKey, EntityType, PreparedSnapshot};
use crate::reducer::{Reducer, State};
use crate::settings::Settings;
use crate::store::{Store, StoreError};
use serde_json::Value;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Workflows folded and committed together.
const BATCH_WORKFLOWS: usize = 500;

/// What to backfill.
#[derive(Debug, Clone, Default)]
pub struct BackfillOptions {
    /// Only these workflows (all with unsnapshotted events when empty).
    pub workflows: Vec<String>,
    /// Only workflows with events after this sequence.
    pub since_sequence: i64,
    /// Also snapshot every N-th version.
    pub every: Option<u32>,
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackfillSummary {
    pub workflows: u64,
    pub events: u64,
    pub snapshots: u64,
}

/// The snapshot a workflow's history continues from.
#[derive(Debug, Clone)]
pub struct Base {
    pub state: State,
    pub version: i32,
    pub sequence: i64,
}

impl Base {
    fn initial(reducer: Reducer, key: &EntityKey) -> Base {
        Base {
            state: reducer.initial(key),
            version: 0,
            sequence: 0,
        }
    }
}

/// Fold `events` (the workflow's, after `base`, in sequence order) and
/// return the snapshots to write, oldest first: one at every `every`-th
/// version when asked, and the last state.
pub fn fold_history(
    reducer: Reducer,
    key: &EntityKey,
    mut base: Base,
    events: &[Event],
    every: Option<u32>,
) -> Result<Vec<PreparedSnapshot>, CanonicalError> {
    let workflow_id: Arc<str> = key.entity_id.clone();
    let mut out = Vec::new();
    for event in events {
        reducer.fold(&mut base.state, event);
        base.version += 1;
        base.sequence = event.sequence;
        if every.is_some_and(|n| n > 0 && base.version % n as i32 == 0) {
            out.push(PreparedSnapshot::from_state(
                key.clone(),
                workflow_id.clone(),
                base.version,
                base.sequence,
                &base.state,
            )?);
        }
    }
    if !events.is_empty() && out.last().is_none_or(|s| s.version != base.version) {
        out.push(PreparedSnapshot::from_state(
            key.clone(),
            workflow_id,
            base.version,
            base.sequence,
            &base.state,
        )?);
    }
    Ok(out)
}

/// `snapshotd backfill`.
pub async fn backfill(
    settings: &Settings,
    options: &BackfillOptions,
) -> Result<BackfillSummary, CommandError> {
    let store = open_store(settings).await?;
    store.migrate().await?;
    if !store.has_events_table().await? {
        return Err(CommandError::Usage(format!(
            "{} holds no stabilize events table to backfill from",
            crate::store::redact(&settings.database.url)
        )));
    }
    let plan = store
        .backfill_plan(options.since_sequence, &options.workflows)
        .await?;
    let total: i64 = plan.iter().map(|(_, n)| n).sum();
    let mut progress = Progress::new(total as u64, plan.len() as u64);
    let mut summary = BackfillSummary::default();
    // The next batch is read while this one is folded and written: the
    // database and the fold each get a core.
    let mut chunks = plan.chunks(BATCH_WORKFLOWS).map(<[_]>::to_vec);
    let mut next = chunks.next().map(|chunk| spawn_load(&store, chunk));
    while let Some(loading) = next.take() {
        let batch = loading
            .await
            .map_err(|e| CommandError::Other(format!("reading a batch failed: {e}")))??;
        next = chunks.next().map(|chunk| spawn_load(&store, chunk));
        let workflows = batch.bases.len() as u64;
        let events = batch.events.len() as u64;
        let snapshots = write_batch(&store, batch, options.every).await?;
        summary.workflows += workflows;
        summary.events += events;
        summary.snapshots += snapshots;
        progress.advance(events, workflows);
    }
    progress.finish(&summary);
    store.close().await;
    Ok(summary)
}

/// A batch read from the store: each workflow's base and the events after it.
struct Batch {
    bases: Vec<(EntityKey, Base)>,
    /// In (workflow, sequence) order.
    events: Vec<Event>,
}

fn spawn_load(
    store: &Store,
    chunk: Vec<(String, i64)>,
) -> tokio::task::JoinHandle<Result<Batch, CommandError>> {
    let store = store.clone();
    tokio::spawn(async move { load_batch(&store, &chunk).await })
}

/// Read a batch: every workflow's verified latest snapshot (or its initial
/// state), then the events after it, in one query.
async fn load_batch(store: &Store, chunk: &[(String, i64)]) -> Result<Batch, CommandError> {
    let reducer = Reducer::Stabilize;
    let mut bases = Vec::with_capacity(chunk.len());
    for (id, _) in chunk {
        let key = EntityKey::new(EntityType::Workflow, id.clone());
        let base = match store.latest(&key).await {
            Ok(Some(snapshot)) => match snapshot.state {
                Value::Object(state) => Base {
                    state: reducer.from_stored(state),
                    version: snapshot.version,
                    sequence: snapshot.sequence,
                },
                _ => Base::initial(reducer, &key),
            },
            Ok(None) => Base::initial(reducer, &key),
            Err(error @ (StoreError::Integrity { .. } | StoreError::Corrupt { .. })) => {
                tracing::warn!(entity = %key, error = %super::chain(&error), "The latest snapshot fails verification; folding from the first event.");
                Base::initial(reducer, &key)
            }
            Err(error) => return Err(error.into()),
        };
        bases.push((key, base));
    }
    let wanted: Vec<(String, i64)> = bases
        .iter()
        .map(|(key, base)| (key.entity_id.to_string(), base.sequence))
        .collect();
    let events = store.events_of_workflows(&wanted).await?;
    Ok(Batch { bases, events })
}

/// Fold a batch and commit its snapshots (oldest versions first); the
/// number written.
async fn write_batch(store: &Store, batch: Batch, every: Option<u32>) -> Result<u64, CommandError> {
    let reducer = Reducer::Stabilize;
    let Batch { bases, events } = batch;
    let mut rounds: Vec<Vec<PreparedSnapshot>> = Vec::new();
    let mut at = 0;
    for (key, base) in bases {
        let end = at
            + events[at..]
                .iter()
                .take_while(|e| *e.workflow_id == *key.entity_id)
                .count();
        let history = fold_history(reducer, &key, base, &events[at..end], every)
            .map_err(|e| CommandError::Other(format!("{key}: {e}")))?;
        at = end;
        for (i, snapshot) in history.into_iter().enumerate() {
            if rounds.len() <= i {
                rounds.push(Vec::new());
            }
            rounds[i].push(snapshot);
        }
    }
    let mut written = 0;
    for round in rounds {
        let refs: Vec<&PreparedSnapshot> = round.iter().collect();
        let outcome = store.save_prepared(&refs, true).await?;
        written += outcome.written;
        for rejected in outcome.rejected {
            tracing::error!(entity = %rejected.key, version = rejected.version, error = %rejected.reason, "Snapshot refused by the store; it is not written.");
        }
        for uncovered in outcome.mismatched {
            // The base missed an event that committed late: from the start.
            written += refold_from_scratch(store, &uncovered.key, every).await?;
        }
    }
    Ok(written)
}

/// Fold a workflow from its first event and commit its snapshots.
async fn refold_from_scratch(
    store: &Store,
    key: &EntityKey,
    every: Option<u32>,
) -> Result<u64, CommandError> {
    let reducer = Reducer::Stabilize;
    let events = store
        .events_of_workflows(&[(key.entity_id.to_string(), 0)])
        .await?;
    let history = fold_history(reducer, key, Base::initial(reducer, key), &events, every)
        .map_err(|e| CommandError::Other(format!("{key}: {e}")))?;
    let mut written = 0;
    for snapshot in &history {
        let outcome = store.save_prepared(&[snapshot], true).await?;
        written += outcome.written;
        if !outcome.mismatched.is_empty() {
            return Err(CommandError::Other(format!(
                "{key}: the events table changed while it was folded; run backfill again"
            )));
        }
    }
    Ok(written)
}

/// A progress bar on a terminal, a plain line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    workflows_total: u64,
    workflows_done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    const LINE_EVERY: Duration = Duration::from_secs(2);

    fn new(total: u64, workflows_total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events, {per_sec}, ETA {eta} {msg}",
                )
                .expect("a valid template"),
            );
            bar
        });
        eprintln!("backfill: {workflows_total} workflows, {total} events to fold");
        Progress {
            bar,
            total,
            done: 0,
            workflows_total,
            workflows_done: 0,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn advance(&mut self, events: u64, workflows: u64) {
        self.done += events;
        self.workflows_done += workflows;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                bar.set_message(format!(
                    "({}/{} workflows)",
                    self.workflows_done, self.workflows_total
                ));
            }
            None if self.last_line.elapsed() >= Self::LINE_EVERY => {
                self.last_line = Instant::now();
                let rate = self.rate();
                let eta = if rate > 0.0 {
                    (self.total.saturating_sub(self.done)) as f64 / rate
                } else {
                    0.0
                };
                eprintln!(
                    "backfill: {}/{} events, {}/{} workflows, {rate:.0} events/s, ETA {eta:.0} s",
                    self.done, self.total, self.workflows_done, self.workflows_total
                );
            }
            None => {}
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn finish(&self, summary: &BackfillSummary) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "backfill: done: {} workflows, {} events folded in {:.1} s ({:.0} events/s), {} snapshots written",
            summary.workflows,
            summary.events,
            self.started.elapsed().as_secs_f64(),
            self.rate(),
            summary.snapshots
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::parse_timestamp;
    use crate::model::payload::Payload;
    use serde_json::json;

    fn event(seq: i64, step: i64) -> Event {
        let Value::Object(data) = json!({"context": {"step": step}}) else {
            unreachable!()
        };
        Event {
            event_type: "context.updated".into(),
            timestamp: parse_timestamp("2026-11-26T03:59:48.120000+00:00").unwrap(),
            sequence: seq,
            entity_type: EntityType::Workflow,
            entity_id: Arc::from("wf"),
            workflow_id: Arc::from("wf"),
            data: Payload::from_map(&data),
            schema_version: 1,
            numbers: crate::model::canonical::NumberForm::Jsonb,
        }
    }

    #[test]
    fn history_is_snapshotted_at_every_nth_version_and_at_the_end() {
        let key = EntityKey::new(EntityType::Workflow, "wf");
        let events: Vec<Event> = (1..=7).map(|i| event(i * 10, i)).collect();
        let base = Base::initial(Reducer::Stabilize, &key);
        let snaps = fold_history(Reducer::Stabilize, &key, base.clone(), &events, Some(3)).unwrap();
        let versions: Vec<(i32, i64)> = snaps.iter().map(|s| (s.version, s.sequence)).collect();
        assert_eq!(versions, vec![(3, 30), (6, 60), (7, 70)]);
        let latest = fold_history(Reducer::Stabilize, &key, base, &events, None).unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!(latest[0].state_hash, snaps[2].state_hash);
    }

    #[test]
    fn a_history_continues_from_its_base_and_nothing_new_gives_nothing() {
        let key = EntityKey::new(EntityType::Workflow, "wf");
        let all: Vec<Event> = (1..=6).map(|i| event(i, i)).collect();
        let whole = fold_history(
            Reducer::Stabilize,
            &key,
            Base::initial(Reducer::Stabilize, &key),
            &all,
            None,
        )
        .unwrap();
        let first = fold_history(
            Reducer::Stabilize,
            &key,
            Base::initial(Reducer::Stabilize, &key),
            &all[..4],
            None,
        )
        .unwrap();
        let state: serde_json::Map<String, Value> =
            serde_json::from_str(&first[0].state_text).unwrap();
        let base = Base {
            state: Reducer::Stabilize.from_stored(state),
            version: 4,
            sequence: 4,
        };
        let rest =
            fold_history(Reducer::Stabilize, &key, base.clone(), &all[4..], Some(4)).unwrap();
        // Version 8 is beyond the end; only the last state is written.
        assert_eq!(rest.len(), 1);
        assert_eq!(
            (rest[0].version, rest[0].state_hash.clone()),
            (6, whole[0].state_hash.clone())
        );
        assert!(
            fold_history(Reducer::Stabilize, &key, base, &[], Some(2))
                .unwrap()
                .is_empty()
        );
    }
}
