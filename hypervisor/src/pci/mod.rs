//! PCI configuration space: finding the NIC Ally claims, and guarding that function's
//! configuration registers against the guest.
//!
//! The guest keeps its own PCI enumeration (it reads every function's configuration space as
//! usual), but for the claimed function Ally filters what the guest may change:
//!
//! * **BARs** (PCI Local Bus 3.0, 6.2.5.1): the device's register BAR never moves, so Ally's
//!   DPI core always reaches it. The guest sees a shadow: a sizing probe (all ones in the
//!   address bits) reads back the size mask, and a new address is a *move* that Ally follows
//!   by remapping the guest-physical range onto the device in the EPT, traps included
//!   ([`ConfigWrite::MoveBar`]); the guest cannot aim the registers somewhere the traps are
//!   not. A move of the I/O BAR or of a 64-bit BAR is refused and counted.
//! * **Command register** (6.2.2): the guest's Memory Space and Bus Master bits are shadowed;
//!   the device keeps both on, because the DPI core drives it whatever the guest's driver
//!   state (Ally's rings live in DPI memory). Other bits pass through.
//!
//! The logic here is hardware-independent ([`ConfigSpace`] is port I/O on Ally, a fake in the
//! tests); `arch::vmx::exits` feeds it the guest's 0xCF8/0xCFC accesses. [`msi`] guards the
//! MSI and MSI-X capabilities of every other function.

pub mod ahci;
pub mod latch;
pub mod msi;

use crate::cmdline::PciAddress;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// Type-1 configuration address (port 0xCF8, PCI Local Bus 3.0 3.2.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigAddress(pub u32);

impl ConfigAddress {
    pub const PORT: u16 = 0xCF8;
    pub const DATA_PORT: u16 = 0xCFC;
    const ENABLE: u32 = 1 << 31;

    pub fn new(function: PciAddress, register: u8) -> Self {
        Self(
            Self::ENABLE
                | (u32::from(function.bus) << 16)
                | (u32::from(function.device & 0x1F) << 11)
                | (u32::from(function.function & 7) << 8)
                | u32::from(register & 0xFC),
        )
    }

    /// Whether a data-port access is a configuration cycle.
    pub fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }

    pub fn function(self) -> PciAddress {
        PciAddress {
            bus: (self.0 >> 16) as u8,
            device: ((self.0 >> 11) & 0x1F) as u8,
            function: ((self.0 >> 8) & 7) as u8,
        }
    }

    /// The dword-aligned register offset.
    pub fn register(self) -> u8 {
        (self.0 & 0xFC) as u8
    }
}

/// Dword access to configuration space.
pub trait ConfigSpace {
    fn read32(&self, function: PciAddress, register: u8) -> u32;
    fn write32(&self, function: PciAddress, register: u8, value: u32);
}

pub const REG_ID: u8 = 0x00;
pub const REG_COMMAND: u8 = 0x04;
pub const REG_CLASS: u8 = 0x08;
pub const REG_HEADER_TYPE: u8 = 0x0C;
pub const REG_BAR0: u8 = 0x10;
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// One base address register as the firmware left it (6.2.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bar {
    #[default]
    Unused,
    /// A memory BAR; a 64-bit one also owns the next BAR slot (`Upper`).
    Memory {
        base: u64,
        size: u64,
        wide: bool,
    },
    /// The upper half of the 64-bit memory BAR before it.
    Upper,
    Io {
        base: u16,
        size: u16,
    },
}

impl Bar {
    /// Mask of the address bits the BAR implements, as the low dword reads during sizing.
    fn sizing_value(self, original_low: u32) -> u32 {
        match self {
            Bar::Memory { size, .. } => (!(size as u32 - 1) & !0xF) | (original_low & 0xF),
            Bar::Io { size, .. } => (!(u32::from(size) - 1) & !0x3) | (original_low & 0x3),
            Bar::Upper | Bar::Unused => 0,
        }
    }
}

/// A function found on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundFunction {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
}

/// The function at `address`, if one answers (vendor ID not all ones, PCI Local Bus 3.0
/// 6.2.1).
fn present(cs: &impl ConfigSpace, address: PciAddress) -> Option<FoundFunction> {
    let id = cs.read32(address, REG_ID);
    let (vendor, device) = (id as u16, (id >> 16) as u16);
    (vendor != 0xFFFF).then_some(FoundFunction {
        address,
        vendor,
        device,
    })
}

