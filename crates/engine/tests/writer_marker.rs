//! A backup whose writer marker cannot be kept fresh must fail: GC treats a
//! marker not refreshed within `writer_stale_after` as a dead writer and may
//! delete packs the backup deduplicates against, so a manifest written
//! afterwards could reference chunks that no longer exist.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vpsbackup_engine::{
    BackupRequest, DiskImage, EngineError, EngineOptions, JobControl, LocalStorage, Repository,
};

fn repo(store: &Path) -> Repository {
    Repository::open_with(
        Arc::new(LocalStorage::new(store).unwrap()),
        EngineOptions {
            writer_stale_after: Duration::from_millis(400),
            ..common::test_options()
        },
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
    )
    .unwrap()
}

/// Backs up `img` slowly (about 3 s) while `meddle` runs 300 ms in.
fn slow_backup(
    repo: &Repository,
    id: &str,
    img: &Path,
    meddle: impl FnOnce() + Send,
) -> Result<(), EngineError> {
    let req = BackupRequest {
        backup_id: id.into(),
        server_id: "1".into(),
        server_name: "one".into(),
        disks: vec![DiskImage::detect(img)],
        read_limit: Some(8_000_000),
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            meddle();
        });
        repo.backup(&req, &JobControl::new()).map(|_| ())
    })
}

#[test]
fn a_backup_whose_marker_cannot_be_refreshed_fails_and_records_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::base_image(tmp.path());
    let store = tmp.path().join("store");
    let repo = repo(&store);
    let writers = store.join("writers");

    // The markers' directory becomes a file: every refresh fails.
    let res = slow_backup(&repo, "b1", &img, || {
        std::fs::rename(&writers, store.join("writers.away")).unwrap();
        std::fs::write(&writers, b"not a directory").unwrap();
    });
    match res {
        Err(e @ EngineError::WriterLost(_)) => {
            assert!(e.to_string().contains("run the backup again"), "{e}")
        }
        other => panic!("the backup went on without a fresh marker: {other:?}"),
    }
    std::fs::remove_file(&writers).unwrap();
    std::fs::rename(store.join("writers.away"), &writers).unwrap();
    assert!(
        repo.backup_ids().unwrap().is_empty(),
        "a manifest was written"
    );

    // GC removed the marker as stale (e.g. the process was stopped for a
    // while): the backup learns it at the next refresh and fails too.
    let res = slow_backup(&repo, "b2", &img, || {
        for e in std::fs::read_dir(&writers).unwrap() {
            let p = e.unwrap().path();
            if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                std::fs::remove_file(p).unwrap();
            }
        }
    });
    assert!(matches!(res, Err(EngineError::WriterLost(_))), "{res:?}");
    assert!(
        repo.backup_ids().unwrap().is_empty(),
        "a manifest was written"
    );

    // Undisturbed, the same backup succeeds.
    slow_backup(&repo, "b3", &img, || {}).unwrap();
    assert_eq!(repo.backup_ids().unwrap(), vec!["b3".to_owned()]);
}
