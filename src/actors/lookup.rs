//! Batched hydration lookups: a policy actor starting for an entity asks
//! for its newest snapshot (the writer's uncommitted one, else the store's
//! latest); this service gathers the questions that arrive while it is
//! busy and answers them with one writer call and one store query per
//! batch, instead of one of each per entity. Order and meaning are those of
//! the single lookup: the writer is asked first, so a snapshot committed in
//! between is found in the store.

use super::messages::WriterMsg;
use crate::model::{EntityKey, Snapshot};
use crate::store::{Store, StoreError};
use ractor::ActorRef;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most entities answered by one batch.
const MAX_BATCH: usize = 500;

type Answer = Result<Option<Snapshot>, StoreError>;

/// Where policy actors send their lookups; cheap to clone.
#[derive(Clone)]
pub struct Lookups {
    tx: mpsc::UnboundedSender<(EntityKey, oneshot::Sender<Answer>)>,
    store: Store,
    writer: ActorRef<WriterMsg>,
}

impl Lookups {
    /// Start the service.
    pub fn spawn(store: Store, writer: ActorRef<WriterMsg>) -> Lookups {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(store.clone(), writer.clone(), rx));
        Lookups { tx, store, writer }
    }

    /// The entity's newest snapshot: pending with the writer, else stored
    /// (verified; a row that fails verification is an `Err`).
    pub async fn newest(&self, key: &EntityKey) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.tx.send((key.clone(), reply)).is_ok()
            && let Ok(answer) = answer.await
        {
            return answer;
        }
        // The service is gone (it failed): ask directly.
        tracing::warn!(entity = %key, "The lookup service is gone; looking up alone.");
        newest_alone(&self.store, &self.writer, key).await
    }
}

/// One entity's lookup, unbatched.
async fn newest_alone(store: &Store, writer: &ActorRef<WriterMsg>, key: &EntityKey) -> Answer {
    if let Ok(ractor::rpc::CallResult::Success(Some(pending))) = writer
        .call(
            |reply| WriterMsg::PendingFor(key.clone(), reply),
            Some(Duration::from_secs(30)),
        )
        .await
    {
        return Ok(Some(pending));
    }
    store.latest(key).await
}

async fn serve(
    store: Store,
    writer: ActorRef<WriterMsg>,
    mut rx: mpsc::UnboundedReceiver<(EntityKey, oneshot::Sender<Answer>)>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        answer(&store, &writer, std::mem::take(&mut batch)).await;
    }
}

async fn answer(
    store: &Store,
    writer: &ActorRef<WriterMsg>,
    batch: Vec<(EntityKey, oneshot::Sender<Answer>)>,
) {
    let keys: Vec<EntityKey> = batch.iter().map(|(k, _)| k.clone()).collect();
    let pending = match writer
        .call(
            |reply| WriterMsg::PendingMany(keys.clone(), reply),
            Some(Duration::from_secs(30)),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(found)) if found.len() == keys.len() => found,
        _ => vec![None; keys.len()],
    };
    let mut waiting = Vec::new();
    for ((key, reply), pending) in batch.into_iter().zip(pending) {
        match pending {
            Some(snapshot) => {
                let _ = reply.send(Ok(Some(snapshot)));
            }
            None => waiting.push((key, reply)),
        }
    }
    if waiting.is_empty() {
        return;
    }
    let keys: Vec<EntityKey> = waiting.iter().map(|(k, _)| k.clone()).collect();
    match store.latest_many(&keys).await {
        Ok(rows) => {
            let mut found: HashMap<EntityKey, Answer> = rows
                .into_iter()
                .map(|(key, row)| (key, row.map(Some)))
                .collect();
            for (key, reply) in waiting {
                let _ = reply.send(found.remove(&key).unwrap_or(Ok(None)));
            }
        }
        // Each entity asks on its own, so each gets its own error.
        Err(_) => {
            for (key, reply) in waiting {
                let _ = reply.send(store.latest(&key).await);
            }
        }
    }
}
