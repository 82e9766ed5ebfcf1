//! Canonical JSON and `state_hash`, byte for byte what stabilize computes.
//!
//! stabilize hashes `json.dumps(state, sort_keys=True, default=str)` of the
//! state *as it reads it back from the store*. Two facts follow:
//!
//! * Numbers go through Postgres JSONB first, which keeps a number's decimal
//!   value and prints it in plain notation with the scale its literal implied
//!   ([`normalize_number`]). snapshotd stores exactly that text in both
//!   backends, so SQLite and Postgres readers see the same values.
//! * Python then reads a literal with `.`, `e` or `E` as a float and prints
//!   its shortest round-trip `repr`, and any other literal as an exact integer
//!   ([`python_number`]).
//!
//! Strings are escaped the way `ensure_ascii=True` does, keys are sorted by
//! code point (a `BTreeMap<String, _>` orders UTF-8 bytes, which is the same).
//!
//! One exception to "JSONB text in both backends", deliberately: stabilize's
//! own SQLite store keeps event data as Python's `json.dumps` text, so its
//! replay sees `-0.0` and a float of 1e16 or more as floats, where JSONB
//! would make `0.0` and an integer. A snapshot written to SQLite keeps
//! numbers as Python reads them ([`NumberForm::Python`]) so that it equals
//! stabilize's SQLite replay exactly; on Postgres they take the JSONB form.

use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

/// Largest exponent Postgres' numeric input accepts (`NUMERIC_MAX_PRECISION`).
const PG_MAX_EXPONENT: i64 = 1000;
/// Most digits before the decimal point a Postgres numeric can hold.
const PG_MAX_INTEGER_DIGITS: usize = 131_072;
/// Most digits after the decimal point a Postgres numeric can hold.
const PG_MAX_SCALE: usize = 16_383;

/// Why a JSON value cannot become a stored, hashable state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// Postgres JSONB refuses U+0000 in strings and keys.
    #[error("string contains the character U+0000, which PostgreSQL JSONB cannot store")]
    NulCharacter,
    /// Not a JSON number literal at all (should not happen past the parser).
    #[error("`{0}` is not a JSON number")]
    BadNumber(String),
    /// Outside what Postgres numeric accepts, or not finite as Python reads it.
    #[error("number `{0}` is out of range: {1}")]
    NumberOutOfRange(String, &'static str),
    /// A kept text that is not the JSON it should be (a bug, not input).
    #[error("kept state text `{0}` is not JSON")]
    NotJson(String),
    /// JSON text that does not parse, and why.
    #[error("not valid JSON: {0}")]
    Malformed(String),
}

/// The text numbers are kept in: what the store's reader will see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberForm {
    /// Postgres JSONB's decimal text (`1e-7` -> `0.0000001`).
    Jsonb,
    /// Python's own reading of the literal (`1e-7` -> float `1e-07`),
    /// for SQLite, where stabilize stores `json.dumps` text.
    Python,
}

/// `literal` in the given form.
pub fn normalize_number_as(literal: &str, form: NumberForm) -> Result<String, CanonicalError> {
    match form {
        NumberForm::Jsonb => normalize_number(literal),
        NumberForm::Python => python_number(literal),
    }
}

