//! The compact workflow state against the tree fold it replaces: random
//! stabilize event streams folded both ways give the same stored and
//! canonical texts, byte for byte.

use crate::canonical::json_value;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value};
use snapshotd::model::canonical::{CanonicalError, NumberForm, normalize_value_as};
use snapshotd::model::event::Event;
use snapshotd::model::payload::{Payload, PayloadError};
use snapshotd::model::{EntityKey, EntityType};
use snapshotd::reducer::{Reducer, State, stabilize};
use std::sync::Arc;

const TYPES: [&str; 22] = [
    "workflow.created",
    "workflow.started",
    "workflow.completed",
    "workflow.failed",
    "workflow.canceled",
    "workflow.paused",
    "workflow.resumed",
    "context.updated",
    "stage.started",
    "stage.completed",
    "stage.failed",
    "stage.skipped",
    "stage.canceled",
    "stage.suspended",
    "stage.resumed",
    "task.started",
    "task.completed",
    "task.failed",
    "task.retried",
    "task.suspended",
    "future.thing",
    "stage",
];

const KEYS: [&str; 12] = [
    "application",
    "name",
    "context",
    "status",
    "outputs",
    "error",
    "reason",
    "retry_count",
    "ref_id",
    "type",
    "stage_id",
    "other",
];

