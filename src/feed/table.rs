//! The table feed: stabilize's `events` table, followed in commit order as a
//! durable feed beside the socket.
//!
//! A task pages through the table from a cursor and hands every event to
//! the router exactly as a socket connection would (as connection 0), so the
//! same duplicate-dropping and exactness rules apply to both feeds.
//!
//! # Never a missed event
//!
//! * **Order.** On PostgreSQL with stabilize's `commit_xid` column the feed
//!   reads rows whose transaction id is below
//!   `pg_snapshot_xmin(pg_current_snapshot())`, ordered by
//!   `(commit_xid, sequence)`, exactly as stabilize's
//!   `get_events_since_committed` does: no transaction below that frontier
//!   can still commit, so nothing can later appear behind the cursor, even
//!   an event whose `sequence` is lower than ones already read (sequences
//!   are assigned at insert, not at commit). Rows from before the column
//!   existed (NULL) come first, by sequence. Unlike stabilize, a full page
//!   moves the cursor to its last row, not to the frontier, so a backlog
//!   longer than a page is not skipped. Without `commit_xid` (an older
//!   server or table) and on SQLite (one writer at a time: sequence order is
//!   commit order) the cursor is the sequence.
//! * **What the cursor means.** It is saved (`snapshotd_feed_cursor`) once
//!   every event up to it has been handed to the router: read, not
//!   necessarily snapshotted. An event behind the cursor that no committed
//!   snapshot covers is still held by a live actor, which snapshots it at
//!   its thresholds, at passivation or at shutdown; if the daemon dies
//!   (`kill -9`) first, the next start finds it by asking the table which
//!   entities their latest snapshot does not cover (catch-up, below).
//!   So the cursor can move as soon as events are handed over, and nothing
//!   behind it is lost.
//! * **Catch-up.** At start, every entity with events after the feed's
//!   origin that its latest snapshot does not cover exactly (events beyond
//!   it, or an event committed late below it) is woken: its actor hydrates
//!   from the snapshot plus the table and applies the thresholds at once,
//!   the time threshold counted from the snapshot's `created_at` (so a
//!   quiet workflow whose events are already due is snapshotted without
//!   waiting for another event), and stays alive, so a SIGTERM snapshots it.
//! * **First run.** With no saved cursor the feed starts at the table's end
//!   and records the highest sequence then as its origin: history from
//!   before the daemon is `snapshotd backfill`'s job, not the feed's. A
//!   table that appears while the daemon runs is followed from its start.
//! * **In a cluster** (`crate::cluster`) each node reads only the partitions
//!   it owns, from where the table ended when it started; the saved cursor
//!   row keeps only the cluster's origin. When the node takes a partition,
//!   the partition's workflows their latest snapshot does not cover are
//!   woken (catch-up, as at a start): everything of it before the cursor is
//!   committed and reaches their hydration, everything after is read.
//!   Nothing is lost when a node dies: catch-up asks the table, not the
//!   dead node.
//! * **Waiting for it.** `{"op":"sync"}` on the socket returns once the
//!   cursor has passed every event committed before the command (on
//!   `commit_xid`: every transaction that had started has finished and been
//!   read) and those events are folded and their snapshots committed.

use crate::actors::messages::RouterMsg;
use crate::cluster::ownership::Ownership;
use crate::model::event::Event;
use crate::model::{EntityKey, Fence};
use crate::reducer::Reducer;
use crate::settings::FeedSettings;
use crate::stats::Stats;
use crate::store::{EventsTableWatch, FeedCursor, FeedOrder, Partitions, Store, StoreError};
use ractor::ActorRef;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// The connection number the feed's events travel under.
pub const FEED_CONNECTION: u64 = 0;

/// The cursor's name in `snapshotd_feed_cursor` (one feed per database today).
const CURSOR_NAME: &str = "events";

/// Longest a saved cursor lags the read one while events keep coming.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// A `sync` waiting for the feed.
type SyncReply = oneshot::Sender<Result<(), String>>;

/// How the rest of the daemon talks to the feed.
#[derive(Clone)]
pub struct FeedHandle {
    syncs: Option<mpsc::UnboundedSender<SyncReply>>,
}

impl FeedHandle {
    /// A handle for a daemon without a table feed.
    pub fn off() -> FeedHandle {
        FeedHandle { syncs: None }
    }

    /// Wait until everything committed to the table before now is folded
    /// and its snapshots committed.
    pub async fn sync(&self) -> Result<(), String> {
        let Some(syncs) = &self.syncs else {
            return Err("the table feed is off (feed.table = \"off\")".into());
        };
        let (reply, done) = oneshot::channel();
        syncs
            .send(reply)
            .map_err(|_| "the table feed has stopped".to_string())?;
        done.await
            .unwrap_or_else(|_| Err("the table feed has stopped".into()))
    }
}

