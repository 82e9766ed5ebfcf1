//! The SQL of the table feed (`crate::feed::table`): reading stabilize's
//! `events` table in commit order from a cursor, the cursor's own small
//! table, and the catch-up question "which entities have events beyond
//! their latest snapshot".

use super::events::{EventRow, pg_event_columns, sqlite_event_columns};
use super::{Store, StoreError};
use crate::model::event::Event;
use crate::model::{EntityKey, EntityType};
use sqlx::Row;

/// How the feed orders the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedOrder {
    /// PostgreSQL with stabilize's `commit_xid` column: transaction ids
    /// below `pg_snapshot_xmin(pg_current_snapshot())` can no longer commit,
    /// so everything below that frontier is final (rows from before the
    /// column existed carry NULL, read first as id 0).
    CommitXid,
    /// By `sequence`: SQLite (one writer at a time, so sequence order is
    /// commit order) and PostgreSQL without `commit_xid`.
    Sequence,
}

/// A position in the feed: every event at or before it was read.
/// In [`FeedOrder::Sequence`] `xid` is always 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct FeedCursor {
    pub xid: i64,
    pub sequence: i64,
}

/// In a cluster: only the events of these partitions (of `count`), by
/// [`crate::cluster::partition`] of their `workflow_id`. PostgreSQL only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    pub owned: Vec<i64>,
    pub count: u32,
}

/// ` AND <partition of workflow_id> = ANY($n)`; with no filter, `$n` is
/// bound to NULL and the condition is always true (one statement shape).
fn partition_filter(only: Option<&Partitions>, n: usize) -> String {
    match only {
        Some(p) => format!(
            " AND {} = ANY(${n}::int8[])",
            crate::cluster::partition::sql("workflow_id", &p.count.to_string())
        ),
        None => format!(" AND ${n}::int8[] IS NULL"),
    }
}

/// One page of the feed.
pub struct FeedPage {
    pub events: Vec<Event>,
    /// Where the next page starts.
    pub next: FeedCursor,
    /// True when the page reached the frontier (nothing more to read now).
    pub caught_up: bool,
}

const CURSOR_TABLE_PG: &str = "CREATE TABLE IF NOT EXISTS snapshotd_feed_cursor (\
     name TEXT PRIMARY KEY, commit_xid BIGINT NOT NULL, sequence BIGINT NOT NULL, \
     origin_sequence BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now())";
const CURSOR_TABLE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS snapshotd_feed_cursor (\
     name TEXT PRIMARY KEY, commit_xid INTEGER NOT NULL, sequence INTEGER NOT NULL, \
     origin_sequence INTEGER NOT NULL, updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)";

