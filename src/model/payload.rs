//! An event's `data` as the daemon keeps it: each top-level key with its
//! value's stored text, written straight from the JSON as it arrived.
//!
//! The stored text of a value is what `serde_json` writes for it once its
//! numbers are in the store's form ([`NumberForm`]): no whitespace, object
//! keys in code point order (the last of duplicate keys wins), strings
//! escaped only where JSON requires. Reading it from the frame in one pass
//! builds no tree: most of an event's bytes are a workflow's contexts and
//! outputs, which the stabilize reducer keeps as they are
//! ([`crate::reducer::workflow`]). A reducer that does look inside a value
//! parses its text ([`Payload::value`]).

use super::canonical::{
    CanonicalError, NumberForm, Scanned, normalize_number_as, normalize_value_as, scan_number,
    truncated,
};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;

/// An object's members as read: each key with the range of the text written
/// for it.
type Member<'a> = (Cow<'a, str>, Range<usize>);

/// How deep a payload may nest, as `serde_json`'s own parser allows (its
/// recursion limit of 128 refuses the 128th level).
const MAX_DEPTH: usize = 127;

/// Each key of an event's `data` with its value's stored text, in key order.
///
/// The texts are kept one after another in one string, each member as the
/// ranges of its key and value there: two allocations a payload, not two a
/// key. The fold copies what it keeps into the state anyway (a stage's or
/// task's entry is one allocation), so nothing is gained by boxing each
/// value on the connection's thread to free it on the entity's.
#[derive(Clone, Default)]
pub struct Payload {
    text: String,
    members: Vec<Span>,
}

/// Where a member's key and value are in [`Payload::text`].
#[derive(Debug, Clone, PartialEq)]
struct Span {
    key: Range<usize>,
    value: Range<usize>,
}

/// Equal when the same keys have the same texts, wherever they are kept.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("must be a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Value(#[from] CanonicalError),
}

impl Payload {
    /// The payload of `json`, an object or `null` (no keys), numbers made
    /// `form`.
    ///
    /// A value the reader refuses (U+0000, a number out of range) is then
    /// judged the tree way, as the whole is: it may be the earlier value of
    /// a repeated key, which the tree drops, and the tree names a syntax
    /// fault before any value's.
    pub fn from_json(json: &str, form: NumberForm) -> Result<Payload, PayloadError> {
        Payload::at_level(json, form, 1)
    }

    /// [`Self::from_json`] of a frame's `data`, one level down: the depth
    /// allowed is what is left under the envelope, as when `serde_json`
    /// read it with the envelope.
    pub(crate) fn from_frame_data(json: &str, form: NumberForm) -> Result<Payload, PayloadError> {
        Payload::at_level(json, form, 2)
    }

    fn at_level(json: &str, form: NumberForm, level: usize) -> Result<Payload, PayloadError> {
        match Payload::read(json, form, level) {
            Err(PayloadError::Value(e)) if !matches!(e, CanonicalError::Malformed(_)) => {
                Payload::from_tree(json, form, level)
            }
            read => read,
        }
    }

    /// [`Self::from_json`] by way of a tree: parsed, numbers normalised,
    /// each value serialised.
    fn from_tree(json: &str, form: NumberForm, level: usize) -> Result<Payload, PayloadError> {
        let malformed = |e: serde_json::Error| CanonicalError::Malformed(e.to_string());
        let mut value: Value = if level > 1 {
            // Inside an array, the parser's depth limit counts from level 2.
            match serde_json::from_str(&format!("[{json}]")).map_err(malformed)? {
                Value::Array(mut items) if items.len() == 1 => items.remove(0),
                _ => return Err(CanonicalError::Malformed(truncated(json)).into()),
            }
        } else {
            serde_json::from_str(json).map_err(malformed)?
        };
        normalize_value_as(&mut value, form)?;
        match value {
            Value::Object(map) => Ok(Payload::from_map(&map)),
            Value::Null => Ok(Payload::default()),
            _ => Err(PayloadError::NotAnObject),
        }
    }

    fn read(json: &str, form: NumberForm, level: usize) -> Result<Payload, PayloadError> {
        let mut reader = Reader::new(json, Some(form));
        reader.skip_whitespace();
        let payload = match reader.peek() {
            Some(b'{') => reader.top_object(level)?,
            Some(b'n') => {
                reader.word("null", &mut String::new())?;
                Payload::default()
            }
            Some(_) => {
                // Any other JSON value is refused as such; anything else as
                // not JSON.
                reader.value(&mut String::new(), level - 1)?;
                reader.end()?;
                return Err(PayloadError::NotAnObject);
            }
            None => return Err(reader.malformed().into()),
        };
        reader.end()?;
        Ok(payload)
    }

