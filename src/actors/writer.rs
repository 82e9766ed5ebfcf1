//! The writer actor: receives snapshots from policy actors, keeps only the
//! newest pending one per entity, commits them in batches (size and time
//! bounded, one transaction each), prunes old ones, and rides out store
//! outages with capped backoff, holding what is pending (bounded by the
//! permits senders acquire) until the store is back.

use super::messages::{RouterMsg, WriterMsg};
use crate::cluster::ownership::Ownership;
use crate::error::chain;
use crate::model::{EntityKey, PreparedSnapshot};
use crate::stats::Stats;
use crate::store::{EventsTableWatch, Store, WriteFence};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// Start arguments.
pub struct WriterArgs {
    pub store: Store,
    /// When found, each snapshot is checked against stabilize's events
    /// table in the batch that commits it.
    pub events_table: Arc<EventsTableWatch>,
    pub batch_size: usize,
    pub batch_delay: Duration,
    pub retry_max: Duration,
    pub keep_snapshots: u32,
    pub stats: Arc<Stats>,
    /// In a cluster: writes are fenced by the partition leases.
    pub fence: Option<WriteFence>,
    /// In a cluster: what this node may still write (a snapshot of a lease
    /// it no longer holds is dropped on arrival, and never offered to a
    /// hydrating actor as a base).
    pub ownership: Option<Arc<Ownership>>,
}

pub struct Writer;

/// How many times `writer.batch_size` one transaction takes when draining
/// at shutdown or when that many batches are waiting.
const BACKLOG_BATCH_FACTOR: usize = 10;

struct Pending {
    snapshot: Box<PreparedSnapshot>,
    ticket: u64,
    _permit: OwnedSemaphorePermit,
}

pub struct WriterState {
    args: WriterArgs,
    router: Option<ActorRef<RouterMsg>>,
    pending: HashMap<EntityKey, Pending>,
    /// The pending snapshots by ticket, oldest first: a batch is taken from
    /// the front without sorting everything pending.
    order: BTreeMap<u64, EntityKey>,
    next_ticket: u64,
    /// Flushes waiting for every ticket up to theirs.
    waiters: Vec<(u64, RpcReplyPort<()>)>,
    /// A delayed commit is armed.
    commit_scheduled: bool,
    /// An immediate commit is in the mailbox.
    commit_queued: bool,
    /// Every entity is handing over its final snapshot: batches are as
    /// large as what is waiting allows.
    shutting_down: bool,
    /// Non-zero while the store is failing.
    backoff: Duration,
    draining: Option<(Instant, RpcReplyPort<usize>)>,
}

impl Actor for Writer {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WriterMsg>,
        args: WriterArgs,
    ) -> Result<WriterState, ActorProcessingErr> {
        Ok(WriterState {
            args,
            router: None,
            pending: HashMap::new(),
            order: BTreeMap::new(),
            next_ticket: 1,
            waiters: Vec::new(),
            commit_scheduled: false,
            commit_queued: false,
            shutting_down: false,
            backoff: Duration::ZERO,
            draining: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<WriterMsg>,
        msg: WriterMsg,
        state: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WriterMsg::Snapshot(snapshot, permit) => {
                if !state.may_write(&snapshot) {
                    state.args.stats.snapshots_fenced.inc();
                    tracing::debug!(entity = %snapshot.key, "Snapshot of a lease no longer held; dropped.");
                    return Ok(());
                }
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                let key = snapshot.key.clone();
                let newer = state
                    .pending
                    .get(&key)
                    .is_none_or(|old| snapshot.version >= old.snapshot.version);
                if newer {
                    state.order.insert(ticket, key.clone());
                    let old = state.pending.insert(
                        key,
                        Pending {
                            snapshot,
                            ticket,
                            _permit: permit,
                        },
                    );
                    if let Some(old) = old {
                        state.order.remove(&old.ticket);
                    }
                }
                state.publish_depth();
                if state.pending.len() >= state.args.batch_size && state.backoff.is_zero() {
                    if state.shutting_down {
                        // Behind the snapshots already in the mailbox: the
                        // batch takes them too (up to its limit).
                        state.schedule(&myself, Duration::ZERO);
                    } else {
                        state.commit(&myself).await;
                    }
                } else {
                    state.schedule(&myself, state.args.batch_delay);
                }
            }
            WriterMsg::Flush(reply) => {
                let upto = state.next_ticket - 1;
                tracing::debug!(upto, pending = state.pending.len(), "Flush.");
                state.waiters.push((upto, reply));
                state.answer_waiters();
                if !state.waiters.is_empty() && state.backoff.is_zero() {
                    state.commit(&myself).await;
                }
            }
            WriterMsg::PendingFor(key, reply) => {
                let _ = reply.send(state.pending_base(&key));
            }
            WriterMsg::PendingMany(keys, reply) => {
                let found = keys.iter().map(|key| state.pending_base(key)).collect();
                let _ = reply.send(found);
            }
            WriterMsg::SetRouter(router) => state.router = Some(router),
            WriterMsg::Ping(reply) => {
                let _ = reply.send(());
            }
            WriterMsg::Commit => {
                state.commit_scheduled = false;
                state.commit_queued = false;
                state.commit(&myself).await;
            }
            WriterMsg::ShutdownBegins => state.shutting_down = true,
            WriterMsg::Forget(partitions) => state.forget(&partitions),
            WriterMsg::Drain(deadline, reply) => {
                state.draining = Some((deadline, reply));
                state.shutting_down = true;
                state.backoff = Duration::ZERO;
                state.commit(&myself).await;
            }
        }
        Ok(())
    }
}

