//! Driving a VT-d remapping unit: turning DMA translation on over Ally's root table, and
//! collecting the faults it records (Intel VT-d rev. 4.1, 6.5 invalidation, 10.4 registers).
//!
//! Register-based invalidation only (no invalidation queue): Ally sets its tables up once,
//! before any guest runs, so the handful of global invalidations at enable time are all it
//! needs. Faults are polled, not signalled: the fault event interrupt stays masked (an
//! interrupt would need a vector on some CPU, and the DPI core looks at the unit anyway).
//!
//! The logic runs over [`UnitRegisters`], a fake register file in the tests.

use super::vtd::{self, regs, Cap, Ecap, FaultRecord};
use super::PagingLevels;
use crate::addr::HostPhysAddr;
use core::fmt;

/// The unit's register page.
pub trait UnitRegisters {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    fn read64(&self, offset: usize) -> u64;
    fn write64(&self, offset: usize, value: u64);
}

/// Reads allowed for a command to complete (the hardware takes microseconds; an emulator
/// completes it at once).
pub const POLLS: u32 = 1_000_000;

/// GSTS bits that stay as they are when another command is written to GCMD (10.4.4: software
/// reads GSTS, keeps its persistent enables and clears the one-shot commands SRTP, SFL, WBF
/// and SIRTP).
const GCMD_PERSISTENT: u32 = 0x96FF_FFFF;

/// Errors of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnitError {
    /// The unit supports neither 3- nor 4-level tables reaching the memory to map.
    NoUsableWidth { sagaw: u8, mgaw: u32, needed: u64 },
    /// Only scalable mode: Ally programs legacy-mode root and context tables.
    ScalableModeOnly,
    /// A command did not complete.
    Timeout { what: &'static str },
    /// The unit cannot remap interrupts (ECAP.IR) or has no invalidation queue (ECAP.QI,
    /// which remapping needs to invalidate its interrupt entry cache, VT-d 6.5.2).
    NoInterruptRemapping,
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoUsableWidth {
                sagaw,
                mgaw,
                needed,
            } => write!(
                f,
                "the unit's page-table widths (SAGAW {sagaw:#07b}, MGAW {mgaw} bits) do not reach {needed:#x}"
            ),
            Self::ScalableModeOnly => {
                write!(f, "the unit supports only scalable-mode translation")
            }
            Self::Timeout { what } => write!(f, "the unit did not complete {what}"),
            Self::NoInterruptRemapping => write!(
                f,
                "the unit cannot remap interrupts (ECAP.IR or ECAP.QI clear): a device could send any interrupt to any CPU, a DPI core included"
            ),
        }
    }
}

/// What [`VtdUnit::take_faults`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct FaultPoll {
    pub records: u32,
    /// The unit lost faults: its recording registers were full (FSTS.PFO).
    pub overflowed: bool,
}

/// One remapping unit (a DMAR's DRHD).
pub struct VtdUnit<R> {
    regs: R,
    pub cap: Cap,
    pub ecap: Ecap,
}

impl<R: UnitRegisters> VtdUnit<R> {
    pub fn new(regs: R) -> Self {
        let cap = Cap(regs.read64(regs::CAP));
        let ecap = Ecap(regs.read64(regs::ECAP));
        Self { regs, cap, ecap }
    }

    /// The table depth for memory up to `max_addr` (exclusive).
    pub fn levels_for(&self, max_addr: u64) -> Result<PagingLevels, UnitError> {
        self.cap
            .levels_for(max_addr)
            .ok_or(UnitError::NoUsableWidth {
                sagaw: ((self.cap.0 >> 8) & 0x1F) as u8,
                mgaw: self.cap.max_guest_address_width(),
                needed: max_addr,
            })
    }

    /// GSTS (VT-d 11.4.5): what the unit has on.
    pub fn global_status(&self) -> u32 {
        self.regs.read32(regs::GSTS)
    }

    /// Whether translation is on.
    pub fn enabled(&self) -> bool {
        self.regs.read32(regs::GSTS) & regs::GSTS_TES != 0
    }

