//! Arbitrary bytes through `decode` (default limits, both number forms);
//! an event is folded by both reducers into the initial state of its
//! entity and the result canonicalised and hashed. Must never panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use snapshotd_fuzz::model::event::Frame;

fuzz_target!(|data: &[u8]| {
    for numbers in common::FORMS {
        let Some(Frame::Event(event)) = common::decode_line(data, numbers) else {
            continue;
        };
        for reducer in common::REDUCERS {
            let key = reducer.key_of(&event);
            let mut state = reducer.initial(&key);
            reducer.fold(&mut state, &event);
            common::check_state(&key, &state);
        }
    }
});
