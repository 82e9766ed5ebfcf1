//! Logging set-up (tracing-subscriber), plain or JSON lines.

use crate::settings::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Install the global subscriber: level from `RUST_LOG` when set, else from
/// the settings; logs go to stderr so stdout stays for command output.
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match log.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