    /// Points the unit at `root` (legacy mode) and turns translation on: root pointer set
    /// (10.4.6, GCMD.SRTP), context cache and IOTLB invalidated globally (6.5.1; the unit may
    /// hold entries from the firmware's use), write buffers flushed where CAP.RWBF asks
    /// (6.8), then GCMD.TE. Fault events stay masked.
    pub fn enable(&self, root: HostPhysAddr) -> Result<(), UnitError> {
        // Legacy-mode tables need the legacy root-table format; a unit that has only
        // scalable mode reports SMTS without legacy support (ECAP.SMTS and CAP.ESRTPS).
        if self.ecap.scalable_mode() && self.cap.0 & (1 << 63) != 0 {
            return Err(UnitError::ScalableModeOnly);
        }
        self.regs
            .write32(regs::FECTL, self.regs.read32(regs::FECTL) | regs::FECTL_IM);
        self.regs.write64(regs::RTADDR, vtd::rtaddr(root));
        self.command(regs::GCMD_SRTP);
        self.wait32(
            regs::GSTS,
            regs::GSTS_RTPS,
            true,
            "setting the root-table pointer",
        )?;
        self.regs
            .write64(regs::CCMD, regs::CCMD_ICC | regs::CCMD_GLOBAL);
        self.wait64(regs::CCMD, regs::CCMD_ICC, "the context-cache invalidation")?;
        let iotlb = self.ecap.iotlb_offset() + 8;
        self.regs.write64(
            iotlb,
            regs::IOTLB_IVT | regs::IOTLB_GLOBAL | regs::IOTLB_DR | regs::IOTLB_DW,
        );
        self.wait64(iotlb, regs::IOTLB_IVT, "the IOTLB invalidation")?;
        if self.cap.required_write_buffer_flush() {
            self.command(regs::GCMD_WBF);
            self.wait32(regs::GSTS, regs::GSTS_WBFS, false, "the write-buffer flush")?;
        }
        self.command(regs::GCMD_TE);
        self.wait32(regs::GSTS, regs::GSTS_TES, true, "enabling translation")?;
        // Protected memory regions a pre-boot environment may have left on (10.4.16)
        // would block the guest's own DMA to them; translation now decides.
        if self.cap.protected_low_memory() || self.cap.protected_high_memory() {
            self.regs.write32(regs::PMEN, 0);
            self.wait32(
                regs::PMEN,
                regs::PMEN_PRS,
                false,
                "turning the protected memory regions off",
            )?;
        }
        Ok(())
    }

    /// Turns queued invalidation on with the one-page queue at `queue` (VT-d 6.5.2: IQT
    /// zeroed, IQA, GCMD.QIE). Register-based invalidation must not be used afterwards.
    pub fn enable_queued_invalidation(&self, queue: HostPhysAddr) -> Result<(), UnitError> {
        if !self.ecap.queued_invalidation() || !self.ecap.interrupt_remapping() {
            return Err(UnitError::NoInterruptRemapping);
        }
        self.regs.write64(regs::IQT, 0);
        self.regs.write64(regs::IQA, vtd::iqa(queue, 0));
        self.command(regs::GCMD_QIE);
        self.wait32(
            regs::GSTS,
            regs::GSTS_QIES,
            true,
            "enabling queued invalidation",
        )
    }

    /// Points the unit at the interrupt remapping table of 2^(`size` + 1) entries at
    /// `table` (xAPIC destinations: EIME clear), GCMD.SIRTP (VT-d 10.4.31). The caller then
    /// invalidates the interrupt entry cache globally and calls
    /// [`Self::enable_interrupt_remapping`].
    pub fn set_interrupt_table(&self, table: HostPhysAddr, size: u8) -> Result<(), UnitError> {
        if !self.ecap.interrupt_remapping() {
            return Err(UnitError::NoInterruptRemapping);
        }
        self.regs.write64(regs::IRTA, vtd::irta(table, size, false));
        self.command(regs::GCMD_SIRTP);
        self.wait32(
            regs::GSTS,
            regs::GSTS_IRTPS,
            true,
            "setting the interrupt remapping table pointer",
        )
    }

