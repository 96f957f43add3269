//! Encryption at rest (issue 12) on real ext4 images and real store
//! directories: what the store holds is sealed, chunk ids are keyed, keys
//! open the store (and only they do), and every kind of tampering with
//! the objects is reported as tampering.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vpsbackup_engine::format::ChunkId;
use vpsbackup_engine::index::ChunkIndex;
use vpsbackup_engine::{
    generate_key_file, EngineError, JobControl, LocalStorage, Repository, StoreKey,
    DEFAULT_CHUNK_SIZE,
};

fn xorshift(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// An ext4 image holding 1 MiB of incompressible bytes (which a plain store
/// keeps as they are) and some text; returns the image and the bytes.
fn secret_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let tree = dir.join("secret-tree");
    std::fs::create_dir_all(&tree).unwrap();
    let secret = xorshift(0x9e37_79b9_7f4a_7c15, 1 << 20);
    std::fs::write(tree.join("secret.bin"), &secret).unwrap();
    std::fs::write(tree.join("notes.txt"), "customer notes\n".repeat(5000)).unwrap();
    let img = dir.join("secret.raw");
    make_ext4(&img, &tree, "16M");
    (img, secret)
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn store_holds(store: &Path, needle: &[u8]) -> bool {
    all_files(store).iter().any(|f| {
        std::fs::read(f)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    })
}

fn key_file(dir: &Path, name: &str) -> StoreKey {
    let p = dir.join(name);
    generate_key_file(&p).unwrap();
    StoreKey::KeyFile(p)
}

fn open(store: &Path, key: &StoreKey) -> Result<Repository, EngineError> {
    Repository::open_keyed(
        Arc::new(LocalStorage::new(store).unwrap()),
        test_options(),
        DEFAULT_CHUNK_SIZE,
        key,
    )
}

fn init(store: &Path, key: &StoreKey) -> Repository {
    std::fs::create_dir_all(store).unwrap();
    Repository::init(
        Arc::new(LocalStorage::new(store).unwrap()),
        test_options(),
        DEFAULT_CHUNK_SIZE,
        key,
    )
    .unwrap()
}

fn chunk_ids(repo: &Repository) -> HashSet<ChunkId> {
    ChunkIndex::load(&**repo.storage(), &HashSet::new())
        .unwrap()
        .iter()
        .map(|l| l.entry.id)
        .collect()
}

fn verify_one(repo: &Repository, id: &str) -> vpsbackup_engine::BackupVerification {
    repo.verify(Some(id), &JobControl::new())
        .unwrap()
        .backups
        .remove(0)
}

fn restore_err(repo: &Repository, id: &str, dir: &Path) -> EngineError {
    let out = dir.join(format!("{id}-fail.raw"));
    let _ = std::fs::remove_file(&out);
    repo.restore(id, &[out], &JobControl::new()).unwrap_err()
}

/// The same image in a plain store and in an encrypted one: the plain
/// store holds the file's bytes and names chunks by plain BLAKE3, the
/// encrypted one holds neither (so the test can tell), and restores the
/// same bytes.
#[test]
fn an_encrypted_store_holds_no_plaintext_and_no_plain_chunk_ids() {
    let t = tempfile::tempdir().unwrap();
    let (img, secret) = secret_image(t.path());
    let sample = &secret[300_000..300_064];

    let plain_dir = t.path().join("plain");
    let plain = open_repo(&plain_dir);
    backup(&plain, "b1", "srv", &[&img]);
    assert!(!plain.is_encrypted());
    assert!(
        store_holds(&plain_dir, sample),
        "a plain store keeps incompressible bytes as they are"
    );
    let plain_ids = chunk_ids(&plain);
    let disk = std::fs::read(&img).unwrap();
    let some_chunk = disk
        .chunks(65536)
        .find(|c| c.iter().any(|b| *b != 0))
        .unwrap();
    assert!(plain_ids.contains(&ChunkId::of(some_chunk)));

    let enc_dir = t.path().join("enc");
    let key = key_file(t.path(), "enc.key");
    let enc = init(&enc_dir, &key);
    assert!(enc.is_encrypted());
    // New stores seal with AES-256-GCM under one-seal derived keys.
    let config = std::fs::read(enc_dir.join("config")).unwrap();
    assert!(String::from_utf8_lossy(&config).contains("\"cipher\":\"aes256gcm-derived\""));
    let s1 = backup(&enc, "b1", "srv", &[&img]);
    assert!(!store_holds(&enc_dir, sample), "no plaintext in the store");
    assert!(!store_holds(&enc_dir, b"customer notes"));
    assert!(
        !store_holds(&enc_dir, b"srv.example"),
        "manifests are sealed"
    );
    let enc_ids = chunk_ids(&enc);
    assert_eq!(enc_ids.len(), plain_ids.len());
    assert!(
        enc_ids.is_disjoint(&plain_ids),
        "ids are keyed: none equals the plain BLAKE3 of its bytes"
    );

    // Another encrypted store of the same image: its own key, its own ids.
    let other_dir = t.path().join("other");
    let other = init(&other_dir, &key_file(t.path(), "other.key"));
    backup(&other, "b1", "srv", &[&img]);
    assert!(chunk_ids(&other).is_disjoint(&enc_ids));

    // Dedup within the store is kept, across servers.
    let s2 = backup(&enc, "b2", "another-srv", &[&img]);
    assert_eq!(s2.chunks_new, 0, "{s2:?}");
    assert!(s1.chunks_new > 0);

    // Another handle on the store, as another process: restores and
    // verifies byte for byte.
    let again = open(&enc_dir, &key).unwrap();
    for id in ["b1", "b2"] {
        let out = t.path().join(format!("{id}.raw"));
        restore(&again, id, &[&out]);
        cmp(&img, &out);
        assert!(verify_one(&again, id).is_ok());
    }
    // Objects carry the version-2 formats; the plain store's stay at 1.
    let pack = pack_files(&enc_dir).remove(0);
    assert_eq!(&std::fs::read(&pack).unwrap()[..12], b"VPSBPACK\x02\0\0\0");
    let ppack = pack_files(&plain_dir).remove(0);
    assert_eq!(&std::fs::read(&ppack).unwrap()[..12], b"VPSBPACK\x01\0\0\0");
    let manifest = std::fs::read(enc_dir.join("backups/b1")).unwrap();
    assert_eq!(&manifest[..12], b"VPSBSEAL\x02\0\0\0");
    let config = std::fs::read(enc_dir.join("config")).unwrap();
    assert_eq!(&config[8..12], &2u32.to_le_bytes());
    let pconfig = std::fs::read(plain_dir.join("config")).unwrap();
    assert_eq!(&pconfig[8..12], &1u32.to_le_bytes());
    assert!(!String::from_utf8_lossy(&pconfig).contains("encryption"));

    // GC and rebuild-index work on sealed objects and trailers.
    enc.delete_backup("b1").unwrap();
    enc.gc().unwrap();
    let r = enc.rebuild_index().unwrap();
    assert!(r.damaged_packs.is_empty() && r.chunks > 0, "{r:?}");
    let out = t.path().join("b2-after.raw");
    restore(&enc, "b2", &[&out]);
    cmp(&img, &out);
}

/// No key, a wrong key file, a wrong passphrase, a key file that is not
/// one: each one clear `Key` error at open, nothing read. A passphrase
/// opens the store it was added to; keys rotate without rewriting data;
/// the last key cannot be removed.
#[test]
fn keys_open_only_their_store_and_rotate_without_rewriting() {
    let t = tempfile::tempdir().unwrap();
    let (img, _) = secret_image(t.path());
    let store = t.path().join("store");
    let first = key_file(t.path(), "first.key");
    let repo = init(&store, &first);
    backup(&repo, "b1", "srv", &[&img]);

    let key_err = |key: &StoreKey| match open(&store, key) {
        Err(EngineError::Key(text)) => text,
        other => panic!("{key:?}: {other:?}"),
    };
    let none = key_err(&StoreKey::None);
    assert!(
        none.contains("encrypted") && none.contains("VPSBACKUP_PASSPHRASE"),
        "{none}"
    );
    let stranger = key_file(t.path(), "stranger.key");
    assert!(key_err(&stranger).contains("does not open this store"));
    assert!(key_err(&StoreKey::Passphrase("guess".into())).contains("does not open"));
    let missing = StoreKey::KeyFile(t.path().join("nope.key"));
    assert!(key_err(&missing).contains("cannot be read"));
    let not_key = t.path().join("notes.key");
    std::fs::write(&not_key, "not a key\n").unwrap();
    assert!(key_err(&StoreKey::KeyFile(not_key)).contains("64 hex digits"));
    // A plain store opens with or without a key (none is needed).
    let plain_dir = t.path().join("plain");
    open_repo(&plain_dir);
    assert!(!open(&plain_dir, &first).unwrap().is_encrypted());

    let packs_before = all_files(&store.join("packs"));
    let pass = StoreKey::Passphrase("correct horse battery staple".into());
    let added = repo.add_key(&pass).unwrap();
    assert_eq!(added.kind, "passphrase");
    assert_eq!(added.argon2, Some((64 * 1024, 3, 1)));
    let second = key_file(t.path(), "second.key");
    let k2 = repo.add_key(&second).unwrap();
    let keys = repo.list_keys().unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
    let first_id = keys[0].id.clone();
    assert_eq!(keys[0].kind, "key-file");

    // Rotate the first key file out: it no longer opens the store, the
    // others do, and no pack was rewritten.
    repo.remove_key(&first_id).unwrap();
    assert!(key_err(&first).contains("does not open"));
    for key in [&pass, &second] {
        let r = open(&store, key).unwrap();
        let out = t.path().join("out.raw");
        let _ = std::fs::remove_file(&out);
        restore(&r, "b1", &[&out]);
        cmp(&img, &out);
    }
    assert_eq!(all_files(&store.join("packs")), packs_before);

    let r = open(&store, &second).unwrap();
    r.remove_key(&added.id).unwrap();
    match r.remove_key(&k2.id) {
        Err(EngineError::InvalidRequest(text)) => assert!(text.contains("last key"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.list_keys().unwrap().len(), 1);
    assert!(matches!(
        r.remove_key("0123456789abcdef"),
        Err(EngineError::InvalidRequest(_))
    ));
    // An unencrypted store has no keys to manage.
    let plain = open_repo(&plain_dir);
    assert!(plain.list_keys().unwrap().is_empty());
    assert!(plain.add_key(&second).is_err());
}

fn swap_files(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    std::fs::write(a, y).unwrap();
    std::fs::write(b, x).unwrap();
}

/// Two packs' bytes exchanged: every chunk read from either fails
/// authentication (not decompression); verify lists them as tampered and
/// the backup as damaged; rebuild-index refuses both trailers; a fresh
/// backup heals the store.
#[test]
fn swapped_packs_are_tampering() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, true);
    backup(&repo, "b1", "srv", &[&img]);
    let packs = pack_files(&store);
    assert!(packs.len() >= 2, "{packs:?}");
    swap_files(&packs[0], &packs[1]);

    let v = verify_one(&repo, "b1");
    assert!(!v.is_ok());
    assert!(!v.tampered_chunks.is_empty(), "{v:?}");
    assert_eq!(v.tampered_chunks, v.corrupt_chunks, "{v:?}");
    let e = restore_err(&repo, "b1", t.path());
    assert!(matches!(e, EngineError::Tampered { .. }), "{e}");
    assert!(e.to_string().contains("tampered"), "{e}");
    assert!(!e.to_string().contains("decompress"), "{e}");

    let r = repo.rebuild_index().unwrap();
    assert_eq!(
        r.damaged_packs.len(),
        2,
        "both swapped packs refused: {r:?}"
    );

    // Healing: the next backup stores good copies of what was lost.
    let other = open_repo_as(&store, true);
    backup(&other, "b2", "srv", &[&img]);
    let out = t.path().join("b1.raw");
    restore(&other, "b1", &[&out]);
    cmp(&img, &out);
}

/// A manifest copied to another backup's name is refused as tampering
/// (it is bound to its own name), while the original stays good; a
/// truncated manifest and a truncated index object too.
#[test]
fn moved_and_truncated_objects_are_tampering() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, true);
    backup(&repo, "b1", "srv", &[&img]);
    backup(&repo, "b2", "srv", &[&img]);
    std::fs::copy(store.join("backups/b1"), store.join("backups/b2")).unwrap();

    let e = repo.backup_info("b2").unwrap_err();
    assert!(matches!(e, EngineError::Tampered { .. }), "{e}");
    let all = repo.verify(None, &JobControl::new()).unwrap();
    let b2 = all.backups.iter().find(|b| b.backup_id == "b2").unwrap();
    assert!(
        b2.manifest_error.as_deref().unwrap().contains("tampered"),
        "{b2:?}"
    );
    assert!(all
        .backups
        .iter()
        .find(|b| b.backup_id == "b1")
        .unwrap()
        .is_ok());
    let e = restore_err(&repo, "b2", t.path());
    assert!(matches!(e, EngineError::Tampered { .. }), "{e}");
    let h = repo.health().unwrap();
    assert_eq!(h.damaged_manifests.len(), 1, "{h:?}");
    assert_eq!(
        repo.list_backups().unwrap().len(),
        1,
        "listed: only the good one"
    );

    // A truncated manifest.
    let m = store.join("backups/b1");
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        repo.backup_info("b1"),
        Err(EngineError::Tampered { .. })
    ));

    // A truncated index object: skipped as damaged, reported by health.
    let index = all_files(&store.join("index")).remove(0);
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
    let h = repo.health().unwrap();
    assert_eq!(h.damaged_index_objects.len(), 1, "{h:?}");
    assert!(h.damaged_index_objects[0].contains("tampered"), "{h:?}");
}

