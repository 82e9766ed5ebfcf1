//! An event's `data` read straight into stored texts equals the tree way:
//! parse, normalise the numbers, serialise each value.

use crate::canonical::json_value;
use proptest::prelude::*;
use serde_json::Value;
use snapshotd::model::canonical::{NumberForm, normalize_value_as};
use snapshotd::model::payload::{Payload, PayloadError, stored_text};

/// A small deterministic generator, so one proptest seed picks the layout.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// `value` as a producer might write it: whitespace anywhere, keys in any
/// order and sometimes twice (the earlier with a decoy value), characters
/// escaped as `\uXXXX` or `\/` at random.
fn write_loosely(out: &mut String, value: &Value, dice: &mut Dice) {
    let space = |out: &mut String, dice: &mut Dice| {
        for _ in 0..dice.roll(3) {
            out.push([' ', '\n', '\t', '\r'][dice.roll(4) as usize]);
        }
    };
    space(out, dice);
    match value {
        Value::String(s) => write_string(out, s, dice),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_loosely(out, item, dice);
            }
            space(out, dice);
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            for i in (1..entries.len()).rev() {
                entries.swap(i, dice.roll(i as u64 + 1) as usize);
            }
            out.push('{');
            let mut first = true;
            for (key, item) in entries {
                let decoy = Value::String("decoy".into());
                let copies: &[&Value] = if dice.roll(4) == 0 {
                    &[&decoy, item]
                } else {
                    &[item]
                };
                for copy in copies {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    space(out, dice);
                    write_string(out, key, dice);
                    space(out, dice);
                    out.push(':');
                    write_loosely(out, copy, dice);
                }
            }
            space(out, dice);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
    space(out, dice);
}

fn write_string(out: &mut String, s: &str, dice: &mut Dice) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if dice.roll(2) == 0 => out.push_str("\\/"),
            c if (c as u32) < 0x20 || dice.roll(5) == 0 => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The tree way, as decode read `data` before.
fn tree_way(json: &str, form: NumberForm) -> Result<Vec<(String, String)>, String> {
    let mut value: Value = serde_json::from_str(json).map_err(|e| format!("malformed: {e}"))?;
    normalize_value_as(&mut value, form).map_err(|e| e.to_string())?;
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_string(v).unwrap()))
            .collect()),
        Value::Null => Ok(Vec::new()),
        _ => Err("not an object".into()),
    }
}

fn text_way(json: &str, form: NumberForm) -> Result<Vec<(String, String)>, String> {
    match Payload::from_json(json, form) {
        Ok(p) => Ok(p.iter().map(|(k, v)| (k.into(), v.into())).collect()),
        Err(PayloadError::NotAnObject) => Err("not an object".into()),
        Err(PayloadError::Value(e)) => Err(e.to_string()),
    }
}

fn same(json: &str, form: NumberForm) -> Result<(), TestCaseError> {
    let (tree, text) = (tree_way(json, form), text_way(json, form));
    match (&tree, &text) {
        // Refused either way; numbers are checked as they are read, so a
        // bad number ahead of the fault may be named first. (A frame's
        // `data` is parsed with the envelope before, so a producer is told
        // "malformed" all the same.)
        (Err(a), Err(_)) if a.starts_with("malformed") => {}
        _ => prop_assert_eq!(&tree, &text, "{} ({:?})", json, form),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn data_read_as_text_is_the_tree_way(
        value in json_value(),
        object in prop::collection::btree_map("[a-z\u{e9}]{0,3}", json_value(), 0..6),
        seed in 1u64..,
    ) {
        let mut dice = Dice(seed);
        for form in [NumberForm::Jsonb, NumberForm::Python] {
            let mut json = String::new();
            write_loosely(&mut json, &Value::Object(object.clone().into_iter().collect()), &mut dice);
            same(&json, form)?;
            // Any value at the top: refused unless an object or null.
            let mut json = String::new();
            write_loosely(&mut json, &value, &mut dice);
            same(&json, form)?;
            let mut expected = value.clone();
            if normalize_value_as(&mut expected, form).is_ok() {
                prop_assert_eq!(
                    stored_text(&json, form).unwrap(),
                    serde_json::to_string(&expected).unwrap()
                );
            }
        }
    }

    #[test]
    fn broken_data_is_refused_like_the_parser_refuses_it(
        object in prop::collection::btree_map("[a-z]{0,3}", json_value(), 1..4),
        seed in 1u64..,
        cut in any::<prop::sample::Index>(),
        junk in "[\\[\\]{}:,\"\\\\0-9a-z\u{0}-\u{1f} .eE+-]{1,3}",
    ) {
        let mut dice = Dice(seed);
        let mut json = String::new();
        write_loosely(&mut json, &Value::Object(object.into_iter().collect()), &mut dice);
        let mut at = cut.index(json.len() + 1);
        while !json.is_char_boundary(at) {
            at -= 1;
        }
        let broken = format!("{}{junk}{}", &json[..at], &json[at..]);
        same(&broken, NumberForm::Jsonb)?;
        same(&json[..at], NumberForm::Python)?;
    }
}

#[test]
fn nul_lone_surrogates_and_depth_are_refused_with_a_reason() {
    let form = NumberForm::Jsonb;
    assert_eq!(
        text_way(r#"{"a": ["\u0000"]}"#, form),
        tree_way(r#"{"a": ["\u0000"]}"#, form)
    );
    let surrogate = text_way(r#"{"a": "\ud800"}"#, form).unwrap_err();
    assert!(surrogate.contains("hex escape"), "{surrogate}");
    let surrogate = text_way(r#"{"a": "\udc00x"}"#, form).unwrap_err();
    assert!(surrogate.contains("surrogate"), "{surrogate}");
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(130), "]".repeat(130));
    let refused = text_way(&deep, form).unwrap_err();
    assert!(refused.contains("deeper than 128"), "{refused}");
    assert!(tree_way(&deep, form).is_err());
}