/// The decimal text Postgres JSONB prints back for a JSON number literal.
///
/// `1e-7` -> `0.0000001`, `1e+16` -> `10000000000000000`, `1.5e2` -> `150`,
/// `1.10` -> `1.10`, `-0.0` -> `0.0`, `-0` -> `0`.
pub fn normalize_number(literal: &str) -> Result<String, CanonicalError> {
    let bad = || CanonicalError::BadNumber(truncated(literal));
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => {
            let exp_text = &rest[at + 1..];
            let digits = exp_text.trim_start_matches(['+', '-']);
            if digits.is_empty()
                || exp_text.len() - digits.len() > 1
                || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            // Anything past 1000 is refused by Postgres; saturate to keep parsing total.
            let magnitude: i64 = digits.parse().unwrap_or(i64::MAX);
            let exponent = if exp_text.starts_with('-') {
                -magnitude
            } else {
                magnitude
            };
            (&rest[..at], exponent)
        }
        None => (rest, 0),
    };
    if !(-PG_MAX_EXPONENT..=PG_MAX_EXPONENT).contains(&exponent) {
        return Err(CanonicalError::NumberOutOfRange(
            truncated(literal),
            "PostgreSQL accepts exponents between -1000 and 1000",
        ));
    }
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
        || (mantissa.contains('.') && frac_part.is_empty())
    {
        return Err(bad());
    }

    // value = digits * 10^-scale
    let digits: String = [int_part, frac_part].concat();
    let scale = frac_part.len() as i64 - exponent;
    let dscale = scale.max(0) as usize;
    let mut all = digits;
    if scale < 0 {
        all.extend(std::iter::repeat_n('0', (-scale) as usize));
    }
    // `all` now holds the value's digits with exactly `dscale` of them fractional.
    let split = all.len().saturating_sub(dscale);
    let (int_digits, frac_digits) = if all.len() >= dscale {
        (all[..split].to_string(), all[split..].to_string())
    } else {
        let mut frac = "0".repeat(dscale - all.len());
        frac.push_str(&all);
        (String::new(), frac)
    };
    let int_digits = int_digits.trim_start_matches('0');
    if int_digits.len() > PG_MAX_INTEGER_DIGITS || dscale > PG_MAX_SCALE {
        return Err(CanonicalError::NumberOutOfRange(
            truncated(literal),
            "too many digits for a PostgreSQL numeric",
        ));
    }
    let is_zero = int_digits.is_empty() && frac_digits.bytes().all(|b| b == b'0');
    let mut out = String::with_capacity(int_digits.len() + frac_digits.len() + 3);
    if negative && !is_zero {
        out.push('-');
    }
    out.push_str(if int_digits.is_empty() {
        "0"
    } else {
        int_digits
    });
    if dscale > 0 {
        out.push('.');
        out.push_str(&frac_digits);
        // Python reads a JSONB number with a point as a float: past
        // f64's range (309 integer digits) that is infinity, which
        // stabilize can neither hash nor store again.
        if int_digits.len() >= 309 && !out.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(CanonicalError::NumberOutOfRange(
                truncated(literal),
                "Python reads it as an infinite float",
            ));
        }
    }
    Ok(out)
}

/// How Python's `json.dumps` prints the number `json.loads` made of `literal`.
pub fn python_number(literal: &str) -> Result<String, CanonicalError> {
    if literal.contains(['.', 'e', 'E']) {
        if let Some(repr) = python_short_decimal(literal) {
            return Ok(repr);
        }
        let value: f64 = literal.parse().map_err(|_| bad_number(literal))?;
        if !value.is_finite() {
            return Err(CanonicalError::NumberOutOfRange(
                truncated(literal),
                "Python reads it as an infinite float",
            ));
        }
        Ok(python_float_repr(value))
    } else {
        let unsigned = literal.strip_prefix('-').unwrap_or(literal);
        if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_number(literal));
        }
        let trimmed = unsigned.trim_start_matches('0');
        if trimmed.is_empty() {
            Ok("0".to_string())
        } else if literal.starts_with('-') {
            Ok(format!("-{trimmed}"))
        } else {
            Ok(trimmed.to_string())
        }
    }
}

/// `repr(float(literal))` for a decimal `-?[0-9]+.[0-9]+` of at most 15
/// significant digits whose first digit is at 10^-4 to 10^15, written
/// from its own digits; `None` for anything else.
///
/// Every decimal of at most 15 significant digits reads as a double that
/// no other such decimal reads as (15 is `DBL_DIG`), so the shortest
/// digits that read back as it are the literal's own, trailing zeros
/// dropped, and in that exponent range `repr` writes them without an
/// exponent. Parsing the double and finding its shortest digits again
/// cost about 2,000 instructions a float (2.6% of the daemon's on
/// stabilize's events, whose contexts hold percentages and durations).
fn python_short_decimal(literal: &str) -> Option<String> {
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (int, frac) = unsigned.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    // The digits counted from the first significant one (an integer
    // part's trailing zeros among them: at worst the long way is taken),
    // and the place of that first one.
    let (significant, leading) = if int.is_empty() {
        let zeros = frac.len() - frac.trim_start_matches('0').len();
        (frac.len() - zeros, -(zeros as i32) - 1)
    } else {
        (int.len() + frac.len(), int.len() as i32 - 1)
    };
    if significant > 15 || (significant > 0 && !(-4..16).contains(&leading)) {
        return None;
    }
    let mut out = String::with_capacity(literal.len() + 2);
    if negative {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    out.push('.');
    out.push_str(if frac.is_empty() { "0" } else { frac });
    Some(out)
}

fn bad_number(literal: &str) -> CanonicalError {
    CanonicalError::BadNumber(truncated(literal))
}

pub(crate) fn truncated(text: &str) -> String {
    if text.len() <= 40 {
        text.to_string()
    } else {
        let cut = (0..=40)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &text[..cut])
    }
}

