//! The VM-exit handler: one function per exit reason Ally expects. Everything else stops the
//! guest with a report (reason, qualification, guest RIP, VM-instruction error); Ally never
//! silently resumes a guest after an exit it does not understand.

use super::apic_guard;
use super::guest_reset;
use super::init_sipi;
use super::nic_guard::{self, PortAccess};
use super::pci_guard;
use super::platform::{platform, PhysicalMemory};
use super::vcpu::{StartState, Vcpu};
use crate::addr::GuestPhysAddr;
use crate::arch::instructions::{self, halt_forever, vmread, vmwrite};
use crate::control_regs::{self, ControlState};
use crate::exit::{CrAccess, CrAccessType, ExitCounters, ExitReason, IoQualification};
use crate::guest::{
    emulate_follow_on, emulate_mmio, AccessKind, AccessWidth, GuestCpuState, GuestRegisters,
    MmioHandler, SegmentBases,
};
use crate::ioport::PortWrite;
use crate::log_limit;
use crate::msr::{self, MsrContext, WriteVerdict};
use crate::reset::{PortVerdict, ResetSource};
use crate::sleep::SleepVerdict;
use crate::startup::PendingReset;
use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use log::{error, info, warn};
use x86::vmx::vmcs::{control, guest, ro};

/// Why the guest was stopped.
#[derive(Debug)]
pub enum StopReason {
    Unhandled { reason: ExitReason, basic: u32 },
    EntryFailed { basic: u32 },
    GuestRequested(&'static str),
    Emulation(crate::guest::EmulationError),
    BadCrAccess,
    Int15(&'static str),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unhandled { reason, basic } => write!(f, "unhandled exit {basic} ({reason})"),
            Self::EntryFailed { basic } => write!(f, "VM entry failed (basic reason {basic})"),
            Self::GuestRequested(what) => write!(f, "{what}"),
            Self::Emulation(e) => write!(f, "cannot emulate the guest's access: {e}"),
            Self::BadCrAccess => write!(f, "unsupported control-register access"),
            Self::Int15(what) => write!(f, "INT 15h hook: {what}"),
        }
    }
}

type ExitResult = Result<(), StopReason>;

// VM-entry interruption information (SDM 25.8.3).
const VECTOR_UD: u64 = 6;
const VECTOR_GP: u64 = 13;
const HARDWARE_EXCEPTION: u64 = 3 << 8;
const DELIVER_ERROR_CODE: u64 = 1 << 11;
const VALID: u64 = 1 << 31;

fn vmcs_write(field: u32, value: u64) {
    // SAFETY: the exit handler runs with this CPU's VMCS current; each value written keeps
    // the guest state architecturally valid (checked by the next VM entry, which reports
    // any failure through `ally_vmresume_failed`).
    if unsafe { vmwrite(field, value) }.is_err() {
        error!("VMWRITE of field {field:#x} failed");
    }
}

fn guest_in_protected_mode() -> bool {
    vmread(guest::CR0) & 1 != 0
}

