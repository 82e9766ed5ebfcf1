//! End-to-end load tool: generate stabilize-shaped events, start the real
//! release daemon, stream them with `snapshotd send --flush`, report events
//! per second, snapshots written, the daemon's CPU and resident memory, the
//! store's own ceiling and, with `--python`, the way stabilize users
//! snapshot today, all measured in the same run.
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench load -- --events 1000000 --workflows 10000 \
//!     --database postgres://postgres@127.0.0.1:5432/test --event-interval 100
//! # What stabilize's recorder really produces (~300 events, ~35 KB state a workflow):
//! cargo bench --bench load -- --shape stabilize --events 100000 --workflows 330 \
//!     --database sqlite --python
//! cargo bench --bench load -- --shape stabilize --events 100000 --workflows 330 \
//!     --database postgres://postgres@127.0.0.1:5432/test --events-table \
//!     --connections 4 --disorder 50 --python
//! ```
//! `--database` is an admin URL: a fresh database is created beside it and
//! dropped afterwards (`sqlite` uses a temporary file). Figures are for one
//! run on a shared machine: compare ratios measured in the same run.
//!
//! Flags (defaults in brackets):
//! * `--shape simple|stabilize` [simple]: `simple` is a short synthetic
//!   lifecycle with tiny payloads; `stabilize` is the lifecycle stabilize's
//!   recorder writes (workflow created/started with a context, stages
//!   started/completed with outputs, tasks started/retried/completed with
//!   outputs, stage and workflow `context.updated`), each workflow ending
//!   with `workflow.completed`. Deterministic from `--seed` [1].
//! * `--connections N` [1]: workflows are split over N files (a workflow's
//!   events all on one) streamed by N concurrent `snapshotd send --flush`.
//! * `--disorder W` [0]: each connection's stream is shuffled within windows
//!   of W consecutive events, with about 1% of them resent (duplicates).
//! * `--events-table` (Postgres only): stabilize's tables (its own
//!   `SETUP_DDL`, read from the installed package) are created and `events`
//!   is loaded with the same events by `COPY ... FROM STDIN` before the
//!   daemon starts, so the daemon checks every snapshot against it, as in
//!   production. The load is timed separately.
//! * `--python`: `tests/python/python_way.py` folds the same events with
//!   stabilize's `EventReplayer` and writes with its `SnapshotStore` every
//!   `event_interval` events, into a fresh database of the same kind.
//!   Python is `$STABILIZE_PYTHON` or `.venv/bin/python`.
//! * `--event-interval N` [100], `--binary PATH` [target/release/snapshotd].
//! * `--concurrency N` [all] (`stabilize` shape): at most N workflows run
//!   at once, a new one starting as one completes, as in an engine with a
//!   bounded worker pool; by default every workflow starts at once, so all
//!   cross their thresholds together.
//! * `--rate N`: send at most N events a second in all (split over the
//!   connections), e.g. half the rate a run at full speed reached, for the
//!   due → committed latency under a steady load.
//! * `--fold-only`: no snapshot at all (`event_interval` above `--events`,
//!   `shutdown.snapshot_on_shutdown = false`): what is left is reading,
//!   decoding, routing and folding, for profiling the fold path.
//! * `--keep`: leave the daemon's database (Postgres) or copy it to
//!   `./snapshotd_load.db` (SQLite), e.g. for `tests/python/verify_snapshots.py`.
//!
//! Any `SNAPSHOTD_*` variable in the tool's environment reaches the daemon.
//! The store ceiling: after the daemon exits, the rows of `snapshots` are
//! copied into a scratch `snapshots_ceiling` by the fastest path the backend
//! has (Postgres `COPY FROM STDIN`, SQLite `INSERT ... SELECT` in one
//! transaction); the daemon's snapshots/s is given as a share of its rows/s.

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteSynchronous};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Simple,
    Stabilize,
}

struct Args {
    events: u64,
    workflows: u64,
    database: String,
    event_interval: u64,
    binary: PathBuf,
    shape: Shape,
    connections: usize,
    disorder: usize,
    events_table: bool,
    python: bool,
    seed: u64,
    keep: bool,
    fold_only: bool,
    rate: Option<u64>,
    concurrency: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        events: 1_000_000,
        workflows: 10_000,
        database: "sqlite".into(),
        event_interval: 100,
        binary: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/snapshotd"),
        shape: Shape::Simple,
        connections: 1,
        disorder: 0,
        events_table: false,
        python: false,
        seed: 1,
        keep: false,
        fold_only: false,
        rate: None,
        concurrency: usize::MAX,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => args.events = value().parse().expect("--events N"),
            "--workflows" => args.workflows = value().parse().expect("--workflows N"),
            "--database" => args.database = value(),
            "--event-interval" => {
                args.event_interval = value().parse().expect("--event-interval N")
            }
            "--binary" => args.binary = value().into(),
            "--shape" => {
                args.shape = match value().as_str() {
                    "simple" => Shape::Simple,
                    "stabilize" => Shape::Stabilize,
                    other => panic!("--shape simple|stabilize, not {other}"),
                }
            }
            "--connections" => args.connections = value().parse().expect("--connections N"),
            "--disorder" => args.disorder = value().parse().expect("--disorder W"),
            "--events-table" => args.events_table = true,
            "--python" => args.python = true,
            "--seed" => args.seed = value().parse().expect("--seed N"),
            "--keep" => args.keep = true,
            "--fold-only" => args.fold_only = true,
            "--concurrency" => args.concurrency = value().parse().expect("--concurrency N"),
            "--rate" => args.rate = Some(value().parse().expect("--rate N (events/s)")),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        args.workflows >= 1 && args.events >= 1,
        "--events and --workflows must be >= 1"
    );
    assert!(args.connections >= 1, "--connections must be >= 1");
    if args.fold_only {
        // No threshold is crossed and nothing is snapshotted at SIGTERM.
        args.event_interval = args.event_interval.max(args.events + 1);
    }
    assert!(
        !args.events_table || args.database != "sqlite",
        "--events-table needs a Postgres --database"
    );
    args
}

