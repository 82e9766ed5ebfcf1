//! The SQL of the cluster: the nodes table, the lease table and the write
//! log. Every time is the database's `now()`: node clocks never have to agree.

use crate::model::Fence;
use crate::store::StoreError;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// The key of the transaction-scoped advisory lock that serialises creating
/// the tables (several nodes starting at once).
const SETUP_LOCK: i64 = 0x736e_6170_636c_7573; // "snapclus"

/// The class of the session advisory lock a running node holds on its id
/// (`pg_try_advisory_lock(int, int)`), so two live daemons never share one.
const NODE_LOCK_CLASS: i32 = 0x736e_6170; // "snap"

/// Create the tables when missing (and the `partitions` lease rows);
/// refuse a lease table made for another number of partitions.
pub async fn setup(pool: &PgPool, partitions: u32, write_log: bool) -> Result<(), StoreError> {
    let op = StoreError::query("create the cluster's tables");
    let mut tx = pool.begin().await.map_err(op)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SETUP_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::query("create the cluster's tables"))?;
    let mut ddl = vec![
        "CREATE TABLE IF NOT EXISTS snapshotd_nodes (node_id TEXT PRIMARY KEY, host TEXT NOT NULL, \
         pid INTEGER NOT NULL, started TIMESTAMPTZ NOT NULL DEFAULT now(), \
         heartbeat TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS snapshotd_partitions (partition INTEGER PRIMARY KEY, \
         owner TEXT, epoch BIGINT NOT NULL DEFAULT 0, \
         expires_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    ];
    if write_log {
        ddl.push(
            "CREATE TABLE IF NOT EXISTS snapshotd_cluster_writes (id BIGSERIAL PRIMARY KEY, \
             node_id TEXT NOT NULL, partition INTEGER NOT NULL, epoch BIGINT NOT NULL, \
             entity_id TEXT NOT NULL, version INTEGER NOT NULL, \
             written_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        );
    }
    for statement in ddl {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("create the cluster's tables"))?;
    }
    let (rows, top): (i64, Option<i32>) =
        sqlx::query_as("SELECT count(*), max(partition) FROM snapshotd_partitions")
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::query("read the lease table"))?;
    if rows == 0 {
        sqlx::query(
            "INSERT INTO snapshotd_partitions (partition) SELECT generate_series(0, $1 - 1)",
        )
        .bind(partitions as i32)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::query("create the partition leases"))?;
    } else if rows != i64::from(partitions) || top != Some(partitions as i32 - 1) {
        return Err(StoreError::Schema {
            table: "snapshotd_partitions",
            reason: format!(
                "it holds {rows} partitions but cluster.partitions is {partitions}: every \
                 node of a cluster must use the same number (to change it, stop every \
                 node and drop the table)"
            ),
        });
    }
    tx.commit()
        .await
        .map_err(StoreError::query("create the cluster's tables"))
}

/// The coordinator's own connection: its statements never wait for the
/// data pool, and wait for a row lock at most `lock_wait` (a renewal stuck
/// behind a long write would be worse than one retried at the next
/// heartbeat). Holds the node id's session lock ([`lock_node_id`]).
pub async fn connect(url: &str, lock_wait: Duration) -> Result<PgConnection, StoreError> {
    use sqlx::ConnectOptions;
    let target = crate::store::redact(url);
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .map_err(|_| StoreError::BadUrl(target.clone()))?;
    let wait = format!("{}ms", lock_wait.as_millis().max(1));
    options
        .options([("lock_timeout", wait.as_str()), ("TimeZone", "UTC")])
        .connect()
        .await
        .map_err(|source| StoreError::Connect { target, source })
}

/// Take the session lock on `node_id` on `conn` (kept open for the node's
/// life: a killed node's connection closes and frees it). `false` when a
/// running daemon holds it.
pub async fn lock_node_id(
    conn: &mut sqlx::PgConnection,
    node_id: &str,
) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(NODE_LOCK_CLASS)
        .bind(node_id)
        .fetch_one(conn)
        .await
        .map_err(StoreError::query("lock the node id"))
}

/// Register (or refresh) this node, and free the leases an earlier run
/// under the same id left (it is gone: we hold the id's lock).
pub async fn register(pool: &PgPool, node_id: &str, host: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO snapshotd_nodes (node_id, host, pid) VALUES ($1, $2, $3) \
         ON CONFLICT (node_id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, \
         started = now(), heartbeat = now()",
    )
    .bind(node_id)
    .bind(host)
    .bind(std::process::id() as i32)
    .execute(pool)
    .await
    .map_err(StoreError::query("register the node"))?;
    // Nodes gone for a day are forgotten (generated ids pile up otherwise).
    sqlx::query("DELETE FROM snapshotd_nodes WHERE heartbeat < now() - interval '1 day'")
        .execute(pool)
        .await
        .map_err(StoreError::query("forget long-gone nodes"))?;
    free_all(pool, node_id).await
}

