//! One run: build what it needs, boot the machine, watch both serial logs, stop it, judge it.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::attack;
use crate::checks::{self, Check, GUEST_RAM_MIB};
use crate::emulator::{
    self, Emulator, EmulatorChoice, EmulatorError, Iommu, Machine, MachineFiles, Running,
};
use crate::endpoints::{EndpointError, Endpoints, NetOptions, NetReport};
use crate::guest::{self, GuestError, GuestSources};
use crate::inspect::{self, InspectPorts};
use crate::iso::{self, BootTarget, IsoError};
use crate::markers::{self, AllyReport, GuestReport};
use crate::rules::{prepare_rules, RulesError, RulesExpect, RulesInput};

/// Boot Ally (which boots the guest) or the guest alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ally,
    Baseline,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Ally => "ally",
            Mode::Baseline => "baseline",
        })
    }
}

/// The options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub mode: Mode,
    /// Name of the run's directory under `out_root`.
    pub name: String,
    pub cpus: u32,
    /// Whole-run limit, from the emulator's start.
    pub timeout: Duration,
    /// After `ALLYTEST done`, how long to wait for `ALLY poweroff` (Ally mode) or for the
    /// emulator to exit by itself.
    pub grace: Duration,
    /// Appended to `multiboot2 /boot/ally` (Ally mode only).
    pub ally_options: String,
    /// Ally's rules module (Ally mode only): `module2 /boot/rules.blob rules`.
    pub rules: Option<RulesInput>,
    /// Keep the run's disk copy and ISO after the run (logs are always kept).
    pub keep: bool,
    pub emulator: EmulatorChoice,
    /// QEMU's machine type (`--machine`; `None`: `pc`). Refused with Bochs.
    pub machine: Option<Machine>,
    /// QEMU's `-cpu` instead of the default (`--qemu-cpu`). Refused with Bochs.
    pub qemu_cpu: Option<String>,
    /// The IOMMU QEMU emulates (`--iommu`): q35 only, refused with Bochs and on `pc`.
    pub iommu: Iommu,
    /// Print a progress line every this often to stderr (`None`: quiet).
    pub progress: Option<Duration>,
    /// Where run directories and the guest-image cache live (`<workspace>/out`).
    pub out_root: PathBuf,
    /// Where scripts/setup.sh put the guest debs.
    pub cache: PathBuf,
    /// The workspace (for cargo and `guest/init`).
    pub workspace: PathBuf,
    /// A prebuilt Ally image; `None` builds it with cargo.
    pub ally_image: Option<PathBuf>,
    /// A prebuilt attacker for the guest (`ally-attack` for x86_64-unknown-linux-musl);
    /// `None` builds it with cargo (into `ally_target_dir`).
    pub attack_binary: Option<PathBuf>,
    /// The guest kernel's command line (default [`guest::KERNEL_CMDLINE`]).
    pub kernel_cmdline: String,
    /// The cargo target directory for building the Ally image and the guest's attacker
    /// (`None`: `$CARGO_TARGET_DIR`
    /// or `<workspace>/target`). Tests must use their own (cargo locks its target directory
    /// while tests run).
    pub ally_target_dir: Option<PathBuf>,
    /// The guest's network workload (issue 4): the sizes the host endpoints serve and expect,
    /// or `None` to run without them (the guest then skips its transfers and e1000 reloads).
    pub net: Option<NetOptions>,
}

/// The workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl RunOptions {
    /// Defaults: 1 CPU, 30 min timeout, 60 s grace, progress every 15 s, auto emulator,
    /// `<workspace>/out`, `$ALLY_OUT` overriding it.
    pub fn new(mode: Mode, name: &str) -> RunOptions {
        let workspace = workspace_root();
        let out_root = std::env::var_os("ALLY_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("out"));
        RunOptions {
            mode,
            name: name.to_string(),
            cpus: 1,
            timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(60),
            ally_options: String::new(),
            rules: None,
            keep: false,
            emulator: EmulatorChoice::Auto,
            machine: None,
            qemu_cpu: None,
            iommu: Iommu::None,
            progress: Some(Duration::from_secs(15)),
            out_root,
            cache: guest::default_cache_dir(),
            workspace,
            ally_image: None,
            attack_binary: None,
            ally_target_dir: None,
            kernel_cmdline: guest::KERNEL_CMDLINE.to_string(),
            net: Some(NetOptions::default()),
        }
    }
}

