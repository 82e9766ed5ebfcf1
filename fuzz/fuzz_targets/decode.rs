//! Arbitrary bytes through `decode` (default limits, both number forms);
//! an event is folded by both reducers into the initial state of its
//! entity and the result canonicalised and hashed. Must never panic. An
//! event's `data`, read straight into stored texts, must equal the tree
//! way: parsed, numbers normalised, each value serialised; and `decode`
//! must agree with `decode_reference` on every line (`common::decode_line`).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use snapshotd_fuzz::model::canonical::normalize_value_as;
use snapshotd_fuzz::model::event::Frame;
use snapshotd_fuzz::model::payload::Payload;

fuzz_target!(|data: &[u8]| {
    for numbers in common::FORMS {
        let Some(Frame::Event(event)) = common::decode_line(data, numbers) else {
            continue;
        };
        // Keys the envelope only carries are not checked for lone
        // surrogates, which a tree refuses: compare where the line parses.
        if let Ok(line) = serde_json::from_slice::<Value>(data) {
            let mut tree = line.get("data").cloned().unwrap_or(Value::Null);
            normalize_value_as(&mut tree, numbers).expect("decoded data normalises");
            let tree = match tree {
                Value::Object(map) => map,
                _ => Default::default(),
            };
            assert_eq!(event.data, Payload::from_map(&tree), "data as text differs");
        }
        for reducer in common::REDUCERS {
            let key = reducer.key_of(&event);
            let mut state = reducer.initial(&key);
            reducer.fold(&mut state, &event);
            common::check_state(&key, &state);
        }
    }
});
