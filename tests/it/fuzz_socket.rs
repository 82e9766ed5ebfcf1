//! Hostile frames on the live socket: mutated stabilize events (byte flips,
//! truncation, wrong types, extreme numbers, deep nesting, bad UTF-8, lone
//! surrogates, NULs, lines over the limit, blank lines) interleaved with a
//! realistic workload. The daemon must stay up and small, refuse exactly the
//! frames `decode` refuses (by frame number and reason), and snapshot every
//! good workflow exactly as the good events alone do.

#[path = "../support/mutate.rs"]
mod mutate;

use crate::crosscheck::verify;
use crate::helpers::{Backend, Daemon, run_python};
use mutate::{Mutator, Outcome, XorShift, outcome};
use serde_json::{Map, Value, json};
use snapshotd::model::canonical::NumberForm;
use snapshotd::model::event::{Frame, Limits};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The daemon's defaults (config/default.toml); SQLite keeps numbers as
/// Python reads them.
const MAX_FRAME_BYTES: usize = 1_048_576;
const LIMITS: Limits = Limits {
    max_depth: 64,
    numbers: NumberForm::Python,
};
/// Frequent snapshots, all kept, so intermediate rows are checked too.
const POLICY: &str = "[policy]\nevent_interval = 5\nkeep_snapshots = 0\n";
const MUTATED: usize = 60_000;
const WORKFLOWS: u32 = 60;

/// Move an event to the mutants' namespace: its ids start with `fz`, which
/// no stabilize id can (ULIDs are upper-case Crockford base32), same length.
fn to_fuzz_namespace(line: &str) -> Vec<u8> {
    let mut event: Map<String, Value> = serde_json::from_str(line).unwrap();
    for field in ["workflow_id", "entity_id"] {
        if let Some(Value::String(id)) = event.get_mut(field) {
            id.replace_range(..2, "fz");
        }
    }
    serde_json::to_vec(&event).unwrap()
}