/// An error that prevented a run (a run that boots and fails is a [`RunResult`], not this).
#[derive(Debug)]
pub enum RunError {
    BadOption {
        option: &'static str,
        reason: String,
    },
    Guest(GuestError),
    Iso(IsoError),
    Emulator(EmulatorError),
    Endpoints(EndpointError),
    Rules(RulesError),
    /// Building the guest's attacker (`cargo build -p ally-attack`).
    Attack(crate::tool::ToolError),
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::BadOption { option, reason } => write!(f, "option {option}: {reason}"),
            RunError::Guest(e) => e.fmt(f),
            RunError::Iso(e) => e.fmt(f),
            RunError::Emulator(e) => e.fmt(f),
            RunError::Endpoints(e) => write!(f, "host network endpoints: {e}"),
            RunError::Rules(e) => write!(f, "rules: {e}"),
            RunError::Attack(e) => write!(f, "building the guest's attacker (ally-attack): {e}"),
            RunError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for RunError {}

impl From<GuestError> for RunError {
    fn from(e: GuestError) -> Self {
        RunError::Guest(e)
    }
}
impl From<IsoError> for RunError {
    fn from(e: IsoError) -> Self {
        RunError::Iso(e)
    }
}
impl From<RulesError> for RunError {
    fn from(e: RulesError) -> Self {
        RunError::Rules(e)
    }
}
impl From<EmulatorError> for RunError {
    fn from(e: EmulatorError) -> Self {
        RunError::Emulator(e)
    }
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest finished its script and (under Ally) Ally logged its power-off.
    Completed,
    /// The guest finished, but Ally did not log `ALLY poweroff` within the grace time.
    NoAllyPoweroff,
    /// The emulator exited before the guest finished.
    EmulatorExited {
        status: String,
    },
    /// A fatal line: `ALLY fatal ...` or a guest kernel panic.
    Fatal {
        line: String,
    },
    Timeout,
}

impl Outcome {
    /// The signal that ended the emulator, when it died by one we did not send (a crash of
    /// the emulator itself: `ExitStatus`'s "signal: 11 (SIGSEGV)").
    pub fn emulator_signal(&self) -> Option<&str> {
        match self {
            Outcome::EmulatorExited { status } => status.strip_prefix("signal: "),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::NoAllyPoweroff => {
                f.write_str("guest finished but Ally logged no `ALLY poweroff` in the grace time")
            }
            Outcome::EmulatorExited { status } => {
                write!(
                    f,
                    "the emulator exited ({status}) before the guest finished"
                )
            }
            Outcome::Fatal { line } => write!(f, "fatal: {line}"),
            Outcome::Timeout => f.write_str("timed out"),
        }
    }
}

/// Where a run's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPaths {
    pub dir: PathBuf,
    /// Guest console.
    pub com1: PathBuf,
    /// Ally's log.
    pub com2: PathBuf,
    /// bochs.log (or QEMU's stderr).
    pub emulator_log: PathBuf,
    pub emulator_stdout: PathBuf,
}

/// The result of a run that booted.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub mode: Mode,
    pub emulator: Emulator,
    pub outcome: Outcome,
    /// From the emulator's start to its end.
    pub wall: Duration,
    /// Time from the emulator's start to `ALLYTEST init PASS`, if seen.
    pub to_init: Option<Duration>,
    pub guest: GuestReport,
    pub ally: AllyReport,
    pub logs: LogPaths,
    /// The `>>PANIC<<` lines of bochs.log (why Bochs stopped, when it did).
    pub emulator_panics: Vec<String>,
    /// What the host's HTTP server and upload listener saw (`None`: run without them).
    pub net: Option<NetReport>,
    /// The judgement: the outcome plus the mode's checks.
    pub checks: Vec<Check>,
    /// The last lines of the guest console and of Ally's log, shown when a run fails.
    pub com1_tail: Vec<String>,
    pub com2_tail: Vec<String>,
    /// Earlier attempts of this run that QEMU itself crashed ([`run`] retried them), each
    /// with the signal and where its logs were kept.
    pub emulator_crashes: Vec<String>,
}

/// How many trailing log lines a failed run shows.
const TAIL_LINES: usize = 30;

fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

impl RunResult {
    pub fn passed(&self) -> bool {
        checks::all_passed(&self.checks)
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run: {} under {}: {} in {} ({:.1} s){}",
            self.mode,
            self.emulator,
            self.outcome,
            fmt_duration(self.wall),
            self.wall.as_secs_f64(),
            self.to_init
                .map(|d| format!(", guest init after {:.1} s", d.as_secs_f64()))
                .unwrap_or_default()
        )?;
        for p in &self.emulator_panics {
            writeln!(f, "emulator: {p}")?;
        }
        for c in &self.emulator_crashes {
            writeln!(f, "emulator crash, retried: {c}")?;
        }
        writeln!(f, "guest markers (COM1):")?;
        for m in &self.guest.markers {
            writeln!(f, "  {}", m.line)?;
        }
        if self.mode == Mode::Ally {
            writeln!(f, "Ally lines (COM2):")?;
            for l in &self.ally.lines {
                writeln!(f, "  {}", l.line)?;
            }
        }
        if let Some(n) = &self.net {
            write!(f, "{n}")?;
        }
        if !self.passed() {
            writeln!(f, "last lines of the guest console (COM1):")?;
            for l in &self.com1_tail {
                writeln!(f, "  | {l}")?;
            }
            if self.mode == Mode::Ally {
                writeln!(f, "last lines of Ally's log (COM2):")?;
                for l in &self.com2_tail {
                    writeln!(f, "  | {l}")?;
                }
            }
        }
        writeln!(f, "checks:")?;
        for c in &self.checks {
            writeln!(f, "  {c}")?;
        }
        writeln!(
            f,
            "logs: {} (com1.log = guest console, com2.log = Ally, emulator.log)",
            self.logs.dir.display()
        )?;
        write!(f, "result: {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// Prints a progress line to stderr, tagged with the run's name (runs may go in parallel).
fn progress(name: &str, msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "[ally-run {name}] {msg}");
}

/// The last non-empty line of `text`, shortened for a progress line.
fn last_line(text: &str) -> String {
    let l = text
        .lines()
        .rev()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
        .find(|l| !l.is_empty())
        .unwrap_or("-");
    let mut s: String = l.chars().take(70).collect();
    if l.chars().count() > 70 {
        s.push('…');
    }
    s
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// What the watcher decided at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Watch {
    Continue,
    /// Stop now (the run is over), with this outcome.
    Stop(Outcome),
}

/// The state the watcher keeps between polls; pure, so it is unit-tested without a machine.
#[derive(Debug)]
struct Watcher {
    mode: Mode,
    grace: Duration,
    timeout: Duration,
    done_at: Option<Duration>,
    init_at: Option<Duration>,
}

/// `text` up to and including its last newline.
fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |i| i + 1)]
}

