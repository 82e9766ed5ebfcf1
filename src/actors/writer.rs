//! The writer actor: receives snapshots from policy actors, keeps only the
//! newest pending one per entity, commits them in batches (size and time
//! bounded, one transaction each), prunes old ones, and rides out store
//! outages with capped backoff, holding what is pending (bounded by the
//! permits senders acquire) until the store is back.
//!
//! Up to `writer.connections` batches commit at once, each in a task of its
//! own, so a slow commit does not hold up the snapshots that fell due during
//! it. An entity is in at most one batch at a time, so its rows are
//! committed in version order; the actor itself never waits on the store.

use super::messages::{RouterMsg, WriterMsg};
use crate::cluster::ownership::Ownership;
use crate::error::chain;
use crate::model::{EntityKey, PreparedSnapshot};
use crate::stats::Stats;
use crate::store::{EventsTableWatch, Store, WriteFence};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// Start arguments.
pub struct WriterArgs {
    pub store: Store,
    /// Most batches committing at once (SQLite writes one at a time: 1).
    pub connections: usize,
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
    snapshot: Arc<PreparedSnapshot>,
    ticket: u64,
    _permit: OwnedSemaphorePermit,
}

/// A batch's commit, done in its own task, reported back to the actor.
pub struct BatchDone {
    number: u64,
    /// The snapshots it carried (in flight until now).
    keys: Vec<EntityKey>,
    result: Result<crate::store::BatchOutcome, crate::store::StoreError>,
    started: Instant,
    committed_at: Instant,
}

pub struct WriterState {
    args: WriterArgs,
    router: Option<ActorRef<RouterMsg>>,
    pending: HashMap<EntityKey, Pending>,
    /// The pending snapshots by ticket, oldest first: a batch is taken from
    /// the front without sorting everything pending.
    order: BTreeMap<u64, EntityKey>,
    /// Snapshots in a batch being committed (an entity is in one at most).
    in_flight: HashMap<EntityKey, Pending>,
    /// Batches being committed, by number (numbered as they start).
    batches: BTreeSet<u64>,
    next_batch: u64,
    /// Watchdog pings held while batches commit, each with the newest batch
    /// started before it: answered once every batch up to that one has
    /// ended, so one commit stuck on the store stops the pings.
    pings: Vec<(u64, RpcReplyPort<()>)>,
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
    /// While the store is failing: no batch starts before this.
    retry_at: Option<Instant>,
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
            in_flight: HashMap::new(),
            batches: BTreeSet::new(),
            next_batch: 1,
            pings: Vec::new(),
            next_ticket: 1,
            waiters: Vec::new(),
            commit_scheduled: false,
            commit_queued: false,
            shutting_down: false,
            backoff: Duration::ZERO,
            retry_at: None,
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
                let newest = state.pending.get(&key).or(state.in_flight.get(&key));
                let newer = newest.is_none_or(|old| snapshot.version >= old.snapshot.version);
                if newer {
                    // Replacing a pending one, it takes that one's place in
                    // line: a flush waiting for the older snapshot waits
                    // for this one, which covers the same events and more.
                    let ticket = state.pending.get(&key).map_or(ticket, |old| old.ticket);
                    state.order.insert(ticket, key.clone());
                    state.pending.insert(
                        key,
                        Pending {
                            snapshot: Arc::from(snapshot),
                            ticket,
                            _permit: permit,
                        },
                    );
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
                if state.batches.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.pings.push((state.next_batch - 1, reply));
                }
            }
            WriterMsg::Committed(done) => state.committed(&myself, *done),
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
                state.retry_at = None;
                state.commit(&myself).await;
            }
        }
        Ok(())
    }
}

/// Answer the replies waiting for everything up to a number below `oldest`
/// (the oldest ticket or batch still outstanding); keep the others.
fn answer_below(replies: &mut Vec<(u64, RpcReplyPort<()>)>, oldest: u64) {
    let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(replies)
        .into_iter()
        .partition(|(upto, _)| *upto < oldest);
    *replies = waiting;
    for (_, reply) in done {
        let _ = reply.send(());
    }
}

