//! `ally-run`: build and boot Ally (or the guest alone) under an emulator and judge the run.
//!
//! ```text
//! ally-run demo      [--cpus N] [--timeout S] [--ally-options "..."] [--keep] [--emulator E]
//!                    [--rules FILE [--vars FILE] | --rules-blob FILE]
//! ally-run baseline  [--cpus N] [--timeout S] [--keep] [--emulator E]
//!   both: [--machine pc|q35] [--qemu-cpu MODEL] (QEMU only) [--iommu none|intel|amd] (q35 only)
//!   both: [--no-net | --net-big SIZE --net-upload SIZE --net-small SIZE --net-pktgen N]
//!         [--reboot | --resets M1,M2,...] [--attacks A1,A2,...]
//! ```
//! Exit status: 0 when every check passed, 1 when the run failed a check, 2 when it could not
//! run (bad option, missing tool or input).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ally_runner::attack::{self, Attack, ResetMethod};
use ally_runner::emulator::{Iommu, Machine};
use ally_runner::endpoints::NetOptions;
use ally_runner::{run, EmulatorChoice, Mode, RulesInput, RunOptions};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ally-run",
    about = "Build and boot Ally under Bochs or QEMU (KVM, or TCG with AMD SVM) and judge the run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot Ally, which boots the test guest from disk; print and judge the markers.
    Demo {
        #[command(flatten)]
        common: Common,
        /// Ally's command line (after `multiboot2 /boot/ally`).
        #[arg(long, default_value = "")]
        ally_options: String,
        /// Use this Ally image instead of building it with cargo.
        #[arg(long)]
        ally_image: Option<PathBuf>,
        /// A rules file, compiled into the blob GRUB gives Ally (`module2 /boot/rules.blob
        /// rules`); the run checks that Ally reports the number of rules that loaded. Default
        /// with the network workload: tests/rules/inspect.rules with the run's ports as
        /// variables, and the inspection checks; --rules or --rules-blob replace it.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Variables for --rules (Snort's `ipvar`/`portvar` lines); default: Snort 3's.
        #[arg(long, value_name = "FILE", requires = "rules")]
        vars: Option<PathBuf>,
        /// A compiled blob to give Ally as it is (e.g. a corrupt one, to see Ally refuse it).
        #[arg(long, value_name = "FILE", conflicts_with = "rules")]
        rules_blob: Option<PathBuf>,
    },
    /// Boot the test guest without Ally (GRUB chainloads the disk).
    Baseline {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Emulated CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Stop the run after this many seconds.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Keep the run's disk copy and ISO (logs are always kept).
    #[arg(long)]
    keep: bool,
    /// auto (QEMU/KVM when the host has VT-x, else Bochs), bochs, qemu (KVM, Ally's VMX
    /// backend) or qemu-tcg (software QEMU with an AMD CPU that has SVM and nested paging:
    /// Ally's SVM backend).
    #[arg(long, default_value = "auto")]
    emulator: EmulatorChoice,
    /// QEMU's machine type: pc (i440FX, IDE; the default) or q35 (ICH9: MMCONFIG and MCFG,
    /// AHCI). QEMU only: refused with Bochs.
    #[arg(long, value_name = "pc|q35")]
    machine: Option<Machine>,
    /// QEMU's -cpu instead of the default (KVM: host,+vmx; TCG: an EPYC with svm and npt).
    /// QEMU only: refused with Bochs.
    #[arg(long, value_name = "MODEL")]
    qemu_cpu: Option<String>,
    /// The IOMMU QEMU emulates: none, intel (`-device intel-iommu,intremap=on`, VT-d) or amd
    /// (`-device amd-iommu,intremap=on`, AMD-Vi). QEMU's q35 only: refused with Bochs and on
    /// the pc machine.
    #[arg(long, value_name = "none|intel|amd", default_value = "none")]
    iommu: Iommu,
    /// Run directory name under out/ (default: the subcommand's name).
    #[arg(long)]
    name: Option<String>,
    /// Replace the guest kernel's command line.
    #[arg(long)]
    kernel_cmdline: Option<String>,
    /// Run without the host's HTTP server and upload listener: the guest skips its transfers
    /// and e1000 reloads (a quicker boot).
    #[arg(long)]
    no_net: bool,
    /// Size of big.bin, downloaded once: bytes, or with a K/M suffix (KiB, MiB).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    net_big: u64,
    /// Size of the big upload.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    net_upload: u64,
    /// Size of small.bin and of the small upload, repeated after each e1000 reload.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    net_small: u64,
    /// Concurrent streams of the parallel phase (each downloads small.bin and uploads it
    /// back); 0 skips the phase.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=16))]
    net_streams: u32,
    /// Frames of each pktgen burst run (64-byte and 1500-byte frames, bursts of 32, to the
    /// host's UDP sink); 0 skips them.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    net_pktgen: u32,
    /// Reboot the guest after its workload; the second boot brings the e1000 up again and
    /// moves small.bin both ways (the same as `--resets reboot`).
    #[arg(long, conflicts_with = "resets")]
    reboot: bool,
    /// The reset chain after the workload: boot k ends with reset method k (kbc-pulse,
    /// kbc-output, port92-word, cf9-word, cf9-byte, acpi-reset-reg, triple-fault, reboot); the
    /// last boot brings the e1000 up again and moves small.bin both ways.
    #[arg(long, value_parser = parse_resets)]
    resets: Option<Resets>,
    /// The guest-side attacks to run, comma-separated: issue 11's (sleep, msr, pci-race,
    /// ipi-logical, swxoff, eeprom, tucso, alert-storm, split-upload, frag-udp) and issue
    /// 14's dma (the AHCI controller DMAing from and into Ally's region; q35 only, judged with
    /// --iommu by the dma-iommu check).
    #[arg(long, value_parser = parse_attacks)]
    attacks: Option<Attacks>,
}

