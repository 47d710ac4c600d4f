//! The OS cores' local APIC as the guest reaches it: every access goes to the real APIC except
//! ICR writes, which pass through the IPI filter (`crate::ipi`) so that no INIT, SIPI, NMI, SMI
//! or fixed IPI reaches a DPI core, and INIT and SIPI to OS cores are emulated
//! (`init_sipi`), never sent.
//!
//! - xAPIC: the APIC page is absent from the EPT; each access exits (EPT violation), is decoded
//!   and forwarded to this CPU's APIC at the same offset and width (4 bytes, SDM 12.4.1).
//! - x2APIC: only MSR 0x830 (ICR) and IA32_APIC_BASE are intercepted.

use crate::addr::GuestPhysAddr;
use crate::arch::instructions::{rdmsr, wrmsr};
use crate::guards::init_sipi;
use crate::guest::{AccessWidth, MmioHandler};
use crate::ipi::{filter_ipi, rewritten_targets, ApicMode, DeliveryMode, IpiAction};
use crate::platform::platform;
use core::sync::atomic::{AtomicU64, Ordering};

pub const IA32_APIC_BASE: u32 = 0x1B;
pub const X2APIC_ICR: u32 = 0x830;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

/// IPIs dropped for DPI cores, by delivery mode (`DeliveryMode::index`).
pub static DROPPED_IPIS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
/// Broadcasts rewritten as unicasts to the OS cores.
pub static REWRITTEN_IPIS: AtomicU64 = AtomicU64::new(0);
/// Guest xAPIC accesses emulated (each one a VM exit), by register (the page's 64 16-byte
/// slots), reads and writes.
static APIC_READS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static APIC_WRITES: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// The xAPIC register at `offset` (SDM Vol. 3A table 12-1), for the exit report.
fn register_name(offset: u64) -> &'static str {
    match offset {
        0x020 => "ID",
        0x030 => "VERSION",
        0x080 => "TPR",
        0x0B0 => "EOI",
        0x0D0 => "LDR",
        0x0E0 => "DFR",
        0x0F0 => "SVR",
        0x100..=0x170 => "ISR",
        0x180..=0x1F0 => "TMR",
        0x200..=0x270 => "IRR",
        0x280 => "ESR",
        0x300 => "ICR_LOW",
        0x310 => "ICR_HIGH",
        0x320 => "LVT_TIMER",
        0x330..=0x370 => "LVT_OTHER",
        0x380 => "TMICT",
        0x390 => "TMCCT",
        0x3E0 => "TDCR",
        _ => "other",
    }
}

fn count(table: &[AtomicU64; 64], gpa: GuestPhysAddr) {
    table[((gpa.0 & 0x3F0) >> 4) as usize].fetch_add(1, Ordering::Relaxed);
}

/// Whether the ICR was rewritten as unicasts (mostly broadcasts: a shorthand or a broadcast
/// ID), for the report budget.
fn is_broadcast(action: &IpiAction) -> bool {
    matches!(action, IpiAction::Rewrite { .. })
}

fn record_drop(low: u32, destination: u32, dropped: usize, broadcast: bool) {
    let mode = DeliveryMode::from_icr(low);
    DROPPED_IPIS[mode.index()].fetch_add(dropped as u64, Ordering::Relaxed);
    // Drop reports are rate-limited (the counters keep counting); broadcasts have their own
    // budget (see `log_limit::IPI_DROP_BROADCAST`).
    let limit = if broadcast {
        &crate::log_limit::IPI_DROP_BROADCAST
    } else {
        &crate::log_limit::IPI_DROP
    };
    if limit.admit() {
        // The DPI heartbeat at the drop: the power-off report shows it went on afterwards.
        log::warn!(
            "ALLY ipi-drop mode={mode} icr={low:#x} dest={destination:#x} dropped={dropped} heartbeat={}",
            (platform().dpi_heartbeat)()
        );
    }
}

/// Applies the filter's decision, writing the real ICR through `send(low, destination)`.
fn apply(low: u32, destination: u32, mode: ApicMode, sender: u32, mut send: impl FnMut(u32, u32)) {
    let p = platform();
    let cpus = p.cpu_sets();
    let action = filter_ipi(mode, low, destination, cpus);
    if matches!(
        DeliveryMode::from_icr(low),
        DeliveryMode::Init | DeliveryMode::Startup
    ) {
        // The DPI cores' share is dropped and counted as for any IPI; the OS cores' share is
        // emulated and the hardware sees nothing (see `crate::startup` for why).
        match action {
            IpiAction::Forward => {}
            IpiAction::Drop { dropped } | IpiAction::Rewrite { dropped } => {
                record_drop(low, destination, dropped, is_broadcast(&action))
            }
        }
        crate::guards::init_sipi::emulate(mode, low, destination, sender);
        return;
    }
    match action {
        IpiAction::Forward => send(low, destination),
        IpiAction::Drop { dropped } => record_drop(low, destination, dropped, false),
        IpiAction::Rewrite { dropped } => {
            record_drop(low, destination, dropped, true);
            REWRITTEN_IPIS.fetch_add(1, Ordering::Relaxed);
            // Physical destination, no shorthand (ICR bits 19:18 and 11 cleared).
            let unicast = low & !((3 << 18) | (1 << 11));
            let targets = rewritten_targets(
                mode,
                low,
                destination,
                sender,
                cpus,
                init_sipi::guest_logical_id,
            );
            for target in targets {
                send(unicast, target);
            }
        }
    }
}

