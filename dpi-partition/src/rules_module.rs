//! The rules module GRUB hands Ally (`module2 /boot/rules.blob rules`): which boot module it
//! is, how much heap it needs, and the engine built from it.
//!
//! Hardware independent: the boot crate passes each module's command line and byte range, then
//! the chosen module's bytes, so every decision here is tested on the host.
//!
//! Policy (each violation stops Ally before any guest runs, with an error naming the module):
//! - A boot module is the rules module when its command line is the single word `rules`. A
//!   leading path token (`/boot/rules.blob`, which some GRUB versions pass) is skipped.
//! - Ally takes no other module: a module with another command line, or none, is refused. A
//!   misspelt `rules` must not silently leave every frame uninspected.
//! - At most one rules module. Without one, every frame passes ([`Engine::pass_all`]).
//! - Modules are numbered from 1 in the boot loader's order (the `module2` lines of grub.cfg).
//!
//! Heap: the compiled engine lives on Ally's heap. [`heap_needed`] is [`BASE_HEAP`] (Ally's
//! own allocations, the flow table), plus with rules the bound of the stream tracker, the HTTP
//! state of its flows and the IP reassembler ([`traffic_heap`]) and [`HEAP_PER_BLOB_BYTE`] per module byte, measured with
//! `ally-tools rules compile` on subsets of the Snort 3 community ruleset: the load peak was
//! 18–92 bytes per blob byte above the flow table (pcre-heavy rules the most; the whole
//! ruleset, 597 KB, peaked at 29.7 MiB). The default heap is that figure; a smaller `heap=` is
//! refused with [`ModuleError::HeapTooSmall`] rather than running out of heap mid-load.

use core::fmt;

use crate::engine::{
    engine_stream_config, DefragConfig, Engine, EngineConfig, EngineError, FlowConfig, StreamConfig,
};

/// The command line that marks the rules module.
pub const RULES_MODULE: &str = "rules";

/// Heap Ally needs without rules: per-CPU stacks and tables, the instruction decoder's tables
/// and the engine's fixed part (its 64 Ki-slot flow table is about 5 MiB). The old default.
pub const BASE_HEAP: u64 = 16 << 20;

/// Heap per byte of the rules module (see the module documentation for the measurements).
pub const HEAP_PER_BLOB_BYTE: u64 = 128;

/// Heap sizes are rounded up to whole MiB.
const HEAP_ROUND: u64 = 1 << 20;

/// One boot module as the boot loader described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootModule<'a> {
    /// The module's command line (what follows the file name on the `module2` line).
    pub cmdline: &'a str,
    /// First byte (physical address).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The rules module, as chosen by [`find_rules_module`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulesModule {
    /// Position among the boot modules, from 1.
    pub number: usize,
    /// First byte (physical address).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl RulesModule {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the module holds no bytes (the blob check then reports it truncated).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Longest module command line an error quotes.
const TEXT_MAX: usize = 48;

/// A module's command line, copied (up to [`TEXT_MAX`] bytes) for an error message, because
/// the boot information it comes from lies in guest RAM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ModuleText {
    buf: [u8; TEXT_MAX],
    len: usize,
    truncated: bool,
}

impl ModuleText {
    fn new(s: &str) -> ModuleText {
        let mut len = s.len().min(TEXT_MAX);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut buf = [0; TEXT_MAX];
        buf[..len].copy_from_slice(&s.as_bytes()[..len]);
        ModuleText {
            buf,
            len,
            truncated: len < s.len(),
        }
    }

    /// The text kept (a prefix of the command line when it was longer than 48 bytes).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Display for ModuleText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\"{}{}\"",
            self.as_str().escape_debug(),
            if self.truncated { "..." } else { "" }
        )
    }
}

