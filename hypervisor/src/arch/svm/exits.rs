//! The #VMEXIT handler of the SVM backend: decodes the VMCB's exit code and information and
//! hands the access to the vendor-neutral policy (`crate::vcpu::policy`). Like the VMX
//! handler it never resumes a guest after an exit it does not understand.
//!
//! Exits are counted under the SDM's basic exit-reason numbers (CPUID 10, I/O 30, RDMSR 31,
//! WRMSR 32, nested page fault as EPT violation 48, …) so that the power-off report and the
//! runner read alike on both backends.

use super::vcpu::{SvmStart, SvmVcpu};
use super::vmcb::{EventInjection, IoioInfo, NpfInfo, SvmExitCode, EFER_SVME};
use crate::addr::GuestPhysAddr;
use crate::arch::instructions::{self, halt_forever};
use crate::exit::{ExitCounters, ExitReason};
use crate::guest::{AccessKind, GuestCpuState, GuestRegisters, SegmentBases};
use crate::guest_reset;
use crate::platform::{platform, EPT_GENERATION};
use crate::reset::ResetSource;
use crate::startup::PendingReset;
use crate::vcpu::policy::{self, PortIo};
use crate::vcpu::{ExitResult, GuestCpu, StopReason, Vendor, VECTOR_GP, VECTOR_UD};
use core::fmt;
use core::sync::atomic::Ordering;
use log::{error, info};

const IA32_EFER: u32 = 0xC000_0080;

/// How many exits of each vCPU are logged at debug level.
const FIRST_EXITS_LOGGED: u64 = 40;

/// One exit's view of the VMCB, for the vendor-neutral policy.
struct SvmExit<'a> {
    vcpu: &'a mut SvmVcpu,
}

