//! The guest's I/O APICs: their register pages are absent from the EPT, so every access exits
//! and is forwarded, except that a redirection entry may not name a DPI core
//! (`crate::ipi::filter_device_interrupt`). The guest reads back what it wrote; the hardware
//! holds the filtered destination.
//!
//! Registers (82093AA datasheet 3.0): IOREGSEL at +0x00 selects, IOWIN at +0x10 reads or
//! writes the selected register; redirection entry n is registers 0x10 + 2n (low dword:
//! vector, delivery mode, destination mode, mask) and 0x11 + 2n (high dword: destination in
//! bits 31:24).

use super::platform::platform;
use crate::addr::GuestPhysAddr;
use crate::guest::{AccessWidth, MmioHandler};
use crate::ipi::{filter_device_interrupt, RouteAction};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const FIRST_REDIRECTION: u32 = 0x10;
/// Redirection entries Ally shadows per I/O APIC (the 82093AA has 24; later ones up to 240).
const MAX_ENTRIES: usize = 120;

/// One I/O APIC: its registers' address and the destinations as the guest wrote them.
pub struct IoApicGuard {
    pub base: u64,
    selected: AtomicU32,
    guest_destination: [AtomicU32; MAX_ENTRIES],
    /// The entries as the firmware left them (low, high), restored when the guest resets.
    firmware_entries: [(AtomicU32, AtomicU32); MAX_ENTRIES],
}

/// Redirection entries whose destination Ally changed.
pub static REROUTED: AtomicU64 = AtomicU64::new(0);
pub static IOAPIC_EXITS: AtomicU64 = AtomicU64::new(0);

impl IoApicGuard {
    pub fn new(base: u64) -> Self {
        Self {
            base,
            selected: AtomicU32::new(0),
            guest_destination: [const { AtomicU32::new(0) }; MAX_ENTRIES],
            firmware_entries: [const { (AtomicU32::new(0), AtomicU32::new(0)) }; MAX_ENTRIES],
        }
    }

    fn register(&self, offset: u64) -> *mut u32 {
        (self.base + offset) as *mut u32
    }

    fn select(&self, index: u32) {
        // SAFETY: the I/O APIC page is identity-mapped device memory in Ally's tables.
        unsafe { self.register(IOREGSEL).write_volatile(index) };
    }

    fn window_read(&self, index: u32) -> u32 {
        self.select(index);
        // SAFETY: as for `select`.
        unsafe { self.register(IOWIN).read_volatile() }
    }

    fn window_write(&self, index: u32, value: u32) {
        self.select(index);
        // SAFETY: as for `select`.
        unsafe { self.register(IOWIN).write_volatile(value) };
    }

    /// Writes redirection entry `entry` with the guest's `low` and destination `high`, the
    /// destination filtered.
    fn write_entry(&self, entry: usize, low: u32, guest_high: u32) {
        let p = platform();
        let cpus = p.cpu_sets();
        let index = FIRST_REDIRECTION + 2 * entry as u32;
        let masked = low & (1 << 16) != 0;
        let action =
            filter_device_interrupt((low >> 8) & 7, low & (1 << 11) != 0, guest_high >> 24, cpus);
        let (low, high) = match action {
            RouteAction::Keep => (low, guest_high),
            RouteAction::Rewrite {
                destination,
                logical,
                ..
            } => {
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
                let low = (low & !(1 << 11)) | if logical { 1 << 11 } else { 0 };
                (low, (guest_high & 0x00FF_FFFF) | (destination << 24))
            }
        };
        // Destination first, then the low half (which may unmask): the entry is never live
        // with an unfiltered destination.
        self.window_write(index + 1, high);
        self.window_write(index, low);
    }
}

impl MmioHandler for &IoApicGuard {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        IOAPIC_EXITS.fetch_add(1, Ordering::Relaxed);
        let offset = gpa.0 & 0xFFF;
        let value = match offset & !3 {
            IOREGSEL => self.selected.load(Ordering::Relaxed),
            IOWIN => {
                let index = self.selected.load(Ordering::Relaxed);
                match redirection(index) {
                    Some((entry, true)) => self.guest_destination[entry].load(Ordering::Relaxed),
                    _ => self.window_read(index),
                }
            }
            // SAFETY: other registers (e.g. the EOI register at 0x40) are forwarded.
            other => unsafe { self.register(other).read_volatile() },
        };
        u64::from(value) & width.mask()
    }

    fn write(&mut self, gpa: GuestPhysAddr, _width: AccessWidth, value: u64) {
        IOAPIC_EXITS.fetch_add(1, Ordering::Relaxed);
        let value = value as u32;
        match gpa.0 & 0xFFF & !3 {
            IOREGSEL => {
                self.selected.store(value & 0xFF, Ordering::Relaxed);
                self.select(value & 0xFF);
            }
            IOWIN => {
                let index = self.selected.load(Ordering::Relaxed);
                match redirection(index) {
                    Some((entry, true)) => {
                        self.guest_destination[entry].store(value, Ordering::Relaxed);
                        let low = self.window_read(index - 1);
                        self.write_entry(entry, low, value);
                    }
                    Some((entry, false)) => {
                        let high = self.guest_destination[entry].load(Ordering::Relaxed);
                        self.write_entry(entry, value, high);
                    }
                    None => self.window_write(index, value),
                }
                self.select(index);
            }
            // SAFETY: other registers are the guest's own; forwarded.
            other => unsafe { self.register(other).write_volatile(value) },
        }
    }
}

/// The redirection entry a register index addresses, and whether it is the high half.
fn redirection(index: u32) -> Option<(usize, bool)> {
    let n = index.checked_sub(FIRST_REDIRECTION)? as usize;
    (n / 2 < MAX_ENTRIES).then_some((n / 2, n % 2 == 1))
}

impl IoApicGuard {
    /// How many redirection entries this I/O APIC has (version register, bits 23:16), as
    /// many as Ally shadows at most.
    fn entries(&self) -> usize {
        (((self.window_read(1) >> 16) & 0xFF) as usize + 1).min(MAX_ENTRIES)
    }

    /// The guest reset: every redirection entry goes back to what the firmware left (the
    /// destination filtered as always), as after the reset and POST it would find.
    pub fn restore_firmware_entries(&self) {
        for entry in 0..self.entries() {
            let (low, high) = &self.firmware_entries[entry];
            let (low, high) = (low.load(Ordering::Relaxed), high.load(Ordering::Relaxed));
            self.guest_destination[entry].store(high, Ordering::Relaxed);
            self.write_entry(entry, low, high);
        }
        self.selected.store(0, Ordering::Relaxed);
        self.select(0);
    }
}

/// Reads the entries the firmware left, so the guest reads their destinations back unchanged
/// and a guest reset can restore them.
pub fn adopt_firmware_destinations(guard: &IoApicGuard) {
    for entry in 0..guard.entries() {
        let index = FIRST_REDIRECTION + 2 * entry as u32;
        let (low, high) = (guard.window_read(index), guard.window_read(index + 1));
        guard.guest_destination[entry].store(high, Ordering::Relaxed);
        guard.firmware_entries[entry]
            .0
            .store(low, Ordering::Relaxed);
        guard.firmware_entries[entry]
            .1
            .store(high, Ordering::Relaxed);
    }
}
