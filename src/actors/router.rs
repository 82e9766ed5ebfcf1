//! The router and supervisor: maps each entity key to its policy actor,
//! spawning it on first use; restarts one that panics (it hydrates from the
//! store again); passivates idle ones without losing a message, and the
//! least recently used one when `policy.max_active_entities` actors are
//! alive; answers flush barriers; drains everything at shutdown.
//!
//! A command costs what its answer costs: a `snapshot` of an entity with no
//! actor is first looked up (writer, store, events table) off the router,
//! and answered "unknown" without spawning anything when nothing is there.

use super::messages::{PolicyMsg, RouterMsg, SnapshotOutcome, WriterMsg};
use super::policy::{Policy, PolicyArgs, PolicyConfig};
use crate::cluster::ownership::Ownership;
use crate::model::{EntityKey, Fence};
use crate::stats::Stats;
use crate::store::Store;
use foldhash::{HashMap, HashMapExt, HashSet};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Start arguments.
pub struct RouterArgs {
    pub lookups: super::lookup::Lookups,
    pub timers: super::timers::Timers,
    pub config: Arc<PolicyConfig>,
    pub store: Store,
    pub writer: ActorRef<WriterMsg>,
    pub writer_permits: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    /// Most policy actors running at once (`policy.max_active_entities`).
    pub max_active: usize,
    /// In a cluster: the partitions this node owns. Events of others are
    /// counted and dropped, and no actor starts for their workflows.
    pub ownership: Option<Arc<Ownership>>,
}

pub struct Router;

enum Entry {
    /// `listed` is its key in [`RouterState::recency`]; `used` when it was
    /// last sent something, moved there only when it comes up for
    /// passivation (so a message costs no reordering).
    Running {
        actor: ActorRef<PolicyMsg>,
        used: u64,
        listed: u64,
        /// In a cluster: the lease it was started under.
        fence: Option<Fence>,
    },
    /// Asked to stop; messages wait here until it has, then go to a new actor.
    Stopping {
        id: ActorId,
        stash: Vec<PolicyMsg>,
        barriers: Vec<RpcReplyPort<()>>,
    },
}