/// The guest's xAPIC page, forwarded to this CPU's APIC.
pub struct XApicMmio {
    pub apic_base: u64,
    pub sender: u32,
}

impl XApicMmio {
    fn register(&self, gpa: GuestPhysAddr) -> *mut u32 {
        (self.apic_base + (gpa.0 & 0xFF0)) as *mut u32
    }
}

impl MmioHandler for XApicMmio {
    fn read(&mut self, gpa: GuestPhysAddr, _width: AccessWidth) -> u64 {
        count(&APIC_READS, gpa);
        // SAFETY: the APIC page is identity-mapped in Ally's tables; APIC registers are read
        // as aligned dwords (narrower guest reads get the low bytes, as the decoder truncates).
        u64::from(unsafe { self.register(gpa).read_volatile() })
    }

    fn write(&mut self, gpa: GuestPhysAddr, _width: AccessWidth, value: u64) {
        count(&APIC_WRITES, gpa);
        let value = value as u32;
        if gpa.0 & 0xFF0 == ICR_LOW {
            // SAFETY: as for `read`; ICR high holds the destination the guest wrote first.
            let destination =
                unsafe { ((self.apic_base + ICR_HIGH) as *const u32).read_volatile() } >> 24;
            let base = self.apic_base;
            let mut rewrote_destination = false;
            apply(
                value,
                destination,
                ApicMode::XApic,
                self.sender,
                |low, dest| {
                    rewrote_destination |= dest != destination;
                    // SAFETY: writing ICR high then ICR low sends the IPI (SDM 12.6.1).
                    unsafe {
                        ((base + ICR_HIGH) as *mut u32).write_volatile(dest << 24);
                        ((base + ICR_LOW) as *mut u32).write_volatile(low);
                    }
                },
            );
            if rewrote_destination {
                // The guest reads back the destination it wrote, not the rewritten unicasts'.
                // SAFETY: as above; writing ICR high alone sends nothing.
                unsafe { ((base + ICR_HIGH) as *mut u32).write_volatile(destination << 24) };
            }
            return;
        }
        if matches!(gpa.0 & 0xFF0, init_sipi::XAPIC_LDR | init_sipi::XAPIC_DFR) {
            init_sipi::record_logical_register(self.sender, gpa.0 & 0xFF0, value);
        }
        // SAFETY: as for `read`; every other register is the guest's own.
        unsafe { self.register(gpa).write_volatile(value) };
    }
}

/// The guest writes the x2APIC ICR (MSR 0x830).
pub fn write_x2apic_icr(value: u64, sender: u32) {
    apply(
        value as u32,
        (value >> 32) as u32,
        ApicMode::X2Apic,
        sender,
        |low, dest| {
            // SAFETY: the guest is in x2APIC mode (it could write MSR 0x830), so the MSR exists.
            unsafe { wrmsr(X2APIC_ICR, (u64::from(dest) << 32) | u64::from(low)) };
        },
    );
}

/// Whether a guest write of IA32_APIC_BASE keeps the APIC where Ally traps it.
pub fn apic_base_write_allowed(value: u64) -> bool {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let current = unsafe { rdmsr(IA32_APIC_BASE) };
    value & 0xF_FFFF_F000 == current & 0xF_FFFF_F000
}

/// Prints the IPI filter's counters.
pub fn report() {
    for mode in DeliveryMode::ALL {
        let n = DROPPED_IPIS[mode.index()].load(Ordering::Relaxed);
        log::info!("ALLY ipi-dropped mode={mode} count={n}");
    }
    log::info!(
        "ALLY ipi-rewritten count={} apic-mmio-exits={}",
        REWRITTEN_IPIS.load(Ordering::Relaxed),
        apic_mmio_exits()
    );
    for (name, r, w) in exits_by_register() {
        log::info!("ALLY apic-exits register={name} reads={r} writes={w}");
    }
    init_sipi::report();
    log::info!(
        "ALLY ioapic rerouted={} exits={}",
        crate::guards::ioapic::REROUTED.load(Ordering::Relaxed),
        crate::guards::ioapic::IOAPIC_EXITS.load(Ordering::Relaxed)
    );
}

/// Guest xAPIC accesses emulated (each one a VM exit).
pub fn apic_mmio_exits() -> u64 {
    APIC_READS
        .iter()
        .chain(APIC_WRITES.iter())
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// APIC exits by register name, `(name, reads, writes)`, ISR/TMR/IRR's eight slots summed.
pub fn exits_by_register() -> heapless::Vec<(&'static str, u64, u64), 24> {
    let mut seen: heapless::Vec<(&'static str, u64, u64), 24> = heapless::Vec::new();
    for slot in 0..64u64 {
        let (r, w) = (
            APIC_READS[slot as usize].load(Ordering::Relaxed),
            APIC_WRITES[slot as usize].load(Ordering::Relaxed),
        );
        if r + w == 0 {
            continue;
        }
        let name = register_name(slot << 4);
        match seen.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => (entry.1, entry.2) = (entry.1 + r, entry.2 + w),
            None => {
                let _ = seen.push((name, r, w));
            }
        }
    }
    seen
}
