//! The OS core's side of the NIC: what a trapped register access does, and the exit counts
//! by register.
//!
//! Ally traps the BAR0 pages that hold a shadowed register (or one of its 82542 aliases):
//! page 0 (CTRL, ICR/ICS/IMS/IMC, RCTL, TCTL and the alias block), page 2 (the RX ring
//! registers) and page 3 (the TX ring registers), page 4 (statistics: MPC, which Ally shares
//! with the guest) and page 5 (filters and wake-up); the
//! packet buffer, its FIFO aliases and the undefined pages exit and are refused. Every access
//! passes the register guard ([`super::guard`]) first: registers it does not refuse or rewrite
//! are forwarded to the device at the same offset. Only the pages the guard proves harmless
//! stay mapped and cost no exit.

use super::guard::{exits, RegisterGuard, WriteAction};
use super::regs::{ctrl, NicRegisters, Reg};
use super::shadow::{ShadowRegs, SHADOWED};
use ally_hypervisor::guards::nic::TrappedRegisters;
use core::sync::atomic::{fence, AtomicU64, Ordering};

/// Forwarded registers counted by name: the ones a driver touches on the trapped pages in
/// normal operation (STATUS is what Linux's write flushes read; EEPROM and PHY access at probe
/// and link checks; the interrupt moderation timers).
pub const FORWARDED_NAMED: [Reg; 10] = [
    Reg::STATUS,
    Reg::EECD,
    Reg::EERD,
    Reg::CTRL_EXT,
    Reg::MDIC,
    Reg::ITR,
    Reg::RDTR,
    Reg::RADV,
    Reg::TIDV,
    Reg::TADV,
];

const SLOTS: usize = SHADOWED.len() + FORWARDED_NAMED.len() + 1;
/// Where the forwarded registers' slots begin.
const FIRST_FORWARDED: usize = SHADOWED.len();

/// Exit counts: one slot per shadowed register (aliases counted with their register), one per
/// named forwarded register, and one for every other forwarded register on those pages.
#[derive(Debug, Default)]
pub struct RegisterExits {
    reads: [AtomicU64; SLOTS],
    writes: [AtomicU64; SLOTS],
    /// Reads emulated in the exit of the write before them: no exit of their own, so not in
    /// the other counts.
    pub fused: AtomicU64,
}

impl RegisterExits {
    fn slot(reg: Reg) -> usize {
        let canonical = reg.canonical();
        SHADOWED
            .iter()
            .chain(FORWARDED_NAMED.iter())
            .position(|&r| r == canonical)
            .unwrap_or(SLOTS - 1)
    }

    fn name(slot: usize) -> &'static str {
        SHADOWED
            .iter()
            .chain(FORWARDED_NAMED.iter())
            .nth(slot)
            .map_or("other", |&reg| reg.name())
    }

    /// `(name, reads, writes)` for every register that saw an exit.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64, u64)> + '_ {
        (0..SLOTS).filter_map(|i| {
            let (r, w) = (
                self.reads[i].load(Ordering::Relaxed),
                self.writes[i].load(Ordering::Relaxed),
            );
            (r + w > 0).then_some((Self::name(i), r, w))
        })
    }

    /// Exits for registers Ally forwards (not shadowed) that share a trapped page.
    pub fn forwarded(&self) -> u64 {
        (FIRST_FORWARDED..SLOTS)
            .map(|i| self.reads[i].load(Ordering::Relaxed) + self.writes[i].load(Ordering::Relaxed))
            .sum()
    }

    /// All exits counted.
    pub fn total(&self) -> u64 {
        self.reads
            .iter()
            .chain(self.writes.iter())
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The trapped registers of one NIC: the shadow file plus the real device.
pub struct TrappedNic<'a, R: NicRegisters> {
    pub shadow: &'a ShadowRegs,
    pub real: R,
    pub exits: RegisterExits,
    /// What the guest may not do with the registers Ally does not shadow, and its refusals.
    pub guard: RegisterGuard,
    /// Interrupts the DPI core when it halts rather than monitors its doorbells.
    waker: Option<fn()>,
}

impl<'a, R: NicRegisters> TrappedNic<'a, R> {
    pub fn new(shadow: &'a ShadowRegs, real: R) -> Self {
        Self {
            shadow,
            real,
            exits: RegisterExits::default(),
            guard: RegisterGuard::new(),
            waker: None,
        }
    }

    /// How to interrupt a halted DPI core after a tail write (an IPI on Ally).
    pub fn with_waker(mut self, waker: fn()) -> Self {
        self.waker = Some(waker);
        self
    }

    /// A guest read of the register at `offset` (an aligned dword on an exiting page); a
    /// refused register reads 0.
    pub fn guest_read(&self, offset: u32) -> u32 {
        let reg = Reg(offset);
        self.exits.reads[RegisterExits::slot(reg)].fetch_add(1, Ordering::Relaxed);
        self.read_register(offset)
    }

    /// A guest read emulated in the exit of the write before it (the driver's flush): the
    /// same read, counted in [`RegisterExits::fused`] instead of as an exit.
    pub fn guest_fused_read(&self, offset: u32) -> u32 {
        self.exits.fused.fetch_add(1, Ordering::Relaxed);
        self.read_register(offset)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let reg = Reg(offset);
        if !self.guard.read_allowed(offset) {
            return 0;
        }
        self.shadow.guest_read(reg, &self.real)
    }

