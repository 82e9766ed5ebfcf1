//! A seeded mutator of NDJSON frames, over real stabilize events: the hostile
//! input a producer (or a broken one) can send. Shared, by `#[path]`, by
//! `benches/mutate.rs` (10M frames through `decode`) and
//! `tests/it/fuzz_socket.rs` (the same frames over the live socket).
//!
//! Deterministic: the same seed events and PRNG seed give the same frames.
//! No frame contains a `\n`: one frame is one line, framing is the socket's.

#![allow(dead_code)] // each user takes what it needs

use serde_json::{Map, Value};
use snapshotd::model::event::{DecodeError, Frame, Limits, decode};

/// xorshift64*: tiny, fast, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so nearby seeds start far apart (never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What was done to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutation {
    /// A seed event as it is.
    Original,
    /// One to eight bytes flipped (a bit) or overwritten (any byte).
    ByteFlip,
    /// Cut at a random place.
    Truncate,
    /// One field, everywhere in the object in turn, given a value of another
    /// JSON type (null, number, string, array, object, bool) or removed.
    WrongType,
    /// A number field (or any field) given an extreme literal.
    ExtremeNumber,
    /// `timestamp` at and past the edges of time (chrono's last instant,
    /// rounding up past it, year 0, leap seconds, offsets out of range).
    ExtremeTimestamp,
    /// 10,000 `[` (alone, in `data`, closed or not), or `{"a":` nested.
    DeepNesting,
    /// Bytes that are not UTF-8, spliced in anywhere.
    InvalidUtf8,
    /// A string field holding a lone surrogate escape (`"\ud800"`).
    LoneSurrogate,
    /// A NUL byte raw (anywhere) or escaped (`\u0000`, in a value or a key).
    Nul,
    /// A line longer than `max_frame_bytes` (and one exactly at it).
    HugeLine,
    /// Empty or blank lines (`""`, `" "`, `"\r"`, `"\t \r"`).
    EmptyLine,
    /// The head of one seed glued to the tail of another.
    Splice,
}

impl Mutation {
    pub const ALL: [Mutation; 13] = [
        Mutation::Original,
        Mutation::ByteFlip,
        Mutation::Truncate,
        Mutation::WrongType,
        Mutation::ExtremeNumber,
        Mutation::ExtremeTimestamp,
        Mutation::DeepNesting,
        Mutation::InvalidUtf8,
        Mutation::LoneSurrogate,
        Mutation::Nul,
        Mutation::HugeLine,
        Mutation::EmptyLine,
        Mutation::Splice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::Original => "original",
            Mutation::ByteFlip => "byte_flip",
            Mutation::Truncate => "truncate",
            Mutation::WrongType => "wrong_type",
            Mutation::ExtremeNumber => "extreme_number",
            Mutation::ExtremeTimestamp => "extreme_timestamp",
            Mutation::DeepNesting => "deep_nesting",
            Mutation::InvalidUtf8 => "invalid_utf8",
            Mutation::LoneSurrogate => "lone_surrogate",
            Mutation::Nul => "nul",
            Mutation::HugeLine => "huge_line",
            Mutation::EmptyLine => "empty_line",
            Mutation::Splice => "splice",
        }
    }

    /// Default share of each mutation, out of the sum of all.
    pub fn default_weight(self) -> u32 {
        match self {
            Mutation::Original => 20,
            Mutation::ByteFlip => 200,
            Mutation::Truncate => 100,
            Mutation::WrongType => 200,
            Mutation::ExtremeNumber => 120,
            Mutation::ExtremeTimestamp => 40,
            Mutation::DeepNesting => 30,
            Mutation::InvalidUtf8 => 80,
            Mutation::LoneSurrogate => 60,
            Mutation::Nul => 60,
            // One in ~1,000 frames: each is over a MiB.
            Mutation::HugeLine => 1,
            Mutation::EmptyLine => 30,
            Mutation::Splice => 50,
        }
    }
}

/// Values of every JSON type (and removal, as `None`) for [`Mutation::WrongType`].
fn wrong_values() -> Vec<Option<Value>> {
    use serde_json::json;
    vec![
        Some(Value::Null),
        Some(json!(0)),
        Some(json!(-7)),
        Some(json!(1.5)),
        Some(json!("")),
        Some(json!("text")),
        Some(json!([])),
        Some(json!([1, "a", null])),
        Some(json!({})),
        Some(json!({"k": {"n": 1}})),
        Some(json!(true)),
        Some(json!(false)),
        None,
    ]
}

