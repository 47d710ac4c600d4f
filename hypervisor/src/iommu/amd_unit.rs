//! Driving an AMD-Vi IOMMU: device table, command buffer and event log in place, translation
//! on; and the event log read for faults (AMD IOMMU 48882 rev. 3.x, 2.2 data structures,
//! 2.4 commands, 2.5 event log, 3.4 MMIO registers).
//!
//! The IOMMU is enabled once, before any guest runs, over a device table in which every
//! entry is valid (a DTE with V = 0 passes its device's DMA untranslated, 2.2.2.1), so no
//! invalidation commands are needed: the IOMMU caches nothing while disabled. Events are
//! polled, not signalled.

use super::amdvi::{device_table_base, regs, ring_base, Event, EVENT_SIZE};
use super::remapping::{FaultPoll, UnitError, UnitRegisters, POLLS};
use crate::addr::HostPhysAddr;

/// Entries of the command buffer and of the event log: 2^8 (the smallest, one 4 KiB page).
pub const RING_LEN_LOG2: u8 = 8;
/// Bytes of either ring.
pub const RING_BYTES: u64 = (1 << RING_LEN_LOG2) * EVENT_SIZE;

/// Head and tail pointers hold a byte offset in bits 18:4 (3.4.10, 3.4.12).
const POINTER_MASK: u64 = 0x7_FFF0;

/// Where the IOMMU's tables and rings lie.
#[derive(Clone, Copy, Debug)]
pub struct AmdViLayout {
    pub device_table: HostPhysAddr,
    /// Entries in the device table (a multiple of 128, at most 65536).
    pub device_entries: u32,
    pub command_buffer: HostPhysAddr,
    pub event_log: HostPhysAddr,
}

/// One IOMMU (an IVHD).
pub struct AmdViUnit<R> {
    regs: R,
}

impl<R: UnitRegisters> AmdViUnit<R> {
    pub fn new(regs: R) -> Self {
        Self { regs }
    }

    /// Whether translation is on.
    pub fn enabled(&self) -> bool {
        self.regs.read64(regs::CONTROL) & regs::CONTROL_IOMMU_EN != 0
    }

    /// Programs the base registers (with the IOMMU off: they may change only then, 3.4.1)
    /// and turns the command buffer, the event log and translation on.
    pub fn enable(&self, layout: &AmdViLayout) -> Result<(), UnitError> {
        let mut control = self.regs.read64(regs::CONTROL);
        if control & regs::CONTROL_IOMMU_EN != 0 {
            control &= !(regs::CONTROL_IOMMU_EN
                | regs::CONTROL_CMD_BUF_EN
                | regs::CONTROL_EVENT_LOG_EN
                | regs::CONTROL_EVENT_INT_EN
                | regs::CONTROL_COM_WAIT_INT_EN);
            self.regs.write64(regs::CONTROL, control);
        }
        self.regs.write64(
            regs::DEV_TABLE_BASE,
            device_table_base(layout.device_table, layout.device_entries),
        );
        self.regs.write64(
            regs::CMD_BUF_BASE,
            ring_base(layout.command_buffer, RING_LEN_LOG2),
        );
        self.regs.write64(regs::CMD_BUF_HEAD, 0);
        self.regs.write64(regs::CMD_BUF_TAIL, 0);
        self.regs.write64(
            regs::EVENT_LOG_BASE,
            ring_base(layout.event_log, RING_LEN_LOG2),
        );
        self.regs.write64(regs::EVENT_LOG_HEAD, 0);
        self.regs.write64(regs::EVENT_LOG_TAIL, 0);
        // Status bits are write-1-to-clear (3.4.13).
        self.regs.write64(
            regs::STATUS,
            regs::STATUS_EVENT_OVERFLOW | regs::STATUS_EVENT_LOG_INT | regs::STATUS_COM_WAIT_INT,
        );
        control |= regs::CONTROL_CMD_BUF_EN | regs::CONTROL_EVENT_LOG_EN;
        self.regs.write64(regs::CONTROL, control);
        control |= regs::CONTROL_IOMMU_EN;
        self.regs.write64(regs::CONTROL, control);
        let running = regs::STATUS_CMD_BUF_RUN | regs::STATUS_EVENT_LOG_RUN;
        (0..POLLS)
            .any(|_| self.regs.read64(regs::STATUS) & running == running)
            .then_some(())
            .ok_or(UnitError::Timeout {
                what: "starting the command buffer and the event log",
            })
    }

