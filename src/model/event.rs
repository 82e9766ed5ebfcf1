//! Events and commands as they arrive on the socket: raw NDJSON lines become
//! typed [`Frame`]s once, here, with a reason for every refusal (SPEC 2).

use super::canonical::{CanonicalError, NumberForm};
use super::payload::{Payload, PayloadError, plain_run, read_event_frame};
use super::snapshot::{EntityType, IdError, check_id};
use chrono::{DateTime, NaiveDateTime, Timelike, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;

/// One event, as stabilize's `Event.to_dict()` gives it, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Borrowed from [`known_event_type`] for stabilize's own types, so
    /// the usual event holds no allocation for it.
    pub event_type: Cow<'static, str>,
    /// The instant, rounded to microseconds as Postgres keeps it.
    pub timestamp: DateTime<Utc>,
    pub sequence: i64,
    pub entity_type: EntityType,
    pub entity_id: Arc<str>,
    pub workflow_id: Arc<str>,
    /// The payload, as stored texts with numbers in the store's form
    /// ([`Event::numbers`]).
    pub data: Payload,
    pub schema_version: i64,
    /// The form `data`'s numbers are in, so a reducer that computes a new
    /// number (stabilize's `retry_count + 1`) writes it in the same form.
    pub numbers: NumberForm,
}

/// A command a producer sends (a frame with an `"op"` key).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Ping,
    /// Answer once every event sent before on this connection is folded and
    /// the snapshots it triggered are committed; with `snapshot`, once every
    /// entity those events touched is snapshotted and committed (durable).
    Flush {
        snapshot: bool,
    },
    Snapshot {
        entity_type: EntityType,
        entity_id: String,
    },
    Get {
        entity_type: EntityType,
        entity_id: String,
    },
    Stats,
    /// Wait for the table feed: every event committed to stabilize's
    /// `events` table before the command is folded and the snapshots it
    /// triggered are committed.
    Sync,
}

/// A decoded line.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event(Event),
    Command(Command),
}

/// Why a frame was refused; the text is what the producer reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not valid UTF-8 (byte {0})")]
    InvalidUtf8(usize),
    #[error("frame is longer than max_frame_bytes ({0} bytes)")]
    TooLong(usize),
    #[error("frame nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("frame must be a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{0}` {1}")]
    Invalid(&'static str, String),
    #[error("unknown op `{0}`: expected ping, flush, sync, snapshot, get or stats")]
    UnknownOp(String),
}

impl DecodeError {
    /// A short stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::TooLong(_) => "oversized",
            DecodeError::TooDeep(_) => "too_deep",
            DecodeError::Malformed(_) => "malformed_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::Invalid(..) => "invalid_field",
            DecodeError::UnknownOp(_) => "unknown_op",
        }
    }
}

/// Limits a frame must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    /// The form numbers of `data` are kept in (the store's).
    pub numbers: NumberForm,
}

/// The envelope's fields as their JSON text in the line (`None` when
/// absent or `null`), read by serde ([`decode_reference`]), which refuses
/// a known key given twice. Each is parsed on its own afterwards, so a
/// wrong one is named. Other keys are carried, not interpreted: ignored
/// here.
#[derive(Default, Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default, deserialize_with = "json_text")]
    op: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    event_type: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    timestamp: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    sequence: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    entity_type: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    entity_id: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    workflow_id: Option<&'a str>,
    /// Borrowed, then read once into stored texts ([`Payload`]): no tree.
    #[serde(borrow, default, deserialize_with = "json_text")]
    data: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    schema_version: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    metadata: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    version: Option<&'a str>,
    /// `flush` only: snapshot every entity touched before answering.
    #[serde(borrow, default, deserialize_with = "json_text")]
    snapshot: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "json_text")]
    event_id: Option<&'a str>,
}

/// A field's JSON text as it is in the line; `None` for `null`.
fn json_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de str>, D::Error> {
    Option::<&'de RawValue>::deserialize(deserializer).map(|raw| raw.map(RawValue::get))
}

/// Decode one line (without its newline).
///
/// A well-formed event is read in one pass ([`read_event_frame`]): each
/// envelope member read as its field wants it, `data` into stored texts.
/// Any other frame (a command, a refusal, anything the one pass does not
/// take) is decoded by [`decode_reference`], which gives the same result
/// for every line.
pub fn decode(line: &[u8], limits: Limits) -> Result<Frame, DecodeError> {
    // Checked by `simdutf8`, many bytes a step (the standard library's
    // check was 2.4% of the daemon's instructions); a line it refuses is
    // left to the reference, which names where the fault is.
    if let Ok(text) = simdutf8::basic::from_utf8(line)
        && let Some(event) = decode_in_one_pass(text, limits)
    {
        return Ok(Frame::Event(event));
    }
    decode_reference(line, limits)
}

