//! One virtual CPU: its VMXON region, VMCS, bitmaps and the initial guest state.

use super::capabilities::{VmxCapabilities, VmxError};
use crate::arch::descriptors::{CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::arch::instructions::{self, rdmsr, vmwrite};
use crate::exit::ExitCounters;
use crate::startup::StartupMailbox;
use x86::vmx::vmcs::{control, guest, host};

const IA32_EFER: u32 = 0xC000_0080;
const IA32_PAT: u32 = 0x277;
/// The power-on value of IA32_PAT (SDM Vol. 3A 13.12.4).
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;

/// Physical pages a vCPU needs (allocated by the caller from Ally's reserved region).
#[derive(Debug, Clone, Copy)]
pub struct VcpuPages {
    pub vmxon: u64,
    pub vmcs: u64,
    /// 4 KiB MSR bitmap (SDM 25.6.9).
    pub msr_bitmap: u64,
    /// I/O bitmaps A (ports 0-0x7FFF) and B (0x8000-0xFFFF), 4 KiB each (SDM 25.6.4).
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
}

/// How the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub enum StartState {
    /// Real mode at `segment:0` (the boot CPU, entering Ally's real-mode boot stub).
    RealMode { segment: u16 },
    /// Started by the guest's SIPI (emulated, `init_sipi`): real mode at `segment:0`, caches
    /// still off from INIT.
    Sipi { segment: u16 },
}

/// Per-CPU virtualization state. Lives in Ally's memory for as long as the CPU runs.
pub struct Vcpu {
    pub apic_id: u32,
    pub vpid: u16,
    pub caps: VmxCapabilities,
    pub pages: VcpuPages,
    /// CR0/CR4 bits owned by Ally (guest writes that change them exit; SDM 25.6.6).
    pub cr0_mask: u64,
    pub cr4_mask: u64,
    pub exits: ExitCounters,
    /// The guest has been stopped after an exit Ally could not handle.
    pub stopped: bool,
    /// This OS core's INIT/SIPI mailbox (`init_sipi`), checked at every VM exit.
    pub mailbox: Option<&'static StartupMailbox>,
    /// The shared EPT's generation this CPU last invalidated for (`platform::EPT_GENERATION`).
    pub ept_generation: u64,
    /// The guest's view of the MTRRs (`crate::msr::MtrrShadow`).
    pub mtrr: crate::msr::MtrrShadow,
    /// The CONFIG_ADDRESS this vCPU's guest wrote (`crate::pci::latch`).
    pub config_address: u32,
}

/// Segment access rights in VMCS format (SDM Vol. 3C 25.4.1, Table 25-2).
mod access_rights {
    pub const REAL_MODE_CODE: u64 = 0x9B; // present, code, exec/read, accessed
    pub const REAL_MODE_DATA: u64 = 0x93; // present, data, read/write, accessed
    pub const TSS_BUSY_32: u64 = 0x8B;
    pub const UNUSABLE: u64 = 1 << 16;
}

fn write(field: u32, value: u64) -> Result<(), VmxError> {
    // SAFETY: called only while this vCPU's VMCS is current (from `Vcpu::activate`), and the
    // values written are the architectural initial state built below.
    unsafe { vmwrite(field, value) }.map_err(VmxError::VmwriteFailed)
}

impl Vcpu {
    pub fn new(apic_id: u32, vpid: u16, caps: VmxCapabilities, pages: VcpuPages) -> Self {
        const CR0_PE: u64 = 1;
        const CR0_PG: u64 = 1 << 31;
        // Unrestricted guest lets the guest clear PE and PG (SDM 26.3.1.1); every other fixed
        // bit is Ally's, and the guest sees its own value through the read shadow.
        let cr0_mask = ((caps.cr0_fixed0 | !caps.cr0_fixed1) & !(CR0_PE | CR0_PG)) & 0xFFFF_FFFF;
        let cr4_mask = caps.cr4_fixed0 | !caps.cr4_fixed1;
        Self {
            apic_id,
            vpid,
            caps,
            pages,
            cr0_mask,
            cr4_mask,
            exits: ExitCounters::new(),
            stopped: false,
            mailbox: crate::guards::init_sipi::os_index(apic_id)
                .map(crate::guards::init_sipi::mailbox),
            ept_generation: 0,
            // SAFETY: every CPU with VMX has MTRRs (CPUID.1:EDX.MTRR), and `capture` reads
            // only those IA32_MTRRCAP lists; the firmware set them alike on every CPU.
            mtrr: crate::msr::MtrrShadow::capture(|m| unsafe { rdmsr(m) }),
            config_address: 0,
        }
    }

    /// Whether VMX lets the guest set CR4.OSXSAVE (SDM Vol. 3D A.8: a 0 in
    /// IA32_VMX_CR4_FIXED1 means the bit must stay 0 in VMX operation).
    pub fn guest_can_use_xsave(&self) -> bool {
        self.caps.cr4_fixed1 & (1 << 18) != 0
    }

