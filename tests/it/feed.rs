//! The table feed: stabilize's own `events` table as the daemon's durable
//! feed, with no forwarder at all; late commits; catch-up after `kill -9`.

use crate::crosscheck::{generate_with, verify};
use crate::helpers::{Backend, Daemon, spawn_python, wait_for_received};
use serde_json::json;

/// Snapshots every 5 events, all kept, the time threshold out of the way.
const POLICY: &str = "[policy]\nevent_interval = 5\nkeep_snapshots = 0\ntime_interval_secs = 3600\n\
     [feed]\npoll_interval_ms = 20\nmax_poll_interval_ms = 200\n";

fn sync(daemon: &Daemon) {
    let reply = daemon.command(json!({"op": "sync"}));
    assert_eq!(reply["ok"], true, "{reply}\n{}", daemon.log());
}

/// Every workflow's latest snapshot is within `slack` events of its newest.
async fn assert_covered(backend: &Backend, slack: i64) {
    let coverage = backend.coverage().await;
    assert!(!coverage.is_empty(), "no events in the table");
    for (workflow, events, version) in coverage {
        assert!(
            events - version <= slack,
            "{workflow}: {events} events, latest snapshot version {version}"
        );
    }
}

/// stabilize records workflows through its own event store; the daemon,
/// started before stabilize created its tables, follows the table alone.
async fn no_forwarder(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &backend.url(), POLICY);
    generate_with(&backend, dir.path(), 120, false, &[]);
    sync(&daemon);
    // Every due snapshot is committed once sync returns.
    assert_covered(&backend, 4).await;
    verify(&backend, 120);
    let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
    assert!(stats["feed_events"].as_u64().unwrap() > 1000, "{stats}");
    assert_eq!(stats["feed_events_behind"], 0, "{stats}");
    assert_eq!(
        stats["events_received"], 0,
        "nothing came through the socket"
    );
    // SIGTERM snapshots the rest: every workflow exactly covered.
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
    assert_covered(&backend, 0).await;
    verify(&backend, 120);
}

#[tokio::test]
async fn workflows_recorded_without_a_forwarder_are_snapshotted_from_the_table_on_postgres() {
    no_forwarder(Backend::postgres().await).await;
}

#[tokio::test]
async fn workflows_recorded_without_a_forwarder_are_snapshotted_from_the_table_on_sqlite() {
    no_forwarder(Backend::sqlite()).await;
}

/// Insert one event of `workflow` the way stabilize's store does (the
/// sequence and `commit_xid` from their defaults).
pub(crate) fn insert_event(workflow: &str, event_id: &str, version: i64, seq_note: i64) -> String {
    format!(
        "INSERT INTO events (event_id, event_type, timestamp, entity_type, entity_id, \
         workflow_id, version, data, correlation_id, schema_version) VALUES \
         ('{event_id}', 'context.updated', now(), 'workflow', '{workflow}', '{workflow}', \
         {version}, '{{\"context\": {{\"step\": {seq_note}}}}}', 'c', 1)"
    )
}

#[tokio::test]
async fn an_event_whose_transaction_commits_late_is_still_folded_first() {
    use sqlx::Connection;
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    // Let stabilize create its tables (with commit_xid), with a little history.
    generate_with(&backend, dir.path(), 5, false, &[]);
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1\nkeep_snapshots = 0\n\
         [feed]\npoll_interval_ms = 20\nmax_poll_interval_ms = 100\n",
    );
    sync(&daemon);
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let workflow = "01LATECOMMIT0000000000000W";
    // The first transaction takes the lower sequence and stays open...
    let mut early = db.connect().await;
    let mut held = early.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(insert_event(
        workflow,
        "01LATECOMMIT0000000000000A",
        1,
        1,
    )))
    .execute(&mut *held)
    .await
    .unwrap();
    // ...while a second one, with a higher sequence, commits first.
    backend
        .execute(&insert_event(workflow, "01LATECOMMIT0000000000000B", 2, 2))
        .await;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Nothing of the workflow may be snapshotted while its first event is unseen.
    let early_get =
        daemon.command(json!({"op": "get", "entity_type": "workflow", "entity_id": workflow}));
    assert_eq!(
        early_get["ok"], false,
        "snapshotted past an uncommitted event: {early_get}"
    );
    held.commit().await.unwrap();
    sync(&daemon);
    let got =
        daemon.command(json!({"op": "get", "entity_type": "workflow", "entity_id": workflow}));
    assert_eq!(got["snapshot"]["version"], 2, "{got}");
    assert_eq!(got["snapshot"]["state"]["context"]["step"], 2, "{got}");
    // The five workflows from before the daemon are history (`backfill`'s).
    verify(&backend, 1);
}

#[tokio::test]
async fn after_kill_9_the_due_snapshots_of_quiet_workflows_are_caught_up() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let config = "[policy]\nevent_interval = 7\ntime_interval_secs = 2\nkeep_snapshots = 0\n\
                  [feed]\npoll_interval_ms = 20\nmax_poll_interval_ms = 200\n";
    let mut daemon = Daemon::start(dir.path(), &backend.url(), config);
    generate_with(&backend, dir.path(), 60, false, &[]);
    sync(&daemon);
    // Crash before the time threshold covers the tails.
    daemon.kill();
    let before = backend.coverage().await;
    assert!(
        before.iter().any(|(_, events, version)| events > version),
        "every workflow was already covered: the crash proves nothing"
    );
    daemon.restart();
    // No new event: the restart alone must bring every workflow up to date.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let coverage = backend.coverage().await;
        if coverage
            .iter()
            .all(|(_, events, version)| events == version)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after the restart, workflows are still uncovered: {:?}\n{}",
            coverage
                .iter()
                .filter(|(_, e, v)| e != v)
                .take(5)
                .collect::<Vec<_>>(),
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    verify(&backend, 60);
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
}

/// The forwarder's buffer overflows while the daemon is down: the events it
/// drops never reach the socket, and the table feed recovers every one.
#[tokio::test]
async fn events_the_forwarder_dropped_while_the_daemon_was_down_are_recovered_from_the_table() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &backend.url(), POLICY);
    let mut args = backend.python_args();
    args.extend(
        [
            "--socket",
            &daemon.socket.display().to_string(),
            "--workflows",
            "200",
            "--seed",
            "9",
            "--threads",
            "1",
            "--max-buffer",
            "20",
            "--allow-drops",
        ]
        .map(String::from),
    );
    let run = spawn_python("forward_workflows.py", &args);
    wait_for_received(&daemon, 300);
    daemon.kill();
    std::thread::sleep(std::time::Duration::from_secs(2));
    daemon.restart();
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(
        summary["dropped"].as_u64().unwrap() > 0,
        "the forwarder dropped nothing: the test proves nothing: {summary}"
    );
    sync(&daemon);
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
    assert_covered(&backend, 0).await;
    verify(&backend, 200);
}