/// Makes the next VM entry deliver hardware exception `vector` to the guest.
fn inject_exception(vector: u64, error_code: Option<u32>) {
    let mut info = vector | HARDWARE_EXCEPTION | VALID;
    // Real mode has no error codes (SDM 27.2.1.3).
    if let (Some(code), true) = (error_code, guest_in_protected_mode()) {
        info |= DELIVER_ERROR_CODE;
        vmcs_write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
    }
    vmcs_write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Skips the exiting instruction (valid for exits that report an instruction length).
fn advance_rip() {
    let len = vmread(ro::VMEXIT_INSTRUCTION_LEN);
    vmcs_write(guest::RIP, vmread(guest::RIP).wrapping_add(len));
    // Completing an instruction ends blocking by STI / MOV SS (SDM 26.3.1.5).
    let interruptibility = vmread(guest::INTERRUPTIBILITY_STATE);
    if interruptibility & 3 != 0 {
        vmcs_write(guest::INTERRUPTIBILITY_STATE, interruptibility & !3);
    }
}

fn gpr(regs: &mut GuestRegisters, index: u8) -> Option<&mut u64> {
    regs.get_mut(index)
}

/// Reads the guest's state into the decoder's view of it.
fn cpu_state(regs: &GuestRegisters) -> GuestCpuState {
    let mut regs = *regs;
    regs.rsp = vmread(guest::RSP);
    GuestCpuState {
        regs,
        rip: vmread(guest::RIP),
        rflags: vmread(guest::RFLAGS),
        cr0: vmread(guest::CR0),
        cr3: vmread(guest::CR3),
        cr4: vmread(guest::CR4),
        efer: vmread(guest::IA32_EFER_FULL),
        cs_selector: vmread(guest::CS_SELECTOR) as u16,
        cs_base: vmread(guest::CS_BASE),
        cs_access_rights: vmread(guest::CS_ACCESS_RIGHTS) as u32,
        ss_access_rights: vmread(guest::SS_ACCESS_RIGHTS) as u32,
        segment_bases: SegmentBases {
            es: vmread(guest::ES_BASE),
            ss: vmread(guest::SS_BASE),
            ds: vmread(guest::DS_BASE),
            fs: vmread(guest::FS_BASE),
            gs: vmread(guest::GS_BASE),
        },
        max_phys_addr_bits: 0,
    }
}

/// How many exits of each application processor are logged at debug level.
const FIRST_AP_EXITS_LOGGED: u64 = 40;

/// The VM-exit dispatcher, called by the trampoline in `launch.rs`.
#[no_mangle]
extern "C" fn ally_handle_vmexit(regs: &mut GuestRegisters, vcpu: &mut Vcpu) {
    let entered = instructions::rdtsc();
    let raw_reason = vmread(ro::EXIT_REASON) as u32;
    let basic = raw_reason & 0xFFFF;
    let reason = ExitReason::from_basic(basic);
    vcpu.exits.record(basic);
    super::platform::sync_ept(vcpu);
    // The first exits of an application processor, to follow its start-up in the log.
    // Checked in this order so that the exit path pays nothing unless debug logging is on.
    if log::log_enabled!(log::Level::Debug)
        && vcpu.vpid != 1
        && vcpu.exits.total() <= FIRST_AP_EXITS_LOGGED
    {
        log::debug!(
            "vCPU {} exit {} ({reason}) rip={:#x} cs={:#x} qual={:#x}",
            vcpu.apic_id,
            vcpu.exits.total(),
            vmread(guest::RIP),
            vmread(guest::CS_SELECTOR),
            vmread(ro::EXIT_QUALIFICATION)
        );
    }

    // An INIT the guest sent this vCPU while it ran comes before the exit's own work, which it
    // abandons (the mailbox load is all an exit pays when none came).
    let pending_init = vcpu.mailbox.and_then(|m| m.take_init());
    let outcome = if let Some(reset) = pending_init {
        take_pending_init(regs, vcpu, reset)
    } else if let Some(source) = guest_reset::take_deferred(vcpu.apic_id) {
        guest_reset::restart(regs, vcpu, source)
    } else if raw_reason & (1 << 31) != 0 {
        Err(StopReason::EntryFailed { basic })
    } else {
        match reason {
            ExitReason::Cpuid => handle_cpuid(regs, vcpu),
            ExitReason::Rdmsr => handle_rdmsr(regs, vcpu),
            ExitReason::Wrmsr => handle_wrmsr(regs, vcpu),
            ExitReason::CrAccess => handle_cr_access(regs, vcpu),
            ExitReason::Xsetbv => handle_xsetbv(regs),
            ExitReason::Invd => {
                // INVD would discard Ally's dirty lines too: write them back instead.
                instructions::wbinvd();
                advance_rip();
                Ok(())
            }
            ExitReason::IoInstruction => handle_io(regs, vcpu),
            ExitReason::EptViolation => handle_ept_violation(regs, vcpu),
            ExitReason::Vmcall => handle_vmcall(regs),
            // A PC's chipset resets a processor that shuts down.
            ExitReason::TripleFault => handle_reset(regs, vcpu, ResetSource::TripleFault),
            // Only bounds the time between exits; a pending INIT was looked at above.
            ExitReason::PreemptionTimer => Ok(()),
            ExitReason::InitSignal => {
                handle_init(vcpu).and_then(|()| match vcpu.mailbox.and_then(|m| m.take_init()) {
                    Some(reset) => take_pending_init(regs, vcpu, reset),
                    None => Ok(()),
                })
            }
            // The guest tried to use VMX, which Ally hides: #UD as on a CPU without it.
            ExitReason::Vmclear
            | ExitReason::Vmlaunch
            | ExitReason::Vmptrld
            | ExitReason::Vmptrst
            | ExitReason::Vmread
            | ExitReason::Vmresume
            | ExitReason::Vmwrite
            | ExitReason::Vmxoff
            | ExitReason::Vmxon
            | ExitReason::Invept
            | ExitReason::Invvpid
            | ExitReason::Getsec
            | ExitReason::Vmfunc => {
                inject_exception(VECTOR_UD, None);
                Ok(())
            }
            _ => Err(StopReason::Unhandled { reason, basic }),
        }
    };

    if let Err(stop) = outcome {
        stop_guest(vcpu, &stop);
    }
    sync_long_mode_entry_control();
    vcpu.exits
        .record_cycles(basic, instructions::rdtsc().wrapping_sub(entered));
}

/// Keeps the "IA-32e mode guest" entry control equal to the guest's EFER.LMA, which the CPU
/// updates when the guest enables paging with EFER.LME set (SDM 26.2.4, 27.3.1.1).
fn sync_long_mode_entry_control() {
    const LMA: u64 = 1 << 10;
    const IA32E_MODE_GUEST: u64 = 1 << 9;
    let entry = vmread(control::VMENTRY_CONTROLS);
    let wanted = if vmread(guest::IA32_EFER_FULL) & LMA != 0 {
        entry | IA32E_MODE_GUEST
    } else {
        entry & !IA32E_MODE_GUEST
    };
    if wanted != entry {
        vmcs_write(control::VMENTRY_CONTROLS, wanted);
    }
}

/// Reports why the guest stops, with the exit counts, and halts this CPU.
pub fn stop_guest(vcpu: &mut Vcpu, stop: &dyn fmt::Display) -> ! {
    vcpu.stopped = true;
    error!(
        "ALLY fatal reason=\"{}\" exit_reason={:#x} qualification={:#x} guest_rip={:#x} \
         guest_cs={:#x} guest_cr0={:#x} vm_instruction_error={} guest_phys={:#x}",
        stop,
        vmread(ro::EXIT_REASON),
        vmread(ro::EXIT_QUALIFICATION),
        vmread(guest::RIP),
        vmread(guest::CS_SELECTOR),
        vmread(guest::CR0),
        vmread(ro::VM_INSTRUCTION_ERROR),
        vmread(ro::GUEST_PHYSICAL_ADDR_FULL),
    );
    report_exits(vcpu);
    halt_forever()
}

/// Prints one `ALLY exits` line per exit reason seen on this vCPU.
pub fn report_exits(vcpu: &Vcpu) {
    print_exits(&vcpu.exits);
}

/// One line per reason: the count and the handler's TSC ticks per exit (mean and longest;
/// the VM exit and VM entry transitions themselves are not included).
fn print_exits(exits: &ExitCounters) {
    for cost in exits.costs() {
        info!(
            "ALLY exits reason={} basic={} count={} handler-tsc-mean={} handler-tsc-max={}",
            ExitReason::from_basic(cost.basic),
            cost.basic,
            cost.timed,
            cost.mean(),
            cost.max_cycles
        );
    }
}

/// Every vCPU's exit counters, by OS core index, registered as each vCPU is configured.
static VCPU_EXITS: [AtomicPtr<ExitCounters>; 256] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];

