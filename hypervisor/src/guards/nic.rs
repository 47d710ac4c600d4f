//! The claimed NIC as the guest reaches it. Three doors lead to its registers, and Ally
//! guards each:
//!
//! - **BAR0 (MMIO)**: the pages holding the queue and interrupt registers, and those holding
//!   registers Ally must filter or refuse (packet buffer, its FIFOs, flow control, EEPROM),
//!   are absent from the EPT; each access exits, is decoded (`guest::emulate_mmio`) and handed
//!   to the DPI partition's [`TrappedRegisters`] (shadow, filter, forward or refuse). The
//!   pages proven harmless stay mapped to the device, so that traffic costs no exit.
//! - **The I/O BAR** (IOADDR at +0, IODATA at +4; 8254x SDM 13.1.x): intercepted in the I/O
//!   bitmap and emulated through the same register path, so no register is reachable around
//!   the MMIO traps.
//! - **PCI configuration space** (ports 0xCF8/0xCFC, dispatched by `guards::pci_config`): accesses to
//!   the claimed function go through [`crate::pci::GuardedFunction`]. When the guest moves BAR0, Ally follows: the
//!   device stays where it is, and the EPT maps the new guest-physical range onto it with the
//!   same pages trapped (after checking the new range is device space, not RAM, Ally's memory
//!   or the APIC). The guest cannot turn off the decoding and bus mastering the DPI core needs.
//!
//! Register accesses must be aligned dwords, as the 8254x defines them (SDM 13: "all registers
//! are 32 bits"); anything else is refused, counted, reads return all ones.

use crate::addr::{GuestPhysAddr, PhysRange};
use crate::arch::instructions;
use crate::guest::{AccessWidth, MmioHandler};
use crate::log_limit;
use crate::pci::{ConfigAddress, ConfigWrite, GuardedFunction};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The DPI partition's side of the trapped registers (shadow register file, exit counters).
pub trait TrappedRegisters: Sync {
    /// The guest reads the dword register at `offset` in BAR0.
    fn read(&self, offset: u32) -> u32;
    /// The same read, emulated in the exit of the write before it (counted apart: it cost
    /// no exit).
    fn fused_read(&self, offset: u32) -> u32;
    /// The guest writes the dword register at `offset` in BAR0.
    fn write(&self, offset: u32, value: u32);
    /// Whether the register at `offset` lies on a page absent from the EPT (otherwise the
    /// guest reaches the device directly and Ally forwards I/O BAR accesses there at the same
    /// width).
    fn is_trapped(&self, offset: u32) -> bool;
    /// `KEY=N` for each class of register access refused, for the power-off report.
    fn write_refusals(&self, _out: &mut dyn core::fmt::Write) -> core::fmt::Result {
        Ok(())
    }
    /// The guest reset the platform: the device resets as a PCI reset would reset it,
    /// which to the guest is its CTRL.RST (8254x SDM 13.4.1: the registers it sees return to
    /// their defaults and its rings are abandoned).
    fn platform_reset(&self);
}

/// Everything the exit handlers know about the claimed NIC.
pub struct NicTrap {
    pub function: GuardedFunction,
    /// BAR0, where the device decodes its registers (never moved: see `pci`).
    pub registers_bar: PhysRange,
    /// The I/O BAR's ports, if the function has one.
    pub io_ports: Option<core::ops::Range<u16>>,
    pub registers: &'static dyn TrappedRegisters,
    /// Moves the guest-physical window of BAR0 in the EPT (from, to): Ally's page-table
    /// owner does it, with the same pages trapped.
    pub remap: fn(u64, u64) -> Result<(), &'static str>,
    /// Where the guest sees BAR0 (it may move it; the device does not).
    registers_gpa: AtomicU64,
    /// The guest's IOADDR (I/O BAR offset 0).
    io_address: AtomicU32,
}

impl NicTrap {
    pub fn new(
        function: GuardedFunction,
        registers_bar: PhysRange,
        io_ports: Option<core::ops::Range<u16>>,
        registers: &'static dyn TrappedRegisters,
        remap: fn(u64, u64) -> Result<(), &'static str>,
    ) -> Self {
        Self {
            function,
            registers_gpa: AtomicU64::new(registers_bar.start),
            registers_bar,
            io_ports,
            registers,
            remap,
            io_address: AtomicU32::new(0),
        }
    }

    /// BAR0's offset for a guest-physical address on one of its trapped pages.
    pub fn trapped_offset(&self, gpa: GuestPhysAddr) -> Option<u64> {
        let offset = gpa
            .0
            .wrapping_sub(self.registers_gpa.load(Ordering::Acquire));
        (offset < self.registers_bar.len() && self.registers.is_trapped(offset as u32))
            .then_some(offset)
    }

    fn register_read(&self, offset: u32) -> u32 {
        if self.registers.is_trapped(offset) {
            self.registers.read(offset)
        } else {
            // SAFETY: BAR0 is identity-mapped device memory and `offset` is an aligned dword
            // inside it (checked by the callers).
            unsafe {
                ((self.registers_bar.start + u64::from(offset)) as *const u32).read_volatile()
            }
        }
    }

