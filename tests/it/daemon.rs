//! The daemon through its socket: thresholds, bad input, shutdown.

use crate::helpers::{Backend, Daemon, eventually};
use serde_json::{Value, json};

fn event(seq: i64, workflow: &str, event_type: &str, data: Value) -> Vec<u8> {
    json!({
        "event_id": format!("E{seq:025}"), "event_type": event_type,
        "timestamp": "2026-11-26T03:59:48.120000+00:00", "sequence": seq,
        "entity_type": "workflow", "entity_id": workflow, "workflow_id": workflow,
        "version": seq, "data": data, "metadata": {"correlation_id": "c"}, "schema_version": 1,
    })
    .to_string()
    .into_bytes()
}

fn get(daemon: &Daemon, workflow: &str) -> Value {
    daemon.command(json!({"op": "get", "entity_type": "workflow", "entity_id": workflow}))
}

#[test]
fn the_time_threshold_snapshots_a_quiet_entity() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1000\ntime_interval_secs = 1\n",
    );
    let replies = daemon.converse(&[
        event(
            1,
            "quiet",
            "workflow.created",
            json!({"application": "a", "name": "n"}),
        ),
        event(2, "quiet", "workflow.started", json!({"context": {"k": 1}})),
        event(3, "quiet", "context.updated", json!({"context": {"k": 2}})),
    ]);
    assert!(replies.is_empty(), "{replies:?}");
    let snapshot = eventually(20, "the time threshold", || {
        let reply = get(&daemon, "quiet");
        (reply["ok"] == true).then(|| reply["snapshot"].clone())
    });
    assert_eq!(snapshot["version"], 3);
    assert_eq!(snapshot["sequence"], 3);
    assert_eq!(snapshot["state"]["status"], "RUNNING");
    assert_eq!(snapshot["state"]["context"], json!({"k": 2}));
}