/// Makes `vcpu`'s exit counts part of the power-off report.
pub fn register_exit_counters(vcpu: &Vcpu) {
    if let Some(index) = init_sipi::os_index(vcpu.apic_id) {
        VCPU_EXITS[index].store(
            &vcpu.exits as *const ExitCounters as *mut ExitCounters,
            Ordering::Release,
        );
    }
}

/// The exit counters of every vCPU registered so far, with its index.
fn registered_exits() -> impl Iterator<Item = (usize, &'static ExitCounters)> {
    VCPU_EXITS.iter().enumerate().filter_map(|(index, p)| {
        let p = p.load(Ordering::Acquire);
        // SAFETY: registered pointers are to the counters of vCPUs, which live for as long
        // as Ally runs; the counters are atomics, safe to read from any CPU.
        (!p.is_null()).then(|| (index, unsafe { &*p }))
    })
}

/// At power-off: the exits of all vCPUs by reason (`ALLY exits`), then each vCPU's total.
pub fn report_all_exits() {
    let mut sum = ExitCounters::new();
    for (_, exits) in registered_exits() {
        sum.merge(exits);
    }
    print_exits(&sum);
    for (index, exits) in registered_exits() {
        info!(
            "ALLY vcpu-exits apic={} total={}",
            platform().os_cores.get(index).copied().unwrap_or(u32::MAX),
            exits.total()
        );
    }
}

/// CR4 as the guest sees it: Ally's bits from the read shadow, the rest from the real CR4.
fn guest_cr4() -> u64 {
    let mask = vmread(control::CR4_GUEST_HOST_MASK);
    (vmread(control::CR4_READ_SHADOW) & mask) | (vmread(guest::CR4) & !mask)
}

/// A hardware INIT exit. The guest's INITs never reach an OS core's hardware (the ICR filter
/// emulates them, see `crate::startup`), so this INIT came from the platform (an INIT# pin or
/// chipset reset); it is taken like the guest's: the vCPU waits for a SIPI.
fn handle_init(vcpu: &mut Vcpu) -> ExitResult {
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "INIT on a CPU that is no OS core",
    ))?;
    mailbox.init();
    Ok(())
}

/// The guest asked for a platform reset (`crate::reset`): the boot CPU restarts the guest;
/// another OS core hands the reset to it and waits, as after INIT, for the next boot's SIPI.
fn handle_reset(regs: &mut GuestRegisters, vcpu: &mut Vcpu, source: ResetSource) -> ExitResult {
    if vcpu.apic_id == platform().boot_cpu {
        return guest_reset::restart(regs, vcpu, source);
    }
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "a reset request on a CPU that is no OS core",
    ))?;
    guest_reset::defer_to_boot_cpu(source);
    mailbox.init();
    let reset = mailbox.take_init().unwrap_or(PendingReset::WaitForSipi);
    take_pending_init(regs, vcpu, reset)
}

/// Takes an INIT the guest sent this vCPU while it ran: the vCPU leaves the guest, waits in
/// VMX root operation for the SIPI (unless it already came) and restarts the guest there.
fn take_pending_init(
    regs: &mut GuestRegisters,
    vcpu: &mut Vcpu,
    reset: PendingReset,
) -> ExitResult {
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "INIT on a CPU that is no OS core",
    ))?;
    let vector = match reset {
        PendingReset::Sipi(vector) => vector,
        PendingReset::WaitForSipi => {
            info!(
                "vCPU {} took the guest's INIT: waits for SIPI",
                vcpu.apic_id
            );
            init_sipi::wait_for_sipi_after_init(mailbox)
        }
    };
    start_at_sipi(regs, vcpu, vector)
}

