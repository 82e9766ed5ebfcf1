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
    }
    Ok(out)
}

/// How Python's `json.dumps` prints the number `json.loads` made of `literal`.
pub fn python_number(literal: &str) -> Result<String, CanonicalError> {
    if literal.contains(['.', 'e', 'E']) {
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

fn bad_number(literal: &str) -> CanonicalError {
    CanonicalError::BadNumber(truncated(literal))
}

fn truncated(text: &str) -> String {
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

/// Python's `repr(float)`: shortest round-trip digits, exponent form below
/// 1e-4 and from 1e16 on, otherwise plain with at least one fractional digit.
pub fn python_float_repr(value: f64) -> String {
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e16", "1e-7", "0e0".
    let sci = format!("{:e}", value.abs());
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::with_capacity(digits.len() + 8);
    if value.is_sign_negative() {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        } else if point as usize >= digits.len() {
            out.push_str(&digits);
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

/// A string as Python's `json.dumps(..., ensure_ascii=True)` writes it.
fn write_string(out: &mut String, s: &str) -> Result<(), CanonicalError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
