//! The scheduler (issue 4) on the real catalog, job runner and engine, with
//! real ext4 images made by `mke2fs -d`, under a manual clock so weeks of
//! schedule run in seconds.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::macros::datetime;
use time::OffsetDateTime;
use tokio::sync::watch;
use vpsbackup_catalog::{
    AccountId, Backup, BackupFilter, BackupId, BackupType, Catalog, Hooks, NewBackup, NewPlan,
    NewServer, NewToken, PageRequest, PlanId, PlanUpdate, ScheduleCatalog, Scope, ServerId,
    SqliteCatalog, TokenOwner, WorkStatus,
};
use vpsbackup_engine::Repository;
use vpsbackup_service::scheduler::{status, window, ScheduleSettings, Scheduler};
use vpsbackup_service::{Clock, JobRunner, ManualClock, Settings};

const MIB: u64 = 1024 * 1024;

/// Deterministic bytes: xorshift64*.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text, like the files of a real system.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "backup ", "server ", "window ", "daily ", "the ", "disk ", "chunk ", "store\n",
    ];
    noise(seed, len / 4)
        .iter()
        .flat_map(|b| WORDS[(*b % 8) as usize].bytes())
        .take(len)
        .collect()
}

/// A real ext4 image of `size_mib` holding `files`.
fn make_image(path: &Path, size_mib: u64, files: &[(&str, Vec<u8>)]) {
    let root = path.with_extension("root");
    std::fs::create_dir_all(&root).unwrap();
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mke2fs runs");
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Overwrites `len` bytes at `offset` of a disk image (the VM writing).
fn scribble(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn day(n: i64) -> OffsetDateTime {
    datetime!(2025-01-01 00:00 UTC) + time::Duration::days(n)
}

/// Catalog, job runner, engine and scheduler on a fresh data dir, driven by a manual clock.
struct Sim {
    dir: tempfile::TempDir,
    sqlite: Arc<SqliteCatalog>,
    catalog: Arc<dyn Catalog>,
    schedule: Arc<dyn ScheduleCatalog>,
    clock: Arc<ManualClock>,
    repo: Repository,
    jobs: Arc<JobRunner>,
    scheduler: Arc<Scheduler>,
    stop: watch::Sender<bool>,
    account: AccountId,
}

impl Sim {
    async fn new(start: OffsetDateTime, tweak: impl FnOnce(&mut Settings)) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            data_dir: dir.path().join("data"),
            workers: 2,
            ..Settings::default()
        };
        settings.schedule = ScheduleSettings {
            gc_grace_secs: 0,
            verify_interval_days: 0,
            ..ScheduleSettings::default()
        };
        tweak(&mut settings);
        let sqlite = Arc::new(
            vpsbackup_service::open_catalog(&settings.data_dir, 2)
                .await
                .unwrap(),
        );
        let catalog: Arc<dyn Catalog> = sqlite.clone();
        let schedule: Arc<dyn ScheduleCatalog> = sqlite.clone();
        let clock = Arc::new(ManualClock::new(start));
        let repo = Repository::open_local(&settings.store_path()).unwrap();
        let settings = Arc::new(settings);
        let jobs = Arc::new(JobRunner::new(
            catalog.clone(),
            clock.clone(),
            repo.clone(),
            settings.clone(),
        ));
        let (stop, rx) = watch::channel(false);
        jobs.start(rx);
        let scheduler = Arc::new(Scheduler::new(
            catalog.clone(),
            schedule.clone(),
            clock.clone(),
            repo.clone(),
            settings.schedule.clone(),
            Some(jobs.clone()),
        ));
        let account = catalog.create_account("acme", start).await.unwrap().id;
        Sim {
            dir,
            sqlite,
            catalog,
            schedule,
            clock,
            repo,
            jobs,
            scheduler,
            stop,
            account,
        }
    }

    async fn plan(&self, name: &str, retention_days: u32) -> PlanId {
        self.catalog
            .create_plan(
                NewPlan {
                    name: name.into(),
                    retention_days,
                    window_start_minute: 180,
                    window_minutes: 120,
                },
                self.clock.now(),
            )
            .await
            .unwrap()
            .id
    }

    async fn server(&self, id: i64, plan: PlanId, disk: &Path, hooks: Hooks) {
        self.catalog
            .add_server(
                NewServer {
                    id: ServerId(id),
                    name: format!("vps-{id}"),
                    hostname: String::new(),
                    account_id: self.account,
                    plan_id: plan,
                    disks: vec![vpsbackup_catalog::ServerDisk::new(
                        disk.to_string_lossy(),
                        vpsbackup_catalog::ImageFormat::Raw,
                    )],
                    hooks,
                    runtime: Default::default(),
                    node: None,
                },
                self.clock.now(),
            )
            .await
            .unwrap();
    }

    /// Sets the clock, runs one scheduler tick, and waits for the jobs it queued.
    async fn tick_at(&self, t: OffsetDateTime) -> vpsbackup_service::scheduler::TickReport {
        self.clock.set(t);
        let r = self.scheduler.tick(t).await.unwrap();
        self.settle().await;
        r
    }

    /// Waits until no job is due or running.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let c = self.schedule.job_counts(self.clock.now()).await.unwrap();
            if c.queued_due == 0 && c.running == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "jobs did not finish: {c:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn backups(&self, server: i64, kind: Option<BackupType>) -> Vec<Backup> {
        self.catalog
            .list_backups(
                BackupFilter {
                    scope: None,
                    server_id: Some(ServerId(server)),
                    backup_type: kind,
                },
                PageRequest {
                    number: 1,
                    size: 500,
                },
            )
            .await
            .unwrap()
            .items
    }

    async fn manual_backup(&self, server: i64) -> BackupId {
        let b = self
            .catalog
            .create_backup(
                NewBackup {
                    server_id: ServerId(server),
                    scope: Scope::All,
                    backup_type: BackupType::Manual,
                    description: "before upgrade".into(),
                    expires_at: None,
                    scheduled_for: None,
                    run_after: None,
                },
                self.clock.now(),
            )
            .await
            .unwrap();
        self.jobs.wake();
        self.settle().await;
        b.id
    }

    fn stored_bytes(&self) -> u64 {
        self.repo.stats().unwrap().stored_bytes
    }

    async fn shutdown(self) {
        self.jobs.stop();
        let _ = self.stop.send(true);
        self.sqlite.close().await;
    }
}

