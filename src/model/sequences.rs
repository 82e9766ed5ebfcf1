//! A sorted set of sequences, kept as the gaps between them, a few bytes
//! each.
//!
//! Sequences are global, so one entity's are far apart (a thousand
//! workflows interleaved: gaps of about a thousand), but the gap from one
//! to the next fits in one or two bytes where a sequence takes eight. An
//! entity remembers the sequences it folded since its last snapshot and a
//! few windows before (all of them when there is no events table to ask):
//! as `Vec<i64>` grown by doubling that was 4 KB of a realistic workflow's
//! memory, here about 700 bytes.
//!
//! Events nearly always come newest last, which is a push of the gap, and
//! a duplicate or late event is told by the first and last sequence alone
//! unless it falls between them; only then is the set read through, or,
//! for one inserted there, written again.

/// A set of sequences in increasing order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sequences {
    /// The smallest and the largest; meaningless when `len` is 0.
    first: i64,
    last: i64,
    len: usize,
    /// From each sequence to the next, the difference (at least 1) in
    /// LEB128: seven bits a byte, low bits first, the high bit set on
    /// every byte but a number's last.
    gaps: Vec<u8>,
}

impl Sequences {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest sequence.
    pub fn last(&self) -> Option<i64> {
        (self.len > 0).then_some(self.last)
    }

    /// Each sequence, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        let mut at = 0;
        let mut next = (self.len > 0).then_some(self.first);
        std::iter::from_fn(move || {
            let current = next?;
            next = (at < self.gaps.len()).then(|| {
                let gap = read_gap(&self.gaps, &mut at);
                current.wrapping_add(gap as i64)
            });
            Some(current)
        })
    }

    pub fn contains(&self, seq: i64) -> bool {
        if self.len == 0 || seq < self.first || seq > self.last {
            return false;
        }
        if seq == self.first || seq == self.last {
            return true;
        }
        self.iter().take_while(|&s| s <= seq).any(|s| s == seq)
    }

    /// Add `seq`; false when it was there already.
    pub fn insert(&mut self, seq: i64) -> bool {
        if self.len == 0 {
            self.first = seq;
            self.last = seq;
            self.len = 1;
            return true;
        }
        if seq > self.last {
            push_gap(&mut self.gaps, seq.wrapping_sub(self.last) as u64);
            self.last = seq;
            self.len += 1;
            return true;
        }
        if self.contains(seq) {
            return false;
        }
        let mut all: Vec<i64> = self.iter().collect();
        let at = all.partition_point(|&s| s < seq);
        all.insert(at, seq);
        *self = all.into_iter().collect();
        true
    }

    /// Add every sequence of `other`.
    pub fn append(&mut self, other: Sequences) {
        if other.len == 0 {
            return;
        }
        if self.len == 0 {
            *self = other;
            return;
        }
        if other.first > self.last {
            push_gap(&mut self.gaps, other.first.wrapping_sub(self.last) as u64);
            self.gaps.extend_from_slice(&other.gaps);
            self.last = other.last;
            self.len += other.len;
            return;
        }
        for seq in other.iter() {
            self.insert(seq);
        }
    }

    /// Forget the `count` smallest sequences; the largest of them, if any.
    pub fn forget_oldest(&mut self, count: usize) -> Option<i64> {
        let count = count.min(self.len);
        let forgotten = self.iter().nth(count.checked_sub(1)?);
        *self = self.iter().skip(count).collect();
        forgotten
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.gaps.clear();
    }

    /// Whether the set holds exactly `seqs` (sorted).
    pub fn is(&self, seqs: &[i64]) -> bool {
        self.len == seqs.len() && self.iter().eq(seqs.iter().copied())
    }
}

/// From sequences in increasing order (others are inserted one by one).
impl FromIterator<i64> for Sequences {
    fn from_iter<I: IntoIterator<Item = i64>>(seqs: I) -> Sequences {
        let mut set = Sequences::default();
        for seq in seqs {
            set.insert(seq);
        }
        set
    }
}

fn push_gap(gaps: &mut Vec<u8>, mut gap: u64) {
    while gap >= 0x80 {
        gaps.push(0x80 | (gap & 0x7f) as u8);
        gap >>= 7;
    }
    gaps.push(gap as u8);
}

fn read_gap(gaps: &[u8], at: &mut usize) -> u64 {
    let (mut gap, mut shift) = (0u64, 0);
    loop {
        let byte = gaps[*at];
        *at += 1;
        gap |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return gap;
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn gaps_take_a_byte_or_two_where_a_sequence_took_eight() {
        let set: Sequences = (0..300).map(|n| 1_000 + n * 1_000).collect();
        assert_eq!(set.len(), 300);
        assert_eq!(set.gaps.len(), 2 * 299);
        assert_eq!(set.last(), Some(300_000));
        assert!(set.contains(150_000) && !set.contains(150_001));
    }

    #[test]
    fn extreme_sequences_and_gaps_are_kept() {
        let set: Sequences = [i64::MIN, -1, 0, 1, i64::MAX].into_iter().collect();
        assert!(set.is(&[i64::MIN, -1, 0, 1, i64::MAX]));
        assert!(!set.contains(2));
    }

    /// One step on both the set and a `BTreeSet`.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(i64),
        Append(Vec<i64>),
        Forget(usize),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly increasing, as events come; sometimes anywhere.
        let seq = prop_oneof![0i64..2_000, any::<i64>()];
        prop_oneof![
            8 => seq.prop_map(Op::Insert),
            2 => prop::collection::vec(0i64..4_000, 0..20).prop_map(Op::Append),
            1 => (0usize..30).prop_map(Op::Forget),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_sorted_set(ops in prop::collection::vec(op(), 0..80), probe in 0i64..4_000) {
            let mut set = Sequences::default();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(seq) => prop_assert_eq!(set.insert(seq), model.insert(seq)),
                    Op::Append(seqs) => {
                        let mut sorted = seqs.clone();
                        sorted.sort_unstable();
                        set.append(sorted.iter().copied().collect());
                        model.extend(seqs);
                    }
                    Op::Forget(count) => {
                        let expected = model.iter().take(count).next_back().copied();
                        prop_assert_eq!(set.forget_oldest(count), expected);
                        model = model.into_iter().skip(count).collect();
                    }
                    Op::Clear => {
                        set.clear();
                        model.clear();
                    }
                }
                let all: Vec<i64> = model.iter().copied().collect();
                prop_assert!(set.is(&all), "{:?} against {:?}", set.iter().collect::<Vec<_>>(), all);
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.last(), model.last().copied());
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
                for seq in &all {
                    prop_assert!(set.contains(*seq));
                }
            }
        }
    }
}
