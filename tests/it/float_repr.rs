//! The float rendering against real CPython, double by double.
//!
//! `python_float_repr` must be CPython's `repr` for every finite double
//! (stabilize hashes `json.dumps`, which prints floats with `repr`). Doubles
//! are streamed as bit patterns to `tests/python/float_repr.py` from the
//! virtualenv, which answers with `repr(x)` and whether `x` is an exact tie
//! (decided there with exact decimals, independently of the Rust side).
//!
//! The doubles, in equal shares: uniformly random bit patterns, random
//! decimals of 1 to 17 significant digits over the whole exponent range,
//! values built to be exact ties (`k + m/2^n` near powers of ten, large
//! integers past 2^53, small dyadic fractions), and every boundary (the
//! exponent switches at 1e16 and 1e-4, subnormals, `-0.0`, `5e-324`, the
//! largest double) with its neighbours.
//!
//! CI compares 1,000,000; `cargo test --release -- --ignored
//! float_repr_hundred_million` compares 10^8 over two Python processes.

use crate::helpers::{python, repo};
use snapshotd::model::canonical::{python_float_repr, shortest_digits};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Command, Stdio};

/// splitmix64: small, fast, and the same sequence on every machine, so a
/// failing double is found again from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every boundary the rendering has, each with its neighbours.
#[allow(clippy::excessive_precision)] // a tie's exact value, on purpose
fn boundaries() -> Vec<f64> {
    let mut centres = vec![
        0.0,
        1e16,
        1e-4,
        1e-5,
        1e15,
        9_999_999_999_999_998.0,
        5e-324,
        f64::MIN_POSITIVE,
        f64::MIN_POSITIVE - 5e-324,
        f64::MAX,
        f64::EPSILON,
        0.1,
        0.5,
        1.0,
        2f64.powi(53),
        2f64.powi(63),
        2f64.powi(64),
        902_641_992_789.781_25,
    ];
    for p in -325..=308 {
        centres.push(format!("1e{p}").parse().unwrap());
    }
    for p in -1074..=1023 {
        centres.push(2f64.powi(p));
    }
    let mut all = Vec::new();
    for centre in centres {
        let bits = centre.to_bits();
        for delta in -3i64..=3 {
            let candidate = f64::from_bits(bits.wrapping_add_signed(delta));
            if candidate.is_finite() && candidate >= 0.0 {
                all.push(candidate);
                all.push(-candidate);
            }
        }
    }
    all
}

/// The `i`-th double of the stream for `seed`: the same on both sides of
/// the pipe, so nothing is kept in memory while 10^8 go through.
struct Doubles {
    rng: Rng,
    boundaries: Vec<f64>,
    produced: u64,
}

impl Doubles {
    fn new(seed: u64) -> Doubles {
        Doubles {
            rng: Rng(seed),
            boundaries: boundaries(),
            produced: 0,
        }
    }
}

impl Iterator for Doubles {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        let i = self.produced;
        self.produced += 1;
        if let Some(&b) = self.boundaries.get(i as usize) {
            return Some(b);
        }
        let rng = &mut self.rng;
        let x = loop {
            let x = match rng.below(4) {
                // A uniformly random bit pattern.
                0 => f64::from_bits(rng.next()),
                // A random decimal of 1 to 17 significant digits.
                1 => {
                    let digits = 1 + rng.below(17) as u32;
                    let mantissa = rng.below(10u64.pow(digits));
                    let exponent = rng.below(640) as i64 - 330;
                    format!("{mantissa}e{exponent}").parse().unwrap()
                }
                // k + m/2^n: an integer near a power of ten plus a short
                // binary fraction, whose exact decimal is often a midpoint.
                2 => {
                    let p = rng.below(16) as u32;
                    let int = 10u64.pow(p) + rng.below(9 * 10u64.pow(p));
                    let room = 52u32.saturating_sub(64 - int.leading_zeros());
                    let n = 1 + rng.below(u64::from(room.clamp(1, 30))) as i32;
                    let m = rng.below(1 << n);
                    int as f64 + m as f64 / 2f64.powi(n)
                }
                // A 53-bit integer scaled by a small power of two: large
                // integers past 2^53 and small fractions, ties on both sides.
                _ => {
                    let m = (rng.next() >> 11) | 1;
                    let shift = rng.below(140) as i32 - 70;
                    m as f64 * 2f64.powi(shift)
                }
            };
            if x.is_finite() {
                break x;
            }
        };
        Some(if rng.below(2) == 0 { x } else { -x })
    }
}

