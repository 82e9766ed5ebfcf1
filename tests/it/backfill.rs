//! `snapshotd backfill` on history stabilize wrote before the daemon
//! existed: exact snapshots, `--every`, and an interrupted run resumed.

use crate::crosscheck::{generate_with, verify};
use crate::helpers::{Backend, Daemon, eventually};
use std::process::{Command, Output, Stdio};

fn backfill(backend: &Backend, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["backfill", "--database-url", &backend.url()])
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("run snapshotd backfill")
}

/// The numbers in the `backfill: done: W workflows, E events ..., S snapshots written` line.
fn done_line(out: &Output) -> (u64, u64, u64) {
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("backfill: done: "))
        .unwrap_or_else(|| panic!("no summary line in:\n{text}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1], *numbers.last().unwrap())
}

async fn assert_all_covered(backend: &Backend) {
    for (workflow, events, version) in backend.coverage().await {
        assert_eq!(events, version, "{workflow}");
    }
}

async fn history_is_backfilled(backend: Backend, every: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    generate_with(&backend, dir.path(), 150, false, &[]);
    let mut args = vec![];
    if let Some(n) = every {
        args.extend(["--every", n]);
    }
    let out = backfill(&backend, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (workflows, events, snapshots) = done_line(&out);
    assert_eq!(workflows, 150);
    assert!(events > 1500, "{events} events");
    assert_all_covered(&backend).await;
    let rows = verify(&backend, 150)["rows"].as_u64().unwrap();
    assert_eq!(rows, snapshots);
    if every.is_some() {
        assert!(rows > 3 * 150, "only {rows} rows with --every");
    }
    // Nothing is left to do: a second run reads and writes nothing.
    let again = backfill(&backend, &args);
    assert!(again.status.success());
    assert_eq!(done_line(&again), (0, 0, 0));
}

#[tokio::test]
async fn history_written_before_the_daemon_is_backfilled_on_postgres() {
    history_is_backfilled(Backend::postgres().await, None).await;
}

#[tokio::test]
async fn history_is_backfilled_with_every_nth_snapshot_on_sqlite() {
    history_is_backfilled(Backend::sqlite(), Some("4")).await;
}

#[tokio::test]
async fn history_is_backfilled_with_every_nth_snapshot_on_postgres() {
    history_is_backfilled(Backend::postgres().await, Some("4")).await;
}

#[tokio::test]
async fn an_interrupted_backfill_resumes_without_redoing_finished_workflows() {
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    generate_with(&backend, dir.path(), 1200, false, &[]);
    let child = Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(["backfill", "--database-url", &backend.url()])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first batch (500 workflows) is committed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let covered = backend
            .coverage()
            .await
            .iter()
            .filter(|(_, events, version)| events == version)
            .count();
        if covered >= 500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first batch never landed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let first = child.wait_with_output().unwrap();
    let first_rows = backend
        .coverage()
        .await
        .iter()
        .filter(|(_, events, version)| events == version)
        .count() as u64;
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("backfill: 1200 workflows"),
        "no progress output: {}",
        String::from_utf8_lossy(&first.stderr)
    );

    let second = backfill(&backend, &[]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let (workflows, _, snapshots) = done_line(&second);
    // Only what the first run had not committed is done again.
    assert_eq!(
        workflows,
        1200 - first_rows,
        "first run covered {first_rows}"
    );
    assert_eq!(snapshots, workflows);
    assert_all_covered(&backend).await;
    verify(&backend, 1200);
}

/// `verify --replay` rebuilds every row from the events table: it passes on
/// exact rows and catches one whose state and hash were both rewritten,
/// which plain `verify` (hashes only) cannot see.
async fn replay_catches_a_consistent_forgery(backend: Backend) {
    use snapshotd::model::canonical::state_hash;
    let dir = tempfile::tempdir().unwrap();
    generate_with(&backend, dir.path(), 40, false, &[]);
    let filled = backfill(&backend, &["--every", "3"]);
    assert!(
        filled.status.success(),
        "{}",
        String::from_utf8_lossy(&filled.stderr)
    );
    let verify = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_snapshotd"))
            .args(["verify", "--database-url", &backend.url()])
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let clean = verify(&["--replay"]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("equal stabilize's replay"));

    // Rewrite one row's state and hash so that they agree with each other.
    let store = backend.store().await;
    let (workflow, _, _) = backend.coverage().await.remove(0);
    let key =
        snapshotd::model::EntityKey::new(snapshotd::model::EntityType::Workflow, workflow.clone());
    let mut forged = store.latest(&key).await.unwrap().unwrap();
    forged.state["status"] = serde_json::json!("FORGED");
    let hash = state_hash(&forged.state).unwrap();
    let text = forged.state.to_string().replace('\'', "''");
    backend
        .execute(&format!(
            "UPDATE snapshots SET state = '{text}', state_hash = '{hash}' \
             WHERE entity_type = 'workflow' AND entity_id = '{workflow}' AND version = {}",
            forged.version
        ))
        .await;
    assert!(
        verify(&[]).status.success(),
        "plain verify sees nothing wrong"
    );
    let caught = verify(&["--replay"]);
    let report = String::from_utf8_lossy(&caught.stderr);
    assert!(!caught.status.success());
    assert!(
        report.contains(&format!("workflow/{workflow} version {}", forged.version))
            && report.contains("at `status`")
            && report.contains("1 of "),
        "{report}"
    );
    // Sampling and naming workflows work too.
    let named = verify(&["--replay", "--workflow", &workflow]);
    assert!(!named.status.success());
    assert!(verify(&["--replay", "--sample", "0"]).status.code() != Some(0));

    // The daemon's background scrub finds it too, and counts every row.
    let mut rows = 0;
    for id in store.workflows_with_snapshots().await.unwrap() {
        let key = snapshotd::model::EntityKey::new(snapshotd::model::EntityType::Workflow, id);
        rows += store.snapshots_of(&key).await.unwrap().len() as u64;
    }
    // The table feed off: nothing new is written while the scrub reads.
    let daemon = Daemon::start(
        dir.path(),
        &backend.url(),
        "[feed]\ntable = \"off\"\n[verify]\ninterval_secs = 1\nsample = 1.0\n",
    );
    let stats = eventually(60, "a full scrub round", || {
        let stats = daemon.command(serde_json::json!({"op": "stats"}))["stats"].clone();
        (stats["verify_checked"].as_u64()? >= rows).then_some(stats)
    });
    assert!(stats["verify_mismatch"].as_u64() >= Some(1), "{stats}");
    let log = daemon.log();
    assert!(
        log.contains(&format!("workflow/{workflow} version {}", forged.version))
            && log.contains("differs from the replay at `status`"),
        "{log}"
    );
    // Only the forged row: at most one mismatch per round begun.
    let mismatch = stats["verify_mismatch"].as_u64().unwrap();
    let checked = stats["verify_checked"].as_u64().unwrap();
    assert!(mismatch <= checked.div_ceil(rows), "{rows} rows: {stats}");
    assert_eq!(
        log.matches("Verify scrub: a stored snapshot differs")
            .count() as u64,
        mismatch,
        "{log}"
    );
}

#[tokio::test]
async fn verify_replay_catches_a_consistent_forgery_on_postgres() {
    replay_catches_a_consistent_forgery(Backend::postgres().await).await;
}

#[tokio::test]
async fn verify_replay_catches_a_consistent_forgery_on_sqlite() {
    replay_catches_a_consistent_forgery(Backend::sqlite()).await;
}