    /// VMXON on this CPU, then VMCLEAR + VMPTRLD of this vCPU's VMCS.
    ///
    /// # Safety
    /// Runs on the CPU this vCPU belongs to, once; the pages are zeroed, 4 KiB-aligned and
    /// mapped at their physical addresses (Ally's identity map).
    pub unsafe fn activate(&self) -> Result<(), VmxError> {
        let revision = self.caps.vmcs_revision;
        // SAFETY: the caller guarantees the pages are ours and identity-mapped; the first
        // dword of the VMXON region and VMCS must hold the revision identifier (SDM 25.2, 25.11.5).
        unsafe {
            (self.pages.vmxon as *mut u32).write_volatile(revision);
            (self.pages.vmcs as *mut u32).write_volatile(revision);
            self.caps.prepare_control_registers();
            instructions::vmxon(self.pages.vmxon).map_err(|_| VmxError::VmxonFailed)?;
            instructions::vmclear(self.pages.vmcs).map_err(|_| VmxError::VmcsFailed("VMCLEAR"))?;
            instructions::vmptrld(self.pages.vmcs).map_err(|_| VmxError::VmcsFailed("VMPTRLD"))?;
        }
        Ok(())
    }

    /// Fills the current VMCS: controls, host state and the initial guest state.
    pub fn configure(
        &self,
        eptp: u64,
        start: StartState,
        exit_stack_top: u64,
        tss_base: u64,
        host_rip: u64,
    ) -> Result<(), VmxError> {
        let caps = &self.caps;
        // Controls (SDM 25.6).
        write(control::PINBASED_EXEC_CONTROLS, u64::from(caps.pinbased))?;
        write(
            control::PRIMARY_PROCBASED_EXEC_CONTROLS,
            u64::from(caps.primary),
        )?;
        write(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(caps.secondary),
        )?;
        write(control::VMEXIT_CONTROLS, u64::from(caps.exit))?;
        write(control::VMENTRY_CONTROLS, u64::from(caps.entry))?;
        write(control::EXCEPTION_BITMAP, 0)?;
        write(control::CR3_TARGET_COUNT, 0)?;
        write(control::MSR_BITMAPS_ADDR_FULL, self.pages.msr_bitmap)?;
        write(control::IO_BITMAP_A_ADDR_FULL, self.pages.io_bitmap_a)?;
        write(control::IO_BITMAP_B_ADDR_FULL, self.pages.io_bitmap_b)?;
        write(control::EPTP_FULL, eptp)?;
        write(control::VPID, u64::from(self.vpid))?;
        write(control::CR0_GUEST_HOST_MASK, self.cr0_mask)?;
        write(control::CR4_GUEST_HOST_MASK, self.cr4_mask)?;
        write(control::VMEXIT_MSR_STORE_COUNT, 0)?;
        write(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
        write(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
        write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0)?;
        if caps.has_preemption_timer() {
            // Reloaded at every VM entry ("save timer value" is off): a vCPU leaves the guest
            // at least every 2^24 TSC ticks (a few ms), also from HLT or MWAIT, and sees an
            // INIT the guest sent it (`exits::take_pending_init`).
            const PREEMPTION_PERIOD_TSC_LOG2: u8 = 24;
            let ticks =
                1u64 << PREEMPTION_PERIOD_TSC_LOG2.saturating_sub(caps.preemption_timer_rate);
            write(guest::VMX_PREEMPTION_TIMER_VALUE, ticks)?;
        }

        // Host state (SDM 25.5, checked per 27.2.2-27.2.4).
        let dt = instructions::sgdt();
        let idt = instructions::sidt();
        write(host::CR0, instructions::read_cr0())?;
        write(host::CR3, instructions::read_cr3())?;
        write(host::CR4, instructions::read_cr4())?;
        write(host::CS_SELECTOR, u64::from(CODE_SELECTOR))?;
        for field in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
            write(field, u64::from(DATA_SELECTOR))?;
        }
        write(host::FS_SELECTOR, 0)?;
        write(host::GS_SELECTOR, 0)?;
        write(host::TR_SELECTOR, u64::from(TSS_SELECTOR))?;
        write(host::FS_BASE, 0)?;
        write(host::GS_BASE, 0)?;
        write(host::TR_BASE, tss_base)?;
        write(host::GDTR_BASE, dt.base)?;
        write(host::IDTR_BASE, idt.base)?;
        write(host::IA32_SYSENTER_CS, 0)?;
        write(host::IA32_SYSENTER_ESP, 0)?;
        write(host::IA32_SYSENTER_EIP, 0)?;
        // SAFETY: EFER and PAT exist on every CPU with VMX.
        let (efer, pat) = unsafe { (rdmsr(IA32_EFER), rdmsr(IA32_PAT)) };
        write(host::IA32_EFER_FULL, efer)?;
        write(host::IA32_PAT_FULL, pat)?;
        write(host::RSP, exit_stack_top)?;
        write(host::RIP, host_rip)?;

        crate::vcpu::registry::register_exit_counters(self.apic_id, &self.exits);
        self.reset_guest(start)
    }

