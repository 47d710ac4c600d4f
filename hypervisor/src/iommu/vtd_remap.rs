//! VT-d interrupt remapping (Intel VT-d rev. 4.1, 5.1 interrupt remapping, 6.5.2 queued
//! invalidation, 9.10 the remapping table entry).
//!
//! One table serves every remapping unit (each points its IRTA at it): the handles are laid
//! out statically ([`HandleLayout`]: each guarded I/O APIC's pins, then a block of 32 per
//! MSI function), and every entry checks the requester ID of its source (SVT = 01b, SQ = 0).
//! Remapping runs with compatibility-format interrupts blocked (GCMD.CFI clear): a bus
//! master's DMA write of 0xFEEx_xxxx is a request naming a handle, delivered only if the
//! entry behind it is present and names that very device. The I/O APIC gets remappable
//! redirection entries that keep the guest's vector (5.1.5.1: the I/O APIC matches EOIs
//! against it); an MSI function gets the remappable address of its block with SHV set and
//! data 0, so the message number of a multi-message MSI selects the entry `block + k`,
//! written with the guest's vector ORed with `k` (PCI 3.0 6.8.1.3).
//!
//! Each change is followed by a global interrupt-entry-cache invalidation and an
//! invalidation wait whose status write is awaited (6.5.2.7, 6.5.2.8), on every unit.

use super::interrupts::{await_invalidation, InterruptRemapping, IommuMemory, Message, COUNTERS};
use super::intremap::{remappable_msi, remappable_rte, CompatInterrupt, HandleLayout};
use super::remapping::UnitRegisters;
use super::vtd::{regs, Irte};
use super::SourceId;
use crate::cmdline::PciAddress;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Entries of the table: 2^12 (64 KiB), IRTA.S = 11. Enough for 8 I/O APICs of 120 pins
/// and 64 MSI functions of 32 vectors.
pub const TABLE_SIZE: u8 = 11;
pub const TABLE_ENTRIES: usize = 1 << (TABLE_SIZE + 1);
/// Pins reserved per I/O APIC: all an 8-bit IOREGSEL can address.
pub const PINS_PER_IOAPIC: u8 = 120;
/// Vectors reserved per MSI function (multi-message MSI allows 32).
pub const MSI_VECTORS: u16 = 32;
/// Descriptors in the invalidation queue (one 4 KiB page of 16-byte descriptors, IQA.QS 0).
const QUEUE_DESCRIPTORS: u64 = 256;
const DESCRIPTOR_BYTES: u64 = 16;
/// Redirection entry mask bit (82093AA 3.2.4).
const RTE_MASKED: u64 = 1 << 16;

/// The table or an invalidation queue: 64-bit words.
pub type Words64 = IommuMemory<AtomicU64>;

struct Queue<R> {
    regs: R,
    ring: Words64,
    /// Byte offset of the next descriptor (IQT, bits 18:4).
    tail: u64,
}

struct Inner<R> {
    units: heapless::Vec<Queue<R>, 8>,
    /// I/O APIC register bases and their source IDs, in layout order.
    ioapics: heapless::Vec<(u64, SourceId), 8>,
    /// MSI functions, in layout order.
    functions: heapless::Vec<PciAddress, 64>,
    /// The value the next invalidation wait writes.
    sequence: u32,
}

/// The table, the units' invalidation queues and the sources, behind one lock.
pub struct VtdRemapping<R> {
    table: Words64,
    layout: HandleLayout,
    inner: spin::Mutex<Inner<R>>,
    /// Where invalidation waits write their status (Ally's memory, identity-mapped).
    completion: &'static AtomicU32,
}

/// A source beyond the layout's room.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TooManySources;