/// Every function on every bus, in bus:device.function order. Functions 1-7 are probed only
/// where function 0 exists and sets the multi-function bit (header type bit 7, 6.2.1).
pub fn functions(cs: &impl ConfigSpace) -> impl Iterator<Item = FoundFunction> + '_ {
    (0..=255u8)
        .flat_map(|bus| (0..32u8).map(move |device| (bus, device)))
        .flat_map(move |(bus, device)| {
            let first = PciAddress {
                bus,
                device,
                function: 0,
            };
            present(cs, first).into_iter().flat_map(move |f0| {
                let multi = cs.read32(first, REG_HEADER_TYPE) & (0x80 << 16) != 0;
                let others = if multi { 1..8 } else { 1..1 };
                core::iter::once(f0).chain(
                    others
                        .filter_map(move |function| present(cs, PciAddress { function, ..first })),
                )
            })
        })
}

/// Finds the first function whose vendor:device is in `ids` (or checks the given address),
/// scanning every bus, device and function.
pub fn find_function(
    cs: &impl ConfigSpace,
    ids: &[(u16, u16)],
    at: Option<PciAddress>,
) -> Result<FoundFunction, PciError> {
    if let Some(address) = at {
        let found = present(cs, address).ok_or(PciError::NoDevice(address))?;
        return if ids.contains(&(found.vendor, found.device)) {
            Ok(found)
        } else {
            Err(PciError::Unsupported(found))
        };
    }
    functions(cs)
        .find(|f| ids.contains(&(f.vendor, f.device)))
        .ok_or(PciError::NotFound)
}

/// Sizes the six BARs of a type-0 header (6.2.5.1: write all ones, read back, restore), with
/// memory and I/O decoding off meanwhile. Only before the guest runs.
pub fn probe_bars(cs: &impl ConfigSpace, function: PciAddress) -> [Bar; 6] {
    let command = cs.read32(function, REG_COMMAND);
    cs.write32(
        function,
        REG_COMMAND,
        command & !u32::from(COMMAND_IO | COMMAND_MEMORY),
    );
    let mut bars = [Bar::Unused; 6];
    let mut i = 0;
    while i < 6 {
        let reg = REG_BAR0 + 4 * i as u8;
        let original = cs.read32(function, reg);
        cs.write32(function, reg, u32::MAX);
        let mask = cs.read32(function, reg);
        cs.write32(function, reg, original);
        if mask == 0 {
            i += 1;
            continue;
        }
        if original & 1 == 1 {
            let size = (!(mask & !0x3) as u16).wrapping_add(1);
            bars[i] = Bar::Io {
                base: (original & !0x3) as u16,
                size,
            };
        } else {
            let wide = (original >> 1) & 3 == 2 && i < 5;
            let (mut base, mut size_mask) = (u64::from(original & !0xF), u64::from(mask & !0xF));
            if wide {
                let upper_reg = reg + 4;
                let upper = cs.read32(function, upper_reg);
                cs.write32(function, upper_reg, u32::MAX);
                let upper_mask = cs.read32(function, upper_reg);
                cs.write32(function, upper_reg, upper);
                base |= u64::from(upper) << 32;
                size_mask |= u64::from(upper_mask) << 32;
            } else {
                size_mask |= 0xFFFF_FFFF_0000_0000;
            }
            bars[i] = Bar::Memory {
                base,
                size: (!size_mask).wrapping_add(1),
                wide,
            };
            if wide {
                bars[i + 1] = Bar::Upper;
                i += 1;
            }
        }
        i += 1;
    }
    cs.write32(function, REG_COMMAND, command);
    bars
}

