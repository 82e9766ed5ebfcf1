//! The exactness bookkeeping of one entity, with no I/O and no clock: its
//! state, the position of its last snapshot, and which sequences it has
//! folded. The policy actor asks it what an arriving event is, what the
//! next snapshot's version and sequence are, and hands it the events and
//! bases it reads from the store; the ledger never decides when, only what.
//!
//! * `window` holds the sequences folded since the last snapshot, `folded`
//!   older ones, both sorted: a sequence in either is a duplicate.
//! * An event older than one already folded was folded out of sequence
//!   order: the ledger is dirty until it is re-folded from a base and the
//!   table's events ([`Ledger::refold`]).
//! * A sequence at or below the last snapshot's that was never seen is for
//!   the events table to settle when there is one ([`Receipt::Settle`]);
//!   without one, it is a resend when the snapshot we started from covers
//!   it (`forgotten_upto`), else folded late.
//! * Once an entity has had an event out of order, the ledger keeps, from
//!   its next snapshot on, that snapshot's state and the window's events
//!   ([`Ledger::refold_in_memory`]): when the table holds exactly the
//!   window's sequences, the window is re-folded without reading the
//!   events again.

use super::event::Event;
use super::sequences::Sequences;
use crate::reducer::{Reducer, State};

/// What an arriving event turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Already folded (or covered by the snapshot we started from): dropped.
    Duplicate,
    /// At or below the last snapshot and never seen: the events table says
    /// whether the snapshot missed it. Not folded.
    Settle,
    /// Folded. `late`: out of sequence order; `first`: the window was empty.
    Folded { late: bool, first: bool },
}

/// Most events kept for an in-memory re-fold; past it, the table is read.
const REPLAY_MAX_EVENTS: usize = 1024;

/// The last snapshot's state and every event folded since, as received.
#[derive(Debug, Clone)]
struct Replay {
    base: State,
    events: Vec<Event>,
}

/// One entity's state and exactness bookkeeping.
#[derive(Debug, Clone)]
pub struct Ledger {
    reducer: Reducer,
    state: State,
    /// Version and sequence of the last snapshot (or of the one started from).
    snap_version: i32,
    snap_seq: i64,
    window: Sequences,
    folded: Sequences,
    /// Sequences at or below this were forgotten from `folded`, or never
    /// seen: covered by the snapshot started from.
    forgotten_upto: i64,
    dirty: bool,
    /// An event came out of sequence order at least once.
    disordered: bool,
    /// Kept from the first snapshot after that (see the module doc).
    replay: Option<Box<Replay>>,
}

