//! Admin commands on the catalog of a data dir: accounts, tokens, plans,
//! servers. They open the same SQLite file `serve` uses; WAL and
//! `BEGIN IMMEDIATE` let both write safely at the same time.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use time::OffsetDateTime;
use vpsbackup_catalog::{
    AnyCatalog, HookUpdate, Hooks, ImageFormat, NewPlan, NewServer, NewToken, PageRequest,
    PlanUpdate, Scope, ServerDisk, ServerId, ServerRuntime, ServerUpdate, TokenId, TokenOwner,
    TokenRef, DEFAULT_WINDOW_MINUTES, DEFAULT_WINDOW_START_MINUTE,
};
use vpsbackup_service::auth::{generate_token, hash_token, TOKEN_PREFIX};
use vpsbackup_service::clock::rfc3339;
use vpsbackup_service::{Clock, Settings, SystemClock};

/// Flags every command shares.
pub struct Global {
    pub data_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// `--store` / `VPSBACKUP_STORE`, `--s3-endpoint`, `--s3-region`: over the file.
    pub store: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// `--database-url`: the catalog, when not the data dir's SQLite file.
    pub database_url: Option<String>,
    /// `--key-file`: unlocks an encrypted store (wins over config.toml).
    pub key_file: Option<PathBuf>,
}

/// The store's address for messages (never credentials).
pub fn store_name(settings: &Settings) -> String {
    match settings.store_location() {
        Ok(l) => l.to_string(),
        Err(_) => settings.store.clone().unwrap_or_default(),
    }
}

/// Defaults, then the TOML file, then env/flags (`--data-dir` wins over the file).
pub fn load_settings(global: &Global) -> anyhow::Result<Settings> {
    let default_dir = Settings::default().data_dir;
    let dir = global.data_dir.clone().unwrap_or(default_dir);
    let mut settings = match &global.config {
        Some(path) => Settings::from_file(path, true)?,
        None => Settings::from_file(&dir.join("config.toml"), false)?,
    };
    if global.data_dir.is_some() || global.config.is_none() {
        settings.data_dir = dir;
    }
    if global.store.is_some() {
        settings.store = global.store.clone();
    }
    if global.s3_endpoint.is_some() {
        settings.s3_endpoint = global.s3_endpoint.clone();
    }
    if global.s3_region.is_some() {
        settings.s3_region = global.s3_region.clone();
    }
    if let Some(url) = &global.database_url {
        settings.database_url = Some(vpsbackup_service::DatabaseUrl(url.clone()));
    }
    if let Some(k) = &global.key_file {
        settings.store_key_file = Some(k.clone());
    }
    if let Ok(v) = std::env::var("VPSBACKUP_HOOK_TIMEOUT_SECS") {
        settings.hook_timeout_secs = v.parse().context("VPSBACKUP_HOOK_TIMEOUT_SECS")?;
    }
    Ok(settings)
}

pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

async fn open(global: &Global) -> anyhow::Result<AnyCatalog> {
    let settings = load_settings(global)?;
    Ok(vpsbackup_service::connect_catalog(&settings, 1).await?)
}

fn now() -> OffsetDateTime {
    SystemClock.now()
}

/// "03:00" -> 180.
fn parse_hhmm(s: &str) -> anyhow::Result<u32> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("{s:?} is not a time; write HH:MM (UTC), e.g. 03:00"))?;
    let (h, m): (u32, u32) = (h.parse()?, m.parse()?);
    if h > 23 || m > 59 {
        bail!("{s:?} is not a time of day; write HH:MM between 00:00 and 23:59");
    }
    Ok(h * 60 + m)
}

fn hhmm(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Create a customer account.
    Create { name: String },
    /// List accounts (with their webhook URLs).
    List,
    /// Set or remove an account's webhook: backup and restore outcomes are
    /// POSTed to it, signed with the secret (HMAC-SHA256).
    Set {
        name: String,
        /// The http(s) URL events are POSTed to.
        #[arg(long, conflicts_with = "no_webhook")]
        webhook_url: Option<String>,
        /// The signing secret; generated and printed once when not given.
        #[arg(long, requires = "webhook_url")]
        webhook_secret: Option<String>,
        /// Remove the webhook (pending events are dropped).
        #[arg(long)]
        no_webhook: bool,
    },
}