/// Why the NIC could not be claimed (operator-facing: the `nic=` option or the machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciError {
    /// No supported NIC on any bus.
    NotFound,
    /// `nic=` names an address where no function answers.
    NoDevice(PciAddress),
    /// `nic=` names a function that is not a supported NIC.
    Unsupported(FoundFunction),
    /// The function has no memory BAR 0 of the expected size.
    NoRegisterBar {
        address: PciAddress,
        bar: Bar,
        expected: u64,
    },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => {
                f.write_str("no supported NIC (Intel 82540EM 8086:100e) on any PCI bus")
            }
            Self::NoDevice(a) => write!(f, "option \"nic\": no PCI function at {a}"),
            Self::Unsupported(found) => write!(
                f,
                "option \"nic\": {} is {:04x}:{:04x}, not a supported NIC (8086:100e)",
                found.address, found.vendor, found.device
            ),
            Self::NoRegisterBar {
                address,
                bar,
                expected,
            } => write!(
                f,
                "NIC {address}: BAR0 is {bar:?}, expected a memory BAR of {expected:#x} bytes"
            ),
        }
    }
}

/// Guest configuration writes to the claimed function that Ally refused, and sizing probes.
#[derive(Debug, Default)]
pub struct ConfigCounters {
    pub bar_moves_refused: AtomicU64,
    pub bar_moves: AtomicU64,
    pub bar_sizing_probes: AtomicU64,
    pub command_writes: AtomicU64,
    /// PMCSR writes asking for a state other than D0 (the device stayed in D0).
    pub power_states_refused: AtomicU64,
}

/// PMCSR PowerState, bits 1:0 (PCI PM 1.2, 3.2.4).
const POWER_STATE: u32 = 0x3;
const D3HOT: u8 = 3;
/// PMCSR No_Soft_Reset: D3hot -> D0 keeps the registers (3.2.4).
const NO_SOFT_RESET: u32 = 1 << 3;
/// PMC D1_Support and D2_Support (3.2.3), in the capability's first dword.
const PMC_D1: u32 = 1 << (16 + 9);
const PMC_D2: u32 = 1 << (16 + 10);

/// What a guest write to the claimed function becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWrite {
    /// Write this (possibly rewritten) value at the guest's offset and width.
    Forward(u32),
    /// Absorbed by the shadow (a sizing probe or its end): nothing reaches the device.
    Absorbed,
    /// Refused: the guest tried to move a BAR Ally does not follow. Nothing reaches the
    /// device.
    RefusedBarMove { bar: usize, value: u32 },
    /// The guest moves a 32-bit memory BAR from `from` to `to`: the caller remaps and then
    /// calls [`GuardedFunction::commit_move`] (or refuses). Nothing reaches the device.
    MoveBar { bar: usize, from: u64, to: u64 },
    /// Write this value (the device stays in D0), then reset the function's registers as the
    /// guest sees them: its D3hot -> D0 transition (PCI PM 1.2, 5.4.1).
    ForwardAndReset(u32),
}

/// The guest's view of the claimed function's configuration registers.
pub struct GuardedFunction {
    pub address: PciAddress,
    pub bars: [Bar; 6],
    /// The BARs' low dwords as the firmware programmed them.
    original: [u32; 6],
    /// Per BAR: the guest's last write was a sizing probe (reads return the size mask).
    sizing: spin::Mutex<[bool; 6]>,
    /// The guest's Memory Space and Bus Master bits.
    guest_command: spin::Mutex<u16>,
    /// Where the guest has placed each memory BAR (the device keeps the firmware's).
    guest_bases: spin::Mutex<[u64; 6]>,
    /// The power management capability: PMCSR's offset and the states PMC supports.
    power: Option<PowerManagement>,
    /// The guest's PowerState (the device's stays D0).
    guest_power_state: spin::Mutex<u8>,
    pub counters: ConfigCounters,
}

#[derive(Debug, Clone, Copy)]
struct PowerManagement {
    pmcsr: u8,
    /// Bit n: Dn is supported (D0 and D3hot always are).
    states: u8,
}

impl GuardedFunction {
    /// Takes the function as the firmware left it (`original` = the BARs' raw low dwords,
    /// `command` = the command register).
    pub fn new(address: PciAddress, bars: [Bar; 6], original: [u32; 6], command: u16) -> Self {
        Self {
            address,
            bars,
            original,
            sizing: spin::Mutex::new([false; 6]),
            guest_command: spin::Mutex::new(command & (COMMAND_MEMORY | COMMAND_BUS_MASTER)),
            guest_bases: spin::Mutex::new(bars.map(|bar| match bar {
                Bar::Memory { base, .. } => base,
                _ => 0,
            })),
            power: None,
            guest_power_state: spin::Mutex::new(0),
            counters: ConfigCounters::default(),
        }
    }