impl Watcher {
    fn poll(&mut self, now: Duration, com1: &str, com2: &str, exited: Option<&str>) -> Watch {
        // The emulator writes a serial line character by character: judge only whole lines,
        // or a fatal line is acted on (and the emulator stopped) before its reason is out.
        let (com1, com2) = if exited.is_some() {
            (com1, com2)
        } else {
            (complete_lines(com1), complete_lines(com2))
        };
        let guest = GuestReport::parse(com1);
        let ally = AllyReport::parse(com2);
        if self.init_at.is_none() && guest.init_reached() {
            self.init_at = Some(now);
        }
        if self.done_at.is_none() && guest.done() {
            self.done_at = Some(now);
        }
        let finished = guest.done() && (self.mode == Mode::Baseline || ally.powered_off());
        if finished {
            return Watch::Stop(Outcome::Completed);
        }
        if let Some(l) = ally.fatal() {
            return Watch::Stop(Outcome::Fatal {
                line: l.line.clone(),
            });
        }
        if let Some(l) = com1.lines().find(|l| markers::is_kernel_panic(l)) {
            return Watch::Stop(Outcome::Fatal {
                line: format!("guest: {}", l.trim()),
            });
        }
        if let Some(status) = exited {
            return Watch::Stop(if guest.done() {
                // Exited by itself after the guest finished, without `ALLY poweroff`.
                Outcome::NoAllyPoweroff
            } else {
                Outcome::EmulatorExited {
                    status: status.to_string(),
                }
            });
        }
        if let Some(d) = self.done_at {
            if now.saturating_sub(d) >= self.grace {
                return Watch::Stop(Outcome::NoAllyPoweroff);
            }
        }
        if now >= self.timeout {
            return Watch::Stop(Outcome::Timeout);
        }
        Watch::Continue
    }
}

/// Holds `out_root/.name.lock` for the whole run: two runs with one name would delete each
/// other's files.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

fn lock_run(out_root: &Path, name: &str) -> Result<RunLock, RunError> {
    fs::create_dir_all(out_root).map_err(|source| RunError::Io {
        path: out_root.to_path_buf(),
        source,
    })?;
    let path = out_root.join(format!(".{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RunError::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(RunLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(RunError::BadOption {
            option: "run name",
            reason: format!(
                "another run is using {} (choose another name with --name)",
                out_root.join(name).display()
            ),
        }),
        Err(fs::TryLockError::Error(source)) => Err(RunError::Io { path, source }),
    }
}

/// The QEMU machine type of a run under `emulator`: `--machine` and `--qemu-cpu` are QEMU's
/// and refused with Bochs, which emulates one i440FX machine with its own CPU models.
pub fn qemu_machine(emulator: Emulator, opts: &RunOptions) -> Result<Machine, RunError> {
    if emulator == Emulator::Bochs {
        if let Some(m) = opts.machine {
            return Err(RunError::BadOption {
                option: "--machine",
                reason: format!(
                    "`{m}` is a QEMU machine type; Bochs emulates only its own i440FX PC (run with --emulator qemu-tcg or qemu, or leave --machine out)"
                ),
            });
        }
        if let Some(c) = &opts.qemu_cpu {
            return Err(RunError::BadOption {
                option: "--qemu-cpu",
                reason: format!(
                    "`{c}` is a QEMU CPU model; Bochs runs its own corei7_skylake_x (run with --emulator qemu-tcg or qemu, or leave --qemu-cpu out)"
                ),
            });
        }
    }
    Ok(opts.machine.unwrap_or_default())
}

/// The IOMMU of a run under `emulator`: `--iommu intel|amd` is a QEMU device of the `q35`
/// machine (QEMU 7.2's `pc` refuses both; Bochs emulates none).
pub fn qemu_iommu(emulator: Emulator, opts: &RunOptions) -> Result<Iommu, RunError> {
    let iommu = opts.iommu;
    if iommu == Iommu::None {
        return Ok(iommu);
    }
    if emulator == Emulator::Bochs {
        return Err(RunError::BadOption {
            option: "--iommu",
            reason: format!(
                "`{iommu}` is a QEMU device; Bochs emulates no IOMMU (run with --emulator qemu-tcg or qemu and --machine q35, or give --iommu none)"
            ),
        });
    }
    let machine = opts.machine.unwrap_or_default();
    if machine != Machine::Q35 {
        return Err(RunError::BadOption {
            option: "--iommu",
            reason: format!(
                "`{iommu}` needs --machine q35: QEMU's `{machine}` machine takes no IOMMU device"
            ),
        });
    }
    Ok(iommu)
}

/// What [`prepare`] built.
#[derive(Debug)]
pub struct Prepared {
    pub files: MachineFiles,
    /// What Ally should report about its rules.
    pub rules: RulesExpect,
    /// Whether Ally runs the inspection rules (`tests/rules/inspect.rules`), so the inspection
    /// checks apply: an Ally run with the network workload and no `--rules`/`--rules-blob`.
    pub inspection: bool,
    /// Keeps other runs of the same name out until dropped.
    pub lock: RunLock,
}

