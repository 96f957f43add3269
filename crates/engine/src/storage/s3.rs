//! The S3-compatible object storage backend (Ceph radosgw, Garage, cloud
//! buckets): one object per key under `s3://BUCKET/PREFIX/`, through the
//! `object_store` crate (SigV4, paged listing, ranged GETs, its own retries
//! of 5xx / 429 / connect errors with jittered backoff).
//!
//! The engine is synchronous; each call here runs its request on a small
//! tokio runtime this backend owns and blocks the calling thread on a
//! channel until it ends, so it works from plain threads and from
//! `spawn_blocking` alike.
//!
//! Around each request sits one more retry loop of our own, also with
//! exponential backoff and jitter: `object_store` does not retry a
//! non-idempotent request (a conditional PUT) after a timeout or a
//! connection reset, nor a request whose body failed half-way. A
//! conditional PUT whose earlier try may have landed is resolved by reading
//! the object back: the same bytes mean the earlier try wrote it.
//!
//! Conditional writes: `If-None-Match: *` makes [`Storage::put_if_absent`]
//! atomic, but not every server honours it (Ceph radosgw does, Garage 2.5
//! ignores it and overwrites). [`S3Storage::open`] probes it once and
//! reports the answer in [`Storage::put_if_absent_is_atomic`]; where it is
//! ignored, put-if-absent is a HEAD then a PUT, which is only safe for keys
//! no two writers share (random or content-addressed names, catalog-unique
//! backup ids), and GC must be told it runs alone.
//!
//! Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or
//! the caller) and never appear in Debug output or errors.