/// SplitMix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_5EED)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16) as usize]))
            .collect()
    }

    /// A ULID-shaped id: 26 Crockford characters, the first ten the time.
    fn ulid(&mut self, millis: u64) -> String {
        const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let time = (0..10)
            .rev()
            .map(|i| CROCKFORD[((millis >> (5 * i)) & 31) as usize]);
        let random: Vec<u8> = (0..16)
            .map(|_| CROCKFORD[self.below(32) as usize])
            .collect();
        time.chain(random).map(char::from).collect()
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "`), which is what
/// stabilize's event bus hands a subscriber.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn python_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    InsertionOrder(value).serialize(&mut serializer).unwrap();
    String::from_utf8(out).unwrap()
}

/// A value whose objects write their keys in a fixed order that is not
/// sorted: a Python dict keeps the order its keys were inserted in, so the
/// daemon must sort what it reads (a `serde_json::Map` would write them
/// sorted, sparing it that work).
struct InsertionOrder<'a>(&'a Value);

impl Serialize for InsertionOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                // FNV-1a of the key: scrambled, and the same every run.
                entries.sort_by_key(|(key, _)| {
                    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                    })
                });
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    out.serialize_entry(key, &InsertionOrder(value))?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(&InsertionOrder(item))?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// One generated event: its NDJSON line and, with `--events-table`, its row
/// in `COPY` text format.
struct Ev {
    workflow: usize,
    line: String,
    row: Option<String>,
}

/// The columns of stabilize's `events` table, in `COPY` order.
const COPY_COLUMNS: &str = "sequence, event_id, event_type, timestamp, entity_type, entity_id, \
     workflow_id, version, data, correlation_id, causation_id, actor, source_handler, schema_version";

/// A row of `COPY ... FROM STDIN` text format (`None` is `\N`).
fn copy_row(fields: &[Option<&str>]) -> String {
    let mut row = String::with_capacity(512);
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            row.push('\t');
        }
        match field {
            None => row.push_str("\\N"),
            Some(text) => {
                for c in text.chars() {
                    match c {
                        '\\' => row.push_str("\\\\"),
                        '\t' => row.push_str("\\t"),
                        '\n' => row.push_str("\\n"),
                        '\r' => row.push_str("\\r"),
                        c => row.push(c),
                    }
                }
            }
        }
    }
    row.push('\n');
    row
}

