//! The SQLite backend, the embedded default: all rows of a batch in one
//! transaction, written by multi-row upserts of [`ROWS_PER_STATEMENT`] rows
//! (each statement crosses to sqlx's worker thread, so one per row cost
//! more than the row), or one row at a time where a row is refused or an
//! entity appears twice in the batch.

use super::schema::{SQLITE_SNAPSHOTS, missing_columns};
use super::{BatchOutcome, Rejected, StoreError, StoredRow};
use crate::model::{EntityKey, PreparedSnapshot};
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Rows per multi-row upsert (8 parameters each: well under SQLite's
/// 32,766), and entities per prune statement.
const ROWS_PER_STATEMENT: usize = 200;

/// `(?, ?, …), (?, ?, …), …`: a VALUES list of `rows` rows of `columns`
/// parameters each.
fn values_list(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// Upsert `rows` rows (one, or many of distinct entities): a row older than
/// what the table holds for its entity is skipped, a same-version row is
/// replaced only when it differs; each is judged against the table as it
/// was before the statement.
fn multi_upsert(rows: usize) -> String {
    let values = values_list(rows, 8);
    format!(
        "INSERT INTO snapshots
    (entity_type, entity_id, workflow_id, version, sequence, state, state_hash, created_at)
SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8
FROM (VALUES {values}) AS v
WHERE NOT EXISTS (
    SELECT 1 FROM snapshots s
    WHERE s.entity_type = v.column1 AND s.entity_id = v.column2 AND s.version > v.column4)
ON CONFLICT (entity_type, entity_id, version) DO UPDATE SET
    workflow_id = excluded.workflow_id,
    sequence = excluded.sequence,
    state = excluded.state,
    state_hash = excluded.state_hash,
    created_at = excluded.created_at
WHERE snapshots.state_hash IS NOT excluded.state_hash
   OR snapshots.sequence <> excluded.sequence"
    )
}

/// Delete all but the newest `keep` rows of `keys` entities (the last
/// parameter), in one statement.
fn multi_prune(keys: usize) -> String {
    let values = values_list(keys, 2);
    format!(
        "DELETE FROM snapshots WHERE id IN (
    SELECT id FROM (
        SELECT s.id, row_number() OVER (
            PARTITION BY s.entity_type, s.entity_id ORDER BY s.version DESC) AS rn
        FROM snapshots s
        JOIN (VALUES {values}) AS k ON s.entity_type = k.column1 AND s.entity_id = k.column2
    ) WHERE rn > ?)"
    )
}

const SELECT_ROW: &str = "SELECT entity_type, entity_id, workflow_id, version, sequence, \
     state, state_hash, created_at FROM snapshots";

const PRUNE_ALL: &str = "
DELETE FROM snapshots WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY entity_type, entity_id ORDER BY version DESC) AS rn
        FROM snapshots
    ) WHERE rn > ?1)";

/// The `created_at` text format of stabilize's SQLite default, with microseconds.
const CREATED_AT_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