impl<R: UnitRegisters> VtdRemapping<R> {
    /// A remapping through `table` (zeroed, [`TABLE_ENTRIES`] entries of two words).
    pub fn new(table: Words64, completion: &'static AtomicU32) -> Self {
        Self {
            table,
            layout: HandleLayout {
                ioapic_pins: [PINS_PER_IOAPIC; 8],
                ioapics: 8,
                msi_vectors: MSI_VECTORS,
                entries: TABLE_ENTRIES as u32,
            },
            inner: spin::Mutex::new(Inner {
                units: heapless::Vec::new(),
                ioapics: heapless::Vec::new(),
                functions: heapless::Vec::new(),
                sequence: 0,
            }),
            completion,
        }
    }

    /// A unit with queued invalidation on over `ring` (head and tail 0).
    pub fn add_unit(&self, regs: R, ring: Words64) -> Result<(), TooManySources> {
        self.inner
            .lock()
            .units
            .push(Queue {
                regs,
                ring,
                tail: 0,
            })
            .map_err(|_| TooManySources)
    }

    /// The I/O APIC at `base`, whose messages carry `source`.
    pub fn add_ioapic(&self, base: u64, source: SourceId) -> Result<(), TooManySources> {
        self.inner
            .lock()
            .ioapics
            .push((base, source))
            .map_err(|_| TooManySources)
    }

    /// A PCI function with MSI.
    pub fn add_function(&self, function: PciAddress) -> Result<(), TooManySources> {
        self.inner
            .lock()
            .functions
            .push(function)
            .map_err(|_| TooManySources)
    }

    /// Invalidates the interrupt entry cache of every unit (after the table pointer was
    /// set, and after each change).
    pub fn invalidate_all(&self) {
        self.inner.lock().invalidate(self.completion);
    }

    fn write(&self, handle: usize, irte: Irte) {
        let (lo, hi) = (
            &self.table.words[2 * handle],
            &self.table.words[2 * handle + 1],
        );
        // Not present while the source check changes, so no request sees a mix (9.10).
        if hi.load(Ordering::Relaxed) != irte.hi {
            lo.store(0, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            hi.store(irte.hi, Ordering::Relaxed);
            fence(Ordering::SeqCst);
        }
        lo.store(irte.lo, Ordering::Relaxed);
    }

    fn clear(&self, handle: usize) {
        self.table.words[2 * handle].store(0, Ordering::Relaxed);
    }
}

impl<R: UnitRegisters> Inner<R> {
    fn invalidate(&mut self, completion: &AtomicU32) {
        // The entries' stores before the descriptors that make the unit drop its copies.
        fence(Ordering::SeqCst);
        for unit in self.units.iter_mut() {
            self.sequence = self.sequence.wrapping_add(1).max(1);
            // Interrupt entry cache invalidation, global (6.5.2.7: type 4h, G = 0).
            unit.submit([0x4, 0]);
            // Invalidation wait with a status write (6.5.2.8: type 5h, SW bit 5, status
            // data in bits 63:32; the address, dword-aligned, in the upper qword).
            let store = completion as *const AtomicU32 as u64;
            unit.submit([
                0x5 | (1 << 5) | (u64::from(self.sequence) << 32),
                store & !3,
            ]);
            fence(Ordering::SeqCst);
            unit.regs.write64(regs::IQT, unit.tail);
            let sequence = self.sequence;
            if !await_invalidation(|| completion.load(Ordering::Acquire) == sequence)
                && crate::log_limit::IOMMU_COMMAND.admit()
            {
                log::warn!(
                    "ALLY intremap-invalidation-timeout kind=vt-d sequence={sequence} iqh={:#x} iqt={:#x} fsts={:#x}",
                    unit.regs.read64(regs::IQH),
                    unit.tail,
                    unit.regs.read32(regs::FSTS)
                );
            }
        }
    }
}

impl<R: UnitRegisters> Queue<R> {
    fn submit(&mut self, descriptor: [u64; 2]) {
        let at = (self.tail / 8) as usize;
        self.ring.words[at].store(descriptor[0], Ordering::Relaxed);
        self.ring.words[at + 1].store(descriptor[1], Ordering::Relaxed);
        self.tail = (self.tail + DESCRIPTOR_BYTES) % (QUEUE_DESCRIPTORS * DESCRIPTOR_BYTES);
    }
}

impl<R: UnitRegisters + Send> InterruptRemapping for VtdRemapping<R> {
    fn ioapic_entry(&self, ioapic_base: u64, pin: u8, rte: u64) -> u64 {
        let mut inner = self.inner.lock();
        let Some((index, source)) = inner
            .ioapics
            .iter()
            .enumerate()
            .find(|(_, (base, _))| *base == ioapic_base)
            .map(|(i, &(_, source))| (i, source))
        else {
            // Not in the DMAR: its compatibility-format requests are blocked anyway.
            return rte | RTE_MASKED;
        };
        let Ok(handle) = self.layout.ioapic(index, pin) else {
            return rte | RTE_MASKED;
        };
        let remapped = remappable_rte(handle, rte);
        if rte & RTE_MASKED != 0 {
            // Masked, the pin sends nothing: its entry stays as it was.
            return remapped;
        }
        match CompatInterrupt::from_ioapic_rte(rte).table_entry(source) {
            Ok(irte) => {
                self.write(usize::from(handle), irte);
                COUNTERS.entries.fetch_add(1, Ordering::Relaxed);
                inner.invalidate(self.completion);
                remapped
            }
            Err(_) => {
                self.clear(usize::from(handle));
                COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                inner.invalidate(self.completion);
                remapped | RTE_MASKED
            }
        }
    }