pub async fn account(global: Global, cmd: AccountCommand) -> anyhow::Result<()> {
    let cat = open(&global).await?;
    match cmd {
        AccountCommand::Create { name } => {
            if name.trim().is_empty() {
                bail!("an account name cannot be empty");
            }
            let a = cat.create_account(name.trim(), now()).await?;
            println!("Created account {:?} (id {}).", a.name, a.id);
        }
        AccountCommand::List => {
            println!("{:>5}  {:<30}  {:<20}  webhook", "id", "name", "created");
            for a in cat.list_accounts().await? {
                println!(
                    "{:>5}  {:<30}  {:<20}  {}",
                    a.id,
                    a.name,
                    rfc3339(a.created_at),
                    a.webhook_url.as_deref().unwrap_or("-")
                );
            }
        }
        AccountCommand::Set {
            name,
            webhook_url,
            webhook_secret,
            no_webhook,
        } => match (webhook_url, no_webhook) {
            (Some(url), _) => {
                let url = vpsbackup_service::webhooks::parse_webhook_url(&url)
                    .map_err(|e| anyhow!("--webhook-url {url:?}: {e}"))?;
                let generated = webhook_secret.is_none();
                let secret = match webhook_secret {
                    Some(s) if s.trim().is_empty() => bail!("--webhook-secret cannot be empty"),
                    Some(s) => s,
                    None => vpsbackup_service::webhooks::generate_secret()
                        .map_err(|e| anyhow!("cannot generate a secret: {e}"))?,
                };
                let webhook = vpsbackup_catalog::Webhook {
                    url,
                    secret: secret.clone(),
                };
                let a = cat.set_account_webhook(&name, Some(webhook)).await?;
                println!(
                    "Account {:?} sends its events to {}.",
                    a.name,
                    a.webhook_url.as_deref().unwrap_or_default()
                );
                if generated {
                    println!("Signing secret (shown once; give it to the customer):");
                    println!("{secret}");
                }
            }
            (None, true) => {
                let a = cat.set_account_webhook(&name, None).await?;
                println!("Account {:?} has no webhook now.", a.name);
            }
            (None, false) => bail!("give --webhook-url URL or --no-webhook"),
        },
    }
    cat.close().await;
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for an account (or an admin token); printed once, as the last line.
    Create {
        /// The account the token acts for.
        #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
        account: Option<String>,
        /// An admin token: sees and acts on every account.
        #[arg(long)]
        admin: bool,
        /// A label to tell tokens apart.
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (prefix, owner, state); never the secrets.
    List,
    /// Revoke a token, given the token itself or its id from `token list`.
    Revoke {
        /// The token (vps_...).
        token: Option<String>,
        #[arg(long, conflicts_with = "token", required_unless_present = "token")]
        id: Option<i64>,
    },
}

pub async fn token(global: Global, cmd: TokenCommand) -> anyhow::Result<()> {
    let cat = open(&global).await?;
    match cmd {
        TokenCommand::Create {
            account,
            admin,
            name,
        } => {
            let owner = match (admin, account) {
                (true, _) => TokenOwner::Admin,
                (false, Some(name)) => {
                    let a = cat
                        .account_by_name(&name)
                        .await?
                        .ok_or_else(|| anyhow!("no account named {name:?}; create it with `vpsbackup account create {name}`"))?;
                    TokenOwner::Account(a.id)
                }
                (false, None) => bail!("give --account NAME or --admin"),
            };
            let generated = generate_token().map_err(|e| anyhow!("cannot make a token: {e}"))?;
            let label = name.unwrap_or_else(|| {
                if admin {
                    "admin".into()
                } else {
                    "default".into()
                }
            });
            let t = cat
                .create_token(
                    NewToken {
                        hash: generated.hash,
                        prefix: generated.prefix,
                        name: label,
                        owner,
                    },
                    now(),
                )
                .await?;
            let whom = match &t.account_name {
                Some(a) => format!("account {a:?}"),
                None => "admin".into(),
            };
            println!(
                "Created token {} ({:?}) for {whom}. It is shown only now:",
                t.id, t.name
            );
            println!("{}", generated.secret);
        }
        TokenCommand::List => {
            println!(
                "{:>5}  {:<10}  {:<20}  {:<20}  {:<20}  state",
                "id", "prefix", "name", "owner", "created"
            );
            for t in cat.list_tokens().await? {
                let owner = t.account_name.clone().unwrap_or_else(|| "(admin)".into());
                let state = match t.revoked_at {
                    Some(r) => format!("revoked {}", rfc3339(r)),
                    None => "active".into(),
                };
                println!(
                    "{:>5}  {:<10}  {:<20}  {:<20}  {:<20}  {state}",
                    t.id,
                    t.prefix,
                    t.name,
                    owner,
                    rfc3339(t.created_at)
                );
            }
        }
        TokenCommand::Revoke { token, id } => {
            let which = match (token, id) {
                (_, Some(id)) => TokenRef::Id(TokenId(id)),
                (Some(t), None) => {
                    if !t.starts_with(TOKEN_PREFIX) {
                        bail!("{t:?} is not a token (they start with {TOKEN_PREFIX}); or pass --id N from `token list`");
                    }
                    TokenRef::Hash(hash_token(&t))
                }
                (None, None) => bail!("give the token or --id N"),
            };
            if !cat.revoke_token(which, now()).await? {
                bail!("no active token matches; see `vpsbackup token list`");
            }
            println!("Token revoked.");
        }
    }
    cat.close().await;
    Ok(())
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Create a plan.
    Create {
        name: String,
        /// Days automatic backups are kept (7..30).
        #[arg(long)]
        retention_days: u32,
        /// Start of the daily backup window, HH:MM UTC [default: 03:00].
        #[arg(long)]
        window_start: Option<String>,
        /// Length of the window in minutes [default: 120].
        #[arg(long)]
        window_minutes: Option<u32>,
    },
    /// Change a plan; a new retention also moves existing automatic backups' expiry.
    #[command(alias = "update")]
    Set {
        name: String,
        #[arg(long)]
        retention_days: Option<u32>,
        #[arg(long)]
        window_start: Option<String>,
        #[arg(long)]
        window_minutes: Option<u32>,
    },
    /// List plans.
    List,
}

pub async fn plan(global: Global, cmd: PlanCommand) -> anyhow::Result<()> {
    let cat = open(&global).await?;
    match cmd {
        PlanCommand::Create {
            name,
            retention_days,
            window_start,
            window_minutes,
        } => {
            let p = cat
                .create_plan(
                    NewPlan {
                        name,
                        retention_days,
                        window_start_minute: window_start
                            .as_deref()
                            .map(parse_hhmm)
                            .transpose()?
                            .unwrap_or(DEFAULT_WINDOW_START_MINUTE),
                        window_minutes: window_minutes.unwrap_or(DEFAULT_WINDOW_MINUTES),
                    },
                    now(),
                )
                .await?;
            println!(
                "Created plan {:?}: {} days, window {} UTC for {} min.",
                p.name,
                p.retention_days,
                hhmm(p.window_start_minute),
                p.window_minutes
            );
        }
        PlanCommand::Set {
            name,
            retention_days,
            window_start,
            window_minutes,
        } => {
            if retention_days.is_none() && window_start.is_none() && window_minutes.is_none() {
                bail!(
                    "nothing to change: give --retention-days, --window-start or --window-minutes"
                );
            }
            let p = cat
                .update_plan(
                    &name,
                    PlanUpdate {
                        retention_days,
                        window_start_minute: window_start.as_deref().map(parse_hhmm).transpose()?,
                        window_minutes,
                    },
                    now(),
                )
                .await?;
            println!(
                "Plan {:?}: {} days, window {} UTC for {} min.",
                p.name,
                p.retention_days,
                hhmm(p.window_start_minute),
                p.window_minutes
            );
        }
        PlanCommand::List => {
            println!("{:>5}  {:<20}  {:>9}  window", "id", "name", "retention");
            for p in cat.list_plans().await? {
                println!(
                    "{:>5}  {:<20}  {:>6} d  {} UTC, {} min",
                    p.id,
                    p.name,
                    p.retention_days,
                    hhmm(p.window_start_minute),
                    p.window_minutes
                );
            }
        }
    }
    cat.close().await;
    Ok(())
}

#[derive(Args)]
pub struct HookArgs {
    /// Command before a backup (placeholders {server_id} {name} {hostname} {backup_id} {disks}); "" disables the global one.
    #[arg(long)]
    pre_backup: Option<String>,
    /// Command after a backup, whatever its outcome.
    #[arg(long)]
    post_backup: Option<String>,
    /// Command before a restore.
    #[arg(long)]
    pre_restore: Option<String>,
    /// Command after a restore, whatever its outcome.
    #[arg(long)]
    post_restore: Option<String>,
}

/// `server set`'s hook flags: each changes only the hook it names.
#[derive(Args)]
pub struct HookSetArgs {
    #[command(flatten)]
    hooks: HookArgs,
    /// Forget this server's own hook so the global one (config file) applies
    /// again; repeat for more. To run no hook at all, give it as "" instead
    /// (e.g. --post-restore "").
    #[arg(long = "reset-hook", value_enum)]
    reset: Vec<HookName>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HookName {
    PreBackup,
    PostBackup,
    PreRestore,
    PostRestore,
}

impl HookSetArgs {
    /// The change, refusing a hook both set and reset.
    fn into_update(self) -> anyhow::Result<HookUpdate> {
        let h = self.hooks;
        let pick = |given: Option<String>, name: HookName, flag: &str| {
            let reset = self.reset.contains(&name);
            match (given, reset) {
                (Some(_), true) => Err(anyhow!(
                    "--{flag} cannot be used with --reset-hook {flag}: set it or reset it"
                )),
                (Some(cmd), false) => Ok(Some(Some(cmd))),
                (None, true) => Ok(Some(None)),
                (None, false) => Ok(None),
            }
        };
        Ok(HookUpdate {
            pre_backup: pick(h.pre_backup, HookName::PreBackup, "pre-backup")?,
            post_backup: pick(h.post_backup, HookName::PostBackup, "post-backup")?,
            pre_restore: pick(h.pre_restore, HookName::PreRestore, "pre-restore")?,
            post_restore: pick(h.post_restore, HookName::PostRestore, "post-restore")?,
        })
    }
}

/// A server's own hooks, one per line, for the operator.
fn hooks_text(h: &Hooks) -> String {
    let one = |name: &str, v: &Option<String>| match v.as_deref() {
        None => format!("  {name}: (the global hook, if any)"),
        Some(c) if c.trim().is_empty() => format!("  {name}: (none)"),
        Some(c) => format!("  {name}: {c}"),
    };
    [
        one("pre_backup", &h.pre_backup),
        one("post_backup", &h.post_backup),
        one("pre_restore", &h.pre_restore),
        one("post_restore", &h.post_restore),
    ]
    .join("\n")
}

impl HookArgs {
    fn into_hooks(self) -> Hooks {
        Hooks {
            pre_backup: self.pre_backup,
            post_backup: self.post_backup,
            pre_restore: self.pre_restore,
            post_restore: self.post_restore,
        }
    }
}

#[derive(Args)]
pub struct RuntimeArgs {
    /// How the server runs: offline (its images are read from the host;
    /// refused while a running QEMU holds them), qemu (a point in time is
    /// taken through --qmp-socket while it runs) or libvirt (through
    /// libvirtd, --domain) [add's default: offline].
    #[arg(long, value_parser = ["offline", "qemu", "libvirt"])]
    runtime: Option<String>,
    /// The QEMU's QMP socket (unix), for --runtime qemu.
    #[arg(long)]
    qmp_socket: Option<PathBuf>,
    /// The libvirt domain, for --runtime libvirt [default: the server's name].
    #[arg(long)]
    domain: Option<String>,
    /// The host end of the QEMU guest agent's channel (a unix socket), for
    /// --runtime qemu: the guest's filesystems are frozen for the instant
    /// of each backup's point in time ("" removes it).
    #[arg(long)]
    guest_agent: Option<PathBuf>,
}

impl RuntimeArgs {
    fn any(&self) -> bool {
        self.runtime.is_some()
            || self.qmp_socket.is_some()
            || self.domain.is_some()
            || self.guest_agent.is_some()
    }

    /// The runtime these flags describe, `None` when none was given.
    /// `--qmp-socket` alone means qemu and `--domain` alone libvirt, so a
    /// socket or domain can be changed without repeating `--runtime`;
    /// `current` supplies what is kept when only the kind is given again.
    fn resolve(
        self,
        server_name: &str,
        current: Option<&ServerRuntime>,
    ) -> anyhow::Result<Option<ServerRuntime>> {
        if !self.any() {
            return Ok(None);
        }
        if self.qmp_socket.is_some() && self.domain.is_some() {
            bail!("give --qmp-socket (runtime qemu) or --domain (runtime libvirt), not both");
        }
        let kind = match (&self.runtime, &self.qmp_socket, &self.domain) {
            (Some(k), _, _) => k.as_str(),
            (None, Some(_), _) => "qemu",
            (None, None, Some(_)) => "libvirt",
            (None, None, None) => "qemu",
        };
        if kind != "qemu" && self.guest_agent.is_some() {
            bail!("--guest-agent is for --runtime qemu");
        }
        Ok(Some(match kind {
            "offline" => {
                if self.qmp_socket.is_some() || self.domain.is_some() {
                    bail!("an offline server has no --qmp-socket or --domain");
                }
                ServerRuntime::Offline
            }
            "qemu" => {
                if self.domain.is_some() {
                    bail!("--domain is for --runtime libvirt; a qemu server takes --qmp-socket");
                }
                let qmp_socket =
                    match (self.qmp_socket, current.and_then(ServerRuntime::qmp_socket)) {
                        (Some(p), _) => std::path::absolute(&p)
                            .with_context(|| format!("QMP socket {}", p.display()))?
                            .to_string_lossy()
                            .into_owned(),
                        (None, Some(kept)) => kept.to_owned(),
                        (None, None) => bail!("--runtime qemu needs --qmp-socket PATH"),
                    };
                let guest_agent = match (
                    self.guest_agent,
                    current.and_then(ServerRuntime::guest_agent),
                ) {
                    (Some(p), _) if p.as_os_str().is_empty() => None,
                    (Some(p), _) => Some(
                        std::path::absolute(&p)
                            .with_context(|| format!("guest agent socket {}", p.display()))?
                            .to_string_lossy()
                            .into_owned(),
                    ),
                    (None, kept) => kept.map(str::to_owned),
                };
                ServerRuntime::Qemu {
                    qmp_socket,
                    guest_agent,
                }
            }
            _ => {
                if self.qmp_socket.is_some() {
                    bail!("--qmp-socket is for --runtime qemu; a libvirt server takes --domain");
                }
                let domain = match (self.domain, current.and_then(ServerRuntime::domain)) {
                    (Some(d), _) if d.trim().is_empty() => bail!("--domain cannot be empty"),
                    (Some(d), _) => d,
                    (None, Some(kept)) => kept.to_owned(),
                    (None, None) => server_name.to_owned(),
                };
                ServerRuntime::Libvirt { domain }
            }
        }))
    }
}

#[derive(Subcommand)]
pub enum ServerCommand {
    /// Register a server and its disk images.
    Add {
        /// The hosting provider's own server id (a positive integer).
        #[arg(long)]
        id: i64,
        #[arg(long)]
        name: String,
        /// The owning account's name.
        #[arg(long)]
        account: String,
        /// A disk image or block device; repeat for more disks, in order.
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
        /// Each disk's format: once for every disk, or once per --disk in
        /// order [default: detected now, while the image is the provider's].
        /// It is recorded and never probed again: a guest can write a qcow2
        /// header at the start of its raw disk.
        #[arg(long = "disk-format", value_parser = ["raw", "qcow2", "block"])]
        disk_formats: Vec<String>,
        /// Plan name [default: standard].
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// The hypervisor node holding its disks: only that node's `serve`
        /// or `agent` runs its jobs [default: this machine's hostname]. For
        /// another node, give --disk-format: the disks are not here to check.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        hooks: HookArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// List servers.
    List {
        /// Only this account's servers.
        #[arg(long)]
        account: Option<String>,
    },
    /// Change a server: plan, automatic backups, window, hooks (each hook
    /// flag changes only that hook; the others stay).
    Set {
        id: i64,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// Automatic daily backups: on or off.
        #[arg(long, value_parser = ["on", "off"])]
        auto_backup: Option<String>,
        /// Move the server's backup window start (HH:MM UTC), or "plan" for the plan's.
        #[arg(long)]
        window_start: Option<String>,
        /// Record the disks' formats: once for every disk, or once per disk
        /// in order (e.g. to confirm one detected for a disk added before
        /// formats were recorded; see `server list`).
        #[arg(long = "disk-format", value_parser = ["raw", "qcow2", "block"])]
        disk_formats: Vec<String>,
        /// Move the server to another node (its disks must be there).
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        hooks: HookSetArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Remove a server. Refused while it has backups unless --purge.
    Remove {
        id: i64,
        /// Also delete its backups (catalog rows and stored data).
        #[arg(long)]
        purge: bool,
    },
}

pub async fn server(global: Global, cmd: ServerCommand) -> anyhow::Result<()> {
    let settings = load_settings(&global)?;
    let cat = vpsbackup_service::connect_catalog(&settings, 1).await?;
    match cmd {
        ServerCommand::Add {
            id,
            name,
            account,
            disks,
            disk_formats,
            plan,
            hostname,
            node,
            hooks,
            runtime,
        } => {
            check_disk_format_count(disks.len(), disk_formats.len())?;
            let here = vpsbackup_service::metrics::node_name();
            let node = check_node_name(node.unwrap_or_else(|| here.clone()))?;
            let runtime = runtime.resolve(&name, None)?.unwrap_or_default();
            let acc = cat
                .account_by_name(&account)
                .await?
                .ok_or_else(|| anyhow!("no account named {account:?}; create it with `vpsbackup account create {account}`"))?;
            let plan_name = plan.unwrap_or_else(|| "standard".into());
            let plan = cat
                .plan_by_name(&plan_name)
                .await?
                .ok_or_else(|| anyhow!("no plan named {plan_name:?}; see `vpsbackup plan list`"))?;
            let mut server_disks = Vec::new();
            for (i, d) in disks.iter().enumerate() {
                let abs =
                    std::path::absolute(d).with_context(|| format!("disk {}", d.display()))?;
                let explicit = disk_formats.get(i).or(disk_formats.first());
                // A disk on another node is not here to check: its format
                // must be given.
                let remote = node != here && !abs.exists();
                if remote {
                    let Some(name) = explicit else {
                        bail!(
                            "disk {} is not on this machine; for a server on node {node:?} give --disk-format",
                            abs.display()
                        );
                    };
                    let format = ImageFormat::parse(name)
                        .ok_or_else(|| anyhow!("unknown disk format {name:?}"))?;
                    server_disks.push(ServerDisk::new(abs.to_string_lossy(), format));
                    continue;
                }
                if !abs.exists() {
                    bail!("disk {} does not exist", abs.display());
                }
                let format = disk_format(&abs, explicit.map(String::as_str))?;
                server_disks.push(ServerDisk::new(abs.to_string_lossy(), format));
            }
            let s = cat
                .add_server(
                    NewServer {
                        id: ServerId(id),
                        name,
                        hostname: hostname.unwrap_or_default(),
                        account_id: acc.id,
                        plan_id: plan.id,
                        disks: server_disks,
                        hooks: hooks.into_hooks(),
                        runtime,
                        node: Some(node),
                    },
                    now(),
                )
                .await?;
            println!(
                "Added server {} {:?} for account {:?}, plan {:?}, runtime {}, node {}, disk(s): {}.",
                s.id,
                s.name,
                s.account_name,
                s.plan.name,
                s.runtime,
                s.node.as_deref().unwrap_or("-"),
                disks_text(&s.disks)
            );
        }
        ServerCommand::List { account } => {
            let scope = match account {
                Some(name) => Scope::Account(
                    cat.account_by_name(&name)
                        .await?
                        .ok_or_else(|| anyhow!("no account named {name:?}"))?
                        .id,
                ),
                None => Scope::All,
            };
            let page = cat
                .list_servers(
                    scope,
                    PageRequest {
                        number: 1,
                        size: u32::MAX,
                    },
                )
                .await?;
            println!(
                "{:>10}  {:<20}  {:<15}  {:<10}  {:<10}  {:<5}  {:<6}  {:<8}  {:<12}  disks",
                "id", "name", "account", "plan", "status", "auto", "window", "runtime", "node"
            );
            for s in page.items {
                println!(
                    "{:>10}  {:<20}  {:<15}  {:<10}  {:<10}  {:<5}  {:<6}  {:<8}  {:<12}  {}",
                    s.id,
                    s.name,
                    s.account_name,
                    s.plan.name,
                    s.status.as_str(),
                    if s.auto_backup_enabled { "on" } else { "off" },
                    hhmm(s.window_start_minute.unwrap_or(s.plan.window_start_minute)),
                    s.runtime.kind(),
                    s.node.as_deref().unwrap_or("-"),
                    disks_text(&s.disks)
                );
                match &s.runtime {
                    ServerRuntime::Offline => {}
                    ServerRuntime::Qemu {
                        qmp_socket,
                        guest_agent,
                    } => {
                        println!("{:>10}  QMP socket {qmp_socket}", "");
                        if let Some(agent) = guest_agent {
                            println!("{:>10}  guest agent {agent}", "");
                        }
                    }
                    ServerRuntime::Libvirt { domain } => {
                        println!("{:>10}  libvirt domain {domain}", "")
                    }
                }
            }
        }
        ServerCommand::Set {
            id,
            plan,
            name,
            hostname,
            auto_backup,
            window_start,
            disk_formats,
            node,
            hooks,
            runtime,
        } => {
            let node = node.map(check_node_name).transpose()?;
            let runtime = if runtime.any() {
                let current = cat
                    .server(ServerId(id), Scope::All)
                    .await?
                    .ok_or_else(|| anyhow!("server {id} not found"))?;
                let name = name.as_deref().unwrap_or(&current.name);
                runtime.resolve(name, Some(&current.runtime))?
            } else {
                None
            };
            let disks = if disk_formats.is_empty() {
                None
            } else {
                let current = cat
                    .server(ServerId(id), Scope::All)
                    .await?
                    .ok_or_else(|| anyhow!("server {id} not found"))?;
                if !(disk_formats.len() == 1 || disk_formats.len() == current.disks.len()) {
                    bail!(
                        "give --disk-format once for every disk or once per disk ({} disk(s), {} format(s))",
                        current.disks.len(),
                        disk_formats.len()
                    );
                }
                let mut disks = Vec::new();
                for (i, d) in current.disks.iter().enumerate() {
                    let given = disk_formats.get(i).or(disk_formats.first());
                    let format =
                        disk_format(std::path::Path::new(&d.path), given.map(String::as_str))?;
                    disks.push(ServerDisk::new(d.path.clone(), format));
                }
                Some(disks)
            };
            let plan_id = match plan {
                Some(p) => Some(
                    cat.plan_by_name(&p)
                        .await?
                        .ok_or_else(|| anyhow!("no plan named {p:?}"))?
                        .id,
                ),
                None => None,
            };
            let window_start_minute = match window_start.as_deref() {
                None => None,
                Some("plan") | Some("default") => Some(None),
                Some(t) => Some(Some(parse_hhmm(t)?)),
            };
            let update = ServerUpdate {
                name,
                hostname,
                plan_id,
                disks,
                auto_backup_enabled: auto_backup.map(|v| v == "on"),
                window_start_minute,
                hooks: hooks.into_update()?,
                runtime,
                node,
            };
            if update == ServerUpdate::default() {
                bail!("nothing to change; see `vpsbackup server set --help`");
            }
            let s = cat.update_server(ServerId(id), update, now()).await?;
            println!(
                "Server {} {:?}: plan {:?}, automatic backups {}, window {} UTC, runtime {}, node {}, disk(s): {}.",
                s.id,
                s.name,
                s.plan.name,
                if s.auto_backup_enabled { "on" } else { "off" },
                hhmm(s.window_start_minute.unwrap_or(s.plan.window_start_minute)),
                s.runtime,
                s.node.as_deref().unwrap_or("-"),
                disks_text(&s.disks)
            );
            println!("Hooks:\n{}", hooks_text(&s.hooks));
        }
        ServerCommand::Remove { id, purge } => {
            let removed = cat.remove_server(ServerId(id), purge).await?;
            if !removed.is_empty() {
                let repo = settings
                    .open_store()
                    .with_context(|| format!("open the store {}", store_name(&settings)))?;
                for b in &removed {
                    repo.delete_backup(&b.engine_backup_id)
                        .with_context(|| format!("delete the data of backup {}", b.id))?;
                }
            }
            println!("Removed server {id} and {} backup(s).", removed.len());
        }
    }
    cat.close().await;
    Ok(())
}

#[derive(Args)]
pub struct BenchSeedArgs {
    /// Server to attach the backups to (must exist).
    #[arg(long)]
    server_id: i64,
    /// How many completed backups to insert.
    #[arg(long, default_value_t = 10_000)]
    count: u32,
}

/// Inserts completed catalog rows (no stored data) so listing can be measured
/// at scale; one SQL statement, seconds for 10,000 rows.
pub async fn bench_seed(global: Global, args: BenchSeedArgs) -> anyhow::Result<()> {
    let cat = open(&global).await?;
    let server = cat
        .server(ServerId(args.server_id), Scope::All)
        .await?
        .ok_or_else(|| anyhow!("no server {}", args.server_id))?;
    let base = now().unix_timestamp() - args.count as i64 * 3600;
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) \
         INSERT INTO backups (server_id, account_id, backup_type, status, description, created_at, \
            expires_at, completed_at, size_mb, progress) \
         SELECT {sid}, {acc}, 'automatic', 'completed', 'Automatic daily backup', {base} + i * 3600, \
            {base} + i * 3600 + 86400 * 30, {base} + i * 3600 + 60, 4000 + i % 500, 100 FROM n",
        count = args.count,
        sid = server.id.0,
        acc = server.account_id.0,
    );
    let n = cat.execute_raw(&sql).await?;
    println!("Inserted {n} completed backups for server {}.", server.id);
    cat.close().await;
    Ok(())
}

/// `--disk-format` is given not at all, once for every disk, or once per `--disk`.
pub(crate) fn check_disk_format_count(disks: usize, formats: usize) -> anyhow::Result<()> {
    if !(formats == 0 || formats == 1 || formats == disks) {
        bail!(
            "give --disk-format once for every disk or once per --disk ({disks} disk(s), {formats} format(s))"
        );
    }
    Ok(())
}

/// The format to record for a disk being added: `explicit` when given (a
/// block device must be "block" and only a block device can be), else
/// detected now. Adding a server is the provider's moment: the guest has not
/// run on this image yet, or the provider vouches for it.
/// A node name as `--node` takes it: 1 to 253 characters, no spaces
/// (it appears in `status` columns and in metrics labels).
pub fn check_node_name(name: String) -> anyhow::Result<String> {
    let name = name.trim().to_owned();
    if name.is_empty()
        || name.len() > 253
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        bail!("{name:?} is not a node name: give 1 to 253 characters without spaces");
    }
    Ok(name)
}

fn disk_format(path: &std::path::Path, explicit: Option<&str>) -> anyhow::Result<ImageFormat> {
    let detected =
        vpsbackup_disk::detect_format(path).with_context(|| format!("disk {}", path.display()))?;
    let detected = vpsbackup_service::runner::catalog_format(detected);
    let Some(name) = explicit else {
        return Ok(detected);
    };
    let format = ImageFormat::parse(name).ok_or_else(|| anyhow!("unknown disk format {name:?}"))?;
    if (format == ImageFormat::Block) != (detected == ImageFormat::Block) {
        bail!(
            "disk {} is {}, not {format}",
            path.display(),
            if detected == ImageFormat::Block {
                "a block device"
            } else {
                "a file"
            }
        );
    }
    Ok(format)
}

/// "PATH (FORMAT)" for each disk; "unrecorded" for disks added before formats were.
fn disks_text(disks: &[ServerDisk]) -> String {
    disks
        .iter()
        .map(|d| {
            let format = d.format.map_or("unrecorded", ImageFormat::as_str);
            format!("{} ({format})", d.path)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
