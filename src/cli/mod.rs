//! The command line: what each subcommand does, as library functions that
//! return an exit status, so `main.rs` stays thin and tests can call them.

use crate::model::{EntityKey, EntityType};
use crate::settings::Settings;
use crate::store::{Store, StoreError, StoreOptions};

/// An error a command reports on one line of stderr before exiting non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error("{}", chain(.0))]
    Store(#[from] StoreError),
    #[error("{0}")]
    Usage(String),
    #[error("no snapshot of {0}")]
    NotFound(EntityKey),
    #[error("{bad} of {rows} snapshot rows failed verification")]
    VerifyFailed { rows: u64, bad: u64 },
    #[error("{0}")]
    Other(String),
}

pub use crate::error::chain;

async fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    Store::connect(&StoreOptions {
        url: settings.database.url.clone(),
        pool_size: settings.database.pool_size,
    })
    .await
}

/// `snapshotd migrate`: create the snapshots table when missing.
pub async fn migrate(settings: &Settings) -> Result<(), CommandError> {
    let store = open_store(settings).await?;
    store.migrate().await?;
    store.close().await;
    println!(
        "snapshots table ready in {}",
        crate::store::redact(&settings.database.url)
    );
    Ok(())
}

/// `snapshotd get TYPE ID`: print the latest verified snapshot as JSON.
pub async fn get(
    settings: &Settings,
    entity_type: &str,
    entity_id: &str,
) -> Result<(), CommandError> {
    let entity_type: EntityType = entity_type
        .parse()
        .map_err(|e: crate::model::UnknownEntityType| CommandError::Usage(e.to_string()))?;
    let key = EntityKey::new(entity_type, entity_id);
    let store = open_store(settings).await?;
    let found = store.latest(&key).await;
    store.close().await;
    match found? {
        Some(snapshot) => {
            println!("{}", snapshot.to_json());
            Ok(())
        }
        None => Err(CommandError::NotFound(key)),
    }
}

/// `snapshotd verify`: recompute every stored hash; each bad row on stderr.
pub async fn verify(settings: &Settings) -> Result<(), CommandError> {
    let store = open_store(settings).await?;
    let report = store
        .verify_all(|bad| eprintln!("{}", chain(&bad.error)))
        .await;
    store.close().await;
    let report = report?;
    if report.bad > 0 {
        return Err(CommandError::VerifyFailed {
            rows: report.rows,
            bad: report.bad,
        });
    }
    println!("{} snapshot rows verified, all hashes match", report.rows);
    Ok(())
}

/// What `send` read back from the daemon.
#[derive(Debug, Default)]
struct ReplyTally {
    replies: u64,
    rejected: u64,
    /// Why reading stopped before the daemon closed the connection.
    broken: Option<String>,
}

