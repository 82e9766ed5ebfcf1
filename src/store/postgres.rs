//! The Postgres backend: one `UNNEST` upsert per batch.

use super::schema::{POSTGRES_SNAPSHOTS, missing_columns};
use super::{BatchOutcome, Rejected, StoreError, StoredRow, WriteFence, redact};
use crate::model::{EntityKey, PreparedSnapshot};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Arguments, Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// The whole batch as parallel arrays. Rows older than what the table holds
/// for their entity are filtered out; a same-version row is replaced only
/// when it differs.
///
/// Here and in the lookups and prune below, every read of `snapshots` is a
/// per-entity index probe by construction (`LATERAL … LIMIT`, an `EXISTS`
/// kept as a sub-plan by `OFFSET 0`, `id = ANY(ARRAY(…))`): with a join the
/// planner chose a parallel scan of the whole table per batch once it held
/// 800,000 rows not yet analysed.
const UPSERT: &str = "
INSERT INTO snapshots
    (entity_type, entity_id, workflow_id, version, sequence, state, state_hash, created_at)
SELECT v.entity_type, v.entity_id, v.workflow_id, v.version, v.sequence,
       v.state::jsonb, v.state_hash, v.created_at
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[],
            $6::text[], $7::text[], $8::timestamptz[])
     AS v(entity_type, entity_id, workflow_id, version, sequence, state, state_hash, created_at)
WHERE NOT EXISTS (
    SELECT 1 FROM snapshots s
    WHERE s.entity_type = v.entity_type AND s.entity_id = v.entity_id AND s.version > v.version
    OFFSET 0)
ON CONFLICT (entity_type, entity_id, version) DO UPDATE SET
    workflow_id = EXCLUDED.workflow_id,
    sequence = EXCLUDED.sequence,
    state = EXCLUDED.state,
    state_hash = EXCLUDED.state_hash,
    created_at = EXCLUDED.created_at
WHERE snapshots.state_hash IS DISTINCT FROM EXCLUDED.state_hash
   OR snapshots.sequence <> EXCLUDED.sequence";

/// For each `(workflow_id, sequence)`, the number of the workflow's events
/// up to that sequence, in input order.
const COVERAGE: &str = "
SELECT (SELECT count(*) FROM events e WHERE e.workflow_id = k.wf AND e.sequence <= k.seq)
FROM UNNEST($1::text[], $2::int8[]) WITH ORDINALITY AS k(wf, seq, i)
ORDER BY k.i";

const SELECT_ROW: &str = "SELECT entity_type, entity_id, workflow_id, version::int8 AS version, \
     sequence, state::text AS state, state_hash, created_at FROM snapshots";

/// Delete all but the newest `$3` rows of the entities named in `$1`/`$2`.
const PRUNE_ENTITIES: &str = "
DELETE FROM snapshots WHERE id = ANY(ARRAY(
    SELECT old.id
    FROM (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS k(entity_type, entity_id)
    CROSS JOIN LATERAL (
        SELECT s.id FROM snapshots s
        WHERE s.entity_type = k.entity_type AND s.entity_id = k.entity_id
        ORDER BY s.version DESC OFFSET $3) old))";

const PRUNE_ALL: &str = "
DELETE FROM snapshots WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY entity_type, entity_id ORDER BY version DESC) AS rn
        FROM snapshots
    ) ranked WHERE rn > $1)";

