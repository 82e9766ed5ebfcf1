//! The policy actor: one per entity. Buffers the entity's events, folds them
//! into its state in sequence order, and hands a snapshot to the writer when
//! the event-count or time threshold is crossed.
//!
//! # Never a wrong snapshot
//!
//! stabilize assigns sequences at insert, not at commit, so a workflow's
//! events can arrive late, twice or out of order, and the daemon can restart
//! at any moment. A snapshot at sequence S must equal stabilize's replay of
//! the workflow's events up to S, and its version must be their number.
//!
//! The bookkeeping below is [`Ledger`]'s (pure, unit-tested); this actor
//! decides when, performs the I/O it needs, and keeps the timers.
//!
//! * Events are folded as they arrive: memory per entity is its state, not
//!   its unsnapshotted events. The ledger's window holds the sequences
//!   folded since the last snapshot, and older ones are remembered: a
//!   sequence in either is a duplicate and is dropped.
//! * An event older than one already folded was folded out of sequence
//!   order. With stabilize's `events` table in the same database (the normal
//!   case) the state is marked dirty and, before the next snapshot, rebuilt:
//!   the last snapshot (verified) plus the table's events after it, folded
//!   in sequence order.
//! * A sequence at or below the last snapshot's that was never seen may be
//!   one the snapshot missed: the table's count of the workflow's events up
//!   to that snapshot is compared with its version, once per burst of such
//!   events, and the state is rebuilt from the table (and snapshotted at
//!   once) on a mismatch. The writer makes the same comparison for every
//!   snapshot inside the batch that commits it, so nothing the table
//!   contradicts is ever written; a contradicted snapshot comes back here as
//!   `Resync` and is rebuilt from the table.
//! * Hydration: an actor starting for an entity with history takes the
//!   writer's uncommitted snapshot or the store's latest verified one, checks
//!   it against the table, and folds the table's events after it up to the
//!   newest event that woke it: a restart loses nothing, and resent events
//!   are duplicates.
//! * Without an events table the feed is trusted: out-of-order and late
//!   events are folded in arrival order and counted in `events_late`; a
//!   sequence at or below the snapshot the actor hydrated from counts as
//!   covered by it (a resend).

use super::messages::{PolicyMsg, RouterMsg, WriterMsg};
use super::timers::TimerKey;
use crate::error::chain;
use crate::model::event::Event;
use crate::model::ledger::{Ledger, Receipt};
use crate::model::{EntityKey, Fence, PreparedSnapshot};
use crate::reducer::{Reducer, State};
use crate::stats::Stats;
use crate::store::{EventsTableWatch, Store, StoreError};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// What preparing a snapshot of the current state gave.
enum Prepared {
    Ready(PreparedSnapshot),
    /// Refused (logged and counted): the state can never be stored.
    Unstorable,
    /// Over `policy.max_state_bytes` (logged and counted): retried later.
    TooLarge,
}

