//! The guest's I/O APICs: their register pages are absent from the EPT, so every access exits
//! and is emulated, except that a redirection entry may not name a DPI core
//! (`crate::ipi::filter_device_interrupt`). The guest reads back what it wrote; the hardware
//! holds the filtered destination.
//!
//! Registers (82093AA datasheet 3.0): IOREGSEL at +0x00 selects, IOWIN at +0x10 reads or
//! writes the selected register; redirection entry n is registers 0x10 + 2n (low dword:
//! vector, delivery mode, destination mode, mask) and 0x11 + 2n (high dword: destination in
//! bits 31:24).
//!
//! IOREGSEL is one register shared by every CPU, so the select-then-window pair is not atomic
//! on the hardware. The guest never reaches the hardware's IOREGSEL: Ally keeps the guest's
//! IOREGSEL as a shadow per I/O APIC (as the hardware has one per I/O APIC), and every IOWIN
//! access selects and reads or writes the hardware under the guard's lock, judging the index
//! that hardware access uses. Another OS core's IOREGSEL write between the guest's select and
//! its window access therefore changes which register the guest reaches (as on the hardware,
//! where the guest must serialise its own accesses), never which register the filter judged.

use crate::addr::GuestPhysAddr;
use crate::guest::{AccessWidth, MmioHandler};
use crate::ipi::{filter_device_interrupt, CpuSets, RouteAction};
use crate::platform::platform;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const FIRST_REDIRECTION: u32 = 0x10;
/// Redirection entry low dword: interrupt mask and destination mode (82093AA 3.2.4).
const MASKED: u32 = 1 << 16;
const LOGICAL: u32 = 1 << 11;
/// Delivery status (bit 12) and Remote IRR (bit 14): read-only, the I/O APIC's own.
const HARDWARE_STATUS: u32 = (1 << 12) | (1 << 14);
/// Redirection entries an 8-bit IOREGSEL can address (registers 0x10-0xFF): every entry the
/// guest can reach. An I/O APIC reporting more has its further entries unreachable for the
/// guest as for Ally.
const MAX_ENTRIES: usize = 120;

/// One I/O APIC's select and window registers and its other registers (EOI at 0x40 on
/// later versions), behind a trait so the guard's logic is tested on the host.
pub trait IoApicRegisters {
    fn select(&self, index: u32);
    fn read_window(&self) -> u32;
    fn write_window(&self, value: u32);
    fn read_other(&self, offset: u64) -> u32;
    fn write_other(&self, offset: u64, value: u32);
}

/// The I/O APIC's register page, identity-mapped in Ally's tables.
pub struct MmioIoApic {
    base: u64,
}

impl MmioIoApic {
    fn register(&self, offset: u64) -> *mut u32 {
        (self.base + offset) as *mut u32
    }
}

impl IoApicRegisters for MmioIoApic {
    fn select(&self, index: u32) {
        // SAFETY: the I/O APIC page is identity-mapped device memory in Ally's tables.
        unsafe { self.register(IOREGSEL).write_volatile(index) };
    }
    fn read_window(&self) -> u32 {
        // SAFETY: as for `select`.
        unsafe { self.register(IOWIN).read_volatile() }
    }
    fn write_window(&self, value: u32) {
        // SAFETY: as for `select`.
        unsafe { self.register(IOWIN).write_volatile(value) }
    }
    fn read_other(&self, offset: u64) -> u32 {
        // SAFETY: as for `select`; registers other than IOREGSEL/IOWIN are the guest's own.
        unsafe { self.register(offset & 0xFFC).read_volatile() }
    }
    fn write_other(&self, offset: u64, value: u32) {
        // SAFETY: as for `read_other`.
        unsafe { self.register(offset & 0xFFC).write_volatile(value) }
    }
}

/// What Ally keeps for one I/O APIC, changed only under the guard's lock.
struct Shadow {
    /// The guest's IOREGSEL.
    selected: u32,
    /// Redirection entries this I/O APIC has (version register, at most [`MAX_ENTRIES`]).
    entries: usize,
    /// The entries as the guest wrote them (low, high): what it reads back.
    guest_low: [u32; MAX_ENTRIES],
    guest_destination: [u32; MAX_ENTRIES],
    /// The entries as the firmware left them (low, high), restored when the guest resets.
    firmware_entries: [(u32, u32); MAX_ENTRIES],
}