    /// Turns interrupt remapping on with compatibility-format interrupts blocked (GCMD.CFI
    /// clear, VT-d 5.1.2.1): only remappable requests naming an entry Ally wrote are
    /// delivered.
    pub fn enable_interrupt_remapping(&self) -> Result<(), UnitError> {
        let status = self.regs.read32(regs::GSTS) & GCMD_PERSISTENT & !regs::GCMD_CFI;
        self.regs.write32(regs::GCMD, status | regs::GCMD_IRE);
        self.wait32(
            regs::GSTS,
            regs::GSTS_IRES,
            true,
            "enabling interrupt remapping",
        )?;
        self.wait32(
            regs::GSTS,
            regs::GSTS_CFIS,
            false,
            "blocking compatibility-format interrupts",
        )
    }

    /// Hands each recorded fault to `report` and clears it (10.4.14: F is write-1-to-clear),
    /// starting at the index FSTS.FRI names; clears FSTS.PFO after an overflow.
    pub fn take_faults(&self, mut report: impl FnMut(FaultRecord)) -> FaultPoll {
        let fsts = self.regs.read32(regs::FSTS);
        let mut poll = FaultPoll::default();
        if fsts & regs::FSTS_PPF != 0 {
            let count = self.cap.fault_recording_count();
            let first = vtd::fault_record_index(fsts) as usize;
            for i in 0..count {
                let offset = self.cap.fault_record_offset((first + i) % count);
                let hi = self.regs.read64(offset + 8);
                let Some(record) = FaultRecord::decode(self.regs.read64(offset), hi) else {
                    continue;
                };
                self.regs.write64(offset + 8, 1 << 63);
                poll.records += 1;
                report(record);
            }
        }
        if fsts & regs::FSTS_PFO != 0 {
            self.regs.write32(regs::FSTS, regs::FSTS_PFO);
            poll.overflowed = true;
        }
        poll
    }

    /// Issues one GCMD command, keeping the enables already on.
    fn command(&self, bit: u32) {
        let status = self.regs.read32(regs::GSTS) & GCMD_PERSISTENT;
        self.regs.write32(regs::GCMD, status | bit);
    }

    fn wait32(
        &self,
        offset: usize,
        bit: u32,
        set: bool,
        what: &'static str,
    ) -> Result<(), UnitError> {
        (0..POLLS)
            .any(|_| (self.regs.read32(offset) & bit != 0) == set)
            .then_some(())
            .ok_or(UnitError::Timeout { what })
    }

