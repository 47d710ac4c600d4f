//! Ally's command-line options (the string GRUB passes after `multiboot2 /boot/ally`).
//!
//! The syntax is space-separated `key=value` tokens. GRUB 2 may put the image path first
//! (a token starting with `/`); that one token is skipped. Every mistake is an error that
//! names the option and the reason, because Ally stops before any guest runs when the
//! operator's options are wrong.
//!
//! | option      | values                            | default |
//! |-------------|-----------------------------------|---------|
//! | `log`       | `error`, `warn`, `info`, `debug`, `trace` | `info` |
//! | `dpi_cores` | decimal N >= 1 (must also leave one core for the OS, see [`AllyOptions::validate_against_cores`]) | 1 |
//! | `dpi_mem`   | size: bytes or `K`/`M`/`G` suffix, a multiple of 4 KiB, > 0 | `64M` |
//! | `nic`       | PCI address `BB:DD.F` (hex; device < 32, function < 8) | first e1000 found |
//! | `mode`      | `copy`, `zero-copy`               | `copy`  |
//! | `heap`      | size as for `dpi_mem`             | sized for the rules: 16M, plus with rules 26M for stream tracking and IP reassembly and 128 bytes per rules-module byte |
//! | `irq_moderation` | TSC cycles between two guest NIC interrupts: decimal, optional `K`/`M` (x1000, x1000000) suffix; `0` disables | `100K` |

use core::fmt;
use log::LevelFilter;

/// 4 KiB: the granularity of every memory-size option (Ally reserves whole pages).
const SIZE_GRANULE: u64 = 4096;

/// One of Ally's options (used to name the option in errors).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OptionName {
    Log,
    DpiCores,
    DpiMem,
    Nic,
    Mode,
    Heap,
    IrqModeration,
    UninspectedNetwork,
    Iommu,
}

impl OptionName {
    const ALL: [OptionName; 9] = [
        OptionName::Log,
        OptionName::DpiCores,
        OptionName::DpiMem,
        OptionName::Nic,
        OptionName::Mode,
        OptionName::Heap,
        OptionName::IrqModeration,
        OptionName::UninspectedNetwork,
        OptionName::Iommu,
    ];

    /// The key as written on the command line.
    pub const fn key(self) -> &'static str {
        match self {
            OptionName::Log => "log",
            OptionName::DpiCores => "dpi_cores",
            OptionName::DpiMem => "dpi_mem",
            OptionName::Nic => "nic",
            OptionName::Mode => "mode",
            OptionName::Heap => "heap",
            OptionName::IrqModeration => "irq_moderation",
            OptionName::UninspectedNetwork => "uninspected_network",
            OptionName::Iommu => "iommu",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.key() == key)
    }

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for OptionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Why a value was rejected.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ValueProblem {
    /// `key=` with nothing after the `=`.
    Empty,
    /// Not a number where one was expected.
    NotANumber,
    /// The number (after applying the suffix) does not fit in 64 bits (32 for counts).
    Overflow,
    /// The value must be at least 1.
    Zero,
    /// Sizes must be whole 4 KiB pages.
    NotPageMultiple,
    /// A size suffix other than K, M or G.
    BadSuffix,
    /// Not one of the listed words.
    NotOneOf(&'static str),
    /// Not of the form `BB:DD.F` with hexadecimal fields.
    PciSyntax,
    /// PCI device number above 31.
    PciDevice,
    /// PCI function number above 7.
    PciFunction,
}

impl fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueProblem::Empty => f.write_str("the value is empty"),
            ValueProblem::NotANumber => f.write_str("not a decimal (or 0x-prefixed hex) number"),
            ValueProblem::Overflow => f.write_str("the number is too large"),
            ValueProblem::Zero => f.write_str("must be at least 1"),
            ValueProblem::NotPageMultiple => {
                write!(f, "must be a multiple of 4 KiB ({SIZE_GRANULE} bytes)")
            }
            ValueProblem::BadSuffix => f.write_str("unknown size suffix (use K, M or G)"),
            ValueProblem::NotOneOf(list) => write!(f, "must be one of: {list}"),
            ValueProblem::PciSyntax => {
                f.write_str("not a PCI address of the form BB:DD.F (hexadecimal, e.g. 00:03.0)")
            }
            ValueProblem::PciDevice => f.write_str("PCI device number must be below 0x20 (32)"),
            ValueProblem::PciFunction => f.write_str("PCI function number must be below 8"),
        }
    }
}

