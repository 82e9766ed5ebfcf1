//! A stream of frames, split on newlines as the socket splits them: every
//! event is decoded and folded, in order, into one state per entity (by
//! each reducer and number form), and every state canonicalised and
//! hashed at the end. Must never panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use snapshotd_fuzz::model::EntityKey;
use snapshotd_fuzz::model::event::{Event, Frame};
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
            let mut states: BTreeMap<EntityKey, Map<String, Value>> = BTreeMap::new();
            for event in &events {
                let key = reducer.key_of(event);
                let state = states
                    .entry(key)
                    .or_insert_with_key(|key| reducer.initial(key));
                reducer.fold(state, event);
            }
            for (key, state) in &states {
                common::check_state(key, state);
            }
        }
    }
});
