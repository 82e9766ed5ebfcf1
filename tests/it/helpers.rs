//! Test helpers: a fresh Postgres database per test, a temporary SQLite
//! file, the stabilize virtualenv, paths. Nothing is skipped: when a part
//! is missing, the test fails and says how to get it.

use snapshotd::store::{Store, StoreOptions};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared` beside the repository: the spec, the vectors.
pub fn shared() -> PathBuf {
    let path = repo().join("../shared");
    assert!(
        path.join("vectors").is_dir(),
        "{} is missing: the test vectors live in ../shared/vectors beside the repository",
        path.display()
    );
    path
}

/// The Python interpreter of the virtualenv with stabilize 0.33.1.
pub fn python() -> PathBuf {
    let path = std::env::var_os("STABILIZE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with stabilize at {}: run .ci/run, or `python3 -m venv .venv && \
         .venv/bin/pip install stabilize==0.33.1 'psycopg[binary]' psycopg_pool`, \
         or set STABILIZE_PYTHON",
        path.display()
    );
    path
}

/// Run a script of `tests/python` with the venv's Python; panics with its
/// stderr when it fails. Returns stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let output = Command::new(python())
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("start python");
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("python prints UTF-8")
}

/// A unique, lowercase name for a database or file.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The admin URL of a reachable server: `DATABASE_URL`, the default, or a
/// private server started from the system's PostgreSQL binaries.
fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let wanted = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        if reachable(&wanted) {
            return wanted;
        }
        start_private_server()
    })
}

fn reachable(url: &str) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                PgConnection::connect(&url),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
        })
    })
    .join()
    .unwrap_or(false)
}

/// initdb + pg_ctl in a temporary directory, on a free port. The directory
/// is kept for the life of the test process.
fn start_private_server() -> String {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin"))
                .find(|b| b.join("initdb").exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server is reachable at DATABASE_URL or {DEFAULT_ADMIN_URL}, and no \
                 PostgreSQL binaries are installed to start one: `apt-get install postgresql` \
                 (or run .ci/run, which does)"
            )
        });
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let data = dir.join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run a PostgreSQL binary");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args(["-U", "postgres", "--auth=trust", "-D"])
        .arg(&data);
    // initdb refuses to run as root; the test process may be root in CI.
    let as_postgres = is_root();
    if as_postgres {
        run(Command::new("chown").args(["-R", "postgres"]).arg(&dir));
    }
    run(&mut maybe_as_postgres(initdb, as_postgres));
    let mut pg_ctl = Command::new(bin.join("pg_ctl"));
    pg_ctl.arg("-D").arg(&data).args([
        "-w",
        "-l",
        &dir.join("log").display().to_string(),
        "-o",
        &format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            dir.display()
        ),
        "start",
    ]);
    run(&mut maybe_as_postgres(pg_ctl, as_postgres));
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn maybe_as_postgres(cmd: Command, as_postgres: bool) -> Command {
    if !as_postgres {
        return cmd;
    }
    let mut wrapped = Command::new("runuser");
    wrapped
        .args(["-u", "postgres", "--"])
        .arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    wrapped
}

/// A fresh Postgres database, dropped when this value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = admin_url();
        let name = unique_name("snapshotd_test");
        let mut conn = PgConnection::connect(admin)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        conn.close().await.ok();
        let base = admin.rsplit_once('/').expect("admin URL has a database").0;
        TestDb {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// A direct connection, for SQL a test needs (tampering, inspection).
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Make the database unreachable (existing connections cut, new ones
    /// refused) or reachable again: a store outage.
    pub async fn set_reachable(&self, reachable: bool) {
        let mut admin = PgConnection::connect(admin_url())
            .await
            .expect("connect as admin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {reachable}",
            self.name
        )))
        .execute(&mut admin)
        .await
        .expect("toggle connections");
        if !reachable {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await
            .expect("cut connections");
        }
    }

    /// The libpq form of the URL, for Python.
    pub fn dsn(&self) -> String {
        self.url.replacen("postgres://", "postgresql://", 1)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = admin_url().to_string();
        let name = self.name.clone();
        // Drop runs outside any runtime we can block on: use a thread.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            })
        })
        .join();
    }
}

/// A temporary SQLite file, removed with its directory.
pub struct TestSqlite {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestSqlite {
    pub fn new() -> TestSqlite {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("snapshots.db");
        TestSqlite { _dir: dir, path }
    }

    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

/// The two backends, for tests that run on both.
pub enum Backend {
    Postgres(TestDb),
    Sqlite(TestSqlite),
}

impl Backend {
    pub async fn postgres() -> Backend {
        Backend::Postgres(TestDb::new().await)
    }

    pub fn sqlite() -> Backend {
        Backend::Sqlite(TestSqlite::new())
    }

    pub fn url(&self) -> String {
        match self {
            Backend::Postgres(db) => db.url.clone(),
            Backend::Sqlite(file) => file.url(),
        }
    }

    /// Arguments naming this backend for the Python scripts.
    pub fn python_args(&self) -> Vec<String> {
        match self {
            Backend::Postgres(db) => vec![
                "--backend".into(),
                "postgres".into(),
                "--dsn".into(),
                db.dsn(),
            ],
            Backend::Sqlite(file) => vec![
                "--backend".into(),
                "sqlite".into(),
                "--path".into(),
                file.path.display().to_string(),
            ],
        }
    }

    pub async fn store(&self) -> Store {
        let store = Store::connect(&StoreOptions {
            url: self.url(),
            pool_size: 4,
        })
        .await
        .expect("connect the store");
        store.migrate().await.expect("migrate");
        store
    }

    /// Run one SQL statement directly (tampering in tests).
    /// Per workflow in stabilize's events table: its number of events and
    /// the version of its latest snapshot (0 when none).
    pub async fn coverage(&self) -> Vec<(String, i64, i64)> {
        const SQL: &str = "SELECT e.workflow_id, count(*), coalesce((SELECT max(s.version) \
             FROM snapshots s WHERE s.entity_type = 'workflow' AND s.entity_id = e.workflow_id), 0) \
             FROM events e GROUP BY e.workflow_id ORDER BY e.workflow_id";
        match self {
            Backend::Postgres(db) => {
                let mut conn = db.connect().await;
                let rows: Vec<(String, i64, i32)> = sqlx::query_as(SQL)
                    .fetch_all(&mut conn)
                    .await
                    .expect("read coverage");
                rows.into_iter()
                    .map(|(w, n, v)| (w, n, i64::from(v)))
                    .collect()
            }
            Backend::Sqlite(file) => {
                let mut conn = sqlx::SqliteConnection::connect(&file.url())
                    .await
                    .expect("open the SQLite file");
                sqlx::query_as(SQL)
                    .fetch_all(&mut conn)
                    .await
                    .expect("read coverage")
            }
        }
    }

    pub async fn execute(&self, sql: &str) {
        match self {
            Backend::Postgres(db) => {
                let mut conn = db.connect().await;
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut conn)
                    .await
                    .expect("run test SQL");
            }
            Backend::Sqlite(file) => {
                let mut conn = sqlx::SqliteConnection::connect(&file.url())
                    .await
                    .expect("open the SQLite file");
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut conn)
                    .await
                    .expect("run test SQL");
            }
        }
    }
}

/// Write `lines` to a file in `dir` and return its path.
pub fn write_lines(dir: &Path, name: &str, lines: impl IntoIterator<Item = String>) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// The real `snapshotd` binary running as a daemon on a temporary socket.
pub struct Daemon {
    child: Option<std::process::Child>,
    database_url: String,
    metrics: String,
    /// More environment for the daemon (e.g. `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub stderr_log: PathBuf,
}

