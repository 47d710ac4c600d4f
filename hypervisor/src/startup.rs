//! The guest's INIT and SIPI to OS cores, emulated in software (SDM Vol. 3A 9.4.4, 12.6.1).
//!
//! Ally never lets the guest's INIT or start-up IPIs reach an OS core's hardware. A real INIT
//! cannot be used on a CPU in VMX operation: it is blocked in VMX root operation (SDM Vol. 3C
//! 25.2) and causes an INIT VM exit in non-root operation (26.2), after which the CPU is still
//! Ally's and must rebuild the post-INIT state itself. Bochs 2.7 adds a defect that makes a
//! hardware INIT unusable altogether: its INIT VM exit leaves the INIT pending (its
//! `handleAsyncEvent` exits before the `reset` that clears it; fixed after 2.7), so the INIT
//! exit repeats on every VM entry, and an INIT sent while the vCPU waits for SIPI is only taken
//! after the SIPI.
//!
//! Instead, the ICR filter hands every INIT and SIPI aimed at an OS core to that core's
//! [`StartupMailbox`]. An application processor that the guest has not started, or has INIT
//! again, waits in VMX root operation until its mailbox holds a SIPI vector, then enters the
//! guest in real mode at `vector:0000`. A vCPU that runs the guest takes an INIT at its next
//! VM exit; the VMX-preemption timer bounds the time to that exit. This module is the mailbox
//! state machine; the waiting is in `guards::init_sipi`, the VMCS/VMCB work in each backend's `exits`.

use core::sync::atomic::{AtomicU32, Ordering};

// Mailbox states: the high bits name the state, the low 8 bits hold a SIPI vector.
const RUNNING: u32 = 0;
const WAIT_FOR_SIPI: u32 = 1 << 8;
const SIPI: u32 = 2 << 8;
const INIT_PENDING: u32 = 3 << 8;
const INIT_THEN_SIPI: u32 = 4 << 8;
const STATE: u32 = !0xFF;

/// One OS core's start-up state, shared between the cores that send it INIT and SIPI and the
/// core itself. Every transition is one atomic compare-exchange.
#[derive(Debug)]
pub struct StartupMailbox(AtomicU32);

/// What an INIT did to its target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InitOutcome {
    /// The vCPU was running the guest: it resets when it next leaves the guest.
    ResetPending,
    /// The vCPU was waiting (again) for a SIPI.
    Waiting,
}

/// What a SIPI did to its target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SipiOutcome {
    /// The vCPU waits for SIPI (or has an INIT pending): it starts at the vector.
    Accepted,
    /// The vCPU runs, or already has a SIPI to start with: ignored, as by a real CPU.
    Ignored,
}

/// What a running vCPU must do at a VM exit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PendingReset {
    /// INIT: leave the guest and wait for a SIPI.
    WaitForSipi,
    /// INIT, then a SIPI with this vector: restart the guest at `vector:0000`.
    Sipi(u8),
}

/// A mailbox's state, for reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MailboxState {
    Running,
    WaitForSipi,
    Sipi(u8),
    InitPending,
    InitThenSipi(u8),
}

impl StartupMailbox {
    /// An application processor before the guest starts it.
    pub const fn waiting_for_sipi() -> Self {
        Self(AtomicU32::new(WAIT_FOR_SIPI))
    }

    /// A vCPU that runs the guest (the boot CPU).
    pub const fn running() -> Self {
        Self(AtomicU32::new(RUNNING))
    }

    /// Marks the vCPU as running (the boot CPU, before it first enters the guest).
    pub fn set_running(&self) {
        self.0.store(RUNNING, Ordering::Release);
    }

    pub fn state(&self) -> MailboxState {
        decode(self.0.load(Ordering::Acquire))
    }

    fn update(&self, f: impl Fn(u32) -> Option<u32>) -> Result<u32, u32> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, f)
    }

    /// An INIT (level assert) arrives. A SIPI not yet taken is cancelled: the INIT came after
    /// it, so it resets the vCPU that SIPI would have started.
    pub fn init(&self) -> InitOutcome {
        let previous = self
            .update(|s| match s & STATE {
                RUNNING | INIT_THEN_SIPI => Some(INIT_PENDING),
                SIPI => Some(WAIT_FOR_SIPI),
                _ => None,
            })
            .unwrap_or_else(|s| s);
        match previous & STATE {
            RUNNING | INIT_PENDING | INIT_THEN_SIPI => InitOutcome::ResetPending,
            _ => InitOutcome::Waiting,
        }
    }

    /// A start-up IPI with `vector` arrives.
    pub fn sipi(&self, vector: u8) -> SipiOutcome {
        let result = self.update(|s| match s & STATE {
            WAIT_FOR_SIPI => Some(SIPI | u32::from(vector)),
            INIT_PENDING => Some(INIT_THEN_SIPI | u32::from(vector)),
            _ => None,
        });
        match result {
            Ok(_) => SipiOutcome::Accepted,
            Err(_) => SipiOutcome::Ignored,
        }
    }

    /// For a vCPU waiting for SIPI: takes the SIPI's vector, if one came; the vCPU is then
    /// running.
    pub fn take_sipi(&self) -> Option<u8> {
        let s = self.0.load(Ordering::Acquire);
        if !matches!(s & STATE, SIPI | INIT_THEN_SIPI) {
            return None;
        }
        self.update(|s| match s & STATE {
            SIPI | INIT_THEN_SIPI => Some(RUNNING),
            _ => None,
        })
        .ok()
        .map(|s| s as u8)
    }

    /// For a running vCPU at a VM exit: whether an INIT came (one load when none did).
    pub fn take_init(&self) -> Option<PendingReset> {
        let s = self.0.load(Ordering::Acquire);
        if !matches!(s & STATE, INIT_PENDING | INIT_THEN_SIPI) {
            return None;
        }
        let previous = self
            .update(|s| match s & STATE {
                INIT_PENDING => Some(WAIT_FOR_SIPI),
                INIT_THEN_SIPI => Some(RUNNING),
                _ => None,
            })
            .ok()?;
        Some(match previous & STATE {
            INIT_THEN_SIPI => PendingReset::Sipi(previous as u8),
            _ => PendingReset::WaitForSipi,
        })
    }
}