/// One I/O APIC: its registers and Ally's shadow of the guest's view.
pub struct IoApicGuard<R: IoApicRegisters = MmioIoApic> {
    /// Physical address of the register page.
    pub base: u64,
    registers: R,
    shadow: Mutex<Shadow>,
}

/// Redirection entries whose destination Ally changed.
pub static REROUTED: AtomicU64 = AtomicU64::new(0);
pub static IOAPIC_EXITS: AtomicU64 = AtomicU64::new(0);

impl IoApicGuard {
    /// The I/O APIC whose page-aligned registers are at `base`, its entries as the firmware
    /// left them adopted (call before the guest runs).
    pub fn new(base: u64) -> Self {
        IoApicGuard::with_registers(base, MmioIoApic { base })
    }
}

impl<R: IoApicRegisters> IoApicGuard<R> {
    /// The guard over `registers`; reads the entry count and the firmware's entries, so the
    /// guest reads their destinations back unchanged and a guest reset can restore them.
    pub fn with_registers(base: u64, registers: R) -> Self {
        let mut shadow = Shadow {
            selected: 0,
            entries: 0,
            guest_low: [0; MAX_ENTRIES],
            guest_destination: [0; MAX_ENTRIES],
            firmware_entries: [(0, 0); MAX_ENTRIES],
        };
        registers.select(1);
        shadow.entries = (((registers.read_window() >> 16) & 0xFF) as usize + 1).min(MAX_ENTRIES);
        for entry in 0..shadow.entries {
            let index = FIRST_REDIRECTION + 2 * entry as u32;
            registers.select(index);
            let low = registers.read_window();
            registers.select(index + 1);
            let high = registers.read_window();
            shadow.guest_low[entry] = low;
            shadow.guest_destination[entry] = high;
            shadow.firmware_entries[entry] = (low, high);
        }
        Self {
            base,
            registers,
            shadow: Mutex::new(shadow),
        }
    }

    /// Redirection entries this I/O APIC has, as far as the guest can address them.
    pub fn entries(&self) -> usize {
        self.shadow.lock().entries
    }

    /// Selects `index` and reads it. Caller holds the lock.
    fn window_read(&self, index: u32) -> u32 {
        self.registers.select(index);
        self.registers.read_window()
    }

    /// Selects `index` and writes it. Caller holds the lock.
    fn window_write(&self, index: u32, value: u32) {
        self.registers.select(index);
        self.registers.write_window(value);
    }

    /// Writes redirection entry `entry` with the guest's `low` and destination `guest_high`,
    /// the destination filtered. Caller holds the lock.
    fn write_entry(&self, entry: usize, low: u32, guest_high: u32, cpus: CpuSets<'_>) {
        let index = FIRST_REDIRECTION + 2 * entry as u32;
        let masked = low & MASKED != 0;
        let action = filter_device_interrupt(low & LOGICAL != 0, guest_high >> 24, cpus);
        let (low, high) = match action {
            RouteAction::Keep => (low, guest_high),
            RouteAction::Rewrite { destination, .. } => {
                if !masked {
                    REROUTED.fetch_add(1, Ordering::Relaxed);
                    if crate::log_limit::IOAPIC_REROUTE.admit() {
                        log::warn!(
                            "ALLY ioapic-reroute base={:#x} entry={entry} dest={:#x} to={destination:#x}",
                            self.base,
                            guest_high >> 24
                        );
                    }
                }
                // Physical destination mode: the first OS core.
                let low = low & !LOGICAL;
                (low, (guest_high & 0x00FF_FFFF) | (destination << 24))
            }
        };
        // With interrupt remapping on, the filtered entry goes into the remapping table
        // and the I/O APIC gets an entry that only names it.
        let (low, high) = match crate::iommu::interrupts::remapping() {
            Some(remapping) => {
                let rte = remapping.ioapic_entry(
                    self.base,
                    entry as u8,
                    (u64::from(high) << 32) | u64::from(low),
                );
                (rte as u32, (rte >> 32) as u32)
            }
            None => (low, high),
        };
        // Destination first, then the low half (which may unmask and change the destination
        // mode): the entry is never live with an unfiltered destination. Should the new
        // destination be unsafe under the entry's current, live mode (physical 3 is fine as a
        // logical MDA, not as an APIC ID), the entry is masked for the change.
        let live = self.window_read(index);
        if live & MASKED == 0
            && filter_device_interrupt(live & LOGICAL != 0, high >> 24, cpus) != RouteAction::Keep
        {
            self.window_write(index, live | MASKED);
        }
        self.window_write(index + 1, high);
        self.window_write(index, low);
    }

