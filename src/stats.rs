//! Counters, gauges and histograms the daemon keeps, defined once and
//! registered for Prometheus (`metrics.address`, `GET /metrics`); the
//! `stats` command reads the same values. Each happening that is logged is
//! counted by the same helper, so logs and numbers agree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Metric names (Prometheus adds `_total` to counters), under the
/// `snapshotd_` prefix.
pub mod names {
    pub const PREFIX: &str = "snapshotd";
    pub const EVENTS_RECEIVED: &str = "events_received";
    pub const EVENTS_INVALID: &str = "events_invalid";
    pub const EVENTS_DUPLICATE: &str = "events_duplicate";
    pub const EVENTS_LATE: &str = "events_late";
    pub const EVENTS_REORDERED: &str = "events_reordered";
    pub const SNAPSHOTS_WRITTEN: &str = "snapshots_written";
    pub const SNAPSHOTS_REJECTED: &str = "snapshots_rejected";
    pub const SNAPSHOTS_TOO_LARGE: &str = "snapshots_too_large";
    pub const SNAPSHOTS_UNCOVERED: &str = "snapshots_uncovered";
    pub const WRITE_ERRORS: &str = "write_errors";
    pub const REBUILDS: &str = "rebuilds";
    pub const REFOLDS_IN_MEMORY: &str = "refolds_in_memory";
    pub const HYDRATIONS: &str = "hydrations";
    pub const ACTOR_RESTARTS: &str = "actor_restarts";
    pub const CONNECTIONS_UNREAD: &str = "connections_unread";
    pub const PASSIVATIONS_FOR_ROOM: &str = "passivations_for_room";
    pub const FEED_EVENTS: &str = "feed_events";
    pub const FEED_ERRORS: &str = "feed_errors";
    pub const FEED_CURSOR: &str = "feed_cursor_sequence";
    pub const FEED_BEHIND: &str = "feed_events_behind";
    pub const FEED_LAG: &str = "feed_lag_seconds";
    pub const FEED_DELAY: &str = "feed_delay_seconds";
    pub const ACTIVE_ENTITIES: &str = "active_entities";
    pub const CONNECTIONS: &str = "connections";
    pub const WRITER_PENDING: &str = "writer_pending";
    pub const STORE_UP: &str = "store_up";
    pub const WRITE_LATENCY: &str = "write_latency_seconds";
    pub const WRITE_BATCH: &str = "write_batch_size";
    pub const SNAPSHOT_LATENCY: &str = "snapshot_latency_seconds";
    pub const WRITER_PENDING_LIMIT: &str = "writer_pending_limit";
    pub const VERIFY_CHECKED: &str = "verify_checked";
    pub const VERIFY_MISMATCH: &str = "verify_mismatch";
    pub const BUILD_INFO: &str = "build_info";
    pub const EVENTS_NOT_OWNED: &str = "events_not_owned";
    pub const SNAPSHOTS_FENCED: &str = "snapshots_fenced";
    pub const PARTITIONS_OWNED: &str = "partitions_owned";
    pub const PARTITIONS_ACQUIRED: &str = "partitions_acquired";
    pub const PARTITIONS_RELEASED: &str = "partitions_released";
    pub const PARTITIONS_LOST: &str = "partitions_lost";
}

/// The `kind` label of refused frames.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The labels of `snapshotd_build_info` (always 1).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
    pub commit: &'static str,
}

/// The version and commit this binary was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("BUILT_FROM_COMMIT");

