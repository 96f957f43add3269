//! `vpsbackup serve`: layered settings, logging, signals, and `--demo`.

use anyhow::Context;
use clap::Args;
use tracing_subscriber::EnvFilter;
use vpsbackup_service::demo::{ensure_demo, DemoOutcome, DEMO_SERVER_ID};
use vpsbackup_service::{Clock, Settings, SystemClock};

use crate::admin::{load_settings, Global};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "VPSBACKUP_LISTEN")]
    listen: Option<String>,
    /// Jobs run at once [default: 2]; 0: API only (agents run the jobs).
    #[arg(long, env = "VPSBACKUP_WORKERS")]
    workers: Option<usize>,
    /// The node whose servers' jobs this process's workers run [default:
    /// this machine's hostname].
    #[arg(long, env = "VPSBACKUP_NODE")]
    node: Option<String>,
    /// Read bandwidth limit per backup job, MB/s.
    #[arg(long, env = "VPSBACKUP_READ_LIMIT_MB")]
    read_limit_mb: Option<u64>,
    /// Reads (GET) per token: sustained per second and burst, e.g. `100/500`
    /// [default: 20000/40000].
    #[arg(long, env = "VPSBACKUP_RATE_LIMIT_READ", value_name = "PER_SECOND/BURST", value_parser = parse_rate)]
    rate_limit_read: Option<(u32, u32)>,
    /// Writes (POST, DELETE) per token: sustained per second and burst, e.g.
    /// `5/20` [default: 50/500].
    #[arg(long, env = "VPSBACKUP_RATE_LIMIT_WRITE", value_name = "PER_SECOND/BURST", value_parser = parse_rate)]
    rate_limit_write: Option<(u32, u32)>,
    /// No rate limits and no RateLimit-* headers.
    #[arg(long)]
    no_rate_limit: bool,
    /// A second listener for /healthz, /readyz and /metrics alone, all open
    /// (bind it to the provider's monitoring network), e.g. 10.0.0.5:9187.
    /// /metrics on the API listener needs VPSBACKUP_METRICS_TOKEN (or
    /// [metrics] token) and then answers only to that bearer token.
    #[arg(long, env = "VPSBACKUP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// First run: create account "demo", a token and server 12345 with a small disk image.
    #[arg(long)]
    demo: bool,
}

#[derive(Args)]
pub struct AgentArgs {
    /// The node whose servers' jobs this agent runs (its disks are on this
    /// machine) [default: this machine's hostname].
    #[arg(long, env = "VPSBACKUP_NODE")]
    node: Option<String>,
    /// Jobs run at once [default: 2].
    #[arg(long, env = "VPSBACKUP_WORKERS")]
    workers: Option<usize>,
    /// Read bandwidth limit per backup job, MB/s.
    #[arg(long, env = "VPSBACKUP_READ_LIMIT_MB")]
    read_limit_mb: Option<u64>,
    /// A listener for /healthz, /readyz and /metrics (all open), e.g.
    /// 10.0.0.5:9187.
    #[arg(long, env = "VPSBACKUP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// `vpsbackup agent`: job workers of one node, no API.
pub fn run_agent(global: Global, args: AgentArgs) -> anyhow::Result<()> {
    init_logging();
    let mut settings: Settings = load_settings(&global)?;
    if let Some(w) = args.workers {
        settings.workers = w;
    }
    if args.read_limit_mb.is_some() {
        settings.read_limit_mb_per_s = args.read_limit_mb;
    }
    settings.node = Some(crate::admin::check_node_name(
        args.node
            .unwrap_or_else(vpsbackup_service::metrics::node_name),
    )?);
    let listen = args.metrics_listen.or(settings.metrics.listen.clone());
    tracing::debug!(?settings, "settings");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = shutdown_signal()?;
        let ops_listener = match &listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a} (--metrics-listen)"))?,
            ),
            None => None,
        };
        vpsbackup_service::agent::run_agent(
            settings,
            std::sync::Arc::new(SystemClock),
            ops_listener,
            shutdown,
        )
        .await?;
        Ok(())
    })
}

/// `RATE/BURST` (or `RATE`, burst twice the rate), both at least 1.
fn parse_rate(text: &str) -> Result<(u32, u32), String> {
    let num = |t: &str| match t.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{t:?} is not a whole number of at least 1")),
    };
    match text.split_once('/') {
        Some((rate, burst)) => Ok((num(rate)?, num(burst)?)),
        None => num(text).map(|rate| (rate, rate.saturating_mul(2))),
    }
}

