//! AMD-Vi interrupt remapping (48882 rev. 3.x, 2.2.5 interrupt remapping tables, 2.4.5
//! INVALIDATE_INTERRUPT_TABLE, 2.4.1 COMPLETION_WAIT).
//!
//! Each interrupt source the guest programs has a table of its own, named by its device
//! table entry (IV = 1, IntCtl = remapped): every I/O APIC (found as an IVRS special device)
//! and every PCI function with MSI. Every other device ID's entry aborts its interrupts, and
//! no entry passes NMI, INIT, ExtINT or SMI (the pass bits stay clear): a bus master that
//! writes to 0xFEEx_xxxx by DMA reaches only its own table, whose valid entries name the
//! vectors and destinations the guest gave that device, filtered off the DPI cores.
//!
//! The basic 32-bit entry format is used (GAEn clear), in which a message's table index is
//! its data bits 10:0 (2.2.5.1): the delivery mode's low bit and the vector. So a device
//! gets the data `(mode << 8) | vector` with the guest's own vector, and its entry at that
//! index delivers the guest's vector; multi-message MSI ORs the message number into the
//! vector's low bits, so the 32 indices `vector | k` are all written. The address is plain
//! 0xFEE0_0000 (the entry holds the destination; QEMU 7.2 refuses any other). The I/O APIC
//! keeps the guest's vector in its redirection entry for the same reason, which the I/O
//! APIC also needs to match EOIs of level-triggered interrupts; two pins given one vector
//! share a slot (counted as a conflict, the later one wins).

use super::amdvi::{regs, Irte, IrteIntType, COMMAND_SIZE};
use super::interrupts::{await_invalidation, InterruptRemapping, IommuMemory, Message, COUNTERS};
use super::intremap::CompatInterrupt;
use super::remapping::UnitRegisters;
use super::SourceId;
use crate::cmdline::PciAddress;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Entries of each table: 2^9, every index a fixed or arbitrated message can carry.
pub const TABLE_LEN_LOG2: u8 = 9;
pub const TABLE_ENTRIES: usize = 1 << TABLE_LEN_LOG2;
/// Bytes of a table (4-byte entries; the DTE wants 128-byte alignment).
pub const TABLE_BYTES: usize = TABLE_ENTRIES * 4;
/// Entries of the command buffer (one 4 KiB page, as `amd_unit` sets it up).
const COMMAND_ENTRIES: usize = 256;
/// The interrupt address every remapped message uses.
const INTERRUPT_ADDRESS: u32 = 0xFEE0_0000;
/// Redirection entry bits (82093AA 3.2.4).
const RTE_MASKED: u64 = 1 << 16;
const RTE_LOGICAL: u64 = 1 << 11;
const RTE_DESTINATION: u64 = 0xFF << 56;
/// Vectors a multi-message MSI can use (PCI 3.0 6.8.1.3: at most 32).
const MSI_VECTORS: u8 = 32;

/// A remapping table or the command buffer: 32-bit words.
pub type Words = IommuMemory<AtomicU32>;

/// One interrupt source's table.
struct Source<K> {
    key: K,
    device: SourceId,
    table: Words,
}

struct IoApicSource {
    source: Source<u64>,
    /// Which pin (plus one) holds each slot; 0: none.
    owner: [u8; TABLE_ENTRIES],
}

/// One IOMMU's command buffer.
struct Commands<R> {
    regs: R,
    ring: Words,
    /// Byte offset of the next command.
    tail: u64,
}

struct Inner<R> {
    units: heapless::Vec<Commands<R>, 8>,
    ioapics: heapless::Vec<IoApicSource, 8>,
    functions: heapless::Vec<Source<PciAddress>, 64>,
    /// The value the next COMPLETION_WAIT stores.
    sequence: u64,
}

/// The remapping tables and the IOMMUs' command buffers, behind one lock (a guard's
/// update writes entries, then invalidates them on every IOMMU, then returns).
pub struct AmdRemapping<R> {
    inner: spin::Mutex<Inner<R>>,
    /// Where COMPLETION_WAIT stores `sequence` (Ally's memory, identity-mapped).
    completion: &'static AtomicU64,
}

/// Why a source could not be added.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TooManySources;

impl<R: UnitRegisters> AmdRemapping<R> {
    pub fn new(completion: &'static AtomicU64) -> Self {
        Self {
            inner: spin::Mutex::new(Inner {
                units: heapless::Vec::new(),
                ioapics: heapless::Vec::new(),
                functions: heapless::Vec::new(),
                sequence: 0,
            }),
            completion,
        }
    }