/// A command-line error. Borrows the offending text from the command line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CmdlineError<'a> {
    /// A key Ally does not know.
    UnknownOption { key: &'a str },
    /// A token without `=`.
    MissingEquals { token: &'a str },
    /// The same option given twice.
    Duplicate { option: OptionName },
    /// The value of an option is malformed or out of range.
    BadValue {
        option: OptionName,
        value: &'a str,
        problem: ValueProblem,
    },
    /// `dpi_cores` leaves no core for the OS (from [`AllyOptions::validate_against_cores`]).
    TooManyDpiCores { dpi_cores: u32, total_cores: u32 },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownOption { key } => {
                write!(f, "unknown option \"{key}\" (known: ")?;
                for (i, option) in OptionName::ALL.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{option}")?;
                }
                f.write_str(")")
            }
            CmdlineError::MissingEquals { token } => {
                write!(f, "option \"{token}\" has no value: expected key=value")
            }
            CmdlineError::Duplicate { option } => {
                write!(f, "option \"{option}\" is given more than once")
            }
            CmdlineError::BadValue {
                option,
                value,
                problem,
            } => write!(f, "option \"{option}\": bad value \"{value}\": {problem}"),
            CmdlineError::TooManyDpiCores {
                dpi_cores,
                total_cores,
            } => write!(
                f,
                "option \"dpi_cores\": {dpi_cores} DPI core(s) requested but the machine has \
                 {total_cores} core(s); at least one must be left for the OS (use at most {})",
                total_cores.saturating_sub(1)
            ),
        }
    }
}

/// Log verbosity (`log=`); maps onto [`log::LevelFilter`].
pub type LogLevel = LevelFilter;

/// How the DPI core moves packets (`mode=`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PacketMode {
    /// Frames are copied into DPI memory before inspection (closes the TOCTOU window).
    Copy,
    /// The DPI ring points at validated guest buffers; inspection happens in place.
    ZeroCopy,
}

/// A PCI function address (segment 0).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PciAddress {
    pub bus: u8,
    /// 0..=31.
    pub device: u8,
    /// 0..=7.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Ally's parsed options.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AllyOptions {
    pub log: LogLevel,
    /// Number of cores sequestered for the DPI partition (>= 1).
    pub dpi_cores: u32,
    /// Bytes of DPI memory (a multiple of 4 KiB, > 0).
    pub dpi_mem: u64,
    /// The NIC to inspect; `None` means the first supported NIC found.
    pub nic: Option<PciAddress>,
    pub mode: PacketMode,
    /// Bytes of Ally's own heap (a multiple of 4 KiB, > 0); `None`: sized for the rules
    /// module at boot (`ally_dpi::rules_module::heap_needed`).
    pub heap: Option<u64>,
    /// Fewest TSC cycles between two NIC interrupts Ally raises for the guest (0: none). In
    /// cycles, not time, because what moderation amortises — the guest's interrupt handler
    /// and the register exits it makes — costs cycles: 100K is 33 µs at 3 GHz (at most
    /// 30,000 interrupts/s, the e1000 driver's own low-latency rate is 20,000) and 2 ms on
    /// Bochs' 50 MHz.
    pub irq_moderation: u64,
    /// Whether the guest may boot with a network Ally does not inspect: rules given and no
    /// NIC to apply them to, or a network controller Ally does not drive (default: refuse).
    pub allow_uninspected_network: bool,
    /// `iommu=off`: run without DMA protection on a machine without a usable IOMMU (default
    /// `on`: refuse to start without one).
    pub iommu_off: bool,
}

