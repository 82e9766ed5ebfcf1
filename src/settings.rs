//! Typed settings, loaded in layers with the `config` crate: the documented
//! `config/default.toml` (built in), a file given with `--config`, then
//! `SNAPSHOTD_<SECTION>__<KEY>` environment variables. Validation reports
//! every bad or unknown key at once, each by name.

use crate::reducer::Reducer;
use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The documented defaults; also the list of every known key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub socket: SocketSettings,
    pub database: DatabaseSettings,
    pub feed: FeedSettings,
    pub policy: PolicySettings,
    pub reducer: ReducerSettings,
    pub writer: WriterSettings,
    pub shutdown: ShutdownSettings,
    pub verify: VerifySettings,
    pub cluster: ClusterSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketSettings {
    pub path: PathBuf,
    /// Octal text as configured, e.g. "0660".
    pub mode: String,
    pub group: String,
    pub max_frame_bytes: usize,
    pub max_depth: usize,
    pub max_connections: usize,
    pub max_inflight_events: usize,
    pub reply_buffer_bytes: usize,
    pub reply_timeout_secs: u64,
    pub reorder_window: usize,
    pub reorder_wait_ms: u64,
}

impl SocketSettings {
    /// The mode as permission bits (validated at load).
    pub fn mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.mode, 8).expect("validated at load")
    }
    pub fn reply_timeout(&self) -> Duration {
        Duration::from_secs(self.reply_timeout_secs)
    }
    pub fn reorder_wait(&self) -> Duration {
        Duration::from_millis(self.reorder_wait_ms)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: u32,
    pub events_table: EventsTable,
}

/// Whether stabilize's `events` table is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsTable {
    Auto,
    Off,
}

/// Following stabilize's `events` table as a durable feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedSettings {
    pub table: EventsTable,
    pub poll_interval_ms: u64,
    pub max_poll_interval_ms: u64,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicySettings {
    pub event_interval: u64,
    pub time_interval_secs: u64,
    pub keep_snapshots: u32,
    pub idle_timeout_secs: u64,
    pub max_active_entities: usize,
    pub max_state_bytes: usize,
}

