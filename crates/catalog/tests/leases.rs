//! Nodes and job leases, on both backends (`common::catalog_tests!`):
//! claims only for a node's servers, the node recorded on the job, lease
//! renewal only by its owner, and expiry handled once however many
//! processes sweep.

use std::collections::HashSet;

use time::Duration;
use vpsbackup_catalog::*;

#[macro_use]
mod common;
use common::{new_server, now, TestCatalog};

async fn server_on(cat: &TestCatalog, id: i64, node: Option<&str>) -> Server {
    let acc = match cat.account_by_name("a").await.unwrap() {
        Some(a) => a,
        None => cat.create_account("a", now()).await.unwrap(),
    };
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    let mut s = new_server(id, acc.id, plan.id);
    s.node = node.map(str::to_owned);
    cat.add_server(s, now()).await.unwrap()
}

async fn backup_of(cat: &TestCatalog, server: i64) -> Backup {
    cat.create_backup(
        NewBackup {
            server_id: ServerId(server),
            scope: Scope::All,
            backup_type: BackupType::Manual,
            description: "x".into(),
            expires_at: None,
            scheduled_for: None,
            run_after: None,
        },
        now(),
    )
    .await
    .unwrap()
}

fn claim(worker: &str, node: Option<&str>, lease_until: time::OffsetDateTime) -> JobClaim {
    JobClaim {
        worker: worker.into(),
        node: node.map(str::to_owned),
        lease_until,
    }
}