/// The state after INIT, started by a SIPI: real mode at `vector:0000` (SDM Vol. 3A 9.4.4).
fn start_at_sipi(regs: &mut GuestRegisters, vcpu: &mut Vcpu, vector: u8) -> ExitResult {
    vcpu.reset_guest(StartState::Sipi {
        segment: u16::from(vector) << 8,
    })
    .map_err(|_| StopReason::GuestRequested("the SIPI start state could not be written"))?;
    *regs = GuestRegisters::default();
    // Nothing the abandoned exit meant to inject survives INIT.
    vmcs_write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    // SAFETY: VPID single-context INVVPID support was checked at start-up.
    unsafe { instructions::invvpid_single(vcpu.vpid) };
    info!(
        "vCPU {} started by the guest at {:#x}",
        vcpu.apic_id,
        u32::from(vector) << 12
    );
    Ok(())
}

fn handle_cpuid(regs: &mut GuestRegisters, vcpu: &Vcpu) -> ExitResult {
    let leaf = regs.rax as u32;
    let subleaf = regs.rcx as u32;
    let mut r = raw_cpuid::cpuid!(leaf, subleaf);
    if leaf == 1 {
        // Hide VMX (bit 5) and report no hypervisor (bit 31): the guest must not learn of Ally.
        r.ecx &= !((1 << 5) | (1 << 31));
        // OSXSAVE (bit 27) mirrors CR4.OSXSAVE — the guest's, not Ally's (SDM Vol. 2A CPUID).
        const OSXSAVE: u32 = 1 << 27;
        r.ecx &= !OSXSAVE;
        if guest_cr4() & (1 << 18) != 0 {
            r.ecx |= OSXSAVE;
        }
        // Where VMX does not let a guest set CR4.OSXSAVE (IA32_VMX_CR4_FIXED1 bit 18 is 0, as
        // in Bochs 2.7), XSAVE and the AVX state it manages cannot work in the guest: report
        // them absent, as on a CPU without them, instead of letting the guest fault later.
        if !vcpu.guest_can_use_xsave() {
            const XSAVE: u32 = 1 << 26;
            const AVX: u32 = 1 << 28;
            const FMA: u32 = 1 << 12;
            const F16C: u32 = 1 << 29;
            r.ecx &= !(XSAVE | AVX | FMA | F16C);
        }
    } else if leaf == 0xB || leaf == 0x1F {
        // The guest's own cores only (see `crate::topology`).
        let [eax, ebx, ecx, edx] = crate::topology::guest_topology_leaf(
            leaf,
            vcpu.apic_id,
            [r.eax, r.ebx, r.ecx, r.edx],
            &platform().os_cores,
        );
        r.eax = eax;
        r.ebx = ebx;
        r.ecx = ecx;
        r.edx = edx;
    } else if leaf == 0x14 || (leaf == 0xD && !vcpu.guest_can_use_xsave()) {
        // Leaf 0x14 enumerates Intel PT, which Ally hides.
        r.eax = 0;
        r.ebx = 0;
        r.ecx = 0;
        r.edx = 0;
    } else if leaf == 7 && subleaf == 0 {
        if !vcpu.guest_can_use_xsave() {
            // AVX2 (EBX 5) and the AVX-512 family need XSAVE-managed state.
            const AVX_FAMILY_EBX: u32 = (1 << 5)
                | (1 << 16)
                | (1 << 17)
                | (1 << 21)
                | (1 << 26)
                | (1 << 27)
                | (1 << 28)
                | (1 << 30)
                | (1 << 31);
            r.ebx &= !AVX_FAMILY_EBX;
            r.ecx &= !((1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 3));
            r.edx &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 23));
        }
        // Intel PT (EBX bit 25) is hidden: its MSRs are refused (`crate::msr`).
        r.ebx &= !(1 << 25);
        // OSPKE (ECX bit 4) mirrors the guest's CR4.PKE (bit 22) likewise.
        r.ecx &= !(1 << 4);
        if guest_cr4() & (1 << 22) != 0 {
            r.ecx |= 1 << 4;
        }
    }
    regs.rax = u64::from(r.eax);
    regs.rbx = u64::from(r.ebx);
    regs.rcx = u64::from(r.ecx);
    regs.rdx = u64::from(r.edx);
    advance_rip();
    Ok(())
}

/// Guest WRMSRs refused with #GP (`crate::msr`).
static MSR_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Guest MTRR writes kept in the vCPU's shadow.
static MTRR_SHADOWED: AtomicU64 = AtomicU64::new(0);

fn handle_rdmsr(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
    let msr = regs.rcx as u32;
    let value = match msr {
        // Locked, with VMX disabled: what a CPU without VMX shows (SDM Vol. 4 table 2-2).
        msr::IA32_FEATURE_CONTROL => Some(1),
        m if msr::is_mtrr(m) => vcpu.mtrr.read(m),
        // The VMX capability MSRs, Intel PT's (hidden in CPUID) and MSRs outside the
        // bitmap's ranges: absent, as on a CPU without them.
        _ => None,
    };
    let Some(value) = value else {
        inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    };
    regs.rax = value & 0xFFFF_FFFF;
    regs.rdx = value >> 32;
    advance_rip();
    Ok(())
}

fn x2apic_enabled() -> bool {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    unsafe { instructions::rdmsr(msr::IA32_APIC_BASE) & (1 << 10) != 0 }
}

