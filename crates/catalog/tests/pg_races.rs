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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_scheduler_leader_at_a_time_and_it_moves_when_the_holder_dies() {
    let (db, cats) = handles(4).await;
    // All four claim at once (each on its own task): exactly one leads.
    let mut tasks = Vec::new();
    for c in &cats {
        let mut lock = c.leader_lock();
        tasks.push(tokio::spawn(async move {
            let held = lock.hold().await;
            (lock, held)
        }));
    }
    let mut locks = Vec::new();
    let mut leaders = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (lock, held) = t.await.unwrap();
        if held.unwrap() {
            leaders.push(i);
        }
        locks.push(lock);
    }
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let first = leaders[0];
    // Checked again, the holder keeps it and nobody else gets it.
    for round in 0..3 {
        for (i, l) in locks.iter_mut().enumerate() {
            assert_eq!(
                l.hold().await.unwrap(),
                i == first,
                "round {round}, lock {i}"
            );
        }
    }

    // The holder's session dies as a killed process's would (its backend
    // terminated from outside): it notices at its next check and steps
    // down, and one of the others takes over at theirs.
    let admin = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let killed = admin
        .execute_raw(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
               AND (classid::BIGINT << 32) | objid::BIGINT = {SCHEDULER_LOCK_KEY}"
        ))
        .await
        .unwrap();
    assert_eq!(killed, 1, "one session held the lock");
    assert!(
        !locks[first].hold().await.unwrap_or(false),
        "a holder whose session died no longer leads"
    );
    let mut second = None;
    for _ in 0..50 {
        for (i, l) in locks.iter_mut().enumerate() {
            if i != first && l.hold().await.unwrap() {
                assert!(second.is_none(), "two leaders: {second:?} and {i}");
                second = Some(i);
            }
        }
        if second.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let second = second.expect("another handle took the leadership over");
    // The old holder reconnects and finds it taken.
    assert!(!locks[first].hold().await.unwrap());

    // A clean release hands it over at once.
    locks[second].release().await;
    let mut third = Vec::new();
    for (i, l) in locks.iter_mut().enumerate() {
        if i != second && l.hold().await.unwrap() {
            third.push(i);
        }
    }
    assert_eq!(third.len(), 1, "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_automatic_backup_per_server_and_day_across_processes() {
    let (_db, cats) = handles(4).await;
    servers(&cats[0], 3).await;
    let day = now() - Duration::hours(2);
    let automatic = |server: i64| NewBackup {
        backup_type: BackupType::Automatic,
        description: AUTOMATIC_DESCRIPTION.into(),
        expires_at: Some(now() + Duration::days(7)),
        scheduled_for: Some(day),
        ..manual(server)
    };
    // Four schedulers (one per handle) create every server's backup at once.
    let mut tasks = Vec::new();
    for cat in &cats {
        for s in 1..=3 {
            let (cat, new) = (cat.clone(), automatic(s));
            tasks.push(tokio::spawn(async move {
                (s, cat.create_backup(new, now()).await)
            }));
        }
    }
    let mut won: HashMap<i64, Vec<BackupId>> = HashMap::new();
    for t in tasks {
        match t.await.unwrap() {
            (s, Ok(b)) => won.entry(s).or_default().push(b.id),
            (_, Err(CatalogError::Conflict(_))) => {}
            (_, Err(e)) => panic!("{e}"),
        }
    }
    assert!(won.values().all(|v| v.len() == 1), "{won:?}");
    assert_eq!(won.len(), 3);
    // The customer deletes one; the day's slot stays taken for every process.
    let gone = won[&1][0];
    cats[2].delete_backup(gone, Scope::All).await.unwrap();
    for cat in &cats {
        assert!(matches!(
            cat.create_backup(automatic(1), now()).await,
            Err(CatalogError::Conflict(_))
        ));
    }
    // The next day is a new slot.
    let next = NewBackup {
        scheduled_for: Some(day + Duration::days(1)),
        ..automatic(1)
    };
    cats[3].create_backup(next, now()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_events_are_claimed_by_one_process_per_attempt() {
    let (_db, cats) = handles(4).await;
    // Six accounts with a webhook and a server each, three events each.
    let plan = cats[0].plan_by_name("standard").await.unwrap().unwrap();
    for a in 0..6i64 {
        let name = format!("acc{a}");
        let acc = cats[0].create_account(&name, now()).await.unwrap();
        cats[0]
            .set_account_webhook(
                &name,
                Some(Webhook {
                    url: "https://hooks.example/h".into(),
                    secret: "s".into(),
                }),
            )
            .await
            .unwrap();
        cats[0]
            .add_server(new_server(a + 1, acc.id, plan.id), now())
            .await
            .unwrap();
    }
    let mut events = 0;
    for _ in 0..3 {
        for s in 1..=6 {
            cats[0].create_backup(manual(s), now()).await.unwrap();
            let j = cats[0].claim_job("w", now()).await.unwrap().unwrap();
            let done = JobOutcome::BackupCompleted {
                size_mb: 1,
                stored_bytes: 1,
            };
            assert!(cats[0].finish_job(j.id, "w", done, now()).await.unwrap());
            events += 1;
        }
    }
    // Four senders (one per handle) claim and deliver until nothing is
    // left; each attempt is recorded by the one that claimed it. The first
    // attempt of every event fails once, so events are claimed again.
    let attempts: Arc<Mutex<Vec<(String, u32)>>> = Default::default();
    let holding: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut senders = Vec::new();
    for cat in &cats {
        let (cat, attempts, holding) = (cat.clone(), attempts.clone(), holding.clone());
        senders.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 30 {
                let claimed = cat.claim_webhook_events(now(), 4, 60).await.unwrap();
                if claimed.is_empty() {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                for e in &claimed {
                    assert!(
                        holding.lock().unwrap().insert(e.id.clone()),
                        "event {} claimed by two processes at once",
                        e.id
                    );
                    attempts.lock().unwrap().push((e.id.clone(), e.attempts));
                }
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                for e in claimed {
                    holding.lock().unwrap().remove(&e.id);
                    let attempt = if e.attempts == 0 {
                        WebhookAttempt::Retry {
                            at: now(),
                            error: "503".into(),
                        }
                    } else {
                        WebhookAttempt::Delivered
                    };
                    cat.record_webhook_attempt(&e.id, attempt, now())
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let attempts = attempts.lock().unwrap().clone();
    let mut per_event: HashMap<String, Vec<u32>> = HashMap::new();
    for (id, n) in attempts {
        per_event.entry(id).or_default().push(n);
    }
    assert_eq!(per_event.len(), events, "every event was attempted");
    for (id, mut seen) in per_event {
        seen.sort();
        assert_eq!(seen, vec![0, 1], "event {id}: one claim per attempt");
    }
    assert!(cats[1]
        .due_webhook_events(now(), 100)
        .await
        .unwrap()
        .is_empty());
}
