//! stabilize's workflow state kept compact: the same fold as
//! [`super::stabilize`], into fields and maps whose values are kept as
//! their stored JSON text, not as `serde_json::Value` trees.
//!
//! A tree keeps every string, number and map node in an allocation of its
//! own; a workflow's contexts and outputs make most of its state, and a
//! reducer never looks inside them. Kept as text, a value costs about its
//! length, is written into the stored state by a copy, and into the
//! canonical text the hash is taken over by one pass
//! ([`write_canonical_from_stored`]), with no tree walked.
//!
//! [`super::stabilize`]'s tree fold stays the reference: a stored state of
//! a shape this one does not hold (a key stabilize never writes) is folded
//! as a tree, and the tests fold both ways and compare the texts.

use super::stabilize::{CURRENT_SCHEMA_VERSION, action, plus_one};
use crate::model::EntityType;
use crate::model::canonical::{CanonicalError, write_canonical_from_stored, write_string};
use crate::model::event::{Event, stored_timestamp, stored_timestamp_in};
use crate::model::payload::{Payload, push_stored_string};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// One JSON value as stored: `serde_json`'s compact text of it, numbers in
/// the store's form, object keys in code point order; `null` is kept as
/// the empty text, which takes no allocation (most of a young workflow's
/// fields are `null`).
pub type Text = Box<str>;

/// The keys a stage or task entry can have, in code point order (the order
/// both texts write them in).
const CHILD_KEYS: [&str; 12] = [
    "end_time",
    "error",
    "id",
    "name",
    "outputs",
    "ref_id",
    "retry_count",
    "skip_reason",
    "stage_id",
    "start_time",
    "status",
    "type",
];
const END_TIME: usize = 0;
const ERROR: usize = 1;
const ID: usize = 2;
const NAME: usize = 3;
const OUTPUTS: usize = 4;
const REF_ID: usize = 5;
const RETRY_COUNT: usize = 6;
const SKIP_REASON: usize = 7;
const STAGE_ID: usize = 8;
const START_TIME: usize = 9;
const STATUS: usize = 10;
const TYPE: usize = 11;

/// A stage or task entry in one allocation: its id (its key in the
/// workflow's map), a header, then the texts of the keys it has, back to
/// back in key order.
///
/// An entry has about eight of its twelve keys, most of them short (an
/// id, a status, a time), and a realistic workflow a hundred entries. A
/// slot array with a text allocation per key cost about 200 bytes more an
/// entry than the texts themselves; a table of twelve ends beside one
/// text allocation still put 72 bytes an entry in the workflow's vector,
/// doubled by its growth. Here the vector holds a pointer and a length
/// (16 bytes) and the header costs about one byte a key.
///
/// The layout of the text, all ASCII before the texts, so the whole is a
/// `str` and every slice below falls on a character boundary:
/// `len(id) id present len(text)… text…`, where `present` is the keys the
/// entry has as two 6-bit digits (a bit a slot), and each `len` a length
/// in 6-bit digits, low first: a byte of `0x40..0x80` says another digit
/// follows, a byte below `0x40` is the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Child(Box<str>);

/// Where one key's text is in an entry.
type Span = (usize, usize);

/// An entry's layout, read from its header.
struct Layout {
    id: Span,
    present: u16,
    /// Each key's text length; 0 where the key is absent.
    lens: [usize; 12],
    /// Where the texts begin.
    texts: usize,
}

impl Layout {
    /// Where each key's text is; empty where the key is absent.
    fn spans(&self) -> [Span; 12] {
        let mut at = self.texts;
        self.lens.map(|len| {
            at += len;
            (at - len, at)
        })
    }
}

fn push_len(out: &mut String, mut n: usize) {
    while n >= 0x40 {
        out.push(char::from(0x40 | (n & 0x3f) as u8));
        n >>= 6;
    }
    out.push(char::from(n as u8));
}

fn len_size(mut n: usize) -> usize {
    let mut size = 1;
    while n >= 0x40 {
        n >>= 6;
        size += 1;
    }
    size
}