    fn register_write(&self, offset: u32, value: u32) {
        if self.registers.is_trapped(offset) {
            self.registers.write(offset, value)
        } else {
            // SAFETY: as for `register_read`; untrapped registers are the guest's own.
            unsafe {
                ((self.registers_bar.start + u64::from(offset)) as *mut u32).write_volatile(value)
            }
        }
    }

    /// The guest reset the platform: the NIC's registers as the guest sees them reset (the
    /// real device keeps Ally's rings and its link), and the IOADDR latch returns to 0.
    pub fn platform_reset(&self) {
        self.registers.platform_reset();
        self.function.reset_power_state();
        self.io_address.store(0, Ordering::Relaxed);
    }

    fn dword_offset(&self, offset: u64) -> Option<u32> {
        (offset.is_multiple_of(4) && offset < self.registers_bar.len()).then_some(offset as u32)
    }
}

/// Accesses refused (not an aligned dword), per door.
pub static REFUSED_MMIO: AtomicU64 = AtomicU64::new(0);
pub static REFUSED_IO: AtomicU64 = AtomicU64::new(0);
/// Guest configuration-space accesses to the claimed function.
pub static CONFIG_ACCESSES: AtomicU64 = AtomicU64::new(0);
/// Guest I/O BAR accesses.
pub static IO_BAR_ACCESSES: AtomicU64 = AtomicU64::new(0);

/// BAR0's trapped pages, as an MMIO handler for the EPT-violation path: the NIC and the
/// faulting address's BAR0 offset ([`NicTrap::trapped_offset`], found once by the caller).
pub struct NicMmio<'a> {
    nic: &'a NicTrap,
    offset: u64,
    /// A read emulated in the exit of an earlier access (not an exit of its own).
    fused: bool,
}

impl<'a> NicMmio<'a> {
    /// The access that exited.
    pub fn exit(nic: &'a NicTrap, offset: u64) -> Self {
        Self {
            nic,
            offset,
            fused: false,
        }
    }

    /// A read emulated in the same exit as the write before it.
    pub fn fused(nic: &'a NicTrap, offset: u64) -> Self {
        Self {
            nic,
            offset,
            fused: true,
        }
    }

    fn offset(&self) -> Option<u32> {
        self.nic.dword_offset(self.offset)
    }
}

impl MmioHandler for NicMmio<'_> {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        match self.offset() {
            Some(offset) if width == AccessWidth::Dword && self.fused => {
                u64::from(self.nic.registers.fused_read(offset))
            }
            Some(offset) if width == AccessWidth::Dword => {
                u64::from(self.nic.registers.read(offset))
            }
            _ => {
                refused(&REFUSED_MMIO, "mmio-read", gpa.0, width.bytes());
                width.mask()
            }
        }
    }

    fn write(&mut self, gpa: GuestPhysAddr, width: AccessWidth, value: u64) {
        match self.offset() {
            Some(offset) if width == AccessWidth::Dword => {
                self.nic.registers.write(offset, value as u32)
            }
            _ => refused(&REFUSED_MMIO, "mmio-write", gpa.0, width.bytes()),
        }
    }
}

fn refused(counter: &AtomicU64, what: &str, address: u64, width: u64) {
    counter.fetch_add(1, Ordering::Relaxed);
    if log_limit::NIC_REFUSED.admit() {
        log::warn!("ALLY nic-refused access={what} address={address:#x} width={width}");
    }
}

/// An intercepted port access: returns the value for an IN (`None` for an OUT), or `None`
/// when `port` is not the NIC's (the caller handles it).
pub enum PortAccess {
    NotOurs,
    Done(Option<u32>),
}

/// The guest's IN/OUT on the NIC's I/O BAR (the configuration ports are `guards::pci_config`'s).
pub fn port_access(nic: &NicTrap, port: u16, size: u8, is_in: bool, value: u32) -> PortAccess {
    match &nic.io_ports {
        Some(ports) if ports.contains(&port) => {
            PortAccess::Done(io_bar_access(nic, port - ports.start, size, is_in, value))
        }
        _ => PortAccess::NotOurs,
    }
}