/// Number literals at and past every edge: f64 range and subnormals, u64
/// and i64, Postgres numeric's exponent, digit and scale limits, and text
/// that is not JSON at all (NaN, Infinity, hex, `+1`, `1.`).
fn extreme_numbers() -> Vec<String> {
    let mut out: Vec<String> = [
        "1e308",
        "-1e309",
        "1e309",
        "1.7976931348623157e308",
        "1.7976931348623159e308",
        "-1.7976931348623157e308",
        "5e-324",
        "2.4e-324",
        "0.1e-400",
        "1e-400",
        "18446744073709551616",
        "18446744073709551615",
        "-18446744073709551616",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "1e1000",
        "1e1001",
        "1e-1000",
        "1e-1001",
        "1E+400",
        "9e99999999999999999999",
        "1e-99999999999999999999",
        "-0",
        "-0.0",
        "0e0",
        "0.0e-5",
        "1.10",
        "NaN",
        "-NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "0x10",
        "+1",
        "1.",
        ".5",
        "01",
        "1e",
        "1e+",
        "1_000",
        "1.0e",
        "--1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Huge integers: past u128, past Postgres' 131,072 integer digits.
    out.push("9".repeat(40));
    out.push(format!("-{}", "1".repeat(400)));
    out.push("7".repeat(131_073));
    // Huge scales: past Postgres' 16,383 fractional digits; a float that
    // overflows only as Python reads it (JSONB keeps its decimal text).
    out.push(format!("0.{}1", "0".repeat(16_383)));
    out.push(format!("1{}.5", "0".repeat(309)));
    out.push(format!("{}.0", "9".repeat(400)));
    out
}

/// Byte sequences that are not UTF-8.
const INVALID_UTF8: [&[u8]; 8] = [
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",             // overlong NUL
    b"\x80",                 // lone continuation byte
    b"\xe2\x82",             // truncated 3-byte sequence
    b"\xed\xa0\x80",         // a surrogate encoded as UTF-8
    b"\xf4\x90\x80\x80",     // past U+10FFFF
    b"\xf8\x88\x80\x80\x80", // 5-byte form
];

/// Times at and past every edge chrono, Postgres and Python have.
const EXTREME_TIMESTAMPS: [&str; 16] = [
    "+262142-12-31T23:59:59.9999995",
    "+262142-12-31T23:59:59.999999+00:00",
    "+262142-12-31T23:59:59.9999995-01:00",
    "+262143-01-01T00:00:00Z",
    "-262143-01-01T00:00:00Z",
    "-262144-12-31T23:59:59.0000005+01:00",
    "0000-01-01T00:00:00+00:01",
    "9999-12-31T23:59:59.9999995Z",
    "2026-12-31T23:59:60Z",
    "2026-02-30T00:00:00Z",
    "2026-11-26T24:00:00Z",
    "2026-11-26T03:59:48+24:00",
    "2026-11-26T03:59:48.12345678901234567890Z",
    "2026-11-26T03:59:48,5Z",
    "2026-11-26",
    "",
];

const BLANKS: [&[u8]; 5] = [b"", b" ", b"\r", b"\t \r", b"  "];

const LONE_SURROGATES: [&str; 6] = [
    r"\ud800",
    r"\udfff",
    r"\udc00x",
    r"a\ud83d",
    r"\ud83d\u0041",
    r"\ude00\ud83d",
];

/// One seed: its line and its parsed object, with every field path in it.
struct Seed {
    line: Vec<u8>,
    object: Map<String, Value>,
    /// Paths to every field of every object in it, top level first.
    paths: Vec<Vec<String>>,
    /// Which of `paths` hold a number, which a string.
    numbers: Vec<usize>,
    strings: Vec<usize>,
}

const MARK: &str = "\u{1}__mutate_mark__";
const MARK_JSON: &[u8] = br#""\u0001__mutate_mark__""#;

/// Frames built from seed events, one per [`Mutator::next`].
pub struct Mutator {
    rng: XorShift,
    seeds: Vec<Seed>,
    weights: Vec<(Mutation, u32)>,
    total_weight: u32,
    wrong: Vec<Option<Value>>,
    extremes: Vec<String>,
    /// Where the walk of [`Mutation::WrongType`] is: seed, path, value.
    walk: (usize, usize, usize),
    /// Prebuilt frames, built once: lines over the limit, deep nests.
    huge: Vec<Vec<u8>>,
    deep: Vec<Vec<u8>>,
    buf: Vec<u8>,
}

impl Mutator {
    /// `seeds`: event lines (JSON objects); `max_frame_bytes`: the socket's
    /// limit, so huge lines are just past it (and one exactly at it).
    pub fn new(rng_seed: u64, seeds: &[Vec<u8>], max_frame_bytes: usize) -> Mutator {
        let seeds: Vec<Seed> = seeds
            .iter()
            .filter_map(|line| {
                let object: Map<String, Value> = serde_json::from_slice(line).ok()?;
                let mut paths = Vec::new();
                collect_paths(&object, &mut Vec::new(), &mut paths, 0);
                let holding = |want: fn(&Value) -> bool| -> Vec<usize> {
                    (0..paths.len())
                        .filter(|&i| get_path(&object, &paths[i]).is_some_and(want))
                        .collect()
                };
                let numbers = holding(Value::is_number);
                let strings = holding(Value::is_string);
                Some(Seed {
                    line: line
                        .iter()
                        .map(|&b| if b == b'\n' { b' ' } else { b })
                        .collect(),
                    object,
                    paths,
                    numbers,
                    strings,
                })
            })
            .collect();
        assert!(!seeds.is_empty(), "the mutator needs seed events");
        let weights: Vec<(Mutation, u32)> = Mutation::ALL
            .iter()
            .map(|&m| (m, m.default_weight()))
            .collect();
        let mut mutator = Mutator {
            rng: XorShift::new(rng_seed),
            total_weight: weights.iter().map(|(_, w)| w).sum(),
            weights,
            wrong: wrong_values(),
            extremes: extreme_numbers(),
            walk: (0, 0, 0),
            huge: Vec::new(),
            deep: Vec::new(),
            buf: Vec::with_capacity(64 * 1024),
            seeds,
        };
        mutator.huge = mutator.build_huge(max_frame_bytes);
        mutator.deep = build_deep(&mutator.seeds[0].object);
        mutator
    }

    /// Change how often `mutation` is picked (0 = never).
    pub fn set_weight(&mut self, mutation: Mutation, weight: u32) {
        for (m, w) in &mut self.weights {
            if *m == mutation {
                *w = weight;
            }
        }
        self.total_weight = self.weights.iter().map(|(_, w)| w).sum();
        assert!(self.total_weight > 0, "every weight is zero");
    }

    /// The next frame (without its newline) and what was done to it.
    pub fn next(&mut self) -> (Mutation, &[u8]) {
        let mut roll = self.rng.below(self.total_weight as usize) as u32;
        let mut mutation = Mutation::Original;
        for &(m, w) in &self.weights {
            if roll < w {
                mutation = m;
                break;
            }
            roll -= w;
        }
        self.buf.clear();
        let seed = self.rng.below(self.seeds.len());
        match mutation {
            Mutation::Original => {
                let line = &self.seeds[seed].line;
                self.buf.extend_from_slice(line);
            }
            Mutation::ByteFlip => {
                self.buf.extend_from_slice(&self.seeds[seed].line);
                for _ in 0..=self.rng.below(8) {
                    let at = self.rng.below(self.buf.len());
                    if self.rng.below(2) == 0 {
                        self.buf[at] ^= 1 << self.rng.below(8);
                    } else {
                        self.buf[at] = self.rng.next_u64() as u8;
                    }
                }
            }
            Mutation::Truncate => {
                let line = &self.seeds[seed].line;
                let cut = self.rng.below(line.len());
                self.buf.extend_from_slice(&line[..cut]);
            }
            Mutation::WrongType => self.wrong_type(),
            Mutation::ExtremeNumber => {
                let text = self.extremes[self.rng.below(self.extremes.len())].clone();
                let path = self.number_path(seed);
                self.with_raw(seed, &path, text.as_bytes());
            }
            Mutation::ExtremeTimestamp => {
                let text = EXTREME_TIMESTAMPS[self.rng.below(EXTREME_TIMESTAMPS.len())];
                let raw = serde_json::to_vec(text).expect("serialise");
                self.with_raw(seed, &["timestamp".to_string()], &raw);
            }
            Mutation::DeepNesting => {
                let pick = self.rng.below(self.deep.len());
                let frame = &self.deep[pick];
                self.buf.extend_from_slice(frame);
            }
            Mutation::InvalidUtf8 => {
                self.buf.extend_from_slice(&self.seeds[seed].line);
                let bad = INVALID_UTF8[self.rng.below(INVALID_UTF8.len())];
                let at = self.string_position(seed).unwrap_or(self.buf.len() / 2);
                self.buf.splice(at..at, bad.iter().copied());
            }
            Mutation::LoneSurrogate => {
                let escape = LONE_SURROGATES[self.rng.below(LONE_SURROGATES.len())];
                let path = self.string_path(seed);
                let raw = format!("\"{escape}\"");
                self.with_raw(seed, &path, raw.as_bytes());
            }
            Mutation::Nul => match self.rng.below(3) {
                0 => {
                    self.buf.extend_from_slice(&self.seeds[seed].line);
                    let at = self.rng.below(self.buf.len());
                    self.buf.insert(at, 0);
                }
                1 => {
                    let path = self.string_path(seed);
                    self.with_raw(seed, &path, br#""a\u0000b""#);
                }
                _ => {
                    // An escaped NUL in a key of `data`.
                    let mut object = self.seeds[seed].object.clone();
                    let data = object
                        .entry("data")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(data) = data {
                        data.insert("k\u{0}ey".into(), Value::from(1));
                    }
                    self.buf = serde_json::to_vec(&object).expect("serialise");
                }
            },
            Mutation::HugeLine => {
                let pick = self.rng.below(self.huge.len());
                return (mutation, &self.huge[pick]);
            }
            Mutation::EmptyLine => {
                let blank = BLANKS[self.rng.below(BLANKS.len())];
                self.buf.extend_from_slice(blank);
            }
            Mutation::Splice => {
                let other = self.rng.below(self.seeds.len());
                let a = &self.seeds[seed].line;
                let b = &self.seeds[other].line;
                let (i, j) = (self.rng.below(a.len()), self.rng.below(b.len()));
                self.buf.extend_from_slice(&a[..i]);
                self.buf.extend_from_slice(&b[j..]);
            }
        }
        for b in &mut self.buf {
            if *b == b'\n' {
                *b = b' ';
            }
        }
        (mutation, &self.buf)
    }

    /// The walk: every field of every seed in turn, each given every wrong
    /// value; then the whole frame as each of them (not an object).
    fn wrong_type(&mut self) {
        let (s, p, v) = self.walk;
        let seed = &self.seeds[s];
        let value = self.wrong[v].clone();
        match seed.paths.get(p) {
            Some(path) => {
                let mut object = seed.object.clone();
                set_path(&mut object, path, value);
                self.buf = serde_json::to_vec(&object).expect("serialise");
            }
            None => {
                let value = value.unwrap_or_else(|| Value::Array(Vec::new()));
                self.buf = serde_json::to_vec(&value).expect("serialise");
            }
        }
        // Advance: value fastest, then path (one past the last: the
        // frame itself), then seed.
        let mut next = (s, p, v + 1);
        if next.2 == self.wrong.len() {
            next = (s, p + 1, 0);
        }
        if next.1 > seed.paths.len() {
            next = ((s + 1) % self.seeds.len(), 0, 0);
        }
        self.walk = next;
    }

    /// A path to a number in the seed (three times in four), or any path.
    fn number_path(&mut self, seed: usize) -> Vec<String> {
        let (rng, seed) = (&mut self.rng, &self.seeds[seed]);
        if !seed.numbers.is_empty() && rng.below(4) != 0 {
            return seed.paths[*rng.pick(&seed.numbers)].clone();
        }
        any_path(rng, seed)
    }

    /// A path to a string in the seed, or any path when it has none.
    fn string_path(&mut self, seed: usize) -> Vec<String> {
        let (rng, seed) = (&mut self.rng, &self.seeds[seed]);
        if seed.strings.is_empty() {
            return any_path(rng, seed);
        }
        seed.paths[*rng.pick(&seed.strings)].clone()
    }

    /// A byte offset just inside a string of the line in `buf`, if any.
    fn string_position(&mut self, _seed: usize) -> Option<usize> {
        let quotes: Vec<usize> = self
            .buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'"')
            .map(|(i, _)| i + 1)
            .collect();
        if quotes.is_empty() || self.rng.below(4) == 0 {
            return None;
        }
        Some(quotes[self.rng.below(quotes.len())])
    }

    /// The seed with the value at `path` replaced by raw JSON text.
    fn with_raw(&mut self, seed: usize, path: &[String], raw: &[u8]) {
        self.buf = with_raw(&self.seeds[seed].object, path, raw);
    }

    /// Lines past the limit: a real event with a huge string, a deep run of
    /// `[`, blanks (a blank line that long is still too long), and one event
    /// exactly at the limit, which must be accepted.
    fn build_huge(&self, max: usize) -> Vec<Vec<u8>> {
        let seed = &self.seeds[0];
        let padded = |len: usize| {
            let mut object = seed.object.clone();
            set_path(
                &mut object,
                &["data".into(), "pad".into()],
                Some(Value::String(String::new())),
            );
            let base = serde_json::to_vec(&object).expect("serialise").len();
            let pad = len.saturating_sub(base);
            set_path(
                &mut object,
                &["data".into(), "pad".into()],
                Some(Value::String("x".repeat(pad))),
            );
            serde_json::to_vec(&object).expect("serialise")
        };
        let mut brackets = vec![b'['; max + 1];
        brackets.extend_from_slice(b"]");
        vec![
            padded(max + 1),
            padded(max + max / 2),
            brackets,
            vec![b' '; max + 10],
            padded(max),
        ]
    }
}

/// `object` serialised with the value at `path` replaced by raw JSON text.
fn with_raw(object: &Map<String, Value>, path: &[String], raw: &[u8]) -> Vec<u8> {
    let mut object = object.clone();
    set_path(&mut object, path, Some(Value::String(MARK.into())));
    let text = serde_json::to_vec(&object).expect("serialise");
    match memchr_find(&text, MARK_JSON) {
        Some(at) => [&text[..at], raw, &text[at + MARK_JSON.len()..]].concat(),
        None => text,
    }
}

fn any_path(rng: &mut XorShift, seed: &Seed) -> Vec<String> {
    match seed.paths.len() {
        0 => vec!["data".into()],
        n => seed.paths[rng.below(n)].clone(),
    }
}

/// 10,000 levels: alone, closed or not, inside an event's `data`, objects.
fn build_deep(seed: &Map<String, Value>) -> Vec<Vec<u8>> {
    let n = 10_000;
    let open = "[".repeat(n);
    let close = "]".repeat(n);
    let in_data = with_raw(
        seed,
        &["data".into(), "deep".into()],
        format!("{open}{close}").as_bytes(),
    );
    vec![
        open.clone().into_bytes(),
        format!("{open}{close}").into_bytes(),
        format!("{{\"op\": \"ping\", \"x\": {open}{close}}}").into_bytes(),
        "{\"a\":".repeat(n).into_bytes(),
        format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes(),
        in_data,
    ]
}

fn collect_paths(
    object: &Map<String, Value>,
    prefix: &mut Vec<String>,
    out: &mut Vec<Vec<String>>,
    depth: usize,
) {
    for (key, value) in object {
        prefix.push(key.clone());
        out.push(prefix.clone());
        if let (Value::Object(inner), true) = (value, depth < 4) {
            collect_paths(inner, prefix, out, depth + 1);
        }
        prefix.pop();
    }
}

fn get_path<'a>(object: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut here = object;
    for key in parents {
        here = here.get(key)?.as_object()?;
    }
    here.get(last)
}

