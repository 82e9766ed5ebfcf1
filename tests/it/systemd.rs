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