/// Snapshots in an SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub(super) async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::BadUrl(url.to_string()))?
            // The journal mode is left as the file has it: stabilize sets
            // DELETE on every connection it opens to a shared file.
            .create_if_missing(true)
            .synchronous(SqliteSynchronous::Normal)
            // 64 MiB of page cache per connection instead of 2 MiB: batches
            // of thousands of rows touch index pages all over the file.
            .pragma("cache_size", "-65536")
            .busy_timeout(Duration::from_secs(10));
        let path = options.get_filename();
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.display().to_string(),
                source,
            })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect {
                target: url.to_string(),
                source,
            })?;
        Ok(SqliteStore { pool })
    }

    /// The pool, for the event-table reader that shares the file.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        for ddl in SQLITE_SNAPSHOTS {
            sqlx::query(*ddl)
                .execute(&self.pool)
                .await
                .map_err(StoreError::query("create the snapshots table"))?;
        }
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('snapshots')")
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
        rows: &[&PreparedSnapshot],
    ) -> Result<BatchOutcome, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::query("begin a transaction"))?;
        let mut outcome = BatchOutcome::default();
        let distinct = rows
            .iter()
            .map(|r| &r.key)
            .collect::<std::collections::HashSet<_>>()
            .len()
            == rows.len();
        let mut one_by_one: Vec<&PreparedSnapshot> = Vec::new();
        if distinct {
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                match upsert_many(&mut tx, chunk).await {
                    Ok(written) => {
                        outcome.written += written;
                        outcome.skipped += chunk.len() as u64 - written;
                    }
                    // The statement rolled back alone: find the row.
                    Err(error) if is_row_error(&error) => one_by_one.extend(chunk.iter().copied()),
                    Err(source) => {
                        return Err(StoreError::Query {
                            op: "upsert snapshots",
                            source,
                        });
                    }
                }
            }
        } else {
            one_by_one.extend(rows.iter().copied());
        }
        for row in &one_by_one {
            match upsert_many(&mut tx, std::slice::from_ref(row)).await {
                Ok(written) => {
                    outcome.written += written;
                    outcome.skipped += 1 - written;
                }
                // A failed statement rolls back only itself in SQLite.
                Err(error) if is_row_error(&error) => outcome.rejected.push(Rejected {
                    key: row.key.clone(),
                    version: row.version,
                    reason: format!("SQLite refused the row: {error}"),
                }),
                Err(source) => {
                    return Err(StoreError::Query {
                        op: "upsert a snapshot",
                        source,
                    });
                }
            }
        }
        tx.commit()
            .await
            .map_err(StoreError::query("commit a snapshot batch"))?;
        Ok(outcome)
    }

    /// Every row of the entity, oldest version first.
    pub(super) async fn rows_of(&self, key: &EntityKey) -> Result<Vec<StoredRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT_ROW} WHERE entity_type = ?1 AND entity_id = ?2 ORDER BY version"
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
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let values = values_list(chunk.len(), 2);
            let sql = format!(
                "{SELECT_ROW} WHERE id IN (SELECT (SELECT s.id FROM snapshots s \
                 WHERE s.entity_type = k.column1 AND s.entity_id = k.column2 \
                 ORDER BY s.version DESC LIMIT 1) FROM (VALUES {values}) AS k)"
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for key in chunk {
                query = query.bind(key.entity_type.as_str()).bind(&*key.entity_id);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::query("read the latest snapshots"))?;
            for row in &rows {
                out.push(decode(row)?);
            }
        }
        Ok(out)
    }

    pub(super) async fn prune(
        &self,
        keys: Option<&[EntityKey]>,
        keep: u32,
    ) -> Result<u64, StoreError> {
        let map = StoreError::query("prune old snapshots");
        match keys {
            None => Ok(sqlx::query(PRUNE_ALL)
                .bind(i64::from(keep))
                .execute(&self.pool)
                .await
                .map_err(map)?
                .rows_affected()),
            Some(keys) => {
                let mut tx = self
                    .pool
                    .begin()
                    .await
                    .map_err(StoreError::query("begin a transaction"))?;
                let mut deleted = 0;
                for chunk in keys.chunks(ROWS_PER_STATEMENT) {
                    let sql = multi_prune(chunk.len());
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for key in chunk {
                        query = query.bind(key.entity_type.as_str()).bind(&*key.entity_id);
                    }
                    deleted += query
                        .bind(i64::from(keep))
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::query("prune old snapshots"))?
                        .rows_affected();
                }
                tx.commit().await.map_err(map)?;
                Ok(deleted)
            }
        }
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

/// [`multi_upsert`] of `rows` (distinct entities); the rows written.
async fn upsert_many(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[&PreparedSnapshot],
) -> Result<u64, sqlx::Error> {
    let created: Vec<String> = rows
        .iter()
        .map(|s| s.created_at.format(CREATED_AT_FORMAT).to_string())
        .collect();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(multi_upsert(rows.len())));
    for (s, created) in rows.iter().zip(&created) {
        query = query
            .bind(s.key.entity_type.as_str())
            .bind(&*s.key.entity_id)
            .bind(&*s.workflow_id)
            .bind(i64::from(s.version))
            .bind(s.sequence)
            .bind(s.state_text.as_str())
            .bind(s.state_hash.as_str())
            .bind(created.as_str());
    }
    Ok(query.execute(&mut **tx).await?.rows_affected())
}

/// Constraint (19), type mismatch (20) and too-big (18) errors are the
/// row's fault; I/O, full disk, busy and the like are the store's.
fn is_row_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            let primary = code.parse::<i32>().unwrap_or(0) & 0xff;
            matches!(primary, 18..=20)
        }),
        _ => false,
    }
}

fn decode(row: &SqliteRow) -> Result<StoredRow, StoreError> {
    let get = |source| StoreError::Query {
        op: "decode a snapshot row",
        source,
    };
    let created_at: Option<String> = row.try_get("created_at").map_err(get)?;
    Ok(StoredRow {
        entity_type: row.try_get("entity_type").map_err(get)?,
        entity_id: row.try_get("entity_id").map_err(get)?,
        workflow_id: row.try_get("workflow_id").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
        sequence: row.try_get("sequence").map_err(get)?,
        state_text: row.try_get("state").map_err(get)?,
        state_hash: row.try_get("state_hash").map_err(get)?,
        created_at: created_at.as_deref().and_then(parse_created_at),
    })
}

/// stabilize's SQLite default writes `YYYY-MM-DD HH:MM:SS`; we add
/// microseconds; an ISO 8601 text with an offset is accepted too.
fn parse_created_at(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc())
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_at_is_read_in_stabilizes_and_our_formats() {
        assert!(parse_created_at("2026-11-26 03:59:48").is_some());
        assert!(parse_created_at("2026-11-26 03:59:48.120000").is_some());
        assert!(parse_created_at("2026-11-26T03:59:48+00:00").is_some());
        assert!(parse_created_at("yesterday").is_none());
    }
}
