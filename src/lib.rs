//! snapshotd keeps snapshots of event-sourced entities current in the
//! background, in the very `snapshots` table stabilize reads.
//!
//! * [`app`] — start (store, writer, router, socket, metrics) and ordered shutdown.
//! * [`actors`] — ingest (socket tasks), router, policy and writer actors.
//! * [`feed`] — the table feed: stabilize's `events` table followed in commit order.
//! * [`model`] — snapshots, entity keys, events, canonical JSON and `state_hash` (pure).
//! * [`reducer`] — stabilize's replay and RFC 7396 merge (pure).
//! * [`store`] — the `snapshots` table on SQLite (default) or Postgres; stabilize's events table.
//! * [`settings`] — layered, validated configuration.
//! * [`stats`] — counters, gauges, histograms: `stats` command and Prometheus.
//! * [`telemetry`] — logs and the `/metrics` endpoint.
//! * [`cli`] — what each subcommand does.
//! * [`error`] — the error-chain formatter every part logs with.
//!
//! ```text
//!  producers ──NDJSON──▶ ingest: a task per connection
//!                            │ Event (in-flight permit)
//!  events table ──pages──▶ table feed (connection 0; catch-up wakes at start)
//!                            │
//!                            ▼
//!                         Router (supervisor)
//!                  spawn_linked │ restart after a panic, passivate when idle
//!                            ▼
//!              Policy actor per entity ── fold, thresholds, hydration
//!                            │ PreparedSnapshot (writer permit)
//!                            ▼
//!                         Writer ── batches ──▶ Store (SQLite / Postgres)
//! ```

pub mod actors;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod error;
pub mod feed;
pub mod model;
pub mod reducer;
pub mod settings;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod verify;
