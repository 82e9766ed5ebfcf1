//! What this node owns now: the partitions whose leases it holds, each at
//! its epoch. Shared by the coordinator (which changes it), the router
//! (which folds only owned workflows), the table feed (which reads only
//! owned partitions), the writer (which keeps only snapshots it may still
//! write) and the policy actors (whose snapshots carry the lease they were
//! folded under).

use super::partition::partition_of;
use crate::model::Fence;
use std::sync::RwLock;
use tokio::sync::watch;

/// A lease as this node holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Folded and written here.
    Held(i64),
    /// Being handed over: nothing new is folded, what is pending may still
    /// be written until the lease is freed.
    Releasing(i64),
}

#[derive(Debug)]
pub struct Ownership {
    node_id: String,
    partitions: u32,
    /// By partition.
    leases: RwLock<Vec<Option<Lease>>>,
    /// Bumped at every change (the feed waits on it).
    changes: watch::Sender<u64>,
}

impl Ownership {
    pub fn new(node_id: String, partitions: u32) -> Ownership {
        Ownership {
            node_id,
            partitions: partitions.max(1),
            leases: RwLock::new(vec![None; partitions.max(1) as usize]),
            changes: watch::channel(0).0,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The lease `workflow_id`'s partition is held under, if this node
    /// holds it (and is not handing it over).
    pub fn fence_for(&self, workflow_id: &str) -> Option<Fence> {
        let partition = partition_of(workflow_id, self.partitions);
        match self.read()[partition as usize] {
            Some(Lease::Held(epoch)) => Some(Fence { partition, epoch }),
            _ => None,
        }
    }

    /// Whether a snapshot folded under `fence` may still be written here:
    /// the lease is held, or being handed over, at that epoch.
    pub fn may_write(&self, fence: Fence) -> bool {
        matches!(
            self.read().get(fence.partition as usize),
            Some(Some(Lease::Held(e) | Lease::Releasing(e))) if *e == fence.epoch
        )
    }

    /// Every lease held (not being handed over), by partition.
    pub fn held(&self) -> Vec<Fence> {
        self.collect(|lease| match lease {
            Lease::Held(epoch) => Some(epoch),
            Lease::Releasing(_) => None,
        })
    }

    /// Every lease being handed over.
    pub fn releasing(&self) -> Vec<Fence> {
        self.collect(|lease| match lease {
            Lease::Releasing(epoch) => Some(epoch),
            Lease::Held(_) => None,
        })
    }

    pub fn count(&self) -> usize {
        self.held().len()
    }

    /// Leases taken.
    pub fn grant(&self, fences: &[Fence]) {
        self.change(
            fences
                .iter()
                .map(|f| (f.partition, Some(Lease::Held(f.epoch)))),
        );
    }

    /// Leases being handed over: nothing new of them is folded here.
    pub fn start_release(&self, fences: &[Fence]) {
        self.change(
            fences
                .iter()
                .map(|f| (f.partition, Some(Lease::Releasing(f.epoch)))),
        );
    }

    /// Leases freed or lost: nothing of these partitions is folded or
    /// written here from now on.
    pub fn revoke(&self, partitions: &[u32]) {
        self.change(partitions.iter().map(|&p| (p, None)));
    }

    /// Notified at every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn change(&self, updates: impl Iterator<Item = (u32, Option<Lease>)>) {
        let mut changed = false;
        {
            let mut leases = self.leases.write().expect("ownership lock");
            for (partition, lease) in updates {
                leases[partition as usize] = lease;
                changed = true;
            }
        }
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    fn collect(&self, pick: impl Fn(Lease) -> Option<i64>) -> Vec<Fence> {
        self.read()
            .iter()
            .enumerate()
            .filter_map(|(partition, lease)| {
                lease.and_then(&pick).map(|epoch| Fence {
                    partition: partition as u32,
                    epoch,
                })
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Lease>>> {
        self.leases.read().expect("ownership lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WF_LEASE: Fence = Fence {
        partition: 11,
        epoch: 3,
    };

    #[test]
    fn grants_and_revocations_decide_what_is_folded_here() {
        let own = Ownership::new("n1".into(), 64);
        let mut changes = own.subscribe();
        assert_eq!(own.fence_for("wf"), None);
        // "wf" is in partition 11 of 64 (pinned in partition.rs).
        own.grant(&[WF_LEASE]);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(own.fence_for("wf"), Some(WF_LEASE));
        assert_eq!(own.count(), 1);
        own.revoke(&[11]);
        assert!(changes.has_changed().unwrap());
        assert_eq!(own.fence_for("wf"), None);
        assert!(own.held().is_empty());
    }

    #[test]
    fn a_partition_handed_over_is_no_longer_folded_but_may_finish_writing() {
        let own = Ownership::new("n1".into(), 64);
        own.grant(&[WF_LEASE]);
        own.start_release(&[WF_LEASE]);
        assert_eq!(own.fence_for("wf"), None, "nothing new is folded");
        assert!(own.may_write(WF_LEASE), "pending snapshots may land");
        assert_eq!(own.releasing(), vec![WF_LEASE]);
        assert!(own.held().is_empty());
        own.revoke(&[11]);
        assert!(!own.may_write(WF_LEASE));
    }

    #[test]
    fn a_snapshot_of_an_older_epoch_may_not_be_written() {
        let own = Ownership::new("n1".into(), 64);
        own.grant(&[WF_LEASE]);
        // Lost and taken again: a new epoch.
        own.grant(&[Fence {
            partition: 11,
            epoch: 5,
        }]);
        assert!(!own.may_write(WF_LEASE));
    }
}
