//! What a node should do with its leases at each heartbeat, given what it
//! holds and how many nodes are alive: pure, so the balancing rules are
//! tested without a database.

/// A node's fair share of `partitions` among `live` nodes: ceil(P / N).
/// With every node at or below it, all partitions can be owned.
pub fn fair_share(partitions: u32, live: usize) -> usize {
    (partitions as usize).div_ceil(live.max(1))
}

/// What to do at one heartbeat.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Take up to this many free or expired leases.
    pub claim: usize,
    /// Hand these partitions over (a node joined: we hold more than our share).
    pub release: Vec<u32>,
}

/// `held` in any order; `live` counts this node. A node over its share
/// hands over its highest partitions; under it, it claims the difference.
pub fn plan(held: &[u32], partitions: u32, live: usize) -> Plan {
    let share = fair_share(partitions, live);
    if held.len() > share {
        let mut sorted = held.to_vec();
        sorted.sort_unstable();
        Plan {
            claim: 0,
            release: sorted.split_off(share),
        }
    } else {
        Plan {
            claim: share - held.len(),
            release: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_covers_every_partition() {
        assert_eq!(fair_share(64, 1), 64);
        assert_eq!(fair_share(64, 3), 22);
        assert_eq!(fair_share(64, 4), 16);
        assert_eq!(fair_share(64, 0), 64, "no live node counts as one");
        for nodes in 1..=70 {
            assert!(fair_share(64, nodes) * nodes >= 64, "{nodes} nodes");
        }
    }

    #[test]
    fn a_lone_node_claims_everything() {
        assert_eq!(
            plan(&[], 64, 1),
            Plan {
                claim: 64,
                release: vec![]
            }
        );
    }

    #[test]
    fn when_a_node_joins_the_others_hand_over_their_highest_partitions() {
        let held: Vec<u32> = (0..22).rev().collect();
        let step = plan(&held, 64, 4);
        assert_eq!(step.claim, 0);
        assert_eq!(step.release, (16..22).collect::<Vec<_>>());
    }

    #[test]
    fn when_a_node_dies_the_survivors_claim_up_to_their_new_share() {
        let held: Vec<u32> = (0..22).collect();
        assert_eq!(plan(&held, 64, 2).claim, 10);
        assert!(plan(&held, 64, 2).release.is_empty());
    }
}
