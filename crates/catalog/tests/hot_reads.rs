//! The per-request hot reads (token lookup, a page of backups) run inline on
//! rusqlite; a read that stalls must not hold the async runtime's threads.
//! The stall is real: another process takes SQLite's WAL lock bytes in
//! `catalog.db-shm` and zeroes the WAL-index header, so every new read must
//! first rebuild the index and waits in SQLite's busy retry until the locks
//! are released (SQLite then rebuilds it from the WAL, losing nothing).

mod common;

use std::time::{Duration, Instant};

use common::{fresh, now};
use vpsbackup_catalog::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_token_lookups_leave_the_runtime_free() {
    let (dir, cat) = fresh().await;
    let acc = cat.create_account("acme", now()).await.unwrap();
    cat.create_token(
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
    assert!(cat.token_by_hash(&[7; 32]).await.unwrap().is_some());

    let shm = dir.path().join("catalog.db-shm");
    assert!(shm.exists(), "the catalog is not in WAL mode");
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl, sys, time\n\
             f = open(sys.argv[1], 'r+b')\n\
             fcntl.lockf(f, fcntl.LOCK_EX, 8, 120, 0)\n\
             f.seek(0); f.write(bytes(136)); f.flush()\n\
             print('held', flush=True)\n\
             time.sleep(3)\n",
        )
        .arg(&shm)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed by this test");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");

    // More stalled lookups than the runtime has threads...
    let started = Instant::now();
    let lookups: Vec<_> = (0..4)
        .map(|_| {
            let cat = cat.clone();
            tokio::spawn(async move { cat.token_by_hash(&[7; 32]).await })
        })
        .collect();
    // (A plain thread sleep: the runtime's timers need a free worker.)
    std::thread::sleep(Duration::from_millis(300));
    // ...and other work on the runtime still runs at once.
    let asked = Instant::now();
    let other = tokio::spawn(async { Instant::now() });
    let ran_at = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap()
        .unwrap();
    let waited = ran_at - asked;
    assert!(
        waited < Duration::from_millis(500),
        "other work waited {waited:?}"
    );
    for l in lookups {
        assert!(l.await.unwrap().unwrap().is_some());
    }
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "no stall happened"
    );
    holder.wait().unwrap();
}
