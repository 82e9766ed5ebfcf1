//! The snapshot store: stabilize's own `snapshots` table on SQLite (the
//! embedded default) or Postgres, behind one type.
//!
//! * `save_batch` commits a whole batch in one transaction; a row that cannot
//!   be stored is reported with its entity and does not fail the others; a
//!   write never replaces a newer snapshot of an entity with an older one.
//! * `latest` verifies the hash of what it returns; a mismatch is
//!   [`StoreError::Integrity`], never good data.
//! * Every statement is parameterised.

mod events;
mod feed;
mod postgres;
mod schema;
mod sqlite;

use crate::model::canonical::{canonical_json, sha256_hex};
use crate::model::{EntityKey, EntityType, PreparedSnapshot, Snapshot, check_id};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

pub use events::EventsTableWatch;
pub use feed::{FeedCursor, FeedOrder, FeedPage, Partitions};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Everything that can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL `{0}` is not understood: use postgres://... or sqlite://PATH")]
    BadUrl(String),
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create the directory for the SQLite file {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store query failed while trying to {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("table `{table}` exists but is not stabilize's schema: {reason}")]
    Schema { table: &'static str, reason: String },
    #[error(
        "integrity check failed for {key} version {version}: stored state_hash {stored} but the state hashes to {computed}"
    )]
    Integrity {
        key: EntityKey,
        version: i64,
        stored: String,
        computed: String,
    },
    #[error("stored snapshot of {key} version {version} cannot be read: {reason}")]
    Corrupt {
        key: String,
        version: i64,
        reason: String,
    },
    #[error("committing a batch failed unexpectedly: {0}")]
    Aborted(String),
}

impl StoreError {
    pub(crate) fn query(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Query { op, source }
    }

    /// True when the store itself is unreachable or failing (worth a retry),
    /// false when the data is at fault (a retry gives the same answer).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Connect { .. } | StoreError::Query { .. })
    }
}

/// A row of a batch that was not stored, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub key: EntityKey,
    pub version: i32,
    pub reason: String,
}

/// What `save_batch` did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchOutcome {
    /// Rows inserted or updated.
    pub written: u64,
    /// Rows skipped because the store already holds a newer (or the same) snapshot.
    pub skipped: u64,
    /// Rows refused, each naming its entity.
    pub rejected: Vec<Rejected>,
    /// Rows not written because the events table disagrees with their
    /// version (see [`Store::save_prepared`]).
    pub mismatched: Vec<Uncovered>,
    /// Rows not written because their partition's lease is no longer this
    /// node's at their epoch (a cluster: [`WriteFence`]).
    pub fenced: Vec<EntityKey>,
}

/// Who writes, in a cluster: a row carrying a [`crate::model::Fence`] is
/// written only if, inside the writing transaction, the lease table still
/// gives its partition to `node_id` at its epoch (the lease rows are locked
/// `FOR SHARE` until the commit, so a takeover waits or comes first).
#[derive(Clone, Debug)]
pub struct WriteFence {
    pub node_id: String,
    /// Record every row written (node, partition, epoch) in
    /// `snapshotd_cluster_writes`, in the same transaction.
    pub write_log: bool,
    /// Longest the writing transaction may sit idle (a frozen node must
    /// not hold its lease rows locked).
    pub idle_timeout: std::time::Duration,
}

/// A snapshot whose version is not the number of its workflow's events up
/// to its sequence in the events table: its state cannot be the replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Uncovered {
    pub key: EntityKey,
    pub version: i32,
    pub sequence: i64,
    pub table_count: i64,
}

/// One bad row found by `verify_all`.
#[derive(Debug)]
pub struct Mismatch {
    pub error: StoreError,
}

/// What `verify_all` saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    pub rows: u64,
    pub bad: u64,
}

/// The store, on one of its two backends.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Connection settings for [`Store::connect`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub url: String,
    pub pool_size: u32,
}

