//! The systemd units and the daemon's side of them.

use crate::helpers::{Backend, eventually};
use std::process::Command;

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_snapshotd");
    for unit in ["snapshotd.service", "snapshotd.socket"] {
        let text =
            std::fs::read_to_string(crate::helpers::repo().join("systemd").join(unit)).unwrap();
        // Point the unit at the binary under test instead of /usr/local/bin.
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/local/bin/snapshotd", binary),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("snapshotd.service"))
        .arg(dir.path().join("snapshotd.socket"))
        .output()
        .expect("systemd-analyze is needed for this test: apt-get install systemd");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "systemd-analyze verify: {printed}"
    );
}

#[test]
fn the_daemon_serves_a_socket_passed_by_systemd() {
    let backend = Backend::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(env!("CARGO_BIN_EXE_snapshotd"))
        .arg("run")
        // A different configured path proves the passed socket is used.
        .env("SNAPSHOTD_SOCKET__PATH", dir.path().join("unused.sock"))
        .env("SNAPSHOTD_DATABASE__URL", backend.url())
        .env("SNAPSHOTD_METRICS__ADDRESS", "")
        .spawn()
        .expect("systemd-socket-activate is needed for this test: apt-get install systemd");
    eventually(20, "the activation socket", || {
        socket.exists().then_some(())
    });
    // systemd-socket-activate starts the daemon on the first connection.
    let reply = {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(
        !dir.path().join("unused.sock").exists(),
        "the daemon bound its own socket too"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The messages the daemon sends to `NOTIFY_SOCKET`, as the test reads them.
struct Notifications {
    socket: std::os::unix::net::UnixDatagram,
}

impl Notifications {
    fn bind(path: &std::path::Path) -> Notifications {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        Notifications { socket }
    }

    /// Every message that arrives within `secs`.
    fn during(&self, secs: f64) -> Vec<String> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < until {
            if let Ok(n) = self.socket.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        }
        out
    }

    /// Wait up to `secs` for a message containing `what`; the messages until then.
    fn until(&self, secs: u64, what: &str) -> Vec<String> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                std::time::Instant::now() < until,
                "no {what} within {secs} s; got {out:?}"
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = text.contains(what);
                out.push(text);
                if done {
                    return out;
                }
            }
        }
    }
}

fn pings(messages: &[String]) -> usize {
    messages.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[tokio::test]
async fn the_daemon_keeps_its_systemd_contract_ready_watchdog_and_stopping() {
    use sqlx::Connection;
    let backend = Backend::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::bind(&dir.path().join("notify.sock"));
    let mut daemon = crate::helpers::Daemon::start_with_env(
        dir.path(),
        &backend.url(),
        "[policy]\nevent_interval = 1\n",
        &[
            (
                "NOTIFY_SOCKET",
                dir.path().join("notify.sock").display().to_string(),
            ),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
    );
    // READY=1 comes once the socket listens and the store answered (the
    // store was migrated before it), with a STATUS line.
    let first = notify.until(10, "READY=1");
    assert!(
        std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok(),
        "READY before the socket listens"
    );
    assert!(first.last().unwrap().contains("STATUS="), "{first:?}");
    // WATCHDOG=1 about twice a second (half of WATCHDOG_USEC), with status.
    let healthy = notify.during(2.2);
    assert!(pings(&healthy) >= 3, "{healthy:?}");
    assert!(
        healthy
            .iter()
            .any(|m| m.contains("entities active") && m.contains("store up")),
        "{healthy:?}"
    );

    // Make the writer stuck: hold a lock on the snapshots table that lets
    // readers through (hydration) but not writers, while an
    // event falls due, so its commit waits forever.
    let Backend::Postgres(db) = &backend else {
        unreachable!()
    };
    let mut holder = db.connect().await;
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE snapshots IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let event = serde_json::json!({
        "event_id": "E1", "event_type": "context.updated",
        "timestamp": "2026-11-26T03:59:48.120000+00:00", "sequence": 1,
        "entity_type": "workflow", "entity_id": "stuck", "workflow_id": "stuck",
        "version": 1, "data": {"context": {"x": 1}}, "metadata": {}, "schema_version": 1,
    });
    let sender = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
            let _ = writeln!(stream, "{event}");
            std::thread::sleep(std::time::Duration::from_secs(8));
        })
    };
    // Once the daemon reports the writer stuck (pings sent before that,
    // still buffered, are read here), no ping may come.
    let before = notify.until(10, "writer not answering");
    assert!(
        before
            .last()
            .is_some_and(|m| m.contains("writer not answering")),
        "the writer never got stuck: {before:?}"
    );
    let stuck = notify.during(3.0);
    assert_eq!(
        pings(&stuck),
        0,
        "pinged while the writer was stuck: {stuck:?}"
    );
    assert!(
        stuck.iter().any(|m| m.contains("writer not answering")),
        "{stuck:?}"
    );
    // Released, the writer answers again and the pings resume.
    lock.rollback().await.unwrap();
    let resumed = notify.until(10, "WATCHDOG=1");
    assert!(!resumed.is_empty());
    sender.join().unwrap();

    // STOPPING=1 on SIGTERM, before the exit.
    let status = daemon.terminate();
    assert!(status.success(), "{}", daemon.log());
    let last = notify.during(0.5);
    assert!(last.iter().any(|m| m.contains("STOPPING=1")), "{last:?}");
    assert!(
        daemon.log().contains("The writer is not answering"),
        "{}",
        daemon.log()
    );
}