/// [`decode`] by `serde_json`'s parse of the envelope: the reference, and
/// the way for every frame the one pass leaves.
pub fn decode_reference(line: &[u8], limits: Limits) -> Result<Frame, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|e| DecodeError::InvalidUtf8(e.valid_up_to()))?;
    check_depth(line, limits.max_depth)?;
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        // Tell "not JSON" from "JSON but not an object".
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(DecodeError::NotAnObject),
            Err(e) => Err(DecodeError::Malformed(e.to_string())),
        };
    }
    let env: Fields =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if let Some(op) = env.op {
        return decode_command(op, &env).map(Frame::Command);
    }
    decode_event(env, limits.numbers).map(Frame::Event)
}

/// An event read in one pass, or `None` where [`decode_reference`] must
/// decide: not one well-formed object within the depth limit, a command,
/// a key given twice (refused there), a field it reads otherwise (a string
/// with escapes), or an event it refuses.
fn decode_in_one_pass(text: &str, limits: Limits) -> Option<Event> {
    let frame = read_event_frame(text, limits.numbers, limits.max_depth)?;
    let event_type = frame.event_type.filter(|t| !t.is_empty())?;
    let timestamp = parse_timestamp(frame.timestamp?)?;
    let sequence = frame.sequence.filter(|&s| s >= 1)?;
    let entity_type = frame.entity_type?.parse().ok()?;
    let entity_id = frame.entity_id?;
    check_id(entity_id).ok()?;
    let workflow_id = frame.workflow_id?;
    check_id(workflow_id).ok()?;
    let entity_id: Arc<str> = Arc::from(entity_id);
    Some(Event {
        event_type: event_type_of(event_type),
        timestamp,
        sequence,
        entity_type,
        // A workflow's own events name it twice: one allocation.
        workflow_id: if workflow_id == &*entity_id {
            entity_id.clone()
        } else {
            Arc::from(workflow_id)
        },
        entity_id,
        data: frame.data,
        schema_version: frame.schema_version.unwrap_or(1),
        numbers: limits.numbers,
    })
}

fn decode_command(op: &str, env: &Fields) -> Result<Command, DecodeError> {
    let op = string_field("op", op)?;
    let key = |env: &Fields| -> Result<(EntityType, String), DecodeError> {
        let entity_type = parse_entity_type(required("entity_type", env.entity_type)?)?;
        let entity_id = string_field("entity_id", required("entity_id", env.entity_id)?)?;
        check_id(&entity_id).map_err(|e| id_error("entity_id", e))?;
        Ok((entity_type, entity_id.into_owned()))
    };
    match &*op {
        "ping" => Ok(Command::Ping),
        "flush" => {
            let snapshot = match env.snapshot {
                None | Some("false") | Some("null") => false,
                Some("true") => true,
                Some(_) => {
                    return Err(DecodeError::Invalid(
                        "snapshot",
                        "must be true or false".into(),
                    ));
                }
            };
            Ok(Command::Flush { snapshot })
        }
        "stats" => Ok(Command::Stats),
        "sync" => Ok(Command::Sync),
        "snapshot" => key(env).map(|(entity_type, entity_id)| Command::Snapshot {
            entity_type,
            entity_id,
        }),
        "get" => key(env).map(|(entity_type, entity_id)| Command::Get {
            entity_type,
            entity_id,
        }),
        other => Err(DecodeError::UnknownOp(other.chars().take(40).collect())),
    }
}

