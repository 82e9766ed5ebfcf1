//! `snapshotd`: parse the command line, load settings, set up logs, call the
//! library, map the outcome to an exit status.

use clap::{Parser, Subcommand};
use snapshotd::cli::{self, CommandError};
use snapshotd::settings::{Settings, Sources};
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc: measured against mimalloc and glibc malloc on the realistic
/// stabilize workload (BENCHMARKS.md, "Allocators again"): the least CPU
/// and the least memory of the three there. `--features system-alloc`
/// builds with the system allocator instead, which heaptrack and valgrind
/// can see into.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "snapshotd",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BUILT_FROM_COMMIT"), ")"),
    about = "Keeps snapshots of event-sourced entities current."
)]
struct Args {
    /// Configuration file (TOML), layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Stream NDJSON events from FILE (or stdin) to the daemon's socket.
    Send {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Wait until every event sent is folded and its snapshots committed.
        #[arg(long)]
        flush: bool,
        /// Send at most N frames a second (default: as fast as the daemon reads).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// NDJSON file; `-` or nothing reads stdin.
        file: Option<PathBuf>,
    },
    /// Print the running daemon's stats; non-zero when it does not answer.
    Status {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The stats as one JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print an entity's latest verified snapshot as JSON.
    Get {
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// workflow, stage or task.
        entity_type: String,
        entity_id: String,
    },
    /// Snapshot existing history from stabilize's events table.
    Backfill {
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Only this workflow (repeatable); default: every workflow with
        /// events beyond its latest snapshot.
        #[arg(long = "workflow", value_name = "ID")]
        workflows: Vec<String>,
        /// Only workflows with events after this sequence.
        #[arg(long, value_name = "N", default_value_t = 0)]
        since_sequence: i64,
        /// Also write the snapshots at every N-th event.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        every: Option<u32>,
    },
    /// Recompute every stored hash; non-zero exit on any mismatch.
    Verify {
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Also rebuild each snapshot from stabilize's events table with the
        /// daemon's reducer and compare the states, text-exact.
        #[arg(long)]
        replay: bool,
        /// With --replay: only this workflow (repeatable).
        #[arg(long = "workflow", value_name = "ID", requires = "replay")]
        workflows: Vec<String>,
        /// With --replay: the fraction of workflows checked (0 < F <= 1).
        #[arg(
            long,
            value_name = "FRACTION",
            default_value_t = 1.0,
            requires = "replay"
        )]
        sample: f64,
    },
    /// Create the snapshots table when missing.
    Migrate {
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Print the effective configuration.
    Config {
        /// Only validate; print nothing on success.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("snapshotd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), CommandError> {
    let command = args.command.unwrap_or(Command::Run);
    let mut sources = Sources {
        file: args.config,
        overrides: Vec::new(),
    };
    if let Command::Get {
        database_url: Some(url),
        ..
    }
    | Command::Verify {
        database_url: Some(url),
        ..
    }
    | Command::Migrate {
        database_url: Some(url),
    }
    | Command::Backfill {
        database_url: Some(url),
        ..
    } = &command
    {
        sources.overrides.push(("database.url".into(), url.clone()));
    }
    if let Command::Send {
        socket: Some(path), ..
    }
    | Command::Status {
        socket: Some(path), ..
    } = &command
    {
        sources
            .overrides
            .push(("socket.path".into(), path.display().to_string()));
    }
    let settings = Settings::load(&sources)?;
    if let Command::Config { check } = command {
        if !check {
            print!("{}", settings.to_toml());
        }
        return Ok(());
    }
    snapshotd::telemetry::init(&settings.log);
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CommandError::Other(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        match command {
            Command::Run => snapshotd::app::run(settings.clone())
                .await
                .map_err(CommandError::Other),
            Command::Send {
                file, flush, rate, ..
            } => cli::send(&settings.socket.path, file.as_deref(), flush, rate).await,
            Command::Status { json, .. } => cli::status(&settings.socket.path, json).await,
            Command::Get {
                entity_type,
                entity_id,
                ..
            } => cli::get(&settings, &entity_type, &entity_id).await,
            Command::Verify { replay: false, .. } => cli::verify(&settings).await,
            Command::Verify {
                workflows, sample, ..
            } => {
                if !(sample > 0.0 && sample <= 1.0) {
                    return Err(CommandError::Usage(format!(
                        "--sample {sample}: give a fraction above 0 and at most 1"
                    )));
                }
                cli::verify(&settings).await?;
                cli::verify_replay(&settings, &cli::ReplayOptions { workflows, sample }).await
            }
            Command::Backfill {
                workflows,
                since_sequence,
                every,
                ..
            } => cli::backfill(
                &settings,
                &cli::BackfillOptions {
                    workflows,
                    since_sequence,
                    every,
                },
            )
            .await
            .map(|_| ()),
            Command::Migrate { .. } => cli::migrate(&settings).await,
            Command::Config { .. } => unreachable!("handled above"),
        }
    })
}
