//! The VM-exit handler: one function per exit reason Ally expects. Everything else stops the
//! guest with a report (reason, qualification, guest RIP, VM-instruction error); Ally never
//! silently resumes a guest after an exit it does not understand.

use super::vcpu::{StartState, Vcpu};
use crate::addr::GuestPhysAddr;
use crate::arch::instructions::{self, halt_forever, vmread, vmwrite};
use crate::control_regs::{self, ControlState};
use crate::exit::{CrAccess, CrAccessType, ExitCounters, ExitReason, IoQualification};
use crate::guest::{AccessKind, GuestCpuState, GuestRegisters, SegmentBases};
use crate::guest_reset;
use crate::platform::{platform, PhysicalMemory, EPT_GENERATION};
use crate::reset::ResetSource;
use crate::startup::PendingReset;
use crate::vcpu::policy::{self, PortIo};
use crate::vcpu::{ExitResult, GuestCpu, StopReason, Vendor};
use core::fmt;
use log::{error, info};
use x86::vmx::vmcs::{control, guest, ro};

// VM-entry interruption information (SDM 25.8.3).
const VECTOR_UD: u8 = crate::vcpu::VECTOR_UD;
const VECTOR_GP: u8 = crate::vcpu::VECTOR_GP;
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
fn inject_exception(vector: u8, error_code: Option<u32>) {
    let mut info = u64::from(vector) | HARDWARE_EXCEPTION | VALID;
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

/// One exit's view of the VMCS, for the vendor-neutral policy (`crate::vcpu`).
struct VmxExit<'a> {
    vcpu: &'a mut Vcpu,
}

impl GuestCpu for VmxExit<'_> {
    fn apic_id(&self) -> u32 {
        self.vcpu.apic_id
    }
    fn vendor(&self) -> Vendor {
        Vendor::Vmx
    }
    fn state(&self, regs: &GuestRegisters) -> GuestCpuState {
        cpu_state(regs)
    }
    fn commit(&mut self, regs: &mut GuestRegisters, cpu: &GuestCpuState, rflags_changed: bool) {
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
    fn skip_instruction(&mut self) {
        advance_rip();
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        inject_exception(vector, error_code);
    }
    fn in_protected_mode(&self) -> bool {
        guest_in_protected_mode()
    }
    fn linear_rip(&self) -> u64 {
        vmread(guest::CS_BASE).wrapping_add(vmread(guest::RIP))
    }
    fn dr7(&self) -> u64 {
        vmread(guest::DR7)
    }
    fn guest_cr4(&self) -> u64 {
        guest_cr4()
    }
    fn guest_can_use_xsave(&self) -> bool {
        self.vcpu.guest_can_use_xsave()
    }
    fn ss_base(&self) -> u64 {
        vmread(guest::SS_BASE)
    }
    fn es_base(&self) -> u64 {
        vmread(guest::ES_BASE)
    }
    fn rsp(&self) -> u64 {
        vmread(guest::RSP)
    }
    fn config_address(&mut self) -> &mut u32 {
        &mut self.vcpu.config_address
    }
    fn mtrr(&mut self) -> &mut crate::msr::MtrrShadow {
        &mut self.vcpu.mtrr
    }
    fn exits(&self) -> &ExitCounters {
        &self.vcpu.exits
    }
    fn platform_reset(&mut self, regs: &mut GuestRegisters, source: ResetSource) -> ExitResult {
        handle_reset(regs, self.vcpu, source)
    }
}

/// Invalidates this CPU's EPT-derived translations if the EPT changed since it last did.
fn sync_ept(vcpu: &mut Vcpu) {
    let now = EPT_GENERATION.load(core::sync::atomic::Ordering::Acquire);
    if vcpu.ept_generation != now {
        vcpu.ept_generation = now;
        // SAFETY: EPT support (and INVEPT all-context) was checked at start-up.
        unsafe { crate::arch::instructions::invept_all() };
    }
}

/// An EPT violation: the trapped and hidden pages (`crate::vcpu::policy`).
fn handle_ept_violation(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
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
    policy::handle_guest_memory_fault(&mut VmxExit { vcpu }, regs, gpa, access)
}

/// An I/O instruction exit (SDM 28.2.1 Table 28-5).
fn handle_io(regs: &mut GuestRegisters, vcpu: &mut Vcpu) -> ExitResult {
    let io = IoQualification::decode(vmread(ro::EXIT_QUALIFICATION));
    let io = PortIo {
        port: io.port,
        size: io.size,
        is_in: io.is_in,
        string: io.string,
    };
    policy::handle_port_io(&mut VmxExit { vcpu }, regs, io)
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
    sync_ept(vcpu);
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
        restart(regs, vcpu, source)
    } else if raw_reason & (1 << 31) != 0 {
        Err(StopReason::EntryFailed {
            code: u64::from(basic),
        })
    } else {
        match reason {
            ExitReason::Cpuid => policy::handle_cpuid(&mut VmxExit { vcpu }, regs),
            ExitReason::Rdmsr => policy::handle_rdmsr(&mut VmxExit { vcpu }, regs),
            ExitReason::Wrmsr => policy::handle_wrmsr(&mut VmxExit { vcpu }, regs),
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
            ExitReason::Vmcall => policy::handle_hypercall(&mut VmxExit { vcpu }, regs),
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
            _ => Err(StopReason::Unhandled {
                code: u64::from(basic),
                name: reason.name(),
            }),
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
    crate::vcpu::registry::print_exits(&vcpu.exits);
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
        return restart(regs, vcpu, source);
    }
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "a reset request on a CPU that is no OS core",
    ))?;
    let reset = crate::guards::init_sipi::defer_reset(mailbox, source);
    take_pending_init(regs, vcpu, reset)
}

/// The boot CPU resets the guest's platform (`crate::guest_reset`) and restarts in Ally's
/// real-mode boot stub.
fn restart(regs: &mut GuestRegisters, vcpu: &mut Vcpu, source: ResetSource) -> ExitResult {
    let restart = guest_reset::reset_platform(vcpu.apic_id, source, vmread(guest::RIP))?;
    vcpu.reset_guest(StartState::RealMode {
        segment: platform().realmode.segment,
    })
    .map_err(|_| StopReason::GuestRequested("the boot state could not be written"))?;
    *regs = GuestRegisters::default();
    // Nothing the abandoned exit meant to inject survives the reset.
    vmcs_write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    // SAFETY: VPID single-context INVVPID support was checked at start-up.
    unsafe { instructions::invvpid_single(vcpu.vpid) };
    restart.report();
    Ok(())
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
    let vector = crate::guards::init_sipi::vector_after_init(vcpu.apic_id, mailbox, reset);
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
