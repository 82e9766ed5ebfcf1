//! The acceptance test: workflows made by stabilize itself, streamed to the
//! real daemon (in order, then duplicated and shuffled, then across a
//! crash), and every snapshot row checked by stabilize: `Snapshot.from_dict`
//! accepts it and its state equals `EventReplayer.rebuild_workflow_state`
//! up to its sequence.

use crate::helpers::{Backend, Daemon, run_python, spawn_python, wait_for_received};
use snapshotd::model::canonical::shortest_digits;
use std::path::Path;

/// Small thresholds so every workflow gets several snapshots; keep them all,
/// and commit each on its own so none is superseded before it is written.
const POLICY: &str = "[policy]\nevent_interval = 5\nkeep_snapshots = 0\ntime_interval_secs = 3600\n[writer]\nbatch_size = 1\n";

/// The same, with the writer batching as in production (snapshots of one
/// workflow supersede each other while they wait).
const BATCHED: &str =
    "[policy]\nevent_interval = 5\nkeep_snapshots = 0\ntime_interval_secs = 3600\n";

fn generate(backend: &Backend, dir: &Path, workflows: u32, disorder: bool) -> std::path::PathBuf {
    generate_with(backend, dir, workflows, disorder, &[])
}

pub(crate) fn generate_with(
    backend: &Backend,
    dir: &Path,
    workflows: u32,
    disorder: bool,
    extra: &[&str],
) -> std::path::PathBuf {
    let out = dir.join(if disorder {
        "disorder.ndjson"
    } else {
        "events.ndjson"
    });
    let mut args = backend.python_args();
    args.extend([
        "--workflows".into(),
        workflows.to_string(),
        "--seed".into(),
        "7".into(),
        "--out".into(),
        out.display().to_string(),
    ]);
    if disorder {
        args.push("--disorder".into());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    run_python(
        "gen_workflows.py",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    out
}

/// Every row passes stabilize's checks; at least `min_rows` rows.
pub(crate) fn verify(backend: &Backend, min_rows: usize) -> serde_json::Value {
    let mut args = backend.python_args();
    args.extend(["--min-rows".into(), min_rows.to_string()]);
    let out = run_python(
        "verify_snapshots.py",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("summary JSON");
    assert_eq!(summary["failures"], 0, "{summary}");
    summary
}

fn stream(daemon: &Daemon, file: &Path) {
    let out = daemon.send_file(file, true);
    assert!(
        out.status.success(),
        "send failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
}

/// `events` split in two files: the first line of each workflow, and the
/// others, each in the order it had.
fn first_line_of_each_workflow(events: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = std::fs::read_to_string(events).unwrap();
    let mut seen = std::collections::HashSet::new();
    let (mut first, mut rest) = (String::new(), String::new());
    for line in text.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let workflow = event["workflow_id"]
            .as_str()
            .expect("a workflow id")
            .to_string();
        let out = if seen.insert(workflow) {
            &mut first
        } else {
            &mut rest
        };
        out.push_str(line);
        out.push('\n');
    }
    let (first_path, rest_path) = (
        events.with_extension("first"),
        events.with_extension("rest"),
    );
    std::fs::write(&first_path, first).unwrap();
    std::fs::write(&rest_path, rest).unwrap();
    (first_path, rest_path)
}

async fn cross_check(backend: Backend, disorder: bool) {
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&backend, dir.path(), 300, disorder);
    let config = if disorder {
        // The connection's reorder window off, so that each entity gets its
        // events in the file's order.
        format!("{POLICY}[socket]\nreorder_window = 0\n")
    } else {
        POLICY.to_string()
    };
    let daemon = Daemon::start(dir.path(), &backend.url(), &config);
    if disorder {
        // Each workflow's first line first, then (once every entity has
        // loaded its history and folded it) the rest. Streamed at once, the
        // rest would wait while the entities load, and a loaded entity
        // folds the table's events in order up to the newest one waiting:
        // how many late events the ledger ever sees, and so whether a
        // window is re-folded in memory, would depend on how loaded the
        // machine is (a parallel `cargo test` once saw none).
        let (first, rest) = first_line_of_each_workflow(&events);
        stream(&daemon, &first);
        stream(&daemon, &rest);
    } else {
        stream(&daemon, &events);
    }
    // 300 workflows of 9-49 events at 5 events a snapshot: at least one row
    // each. How many more depends on timing, not on correctness: an actor
    // hydrating from the events table folds every event already waiting for
    // it at once (in-order runs here have given from 535 to 1292 rows), and
    // under disorder late events fold into fewer, larger windows.
    let min_rows = 300;
    let summary = verify(&backend, min_rows);
    assert!(
        summary["rows"].as_u64().unwrap() >= min_rows as u64,
        "{summary}"
    );
    if disorder {
        // Windows re-folded from the events kept in memory are among the
        // rows stabilize just verified.
        let stats = daemon.command(serde_json::json!({"op": "stats"}));
        assert!(
            stats["stats"]["refolds_in_memory"].as_u64() > Some(0),
            "the in-memory re-fold was exercised: {stats}"
        );
    }
}

#[tokio::test]
async fn every_snapshot_equals_stabilizes_replay_on_postgres() {
    // The table is ours (`snapshotd migrate`, before stabilize creates its
    // own): its states are lz4-compressed, and stabilize reads them as ever.
    let backend = Backend::postgres().await;
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["migrate", "--database-url", &backend.url()])
        .output()
        .unwrap();
    assert!(migrate.status.success(), "{migrate:?}");
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let compression: String = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute \
         WHERE attrelid = 'snapshots'::regclass AND attname = 'state'",
    )
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    assert_eq!(
        compression, "l",
        "migrate creates the state column with lz4"
    );
    cross_check(backend, false).await;
}