/// How many rules that did not load a run's progress output lists.
const NOT_LOADED_SHOWN: usize = 20;

/// Builds the guest image (cached), the rules blob (when asked), the Ally image (unless
/// given) and the ISO into `out_root/name/`. With `ports` (the endpoints listen) an Ally run
/// without rules of its own gets the inspection rules, with the ports in `inspect.vars`.
pub fn prepare(opts: &RunOptions, ports: Option<InspectPorts>) -> Result<Prepared, RunError> {
    if opts.cpus == 0 || opts.cpus > 64 {
        return Err(RunError::BadOption {
            option: "--cpus",
            reason: format!("{} is out of range 1..=64", opts.cpus),
        });
    }
    if opts.name.is_empty() || opts.name.contains(['/', '\0']) || opts.name.starts_with('.') {
        return Err(RunError::BadOption {
            option: "run name",
            reason: format!("`{}` must be a plain directory name", opts.name),
        });
    }
    if opts.kernel_cmdline.contains(['\n', '\r']) || !opts.kernel_cmdline.is_ascii() {
        return Err(RunError::BadOption {
            option: "--kernel-cmdline",
            reason: format!(
                "`{}` must be one line of ASCII (it becomes syslinux's APPEND line)",
                opts.kernel_cmdline
            ),
        });
    }
    if opts.mode == Mode::Baseline && opts.rules.is_some() {
        return Err(RunError::BadOption {
            option: "--rules",
            reason: "the baseline boots no Ally to load rules".into(),
        });
    }
    let lock = lock_run(&opts.out_root, &opts.name)?;
    let dir = opts.out_root.join(&opts.name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Io { path, source }
    };
    // A fresh directory each run: nothing stale is ever judged.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let files = MachineFiles::in_dir(&dir);

    let mut rules = RulesExpect::None;
    let mut inspection = false;
    let target = match opts.mode {
        Mode::Ally => {
            iso::validate_options(&opts.ally_options)?;
            let default_rules = match (&opts.rules, ports) {
                (None, Some(p)) => {
                    let vars = dir.join(inspect::VARS_FILE);
                    fs::write(&vars, p.vars_text()).map_err(io(&vars))?;
                    inspection = true;
                    Some(RulesInput::Compile {
                        rules: inspect::rules_path(&opts.workspace),
                        vars: Some(vars),
                    })
                }
                _ => None,
            };
            let rules_blob = match opts.rules.as_ref().or(default_rules.as_ref()) {
                None => None,
                Some(input) => {
                    let blob = dir.join("rules.blob");
                    let prepared = prepare_rules(input, &blob)?;
                    if opts.progress.is_some() {
                        let hidden = prepared.notes.len().saturating_sub(NOT_LOADED_SHOWN + 1);
                        for note in prepared.notes.iter().take(NOT_LOADED_SHOWN + 1) {
                            progress(&opts.name, note);
                        }
                        if hidden > 0 {
                            progress(&opts.name, &format!("  ... {hidden} more not loaded"));
                        }
                    }
                    rules = prepared.expect;
                    Some(blob)
                }
            };
            let image = match &opts.ally_image {
                Some(p) => p.clone(),
                None => {
                    if opts.progress.is_some() {
                        progress(
                            &opts.name,
                            "building the Ally image (cargo build -p ally-boot --release)",
                        );
                    }
                    iso::build_ally_image(&opts.workspace, opts.ally_target_dir.as_deref())?
                }
            };
            BootTarget::Ally {
                image,
                options: effective_ally_options(opts),
                rules: rules_blob,
            }
        }
        Mode::Baseline => BootTarget::Disk,
    };

    let attack = match &opts.attack_binary {
        Some(p) => p.clone(),
        None => {
            if opts.progress.is_some() {
                progress(
                    &opts.name,
                    &format!(
                        "building the guest's attacker (cargo build -p ally-attack --release --target {})",
                        attack::ATTACK_TARGET
                    ),
                );
            }
            attack::build_attack_binary(&opts.workspace, opts.ally_target_dir.as_deref())
                .map_err(RunError::Attack)?
        }
    };
    let src = GuestSources::locate(&opts.cache, &opts.workspace.join("guest/init"), &attack)?;
    let cache_root = opts.out_root.join("cache");
    fs::create_dir_all(&cache_root).map_err(io(&cache_root))?;
    let image = guest::build_guest_image(&src, &cache_root, &opts.kernel_cmdline)?;
    if opts.progress.is_some() {
        progress(
            &opts.name,
            &format!(
                "guest image {} ({})",
                image.hash,
                if image.built { "built" } else { "cached" }
            ),
        );
    }
    // Each run boots its own copy: Bochs writes to and locks the disk.
    fs::copy(&image.disk, &files.disk).map_err(io(&image.disk))?;
    iso::build_iso(&target, &dir.join("iso"), &files.iso)?;
    Ok(Prepared {
        files,
        rules,
        inspection,
        lock,
    })
}

/// Builds everything, boots, watches, stops and judges.
/// How often [`run`] boots again after QEMU itself crashed.
const QEMU_CRASH_RETRIES: usize = 1;

