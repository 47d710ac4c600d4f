//! What each CPU does after start-up: the boot CPU and the other OS cores become guest CPUs;
//! the DPI cores run the DPI loop and never enter a guest.

use ally_dpi::status::DpiStatus;
use ally_hypervisor::arch::apic::LocalApic;
use ally_hypervisor::arch::descriptors::{CpuTables, TIMER_TICKS, TIMER_VECTOR};
use ally_hypervisor::arch::instructions::{self, halt_forever};
use ally_hypervisor::arch::logger;
use ally_hypervisor::arch::svm::capabilities::SvmCapabilities;
use ally_hypervisor::arch::svm::exits as svm_exits;
use ally_hypervisor::arch::svm::vcpu::{SvmPages, SvmStart, SvmVcpu};
use ally_hypervisor::arch::vmx::capabilities::VmxCapabilities;
use ally_hypervisor::arch::vmx::launch;
use ally_hypervisor::arch::vmx::vcpu::{StartState, Vcpu, VcpuPages};
use ally_hypervisor::guards::init_sipi;
use ally_hypervisor::guest::GuestRegisters;
use core::sync::atomic::Ordering;
use log::{error, info};

/// Everything an application processor needs, prepared by the boot CPU.
pub struct ApLaunch {
    pub apic_id: u32,
    pub role: Role,
    pub tables: &'static mut CpuTables,
}

/// What a CPU is for.
pub enum Role {
    /// A guest CPU: waits for the guest's INIT-SIPI-SIPI in VMX non-root operation.
    OsCore(OsCoreSetup),
    /// A DPI core, with its slot in the status page.
    DpiCore {
        index: usize,
        status: &'static DpiStatus,
    },
}

/// The per-vCPU resources of an OS core, for the backend the boot CPU chose.
pub enum OsCoreSetup {
    Vmx(VmxCoreSetup),
    Svm(SvmCoreSetup),
}

/// An OS core under VMX.
pub struct VmxCoreSetup {
    pub vpid: u16,
    pub pages: VcpuPages,
    pub eptp: u64,
    pub exit_stack_top: u64,
    pub vcpu_slot: &'static mut Option<Vcpu>,
}

/// An OS core under SVM.
pub struct SvmCoreSetup {
    pub caps: SvmCapabilities,
    pub pages: SvmPages,
    pub n_cr3: u64,
    pub vcpu_slot: &'static mut Option<SvmVcpu>,
}

/// Rust entry of every application processor (called by the trampoline in long mode).
#[no_mangle]
pub extern "C" fn ally_ap_entry(launch: &'static mut ApLaunch) -> ! {
    let tss_base = launch.tables.tss_base();
    let tables: *mut CpuTables = launch.tables;
    // SAFETY: each AP gets its own CpuTables, which live for ever and are used by it alone.
    unsafe { (*tables).load() };
    match &mut launch.role {
        Role::DpiCore { index, status } => dpi_loop(*index, status, launch.apic_id),
        Role::OsCore(setup) => {
            let Err(e) = match setup {
                OsCoreSetup::Vmx(setup) => become_guest_cpu(setup, tss_base, launch.apic_id),
                OsCoreSetup::Svm(setup) => become_svm_guest_cpu(setup, launch.apic_id),
            };
            error!("ALLY fatal reason=\"OS core {}: {e}\"", launch.apic_id);
            halt_forever()
        }
    }
}

