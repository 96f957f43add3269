//! The engine on real S3 servers (Garage, Ceph radosgw): backup,
//! incremental, restore byte for byte, verify and GC; the same through a
//! fault-injecting proxy that cuts and delays connections; and an upload
//! that fails for good (no manifest, GC reclaims its packs).

mod common;

use common::fault_proxy::FaultProxy;
use common::s3::{self, Kind};
use std::sync::Arc;
use std::time::Duration;
use vpsbackup_engine::{
    EngineError, EngineOptions, GcExclusion, ObjectMeta, Repository, RequestCounts, S3Config,
    S3Storage, Storage, StorageError, DEFAULT_CHUNK_SIZE,
};

fn open(cfg: &S3Config, options: EngineOptions) -> Repository {
    Repository::open_with(
        Arc::new(S3Storage::open(cfg.clone()).unwrap()),
        options,
        DEFAULT_CHUNK_SIZE,
    )
    .unwrap()
}

fn options() -> EngineOptions {
    EngineOptions {
        gc_exclusion: GcExclusion::Operator,
        ..common::test_options()
    }
}

fn lifecycle_on(kind: Kind) {
    let t = tempfile::tempdir().unwrap();
    let img = common::base_image(t.path());
    let cfg = s3::server(kind).config("lifecycle");
    let repo = open(&cfg, options());
    let before = repo.storage().request_counts().unwrap();
    let first = common::backup(&repo, "b1", "srv", &[&img]);
    let requests = repo.storage().request_counts().unwrap().since(&before);
    // Bounded: a PUT per pack and a few for index, marker and manifest;
    // never a request per chunk.
    let packs = repo.storage().list("packs/").unwrap().len() as u64;
    assert!(
        requests.put >= packs && requests.put <= packs + 10,
        "{requests}, {packs} packs"
    );
    assert!(requests.list <= 10, "{requests}");
    let v1 = t.path().join("v1.raw");
    std::fs::copy(&img, &v1).unwrap();

    common::scatter_writes(&img, 20, 11);
    let second = common::backup(&repo, "b2", "srv", &[&img]);
    // 20 rewritten chunks and the one chunk list naming them (a write may
    // land in a hole: then the chunk is new data that was zeros).
    assert!(
        (1..=22).contains(&second.chunks_new) && second.stored_bytes < first.stored_bytes / 2,
        "the second backup deduplicates: {first:?} then {second:?}"
    );

    let out1 = t.path().join("out1.raw");
    let out2 = t.path().join("out2.raw");
    common::restore(&repo, "b1", &[&out1]);
    common::restore(&repo, "b2", &[&out2]);
    common::cmp(&v1, &out1);
    common::cmp(&img, &out2);
    assert!(repo
        .verify(None, &vpsbackup_engine::JobControl::new())
        .unwrap()
        .is_ok());

    // GC after deleting b1 keeps b2 whole (b1's own chunks are too few
    // to make a pack worth rewriting) ...
    repo.delete_backup("b1").unwrap();
    repo.gc().unwrap();
    let out3 = t.path().join("out3.raw");
    common::restore(&repo, "b2", &[&out3]);
    common::cmp(&img, &out3);
    // ... and with no backup left it removes every pack.
    repo.delete_backup("b2").unwrap();
    let gc = repo.gc().unwrap();
    assert!(gc.bytes_freed > 0, "{gc:?}");
    assert!(repo.storage().list("packs/").unwrap().is_empty());
}

#[test]
fn backup_restore_verify_gc_on_garage() {
    lifecycle_on(Kind::Garage);
}

#[test]
fn backup_restore_verify_gc_on_ceph() {
    lifecycle_on(Kind::Ceph);
}

#[test]
fn gc_beside_running_backups_on_ceph_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    // Ceph honours conditional writes: the store's own GC lock serves.
    let repo = open(&s3::ceph().config("gc-race"), common::test_options());
    common::gc_beside_running_backups(&repo, t.path());
}

/// The S3 backend, noting the prefix of every listing the engine asks for.
#[derive(Debug)]
struct ListLog {
    inner: S3Storage,
    lists: std::sync::Mutex<Vec<String>>,
}