/// Boots the run and judges it. A QEMU that dies by a signal of its own is an emulator bug,
/// not a verdict on Ally: the run boots once more, the crashed attempt's logs are kept in
/// `<dir>-crash<N>`, and the result names the crash. A second crash fails the run.
///
/// The crash seen (CI, 2026-12-07, the VT-d scenario before the guest's init; the kernel's
/// log: `segfault at ffffffc200000061 ip ...` at `memory_region_dispatch_read+38` of Debian's
/// QEMU 7.2 binary) is a vCPU thread dispatching an MMIO read through a stale memory-region
/// pointer. The likely cause is a race of multi-threaded TCG in QEMU 7.2: when the memory map
/// changes, `tcg_commit` flushes a vCPU's TLB from whichever thread changed it (later QEMU
/// versions hand the flush to the owning vCPU). The IOMMU scenarios change the map often
/// (each VT-d/AMD-Vi translation switch remaps the devices' address spaces).
pub fn run(opts: &RunOptions) -> Result<RunResult, RunError> {
    let mut crashes = Vec::new();
    loop {
        let mut result = run_once(opts)?;
        let crashed = result.emulator.is_qemu() && result.outcome.emulator_signal().is_some();
        if crashed && crashes.len() < QEMU_CRASH_RETRIES {
            let dir = &result.logs.dir;
            let kept = dir.with_file_name(format!(
                "{}-crash{}",
                dir.file_name().unwrap_or_default().to_string_lossy(),
                crashes.len() + 1
            ));
            let _ = fs::remove_dir_all(&kept);
            let kept_note = match fs::rename(dir, &kept) {
                Ok(()) => kept.display().to_string(),
                Err(e) => format!("not kept: cannot move {} ({e})", dir.display()),
            };
            let crash = format!("{} (logs: {kept_note})", result.outcome);
            // Always said, progress or not: a retried crash must never pass silently.
            eprintln!(
                "[ally-run {}] QEMU crashed, booting again: {crash}",
                opts.name
            );
            crashes.push(crash);
            continue;
        }
        result.emulator_crashes = crashes;
        return Ok(result);
    }
}

