//! Ingest: the Unix socket listener and one reader task per connection.
//!
//! The listener and readers are tokio tasks rather than ractor actors: their
//! whole job is to await the socket, which an actor's `handle` must not do.
//! A reader splits NDJSON frames (skipping an oversized one to its newline
//! without buffering it), decodes each once, sends events to the router
//! (waiting for an in-flight permit: backpressure reaches the socket) and
//! answers commands. Events go to the router in batches: those read from
//! one fill of the read buffer, sent before the reader waits for more
//! bytes, for a permit or on a command, so batching adds no delay and
//! keeps every event ahead of the commands that follow it. Before that, a
//! connection's last `socket.reorder_window` events are held and handed on
//! lowest sequence first ([`Reorder`]), none longer than
//! `socket.reorder_wait_ms` (so a steady trickle is not held until the
//! window fills), and all at once before a command (which sees them).
//!
//! Replies are never dropped; what bounds them is a per-connection budget
//! of queued reply bytes (`socket.reply_buffer_bytes`). Queuing a reply
//! waits for room, so a producer that does not read its replies stops being
//! read (backpressure on that producer alone), and one that reads nothing
//! for `socket.reply_timeout_secs` is disconnected. Every wait also ends at
//! shutdown, so no producer can hold the daemon up.

use super::messages::{RouterMsg, SnapshotOutcome, WriterMsg};
use crate::feed::table::FeedHandle;
use crate::model::event::{Command, DecodeError, Event, Frame, Limits, decode};
use crate::model::reorder::Reorder;
use crate::model::{EntityKey, Snapshot};
use crate::stats::Stats;
use crate::store::Store;
use ractor::ActorRef;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// Commands answered from a task (flush, snapshot, get) a connection may
/// have under way at once; more wait, and reading that connection with them.
pub const MAX_PENDING_COMMANDS: usize = 64;

/// Most events in one message to the router.
const MAX_BATCH: usize = 128;

/// What every reader needs.
#[derive(Clone)]
pub struct IngestContext {
    pub router: ActorRef<RouterMsg>,
    /// For `get`: the newest snapshot may still be pending there.
    pub writer: ActorRef<WriterMsg>,
    /// For `sync`: the table feed.
    pub feed: FeedHandle,
    pub store: Store,
    pub stats: Arc<Stats>,
    /// Events read but not yet handled by their policy actor.
    pub inflight: Arc<Semaphore>,
    pub max_frame_bytes: usize,
    pub limits: Limits,
    pub max_connections: usize,
    /// Reply bytes a connection may have queued before its reading pauses.
    pub reply_buffer_bytes: usize,
    /// A peer that reads none of its replies this long is disconnected.
    pub reply_timeout: Duration,
    /// Events of a connection held back to be put in sequence order.
    pub reorder_window: usize,
    /// No event is held longer than this.
    pub reorder_wait: Duration,
    /// In a cluster, for `stats`: this node and what it owns.
    pub ownership: Option<Arc<crate::cluster::ownership::Ownership>>,
}

