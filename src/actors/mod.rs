//! The actors and the socket tasks that feed them (see the tree in `lib.rs`).

pub mod ingest;
pub mod lookup;
pub mod messages;
pub mod policy;
pub mod router;
pub mod timers;
pub mod writer;
