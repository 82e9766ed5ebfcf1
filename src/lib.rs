//! snapshotd keeps snapshots of event-sourced entities current in the
//! background, in the very `snapshots` table stabilize reads.
//!
//! * [`model`] — snapshots, entity keys, canonical JSON and `state_hash` (pure).
//! * [`store`] — the `snapshots` table on SQLite (default) or Postgres.
//! * [`settings`] — layered, validated configuration.
//! * [`telemetry`] — log set-up.
//! * [`cli`] — what each subcommand does.

pub mod actors;
pub mod app;
pub mod cli;
pub mod model;
pub mod reducer;
pub mod settings;
pub mod stats;
pub mod store;
pub mod telemetry;
