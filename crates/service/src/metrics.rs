//! Prometheus metrics of one `serve` process, with `prometheus-client`.
//!
//! Three kinds of figures:
//! - recorded as things happen in this process: jobs finished by kind and
//!   outcome with their durations, bytes read and stored per backup, jobs
//!   running on this process's workers, the workers' last heartbeat, HTTP
//!   requests by route template and status with latency histograms;
//! - read from the catalog at each scrape, the same on every process: the
//!   job queue by kind and state and the age of the oldest due queued job;
//! - read from the store, at most once a minute (listing a large store is
//!   not free) or after a backup finished: its size and dedup ratio.
//!
//! Labels carry only bounded, non-customer values: job kinds and outcomes,
//! route templates (never a raw path, so never one series per id), methods,
//! status codes and the node name. No server name, account or token.
//!
//! Every registry is owned by its service (no global recorder), so several
//! services in one test process never mix their figures.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use time::OffsetDateTime;
use vpsbackup_catalog::{JobKind, JobState, ScheduleCatalog};
use vpsbackup_engine::Repository;

/// The `Content-Type` of the Prometheus text format the scrape answers in.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How long store figures are reused before the store is listed again.
const STORE_STATS_MAX_AGE: Duration = Duration::from_secs(60);

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: &'static str,
    /// completed, failed, cancelled (the backup was deleted) or requeued
    /// (handed back at shutdown).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    kind: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// Job durations: 0.1 s to about 3.6 h, doubling.
fn job_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// Bytes per backup: 1 MiB to 1 TiB, by fours.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1024.0 * 1024.0, 4.0, 11))
}

