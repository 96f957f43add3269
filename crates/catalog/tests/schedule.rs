//! The scheduler's catalog queries ([`ScheduleCatalog`]) against both
//! backends (`common::catalog_tests!`): latest slots and their attempts, retries, expiry that never
//! touches manual backups, verification results, task runs and the store-wide GC turn.

use time::{Duration, OffsetDateTime};
use vpsbackup_catalog::*;

#[macro_use]
mod common;
use common::{new_server, TestCatalog};

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_750_032_000).unwrap() // 2025-06-16 00:00 UTC
}

/// Account "acme" with servers 1 and 2 on the basic plan.
async fn setup(cat: &TestCatalog) {
    let acc = cat.create_account("acme", t0()).await.unwrap();
    let plan = cat.plan_by_name("basic").await.unwrap().unwrap();
    for id in [1, 2] {
        cat.add_server(new_server(id, acc.id, plan.id), t0())
            .await
            .unwrap();
    }
}

fn automatic(server: i64, day: OffsetDateTime, now: OffsetDateTime) -> NewBackup {
    NewBackup {
        server_id: ServerId(server),
        scope: Scope::All,
        backup_type: BackupType::Automatic,
        description: AUTOMATIC_DESCRIPTION.into(),
        expires_at: Some(now + Duration::days(7)),
        scheduled_for: Some(day),
        run_after: None,
    }
}

/// Claims and finishes the next job with `outcome`.
async fn run_next(cat: &TestCatalog, now: OffsetDateTime, outcome: JobOutcome) -> Job {
    let job = cat
        .claim_job("w", now)
        .await
        .unwrap()
        .expect("a job is due");
    assert!(cat.finish_job(job.id, "w", outcome, now).await.unwrap());
    job
}

