//! The service's settings. Layered by the binary: defaults, then the TOML
//! file (`<data_dir>/config.toml` or `--config`), then `VPSBACKUP_*`
//! environment variables, then flags. Every field is documented here, and
//! the TOML keys are the field names.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vpsbackup_engine::StoreKey;

/// Commands run around jobs. Placeholders: `{server_id}`, `{name}`,
/// `{hostname}`, `{backup_id}`, `{disks}` (space separated), each
/// shell-quoted. Run with `sh -c`; empty or absent means no hook.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HookCommands {
    /// Before a backup reads the disks, e.g. `virsh domfsfreeze {name}`.
    pub pre_backup: Option<String>,
    /// After a backup, whatever its outcome, e.g. `virsh domfsthaw {name}`.
    pub post_backup: Option<String>,
    /// Before a restore writes the disks, e.g. `virsh destroy {name}`.
    pub pre_restore: Option<String>,
    /// After a restore, whatever its outcome, e.g. `virsh start {name}`.
    pub post_restore: Option<String>,
}

// Hook commands may carry credentials (an API key in a curl line): never log them.
impl fmt::Debug for HookCommands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |h: &Option<String>| if h.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("HookCommands")
            .field("pre_backup", &show(&self.pre_backup))
            .field("post_backup", &show(&self.post_backup))
            .field("pre_restore", &show(&self.pre_restore))
            .field("post_restore", &show(&self.post_restore))
            .finish()
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the catalog (`catalog.db`) and the store (`store/`) live.
    pub data_dir: PathBuf,
    /// The catalog: `sqlite://PATH` or `postgres://USER:PASS@HOST/DB`
    /// (none: `sqlite://<data_dir>/catalog.db`). Env `VPSBACKUP_DATABASE_URL`,
    /// flag `--database-url`. Shown redacted in logs.
    pub database_url: Option<DatabaseUrl>,
    /// Address to listen on.
    pub listen: String,
    /// Jobs (backups and restores) run at once, host-wide. At most one per server.
    /// Also accepted as `max_concurrent_jobs` in the TOML file.
    #[serde(alias = "max_concurrent_jobs")]
    pub workers: usize,
    /// Largest request body accepted, bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Seconds a hook may run before it is killed and counted as failed.
    pub hook_timeout_secs: u64,
    /// Read bandwidth limit per backup job, MB/s (none: unlimited).
    pub read_limit_mb_per_s: Option<u64>,
    /// Scratch space a running server's backup may use for what the guest
    /// overwrites while its disks are read, MiB (none: a quarter of the
    /// server's disks, at least 1 GiB); never more than 90% of the free
    /// space where `<data_dir>/scratch` lives. Past it the backup stops
    /// (and is retried) rather than let the scratch filesystem fill.
    pub scratch_limit_mb: Option<u64>,
    /// Connections reading the catalog (listings scale with these): SQLite's
    /// reader connections, or PostgreSQL's listing connections. About two
    /// per core of the machine running the database; more only queue there.
    pub catalog_readers: u32,
    /// Global hooks; a server's own hooks override them one by one.
    pub hooks: HookCommands,
    /// Automatic backups, retries, expiry, GC and verification: the
    /// `[schedule]` table (see [`crate::scheduler::ScheduleSettings`]).
    pub schedule: crate::scheduler::ScheduleSettings,
    /// Per-token request limits: the `[rate_limit]` table.
    pub rate_limit: RateLimitSettings,
    /// Delivery of webhook events: the `[webhooks]` table (see
    /// [`crate::webhooks::WebhookSettings`]).
    pub webhooks: crate::webhooks::WebhookSettings,
    /// Health and metrics for the provider's monitoring: the `[metrics]` table.
    pub metrics: MetricsSettings,
    /// Where the backup store is: a directory, or `s3://BUCKET/PREFIX`
    /// (keys from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`). None:
    /// `<data_dir>/store`. Also `VPSBACKUP_STORE` and `--store`.
    pub store: Option<String>,
    /// The S3 server's `http(s)://host:port` (None: AWS). Also
    /// `VPSBACKUP_S3_ENDPOINT` and `--s3-endpoint`.
    pub s3_endpoint: Option<String>,
    /// The S3 signing region (Garage: its `s3_region`); default
    /// `AWS_REGION`, else us-east-1. Also `VPSBACKUP_S3_REGION` and `--s3-region`.
    pub s3_region: Option<String>,
    /// Key file of an encrypted store (`vpsbackup store init --key-file`).
    /// Without one, an encrypted store is opened with the passphrase in the
    /// VPSBACKUP_PASSPHRASE environment variable (never in this file). A
    /// new, empty store is created encrypted when either is set.
    pub store_key_file: Option<PathBuf>,
    /// The hypervisor node this process's workers run jobs for: only jobs
    /// of servers on it are claimed. `vpsbackup serve` and `agent` set it
    /// (`--node`, default the hostname); `None` (embedding, tests): every
    /// server's jobs.
    pub node: Option<String>,
    /// This node's on-disk chunk index cache (one subdirectory per store):
    /// backups and restores look chunks up there instead of loading the
    /// store's whole index into memory. Default `<data_dir>/index-cache`;
    /// losing it costs one rebuild from the store.
    pub index_cache_dir: Option<PathBuf>,
}