impl Store {
    /// Connect from a URL (`postgres://...`, `postgresql://...`,
    /// `sqlite://PATH`; the SQLite file and its directory are created when
    /// missing). Does not create tables: see [`Store::migrate`].
    pub async fn connect(options: &StoreOptions) -> Result<Store, StoreError> {
        let url = options.url.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(
                PgStore::connect(url, options.pool_size).await?,
            ))
        } else if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(
                SqliteStore::connect(url, options.pool_size).await?,
            ))
        } else {
            Err(StoreError::BadUrl(redact(url)))
        }
    }

    /// The form numbers must be kept in so this store's reader (and
    /// stabilize's replay on the same database) sees them unchanged.
    pub fn number_form(&self) -> crate::model::canonical::NumberForm {
        match self {
            Store::Postgres(_) => crate::model::canonical::NumberForm::Jsonb,
            Store::Sqlite(_) => crate::model::canonical::NumberForm::Python,
        }
    }

    /// How many batches may commit at once, of the `wanted`: SQLite takes
    /// one writer at a time.
    pub fn write_connections(&self, wanted: usize) -> usize {
        match self {
            Store::Postgres(_) => wanted.max(1),
            Store::Sqlite(_) => 1,
        }
    }

    /// Create stabilize's `snapshots` table when missing; check it otherwise.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.migrate().await,
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    /// Upsert a batch in one transaction (see the module doc).
    pub async fn save_batch(&self, batch: &[Snapshot]) -> Result<BatchOutcome, StoreError> {
        let mut rejected = Vec::new();
        let mut prepared = Vec::with_capacity(batch.len());
        for snapshot in batch {
            match snapshot.prepare() {
                Ok(p) => prepared.push(p),
                Err(reason) => rejected.push(Rejected {
                    key: snapshot.key.clone(),
                    version: snapshot.version,
                    reason,
                }),
            }
        }
        let refs: Vec<&PreparedSnapshot> = prepared.iter().collect();
        let mut outcome = self.save_prepared(&refs, false).await?;
        rejected.append(&mut outcome.rejected);
        outcome.rejected = rejected;
        Ok(outcome)
    }

    /// Upsert prepared snapshots in one transaction. With `covered`, only
    /// snapshots whose version equals the number of their workflow's events
    /// up to their sequence in stabilize's `events` table are written; the
    /// others are returned in `mismatched`.
    pub async fn save_prepared(
        &self,
        batch: &[&PreparedSnapshot],
        covered: bool,
    ) -> Result<BatchOutcome, StoreError> {
        self.save_fenced(batch, covered, None).await
    }

    /// [`Store::save_prepared`], fenced in a cluster (PostgreSQL only;
    /// `fence` is ignored on SQLite, which a cluster never uses).
    pub async fn save_fenced(
        &self,
        batch: &[&PreparedSnapshot],
        covered: bool,
        fence: Option<&WriteFence>,
    ) -> Result<BatchOutcome, StoreError> {
        let (mut rows, rejected) = prepare_batch(batch);
        let mut mismatched = Vec::new();
        if covered && !rows.is_empty() {
            let counts = self.coverage(&rows).await?;
            let mut kept = Vec::with_capacity(rows.len());
            for (row, table_count) in rows.into_iter().zip(counts) {
                if table_count == i64::from(row.version) {
                    kept.push(row);
                } else {
                    mismatched.push(Uncovered {
                        key: row.key.clone(),
                        version: row.version,
                        sequence: row.sequence,
                        table_count,
                    });
                }
            }
            rows = kept;
        }
        let not_written = (batch.len() - rows.len() - rejected.len() - mismatched.len()) as u64;
        let mut outcome = if rows.is_empty() {
            BatchOutcome::default()
        } else {
            match self {
                Store::Postgres(s) => s.save_rows(&rows, fence).await?,
                Store::Sqlite(s) => s.save_rows(&rows).await?,
            }
        };
        outcome.skipped += not_written;
        let mut all_rejected = rejected;
        all_rejected.append(&mut outcome.rejected);
        outcome.rejected = all_rejected;
        outcome.mismatched = mismatched;
        Ok(outcome)
    }

    /// For each row, how many events of its workflow the table holds up to
    /// its sequence.
    async fn coverage(&self, rows: &[&PreparedSnapshot]) -> Result<Vec<i64>, StoreError> {
        match self {
            Store::Postgres(s) => s.coverage(rows).await,
            Store::Sqlite(_) => {
                let mut counts = Vec::with_capacity(rows.len());
                for row in rows {
                    counts.push(
                        self.count_workflow_events(&row.workflow_id, row.sequence)
                            .await?,
                    );
                }
                Ok(counts)
            }
        }
    }

    /// The entity's snapshot with the highest version, hash verified.
    pub async fn latest(&self, key: &EntityKey) -> Result<Option<Snapshot>, StoreError> {
        let keys = std::slice::from_ref(key);
        let row = match self {
            Store::Postgres(s) => s.latest_rows(keys).await?,
            Store::Sqlite(s) => s.latest_rows(keys).await?,
        };
        row.into_iter()
            .next()
            .map(StoredRow::into_snapshot)
            .transpose()
    }

    /// [`Store::latest`] of many entities in one query: for each key with a
    /// stored snapshot, its newest row, verified (an `Err` per bad row).
    pub async fn latest_many(
        &self,
        keys: &[EntityKey],
    ) -> Result<Vec<(EntityKey, Result<Snapshot, StoreError>)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows = match self {
            Store::Postgres(s) => s.latest_rows(keys).await?,
            Store::Sqlite(s) => s.latest_rows(keys).await?,
        };
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let entity_type = row.entity_type.parse::<EntityType>().ok()?;
                let key = EntityKey::new(entity_type, row.entity_id.as_str());
                Some((key, row.into_snapshot()))
            })
            .collect())
    }

    /// Every snapshot row of the entity, oldest version first; each is
    /// hash-verified (an `Err` names the row that fails).
    pub async fn snapshots_of(
        &self,
        key: &EntityKey,
    ) -> Result<Vec<Result<Snapshot, StoreError>>, StoreError> {
        let rows = match self {
            Store::Postgres(s) => s.rows_of(key).await?,
            Store::Sqlite(s) => s.rows_of(key).await?,
        };
        Ok(rows.into_iter().map(StoredRow::into_snapshot).collect())
    }

    /// The ids of every workflow with a stored snapshot.
    pub async fn workflows_with_snapshots(&self) -> Result<Vec<String>, StoreError> {
        const SQL: &str = "SELECT DISTINCT entity_id FROM snapshots WHERE entity_type = 'workflow' \
             ORDER BY entity_id";
        let op = StoreError::query("list the snapshotted workflows");
        match self {
            Store::Postgres(s) => sqlx::query_scalar(SQL)
                .fetch_all(s.pool())
                .await
                .map_err(op),
            Store::Sqlite(s) => sqlx::query_scalar(SQL)
                .fetch_all(s.pool())
                .await
                .map_err(op),
        }
    }

    /// Up to `limit` ids of workflows with a stored snapshot, after `after`
    /// in id order (a page of a scan that holds no long transaction).
    pub async fn workflows_with_snapshots_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let op = StoreError::query("list the snapshotted workflows");
        match self {
            Store::Postgres(s) => sqlx::query_scalar(
                "SELECT DISTINCT entity_id FROM snapshots WHERE entity_type = 'workflow' \
                 AND entity_id > $1 ORDER BY entity_id LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(s.pool())
            .await
            .map_err(op),
            Store::Sqlite(s) => sqlx::query_scalar(
                "SELECT DISTINCT entity_id FROM snapshots WHERE entity_type = 'workflow' \
                 AND entity_id > ?1 ORDER BY entity_id LIMIT ?2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(s.pool())
            .await
            .map_err(op),
        }
    }

    /// Whether any snapshot of the entity is stored (no read of its state).
    pub async fn has_snapshot(&self, key: &EntityKey) -> Result<bool, StoreError> {
        let op = StoreError::query("look for an entity's snapshot");
        match self {
            Store::Postgres(s) => sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE entity_type = $1 AND entity_id = $2)",
            )
            .bind(key.entity_type.as_str())
            .bind(&*key.entity_id)
            .fetch_one(s.pool())
            .await
            .map_err(op),
            Store::Sqlite(s) => sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE entity_type = ?1 AND entity_id = ?2)",
            )
            .bind(key.entity_type.as_str())
            .bind(&*key.entity_id)
            .fetch_one(s.pool())
            .await
            .map_err(op),
        }
    }

    /// Keep the newest `keep` snapshots of every entity (0 keeps all).
    /// Returns the number of rows deleted.
    pub async fn prune(&self, keep: u32) -> Result<u64, StoreError> {
        if keep == 0 {
            return Ok(0);
        }
        match self {
            Store::Postgres(s) => s.prune(None, keep).await,
            Store::Sqlite(s) => s.prune(None, keep).await,
        }
    }

    /// [`Store::prune`] restricted to some entities (what a writer just wrote).
    pub async fn prune_entities(&self, keys: &[EntityKey], keep: u32) -> Result<u64, StoreError> {
        if keep == 0 || keys.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(s) => s.prune(Some(keys), keep).await,
            Store::Sqlite(s) => s.prune(Some(keys), keep).await,
        }
    }

    /// Stream every row, recompute its hash, report each bad one to
    /// `on_bad`. Memory stays constant whatever the table size.
    pub async fn verify_all(
        &self,
        mut on_bad: impl FnMut(Mismatch) + Send,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut check = |row: StoredRow| {
            report.rows += 1;
            if let Err(error) = row.into_snapshot() {
                report.bad += 1;
                on_bad(Mismatch { error });
            }
        };
        match self {
            Store::Postgres(s) => s.for_each_row(&mut check).await?,
            Store::Sqlite(s) => s.for_each_row(&mut check).await?,
        }
        Ok(report)
    }

    /// Wait for in-flight queries and close every connection.
    pub async fn close(&self) {
        match self {
            Store::Postgres(s) => s.close().await,
            Store::Sqlite(s) => s.close().await,
        }
    }
}