/// Free every lease `node_id` holds.
async fn free_all(conn: impl sqlx::PgExecutor<'_>, node_id: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE snapshotd_partitions SET owner = NULL, expires_at = now() WHERE owner = $1")
        .bind(node_id)
        .execute(conn)
        .await
        .map(drop)
        .map_err(StoreError::query("release partition leases"))
}

/// One heartbeat: refresh this node's row, renew the leases it holds, and
/// count the live nodes (heartbeat within `alive_within`). Returns the leases
/// still held (a lease another node took is missing) and the live count.
pub async fn heartbeat(
    conn: &mut PgConnection,
    node_id: &str,
    host: &str,
    held: &[Fence],
    lease: Duration,
    alive_within: Duration,
) -> Result<(Vec<Fence>, usize), StoreError> {
    sqlx::query(
        "INSERT INTO snapshotd_nodes (node_id, host, pid) VALUES ($1, $2, $3) \
         ON CONFLICT (node_id) DO UPDATE SET heartbeat = clock_timestamp()",
    )
    .bind(node_id)
    .bind(host)
    .bind(std::process::id() as i32)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::query("send the node's heartbeat"))?;
    let partitions: Vec<i32> = held.iter().map(|f| f.partition as i32).collect();
    let epochs: Vec<i64> = held.iter().map(|f| f.epoch).collect();
    // Locked in partition order, like the writer's FOR SHARE: no deadlock.
    let renewed: Vec<(i32, i64)> = sqlx::query_as(
        "UPDATE snapshotd_partitions p SET expires_at = clock_timestamp() + make_interval(secs => $4) \
         WHERE p.partition IN (SELECT l.partition FROM snapshotd_partitions l \
           JOIN UNNEST($2::int4[], $3::int8[]) AS h(partition, epoch) \
             ON h.partition = l.partition AND h.epoch = l.epoch \
           WHERE l.owner = $1 ORDER BY l.partition FOR UPDATE OF l) \
         RETURNING p.partition, p.epoch",
    )
    .bind(node_id)
    .bind(partitions)
    .bind(epochs)
    .bind(lease.as_secs_f64())
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::query("renew the partition leases"))?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM snapshotd_nodes \
         WHERE heartbeat > clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(alive_within.as_secs_f64())
    .fetch_one(&mut *conn)
    .await
    .map_err(StoreError::query("count the live nodes"))?;
    let mut still: Vec<Fence> = renewed
        .into_iter()
        .map(|(p, epoch)| Fence {
            partition: p as u32,
            epoch,
        })
        .collect();
    still.sort_unstable_by_key(|f| f.partition);
    Ok((still, live.max(1) as usize))
}

/// Take up to `count` leases that are free or expired, each at a new epoch.
/// Rows a writer holds locked are skipped (taken at a later heartbeat).
pub async fn claim(
    conn: &mut PgConnection,
    node_id: &str,
    count: usize,
    lease: Duration,
) -> Result<Vec<Fence>, StoreError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "UPDATE snapshotd_partitions p SET owner = $1, epoch = p.epoch + 1, \
           expires_at = clock_timestamp() + make_interval(secs => $3) \
         WHERE p.partition IN (SELECT partition FROM snapshotd_partitions \
           WHERE owner IS NULL OR expires_at < clock_timestamp() \
           ORDER BY partition LIMIT $2 FOR UPDATE SKIP LOCKED) \
           AND (p.owner IS NULL OR p.expires_at < clock_timestamp()) \
         RETURNING p.partition, p.epoch",
    )
    .bind(node_id)
    .bind(count as i64)
    .bind(lease.as_secs_f64())
    .fetch_all(conn)
    .await
    .map_err(StoreError::query("claim partition leases"))?;
    Ok(rows
        .into_iter()
        .map(|(p, epoch)| Fence {
            partition: p as u32,
            epoch,
        })
        .collect())
}

/// Give leases back (free at once for the others).
pub async fn release(
    conn: &mut PgConnection,
    node_id: &str,
    fences: &[Fence],
) -> Result<(), StoreError> {
    let partitions: Vec<i32> = fences.iter().map(|f| f.partition as i32).collect();
    sqlx::query(
        "UPDATE snapshotd_partitions SET owner = NULL, expires_at = now() \
         WHERE owner = $1 AND partition = ANY($2)",
    )
    .bind(node_id)
    .bind(partitions)
    .execute(conn)
    .await
    .map(drop)
    .map_err(StoreError::query("release partition leases"))
}

/// At a graceful stop: free every lease and leave the nodes table.
pub async fn leave(conn: &mut PgConnection, node_id: &str) -> Result<(), StoreError> {
    free_all(&mut *conn, node_id).await?;
    sqlx::query("DELETE FROM snapshotd_nodes WHERE node_id = $1")
        .bind(node_id)
        .execute(conn)
        .await
        .map(drop)
        .map_err(StoreError::query("leave the nodes table"))
}
