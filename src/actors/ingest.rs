//! Ingest: the Unix socket listener and one reader task per connection.
//!
//! The listener and readers are tokio tasks rather than ractor actors: their
//! whole job is to await the socket, which an actor's `handle` must not do.
//! A reader splits NDJSON frames (skipping an oversized one to its newline
//! without buffering it), decodes each once, sends events to the router
//! (waiting for an in-flight permit: backpressure reaches the socket) and
//! answers commands. Replies go through a bounded queue to a writer task:
//! an error line is dropped (and counted) rather than ever blocking reading.

use super::router::RouterMsg;
use crate::model::EntityKey;
use crate::model::event::{Command, DecodeError, Frame, Limits, decode};
use crate::stats::Stats;
use crate::store::Store;
use ractor::ActorRef;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// Replies queued per connection before error lines are dropped.
const REPLY_QUEUE: usize = 1024;

/// What every reader needs.
#[derive(Clone)]
pub struct IngestContext {
    pub router: ActorRef<RouterMsg>,
    pub store: Store,
    pub stats: Arc<Stats>,
    /// Events read but not yet handled by their policy actor.
    pub inflight: Arc<Semaphore>,
    pub max_frame_bytes: usize,
    pub limits: Limits,
    pub max_connections: usize,
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

/// Serve one connection until EOF or shutdown.
async fn read_connection(
    id: u64,
    stream: UnixStream,
    ctx: &IngestContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, write_half) = stream.into_split();
    let (replies, reply_rx) = mpsc::channel::<String>(REPLY_QUEUE);
    let reply_task = tokio::spawn(write_replies(write_half, reply_rx));
    let mut reader = BufReader::with_capacity(256 * 1024, read_half);
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    let mut frame: u64 = 0;
    loop {
        let available = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            read = reader.fill_buf() => match read {
                Ok(bytes) => bytes,
                Err(error) => {
                    tracing::warn!(connection = id, error = %error, "Reading from a producer failed; closing.");
                    break;
                }
            },
        };
        if available.is_empty() {
            if !skipping && !line.is_empty() {
                frame += 1;
                handle_frame(id, frame, &line, ctx, &replies).await;
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
            if skipping {
                refuse(
                    id,
                    frame,
                    DecodeError::TooLong(ctx.max_frame_bytes),
                    ctx,
                    &replies,
                );
                skipping = false;
            } else {
                let current = std::mem::take(&mut line);
                handle_frame(id, frame, &current, ctx, &replies).await;
                line = current;
                line.clear();
            }
        }
    }
    let _ = ctx.router.cast(RouterMsg::Closed { connection: id });
    drop(replies);
    // Replies still owed (a flush in progress) are delivered; a producer
    // that stopped reading does not hold the daemon for long.
    let mut reply_task = reply_task;
    if tokio::time::timeout(std::time::Duration::from_secs(10), &mut reply_task)
        .await
        .is_err()
    {
        reply_task.abort();
    }
}

async fn handle_frame(
    id: u64,
    frame: u64,
    line: &[u8],
    ctx: &IngestContext,
    replies: &mpsc::Sender<String>,
) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match decode(line, ctx.limits) {
        Ok(Frame::Event(event)) => {
            ctx.stats.events_received.inc();
            // Waits while too many events are in flight: backpressure.
            let Ok(permit) = ctx.inflight.clone().acquire_owned().await else {
                return;
            };
            let _ = ctx.router.cast(RouterMsg::Event {
                connection: id,
                event: Box::new(event),
                permit,
            });
        }
        Ok(Frame::Command(command)) => command_reply(id, frame, command, ctx, replies).await,
        Err(error) => refuse(id, frame, error, ctx, replies),
    }
}

fn refuse(
    id: u64,
    frame: u64,
    error: DecodeError,
    ctx: &IngestContext,
    replies: &mpsc::Sender<String>,
) {
    let reason = error.to_string();
    ctx.stats.invalid_frame(id, frame, error.kind(), &reason);
    let line = json!({"ok": false, "frame": frame, "error": reason}).to_string();
    if replies.try_send(line).is_err() {
        ctx.stats.replies_dropped.inc();
    }
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

/// Answer a command; slow ones (flush, snapshot, get) answer from a task so
/// reading goes on meanwhile.
async fn command_reply(
    id: u64,
    frame: u64,
    command: Command,
    ctx: &IngestContext,
    replies: &mpsc::Sender<String>,
) {
    let replies = replies.clone();
    match command {
        Command::Ping => {
            let _ = replies.send(ok_line("ping", frame, json!({}))).await;
        }
        Command::Stats => {
            let _ = replies
                .send(ok_line(
                    "stats",
                    frame,
                    json!({"stats": ctx.stats.to_json()}),
                ))
                .await;
        }
        Command::Flush => {
            // Sent now, in frame order: behind this connection's events and
            // ahead of its `Closed`; only the wait happens in a task.
            let (reply, done) = ractor::concurrency::oneshot();
            let sent = ctx.router.cast(RouterMsg::Flush {
                connection: id,
                reply: reply.into(),
            });
            tokio::spawn(async move {
                let line = match (sent, done.await) {
                    (Ok(()), Ok(())) => ok_line("flush", frame, json!({})),
                    _ => fail_line("flush", frame, "the daemon is shutting down".into()),
                };
                let _ = replies.send(line).await;
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
                let line = match (sent, done.await) {
                    (Ok(()), Ok(Some((version, sequence)))) => ok_line(
                        "snapshot",
                        frame,
                        json!({"entity": key.to_string(), "taken": true, "version": version, "sequence": sequence}),
                    ),
                    (Ok(()), Ok(None)) => ok_line(
                        "snapshot",
                        frame,
                        json!({"entity": key.to_string(), "taken": false, "reason": "no new events"}),
                    ),
                    _ => fail_line("snapshot", frame, "the daemon is shutting down".into()),
                };
                let _ = replies.send(line).await;
            });
        }
        Command::Get {
            entity_type,
            entity_id,
        } => {
            let key = EntityKey::new(entity_type, entity_id);
            let store = ctx.store.clone();
            tokio::spawn(async move {
                let line = match store.latest(&key).await {
                    Ok(Some(snapshot)) => {
                        ok_line("get", frame, json!({"snapshot": snapshot.to_json()}))
                    }
                    Ok(None) => fail_line("get", frame, format!("no snapshot of {key}")),
                    Err(error) => fail_line("get", frame, crate::cli::chain(&error)),
                };
                let _ = replies.send(line).await;
            });
        }
    }
}

async fn write_replies(
    write_half: tokio::net::unix::OwnedWriteHalf,
    mut lines: mpsc::Receiver<String>,
) {
    let mut out = BufWriter::new(write_half);
    while let Some(line) = lines.recv().await {
        if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err() {
            break;
        }
        if lines.is_empty() && out.flush().await.is_err() {
            break;
        }
    }
    let _ = out.flush().await;
    let _ = out.into_inner().shutdown().await;
}