/// What one comparison run saw.
#[derive(Debug, Default)]
struct Tally {
    compared: u64,
    ties: u64,
    /// Ties where Rust's own `{:e}` digits were odd and had to be corrected.
    corrected: u64,
    mismatches: Vec<String>,
}

/// Stream `count` doubles of `seed` through CPython and compare every one.
fn compare(seed: u64, count: u64) -> Tally {
    let mut child = Command::new(python())
        .arg(repo().join("tests/python/float_repr.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python for float_repr.py");
    let stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let mut out = BufWriter::with_capacity(1 << 16, stdin);
        for x in Doubles::new(seed).take(count as usize) {
            writeln!(out, "{:016x}", x.to_bits()).expect("write to python");
        }
        out.flush().expect("flush to python");
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut tally = Tally::default();
    let mut lines = BufReader::with_capacity(1 << 16, stdout).lines();
    for x in Doubles::new(seed).take(count as usize) {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("python stopped after {} doubles", tally.compared))
            .expect("read from python");
        let (expected, tie) = line.split_once(' ').expect("`repr flag` line");
        let ours = python_float_repr(x);
        tally.compared += 1;
        if tie == "1" {
            tally.ties += 1;
            let rust = format!("{:e}", x.abs());
            let rust_digits: String = rust
                .split('e')
                .next()
                .expect("mantissa")
                .chars()
                .filter(|c| *c != '.')
                .collect();
            if shortest_digits(x.abs()).0 != rust_digits {
                tally.corrected += 1;
            }
        }
        if ours != expected && tally.mismatches.len() < 20 {
            tally.mismatches.push(format!(
                "{:016x}: python {expected}, ours {ours}",
                x.to_bits()
            ));
        }
    }
    writer.join().expect("writer thread");
    assert!(child.wait().expect("python exits").success());
    tally
}

fn check(tally: &Tally, count: u64) {
    eprintln!(
        "float repr: {} doubles compared with CPython, {} exact ties ({} of them \
         where Rust's own digits were odd), {} mismatches",
        tally.compared,
        tally.ties,
        tally.corrected,
        tally.mismatches.len()
    );
    assert_eq!(tally.compared, count);
    assert!(
        tally.mismatches.is_empty(),
        "renderings differ from CPython's repr:\n{}",
        tally.mismatches.join("\n")
    );
    // The tie generators must really have produced ties, or the test proves nothing.
    assert!(
        tally.ties >= count / 100,
        "only {} ties among {count} doubles",
        tally.ties
    );
    assert!(tally.corrected > 0, "no tie needed the correction");
}

#[test]
fn a_million_doubles_render_as_cpython_repr_does() {
    let count = 1_000_000;
    let tally = compare(0x5eed_0001, count);
    check(&tally, count);
}

#[test]
#[ignore = "10^8 doubles: a few minutes in release; run with --ignored"]
fn float_repr_hundred_million() {
    let per_worker = 50_000_000;
    let workers: Vec<_> = [0x5eed_1001u64, 0x5eed_2002]
        .into_iter()
        .map(|seed| std::thread::spawn(move || compare(seed, per_worker)))
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.join().expect("worker");
        total.compared += tally.compared;
        total.ties += tally.ties;
        total.corrected += tally.corrected;
        total.mismatches.extend(tally.mismatches);
    }
    check(&total, 2 * per_worker);
}
