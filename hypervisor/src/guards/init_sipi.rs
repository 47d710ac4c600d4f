//! INIT and SIPI for the OS cores, emulated (the state machine and the reasons are in
//! `crate::startup`): the ICR filter hands the guest's INIT and SIPI here instead of to the
//! hardware, and a vCPU that waits for its SIPI does so in VMX root operation.

use crate::arch::apic::LocalApic;
use crate::arch::descriptors::TIMER_VECTOR;
use crate::arch::instructions;
use crate::ipi::{addresses, ApicMode, DeliveryMode, LogicalId};
use crate::platform::platform;
use crate::startup::{InitOutcome, MailboxState, SipiOutcome, StartupMailbox};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use log::info;

/// As many as `Platform::os_cores` can hold.
const MAX_OS_CORES: usize = 256;

/// One mailbox per OS core, in the order of `Platform::os_cores`. Every OS core but the boot
/// CPU starts waiting for the guest's SIPI; the boot CPU marks itself running.
static MAILBOXES: [StartupMailbox; MAX_OS_CORES] =
    [const { StartupMailbox::waiting_for_sipi() }; MAX_OS_CORES];

/// The guest's LDR and DFR on each OS core (xAPIC logical destinations), recorded as the
/// guest writes them; their values after INIT until then.
static GUEST_LDR: [AtomicU32; MAX_OS_CORES] = [const { AtomicU32::new(0) }; MAX_OS_CORES];
static GUEST_DFR: [AtomicU32; MAX_OS_CORES] = [const { AtomicU32::new(0xFFFF_FFFF) }; MAX_OS_CORES];

/// INITs (level assert) and SIPIs the guest sent to OS cores, emulated.
pub static EMULATED_INITS: AtomicU64 = AtomicU64::new(0);
pub static EMULATED_SIPIS: AtomicU64 = AtomicU64::new(0);

/// Timer period while an application processor waits for its SIPI, in APIC timer ticks
/// (divide by 1): tens of microseconds to a millisecond on hardware, ~2 ms under Bochs.
const SIPI_POLL_TIMER_COUNT: u32 = 100_000;

/// The index of the OS core with `apic_id` in `Platform::os_cores`.
pub fn os_index(apic_id: u32) -> Option<usize> {
    platform().os_cores.iter().position(|&id| id == apic_id)
}

/// The start-up mailbox of OS core `index`.
pub fn mailbox(index: usize) -> &'static StartupMailbox {
    &MAILBOXES[index]
}

/// xAPIC register offsets whose guest values the emulation needs.
pub const XAPIC_LDR: u64 = 0xD0;
pub const XAPIC_DFR: u64 = 0xE0;

/// Records a guest write of the LDR or DFR of OS core `apic_id`.
pub fn record_logical_register(apic_id: u32, offset: u64, value: u32) {
    let Some(index) = os_index(apic_id) else {
        return;
    };
    match offset {
        XAPIC_LDR => GUEST_LDR[index].store(value, Ordering::Relaxed),
        XAPIC_DFR => GUEST_DFR[index].store(value, Ordering::Relaxed),
        _ => {}
    }
}

/// The logical destination OS core `index` (in `Platform::os_cores`) answers to in xAPIC
/// mode, as the guest programmed its LDR and DFR.
pub fn guest_logical_id(index: usize) -> LogicalId {
    LogicalId::from_registers(
        GUEST_LDR[index].load(Ordering::Relaxed),
        GUEST_DFR[index].load(Ordering::Relaxed),
    )
}

/// Delivers the guest's INIT or SIPI `(low, destination)` from OS core `sender` to every OS
/// core it addresses. An INIT level de-assert only synchronises arbitration IDs and resets
/// nothing (SDM 12.6.1): it is ignored.
pub fn emulate(mode: ApicMode, low: u32, destination: u32, sender: u32) {
    let delivery = DeliveryMode::from_icr(low);
    const LEVEL_ASSERT: u32 = 1 << 14;
    if delivery == DeliveryMode::Init && low & LEVEL_ASSERT == 0 {
        return;
    }
    for (index, &id) in platform().os_cores.iter().enumerate() {
        if !addresses(mode, low, destination, sender, id, guest_logical_id(index)) {
            continue;
        }
        let mailbox = &MAILBOXES[index];
        match delivery {
            DeliveryMode::Init => {
                EMULATED_INITS.fetch_add(1, Ordering::Relaxed);
                let outcome = mailbox.init();
                if crate::log_limit::INIT_SIPI.admit() {
                    info!("ALLY init-emulated target={id} outcome={outcome:?}");
                    if outcome == InitOutcome::ResetPending {
                        info!("vCPU {id} runs: it takes the INIT at its next VM exit");
                    }
                }
            }
            DeliveryMode::Startup => {
                let vector = low as u8;
                if mailbox.sipi(vector) == SipiOutcome::Accepted {
                    EMULATED_SIPIS.fetch_add(1, Ordering::Relaxed);
                    if crate::log_limit::INIT_SIPI.admit() {
                        info!("ALLY sipi-emulated target={id} vector={vector:#x}");
                    }
                }
            }
            _ => {}
        }
    }
}