    /// A guest write of the register at `offset`: for a tail this stores the shadow and rings
    /// the doorbell, nothing else.
    pub fn guest_write(&self, offset: u32, value: u32) {
        let reg = Reg(offset);
        self.exits.writes[RegisterExits::slot(reg)].fetch_add(1, Ordering::Relaxed);
        let WriteAction::Pass(value) = self.guard.write(offset, value, &self.real) else {
            return;
        };
        self.shadow.guest_write(reg, value, &self.real);
        if let (Some(wake), Reg::TDT | Reg::RDT) = (self.waker, reg.canonical()) {
            // Dekker with the DPI core, which sets `dpi_halted` and then checks its doorbells
            // before halting: either it sees this ring or this sees it halted.
            fence(Ordering::SeqCst);
            if self.shadow.dpi_halted.load(Ordering::SeqCst) {
                self.shadow.wake_ipis.fetch_add(1, Ordering::Relaxed);
                wake();
            }
        }
    }
}

impl<R: NicRegisters + Sync> TrappedRegisters for TrappedNic<'_, R> {
    fn read(&self, offset: u32) -> u32 {
        self.guest_read(offset)
    }
    fn fused_read(&self, offset: u32) -> u32 {
        self.guest_fused_read(offset)
    }
    fn write(&self, offset: u32, value: u32) {
        self.guest_write(offset, value)
    }
    fn is_trapped(&self, offset: u32) -> bool {
        exits(offset)
    }
    fn write_refusals(&self, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
        self.guard.write_counts(out)
    }
    fn platform_reset(&self) {
        // Not a guest access: not counted as an exit.
        let value = self.shadow.guest_read(Reg::CTRL, &self.real);
        self.shadow
            .guest_write(Reg::CTRL, value | ctrl::RST, &self.real);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::mem::FakeDma;
    use crate::nic::model::{E1000Model, ModelConfig};

    #[test]
    fn every_shadowed_register_and_alias_is_on_a_trapped_page() {
        for reg in SHADOWED {
            assert!(exits(reg.0), "{reg:?}");
        }
        for alias in (0x0100..0x0140).chain(0x0400..0x0440).step_by(4) {
            if ShadowRegs::is_shadowed(Reg(alias)) {
                assert!(exits(alias), "alias {alias:#x}");
            }
        }
        // The packet buffer split and the flexible filters stay mapped.
        for untouched in [0x1000, 0x9000, 0x9800] {
            assert!(!exits(untouched));
        }
    }

    static WAKES: AtomicU64 = AtomicU64::new(0);

    #[test]
    fn a_halted_dpi_core_is_woken_by_tail_writes_only() {
        let shadow = ShadowRegs::new();
        let model = E1000Model::new(FakeDma::new(0, 4096), ModelConfig::default());
        let nic = TrappedNic::new(&shadow, &model).with_waker(|| {
            WAKES.fetch_add(1, Ordering::Relaxed);
        });
        nic.guest_write(Reg::TDT.0, 1);
        assert_eq!(
            WAKES.load(Ordering::Relaxed),
            0,
            "the DPI core is not halted"
        );
        shadow.dpi_halted.store(true, Ordering::SeqCst);
        nic.guest_write(Reg::TDT.0, 2);
        nic.guest_write(0x0128, 3); // RDT's alias
        nic.guest_write(Reg::IMS.0, 0x80);
        assert_eq!(WAKES.load(Ordering::Relaxed), 2);
        assert_eq!(shadow.wake_ipis.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn tail_write_rings_the_doorbell_and_is_counted() {
        let shadow = ShadowRegs::new();
        let model = E1000Model::new(FakeDma::new(0, 4096), ModelConfig::default());
        let nic = TrappedNic::new(&shadow, &model);
        let before = shadow.tx_doorbell.sequence();
        nic.guest_write(Reg::TDT.0, 5);
        nic.guest_write(0x0438, 6); // the 82542 alias of TDT
        assert_eq!(shadow.tdt(), 6);
        assert_eq!(shadow.tx_doorbell.sequence(), before + 2);
        // The device's own TDT is Ally's, untouched by the guest.
        assert_eq!(model.read32(Reg::TDT), 0);
        nic.guest_read(Reg::STATUS.0);
        let seen: std::vec::Vec<_> = nic.exits.nonzero().collect();
        assert_eq!(seen, [("TDT", 0, 2), ("STATUS", 1, 0)]);
        nic.guest_read(0x0038); // FCTTV: forwarded, not named
        assert!(nic.exits.nonzero().any(|e| e == ("other", 1, 0)));
        assert_eq!(nic.exits.forwarded(), 2);
        assert_eq!(nic.exits.total(), 4);
        // A flush read emulated in the write's exit reads the same register but is no exit.
        assert_eq!(
            nic.guest_fused_read(Reg::STATUS.0),
            nic.guest_read(Reg::STATUS.0)
        );
        assert_eq!(nic.exits.fused.load(Ordering::Relaxed), 1);
        assert_eq!(nic.exits.total(), 5);
    }
}