fn decode(s: u32) -> MailboxState {
    let vector = s as u8;
    match s & STATE {
        RUNNING => MailboxState::Running,
        WAIT_FOR_SIPI => MailboxState::WaitForSipi,
        SIPI => MailboxState::Sipi(vector),
        INIT_PENDING => MailboxState::InitPending,
        _ => MailboxState::InitThenSipi(vector),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_sipi_sipi_starts_a_waiting_ap_once_at_the_first_vector() {
        let m = StartupMailbox::waiting_for_sipi();
        assert_eq!(m.take_sipi(), None);
        assert_eq!(m.init(), InitOutcome::Waiting);
        assert_eq!(m.take_sipi(), None, "an INIT alone starts nothing");
        assert_eq!(m.sipi(0x9A), SipiOutcome::Accepted);
        assert_eq!(m.sipi(0x9B), SipiOutcome::Ignored, "the second SIPI");
        assert_eq!(m.state(), MailboxState::Sipi(0x9A));
        assert_eq!(m.take_sipi(), Some(0x9A));
        assert_eq!(m.state(), MailboxState::Running);
        assert_eq!(m.take_sipi(), None);
        assert_eq!(m.take_init(), None);
    }

    #[test]
    fn second_sipi_after_the_ap_started_is_ignored() {
        let m = StartupMailbox::waiting_for_sipi();
        m.init();
        m.sipi(0x9A);
        assert_eq!(m.take_sipi(), Some(0x9A));
        assert_eq!(m.sipi(0x9A), SipiOutcome::Ignored);
        assert_eq!(m.state(), MailboxState::Running);
        assert_eq!(m.take_init(), None);
    }

    #[test]
    fn sipi_without_init_to_a_running_vcpu_is_ignored() {
        let m = StartupMailbox::running();
        assert_eq!(m.sipi(0x10), SipiOutcome::Ignored);
        assert_eq!(m.take_init(), None);
        assert_eq!(m.state(), MailboxState::Running);
    }

    #[test]
    fn init_to_a_running_vcpu_resets_it_at_its_next_exit() {
        let m = StartupMailbox::running();
        assert_eq!(m.init(), InitOutcome::ResetPending);
        assert_eq!(m.init(), InitOutcome::ResetPending, "a repeated INIT");
        assert_eq!(m.take_init(), Some(PendingReset::WaitForSipi));
        assert_eq!(m.state(), MailboxState::WaitForSipi);
        assert_eq!(m.take_init(), None);
        m.sipi(0x20);
        assert_eq!(m.take_sipi(), Some(0x20));
    }

    #[test]
    fn init_and_sipi_before_the_running_vcpu_exits_restart_it_at_the_vector() {
        let m = StartupMailbox::running();
        m.init();
        assert_eq!(m.sipi(0x30), SipiOutcome::Accepted);
        assert_eq!(m.sipi(0x31), SipiOutcome::Ignored);
        assert_eq!(m.take_init(), Some(PendingReset::Sipi(0x30)));
        assert_eq!(m.state(), MailboxState::Running);
    }

    #[test]
    fn init_after_an_untaken_sipi_cancels_it() {
        let m = StartupMailbox::waiting_for_sipi();
        m.sipi(0x40);
        assert_eq!(m.init(), InitOutcome::Waiting);
        assert_eq!(m.take_sipi(), None);
        let r = StartupMailbox::running();
        r.init();
        r.sipi(0x41);
        assert_eq!(r.init(), InitOutcome::ResetPending);
        assert_eq!(r.take_init(), Some(PendingReset::WaitForSipi));
    }

    #[test]
    fn vector_zero_is_a_valid_sipi() {
        let m = StartupMailbox::waiting_for_sipi();
        m.sipi(0);
        assert_eq!(m.take_sipi(), Some(0));
    }

    #[test]
    fn concurrent_senders_start_the_ap_exactly_once() {
        use std::sync::Arc;
        for _ in 0..200 {
            let m = Arc::new(StartupMailbox::waiting_for_sipi());
            let senders: Vec<_> = (0..4u8)
                .map(|i| {
                    let m = Arc::clone(&m);
                    std::thread::spawn(move || m.sipi(0x80 + i) == SipiOutcome::Accepted)
                })
                .collect();
            let mut started = None;
            while started.is_none() {
                started = m.take_sipi();
            }
            let accepted = senders
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|&a| a)
                .count();
            assert_eq!(accepted, 1);
            assert!((0x80..0x84).contains(&started.unwrap()));
            assert_eq!(m.take_sipi(), None);
        }
    }
}
