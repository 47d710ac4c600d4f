//! The test guest: Debian's kernel, an initramfs (busybox-static, e1000.ko, msr.ko,
//! `guest/init`, the attacker `ally-attack`) and
//! a raw BIOS-bootable disk (MBR + syslinux on one FAT16 partition), built without root or loop
//! devices and cached by a hash of every input.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use crate::cpio::{CpioError, CpioWriter};
use crate::tool::{self, ToolError};

/// Size of the raw disk image.
pub const DISK_BYTES: u64 = 64 << 20;
/// First sector of the FAT16 partition (1 MiB, the usual alignment).
pub const PARTITION_START_SECTOR: u64 = 2048;
const PARTITION_OFFSET: u64 = PARTITION_START_SECTOR * 512;
/// syslinux's MBR boot code (finds the active partition, loads its boot sector).
pub const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// Boot code area of the MBR: the rest holds the disk signature and the partition table.
const MBR_CODE_BYTES: usize = 440;

/// The kernel command line. The guest is told nothing about Ally: only the console (ttyS0 =
/// COM1), a quieter log so marker lines are not interleaved with kernel messages, and two
/// choices the guest's root could make itself:
/// - `iomem=relaxed`, to reach unclaimed physical memory through /dev/mem: with Debian's
///   CONFIG_IO_STRICT_DEVMEM, Linux refuses mmap of any busy resource, and it reserves a busy
///   "RAM buffer" from the end of every RAM range up to the next 64 MiB boundary
///   (e820__reserve_resources_late), which covers the start of a hidden region.
/// - `clocksource=hpet tsc=unstable`: Bochs' Skylake-X model reports a 3.5 GHz TSC in CPUID,
///   but its TSC does not advance at that rate against Bochs' own timers, so guest time on
///   the TSC runs far slower than emulated time; with 2+ emulated CPUs (no idle fast-forward)
///   every `sleep` then costs minutes of wall time. On the HPET the guest's time agrees with
///   the emulator's: a 2-CPU baseline boot went from over 13 minutes (stuck in the guest's
///   sleeps after loading e1000) to 3.5 minutes, and pinged.
/// - `pci=noacpi` (the lead's, d33f7ed): under Bochs 2.7 with more than one CPU, Linux's ACPI
///   PCI-link setup was seen to leave the e1000 without interrupts; the BIOS's $PIR routing
///   works with one CPU or many. (A 2-CPU baseline with the HPET clock but without it also
///   pinged, so the clock may have been the whole story; kept until an SMP Ally run shows it.)
/// - `idle=halt`: Bochs 2.7 loses MWAIT wake-ups. Its MONITOR drops the other CPUs' cached
///   translations of the monitored line with `invlpg(physical address)`, which names a
///   *linear* address, so a CPU that already holds a translation of a kernel address on that
///   page stores straight into it and never wakes the waiter. Linux's MWAIT idle leaves its
///   "polling" flag set, so a waker sends no IPI either: the woken task waits for its CPU's
///   next timer. Seen in the 4-CPU run's alert storm: the ping's reply reached the guest's
///   ring on time (its RDT write), but the ping process on an idle CPU ran 144.6 ms later,
///   at that CPU's next timer interrupt, with no reschedule IPI between. HLT idle makes the
///   waker send the IPI.
pub const KERNEL_CMDLINE: &str = "console=ttyS0,115200 loglevel=4 iomem=relaxed pci=noacpi \
     clocksource=hpet tsc=unstable idle=halt";

/// Bumped whenever the way the image is built changes, to invalidate old caches.
const BUILDER_VERSION: &str = "ally-guest-image-v1";

/// An error preparing the guest image.
#[derive(Debug)]
pub enum GuestError {
    /// An input file is missing: the message says how to get it.
    MissingInput {
        what: &'static str,
        path: PathBuf,
    },
    /// More than one candidate for an input where exactly one is expected.
    Ambiguous {
        what: &'static str,
        found: Vec<PathBuf>,
    },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Tool(ToolError),
    Cpio(CpioError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::MissingInput { what, path } => write!(
                f,
                "{what} not found at {} (run scripts/setup.sh to fetch the guest debs)",
                path.display()
            ),
            GuestError::Ambiguous { what, found } => {
                write!(f, "expected one {what}, found {}: ", found.len())?;
                let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
                f.write_str(&list.join(", "))
            }
            GuestError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            GuestError::Tool(e) => write!(f, "building the guest disk: {e}"),
            GuestError::Cpio(e) => write!(f, "building the initramfs: {e}"),
        }
    }
}

