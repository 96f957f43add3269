//! The webhook outbox: an event is written iff a job's outcome is recorded
//! (and the account has a webhook), and each account's events come out one
//! at a time, oldest first.

use time::Duration;
use vpsbackup_catalog::*;

#[macro_use]
mod common;
use common::{new_server, now, TestCatalog};

fn hook(url: &str) -> Option<Webhook> {
    Some(Webhook {
        url: url.into(),
        secret: "s".into(),
    })
}

async fn account_with_server(cat: &TestCatalog, name: &str, server: i64) -> Account {
    let acc = cat.create_account(name, now()).await.unwrap();
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    cat.add_server(new_server(server, acc.id, plan.id), now())
        .await
        .unwrap();
    acc
}

async fn run_backup(cat: &TestCatalog, server: i64, outcome: JobOutcome) -> (Backup, bool) {
    let b = cat
        .create_backup(
            NewBackup {
                server_id: ServerId(server),
                scope: Scope::All,
                backup_type: BackupType::Manual,
                description: String::new(),
                expires_at: None,
                scheduled_for: None,
                run_after: None,
            },
            now(),
        )
        .await
        .unwrap();
    let j = cat.claim_job("w", now()).await.unwrap().unwrap();
    assert_eq!(j.backup_id, b.id);
    let recorded = cat.finish_job(j.id, "w", outcome, now()).await.unwrap();
    (b, recorded)
}

fn completed() -> JobOutcome {
    JobOutcome::BackupCompleted {
        size_mb: 1,
        stored_bytes: 1,
    }
}

