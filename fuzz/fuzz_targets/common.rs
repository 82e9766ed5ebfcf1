//! What both targets check once a frame decodes: the fold and the
//! canonical form the daemon would store must never panic, and a stored
//! state must read back to the same `state_hash` (SPEC 1: a mismatch on
//! read is an integrity error).

use snapshotd_fuzz::model::canonical::NumberForm;
use snapshotd_fuzz::model::event::{Frame, Limits, decode, decode_reference};
use snapshotd_fuzz::model::{EntityKey, PreparedSnapshot};
use snapshotd_fuzz::reducer::{Reducer, State};

/// Both stores' number forms: SQLite keeps Python's reading, Postgres JSONB's.
pub const FORMS: [NumberForm; 2] = [NumberForm::Python, NumberForm::Jsonb];
pub const REDUCERS: [Reducer; 2] = [Reducer::Stabilize, Reducer::Merge];

/// The daemon's defaults (`socket.max_depth = 64`, config/default.toml).
pub fn limits(numbers: NumberForm) -> Limits {
    Limits {
        max_depth: 64,
        numbers,
    }
}

/// Decode one line as the socket does after framing (a trailing `\r` is
/// the ingest's to strip; decode sees the rest as it is).
pub fn decode_line(line: &[u8], numbers: NumberForm) -> Option<Frame> {
    let frame = decode(line, limits(numbers));
    // The one pass and serde's parse of the envelope agree on every line.
    assert_eq!(frame, decode_reference(line, limits(numbers)));
    if let Err(e) = &frame {
        // Every refusal has a reason and a metric name.
        assert!(!e.kind().is_empty());
        assert!(!e.to_string().is_empty());
    }
    frame.ok()
}

/// Serialise and hash `state` as the policy actor does before a write; if
/// it is storable, read it back as the store does and hash it again.
pub fn check_state(key: &EntityKey, state: &State) {
    let Ok(prepared) =
        PreparedSnapshot::from_state(key.clone(), key.entity_id.clone(), 1, 1, state)
    else {
        return; // refused with a reason: the daemon counts it and goes on
    };
    let read_back = prepared.to_snapshot();
    let again = read_back
        .prepare()
        .unwrap_or_else(|e| panic!("a stored state does not read back: {e}"));
    assert_eq!(again.state_hash, prepared.state_hash);
}