impl ListLog {
    /// The prefixes listed since the last call, sorted.
    fn take(&self) -> Vec<String> {
        let mut l = std::mem::take(&mut *self.lists.lock().unwrap());
        l.sort();
        l
    }
}

impl Storage for ListLog {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StorageError> {
        self.inner.put_if_absent(key, data)
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        self.inner.get_range(key, offset, len)
    }
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.lists.lock().unwrap().push(prefix.to_owned());
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key)
    }
    fn put_if_absent_is_atomic(&self) -> bool {
        self.inner.put_if_absent_is_atomic()
    }
    fn io_concurrency(&self) -> usize {
        self.inner.io_concurrency()
    }
    fn request_counts(&self) -> Option<RequestCounts> {
        self.inner.request_counts()
    }
}

/// The whole bucket is never listed and `packs/` (the bulk of the
/// objects) once at most; the small prefixes a race could change while the
/// run reads them are listed twice at most, once more to close the race:
/// `index/` (an index object GC consolidated away between the listing and
/// its GET), `backups/` (a backup finished since GC's mark), `writers/` (a
/// writer started before GC condemned packs); every other prefix once.
fn once_each(what: &str, lists: &[String]) {
    let mut seen = std::collections::BTreeMap::new();
    for p in lists {
        assert!(!p.is_empty(), "{what} listed the whole store: {lists:?}");
        *seen.entry(p.as_str()).or_insert(0) += 1;
    }
    for (p, n) in seen {
        let allowed = match p {
            "index/" | "backups/" | "writers/" => 2,
            _ => 1,
        };
        assert!(n <= allowed, "{what} listed {p} {n} times: {lists:?}");
    }
}

/// GC and verify list the store's packs once a run (the small prefixes at
/// most twice, see [`once_each`]), and read each object once: the requests
/// grow with the objects, never with the chunks. Providers pay per request.
#[test]
fn gc_and_verify_list_the_packs_once_a_run() {
    let t = tempfile::tempdir().unwrap();
    let img = common::base_image(t.path());
    let storage = Arc::new(ListLog {
        inner: S3Storage::open(s3::garage().config("requests")).unwrap(),
        lists: Default::default(),
    });
    let repo = Repository::open_with(storage.clone(), options(), DEFAULT_CHUNK_SIZE).unwrap();
    common::backup(&repo, "b1", "srv", &[&img]);
    common::scatter_writes(&img, 20, 5);
    common::backup(&repo, "b2", "srv", &[&img]);
    let count = |prefix: &str| repo.storage().list(prefix).unwrap().len() as u64;
    let (packs, indexes, manifests) = (count("packs/"), count("index/"), count("backups/"));
    storage.take();

    let before = repo.storage().request_counts().unwrap();
    assert!(repo
        .verify(None, &vpsbackup_engine::JobControl::new())
        .unwrap()
        .is_ok());
    let verify = repo.storage().request_counts().unwrap().since(&before);
    once_each("verify", &storage.take());
    // A GET of each index object and manifest, ranged GETs of the packs (a
    // few per pack), and its own marker written and removed.
    assert!(
        verify.get <= indexes + manifests + 4 * packs + 4,
        "verify: {verify}; {packs} packs, {indexes} index objects, {manifests} manifests"
    );
    assert!(verify.put <= 1 && verify.delete <= 1, "verify: {verify}");

    repo.delete_backup("b1").unwrap();
    storage.take();
    let before = repo.storage().request_counts().unwrap();
    repo.gc().unwrap();
    let gc = repo.storage().request_counts().unwrap().since(&before);
    let lists = storage.take();
    once_each("gc", &lists);
    assert!(
        gc.get <= indexes + manifests + 2 * packs + 8,
        "gc: {gc}; {packs} packs, {indexes} index objects, {manifests} manifests"
    );
}

