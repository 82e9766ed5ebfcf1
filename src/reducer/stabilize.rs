//! stabilize 0.33.1's `EventReplayer` (`stabilize/events/replay.py`), as a
//! pure fold into `WorkflowState.to_dict()`:
//! `{workflow_id, status, application, name, start_time, end_time, context,
//! stages, tasks}`.
//!
//! Every rule below mirrors a line of `_apply_*_event`; where the Python
//! uses `data.get(k, default)`, a key present with `null` gives `null`.

use crate::model::EntityType;
use crate::model::canonical::{NumberForm, normalize_number_as, python_float_repr};
use crate::model::event::{Event, render_timestamp};
use crate::model::payload::Payload;
use serde_json::{Map, Number, Value};

/// The newest event schema this replay understands (`CURRENT_SCHEMA_VERSION`).
pub const CURRENT_SCHEMA_VERSION: i64 = 1;

/// `WorkflowState(workflow_id).to_dict()`.
pub fn initial(workflow_id: &str) -> Map<String, Value> {
    let mut state = Map::new();
    state.insert("workflow_id".into(), Value::String(workflow_id.into()));
    for key in ["status", "application", "name", "start_time", "end_time"] {
        state.insert(key.into(), Value::Null);
    }
    for key in ["context", "stages", "tasks"] {
        state.insert(key.into(), Value::Object(Map::new()));
    }
    state
}

/// `EventReplayer._apply_event`.
pub fn apply(state: &mut Map<String, Value>, event: &Event) {
    let data = &event.data;
    if event.schema_version > CURRENT_SCHEMA_VERSION {
        return; // Written by a newer build: skipped, still counted by the caller.
    }
    match event.entity_type {
        EntityType::Workflow => apply_workflow(state, event, data),
        EntityType::Stage => apply_child(state, "stages", event, data),
        EntityType::Task => apply_child(state, "tasks", event, data),
    }
}

fn time(event: &Event) -> Value {
    Value::String(render_timestamp(&event.timestamp))
}

fn text(s: &str) -> Value {
    Value::String(s.to_string())
}

/// `data.get(key, default)`.
fn get_or(data: &Payload, key: &str, default: Value) -> Value {
    data.value(key).unwrap_or(default)
}

/// `dict.update(data["context"])` when the key is present.
fn merge_context(state: &mut Map<String, Value>, data: &Payload) {
    if let Some(Value::Object(update)) = data.value("context")
        && let Some(Value::Object(context)) = state.get_mut("context")
    {
        for (k, v) in update {
            context.insert(k, v);
        }
    }
}

fn apply_workflow(state: &mut Map<String, Value>, event: &Event, data: &Payload) {
    match &*event.event_type {
        "workflow.created" => {
            state.insert(
                "application".into(),
                get_or(data, "application", Value::Null),
            );
            state.insert("name".into(), get_or(data, "name", Value::Null));
        }
        "workflow.started" => {
            state.insert("start_time".into(), time(event));
            state.insert("status".into(), text("RUNNING"));
            merge_context(state, data);
        }
        "workflow.completed" => {
            state.insert("end_time".into(), time(event));
            state.insert("status".into(), get_or(data, "status", text("SUCCEEDED")));
        }
        "workflow.failed" => {
            state.insert("end_time".into(), time(event));
            state.insert("status".into(), get_or(data, "status", text("TERMINAL")));
        }
        "workflow.canceled" => {
            state.insert("end_time".into(), time(event));
            state.insert("status".into(), text("CANCELED"));
        }
        "workflow.paused" => {
            state.insert("status".into(), text("PAUSED"));
        }
        "workflow.resumed" => {
            state.insert("status".into(), text("RUNNING"));
        }
        "context.updated" => merge_context(state, data),
        _ => {}
    }
}

