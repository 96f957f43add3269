//! Workers in other processes hear of a job queued for their node when it
//! is committed (`PgCatalog::wake_on_queued_jobs`, pg migration 0006), and
//! not of jobs for other nodes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vpsbackup_catalog::*;

mod common;
use common::{new_server, now, PgDatabase};

fn manual(server: i64) -> NewBackup {
    NewBackup {
        server_id: ServerId(server),
        scope: Scope::All,
        backup_type: BackupType::Manual,
        description: "wake".into(),
        expires_at: None,
        scheduled_for: None,
        run_after: None,
    }
}

/// Waits until `count` reaches `at_least`, for at most 3 seconds.
async fn reaches(count: &AtomicUsize, at_least: usize) -> bool {
    for _ in 0..300 {
        if count.load(Ordering::SeqCst) >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_job_queued_for_a_node_wakes_that_nodes_workers_only() {
    let db = PgDatabase::create().await;
    let api = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let agent = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let account = api.create_account("acme", now()).await.unwrap();
    let plan = api.plan_by_name("standard").await.unwrap().unwrap();
    for (id, node) in [(1, Some("n1")), (2, Some("n2")), (3, None)] {
        let server = NewServer {
            node: node.map(str::to_owned),
            ..new_server(id, account.id, plan.id)
        };
        api.add_server(server, now()).await.unwrap();
    }
    let woken = Arc::new(AtomicUsize::new(0));
    let counter = woken.clone();
    let listening = agent.wake_on_queued_jobs("n1", move || {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    // Once when it starts listening (what came before was not heard).
    assert!(reaches(&woken, 1).await, "no wake when listening began");

    api.create_backup(manual(2), now()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(woken.load(Ordering::SeqCst), 1, "woken for node n2's job");

    api.create_backup(manual(1), now()).await.unwrap();
    assert!(reaches(&woken, 2).await, "not woken for node n1's job");
    // A server on no node yet may be adopted by any node's workers.
    api.create_backup(manual(3), now()).await.unwrap();
    assert!(reaches(&woken, 3).await, "not woken for a job of no node");

    // A requeued job (its lease expired, handed back) wakes them too.
    api.execute_raw("UPDATE jobs SET state = 'running' WHERE server_id = 1")
        .await
        .unwrap();
    api.execute_raw("UPDATE jobs SET state = 'queued' WHERE server_id = 1")
        .await
        .unwrap();
    assert!(reaches(&woken, 4).await, "not woken for a requeued job");

    drop(listening);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = woken.load(Ordering::SeqCst);
    api.create_backup(manual(1), now()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        woken.load(Ordering::SeqCst),
        before,
        "woken after the handle was dropped"
    );
}