/// The guest reset the platform from OS core `sender`: every other OS core gets an INIT, as
/// the reset line would give it, and waits for the next boot's SIPI. Returns how many.
pub fn init_all_but(sender: u32) -> usize {
    let mut count = 0;
    for (index, &id) in platform().os_cores.iter().enumerate() {
        if id != sender {
            let outcome = MAILBOXES[index].init();
            info!("ALLY reset-init target={id} outcome={outcome:?}");

            count += 1;
        }
    }
    count
}

/// Whether every OS core but `sender` has left the guest and waits for a SIPI.
pub fn all_but_waiting(sender: u32) -> bool {
    platform()
        .os_cores
        .iter()
        .enumerate()
        .filter(|(_, &id)| id != sender)
        .all(|(index, _)| MAILBOXES[index].state() == MailboxState::WaitForSipi)
}

/// Waits, halted, until the guest's SIPI for this application processor arrives; returns its
/// vector. Before the guest first starts the CPU its local APIC is still Ally's (as INIT left
/// it): Ally borrows the timer as its alarm clock and hands the registers back as they were.
pub fn wait_for_first_sipi(mailbox: &StartupMailbox) -> u8 {
    if let Some(vector) = mailbox.take_sipi() {
        return vector;
    }
    let apic = LocalApic::current();
    let saved = apic.timer_state();
    apic.start_periodic_timer(TIMER_VECTOR, SIPI_POLL_TIMER_COUNT);
    let vector = loop {
        if let Some(vector) = mailbox.take_sipi() {
            break vector;
        }
        // SAFETY: Ally's IDT on this CPU handles the timer vector and NMIs; nothing else is
        // enabled at this APIC before the guest runs here.
        unsafe { instructions::wait_for_interrupt() };
    };
    // SAFETY: as above; a pending tick goes to Ally's timer handler.
    unsafe { apic.stop_timer(saved) };
    vector
}

/// Waits for the SIPI after an INIT that reached a vCPU which had run the guest; returns its
/// vector. The local APIC holds the guest's state, so Ally does not borrow it: interrupts stay
/// disabled and the CPU spins (the guest re-INITs a CPU only to take it offline and back).
pub fn wait_for_sipi_after_init(mailbox: &StartupMailbox) -> u8 {
    loop {
        if let Some(vector) = mailbox.take_sipi() {
            return vector;
        }
        core::hint::spin_loop();
    }
}

/// The SIPI vector an OS core `apic_id` restarts at after taking `reset` from its mailbox:
/// the SIPI's that already came, or, waiting in Ally (VMX root or SVM host), the next one.
pub fn vector_after_init(
    apic_id: u32,
    mailbox: &StartupMailbox,
    reset: crate::startup::PendingReset,
) -> u8 {
    match reset {
        crate::startup::PendingReset::Sipi(vector) => vector,
        crate::startup::PendingReset::WaitForSipi => {
            info!("vCPU {apic_id} took the guest's INIT: waits for SIPI");
            wait_for_sipi_after_init(mailbox)
        }
    }
}

/// An OS core other than the boot CPU asked for a platform reset: the boot CPU carries it
/// out (`crate::guest_reset::defer_to_boot_cpu`), and this core takes an INIT, as the reset
/// line would give it.
pub fn defer_reset(
    mailbox: &StartupMailbox,
    source: crate::reset::ResetSource,
) -> crate::startup::PendingReset {
    crate::guest_reset::defer_to_boot_cpu(source);
    mailbox.init();
    mailbox
        .take_init()
        .unwrap_or(crate::startup::PendingReset::WaitForSipi)
}

/// Prints the emulation's counters and every OS core's state.
pub fn report() {
    info!(
        "ALLY ipi-emulated init={} sipi={}",
        EMULATED_INITS.load(Ordering::Relaxed),
        EMULATED_SIPIS.load(Ordering::Relaxed)
    );
    for (index, &id) in platform().os_cores.iter().enumerate() {
        info!(
            "ALLY os-core index={index} apic={id} state={:?}",
            MAILBOXES[index].state()
        );
    }
}