use super::{validate_key, ObjectMeta, RequestCounts, Storage, StorageError};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjPath;
// Only `ObjectStore`'s own (boxed, Send) futures: the `ObjectStoreExt`
// helpers return futures not declared Send, which the runtime cannot take.
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tries of one operation in our own loop (each may hold several of
/// `object_store`'s retries of a 5xx): [`S3Config::max_attempts`]'s default.
pub const DEFAULT_ATTEMPTS: u32 = 6;
/// First backoff of our loop; doubled each try, with full jitter.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Requests a backup or restore keeps in flight (packs uploading, ranges
/// being read): enough to hide a few ms of latency per request on
/// localhost and tens of ms on a real network.
const IO_CONCURRENCY: usize = 8;

/// Where an S3 store lives and how to sign requests to it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// `http(s)://host:port` of the server; None for AWS itself.
    pub endpoint: Option<String>,
    /// Signing region; Garage needs its configured `s3_region`.
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Tries of one request before it fails for good (timeouts, resets,
    /// 5xx), with jittered exponential backoff between them.
    pub max_attempts: u32,
}

// Keys are secrets: never printed.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("max_attempts", &self.max_attempts)
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]`, taking the keys from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` and the region from
    /// `region`, else `AWS_REGION`, else `us-east-1`.
    pub fn from_url(
        url: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<S3Config, StorageError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            StorageError::Config(format!("{url:?} is not an s3://BUCKET/PREFIX address"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(StorageError::Config(format!(
                "bucket name {bucket:?} is not valid: 3 to 63 lower-case letters, digits, dots and dashes"
            )));
        }
        if !prefix.is_empty() && validate_key(prefix).is_err() {
            return Err(StorageError::Config(format!(
                "store prefix {prefix:?} is not valid: /-separated names of letters, digits, '.', '_' and '-'"
            )));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(access_key_id), Some(secret_access_key)) =
            (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(StorageError::Config(
                "an s3:// store needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
                    .into(),
            ));
        };
        let region = region
            .map(str::to_owned)
            .or_else(|| env("AWS_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_owned()),
            region,
            access_key_id,
            secret_access_key,
            max_attempts: DEFAULT_ATTEMPTS,
        })
    }

    /// `s3://bucket/prefix` (no endpoint, no keys): for messages.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Requests sent, by kind (each retry counts again).
#[derive(Debug, Default)]
struct Counters {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

/// The S3 backend. Cheap to share (`Arc`); the runtime stops when it is dropped.
pub struct S3Storage {
    config: S3Config,
    store: Arc<dyn ObjectStore>,
    runtime: Option<tokio::runtime::Runtime>,
    atomic_create: bool,
    counters: Counters,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("config", &self.config)
            .field("atomic_create", &self.atomic_create)
            .finish()
    }
}

/// What one try of an operation ended with.
enum Attempt<T> {
    Done(T),
    /// Worth another try (timeout, reset, 5xx left after object_store's retries).
    Transient(object_store::Error),
    Fatal(object_store::Error),
}

impl S3Storage {
    /// Connects to the bucket, checks it answers a signed request, and
    /// probes whether it honours `If-None-Match: *`.
    pub fn open(config: S3Config) -> Result<S3Storage, StorageError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            // Path-style: Garage answers a virtual-hosted request as ListBuckets.
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // One DELETE per key: the trait deletes one object at a time,
            // and a bulk request would need Content-MD5 support everywhere.
            .with_disable_bulk_delete(true)
            // No SHA-256 of every body on either side (the server checks
            // it too): what we store is checksummed or sealed end to end and
            // checked at every read, so a body changed on the wire is found
            // anyway. Measured on Garage: 7% of its CPU for a backup.
            .with_unsigned_payload(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 4,
                retry_timeout: Duration::from_secs(60),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(Duration::from_secs(10))
                    // A 16 MiB pack over a slow uplink; a stalled request
                    // still ends and is retried.
                    .with_timeout(Duration::from_secs(120))
                    .with_pool_max_idle_per_host(32),
            );
        if let Some(e) = &config.endpoint {
            builder = builder.with_endpoint(e);
        }
        let store = builder
            .build()
            .map_err(|e| StorageError::Config(format!("cannot use {}: {e}", config.url())))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Config(format!("cannot start the S3 client: {e}")))?;
        let mut s = S3Storage {
            config,
            store: Arc::new(store),
            runtime: Some(runtime),
            atomic_create: true,
            counters: Counters::default(),
        };
        s.atomic_create = s.probe_conditional_put()?;
        Ok(s)
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn path(&self, key: &str) -> Result<ObjPath, StorageError> {
        validate_key(key)?;
        Ok(self.raw_path(key))
    }

    fn raw_path(&self, key: &str) -> ObjPath {
        if self.config.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.config.prefix))
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it here.
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .spawn(async move {
                let _ = tx.send(fut.await);
            });
        rx.recv().expect("the S3 runtime ran the request")
    }

    /// Runs `op` (one request) with our retry loop; `counter` counts each try.
    fn with_retries<T, F, Fut>(
        &self,
        counter: &AtomicU64,
        op_name: &'static str,
        key: &str,
        op: F,
    ) -> Result<T, (object_store::Error, u32)>
    where
        T: Send + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Attempt<T>> + Send + 'static,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            counter.fetch_add(1, Ordering::Relaxed);
            match self.block(op()) {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fatal(e) => return Err((e, tries)),
                Attempt::Transient(e) if tries >= self.config.max_attempts.max(1) => {
                    return Err((e, tries))
                }
                Attempt::Transient(e) => {
                    retry_note(op_name, key, tries, self.config.max_attempts, &e);
                    std::thread::sleep(backoff(tries));
                }
            }
        }
    }

    /// Writes a probe object twice with `If-None-Match: *`: a server that
    /// honours it refuses the second. The probe is removed again.
    fn probe_conditional_put(&self) -> Result<bool, StorageError> {
        let key = format!("locks/cas-probe-{}", crate::format::random_hex(8));
        let path = self.raw_path(&key);
        let first = self.create_once(&path, b"probe", &key)?;
        if !first {
            // A random key that exists already: not our doing; call it unsafe.
            return Ok(false);
        }
        // Other bytes: a retried second write that finds an object must not
        // mistake the first one for its own.
        let second = self.create_once(&path, b"probe-2", &key)?;
        self.delete_object(&key, path)?;
        Ok(!second)
    }

    /// One conditional create with our retries; Ok(false) on 412/304.
    fn create_once(&self, path: &ObjPath, data: &[u8], key: &str) -> Result<bool, StorageError> {
        let payload = PutPayload::from(bytes_of(data));
        let store = self.store.clone();
        let path2 = path.clone();
        let res = self.with_retries(&self.counters.put, "put", key, move || {
            let (store, path, payload) = (store.clone(), path2.clone(), payload.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                classify(store.put_opts(&path, payload, opts).await.map(|_| ()))
            }
        });
        match res {
            Ok(()) => Ok(true),
            Err((object_store::Error::AlreadyExists { .. }, 1)) => Ok(false),
            Err((object_store::Error::AlreadyExists { .. }, _)) => {
                // An earlier try may have written it before its answer was
                // lost: ours if the stored bytes are ours.
                Ok(self.get(key).map(|v| v == data).unwrap_or(false))
            }
            Err((e, _)) => Err(to_storage_error("put", key, e)),
        }
    }

    fn delete_object(&self, key: &str, path: ObjPath) -> Result<(), StorageError> {
        let store = self.store.clone();
        let res = self.with_retries(&self.counters.delete, "delete", key, move || {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let one = futures_util::stream::once(async move { Ok(path) }).boxed();
                let r = match store.delete_stream(one).next().await {
                    Some(r) => r.map(|_| ()),
                    None => Ok(()),
                };
                classify(r)
            }
        });
        match res {
            Ok(()) | Err((object_store::Error::NotFound { .. }, _)) => Ok(()),
            Err((e, _)) => Err(to_storage_error("delete", key, e)),
        }
    }

    fn put_overwrite(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let payload = PutPayload::from(bytes_of(data));
        let store = self.store.clone();
        self.with_retries(&self.counters.put, "put", key, move || {
            let (store, path, payload) = (store.clone(), path.clone(), payload.clone());
            async move {
                let r = store.put_opts(&path, payload, PutOptions::default()).await;
                classify(r.map(|_| ()))
            }
        })
        .map_err(|(e, _)| to_storage_error("put", key, e))
    }
}

