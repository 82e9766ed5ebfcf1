//! The CLI skeleton, through the real binary.

use crate::helpers::Backend;
use serde_json::json;
use snapshotd::model::{EntityKey, EntityType, Snapshot};
use std::process::{Command, Output};

fn snapshotd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapshotd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run snapshotd")
}

#[tokio::test]
async fn verify_and_get_fail_on_a_tampered_row_and_name_the_entity() {
    for backend in [Backend::postgres().await, Backend::sqlite()] {
        let url = backend.url();
        let migrate = snapshotd(&["migrate", "--database-url", &url]);
        assert!(
            migrate.status.success(),
            "{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        let store = backend.store().await;
        let key = EntityKey::new(EntityType::Workflow, "wf-tamper");
        store
            .save_batch(&[
                Snapshot::new(key, "wf-tamper", 3, 42, json!({"status": "RUNNING"})).unwrap(),
            ])
            .await
            .unwrap();

        let get = snapshotd(&["get", "--database-url", &url, "workflow", "wf-tamper"]);
        assert!(
            get.status.success(),
            "{}",
            String::from_utf8_lossy(&get.stderr)
        );
        let printed: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
        assert_eq!(printed["state"], json!({"status": "RUNNING"}));
        assert_eq!(printed["version"], 3);
        assert!(
            snapshotd(&["verify", "--database-url", &url])
                .status
                .success()
        );

        let tamper = match backend {
            Backend::Postgres(_) => {
                "UPDATE snapshots SET state = jsonb_set(state, '{status}', '\"SUCCEEDED\"')"
            }
            Backend::Sqlite(_) => "UPDATE snapshots SET state = '{\"status\": \"SUCCEEDED\"}'",
        };
        backend.execute(tamper).await;

        let verify = snapshotd(&["verify", "--database-url", &url]);
        let stderr = String::from_utf8_lossy(&verify.stderr);
        assert!(!verify.status.success());
        assert!(stderr.contains("workflow/wf-tamper"), "{stderr}");
        assert!(stderr.contains("1 of 1 snapshot rows failed"), "{stderr}");

        let get = snapshotd(&["get", "--database-url", &url, "workflow", "wf-tamper"]);
        let stderr = String::from_utf8_lossy(&get.stderr);
        assert!(!get.status.success());
        assert!(
            stderr.contains("integrity check failed for workflow/wf-tamper"),
            "{stderr}"
        );
        assert!(get.stdout.is_empty());
    }
}

#[test]
fn get_of_a_missing_entity_exits_non_zero_with_a_reason() {
    let backend = Backend::sqlite();
    let url = backend.url();
    assert!(
        snapshotd(&["migrate", "--database-url", &url])
            .status
            .success()
    );
    let get = snapshotd(&["get", "--database-url", &url, "workflow", "nobody"]);
    assert!(!get.status.success());
    assert_eq!(
        String::from_utf8_lossy(&get.stderr).trim(),
        "snapshotd: no snapshot of workflow/nobody"
    );
}

#[test]
fn a_bad_configuration_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[policy]\nevent_interval = -1\n[log]\nformat = \"xml\"\n",
    )
    .unwrap();
    let out = snapshotd(&["--config", file.to_str().unwrap(), "config", "--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("policy.event_interval") && stderr.contains("log.format"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn status_prints_the_daemons_stats_and_fails_when_nobody_answers() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = crate::helpers::Daemon::start(dir.path(), &backend.url(), "");
    let socket = daemon.socket.display().to_string();

    let table = snapshotd(&["status", "--socket", &socket]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(
        text.contains("table feed\n") && text.contains("  events_received "),
        "{text}"
    );

    let json_out = snapshotd(&["status", "--json", "--socket", &socket]);
    assert!(json_out.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&json_out.stdout).expect("JSON");
    assert_eq!(stats["store_up"], true, "{stats}");

    let nobody = dir.path().join("nobody.sock").display().to_string();
    let down = snapshotd(&["status", "--socket", &nobody]);
    assert!(!down.status.success());
    let error = String::from_utf8_lossy(&down.stderr);
    assert!(
        error.contains("is not answering") && error.contains("nobody.sock"),
        "{error}"
    );
}

#[test]
fn send_at_a_rate_delivers_every_frame_and_refuses_a_rate_of_zero() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let daemon = crate::helpers::Daemon::start(dir.path(), &backend.url(), "");
    let socket = daemon.socket.display().to_string();
    let mut lines = String::new();
    for seq in 1..=40 {
        let event = serde_json::json!({
            "event_type": "context.updated", "timestamp": "2026-11-26T03:59:48.120000+00:00",
            "sequence": seq, "entity_type": "workflow", "entity_id": "paced",
            "workflow_id": "paced", "data": {"context": {"n": seq}},
        });
        lines.push_str(&format!("{event}\n"));
    }
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, lines).unwrap();
    let file = file.display().to_string();

    let sent = snapshotd(&[
        "send", "--flush", "--rate", "400", "--socket", &socket, &file,
    ]);
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(sent.status.success(), "{stderr}");
    assert!(
        stderr.contains("sent 40 frames") && stderr.contains("0 rejected"),
        "{stderr}"
    );
    let status = snapshotd(&["status", "--json", "--socket", &socket]);
    let stats: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(stats["events_received"], 40, "{stats}");

    let zero = snapshotd(&["send", "--rate", "0", "--socket", &socket, &file]);
    let error = String::from_utf8_lossy(&zero.stderr);
    assert!(
        !zero.status.success() && error.contains("--rate"),
        "{error}"
    );
}