fn handle_wrmsr(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
    let index = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF);
    let current = match index {
        // SAFETY: both are architectural on every CPU with VMX.
        msr::IA32_APIC_BASE | msr::IA32_MISC_ENABLE => unsafe { instructions::rdmsr(index) },
        _ => 0,
    };
    let context = MsrContext {
        max_phys_bits: raw_cpuid::cpuid!(0x8000_0008).eax as u8,
        x2apic_supported: raw_cpuid::cpuid!(1).ecx & (1 << 21) != 0,
        current,
    };
    let refusal = match msr::judge_write(index, value, context) {
        WriteVerdict::Hardware => {
            // SAFETY: IA32_APIC_BASE, validated as the CPU would (no #GP in VMX root) and
            // with the APIC left at its address.
            unsafe { instructions::wrmsr(index, value) };
            None
        }
        WriteVerdict::Unchanged => None,
        WriteVerdict::X2apicIcr if x2apic_enabled() => {
            apic_guard::write_x2apic_icr(value, vcpu.apic_id);
            None
        }
        WriteVerdict::X2apicIcr => Some("the x2APIC ICR in xAPIC mode"),
        WriteVerdict::Mtrr => {
            MTRR_SHADOWED.fetch_add(1, Ordering::Relaxed);
            (!vcpu.mtrr.write(index, value)).then_some("an MTRR this CPU does not have")
        }
        WriteVerdict::Refuse(why) => Some(why),
    };
    if let Some(why) = refusal {
        MSR_REFUSED.fetch_add(1, Ordering::Relaxed);
        if log_limit::MSR_REFUSED.admit() {
            warn!(
                "ALLY msr-refused msr={index:#x} value={value:#x} cpu={} reason=\"{why}\"",
                vcpu.apic_id
            );
        }
        inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    }
    advance_rip();
    Ok(())
}

/// Prints the MSR guard's counters (at the guest's power-off).
pub fn report_msrs() {
    info!(
        "ALLY msr-guard refused={} mtrr-shadowed={} write-allow-list={}",
        MSR_REFUSED.load(Ordering::Relaxed),
        MTRR_SHADOWED.load(Ordering::Relaxed),
        msr::WRITE_ALLOWED.len()
    );
}

fn handle_cr_access(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
    let access = CrAccess::decode(vmread(ro::EXIT_QUALIFICATION));
    let value = match access.access_type {
        CrAccessType::MovToCr => {
            if access.gpr == 4 {
                vmread(guest::RSP)
            } else {
                *gpr(regs, access.gpr).ok_or(StopReason::BadCrAccess)?
            }
        }
        CrAccessType::Lmsw => {
            // LMSW changes CR0 bits 3:0 only and cannot clear PE (SDM Vol. 2A LMSW).
            let shadow = vmread(control::CR0_READ_SHADOW);
            let src = u64::from(access.lmsw_source);
            (shadow & !0xE) | (src & 0xF) | (shadow & 1)
        }
        _ => return Err(StopReason::BadCrAccess),
    };
    let retired = match access.cr {
        0 => write_guest_cr0(value, vcpu),
        4 => write_guest_cr4(value, vcpu),
        _ => return Err(StopReason::BadCrAccess),
    };
    if !retired {
        return Ok(());
    }
    // SAFETY: VPID support with single-context INVVPID was checked at start-up; flushing the
    // guest's linear translations after a paging-mode change is what a real CPU does.
    unsafe { instructions::invvpid_single(vcpu.vpid) };
    advance_rip();
    Ok(())
}

