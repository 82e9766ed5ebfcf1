//! Proof that stabilize 0.33.1 reads what the store writes and the store
//! reads what stabilize writes, through stabilize's own classes, on both
//! backends.

use crate::canonical::json_value;
use crate::helpers::{Backend, run_python, shared, write_lines};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use snapshotd::model::canonical::canonical_json;
use snapshotd::model::{EntityKey, EntityType, Snapshot};
use snapshotd::store::StoreError;

/// The vectors' inputs (those Postgres accepts) and a few hundred random
/// states, as raw JSON values (numbers as literals).
fn awkward_states() -> Vec<Value> {
    let text = std::fs::read_to_string(shared().join("vectors/canonical_json.jsonl")).unwrap();
    let mut states: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|case| case.get("postgres_rejects").is_none())
        .map(|case| serde_json::from_str(case["input"].as_str().unwrap()).unwrap())
        .collect();
    let mut runner = TestRunner::deterministic();
    let strategy = json_value();
    for _ in 0..300 {
        let value = strategy.new_tree(&mut runner).unwrap().current();
        states.push(json!({"r": value, "context": {"n": value}}));
    }
    states
}

fn python_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("python printed JSON"))
        .collect()
}

#[tokio::test]
async fn stabilize_reads_every_state_we_write_and_its_hash_checks() {
    let dir = tempfile::tempdir().unwrap();
    for backend in [Backend::postgres().await, Backend::sqlite()] {
        let store = backend.store().await;
        let snapshots: Vec<Snapshot> = awkward_states()
            .into_iter()
            .enumerate()
            .map(|(i, state)| {
                let id = format!("wf{i:05}");
                Snapshot::new(
                    EntityKey::new(EntityType::Workflow, id.as_str()),
                    id.as_str(),
                    7,
                    1000 + i as i64,
                    state,
                )
                .unwrap()
            })
            .collect();
        let outcome = store.save_batch(&snapshots).await.unwrap();
        assert_eq!(
            outcome.written as usize,
            snapshots.len(),
            "{:?}",
            outcome.rejected
        );
        store.close().await;

        let keys = write_lines(
            dir.path(),
            "keys.jsonl",
            snapshots.iter().map(|s| {
                json!({"entity_type": "workflow", "entity_id": &*s.key.entity_id}).to_string()
            }),
        );
        let mut args = backend.python_args();
        args.insert(0, "read".into());
        args.extend(["--keys".into(), keys.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let read = python_lines(&run_python("stabilize_io.py", &args));
        assert_eq!(read.len(), snapshots.len());
        for (line, ours) in read.iter().zip(&snapshots) {
            assert_eq!(line["entity_id"].as_str(), Some(&*ours.key.entity_id));
            assert!(
                line.get("error").is_none(),
                "stabilize refused {}: {}",
                ours.key,
                line["error"]
            );
            assert_eq!(line["found"], json!(true));
            assert_eq!(line["version"], json!(7));
            assert_eq!(line["sequence"], json!(ours.sequence));
            assert_eq!(
                line["canonical"].as_str().unwrap(),
                canonical_json(&ours.state).unwrap(),
                "{} on {}",
                ours.key,
                backend.url()
            );
        }
    }
}

#[tokio::test]
async fn we_read_and_verify_what_stabilize_writes_into_tables_it_created() {
    let dir = tempfile::tempdir().unwrap();
    for backend in [Backend::postgres().await, Backend::sqlite()] {
        // stabilize creates its tables first; our migrate must accept them.
        let mut init = backend.python_args();
        init.insert(0, "init".into());
        run_python(
            "stabilize_io.py",
            &init.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let store = backend.store().await;

        let states = awkward_states();
        let rows = states.iter().enumerate().map(|(i, state)| {
            json!({"entity_type": "workflow", "entity_id": format!("py{i:05}"), "workflow_id": format!("py{i:05}"),
                   "version": 3, "sequence": 30 + i, "state": state})
            .to_string()
        });
        let file = write_lines(dir.path(), "snapshots.jsonl", rows);
        let mut write = backend.python_args();
        write.insert(0, "write".into());
        write.extend(["--snapshots".into(), file.display().to_string()]);
        run_python(
            "stabilize_io.py",
            &write.iter().map(String::as_str).collect::<Vec<_>>(),
        );

        // stabilize's own writer corrupts some states on Postgres (a float
        // of 1e16 or more comes back from JSONB as an int): where stabilize
        // refuses its own row, we must refuse it too, and agree elsewhere.
        let keys = write_lines(
            dir.path(),
            "keys.jsonl",
            (0..states.len()).map(|i| {
                json!({"entity_type": "workflow", "entity_id": format!("py{i:05}")}).to_string()
            }),
        );
        let mut read = backend.python_args();
        read.insert(0, "read".into());
        read.extend(["--keys".into(), keys.display().to_string()]);
        let theirs = python_lines(&run_python(
            "stabilize_io.py",
            &read.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let mut refused = 0;
        for (i, their) in theirs.iter().enumerate() {
            let key = EntityKey::new(EntityType::Workflow, format!("py{i:05}"));
            match (store.latest(&key).await, their.get("error")) {
                (Ok(Some(ours)), None) => {
                    assert_eq!((ours.version, ours.sequence), (3, 30 + i as i64));
                    assert_eq!(
                        canonical_json(&ours.state).unwrap(),
                        their["canonical"].as_str().unwrap(),
                        "{key}"
                    );
                }
                (Err(StoreError::Integrity { .. }), Some(_)) => refused += 1,
                (ours, theirs) => panic!(
                    "{key} on {}: we say {ours:?}, stabilize says {theirs:?}",
                    backend.url()
                ),
            }
        }
        if let Backend::Sqlite(_) = backend {
            assert_eq!(
                refused, 0,
                "stabilize's SQLite rows keep their numbers' text"
            );
        }
        let mut bad = 0;
        let report = store.verify_all(|_| bad += 1).await.unwrap();
        assert_eq!(report.rows as usize, states.len());
        assert_eq!(bad, refused, "verify and latest agree");
        store.close().await;
    }
}