impl Store {
    /// The order the feed can use on this database.
    pub async fn feed_order(&self) -> Result<FeedOrder, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(FeedOrder::Sequence),
            Store::Postgres(s) => {
                let has: bool = sqlx::query_scalar(
                    "SELECT current_setting('server_version_num')::int >= 130000 AND EXISTS (\
                     SELECT 1 FROM information_schema.columns WHERE table_name = 'events' \
                     AND column_name = 'commit_xid' AND table_schema = current_schema())",
                )
                .fetch_one(s.pool())
                .await
                .map_err(StoreError::query("look for the events table's commit_xid"))?;
                Ok(if has {
                    FeedOrder::CommitXid
                } else {
                    FeedOrder::Sequence
                })
            }
        }
    }

    /// The cursor saved under `name` and the sequence the feed started
    /// following at (events up to it were history when it first ran), or
    /// `None` on the first run. Creates the cursor table when missing.
    pub async fn load_feed_cursor(
        &self,
        name: &str,
    ) -> Result<Option<(FeedCursor, i64)>, StoreError> {
        let op = StoreError::query("read the feed cursor");
        let row = match self {
            Store::Postgres(s) => {
                sqlx::query(CURSOR_TABLE_PG)
                    .execute(s.pool())
                    .await
                    .map_err(StoreError::query("create the feed cursor table"))?;
                sqlx::query(
                    "SELECT commit_xid, sequence, origin_sequence FROM snapshotd_feed_cursor WHERE name = $1",
                )
                .bind(name)
                .fetch_optional(s.pool())
                .await
                .map_err(op)?
                .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2)))
            }
            Store::Sqlite(s) => {
                sqlx::query(CURSOR_TABLE_SQLITE)
                    .execute(s.pool())
                    .await
                    .map_err(StoreError::query("create the feed cursor table"))?;
                sqlx::query(
                    "SELECT commit_xid, sequence, origin_sequence FROM snapshotd_feed_cursor WHERE name = ?1",
                )
                .bind(name)
                .fetch_optional(s.pool())
                .await
                .map_err(op)?
                .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2)))
            }
        };
        Ok(row.map(|(xid, sequence, origin)| (FeedCursor { xid, sequence }, origin)))
    }

    /// Save the cursor (and, on the first save, the origin).
    pub async fn save_feed_cursor(
        &self,
        name: &str,
        cursor: FeedCursor,
        origin_sequence: i64,
    ) -> Result<(), StoreError> {
        let op = StoreError::query("save the feed cursor");
        match self {
            Store::Postgres(s) => sqlx::query(
                "INSERT INTO snapshotd_feed_cursor (name, commit_xid, sequence, origin_sequence) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
                 commit_xid = EXCLUDED.commit_xid, sequence = EXCLUDED.sequence, updated_at = now()",
            )
            .bind(name)
            .bind(cursor.xid)
            .bind(cursor.sequence)
            .bind(origin_sequence)
            .execute(s.pool())
            .await
            .map(|_| ())
            .map_err(op),
            Store::Sqlite(s) => sqlx::query(
                "INSERT INTO snapshotd_feed_cursor (name, commit_xid, sequence, origin_sequence) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO UPDATE SET \
                 commit_xid = excluded.commit_xid, sequence = excluded.sequence, \
                 updated_at = CURRENT_TIMESTAMP",
            )
            .bind(name)
            .bind(cursor.xid)
            .bind(cursor.sequence)
            .bind(origin_sequence)
            .execute(s.pool())
            .await
            .map(|_| ())
            .map_err(op),
        }
    }

    /// Where the table ends now: the commit frontier (`CommitXid`: the
    /// oldest transaction still running; everything below it is final) or
    /// the highest sequence. A cursor here reads only what comes next.
    pub async fn feed_end(&self, order: FeedOrder) -> Result<FeedCursor, StoreError> {
        let op = StoreError::query("read where the events table ends");
        match (self, order) {
            (Store::Postgres(s), FeedOrder::CommitXid) => {
                let xmin: String =
                    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                        .fetch_one(s.pool())
                        .await
                        .map_err(op)?;
                Ok(FeedCursor {
                    xid: parse_xid(&xmin)?,
                    sequence: i64::MIN,
                })
            }
            _ => Ok(FeedCursor {
                xid: 0,
                sequence: self.max_event_sequence().await?,
            }),
        }
    }

    /// The target a `sync` waits for: once the feed's cursor reaches it,
    /// every event committed before the call has been read. (`CommitXid`:
    /// every transaction that had started is finished; `Sequence`: the
    /// highest sequence.)
    pub async fn feed_sync_target(&self, order: FeedOrder) -> Result<FeedCursor, StoreError> {
        match (self, order) {
            (Store::Postgres(s), FeedOrder::CommitXid) => {
                let xmax: String =
                    sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                        .fetch_one(s.pool())
                        .await
                        .map_err(StoreError::query("read the commit frontier"))?;
                Ok(FeedCursor {
                    xid: parse_xid(&xmax)?,
                    sequence: i64::MIN,
                })
            }
            _ => self.feed_end(order).await,
        }
    }

    /// The highest sequence in the events table (0 when empty).
    pub async fn max_event_sequence(&self) -> Result<i64, StoreError> {
        let op = StoreError::query("read the highest event sequence");
        match self {
            Store::Postgres(s) => {
                sqlx::query_scalar("SELECT coalesce(max(sequence), 0)::int8 FROM events")
                    .fetch_one(s.pool())
                    .await
            }
            Store::Sqlite(s) => {
                sqlx::query_scalar("SELECT coalesce(max(sequence), 0) FROM events")
                    .fetch_one(s.pool())
                    .await
            }
        }
        .map_err(op)
    }

    /// Up to `limit` events after `cursor`, in feed order, stopping at the
    /// commit frontier.
    pub async fn feed_page(
        &self,
        order: FeedOrder,
        cursor: FeedCursor,
        limit: i64,
        only: Option<&Partitions>,
    ) -> Result<FeedPage, StoreError> {
        let op = StoreError::query("read the events table");
        let numbers = self.number_form();
        let columns = pg_event_columns!();
        let (rows, next_if_short): (Vec<(i64, EventRow)>, FeedCursor) = match (self, order) {
            (Store::Postgres(s), FeedOrder::CommitXid) if cursor.xid == 0 => {
                // Rows from before `commit_xid` existed (NULL), by sequence.
                let sql = format!(
                    "SELECT {columns} FROM events WHERE commit_xid IS NULL AND sequence > $1{} \
                     ORDER BY sequence LIMIT $2",
                    partition_filter(only, 3)
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cursor.sequence)
                    .bind(limit)
                    .bind(only.map(|p| p.owned.as_slice()))
                    .fetch_all(s.pool())
                    .await
                    .map_err(op)?;
                let rows = by_sequence(&rows, EventRow::from_pg)?;
                // Then the first real transaction id.
                (
                    rows,
                    FeedCursor {
                        xid: 1,
                        sequence: i64::MIN,
                    },
                )
            }
            (Store::Postgres(s), FeedOrder::CommitXid) => {
                let frontier = self.feed_end(order).await?;
                let sql = format!(
                    "SELECT commit_xid::text AS xid, {columns} FROM events \
                     WHERE (commit_xid, sequence) > ($1::text::xid8, $2) \
                     AND commit_xid < $3::text::xid8{} ORDER BY commit_xid, sequence LIMIT $4",
                    partition_filter(only, 5)
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cursor.xid.to_string())
                    .bind(cursor.sequence)
                    .bind(frontier.xid.to_string())
                    .bind(limit)
                    .bind(only.map(|p| p.owned.as_slice()))
                    .fetch_all(s.pool())
                    .await
                    .map_err(op)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let xid: String = r
                        .try_get("xid")
                        .map_err(StoreError::query("decode an events row"))?;
                    let row =
                        EventRow::from_pg(r).map_err(StoreError::query("decode an events row"))?;
                    out.push((parse_xid(&xid)?, row));
                }
                (out, frontier)
            }
            (Store::Postgres(s), FeedOrder::Sequence) => {
                let sql = format!(
                    "SELECT {columns} FROM events WHERE sequence > $1{} ORDER BY sequence LIMIT $2",
                    partition_filter(only, 3)
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cursor.sequence)
                    .bind(limit)
                    .bind(only.map(|p| p.owned.as_slice()))
                    .fetch_all(s.pool())
                    .await
                    .map_err(op)?;
                let rows = by_sequence(&rows, EventRow::from_pg)?;
                (rows, cursor)
            }
            (Store::Sqlite(s), _) => {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    sqlite_event_columns!(),
                    " FROM events WHERE sequence > ?1 ORDER BY sequence LIMIT ?2"
                ))
                .bind(cursor.sequence)
                .bind(limit)
                .fetch_all(s.pool())
                .await
                .map_err(op)?;
                let rows = by_sequence(&rows, EventRow::from_sqlite)?;
                (rows, cursor)
            }
        };
        let caught_up = (rows.len() as i64) < limit;
        let mut next = match rows.last() {
            Some((xid, row)) => FeedCursor {
                xid: *xid,
                sequence: row.sequence,
            },
            None => cursor,
        };
        if caught_up && next_if_short > next {
            next = next_if_short;
        }
        let events = rows
            .into_iter()
            .map(|(_, row)| row.into_event(numbers))
            .collect::<Result<_, _>>()?;
        Ok(FeedPage {
            events,
            next,
            caught_up,
        })
    }

    /// Entities with events after `after_sequence` that their latest
    /// snapshot does not cover exactly: what a restart (or a cluster node
    /// taking a partition) must look at again. Whole workflows when
    /// `by_workflow` (the stabilize reducer): events beyond the snapshot, or
    /// a number of events up to its sequence other than its version (an
    /// event committed late, below a snapshot taken before it was visible;
    /// hydration then rebuilds from the table). Single entities otherwise:
    /// events beyond the snapshot.
    pub async fn uncovered_entities(
        &self,
        after_sequence: i64,
        by_workflow: bool,
    ) -> Result<Vec<EntityKey>, StoreError> {
        self.uncovered_in(after_sequence, by_workflow, None).await
    }

    /// [`Store::uncovered_entities`] among the workflows of some partitions
    /// (a cluster node that just took them; PostgreSQL, whole workflows).
    pub async fn uncovered_in(
        &self,
        after_sequence: i64,
        by_workflow: bool,
        only: Option<&Partitions>,
    ) -> Result<Vec<EntityKey>, StoreError> {
        let op = StoreError::query("find entities with events beyond their snapshot");
        let in_partitions;
        let sql = match (self, by_workflow) {
            (Store::Postgres(_), true) => {
                in_partitions = format!(
                    "SELECT 'workflow' AS entity_type, w.workflow_id::text AS entity_id \
                     FROM (SELECT e.workflow_id, max(e.sequence) AS top FROM events e \
                       WHERE e.sequence > $1{} GROUP BY e.workflow_id) w \
                     LEFT JOIN LATERAL (SELECT s.version, s.sequence FROM snapshots s \
                       WHERE s.entity_type = 'workflow' AND s.entity_id = w.workflow_id \
                       ORDER BY s.version DESC LIMIT 1) s ON true \
                     WHERE CASE WHEN s.sequence IS NULL OR w.top > s.sequence THEN true \
                       ELSE (SELECT count(*) FROM events x WHERE x.workflow_id = w.workflow_id \
                         AND x.sequence <= s.sequence) <> s.version END",
                    partition_filter(only, 2)
                );
                in_partitions.as_str()
            }
            (Store::Postgres(_), false) => {
                "SELECT e.entity_type::text AS entity_type, e.entity_id::text AS entity_id \
                 FROM events e WHERE e.sequence > $1 GROUP BY e.entity_type, e.entity_id \
                 HAVING max(e.sequence) > coalesce((SELECT max(s.sequence) FROM snapshots s \
                 WHERE s.entity_type = e.entity_type AND s.entity_id = e.entity_id), 0)"
            }
            (Store::Sqlite(_), true) => {
                "SELECT 'workflow' AS entity_type, w.workflow_id AS entity_id \
                 FROM (SELECT workflow_id, max(sequence) AS top FROM events \
                   WHERE sequence > ?1 GROUP BY workflow_id) w \
                 LEFT JOIN snapshots s ON s.entity_type = 'workflow' \
                   AND s.entity_id = w.workflow_id AND s.version = (SELECT max(s2.version) \
                   FROM snapshots s2 WHERE s2.entity_type = 'workflow' AND s2.entity_id = w.workflow_id) \
                 WHERE s.sequence IS NULL OR w.top > s.sequence \
                   OR (SELECT count(*) FROM events x WHERE x.workflow_id = w.workflow_id \
                     AND x.sequence <= s.sequence) <> s.version"
            }
            (Store::Sqlite(_), false) => {
                "SELECT e.entity_type AS entity_type, e.entity_id AS entity_id \
                 FROM events e WHERE e.sequence > ?1 GROUP BY e.entity_type, e.entity_id \
                 HAVING max(e.sequence) > coalesce((SELECT max(s.sequence) FROM snapshots s \
                 WHERE s.entity_type = e.entity_type AND s.entity_id = e.entity_id), 0)"
            }
        };
        let pairs: Vec<(String, String)> = match (self, by_workflow) {
            (Store::Postgres(s), true) => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(after_sequence)
                .bind(only.map(|p| p.owned.as_slice()))
                .fetch_all(s.pool())
                .await
                .map_err(op)?,
            (Store::Postgres(s), false) => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(after_sequence)
                .fetch_all(s.pool())
                .await
                .map_err(op)?,
            (Store::Sqlite(s), _) => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(after_sequence)
                .fetch_all(s.pool())
                .await
                .map_err(op)?,
        };
        Ok(pairs
            .into_iter()
            .filter_map(|(entity_type, entity_id)| {
                let entity_type: EntityType = entity_type.parse().ok()?;
                Some(EntityKey::new(entity_type, entity_id))
            })
            .collect())
    }
}

