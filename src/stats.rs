//! Counters and gauges the daemon keeps, defined once: the `stats` command
//! reads them, and so will the Prometheus endpoint. Each happening that is
//! logged is counted by the same helper, so logs and numbers agree.

use serde_json::{Map, Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Names of the counters, as `stats` shows them.
pub mod names {
    pub const EVENTS_RECEIVED: &str = "events_received";
    pub const EVENTS_INVALID: &str = "events_invalid";
    pub const EVENTS_DUPLICATE: &str = "events_duplicate";
    pub const EVENTS_LATE: &str = "events_late";
    pub const SNAPSHOTS_WRITTEN: &str = "snapshots_written";
    pub const SNAPSHOTS_REJECTED: &str = "snapshots_rejected";
    pub const SNAPSHOTS_UNCOVERED: &str = "snapshots_uncovered";
    pub const WRITE_ERRORS: &str = "write_errors";
    pub const REBUILDS: &str = "rebuilds";
    pub const HYDRATIONS: &str = "hydrations";
    pub const ACTOR_RESTARTS: &str = "actor_restarts";
    pub const REPLIES_DROPPED: &str = "replies_dropped";
}

/// Shared by every part of the daemon.
#[derive(Debug)]
pub struct Stats {
    pub events_received: AtomicU64,
    pub events_invalid: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_late: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub snapshots_rejected: AtomicU64,
    pub snapshots_uncovered: AtomicU64,
    pub write_errors: AtomicU64,
    pub rebuilds: AtomicU64,
    pub hydrations: AtomicU64,
    pub actor_restarts: AtomicU64,
    pub replies_dropped: AtomicU64,
    /// Gauges.
    pub active_entities: AtomicI64,
    pub connections: AtomicI64,
    pub writer_pending: AtomicI64,
    pub store_up: AtomicI64,
    invalid_by_kind: Mutex<Map<String, Value>>,
    warn_limiter: Mutex<RateLimit>,
    started: Instant,
}

#[derive(Debug)]
struct RateLimit {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

/// Most rate-limited warnings logged per second.
const WARNINGS_PER_SECOND: u32 = 10;

impl Default for Stats {
    fn default() -> Self {
        Stats {
            events_received: AtomicU64::new(0),
            events_invalid: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            events_late: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshots_rejected: AtomicU64::new(0),
            snapshots_uncovered: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            hydrations: AtomicU64::new(0),
            actor_restarts: AtomicU64::new(0),
            replies_dropped: AtomicU64::new(0),
            active_entities: AtomicI64::new(0),
            connections: AtomicI64::new(0),
            writer_pending: AtomicI64::new(0),
            store_up: AtomicI64::new(1),
            invalid_by_kind: Mutex::new(Map::new()),
            warn_limiter: Mutex::new(RateLimit {
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
            started: Instant::now(),
        }
    }
}

impl Stats {
    /// A frame was refused: count it (by kind) and warn, rate limited.
    pub fn invalid_frame(&self, connection: u64, frame: u64, kind: &'static str, reason: &str) {
        self.events_invalid.fetch_add(1, Relaxed);
        if let Ok(mut by_kind) = self.invalid_by_kind.lock() {
            let n = by_kind.get(kind).and_then(Value::as_u64).unwrap_or(0);
            by_kind.insert(kind.to_string(), json!(n + 1));
        }
        if let Some(suppressed) = self.may_warn() {
            tracing::warn!(
                connection,
                frame,
                kind,
                reason,
                suppressed,
                "Frame refused."
            );
        }
    }

    /// `Some(suppressed since the last one)` when a rate-limited warning may
    /// be logged now.
    pub fn may_warn(&self) -> Option<u64> {
        let mut limit = self.warn_limiter.lock().ok()?;
        let now = Instant::now();
        if now.duration_since(limit.window_start) >= Duration::from_secs(1) {
            limit.window_start = now;
            limit.in_window = 0;
        }
        if limit.in_window < WARNINGS_PER_SECOND {
            limit.in_window += 1;
            Some(std::mem::take(&mut limit.suppressed))
        } else {
            limit.suppressed += 1;
            None
        }
    }

    /// Everything, for the `stats` command.
    pub fn to_json(&self) -> Value {
        let c = |a: &AtomicU64| a.load(Relaxed);
        let g = |a: &AtomicI64| a.load(Relaxed);
        json!({
            names::EVENTS_RECEIVED: c(&self.events_received),
            names::EVENTS_INVALID: c(&self.events_invalid),
            names::EVENTS_DUPLICATE: c(&self.events_duplicate),
            names::EVENTS_LATE: c(&self.events_late),
            names::SNAPSHOTS_WRITTEN: c(&self.snapshots_written),
            names::SNAPSHOTS_REJECTED: c(&self.snapshots_rejected),
            names::SNAPSHOTS_UNCOVERED: c(&self.snapshots_uncovered),
            names::WRITE_ERRORS: c(&self.write_errors),
            names::REBUILDS: c(&self.rebuilds),
            names::HYDRATIONS: c(&self.hydrations),
            names::ACTOR_RESTARTS: c(&self.actor_restarts),
            names::REPLIES_DROPPED: c(&self.replies_dropped),
            "invalid_by_kind": self.invalid_by_kind.lock().map(|m| Value::Object(m.clone())).unwrap_or_default(),
            "active_entities": g(&self.active_entities),
            "connections": g(&self.connections),
            "writer_pending": g(&self.writer_pending),
            "store_up": g(&self.store_up) == 1,
            "uptime_secs": self.started.elapsed().as_secs(),
        })
    }
}
