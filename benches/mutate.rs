//! Mutated stabilize events through `decode`, in process: what the socket
//! does with each line (too long, blank, or decoded), every decoded event
//! folded by the reducer into its entity's initial state and that state
//! serialised and hashed as the policy actor would before a write.
//!
//!     cargo bench --bench mutate                     # 10,000,000 frames
//!     MUTATE_FRAMES=200000 cargo bench --bench mutate
//!
//! Environment: `MUTATE_FRAMES` (default 10,000,000), `MUTATE_SEED` (PRNG
//! seed, default 1), `MUTATE_NUMBERS` (`python`, SQLite's form, the default;
//! or `jsonb`, Postgres'), `MUTATE_REDUCER` (`stabilize` or `merge`).
//! Seeds: the real stabilize events of `fuzz/seeds/decode`.
//!
//! Prints the count, the rate, and how many frames ended each way.

#[path = "../tests/support/mutate.rs"]
mod mutate;

use mutate::{Mutation, Mutator, Outcome, outcome, seed_events};
use snapshotd::model::PreparedSnapshot;
use snapshotd::model::canonical::NumberForm;
use snapshotd::model::event::{Frame, Limits};
use snapshotd::reducer::Reducer;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `socket.max_frame_bytes` and `socket.max_depth`, config/default.toml.
const MAX_FRAME_BYTES: usize = 1_048_576;
const MAX_DEPTH: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid value")),
        Err(_) => default,
    }
}

fn main() {
    let frames: u64 = env_or("MUTATE_FRAMES", 10_000_000);
    let rng_seed: u64 = env_or("MUTATE_SEED", 1);
    let numbers = match std::env::var("MUTATE_NUMBERS").as_deref() {
        Ok("jsonb") => NumberForm::Jsonb,
        Ok("python") | Err(_) => NumberForm::Python,
        Ok(other) => panic!("MUTATE_NUMBERS={other}: python or jsonb"),
    };
    let reducer = match std::env::var("MUTATE_REDUCER").as_deref() {
        Ok("merge") => Reducer::Merge,
        Ok("stabilize") | Err(_) => Reducer::Stabilize,
        Ok(other) => panic!("MUTATE_REDUCER={other}: stabilize or merge"),
    };
    let limits = Limits {
        max_depth: MAX_DEPTH,
        numbers,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode");
    let seeds = seed_events(&dir);
    let mut mutator = Mutator::new(rng_seed, &seeds, MAX_FRAME_BYTES);

    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut by_mutation: BTreeMap<Mutation, (u64, u64)> = BTreeMap::new();
    let mut bytes = 0u64;
    let mut unstorable = 0u64;
    let mut in_decode = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..frames {
        let (mutation, line) = mutator.next();
        bytes += line.len() as u64 + 1;
        let t = Instant::now();
        let result = outcome(line, MAX_FRAME_BYTES, limits);
        let name = match result {
            Outcome::Blank => "blank_line",
            Outcome::TooLong => "oversized",
            Outcome::Decoded(Ok(Frame::Command(_))) => "ok_command",
            Outcome::Decoded(Ok(Frame::Event(event))) => {
                let key = reducer.key_of(&event);
                let mut state = reducer.initial(&key);
                reducer.fold(&mut state, &event);
                let prepared = PreparedSnapshot::from_state(
                    key,
                    event.workflow_id.clone(),
                    1,
                    event.sequence,
                    &state,
                );
                unstorable += u64::from(prepared.is_err());
                "ok_event"
            }
            Outcome::Decoded(Err(error)) => error.kind(),
        };
        in_decode += t.elapsed();
        *outcomes.entry(name).or_default() += 1;
        let entry = by_mutation.entry(mutation).or_default();
        entry.0 += 1;
        entry.1 += u64::from(name == "ok_event");
    }
    let total = started.elapsed();

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "mutate: {frames} frames ({:.1} MiB) from {} seed events, seed {rng_seed}, numbers {numbers:?}, reducer {reducer:?}",
        bytes as f64 / 1048576.0,
        seeds.len(),
    );
    println!(
        "mutate: {:.2} s in all, {:.0} frames/s; {:.2} s in decode+fold+hash, {:.0} frames/s",
        total.as_secs_f64(),
        rate(frames, total),
        in_decode.as_secs_f64(),
        rate(frames, in_decode),
    );
    println!("outcomes:");
    for (name, count) in &outcomes {
        println!("  {name:<16} {count:>10}");
    }
    println!("  (ok events whose state cannot be stored: {unstorable})");
    println!("mutations (frames, of which ok events):");
    for (mutation, (count, ok)) in &by_mutation {
        println!("  {:<16} {count:>10} {ok:>10}", mutation.name());
    }
    assert_eq!(outcomes.values().sum::<u64>(), frames);
}