/// Shared by every part of the daemon.
#[derive(Debug)]
pub struct Stats {
    pub events_received: Counter,
    pub events_invalid: Family<KindLabel, Counter>,
    pub events_duplicate: Counter,
    pub events_late: Counter,
    pub events_reordered: Counter,
    pub snapshots_written: Counter,
    pub snapshots_rejected: Counter,
    pub snapshots_too_large: Counter,
    pub snapshots_uncovered: Counter,
    pub write_errors: Counter,
    pub rebuilds: Counter,
    pub refolds_in_memory: Counter,
    pub hydrations: Counter,
    pub actor_restarts: Counter,
    pub connections_unread: Counter,
    pub passivations_for_room: Counter,
    pub feed_events: Counter,
    pub feed_errors: Counter,
    /// Snapshot rows the background scrub rebuilt from the events table.
    pub verify_checked: Counter,
    /// Rows the scrub found different from their rebuild.
    pub verify_mismatch: Counter,
    /// Cluster: socket events of partitions this node does not own (their
    /// owner reads them from the events table).
    pub events_not_owned: Counter,
    /// Cluster: snapshots not written because their lease was gone.
    pub snapshots_fenced: Counter,
    /// Cluster: leases taken, handed over, and lost to another node.
    pub partitions_acquired: Counter,
    pub partitions_released: Counter,
    pub partitions_lost: Counter,
    /// Cluster: partitions owned now.
    pub partitions_owned: Gauge,
    /// Sequence of the last event the table feed read (0: not following).
    pub feed_cursor: Gauge,
    /// Sequences between the table's newest event and the feed's cursor.
    pub feed_behind: Gauge,
    /// Age of the oldest event the feed has not read yet, when it last
    /// looked (0 when caught up).
    pub feed_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Per event: from its timestamp (stabilize records it just before the
    /// commit) to the moment the feed hands it over.
    pub feed_delay: Histogram,
    pub active_entities: Gauge,
    pub connections: Gauge,
    pub writer_pending: Gauge,
    /// `writer.max_pending`: the bound `writer_pending` stops at.
    pub writer_pending_limit: Gauge,
    pub store_up: Gauge,
    pub write_latency: Histogram,
    pub write_batch: Histogram,
    /// From a snapshot falling due to its commit (Prometheus).
    pub snapshot_latency: Histogram,
    /// The same, for the quantiles `stats` reports.
    pub snapshot_latencies: Latencies,
    /// Batch commit times, for the quantiles `stats` reports.
    pub write_latencies: Latencies,
    registry: Registry,
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

/// Every kind of refused frame, so `stats` can list them.
const INVALID_KINDS: &[&str] = &[
    "invalid_utf8",
    "oversized",
    "too_deep",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "invalid_field",
    "unknown_op",
];

impl Default for Stats {
    fn default() -> Self {
        let stats = Stats {
            events_received: Counter::default(),
            events_invalid: Family::default(),
            events_duplicate: Counter::default(),
            events_late: Counter::default(),
            events_reordered: Counter::default(),
            snapshots_written: Counter::default(),
            snapshots_rejected: Counter::default(),
            snapshots_too_large: Counter::default(),
            snapshots_uncovered: Counter::default(),
            write_errors: Counter::default(),
            rebuilds: Counter::default(),
            refolds_in_memory: Counter::default(),
            hydrations: Counter::default(),
            actor_restarts: Counter::default(),
            connections_unread: Counter::default(),
            passivations_for_room: Counter::default(),
            feed_events: Counter::default(),
            feed_errors: Counter::default(),
            feed_cursor: Gauge::default(),
            feed_behind: Gauge::default(),
            feed_lag: Gauge::default(),
            feed_delay: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            active_entities: Gauge::default(),
            connections: Gauge::default(),
            writer_pending: Gauge::default(),
            writer_pending_limit: Gauge::default(),
            verify_checked: Counter::default(),
            verify_mismatch: Counter::default(),
            events_not_owned: Counter::default(),
            snapshots_fenced: Counter::default(),
            partitions_acquired: Counter::default(),
            partitions_released: Counter::default(),
            partitions_lost: Counter::default(),
            partitions_owned: Gauge::default(),
            store_up: Gauge::default(),
            write_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            write_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            snapshot_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            snapshot_latencies: Latencies::default(),
            write_latencies: Latencies::default(),
            registry: Registry::with_prefix(names::PREFIX),
            warn_limiter: Mutex::new(RateLimit {
                window_start: Instant::now(),
                in_window: 0,
                suppressed: 0,
            }),
            started: Instant::now(),
        };
        stats.store_up.set(1);
        stats
    }
}

impl Stats {
    /// The stats, registered for Prometheus.
    pub fn new() -> Self {
        let mut stats = Stats::default();
        let r = &mut stats.registry;
        use names::*;
        let counters: [(&str, &str, &Counter); 24] = [
            (
                EVENTS_NOT_OWNED,
                "Socket events of partitions another node owns (not folded here; the owner reads the events table).",
                &stats.events_not_owned,
            ),
            (
                SNAPSHOTS_FENCED,
                "Snapshots not written because this node no longer held their partition's lease.",
                &stats.snapshots_fenced,
            ),
            (
                PARTITIONS_ACQUIRED,
                "Partition leases taken.",
                &stats.partitions_acquired,
            ),
            (
                PARTITIONS_RELEASED,
                "Partitions handed over to other nodes.",
                &stats.partitions_released,
            ),
            (
                PARTITIONS_LOST,
                "Partition leases lost (another node took them, or they could not be renewed).",
                &stats.partitions_lost,
            ),
            (
                VERIFY_CHECKED,
                "Snapshot rows the background scrub rebuilt from the events table and compared.",
                &stats.verify_checked,
            ),
            (
                VERIFY_MISMATCH,
                "Snapshot rows whose state differs from the events table's replay (scrub).",
                &stats.verify_mismatch,
            ),
            (
                SNAPSHOTS_TOO_LARGE,
                "Snapshots not written: state larger than policy.max_state_bytes (retried later).",
                &stats.snapshots_too_large,
            ),
            (
                FEED_EVENTS,
                "Events read from stabilize's events table.",
                &stats.feed_events,
            ),
            (
                FEED_ERRORS,
                "Failed reads of the events table (retried).",
                &stats.feed_errors,
            ),
            (
                EVENTS_RECEIVED,
                "Events decoded from the socket.",
                &stats.events_received,
            ),
            (
                EVENTS_DUPLICATE,
                "Events dropped as already folded.",
                &stats.events_duplicate,
            ),
            (
                EVENTS_LATE,
                "Events below a sequence already folded (settled or folded late).",
                &stats.events_late,
            ),
            (
                EVENTS_REORDERED,
                "Events that came after a higher sequence on their connection \
                 (put back in order there when within socket.reorder_window).",
                &stats.events_reordered,
            ),
            (
                SNAPSHOTS_WRITTEN,
                "Snapshot rows inserted or updated.",
                &stats.snapshots_written,
            ),
            (
                SNAPSHOTS_REJECTED,
                "Snapshots refused (by the store or unstorable).",
                &stats.snapshots_rejected,
            ),
            (
                SNAPSHOTS_UNCOVERED,
                "Snapshots the events table contradicted (rebuilt).",
                &stats.snapshots_uncovered,
            ),
            (
                WRITE_ERRORS,
                "Failed snapshot batch writes (retried).",
                &stats.write_errors,
            ),
            (
                REBUILDS,
                "Entity states rebuilt from the events table.",
                &stats.rebuilds,
            ),
            (
                REFOLDS_IN_MEMORY,
                "Windows with out-of-order events re-folded in sequence order from the events kept in memory (the table only confirmed their sequences).",
                &stats.refolds_in_memory,
            ),
            (
                HYDRATIONS,
                "Entity actors started from stored history.",
                &stats.hydrations,
            ),
            (
                ACTOR_RESTARTS,
                "Policy actors restarted after a failure.",
                &stats.actor_restarts,
            ),
            (
                CONNECTIONS_UNREAD,
                "Connections closed because their producer read none of its replies in time.",
                &stats.connections_unread,
            ),
            (
                PASSIVATIONS_FOR_ROOM,
                "Entity actors passivated to stay within policy.max_active_entities.",
                &stats.passivations_for_room,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        let build_info = Family::<BuildLabel, Gauge>::default();
        build_info
            .get_or_create(&BuildLabel {
                version: VERSION,
                commit: COMMIT,
            })
            .set(1);
        r.register(
            BUILD_INFO,
            "The version and commit of this binary (always 1).",
            build_info,
        );
        r.register(
            EVENTS_INVALID,
            "Frames refused, by kind.",
            stats.events_invalid.clone(),
        );
        r.register(
            FEED_DELAY,
            "Seconds from an event's timestamp to the table feed handing it over.",
            stats.feed_delay.clone(),
        );
        r.register(
            FEED_LAG,
            "Age in seconds of the oldest event the table feed has not read (0 when caught up).",
            stats.feed_lag.clone(),
        );
        let gauges: [(&str, &str, &Gauge); 8] = [
            (
                PARTITIONS_OWNED,
                "Cluster partitions this node owns.",
                &stats.partitions_owned,
            ),
            (
                WRITER_PENDING_LIMIT,
                "writer.max_pending: the most snapshots the writer holds before senders wait.",
                &stats.writer_pending_limit,
            ),
            (
                FEED_CURSOR,
                "Sequence of the last event the table feed read.",
                &stats.feed_cursor,
            ),
            (
                FEED_BEHIND,
                "Sequences between the events table's newest event and the feed's cursor.",
                &stats.feed_behind,
            ),
            (
                ACTIVE_ENTITIES,
                "Policy actors running.",
                &stats.active_entities,
            ),
            (
                CONNECTIONS,
                "Producer connections open.",
                &stats.connections,
            ),
            (
                WRITER_PENDING,
                "Snapshots waiting for the writer.",
                &stats.writer_pending,
            ),
            (
                STORE_UP,
                "1 while the store answers, 0 while it fails.",
                &stats.store_up,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        r.register(
            WRITE_LATENCY,
            "Time to commit one snapshot batch.",
            stats.write_latency.clone(),
        );
        r.register(
            WRITE_BATCH,
            "Snapshots per committed batch.",
            stats.write_batch.clone(),
        );
        r.register(
            SNAPSHOT_LATENCY,
            "From a snapshot falling due (threshold, flush, passivation) to its commit.",
            stats.snapshot_latency.clone(),
        );
        stats
    }

    /// A frame was refused: count it (by kind) and warn, rate limited.
    pub fn invalid_frame(&self, connection: u64, frame: u64, kind: &'static str, reason: &str) {
        self.events_invalid.get_or_create(&KindLabel { kind }).inc();
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

    /// A batch was committed in `took`.
    pub fn batch_written(&self, rows: u64, size: usize, took: Duration) {
        self.snapshots_written.inc_by(rows);
        self.write_latency.observe(took.as_secs_f64());
        self.write_latencies.observe(took);
        self.write_batch.observe(size as f64);
    }

    /// A snapshot that fell due `took` ago was committed.
    pub fn snapshot_committed(&self, took: Duration) {
        self.snapshot_latency.observe(took.as_secs_f64());
        self.snapshot_latencies.observe(took);
    }

    /// `Some(suppressed since the last one)` when a rate-limited warning may
    /// be logged now.
    fn may_warn(&self) -> Option<u64> {
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

    /// The Prometheus text exposition.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Everything, for the `stats` command.
    pub fn to_json(&self) -> Value {
        let mut by_kind = Map::new();
        let mut invalid = 0;
        for &kind in INVALID_KINDS {
            let n = self.events_invalid.get_or_create(&KindLabel { kind }).get();
            invalid += n;
            if n > 0 {
                by_kind.insert(kind.to_string(), json!(n));
            }
        }
        let mut all = json!({
            names::EVENTS_RECEIVED: self.events_received.get(),
            names::EVENTS_INVALID: invalid,
            names::EVENTS_DUPLICATE: self.events_duplicate.get(),
            names::EVENTS_LATE: self.events_late.get(),
            names::SNAPSHOTS_WRITTEN: self.snapshots_written.get(),
            names::SNAPSHOTS_REJECTED: self.snapshots_rejected.get(),
            names::SNAPSHOTS_TOO_LARGE: self.snapshots_too_large.get(),
            names::SNAPSHOTS_UNCOVERED: self.snapshots_uncovered.get(),
            names::WRITE_ERRORS: self.write_errors.get(),
            names::REBUILDS: self.rebuilds.get(),
            names::HYDRATIONS: self.hydrations.get(),
            names::ACTOR_RESTARTS: self.actor_restarts.get(),
            names::CONNECTIONS_UNREAD: self.connections_unread.get(),
            names::PASSIVATIONS_FOR_ROOM: self.passivations_for_room.get(),
            names::FEED_EVENTS: self.feed_events.get(),
            names::FEED_ERRORS: self.feed_errors.get(),
            names::FEED_CURSOR: self.feed_cursor.get(),
            names::FEED_BEHIND: self.feed_behind.get(),
            names::FEED_LAG: self.feed_lag.get(),
            "invalid_by_kind": by_kind,
            names::ACTIVE_ENTITIES: self.active_entities.get(),
            names::CONNECTIONS: self.connections.get(),
            names::WRITER_PENDING: self.writer_pending.get(),
            names::STORE_UP: self.store_up.get() == 1,
            "uptime_secs": self.started.elapsed().as_secs(),
        });
        // (json! stops at its recursion limit beyond this many keys.)
        let more = [
            (names::WRITER_PENDING_LIMIT, self.writer_pending_limit.get()),
            (names::EVENTS_REORDERED, self.events_reordered.get() as i64),
            (names::VERIFY_CHECKED, self.verify_checked.get() as i64),
            (names::VERIFY_MISMATCH, self.verify_mismatch.get() as i64),
            (
                names::REFOLDS_IN_MEMORY,
                self.refolds_in_memory.get() as i64,
            ),
            (names::EVENTS_NOT_OWNED, self.events_not_owned.get() as i64),
            (names::SNAPSHOTS_FENCED, self.snapshots_fenced.get() as i64),
            (names::PARTITIONS_OWNED, self.partitions_owned.get()),
            (
                names::PARTITIONS_ACQUIRED,
                self.partitions_acquired.get() as i64,
            ),
            (
                names::PARTITIONS_RELEASED,
                self.partitions_released.get() as i64,
            ),
            (names::PARTITIONS_LOST, self.partitions_lost.get() as i64),
        ];
        if let Some(map) = all.as_object_mut() {
            for (name, value) in more {
                map.insert(name.to_string(), json!(value));
            }
            map.insert("snapshot_latency".into(), self.snapshot_latencies.to_json());
            map.insert("batch_commit".into(), self.write_latencies.to_json());
        }
        all
    }
}

/// Buckets of [`Latencies`]: a quarter of an octave wide (19%) from 100 µs
/// up, the last one open (past 100 µs · 2^20, about 105 s).
const LATENCY_BUCKETS: usize = 81;

/// A latency distribution cheap to record from any thread, for quantiles
/// within 19% and the exact maximum.
#[derive(Debug)]
pub struct Latencies {
    buckets: Vec<std::sync::atomic::AtomicU64>,
    max_micros: std::sync::atomic::AtomicU64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: (0..LATENCY_BUCKETS).map(|_| Default::default()).collect(),
            max_micros: Default::default(),
        }
    }
}

impl Latencies {
    fn bucket(micros: u64) -> usize {
        if micros <= 100 {
            return 0;
        }
        let quarters = ((micros as f64 / 100.0).log2() * 4.0).ceil() as usize;
        quarters.min(LATENCY_BUCKETS - 1)
    }

    /// Upper bound of bucket `i`, in milliseconds.
    fn upper_ms(i: usize) -> f64 {
        0.1 * 2f64.powf(i as f64 / 4.0)
    }

    pub fn observe(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[Self::bucket(micros)].fetch_add(1, Relaxed);
        self.max_micros.fetch_max(micros, Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q`, in milliseconds
    /// (never above the maximum seen); `None` before any observation.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        let at = counts
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .unwrap_or(LATENCY_BUCKETS - 1);
        let max = self.max_ms();
        Some(if at == LATENCY_BUCKETS - 1 {
            max // the open bucket
        } else {
            Self::upper_ms(at).min(max)
        })
    }

    pub fn max_ms(&self) -> f64 {
        self.max_micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn count(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// `{count, p50_ms, p99_ms, max_ms}` (quantiles null before any).
    pub fn to_json(&self) -> Value {
        let ms = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "count": self.count(),
            "p50_ms": self.quantile_ms(0.5).map(ms),
            "p99_ms": self.quantile_ms(0.99).map(ms),
            "max_ms": ms(self.max_ms()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_bucket_bounds_within_a_fifth() {
        let latencies = Latencies::default();
        assert_eq!(latencies.quantile_ms(0.5), None);
        for ms in 1..=100 {
            latencies.observe(Duration::from_millis(ms));
        }
        let p50 = latencies.quantile_ms(0.5).unwrap();
        let p99 = latencies.quantile_ms(0.99).unwrap();
        assert!((50.0..=50.0 * 1.19).contains(&p50), "p50 {p50}");
        assert!((99.0..=100.0).contains(&p99), "p99 {p99}");
        assert_eq!(latencies.max_ms(), 100.0);
        assert_eq!(latencies.count(), 100);
        latencies.observe(Duration::from_secs(100_000));
        assert_eq!(latencies.quantile_ms(1.0), Some(100_000_000.0));
    }

    #[test]
    fn the_exposition_names_every_metric_with_the_prefix() {
        let stats = Stats::new();
        stats.events_received.inc_by(3);
        stats.invalid_frame(1, 2, "oversized", "too long");
        stats.batch_written(5, 5, Duration::from_millis(3));
        let text = stats.prometheus_text();
        for line in [
            "snapshotd_events_received_total 3",
            "snapshotd_events_invalid_total{kind=\"oversized\"} 1",
            "snapshotd_snapshots_written_total 5",
            "snapshotd_store_up 1",
            "snapshotd_write_latency_seconds_count 1",
            "snapshotd_write_batch_size_sum 5.0",
            &format!("snapshotd_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1"),
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert_eq!(stats.to_json()["events_invalid"], 1);
    }
}