    /// The members of a stored object text (numbers already in the store's
    /// form, kept as they are); `None` if the text is not an object.
    pub fn from_stored(stored: &str) -> Option<Payload> {
        let mut reader = Reader::new(stored, None);
        if reader.peek() != Some(b'{') {
            return None;
        }
        let payload = reader.top_object(1).ok()?;
        reader.end().ok()?;
        Some(payload)
    }

    /// The payload of a map whose numbers are already in the store's form.
    pub fn from_map(map: &Map<String, Value>) -> Payload {
        let mut payload = Payload::default();
        // A map iterates in key order.
        for (k, v) in map {
            let member = payload.push(k, &stored(v));
            payload.members.push(member);
        }
        payload
    }

    /// The stored text of `data[key]`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key)
            .map(|i| &self.text[self.members[i].value.clone()])
    }

    /// `data[key]` as a tree.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.get(key).map(parse)
    }

    /// Set `data[key]` to a value whose numbers are in the store's form
    /// (the text it had stays in the string, unused).
    pub fn insert(&mut self, key: &str, value: &Value) {
        let member = self.push(key, &stored(value));
        match self
            .members
            .binary_search_by(|m| self.text[m.key.clone()].cmp(key))
        {
            Ok(i) => self.members[i] = member,
            Err(i) => self.members.insert(i, member),
        }
    }

    /// The keys and stored texts, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.members
            .iter()
            .map(|m| (&self.text[m.key.clone()], &self.text[m.value.clone()]))
    }

    /// The payload as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_string(), parse(v)))
            .collect()
    }

    fn position(&self, key: &str) -> Option<usize> {
        // A handful of keys: a scan beats a search.
        self.members
            .iter()
            .position(|m| &self.text[m.key.clone()] == key)
    }

    /// Append a key and its value's text to the string.
    fn push(&mut self, key: &str, value: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(key);
        let middle = self.text.len();
        self.text.push_str(value);
        Span {
            key: start..middle,
            value: middle..self.text.len(),
        }
    }
}

fn stored(value: &Value) -> Box<str> {
    serde_json::to_string(value)
        .expect("a JSON value serialises")
        .into()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("a stored text is JSON")
}

/// An event frame's envelope as the one pass reads it
/// ([`crate::model::event::decode`]'s way for well-formed events): the
/// fields an event is made of, each as found (`None` when absent or
/// `null`), and `data` read into stored texts. Only their meaning is left
/// to check.
#[derive(Default)]
pub(crate) struct EventFrame<'a> {
    /// Strings without escapes: their contents, borrowed from the line.
    pub event_type: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub entity_type: Option<&'a str>,
    pub entity_id: Option<&'a str>,
    pub workflow_id: Option<&'a str>,
    pub sequence: Option<i64>,
    pub schema_version: Option<i64>,
    pub data: Payload,
}

/// Read an event frame that is one JSON object nesting at most
/// `max_depth` levels (the object itself is level 1), numbers of `data`
/// made `form`, in one pass: each member's value read as its key wants it
/// where it is read. `None` for anything else, which the caller reads its
/// other way: a command (`op`), a known key given twice (refused there,
/// even as `null`), a field of another kind than an event's (a string
/// with an escape among them, a number that is no `i64`), any fault.
pub(crate) fn read_event_frame(
    text: &str,
    form: NumberForm,
    max_depth: usize,
) -> Option<EventFrame<'_>> {
    let mut reader = Reader::new(text, Some(form));
    reader.max_depth = max_depth.min(MAX_DEPTH);
    reader.skip_whitespace();
    if reader.peek() != Some(b'{') || reader.nest(1).is_err() {
        return None;
    }
    let mut frame = EventFrame::default();
    // The known keys seen, so that one given twice goes to the caller.
    let mut seen = 0u16;
    reader
        .each_member(|reader, key| {
            reader.skip_whitespace();
            let bit = match &*key {
                "op" => return Err(not_an_event()),
                "event_type" => 0,
                "timestamp" => 1,
                "sequence" => 2,
                "entity_type" => 3,
                "entity_id" => 4,
                "workflow_id" => 5,
                "data" => 6,
                "schema_version" => 7,
                "metadata" => 8,
                "version" => 9,
                "snapshot" => 10,
                "event_id" => 11,
                _ => 16,
            };
            if bit < 16 {
                if seen & (1 << bit) != 0 {
                    return Err(not_an_event());
                }
                seen |= 1 << bit;
            }
            match bit {
                0 => frame.event_type = reader.plain_string()?,
                1 => frame.timestamp = reader.plain_string()?,
                2 => frame.sequence = reader.integer()?,
                3 => frame.entity_type = reader.plain_string()?,
                4 => frame.entity_id = reader.plain_string()?,
                5 => frame.workflow_id = reader.plain_string()?,
                6 if reader.peek() == Some(b'{') => frame.data = reader.top_object(2)?,
                6 => reader.null()?,
                7 => frame.schema_version = reader.integer()?,
                9 => drop(reader.integer()?),
                11 => drop(reader.plain_string()?),
                8 if !matches!(reader.peek(), Some(b'{' | b'n')) => return Err(not_an_event()),
                _ => {
                    // `metadata`, `snapshot` and keys not known: checked,
                    // not kept (numbers as they are).
                    let form = reader.form.take();
                    let read = reader.skip(1);
                    reader.form = form;
                    read?;
                }
            }
            Ok(())
        })
        .ok()?;
    reader.end().ok()?;
    Some(frame)
}

