//! Fixtures the catalog test files share.

use vpsbackup_catalog::*;

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
    }
}
