//! The coordinator: one task per node that keeps its leases. Every
//! heartbeat (`failover_secs / 5`) it refreshes the node's row, renews what
//! it holds, and balances: under its fair share it claims free or expired
//! leases, over it (a node joined) it hands its highest partitions over.
//!
//! * **Timing.** A lease lasts `failover - heartbeat`, and a node counts as
//!   alive while its heartbeat is younger than that, so a node killed just
//!   after renewing has its leases expired, and is no longer counted, within
//!   `failover - heartbeat`; the survivors' next heartbeat claims them:
//!   within `failover_secs` of the kill.
//! * **Handing over** is a bounded drain: the partitions stop being folded
//!   here at once (the router drops their socket events, the feed stops
//!   reading them), their actors snapshot what they hold and stop, the
//!   writer commits, all within `handover_secs`; then the leases are freed.
//!   Whatever did not commit in time is fenced out and left to the new
//!   owner, which rebuilds it from the events table. Leases keep being
//!   renewed meanwhile.
//! * **Losing** a lease (another node took it: we were frozen or cut off,
//!   or we could not renew for a whole lease) stops the actors started under
//!   it without a snapshot and drops what the writer holds for it; the
//!   database would refuse those writes anyway. Nothing is claimed in the
//!   heartbeat that found a loss.
//! * The coordinator talks to the database on its own connection (which
//!   also holds the node id's lock), never waiting for the data pool, and
//!   waits for a row lock at most one heartbeat. Lease times are
//!   `clock_timestamp()`, not the start of a statement that may have waited.
//! * **Gaining** one: the feed notices, wakes the partition's workflows
//!   that their latest snapshot does not cover exactly, and reads the
//!   partition's new events from then on.

use super::lease;
use super::ownership::Ownership;
use super::plan::plan;
use crate::actors::messages::{RouterMsg, WriterMsg};
use crate::error::chain;
use crate::model::Fence;
use crate::settings::ClusterSettings;
use crate::stats::Stats;
use crate::store::{Store, StoreError};
use ractor::ActorRef;
use sqlx::PgConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cluster.enabled needs a PostgreSQL store")]
    NotPostgres,
    #[error(
        "cluster.node_id `{0}` is in use by another running snapshotd (it holds the id's \
         lock in the database); give each daemon its own id, or leave it empty"
    )]
    NodeIdInUse(String),
}

/// The coordinator before it runs (joined: tables ready, id locked, registered).
pub struct Coordinator {
    url: String,
    /// Its own connection, holding the node id's session lock; `None`
    /// after an error (reconnected, and the lock taken again, when next needed).
    conn: Option<PgConnection>,
    ownership: Arc<Ownership>,
    stats: Arc<Stats>,
    host: String,
    heartbeat: Duration,
    lease: Duration,
    handover: Duration,
    last_renewed: Instant,
}

/// What the app keeps of the running coordinator.
pub struct ClusterHandle {
    leave: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ClusterHandle {
    /// After the final snapshots are committed: free every lease at once
    /// and leave the nodes table.
    pub async fn leave(self, within: Duration) {
        let _ = self.leave.send(());
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!("Leaving the cluster did not finish in time; the leases expire.");
        }
    }
}

/// The actors the coordinator steers.
pub struct Steered {
    pub router: ActorRef<RouterMsg>,
    pub writer: ActorRef<WriterMsg>,
}

impl Coordinator {
    /// Create the tables, lock the node id, register. The node owns
    /// nothing until its first heartbeat.
    pub async fn join(
        store: &Store,
        url: &str,
        settings: &ClusterSettings,
        stats: Arc<Stats>,
    ) -> Result<Coordinator, JoinError> {
        let Store::Postgres(pg) = store else {
            return Err(JoinError::NotPostgres);
        };
        let pool = pg.pool();
        lease::setup(pool, settings.partitions, settings.write_log).await?;
        let node_id = if settings.node_id.is_empty() {
            generated_node_id()
        } else {
            settings.node_id.clone()
        };
        let failover = Duration::from_secs(settings.failover_secs);
        let heartbeat = failover / 5;
        let mut conn = lease::connect(url, heartbeat).await?;
        if !lease::lock_node_id(&mut conn, &node_id).await? {
            return Err(JoinError::NodeIdInUse(node_id));
        }
        let host = hostname();
        lease::register(pool, &node_id, &host).await?;
        tracing::info!(node = %node_id, partitions = settings.partitions, failover_secs = settings.failover_secs,
            "Joined the cluster.");
        Ok(Coordinator {
            url: url.to_string(),
            conn: Some(conn),
            ownership: Arc::new(Ownership::new(node_id, settings.partitions)),
            stats,
            host,
            heartbeat,
            lease: failover - heartbeat,
            handover: Duration::from_secs(settings.handover_secs),
            last_renewed: Instant::now(),
        })
    }

