//! The guest's view of the NIC's queue and interrupt registers: a shadow register file in DPI
//! memory, written by the OS core's exit handler and by the DPI core.
//!
//! The OS core calls [`ShadowRegs::guest_read`] / [`ShadowRegs::guest_write`] for every trapped
//! access (any register that is not shadowed is forwarded to the real device at the same
//! offset). A tail write only stores the value and rings a doorbell; base/length/control writes
//! bump the configuration doorbell, which the DPI core treats as a seqlock generation.
//!
//! Interrupts (design.md "Packet paths"): the DPI core raises a cause with
//! [`ShadowRegs::raise`]: set the shadow ICR bit, then, if the shadow IMS enables it, write
//! [`DOORBELL_CAUSE`] to the real ICS, which the real IMS always enables, so the real device
//! asserts the guest's INTx/MSI exactly as it would for its own causes. A guest ICR read first
//! reads (and so clears) the real ICR, then swaps the shadow ICR with zero. That order is what
//! makes the race safe:
//!
//! * a cause set before the shadow swap is returned by this read (possibly followed by one
//!   spurious interrupt if its ICS lands after the real read: the next read returns 0);
//! * a cause set after the swap has its ICS land after the real read too (the DPI core writes
//!   ICS only after setting the bit), so the line is asserted again and the next read returns
//!   it.
//!
//! The reverse order (swap, then real read) could clear the ICS of a cause that the swap missed,
//! leaving it stranded in the shadow with no interrupt pending. IMS/IMC writes use the same
//! Dekker-style pairing (store mask, then check causes; raise stores cause, then checks mask,
//! all `SeqCst`) so unmasking a pending cause always asserts the line.
//!
//! **Moderation** ([`ShadowRegs::set_irq_interval`]): an assertion within the interval of the
//! previous one is *held* (a flag) instead of made; the DPI core's poll makes it when the
//! interval ends ([`ShadowRegs::release_held_interrupt`]) if a cause the guest enables is
//! still pending. A held cause is never lost: the flag is set before the asserter returns, and
//! the DPI core clears it before it checks the causes, so a raise racing with the release
//! either is seen by the check or holds anew.

use super::model::SpinLock;
use super::regs::{ctrl, icr, NicRegisters, Reg};
use crate::queue::{timestamp, CachePadded, Doorbell};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// The cause bit Ally writes to the real ICS to interrupt the guest (the 82540EM's "small
/// receive packet detected", which Ally never enables for its own use and the guest never sees).
pub const DOORBELL_CAUSE: u32 = icr::SRPD;

/// Real-device causes the guest sees directly (merged into its ICR reads): link status and
/// receive sequence errors are properties of the wire, not of the rings Ally shadows.
pub const PASSTHROUGH_CAUSES: u32 = icr::LSC | icr::RXSEQ;

/// Registers whose guest view is the shadow (everything else is forwarded to the device).
pub const SHADOWED: [Reg; 17] = [
    Reg::CTRL,
    Reg::ICR,
    Reg::ICS,
    Reg::IMS,
    Reg::IMC,
    Reg::RCTL,
    Reg::TCTL,
    Reg::RDBAL,
    Reg::RDBAH,
    Reg::RDLEN,
    Reg::RDH,
    Reg::RDT,
    Reg::TDBAL,
    Reg::TDBAH,
    Reg::TDLEN,
    Reg::TDH,
    Reg::TDT,
];

/// Values the guest programs (written by the OS core).
#[derive(Debug, Default)]
#[repr(C)]
pub struct GuestWritten {
    pub tdbal: AtomicU32,
    pub tdbah: AtomicU32,
    pub tdlen: AtomicU32,
    pub rdbal: AtomicU32,
    pub rdbah: AtomicU32,
    pub rdlen: AtomicU32,
    pub rctl: AtomicU32,
    pub tctl: AtomicU32,
    /// How many times the guest wrote TDH / RDH (the DPI core then restarts from that index).
    pub tdh_writes: AtomicU32,
    pub rdh_writes: AtomicU32,
    /// Guest CTRL.RST count.
    pub resets: AtomicU32,
    /// The guest's CTRL as last written (RST and PHY_RST, the shadow's, cleared): VME tells
    /// the DPI core whether the device tags and untags frames.
    pub ctrl: AtomicU32,
}