    /// An enabled IOMMU whose command buffer is `ring` (empty: head and tail 0).
    pub fn add_unit(&self, regs: R, ring: Words) -> Result<(), TooManySources> {
        self.inner
            .lock()
            .units
            .push(Commands {
                regs,
                ring,
                // `amd_unit` starts the buffer with head and tail 0.
                tail: 0,
            })
            .map_err(|_| TooManySources)
    }

    /// The I/O APIC at `base`, whose messages carry `device`, remapped through `table`
    /// (zeroed: every entry invalid).
    pub fn add_ioapic(
        &self,
        base: u64,
        device: SourceId,
        table: Words,
    ) -> Result<(), TooManySources> {
        self.inner
            .lock()
            .ioapics
            .push(IoApicSource {
                source: Source {
                    key: base,
                    device,
                    table,
                },
                owner: [0; TABLE_ENTRIES],
            })
            .map_err(|_| TooManySources)
    }

    /// The MSI function at `function`, remapped through `table` (zeroed).
    pub fn add_function(&self, function: PciAddress, table: Words) -> Result<(), TooManySources> {
        let device = SourceId::from(function);
        self.inner
            .lock()
            .functions
            .push(Source {
                key: function,
                device,
                table,
            })
            .map_err(|_| TooManySources)
    }
}

fn write_entry(table: &Words, index: usize, irte: Irte) {
    table.words[index % TABLE_ENTRIES].store(irte.0, Ordering::Relaxed);
}

/// The entry for a fixed or arbitrated interrupt, or `None` for a mode the basic format
/// cannot remap (the DTE's pass bits, all clear, decide those: blocked).
fn irte_for(c: &CompatInterrupt) -> Option<(usize, Irte)> {
    let int_type = match c.delivery {
        0 => IrteIntType::Fixed,
        1 => IrteIntType::Arbitrated,
        _ => return None,
    };
    let index = (usize::from(c.delivery) << 8) | usize::from(c.vector);
    Some((
        index,
        Irte::remapped(c.vector, c.destination, c.logical, int_type, false),
    ))
}

impl<R: UnitRegisters> Inner<R> {
    /// INVALIDATE_INTERRUPT_TABLE for `device` on every IOMMU, each followed by a
    /// COMPLETION_WAIT whose store is awaited, so the entries written are in force when the
    /// guard returns.
    fn invalidate(&mut self, device: SourceId, completion: &AtomicU64) {
        // The entries' stores before the commands that make the IOMMU read them.
        fence(Ordering::SeqCst);
        for unit in self.units.iter_mut() {
            self.sequence += 1;
            let store = completion as *const AtomicU64 as u64;
            let invalidate = [u32::from(device.0), 0x5 << 28, 0, 0];
            let wait = [
                (store as u32 & !7) | 1,
                ((store >> 32) as u32 & 0xF_FFFF) | (0x1 << 28),
                self.sequence as u32,
                (self.sequence >> 32) as u32,
            ];
            unit.submit(invalidate);
            unit.submit(wait);
            fence(Ordering::SeqCst);
            unit.regs.write64(regs::CMD_BUF_TAIL, unit.tail);
            let sequence = self.sequence;
            if !await_invalidation(|| completion.load(Ordering::Acquire) >= sequence)
                && crate::log_limit::IOMMU_COMMAND.admit()
            {
                log::warn!(
                    "ALLY intremap-invalidation-timeout kind=amd-vi device={device} sequence={}",
                    self.sequence
                );
            }
        }
    }
}

impl<R: UnitRegisters> Commands<R> {
    /// Places one command at the tail (the caller then publishes the tail).
    fn submit(&mut self, command: [u32; 4]) {
        let at = (self.tail / 4) as usize;
        for (i, word) in command.iter().enumerate() {
            self.ring.words[at + i].store(*word, Ordering::Relaxed);
        }
        self.tail = (self.tail + COMMAND_SIZE) % (COMMAND_ENTRIES as u64 * COMMAND_SIZE);
    }
}

impl<R: UnitRegisters + Send> InterruptRemapping for AmdRemapping<R> {
    fn ioapic_entry(&self, ioapic_base: u64, pin: u8, rte: u64) -> u64 {
        let mut inner = self.inner.lock();
        let Some(at) = inner
            .ioapics
            .iter()
            .position(|s| s.source.key == ioapic_base)
        else {
            // No table (no IVRS entry for it): its messages are aborted anyway.
            return rte | RTE_MASKED;
        };
        let c = CompatInterrupt::from_ioapic_rte(rte);
        let masked = rte & RTE_MASKED != 0;
        let Some((index, irte)) = irte_for(&c) else {
            if !masked {
                COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
            }
            return rte | RTE_MASKED;
        };
        if !masked {
            let ioapic = &mut inner.ioapics[at];
            let owner = ioapic.owner[index];
            if owner != 0 && owner != pin + 1 {
                COUNTERS.conflicts.fetch_add(1, Ordering::Relaxed);
                if crate::log_limit::INTREMAP.admit() {
                    log::warn!(
                        "ALLY intremap-conflict ioapic={ioapic_base:#x} pin={pin} other-pin={} vector={:#x}",
                        owner - 1,
                        c.vector
                    );
                }
            }
            ioapic.owner[index] = pin + 1;
            write_entry(&ioapic.source.table, index, irte);
            let device = ioapic.source.device;
            COUNTERS.entries.fetch_add(1, Ordering::Relaxed);
            inner.invalidate(device, self.completion);
        }
        // Physical destination 0: the message's address is plain 0xFEE0_0000.
        rte & !(RTE_DESTINATION | RTE_LOGICAL)
    }