#[test]
fn every_kind_of_bad_frame_is_answered_and_the_good_events_all_count() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[socket]\nmax_frame_bytes = 4096\nmax_depth = 16\n[policy]\nevent_interval = 1000\n",
    );
    let oversized = event(
        99,
        "bad",
        "context.updated",
        json!({"context": {"x": "y".repeat(10_000)}}),
    );
    let frames: Vec<Vec<u8>> = vec![
        event(1, "wf", "workflow.created", json!({"application": "a"})), // 1
        b"{not json".to_vec(),                                               // 2
        event(2, "wf", "workflow.started", json!({"context": {"n": 1}})),  // 3
        br#"{"event_type":"x","timestamp":"2026-11-26T00:00:00Z","entity_type":"workflow","entity_id":"w","workflow_id":"w"}"#.to_vec(), // 4 missing sequence
        br#"{"event_type":"x","timestamp":"2026-11-26T00:00:00Z","sequence":"five","entity_type":"workflow","entity_id":"w","workflow_id":"w"}"#.to_vec(), // 5 wrong type
        oversized,                                                           // 6
        b"{\"op\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec(),                   // 7 invalid UTF-8
        format!("{}{}", "[".repeat(40), "]".repeat(40)).into_bytes(),        // 8 too deep
        event(3, "wf", "context.updated", json!({"context": {"s": "a\u{0}b"}})), // 9 U+0000
        br#"{"op":"launch"}"#.to_vec(),                                      // 10
        event(4, "wf", "context.updated", json!({"context": {"n": 2}})),   // 11
        br#"{"op":"flush"}"#.to_vec(),                                       // 12
    ];
    let replies = daemon.converse(&frames);
    let errors: Vec<(u64, String)> = replies
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| {
            (
                r["frame"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        (2, "malformed JSON"),
        (4, "missing field `sequence`"),
        (5, "field `sequence` must be an integer"),
        (6, "longer than max_frame_bytes"),
        (7, "not valid UTF-8"),
        (8, "deeper than 16"),
        (9, "U+0000"),
        (10, "unknown op `launch`"),
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:?}");
    for ((frame, error), (want_frame, want)) in errors.iter().zip(expect) {
        assert_eq!(*frame, want_frame, "{errors:?}");
        assert!(error.contains(want), "frame {frame}: {error}");
    }
    assert!(
        replies
            .iter()
            .any(|r| r["op"] == "flush" && r["ok"] == true),
        "{replies:?}"
    );

    // The good events were all folded: force the snapshot and read it.
    let taken =
        daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": "wf"}));
    assert_eq!(taken["version"], 3, "{taken}");
    let snapshot = &get(&daemon, "wf")["snapshot"];
    assert_eq!(snapshot["state"]["context"], json!({"n": 2}));
    assert_eq!(snapshot["sequence"], 4);
    let stats = &daemon.command(json!({"op": "stats"}))["stats"];
    assert_eq!(stats["events_received"], 3, "{stats}");
    assert_eq!(stats["events_invalid"], 8, "{stats}");
    // The one snapshot taken, from falling due to its commit.
    let latency = &stats["snapshot_latency"];
    assert_eq!(latency["count"], 1, "{stats}");
    assert!(latency["max_ms"].as_f64() > Some(0.0), "{stats}");
    assert!(
        latency["p99_ms"].as_f64() <= latency["max_ms"].as_f64(),
        "{stats}"
    );
    assert_eq!(daemon.command(json!({"op": "ping"}))["ok"], true);
}

#[tokio::test]
async fn sigterm_commits_pending_snapshots_and_removes_the_socket() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1000\n",
    );
    let mut frames = Vec::new();
    for w in 0..20 {
        for s in 0..3 {
            let seq = w * 3 + s + 1;
            frames.push(event(
                seq,
                &format!("wf{w}"),
                "context.updated",
                json!({"context": {"s": s}}),
            ));
        }
    }
    assert!(daemon.converse(&frames).is_empty());
    let status = daemon.terminate();
    assert!(status.success(), "exit {status}:\n{}", daemon.log());
    assert!(!daemon.socket.exists(), "the socket file is still there");
    let store = backend.store().await;
    for w in 0..20 {
        let key = snapshotd::model::EntityKey::new(
            snapshotd::model::EntityType::Workflow,
            format!("wf{w}"),
        );
        let snapshot = store
            .latest(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("wf{w} has no snapshot"));
        assert_eq!(snapshot.version, 3);
    }
}

#[test]
fn the_socket_gets_its_mode_and_a_stale_file_is_replaced() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    // A crash leaves the socket file behind with nobody listening.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("snapshotd.sock")).unwrap();
    drop(stale);
    assert!(dir.path().join("snapshotd.sock").exists());
    // The group by name, resolved through /etc/group: our own primary group.
    let id = |flag: &str| {
        let out = std::process::Command::new("id").arg(flag).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (group, gid) = (id("-gn"), id("-g"));
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        &format!("[socket]\nmode = \"0600\"\ngroup = \"{group}\"\n"),
    );
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.gid().to_string(), gid);
    assert_eq!(daemon.command(json!({"op": "ping"}))["ok"], true);
    // A second daemon on the same socket refuses to start and says why.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["run"])
        .env("SNAPSHOTD_SOCKET__PATH", &daemon.socket)
        .env("SNAPSHOTD_DATABASE__URL", backend.url())
        .env("SNAPSHOTD_METRICS__ADDRESS", "")
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("is in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // An unknown group stops start-up and names it.
    let other = tempfile::tempdir().unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["run"])
        .env("SNAPSHOTD_SOCKET__PATH", other.path().join("s.sock"))
        .env("SNAPSHOTD_SOCKET__GROUP", "no-such-group-here")
        .env("SNAPSHOTD_DATABASE__URL", backend.url())
        .env("SNAPSHOTD_METRICS__ADDRESS", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("group `no-such-group-here`: no such group"),
        "{stderr}"
    );
}

