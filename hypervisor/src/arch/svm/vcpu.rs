//! One SVM virtual CPU: its VMCB, the host-state pages, the shared permission maps, the
//! initial guest state and the run loop.

use super::capabilities::SvmCapabilities;
use super::launch;
use super::vmcb::{self, intercept, RealModeStart, Vmcb};
use crate::exit::ExitCounters;
use crate::guest::GuestRegisters;
use crate::startup::StartupMailbox;

/// Physical pages a vCPU needs (allocated by the caller from Ally's reserved region, zeroed,
/// identity-mapped).
#[derive(Debug, Clone, Copy)]
pub struct SvmPages {
    /// The guest's VMCB.
    pub vmcb: u64,
    /// VM_HSAVE_PA: where VMRUN keeps the host state it restores at #VMEXIT (APM 15.30.4).
    pub host_save: u64,
    /// The host's FS/GS/TR/LDTR and syscall MSRs, which VMRUN does not save: VMSAVE'd before
    /// and VMLOAD'ed after each VMRUN (APM 15.5.2).
    pub host_vmcb: u64,
    /// I/O permission map, 12 KiB contiguous (APM 15.10.1), shared by every vCPU.
    pub iopm: u64,
    /// MSR permission map, 8 KiB contiguous (APM 15.11), shared by every vCPU.
    pub msrpm: u64,
}

/// How the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub enum SvmStart {
    /// The boot CPU entering Ally's real-mode boot stub.
    Boot { segment: u16 },
    /// Started by the guest's (emulated) SIPI at `segment:0`.
    Sipi { segment: u16 },
}

/// The address-space ID every vCPU runs the guest under: one guest, one nested page table,
/// so one ASID (Ally itself runs with ASID 0, APM 15.16).
pub const GUEST_ASID: u32 = 1;

/// Per-CPU SVM state. Lives in Ally's memory for as long as the CPU runs.
pub struct SvmVcpu {
    pub apic_id: u32,
    pub caps: SvmCapabilities,
    pub pages: SvmPages,
    pub n_cr3: u64,
    pub exits: ExitCounters,
    /// This OS core's INIT/SIPI mailbox (`crate::guards::init_sipi`), checked at every exit.
    pub mailbox: Option<&'static StartupMailbox>,
    /// The nested page table's generation this CPU last flushed for
    /// (`crate::platform::EPT_GENERATION`).
    pub npt_generation: u64,
    /// The guest's view of the MTRRs.
    pub mtrr: crate::msr::MtrrShadow,
    /// The CONFIG_ADDRESS this vCPU's guest wrote (`crate::pci::latch`).
    pub config_address: u32,
    /// The guest's general-purpose registers between two VMRUNs (RAX and RSP live in the
    /// VMCB and are copied here for the exit handler).
    pub regs: GuestRegisters,
    /// Where the exiting instruction ends, when the exit tells (nRIP save, or an IOIO exit's
    /// EXITINFO2), else the length the handler knows for the instruction.
    pub next_rip: Option<u64>,
    /// The event Ally injected at the last VMRUN (EVENTINJ), 0 for none: QEMU's TCG reports
    /// it again in EXITINTINFO at the next exit even when it was delivered.
    pub injected: u64,
    /// Whether a guest HLT with interrupts on may halt in the guest until its next exit
    /// (`exits::handle_hlt`): the HLT intercept is off for the next VMRUN.
    pub hlt_in_guest: bool,
}

/// Whether the vCPUs intercept HLT: with several OS cores, an INIT the guest sends a core
/// halted with interrupts off (Linux's CPU hotplug, its reboot) must find it in Ally; SVM
/// has no preemption timer to bring it out. With one OS core nothing sends it an INIT.
pub fn intercept_hlt() -> bool {
    crate::platform::platform().os_cores.len() > 1
}

impl SvmVcpu {
    pub fn new(apic_id: u32, caps: SvmCapabilities, pages: SvmPages, n_cr3: u64) -> Self {
        Self {
            apic_id,
            caps,
            pages,
            n_cr3,
            exits: ExitCounters::new(),
            mailbox: crate::guards::init_sipi::os_index(apic_id)
                .map(crate::guards::init_sipi::mailbox),
            npt_generation: 0,
            // SAFETY: every CPU with SVM has MTRRs; `capture` reads only those IA32_MTRRCAP
            // lists, which the firmware set alike on every CPU.
            mtrr: crate::msr::MtrrShadow::capture(|m| unsafe {
                crate::arch::instructions::rdmsr(m)
            }),
            config_address: 0,
            regs: GuestRegisters::default(),
            next_rip: None,
            injected: 0,
            hlt_in_guest: false,
        }
    }

