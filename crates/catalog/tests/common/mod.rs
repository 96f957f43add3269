//! Fixtures the catalog test files share.

#![allow(dead_code)] // each test file uses its own subset

use std::sync::Arc;
use time::OffsetDateTime;
use vpsbackup_catalog::*;

/// A new catalog in a fresh temp dir (kept alive by the returned guard).
pub async fn fresh() -> (tempfile::TempDir, Arc<SqliteCatalog>) {
    let dir = tempfile::tempdir().unwrap();
    let cat = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    (dir, Arc::new(cat))
}

/// A fixed "now" so times in assertions are exact.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_750_000_000).unwrap()
}

/// Server `id` ("srv-<id>") of `account` on `plan`, with one raw disk.
pub fn new_server(id: i64, account: AccountId, plan: PlanId) -> NewServer {
    NewServer {
        id: ServerId(id),
        name: format!("srv-{id}"),
        hostname: String::new(),
        account_id: account,
        plan_id: plan,
        disks: vec![ServerDisk::new(
            format!("/tmp/disk-{id}.img"),
            ImageFormat::Raw,
        )],
        hooks: Hooks::default(),
        runtime: Default::default(),
    }
}