    fn msi(&self, function: PciAddress, message: Option<Message>) -> Message {
        let mut inner = self.inner.lock();
        let Some(slot) = inner.functions.iter().position(|&f| f == function) else {
            // No block: a compatibility-format address, which the unit blocks.
            return Message {
                address: 0xFEE0_0000,
                data: 0,
            };
        };
        let Ok(first) = self.layout.msi(slot) else {
            return Message {
                address: 0xFEE0_0000,
                data: 0,
            };
        };
        let first = usize::from(first);
        for k in 0..usize::from(MSI_VECTORS) {
            self.clear(first + k);
        }
        let source = SourceId::from(function);
        let entry = message
            .and_then(|m| CompatInterrupt::from_msi(m.address, u32::from(m.data)).ok())
            .filter(|c| c.table_entry(source).is_ok());
        match entry {
            Some(c) => {
                for k in 0..MSI_VECTORS as u8 {
                    let vector = CompatInterrupt {
                        vector: c.vector | k,
                        ..c
                    };
                    if let Ok(irte) = vector.table_entry(source) {
                        self.write(first + usize::from(k), irte);
                    }
                }
                COUNTERS.entries.fetch_add(1, Ordering::Relaxed);
            }
            None if message.is_some_and(|m| m.data != 0 || m.address != 0) => {
                COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        inner.invalidate(self.completion);
        let (address, data) = remappable_msi(first as u16);
        Message {
            address,
            data: data as u16,
        }
    }

    fn kind(&self) -> &'static str {
        "vt-d"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::testutil::{leaked_words, ring_unit, FakeRegisters};
    use std::sync::Mutex;

    /// What the fake unit did with the descriptors: the IEC invalidations.
    #[derive(Default)]
    struct Executed {
        iec: u32,
    }

    /// A unit that carries out the descriptors up to IQT when it moves: waits write their
    /// status, interrupt-entry-cache invalidations are counted.
    fn fake_unit(ring: Words64) -> (&'static FakeRegisters, &'static Mutex<Executed>) {
        let done: &'static Mutex<Executed> = Box::leak(Box::default());
        let regs = ring_unit(regs::IQT, DESCRIPTOR_BYTES, move |at| {
            let at = (at / 8) as usize;
            let (lo, hi) = (
                ring.words[at].load(Ordering::Relaxed),
                ring.words[at + 1].load(Ordering::Relaxed),
            );
            match lo & 0xF {
                0x4 => done.lock().unwrap().iec += 1,
                0x5 => {
                    assert_ne!(lo & (1 << 5), 0, "status write asked");
                    // SAFETY: the address is the remapper's completion word, a leaked
                    // AtomicU32.
                    unsafe {
                        (*(hi as *const AtomicU32)).store((lo >> 32) as u32, Ordering::Release)
                    };
                }
                other => panic!("unexpected descriptor type {other:#x}"),
            }
        });
        (regs, done)
    }

    const AHCI: PciAddress = PciAddress {
        bus: 0,
        device: 0x1F,
        function: 2,
    };
    const IOAPIC: u64 = 0xFEC0_0000;
    const IOAPIC_SID: SourceId = SourceId::new(0xFF, 0, 0);

    type Fake = &'static FakeRegisters;

    fn setup() -> (&'static VtdRemapping<Fake>, &'static Mutex<Executed>) {
        let ring = leaked_words(512);
        let (unit, done) = fake_unit(ring);
        let completion: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
        let r: &'static VtdRemapping<Fake> = Box::leak(Box::new(VtdRemapping::new(
            leaked_words(2 * TABLE_ENTRIES),
            completion,
        )));
        r.add_unit(unit, ring).unwrap();
        r.add_ioapic(IOAPIC, IOAPIC_SID).unwrap();
        r.add_function(AHCI).unwrap();
        (r, done)
    }