/// What the feed task needs.
pub struct TableFeed {
    pub store: Store,
    pub router: ActorRef<RouterMsg>,
    pub stats: Arc<Stats>,
    /// Shared with the sockets: the feed waits for room like a producer.
    pub inflight: Arc<Semaphore>,
    pub events_table: Arc<EventsTableWatch>,
    pub settings: FeedSettings,
    pub reducer: Reducer,
    /// In a cluster: read only the partitions this node owns.
    pub ownership: Option<Arc<Ownership>>,
}

/// Why the feed's loop stopped early.
enum Stopped {
    Shutdown,
}

impl TableFeed {
    /// Start following; the task ends at shutdown.
    pub fn spawn(
        self,
        shutdown: watch::Receiver<bool>,
    ) -> (FeedHandle, tokio::task::JoinHandle<()>) {
        let (syncs, requests) = mpsc::unbounded_channel();
        // The task keeps a sender itself, so the channel never closes under it.
        let keep = syncs.clone();
        let task = tokio::spawn(async move {
            self.run(requests, shutdown).await;
            drop(keep);
        });
        (FeedHandle { syncs: Some(syncs) }, task)
    }

    async fn run(
        self,
        mut requests: mpsc::UnboundedReceiver<SyncReply>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut follower = match self.start(&mut requests, &mut shutdown).await {
            Ok(follower) => follower,
            Err(Stopped::Shutdown) => return,
        };
        let _ = follower.follow(&self, &mut requests, &mut shutdown).await;
        follower.save(&self).await;
    }

    /// Wait for the table, load or create the cursor, and catch up.
    async fn start(
        &self,
        requests: &mut mpsc::UnboundedReceiver<SyncReply>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Follower, Stopped> {
        let mut pause = self.min_pause();
        // A table that appears after the daemon started holds nothing from
        // before it: follow it from its first event.
        let mut appeared = false;
        loop {
            if self.events_table.check().await {
                match self.open(appeared).await {
                    Ok(follower) => return Ok(follower),
                    Err(error) => self.failed(&error),
                }
            }
            // Nothing to follow yet: a sync cannot be honoured.
            while let Ok(reply) = requests.try_recv() {
                let _ = reply.send(Err(
                    "stabilize's events table is not in the store's database (yet)".into(),
                ));
            }
            appeared = true;
            self.sleep(pause, requests, shutdown).await?;
            pause = (pause * 2).min(self.max_pause());
        }
    }

    async fn open(&self, appeared: bool) -> Result<Follower, StoreError> {
        let order = self.store.feed_order().await?;
        if let Some(ownership) = &self.ownership {
            return self.open_in_cluster(order, ownership, appeared).await;
        }
        let (cursor, origin) = match self.store.load_feed_cursor(CURSOR_NAME).await? {
            Some(saved) => saved,
            None if appeared => {
                let start = FeedCursor::default();
                self.store.save_feed_cursor(CURSOR_NAME, start, 0).await?;
                tracing::info!("Following stabilize's events table from its first event.");
                (start, 0)
            }
            None => {
                let end = self.store.feed_end(order).await?;
                let origin = self.store.max_event_sequence().await?;
                self.store
                    .save_feed_cursor(CURSOR_NAME, end, origin)
                    .await?;
                tracing::info!(
                    origin_sequence = origin,
                    "Following stabilize's events table from its end; earlier history is `snapshotd backfill`'s to snapshot."
                );
                (end, origin)
            }
        };
        let by_workflow = self.reducer == Reducer::Stabilize;
        let uncovered = self.store.uncovered_entities(origin, by_workflow).await?;
        if !uncovered.is_empty() {
            tracing::info!(
                entities = uncovered.len(),
                "Catching up: entities their latest snapshot does not cover exactly."
            );
        }
        self.wake(uncovered);
        tracing::info!(order = ?order, cursor = ?cursor, "Following stabilize's events table.");
        Ok(Follower {
            order,
            cursor,
            origin,
            high_sequence: origin.max(cursor.sequence),
            saved: cursor,
            last_save: tokio::time::Instant::now(),
            waiting: Vec::new(),
            only: None,
            leases: Vec::new(),
            changes: None,
        })
    }

    /// In a cluster: the origin is the cluster's (saved once, by the first
    /// node); the cursor starts where the table ends now and is not saved:
    /// what came before is caught up per partition as partitions are taken.
    async fn open_in_cluster(
        &self,
        order: FeedOrder,
        ownership: &Ownership,
        appeared: bool,
    ) -> Result<Follower, StoreError> {
        let end = self.store.feed_end(order).await?;
        let origin = match self.store.load_feed_cursor(CURSOR_NAME).await? {
            Some((_, origin)) => origin,
            None => {
                // As for one daemon: a table that appeared while we ran
                // holds nothing from before us.
                let origin = if appeared {
                    0
                } else {
                    self.store.max_event_sequence().await?
                };
                self.store
                    .save_feed_cursor(CURSOR_NAME, end, origin)
                    .await?;
                origin
            }
        };
        // Taken again: a concurrent first node may have saved it first.
        let origin = self
            .store
            .load_feed_cursor(CURSOR_NAME)
            .await?
            .map_or(origin, |(_, o)| o);
        tracing::info!(order = ?order, cursor = ?end, origin_sequence = origin,
            "Following stabilize's events table for this node's partitions.");
        let mut changes = ownership.subscribe();
        // Partitions taken before the table could be read are caught up first.
        changes.mark_changed();
        Ok(Follower {
            order,
            cursor: end,
            origin,
            high_sequence: origin.max(end.sequence),
            saved: end,
            last_save: tokio::time::Instant::now(),
            waiting: Vec::new(),
            only: Some(Partitions {
                owned: Vec::new(),
                count: ownership.partitions(),
            }),
            leases: Vec::new(),
            changes: Some(changes),
        })
    }

    /// Partitions just taken: wake their workflows with events beyond their
    /// latest snapshot, then read their events from the cursor on.
    async fn take_partitions(&self, follower: &mut Follower) -> Result<(), StoreError> {
        let (Some(ownership), Some(only)) = (&self.ownership, &follower.only) else {
            return Ok(());
        };
        // By lease, not by partition: one lost and taken again (a new
        // epoch) is caught up again.
        let held = ownership.held();
        let owned: Vec<i64> = held.iter().map(|f| i64::from(f.partition)).collect();
        let taken: Vec<i64> = held
            .iter()
            .filter(|f| !follower.leases.contains(f))
            .map(|f| i64::from(f.partition))
            .collect();
        if !taken.is_empty() {
            let uncovered = self
                .store
                .uncovered_in(
                    follower.origin,
                    true,
                    Some(&Partitions {
                        owned: taken.clone(),
                        count: only.count,
                    }),
                )
                .await?;
            tracing::info!(
                partitions = ?taken,
                entities = uncovered.len(),
                "Catching up taken partitions: workflows their latest snapshot does not cover exactly."
            );
            self.wake(uncovered);
        }
        follower.only = Some(Partitions {
            owned,
            count: only.count,
        });
        follower.leases = held;
        Ok(())
    }

    /// Catch-up: start these entities' actors (they hydrate from the table
    /// and apply their thresholds); a later sync waits for them.
    fn wake(&self, keys: Vec<EntityKey>) {
        for key in keys {
            let _ = self.router.cast(RouterMsg::Wake {
                connection: FEED_CONNECTION,
                key,
            });
        }
    }

    fn failed(&self, error: &StoreError) {
        self.stats.feed_errors.inc();
        tracing::warn!(error = %crate::error::chain(error), "Reading stabilize's events table failed; retrying.");
    }

    fn min_pause(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms)
    }

