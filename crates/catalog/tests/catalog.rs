//! The catalog suite, run against both backends (a real SQLite file in a
//! temp dir, a fresh PostgreSQL database): see `common::catalog_tests!`.

use time::Duration;
use vpsbackup_catalog::*;

#[macro_use]
mod common;
use common::{new_server, now, TestCatalog};

async fn server(cat: &TestCatalog, id: i64, account: &str) -> Server {
    let acc = match cat.account_by_name(account).await.unwrap() {
        Some(a) => a,
        None => cat.create_account(account, now()).await.unwrap(),
    };
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    cat.add_server(new_server(id, acc.id, plan.id), now())
        .await
        .unwrap()
}

fn manual(server: i64, scope: Scope) -> NewBackup {
    NewBackup {
        server_id: ServerId(server),
        scope,
        backup_type: BackupType::Manual,
        description: "x".into(),
        expires_at: None,
        scheduled_for: None,
        run_after: None,
    }
}

catalog_tests! {
    async fn default_plans_and_plan_rules(cat) {
        let names: Vec<_> = cat
            .list_plans()
            .await
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.name,
                    p.retention_days,
                    p.window_start_minute,
                    p.window_minutes,
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("basic".into(), 7, 180, 120),
                ("standard".into(), 14, 180, 120),
                ("premium".into(), 30, 180, 120)
            ]
        );
        let bad = cat
            .create_plan(
                NewPlan {
                    name: "x".into(),
                    retention_days: 31,
                    window_start_minute: 0,
                    window_minutes: 60,
                },
                now(),
            )
            .await;
        assert!(matches!(bad, Err(CatalogError::Invalid(_))));
        let dup = cat
            .create_plan(
                NewPlan {
                    name: "basic".into(),
                    retention_days: 8,
                    window_start_minute: 0,
                    window_minutes: 60,
                },
                now(),
            )
            .await;
        assert!(matches!(dup, Err(CatalogError::Conflict(_))));
    }

    async fn tokens_are_found_by_hash_and_revoked(cat) {
        let acc = cat.create_account("acme", now()).await.unwrap();
        let t = cat
            .create_token(
                NewToken {
                    hash: [7; 32],
                    prefix: "vps_abcd".into(),
                    name: "ci".into(),
                    owner: TokenOwner::Account(acc.id),
                },
                now(),
            )
            .await
            .unwrap();
        let found = cat.token_by_hash(&[7; 32]).await.unwrap().unwrap();
        assert_eq!(found.id, t.id);
        assert_eq!(found.account_name.as_deref(), Some("acme"));
        assert!(cat.token_by_hash(&[8; 32]).await.unwrap().is_none());
        assert!(cat.revoke_token(TokenRef::Id(t.id), now()).await.unwrap());
        assert!(!cat.revoke_token(TokenRef::Id(t.id), now()).await.unwrap());
        assert!(cat
            .token_by_hash(&[7; 32])
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some());
    }

    async fn manual_limit_holds_under_concurrency(cat) {
        server(&cat, 12345, "acme").await;
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let cat = cat.clone();
            tasks.push(tokio::spawn(async move {
                cat.create_backup(manual(12345, Scope::All), now()).await
            }));
        }
        let mut ok = 0;
        let mut limit = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(CatalogError::ManualLimit { .. }) => limit += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, limit), (10, 10));
        let s = cat
            .server(ServerId(12345), Scope::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.manual_backups_used, 10);
    }

    async fn scopes_hide_other_accounts(cat) {
        let a = server(&cat, 1, "a").await;
        let b = server(&cat, 2, "b").await;
        let ba = cat
            .create_backup(manual(1, Scope::Account(a.account_id)), now())
            .await
            .unwrap();
        assert!(matches!(
            cat.create_backup(manual(1, Scope::Account(b.account_id)), now())
                .await,
            Err(CatalogError::NotFound("Server"))
        ));
        assert!(cat
            .backup(ba.id, Scope::Account(b.account_id))
            .await
            .unwrap()
            .is_none());
        assert!(cat
            .server(ServerId(1), Scope::Account(b.account_id))
            .await
            .unwrap()
            .is_none());
        let page = PageRequest {
            number: 1,
            size: 50,
        };
        assert_eq!(
            cat.list_backups(
                BackupFilter {
                    scope: Some(b.account_id),
                    ..Default::default()
                },
                page
            )
            .await
            .unwrap()
            .count,
            0
        );
        assert_eq!(
            cat.list_backups(
                BackupFilter {
                    scope: Some(a.account_id),
                    ..Default::default()
                },
                page
            )
            .await
            .unwrap()
            .count,
            1
        );
        assert!(matches!(
            cat.delete_backup(ba.id, Scope::Account(b.account_id)).await,
            Err(CatalogError::NotFound(_))
        ));
    }

    async fn jobs_run_one_per_server_and_finish(cat) {
        server(&cat, 1, "a").await;
        server(&cat, 2, "a").await;
        let b1 = cat
            .create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        let _b2 = cat
            .create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        let b3 = cat
            .create_backup(manual(2, Scope::All), now())
            .await
            .unwrap();
        let j1 = cat.claim_job("w", now()).await.unwrap().unwrap();
        assert_eq!(j1.backup_id, b1.id);
        let j2 = cat.claim_job("w", now()).await.unwrap().unwrap();
        assert_eq!(
            j2.backup_id, b3.id,
            "server 1 is busy, so server 2's job is next"
        );
        assert!(cat.claim_job("w", now()).await.unwrap().is_none());
        assert_eq!(
            cat.server(ServerId(1), Scope::All)
                .await
                .unwrap()
                .unwrap()
                .status,
            ServerStatus::BackingUp
        );
        assert!(cat.job_progress(j1.id, "w", 40, now()).await.unwrap());
        assert!(!cat.job_progress(j1.id, "other", 40, now()).await.unwrap());
        assert_eq!(
            cat.backup(b1.id, Scope::All)
                .await
                .unwrap()
                .unwrap()
                .progress,
            40
        );
        assert!(cat
            .finish_job(
                j1.id,
                "w",
                JobOutcome::BackupCompleted {
                    size_mb: 3,
                    stored_bytes: 10
                },
                now()
            )
            .await
            .unwrap());
        let done = cat.backup(b1.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(
            (done.status, done.size_mb, done.progress),
            (WorkStatus::Completed, Some(3), 100)
        );
        // Restore: busy while server 1 still has a queued backup.
        let r = cat
            .create_restore(
                NewRestore {
                    server_id: ServerId(1),
                    backup_id: b1.id,
                    scope: Scope::All,
                },
                now(),
            )
            .await;
        assert!(matches!(r, Err(CatalogError::Busy(_))), "{r:?}");
        let r = cat
            .create_restore(
                NewRestore {
                    server_id: ServerId(2),
                    backup_id: b1.id,
                    scope: Scope::All,
                },
                now(),
            )
            .await;
        assert!(matches!(r, Err(CatalogError::Invalid(_))), "{r:?}");
    }

    async fn deleting_a_running_backup_cancels_its_job(cat) {
        server(&cat, 1, "a").await;
        let b = cat
            .create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        let j = cat.claim_job("w", now()).await.unwrap().unwrap();
        let del = cat.delete_backup(b.id, Scope::All).await.unwrap();
        assert_eq!(del.job, Some(j.id));
        assert!(!cat.job_progress(j.id, "w", 50, now()).await.unwrap());
        assert!(!cat
            .finish_job(
                j.id,
                "w",
                JobOutcome::BackupCompleted {
                    size_mb: 1,
                    stored_bytes: 1
                },
                now()
            )
            .await
            .unwrap());
        assert!(cat.backup(b.id, Scope::All).await.unwrap().is_none());
    }

    async fn stale_jobs_are_requeued_then_failed(cat) {
        server(&cat, 1, "a").await;
        let b = cat
            .create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        for attempt in 1..=3 {
            let t = now() + Duration::seconds(100 * attempt as i64);
            let j = cat.claim_job("dead", t).await.unwrap().unwrap();
            assert_eq!(j.attempts, attempt);
            assert!(
                cat.recover_stale_jobs(t, t).await.unwrap().is_empty(),
                "a fresh claim is not stale"
            );
            let rec = cat
                .recover_stale_jobs(t + Duration::seconds(30), t + Duration::seconds(31))
                .await
                .unwrap();
            assert_eq!(rec.len(), 1);
            assert_eq!(rec[0].requeued, attempt < 3);
        }
        let failed = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(failed.status, WorkStatus::Failed);
        assert!(failed.error.unwrap().contains("service stopped"));
    }

    async fn a_stale_restore_is_failed_at_once_never_rerun(cat) {
        server(&cat, 1, "a").await;
        let b = cat
            .create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        let j = cat.claim_job("w", now()).await.unwrap().unwrap();
        let outcome = JobOutcome::BackupCompleted {
            size_mb: 1,
            stored_bytes: 1,
        };
        assert!(cat.finish_job(j.id, "w", outcome, now()).await.unwrap());
        let r = cat
            .create_restore(
                NewRestore {
                    server_id: ServerId(1),
                    backup_id: b.id,
                    scope: Scope::All,
                },
                now(),
            )
            .await
            .unwrap();
        let t = now() + Duration::seconds(10);
        let j = cat.claim_job("dead", t).await.unwrap().unwrap();
        assert_eq!((j.kind, j.attempts), (JobKind::Restore, 1));
        let rec = cat
            .recover_stale_jobs(t + Duration::seconds(30), t + Duration::seconds(31))
            .await
            .unwrap();
        assert_eq!(rec.len(), 1);
        assert!(!rec[0].requeued, "a restore must not run again unasked");
        let failed = cat.restore(r.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(failed.status, WorkStatus::Failed);
        let reason = failed.error.unwrap();
        assert!(reason.contains("service stopped"), "{reason}");
        assert!(reason.contains("Start a new restore"), "{reason}");
        assert!(cat
            .claim_job("w", t + Duration::seconds(40))
            .await
            .unwrap()
            .is_none());
        let srv = cat.server(ServerId(1), Scope::All).await.unwrap().unwrap();
        assert_eq!(srv.status, ServerStatus::Active);
    }

    async fn retention_change_moves_expiry(cat) {
        server(&cat, 1, "a").await;
        let b = cat
            .create_backup(
                NewBackup {
                    backup_type: BackupType::Automatic,
                    expires_at: Some(now() + Duration::days(14)),
                    scheduled_for: Some(now()),
                    ..manual(1, Scope::All)
                },
                now(),
            )
            .await
            .unwrap();
        let dup = cat
            .create_backup(
                NewBackup {
                    backup_type: BackupType::Automatic,
                    scheduled_for: Some(now()),
                    ..manual(1, Scope::All)
                },
                now(),
            )
            .await;
        assert!(matches!(dup, Err(CatalogError::Conflict(_))));
        cat.update_plan(
            "standard",
            PlanUpdate {
                retention_days: Some(20),
                ..Default::default()
            },
            now(),
        )
        .await
        .unwrap();
        let b = cat.backup(b.id, Scope::All).await.unwrap().unwrap();
        assert_eq!(b.expires_at, Some(now() + Duration::days(20)));
    }

    async fn list_counts_stay_exact_through_inserts_deletes_and_server_reuse(cat) {
        let a = server(&cat, 1, "a").await.account_id;
        let b = server(&cat, 2, "b").await.account_id;
        let page = PageRequest { number: 1, size: 5 };
        let mut ids = Vec::new();
        for i in 0..6 {
            let sid = if i % 2 == 0 { 1 } else { 2 };
            ids.push(
                cat.create_backup(manual(sid, Scope::All), now())
                    .await
                    .unwrap()
                    .id,
            );
        }
        cat.create_backup(
            NewBackup {
                backup_type: BackupType::Automatic,
                scheduled_for: Some(now()),
                ..manual(1, Scope::All)
            },
            now(),
        )
        .await
        .unwrap();
        let count = |f: BackupFilter| {
            let cat = cat.clone();
            async move { cat.list_backups(f, page).await.unwrap() }
        };
        let all = count(BackupFilter::default()).await;
        assert_eq!((all.count, all.items.len()), (7, 5));
        assert!(all.items.windows(2).all(|w| w[0].id > w[1].id));
        // The last page, and one past the end: the count stays, items end.
        for (number, items) in [(2, 2), (3, 0)] {
            let p = cat
                .list_backups(BackupFilter::default(), PageRequest { number, size: 5 })
                .await
                .unwrap();
            assert_eq!((p.count, p.items.len()), (7, items), "page {number}");
        }
        let past = cat
            .list_backups(
                BackupFilter {
                    scope: Some(b),
                    ..Default::default()
                },
                PageRequest { number: 9, size: 5 },
            )
            .await
            .unwrap();
        assert_eq!((past.count, past.items.len()), (3, 0));
        assert_eq!(
            count(BackupFilter {
                scope: Some(a),
                ..Default::default()
            })
            .await
            .count,
            4
        );
        assert_eq!(
            count(BackupFilter {
                scope: Some(b),
                ..Default::default()
            })
            .await
            .count,
            3
        );
        assert_eq!(
            count(BackupFilter {
                server_id: Some(ServerId(1)),
                backup_type: Some(BackupType::Manual),
                ..Default::default()
            })
            .await
            .count,
            3
        );
        assert_eq!(
            count(BackupFilter {
                scope: Some(b),
                server_id: Some(ServerId(1)),
                ..Default::default()
            })
            .await
            .count,
            0
        );
        assert_eq!(
            count(BackupFilter {
                backup_type: Some(BackupType::Automatic),
                ..Default::default()
            })
            .await
            .count,
            1
        );

        cat.delete_backup(ids[0], Scope::All).await.unwrap();
        assert_eq!(
            count(BackupFilter {
                scope: Some(a),
                ..Default::default()
            })
            .await
            .count,
            3
        );
        // Remove server 1 with its backups and give the id to account b.
        cat.execute_raw("UPDATE jobs SET state = 'done'")
            .await
            .unwrap();
        assert_eq!(cat.remove_server(ServerId(1), true).await.unwrap().len(), 3);
        assert_eq!(
            count(BackupFilter {
                scope: Some(a),
                ..Default::default()
            })
            .await
            .count,
            0
        );
        server(&cat, 1, "b").await;
        cat.create_backup(manual(1, Scope::All), now())
            .await
            .unwrap();
        assert_eq!(
            count(BackupFilter {
                scope: Some(a),
                ..Default::default()
            })
            .await
            .count,
            0
        );
        assert_eq!(
            count(BackupFilter {
                scope: Some(b),
                ..Default::default()
            })
            .await
            .count,
            4
        );
        assert_eq!(count(BackupFilter::default()).await.count, 4);
    }

    async fn disk_formats_round_trip_and_a_missing_one_is_recorded_once(cat) {
        let acc = cat.create_account("acme", now()).await.unwrap();
        let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
        let disks = vec![
            ServerDisk::new("/srv/a.raw", ImageFormat::Raw),
            ServerDisk::new("/srv/b.qcow2", ImageFormat::Qcow2),
            ServerDisk::new("/dev/vg0/c", ImageFormat::Block),
        ];
        let s = cat
            .add_server(
                NewServer {
                    id: ServerId(9),
                    name: "multi".into(),
                    hostname: String::new(),
                    account_id: acc.id,
                    plan_id: plan.id,
                    disks: disks.clone(),
                    hooks: Hooks::default(),
                    runtime: Default::default(),
                    node: None,
                },
                now(),
            )
            .await
            .unwrap();
        assert_eq!(s.disks, disks);
        let listed = cat
            .list_servers(
                Scope::All,
                PageRequest {
                    number: 1,
                    size: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(listed.items[0].disks, disks);

        // Replacing the disks replaces their formats.
        let replaced = vec![ServerDisk::new("/srv/d.qcow2", ImageFormat::Qcow2)];
        let s = cat
            .update_server(
                ServerId(9),
                ServerUpdate {
                    disks: Some(replaced.clone()),
                    ..Default::default()
                },
                now(),
            )
            .await
            .unwrap();
        assert_eq!(s.disks, replaced);

        // A disk from before formats were recorded reads as None; recording
        // fills it once and never overwrites a recorded format.
        cat.execute_raw("UPDATE server_disks SET format = NULL WHERE server_id = 9")
            .await
            .unwrap();
        let s = cat.server(ServerId(9), Scope::All).await.unwrap().unwrap();
        assert_eq!(s.disks[0].format, None);
        cat.record_disk_format(ServerId(9), 0, ImageFormat::Raw)
            .await
            .unwrap();
        cat.record_disk_format(ServerId(9), 0, ImageFormat::Qcow2)
            .await
            .unwrap();
        let s = cat.server(ServerId(9), Scope::All).await.unwrap().unwrap();
        assert_eq!(s.disks[0].format, Some(ImageFormat::Raw));

        // The column admits only the three names.
        assert!(cat
            .execute_raw("UPDATE server_disks SET format = 'vmdk' WHERE server_id = 9")
            .await
            .is_err());
    }

    async fn a_servers_runtime_is_stored_changed_and_validated(cat) {
        let s = server(&cat, 1, "acme").await;
        assert_eq!(s.runtime, ServerRuntime::Offline);
        let acc = cat.account_by_name("acme").await.unwrap().unwrap();
        let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
        let qemu = ServerRuntime::Qemu {
            qmp_socket: "/run/vm2.qmp".into(),
            guest_agent: Some("/run/vm2.qga".into()),
        };
        let mut new = new_server(2, acc.id, plan.id);
        new.runtime = qemu.clone();
        assert_eq!(cat.add_server(new, now()).await.unwrap().runtime, qemu);

        // An empty socket or domain is refused and changes nothing.
        let mut bad = new_server(3, acc.id, plan.id);
        bad.runtime = ServerRuntime::Qemu {
            qmp_socket: " ".into(),
            guest_agent: None,
        };
        assert!(matches!(
            cat.add_server(bad, now()).await,
            Err(CatalogError::Invalid(_))
        ));
        assert!(cat.server(ServerId(3), Scope::All).await.unwrap().is_none());
        let empty_domain = ServerUpdate {
            runtime: Some(ServerRuntime::Libvirt { domain: "".into() }),
            ..Default::default()
        };
        assert!(matches!(
            cat.update_server(ServerId(2), empty_domain, now()).await,
            Err(CatalogError::Invalid(_))
        ));

        // An update without a runtime keeps it; a new one replaces socket and domain.
        let renamed = ServerUpdate {
            name: Some("vm2".into()),
            ..Default::default()
        };
        let s = cat
            .update_server(ServerId(2), renamed, now())
            .await
            .unwrap();
        assert_eq!(s.runtime, qemu);
        let libvirt = ServerRuntime::Libvirt {
            domain: "guest-2".into(),
        };
        let to_libvirt = ServerUpdate {
            runtime: Some(libvirt.clone()),
            ..Default::default()
        };
        let s = cat
            .update_server(ServerId(2), to_libvirt, now())
            .await
            .unwrap();
        assert_eq!(s.runtime, libvirt);
        assert_eq!(s.runtime.qmp_socket(), None);
    }
}