impl fmt::Debug for ModuleText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why Ally refused its boot modules or the rules in them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleError {
    /// A module with an empty command line.
    Unnamed { number: usize },
    /// A module whose command line is not `rules`.
    Unknown { number: usize, cmdline: ModuleText },
    /// Two rules modules.
    SecondRules { first: usize, second: usize },
    /// The boot loader described a module ending before it starts, or at address 0.
    BadRange { number: usize, start: u64, end: u64 },
    /// `heap=` is smaller than the rules need.
    HeapTooSmall {
        heap: u64,
        needed: u64,
        module_bytes: u64,
    },
    /// The blob was refused, or the engine could not be built from it.
    Refused {
        number: usize,
        module_bytes: u64,
        error: EngineError,
    },
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::Unnamed { number } => write!(
                f,
                "boot module {number} has no command line; Ally takes only the rules module \
                 (`module2 FILE {RULES_MODULE}`)"
            ),
            ModuleError::Unknown { number, cmdline } => write!(
                f,
                "boot module {number} has the command line {cmdline}; Ally takes only the \
                 rules module (`module2 FILE {RULES_MODULE}`)"
            ),
            ModuleError::SecondRules { first, second } => write!(
                f,
                "boot modules {first} and {second} are both `{RULES_MODULE}`; give one rules \
                 file (compile several into one with ally-tools rules compile)"
            ),
            ModuleError::BadRange { number, start, end } => write!(
                f,
                "boot module {number}: the boot loader gave the invalid range \
                 {start:#x}..{end:#x}"
            ),
            ModuleError::HeapTooSmall {
                heap,
                needed,
                module_bytes: 0,
            } => write!(
                f,
                "option \"heap\": {} is below Ally's minimum heap of {} (without rules); give \
                 heap={}M or more, or leave heap= out",
                Size(*heap),
                Size(*needed),
                needed.div_ceil(1 << 20)
            ),
            ModuleError::HeapTooSmall {
                heap,
                needed,
                module_bytes,
            } => write!(
                f,
                "option \"heap\": {} is too small for the rules module of {module_bytes} bytes, \
                 which needs {} ({} MiB, {} for stream tracking, HTTP state and IP reassembly and \
                 {HEAP_PER_BLOB_BYTE} bytes per module byte); \
                 give heap={}M or more, or leave heap= out to size it automatically",
                Size(*heap),
                Size(*needed),
                BASE_HEAP >> 20,
                Size(traffic_heap()),
                needed.div_ceil(1 << 20)
            ),
            ModuleError::Refused {
                number,
                module_bytes,
                error,
            } => write!(
                f,
                "rules module (boot module {number}, {module_bytes} bytes) refused: {error}"
            ),
        }
    }
}

/// A byte count in the largest binary unit that divides it.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 30) {
            write!(f, "{}G", n >> 30)
        } else if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}M", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}K", n >> 10)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

/// Whether a module's command line names the rules module.
fn is_rules(cmdline: &str) -> Result<bool, ()> {
    let mut words = cmdline.split_ascii_whitespace().peekable();
    if words.peek().is_some_and(|w| w.starts_with('/')) {
        words.next();
    }
    match (words.next(), words.next()) {
        (None, _) => Err(()),
        (Some(RULES_MODULE), None) => Ok(true),
        _ => Ok(false),
    }
}

/// Picks the rules module among the boot modules (in the boot loader's order) and refuses any
/// other module (see the module documentation).
pub fn find_rules_module<'a>(
    modules: impl IntoIterator<Item = BootModule<'a>>,
) -> Result<Option<RulesModule>, ModuleError> {
    let mut found: Option<RulesModule> = None;
    for (i, m) in modules.into_iter().enumerate() {
        let number = i + 1;
        match is_rules(m.cmdline) {
            Err(()) => return Err(ModuleError::Unnamed { number }),
            Ok(false) => {
                return Err(ModuleError::Unknown {
                    number,
                    cmdline: ModuleText::new(m.cmdline.trim()),
                })
            }
            Ok(true) => {}
        }
        if let Some(first) = found {
            return Err(ModuleError::SecondRules {
                first: first.number,
                second: number,
            });
        }
        if m.end < m.start || m.start == 0 {
            return Err(ModuleError::BadRange {
                number,
                start: m.start,
                end: m.end,
            });
        }
        found = Some(RulesModule {
            number,
            start: m.start,
            end: m.end,
        });
    }
    Ok(found)
}

/// Keys of the engine's keyed tables: give them boot-time randomness.
#[derive(Clone, Copy, Debug)]
pub struct TableKeys {
    /// The stream tracker's flow table.
    pub stream: [u64; 2],
    /// The IP reassembly table.
    pub defrag: [u64; 2],
    /// The flow table of the `flow` and `flowbits` options.
    pub flows: [u64; 2],
}