    fn max_pause(&self) -> Duration {
        Duration::from_millis(self.settings.max_poll_interval_ms)
    }

    /// Sleep `pause`, or less when a sync arrives; `Err` at shutdown.
    async fn sleep(
        &self,
        pause: Duration,
        requests: &mut mpsc::UnboundedReceiver<SyncReply>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<SyncReply>, Stopped> {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => Err(Stopped::Shutdown),
            _ = tokio::time::sleep(pause) => Ok(None),
            reply = requests.recv() => Ok(reply),
        }
    }
}

/// The feed once it follows the table.
struct Follower {
    order: FeedOrder,
    cursor: FeedCursor,
    origin: i64,
    /// The highest sequence handed over (or the origin).
    high_sequence: i64,
    saved: FeedCursor,
    last_save: tokio::time::Instant,
    /// Syncs waiting for the cursor to reach their target.
    waiting: Vec<(FeedCursor, SyncReply)>,
    /// In a cluster: the partitions read (those owned when last looked).
    only: Option<Partitions>,
    /// In a cluster: the leases they were caught up under.
    leases: Vec<Fence>,
    /// In a cluster: told when ownership changes.
    changes: Option<watch::Receiver<u64>>,
}

impl Follower {
    async fn follow(
        &mut self,
        feed: &TableFeed,
        requests: &mut mpsc::UnboundedReceiver<SyncReply>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut pause = feed.min_pause();
        let mut arrived: Option<SyncReply> = None;
        loop {
            if *shutdown.borrow() {
                return Err(Stopped::Shutdown);
            }
            if self
                .changes
                .as_mut()
                .is_some_and(|c| c.has_changed().unwrap_or(false))
            {
                if let Some(changes) = self.changes.as_mut() {
                    changes.mark_unchanged();
                }
                if let Err(error) = feed.take_partitions(self).await {
                    feed.failed(&error);
                    // Looked at again after the pause (catch-up is idempotent).
                    if let Some(changes) = self.changes.as_mut() {
                        changes.mark_changed();
                    }
                    arrived = feed.sleep(feed.max_pause(), requests, shutdown).await?;
                    continue;
                }
            }
            while let Some(reply) = arrived.take().or_else(|| requests.try_recv().ok()) {
                match feed.store.feed_sync_target(self.order).await {
                    Ok(target) => self.waiting.push((target, reply)),
                    Err(error) => {
                        let _ = reply.send(Err(crate::error::chain(&error)));
                    }
                }
            }
            let page = match feed
                .store
                .feed_page(
                    self.order,
                    self.cursor,
                    feed.settings.batch_size as i64,
                    self.only.as_ref(),
                )
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    feed.failed(&error);
                    arrived = feed.sleep(feed.max_pause(), requests, shutdown).await?;
                    continue;
                }
            };
            let read = page.events.len();
            if let Some(first) = page.events.first() {
                let age = (chrono::Utc::now() - first.timestamp).num_milliseconds();
                feed.stats.feed_lag.set(age.max(0) as f64 / 1000.0);
            }
            let now = chrono::Utc::now();
            for event in page.events {
                let delay = (now - event.timestamp).num_microseconds().unwrap_or(0);
                feed.stats.feed_delay.observe(delay.max(0) as f64 / 1e6);
                self.high_sequence = self.high_sequence.max(event.sequence);
                self.deliver(feed, event, shutdown).await?;
            }
            self.cursor = page.next;
            feed.stats.feed_cursor.set(self.high_sequence);
            if self.last_save.elapsed() >= SAVE_EVERY {
                self.save(feed).await;
            }
            if page.caught_up {
                feed.stats.feed_lag.set(0.0);
                if let Ok(newest) = feed.store.max_event_sequence().await {
                    feed.stats
                        .feed_behind
                        .set((newest - self.high_sequence).max(0));
                }
                self.answer_syncs(feed);
                pause = if read == 0 {
                    (pause * 2).min(feed.max_pause())
                } else {
                    feed.min_pause()
                };
                arrived = self.idle(feed, pause, requests, shutdown).await?;
            } else {
                pause = feed.min_pause();
            }
        }
    }

    /// Sleep while caught up; a change of the partitions owned ends it
    /// early (a partition just taken is caught up at once).
    async fn idle(
        &mut self,
        feed: &TableFeed,
        pause: Duration,
        requests: &mut mpsc::UnboundedReceiver<SyncReply>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<SyncReply>, Stopped> {
        let Some(changes) = self.changes.as_mut() else {
            return feed.sleep(pause, requests, shutdown).await;
        };
        tokio::select! {
            slept = feed.sleep(pause, requests, shutdown) => slept,
            // Marked unchanged again when the loop takes the partitions.
            _ = changes.changed() => {
                changes.mark_changed();
                Ok(None)
            }
        }
    }

    /// Hand one event to the router, waiting for room like a producer.
    async fn deliver(
        &mut self,
        feed: &TableFeed,
        event: Event,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let permit = match feed.inflight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return Err(Stopped::Shutdown),
                permit = feed.inflight.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return Err(Stopped::Shutdown),
                },
            },
        };
        feed.stats.feed_events.inc();
        let _ = feed.router.cast(RouterMsg::Events {
            connection: FEED_CONNECTION,
            events: vec![(Box::new(event), permit)],
        });
        Ok(())
    }

    /// Syncs whose target the cursor has passed: one flush of everything
    /// the feed delivered, then they are answered.
    fn answer_syncs(&mut self, feed: &TableFeed) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(target, _)| *target <= self.cursor);
        self.waiting = waiting;
        if done.is_empty() {
            return;
        }
        let (reply, flushed) = ractor::concurrency::oneshot();
        let sent = feed.router.cast(RouterMsg::Flush {
            connection: FEED_CONNECTION,
            snapshot: false,
            reply: reply.into(),
        });
        tokio::spawn(async move {
            let outcome = match (sent, flushed.await) {
                (Ok(()), Ok(())) => Ok(()),
                _ => Err("the daemon is shutting down".to_string()),
            };
            for (_, reply) in done {
                let _ = reply.send(outcome.clone());
            }
        });
    }

    async fn save(&mut self, feed: &TableFeed) {
        // In a cluster the cursor is this node's alone: not saved.
        if self.saved == self.cursor || self.only.is_some() {
            return;
        }
        match feed
            .store
            .save_feed_cursor(CURSOR_NAME, self.cursor, self.origin)
            .await
        {
            Ok(()) => {
                self.saved = self.cursor;
                self.last_save = tokio::time::Instant::now();
            }
            Err(error) => feed.failed(&error),
        }
    }
}