    fn wait64(&self, offset: usize, bit: u64, what: &'static str) -> Result<(), UnitError> {
        (0..POLLS)
            .any(|_| self.regs.read64(offset) & bit == 0)
            .then_some(())
            .ok_or(UnitError::Timeout { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::vtd::FaultAccess;
    use crate::iommu::SourceId;
    use core::cell::RefCell;
    use std::collections::HashMap;

    /// CAP as QEMU 7.2's intel-iommu reports it (aw-bits=39): SAGAW 3 levels, MGAW 39, FRO
    /// at 0x220, NFR 1 (here 4, to test the wrap), ND 2, 2 MiB pages.
    const CAP: u64 = (2) | (1 << 9) | (38 << 16) | ((0x220 / 16) << 24) | (1 << 34) | (3 << 40);
    /// ECAP: IRO at 0x200, QI, IR.
    const ECAP: u64 = (1 << 1) | (1 << 3) | ((0x200 / 16) << 8);
    const IOTLB: usize = 0x208;

    /// A register file whose GSTS follows GCMD, whose invalidations complete at once, and
    /// which logs every write.
    #[derive(Default)]
    struct FakeUnit {
        regs: RefCell<HashMap<usize, u64>>,
        log: RefCell<Vec<String>>,
        stuck_te: bool,
    }

    impl FakeUnit {
        fn new() -> Self {
            let u = FakeUnit::default();
            u.regs.borrow_mut().insert(regs::CAP, CAP);
            u.regs.borrow_mut().insert(regs::ECAP, ECAP);
            u
        }
        fn get(&self, o: usize) -> u64 {
            *self.regs.borrow().get(&o).unwrap_or(&0)
        }
        fn set(&self, o: usize, v: u64) {
            self.regs.borrow_mut().insert(o, v);
        }
    }

    impl UnitRegisters for &FakeUnit {
        fn read32(&self, o: usize) -> u32 {
            self.get(o) as u32
        }
        fn write32(&self, o: usize, v: u32) {
            self.log.borrow_mut().push(format!("w32 {o:#x} {v:#x}"));
            match o {
                regs::GCMD => {
                    // The enables follow GCMD; the pointer-set statuses latch.
                    let enables = regs::GCMD_QIE | regs::GCMD_IRE | regs::GCMD_CFI;
                    let mut sts =
                        (self.get(regs::GSTS) as u32 & GCMD_PERSISTENT & !enables) | (v & enables);
                    if v & regs::GCMD_SRTP != 0 {
                        sts |= regs::GSTS_RTPS;
                    }
                    if v & regs::GCMD_SIRTP != 0 {
                        sts |= regs::GSTS_IRTPS;
                    }
                    if v & regs::GCMD_TE != 0 && !self.stuck_te {
                        sts |= regs::GSTS_TES;
                    }
                    self.set(regs::GSTS, u64::from(sts));
                }
                regs::FSTS => self.set(o, self.get(o) & !u64::from(v)),
                _ => self.set(o, u64::from(v)),
            }
        }
        fn read64(&self, o: usize) -> u64 {
            self.get(o)
        }
        fn write64(&self, o: usize, v: u64) {
            self.log.borrow_mut().push(format!("w64 {o:#x} {v:#x}"));
            match o {
                regs::CCMD => self.set(o, v & !regs::CCMD_ICC),
                IOTLB => self.set(o, v & !regs::IOTLB_IVT),
                o if o >= 0x220 && (o - 0x220) % 16 == 8 => {
                    self.set(o, self.get(o) & !(v & (1 << 63)))
                }
                _ => self.set(o, v),
            }
        }
    }

    #[test]
    fn translation_goes_on_after_the_root_pointer_and_the_invalidations() {
        let fake = FakeUnit::new();
        let unit = VtdUnit::new(&fake);
        assert_eq!(unit.levels_for(1 << 30), Ok(PagingLevels::Three));
        assert!(matches!(
            unit.levels_for(1 << 40),
            Err(UnitError::NoUsableWidth { .. })
        ));
        unit.enable(HostPhysAddr(0x7F00_0000)).unwrap();
        assert!(unit.enabled());
        let log = fake.log.borrow();
        let at = |prefix: &str| {
            log.iter()
                .position(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {log:?}"))
        };
        let root = at("w64 0x20 0x7f000000");
        let srtp = at("w32 0x18 0x40000000");
        let context = at("w64 0x28");
        let iotlb = at("w64 0x208");
        let te = at("w32 0x18 0x80000000");
        assert!(
            root < srtp && srtp < context && context < iotlb && iotlb < te,
            "{log:?}"
        );
        assert_ne!(
            fake.get(regs::FECTL) as u32 & regs::FECTL_IM,
            0,
            "fault events masked"
        );
        // QEMU's CAP has no PLMR/PHMR: PMEN is left alone.
        assert!(!log.iter().any(|l| l.starts_with("w32 0x64")), "{log:?}");
    }

    #[test]
    fn protected_memory_regions_go_off_once_translation_is_on() {
        let fake = FakeUnit::new();
        fake.set(regs::CAP, CAP | (1 << 5) | (1 << 6));
        fake.set(regs::PMEN, u64::from(regs::PMEN_EPM | regs::PMEN_PRS));
        VtdUnit::new(&fake).enable(HostPhysAddr(0x1000)).unwrap();
        assert_eq!(fake.get(regs::PMEN), 0);
        let log = fake.log.borrow();
        let te = log.iter().position(|l| l == "w32 0x18 0x80000000").unwrap();
        let pmen = log.iter().position(|l| l.starts_with("w32 0x64")).unwrap();
        assert!(te < pmen, "{log:?}");
    }

    #[test]
    fn a_unit_that_does_not_translate_is_an_error() {
        let fake = FakeUnit {
            stuck_te: true,
            ..FakeUnit::new()
        };
        let unit = VtdUnit::new(&fake);
        assert_eq!(
            unit.enable(HostPhysAddr(0x1000)),
            Err(UnitError::Timeout {
                what: "enabling translation"
            })
        );
    }

    #[test]
    fn interrupt_remapping_goes_on_with_compatibility_format_blocked() {
        let fake = FakeUnit::new();
        // The firmware left compatibility-format interrupts allowed.
        fake.set(regs::GSTS, u64::from(regs::GSTS_CFIS));
        let unit = VtdUnit::new(&fake);
        unit.enable(HostPhysAddr(0x1000)).unwrap();
        unit.enable_queued_invalidation(HostPhysAddr(0x2000))
            .unwrap();
        assert_eq!(fake.get(regs::IQA), 0x2000);
        unit.set_interrupt_table(HostPhysAddr(0x3000), 11).unwrap();
        assert_eq!(
            fake.get(regs::IRTA),
            0x3000 | 11,
            "4096 entries, EIME clear"
        );
        unit.enable_interrupt_remapping().unwrap();
        let gsts = fake.get(regs::GSTS) as u32;
        assert_ne!(gsts & regs::GSTS_IRES, 0);
        assert_ne!(gsts & regs::GSTS_QIES, 0);
        assert_ne!(gsts & regs::GSTS_TES, 0, "translation stays on");
        assert_eq!(gsts & regs::GSTS_CFIS, 0, "compatibility format blocked");
        // A unit without IR is refused.
        let plain = FakeUnit::new();
        plain.set(regs::ECAP, ECAP & !(1 << 3));
        assert_eq!(
            VtdUnit::new(&plain).enable_queued_invalidation(HostPhysAddr(0x2000)),
            Err(UnitError::NoInterruptRemapping)
        );
    }

    #[test]
    fn faults_are_reported_once_and_cleared() {
        let fake = FakeUnit::new();
        let unit = VtdUnit::new(&fake);
        // Two records, the first at index 3 (FSTS.FRI), the second wrapping to 0.
        let record = |i: usize, addr: u64, sid: SourceId, reason: u64, read: bool| {
            fake.set(0x220 + 16 * i, addr);
            fake.set(
                0x220 + 16 * i + 8,
                (1 << 63) | (u64::from(read) << 62) | (reason << 32) | u64::from(sid.0),
            );
        };
        record(3, 0x3FE0_0000, SourceId::new(0, 0x1F, 2), 0x05, false);
        record(0, 0x3FE0_1000, SourceId::new(0, 0x1F, 2), 0x06, true);
        fake.set(
            regs::FSTS,
            (3 << 8) | u64::from(regs::FSTS_PPF | regs::FSTS_PFO),
        );
        let mut seen = Vec::new();
        let poll = unit.take_faults(|r| seen.push(r));
        assert_eq!(
            poll,
            FaultPoll {
                records: 2,
                overflowed: true
            }
        );
        assert_eq!(seen[0].address, 0x3FE0_0000);
        assert_eq!(seen[0].access, FaultAccess::Write);
        assert_eq!(seen[0].reason, 0x05);
        assert_eq!(seen[1].access, FaultAccess::Read);
        assert_eq!(seen[1].source, SourceId::new(0, 0x1F, 2));
        // Cleared: nothing the second time.
        fake.set(regs::FSTS, u64::from(regs::FSTS_PPF));
        assert_eq!(unit.take_faults(|_| panic!("reported twice")).records, 0);
    }
}