/// The guest's control registers as it sees them (Ally's bits from the read shadows).
fn control_state(vcpu: &Vcpu) -> ControlState {
    let view = |real: u64, shadow: u64, mask: u64| (real & !mask) | (shadow & mask);
    let efer = vmread(guest::IA32_EFER_FULL);
    ControlState {
        cr0: view(
            vmread(guest::CR0),
            vmread(control::CR0_READ_SHADOW),
            vcpu.cr0_mask,
        ),
        cr3: vmread(guest::CR3),
        cr4: view(
            vmread(guest::CR4),
            vmread(control::CR4_READ_SHADOW),
            vcpu.cr4_mask,
        ),
        efer_lme: efer & (1 << 8) != 0,
        efer_lma: efer & (1 << 10) != 0,
        cs_long: vmread(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0,
    }
}

/// Emulates MOV to CR0; returns whether the instruction retired.
fn write_guest_cr0(value: u64, vcpu: &Vcpu) -> bool {
    const PE: u64 = 1;
    const PG: u64 = 1 << 31;
    const LME: u64 = 1 << 8;
    const LMA: u64 = 1 << 10;
    if let Err(why) = control_regs::check_cr0(value, control_state(vcpu)) {
        log::debug!("guest CR0 <- {value:#x} refused: {why}");
        inject_exception(VECTOR_GP, Some(0));
        return false;
    }
    let caps = &vcpu.caps;
    let real = ((value | caps.cr0_fixed0) & caps.cr0_fixed1 & !(PE | PG)) | (value & (PE | PG));
    log::debug!("guest CR0 <- {value:#x} (real {real:#x})");
    // Enabling paging with EFER.LME activates IA-32e mode (SDM Vol. 3A 10.8.5).
    let efer = vmread(guest::IA32_EFER_FULL);
    let new_efer = if value & PG != 0 && efer & LME != 0 {
        efer | LMA
    } else {
        efer & !LMA
    };
    if new_efer != efer {
        vmcs_write(guest::IA32_EFER_FULL, new_efer);
    }
    vmcs_write(guest::CR0, real);
    vmcs_write(control::CR0_READ_SHADOW, value);
    load_pae_pdptes_if_needed(real, vmread(guest::CR4), new_efer);
    true
}

/// Emulates MOV to CR4; returns whether the instruction retired.
fn write_guest_cr4(value: u64, vcpu: &Vcpu) -> bool {
    // VMX is hidden: setting CR4.VMXE faults as on a CPU without VMX; so do the bits the
    // CPU does not support in VMX operation and the combinations MOV to CR4 refuses.
    let caps = &vcpu.caps;
    if let Err(why) = control_regs::check_cr4(value, caps.cr4_fixed1, control_state(vcpu)) {
        log::debug!("guest CR4 <- {value:#x} refused: {why}");
        inject_exception(VECTOR_GP, Some(0));
        return false;
    }
    let real = (value | caps.cr4_fixed0) & caps.cr4_fixed1;
    log::debug!("guest CR4 <- {value:#x} (real {real:#x})");
    vmcs_write(guest::CR4, real);
    vmcs_write(control::CR4_READ_SHADOW, value);
    load_pae_pdptes_if_needed(vmread(guest::CR0), real, vmread(guest::IA32_EFER_FULL));
    true
}

/// With EPT, PAE paging (not IA-32e) takes its PDPTEs from the VMCS at VM entry (SDM 26.3.2.4),
/// so an emulated CR write that enters PAE paging must load them from the guest's CR3.
fn load_pae_pdptes_if_needed(cr0: u64, cr4: u64, efer: u64) {
    const PG: u64 = 1 << 31;
    const PAE: u64 = 1 << 5;
    const LMA: u64 = 1 << 10;
    if cr0 & PG == 0 || cr4 & PAE == 0 || efer & LMA != 0 {
        return;
    }
    let base = vmread(guest::CR3) & 0xFFFF_FFE0;
    let memory = PhysicalMemory;
    for (i, field) in [
        guest::PDPTE0_FULL,
        guest::PDPTE1_FULL,
        guest::PDPTE2_FULL,
        guest::PDPTE3_FULL,
    ]
    .into_iter()
    .enumerate()
    {
        let value =
            crate::guest::GuestMemory::read_u64(&memory, GuestPhysAddr(base + 8 * i as u64))
                .unwrap_or(0);
        vmcs_write(field, value);
    }
}

fn handle_xsetbv(regs: &mut GuestRegisters) -> ExitResult {
    let index = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF);
    let supported = {
        let r = raw_cpuid::cpuid!(0xD, 0);
        (u64::from(r.edx) << 32) | u64::from(r.eax)
    };
    const X87: u64 = 1;
    const SSE: u64 = 1 << 1;
    const AVX: u64 = 1 << 2;
    // The checks XSETBV itself makes (SDM Vol. 2C XSETBV): else #GP in the guest, never in Ally.
    let valid = index == 0
        && value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (value & 0xE0 == 0 || value & 0xE0 == 0xE0 && value & AVX != 0);
    if !valid {
        inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    }
    // SAFETY: CR4.OSXSAVE is set in VMX root (capabilities.rs) and `value` passed the checks
    // the instruction makes; Ally itself uses no extended state.
    unsafe { instructions::xsetbv0(value) };
    advance_rip();
    Ok(())
}

fn handle_io(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
    let io = IoQualification::decode(vmread(ro::EXIT_QUALIFICATION));
    if io.string {
        return Err(StopReason::GuestRequested(
            "string I/O on a port Ally intercepts (unsupported)",
        ));
    }
    let platform = platform();
    let width_mask: u64 = match io.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    let mut value = (regs.rax & width_mask) as u32;
    let access = PortWrite::new(io.port, io.size, value);
    if !io.is_in {
        if platform.resets.watches(&access) {
            match platform.resets.judge(access) {
                PortVerdict::Reset(source) => return handle_reset(regs, vcpu, source),
                PortVerdict::Forward(corrected) => value = corrected.value,
            }
        }
        match platform.sleep.judge_write(access) {
            SleepVerdict::NoSleep => {}
            // S5: report first, then let the write reach the hardware (below).
            SleepVerdict::PowerOff => {
                info!(
                    "ALLY guest-sleep port={:#x} value={value:#x} state=S5",
                    io.port
                );
                super::platform::report_power_off();
            }
            SleepVerdict::Refused { slp_typ, state } => {
                if log_limit::SLEEP_REFUSED.admit() {
                    warn!(
                        "ALLY sleep-refused port={:#x} value={value:#x} slp_typ={slp_typ} state={} count={}",
                        io.port,
                        SleepState(state),
                        platform.sleep.refused()
                    );
                }
                advance_rip();
                return Ok(());
            }
        }
    }
    let handled = if pci_guard::is_config_port(io.port) {
        match pci_guard::config_port_access(
            &mut vcpu.config_address,
            io.port,
            io.size,
            io.is_in,
            value,
        ) {
            pci_guard::ConfigOutcome::Done(result) => Some(result),
            pci_guard::ConfigOutcome::Reset => {
                return handle_reset(regs, vcpu, ResetSource::AcpiResetRegister)
            }
        }
    } else if platform.resets.watches(&access) || platform.sleep.watches(io.port, io.size) {
        // The 8042, port 0x92 and the ACPI PM registers otherwise belong to the guest.
        // SAFETY: the guest owns these ports; Ally forwards the access at the same width
        // (judged above: no reset, no sleep state but S5, the A20 gate open).
        let result = unsafe { nic_guard::forward(io.port, io.size, io.is_in, value) };
        Some(result.map(|v| platform.sleep.adjust_read(io.port, io.size, v)))
    } else {
        match platform
            .nic
            .as_ref()
            .map(|nic| nic_guard::port_access(nic, io.port, io.size, io.is_in, value))
        {
            Some(PortAccess::Done(result)) => Some(result),
            _ => None,
        }
    };
    if let Some(result) = handled {
        if let Some(v) = result {
            // IN of 4 bytes zero-extends into RAX; narrower ones keep the upper bits.
            regs.rax = if io.size == 4 {
                u64::from(v)
            } else {
                (regs.rax & !width_mask) | (u64::from(v) & width_mask)
            };
        }
        advance_rip();
        return Ok(());
    }
    // COM2 is Ally's: the guest sees no UART there (reads float high, writes are dropped).
    // A byte written to its scratch register asks Ally for a counters snapshot (a test
    // harness measuring exit rates between two marks; rate-limited by `log_limit::MARK`).
    if !io.is_in && io.port == COM2_SCRATCH {
        report_mark(regs.rax as u8, vcpu);
    }
    if io.is_in {
        regs.rax |= width_mask;
        if io.size == 4 {
            regs.rax &= 0xFFFF_FFFF;
        }
    }
    advance_rip();
    Ok(())
}