/// A snapshot to build on: the writer's pending one or the store's latest.
struct Base {
    state: State,
    sequence: i64,
    version: i32,
    workflow_id: Arc<str>,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Settings every policy actor shares.
#[derive(Clone)]
pub struct PolicyConfig {
    pub reducer: Reducer,
    pub event_interval: usize,
    pub time_interval: Duration,
    pub idle_timeout: Duration,
    /// Largest canonical state written (`policy.max_state_bytes`).
    pub max_state_bytes: usize,
    /// Stabilize's events table in the store's database, once found.
    pub events_table: Arc<EventsTableWatch>,
}

/// Start arguments.
pub struct PolicyArgs {
    pub key: EntityKey,
    /// Batched newest-snapshot lookups for hydration.
    pub lookups: super::lookup::Lookups,
    /// The shared timer service that sends `Tick`.
    pub timers: super::timers::Timers,
    pub config: Arc<PolicyConfig>,
    pub store: Store,
    pub writer: ActorRef<WriterMsg>,
    pub writer_permits: Arc<Semaphore>,
    pub router: ActorRef<RouterMsg>,
    pub stats: Arc<Stats>,
    /// In a cluster: the lease of the entity's partition this actor was
    /// started under; its snapshots carry it so the writer can fence them.
    pub fence: Option<Fence>,
}

pub struct Policy;

pub struct PolicyState {
    args: PolicyArgs,
    /// Known once an event arrived or history was loaded.
    workflow_id: Option<Arc<str>>,
    /// The entity's state and what it has folded (pure: no I/O, no clock).
    ledger: Ledger,
    hydrated: bool,
    stash: Vec<PolicyMsg>,
    first_pending_at: Option<Instant>,
    last_snapshot_at: Option<Instant>,
    last_event_at: Instant,
    /// The armed Tick (its key says when it fires).
    tick: Option<TimerKey>,
    check_scheduled: bool,
    hydrate_backoff: Duration,
    /// After a snapshot too large to write: the window length at which the
    /// event threshold tries again (0: the plain interval).
    retry_at_len: usize,
    /// Hydration found no row of this entity, stored or pending, and no
    /// snapshot has been sent since: the next one is its first row, which
    /// the writer need not prune after.
    no_row_yet: bool,
}

impl Actor for Policy {
    type Msg = PolicyMsg;
    type State = PolicyState;
    type Arguments = PolicyArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PolicyMsg>,
        args: PolicyArgs,
    ) -> Result<PolicyState, ActorProcessingErr> {
        // No I/O here: the first message asks for hydration after itself,
        // so a store outage delays this entity only, and hydration knows the
        // events that woke it.
        let _ = myself;
        args.stats.active_entities.inc();
        let reducer = args.config.reducer;
        let ledger = Ledger::new(reducer, reducer.initial(&args.key));
        Ok(PolicyState {
            args,
            workflow_id: None,
            ledger,
            hydrated: false,
            stash: Vec::new(),
            first_pending_at: None,
            last_snapshot_at: None,
            last_event_at: Instant::now(),
            tick: None,
            check_scheduled: false,
            hydrate_backoff: Duration::from_millis(100),
            retry_at_len: 0,
            no_row_yet: false,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<PolicyMsg>,
        state: &mut PolicyState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(tick) = state.tick.take() {
            state.args.timers.cancel(tick);
        }
        state.args.stats.active_entities.dec();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<PolicyMsg>,
        msg: PolicyMsg,
        state: &mut PolicyState,
    ) -> Result<(), ActorProcessingErr> {
        // Every handler that awaits I/O runs boxed: the actor's task holds
        // its future only while handling a message, so an idle actor costs
        // a small task instead of the largest handler's state machine.
        match msg {
            PolicyMsg::Hydrate => match Box::pin(state.hydrate(state.stashed_upto())).await {
                Ok(()) => {
                    state.hydrated = true;
                    for msg in std::mem::take(&mut state.stash) {
                        Box::pin(state.process(&myself, msg)).await;
                    }
                    Box::pin(state.after_change(&myself)).await;
                }
                Err(error) => {
                    if error.is_transient() {
                        state.args.stats.store_up.set(0);
                    }
                    tracing::error!(entity = %state.args.key, error = %chain(&error), "Loading the entity's history failed; retrying.");
                    state.hydrate_backoff =
                        (state.hydrate_backoff * 2).min(Duration::from_secs(30));
                    myself.send_after(state.hydrate_backoff, || PolicyMsg::Hydrate);
                }
            },
            // Until the history is loaded, everything waits in order.
            msg if !state.hydrated => {
                if state.stash.is_empty() {
                    myself.cast(PolicyMsg::Hydrate)?;
                }
                state.stash.push(msg);
            }
            // An event, nearly every message: folded here, the future of
            // `process` (boxed: an allocation and a copy of its largest
            // state, about 300 instructions) only built to snapshot.
            PolicyMsg::Event(event, _permit) => {
                state.receive(&myself, *event);
                if state.snapshot_due() {
                    Box::pin(state.snapshot()).await;
                }
                state.arm_tick(&myself);
            }
            msg => Box::pin(state.process(&myself, msg)).await,
        }
        Ok(())
    }
}

impl PolicyState {
    /// Everything but hydration.
    async fn process(&mut self, myself: &ActorRef<PolicyMsg>, msg: PolicyMsg) {
        match msg {
            PolicyMsg::Hydrate => unreachable!("handled by the actor"),
            PolicyMsg::Event(event, _permit) => {
                self.receive(myself, *event);
                self.after_change(myself).await;
            }
            PolicyMsg::Barrier(reply) => {
                let _ = reply.send(());
            }
            PolicyMsg::ForceSnapshot(reply) => {
                let taken = self.snapshot().await;
                let _ = reply.send(taken);
            }
            PolicyMsg::Resync => {
                if self.args.config.events_table.known() {
                    self.rebuild_from_table(myself).await;
                }
            }
            PolicyMsg::Stop { snapshot } => {
                if snapshot {
                    self.snapshot().await;
                }
                myself.stop(None);
            }
            PolicyMsg::Tick => {
                let now = Instant::now();
                // A tick cast just before a re-arm may come after it: the
                // armed one stays until its time has come.
                if self.tick.is_some_and(|tick| tick.at <= now) {
                    self.tick = None;
                }
                if let Some(due) = self.time_due()
                    && now >= due
                {
                    self.snapshot().await;
                }
                if now >= self.last_event_at + self.args.config.idle_timeout {
                    let _ = self.args.router.cast(RouterMsg::Idle {
                        key: self.args.key.clone(),
                        id: myself.get_id(),
                    });
                } else {
                    self.arm_tick(myself);
                }
            }
            PolicyMsg::CheckBase => {
                self.check_scheduled = false;
                match self.snapshot_matches_table().await {
                    Ok(true) => {}
                    Ok(false) => self.rebuild_from_table(myself).await,
                    Err(error) => {
                        tracing::warn!(entity = %self.args.key, error = %chain(&error), "Checking the base against the events table failed; retrying.");
                        self.check_scheduled = true;
                        myself.send_after(Duration::from_secs(1), || PolicyMsg::CheckBase);
                    }
                }
            }
        }
    }

    fn config(&self) -> &PolicyConfig {
        &self.args.config
    }

    /// The newest sequence among the events waiting for hydration; all of
    /// the table when none is waiting (a resync or a command woke us).
    fn stashed_upto(&self) -> i64 {
        self.stash
            .iter()
            .filter_map(|msg| match msg {
                PolicyMsg::Event(event, _) => Some(event.sequence),
                _ => None,
            })
            .max()
            .unwrap_or(i64::MAX)
    }

    /// Take the newest known snapshot (the writer's pending one, else the
    /// store's verified latest), check it against the events table, and fold
    /// the table's events after it up to `upto` (the newest event received:
    /// later ones are on their way and are folded as they come, which keeps
    /// snapshots at the policy's intervals; one the feed never brings is
    /// caught by the count check and rebuilt from the table).
    async fn hydrate(&mut self, upto: i64) -> Result<(), StoreError> {
        let (found, row_exists) = self.newest_snapshot().await?;
        let had_snapshot = found.is_some();
        self.no_row_yet = !row_exists;
        if let Some(Base {
            state,
            sequence,
            version,
            workflow_id,
            created_at,
        }) = found
        {
            self.ledger.start_from(state, version, sequence);
            self.workflow_id = Some(workflow_id);
            // The time threshold counts from when it was really taken: a
            // restart does not postpone a snapshot already due.
            self.last_snapshot_at = Some(self.instant_at(created_at));
        }
        if self.config().events_table.check().await {
            let workflow_id = self.workflow_id();
            if had_snapshot && !self.snapshot_matches_table().await? {
                // The stored snapshot misses an event committed late below
                // its sequence: readers must not keep reading it. Rebuilt
                // from the table and written again at once.
                let (_, snap_seq) = self.ledger.snapshot_position();
                self.replay_table(&workflow_id, snap_seq).await?;
                let (version, sequence) = self.ledger.snapshot_position();
                tracing::info!(entity = %self.args.key, version, sequence,
                    "The latest snapshot does not cover the events table; rebuilt it.");
                self.send_state().await;
            }
            let (_, snap_seq) = self.ledger.snapshot_position();
            let after = self
                .args
                .store
                .workflow_events(&workflow_id, snap_seq, upto)
                .await?;
            let first_at = after.first().map(|first| first.timestamp);
            for event in after {
                self.fold(event);
            }
            if let Some(first_at) = first_at {
                self.first_pending_at = Some(self.instant_at(first_at));
            }
            if self.ledger.window_len() > 0 {
                self.workflow_id.get_or_insert(workflow_id);
            }
        }
        if had_snapshot || self.ledger.window_len() > 0 {
            self.args.stats.hydrations.inc();
        }
        Ok(())
    }

    /// The monotonic instant of a wall-clock time in the past (clamped to
    /// one time interval ago, which is all the time threshold needs).
    fn instant_at(&self, at: chrono::DateTime<chrono::Utc>) -> Instant {
        let age = (chrono::Utc::now() - at)
            .to_std()
            .unwrap_or_default()
            .min(self.config().time_interval);
        let now = Instant::now();
        now.checked_sub(age).unwrap_or(now)
    }

    /// The entity's newest snapshot: the writer's uncommitted one (newer
    /// than anything stored) or the store's verified latest; and whether any
    /// row of it exists (a row that fails verification is not a base, but
    /// it is there).
    async fn newest_snapshot(&self) -> Result<(Option<Base>, bool), StoreError> {
        let key = &self.args.key;
        let snapshot = match self.args.lookups.newest(key).await {
            Ok(None) => return Ok((None, false)),
            Ok(found) => found,
            Err(error @ (StoreError::Integrity { .. } | StoreError::Corrupt { .. })) => {
                tracing::error!(entity = %key, error = %chain(&error),
                    "The latest snapshot fails verification; ignoring it and starting from the events.");
                None
            }
            Err(error) => return Err(error),
        };
        let base = snapshot.and_then(|s| match s.state {
            Value::Object(state) => Some(Base {
                state: self.config().reducer.from_stored(state),
                sequence: s.sequence,
                version: s.version,
                workflow_id: s.workflow_id,
                created_at: s.created_at,
            }),
            _ => None,
        });
        Ok((base, true))
    }

    fn workflow_id(&self) -> Arc<str> {
        self.workflow_id
            .clone()
            .unwrap_or_else(|| self.args.key.entity_id.clone())
    }

    /// Fold an event known to be new (the table's, in sequence order).
    fn fold(&mut self, event: Event) {
        if self.ledger.window_len() == 0 {
            self.first_pending_at = Some(Instant::now());
        }
        self.ledger.fold(event);
    }

    /// File one arriving event: the ledger folds it, drops it as a
    /// duplicate, or leaves it to the table to settle.
    fn receive(&mut self, myself: &ActorRef<PolicyMsg>, event: Event) {
        self.last_event_at = Instant::now();
        if self.workflow_id.is_none() {
            self.workflow_id = Some(event.workflow_id.clone());
        }
        let table = self.config().events_table.known();
        match self.ledger.receive(event, table) {
            Receipt::Duplicate => {
                self.args.stats.events_duplicate.inc();
            }
            Receipt::Settle => {
                // A duplicate from before we knew, or an event the snapshot
                // missed: the table settles it, once per burst.
                self.args.stats.events_late.inc();
                if !self.check_scheduled {
                    self.check_scheduled = true;
                    let _ = myself.cast(PolicyMsg::CheckBase);
                }
            }
            Receipt::Folded { late, first } => {
                if late {
                    self.args.stats.events_late.inc();
                }
                if first {
                    self.first_pending_at = Some(Instant::now());
                }
            }
        }
    }

    /// After events arrived: snapshot at the event threshold, keep the timer.
    async fn after_change(&mut self, myself: &ActorRef<PolicyMsg>) {
        if self.snapshot_due() {
            self.snapshot().await;
        }
        self.arm_tick(myself);
    }

    /// Whether the event threshold is crossed (or a failed snapshot's
    /// retry is due).
    fn snapshot_due(&self) -> bool {
        self.ledger.window_len() >= self.config().event_interval.max(self.retry_at_len)
    }

    /// When the time threshold falls due, if there are new events.
    fn time_due(&self) -> Option<Instant> {
        if self.ledger.window_len() == 0 {
            return None;
        }
        let since = self.last_snapshot_at.or(self.first_pending_at)?;
        Some(since + self.config().time_interval)
    }

    /// Make sure a Tick comes by the next deadline (time threshold or idleness).
    fn arm_tick(&mut self, myself: &ActorRef<PolicyMsg>) {
        let idle = self.last_event_at + self.config().idle_timeout;
        let due = self.time_due().map_or(idle, |t| t.min(idle));
        if self.tick.is_some_and(|tick| tick.at <= due) {
            return;
        }
        if let Some(tick) = self.tick.take() {
            self.args.timers.cancel(tick);
        }
        self.tick = Some(self.args.timers.arm(due, myself.clone()));
    }

    /// Snapshot the window and hand it to the writer. Returns the
    /// snapshot's (version, sequence), or `None` without new events.
    async fn snapshot(&mut self) -> Option<(i32, i64)> {
        let newest = self.ledger.newest_in_window()?;
        let due = Instant::now();
        // Folded out of order: the last snapshot plus the table's events,
        // in sequence order, instead. (Without a table, arrival order is
        // trusted; a table that appeared since is used.)
        if self.ledger.is_dirty()
            && self.config().events_table.check().await
            && let Err(error) = self.refold(newest).await
        {
            tracing::warn!(entity = %self.args.key, error = %chain(&error),
                "Re-folding out-of-order events from the events table failed; will retry at the next snapshot.");
            return None;
        }
        let position = self.ledger.next_position()?;
        let snapshot = match self.prepare(position.0, position.1) {
            Prepared::Ready(snapshot) => Some(snapshot),
            Prepared::Unstorable => None,
            Prepared::TooLarge => {
                // Keep folding; try again one interval of events (or of
                // time) from now.
                self.retry_at_len = self.ledger.window_len() + self.config().event_interval;
                self.last_snapshot_at = Some(Instant::now());
                return None;
            }
        };
        self.retry_at_len = 0;
        self.ledger.settle(position, self.trim_to());
        self.first_pending_at = None;
        self.last_snapshot_at = Some(Instant::now());
        self.send(snapshot?, due).await
    }

    /// With the table to settle older questions, the ledger need remember
    /// only a few windows of folded sequences.
    fn trim_to(&self) -> Option<usize> {
        let config = self.config();
        config
            .events_table
            .known()
            .then(|| config.event_interval.saturating_mul(4).max(64))
    }

    /// Re-fold the window in sequence order: in memory when the ledger kept
    /// the last snapshot's state and the window's events and the table
    /// holds exactly the window's sequences up to `upto`; else from the
    /// table ([`Self::refold_window`]).
    async fn refold(&mut self, upto: i64) -> Result<(), StoreError> {
        if self.ledger.can_refold_in_memory() {
            let (_, snap_seq) = self.ledger.snapshot_position();
            let in_table = self
                .args
                .store
                .workflow_sequences(&self.workflow_id(), snap_seq, upto)
                .await?;
            if self.ledger.window_is(&in_table) && self.ledger.refold_in_memory() {
                self.args.stats.refolds_in_memory.inc();
                return Ok(());
            }
        }
        self.refold_window(upto).await
    }

    /// Replace the state with the last snapshot plus the table's events
    /// after it up to `upto`, in sequence order.
    async fn refold_window(&mut self, upto: i64) -> Result<(), StoreError> {
        let workflow_id = self.workflow_id();
        let (snap_version, snap_seq) = self.ledger.snapshot_position();
        let (base, from) = match self.newest_snapshot().await?.0 {
            Some(Base {
                state,
                sequence,
                version,
                ..
            }) if sequence == snap_seq && version == snap_version => (Some(state), sequence),
            // The last snapshot is gone or was never taken: from the start.
            _ => (None, 0),
        };
        let events = self
            .args
            .store
            .workflow_events(&workflow_id, from, upto)
            .await?;
        let from_start = base.is_none();
        let base = base.unwrap_or_else(|| self.config().reducer.initial(&self.args.key));
        if !events.is_empty() {
            self.first_pending_at = Some(Instant::now());
        }
        self.ledger.refold(base, from_start, events);
        self.args.stats.rebuilds.inc();
        Ok(())
    }

    /// Hand the current state to the writer as a snapshot at the last
    /// snapshot's version and sequence (after a rebuild).
    async fn send_state(&mut self) -> Option<(i32, i64)> {
        self.last_snapshot_at = Some(Instant::now());
        let (version, sequence) = self.ledger.snapshot_position();
        match self.prepare(version, sequence) {
            Prepared::Ready(snapshot) => self.send(snapshot, Instant::now()).await,
            Prepared::Unstorable | Prepared::TooLarge => None,
        }
    }

    /// The current state as a snapshot, serialised and hashed once (events
    /// were decoded in the store's number form: nothing to rewrite), unless
    /// it cannot be stored or is larger than `policy.max_state_bytes`.
    fn prepare(&self, version: i32, sequence: i64) -> Prepared {
        let snapshot = match PreparedSnapshot::from_state(
            self.args.key.clone(),
            self.workflow_id(),
            version,
            sequence,
            self.ledger.state(),
        ) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                self.args.stats.snapshots_rejected.inc();
                tracing::error!(entity = %self.args.key, error = %error, "The entity's state cannot be stored; no snapshot taken.");
                return Prepared::Unstorable;
            }
        };
        let limit = self.config().max_state_bytes;
        if snapshot.canonical_bytes > limit {
            self.args.stats.snapshots_too_large.inc();
            tracing::warn!(entity = %self.args.key, bytes = snapshot.canonical_bytes, limit, version,
                "The entity's state is larger than policy.max_state_bytes; not written, retried at its next threshold.");
            return Prepared::TooLarge;
        }
        Prepared::Ready(snapshot)
    }