impl WriterState {
    /// Commit after `after`; with zero, as soon as the messages already
    /// queued are handled, even if a delayed commit is armed (it then
    /// finds little or nothing to do).
    fn schedule(&mut self, myself: &ActorRef<WriterMsg>, after: Duration) {
        if self.commit_queued {
            return;
        }
        if after.is_zero() {
            self.commit_queued = true;
            let _ = myself.cast(WriterMsg::Commit);
        } else if !self.commit_scheduled {
            self.commit_scheduled = true;
            myself.send_after(after, || WriterMsg::Commit);
        }
    }

    fn publish_depth(&self) {
        self.args
            .stats
            .writer_pending
            .set(self.pending.len() as i64);
    }

    /// Commit one batch (oldest first); then decide what comes next.
    async fn commit(&mut self, myself: &ActorRef<WriterMsg>) {
        if self.pending.is_empty() {
            self.finish_drain_if_done();
            return;
        }
        // At shutdown, or behind by several batches: larger transactions
        // (fewer commits and fsyncs for the same rows).
        let limit = if self.shutting_down || self.pending.len() >= 4 * self.args.batch_size {
            self.args.batch_size * BACKLOG_BATCH_FACTOR
        } else {
            self.args.batch_size
        };
        let keys: Vec<EntityKey> = self.order.values().take(limit).cloned().collect();
        let snapshots: Vec<&PreparedSnapshot> =
            keys.iter().map(|k| &*self.pending[k].snapshot).collect();
        // An entity's first row leaves nothing to prune (the many short
        // workflows stabilize runs are mostly that).
        let mut to_prune: Vec<EntityKey> = snapshots
            .iter()
            .filter(|s| !s.first_row)
            .map(|s| s.key.clone())
            .collect();
        let store = &self.args.store;
        let covered = self.args.events_table.check().await;
        let started = std::time::Instant::now();
        let result = store
            .save_fenced(&snapshots, covered, self.args.fence.as_ref())
            .await;
        tracing::debug!(batch = snapshots.len(), versions = ?snapshots.iter().map(|s| s.version).collect::<Vec<_>>(), ok = result.is_ok(), "Batch committed.");
        let stats = &self.args.stats;
        match result {
            Ok(outcome) => {
                if !self.backoff.is_zero() {
                    tracing::info!(
                        pending = self.pending.len(),
                        "Store is back; writing resumed."
                    );
                }
                self.backoff = Duration::ZERO;
                stats.store_up.set(1);
                stats.batch_written(outcome.written, snapshots.len(), started.elapsed());
                let committed_at = std::time::Instant::now();
                for snapshot in &snapshots {
                    // (A row skipped for a newer one already stored is
                    // not named by the store, and counts as committed.)
                    let written = !outcome.fenced.contains(&snapshot.key)
                        && !outcome.rejected.iter().any(|r| r.key == snapshot.key)
                        && !outcome.mismatched.iter().any(|m| m.key == snapshot.key);
                    if written && let Some(due) = snapshot.due_at {
                        stats.snapshot_committed(committed_at - due);
                    }
                }
                for rejected in &outcome.rejected {
                    stats.snapshots_rejected.inc();
                    tracing::error!(entity = %rejected.key, version = rejected.version, error = %rejected.reason, "Snapshot refused by the store; it is not written.");
                }
                if !outcome.fenced.is_empty() {
                    stats.snapshots_fenced.inc_by(outcome.fenced.len() as u64);
                    tracing::warn!(
                        snapshots = outcome.fenced.len(),
                        "Snapshots not written: their partitions' leases are no longer this node's."
                    );
                    to_prune.retain(|key| !outcome.fenced.contains(key));
                }
                for uncovered in &outcome.mismatched {
                    stats.snapshots_uncovered.inc();
                    tracing::warn!(entity = %uncovered.key, version = uncovered.version, sequence = uncovered.sequence,
                        events_in_table = uncovered.table_count, "Snapshot does not cover exactly the workflow's events; rebuilding it from the events table.");
                    if let Some(router) = &self.router {
                        let _ = router.cast(RouterMsg::Resync(uncovered.key.clone()));
                    }
                }
                for key in &keys {
                    if let Some(done) = self.pending.remove(key) {
                        self.order.remove(&done.ticket);
                    }
                }
                if let Err(error) = store
                    .prune_entities(&to_prune, self.args.keep_snapshots)
                    .await
                {
                    tracing::warn!(error = %chain(&error), "Pruning old snapshots failed; will prune on a later batch.");
                }
                self.publish_depth();
                self.answer_waiters();
                if self.pending.len() >= self.args.batch_size
                    || !self.waiters.is_empty()
                    || self.draining.is_some()
                {
                    self.schedule(myself, Duration::ZERO);
                } else if !self.pending.is_empty() {
                    self.schedule(myself, self.args.batch_delay);
                }
            }
            Err(error) => {
                stats.write_errors.inc();
                stats.store_up.set(0);
                self.backoff =
                    (self.backoff * 2).clamp(Duration::from_millis(100), self.args.retry_max);
                tracing::error!(error = %chain(&error), pending = self.pending.len(), retry_in_ms = self.backoff.as_millis() as u64,
                    "Writing snapshots failed; keeping them and retrying.");
                if let Some((deadline, _)) = &self.draining
                    && Instant::now() + self.backoff > *deadline
                {
                    let lost = self.pending.len();
                    if let Some((_, reply)) = self.draining.take() {
                        let _ = reply.send(lost);
                    }
                    return;
                }
                self.schedule(myself, self.backoff);
            }
        }
        self.finish_drain_if_done();
    }

