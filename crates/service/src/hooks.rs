//! Hook commands around jobs (freeze/thaw, stop/start a VM): placeholders
//! filled with shell-quoted values, run with `sh -c` under a timeout. A hook
//! is finished when its own process exits, even if a daemon it started still
//! holds its stderr.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Values the placeholders stand for.
#[derive(Debug, Clone)]
pub struct HookVars {
    pub server_id: i64,
    pub name: String,
    pub hostname: String,
    pub backup_id: i64,
    pub disks: Vec<String>,
}

/// Quotes a value for `sh`, so a server name can never inject a command.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command with its placeholders replaced.
pub fn render(template: &str, vars: &HookVars) -> String {
    let disks = vars
        .disks
        .iter()
        .map(|d| sh_quote(d))
        .collect::<Vec<_>>()
        .join(" ");
    template
        .replace("{server_id}", &vars.server_id.to_string())
        .replace("{backup_id}", &vars.backup_id.to_string())
        .replace("{name}", &sh_quote(&vars.name))
        .replace("{hostname}", &sh_quote(&vars.hostname))
        .replace("{disks}", &disks)
}

/// How long stderr is still read after the hook's process exited.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Bytes of a hook's stderr kept (its end: where the error usually is).
const STDERR_KEEP: usize = 4096;

/// Reads a pipe to EOF (or until aborted) into `tail`, keeping only its
/// last bytes, so a chatty hook cannot grow memory without bound.
async fn read_tail(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    tail: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > STDERR_KEEP {
            let extra = tail.len() - STDERR_KEEP;
            tail.drain(..extra);
        }
    }
}

/// Runs one hook; `Err` says why it failed in a sentence fragment.
pub async fn run_hook(
    which: &str,
    template: &str,
    vars: &HookVars,
    timeout: Duration,
) -> Result<(), String> {
    let command = render(template, vars);
    tracing::info!(hook = which, "running hook");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("VPSBACKUP_SERVER_ID", vars.server_id.to_string())
        .env("VPSBACKUP_SERVER_NAME", &vars.name)
        .env("VPSBACKUP_BACKUP_ID", vars.backup_id.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("the {which} hook could not be started: {e}"))?;
    // Read stderr on the side, keeping only its tail: a hook that starts a
    // daemon leaves the daemon holding the pipe, so EOF may never come. The
    // hook is done when its own process exits; the reader then gets a short
    // grace to collect what is already in the pipe.
    let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = child
        .stderr
        .take()
        .map(|s| tokio::spawn(read_tail(s, tail.clone())));
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    if waited.is_err() {
        let _ = child.start_kill();
    }
    if let Some(task) = reader {
        let abort = task.abort_handle();
        if tokio::time::timeout(STDERR_GRACE, task).await.is_err() {
            abort.abort();
        }
    }
    let err = std::mem::take(&mut *tail.lock().unwrap_or_else(|e| e.into_inner()));
    let waited = waited.map(|status| (status, err));
    match waited {
        Err(_) => Err(format!(
            "the {which} hook did not finish within {} seconds and was stopped",
            timeout.as_secs()
        )),
        Ok((Err(e), _)) => Err(format!("the {which} hook could not be waited for: {e}")),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), err)) => {
            let text = String::from_utf8_lossy(&err);
            let text = text.trim();
            let tail: String = text
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(if tail.is_empty() {
                format!("the {which} hook failed ({status})")
            } else {
                format!("the {which} hook failed ({status}): {tail}")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HookVars {
        HookVars {
            server_id: 7,
            name: "web'; rm -rf /".into(),
            hostname: "h".into(),
            backup_id: 3,
            disks: vec!["/a b".into()],
        }
    }

    #[test]
    fn placeholders_are_quoted() {
        assert_eq!(
            render("echo {server_id} {name} {disks}", &vars()),
            r"echo 7 'web'\''; rm -rf /' '/a b'"
        );
    }

    #[tokio::test]
    async fn hooks_report_failures_and_timeouts() {
        let t = Duration::from_secs(5);
        assert!(
            run_hook("pre_backup", "test {name} = \"web'; rm -rf /\"", &vars(), t)
                .await
                .is_ok()
        );
        let e = run_hook("pre_backup", "echo frozen-fs >&2; exit 3", &vars(), t)
            .await
            .unwrap_err();
        assert!(e.contains("pre_backup") && e.contains("frozen-fs"), "{e}");
        let e = run_hook(
            "post_backup",
            "sleep 5",
            &vars(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
    }

    /// A hook that starts a daemon (a VM, an agent) leaves it holding the
    /// hook's stderr; the hook itself has finished and must count as such.
    #[tokio::test]
    async fn a_background_process_holding_stderr_does_not_time_out_the_hook() {
        let t = Duration::from_secs(3);
        let started = std::time::Instant::now();
        run_hook("post_restore", "sleep 30 & echo done >&2", &vars(), t)
            .await
            .expect("the hook exited 0 at once");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // A failing one still reports its stderr.
        let e = run_hook(
            "pre_backup",
            "sleep 30 & echo broken >&2; exit 2",
            &vars(),
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("broken") && !e.contains("did not finish"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
}