/// The shadow register file, one per trapped NIC, in DPI memory.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct ShadowRegs {
    /// Rung after each guest TDT write.
    pub tx_doorbell: Doorbell,
    /// Rung after each guest RDT write.
    pub rx_doorbell: Doorbell,
    /// Rung after every configuration write (ring bases/lengths, TDH/RDH, RCTL, TCTL, reset):
    /// its sequence number is the configuration generation.
    pub cfg_doorbell: Doorbell,
    tdt: CachePadded<AtomicU32>,
    rdt: CachePadded<AtomicU32>,
    /// Guest-visible heads, advanced by the DPI core (and set by guest TDH/RDH writes).
    tdh: CachePadded<AtomicU32>,
    rdh: CachePadded<AtomicU32>,
    pub guest: CachePadded<GuestWritten>,
    icr: CachePadded<AtomicU32>,
    ims: CachePadded<AtomicU32>,
    /// Real ICS writes made to interrupt the guest.
    pub irq_doorbells: AtomicU64,
    /// Set by the DPI core while it halts instead of waiting with MWAIT (where MWAIT does not
    /// wait): a tail write then also needs an interrupt to wake it ([`TrappedNic`]).
    ///
    /// [`TrappedNic`]: super::trap::TrappedNic
    pub dpi_halted: AtomicBool,
    /// Wake-up interrupts sent to a halted DPI core.
    pub wake_ipis: AtomicU64,
    /// Interrupt moderation: the fewest TSC ticks between two assertions of the line (0: none).
    irq_interval: AtomicU64,
    /// The TSC tick before which the line is not asserted again.
    next_irq_at: AtomicU64,
    /// An assertion held back by moderation, which the DPI core makes when the interval ends.
    irq_held: AtomicBool,
    /// Assertions held back (each made later, once, for every cause pending by then).
    pub irqs_moderated: AtomicU64,
    /// The device's missed-frame count, which Ally and the guest's driver both read.
    pub missed: MissedFrames,
}

/// The device's Missed Packets Count (SDM 13.7.5), shared by Ally and the guest.
///
/// A frame the device cannot place because Ally's receive ring has no free descriptor is
/// dropped by the device before any ring and counted only in MPC. Ally must count it (the wire
/// carried it; nobody inspected or delivered it), and the guest's driver reads MPC for its own
/// statistics. Every read of the device's MPC goes through this type, which keeps Ally's total
/// and the guest's view apart:
///
/// - The SDM's MPC clears on read, so whoever reads it first takes the count from the other:
///   each read is added both to Ally's total and to the guest's unread share, and a guest
///   read returns (and clears) only its share.
/// - QEMU 7.2's and Bochs 2.7's e1000 models keep MPC on read (a running count): Ally adds
///   what it grew by since the last read, and the guest reads the device's value unchanged.
///
/// Which of the two the device does is found at the first nonzero read: two more reads right
/// after it cannot both be at least as large on a clearing device unless that many frames
/// were missed within microseconds, twice over.
pub struct MissedFrames {
    state: SpinLock<MissedState>,
}

impl Default for MissedFrames {
    fn default() -> Self {
        Self {
            state: SpinLock::new(MissedState::default()),
        }
    }
}

impl core::fmt::Debug for MissedFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MissedFrames").finish_non_exhaustive()
    }
}

/// How the device keeps MPC, with what each way needs remembered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum MpcSemantics {
    /// No frame missed yet: not known.
    #[default]
    Unknown,
    /// Each read returns the frames missed since the previous one (SDM 13.7); the guest's
    /// share is what was missed since its own last read.
    ClearsOnRead { guest_unread: u32 },
    /// Each read returns the running count (the emulators), last read as `last`.
    Running { last: u32 },
}

#[derive(Debug, Default)]
struct MissedState {
    semantics: MpcSemantics,
    /// Frames missed since boot.
    total: u64,
}