/// Snapshots in a Postgres database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(super) async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let target = redact(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::BadUrl(target.clone()))?
            // stabilize's replay reads timestamptz in a UTC session; so do we.
            // Every statement is planned for its own arguments: a generic
            // plan cached while the snapshots table was small (a new
            // deployment, never analysed yet) kept scanning all of it per
            // batch once it held a million rows.
            .options([
                ("TimeZone", "UTC"),
                ("plan_cache_mode", "force_custom_plan"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { target, source })?;
        Ok(PgStore { pool })
    }

    /// The pool, for the event-table reader that shares the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        // A table we create keeps its states compressed with lz4 where the
        // server has it (PostgreSQL 14 or later built with lz4): writing is
        // about twice as fast as with pglz, and readers, stabilize among
        // them, see no difference. An existing table is left as it is.
        let lz4: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_or(v = 'lz4'), false) FROM pg_settings, \
             unnest(enumvals) AS v WHERE name = 'default_toast_compression'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::query("check the server's compression methods"))?;
        // `CREATE INDEX IF NOT EXISTS` locks the table even when the index
        // exists: with several daemons on one database, a node starting
        // would hold up every other node's writes. Existing: no DDL at all.
        let exists: bool = sqlx::query_scalar(
            "SELECT to_regclass('snapshots') IS NOT NULL \
             AND to_regclass('idx_snapshots_entity') IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::query("look for the snapshots table"))?;
        let ddls = if exists { &[][..] } else { POSTGRES_SNAPSHOTS };
        for ddl in ddls {
            let ddl = if lz4 {
                ddl.replacen(
                    "state JSONB NOT NULL",
                    "state JSONB COMPRESSION lz4 NOT NULL",
                    1,
                )
            } else {
                ddl.to_string()
            };
            sqlx::query(sqlx::AssertSqlSafe(ddl))
                .execute(&self.pool)
                .await
                .map_err(StoreError::query("create the snapshots table"))?;
        }
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'snapshots' AND table_schema = current_schema()",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::query("inspect the snapshots table"))?;
        match missing_columns(&columns) {
            Some(reason) => Err(StoreError::Schema {
                table: "snapshots",
                reason,
            }),
            None => Ok(()),
        }
    }

    pub(super) async fn save_rows(
        &self,
        all: &[&PreparedSnapshot],
        fence: Option<&WriteFence>,
    ) -> Result<BatchOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let (rows, fenced) = fence_rows(&mut tx, all, fence).await?;
        match upsert(&mut tx, &rows).await {
            Ok(written) => {
                log_writes(&mut tx, &rows, fence).await?;
                tx.commit()
                    .await
                    .map_err(StoreError::query("commit a snapshot batch"))?;
                Ok(BatchOutcome {
                    written,
                    skipped: rows.len() as u64 - written,
                    fenced,
                    ..BatchOutcome::default()
                })
            }
            Err(error) if is_row_error(&error) => {
                drop(tx);
                self.save_rows_one_by_one(all, fence).await
            }
            Err(source) => Err(StoreError::Query {
                op: "upsert a snapshot batch",
                source,
            }),
        }
    }

    /// The batch statement failed on some row's data: write row by row, each
    /// under a savepoint, so the bad row is named and the others still land.
    async fn save_rows_one_by_one(
        &self,
        all: &[&PreparedSnapshot],
        fence: Option<&WriteFence>,
    ) -> Result<BatchOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let (rows, fenced) = fence_rows(&mut tx, all, fence).await?;
        let mut outcome = BatchOutcome {
            fenced,
            ..BatchOutcome::default()
        };
        let mut landed = Vec::with_capacity(rows.len());
        for row in &rows {
            savepoint(&mut tx, "SAVEPOINT snapshot_row").await?;
            match upsert(&mut tx, std::slice::from_ref(row)).await {
                Ok(written) => {
                    savepoint(&mut tx, "RELEASE SAVEPOINT snapshot_row").await?;
                    landed.push(*row);
                    outcome.written += written;
                    outcome.skipped += 1 - written;
                }
                Err(error) if is_row_error(&error) => {
                    savepoint(&mut tx, "ROLLBACK TO SAVEPOINT snapshot_row").await?;
                    outcome.rejected.push(Rejected {
                        key: row.key.clone(),
                        version: row.version,
                        reason: format!("PostgreSQL refused the row: {error}"),
                    });
                }
                Err(source) => {
                    return Err(StoreError::Query {
                        op: "upsert a snapshot",
                        source,
                    });
                }
            }
        }
        log_writes(&mut tx, &landed, fence).await?;
        tx.commit()
            .await
            .map_err(StoreError::query("commit a snapshot batch"))?;
        Ok(outcome)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin()
            .await
            .map_err(StoreError::query("begin a transaction"))
    }

    pub(super) async fn coverage(
        &self,
        rows: &[&PreparedSnapshot],
    ) -> Result<Vec<i64>, StoreError> {
        let workflows: Vec<&str> = rows.iter().map(|r| &*r.workflow_id).collect();
        let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
        sqlx::query_scalar(COVERAGE)
            .bind(workflows)
            .bind(sequences)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::query("count workflows' events"))
    }

    /// Every row of the entity, oldest version first.
    pub(super) async fn rows_of(&self, key: &EntityKey) -> Result<Vec<StoredRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_ROW} WHERE entity_type = $1 AND entity_id = $2 ORDER BY version"
        )))
        .bind(key.entity_type.as_str())
        .bind(&*key.entity_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::query("read an entity's snapshots"))?;
        rows.iter().map(decode).collect()
    }

    /// The newest row of each of `keys` that has one.
    pub(super) async fn latest_rows(
        &self,
        keys: &[EntityKey],
    ) -> Result<Vec<StoredRow>, StoreError> {
        let types: Vec<&str> = keys.iter().map(|k| k.entity_type.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| &*k.entity_id).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT newest.* \
             FROM (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS k(t, id) \
             CROSS JOIN LATERAL ({SELECT_ROW} WHERE entity_type = k.t AND entity_id = k.id \
               ORDER BY version DESC LIMIT 1) newest"
        )))
        .bind(&types)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::query("read the latest snapshots"))?;
        rows.iter().map(decode).collect()
    }

    pub(super) async fn prune(
        &self,
        keys: Option<&[EntityKey]>,
        keep: u32,
    ) -> Result<u64, StoreError> {
        let result = match keys {
            Some(keys) => {
                let types: Vec<&str> = keys.iter().map(|k| k.entity_type.as_str()).collect();
                let ids: Vec<&str> = keys.iter().map(|k| &*k.entity_id).collect();
                sqlx::query(PRUNE_ENTITIES)
                    .bind(types)
                    .bind(ids)
                    .bind(i64::from(keep))
                    .execute(&self.pool)
                    .await
            }
            None => {
                sqlx::query(PRUNE_ALL)
                    .bind(i64::from(keep))
                    .execute(&self.pool)
                    .await
            }
        };
        Ok(result
            .map_err(StoreError::query("prune old snapshots"))?
            .rows_affected())
    }

    pub(super) async fn for_each_row(
        &self,
        each: &mut (dyn FnMut(StoredRow) + Send),
    ) -> Result<(), StoreError> {
        let mut rows = sqlx::query(SELECT_ROW).fetch(&self.pool);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(StoreError::query("read the snapshots table"))?
        {
            each(decode(&row)?);
        }
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// In a cluster, inside the writing transaction: lock the lease rows of
/// the batch's partitions (`FOR SHARE`, in partition order) and keep only
/// the rows whose lease is still this node's at their epoch. The others
/// are returned as fenced. Without a fence, every row is kept.
async fn fence_rows<'a>(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&'a PreparedSnapshot],
    fence: Option<&WriteFence>,
) -> Result<(Vec<&'a PreparedSnapshot>, Vec<EntityKey>), StoreError> {
    let Some(fence) = fence else {
        return Ok((rows.to_vec(), Vec::new()));
    };
    let op = StoreError::query("check the partition leases");
    // A node frozen inside this transaction must not keep the rows locked.
    sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
        .bind(format!("{}ms", fence.idle_timeout.as_millis().max(1)))
        .execute(&mut **tx)
        .await
        .map_err(op)?;
    let mut partitions: Vec<i32> = rows
        .iter()
        .filter_map(|r| r.fence.map(|f| f.partition as i32))
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    let held: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, epoch FROM snapshotd_partitions \
         WHERE partition = ANY($1) AND owner = $2 ORDER BY partition FOR SHARE",
    )
    .bind(&partitions)
    .bind(&fence.node_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::query("check the partition leases"))?;
    let held: std::collections::HashMap<u32, i64> =
        held.into_iter().map(|(p, e)| (p as u32, e)).collect();
    let (kept, fenced): (Vec<_>, Vec<_>) = rows.iter().partition(|row| match row.fence {
        Some(f) => held.get(&f.partition) == Some(&f.epoch),
        None => true,
    });
    Ok((kept, fenced.into_iter().map(|r| r.key.clone()).collect()))
}