/// Human-readable logs on stderr (colours only on a terminal), or one JSON
/// object per line with `VPSBACKUP_LOG_FORMAT=json` for log shippers.
fn init_logging() {
    let filter = EnvFilter::try_from_env("VPSBACKUP_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("VPSBACKUP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

pub fn run(global: Global, args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    let mut settings: Settings = load_settings(&global)?;
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    if let Some(w) = args.workers {
        settings.workers = w;
    }
    settings.node = Some(crate::admin::check_node_name(
        args.node
            .unwrap_or_else(vpsbackup_service::metrics::node_name),
    )?);
    if args.read_limit_mb.is_some() {
        settings.read_limit_mb_per_s = args.read_limit_mb;
    }
    if let Some((rate, burst)) = args.rate_limit_read {
        settings.rate_limit.read_per_second = rate;
        settings.rate_limit.read_burst = burst;
    }
    if let Some((rate, burst)) = args.rate_limit_write {
        settings.rate_limit.write_per_second = rate;
        settings.rate_limit.write_burst = burst;
    }
    if args.no_rate_limit {
        settings.rate_limit.enabled = false;
    }
    if args.metrics_listen.is_some() {
        settings.metrics.listen = args.metrics_listen;
    }
    // From the environment only: a flag would show the token in `ps`.
    if let Ok(token) = std::env::var("VPSBACKUP_METRICS_TOKEN") {
        settings.metrics.token = Some(token);
    }
    tracing::debug!(?settings, "settings");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // Installed first, so a SIGTERM during start-up is a clean stop too.
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let ops_listener = match &settings.metrics.listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a} (--metrics-listen)"))?,
            ),
            None => None,
        };
        if args.demo {
            demo(&settings, addr).await?;
        }
        // Tests of several real replicas share one simulated clock (a file).
        let clock: std::sync::Arc<dyn Clock> = match std::env::var_os("VPSBACKUP_TEST_CLOCK_FILE") {
            Some(path) => std::sync::Arc::new(vpsbackup_service::FileClock::new(path)),
            None => std::sync::Arc::new(SystemClock),
        };
        vpsbackup_service::run_with_ops(settings, clock, listener, ops_listener, shutdown).await?;
        Ok(())
    })
}

async fn demo(settings: &Settings, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let catalog = vpsbackup_service::connect_catalog(settings, 1).await?;
    let outcome = ensure_demo(&*catalog, &settings.data_dir, SystemClock.now()).await?;
    catalog.close().await;
    let dir = settings.data_dir.display();
    match outcome {
        DemoOutcome::Created { token, disk } => {
            println!("Demo ready: account \"demo\", server {DEMO_SERVER_ID} \"web-server-01\" (disk {}).", disk.display());
            println!("Try it:");
            println!();
            println!("  curl -X POST \"http://{addr}/api/v1/backups/\" -H \"Authorization: Bearer {token}\" -H \"Content-Type: application/json\" -d '{{\"server_id\": {DEMO_SERVER_ID}, \"description\": \"Pre-deployment backup\"}}'");
            println!("  curl \"http://{addr}/api/v1/backups/?server_id={DEMO_SERVER_ID}\" -H \"Authorization: Bearer {token}\" -H \"Content-Type: application/json\"");
            println!();
            println!("API docs: http://{addr}/api/v1/docs/");
            println!("Your API token (shown once):");
            println!("{token}");
        }
        DemoOutcome::AlreadyThere => {
            println!("The demo is already set up in {dir}. For a new token:");
            println!("  vpsbackup token create --account demo --data-dir {dir}");
            println!("API: http://{addr}/api/v1/  docs: http://{addr}/api/v1/docs/");
        }
    }
    Ok(())
}

/// SIGTERM or Ctrl-C. The handlers are registered when this is called, not
/// when the returned future is first polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutdown signal received");
    })
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_parse_as_rate_and_burst() {
        assert_eq!(parse_rate("5/20"), Ok((5, 20)));
        assert_eq!(parse_rate("100"), Ok((100, 200)));
        assert!(parse_rate("0/5").is_err());
        assert!(parse_rate("5/").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