impl PolicySettings {
    pub fn time_interval(&self) -> Duration {
        Duration::from_secs(self.time_interval_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReducerSettings {
    pub kind: ReducerKind,
}

/// Which reducer folds events into state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReducerKind {
    Stabilize,
    Merge,
}

// Here rather than beside `Reducer`: the pure domain (model, reducer) names
// nothing of the daemon, so it also builds alone (fuzz/ compiles it so).
impl From<ReducerKind> for Reducer {
    fn from(kind: ReducerKind) -> Self {
        match kind {
            ReducerKind::Stabilize => Reducer::Stabilize,
            ReducerKind::Merge => Reducer::Merge,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WriterSettings {
    pub batch_size: usize,
    pub batch_delay_ms: u64,
    pub max_pending: usize,
    pub retry_max_secs: u64,
    pub connections: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShutdownSettings {
    pub grace_secs: u64,
    pub snapshot_on_shutdown: bool,
}

/// `[cluster]`: several daemons on one PostgreSQL database.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSettings {
    pub enabled: bool,
    pub partitions: u32,
    /// Empty: generated at start.
    pub node_id: String,
    pub failover_secs: u64,
    pub handover_secs: u64,
    pub write_log: bool,
}

/// `[verify]`: the background scrub.
#[derive(Debug, Clone, Serialize)]
pub struct VerifySettings {
    /// Seconds between scrub rounds; 0: off.
    pub interval_secs: u64,
    /// Fraction of snapshotted workflows a round checks.
    pub sample: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricsSettings {
    /// Empty turns the endpoint off.
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Every problem found in the configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Where settings come from, besides the defaults and the environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// Command-line overrides, e.g. `("database.url", url)`; they win over all.
    pub overrides: Vec<(String, String)>,
}

impl Settings {
    /// Load and validate from the defaults, `sources` and the environment.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = &sources.file {
            if !file.exists() {
                return Err(ConfigError {
                    problems: vec![format!("config file {} does not exist", file.display())],
                });
            }
            builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix("SNAPSHOTD")
                .prefix_separator("_")
                .separator("__"),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| ConfigError {
                    problems: vec![format!("{key}: {e}")],
                })?;
        }
        let config = builder.build().map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        Self::from_config(&config)
    }

    /// Load the built-in defaults only (tests, `config` without a file).
    pub fn defaults() -> Settings {
        let config = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()
            .expect("the built-in defaults parse");
        Self::from_config(&config).expect("the built-in defaults are valid")
    }

    fn from_config(config: &Config) -> Result<Settings, ConfigError> {
        let mut c = Checker {
            config,
            problems: Vec::new(),
        };
        c.unknown_keys();

        let mode: String = c.get("socket.mode");
        if u32::from_str_radix(&mode, 8).map_or(true, |m| m > 0o777) {
            c.problem(
                "socket.mode",
                format!("`{mode}` is not an octal file mode like \"0660\""),
            );
        }
        let socket = SocketSettings {
            path: c.get::<String>("socket.path").into(),
            mode,
            group: c.get("socket.group"),
            max_frame_bytes: c.positive("socket.max_frame_bytes"),
            max_depth: c.positive("socket.max_depth"),
            max_connections: c.positive("socket.max_connections"),
            max_inflight_events: c.positive("socket.max_inflight_events"),
            reply_buffer_bytes: c.positive("socket.reply_buffer_bytes"),
            reply_timeout_secs: c.positive("socket.reply_timeout_secs"),
            reorder_window: c.get("socket.reorder_window"),
            reorder_wait_ms: c.positive("socket.reorder_wait_ms"),
        };
        if socket.path.as_os_str().is_empty() {
            c.problem("socket.path", "must not be empty".into());
        }
        if socket.reorder_window > socket.max_inflight_events {
            c.problem(
                "socket.reorder_window",
                format!(
                    "{} is above socket.max_inflight_events ({}): held events count as in flight",
                    socket.reorder_window, socket.max_inflight_events
                ),
            );
        }

        let url: String = c.get("database.url");
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            c.problem(
                "database.url",
                format!(
                    "`{}` is neither sqlite://PATH nor postgres://...",
                    crate::store::redact(&url)
                ),
            );
        }
        let database = DatabaseSettings {
            url,
            pool_size: c.positive("database.pool_size"),
            events_table: c.choice(
                "database.events_table",
                "\"auto\" or \"off\"",
                EventsTable::Auto,
            ),
        };
        let feed = FeedSettings {
            table: c.choice("feed.table", "\"auto\" or \"off\"", EventsTable::Auto),
            poll_interval_ms: c.positive("feed.poll_interval_ms"),
            max_poll_interval_ms: c.positive("feed.max_poll_interval_ms"),
            batch_size: c.positive("feed.batch_size"),
        };
        if feed.max_poll_interval_ms < feed.poll_interval_ms {
            c.problem(
                "feed.max_poll_interval_ms",
                format!(
                    "{} is below feed.poll_interval_ms ({})",
                    feed.max_poll_interval_ms, feed.poll_interval_ms
                ),
            );
        }
        let policy = PolicySettings {
            event_interval: c.positive("policy.event_interval"),
            time_interval_secs: c.positive("policy.time_interval_secs"),
            keep_snapshots: c.get("policy.keep_snapshots"),
            idle_timeout_secs: c.positive("policy.idle_timeout_secs"),
            max_active_entities: c.positive("policy.max_active_entities"),
            max_state_bytes: c.positive("policy.max_state_bytes"),
        };
        let reducer = ReducerSettings {
            kind: c.choice(
                "reducer.kind",
                "\"stabilize\" or \"merge\"",
                ReducerKind::Stabilize,
            ),
        };
        let writer = WriterSettings {
            batch_size: c.positive("writer.batch_size"),
            batch_delay_ms: c.get("writer.batch_delay_ms"),
            max_pending: c.positive("writer.max_pending"),
            retry_max_secs: c.positive("writer.retry_max_secs"),
            connections: c.positive("writer.connections"),
        };
        let shutdown = ShutdownSettings {
            grace_secs: c.positive("shutdown.grace_secs"),
            snapshot_on_shutdown: c.get("shutdown.snapshot_on_shutdown"),
        };
        let verify = VerifySettings {
            interval_secs: c.get("verify.interval_secs"),
            sample: c.get("verify.sample"),
        };
        if !(verify.sample > 0.0 && verify.sample <= 1.0) {
            c.problem(
                "verify.sample",
                format!("{} is not a fraction in (0, 1]", verify.sample),
            );
        }
        let cluster = ClusterSettings {
            enabled: c.get("cluster.enabled"),
            partitions: c.positive("cluster.partitions"),
            node_id: c.get("cluster.node_id"),
            failover_secs: c.positive("cluster.failover_secs"),
            handover_secs: c.positive("cluster.handover_secs"),
            write_log: c.get("cluster.write_log"),
        };
        if cluster.enabled {
            if !database.url.starts_with("postgres") {
                c.problem(
                    "cluster.enabled",
                    "needs PostgreSQL (database.url = \"postgres://...\"): the daemons \
                     coordinate through it"
                        .into(),
                );
            }
            if reducer.kind != ReducerKind::Stabilize {
                c.problem(
                    "cluster.enabled",
                    "needs reducer.kind = \"stabilize\": partitions are workflows".into(),
                );
            }
            if database.events_table == EventsTable::Off || feed.table == EventsTable::Off {
                c.problem(
                    "cluster.enabled",
                    "needs the table feed (database.events_table and feed.table \"auto\"): \
                     each node reads its partitions' events from stabilize's events table"
                        .into(),
                );
            }
            if cluster.failover_secs < 3 {
                c.problem(
                    "cluster.failover_secs",
                    format!("{} is below 3 seconds", cluster.failover_secs),
                );
            }
        }
        if cluster.partitions > 100_000 {
            c.problem(
                "cluster.partitions",
                format!("{} is more than 100000", cluster.partitions),
            );
        }
        if cluster.node_id.len() > 200 {
            c.problem("cluster.node_id", "is longer than 200 bytes".into());
        }
        let address: String = c.get("metrics.address");
        if !address.is_empty() && address.parse::<std::net::SocketAddr>().is_err() {
            c.problem(
                "metrics.address",
                format!("`{address}` is not HOST:PORT (empty turns metrics off)"),
            );
        }
        let metrics = MetricsSettings { address };
        let level: String = c.get("log.level");
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            c.problem(
                "log.level",
                format!("`{level}` is not a log level or filter"),
            );
        }
        let log = LogSettings {
            level,
            format: c.choice("log.format", "\"plain\" or \"json\"", LogFormat::Plain),
        };

        if c.problems.is_empty() {
            Ok(Settings {
                socket,
                database,
                feed,
                policy,
                reducer,
                writer,
                shutdown,
                verify,
                cluster,
                metrics,
                log,
            })
        } else {
            Err(ConfigError {
                problems: c.problems,
            })
        }
    }

    /// The effective configuration as TOML, for `snapshotd config`; the
    /// database password is redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = crate::store::redact(&shown.database.url);
        toml::to_string(&shown).expect("settings serialise to TOML")
    }
}