/// Where the operational endpoints (`/healthz`, `/readyz`, `/metrics`)
/// answer besides the API listener.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// A second listener for them alone, with `/metrics` open, e.g.
    /// `10.0.0.5:9187` on the provider's monitoring network (`serve
    /// --metrics-listen`). None: only the API listener.
    pub listen: Option<String>,
    /// `/metrics` on the public API listener: off unless this is set, and
    /// then only for `Authorization: Bearer <token>` (env
    /// `VPSBACKUP_METRICS_TOKEN`). `/healthz` and `/readyz` are always there.
    pub token: Option<String>,
}

// The token guards the figures: never log it.
impl fmt::Debug for MetricsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A database URL as given; its password never reaches a log.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&vpsbackup_catalog::redact(&self.0))
    }
}

impl Settings {
    /// The catalog's location: `database_url`, else the data dir's file.
    pub fn catalog_url(
        &self,
    ) -> Result<vpsbackup_catalog::CatalogUrl, vpsbackup_catalog::CatalogError> {
        match &self.database_url {
            Some(url) => vpsbackup_catalog::CatalogUrl::parse(&url.0),
            None => Ok(vpsbackup_catalog::CatalogUrl::in_data_dir(&self.data_dir)),
        }
    }
}

/// Token buckets per caller (per API token; per peer IP for requests
/// without a valid token), one for reads and one for writes. A bucket holds
/// `*_burst` requests and refills at `*_per_second`; an empty bucket
/// answers 429 with `Retry-After`. Rates and bursts below 1 count as 1.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Off: no limit and no `RateLimit-*` headers.
    pub enabled: bool,
    /// Sustained GET/HEAD/OPTIONS requests per second per caller.
    pub read_per_second: u32,
    /// GET/HEAD/OPTIONS requests a caller may make at once (bucket size).
    pub read_burst: u32,
    /// Sustained POST/DELETE (any other method) requests per second per caller.
    pub write_per_second: u32,
    /// POST/DELETE requests a caller may make at once (bucket size).
    pub write_burst: u32,
    /// Admin tokens (the operator's own tooling) are not limited.
    pub exempt_admin: bool,
    /// Callers tracked at once; beyond it idle buckets are evicted, and
    /// callers that still do not fit share one bucket per class.
    pub max_tracked: usize,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        // Reads: above what one host serves (the API benchmark drives
        // ~10,000 req/s with one token), so only a runaway loop on a big
        // host meets it. Writes start backups and restores: tighter, yet a
        // panel creating a backup for each of 400 servers in one go fits.
        RateLimitSettings {
            enabled: true,
            read_per_second: 20_000,
            read_burst: 40_000,
            write_per_second: 50,
            write_burst: 500,
            exempt_admin: true,
            max_tracked: 100_000,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./vpsbackup-data"),
            database_url: None,
            listen: "127.0.0.1:8080".into(),
            workers: 2,
            max_body_bytes: 64 * 1024,
            hook_timeout_secs: 300,
            read_limit_mb_per_s: None,
            scratch_limit_mb: None,
            catalog_readers: 4,
            hooks: HookCommands::default(),
            schedule: crate::scheduler::ScheduleSettings::default(),
            rate_limit: RateLimitSettings::default(),
            webhooks: crate::webhooks::WebhookSettings::default(),
            metrics: MetricsSettings::default(),
            store: None,
            s3_endpoint: None,
            s3_region: None,
            store_key_file: None,
            node: None,
            index_cache_dir: None,
        }
    }
}