pub struct RouterState {
    args: RouterArgs,
    entities: HashMap<EntityKey, Entry>,
    keys_by_actor: HashMap<ActorId, EntityKey>,
    /// Running entities by when they were last sent something as of their
    /// last look here, oldest first: the next to passivate when
    /// `max_active` are running is the first whose `used` is still that.
    recency: BTreeMap<u64, EntityKey>,
    next_use: u64,
    /// Entities each connection sent events to since its last flush.
    touched: HashMap<u64, HashSet<EntityKey>>,
    draining: Option<RpcReplyPort<()>>,
    /// Partitions being released: the entities still to stop, and who waits.
    releasing: Vec<(HashSet<EntityKey>, RpcReplyPort<()>)>,
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        Ok(RouterState {
            args,
            entities: HashMap::new(),
            keys_by_actor: HashMap::new(),
            recency: BTreeMap::new(),
            next_use: 0,
            touched: HashMap::new(),
            draining: None,
            releasing: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Events { connection, events } => {
                let touched = state.touched.entry(connection).or_default();
                let mut routed = Vec::with_capacity(events.len());
                for (event, permit) in events {
                    if let Some(ownership) = &state.args.ownership
                        && ownership.fence_for(&event.workflow_id).is_none()
                    {
                        // Its owner reads it from the events table.
                        state.args.stats.events_not_owned.inc();
                        continue;
                    }
                    let key = state.args.config.reducer.key_of(&event);
                    if !touched.contains(&key) {
                        touched.insert(key.clone());
                    }
                    routed.push((key, PolicyMsg::Event(event, permit)));
                }
                for (key, msg) in routed {
                    if let Some((key, msg)) = state.deliver_to_running(key, msg) {
                        state.spawn_for(&myself, key, msg).await;
                    }
                }
            }
            RouterMsg::Flush {
                connection,
                snapshot,
                reply,
            } => {
                let keys = state.touched.remove(&connection).unwrap_or_default();
                let mut barriers = Vec::with_capacity(keys.len());
                let mut forced = Vec::new();
                for key in keys {
                    // Events waiting behind a stopping actor go to its
                    // successor: so does the forced snapshot.
                    let live = match state.entities.get(&key) {
                        Some(Entry::Running { .. }) => true,
                        Some(Entry::Stopping { stash, .. }) => !stash.is_empty(),
                        None => false,
                    };
                    if snapshot && live {
                        let (tx, rx) = ractor::concurrency::oneshot();
                        state
                            .deliver(&myself, key, PolicyMsg::ForceSnapshot(tx.into()))
                            .await;
                        forced.push(rx);
                    } else {
                        let (tx, rx) = ractor::concurrency::oneshot();
                        state.barrier(&myself, key, tx.into()).await;
                        barriers.push(rx);
                    }
                }
                let writer = state.args.writer.clone();
                tokio::spawn(async move {
                    for barrier in barriers {
                        let _ = barrier.await;
                    }
                    for taken in forced {
                        let _ = taken.await;
                    }
                    if let Ok(ractor::rpc::CallResult::Success(())) =
                        writer.call(WriterMsg::Flush, None).await
                    {
                        let _ = reply.send(());
                    }
                });
            }
            RouterMsg::Snapshot { key, reply } => {
                if let Some(ownership) = &state.args.ownership
                    && ownership.fence_for(&key.entity_id).is_none()
                {
                    let partition = crate::cluster::partition::partition_of(
                        &key.entity_id,
                        ownership.partitions(),
                    );
                    let _ = reply.send(SnapshotOutcome::NotOwned { partition });
                } else if state.entities.contains_key(&key) {
                    state.force_snapshot(&myself, key, reply).await;
                } else {
                    // Looked up off the router: a flood of unknown ids
                    // starts no actor and does not hold the router up.
                    let lookup = EntityLookup {
                        store: state.args.store.clone(),
                        writer: state.args.writer.clone(),
                        config: state.args.config.clone(),
                    };
                    let myself = myself.clone();
                    tokio::spawn(async move {
                        let known = lookup.known(&key).await;
                        let _ = myself.cast(RouterMsg::SnapshotLookedUp { key, known, reply });
                    });
                }
            }
            RouterMsg::SnapshotLookedUp { key, known, reply } => {
                if known || state.entities.contains_key(&key) {
                    state.force_snapshot(&myself, key, reply).await;
                } else {
                    let _ = reply.send(SnapshotOutcome::Unknown);
                }
            }
            RouterMsg::Remaining(reply) => {
                let _ = reply.send(state.entities.len());
            }
            RouterMsg::Wake { connection, key } => {
                state
                    .touched
                    .entry(connection)
                    .or_default()
                    .insert(key.clone());
                state.deliver(&myself, key, PolicyMsg::Tick).await;
            }
            RouterMsg::Closed { connection } => {
                state.touched.remove(&connection);
            }
            RouterMsg::Idle { key, id } => {
                if let Some(Entry::Running { actor, .. }) = state.entities.get(&key)
                    && actor.get_id() == id
                {
                    state.passivate(key, true);
                }
            }
            RouterMsg::Resync(key) => state.deliver(&myself, key, PolicyMsg::Resync).await,
            RouterMsg::Release {
                fences,
                snapshot,
                reply,
            } => state.release(&fences, snapshot, reply),
            RouterMsg::Drain { snapshot, reply } => {
                let running: Vec<EntityKey> = state.recency.values().cloned().collect();
                for key in running {
                    state.passivate(key, snapshot);
                }
                state.draining = Some(reply);
                state.finish_drain_if_done();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RouterMsg>,
        event: SupervisionEvent,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(key) = state.keys_by_actor.remove(&cell.get_id()) {
                    state.ended(&myself, key, cell.get_id()).await;
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(key) = state.keys_by_actor.remove(&cell.get_id()) {
                    state.args.stats.actor_restarts.inc();
                    // post_stop does not run after a panic.
                    state.args.stats.active_entities.dec();
                    tracing::error!(entity = %key, error = %error, "Policy actor failed; restarting it from the store.");
                    state.ended(&myself, key.clone(), cell.get_id()).await;
                    if state.draining.is_none() && !state.entities.contains_key(&key) {
                        // Wake it at once: hydration recovers what the
                        // table holds, including events that died with the
                        // failed actor's mailbox.
                        if let Some(actor) = state.spawn(&myself, key).await {
                            let _ = actor.cast(PolicyMsg::Tick);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RouterState {
    /// Send `msg` to the entity's actor, spawning it when there is none.
    async fn deliver(&mut self, myself: &ActorRef<RouterMsg>, key: EntityKey, msg: PolicyMsg) {
        if let Some((key, msg)) = self.deliver_to_running(key, msg) {
            self.spawn_for(myself, key, msg).await;
        }
    }

    /// Spawn the actor of an entity that has none and send it `msg`.
    async fn spawn_for(&mut self, myself: &ActorRef<RouterMsg>, key: EntityKey, msg: PolicyMsg) {
        if let Some(actor) = self.spawn(myself, key).await {
            let _ = actor.cast(msg);
        }
    }

    /// [`Self::deliver`] without the spawn: `msg` handed to the entity's
    /// actor or stashed while it stops, or given back with the key when
    /// the entity has no actor. Not `async`, so an event for a running
    /// actor builds no future: `deliver`'s, which holds the spawn's, was
    /// copied for every event (150 instructions).
    fn deliver_to_running(
        &mut self,
        key: EntityKey,
        msg: PolicyMsg,
    ) -> Option<(EntityKey, PolicyMsg)> {
        match self.entities.get_mut(&key) {
            Some(Entry::Running {
                actor,
                used,
                listed,
                ..
            }) => match actor.cast(msg) {
                Ok(()) => {
                    // Most recently used now.
                    self.next_use += 1;
                    *used = self.next_use;
                }
                // Stopped but not yet reported: wait for its termination.
                Err(ractor::MessagingErr::SendErr(msg)) => {
                    let id = actor.get_id();
                    self.recency.remove(listed);
                    self.entities.insert(
                        key,
                        Entry::Stopping {
                            id,
                            stash: vec![msg],
                            barriers: Vec::new(),
                        },
                    );
                }
                Err(_) => {}
            },
            Some(Entry::Stopping { stash, .. }) => stash.push(msg),
            None => return Some((key, msg)),
        }
        None
    }

    /// A barrier for one entity: answered by its actor; when it is stopping,
    /// once it has stopped (its last snapshot is then with the writer), or,
    /// when events wait for its successor, by the successor after them.
    async fn barrier(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        key: EntityKey,
        reply: RpcReplyPort<()>,
    ) {
        if let Some(Entry::Stopping {
            stash, barriers, ..
        }) = self.entities.get_mut(&key)
        {
            if stash.is_empty() {
                barriers.push(reply);
            } else {
                stash.push(PolicyMsg::Barrier(reply));
            }
        } else if self.entities.contains_key(&key) {
            self.deliver(myself, key, PolicyMsg::Barrier(reply)).await;
        } else {
            // Passivated already: its snapshot went to the writer before.
            let _ = reply.send(());
        }
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        key: EntityKey,
    ) -> Option<ActorRef<PolicyMsg>> {
        // In a cluster: only workflows of a partition held, under its lease.
        let fence = match &self.args.ownership {
            Some(ownership) => match ownership.fence_for(&key.entity_id) {
                Some(fence) => Some(fence),
                None => {
                    tracing::debug!(entity = %key, "Not started: its partition is another node's.");
                    return None;
                }
            },
            None => None,
        };
        // Make room: the least recently used passivates, snapshotting first.
        while self.recency.len() >= self.args.max_active.max(1) {
            let Some((stamp, oldest)) = self.recency.pop_first() else {
                break;
            };
            if let Some(Entry::Running { used, listed, .. }) = self.entities.get_mut(&oldest)
                && *used != stamp
            {
                // Used since it was listed: listed again as of then.
                *listed = *used;
                self.recency.insert(*used, oldest);
                continue;
            }
            self.args.stats.passivations_for_room.inc();
            self.passivate(oldest, true);
        }
        let args = PolicyArgs {
            key: key.clone(),
            lookups: self.args.lookups.clone(),
            timers: self.args.timers.clone(),
            config: self.args.config.clone(),
            store: self.args.store.clone(),
            writer: self.args.writer.clone(),
            writer_permits: self.args.writer_permits.clone(),
            router: myself.clone(),
            stats: self.args.stats.clone(),
            fence,
        };
        match Actor::spawn_linked(None, Policy, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.keys_by_actor.insert(actor.get_id(), key.clone());
                self.next_use += 1;
                self.recency.insert(self.next_use, key.clone());
                self.entities.insert(
                    key,
                    Entry::Running {
                        actor: actor.clone(),
                        used: self.next_use,
                        listed: self.next_use,
                        fence,
                    },
                );
                Some(actor)
            }
            Err(error) => {
                tracing::error!(entity = %key, error = %error, "Cannot start a policy actor; its events are dropped.");
                None
            }
        }
    }

    /// Ask a running entity's actor to stop (snapshotting new events when
    /// `snapshot`); messages for it wait until it has, then go to a new one.
    fn passivate(&mut self, key: EntityKey, snapshot: bool) {
        if let Some(entry) = self.entities.get_mut(&key)
            && let Entry::Running { actor, listed, .. } = entry
        {
            let id = actor.get_id();
            let _ = actor.cast(PolicyMsg::Stop { snapshot });
            self.recency.remove(listed);
            *entry = Entry::Stopping {
                id,
                stash: Vec::new(),
                barriers: Vec::new(),
            };
        }
    }

    /// Deliver a `snapshot` command to the entity's actor (spawning it) and
    /// reply once what it took is committed.
    async fn force_snapshot(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        key: EntityKey,
        reply: RpcReplyPort<SnapshotOutcome>,
    ) {
        let (tx, rx) = ractor::concurrency::oneshot();
        self.deliver(myself, key, PolicyMsg::ForceSnapshot(tx.into()))
            .await;
        let writer = self.args.writer.clone();
        tokio::spawn(async move {
            let outcome = match rx.await.ok().flatten() {
                Some((version, sequence)) => SnapshotOutcome::Taken { version, sequence },
                None => SnapshotOutcome::NothingNew,
            };
            if let Ok(ractor::rpc::CallResult::Success(())) =
                writer.call(WriterMsg::Flush, None).await
            {
                let _ = reply.send(outcome);
            }
        });
    }

    /// An actor is gone: answer its barriers, hand its stash to a new one.
    async fn ended(&mut self, myself: &ActorRef<RouterMsg>, key: EntityKey, id: ActorId) {
        let entry = match self.entities.get(&key) {
            Some(Entry::Running { actor, listed, .. }) if actor.get_id() == id => {
                self.recency.remove(listed);
                self.entities.remove(&key)
            }
            Some(Entry::Stopping { id: stopping, .. }) if *stopping == id => {
                self.entities.remove(&key)
            }
            _ => None,
        };
        if let Some(Entry::Stopping {
            stash, barriers, ..
        }) = entry
        {
            for barrier in barriers {
                let _ = barrier.send(());
            }
            if !stash.is_empty() {
                if self.draining.is_some() {
                    tracing::warn!(entity = %key, messages = stash.len(), "Messages for an entity arrived during shutdown; dropped.");
                } else if self
                    .args
                    .ownership
                    .as_ref()
                    .is_some_and(|own| own.fence_for(&key.entity_id).is_none())
                {
                    tracing::debug!(entity = %key, messages = stash.len(), "Messages for an entity of a partition handed over; its new owner reads the table.");
                    // Nothing more is this node's to wait for.
                    for msg in stash {
                        if let PolicyMsg::Barrier(reply) = msg {
                            let _ = reply.send(());
                        }
                    }
                } else if let Some(actor) = self.spawn(myself, key).await {
                    for msg in stash {
                        let _ = actor.cast(msg);
                    }
                }
            }
        }
        self.finish_releases();
        self.finish_drain_if_done();
    }

    /// Stop every actor started under one of `fences` (revoked: none
    /// restarts under them), and wait for those of their partitions already
    /// stopping; reply once all have stopped.
    fn release(&mut self, fences: &[Fence], snapshot: bool, reply: RpcReplyPort<()>) {
        let Some(count) = self.args.ownership.as_ref().map(|own| own.partitions()) else {
            let _ = reply.send(());
            return;
        };
        let partitions: HashSet<u32> = fences.iter().map(|f| f.partition).collect();
        let keys: HashSet<EntityKey> = self
            .entities
            .iter()
            .filter(|(key, entry)| match entry {
                Entry::Running { fence, .. } => fence.is_some_and(|f| fences.contains(&f)),
                Entry::Stopping { .. } => partitions.contains(
                    &crate::cluster::partition::partition_of(&key.entity_id, count),
                ),
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.passivate(key.clone(), snapshot);
        }
        self.releasing.push((keys, reply));
        self.finish_releases();
    }

    fn finish_releases(&mut self) {
        let entities = &self.entities;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.releasing)
            .into_iter()
            .map(|(mut keys, reply)| {
                keys.retain(|key| entities.contains_key(key));
                (keys, reply)
            })
            .partition(|(keys, _)| keys.is_empty());
        self.releasing = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    fn finish_drain_if_done(&mut self) {
        if self.entities.is_empty()
            && let Some(reply) = self.draining.take()
        {
            let _ = reply.send(());
        }
    }
}

/// Whether an entity without an actor has any history: a snapshot pending
/// with the writer or stored, or events in stabilize's table.
struct EntityLookup {
    store: Store,
    writer: ActorRef<WriterMsg>,
    config: Arc<PolicyConfig>,
}

impl EntityLookup {
    async fn known(&self, key: &EntityKey) -> bool {
        if let Ok(ractor::rpc::CallResult::Success(Some(_))) = self
            .writer
            .call(|reply| WriterMsg::PendingFor(key.clone(), reply), None)
            .await
        {
            return true;
        }
        let whole_workflow = self.config.reducer == crate::reducer::Reducer::Stabilize;
        let stored = self.store.has_snapshot(key).await;
        let events = if self.config.events_table.check().await {
            self.store.has_events(key, whole_workflow).await
        } else {
            Ok(false)
        };
        match (stored, events) {
            (Ok(stored), Ok(events)) => stored || events,
            // Cannot tell: let an actor find out (it retries the store).
            _ => true,
        }
    }
}