    /// Hand a snapshot to the writer (waiting while it holds its maximum).
    async fn send(&mut self, mut snapshot: PreparedSnapshot, due: Instant) -> Option<(i32, i64)> {
        let taken = (snapshot.version, snapshot.sequence);
        snapshot.due_at = Some(due.into_std());
        snapshot.first_row = std::mem::take(&mut self.no_row_yet);
        snapshot.fence = self.args.fence;
        // Waits while the writer holds its maximum: backpressure.
        let permit = self
            .args
            .writer_permits
            .clone()
            .acquire_owned()
            .await
            .ok()?;
        if self
            .args
            .writer
            .cast(WriterMsg::Snapshot(Box::new(snapshot), permit))
            .is_err()
        {
            tracing::error!(entity = %self.args.key, "The writer is gone; snapshot dropped.");
            return None;
        }
        Some(taken)
    }

    async fn snapshot_matches_table(&self) -> Result<bool, StoreError> {
        let (_, snap_seq) = self.ledger.snapshot_position();
        if snap_seq == 0 {
            return Ok(true);
        }
        let count = self
            .args
            .store
            .count_workflow_events(&self.workflow_id(), snap_seq)
            .await?;
        Ok(self.ledger.covers(count))
    }

    /// Replace the state with the table's replay up to `upto`; it becomes
    /// the snapshot position.
    async fn replay_table(&mut self, workflow_id: &str, upto: i64) -> Result<(), StoreError> {
        let events = self
            .args
            .store
            .workflow_events(workflow_id, 0, upto)
            .await?;
        let initial = self.config().reducer.initial(&self.args.key);
        self.ledger.replay(initial, events, upto);
        self.first_pending_at = None;
        self.args.stats.rebuilds.inc();
        Ok(())
    }

    /// The state is wrong: rebuild it from the table, through everything
    /// received, and snapshot the corrected state at once.
    async fn rebuild_from_table(&mut self, myself: &ActorRef<PolicyMsg>) {
        let workflow_id = self.workflow_id();
        let upto = self.ledger.received_upto();
        match self.replay_table(&workflow_id, upto).await {
            Ok(()) => {
                let (version, sequence) = self.ledger.snapshot_position();
                tracing::info!(entity = %self.args.key, version, sequence,
                    "Rebuilt the entity from the events table.");
                if sequence > 0 {
                    self.send_state().await;
                }
            }
            Err(error) => {
                tracing::warn!(entity = %self.args.key, error = %chain(&error), "Rebuilding from the events table failed; retrying.");
                self.check_scheduled = true;
                myself.send_after(Duration::from_secs(1), || PolicyMsg::CheckBase);
            }
        }
    }
}