#[tokio::test]
async fn every_snapshot_equals_stabilizes_replay_on_postgres_under_duplicates_and_disorder() {
    cross_check(Backend::postgres().await, true).await;
}

#[tokio::test]
async fn every_snapshot_equals_stabilizes_replay_on_sqlite() {
    cross_check(Backend::sqlite(), false).await;
}

#[tokio::test]
async fn every_snapshot_equals_stabilizes_replay_on_sqlite_under_duplicates_and_disorder() {
    cross_check(Backend::sqlite(), true).await;
}

/// Payloads full of floats whose shortest repr is a tie (CPython keeps the
/// even last digit), also as `retry_count`s a later retry adds one to.
async fn tie_floats(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let events = generate_with(&backend, dir.path(), 150, false, &["--tie-floats"]);
    let text = std::fs::read_to_string(&events).unwrap();
    let corrected = text
        .lines()
        .map(|line| count_corrected_ties(&serde_json::from_str(line).unwrap()))
        .sum::<usize>();
    assert!(
        corrected >= 100,
        "only {corrected} floats whose tie Rust's own digits get wrong"
    );
    let daemon = Daemon::start(dir.path(), &backend.url(), POLICY);
    stream(&daemon, &events);
    // At least one row per workflow (see `cross_check` on how many more).
    let summary = verify(&backend, 150);
    assert!(summary["rows"].as_u64().unwrap() >= 150, "{summary}");
}

/// Floats in `value` whose CPython digits differ from Rust's own `{:e}`.
fn count_corrected_ties(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.as_str().contains('.') => {
            let x: f64 = n.as_str().parse().unwrap();
            let rust = format!("{:e}", x.abs());
            let rust_digits = rust.split('e').next().unwrap().replace('.', "");
            usize::from(shortest_digits(x.abs()).0 != rust_digits)
        }
        Value::Array(items) => items.iter().map(count_corrected_ties).sum(),
        Value::Object(map) => map.values().map(count_corrected_ties).sum(),
        _ => 0,
    }
}

#[tokio::test]
async fn floats_whose_repr_is_a_tie_give_exact_snapshots_on_postgres() {
    tie_floats(Backend::postgres().await).await;
}

#[tokio::test]
async fn floats_whose_repr_is_a_tie_give_exact_snapshots_on_sqlite() {
    tie_floats(Backend::sqlite()).await;
}

