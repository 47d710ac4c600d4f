//! Choosing and driving the emulator: QEMU with KVM where the host has VT-x (nested), Bochs
//! everywhere else; QEMU's TCG (software) with an AMD CPU model that has SVM and nested paging
//! for Ally's SVM backend.

use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::bochs::{self, BochsConfig};
use crate::tool;

/// Which emulator runs the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    Bochs,
    /// QEMU with KVM: needs /dev/kvm and a CPU with VMX (nested VT-x for Ally's own VMX).
    QemuKvm,
    /// QEMU's software emulation with an AMD CPU model that has SVM and nested paging
    /// ([`QEMU_TCG_CPU`]): runs Ally's SVM backend, and boots the guest alone (the baseline)
    /// in a few minutes. TCG emulates no VMX.
    QemuTcg,
}

impl Emulator {
    /// QEMU (KVM or TCG), not Bochs.
    pub fn is_qemu(self) -> bool {
        matches!(self, Emulator::QemuKvm | Emulator::QemuTcg)
    }
}

/// QEMU's `-cpu` under TCG: the `EPYC-v1` model (AuthenticAMD, family 23, Zen) with `svm`
/// and `npt` turned on, minus the nine features of the model QEMU 7.2's TCG cannot emulate
/// (it would warn about each and drop it at start; `nrip-save` is one of them: no next-RIP on
/// #VMEXIT under TCG). A fixed, named AMD model: unlike `max`, whose feature set follows the
/// QEMU version (7.2's adds 5-level paging, which the Debian 6.1 guest then turns on).
pub const QEMU_TCG_CPU: &str = "EPYC-v1,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec";

/// The QEMU machine type (`--machine`): `pc` (i440FX + PIIX3, IDE; Bochs' shape) or `q35`
/// (ICH9: PCI Express with MMCONFIG, an ACPI MCFG table, AHCI instead of IDE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    #[default]
    Pc,
    Q35,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        })
    }
}

impl FromStr for Machine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pc" => Ok(Machine::Pc),
            "q35" => Ok(Machine::Q35),
            other => Err(format!("unknown machine `{other}`: expected pc or q35")),
        }
    }
}

/// The IOMMU QEMU emulates (`--iommu`; issue 14's DMA protection): none, Intel VT-d
/// (`intel-iommu`) or AMD-Vi (`amd-iommu`). QEMU 7.2 offers both on `q35` only (the `pc`
/// machine refuses them as devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Iommu {
    #[default]
    None,
    Intel,
    Amd,
}

impl Iommu {
    /// The `-device` argument, interrupt remapping on (issue 14 item 3). Under TCG both devices'
    /// `intremap=auto` resolves to on already (no in-kernel irqchip); saying so keeps the
    /// machine the same under KVM, where auto means off with the default irqchip.
    pub fn qemu_device(self) -> Option<&'static str> {
        match self {
            Iommu::None => None,
            Iommu::Intel => Some("intel-iommu,intremap=on"),
            Iommu::Amd => Some("amd-iommu,intremap=on"),
        }
    }
}

impl fmt::Display for Iommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Iommu::None => "none",
            Iommu::Intel => "intel",
            Iommu::Amd => "amd",
        })
    }
}

impl FromStr for Iommu {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Iommu::None),
            "intel" => Ok(Iommu::Intel),
            "amd" => Ok(Iommu::Amd),
            other => Err(format!(
                "unknown IOMMU `{other}`: expected none, intel or amd"
            )),
        }
    }
}

/// The shape of one QEMU machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuMachine {
    pub cpus: u32,
    pub memory_mib: u64,
    /// KVM with the host CPU and its extension (VMX on Intel hosts, SVM on AMD hosts), or
    /// TCG (`None`).
    pub kvm: Option<HostExtension>,
    pub machine: Machine,
    /// `-cpu` (`None`: `host,+vmx` or `host,+svm` under KVM, [`QEMU_TCG_CPU`] under TCG).
    pub cpu: Option<String>,
    /// The emulated IOMMU (`q35` only; the caller refuses it elsewhere).
    pub iommu: Iommu,
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulator::Bochs => "bochs",
            Emulator::QemuKvm => "qemu-kvm",
            Emulator::QemuTcg => "qemu-tcg",
        })
    }
}

