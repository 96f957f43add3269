//! `vpsbackup`: the one binary. Thin: parses the command line and calls the crates.
//!
//! `serve` runs the API (and the jobs of its node); `agent` runs only the
//! jobs of one node's servers; `account`, `token`, `plan` and `server` administer
//! the catalog of the same data dir, `restore` writes a backup to files of
//! the provider's choice, also while `serve` runs (SQLite WAL
//! lets them write beside it). Every failure prints its reason on stderr and
//! exits non-zero (anyhow's report from `main`).

mod admin;
mod catalog;
mod maintenance;
mod restore;
mod serve;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc malloc showed up as ~12% of a listing request's CPU (many small
// strings per page across threads); mimalloc halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "vpsbackup",
    version,
    about = "Self-hosted backups for VPS hosting"
)]
struct Cli {
    /// Data directory: the catalog (catalog.db), the store (store/) and config.toml.
    #[arg(long, global = true, env = "VPSBACKUP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (TOML); default <data-dir>/config.toml when it exists.
    #[arg(long, global = true, env = "VPSBACKUP_CONFIG")]
    config: Option<PathBuf>,
    /// The backup store: a directory or s3://BUCKET/PREFIX (keys from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); default <data-dir>/store.
    #[arg(long, global = true, env = "VPSBACKUP_STORE")]
    store: Option<String>,
    /// The S3 server, http(s)://host:port (for an s3:// store; default AWS).
    #[arg(long, global = true, env = "VPSBACKUP_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 signing region (Garage: its s3_region; default AWS_REGION or us-east-1).
    #[arg(long, global = true, env = "VPSBACKUP_S3_REGION")]
    s3_region: Option<String>,
    /// The catalog: sqlite://PATH or postgres://USER:PASS@HOST/DB
    /// [default: sqlite://<data-dir>/catalog.db].
    #[arg(
        long,
        global = true,
        env = "VPSBACKUP_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Key file of an encrypted store (overrides `store_key_file` in
    /// config.toml); without one, the passphrase in VPSBACKUP_PASSPHRASE.
    /// `store init` creates it when it does not exist.
    #[arg(long, global = true, env = "VPSBACKUP_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run backups and restores.
    Serve(serve::ServeArgs),
    /// Run the backups and restores of one node's servers (no API); needs
    /// a PostgreSQL catalog shared with `serve`.
    Agent(serve::AgentArgs),
    /// Customer accounts.
    #[command(subcommand)]
    Account(admin::AccountCommand),
    /// API tokens (the new token is the last line of stdout).
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Retention plans.
    #[command(subcommand)]
    Plan(admin::PlanCommand),
    /// Servers and their disks.
    #[command(subcommand)]
    Server(Box<admin::ServerCommand>),
    /// The catalog itself: rebuild it from the store after it was lost.
    #[command(subcommand)]
    Catalog(catalog::CatalogCommand),
    /// Reclaim store space no backup references (safe while serve runs).
    Gc,
    /// Re-read backups and mark damaged ones; exits non-zero if any is damaged.
    Verify(maintenance::VerifyArgs),
    /// Servers with their last and next backup, backups kept, store size and dedup.
    Status,
    /// Restore a backup to image files of the provider's choice (disaster
    /// recovery; --allow-damaged for a backup marked damaged).
    Restore(restore::RestoreArgs),
    /// The latest failed backups and restores, with the detail customers do
    /// not see (host paths, the stderr of hooks and QEMU).
    Failures(maintenance::FailuresArgs),
    /// Fills the catalog with completed backups for benchmarks (no data).
    #[command(hide = true)]
    BenchSeed(admin::BenchSeedArgs),
    /// Work on a bare store directory with no catalog (disaster recovery).
    #[command(subcommand)]
    Store(store::StoreCommand),
}

/// Runs the command; a failure is one line on stderr ("Error: what: why")
/// and exit code 1, with no backtrace even when RUST_BACKTRACE is set (an
/// operator's error is not a crash).
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text
/// the line already holds (sqlx's errors print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let global = admin::Global {
        data_dir: cli.data_dir,
        config: cli.config,
        store: cli.store,
        s3_endpoint: cli.s3_endpoint,
        s3_region: cli.s3_region,
        database_url: cli.database_url,
        key_file: cli.key_file,
    };
    match cli.command {
        Command::Store(cmd) => store::run(cmd, &global),
        Command::Serve(args) => serve::run(global, args),
        Command::Agent(args) => serve::run_agent(global, args),
        Command::Account(cmd) => admin::block_on(admin::account(global, cmd)),
        Command::Token(cmd) => admin::block_on(admin::token(global, cmd)),
        Command::Plan(cmd) => admin::block_on(admin::plan(global, cmd)),
        Command::Server(cmd) => admin::block_on(admin::server(global, *cmd)),
        Command::Catalog(cmd) => admin::block_on(catalog::run(global, cmd)),
        Command::Gc => admin::block_on(maintenance::gc(global)),
        Command::Verify(args) => admin::block_on(maintenance::verify(global, args)),
        Command::Status => admin::block_on(maintenance::status(global)),
        Command::Restore(args) => admin::block_on(restore::run(global, args)),
        Command::Failures(args) => admin::block_on(maintenance::failures(global, args)),
        Command::BenchSeed(args) => admin::block_on(admin::bench_seed(global, args)),
    }
}
