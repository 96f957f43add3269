//! Real VMs with no guest OS for the running-server tests: a
//! `qemu-system-x86_64` started directly (QMP) or a libvirt domain (a
//! `libvirtd` started here if none runs). Guest writes are QEMU's own
//! `qemu-io` on the virtio device, through HMP: they go through the
//! device like a guest's, image locks and all.
//!
//! Included by path (`#[path = "common/vm.rs"] mod vm;`) by the tests that
//! need it. When qemu-system or libvirt is not installed, the tests skip
//! with a loud message, except in CI (`CI` or `VPSBACKUP_CI` set), where
//! they fail: `.ci/vm.sh` installs both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use vpsbackup_engine::qmp::Qmp;

/// True when every tool is installed; otherwise skips loudly, or fails in
/// CI.
pub fn available(tools: &[&str]) -> bool {
    let path = std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/sbin";
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !path.split(':').any(|d| Path::new(d).join(t).is_file()))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some() || std::env::var_os("VPSBACKUP_CI").is_some();
    assert!(
        !ci,
        "{missing:?} missing in CI: .ci/vm.sh installs qemu-system and libvirt"
    );
    eprintln!(
        "\n*** SKIPPED: {missing:?} not installed; run `bash .ci/vm.sh` to test running servers on a real VM ***\n"
    );
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(args: &[&str]) -> String {
    run(Command::new("virsh").arg("-q").args(args))
}

static DAEMONS: Mutex<()> = Mutex::new(());