/// A non-negative integer of 1 to 18 digits without a leading zero at the
/// start of `bytes`, with its length, when nothing after it could continue
/// a number: what [`scan_number`] reads as that integer. `None` for
/// anything else, which the general scan reads (or refuses).
fn plain_integer(bytes: &[u8]) -> Option<(i64, usize)> {
    let digits = bytes
        .iter()
        .take(19)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 18 || (digits > 1 && bytes[0] == b'0') {
        return None;
    }
    if let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = bytes.get(digits) {
        return None;
    }
    let value = bytes[..digits]
        .iter()
        .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
    Some((value, digits))
}

/// What [`read_event_frame`] stops at: not a fault of the frame, which
/// the caller's other way judges, only not what it reads.
fn not_an_event() -> CanonicalError {
    CanonicalError::Malformed(String::new())
}

/// A string as `serde_json` writes it: as it is when nothing needs an
/// escape, which is nearly always so for ids and keys.
pub(crate) fn push_stored_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= b' ' && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serialises"));
    }
}

/// A one-pass reader of JSON text that writes each value's stored text.
struct Reader<'a> {
    text: &'a str,
    at: usize,
    /// The form numbers are made; `None` reads a kept text, whose numbers
    /// and characters were checked when it was made, as it is.
    form: Option<NumberForm>,
    /// The deepest nesting read.
    max_depth: usize,
    /// The members of the objects being read, innermost last.
    stack: Vec<Member<'a>>,
    /// Where an object's members are copied to be put in order.
    scratch: String,
}

impl<'a> Reader<'a> {
    fn new(text: &'a str, form: Option<NumberForm>) -> Reader<'a> {
        Reader {
            text,
            at: 0,
            form,
            max_depth: MAX_DEPTH,
            // Room for the members of a few nested objects without growing.
            stack: Vec::with_capacity(16),
            scratch: String::new(),
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    fn malformed(&self) -> CanonicalError {
        let rest = &self.text[self.at.min(self.text.len())..];
        CanonicalError::Malformed(if rest.is_empty() {
            "unexpected end".into()
        } else {
            format!("unexpected text at `{}`", truncated(rest))
        })
    }

    /// Skip whitespace and expect `byte`.
    fn expect(&mut self, byte: u8) -> Result<(), CanonicalError> {
        self.skip_whitespace();
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.malformed())
        }
    }

    /// Only whitespace may follow the value.
    fn end(&mut self) -> Result<(), CanonicalError> {
        self.skip_whitespace();
        if self.at == self.text.len() {
            Ok(())
        } else {
            Err(self.malformed())
        }
    }

    fn value(&mut self, out: &mut String, depth: usize) -> Result<(), CanonicalError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(out, depth + 1),
            Some(b'[') => self.array(out, depth + 1),
            Some(b'"') => {
                let s = self.string()?;
                push_string(out, &s, matches!(s, Cow::Borrowed(_)));
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => self.number(out),
            Some(b't') => self.word("true", out),
            Some(b'f') => self.word("false", out),
            Some(b'n') => self.word("null", out),
            _ => Err(self.malformed()),
        }
    }