    fn msi(&self, function: PciAddress, message: Option<Message>) -> Message {
        let mut inner = self.inner.lock();
        let refused = Message {
            address: INTERRUPT_ADDRESS,
            data: 0,
        };
        let Some(at) = inner.functions.iter().position(|s| s.key == function) else {
            return refused;
        };
        let source = &inner.functions[at];
        for word in source.table.words {
            word.store(0, Ordering::Relaxed);
        }
        // The 32 vectors a multi-message MSI may use, each at its own index (the first is
        // the message's); none for a mode the basic format cannot remap.
        let mut first = None;
        if let Some(c) =
            message.and_then(|m| CompatInterrupt::from_msi(m.address, u32::from(m.data)).ok())
        {
            for k in 0..MSI_VECTORS {
                if let Some((i, irte)) = irte_for(&CompatInterrupt {
                    vector: c.vector | k,
                    ..c
                }) {
                    write_entry(&source.table, i, irte);
                    first.get_or_insert(i);
                }
            }
        }
        let result = match first {
            Some(index) => {
                COUNTERS.entries.fetch_add(1, Ordering::Relaxed);
                Message {
                    address: INTERRUPT_ADDRESS,
                    data: index as u16,
                }
            }
            None => {
                if message.is_some_and(|m| m.data != 0 || m.address != 0) {
                    COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                }
                refused
            }
        };
        let device = source.device;
        inner.invalidate(device, self.completion);
        result
    }

    fn kind(&self) -> &'static str {
        "amd-vi"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::testutil::{leaked_words, ring_unit, FakeRegisters};
    use std::sync::Mutex;

    /// What the fake IOMMU did with the commands: the invalidated device IDs.
    #[derive(Default)]
    struct Executed {
        invalidated: Vec<u16>,
    }

    /// An IOMMU that carries out the commands up to the tail when it moves: COMPLETION_WAIT
    /// stores, INVALIDATE_INTERRUPT_TABLE recorded.
    fn fake_unit(ring: Words) -> (&'static FakeRegisters, &'static Mutex<Executed>) {
        let done: &'static Mutex<Executed> = Box::leak(Box::default());
        let regs = ring_unit(regs::CMD_BUF_TAIL, COMMAND_SIZE, move |at| {
            let at = (at / 4) as usize;
            let w: Vec<u32> = (0..4)
                .map(|i| ring.words[at + i].load(Ordering::Relaxed))
                .collect();
            match w[1] >> 28 {
                0x5 => done.lock().unwrap().invalidated.push(w[0] as u16),
                0x1 => {
                    assert_eq!(w[0] & 1, 1, "store requested");
                    let address = u64::from(w[0] & !7) | (u64::from(w[1] & 0xF_FFFF) << 32);
                    let data = u64::from(w[2]) | (u64::from(w[3]) << 32);
                    // SAFETY: the address is the remapper's completion word, a leaked
                    // AtomicU64.
                    unsafe { (*(address as *const AtomicU64)).store(data, Ordering::Release) };
                }
                other => panic!("unexpected command {other:#x}"),
            }
        });
        (regs, done)
    }

    fn words(n: usize) -> Words {
        leaked_words(n)
    }

    const AHCI: PciAddress = PciAddress {
        bus: 0,
        device: 0x1F,
        function: 2,
    };
    const IOAPIC: u64 = 0xFEC0_0000;

    type Fake = &'static FakeRegisters;

    fn setup() -> (
        &'static AmdRemapping<Fake>,
        &'static Mutex<Executed>,
        Words,
        Words,
    ) {
        let ring = words(1024);
        let (unit, done) = fake_unit(ring);
        let completion: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let r: &'static AmdRemapping<Fake> = Box::leak(Box::new(AmdRemapping::new(completion)));
        r.add_unit(unit, ring).unwrap();
        let (ioapic_table, msi_table) = (words(TABLE_ENTRIES), words(TABLE_ENTRIES));
        r.add_ioapic(IOAPIC, SourceId::new(0, 0x14, 0), ioapic_table)
            .unwrap();
        r.add_function(AHCI, msi_table).unwrap();
        (r, done, ioapic_table, msi_table)
    }

