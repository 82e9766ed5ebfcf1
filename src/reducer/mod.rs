//! Reducers: pure functions that fold an event into an entity's state.
//!
//! * [`stabilize`]: stabilize 0.33.1's `EventReplayer`, one state per workflow.
//! * [`merge`]: RFC 7396 merge patch of each event's `data`, per entity.

pub mod merge;
pub mod stabilize;

use crate::model::event::Event;
use crate::model::{EntityKey, EntityType};
use serde_json::{Map, Value};

/// The configured reducer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reducer {
    Stabilize,
    Merge,
}

impl Reducer {
    /// The entity whose snapshot this event belongs to.
    pub fn key_of(self, event: &Event) -> EntityKey {
        match self {
            // Every event of a workflow, whatever its entity, folds into the workflow.
            Reducer::Stabilize => EntityKey {
                entity_type: EntityType::Workflow,
                entity_id: event.workflow_id.clone(),
            },
            Reducer::Merge => EntityKey {
                entity_type: event.entity_type,
                entity_id: event.entity_id.clone(),
            },
        }
    }

    /// The state before any event.
    pub fn initial(self, key: &EntityKey) -> Map<String, Value> {
        match self {
            Reducer::Stabilize => stabilize::initial(&key.entity_id),
            Reducer::Merge => Map::new(),
        }
    }

    /// Fold one event into `state`.
    pub fn fold(self, state: &mut Map<String, Value>, event: &Event) {
        match self {
            Reducer::Stabilize => stabilize::apply(state, event),
            Reducer::Merge => merge::apply(state, event),
        }
    }

    /// [`Self::fold`] an event no longer needed: its values are moved into
    /// the state instead of copied.
    pub fn fold_owned(self, state: &mut Map<String, Value>, event: Event) {
        match self {
            Reducer::Stabilize => stabilize::apply_owned(state, event),
            Reducer::Merge => merge::apply_owned(state, event),
        }
    }
}
