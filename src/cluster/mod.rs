//! Several daemons on one Postgres database (issue 10). So far only the
//! partition function, which every later piece keys on; the design below
//! is what the rest will build.
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
//! * A node renews `expires_at = now() + failover_secs` for what it owns,
//!   with each heartbeat. A survivor takes an expired lease with
//!   `UPDATE … SET owner = me, epoch = epoch + 1 WHERE expires_at < now()`.
//!   Nodes aim for a fair share, ceil(P / live nodes). A node over its
//!   share hands partitions over: it drains them (commits or abandons what
//!   is pending within a deadline), stops their actors, then clears
//!   `owner`. A node that stops gracefully hands over all of its partitions.
//! * Fencing: the writer's batch transaction locks the lease rows of the
//!   batch's partitions (`FOR SHARE`), and writes only rows whose lease
//!   still has this node as owner at the epoch the node holds. A takeover
//!   is an `UPDATE` of that lease row, so it waits for the write to commit
//!   (the new owner then hydrates from it), or it comes first (the write
//!   finds a newer epoch and writes nothing for that partition). A node that
//!   wakes from SIGSTOP with a full queue therefore commits nothing for the
//!   partitions it lost.
//! * Feeds: a node follows the events table only for its own partitions
//!   ([`partition::sql`] in the query). A socket event for a partition the
//!   node does not own is counted and not folded: its owner reads it from
//!   the table.
//! * SQLite, and Postgres with `cluster.enabled = false`, skip all of this.

pub mod partition;