/// Python's `repr(float)`, bit for bit for every finite double: the
/// shortest digits that read back as `value`, in exponent form below 1e-4
/// and from 1e16 on, otherwise plain with at least one fractional digit.
///
/// The digits are [`shortest_digits`]; this function only lays them out
/// as CPython's `float_repr_style = 'short'` does (exponent form when the
/// decimal point would sit more than 4 places left of the first digit or
/// more than 16 right of it, exponent with a sign and at least 2 digits).
pub fn python_float_repr(value: f64) -> String {
    let (digits, exp) = shortest_digits(value.abs());
    let digits = digits.as_str();
    let mut out = String::with_capacity(digits.len() + 8);
    if value.is_sign_negative() {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(digits);
        } else if point as usize >= digits.len() {
            out.push_str(digits);
            out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// The significant digits CPython's `repr` prints for a finite `value >= 0`,
/// and the decimal exponent of the first one (`0.0` is `("0", 0)`).
///
/// CPython's `repr` is David Gay's `dtoa` in mode 0: of all digit strings
/// that read back as `value`, the shortest; among the shortest, the one
/// nearest `value`; of two equally near, the one whose last digit is even
/// (round-half-even). Rust's `{:e}` gives the shortest nearest digits too
/// (Grisu with an exact Dragon fallback), but settles an exact tie upwards:
/// it prints `9.026419927897813e11` for 902641992789.78125, which lies
/// exactly halfway between …7812 and …7813, where CPython prints …7812.
///
/// So the two can differ only when `value` is exactly the midpoint between
/// Rust's digits `d` (of length n) and a neighbour `d ± 1` in the last
/// place, and that neighbour also reads back as `value`. The length is the
/// same for both (it is a property of `value`, not of the algorithm), so the
/// correction is: when the last digit of `d` is odd, and the midpoint
/// `d ∓ ½` (n + 1 digits, ending in 5) is exactly `value`, and the neighbour
/// reads back as `value`, take the neighbour, whose last digit is even.
/// Exactness is decided in integers ([`decimal_equals_double`]), not by
/// parsing, which would only tell the nearest double. A neighbour `d + 1`
/// that carries (last digit 9) ends in 0 and so would be shorter than the
/// shortest: it never reads back, and is skipped; `d - 1` of a lone digit 1
/// is zero and is skipped likewise.
///
/// Checked against CPython on every run of the tests (`tests/it/float_repr.rs`:
/// random bit patterns, random decimals of 1 to 17 digits, built ties and
/// every boundary) and on 10^8 doubles in an ignored run.
pub fn shortest_digits(value: f64) -> (String, i32) {
    // "1.2345e16", "1e-7", "0e0": shortest round-trip digits, ties upwards.
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let mut digits: Vec<u8> = mantissa.bytes().filter(|b| *b != b'.').collect();
    let n = digits.len();
    let last = digits[n - 1] - b'0';
    // 17 digits at most, so d * 10 + 5 fits a u64 with room to spare.
    if last % 2 == 1 && n <= 17 {
        let d: u64 = digits
            .iter()
            .fold(0, |acc, b| acc * 10 + u64::from(b - b'0'));
        // The midpoint's last digit sits at 10^(exp - n).
        let scale = exp - n as i32;
        for (neighbour, midpoint) in [(d - 1, d * 10 - 5), (d + 1, d * 10 + 5)] {
            let same_length = neighbour % 10 != 0 && neighbour != 0;
            if same_length
                && decimal_equals_double(midpoint, scale, value)
                && reads_back_as(neighbour, scale + 1, value)
            {
                let text = neighbour.to_string();
                debug_assert_eq!(text.len(), n);
                digits = text.into_bytes();
                break;
            }
        }
    }
    let digits = String::from_utf8(digits).expect("ASCII digits");
    (digits, exp)
}

/// Whether the decimal `m * 10^k` reads back (nearest, ties to even) as `value`.
fn reads_back_as(m: u64, k: i32, value: f64) -> bool {
    format!("{m}e{k}").parse::<f64>() == Ok(value)
}

/// Whether the decimal `m * 10^k` (with `m < 10^18`) is exactly the
/// finite double `value`, decided in integers.
///
/// `value = f * 2^e` with `f` odd (or zero). With `k >= 0` the decimal is
/// the integer `m * 5^k * 2^k`; with `k < 0` it is `m / 5^-k / 2^-k`, a
/// binary fraction only if `5^-k` divides `m`. Either way it is
/// `odd * 2^t` after taking out the twos, and equal to `value` exactly
/// when the odd parts and the powers of two match.
fn decimal_equals_double(m: u64, k: i32, value: f64) -> bool {
    if m == 0 || value == 0.0 {
        return m == 0 && value == 0.0;
    }
    // value = f * 2^e, f odd.
    let bits = value.to_bits();
    let exponent_bits = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (mut f, mut e) = if exponent_bits == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), exponent_bits - 1075)
    };
    let tz = f.trailing_zeros();
    f >>= tz;
    e += tz as i32;

    // decimal = g * 2^t, g odd, in u128 (a g above 2^53 can never match).
    let (mut g, mut t): (u128, i32) = if k >= 0 {
        let Some(five_k) = 5u128.checked_pow(k as u32) else {
            return false;
        };
        let Some(g) = u128::from(m).checked_mul(five_k) else {
            return false;
        };
        (g, k)
    } else {
        // 5^28 > 10^18 > m: no larger power of five divides m.
        let j = k.unsigned_abs();
        if j > 27 {
            return false;
        }
        let five_j = 5u128.pow(j);
        if u128::from(m) % five_j != 0 {
            return false;
        }
        (u128::from(m) / five_j, k)
    };
    let tz = g.trailing_zeros();
    g >>= tz;
    t += tz as i32;
    g == u128::from(f) && t == e
}