    /// The guest's VMCB.
    pub fn vmcb(&mut self) -> &mut Vmcb {
        // SAFETY: the page is this vCPU's, identity-mapped, 4 KiB-aligned and used by this
        // CPU alone (the hardware touches it only inside VMRUN, which this CPU executes).
        unsafe { &mut *(self.pages.vmcb as *mut Vmcb) }
    }

    /// Fills the VMCB: intercepts, permission maps, nested paging, the initial guest state.
    pub fn configure(&mut self, start: SvmStart) {
        let (iopm, msrpm, n_cr3) = (self.pages.iopm, self.pages.msrpm, self.n_cr3);
        let v = self.vmcb();
        *v = Vmcb::zeroed();
        let c = &mut v.control;
        // What must not reach the hardware or must be filtered (the guards), what would
        // reveal or use SVM (hidden: #UD as on a CPU without it), and the events that would
        // otherwise act on the real CPU: INIT resets it, SHUTDOWN stops it (APM 15.13).
        c.intercept_misc1 = intercept::misc1::CPUID
            | intercept::misc1::INIT
            | intercept::misc1::IOIO_PROT
            | intercept::misc1::MSR_PROT
            | intercept::misc1::SHUTDOWN
            | intercept::misc1::INVD;
        // VMRUN must be intercepted (APM 15.5.1 consistency checks).
        c.intercept_misc2 = intercept::misc2::VMRUN
            | intercept::misc2::VMMCALL
            | intercept::misc2::VMLOAD
            | intercept::misc2::VMSAVE
            | intercept::misc2::STGI
            | intercept::misc2::CLGI
            | intercept::misc2::SKINIT;
        c.iopm_base_pa = iopm;
        c.msrpm_base_pa = msrpm;
        c.guest_asid = GUEST_ASID;
        c.tlb_control = vmcb::tlb_control::FLUSH_ALL;
        c.np_enable = vmcb::NP_ENABLE;
        c.n_cr3 = n_cr3;
        self.reset_guest(start);
    }

    /// The architectural state after INIT (or the BIOS's hand-over) at `segment:0`.
    pub fn reset_guest(&mut self, start: SvmStart) {
        let (segment, kind) = match start {
            SvmStart::Boot { segment } => (segment, RealModeStart::Boot),
            SvmStart::Sipi { segment } => (segment, RealModeStart::AfterInit),
        };
        let v = self.vmcb();
        v.save.real_mode_reset(segment, kind);
        v.control.event_inj = 0;
        v.control.interrupt_shadow = 0;
        // The hidden and guarded pages may have changed: flush this ASID's translations.
        v.control.tlb_control = vmcb::tlb_control::FLUSH_ALL;
        self.regs = GuestRegisters::default();
    }

    /// Runs the guest until it exits; returns with `regs` holding its registers (RAX and RSP
    /// copied from the VMCB).
    pub fn run(&mut self) {
        let rax = self.regs.rax;
        let rsp = self.regs.rsp;
        {
            let v = self.vmcb();
            v.save.rax = rax;
            v.save.rsp = rsp;
            // EFER.SVME is Ally's (the guest reads EFER without it, `exits::handle_efer`), and
            // VMRUN refuses a guest state without it (APM 15.5.1). The guest's own SMM can
            // clear it behind Ally's back: an SMI taken in the guest (QEMU's q35 firmware
            // uses SMM to enter 32-bit mode) loads EFER = 0 and RSM restores what the SMM
            // handler saved.
            v.save.efer |= vmcb::EFER_SVME;
        }
        self.injected = self.vmcb().control.event_inj;
        let hlt_in_guest = core::mem::take(&mut self.hlt_in_guest);
        {
            let c = &mut self.vmcb().control;
            if intercept_hlt() && !hlt_in_guest {
                c.intercept_misc1 |= intercept::misc1::HLT;
            } else {
                c.intercept_misc1 &= !intercept::misc1::HLT;
            }
        }
        let (vmcb_pa, host_pa) = (self.pages.vmcb, self.pages.host_vmcb);
        // SAFETY: the VMCB is complete (configure), the host-save area was registered in
        // VM_HSAVE_PA and EFER.SVME is set on this CPU (`SvmCapabilities::enable`).
        unsafe { launch::run_guest(vmcb_pa, host_pa, &mut self.regs) };
        let (rax, rsp) = {
            let v = self.vmcb();
            let state = (v.save.rax, v.save.rsp);
            // One-shot controls: a flush asked for is done; an injected event was delivered
            // or, interrupted by this exit, is in EXITINTINFO (the dispatcher re-injects it).
            v.control.tlb_control = vmcb::tlb_control::DO_NOTHING;
            v.control.event_inj = 0;
            state
        };
        self.regs.rax = rax;
        self.regs.rsp = rsp;
    }
}
