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
