//! The rules module (`module2 /boot/rules.blob rules`, see `ally_dpi::rules_module` for which
//! modules Ally takes): found before Ally places its region, because its size sizes the heap;
//! verified and built into the engine on Ally's heap before any DPI core or guest runs; then
//! handed to the DPI loop. The module lies in guest RAM: after [`load`] nothing refers to it,
//! so the guest may reuse that memory.

use ally_dpi::engine::{AlertSink, Engine, EngineHook, Timestamp};
use ally_dpi::rules_module::{self, BootModule, ModuleError, RulesModule, TableKeys};
use log::info;
use multiboot2::BootInformation;

/// What start-up decided about the rules before placing Ally's region.
pub struct RulesPlan {
    module: Option<RulesModule>,
    /// Ally's heap size in bytes (`heap=`, or sized for the rules module).
    pub heap: u64,
}

impl RulesPlan {
    /// Whether the operator gave Ally rules to apply.
    pub fn given(&self) -> bool {
        self.module.is_some()
    }
}

/// Finds the rules module among the boot modules and chooses the heap size.
pub fn plan(
    boot_info: &BootInformation<'_>,
    heap_option: Option<u64>,
) -> Result<RulesPlan, ModuleError> {
    let modules = boot_info.module_tags().map(|tag| BootModule {
        // A command line that is not UTF-8 is quoted as U+FFFD: no module of Ally's.
        cmdline: tag.cmdline().unwrap_or("\u{FFFD}"),
        start: u64::from(tag.start_address()),
        end: u64::from(tag.end_address()),
    });
    let module = rules_module::find_rules_module(modules)?;
    let heap = rules_module::choose_heap(heap_option, module.as_ref())?;
    let source = if heap_option.is_some() {
        "heap= option"
    } else {
        "sized for the rules"
    };
    match &module {
        Some(m) => info!(
            "rules module: boot module {} at {:#x}, {} bytes; heap {} KiB ({source})",
            m.number,
            m.start,
            m.len(),
            heap / 1024
        ),
        None => info!("no rules module; heap {} KiB ({source})", heap / 1024),
    }
    Ok(RulesPlan { module, heap })
}

/// The engine, from [`load`] until the DPI loop takes it.
static ENGINE: spin::Once<spin::Mutex<Option<Engine>>> = spin::Once::new();

/// Verifies the rules module (magic, version, checksum, every rule) and builds the engine on
/// Ally's heap, or the pass-every-frame engine without a module; reports the result on COM2.
///
/// # Safety
/// Ally's heap is initialised, and the module's bytes are identity-mapped memory that nothing
/// else reads or writes until this returns (no guest and no other CPU runs yet).
pub unsafe fn load(plan: &RulesPlan) -> Result<(), ModuleError> {
    let rules = plan.module.as_ref().map(|m| {
        // SAFETY: the boot loader placed the module at [start, end) (start is not 0, end is
        // not below start: `find_rules_module` checked); the caller guarantees the mapping
        // and that nothing else uses it while the engine is built from it.
        let bytes = unsafe { core::slice::from_raw_parts(m.start as *const u8, m.len() as usize) };
        (m, bytes)
    });
    let engine = rules_module::build_engine(rules, table_keys())?;
    let s = engine.summary();
    let heap = crate::HEAP.usage();
    match &plan.module {
        Some(m) => {
            info!(
                "ALLY rules loaded={} drop={} alert={} pass={} groups={} bytes={} module={} \
                 heap={} heap_used={} heap_peak={}",
                s.rules,
                s.drop,
                s.alert,
                s.pass,
                s.groups,
                s.bytes,
                m.len(),
                plan.heap,
                heap.map_or(0, |h| h.used),
                heap.map_or(0, |h| h.peak)
            );
            info!("{s}");
        }
        None => info!("ALLY rules none: passing every frame"),
    }
    ENGINE.call_once(|| spin::Mutex::new(Some(engine)));
    Ok(())
}

/// The engine as the DPI loop's packet hook, with its alert sink and clock; `None` before
/// [`load`] and once taken (one DPI loop owns it).
pub fn take_engine_hook<S: AlertSink, C: FnMut() -> Timestamp>(
    sink: S,
    clock: C,
) -> Option<EngineHook<S, C>> {
    let engine = ENGINE.get()?.lock().take()?;
    Some(EngineHook {
        engine,
        sink,
        clock,
    })
}

/// Keys of the engine's stream-tracker, reassembly and flow tables (SipHash), so a guest cannot aim
/// flows or datagrams at one probe window. RDRAND when CPUID reports it (retried, as Intel advises, up to 10 times per
/// word); otherwise, or if RDRAND keeps failing, the time stamp counter mixed with the word's
/// index: weak (a guest that can estimate boot timing could guess it), but the table stays
/// bounded whatever the key, so the fallback costs only eviction resistance.
fn table_keys() -> TableKeys {
    use core::arch::x86_64::{__cpuid, _rdrand64_step, _rdtsc};
    // CPUID.1:ECX bit 30 = RDRAND.
    let has_rdrand = __cpuid(1).ecx & (1 << 30) != 0;
    let mut key = [0u64; 6];
    for (i, k) in key.iter_mut().enumerate() {
        let mut got = None;
        if has_rdrand {
            for _ in 0..10 {
                let mut v = 0u64;
                // SAFETY: CPUID reported RDRAND; it has no other preconditions.
                if unsafe { _rdrand64_step(&mut v) } == 1 {
                    got = Some(v);
                    break;
                }
            }
        }
        *k = got.unwrap_or_else(|| {
            // SAFETY: RDTSC has no preconditions in ring 0.
            let t = unsafe { _rdtsc() };
            t.rotate_left(17 * i as u32 + 7) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)
        });
    }
    TableKeys {
        stream: [key[0], key[1]],
        defrag: [key[2], key[3]],
        flows: [key[4], key[5]],
    }
}