catalog_tests! {
    async fn outcomes_write_events_in_order_for_accounts_with_a_webhook(cat) {
        let a = account_with_server(&cat, "a", 1).await;
        account_with_server(&cat, "b", 2).await;
        let set = cat
            .set_account_webhook("a", hook("https://a.example/h"))
            .await
            .unwrap();
        assert_eq!(set.webhook_url.as_deref(), Some("https://a.example/h"));
        assert!(matches!(
            cat.set_account_webhook("nobody", hook("https://x.example/"))
                .await,
            Err(CatalogError::NotFound(_))
        ));
        assert!(
            !format!("{:?}", hook("u")).contains("\"s\""),
            "secret redacted"
        );

        let (b1, _) = run_backup(&cat, 1, completed()).await;
        let (b2, _) = run_backup(
            &cat,
            1,
            JobOutcome::Failed {
                reason: "disk gone".into(),
                detail: None,
            },
        )
        .await;
        // Account b has no webhook: nothing recorded for it.
        run_backup(&cat, 2, completed()).await;
        assert_eq!(cat.next_webhook_due().await.unwrap(), Some(now()));

        // Only the account's oldest pending event is due.
        let due = cat.due_webhook_events(now(), 10).await.unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        let first = &due[0];
        assert_eq!(first.account_id, a.id);
        assert_eq!(first.kind, WebhookEventKind::BackupCompleted);
        assert_eq!(first.subject, WebhookSubject::Backup(b1.id));
        assert_eq!(first.webhook.secret, "s");
        assert!(first.payload.is_none());
        cat.set_webhook_payload(&first.id, "{\"v\":1}")
            .await
            .unwrap();
        cat.set_webhook_payload(&first.id, "{\"v\":2}")
            .await
            .unwrap();

        // A failed attempt holds the account's queue until its retry time.
        let retry_at = now() + Duration::seconds(30);
        cat.record_webhook_attempt(
            &first.id,
            WebhookAttempt::Retry {
                at: retry_at,
                error: "500".into(),
            },
            now(),
        )
        .await
        .unwrap();
        assert!(cat.due_webhook_events(now(), 10).await.unwrap().is_empty());
        assert_eq!(cat.next_webhook_due().await.unwrap(), Some(retry_at));
        let again = cat.due_webhook_events(retry_at, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, first.id);
        assert_eq!(again[0].attempts, 1);
        assert_eq!(
            again[0].payload.as_deref(),
            Some("{\"v\":1}"),
            "frozen body"
        );

        cat.record_webhook_attempt(&first.id, WebhookAttempt::Delivered, retry_at)
            .await
            .unwrap();
        let next = cat.due_webhook_events(retry_at, 10).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].kind, WebhookEventKind::BackupFailed);
        assert_eq!(next[0].subject, WebhookSubject::Backup(b2.id));
        assert_ne!(next[0].id, first.id);
        cat.record_webhook_attempt(
            &next[0].id,
            WebhookAttempt::Failed {
                error: "gave up".into(),
            },
            retry_at,
        )
        .await
        .unwrap();
        assert!(cat
            .due_webhook_events(retry_at, 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(cat.next_webhook_due().await.unwrap(), None);

        // Finished events are purged by age.
        assert_eq!(cat.purge_webhook_events(retry_at).await.unwrap(), 0);
        assert_eq!(
            cat.purge_webhook_events(retry_at + Duration::seconds(1))
                .await
                .unwrap(),
            2
        );
    }

    async fn no_event_for_a_cancelled_job_and_one_for_a_job_failed_by_recovery(cat) {
        account_with_server(&cat, "a", 1).await;
        cat.set_account_webhook("a", hook("https://a.example/h"))
            .await
            .unwrap();

        // Deleted while running: the outcome is not recorded, nor is an event.
        let b = cat
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
                now(),
            )
            .await
            .unwrap();
        let j = cat.claim_job("w", now()).await.unwrap().unwrap();
        cat.delete_backup(b.id, Scope::All).await.unwrap();
        assert!(!cat.finish_job(j.id, "w", completed(), now()).await.unwrap());
        assert!(cat.due_webhook_events(now(), 10).await.unwrap().is_empty());

        // Interrupted three times: failed by recovery, with its event.
        let b = cat
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
                now(),
            )
            .await
            .unwrap();
        let mut t = now();
        for _ in 0..3 {
            t += Duration::seconds(100);
            cat.claim_job("dead", t).await.unwrap().unwrap();
            cat.recover_stale_jobs(t + Duration::seconds(30), t + Duration::seconds(31))
                .await
                .unwrap();
        }
        let due = cat
            .due_webhook_events(t + Duration::seconds(31), 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].kind, WebhookEventKind::BackupFailed);
        assert_eq!(due[0].subject, WebhookSubject::Backup(b.id));

        // Removing the webhook drops what is pending.
        cat.set_account_webhook("a", None).await.unwrap();
        assert_eq!(cat.next_webhook_due().await.unwrap(), None);
        assert_eq!(
            cat.account_by_name("a").await.unwrap().unwrap().webhook_url,
            None
        );
    }

    async fn a_backup_first_found_damaged_writes_one_event(cat) {
        account_with_server(&cat, "a", 1).await;
        cat.set_account_webhook("a", hook("https://a.example/h"))
            .await
            .unwrap();
        let (b, _) = run_backup(&cat, 1, completed()).await;
        let delivered = cat.due_webhook_events(now(), 10).await.unwrap();
        cat.record_webhook_attempt(&delivered[0].id, WebhookAttempt::Delivered, now())
            .await
            .unwrap();

        let later = now() + Duration::days(1);
        assert!(cat.record_verification(b.id, later, None).await.unwrap());
        assert!(cat.due_webhook_events(later, 10).await.unwrap().is_empty());
        for pass in 0..2 {
            let at = later + Duration::days(pass);
            assert!(cat
                .record_verification(b.id, at, Some("3 corrupt chunks"))
                .await
                .unwrap());
        }
        let due = cat
            .due_webhook_events(later + Duration::days(2), 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].kind, WebhookEventKind::BackupDamaged);
        assert_eq!(due[0].kind.as_str(), "backup.damaged");
        assert_eq!(due[0].subject, WebhookSubject::Backup(b.id));
        cat.record_webhook_attempt(&due[0].id, WebhookAttempt::Delivered, later)
            .await
            .unwrap();
        assert_eq!(cat.next_webhook_due().await.unwrap(), None, "only once");
        assert!(!cat
            .record_verification(BackupId(999), later, Some("x"))
            .await
            .unwrap());
    }

    /// A damaged backup found good again: `damaged` and `verify_error` are
    /// cleared and one `backup.repaired` event is written with them; further
    /// good verdicts write nothing more.
    async fn a_damaged_backup_found_good_writes_one_repaired_event(cat) {
        account_with_server(&cat, "a", 1).await;
        cat.set_account_webhook("a", hook("https://a.example/h"))
            .await
            .unwrap();
        let (b, _) = run_backup(&cat, 1, completed()).await;
        let t0 = now() + Duration::days(1);
        for e in cat.due_webhook_events(t0, 10).await.unwrap() {
            cat.record_webhook_attempt(&e.id, WebhookAttempt::Delivered, t0)
                .await
                .unwrap();
        }
        assert!(cat
            .record_verification(b.id, t0, Some("1 corrupt chunk"))
            .await
            .unwrap());
        let damaged = cat.due_webhook_events(t0, 10).await.unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].kind, WebhookEventKind::BackupDamaged);
        cat.record_webhook_attempt(&damaged[0].id, WebhookAttempt::Delivered, t0)
            .await
            .unwrap();

        let t1 = t0 + Duration::days(1);
        for pass in 0..2 {
            assert!(cat
                .record_verification(b.id, t1 + Duration::hours(pass), None)
                .await
                .unwrap());
        }
        let row = cat
            .backup(b.id, vpsbackup_catalog::Scope::All)
            .await
            .unwrap()
            .unwrap();
        assert!(!row.damaged, "{row:?}");
        assert_eq!(row.verify_error, None);
        let due = cat
            .due_webhook_events(t1 + Duration::days(1), 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "once, not at every good pass: {due:?}");
        assert_eq!(due[0].kind, WebhookEventKind::BackupRepaired);
        assert_eq!(due[0].kind.as_str(), "backup.repaired");
        assert_eq!(
            WebhookEventKind::parse("backup.repaired"),
            Some(WebhookEventKind::BackupRepaired)
        );
        assert_eq!(due[0].subject, WebhookSubject::Backup(b.id));
    }

    /// A claimed event is not claimed again (by this or any process) until
    /// its attempt is recorded or the claim expires; a recorded retry frees
    /// it for its next attempt.
    async fn a_claimed_event_is_claimed_once_per_attempt(cat) {
        account_with_server(&cat, "a", 1).await;
        account_with_server(&cat, "b", 2).await;
        for name in ["a", "b"] {
            cat.set_account_webhook(name, hook("https://h.example/h"))
                .await
                .unwrap();
        }
        run_backup(&cat, 1, completed()).await;
        run_backup(&cat, 2, completed()).await;
        let first = cat.claim_webhook_events(now(), 1, 60).await.unwrap();
        assert_eq!(first.len(), 1);
        // Still listed as due (a read), but not claimable while held.
        assert_eq!(cat.due_webhook_events(now(), 10).await.unwrap().len(), 2);
        let second = cat.claim_webhook_events(now(), 10, 60).await.unwrap();
        assert_eq!(second.len(), 1, "only the other account's head: {second:?}");
        assert_ne!(second[0].id, first[0].id);
        assert!(cat.claim_webhook_events(now(), 10, 60).await.unwrap().is_empty());

        // A retry recorded: free again once due.
        let at = now() + Duration::seconds(30);
        cat.record_webhook_attempt(
            &first[0].id,
            WebhookAttempt::Retry {
                at,
                error: "the receiver answered 503".into(),
            },
            now(),
        )
        .await
        .unwrap();
        assert!(cat.claim_webhook_events(now(), 10, 60).await.unwrap().is_empty());
        let again = cat.claim_webhook_events(at, 10, 60).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].id.as_str(), again[0].attempts), (first[0].id.as_str(), 1));

        // A claim whose holder died (never recorded) expires on the
        // database's clock: a zero-second claim is free at once.
        cat.record_webhook_attempt(&second[0].id, WebhookAttempt::Delivered, now())
            .await
            .unwrap();
        cat.execute_raw("UPDATE webhook_events SET claimed_until = 1")
            .await
            .unwrap();
        let expired = cat.claim_webhook_events(at, 10, 0).await.unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, first[0].id);
    }
}