fn read_len(bytes: &[u8], at: &mut usize) -> usize {
    let (mut n, mut shift) = (0, 0);
    loop {
        let digit = bytes[*at];
        *at += 1;
        n |= usize::from(digit & 0x3f) << shift;
        if digit < 0x40 {
            return n;
        }
        shift += 6;
    }
}

impl Child {
    /// The entry of `id` with the keys `new` gives a text.
    fn new(id: &str, new: &[Option<&str>; 12]) -> Child {
        Child::compose(id, 0, &[0; 12], "", new)
    }

    /// The entry's key in the workflow's map.
    fn id(&self) -> &str {
        let mut at = 0;
        let len = read_len(self.0.as_bytes(), &mut at);
        &self.0[at..at + len]
    }

    fn layout(&self) -> Layout {
        let bytes = self.0.as_bytes();
        let mut at = 0;
        let id_len = read_len(bytes, &mut at);
        let id = (at, at + id_len);
        at = id.1;
        let present = u16::from(bytes[at]) | u16::from(bytes[at + 1]) << 6;
        at += 2;
        let mut lens = [0; 12];
        for (slot, len) in lens.iter_mut().enumerate() {
            if present & (1 << slot) != 0 {
                *len = read_len(bytes, &mut at);
            }
        }
        Layout {
            id,
            present,
            lens,
            texts: at,
        }
    }

    /// The text of the key in `slot`, if the entry has the key.
    fn get(&self, slot: usize) -> Option<&str> {
        let layout = self.layout();
        let (start, end) = layout.spans()[slot];
        (layout.present & (1 << slot) != 0).then(|| &self.0[start..end])
    }

    /// Set each key given a text, keep the others: the entry is written
    /// once, in one allocation of its exact length.
    fn update(&mut self, new: &[Option<&str>; 12]) {
        if new.iter().all(Option::is_none) {
            return;
        }
        let Layout {
            id,
            present,
            lens,
            texts,
        } = self.layout();
        let updated = Child::compose(&self.0[id.0..id.1], present, &lens, &self.0[texts..], new);
        *self = updated;
    }

    /// The entry of `id` whose keys are `present`'s, their texts back to
    /// back in `texts`, `lens[slot]` bytes each (0 for a key it has not),
    /// with each key `new` gives a text set to it.
    ///
    /// The kept texts are copied a run at a time: the ones between two
    /// keys set are adjacent in `texts` as in the new entry (a copy for
    /// each text cost about 30 instructions, and an entry has about eight).
    fn compose(
        id: &str,
        mut present: u16,
        lens: &[usize; 12],
        texts: &str,
        new: &[Option<&str>; 12],
    ) -> Child {
        let mut new_lens = *lens;
        for (slot, text) in new.iter().enumerate() {
            if let Some(text) = text {
                present |= 1 << slot;
                new_lens[slot] = text.len();
            }
        }
        let has = |slot: &usize| present & (1 << slot) != 0;
        let size = (0..12)
            .filter(has)
            .map(|slot| len_size(new_lens[slot]) + new_lens[slot])
            .sum::<usize>()
            + len_size(id.len())
            + id.len()
            + 2;
        let mut out = String::with_capacity(size);
        push_len(&mut out, id.len());
        out.push_str(id);
        out.push(char::from((present & 0x3f) as u8));
        out.push(char::from((present >> 6) as u8));
        for slot in (0..12).filter(has) {
            push_len(&mut out, new_lens[slot]);
        }
        // `run` is the kept texts not yet copied.
        let (mut at, mut run) = (0, 0..0);
        for (slot, text) in new.iter().enumerate() {
            at += lens[slot];
            match text {
                Some(text) => {
                    out.push_str(&texts[run]);
                    out.push_str(text);
                    run = at..at;
                }
                None => run.end = at,
            }
        }
        out.push_str(&texts[run]);
        debug_assert_eq!(out.len(), size);
        Child(out.into_boxed_str())
    }

    /// Each key the entry has with its text, in key order.
    fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let layout = self.layout();
        let present = layout.present;
        CHILD_KEYS
            .iter()
            .zip(layout.spans())
            .enumerate()
            .filter(move |(slot, _)| present & (1 << slot) != 0)
            .map(|(_, (key, (start, end)))| (*key, &self.0[start..end]))
    }
}

