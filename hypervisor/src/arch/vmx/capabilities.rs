//! What the CPU's VMX implementation offers, and the control values Ally asks of it.
//!
//! SDM Vol. 3D Appendix A: each control MSR reports allowed-0 settings in bits 31:0 (a 1 there
//! means the control must be 1) and allowed-1 settings in bits 63:32 (a 0 there means it must
//! be 0).

use crate::arch::instructions::{rdmsr, read_cr4, write_cr4, wrmsr};
use core::fmt;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};

const IA32_FEATURE_CONTROL: u32 = 0x3A;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// Why Ally cannot use this CPU's VMX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    NoVmx,
    DisabledByFirmware,
    MissingFeature(&'static str),
    VmxonFailed,
    VmcsFailed(&'static str),
    VmwriteFailed(u32),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVmx => write!(f, "this CPU has no VMX (CPUID.1:ECX.VMX[bit 5] is 0)"),
            Self::DisabledByFirmware => write!(
                f,
                "VMX is disabled by the firmware (IA32_FEATURE_CONTROL is locked without VMXON \
                 outside SMX); enable Intel VT-x in the BIOS setup"
            ),
            Self::MissingFeature(what) => {
                write!(f, "this CPU's VMX lacks {what}, which Ally needs")
            }
            Self::VmxonFailed => write!(f, "VMXON failed"),
            Self::VmcsFailed(step) => write!(f, "VMCS setup failed at {step}"),
            Self::VmwriteFailed(field) => write!(f, "VMWRITE of VMCS field {field:#x} failed"),
        }
    }
}

/// The CPU's VMX capabilities and the controls Ally will use.
#[derive(Debug, Clone, Copy)]
pub struct VmxCapabilities {
    pub vmcs_revision: u32,
    pub pinbased: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub ept_vpid_cap: u64,
    /// The VMX-preemption timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC
    /// bits 4:0, SDM Vol. 3D A.6).
    pub preemption_timer_rate: u8,
}

