//! Batch upsert rate of the store: 1,000-row batches of ~2 KB states.
//!
//! ```sh
//! cargo bench --bench store_upsert -- --database postgres://postgres@127.0.0.1:5432/test --batches 20
//! ```
//! A fresh database is created beside `--database` and dropped afterwards;
//! `--database sqlite` uses a temporary file.

use serde_json::json;
use snapshotd::model::{EntityKey, EntityType, Snapshot};
use snapshotd::store::{Store, StoreOptions};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::time::Instant;

fn state(i: usize, round: usize) -> serde_json::Value {
    let tasks: serde_json::Map<String, serde_json::Value> = (0..12)
        .map(|t| {
            (
                format!("01JDTASK{i:012}{t:06}"),
                json!({"id": t, "name": "render", "status": "SUCCEEDED", "retry_count": round,
                       "start_time": "2026-11-26T03:59:48.120000+00:00", "outputs": {"rows": t * 1000, "ratio": 0.25}}),
            )
        })
        .collect();
    json!({"workflow_id": format!("01JDWF{i:020}"), "status": "RUNNING", "application": "billing",
           "name": "nightly", "start_time": "2026-11-26T03:59:48+00:00", "end_time": null,
           "context": {"region": "eu-west-1", "round": round, "note": "café"}, "stages": {}, "tasks": tasks})
}

fn main() {
    let mut database = "postgres://postgres@127.0.0.1:5432/test".to_string();
    let mut batches = 20usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--database" => database = it.next().expect("--database URL"),
            "--batches" => batches = it.next().expect("--batches N").parse().expect("a number"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("snapshotd_bench_{}", std::process::id());
        let url = if database == "sqlite" {
            format!("sqlite://{}", dir.path().join("s.db").display())
        } else {
            let mut admin = PgConnection::connect(&database).await.expect("connect");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
            format!("{}/{name}", database.rsplit_once('/').unwrap().0)
        };
        let store = Store::connect(&StoreOptions { url: url.clone(), pool_size: 4 }).await.unwrap();
        store.migrate().await.unwrap();
        let size = serde_json::to_string(&state(0, 0)).unwrap().len();
        let mut rows = 0;
        let mut busy = 0.0;
        for round in 0..batches {
            let batch: Vec<Snapshot> = (0..1000)
                .map(|i| {
                    let id = format!("01JDWF{i:020}");
                    Snapshot::new(EntityKey::new(EntityType::Workflow, id.as_str()), id.as_str(), round as i32 + 1, (round * 1000 + i + 1) as i64, state(i, round)).unwrap()
                })
                .collect();
            let t = Instant::now();
            let outcome = store.save_batch(&batch).await.unwrap();
            busy += t.elapsed().as_secs_f64();
            rows += outcome.written;
        }
        println!("backend {}: {rows} rows of {size} B in {batches} batches of 1000: {busy:.2} s = {:.0} rows/s ({:.1} ms per batch)",
            if database == "sqlite" { "sqlite" } else { "postgres" }, rows as f64 / busy, busy * 1000.0 / batches as f64);
        store.close().await;
        if database != "sqlite" {
            let mut admin = PgConnection::connect(&database).await.unwrap();
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut admin).await;
        }
    });
}
