//! Producers that misbehave: one that never reads its replies, floods of
//! valid commands, more entities than `policy.max_active_entities`. None of
//! them may hurt the other producers, lose a snapshot, or balloon memory.

use crate::helpers::{Backend, Daemon, eventually, write_lines};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn event(seq: i64, workflow: &str) -> Vec<u8> {
    json!({
        "event_id": format!("E{seq:025}"), "event_type": "context.updated",
        "timestamp": "2026-11-26T03:59:48.120000+00:00", "sequence": seq,
        "entity_type": "workflow", "entity_id": workflow, "workflow_id": workflow,
        "version": seq, "data": {"context": {"seq": seq}}, "metadata": {}, "schema_version": 1,
    })
    .to_string()
    .into_bytes()
}

/// Connect and write `count` pings from a thread, never reading a reply;
/// the connection stays open as long as the returned stream lives.
fn deaf_producer(daemon: &Daemon, count: usize) -> UnixStream {
    let deaf = UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = deaf.try_clone().unwrap();
    std::thread::spawn(move || {
        let pings = "{\"op\":\"ping\"}\n".repeat(count);
        // Blocks once the daemon stops reading; fails once it hangs up.
        let _ = writer.write_all(pings.as_bytes());
    });
    deaf
}

fn stats(daemon: &Daemon) -> Value {
    daemon.command(json!({"op": "stats"}))["stats"].clone()
}

/// A budget small enough that 10,000 unread pings exhaust it.
const SMALL_REPLY_BUDGET: &str = "[socket]\nreply_buffer_bytes = 16384\n";

#[test]
fn a_producer_that_never_reads_stalls_only_itself_and_is_disconnected() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        &format!("{SMALL_REPLY_BUDGET}reply_timeout_secs = 3\n[policy]\nevent_interval = 5\n"),
    );
    // Its replies (about 350 KB) overflow the budget and the socket: the
    // daemon stops reading it.
    let mut deaf = deaf_producer(&daemon, 10_000);

    // Meanwhile a normal producer is served at once.
    let mut frames: Vec<Vec<u8>> = (1..=10).map(|seq| event(seq, "normal")).collect();
    frames.push(br#"{"op":"flush"}"#.to_vec());
    let replies = daemon.converse(&frames);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    let got =
        daemon.command(json!({"op": "get", "entity_type": "workflow", "entity_id": "normal"}));
    assert_eq!(got["snapshot"]["version"], 10, "{got}");

    // After the reply timeout, the deaf producer is disconnected by name.
    eventually(30, "the deaf producer to be disconnected", || {
        (stats(&daemon)["connections_unread"] == 1).then_some(())
    });
    eventually(10, "writes to the closed connection to fail", || {
        deaf.write_all(b"{\"op\":\"ping\"}\n")
            .is_err()
            .then_some(())
    });
    let log = daemon.log();
    assert!(
        log.contains("Producer read none of its replies in time; closing its connection.")
            && log.contains("connection="),
        "{log}"
    );
    let stats = stats(&daemon);
    assert_eq!(stats["connections_unread"], 1, "{stats}");
    assert_eq!(daemon.command(json!({"op": "ping"}))["ok"], true);
}

#[tokio::test]
async fn sigterm_with_a_deaf_producer_connected_still_writes_every_shutdown_snapshot() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let grace = 10;
    let mut daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        &format!(
            "{SMALL_REPLY_BUDGET}reply_timeout_secs = 600\n\
             [policy]\nevent_interval = 100000\n[shutdown]\ngrace_secs = {grace}\n"
        ),
    );
    // 300 workflows with events and no snapshot yet.
    let frames: Vec<Vec<u8>> = (0..900)
        .map(|i| event(i + 1, &format!("pending{}", i % 300)))
        .collect();
    assert!(daemon.converse(&frames).is_empty());
    let deaf = deaf_producer(&daemon, 10_000);
    // Let the daemon read until its reply budget is spent.
    std::thread::sleep(Duration::from_secs(1));

    let asked = Instant::now();
    let status = daemon.terminate();
    let took = asked.elapsed();
    assert!(status.success(), "exit {status}:\n{}", daemon.log());
    assert!(
        took < Duration::from_secs(grace),
        "shutdown took {took:?}, more than grace_secs = {grace}:\n{}",
        daemon.log()
    );
    let store = backend.store().await;
    for w in 0..300 {
        let key = snapshotd::model::EntityKey::new(
            snapshotd::model::EntityType::Workflow,
            format!("pending{w}"),
        );
        let snapshot = store
            .latest(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("pending{w} has no shutdown snapshot"));
        assert_eq!(snapshot.version, 3, "pending{w}");
    }
    drop(deaf);
}

