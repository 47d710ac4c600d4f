//! Message-signalled interrupts the guest programs into PCI functions: none may reach a DPI
//! core.
//!
//! An MSI is a memory write by the device: the address selects the target CPU, the data the
//! vector (PCI Local Bus 3.0 6.8; SDM Vol. 3 11.11). The guest owns every function but the
//! claimed NIC, so it could aim one at a DPI core. Ally guards the two kinds:
//!
//! * **MSI** (6.8.1): Ally shadows the Message Address, Message Upper Address and Message
//!   Data registers. The guest reads back what it wrote; the device holds the address with the
//!   destination filtered like an I/O APIC redirection entry
//!   ([`crate::ipi::filter_device_interrupt`]). An address outside the interrupt window
//!   (bits 31:20 not 0xFEE, or a non-zero upper dword) is not an interrupt but a DMA write to
//!   memory: it is refused, and the device gets the first OS core's address instead. Message
//!   Control passes through (the guest enables MSI and chooses how many vectors). With
//!   multiple messages (MME > 0) the vectors differ only in the data's low bits and share one
//!   address, so one filter covers them all.
//! * **MSI-X** (6.8.2) is hidden and kept disabled. Its table lives in a memory BAR that is
//!   mapped to the guest, which could write any address there without an exit; guarding it
//!   would take an EPT trap on every table page, following the guest's BAR moves (future
//!   work). Instead the capability is unlinked from the list the guest walks (the pointer to
//!   it reads as its own next pointer), its registers read as zero, and a write to its
//!   Message Control reaches the device with MSI-X Enable and Function Mask off. Drivers then
//!   fall back to MSI or INTx.
//!
//! With interrupt remapping on (`crate::iommu::interrupts`), the filtered message goes into
//! the IOMMU's table and the device gets one that names only its own entries, so a bus
//! master the guest drives cannot DMA-write its way to another interrupt either. Without an
//! IOMMU (`iommu=off`) that door stays open.

use super::{extract, functions, insert, ConfigSpace, FoundFunction, REG_COMMAND};
use crate::cmdline::PciAddress;
use crate::ipi::{filter_device_interrupt, CpuSets, RouteAction};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// Capability IDs (PCI Local Bus 3.0, Appendix H).
pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_MSIX: u8 = 0x11;

/// Status register bit 4, Capabilities List (6.2.3), in the dword at 0x04.
const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
/// Capabilities Pointer of type-0 and type-1 headers (6.7); CardBus bridges keep it at 0x14.
const REG_CAPABILITIES: u8 = 0x34;
const REG_CARDBUS_CAPABILITIES: u8 = 0x14;
const HEADER_TYPE_CARDBUS: u32 = 2;
/// More entries than fit in the 192 bytes after the header means the list loops.
const MAX_CAPABILITIES: usize = 48;
/// Capabilities start after the 64-byte header (6.7).
const FIRST_CAPABILITY: u8 = 0x40;

/// MSI Message Control bit 7: the function has a Message Upper Address (6.8.1.3).
const MSI_64BIT: u32 = 1 << (16 + 7);
/// MSI-X Message Control bits 15 (MSI-X Enable) and 14 (Function Mask), 6.8.2.3.
const MSIX_ENABLE: u32 = 1 << (16 + 15);
const MSIX_FUNCTION_MASK: u32 = 1 << (16 + 14);

/// The interrupt window: address bits 31:20 (SDM Vol. 3 11.11.1).
const MSI_WINDOW: u32 = 0xFEE0_0000;
const MSI_WINDOW_MASK: u32 = 0xFFF0_0000;
/// Redirection hint and destination mode (SDM Vol. 3 11.11.1, Figure 11-24).
const MSI_REDIRECTION_HINT: u32 = 1 << 3;
const MSI_LOGICAL: u32 = 1 << 2;

/// An MSI capability (6.8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCapability {
    pub offset: u8,
    /// 64-bit address capable: a Message Upper Address register at +8, the data at +0xC.
    pub wide: bool,
}

impl MsiCapability {
    pub fn address_register(self) -> u8 {
        self.offset.wrapping_add(4)
    }

    pub fn upper_register(self) -> Option<u8> {
        self.wide.then_some(self.offset.wrapping_add(8))
    }

    /// The dword holding Message Data in its low 16 bits.
    pub fn data_register(self) -> u8 {
        self.offset.wrapping_add(if self.wide { 0xC } else { 8 })
    }
}

/// An MSI-X capability (6.8.2) and where the list links to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    pub offset: u8,
    /// The byte holding the pointer to it: the Capabilities Pointer, or the previous
    /// capability's next pointer.
    pub link: u8,
    /// Its own next pointer, which the link reads as while it is hidden.
    pub next: u8,
}

/// The interrupt capabilities of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub msi: Option<MsiCapability>,
    pub msix: Option<MsixCapability>,
    /// The PCI Power Management capability's offset (PCI PM 1.2, 3.2).
    pub pm: Option<u8>,
    /// The list loops, points into the header, or a capability runs past the 256 bytes; the
    /// walk stopped there.
    pub malformed: bool,
}