    /// Guards the power management capability at `offset` (whose first dword, holding PMC,
    /// is `pmc_dword`): see the module documentation.
    pub fn with_power_management(mut self, offset: u8, pmc_dword: u32) -> Self {
        let mut states = 1 | (1 << D3HOT);
        if pmc_dword & PMC_D1 != 0 {
            states |= 1 << 1;
        }
        if pmc_dword & PMC_D2 != 0 {
            states |= 1 << 2;
        }
        self.power = offset
            .checked_add(4)
            .map(|pmcsr| PowerManagement { pmcsr, states });
        self
    }

    /// The power state the guest last set (the device is in D0).
    pub fn guest_power_state(&self) -> u8 {
        *self.guest_power_state.lock()
    }

    /// The guest reset the platform: its view returns to D0 with the rest of the function.
    pub fn reset_power_state(&self) {
        *self.guest_power_state.lock() = 0;
    }

    /// The command register value Ally keeps in the device.
    pub fn device_command(guest_value: u16) -> u16 {
        guest_value | COMMAND_MEMORY | COMMAND_BUS_MASTER
    }

    /// Whether the guest's driver has bus mastering on (the DPI core only touches guest
    /// memory when it has).
    pub fn guest_bus_master(&self) -> bool {
        *self.guest_command.lock() & COMMAND_BUS_MASTER != 0
    }

    /// Where the guest sees memory BAR `bar`.
    pub fn guest_base(&self, bar: usize) -> u64 {
        self.guest_bases.lock()[bar]
    }

    /// The guest's move of BAR `bar` to `to` is done (the caller remapped it).
    pub fn commit_move(&self, bar: usize, to: u64) {
        self.guest_bases.lock()[bar] = to;
        self.counters.bar_moves.fetch_add(1, Ordering::Relaxed);
    }

    /// The caller refused the move.
    pub fn refuse_move(&self) {
        self.counters
            .bar_moves_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    fn bar_index(register: u8) -> Option<usize> {
        (REG_BAR0..REG_BAR0 + 24)
            .contains(&register)
            .then(|| usize::from((register - REG_BAR0) / 4))
    }

    /// A guest read of `size` bytes at `offset` (any alignment within a dword), given the
    /// device's dword at that register.
    pub fn read(&self, offset: u8, size: u8, device_dword: u32) -> u32 {
        let register = offset & 0xFC;
        let mut dword = device_dword;
        if let Some(i) = Self::bar_index(register) {
            if self.sizing.lock()[i] {
                dword = match self.bars[i] {
                    Bar::Upper => match self.bars[i - 1] {
                        Bar::Memory { size, .. } => (!(size - 1) >> 32) as u32,
                        _ => 0,
                    },
                    bar => bar.sizing_value(self.original[i]),
                };
            } else if let Bar::Memory { wide: false, .. } = self.bars[i] {
                dword = (self.guest_base(i) as u32 & !0xF) | (self.original[i] & 0xF);
            }
        } else if register == REG_COMMAND {
            let guest = *self.guest_command.lock();
            let shadowed = u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER);
            dword = (dword & !shadowed) | u32::from(guest);
        } else if self.power.is_some_and(|pm| pm.pmcsr == register) {
            dword = (dword & !POWER_STATE) | u32::from(self.guest_power_state());
        }
        extract(dword, offset, size)
    }

    /// A guest write of `size` bytes at `offset`, given the device's current dword there (for
    /// partial writes to a BAR).
    pub fn write(&self, offset: u8, size: u8, value: u32, device_dword: u32) -> ConfigWrite {
        let register = offset & 0xFC;
        if let Some(i) = Self::bar_index(register) {
            if self.bars[i] == Bar::Unused {
                return ConfigWrite::Forward(value);
            }
            // Partial writes merge into the dword the guest sees (its own BAR address).
            let merged = insert(self.read(register, 4, device_dword), offset, size, value);
            return self.write_bar(i, merged);
        }
        if register == REG_COMMAND && offset < REG_COMMAND + 2 {
            self.counters.command_writes.fetch_add(1, Ordering::Relaxed);
            // Only the command word's bytes that this write covers.
            let command = insert(device_dword, offset, size, value) as u16;
            *self.guest_command.lock() = command & (COMMAND_MEMORY | COMMAND_BUS_MASTER);
            let rewritten = u32::from(Self::device_command(command));
            return ConfigWrite::Forward(extract(rewritten, offset, size.min(2 - (offset & 1))));
        }
        if let Some(pm) = self.power.filter(|pm| pm.pmcsr == offset) {
            // A write covering PMCSR's first byte sets PowerState (bits 1:0 of `value`).
            return self.write_power_state(pm, value, device_dword);
        }
        ConfigWrite::Forward(value)
    }