/// [`normalize_value_as`] in the JSONB form.
pub fn normalize_value(value: &mut Value) -> Result<(), CanonicalError> {
    normalize_value_as(value, NumberForm::Jsonb)
}

/// Rewrite every number of `value` to the given form and refuse what
/// Postgres JSONB refuses (U+0000, numbers out of range). Applied once,
/// where JSON enters the daemon.
pub fn normalize_value_as(value: &mut Value, form: NumberForm) -> Result<(), CanonicalError> {
    match value {
        Value::Number(n) => {
            if kept_as_is(n.as_str(), form) {
                return Ok(());
            }
            let normalized = normalize_number_as(n.as_str(), form)?;
            if normalized != n.as_str() {
                *n = Number::from_string_unchecked(normalized);
            }
            Ok(())
        }
        Value::String(s) => check_nul(s),
        Value::Array(items) => items
            .iter_mut()
            .try_for_each(|item| normalize_value_as(item, form)),
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                check_nul(key)?;
                normalize_value_as(item, form)?;
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) => Ok(()),
    }
}

/// Whether a literal (as the JSON parser accepted it) is already in
/// `form`: [`Scanned::kept_as_is`] of its scan.
pub(crate) fn kept_as_is(literal: &str, form: NumberForm) -> bool {
    scan_number(literal.as_bytes())
        .is_some_and(|scanned| scanned.len == literal.len() && scanned.kept_as_is(form))
}

/// What one scan of a number literal found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scanned {
    /// Its length in bytes.
    pub(crate) len: usize,
    /// Its value, when it is an integer of at most 18 digits (always
    /// exact in an `i64`); longer ones are parsed from the text.
    pub(crate) integer: Option<i64>,
    negative: bool,
    pub(crate) fraction: bool,
    pub(crate) exponent: bool,
    /// Every digit before the exponent is 0.
    zero: bool,
}

impl Scanned {
    /// Whether the literal is already in `form`, so that its normalising
    /// (which allocates) is saved for most numbers: integers other than
    /// `-0` in both forms, and decimals without exponent other than a
    /// negative zero in the JSONB form (JSONB keeps their scale; Python
    /// would reprint a float).
    pub(crate) fn kept_as_is(&self, form: NumberForm) -> bool {
        if self.len > 20 || self.exponent || (self.negative && self.zero) {
            return false;
        }
        match form {
            NumberForm::Jsonb => true,
            NumberForm::Python => !self.fraction,
        }
    }
}

/// The JSON number at the start of `bytes`, in one pass:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`. `None` when
/// the characters a number may have, as many as follow one another, are
/// not one (`0123`, `1.`, `--1`): the whole run is refused, not a prefix.
///
/// The literal used to be cut at the first other character, checked, then
/// scanned again for its form and parsed: about 200 instructions a number
/// where this takes about 60.
pub(crate) fn scan_number(bytes: &[u8]) -> Option<Scanned> {
    let digit = |i: usize| bytes.get(i).filter(|b| b.is_ascii_digit()).copied();
    let negative = bytes.first() == Some(&b'-');
    let mut i = usize::from(negative);
    let (mut value, mut zero) = (0i64, true);
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while let Some(d) = digit(i) {
                value = value.wrapping_mul(10).wrapping_add(i64::from(d - b'0'));
                i += 1;
            }
            zero = false;
        }
        _ => return None,
    }
    let int_digits = i - usize::from(negative);
    let fraction = bytes.get(i) == Some(&b'.');
    if fraction {
        i += 1;
        let start = i;
        while let Some(d) = digit(i) {
            zero &= d == b'0';
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let exponent = matches!(bytes.get(i), Some(b'e' | b'E'));
    if exponent {
        i += 1;
        if let Some(b'+' | b'-') = bytes.get(i) {
            i += 1;
        }
        let start = i;
        while digit(i).is_some() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    if let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = bytes.get(i) {
        return None;
    }
    let integer =
        (!fraction && !exponent && int_digits <= 18).then(|| if negative { -value } else { value });
    Some(Scanned {
        len: i,
        integer,
        negative,
        fraction,
        exponent,
        zero,
    })
}

fn check_nul(s: &str) -> Result<(), CanonicalError> {
    if s.contains('\0') {
        Err(CanonicalError::NulCharacter)
    } else {
        Ok(())
    }
}

/// Python `json.dumps(value, sort_keys=True)` of `value` as stabilize reads it.
pub fn canonical_json(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(256);
    write_value(&mut out, value)?;
    Ok(out)
}

/// [`canonical_json`] of an object, without wrapping it in a `Value`.
pub fn canonical_object(map: &Map<String, Value>) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(1024);
    write_object(&mut out, map)?;
    Ok(out)
}

/// Lowercase hex SHA-256 of [`canonical_json`]: stabilize's `state_hash`.
pub fn state_hash(value: &Value) -> Result<String, CanonicalError> {
    Ok(sha256_hex(canonical_json(value)?.as_bytes()))
}

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn write_value(out: &mut String, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => out.push_str(&python_number(n.as_str())?),
        Value::String(s) => write_string(out, s)?,
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map)?,
    }
    Ok(())
}