    /// In a cluster: whether the snapshot's lease is still this node's.
    fn may_write(&self, snapshot: &PreparedSnapshot) -> bool {
        match (&self.args.ownership, snapshot.fence) {
            (Some(ownership), Some(fence)) => ownership.may_write(fence),
            _ => true,
        }
    }

    /// The pending snapshot of `key` a hydrating actor may start from.
    fn pending_base(&self, key: &EntityKey) -> Option<crate::model::Snapshot> {
        self.pending
            .get(key)
            .filter(|p| self.may_write(&p.snapshot))
            .map(|p| p.snapshot.to_snapshot())
    }

    /// Drop what is pending for `partitions` (no longer this node's).
    fn forget(&mut self, partitions: &[u32]) {
        let before = self.pending.len();
        let order = &mut self.order;
        self.pending.retain(|_, pending| {
            let keep = pending
                .snapshot
                .fence
                .is_none_or(|fence| !partitions.contains(&fence.partition));
            if !keep {
                order.remove(&pending.ticket);
            }
            keep
        });
        let dropped = before - self.pending.len();
        if dropped > 0 {
            self.args.stats.snapshots_fenced.inc_by(dropped as u64);
            tracing::info!(
                snapshots = dropped,
                "Pending snapshots of partitions no longer this node's dropped; their new owner rebuilds them."
            );
        }
        self.publish_depth();
        self.answer_waiters();
        self.finish_drain_if_done();
    }

    fn answer_waiters(&mut self) {
        let oldest = self.order.keys().next().copied().unwrap_or(u64::MAX);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(upto, _)| *upto < oldest);
        self.waiters = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    fn finish_drain_if_done(&mut self) {
        if self.pending.is_empty()
            && let Some((_, reply)) = self.draining.take()
        {
            let _ = reply.send(0);
        }
    }
}