#[test]
fn gc_on_garage_needs_a_lock_it_can_trust() {
    let cfg = s3::garage().config("gc-refused");
    let repo = open(&cfg, common::test_options());
    let err = repo.gc().unwrap_err();
    assert!(err.to_string().contains("--exclusive"), "{err}");
    assert!(repo.describe().contains("ignored"), "{}", repo.describe());
    // A host lock file is one.
    let t = tempfile::tempdir().unwrap();
    let locked = repo.with_options(EngineOptions {
        gc_exclusion: GcExclusion::HostLock(t.path().join("gc.lock")),
        ..common::test_options()
    });
    locked.gc().unwrap();
    // On Ceph the store's lock object is atomic: no help needed.
    let ceph = open(&s3::ceph().config("gc-ceph"), common::test_options());
    ceph.gc().unwrap();
    assert!(ceph.describe().contains("honoured"), "{}", ceph.describe());
}

#[test]
fn backups_through_a_faulty_link_restore_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let img = common::base_image(t.path());
    let srv = s3::garage();
    let proxy = FaultProxy::start(&srv.endpoint, 0x5eed);
    let mut cfg = srv.config("faults");
    cfg.endpoint = Some(proxy.endpoint());
    cfg.max_attempts = 10;
    // One connection in six cut part-way (either direction), one in six held.
    proxy.set_faults(170, 170);
    let repo = open(&cfg, options());
    let mut versions = Vec::new();
    for (i, seed) in [1u64, 2, 3].into_iter().enumerate() {
        if i > 0 {
            common::scatter_writes(&img, 30, seed);
        }
        let id = format!("b{i}");
        common::backup(&repo, &id, "srv", &[&img]);
        let keep = t.path().join(format!("{id}.raw"));
        std::fs::copy(&img, &keep).unwrap();
        versions.push((id, keep));
    }
    for (id, want) in &versions {
        let out = t.path().join(format!("{id}.out"));
        common::restore(&repo, id, &[&out]);
        common::cmp(want, &out);
    }
    assert!(repo
        .verify(None, &vpsbackup_engine::JobControl::new())
        .unwrap()
        .is_ok());
    let (conns, cut, delayed) = proxy.counts();
    assert!(
        cut > 0 && delayed > 0,
        "{conns} connections, {cut} cut, {delayed} delayed"
    );
}

#[test]
fn an_upload_that_fails_for_good_leaves_no_manifest_and_gc_reclaims_its_packs() {
    let t = tempfile::tempdir().unwrap();
    let img = common::base_image(t.path());
    let srv = s3::garage();
    let proxy = FaultProxy::start(&srv.endpoint, 9);
    let direct_cfg = srv.config("fails");
    let mut cfg = direct_cfg.clone();
    cfg.endpoint = Some(proxy.endpoint());
    cfg.max_attempts = 2;
    let opts = EngineOptions {
        writer_stale_after: Duration::from_secs(2),
        // Many small packs, each request held a while: the backup is
        // still uploading when the link goes down.
        pack_target: 256 << 10,
        ..options()
    };
    proxy.set_faults(0, 1000);
    let repo = open(&cfg, opts.clone());
    let direct = open(&direct_cfg, opts);
    let err = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            // The link goes down for good once the first pack is stored.
            while direct.storage().list("packs/").unwrap().is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
            proxy.set_down(true);
        });
        let req = vpsbackup_engine::BackupRequest {
            backup_id: "doomed".into(),
            server_id: "srv".into(),
            server_name: "srv".into(),
            disks: vec![vpsbackup_engine::DiskImage::detect(&img)],
            read_limit: None,
        };
        let r = repo.backup(&req, &vpsbackup_engine::JobControl::new());
        watcher.join().unwrap();
        r.unwrap_err()
    });
    assert!(matches!(err, EngineError::Storage(_)), "{err:?}");
    proxy.set_down(false);
    assert!(direct.backup_ids().unwrap().is_empty(), "no manifest");
    let left = direct.storage().list("packs/").unwrap().len();
    assert!(left > 0);
    // Its writer marker goes stale; GC then reclaims every pack.
    std::thread::sleep(Duration::from_millis(2500));
    let gc = direct.gc().unwrap();
    assert_eq!(gc.packs_deleted as usize, left, "{gc:?}");
    assert!(direct.storage().list("packs/").unwrap().is_empty());
}
