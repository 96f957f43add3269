//! `serve --demo`: a fresh data dir gets account "demo", a token, and
//! server 12345 "web-server-01" with a small real ext4 disk image (a few MB
//! of real files), so the seed's curl, Python and JavaScript examples work
//! straight away.

use std::path::{Path, PathBuf};
use std::process::Command;

use time::OffsetDateTime;
use vpsbackup_catalog::{
    Catalog, CatalogError, Hooks, ImageFormat, NewServer, NewToken, ServerDisk, ServerId,
    TokenOwner,
};

use crate::auth::generate_token;

pub const DEMO_ACCOUNT: &str = "demo";
pub const DEMO_SERVER_ID: i64 = 12345;
pub const DEMO_SERVER_NAME: &str = "web-server-01";
/// Size of the demo disk image.
pub const DEMO_DISK_SIZE: &str = "64M";
/// How much real file content goes into it.
const DEMO_CONTENT_BYTES: u64 = 6 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot prepare the demo disk image: {0}")]
    Io(#[from] std::io::Error),
    #[error("mke2fs failed to build the demo disk image ({0}); install e2fsprogs")]
    Mke2fs(String),
    #[error("cannot make a token: {0}")]
    Random(String),
}

/// What `ensure_demo` did.
#[derive(Debug)]
pub enum DemoOutcome {
    /// Made everything; the token is shown this once.
    Created { token: String, disk: PathBuf },
    /// The demo account was there already.
    AlreadyThere,
}

/// Creates the demo account, token, server and disk unless the account exists.
pub async fn ensure_demo(
    catalog: &dyn Catalog,
    data_dir: &Path,
    now: OffsetDateTime,
) -> Result<DemoOutcome, DemoError> {
    if catalog.account_by_name(DEMO_ACCOUNT).await?.is_some() {
        return Ok(DemoOutcome::AlreadyThere);
    }
    let disk = data_dir
        .join("demo")
        .join(format!("{DEMO_SERVER_NAME}.img"));
    let disk_for_task = disk.clone();
    tokio::task::spawn_blocking(move || make_demo_disk(&disk_for_task))
        .await
        .map_err(|e| DemoError::Io(std::io::Error::other(e)))??;

    let account = catalog.create_account(DEMO_ACCOUNT, now).await?;
    let plan = catalog
        .plan_by_name("standard")
        .await?
        .ok_or(CatalogError::NotFound("Plan"))?;
    catalog
        .add_server(
            NewServer {
                id: ServerId(DEMO_SERVER_ID),
                name: DEMO_SERVER_NAME.into(),
                hostname: "web-server-01.example.com".into(),
                account_id: account.id,
                plan_id: plan.id,
                // Made here by mke2fs: raw, whatever its guest writes later.
                disks: vec![ServerDisk::new(disk.to_string_lossy(), ImageFormat::Raw)],
                hooks: Hooks::default(),
                runtime: Default::default(),
                // The first `serve` with workers takes it for its node.
                node: None,
            },
            now,
        )
        .await?;
    let token = generate_token().map_err(|e| DemoError::Random(e.to_string()))?;
    catalog
        .create_token(
            NewToken {
                hash: token.hash,
                prefix: token.prefix.clone(),
                name: "demo".into(),
                owner: TokenOwner::Account(account.id),
            },
            now,
        )
        .await?;
    Ok(DemoOutcome::Created {
        token: token.secret,
        disk,
    })
}

/// Builds a raw ext4 image holding a few MB of real files from the host.
pub fn make_demo_disk(image: &Path) -> Result<(), DemoError> {
    let parent = image.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let content = parent.join(".demo-content");
    if content.exists() {
        std::fs::remove_dir_all(&content)?;
    }
    std::fs::create_dir_all(content.join("var/www/html"))?;
    std::fs::write(
        content.join("var/www/html/index.html"),
        "<!doctype html><title>web-server-01</title><h1>It works</h1>\n",
    )?;
    std::fs::write(
        content.join("README"),
        "Demo disk of server 12345 (web-server-01), made by `vpsbackup serve --demo`.\n",
    )?;
    let mut budget = DEMO_CONTENT_BYTES;
    for source in ["/usr/share/doc", "/usr/share/common-licenses", "/etc"] {
        if budget == 0 {
            break;
        }
        let target = content
            .join("usr-share")
            .join(source.trim_start_matches('/').replace('/', "_"));
        copy_some(Path::new(source), &target, &mut budget);
    }
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&content)
        .arg("-F")
        .arg(image)
        .arg(DEMO_DISK_SIZE)
        .output()
        .map_err(|e| DemoError::Mke2fs(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&content);
    if !out.status.success() {
        return Err(DemoError::Mke2fs(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Copies readable regular files from `src` into `dst` until `budget` bytes
/// are used; unreadable entries are skipped (this is sample content).
fn copy_some(src: &Path, dst: &Path, budget: &mut u64) {
    let Ok(entries) = std::fs::read_dir(src) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if *budget == 0 {
            return;
        }
        let Ok(ft) = entry.file_type() else { continue };
        let from = entry.path();
        let to = dst.join(entry.file_name());
        if ft.is_dir() {
            copy_some(&from, &to, budget);
        } else if ft.is_file() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.len() > *budget {
                continue;
            }
            if std::fs::create_dir_all(dst).is_err() {
                return;
            }
            if std::fs::copy(&from, &to).is_ok() {
                *budget = budget.saturating_sub(meta.len());
            }
        }
    }
}