/// VMX on this core; wait in VMX root operation for the guest's SIPI (its INIT and SIPI are
/// emulated, see `ally_hypervisor::startup`); then a VMCS in real mode at the SIPI's vector,
/// VMLAUNCH.
fn become_guest_cpu(
    setup: &mut VmxCoreSetup,
    tss_base: u64,
    apic_id: u32,
) -> Result<core::convert::Infallible, crate::start::StartError> {
    // SAFETY: ring 0 on this AP; IA32_FEATURE_CONTROL is per core.
    let caps = unsafe { VmxCapabilities::probe_and_enable()? };
    let vcpu = setup
        .vcpu_slot
        .insert(Vcpu::new(apic_id, setup.vpid, caps, setup.pages));
    let mailbox = vcpu
        .mailbox
        .ok_or(crate::start::StartError::NotAnOsCore(apic_id))?;
    // SAFETY: on this AP, once; the pages were allocated zeroed by the boot CPU.
    unsafe { vcpu.activate()? };
    // SAFETY: the exit stack was allocated for this core alone.
    unsafe { ((setup.exit_stack_top) as *mut u64).write(vcpu as *mut Vcpu as u64) };
    info!(
        "OS core {apic_id} waits for the guest's SIPI (VPID {})",
        setup.vpid
    );
    let vector = init_sipi::wait_for_first_sipi(mailbox);
    vcpu.configure(
        setup.eptp,
        StartState::Sipi {
            segment: u16::from(vector) << 8,
        },
        setup.exit_stack_top,
        tss_base,
        launch::ally_vmexit_entry as *const () as u64,
    )?;
    info!(
        "vCPU {apic_id} started by the guest at {:#x}",
        u32::from(vector) << 12
    );
    // SAFETY: the VMCS is complete and current.
    let rflags = unsafe { launch::vmlaunch(&GuestRegisters::default()) };
    Err(crate::start::StartError::GuestEntryFailed {
        rflags,
        error: instructions::vmread(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR),
    })
}

/// SVM on this CPU: EFER.SVME, the host-save page, and Ally's own FS/GS/TR/LDTR and
/// syscall MSRs saved for the VMLOAD after each #VMEXIT (`arch::svm::launch`).
///
/// # Safety
/// Ring 0 on the CPU `pages` belong to, once, after Ally loaded this CPU's GDT and TSS;
/// the pages are zeroed, 4 KiB-aligned and identity-mapped.
pub unsafe fn enable_svm(caps: &SvmCapabilities, pages: &SvmPages) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        caps.enable(pages.host_save);
        instructions::svm::vmsave(pages.host_vmcb);
    }
}

/// SVM on this core; wait for the guest's SIPI (emulated, as under VMX); then a VMCB in real
/// mode at the SIPI's vector and the run loop.
fn become_svm_guest_cpu(
    setup: &mut SvmCoreSetup,
    apic_id: u32,
) -> Result<core::convert::Infallible, crate::start::StartError> {
    let vcpu = setup
        .vcpu_slot
        .insert(SvmVcpu::new(apic_id, setup.caps, setup.pages, setup.n_cr3));
    let mailbox = vcpu
        .mailbox
        .ok_or(crate::start::StartError::NotAnOsCore(apic_id))?;
    // SAFETY: on this AP, once, its tables loaded; the pages were allocated zeroed.
    unsafe { enable_svm(&setup.caps, &vcpu.pages) };
    info!("OS core {apic_id} waits for the guest's SIPI (SVM)");
    let vector = init_sipi::wait_for_first_sipi(mailbox);
    vcpu.configure(SvmStart::Sipi {
        segment: u16::from(vector) << 8,
    });
    info!(
        "vCPU {apic_id} started by the guest at {:#x}",
        u32::from(vector) << 12
    );
    svm_exits::run_loop(vcpu)
}

/// Timer period of an idle DPI core, in APIC timer ticks (bus clocks, divide by 1).
const IDLE_TIMER_COUNT: u32 = 10_000_000;
/// With a NIC to serve the timer is the receive path's alarm: frames the device wrote into
/// the DPI ring wait at most this long (the guest's tail writes ring doorbells, but the
/// device's DMA wakes nobody).
const NIC_TIMER_COUNT: u32 = 100_000;
/// Consecutive MWAITs that end at once with nothing to show before the DPI core falls back
/// to HLT. Counted only when the MWAIT lasted less than [`MWAIT_MIN_WAIT_TSC`]: a count alone
/// misjudged Bochs, where about as many empty MWAITs fit between two timer ticks.
const MWAIT_EMPTY_WAKEUPS_LIMIT: u32 = 64;
/// An MWAIT shorter than this many TSC ticks did not wait (a real wake-up by a write or an
/// interrupt takes longer; under Bochs an MWAIT that returns at once takes a few ticks).
const MWAIT_MIN_WAIT_TSC: u64 = 200;
/// Empty polls before a busy DPI core halts again (traffic comes in bursts).
const SPIN_POLLS: u32 = 256;