/// A data value: mostly what stabilize sends, sometimes anything.
fn data_value(key: &'static str) -> impl Strategy<Value = Value> {
    let usual = match key {
        "context" => prop::collection::btree_map(
            "[a-zé_\x00-\x1f\x7f\u{2028}\"\\\\]{1,4}",
            json_value(),
            0..4,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed(),
        "retry_count" => prop_oneof![
            (0i64..5).prop_map(Value::from),
            Just(serde_json::from_str("2.5").unwrap()),
            Just(serde_json::from_str("9999999999999998.0").unwrap()),
        ]
        .boxed(),
        _ => "[ -~é\u{1F600}\n\"\\\\]{0,12}"
            .prop_map(Value::String)
            .boxed(),
    };
    prop_oneof![4 => usual, 1 => json_value()]
}

fn event() -> impl Strategy<Value = (usize, usize, Map<String, Value>, i64)> {
    let data = prop::sample::subsequence(KEYS.to_vec(), 0..5).prop_flat_map(|keys| {
        keys.into_iter()
            .map(|k| data_value(k).prop_map(move |v| (k.to_string(), v)))
            .collect::<Vec<_>>()
            .prop_map(|pairs| pairs.into_iter().collect::<Map<String, Value>>())
    });
    (
        0..TYPES.len(),
        0usize..4,
        data,
        prop_oneof![9 => Just(1i64), 1 => Just(2i64)],
    )
}

fn make(
    i: usize,
    (kind, child, data, schema): (usize, usize, Map<String, Value>, i64),
    form: NumberForm,
) -> Event {
    let event_type = TYPES[kind];
    let entity_type = if event_type.starts_with("stage") {
        EntityType::Stage
    } else if event_type.starts_with("task") {
        EntityType::Task
    } else {
        [EntityType::Workflow, EntityType::Stage, EntityType::Task][child % 3]
    };
    // U+0000 is refused by decode, and kept here: the texts must then
    // fail alike. Numbers are normalised as far as normalising gets.
    let data: Map<String, Value> = data
        .into_iter()
        .map(|(k, mut v)| {
            let _ = normalize_value_as(&mut v, form);
            (k, v)
        })
        .collect();
    let data = Payload::from_map(&data);
    let entity_id: Arc<str> = match entity_type {
        EntityType::Workflow => Arc::from("wf\u{e9}\"1"),
        _ => Arc::from(["c0", "c1", "c\u{1F600}", "c\n3"][child]),
    };
    Event {
        event_type: event_type.into(),
        timestamp: Utc
            .timestamp_micros(1_790_000_000_000_000 + i as i64 * 1_234)
            .unwrap(),
        sequence: i as i64 + 1,
        entity_type,
        entity_id,
        workflow_id: Arc::from("wf\u{e9}\"1"),
        data,
        schema_version: schema,
        numbers: form,
    }
}

fn key() -> EntityKey {
    EntityKey::new(EntityType::Workflow, "wf\u{e9}\"1")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_compact_fold_writes_the_tree_folds_texts(
        events in prop::collection::vec(event(), 0..40),
        python in any::<bool>(),
        split in any::<prop::sample::Index>(),
    ) {
        let form = if python { NumberForm::Python } else { NumberForm::Jsonb };
        let events: Vec<Event> = events.into_iter().enumerate().map(|(i, e)| make(i, e, form)).collect();
        let mut tree = stabilize::initial(&key().entity_id);
        let mut compact = Reducer::Stabilize.initial(&key());
        // Each event's data read from its JSON text, as frames arrive.
        let mut read = Reducer::Stabilize.initial(&key());
        // Read back from its stored form part way, then folded on.
        let mut resumed = Reducer::Stabilize.initial(&key());
        let split = split.index(events.len() + 1);
        prop_assert!(matches!(compact, State::Workflow(_)));
        for (i, event) in events.iter().enumerate() {
            if i == split {
                resumed = Reducer::Stabilize.from_stored(compact.to_map());
                prop_assert!(matches!(resumed, State::Workflow(_)));
                prop_assert_eq!(&resumed, &compact);
            }
            stabilize::apply(&mut tree, event);
            Reducer::Stabilize.fold(&mut compact, event);
            let mut from_text = event.clone();
            match Payload::from_json(&serde_json::to_string(&event.data.to_map()).unwrap(), form) {
                Ok(data) => from_text.data = data,
                // A frame cannot carry U+0000 (refused when decoded).
                Err(PayloadError::Value(CanonicalError::NulCharacter)) => {}
                Err(e) => prop_assert!(false, "{e}"),
            }
            prop_assert_eq!(&from_text.data, &event.data);
            Reducer::Stabilize.fold(&mut read, &from_text);
            if i >= split {
                Reducer::Stabilize.fold(&mut resumed, event);
            }
            let expected = State::Tree(tree.clone()).texts();
            prop_assert_eq!(&compact.texts(), &expected, "after event {}", i);
            prop_assert_eq!(&read, &compact);
        }
        if split < events.len() {
            prop_assert_eq!(&resumed, &compact);
        }
    }
}

#[test]
fn odd_values_stabilize_never_writes_are_kept_compact_and_fold_alike() {
    use serde_json::json;
    let mut map = stabilize::initial("wf");
    map["workflow_id"] = json!(7);
    map["stages"] = json!({"s": {"retry_count": "x", "stage_id": 1}});
    map["tasks"] = json!({"t": {"retry_count": true}, "u": {}});
    let mut compact = Reducer::Stabilize.from_stored(map.clone());
    assert!(matches!(compact, State::Workflow(_)));
    let events: Vec<Event> = [
        ("t", "task.retried"),
        ("u", "task.completed"),
        ("s", "stage.failed"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (id, kind))| {
        let (kind_index, child) = (TYPES.iter().position(|t| *t == kind).unwrap(), 0);
        let mut e = make(i, (kind_index, child, Map::new(), 1), NumberForm::Jsonb);
        e.entity_id = Arc::from(id);
        e
    })
    .collect();
    for event in &events {
        stabilize::apply(&mut map, event);
        Reducer::Stabilize.fold(&mut compact, event);
    }
    assert_eq!(compact.texts(), State::Tree(map.clone()).texts());
    assert_eq!(map["tasks"]["t"]["retry_count"], json!(2));
}

#[test]
fn a_stored_state_of_another_shape_is_folded_as_a_tree() {
    let mut map = stabilize::initial("wf");
    map.insert("extra".into(), Value::Bool(true));
    assert!(matches!(
        Reducer::Stabilize.from_stored(map.clone()),
        State::Tree(_)
    ));
    let mut odd_child = stabilize::initial("wf");
    odd_child["tasks"] = serde_json::json!({"t": {"id": "t", "note": 1}});
    assert!(matches!(
        Reducer::Stabilize.from_stored(odd_child),
        State::Tree(_)
    ));
    let mut not_object = stabilize::initial("wf");
    not_object["stages"] = serde_json::json!([]);
    assert!(matches!(
        Reducer::Stabilize.from_stored(not_object),
        State::Tree(_)
    ));
    map.remove("extra");
    assert!(matches!(
        Reducer::Stabilize.from_stored(map),
        State::Workflow(_)
    ));
}