/// The engine configuration [`build_engine`] uses.
pub fn engine_config(keys: TableKeys) -> EngineConfig {
    EngineConfig {
        // Out-of-order segments held until their gap fills (the queue engine forwards them
        // through `PacketHook::take_forward`), not dropped for the sender to resend.
        stream: Some(StreamConfig {
            key: keys.stream,
            hold_out_of_order: true,
            ..engine_stream_config()
        }),
        defrag: Some(DefragConfig::forwarding(keys.defrag)),
        flow: FlowConfig {
            key: keys.flows,
            ..FlowConfig::default()
        },
        ..EngineConfig::default()
    }
}

/// The worst case of the engine's traffic state, the stream tracker
/// ([`StreamConfig::heap_bound`]), the HTTP state of its flows
/// ([`HttpStateConfig::heap_bound`](crate::engine::HttpStateConfig::heap_bound)) and IP
/// reassembly ([`DefragConfig::heap_bound`]): reserved with any rules module, since it grows
/// with the traffic, not with the rules. Whole MiB.
pub fn traffic_heap() -> u64 {
    let cfg = engine_config(TableKeys {
        stream: [0; 2],
        defrag: [0; 2],
        flows: [0; 2],
    });
    let stream = cfg.stream.map_or(0, |s| s.heap_bound());
    let http = cfg.stream.map_or(0, |s| cfg.http.heap_bound(s.max_flows));
    let defrag = cfg.defrag.map_or(0, |d| d.heap_bound());
    ((stream + http + defrag) as u64).div_ceil(HEAP_ROUND) * HEAP_ROUND
}

/// Heap Ally needs with a rules module of `module_bytes` bytes (0: none, and so no traffic
/// state), in whole MiB.
pub fn heap_needed(module_bytes: u64) -> u64 {
    let traffic = if module_bytes == 0 { 0 } else { traffic_heap() };
    BASE_HEAP
        .saturating_add(traffic)
        .saturating_add(module_bytes.saturating_mul(HEAP_PER_BLOB_BYTE))
        .div_ceil(HEAP_ROUND)
        .saturating_mul(HEAP_ROUND)
}

/// Ally's heap size: `heap=` when given and large enough, else [`heap_needed`].
pub fn choose_heap(option: Option<u64>, rules: Option<&RulesModule>) -> Result<u64, ModuleError> {
    let module_bytes = rules.map_or(0, RulesModule::len);
    let needed = heap_needed(module_bytes);
    match option {
        None => Ok(needed),
        Some(heap) if heap >= needed => Ok(heap),
        Some(heap) => Err(ModuleError::HeapTooSmall {
            heap,
            needed,
            module_bytes,
        }),
    }
}