/// The user's choice (`--emulator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmulatorChoice {
    #[default]
    Auto,
    Bochs,
    QemuKvm,
    QemuTcg,
}

impl FromStr for EmulatorChoice {
    type Err = EmulatorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EmulatorChoice::Auto),
            "bochs" => Ok(EmulatorChoice::Bochs),
            "qemu" | "qemu-kvm" | "kvm" => Ok(EmulatorChoice::QemuKvm),
            "qemu-tcg" | "tcg" => Ok(EmulatorChoice::QemuTcg),
            other => Err(EmulatorError::UnknownChoice(other.to_string())),
        }
    }
}

/// An error choosing, starting or stopping the emulator.
#[derive(Debug)]
pub enum EmulatorError {
    UnknownChoice(String),
    /// QEMU/KVM was asked for on a host that cannot run Ally under it.
    KvmUnavailable(String),
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

impl fmt::Display for EmulatorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmulatorError::UnknownChoice(s) => {
                write!(
                    f,
                    "unknown emulator `{s}`: expected auto, bochs, qemu or qemu-tcg"
                )
            }
            EmulatorError::KvmUnavailable(why) => {
                write!(f, "QEMU with KVM cannot run Ally here: {why}")
            }
            EmulatorError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            EmulatorError::Spawn { command, source } => write!(
                f,
                "cannot start `{command}`: {source} (run scripts/setup.sh)"
            ),
        }
    }
}

impl std::error::Error for EmulatorError {}

/// The virtualization extension a KVM host offers its guests (nested under KVM, Ally runs on
/// it): Intel's VMX or AMD's SVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostExtension {
    Vmx,
    Svm,
}

impl HostExtension {
    /// QEMU's `-cpu` for it: the host CPU with the extension passed through.
    pub fn qemu_cpu(self) -> &'static str {
        match self {
            HostExtension::Vmx => "host,+vmx",
            HostExtension::Svm => "host,+svm",
        }
    }
}

/// The extension `cpuinfo` (the text of /proc/cpuinfo) lists in its `flags`, if any.
pub fn cpuinfo_extension(cpuinfo: &str) -> Option<HostExtension> {
    let flags = |name: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == name))
    };
    if flags("vmx") {
        Some(HostExtension::Vmx)
    } else if flags("svm") {
        Some(HostExtension::Svm)
    } else {
        None
    }
}

/// The extension this host's KVM offers, when /proc/cpuinfo names one.
pub fn host_extension() -> Option<HostExtension> {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .as_deref()
        .and_then(cpuinfo_extension)
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Why QEMU/KVM cannot be used here, or `None` when it can.
pub fn kvm_unavailable_reason() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    match fs::read_to_string("/proc/cpuinfo") {
        Ok(c) if cpuinfo_extension(&c).is_some() => {}
        Ok(_) => {
            return Some(
                "the CPU has neither the vmx nor the svm flag (no VT-x or AMD-V, or no nested virtualization)"
                    .into(),
            )
        }
        Err(e) => return Some(format!("/proc/cpuinfo: {e}")),
    }
    if !in_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    None
}

impl EmulatorChoice {
    pub fn resolve(self) -> Result<Emulator, EmulatorError> {
        match self {
            EmulatorChoice::Bochs => Ok(Emulator::Bochs),
            EmulatorChoice::QemuKvm => match kvm_unavailable_reason() {
                None => Ok(Emulator::QemuKvm),
                Some(why) => Err(EmulatorError::KvmUnavailable(why)),
            },
            EmulatorChoice::QemuTcg => {
                if in_path("qemu-system-x86_64") {
                    Ok(Emulator::QemuTcg)
                } else {
                    Err(EmulatorError::Spawn {
                        command: "qemu-system-x86_64".into(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "not installed (apt-get install qemu-system-x86)",
                        ),
                    })
                }
            }
            EmulatorChoice::Auto => Ok(match kvm_unavailable_reason() {
                None => Emulator::QemuKvm,
                Some(_) => Emulator::Bochs,
            }),
        }
    }
}