impl MissedState {
    /// Reads the device's MPC and takes what is new into the counts.
    fn collect<R: NicRegisters>(&mut self, real: &R) {
        let read = || real.read32(Reg::MPC);
        let now = read();
        let new = match &mut self.semantics {
            MpcSemantics::ClearsOnRead { guest_unread } => {
                // The guest's share saturates, as the register does.
                *guest_unread = guest_unread.saturating_add(now);
                now
            }
            MpcSemantics::Running { last } => Self::grown(last, now),
            MpcSemantics::Unknown if now == 0 => 0,
            MpcSemantics::Unknown => {
                // A running count reads at least as large twice more; a clearing one reads
                // what was missed since (almost always less).
                let second = read();
                let third = if second >= now { read() } else { 0 };
                let (semantics, new) = if second >= now && third >= second {
                    (MpcSemantics::Running { last: third }, third)
                } else {
                    let all = now.saturating_add(second).saturating_add(third);
                    (MpcSemantics::ClearsOnRead { guest_unread: all }, all)
                };
                self.semantics = semantics;
                new
            }
        };
        self.total += u64::from(new);
    }

    /// A running count last read as `last`, now `now`: how much it grew (a count that went
    /// down was reset with the device, and counts from zero).
    fn grown(last: &mut u32, now: u32) -> u32 {
        let grew = now.checked_sub(*last).unwrap_or(now);
        *last = now;
        grew
    }
}

impl MissedFrames {
    /// Reads the device's MPC into the counts: Ally's total of missed frames since boot.
    pub fn collect<R: NicRegisters>(&self, real: &R) -> u64 {
        let mut st = self.state.lock();
        st.collect(real);
        st.total
    }

    /// The guest reads MPC: the device's value where it keeps a running count, else the
    /// frames missed since the guest's last read.
    fn guest_read<R: NicRegisters>(&self, real: &R) -> u32 {
        let mut st = self.state.lock();
        st.collect(real);
        match &mut st.semantics {
            MpcSemantics::Running { last } => *last,
            MpcSemantics::ClearsOnRead { guest_unread } => core::mem::take(guest_unread),
            MpcSemantics::Unknown => 0,
        }
    }

    /// The guest reset the device: a clearing count starts again from zero for it (SDM
    /// 13.7); Ally's total does not.
    fn guest_reset<R: NicRegisters>(&self, real: &R) {
        let mut st = self.state.lock();
        st.collect(real);
        if let MpcSemantics::ClearsOnRead { guest_unread } = &mut st.semantics {
            *guest_unread = 0;
        }
    }
}

/// A consistent copy of the guest's configuration registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestConfig {
    pub generation: u64,
    pub tdba: u64,
    pub tdlen: u32,
    pub rdba: u64,
    pub rdlen: u32,
    pub rctl: u32,
    pub tctl: u32,
    pub tdh: u32,
    pub rdh: u32,
    pub tdh_writes: u32,
    pub rdh_writes: u32,
    pub resets: u32,
    pub ctrl: u32,
}

impl ShadowRegs {
    /// A shadow file in the device's reset state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `reg` is emulated from the shadow rather than forwarded.
    pub fn is_shadowed(reg: Reg) -> bool {
        SHADOWED.contains(&reg.canonical())
    }

    /// The guest's TDT as last written.
    #[inline]
    pub fn tdt(&self) -> u32 {
        self.tdt.load(Ordering::Acquire)
    }
    /// The guest's RDT as last written.
    #[inline]
    pub fn rdt(&self) -> u32 {
        self.rdt.load(Ordering::Acquire)
    }
    /// The guest-visible TDH.
    #[inline]
    pub fn tdh(&self) -> u32 {
        self.tdh.load(Ordering::Acquire)
    }
    /// The guest-visible RDH.
    #[inline]
    pub fn rdh(&self) -> u32 {
        self.rdh.load(Ordering::Acquire)
    }
    /// DPI core: publish a new guest TDH (after the DD write-backs it covers).
    #[inline]
    pub fn set_tdh(&self, v: u32) {
        self.tdh.store(v, Ordering::Release);
    }
    /// DPI core: publish a new guest RDH (after the descriptors it covers are written back).
    #[inline]
    pub fn set_rdh(&self, v: u32) {
        self.rdh.store(v, Ordering::Release);
    }
    /// Pending shadow causes (without clearing them).
    pub fn peek_icr(&self) -> u32 {
        self.icr.load(Ordering::SeqCst)
    }
    /// The guest's interrupt mask.
    pub fn ims(&self) -> u32 {
        self.ims.load(Ordering::SeqCst)
    }