/// An S-state for reports: `S3`, or `unknown` for an SLP_TYP no `\_Sx` object names.
struct SleepState(Option<u8>);

impl fmt::Display for SleepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "S{s}"),
            None => f.write_str("unknown"),
        }
    }
}

const COM2_SCRATCH: u16 = crate::arch::serial::COM2_BASE + 7;

/// `ALLY mark`: this vCPU's exits, the APIC and I/O APIC exits, and the DPI heartbeat.
fn report_mark(id: u8, vcpu: &Vcpu) {
    if !log_limit::MARK.admit() {
        return;
    }
    use core::sync::atomic::Ordering::Relaxed;
    info!(
        "ALLY mark id={id} vcpu={} exits={} all-exits={} ept-violations={} apic-mmio-exits={} ioapic-exits={} dpi-heartbeat={}",
        vcpu.apic_id,
        vcpu.exits.total(),
        registered_exits().map(|(_, exits)| exits.total()).sum::<u64>(),
        vcpu.exits.get(ExitReason::EptViolation.basic()),
        apic_guard::apic_mmio_exits(),
        super::ioapic_guard::IOAPIC_EXITS.load(Relaxed),
        (platform().dpi_heartbeat)()
    );
    let mut registers = heapless::String::<512>::new();
    let _ = crate::exit::write_register_counts(&mut registers, apic_guard::exits_by_register());
    info!("ALLY apic-mark id={id} registers={registers}");
    (platform().mark_hook)(id);
}

/// Accesses to memory Ally keeps out of the guest's EPT: reads return all ones (as from a
/// bus with nothing behind it), writes are discarded; each is logged (rate-limited).
struct HiddenMemory;

impl MmioHandler for HiddenMemory {
    fn read(&mut self, _gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        match width.bytes() {
            8 => u64::MAX,
            n => (1u64 << (8 * n as u32)) - 1,
        }
    }
    fn write(&mut self, _gpa: GuestPhysAddr, _width: AccessWidth, _value: u64) {}
}

/// Emulates the access that caused an EPT violation against `handler`; on success the new
/// registers and RIP go back to the guest.
fn emulate_access(
    regs: &mut GuestRegisters,
    gpa: GuestPhysAddr,
    access: AccessKind,
    handler: &mut impl MmioHandler,
) -> Result<crate::guest::EmulatedAccess, crate::guest::EmulationError> {
    let mut cpu = cpu_state(regs);
    let done = emulate_mmio(&mut cpu, gpa, access, &PhysicalMemory, handler)?;
    commit_emulated(regs, &cpu, false);
    Ok(done)
}

/// Writes an emulated stretch's registers, RIP (and RFLAGS when it changed them) back to the
/// guest.
fn commit_emulated(regs: &mut GuestRegisters, cpu: &GuestCpuState, rflags_changed: bool) {
    *regs = cpu.regs;
    vmcs_write(guest::RSP, cpu.regs.rsp);
    vmcs_write(guest::RIP, cpu.rip);
    if rflags_changed {
        vmcs_write(guest::RFLAGS, cpu.rflags);
    }
    // The emulated instruction retired: blocking by STI / MOV SS ends (SDM 26.3.1.5).
    let interruptibility = vmread(guest::INTERRUPTIBILITY_STATE);
    if interruptibility & 3 != 0 {
        vmcs_write(guest::INTERRUPTIBILITY_STATE, interruptibility & !3);
    }
}

/// DR7's L0–L3 and G0–G3 enables (SDM Vol. 3B 18.2.4): with a breakpoint armed, an
/// instruction boundary inside a fused stretch would be observable.
const DR7_BREAKPOINT_ENABLES: u64 = 0xff;