    fn word(&mut self, word: &str, out: &mut String) -> Result<(), CanonicalError> {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            out.push_str(word);
            Ok(())
        } else {
            Err(self.malformed())
        }
    }

    /// A string without escapes here, as its contents, or `null`.
    fn plain_string(&mut self) -> Result<Option<&'a str>, CanonicalError> {
        if self.peek() != Some(b'"') {
            return self.null().map(|()| None);
        }
        match self.string()? {
            Cow::Borrowed(s) => Ok(Some(s)),
            Cow::Owned(_) => Err(not_an_event()),
        }
    }

    /// An integer here that fits an `i64`, or `null`.
    fn integer(&mut self) -> Result<Option<i64>, CanonicalError> {
        // The envelope's integers (sequence, version, schema_version) are a
        // few plain digits: read here without the general number scan.
        if let Some((value, len)) = plain_integer(&self.bytes()[self.at..]) {
            self.at += len;
            return Ok(Some(value));
        }
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => {
                let (literal, scanned) = self.number_literal()?;
                match scanned.integer {
                    Some(n) => Ok(Some(n)),
                    // 19 digits or more, or not an integer at all.
                    None => literal.parse().map(Some).map_err(|_| not_an_event()),
                }
            }
            _ => self.null().map(|()| None),
        }
    }

    /// `null` here.
    fn null(&mut self) -> Result<(), CanonicalError> {
        if self.text[self.at..].starts_with("null") {
            self.at += 4;
            Ok(())
        } else {
            Err(self.malformed())
        }
    }

    /// The number literal here, checked, with what its one scan found.
    fn number_literal(&mut self) -> Result<(&'a str, Scanned), CanonicalError> {
        let start = self.at;
        let Some(scanned) = scan_number(&self.bytes()[start..]) else {
            return Err(self.malformed());
        };
        self.at += scanned.len;
        let text = self.text;
        Ok((&text[start..self.at], scanned))
    }

    fn number(&mut self, out: &mut String) -> Result<(), CanonicalError> {
        let (literal, scanned) = self.number_literal()?;
        match self.form {
            Some(form) if !scanned.kept_as_is(form) => {
                out.push_str(&normalize_number_as(&serde_literal(literal), form)?)
            }
            _ => out.push_str(literal),
        }
        Ok(())
    }

    /// A string's contents, borrowed when it has no escape. Inlined where
    /// strings are read: nearly every string is plain, and the call cost
    /// as much as its scan; anything else goes to [`Self::string_slowly`].
    #[inline(always)]
    fn string(&mut self) -> Result<Cow<'a, str>, CanonicalError> {
        let start = self.at;
        let bytes = self.bytes();
        let end = start + 1 + plain_run(&bytes[start + 1..]);
        if bytes.get(end) == Some(&b'"') {
            self.at = end + 1;
            let text = self.text;
            return Ok(Cow::Borrowed(&text[start + 1..end]));
        }
        self.string_slowly()
    }

    /// [`Self::string`] with escapes or control characters, or unended.
    #[cold]
    #[inline(never)]
    fn string_slowly(&mut self) -> Result<Cow<'a, str>, CanonicalError> {
        let start = self.at;
        self.at += 1; // the opening quote
        let bytes = self.bytes();
        let (mut escaped, mut control) = (false, false);
        loop {
            self.at += plain_run(&bytes[self.at..]);
            match bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    break;
                }
                Some(b'\\') => {
                    escaped = true;
                    self.at += 2;
                }
                Some(_) => {
                    control = true;
                    self.at += 1;
                }
                None => self.at = bytes.len() + 1,
            }
            if self.at > bytes.len() {
                self.at = start;
                return Err(self.malformed());
            }
        }
        let text = self.text;
        let quoted = &text[start..self.at];
        let contents = if escaped {
            match serde_json::from_str::<String>(quoted) {
                Ok(decoded) => Cow::Owned(decoded),
                Err(e) => {
                    // serde_json names the fault; its position is within
                    // the string alone, so the string is shown instead.
                    let e = e.to_string();
                    let fault = e.split(" at line ").next().unwrap_or(&e);
                    return Err(CanonicalError::Malformed(format!(
                        "{fault} in string {}",
                        truncated(quoted)
                    )));
                }
            }
        } else {
            if control {
                self.at = start;
                return Err(self.malformed());
            }
            Cow::Borrowed(&quoted[1..quoted.len() - 1])
        };
        // A borrowed string has no control character, U+0000 included.
        if let Cow::Owned(decoded) = &contents
            && self.form.is_some()
            && decoded.contains('\0')
        {
            return Err(CanonicalError::NulCharacter);
        }
        Ok(contents)
    }

    /// The value here, checked as [`Self::value`] checks it (as a kept
    /// text, numbers as they are) and written nowhere.
    fn skip(&mut self, depth: usize) -> Result<(), CanonicalError> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => {
                self.nest(depth + 1)?;
                self.each_member(|reader, _| reader.skip(depth + 1))
            }
            Some(b'[') => {
                self.nest(depth + 1)?;
                self.each_element(|reader, _| reader.skip(depth + 1))
            }
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number_literal().map(drop),
            Some(b't') => self.word("true", &mut String::new()),
            Some(b'f') => self.word("false", &mut String::new()),
            Some(b'n') => self.word("null", &mut String::new()),
            _ => Err(self.malformed()),
        }
    }

    fn array(&mut self, out: &mut String, depth: usize) -> Result<(), CanonicalError> {
        self.nest(depth)?;
        out.push('[');
        self.each_element(|reader, first| {
            if !first {
                out.push(',');
            }
            reader.value(out, depth)
        })?;
        out.push(']');
        Ok(())
    }

    /// Read the array here (at its `[`) element by element, up to its `]`:
    /// `element` reads each, given whether it is the first.
    fn each_element(
        &mut self,
        mut element: impl FnMut(&mut Self, bool) -> Result<(), CanonicalError>,
    ) -> Result<(), CanonicalError> {
        self.at += 1;
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(());
        }
        let mut first = true;
        loop {
            element(self, first)?;
            first = false;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.malformed()),
            }
        }
    }

    fn nest(&self, depth: usize) -> Result<(), CanonicalError> {
        if depth > self.max_depth {
            Err(CanonicalError::Malformed(format!(
                "nests deeper than {} levels",
                self.max_depth
            )))
        } else {
            Ok(())
        }
    }

    /// Read the object here (at its `{`) member by member, up to its `}`:
    /// `value` reads each member's value, given the reader past the colon
    /// and the member's key.
    fn each_member(
        &mut self,
        mut value: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), CanonicalError>,
    ) -> Result<(), CanonicalError> {
        self.at += 1;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.malformed());
            }
            let key = self.string()?;
            self.expect(b':')?;
            value(self, key)?;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.malformed()),
            }
        }
    }

    /// An object, its members written as they are read; if their keys did
    /// not come in order (or one came twice), the members are then put in
    /// order where they were written, the last of a repeated key kept.
    fn object(&mut self, out: &mut String, depth: usize) -> Result<(), CanonicalError> {
        self.nest(depth)?;
        let begin = out.len();
        out.push('{');
        // This object's members go on the stack above `base`; a nested
        // object's above them, gone when it ends.
        let base = self.stack.len();
        let mut in_order = true;
        self.each_member(|reader, key| {
            if let Some((previous, _)) = reader.stack[base..].last() {
                in_order &= **previous < *key;
                out.push(',');
            }
            let from = out.len();
            push_string(out, &key, matches!(key, Cow::Borrowed(_)));
            out.push(':');
            reader.value(out, depth)?;
            reader.stack.push((key, from..out.len()));
            Ok(())
        })?;
        if !in_order {
            // Rewritten from a copy of the members' text.
            let from = begin + 1;
            self.scratch.clear();
            self.scratch.push_str(&out[from..]);
            out.truncate(from);
            for (_, range) in in_key_order(&mut self.stack[base..]) {
                if out.len() > from {
                    out.push(',');
                }
                out.push_str(&self.scratch[range.start - from..range.end - from]);
            }
        }
        self.stack.truncate(base);
        out.push('}');
        Ok(())
    }

    /// The object here, at `depth`, as a payload: the values' texts
    /// written as they are read, then the keys that are kept, in order.
    fn top_object(&mut self, depth: usize) -> Result<Payload, CanonicalError> {
        self.nest(depth)?;
        // Written in a buffer the thread keeps, then copied out at its
        // length: the payload must not keep slack while its event waits in
        // a reorder window or a mailbox (2 KiB an entity), and giving a
        // string sized for the rest of the line its slack back cost a
        // `realloc` into another size class, 550 instructions an event.
        thread_local! {
            static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let mut text = TEXT.with_borrow_mut(std::mem::take);
        text.clear();
        // The members go on the stack, as a nested object's do.
        let base = self.stack.len();
        self.each_member(|reader, key| {
            let from = text.len();
            reader.value(&mut text, depth)?;
            reader.stack.push((key, from..text.len()));
            Ok(())
        })?;
        let mut members = Vec::with_capacity(self.stack.len() - base);
        for (key, value) in in_key_order(&mut self.stack[base..]) {
            let start = text.len();
            text.push_str(key);
            members.push(Span {
                key: start..text.len(),
                value: value.clone(),
            });
        }
        self.stack.truncate(base);
        let kept = String::from(text.as_str());
        // Kept for the next event unless a rare huge payload grew it.
        if text.capacity() <= 1 << 20 {
            TEXT.with_borrow_mut(|t| *t = text);
        }
        Ok(Payload {
            text: kept,
            members,
        })
    }
}