impl Drop for S3Storage {
    fn drop(&mut self) {
        // Dropping a runtime blocks; inside an async context that panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn bytes_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

/// Full jitter: a random wait up to the doubled backoff of this try.
fn backoff(tries: u32) -> Duration {
    let cap = BACKOFF_START
        .saturating_mul(1 << tries.min(10))
        .min(BACKOFF_MAX);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let frac = u32::from_le_bytes(r) as f64 / u32::MAX as f64;
    cap.mul_f64(0.5 + frac / 2.0)
}

fn retry_note(op: &str, key: &str, tries: u32, of: u32, e: &object_store::Error) {
    // The engine has no logger of its own; one line on stderr is what an
    // operator sees of a flaky link (no credentials: errors name URLs only).
    eprintln!("s3: {op} {key} failed (try {tries} of {of}), retrying: {e}");
}

/// Which errors another try may fix.
fn classify<T>(r: Result<T, object_store::Error>) -> Attempt<T> {
    use object_store::Error as E;
    match r {
        Ok(v) => Attempt::Done(v),
        Err(
            e @ (E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::InvalidPath { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }),
        ) => Attempt::Fatal(e),
        // Generic: transport errors, 5xx past object_store's own retries,
        // a body cut off. Another 4xx answer (bad request, bad range) is final.
        Err(e) => match http_status(&e) {
            Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => Attempt::Fatal(e),
            _ => Attempt::Transient(e),
        },
    }
}

/// The HTTP status an error carries, from its text anywhere in the chain
/// ("... non-2xx status code: 416 Range Not Satisfiable ...").
fn http_status(e: &object_store::Error) -> Option<u16> {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

fn to_storage_error(op: &'static str, key: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound(key.to_owned()),
        e => StorageError::Io {
            op,
            key: key.to_owned(),
            source: io::Error::other(e.to_string()),
        },
    }
}

impl Storage for S3Storage {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        let wrote = if self.atomic_create {
            self.create_once(&path, data, key)?
        } else {
            // The server would overwrite: look first (racy, see the module doc).
            if self.head(key)?.is_some() {
                return Ok(false);
            }
            self.put_overwrite(key, data)?;
            true
        };
        if wrote {
            super::crash_point();
        }
        Ok(wrote)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        self.put_overwrite(key, data)?;
        super::crash_point();
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        self.with_retries(&self.counters.get, "get", key, move || {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let r = match store.get_opts(&path, GetOptions::default()).await {
                    Ok(g) => g.bytes().await,
                    Err(e) => Err(e),
                };
                classify(r.map(|b| b.to_vec()))
            }
        })
        .map_err(|(e, _)| to_storage_error("get", key, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        if len == 0 {
            // S3 has no empty range; an existing object is all we must check.
            let meta = self
                .head(key)?
                .ok_or_else(|| StorageError::NotFound(key.to_owned()))?;
            if offset > meta.size {
                return Err(out_of_range(key, offset, len, meta.size));
            }
            return Ok(Vec::new());
        }
        let path = self.path(key)?;
        let store = self.store.clone();
        let res = self.with_retries(&self.counters.get, "get", key, move || {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let opts = GetOptions::new().with_range(Some(offset..offset + len));
                let r = match store.get_opts(&path, opts).await {
                    Ok(g) => g.bytes().await,
                    Err(e) => Err(e),
                };
                classify(r)
            }
        });
        match res {
            Ok(b) if b.len() as u64 == len => Ok(b.to_vec()),
            Ok(b) => Err(out_of_range(key, offset, len, offset + b.len() as u64)),
            Err((object_store::Error::NotFound { .. }, _)) => {
                Err(StorageError::NotFound(key.to_owned()))
            }
            Err((e, _)) => {
                // A range past the end answers 416 or a short body, which
                // object_store reports as a generic error: tell them apart.
                match self.head(key)? {
                    None => Err(StorageError::NotFound(key.to_owned())),
                    Some(m) if offset + len > m.size => Err(out_of_range(key, offset, len, m.size)),
                    Some(_) => Err(to_storage_error("get", key, e)),
                }
            }
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let res = self.with_retries(&self.counters.head, "head", key, move || {
            let (store, path) = (store.clone(), path.clone());
            async move {
                let opts = GetOptions::new().with_head(true);
                classify(store.get_opts(&path, opts).await.map(|g| g.meta))
            }
        });
        match res {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: m.size,
                modified: m.last_modified.into(),
            })),
            Err((object_store::Error::NotFound { .. }, _)) => Ok(None),
            Err((e, _)) => Err(to_storage_error("head", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        // object_store lists whole path segments: list the deepest
        // directory the prefix names fully and filter the rest here.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let base = if self.config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.prefix)
        };
        let list_from = match (self.config.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ObjPath::from(dir)),
            (false, true) => Some(ObjPath::from(self.config.prefix.as_str())),
            (false, false) => Some(ObjPath::from(format!("{base}{dir}"))),
        };
        let store = self.store.clone();
        let pages = AtomicU64::new(0);
        let res = self.with_retries(&pages, "list", prefix, move || {
            let (store, from) = (store.clone(), list_from.clone());
            async move { classify(store.list(from.as_ref()).try_collect::<Vec<_>>().await) }
        });
        // One LIST request per 1000 keys, plus the tries.
        let metas = res.map_err(|(e, _)| to_storage_error("list", prefix, e))?;
        let requests = pages.load(Ordering::Relaxed) + metas.len() as u64 / 1000;
        self.counters.list.fetch_add(requests, Ordering::Relaxed);
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&base)?.to_owned();
                key.starts_with(prefix).then(|| ObjectMeta {
                    key,
                    size: m.size,
                    modified: m.last_modified.into(),
                })
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.delete_object(key, self.path(key)?)?;
        super::crash_point();
        Ok(())
    }

    fn put_if_absent_is_atomic(&self) -> bool {
        self.atomic_create
    }

    fn describe(&self) -> String {
        format!(
            "{} (conditional writes {})",
            self.config.url(),
            if self.atomic_create {
                "honoured: GC lock and manifests use If-None-Match"
            } else {
                "ignored by the server: GC needs --exclusive from a bare-store command"
            }
        )
    }

    fn io_concurrency(&self) -> usize {
        IO_CONCURRENCY
    }

    fn request_counts(&self) -> Option<RequestCounts> {
        let c = &self.counters;
        Some(RequestCounts {
            put: c.put.load(Ordering::Relaxed),
            get: c.get.load(Ordering::Relaxed) + c.head.load(Ordering::Relaxed),
            list: c.list.load(Ordering::Relaxed),
            delete: c.delete.load(Ordering::Relaxed),
        })
    }
}