/// A settings file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Settings {
    /// Defaults overlaid with the TOML file at `path`. A missing file is
    /// fine when `required` is false (the default `<data_dir>/config.toml`).
    pub fn from_file(path: &Path, required: bool) -> Result<Settings, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|source| SettingsError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Settings::default())
            }
            Err(source) => Err(SettingsError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The catalog database file.
    pub fn catalog_path(&self) -> PathBuf {
        self.data_dir.join("catalog.db")
    }

    /// The engine's store directory when the store is local and not moved
    /// elsewhere by `store`.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Where the store is: `store` when set, else `<data_dir>/store`.
    pub fn store_location(
        &self,
    ) -> Result<vpsbackup_engine::StoreLocation, vpsbackup_engine::StorageError> {
        match &self.store {
            Some(spec) => vpsbackup_engine::StoreLocation::parse(
                spec,
                self.s3_endpoint.as_deref(),
                self.s3_region.as_deref(),
            ),
            None => Ok(vpsbackup_engine::StoreLocation::Local(self.store_path())),
        }
    }

    /// Opens the store with GC kept exclusive through the data dir's
    /// `gc.lock` where the store's server cannot (every GC of this data
    /// dir, serve's and the admin commands', takes it). Blocking: S3 is
    /// contacted here.
    pub fn open_store(
        &self,
    ) -> Result<vpsbackup_engine::Repository, vpsbackup_engine::EngineError> {
        let repo = vpsbackup_engine::Repository::open_location_keyed(
            &self.store_location()?,
            &self.store_key(),
        )?;
        let options = vpsbackup_engine::EngineOptions {
            gc_exclusion: vpsbackup_engine::GcExclusion::HostLock(self.data_dir.join("gc.lock")),
            index_cache: Some(
                self.index_cache_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("index-cache")),
            ),
            ..repo.options().clone()
        };
        Ok(repo.with_options(options))
    }

    /// What unlocks the store: `store_key_file`, else the passphrase in
    /// VPSBACKUP_PASSPHRASE, else nothing (an unencrypted store).
    pub fn store_key(&self) -> StoreKey {
        match &self.store_key_file {
            Some(path) => StoreKey::KeyFile(path.clone()),
            None => passphrase_from_env(),
        }
    }
}

/// The passphrase in VPSBACKUP_PASSPHRASE, if set and not empty.
pub fn passphrase_from_env() -> StoreKey {
    match std::env::var("VPSBACKUP_PASSPHRASE") {
        Ok(p) if !p.is_empty() => StoreKey::Passphrase(p),
        _ => StoreKey::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_unknown_keys_fail() {
        let s: Settings =
            toml::from_str("workers = 4\n[hooks]\npre_backup = \"virsh domfsfreeze {name}\"\n")
                .unwrap();
        assert_eq!(s.workers, 4);
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert!(s.hooks.pre_backup.is_some());
        assert!(!format!("{s:?}").contains("virsh"), "hooks are redacted");
        assert!(toml::from_str::<Settings>("wrkers = 4").is_err());
        let s: Settings =
            toml::from_str("[rate_limit]\nwrite_per_second = 2\nwrite_burst = 5\n").unwrap();
        assert_eq!(
            (s.rate_limit.write_per_second, s.rate_limit.write_burst),
            (2, 5)
        );
        assert_eq!(
            s.rate_limit.read_burst,
            RateLimitSettings::default().read_burst
        );
    }
}
