//! The store on both backends, against real servers.

use crate::helpers::Backend;
use serde_json::{Value, json};
use snapshotd::model::{EntityKey, EntityType, Snapshot};
use snapshotd::store::StoreError;

fn key(id: &str) -> EntityKey {
    EntityKey::new(EntityType::Workflow, id)
}

fn snap(id: &str, version: i32, state: Value) -> Snapshot {
    Snapshot::new(key(id), id, version, i64::from(version) * 10, state).unwrap()
}

async fn both() -> Vec<Backend> {
    vec![Backend::postgres().await, Backend::sqlite()]
}

#[tokio::test]
async fn a_saved_batch_reads_back_verified_on_both_backends() {
    for backend in both().await {
        let store = backend.store().await;
        let batch: Vec<Snapshot> = (0..50)
            .map(|i| {
                snap(
                    &format!("wf{i}"),
                    1,
                    json!({"i": i, "x": 1e-7, "big": 18446744073709551616u128.to_string()}),
                )
            })
            .collect();
        let outcome = store.save_batch(&batch).await.unwrap();
        assert_eq!(outcome.written, 50, "{}", backend.url());
        assert!(outcome.rejected.is_empty());
        for s in &batch {
            let got = store.latest(&s.key).await.unwrap().expect("saved");
            assert_eq!(got.state, s.state);
            assert_eq!(got.state_hash, s.state_hash);
            assert_eq!((got.version, got.sequence), (s.version, s.sequence));
        }
        assert!(store.latest(&key("absent")).await.unwrap().is_none());
        store.close().await;
    }
}

#[tokio::test]
async fn an_older_snapshot_never_replaces_a_newer_one() {
    for backend in both().await {
        let store = backend.store().await;
        store
            .save_batch(&[snap("w", 5, json!({"v": 5}))])
            .await
            .unwrap();
        let outcome = store
            .save_batch(&[snap("w", 3, json!({"v": 3}))])
            .await
            .unwrap();
        assert_eq!((outcome.written, outcome.skipped), (0, 1));
        let latest = store.latest(&key("w")).await.unwrap().unwrap();
        assert_eq!(latest.version, 5);
        // The same version again is a no-op; a newer one lands.
        let outcome = store
            .save_batch(&[snap("w", 5, json!({"v": 5}))])
            .await
            .unwrap();
        assert_eq!(outcome.written, 0);
        store
            .save_batch(&[snap("w", 6, json!({"v": 6}))])
            .await
            .unwrap();
        assert_eq!(store.latest(&key("w")).await.unwrap().unwrap().version, 6);
    }
}