/// `desired` adjusted to what the CPU allows, or the name of a control it cannot set.
fn adjust(
    msr_value: u64,
    desired: u32,
    required: u32,
    names: &[(u32, &'static str)],
) -> Result<u32, VmxError> {
    let must_be_one = msr_value as u32;
    let may_be_one = (msr_value >> 32) as u32;
    let value = (desired | must_be_one) & may_be_one;
    let missing = required & !value;
    if missing != 0 {
        let name = names
            .iter()
            .find(|(bit, _)| missing & bit != 0)
            .map(|(_, n)| *n)
            .unwrap_or("a required VM-execution control");
        return Err(VmxError::MissingFeature(name));
    }
    Ok(value)
}

impl VmxCapabilities {
    /// Checks CPUID and the VMX capability MSRs, and enables VMX in IA32_FEATURE_CONTROL when
    /// the firmware left it unlocked (SDM Vol. 3C 24.7).
    ///
    /// # Safety
    /// Ring 0 on an Intel CPU; changes IA32_FEATURE_CONTROL (locks it).
    pub unsafe fn probe_and_enable() -> Result<Self, VmxError> {
        let cpuid = raw_cpuid::CpuId::new();
        let has_vmx = cpuid.get_feature_info().is_some_and(|f| f.has_vmx());
        if !has_vmx {
            return Err(VmxError::NoVmx);
        }
        // SAFETY: CPUID says VMX exists, so these MSRs exist (SDM Vol. 4 table 2-2).
        unsafe {
            let fc = rdmsr(IA32_FEATURE_CONTROL);
            const LOCK: u64 = 1;
            const VMXON_OUTSIDE_SMX: u64 = 1 << 2;
            if fc & LOCK == 0 {
                wrmsr(IA32_FEATURE_CONTROL, fc | LOCK | VMXON_OUTSIDE_SMX);
            } else if fc & VMXON_OUTSIDE_SMX == 0 {
                return Err(VmxError::DisabledByFirmware);
            }

            let basic = rdmsr(IA32_VMX_BASIC);
            let true_ctls = basic & (1 << 55) != 0;
            let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
                (
                    IA32_VMX_TRUE_PINBASED_CTLS,
                    IA32_VMX_TRUE_PROCBASED_CTLS,
                    IA32_VMX_TRUE_EXIT_CTLS,
                    IA32_VMX_TRUE_ENTRY_CTLS,
                )
            } else {
                (
                    IA32_VMX_PINBASED_CTLS,
                    IA32_VMX_PROCBASED_CTLS,
                    IA32_VMX_EXIT_CTLS,
                    IA32_VMX_ENTRY_CTLS,
                )
            };

            // The VMX-preemption timer where the CPU has it: it bounds how long a vCPU runs
            // without a VM exit, so that an INIT the guest sends it is taken (see
            // `crate::startup`).
            let pinbased = adjust(
                rdmsr(pin_msr),
                PinbasedControls::VMX_PREEMPTION_TIMER.bits(),
                0,
                &[],
            )?;
            let primary_wanted = PrimaryControls::USE_IO_BITMAPS.bits()
                | PrimaryControls::USE_MSR_BITMAPS.bits()
                | PrimaryControls::SECONDARY_CONTROLS.bits();
            let primary = adjust(
                rdmsr(proc_msr),
                primary_wanted,
                primary_wanted,
                &[
                    (PrimaryControls::USE_IO_BITMAPS.bits(), "I/O bitmaps"),
                    (PrimaryControls::USE_MSR_BITMAPS.bits(), "MSR bitmaps"),
                    (
                        PrimaryControls::SECONDARY_CONTROLS.bits(),
                        "secondary processor-based controls",
                    ),
                ],
            )?;
            // Where the CPU offers them, the guest keeps RDTSCP, INVPCID and XSAVES (without
            // these controls they would raise #UD in the guest although CPUID reports them).
            let secondary_required = SecondaryControls::ENABLE_EPT.bits()
                | SecondaryControls::ENABLE_VPID.bits()
                | SecondaryControls::UNRESTRICTED_GUEST.bits();
            let secondary_optional = SecondaryControls::ENABLE_RDTSCP.bits()
                | SecondaryControls::ENABLE_INVPCID.bits()
                | SecondaryControls::ENABLE_XSAVES_XRSTORS.bits();
            let secondary = adjust(
                rdmsr(IA32_VMX_PROCBASED_CTLS2),
                secondary_required | secondary_optional,
                secondary_required,
                &[
                    (
                        SecondaryControls::ENABLE_EPT.bits(),
                        "EPT (extended page tables)",
                    ),
                    (
                        SecondaryControls::UNRESTRICTED_GUEST.bits(),
                        "unrestricted guest",
                    ),
                    (SecondaryControls::ENABLE_VPID.bits(), "VPID"),
                ],
            )?;
            let exit_wanted = ExitControls::HOST_ADDRESS_SPACE_SIZE.bits()
                | ExitControls::SAVE_IA32_EFER.bits()
                | ExitControls::LOAD_IA32_EFER.bits()
                | ExitControls::SAVE_IA32_PAT.bits()
                | ExitControls::LOAD_IA32_PAT.bits();
            let exit = adjust(
                rdmsr(exit_msr),
                exit_wanted,
                exit_wanted,
                &[
                    (ExitControls::HOST_ADDRESS_SPACE_SIZE.bits(), "64-bit host"),
                    (
                        ExitControls::SAVE_IA32_EFER.bits(),
                        "saving IA32_EFER on exit",
                    ),
                    (
                        ExitControls::LOAD_IA32_EFER.bits(),
                        "loading IA32_EFER on exit",
                    ),
                    (
                        ExitControls::SAVE_IA32_PAT.bits(),
                        "saving IA32_PAT on exit",
                    ),
                    (
                        ExitControls::LOAD_IA32_PAT.bits(),
                        "loading IA32_PAT on exit",
                    ),
                ],
            )?;
            let entry_wanted =
                EntryControls::LOAD_IA32_EFER.bits() | EntryControls::LOAD_IA32_PAT.bits();
            let entry = adjust(
                rdmsr(entry_msr),
                entry_wanted,
                entry_wanted,
                &[
                    (
                        EntryControls::LOAD_IA32_EFER.bits(),
                        "loading IA32_EFER on entry",
                    ),
                    (
                        EntryControls::LOAD_IA32_PAT.bits(),
                        "loading IA32_PAT on entry",
                    ),
                ],
            )? & !EntryControls::IA32E_MODE_GUEST.bits();

            let ept_vpid_cap = rdmsr(IA32_VMX_EPT_VPID_CAP);
            const EPT_WALK_LENGTH_4: u64 = 1 << 6;
            const EPT_WB: u64 = 1 << 14;
            const INVEPT: u64 = 1 << 20;
            const INVEPT_ALL: u64 = 1 << 26;
            const INVVPID: u64 = 1 << 32;
            const INVVPID_SINGLE: u64 = 1 << 41;
            for (bit, what) in [
                (EPT_WALK_LENGTH_4, "4-level EPT page walks"),
                (EPT_WB, "write-back EPT paging structures"),
                (INVEPT, "INVEPT"),
                (INVEPT_ALL, "INVEPT all-context"),
                (INVVPID, "INVVPID"),
                (INVVPID_SINGLE, "INVVPID single-context"),
            ] {
                if ept_vpid_cap & bit == 0 {
                    return Err(VmxError::MissingFeature(what));
                }
            }

            Ok(Self {
                vmcs_revision: (basic & 0x7FFF_FFFF) as u32,
                pinbased,
                primary,
                secondary,
                exit,
                entry,
                cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
                cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
                cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
                cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
                ept_vpid_cap,
                preemption_timer_rate: (rdmsr(IA32_VMX_MISC) & 0x1F) as u8,
            })
        }
    }

    /// Sets CR4.VMXE (and CR4.OSXSAVE where XSAVE exists, so that Ally can execute the guest's
    /// XSETBV) and makes CR0/CR4 honour the VMX fixed bits (SDM 24.8).
    ///
    /// # Safety
    /// Ring 0; called once per CPU before VMXON.
    pub unsafe fn prepare_control_registers(&self) {
        let has_xsave = raw_cpuid::CpuId::new()
            .get_feature_info()
            .is_some_and(|f| f.has_xsave());
        let mut cr4 = read_cr4() | (1 << 13);
        if has_xsave {
            cr4 |= 1 << 18;
        }
        cr4 = (cr4 | self.cr4_fixed0) & self.cr4_fixed1;
        // SAFETY: VMXE/OSXSAVE are supported (checked above) and the fixed bits are required.
        unsafe { write_cr4(cr4) };
        let cr0 = (crate::arch::instructions::read_cr0() | self.cr0_fixed0) & self.cr0_fixed1;
        // SAFETY: Ally already runs with PE/PG/NE set; this only adds required bits.
        unsafe { crate::arch::instructions::write_cr0(cr0) };
    }

    /// Whether the VMX-preemption timer is in use.
    pub fn has_preemption_timer(&self) -> bool {
        self.pinbased & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0
    }

    /// Whether a control is in use.
    pub fn has_secondary(&self, control: SecondaryControls) -> bool {
        self.secondary & control.bits() == control.bits()
    }
}