/// The `simple` shape: workflows run interleaved, each event going to the
/// next workflow in a rotating window, with a short synthetic lifecycle.
fn simple_event(seq: u64, workflows: u64, per_workflow: u64, rows: bool) -> Ev {
    let w = (seq - 1) % workflows;
    let n = (seq - 1) / workflows; // this workflow's n-th event
    let wf = format!("01JDLOAD{w:018}");
    let stage = format!("01JDSTG{:013}{:06}", w, n / 10);
    let task = format!("01JDTSK{:013}{:06}", w, n / 3);
    let (event_type, entity_type, entity_id, data) = match n {
        0 => (
            "workflow.created",
            "workflow",
            wf.clone(),
            r#"{"application":"billing","name":"nightly"}"#.to_string(),
        ),
        1 => (
            "workflow.started",
            "workflow",
            wf.clone(),
            r#"{"context":{"region":"eu-west-1","batch":1000,"ratio":0.1}}"#.to_string(),
        ),
        n if n + 1 == per_workflow => (
            "workflow.completed",
            "workflow",
            wf.clone(),
            "{}".to_string(),
        ),
        n => match n % 6 {
            0 => (
                "stage.started",
                "stage",
                stage.clone(),
                format!(r#"{{"ref_id":"s{n}","type":"task","name":"Stage {n}"}}"#),
            ),
            1 => (
                "task.started",
                "task",
                task.clone(),
                format!(r#"{{"name":"run","stage_id":"{stage}"}}"#),
            ),
            2 => ("task.retried", "task", task.clone(), "{}".to_string()),
            3 => (
                "task.completed",
                "task",
                task.clone(),
                format!(r#"{{"outputs":{{"rows":{n},"bytes":1.5e6,"note":"café"}}}}"#),
            ),
            4 => (
                "context.updated",
                "workflow",
                wf.clone(),
                format!(r#"{{"context":{{"step":{n},"k{}":"v"}}}}"#, n % 20),
            ),
            _ => (
                "stage.completed",
                "stage",
                stage.clone(),
                format!(r#"{{"outputs":{{"ok":true,"n":{n}}}}}"#),
            ),
        },
    };
    let event_id = format!("01JDEV{seq:020}");
    let timestamp = format!("2026-11-26T03:59:48.{:06}+00:00", seq % 1_000_000);
    let line = format!(
        r#"{{"event_id":"{event_id}","event_type":"{event_type}","timestamp":"{timestamp}","sequence":{seq},"entity_type":"{entity_type}","entity_id":"{entity_id}","workflow_id":"{wf}","version":{n},"data":{data},"metadata":{{"correlation_id":"{wf}","causation_id":null,"actor":"system","source_handler":null}},"schema_version":1}}"#
    );
    let row = rows.then(|| {
        copy_row(&[
            Some(&seq.to_string()),
            Some(&event_id),
            Some(event_type),
            Some(&timestamp),
            Some(entity_type),
            Some(&entity_id),
            Some(&wf),
            Some(&n.to_string()),
            Some(&data),
            Some(&wf),
            None,
            Some("system"),
            None,
            Some("1"),
        ])
    });
    Ev {
        workflow: w as usize,
        line,
        row,
    }
}

/// Where a `stabilize`-shaped workflow is in its life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Created,
    Started,
    StageStarted,
    TaskStarted,
    TaskRetried,
    TaskCompleted,
    StageContext,
    StageCompleted,
    WorkflowContext,
    Done,
}

const STAGE_TYPES: &[&str] = &["shell", "deploy", "wait", "manualJudgment", "bake", "test"];
const TASK_NAMES: &[&str] = &[
    "resolveArtifacts",
    "runScript",
    "deployManifest",
    "waitForStable",
    "monitorDeploy",
    "collectMetrics",
    "publishReport",
    "verifyChecksum",
];
const TASK_CLASSES: &[&str] = &[
    "pipelines.tasks.shell.RunScriptTask",
    "pipelines.tasks.deploy.DeployManifestTask",
    "pipelines.tasks.wait.WaitForStableTask",
    "pipelines.tasks.artifacts.ResolveArtifactsTask",
];
const REGIONS: &[&str] = &["eu-west-1", "us-east-1", "ap-southeast-2", "eu-central-1"];
const PEOPLE: &[&str] = &[
    "alice@example.com",
    "bob@example.com",
    "ops-bot",
    "zoë@example.com",
];

/// What a task or stage reports as outputs: `keys` entries of the kinds
/// pipelines really return (URLs, checksums, counts, timings, lists).
fn outputs(rng: &mut Rng, keys: u64) -> Value {
    let mut map = serde_json::Map::new();
    for _ in 0..keys {
        let (key, value) = match rng.below(12) {
            0 => (
                "artifact",
                json!(format!(
                    "s3://builds-{}/app/{}/bundle.tar.gz",
                    rng.pick(REGIONS),
                    rng.hex(16)
                )),
            ),
            1 => ("checksum", json!(format!("sha256:{}", rng.hex(64)))),
            2 => ("rows_processed", json!(rng.below(5_000_000))),
            3 => ("duration_s", json!(rng.below(100_000) as f64 / 100.0)),
            4 => ("exit_code", json!(0)),
            5 => (
                "host",
                json!(format!(
                    "worker-{}.{}.internal",
                    rng.below(64),
                    rng.pick(REGIONS)
                )),
            ),
            6 => (
                "log_url",
                json!(format!("https://logs.example.com/runs/{}", rng.hex(24))),
            ),
            7 => (
                "warnings",
                json!(
                    (0..rng.below(3))
                        .map(|i| format!("deprecated option --legacy-{i} ignored"))
                        .collect::<Vec<_>>()
                ),
            ),
            8 => (
                "metrics",
                json!({"p50_ms": rng.below(500), "p99_ms": rng.below(5000),
                       "errors": rng.below(3), "throughput": rng.below(10_000) as f64 / 10.0}),
            ),
            9 => (
                "image",
                json!(format!(
                    "registry.example.com/app:1.{}.{}-{}",
                    rng.below(40),
                    rng.below(10),
                    rng.hex(8)
                )),
            ),
            10 => ("commit", json!(rng.hex(40))),
            _ => ("approved_by", json!(rng.pick(PEOPLE))),
        };
        map.insert(format!("{key}_{}", map.len()), value);
    }
    Value::Object(map)
}

/// One `stabilize`-shaped workflow: a state machine giving its next event.
struct Workflow {
    rng: Rng,
    id: String,
    /// Events this workflow has, the last one `workflow.completed`.
    total: u64,
    emitted: u64,
    /// Scales how much each task and stage reports (0.2 to 3).
    weight: f64,
    step: Step,
    version: u64,
    started_ms: u64,
    last_event: Option<String>,
    stage_no: u64,
    stage_id: String,
    stage_meta: (String, &'static str, String),
    stage_version: u64,
    tasks_in_stage: u64,
    task_no: u64,
    task_id: String,
    task_name: &'static str,
    task_version: u64,
}

/// A generated event before it is rendered.
struct Draft {
    event_type: &'static str,
    entity_type: &'static str,
    entity_id: String,
    version: u64,
    data: Value,
    source_handler: &'static str,
}

impl Workflow {
    fn new(seed: u64, index: usize, total: u64, millis: u64) -> Workflow {
        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
        let id = rng.ulid(millis);
        // Skewed: most workflows report little, a few a lot.
        let u = rng.below(1000) as f64 / 1000.0;
        let weight = 0.2 + 2.8 * u * u * u;
        Workflow {
            rng,
            id,
            total,
            emitted: 0,
            weight,
            step: Step::Created,
            version: 0,
            started_ms: millis,
            last_event: None,
            stage_no: 0,
            stage_id: String::new(),
            stage_meta: (String::new(), "", String::new()),
            stage_version: 0,
            tasks_in_stage: 0,
            task_no: 0,
            task_id: String::new(),
            task_name: "",
            task_version: 0,
        }
    }

    fn done(&self) -> bool {
        self.emitted >= self.total
    }

    fn scaled(&mut self, lo: u64, hi: u64) -> u64 {
        ((self.rng.range(lo, hi) as f64) * self.weight).round() as u64
    }

    /// The next event of the workflow, its current stage or its current
    /// task (`entity_type`), with that entity's next version.
    fn draft(
        &mut self,
        entity_type: &'static str,
        event_type: &'static str,
        data: Value,
        handler: &'static str,
    ) -> Draft {
        let (entity_id, version) = match entity_type {
            "workflow" => {
                self.version += 1;
                (self.id.clone(), self.version)
            }
            "stage" => {
                self.stage_version += 1;
                (self.stage_id.clone(), self.stage_version)
            }
            "task" => {
                self.task_version += 1;
                (self.task_id.clone(), self.task_version)
            }
            other => unreachable!("no such entity type: {other}"),
        };
        Draft {
            event_type,
            entity_type,
            entity_id,
            version,
            data,
            source_handler: handler,
        }
    }

    /// The next event, stabilize's recorder payloads, at `millis`.
    fn next_draft(&mut self, millis: u64) -> Draft {
        self.emitted += 1;
        if self.emitted == self.total && self.emitted > 2 {
            self.step = Step::Done;
            let duration = millis - self.started_ms;
            return self.draft(
                "workflow",
                "workflow.completed",
                json!({"status": "SUCCEEDED", "end_time": millis, "duration_ms": duration}),
                "CompleteWorkflowHandler",
            );
        }
        match self.step {
            Step::Created => {
                self.step = Step::Started;
                let stages = self.rng.range(8, 16);
                let application = *self.rng.pick(&["billing", "checkout", "search", "ledger"]);
                let name = *self
                    .rng
                    .pick(&["deploy-prod", "nightly-etl", "canary", "rollback"]);
                self.draft(
                    "workflow",
                    "workflow.created",
                    json!({"application": application, "name": name, "type": "PIPELINE",
                           "trigger_type": "manual", "stage_count": stages,
                           "initial_stage_count": 1}),
                    "StartWorkflowHandler",
                )
            }
            Step::Started => {
                self.step = Step::StageStarted;
                self.started_ms = millis;
                let mut parameters = serde_json::Map::new();
                for i in 0..self.rng.range(6, 12) {
                    parameters.insert(format!("param_{i}"), json!(self.rng.hex(12)));
                }
                let context = json!({
                    "application": "billing",
                    "environment": "production",
                    "region": self.rng.pick(REGIONS),
                    "git_sha": self.rng.hex(40),
                    "requested_by": self.rng.pick(PEOPLE),
                    "parameters": parameters,
                    "notify": [self.rng.pick(PEOPLE), self.rng.pick(PEOPLE)],
                    "timeout_s": 3600,
                    "dry_run": false,
                    "canary_percent": 12.5,
                });
                let first_stage = self.rng.ulid(millis);
                self.draft(
                    "workflow",
                    "workflow.started",
                    json!({"start_time": millis, "initial_stage_ids": [first_stage],
                           "context": context}),
                    "StartWorkflowHandler",
                )
            }
            Step::StageStarted => {
                self.stage_no += 1;
                self.stage_id = self.rng.ulid(millis);
                self.stage_version = 0;
                self.tasks_in_stage = self.rng.range(4, 10);
                self.task_no = 0;
                let kind = *self.rng.pick(STAGE_TYPES);
                self.stage_meta = (
                    format!("stage{}", self.stage_no),
                    kind,
                    format!("{} {}", kind, self.stage_no),
                );
                self.step = Step::TaskStarted;
                let (ref_id, kind, name) = self.stage_meta.clone();
                let tasks = self.tasks_in_stage;
                self.draft(
                    "stage",
                    "stage.started",
                    json!({"ref_id": ref_id, "type": kind, "name": name, "start_time": millis,
                           "is_synthetic": false, "parent_stage_id": null, "task_count": tasks}),
                    "StartStageHandler",
                )
            }
            Step::TaskStarted => {
                self.task_id = self.rng.ulid(millis);
                self.task_version = 0;
                self.task_name = *self.rng.pick(TASK_NAMES);
                self.step = if self.rng.chance(0.1) {
                    Step::TaskRetried
                } else {
                    Step::TaskCompleted
                };
                let class = *self.rng.pick(TASK_CLASSES);
                let (name, stage_id) = (self.task_name, self.stage_id.clone());
                self.draft(
                    "task",
                    "task.started",
                    json!({"name": name, "implementing_class": class, "start_time": millis,
                           "stage_id": stage_id}),
                    "StartTaskHandler",
                )
            }
            Step::TaskRetried => {
                self.step = Step::TaskCompleted;
                let name = self.task_name;
                self.draft("task", 
                    "task.retried",
                    json!({"name": name, "attempt": 2,
                           "last_error": "ConnectionResetError: [Errno 104] Connection reset by peer"}),
                    "RunTaskHandler",
                )
            }
            Step::TaskCompleted => {
                self.step = Step::StageContext;
                let keys = self.scaled(1, 4);
                let outputs = outputs(&mut self.rng, keys);
                let name = self.task_name;
                let duration = self.rng.below(120_000);
                self.draft(
                    "task",
                    "task.completed",
                    json!({"name": name, "status": "SUCCEEDED", "end_time": millis,
                           "duration_ms": duration, "outputs": outputs}),
                    "CompleteTaskHandler",
                )
            }
            Step::StageContext => {
                self.task_no += 1;
                self.step = if self.task_no < self.tasks_in_stage {
                    Step::TaskStarted
                } else {
                    Step::StageCompleted
                };
                let keys = self.scaled(1, 3);
                let context = outputs(&mut self.rng, keys);
                self.draft(
                    "stage",
                    "context.updated",
                    json!({"context": context}),
                    "CompleteTaskHandler",
                )
            }
            Step::StageCompleted => {
                self.step = Step::WorkflowContext;
                let keys = self.scaled(2, 6);
                let outputs = outputs(&mut self.rng, keys);
                let (ref_id, kind, name) = self.stage_meta.clone();
                let duration = self.rng.below(600_000);
                self.draft(
                    "stage",
                    "stage.completed",
                    json!({"ref_id": ref_id, "type": kind, "name": name, "status": "SUCCEEDED",
                           "end_time": millis, "duration_ms": duration, "outputs": outputs}),
                    "CompleteStageHandler",
                )
            }
            Step::WorkflowContext | Step::Done => {
                self.step = Step::StageStarted;
                let ref_id = self.stage_meta.0.clone();
                let mut context = serde_json::Map::new();
                context.insert(format!("{ref_id}_status"), json!("SUCCEEDED"));
                context.insert(
                    format!("{ref_id}_artifact"),
                    json!(format!("s3://builds/app/{}/out.tar.gz", self.rng.hex(16))),
                );
                context.insert("last_stage".into(), json!(ref_id));
                self.draft(
                    "workflow",
                    "context.updated",
                    json!({"context": context}),
                    "CompleteStageHandler",
                )
            }
        }
    }

    fn next(&mut self, index: usize, seq: u64, micros: i64, rows: bool) -> Ev {
        let draft = self.next_draft((micros / 1000) as u64);
        let event_id = self.rng.ulid((micros / 1000) as u64);
        let timestamp = chrono::DateTime::from_timestamp_micros(micros)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
            .to_string();
        let causation = self.last_event.replace(event_id.clone());
        let data = python_json(&draft.data);
        let metadata = python_json(
            &json!({"correlation_id": self.id, "causation_id": causation,
                                           "actor": "system", "source_handler": draft.source_handler}),
        );
        let line = format!(
            r#"{{"event_id": "{event_id}", "event_type": "{}", "timestamp": "{timestamp}", "sequence": {seq}, "entity_type": "{}", "entity_id": "{}", "workflow_id": "{}", "version": {}, "data": {data}, "metadata": {metadata}, "schema_version": 1}}"#,
            draft.event_type, draft.entity_type, draft.entity_id, self.id, draft.version
        );
        let row = rows.then(|| {
            copy_row(&[
                Some(&seq.to_string()),
                Some(&event_id),
                Some(draft.event_type),
                Some(&timestamp),
                Some(draft.entity_type),
                Some(&draft.entity_id),
                Some(&self.id),
                Some(&draft.version.to_string()),
                Some(&data),
                Some(&self.id),
                causation.as_deref(),
                Some("system"),
                Some(draft.source_handler),
                Some("1"),
            ])
        });
        Ev {
            workflow: index,
            line,
            row,
        }
    }
}

/// One connection's file, with its disorder window.
struct Outbox {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    window: Vec<String>,
}

/// Where generated events go: the connections' files (shuffled within
/// windows, with resent duplicates), a sequence-ordered copy for Python when
/// the sent files are disordered, and the `COPY` rows.
struct Sink {
    connections: Vec<Outbox>,
    ordered: Option<(PathBuf, BufWriter<std::fs::File>)>,
    copy: Option<(PathBuf, BufWriter<std::fs::File>)>,
    disorder: usize,
    rng: Rng,
    events: u64,
    bytes: u64,
    duplicates: u64,
}

struct Generated {
    events: u64,
    /// Bytes of the distinct events' lines (with their newlines).
    bytes: u64,
    duplicates: u64,
    files: Vec<PathBuf>,
    /// The events in sequence order, each once (for Python).
    ordered: Vec<PathBuf>,
    copy: Option<PathBuf>,
}

fn create(path: &Path) -> BufWriter<std::fs::File> {
    BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap())
}

impl Sink {
    fn new(dir: &Path, args: &Args) -> Sink {
        let connections = (0..args.connections)
            .map(|i| {
                let path = if args.connections == 1 {
                    dir.join("events.ndjson")
                } else {
                    dir.join(format!("events.{i}.ndjson"))
                };
                Outbox {
                    out: create(&path),
                    path,
                    window: Vec::new(),
                }
            })
            .collect();
        let ordered = (args.python && args.disorder > 1).then(|| {
            let path = dir.join("events.ordered.ndjson");
            (path.clone(), create(&path))
        });
        let copy = args.events_table.then(|| {
            let path = dir.join("events.copy");
            (path.clone(), create(&path))
        });
        Sink {
            connections,
            ordered,
            copy,
            disorder: args.disorder,
            rng: Rng::new(args.seed ^ 0xD150_4DE4),
            events: 0,
            bytes: 0,
            duplicates: 0,
        }
    }

    fn push(&mut self, ev: Ev) {
        self.events += 1;
        self.bytes += ev.line.len() as u64 + 1;
        if let (Some((_, out)), Some(row)) = (&mut self.copy, &ev.row) {
            out.write_all(row.as_bytes()).unwrap();
        }
        if let Some((_, out)) = &mut self.ordered {
            writeln!(out, "{}", ev.line).unwrap();
        }
        let c = ev.workflow % self.connections.len();
        if self.disorder <= 1 {
            writeln!(self.connections[c].out, "{}", ev.line).unwrap();
            return;
        }
        self.connections[c].window.push(ev.line);
        if self.connections[c].window.len() >= self.disorder {
            self.spill(c);
        }
    }

    /// Write connection `c`'s window shuffled, about 1% of it sent twice.
    fn spill(&mut self, c: usize) {
        let mut window = std::mem::take(&mut self.connections[c].window);
        let n = window.len() as u64;
        for _ in 0..n {
            if self.rng.chance(0.01) {
                let again = window[self.rng.below(n) as usize].clone();
                window.push(again);
                self.duplicates += 1;
            }
        }
        self.rng.shuffle(&mut window);
        let out = &mut self.connections[c].out;
        for line in window {
            writeln!(out, "{line}").unwrap();
        }
    }

    fn finish(mut self) -> Generated {
        for c in 0..self.connections.len() {
            if !self.connections[c].window.is_empty() {
                self.spill(c);
            }
        }
        let mut files = Vec::new();
        for mut conn in self.connections {
            conn.out.flush().unwrap();
            files.push(conn.path);
        }
        let ordered = match self.ordered {
            Some((path, mut out)) => {
                out.flush().unwrap();
                vec![path]
            }
            None => files.clone(),
        };
        let copy = self.copy.map(|(path, mut out)| {
            out.flush().unwrap();
            path
        });
        Generated {
            events: self.events,
            bytes: self.bytes,
            duplicates: self.duplicates,
            files,
            ordered,
            copy,
        }
    }
}

fn generate(dir: &Path, args: &Args) -> Generated {
    let mut sink = Sink::new(dir, args);
    let rows = args.events_table;
    match args.shape {
        Shape::Simple => {
            let per_workflow = args.events.div_ceil(args.workflows).max(1);
            for seq in 1..=args.events {
                sink.push(simple_event(seq, args.workflows, per_workflow, rows));
            }
        }
        Shape::Stabilize => {
            // 2026-11-26T03:00:00Z; `--concurrency` workflows run at once
            // (all of them by default), a new one starting as one ends, and
            // each event goes to a running workflow drawn at random.
            let mut micros: i64 = 1_795_662_000_000_000;
            let (base, extra) = (args.events / args.workflows, args.events % args.workflows);
            let total = |w: usize| base + u64::from((w as u64) < extra);
            let mut flows: Vec<Option<Workflow>> = (0..args.workflows).map(|_| None).collect();
            let mut started = 0;
            let mut active: Vec<usize> = Vec::new();
            let mut rng = Rng::new(args.seed);
            let mut seq = 0;
            loop {
                while active.len() < args.concurrency && started < flows.len() {
                    let w = started;
                    started += 1;
                    let flow = Workflow::new(args.seed, w, total(w), (micros / 1000) as u64);
                    if !flow.done() {
                        active.push(w);
                    }
                    flows[w] = Some(flow);
                }
                if active.is_empty() {
                    break;
                }
                let i = rng.below(active.len() as u64) as usize;
                let w = active[i];
                seq += 1;
                micros += rng.range(1, 4000) as i64;
                let flow = flows[w].as_mut().expect("started");
                let ev = flow.next(w, seq, micros, rows);
                if flow.done() {
                    active.swap_remove(i);
                    flows[w] = None;
                }
                sink.push(ev);
            }
        }
    }
    sink.finish()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14, 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12) // fields 14 and 15, counted from field 3 (state)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The virtualenv's Python with stabilize 0.33.1 (as `tests/it/helpers.rs`).
fn python() -> PathBuf {
    let path = std::env::var_os("STABILIZE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with stabilize at {}: set STABILIZE_PYTHON or create .venv",
        path.display()
    );
    path
}

/// stabilize's own DDL, read from the installed package: `SETUP_DDL`, what
/// its migration operator applies in production (`events` with its
/// `commit_xid` migration, `snapshots`, `event_subscriptions`; the daemon
/// then works with the `snapshots` table stabilize created, and
/// stabilize's own store opens the database, e.g. `verify_snapshots.py`).
fn stabilize_events_ddl() -> String {
    let output = Command::new(python())
        .args([
            "-c",
            "from stabilize.events.store.postgres import schema as s; print(s.SETUP_DDL)",
        ])
        .output()
        .expect("run python for stabilize's schema");
    assert!(
        output.status.success(),
        "reading stabilize's schema failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A fresh Postgres database beside the admin URL: (its URL, its name).
async fn create_database(admin_url: &str, name: &str) -> String {
    let mut admin = PgConnection::connect(admin_url)
        .await
        .expect("connect to --database");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

async fn drop_database(admin_url: &str, name: &str) {
    let mut admin = PgConnection::connect(admin_url).await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}

/// Create stabilize's `events` table and `COPY` the rows into it; returns the
/// rows and the seconds the load (COPY, sequence, ANALYZE) took.
async fn load_events_table(url: &str, rows: &Path) -> (u64, f64) {
    let ddl = stabilize_events_ddl();
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut conn)
        .await
        .expect("stabilize's events DDL");
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!("COPY events ({COPY_COLUMNS}) FROM STDIN"))
        .await
        .unwrap();
    let mut file = std::fs::File::open(rows).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        copy.send(&chunk[..n]).await.unwrap();
    }
    let loaded = copy.finish().await.expect("COPY events");
    sqlx::raw_sql(
        "SELECT setval(pg_get_serial_sequence('events', 'sequence'), \
         (SELECT max(sequence) FROM events)); ANALYZE events",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    (loaded, started.elapsed().as_secs_f64())
}

/// The daemon's database, to read back what it wrote.
enum Db {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

/// Sizes of the stored states: (rows, avg, max), then (avg, max) of each
/// workflow's latest.
struct StateSizes {
    rows: i64,
    avg: f64,
    max: i64,
    latest_avg: f64,
    latest_max: i64,
}

const STATE_SIZES: &str = "SELECT count(*), \
     CAST(coalesce(avg(length(CAST(state AS TEXT))), 0) AS DOUBLE PRECISION), \
     CAST(coalesce(max(length(CAST(state AS TEXT))), 0) AS BIGINT) FROM snapshots";
const LATEST_SIZES: &str = "SELECT count(*), \
     CAST(coalesce(avg(length(CAST(s.state AS TEXT))), 0) AS DOUBLE PRECISION), \
     CAST(coalesce(max(length(CAST(s.state AS TEXT))), 0) AS BIGINT) \
     FROM snapshots s JOIN (SELECT entity_type, entity_id, max(version) AS v FROM snapshots \
     GROUP BY entity_type, entity_id) m \
     ON s.entity_type = m.entity_type AND s.entity_id = m.entity_id AND s.version = m.v";

/// The store ceiling: (rows, seconds) to copy `snapshots` into a fresh
/// `snapshots_ceiling` by the backend's fastest path.
struct Ceiling {
    rows: u64,
    seconds: f64,
    how: &'static str,
}

impl Db {
    async fn connect(url: &str) -> Db {
        if url.starts_with("sqlite:") {
            // As the daemon opens it (src/store/sqlite.rs).
            let options = SqliteConnectOptions::from_str(url)
                .unwrap()
                .synchronous(SqliteSynchronous::Normal)
                .pragma("cache_size", "-65536")
                .busy_timeout(Duration::from_secs(10));
            Db::Sqlite(SqliteConnection::connect_with(&options).await.unwrap())
        } else {
            Db::Postgres(PgConnection::connect(url).await.unwrap())
        }
    }

    async fn state_sizes(&mut self) -> StateSizes {
        let (all, latest): ((i64, f64, i64), (i64, f64, i64)) = match self {
            Db::Postgres(c) => (
                sqlx::query_as(STATE_SIZES)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap(),
                sqlx::query_as(LATEST_SIZES)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap(),
            ),
            Db::Sqlite(c) => (
                sqlx::query_as(STATE_SIZES)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap(),
                sqlx::query_as(LATEST_SIZES)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap(),
            ),
        };
        StateSizes {
            rows: all.0,
            avg: all.1,
            max: all.2,
            latest_avg: latest.1,
            latest_max: latest.2,
        }
    }

    async fn ceiling(&mut self, dir: &Path) -> Ceiling {
        match self {
            Db::Postgres(c) => {
                sqlx::raw_sql("CREATE TABLE snapshots_ceiling (LIKE snapshots INCLUDING ALL)")
                    .execute(&mut *c)
                    .await
                    .unwrap();
                let dump = dir.join("snapshots.copy");
                let mut out = create(&dump);
                {
                    let mut stream = c.copy_out_raw("COPY snapshots TO STDOUT").await.unwrap();
                    while let Some(chunk) = stream.next().await {
                        out.write_all(&chunk.unwrap()).unwrap();
                    }
                }
                out.flush().unwrap();
                drop(out);
                let started = Instant::now();
                let mut copy = c
                    .copy_in_raw("COPY snapshots_ceiling FROM STDIN")
                    .await
                    .unwrap();
                let mut file = std::fs::File::open(&dump).unwrap();
                let mut chunk = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut chunk).unwrap();
                    if n == 0 {
                        break;
                    }
                    copy.send(&chunk[..n]).await.unwrap();
                }
                let rows = copy.finish().await.unwrap();
                Ceiling {
                    rows,
                    seconds: started.elapsed().as_secs_f64(),
                    how: "COPY snapshots_ceiling FROM STDIN",
                }
            }
            Db::Sqlite(c) => {
                // SQLite has no `LIKE ... INCLUDING ALL`: the same CREATE
                // statements, renamed.
                let ddl: Vec<(String, String)> = sqlx::query_as(
                    "SELECT type, sql FROM sqlite_master WHERE tbl_name = 'snapshots' \
                     AND sql IS NOT NULL ORDER BY type = 'index'",
                )
                .fetch_all(&mut *c)
                .await
                .unwrap();
                for (kind, sql) in ddl {
                    let renamed = rename_sqlite_ddl(&kind, &sql);
                    sqlx::raw_sql(sqlx::AssertSqlSafe(renamed))
                        .execute(&mut *c)
                        .await
                        .unwrap();
                }
                let started = Instant::now();
                let mut tx = c.begin().await.unwrap();
                let rows = sqlx::raw_sql("INSERT INTO snapshots_ceiling SELECT * FROM snapshots")
                    .execute(&mut *tx)
                    .await
                    .unwrap()
                    .rows_affected();
                tx.commit().await.unwrap();
                Ceiling {
                    rows,
                    seconds: started.elapsed().as_secs_f64(),
                    how: "INSERT INTO snapshots_ceiling SELECT, one transaction",
                }
            }
        }
    }
}

/// `CREATE TABLE [IF NOT EXISTS] snapshots (...)` or `CREATE [UNIQUE] INDEX
/// [IF NOT EXISTS] name ON snapshots(...)`, for `snapshots_ceiling`.
fn rename_sqlite_ddl(kind: &str, sql: &str) -> String {
    let open = sql.find('(').expect("DDL with columns");
    let (head, rest) = sql.split_at(open);
    let head = head.replace("IF NOT EXISTS ", "");
    if kind == "table" {
        return format!("CREATE TABLE snapshots_ceiling {rest}");
    }
    // head: CREATE [UNIQUE] INDEX name ON snapshots
    let (before_on, _) = head.rsplit_once(" ON ").expect("CREATE INDEX ... ON");
    let (create, name) = before_on.rsplit_once(' ').unwrap();
    let name = name.trim_matches(['"', '`', '[', ']']);
    format!("{create} {name}_ceiling ON snapshots_ceiling {rest}")
}

/// What `python_way.py` printed last.
struct PythonWay {
    events: u64,
    snapshots: u64,
    seconds: f64,
    events_per_s: f64,
}

fn run_python_way(
    args: &Args,
    files: &[PathBuf],
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Option<PythonWay> {
    let mut command = Command::new(python());
    command.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/python_way.py"));
    let database = if args.database == "sqlite" {
        let path = dir.join("python_way.db");
        command.args(["--backend", "sqlite", "--path"]).arg(path);
        None
    } else {
        let name = format!("snapshotd_bench_py_{}", std::process::id());
        let url = runtime.block_on(create_database(&args.database, &name));
        command.args(["--backend", "postgres", "--dsn", &url]);
        Some(name)
    };
    command
        .args(["--event-interval", &args.event_interval.to_string()])
        .args(files)
        .stderr(Stdio::inherit());
    eprintln!("running the Python way (stabilize's EventReplayer + SnapshotStore)...");
    let output = command.output().expect("run python_way.py");
    if let Some(name) = database {
        runtime.block_on(drop_database(&args.database, &name));
    }
    if !output.status.success() {
        eprintln!("python_way.py failed: {}", output.status);
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last()?).ok()?;
    Some(PythonWay {
        events: last["events"].as_u64()?,
        snapshots: last["snapshots"].as_u64()?,
        seconds: last["seconds"].as_f64()?,
        events_per_s: last["events_per_s"].as_f64()?,
    })
}

fn main() {
    let args = parse_args();
    assert!(
        args.binary.exists(),
        "{} is missing: run `cargo build --release` first",
        args.binary.display()
    );
    if args.python || args.events_table {
        python(); // fail before creating anything
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let generated = generate(dir.path(), &args);
    let events = generated.events;
    let avg_event = generated.bytes as f64 / events as f64;
    eprintln!(
        "generated {events} events ({} MiB, {avg_event:.0} B an event on average, {} resent) in {:.1} s",
        generated.bytes >> 20,
        generated.duplicates,
        t.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (url, drop_db) = if args.database == "sqlite" {
        (
            format!("sqlite://{}", dir.path().join("snapshots.db").display()),
            None,
        )
    } else {
        let name = format!("snapshotd_bench_{}", std::process::id());
        let url = runtime.block_on(create_database(&args.database, &name));
        (url, Some(name))
    };
    let table_load = generated.copy.as_ref().map(|rows| {
        let (loaded, seconds) = runtime.block_on(load_events_table(&url, rows));
        eprintln!("loaded {loaded} rows into stabilize's events table in {seconds:.2} s");
        (loaded, seconds)
    });

    let socket = dir.path().join("snapshotd.sock");
    let log_path = dir.path().join("daemon.log");
    let mut daemon = Command::new(&args.binary)
        .arg("run")
        .env("SNAPSHOTD_SOCKET__PATH", &socket)
        .env("SNAPSHOTD_DATABASE__URL", &url)
        .env("SNAPSHOTD_METRICS__ADDRESS", "")
        .env(
            "SNAPSHOTD_POLICY__EVENT_INTERVAL",
            args.event_interval.to_string(),
        )
        .env("SNAPSHOTD_LOG__LEVEL", "warn")
        .envs(
            args.fold_only
                .then_some(("SNAPSHOTD_SHUTDOWN__SNAPSHOT_ON_SHUTDOWN", "false")),
        )
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rss_idle, _) = rss_kib(daemon.id());
    let cpu_idle = cpu_ticks(daemon.id());

    let t = Instant::now();
    let senders: Vec<_> = generated
        .files
        .iter()
        .map(|file| {
            let mut command = Command::new(&args.binary);
            command
                .args(["send", "--flush", "--socket"])
                .arg(&socket)
                .arg(file);
            if let Some(rate) = args.rate {
                // The connections share the rate.
                let each = (rate / args.connections as u64).max(1);
                command.args(["--rate", &each.to_string()]);
            }
            std::thread::spawn(move || command.output().expect("run snapshotd send"))
        })
        .collect();
    let sends: Vec<_> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = t.elapsed().as_secs_f64();
    for send in &sends {
        assert!(
            send.status.success(),
            "send failed: {}",
            String::from_utf8_lossy(&send.stderr)
        );
    }
    // `send` prints one line per rejected frame ("frame N: reason") and a summary.
    let rejected: usize = sends
        .iter()
        .map(|s| {
            String::from_utf8_lossy(&s.stderr)
                .lines()
                .filter(|l| l.starts_with("frame "))
                .count()
        })
        .sum();
    for send in &sends {
        let stderr = String::from_utf8_lossy(&send.stderr);
        if let Some(summary) = stderr.lines().last() {
            eprintln!("send: {summary}");
        }
    }
    let cpu_flush = cpu_ticks(daemon.id());
    let (rss, hwm) = rss_kib(daemon.id());

    let stats = {
        use std::io::{BufRead, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"op\":\"stats\"}\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["stats"].clone()
    };
    let terminated = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let status = daemon.wait().unwrap();
    let shutdown = terminated.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let log_lines: Vec<&str> = log.lines().collect();
    for line in log_lines.iter().take(20) {
        eprintln!("daemon: {line}");
    }
    if log_lines.len() > 20 {
        eprintln!("daemon: ... {} more lines", log_lines.len() - 20);
    }

    let (sizes, ceiling) = runtime.block_on(async {
        let mut db = Db::connect(&url).await;
        let sizes = db.state_sizes().await;
        let ceiling = db.ceiling(dir.path()).await;
        (sizes, ceiling)
    });
    if args.keep {
        let kept = if drop_db.is_some() {
            url.clone()
        } else {
            let path = PathBuf::from("snapshotd_load.db");
            std::fs::copy(dir.path().join("snapshots.db"), &path).unwrap();
            format!("sqlite://{}", path.display())
        };
        eprintln!("kept the daemon's database: {kept}");
    } else if let Some(name) = &drop_db {
        runtime.block_on(drop_database(&args.database, name));
    }
    let python_way = args
        .python
        .then(|| run_python_way(&args, &generated.ordered, dir.path(), &runtime))
        .flatten();

    let ticks = clock_ticks_per_second();
    let cpu = cpu_flush.saturating_sub(cpu_idle) as f64 / ticks;
    let events_per_s = events as f64 / elapsed;
    let written = stats["snapshots_written"].as_f64().unwrap_or(0.0);
    let snapshots_per_s = written / elapsed;
    let active = stats["active_entities"].as_f64().unwrap_or(0.0);
    let ceiling_per_s = ceiling.rows as f64 / ceiling.seconds.max(1e-9);

    println!(
        "backend:            {}",
        if drop_db.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    println!(
        "events:             {events} across {} workflows, event_interval {}",
        args.workflows, args.event_interval
    );
    println!(
        "shape:              {:?}, seed {}, {avg_event:.0} B an event on average ({:.1} MiB)",
        args.shape,
        args.seed,
        generated.bytes as f64 / 1048576.0
    );
    println!(
        "connections:        {}, disorder window {} ({} events resent), {rejected} frames rejected",
        args.connections,
        if args.disorder > 1 {
            args.disorder.to_string()
        } else {
            "off".into()
        },
        generated.duplicates
    );
    if let Some((loaded, seconds)) = table_load {
        println!(
            "events table:       {loaded} rows loaded in {seconds:.2} s = {:.0} rows/s (COPY FROM STDIN + ANALYZE)",
            loaded as f64 / seconds
        );
    }
    println!(
        "send --flush:       {elapsed:.2} s = {events_per_s:.0} events/s ({:.1} MiB/s)",
        generated.bytes as f64 / elapsed / 1048576.0
    );
    println!(
        "snapshots written:  {} = {snapshots_per_s:.0} snapshots/s",
        stats["snapshots_written"]
    );
    println!(
        "exactness work:     {} late, {} duplicate, {} re-folded in memory, {} rebuilt from the table, {} uncovered",
        stats["events_late"],
        stats["events_duplicate"],
        stats["refolds_in_memory"],
        stats["rebuilds"],
        stats["snapshots_uncovered"]
    );
    let commit = &stats["batch_commit"];
    println!(
        "batch commits:      p50 {} ms, p99 {} ms, max {} ms over {} batches",
        commit["p50_ms"], commit["p99_ms"], commit["max_ms"], commit["count"]
    );
    let latency = &stats["snapshot_latency"];
    println!(
        "due to committed:   p50 {} ms, p99 {} ms, max {} ms over {} snapshots (buckets of 19%; the daemon's stats)",
        latency["p50_ms"], latency["p99_ms"], latency["max_ms"], latency["count"]
    );
    println!(
        "daemon CPU:         {cpu:.2} s to the flush = {:.1} µs an event (CLK_TCK {ticks})",
        cpu * 1e6 / events as f64
    );
    println!(
        "daemon RSS:         {} MiB idle, {} MiB after, {} MiB peak",
        rss_idle >> 10,
        rss >> 10,
        hwm >> 10
    );
    println!(
        "active at the end:  {} entities ({:.1} KiB RSS each over idle, {:.1} KiB peak each)",
        stats["active_entities"],
        (rss.saturating_sub(rss_idle)) as f64 / active.max(1.0),
        hwm as f64 / active.max(1.0)
    );
    println!(
        "state size:         avg {:.0} B, max {} B over {} rows; latest per workflow avg {:.0} B, max {} B",
        sizes.avg, sizes.max, sizes.rows, sizes.latest_avg, sizes.latest_max
    );
    println!("SIGTERM to exit:    {shutdown:.2} s, {status}");
    println!(
        "daemon log:         {} lines at level warn and above",
        log_lines.len()
    );
    println!(
        "store ceiling:      {} rows in {:.3} s = {ceiling_per_s:.0} rows/s ({}); daemon at {:.1}% of it",
        ceiling.rows,
        ceiling.seconds,
        ceiling.how,
        100.0 * snapshots_per_s / ceiling_per_s
    );
    if args.python {
        match &python_way {
            Some(p) => println!(
                "python way:         {:.2} s = {:.0} events/s, {} snapshots for {} events; daemon {:.1}x faster",
                p.seconds,
                p.events_per_s,
                p.snapshots,
                p.events,
                events_per_s / p.events_per_s.max(1e-9)
            ),
            None => println!("python way:         failed (see above)"),
        }
    }
    // A run that lost anything is not a figure (and fails CI's smoke run).
    assert!(status.success(), "the daemon exited with {status}");
    assert_eq!(rejected, 0, "frames were rejected");
    assert!(args.fold_only || sizes.rows > 0, "no snapshot was written");
}