fn write_object(out: &mut String, map: &Map<String, Value>) -> Result<(), CanonicalError> {
    out.push('{');
    // serde_json's Map is a BTreeMap here (no `preserve_order`): code point order.
    for (i, (key, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_string(out, key)?;
        out.push_str(": ");
        write_value(out, item)?;
    }
    out.push('}');
    Ok(())
}

/// Append the canonical text of a value given as its stored text:
/// `serde_json`'s compact output of a value whose numbers are already in
/// the store's form and whose objects are ordered by code point (a
/// `serde_json::Map` here). No tree is built: separators get Python's
/// spaces, numbers Python's reading, strings `ensure_ascii` escapes, so the
/// result is [`canonical_json`] of the value the text parses to.
pub fn write_canonical_from_stored(out: &mut String, stored: &str) -> Result<(), CanonicalError> {
    let bytes = stored.as_bytes();
    out.reserve(bytes.len() + bytes.len() / 8);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i + 1;
                let mut escaped = false;
                i = start;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        escaped = true;
                        i += 1;
                    }
                    i += 1;
                }
                let Some(quoted) = stored.get(start - 1..=i) else {
                    return Err(CanonicalError::NotJson(truncated(&stored[start - 1..])));
                };
                if escaped {
                    let text: String = serde_json::from_str(quoted)
                        .map_err(|_| CanonicalError::NotJson(truncated(quoted)))?;
                    write_string(out, &text)?;
                } else {
                    write_string(out, &stored[start..i])?;
                }
                i += 1;
            }
            b',' => {
                out.push_str(", ");
                i += 1;
            }
            b':' => {
                out.push_str(": ");
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let literal = &stored[start..i];
                if plain_integer(literal) {
                    out.push_str(literal);
                } else {
                    out.push_str(&python_number(literal)?);
                }
            }
            _ => {
                // `{`, `}`, `[`, `]` and the letters of `true`, `false`, `null`.
                let start = i;
                while i < bytes.len()
                    && !matches!(bytes[i], b'"' | b',' | b':' | b'-' | b'0'..=b'9')
                {
                    i += 1;
                }
                out.push_str(&stored[start..i]);
            }
        }
    }
    Ok(())
}

/// An integer literal Python prints as it is: no sign, no leading zero.
fn plain_integer(literal: &str) -> bool {
    let bytes = literal.as_bytes();
    !bytes.is_empty()
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes.len() == 1 || bytes[0] != b'0')
}

/// Whether none of a word's eight bytes needs escaping: all in `' '..='~'`,
/// none `"` or `\\` (the exact "has a byte less than n" and "has a zero
/// byte" tests of the bit-twiddling hacks, applied to the word).
fn plain_word(w: u64) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let less_than = |n: u8| w.wrapping_sub(ONES * n as u64) & !w & HIGH;
    let has = |b: u8| {
        let x = w ^ (ONES * b as u64);
        x.wrapping_sub(ONES) & !x & HIGH
    };
    (less_than(b' ') | (w & HIGH) | has(0x7f) | has(b'"') | has(b'\\')) == 0
}