    fn entry(t: &Words, i: usize) -> Irte {
        Irte(t.words[i].load(Ordering::Relaxed))
    }

    #[test]
    fn an_ioapic_pin_keeps_its_vector_and_its_entry_holds_the_destination() {
        let (r, unit, table, _) = setup();
        // Level, logical destination 0x02, vector 0x31, unmasked.
        let rte = (0x02u64 << 56) | (1 << 15) | (1 << 11) | 0x31;
        let hw = r.ioapic_entry(IOAPIC, 9, rte);
        assert_eq!(
            hw & 0xFF,
            0x31,
            "the vector stays: it indexes the table and EOIs"
        );
        assert_eq!(hw & (RTE_DESTINATION | RTE_LOGICAL), 0, "plain 0xFEE00000");
        assert_ne!(hw & (1 << 15), 0, "trigger mode kept");
        let e = entry(&table, 0x31);
        assert!(e.remap_enabled() && e.logical());
        assert_eq!((e.vector(), e.destination()), (0x31, 0x02));
        assert_eq!(
            unit.lock().unwrap().invalidated,
            vec![SourceId::new(0, 0x14, 0).0]
        );
        assert!(
            r.completion.load(Ordering::Relaxed) >= 1,
            "the wait completed"
        );
    }

    #[test]
    fn a_masked_pin_writes_nothing_and_nmi_or_init_pins_stay_masked() {
        let (r, unit, table, _) = setup();
        let hw = r.ioapic_entry(IOAPIC, 3, RTE_MASKED | 0x40);
        assert_ne!(hw & RTE_MASKED, 0);
        assert!(table.words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        for mode in [2u64, 4, 5, 7] {
            let hw = r.ioapic_entry(IOAPIC, 4, (mode << 8) | 0x41);
            assert_ne!(hw & RTE_MASKED, 0, "mode {mode} masked on the hardware");
        }
        assert!(table.words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        assert!(unit.lock().unwrap().invalidated.is_empty());
    }

    #[test]
    fn an_msi_becomes_an_index_and_its_32_message_vectors_are_written() {
        let (r, _, _, table) = setup();
        let m = r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_1000,
                data: 0x0160,
            }),
        );
        assert_eq!(
            m,
            Message {
                address: 0xFEE0_0000,
                data: 0x0160
            }
        );
        for k in 0..32 {
            let e = entry(&table, 0x160 | k);
            assert!(e.remap_enabled(), "{k}");
            assert_eq!(
                (e.vector(), e.destination(), e.int_type()),
                (0x60 | k as u8, 1, 1)
            );
        }
        assert_eq!(entry(&table, 0x60).0, 0, "fixed-mode slots stay empty");
        // Reprogrammed to another vector: the old entries go.
        let m = r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_0000,
                data: 0x0041,
            }),
        );
        assert_eq!(m.data, 0x41);
        assert_eq!(entry(&table, 0x160).0, 0);
        assert_eq!(entry(&table, 0x41).vector(), 0x41);
    }

    #[test]
    fn a_refused_msi_leaves_every_entry_invalid() {
        let (r, _, _, table) = setup();
        r.msi(
            AHCI,
            Some(Message {
                address: 0xFEE0_0000,
                data: 0x41,
            }),
        );
        for (address, data) in [
            (0x3860_0000, 0x41),
            (0xFEE0_0000, 0x0400),
            (0xFEE0_0000, 0x0500),
        ] {
            let m = r.msi(AHCI, Some(Message { address, data }));
            assert_eq!(m.data, 0);
            assert!(
                table.words.iter().all(|w| w.load(Ordering::Relaxed) == 0),
                "{address:#x} {data:#x}"
            );
        }
        // An unknown function gets the plain address and no entry anywhere.
        let other = PciAddress {
            bus: 0,
            device: 2,
            function: 0,
        };
        assert_eq!(
            r.msi(
                other,
                Some(Message {
                    address: 0xFEE0_0000,
                    data: 0x41
                })
            )
            .data,
            0
        );
    }

    #[test]
    fn two_pins_with_one_vector_are_a_conflict_the_later_wins() {
        let (r, _, table, _) = setup();
        let before = COUNTERS.conflicts.load(Ordering::Relaxed);
        r.ioapic_entry(IOAPIC, 1, 0x31);
        r.ioapic_entry(IOAPIC, 2, (1u64 << 56) | 0x31);
        assert!(COUNTERS.conflicts.load(Ordering::Relaxed) > before);
        assert_eq!(entry(&table, 0x31).destination(), 1);
    }
}
