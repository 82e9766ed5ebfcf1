//! End-to-end load tool: generate stabilize-shaped events, start the real
//! release daemon, stream them with `snapshotd send --flush`, report events
//! per second, snapshots written and the daemon's resident memory.
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench load -- --events 1000000 --workflows 10000 \
//!     --database postgres://postgres@127.0.0.1:5432/test --event-interval 100
//! ```
//! `--database` is an admin URL: a fresh database is created beside it and
//! dropped afterwards (`sqlite` uses a temporary file). Figures are for one
//! run on a shared machine: compare ratios measured in the same run.

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    events: u64,
    workflows: u64,
    database: String,
    event_interval: u64,
    binary: PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        events: 1_000_000,
        workflows: 10_000,
        database: "sqlite".into(),
        event_interval: 100,
        binary: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/snapshotd"),
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
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Workflows run interleaved: each event goes to the next workflow in a
/// rotating window, with the lifecycle stabilize produces.
fn generate(path: &Path, events: u64, workflows: u64) -> u64 {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let per_workflow = events.div_ceil(workflows).max(1);
    let mut written = 0;
    for seq in 1..=events {
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
        writeln!(
            out,
            r#"{{"event_id":"01JDEV{seq:020}","event_type":"{event_type}","timestamp":"2026-11-26T03:59:48.{:06}+00:00","sequence":{seq},"entity_type":"{entity_type}","entity_id":"{entity_id}","workflow_id":"{wf}","version":{n},"data":{data},"metadata":{{"correlation_id":"{wf}","causation_id":null,"actor":"system","source_handler":null}},"schema_version":1}}"#,
            seq % 1_000_000
        )
        .unwrap();
        written += 1;
    }
    out.flush().unwrap();
    written
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

fn main() {
    let args = parse_args();
    assert!(
        args.binary.exists(),
        "{} is missing: run `cargo build --release` first",
        args.binary.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    let t = Instant::now();
    let events = generate(&file, args.events, args.workflows);
    let bytes = std::fs::metadata(&file).unwrap().len();
    eprintln!(
        "generated {events} events ({} MiB) in {:.1} s",
        bytes >> 20,
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
        runtime.block_on(async {
            let mut admin = PgConnection::connect(&args.database)
                .await
                .expect("connect to --database");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .unwrap();
        });
        let base = args.database.rsplit_once('/').unwrap().0;
        (format!("{base}/{name}"), Some(name))
    };

    let socket = dir.path().join("snapshotd.sock");
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
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rss_idle, _) = rss_kib(daemon.id());

    let t = Instant::now();
    let send = Command::new(&args.binary)
        .args(["send", "--flush", "--socket"])
        .arg(&socket)
        .arg(&file)
        .output()
        .expect("run snapshotd send");
    let elapsed = t.elapsed().as_secs_f64();
    assert!(
        send.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&send.stderr)
    );
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
        "send --flush:       {elapsed:.2} s = {:.0} events/s ({:.1} MiB/s)",
        events as f64 / elapsed,
        bytes as f64 / elapsed / 1048576.0
    );
    println!("snapshots written:  {}", stats["snapshots_written"]);
    println!(
        "daemon RSS:         {} MiB idle, {} MiB after, {} MiB peak",
        rss_idle >> 10,
        rss >> 10,
        hwm >> 10
    );
    println!(
        "active at the end:  {} entities ({:.1} KiB RSS each over idle)",
        stats["active_entities"],
        (rss.saturating_sub(rss_idle)) as f64
            / stats["active_entities"].as_f64().unwrap_or(0.0).max(1.0)
    );
    println!("SIGTERM to exit:    {shutdown:.2} s, {status}");

    if let Some(name) = drop_db {
        runtime.block_on(async {
            let mut admin = PgConnection::connect(&args.database).await.unwrap();
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await;
        });
    }
}