fn decode_event(env: Fields, numbers: NumberForm) -> Result<Event, DecodeError> {
    let event_type = string_field("event_type", required("event_type", env.event_type)?)?;
    if event_type.is_empty() {
        return Err(DecodeError::Invalid(
            "event_type",
            "must not be empty".into(),
        ));
    }
    let timestamp_text = string_field("timestamp", required("timestamp", env.timestamp)?)?;
    let timestamp = parse_timestamp(&timestamp_text).ok_or_else(|| {
        DecodeError::Invalid(
            "timestamp",
            format!("`{timestamp_text}` is not an ISO 8601 time"),
        )
    })?;
    let sequence = int_field("sequence", required("sequence", env.sequence)?)?;
    if sequence < 1 {
        return Err(DecodeError::Invalid(
            "sequence",
            format!("must be > 0, got {sequence}"),
        ));
    }
    let entity_type = parse_entity_type(required("entity_type", env.entity_type)?)?;
    let entity_id = string_field("entity_id", required("entity_id", env.entity_id)?)?;
    check_id(&entity_id).map_err(|e| id_error("entity_id", e))?;
    let workflow_id = string_field("workflow_id", required("workflow_id", env.workflow_id)?)?;
    check_id(&workflow_id).map_err(|e| id_error("workflow_id", e))?;
    let data = match env.data {
        None => Payload::default(),
        Some(raw) => Payload::from_frame_data(raw, numbers).map_err(|e| match e {
            PayloadError::NotAnObject => {
                DecodeError::Invalid("data", "must be a JSON object".into())
            }
            PayloadError::Value(CanonicalError::Malformed(reason)) => {
                DecodeError::Malformed(format!("data: {reason}"))
            }
            PayloadError::Value(e) => canonical_error("data", e),
        })?,
    };
    let schema_version = match env.schema_version {
        None => 1,
        Some("null") => 1,
        Some(raw) => int_field("schema_version", raw)?,
    };
    if let Some(raw) = env.version
        && raw != "null"
    {
        int_field("version", raw)?;
    }
    if let Some(raw) = env.metadata
        && !(raw.starts_with('{') || raw == "null")
    {
        return Err(DecodeError::Invalid(
            "metadata",
            "must be a JSON object".into(),
        ));
    }
    if let Some(raw) = env.event_id
        && raw != "null"
    {
        string_field("event_id", raw)?;
    }
    Ok(Event {
        event_type: event_type_of(&event_type),
        timestamp,
        sequence,
        entity_type,
        entity_id: Arc::from(&*entity_id),
        workflow_id: Arc::from(&*workflow_id),
        data,
        schema_version,
        numbers,
    })
}

/// An event's type as kept: stabilize's own types (its `EventType`) as
/// static texts, any other as given.
pub fn event_type_of(text: &str) -> Cow<'static, str> {
    match known_event_type(text) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(text.to_owned()),
    }
}

/// The static text of one of stabilize's `EventType` values.
fn known_event_type(text: &str) -> Option<&'static str> {
    Some(match text {
        "workflow.created" => "workflow.created",
        "workflow.started" => "workflow.started",
        "workflow.completed" => "workflow.completed",
        "workflow.failed" => "workflow.failed",
        "workflow.canceled" => "workflow.canceled",
        "workflow.paused" => "workflow.paused",
        "workflow.resumed" => "workflow.resumed",
        "stage.started" => "stage.started",
        "stage.completed" => "stage.completed",
        "stage.failed" => "stage.failed",
        "stage.skipped" => "stage.skipped",
        "stage.canceled" => "stage.canceled",
        "stage.suspended" => "stage.suspended",
        "stage.resumed" => "stage.resumed",
        "task.started" => "task.started",
        "task.completed" => "task.completed",
        "task.failed" => "task.failed",
        "task.retried" => "task.retried",
        "task.suspended" => "task.suspended",
        "status.changed" => "status.changed",
        "context.updated" => "context.updated",
        "outputs.updated" => "outputs.updated",
        "jump.executed" => "jump.executed",
        "custom.progress" => "custom.progress",
        "unknown.event" => "unknown.event",
        _ => return None,
    })
}

fn required<'a>(name: &'static str, raw: Option<&'a str>) -> Result<&'a str, DecodeError> {
    match raw {
        Some(raw) if raw != "null" => Ok(raw),
        _ => Err(DecodeError::Missing(name)),
    }
}

/// A string field, borrowed from the line unless it has escapes.
fn string_field<'a>(name: &'static str, raw: &'a str) -> Result<Cow<'a, str>, DecodeError> {
    // Nearly always a string with nothing to unescape: its contents as
    // they are, without a parser's setup.
    if let Some(inner) = raw
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        && plain_run(inner.as_bytes()) == inner.len()
    {
        return Ok(Cow::Borrowed(inner));
    }
    let value = match serde_json::from_str::<&str>(raw) {
        Ok(plain) => Cow::Borrowed(plain),
        Err(_) => Cow::Owned(serde_json::from_str::<String>(raw).map_err(|_| {
            DecodeError::Invalid(name, format!("must be a string, got {}", preview(raw)))
        })?),
    };
    if value.contains('\0') {
        return Err(DecodeError::Invalid(
            name,
            "contains the character U+0000".into(),
        ));
    }
    Ok(value)
}