/// Reads keys one by one, collecting every problem instead of stopping.
struct Checker<'a> {
    config: &'a Config,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn problem(&mut self, key: &str, why: String) {
        self.problems.push(format!("{key}: {why}"));
    }

    fn get<T: serde::de::DeserializeOwned + Default>(&mut self, key: &str) -> T {
        match self.config.get::<T>(key) {
            Ok(value) => value,
            Err(e) => {
                let text = e.to_string();
                // The config crate names the key itself in most messages.
                let why = text.split(" for key").next().unwrap_or(&text).to_string();
                self.problem(key, why);
                T::default()
            }
        }
    }

    fn positive<T>(&mut self, key: &str) -> T
    where
        T: serde::de::DeserializeOwned + Default + PartialEq + fmt::Display,
    {
        let value: T = self.get(key);
        if value == T::default() && self.config.get::<T>(key).is_ok() {
            self.problem(key, "must be greater than 0".into());
        }
        value
    }

    fn choice<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        expected: &str,
        fallback: T,
    ) -> T {
        match self.config.get::<String>(key) {
            Ok(text) => {
                match serde_json::from_value::<T>(serde_json::Value::String(text.clone())) {
                    Ok(value) => value,
                    Err(_) => {
                        self.problem(key, format!("`{text}` is not one of {expected}"));
                        fallback
                    }
                }
            }
            Err(e) => {
                self.problem(key, e.to_string());
                fallback
            }
        }
    }

    /// Keys given that the defaults do not know (typos, stray variables).
    fn unknown_keys(&mut self) {
        let known: toml::Table = DEFAULT_TOML.parse().expect("the built-in defaults parse");
        let Ok(given) = self.config.clone().try_deserialize::<toml::Table>() else {
            return;
        };
        for (section, value) in &given {
            let Some(known_section) = known.get(section).and_then(|v| v.as_table()) else {
                self.problems.push(format!("{section}: unknown section"));
                continue;
            };
            if let Some(table) = value.as_table() {
                for key in table.keys() {
                    if !known_section.contains_key(key) {
                        self.problems.push(format!("{section}.{key}: unknown key"));
                    }
                }
            } else {
                self.problems
                    .push(format!("{section}: must be a table of keys, not a value"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_defaults_match_the_spec() {
        let s = Settings::defaults();
        assert_eq!(s.socket.path, PathBuf::from("./snapshotd.sock"));
        assert_eq!(s.socket.mode_bits(), 0o660);
        assert_eq!(s.socket.max_frame_bytes, 1_048_576);
        assert_eq!(s.database.url, "sqlite://./data/snapshots.db");
        assert_eq!(s.policy.event_interval, 100);
        assert_eq!(s.policy.time_interval_secs, 3600);
        assert_eq!(s.policy.keep_snapshots, 3);
        assert_eq!(s.policy.idle_timeout_secs, 600);
        assert_eq!(s.policy.max_active_entities, 100_000);
        assert_eq!(s.policy.max_state_bytes, 16 * 1024 * 1024);
        assert_eq!(s.socket.reply_buffer_bytes, 1_048_576);
        assert_eq!(s.socket.reply_timeout_secs, 30);
        assert_eq!(s.reducer.kind, ReducerKind::Stabilize);
        assert_eq!(s.metrics.address, "127.0.0.1:9187");
        assert_eq!(s.log.format, LogFormat::Plain);
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[policy]\nevent_interval = 0\ntime_interval_secs = \"soon\"\nevnt = 1\n\
             [socket]\nmode = \"999\"\n[reducer]\nkind = \"sum\"\n[nonsense]\nx = 1\n\
             [verify]\nsample = 2.0\n",
        )
        .unwrap();
        let err = Settings::load(&Sources {
            file: Some(file),
            overrides: vec![],
        })
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "policy.event_interval",
            "policy.time_interval_secs",
            "policy.evnt",
            "socket.mode",
            "reducer.kind",
            "nonsense",
            "verify.sample",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn a_cluster_needs_postgres_and_the_table_feed() {
        let err = Settings::load(&Sources {
            file: None,
            overrides: vec![
                ("cluster.enabled".into(), "true".into()),
                ("feed.table".into(), "off".into()),
                ("cluster.failover_secs".into(), "1".into()),
            ],
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster.enabled: needs PostgreSQL"), "{err}");
        assert!(
            err.contains("cluster.enabled: needs the table feed"),
            "{err}"
        );
        assert!(err.contains("cluster.failover_secs: 1 is below 3"), "{err}");
        let ok = Settings::load(&Sources {
            file: None,
            overrides: vec![
                ("cluster.enabled".into(), "true".into()),
                ("database.url".into(), "postgres://x@y/z".into()),
            ],
        })
        .unwrap();
        assert_eq!(ok.cluster.partitions, 64);
        assert_eq!(ok.cluster.failover_secs, 15);
    }

    #[test]
    fn a_reorder_window_cannot_hold_more_than_may_be_in_flight() {
        let err = Settings::load(&Sources {
            file: None,
            overrides: vec![
                ("socket.reorder_window".into(), "200".into()),
                ("socket.max_inflight_events".into(), "100".into()),
            ],
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("socket.reorder_window: 200 is above socket.max_inflight_events (100)"),
            "{err}"
        );
        let off = Settings::load(&Sources {
            file: None,
            overrides: vec![("socket.reorder_window".into(), "0".into())],
        })
        .unwrap();
        assert_eq!(off.socket.reorder_window, 0);
        assert_eq!(off.socket.reorder_wait_ms, 10);
    }

    #[test]
    fn overrides_win_over_the_file() {
        let s = Settings::load(&Sources {
            file: None,
            overrides: vec![("database.url".into(), "postgres://x@y/z".into())],
        })
        .unwrap();
        assert_eq!(s.database.url, "postgres://x@y/z");
    }
}