#[tokio::test]
async fn a_shutdown_that_cannot_commit_exits_non_zero_and_counts_what_it_left() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 100000\n[writer]\nretry_max_secs = 1\n\
         [shutdown]\ngrace_secs = 3\n",
    );
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|i| event(i + 1, &format!("stuck{}", i % 20)))
        .collect();
    assert!(daemon.converse(&frames).is_empty());
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    db.set_reachable(false).await;
    let status = daemon.terminate();
    db.set_reachable(true).await;
    assert!(
        !status.success(),
        "exit 0 though nothing could be committed"
    );
    let log = daemon.log();
    assert!(
        log.contains("20 entities were left without their final snapshot"),
        "{log}"
    );
}

/// Write `lines` while reading replies on another thread; the replies.
fn pipeline(daemon: &Daemon, lines: Vec<String>) -> Vec<Value> {
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut writer);
        for line in lines {
            out.write_all(line.as_bytes()).unwrap();
            out.write_all(b"\n").unwrap();
        }
        out.flush().unwrap();
        drop(out);
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let replies = BufReader::new(stream)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read a reply")).expect("JSON"))
        .collect();
    sender.join().unwrap();
    replies
}

#[test]
fn floods_of_get_and_snapshot_commands_cost_what_their_answers_cost() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &backend.url(), "[policy]\nevent_interval = 5\n");
    let mut frames: Vec<Vec<u8>> = (1..=5).map(|seq| event(seq, "known")).collect();
    frames.push(br#"{"op":"flush"}"#.to_vec());
    assert_eq!(daemon.converse(&frames).len(), 1);

    // 200,000 pipelined `get`s through `snapshotd send`, which reads them all.
    let get = json!({"op": "get", "entity_type": "workflow", "entity_id": "known"}).to_string();
    let file = write_lines(dir.path(), "gets.ndjson", std::iter::repeat_n(get, 200_000));
    let out = daemon.send_file(&file, true);
    let summary = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{summary}\n{}", daemon.log());
    assert!(
        summary.contains("200001 replies read, 0 rejected"),
        "{summary}"
    );
    let after_gets = daemon.peak_rss_mib();

    // 200,000 `snapshot`s of ids nothing has ever heard of.
    let unknown: Vec<String> = (0..200_000)
        .map(|i| {
            json!({"op": "snapshot", "entity_type": "workflow", "entity_id": format!("nobody{i}")})
                .to_string()
        })
        .collect();
    let replies = pipeline(&daemon, unknown);
    assert_eq!(replies.len(), 200_000);
    let refused = replies
        .iter()
        .filter(|r| {
            r["ok"] == false
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("unknown entity workflow/nobody"))
        })
        .count();
    assert_eq!(refused, 200_000, "{:?}", &replies[..3]);
    let stats = stats(&daemon);
    // Only `known` may have an actor: no unknown id started one.
    assert!(stats["active_entities"].as_i64().unwrap() <= 1, "{stats}");
    let peak = daemon.peak_rss_mib();
    eprintln!(
        "peak RSS: {after_gets} MiB after 200,000 gets, {peak} MiB after 200,000 unknown snapshots"
    );
    assert!(peak < 300, "peak RSS {peak} MiB");
}