/// One line of the stream and what the daemon must answer to it.
enum Expect {
    Nothing,
    /// An error reply with this reason.
    Refusal(String, &'static str),
}

#[test]
fn hostile_frames_between_good_events_change_no_snapshot_and_cost_no_memory() {
    // The workload: stabilize's own events, in a stabilize SQLite file of
    // their own. The daemons' databases have no events table: the socket is
    // the only way events reach them.
    let stabilize = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let good_file = dir.path().join("good.ndjson");
    let mut args = stabilize.python_args();
    args.extend([
        "--workflows".into(),
        WORKFLOWS.to_string(),
        "--seed".into(),
        "17".into(),
        "--out".into(),
        good_file.display().to_string(),
    ]);
    run_python(
        "gen_workflows.py",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let good_text = std::fs::read_to_string(&good_file).unwrap();
    let good: Vec<&str> = good_text.lines().collect();
    let good_workflows: HashSet<String> = good
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["workflow_id"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();

    // The mutants are made from the same events moved to another namespace,
    // and a mutant is sent only if it cannot touch a good workflow: one that
    // still decodes as an event of a good workflow (a byte flip can undo the
    // namespace) or as a command (which would answer, or snapshot) is left
    // out. So every mutant is refused, skipped, or an event of a workflow of
    // its own, and the good workflows' snapshots must not change at all.
    let seeds: Vec<Vec<u8>> = good.iter().map(|l| to_fuzz_namespace(l)).collect();
    // Lines over the limit come at one in ~1,000 frames: ~70 MiB of them.
    let mut mutator = Mutator::new(0x5eed, &seeds, MAX_FRAME_BYTES);
    let mut rng = XorShift::new(99);
    let mut stream: Vec<u8> = Vec::new();
    let mut expected: Vec<Expect> = Vec::new();
    let mut left_out = 0usize;
    let (mut next_good, mut mutants) = (0usize, 0usize);
    while next_good < good.len() || mutants < MUTATED {
        // Good events keep their order, spread evenly through the mutants.
        let remaining = (good.len() - next_good) + (MUTATED - mutants);
        if rng.below(remaining) < good.len() - next_good {
            stream.extend_from_slice(good[next_good].as_bytes());
            stream.push(b'\n');
            expected.push(Expect::Nothing);
            next_good += 1;
            continue;
        }
        let (_, line) = mutator.next();
        mutants += 1;
        let expect = match outcome(line, MAX_FRAME_BYTES, LIMITS) {
            Outcome::Blank => Expect::Nothing,
            Outcome::Decoded(Ok(Frame::Event(e))) if !good_workflows.contains(&*e.workflow_id) => {
                Expect::Nothing
            }
            Outcome::TooLong => Expect::Refusal(
                format!("frame is longer than max_frame_bytes ({MAX_FRAME_BYTES} bytes)"),
                "oversized",
            ),
            Outcome::Decoded(Err(e)) => Expect::Refusal(e.to_string(), e.kind()),
            // A command, or an event of a good workflow: not sent.
            Outcome::Decoded(Ok(_)) => {
                left_out += 1;
                continue;
            }
        };
        stream.extend_from_slice(line);
        stream.push(b'\n');
        expected.push(expect);
    }
    stream.extend_from_slice(br#"{"op":"flush","snapshot":true}"#);
    stream.push(b'\n');
    let flush_frame = expected.len() as u64 + 1;

    let db = Backend::sqlite();
    let daemon = Daemon::start(dir.path(), &db.url(), POLICY);
    let started = Instant::now();
    let replies = pipeline(&daemon, stream);
    let took = started.elapsed();

    // Exactly the refusals decode predicts, frame by frame, then the flush.
    let mut want_kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut refusals = BTreeMap::new();
    for (i, expect) in expected.iter().enumerate() {
        if let Expect::Refusal(reason, kind) = expect {
            refusals.insert(i as u64 + 1, reason.as_str());
            *want_kinds.entry(kind).or_default() += 1;
        }
    }
    let (flush, errors): (Vec<&Value>, Vec<&Value>) =
        replies.iter().partition(|r| r["op"] == "flush");
    assert_eq!(flush.len(), 1, "{flush:?}");
    assert_eq!(flush[0]["ok"], true, "{}", flush[0]);
    assert_eq!(flush[0]["frame"], flush_frame);
    let got: BTreeMap<u64, &str> = errors
        .iter()
        .map(|r| (r["frame"].as_u64().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(got.len(), errors.len(), "two replies for one frame");
    if got != refusals {
        let diff: Vec<_> = got
            .iter()
            .filter(|(f, r)| refusals.get(f) != Some(r))
            .chain(refusals.iter().filter(|(f, r)| got.get(f) != Some(r)))
            .take(5)
            .collect();
        panic!(
            "{} refusals, {} expected; first differences: {diff:?}",
            got.len(),
            refusals.len()
        );
    }

    // Still up, answering, small, no actor ever panicked, and the metrics
    // counted each refusal by its kind.
    assert_eq!(daemon.command(json!({"op": "ping"}))["ok"], true);
    let stats = daemon.command(json!({"op": "stats"}))["stats"].clone();
    assert_eq!(stats["actor_restarts"], 0, "{stats}");
    let by_kind: BTreeMap<String, u64> =
        serde_json::from_value(stats["invalid_by_kind"].clone()).unwrap();
    let want_kinds: BTreeMap<String, u64> = want_kinds
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    assert_eq!(by_kind, want_kinds, "{stats}");
    let peak = daemon.peak_rss_mib();
    eprintln!(
        "fuzz_socket: {} frames ({} good events, {} mutants, {left_out} left out), {} refused, \
         in {took:.1?}; peak RSS {peak} MiB; {stats}",
        expected.len(),
        good.len(),
        expected.len() - good.len(),
        refusals.len(),
    );
    assert!(peak < 400, "peak RSS {peak} MiB");

    // The good events alone, through a second daemon.
    let alone_db = Backend::sqlite();
    let alone_dir = tempfile::tempdir().unwrap();
    let alone = Daemon::start(alone_dir.path(), &alone_db.url(), POLICY);
    let mut alone_stream = good_text.clone().into_bytes();
    alone_stream.extend_from_slice(b"{\"op\":\"flush\",\"snapshot\":true}\n");
    let alone_replies = pipeline(&alone, alone_stream);
    assert_eq!(alone_replies.len(), 1, "{alone_replies:?}");
    assert_eq!(alone_replies[0]["ok"], true, "{alone_replies:?}");
    let mut events_of: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for line in &good {
        let e: Value = serde_json::from_str(line).unwrap();
        events_of
            .entry(e["workflow_id"].as_str().unwrap().to_string())
            .or_default()
            .insert(e["sequence"].as_i64().unwrap());
    }
    for (workflow, sequences) in &events_of {
        let get = json!({"op": "get", "entity_type": "workflow", "entity_id": workflow});
        let mixed = daemon.command(get.clone())["snapshot"].clone();
        let clean = alone.command(get)["snapshot"].clone();
        for field in ["version", "sequence", "state_hash", "state"] {
            assert_eq!(mixed[field], clean[field], "{workflow} {field}");
        }
        assert_eq!(mixed["version"], sequences.len(), "{workflow}");
    }

    // And every good row of the mixed run, intermediate ones too, is what
    // stabilize replays from its own events table.
    copy_good_rows(&db, &stabilize);
    verify(&stabilize, good_workflows.len());
}

/// Write `stream` on one connection while reading every reply on this
/// thread (the daemon never blocks on unread replies for long).
fn pipeline(daemon: &Daemon, stream: Vec<u8>) -> Vec<Value> {
    let socket = UnixStream::connect(&daemon.socket).unwrap();
    let mut writer = socket.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&stream).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let replies = BufReader::new(socket)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read a reply")).expect("a reply is JSON"))
        .collect();
    sender.join().unwrap();
    replies
}

/// The daemon's rows of the good workflows, beside stabilize's events table.
fn copy_good_rows(daemon_db: &Backend, stabilize: &Backend) {
    let (Backend::Sqlite(from), Backend::Sqlite(to)) = (daemon_db, stabilize) else {
        unreachable!("both are SQLite files")
    };
    let sql = format!(
        "ATTACH DATABASE '{}' AS d; DELETE FROM snapshots; \
         INSERT INTO snapshots (entity_type, entity_id, workflow_id, version, sequence, state, \
         state_hash, created_at) SELECT entity_type, entity_id, workflow_id, version, sequence, \
         state, state_hash, created_at FROM d.snapshots \
         WHERE entity_id IN (SELECT workflow_id FROM events);",
        from.path.display()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&to.url()).await.unwrap();
        for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    });
}
