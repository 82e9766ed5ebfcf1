//! The snapshot record and the key that names an entity (SPEC section 1).

use super::canonical::{CanonicalError, NumberForm, normalize_value_as, sha256_hex, state_hash};
use crate::reducer::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The kinds of entity stabilize knows; `Snapshot.from_dict` accepts no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntityType {
    Workflow,
    Stage,
    Task,
}

impl EntityType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Workflow => "workflow",
            EntityType::Stage => "stage",
            EntityType::Task => "task",
        }
    }
}

impl fmt::Display for EntityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of `workflow`, `stage`, `task`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entity_type must be one of workflow, stage, task (got `{0}`)")]
pub struct UnknownEntityType(pub String);

impl FromStr for EntityType {
    type Err = UnknownEntityType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "workflow" => Ok(EntityType::Workflow),
            "stage" => Ok(EntityType::Stage),
            "task" => Ok(EntityType::Task),
            other => Err(UnknownEntityType(other.to_string())),
        }
    }
}

/// Longest `entity_id` / `workflow_id` stabilize's tables hold (`varchar(26)`).
pub const MAX_ID_CHARS: usize = 26;

/// Why a string is not a usable entity or workflow id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; stabilize's tables hold at most 26")]
    TooLong(usize),
    #[error("contains the character U+0000")]
    Nul,
}

/// Check an id against what stabilize's `varchar(26)` columns accept.
pub fn check_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    // No more characters than bytes: counted only when that could matter
    // (an id is checked for every event).
    if id.len() > MAX_ID_CHARS {
        let chars = id.chars().count();
        if chars > MAX_ID_CHARS {
            return Err(IdError::TooLong(chars));
        }
    }
    if memchr::memchr(0, id.as_bytes()).is_some() {
        Err(IdError::Nul)
    } else {
        Ok(())
    }
}

/// Names one entity: the snapshot table's `(entity_type, entity_id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    pub entity_type: EntityType,
    pub entity_id: Arc<str>,
}

impl EntityKey {
    pub fn new(entity_type: EntityType, entity_id: impl Into<Arc<str>>) -> Self {
        EntityKey {
            entity_type,
            entity_id: entity_id.into(),
        }
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.entity_id)
    }
}

/// One snapshot of one entity (SPEC section 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub key: EntityKey,
    pub workflow_id: Arc<str>,
    /// Distinct events of the entity's stream up to and including `sequence`.
    pub version: i32,
    /// Global sequence of the last event folded in.
    pub sequence: i64,
    /// A JSON object whose numbers are JSONB-normalised text.
    pub state: Value,
    /// `sha256(canonical_json(state))`, lowercase hex.
    pub state_hash: String,
    pub created_at: DateTime<Utc>,
}

impl Snapshot {
    /// Build a snapshot: numbers are brought to their JSONB text (a form
    /// both backends' readers see unchanged) and the hash computed; fails
    /// where stabilize could not store or read the state back.
    pub fn new(
        key: EntityKey,
        workflow_id: impl Into<Arc<str>>,
        version: i32,
        sequence: i64,
        mut state: Value,
    ) -> Result<Self, CanonicalError> {
        normalize_value_as(&mut state, NumberForm::Jsonb)?;
        let state_hash = state_hash(&state)?;
        Ok(Snapshot {
            key,
            workflow_id: workflow_id.into(),
            version,
            sequence,
            state,
            state_hash,
            created_at: Utc::now(),
        })
    }

    /// The JSON a `get` prints: stabilize's `Snapshot.to_dict()` shape.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "entity_type": self.key.entity_type.as_str(),
            "entity_id": &*self.key.entity_id,
            "workflow_id": &*self.workflow_id,
            "version": self.version,
            "sequence": self.sequence,
            "state": self.state,
            "state_hash": self.state_hash,
            "created_at": self.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
        })
    }
}