/// The DPI loop: the first DPI core moves the NIC's queues (`nic.rs`); every core publishes
/// its heartbeat. When idle a core halts with the APIC timer as its alarm, so that emulators
/// do not spend their time on a spinning core.
fn dpi_loop(index: usize, status: &DpiStatus, apic_id: u32) -> ! {
    let me = &status.cores[index];
    me.apic_id.store(u64::from(apic_id), Ordering::Relaxed);
    // No logical destination of the guest may match this core (see `ally_hypervisor::ipi`).
    let ldr = LocalApic::current().clear_logical_destination();
    info!("ALLY dpi-apic apic={apic_id} ldr={ldr:#x}");
    let mut work = if index == 0 {
        crate::nic::DPI_WORK.lock().take()
    } else {
        None
    };
    info!(
        "DPI core {index} (APIC {apic_id}) running{}",
        if work.is_some() {
            ", serving the NIC"
        } else {
            ""
        }
    );
    let period = if work.is_some() {
        NIC_TIMER_COUNT
    } else {
        IDLE_TIMER_COUNT
    };
    if let Some(work) = &work {
        work.serve_on(apic_id);
    }
    LocalApic::current().start_periodic_timer(TIMER_VECTOR, period);
    // MONITOR/MWAIT (CPUID.01H:ECX[3]) lets a guest's tail write wake the core at once.
    let mut mwait = instructions::has_monitor_mwait();
    // MWAIT that returns at once with neither a doorbell nor a timer tick did not wait
    // (MONITOR is a no-op on memory that is not write-back, and Bochs' MWAIT returns at
    // once): after a run of those, halt instead, with tail writes sending an IPI, so that an
    // idle core does not spin.
    let mut empty_wakeups = 0u32;
    // Polls left before halting: refilled by every poll that moved a frame (traffic comes in
    // bursts), not by an empty wake-up, so an idle core halts again at once.
    let mut spin_polls = 0;
    loop {
        me.beat();
        if let Some(work) = work.as_mut() {
            if work.poll() > 0 {
                spin_polls = SPIN_POLLS;
                continue;
            }
            // Idle: alert records go to COM2 as far as its FIFO takes them, without waiting.
            // While some remain the core polls on instead of waiting for its timer, so the
            // UART is kept busy.
            let alerts_waiting = logger::pump_alerts();
            if spin_polls > 0 || alerts_waiting {
                spin_polls = spin_polls.saturating_sub(1);
                core::hint::spin_loop();
                continue;
            }
        }
        // Idle: the IOMMUs' fault records (a few register reads, at most every few
        // million cycles).
        crate::iommu::poll_faults(false);
        if let Some(work) = work.as_mut() {
            // Whatever the wait below ends with, the next poll's doorbells rang while idle.
            work.note_woken();
        }
        match work.as_ref() {
            Some(work) if mwait => {
                let ticks = TIMER_TICKS.load(Ordering::Relaxed);
                let started = ally_dpi::queue::timestamp();
                // SAFETY: MONITOR/MWAIT are supported (checked above); the doorbell is in
                // Ally's identity-mapped memory; Ally's IDT handles the timer and NMIs.
                unsafe {
                    instructions::monitor(work.wake_line());
                    if !work.doorbell_pending() {
                        instructions::wait_for_write_or_interrupt();
                    }
                }
                let waited = ally_dpi::queue::timestamp().wrapping_sub(started);
                if work.doorbell_pending()
                    || TIMER_TICKS.load(Ordering::Relaxed) != ticks
                    || waited >= MWAIT_MIN_WAIT_TSC
                {
                    empty_wakeups = 0;
                } else {
                    empty_wakeups += 1;
                    if empty_wakeups == MWAIT_EMPTY_WAKEUPS_LIMIT {
                        mwait = false;
                        info!("ALLY dpi-idle mode=hlt reason=\"MWAIT returns at once here\"");
                    }
                }
            }
            Some(work) => {
                work.set_halted(true);
                if !work.doorbell_pending() {
                    // SAFETY: Ally's IDT handles the timer, the wake-up IPI and NMIs here.
                    unsafe { instructions::wait_for_interrupt() };
                }
                work.set_halted(false);
            }
            // SAFETY: Ally's IDT handles the timer and NMIs on this core.
            None => unsafe { instructions::wait_for_interrupt() },
        }
        me.wakeups.fetch_add(1, Ordering::Relaxed);
    }
}