/// Walks `function`'s capability list (6.7) for its MSI and MSI-X capabilities (the first
/// of each).
pub fn walk_capabilities(cs: &impl ConfigSpace, function: PciAddress) -> Capabilities {
    let mut caps = Capabilities::default();
    if cs.read32(function, REG_COMMAND) & STATUS_CAPABILITIES == 0 {
        return caps;
    }
    let header_type = (cs.read32(function, super::REG_HEADER_TYPE) >> 16) & 0x7F;
    let mut link = if header_type == HEADER_TYPE_CARDBUS {
        REG_CARDBUS_CAPABILITIES
    } else {
        REG_CAPABILITIES
    };
    let mut next = extract(cs.read32(function, link & 0xFC), link, 1) as u8;
    for _ in 0..MAX_CAPABILITIES {
        // The low two bits are reserved (6.7).
        let offset = next & 0xFC;
        if offset == 0 {
            return caps;
        }
        if offset < FIRST_CAPABILITY {
            caps.malformed = true;
            return caps;
        }
        let header = cs.read32(function, offset);
        next = (header >> 8) as u8;
        let fits = |len: u16| u16::from(offset) + len <= 0x100;
        match header as u8 {
            CAP_ID_MSI if caps.msi.is_none() => {
                let wide = header & MSI_64BIT != 0;
                if !fits(if wide { 0x10 } else { 0xC }) {
                    caps.malformed = true;
                    return caps;
                }
                caps.msi = Some(MsiCapability { offset, wide });
            }
            CAP_ID_PM if caps.pm.is_none() && fits(8) => caps.pm = Some(offset),
            CAP_ID_MSIX if caps.msix.is_none() => {
                if !fits(0xC) {
                    caps.malformed = true;
                    return caps;
                }
                caps.msix = Some(MsixCapability { offset, link, next });
            }
            _ => {}
        }
        link = offset + 1;
    }
    caps.malformed = true;
    caps
}

/// A function with MSI or MSI-X.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptFunction {
    pub function: FoundFunction,
    pub capabilities: Capabilities,
}

/// Why the scan for interrupt capabilities failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// More functions with MSI or MSI-X than Ally has room to guard.
    TooMany { limit: usize, at: PciAddress },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany { limit, at } => write!(
                f,
                "more than {limit} PCI functions with MSI or MSI-X (the next is {at}); \
                 Ally cannot guard their interrupts"
            ),
        }
    }
}

/// Every function with an MSI or MSI-X capability, in bus order.
pub fn scan_interrupt_capabilities<const N: usize>(
    cs: &impl ConfigSpace,
) -> Result<heapless::Vec<InterruptFunction, N>, ScanError> {
    let mut found = heapless::Vec::new();
    for function in functions(cs) {
        let capabilities = walk_capabilities(cs, function.address);
        if capabilities.msi.is_none() && capabilities.msix.is_none() {
            continue;
        }
        found
            .push(InterruptFunction {
                function,
                capabilities,
            })
            .map_err(|_| ScanError::TooMany {
                limit: N,
                at: function.address,
            })?;
    }
    Ok(found)
}

/// What became of an MSI address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiRoute {
    /// It reaches OS cores only; the device gets it (reserved bits cleared).
    Kept,
    /// Its destination would reach a DPI core; the device gets another one.
    Rewritten { destination: u8, dropped: usize },
    /// Not an interrupt address; the device gets the first OS core's.
    Refused,
}

/// The address the device may hold for the guest's MSI `address`, `upper` and `data`.
///
/// The device's address is rebuilt from the fields Ally understands, so reserved bits 11:4
/// and 1:0 are cleared (bit 4 selects VT-d's remappable format). When RH is 0, the SDM says
/// the chipset ignores DM (11.11.1), so a logical destination must also be harmless as a
/// physical ID; if it is not, RH is set, which makes the logical reading the only one.
pub fn filter_msi(address: u32, upper: u32, cpus: CpuSets<'_>) -> (u32, MsiRoute) {
    let first_os_core = cpus.os_cores.first().copied().unwrap_or(0);
    if upper != 0 || address & MSI_WINDOW_MASK != MSI_WINDOW {
        return (
            MSI_WINDOW | ((first_os_core & 0xFF) << 12),
            MsiRoute::Refused,
        );
    }
    let destination = (address >> 12) & 0xFF;
    let hint = address & MSI_REDIRECTION_HINT;
    let logical = address & MSI_LOGICAL != 0;
    let compose = |destination: u32, flags: u32| MSI_WINDOW | ((destination & 0xFF) << 12) | flags;
    match filter_device_interrupt(logical, destination, cpus) {
        RouteAction::Keep if logical && hint == 0 => {
            match filter_device_interrupt(false, destination, cpus) {
                RouteAction::Keep => (compose(destination, MSI_LOGICAL), MsiRoute::Kept),
                RouteAction::Rewrite { dropped, .. } => (
                    compose(destination, MSI_LOGICAL | MSI_REDIRECTION_HINT),
                    MsiRoute::Rewritten {
                        destination: destination as u8,
                        dropped,
                    },
                ),
            }
        }
        RouteAction::Keep => (
            compose(destination, hint | (address & MSI_LOGICAL)),
            MsiRoute::Kept,
        ),
        RouteAction::Rewrite {
            destination,
            dropped,
        } => (
            compose(destination, hint),
            MsiRoute::Rewritten {
                destination: destination as u8,
                dropped,
            },
        ),
    }
}