/// Set (or, with `None`, remove) the value at `path`, creating objects on the way.
fn set_path(object: &mut Map<String, Value>, path: &[String], value: Option<Value>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut here = object;
    for key in parents {
        let slot = here
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        here = slot.as_object_mut().expect("made an object");
    }
    match value {
        Some(value) => {
            here.insert(last.clone(), value);
        }
        None => {
            here.remove(last);
        }
    }
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the daemon's socket does with one line (SPEC 2.2, `ingest.rs`): a
/// line over the limit is refused unread, a blank one skipped, the rest
/// (less a trailing `\r`) decoded.
#[derive(Debug)]
pub enum Outcome {
    Blank,
    TooLong,
    Decoded(Result<Frame, DecodeError>),
}

pub fn outcome(line: &[u8], max_frame_bytes: usize, limits: Limits) -> Outcome {
    if line.len() > max_frame_bytes {
        return Outcome::TooLong;
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Outcome::Blank;
    }
    Outcome::Decoded(decode(line, limits))
}

/// Seed event lines from a directory of one-frame files (`fuzz/seeds/decode`):
/// the events only, commands left out.
pub fn seed_events(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| std::fs::read(&path).expect("read a seed"))
        .filter(|line| {
            serde_json::from_slice::<Map<String, Value>>(line)
                .is_ok_and(|object| !object.contains_key("op"))
        })
        .collect()
}