#[derive(Clone)]
struct Resets(Vec<ResetMethod>);
#[derive(Clone)]
struct Attacks(Vec<Attack>);

fn parse_resets(s: &str) -> Result<Resets, String> {
    attack::parse_list(s, ResetMethod::parse)
        .map(Resets)
        .map_err(|e| format!("{e} reset method"))
}

fn parse_attacks(s: &str) -> Result<Attacks, String> {
    attack::parse_list(s, Attack::parse)
        .map(Attacks)
        .map_err(|e| format!("{e} attack"))
}

/// `123`, `512K` or `16M` (binary units) as bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a positive size (bytes, or a number with K or M)"))
}

fn options(mode: Mode, default_name: &str, c: Common) -> RunOptions {
    let mut o = RunOptions::new(mode, c.name.as_deref().unwrap_or(default_name));
    o.cpus = c.cpus;
    o.timeout = Duration::from_secs(c.timeout);
    o.keep = c.keep;
    o.emulator = c.emulator;
    o.machine = c.machine;
    o.qemu_cpu = c.qemu_cpu;
    o.iommu = c.iommu;
    if let Some(k) = c.kernel_cmdline {
        o.kernel_cmdline = k;
    }
    o.net = (!c.no_net).then(|| NetOptions {
        big_bytes: c.net_big,
        small_bytes: c.net_small,
        upload_bytes: c.net_upload,
        streams: c.net_streams,
        pktgen: c.net_pktgen,
        resets: match (c.resets, c.reboot) {
            (Some(r), _) => r.0,
            (None, true) => vec![ResetMethod::Reboot],
            (None, false) => Vec::new(),
        },
        attacks: c.attacks.map(|a| a.0).unwrap_or_default(),
        ..NetOptions::default()
    });
    o
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match cli.command {
        Cmd::Demo {
            common,
            ally_options,
            ally_image,
            rules,
            vars,
            rules_blob,
        } => {
            let mut o = options(Mode::Ally, "demo", common);
            o.ally_options = ally_options;
            o.ally_image = ally_image;
            o.rules = match (rules, rules_blob) {
                (Some(rules), _) => Some(RulesInput::Compile { rules, vars }),
                (None, Some(blob)) => Some(RulesInput::Blob(blob)),
                (None, None) => None,
            };
            o
        }
        Cmd::Baseline { common } => options(Mode::Baseline, "baseline", common),
    };
    match run(&opts) {
        Ok(result) => {
            println!("{result}");
            if result.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ally-run: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(
            parse_size("0"),
            Err("`0` is not a positive size (bytes, or a number with K or M)".into())
        );
        assert!(parse_size("M").is_err());
        assert!(parse_size("2G").is_err());
        assert!(parse_size("99999999999999999M").is_err());
    }
}
