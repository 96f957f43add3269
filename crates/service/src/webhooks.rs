//! Webhook delivery: a background task that POSTs the catalog's outbox of
//! events (`backup.completed`, `backup.failed`, `backup.damaged`,
//! `backup.repaired`, `restore.completed`, `restore.failed`) to each
//! account's endpoint.
//!
//! The events are written by the catalog in the transaction that records a
//! job's outcome (or marks a backup damaged or repaired), so a crash can neither lose one nor invent one for a job
//! that did not finish. This task only drains them: at least once (a
//! receiver dedups on `Webhook-Id`), one event at a time per account in the
//! order they were written, each attempt by one process however many
//! replicas share the catalog (the outbox claim, `claim_webhook_events`), with doubling backoff between attempts, until
//! the attempts are used up and the event is marked failed. It wakes when a
//! job's outcome is recorded and otherwise sleeps until the next retry.
//!
//! Signatures follow Standard Webhooks (standardwebhooks.com), so receivers
//! can check them with its libraries: `Webhook-Signature: v1,<base64
//! HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the base64-decoded
//! part of a `whsec_<base64>` secret (any other secret is used as its bytes).

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::{watch, Notify};
use vpsbackup_catalog::{Catalog, Scope, WebhookAttempt, WebhookDelivery, WebhookSubject};

use crate::api::views::{BackupView, RestoreView};
use crate::clock::{rfc3339, Clock};

/// The `[webhooks]` table of the settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Off: events are still recorded (for accounts with a webhook) but not sent.
    pub enabled: bool,
    /// Seconds a receiver has to answer one POST.
    pub timeout_secs: u64,
    /// Wait before the second attempt, seconds; doubled after each failure.
    pub retry_base_secs: u64,
    /// Longest wait between two attempts, seconds.
    pub retry_max_secs: u64,
    /// Attempts before an event is marked failed (the default, with the
    /// default waits, spans about 24 hours).
    pub max_attempts: u32,
    /// Days delivered and failed events are kept before they are purged.
    pub keep_days: u32,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        // 30 s, 1, 2, 4, 8, 16, 32 min, then hourly: 30 attempts ~ 24 h.
        WebhookSettings {
            enabled: true,
            timeout_secs: 10,
            retry_base_secs: 30,
            retry_max_secs: 3600,
            max_attempts: 30,
            keep_days: 7,
        }
    }
}

impl WebhookSettings {
    /// Wait after the `attempts`-th failed attempt (1-based).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self.retry_base_secs.max(1);
        let factor = 1u64 << attempts.saturating_sub(1).min(32);
        Duration::from_secs(
            base.saturating_mul(factor)
                .min(self.retry_max_secs.max(base)),
        )
    }
}

/// A fresh webhook secret in the Standard Webhooks form: `whsec_` + the
/// base64 of 256 random bits.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)?;
    Ok(format!("whsec_{}", BASE64.encode(raw)))
}