fn int_field(name: &'static str, raw: &str) -> Result<i64, DecodeError> {
    raw.parse::<i64>().map_err(|_| {
        DecodeError::Invalid(name, format!("must be an integer, got {}", preview(raw)))
    })
}

fn parse_entity_type(raw: &str) -> Result<EntityType, DecodeError> {
    string_field("entity_type", raw)?.parse().map_err(|_| {
        DecodeError::Invalid(
            "entity_type",
            format!("must be workflow, stage or task, got {}", preview(raw)),
        )
    })
}

fn id_error(name: &'static str, e: IdError) -> DecodeError {
    DecodeError::Invalid(name, e.to_string())
}

fn canonical_error(name: &'static str, e: CanonicalError) -> DecodeError {
    DecodeError::Invalid(name, e.to_string())
}

fn preview(text: &str) -> String {
    if text.len() <= 32 {
        text.to_string()
    } else {
        let cut = (0..=32)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &text[..cut])
    }
}

/// Refuse nesting deeper than `max` before building anything.
fn check_depth(line: &[u8], max: usize) -> Result<(), DecodeError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            // A string: jump from quote or backslash to the next (most of
            // an event's bytes are string contents).
            b'"' => {
                i += 1;
                loop {
                    let Some(at) = line
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    else {
                        // Unterminated: the parser names it.
                        return Ok(());
                    };
                    if line[i + at] == b'\\' {
                        i += at + 2;
                    } else {
                        i += at + 1;
                        break;
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(DecodeError::TooDeep(max));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// ISO 8601 with `Z`, an offset, or none (taken as UTC), `T` or a space
/// between date and time; rounded to microseconds half to even, as Postgres
/// stores a `timestamptz`.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    if let Some(t) = parse_isoformat_utc(text) {
        return Some(t);
    }
    let parsed = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%:z").map(|t| t.with_timezone(&Utc))
        })
        .or_else(|_| {
            DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%:z").map(|t| t.with_timezone(&Utc))
        })
        .or_else(|_| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .or_else(|_| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").map(|t| t.and_utc())
        })
        .ok()?;
    let nanos = parsed.nanosecond() % 1_000_000_000;
    let (micros, rest) = (nanos / 1000, nanos % 1000);
    let round_up = rest > 500 || (rest == 500 && micros % 2 == 1);
    let truncated = parsed.with_nanosecond(micros * 1000)?;
    if round_up {
        // None past chrono's last instant (year 262142), which `+` panicked on.
        truncated.checked_add_signed(chrono::Duration::microseconds(1))
    } else {
        Some(truncated)
    }
}

/// What nearly every producer sends, stabilize first of all: Python's
/// `isoformat()` of an aware UTC time with microseconds,
/// `2026-11-26T03:59:48.120000+00:00`, read without chrono's general
/// parser. Anything else (no fraction, other digits, `Z`, another offset,
/// a leap second, a date that does not exist) is `None`, for that parser.
fn parse_isoformat_utc(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() != 32 || &b[26..] != b"+00:00" {
        return None;
    }
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ];
    if separators.iter().any(|&(at, c)| b[at] != c) {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let date =
        chrono::NaiveDate::from_ymd_opt(number(0, 4)? as i32, number(5, 7)?, number(8, 10)?)?;
    // `and_hms_micro_opt` would take a second of 60 as a leap second.
    let second = number(17, 19)?;
    if second > 59 {
        return None;
    }
    let time = date.and_hms_micro_opt(number(11, 13)?, number(14, 16)?, second, number(20, 26)?)?;
    Some(time.and_utc())
}

/// An instant as Python's `isoformat()` renders an aware UTC datetime:
/// microseconds only when non-zero, always six digits.
pub fn render_timestamp(t: &DateTime<Utc>) -> String {
    let mut text = String::with_capacity(32);
    write_timestamp(&mut text, t);
    text
}

/// [`render_timestamp`] as a stored JSON text: quoted, as it is (nothing
/// in it needs an escape).
pub fn stored_timestamp(t: &DateTime<Utc>) -> Box<str> {
    Box::from(&*stored_timestamp_in(t, &mut [0; 34]))
}

/// [`stored_timestamp`] written into `buf` (no allocation) when the year
/// has four digits and the second is no leap second, as nearly always.
pub fn stored_timestamp_in<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; 34]) -> Cow<'b, str> {
    buf[0] = b'"';
    match timestamp_digits(t, (&mut buf[1..33]).try_into().expect("32 bytes")) {
        Some(len) => {
            buf[1 + len] = b'"';
            Cow::Borrowed(std::str::from_utf8(&buf[..len + 2]).expect("ASCII"))
        }
        None => Cow::Owned(format!("\"{}\"", render_timestamp(t))),
    }
}