/// The config can be neither edited nor replaced by an unencrypted one
/// (which would make the next backup write plaintext).
#[test]
fn a_changed_or_downgraded_config_is_refused() {
    use vpsbackup_engine::format::{
        encode_json, open_seal_versioned, seal_versioned, StoreConfig, CONFIG_MAGIC,
    };
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let key = key_file(t.path(), "k");
    init(&store, &key);
    let path = store.join("config");
    let orig = std::fs::read(&path).unwrap();
    let (_, p) = open_seal_versioned(CONFIG_MAGIC, "config", &orig, &[2]).unwrap();
    let mut config: StoreConfig = serde_json::from_slice(p).unwrap();

    config.chunk_size *= 2;
    std::fs::write(
        &path,
        seal_versioned(CONFIG_MAGIC, 2, &serde_json::to_vec(&config).unwrap()),
    )
    .unwrap();
    match open(&store, &key) {
        Err(e @ EngineError::Tampered { .. }) => assert!(e.to_string().contains("config"), "{e}"),
        other => panic!("{other:?}"),
    }

    config.chunk_size /= 2;
    config.encryption = None;
    std::fs::write(&path, encode_json(CONFIG_MAGIC, &config)).unwrap();
    for k in [&key, &StoreKey::None] {
        match open(&store, k) {
            Err(e @ EngineError::Tampered { .. }) => {
                assert!(e.to_string().contains("has keys"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
    std::fs::write(&path, orig).unwrap();
    open(&store, &key).unwrap();
    // A store is created once: init on it again is refused.
    assert!(Repository::init(
        Arc::new(LocalStorage::new(&store).unwrap()),
        test_options(),
        DEFAULT_CHUNK_SIZE,
        &key,
    )
    .is_err());
}