/// A string as Python's `json.dumps(..., ensure_ascii=True)` writes it:
/// printable ASCII but `"` and `\\` as it is, in runs; everything else
/// escaped (`\\uXXXX` in UTF-16 units outside ASCII).
pub(crate) fn write_string(out: &mut String, s: &str) -> Result<(), CanonicalError> {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push('"');
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time while none needs escaping.
        if let Some(word) = bytes.get(i..i + 8)
            && plain_word(u64::from_le_bytes(word.try_into().unwrap_or_default()))
        {
            i += 8;
            continue;
        }
        let b = bytes[i];
        if matches!(b, b' '..=b'~') && b != b'"' && b != b'\\' {
            i += 1;
            continue;
        }
        out.push_str(&s[run..i]);
        let escape = match b {
            0 => return Err(CanonicalError::NulCharacter),
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        if escape.is_empty() {
            // `run..i` ended on a character boundary: `i` starts one.
            let c = s[i..].chars().next().unwrap_or_default();
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
            i += c.len_utf8();
        } else {
            out.push_str(escape);
            i += 1;
        }
        run = i;
    }
    out.push_str(&s[run..]);
    out.push('"');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A JSON number literal as the parser accepts it.
    fn json_number() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            "(0|[1-9][0-9]{0,24})",
            proptest::option::of("[0-9]{1,8}"),
            proptest::option::of("[eE][+-]?[0-9]{1,3}"),
        )
            .prop_map(|(negative, int, frac, exp)| {
                let sign = if negative { "-" } else { "" };
                let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
                format!("{sign}{int}{frac}{}", exp.unwrap_or_default())
            })
    }

    /// `write_string` one character at a time, as it was first written.
    fn write_string_by_char(out: &mut String, s: &str) -> Result<(), CanonicalError> {
        out.push('"');
        for c in s.chars() {
            match c {
                '\0' => return Err(CanonicalError::NulCharacter),
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
            }
        }
        out.push('"');
        Ok(())
    }

    proptest! {
        #[test]
        fn a_plain_word_is_eight_bytes_written_as_they_are(
            // Mostly printable: words needing no escape are common here.
            bytes in proptest::array::uniform8(prop_oneof![12 => 0x20u8..0x7f, 1 => any::<u8>()]),
        ) {
            let each = bytes.iter().all(|&b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\');
            prop_assert_eq!(plain_word(u64::from_le_bytes(bytes)), each);
        }

        #[test]
        fn strings_are_written_as_one_character_at_a_time_writes_them(
            s in "(\\PC|[\\x00-\\x1f\\x7f\"\\\\]|[\\u{80}-\\u{7ff}]|[\\u{10000}-\\u{10ffff}]|[ -~]{0,8}){0,24}",
        ) {
            let (mut fast, mut slow) = (String::from("x"), String::from("x"));
            let a = write_string(&mut fast, &s);
            let b = write_string_by_char(&mut slow, &s);
            prop_assert_eq!(a.is_ok(), b.is_ok());
            if a.is_ok() {
                prop_assert_eq!(fast, slow);
            }
        }

        #[test]
        fn a_literal_kept_as_is_is_what_normalising_gives(literal in json_number()) {
            for form in [NumberForm::Jsonb, NumberForm::Python] {
                if kept_as_is(&literal, form) {
                    let normalized = normalize_number_as(&literal, form);
                    prop_assert_eq!(normalized.as_deref(), Ok(&*literal));
                }
            }
        }

        /// The short way gives what parsing the double and writing its
        /// shortest digits gives, wherever it answers; it answers for
        /// decimals of up to 15 significant digits in `repr`'s fixed range.
        #[test]
        fn a_short_decimal_is_written_as_repr_writes_its_float(
            negative in any::<bool>(),
            int in "(0{1,3}|[0-9]{1,17})",
            frac in "[0-9]{1,17}",
        ) {
            let sign = if negative { "-" } else { "" };
            let literal = format!("{sign}{int}.{frac}");
            let value: f64 = literal.parse().unwrap();
            let short = python_short_decimal(&literal);
            if let Some(short) = &short {
                prop_assert_eq!(short, &python_float_repr(value), "{}", literal);
            }
            let digits = format!("{int}{frac}");
            let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
            if significant <= 15 && value != 0.0 && (1e-4..1e15).contains(&value.abs()) {
                let int_significant = int.trim_start_matches('0').len();
                if int_significant + frac.trim_end_matches('0').len() <= 15 {
                    prop_assert!(short.is_some(), "{} taken the long way", literal);
                }
            }
        }
    }

    #[test]
    fn short_decimals_at_the_edges_of_the_fixed_range() {
        for (literal, repr) in [
            ("12.50", Some("12.5")),
            ("-0.000", Some("-0.0")),
            ("0.0", Some("0.0")),
            ("0.0001", Some("0.0001")),
            ("0.00001", None), // 1e-05
            ("999999999999999.0", Some("999999999999999.0")),
            ("1000000000000000.0", None), // 16 digits counted: the long way
            ("0.100000000000001", Some("0.100000000000001")),
            ("0.1000000000000001", None), // 16 significant digits
            ("1.5e3", None),
            ("1.", None),
            (".5", None),
        ] {
            assert_eq!(python_short_decimal(literal).as_deref(), repr, "{literal}");
            if let Some(repr) = repr {
                let value: f64 = literal.parse().unwrap();
                assert_eq!(python_float_repr(value), repr, "{literal}");
            }
        }
    }

    /// The rule of [`Scanned::kept_as_is`] read off a literal's text, as
    /// it was written before numbers were scanned: the reference for it.
    fn kept_as_is_by_text(literal: &str, form: NumberForm) -> bool {
        if literal.len() > 20 || literal.contains(['e', 'E']) {
            return false;
        }
        let digits = literal.strip_prefix('-').unwrap_or(literal);
        if literal.starts_with('-') && digits.bytes().all(|b| b == b'0' || b == b'.') {
            return false;
        }
        match form {
            NumberForm::Jsonb => true,
            NumberForm::Python => !digits.contains('.'),
        }
    }

    /// The grammar as a regular expression would check it, on a literal
    /// already cut from the text: the reference for [`scan_number`].
    fn matches_number_grammar(literal: &str) -> bool {
        let b = literal.as_bytes();
        let mut i = usize::from(b.first() == Some(&b'-'));
        let digits = |i: &mut usize| {
            let start = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - start
        };
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return false,
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if digits(&mut i) == 0 {
                return false;
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return false;
            }
        }
        i == b.len()
    }

    proptest! {
        /// One scan agrees with the three steps it replaced: cut the run
        /// of number characters, check it against the grammar, then judge
        /// its form by its text ([`kept_as_is_by_text`]) and parse it as an
        /// `i64`.
        #[test]
        fn one_scan_of_a_number_agrees_with_cut_check_and_parse(
            text in "-?(0|[1-9][0-9]{0,21}|[0-9]{0,3})(\\.[0-9]{0,3})?([eE][+-]?[0-9]{0,3})?[-+.eE0-9 ,}]{0,3}",
        ) {
            let run = text
                .bytes()
                .take_while(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .count();
            let literal = &text[..run];
            match scan_number(text.as_bytes()) {
                None => prop_assert!(!matches_number_grammar(literal), "{literal} refused"),
                Some(scanned) => {
                    prop_assert!(matches_number_grammar(literal), "{literal} taken");
                    prop_assert_eq!(scanned.len, run);
                    for form in [NumberForm::Jsonb, NumberForm::Python] {
                        prop_assert_eq!(
                            scanned.kept_as_is(form),
                            kept_as_is_by_text(literal, form),
                            "{} in {:?}", literal, form
                        );
                    }
                    if let Some(n) = scanned.integer {
                        prop_assert_eq!(Ok(n), literal.parse::<i64>());
                    } else if !scanned.fraction && !scanned.exponent {
                        prop_assert!(literal.trim_start_matches('-').len() > 18);
                    }
                }
            }
        }
    }

    #[test]
    fn short_plain_literals_skip_normalising_and_zeros_do_not() {
        assert!(kept_as_is("17", NumberForm::Python));
        assert!(kept_as_is("-1234.50", NumberForm::Jsonb));
        assert!(!kept_as_is("-1234.50", NumberForm::Python));
        for zero in ["-0", "-0.0", "-0.000"] {
            assert!(!kept_as_is(zero, NumberForm::Jsonb), "{zero}");
        }
        assert!(!kept_as_is("1e5", NumberForm::Jsonb));
        assert!(!kept_as_is("123456789012345678901", NumberForm::Jsonb));
    }

    fn norm(s: &str) -> String {
        normalize_number(s).unwrap()
    }

    #[test]
    fn numbers_are_normalised_the_way_jsonb_prints_them() {
        assert_eq!(norm("1e-7"), "0.0000001");
        assert_eq!(norm("1e+16"), "10000000000000000");
        assert_eq!(norm("1.5e2"), "150");
        assert_eq!(norm("1.10"), "1.10");
        assert_eq!(norm("-0.0"), "0.0");
        assert_eq!(norm("-0"), "0");
        assert_eq!(norm("-2.25"), "-2.25");
        assert_eq!(norm("0.5E1"), "5");
        assert_eq!(norm("12.5e-1"), "1.25");
        assert_eq!(norm("-1e-2"), "-0.01");
    }

    #[test]
    fn exponents_postgres_refuses_are_rejected() {
        assert!(matches!(
            normalize_number("1e1001"),
            Err(CanonicalError::NumberOutOfRange(..))
        ));
        assert!(normalize_number("1e1000").is_ok());
    }

    #[test]
    fn python_prints_floats_with_the_shortest_repr() {
        for (text, expected) in [
            ("0.1", "0.1"),
            ("0.0000001", "1e-07"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("100.0", "100.0"),
            ("1.10", "1.1"),
            ("9999999999999998.0", "9999999999999998.0"),
            ("12345678901234567.0", "1.2345678901234568e+16"),
            ("1e16", "1e+16"),
            ("-1.5", "-1.5"),
            ("0.0", "0.0"),
        ] {
            assert_eq!(python_number(text).unwrap(), expected, "{text}");
        }
    }

    // The literals are the doubles' exact values, written out on purpose:
    // each lies halfway between two shortest forms.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn a_tie_between_two_shortest_forms_keeps_the_even_digit() {
        for (value, expected) in [
            (902_641_992_789.781_25, "902641992789.7812"),
            (2_871_642_526.769_531_25, "2871642526.7695312"),
            (22_314_070_637.039_062_5, "22314070637.039062"),
            (580_296_851_639.531_25, "580296851639.5312"),
            (2_195_540_085_417.781_25, "2195540085417.7812"),
            (1_758_851_603_822_326.25, "1758851603822326.2"),
        ] {
            assert_eq!(python_float_repr(value), expected);
            assert_eq!(python_float_repr(-value), format!("-{expected}"));
        }
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn exactness_of_a_decimal_is_decided_in_integers() {
        // 902641992789.78125 is a double exactly; 902641992789.7812 is not.
        assert!(decimal_equals_double(
            90_264_199_278_978_125,
            -5,
            902_641_992_789.781_25
        ));
        assert!(!decimal_equals_double(
            9_026_419_927_897_812,
            -4,
            902_641_992_789.781_25
        ));
        assert!(decimal_equals_double(15, -1, 1.5));
        assert!(decimal_equals_double(3, 2, 300.0));
        assert!(!decimal_equals_double(1, -1, 0.1));
        assert!(decimal_equals_double(1, 22, 1e22));
        assert!(!decimal_equals_double(1, 23, 1e23));
        assert!(!decimal_equals_double(5, -324, 5e-324));
        assert!(decimal_equals_double(0, 0, 0.0));
    }

    #[test]
    fn boundaries_and_extremes_render_as_python_does() {
        for (value, expected) in [
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
            (1e16, "1e+16"),
            (9_999_999_999_999_998.0, "9999999999999998.0"),
            (1e-4, "0.0001"),
            (9.999_999_999_999_999e-5, "9.999999999999999e-05"),
            (1e22, "1e+22"),
            (1e23, "1e+23"),
        ] {
            assert_eq!(python_float_repr(value), expected);
        }
    }

    #[test]
    fn the_python_form_keeps_floats_as_python_reads_them() {
        let py = |s| normalize_number_as(s, NumberForm::Python).unwrap();
        assert_eq!(py("-0.0"), "-0.0");
        assert_eq!(py("1e16"), "1e+16");
        assert_eq!(py("1.10"), "1.1");
        assert_eq!(py("12"), "12");
        assert_eq!(py(&py("1.5e-7")), py("1.5e-7"));
        assert!(normalize_number_as("1e400", NumberForm::Python).is_err());
    }

    #[test]
    fn an_infinite_float_is_rejected() {
        let huge = format!("1{}.0", "0".repeat(400));
        assert!(python_number(&huge).is_err());
        // JSONB keeps the digits, but Python reads them as a float: the
        // same refusal (found by the fuzzer: 1 and 309 zeros, then .5).
        let past = format!("1{}.5", "0".repeat(309));
        assert!(matches!(
            normalize_number(&past),
            Err(CanonicalError::NumberOutOfRange(_, _))
        ));
        let within = format!("1{}.5", "0".repeat(300));
        assert_eq!(normalize_number(&within).unwrap(), within);
        // An integer of any size stays a Python int.
        let integer = format!("1{}", "0".repeat(400));
        assert_eq!(normalize_number(&integer).unwrap(), integer);
    }

    #[test]
    fn integers_keep_every_digit() {
        assert_eq!(
            python_number("-1180591620717411303424").unwrap(),
            "-1180591620717411303424"
        );
        assert_eq!(python_number("-0").unwrap(), "0");
    }

    #[test]
    fn a_nul_character_is_refused_in_keys_and_strings() {
        let mut v: Value = serde_json::from_str(r#"{"a\u0000": 1}"#).unwrap();
        assert_eq!(normalize_value(&mut v), Err(CanonicalError::NulCharacter));
        let v: Value = serde_json::from_str(r#"{"a": ["x\u0000"]}"#).unwrap();
        assert_eq!(canonical_json(&v), Err(CanonicalError::NulCharacter));
    }

    #[test]
    fn strings_are_escaped_like_ensure_ascii() {
        let v = Value::String("é\u{1F600}\u{1}\u{7f}\u{2028}\"\\/".into());
        assert_eq!(
            canonical_json(&v).unwrap(),
            r#""\u00e9\ud83d\ude00\u0001\u007f\u2028\"\\/""#
        );
    }
}