/// The files of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFiles {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub iso: PathBuf,
    pub com1: PathBuf,
    pub com2: PathBuf,
    /// Bochs' log (bochs.log) or QEMU's stderr.
    pub emulator_log: PathBuf,
    /// What the emulator printed on stdout (Bochs: the term display and port 0xE9 bytes).
    pub emulator_stdout: PathBuf,
    /// Port 0xE9 output under QEMU (debugcon).
    pub debugcon: PathBuf,
    /// slirp's packet log (Bochs).
    pub pktlog: PathBuf,
    /// The frames the guest's NIC sent, as QEMU's `filter-dump` wrote them (pcap).
    pub pcap_from_guest: PathBuf,
    /// The frames slirp delivered to the NIC (QEMU, pcap).
    pub pcap_to_guest: PathBuf,
    /// A UDP port slirp forwards from the host's loopback to the same port of the guest
    /// (the host's UDP flood into the guest), if any.
    pub udp_forward: Option<u16>,
}

impl MachineFiles {
    pub fn in_dir(dir: &Path) -> MachineFiles {
        MachineFiles {
            dir: dir.to_path_buf(),
            disk: dir.join("disk.img"),
            iso: dir.join("boot.iso"),
            com1: dir.join("com1.log"),
            com2: dir.join("com2.log"),
            emulator_log: dir.join("emulator.log"),
            emulator_stdout: dir.join("emulator.stdout"),
            debugcon: dir.join("e9.log"),
            pktlog: dir.join("slirp-packets.log"),
            pcap_from_guest: dir.join("wire-from-guest.pcap"),
            pcap_to_guest: dir.join("wire-to-guest.pcap"),
            udp_forward: None,
        }
    }
}

/// The PCI slot of the e1000 on every machine: Bochs puts it at 00:02.0, and the guest's
/// ring attack reads its BAR from `/sys/bus/pci/devices/0000:00:02.0/resource`.
pub const E1000_SLOT: u8 = 2;
/// The VGA's slot under QEMU (its default, slot 2 on `pc`, is the e1000's).
pub const VGA_SLOT: u8 = 3;

