//! Reading stabilize's `events` table when it shares the database: the
//! ground truth the daemon hydrates from and checks its snapshots against.

use super::{Store, StoreError};
use crate::model::canonical::NumberForm;
use crate::model::event::{Event, event_type_of, parse_timestamp};
use crate::model::payload::{Payload, PayloadError};
use crate::model::{EntityKey, EntityType};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Columns the daemon reads from `events`.
const EVENT_COLUMNS: &[&str] = &[
    "sequence",
    "event_type",
    "timestamp",
    "entity_type",
    "entity_id",
    "workflow_id",
    "data",
    "schema_version",
];

/// The columns an [`EventRow`] is read from, on Postgres.
macro_rules! pg_event_columns {
    () => {
        "sequence, event_type::text AS event_type, timestamp, \
         entity_type::text AS entity_type, entity_id::text AS entity_id, \
         workflow_id::text AS workflow_id, data::text AS data, schema_version::int8 AS schema_version"
    };
}

/// The same on SQLite (timestamps are text there).
macro_rules! sqlite_event_columns {
    () => {
        "sequence, event_type, timestamp, entity_type, entity_id, workflow_id, data, schema_version"
    };
}
pub(super) use {pg_event_columns, sqlite_event_columns};

const PG_SELECT: &str = concat!(
    "SELECT ",
    pg_event_columns!(),
    " FROM events WHERE workflow_id = $1 AND sequence > $2 AND sequence <= $3 ORDER BY sequence"
);

const SQLITE_SELECT: &str = concat!(
    "SELECT ",
    sqlite_event_columns!(),
    " FROM events WHERE workflow_id = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence"
);

/// One event row before it is trusted.
pub(super) struct EventRow {
    pub(super) sequence: i64,
    event_type: String,
    timestamp: Result<DateTime<Utc>, String>,
    entity_type: String,
    entity_id: String,
    workflow_id: String,
    data: String,
    schema_version: Option<i64>,
}

impl EventRow {
    /// A row of [`PG_SELECT`]'s columns.
    pub(super) fn from_pg(r: &sqlx::postgres::PgRow) -> Result<EventRow, sqlx::Error> {
        Ok(EventRow {
            sequence: r.try_get("sequence")?,
            event_type: r.try_get("event_type")?,
            timestamp: Ok(r.try_get("timestamp")?),
            entity_type: r.try_get("entity_type")?,
            entity_id: r.try_get("entity_id")?,
            workflow_id: r.try_get("workflow_id")?,
            data: r.try_get("data")?,
            schema_version: r.try_get("schema_version")?,
        })
    }

    /// A row of [`SQLITE_SELECT`]'s columns (SQLite keeps timestamps as text).
    pub(super) fn from_sqlite(r: &sqlx::sqlite::SqliteRow) -> Result<EventRow, sqlx::Error> {
        let text: String = r.try_get("timestamp")?;
        Ok(EventRow {
            sequence: r.try_get("sequence")?,
            event_type: r.try_get("event_type")?,
            timestamp: parse_timestamp(&text)
                .ok_or_else(|| format!("timestamp `{text}` is not ISO 8601")),
            entity_type: r.try_get("entity_type")?,
            entity_id: r.try_get("entity_id")?,
            workflow_id: r.try_get("workflow_id")?,
            data: r.try_get("data")?,
            schema_version: r.try_get("schema_version")?,
        })
    }

    pub(super) fn into_event(self, numbers: NumberForm) -> Result<Event, StoreError> {
        let bad = |reason: String| StoreError::Corrupt {
            key: format!("events row of workflow {}", self.workflow_id),
            version: self.sequence,
            reason,
        };
        let timestamp = self.timestamp.clone().map_err(&bad)?;
        let entity_type: EntityType = self
            .entity_type
            .parse()
            .map_err(|e: crate::model::UnknownEntityType| bad(e.to_string()))?;
        let data = Payload::from_json(&self.data, numbers).map_err(|e| match e {
            PayloadError::NotAnObject => bad("data is not a JSON object".into()),
            PayloadError::Value(e) => bad(format!("data: {e}")),
        })?;
        Ok(Event {
            event_type: event_type_of(&self.event_type),
            timestamp,
            sequence: self.sequence,
            entity_type,
            entity_id: Arc::from(self.entity_id),
            workflow_id: Arc::from(self.workflow_id),
            data,
            schema_version: self.schema_version.unwrap_or(1),
            numbers,
        })
    }
}