impl GuestCpu for SvmExit<'_> {
    fn apic_id(&self) -> u32 {
        self.vcpu.apic_id
    }
    fn vendor(&self) -> Vendor {
        Vendor::Svm
    }
    fn state(&self, regs: &GuestRegisters) -> GuestCpuState {
        let s = &vmcb_ref(self.vcpu).save;
        GuestCpuState {
            regs: *regs,
            rip: s.rip,
            rflags: s.rflags,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_selector: s.cs.selector,
            cs_base: s.cs.base,
            cs_access_rights: super::vmcb::svm_to_vmx_access_rights(s.cs.attrib),
            ss_access_rights: super::vmcb::svm_to_vmx_access_rights(s.ss.attrib),
            segment_bases: SegmentBases {
                es: s.es.base,
                ss: s.ss.base,
                ds: s.ds.base,
                fs: s.fs.base,
                gs: s.gs.base,
            },
            max_phys_addr_bits: 0,
        }
    }
    fn commit(&mut self, regs: &mut GuestRegisters, cpu: &GuestCpuState, rflags_changed: bool) {
        *regs = cpu.regs;
        let v = self.vcpu.vmcb();
        v.save.rip = cpu.rip;
        if rflags_changed {
            v.save.rflags = cpu.rflags;
        }
        // The emulated instruction retired: the interrupt shadow ends (APM 15.21.5).
        v.control.interrupt_shadow &= !super::vmcb::interrupt_shadow::SHADOW;
    }
    fn skip_instruction(&mut self) {
        let next = self.vcpu.next_rip;
        let v = self.vcpu.vmcb();
        if let Some(next) = next {
            v.save.rip = next;
        }
        v.control.interrupt_shadow &= !super::vmcb::interrupt_shadow::SHADOW;
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let protected = self.in_protected_mode();
        let mut event = EventInjection::exception(vector);
        // Real mode has no error codes.
        if let (Some(code), true) = (error_code, protected) {
            event = event.with_error_code(code);
        }
        self.vcpu.vmcb().control.event_inj = event.0;
    }
    fn in_protected_mode(&self) -> bool {
        vmcb_ref(self.vcpu).save.cr0 & 1 != 0
    }
    fn linear_rip(&self) -> u64 {
        let s = &vmcb_ref(self.vcpu).save;
        s.cs.base.wrapping_add(s.rip)
    }
    fn dr7(&self) -> u64 {
        vmcb_ref(self.vcpu).save.dr7
    }
    fn guest_cr4(&self) -> u64 {
        // SVM owns no CR4 bit: the VMCB holds the guest's own value.
        vmcb_ref(self.vcpu).save.cr4
    }
    fn guest_can_use_xsave(&self) -> bool {
        true
    }
    fn ss_base(&self) -> u64 {
        vmcb_ref(self.vcpu).save.ss.base
    }
    fn es_base(&self) -> u64 {
        vmcb_ref(self.vcpu).save.es.base
    }
    fn rsp(&self) -> u64 {
        vmcb_ref(self.vcpu).save.rsp
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

fn vmcb_ref(vcpu: &SvmVcpu) -> &super::vmcb::Vmcb {
    // SAFETY: see `SvmVcpu::vmcb`; a shared borrow of the vCPU gives a shared view.
    unsafe { &*(vcpu.pages.vmcb as *const super::vmcb::Vmcb) }
}

/// The SDM basic exit-reason number an SVM exit is counted under.
fn counted_as(code: SvmExitCode, exit_info1: u64) -> u32 {
    let reason = match code {
        SvmExitCode::Exception(_) | SvmExitCode::Nmi => ExitReason::ExceptionOrNmi,
        SvmExitCode::Intr => ExitReason::ExternalInterrupt,
        SvmExitCode::Shutdown => ExitReason::TripleFault,
        SvmExitCode::Init => ExitReason::InitSignal,
        SvmExitCode::Cpuid => ExitReason::Cpuid,
        SvmExitCode::Hlt => ExitReason::Hlt,
        SvmExitCode::Invd => ExitReason::Invd,
        SvmExitCode::Vmmcall => ExitReason::Vmcall,
        SvmExitCode::Ioio => ExitReason::IoInstruction,
        SvmExitCode::Msr if exit_info1 & 1 != 0 => ExitReason::Wrmsr,
        SvmExitCode::Msr => ExitReason::Rdmsr,
        SvmExitCode::Npf => ExitReason::EptViolation,
        SvmExitCode::Xsetbv => ExitReason::Xsetbv,
        // VMRUN and the other SVM instructions: counted with VMX's, which Ally hides alike.
        SvmExitCode::Vmrun
        | SvmExitCode::Vmload
        | SvmExitCode::Vmsave
        | SvmExitCode::Stgi
        | SvmExitCode::Clgi
        | SvmExitCode::Skinit => ExitReason::Vmlaunch,
        other => return 0x1_0000 | (other.to_raw() as u32 & 0xFFFF),
    };
    reason.basic()
}

/// Runs the guest on this vCPU for ever: VMRUN, handle the exit, VMRUN again.
pub fn run_loop(vcpu: &mut SvmVcpu) -> ! {
    crate::vcpu::registry::register_exit_counters(vcpu.apic_id, &vcpu.exits);
    loop {
        // After the exit's work: a BAR move it made is flushed before this VMRUN.
        sync_npt(vcpu);
        vcpu.run();
        handle_exit(vcpu);
    }
}

fn handle_exit(vcpu: &mut SvmVcpu) {
    let entered = instructions::rdtsc();
    let (raw_code, info1, info2, int_info, rip, next_rip) = {
        let v = vcpu.vmcb();
        (
            v.control.exit_code,
            v.control.exit_info1,
            v.control.exit_info2,
            v.control.exit_int_info,
            v.save.rip,
            v.control.next_rip,
        )
    };
    // An EXITINTINFO that repeats what Ally injected is QEMU's copy of a delivered event.
    let int_info = if int_info == vcpu.injected {
        0
    } else {
        int_info
    };
    let code = SvmExitCode::from_raw(raw_code);
    let counted = counted_as(code, info1);
    vcpu.exits.record(counted);
    // The first exits of each vCPU, to follow a start-up in the log (debug level only).
    if log::log_enabled!(log::Level::Debug) && vcpu.exits.total() <= FIRST_EXITS_LOGGED {
        let v = vmcb_ref(vcpu);
        log::debug!(
            "vCPU {} exit {} code={raw_code:#x} info1={info1:#x} info2={info2:#x} int_info={int_info:#x} rip={rip:#x} cs={:#x}/{:#x} cr0={:#x} efer={:#x} rflags={:#x}",
            vcpu.apic_id,
            vcpu.exits.total(),
            v.save.cs.selector,
            v.save.cs.attrib,
            v.save.cr0,
            v.save.efer,
            v.save.rflags
        );
    }

    // Where the exiting instruction ends: nRIP when the CPU saves it (APM 15.7.1), else the
    // architectural length of the intercepted instruction.
    vcpu.next_rip = if vcpu.caps.has(super::capabilities::feature::NRIP_SAVE) && next_rip != 0 {
        Some(next_rip)
    } else {
        match code {
            SvmExitCode::Cpuid | SvmExitCode::Msr | SvmExitCode::Invd => Some(rip + 2),
            SvmExitCode::Vmmcall => Some(rip + 3),
            // EXITINFO2 of an IOIO intercept is the next instruction's rIP (APM 15.10.2).
            SvmExitCode::Ioio => Some(info2),
            _ => None,
        }
    };
    // EXITINTINFO (APM 15.7.2) names an event whose delivery the exit interrupted. With
    // Ally's intercepts (no exception or interrupt intercepts) only a nested page fault can
    // interrupt a delivery, and that stops the guest (`dispatch`). Nothing is re-injected:
    // QEMU's TCG also copies every event Ally injected into EXITINTINFO at the next exit,
    // delivered or not, and re-injecting it would deliver it again.

    let mut regs = vcpu.regs;
    let pending_init = vcpu.mailbox.and_then(|m| m.take_init());
    let outcome = if let Some(reset) = pending_init {
        take_pending_init(&mut regs, vcpu, reset)
    } else if let Some(source) = guest_reset::take_deferred(vcpu.apic_id) {
        restart(&mut regs, vcpu, source)
    } else {
        dispatch(&mut regs, vcpu, code, info1, info2, int_info)
    };
    vcpu.regs = regs;
    if let Err(stop) = outcome {
        stop_guest(vcpu, &stop, raw_code);
    }
    vcpu.exits
        .record_cycles(counted, instructions::rdtsc().wrapping_sub(entered));
}

fn dispatch(
    regs: &mut GuestRegisters,
    vcpu: &mut SvmVcpu,
    code: SvmExitCode,
    info1: u64,
    info2: u64,
    int_info: u64,
) -> ExitResult {
    match code {
        SvmExitCode::Cpuid => policy::handle_cpuid(&mut SvmExit { vcpu }, regs),
        SvmExitCode::Msr if regs.rcx as u32 == IA32_EFER => handle_efer(regs, vcpu, info1),
        SvmExitCode::Msr if info1 & 1 != 0 => policy::handle_wrmsr(&mut SvmExit { vcpu }, regs),
        SvmExitCode::Msr => policy::handle_rdmsr(&mut SvmExit { vcpu }, regs),
        SvmExitCode::Ioio => {
            let io = IoioInfo::decode(info1).ok_or(StopReason::GuestRequested(
                "an IOIO exit with no operand size",
            ))?;
            let io = PortIo {
                port: io.port,
                size: io.size,
                is_in: io.input,
                string: io.string,
            };
            policy::handle_port_io(&mut SvmExit { vcpu }, regs, io)
        }
        SvmExitCode::Npf => {
            const VALID: u64 = 1 << 31;
            if int_info & VALID != 0 {
                return Err(StopReason::GuestRequested(
                    "nested page fault during event delivery (the guest's IDT or stack is in memory it cannot reach)",
                ));
            }
            let access = if NpfInfo(info1).write() {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            policy::handle_guest_memory_fault(
                &mut SvmExit { vcpu },
                regs,
                GuestPhysAddr(info2),
                access,
            )
        }
        SvmExitCode::Vmmcall => policy::handle_hypercall(&mut SvmExit { vcpu }, regs),
        // A PC's chipset resets a processor that shuts down.
        SvmExitCode::Shutdown => handle_reset(regs, vcpu, ResetSource::TripleFault),
        SvmExitCode::Hlt => handle_hlt(regs, vcpu),
        SvmExitCode::Invd => {
            // INVD would discard Ally's dirty lines too: write them back instead.
            instructions::wbinvd();
            SvmExit { vcpu }.skip_instruction();
            Ok(())
        }
        // The guest's INITs never reach an OS core (the ICR filter emulates them): a real
        // one came from the platform; the vCPU ignores it (it has nothing of the guest's to
        // reset that the mailbox would not).
        SvmExitCode::Init => Ok(()),
        // The guest tried to use SVM, which Ally hides: #UD as on a CPU without it.
        SvmExitCode::Vmrun
        | SvmExitCode::Vmload
        | SvmExitCode::Vmsave
        | SvmExitCode::Stgi
        | SvmExitCode::Clgi
        | SvmExitCode::Skinit => {
            SvmExit { vcpu }.inject_exception(VECTOR_UD, None);
            Ok(())
        }
        other => Err(StopReason::Unhandled {
            code: other.to_raw(),
            name: "an SVM exit Ally does not expect",
        }),
    }
}

/// HLT, intercepted with several OS cores (`vcpu::intercept_hlt`). With interrupts on, the
/// guest halts in the guest: the HLT runs again with the intercept off until the vCPU's next
/// exit (its interrupt handler's EOI write), where an INIT that came meanwhile is taken.
/// With interrupts off only an INIT (or an NMI, which Ally does not see) ends the halt: the
/// vCPU waits for the INIT here.
fn handle_hlt(regs: &mut GuestRegisters, vcpu: &mut SvmVcpu) -> ExitResult {
    const IF: u64 = 1 << 9;
    if vmcb_ref(vcpu).save.rflags & IF != 0 {
        vcpu.hlt_in_guest = true;
        return Ok(());
    }
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "HLT with interrupts off on a CPU that is no OS core",
    ))?;
    HALTED_WAITS.fetch_add(1, Ordering::Relaxed);
    let reset = loop {
        if let Some(reset) = mailbox.take_init() {
            break reset;
        }
        core::hint::spin_loop();
    };
    take_pending_init(regs, vcpu, reset)
}

