//! The command line: what each subcommand does, as library functions that
//! return an exit status, so `main.rs` stays thin and tests can call them.

use crate::model::{EntityKey, EntityType};
use crate::settings::Settings;
use crate::store::{Store, StoreError, StoreOptions};

/// An error a command reports on one line of stderr before exiting non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error("{}", chain(.0))]
    Store(#[from] StoreError),
    #[error("{0}")]
    Usage(String),
    #[error("no snapshot of {0}")]
    NotFound(EntityKey),
    #[error("{bad} of {rows} snapshot rows failed verification")]
    VerifyFailed { rows: u64, bad: u64 },
    #[error("{0}")]
    Other(String),
}

/// An error and its causes on one line: `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    Store::connect(&StoreOptions {
        url: settings.database.url.clone(),
        pool_size: settings.database.pool_size,
    })
    .await
}

/// `snapshotd migrate`: create the snapshots table when missing.
pub async fn migrate(settings: &Settings) -> Result<(), CommandError> {
    let store = open_store(settings).await?;
    store.migrate().await?;
    store.close().await;
    println!(
        "snapshots table ready in {}",
        crate::store::redact(&settings.database.url)
    );
    Ok(())
}

/// `snapshotd get TYPE ID`: print the latest verified snapshot as JSON.
pub async fn get(
    settings: &Settings,
    entity_type: &str,
    entity_id: &str,
) -> Result<(), CommandError> {
    let entity_type: EntityType = entity_type
        .parse()
        .map_err(|e: crate::model::UnknownEntityType| CommandError::Usage(e.to_string()))?;
    let key = EntityKey::new(entity_type, entity_id);
    let store = open_store(settings).await?;
    let found = store.latest(&key).await;
    store.close().await;
    match found? {
        Some(snapshot) => {
            println!("{}", snapshot.to_json());
            Ok(())
        }
        None => Err(CommandError::NotFound(key)),
    }
}

/// `snapshotd verify`: recompute every stored hash; each bad row on stderr.
pub async fn verify(settings: &Settings) -> Result<(), CommandError> {
    let store = open_store(settings).await?;
    let report = store
        .verify_all(|bad| eprintln!("{}", chain(&bad.error)))
        .await;
    store.close().await;
    let report = report?;
    if report.bad > 0 {
        return Err(CommandError::VerifyFailed {
            rows: report.rows,
            bad: report.bad,
        });
    }
    println!("{} snapshot rows verified, all hashes match", report.rows);
    Ok(())
}