#[tokio::test]
async fn one_invalid_row_is_named_and_the_rest_of_the_batch_lands() {
    for backend in both().await {
        let store = backend.store().await;
        let mut poisoned = snap("nul", 1, json!({"ok": true}));
        poisoned.state = json!({"s": "a\u{0}b"});
        let mut too_long = snap("x", 1, json!({}));
        too_long.key = key(&"x".repeat(27));
        let batch = vec![
            snap("good1", 1, json!({"a": 1})),
            poisoned,
            too_long,
            snap("good2", 1, json!({"a": 2})),
        ];
        let outcome = store.save_batch(&batch).await.unwrap();
        assert_eq!(outcome.written, 2);
        assert_eq!(outcome.rejected.len(), 2);
        let nul = outcome
            .rejected
            .iter()
            .find(|r| &*r.key.entity_id == "nul")
            .expect("nul named");
        assert!(nul.reason.contains("U+0000"), "{}", nul.reason);
        assert!(outcome.rejected.iter().any(|r| r.reason.contains("26")));
        assert!(store.latest(&key("good1")).await.unwrap().is_some());
        assert!(store.latest(&key("good2")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn a_row_the_database_refuses_is_isolated_from_its_batch() {
    // A constraint we do not check ourselves: the database's own refusal
    // must be pinned on the row, not on the batch.
    for backend in both().await {
        let store = backend.store().await;
        match &backend {
            Backend::Postgres(_) => {
                backend
                    .execute("ALTER TABLE snapshots ADD CONSTRAINT no_poison CHECK (entity_id <> 'poison')")
                    .await
            }
            Backend::Sqlite(_) => {
                backend
                    .execute(
                        "CREATE TRIGGER no_poison BEFORE INSERT ON snapshots WHEN NEW.entity_id = 'poison' \
                         BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
                    )
                    .await
            }
        }
        let batch = vec![
            snap("a", 1, json!({})),
            snap("poison", 1, json!({})),
            snap("b", 1, json!({})),
        ];
        let outcome = store.save_batch(&batch).await.unwrap();
        assert_eq!(outcome.written, 2, "{}", backend.url());
        assert_eq!(outcome.rejected.len(), 1);
        assert_eq!(&*outcome.rejected[0].key.entity_id, "poison");
        assert!(store.latest(&key("b")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn prune_keeps_the_newest_n_per_entity() {
    for backend in both().await {
        let store = backend.store().await;
        for v in 1..=6 {
            store
                .save_batch(&[snap("p", v, json!({"v": v})), snap("q", v, json!({"v": v}))])
                .await
                .unwrap();
        }
        assert_eq!(store.prune_entities(&[key("p")], 2).await.unwrap(), 4);
        assert_eq!(store.prune(3).await.unwrap(), 3);
        assert_eq!(store.prune(0).await.unwrap(), 0);
        let report = store.verify_all(|_| {}).await.unwrap();
        assert_eq!(report.rows, 5);
        assert_eq!(store.latest(&key("p")).await.unwrap().unwrap().version, 6);
    }
}

#[tokio::test]
async fn a_tampered_row_is_an_integrity_error_naming_the_entity() {
    for backend in both().await {
        let store = backend.store().await;
        store
            .save_batch(&[
                snap("good", 1, json!({"n": 1})),
                snap("tampered", 1, json!({"n": 1})),
            ])
            .await
            .unwrap();
        let tamper = match backend {
            Backend::Postgres(_) => {
                "UPDATE snapshots SET state = '{\"n\": 2}'::jsonb WHERE entity_id = 'tampered'"
            }
            Backend::Sqlite(_) => {
                "UPDATE snapshots SET state = '{\"n\": 2}' WHERE entity_id = 'tampered'"
            }
        };
        backend.execute(tamper).await;
        match store.latest(&key("tampered")).await {
            Err(StoreError::Integrity { key, .. }) => assert_eq!(&*key.entity_id, "tampered"),
            other => panic!("expected an integrity error, got {other:?}"),
        }
        let mut bad = Vec::new();
        let report = store
            .verify_all(|m| bad.push(m.error.to_string()))
            .await
            .unwrap();
        assert_eq!((report.rows, report.bad), (2, 1));
        assert!(bad[0].contains("workflow/tampered"), "{}", bad[0]);
    }
}

/// The batched hydration lookup answers what `latest` answers, per entity:
/// the newest version of each (across statement chunks), nothing for an
/// entity without a row, and an integrity error for a tampered row.
#[tokio::test]
async fn latest_many_equals_latest_for_every_entity() {
    for backend in both().await {
        let store = backend.store().await;
        let mut batch = Vec::new();
        for i in 0..450 {
            for version in 1..=(1 + i % 3) {
                batch.push(snap(
                    &format!("m{i}"),
                    version,
                    json!({"i": i, "v": version}),
                ));
            }
        }
        store.save_batch(&batch).await.unwrap();
        backend
            .execute("UPDATE snapshots SET state = '{\"i\": 7, \"v\": 99}' WHERE entity_id = 'm7' AND version = 2")
            .await;
        let mut keys: Vec<EntityKey> = (0..450).map(|i| key(&format!("m{i}"))).collect();
        keys.push(key("absent"));
        let found = store.latest_many(&keys).await.unwrap();
        assert_eq!(found.len(), 450, "{}", backend.url());
        let mut tampered = 0;
        for (key, got) in found {
            match (got, store.latest(&key).await) {
                (Ok(a), Ok(Some(b))) => {
                    assert_eq!(
                        (a.version, a.sequence, a.state),
                        (b.version, b.sequence, b.state)
                    );
                }
                (Err(StoreError::Integrity { .. }), Err(StoreError::Integrity { .. })) => {
                    assert_eq!(&*key.entity_id, "m7");
                    tampered += 1;
                }
                (a, b) => panic!("{key}: latest_many {a:?}, latest {b:?}"),
            }
        }
        assert_eq!(tampered, 1);
        store.close().await;
    }
}