/// The QEMU command line (the same machine shape as under Bochs): the disk as the first
/// disk and the ISO as a CD-ROM, booted first (`pc`: IDE primary master and slave, as under
/// Bochs; `q35`: ports 0 and 1 of the ICH9's AHCI controller), COM1, COM2, port 0xE9, an
/// e1000 (82540EM) at 00:02.0 on slirp, and `filter-dump` pcaps of both directions of its
/// traffic.
pub fn qemu_command(files: &MachineFiles, m: &QemuMachine) -> Command {
    let mac = bochs::DEFAULT_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let (accel, default_cpu) = match m.kvm {
        Some(extension) => ("kvm", extension.qemu_cpu()),
        None => ("tcg", QEMU_TCG_CPU),
    };
    // Interrupt remapping under KVM needs the I/O APIC in QEMU (`kernel-irqchip=split`): QEMU
    // 7.2 refuses `intremap=on` with KVM's in-kernel one. TCG has no in-kernel irqchip.
    let irqchip = if m.kvm.is_some() && m.iommu != Iommu::None {
        ",kernel-irqchip=split"
    } else {
        ""
    };
    let mut c = Command::new("qemu-system-x86_64");
    c.arg("-machine")
        .arg(format!("{},accel={accel}{irqchip}", m.machine))
        .arg("-cpu")
        .arg(m.cpu.as_deref().unwrap_or(default_cpu));
    c.args(["-m", &m.memory_mib.to_string(), "-smp", &m.cpus.to_string()]);
    // VT-d before every other `-device`, as QEMU's documentation asks of `intel-iommu`
    // (QEMU 7.2 puts cold-plugged devices behind it in either order, but older ones did not).
    if m.iommu == Iommu::Intel {
        c.arg("-device").args(m.iommu.qemu_device());
    }
    // The disk and the CD-ROM on the machine's own controller: `ide.0` is the PIIX3's primary
    // channel (units 0 and 1: master and slave) on `pc`, and AHCI port 0 (one unit per port;
    // the CD-ROM on port 1, `ide.1`) on `q35`. The CD-ROM boots first (bootindex), GRUB then
    // chainloads the disk, which the BIOS numbers 0x80.
    let (disk_bus, cd_bus) = match m.machine {
        Machine::Pc => ("bus=ide.0,unit=0", "bus=ide.0,unit=1"),
        Machine::Q35 => ("bus=ide.0", "bus=ide.1"),
    };
    c.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=disk0",
            files.disk.display()
        ))
        .arg("-device")
        .arg(format!("ide-hd,drive=disk0,{disk_bus},bootindex=1"))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
            files.iso.display()
        ))
        .arg("-device")
        .arg(format!("ide-cd,drive=cd0,{cd_bus},bootindex=0"))
        .arg("-serial")
        .arg(format!("file:{}", files.com1.display()))
        .arg("-serial")
        .arg(format!("file:{}", files.com2.display()))
        .arg("-debugcon")
        .arg(format!("file:{}", files.debugcon.display()))
        .arg("-netdev")
        .arg(match files.udp_forward {
            Some(p) => format!(
                "user,id=n0,net=10.0.2.0/24,host=10.0.2.2,hostfwd=udp:127.0.0.1:{p}-{}:{p}",
                bochs::SLIRP_GUEST
            ),
            None => "user,id=n0,net=10.0.2.0/24,host=10.0.2.2".into(),
        })
        // `queue=rx`: what the netdev receives (the NIC's transmissions); `tx`: what it sends
        // to the NIC. One file per direction: pcap records no direction.
        .arg("-object")
        .arg(format!(
            "filter-dump,id=dump-from-guest,netdev=n0,queue=rx,file={}",
            files.pcap_from_guest.display()
        ))
        .arg("-object")
        .arg(format!(
            "filter-dump,id=dump-to-guest,netdev=n0,queue=tx,file={}",
            files.pcap_to_guest.display()
        ))
        .arg("-device")
        .arg(format!("e1000,netdev=n0,mac={mac},addr={E1000_SLOT:#x}"))
        .args(["-vga", "none", "-device"])
        .arg(format!("VGA,addr={VGA_SLOT:#x}"));
    // AMD-Vi after the e1000 and the VGA: `amd-iommu` adds its own PCI function (AMDVI-PCI,
    // class 0806h) at the first free slot, which would be the e1000's 00:02.0 if it came first;
    // here it takes 00:01.0. QEMU puts every device behind it whatever the order.
    if m.iommu == Iommu::Amd {
        c.arg("-device").args(m.iommu.qemu_device());
    }
    c.args(["-display", "none", "-monitor", "none", "-no-reboot"]);
    // A developer's extra arguments, e.g. QEMU's device traces
    // (`ALLY_QEMU_ARGS="-trace ahci_* -D /tmp/qemu-trace.log"`), split on whitespace.
    if let Some(extra) = std::env::var_os("ALLY_QEMU_ARGS") {
        c.args(extra.to_string_lossy().split_whitespace());
    }
    c
}

/// A running emulator.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pub command: String,
    pub emulator: Emulator,
}

/// Bochs' instructions-per-second setting (see [`BochsConfig::ips`]).
pub const BOCHS_IPS: u64 = 50_000_000;