catalog_tests! {
    async fn slots_attempts_and_retries(cat) {
        setup(&cat).await;
        // Window override on server 2.
        cat.update_server(
            ServerId(2),
            ServerUpdate {
                window_start_minute: Some(Some(22 * 60)),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap();
        let servers = cat.auto_backup_servers().await.unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(
            (servers[0].window_start_minute, servers[0].window_minutes),
            (180, 120)
        );
        assert_eq!(servers[1].window_start_minute, 22 * 60);
        assert_eq!(servers[0].retention_days, 7);
        assert!(servers
            .iter()
            .all(|s| s.latest.is_none() && s.auto_backup_enabled));

        // One automatic backup per server and day.
        let now = t0() + Duration::hours(3);
        let b = cat
            .create_backup(automatic(1, t0(), now), now)
            .await
            .unwrap();
        let dup = cat.create_backup(automatic(1, t0(), now), now).await;
        assert!(matches!(dup, Err(CatalogError::Conflict(_))), "{dup:?}");

        let fail = JobOutcome::Failed {
            reason: "The server's disk could not be read.".into(),
            detail: Some("The disk /tmp/disk-1.img does not exist.".into()),
        };
        run_next(&cat, now, fail.clone()).await;
        let slot = cat.auto_backup_servers().await.unwrap()[0]
            .latest
            .clone()
            .unwrap();
        assert_eq!(
            (
                slot.backup_id,
                slot.scheduled_for,
                slot.status,
                slot.attempts
            ),
            (b.id, t0(), WorkStatus::Failed, 1)
        );
        assert_eq!(slot.completed_at, Some(now));

        // A retry puts the same row back in progress with a new job, due later.
        let later = now + Duration::minutes(5);
        assert!(cat.retry_backup(b.id, later, now).await.unwrap());
        assert!(
            !cat.retry_backup(b.id, later, now).await.unwrap(),
            "only a failed backup is retried"
        );
        let row = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.error.as_deref(), row.progress),
            (WorkStatus::InProgress, None, 0)
        );
        assert!(
            cat.claim_job("w", now).await.unwrap().is_none(),
            "not due yet"
        );
        assert_eq!(
            cat.job_counts(now).await.unwrap(),
            JobCounts {
                queued_due: 0,
                running: 0
            }
        );
        assert_eq!(
            cat.job_counts(later).await.unwrap(),
            JobCounts {
                queued_due: 1,
                running: 0
            }
        );
        run_next(&cat, later, fail).await;
        let slot = cat.auto_backup_servers().await.unwrap()[0]
            .latest
            .clone()
            .unwrap();
        assert_eq!((slot.status, slot.attempts), (WorkStatus::Failed, 2));
        let row = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert!(row.error.unwrap().contains("disk could not be read"));

        // A recorded slot outlives its backup.
        cat.record_slot(ServerId(1), t0()).await.unwrap();
        cat.record_slot(ServerId(1), t0() - Duration::days(3))
            .await
            .unwrap();
        cat.delete_backup(b.id, Scope::All).await.unwrap();
        let s1 = cat.auto_backup_servers().await.unwrap().remove(0);
        assert_eq!(
            (s1.latest, s1.last_slot),
            (None, Some(t0())),
            "never moves back"
        );

        // The day's slot stays taken after its backup was deleted: no second
        // automatic backup of that day, whichever scheduler asks.
        let again = cat.create_backup(automatic(1, t0(), later), later).await;
        assert!(matches!(again, Err(CatalogError::Conflict(_))), "{again:?}");

        // The latest slot is the newest day's.
        let next_day = t0() + Duration::days(1);
        let b2 = cat
            .create_backup(automatic(1, next_day, next_day), next_day)
            .await
            .unwrap();
        let slot = cat.auto_backup_servers().await.unwrap()[0]
            .latest
            .clone()
            .unwrap();
        assert_eq!(
            (slot.backup_id, slot.status, slot.attempts),
            (b2.id, WorkStatus::InProgress, 1)
        );
    }

    async fn expiry_never_lists_manual_or_running_backups(cat) {
        setup(&cat).await;
        let now = t0();
        let manual = cat
            .create_backup(
                NewBackup {
                    server_id: ServerId(1),
                    scope: Scope::All,
                    backup_type: BackupType::Manual,
                    description: String::new(),
                    expires_at: None,
                    scheduled_for: None,
                    run_after: None,
                },
                now,
            )
            .await
            .unwrap();
        run_next(
            &cat,
            now,
            JobOutcome::BackupCompleted {
                size_mb: 1,
                stored_bytes: 1,
            },
        )
        .await;
        let done = cat
            .create_backup(automatic(1, t0(), now), now)
            .await
            .unwrap();
        run_next(
            &cat,
            now,
            JobOutcome::BackupCompleted {
                size_mb: 1,
                stored_bytes: 1,
            },
        )
        .await;
        let failed = cat
            .create_backup(automatic(2, t0(), now), now)
            .await
            .unwrap();
        run_next(
            &cat,
            now,
            JobOutcome::Failed {
                reason: "no".into(),
                detail: None,
            },
        )
        .await;
        let running = cat
            .create_backup(automatic(1, t0() + Duration::days(1), now), now)
            .await
            .unwrap();

        assert!(cat
            .expired_backups(now + Duration::days(7) - Duration::seconds(1), 10)
            .await
            .unwrap()
            .is_empty());
        let far = now + Duration::days(400);
        let ids: Vec<_> = cat
            .expired_backups(far, 10)
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, vec![done.id, failed.id]);
        assert!(!ids.contains(&manual.id) && !ids.contains(&running.id));
        assert_eq!(
            cat.expired_backups(far, 1).await.unwrap().len(),
            1,
            "limit holds"
        );
    }

    async fn verification_results_and_task_runs(cat) {
        setup(&cat).await;
        let now = t0();
        let a = cat
            .create_backup(automatic(1, t0(), now), now)
            .await
            .unwrap();
        run_next(
            &cat,
            now,
            JobOutcome::BackupCompleted {
                size_mb: 1,
                stored_bytes: 1,
            },
        )
        .await;
        let b = cat
            .create_backup(automatic(2, t0(), now), now)
            .await
            .unwrap();
        run_next(
            &cat,
            now,
            JobOutcome::BackupCompleted {
                size_mb: 1,
                stored_bytes: 1,
            },
        )
        .await;
        // An in-progress backup is never due for verification.
        cat.create_backup(automatic(1, t0() + Duration::days(1), now), now)
            .await
            .unwrap();

        let due: Vec<_> = cat
            .backups_due_for_verify(now, 10)
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(due, vec![a.id, b.id], "never-verified first, by id");
        let v1 = now + Duration::hours(1);
        assert!(cat.record_verification(a.id, v1, None).await.unwrap());
        assert!(cat
            .record_verification(b.id, v1 + Duration::hours(1), Some("3 corrupt chunks"))
            .await
            .unwrap());
        assert!(!cat
            .record_verification(BackupId(999), v1, None)
            .await
            .unwrap());
        let rb = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert!(rb.damaged);
        assert_eq!(rb.verify_error.as_deref(), Some("3 corrupt chunks"));
        assert_eq!(rb.verified_at, Some(v1 + Duration::hours(1)));
        // A damaged backup cannot be restored.
        let refused = cat
            .create_restore(
                NewRestore {
                    server_id: ServerId(2),
                    backup_id: b.id,
                    scope: Scope::All,
                },
                now,
            )
            .await;
        assert!(
            matches!(refused, Err(CatalogError::Invalid(_))),
            "{refused:?}"
        );
        // Checked within the interval: not due; the oldest check first once stale.
        assert!(cat.backups_due_for_verify(v1, 10).await.unwrap().is_empty());
        let due: Vec<_> = cat
            .backups_due_for_verify(v1 + Duration::days(8), 10)
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(due, vec![a.id, b.id]);
        // A clean re-verification clears the flag.
        cat.record_verification(b.id, v1 + Duration::days(1), None)
            .await
            .unwrap();
        let rb = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert!(!rb.damaged && rb.verify_error.is_none());

        assert!(cat.task_run("gc").await.unwrap().is_none());
        cat.record_task_run("gc", now, "freed 1 MiB").await.unwrap();
        cat.record_task_run("gc", v1, "freed 2 MiB").await.unwrap();
        let run = cat.task_run("gc").await.unwrap().unwrap();
        assert_eq!((run.last_run, run.summary.as_str()), (v1, "freed 2 MiB"));
    }

    /// A damaged backup is due again as soon as a newer backup of its server
    /// completes (that backup's fresh copies may repair it), not only after
    /// the interval; once found good it waits for the interval again.
    async fn a_damaged_backup_is_due_again_after_a_newer_backup_of_its_server(cat) {
        setup(&cat).await;
        let now = t0();
        let a = cat
            .create_backup(automatic(1, t0(), now), now)
            .await
            .unwrap();
        let done = JobOutcome::BackupCompleted {
            size_mb: 1,
            stored_bytes: 1,
        };
        run_next(&cat, now, done.clone()).await;
        let v1 = now + Duration::hours(1);
        cat.record_verification(a.id, v1, Some("1 corrupt chunk"))
            .await
            .unwrap();
        let within = v1 - Duration::hours(1);
        let due = |cat: &TestCatalog| {
            let cat = cat.clone();
            async move {
                cat.backups_due_for_verify(within, 10)
                    .await
                    .unwrap()
                    .iter()
                    .map(|b| b.id)
                    .collect::<Vec<_>>()
            }
        };
        assert!(due(&cat).await.is_empty());
        // A newer backup of another server changes nothing.
        let later = v1 + Duration::hours(1);
        cat.create_backup(automatic(2, t0(), later), later)
            .await
            .unwrap();
        run_next(&cat, later, done.clone()).await;
        assert!(!due(&cat).await.contains(&a.id));
        // One of the same server: due.
        cat.create_backup(automatic(1, t0() + Duration::days(1), later), later)
            .await
            .unwrap();
        run_next(&cat, later, done).await;
        assert!(due(&cat).await.contains(&a.id));
        cat.record_verification(a.id, later + Duration::hours(1), None)
            .await
            .unwrap();
        assert!(!due(&cat).await.contains(&a.id));
    }

    async fn queue_stats_count_by_kind_and_state_and_age_the_oldest_due_job(cat) {
        setup(&cat).await;
        let now = t0() + Duration::hours(3);
        assert_eq!(cat.queue_stats(now).await.unwrap(), QueueStats::default());
        let manual = |server| NewBackup {
            server_id: ServerId(server),
            scope: Scope::All,
            backup_type: BackupType::Manual,
            description: String::new(),
            expires_at: None,
            scheduled_for: None,
            run_after: None,
        };
        let first = now - Duration::minutes(10);
        cat.create_backup(manual(1), first).await.unwrap();
        cat.create_backup(manual(2), now - Duration::minutes(4))
            .await
            .unwrap();
        // A retry waiting for its time is queued but not due: it does not age the queue.
        cat.create_backup(
            NewBackup {
                run_after: Some(now + Duration::hours(1)),
                ..automatic(1, t0(), now)
            },
            now,
        )
        .await
        .unwrap();
        let count = |s: &QueueStats, kind, state| {
            s.jobs
                .iter()
                .find(|c| c.kind == kind && c.state == state)
                .map_or(0, |c| c.jobs)
        };
        let stats = cat.queue_stats(now).await.unwrap();
        assert_eq!(count(&stats, JobKind::Backup, JobState::Queued), 3);
        assert_eq!(count(&stats, JobKind::Backup, JobState::Running), 0);
        assert_eq!(stats.oldest_due_since, Some(first));

        // The oldest runs (server 1's), the next due one is now the oldest waiting.
        let job = cat.claim_job("w", now).await.unwrap().unwrap();
        assert_eq!(job.server_id, ServerId(1));
        let stats = cat.queue_stats(now).await.unwrap();
        assert_eq!(count(&stats, JobKind::Backup, JobState::Queued), 2);
        assert_eq!(count(&stats, JobKind::Backup, JobState::Running), 1);
        assert_eq!(stats.oldest_due_since, Some(now - Duration::minutes(4)));
        // Finished jobs leave the figures.
        assert!(cat
            .finish_job(
                job.id,
                "w",
                JobOutcome::BackupCompleted {
                    size_mb: 1,
                    stored_bytes: 1
                },
                now
            )
            .await
            .unwrap());
        let stats = cat.queue_stats(now).await.unwrap();
        assert_eq!(count(&stats, JobKind::Backup, JobState::Running), 0);
        assert_eq!(count(&stats, JobKind::Restore, JobState::Queued), 0);
    }

    async fn one_gc_turn_at_a_time_across_processes_sharing_the_catalog(cat) {
        let other = cat.another_handle().await;
        let first = cat.claim_gc_turn().await.unwrap();
        assert!(first.is_some());
        let second = other.claim_gc_turn().await.unwrap();
        if !cat.is_postgres() {
            // One box: the engine's host lock keeps its GCs apart.
            assert!(second.is_some());
            return;
        }
        assert!(second.is_none(), "a second process took the GC turn while the first held it");
        assert!(cat.claim_gc_turn().await.unwrap().is_none(), "nor the same process twice");
        drop(first);
        // The holder's session ends with its connection; the server may take
        // a moment to notice.
        let mut again = None;
        for _ in 0..100 {
            again = other.claim_gc_turn().await.unwrap();
            if again.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "the turn was not released with its holder");
    }
}
