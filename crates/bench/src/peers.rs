//! restic and borg driven on the same images in the same run, so the ratios
//! compare tools on the same machine under the same load. Settings follow
//! ANCHORS.md: restic with its default (zstd auto) compression, borg 1.2
//! with `-e none` and `--compression zstd,3`. Their caches live in the run's
//! work dir so every run starts cold, like ours.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::measure::{run_measured, Measured};

/// One peer tool, set up in its own directory under the work dir.
pub struct Peer {
    pub name: &'static str,
    dir: PathBuf,
}

impl Peer {
    /// Prepares a fresh repository for `name` ("restic" or "borg") in `work`.
    pub fn init(name: &'static str, work: &Path) -> anyhow::Result<Peer> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let peer = Peer { name, dir };
        let mut cmd = peer.command();
        match name {
            "restic" => cmd.arg("init"),
            "borg" => cmd.args(["init", "-e", "none"]).arg(peer.repo()),
            _ => bail!("unknown peer {name}"),
        };
        run_measured(&mut cmd, &peer.log("init"))?;
        Ok(peer)
    }

    /// True when the tool is installed.
    pub fn available(name: &str) -> bool {
        let probe = if name == "restic" {
            "version"
        } else {
            "--version"
        };
        Command::new(name)
            .arg(probe)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.join("repo")
    }

    fn log(&self, step: &str) -> PathBuf {
        self.dir.join(format!("{step}.log"))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(self.name);
        match self.name {
            "restic" => {
                cmd.env("RESTIC_REPOSITORY", self.repo())
                    .env("RESTIC_PASSWORD", "vpsbackup-bench")
                    .env("XDG_CACHE_HOME", self.dir.join("cache"));
            }
            _ => {
                cmd.env("BORG_BASE_DIR", self.dir.join("base"))
                    .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
                    .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
            }
        }
        cmd
    }

    /// Backs up one image file as archive/snapshot `name` of `host`.
    pub fn backup(&self, name: &str, host: &str, image: &Path) -> anyhow::Result<Measured> {
        let mut cmd = self.command();
        match self.name {
            "restic" => cmd.args(["backup", "--host", host]).arg(image),
            _ => cmd
                .args(["create", "--compression", "zstd,3"])
                .arg(format!("{}::{host}-{name}", self.repo().display()))
                .arg(image),
        };
        run_measured(&mut cmd, &self.log(&format!("backup-{name}")))
    }

    /// Restores the backup of `image` named `name` of `host` into `target_dir`;
    /// returns the measurement and the restored file's path.
    pub fn restore(
        &self,
        name: &str,
        host: &str,
        image: &Path,
        target_dir: &Path,
    ) -> anyhow::Result<(Measured, PathBuf)> {
        std::fs::create_dir_all(target_dir)?;
        let mut cmd = self.command();
        match self.name {
            "restic" => cmd
                .args(["restore", "latest", "--host", host, "--path"])
                .arg(image)
                .arg("--target")
                .arg(target_dir),
            _ => cmd
                .current_dir(target_dir)
                .arg("extract")
                .arg(format!("{}::{host}-{name}", self.repo().display())),
        };
        let m = run_measured(&mut cmd, &self.log(&format!("restore-{name}")))?;
        // Both keep the absolute path under the target, without its leading '/'.
        let relative = image.strip_prefix("/").unwrap_or(image);
        let restored = target_dir.join(relative);
        if !restored.exists() {
            bail!("{} restored nothing at {}", self.name, restored.display());
        }
        Ok((m, restored))
    }
}

/// The absolute form of `path` (peers record absolute paths).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))
}