/// Rows read in sequence order, which carry no transaction id (0).
fn by_sequence<R>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<EventRow, sqlx::Error>,
) -> Result<Vec<(i64, EventRow)>, StoreError> {
    rows.iter()
        .map(|r| decode(r).map(|row| (0, row)))
        .collect::<Result<_, _>>()
        .map_err(StoreError::query("decode an events row"))
}

fn parse_xid(text: &str) -> Result<i64, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt {
        key: "the commit frontier".into(),
        version: 0,
        reason: format!("`{text}` is not a transaction id"),
    })
}

impl Store {
    /// Backfill's plan: every workflow with events after `after_sequence`
    /// beyond its latest snapshot, with how many events it has after that
    /// snapshot (what folding it will read). Limited to `only` when given.
    pub async fn backfill_plan(
        &self,
        after_sequence: i64,
        only: &[String],
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let op = StoreError::query("plan the backfill");
        // Events beyond the workflow's latest snapshot, per workflow.
        const PG: &str = "WITH last AS (SELECT entity_id, max(sequence) AS seq FROM snapshots \
             WHERE entity_type = 'workflow' GROUP BY entity_id) \
             SELECT e.workflow_id::text, count(*) FILTER (WHERE e.sequence > coalesce(l.seq, 0)) \
             FROM events e LEFT JOIN last l ON l.entity_id = e.workflow_id \
             WHERE e.workflow_id IN (SELECT workflow_id FROM events WHERE sequence > $1) \
             AND (cardinality($2::text[]) = 0 OR e.workflow_id = ANY($2)) \
             GROUP BY e.workflow_id HAVING max(e.sequence) > coalesce(max(l.seq), 0) \
             ORDER BY e.workflow_id";
        const SQLITE: &str = "WITH last AS (SELECT entity_id, max(sequence) AS seq FROM snapshots \
             WHERE entity_type = 'workflow' GROUP BY entity_id) \
             SELECT e.workflow_id, sum(e.sequence > coalesce(l.seq, 0)) \
             FROM events e LEFT JOIN last l ON l.entity_id = e.workflow_id \
             WHERE e.workflow_id IN (SELECT workflow_id FROM events WHERE sequence > ?1) \
             AND (json_array_length(?2) = 0 OR e.workflow_id IN (SELECT value FROM json_each(?2))) \
             GROUP BY e.workflow_id HAVING max(e.sequence) > coalesce(max(l.seq), 0) \
             ORDER BY e.workflow_id";
        match self {
            Store::Postgres(s) => sqlx::query_as(PG)
                .bind(after_sequence)
                .bind(only)
                .fetch_all(s.pool())
                .await
                .map_err(op),
            Store::Sqlite(s) => sqlx::query_as(SQLITE)
                .bind(after_sequence)
                .bind(serde_json::to_string(only).expect("ids serialise"))
                .fetch_all(s.pool())
                .await
                .map_err(op),
        }
    }

