//! A point-in-time view of a libvirt domain's disks, read over NBD.
//!
//! For a server whose runtime is `libvirt`, libvirtd owns the QEMU (and
//! its QMP socket), so the point in time is libvirt's own pull-mode backup:
//! `virsh backup-begin` with a `<domainbackup mode='pull'>` that names a
//! scratch file per disk (copy-before-write, as the QMP path does by hand)
//! and a unix socket in our scratch directory, where libvirt's QEMU
//! exports each disk under its target name (`vda`). The export is read with
//! [`crate::nbd_export`], like the QMP path's.
//!
//! Checkpoints are libvirt's own (`<domaincheckpoint>`, named
//! `vpsbackup-<backup id>`, a persistent dirty bitmap on every qcow2 disk).
//! With a base checkpoint the backup is `<incremental>` from it, and libvirt
//! exports what changed since as the meta context
//! `qemu:dirty-bitmap:backup-<target>`. In libvirt 9 every checkpoint's
//! bitmap keeps recording, so the base's stays whole whatever happens to
//! the new one: after a completed backup the base checkpoint is deleted
//! (the new one is the next base); after a failed one the new checkpoint
//! is deleted. At the start of each job every checkpoint of ours but the
//! base is deleted (a crashed job's, a deleted backup's). Raw disks take no
//! checkpoint in libvirt (`checkpoint='no'`, `backupmode='full'`), nor do
//! disks without a base checkpoint; a base libvirt refuses (its bitmap is
//! missing or inconsistent after QEMU was killed) is deleted and the backup
//! begins again as a full one: each such disk is read in full with the
//! reason.
//!
//! libvirtd is driven through `virsh` (libvirt-clients), each call bounded
//! by a timeout, XML built here; no C library is linked. A leftover backup
//! job of ours (its export on our socket) from a crash is found with
//! `domjobinfo`/`backup-dumpxml` and ended with `domjobabort` at the next
//! job; teardown ends our job on every path (end, error, drop). The guest
//! is frozen with `virsh domfsfreeze` just around `backup-begin` when its
//! agent answers, and thawed at once; otherwise the view is
//! crash-consistent and [`LibvirtPointInTime::frozen`] says why.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nbd_export::NbdExport;
use crate::point_in_time::{
    dirty_extents, export_reader, free_space, no_disk, remove_overlays, watch_scratch, Checkpoint,
    NbdExportReader,
};
use crate::{DiskError, DiskFormat, Extent};

/// Prefix of every checkpoint we create in libvirt.
const PREFIX: &str = "vpsbackup-";
/// How long one `virsh` call may take (the first call after libvirtd
/// starts probes QEMU's capabilities: ~8 s here).
const VIRSH_WAIT: Duration = Duration::from_secs(120);
/// How long a guest agent may take to freeze (it flushes dirty pages).
const FREEZE_WAIT: Duration = Duration::from_secs(60);

/// A `virsh` call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("cannot run virsh (install libvirt-clients): {0}")]
    Spawn(std::io::Error),
    #[error("virsh {command} did not answer within {0:?}", .wait)]
    Timeout { command: String, wait: Duration },
    #[error("virsh {command}: {stderr}")]
    Failed { command: String, stderr: String },
}

impl VirshError {
    /// libvirt's own words, for telling one refusal from another.
    fn stderr(&self) -> &str {
        match self {
            VirshError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Runs `virsh ARGS` (the connection URI from `LIBVIRT_DEFAULT_URI`, else
/// libvirt's default) and returns its standard output.
pub fn virsh(args: &[&str], wait: Duration) -> Result<String, VirshError> {
    let command = args.first().copied().unwrap_or_default().to_owned();
    let mut child = Command::new("virsh")
        .args(["-q"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VirshError::Spawn)?;
    // Read both pipes meanwhile: a large answer must not block the child.
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|o| Box::new(o) as _));
    let err = pipe(child.stderr.take().map(|e| Box::new(e) as _));
    let deadline = Instant::now() + wait;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VirshError::Timeout { command, wait });
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(VirshError::Failed {
            command,
            stderr: stderr.trim().trim_start_matches("error: ").to_owned(),
        })
    }
}

/// True if the domain runs (or is paused: its QEMU holds the disks).
pub fn domain_is_active(domain: &str) -> Result<bool, VirshError> {
    let state = virsh(&["domstate", "--domain", domain], VIRSH_WAIT)?;
    Ok(matches!(
        state.trim(),
        "running" | "paused" | "in shutdown" | "pmsuspended"
    ))
}

/// One disk of a domain: its target (`vda`) and its source file or device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    pub target: String,
    pub source: PathBuf,
}

