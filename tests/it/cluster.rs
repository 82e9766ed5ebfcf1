//! The partition function agrees with the SQL a node will select its
//! partitions' events with, on a real PostgreSQL server.

use crate::helpers::TestDb;
use snapshotd::cluster::partition::{partition_of, sql};

#[tokio::test]
async fn rust_and_postgres_put_every_workflow_in_the_same_partition() {
    let db = TestDb::new().await;
    let ids: Vec<String> = (0..2000)
        .map(|i| format!("01JD{:022}", i * 7919))
        .chain([
            "".to_string(),
            "wf".to_string(),
            "é🚀 non-ascii".to_string(),
        ])
        .collect();
    for partitions in [1u32, 7, 64, 1000] {
        let from_server: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM UNNEST($1::text[]) WITH ORDINALITY AS k(w, i) ORDER BY i",
            sql("w", "$2")
        )))
        .bind(&ids)
        .bind(i64::from(partitions))
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap();
        let ours: Vec<i64> = ids
            .iter()
            .map(|id| i64::from(partition_of(id, partitions)))
            .collect();
        assert_eq!(ours, from_server, "with {partitions} partitions");
    }
}

// ---- Several daemons on one database: real processes, real PostgreSQL,
// workflows recorded by stabilize itself and read from its events table.

use crate::crosscheck::verify;
use crate::helpers::{Backend, Daemon, eventually, run_python};
use serde_json::json;
use std::time::{Duration, Instant};

/// Short failover so the tests run in seconds; every write logged.
const FAILOVER_SECS: u64 = 5;

fn node_config(node: &str, extra: &str) -> String {
    format!(
        "[policy]\nevent_interval = 5\nkeep_snapshots = 0\ntime_interval_secs = 3600\n\
         [feed]\npoll_interval_ms = 20\nmax_poll_interval_ms = 200\n\
         [cluster]\nenabled = true\nnode_id = \"{node}\"\nfailover_secs = {FAILOVER_SECS}\n\
         handover_secs = 5\nwrite_log = true\n{extra}"
    )
}

/// A node in its own directory (its own socket).
fn start_node(root: &std::path::Path, backend: &Backend, node: &str, extra: &str) -> Daemon {
    let dir = root.join(node);
    std::fs::create_dir_all(&dir).unwrap();
    Daemon::start(&dir, &backend.url(), &node_config(node, extra))
}

fn stats(node: &Daemon) -> serde_json::Value {
    let reply = node.command(json!({"op": "stats"}));
    assert_eq!(reply["ok"], true, "{reply}");
    reply["stats"].clone()
}

fn owned(node: &Daemon) -> Vec<u64> {
    stats(node)["cluster"]["owned"]
        .as_array()
        .unwrap_or_else(|| panic!("no cluster section in stats:\n{}", node.log()))
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect()
}

/// Wait until the nodes own all 64 partitions between them, none twice,
/// each at least `min_each`; returns how long it took.
fn wait_balanced(nodes: &[&Daemon], min_each: usize, within_secs: u64) -> Duration {
    let started = Instant::now();
    eventually(within_secs, "the partitions to be spread", || {
        let sets: Vec<Vec<u64>> = nodes.iter().map(|n| owned(n)).collect();
        let mut all: Vec<u64> = sets.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        let total: usize = sets.iter().map(Vec::len).sum();
        (all.len() == 64 && total == 64 && sets.iter().all(|s| s.len() >= min_each)).then_some(())
    });
    started.elapsed()
}

/// The arguments for stabilize to record `workflows` new workflows.
fn recorder_args(
    backend: &Backend,
    dir: &std::path::Path,
    workflows: u32,
    seed: u32,
) -> Vec<String> {
    let out = dir.join(format!("batch-{seed}.ndjson"));
    let mut args = backend.python_args();
    args.extend([
        "--workflows".into(),
        workflows.to_string(),
        "--seed".into(),
        seed.to_string(),
        "--out".into(),
        out.display().to_string(),
    ]);
    args
}