/// Stage and task events: the first event of any type creates the entry.
fn apply_child(state: &mut Map<String, Value>, table: &str, event: &Event, data: &Payload) {
    let Some(Value::Object(children)) = state.get_mut(table) else {
        return;
    };
    let id = &*event.entity_id;
    let entry = children.entry(id.to_string()).or_insert_with(|| {
        let mut child = Map::new();
        child.insert("id".into(), text(id));
        let fields: &[&str] = if table == "stages" {
            &["ref_id", "type", "name"]
        } else {
            &["name", "stage_id"]
        };
        for field in fields {
            child.insert((*field).into(), get_or(data, field, Value::Null));
        }
        Value::Object(child)
    });
    let Value::Object(child) = entry else {
        return;
    };
    let kind = if table == "stages" { "stage" } else { "task" };
    let Some(action) = action(&event.event_type, kind) else {
        return;
    };
    match (kind, action) {
        (_, "started") => {
            child.insert("status".into(), text("RUNNING"));
            child.insert("start_time".into(), time(event));
        }
        (_, "completed") => {
            child.insert("status".into(), get_or(data, "status", text("SUCCEEDED")));
            child.insert("end_time".into(), time(event));
            if let Some(outputs) = data.value("outputs") {
                child.insert("outputs".into(), outputs);
            }
        }
        (_, "failed") => {
            child.insert("status".into(), get_or(data, "status", text("TERMINAL")));
            child.insert("end_time".into(), time(event));
            child.insert("error".into(), get_or(data, "error", Value::Null));
        }
        ("stage", "skipped") => {
            child.insert("status".into(), text("SKIPPED"));
            child.insert("skip_reason".into(), get_or(data, "reason", Value::Null));
        }
        ("stage", "canceled") => {
            child.insert("status".into(), text("CANCELED"));
        }
        ("stage", "suspended") => {
            child.insert("status".into(), text("SUSPENDED"));
        }
        ("stage", "resumed") => {
            child.insert("status".into(), text("RUNNING"));
        }
        ("task", "retried") => {
            // data.get("retry_count", task.get("retry_count", 0) + 1): Python
            // adds one to the kept count first, even when the event names
            // the count. A count it cannot add to raises TypeError; the
            // count is then left as it was.
            let next = match child.get("retry_count") {
                None => Ok(Some(Value::Number(Number::from(1)))),
                Some(Value::Number(n)) => {
                    Ok(plus_one(n.as_str(), event.numbers).map(Value::Number))
                }
                Some(Value::Bool(b)) => Ok(Some(Value::Number(Number::from(u8::from(*b) + 1)))),
                Some(_) => Err(()),
            };
            if let Ok(next) = next
                && let Some(count) = data.value("retry_count").or(next)
            {
                child.insert("retry_count".into(), count);
            }
        }
        _ => {}
    }
}

/// What a stage or task event does: `started` of `stage.started`, if the
/// event is of that kind.
pub(crate) fn action<'a>(event_type: &'a str, kind: &str) -> Option<&'a str> {
    event_type.strip_prefix(kind)?.strip_prefix('.')
}

/// `n + 1` as Python computes it (exact for ints, float for floats), in
/// the form the state's numbers are kept in: on SQLite a float of 1e16 or
/// more stays a float (`1e+16`), where JSONB would make it an integer.
pub(crate) fn plus_one(literal: &str, form: NumberForm) -> Option<Number> {
    let text = if literal.contains(['.', 'e', 'E']) {
        let value: f64 = literal.parse().ok()?;
        let sum = value + 1.0;
        // A decimal JSONB keeps (`1` and 309 zeros `.5`) can be a float too
        // large for Python: infinite, and so the sum. Such a state is
        // refused when stored; the count is left as it was.
        if !sum.is_finite() {
            return None;
        }
        normalize_number_as(&python_float_repr(sum), form).ok()?
    } else {
        increment_decimal(literal)?
    };
    Some(Number::from_string_unchecked(text))
}