    /// A consistent snapshot of the configuration registers, or `None` if the guest kept
    /// writing them during every attempt (try again on the next poll).
    pub fn config(&self) -> Option<GuestConfig> {
        for _ in 0..4 {
            let generation = self.cfg_doorbell.sequence();
            let g = &self.guest;
            let c = GuestConfig {
                generation,
                tdba: (u64::from(g.tdbah.load(Ordering::Acquire)) << 32)
                    | u64::from(g.tdbal.load(Ordering::Acquire)),
                tdlen: g.tdlen.load(Ordering::Acquire),
                rdba: (u64::from(g.rdbah.load(Ordering::Acquire)) << 32)
                    | u64::from(g.rdbal.load(Ordering::Acquire)),
                rdlen: g.rdlen.load(Ordering::Acquire),
                rctl: g.rctl.load(Ordering::Acquire),
                tctl: g.tctl.load(Ordering::Acquire),
                tdh: self.tdh(),
                rdh: self.rdh(),
                tdh_writes: g.tdh_writes.load(Ordering::Acquire),
                rdh_writes: g.rdh_writes.load(Ordering::Acquire),
                resets: g.resets.load(Ordering::Acquire),
                ctrl: g.ctrl.load(Ordering::Acquire),
            };
            if self.cfg_doorbell.sequence() == generation {
                return Some(c);
            }
        }
        None
    }

    /// DPI core: raise guest interrupt causes.
    pub fn raise<R: NicRegisters>(&self, cause: u32, real: &R) {
        let before = self.icr.fetch_or(cause, Ordering::SeqCst);
        // Already pending: the line was asserted when it was set (or the cause was masked, and
        // an unmask asserts it), and a guest read racing with us returns it. No second ICS.
        if before & cause == cause {
            return;
        }
        if self.ims.load(Ordering::SeqCst) & cause != 0 {
            self.assert_line(real);
        }
    }