#[test]
fn no_more_actors_than_max_active_entities_and_nothing_lost_by_passivating() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 3\nmax_active_entities = 10\n",
    );
    // Two rounds over 50 workflows; the second finds the first's actors
    // passivated and must carry on from their snapshots.
    let mut seq = 0;
    for round in 0..2 {
        let mut frames = Vec::new();
        for w in 0..50 {
            for _ in 0..2 {
                seq += 1;
                frames.push(event(seq, &format!("lru{w}")));
            }
        }
        frames.push(br#"{"op":"flush"}"#.to_vec());
        let replies = daemon.converse(&frames);
        assert_eq!(replies.len(), 1, "round {round}: {replies:?}");
        assert_eq!(replies[0]["ok"], true, "round {round}: {replies:?}");
        let stats = stats(&daemon);
        assert!(
            stats["active_entities"].as_i64().unwrap() <= 10,
            "round {round}: {stats}"
        );
    }
    let stats = stats(&daemon);
    assert!(
        stats["passivations_for_room"].as_u64().unwrap() >= 80,
        "{stats}"
    );
    for w in 0..50 {
        let id = format!("lru{w}");
        // Passivated ones were snapshotted on the way out; the ten still
        // running take theirs now.
        let taken =
            daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": &id}));
        assert_eq!(taken["ok"], true, "{id}: {taken}");
        let got = daemon.command(json!({"op": "get", "entity_type": "workflow", "entity_id": &id}));
        assert_eq!(got["snapshot"]["version"], 4, "{id}: {got}");
        assert_eq!(
            got["snapshot"]["state"]["context"]["seq"],
            100 + 2 * w as i64 + 2,
            "{id}: {got}"
        );
    }
}

#[tokio::test]
async fn a_hundred_thousand_idle_entities_are_all_snapshotted_and_passivated() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 100\nidle_timeout_secs = 2\n",
    );
    let n = 100_000;
    let lines = (0..n).map(|i| String::from_utf8(event(i + 1, &format!("idle{i}"))).unwrap());
    let file = write_lines(dir.path(), "idle.ndjson", lines);
    let out = daemon.send_file(&file, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = daemon.rss_mib();
    // Touched once, then idle: every actor snapshots and stops.
    eventually(
        180,
        "every entity to be passivated and its snapshot committed",
        || {
            let stats = stats(&daemon);
            (stats["active_entities"] == 0 && stats["writer_pending"] == 0).then_some(())
        },
    );
    let idle = daemon.rss_mib();
    eprintln!(
        "RSS: {loaded} MiB with {n} entities active (peak {} MiB), {idle} MiB once all passivated",
        daemon.peak_rss_mib()
    );
    let Backend::Sqlite(file) = &backend else {
        unreachable!()
    };
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&file.url()).await.unwrap();
    // The last snapshots may be between an actor and the writer still.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (rows, entities): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT entity_id) FROM snapshots WHERE version = 1",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if (rows, entities) == (n, n) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rows} snapshots of {entities} entities, wanted {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The bound holds under a burst of new entities: with
/// `max_active_entities` 1,000, 20,000 workflows streamed at once leave at
/// most 1,000 actors alive, the rest passivated early with their snapshot,
/// and SIGTERM snapshots what is left, so every one of them ends with its
/// snapshot.
async fn a_burst_of_entities_stays_within_the_bound(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 100\nmax_active_entities = 1000\n",
    );
    let n = 20_000;
    let lines = (0..n).map(|i| String::from_utf8(event(i + 1, &format!("burst{i}"))).unwrap());
    let file = write_lines(dir.path(), "burst.ndjson", lines);
    let out = daemon.send_file(&file, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = stats(&daemon);
    assert!(
        stats["active_entities"].as_i64().unwrap() <= 1000,
        "{stats}"
    );
    assert!(
        stats["passivations_for_room"].as_i64().unwrap() >= n - 1000,
        "{stats}"
    );
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    let store = backend.store().await;
    let mut missing = Vec::new();
    for i in 0..n {
        let key = snapshotd::model::EntityKey::new(
            snapshotd::model::EntityType::Workflow,
            format!("burst{i}"),
        );
        match store.latest(&key).await.unwrap() {
            Some(snapshot) if snapshot.version == 1 => {}
            other => missing.push((i, other.map(|s| s.version))),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {n} without their snapshot, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test]
async fn a_burst_of_entities_stays_within_the_bound_on_sqlite() {
    a_burst_of_entities_stays_within_the_bound(Backend::sqlite()).await;
}

#[tokio::test]
async fn a_burst_of_entities_stays_within_the_bound_on_postgres() {
    a_burst_of_entities_stays_within_the_bound(Backend::postgres().await).await;
}