/// Python's `isoformat()` of `t` written into `buf`, with its length, for
/// a four-digit year and a second that is no leap second; `None` (nothing
/// written) otherwise.
fn timestamp_digits(t: &DateTime<Utc>, buf: &mut [u8; 32]) -> Option<usize> {
    use chrono::Datelike;
    // Four-digit years by hand: chrono's strftime parses its format string
    // on every call, and the stabilize reducer renders a time for most
    // events it folds. The fields are read off the naive date and time
    // once (each accessor of a `DateTime` works out the local time again).
    let (date, time) = (t.date_naive(), t.time());
    if !(0..=9999).contains(&date.year()) || time.nanosecond() >= 1_000_000_000 {
        return None;
    }
    let micros = time.nanosecond() / 1000;
    let seconds = time.num_seconds_from_midnight();
    // Every digit written into its place in one buffer (pushed field by
    // field, each through a checked conversion, a time cost about 650
    // instructions more).
    *buf = *b"0000-00-00T00:00:00.000000+00:00";
    put_digits(&mut buf[0..4], date.year() as u32);
    put_digits(&mut buf[5..7], date.month());
    put_digits(&mut buf[8..10], date.day());
    put_digits(&mut buf[11..13], seconds / 3600);
    put_digits(&mut buf[14..16], seconds / 60 % 60);
    put_digits(&mut buf[17..19], seconds % 60);
    Some(if micros != 0 {
        put_digits(&mut buf[20..26], micros);
        buf.len()
    } else {
        buf.copy_within(26.., 19);
        25
    })
}

/// [`render_timestamp`] onto `text`.
fn write_timestamp(text: &mut String, t: &DateTime<Utc>) {
    let mut buf = [0u8; 32];
    if let Some(len) = timestamp_digits(t, &mut buf) {
        text.push_str(std::str::from_utf8(&buf[..len]).expect("ASCII digits"));
        return;
    }
    // Years beyond four digits and leap seconds: chrono's way.
    let micros = t.time().nanosecond() / 1000;
    use std::fmt::Write;
    let written = if micros == 0 {
        write!(text, "{}", t.format("%Y-%m-%dT%H:%M:%S+00:00"))
    } else {
        write!(text, "{}.{micros:06}+00:00", t.format("%Y-%m-%dT%H:%M:%S"))
    };
    written.expect("writing to a String");
}