/// A trapped NIC register access; after a write, the driver's flush read that follows within
/// a few instructions is emulated in the same exit ([`emulate_follow_on`]) and counted as
/// fused, not as an exit.
fn emulate_nic_access(
    regs: &mut GuestRegisters,
    gpa: GuestPhysAddr,
    access: AccessKind,
    nic: &nic_guard::NicTrap,
    offset: u64,
) -> Result<(), crate::guest::EmulationError> {
    let mut cpu = cpu_state(regs);
    emulate_mmio(
        &mut cpu,
        gpa,
        access,
        &PhysicalMemory,
        &mut nic_guard::NicMmio::exit(nic, offset),
    )?;
    let mut rflags_changed = false;
    if access == AccessKind::Write && vmread(guest::DR7) & DR7_BREAKPOINT_ENABLES == 0 {
        let before = cpu.rflags;
        let fused = emulate_follow_on(&mut cpu, &PhysicalMemory, |gpa: GuestPhysAddr| {
            nic.trapped_offset(gpa)
                .map(|offset| nic_guard::NicMmio::fused(nic, offset))
        });
        rflags_changed = fused.is_some() && cpu.rflags != before;
    }
    commit_emulated(regs, &cpu, rflags_changed);
    Ok(())
}

fn handle_ept_violation(regs: &mut GuestRegisters, vcpu: &Vcpu) -> ExitResult {
    let gpa = GuestPhysAddr(vmread(ro::GUEST_PHYSICAL_ADDR_FULL));
    // A violation while the CPU delivered an event (IDT-vectoring information valid, SDM
    // 28.2.4) is not an instruction Ally can emulate and skip: report it and stop.
    if vmread(ro::IDT_VECTORING_INFO) & (1 << 31) != 0 {
        return Err(StopReason::GuestRequested(
            "EPT violation during event delivery (the guest's IDT or stack is in memory it cannot reach)",
        ));
    }
    let access = AccessKind::from_ept_violation_qualification(vmread(ro::EXIT_QUALIFICATION))
        .unwrap_or(AccessKind::Read);
    let apic_base = platform().apic_base;
    if gpa.0 & !0xFFF == apic_base {
        let mut apic = apic_guard::XApicMmio {
            apic_base,
            sender: vcpu.apic_id,
        };
        emulate_access(regs, gpa, access, &mut apic).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    if let Some(mut ioapic) = platform()
        .ioapics
        .iter()
        .find(|io| io.base == gpa.0 & !0xFFF)
    {
        emulate_access(regs, gpa, access, &mut ioapic).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    if let Some((nic, offset)) = platform()
        .nic
        .as_ref()
        .and_then(|nic| Some((nic, nic.trapped_offset(gpa)?)))
    {
        emulate_nic_access(regs, gpa, access, nic, offset).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    let result = emulate_access(regs, gpa, access, &mut HiddenMemory);
    match result {
        Ok(done) => {
            if log_limit::EPT_VIOLATION.admit() {
                // What Ally really holds there, to show the guest did not get it.
                // (Ally's region is the first hidden range; the others are device windows.)
                let in_hidden = platform().hidden.first().is_some_and(|h| h.contains(gpa.0));
                let actual = if in_hidden && gpa.0.is_multiple_of(8) {
                    // SAFETY: the address is in Ally's own identity-mapped region, aligned.
                    unsafe { (gpa.0 as *const u64).read_volatile() }
                } else {
                    0
                };
                let (kind, action) = if access == AccessKind::Write {
                    ("write", "discarded")
                } else {
                    ("read", "read-as-ones")
                };
                warn!(
                    "ALLY ept-violation gpa={:#x} access={} width={} value={:#x} actual={:#x} rip={:#x} action={}",
                    gpa.0,
                    kind,
                    done.width.bytes(),
                    done.value,
                    actual,
                    done.old_rip,
                    action
                );
            }
            Ok(())
        }
        Err(e) => {
            warn!(
                "ALLY ept-violation gpa={:#x} access={:?} action=stop",
                gpa.0, access
            );
            Err(StopReason::Emulation(e))
        }
    }
}

fn handle_vmcall(regs: &mut GuestRegisters) -> ExitResult {
    let linear_rip = vmread(guest::CS_BASE).wrapping_add(vmread(guest::RIP));
    let platform = platform();
    if !guest_in_protected_mode() && linear_rip == platform.realmode.int15_vmcall {
        return super::platform::emulate_int15_hook(regs);
    }
    if !guest_in_protected_mode() && linear_rip == platform.realmode.boot_failed_vmcall {
        error!(
            "ALLY fatal reason=guest-boot-failed code={:#x}",
            regs.rax & 0xFFFF
        );
        return Err(StopReason::GuestRequested(
            "the BIOS could not read the first hard disk's MBR",
        ));
    }
    // Anywhere else VMCALL behaves as on a CPU without VMX.
    inject_exception(VECTOR_UD, None);
    Ok(())
}

/// Called by the trampoline when VMRESUME itself fails.
#[no_mangle]
extern "C" fn ally_vmresume_failed(rflags: u64) -> ! {
    error!(
        "ALLY fatal reason=vmresume-failed rflags={:#x} vm_instruction_error={}",
        rflags,
        vmread(ro::VM_INSTRUCTION_ERROR)
    );
    halt_forever()
}