    fn assert_line<R: NicRegisters>(&self, real: &R) {
        let interval = self.irq_interval.load(Ordering::Relaxed);
        if interval != 0 {
            let now = timestamp();
            if now < self.next_irq_at.load(Ordering::Relaxed) {
                if !self.irq_held.swap(true, Ordering::SeqCst) {
                    self.irqs_moderated.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            self.next_irq_at.store(now + interval, Ordering::Relaxed);
        }
        self.irq_doorbells.fetch_add(1, Ordering::Relaxed);
        real.write32(Reg::ICS, DOORBELL_CAUSE);
    }

    /// Interrupt moderation (the 82540EM's ITR, SDM 13.4.18, with Ally's own interval): after
    /// an assertion the line is not asserted again for `ticks` TSC ticks; causes raised
    /// meanwhile wait in the shadow ICR and are signalled together when the interval ends.
    /// Fewer guest interrupts mean fewer trapped ICR/IMC/IMS accesses per frame.
    pub fn set_irq_interval(&self, ticks: u64) {
        self.irq_interval.store(ticks, Ordering::Relaxed);
    }

    /// DPI core, every poll: makes the assertion moderation held back once its interval has
    /// ended, if a cause the guest enables is still pending. Returns whether it did.
    #[inline]
    pub fn release_held_interrupt<R: NicRegisters>(&self, real: &R) -> bool {
        if !self.irq_held.load(Ordering::Relaxed) {
            return false;
        }
        self.release_held_slow(real)
    }

    #[cold]
    #[inline(never)]
    fn release_held_slow<R: NicRegisters>(&self, real: &R) -> bool {
        if timestamp() < self.next_irq_at.load(Ordering::Relaxed) {
            return false;
        }
        // Clear first, then check: a cause raised after the check holds (or asserts) anew.
        self.irq_held.store(false, Ordering::SeqCst);
        if self.icr.load(Ordering::SeqCst) & self.ims.load(Ordering::SeqCst) != 0 {
            self.assert_line(real);
            return true;
        }
        false
    }

    /// Whether an assertion is being held back by moderation.
    pub fn irq_held(&self) -> bool {
        self.irq_held.load(Ordering::SeqCst)
    }

    /// Program the real interrupt mask Ally needs: its doorbell cause plus the passthrough
    /// causes the guest enabled. Called at start-up by the DPI core.
    pub fn program_real_mask<R: NicRegisters>(&self, real: &R) {
        real.write32(
            Reg::IMC,
            !(DOORBELL_CAUSE | (self.ims() & PASSTHROUGH_CAUSES)),
        );
        real.write32(Reg::IMS, DOORBELL_CAUSE | (self.ims() & PASSTHROUGH_CAUSES));
    }

    /// OS core: the guest reads a trapped register.
    pub fn guest_read<R: NicRegisters>(&self, reg: Reg, real: &R) -> u32 {
        match reg.canonical() {
            Reg::ICR => {
                // Order matters: real first (clears our doorbell cause), shadow second. See the
                // module documentation.
                let real_causes = real.read32(Reg::ICR) & PASSTHROUGH_CAUSES;
                real_causes | self.icr.swap(0, Ordering::SeqCst)
            }
            Reg::IMS => self.ims(),
            Reg::ICS | Reg::IMC => 0,
            Reg::RCTL => self.guest.rctl.load(Ordering::Acquire),
            Reg::TCTL => self.guest.tctl.load(Ordering::Acquire),
            Reg::TDBAL => self.guest.tdbal.load(Ordering::Acquire),
            Reg::TDBAH => self.guest.tdbah.load(Ordering::Acquire),
            Reg::TDLEN => self.guest.tdlen.load(Ordering::Acquire),
            Reg::RDBAL => self.guest.rdbal.load(Ordering::Acquire),
            Reg::RDBAH => self.guest.rdbah.load(Ordering::Acquire),
            Reg::RDLEN => self.guest.rdlen.load(Ordering::Acquire),
            Reg::TDH => self.tdh(),
            Reg::TDT => self.tdt(),
            Reg::RDH => self.rdh(),
            Reg::RDT => self.rdt(),
            Reg::MPC => self.missed.guest_read(real),
            _ => real.read32(reg),
        }
    }

    /// OS core: the guest writes a trapped register.
    pub fn guest_write<R: NicRegisters>(&self, reg: Reg, value: u32, real: &R) {
        let g = &self.guest;
        let cfg = |a: &AtomicU32, v: u32| {
            a.store(v, Ordering::Release);
            self.cfg_doorbell.ring();
        };
        // Aliases (e.g. 0x0420 for TDBAL) must land on the shadow too: forwarding them would
        // let the guest move the real rings.
        match reg.canonical() {
            Reg::TDT => {
                self.tdt.store(value & 0xFFFF, Ordering::Release);
                self.tx_doorbell.ring();
            }
            Reg::RDT => {
                self.rdt.store(value & 0xFFFF, Ordering::Release);
                self.rx_doorbell.ring();
            }
            // Low 4 bits of the bases are ignored by the device (SDM 13.4.25, 13.4.37); the
            // lengths keep bits 19:7 (13.4.27, 13.4.39).
            Reg::TDBAL => cfg(&g.tdbal, value & !0xF),
            Reg::TDBAH => cfg(&g.tdbah, value),
            Reg::TDLEN => cfg(&g.tdlen, value & 0xF_FF80),
            Reg::RDBAL => cfg(&g.rdbal, value & !0xF),
            Reg::RDBAH => cfg(&g.rdbah, value),
            Reg::RDLEN => cfg(&g.rdlen, value & 0xF_FF80),
            Reg::RCTL => cfg(&g.rctl, value),
            Reg::TCTL => cfg(&g.tctl, value),
            Reg::TDH => {
                self.tdh.store(value & 0xFFFF, Ordering::Release);
                cfg(
                    &g.tdh_writes,
                    g.tdh_writes.load(Ordering::Relaxed).wrapping_add(1),
                );
            }
            Reg::RDH => {
                self.rdh.store(value & 0xFFFF, Ordering::Release);
                cfg(
                    &g.rdh_writes,
                    g.rdh_writes.load(Ordering::Relaxed).wrapping_add(1),
                );
            }
            Reg::ICS => self.raise(value & icr::ALL, real),
            Reg::ICR => {
                // Write-1-to-clear (SDM 13.4.17).
                self.icr.fetch_and(!value, Ordering::SeqCst);
                real.write32(Reg::ICR, value & PASSTHROUGH_CAUSES);
            }
            Reg::IMS => {
                let ims = self.ims.fetch_or(value & icr::ALL, Ordering::SeqCst) | value;
                if value & PASSTHROUGH_CAUSES != 0 {
                    real.write32(Reg::IMS, value & PASSTHROUGH_CAUSES);
                }
                if self.icr.load(Ordering::SeqCst) & ims != 0 {
                    self.assert_line(real);
                }
            }
            Reg::IMC => {
                let ims = self.ims.fetch_and(!value, Ordering::SeqCst) & !value;
                if value & PASSTHROUGH_CAUSES != 0 {
                    real.write32(Reg::IMC, value & PASSTHROUGH_CAUSES);
                }
                if self.icr.load(Ordering::SeqCst) & ims == 0 {
                    // Nothing the guest still wants is pending: drop our doorbell cause so the
                    // masked guest sees no interrupt, then re-check against a racing raise.
                    real.write32(Reg::ICR, DOORBELL_CAUSE);
                    if self.icr.load(Ordering::SeqCst) & self.ims() != 0 {
                        self.assert_line(real);
                    }
                }
            }
            Reg::CTRL => {
                if value & ctrl::RST != 0 {
                    self.reset(real);
                }
                // The real device is never reset on the guest's behalf: its rings are Ally's.
                let value = value & !(ctrl::RST | ctrl::PHY_RST);
                real.write32(Reg::CTRL, value);
                // Only a VLAN mode change concerns the DPI core (the rest is link control).
                if (g.ctrl.swap(value, Ordering::AcqRel) ^ value) & ctrl::VME != 0 {
                    self.cfg_doorbell.ring();
                }
            }
            _ => real.write32(reg, value),
        }
    }

    /// The guest's CTRL.RST: every shadowed register returns to its default (SDM 13.4.1); the
    /// DPI core sees the reset count change and abandons the guest's old rings.
    fn reset<R: NicRegisters>(&self, real: &R) {
        let g = &self.guest;
        // The generation moves before any register does, and again once all have: a DPI
        // core that reads a tail this reset cleared sees the change and follows the new
        // configuration first (`DpiNic::reconfigured_since_poll`), rather than scanning the
        // old ring up to tail 0 (seen at the guest's reboot: the old ring's memory, in
        // conventional memory, was being restored to its first-boot zeros meanwhile).
        self.cfg_doorbell.ring();
        for a in [
            &g.tdbal, &g.tdbah, &g.tdlen, &g.rdbal, &g.rdbah, &g.rdlen, &g.rctl, &g.tctl, &g.ctrl,
        ] {
            a.store(0, Ordering::Release);
        }
        for a in [&*self.tdt, &*self.rdt, &*self.tdh, &*self.rdh] {
            a.store(0, Ordering::Release);
        }
        self.ims.store(0, Ordering::SeqCst);
        self.icr.store(0, Ordering::SeqCst);
        real.write32(Reg::IMC, PASSTHROUGH_CAUSES);
        real.write32(Reg::ICR, DOORBELL_CAUSE | PASSTHROUGH_CAUSES);
        self.missed.guest_reset(real);
        g.resets.fetch_add(1, Ordering::AcqRel);
        self.cfg_doorbell.ring();
    }
}