fn run_once(opts: &RunOptions) -> Result<RunResult, RunError> {
    // The host endpoints listen first: their ports go into the inspection rules' variables
    // (before the rules blob and the ISO are built) and on the kernel command line of this
    // run's disk copy.
    let emulator = opts.emulator.resolve()?;
    let machine = qemu_machine(emulator, opts)?;
    let iommu = qemu_iommu(emulator, opts)?;
    let endpoints = match &opts.net {
        Some(n) => {
            let mut n = n.clone();
            if emulator != Emulator::Bochs && n.udp_flood_burst == crate::endpoints::UDP_FLOOD_BURST
            {
                n.udp_flood_burst = crate::endpoints::UDP_FLOOD_BURST_QEMU;
            }
            Some(Endpoints::start(n).map_err(RunError::Endpoints)?)
        }
        None => None,
    };
    let ports = endpoints.as_ref().map(|e| InspectPorts {
        http: e.http_port,
        inspect_drop: e.inspect_drop_port,
        upload: e.upload_port,
        storm: e.attack_udp_port,
    });
    let Prepared {
        mut files,
        rules,
        inspection,
        lock: _lock,
    } = prepare(opts, ports)?;
    files.udp_forward = endpoints.as_ref().map(|e| e.udp_flood_port);
    if let (Some(e), Some(n)) = (&endpoints, &opts.net) {
        // The ring-base attack only under Ally: on the bare device it would aim real DMA at
        // memory beyond the guest's RAM (Bochs' e1000 crashes the emulator doing that).
        let attack = if opts.mode == Mode::Ally {
            " ally.ring_attack=1"
        } else {
            ""
        };
        guest::set_disk_cmdline(
            &files.disk,
            &format!("{} {}{attack}", opts.kernel_cmdline, e.guest_cmdline()),
        )?;
        if opts.progress.is_some() {
            progress(
                &opts.name,
                &format!(
                    "host endpoints: HTTP 127.0.0.1:{} (big.bin {} B, small.bin {} B, eicar.bin {} B), inspect-drop HTTP 127.0.0.1:{}, upload 127.0.0.1:{} ({} B), attack UDP 127.0.0.1:{}{}",
                    e.http_port,
                    n.big_bytes,
                    n.small_bytes,
                    crate::endpoints::EICAR_FILE_BYTES,
                    e.inspect_drop_port,
                    e.upload_port,
                    n.upload_bytes,
                    e.attack_udp_port,
                    if inspection {
                        format!("; rules {}", inspect::RULES_FILE)
                    } else {
                        String::new()
                    }
                ),
            );
        }
    }
    if opts.progress.is_some() {
        progress(
            &opts.name,
            &format!(
            "booting {} under {emulator}{} ({} CPU(s), {GUEST_RAM_MIB} MiB, timeout {}); logs in {}",
            opts.mode,
            if emulator.is_qemu() && iommu != Iommu::None {
                format!(" ({machine}, {iommu} IOMMU)")
            } else if emulator.is_qemu() {
                format!(" ({machine})")
            } else {
                String::new()
            },
            opts.cpus,
            fmt_duration(opts.timeout),
            files.dir.display()
        ),
        );
    }
    let mut running = emulator::start(
        emulator,
        &files,
        opts.cpus,
        GUEST_RAM_MIB,
        machine,
        opts.qemu_cpu.as_deref(),
        iommu,
    )?;
    let start = Instant::now();
    let (outcome, to_init) = watch(opts, &files, &mut running, start);
    // After a completed run, give the emulator a moment to exit by itself (Ally's or the
    // guest's power-off), then stop it.
    if outcome == Outcome::Completed {
        running.wait_for_exit(Duration::from_secs(10));
    }
    running.stop();
    let wall = start.elapsed();
    drop(running);
    let net = endpoints.map(Endpoints::stop);

    let com1 = read_lossy(&files.com1);
    let com2 = read_lossy(&files.com2);
    let guest = GuestReport::parse(&com1);
    let ally = AllyReport::parse(&com2);
    let emulator_panics = read_lossy(&files.emulator_log)
        .lines()
        // Bochs reports the guest's ACPI power-off as a "panic": that one is the normal end.
        .filter(|l| l.contains(">>PANIC<<") && !l.contains("soft power off"))
        .map(str::to_string)
        .collect();
    let mut all_checks = vec![Check {
        name: "run",
        passed: outcome == Outcome::Completed,
        detail: outcome.to_string(),
    }];
    all_checks.extend(match opts.mode {
        Mode::Ally => checks::ally_checks(&guest, &ally, &rules),
        Mode::Baseline => checks::guest_checks(&guest),
    });
    if let Some(n) = &net {
        all_checks.extend(checks::network_checks(&guest, n));
        all_checks.push(attack::attack_markers_check(&guest, &n.options.attacks));
        if opts.mode == Mode::Ally {
            let attack_frames = checks::AttackDrops {
                offload: u64::from(n.options.attacks.contains(&attack::Attack::Tucso)),
                checksum: u64::from(n.options.attacks.contains(&attack::Attack::RstSplit)),
            };
            all_checks.extend(checks::nic_checks(&guest, &ally, attack_frames));
            if !n.options.resets.is_empty() {
                all_checks.push(checks::ally_guest_reset(&ally, n.options.resets.len()));
            }
            all_checks.push(inspect::ring_attack_check(&guest, &ally));
            all_checks.push(attack::ally_defences_check(
                &guest,
                &ally,
                n,
                &n.options.attacks,
            ));
            if n.options.attacks.contains(&attack::Attack::Dma) {
                let setup = attack::DmaSetup::of_run(machine, iommu, &effective_ally_options(opts));
                all_checks.push(attack::dma_check(&guest, &ally, setup));
                all_checks.push(attack::msi_check(&guest, &ally, setup));
                all_checks.push(attack::own_msi_check(&guest, setup));
                all_checks.push(attack::iommu_capability_check(&guest, &ally, setup));
            }
            if inspection {
                let split = inspect::split_com2(&com2, &files.dir);
                all_checks.extend(inspect::inspect_checks(&guest, n, &split));
            }
            let forbidden = crate::wire::Forbidden::of_run(inspection);
            let capture = crate::wire::Capture::of_run(emulator, &files);
            match capture.scan(&forbidden) {
                Ok(wire) => {
                    let after_last = ally
                        .all("nic-rx-last")
                        .last()
                        .and_then(|l| l.fields.get("fnv60"))
                        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
                        .and_then(|h| wire.frames_after(h));
                    all_checks.push(checks::nic_wire_balance(&ally, &wire.counts, after_last));
                    all_checks.push(crate::wire::wire_clean_check(&wire, &capture));
                }
                Err(e) => {
                    for name in ["nic-wire-balance", "wire-clean"] {
                        all_checks.push(Check {
                            name,
                            passed: false,
                            detail: format!("cannot read {capture}: {e}"),
                        });
                    }
                }
            }
        }
    }
    if !opts.keep {
        let _ = fs::remove_file(&files.disk);
        let _ = fs::remove_file(&files.iso);
        let _ = fs::remove_dir_all(files.dir.join("iso"));
    }
    Ok(RunResult {
        mode: opts.mode,
        emulator,
        outcome,
        wall,
        to_init,
        guest,
        ally,
        logs: LogPaths {
            dir: files.dir.clone(),
            com1: files.com1.clone(),
            com2: files.com2.clone(),
            emulator_log: files.emulator_log.clone(),
            emulator_stdout: files.emulator_stdout.clone(),
        },
        emulator_panics,
        net,
        checks: all_checks,
        com1_tail: tail(&com1, TAIL_LINES),
        com2_tail: tail(&com2, TAIL_LINES),
        emulator_crashes: Vec::new(),
    })
}

/// Watches the logs until the run is over; returns how it ended and when the guest's init ran.
fn watch(
    opts: &RunOptions,
    files: &MachineFiles,
    running: &mut Running,
    start: Instant,
) -> (Outcome, Option<Duration>) {
    let mut w = Watcher {
        mode: opts.mode,
        grace: opts.grace,
        timeout: opts.timeout,
        done_at: None,
        init_at: None,
    };
    let mut next_progress = opts.progress.map(|p| start + p);
    let mut sizes = (u64::MAX, u64::MAX);
    let (mut com1, mut com2) = (String::new(), String::new());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let exited = running.try_exited();
        // The logs are small (tens of KiB): re-read them whole when they grow.
        let now_sizes = (
            fs::metadata(&files.com1).map(|m| m.len()).unwrap_or(0),
            fs::metadata(&files.com2).map(|m| m.len()).unwrap_or(0),
        );
        if now_sizes != sizes || exited.is_some() {
            sizes = now_sizes;
            com1 = read_lossy(&files.com1);
            com2 = read_lossy(&files.com2);
        }
        let now = start.elapsed();
        let verdict = w.poll(now, &com1, &com2, exited.as_deref());
        if let Watch::Stop(o) = verdict {
            if opts.progress.is_some() {
                progress(&opts.name, &format!("{} {o}", fmt_duration(now)));
            }
            return (o, w.init_at);
        }
        if let (Some(at), Some(every)) = (next_progress, opts.progress) {
            if Instant::now() >= at {
                next_progress = Some(at + every);
                let mut msg = format!("{}  com1: {}", fmt_duration(now), last_line(&com1));
                if opts.mode == Mode::Ally {
                    msg += &format!("  |  com2: {}", last_line(&com2));
                }
                progress(&opts.name, &msg);
            }
        }
    }
}

