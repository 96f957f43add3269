//! An encrypted store's keys (issue 12).
//!
//! The store's data key (32 random bytes, made once at `init`) never
//! changes: every sealed object and every keyed chunk id depends on it.
//! It is stored only wrapped, once per *key wrapper* `keys/<16 hex>`: an
//! envelope (format version 2) holding JSON with the data key sealed by
//! XChaCha20-Poly1305 under a key-encryption key (KEK) taken from
//!
//! - a key file: 64 hex digits (32 random bytes, written by
//!   [`generate_key_file`] with mode 0600), KEK = BLAKE3 derive_key of them;
//! - a passphrase: KEK = Argon2id(passphrase, 16-byte random salt), with
//!   its parameters recorded in the wrapper so they can be raised later
//!   without breaking older wrappers.
//!
//! The wrapper's associated data binds it to the store id and its own id.
//! Several wrappers may open one store: adding one and removing another
//! rotates a leaked key file or passphrase without rewriting any data (the
//! data key itself stays, so whoever copied it out while holding access
//! keeps it: rotating that needs a new store).

use crate::format::{now_ms, random_bytes, random_hex};
use crate::storage::{Storage, StorageError};
use crate::EngineError;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Envelope magic of a key wrapper.
pub const KEY_MAGIC: &[u8; 8] = b"VPSBKEYW";
const PREFIX: &str = "keys/";

/// Argon2id cost for new passphrase wrappers: 64 MiB, 3 passes, one lane
/// (RFC 9106's second recommended setting, ~0.2 s on one core here).
pub const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
pub const ARGON2_PASSES: u32 = 3;
pub const ARGON2_LANES: u32 = 1;

/// What opens an encrypted store (or, for a store being created, what its
/// first key wrapper is made from).
#[derive(Clone, Default)]
pub enum StoreKey {
    /// No key: only unencrypted stores open; a new store is unencrypted.
    #[default]
    None,
    /// A key file of 64 hex digits ([`generate_key_file`] writes one).
    KeyFile(PathBuf),
    /// A passphrase, stretched with Argon2id.
    Passphrase(String),
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKey::None => f.write_str("StoreKey::None"),
            StoreKey::KeyFile(p) => write!(f, "StoreKey::KeyFile({})", p.display()),
            StoreKey::Passphrase(_) => f.write_str("StoreKey::Passphrase(<redacted>)"),
        }
    }
}

impl StoreKey {
    pub fn is_none(&self) -> bool {
        matches!(self, StoreKey::None)
    }

    fn kind(&self) -> &'static str {
        match self {
            StoreKey::None => "none",
            StoreKey::KeyFile(_) => "key-file",
            StoreKey::Passphrase(_) => "passphrase",
        }
    }
}

/// One key wrapper as `store key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    /// `key-file` or `passphrase`.
    pub kind: String,
    pub created_at_ms: u64,
    /// Argon2id parameters of a passphrase wrapper: (memory KiB, passes, lanes).
    pub argon2: Option<(u32, u32, u32)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Argon2Params {
    algorithm: String,
    version: u32,
    memory_kib: u32,
    passes: u32,
    lanes: u32,
    salt: String,
}

/// The JSON of a `keys/<id>` object.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct KeyWrapper {
    id: String,
    kind: String,
    created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    argon2: Option<Argon2Params>,
    nonce: String,
    /// The sealed data key and its tag, hex.
    wrapped: String,
}

impl KeyWrapper {
    fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            kind: self.kind.clone(),
            created_at_ms: self.created_at_ms,
            argon2: self
                .argon2
                .as_ref()
                .map(|a| (a.memory_kib, a.passes, a.lanes)),
        }
    }
}

/// A store's data key, never printed.
pub(crate) struct DataKey(pub(crate) Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

fn key_error(text: impl Into<String>) -> EngineError {
    EngineError::Key(text.into())
}

/// Writes a new key file at `path` (64 hex digits of fresh randomness and a
/// newline, mode 0600); fails if something exists there.
pub fn generate_key_file(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = Zeroizing::new(hex::encode(random_bytes::<32>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, EngineError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        key_error(format!(
            "The key file {} cannot be read ({e}).",
            path.display()
        ))
    })?);
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut key[..]).map_err(|_| {
        key_error(format!(
            "{} is not a vpsbackup key file (it must hold 64 hex digits).",
            path.display()
        ))
    })?;
    Ok(key)
}