/// 40 simulated days with retention 30: exactly 30 automatic backups per
/// server, manual backups untouched, expired data really reclaimed so the
/// store stops growing; then a shorter retention moves expiry at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_days_keep_thirty_automatic_backups_and_reclaim_expired_data() {
    let sim = Sim::new(day(0), |_| {}).await;
    let plan = sim.plan("monthly", 30).await;
    let disks: Vec<PathBuf> = (1..=2)
        .map(|i| sim.dir.path().join(format!("vps{i}.img")))
        .collect();
    for (i, disk) in disks.iter().enumerate() {
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("etc.txt", text(i as u64, 3 * MIB as usize)),
            ("lib.bin", noise(100 + i as u64, 2 * MIB as usize)),
        ];
        make_image(disk, 32, &files);
        sim.server(101 + i as i64, plan, disk, Hooks::default())
            .await;
    }
    // The VM rewrites the same 1 MiB every day (a log, a database page
    // cache): each day's data lives in that day's backup only.
    const DAILY: u64 = MIB;
    let mut manual = Vec::new();
    let mut stored_by_day = Vec::new();
    let mut freed = 0u64;
    for d in 0..40i64 {
        for (i, disk) in disks.iter().enumerate() {
            scribble(
                disk,
                24 * MIB,
                &noise(1000 * d as u64 + i as u64, DAILY as usize),
            );
        }
        // Tick every 15 minutes through the window, as the loop would.
        for q in 0..=8 {
            sim.tick_at(day(d) + time::Duration::minutes(180 + 15 * q))
                .await;
        }
        sim.tick_at(day(d) + time::Duration::hours(12)).await;
        if d == 2 || d == 20 {
            manual.push(sim.manual_backup(101).await);
        }
        let before = sim.stored_bytes();
        sim.scheduler.maintain(sim.clock.now()).await.unwrap();
        freed += before.saturating_sub(sim.stored_bytes());
        stored_by_day.push(sim.stored_bytes());
    }

    for server in [101, 102] {
        let auto = sim.backups(server, Some(BackupType::Automatic)).await;
        assert_eq!(
            auto.len(),
            30,
            "server {server} keeps exactly 30 automatic backups"
        );
        for b in &auto {
            assert_eq!(b.status, WorkStatus::Completed, "{b:?}");
            assert_eq!(b.description, "Automatic daily backup");
            assert_eq!(b.expires_at, Some(b.created_at + time::Duration::days(30)));
            // Started inside the window, at the server's own minute.
            let minute = (b.created_at - window::day_of(b.created_at)).whole_minutes();
            assert!((180..300).contains(&minute), "started at minute {minute}");
            assert!(
                sim.repo.backup_info(&b.engine_backup_id).is_ok(),
                "data of {b:?} kept"
            );
        }
        // The kept ones are the 30 newest days, one per day.
        let days: std::collections::BTreeSet<_> =
            auto.iter().map(|b| b.scheduled_for.unwrap()).collect();
        assert_eq!(days.len(), 30);
        assert_eq!(*days.iter().next().unwrap(), day(10));
        assert_eq!(*days.iter().last().unwrap(), day(39));
    }
    // The two servers do not start at the same minute.
    let first = |s: Vec<Backup>| s[0].created_at;
    assert_ne!(
        first(sim.backups(101, Some(BackupType::Automatic)).await),
        first(sim.backups(102, Some(BackupType::Automatic)).await)
    );
    // Manual backups never expire.
    let kept_manual = sim.backups(101, Some(BackupType::Manual)).await;
    assert_eq!(kept_manual.len(), 2);
    for b in &kept_manual {
        assert!(manual.contains(&b.id));
        assert_eq!(b.status, WorkStatus::Completed);
        assert_eq!(b.expires_at, None);
        assert!(sim.repo.backup_info(&b.engine_backup_id).is_ok());
    }
    assert_eq!(
        sim.repo.list_backups().unwrap().len(),
        62,
        "the store holds exactly the kept backups"
    );

    // Bounded: from day 30 on, each day's new data is matched by an expired
    // day's, so the store stays where it was (a day or two of condemned
    // packs await the next GC) though 10 more days of data were written.
    let (day29, day39) = (stored_by_day[29], *stored_by_day.last().unwrap());
    eprintln!(
        "store: day 1 {} B, day 30 {day29} B, day 40 {day39} B, GC freed {freed} B",
        stored_by_day[0]
    );
    assert!(
        day39 <= day29 + 2 * 2 * DAILY + DAILY / 2,
        "store grew from {day29} to {day39}"
    );
    assert!(freed >= 2 * 8 * DAILY, "GC freed only {freed} bytes");

    // `vpsbackup status` sees the same.
    let report = status::status_report(
        &*sim.catalog,
        &*sim.schedule,
        &sim.repo,
        sim.scheduler.settings(),
        sim.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(report.servers.len(), 2);
    for line in &report.servers {
        assert_eq!(line.automatic_kept, 30);
        let next = line.next_backup.unwrap();
        assert!(
            next > day(40) + time::Duration::hours(3) && next < day(40) + time::Duration::hours(4),
            "{next}"
        );
    }
    assert_eq!(report.servers[0].manual_kept, 2);
    assert_eq!(report.stored_bytes, day39);
    assert!(
        report.dedup_ratio() > 5.0,
        "62 backups of mostly the same data: {}",
        report.dedup_ratio()
    );
    let table = report.to_string();
    eprintln!("{table}");
    assert!(
        table.contains("vps-101") && table.contains("dedup"),
        "{table}"
    );

    // A shorter retention applies to existing automatic backups at once.
    let now = sim.clock.now();
    sim.catalog
        .update_plan(
            "monthly",
            PlanUpdate {
                retention_days: Some(7),
                ..PlanUpdate::default()
            },
            now,
        )
        .await
        .unwrap();
    let report = sim.tick_at(now).await;
    assert_eq!(report.expired.len(), 2 * 23);
    for server in [101, 102] {
        let auto = sim.backups(server, Some(BackupType::Automatic)).await;
        assert_eq!(auto.len(), 7);
        assert!(auto
            .iter()
            .all(|b| b.expires_at == Some(b.created_at + time::Duration::days(7))));
    }
    assert_eq!(sim.backups(101, Some(BackupType::Manual)).await.len(), 2);
    sim.shutdown().await;
}