/// Accept connections until `shutdown` turns true; then stop accepting, tell
/// readers to stop, and wait for them.
pub async fn serve(
    listener: UnixListener,
    ctx: IngestContext,
    mut shutdown: watch::Receiver<bool>,
) {
    static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
    let mut readers = JoinSet::new();
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
    loop {
        let slot = tokio::select! {
            _ = shutdown.changed() => break,
            slot = slots.clone().acquire_owned() => match slot { Ok(slot) => slot, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                readers.spawn(async move {
                    let _slot = slot;
                    ctx.stats.connections.inc();
                    tracing::debug!(connection = id, "Producer connected.");
                    read_connection(id, stream, &ctx, shutdown).await;
                    ctx.stats.connections.dec();
                    tracing::debug!(connection = id, "Producer disconnected.");
                });
            }
            Err(error) => {
                tracing::warn!(error = %error, "Accepting a connection failed.");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        while readers.try_join_next().is_some() {}
    }
    drop(listener);
    while readers.join_next().await.is_some() {}
}

/// Serve one connection until EOF, shutdown, or a peer that stopped reading.
async fn read_connection(
    id: u64,
    stream: UnixStream,
    ctx: &IngestContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, write_half) = stream.into_split();
    let (replies, mut reply_task) = Replies::start(id, write_half, ctx);
    let mut conn = Conn {
        id,
        replies,
        commands: Arc::new(Semaphore::new(MAX_PENDING_COMMANDS)),
        shutdown: shutdown.clone(),
        batch: Vec::new(),
        reorder: Reorder::new(ctx.reorder_window),
        read_at: Instant::now(),
    };
    let mut reader = BufReader::with_capacity(256 * 1024, read_half);
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    let mut frame: u64 = 0;
    loop {
        let available = if !reader.buffer().is_empty() {
            // Bytes already read: no waiting, so no wakers to register for
            // shutdown and the reply side, only their flags to look at.
            if conn.must_stop() {
                break;
            }
            reader.buffer()
        } else {
            // Every complete line read so far is handled: hand its events
            // over before waiting for the producer, and each held one once
            // it has waited `reorder_wait`.
            conn.send_events(ctx);
            let due = conn.reorder.oldest().map(|at| at + ctx.reorder_wait);
            let read = tokio::select! {
                biased;
                _ = conn.stopped() => break,
                _ = sleep_until_or_never(due) => None,
                read = reader.fill_buf() => Some(read),
            };
            match read {
                None => {
                    conn.send_due(ctx);
                    continue;
                }
                Some(Ok(bytes)) => {
                    conn.read_at = Instant::now();
                    bytes
                }
                Some(Err(error)) => {
                    tracing::warn!(connection = id, error = %error, "Reading from a producer failed; closing.");
                    break;
                }
            }
        };
        if available.is_empty() {
            if !skipping && !line.is_empty() {
                frame += 1;
                let _ = handle_frame(frame, &line, ctx, &mut conn).await;
            }
            break;
        }
        let (used, end_of_line) = match memchr::memchr(b'\n', available) {
            Some(at) => (at + 1, Some(at)),
            None => (available.len(), None),
        };
        let chunk = &available[..end_of_line.unwrap_or(used)];
        if !skipping {
            if line.len() + chunk.len() > ctx.max_frame_bytes {
                skipping = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if end_of_line.is_some() {
            frame += 1;
            let handled = if skipping {
                skipping = false;
                refuse(
                    frame,
                    DecodeError::TooLong(ctx.max_frame_bytes),
                    ctx,
                    &mut conn,
                )
                .await
            } else {
                let current = std::mem::take(&mut line);
                let handled = handle_frame(frame, &current, ctx, &mut conn).await;
                line = current;
                line.clear();
                handled
            };
            if handled.is_err() {
                break;
            }
        }
    }
    conn.send_all(ctx);
    let _ = ctx.router.cast(RouterMsg::Closed { connection: id });
    drop(conn);
    // Replies still owed (a flush in progress) are delivered: the reply
    // task ends once every command's task has answered, or when the peer
    // stops reading (its own timeout). Shutdown never waits for it.
    tokio::select! {
        _ = &mut reply_task => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// Replies a connection still owes, bounded in bytes: queuing one waits
/// for room, so a producer that does not read its replies stops being read.
#[derive(Clone)]
struct Replies {
    lines: mpsc::UnboundedSender<Reply>,
    /// Bytes of queued, unwritten replies; closed when the peer is gone.
    budget: Arc<Semaphore>,
    capacity: usize,
    /// Turns true when the reply task ends: the peer closed or stopped reading.
    gone: watch::Receiver<bool>,
}

/// A reply line holding its share of the connection's reply budget.
struct Reply {
    line: String,
    _bytes: OwnedSemaphorePermit,
}

/// The peer is gone or stopped reading: nothing more can be sent to it.
#[derive(Debug)]
struct PeerGone;

impl Replies {
    fn start(
        id: u64,
        write_half: OwnedWriteHalf,
        ctx: &IngestContext,
    ) -> (Replies, tokio::task::JoinHandle<()>) {
        let (lines, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(ctx.reply_buffer_bytes));
        let (gone_tx, gone) = watch::channel(false);
        let writer = ReplyWriter {
            id,
            out: write_half,
            budget: budget.clone(),
            timeout: ctx.reply_timeout,
            stats: ctx.stats.clone(),
        };
        let task = tokio::spawn(async move {
            writer.run(rx).await;
            let _ = gone_tx.send(true);
        });
        let replies = Replies {
            lines,
            budget,
            capacity: ctx.reply_buffer_bytes,
            gone,
        };
        (replies, task)
    }

    /// Queue a line once the budget has room for it (a line longer than the
    /// whole budget waits for all of it).
    async fn send(&self, line: String) -> Result<(), PeerGone> {
        let cost = (line.len() + 1).min(self.capacity).min(u32::MAX as usize) as u32;
        let bytes = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(bytes) => bytes,
            Err(_) => self
                .budget
                .clone()
                .acquire_many_owned(cost)
                .await
                .map_err(|_| PeerGone)?,
        };
        self.lines
            .send(Reply {
                line,
                _bytes: bytes,
            })
            .map_err(|_| PeerGone)
    }
}

/// One connection as its reader sees it.
struct Conn {
    id: u64,
    replies: Replies,
    /// Commands answered from a task (flush, snapshot, get) not yet answered.
    commands: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// Events read and not yet sent to the router, in order.
    batch: Vec<Held>,
    /// Events read and held back to be put in sequence order.
    reorder: Reorder<Held>,
    /// When the bytes being handled were read (the time events came).
    read_at: Instant,
}

/// An event read, with its in-flight permit.
type Held = (Box<Event>, OwnedSemaphorePermit);

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Why the reader stops: shutdown, or the peer is gone.
#[derive(Debug)]
struct Stop;

impl Conn {
    /// Send the events read so far to the router.
    fn send_events(&mut self, ctx: &IngestContext) {
        if !self.batch.is_empty() {
            let events = std::mem::replace(&mut self.batch, Vec::with_capacity(MAX_BATCH));
            let _ = ctx.router.cast(RouterMsg::Events {
                connection: self.id,
                events,
            });
        }
    }

    /// Send every event read, the held ones included (in sequence order).
    fn send_all(&mut self, ctx: &IngestContext) {
        let batch = &mut self.batch;
        self.reorder.drain(|held| batch.push(held));
        self.send_events(ctx);
    }

    /// Send the held events that have waited `reorder_wait` (and the ones
    /// of smaller sequences, which go first).
    fn send_due(&mut self, ctx: &IngestContext) {
        if let Some(cutoff) = Instant::now().checked_sub(ctx.reorder_wait) {
            let batch = &mut self.batch;
            self.reorder.release_older(cutoff, |held| batch.push(held));
        }
        self.send_events(ctx);
    }

    /// Take in an event read: held back, and maybe one handed on.
    fn push_event(&mut self, ctx: &IngestContext, held: Held) {
        let sequence = held.0.sequence;
        let (released, out_of_order) = self.reorder.push(sequence, held, self.read_at);
        if out_of_order {
            ctx.stats.events_reordered.inc();
        }
        if let Some(released) = released {
            self.batch.push(released);
            if self.batch.len() >= MAX_BATCH {
                self.send_events(ctx);
            }
        }
    }

    /// Resolves when reading must stop: shutdown, or the reply side found the
    /// peer gone (it stopped reading, or closed).
    async fn stopped(&mut self) {
        let mut gone = self.replies.gone.clone();
        tokio::select! {
            _ = self.shutdown.wait_for(|stop| *stop) => {}
            _ = gone.wait_for(|gone| *gone) => {}
        }
    }

    /// Whether reading must stop now (what [`Self::stopped`] waits for).
    fn must_stop(&self) -> bool {
        *self.shutdown.borrow() || *self.replies.gone.borrow()
    }

    /// `fut`, unless reading must stop first.
    async fn or_stop<T>(&mut self, fut: impl std::future::Future<Output = T>) -> Result<T, Stop> {
        tokio::select! {
            biased;
            _ = self.stopped() => Err(Stop),
            value = fut => Ok(value),
        }
    }

    /// Queue a reply, waiting for room; stops on shutdown or a gone peer.
    async fn reply(&mut self, line: String) -> Result<(), Stop> {
        let replies = self.replies.clone();
        match self.or_stop(replies.send(line)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop),
        }
    }

    /// A place for one more command answered from a task.
    async fn command_slot(&mut self) -> Result<OwnedSemaphorePermit, Stop> {
        let commands = self.commands.clone();
        match self.or_stop(commands.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Stop),
        }
    }
}

async fn handle_frame(
    frame: u64,
    line: &[u8],
    ctx: &IngestContext,
    conn: &mut Conn,
) -> Result<(), Stop> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match decode(line, ctx.limits) {
        Ok(Frame::Event(event)) => {
            ctx.stats.events_received.inc();
            // Waits while too many events are in flight: backpressure. The
            // events read go first: their permits are among those waited
            // for. Held ones stay held while permits come back from others
            // (handing them on early would undo their order), but not for
            // long: they may be what everyone waits for.
            let permit = match ctx.inflight.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    conn.send_events(ctx);
                    let acquire = ctx.inflight.clone().acquire_owned();
                    let soon = tokio::time::timeout(ctx.reorder_wait, acquire);
                    match conn.or_stop(soon).await? {
                        Ok(permit) => permit.map_err(|_| Stop)?,
                        Err(_) => {
                            conn.send_all(ctx);
                            conn.or_stop(ctx.inflight.clone().acquire_owned())
                                .await?
                                .map_err(|_| Stop)?
                        }
                    }
                }
            };
            conn.push_event(ctx, (Box::new(event), permit));
            Ok(())
        }
        Ok(Frame::Command(command)) => command_reply(frame, command, ctx, conn).await,
        Err(error) => refuse(frame, error, ctx, conn).await,
    }
}

