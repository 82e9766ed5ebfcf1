//! The messages the actors exchange, in one place, so that no actor's file
//! imports another's to talk to it: the router spawns policy actors (it
//! knows their type), and everything else only knows these enums.

use crate::model::event::Event;
use crate::model::{EntityKey, Fence, PreparedSnapshot, Snapshot};
use ractor::{ActorId, ActorRef, RpcReplyPort};
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;

/// Messages to the router.
pub enum RouterMsg {
    /// From a connection reader (or the table feed): events in the order
    /// they were read, each with its in-flight permit. A reader sends what
    /// it has read at once, so one message carries many events under load
    /// and one when the producer is slow.
    Events {
        connection: u64,
        events: Vec<(Box<Event>, OwnedSemaphorePermit)>,
    },
    /// From a connection reader (`flush`): reply once every event this
    /// connection sent before is folded and the snapshots they triggered
    /// are committed; with `snapshot`, once every entity they touched is
    /// snapshotted and committed (a barrier that survives `kill -9`).
    Flush {
        connection: u64,
        snapshot: bool,
        reply: RpcReplyPort<()>,
    },
    /// From a connection reader (`snapshot`): snapshot the entity now and
    /// reply once committed.
    Snapshot {
        key: EntityKey,
        reply: RpcReplyPort<SnapshotOutcome>,
    },
    /// From the task that looked up an entity without an actor for a
    /// `snapshot`: whether it has any history at all.
    SnapshotLookedUp {
        key: EntityKey,
        known: bool,
        reply: RpcReplyPort<SnapshotOutcome>,
    },
    /// From the table feed catching up at start: start the entity's actor
    /// (it hydrates and applies its thresholds at once); a later flush of
    /// `connection` waits for it.
    Wake { connection: u64, key: EntityKey },
    /// From a connection reader: the connection ended.
    Closed { connection: u64 },
    /// From a policy actor idle for `idle_timeout`: may it stop?
    Idle { key: EntityKey, id: ActorId },
    /// From the writer: the events table contradicts this entity's snapshot.
    Resync(EntityKey),
    /// From the app at shutdown: stop every policy actor (snapshotting new
    /// events when `snapshot`), reply when all have stopped.
    Drain {
        snapshot: bool,
        reply: RpcReplyPort<()>,
    },
    /// From the app, when the drain ran out of time: how many entities
    /// have not handed their final snapshot to the writer.
    Remaining(RpcReplyPort<usize>),
    /// From the cluster's coordinator: these leases are no longer this
    /// node's to fold under (already revoked, so nothing new starts under
    /// them). Stop the actors started under them (snapshotting new events
    /// when `snapshot`: a handover), reply once all have stopped. Actors of
    /// the same partitions under a newer lease are left alone.
    Release {
        fences: Vec<Fence>,
        snapshot: bool,
        reply: RpcReplyPort<()>,
    },
}

/// The answer to a `snapshot` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Taken and committed.
    Taken { version: i32, sequence: i64 },
    /// Nothing beyond the last snapshot.
    NothingNew,
    /// No events and no snapshot anywhere: no actor was started for it.
    Unknown,
    /// In a cluster: the entity's partition is another node's.
    NotOwned { partition: u32 },
}

/// Messages to a policy actor.
pub enum PolicyMsg {
    /// From the router: an event of this entity. The permit bounds events in
    /// flight between the sockets and the actors; dropping it frees a place.
    Event(Box<Event>, OwnedSemaphorePermit),
    /// From the router, for a flush: reply once every earlier message is
    /// handled (snapshots they triggered are then with the writer).
    Barrier(RpcReplyPort<()>),
    /// From the router (`snapshot` command): snapshot now if there are new
    /// events; reply with the snapshot's (version, sequence), if one was taken.
    ForceSnapshot(RpcReplyPort<Option<(i32, i64)>>),
    /// From the router, relaying the writer: the events table contradicts
    /// our last snapshot; rebuild from the table.
    Resync,
    /// From the router (idle passivation or shutdown): stop, first
    /// snapshotting new events when `snapshot` is set.
    Stop { snapshot: bool },
    /// To itself, first: load the entity's history.
    Hydrate,
    /// To itself: time threshold and idleness check.
    Tick,
    /// To itself, after late events: compare the base with the events table.
    CheckBase,
}

/// Messages to the writer.
pub enum WriterMsg {
    /// From a policy actor: a snapshot to commit. The permit bounds how many
    /// snapshots wait here; it is released when this one is committed or
    /// replaced by a newer one.
    Snapshot(Box<PreparedSnapshot>, OwnedSemaphorePermit),
    /// From a flush (connection `flush` or `snapshot` command): reply once
    /// every snapshot received before is committed.
    Flush(RpcReplyPort<()>),
    /// From a policy actor hydrating: the entity's newest snapshot not yet
    /// committed, which is newer than anything the store holds.
    PendingFor(EntityKey, RpcReplyPort<Option<Snapshot>>),
    /// From the lookup service, for a batch of entities hydrating: the
    /// newest uncommitted snapshot of each (`None` where there is none).
    PendingMany(Vec<EntityKey>, RpcReplyPort<Vec<Option<Snapshot>>>),
    /// From the app, once the router exists: where to report entities whose
    /// snapshot the events table contradicts.
    SetRouter(ActorRef<RouterMsg>),
    /// To itself: commit now (batch delay elapsed, batch full, retry).
    Commit,
    /// From the systemd watchdog: answered at once unless the writer is
    /// stuck inside a commit (a lock it waits on, a hung connection), in
    /// which case the watchdog stops pinging and systemd restarts us.
    Ping(RpcReplyPort<()>),
    /// From the app, before the policy actors hand over their final
    /// snapshots: commit in large batches from now on.
    ShutdownBegins,
    /// From the app at shutdown: commit everything, retrying until the
    /// deadline; reply with the number of snapshots that could not be.
    Drain(Instant, RpcReplyPort<usize>),
    /// From a batch's commit task: it ended.
    Committed(Box<super::writer::BatchDone>),
    /// From the cluster's coordinator: drop the pending snapshots of these
    /// partitions (their leases are gone or being freed; the database
    /// would refuse them).
    Forget(Vec<u32>),
}