/// The key-encryption key `key` gives for wrapper parameters `argon2`.
fn kek(key: &StoreKey, argon2: Option<&Argon2Params>) -> Result<Zeroizing<[u8; 32]>, EngineError> {
    match (key, argon2) {
        (StoreKey::KeyFile(path), _) => {
            let secret = read_key_file(path)?;
            Ok(Zeroizing::new(blake3::derive_key(
                "vpsbackup 2026-11 key file",
                &secret[..],
            )))
        }
        (StoreKey::Passphrase(p), Some(a)) => {
            let bad = |e: String| {
                key_error(format!(
                    "A passphrase key wrapper has unusable Argon2id parameters ({e})."
                ))
            };
            if a.algorithm != "argon2id" || a.version != 0x13 {
                return Err(bad(format!("{} version {}", a.algorithm, a.version)));
            }
            let mut salt = [0u8; 16];
            hex::decode_to_slice(&a.salt, &mut salt).map_err(|e| bad(e.to_string()))?;
            let params = argon2::Params::new(a.memory_kib, a.passes, a.lanes, Some(32))
                .map_err(|e| bad(e.to_string()))?;
            let argon =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = Zeroizing::new([0u8; 32]);
            argon
                .hash_password_into(p.as_bytes(), &salt, &mut out[..])
                .map_err(|e| bad(e.to_string()))?;
            Ok(out)
        }
        _ => Err(key_error(
            "This key wrapper does not take that kind of key.",
        )),
    }
}

fn wrap_ad(store_id: &str, id: &str, kind: &str) -> Vec<u8> {
    [
        KEY_MAGIC.as_slice(),
        store_id.as_bytes(),
        b"/",
        id.as_bytes(),
        b"/",
        kind.as_bytes(),
    ]
    .concat()
}

/// A new wrapper of `data_key` opened by `key`.
fn wrap(store_id: &str, data_key: &[u8; 32], key: &StoreKey) -> Result<KeyWrapper, EngineError> {
    let argon2 = matches!(key, StoreKey::Passphrase(_)).then(|| Argon2Params {
        algorithm: "argon2id".into(),
        version: 0x13,
        memory_kib: ARGON2_MEMORY_KIB,
        passes: ARGON2_PASSES,
        lanes: ARGON2_LANES,
        salt: hex::encode(random_bytes::<16>()),
    });
    if key.is_none() {
        return Err(key_error("A key file or a passphrase is needed."));
    }
    let kek = kek(key, argon2.as_ref())?;
    let id = random_hex(8);
    let nonce: [u8; 24] = random_bytes();
    let mut body = Zeroizing::new(data_key.to_vec());
    let tag = XChaCha20Poly1305::new(Key::from_slice(&kek[..]))
        .encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &wrap_ad(store_id, &id, key.kind()),
            &mut body,
        )
        .expect("32 bytes seal");
    let mut wrapped = body.to_vec();
    wrapped.extend_from_slice(&tag);
    Ok(KeyWrapper {
        id,
        kind: key.kind().to_owned(),
        created_at_ms: now_ms(),
        argon2,
        nonce: hex::encode(nonce),
        wrapped: hex::encode(wrapped),
    })
}

