//! Interrupt remapping, the VT-d formats (used by `vtd_remap`): how an interrupt the
//! guest programs in compatibility format (an I/O APIC redirection entry, or a device's MSI
//! address and data) becomes a remappable-format request plus the table entry Ally owns
//! (Intel VT-d rev. 4.1, 5.1.2 and 9.10; I/O APIC 82093AA, 3.2.4; PCI MSI, Intel SDM Vol. 3
//! 11.11).
//!
//! With remapping on and compatibility-format interrupts refused (GCMD.CFI clear), a device
//! can only raise the interrupts of the entries Ally wrote: a bus master that writes to
//! 0xFEEx_xxxx by DMA sends a remappable request naming a handle, and the entry behind it
//! names the destination Ally validated, with the requester's ID checked (SVT/SID), so it
//! cannot reach a DPI core or send INIT, NMI or SMI.
//!
//! Handles are laid out statically: each I/O APIC's pins first, then a block of MSI vectors
//! per guarded PCI function.

use super::vtd::{DeliveryMode, Irte, IrteDestination, SourceValidation};
use super::SourceId;

/// An interrupt as the guest asked for it (compatibility format), after Ally's destination
/// filter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CompatInterrupt {
    pub vector: u8,
    /// xAPIC destination: a physical APIC ID, or a logical mask with `logical`.
    pub destination: u8,
    pub logical: bool,
    /// Delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub delivery: u8,
    pub level_triggered: bool,
}

/// Why a compatibility-format interrupt gets no table entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RemapRefusal {
    /// SMI, INIT, a reserved mode: no device of the guest's may send one.
    DeliveryMode(u8),
    /// The MSI address is not in the interrupt range (0xFEEx_xxxx).
    NotAnInterruptAddress(u32),
    /// The handle does not fit the table.
    HandleOutOfRange(u32),
}

impl CompatInterrupt {
    /// An I/O APIC redirection entry (82093AA 3.2.4): vector 7:0, delivery mode 10:8,
    /// destination mode 11, trigger mode 15, destination 63:56.
    pub const fn from_ioapic_rte(rte: u64) -> Self {
        Self {
            vector: rte as u8,
            delivery: ((rte >> 8) & 7) as u8,
            logical: rte & (1 << 11) != 0,
            level_triggered: rte & (1 << 15) != 0,
            destination: (rte >> 56) as u8,
        }
    }

    /// An MSI's address and data (SDM 11.11.1, 11.11.2): destination ID in address 19:12,
    /// destination mode in address bit 2; vector in data 7:0, delivery mode 10:8, trigger
    /// mode bit 15.
    pub fn from_msi(address: u32, data: u32) -> Result<Self, RemapRefusal> {
        if address & 0xFFF0_0000 != 0xFEE0_0000 {
            return Err(RemapRefusal::NotAnInterruptAddress(address));
        }
        Ok(Self {
            vector: data as u8,
            delivery: ((data >> 8) & 7) as u8,
            logical: address & (1 << 2) != 0,
            level_triggered: data & (1 << 15) != 0,
            destination: (address >> 12) as u8,
        })
    }

    /// The table entry that delivers this interrupt, accepted only from `source`. Fixed,
    /// lowest-priority and NMI (the guest's watchdogs) are remapped; SMI, INIT, ExtINT and
    /// the reserved modes are refused (a guest's device has no business sending them, and
    /// an INIT would reach whatever the destination names).
    pub fn table_entry(&self, source: SourceId) -> Result<Irte, RemapRefusal> {
        let delivery = match self.delivery {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            4 => DeliveryMode::Nmi,
            other => return Err(RemapRefusal::DeliveryMode(other)),
        };
        Ok(Irte::remapped(
            self.vector,
            IrteDestination::XApic(self.destination),
            self.logical,
            self.level_triggered,
            delivery,
            SourceValidation::RequesterId { sid: source, sq: 0 },
        ))
    }
}

/// Where each source's handles start in the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HandleLayout {
    /// Pins of each I/O APIC, in MADT order.
    pub ioapic_pins: [u8; 8],
    pub ioapics: usize,
    /// Vectors reserved per MSI function (MSI allows 32).
    pub msi_vectors: u16,
    /// Entries in the table (a power of two, at most 65536).
    pub entries: u32,
}

impl HandleLayout {
    /// The handle of `pin` of I/O APIC `index`.
    pub fn ioapic(&self, index: usize, pin: u8) -> Result<u16, RemapRefusal> {
        let first: u32 = self.ioapic_pins[..index.min(self.ioapics)]
            .iter()
            .map(|&p| u32::from(p))
            .sum();
        let handle = first + u32::from(pin);
        if index >= self.ioapics || pin >= self.ioapic_pins[index] || handle >= self.entries {
            return Err(RemapRefusal::HandleOutOfRange(handle));
        }
        Ok(handle as u16)
    }

    /// The first handle of the `slot`-th guarded MSI function.
    pub fn msi(&self, slot: usize) -> Result<u16, RemapRefusal> {
        let pins: u32 = self.ioapic_pins[..self.ioapics]
            .iter()
            .map(|&p| u32::from(p))
            .sum();
        let handle = pins + slot as u32 * u32::from(self.msi_vectors);
        if handle + u32::from(self.msi_vectors) > self.entries {
            return Err(RemapRefusal::HandleOutOfRange(handle));
        }
        Ok(handle as u16)
    }
}