/// A workflow's stages or tasks, in code point order of their ids.
///
/// A sorted vector, not a `BTreeMap`: ids are ULIDs, which sort in the
/// order they were made, so the entry an event is for is nearly always the
/// last one or a new last one, found with one comparison (on the entry's
/// own allocation, which the event then updates). A tree would compare
/// the id with a key in each node on its way down to its right edge, each
/// key an allocation of its own and, with thousands of workflows in
/// memory, rarely in the cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Children(Vec<Child>);

impl Children {
    /// Where the entry of `id` is (`Ok`), or goes (`Err`).
    fn find(&self, id: &str) -> Result<usize, usize> {
        let entries = &self.0;
        match entries.last().map(|last| last.id().cmp(id)) {
            Some(Ordering::Equal) => Ok(entries.len() - 1),
            None | Some(Ordering::Less) => Err(entries.len()),
            Some(Ordering::Greater) => entries.binary_search_by(|c| c.id().cmp(id)),
        }
    }

    /// Each id and entry, in id order.
    fn iter(&self) -> impl Iterator<Item = (&str, &Child)> {
        self.0.iter().map(|child| (child.id(), child))
    }
}

/// From entries of distinct ids, in any order.
impl FromIterator<Child> for Children {
    fn from_iter<I: IntoIterator<Item = Child>>(entries: I) -> Children {
        let mut entries: Vec<_> = entries.into_iter().collect();
        entries.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        Children(entries)
    }
}

/// `WorkflowState.to_dict()`, compact.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowState {
    application: Text,
    context: BTreeMap<Box<str>, Text>,
    end_time: Text,
    name: Text,
    stages: Children,
    start_time: Text,
    status: Text,
    tasks: Children,
    workflow_id: Text,
}

/// The top-level keys, in code point order.
const TOP_KEYS: [&str; 9] = [
    "application",
    "context",
    "end_time",
    "name",
    "stages",
    "start_time",
    "status",
    "tasks",
    "workflow_id",
];

fn null() -> Text {
    Text::default()
}

/// The JSON a kept text stands for.
fn json(text: &str) -> &str {
    if text.is_empty() { "null" } else { text }
}

/// The stored text of a string.
fn string(s: &str) -> Text {
    let mut out = String::with_capacity(s.len() + 2);
    push_stored_string(&mut out, s);
    out.into()
}

/// The stored text of a value (read by reference: the fold drops an
/// event's value once written, hydration keeps the tree it read).
fn value(v: &Value) -> Text {
    match v {
        Value::Null => null(),
        Value::String(s) => string(s),
        v => serde_json::to_string(v)
            .expect("a JSON value serialises")
            .into(),
    }
}

fn time(event: &Event) -> Text {
    stored_timestamp(&event.timestamp)
}

/// `data.get(key, default)`, as a text borrowed from `data` or given.
fn get_or<'a>(data: &'a Payload, key: &str, default: &'a str) -> &'a str {
    data.get(key).map_or(default, kept)
}

/// A stored text as kept: `null` as the empty text.
fn kept(text: &str) -> &str {
    if text == "null" { "" } else { text }
}

impl WorkflowState {
    /// `WorkflowState(workflow_id).to_dict()`.
    pub fn new(workflow_id: &str) -> WorkflowState {
        WorkflowState {
            application: null(),
            context: BTreeMap::new(),
            end_time: null(),
            name: null(),
            stages: Children::default(),
            start_time: null(),
            status: null(),
            tasks: Children::default(),
            workflow_id: string(workflow_id),
        }
    }

    /// `EventReplayer._apply_event`, copying what it keeps of the event.
    pub fn apply(&mut self, event: &Event) {
        let data = &event.data;
        if event.schema_version > CURRENT_SCHEMA_VERSION {
            return;
        }
        match event.entity_type {
            EntityType::Workflow => self.apply_workflow(event, data),
            EntityType::Stage => apply_child(&mut self.stages, "stage", event, data),
            EntityType::Task => apply_child(&mut self.tasks, "task", event, data),
        }
    }