/// The domain's disks (CD-ROMs, floppies and empty drives left out), from
/// `virsh domblklist --details`.
pub fn domain_disks(domain: &str) -> Result<Vec<DomainDisk>, VirshError> {
    let out = virsh(&["domblklist", "--domain", domain, "--details"], VIRSH_WAIT)?;
    Ok(parse_domblklist(&out))
}

/// `Type Device Target Source` rows; the source is the rest of the line (a
/// path may hold spaces).
fn parse_domblklist(out: &str) -> Vec<DomainDisk> {
    fn word(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start();
        let end = s.find(char::is_whitespace)?;
        Some((&s[..end], &s[end..]))
    }
    out.lines()
        .filter_map(|line| {
            let (_kind, rest) = word(line)?;
            let (device, rest) = word(rest)?;
            let (target, rest) = word(rest)?;
            let source = rest.trim();
            (device == "disk" && !source.is_empty() && source != "-").then(|| DomainDisk {
                target: target.to_owned(),
                source: PathBuf::from(source),
            })
        })
        .collect()
}

/// Our checkpoints of the domain, oldest first.
pub fn checkpoints(domain: &str) -> Result<Vec<String>, VirshError> {
    let out = virsh(
        &[
            "checkpoint-list",
            "--domain",
            domain,
            "--name",
            "--topological",
        ],
        VIRSH_WAIT,
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Deletes a checkpoint with its bitmaps; if libvirt cannot remove the
/// bitmaps (they are gone: QEMU was killed, the image rewritten), its
/// metadata alone.
pub fn delete_checkpoint(domain: &str, name: &str) -> Result<(), VirshError> {
    let args = [
        "checkpoint-delete",
        "--domain",
        domain,
        "--checkpointname",
        name,
    ];
    match virsh(&args, VIRSH_WAIT) {
        Ok(_) => Ok(()),
        Err(VirshError::Failed { .. }) => {
            let mut meta = args.to_vec();
            meta.push("--metadata");
            virsh(&meta, VIRSH_WAIT).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// The libvirt checkpoint of backup `id`.
pub fn checkpoint_name(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Escapes text for an XML attribute or element.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// How to take a libvirt point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibvirtOptions {
    /// Start the new backup's checkpoint, and read the base's changes.
    pub checkpoint: Option<Checkpoint>,
    /// Scratch bytes the scratch files may take (see
    /// [`crate::point_in_time::TakeOptions::scratch_limit`]).
    pub scratch_limit: Option<u64>,
}

/// The point in time of one libvirt domain's disks, live until dropped.
pub struct LibvirtPointInTime {
    domain: String,
    scratch: PathBuf,
    nbd_socket: PathBuf,
    disks: Vec<LvDisk>,
    /// The checkpoint this backup created, once `backup-begin` made it.
    new_checkpoint: Option<String>,
    /// The base checkpoint the backup was incremental from.
    base_checkpoint: Option<String>,
    completed: bool,
    frozen: Result<u64, String>,
    overran: Arc<AtomicBool>,
    watch_stop: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    torn_down: bool,
}

struct LvDisk {
    target: String,
    size: u64,
    /// The meta context of the changes since the base, or why none.
    changes: Result<String, String>,
}

fn virsh_err(domain: &str) -> impl Fn(VirshError) -> DiskError + '_ {
    move |e| DiskError::Unsupported {
        path: PathBuf::from(format!("libvirt domain {domain}")),
        reason: format!("libvirt refused the point in time: {e}"),
    }
}

/// Paths equal, or naming the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

impl LibvirtPointInTime {
    /// Takes the point in time of `disks` (image paths as the domain names
    /// them, with the format each was recorded as) of `domain`, with
    /// scratch files and the NBD socket in `scratch` (created if missing).
    pub fn take(
        domain: &str,
        disks: &[(PathBuf, DiskFormat)],
        scratch: &Path,
        opts: &LibvirtOptions,
    ) -> Result<LibvirtPointInTime, DiskError> {
        let err = virsh_err(domain);
        fs::create_dir_all(scratch).map_err(|source| DiskError::Io {
            op: "create the scratch directory",
            path: scratch.to_owned(),
            source,
        })?;
        let nbd_socket = scratch.join("nbd.sock");
        end_leftover_job(domain, &nbd_socket).map_err(&err)?;
        remove_overlays(scratch);
        let _ = fs::remove_file(&nbd_socket);

        let in_domain = domain_disks(domain).map_err(&err)?;
        let mut targets = Vec::with_capacity(disks.len());
        for (path, _) in disks {
            let d = in_domain
                .iter()
                .find(|d| same_file(&d.source, path))
                .ok_or_else(|| DiskError::Unsupported {
                    path: path.clone(),
                    reason: format!("libvirt domain {domain} has no disk with this file"),
                })?;
            targets.push(d.target.clone());
        }

        // Our checkpoints: the base's is kept, any other (a crashed or
        // failed job's, a deleted backup's) goes.
        let checkpoint = opts.checkpoint.as_ref();
        let ours = checkpoints(domain).map_err(&err)?;
        let wanted = checkpoint
            .and_then(|c| c.base.as_deref())
            .map(checkpoint_name);
        let base = wanted.clone().filter(|b| ours.contains(b));
        for c in ours.iter().rev().filter(|c| Some(*c) != base.as_ref()) {
            delete_checkpoint(domain, c).map_err(&err)?;
        }
        let no_base = match (&wanted, &base) {
            (None, _) => "there is no earlier backup to build on",
            (Some(_), None) => {
                "libvirt has no checkpoint of the previous backup (it was deleted, or the \
                 domain was redefined without it)"
            }
            (Some(_), Some(_)) => "",
        };
        let changes: Vec<Result<String, String>> = disks
            .iter()
            .zip(&targets)
            .map(|((_, format), target)| match format {
                _ if checkpoint.is_none() => Err("no checkpoint was asked for".to_owned()),
                DiskFormat::Qcow2 if base.is_some() => {
                    Ok(format!("qemu:dirty-bitmap:backup-{target}"))
                }
                DiskFormat::Qcow2 => Err(no_base.to_owned()),
                _ => {
                    Err("libvirt keeps checkpoints only on qcow2 disks; this one is raw".to_owned())
                }
            })
            .collect();

        let mut pit = LibvirtPointInTime {
            domain: domain.to_owned(),
            scratch: scratch.to_owned(),
            nbd_socket,
            disks: Vec::new(),
            new_checkpoint: None,
            base_checkpoint: None,
            completed: false,
            frozen: Err("the point in time was not taken".into()),
            overran: Arc::new(AtomicBool::new(false)),
            watch_stop: Arc::new(AtomicBool::new(false)),
            watchdog: None,
            torn_down: false,
        };
        let new = checkpoint.map(|c| checkpoint_name(&c.new));
        let formats: Vec<DiskFormat> = disks.iter().map(|(_, f)| *f).collect();
        let mut changes = changes;
        // `<incremental>` only when some disk builds on the base.
        let incremental = base
            .as_deref()
            .filter(|_| changes.iter().any(Result::is_ok));
        let mut begun = pit.begin(
            &in_domain,
            &targets,
            &formats,
            &changes,
            incremental,
            new.as_deref(),
        );
        if let (Err(e), Some(b)) = (&begun, incremental) {
            let said = e.stderr().to_ascii_lowercase();
            if said.contains("bitmap") || said.contains("checkpoint") {
                // libvirt checks the base's bitmaps before it starts: a
                // missing or inconsistent one (QEMU was killed) ends the
                // chain. Begin again as a full backup.
                let why = format!(
                    "libvirt refused to build on the previous backup's checkpoint (its dirty \
                     bitmap is missing or inconsistent: {})",
                    plain(e.stderr())
                );
                delete_checkpoint(domain, b).map_err(&err)?;
                for c in changes.iter_mut().filter(|c| c.is_ok()) {
                    *c = Err(why.clone());
                }
                begun = pit.begin(
                    &in_domain,
                    &targets,
                    &formats,
                    &changes,
                    None,
                    new.as_deref(),
                );
            }
        }
        begun.map_err(&err)?;
        pit.new_checkpoint = new;
        pit.base_checkpoint = base.filter(|_| changes.iter().any(Result::is_ok));

        for (target, changes) in targets.into_iter().zip(changes) {
            let size = NbdExport::connect(&pit.nbd_socket, &target, &[])
                .map_err(|source| DiskError::Io {
                    op: "connect to the point-in-time export on",
                    path: pit.nbd_socket.clone(),
                    source,
                })?
                .size();
            pit.disks.push(LvDisk {
                target,
                size,
                changes,
            });
        }
        let sizes: u64 = pit.disks.iter().map(|d| d.size).sum();
        let limit = opts
            .scratch_limit
            .unwrap_or((sizes / 4).max(1 << 30))
            .min(free_space(scratch).map_or(u64::MAX, |f| f / 10 * 9));
        pit.watchdog = Some(watch_scratch(
            scratch.to_owned(),
            limit,
            pit.overran.clone(),
            pit.watch_stop.clone(),
        ));
        Ok(pit)
    }

    /// `backup-begin`, the guest frozen around it when its agent answers.
    fn begin(
        &mut self,
        in_domain: &[DomainDisk],
        targets: &[String],
        formats: &[DiskFormat],
        changes: &[Result<String, String>],
        base: Option<&str>,
        new: Option<&str>,
    ) -> Result<(), VirshError> {
        let mut backup = String::from("<domainbackup mode='pull'>\n");
        if let Some(b) = base {
            backup += &format!("  <incremental>{}</incremental>\n", xml_escape(b));
        }
        backup += &format!(
            "  <server transport='unix' socket='{}'/>\n  <disks>\n",
            xml_escape(&self.nbd_socket.to_string_lossy())
        );
        let mut checkpoint = format!(
            "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
            xml_escape(new.unwrap_or_default())
        );
        for d in in_domain {
            let target = xml_escape(&d.target);
            match targets.iter().position(|t| *t == d.target) {
                Some(i) => {
                    let mode = if changes[i].is_ok() {
                        "incremental"
                    } else {
                        "full"
                    };
                    let scratch = self.scratch.join(format!("fleece-{}.qcow2", d.target));
                    backup += &format!(
                        "    <disk name='{target}' backup='yes' type='file' backupmode='{mode}'>\
                         <scratch file='{}'/></disk>\n",
                        xml_escape(&scratch.to_string_lossy())
                    );
                    let cp = if formats[i] == DiskFormat::Qcow2 {
                        "bitmap"
                    } else {
                        "no"
                    };
                    checkpoint += &format!("    <disk name='{target}' checkpoint='{cp}'/>\n");
                }
                None => {
                    backup += &format!("    <disk name='{target}' backup='no'/>\n");
                    checkpoint += &format!("    <disk name='{target}' checkpoint='no'/>\n");
                }
            }
        }
        backup += "  </disks>\n</domainbackup>\n";
        checkpoint += "  </disks>\n</domaincheckpoint>\n";
        let with_checkpoint = new.is_some() && formats.contains(&DiskFormat::Qcow2);

        let io = |e: std::io::Error| VirshError::Failed {
            command: "backup-begin".into(),
            stderr: format!("cannot write its XML files: {e}"),
        };
        let backup_xml = self.scratch.join("backup.xml");
        let checkpoint_xml = self.scratch.join("checkpoint.xml");
        fs::write(&backup_xml, backup).map_err(io)?;
        fs::write(&checkpoint_xml, checkpoint).map_err(io)?;
        let (bx, cx) = (
            backup_xml.to_string_lossy(),
            checkpoint_xml.to_string_lossy(),
        );
        let mut args = vec!["backup-begin", "--domain", &self.domain, "--backupxml", &bx];
        if with_checkpoint {
            args.extend(["--checkpointxml", &cx]);
        }

        // The instant: frozen only around it.
        let domain = self.domain.clone();
        let froze = virsh(&["domfsfreeze", "--domain", &domain], FREEZE_WAIT);
        let begun = virsh(&args, VIRSH_WAIT);
        self.frozen = match froze {
            Ok(out) => {
                let thawed = virsh(&["domfsthaw", "--domain", &domain], VIRSH_WAIT);
                let n = out
                    .split_whitespace()
                    .find_map(|w| w.parse::<u64>().ok())
                    .unwrap_or(0);
                thawed.map(|_| n).map_err(|e| {
                    format!(
                        "the guest agent did not confirm the thaw ({})",
                        plain(e.stderr())
                    )
                })
            }
            Err(e) => Err(format!(
                "the guest agent did not freeze the guest ({})",
                plain(e.stderr())
            )),
        };
        let _ = fs::remove_file(&backup_xml);
        let _ = fs::remove_file(&checkpoint_xml);
        begun.map(|_| ())
    }

    /// How many filesystems the guest agent froze for the instant, or why
    /// the point in time is only crash-consistent.
    pub fn frozen(&self) -> Result<u64, String> {
        self.frozen.clone()
    }

    /// What may have changed on disk `i` since the base backup, or why it
    /// is not known (read the disk in full).
    pub fn changes(&self, i: usize) -> Result<Vec<Extent>, String> {
        let d = self.disks.get(i).ok_or("no such disk")?;
        let context = d.changes.as_ref().map_err(Clone::clone)?;
        dirty_extents(&self.nbd_socket, &d.target, context)
    }

    /// A reader of disk `i` as it was at the point in time.
    pub fn reader(&self, i: usize, format: DiskFormat) -> Result<NbdExportReader, DiskError> {
        let d = self
            .disks
            .get(i)
            .ok_or_else(|| no_disk(&self.nbd_socket, i))?;
        export_reader(&self.nbd_socket, &d.target, d.size, format, &self.overran)
    }

    /// True when the guest overwrote more during the backup than the
    /// scratch limit allows (the reads were stopped).
    pub fn overran(&self) -> bool {
        self.overran.load(Ordering::SeqCst)
    }

    /// Ends the backup job (libvirt removes its scratch files) and settles
    /// the checkpoints: after a `completed` backup the base's goes, else
    /// the new one (the base's bitmap recorded all along).
    pub fn finish(mut self, completed: bool) -> Result<(), DiskError> {
        self.completed = completed;
        self.teardown()
    }

    /// Hangs up without ending anything, as a crashed job would: the job,
    /// its export and the new checkpoint stay for the next job to find (for
    /// tests of that path).
    pub fn abandon(mut self) {
        self.torn_down = true;
        self.watch_stop.store(true, Ordering::SeqCst);
    }

    fn teardown(&mut self) -> Result<(), DiskError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.watch_stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let err = virsh_err(&self.domain);
        let ended = end_leftover_job(&self.domain, &self.nbd_socket).map_err(&err);
        remove_overlays(&self.scratch);
        let _ = fs::remove_file(&self.nbd_socket);
        ended?;
        let stale = if self.completed {
            self.base_checkpoint.take()
        } else {
            self.new_checkpoint.take()
        };
        if let Some(c) = stale {
            delete_checkpoint(&self.domain, &c).map_err(&err)?;
        }
        Ok(())
    }
}

impl Drop for LibvirtPointInTime {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// libvirt's words without anything that looks like a host path.
fn plain(stderr: &str) -> String {
    let s: Vec<&str> = stderr
        .split_whitespace()
        .map(|w| {
            if w.trim_matches(['\'', '"']).starts_with('/') {
                "(path)"
            } else {
                w
            }
        })
        .collect();
    s.join(" ")
}

/// Ends the domain's backup job if it is ours (its export on `socket`: a
/// crashed job's, or this one's at teardown); another's is an error, as
/// libvirt runs one backup job per domain.
fn end_leftover_job(domain: &str, socket: &Path) -> Result<(), VirshError> {
    let info = virsh(&["domjobinfo", "--domain", domain], VIRSH_WAIT)?;
    let backup = info
        .lines()
        .any(|l| l.starts_with("Operation:") && l.contains("Backup"));
    if !backup {
        return Ok(());
    }
    let xml = virsh(&["backup-dumpxml", "--domain", domain], VIRSH_WAIT)?;
    let ours = xml.contains(&format!(
        "socket='{}'",
        xml_escape(&socket.to_string_lossy())
    ));
    if !ours {
        return Err(VirshError::Failed {
            command: "backup-begin".into(),
            stderr: "another backup job of the domain is running in libvirt".into(),
        });
    }
    virsh(&["domjobabort", "--domain", domain], VIRSH_WAIT)?;
    // The abort returns once libvirt asked QEMU to end the job; the job is
    // gone when domjobinfo says so.
    let deadline = Instant::now() + VIRSH_WAIT;
    loop {
        let info = virsh(&["domjobinfo", "--domain", domain], VIRSH_WAIT)?;
        if !info
            .lines()
            .any(|l| l.starts_with("Operation:") && l.contains("Backup"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(VirshError::Timeout {
                command: "domjobabort".into(),
                wait: VIRSH_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domblklist_rows_keep_paths_with_spaces_and_skip_empty_drives() {
        let out = " file   disk     vda      /var/lib/vm 1/d0.qcow2\n \
                   block  disk     vdb      /dev/sdb\n \
                   file   cdrom    sda      -\n";
        assert_eq!(
            parse_domblklist(out),
            vec![
                DomainDisk {
                    target: "vda".into(),
                    source: "/var/lib/vm 1/d0.qcow2".into()
                },
                DomainDisk {
                    target: "vdb".into(),
                    source: "/dev/sdb".into()
                },
            ]
        );
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(xml_escape("a'b<&>\""), "a&apos;b&lt;&amp;&gt;&quot;");
    }

    #[test]
    fn plain_hides_paths() {
        assert_eq!(
            plain("missing bitmap in '/var/lib/x.qcow2' for disk vda"),
            "missing bitmap in (path) for disk vda"
        );
    }
}