#[test]
fn an_idle_entity_is_passivated_after_its_snapshot_and_comes_back_hydrated() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1000\nidle_timeout_secs = 1\n",
    );
    daemon.converse(&[
        event(1, "idle", "workflow.created", json!({"application": "a"})),
        event(2, "idle", "workflow.started", json!({"context": {"n": 1}})),
    ]);
    eventually(20, "passivation", || {
        let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
        (stats["active_entities"] == 0 && stats["snapshots_written"] == 1).then_some(())
    });
    assert_eq!(get(&daemon, "idle")["snapshot"]["version"], 2);
    // It comes back from its snapshot: a duplicate is dropped, a new event counts.
    daemon.converse(&[
        event(2, "idle", "workflow.started", json!({"context": {"n": 1}})),
        event(3, "idle", "context.updated", json!({"context": {"n": 2}})),
    ]);
    let taken =
        daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": "idle"}));
    assert_eq!(taken["version"], 3, "{taken}");
    let snapshot = &get(&daemon, "idle")["snapshot"];
    assert_eq!(snapshot["state"]["context"], json!({"n": 2}));
    assert_eq!(snapshot["state"]["application"], "a");
    let stats = &daemon.command(json!({"op": "stats"}))["stats"];
    assert_eq!(stats["hydrations"], 1, "{stats}");
    assert_eq!(stats["events_duplicate"], 1, "{stats}");
    assert_eq!(stats["events_late"], 0, "{stats}");
}

/// Workflow `w`: created at 1, then `context.updated` with `k` = its sequence.
fn counted(sequences: &[i64]) -> Vec<Vec<u8>> {
    sequences
        .iter()
        .map(|&seq| match seq {
            1 => event(1, "w", "workflow.created", json!({"application": "a"})),
            _ => event(seq, "w", "context.updated", json!({"context": {"k": seq}})),
        })
        .collect()
}

/// Stream `order` and a flush on one connection; the stats, and the state
/// a forced snapshot takes.
fn shuffled_run(order: &[i64], socket_toml: &str) -> (Value, Value) {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        &format!("[policy]\nevent_interval = 1000\n[socket]\n{socket_toml}"),
    );
    let mut lines = counted(order);
    lines.push(json!({"op": "flush"}).to_string().into_bytes());
    let replies = daemon.converse(&lines);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    let taken =
        daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": "w"}));
    assert_eq!(taken["version"], order.len(), "{taken}");
    let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
    (stats, get(&daemon, "w")["snapshot"]["state"].clone())
}

#[test]
fn events_a_little_late_on_a_connection_are_put_back_in_order_before_folding() {
    let order = [1, 3, 2, 5, 4, 6, 9, 7, 8];
    // Held until the flush (the connection is never quiet long enough).
    let (stats, state) = shuffled_run(&order, "reorder_window = 4\nreorder_wait_ms = 60000\n");
    assert_eq!(stats["events_reordered"], 4, "{stats}");
    assert_eq!(stats["events_late"], 0, "{stats}");
    assert_eq!(stats["refolds_in_memory"], 0, "{stats}");
    assert_eq!(state["context"], json!({"k": 9}));
    // Without the window the four are late; with no events table to settle
    // them against, a socket-only daemon folds them as they came, so the
    // last context written is 8's.
    let (stats, unordered) = shuffled_run(&order, "reorder_window = 0\n");
    assert_eq!(stats["events_reordered"], 4, "{stats}");
    assert_eq!(stats["events_late"], 4, "{stats}");
    assert_eq!(unordered["context"], json!({"k": 8}));
}

