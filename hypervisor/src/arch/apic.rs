//! The local APIC, as Ally itself uses it: its own ID, INIT-SIPI-SIPI to start application
//! processors, and the periodic timer that wakes idle DPI cores (SDM Vol. 3A ch. 12).
//! Works in xAPIC mode (MMIO at the IA32_APIC_BASE page, identity-mapped) and x2APIC mode
//! (MSRs 0x800+), whichever the firmware left enabled.

use super::instructions::{inb, rdmsr, wrmsr};

const IA32_APIC_BASE: u32 = 0x1B;
const X2APIC_ENABLE: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;

// Register offsets (xAPIC MMIO; x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xB0;
const REG_SPURIOUS: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const REG_TPR: u32 = 0x80;
const REG_ISR: u32 = 0x100;
const REG_IRR: u32 = 0x200;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_LVT_ERROR: u32 = 0x370;
const REG_LDR: u32 = 0xD0;
const REG_DFR: u32 = 0xE0;
const LVT_MASKED: u32 = 1 << 16;

/// ICR delivery modes (SDM Vol. 3A 12.6.1, Figure 12-12).
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

/// This CPU's local APIC.
pub struct LocalApic {
    x2apic: bool,
    mmio_base: u64,
}

impl LocalApic {
    /// The local APIC of the executing CPU.
    pub fn current() -> Self {
        // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
        let base = unsafe { rdmsr(IA32_APIC_BASE) };
        Self {
            x2apic: base & X2APIC_ENABLE != 0,
            mmio_base: base & 0xF_FFFF_F000,
        }
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: the register exists in both modes; in xAPIC mode the APIC page is
        // identity-mapped in Ally's page tables.
        unsafe {
            if self.x2apic {
                rdmsr(X2APIC_MSR_BASE + reg / 16) as u32
            } else {
                ((self.mmio_base + u64::from(reg)) as *const u32).read_volatile()
            }
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as for `read`; writes go to this CPU's own APIC.
        unsafe {
            if self.x2apic {
                wrmsr(X2APIC_MSR_BASE + reg / 16, u64::from(value));
            } else {
                ((self.mmio_base + u64::from(reg)) as *mut u32).write_volatile(value);
            }
        }
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        let id = self.read(REG_ID);
        if self.x2apic {
            id
        } else {
            id >> 24
        }
    }

    /// Sends an IPI with ICR low word `low` to `apic_id` and waits for delivery.
    fn send_ipi(&self, apic_id: u32, low: u32) {
        if self.x2apic {
            // SAFETY: ICR is MSR 0x830 in x2APIC mode (SDM 12.12.9); one 64-bit write.
            unsafe {
                wrmsr(
                    X2APIC_MSR_BASE + 0x30,
                    (u64::from(apic_id) << 32) | u64::from(low),
                )
            };
        } else {
            self.write(REG_ICR_HIGH, apic_id << 24);
            self.write(REG_ICR_LOW, low);
            let mut spins = 0;
            while self.read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 && spins < 1_000_000 {
                spins += 1;
                core::hint::spin_loop();
            }
        }
    }

    /// Sends a fixed interrupt at `vector` to `apic_id` from VMX root on an OS core, leaving the
    /// guest's view of the APIC as it was: in xAPIC mode the ICR's high dword (the destination
    /// the guest may have written for its next IPI) is put back afterwards. No wait: a fixed
    /// IPI to a running core is delivered without the sender's help.
    pub fn send_fixed_preserving_guest(&self, apic_id: u32, vector: u8) {
        if self.x2apic {
            self.send_ipi(apic_id, u32::from(vector));
        } else {
            let guest_high = self.read(REG_ICR_HIGH);
            self.write(REG_ICR_HIGH, apic_id << 24);
            self.write(REG_ICR_LOW, u32::from(vector));
            self.write(REG_ICR_HIGH, guest_high);
        }
    }

    /// INIT-SIPI-SIPI (SDM Vol. 3A 9.4.4.1, MP initialization): starts `apic_id` in real mode
    /// at `vector << 12`.
    pub fn start_application_processor(&self, apic_id: u32, vector: u8) {
        self.send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
        io_delay_us(10_000);
        for _ in 0..2 {
            self.send_ipi(apic_id, ICR_STARTUP | u32::from(vector));
            io_delay_us(200);
        }
    }

    /// A DPI core's APIC answers no logical destination but the broadcast: in xAPIC mode its
    /// LDR is set to 0 (no flat or cluster MDA matches it, SDM 12.6.2.2) and DFR to flat, as
    /// INIT left them, whatever the firmware did; the IPI filter (`crate::ipi`) relies on it.
    /// In x2APIC mode the logical ID is fixed by the APIC ID (12.12.10.2). Returns the LDR.
    pub fn clear_logical_destination(&self) -> u32 {
        if !self.x2apic {
            self.write(REG_DFR, 0xFFFF_FFFF);
            self.write(REG_LDR, 0);
        }
        self.read(REG_LDR)
    }

    /// Enables the APIC (spurious vector register) and starts the periodic timer at `vector`.
    pub fn start_periodic_timer(&self, vector: u8, initial_count: u32) {
        self.write(
            REG_SPURIOUS,
            0x100 | u32::from(super::descriptors::SPURIOUS_VECTOR),
        );
        self.write(REG_TIMER_DIVIDE, 0b1011); // divide by 1
        self.write(REG_LVT_TIMER, (1 << 17) | u32::from(vector)); // periodic
        self.write(REG_TIMER_INITIAL, initial_count);
    }

    /// The registers [`start_periodic_timer`](Self::start_periodic_timer) changes.
    pub fn timer_state(&self) -> TimerState {
        TimerState {
            spurious: self.read(REG_SPURIOUS),
            lvt_timer: self.read(REG_LVT_TIMER),
            divide: self.read(REG_TIMER_DIVIDE),
        }
    }

    /// Stops the timer, lets a tick that is already pending be taken (by Ally's IDT, with
    /// interrupts enabled for one instruction) and puts back `saved`; the initial count stays 0,
    /// its value after INIT.
    ///
    /// # Safety
    /// Ally's IDT handles every interrupt that can be pending at this APIC.
    pub unsafe fn stop_timer(&self, saved: TimerState) {
        self.write(REG_LVT_TIMER, LVT_MASKED | (saved.lvt_timer & 0xFF));
        self.write(REG_TIMER_INITIAL, 0);
        // SAFETY: guaranteed by the caller.
        unsafe { super::instructions::take_pending_interrupts() };
        self.write(REG_TIMER_DIVIDE, saved.divide);
        self.write(REG_LVT_TIMER, saved.lvt_timer);
        self.write(REG_SPURIOUS, saved.spurious);
    }

    /// Signals end of interrupt.
    pub fn eoi(&self) {
        self.write(REG_EOI, 0);
    }

    /// First step of a guest reset: every local interrupt source masked (timer stopped), task
    /// priority 0, and every interrupt in service ended (at most one EOI per vector; for a
    /// level-triggered one the EOI also reaches the I/O APIC, clearing its remote IRR).
    pub fn quiesce(&self) {
        self.write(REG_LVT_TIMER, LVT_MASKED);
        self.write(REG_TIMER_INITIAL, 0);
        for reg in [REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR] {
            self.write(reg, LVT_MASKED);
        }
        self.write(REG_TPR, 0);
        for _ in 0..256 {
            if Self::none_set(|i| self.read(REG_ISR + i * 0x10)) {
                break;
            }
            self.eoi();
        }
    }

    /// Whether no interrupt waits in the IRR (a reset must not leave the old guest's vectors
    /// to be delivered to the new one: a real reset clears them).
    pub fn nothing_requested(&self) -> bool {
        Self::none_set(|i| self.read(REG_IRR + i * 0x10))
    }

    fn none_set(read: impl Fn(u32) -> u32) -> bool {
        (0..8).all(|i| read(i) == 0)
    }

    /// Last step of a guest reset: the APIC as a BIOS hands it to an operating system, enabled
    /// in virtual-wire mode (LINT0 ExtINT for the 8259, LINT1 NMI; MP Specification 1.4,
    /// 3.6.2.2).
    pub fn enable_virtual_wire(&self) {
        const EXTINT: u32 = 0b111 << 8;
        const NMI: u32 = 0b100 << 8;
        self.write(REG_LVT_LINT0, EXTINT);
        self.write(REG_LVT_LINT1, NMI);
        self.write(REG_SPURIOUS, 0x100 | 0xFF);
    }
}

/// Timer-related APIC registers, saved while Ally borrows the timer of a guest CPU.
#[derive(Clone, Copy, Debug)]
pub struct TimerState {
    spurious: u32,
    lvt_timer: u32,
    divide: u32,
}

/// Waits about `us` microseconds by reading port 0x80 (about 1 µs per access on PC hardware;
/// faster under emulators, where the exact delay does not matter).
pub fn io_delay_us(us: u32) {
    for _ in 0..us {
        // SAFETY: port 0x80 is the POST diagnostic port; reading it has no effect.
        unsafe { inb(0x80) };
    }
}