fn out_of_range(key: &str, offset: u64, len: u64, size: u64) -> StorageError {
    StorageError::OutOfRange {
        key: key.to_owned(),
        offset,
        len,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoreLocation;

    #[test]
    fn store_urls_parse_and_bad_ones_say_why() {
        // The only test in this crate that reads these variables.
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKID");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "s3cr3t");
        let c =
            S3Config::from_url("s3://my-bucket/a/b/", Some("http://h:1/"), Some("garage")).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(c.endpoint.as_deref(), Some("http://h:1"));
        assert_eq!(c.region, "garage");
        assert_eq!(c.url(), "s3://my-bucket/a/b");
        assert!(!format!("{c:?}").contains("s3cr3t") && !format!("{c:?}").contains("AKID"));
        let bare = S3Config::from_url("s3://bkt", None, None).unwrap();
        assert_eq!(bare.prefix, "");
        for (url, why) in [
            ("s3://ab/x", "bucket name"),
            ("s3://Upper/x", "bucket name"),
            ("s3://bkt/a//b", "prefix"),
            ("s3://bkt/a/../b", "prefix"),
        ] {
            let e = S3Config::from_url(url, None, None).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        assert!(matches!(
            StoreLocation::parse("/var/lib/store", None, None).unwrap(),
            StoreLocation::Local(_)
        ));
        let e = StoreLocation::parse("gs://bkt", None, None).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