#[test]
fn held_events_are_folded_once_their_connection_goes_quiet() {
    use std::io::Write;
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1000\n[socket]\nreorder_window = 64\nreorder_wait_ms = 20\n",
    );
    // The connection stays open and sends nothing more: no command, no end.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    for line in counted(&[1, 3, 2]) {
        stream.write_all(&line).unwrap();
        stream.write_all(b"\n").unwrap();
    }
    let taken = eventually(20, "the held events to be folded", || {
        let reply =
            daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": "w"}));
        (reply["ok"] == true && reply["version"] == 3).then_some(reply)
    });
    assert_eq!(taken["sequence"], 3, "{taken}");
    let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
    assert_eq!(stats["events_late"], 0, "{stats}");
    drop(stream);
}

#[test]
fn a_connection_that_never_goes_quiet_does_not_hold_its_events_until_the_window_fills() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 100000\n[socket]\nreorder_window = 4000\nreorder_wait_ms = 50\n",
    );
    // A steady trickle, an event every 2 ms for up to 4 s: never 50 ms of
    // quiet, and fewer events than the window holds.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let trickle = {
        let done = done.clone();
        std::thread::spawn(move || {
            for seq in 1..=2000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                stream.write_all(&counted(&[seq])[0]).unwrap();
                stream.write_all(b"\n").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            done.store(true, Ordering::Relaxed);
            stream
        })
    };
    let taken = eventually(20, "the trickle's first events to be folded", || {
        let reply =
            daemon.command(json!({"op": "snapshot", "entity_type": "workflow", "entity_id": "w"}));
        (reply["ok"] == true && reply["version"].as_i64() >= Some(1)).then_some(reply)
    });
    assert!(
        !done.swap(true, Ordering::Relaxed),
        "folded only once the trickle had ended: {taken}"
    );
    drop(trickle.join().unwrap());
}

#[tokio::test]
async fn a_store_outage_loses_nothing_and_writing_resumes() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 2\n[writer]\nretry_max_secs = 1\n",
    );
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let frame = |seq: i64| {
        event(
            seq,
            &format!("out{}", seq % 5),
            "context.updated",
            json!({"context": {"seq": seq}}),
        )
    };
    // The entities are known before the outage...
    let mut frames: Vec<Vec<u8>> = (1..=5).map(frame).collect();
    frames.push(br#"{"op":"flush"}"#.to_vec());
    assert_eq!(daemon.converse(&frames).len(), 1);
    // ...then the store goes away (connections cut, new ones refused) while
    // their snapshots fall due.
    db.set_reachable(false).await;
    // A producer sends while the store is gone, then asks for a flush on
    // the same connection: it must be answered once the store is back.
    use std::io::{BufRead, Write};
    let mut producer = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    for seq in 6..=20 {
        producer.write_all(&frame(seq)).unwrap();
        producer.write_all(b"\n").unwrap();
    }
    producer.write_all(b"{\"op\":\"flush\"}\n").unwrap();
    eventually(30, "the writer to notice the outage", || {
        let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
        (stats["store_up"] == false && stats["write_errors"].as_u64() > Some(0)).then_some(())
    });
    assert_eq!(
        daemon.command(json!({"op": "ping"}))["ok"],
        true,
        "the daemon stays up"
    );
    db.set_reachable(true).await;
    producer
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&producer)
        .read_line(&mut line)
        .unwrap();
    let flushed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(flushed["ok"], true, "{flushed}");
    let stats = &daemon.command(json!({"op": "stats"}))["stats"];
    assert_eq!(stats["store_up"], true, "{stats}");
    for w in 0..5 {
        let reply = get(&daemon, &format!("out{w}"));
        assert_eq!(reply["snapshot"]["version"], 4, "out{w}: {reply}");
    }
    assert!(
        daemon.log().contains("Writing snapshots failed"),
        "the outage is logged"
    );
}