/// Starts virtlogd and libvirtd by hand (there is no systemd here) unless
/// each answers already; returns once both do. A socket file alone proves
/// nothing: a machine image or a killed daemon leaves stale ones behind
/// (CI's fresh machine had `/run/libvirt/virtlogd-sock` with no virtlogd,
/// and every domain start failed with "Connection refused").
pub fn libvirtd() {
    let _one = DAEMONS.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::create_dir_all("/var/log/libvirt/qemu").unwrap();
    daemon("virtlogd", "/run/libvirt/virtlogd-sock");
    daemon("libvirtd", "/run/libvirt/libvirt-sock");
    let answers = || {
        Command::new("virsh")
            .args(["-q", "uri"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !answers() {
        assert!(
            Instant::now() < deadline,
            "libvirtd does not answer `virsh uri`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `name -d` unless something accepts connections on `socket`;
/// a stale socket file is removed first (the daemon would not bind over
/// it). Returns once the socket accepts.
fn daemon(name: &str, socket: &str) {
    let accepts = || std::os::unix::net::UnixStream::connect(socket).is_ok();
    if accepts() {
        return;
    }
    let _ = std::fs::remove_file(socket);
    run(Command::new(name).arg("-d"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !accepts() {
        assert!(
            Instant::now() < deadline,
            "{name} did not listen on {socket}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A libvirt domain with no guest OS, paused (TCG; QEMU runs and holds its
/// disks, no vCPU does anything). Destroyed and undefined on drop.
pub struct Domain {
    pub name: String,
}

impl Domain {
    /// Defines and starts `name` on `disks` (path, QEMU format): disk `i`
    /// is `vd<a+i>`, its device alias `ua-disk<i>`.
    pub fn start(dir: &Path, name: &str, disks: &[(&Path, &str)]) -> Domain {
        libvirtd();
        let name = format!("{name}-{}", std::process::id());
        let mut devices = String::new();
        for (i, (path, format)) in disks.iter().enumerate() {
            devices += &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
                 <source file='{}'/><target dev='vd{}' bus='virtio'/>\
                 <alias name='ua-disk{i}'/></disk>\n",
                path.display(),
                (b'a' + i as u8) as char
            );
        }
        // QEMU 10 refuses libvirt 9's -no-acpi: ACPI on.
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <features><acpi/></features><devices>{devices}\
             <controller type='usb' model='none'/><memballoon model='none'/>\
             </devices></domain>"
        );
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        virsh(&["define", file.to_str().unwrap()]);
        let d = Domain { name };
        d.boot();
        d
    }

    /// Starts the (defined, shut off) domain, paused.
    pub fn boot(&self) {
        virsh(&["start", "--domain", &self.name, "--paused"]);
    }

    /// Stops QEMU at once, as pulling the plug would.
    pub fn destroy(&self) {
        virsh(&["destroy", "--domain", &self.name]);
    }

    /// The guest writes `len` bytes of `byte` at `at` on disk `disk`.
    pub fn write(&self, disk: usize, byte: u8, at: u64, len: u64) {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/ua-disk{disk}/virtio-backend \"write -P {byte} {at} {len}\""
        );
        let out = virsh(&[
            "qemu-monitor-command",
            "--domain",
            &self.name,
            "--hmp",
            &cmd,
        ]);
        assert!(
            !out.contains("rror") && !out.contains("ailed"),
            "guest write: {out}"
        );
    }

    /// libvirt's checkpoints of the domain, oldest first.
    pub fn checkpoints(&self) -> Vec<String> {
        virsh(&[
            "checkpoint-list",
            "--domain",
            &self.name,
            "--name",
            "--topological",
        ])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
    }

    /// Whether a backup job runs in the domain.
    pub fn has_job(&self) -> bool {
        virsh(&["domjobinfo", "--domain", &self.name])
            .lines()
            .any(|l| l.starts_with("Operation:") && l.contains("Backup"))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        for args in [
            vec!["destroy", "--domain", &self.name],
            vec!["undefine", "--domain", &self.name, "--checkpoints-metadata"],
        ] {
            let _ = Command::new("virsh")
                .arg("-q")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A qemu-system VM with no guest OS, running (TCG, `-S`: no vCPU runs),
/// driven directly: QMP on `qmp` for vpsbackup, a second QMP socket for
/// the test's guest writes (QMP serves one client at a time).
pub struct Vm {
    child: Child,
    pub qmp: PathBuf,
    test_qmp: Mutex<Qmp>,
}

impl Vm {
    /// Starts on `disks` (path, QEMU format); disk `i` is device `vd<i>`.
    pub fn start(dir: &Path, disks: &[(&Path, &str)]) -> Vm {
        let qmp = dir.join("vm-qmp.sock");
        let test = dir.join("vm-test.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-nographic",
            "-S",
            "-m",
            "64",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
        ]);
        for (i, (path, format)) in disks.iter().enumerate() {
            cmd.arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=file{i}",
                    path.display()
                ))
                .arg("-blockdev")
                .arg(format!("driver={format},file=file{i},node-name=disk{i}"))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
        }
        for s in [&qmp, &test] {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", s.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(qmp.exists() && test.exists()) {
            assert!(Instant::now() < deadline, "qemu-system did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket file exists from QEMU's bind, a moment before it
        // listens: a connect in between is refused.
        let test_qmp = loop {
            match Qmp::connect(&test) {
                Ok(qmp) => break Mutex::new(qmp),
                Err(e) => assert!(Instant::now() < deadline, "qemu-system's QMP: {e:?}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Vm {
            child,
            qmp,
            test_qmp,
        }
    }

    /// The guest writes `data` at `at` on disk `disk` (a pattern byte
    /// repeated, as qemu-io writes it).
    pub fn write(&self, disk: usize, byte: u8, at: u64, len: u64) {
        let line = format!(
            "qemu-io -d /machine/peripheral/vd{disk}/virtio-backend \"write -P {byte} {at} {len}\""
        );
        let out = self
            .test_qmp
            .lock()
            .unwrap()
            .execute("human-monitor-command", json!({ "command-line": line }))
            .unwrap();
        let out = out.as_str().unwrap_or_default();
        assert!(
            !out.contains("rror") && !out.contains("ailed"),
            "guest write: {out}"
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the guest sees on an image: its bytes through QEMU.
pub fn guest_bytes(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("guest-view");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

/// Applies a guest write to a model of the disk.
pub fn apply(model: &mut [u8], byte: u8, at: u64, len: u64) {
    model[at as usize..(at + len) as usize].fill(byte);
}