    /// The guest reads the register at `offset` of the page.
    pub fn guest_read(&self, offset: u64) -> u32 {
        let shadow = self.shadow.lock();
        match offset & 0xFFC {
            IOREGSEL => shadow.selected,
            IOWIN => {
                let index = shadow.selected;
                match redirection(index, shadow.entries) {
                    Some((entry, true)) => shadow.guest_destination[entry],
                    // Delivery status and Remote IRR are the hardware's.
                    Some((entry, false)) => {
                        (shadow.guest_low[entry] & !HARDWARE_STATUS)
                            | (self.window_read(index) & HARDWARE_STATUS)
                    }
                    None => self.window_read(index),
                }
            }
            other => self.registers.read_other(other),
        }
    }

    /// The guest writes `value` to the register at `offset` of the page.
    pub fn guest_write(&self, offset: u64, value: u32, cpus: CpuSets<'_>) {
        let mut shadow = self.shadow.lock();
        match offset & 0xFFC {
            // IOREGSEL bits 7:0 select; the hardware's is set only with a window access.
            IOREGSEL => shadow.selected = value & 0xFF,
            IOWIN => {
                let index = shadow.selected;
                match redirection(index, shadow.entries) {
                    Some((entry, true)) => {
                        shadow.guest_destination[entry] = value;
                        let low = shadow.guest_low[entry];
                        self.write_entry(entry, low, value, cpus);
                    }
                    Some((entry, false)) => {
                        shadow.guest_low[entry] = value;
                        let high = shadow.guest_destination[entry];
                        self.write_entry(entry, value, high, cpus);
                    }
                    // The ID and arbitration registers, and indices beyond the last entry
                    // (which the I/O APIC ignores).
                    None => self.window_write(index, value),
                }
            }
            other => self.registers.write_other(other, value),
        }
    }

    /// The guest reset: every redirection entry goes back to what the firmware left (the
    /// destination filtered as always), as after the reset and POST it would find.
    pub fn restore_firmware_entries_for(&self, cpus: CpuSets<'_>) {
        let mut shadow = self.shadow.lock();
        for entry in 0..shadow.entries {
            let (low, high) = shadow.firmware_entries[entry];
            shadow.guest_low[entry] = low;
            shadow.guest_destination[entry] = high;
        }
        shadow.selected = 0;
        self.write_guest_entries(&shadow, cpus);
    }

    /// Writes every entry again from what the guest (or the firmware) last gave it: after
    /// interrupt remapping went on, so that each goes through the remapping table.
    pub fn reapply_entries_for(&self, cpus: CpuSets<'_>) {
        self.write_guest_entries(&self.shadow.lock(), cpus);
    }

    /// Every entry as `shadow` holds the guest's view of it. Caller holds the lock.
    fn write_guest_entries(&self, shadow: &Shadow, cpus: CpuSets<'_>) {
        for entry in 0..shadow.entries {
            let (low, high) = (shadow.guest_low[entry], shadow.guest_destination[entry]);
            self.write_entry(entry, low, high, cpus);
        }
    }
}

impl IoApicGuard {
    /// [`Self::restore_firmware_entries_for`] with the platform's CPUs.
    pub fn restore_firmware_entries(&self) {
        self.restore_firmware_entries_for(platform().cpu_sets());
    }
}

impl MmioHandler for &IoApicGuard {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        IOAPIC_EXITS.fetch_add(1, Ordering::Relaxed);
        u64::from(self.guest_read(gpa.0 & 0xFFF)) & width.mask()
    }

    fn write(&mut self, gpa: GuestPhysAddr, _width: AccessWidth, value: u64) {
        IOAPIC_EXITS.fetch_add(1, Ordering::Relaxed);
        self.guest_write(gpa.0 & 0xFFF, value as u32, platform().cpu_sets());
    }
}