impl Daemon {
    /// Start `snapshotd run` with `database_url` and a config file of
    /// `extra_toml`; socket and database come from the environment. Waits
    /// until the socket answers.
    pub fn start(dir: &Path, database_url: &str, extra_toml: &str) -> Daemon {
        Self::start_with_metrics(dir, database_url, extra_toml, "")
    }

    /// [`Daemon::start`] with `metrics.address` set (empty turns it off).
    pub fn start_with_metrics(
        dir: &Path,
        database_url: &str,
        extra_toml: &str,
        metrics: &str,
    ) -> Daemon {
        let mut daemon = Self::configured(dir, database_url, extra_toml, metrics);
        daemon.spawn();
        daemon
    }

    /// The daemon's files and settings, not started yet.
    fn configured(dir: &Path, database_url: &str, extra_toml: &str, metrics: &str) -> Daemon {
        let socket = dir.join("snapshotd.sock");
        let config = dir.join("snapshotd.toml");
        let stderr_log = dir.join(format!("{}.log", unique_name("daemon")));
        std::fs::write(&config, extra_toml).unwrap();
        Daemon {
            child: None,
            database_url: database_url.to_string(),
            metrics: metrics.to_string(),
            env: Vec::new(),
            socket,
            config,
            stderr_log,
        }
    }