impl Default for AllyOptions {
    fn default() -> Self {
        Self {
            log: LevelFilter::Info,
            dpi_cores: 1,
            dpi_mem: 64 << 20,
            nic: None,
            mode: PacketMode::Copy,
            heap: None,
            irq_moderation: 100_000,
            allow_uninspected_network: false,
            iommu_off: false,
        }
    }
}

impl AllyOptions {
    /// Parses a command line. Defaults apply to options not given.
    pub fn parse(cmdline: &str) -> Result<AllyOptions, CmdlineError<'_>> {
        let mut opts = AllyOptions::default();
        let mut seen = 0u16;
        let mut tokens = cmdline.split_ascii_whitespace().peekable();
        // GRUB 2's multiboot2 loader passes "<image path> <args>" on some versions.
        if tokens.peek().is_some_and(|t| t.starts_with('/')) {
            tokens.next();
        }
        for token in tokens {
            let Some((key, value)) = token.split_once('=') else {
                return Err(CmdlineError::MissingEquals { token });
            };
            let option = OptionName::from_key(key).ok_or(CmdlineError::UnknownOption { key })?;
            if seen & option.bit() != 0 {
                return Err(CmdlineError::Duplicate { option });
            }
            seen |= option.bit();
            let bad = |problem| CmdlineError::BadValue {
                option,
                value,
                problem,
            };
            if value.is_empty() {
                return Err(bad(ValueProblem::Empty));
            }
            match option {
                OptionName::Log => opts.log = parse_level(value).ok_or(bad(LEVELS))?,
                OptionName::DpiCores => {
                    let n = parse_number(value).map_err(bad)?;
                    let n = u32::try_from(n).map_err(|_| bad(ValueProblem::Overflow))?;
                    if n == 0 {
                        return Err(bad(ValueProblem::Zero));
                    }
                    opts.dpi_cores = n;
                }
                OptionName::DpiMem => opts.dpi_mem = parse_size(value).map_err(bad)?,
                OptionName::Heap => opts.heap = Some(parse_size(value).map_err(bad)?),
                OptionName::IrqModeration => {
                    opts.irq_moderation = parse_decimal_count(value).map_err(bad)?
                }
                OptionName::Nic => opts.nic = Some(parse_pci(value).map_err(bad)?),
                OptionName::UninspectedNetwork => {
                    opts.allow_uninspected_network = match value {
                        "refuse" => false,
                        "allow" => true,
                        _ => return Err(bad(ValueProblem::NotOneOf("refuse, allow"))),
                    }
                }
                OptionName::Iommu => {
                    opts.iommu_off = match value {
                        "on" => false,
                        "off" => true,
                        _ => return Err(bad(ValueProblem::NotOneOf("on, off"))),
                    }
                }
                OptionName::Mode => {
                    opts.mode = match value {
                        "copy" => PacketMode::Copy,
                        "zero-copy" => PacketMode::ZeroCopy,
                        _ => return Err(bad(ValueProblem::NotOneOf("copy, zero-copy"))),
                    }
                }
            }
        }
        Ok(opts)
    }

    /// Checks `dpi_cores` against the number of cores found at run time: at least one core
    /// must remain for the OS.
    pub fn validate_against_cores(&self, total_cores: u32) -> Result<(), CmdlineError<'static>> {
        if self.dpi_cores >= total_cores {
            return Err(CmdlineError::TooManyDpiCores {
                dpi_cores: self.dpi_cores,
                total_cores,
            });
        }
        Ok(())
    }
}

const LEVELS: ValueProblem = ValueProblem::NotOneOf("error, warn, info, debug, trace");

fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Decimal, or hexadecimal with a `0x` prefix.
fn parse_number(s: &str) -> Result<u64, ValueProblem> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return Err(ValueProblem::NotANumber);
    }
    let mut v: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix).ok_or(ValueProblem::NotANumber)?;
        v = v
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or(ValueProblem::Overflow)?;
    }
    Ok(v)
}

/// A count with an optional decimal `K` (x1000) or `M` (x1000000) suffix, either case.
fn parse_decimal_count(s: &str) -> Result<u64, ValueProblem> {
    let (num, factor) = match s.as_bytes()[s.len() - 1] {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'm' | b'M' => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    parse_number(num)?
        .checked_mul(factor)
        .ok_or(ValueProblem::Overflow)
}

/// A byte count with an optional binary `K`/`M`/`G` suffix (either case); > 0 and 4 KiB-aligned.
fn parse_size(s: &str) -> Result<u64, ValueProblem> {
    let last = s.as_bytes()[s.len() - 1];
    let (num, shift) = match last {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = parse_number(num).map_err(|e| {
        // "4T": a number followed by a letter that is not a known suffix.
        // (`last` is ASCII here, so slicing it off stays on a char boundary; "0x" is a
        // truncated hex number, not a suffix.)
        if shift == 0
            && last.is_ascii_alphabetic()
            && !matches!(last, b'x' | b'X')
            && parse_number(&s[..s.len() - 1]).is_ok()
        {
            ValueProblem::BadSuffix
        } else {
            e
        }
    })?;
    let bytes = n.checked_mul(1 << shift).ok_or(ValueProblem::Overflow)?;
    if bytes == 0 {
        return Err(ValueProblem::Zero);
    }
    if bytes % SIZE_GRANULE != 0 {
        return Err(ValueProblem::NotPageMultiple);
    }
    Ok(bytes)
}

fn parse_hex_field(s: &str, max_digits: usize) -> Result<u8, ValueProblem> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ValueProblem::PciSyntax);
    }
    u8::from_str_radix(s, 16).map_err(|_| ValueProblem::PciSyntax)
}