/// Commit one batch (and prune what it superseded).
async fn commit_batch(
    number: u64,
    store: Store,
    events_table: Arc<EventsTableWatch>,
    fence: Option<WriteFence>,
    keep: u32,
    snapshots: Vec<Arc<PreparedSnapshot>>,
) -> BatchDone {
    let rows: Vec<&PreparedSnapshot> = snapshots.iter().map(|s| &**s).collect();
    let covered = events_table.check().await;
    let started = Instant::now();
    let result = store.save_fenced(&rows, covered, fence.as_ref()).await;
    let committed_at = Instant::now();
    tracing::debug!(batch = rows.len(), versions = ?rows.iter().map(|s| s.version).collect::<Vec<_>>(), ok = result.is_ok(), "Batch committed.");
    if let Ok(outcome) = &result {
        // An entity's first row leaves nothing to prune (the many short
        // workflows stabilize runs are mostly that).
        let to_prune: Vec<EntityKey> = rows
            .iter()
            .filter(|s| !s.first_row && !outcome.fenced.contains(&s.key))
            .map(|s| s.key.clone())
            .collect();
        if let Err(error) = store.prune_entities(&to_prune, keep).await {
            tracing::warn!(error = %chain(&error), "Pruning old snapshots failed; will prune on a later batch.");
        }
    }
    BatchDone {
        number,
        keys: rows.iter().map(|s| s.key.clone()).collect(),
        result,
        started,
        committed_at,
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
            .set((self.pending.len() + self.in_flight.len()) as i64);
    }

    /// Start committing one batch (oldest first, entities not already in
    /// a batch), when a connection is free and the store is not failing.
    async fn commit(&mut self, myself: &ActorRef<WriterMsg>) {
        if self.pending.is_empty() {
            self.finish_drain_if_done();
            return;
        }
        let retry_later = self.retry_at.is_some_and(|at| Instant::now() < at);
        if self.batches.len() >= self.args.connections.max(1) || retry_later {
            // A batch ending (or the retry) commits again.
            return;
        }
        // At shutdown, or behind by several batches: larger transactions
        // (fewer commits and fsyncs for the same rows).
        let limit = if self.shutting_down || self.pending.len() >= 4 * self.args.batch_size {
            self.args.batch_size * BACKLOG_BATCH_FACTOR
        } else {
            self.args.batch_size
        };
        let keys: Vec<EntityKey> = self
            .order
            .values()
            .filter(|key| !self.in_flight.contains_key(*key))
            .take(limit)
            .cloned()
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut snapshots = Vec::with_capacity(keys.len());
        for key in &keys {
            if let Some(pending) = self.pending.remove(key) {
                self.order.remove(&pending.ticket);
                snapshots.push(pending.snapshot.clone());
                self.in_flight.insert(key.clone(), pending);
            }
        }
        let number = self.next_batch;
        self.next_batch += 1;
        self.batches.insert(number);
        let batch = commit_batch(
            number,
            self.args.store.clone(),
            self.args.events_table.clone(),
            self.args.fence.clone(),
            self.args.keep_snapshots,
            snapshots,
        );
        if self.args.connections <= 1 {
            // One at a time (SQLite): in the actor, as its mailbox waits,
            // so hydration lookups and new snapshots queue behind the
            // commit instead of racing it for the database.
            let done = batch.await;
            self.committed(myself, done);
            return;
        }
        let reply_to = myself.clone();
        let keys_sent = keys.clone();
        tokio::spawn(async move {
            // A panic inside the commit is reported as its failure: the
            // batch goes back to pending instead of staying in flight.
            use futures_util::FutureExt;
            let done = match std::panic::AssertUnwindSafe(batch).catch_unwind().await {
                Ok(done) => done,
                Err(panic) => BatchDone {
                    number,
                    keys: keys_sent,
                    result: Err(crate::store::StoreError::Aborted(
                        panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "the commit task panicked".into()),
                    )),
                    started: Instant::now(),
                    committed_at: Instant::now(),
                },
            };
            let _ = reply_to.cast(WriterMsg::Committed(Box::new(done)));
        });
        self.publish_depth();
        // Another connection may take the next batch at once.
        if self.pending.len() >= self.args.batch_size || !self.waiters.is_empty() {
            self.schedule(myself, Duration::ZERO);
        }
    }

    /// A batch's commit ended: account for it, and decide what comes next.
    fn committed(&mut self, myself: &ActorRef<WriterMsg>, done: BatchDone) {
        self.batches.remove(&done.number);
        let oldest = self.batches.first().copied().unwrap_or(u64::MAX);
        answer_below(&mut self.pings, oldest);
        let stats = &self.args.stats;
        match done.result {
            Ok(outcome) => {
                if !self.backoff.is_zero() {
                    tracing::info!(
                        pending = self.pending.len(),
                        "Store is back; writing resumed."
                    );
                }
                self.backoff = Duration::ZERO;
                self.retry_at = None;
                stats.store_up.set(1);
                stats.batch_written(
                    outcome.written,
                    done.keys.len(),
                    done.committed_at - done.started,
                );
                for key in &done.keys {
                    let Some(flown) = self.in_flight.remove(key) else {
                        continue;
                    };
                    // (A row skipped for a newer one already stored is
                    // not named by the store, and counts as committed.)
                    let written = !outcome.fenced.contains(key)
                        && !outcome.rejected.iter().any(|r| r.key == *key)
                        && !outcome.mismatched.iter().any(|m| m.key == *key);
                    if written && let Some(due) = flown.snapshot.due_at {
                        stats.snapshot_committed(done.committed_at - due);
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
                }
                for uncovered in &outcome.mismatched {
                    stats.snapshots_uncovered.inc();
                    tracing::warn!(entity = %uncovered.key, version = uncovered.version, sequence = uncovered.sequence,
                        events_in_table = uncovered.table_count, "Snapshot does not cover exactly the workflow's events; rebuilding it from the events table.");
                    if let Some(router) = &self.router {
                        let _ = router.cast(RouterMsg::Resync(uncovered.key.clone()));
                    }
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
                // Back to pending, under their tickets, unless a newer
                // snapshot of the entity came meanwhile or its lease is no
                // longer this node's.
                let mut fenced = 0;
                for key in &done.keys {
                    if let Some(flown) = self.in_flight.remove(key) {
                        if !self.may_write(&flown.snapshot) {
                            fenced += 1;
                        } else if let Some(newer) = self.pending.get_mut(key) {
                            // The newer one takes the older place in line
                            // (flushes waited for the failed one).
                            if flown.ticket < newer.ticket {
                                self.order.remove(&newer.ticket);
                                newer.ticket = flown.ticket;
                                self.order.insert(flown.ticket, key.clone());
                            }
                        } else {
                            self.order.insert(flown.ticket, key.clone());
                            self.pending.insert(key.clone(), flown);
                        }
                    }
                }
                stats.snapshots_fenced.inc_by(fenced);
                stats.write_errors.inc();
                stats.store_up.set(0);
                self.publish_depth();
                self.answer_waiters();
                if self.retry_at.is_some_and(|at| Instant::now() < at) {
                    // Another batch of the same outage failed: its retry
                    // is armed already.
                    return;
                }
                self.backoff =
                    (self.backoff * 2).clamp(Duration::from_millis(100), self.args.retry_max);
                tracing::error!(error = %chain(&error), pending = self.pending.len(), retry_in_ms = self.backoff.as_millis() as u64,
                    "Writing snapshots failed; keeping them and retrying.");
                if let Some((deadline, _)) = &self.draining
                    && Instant::now() + self.backoff > *deadline
                {
                    let lost = self.pending.len() + self.in_flight.len();
                    if let Some((_, reply)) = self.draining.take() {
                        let _ = reply.send(lost);
                    }
                    return;
                }
                // No batch starts before the retry (a batch delay's
                // commit finds it not yet due).
                self.retry_at = Some(Instant::now() + self.backoff);
                myself.send_after(self.backoff, || WriterMsg::Commit);
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
            .or_else(|| self.in_flight.get(key))
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
        let waiting = self.order.keys().next().copied().unwrap_or(u64::MAX);
        // Scanned (a few batches, once per commit or flush), not indexed.
        let flying = self
            .in_flight
            .values()
            .map(|p| p.ticket)
            .min()
            .unwrap_or(u64::MAX);
        answer_below(&mut self.waiters, waiting.min(flying));
    }

    fn finish_drain_if_done(&mut self) {
        if self.pending.is_empty()
            && self.in_flight.is_empty()
            && let Some((_, reply)) = self.draining.take()
        {
            let _ = reply.send(0);
        }
    }
}