async fn refuse(
    frame: u64,
    error: DecodeError,
    ctx: &IngestContext,
    conn: &mut Conn,
) -> Result<(), Stop> {
    // The events before it go first: the reply may wait for room.
    conn.send_all(ctx);
    let reason = error.to_string();
    ctx.stats
        .invalid_frame(conn.id, frame, error.kind(), &reason);
    conn.reply(json!({"ok": false, "frame": frame, "error": reason}).to_string())
        .await
}

fn ok_line(op: &str, frame: u64, extra: Value) -> String {
    let mut reply = json!({"ok": true, "op": op, "frame": frame});
    if let (Value::Object(reply), Value::Object(extra)) = (&mut reply, extra) {
        reply.extend(extra);
    }
    reply.to_string()
}

fn fail_line(op: &str, frame: u64, error: String) -> String {
    json!({"ok": false, "op": op, "frame": frame, "error": error}).to_string()
}

/// Answer a command. Quick ones (ping, stats) are queued at once; slow ones
/// (flush, snapshot, get) take one of the connection's command places and
/// answer from a task, so reading goes on meanwhile, and a flood of them
/// costs at most [`MAX_PENDING_COMMANDS`] answers in the making.
async fn command_reply(
    frame: u64,
    command: Command,
    ctx: &IngestContext,
    conn: &mut Conn,
) -> Result<(), Stop> {
    // The events before it go first: a command sees them, and its reply
    // may wait for room.
    conn.send_all(ctx);
    let command = match command {
        Command::Ping => return conn.reply(ok_line("ping", frame, json!({}))).await,
        Command::Stats => {
            let mut stats = ctx.stats.to_json();
            if let Some(own) = &ctx.ownership {
                let owned: Vec<u32> = own.held().iter().map(|f| f.partition).collect();
                stats["cluster"] = json!({
                    "node_id": own.node_id(),
                    "partitions": own.partitions(),
                    "owned": owned,
                });
            }
            let stats = json!({"stats": stats});
            return conn.reply(ok_line("stats", frame, stats)).await;
        }
        command => command,
    };
    let slot = conn.command_slot().await?;
    let replies = conn.replies.clone();
    match command {
        Command::Flush { snapshot } => {
            // Sent now, in frame order: behind this connection's events and
            // ahead of its `Closed`; only the wait happens in a task.
            let (reply, done) = ractor::concurrency::oneshot();
            let sent = ctx.router.cast(RouterMsg::Flush {
                connection: conn.id,
                snapshot,
                reply: reply.into(),
            });
            tokio::spawn(async move {
                let line = match (sent, done.await) {
                    (Ok(()), Ok(())) => ok_line("flush", frame, json!({})),
                    _ => fail_line("flush", frame, "the daemon is shutting down".into()),
                };
                let _ = replies.send(line).await;
                drop(slot);
            });
        }
        Command::Snapshot {
            entity_type,
            entity_id,
        } => {
            let key = EntityKey::new(entity_type, entity_id);
            let (reply, done) = ractor::concurrency::oneshot();
            let sent = ctx.router.cast(RouterMsg::Snapshot {
                key: key.clone(),
                reply: reply.into(),
            });
            tokio::spawn(async move {
                let entity = key.to_string();
                let line = match (sent, done.await) {
                    (Ok(()), Ok(SnapshotOutcome::Taken { version, sequence })) => ok_line(
                        "snapshot",
                        frame,
                        json!({"entity": entity, "taken": true, "version": version, "sequence": sequence}),
                    ),
                    (Ok(()), Ok(SnapshotOutcome::NothingNew)) => ok_line(
                        "snapshot",
                        frame,
                        json!({"entity": entity, "taken": false, "reason": "no new events"}),
                    ),
                    (Ok(()), Ok(SnapshotOutcome::Unknown)) => fail_line(
                        "snapshot",
                        frame,
                        format!("unknown entity {entity}: no events and no stored snapshot"),
                    ),
                    (Ok(()), Ok(SnapshotOutcome::NotOwned { partition })) => fail_line(
                        "snapshot",
                        frame,
                        format!(
                            "{entity} is in cluster partition {partition}, which another node \
                             owns: send the command to that node (`stats` lists each node's partitions)"
                        ),
                    ),
                    _ => fail_line("snapshot", frame, "the daemon is shutting down".into()),
                };
                let _ = replies.send(line).await;
                drop(slot);
            });
        }
        Command::Get {
            entity_type,
            entity_id,
        } => {
            let key = EntityKey::new(entity_type, entity_id);
            let store = ctx.store.clone();
            let writer = ctx.writer.clone();
            tokio::spawn(async move {
                let line = match newest_snapshot(&writer, &store, &key).await {
                    Ok(Some(snapshot)) => {
                        ok_line("get", frame, json!({"snapshot": snapshot.to_json()}))
                    }
                    Ok(None) => fail_line(
                        "get",
                        frame,
                        format!("unknown entity {key}: no snapshot pending or stored"),
                    ),
                    Err(error) => fail_line("get", frame, crate::error::chain(&error)),
                };
                let _ = replies.send(line).await;
                drop(slot);
            });
        }
        Command::Sync => {
            let feed = ctx.feed.clone();
            tokio::spawn(async move {
                let line = match feed.sync().await {
                    Ok(()) => ok_line("sync", frame, json!({})),
                    Err(error) => fail_line("sync", frame, error),
                };
                let _ = replies.send(line).await;
                drop(slot);
            });
        }
        Command::Ping | Command::Stats => unreachable!("answered above"),
    }
    Ok(())
}