/// The data key, if `key` opens this wrapper.
fn unwrap(
    store_id: &str,
    w: &KeyWrapper,
    key: &StoreKey,
) -> Result<Option<Zeroizing<[u8; 32]>>, EngineError> {
    if w.kind != key.kind() {
        return Ok(None);
    }
    let kek = kek(key, w.argon2.as_ref())?;
    let mut nonce = [0u8; 24];
    let (Ok(()), Ok(mut wrapped)) = (
        hex::decode_to_slice(&w.nonce, &mut nonce),
        hex::decode(&w.wrapped),
    ) else {
        return Ok(None);
    };
    if wrapped.len() != 32 + 16 {
        return Ok(None);
    }
    let tag = *Tag::from_slice(&wrapped[32..]);
    wrapped.truncate(32);
    let mut body = Zeroizing::new(wrapped);
    let opened = XChaCha20Poly1305::new(Key::from_slice(&kek[..])).decrypt_in_place_detached(
        XNonce::from_slice(&nonce),
        &wrap_ad(store_id, &w.id, &w.kind),
        &mut body,
        &tag,
    );
    if opened.is_err() {
        return Ok(None);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&body);
    Ok(Some(out))
}

/// Every readable key wrapper, with the key of each.
fn load(storage: &dyn Storage) -> Result<Vec<KeyWrapper>, EngineError> {
    let mut out = Vec::new();
    for meta in storage.list(PREFIX)? {
        let obj = match storage.get(&meta.key) {
            Ok(o) => o,
            Err(StorageError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let p = crate::format::open_seal_versioned(KEY_MAGIC, &meta.key, &obj, &[2])?.1;
        let w: KeyWrapper = serde_json::from_slice(p)
            .map_err(|e| EngineError::bad_object(&meta.key, e.to_string()))?;
        if format!("{PREFIX}{}", w.id) != meta.key {
            return Err(EngineError::Tampered {
                object: meta.key,
                detail: "it names another key wrapper".into(),
            });
        }
        out.push(w);
    }
    out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(out)
}

/// Whether the store has any key wrapper (an unencrypted config beside
/// them means the config was replaced).
pub(crate) fn any(storage: &dyn Storage) -> Result<bool, EngineError> {
    Ok(!storage.list(PREFIX)?.is_empty())
}

/// The data key: the first wrapper `key` opens.
pub(crate) fn unlock(
    storage: &dyn Storage,
    store_id: &str,
    key: &StoreKey,
) -> Result<Zeroizing<[u8; 32]>, EngineError> {
    if key.is_none() {
        return Err(key_error(
            "The store is encrypted: give its key file (--key-file, or store_key_file in config.toml) or its passphrase (VPSBACKUP_PASSPHRASE).",
        ));
    }
    let wrappers = load(storage)?;
    for w in &wrappers {
        if let Some(k) = unwrap(store_id, w, key)? {
            return Ok(k);
        }
    }
    Err(key_error(match key {
        StoreKey::KeyFile(p) => format!(
            "The key file {} does not open this store: it is not one of the store's keys.",
            p.display()
        ),
        _ => "The passphrase does not open this store: it is not one of the store's keys.".into(),
    }))
}

/// Stores a new wrapper of `data_key` opened by `key`.
pub(crate) fn add(
    storage: &dyn Storage,
    store_id: &str,
    data_key: &[u8; 32],
    key: &StoreKey,
) -> Result<KeyInfo, EngineError> {
    let w = wrap(store_id, data_key, key)?;
    let json = serde_json::to_vec(&w).expect("key wrapper serialises");
    let obj = crate::format::seal_versioned(KEY_MAGIC, 2, &json);
    storage.put_if_absent(&format!("{PREFIX}{}", w.id), &obj)?;
    Ok(w.info())
}

pub(crate) fn list(storage: &dyn Storage) -> Result<Vec<KeyInfo>, EngineError> {
    Ok(load(storage)?.iter().map(KeyWrapper::info).collect())
}

/// Removes wrapper `id`; refuses to remove the last one, which would
/// leave the store unreadable for good.
pub(crate) fn remove(storage: &dyn Storage, id: &str) -> Result<(), EngineError> {
    let wrappers = load(storage)?;
    if !wrappers.iter().any(|w| w.id == id) {
        return Err(EngineError::InvalidRequest(format!(
            "the store has no key {id:?}"
        )));
    }
    if wrappers.len() == 1 {
        return Err(EngineError::InvalidRequest(format!(
            "key {id} is the store's last key; add another before removing it, or the store could never be opened again"
        )));
    }
    storage.delete(&format!("{PREFIX}{id}"))?;
    Ok(())
}