/// A snapshot ready for the store: the state already serialised and hashed,
/// so the writer holds text, not a tree, and nothing is computed twice.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedSnapshot {
    pub key: EntityKey,
    pub workflow_id: Arc<str>,
    pub version: i32,
    pub sequence: i64,
    /// The state as stored (numbers in the store's form).
    pub state_text: String,
    pub state_hash: String,
    pub created_at: DateTime<Utc>,
    /// Length of the canonical text the hash is taken over.
    pub canonical_bytes: usize,
    /// No row of this entity was stored or pending before this one, so
    /// writing it leaves nothing to prune.
    pub first_row: bool,
    /// In a cluster: the lease its entity was folded under. The writer
    /// commits it only while that lease is still this node's.
    pub fence: Option<Fence>,
    /// When the snapshot fell due (a threshold crossed, a flush, a
    /// passivation): the writer measures due → committed from it.
    pub due_at: Option<std::time::Instant>,
}

/// A partition lease held at an epoch (`crate::cluster`): a snapshot
/// carrying it may be written only while the lease table still gives the
/// partition to this node at this epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub partition: u32,
    pub epoch: i64,
}

/// The largest canonical-text buffer a thread keeps between snapshots.
const KEPT_CANONICAL_BYTES: usize = 1 << 20;

impl PreparedSnapshot {
    /// From a state whose numbers are already in the store's form (a
    /// reducer's output over decoded events).
    pub fn from_state(
        key: EntityKey,
        workflow_id: Arc<str>,
        version: i32,
        sequence: i64,
        state: &State,
    ) -> Result<Self, CanonicalError> {
        thread_local! {
            /// Each thread's buffer for canonical texts, which are only
            /// hashed: one allocation reused, not one the size of a state
            /// made and freed for every snapshot.
            static CANONICAL: RefCell<String> = const { RefCell::new(String::new()) };
        }
        CANONICAL.with_borrow_mut(|canonical| {
            let snapshot = state.write_texts(canonical).map(|state_text| {
                Self::from_texts(key, workflow_id, version, sequence, canonical, state_text)
            });
            // Not kept for good after an unusually large state, whether it
            // could be stored or not.
            if canonical.capacity() > KEPT_CANONICAL_BYTES {
                *canonical = String::new();
            }
            snapshot
        })
    }

    fn from_texts(
        key: EntityKey,
        workflow_id: Arc<str>,
        version: i32,
        sequence: i64,
        canonical: &str,
        state_text: String,
    ) -> Self {
        let state_hash = sha256_hex(canonical.as_bytes());
        PreparedSnapshot {
            key,
            workflow_id,
            version,
            sequence,
            state_text,
            state_hash,
            created_at: Utc::now(),
            canonical_bytes: canonical.len(),
            first_row: false,
            fence: None,
            due_at: None,
        }
    }

    /// Back to a [`Snapshot`] (state parsed again), for the rare reader.
    pub fn to_snapshot(&self) -> Snapshot {
        Snapshot {
            key: self.key.clone(),
            workflow_id: self.workflow_id.clone(),
            version: self.version,
            sequence: self.sequence,
            state: serde_json::from_str(&self.state_text).expect("prepared from a JSON map"),
            state_hash: self.state_hash.clone(),
            created_at: self.created_at,
        }
    }
}

impl Snapshot {
    /// Serialise for the store, checking the hash matches the state.
    pub fn prepare(&self) -> Result<PreparedSnapshot, String> {
        let Value::Object(state) = &self.state else {
            return Err("state must be a JSON object".to_string());
        };
        let prepared = PreparedSnapshot::from_state(
            self.key.clone(),
            self.workflow_id.clone(),
            self.version,
            self.sequence,
            &State::Tree(state.clone()),
        )
        .map_err(|e| format!("state cannot be stored: {e}"))?;
        if prepared.state_hash != self.state_hash {
            return Err(format!(
                "state_hash {} does not match the state (hashes to {})",
                self.state_hash, prepared.state_hash
            ));
        }
        Ok(PreparedSnapshot {
            created_at: self.created_at,
            ..prepared
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_longer_than_the_table_allows_are_refused() {
        assert_eq!(check_id(""), Err(IdError::Empty));
        assert_eq!(check_id(&"é".repeat(26)), Ok(()));
        assert_eq!(check_id(&"x".repeat(27)), Err(IdError::TooLong(27)));
    }

    #[test]
    fn entity_types_parse_from_their_stabilize_names() {
        assert_eq!("stage".parse::<EntityType>(), Ok(EntityType::Stage));
        assert!("Workflow".parse::<EntityType>().is_err());
    }
}
