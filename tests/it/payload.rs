//! An event's `data` read straight into stored texts equals the tree way:
//! parse, normalise the numbers, serialise each value; and a frame read in
//! one pass decodes as serde's parse of the envelope does.

use crate::canonical::json_value;
use proptest::prelude::*;
use serde_json::Value;
use snapshotd::model::canonical::{NumberForm, normalize_value_as};
use snapshotd::model::event::{DecodeError, Frame, Limits, decode, decode_reference};
use snapshotd::model::payload::{Payload, PayloadError};

/// A small deterministic generator, so one proptest seed picks the layout;
/// one key in `twice` is written twice.
struct Dice {
    state: u64,
    twice: u64,
}

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice {
            state: seed,
            twice: 4,
        }
    }

    fn roll(&mut self, sides: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % sides
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
                let twice = dice.twice;
                let copies: &[&Value] = if dice.roll(twice) == 0 {
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
        // Refused as malformed either way, in words of its own.
        (Err(a), Err(b)) if a.starts_with("malformed") => {
            prop_assert!(b.starts_with("not valid JSON"), "{json}: {a} vs {b}")
        }
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
        let mut dice = Dice::new(seed);
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
                let wrapped = Payload::from_json(&format!("{{\"v\":{json}}}"), form).unwrap();
                prop_assert_eq!(
                    wrapped.get("v").unwrap(),
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
        let mut dice = Dice::new(seed);
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
    // serde_json reads 127 levels and refuses the 128th: so does the reader.
    for levels in [126, 127, 128, 200] {
        let deep = format!("{}1{}", "[".repeat(levels - 1), "]".repeat(levels - 1));
        let deep = format!("{{\"a\":{deep}}}");
        let (text, tree) = (text_way(&deep, form), tree_way(&deep, form));
        assert_eq!(
            text.is_ok(),
            tree.is_ok(),
            "{levels} levels: {text:?} vs {tree:?}"
        );
        assert_eq!(text.is_ok(), levels <= 127, "{levels} levels");
    }
    // An earlier value of a repeated key is dropped, not judged; the
    // tree names a syntax fault before a value's.
    for (json, keys) in [
        (
            r#"{"a": "\u0000", "a": 1}"#,
            Ok(vec![("a".to_string(), "1".to_string())]),
        ),
        (
            r#"{"x": {"n": 1e5000, "n": 0}}"#,
            Ok(vec![("x".to_string(), r#"{"n":0}"#.to_string())]),
        ),
    ] {
        assert_eq!(text_way(json, form), keys, "{json}");
        assert_eq!(tree_way(json, form), keys, "{json}");
    }
    let json = r#"{"a": "\u0000", "b": "\ud800"}"#;
    assert!(
        text_way(json, form)
            .unwrap_err()
            .starts_with("not valid JSON")
    );
    assert!(tree_way(json, form).unwrap_err().starts_with("malformed"));
}

/// A field of an event frame: usually right, sometimes of another kind.
fn field(right: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    // Mostly right, so that about half the frames are events.
    prop_oneof![
        40 => right.prop_map(Some),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => json_value().prop_map(Some),
    ]
    .boxed()
}

prop_compose! {
    fn event_frame()(
        event_type in field(prop_oneof![
            9 => prop::sample::select(vec!["workflow.started", "task.completed", "stage.skipped"]),
            1 => Just(""),
        ].prop_map(Value::from)),
        timestamp in field(prop_oneof![
            9 => prop::sample::select(vec!["2026-11-26T03:59:48.120000+00:00", "2026-11-26 03:59:48.1234565"]),
            1 => Just("yesterday"),
        ].prop_map(Value::from)),
        sequence in field(prop_oneof![
            9 => (1i64..1000).prop_map(Value::from),
            1 => Just(Value::from(0)),
            1 => Just(Value::from(1.5)),
        ]),
        entity_type in field(prop_oneof![
            9 => prop::sample::select(vec!["workflow", "stage", "task"]),
            1 => Just("job"),
        ].prop_map(Value::from)),
        entity_id in field(prop_oneof![
            9 => prop::sample::select(vec!["w1", "t\u{e9}"]),
            1 => prop::sample::select(vec!["a\u{0}b", ""]),
        ].prop_map(Value::from)),
        workflow_id in field(Just(Value::from("w1"))),
        data in field(prop::collection::btree_map("[a-z]{0,3}", json_value(), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))),
        schema_version in field((0i64..3).prop_map(Value::from)),
        metadata in field(Just(serde_json::from_str::<Value>(r#"{"actor": "system", "n": 1e400}"#).unwrap())),
        extra in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..3),
        op in prop::option::weighted(0.05, prop::sample::select(vec!["ping", "flush", "nope"])),
    ) -> Value {
        let mut frame = serde_json::Map::new();
        for (key, value) in [
            ("event_type", event_type), ("timestamp", timestamp), ("sequence", sequence),
            ("entity_type", entity_type), ("entity_id", entity_id), ("workflow_id", workflow_id),
            ("data", data), ("schema_version", schema_version), ("metadata", metadata),
        ] {
            if let Some(value) = value {
                frame.insert(key.into(), value);
            }
        }
        frame.extend(extra);
        if let Some(op) = op {
            frame.insert("op".into(), op.into());
        }
        Value::Object(frame)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// decode's one pass decodes every line as the reference does: the
    /// same event, or the same refusal (the one pass leaves those to it).
    #[test]
    fn decode_in_one_pass_agrees_with_the_reference(
        frame in event_frame(),
        seed in 1u64..,
        max_depth in prop_oneof![Just(64usize), 1usize..8],
        python in any::<bool>(),
        cut in prop::option::weighted(0.2, (any::<prop::sample::Index>(), "[\\[\\]{}:,\"\\\\0-9a-z .eE+-]{1,2}")),
    ) {
        // A known key twice is refused: now and then.
        let mut dice = Dice { twice: 100, ..Dice::new(seed) };
        let mut line = String::new();
        write_loosely(&mut line, &frame, &mut dice);
        if let Some((at, junk)) = cut {
            let mut at = at.index(line.len() + 1);
            while !line.is_char_boundary(at) {
                at -= 1;
            }
            line.insert_str(at, &junk);
        }
        let limits = Limits {
            max_depth,
            numbers: if python { NumberForm::Python } else { NumberForm::Jsonb },
        };
        prop_assert_eq!(
            decode(line.as_bytes(), limits),
            decode_reference(line.as_bytes(), limits),
            "{}", line
        );
    }
}

#[test]
fn a_well_formed_event_is_read_in_one_pass_and_others_are_not_lost() {
    let limits = Limits {
        max_depth: 64,
        numbers: NumberForm::Jsonb,
    };
    let line = r#"{"event_type":"task.completed","timestamp":"2026-11-26T03:59:48.12+00:00","sequence":7,"entity_type":"task","entity_id":"t1","workflow_id":"w1","data":{"outputs":{"b":1e-7,"a":[1]},"status":"SUCCEEDED"},"metadata":{"n":1e400}}"#;
    let decoded = decode(line.as_bytes(), limits).unwrap();
    assert_eq!(decoded, decode_reference(line.as_bytes(), limits).unwrap());
    let Frame::Event(event) = decoded else {
        panic!("not an event")
    };
    assert_eq!(
        event.data.get("outputs"),
        Some(r#"{"a":[1],"b":0.0000001}"#)
    );
    // However deep `socket.max_depth` allows, a frame nests at most 127
    // levels, as serde_json reads it: a state read back stays readable.
    let deep = Limits {
        max_depth: 1000,
        numbers: NumberForm::Jsonb,
    };
    for arrays in [124, 125, 126] {
        let nested = format!("{}1{}", "[".repeat(arrays), "]".repeat(arrays));
        let line = line.replace(r#"{"b":1e-7,"a":[1]}"#, &nested);
        let decoded = decode(line.as_bytes(), deep);
        assert_eq!(decoded, decode_reference(line.as_bytes(), deep));
        assert_eq!(decoded.is_ok(), 2 + arrays <= 127, "{arrays}: {decoded:?}");
    }
    // A known key twice is refused, as serde refuses it.
    let twice = line.replace(r#""sequence":7,"#, r#""sequence":7,"sequence":null,"#);
    assert!(matches!(
        decode(twice.as_bytes(), limits),
        Err(DecodeError::Malformed(reason)) if reason.contains("duplicate field `sequence`")
    ));
}