    fn entry(r: &VtdRemapping<Fake>, handle: usize) -> Irte {
        Irte {
            lo: r.table.words[2 * handle].load(Ordering::Relaxed),
            hi: r.table.words[2 * handle + 1].load(Ordering::Relaxed),
        }
    }

    #[test]
    fn an_ioapic_pin_names_its_handle_and_its_entry_checks_the_ioapic() {
        let (r, unit) = setup();
        let rte = (0x02u64 << 56) | (1 << 15) | 0x31;
        let hw = r.ioapic_entry(IOAPIC, 9, rte);
        assert_eq!(hw, remappable_rte(9, rte));
        assert_eq!(hw & 0xFF, 0x31);
        let e = entry(r, 9);
        assert!(e.present() && e.level_triggered());
        assert_eq!((e.vector(), e.destination() >> 8), (0x31, 2));
        assert_eq!(
            (e.source_validation_type(), e.source_id()),
            (1, IOAPIC_SID.0)
        );
        assert_eq!(unit.lock().unwrap().iec, 1, "invalidated");
        assert_eq!(
            r.completion.load(Ordering::Relaxed),
            1,
            "the wait completed"
        );
        // SMI, INIT and ExtINT pins get no entry and stay masked on the hardware.
        for mode in [2u64, 5, 7] {
            let hw = r.ioapic_entry(IOAPIC, 9, (mode << 8) | 0x31);
            assert_ne!(hw & RTE_MASKED, 0, "mode {mode}");
            assert!(!entry(r, 9).present());
        }
    }

    #[test]
    fn an_msi_gets_its_block_and_the_32_vectors_check_the_function() {
        let (r, _) = setup();
        let m = r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_1000,
                data: 0x0060,
            }),
        );
        let first = 8 * usize::from(PINS_PER_IOAPIC);
        assert_eq!((m.address, m.data), (remappable_msi(first as u16).0, 0));
        for k in 0..32 {
            let e = entry(r, first + k);
            assert!(e.present());
            assert_eq!((e.vector(), e.destination() >> 8), (0x60 | k as u8, 1));
            assert_eq!(e.source_id(), SourceId::new(0, 0x1F, 2).0);
        }
        // An NMI is remapped (the guest's watchdog), INIT and SMI are not; an address
        // outside the window clears the block.
        r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_0000,
                data: 0x0500,
            }),
        );
        assert!(!entry(r, first).present());
        r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_0000,
                data: 0x0400,
            }),
        );
        assert_eq!(entry(r, first).delivery_mode(), 4);
        r.msi(
            AHCI,
            Some(Message {
                address: 0x3860_0000,
                data: 0x41,
            }),
        );
        assert!((0..32).all(|k| !entry(r, first + k).present()));
    }
}