/// The HMAC key of a secret: the decoded base64 of a `whsec_` secret, else
/// the secret's own bytes (a provider may set any string).
fn signing_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| BASE64.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Checks a webhook URL: absolute `http` or `https` with a host.
pub fn parse_webhook_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("the URL must be http:// or https:// with a host".into());
    }
    Ok(parsed.to_string())
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` (Standard Webhooks).
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(&signing_key(secret)).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Drains the outbox.
pub struct WebhookSender {
    catalog: Arc<dyn Catalog>,
    clock: Arc<dyn Clock>,
    settings: WebhookSettings,
    client: reqwest::Client,
    wake: Arc<Notify>,
}

/// Most events sent at once (each to a different account).
const BATCH: u32 = 32;
/// Longest sleep with nothing due: a safety net, e.g. for events written by
/// another process on the same catalog.
const IDLE: Duration = Duration::from_secs(60);
const PURGE_EVERY: Duration = Duration::from_secs(3600);

impl WebhookSender {
    /// `wake` is signalled when events may have been written.
    pub fn new(
        catalog: Arc<dyn Catalog>,
        clock: Arc<dyn Clock>,
        settings: WebhookSettings,
        wake: Arc<Notify>,
    ) -> Result<WebhookSender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            // The event was delivered to the URL the provider set, not elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("vpsbackup-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WebhookSender {
            catalog,
            clock,
            settings,
            client,
            wake,
        })
    }

    /// Runs until `stop` turns true.
    pub fn spawn(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_purge: Option<std::time::Instant> = None;
            while !*stop.borrow() {
                if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
                    last_purge = Some(std::time::Instant::now());
                    let before =
                        self.clock.now() - time::Duration::days(i64::from(self.settings.keep_days));
                    match self.catalog.purge_webhook_events(before).await {
                        Ok(n) if n > 0 => tracing::info!(purged = n, "purged old webhook events"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot purge webhook events"),
                    }
                }
                let sleep = match self.step().await {
                    Ok(true) => continue,
                    Ok(false) => self.idle_time().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook delivery: catalog error");
                        Duration::from_secs(5)
                    }
                };
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(sleep) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    }

    /// Sends every due event once (one per account). `Ok(true)` when some
    /// were sent: the next of their accounts may be due at once.
    pub async fn step(&self) -> Result<bool, vpsbackup_catalog::CatalogError> {
        let due = self
            .catalog
            .claim_webhook_events(self.clock.now(), BATCH, self.claim_secs())
            .await?;
        if due.is_empty() {
            return Ok(false);
        }
        let mut set = tokio::task::JoinSet::new();
        for event in due {
            let catalog = self.catalog.clone();
            let clock = self.clock.clone();
            let client = self.client.clone();
            let settings = self.settings.clone();
            set.spawn(async move { deliver(&*catalog, &*clock, &client, &settings, event).await });
        }
        // Every attempt is awaited (dropping the set would abort those in
        // flight); the first catalog error is reported after.
        let mut progressed = false;
        let mut failure = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(delivered)) => progressed |= delivered,
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => tracing::warn!(error = %e, "webhook delivery task failed"),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(progressed),
        }
    }

    /// How long a claim outlives this process's attempt: the POST's
    /// timeout, the body's rendering and the attempt's record, with room.
    fn claim_secs(&self) -> u32 {
        u32::try_from(self.settings.timeout_secs.max(1))
            .unwrap_or(u32::MAX / 2)
            .saturating_add(60)
    }

    async fn idle_time(&self) -> Duration {
        match self.catalog.next_webhook_due().await {
            Ok(Some(at)) => {
                let wait = (at - self.clock.now()).whole_milliseconds().max(0) as u64;
                Duration::from_millis(wait.max(200)).min(IDLE)
            }
            Ok(None) => IDLE,
            Err(_) => Duration::from_secs(5),
        }
    }
}

/// One attempt of one event. `Ok(true)` when it left the queue (delivered
/// or failed for good), so the account's next event may go now.
async fn deliver(
    catalog: &dyn Catalog,
    clock: &dyn Clock,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    event: WebhookDelivery,
) -> Result<bool, vpsbackup_catalog::CatalogError> {
    let body = match &event.payload {
        Some(p) => p.clone(),
        None => {
            let body = render(catalog, &event).await?;
            catalog.set_webhook_payload(&event.id, &body).await?;
            body
        }
    };
    // The receiver compares it with its own clock: the real time, not the
    // service's (possibly simulated) clock.
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let result = client
        .post(&event.webhook.url)
        .header("Content-Type", "application/json")
        .header("Webhook-Id", &event.id)
        .header("Webhook-Timestamp", timestamp.to_string())
        .header(
            "Webhook-Signature",
            signature(&event.webhook.secret, &event.id, timestamp, &body),
        )
        .body(body)
        .send()
        .await;
    let error = match result {
        Ok(resp) if resp.status().is_success() => None,
        Ok(resp) => Some(format!("the receiver answered {}", resp.status())),
        Err(e) if e.is_timeout() => Some(format!(
            "no answer within {} s",
            settings.timeout_secs.max(1)
        )),
        Err(e) => Some(format!("cannot reach the receiver: {e}")),
    };
    let attempts = event.attempts + 1;
    let now = clock.now();
    let (attempt, left_queue) = match error {
        None => (WebhookAttempt::Delivered, true),
        Some(error) if attempts >= settings.max_attempts.max(1) => {
            tracing::warn!(event = %event.id, account = event.account_id.0, %error, attempts, "webhook event failed for good");
            (WebhookAttempt::Failed { error }, true)
        }
        Some(error) => {
            let wait = settings.backoff(attempts);
            tracing::info!(event = %event.id, account = event.account_id.0, %error, attempts, retry_in_secs = wait.as_secs(), "webhook delivery failed; will retry");
            let at = now + time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR);
            (WebhookAttempt::Retry { at, error }, false)
        }
    };
    catalog
        .record_webhook_attempt(&event.id, attempt, now)
        .await?;
    Ok(left_queue)
}

/// The body: `{"id", "event", "created_at", "data"}`, with `data` the backup
/// or restore as `GET` shows it now (a few milliseconds after the outcome).
/// A backup deleted before the first attempt is sent as its id and the
/// `deleted` flag, since the event itself must not be lost.
async fn render(
    catalog: &dyn Catalog,
    event: &WebhookDelivery,
) -> Result<String, vpsbackup_catalog::CatalogError> {
    let data = match event.subject {
        WebhookSubject::Backup(id) => match catalog.backup(id, Scope::All).await? {
            Some(b) => serde_json::to_value(BackupView::from(&b)),
            None => Ok(serde_json::json!({ "id": id.0, "deleted": true })),
        },
        WebhookSubject::Restore(id) => match catalog.restore(id, Scope::All).await? {
            Some(r) => serde_json::to_value(RestoreView::from(&r)),
            None => Ok(serde_json::json!({ "id": id.0, "deleted": true })),
        },
    }
    .unwrap_or(serde_json::Value::Null);
    Ok(serde_json::json!({
        "id": event.id,
        "event": event.kind.as_str(),
        "created_at": rfc3339(event.created_at),
        "data": data,
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_spans_a_day() {
        let s = WebhookSettings::default();
        assert_eq!(s.backoff(1), Duration::from_secs(30));
        assert_eq!(s.backoff(2), Duration::from_secs(60));
        assert_eq!(s.backoff(8), Duration::from_secs(3600));
        assert_eq!(s.backoff(40), Duration::from_secs(3600));
        let total: u64 = (1..s.max_attempts).map(|a| s.backoff(a).as_secs()).sum();
        assert!((20 * 3600..=30 * 3600).contains(&total), "{total}");
    }

    #[test]
    fn signature_is_standard_webhooks_v1() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let a = signature("k", "evt_1", 1700000000, "{}");
        assert!(a.starts_with("v1,") && a.len() == 3 + 44);
        assert_eq!(a, signature("k", "evt_1", 1700000000, "{}"));
        assert_ne!(a, signature("k2", "evt_1", 1700000000, "{}"));
        assert_ne!(a, signature("k", "evt_1", 1700000001, "{}"));
    }

    #[test]
    fn urls_are_http_or_https() {
        assert!(parse_webhook_url("https://example.com/hook").is_ok());
        assert!(parse_webhook_url("http://127.0.0.1:9/x").is_ok());
        assert!(parse_webhook_url("ftp://example.com/").is_err());
        assert!(parse_webhook_url("example.com").is_err());
        assert!(generate_secret().unwrap().starts_with("whsec_"));
    }
}