impl Store {
    /// True when stabilize's `events` table exists here with the columns
    /// the daemon reads.
    pub async fn has_events_table(&self) -> Result<bool, StoreError> {
        let op = StoreError::query("inspect the events table");
        let columns: Vec<String> = match self {
            Store::Postgres(s) => sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_name = 'events' AND table_schema = current_schema()",
            )
            .fetch_all(s.pool())
            .await
            .map_err(op)?,
            Store::Sqlite(s) => sqlx::query_scalar("SELECT name FROM pragma_table_info('events')")
                .fetch_all(s.pool())
                .await
                .map_err(op)?,
        };
        Ok(EVENT_COLUMNS.iter().all(|c| columns.iter().any(|p| p == c)))
    }

    /// Whether stabilize's table holds any event of the entity: of its whole
    /// workflow when `whole_workflow` (the stabilize reducer's entities),
    /// else of exactly that entity.
    pub async fn has_events(
        &self,
        key: &EntityKey,
        whole_workflow: bool,
    ) -> Result<bool, StoreError> {
        let sql = match (self, whole_workflow) {
            (Store::Postgres(_), true) => {
                "SELECT EXISTS (SELECT 1 FROM events WHERE workflow_id = $1)"
            }
            (Store::Postgres(_), false) => {
                "SELECT EXISTS (SELECT 1 FROM events WHERE entity_id = $1 AND entity_type = $2)"
            }
            (Store::Sqlite(_), true) => {
                "SELECT EXISTS (SELECT 1 FROM events WHERE workflow_id = ?1)"
            }
            (Store::Sqlite(_), false) => {
                "SELECT EXISTS (SELECT 1 FROM events WHERE entity_id = ?1 AND entity_type = ?2)"
            }
        };
        let op = StoreError::query("look for an entity's events");
        let entity_type = (!whole_workflow).then(|| key.entity_type.as_str());
        match self {
            Store::Postgres(s) => {
                let mut query = sqlx::query_scalar(sql).bind(&*key.entity_id);
                if let Some(entity_type) = entity_type {
                    query = query.bind(entity_type);
                }
                query.fetch_one(s.pool()).await
            }
            Store::Sqlite(s) => {
                let mut query = sqlx::query_scalar(sql).bind(&*key.entity_id);
                if let Some(entity_type) = entity_type {
                    query = query.bind(entity_type);
                }
                query.fetch_one(s.pool()).await
            }
        }
        .map_err(op)
    }

    /// How many events of the workflow have a sequence up to `upto`.
    pub async fn count_workflow_events(
        &self,
        workflow_id: &str,
        upto: i64,
    ) -> Result<i64, StoreError> {
        let op = StoreError::query("count a workflow's events");
        match self {
            Store::Postgres(s) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM events WHERE workflow_id = $1 AND sequence <= $2",
                )
                .bind(workflow_id)
                .bind(upto)
                .fetch_one(s.pool())
                .await
            }
            Store::Sqlite(s) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM events WHERE workflow_id = ?1 AND sequence <= ?2",
                )
                .bind(workflow_id)
                .bind(upto)
                .fetch_one(s.pool())
                .await
            }
        }
        .map_err(op)
    }

    /// The sequences of the workflow's events with `after < sequence <=
    /// upto`, in order: what [`Store::workflow_events`] would return,
    /// without reading and decoding the events.
    pub async fn workflow_sequences(
        &self,
        workflow_id: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let op = StoreError::query("read a workflow's event sequences");
        match self {
            Store::Postgres(s) => {
                sqlx::query_scalar(
                    "SELECT sequence::int8 FROM events WHERE workflow_id = $1 \
                     AND sequence > $2 AND sequence <= $3 ORDER BY sequence",
                )
                .bind(workflow_id)
                .bind(after)
                .bind(upto)
                .fetch_all(s.pool())
                .await
            }
            Store::Sqlite(s) => {
                sqlx::query_scalar(
                    "SELECT sequence FROM events WHERE workflow_id = ?1 \
                     AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence",
                )
                .bind(workflow_id)
                .bind(after)
                .bind(upto)
                .fetch_all(s.pool())
                .await
            }
        }
        .map_err(op)
    }

    /// The workflow's events with `after < sequence <= upto`, in sequence order.
    pub async fn workflow_events(
        &self,
        workflow_id: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let op = StoreError::query("read a workflow's events");
        let rows: Vec<EventRow> = match self {
            Store::Postgres(s) => sqlx::query(PG_SELECT)
                .bind(workflow_id)
                .bind(after)
                .bind(upto)
                .fetch_all(s.pool())
                .await
                .map_err(op)?
                .iter()
                .map(EventRow::from_pg)
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::query("decode an events row"))?,
            Store::Sqlite(s) => sqlx::query(SQLITE_SELECT)
                .bind(workflow_id)
                .bind(after)
                .bind(upto)
                .fetch_all(s.pool())
                .await
                .map_err(op)?
                .iter()
                .map(EventRow::from_sqlite)
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::query("decode an events row"))?,
        };
        let numbers = self.number_form();
        rows.into_iter()
            .map(|row| row.into_event(numbers))
            .collect()
    }
}

/// Whether stabilize's `events` table is there to check against, found
/// when it appears: a daemon started before stabilize created its tables
/// must not go on trusting the feed once they exist.
#[derive(Debug)]
pub struct EventsTableWatch {
    store: Store,
    /// `database.events_table = "auto"` and the stabilize reducer.
    enabled: bool,
    found: AtomicBool,
    /// Milliseconds since `started` of the last look, to look at most every
    /// `RECHECK` while the table is absent.
    last_look_ms: AtomicU64,
    started: Instant,
}

impl EventsTableWatch {
    const RECHECK: Duration = Duration::from_millis(200);

    pub fn new(store: Store, enabled: bool) -> Self {
        EventsTableWatch {
            store,
            enabled,
            found: AtomicBool::new(false),
            last_look_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Known to be there (no I/O; for per-event decisions).
    pub fn known(&self) -> bool {
        self.found.load(Ordering::Acquire)
    }

    /// Look again when not yet found (at most every 200 ms); true once it is.
    pub async fn check(&self) -> bool {
        if !self.enabled || self.known() {
            return self.known();
        }
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_look_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < Self::RECHECK.as_millis() as u64 {
            return false;
        }
        self.last_look_ms.store(now.max(1), Ordering::Relaxed);
        match self.store.has_events_table().await {
            Ok(true) => {
                if !self.found.swap(true, Ordering::AcqRel) {
                    tracing::info!(
                        "Found stabilize's events table: hydrating from it and checking every snapshot against it."
                    );
                }
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(error = %crate::error::chain(&error), "Looking for the events table failed.");
                false
            }
        }
    }
}
