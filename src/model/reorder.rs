//! Putting a connection's events back in sequence order before they are
//! folded, within a small window.
//!
//! Sequences are assigned at insert, not at commit, so a producer's stream
//! is nearly in order with a few events a little late. An event folded
//! after a later one of its entity costs a re-fold of the entity's window
//! (in memory or from the events table). Holding the last few events of a
//! connection and handing them on smallest sequence first turns most of
//! that disorder back into order for free. Anything later than the window
//! still arrives late, and the ledger handles it exactly as before: the
//! window only saves work, it never decides what is folded.
//!
//! No event is held longer than the reader asks: [`Reorder::release_older`]
//! hands on every event that came before a time, and those of smaller
//! sequences with it, so a steady trickle that never leaves the connection
//! quiet does not hold events until the window fills.
//!
//! Pure: the reader gives the times and decides when to release or
//! [`Reorder::drain`] (a command, a held event's time up, backpressure, the
//! end).

use std::collections::VecDeque;
use std::time::Instant;

/// Events held back, handed on smallest sequence first once more than
/// `window` are held. Events with equal sequences (duplicates) keep their
/// arrival order.
#[derive(Debug)]
pub struct Reorder<T> {
    /// Sorted by (sequence, arrival), smallest first. Not a heap: a feed
    /// is nearly in order, so an event nearly always goes at the back and
    /// leaves from the front, each a step; a binary heap sifted every
    /// event through its eight levels (3.5% of the daemon's instructions
    /// on an ordered feed). A late event is inserted in place, moving the
    /// shorter side of at most `window` entries.
    held: VecDeque<Held<T>>,
    /// When each event came, in arrival order from the oldest still held,
    /// and whether it is still held (a `BTreeMap` of the held ones cost
    /// 3% of the daemon's instructions).
    came: VecDeque<(Instant, bool)>,
    /// The arrival number of `came`'s first.
    came_base: u64,
    window: usize,
    arrivals: u64,
    /// Highest sequence seen on this connection.
    highest: i64,
}

#[derive(Debug)]
struct Held<T> {
    sequence: i64,
    arrival: u64,
    item: T,
}

impl<T> Reorder<T> {
    /// Hold at most `window` events; 0 hands every event on at once.
    pub fn new(window: usize) -> Self {
        Reorder {
            held: VecDeque::with_capacity(window + 1),
            came: VecDeque::new(),
            came_base: 1,
            window,
            arrivals: 0,
            highest: i64::MIN,
        }
    }

    /// Take in an event that came at `now`; returns the one handed on, if
    /// the window is full. `out_of_order` tells whether this event came
    /// after a higher sequence on the same connection (it is put back in
    /// order if still possible).
    pub fn push(&mut self, sequence: i64, item: T, now: Instant) -> (Option<T>, bool) {
        let out_of_order = sequence < self.highest;
        self.highest = self.highest.max(sequence);
        if self.window == 0 {
            return (Some(item), out_of_order);
        }
        self.arrivals += 1;
        let held = Held {
            sequence,
            arrival: self.arrivals,
            item,
        };
        // Its arrival is the newest, so it goes after every held event of
        // its sequence or a smaller one.
        if self
            .held
            .back()
            .is_none_or(|last| last.sequence <= sequence)
        {
            self.held.push_back(held);
        } else {
            let at = self.held.partition_point(|h| h.sequence <= sequence);
            self.held.insert(at, held);
        }
        if self.came.is_empty() {
            self.came_base = self.arrivals;
        }
        self.came.push_back((now, true));
        let released = if self.held.len() > self.window {
            self.pop().map(|(_, item)| item)
        } else {
            None
        };
        (released, out_of_order)
    }

    /// When the longest held event came.
    pub fn oldest(&self) -> Option<Instant> {
        self.came.front().map(|&(at, _)| at)
    }

    /// Hand on every event that came at or before `cutoff`, and before each
    /// the held ones of smaller sequences, smallest first.
    pub fn release_older(&mut self, cutoff: Instant, mut out: impl FnMut(T)) {
        while let Some(&(at, _)) = self.came.front()
            && at <= cutoff
        {
            let oldest = self.came_base;
            while let Some((arrival, item)) = self.pop() {
                out(item);
                if arrival == oldest {
                    break;
                }
            }
        }
    }

    /// Hand on everything held, smallest sequence first.
    pub fn drain(&mut self, mut out: impl FnMut(T)) {
        while let Some((_, item)) = self.pop() {
            out(item);
        }
    }

