//! Listening on a PostgreSQL notification channel for as long as wanted,
//! across lost connections. Notifications are sent when their transaction
//! commits and are lost while nobody listens, so a listener is told when it
//! starts listening (again) as well as what it hears.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

/// Between attempts to listen again after the connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// What a listener hears.
pub(super) enum Heard {
    /// Listening from now on; what was sent before is not heard.
    Listening,
    /// A notification on one of the channels.
    Notified,
    /// The connection is lost; nothing is heard until `Listening` again.
    Lost,
}

/// Starts [`listen`] on a task of its own, stopped when the returned handle
/// is dropped (or `on` returns false).
pub(super) fn spawn(
    options: PgConnectOptions,
    channels: Vec<String>,
    on: impl FnMut(Heard) -> bool + Send + 'static,
) -> Listening {
    let task = tokio::spawn(async move { listen(options, &channels, on).await });
    Listening(task.abort_handle())
}

/// Listens on `channels` and hands `on` what it hears until `on` returns
/// false. Runs on a connection of its own (`options`).
async fn listen(options: PgConnectOptions, channels: &[String], mut on: impl FnMut(Heard) -> bool) {
    // A pool of its own: the listener holds its connection for good.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let subscribed = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all(channels.iter().map(String::as_str))
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match subscribed.await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!("cannot listen on {channels:?}: {e}");
                if !on(Heard::Lost) {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if !on(Heard::Listening) {
            return;
        }
        loop {
            // Ok(None): the connection was lost and is back, listening again
            // (sqlx subscribes again before it returns), so what was sent in
            // between was not heard.
            let keep_going = match listener.try_recv().await {
                Ok(Some(_)) => on(Heard::Notified),
                Ok(None) => on(Heard::Listening),
                Err(e) => {
                    tracing::debug!("stopped listening on {channels:?}: {e}");
                    if !on(Heard::Lost) {
                        return;
                    }
                    break;
                }
            };
            if !keep_going {
                return;
            }
        }
    }
}

/// A listener started for a caller, stopped when this is dropped.
#[derive(Debug)]
pub struct Listening(tokio::task::AbortHandle);

impl Listening {
    /// Stops the listener now.
    pub(super) fn stop(&self) {
        self.0.abort();
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop();
    }
}
