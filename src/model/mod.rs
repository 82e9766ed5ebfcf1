//! The pure domain: snapshots, entity keys, events, canonical JSON and the
//! hash. No I/O here.

pub mod canonical;
pub mod event;
pub mod ledger;
pub mod payload;
pub mod reorder;
pub mod sequences;
mod snapshot;

pub use snapshot::{
    EntityKey, EntityType, Fence, IdError, MAX_ID_CHARS, PreparedSnapshot, Snapshot,
    UnknownEntityType, check_id,
};