/// `n` in decimal digits filling `out`, zero-padded (`n` fits).
fn put_digits(out: &mut [u8], mut n: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn isoformat_utc_times_read_as_chrono_reads_them() {
        use super::parse_isoformat_utc;
        use chrono::{DateTime, TimeZone, Utc};
        let chrono_way = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        };
        let mut micros: i64 = -62_135_596_800_000_000; // 0001-01-01
        let step = 7_919_000_003_i64;
        let mut read = 0;
        while micros < 253_402_300_799_000_000 {
            let t = Utc.timestamp_micros(micros).unwrap();
            let text = format!("{}+00:00", t.format("%Y-%m-%dT%H:%M:%S%.6f"));
            assert_eq!(parse_isoformat_utc(&text), Some(t), "{text}");
            assert_eq!(parse_isoformat_utc(&text), chrono_way(&text), "{text}");
            read += 1;
            micros += step * 997;
        }
        assert!(read > 1000);
        // Left to chrono: other forms, and dates or times that do not exist.
        for text in [
            "2026-11-26T03:59:48.120000Z",
            "2026-11-26T03:59:48+00:00",
            "2026-11-26T03:59:48.1200000+00:00",
            "2026-11-26T03:59:48.120000+01:00",
            "2026-11-26 03:59:48.120000+00:00",
            "2026-11-26T23:59:60.000000+00:00",
            "2026-02-29T00:00:00.000000+00:00",
            "2026-13-01T00:00:00.000000+00:00",
            "2026-11-26T24:00:00.000000+00:00",
            "2026-11-26T03:60:00.000000+00:00",
            "2026-11-2bT03:59:48.120000+00:00",
            "+026-11-26T03:59:48.120000+00:00",
            "2026-11-26T03:59:48.12000a+00:00",
        ] {
            assert_eq!(parse_isoformat_utc(text), None, "{text}");
        }
        assert_eq!(
            parse_isoformat_utc("2024-02-29T23:59:59.999999+00:00"),
            chrono_way("2024-02-29T23:59:59.999999+00:00")
        );
    }

    #[test]
    fn a_stored_timestamp_is_the_rendered_one_quoted() {
        use super::{render_timestamp, stored_timestamp, stored_timestamp_in};
        use chrono::{TimeZone, Utc};
        for (t, in_buffer) in [
            (Utc.timestamp_micros(1_764_115_200_000_001).unwrap(), true),
            (Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap(), true),
            (
                Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
                true,
            ),
            (Utc.with_ymd_and_hms(12026, 1, 1, 0, 0, 0).unwrap(), false),
        ] {
            let quoted = format!("\"{}\"", render_timestamp(&t));
            assert_eq!(&*stored_timestamp(&t), quoted);
            let mut buf = [0u8; 34];
            let written = stored_timestamp_in(&t, &mut buf);
            assert_eq!(written, quoted);
            assert_eq!(matches!(written, Cow::Borrowed(_)), in_buffer, "{quoted}");
        }
    }

    #[test]
    fn timestamps_render_as_chrono_formats_them() {
        use super::render_timestamp;
        use chrono::{DateTime, TimeZone, Utc};
        let chrono_way = |t: &DateTime<Utc>| {
            let micros = t.timestamp_subsec_micros();
            if micros == 0 {
                t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
            } else {
                format!("{}.{micros:06}+00:00", t.format("%Y-%m-%dT%H:%M:%S"))
            }
        };
        let mut micros: i64 = -62_135_596_800_000_000; // 0001-01-01
        let step = 7_919_000_003_i64; // ~2 hours and a few microseconds
        while micros < 253_402_300_799_000_000 {
            let t = Utc.timestamp_micros(micros).unwrap();
            assert_eq!(render_timestamp(&t), chrono_way(&t), "{micros}");
            micros += step * 997;
        }
        for t in [
            Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap(),
            Utc.timestamp_micros(1_764_115_200_000_001).unwrap(),
            Utc.timestamp_micros(1_764_115_200_999_999).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
        ] {
            assert_eq!(render_timestamp(&t), chrono_way(&t));
        }
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        use super::check_depth;
        let deep = |line: &str, max| check_depth(line.as_bytes(), max).is_err();
        assert!(!deep(r#"{"a": "[[[[{{{{"}"#, 1));
        assert!(!deep(r#"{"a": "\"[[[[", "b": 1}"#, 1), "escaped quote");
        assert!(
            deep(r#"{"a": "\\", "b": [[1]]}"#, 2),
            "escaped backslash ends the string"
        );
        assert!(!deep(r#"{"a": [1], "b": [2]}"#, 2));
        assert!(deep(r#"{"a": [{"b": 1}]}"#, 2));
        assert!(!deep(r#"{"a": "unterminated [[[["#, 1));
        assert!(!deep(r#"{"a": "ends in a backslash \"#, 1));
        assert!(!deep("", 1));
    }

    use super::*;
    use serde_json::{Map, Value};

    const LIMITS: Limits = Limits {
        max_depth: 64,
        numbers: NumberForm::Jsonb,
    };

    /// A stabilize event line; `patch` (a JSON object's inner text) replaces
    /// or adds keys.
    fn event_line(patch: &str) -> String {
        let mut event: Map<String, Value> = serde_json::from_str(
            r#"{"event_id":"01J","event_type":"workflow.started","timestamp":"2026-11-26T03:59:48.12+00:00","sequence":7,"entity_type":"workflow","entity_id":"w1","workflow_id":"w1","version":1,"data":{"context":{"x":1e-7}},"metadata":{"actor":"system"}}"#,
        )
        .unwrap();
        let patch: Map<String, Value> =
            serde_json::from_str(&format!("{{{}}}", patch.trim_start_matches(','))).unwrap();
        event.extend(patch);
        serde_json::to_string(&event).unwrap()
    }

    #[test]
    fn a_lone_surrogate_in_data_is_malformed_json_named_as_such() {
        // The envelope's parser lets it pass; reading `data` into stored
        // texts refuses the frame as malformed, with serde_json's reason.
        let line = r#"{"event_type":"workflow.started","timestamp":"2026-11-26T03:59:48.12+00:00","sequence":7,"entity_type":"workflow","entity_id":"w1","workflow_id":"w1","data":{"s":"\ud800"}}"#;
        match decode(line.as_bytes(), LIMITS) {
            Err(DecodeError::Malformed(reason)) => {
                assert!(reason.contains("hex escape"), "{reason}")
            }
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn stabilize_lines_are_read_in_one_pass_and_the_rest_left_to_the_reference() {
        // As stabilize writes them (json.dumps: ", " and ": ", nulls in
        // metadata), compact, and with fields of every optional form.
        let stabilize = r#"{"event_id": "01J", "event_type": "task.completed", "timestamp": "2026-11-26T03:00:00.089495+00:00", "sequence": 50, "entity_type": "task", "entity_id": "t1", "workflow_id": "w1", "version": 2, "data": {"status": "SUCCEEDED", "outputs": {"b": 1, "a": [null, 1.5]}}, "metadata": {"correlation_id": "w1", "causation_id": null, "actor": "system"}, "schema_version": 1}"#;
        let taken = [
            stabilize.to_string(),
            event_line(""),
            event_line(r#","event_id":null,"version":null,"metadata":null,"data":null"#),
            event_line(r#","schema_version":null,"snapshot":true,"other":[{"x":1}]"#),
        ];
        for line in &taken {
            let event = decode_in_one_pass(line, LIMITS).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(
                Ok(Frame::Event(event)),
                decode_reference(line.as_bytes(), LIMITS),
                "{line}"
            );
        }
        // A workflow's own event shares one id.
        let Some(e) = decode_in_one_pass(&taken[1], LIMITS) else {
            panic!()
        };
        assert!(Arc::ptr_eq(&e.entity_id, &e.workflow_id));
        // Escapes, other kinds of value, refusals, twice-given keys and
        // commands are the reference's to decide.
        let mut left: Vec<String> = [
            r#","sequence":7.0"#,
            r#","sequence":0"#,
            r#","version":"1""#,
            r#","metadata":[]"#,
            r#","data":[]"#,
            r#","timestamp":"yesterday""#,
            r#","entity_type":"job""#,
            r#","event_type":"""#,
            r#","op":"ping""#,
        ]
        .into_iter()
        .map(event_line)
        .collect();
        // (event_line would write these escapes away.)
        left.push(stabilize.replace(r#""t1""#, r#""t\u0031""#));
        left.push(stabilize.replace(r#""01J""#, r#""\u0030""#));
        left.push(stabilize.replace(r#""version": 2"#, r#""version": 2, "version": null"#));
        for line in &left {
            assert!(decode_in_one_pass(line, LIMITS).is_none(), "{line}");
            assert_eq!(
                decode(line.as_bytes(), LIMITS),
                decode_reference(line.as_bytes(), LIMITS)
            );
        }
    }

    #[test]
    fn stabilizes_event_types_are_kept_static_and_others_as_given() {
        let line = |t: &str| {
            format!(
                r#"{{"event_type":"{t}","timestamp":"2026-11-26T03:59:48+00:00","sequence":1,"entity_type":"task","entity_id":"t1","workflow_id":"w1"}}"#
            )
        };
        for (text, known) in [
            ("task.completed", true),
            ("workflow.paused", true),
            ("unknown.event", true),
            ("task.complete", false),
            ("my.own_event", false),
        ] {
            for e in [
                decode(line(text).as_bytes(), LIMITS),
                decode_reference(line(text).as_bytes(), LIMITS),
            ] {
                let Ok(Frame::Event(e)) = e else {
                    panic!("{text}: not an event")
                };
                assert_eq!(&*e.event_type, text);
                assert_eq!(matches!(e.event_type, Cow::Borrowed(_)), known, "{text}");
            }
        }
    }

    #[test]
    fn escaped_envelope_strings_decode_like_plain_ones() {
        // Plain strings are borrowed from the line, escaped ones parsed.
        let line = r#"{"event_type":"workflow.st\u0061rted","timestamp":"2026-11-26T03:59:48.12+00:00","sequence":7,"entity_type":"work\u0066low","entity_id":"w\u0031","workflow_id":"w\u0031"}"#;
        let Frame::Event(e) = decode(line.as_bytes(), LIMITS).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(&*e.event_type, "workflow.started");
        assert_eq!(e.entity_type, EntityType::Workflow);
        assert_eq!((&*e.entity_id, &*e.workflow_id), ("w1", "w1"));
        let nul = event_line(r#","entity_id":"w\u0000""#);
        assert!(matches!(
            decode(nul.as_bytes(), LIMITS),
            Err(DecodeError::Invalid("entity_id", _))
        ));
    }

    #[test]
    fn a_stabilize_event_decodes_with_normalised_numbers() {
        let Frame::Event(e) = decode(event_line("").as_bytes(), LIMITS).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(e.sequence, 7);
        assert_eq!(e.entity_type, EntityType::Workflow);
        assert_eq!(e.data.get("context"), Some(r#"{"x":0.0000001}"#));
        assert_eq!(e.schema_version, 1);
        assert_eq!(
            render_timestamp(&e.timestamp),
            "2026-11-26T03:59:48.120000+00:00"
        );
    }

    #[test]
    fn timestamps_render_like_python_isoformat_in_utc() {
        let t = |s| render_timestamp(&parse_timestamp(s).unwrap());
        assert_eq!(t("2026-11-26T03:59:48Z"), "2026-11-26T03:59:48+00:00");
        assert_eq!(
            t("2026-11-26T05:29:48.5+05:30"),
            "2026-11-25T23:59:48.500000+00:00"
        );
        assert_eq!(t("2026-11-26T03:59:48"), "2026-11-26T03:59:48+00:00");
        assert_eq!(
            t("2026-11-26 03:59:48.000001"),
            "2026-11-26T03:59:48.000001+00:00"
        );
        assert_eq!(
            t("2026-11-26T03:59:48.0000015Z"),
            "2026-11-26T03:59:48.000002+00:00"
        );
        assert_eq!(
            t("2026-11-26T03:59:48.0000025Z"),
            "2026-11-26T03:59:48.000002+00:00"
        );
        assert!(parse_timestamp("yesterday").is_none());
    }

    #[test]
    fn a_time_that_rounds_past_the_last_instant_is_refused_not_a_panic() {
        // Found by fuzzing: rounding up to the microsecond overflowed.
        assert!(parse_timestamp("+262142-12-31T23:59:59.9999995").is_none());
        assert!(parse_timestamp("+262142-12-31T23:59:59.999999+00:00").is_some());
        let line = event_line(r#","timestamp":"+262142-12-31T23:59:59.9999995+00:00""#);
        let err = decode(line.as_bytes(), LIMITS).unwrap_err().to_string();
        assert!(err.contains("is not an ISO 8601 time"), "{err}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#"{"event_type":"x"}"#, "missing field `timestamp`"),
            (
                &event_line(r#","sequence":"7""#) as &str,
                "field `sequence` must be an integer",
            ),
            (
                &event_line(r#","sequence":0"#),
                "field `sequence` must be > 0",
            ),
            (
                &event_line(r#","entity_type":"job""#),
                "field `entity_type` must be workflow, stage or task",
            ),
            (
                &event_line(r#","workflow_id":"012345678901234567890123456""#),
                "field `workflow_id` is 27 characters",
            ),
            (
                &event_line(r#","data":[1]"#),
                "field `data` must be a JSON object",
            ),
            (&event_line(r#","data":{"s":"\u0000"}"#), "U+0000"),
            (
                &event_line(r#","timestamp":"soon""#),
                "field `timestamp` `soon` is not an ISO 8601 time",
            ),
            (r#"{"op":"dance"}"#, "unknown op `dance`"),
            (
                r#"{"op":"get","entity_type":"workflow"}"#,
                "missing field `entity_id`",
            ),
            ("[1,2]", "frame must be a JSON object"),
            ("{\"a\":", "malformed JSON"),
        ];
        for (line, expected) in cases {
            let err = decode(line.as_bytes(), LIMITS).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn an_envelope_field_given_twice_is_refused_as_ambiguous() {
        let line = event_line("").replace(r#""sequence":7"#, r#""sequence":7,"sequence":9"#);
        let err = decode(line.as_bytes(), LIMITS).unwrap_err().to_string();
        assert!(err.contains("duplicate field `sequence`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_carried_without_complaint() {
        let line = event_line(r#","correlation":{"deep":[1,2]},"extra":"x""#);
        assert!(matches!(
            decode(line.as_bytes(), LIMITS),
            Ok(Frame::Event(_))
        ));
    }

    #[test]
    fn nesting_beyond_the_limit_and_bad_utf8_are_refused() {
        let deep = format!("{}{}", "[".repeat(70), "]".repeat(70));
        assert_eq!(
            decode(deep.as_bytes(), LIMITS),
            Err(DecodeError::TooDeep(64))
        );
        let quoted = format!(r#"{{"op":"ping","x":"{}"}}"#, "[".repeat(70));
        assert_eq!(
            decode(quoted.as_bytes(), LIMITS),
            Ok(Frame::Command(Command::Ping))
        );
        assert_eq!(
            decode(b"{\"op\":\"\xff\"}", LIMITS),
            Err(DecodeError::InvalidUtf8(7))
        );
    }
}