#[test]
fn the_merge_reducer_patches_per_entity_and_the_writer_prunes_old_snapshots() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[reducer]\nkind = \"merge\"\n[policy]\nevent_interval = 1\nkeep_snapshots = 2\n[writer]\nbatch_size = 1\n[log]\nformat = \"json\"\n",
    );
    let task = |seq: i64, data: Value| {
        json!({"event_type": "task.updated", "timestamp": "2026-11-26T00:00:00Z", "sequence": seq,
               "entity_type": "task", "entity_id": "t1", "workflow_id": "wf", "data": data})
        .to_string()
        .into_bytes()
    };
    let mut frames = vec![
        task(1, json!({"a": 1, "nested": {"x": 1, "y": 2}})),
        task(2, json!({"nested": {"y": null, "z": [1]}})),
        task(3, json!({"a": null, "b": "two"})),
        task(4, json!({"c": 1e-7})),
    ];
    frames.push(br#"{"op":"flush"}"#.to_vec());
    let replies = daemon.converse(&frames);
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reply = daemon.command(json!({"op": "get", "entity_type": "task", "entity_id": "t1"}));
    let snapshot = &reply["snapshot"];
    assert_eq!(snapshot["version"], 4, "{reply}");
    // On SQLite numbers are kept as Python reads them: 1e-7 is the float 1e-07.
    let expected: Value =
        serde_json::from_str(r#"{"nested": {"x": 1, "z": [1]}, "b": "two", "c": 1e-07}"#).unwrap();
    assert_eq!(snapshot["state"], expected);
    // Only the newest two of the four snapshots are kept.
    let rows = verify(&backend.url());
    assert!(
        String::from_utf8_lossy(&rows.stdout).starts_with("2 snapshot rows verified"),
        "{rows:?}"
    );
    // Logs are JSON lines when asked.
    let log = daemon.log();
    let first = log.lines().next().expect("a log line");
    let parsed: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(parsed["level"], "INFO", "{parsed}");
}

#[test]
fn prometheus_metrics_are_served_on_the_configured_address() {
    use std::io::{Read, Write};
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_metrics(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 2\n[log]\nformat = \"json\"\n",
        "127.0.0.1:0",
    );
    let mut frames = vec![
        event(1, "m", "workflow.created", json!({})),
        event(2, "m", "workflow.started", json!({})),
        b"{oops".to_vec(),
    ];
    frames.push(br#"{"op":"flush"}"#.to_vec());
    daemon.converse(&frames);
    let address = daemon
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "Serving metrics at /metrics.")
        .and_then(|l| l["address"].as_str().map(str::to_string))
        .expect("the metrics address is logged");
    let scrape = |path: &str| {
        let mut http = std::net::TcpStream::connect(&address).unwrap();
        write!(http, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).unwrap();
        text
    };
    let text = scrape("/metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for line in [
        "snapshotd_events_received_total 2",
        "snapshotd_events_invalid_total{kind=\"malformed_json\"} 1",
        "snapshotd_snapshots_written_total 1",
        "snapshotd_store_up 1",
        "snapshotd_active_entities 1",
        "snapshotd_write_latency_seconds_count 1",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(scrape("/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_durable_flush_survives_kill_9_on_the_socket_only_path() {
    // SQLite with no stabilize events table: nothing to recover from.
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 100\n",
    );
    let mut durable: Vec<Vec<u8>> = (1..=7)
        .map(|seq| {
            event(
                seq,
                "durable",
                "context.updated",
                json!({"context": {"n": seq}}),
            )
        })
        .collect();
    durable.push(br#"{"op":"flush","snapshot":true}"#.to_vec());
    let replies = daemon.converse(&durable);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    let mut plain: Vec<Vec<u8>> = (8..=10)
        .map(|seq| {
            event(
                seq,
                "plain",
                "context.updated",
                json!({"context": {"n": seq}}),
            )
        })
        .collect();
    plain.push(br#"{"op":"flush"}"#.to_vec());
    assert_eq!(daemon.converse(&plain)[0]["ok"], true);

    daemon.kill();
    daemon.restart();
    let got = get(&daemon, "durable");
    assert_eq!(got["snapshot"]["version"], 7, "{got}");
    assert_eq!(got["snapshot"]["state"]["context"]["n"], 7, "{got}");
    // A plain flush promised folding, not a snapshot: lost with the process.
    assert_eq!(get(&daemon, "plain")["ok"], false);
    // A bad value is refused by name.
    let refused = daemon.command(json!({"op": "flush", "snapshot": "yes"}));
    assert!(
        refused["error"].as_str().unwrap().contains("snapshot"),
        "{refused}"
    );
}

#[test]
fn a_state_over_max_state_bytes_is_not_written_and_is_retried_at_the_next_threshold() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 5\nmax_state_bytes = 600\n",
    );
    let big = "x".repeat(200);
    let events = |workflow: &str, from: i64, to: i64, note: &str| -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = (from..=to)
            .map(|seq| {
                event(
                    seq,
                    workflow,
                    "context.updated",
                    json!({"context": {format!("k{seq}"): note}}),
                )
            })
            .collect();
        frames.push(br#"{"op":"flush"}"#.to_vec());
        frames
    };
    // A small state is written; a large one is not.
    assert_eq!(daemon.converse(&events("small", 1, 5, "s"))[0]["ok"], true);
    assert_eq!(
        daemon.converse(&events("large", 6, 10, &big))[0]["ok"],
        true
    );
    assert_eq!(get(&daemon, "small")["snapshot"]["version"], 5);
    assert_eq!(get(&daemon, "large")["ok"], false);
    let stats = &daemon.command(json!({"op": "stats"}))["stats"];
    assert_eq!(stats["snapshots_too_large"], 1, "{stats}");
    let log = daemon.log();
    assert!(
        log.contains("larger than policy.max_state_bytes") && log.contains("workflow/large"),
        "{log}"
    );
    // It keeps folding and is tried again one interval later, not at every event.
    assert_eq!(
        daemon.converse(&events("large", 11, 14, "y"))[0]["ok"],
        true
    );
    assert_eq!(
        daemon.command(json!({"op": "stats"}))["stats"]["snapshots_too_large"],
        1
    );
    assert_eq!(
        daemon.converse(&events("large", 15, 15, "y"))[0]["ok"],
        true
    );
    assert_eq!(
        daemon.command(json!({"op": "stats"}))["stats"]["snapshots_too_large"],
        2
    );
}

#[test]
fn an_unsafe_socket_directory_or_a_file_in_the_sockets_place_stops_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::sqlite();
    let start = |socket: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
            .args(["run"])
            .env("SNAPSHOTD_SOCKET__PATH", socket)
            .env("SNAPSHOTD_DATABASE__URL", backend.url())
            .env("SNAPSHOTD_METRICS__ADDRESS", "")
            .output()
            .unwrap()
    };
    // Writable by everyone, no sticky bit: anyone could swap the socket.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = start(&open.path().join("s.sock"));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        error.contains("writable by others without the sticky bit") && error.contains("777"),
        "{error}"
    );
    assert_eq!(error.trim().lines().count(), 1, "one clear line: {error}");
    // A regular file where the socket should be is not replaced.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.sock");
    std::fs::write(&file, "precious").unwrap();
    let out = start(&file);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(error.contains("exists and is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    // With the sticky bit (like /tmp) it starts.
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let daemon = Daemon::start(open.path(), &backend.url(), "");
    assert_eq!(daemon.command(json!({"op": "ping"}))["ok"], true);
}

/// An entity's first row is written without a prune; once it has a row, a
/// revived entity's next one still prunes down to `keep_snapshots`.
async fn first_rows_skip_the_prune_and_later_ones_do_not(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[reducer]\nkind = \"merge\"\n[policy]\nevent_interval = 1\nkeep_snapshots = 1\nmax_active_entities = 1\n[writer]\nbatch_size = 1\n",
    );
    // With one active entity, each event passivates the one before: every
    // entity is revived from its stored row seven times, and the flush
    // comes while the last ones may still wait behind a stopping actor.
    let ids = ["a", "b", "c", "d"];
    let mut frames: Vec<Vec<u8>> = (1..=32)
        .map(|seq| task_update(seq, ids[(seq as usize - 1) % ids.len()]))
        .collect();
    frames.push(br#"{"op":"flush"}"#.to_vec());
    assert_eq!(daemon.converse(&frames).len(), 1);
    for id in ids {
        let reply = daemon.command(json!({"op": "get", "entity_type": "task", "entity_id": id}));
        assert_eq!(reply["snapshot"]["version"], 8, "{reply}\n{}", daemon.log());
    }
    let rows = verify(&backend.url());
    assert!(
        String::from_utf8_lossy(&rows.stdout).starts_with("4 snapshot rows verified"),
        "one row per entity is kept: {rows:?}"
    );
}

#[tokio::test]
async fn first_rows_skip_the_prune_on_sqlite() {
    first_rows_skip_the_prune_and_later_ones_do_not(Backend::sqlite()).await;
}

#[tokio::test]
async fn first_rows_skip_the_prune_on_postgres() {
    first_rows_skip_the_prune_and_later_ones_do_not(Backend::postgres().await).await;
}

/// `snapshotd verify` of the database at `url`.
fn verify(url: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["verify", "--database-url", url])
        .output()
        .unwrap()
}

/// A merge-reducer event of task `id` in workflow `wf`, setting `seq`.
fn task_update(seq: i64, id: &str) -> Vec<u8> {
    json!({"event_type": "task.updated", "timestamp": "2026-11-26T00:00:00Z", "sequence": seq,
           "entity_type": "task", "entity_id": id, "workflow_id": "wf", "data": {"seq": seq}})
    .to_string()
    .into_bytes()
}

/// A daemon snapshotting every merge-reducer event, each in a batch of its
/// own, over two writer connections.
fn snapshot_per_event_two_writers(dir: &std::path::Path, backend: &Backend) -> Daemon {
    Daemon::start(
        dir,
        &backend.url(),
        "[reducer]\nkind = \"merge\"\n[policy]\nevent_interval = 1\n[writer]\nbatch_size = 1\nbatch_delay_ms = 0\nconnections = 2\n",
    )
}

/// Two batches commit at once: while one waits on a lock held by another
/// transaction, the snapshot of another entity is committed on the writer's
/// second connection; the first is committed once the lock goes.
#[tokio::test]
async fn a_slow_commit_does_not_hold_up_the_next_batch() {
    use sqlx::Connection;
    use std::time::{Duration, Instant};
    let backend = Backend::postgres().await;
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = snapshot_per_event_two_writers(dir.path(), &backend);
    // Another transaction inserts the row `slow` is about to get, and holds
    // it: the writer's insert waits on the unique index until it ends.
    let mut blocker = db.connect().await;
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO snapshots (entity_type, entity_id, workflow_id, version, sequence, state, state_hash, created_at) \
         VALUES ('task', 'slow', 'wf', 1, 1, '{}', 'x', now())",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    assert!(daemon.converse(&[task_update(1, "slow")]).is_empty());
    let mut watcher = db.connect().await;
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%INSERT INTO snapshots%'";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(waiting)
            .fetch_one(&mut watcher)
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writer's insert of `slow` never waited on the lock:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `fast` is committed meanwhile.
    assert!(daemon.converse(&[task_update(2, "fast")]).is_empty());
    let store = backend.store().await;
    let key = |id: &str| {
        snapshotd::model::EntityKey::new(snapshotd::model::EntityType::Task, id.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.latest(&key("fast")).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "`fast` waited behind `slow`:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n: i64 = sqlx::query_scalar(waiting)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
    assert_eq!(n, 1, "`slow` is still waiting");
    // The lock goes: `slow` is committed, with the daemon's state.
    tx.rollback().await.unwrap();
    let flushed = daemon.converse(&[br#"{"op":"flush"}"#.to_vec()]);
    assert_eq!(flushed[0]["ok"], true, "{flushed:?}");
    let slow = store
        .latest(&key("slow"))
        .await
        .unwrap()
        .expect("`slow` is stored");
    assert_eq!((slow.version, slow.state.clone()), (1, json!({"seq": 1})));
}

/// A flush waits for the snapshot that replaced the one it was waiting for.
/// An entity's first row is being committed (held by a lock), its second
/// waits behind it, a flush comes, then a third replaces the second: when
/// the first is committed, the flush is still not answered, until the
/// third is.
#[tokio::test]
async fn a_flush_waits_for_the_snapshot_that_replaced_its_own() {
    use std::io::{BufRead, Write};
    use std::time::{Duration, Instant};
    let backend = Backend::postgres().await;
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = snapshot_per_event_two_writers(dir.path(), &backend);
    let task = |seq: i64| {
        let mut line = task_update(seq, "x");
        line.push(b'\n');
        line
    };
    // Versions 1 and 3 of `x` wait on rows other transactions hold.
    async fn hold(db: &crate::helpers::TestDb, version: i32) -> sqlx::PgConnection {
        let mut conn = db.connect().await;
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(
            "INSERT INTO snapshots (entity_type, entity_id, workflow_id, version, sequence, state, state_hash, created_at) \
             VALUES ('task', 'x', 'wf', $1, 0, '{}', 'x', now())",
        )
        .bind(version)
        .execute(&mut conn)
        .await
        .unwrap();
        conn
    }
    async fn lock_waits(conn: &mut sqlx::PgConnection) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%INSERT INTO snapshots%'",
        )
        .fetch_one(conn)
        .await
        .unwrap()
    }
    let mut first = hold(db, 1).await;
    let mut third = hold(db, 3).await;
    let mut watcher = db.connect().await;
    let get_version = || {
        daemon.command(json!({"op": "get", "entity_type": "task", "entity_id": "x"}))["snapshot"]
            ["version"]
            .as_i64()
    };
    // Producer A: events 1 and 2, then a flush.
    let mut a = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    a.write_all(&task(1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lock_waits(&mut watcher).await < 1 {
        assert!(
            Instant::now() < deadline,
            "version 1 never waited:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.write_all(&task(2)).unwrap();
    eventually(20, "version 2 pending", || {
        (get_version() == Some(2)).then_some(())
    });
    a.write_all(b"{\"op\":\"flush\"}\n").unwrap();
    // Producer B: event 3, whose snapshot replaces version 2 once the flush
    // has reached the writer (a barrier through the entity's actor first:
    // well under the pause).
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.converse(&[task_update(3, "x")]).is_empty());
    eventually(20, "version 3 pending", || {
        (get_version() == Some(3)).then_some(())
    });
    // Version 1 is committed; version 3 then waits on its row.
    sqlx::query("ROLLBACK").execute(&mut first).await.unwrap();
    let store = backend.store().await;
    let x = snapshotd::model::EntityKey::new(snapshotd::model::EntityType::Task, "x".to_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = store.latest(&x).await.unwrap();
        if stored.is_some_and(|s| s.version == 1) && lock_waits(&mut watcher).await == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "version 3 never waited:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The flush is not answered while version 3 is not committed...
    a.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut reader = std::io::BufReader::new(a.try_clone().unwrap());
    let mut line = String::new();
    let early = reader.read_line(&mut line);
    assert!(
        early.is_err(),
        "the flush was answered before version 3 was committed: {line}"
    );
    // ...and is once it is.
    sqlx::query("ROLLBACK").execute(&mut third).await.unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let flushed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(flushed["ok"], true, "{flushed}");
    let stored = store.latest(&x).await.unwrap().expect("x is stored");
    assert_eq!(stored.version, 3);
}