/// Starts the machine described by `files` (which must hold the disk and ISO).
/// `machine`, `qemu_cpu` and `iommu` apply to QEMU only (the caller refuses them with Bochs,
/// and an IOMMU on `pc`).
pub fn start(
    emulator: Emulator,
    files: &MachineFiles,
    cpus: u32,
    memory_mib: u64,
    machine: Machine,
    qemu_cpu: Option<&str>,
    iommu: Iommu,
) -> Result<Running, EmulatorError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EmulatorError::Io { path, source }
    };
    for p in [&files.com1, &files.com2] {
        // Start from empty logs so a stale line is never judged.
        fs::write(p, b"").map_err(io(p))?;
    }
    let stdout = fs::File::create(&files.emulator_stdout).map_err(io(&files.emulator_stdout))?;
    let mut cmd = match emulator {
        Emulator::Bochs => {
            let rc = files.dir.join("bochs.rc");
            fs::write(&rc, bochs::DEBUGGER_RC).map_err(io(&rc))?;
            let slirp = files.dir.join("slirp.conf");
            fs::write(
                &slirp,
                bochs::slirp_config(&files.pktlog, files.udp_forward),
            )
            .map_err(io(&slirp))?;
            let cfg = BochsConfig {
                cpus,
                memory_mib,
                disk: files.disk.clone(),
                iso: files.iso.clone(),
                com1: files.com1.clone(),
                com2: files.com2.clone(),
                log: files.emulator_log.clone(),
                slirp_config: slirp,
                mac: bochs::DEFAULT_MAC,
                ips: BOCHS_IPS,
            };
            let bochsrc = files.dir.join("bochsrc");
            fs::write(&bochsrc, cfg.render()).map_err(io(&bochsrc))?;
            // A stale lock (from a killed run) makes Bochs refuse the disk.
            let _ = fs::remove_file(files.dir.join("disk.img.lock"));
            // The term display needs a terminal: `script` gives Bochs a pseudo-terminal, and
            // forwards SIGTERM to it.
            let mut c = Command::new("script");
            c.arg("-qfec")
                .arg(format!(
                    "bochs -f '{}' -rc '{}'",
                    bochsrc.display(),
                    rc.display()
                ))
                .arg("/dev/null")
                .env("TERM", "xterm")
                .current_dir(&files.dir);
            c
        }
        Emulator::QemuKvm | Emulator::QemuTcg => {
            let mut c = qemu_command(
                files,
                &QemuMachine {
                    cpus,
                    memory_mib,
                    kvm: (emulator == Emulator::QemuKvm)
                        .then(|| host_extension().unwrap_or(HostExtension::Vmx)),
                    machine,
                    cpu: qemu_cpu.map(str::to_string),
                    iommu,
                },
            );
            let log = fs::File::create(&files.emulator_log).map_err(io(&files.emulator_log))?;
            c.stderr(log);
            c
        }
    };
    if emulator == Emulator::Bochs {
        let err = stdout.try_clone().map_err(io(&files.emulator_stdout))?;
        cmd.stderr(err);
    }
    cmd.stdin(Stdio::null()).stdout(stdout);
    // Its own process group: a terminal's Ctrl-C reaches the runner, not the emulator (Bochs
    // would drop into its debugger); the runner's death then ends the emulator through the
    // parent-death signal.
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let command = tool::describe(&cmd);
    let child = cmd.spawn().map_err(|source| EmulatorError::Spawn {
        command: command.clone(),
        source,
    })?;
    if emulator == Emulator::Bochs {
        drain_screen(files.emulator_stdout.clone());
    }
    Ok(Running {
        child,
        command,
        emulator,
    })
}

/// The pseudo-terminal Bochs' term display draws the guest's screen on, from its
/// `Bochs connected to screen "/dev/pts/N"` line.
pub fn screen_pty(stdout: &str) -> Option<&str> {
    let rest = stdout.split("Bochs connected to screen \"").nth(1)?;
    let path = &rest[..rest.find('"')?];
    path.starts_with("/dev/pts/").then_some(path)
}