/// The redirection entry the I/O APIC gets for `handle` (VT-d 5.1.5.1): interrupt format
/// bit 48 set, handle 14:0 in bits 63:49 and handle 15 in bit 11, the guest's vector kept
/// (the I/O APIC matches EOIs of level-triggered interrupts against it, and the entry's
/// vector must equal it), its trigger mode, polarity and mask kept; delivery mode 000.
pub const fn remappable_rte(handle: u16, guest_rte: u64) -> u64 {
    let kept = guest_rte & (0xFF | (1 << 13) | (1 << 15) | (1 << 16));
    kept | (1 << 48) | (((handle & 0x7FFF) as u64) << 49) | (((handle >> 15) as u64) << 11)
}

/// The MSI address and data a device gets for `handle` (VT-d 5.1.2.2): address 0xFEE,
/// handle 14:0 in bits 19:5, interrupt format bit 4, SHV bit 3 (the data's low 16 bits are a
/// subhandle added to the handle, for multi-vector MSI), handle 15 in bit 2; data = the
/// subhandle, 0.
pub const fn remappable_msi(handle: u16) -> (u32, u32) {
    let address = 0xFEE0_0000
        | (((handle & 0x7FFF) as u32) << 5)
        | (1 << 4)
        | (1 << 3)
        | (((handle >> 15) as u32) << 2);
    (address, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AHCI: SourceId = SourceId::new(0, 0x1F, 2);

    #[test]
    fn an_ioapic_entry_keeps_its_vector_and_trigger_and_names_its_handle() {
        // Level, active low, masked, vector 0x31, logical destination 0x01.
        let rte = 0x0100_0000_0000_0000 | (1 << 16) | (1 << 15) | (1 << 13) | (1 << 11) | 0x31;
        let c = CompatInterrupt::from_ioapic_rte(rte);
        assert_eq!(
            c,
            CompatInterrupt {
                vector: 0x31,
                destination: 1,
                logical: true,
                delivery: 0,
                level_triggered: true
            }
        );
        let r = remappable_rte(0x8005, rte);
        assert_eq!(r & 0xFF, 0x31, "vector kept for EOIs");
        assert_ne!(r & (1 << 48), 0, "remappable format");
        assert_eq!((r >> 49) & 0x7FFF, 5);
        assert_ne!(r & (1 << 11), 0, "handle bit 15");
        assert_eq!(r & (7 << 8), 0, "delivery mode 000");
        assert_eq!(
            r & ((1 << 13) | (1 << 15) | (1 << 16)),
            (1 << 13) | (1 << 15) | (1 << 16)
        );
        let e = c.table_entry(SourceId::new(0xFF, 0, 0)).unwrap();
        assert!(e.present() && e.level_triggered() && e.logical());
        assert_eq!((e.vector(), e.destination() >> 8), (0x31, 1));
    }

    #[test]
    fn an_msi_becomes_a_handle_and_its_entry_checks_the_requester() {
        let c = CompatInterrupt::from_msi(0xFEE0_3000, 0x4041).unwrap();
        assert_eq!((c.vector, c.destination, c.logical), (0x41, 3, false));
        let e = c.table_entry(AHCI).unwrap();
        assert_eq!(e.source_validation_type(), 1);
        assert_eq!(e.source_id(), AHCI.0);
        let (address, data) = remappable_msi(0x1234);
        assert_eq!(address, 0xFEE0_0000 | (0x1234 << 5) | (1 << 4) | (1 << 3));
        assert_eq!(data, 0);
        // Not an interrupt address: no entry.
        assert_eq!(
            CompatInterrupt::from_msi(0x3860_0000, 0x41),
            Err(RemapRefusal::NotAnInterruptAddress(0x3860_0000))
        );
    }

    #[test]
    fn smi_init_and_extint_get_no_entry() {
        for (mode, refused) in [
            (0, false),
            (1, false),
            (2, true),
            (4, false),
            (5, true),
            (7, true),
        ] {
            let c = CompatInterrupt::from_msi(0xFEE0_0000, (mode << 8) | 0x30).unwrap();
            assert_eq!(c.table_entry(AHCI).is_err(), refused, "mode {mode}");
        }
    }

    #[test]
    fn handles_are_laid_out_without_overlap() {
        let layout = HandleLayout {
            ioapic_pins: [24, 32, 0, 0, 0, 0, 0, 0],
            ioapics: 2,
            msi_vectors: 32,
            entries: 256,
        };
        assert_eq!(layout.ioapic(0, 23), Ok(23));
        assert_eq!(layout.ioapic(1, 0), Ok(24));
        assert_eq!(layout.ioapic(1, 31), Ok(55));
        assert!(layout.ioapic(1, 32).is_err());
        assert!(layout.ioapic(2, 0).is_err());
        assert_eq!(layout.msi(0), Ok(56));
        assert_eq!(layout.msi(1), Ok(88));
        // 56 + 6 * 32 + 32 = 280 > 256.
        assert!(layout.msi(6).is_err());
    }
}
