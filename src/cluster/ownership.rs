//! What this node owns now: the partitions whose leases it holds, each at
//! its epoch. Shared by the coordinator (which changes it), the router
//! (which folds only owned workflows), the table feed (which reads only
//! owned partitions) and the policy actors (whose snapshots carry the
//! lease they were folded under).

use super::partition::partition_of;
use crate::model::Fence;
use std::sync::RwLock;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Ownership {
    node_id: String,
    partitions: u32,
    /// By partition: the epoch held, if any.
    held: RwLock<Vec<Option<i64>>>,
    /// Bumped at every change (the feed waits on it).
    changes: watch::Sender<u64>,
}

impl Ownership {
    pub fn new(node_id: String, partitions: u32) -> Ownership {
        Ownership {
            node_id,
            partitions: partitions.max(1),
            held: RwLock::new(vec![None; partitions.max(1) as usize]),
            changes: watch::channel(0).0,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The lease `workflow_id`'s partition is held under, if this node holds it.
    pub fn fence_for(&self, workflow_id: &str) -> Option<Fence> {
        let partition = partition_of(workflow_id, self.partitions);
        let epoch = self.read()[partition as usize]?;
        Some(Fence { partition, epoch })
    }

    /// Every lease held, by partition.
    pub fn held(&self) -> Vec<Fence> {
        self.read()
            .iter()
            .enumerate()
            .filter_map(|(partition, epoch)| {
                epoch.map(|epoch| Fence {
                    partition: partition as u32,
                    epoch,
                })
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.read().iter().filter(|e| e.is_some()).count()
    }

    /// Leases taken.
    pub fn grant(&self, fences: &[Fence]) {
        if fences.is_empty() {
            return;
        }
        {
            let mut held = self.held.write().expect("ownership lock");
            for fence in fences {
                held[fence.partition as usize] = Some(fence.epoch);
            }
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Leases given up or lost: nothing of these partitions is folded here
    /// from now on.
    pub fn revoke(&self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        {
            let mut held = self.held.write().expect("ownership lock");
            for &partition in partitions {
                held[partition as usize] = None;
            }
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Notified at every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<i64>>> {
        self.held.read().expect("ownership lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_and_revocations_decide_what_is_folded_here() {
        let own = Ownership::new("n1".into(), 64);
        let mut changes = own.subscribe();
        assert_eq!(own.fence_for("wf"), None);
        // "wf" is in partition 11 of 64 (pinned in partition.rs).
        own.grant(&[Fence {
            partition: 11,
            epoch: 3,
        }]);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(
            own.fence_for("wf"),
            Some(Fence {
                partition: 11,
                epoch: 3
            })
        );
        assert_eq!(own.count(), 1);
        own.revoke(&[11]);
        assert!(changes.has_changed().unwrap());
        assert_eq!(own.fence_for("wf"), None);
        assert!(own.held().is_empty());
    }
}