/// Halts with interrupts off that Ally waited out for the guest's INIT.
pub static HALTED_WAITS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// EFER lives in the VMCB, where SVME must stay set for VMRUN (APM 15.5.1): the guest reads
/// its EFER without SVME (SVM is hidden, and VM_CR reads as disabled by firmware), and a
/// write is checked as the CPU would check it before it reaches the VMCB.
fn handle_efer(regs: &mut GuestRegisters, vcpu: &mut SvmVcpu, info1: u64) -> ExitResult {
    const LME: u64 = 1 << 8;
    const LMA: u64 = 1 << 10;
    // SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE (APM Vol. 2 3.1.7).
    const DEFINED: u64 = 1 | LME | LMA | (1 << 11) | EFER_SVME | (1 << 13) | (1 << 14) | (1 << 15);
    let current = vcpu.vmcb().save.efer;
    let mut cpu = SvmExit { vcpu };
    if info1 & 1 == 0 {
        let value = current & !EFER_SVME;
        regs.rax = value & 0xFFFF_FFFF;
        regs.rdx = value >> 32;
        cpu.skip_instruction();
        return Ok(());
    }
    let value = (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF);
    let paging = vmcb_ref(cpu.vcpu).save.cr0 & (1 << 31) != 0;
    // Reserved bits, SVME (disabled by firmware, as VM_CR says), or LME changed while paging
    // is on: #GP (APM Vol. 2 3.1.7, 15.4).
    if value & !DEFINED != 0 || value & EFER_SVME != 0 || (paging && (value ^ current) & LME != 0) {
        cpu.inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    }
    // LMA is the CPU's to set; SVME is Ally's.
    cpu.vcpu.vmcb().save.efer = (value & !LMA) | (current & LMA) | EFER_SVME;
    cpu.skip_instruction();
    Ok(())
}

