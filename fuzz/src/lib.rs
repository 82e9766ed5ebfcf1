//! snapshotd's pure domain, compiled from the crate's own sources: the
//! model (events, canonical JSON, snapshots) and the reducers. They name
//! nothing of the daemon, so the fuzz targets build without tokio, sqlx and
//! the rest: a cold `cargo fuzz build` takes about a minute, not five.
//! These are the very files `src/` builds, not copies.

#[path = "../../src/model/mod.rs"]
pub mod model;
#[path = "../../src/reducer/mod.rs"]
pub mod reducer;