    pub fn ownership(&self) -> Arc<Ownership> {
        self.ownership.clone()
    }

    /// Run until told to leave. After `stop` turns true it only renews
    /// (the final snapshots are being committed under its leases).
    pub fn spawn(mut self, steered: Steered, stop: watch::Receiver<bool>) -> ClusterHandle {
        let (leave, mut left) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut left => break,
                    _ = tick.tick() => {
                        let balance = !*stop.borrow();
                        self.beat(&steered, balance).await;
                    }
                }
            }
            let node_id = self.ownership.node_id().to_string();
            let left = match self.conn().await {
                Some(conn) => lease::leave(conn, &node_id).await,
                None => Ok(()),
            };
            match left {
                Ok(()) => tracing::info!(
                    partitions = self.ownership.count(),
                    "Left the cluster; leases freed."
                ),
                Err(error) => {
                    tracing::warn!(error = %chain(&error), "Could not free the leases; they expire.")
                }
            }
            self.ownership.revoke(&partitions(&self.ownership.held()));
            self.publish();
        });
        ClusterHandle { leave, task }
    }

    /// One heartbeat: renew, drop what was lost, then balance.
    async fn beat(&mut self, steered: &Steered, balance: bool) {
        let Some((live, lost_any)) = self.renew(steered).await else {
            return;
        };
        if !balance || lost_any {
            return;
        }
        let held = self.ownership.held();
        let step = plan(&partitions(&held), self.ownership.partitions(), live);
        if !step.release.is_empty() {
            let fences: Vec<Fence> = held
                .into_iter()
                .filter(|f| step.release.contains(&f.partition))
                .collect();
            self.hand_over(steered, fences).await;
        } else {
            self.claim(step.claim, live).await;
        }
    }

    /// Take up to `count` free or expired leases.
    async fn claim(&mut self, count: usize, live: usize) {
        if count == 0 {
            return;
        }
        let (node_id, lease) = (self.ownership.node_id().to_string(), self.lease);
        let Some(conn) = self.conn().await else {
            return;
        };
        match lease::claim(conn, &node_id, count, lease).await {
            Ok(taken) if !taken.is_empty() => {
                self.stats.partitions_acquired.inc_by(taken.len() as u64);
                tracing::info!(partitions = ?partitions(&taken), live_nodes = live, "Partitions taken.");
                self.ownership.grant(&taken);
                self.publish();
            }
            Ok(_) => {}
            Err(error) => self.failed(&error, "Claiming partitions failed; retrying."),
        }
    }

    /// Renew every lease held (and being handed over); a lease missing from
    /// the answer was taken by another node. The live node count, and
    /// whether anything was lost; `None` when the database did not answer.
    /// After a whole lease without an answer, everything is given up here
    /// (the others are taking it).
    async fn renew(&mut self, steered: &Steered) -> Option<(usize, bool)> {
        let held = self.ownership.held();
        let mut renewing = held.clone();
        renewing.extend(self.ownership.releasing());
        let (node_id, host, lease) = (
            self.ownership.node_id().to_string(),
            self.host.clone(),
            self.lease,
        );
        let answer = match self.conn().await {
            Some(conn) => lease::heartbeat(conn, &node_id, &host, &renewing, lease, lease).await,
            None => Err(StoreError::Query {
                op: "reach the database for the heartbeat",
                source: sqlx::Error::PoolClosed,
            }),
        };
        match answer {
            Ok((still, live)) => {
                self.last_renewed = Instant::now();
                let lost: Vec<Fence> = held.into_iter().filter(|f| !still.contains(f)).collect();
                self.lose(steered, &lost, "another node took them");
                Some((live, !lost.is_empty()))
            }
            Err(error) => {
                self.failed(&error, "Renewing the partition leases failed; retrying.");
                if self.last_renewed.elapsed() >= self.lease {
                    let mut all = held;
                    all.extend(self.ownership.releasing());
                    self.lose(steered, &all, "not renewed for a whole lease");
                }
                None
            }
        }
    }

    /// Stop folding partitions whose leases are gone: the actors started
    /// under those leases stop without a snapshot and the writer drops what
    /// it holds for them.
    fn lose(&mut self, steered: &Steered, lost: &[Fence], why: &str) {
        if lost.is_empty() {
            return;
        }
        let list = partitions(lost);
        tracing::warn!(partitions = ?list, reason = why, "Partition leases lost; their entities stop here.");
        self.stats.partitions_lost.inc_by(lost.len() as u64);
        self.ownership.revoke(&list);
        self.publish();
        let (reply, _) = ractor::concurrency::oneshot();
        let _ = steered.router.cast(RouterMsg::Release {
            fences: lost.to_vec(),
            snapshot: false,
            reply: reply.into(),
        });
        let _ = steered.writer.cast(WriterMsg::Forget(list));
    }

    /// Hand partitions over: stop folding them, let their actors snapshot
    /// and stop, commit, free the leases; bounded by `handover_secs`,
    /// renewing (and claiming, should a node die meanwhile) every heartbeat.
    async fn hand_over(&mut self, steered: &Steered, fences: Vec<Fence>) {
        let started = Instant::now();
        let deadline = started + self.handover;
        let list = partitions(&fences);
        tracing::info!(partitions = ?list, "Handing partitions over.");
        self.ownership.start_release(&fences);
        self.publish();
        let (reply, stopped) = ractor::concurrency::oneshot();
        let _ = steered.router.cast(RouterMsg::Release {
            fences: fences.clone(),
            snapshot: true,
            reply: reply.into(),
        });
        let mut drained = self.renewing_until(steered, stopped, deadline).await;
        if drained {
            let (reply, flushed) = ractor::concurrency::oneshot();
            drained = steered.writer.cast(WriterMsg::Flush(reply.into())).is_ok()
                && self.renewing_until(steered, flushed, deadline).await;
        }
        // Still ours (not lost meanwhile): free them.
        let ours: Vec<Fence> = self
            .ownership
            .releasing()
            .into_iter()
            .filter(|f| fences.contains(f))
            .collect();
        self.ownership.revoke(&partitions(&ours));
        let _ = steered.writer.cast(WriterMsg::Forget(partitions(&ours)));
        let node_id = self.ownership.node_id().to_string();
        let freed = match self.conn().await {
            Some(conn) => lease::release(conn, &node_id, &ours).await,
            None => Ok(()),
        };
        match freed {
            Ok(()) => {
                self.stats.partitions_released.inc_by(ours.len() as u64);
                tracing::info!(partitions = ?partitions(&ours), drained, took_ms = started.elapsed().as_millis() as u64,
                    "Partitions handed over.");
            }
            // They expire instead; nothing more is written for them here.
            Err(error) => self.failed(&error, "Freeing handed-over leases failed; they expire."),
        }
    }

    /// Wait for `done` until `deadline`, renewing the leases (and taking
    /// what a node that died meanwhile leaves) every heartbeat. `true` when
    /// it came in time.
    async fn renewing_until<T>(
        &mut self,
        steered: &Steered,
        done: oneshot::Receiver<T>,
        deadline: Instant,
    ) -> bool {
        tokio::pin!(done);
        loop {
            let next = (Instant::now() + self.heartbeat).min(deadline);
            tokio::select! {
                result = &mut done => return result.is_ok(),
                _ = tokio::time::sleep_until(next) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    if let Some((live, false)) = self.renew(steered).await {
                        let held = partitions(&self.ownership.held());
                        let step = plan(&held, self.ownership.partitions(), live);
                        self.claim(step.claim, live).await;
                    }
                }
            }
        }
    }

    /// The coordinator's connection, reconnecting (and locking the node id
    /// again) after an error. `None` when the database cannot be reached, or
    /// when another daemon took this node's id meanwhile.
    async fn conn(&mut self) -> Option<&mut PgConnection> {
        if self.conn.is_none() {
            match lease::connect(&self.url, self.heartbeat).await {
                Ok(mut conn) => {
                    match lease::lock_node_id(&mut conn, self.ownership.node_id()).await {
                        Ok(true) => self.conn = Some(conn),
                        Ok(false) => {
                            tracing::error!(node = %self.ownership.node_id(),
                            "Another running daemon took this node's id while the database was out of reach; this node stays out of the cluster.");
                            return None;
                        }
                        Err(error) => {
                            tracing::warn!(error = %chain(&error), "Locking the node id failed; retrying.");
                            return None;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %chain(&error), "Reconnecting to the database failed; retrying.");
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// A statement failed: log it, and start afresh on a new connection.
    fn failed(&mut self, error: &StoreError, what: &str) {
        tracing::warn!(error = %chain(error), "{what}");
        self.conn = None;
    }

    fn publish(&self) {
        self.stats
            .partitions_owned
            .set(self.ownership.count() as i64);
    }
}

fn partitions(fences: &[Fence]) -> Vec<u32> {
    fences.iter().map(|f| f.partition).collect()
}

/// `HOST-PID-RANDOM`: unique per start.
fn generated_node_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{:04x}",
        hostname(),
        std::process::id(),
        nanos & 0xffff
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
