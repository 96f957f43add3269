//! PostgreSQL under real concurrency: several catalog handles on one
//! database, each with its own connection pool as separate processes would
//! have, racing on the rules SQLite gets from its single writer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use time::Duration;
use vpsbackup_catalog::*;

mod common;
use common::{new_server, now, PgDatabase};

/// `n` handles on one fresh database (the first one applies the migrations).
async fn handles(n: usize) -> (PgDatabase, Vec<Arc<PgCatalog>>) {
    let db = PgDatabase::create().await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(
            PgCatalog::open_with_connections(&db.url, 6).await.unwrap(),
        ));
    }
    (db, out)
}

/// Account "acme" with servers `1..=n` on the standard plan.
async fn servers(cat: &PgCatalog, n: i64) {
    let acc = cat.create_account("acme", now()).await.unwrap();
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    for id in 1..=n {
        cat.add_server(new_server(id, acc.id, plan.id), now())
            .await
            .unwrap();
    }
}

fn manual(server: i64) -> NewBackup {
    NewBackup {
        server_id: ServerId(server),
        scope: Scope::All,
        backup_type: BackupType::Manual,
        description: "race".into(),
        expires_at: None,
        scheduled_for: None,
        run_after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_limit_holds_across_processes() {
    let (_db, cats) = handles(4).await;
    servers(&cats[0], 2).await;
    // 40 creates for server 1 spread over 4 handles, and some for server 2
    // at the same time (they must not count against server 1).
    let mut tasks = Vec::new();
    for i in 0..48 {
        let cat = cats[i % cats.len()].clone();
        let server = if i % 6 == 5 { 2 } else { 1 };
        tasks.push(tokio::spawn(async move {
            (server, cat.create_backup(manual(server), now()).await)
        }));
    }
    let mut won: HashMap<i64, u32> = HashMap::new();
    for t in tasks {
        match t.await.unwrap() {
            (s, Ok(_)) => *won.entry(s).or_default() += 1,
            (_, Err(CatalogError::ManualLimit { limit: 10 })) => {}
            (_, Err(e)) => panic!("{e}"),
        }
    }
    assert_eq!(won[&1], 10, "exactly ten manual backups of server 1");
    assert_eq!(won[&2], 8, "server 2's own eight all fit");
    for cat in &cats {
        let s = cat.server(ServerId(1), Scope::All).await.unwrap().unwrap();
        assert_eq!(s.manual_backups_used, 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_claimed_once_and_one_per_server_across_processes() {
    let (_db, cats) = handles(4).await;
    let servers_n = 12;
    servers(&cats[0], servers_n).await;
    let mut all = HashSet::new();
    for round in 0..4 {
        for s in 1..=servers_n {
            let b = cats[(s as usize + round) % cats.len()]
                .create_backup(manual(s), now())
                .await
                .unwrap();
            all.insert(b.id);
        }
    }
    // Four workers per handle claim and finish until the queue is empty.
    // `running` holds the servers a worker holds a claim of; a claim of a
    // server already in it would be a second running job of that server.
    let running: Arc<Mutex<HashSet<ServerId>>> = Default::default();
    let claimed: Arc<Mutex<Vec<BackupId>>> = Default::default();
    let mut workers = Vec::new();
    for (h, cat) in cats.iter().enumerate() {
        for w in 0..4 {
            let (cat, running, claimed) = (cat.clone(), running.clone(), claimed.clone());
            let name = format!("h{h}-w{w}");
            workers.push(tokio::spawn(async move {
                let mut idle = 0;
                while idle < 20 {
                    let Some(job) = cat.claim_job(&name, now()).await.unwrap() else {
                        idle += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        continue;
                    };
                    idle = 0;
                    assert!(
                        running.lock().unwrap().insert(job.server_id),
                        "server {} has two running jobs",
                        job.server_id
                    );
                    claimed.lock().unwrap().push(job.backup_id);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    assert!(running.lock().unwrap().remove(&job.server_id));
                    let outcome = JobOutcome::BackupCompleted {
                        size_mb: 1,
                        stored_bytes: 1,
                    };
                    assert!(cat.finish_job(job.id, &name, outcome, now()).await.unwrap());
                }
            }));
        }
    }
    for w in workers {
        w.await.unwrap();
    }
    let claimed = claimed.lock().unwrap().clone();
    let distinct: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), all.len(), "no job claimed twice");
    assert_eq!(distinct, all, "every job claimed");
    let done = cats[1].all_backups().await.unwrap();
    assert!(done.iter().all(|b| b.status == WorkStatus::Completed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_is_claimed_once_across_processes() {
    let (_db, cats) = handles(4).await;
    let owner = TokenOwner::Account(AccountId(1));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let cat = cats[i % cats.len()].clone();
        tasks.push(tokio::spawn(async move {
            let req = IdempotentRequest {
                owner,
                key: "same".into(),
                fingerprint: [4; 32],
            };
            cat.claim_idempotency_key(&req, now(), now() - Duration::hours(24))
                .await
                .unwrap()
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        match t.await.unwrap() {
            IdempotencyClaim::Claimed => claimed += 1,
            other => assert_eq!(other, IdempotencyClaim::InProgress { started_at: now() }),
        }
    }
    assert_eq!(claimed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_jobs_are_recovered_once_when_processes_race() {
    let (_db, cats) = handles(3).await;
    servers(&cats[0], 20).await;
    for s in 1..=20 {
        cats[0].create_backup(manual(s), now()).await.unwrap();
    }
    while cats[0].claim_job("dead", now()).await.unwrap().is_some() {}
    let later = now() + Duration::seconds(60);
    let mut tasks = Vec::new();
    for cat in &cats {
        let cat = cat.clone();
        tasks.push(tokio::spawn(async move {
            cat.recover_stale_jobs(now() + Duration::seconds(30), later)
                .await
                .unwrap()
        }));
    }
    let mut recovered = Vec::new();
    for t in tasks {
        recovered.extend(t.await.unwrap().into_iter().map(|r| r.job));
    }
    let distinct: HashSet<_> = recovered.iter().collect();
    assert_eq!(
        recovered.len(),
        20,
        "each stale job recovered by one process"
    );
    assert_eq!(distinct.len(), 20);
    // Each was requeued once: attempt 1 of 3 is used, not more.
    let mut n = 0;
    while let Some(j) = cats[2].claim_job("w", later).await.unwrap() {
        assert_eq!(j.attempts, 2);
        n += 1;
    }
    assert_eq!(n, 20);
}