/// The guest's MSI registers and what the device holds.
#[derive(Debug, Clone, Copy)]
struct MsiShadow {
    address: u32,
    upper: u32,
    /// Message Data (16 bits).
    data: u32,
    device_address: u32,
}

/// Guest accesses the guard changed, per function.
#[derive(Debug, Default)]
pub struct InterruptCounters {
    /// Guest MSI addresses whose destination was rewritten.
    pub msi_rewrites: AtomicU64,
    /// Guest MSI addresses outside the interrupt window.
    pub msi_refusals: AtomicU64,
    /// Guest reads and writes of the hidden MSI-X capability.
    pub msix_accesses: AtomicU64,
}

/// What a guest write to a guarded function's configuration space becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptWrite {
    /// Not a register the guard rewrites: forward the guest's access unchanged.
    Forward,
    /// Write these whole dwords `(register, value)` instead, in order (none: absorbed).
    /// `route` is set when the write changed the guest's MSI address.
    Device {
        writes: heapless::Vec<(u8, u32), 3>,
        route: Option<MsiRoute>,
    },
}

/// Which guarded dword a register is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guarded {
    Msi(MsiCapability, MsiRegister),
    /// Holds the pointer to the hidden MSI-X capability.
    MsixLink(MsixCapability),
    /// One of the hidden capability's three dwords (0: ID, next, Message Control).
    Msix(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsiRegister {
    Address,
    Upper,
    Data,
}

/// The guest's view of one function's MSI and MSI-X registers.
pub struct InterruptGuard {
    pub address: PciAddress,
    pub capabilities: Capabilities,
    shadow: spin::Mutex<MsiShadow>,
    pub counters: InterruptCounters,
}

impl InterruptGuard {
    /// Starts from the MSI registers as the device holds them (`address`, `upper`, `data`;
    /// zero without MSI). The device should then get [`Self::device_address`].
    pub fn new(
        function: &InterruptFunction,
        address: u32,
        upper: u32,
        data: u32,
        cpus: CpuSets<'_>,
    ) -> Self {
        let (address, data) = (address & !3, data & 0xFFFF);
        Self {
            address: function.function.address,
            capabilities: function.capabilities,
            shadow: spin::Mutex::new(MsiShadow {
                address,
                upper,
                data,
                device_address: filter_msi(address, upper, cpus).0,
            }),
            counters: InterruptCounters::default(),
        }
    }

    /// Takes the function as the firmware left it: shadows its MSI registers, gives the
    /// device the filtered address, and turns MSI-X off. Before the guest runs.
    pub fn adopt(cs: &impl ConfigSpace, function: &InterruptFunction, cpus: CpuSets<'_>) -> Self {
        let at = function.function.address;
        let caps = function.capabilities;
        let (mut address, mut upper, mut data) = (0, 0, 0);
        if let Some(msi) = caps.msi {
            address = cs.read32(at, msi.address_register());
            upper = msi.upper_register().map_or(0, |r| cs.read32(at, r));
            data = cs.read32(at, msi.data_register());
        }
        let guard = Self::new(function, address, upper, data, cpus);
        if let Some(msi) = caps.msi {
            let device = guard.device_address();
            if device != address {
                cs.write32(at, msi.address_register(), device);
            }
            if let Some(r) = msi.upper_register().filter(|_| upper != 0) {
                cs.write32(at, r, 0);
            }
        }
        if let Some(msix) = caps.msix {
            let control = cs.read32(at, msix.offset);
            if control & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != 0 {
                cs.write32(at, msix.offset, Self::msix_disabled(control));
            }
        }
        guard
    }

    /// The MSI address the device holds (its upper dword is always zero).
    pub fn device_address(&self) -> u32 {
        self.shadow.lock().device_address
    }

    fn msix_disabled(control_dword: u32) -> u32 {
        control_dword & !(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    }

    fn guarded(&self, register: u8) -> Option<Guarded> {
        if let Some(x) = self.capabilities.msix {
            if register.wrapping_sub(x.offset) < 0xC {
                return Some(Guarded::Msix((register - x.offset) / 4));
            }
            if register == x.link & 0xFC {
                return Some(Guarded::MsixLink(x));
            }
        }
        let msi = self.capabilities.msi?;
        let which = if register == msi.address_register() {
            MsiRegister::Address
        } else if Some(register) == msi.upper_register() {
            MsiRegister::Upper
        } else if register == msi.data_register() {
            MsiRegister::Data
        } else {
            return None;
        };
        Some(Guarded::Msi(msi, which))
    }

    /// Whether the guard answers reads or filters writes of the dword holding `offset`.
    pub fn owns(&self, offset: u8) -> bool {
        self.guarded(offset & 0xFC).is_some()
    }

    /// A guest read of `size` bytes at `offset`, given the device's dword there.
    pub fn read(&self, offset: u8, size: u8, device_dword: u32) -> u32 {
        let dword = match self.guarded(offset & 0xFC) {
            None => device_dword,
            Some(Guarded::Msi(_, MsiRegister::Address)) => self.shadow.lock().address,
            Some(Guarded::Msi(_, MsiRegister::Upper)) => self.shadow.lock().upper,
            // Bits 31:16 are not Message Data (padding, or Extended Message Data).
            Some(Guarded::Msi(_, MsiRegister::Data)) => {
                (device_dword & 0xFFFF_0000) | self.shadow.lock().data
            }
            Some(Guarded::MsixLink(x)) => insert(device_dword, x.link, 1, u32::from(x.next)),
            Some(Guarded::Msix(_)) => {
                self.counters.msix_accesses.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        extract(dword, offset, size)
    }

    /// The message the device gets for the guest's filtered MSI under `remapping`.
    fn remapped(
        &self,
        remapping: &dyn crate::iommu::interrupts::InterruptRemapping,
        device_address: u32,
        route: MsiRoute,
        data: u32,
    ) -> crate::iommu::interrupts::Message {
        let message = (route != MsiRoute::Refused).then_some(crate::iommu::interrupts::Message {
            address: device_address,
            data: data as u16,
        });
        remapping.msi(self.address, message)
    }

    /// Remapping went on: the device's MSI registers get the remapped message for what the
    /// guest (or the firmware) last programmed. Before the guest runs.
    pub fn apply_remapping(&self, cs: &impl ConfigSpace, cpus: CpuSets<'_>) {
        let (Some(msi), Some(remapping)) =
            (self.capabilities.msi, crate::iommu::interrupts::remapping())
        else {
            return;
        };
        let s = self.shadow.lock();
        let (device_address, route) = filter_msi(s.address, s.upper, cpus);
        let message = self.remapped(remapping, device_address, route, s.data);
        cs.write32(self.address, msi.address_register(), message.address);
        let data = cs.read32(self.address, msi.data_register());
        cs.write32(
            self.address,
            msi.data_register(),
            (data & 0xFFFF_0000) | u32::from(message.data),
        );
    }

    /// A guest write of `size` bytes of `value` at `offset`, given the device's dword there.
    pub fn write(
        &self,
        offset: u8,
        size: u8,
        value: u32,
        device_dword: u32,
        cpus: CpuSets<'_>,
    ) -> InterruptWrite {
        let register = offset & 0xFC;
        let mut writes = heapless::Vec::new();
        let mut route = None;
        match self.guarded(register) {
            // The pointer byte is read-only in the device (6.7).
            None | Some(Guarded::MsixLink(_)) => return InterruptWrite::Forward,
            Some(Guarded::Msix(index)) => {
                self.counters.msix_accesses.fetch_add(1, Ordering::Relaxed);
                // Table and PBA offsets are read-only; Message Control keeps MSI-X off.
                if index == 0 {
                    let dword = insert(device_dword, offset, size, value);
                    let _ = writes.push((register, Self::msix_disabled(dword)));
                }
            }
            Some(Guarded::Msi(msi, which)) => {
                let mut s = self.shadow.lock();
                let before = (s.address, s.upper);
                match which {
                    MsiRegister::Address => s.address = insert(s.address, offset, size, value) & !3,
                    MsiRegister::Upper => s.upper = insert(s.upper, offset, size, value),
                    MsiRegister::Data => s.data = insert(s.data, offset, size, value) & 0xFFFF,
                }
                let (device_address, msi_route) = filter_msi(s.address, s.upper, cpus);
                let data_dword = |data: u32| match which {
                    MsiRegister::Data => {
                        (insert(device_dword, offset, size, value) & 0xFFFF_0000) | data
                    }
                    // Bits 31:16 of the data dword: Extended Message Data, unused (off).
                    _ => data,
                };
                if which == MsiRegister::Upper {
                    let _ = writes.push((register, 0));
                }
                if let Some(remapping) = crate::iommu::interrupts::remapping() {
                    // Remapping on: the filtered message goes into the table, the device
                    // gets one that reaches only its entries.
                    let message = self.remapped(remapping, device_address, msi_route, s.data);
                    let _ = writes.push((msi.address_register(), message.address));
                    let _ = writes.push((msi.data_register(), data_dword(u32::from(message.data))));
                } else {
                    if which == MsiRegister::Data {
                        let _ = writes.push((register, data_dword(s.data)));
                    }
                    // The address dword follows whenever its filtered value changed (an
                    // upper or data write can change it too).
                    if which == MsiRegister::Address || device_address != s.device_address {
                        let _ = writes.push((msi.address_register(), device_address));
                    }
                }
                s.device_address = device_address;
                if (s.address, s.upper) != before {
                    route = Some(msi_route);
                    let counter = match msi_route {
                        MsiRoute::Kept => None,
                        MsiRoute::Rewritten { .. } => Some(&self.counters.msi_rewrites),
                        MsiRoute::Refused => Some(&self.counters.msi_refusals),
                    };
                    if let Some(counter) = counter {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        InterruptWrite::Device { writes, route }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipi::tests::{CPUS, DPI};
    use crate::pci::tests::FakeBus;
    use crate::pci::REG_ID;
    const PCIE: u8 = 0x10;
    const WIDE: u16 = 0x0080;
    const AT: PciAddress = PciAddress {
        bus: 0,
        device: 1,
        function: 0,
    };

    fn at(bus: u8, device: u8, function: u8) -> PciAddress {
        PciAddress {
            bus,
            device,
            function,
        }
    }

    /// A function whose capability list starts at `first`; `caps` = (offset, ID, next,
    /// Message Control).
    fn function(bus: &FakeBus, at: PciAddress, first: u8, caps: &[(u8, u8, u8, u16)]) {
        let mut regs = bus.regs.borrow_mut();
        regs.insert((at, REG_ID), 0x1234_8086);
        regs.insert((at, REG_COMMAND), 0x0010_0006);
        regs.insert((at, REG_CAPABILITIES), u32::from(first));
        for &(offset, id, next, control) in caps {
            let header = u32::from(id) | (u32::from(next) << 8) | (u32::from(control) << 16);
            regs.insert((at, offset), header);
        }
    }

    /// PM at 0x40, MSI at 0x50, MSI-X at 0x70, PCI Express at 0x80.
    fn typical(bus: &FakeBus, at: PciAddress, msi_control: u16, msix_control: u16) {
        function(
            bus,
            at,
            0x40,
            &[
                (0x40, CAP_ID_PM, 0x50, 0),
                (0x50, CAP_ID_MSI, 0x70, msi_control),
                (0x70, CAP_ID_MSIX, 0x80, msix_control),
                (0x80, PCIE, 0, 0x0002),
            ],
        );
    }

    fn guarded(msi_control: u16) -> (FakeBus, InterruptGuard) {
        let bus = FakeBus::default();
        typical(&bus, AT, msi_control, 0x0003);
        let found = scan_interrupt_capabilities::<4>(&bus).unwrap();
        let guard = InterruptGuard::adopt(&bus, &found[0], CPUS);
        (bus, guard)
    }

    /// The guest's configuration write as the exit handler carries it out.
    fn guest_write(
        bus: &FakeBus,
        g: &InterruptGuard,
        offset: u8,
        size: u8,
        value: u32,
    ) -> Option<MsiRoute> {
        let device = bus.read32(g.address, offset & 0xFC);
        match g.write(offset, size, value, device, CPUS) {
            InterruptWrite::Forward => {
                let dword = insert(device, offset, size, value);
                bus.write32(g.address, offset & 0xFC, dword);
                None
            }
            InterruptWrite::Device { writes, route } => {
                for (register, dword) in writes {
                    bus.write32(g.address, register, dword);
                }
                route
            }
        }
    }

    fn guest_read(bus: &FakeBus, g: &InterruptGuard, offset: u8, size: u8) -> u32 {
        g.read(offset, size, bus.read32(g.address, offset & 0xFC))
    }

    /// Configuration space as the guest sees it through the guard.
    struct GuestView<'a>(&'a FakeBus, &'a InterruptGuard);

    impl ConfigSpace for GuestView<'_> {
        fn read32(&self, f: PciAddress, register: u8) -> u32 {
            let device = self.0.read32(f, register);
            if f == self.1.address {
                self.1.read(register, 4, device)
            } else {
                device
            }
        }
        fn write32(&self, _: PciAddress, register: u8, value: u32) {
            guest_write(self.0, self.1, register, 4, value);
        }
    }

    #[test]
    fn walk_finds_msi_and_msix() {
        let bus = FakeBus::default();
        typical(&bus, at(0, 1, 0), WIDE, 0);
        assert_eq!(
            walk_capabilities(&bus, at(0, 1, 0)),
            Capabilities {
                msi: Some(MsiCapability {
                    offset: 0x50,
                    wide: true
                }),
                msix: Some(MsixCapability {
                    offset: 0x70,
                    link: 0x51,
                    next: 0x80
                }),
                pm: Some(0x40),
                malformed: false,
            }
        );
        // 32-bit MSI only; the pointers' reserved low bits are ignored.
        function(&bus, at(0, 2, 0), 0x53, &[(0x50, CAP_ID_MSI, 0x62, 0)]);
        let c = walk_capabilities(&bus, at(0, 2, 0));
        let msi = c.msi.unwrap();
        assert_eq!((msi.offset, msi.wide, c.msix), (0x50, false, None));
        assert_eq!(
            (
                msi.address_register(),
                msi.upper_register(),
                msi.data_register()
            ),
            (0x54, None, 0x58)
        );
        // MSI-X first: the Capabilities Pointer links to it.
        function(
            &bus,
            at(0, 3, 0),
            0x40,
            &[(0x40, CAP_ID_MSIX, 0x48, 0), (0x48, CAP_ID_PM, 0, 0)],
        );
        let c = walk_capabilities(&bus, at(0, 3, 0));
        assert_eq!(
            c.msix,
            Some(MsixCapability {
                offset: 0x40,
                link: 0x34,
                next: 0x48
            })
        );
        assert_eq!(c.msi, None);
        // Without the Capabilities List status bit, 0x34 means nothing.
        function(&bus, at(0, 4, 0), 0x40, &[(0x40, CAP_ID_MSI, 0, 0)]);
        bus.regs
            .borrow_mut()
            .insert((at(0, 4, 0), REG_COMMAND), 0x0000_0006);
        assert_eq!(
            walk_capabilities(&bus, at(0, 4, 0)),
            Capabilities::default()
        );
    }

    #[test]
    fn malformed_lists_end_the_walk() {
        let bus = FakeBus::default();
        // A loop: PM -> MSI -> PM -> ...
        function(
            &bus,
            at(0, 1, 0),
            0x40,
            &[(0x40, CAP_ID_PM, 0x50, 0), (0x50, CAP_ID_MSI, 0x40, 0)],
        );
        let c = walk_capabilities(&bus, at(0, 1, 0));
        assert!(c.malformed);
        assert_eq!(c.msi.map(|m| m.offset), Some(0x50));
        // A pointer into the header.
        function(&bus, at(0, 2, 0), 0x40, &[(0x40, CAP_ID_PM, 0x20, 0)]);
        assert!(walk_capabilities(&bus, at(0, 2, 0)).malformed);
        function(&bus, at(0, 3, 0), 0x3C, &[]);
        assert!(walk_capabilities(&bus, at(0, 3, 0)).malformed);
        // A 64-bit MSI capability whose data register would lie past 0xFF.
        function(&bus, at(0, 4, 0), 0xF4, &[(0xF4, CAP_ID_MSI, 0, WIDE)]);
        let c = walk_capabilities(&bus, at(0, 4, 0));
        assert!(c.malformed);
        assert_eq!(c.msi, None);
    }

    #[test]
    fn scan_keeps_functions_with_msi_or_msix() {
        let bus = FakeBus::default();
        typical(&bus, at(0, 1, 0), 0, 0);
        function(&bus, at(0, 2, 0), 0x40, &[(0x40, CAP_ID_PM, 0, 0)]);
        function(&bus, at(0, 3, 0), 0x40, &[(0x40, CAP_ID_MSI, 0, 0)]);
        // Multi-function device on bus 1: function 1 has MSI-X only.
        function(&bus, at(1, 0, 0), 0, &[]);
        bus.regs
            .borrow_mut()
            .insert((at(1, 0, 0), super::super::REG_HEADER_TYPE), 0x0080_0000);
        function(&bus, at(1, 0, 1), 0x40, &[(0x40, CAP_ID_MSIX, 0, 0)]);
        let found = scan_interrupt_capabilities::<8>(&bus).unwrap();
        let addresses: Vec<PciAddress> = found.iter().map(|f| f.function.address).collect();
        assert_eq!(addresses, [at(0, 1, 0), at(0, 3, 0), at(1, 0, 1)]);
        assert_eq!(found[2].capabilities.msi, None);
        let e = scan_interrupt_capabilities::<2>(&bus).unwrap_err();
        assert_eq!(
            e,
            ScanError::TooMany {
                limit: 2,
                at: at(1, 0, 1)
            }
        );
        assert_eq!(
            e.to_string(),
            "more than 2 PCI functions with MSI or MSI-X (the next is 01:00.1); \
             Ally cannot guard their interrupts"
        );
    }

    #[test]
    fn msi_addresses_of_os_cores_are_kept() {
        let kept = |address| filter_msi(address, 0, CPUS);
        assert_eq!(kept(0xFEE0_1000), (0xFEE0_1000, MsiRoute::Kept));
        assert_eq!(kept(0xFEE0_2008), (0xFEE0_2008, MsiRoute::Kept));
        // Reserved bits 11:4 (bit 4: VT-d remappable format) never reach the device.
        assert_eq!(kept(0xFEE0_1FF0), (0xFEE0_1000, MsiRoute::Kept));
        // Logical with RH: DPI cores have no xAPIC logical ID (LDR 0), so no set includes
        // one unless it holds the DPI core's x2APIC cluster-0 bit (3), see below.
        assert_eq!(kept(0xFEE0_700C), (0xFEE0_700C, MsiRoute::Kept));
        // Logical without RH, harmless as a physical ID too.
        assert_eq!(kept(0xFEE0_6004), (0xFEE0_6004, MsiRoute::Kept));
    }

    #[test]
    fn msi_addresses_that_reach_a_dpi_core_are_rewritten() {
        let to_first_os_core = MsiRoute::Rewritten {
            destination: 0,
            dropped: 1,
        };
        // Physical DPI core, and the broadcast ID.
        for address in [0xFEE0_3000, 0xFEEF_F000] {
            assert_eq!(
                filter_msi(address, 0, CPUS),
                (0xFEE0_0000, to_first_os_core)
            );
        }
        // Lowest-priority delivery with RH, physical: RH stays, the destination changes.
        assert_eq!(
            filter_msi(0xFEE0_3008, 0, CPUS),
            (0xFEE0_0008, to_first_os_core)
        );
        // NMI delivery.
        assert_eq!(filter_msi(0xFEE0_3000, 0, CPUS).0, 0xFEE0_0000);
        // Logical set 0x03 without RH: the chipset may read DM as physical, APIC ID 3. RH
        // forces the logical reading.
        assert_eq!(
            filter_msi(0xFEE0_3004, 0, CPUS),
            (
                0xFEE0_300C,
                MsiRoute::Rewritten {
                    destination: 3,
                    dropped: 1
                }
            )
        );
        // Logical 0xFF is a broadcast (SDM 12.6.2.2); a set with bit 3 may reach the DPI core
        // in x2APIC mode: both go to the first OS core, RH as the guest set it.
        assert_eq!(
            filter_msi(0xFEEF_F004, 0, CPUS),
            (0xFEE0_0000, to_first_os_core)
        );
        assert_eq!(
            filter_msi(0xFEE0_F00C, 0, CPUS),
            (0xFEE0_0008, to_first_os_core)
        );
    }

    #[test]
    fn msi_addresses_outside_the_interrupt_window_are_refused() {
        for (address, upper) in [(0x1234_5000, 0), (0xFEE0_1000, 1), (0xFED0_0000, 0)] {
            assert_eq!(
                filter_msi(address, upper, CPUS),
                (0xFEE0_0000, MsiRoute::Refused)
            );
        }
        let cpus = CpuSets {
            os_cores: &[2, 5],
            dpi_cores: &DPI,
        };
        assert_eq!(filter_msi(0, 0, cpus).0, 0xFEE0_2000);
    }

    #[test]
    fn guest_reads_back_its_own_msi_address() {
        let (bus, g) = guarded(0);
        let kept = guest_write(&bus, &g, 0x54, 4, 0xFEE0_1000);
        assert_eq!(kept, Some(MsiRoute::Kept));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_1000);
        let r = guest_write(&bus, &g, 0x54, 4, 0xFEE0_3000);
        assert!(matches!(
            r,
            Some(MsiRoute::Rewritten { destination: 0, .. })
        ));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        assert_eq!(guest_read(&bus, &g, 0x54, 4), 0xFEE0_3000);
        assert_eq!(g.device_address(), 0xFEE0_0000);
        let r = guest_write(&bus, &g, 0x54, 4, 0x1234_5003);
        assert_eq!(r, Some(MsiRoute::Refused));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        // Bits 1:0 of Message Address are read-only zero (6.8.1.4).
        assert_eq!(guest_read(&bus, &g, 0x54, 4), 0x1234_5000);
        assert_eq!(g.counters.msi_rewrites.load(Ordering::Relaxed), 1);
        assert_eq!(g.counters.msi_refusals.load(Ordering::Relaxed), 1);
        // Message Data is passed (32-bit MSI: at +8) and read back.
        assert_eq!(guest_write(&bus, &g, 0x58, 2, 0x4041), None);
        assert_eq!(bus.read32(AT, 0x58), 0x4041);
        assert_eq!(guest_read(&bus, &g, 0x58, 2), 0x4041);
        // Message Control passes through: the guest enables MSI itself.
        let control = bus.read32(AT, 0x50);
        assert_eq!(g.write(0x52, 2, 1, control, CPUS), InterruptWrite::Forward);
        assert_eq!(guest_write(&bus, &g, 0x52, 2, 0x0001), None);
        assert_eq!(bus.read32(AT, 0x50) >> 16, 0x0001);
    }

    #[test]
    fn byte_and_word_writes_are_filtered_as_the_whole_address() {
        let (bus, g) = guarded(WIDE);
        guest_write(&bus, &g, 0x54, 4, 0xFEE0_1000);
        // Destination bits 15:12 live in byte 1.
        let r = guest_write(&bus, &g, 0x55, 1, 0x30);
        assert!(matches!(r, Some(MsiRoute::Rewritten { .. })));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        assert_eq!(guest_read(&bus, &g, 0x55, 1), 0x30);
        assert_eq!(guest_read(&bus, &g, 0x56, 2), 0xFEE0);
        // Rewriting the same high word changes nothing and counts nothing.
        assert_eq!(guest_write(&bus, &g, 0x56, 2, 0xFEE0), None);
        assert_eq!(g.counters.msi_rewrites.load(Ordering::Relaxed), 1);
        assert_eq!(guest_write(&bus, &g, 0x54, 2, 0x2000), Some(MsiRoute::Kept));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_2000);
        // A high word outside the window is refused.
        let r = guest_write(&bus, &g, 0x56, 2, 0x0010);
        assert_eq!(r, Some(MsiRoute::Refused));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        assert_eq!(guest_read(&bus, &g, 0x54, 4), 0x0010_2000);
    }

    #[test]
    fn sixty_four_bit_msi_never_gets_an_upper_address() {
        let (bus, g) = guarded(WIDE);
        let msi = g.capabilities.msi.unwrap();
        assert_eq!(
            (msi.upper_register(), msi.data_register()),
            (Some(0x58), 0x5C)
        );
        guest_write(&bus, &g, 0x54, 4, 0xFEE0_1000);
        assert_eq!(guest_write(&bus, &g, 0x58, 4, 1), Some(MsiRoute::Refused));
        // The upper dword stays zero in the device and the address moves to the safe one.
        assert_eq!(bus.read32(AT, 0x58), 0);
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        assert_eq!(guest_read(&bus, &g, 0x58, 4), 1);
        assert_eq!(guest_read(&bus, &g, 0x54, 4), 0xFEE0_1000);
        assert_eq!(guest_write(&bus, &g, 0x58, 1, 0), Some(MsiRoute::Kept));
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_1000);
        // Data at +0xC; its upper half is not Message Data and keeps the device's bits.
        bus.write32(AT, 0x5C, 0xABCD_0000);
        assert!(g.owns(0x5E));
        guest_write(&bus, &g, 0x5C, 2, 0x0141);
        assert_eq!(bus.read32(AT, 0x5C), 0xABCD_0141);
        assert_eq!(guest_read(&bus, &g, 0x5C, 4), 0xABCD_0141);
        assert_eq!(guest_read(&bus, &g, 0x5D, 1), 0x01);
    }

    #[test]
    fn adopting_filters_the_firmwares_address_and_turns_msix_off() {
        let bus = FakeBus::default();
        typical(&bus, AT, WIDE | 1, 0xC007);
        bus.write32(AT, 0x54, 0xFEE0_3000);
        bus.write32(AT, 0x58, 0);
        bus.write32(AT, 0x5C, 0x0041);
        let found = scan_interrupt_capabilities::<4>(&bus).unwrap();
        let g = InterruptGuard::adopt(&bus, &found[0], CPUS);
        assert_eq!(bus.read32(AT, 0x54), 0xFEE0_0000);
        assert_eq!(guest_read(&bus, &g, 0x54, 4), 0xFEE0_3000);
        assert_eq!(bus.read32(AT, 0x70) >> 16, 0x0007);
        assert_eq!(bus.read32(AT, 0x50) >> 16, u32::from(WIDE | 1));
    }

    #[test]
    fn msix_is_hidden_from_the_guests_walk() {
        let (bus, g) = guarded(0);
        let view = GuestView(&bus, &g);
        let seen = walk_capabilities(&view, AT);
        assert_eq!(seen.msi, g.capabilities.msi);
        assert_eq!(seen.msix, None);
        assert!(!seen.malformed);
        // Sub-dword reads of the MSI capability's header: its next pointer skips MSI-X.
        assert!(g.owns(0x51));
        assert_eq!(guest_read(&bus, &g, 0x51, 1), 0x80);
        assert_eq!(guest_read(&bus, &g, 0x50, 2), 0x8005);
        assert_eq!(guest_read(&bus, &g, 0x50, 4), 0x0000_8005);
        assert_eq!(guest_read(&bus, &g, 0x52, 2), 0);
        // The hidden capability reads as zeros.
        for offset in [0x70, 0x71, 0x72, 0x74, 0x78, 0x7B] {
            assert_eq!(guest_read(&bus, &g, offset, 1), 0, "{offset:#x}");
        }
        assert!(!g.owns(0x7C));
        assert_eq!(guest_read(&bus, &g, 0x80, 1), u32::from(PCIE));
        assert_eq!(g.counters.msix_accesses.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn msix_first_in_the_list_hides_behind_the_capabilities_pointer() {
        let bus = FakeBus::default();
        function(
            &bus,
            AT,
            0x40,
            &[(0x40, CAP_ID_MSIX, 0x50, 0), (0x50, CAP_ID_MSI, 0, 0)],
        );
        bus.write32(AT, REG_CAPABILITIES, 0xAB00_0040);
        let found = scan_interrupt_capabilities::<1>(&bus).unwrap();
        let g = InterruptGuard::adopt(&bus, &found[0], CPUS);
        assert!(g.owns(0x34) && g.owns(0x37));
        assert_eq!(guest_read(&bus, &g, 0x34, 1), 0x50);
        assert_eq!(guest_read(&bus, &g, 0x34, 4), 0xAB00_0050);
        assert_eq!(guest_read(&bus, &g, 0x37, 1), 0xAB);
        let seen = walk_capabilities(&GuestView(&bus, &g), AT);
        assert_eq!((seen.msi.map(|m| m.offset), seen.msix), (Some(0x50), None));
    }

    #[test]
    fn msix_enable_is_forced_off() {
        let (bus, g) = guarded(0);
        // MSI-X Enable and Function Mask, as a word and as a dword.
        assert_eq!(guest_write(&bus, &g, 0x72, 2, 0xC000), None);
        // (The fake device does not model the read-only Table Size.)
        assert_eq!(bus.read32(AT, 0x70) >> 16, 0);
        guest_write(&bus, &g, 0x70, 4, 0x8000_0000);
        assert_eq!(bus.read32(AT, 0x70) & (MSIX_ENABLE | MSIX_FUNCTION_MASK), 0);
        guest_write(&bus, &g, 0x73, 1, 0x80);
        assert_eq!(bus.read32(AT, 0x70) & MSIX_ENABLE, 0);
        // Table and PBA offsets are absorbed.
        let before = bus.read32(AT, 0x74);
        assert_eq!(
            g.write(0x74, 4, 0x1234, before, CPUS),
            InterruptWrite::Device {
                writes: heapless::Vec::new(),
                route: None
            }
        );
        assert_eq!(g.counters.msix_accesses.load(Ordering::Relaxed), 4);
        // The link byte is read-only in hardware; writes pass.
        assert_eq!(
            g.write(0x51, 1, 0x70, 0x7005, CPUS),
            InterruptWrite::Forward
        );
    }
}