/// Flushes this CPU's guest translations if the nested page table changed since it last
/// did (a BAR move; `crate::platform::EPT_GENERATION`).
fn sync_npt(vcpu: &mut SvmVcpu) {
    let now = EPT_GENERATION.load(Ordering::Acquire);
    if vcpu.npt_generation != now {
        vcpu.npt_generation = now;
        vcpu.vmcb().control.tlb_control = super::vmcb::tlb_control::FLUSH_ALL;
    }
}

/// The guest asked for a platform reset: the boot CPU restarts the guest; another OS core
/// hands the reset to it and waits, as after INIT, for the next boot's SIPI.
fn handle_reset(regs: &mut GuestRegisters, vcpu: &mut SvmVcpu, source: ResetSource) -> ExitResult {
    if vcpu.apic_id == platform().boot_cpu {
        return restart(regs, vcpu, source);
    }
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "a reset request on a CPU that is no OS core",
    ))?;
    let reset = crate::guards::init_sipi::defer_reset(mailbox, source);
    take_pending_init(regs, vcpu, reset)
}

/// The boot CPU resets the guest's platform and restarts in Ally's real-mode boot stub.
fn restart(regs: &mut GuestRegisters, vcpu: &mut SvmVcpu, source: ResetSource) -> ExitResult {
    let rip = vcpu.vmcb().save.rip;
    let restart = guest_reset::reset_platform(vcpu.apic_id, source, rip)?;
    vcpu.reset_guest(SvmStart::Boot {
        segment: platform().realmode.segment,
    });
    *regs = GuestRegisters::default();
    restart.report();
    Ok(())
}