impl Ledger {
    /// A new entity: the reducer's initial state, nothing folded.
    pub fn new(reducer: Reducer, initial: State) -> Ledger {
        Ledger {
            reducer,
            state: initial,
            snap_version: 0,
            snap_seq: 0,
            window: Sequences::default(),
            folded: Sequences::default(),
            forgotten_upto: 0,
            dirty: false,
            disordered: false,
            replay: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Version and sequence of the last snapshot.
    pub fn snapshot_position(&self) -> (i32, i64) {
        (self.snap_version, self.snap_seq)
    }

    /// Events folded since the last snapshot.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// The newest sequence folded since the last snapshot.
    pub fn newest_in_window(&self) -> Option<i64> {
        self.window.last()
    }

    /// Whether the sequences folded since the last snapshot are exactly
    /// `seqs` (sorted).
    pub fn window_is(&self, seqs: &[i64]) -> bool {
        self.window.is(seqs)
    }

    /// The last snapshot's state and the window's events are kept.
    pub fn can_refold_in_memory(&self) -> bool {
        self.replay.is_some()
    }

    /// Re-fold the window in sequence order from the kept snapshot state
    /// and events, which this uses up (the state is taken, not cloned;
    /// the next snapshot keeps new ones). The caller has checked the window
    /// holds every event the table has after the snapshot up to its newest.
    /// False when nothing is kept.
    pub fn refold_in_memory(&mut self) -> bool {
        let Some(replay) = self.replay.take() else {
            return false;
        };
        let Replay { base, mut events } = *replay;
        events.sort_by_key(|e| e.sequence);
        self.state = base;
        for event in events {
            self.reducer.fold(&mut self.state, &event);
        }
        self.dirty = false;
        true
    }

    /// Something was folded out of sequence order.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The newest sequence received, or the snapshot's.
    pub fn received_upto(&self) -> i64 {
        self.window.last().unwrap_or(0).max(self.snap_seq)
    }

    /// Start from a stored (or pending) snapshot: everything up to its
    /// sequence counts as covered by it.
    pub fn start_from(&mut self, state: State, version: i32, sequence: i64) {
        self.state = state;
        self.snap_version = version;
        self.snap_seq = sequence;
        self.forgotten_upto = sequence;
        self.replay = None;
    }

    /// File an arriving event. `table`: stabilize's events table can
    /// settle what the ledger cannot.
    pub fn receive(&mut self, event: Event, table: bool) -> Receipt {
        let seq = event.sequence;
        if self.window.contains(seq) || self.folded.contains(seq) {
            return Receipt::Duplicate;
        }
        let late = if seq <= self.snap_seq {
            if table {
                return Receipt::Settle;
            }
            if seq <= self.forgotten_upto {
                return Receipt::Duplicate;
            }
            true
        } else {
            self.window.last().is_some_and(|last| last > seq)
        };
        self.dirty |= late;
        self.disordered |= late;
        let first = self.window.is_empty();
        self.fold(event);
        Receipt::Folded { late, first }
    }

    /// Fold an event known to be new (from the table, in sequence order).
    pub fn fold(&mut self, event: Event) {
        self.window.insert(event.sequence);
        match &mut self.replay {
            Some(replay) if replay.events.len() < REPLAY_MAX_EVENTS => {
                self.reducer.fold(&mut self.state, &event);
                replay.events.push(event);
            }
            _ => {
                self.replay = None;
                self.reducer.fold(&mut self.state, &event);
            }
        }
    }

    /// Version and sequence a snapshot of the window would have; `None`
    /// when nothing was folded since the last one.
    pub fn next_position(&self) -> Option<(i32, i64)> {
        let last = self.window.last()?;
        Some((
            self.snap_version + self.window.len() as i32,
            self.snap_seq.max(last),
        ))
    }

    /// The window became the snapshot at `position` ([`Self::next_position`]).
    /// `trim_to` is given when there is an events table: `folded` then keeps
    /// about that many newest sequences (the table settles older questions).
    pub fn settle(&mut self, (version, sequence): (i32, i64), trim_to: Option<usize>) {
        self.dirty = false;
        self.snap_version = version;
        self.snap_seq = sequence;
        self.folded.append(std::mem::take(&mut self.window));
        if let Some(keep) = trim_to
            && self.folded.len() > keep * 2
            && let Some(upto) = self.folded.forget_oldest(self.folded.len() - keep)
        {
            self.forgotten_upto = self.forgotten_upto.max(upto);
        }
        // Only with a table (`trim_to`) is a window ever re-folded.
        self.replay = (self.disordered && trim_to.is_some()).then(|| {
            Box::new(Replay {
                base: self.state.clone(),
                events: Vec::new(),
            })
        });
    }

    /// Re-fold the window in sequence order: `base` is the last snapshot's
    /// state (at [`Self::snapshot_position`]) and `events` the table's after
    /// it; or, `from_start`, the reducer's initial state and every event.
    pub fn refold(&mut self, base: State, from_start: bool, events: Vec<Event>) {
        if from_start {
            self.snap_version = 0;
            self.snap_seq = 0;
        }
        self.replay = None;
        self.state = base;
        self.window.clear();
        for event in events {
            self.fold(event);
        }
        self.dirty = false;
    }

    /// Replace everything with the table's replay of the workflow up to
    /// `upto` (`events` are all of them, in order): that becomes the
    /// snapshot position.
    pub fn replay(&mut self, initial: State, events: Vec<Event>, upto: i64) {
        self.replay = None;
        self.state = initial;
        self.folded.clear();
        self.window.clear();
        self.snap_version = events.len() as i32;
        self.snap_seq = events.last().map_or(upto, |e| e.sequence.max(upto));
        for event in events {
            self.folded.insert(event.sequence);
            self.reducer.fold(&mut self.state, &event);
        }
        self.forgotten_upto = 0;
        self.dirty = false;
    }

    /// Whether the last snapshot covers exactly the table's `count` events
    /// up to its sequence (no snapshot yet: nothing to contradict).
    pub fn covers(&self, count: i64) -> bool {
        self.snap_seq == 0 || count == i64::from(self.snap_version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::canonical::NumberForm;
    use crate::model::event::parse_timestamp;
    use crate::model::payload::Payload;
    use crate::model::{EntityKey, EntityType};
    use serde_json::Value;
    use serde_json::json;
    use std::sync::Arc;

    /// A merge-reducer event setting `"s<seq>": seq`.
    fn event(seq: i64) -> Event {
        let Value::Object(data) = json!({ format!("s{seq}"): seq }) else {
            unreachable!()
        };
        Event {
            event_type: "task.updated".into(),
            timestamp: parse_timestamp("2026-11-26T00:00:00+00:00").unwrap(),
            sequence: seq,
            entity_type: EntityType::Task,
            entity_id: Arc::from("t"),
            workflow_id: Arc::from("wf"),
            data: Payload::from_map(&data),
            schema_version: 1,
            numbers: NumberForm::Jsonb,
        }
    }

    fn ledger() -> Ledger {
        let key = EntityKey::new(EntityType::Task, "t");
        Ledger::new(Reducer::Merge, Reducer::Merge.initial(&key))
    }

    fn keys(ledger: &Ledger) -> Vec<String> {
        ledger.state().to_map().keys().cloned().collect()
    }

    #[test]
    fn in_order_events_fold_and_a_resend_is_a_duplicate() {
        let mut l = ledger();
        assert_eq!(
            l.receive(event(1), true),
            Receipt::Folded {
                late: false,
                first: true
            }
        );
        assert_eq!(
            l.receive(event(2), true),
            Receipt::Folded {
                late: false,
                first: false
            }
        );
        assert_eq!(l.receive(event(2), true), Receipt::Duplicate);
        assert_eq!(l.next_position(), Some((2, 2)));
        assert!(!l.is_dirty());
        l.settle((2, 2), None);
        assert_eq!(l.next_position(), None);
        assert_eq!(l.receive(event(1), false), Receipt::Duplicate);
        assert_eq!(keys(&l), ["s1", "s2"]);
    }

    #[test]
    fn an_event_out_of_order_makes_the_ledger_dirty_until_refolded() {
        let mut l = ledger();
        l.receive(event(1), true);
        l.receive(event(3), true);
        assert_eq!(
            l.receive(event(2), true),
            Receipt::Folded {
                late: true,
                first: false
            }
        );
        assert!(l.is_dirty());
        // Version counts events; the sequence is the newest.
        assert_eq!(l.next_position(), Some((3, 3)));
        let initial = Reducer::Merge.initial(&EntityKey::new(EntityType::Task, "t"));
        l.refold(initial, true, vec![event(1), event(2), event(3)]);
        assert!(!l.is_dirty());
        assert_eq!(l.next_position(), Some((3, 3)));
    }

    #[test]
    fn below_the_snapshot_the_table_settles_or_the_start_covers() {
        let mut l = ledger();
        let Value::Object(base) = json!({"s5": 5}) else {
            unreachable!()
        };
        l.start_from(State::Tree(base), 4, 5);
        // With the table: the table decides, nothing is folded.
        assert_eq!(l.receive(event(3), true), Receipt::Settle);
        assert_eq!(l.window_len(), 0);
        // Without: covered by the snapshot started from.
        assert_eq!(l.receive(event(3), false), Receipt::Duplicate);
        l.receive(event(6), false);
        l.settle(l.next_position().unwrap(), None);
        assert_eq!(l.snapshot_position(), (5, 6));
        // Never seen, above what the start covered, below the snapshot:
        // folded late without a table.
        let mut l2 = ledger();
        l2.receive(event(2), false);
        l2.settle((1, 2), None);
        assert_eq!(
            l2.receive(event(1), false),
            Receipt::Folded {
                late: true,
                first: true
            }
        );
        assert!(l2.is_dirty());
    }

    #[test]
    fn after_disorder_the_window_refolds_in_memory_like_the_table_would() {
        let mut l = ledger();
        l.receive(event(2), true);
        l.receive(event(1), true); // out of order: from now on, keep
        assert!(!l.can_refold_in_memory(), "nothing kept before a snapshot");
        l.settle(l.next_position().unwrap(), Some(64));
        assert!(l.can_refold_in_memory());
        // Merge events folded out of order: "k" ends as the later sequence's.
        let set = |seq: i64| {
            let mut e = event(seq);
            e.data.insert("k", &json!(seq));
            e
        };
        l.receive(set(5), true);
        l.receive(set(3), true);
        l.receive(set(3), true); // a duplicate is not kept twice
        assert!(l.is_dirty());
        assert_eq!(
            l.state().to_map()["k"],
            json!(3),
            "arrival order before the refold"
        );
        assert!(l.window_is(&[3, 5]));
        assert!(l.refold_in_memory());
        assert!(!l.is_dirty());
        assert_eq!(l.state().to_map()["k"], json!(5), "sequence order after it");
        assert_eq!(keys(&l), ["k", "s1", "s2", "s3", "s5"]);
        assert_eq!(l.next_position(), Some((4, 5)));
        // A table replay forgets what was kept until the next snapshot.
        let initial = Reducer::Merge.initial(&EntityKey::new(EntityType::Task, "t"));
        l.replay(initial, vec![event(1)], 1);
        assert!(!l.can_refold_in_memory());
        assert!(!l.refold_in_memory());
    }

    #[test]
    fn trimming_forgets_old_sequences_but_still_counts_them_covered() {
        let mut l = ledger();
        for seq in 1..=30 {
            l.receive(event(seq), false);
        }
        l.settle(l.next_position().unwrap(), Some(5));
        assert_eq!(l.snapshot_position(), (30, 30));
        // Forgotten but at or below what was settled: duplicates anyway.
        assert_eq!(l.receive(event(1), false), Receipt::Duplicate);
        assert_eq!(l.receive(event(29), false), Receipt::Duplicate);
    }

    #[test]
    fn a_replay_becomes_the_snapshot_position_and_covers_checks_counts() {
        let mut l = ledger();
        assert!(l.covers(0), "no snapshot yet: nothing to contradict");
        l.receive(event(9), true);
        let initial = Reducer::Merge.initial(&EntityKey::new(EntityType::Task, "t"));
        l.replay(initial, vec![event(2), event(4), event(9)], 9);
        assert_eq!(l.snapshot_position(), (3, 9));
        assert_eq!(l.next_position(), None);
        assert!(l.covers(3));
        assert!(!l.covers(4));
        assert_eq!(l.received_upto(), 9);
        assert_eq!(keys(&l), ["s2", "s4", "s9"]);
    }
}