/// The redirection entry a register index addresses, and whether it is the high half; `None`
/// for the ID, version and arbitration registers and beyond the last of `entries`.
fn redirection(index: u32, entries: usize) -> Option<(usize, bool)> {
    let n = index.checked_sub(FIRST_REDIRECTION)? as usize;
    (n / 2 < entries).then_some((n / 2, n % 2 == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipi::tests::CPUS;
    use std::sync::atomic::AtomicU32;
    use std::sync::{Arc, Mutex as StdMutex};

    const ENTRIES: usize = 24;

    /// An 82093AA: one IOREGSEL shared by every CPU, 24 entries. Every write to an entry
    /// checks that the entry, as the hardware now holds it, cannot reach DPI core 3 (unless
    /// masked).
    struct MockIoApic {
        selected: AtomicU32,
        registers: StdMutex<[u32; 0x100]>,
        violations: AtomicU32,
    }

    impl MockIoApic {
        fn new() -> Self {
            let mut registers = [0u32; 0x100];
            registers[1] = ((ENTRIES as u32 - 1) << 16) | 0x11;
            for entry in 0..ENTRIES {
                registers[0x10 + 2 * entry] = 1 << 16; // masked
            }
            Self {
                selected: AtomicU32::new(0),
                registers: StdMutex::new(registers),
                violations: AtomicU32::new(0),
            }
        }

        fn entry(&self, entry: usize) -> (u32, u32) {
            let r = self.registers.lock().unwrap();
            (r[0x10 + 2 * entry], r[0x11 + 2 * entry])
        }
    }

    /// Whether a live entry `(low, high)` can deliver to DPI core 3 (APIC ID 3, LDR 0).
    fn reaches_dpi_core(low: u32, high: u32) -> bool {
        let dest = high >> 24;
        let logical = low & (1 << 11) != 0;
        low & (1 << 16) == 0 && (dest == 0xFF || (!logical && dest == 3))
    }

    impl IoApicRegisters for &MockIoApic {
        fn select(&self, index: u32) {
            self.selected.store(index & 0xFF, Ordering::SeqCst);
        }
        fn read_window(&self) -> u32 {
            self.registers.lock().unwrap()[self.selected.load(Ordering::SeqCst) as usize]
        }
        fn write_window(&self, value: u32) {
            let mut r = self.registers.lock().unwrap();
            let index = self.selected.load(Ordering::SeqCst) as usize;
            r[index] = value;
            if index >= 0x10 {
                let low = index & !1;
                if reaches_dpi_core(r[low], r[low + 1]) {
                    self.violations.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        fn read_other(&self, _offset: u64) -> u32 {
            0
        }
        fn write_other(&self, _offset: u64, _value: u32) {}
    }

    fn leaked_mock() -> &'static MockIoApic {
        Box::leak(Box::new(MockIoApic::new()))
    }

    #[test]
    fn the_guest_reads_back_what_it_wrote_and_the_hardware_holds_the_filtered_entry() {
        let hw = leaked_mock();
        let g = IoApicGuard::with_registers(0xFEC0_0000, hw);
        assert_eq!(g.entries(), ENTRIES);
        // Entry 2: fixed, physical, vector 0x30, to the DPI core (3).
        g.guest_write(IOREGSEL, 0x15, CPUS);
        g.guest_write(IOWIN, 3 << 24, CPUS);
        g.guest_write(IOREGSEL, 0x14, CPUS);
        g.guest_write(IOWIN, 0x30, CPUS);
        assert_eq!(hw.entry(2), (0x30, 0));
        g.guest_write(IOREGSEL, 0x15, CPUS);
        assert_eq!(g.guest_read(IOWIN), 3 << 24);
        assert_eq!(g.guest_read(IOREGSEL), 0x15);
        // To an OS core: kept as written.
        g.guest_write(IOWIN, 2 << 24, CPUS);
        assert_eq!(hw.entry(2), (0x30, 2 << 24));
        assert_eq!(hw.violations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_low_half_write_is_judged_with_the_destination_the_guest_wrote() {
        let hw = leaked_mock();
        let g = IoApicGuard::with_registers(0xFEC0_0000, hw);
        // Logical destination 3 (harmless: the DPI core's LDR is 0), then physical mode.
        g.guest_write(IOREGSEL, 0x11, CPUS);
        g.guest_write(IOWIN, 3 << 24, CPUS);
        g.guest_write(IOREGSEL, 0x10, CPUS);
        g.guest_write(IOWIN, 0x30 | (1 << 11), CPUS);
        assert_eq!(hw.entry(0), (0x30 | (1 << 11), 3 << 24));
        g.guest_write(IOWIN, 0x30, CPUS);
        assert_eq!(hw.entry(0), (0x30, 0));
        // And back to logical: destination 3 may return, but not while the live entry is
        // still physical and unmasked (the mock counts every such moment).
        g.guest_write(IOWIN, 0x30 | (1 << 11), CPUS);
        assert_eq!(hw.entry(0), (0x30 | (1 << 11), 3 << 24));
        assert_eq!(hw.violations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn another_cores_select_between_select_and_window_changes_the_register_not_the_judgement() {
        let hw = leaked_mock();
        let g = IoApicGuard::with_registers(0xFEC0_0000, hw);
        // Core A selects entry 1's high half, core B selects entry 4's low half, core A
        // writes the window: the value lands on entry 4's low half and is judged as such.
        g.guest_write(IOREGSEL, 0x13, CPUS); // A
        g.guest_write(IOREGSEL, 0x10 + 8, CPUS); // B
        g.guest_write(IOWIN, 0x41, CPUS); // A: unmasked, fixed, physical, to entry 4's dest 0
        assert_eq!(hw.entry(4), (0x41, 0));
        assert_eq!(hw.entry(1), (1 << 16, 0), "entry 1 untouched");
        // B's destination write to the DPI core goes through the filter.
        g.guest_write(IOREGSEL, 0x19, CPUS);
        g.guest_write(IOWIN, 3 << 24, CPUS);
        assert_eq!(hw.entry(4), (0x41, 0));
        // The hardware's IOREGSEL is never the guest's: the guest's register still reads 0x19.
        hw.select(0x10);
        assert_eq!(g.guest_read(IOREGSEL), 0x19);
        assert_eq!(g.guest_read(IOWIN), 3 << 24);
        assert_eq!(hw.violations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn two_cores_interleaving_select_and_window_never_reach_the_dpi_core() {
        let hw = leaked_mock();
        let g = Arc::new(IoApicGuard::with_registers(0xFEC0_0000, hw));
        let cores: Vec<_> = (0..2u32)
            .map(|core| {
                let g = Arc::clone(&g);
                std::thread::spawn(move || {
                    let mut x = 0x1234_5678u32 ^ core;
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        let entry = (x >> 12) % ENTRIES as u32;
                        let high = x & 1 == 1;
                        g.guest_write(IOREGSEL, 0x10 + 2 * entry + u32::from(high), CPUS);
                        let value = if high {
                            [3u32, 0xFF, 1, 2][(x >> 8) as usize % 4] << 24
                        } else {
                            // Unmasked, fixed or lowest priority or NMI, either mode.
                            0x30 | (((x >> 8) & 1) << 11) | ([0, 1, 4][(x >> 9) as usize % 3] << 8)
                        };
                        g.guest_write(IOWIN, value, CPUS);
                    }
                })
            })
            .collect();
        for core in cores {
            core.join().unwrap();
        }

        assert_eq!(hw.violations.load(Ordering::SeqCst), 0);
        for entry in 0..ENTRIES {
            let (low, high) = hw.entry(entry);
            assert!(!reaches_dpi_core(low, high), "entry {entry}");
        }
    }

    #[test]
    fn a_reset_restores_the_firmware_entries_filtered() {
        let hw = leaked_mock();
        hw.registers.lock().unwrap()[0x12] = 0x31;
        hw.registers.lock().unwrap()[0x13] = 3 << 24;
        let g = IoApicGuard::with_registers(0xFEC0_0000, hw);
        g.guest_write(IOREGSEL, 0x12, CPUS);
        assert_eq!(g.guest_read(IOWIN), 0x31);
        g.guest_write(IOWIN, 1 << 16, CPUS);
        g.restore_firmware_entries_for(CPUS);
        assert_eq!(hw.entry(1), (0x31, 0));
        assert_eq!(g.guest_read(IOREGSEL), 0);
        g.guest_write(IOREGSEL, 0x13, CPUS);
        assert_eq!(g.guest_read(IOWIN), 3 << 24);
    }

    #[test]
    fn indices_past_the_last_entry_are_not_entries() {
        assert_eq!(redirection(0x10, 24), Some((0, false)));
        assert_eq!(redirection(0x3F, 24), Some((23, true)));
        assert_eq!(redirection(0x40, 24), None);
        assert_eq!(redirection(0x02, 24), None);
        assert_eq!(redirection(0xFF, MAX_ENTRIES), Some((119, true)));
    }
}