/// Ally's command line for this run: [`ally_command_line`] with whether the emulated
/// machine has an IOMMU (`--iommu intel|amd`; Bochs has none).
fn effective_ally_options(opts: &RunOptions) -> String {
    ally_command_line(&opts.ally_options, opts.iommu != Iommu::None)
}

/// Ally's command line: the operator's options, plus `iommu=off` on a machine without an
/// IOMMU (Ally refuses to start there otherwise), unless the options say `iommu=` already.
pub fn ally_command_line(options: &str, iommu: bool) -> String {
    let given = options
        .split_ascii_whitespace()
        .any(|t| t.starts_with("iommu="));
    match (iommu, given) {
        (false, false) if options.trim().is_empty() => "iommu=off".to_string(),
        (false, false) => format!("{} iommu=off", options.trim_end()),
        _ => options.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ally_is_told_iommu_off_only_where_the_machine_has_none() {
        assert_eq!(ally_command_line("", false), "iommu=off");
        assert_eq!(
            ally_command_line("dpi_cores=1 log=debug", false),
            "dpi_cores=1 log=debug iommu=off"
        );
        assert_eq!(ally_command_line("iommu=on", false), "iommu=on");
        assert_eq!(ally_command_line("log=debug", true), "log=debug");
    }

    fn watcher(mode: Mode) -> Watcher {
        Watcher {
            mode,
            grace: Duration::from_secs(60),
            timeout: Duration::from_secs(1800),
            done_at: None,
            init_at: None,
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn baseline_stops_when_guest_is_done() {
        let mut w = watcher(Mode::Baseline);
        assert_eq!(w.poll(S(10), "booting\n", "", None), Watch::Continue);
        assert_eq!(
            w.poll(S(20), "ALLYTEST init PASS\n", "", None),
            Watch::Continue
        );
        assert_eq!(w.init_at, Some(S(20)));
        assert_eq!(
            w.poll(S(30), "ALLYTEST init PASS\nALLYTEST done\n", "", None),
            Watch::Stop(Outcome::Completed)
        );
    }

    #[test]
    fn ally_waits_for_poweroff_then_grace() {
        let mut w = watcher(Mode::Ally);
        let done = "ALLYTEST init PASS\nALLYTEST done\n";
        assert_eq!(
            w.poll(S(100), done, "ALLY guest-start\n", None),
            Watch::Continue
        );
        assert_eq!(
            w.poll(S(159), done, "ALLY guest-start\n", None),
            Watch::Continue
        );
        assert_eq!(
            w.poll(S(160), done, "ALLY guest-start\n", None),
            Watch::Stop(Outcome::NoAllyPoweroff)
        );
        let mut w = watcher(Mode::Ally);
        assert_eq!(
            w.poll(
                S(100),
                done,
                "ALLY exits reason=CPUID count=1\n[x] ALLY poweroff\n",
                None
            ),
            Watch::Stop(Outcome::Completed)
        );
    }

    #[test]
    fn a_fatal_line_is_judged_only_once_it_is_whole() {
        let mut w = watcher(Mode::Ally);
        assert_eq!(
            w.poll(
                S(5),
                "",
                "[cpu0 ERROR] ALLY fatal reason=\"rules blob: check",
                None
            ),
            Watch::Continue
        );
        assert_eq!(
            w.poll(
                S(6),
                "",
                "[cpu0 ERROR] ALLY fatal reason=\"rules blob: checksum\"\n",
                None
            ),
            Watch::Stop(Outcome::Fatal {
                line: "ALLY fatal reason=\"rules blob: checksum\"".into()
            })
        );
    }

    #[test]
    fn fatal_lines_stop_at_once() {
        let mut w = watcher(Mode::Ally);
        assert_eq!(
            w.poll(S(5), "", "[cpu0 ERROR] ALLY fatal reason=no-ept\n", None),
            Watch::Stop(Outcome::Fatal {
                line: "ALLY fatal reason=no-ept".into()
            })
        );
        let mut w = watcher(Mode::Baseline);
        assert!(matches!(
            w.poll(S(5), "[ 1.2] Kernel panic - not syncing: VFS\n", "", None),
            Watch::Stop(Outcome::Fatal { .. })
        ));
    }

    #[test]
    fn exit_and_timeout() {
        let mut w = watcher(Mode::Baseline);
        assert_eq!(
            w.poll(S(5), "", "", Some("exit status: 1")),
            Watch::Stop(Outcome::EmulatorExited {
                status: "exit status: 1".into()
            })
        );
        let mut w = watcher(Mode::Baseline);
        assert_eq!(w.poll(S(1800), "", "", None), Watch::Stop(Outcome::Timeout));
        let crash = Outcome::EmulatorExited {
            status: "signal: 11 (SIGSEGV)".into(),
        };
        assert_eq!(crash.emulator_signal(), Some("11 (SIGSEGV)"));
        let exit = Outcome::EmulatorExited {
            status: "exit status: 1".into(),
        };
        assert_eq!(exit.emulator_signal(), None);
        assert_eq!(Outcome::Timeout.emulator_signal(), None);
    }

    #[test]
    fn tail_keeps_last_non_empty_lines() {
        assert_eq!(tail("a\r\n\r\nb\r\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a\n", 5), ["a"]);
        assert!(tail("", 5).is_empty());
    }

    #[test]
    fn last_line_is_trimmed() {
        assert_eq!(last_line("a\r\nbb\r\n\r\n"), "bb");
        assert_eq!(last_line(""), "-");
        assert_eq!(last_line(&"x".repeat(100)).chars().count(), 71);
    }

    #[test]
    fn one_run_per_name() {
        let root = std::env::temp_dir().join(format!("ally-lock-test-{}", std::process::id()));
        let held = lock_run(&root, "demo").unwrap();
        let e = lock_run(&root, "demo").unwrap_err().to_string();
        assert!(
            e.starts_with("option run name: another run is using"),
            "{e}"
        );
        lock_run(&root, "other").unwrap();
        drop(held);
        lock_run(&root, "demo").unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn machine_and_cpu_options_are_qemu_only() {
        let mut o = RunOptions::new(Mode::Baseline, "t");
        assert_eq!(qemu_machine(Emulator::Bochs, &o).unwrap(), Machine::Pc);
        assert_eq!(qemu_machine(Emulator::QemuTcg, &o).unwrap(), Machine::Pc);
        o.machine = Some(Machine::Q35);
        assert_eq!(qemu_machine(Emulator::QemuTcg, &o).unwrap(), Machine::Q35);
        assert_eq!(qemu_machine(Emulator::QemuKvm, &o).unwrap(), Machine::Q35);
        assert_eq!(
            qemu_machine(Emulator::Bochs, &o).unwrap_err().to_string(),
            "option --machine: `q35` is a QEMU machine type; Bochs emulates only its own i440FX PC (run with --emulator qemu-tcg or qemu, or leave --machine out)"
        );
        // `--machine pc` too: Bochs' machine is not QEMU's pc.
        o.machine = Some(Machine::Pc);
        assert!(qemu_machine(Emulator::Bochs, &o).is_err());
        let mut o = RunOptions::new(Mode::Baseline, "t");
        o.qemu_cpu = Some("max".into());
        assert_eq!(
            qemu_machine(Emulator::Bochs, &o).unwrap_err().to_string(),
            "option --qemu-cpu: `max` is a QEMU CPU model; Bochs runs its own corei7_skylake_x (run with --emulator qemu-tcg or qemu, or leave --qemu-cpu out)"
        );
    }

    #[test]
    fn the_iommu_is_q35_and_qemu_only() {
        let mut o = RunOptions::new(Mode::Ally, "t");
        for e in [Emulator::Bochs, Emulator::QemuTcg, Emulator::QemuKvm] {
            assert_eq!(qemu_iommu(e, &o).unwrap(), Iommu::None);
        }
        o.iommu = Iommu::Intel;
        assert_eq!(
            qemu_iommu(Emulator::Bochs, &o).unwrap_err().to_string(),
            "option --iommu: `intel` is a QEMU device; Bochs emulates no IOMMU (run with --emulator qemu-tcg or qemu and --machine q35, or give --iommu none)"
        );
        // The default machine is pc.
        assert_eq!(
            qemu_iommu(Emulator::QemuTcg, &o).unwrap_err().to_string(),
            "option --iommu: `intel` needs --machine q35: QEMU's `pc` machine takes no IOMMU device"
        );
        o.machine = Some(Machine::Pc);
        o.iommu = Iommu::Amd;
        assert!(qemu_iommu(Emulator::QemuKvm, &o)
            .unwrap_err()
            .to_string()
            .starts_with("option --iommu: `amd` needs --machine q35"));
        o.machine = Some(Machine::Q35);
        assert_eq!(qemu_iommu(Emulator::QemuTcg, &o).unwrap(), Iommu::Amd);
        assert_eq!(qemu_iommu(Emulator::QemuKvm, &o).unwrap(), Iommu::Amd);
        o.iommu = Iommu::None;
        o.machine = None;
        assert_eq!(qemu_iommu(Emulator::Bochs, &o).unwrap(), Iommu::None);
    }

    #[test]
    fn bad_options_are_refused_before_building() {
        let mut o = RunOptions::new(Mode::Baseline, "t");
        o.cpus = 0;
        o.progress = None;
        let e = prepare(&o, None).unwrap_err().to_string();
        assert_eq!(e, "option --cpus: 0 is out of range 1..=64");
        let mut o = RunOptions::new(Mode::Baseline, "t");
        o.kernel_cmdline = "console=ttyS0\ninit=/bin/sh".into();
        assert!(prepare(&o, None)
            .unwrap_err()
            .to_string()
            .starts_with("option --kernel-cmdline: "));
        let mut o = RunOptions::new(Mode::Baseline, "../x");
        o.progress = None;
        assert!(prepare(&o, None)
            .unwrap_err()
            .to_string()
            .starts_with("option run name"));
        let mut o = RunOptions::new(Mode::Baseline, "t");
        o.rules = Some(RulesInput::Blob("/x/rules.blob".into()));
        assert_eq!(
            prepare(&o, None).unwrap_err().to_string(),
            "option --rules: the baseline boots no Ally to load rules"
        );
    }
}