/// A guest configuration access to the claimed function (from `guards::pci_config`, with the device's
/// dword at `offset` already read); returns the value of a read.
pub fn config_access(
    nic: &NicTrap,
    offset: u8,
    size: u8,
    is_in: bool,
    value: u32,
    device_dword: u32,
) -> Option<u32> {
    CONFIG_ACCESSES.fetch_add(1, Ordering::Relaxed);
    if is_in {
        return Some(nic.function.read(offset, size, device_dword));
    }
    let port = ConfigAddress::DATA_PORT + u16::from(offset & 3);
    match nic.function.write(offset, size, value, device_dword) {
        // SAFETY: the filter allowed (or rewrote) this write.
        ConfigWrite::Forward(v) => unsafe { forward(port, size, false, v) },
        ConfigWrite::Absorbed => None,
        ConfigWrite::ForwardAndReset(v) => {
            // SAFETY: as for `Forward`; the power state in it is D0.
            unsafe { forward(port, size, false, v) };
            // D3hot -> D0 resets the function's registers (PCI PM 1.2, 5.4.1): as the guest
            // sees them, not the device with Ally's rings.
            nic.platform_reset();
            None
        }
        ConfigWrite::MoveBar { bar, from, to } => {
            move_bar(nic, bar, from, to);
            None
        }
        ConfigWrite::RefusedBarMove { bar, value } => {
            if log_limit::NIC_BAR_MOVE.admit() {
                log::warn!(
                    "ALLY pci-bar-move-refused function={} bar={bar} value={value:#x}",
                    nic.function.address
                );
            }
            None
        }
    }
}

/// The guest moves memory BAR `bar` of the claimed function.
fn move_bar(nic: &NicTrap, bar: usize, from: u64, to: u64) {
    let result = if bar == 0 {
        let size = nic.registers_bar.len();
        crate::platform::platform()
            .device_range_allowed(to, size)
            .and_then(|()| (nic.remap)(from, to))
    } else {
        // Another memory BAR (e.g. the flash window): no registers Ally guards there.
        Err("only BAR0 moves are followed")
    };
    let print = log_limit::NIC_BAR_MOVE.admit();
    match result {
        Ok(()) => {
            nic.function.commit_move(bar, to);
            if bar == 0 {
                nic.registers_gpa.store(to, Ordering::Release);
            }
            if print {
                log::info!(
                    "ALLY nic-bar-moved function={} bar={bar} from={from:#x} to={to:#x}",
                    nic.function.address
                );
            }
        }
        Err(why) => {
            nic.function.refuse_move();
            if print {
                log::warn!(
                    "ALLY pci-bar-move-refused function={} bar={bar} from={from:#x} to={to:#x} reason=\"{why}\"",
                    nic.function.address
                );
            }
        }
    }
}

fn io_bar_access(nic: &NicTrap, offset: u16, size: u8, is_in: bool, value: u32) -> Option<u32> {
    IO_BAR_ACCESSES.fetch_add(1, Ordering::Relaxed);
    let ones = |size: u8| {
        if size == 4 {
            u32::MAX
        } else {
            (1 << (8 * size)) - 1
        }
    };
    if size != 4 {
        refused(&REFUSED_IO, "io", u64::from(offset), u64::from(size));
        return is_in.then(|| ones(size));
    }
    match offset {
        // IOADDR: which register IODATA reaches.
        0 if is_in => Some(nic.io_address.load(Ordering::Relaxed)),
        0 => {
            nic.io_address.store(value, Ordering::Relaxed);
            None
        }
        4 => {
            let target = u64::from(nic.io_address.load(Ordering::Relaxed));
            let Some(register) = nic.dword_offset(target) else {
                refused(&REFUSED_IO, "iodata", target, 4);
                return is_in.then_some(u32::MAX);
            };
            if is_in {
                Some(nic.register_read(register))
            } else {
                nic.register_write(register, value);
                None
            }
        }
        // Reserved offsets (SDM 13.1.x): reads float, writes are ignored.
        _ => is_in.then_some(u32::MAX),
    }
}

/// An IN (returns the value) or OUT at the guest's port and width.
///
/// # Safety
/// The port must be one the guest may access.
pub unsafe fn forward(port: u16, size: u8, is_in: bool, value: u32) -> Option<u32> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if is_in {
            Some(match size {
                1 => u32::from(instructions::inb(port)),
                2 => u32::from(instructions::inw(port)),
                _ => instructions::inl(port),
            })
        } else {
            match size {
                1 => instructions::outb(port, value as u8),
                2 => instructions::outw(port, value as u16),
                _ => instructions::outl(port, value),
            }
            None
        }
    }
}

/// Prints the guards' counters.
pub fn report(nic: &NicTrap) {
    let c = &nic.function.counters;
    log::info!(
        "ALLY nic-guard config-accesses={} bar-sizing-probes={} bar-moves={} bar-moves-refused={} command-writes={} io-bar-accesses={} refused-mmio={} refused-io={}",
        CONFIG_ACCESSES.load(Ordering::Relaxed),
        c.bar_sizing_probes.load(Ordering::Relaxed),
        c.bar_moves.load(Ordering::Relaxed),
        c.bar_moves_refused.load(Ordering::Relaxed),
        c.command_writes.load(Ordering::Relaxed),
        IO_BAR_ACCESSES.load(Ordering::Relaxed),
        REFUSED_MMIO.load(Ordering::Relaxed),
        REFUSED_IO.load(Ordering::Relaxed),
    );
    // Register accesses refused by class, then the power states the guest asked for.
    let mut refused = heapless::String::<512>::new();
    let _ = nic.registers.write_refusals(&mut refused);
    log::info!(
        "ALLY nic-refused {refused} PMCSR={}",
        c.power_states_refused.load(Ordering::Relaxed)
    );
}