/// `members` sorted by key, each repeated key's last member only: the one
/// a map keeps. (The sort is stable, so the last read is last of its run.)
fn in_key_order<'m, 'a>(members: &'m mut [Member<'a>]) -> impl Iterator<Item = &'m Member<'a>> {
    members.sort_by(|a, b| a.0.cmp(&b.0));
    let members = &*members;
    members
        .iter()
        .enumerate()
        .filter(|&(i, (key, _))| members.get(i + 1).is_none_or(|(next, _)| next != key))
        .map(|(_, member)| member)
}

/// A string [`Reader::string`] read: one it borrowed has no escape and no
/// control character, so it is written as it is, unscanned.
fn push_string(out: &mut String, s: &str, borrowed: bool) {
    if borrowed {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        push_stored_string(out, s);
    }
}

/// How many bytes of string contents come before the first quote,
/// backslash or control character (all of `bytes` if none does).
///
/// Sixteen bytes at a time with SSE2 (every x86_64 has it), inline: the
/// caller passes the rest of the line, so even a short id is read by one
/// or two vector compares; a call into a search function cost as much as
/// the scan. The last bytes, and other targets, go eight at a time.
#[inline(always)]
pub(crate) fn plain_run(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86_64: every such CPU has it.
    return unsafe { plain_run_sse2(bytes) };
    #[cfg(not(target_arch = "x86_64"))]
    return plain_run_by_words(bytes);
}