/// Keep the newest snapshot per entity and check each row the way the
/// database would, so one bad row is named instead of failing the batch.
fn prepare_batch<'a>(batch: &[&'a PreparedSnapshot]) -> (Vec<&'a PreparedSnapshot>, Vec<Rejected>) {
    let mut newest: HashMap<&EntityKey, &'a PreparedSnapshot> = HashMap::with_capacity(batch.len());
    for &snapshot in batch {
        newest
            .entry(&snapshot.key)
            .and_modify(|kept| {
                if snapshot.version > kept.version {
                    *kept = snapshot;
                }
            })
            .or_insert(snapshot);
    }
    let mut rows = Vec::with_capacity(newest.len());
    let mut rejected = Vec::new();
    for snapshot in newest.into_values() {
        match check_row(snapshot) {
            Ok(()) => rows.push(snapshot),
            Err(reason) => rejected.push(Rejected {
                key: snapshot.key.clone(),
                version: snapshot.version,
                reason,
            }),
        }
    }
    (rows, rejected)
}

fn check_row(snapshot: &PreparedSnapshot) -> Result<(), String> {
    check_id(&snapshot.key.entity_id).map_err(|e| format!("entity_id {e}"))?;
    check_id(&snapshot.workflow_id).map_err(|e| format!("workflow_id {e}"))?;
    if snapshot.version < 1 {
        return Err(format!(
            "version must be positive, got {}",
            snapshot.version
        ));
    }
    if snapshot.sequence < 1 {
        return Err(format!(
            "sequence must be positive, got {}",
            snapshot.sequence
        ));
    }
    Ok(())
}