    /// `dict.update(data["context"])` when it is an object.
    fn merge_context(&mut self, data: &Payload) {
        if let Some(update) = data.get("context").and_then(Payload::from_stored) {
            for (k, v) in update.iter() {
                let v = kept(v).into();
                match self.context.get_mut(k) {
                    Some(old) => *old = v,
                    None => {
                        self.context.insert(k.into(), v);
                    }
                }
            }
        }
    }

    fn apply_workflow(&mut self, event: &Event, data: &Payload) {
        match &*event.event_type {
            "workflow.created" => {
                self.application = get_or(data, "application", "").into();
                self.name = get_or(data, "name", "").into();
            }
            "workflow.started" => {
                self.start_time = time(event);
                self.status = string("RUNNING");
                self.merge_context(data);
            }
            "workflow.completed" => {
                self.end_time = time(event);
                self.status = get_or(data, "status", r#""SUCCEEDED""#).into();
            }
            "workflow.failed" => {
                self.end_time = time(event);
                self.status = get_or(data, "status", r#""TERMINAL""#).into();
            }
            "workflow.canceled" => {
                self.end_time = time(event);
                self.status = string("CANCELED");
            }
            "workflow.paused" => self.status = string("PAUSED"),
            "workflow.resumed" => self.status = string("RUNNING"),
            "context.updated" => self.merge_context(data),
            _ => {}
        }
    }

    /// The state in a shape this type holds: exactly the keys
    /// `to_dict()` writes, `context`, `stages` and `tasks` objects, and
    /// every stage and task an object of keys stabilize writes. Anything
    /// else (a row not written by stabilize or snapshotd) is `None`, to be
    /// folded as a tree.
    pub fn from_map(map: &Map<String, Value>) -> Option<WorkflowState> {
        if map.len() != TOP_KEYS.len() {
            return None;
        }
        let text = |key: &str| map.get(key).map(value);
        let children = |key: &str| -> Option<Children> {
            let Value::Object(entries) = map.get(key)? else {
                return None;
            };
            entries
                .iter()
                .map(|(id, entry)| {
                    let Value::Object(fields) = entry else {
                        return None;
                    };
                    let mut new = Changes::default();
                    for (k, v) in fields {
                        let slot = CHILD_KEYS.iter().position(|c| c == k)?;
                        new.put(slot, value(v));
                    }
                    Some(Child::new(id, &new.texts()))
                })
                .collect()
        };
        let Value::Object(context) = map.get("context")? else {
            return None;
        };
        Some(WorkflowState {
            application: text("application")?,
            context: context
                .iter()
                .map(|(k, v)| (k.as_str().into(), value(v)))
                .collect(),
            end_time: text("end_time")?,
            name: text("name")?,
            stages: children("stages")?,
            start_time: text("start_time")?,
            status: text("status")?,
            tasks: children("tasks")?,
            workflow_id: text("workflow_id")?,
        })
    }

    /// The state as a JSON object (for the rare reader and the tests).
    /// Each value is parsed on its own: the state nests values two levels
    /// deeper than the events they came from, which could pass the JSON
    /// parser's depth limit as a whole.
    pub fn to_map(&self) -> Map<String, Value> {
        let parse = |text: &str| -> Value {
            serde_json::from_str(json(text)).expect("a kept text is JSON")
        };
        let children = |map: &Children| -> Value {
            let entries = map.iter().map(|(id, child)| {
                let fields = child.fields().map(|(k, v)| (k.to_string(), parse(v)));
                (id.to_string(), Value::Object(fields.collect()))
            });
            Value::Object(entries.collect())
        };
        let context = self
            .context
            .iter()
            .map(|(k, v)| (k.to_string(), parse(v)))
            .collect();
        let mut map = Map::new();
        map.insert("application".into(), parse(&self.application));
        map.insert("context".into(), Value::Object(context));
        map.insert("end_time".into(), parse(&self.end_time));
        map.insert("name".into(), parse(&self.name));
        map.insert("stages".into(), children(&self.stages));
        map.insert("start_time".into(), parse(&self.start_time));
        map.insert("status".into(), parse(&self.status));
        map.insert("tasks".into(), children(&self.tasks));
        map.insert("workflow_id".into(), parse(&self.workflow_id));
        map
    }

    /// Append the stored text: what `serde_json` writes for
    /// [`Self::to_map`].
    pub fn write_stored(&self, out: &mut String) {
        let key = |out: &mut String, key: &str| {
            push_stored_string(out, key);
            Ok(())
        };
        let text = |out: &mut String, text: &str| {
            out.push_str(text);
            Ok(())
        };
        self.write(out, ",", ":", key, text)
            .expect("writing stored text cannot fail");
    }

    /// Append the canonical text the hash is taken over:
    /// `canonical_json(self.to_map())`.
    pub fn write_canonical(&self, out: &mut String) -> Result<(), CanonicalError> {
        self.write(out, ", ", ": ", write_string, write_canonical_from_stored)
    }

    /// The one walk both texts share: keys in code point order, each value
    /// written by `text`.
    fn write(
        &self,
        out: &mut String,
        comma: &str,
        colon: &str,
        key: impl Fn(&mut String, &str) -> Result<(), CanonicalError>,
        text: impl Fn(&mut String, &str) -> Result<(), CanonicalError>,
    ) -> Result<(), CanonicalError> {
        let entry = |out: &mut String, i: usize, k: &str| {
            if i > 0 {
                out.push_str(comma);
            }
            key(out, k)?;
            out.push_str(colon);
            Ok::<_, CanonicalError>(())
        };
        let children = |out: &mut String, map: &Children| {
            out.push('{');
            for (i, (id, child)) in map.iter().enumerate() {
                entry(out, i, id)?;
                out.push('{');
                for (j, (k, v)) in child.fields().enumerate() {
                    entry(out, j, k)?;
                    text(out, json(v))?;
                }
                out.push('}');
            }
            out.push('}');
            Ok(())
        };
        out.push('{');
        for (i, k) in TOP_KEYS.iter().enumerate() {
            entry(out, i, k)?;
            match i {
                0 => text(out, json(&self.application))?,
                1 => {
                    out.push('{');
                    for (j, (k, v)) in self.context.iter().enumerate() {
                        entry(out, j, k)?;
                        text(out, json(v))?;
                    }
                    out.push('}');
                }
                2 => text(out, json(&self.end_time))?,
                3 => text(out, json(&self.name))?,
                4 => children(out, &self.stages)?,
                5 => text(out, json(&self.start_time))?,
                6 => text(out, json(&self.status))?,
                7 => children(out, &self.tasks)?,
                _ => text(out, json(&self.workflow_id))?,
            }
        }
        out.push('}');
        Ok(())
    }
}

/// The texts one event (or a stored state) gives an entry's keys,
/// gathered so that the entry is written once: borrowed from the event's
/// payload where they are its values.
#[derive(Default)]
struct Changes<'a>([Option<Cow<'a, str>>; 12]);