impl std::error::Error for GuestError {}

impl From<ToolError> for GuestError {
    fn from(e: ToolError) -> Self {
        GuestError::Tool(e)
    }
}

impl From<CpioError> for GuestError {
    fn from(e: CpioError) -> Self {
        GuestError::Cpio(e)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, GuestError> {
    fs::read(path).map_err(io_err(path))
}

/// The host files the guest image is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSources {
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    /// e1000.ko, possibly compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`).
    pub e1000: PathBuf,
    /// msr.ko (/dev/cpu/N/msr for the MSR attack), possibly compressed.
    pub msr: PathBuf,
    /// pktgen.ko (the bulk transmit workload), possibly compressed.
    pub pktgen: PathBuf,
    pub init: PathBuf,
    /// The attacker (`guest/attack`, a static x86_64-unknown-linux-musl binary).
    pub attack: PathBuf,
}

/// `${ALLY_CACHE:-$HOME/.cache/ally}`, where scripts/setup.sh unpacks the guest debs.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLY_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("ally")
}

fn single(what: &'static str, dir: &Path, mut found: Vec<PathBuf>) -> Result<PathBuf, GuestError> {
    found.sort();
    match found.len() {
        0 => Err(GuestError::MissingInput {
            what,
            path: dir.to_path_buf(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(GuestError::Ambiguous { what, found }),
    }
}

/// `<version_dir>/<subdir>/<name>.ko[.xz|.zst|.gz]`: exactly one must exist.
fn kernel_module(
    version_dir: &Path,
    subdir: &str,
    name: &str,
    what: &'static str,
) -> Result<PathBuf, GuestError> {
    let dir = version_dir.join(subdir);
    let plain = format!("{name}.ko");
    let compressed = format!("{name}.ko.");
    single(
        what,
        &dir,
        entries(&dir)?
            .into_iter()
            .filter(|p| {
                let n = file_name(p);
                n == plain || n.starts_with(&compressed)
            })
            .collect(),
    )
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, GuestError> {
    let rd = fs::read_dir(dir).map_err(|_| GuestError::MissingInput {
        what: "directory",
        path: dir.to_path_buf(),
    })?;
    let mut v = Vec::new();
    for e in rd {
        v.push(e.map_err(io_err(dir))?.path());
    }
    Ok(v)
}

impl GuestSources {
    /// Finds the unpacked debs under `cache/debs` (layout made by scripts/setup.sh: the
    /// `linux-image` link to the kernel package and `busybox-static`), the init script and the
    /// attacker binary.
    pub fn locate(cache: &Path, init: &Path, attack: &Path) -> Result<GuestSources, GuestError> {
        let debs = cache.join("debs");
        let kpkg = debs.join("linux-image");
        let boot = kpkg.join("boot");
        let kernel = single(
            "kernel (boot/vmlinuz-*)",
            &boot,
            entries(&boot)?
                .into_iter()
                .filter(|p| file_name(p).starts_with("vmlinuz-"))
                .collect(),
        )?;
        let modules = kpkg.join("lib/modules");
        let version_dir = single(
            "kernel module tree (lib/modules/<version>)",
            &modules,
            entries(&modules)?
                .into_iter()
                .filter(|p| p.is_dir())
                .collect(),
        )?;
        let e1000 = kernel_module(
            &version_dir,
            "kernel/drivers/net/ethernet/intel/e1000",
            "e1000",
            "e1000 module (e1000.ko[.xz|.zst|.gz])",
        )?;
        let msr = kernel_module(
            &version_dir,
            "kernel/arch/x86/kernel",
            "msr",
            "msr module (msr.ko[.xz|.zst|.gz])",
        )?;
        let pktgen = kernel_module(
            &version_dir,
            "kernel/net/core",
            "pktgen",
            "pktgen module (pktgen.ko[.xz|.zst|.gz])",
        )?;
        let busybox = debs.join("busybox-static/bin/busybox");
        if !busybox.is_file() {
            return Err(GuestError::MissingInput {
                what: "busybox-static",
                path: busybox,
            });
        }
        if !init.is_file() {
            return Err(GuestError::MissingInput {
                what: "guest init script",
                path: init.to_path_buf(),
            });
        }
        if !attack.is_file() {
            return Err(GuestError::MissingInput {
                what: "attacker binary (cargo build -p ally-attack --release --target x86_64-unknown-linux-musl)",
                path: attack.to_path_buf(),
            });
        }
        Ok(GuestSources {
            kernel,
            busybox,
            e1000,
            msr,
            pktgen,
            init: init.to_path_buf(),
            attack: attack.to_path_buf(),
        })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// How a kernel module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleCompression {
    None,
    Xz,
    Zstd,
    Gzip,
}

impl ModuleCompression {
    pub fn of(path: &Path) -> ModuleCompression {
        let n = file_name(path);
        if n.ends_with(".ko.xz") {
            ModuleCompression::Xz
        } else if n.ends_with(".ko.zst") {
            ModuleCompression::Zstd
        } else if n.ends_with(".ko.gz") {
            ModuleCompression::Gzip
        } else {
            ModuleCompression::None
        }
    }
}

/// The module as a plain `.ko`: busybox's insmod loads uncompressed modules only, so
/// compressed ones are unpacked on the host.
pub fn plain_module(path: &Path) -> Result<Vec<u8>, GuestError> {
    let tool = match ModuleCompression::of(path) {
        ModuleCompression::None => return read(path),
        ModuleCompression::Xz => "xz",
        ModuleCompression::Zstd => "zstd",
        ModuleCompression::Gzip => "gzip",
    };
    Ok(tool::run(Command::new(tool).arg("-dc").arg(path), None)?)
}

/// The syslinux configuration: boot `vmlinuz` with `initrd.gz` at once.
pub fn syslinux_cfg(cmdline: &str) -> String {
    format!(
        "DEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n  KERNEL vmlinuz\n  INITRD initrd.gz\n  APPEND {cmdline}\n"
    )
}

/// The initramfs: `/init` (the test script), busybox (its applet links are made by init
/// itself with `busybox --install -s`), `/bin/ally-attack`, `/lib/modules/e1000.ko`,
/// `/lib/modules/msr.ko` and `/lib/modules/pktgen.ko`.
pub fn build_initramfs(src: &GuestSources) -> Result<Vec<u8>, GuestError> {
    let mut w = CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        w.dir(d)?;
    }
    w.file("bin/busybox", 0o755, &read(&src.busybox)?)?;
    // The init script's interpreter line is #!/bin/busybox sh; `sh` is handy before --install.
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, &read(&src.init)?)?;
    w.file("bin/ally-attack", 0o755, &read(&src.attack)?)?;
    w.file("lib/modules/e1000.ko", 0o644, &plain_module(&src.e1000)?)?;
    w.file("lib/modules/msr.ko", 0o644, &plain_module(&src.msr)?)?;
    w.file("lib/modules/pktgen.ko", 0o644, &plain_module(&src.pktgen)?)?;
    let archive = w.finish();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&archive)
        .and_then(|_| gz.finish())
        .map_err(io_err(&src.init))
}

/// A hash of everything the image is built from.
pub fn input_hash(src: &GuestSources, cmdline: &str) -> Result<String, GuestError> {
    let mut h = Sha256::new();
    h.update(BUILDER_VERSION.as_bytes());
    h.update([0]);
    h.update(cmdline.as_bytes());
    h.update([0]);
    for p in [
        &src.kernel,
        &src.busybox,
        &src.e1000,
        &src.msr,
        &src.pktgen,
        &src.init,
        &src.attack,
    ] {
        h.update(file_name(p).as_bytes());
        h.update([0]);
        h.update(read(p)?);
        h.update([0]);
    }
    let mbr = Path::new(SYSLINUX_MBR);
    if mbr.is_file() {
        h.update(read(mbr)?);
    }
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The built (or cached) guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The raw disk (cached copy: runs must use their own copy, Bochs writes and locks it).
    pub disk: PathBuf,
    pub initramfs: PathBuf,
    pub hash: String,
    /// Whether this call built it (false: found in the cache).
    pub built: bool,
}

/// Builds the disk image into `cache_root/guest-<hash>/` unless it is already there.
/// Concurrent callers (parallel tests, several runners) serialize on a lock file: one builds,
/// the others then find it cached. Images of other inputs older than an hour are removed
/// (64 MiB each).
pub fn build_guest_image(
    src: &GuestSources,
    cache_root: &Path,
    cmdline: &str,
) -> Result<GuestImage, GuestError> {
    let hash = input_hash(src, cmdline)?;
    fs::create_dir_all(cache_root).map_err(io_err(cache_root))?;
    let lock_path = cache_root.join(".guest-cache.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let dir = cache_root.join(format!("guest-{hash}"));
    let disk = dir.join("disk.img");
    let initramfs = dir.join("initrd.gz");
    if disk.is_file() && initramfs.is_file() {
        return Ok(GuestImage {
            disk,
            initramfs,
            hash,
            built: false,
        });
    }
    // Build in a private directory, then rename: a half-built image is never picked up.
    let tmp = cache_root.join(format!("guest-{hash}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = build_into(src, &tmp, cmdline);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    remove_stale_images(cache_root, &hash);
    Ok(GuestImage {
        disk,
        initramfs,
        hash,
        built: true,
    })
}

/// Removes cached images of other inputs not touched for an hour (a run still copying one
/// would have touched it moments ago). Called with the cache lock held.
fn remove_stale_images(cache_root: &Path, keep_hash: &str) {
    let keep = format!("guest-{keep_hash}");
    let Ok(rd) = fs::read_dir(cache_root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 3600);
        if name.starts_with("guest-") && name != keep && old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn build_into(src: &GuestSources, dir: &Path, cmdline: &str) -> Result<(), GuestError> {
    let initrd = dir.join("initrd.gz");
    fs::write(&initrd, build_initramfs(src)?).map_err(io_err(&initrd))?;
    let cfg = dir.join("syslinux.cfg");
    fs::write(&cfg, syslinux_cfg(cmdline)).map_err(io_err(&cfg))?;

    let disk = dir.join("disk.img");
    let f = fs::File::create(&disk).map_err(io_err(&disk))?;
    f.set_len(DISK_BYTES).map_err(io_err(&disk))?;
    drop(f);
    // One bootable FAT16 (type 6) partition from sector 2048 to the end.
    tool::run(
        Command::new("sfdisk")
            .args([
                "--quiet",
                "--no-reread",
                "--no-tell-kernel",
                "--label",
                "dos",
            ])
            .arg(&disk),
        Some(format!("start={PARTITION_START_SECTOR}, type=6, bootable\n").as_bytes()),
    )?;
    let sectors = (DISK_BYTES - PARTITION_OFFSET) / 512;
    tool::run(
        Command::new("mkfs.vfat")
            .args(["-F", "16", "-n", "ALLYGUEST"])
            .arg("--offset")
            .arg(PARTITION_START_SECTOR.to_string())
            .arg(&disk)
            // mkfs.vfat's block count is in KiB.
            .arg((sectors / 2).to_string()),
        None,
    )?;
    tool::run(
        Command::new("syslinux")
            .arg("--offset")
            .arg(PARTITION_OFFSET.to_string())
            .arg("--install")
            .arg(&disk),
        None,
    )?;
    let mbr = read(Path::new(SYSLINUX_MBR))?;
    if mbr.len() > MBR_CODE_BYTES {
        return Err(GuestError::Io {
            path: SYSLINUX_MBR.into(),
            source: std::io::Error::other(format!(
                "{} bytes, more than the {MBR_CODE_BYTES}-byte MBR code area",
                mbr.len()
            )),
        });
    }
    let mut img = fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .map_err(io_err(&disk))?;
    img.write_all(&mbr).map_err(io_err(&disk))?;
    drop(img);
    let target = format!("{}@@{PARTITION_OFFSET}", disk.display());
    for (from, to) in [
        (cfg.as_path(), "::syslinux.cfg"),
        (src.kernel.as_path(), "::vmlinuz"),
        (initrd.as_path(), "::initrd.gz"),
    ] {
        tool::run(
            Command::new("mcopy")
                .args(["-o", "-i"])
                .arg(&target)
                .arg(from)
                .arg(to),
            None,
        )?;
    }
    Ok(())
}

/// Replaces the kernel command line of a run's own copy of the disk (its syslinux.cfg), for
/// what differs between runs (the host endpoints' ports): the cached image, and so its cache
/// key, keeps the base command line.
pub fn set_disk_cmdline(disk: &Path, cmdline: &str) -> Result<(), GuestError> {
    let dir = disk.parent().unwrap_or(Path::new("."));
    let cfg = dir.join("syslinux.cfg");
    fs::write(&cfg, syslinux_cfg(cmdline)).map_err(io_err(&cfg))?;
    let target = format!("{}@@{PARTITION_OFFSET}", disk.display());
    let r = tool::run(
        Command::new("mcopy")
            .args(["-o", "-i"])
            .arg(&target)
            .arg(&cfg)
            .arg("::syslinux.cfg"),
        None,
    );
    let _ = fs::remove_file(&cfg);
    r?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_compression_from_name() {
        assert_eq!(
            ModuleCompression::of(Path::new("a/e1000.ko")),
            ModuleCompression::None
        );
        assert_eq!(
            ModuleCompression::of(Path::new("e1000.ko.xz")),
            ModuleCompression::Xz
        );
        assert_eq!(
            ModuleCompression::of(Path::new("e1000.ko.zst")),
            ModuleCompression::Zstd
        );
        assert_eq!(
            ModuleCompression::of(Path::new("e1000.ko.gz")),
            ModuleCompression::Gzip
        );
    }

    #[test]
    fn compressed_module_is_unpacked() {
        let dir = std::env::temp_dir().join(format!("ally-guest-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("m.ko");
        fs::write(&plain, b"\x7fELF module").unwrap();
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"\x7fELF module").unwrap();
        let packed = dir.join("m.ko.gz");
        fs::write(&packed, gz.finish().unwrap()).unwrap();
        assert_eq!(plain_module(&plain).unwrap(), b"\x7fELF module");
        assert_eq!(plain_module(&packed).unwrap(), b"\x7fELF module");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn syslinux_cfg_boots_at_once() {
        let c = syslinux_cfg(KERNEL_CMDLINE);
        assert!(c.contains("TIMEOUT 0\n"));
        assert!(c.contains(&format!("APPEND {KERNEL_CMDLINE}\n")));
        assert!(KERNEL_CMDLINE.starts_with("console=ttyS0,115200 "));
    }

    /// Fake inputs: the image builder does not care what the kernel or busybox contain.
    fn fake_sources(dir: &Path) -> GuestSources {
        fs::create_dir_all(dir).unwrap();
        let s = GuestSources {
            kernel: dir.join("vmlinuz-6.1.0-test-amd64"),
            busybox: dir.join("busybox"),
            e1000: dir.join("e1000.ko"),
            msr: dir.join("msr.ko"),
            pktgen: dir.join("pktgen.ko"),
            init: dir.join("init"),
            attack: dir.join("ally-attack"),
        };
        fs::write(&s.kernel, vec![0xa5; 300_000]).unwrap();
        fs::write(&s.busybox, b"\x7fELF busybox").unwrap();
        fs::write(&s.e1000, b"\x7fELF e1000").unwrap();
        fs::write(&s.msr, b"\x7fELF msr").unwrap();
        fs::write(&s.pktgen, b"\x7fELF pktgen").unwrap();
        fs::write(&s.attack, b"\x7fELF ally-attack").unwrap();
        fs::write(&s.init, b"#!/bin/busybox sh\necho ALLYTEST init PASS\n").unwrap();
        s
    }

    #[test]
    fn initramfs_lists_what_init_needs() {
        let dir = std::env::temp_dir().join(format!("ally-initrd-test-{}", std::process::id()));
        let src = fake_sources(&dir);
        let gz = build_initramfs(&src).unwrap();
        let mut cpio = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut cpio).unwrap();
        // The system's cpio is an independent reader of the format.
        let list = tool::run(Command::new("cpio").args(["-it", "--quiet"]), Some(&cpio)).unwrap();
        let list = String::from_utf8(list).unwrap();
        for name in [
            "init",
            "bin/busybox",
            "bin/sh",
            "lib/modules/e1000.ko",
            "lib/modules/msr.ko",
            "lib/modules/pktgen.ko",
            "bin/ally-attack",
            "proc",
            "sys",
            "dev",
        ] {
            assert!(
                list.lines().any(|l| l == name),
                "{name} missing from\n{list}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_image_is_bootable_and_cached() {
        let dir = std::env::temp_dir().join(format!("ally-disk-test-{}", std::process::id()));
        let src = fake_sources(&dir.join("src"));
        let cache = dir.join("cache");
        fs::create_dir_all(&cache).unwrap();
        let img = build_guest_image(&src, &cache, KERNEL_CMDLINE).unwrap();
        assert!(img.built);
        let disk = fs::read(&img.disk).unwrap();
        assert_eq!(disk.len() as u64, DISK_BYTES);
        // MBR: syslinux's boot code, the 0x55AA signature, partition 1 bootable FAT16 at 2048.
        let mbr = fs::read(SYSLINUX_MBR).unwrap();
        assert_eq!(&disk[..mbr.len()], &mbr[..]);
        assert_eq!(&disk[510..512], &[0x55, 0xaa]);
        let p = &disk[0x1be..0x1ce];
        assert_eq!(p[0], 0x80, "partition 1 must be active");
        assert_eq!(p[4], 0x06, "partition 1 must be FAT16");
        assert_eq!(u32::from_le_bytes(p[8..12].try_into().unwrap()), 2048);
        // The partition's boot sector is syslinux's (it has the FAT boot signature too).
        let vbr = &disk[PARTITION_OFFSET as usize..PARTITION_OFFSET as usize + 512];
        assert_eq!(&vbr[510..512], &[0x55, 0xaa]);
        assert_eq!(&vbr[0x36..0x3b], b"FAT16");
        let listing = tool::run(
            Command::new("mdir")
                .args(["-a", "-b", "-i"])
                .arg(format!("{}@@{PARTITION_OFFSET}", img.disk.display()))
                .arg("::"),
            None,
        )
        .unwrap();
        let listing = String::from_utf8(listing).unwrap().to_lowercase();
        for f in ["vmlinuz", "initrd.gz", "syslinux.cfg", "ldlinux.sys"] {
            assert!(listing.contains(f), "{f} missing from\n{listing}");
        }
        // Parallel callers with the same inputs: one builds, the others find it cached.
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (src, cache) = (src.clone(), cache.clone());
                std::thread::spawn(move || build_guest_image(&src, &cache, "other cmdline"))
            })
            .collect();
        let built: Vec<GuestImage> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_eq!(built.iter().filter(|i| i.built).count(), 1);
        assert!(built.iter().all(|i| i.disk == built[0].disk));
        // Same inputs: served from the cache. A changed input: a new image.
        let again = build_guest_image(&src, &cache, KERNEL_CMDLINE).unwrap();
        assert!(!again.built);
        assert_eq!(again.disk, img.disk);
        // A run's copy gets its own command line; the cached image keeps the base one.
        let copy = dir.join("run").join("disk.img");
        fs::create_dir_all(copy.parent().unwrap()).unwrap();
        fs::copy(&img.disk, &copy).unwrap();
        set_disk_cmdline(&copy, "console=ttyS0 ally.http=1234").unwrap();
        let cfg_of = |disk: &Path| {
            let out = tool::run(
                Command::new("mtype")
                    .arg("-i")
                    .arg(format!("{}@@{PARTITION_OFFSET}", disk.display()))
                    .arg("::syslinux.cfg"),
                None,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(cfg_of(&copy), syslinux_cfg("console=ttyS0 ally.http=1234"));
        assert_eq!(cfg_of(&img.disk), syslinux_cfg(KERNEL_CMDLINE));
        assert!(!copy.parent().unwrap().join("syslinux.cfg").exists());
        fs::write(&src.init, b"#!/bin/busybox sh\necho changed\n").unwrap();
        let changed = build_guest_image(&src, &cache, KERNEL_CMDLINE).unwrap();
        assert!(changed.built);
        assert_ne!(changed.hash, img.hash);
        // A rebuilt attacker: a new image too.
        fs::write(&src.attack, b"\x7fELF ally-attack v2").unwrap();
        let again = build_guest_image(&src, &cache, KERNEL_CMDLINE).unwrap();
        assert!(again.built);
        assert_ne!(again.hash, changed.hash);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_cache_names_setup() {
        let e = GuestSources::locate(
            Path::new("/nonexistent-ally-cache"),
            Path::new("/x"),
            Path::new("/y"),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("scripts/setup.sh"), "{msg}");
    }
}