/// With `cluster.write_log`: one row per snapshot written, in the
/// transaction that writes it.
async fn log_writes(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&PreparedSnapshot],
    fence: Option<&WriteFence>,
) -> Result<(), StoreError> {
    let Some(fence) = fence.filter(|f| f.write_log) else {
        return Ok(());
    };
    if rows.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = rows
        .iter()
        .map(|r| r.fence.map_or(-1, |f| f.partition as i32))
        .collect();
    let epochs: Vec<i64> = rows
        .iter()
        .map(|r| r.fence.map_or(-1, |f| f.epoch))
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| &*r.key.entity_id).collect();
    let versions: Vec<i32> = rows.iter().map(|r| r.version).collect();
    sqlx::query(
        "INSERT INTO snapshotd_cluster_writes (node_id, partition, epoch, entity_id, version) \
         SELECT $1, * FROM UNNEST($2::int4[], $3::int8[], $4::text[], $5::int4[])",
    )
    .bind(&fence.node_id)
    .bind(partitions)
    .bind(epochs)
    .bind(ids)
    .bind(versions)
    .execute(&mut **tx)
    .await
    .map(drop)
    .map_err(StoreError::query("log the cluster's writes"))
}

async fn savepoint(
    tx: &mut Transaction<'_, Postgres>,
    sql: &'static str,
) -> Result<(), StoreError> {
    sqlx::query(sql)
        .execute(&mut **tx)
        .await
        .map(drop)
        .map_err(StoreError::query("manage a savepoint"))
}