fn parse_pci(s: &str) -> Result<PciAddress, ValueProblem> {
    let (bus, rest) = s.split_once(':').ok_or(ValueProblem::PciSyntax)?;
    let (device, function) = rest.split_once('.').ok_or(ValueProblem::PciSyntax)?;
    let bus = parse_hex_field(bus, 2)?;
    let device = parse_hex_field(device, 2)?;
    let function = parse_hex_field(function, 1)?;
    // PCI Local Bus Spec 3.0, 3.2.2.3.2: 5 device bits, 3 function bits.
    if device >= 32 {
        return Err(ValueProblem::PciDevice);
    }
    if function >= 8 {
        return Err(ValueProblem::PciFunction);
    }
    Ok(PciAddress {
        bus,
        device,
        function,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> CmdlineError<'_> {
        AllyOptions::parse(s).unwrap_err()
    }

    fn bad(option: OptionName, value: &str, problem: ValueProblem) -> CmdlineError<'_> {
        CmdlineError::BadValue {
            option,
            value,
            problem,
        }
    }

    #[test]
    fn empty_gives_defaults() {
        let o = AllyOptions::parse("").unwrap();
        assert_eq!(o, AllyOptions::default());
        assert_eq!(o.log, LevelFilter::Info);
        assert_eq!(o.dpi_cores, 1);
        assert_eq!(o.dpi_mem, 64 * 1024 * 1024);
        assert_eq!(o.heap, None);
        assert_eq!(o.mode, PacketMode::Copy);
        assert_eq!(o.nic, None);
        assert_eq!(AllyOptions::parse("  \t ").unwrap(), AllyOptions::default());
    }

    #[test]
    fn all_options() {
        let o = AllyOptions::parse(
            "/boot/ally log=trace dpi_cores=3  dpi_mem=128M nic=0a:1f.7 mode=zero-copy heap=4096",
        )
        .unwrap();
        assert_eq!(o.log, LevelFilter::Trace);
        assert_eq!(o.dpi_cores, 3);
        assert_eq!(o.dpi_mem, 128 << 20);
        assert_eq!(
            o.nic,
            Some(PciAddress {
                bus: 0x0a,
                device: 0x1f,
                function: 7
            })
        );
        assert_eq!(o.nic.unwrap().to_string(), "0a:1f.7");
        assert_eq!(o.mode, PacketMode::ZeroCopy);
        assert_eq!(o.heap, Some(4096));
    }

    #[test]
    fn log_levels() {
        for (s, l) in [
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
        ] {
            assert_eq!(AllyOptions::parse(&format!("log={s}")).unwrap().log, l);
        }
        assert_eq!(err("log=verbose"), bad(OptionName::Log, "verbose", LEVELS));
        assert_eq!(err("log=INFO"), bad(OptionName::Log, "INFO", LEVELS));
    }

    #[test]
    fn image_path_only_skipped_first() {
        assert_eq!(
            AllyOptions::parse("/boot/ally").unwrap(),
            AllyOptions::default()
        );
        assert_eq!(
            err("log=info /boot/ally"),
            CmdlineError::MissingEquals {
                token: "/boot/ally"
            }
        );
    }

    #[test]
    fn sizes() {
        let mem = |s: &str| AllyOptions::parse(s).ok().map(|o| o.dpi_mem);
        assert_eq!(mem("dpi_mem=8192"), Some(8192));
        assert_eq!(mem("dpi_mem=4K"), Some(4096));
        assert_eq!(mem("dpi_mem=4k"), Some(4096));
        assert_eq!(mem("dpi_mem=1G"), Some(1 << 30));
        assert_eq!(mem("dpi_mem=2m"), Some(2 << 20));
        assert_eq!(mem("dpi_mem=0x200000"), Some(0x20_0000));
        assert_eq!(mem("dpi_mem=0x1000K"), Some(0x1000 << 10));
        let e = |v, p| bad(OptionName::DpiMem, v, p);
        assert_eq!(err("dpi_mem=0"), e("0", ValueProblem::Zero));
        assert_eq!(err("dpi_mem=0M"), e("0M", ValueProblem::Zero));
        assert_eq!(err("dpi_mem=6K"), e("6K", ValueProblem::NotPageMultiple));
        assert_eq!(
            err("dpi_mem=1000"),
            e("1000", ValueProblem::NotPageMultiple)
        );
        assert_eq!(err("dpi_mem=4T"), e("4T", ValueProblem::BadSuffix));
        assert_eq!(err("dpi_mem=M"), e("M", ValueProblem::NotANumber));
        assert_eq!(err("dpi_mem=1.5G"), e("1.5G", ValueProblem::NotANumber));
        assert_eq!(err("dpi_mem=-4K"), e("-4K", ValueProblem::NotANumber));
        assert_eq!(err("dpi_mem=0x"), e("0x", ValueProblem::NotANumber));
        assert_eq!(
            err("dpi_mem=17179869184G"),
            e("17179869184G", ValueProblem::Overflow)
        );
        assert_eq!(
            err("dpi_mem=99999999999999999999"),
            e("99999999999999999999", ValueProblem::Overflow)
        );
        assert_eq!(err("dpi_mem="), e("", ValueProblem::Empty));
        assert_eq!(
            err("heap=3"),
            bad(OptionName::Heap, "3", ValueProblem::NotPageMultiple)
        );
        assert_eq!(AllyOptions::parse("heap=32M").unwrap().heap, Some(32 << 20));
        let moderation = |v: &str| {
            AllyOptions::parse(v)
                .map(|o| o.irq_moderation)
                .map_err(|e| e.to_string())
        };
        assert_eq!(moderation(""), Ok(100_000));
        assert_eq!(moderation("irq_moderation=0"), Ok(0));
        assert_eq!(moderation("irq_moderation=250k"), Ok(250_000));
        assert_eq!(moderation("irq_moderation=2M"), Ok(2_000_000));
        assert_eq!(moderation("irq_moderation=0x100"), Ok(256));
        assert_eq!(
            err("irq_moderation=fast"),
            bad(OptionName::IrqModeration, "fast", ValueProblem::NotANumber)
        );
        assert_eq!(
            err("irq_moderation=99999999999999999999k"),
            bad(
                OptionName::IrqModeration,
                "99999999999999999999k",
                ValueProblem::Overflow
            )
        );
    }

    #[test]
    fn dpi_cores() {
        assert_eq!(AllyOptions::parse("dpi_cores=2").unwrap().dpi_cores, 2);
        let e = |v, p| bad(OptionName::DpiCores, v, p);
        assert_eq!(err("dpi_cores=0"), e("0", ValueProblem::Zero));
        assert_eq!(err("dpi_cores=two"), e("two", ValueProblem::NotANumber));
        assert_eq!(
            err("dpi_cores=4294967296"),
            e("4294967296", ValueProblem::Overflow)
        );
        assert_eq!(err("dpi_cores=1K"), e("1K", ValueProblem::NotANumber));
    }

    #[test]
    fn validate_cores() {
        let o = AllyOptions::parse("dpi_cores=2").unwrap();
        assert_eq!(o.validate_against_cores(3), Ok(()));
        let e = o.validate_against_cores(2).unwrap_err();
        assert_eq!(
            e,
            CmdlineError::TooManyDpiCores {
                dpi_cores: 2,
                total_cores: 2
            }
        );
        assert_eq!(
            e.to_string(),
            "option \"dpi_cores\": 2 DPI core(s) requested but the machine has 2 core(s); \
             at least one must be left for the OS (use at most 1)"
        );
        assert!(AllyOptions::default().validate_against_cores(1).is_err());
        assert!(AllyOptions::default().validate_against_cores(0).is_err());
    }

    #[test]
    fn pci_addresses() {
        let nic = |s: &str| AllyOptions::parse(s).ok().map(|o| o.nic.unwrap());
        assert_eq!(
            nic("nic=00:03.0"),
            Some(PciAddress {
                bus: 0,
                device: 3,
                function: 0
            })
        );
        assert_eq!(
            nic("nic=FF:1F.7"),
            Some(PciAddress {
                bus: 0xff,
                device: 0x1f,
                function: 7
            })
        );
        assert_eq!(nic("nic=1:2.3").unwrap().to_string(), "01:02.3");
        let e = |v, p| bad(OptionName::Nic, v, p);
        assert_eq!(err("nic=00:20.0"), e("00:20.0", ValueProblem::PciDevice));
        assert_eq!(err("nic=00:03.8"), e("00:03.8", ValueProblem::PciFunction));
        assert_eq!(err("nic=00:03"), e("00:03", ValueProblem::PciSyntax));
        assert_eq!(err("nic=100:03.0"), e("100:03.0", ValueProblem::PciSyntax));
        assert_eq!(err("nic=0g:03.0"), e("0g:03.0", ValueProblem::PciSyntax));
        assert_eq!(err("nic=00:03.00"), e("00:03.00", ValueProblem::PciSyntax));
        assert_eq!(err("nic=:03.0"), e(":03.0", ValueProblem::PciSyntax));
        assert_eq!(err("nic=+0:03.0"), e("+0:03.0", ValueProblem::PciSyntax));
    }

    #[test]
    fn modes() {
        assert_eq!(
            AllyOptions::parse("mode=copy").unwrap().mode,
            PacketMode::Copy
        );
        assert_eq!(
            err("mode=fast"),
            bad(
                OptionName::Mode,
                "fast",
                ValueProblem::NotOneOf("copy, zero-copy")
            )
        );
    }

    #[test]
    fn iommu_off_is_explicit() {
        assert!(!AllyOptions::default().iommu_off);
        assert!(AllyOptions::parse("iommu=off").unwrap().iommu_off);
        assert!(!AllyOptions::parse("iommu=on").unwrap().iommu_off);
        assert_eq!(
            err("iommu=no"),
            bad(OptionName::Iommu, "no", ValueProblem::NotOneOf("on, off"))
        );
        assert_eq!(
            err("iommu=off iommu=on"),
            CmdlineError::Duplicate {
                option: OptionName::Iommu
            }
        );
    }

    #[test]
    fn uninspected_network() {
        assert!(!AllyOptions::default().allow_uninspected_network);
        assert!(
            AllyOptions::parse("uninspected_network=allow")
                .unwrap()
                .allow_uninspected_network
        );
        assert_eq!(
            err("uninspected_network=yes"),
            bad(
                OptionName::UninspectedNetwork,
                "yes",
                ValueProblem::NotOneOf("refuse, allow")
            )
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            err("log=info colour=red"),
            CmdlineError::UnknownOption { key: "colour" }
        );
        assert_eq!(err("=5"), CmdlineError::UnknownOption { key: "" });
        assert_eq!(err("quiet"), CmdlineError::MissingEquals { token: "quiet" });
        assert_eq!(
            err("log=info dpi_cores=1 log=debug"),
            CmdlineError::Duplicate {
                option: OptionName::Log
            }
        );
        // Only the first '=' separates key and value.
        assert_eq!(
            err("mode=copy=1"),
            bad(
                OptionName::Mode,
                "copy=1",
                ValueProblem::NotOneOf("copy, zero-copy")
            )
        );
    }

    #[test]
    fn messages_name_option_and_reason() {
        assert_eq!(
            err("dpi_mem=5000").to_string(),
            "option \"dpi_mem\": bad value \"5000\": must be a multiple of 4 KiB (4096 bytes)"
        );
        assert_eq!(
            err("bogus=1").to_string(),
            "unknown option \"bogus\" (known: log, dpi_cores, dpi_mem, nic, mode, heap, irq_moderation, uninspected_network, iommu)"
        );
        assert_eq!(
            err("quiet").to_string(),
            "option \"quiet\" has no value: expected key=value"
        );
        assert_eq!(
            err("heap=1M heap=2M").to_string(),
            "option \"heap\" is given more than once"
        );
        assert_eq!(
            err("nic=00:40.0").to_string(),
            "option \"nic\": bad value \"00:40.0\": PCI device number must be below 0x20 (32)"
        );
    }

    #[test]
    fn non_ascii_input_does_not_panic() {
        assert!(AllyOptions::parse("dpi_mem=4é").is_err());
        assert!(AllyOptions::parse("dpi_mem=é").is_err());
        assert!(AllyOptions::parse("nic=é:é.é").is_err());
        assert!(AllyOptions::parse("é=1").is_err());
    }

    /// Random command lines built from option fragments never panic, and every error
    /// message names something.
    #[test]
    fn random_command_lines() {
        let pieces = [
            "log=",
            "dpi_cores=",
            "dpi_mem=",
            "nic=",
            "mode=",
            "heap=",
            "=",
            " ",
            "/",
            "0x",
            "1",
            "4",
            "9",
            "K",
            "M",
            "G",
            "T",
            "é",
            ":",
            ".",
            "f",
            "copy",
            "zero-copy",
            "debug",
            "99999999999",
            "\t",
        ];
        let mut seed = 0xA5A5_5A5A_1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut line = std::string::String::new();
            for _ in 0..next() % 12 {
                line.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            match AllyOptions::parse(&line) {
                Ok(o) => {
                    assert!(o.dpi_cores >= 1);
                    assert!(o.dpi_mem > 0 && o.dpi_mem % 4096 == 0);
                    assert!(o.heap.is_none_or(|h| h > 0 && h % 4096 == 0));
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}
