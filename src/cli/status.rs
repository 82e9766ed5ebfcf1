//! `snapshotd status`: the daemon's `stats`, for a person or a script.

use super::CommandError;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// How long the daemon has to answer before it counts as not answering.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Ask the daemon at `socket` for its stats; print them as a table (or
/// JSON); fail when it does not answer.
pub async fn status(socket: &Path, json: bool) -> Result<(), CommandError> {
    let stats = tokio::time::timeout(ANSWER_WITHIN, ask(socket))
        .await
        .map_err(|_| {
            CommandError::Other(format!(
                "the daemon at {} did not answer within {} s",
                socket.display(),
                ANSWER_WITHIN.as_secs()
            ))
        })??;
    if json {
        println!("{stats}");
    } else {
        print!("{}", table(&stats));
    }
    Ok(())
}

async fn ask(socket: &Path) -> Result<Value, CommandError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let not_answering = |e: std::io::Error| {
        CommandError::Other(format!(
            "the daemon at {} is not answering: {e}",
            socket.display()
        ))
    };
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(not_answering)?;
    stream
        .write_all(b"{\"op\":\"stats\"}\n")
        .await
        .map_err(not_answering)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(not_answering)?;
    let reply: Value = serde_json::from_str(&line).map_err(|_| {
        CommandError::Other(format!(
            "the daemon at {} answered something that is not a stats reply: {}",
            socket.display(),
            line.trim()
        ))
    })?;
    match reply.get("stats") {
        Some(stats) if reply["ok"] == true => Ok(stats.clone()),
        _ => Err(CommandError::Other(format!(
            "the daemon refused the stats command: {}",
            line.trim()
        ))),
    }
}

/// The stats as aligned `name  value` lines, in groups.
fn table(stats: &Value) -> String {
    const GROUPS: &[(&str, &[&str])] = &[
        (
            "daemon",
            &["uptime_secs", "store_up", "connections", "active_entities"],
        ),
        (
            "events",
            &[
                "events_received",
                "events_invalid",
                "events_duplicate",
                "events_late",
            ],
        ),
        (
            "table feed",
            &[
                "feed_events",
                "feed_cursor_sequence",
                "feed_events_behind",
                "feed_lag_seconds",
                "feed_errors",
            ],
        ),
        (
            "snapshots",
            &[
                "snapshots_written",
                "writer_pending",
                "snapshots_rejected",
                "snapshots_too_large",
                "snapshots_uncovered",
                "write_errors",
                "snapshot_latency",
                "batch_commit",
            ],
        ),
        (
            "entities",
            &[
                "hydrations",
                "rebuilds",
                "actor_restarts",
                "passivations_for_room",
                "connections_unread",
            ],
        ),
    ];
    let width = GROUPS
        .iter()
        .flat_map(|(_, keys)| keys.iter())
        .map(|k| k.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (group, keys) in GROUPS {
        out.push_str(group);
        out.push('\n');
        for key in *keys {
            let value = match stats.get(*key) {
                Some(Value::String(s)) => s.clone(),
                // A latency summary (`Latencies::to_json`).
                Some(Value::Object(q)) if q.contains_key("p99_ms") => format!(
                    "p50 {} ms, p99 {} ms, max {} ms over {}",
                    q["p50_ms"], q["p99_ms"], q["max_ms"], q["count"]
                ),
                Some(v) => v.to_string(),
                None => "-".into(),
            };
            out.push_str(&format!("  {key:<width$}  {value}\n"));
        }
    }
    if let Some(cluster) = stats.get("cluster").filter(|c| c.is_object()) {
        let owned: Vec<String> = cluster["owned"]
            .as_array()
            .map(|a| a.iter().map(Value::to_string).collect())
            .unwrap_or_default();
        out.push_str("cluster\n");
        let lines = [
            (
                "node_id",
                cluster["node_id"].as_str().unwrap_or("-").to_string(),
            ),
            (
                "partitions_owned",
                format!("{} of {}", owned.len(), cluster["partitions"]),
            ),
            ("owned", owned.join(",")),
        ];
        for (key, value) in lines {
            out.push_str(&format!("  {key:<width$}  {value}\n"));
        }
        for key in [
            "partitions_acquired",
            "partitions_released",
            "partitions_lost",
            "snapshots_fenced",
            "events_not_owned",
        ] {
            let value = stats.get(key).map_or("-".into(), Value::to_string);
            out.push_str(&format!("  {key:<width$}  {value}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_group_and_marks_what_is_missing() {
        let text = table(&serde_json::json!({"events_received": 7, "store_up": true}));
        assert!(text.contains("events\n"), "{text}");
        assert!(text.contains("  events_received "), "{text}");
        assert!(text.lines().any(|l| l.trim_end().ends_with(" 7")), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("feed_errors") && l.trim_end().ends_with('-')),
            "{text}"
        );
        assert!(!text.contains("cluster"), "{text}");
        let text = table(&serde_json::json!({"snapshot_latency":
            {"count": 3, "p50_ms": 12.5, "p99_ms": 40.0, "max_ms": 41.2}}));
        assert!(
            text.contains("p50 12.5 ms, p99 40.0 ms, max 41.2 ms over 3"),
            "{text}"
        );
    }

    #[test]
    fn a_cluster_node_shows_its_id_and_partitions() {
        let text = table(&serde_json::json!({
            "partitions_lost": 2,
            "cluster": {"node_id": "n1", "partitions": 64, "owned": [3, 4, 9]},
        }));
        assert!(text.contains("cluster\n"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("node_id") && l.ends_with(" n1")),
            "{text}"
        );
        assert!(text.contains("3 of 64"), "{text}");
        assert!(text.contains("3,4,9"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("partitions_lost") && l.ends_with(" 2")),
            "{text}"
        );
    }
}