/// After days of downtime the scheduler makes one catch-up backup, not one
/// per missed day, then goes back to one a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_after_downtime_makes_one_backup() {
    let sim = Sim::new(day(0), |_| {}).await;
    let plan = sim.plan("monthly", 30).await;
    let disk = sim.dir.path().join("vps.img");
    make_image(&disk, 16, &[("a.txt", text(1, MIB as usize))]);
    sim.server(7, plan, &disk, Hooks::default()).await;

    let r = sim.tick_at(day(0) + time::Duration::hours(5)).await;
    assert_eq!(r.created.len(), 1);
    // Down for five days; back at noon.
    let r = sim.tick_at(day(6) + time::Duration::hours(12)).await;
    assert_eq!(r.created.len(), 1, "one catch-up, not five");
    for h in [13, 18, 23] {
        let r = sim.tick_at(day(6) + time::Duration::hours(h)).await;
        assert!(r.created.is_empty());
    }
    let r = sim.tick_at(day(7) + time::Duration::hours(5)).await;
    assert_eq!(r.created.len(), 1);
    let auto = sim.backups(7, Some(BackupType::Automatic)).await;
    assert_eq!(auto.len(), 3);
    let slots: Vec<_> = auto.iter().map(|b| b.scheduled_for.unwrap()).collect();
    assert_eq!(slots, vec![day(7), day(6), day(0)]);
    assert!(auto.iter().all(|b| b.status == WorkStatus::Completed));

    // Disabled: nothing; enabled again: one catch-up.
    let upd = |on| vpsbackup_catalog::ServerUpdate {
        auto_backup_enabled: Some(on),
        ..Default::default()
    };
    sim.catalog
        .update_server(ServerId(7), upd(false), sim.clock.now())
        .await
        .unwrap();
    for d in 8..11 {
        assert!(sim
            .tick_at(day(d) + time::Duration::hours(5))
            .await
            .created
            .is_empty());
    }
    sim.catalog
        .update_server(ServerId(7), upd(true), sim.clock.now())
        .await
        .unwrap();
    assert_eq!(
        sim.tick_at(day(10) + time::Duration::hours(6))
            .await
            .created
            .len(),
        1
    );
    // A customer deleting today's automatic backup does not get another
    // one today; tomorrow's comes as planned.
    let today = sim.backups(7, Some(BackupType::Automatic)).await.remove(0);
    assert_eq!(today.scheduled_for, Some(day(10)));
    sim.catalog
        .delete_backup(today.id, Scope::All)
        .await
        .unwrap();
    assert!(sim
        .tick_at(day(10) + time::Duration::hours(7))
        .await
        .created
        .is_empty());
    assert_eq!(
        sim.tick_at(day(11) + time::Duration::hours(5))
            .await
            .created
            .len(),
        1
    );
    sim.shutdown().await;
}

