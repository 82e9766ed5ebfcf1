//! Start and stop the daemon: store, writer, router, socket, in that order;
//! shutdown in the reverse order, each step bounded by the grace period.

use crate::actors::ingest::{self, IngestContext};
use crate::actors::messages::{RouterMsg, WriterMsg};
use crate::actors::policy::PolicyConfig;
use crate::actors::router::{Router, RouterArgs};
use crate::actors::writer::{Writer, WriterArgs};
use crate::cluster::coordinator::{ClusterHandle, Coordinator, Steered};
use crate::error::chain;
use crate::feed::table::{FeedHandle, TableFeed};
use crate::model::event::Limits;
use crate::reducer::Reducer;
use crate::settings::{EventsTable, Settings};
use crate::stats::Stats;
use crate::store::{EventsTableWatch, Store, StoreError, StoreOptions, WriteFence};
use ractor::{Actor, ActorRef};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("socket {path} is in use by a running snapshotd (or another program)")]
    SocketInUse { path: PathBuf },
    #[error("socket.path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "the socket's directory {dir} is writable by others without the sticky bit \
         (mode {mode:o}): anyone could replace the socket; use a directory only the \
         daemon's user (and group) can write, such as /run/snapshotd"
    )]
    UnsafeSocketDir { dir: PathBuf, mode: u32 },
    #[error("cannot bind socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set socket {path} to mode {mode} / group `{group}`: {reason}")]
    SocketPermissions {
        path: PathBuf,
        mode: String,
        group: String,
        reason: String,
    },
    #[error("cannot serve metrics on {address}")]
    Metrics {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the {0} actor: {1}")]
    Spawn(&'static str, String),
    #[error("cannot join the cluster")]
    Cluster(#[from] crate::cluster::coordinator::JoinError),
}

/// A running daemon.
pub struct App {
    pub socket_path: PathBuf,
    /// Where `GET /metrics` is served, when it is.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The socket came from systemd (socket activation): systemd owns the file.
    activated: bool,
    watchdog: Option<JoinHandle<()>>,
    pub stats: Arc<Stats>,
    settings: Settings,
    store: Store,
    router: ActorRef<RouterMsg>,
    writer: ActorRef<WriterMsg>,
    stop_ingest: watch::Sender<bool>,
    ingest: JoinHandle<()>,
    /// The table feed's task, when it follows stabilize's events table.
    feed: Option<JoinHandle<()>>,
    /// The coordinator keeping this node's leases, in a cluster.
    cluster: Option<ClusterHandle>,
}

impl App {
    /// Connect, create the table, spawn the actors, bind the socket.
    pub async fn start(settings: Settings) -> Result<App, StartError> {
        // Without systemd's socket, our own must be safe before anything starts.
        if std::env::var_os("LISTEN_FDS").is_none() {
            check_socket_path(&settings.socket.path)?;
        }
        let store = Store::connect(&StoreOptions {
            url: settings.database.url.clone(),
            pool_size: settings.database.pool_size,
        })
        .await?;
        store.migrate().await?;
        // Each batch committing takes a pooled connection: leave one for
        // hydration lookups and the events-table reads.
        let pool_room = (settings.database.pool_size as usize)
            .saturating_sub(1)
            .max(1);
        let write_connections = store.write_connections(settings.writer.connections.min(pool_room));
        if write_connections < store.write_connections(settings.writer.connections) {
            tracing::warn!(
                writer_connections = settings.writer.connections,
                pool_size = settings.database.pool_size,
                using = write_connections,
                "writer.connections leaves no pooled connection for reads; committing fewer batches at once."
            );
        }
        let reducer = Reducer::from(settings.reducer.kind);
        let events_table = Arc::new(EventsTableWatch::new(
            store.clone(),
            reducer == Reducer::Stabilize && settings.database.events_table == EventsTable::Auto,
        ));
        let found = events_table.check().await;
        tracing::info!(
            database = %crate::store::redact(&settings.database.url),
            events_table = found,
            reducer = ?reducer,
            "Store ready."
        );
        let stats = Arc::new(Stats::new());
        stats
            .writer_pending_limit
            .set(settings.writer.max_pending as i64);
        let coordinator = if settings.cluster.enabled {
            Some(
                Coordinator::join(
                    &store,
                    &settings.database.url,
                    &settings.cluster,
                    stats.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let ownership = coordinator.as_ref().map(Coordinator::ownership);
        let fence = ownership.as_ref().map(|own| WriteFence {
            node_id: own.node_id().to_string(),
            write_log: settings.cluster.write_log,
            // One heartbeat, but not so short that a busy machine's pause
            // inside a transaction aborts it.
            idle_timeout: (Duration::from_secs(settings.cluster.failover_secs) / 5)
                .max(Duration::from_secs(1)),
        });

        let (writer, _) = Actor::spawn(
            None,
            Writer,
            WriterArgs {
                store: store.clone(),
                connections: write_connections,
                events_table: events_table.clone(),
                batch_size: settings.writer.batch_size,
                batch_delay: Duration::from_millis(settings.writer.batch_delay_ms),
                retry_max: Duration::from_secs(settings.writer.retry_max_secs),
                keep_snapshots: settings.policy.keep_snapshots,
                stats: stats.clone(),
                fence,
                ownership: ownership.clone(),
            },
        )
        .await
        .map_err(|e| StartError::Spawn("writer", e.to_string()))?;

        let config = Arc::new(PolicyConfig {
            reducer,
            event_interval: settings.policy.event_interval as usize,
            time_interval: settings.policy.time_interval(),
            idle_timeout: settings.policy.idle_timeout(),
            max_state_bytes: settings.policy.max_state_bytes,
            events_table: events_table.clone(),
        });
        let (router, _) = Actor::spawn(
            None,
            Router,
            RouterArgs {
                config,
                lookups: crate::actors::lookup::Lookups::spawn(store.clone(), writer.clone()),
                timers: crate::actors::timers::Timers::spawn(),
                store: store.clone(),
                writer: writer.clone(),
                writer_permits: Arc::new(Semaphore::new(settings.writer.max_pending)),
                stats: stats.clone(),
                max_active: settings.policy.max_active_entities,
                ownership: ownership.clone(),
            },
        )
        .await
        .map_err(|e| StartError::Spawn("router", e.to_string()))?;
        writer
            .cast(WriterMsg::SetRouter(router.clone()))
            .map_err(|e| StartError::Spawn("writer", e.to_string()))?;

        let (listener, activated) = match activated_listener()? {
            Some(listener) => (listener, true),
            None => (bind_socket(&settings)?, false),
        };
        let (stop_ingest, stop_rx) = watch::channel(false);
        let inflight = Arc::new(Semaphore::new(settings.socket.max_inflight_events));
        let follow = reducer == Reducer::Stabilize
            && settings.database.events_table == EventsTable::Auto
            && settings.feed.table == EventsTable::Auto;
        let (feed_handle, feed) = if follow {
            let (handle, task) = TableFeed {
                store: store.clone(),
                router: router.clone(),
                stats: stats.clone(),
                inflight: inflight.clone(),
                events_table: events_table.clone(),
                settings: settings.feed.clone(),
                reducer,
                ownership: ownership.clone(),
            }
            .spawn(stop_rx.clone());
            (handle, Some(task))
        } else {
            (FeedHandle::off(), None)
        };
        if settings.verify.interval_secs > 0 {
            if reducer == Reducer::Stabilize {
                tokio::spawn(crate::verify::scrub(
                    store.clone(),
                    reducer,
                    settings.verify.clone(),
                    stats.clone(),
                    stop_rx.clone(),
                ));
                tracing::info!(
                    interval_secs = settings.verify.interval_secs,
                    sample = settings.verify.sample,
                    "Verify scrub on."
                );
            } else {
                tracing::warn!(
                    "verify.interval_secs is set but the scrub replays stabilize's events table, \
                     which only the stabilize reducer reads; the scrub is off."
                );
            }
        }
        let ctx = IngestContext {
            router: router.clone(),
            writer: writer.clone(),
            feed: feed_handle,
            store: store.clone(),
            stats: stats.clone(),
            inflight,
            max_frame_bytes: settings.socket.max_frame_bytes,
            limits: Limits {
                max_depth: settings.socket.max_depth,
                numbers: store.number_form(),
            },
            max_connections: settings.socket.max_connections,
            reply_buffer_bytes: settings.socket.reply_buffer_bytes,
            reply_timeout: settings.socket.reply_timeout(),
            reorder_window: settings.socket.reorder_window,
            reorder_wait: settings.socket.reorder_wait(),
            ownership,
        };
        let metrics_address = if settings.metrics.address.is_empty() {
            None
        } else {
            let wanted = settings.metrics.address.clone();
            let listener = tokio::net::TcpListener::bind(&wanted)
                .await
                .map_err(|source| StartError::Metrics {
                    address: wanted,
                    source,
                })?;
            let bound = listener.local_addr().ok();
            tokio::spawn(crate::telemetry::serve_metrics(
                listener,
                stats.clone(),
                stop_rx.clone(),
            ));
            if let Some(bound) = bound {
                tracing::info!(address = %bound, "Serving metrics at /metrics.");
            }
            bound
        };
        let cluster = coordinator.map(|coordinator| {
            coordinator.spawn(
                Steered {
                    router: router.clone(),
                    writer: writer.clone(),
                },
                stop_rx.clone(),
            )
        });
        let ingest = tokio::spawn(ingest::serve(listener, ctx, stop_rx));
        tracing::info!(socket = %settings.socket.path.display(), activated, "Listening.");
        let mut status = StatusLine::new(&stats);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status.next(&stats)),
        ]);
        let watchdog = sd_notify::watchdog_enabled().map(|period| {
            let writer = writer.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period / 2);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut stuck = false;
                loop {
                    tick.tick().await;
                    // Ping systemd only while the writer answers: a writer
                    // stuck in a commit gets the daemon restarted.
                    let alive = matches!(
                        writer.call(WriterMsg::Ping, Some(period / 2)).await,
                        Ok(ractor::rpc::CallResult::Success(()))
                    );
                    let line = status.next(&stats);
                    if alive {
                        stuck = false;
                        notify_systemd(&[
                            sd_notify::NotifyState::Watchdog,
                            sd_notify::NotifyState::Status(&line),
                        ]);
                    } else {
                        if !stuck {
                            tracing::error!(
                                "The writer is not answering; withholding the watchdog ping."
                            );
                        }
                        stuck = true;
                        let line = format!("writer not answering; {line}");
                        notify_systemd(&[sd_notify::NotifyState::Status(&line)]);
                    }
                }
            })
        });
        Ok(App {
            metrics_address,
            activated,
            watchdog,
            socket_path: settings.socket.path.clone(),
            stats,
            settings,
            store,
            router,
            writer,
            stop_ingest,
            ingest,
            feed,
            cluster,
        })
    }

    /// Stop in order: accepting, the socket file, readers, policy actors
    /// (snapshotting new events), the writer (committing), the pool.
    /// Returns the number of entities left behind: actors that did not hand
    /// over their final snapshot in time, plus snapshots not committed.
    pub async fn shutdown(self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(self.settings.shutdown.grace_secs);
        let left = || deadline.saturating_duration_since(Instant::now());
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        let _ = self.stop_ingest.send(true);
        if !self.activated {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        // Readers stop at the signal whatever their peers do.
        if tokio::time::timeout(left(), self.ingest).await.is_err() {
            tracing::warn!("Readers did not stop in time.");
        }
        if let Some(feed) = self.feed
            && tokio::time::timeout(left(), feed).await.is_err()
        {
            tracing::warn!("The table feed did not stop in time.");
        }
        let snapshot = self.settings.shutdown.snapshot_on_shutdown;
        let _ = self.writer.cast(WriterMsg::ShutdownBegins);
        let drained = self
            .router
            .call(|reply| RouterMsg::Drain { snapshot, reply }, Some(left()))
            .await;
        let mut stranded = 0;
        if !matches!(drained, Ok(ractor::rpc::CallResult::Success(()))) {
            stranded = match self
                .router
                .call(RouterMsg::Remaining, Some(Duration::from_secs(1)))
                .await
            {
                Ok(ractor::rpc::CallResult::Success(n)) => n,
                _ => usize::MAX,
            };
            tracing::warn!(
                entities = stranded,
                "Policy actors did not all stop in time."
            );
        }
        let uncommitted = match self
            .writer
            .call(
                |reply| WriterMsg::Drain(deadline, reply),
                Some(left() + Duration::from_secs(1)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(lost)) => lost,
            _ => usize::MAX,
        };
        let lost = stranded.saturating_add(uncommitted);
        // The final snapshots are committed: free the leases for the others.
        if let Some(cluster) = self.cluster {
            cluster.leave(left() + Duration::from_secs(2)).await;
        }
        self.router.stop(None);
        self.writer.stop(None);
        self.store.close().await;
        if let Some(watchdog) = self.watchdog {
            watchdog.abort();
        }
        lost
    }
}