#[tokio::test]
async fn a_crash_mid_stream_and_a_full_resend_still_give_exact_snapshots() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&backend, dir.path(), 200, true);
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let half = dir.path().join("half.ndjson");
    std::fs::write(&half, lines[..lines.len() / 2].join("\n")).unwrap();

    let mut daemon = Daemon::start(dir.path(), &backend.url(), BATCHED);
    let out = daemon.send_file(&half, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.kill();
    daemon.restart();
    stream(&daemon, &events);
    verify(&backend, 200);
}

/// Live: a stabilize application records workflows through its own event
/// sourcing, with the example forwarder on its bus; the daemon was started
/// before stabilize created its tables, so it must find the events table
/// when it appears.
async fn forwarded_live(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &backend.url(), POLICY);
    let mut args = backend.python_args();
    args.extend([
        "--socket".into(),
        daemon.socket.display().to_string(),
        "--workflows".into(),
        "100".into(),
        "--seed".into(),
        "3".into(),
    ]);
    let out = run_python(
        "forward_workflows.py",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["dropped"], 0, "{summary}");
    // At least one row per workflow (see `cross_check` on how many more:
    // the writer also keeps only an entity's newest snapshot while one of
    // its rows is being committed).
    verify(&backend, 100);
    assert!(
        daemon.log().contains("Found stabilize's events table"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn events_forwarded_live_from_stabilizes_bus_give_exact_snapshots_on_postgres() {
    forwarded_live(Backend::postgres().await).await;
}

#[tokio::test]
async fn events_forwarded_live_from_stabilizes_bus_give_exact_snapshots_on_sqlite() {
    forwarded_live(Backend::sqlite()).await;
}

/// Socket only, no shared database: stabilize keeps its events in its own
/// SQLite file, the daemon its snapshots in another. The forwarder's
/// flushes are durable (`"snapshot": true`), so a `kill -9` of the daemon
/// mid-stream loses nothing: what was not yet confirmed is sent again.
#[tokio::test]
async fn a_durable_forwarder_loses_nothing_to_kill_9_without_a_shared_database() {
    use sqlx::Connection;
    let stabilize = Backend::sqlite();
    let daemon_db = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &daemon_db.url(), BATCHED);
    let mut args = stabilize.python_args();
    args.extend([
        "--socket".into(),
        daemon.socket.display().to_string(),
        "--workflows".into(),
        "300".into(),
        "--seed".into(),
        "5".into(),
        "--threads".into(),
        "1".into(),
        "--publish-delay".into(),
        "0".into(),
        "--durable".into(),
    ]);
    let run = spawn_python("forward_workflows.py", &args);
    // Crash the daemon once it has taken part of the stream.
    wait_for_received(&daemon, 1500);
    daemon.kill();
    daemon.restart();
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["dropped"], 0, "{summary}");
    assert!(
        daemon.log().contains("Listening"),
        "the daemon did not come back"
    );

    // Check the daemon's rows against stabilize's own events: copy them
    // beside the events table and run stabilize's verifier there.
    let Backend::Sqlite(file) = &daemon_db else {
        unreachable!()
    };
    let Backend::Sqlite(events_file) = &stabilize else {
        unreachable!()
    };
    let mut conn = sqlx::SqliteConnection::connect(&events_file.url())
        .await
        .unwrap();
    for sql in [
        format!("ATTACH DATABASE '{}' AS d", file.path.display()),
        "DELETE FROM snapshots".to_string(),
        "INSERT INTO snapshots (entity_type, entity_id, workflow_id, version, sequence, state, \
         state_hash, created_at) SELECT entity_type, entity_id, workflow_id, version, sequence, \
         state, state_hash, created_at FROM d.snapshots"
            .to_string(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    drop(conn);
    // The last durable flush covered every workflow to its last event.
    for (workflow, events, version) in stabilize.coverage().await {
        assert_eq!(events, version, "{workflow}");
    }
    verify(&stabilize, 300);
}