/// stabilize records `workflows` new workflows into its events table.
fn record(backend: &Backend, dir: &std::path::Path, workflows: u32, seed: u32) {
    let args = recorder_args(backend, dir, workflows, seed);
    run_python(
        "gen_workflows.py",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// The same in the background: stabilize keeps recording while a test acts.
fn record_meanwhile(
    backend: &Backend,
    dir: &std::path::Path,
    workflows: u32,
    seed: u32,
) -> std::process::Child {
    crate::helpers::spawn_python(
        "gen_workflows.py",
        &recorder_args(backend, dir, workflows, seed),
    )
}

fn finished(recorder: std::process::Child) {
    let done = recorder.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// Every workflow's latest snapshot is within `slack` events of its newest
/// (`policy.event_interval` is 5: 4 while running, 0 after SIGTERM).
async fn wait_all_covered(backend: &Backend, nodes: &[&Daemon], slack: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let coverage = backend.coverage().await;
        let behind: Vec<_> = coverage.iter().filter(|(_, e, v)| e - v > slack).collect();
        if !coverage.is_empty() && behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} workflows not covered, e.g. {:?}\n{}",
            behind.len(),
            behind.iter().take(3).collect::<Vec<_>>(),
            nodes
                .iter()
                .map(|n| n.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A workflow of `file` whose partition `node` does not own.
fn first_workflow_not_owned(node: &Daemon, file: &std::path::Path) -> String {
    let mine = owned(node);
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| e["workflow_id"].as_str().unwrap().to_string())
        .find(|w| {
            !mine.contains(&u64::from(snapshotd::cluster::partition::partition_of(
                w, 64,
            )))
        })
        .expect("a workflow of another node")
}

/// Two running daemons cannot share a node id.
#[tokio::test]
async fn a_node_id_in_use_is_refused_with_its_name() {
    let backend = Backend::postgres().await;
    let root = tempfile::tempdir().unwrap();
    let _n1 = start_node(root.path(), &backend, "n1", "");
    let dir = root.path().join("twin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("snapshotd.toml"), node_config("n1", "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .arg("--config")
        .arg(dir.join("snapshotd.toml"))
        .arg("run")
        .env("SNAPSHOTD_SOCKET__PATH", dir.join("s.sock"))
        .env("SNAPSHOTD_DATABASE__URL", backend.url())
        .env("SNAPSHOTD_METRICS__ADDRESS", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.node_id `n1` is in use"),
        "{stderr}"
    );
}

/// SIGTERM each node in turn, each once the others own every partition
/// (the stopping node snapshots what it holds and frees its leases; the
/// others catch its partitions up from the table), the last after a `sync`
/// (everything committed is folded): every exit is clean.
fn stop_all(mut nodes: Vec<Daemon>) {
    while nodes.len() > 1 {
        let mut node = nodes.remove(0);
        let status = node.terminate();
        assert!(status.success(), "{}", node.log());
        wait_balanced(&nodes.iter().collect::<Vec<_>>(), 0, FAILOVER_SECS + 20);
    }
    let mut last = nodes.remove(0);
    let reply = last.try_command(json!({"op": "sync"}), Duration::from_secs(90));
    assert!(
        reply.as_ref().is_some_and(|r| r["ok"] == true),
        "sync: {reply:?}\n{}\n---- stats: {:?}",
        last.log(),
        last.try_command(json!({"op": "stats"}), Duration::from_secs(5))
    );
    let status = last.terminate();
    assert!(status.success(), "{}", last.log());
}

/// How every cluster test ends: the running nodes keep up (each workflow
/// within one interval of its events), all stop cleanly, then every
/// workflow is covered exactly, the write log shows one writer per
/// partition at a time, and stabilize checks every row (at least
/// `min_rows`). Returns the number of writes logged.
async fn end_and_check(backend: &Backend, nodes: Vec<Daemon>, min_rows: usize) -> i64 {
    wait_all_covered(backend, &nodes.iter().collect::<Vec<_>>(), 4).await;
    stop_all(nodes);
    wait_all_covered(backend, &[], 0).await;
    let writes = assert_one_writer_per_partition(backend).await;
    verify(backend, min_rows);
    writes
}

/// The write log shows one writer at a time per partition: no epoch is
/// written by two nodes, and nothing is written under an epoch after a
/// newer epoch of the same partition was written.
async fn assert_one_writer_per_partition(backend: &Backend) -> i64 {
    let Backend::Postgres(db) = backend else {
        unreachable!()
    };
    let mut conn = db.connect().await;
    let shared: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT partition, epoch FROM snapshotd_cluster_writes \
         GROUP BY 1, 2 HAVING count(DISTINCT node_id) > 1) t",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(shared, 0, "an epoch written by two nodes");
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM snapshotd_cluster_writes a JOIN snapshotd_cluster_writes b \
         ON a.partition = b.partition AND a.epoch < b.epoch AND a.written_at > b.written_at",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(stale, 0, "a write under an older epoch after a newer one");
    sqlx::query_scalar("SELECT count(*) FROM snapshotd_cluster_writes")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Three nodes share the work; one is killed mid-stream and its partitions
/// are taken within the failover time; nothing is missing or wrong.
#[tokio::test]
async fn three_nodes_share_the_partitions_and_survive_a_kill_9() {
    let backend = Backend::postgres().await;
    let root = tempfile::tempdir().unwrap();
    let n1 = start_node(root.path(), &backend, "n1", "");
    let mut n2 = start_node(root.path(), &backend, "n2", "");
    let n3 = start_node(root.path(), &backend, "n3", "");
    // Each at least P/N - 2.
    wait_balanced(&[&n1, &n2, &n3], 64 / 3 - 2, 30);
    record(&backend, root.path(), 80, 1);
    // Producers may send to any node: what another node owns is counted,
    // not folded (its owner reads it from the table).
    let sent = n1.send_file(&root.path().join("batch-1.ndjson"), true);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let s1 = stats(&n1);
    let (received, not_owned) = (
        s1["events_received"].as_u64().unwrap(),
        s1["events_not_owned"].as_u64().unwrap(),
    );
    assert!(
        not_owned > received / 2 && not_owned < received,
        "{not_owned} of {received} socket events not owned by n1"
    );
    let refused = n1.command(json!({"op": "snapshot", "entity_type": "workflow",
        "entity_id": first_workflow_not_owned(&n1, &root.path().join("batch-1.ndjson"))}));
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("another node owns"),
        "{refused}"
    );
    let before = owned(&n2);
    let killed_at = db_now(&backend).await;
    n2.kill();
    let killed = Instant::now();
    // stabilize goes on recording: the dead node's events wait in the table.
    let recorder = record_meanwhile(&backend, root.path(), 80, 2);
    // The survivors own everything, within the failover time (plus what
    // this test's polling adds).
    wait_balanced(&[&n1, &n3], 0, FAILOVER_SECS + 10);
    let failover = killed.elapsed();
    eprintln!("failover: {} ms after kill -9", failover.as_millis());
    assert!(
        // Slack for this test's polling on a loaded machine.
        failover <= Duration::from_secs(FAILOVER_SECS + 3),
        "{} partitions took {failover:?} to be taken (failover_secs = {FAILOVER_SECS})",
        before.len()
    );
    finished(recorder);
    wait_all_covered(&backend, &[&n1, &n3], 4).await;
    // Kill -9 to the first snapshot of one of its partitions by a survivor
    // (the events recorded after the kill wait in the table until then).
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let first: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(written_at) - $1)::float8 FROM snapshotd_cluster_writes \
         WHERE node_id <> 'n2' AND written_at > $1 AND partition = ANY($2)",
    )
    .bind(killed_at)
    .bind(before.iter().map(|&p| p as i32).collect::<Vec<_>>())
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    eprintln!("first snapshot of a dead node's partition: {first:.2} s after kill -9");
    record(&backend, root.path(), 80, 3);
    let acquired = stats(&n1)["partitions_acquired"].as_u64().unwrap()
        + stats(&n3)["partitions_acquired"].as_u64().unwrap();
    assert!(acquired >= 64, "{acquired}");
    let writes = end_and_check(&backend, vec![n1, n3], 240).await;
    assert!(writes > 100, "{writes} writes logged");
}

/// The database's clock, which the write log's times come from.
async fn db_now(backend: &Backend) -> chrono::DateTime<chrono::Utc> {
    let Backend::Postgres(db) = backend else {
        unreachable!()
    };
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap()
}

/// A node frozen (SIGSTOP) with snapshots pending, longer than the failover
/// time: the others take its partitions and write; woken, it writes nothing
/// for what it lost, rejoins, and every row is right at the end.
#[tokio::test]
async fn a_frozen_node_writes_nothing_for_the_partitions_it_lost() {
    let backend = Backend::postgres().await;
    let root = tempfile::tempdir().unwrap();
    let n1 = start_node(root.path(), &backend, "n1", "");
    let n2 = start_node(root.path(), &backend, "n2", "");
    // Its snapshots wait 4 s in the writer: the freeze catches them pending.
    let n3 = start_node(
        root.path(),
        &backend,
        "n3",
        "[writer]\nbatch_size = 100000\nbatch_delay_ms = 4000\n",
    );
    wait_balanced(&[&n1, &n2, &n3], 64 / 3 - 2, 30);
    record(&backend, root.path(), 80, 11);
    eventually(10, "n3 to hold pending snapshots", || {
        (stats(&n3)["writer_pending"].as_i64().unwrap() > 0).then_some(())
    });
    n3.signal("STOP");
    let frozen = Instant::now();
    wait_balanced(&[&n1, &n2], 0, FAILOVER_SECS + 10);
    record(&backend, root.path(), 80, 12);
    wait_all_covered(&backend, &[&n1, &n2], 4).await;
    // Frozen longer than the failover time, and longer than its batch delay.
    while frozen.elapsed() < Duration::from_secs(FAILOVER_SECS + 3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let woken = db_now(&backend).await;
    n3.signal("CONT");
    eventually(20, "n3 to notice its losses", || {
        (stats(&n3)["partitions_lost"].as_u64().unwrap() > 0).then_some(())
    });
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    // Nothing n3 wrote after waking was under a lease another node had
    // taken from it while it was frozen.
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM snapshotd_cluster_writes a WHERE a.node_id = 'n3' \
         AND a.written_at > $1 AND EXISTS (SELECT 1 FROM snapshotd_cluster_writes b \
         WHERE b.partition = a.partition AND b.node_id <> 'n3' AND b.epoch > a.epoch \
         AND b.written_at < $1)",
    )
    .bind(woken)
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    assert_eq!(stale, 0, "n3 wrote under a lease it had lost");
    // The pending snapshots of the lost partitions were refused (by the
    // database, or dropped once the loss was noticed).
    let after = eventually(10, "n3's pending snapshots to be fenced", || {
        let s = stats(&n3);
        (s["snapshots_fenced"].as_u64().unwrap() > 0).then_some(s)
    });
    eprintln!(
        "n3 after waking: lost {} partitions, {} snapshots fenced",
        after["partitions_lost"], after["snapshots_fenced"]
    );
    // It rejoins and gets its share again.
    wait_balanced(&[&n1, &n2, &n3], 64 / 3 - 2, 30);
    record(&backend, root.path(), 80, 13);
    // The node that was frozen stops first: the last one is synced.
    end_and_check(&backend, vec![n3, n1, n2], 240).await;
}

/// A fourth node joins mid-stream and takes its share; then one node stops
/// gracefully mid-stream and hands its partitions over; nothing is lost.
#[tokio::test]
async fn a_node_joins_and_another_leaves_mid_stream_without_a_gap() {
    let backend = Backend::postgres().await;
    let root = tempfile::tempdir().unwrap();
    let n1 = start_node(root.path(), &backend, "n1", "");
    let mut n2 = start_node(root.path(), &backend, "n2", "");
    let n3 = start_node(root.path(), &backend, "n3", "");
    wait_balanced(&[&n1, &n2, &n3], 64 / 3 - 2, 30);
    record(&backend, root.path(), 60, 21);
    // Joins while stabilize records.
    let background = record_meanwhile(&backend, root.path(), 300, 22);
    let n4 = start_node(root.path(), &backend, "n4", "");
    let joined = wait_balanced(&[&n1, &n2, &n3, &n4], 64 / 4 - 2, 30);
    eprintln!(
        "the fourth node had its share {} ms after starting",
        joined.as_millis()
    );
    finished(background);
    assert!(stats(&n4)["partitions_acquired"].as_u64().unwrap() >= 14);
    // Leaves while stabilize records.
    let background = record_meanwhile(&backend, root.path(), 300, 23);
    std::thread::sleep(Duration::from_millis(200));
    let left = Instant::now();
    let status = n2.terminate();
    assert!(status.success(), "{}", n2.log());
    assert!(n2.log().contains("Left the cluster"), "{}", n2.log());
    wait_balanced(&[&n1, &n3, &n4], 64 / 3 - 2, 30);
    eprintln!(
        "n2's partitions were owned again {} ms after SIGTERM",
        left.elapsed().as_millis()
    );
    finished(background);
    end_and_check(&backend, vec![n1, n3, n4], 700).await;
}

/// An event committed late, below a snapshot's sequence, while no node read
/// its partition (between one node leaving and the next taking over): the
/// new owner's catch-up must still find the snapshot it contradicts.
#[tokio::test]
async fn a_late_commit_between_owners_is_caught_up_by_the_next_one() {
    use sqlx::Connection;
    let backend = Backend::postgres().await;
    let root = tempfile::tempdir().unwrap();
    // stabilize's tables (with commit_xid), with a little history.
    record(&backend, root.path(), 3, 31);
    let mut a = start_node(root.path(), &backend, "a", "");
    wait_balanced(&[&a], 64, 30);
    // The cluster's origin (where catch-up starts) is set when a's feed
    // opens; the workflow's events must come after it, as a workflow
    // recorded while the cluster runs does. (Without this wait, they were
    // sometimes inserted first and fell below the origin.)
    let synced = a.command(json!({"op": "sync"}));
    assert_eq!(synced["ok"], true, "{synced}");
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let workflow = "01LATEBETWEENOWNERS000000W";
    // Its first event takes the lower sequence in a transaction left open...
    let mut early = db.connect().await;
    let mut held = early.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(crate::feed::insert_event(
        workflow,
        "01LATEBETWEENOWNERS000000A",
        1,
        1,
    )))
    .execute(&mut *held)
    .await
    .unwrap();
    // ...its second commits, and reaches node a through the socket.
    backend
        .execute(&crate::feed::insert_event(
            workflow,
            "01LATEBETWEENOWNERS000000B",
            2,
            2,
        ))
        .await;
    let (sequence, stamp): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT sequence, timestamp FROM events WHERE event_id = '01LATEBETWEENOWNERS000000B'",
    )
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    let event = json!({"event_id": "01LATEBETWEENOWNERS000000B", "event_type": "context.updated",
        "timestamp": stamp.to_rfc3339(), "sequence": sequence, "entity_type": "workflow",
        "entity_id": workflow, "workflow_id": workflow, "version": 2,
        "data": {"context": {"step": 2}}, "metadata": {"correlation_id": "c"}, "schema_version": 1});
    let snapshot = json!({"op": "snapshot", "entity_type": "workflow", "entity_id": workflow});
    let replies = a.converse(&[
        event.to_string().into_bytes(),
        br#"{"op":"flush"}"#.to_vec(),
        snapshot.to_string().into_bytes(),
    ]);
    assert!(replies.iter().all(|r| r["ok"] == true), "{replies:?}");
    // The only event committed so far is snapshotted (it is all the table holds).
    let got = a.command(json!({"op": "get", "entity_type": "workflow", "entity_id": workflow}));
    assert_eq!(got["snapshot"]["sequence"], sequence, "{got}");
    // a leaves; the early event commits while nobody owns its partition.
    let status = a.terminate();
    assert!(status.success(), "{}", a.log());
    held.commit().await.unwrap();
    let b = start_node(root.path(), &backend, "b", "");
    wait_balanced(&[&b], 64, 30);
    // b's catch-up sees that the latest snapshot does not count the event
    // below its sequence, rebuilds the workflow and snapshots it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let latest = loop {
        let got = b.command(json!({"op": "get", "entity_type": "workflow", "entity_id": workflow}));
        if got["snapshot"]["version"] == 2 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "not rebuilt in 30 s: {got}\n{}\n----\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(latest["snapshot"]["sequence"], sequence, "{latest}");
}