async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&PreparedSnapshot],
) -> Result<u64, sqlx::Error> {
    let n = rows.len();
    let mut entity_types = Vec::with_capacity(n);
    let mut entity_ids = Vec::with_capacity(n);
    let mut workflow_ids = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut sequences = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for row in rows {
        let s = row;
        entity_types.push(s.key.entity_type.as_str());
        entity_ids.push(&*s.key.entity_id);
        workflow_ids.push(&*s.workflow_id);
        versions.push(s.version);
        sequences.push(s.sequence);
        states.push(row.state_text.as_str());
        hashes.push(s.state_hash.as_str());
        created.push(s.created_at);
    }
    // The arguments' buffer sized once: grown by doubling, a batch of
    // states tens of KB each took fresh pages (zeroed by the kernel) for
    // every step of its growth.
    let size: usize = rows
        .iter()
        .map(|s| {
            s.state_text.len() + s.state_hash.len() + s.key.entity_id.len() + s.workflow_id.len()
        })
        .sum::<usize>()
        + n * 80
        + 256;
    let mut args = sqlx::postgres::PgArguments::default();
    args.reserve(8, size);
    let bound = (|| {
        args.add(entity_types)?;
        args.add(entity_ids)?;
        args.add(workflow_ids)?;
        args.add(versions)?;
        args.add(sequences)?;
        args.add(states)?;
        args.add(hashes)?;
        args.add(created)
    })();
    bound.map_err(sqlx::Error::Encode)?;
    let result = sqlx::query_with(UPSERT, args).execute(&mut **tx).await?;
    Ok(result.rows_affected())
}

/// Data exceptions (class 22), constraint violations (23) and program limits
/// (54) are the row's fault; anything else is the store's.
fn is_row_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
        }),
        _ => false,
    }
}

fn decode(row: &PgRow) -> Result<StoredRow, StoreError> {
    let get = |source| StoreError::Query {
        op: "decode a snapshot row",
        source,
    };
    Ok(StoredRow {
        entity_type: row.try_get("entity_type").map_err(get)?,
        entity_id: row.try_get("entity_id").map_err(get)?,
        workflow_id: row.try_get("workflow_id").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
        sequence: row.try_get("sequence").map_err(get)?,
        state_text: row.try_get("state").map_err(get)?,
        state_hash: row.try_get("state_hash").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
    })
}