/// Request latency: 0.5 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// This machine's name: the node label, and the node `vpsbackup status`
/// reports on.
pub fn node_name() -> String {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .trim()
        .to_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// What the job runner records; cheap to clone (every field is shared).
#[derive(Clone)]
pub struct JobMetrics {
    finished: Family<OutcomeLabels, Counter>,
    duration: HistogramFamily<OutcomeLabels>,
    running: Family<KindLabels, Gauge>,
    read_bytes: Histogram,
    stored_bytes: Histogram,
    heartbeat: Family<NodeLabels, FloatGauge>,
    node: NodeLabels,
    /// Each worker's last heartbeat (unix seconds), by worker number.
    beats: Arc<Mutex<HashMap<usize, i64>>>,
    /// Set when a backup finished: the store's figures changed.
    store_changed: Arc<std::sync::atomic::AtomicBool>,
    /// 1 while this process runs the scheduler (`crate::leader`).
    scheduler_leader: Gauge,
}

impl Default for JobMetrics {
    fn default() -> Self {
        JobMetrics {
            finished: Family::default(),
            duration: Family::new_with_constructor(job_duration_histogram as fn() -> Histogram),
            running: Family::default(),
            read_bytes: bytes_histogram(),
            stored_bytes: bytes_histogram(),
            heartbeat: Family::default(),
            node: NodeLabels { node: node_name() },
            beats: Arc::default(),
            store_changed: Arc::default(),
            scheduler_leader: Gauge::default(),
        }
    }
}

impl JobMetrics {
    /// Figures labelled with `node` (`--node`) instead of the hostname.
    pub fn for_node(node: &str) -> JobMetrics {
        JobMetrics {
            node: NodeLabels {
                node: node.to_owned(),
            },
            ..JobMetrics::default()
        }
    }

    /// A worker is alive and reached the catalog (an empty claim, or a
    /// running job's progress write).
    pub fn beat(&self, worker: usize, now: OffsetDateTime) {
        let t = now.unix_timestamp();
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(worker, t);
        self.heartbeat.get_or_create(&self.node).set(t as f64);
    }

    /// Each worker's last heartbeat, by worker number.
    pub fn worker_beats(&self) -> HashMap<usize, i64> {
        self.beats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this process runs the scheduler now.
    pub fn set_scheduler_leader(&self, leads: bool) {
        self.scheduler_leader.set(i64::from(leads));
    }

    /// The node these figures are labelled with.
    pub fn node(&self) -> &str {
        &self.node.node
    }

    /// A job started on a worker of this process.
    pub fn started(&self, kind: JobKind) {
        self.running
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A job left this process's worker, after `elapsed`: `outcome` is
    /// completed, failed, cancelled or requeued.
    pub fn ended(&self, kind: JobKind, outcome: &'static str, elapsed: Duration) {
        let kind = kind.as_str();
        self.running.get_or_create(&KindLabels { kind }).dec();
        let labels = OutcomeLabels { kind, outcome };
        self.finished.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if kind == JobKind::Backup.as_str() {
            self.store_changed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A backup read `read` bytes of disk data and grew the store by `stored`.
    pub fn backup_bytes(&self, read: u64, stored: u64) {
        self.read_bytes.observe(read as f64);
        self.stored_bytes.observe(stored as f64);
    }
}

/// HTTP requests of the customer API, by matched route template.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RouteStatusLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

/// The method as a label: the standard ones by name, anything else one
/// value, so a client inventing methods cannot add series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts and times each request under its route template
/// (`/api/v1/backups/{backup_id}`), or `unmatched` for unknown paths.
pub async fn track_http(State(http): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now();
    let resp = next.run(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    http.latency
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
        })
        .observe(elapsed);
    http.requests
        .get_or_create(&RouteStatusLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// Store figures and when they were read.
struct StoreFigures {
    read_at: Instant,
}

/// The registry and the gauges filled at scrape time.
pub struct Metrics {
    registry: Registry,
    jobs: JobMetrics,
    queue: Family<QueueLabels, Gauge>,
    oldest_queued: FloatGauge,
    catalog_up: Gauge,
    store_up: Gauge,
    store_stored: Gauge,
    store_logical: Gauge,
    store_backups: Gauge,
    store_ratio: FloatGauge,
    store_read: tokio::sync::Mutex<Option<StoreFigures>>,
}

impl Metrics {
    /// Registers the runner's and the HTTP layer's metrics with the
    /// scrape-time ones.
    pub fn new(jobs: JobMetrics, http: HttpMetrics) -> Metrics {
        let mut r = Registry::with_prefix("vpsbackup");
        r.register(
            "jobs_finished",
            "Jobs that left a worker of this process, by kind and outcome (completed, failed, cancelled, requeued)",
            jobs.finished.clone(),
        );
        r.register_with_unit(
            "job_duration",
            "Time from a worker claiming a job to its outcome, by kind and outcome",
            Unit::Seconds,
            jobs.duration.clone(),
        );
        r.register(
            "worker_jobs_running",
            "Jobs running on this process's workers, by kind",
            jobs.running.clone(),
        );
        r.register_with_unit(
            "backup_read",
            "Disk data read per completed backup",
            Unit::Bytes,
            jobs.read_bytes.clone(),
        );
        r.register_with_unit(
            "backup_stored",
            "Bytes a completed backup added to the store (new chunks, compressed)",
            Unit::Bytes,
            jobs.stored_bytes.clone(),
        );
        r.register(
            "node_last_heartbeat_timestamp_seconds",
            "When a job worker of the node last reached the catalog (unix time)",
            jobs.heartbeat.clone(),
        );
        r.register(
            "scheduler_leader",
            "1 while this process runs the scheduler (the one leader among replicas sharing the catalog), else 0",
            jobs.scheduler_leader.clone(),
        );
        // Seen before any job ran: the node exists from the start.
        let _ = jobs.heartbeat.get_or_create(&jobs.node);
        r.register(
            "http_requests",
            "Customer API requests by method, route template and status",
            http.requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Customer API request latency by method and route template",
            Unit::Seconds,
            http.latency.clone(),
        );
        let m = Metrics {
            registry: Registry::default(),
            jobs,
            queue: Family::default(),
            oldest_queued: FloatGauge::default(),
            catalog_up: Gauge::default(),
            store_up: Gauge::default(),
            store_stored: Gauge::default(),
            store_logical: Gauge::default(),
            store_backups: Gauge::default(),
            store_ratio: FloatGauge::default(),
            store_read: tokio::sync::Mutex::new(None),
        };
        r.register(
            "queue_jobs",
            "Jobs in the catalog's queue by kind and state (queued, running), catalog-wide",
            m.queue.clone(),
        );
        r.register_with_unit(
            "queue_oldest_due_age",
            "How long the longest-waiting due queued job has waited (0: none waits)",
            Unit::Seconds,
            m.oldest_queued.clone(),
        );
        r.register(
            "catalog_up",
            "1 when the last scrape could read the job queue from the catalog",
            m.catalog_up.clone(),
        );
        r.register(
            "store_up",
            "1 when the last reading of the store's figures succeeded",
            m.store_up.clone(),
        );
        r.register_with_unit(
            "store_stored",
            "Bytes of packs in the store",
            Unit::Bytes,
            m.store_stored.clone(),
        );
        r.register_with_unit(
            "store_logical",
            "Disk data of every backup in the store, before dedup and compression",
            Unit::Bytes,
            m.store_logical.clone(),
        );
        r.register(
            "store_backups",
            "Backups in the store",
            m.store_backups.clone(),
        );
        r.register(
            "store_dedup_ratio",
            "Logical bytes per stored byte, dedup and compression together (0: empty store)",
            m.store_ratio.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Fills the scrape-time gauges and encodes everything.
    pub async fn scrape(
        &self,
        schedule: &dyn ScheduleCatalog,
        repo: &Repository,
        now: OffsetDateTime,
    ) -> String {
        self.read_queue(schedule, now).await;
        self.read_store(repo).await;
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }

    async fn read_queue(&self, schedule: &dyn ScheduleCatalog, now: OffsetDateTime) {
        match schedule.queue_stats(now).await {
            Ok(stats) => {
                self.catalog_up.set(1);
                // Every kind and state, zeros included: a series that
                // vanishes when its queue empties reads as "no data".
                for kind in [JobKind::Backup, JobKind::Restore] {
                    for state in [JobState::Queued, JobState::Running] {
                        let n = stats
                            .jobs
                            .iter()
                            .find(|c| c.kind == kind && c.state == state)
                            .map_or(0, |c| c.jobs);
                        self.queue
                            .get_or_create(&QueueLabels {
                                kind: kind.as_str(),
                                state: state.as_str(),
                            })
                            .set(n as i64);
                    }
                }
                let age = stats
                    .oldest_due_since
                    .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
                self.oldest_queued.set(age);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the job queue");
                self.catalog_up.set(0);
            }
        }
    }

    async fn read_store(&self, repo: &Repository) {
        // One reading at a time; concurrent scrapes wait for it and reuse it.
        let mut last = self.store_read.lock().await;
        let changed = self
            .jobs
            .store_changed
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if !changed
            && last
                .as_ref()
                .is_some_and(|f| f.read_at.elapsed() < STORE_STATS_MAX_AGE)
        {
            return;
        }
        let repo = repo.clone();
        match tokio::task::spawn_blocking(move || repo.stats()).await {
            Ok(Ok(st)) => {
                self.store_up.set(1);
                self.store_stored.set(st.stored_bytes as i64);
                self.store_logical.set(st.logical_data_bytes as i64);
                self.store_backups.set(st.backups as i64);
                self.store_ratio.set(if st.stored_bytes == 0 {
                    0.0
                } else {
                    st.logical_data_bytes as f64 / st.stored_bytes as f64
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot read the store's figures");
                self.store_up.set(0);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the store reading failed");
                self.store_up.set(0);
            }
        }
        *last = Some(StoreFigures {
            read_at: Instant::now(),
        });
    }
}