    /// Writes the architectural state after INIT (SDM Vol. 3A 10.1.1, Table 10-1) into the
    /// guest-state area: real mode at `segment:0`.
    pub fn reset_guest(&self, start: StartState) -> Result<(), VmxError> {
        let caps = &self.caps;
        // Guest state (SDM 25.4, checked per 27.3.1).
        // After INIT the caches are off (CD, NW); the boot CPU instead continues the BIOS's
        // state with caches on, as a real BIOS hands over to the MBR.
        let cr0_guest_view: u64 = match start {
            StartState::RealMode { .. } => 0x10,
            StartState::Sipi { .. } => 0x6000_0010,
        };
        let cr0 = (cr0_guest_view | caps.cr0_fixed0) & caps.cr0_fixed1 & !(1 | (1 << 31));
        let cr0 = cr0 | (cr0_guest_view & 1);
        write(guest::CR0, cr0)?;
        write(control::CR0_READ_SHADOW, cr0_guest_view)?;
        write(guest::CR3, 0)?;
        write(guest::CR4, caps.cr4_fixed0 & caps.cr4_fixed1)?;
        write(control::CR4_READ_SHADOW, 0)?;
        write(guest::DR7, 0x400)?;
        write(guest::RFLAGS, 0x2)?;
        write(guest::RSP, 0)?;
        write(guest::IA32_EFER_FULL, 0)?;
        const IA32E_MODE_GUEST: u64 = 1 << 9;
        write(
            control::VMENTRY_CONTROLS,
            u64::from(caps.entry) & !IA32E_MODE_GUEST,
        )?;
        write(guest::IA32_PAT_FULL, PAT_POWER_ON)?;
        write(guest::IA32_DEBUGCTL_FULL, 0)?;
        write(guest::IA32_SYSENTER_CS, 0)?;
        write(guest::IA32_SYSENTER_ESP, 0)?;
        write(guest::IA32_SYSENTER_EIP, 0)?;
        write(guest::LINK_PTR_FULL, u64::MAX)?;
        write(guest::INTERRUPTIBILITY_STATE, 0)?;
        write(guest::PENDING_DBG_EXCEPTIONS, 0)?;

        let (StartState::RealMode {
            segment: cs_selector,
        }
        | StartState::Sipi {
            segment: cs_selector,
        }) = start;
        write(guest::RIP, 0)?;
        // Active: a vCPU never enters the guest in wait-for-SIPI (see `crate::startup`).
        write(guest::ACTIVITY_STATE, 0)?;
        write(guest::CS_SELECTOR, u64::from(cs_selector))?;
        write(guest::CS_BASE, u64::from(cs_selector) << 4)?;
        write(guest::CS_LIMIT, 0xFFFF)?;
        write(guest::CS_ACCESS_RIGHTS, access_rights::REAL_MODE_CODE)?;
        for (sel, base, limit, ar) in [
            (
                guest::DS_SELECTOR,
                guest::DS_BASE,
                guest::DS_LIMIT,
                guest::DS_ACCESS_RIGHTS,
            ),
            (
                guest::ES_SELECTOR,
                guest::ES_BASE,
                guest::ES_LIMIT,
                guest::ES_ACCESS_RIGHTS,
            ),
            (
                guest::FS_SELECTOR,
                guest::FS_BASE,
                guest::FS_LIMIT,
                guest::FS_ACCESS_RIGHTS,
            ),
            (
                guest::GS_SELECTOR,
                guest::GS_BASE,
                guest::GS_LIMIT,
                guest::GS_ACCESS_RIGHTS,
            ),
            (
                guest::SS_SELECTOR,
                guest::SS_BASE,
                guest::SS_LIMIT,
                guest::SS_ACCESS_RIGHTS,
            ),
        ] {
            write(sel, 0)?;
            write(base, 0)?;
            write(limit, 0xFFFF)?;
            write(ar, access_rights::REAL_MODE_DATA)?;
        }
        write(guest::LDTR_SELECTOR, 0)?;
        write(guest::LDTR_BASE, 0)?;
        write(guest::LDTR_LIMIT, 0xFFFF)?;
        write(guest::LDTR_ACCESS_RIGHTS, access_rights::UNUSABLE)?;
        write(guest::TR_SELECTOR, 0)?;
        write(guest::TR_BASE, 0)?;
        write(guest::TR_LIMIT, 0xFFFF)?;
        write(guest::TR_ACCESS_RIGHTS, access_rights::TSS_BUSY_32)?;
        write(guest::GDTR_BASE, 0)?;
        write(guest::GDTR_LIMIT, 0xFFFF)?;
        write(guest::IDTR_BASE, 0)?;
        write(guest::IDTR_LIMIT, 0x3FF)?;
        Ok(())
    }
}

/// Sets the bits that make the CPU exit on accesses to `ports` (SDM 25.6.4).
pub fn intercept_ports(
    bitmap_a: &mut [u8; 4096],
    bitmap_b: &mut [u8; 4096],
    ports: core::ops::Range<u32>,
) {
    for port in ports {
        let (bitmap, index) = if port < 0x8000 {
            (&mut *bitmap_a, port as usize)
        } else {
            (&mut *bitmap_b, (port - 0x8000) as usize)
        };
        if let Some(byte) = bitmap.get_mut(index / 8) {
            *byte |= 1 << (index % 8);
        }
    }
}