/// A row as read from either backend, not yet trusted.
pub(crate) struct StoredRow {
    pub entity_type: String,
    pub entity_id: String,
    pub workflow_id: String,
    pub version: i64,
    pub sequence: i64,
    pub state_text: String,
    pub state_hash: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

impl StoredRow {
    /// Parse and verify. The state is read as Python reads it (no number
    /// rewriting), so the hash is the one stabilize would compute.
    fn into_snapshot(self) -> Result<Snapshot, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: format!("{}/{}", self.entity_type, self.entity_id),
            version: self.version,
            reason,
        };
        let entity_type: EntityType = self
            .entity_type
            .parse()
            .map_err(|e: crate::model::UnknownEntityType| corrupt(e.to_string()))?;
        let key = EntityKey::new(entity_type, self.entity_id.as_str());
        let version = i32::try_from(self.version)
            .map_err(|_| corrupt(format!("version {} out of range", self.version)))?;
        let state: Value = serde_json::from_str(&self.state_text)
            .map_err(|e| corrupt(format!("state is not valid JSON: {e}")))?;
        let computed = canonical_json(&state)
            .map(|c| sha256_hex(c.as_bytes()))
            .map_err(|e| corrupt(format!("state cannot be hashed: {e}")))?;
        // stabilize accepts a row without a hash (written before hashes
        // existed); so do we, since there is nothing to check it against.
        let stored = self.state_hash.unwrap_or_else(|| computed.clone());
        if stored != computed {
            return Err(StoreError::Integrity {
                key,
                version: self.version,
                stored,
                computed,
            });
        }
        Ok(Snapshot {
            key,
            workflow_id: Arc::from(self.workflow_id.as_str()),
            version,
            sequence: self.sequence,
            state,
            state_hash: stored,
            created_at: self.created_at.unwrap_or(DateTime::UNIX_EPOCH),
        })
    }
}

/// A URL with its password replaced, fit for logs and messages.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _password)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("sqlite://./x.db"), "sqlite://./x.db");
    }

    #[test]
    fn a_batch_keeps_only_the_newest_snapshot_of_an_entity() {
        let key = EntityKey::new(EntityType::Workflow, "w1");
        let s1 = Snapshot::new(key.clone(), "w1", 1, 10, serde_json::json!({"a": 1})).unwrap();
        let s2 = Snapshot::new(key, "w1", 2, 11, serde_json::json!({"a": 2})).unwrap();
        let (p1, p2) = (s1.prepare().unwrap(), s2.prepare().unwrap());
        let (rows, rejected) = prepare_batch(&[&p2, &p1]);
        assert!(rejected.is_empty());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0], &p2);
    }

    #[test]
    fn a_row_with_a_wrong_hash_is_rejected_by_name() {
        let key = EntityKey::new(EntityType::Workflow, "w1");
        let mut s = Snapshot::new(key, "w1", 1, 10, serde_json::json!({"a": 1})).unwrap();
        s.state_hash = "0".repeat(64);
        assert!(s.prepare().unwrap_err().contains("does not match"));
    }
}
