//! Arbitrary bytes through `decode` (default limits, both number forms);
//! an event is folded by both reducers into the initial state of its
//! entity (cloning its values, and moving them: both must agree) and the
//! result canonicalised and hashed. Must never panic.
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
            // The daemon folds owned events, moving their values.
            let mut moved = reducer.initial(&key);
            reducer.fold_owned(&mut moved, event.clone());
            assert_eq!(moved, state, "owned and borrowed folds differ");
            common::check_state(&key, &state);
        }
    }
});