/// Reads and discards what Bochs draws on its screen pseudo-terminal. Nobody else reads it:
/// once its buffer is full Bochs blocks in write(2) and the whole machine stops (seen: a run
/// frozen for 21 minutes after ~20 KiB of screen output). The thread waits up to 2 minutes
/// for the screen line and ends when Bochs closes the terminal.
fn drain_screen(stdout: PathBuf) {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let pty = loop {
            let text = fs::read_to_string(&stdout).unwrap_or_default();
            if let Some(p) = screen_pty(&text) {
                break p.to_string();
            }
            if std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Ok(mut f) = fs::File::open(&pty) {
            let _ = std::io::copy(&mut f, &mut std::io::sink());
        }
    });
}

fn send_signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a positive process id
        // of a child this runner started (never 0 or -1, which would signal groups).
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Child processes of `pid` (Linux: /proc/PID/task/PID/children).
fn children_of(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Running {
    /// `Some(status text)` once the emulator has exited.
    pub fn try_exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// Waits up to `limit` for the emulator to exit by itself.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exited() {
                return Some(s);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the emulator: SIGTERM (script forwards it to Bochs), then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        let pid = self.child.id();
        let kids = children_of(pid);
        send_signal(pid, libc::SIGTERM);
        if self.wait_for_exit(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for k in kids {
            // Bochs (the child of `script`) normally dies with it; kill it only if that pid is
            // still a Bochs process, never a recycled pid of something else.
            let comm = fs::read_to_string(format!("/proc/{k}/comm")).unwrap_or_default();
            if comm.trim_end().starts_with("bochs") {
                send_signal(k, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_flag_detection() {
        assert_eq!(
            cpuinfo_extension("processor : 0\nflags : fpu vme vmx sse\n"),
            Some(HostExtension::Vmx)
        );
        assert_eq!(
            cpuinfo_extension("flags : fpu svm sse\nvmx flags : ept\n"),
            Some(HostExtension::Svm)
        );
        assert_eq!(cpuinfo_extension("flags : fpu sse\n"), None);
        assert_eq!(cpuinfo_extension(""), None);
        assert_eq!(HostExtension::Svm.qemu_cpu(), "host,+svm");
    }

    #[test]
    fn choice_parses() {
        assert_eq!(
            "bochs".parse::<EmulatorChoice>().unwrap(),
            EmulatorChoice::Bochs
        );
        assert_eq!(
            "qemu".parse::<EmulatorChoice>().unwrap(),
            EmulatorChoice::QemuKvm
        );
        assert_eq!(
            "vbox".parse::<EmulatorChoice>().unwrap_err().to_string(),
            "unknown emulator `vbox`: expected auto, bochs, qemu or qemu-tcg"
        );
        assert_eq!(EmulatorChoice::Bochs.resolve().unwrap(), Emulator::Bochs);
    }

    fn machine(kvm: bool, machine: Machine) -> QemuMachine {
        QemuMachine {
            cpus: 2,
            memory_mib: 1024,
            kvm: kvm.then_some(HostExtension::Vmx),
            machine,
            cpu: None,
            iommu: Iommu::None,
        }
    }

    #[test]
    fn qemu_command_line() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let c = tool::describe(&qemu_command(&f, &machine(true, Machine::Pc)));
        assert!(
            c.starts_with("qemu-system-x86_64 -machine pc,accel=kvm -cpu host,+vmx"),
            "{c}"
        );
        assert!(c.contains("-m 1024 -smp 2"), "{c}");
        assert!(
            c.contains("-serial file:/o/com1.log -serial file:/o/com2.log"),
            "{c}"
        );
        assert!(
            c.contains("-device e1000,netdev=n0,mac=52:54:00:12:34:56,addr=0x2"),
            "{c}"
        );
        assert!(c.contains("-vga none -device VGA,addr=0x3"), "{c}");
        // Both directions of the e1000's traffic, each in its own pcap.
        assert!(
            c.contains("-object filter-dump,id=dump-from-guest,netdev=n0,queue=rx,file=/o/wire-from-guest.pcap"),
            "{c}"
        );
        assert!(
            c.contains("-object filter-dump,id=dump-to-guest,netdev=n0,queue=tx,file=/o/wire-to-guest.pcap"),
            "{c}"
        );
        assert!(c.ends_with("-no-reboot"), "{c}");
    }

    #[test]
    fn pc_attaches_disk_and_cdrom_to_the_primary_ide_channel() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let c = tool::describe(&qemu_command(&f, &machine(false, Machine::Pc)));
        assert!(
            c.starts_with(&format!(
                "qemu-system-x86_64 -machine pc,accel=tcg -cpu {QEMU_TCG_CPU} -m 1024"
            )),
            "{c}"
        );
        assert!(
            c.contains("-drive file=/o/disk.img,format=raw,if=none,id=disk0 -device ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"),
            "{c}"
        );
        assert!(
            c.contains("-drive file=/o/boot.iso,format=raw,if=none,id=cd0,media=cdrom,readonly=on -device ide-cd,drive=cd0,bus=ide.0,unit=1,bootindex=0"),
            "{c}"
        );
        assert!(!c.contains("if=ide"), "{c}");
    }

    #[test]
    fn q35_attaches_disk_and_cdrom_to_ahci_ports() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let c = tool::describe(&qemu_command(&f, &machine(false, Machine::Q35)));
        assert!(
            c.starts_with("qemu-system-x86_64 -machine q35,accel=tcg"),
            "{c}"
        );
        assert!(
            c.contains("-device ide-hd,drive=disk0,bus=ide.0,bootindex=1"),
            "{c}"
        );
        assert!(
            c.contains("-device ide-cd,drive=cd0,bus=ide.1,bootindex=0"),
            "{c}"
        );
        assert!(!c.contains("unit="), "{c}");
        // The same e1000 (82540EM) on both machines.
        assert!(
            c.contains("-device e1000,netdev=n0,mac=52:54:00:12:34:56,addr=0x2"),
            "{c}"
        );
    }

    #[test]
    fn tcg_cpu_model_is_amd_with_svm_and_npt_and_can_be_replaced() {
        assert!(QEMU_TCG_CPU.starts_with("EPYC-v1,"));
        assert!(QEMU_TCG_CPU.split(',').any(|f| f == "+svm"));
        assert!(QEMU_TCG_CPU.split(',').any(|f| f == "+npt"));
        let f = MachineFiles::in_dir(Path::new("/o"));
        let mut m = machine(false, Machine::Q35);
        m.cpu = Some("qemu64,+svm,+npt".into());
        let c = tool::describe(&qemu_command(&f, &m));
        assert!(c.contains("-cpu qemu64,+svm,+npt -m"), "{c}");
    }

    /// The `-device` arguments of a command line, in order.
    fn devices(c: &str) -> Vec<&str> {
        c.split(" -device ")
            .skip(1)
            .map(|d| d.split(' ').next().unwrap_or(""))
            .collect()
    }

    #[test]
    fn no_iommu_by_default() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let c = tool::describe(&qemu_command(&f, &machine(false, Machine::Q35)));
        assert!(!c.contains("iommu"), "{c}");
        assert!(!c.contains("kernel-irqchip"), "{c}");
    }

    #[test]
    fn intel_iommu_comes_before_every_other_device() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let mut m = machine(false, Machine::Q35);
        m.iommu = Iommu::Intel;
        let c = tool::describe(&qemu_command(&f, &m));
        // TCG: no in-kernel irqchip, nothing to split.
        assert!(
            c.starts_with("qemu-system-x86_64 -machine q35,accel=tcg -cpu "),
            "{c}"
        );
        assert_eq!(
            devices(&c),
            [
                "intel-iommu,intremap=on",
                "ide-hd,drive=disk0,bus=ide.0,bootindex=1",
                "ide-cd,drive=cd0,bus=ide.1,bootindex=0",
                "e1000,netdev=n0,mac=52:54:00:12:34:56,addr=0x2",
                "VGA,addr=0x3",
            ],
            "{c}"
        );
        // KVM: interrupt remapping needs the split irqchip.
        m.kvm = Some(HostExtension::Vmx);
        let c = tool::describe(&qemu_command(&f, &m));
        assert!(
            c.starts_with(
                "qemu-system-x86_64 -machine q35,accel=kvm,kernel-irqchip=split -cpu host,+vmx"
            ),
            "{c}"
        );
    }

    #[test]
    fn amd_iommu_comes_after_the_e1000_and_the_vga() {
        let f = MachineFiles::in_dir(Path::new("/o"));
        let mut m = machine(false, Machine::Q35);
        m.iommu = Iommu::Amd;
        let c = tool::describe(&qemu_command(&f, &m));
        assert!(c.starts_with("qemu-system-x86_64 -machine q35,accel=tcg -cpu "));
        let d = devices(&c);
        assert_eq!(d.last(), Some(&"amd-iommu,intremap=on"), "{c}");
        assert_eq!(d.iter().filter(|d| d.contains("iommu")).count(), 1, "{c}");
        assert!(c.ends_with("-device amd-iommu,intremap=on -display none -monitor none -no-reboot"));
        m.kvm = Some(HostExtension::Svm);
        let c = tool::describe(&qemu_command(&f, &m));
        assert!(
            c.starts_with(
                "qemu-system-x86_64 -machine q35,accel=kvm,kernel-irqchip=split -cpu host,+svm"
            ),
            "{c}"
        );
    }

    #[test]
    fn iommu_parses() {
        assert_eq!("none".parse::<Iommu>(), Ok(Iommu::None));
        assert_eq!("intel".parse::<Iommu>(), Ok(Iommu::Intel));
        assert_eq!("amd".parse::<Iommu>(), Ok(Iommu::Amd));
        assert_eq!(
            "vtd".parse::<Iommu>(),
            Err("unknown IOMMU `vtd`: expected none, intel or amd".into())
        );
        for i in [Iommu::None, Iommu::Intel, Iommu::Amd] {
            assert_eq!(i.to_string().parse::<Iommu>(), Ok(i));
        }
        assert_eq!(Iommu::default(), Iommu::None);
        assert_eq!(Iommu::None.qemu_device(), None);
    }

    #[test]
    fn machine_parses() {
        assert_eq!("pc".parse::<Machine>(), Ok(Machine::Pc));
        assert_eq!("q35".parse::<Machine>(), Ok(Machine::Q35));
        assert_eq!(
            "isapc".parse::<Machine>(),
            Err("unknown machine `isapc`: expected pc or q35".into())
        );
        assert_eq!(Machine::default(), Machine::Pc);
    }

    #[test]
    fn screen_pty_is_read_from_the_stdout_line() {
        let out = "Bochs connected to screen \"/dev/pts/3\"\nNext at t=0\n";
        assert_eq!(screen_pty(out), Some("/dev/pts/3"));
        assert_eq!(
            screen_pty("Bochs connected to screen \"/etc/passwd\""),
            None
        );
        assert_eq!(screen_pty("Bochs connected to screen \"/dev/pts/3"), None);
        assert_eq!(screen_pty("Next at t=0\n"), None);
    }

    #[test]
    fn stop_ends_a_running_child() {
        let dir = std::env::temp_dir().join(format!("ally-emu-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut r = Running {
            child,
            command: "sleep 60".into(),
            emulator: Emulator::Bochs,
        };
        assert!(r.try_exited().is_none());
        let t = Instant::now();
        r.stop();
        assert!(r.try_exited().is_some());
        assert!(t.elapsed() < Duration::from_secs(10));
        fs::remove_dir_all(&dir).unwrap();
    }
}