    /// The held event of the smallest sequence, with its arrival.
    fn pop(&mut self) -> Option<(u64, T)> {
        let held = self.held.pop_front()?;
        self.came[(held.arrival - self.came_base) as usize].1 = false;
        while self.came.front().is_some_and(|&(_, held)| !held) {
            self.came.pop_front();
            self.came_base += 1;
        }
        Some((held.arrival, held.item))
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push every sequence, then drain; what comes out, in order.
    fn run(window: usize, sequences: &[i64]) -> (Vec<i64>, usize) {
        let mut reorder = Reorder::new(window);
        let mut out = Vec::new();
        let mut late = 0;
        for &s in sequences {
            let (released, out_of_order) = reorder.push(s, s, Instant::now());
            out.extend(released);
            late += usize::from(out_of_order);
        }
        reorder.drain(|s| out.push(s));
        (out, late)
    }

    proptest::proptest! {
        /// Against the rule itself: hold everything, and whenever more than
        /// `window` are held hand on the smallest (sequence, arrival).
        #[test]
        fn hands_on_the_smallest_held_whatever_the_disorder(
            window in 0usize..12,
            sequences in proptest::collection::vec(0i64..40, 0..200),
        ) {
            let mut model: Vec<(i64, usize)> = Vec::new();
            let mut expected = Vec::new();
            for (arrival, &s) in sequences.iter().enumerate() {
                model.push((s, arrival));
                if model.len() > window {
                    let min = (0..model.len()).min_by_key(|&i| model[i]).unwrap();
                    expected.push(model.remove(min));
                }
            }
            model.sort();
            expected.extend(model);

            let mut reorder = Reorder::new(window);
            let mut out = Vec::new();
            for (arrival, &s) in sequences.iter().enumerate() {
                out.extend(reorder.push(s, (s, arrival), Instant::now()).0);
            }
            reorder.drain(|held| out.push(held));
            proptest::prop_assert_eq!(out, expected);
        }
    }

    #[test]
    fn events_shuffled_within_the_window_come_out_in_order() {
        let shuffled = [3, 1, 2, 6, 4, 5, 9, 8, 7, 10];
        let (out, late) = run(4, &shuffled);
        assert_eq!(out, (1..=10).collect::<Vec<_>>());
        assert_eq!(late, 6, "1, 2, 4, 5, 8 and 7 each came after a higher one");
    }

    #[test]
    fn an_event_later_than_the_window_stays_late_and_nothing_is_lost() {
        let sequences = [2, 3, 4, 5, 6, 1];
        let (out, late) = run(2, &sequences);
        assert_eq!(out, vec![2, 3, 4, 1, 5, 6]);
        assert_eq!(late, 1);
    }

    #[test]
    fn a_full_window_hands_on_its_smallest_and_holds_the_rest() {
        let mut reorder = Reorder::new(3);
        let now = Instant::now();
        assert_eq!(reorder.push(5, 'a', now).0, None);
        assert_eq!(reorder.push(3, 'b', now).0, None);
        assert_eq!(reorder.push(4, 'c', now).0, None);
        assert_eq!(reorder.len(), 3);
        assert_eq!(reorder.push(9, 'd', now).0, Some('b'));
        assert_eq!(reorder.push(1, 'e', now).0, Some('e'));
        assert_eq!(reorder.len(), 3);
    }

    #[test]
    fn duplicates_keep_their_arrival_order() {
        let mut reorder = Reorder::new(8);
        let now = Instant::now();
        for (s, tag) in [(2, 'x'), (1, 'a'), (2, 'y'), (1, 'b')] {
            assert_eq!(reorder.push(s, tag, now).0, None);
        }
        let mut out = Vec::new();
        reorder.drain(|t| out.push(t));
        assert_eq!(out, vec!['a', 'b', 'x', 'y']);
        assert!(reorder.is_empty());
    }

    #[test]
    fn a_window_of_zero_holds_nothing() {
        let mut reorder = Reorder::new(0);
        let now = Instant::now();
        assert_eq!(reorder.push(7, 'a', now), (Some('a'), false));
        assert_eq!(reorder.push(6, 'b', now), (Some('b'), true));
        assert!(reorder.is_empty());
    }

    #[test]
    fn events_held_too_long_go_on_with_the_smaller_sequences_before_them() {
        let start = Instant::now();
        let at = |ms: u64| start + std::time::Duration::from_millis(ms);
        let mut reorder = Reorder::new(64);
        for (s, ms) in [(5, 0), (7, 1), (3, 2), (9, 8), (8, 9)] {
            assert_eq!(reorder.push(s, s, at(ms)).0, None);
        }
        assert_eq!(reorder.oldest(), Some(at(0)));
        let mut out = Vec::new();
        reorder.release_older(at(0), |s| out.push(s));
        // 5 came first; 3, though later, goes before it.
        assert_eq!(out, [3, 5]);
        assert_eq!(reorder.oldest(), Some(at(1)));
        reorder.release_older(at(5), |s| out.push(s));
        assert_eq!(out, [3, 5, 7]);
        assert_eq!(reorder.oldest(), Some(at(8)));
        reorder.release_older(at(7), |s| out.push(s));
        assert_eq!(out, [3, 5, 7], "nothing else is that old");
        reorder.drain(|s| out.push(s));
        assert_eq!(out, [3, 5, 7, 8, 9]);
        assert_eq!(reorder.oldest(), None);
        assert!(reorder.is_empty());
    }
}