/// [`plain_run`] sixteen bytes at a time, then by words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
#[inline]
fn plain_run_sse2(bytes: &[u8]) -> usize {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8, _mm_setzero_si128,
    };
    let quote = _mm_set1_epi8(b'"' as i8);
    let backslash = _mm_set1_epi8(b'\\' as i8);
    // A control character (below 0x20) has its top three bits clear.
    let top = _mm_set1_epi8(0xe0_u8 as i8);
    let mut at = 0;
    while at + 16 <= bytes.len() {
        // SAFETY: the 16 bytes from `at` are within `bytes` (checked
        // above); an unaligned load reads them as they are.
        let chunk = unsafe { _mm_loadu_si128(bytes.as_ptr().add(at).cast::<__m128i>()) };
        let stops = _mm_or_si128(
            _mm_or_si128(
                _mm_cmpeq_epi8(chunk, quote),
                _mm_cmpeq_epi8(chunk, backslash),
            ),
            _mm_cmpeq_epi8(_mm_and_si128(chunk, top), _mm_setzero_si128()),
        );
        let mask = _mm_movemask_epi8(stops);
        if mask != 0 {
            return at + mask.trailing_zeros() as usize;
        }
        at += 16;
    }
    at + plain_run_by_words(&bytes[at..])
}