/// Add one to a decimal integer of any size, as Python's `int` does.
fn increment_decimal(literal: &str) -> Option<String> {
    if let Ok(n) = literal.parse::<i128>()
        && let Some(sum) = n.checked_add(1)
    {
        return Some(sum.to_string());
    }
    let (negative, digits) = match literal.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, literal),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut bytes = digits.as_bytes().to_vec();
    let mut i = bytes.len();
    if negative {
        // Below i128: -n + 1 is -(n - 1), and n - 1 is still far from zero.
        while i > 0 {
            i -= 1;
            if bytes[i] == b'0' {
                bytes[i] = b'9';
            } else {
                bytes[i] -= 1;
                break;
            }
        }
        let start = bytes
            .iter()
            .position(|&b| b != b'0')
            .unwrap_or(bytes.len() - 1);
        bytes.drain(..start);
        bytes.insert(0, b'-');
    } else {
        loop {
            if i == 0 {
                bytes.insert(0, b'1');
                break;
            }
            i -= 1;
            if bytes[i] == b'9' {
                bytes[i] = b'0';
            } else {
                bytes[i] += 1;
                break;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::parse_timestamp;
    use serde_json::json;
    use std::sync::Arc;

    fn event(entity_type: EntityType, id: &str, event_type: &str, data: Value) -> Event {
        let Value::Object(data) = data else { panic!() };
        Event {
            event_type: event_type.to_owned().into(),
            timestamp: parse_timestamp("2026-11-26T03:59:48.120000+00:00").unwrap(),
            sequence: 1,
            entity_type,
            entity_id: Arc::from(id),
            workflow_id: Arc::from("wf"),
            data: Payload::from_map(&data),
            schema_version: 1,
            numbers: NumberForm::Jsonb,
        }
    }

    fn replay(events: &[Event]) -> Value {
        let mut state = initial("wf");
        for e in events {
            apply(&mut state, e);
        }
        Value::Object(state)
    }

    use EntityType::{Stage, Task, Workflow};

    #[test]
    fn a_workflow_life_folds_like_the_replayer() {
        let state = replay(&[
            event(
                Workflow,
                "wf",
                "workflow.created",
                json!({"application": "app"}),
            ),
            event(
                Workflow,
                "wf",
                "workflow.started",
                json!({"context": {"a": 1, "b": 2}}),
            ),
            event(
                Workflow,
                "wf",
                "context.updated",
                json!({"context": {"b": 3}}),
            ),
            event(Workflow, "wf", "workflow.paused", json!({})),
            event(
                Workflow,
                "wf",
                "workflow.completed",
                json!({"status": null}),
            ),
        ]);
        assert_eq!(
            state,
            json!({"workflow_id": "wf", "status": null, "application": "app", "name": null,
                   "start_time": "2026-11-26T03:59:48.120000+00:00",
                   "end_time": "2026-11-26T03:59:48.120000+00:00",
                   "context": {"a": 1, "b": 3}, "stages": {}, "tasks": {}})
        );
    }

    #[test]
    fn the_first_event_of_a_stage_of_any_type_creates_it_and_is_never_refilled() {
        let state = replay(&[
            event(Stage, "s1", "future.thing", json!({"ref_id": "r1"})),
            event(
                Stage,
                "s1",
                "stage.started",
                json!({"ref_id": "r2", "name": "late"}),
            ),
            event(Stage, "s1", "stage.failed", json!({})),
        ]);
        assert_eq!(
            state["stages"]["s1"],
            json!({"id": "s1", "ref_id": "r1", "type": null, "name": null, "status": "TERMINAL",
                   "start_time": "2026-11-26T03:59:48.120000+00:00",
                   "end_time": "2026-11-26T03:59:48.120000+00:00", "error": null})
        );
    }

    #[test]
    fn stage_and_task_endings_follow_the_replayer() {
        let state = replay(&[
            event(Stage, "s", "stage.skipped", json!({"reason": "why"})),
            event(
                Task,
                "t",
                "task.completed",
                json!({"outputs": {"o": 1}, "stage_id": "s"}),
            ),
            event(Task, "u", "task.suspended", json!({})),
        ]);
        assert_eq!(state["stages"]["s"]["status"], json!("SKIPPED"));
        assert_eq!(state["stages"]["s"]["skip_reason"], json!("why"));
        assert_eq!(state["tasks"]["t"]["outputs"], json!({"o": 1}));
        assert_eq!(state["tasks"]["t"]["stage_id"], json!("s"));
        assert_eq!(
            state["tasks"]["u"],
            json!({"id": "u", "name": null, "stage_id": null})
        );
    }

    #[test]
    fn a_retry_counts_up_unless_the_event_says_how_many() {
        let state = replay(&[
            event(Task, "t", "task.retried", json!({})),
            event(Task, "t", "task.retried", json!({})),
            event(Task, "u", "task.retried", json!({"retry_count": 7})),
            event(Task, "u", "task.retried", json!({})),
        ]);
        assert_eq!(state["tasks"]["t"]["retry_count"], json!(2));
        assert_eq!(state["tasks"]["u"]["retry_count"], json!(8));
        assert_eq!(
            increment_decimal("99999999999999999999999999999999999999999").unwrap(),
            "100000000000000000000000000000000000000000"
        );
        assert_eq!(plus_one("1.5", NumberForm::Jsonb).unwrap().as_str(), "2.5");
        // Past i128, both ways, as Python's int.
        assert_eq!(
            increment_decimal(&i128::MAX.to_string()).unwrap(),
            "170141183460469231731687303715884105728"
        );
        assert_eq!(
            increment_decimal(&format!("-1{}", "0".repeat(40))).unwrap(),
            format!("-{}", "9".repeat(40))
        );
        assert_eq!(
            increment_decimal("-170141183460469231731687303715884105729").unwrap(),
            i128::MIN.to_string()
        );
    }

    #[test]
    fn a_retry_adds_one_first_as_python_evaluates_the_default() {
        let retried = |data| event(Task, "t", "task.retried", data);
        let set = |count: Value| {
            let mut e = retried(json!({}));
            e.data.insert("retry_count", &count);
            e
        };
        // True + 1 == 2 in Python.
        let state = replay(&[set(json!(true)), retried(json!({}))]);
        assert_eq!(state["tasks"]["t"]["retry_count"], json!(2));
        // A count Python cannot add one to raises TypeError even when the
        // event names the new count: the count is left as it was.
        for odd in [json!("3"), json!(null), json!([1])] {
            let state = replay(&[set(odd.clone()), set(json!(5))]);
            assert_eq!(state["tasks"]["t"]["retry_count"], odd);
        }
        let state = replay(&[set(json!(1)), set(json!(7))]);
        assert_eq!(state["tasks"]["t"]["retry_count"], json!(7));
    }

    #[test]
    fn a_float_count_plus_one_keeps_the_stores_number_form() {
        let jsonb = |s| plus_one(s, NumberForm::Jsonb).unwrap().as_str().to_string();
        let python = |s| {
            plus_one(s, NumberForm::Python)
                .unwrap()
                .as_str()
                .to_string()
        };
        // Python: 9999999999999998.0 + 1 == 1e16, a float; JSONB keeps its integer text.
        assert_eq!(jsonb("9999999999999998.0"), "10000000000000000");
        assert_eq!(python("9999999999999998.0"), "1e+16");
        assert_eq!(python("1.2345678901234568e+16"), "1.2345678901234568e+16");
        // The sum is a tie: CPython keeps the even last digit.
        assert_eq!(python("902641992788.78125"), "902641992789.7812");
        assert_eq!(jsonb("902641992788.78125"), "902641992789.7812");
    }

    #[test]
    fn a_retry_after_a_count_python_reads_as_infinite_leaves_it_as_it_was() {
        // Found by fuzz/reducers: `python_float_repr(inf)` panicked.
        let huge = format!("1{}.5", "0".repeat(309));
        assert_eq!(plus_one(&huge, NumberForm::Jsonb), None);
        let mut first = event(Task, "t", "task.retried", json!({}));
        first.data.insert(
            "retry_count",
            &Value::Number(Number::from_string_unchecked(huge.clone())),
        );
        let state = replay(&[first, event(Task, "t", "task.retried", json!({}))]);
        assert_eq!(state["tasks"]["t"]["retry_count"].to_string(), huge);
    }

    #[test]
    fn an_event_of_a_newer_schema_changes_nothing() {
        let mut newer = event(Workflow, "wf", "workflow.started", json!({}));
        newer.schema_version = 2;
        assert_eq!(replay(&[newer]), Value::Object(initial("wf")));
    }

    #[test]
    fn events_of_other_kinds_leave_the_workflow_alone() {
        let state = replay(&[
            event(Workflow, "wf", "status.changed", json!({"status": "X"})),
            event(Stage, "s", "context.updated", json!({"context": {"x": 1}})),
        ]);
        assert_eq!(state["status"], Value::Null);
        assert_eq!(state["context"], json!({}));
        assert!(state["stages"]["s"].is_object());
    }
}
