//! The generic reducer: RFC 7396 JSON merge patch of each event's `data`.

use crate::model::event::Event;
use serde_json::{Map, Value};

/// Apply `event.data` as a merge patch to `state`, its values read from
/// their stored text into the state's tree.
pub fn apply(state: &mut Map<String, Value>, event: &Event) {
    merge_owned(state, event.data.to_map());
}

fn merge_owned(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(&key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key)
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(slot) = slot {
                    merge_owned(slot, inner);
                }
            }
            other => {
                target.insert(key, other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(target: Value, patch: Value) -> Value {
        let (Value::Object(mut t), Value::Object(p)) = (target, patch) else {
            panic!("objects only")
        };
        merge_owned(&mut t, p);
        Value::Object(t)
    }

    #[test]
    fn rfc_7396_examples_hold() {
        assert_eq!(
            patch(json!({"a": "b"}), json!({"a": "c"})),
            json!({"a": "c"})
        );
        assert_eq!(
            patch(json!({"a": "b"}), json!({"b": "c"})),
            json!({"a": "b", "b": "c"})
        );
        assert_eq!(patch(json!({"a": "b"}), json!({"a": null})), json!({}));
        assert_eq!(
            patch(json!({"a": "b", "b": "c"}), json!({"a": null})),
            json!({"b": "c"})
        );
        assert_eq!(
            patch(json!({"a": ["b"]}), json!({"a": "c"})),
            json!({"a": "c"})
        );
        assert_eq!(
            patch(json!({"a": "c"}), json!({"a": ["b"]})),
            json!({"a": ["b"]})
        );
        assert_eq!(
            patch(
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}})
            ),
            json!({"a": {"b": "d"}})
        );
        assert_eq!(
            patch(json!({"a": [{"b": "c"}]}), json!({"a": [1]})),
            json!({"a": [1]})
        );
        assert_eq!(
            patch(json!({"e": null}), json!({"a": 1})),
            json!({"e": null, "a": 1})
        );
        assert_eq!(
            patch(json!({"a": "foo"}), json!({"a": {"bb": {"ccc": null}}})),
            json!({"a": {"bb": {}}})
        );
    }
}
