//! Canonical JSON and state_hash against the vectors made with real Python
//! and a real Postgres, plus properties over random JSON.

use crate::helpers::{repo, shared};
use proptest::prelude::*;
use serde_json::Value;
use snapshotd::model::canonical::{
    NumberForm, canonical_json, normalize_number, normalize_value, normalize_value_as, state_hash,
    write_canonical_from_stored,
};

#[derive(serde::Deserialize)]
struct Case {
    input: String,
    jsonb: Option<String>,
    canonical: Option<String>,
    sha256: Option<String>,
    postgres_rejects: Option<String>,
    /// Only in the project's own vectors: what stabilize's SQLite path
    /// hashes (the input read by `json.loads`, no Postgres in between).
    python_canonical: Option<String>,
}

fn cases() -> Vec<Case> {
    let mut all = read_cases(&shared().join("vectors/canonical_json.jsonl"));
    let own = read_cases(&repo().join("tests/vectors/floats.jsonl"));
    assert!(own.len() >= 200, "only {} float vectors read", own.len());
    all.extend(own);
    all
}

fn read_cases(path: &std::path::Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the vectors at {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a vector is JSON"))
        .collect()
}

#[test]
fn every_vector_gives_stabilizes_canonical_text_and_hash() {
    let cases = cases();
    assert!(cases.len() >= 280, "only {} vectors read", cases.len());
    let mut checked = 0;
    for case in cases {
        if let Some(expected) = &case.python_canonical {
            // The SQLite path: numbers kept as Python reads the input.
            let mut value: Value = serde_json::from_str(&case.input).expect("input parses");
            normalize_value_as(&mut value, NumberForm::Python).expect("Python form");
            assert_eq!(
                &canonical_json(&value).unwrap(),
                expected,
                "python form of {}",
                case.input
            );
        }
        let mut value: Value = serde_json::from_str(&case.input).expect("input parses");
        let normalized = normalize_value(&mut value);
        if let Some(reason) = case.postgres_rejects {
            assert!(
                normalized.is_err(),
                "accepted what Postgres rejects ({reason}): {}",
                case.input
            );
            continue;
        }
        normalized.unwrap_or_else(|e| panic!("rejected {}: {e}", case.input));
        let expected = case.canonical.expect("canonical");
        // From the input, as the daemon receives it.
        assert_eq!(
            canonical_json(&value).unwrap(),
            expected,
            "input {}",
            case.input
        );
        assert_eq!(
            state_hash(&value).unwrap(),
            case.sha256.clone().unwrap(),
            "input {}",
            case.input
        );
        // The normalised numbers are what Postgres stored.
        let stored: Value = serde_json::from_str(case.jsonb.as_deref().unwrap()).unwrap();
        assert_eq!(
            value, stored,
            "normalised form differs from JSONB for {}",
            case.input
        );
        // From the stored form, as the store reads it back.
        assert_eq!(
            canonical_json(&stored).unwrap(),
            expected,
            "jsonb {:?}",
            case.jsonb
        );
        checked += 1;
    }
    assert!(checked >= 280);
}

/// Random JSON, with awkward numbers, strings and keys.
pub fn json_value() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        (any::<u64>(), 0u32..30, -40i32..40).prop_map(|(m, frac, exp)| {
            let digits = m.to_string();
            let cut = (frac as usize).min(digits.len().saturating_sub(1));
            let (a, b) = digits.split_at(digits.len() - cut);
            if b.is_empty() {
                format!("{a}e{exp}")
            } else {
                format!("{a}.{b}e{exp}")
            }
        }),
    ]
    .prop_map(|text| serde_json::from_str::<Value>(&text).unwrap());
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        "[ -~\u{80}-\u{10ffff}\x01-\x1f\x7f\u{2028}\"\\\\]{0,8}"
            .prop_map(|s: String| Value::String(s.replace('\0', ""))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                "[a-zé\u{1F600} _\x01-\x1f\x7f\u{2028}\"\\\\]{0,4}",
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn canonical_text_reparsed_is_canonical_again(mut value in json_value()) {
        normalize_value(&mut value).unwrap();
        let text = canonical_json(&value).unwrap();
        let again: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(canonical_json(&again).unwrap(), text);
    }

    #[test]
    fn the_canonical_text_written_from_the_stored_text_is_the_trees(raw in json_value()) {
        for form in [NumberForm::Jsonb, NumberForm::Python] {
            let mut value = raw.clone();
            normalize_value_as(&mut value, form).unwrap();
            let stored = serde_json::to_string(&value).unwrap();
            let mut from_stored = String::from("x");
            write_canonical_from_stored(&mut from_stored, &stored).unwrap();
            prop_assert_eq!(&from_stored[1..], canonical_json(&value).unwrap(), "stored {}", stored);
        }
    }

    #[test]
    fn normalising_a_number_twice_changes_nothing(value in json_value()) {
        if let Value::Number(n) = value {
            let once = normalize_number(n.as_str()).unwrap();
            prop_assert_eq!(normalize_number(&once).unwrap(), once);
        }
    }
}