/// Verifies the rules module's bytes (magic, version, checksum, every record) and builds the
/// engine; without a module, the engine that passes every frame.
///
/// Everything the engine keeps is allocated on the heap: `bytes` is not referenced afterwards,
/// so the module's memory may be handed to the guest.
///
/// `keys` key the stream tracker's and the reassembler's tables.
pub fn build_engine(
    rules: Option<(&RulesModule, &[u8])>,
    keys: TableKeys,
) -> Result<Engine, ModuleError> {
    let cfg = engine_config(keys);
    match rules {
        None => Ok(Engine::pass_all()),
        Some((module, bytes)) => {
            Engine::from_blob(bytes, cfg).map_err(|error| ModuleError::Refused {
                number: module.number,
                module_bytes: bytes.len() as u64,
                error,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::blob;
    use crate::engine::rules::parse_rules;
    use crate::engine::vars::Vars;
    use crate::engine::BlobError;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    const KEYS: TableKeys = TableKeys {
        stream: [1, 2],
        defrag: [3, 4],
        flows: [5, 6],
    };

    fn m(cmdline: &str, start: u64, end: u64) -> BootModule<'_> {
        BootModule {
            cmdline,
            start,
            end,
        }
    }

    const TWO_RULES: &str = "\
drop tcp any any -> any any (msg:\"EICAR\"; content:\"X5O!P%@AP[4|5C|PZX54(P^)7CC)7}$EICAR\"; sid:1;)
alert icmp any any -> any any (msg:\"ping\"; itype:8; sid:2;)
";

    fn two_rules_blob() -> Vec<u8> {
        let p = parse_rules(TWO_RULES, &Vars::new());
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        blob::encode(&p.rules)
    }

    #[test]
    fn no_modules_means_no_rules() {
        assert_eq!(find_rules_module([]), Ok(None));
    }

    #[test]
    fn the_rules_module_is_found_by_its_command_line() {
        let found = find_rules_module([m("rules", 0x10_0000, 0x10_0100)]).unwrap();
        assert_eq!(
            found,
            Some(RulesModule {
                number: 1,
                start: 0x10_0000,
                end: 0x10_0100
            })
        );
        assert_eq!(found.unwrap().len(), 0x100);
        // A leading path (some GRUB versions pass it) and spacing do not matter.
        let found = find_rules_module([m(" /boot/rules.blob  rules ", 0x2000, 0x3000)]).unwrap();
        assert_eq!(found.map(|r| r.number), Some(1));
    }

    #[test]
    fn other_modules_are_refused_by_number_and_name() {
        let e = find_rules_module([m("rules", 1, 10), m("rule", 10, 20)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "boot module 2 has the command line \"rule\"; Ally takes only the rules module \
             (`module2 FILE rules`)"
        );
        let e = find_rules_module([m("", 0, 10)]).unwrap_err();
        assert_eq!(e, ModuleError::Unnamed { number: 1 });
        assert!(e
            .to_string()
            .starts_with("boot module 1 has no command line"));
        // A path alone is no name either.
        let e = find_rules_module([m("/boot/rules.blob", 0, 10)]).unwrap_err();
        assert_eq!(e, ModuleError::Unnamed { number: 1 });
        // Extra words are not `rules`.
        let e = find_rules_module([m("rules extra", 0, 10)]).unwrap_err();
        assert!(e.to_string().contains("\"rules extra\""), "{e}");
    }

    #[test]
    fn long_or_odd_command_lines_are_quoted_safely() {
        let long = "x".repeat(100);
        let e = find_rules_module([m(&long, 0, 1)]).unwrap_err().to_string();
        assert!(e.contains(&format!("\"{}...\"", "x".repeat(48))), "{e}");
        // A multi-byte character straddling the cut is dropped whole.
        let odd = format!("{}é\"", "y".repeat(47));
        let e = find_rules_module([m(&odd, 0, 1)]).unwrap_err().to_string();
        assert!(e.contains(&format!("\"{}...\"", "y".repeat(47))), "{e}");
        let e = find_rules_module([m("a\"b", 0, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains(r#""a\"b""#), "{e}");
    }

    #[test]
    fn two_rules_modules_are_refused() {
        let e = find_rules_module([m("rules", 1, 10), m("rules", 10, 20)]).unwrap_err();
        assert_eq!(
            e,
            ModuleError::SecondRules {
                first: 1,
                second: 2
            }
        );
    }

    #[test]
    fn a_reversed_range_is_refused() {
        let e = find_rules_module([m("rules", 0x2000, 0x1000)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "boot module 1: the boot loader gave the invalid range 0x2000..0x1000"
        );
        let e = find_rules_module([m("rules", 0, 0x1000)]).unwrap_err();
        assert!(matches!(e, ModuleError::BadRange { start: 0, .. }));
    }

    #[test]
    fn heap_grows_with_the_module() {
        assert_eq!(heap_needed(0), 16 << 20);
        // Any rules bring the traffic state: the stream tracker's 21.75 MiB, the HTTP state of
        // its flows 9.8 MiB and the reassembler's 3.6 MiB.
        assert_eq!(traffic_heap(), 36 << 20);
        assert_eq!(heap_needed(1), 53 << 20);
        // The community ruleset's blob (597,016 bytes, 29.7 MiB load peak) gets 125 MiB.
        assert_eq!(heap_needed(597_016), 125 << 20);
        assert_eq!(heap_needed(u64::MAX), u64::MAX);
        assert_eq!(choose_heap(None, None), Ok(16 << 20));
        let r = RulesModule {
            number: 1,
            start: 0x100_0000,
            end: 0x100_0000 + 597_016,
        };
        assert_eq!(choose_heap(None, Some(&r)), Ok(125 << 20));
        assert_eq!(choose_heap(Some(128 << 20), Some(&r)), Ok(128 << 20));
        assert_eq!(choose_heap(Some(125 << 20), Some(&r)), Ok(125 << 20));
    }

    #[test]
    fn a_heap_option_too_small_for_the_rules_is_refused() {
        let r = RulesModule {
            number: 1,
            start: 0,
            end: 597_016,
        };
        let e = choose_heap(Some(32 << 20), Some(&r)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "option \"heap\": 32M is too small for the rules module of 597016 bytes, which \
             needs 125M (16 MiB, 36M for stream tracking, HTTP state and IP reassembly and 128 \
             bytes per module byte); give heap=125M or more, or \
             leave heap= out to size it automatically"
        );
        // Without rules the floor is the base.
        let e = choose_heap(Some(8 << 20), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "option \"heap\": 8M is below Ally's minimum heap of 16M (without rules); give \
             heap=16M or more, or leave heap= out"
        );
        let e = choose_heap(Some(3000 * 4096), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("option \"heap\": 12000K is below"),
            "{e}"
        );
        assert_eq!(choose_heap(Some(16 << 20), None), Ok(16 << 20));
    }

    #[test]
    fn a_good_blob_builds_the_engine() {
        let b = two_rules_blob();
        let r = RulesModule {
            number: 1,
            start: 0,
            end: b.len() as u64,
        };
        let engine = build_engine(Some((&r, &b)), KEYS).unwrap();
        let s = engine.summary();
        assert_eq!((s.rules, s.drop, s.alert), (2, 1, 1));
        assert_eq!(build_engine(None, KEYS).unwrap().rule_count(), 0);
    }

    fn refused(bytes: &[u8]) -> (EngineError, alloc::string::String) {
        let r = RulesModule {
            number: 2,
            start: 0,
            end: bytes.len() as u64,
        };
        match build_engine(Some((&r, bytes)), KEYS) {
            Ok(_) => panic!("a bad blob was accepted"),
            Err(e @ ModuleError::Refused { .. }) => {
                let text = e.to_string();
                let ModuleError::Refused { error, .. } = e else {
                    unreachable!()
                };
                (error, text)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn bad_blobs_are_refused_naming_the_module_and_the_problem() {
        let good = two_rules_blob();

        let mut bad = good.clone();
        bad[0] = b'X';
        let (e, text) = refused(&bad);
        assert_eq!(e, EngineError::Blob(BlobError::BadMagic));
        assert!(
            text.starts_with(&format!(
                "rules module (boot module 2, {} bytes) refused: rules blob: bad magic",
                good.len()
            )),
            "{text}"
        );

        let mut bad = good.clone();
        bad[8] = 9;
        let (e, text) = refused(&bad);
        assert!(matches!(
            e,
            EngineError::Blob(BlobError::BadVersion { found: 9, .. })
        ));
        assert!(text.contains("version 9 not supported"), "{text}");

        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x20;
        let (e, text) = refused(&bad);
        assert!(matches!(e, EngineError::Blob(BlobError::Checksum { .. })));
        assert!(text.contains("checksum mismatch"), "{text}");

        let (e, text) = refused(&good[..good.len() - 3]);
        assert!(matches!(e, EngineError::Blob(BlobError::Truncated { .. })));
        assert!(text.contains("truncated"), "{text}");

        let (e, _) = refused(&[]);
        assert!(matches!(e, EngineError::Blob(BlobError::Truncated { .. })));

        // A record that does not parse, with a correct checksum: a deserialisation error.
        let text = b"alert tcp any any -> any any (frobnicate; sid:3;)";
        let mut payload = Vec::new();
        payload.extend_from_slice(&(text.len() as u32).to_le_bytes());
        payload.extend_from_slice(text);
        let mut bad = Vec::new();
        bad.extend_from_slice(blob::MAGIC);
        bad.extend_from_slice(&blob::BLOB_VERSION.to_le_bytes());
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bad.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bad.extend_from_slice(&payload);
        let (e, text) = refused(&bad);
        assert!(
            matches!(
                e,
                EngineError::Blob(BlobError::CorruptRecord { index: 0, .. })
            ),
            "{e:?}"
        );
        assert!(text.contains("corrupt record at index 0"), "{text}");
    }
}