/// Run until SIGTERM or SIGINT, then shut down. `Ok` means a clean exit.
pub async fn run(settings: Settings) -> Result<(), String> {
    let app = App::start(settings).await.map_err(|e| chain(&e))?;
    wait_for_signal().await;
    tracing::info!("Shutting down.");
    match app.shutdown().await {
        0 => {
            tracing::info!("Stopped cleanly.");
            Ok(())
        }
        usize::MAX => Err(
            "shutdown did not finish within the grace period; entities may be left without their final snapshot"
                .into(),
        ),
        lost => {
            tracing::error!(
                entities = lost,
                "Entities left without their final snapshot."
            );
            Err(format!(
                "{lost} entities were left without their final snapshot when the grace period ended"
            ))
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// The `STATUS=` text systemd shows: entities, event rate, store state.
struct StatusLine {
    events: u64,
    at: Instant,
}

impl StatusLine {
    fn new(stats: &Stats) -> StatusLine {
        StatusLine {
            events: Self::events(stats),
            at: Instant::now(),
        }
    }

    fn events(stats: &Stats) -> u64 {
        stats.events_received.get() + stats.feed_events.get()
    }

    /// The line, with the event rate since the previous one.
    fn next(&mut self, stats: &Stats) -> String {
        let events = Self::events(stats);
        let rate = (events - self.events) as f64 / self.at.elapsed().as_secs_f64().max(1e-3);
        self.events = events;
        self.at = Instant::now();
        format!(
            "{} entities active, {rate:.0} events/s, {} snapshots written, {} pending, store {}",
            stats.active_entities.get(),
            stats.snapshots_written.get(),
            stats.writer_pending.get(),
            if stats.store_up.get() == 1 {
                "up"
            } else {
                "DOWN"
            }
        )
    }
}

/// Tell systemd about a state change; a no-op outside systemd.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(state) {
        tracing::warn!(error = %error, "Notifying systemd failed.");
    }
}

/// The listening socket systemd passed (`snapshotd.socket`), if any.
fn activated_listener() -> Result<Option<UnixListener>, StartError> {
    use std::os::fd::FromRawFd;
    let fds: Vec<_> = match sd_notify::listen_fds() {
        Ok(fds) => fds.collect(),
        Err(_) => return Ok(None),
    };
    let Some(&fd) = fds.first() else {
        return Ok(None);
    };
    // SAFETY: systemd hands this descriptor to this process alone
    // (LISTEN_PID is checked by listen_fds) and nothing else owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let path = PathBuf::from("(systemd socket)");
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map(Some)
        .map_err(|source| StartError::Bind { path, source })
}

/// Bind the socket, replacing a stale file left by a crash, then set its
/// mode and group.
fn bind_socket(settings: &Settings) -> Result<UnixListener, StartError> {
    let path = &settings.socket.path;
    check_socket_path(path)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse { path: path.clone() });
        }
        tracing::info!(socket = %path.display(), "Replacing a stale socket file.");
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| StartError::Bind {
        path: path.clone(),
        source,
    })?;
    let permissions = |reason: String| StartError::SocketPermissions {
        path: path.clone(),
        mode: settings.socket.mode.clone(),
        group: settings.socket.group.clone(),
        reason,
    };
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(settings.socket.mode_bits()),
    )
    .map_err(|e| permissions(e.to_string()))?;
    if !settings.socket.group.is_empty() {
        let gid =
            group_id(&settings.socket.group).ok_or_else(|| permissions("no such group".into()))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| permissions(e.to_string()))?;
    }
    Ok(listener)
}

/// Before anything else starts: refuse a socket directory others may write
/// without the sticky bit (whoever can write it can swap the socket for
/// their own), and a path that holds something other than a socket (it is
/// never replaced). Creates the directory when missing.
fn check_socket_path(path: &Path) -> Result<(), StartError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(StartError::NotASocket {
                path: path.to_path_buf(),
            });
        }
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            let _ = std::fs::create_dir_all(dir);
            dir.to_path_buf()
        }
        None => PathBuf::from("."),
    };
    let Ok(meta) = std::fs::metadata(&dir) else {
        return Ok(()); // Binding will name the real problem.
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(StartError::UnsafeSocketDir { dir, mode });
    }
    Ok(())
}

/// A group given by number or by name (from /etc/group).
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let groups = std::fs::read_to_string(Path::new("/etc/group")).ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then(|| fields.nth(1)?.parse().ok())?
    })
}