/// [`plain_run`] eight bytes at a time, in a `u64`.
fn plain_run_by_words(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of each byte of `word` below `n` (exact for the first
    // such byte, which is all that is read of it).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let stops = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, b' ');
        if stops != 0 {
            return at + (stops.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < b' ')
        .unwrap_or(bytes.len() - at)
}

/// A literal as `serde_json` keeps it: the exponent as `e`, signed (`1E5`
/// is `1e+5`). The value is the same; a refusal quotes this text.
fn serde_literal(literal: &str) -> Cow<'_, str> {
    match literal.find(['e', 'E']) {
        Some(at) if !literal[at..].starts_with("e+") && !literal[at..].starts_with("e-") => {
            let rest = &literal[at + 1..];
            let signed = if rest.starts_with(['+', '-']) {
                rest.to_string()
            } else {
                format!("+{rest}")
            };
            Cow::Owned(format!("{}e{signed}", &literal[..at]))
        }
        _ => Cow::Borrowed(literal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn old_way(json: &str, form: NumberForm) -> Result<Vec<(String, String)>, String> {
        let mut value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        crate::model::canonical::normalize_value_as(&mut value, form).map_err(|e| e.to_string())?;
        match value {
            Value::Object(map) => Ok(map
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_string(v).unwrap()))
                .collect()),
            Value::Null => Ok(vec![]),
            _ => Err("not an object".into()),
        }
    }

    fn pairs(p: &Payload) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    /// JSON text of up to four levels: every kind of value, spaces or
    /// none around the punctuation.
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,2})?([eE][+-]?[0-9])?",
            "\"([a-z é]|\\\\[n\"])*\"",
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            let space = prop_oneof![Just(""), Just(" ")];
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..5), space.clone())
                    .prop_map(|(items, sp)| format!("[{sp}{}]", items.join(&format!(",{sp}")))),
                (prop::collection::vec(("[a-z]{0,3}", inner), 0..5), space).prop_map(
                    |(members, sp)| {
                        let members: Vec<_> = members
                            .iter()
                            .map(|(k, v)| format!("\"{k}\"{sp}:{sp}{v}"))
                            .collect();
                        format!("{{{sp}{}}}", members.join(&format!(",{sp}")))
                    }
                ),
            ]
        })
    }

    proptest::proptest! {
        /// Skipping accepts what reading accepts, and stops where it stops
        /// (at the value's end, or at the fault): on whole values, and on
        /// values cut short or with a character put somewhere.
        #[test]
        fn skipping_a_value_checks_it_as_reading_it_does(
            text in json_text(),
            cut in proptest::option::of(0usize..200),
            insert in proptest::option::of((0usize..200, "[\\]\\[{}:,\" a0-]")),
            max_depth in 1usize..6,
        ) {
            let mut text = text;
            if let Some(cut) = cut {
                let mut cut = cut % (text.len() + 1);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            if let Some((at, c)) = insert {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, &c);
            }
            let run = |skip: bool| {
                let mut reader = Reader::new(&text, None);
                reader.max_depth = max_depth;
                let read = if skip {
                    reader.skip(0)
                } else {
                    reader.value(&mut String::new(), 0)
                };
                (read.is_ok(), reader.at)
            };
            let (skipped, skipped_to) = run(true);
            let (read, read_to) = run(false);
            proptest::prop_assert_eq!((skipped, skipped_to), (read, read_to), "{}", text);
        }
    }

    #[test]
    fn skipping_refuses_what_does_not_close_or_nest_as_it_opened() {
        for (text, max_depth) in [
            (r#"{"a":1]"#, 3),
            (r#"[1}"#, 3),
            (r#"{"a":[1}}"#, 3),
            (r#"[{"a":1]]"#, 3),
            (r#"{"a" 1}"#, 3),
            (r#"{"a":1,}"#, 3),
            (r#"[1,]"#, 3),
            (r#"{1:2}"#, 3),
            (r#"[[[]]]"#, 2),
            (r#"{"a":{"b":{}}}"#, 2),
        ] {
            let mut reader = Reader::new(text, None);
            reader.max_depth = max_depth;
            assert!(reader.skip(0).is_err(), "{text}");
        }
        let mut reader = Reader::new(r#"{"a":[{"b":[]},{}],"c":{"d":null}} ,"#, None);
        assert!(reader.skip(0).is_ok());
        assert_eq!(&reader.text[reader.at..], " ,");
    }

    #[test]
    fn numbers_at_the_edges_are_scanned_as_the_grammar_says() {
        let scan = |t: &str| scan_number(t.as_bytes()).map(|s| (s.len, s.integer));
        assert_eq!(scan("0,"), Some((1, Some(0))));
        assert_eq!(scan("-0}"), Some((2, Some(0))));
        assert_eq!(
            scan("999999999999999999"),
            Some((18, Some(999_999_999_999_999_999)))
        );
        assert_eq!(
            scan("-999999999999999999"),
            Some((19, Some(-999_999_999_999_999_999)))
        );
        assert_eq!(
            scan("9223372036854775807"),
            Some((19, None)),
            "parsed from the text"
        );
        assert_eq!(scan("1.5e-3 "), Some((6, None)));
        for refused in [
            "0123", "1.", "-", "--1", "1e", "1e+", ".5", "1.2.3", "1e5e5", "+1", "01",
        ] {
            assert_eq!(scan(refused), None, "{refused}");
        }
        assert!(!scan_number(b"-0.00").unwrap().kept_as_is(NumberForm::Jsonb));
        assert!(scan_number(b"-0.01").unwrap().kept_as_is(NumberForm::Jsonb));
        assert!(!scan_number(b"2.50").unwrap().kept_as_is(NumberForm::Python));
    }

    proptest::proptest! {
        /// The envelope's integer shortcut reads what the general scan
        /// reads, wherever it answers, and answers for every plain
        /// integer of up to 18 digits the scan reads.
        #[test]
        fn a_plain_integer_is_read_as_the_scan_reads_it(
            text in "-?[0-9]{0,20}(\\.[0-9]{0,3})?([eE][+-]?[0-9]{0,2})?[,}\\] a0.e-]?",
        ) {
            let scanned = scan_number(text.as_bytes());
            match plain_integer(text.as_bytes()) {
                Some((value, len)) => {
                    let scanned = scanned.expect("the scan reads it too");
                    proptest::prop_assert_eq!((scanned.len, scanned.integer), (len, Some(value)));
                }
                None => proptest::prop_assert!(
                    text.starts_with('-') || scanned.is_none_or(|s| s.integer.is_none()),
                    "{text}: {scanned:?}"
                ),
            }
        }
    }

    #[test]
    fn plain_integers_at_the_edges() {
        assert_eq!(plain_integer(b"0,"), Some((0, 1)));
        assert_eq!(plain_integer(b"300}"), Some((300, 3)));
        assert_eq!(
            plain_integer(b"999999999999999999"),
            Some((999_999_999_999_999_999, 18))
        );
        for other in [
            "9999999999999999999",
            "01",
            "1.0",
            "1e3",
            "-1",
            "",
            "a",
            "12-",
        ] {
            assert_eq!(plain_integer(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn a_plain_run_stops_at_the_first_quote_backslash_or_control_character() {
        let plain = |b: u8| b >= b' ' && b != b'"' && b != b'\\';
        // Every byte value, at every place of two words and their tail,
        // after plain bytes that sit just beside the stops (and after
        // non-ASCII ones, which a byte-wise trick could misread).
        // Two vectors and a tail of two words and some bytes.
        const N: usize = 59;
        for filler in [b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xff, b' '] {
            for stop in 0..=255u8 {
                for at in 0..N {
                    let mut bytes = vec![filler; N];
                    bytes[at] = stop;
                    // A stop later on must not hide or move the first.
                    bytes[N - 1] = b'"';
                    let expected = bytes.iter().position(|&b| !plain(b)).unwrap();
                    assert_eq!(plain_run(&bytes), expected, "{filler:#x} {stop:#x} at {at}");
                    for end in [N - 1, at + 1, at.saturating_sub(1)] {
                        assert_eq!(
                            plain_run(&bytes[..end]),
                            bytes[..end].iter().position(|&b| !plain(b)).unwrap_or(end),
                            "{filler:#x} {stop:#x} at {at}, {end} bytes"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sorts_keys_at_every_level_and_keeps_the_last_duplicate() {
        let text = r#" { "b" : { "z": 1, "a": [ 2, {"y":true,"x":null} ] }, "a": "x", "b2": 1, "a": "y" } "#;
        let p = Payload::from_json(text, NumberForm::Jsonb).unwrap();
        assert_eq!(
            pairs(&p),
            vec![
                ("a".into(), r#""y""#.into()),
                ("b".into(), r#"{"a":[2,{"x":null,"y":true}],"z":1}"#.into()),
                ("b2".into(), "1".into()),
            ]
        );
        assert_eq!(Ok(pairs(&p)), old_way(text, NumberForm::Jsonb));
    }

    #[test]
    fn numbers_take_the_store_form() {
        let text = r#"{"a": 1e-7, "b": -0, "c": 1.50, "d": 12345678901234567890123, "e": 1E2}"#;
        for form in [NumberForm::Jsonb, NumberForm::Python] {
            let p = Payload::from_json(text, form).unwrap();
            assert_eq!(Ok(pairs(&p)), old_way(text, form), "{form:?}");
        }
        assert_eq!(
            Payload::from_json(text, NumberForm::Jsonb)
                .unwrap()
                .get("a"),
            Some("0.0000001")
        );
    }

    #[test]
    fn strings_are_decoded_and_escaped_as_serde_json_writes_them() {
        let text = r#"{"k\u00e9\"y": "a\/b\u0001\n\ud83d\ude00\u007f\u2028", "plain": "é x"}"#;
        let p = Payload::from_json(text, NumberForm::Jsonb).unwrap();
        assert_eq!(Ok(pairs(&p)), old_way(text, NumberForm::Jsonb));
        assert_eq!(p.get("plain"), Some("\"é x\""));
    }

    #[test]
    fn refusals_name_the_reason() {
        let form = NumberForm::Jsonb;
        assert_eq!(
            Payload::from_json(r#"{"a": "x\u0000"}"#, form),
            Err(PayloadError::Value(CanonicalError::NulCharacter))
        );
        assert_eq!(
            Payload::from_json(r#"{"a\u0000": 1}"#, form),
            Err(PayloadError::Value(CanonicalError::NulCharacter))
        );
        assert_eq!(
            Payload::from_json("[1]", form),
            Err(PayloadError::NotAnObject)
        );
        assert_eq!(
            Payload::from_json("\"s\"", form),
            Err(PayloadError::NotAnObject)
        );
        assert_eq!(Payload::from_json("null", form), Ok(Payload::default()));
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{\"a\":tru}",
            "{\"a\":\"x}",
            "{\"a\":\"\\q\"}",
            "{\"a\":\"\t\"}",
            "{} x",
            "{\"a\":[1 2]}",
            "{1:2}",
        ] {
            assert!(
                matches!(
                    Payload::from_json(bad, form),
                    Err(PayloadError::Value(CanonicalError::Malformed(_)))
                ),
                "{bad:?} gave {:?}",
                Payload::from_json(bad, form)
            );
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(Payload::from_json(&deep, form).is_err());
    }

    #[test]
    fn a_map_read_back_is_the_same_payload() {
        let text = r#"{"x": {"b": 1, "a": [1.5, "s"]}, "n": null}"#;
        let p = Payload::from_json(text, NumberForm::Jsonb).unwrap();
        let map = p.to_map();
        assert_eq!(map["x"], json!({"a": [1.5, "s"], "b": 1}));
        assert_eq!(map["n"], Value::Null);
        assert_eq!(Payload::from_map(&map), p);
        let mut q = p.clone();
        q.insert("a", &json!(1));
        assert_eq!(
            q.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["a", "n", "x"]
        );
        assert_eq!(q.get("a"), Some("1"));
        assert_ne!(q, p);
        q.insert("x", &json!(2));
        assert_eq!(q.get("x"), Some("2"));
        assert_eq!(
            pairs(&q),
            vec![
                ("a".into(), "1".into()),
                ("n".into(), "null".into()),
                ("x".into(), "2".into()),
            ]
        );
    }
}
