//! Several daemons on one PostgreSQL database (`[cluster]`): every
//! workflow belongs to one of `cluster.partitions` partitions
//! ([`partition`]); each node owns about P / N of them through leases in the
//! database ([`lease`], kept by the [`coordinator`]), folds and snapshots
//! only their workflows ([`ownership`]), and writes only while its lease
//! holds, checked inside the writing transaction. [`plan`] is the pure
//! balancing rule.
//!
//! # Design: a lease table with epochs, checked inside the writing transaction
//!
//! Ownership of a partition is a row in a lease table, not a session
//! advisory lock:
//!
//! ```sql
//! snapshotd_nodes      (node_id PK, host, pid, started, heartbeat)
//! snapshotd_partitions (partition PK, owner, epoch, expires_at)
//! ```
//!
//! * Why not session advisory locks alone (Marten's distributor)? A
//!   session lock lives as long as its connection. A node that is frozen
//!   (SIGSTOP, a long GC-like stall, a hung host) keeps its TCP connection,
//!   so it keeps its locks and nobody takes over. And a lock held by a
//!   session proves nothing inside another connection's transaction, so it
//!   cannot fence the frozen node's writes when it wakes up.
//! * Time comes from the database only (`now()` in the statements): node
//!   clocks never have to agree.
//! * A node renews `expires_at = now() + lease` for what it owns, with each
//!   heartbeat (timing: [`coordinator`]). A survivor takes an expired lease with
//!   `UPDATE … SET owner = me, epoch = epoch + 1 WHERE expires_at < now()`.
//!   Nodes aim for a fair share, ceil(P / live nodes). A node over its
//!   share hands partitions over: it drains them (commits or abandons what
//!   is pending within a deadline), stops their actors, then clears
//!   `owner`. A node that stops gracefully hands over all of its partitions.
//! * Fencing: a policy actor is started under its partition's lease and
//!   every snapshot it makes carries that (partition, epoch). The writer's
//!   batch transaction locks the lease rows of the batch's partitions
//!   (`FOR SHARE`), and writes only rows whose lease still names this node
//!   at that epoch. A takeover is an `UPDATE` of the lease row: it comes
//!   after the write commits (the claim skips locked rows and retries at
//!   its next heartbeat; the new owner then hydrates from the write), or
//!   before it (the write finds another owner or a newer epoch and writes
//!   nothing for that partition). A node that wakes from SIGSTOP with a full
//!   queue therefore commits nothing for the partitions it lost. The
//!   writing transaction sets `idle_in_transaction_session_timeout`, so a
//!   node frozen inside it does not keep the rows locked.
//! * A node id is held with a session advisory lock on a connection kept
//!   for the node's life: two running daemons cannot share an id, and a
//!   killed one's id is free at once (its connection closes).
//! * Feeds: a node follows the events table only for its own partitions
//!   ([`partition::sql`] in the query). A socket event for a partition the
//!   node does not own is counted and not folded: its owner reads it from
//!   the table.
//! * SQLite, and Postgres with `cluster.enabled = false`, skip all of this.

pub mod coordinator;
pub mod lease;
pub mod ownership;
pub mod partition;
pub mod plan;