catalog_tests! {
    async fn servers_keep_their_node_and_move(cat) {
        let s = server_on(&cat, 1, Some("hv-01")).await;
        assert_eq!(s.node.as_deref(), Some("hv-01"));
        let moved = cat
            .update_server(
                ServerId(1),
                ServerUpdate {
                    node: Some("hv-02".into()),
                    ..Default::default()
                },
                now(),
            )
            .await
            .unwrap();
        assert_eq!(moved.node.as_deref(), Some("hv-02"));
        // A change of something else keeps the node.
        let renamed = cat
            .update_server(
                ServerId(1),
                ServerUpdate {
                    name: Some("renamed".into()),
                    ..Default::default()
                },
                now(),
            )
            .await
            .unwrap();
        assert_eq!(renamed.node.as_deref(), Some("hv-02"));
        server_on(&cat, 2, None).await;
        server_on(&cat, 3, None).await;
        assert_eq!(cat.adopt_unassigned_servers("hv-01").await.unwrap(), 2);
        assert_eq!(cat.adopt_unassigned_servers("hv-09").await.unwrap(), 0, "none left");
        let s2 = cat.server(ServerId(2), Scope::All).await.unwrap().unwrap();
        assert_eq!(s2.node.as_deref(), Some("hv-01"));
    }

    async fn claims_take_only_their_nodes_servers_and_record_the_node(cat) {
        server_on(&cat, 1, Some("n1")).await;
        server_on(&cat, 2, Some("n2")).await;
        server_on(&cat, 3, None).await;
        let b1 = backup_of(&cat, 1).await;
        let b2 = backup_of(&cat, 2).await;
        let b3 = backup_of(&cat, 3).await;
        let until = now() + Duration::seconds(20);
        let j2 = cat
            .claim_job_leased(&claim("n2-w0", Some("n2"), until), now())
            .await
            .unwrap()
            .expect("server 2's job is n2's");
        assert_eq!(j2.backup_id, b2.id, "the older job of n1 is not n2's to take");
        assert_eq!(j2.node.as_deref(), Some("n2"));
        assert_eq!(j2.lease_expires_at, Some(until));
        assert!(cat
            .claim_job_leased(&claim("n2-w1", Some("n2"), until), now())
            .await
            .unwrap()
            .is_none());
        let j1 = cat
            .claim_job_leased(&claim("n1-w0", Some("n1"), until), now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((j1.backup_id, j1.node.as_deref()), (b1.id, Some("n1")));
        assert!(
            cat.claim_job_leased(&claim("n1-w1", Some("n1"), until), now())
                .await
                .unwrap()
                .is_none(),
            "a server on no node is not a node's"
        );
        let j3 = cat
            .claim_job_leased(&claim("any", None, until), now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((j3.backup_id, j3.node), (b3.id, None));
        let stored = cat.job(j2.id).await.unwrap().unwrap();
        assert_eq!(stored.node.as_deref(), Some("n2"));

        let loads = cat.node_loads().await.unwrap();
        let load = |n: Option<&str>| {
            loads
                .iter()
                .find(|l| l.node.as_deref() == n)
                .map(|l| (l.servers, l.running_jobs, l.queued_jobs))
        };
        assert_eq!(load(Some("n1")), Some((1, 1, 0)));
        assert_eq!(load(Some("n2")), Some((1, 1, 0)));
        assert_eq!(load(None), Some((1, 1, 0)));
    }

    async fn a_lease_is_renewed_only_by_its_owner_and_expires_once(cat) {
        server_on(&cat, 1, Some("n1")).await;
        let b = backup_of(&cat, 1).await;
        let wall = now();
        let j = cat
            .claim_job_leased(&claim("a-w0", Some("n1"), wall + Duration::seconds(20)), now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.attempts, 1);
        assert!(
            !cat.renew_lease(j.id, "b-w0", wall + Duration::seconds(60)).await.unwrap(),
            "another worker cannot renew it"
        );
        assert_eq!(
            cat.job(j.id).await.unwrap().unwrap().lease_expires_at,
            Some(wall + Duration::seconds(20)),
            "and did not move it"
        );
        assert!(cat.renew_lease(j.id, "a-w0", wall + Duration::seconds(25)).await.unwrap());
        assert!(
            cat.expire_leases(wall + Duration::seconds(24), now()).await.unwrap().is_empty(),
            "a renewed lease holds"
        );
        let expired = cat
            .expire_leases(wall + Duration::seconds(26), now() + Duration::seconds(26))
            .await
            .unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!((expired[0].job, expired[0].requeued), (j.id, true));
        assert!(
            cat.expire_leases(wall + Duration::seconds(27), now()).await.unwrap().is_empty(),
            "requeued once"
        );
        // The old owner has lost it: no renewal, no progress, no outcome.
        assert!(!cat.renew_lease(j.id, "a-w0", wall + Duration::seconds(50)).await.unwrap());
        assert!(!cat.job_progress(j.id, "a-w0", 50, now()).await.unwrap());
        let outcome = JobOutcome::BackupCompleted {
            size_mb: 1,
            stored_bytes: 1,
        };
        assert!(!cat.finish_job(j.id, "a-w0", outcome.clone(), now()).await.unwrap());
        let requeued = cat.job(j.id).await.unwrap().unwrap();
        assert_eq!(
            (requeued.state, requeued.claimed_by, requeued.lease_expires_at),
            (JobState::Queued, None, None)
        );
        let backup = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(backup.status, WorkStatus::InProgress);

        // A new agent of the node takes it: attempt 2, and it finishes.
        let again = cat
            .claim_job_leased(
                &claim("c-w0", Some("n1"), wall + Duration::seconds(60)),
                now() + Duration::seconds(30),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.id, again.attempts), (j.id, 2));
        assert!(!cat.renew_lease(j.id, "a-w0", wall + Duration::seconds(90)).await.unwrap());
        assert!(cat.finish_job(j.id, "c-w0", outcome, now()).await.unwrap());
        let done = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(done.status, WorkStatus::Completed);
    }

    async fn an_expired_lease_fails_the_job_once_attempts_are_used(cat) {
        server_on(&cat, 1, Some("n1")).await;
        let b = backup_of(&cat, 1).await;
        let wall = now();
        for attempt in 1..=3 {
            let t = wall + Duration::seconds(100 * attempt);
            let j = cat
                .claim_job_leased(&claim("dead", Some("n1"), t + Duration::seconds(20)), now())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(j.attempts as i64, attempt);
            let rec = cat.expire_leases(t + Duration::seconds(21), now()).await.unwrap();
            assert_eq!(rec.len(), 1);
            assert_eq!(rec[0].requeued, attempt < 3);
        }
        let failed = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(failed.status, WorkStatus::Failed);
        assert!(failed.error.unwrap().contains("3 times"));
    }

    async fn expiry_is_handled_once_with_several_processes_sweeping(cat) {
        for s in 1..=20 {
            server_on(&cat, s, Some("n1")).await;
            backup_of(&cat, s).await;
        }
        let wall = now();
        let mut claimed = 0;
        while cat
            .claim_job_leased(&claim("dead", Some("n1"), wall + Duration::seconds(20)), now())
            .await
            .unwrap()
            .is_some()
        {
            claimed += 1;
        }
        assert_eq!(claimed, 20);
        let mut handles = vec![cat.another_handle().await, cat.another_handle().await];
        handles.push(cat.another_handle().await);
        let mut tasks = Vec::new();
        for h in handles {
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                // Each process sweeps a few times, as the periodic task would.
                for _ in 0..3 {
                    mine.extend(
                        h.expire_leases(wall + Duration::seconds(21), now())
                            .await
                            .unwrap()
                            .into_iter()
                            .map(|r| r.job),
                    );
                }
                mine
            }));
        }
        let mut recovered = Vec::new();
        for t in tasks {
            recovered.extend(t.await.unwrap());
        }
        let distinct: HashSet<_> = recovered.iter().collect();
        assert_eq!((recovered.len(), distinct.len()), (20, 20), "each job requeued by one sweeper, once");
        let mut n = 0;
        while let Some(j) = cat
            .claim_job_leased(&claim("w", Some("n1"), wall + Duration::seconds(60)), now())
            .await
            .unwrap()
        {
            assert_eq!(j.attempts, 2, "one attempt counted per expiry");
            n += 1;
        }
        assert_eq!(n, 20);
    }

    async fn node_heartbeats_are_listed_by_prefix(cat) {
        cat.record_task_run("node:b_1", now(), "workers=2 live=2").await.unwrap();
        cat.record_task_run("node:a-2", now(), "stopped").await.unwrap();
        cat.record_task_run("nodeX", now(), "").await.unwrap();
        cat.record_task_run("gc", now(), "").await.unwrap();
        let names: Vec<String> = cat
            .task_runs_prefixed("node:")
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["node:a-2", "node:b_1"]);
    }
}
