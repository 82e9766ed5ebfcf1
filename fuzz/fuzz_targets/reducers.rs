//! A stream of frames, split on newlines as the socket splits them: every
//! event is decoded and folded, in order, into one state per entity (by
//! each reducer and number form), and every state canonicalised and
//! hashed at the end. Must never panic, and stabilize's compact state must
//! write the texts its tree fold writes and read back from its stored form
//! unchanged.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use snapshotd_fuzz::model::EntityKey;
use snapshotd_fuzz::model::event::{Event, Frame};
use snapshotd_fuzz::reducer::{Reducer, State, stabilize};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    for numbers in common::FORMS {
        let events: Vec<Event> = data
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter_map(|line| match common::decode_line(line, numbers) {
                Some(Frame::Event(event)) => Some(event),
                _ => None,
            })
            .collect();
        for reducer in common::REDUCERS {
            let mut states: BTreeMap<EntityKey, State> = BTreeMap::new();
            let mut trees: BTreeMap<EntityKey, Map<String, Value>> = BTreeMap::new();
            for event in &events {
                let key = reducer.key_of(event);
                if reducer == Reducer::Stabilize {
                    let tree = trees
                        .entry(key.clone())
                        .or_insert_with_key(|key| stabilize::initial(&key.entity_id));
                    stabilize::apply(tree, event);
                }
                let state = states
                    .entry(key)
                    .or_insert_with_key(|key| reducer.initial(key));
                reducer.fold(state, event);
            }
            for (key, state) in &states {
                common::check_state(key, state);
                if let Some(tree) = trees.get(key) {
                    let expected = State::Tree(tree.clone()).texts();
                    assert_eq!(state.texts(), expected, "{key}: compact and tree folds differ");
                    // Read back from the store, the state is the same again.
                    let again = reducer.from_stored(state.to_map());
                    assert_eq!(&again, state, "{key}: a stored state reads back differently");
                }
            }
        }
    }
});