/// A failing automatic backup is retried with growing waits inside its
/// window, stops at the bound, and stays failed with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_automatic_backup_is_retried_up_to_the_bound() {
    let sim = Sim::new(day(0), |s| {
        s.schedule.retry_limit = 3;
        s.schedule.retry_backoff_secs = 300;
    })
    .await;
    let plan = sim.plan("weekly", 7).await;
    let missing = sim.dir.path().join("gone.img");
    sim.server(9, plan, &missing, Hooks::default()).await;
    let server = sim.schedule.auto_backup_servers().await.unwrap().remove(0);
    let start = window::planned_start(&server, day(0));
    let end = window::window_end(&server, day(0));

    let mut retried_at = Vec::new();
    let mut t = start;
    while t <= end + time::Duration::hours(2) {
        let r = sim.tick_at(t).await;
        if !r.retried.is_empty() {
            retried_at.push(t);
        }
        t += time::Duration::minutes(1);
    }
    assert_eq!(
        retried_at.len(),
        3,
        "retries stop at the bound: {retried_at:?}"
    );
    // The waits double: 5, 10, 20 minutes after each failure (failures are
    // immediate here, at the tick that started the attempt).
    let gaps: Vec<i64> = std::iter::once(start)
        .chain(retried_at.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[1] - w[0]).whole_minutes())
        .collect();
    assert_eq!(gaps, vec![5, 10, 20]);
    assert!(retried_at.iter().all(|t| *t <= end));

    let auto = sim.backups(9, Some(BackupType::Automatic)).await;
    assert_eq!(auto.len(), 1, "retries reuse the day's backup");
    let b = &auto[0];
    assert_eq!(b.status, WorkStatus::Failed);
    let err = b.error.as_deref().unwrap_or_default();
    // The customer reads why in plain words; the path is the operator's.
    assert_eq!(err, "The server's disk could not be read.");
    let failed = sim.catalog.failed_jobs(1).await.unwrap();
    let detail = failed[0].error_detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("gone.img"),
        "the detail says why: {detail:?}"
    );
    let slot = sim
        .schedule
        .auto_backup_servers()
        .await
        .unwrap()
        .remove(0)
        .latest
        .unwrap();
    assert_eq!(slot.attempts, 4, "one run and three retries");

    // The next day gets its own backup and its own retries.
    let next = window::planned_start(&server, day(1));
    assert_eq!(sim.tick_at(next).await.created.len(), 1);
    sim.shutdown().await;
}

