//! stabilize 0.33.1's `snapshots` table, as its own stores create it.

/// Postgres DDL, identical to `stabilize/events/store/postgres/schema.py`.
pub const POSTGRES_SNAPSHOTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS snapshots (
        id SERIAL PRIMARY KEY,
        entity_type VARCHAR(50) NOT NULL,
        entity_id VARCHAR(26) NOT NULL,
        workflow_id VARCHAR(26) NOT NULL,
        version INTEGER NOT NULL,
        sequence BIGINT NOT NULL,
        state JSONB NOT NULL,
        state_hash VARCHAR(64),
        created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
        UNIQUE(entity_type, entity_id, version)
    )",
    "CREATE INDEX IF NOT EXISTS idx_snapshots_entity ON snapshots(entity_type, entity_id)",
];

/// SQLite DDL, identical to `stabilize/events/store/sqlite/schema.py`.
pub const SQLITE_SNAPSHOTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        entity_type TEXT NOT NULL,
        entity_id TEXT NOT NULL,
        workflow_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        state TEXT NOT NULL,
        state_hash VARCHAR(64),
        created_at TEXT DEFAULT (datetime('now', 'utc')),
        UNIQUE(entity_type, entity_id, version)
    )",
    "CREATE INDEX IF NOT EXISTS idx_snapshots_entity ON snapshots(entity_type, entity_id)",
];

/// Columns snapshotd reads and writes; a table missing one is refused.
pub const REQUIRED_COLUMNS: &[&str] = &[
    "entity_type",
    "entity_id",
    "workflow_id",
    "version",
    "sequence",
    "state",
    "state_hash",
    "created_at",
];

/// Name the required columns absent from `present`, or `None` when complete.
pub fn missing_columns(present: &[String]) -> Option<String> {
    let missing: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .copied()
        .filter(|c| !present.iter().any(|p| p == c))
        .collect();
    (!missing.is_empty()).then(|| format!("missing column(s) {}", missing.join(", ")))
}