impl<'a> Changes<'a> {
    fn put(&mut self, slot: usize, text: Text) {
        self.0[slot] = Some(Cow::Owned(text.into_string()));
    }

    /// The event's time, written into `buf` (no allocation).
    fn put_time(&mut self, slot: usize, event: &Event, buf: &'a mut [u8; 34]) {
        self.0[slot] = Some(stored_timestamp_in(&event.timestamp, buf));
    }

    /// A text of the event's or known in advance (`"\"RUNNING\""`).
    fn put_str(&mut self, slot: usize, text: &'a str) {
        self.0[slot] = Some(Cow::Borrowed(text));
    }

    fn texts(&self) -> [Option<&str>; 12] {
        std::array::from_fn(|slot| self.0[slot].as_deref())
    }
}

/// Stage and task events: the first event of any type creates the entry.
fn apply_child(children: &mut Children, kind: &str, event: &Event, data: &Payload) {
    let id = &*event.entity_id;
    let found = children.find(id);
    let entry = found.ok().map(|at| &children.0[at]);
    let mut time = [0u8; 34];
    let mut new = Changes::default();
    if entry.is_none() {
        new.put(ID, string(id));
        let fields: &[usize] = if kind == "stage" {
            &[REF_ID, TYPE, NAME]
        } else {
            &[NAME, STAGE_ID]
        };
        for &field in fields {
            new.put_str(field, get_or(data, CHILD_KEYS[field], ""));
        }
    }
    match (kind, action(&event.event_type, kind)) {
        (_, None) => {}
        (_, Some("started")) => {
            new.put_str(STATUS, r#""RUNNING""#);
            new.put_time(START_TIME, event, &mut time);
        }
        (_, Some("completed")) => {
            new.put_str(STATUS, get_or(data, "status", r#""SUCCEEDED""#));
            new.put_time(END_TIME, event, &mut time);
            if let Some(outputs) = data.get("outputs") {
                new.put_str(OUTPUTS, kept(outputs));
            }
        }
        (_, Some("failed")) => {
            new.put_str(STATUS, get_or(data, "status", r#""TERMINAL""#));
            new.put_time(END_TIME, event, &mut time);
            new.put_str(ERROR, get_or(data, "error", ""));
        }
        ("stage", Some("skipped")) => {
            new.put_str(STATUS, r#""SKIPPED""#);
            new.put_str(SKIP_REASON, get_or(data, "reason", ""));
        }
        ("stage", Some("canceled")) => new.put_str(STATUS, r#""CANCELED""#),
        ("stage", Some("suspended")) => new.put_str(STATUS, r#""SUSPENDED""#),
        ("stage", Some("resumed")) => new.put_str(STATUS, r#""RUNNING""#),
        ("task", Some("retried")) => {
            // data.get("retry_count", task.get("retry_count", 0) + 1), the
            // default first (see `stabilize`): a count Python cannot add one
            // to leaves the count as it was.
            let next = match entry.and_then(|c| c.get(RETRY_COUNT)) {
                None => Ok(Some(Cow::Borrowed("1"))),
                Some("true") => Ok(Some(Cow::Borrowed("2"))),
                Some("false") => Ok(Some(Cow::Borrowed("1"))),
                Some(n)
                    if n.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) =>
                {
                    Ok(plus_one(n, event.numbers).map(|n| Cow::Owned(n.as_str().to_string())))
                }
                Some(_) => Err(()),
            };
            if let Ok(next) = next
                && let Some(count) = data
                    .get("retry_count")
                    .map(|n| Cow::Borrowed(kept(n)))
                    .or(next)
            {
                new.0[RETRY_COUNT] = Some(count);
            }
        }
        _ => {}
    }
    match found {
        Ok(at) => children.0[at].update(&new.texts()),
        // An entry is written once it has its first keys: one allocation.
        Err(at) => children.0.insert(at, Child::new(id, &new.texts())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A text of 0 to about 5,000 bytes (lengths of one, two and three
    /// digits), with characters of every UTF-8 width.
    fn text() -> impl Strategy<Value = String> {
        (0usize..80, "[a-zé€😀\"]{0,3}", 0usize..3).prop_map(|(n, s, scale)| {
            let repeat = [1, 30, 1_700][scale];
            s.repeat(n * repeat / 4 + 1)
        })
    }

    proptest! {
        /// An entry reads back every key as last set, in key order, and
        /// keeps its id, whatever the order, grouping and length of the
        /// texts set.
        #[test]
        fn an_entry_keeps_each_key_as_last_set(
            id in "[0-9A-Z😀]{0,30}",
            updates in prop::collection::vec(
                prop::collection::vec((0usize..12, text()), 0..4),
                0..12,
            ),
        ) {
            let mut child = Child::new(&id, &[None; 12]);
            let mut model: [Option<String>; 12] = Default::default();
            for update in updates {
                let mut new = [None; 12];
                for (slot, text) in &update {
                    new[*slot] = Some(text.as_str());
                }
                child.update(&new);
                for (slot, text) in update {
                    model[slot] = Some(text);
                }
                prop_assert_eq!(child.id(), id.as_str());
                for (s, expected) in model.iter().enumerate() {
                    prop_assert_eq!(child.get(s), expected.as_deref());
                }
                let fields: Vec<_> = child.fields().collect();
                let expected: Vec<_> = model
                    .iter()
                    .enumerate()
                    .filter_map(|(s, t)| Some((CHILD_KEYS[s], t.as_deref()?)))
                    .collect();
                prop_assert_eq!(fields, expected);
            }
        }
    }
}