/// Corrupt a pack file: verify reports the backup damaged, the API shows it
/// (`damaged`, `verified_at`) and refuses to restore it; an intact backup
/// stays good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_backup_is_reported_by_verify_and_marked_in_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        ..Settings::default()
    };
    settings.schedule.enabled = false;
    let sqlite = Arc::new(
        vpsbackup_service::open_catalog(&settings.data_dir, 2)
            .await
            .unwrap(),
    );
    let now = OffsetDateTime::now_utc();
    let account = sqlite.create_account("acme", now).await.unwrap().id;
    let t = vpsbackup_service::auth::generate_token().unwrap();
    sqlite
        .create_token(
            NewToken {
                hash: t.hash,
                prefix: t.prefix.clone(),
                name: "t".into(),
                owner: TokenOwner::Account(account),
            },
            now,
        )
        .await
        .unwrap();
    let plan = sqlite.plan_by_name("standard").await.unwrap().unwrap().id;
    for id in [1, 2] {
        let disk = dir.path().join(format!("vps{id}.img"));
        make_image(
            &disk,
            16,
            &[(
                "data.bin",
                noise(id as u64, if id == 1 { 6 } else { 1 } * MIB as usize),
            )],
        );
        sqlite
            .add_server(
                NewServer {
                    id: ServerId(id),
                    name: format!("vps-{id}"),
                    hostname: String::new(),
                    account_id: account,
                    plan_id: plan,
                    disks: vec![vpsbackup_catalog::ServerDisk::new(
                        disk.to_string_lossy(),
                        vpsbackup_catalog::ImageFormat::Raw,
                    )],
                    hooks: Hooks::default(),
                    runtime: Default::default(),
                    node: None,
                },
                now,
            )
            .await
            .unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = settings.clone();
    let server = tokio::spawn(async move {
        vpsbackup_service::run(s, listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let http = reqwest::Client::new();
    let call = |m: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut r = http
            .request(m, format!("{base}{path}"))
            .bearer_auth(&t.secret)
            .header("Content-Type", "application/json");
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    // Wait for the service, then one backup per server.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ids = Vec::new();
    for server_id in [1, 2] {
        let (st, body) = call(
            reqwest::Method::POST,
            "/backups/".into(),
            Some(serde_json::json!({ "server_id": server_id })),
        )
        .await;
        assert_eq!(st, 201, "{body}");
        ids.push(body["id"].as_i64().unwrap());
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, b) = call(reqwest::Method::GET, format!("/backups/{id}/"), None).await;
            if b["status"] == "completed" {
                assert_eq!(b["damaged"], false);
                assert!(b["verified_at"].is_null());
                break;
            }
            assert!(
                b["status"] == "in_progress" && Instant::now() < deadline,
                "{b}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The verify command's path (its own catalog connection and scheduler,
    // beside the running service): both intact first.
    let repo = Repository::open_local(&settings.store_path()).unwrap();
    let verifier = Scheduler::new(
        sqlite.clone(),
        sqlite.clone(),
        Arc::new(vpsbackup_service::SystemClock),
        repo.clone(),
        settings.schedule.clone(),
        None,
    );
    let verdicts = verifier.verify_now(None).await.unwrap();
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts.iter().all(|v| v.damage.is_none()), "{verdicts:?}");

    // Server 1's data is incompressible, unique to it and six times server
    // 2's: the largest pack belongs to backup 1 only. Flip bytes in its middle.
    let packs_dir = settings.store_path().join("packs");
    let mut packs: Vec<(u64, PathBuf)> = walk(&packs_dir)
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    packs.sort();
    let (len, victim) = packs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    for b in &mut bytes[(len / 2) as usize..(len / 2) as usize + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bytes).unwrap();

    let verdicts = verifier.verify_now(Some(BackupId(ids[0]))).await.unwrap();
    let damage = verdicts[0]
        .damage
        .clone()
        .expect("verify reports the damage");
    assert!(damage.contains("corrupt"), "{damage}");
    let verdicts = verifier.verify_now(Some(BackupId(ids[1]))).await.unwrap();
    assert!(verdicts[0].damage.is_none(), "the other backup is intact");

    let (_, b) = call(reqwest::Method::GET, format!("/backups/{}/", ids[0]), None).await;
    assert_eq!(b["damaged"], true, "{b}");
    assert!(
        b["verify_error"].as_str().unwrap().contains("corrupt"),
        "{b}"
    );
    assert!(b["verified_at"].is_string(), "{b}");
    let (_, good) = call(reqwest::Method::GET, format!("/backups/{}/", ids[1]), None).await;
    assert_eq!(good["damaged"], false);
    assert!(good["verify_error"].is_null());
    assert!(good["verified_at"].is_string());
    // Never offered as good: a restore from it is refused.
    let (st, body) = call(
        reqwest::Method::POST,
        "/servers/1/restore/".into(),
        Some(serde_json::json!({ "backup_id": ids[0] })),
    )
    .await;
    assert_eq!(st, 400, "{body}");

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The per-job read limit holds within 20%, and the host-wide job limit
/// (one worker here) runs two servers' backups one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_bandwidth_limit_and_job_limit_hold() {
    const LIMIT_MB: u64 = 2;
    let sim = Sim::new(day(0), |s| {
        s.workers = 1;
        s.read_limit_mb_per_s = Some(LIMIT_MB);
    })
    .await;
    let plan = sim.plan("weekly", 7).await;
    // Fully allocated images (zeros written out, no holes): the engine
    // reads every byte, so bytes read = image size exactly.
    let mut sizes = Vec::new();
    for (id, mib) in [(1u64, 20u64), (2, 4)] {
        let disk = sim.dir.path().join(format!("vps{id}.img"));
        make_image(
            &disk,
            mib,
            &[("data.bin", noise(id, (mib as usize - 2) * MIB as usize / 2))],
        );
        let bytes = std::fs::read(&disk).unwrap();
        std::fs::write(&disk, &bytes).unwrap();
        assert_eq!(
            std::fs::metadata(&disk).unwrap().blocks() * 512,
            mib * MIB,
            "not sparse"
        );
        sizes.push(mib * MIB);
        sim.server(id as i64, plan, &disk, Hooks::default()).await;
    }
    sim.clock.set(day(0) + time::Duration::hours(5));
    let r = sim.scheduler.tick(sim.clock.now()).await.unwrap();
    assert_eq!(r.created.len(), 2);
    // When each server was seen backing up, first and last.
    let t0 = Instant::now();
    let mut seen: [Option<(f64, f64)>; 2] = [None, None];
    let mut max_running = 0;
    let mut gc_beside = None;
    loop {
        let c = sim.schedule.job_counts(sim.clock.now()).await.unwrap();
        max_running = max_running.max(c.running);
        // GC runs beside a running backup (`vpsbackup gc` while serve works).
        if c.running == 1 && gc_beside.is_none() && t0.elapsed() > Duration::from_secs(2) {
            let s = sim.scheduler.clone();
            gc_beside = Some(tokio::spawn(async move { s.gc_now().await }));
        }
        for (i, id) in [1i64, 2].iter().enumerate() {
            let s = sim
                .catalog
                .server(ServerId(*id), Scope::All)
                .await
                .unwrap()
                .unwrap();
            if s.status == vpsbackup_catalog::ServerStatus::BackingUp {
                let now = t0.elapsed().as_secs_f64();
                seen[i] = Some((seen[i].map_or(now, |s| s.0), now));
            }
        }
        if c.queued_due == 0 && c.running == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(max_running, 1, "one job at a time with one worker");
    let (a, b) = (seen[0].unwrap(), seen[1].unwrap());
    assert!(
        a.1 < b.0 || b.1 < a.0,
        "the two backups overlapped: {a:?} {b:?}"
    );
    for id in [1, 2] {
        let b = sim.backups(id, None).await.remove(0);
        assert_eq!(b.status, WorkStatus::Completed, "{b:?}");
    }
    gc_beside
        .expect("GC ran during a backup")
        .await
        .unwrap()
        .unwrap();
    let verdicts = sim.scheduler.verify_now(None).await.unwrap();
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts.iter().all(|v| v.damage.is_none()), "{verdicts:?}");
    // The big disk's job: between its first and last sighting (poll granularity 20 ms).
    let elapsed = a.1 - a.0 + 0.02;
    let limit = (LIMIT_MB * 1_000_000) as f64;
    let rate = sizes[0] as f64 / elapsed;
    let expected = sizes[0] as f64 / limit;
    eprintln!(
        "read {} B in {elapsed:.2} s: {:.2} MB/s for a limit of {LIMIT_MB} MB/s (expected {expected:.2} s)",
        sizes[0],
        rate / 1e6
    );
    assert!(rate <= 1.2 * limit, "rate {rate} over the limit {limit}");
    assert!(
        elapsed >= 0.8 * expected,
        "took {elapsed} s, expected about {expected} s"
    );
    sim.shutdown().await;
}

/// The real service runs the scheduler: a first start backs the server up,
/// and a restart after five days down catches up once, not five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_schedules_and_catches_up_once_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        ..Settings::default()
    };
    settings.schedule.tick_secs = 1;
    settings.schedule.verify_interval_days = 0;
    let clock = Arc::new(ManualClock::new(day(0) + time::Duration::hours(5)));
    let sqlite = Arc::new(
        vpsbackup_service::open_catalog(&settings.data_dir, 2)
            .await
            .unwrap(),
    );
    let account = sqlite.create_account("acme", clock.now()).await.unwrap().id;
    let plan = sqlite.plan_by_name("premium").await.unwrap().unwrap().id;
    let disk = dir.path().join("vps.img");
    make_image(&disk, 16, &[("a.txt", text(5, MIB as usize))]);
    sqlite
        .add_server(
            NewServer {
                id: ServerId(12345),
                name: "web-server-01".into(),
                hostname: String::new(),
                account_id: account,
                plan_id: plan,
                disks: vec![vpsbackup_catalog::ServerDisk::new(
                    disk.to_string_lossy(),
                    vpsbackup_catalog::ImageFormat::Raw,
                )],
                hooks: Hooks::default(),
                runtime: Default::default(),
                node: None,
            },
            clock.now(),
        )
        .await
        .unwrap();
    let automatic = || async {
        sqlite
            .list_backups(
                BackupFilter {
                    scope: None,
                    server_id: Some(ServerId(12345)),
                    backup_type: Some(BackupType::Automatic),
                },
                PageRequest {
                    number: 1,
                    size: 100,
                },
            )
            .await
            .unwrap()
            .items
    };
    for (restart_at, expect) in [(None, 1), (Some(day(6) + time::Duration::hours(12)), 2)] {
        if let Some(t) = restart_at {
            clock.set(t);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (s, c) = (settings.clone(), clock.clone());
        let task = tokio::spawn(async move {
            vpsbackup_service::run_with_clock(s, c, listener, async {
                let _ = stop_rx.await;
            })
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = automatic()
                .await
                .iter()
                .filter(|b| b.status == WorkStatus::Completed)
                .count();
            if done >= expect {
                break;
            }
            assert!(Instant::now() < deadline, "no automatic backup after start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A few more ticks must not add any.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let _ = stop_tx.send(());
        task.await.unwrap().unwrap();
        let auto = automatic().await;
        assert_eq!(auto.len(), expect, "{auto:?}");
    }
    let slots: Vec<_> = automatic()
        .await
        .iter()
        .map(|b| b.scheduled_for.unwrap())
        .collect();
    assert_eq!(slots, vec![day(6), day(0)]);
    sqlite.close().await;
}

/// The scheduled pass verifies each completed backup once per interval:
/// new backups at the next pass, old ones again when their check is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_verification_rechecks_each_backup_once_per_interval() {
    let sim = Sim::new(day(0), |s| {
        s.schedule.verify_interval_days = 7;
        s.schedule.verify_duty_percent = 100;
        s.schedule.gc_interval_hours = 0;
    })
    .await;
    let plan = sim.plan("monthly", 30).await;
    let disk = sim.dir.path().join("vps.img");
    make_image(&disk, 16, &[("a.txt", text(9, MIB as usize))]);
    sim.server(3, plan, &disk, Hooks::default()).await;
    let verified = |bs: Vec<Backup>| -> Vec<Option<OffsetDateTime>> {
        bs.iter().rev().map(|b| b.verified_at).collect()
    };

    sim.tick_at(day(0) + time::Duration::hours(5)).await;
    let t1 = day(0) + time::Duration::hours(6);
    sim.clock.set(t1);
    sim.scheduler.maintain(t1).await.unwrap();
    assert_eq!(verified(sim.backups(3, None).await), vec![Some(t1)]);

    sim.tick_at(day(3) + time::Duration::hours(5)).await;
    let t2 = day(3) + time::Duration::hours(6);
    sim.clock.set(t2);
    sim.scheduler.maintain(t2).await.unwrap();
    assert_eq!(
        verified(sim.backups(3, None).await),
        vec![Some(t1), Some(t2)]
    );

    let t3 = day(7) + time::Duration::hours(7);
    sim.clock.set(t3);
    sim.scheduler.maintain(t3).await.unwrap();
    assert_eq!(
        verified(sim.backups(3, None).await),
        vec![Some(t3), Some(t2)]
    );
    assert!(sim.backups(3, None).await.iter().all(|b| !b.damaged));
    sim.shutdown().await;
}

/// One pass verifies a server's backups in one engine session: a backup
/// sharing all its data with one verified before it reads nothing, both
/// are marked verified, and the pass records what it read. A corrupt chunk
/// they share marks both damaged (each confirmed by a second read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_reads_data_shared_by_backups_once_and_marks_each() {
    let sim = Sim::new(day(0), |s| {
        s.schedule.verify_interval_days = 7;
        s.schedule.verify_duty_percent = 100;
        s.schedule.gc_interval_hours = 0;
    })
    .await;
    let plan = sim.plan("monthly", 30).await;
    let disk = sim.dir.path().join("vps.img");
    // Incompressible, so the store's one pack is almost all data chunks.
    make_image(&disk, 16, &[("data.bin", noise(5, 4 * MIB as usize))]);
    sim.server(4, plan, &disk, Hooks::default()).await;
    sim.tick_at(day(0) + time::Duration::hours(5)).await;
    sim.manual_backup(4).await;
    let backups = sim.backups(4, None).await;
    assert_eq!(backups.len(), 2);
    assert!(backups.iter().all(|b| b.status == WorkStatus::Completed));

    let t1 = day(0) + time::Duration::hours(6);
    sim.clock.set(t1);
    let verdicts = sim.scheduler.verify_pass(t1).await.unwrap();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert!(verdicts.iter().all(|v| v.damage.is_none()), "{verdicts:?}");
    let (first, second) = (&verdicts[0], &verdicts[1]);
    assert!(first.chunks_read > 60, "4 MiB of 64 KiB chunks: {first:?}");
    assert!(first.bytes_read >= 4 * MIB, "{first:?}");
    assert_eq!(
        (second.chunks_read, second.bytes_read),
        (0, 0),
        "the same disk again is known from the first: {second:?}"
    );
    assert!(second.chunks_remembered > 0, "{second:?}");
    for b in sim.backups(4, None).await {
        assert_eq!(b.verified_at, Some(t1), "{b:?}");
        assert!(!b.damaged);
    }
    let run = sim.schedule.task_run("verify").await.unwrap().unwrap();
    assert!(
        run.summary
            .starts_with("2 backups verified, 0 damaged; read 4."),
        "{}",
        run.summary
    );

    // Flip one byte in the middle of the pack: a chunk both backups hold.
    let packs: Vec<PathBuf> = walk(&sim.dir.path().join("data/store/packs"));
    assert_eq!(packs.len(), 1, "{packs:?}");
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&packs[0], &bytes).unwrap();

    let t2 = day(7) + time::Duration::hours(7);
    sim.clock.set(t2);
    let verdicts = sim.scheduler.verify_pass(t2).await.unwrap();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    for v in &verdicts {
        let damage = v.damage.as_deref().expect("both are damaged");
        assert!(damage.contains("1 corrupt"), "{damage}");
    }
    // The second backup's confirmation read only the list and the bad chunk.
    assert!(verdicts[1].chunks_read <= 3, "{:?}", verdicts[1]);
    for b in sim.backups(4, None).await {
        assert!(b.damaged, "{b:?}");
        assert_eq!(b.verified_at, Some(t2));
        assert!(b.verify_error.unwrap().contains("corrupt"));
    }
    sim.shutdown().await;
}