    /// Every event of these workflows after `after` (per workflow), in
    /// (workflow, sequence) order.
    pub async fn events_of_workflows(
        &self,
        workflows: &[(String, i64)],
    ) -> Result<Vec<Event>, StoreError> {
        let op = StoreError::query("read the workflows' events");
        let decode = StoreError::query("decode an events row");
        let ids: Vec<&str> = workflows.iter().map(|(id, _)| id.as_str()).collect();
        let afters: Vec<i64> = workflows.iter().map(|(_, after)| *after).collect();
        let numbers = self.number_form();
        let rows: Vec<EventRow> = match self {
            Store::Postgres(s) => sqlx::query(concat!(
                "SELECT ",
                pg_event_columns!(),
                " FROM events e JOIN UNNEST($1::text[], $2::int8[]) AS w(id, after) \
                 ON e.workflow_id = w.id AND e.sequence > w.after \
                 ORDER BY e.workflow_id, e.sequence"
            ))
            .bind(&ids)
            .bind(&afters)
            .fetch_all(s.pool())
            .await
            .map_err(op)?
            .iter()
            .map(EventRow::from_pg)
            .collect::<Result<_, _>>()
            .map_err(decode)?,
            Store::Sqlite(s) => {
                let pairs = serde_json::to_string(
                    &workflows
                        .iter()
                        .map(|(id, after)| serde_json::json!([id, after]))
                        .collect::<Vec<_>>(),
                )
                .expect("ids serialise");
                sqlx::query(concat!(
                    "SELECT ",
                    sqlite_event_columns!(),
                    " FROM events e JOIN (SELECT json_extract(value, '$[0]') AS id, \
                     json_extract(value, '$[1]') AS after FROM json_each(?1)) w \
                     ON e.workflow_id = w.id AND e.sequence > w.after \
                     ORDER BY e.workflow_id, e.sequence"
                ))
                .bind(pairs)
                .fetch_all(s.pool())
                .await
                .map_err(op)?
                .iter()
                .map(EventRow::from_sqlite)
                .collect::<Result<_, _>>()
                .map_err(decode)?
            }
        };
        rows.into_iter()
            .map(|row| row.into_event(numbers))
            .collect()
    }
}