/// `snapshotd send`: stream NDJSON from a file or stdin to the socket,
/// print every error reply, optionally wait for a flush; fails when any
/// frame was rejected.
///
/// Replies are read while sending and until the daemon closes the
/// connection. The daemon drops no reply (it stops reading a producer that
/// does not read instead), so the counts printed are exact unless the
/// connection broke, which the summary then says.
///
/// `rate`: at most that many frames a second on average, in small steps
/// (a steady producer rather than a replay at full speed).
pub async fn send(
    socket: &std::path::Path,
    input: Option<&std::path::Path>,
    flush: bool,
    rate: Option<u64>,
) -> Result<(), CommandError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        CommandError::Other(format!(
            "cannot connect to {}: {e} (is `snapshotd run` up?)",
            socket.display()
        ))
    })?;
    let (read_half, write_half) = stream.into_split();
    let (flushed_tx, flushed_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let replies = tokio::spawn(async move {
        let mut lines = BufReader::new(read_half).lines();
        let mut tally = ReplyTally::default();
        let mut flushed = Some(flushed_tx);
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(error) => {
                    tally.broken = Some(error.to_string());
                    break;
                }
            };
            tally.replies += 1;
            let reply: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let is_flush = reply["op"] == "flush";
            if reply["ok"] == true {
                if is_flush && let Some(tx) = flushed.take() {
                    let _ = tx.send(Ok(()));
                }
                continue;
            }
            if is_flush {
                if let Some(tx) = flushed.take() {
                    let _ = tx.send(Err(reply["error"]
                        .as_str()
                        .unwrap_or("flush failed")
                        .to_string()));
                }
                continue;
            }
            tally.rejected += 1;
            match (reply["frame"].as_u64(), reply["error"].as_str()) {
                (Some(frame), Some(error)) => eprintln!("frame {frame}: {error}"),
                _ => eprintln!("{line}"),
            }
        }
        tally
    });

    let started = std::time::Instant::now();
    let mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match input {
        Some(path) if path != std::path::Path::new("-") => Box::new(
            tokio::fs::File::open(path)
                .await
                .map_err(|e| CommandError::Other(format!("cannot read {}: {e}", path.display())))?,
        ),
        _ => Box::new(tokio::io::stdin()),
    };
    let mut out = BufWriter::with_capacity(256 * 1024, write_half);
    // Paced, each write is a few dozen frames and goes out at once.
    let mut buffer = vec![
        0u8;
        if rate.is_some() {
            16 * 1024
        } else {
            256 * 1024
        }
    ];
    let (mut frames, mut bytes, mut last) = (0u64, 0u64, b'\n');
    let write_error = |e: std::io::Error| {
        CommandError::Other(format!("writing to {} failed: {e}", socket.display()))
    };
    loop {
        let n = input
            .read(&mut buffer)
            .await
            .map_err(|e| CommandError::Other(format!("reading the input failed: {e}")))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        last = buffer[n - 1];
        let Some(rate) = rate else {
            frames += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            out.write_all(&buffer[..n]).await.map_err(write_error)?;
            continue;
        };
        // Frame by frame: what is due goes out, then a sleep until the
        // next frame's time (not a chunk at once, which at a low rate
        // would be dozens of frames together).
        let mut from = 0;
        for at in memchr::memchr_iter(b'\n', &buffer[..n]) {
            frames += 1;
            let due = started + std::time::Duration::from_secs_f64(frames as f64 / rate as f64);
            if due > std::time::Instant::now() + std::time::Duration::from_millis(1) {
                out.write_all(&buffer[from..=at])
                    .await
                    .map_err(write_error)?;
                out.flush().await.map_err(write_error)?;
                from = at + 1;
                tokio::time::sleep_until(due.into()).await;
            }
        }
        out.write_all(&buffer[from..n]).await.map_err(write_error)?;
    }
    if last != b'\n' {
        out.write_all(b"\n").await.map_err(write_error)?;
        frames += 1;
    }
    if flush {
        out.write_all(b"{\"op\":\"flush\"}\n")
            .await
            .map_err(write_error)?;
    }
    out.flush().await.map_err(write_error)?;
    let mut flush_error = None;
    if flush {
        match flushed_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => flush_error = Some(error),
            Err(_) => {
                flush_error =
                    Some("the daemon closed the connection before the flush finished".into())
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    out.into_inner().shutdown().await.map_err(write_error)?;
    let tally = replies.await.unwrap_or_default();
    let rejected = tally.rejected;
    eprintln!(
        "sent {frames} frames ({bytes} bytes) in {elapsed:.3} s: {:.0} frames/s{}; {} replies read, {rejected} rejected{}",
        frames as f64 / elapsed.max(1e-9),
        if flush { ", flushed" } else { "" },
        tally.replies,
        match &tally.broken {
            Some(error) =>
                format!(" (at least: the connection broke before every reply was read: {error})"),
            None => String::new(),
        }
    );
    if let Some(error) = flush_error {
        return Err(CommandError::Other(format!("flush failed: {error}")));
    }
    if rejected > 0 {
        return Err(CommandError::Other(format!(
            "{rejected} of {frames} frames were rejected"
        )));
    }
    Ok(())
}

mod status;
pub use status::status;

mod backfill;
pub use backfill::{BackfillOptions, BackfillSummary, backfill, fold_history};

mod replay;
pub use replay::{ReplayOptions, verify_replay};
