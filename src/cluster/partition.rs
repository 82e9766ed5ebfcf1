//! Which partition a workflow belongs to: the first 32 bits of the MD5 of
//! its id, read as an unsigned big-endian number, modulo the number of
//! partitions. MD5 because PostgreSQL has it built in, so a node can select
//! its partitions' events in SQL ([`sql`]) with the very same answer, and it
//! never changes between versions of either side (tests pin values and
//! compare with the server). It is a spreading function, not a security
//! one.

use md5::{Digest, Md5};

/// `cluster.partitions` when not set.
pub const DEFAULT_PARTITIONS: u32 = 64;

/// The partition of `workflow_id` among `partitions` (at least 1).
pub fn partition_of(workflow_id: &str, partitions: u32) -> u32 {
    let digest = Md5::digest(workflow_id.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head % partitions.max(1)
}

/// The same in PostgreSQL's SQL, over `column`, with the number of
/// partitions in `partitions` (a literal or a parameter such as `$2`).
pub fn sql(column: &str, partitions: &str) -> String {
    format!("(('x' || substr(md5({column}), 1, 8))::bit(32)::bigint % {partitions})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_values_never_change() {
        // Computed by PostgreSQL 15 with `sql("w", "64")`; a change here
        // would move workflows between nodes across an upgrade.
        assert_eq!(partition_of("01JDLOAD000000000000000000", 64), 21);
        assert_eq!(partition_of("wf", 64), 11);
        assert_eq!(partition_of("01HZX5R2Q8K9M3N4P5Q6R7S8T9", 64), 7);
        assert_eq!(partition_of("", 64), 25);
        assert_eq!(partition_of("wf", 1_000_000), 3_249_705_419 % 1_000_000);
        assert_eq!(partition_of("wf", 0), 0, "no partitions is one");
    }

    #[test]
    fn workflows_spread_evenly() {
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[partition_of(&format!("01JDSPREAD{i:016}"), 64) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "{counts:?}");
    }
}
