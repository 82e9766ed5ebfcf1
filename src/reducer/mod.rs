//! Reducers: pure functions that fold an event into an entity's state.
//!
//! * [`stabilize`]: stabilize 0.33.1's `EventReplayer`, one state per workflow.
//! * [`merge`]: RFC 7396 merge patch of each event's `data`, per entity.

pub mod merge;
pub mod stabilize;
pub mod workflow;

use crate::model::canonical::{CanonicalError, canonical_object};
use crate::model::event::Event;
use crate::model::{EntityKey, EntityType};
use serde_json::{Map, Value};
use workflow::WorkflowState;

/// An entity's state as a reducer keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// stabilize's workflow state, its values kept as text.
    Workflow(Box<WorkflowState>),
    /// Any JSON object: the merge reducer's state, or a stored workflow
    /// state of a shape [`WorkflowState`] does not hold.
    Tree(Map<String, Value>),
}

impl State {
    /// The state as a tree, made one if it is not.
    fn tree(&mut self) -> &mut Map<String, Value> {
        if let State::Workflow(state) = self {
            *self = State::Tree(state.to_map());
        }
        match self {
            State::Tree(map) => map,
            State::Workflow(_) => unreachable!("made a tree above"),
        }
    }

    /// The state as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        match self {
            State::Workflow(state) => state.to_map(),
            State::Tree(map) => map.clone(),
        }
    }

    /// The canonical text the hash is taken over, and the stored text.
    pub fn texts(&self) -> Result<(String, String), CanonicalError> {
        let mut canonical = String::new();
        let stored = self.write_texts(&mut canonical)?;
        Ok((canonical, stored))
    }

    /// Write the canonical text into `canonical` (cleared first: a buffer
    /// kept from one snapshot to the next) and give the stored text, which
    /// is kept until it is committed, allocated at about its length.
    pub fn write_texts(&self, canonical: &mut String) -> Result<String, CanonicalError> {
        canonical.clear();
        match self {
            State::Workflow(state) => {
                state.write_canonical(canonical)?;
                // The same values without the spaces after separators:
                // no longer, unless non-ASCII text (escaped in the
                // canonical text) makes it so.
                let mut stored = String::with_capacity(canonical.len());
                state.write_stored(&mut stored);
                Ok(stored)
            }
            State::Tree(map) => {
                canonical.push_str(&canonical_object(map)?);
                Ok(serde_json::to_string(map).expect("a JSON map serialises"))
            }
        }
    }
}

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
    pub fn initial(self, key: &EntityKey) -> State {
        match self {
            Reducer::Stabilize => State::Workflow(Box::new(WorkflowState::new(&key.entity_id))),
            Reducer::Merge => State::Tree(Map::new()),
        }
    }

    /// A state read back from the store (numbers in the store's form).
    pub fn from_stored(self, map: Map<String, Value>) -> State {
        match self {
            Reducer::Stabilize => match WorkflowState::from_map(&map) {
                Some(state) => State::Workflow(Box::new(state)),
                None => State::Tree(map),
            },
            Reducer::Merge => State::Tree(map),
        }
    }

    /// Fold one event into `state`.
    pub fn fold(self, state: &mut State, event: &Event) {
        match (self, state) {
            (Reducer::Stabilize, State::Workflow(state)) => state.apply(event),
            (Reducer::Stabilize, State::Tree(map)) => stabilize::apply(map, event),
            (Reducer::Merge, state) => merge::apply(state.tree(), event),
        }
    }
}