    fn write_power_state(&self, pm: PowerManagement, value: u32, device_dword: u32) -> ConfigWrite {
        let requested = (value & POWER_STATE) as u8;
        let device = value & !POWER_STATE;
        if requested != 0 {
            self.counters
                .power_states_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        // An unsupported state is discarded, the state unchanged (PCI PM 1.2, 3.2.4).
        if pm.states & (1 << requested) == 0 {
            return ConfigWrite::Forward(device);
        }
        let previous = core::mem::replace(&mut *self.guest_power_state.lock(), requested);
        if previous == D3HOT && requested == 0 && device_dword & NO_SOFT_RESET == 0 {
            ConfigWrite::ForwardAndReset(device)
        } else {
            ConfigWrite::Forward(device)
        }
    }

    fn write_bar(&self, i: usize, merged: u32) -> ConfigWrite {
        let (probe, restore) = match self.bars[i] {
            Bar::Memory { size, .. } => {
                let mask = !(size as u32).wrapping_sub(1) & !0xF;
                let base = self.guest_base(i) as u32;
                (merged & mask == mask, merged & mask == base & mask)
            }
            Bar::Io { base, size } => {
                let mask = !(u32::from(size) - 1) & 0xFFFF_FFFC;
                (
                    merged & mask == mask,
                    merged & mask == u32::from(base) & mask,
                )
            }
            Bar::Upper => match self.bars[i - 1] {
                Bar::Memory { base, size, .. } => {
                    let mask = (!(size - 1) >> 32) as u32;
                    (
                        mask != 0 && merged & mask == mask,
                        merged == (base >> 32) as u32,
                    )
                }
                _ => (false, false),
            },
            Bar::Unused => (false, false),
        };
        let mut sizing = self.sizing.lock();
        if probe && !restore {
            self.counters
                .bar_sizing_probes
                .fetch_add(1, Ordering::Relaxed);
            sizing[i] = true;
            return ConfigWrite::Absorbed;
        }
        sizing[i] = false;
        if restore {
            return ConfigWrite::Absorbed;
        }
        match self.bars[i] {
            Bar::Memory {
                size, wide: false, ..
            } => ConfigWrite::MoveBar {
                bar: i,
                from: self.guest_base(i),
                to: u64::from(merged & !(size as u32).wrapping_sub(1) & !0xF),
            },
            _ => {
                self.refuse_move();
                ConfigWrite::RefusedBarMove {
                    bar: i,
                    value: merged,
                }
            }
        }
    }
}

/// `size` bytes of `dword` starting at byte `offset & 3`.
fn extract(dword: u32, offset: u8, size: u8) -> u32 {
    let shift = 8 * u32::from(offset & 3);
    let v = dword >> shift;
    match size {
        1 => v & 0xFF,
        2 => v & 0xFFFF,
        _ => v,
    }
}

/// `dword` with `size` bytes of `value` stored at byte `offset & 3`.
fn insert(dword: u32, offset: u8, size: u8, value: u32) -> u32 {
    let shift = 8 * u32::from(offset & 3);
    let mask: u32 = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => u32::MAX,
    } << shift;
    (dword & !mask) | ((value << shift) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use std::collections::HashMap;

    /// Configuration space of fake functions, with BAR size masks applied on write.
    #[derive(Default)]
    pub(super) struct FakeBus {
        pub(super) regs: RefCell<HashMap<(PciAddress, u8), u32>>,
        masks: HashMap<(PciAddress, u8), u32>,
    }

    impl FakeBus {
        fn add_e1000(&mut self, at: PciAddress) {
            let mut regs = self.regs.borrow_mut();
            regs.insert((at, REG_ID), 0x100E_8086);
            regs.insert((at, REG_COMMAND), 0x0000_0007);
            regs.insert((at, REG_BAR0), 0xFEBC_0000);
            regs.insert((at, REG_BAR0 + 4), 0xC001);
            drop(regs);
            self.masks.insert((at, REG_BAR0), 0xFFFE_0000);
            self.masks.insert((at, REG_BAR0 + 4), 0xFFFF_FFC1);
        }
    }

    impl ConfigSpace for FakeBus {
        fn read32(&self, f: PciAddress, reg: u8) -> u32 {
            *self
                .regs
                .borrow()
                .get(&(f, reg))
                .unwrap_or(&if reg == REG_ID { u32::MAX } else { 0 })
        }
        fn write32(&self, f: PciAddress, reg: u8, value: u32) {
            let v = match self.masks.get(&(f, reg)) {
                Some(mask) => (value & mask) | (self.read32(f, reg) & !mask & 0xF),
                // An unimplemented BAR is hardwired to zero.
                None if (REG_BAR0..REG_BAR0 + 24).contains(&reg) => return,
                None => value,
            };
            self.regs.borrow_mut().insert((f, reg), v);
        }
    }

    const AT: PciAddress = PciAddress {
        bus: 0,
        device: 3,
        function: 0,
    };
    const E1000: &[(u16, u16)] = &[(0x8086, 0x100E)];

    fn guarded() -> (FakeBus, GuardedFunction) {
        let mut bus = FakeBus::default();
        bus.add_e1000(AT);
        let bars = probe_bars(&bus, AT);
        let original = core::array::from_fn(|i| bus.read32(AT, REG_BAR0 + 4 * i as u8));
        let f = GuardedFunction::new(AT, bars, original, 7);
        (bus, f)
    }

    #[test]
    fn finds_the_nic_and_sizes_its_bars() {
        let mut bus = FakeBus::default();
        bus.add_e1000(AT);
        let found = find_function(&bus, E1000, None).unwrap();
        assert_eq!(found.address, AT);
        let bars = probe_bars(&bus, AT);
        assert_eq!(
            bars[0],
            Bar::Memory {
                base: 0xFEBC_0000,
                size: 0x2_0000,
                wide: false
            }
        );
        assert_eq!(
            bars[1],
            Bar::Io {
                base: 0xC000,
                size: 0x40
            }
        );
        assert_eq!(bars[2], Bar::Unused);
        // Probing restored the BARs and the command register.
        assert_eq!(bus.read32(AT, REG_BAR0), 0xFEBC_0000);
        assert_eq!(bus.read32(AT, REG_COMMAND), 7);
    }

    #[test]
    fn enumeration_follows_the_multi_function_bit() {
        let mut bus = FakeBus::default();
        let at = |bus, device, function| PciAddress {
            bus,
            device,
            function,
        };
        let mut regs = bus.regs.borrow_mut();
        // 00:01: multi-function, functions 0 and 2 present.
        regs.insert((at(0, 1, 0), REG_ID), 0x7000_8086);
        regs.insert((at(0, 1, 0), REG_HEADER_TYPE), 0x0080_0000);
        regs.insert((at(0, 1, 2), REG_ID), 0x7010_8086);
        // 00:02: single-function; its function 1 answers but must not be seen.
        regs.insert((at(0, 2, 0), REG_ID), 0x1111_1234);
        regs.insert((at(0, 2, 1), REG_ID), 0x2222_1234);
        // 00:03: no function 0, so function 1 is not probed either.
        regs.insert((at(0, 3, 1), REG_ID), 0x3333_1234);
        regs.insert((at(5, 31, 0), REG_ID), 0x4444_1234);
        drop(regs);
        bus.add_e1000(at(2, 0, 0));
        let found: Vec<PciAddress> = functions(&bus).map(|f| f.address).collect();
        assert_eq!(
            found,
            [
                at(0, 1, 0),
                at(0, 1, 2),
                at(0, 2, 0),
                at(2, 0, 0),
                at(5, 31, 0)
            ]
        );
        let e1000 = find_function(&bus, E1000, None).unwrap();
        assert_eq!(e1000.address, at(2, 0, 0));
    }

    #[test]
    fn nic_option_errors_name_the_function() {
        let mut bus = FakeBus::default();
        bus.add_e1000(AT);
        let nothing = PciAddress {
            bus: 0,
            device: 9,
            function: 0,
        };
        let e = find_function(&bus, E1000, Some(nothing)).unwrap_err();
        assert_eq!(e.to_string(), "option \"nic\": no PCI function at 00:09.0");
        let e = find_function(&FakeBus::default(), E1000, None).unwrap_err();
        assert!(e.to_string().contains("no supported NIC"));
        bus.regs.borrow_mut().insert((nothing, REG_ID), 0x1234_8086);
        let e = find_function(&bus, E1000, Some(nothing)).unwrap_err();
        assert!(
            e.to_string().contains("8086:1234, not a supported NIC"),
            "{e}"
        );
    }

    #[test]
    fn sizing_probe_is_answered_from_the_shadow_and_never_moves_the_bar() {
        let (_, f) = guarded();
        let real = 0xFEBC_0000;
        assert_eq!(f.write(REG_BAR0, 4, u32::MAX, real), ConfigWrite::Absorbed);
        assert_eq!(f.read(REG_BAR0, 4, real), 0xFFFE_0000);
        assert_eq!(f.write(REG_BAR0, 4, real, real), ConfigWrite::Absorbed);
        assert_eq!(f.read(REG_BAR0, 4, real), real);
        // The I/O BAR too, with its type bit.
        assert_eq!(f.write(0x14, 4, u32::MAX, 0xC001), ConfigWrite::Absorbed);
        assert_eq!(f.read(0x14, 4, 0xC001), 0xFFFF_FFC1);
        assert_eq!(f.counters.bar_sizing_probes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn moving_the_memory_bar_is_followed_and_the_io_bar_refused() {
        let (_, f) = guarded();
        let real = 0xFEBC_0000;
        assert_eq!(
            f.write(REG_BAR0, 4, 0x4000_0000, real),
            ConfigWrite::MoveBar {
                bar: 0,
                from: 0xFEBC_0000,
                to: 0x4000_0000
            }
        );
        // Until the caller commits, the guest still sees the old address.
        assert_eq!(f.read(REG_BAR0, 4, real), real);
        f.commit_move(0, 0x4000_0000);
        assert_eq!(f.read(REG_BAR0, 4, real), 0x4000_0000);
        assert_eq!(f.guest_base(0), 0x4000_0000);
        // Sizing and restoring now work against the new address.
        assert_eq!(f.write(REG_BAR0, 4, u32::MAX, real), ConfigWrite::Absorbed);
        assert_eq!(f.read(REG_BAR0, 4, real), 0xFFFE_0000);
        assert_eq!(
            f.write(REG_BAR0, 4, 0x4000_0000, real),
            ConfigWrite::Absorbed
        );
        assert_eq!(f.read(REG_BAR0, 4, real), 0x4000_0000);
        // A byte write that changes the address is a move too.
        assert!(matches!(
            f.write(REG_BAR0 + 3, 1, 0x12, real),
            ConfigWrite::MoveBar {
                bar: 0,
                to: 0x1200_0000,
                from: 0x4000_0000
            }
        ));
        assert!(matches!(
            f.write(0x14, 4, 0xD001, 0xC001),
            ConfigWrite::RefusedBarMove { bar: 1, .. }
        ));
        assert_eq!(f.counters.bar_moves_refused.load(Ordering::Relaxed), 1);
        assert_eq!(f.counters.bar_moves.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn command_register_keeps_memory_and_bus_master_on() {
        let (_, f) = guarded();
        // The guest turns decoding and bus mastering off (pci_disable_device).
        assert_eq!(
            f.write(REG_COMMAND, 2, 0x0400, 0x0010_0007),
            ConfigWrite::Forward(0x0406)
        );
        assert!(!f.guest_bus_master());
        // It reads back what it wrote; the device still has MEM|BM.
        assert_eq!(f.read(REG_COMMAND, 2, 0x0010_0406), 0x0400);
        // The status word is not touched by a dword read.
        assert_eq!(f.read(REG_COMMAND, 4, 0x0010_0406), 0x0010_0400);
        assert_eq!(
            f.write(REG_COMMAND, 1, 0x07, 0x0010_0406),
            ConfigWrite::Forward(0x07)
        );
        assert!(f.guest_bus_master());
        // Other registers pass through.
        assert_eq!(f.write(0x3C, 1, 0x0B, 0), ConfigWrite::Forward(0x0B));
        assert_eq!(f.read(0x3C, 1, 0x0000_010B), 0x0B);
    }

    /// The 82540EM's PM capability: at 0xDC, PMC without D1/D2 (SDM 4.1.x), PMCSR at 0xE0.
    const PM_CAP: u8 = 0xDC;
    const PMCSR: u8 = 0xE0;

    #[test]
    fn the_device_stays_in_d0_and_the_guest_sees_its_own_power_state() {
        let (_, f) = guarded();
        let f = f.with_power_management(PM_CAP, 0x0022_0001);
        // Linux's pci_set_power_state(D3hot) at suspend: a word write.
        assert_eq!(
            f.write(PMCSR, 2, 0x0103, 0x0000_0100),
            ConfigWrite::Forward(0x0100)
        );
        assert_eq!(f.guest_power_state(), 3);
        assert_eq!(f.read(PMCSR, 2, 0x0000_0100), 0x0103);
        assert_eq!(f.read(PMCSR, 4, 0x0000_0100), 0x0000_0103);
        // Back to D0: the guest's registers reset (No_Soft_Reset clear).
        assert_eq!(
            f.write(PMCSR, 2, 0x0000, 0x0000_0100),
            ConfigWrite::ForwardAndReset(0x0000)
        );
        assert_eq!(f.read(PMCSR, 1, 0), 0);
        // D0 -> D0 is no reset; with No_Soft_Reset set D3hot -> D0 is none either.
        assert_eq!(f.write(PMCSR, 4, 0, 0), ConfigWrite::Forward(0));
        f.write(PMCSR, 1, 3, 0);
        assert_eq!(f.write(PMCSR, 1, 0, 0x8), ConfigWrite::Forward(0));
        // D1 is not supported by this PMC: discarded, the guest's state unchanged.
        assert_eq!(f.write(PMCSR, 1, 1, 0), ConfigWrite::Forward(0));
        assert_eq!(f.guest_power_state(), 0);
        // Writes to PMCSR's other bytes (PME_En, Data_Select) pass through.
        assert_eq!(f.write(PMCSR + 1, 1, 0x81, 0), ConfigWrite::Forward(0x81));
        assert_eq!(f.counters.power_states_refused.load(Ordering::Relaxed), 3);
        // A function without the capability has no PMCSR to guard.
        let (_, plain) = guarded();
        assert_eq!(plain.write(PMCSR, 1, 3, 0), ConfigWrite::Forward(3));
        // D1 where PMC supports it is shadowed too.
        let (_, d1) = guarded();
        let d1 = d1.with_power_management(PM_CAP, 0x0222_0001);
        assert_eq!(d1.write(PMCSR, 1, 1, 0), ConfigWrite::Forward(0));
        assert_eq!(d1.guest_power_state(), 1);
    }

    #[test]
    fn sixty_four_bit_bars() {
        let mut bus = FakeBus::default();
        let at = AT;
        bus.regs.borrow_mut().insert((at, REG_ID), 0x100E_8086);
        bus.regs.borrow_mut().insert((at, REG_BAR0), 0xFEBC_0004);
        bus.regs.borrow_mut().insert((at, REG_BAR0 + 4), 0x1);
        bus.masks.insert((at, REG_BAR0), 0xFFFE_0000);
        bus.masks.insert((at, REG_BAR0 + 4), u32::MAX);
        let bars = probe_bars(&bus, at);
        assert_eq!(
            bars[0],
            Bar::Memory {
                base: 0x1_FEBC_0000,
                size: 0x2_0000,
                wide: true
            }
        );
        assert_eq!(bars[1], Bar::Upper);
        let original = core::array::from_fn(|i| bus.read32(at, REG_BAR0 + 4 * i as u8));
        let f = GuardedFunction::new(at, bars, original, 7);
        assert_eq!(f.write(0x14, 4, u32::MAX, 1), ConfigWrite::Absorbed);
        assert_eq!(f.read(0x14, 4, 1), u32::MAX);
        assert_eq!(f.write(0x14, 4, 1, 1), ConfigWrite::Absorbed);
        assert!(matches!(
            f.write(0x14, 4, 2, 1),
            ConfigWrite::RefusedBarMove { bar: 1, .. }
        ));
    }
}