/// The entity's newest snapshot: the writer's pending one (newer than any
/// stored), else the store's verified latest. Nothing is kept.
async fn newest_snapshot(
    writer: &ActorRef<WriterMsg>,
    store: &Store,
    key: &EntityKey,
) -> Result<Option<Snapshot>, crate::store::StoreError> {
    if let Ok(ractor::rpc::CallResult::Success(Some(pending))) = writer
        .call(|reply| WriterMsg::PendingFor(key.clone(), reply), None)
        .await
    {
        return Ok(Some(pending));
    }
    store.latest(key).await
}

/// Writes a connection's replies to its socket, in batches. A write that
/// makes no progress for `timeout` means the peer stopped reading: the
/// connection is closed with a warning naming it.
struct ReplyWriter {
    id: u64,
    out: OwnedWriteHalf,
    budget: Arc<Semaphore>,
    timeout: Duration,
    stats: Arc<Stats>,
}

impl ReplyWriter {
    /// Most bytes gathered into one write.
    const BATCH: usize = 64 * 1024;

    async fn run(mut self, mut lines: mpsc::UnboundedReceiver<Reply>) {
        let mut batch: Vec<u8> = Vec::with_capacity(Self::BATCH);
        let mut held: Vec<Reply> = Vec::new();
        while let Some(first) = lines.recv().await {
            batch.extend_from_slice(first.line.as_bytes());
            batch.push(b'\n');
            held.push(first);
            while batch.len() < Self::BATCH {
                let Ok(next) = lines.try_recv() else { break };
                batch.extend_from_slice(next.line.as_bytes());
                batch.push(b'\n');
                held.push(next);
            }
            if !self.write(&batch).await {
                break;
            }
            batch.clear();
            // Their bytes are written: room for more replies.
            held.clear();
        }
        self.budget.close();
        let _ = self.out.shutdown().await;
    }

    /// Write it all; false when the peer is gone or reads nothing for `timeout`.
    async fn write(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match tokio::time::timeout(self.timeout, self.out.write(bytes)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(n)) => bytes = &bytes[n..],
                Err(_) => {
                    self.stats.connections_unread.inc();
                    tracing::warn!(
                        connection = self.id,
                        timeout_secs = self.timeout.as_secs(),
                        "Producer read none of its replies in time; closing its connection."
                    );
                    return false;
                }
            }
        }
        true
    }
}