/// Takes an INIT the guest sent this vCPU: waits for the SIPI unless it already came, and
/// restarts the guest.
fn take_pending_init(
    regs: &mut GuestRegisters,
    vcpu: &mut SvmVcpu,
    reset: PendingReset,
) -> ExitResult {
    let mailbox = vcpu.mailbox.ok_or(StopReason::GuestRequested(
        "INIT on a CPU that is no OS core",
    ))?;
    let vector = crate::guards::init_sipi::vector_after_init(vcpu.apic_id, mailbox, reset);
    vcpu.reset_guest(SvmStart::Sipi {
        segment: u16::from(vector) << 8,
    });
    *regs = GuestRegisters::default();
    info!(
        "vCPU {} started by the guest at {:#x}",
        vcpu.apic_id,
        u32::from(vector) << 12
    );
    Ok(())
}

/// Reports why the guest stops, with the exit counts, and halts this CPU.
fn stop_guest(vcpu: &mut SvmVcpu, stop: &dyn fmt::Display, code: u64) -> ! {
    let v = vmcb_ref(vcpu);
    error!(
        "ALLY fatal reason=\"{}\" exit_code={:#x} exit_info1={:#x} exit_info2={:#x} guest_rip={:#x} guest_cs={:#x} guest_cr0={:#x}",
        stop,
        code,
        v.control.exit_info1,
        v.control.exit_info2,
        v.save.rip,
        v.save.cs.selector,
        v.save.cr0,
    );
    crate::vcpu::registry::print_exits(&vcpu.exits);
    halt_forever()
}
