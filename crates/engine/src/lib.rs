//! The backup engine: disks into a deduplicated, compressed, verifiable chunk store (issue 2).