    /// [`Daemon::start`] with more environment variables.
    pub fn start_with_env(
        dir: &Path,
        database_url: &str,
        extra_toml: &str,
        env: &[(&str, String)],
    ) -> Daemon {
        let mut daemon = Self::configured(dir, database_url, extra_toml, "");
        daemon.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.stderr_log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_snapshotd"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            // The environment layer, as an operator would use it.
            .env("SNAPSHOTD_SOCKET__PATH", &self.socket)
            .env("SNAPSHOTD_DATABASE__URL", &self.database_url)
            .env("SNAPSHOTD_METRICS__ADDRESS", &self.metrics)
            .env("RUST_LOG", "snapshotd=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(log)
            .spawn()
            .expect("start snapshotd");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("snapshotd exited at start ({status}):\n{}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "snapshotd did not listen in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Start the same daemon again (after `kill` or `terminate`).
    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The daemon's peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        self.proc_status_mib("VmHWM:")
    }

    /// The daemon's resident memory now (`VmRSS`), in MiB.
    pub fn rss_mib(&self) -> u64 {
        self.proc_status_mib("VmRSS:")
    }

    fn proc_status_mib(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib / 1024
    }

    /// `snapshotd send [--flush] FILE` against this daemon.
    pub fn send_file(&self, file: &Path, flush: bool) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapshotd"));
        cmd.arg("send").arg("--socket").arg(&self.socket);
        if flush {
            cmd.arg("--flush");
        }
        cmd.arg(file)
            .env_remove("RUST_LOG")
            .output()
            .expect("run snapshotd send")
    }

    /// Send lines on a new connection, then the command; return every reply line.
    pub fn converse(&self, lines: &[Vec<u8>]) -> Vec<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        for line in lines {
            stream.write_all(line).unwrap();
            stream.write_all(b"\n").unwrap();
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        std::io::BufReader::new(stream)
            .lines()
            .map(|l| serde_json::from_str(&l.expect("read a reply")).expect("a reply is JSON"))
            .collect()
    }

    /// One command on its own connection; its reply, or `None` when none
    /// came within `wait` (the caller then shows the daemon's log).
    pub fn try_command(
        &self,
        command: serde_json::Value,
        wait: std::time::Duration,
    ) -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.set_read_timeout(Some(wait)).ok()?;
        stream.write_all(command.to_string().as_bytes()).ok()?;
        stream.write_all(b"\n").ok()?;
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// One command on its own connection; its reply.
    pub fn command(&self, command: serde_json::Value) -> serde_json::Value {
        let mut replies = self.converse(&[command.to_string().into_bytes()]);
        assert_eq!(replies.len(), 1, "{replies:?}");
        replies.remove(0)
    }

    /// Send a signal by name (`STOP`, `CONT`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "snapshotd ignored SIGTERM for 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

use std::process::Output;

/// Start a script of `tests/python` in the background, its output piped.
pub fn spawn_python(script: &str, args: &[String]) -> std::process::Child {
    Command::new(python())
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python")
}

/// Wait until the daemon has received more than `events` on its socket.
pub fn wait_for_received(daemon: &Daemon, events: u64) {
    eventually(120, "the stream to reach the daemon", || {
        let stats = daemon.command(serde_json::json!({"op": "stats"}))["stats"].clone();
        (stats["events_received"].as_u64().unwrap_or(0) > events).then_some(())
    });
}

/// Poll `check` until it returns `Some`, for at most `secs` seconds.
pub fn eventually<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