    /// Hands each event from the log's head on to `report` and moves the head past them;
    /// `read` fetches the entry at a byte offset of the log and `clear` zeroes it once
    /// taken. An entry is taken while it is not all zeros (no event is: its code is not),
    /// whatever the tail register says: QEMU 7.2's AMD-Vi writes events to the log but never
    /// advances the tail register (fixed in later QEMU); entries are cleared once taken, so
    /// a zero entry is where the log ends. After an overflow the log is restarted (3.4.13:
    /// EventOverflow stops it).
    pub fn take_events(
        &self,
        read: impl Fn(u64) -> [u32; 4],
        clear: impl Fn(u64),
        mut report: impl FnMut(Event),
    ) -> FaultPoll {
        let mut poll = FaultPoll::default();
        let mut head = self.regs.read64(regs::EVENT_LOG_HEAD) & POINTER_MASK;
        for _ in 0..1 << RING_LEN_LOG2 {
            let entry = read(head);
            if entry == [0; 4] {
                break;
            }
            report(Event::decode(entry));
            clear(head);
            poll.records += 1;
            head = (head + EVENT_SIZE) % RING_BYTES;
        }
        if poll.records > 0 {
            self.regs.write64(regs::EVENT_LOG_HEAD, head);
        }
        if self.regs.read64(regs::STATUS) & regs::STATUS_EVENT_OVERFLOW != 0 {
            poll.overflowed = true;
            let control = self.regs.read64(regs::CONTROL);
            self.regs
                .write64(regs::CONTROL, control & !regs::CONTROL_EVENT_LOG_EN);
            self.regs.write64(regs::STATUS, regs::STATUS_EVENT_OVERFLOW);
            self.regs.write64(regs::EVENT_LOG_HEAD, 0);
            self.regs.write64(regs::EVENT_LOG_TAIL, 0);
            self.regs.write64(regs::CONTROL, control);
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::amdvi::EVENT_IO_PAGE_FAULT;
    use crate::iommu::SourceId;
    use core::cell::RefCell;
    use std::collections::HashMap;

    /// A register file whose STATUS shows the rings running once enabled, and which logs
    /// writes.
    #[derive(Default)]
    struct FakeIommu {
        regs: RefCell<HashMap<usize, u64>>,
        log: RefCell<Vec<(usize, u64)>>,
    }

    impl UnitRegisters for &FakeIommu {
        fn read32(&self, o: usize) -> u32 {
            self.read64(o) as u32
        }
        fn write32(&self, o: usize, v: u32) {
            self.write64(o, u64::from(v));
        }
        fn read64(&self, o: usize) -> u64 {
            *self.regs.borrow().get(&o).unwrap_or(&0)
        }
        fn write64(&self, o: usize, v: u64) {
            self.log.borrow_mut().push((o, v));
            let mut r = self.regs.borrow_mut();
            match o {
                regs::STATUS => {
                    let s = r.get(&o).copied().unwrap_or(0);
                    r.insert(o, s & !v);
                }
                regs::CONTROL => {
                    r.insert(o, v);
                    let mut s = r.get(&regs::STATUS).copied().unwrap_or(0);
                    for (en, run) in [
                        (regs::CONTROL_CMD_BUF_EN, regs::STATUS_CMD_BUF_RUN),
                        (regs::CONTROL_EVENT_LOG_EN, regs::STATUS_EVENT_LOG_RUN),
                    ] {
                        if v & en != 0 && v & regs::CONTROL_IOMMU_EN != 0 {
                            s |= run;
                        } else {
                            s &= !run;
                        }
                    }
                    r.insert(regs::STATUS, s);
                }
                _ => {
                    r.insert(o, v);
                }
            }
        }
    }

    const LAYOUT: AmdViLayout = AmdViLayout {
        device_table: HostPhysAddr(0x4000_0000),
        device_entries: 65536,
        command_buffer: HostPhysAddr(0x4020_0000),
        event_log: HostPhysAddr(0x4020_1000),
    };

    #[test]
    fn the_bases_are_written_before_translation_goes_on() {
        let fake = FakeIommu::default();
        let unit = AmdViUnit::new(&fake);
        unit.enable(&LAYOUT).unwrap();
        assert!(unit.enabled());
        let log = fake.log.borrow();
        let at = |reg: usize| log.iter().position(|&(o, _)| o == reg).unwrap();
        let enabled = log
            .iter()
            .position(|&(o, v)| o == regs::CONTROL && v & regs::CONTROL_IOMMU_EN != 0)
            .unwrap();
        for reg in [
            regs::DEV_TABLE_BASE,
            regs::CMD_BUF_BASE,
            regs::EVENT_LOG_BASE,
        ] {
            assert!(at(reg) < enabled, "{reg:#x} after IommuEn: {log:?}");
        }
        // 2 MiB of entries: 512 pages, size field 1FFh; rings of 256 entries.
        assert_eq!((&fake).read64(regs::DEV_TABLE_BASE), 0x4000_0000 | 0x1FF);
        assert_eq!(
            (&fake).read64(regs::EVENT_LOG_BASE),
            0x4020_1000 | (8 << 56)
        );
    }

    #[test]
    fn events_between_head_and_tail_are_reported_and_consumed() {
        let fake = FakeIommu::default();
        let unit = AmdViUnit::new(&fake);
        unit.enable(&LAYOUT).unwrap();
        // Two IO_PAGE_FAULTs, the log wrapping: head at the last entry, tail at entry 1.
        fake.regs
            .borrow_mut()
            .insert(regs::EVENT_LOG_HEAD, RING_BYTES - EVENT_SIZE);
        fake.regs
            .borrow_mut()
            .insert(regs::EVENT_LOG_TAIL, EVENT_SIZE);
        let device = SourceId::new(0, 0x1F, 2);
        let event = |offset: u64| {
            let address = 0x3FE0_0000 + offset;
            [
                u32::from(device.0),
                (u32::from(EVENT_IO_PAGE_FAULT) << 28) | (u32::from(Event::FLAG_WRITE) << 16),
                address as u32,
                (address >> 32) as u32,
            ]
        };
        let memory = RefCell::new(vec![[0u32; 4]; 256]);
        memory.borrow_mut()[255] = event(RING_BYTES - EVENT_SIZE);
        memory.borrow_mut()[0] = event(0);
        let read = |o: u64| memory.borrow()[(o / EVENT_SIZE) as usize];
        let mut seen = Vec::new();
        let clear = |o: u64| memory.borrow_mut()[(o / EVENT_SIZE) as usize] = [0; 4];
        let poll = unit.take_events(read, clear, |e| seen.push(e));
        assert_eq!(poll.records, 2);
        assert!(!poll.overflowed);
        assert_eq!(seen[0].address, 0x3FE0_0000 + RING_BYTES - EVENT_SIZE);
        assert_eq!(seen[1].address, 0x3FE0_0000);
        assert_eq!(seen[0].device, device);
        assert_eq!((&fake).read64(regs::EVENT_LOG_HEAD), EVENT_SIZE);
        // The entries were taken; the log memory now reads zero there.
        let zero = |_| [0; 4];
        assert_eq!(
            unit.take_events(zero, |_| {}, |_| panic!("twice")).records,
            0
        );
    }

    #[test]
    fn events_behind_a_tail_that_never_moves_are_found_in_memory() {
        // QEMU 7.2: the tail register stays 0 while events are written at 0, 16, 32.
        let fake = FakeIommu::default();
        let unit = AmdViUnit::new(&fake);
        unit.enable(&LAYOUT).unwrap();
        let memory = RefCell::new(vec![[0u32; 4]; 256]);
        for i in 0..3 {
            memory.borrow_mut()[i] = [
                0x00fa,
                u32::from(EVENT_IO_PAGE_FAULT) << 28,
                0x1000 * i as u32,
                0,
            ];
        }
        let read = |o: u64| memory.borrow()[(o / EVENT_SIZE) as usize];
        let clear = |o: u64| memory.borrow_mut()[(o / EVENT_SIZE) as usize] = [0; 4];
        let mut seen = Vec::new();
        assert_eq!(
            unit.take_events(read, clear, |e| seen.push(e.address))
                .records,
            3
        );
        assert_eq!(seen, [0, 0x1000, 0x2000]);
        assert_eq!(
            unit.take_events(read, clear, |_| panic!("twice")).records,
            0
        );
    }

    #[test]
    fn an_overflowed_log_is_restarted() {
        let fake = FakeIommu::default();
        let unit = AmdViUnit::new(&fake);
        unit.enable(&LAYOUT).unwrap();
        let s = (&fake).read64(regs::STATUS);
        fake.regs
            .borrow_mut()
            .insert(regs::STATUS, s | regs::STATUS_EVENT_OVERFLOW);
        let poll = unit.take_events(|_| [0; 4], |_| {}, |_| {});
        assert!(poll.overflowed);
        assert_eq!(
            (&fake).read64(regs::STATUS) & regs::STATUS_EVENT_OVERFLOW,
            0
        );
        assert_ne!(
            (&fake).read64(regs::CONTROL) & regs::CONTROL_EVENT_LOG_EN,
            0,
            "the log runs again"
        );
    }
}
