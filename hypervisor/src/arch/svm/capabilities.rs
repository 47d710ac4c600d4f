//! What the CPU's SVM implementation offers (APM Vol. 2 15.4 "Enabling SVM", CPUID Fn8000_000A
//! in APM Vol. 3 Appendix E), and turning SVM on.

use super::vmcb::EFER_SVME;
use crate::arch::instructions::{rdmsr, wrmsr};
use core::fmt;

/// EFER.
pub const MSR_EFER: u32 = 0xC000_0080;
/// VM_CR (APM 15.30.1): bit 3 LOCK, bit 4 SVMDIS.
pub const MSR_VM_CR: u32 = 0xC001_0114;
/// VM_HSAVE_PA (APM 15.30.4): the physical page where VMRUN saves host state.
pub const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;

/// VM_CR.LOCK: SVMDIS can no longer be changed (without the SVM key).
pub const VM_CR_LOCK: u64 = 1 << 3;
/// VM_CR.SVMDIS: EFER.SVME cannot be set.
pub const VM_CR_SVMDIS: u64 = 1 << 4;

/// CPUID Fn8000_000A EDX feature bits.
pub mod feature {
    pub const NESTED_PAGING: u32 = 1 << 0;
    pub const LBR_VIRTUALIZATION: u32 = 1 << 1;
    /// SVM lock (VM_CR.LOCK with a key).
    pub const SVM_LOCK: u32 = 1 << 2;
    /// Next-RIP save on #VMEXIT (VMCB 0x0C8).
    pub const NRIP_SAVE: u32 = 1 << 3;
    pub const TSC_RATE_MSR: u32 = 1 << 4;
    pub const VMCB_CLEAN: u32 = 1 << 5;
    /// TLB_CONTROL values 3 and 7.
    pub const FLUSH_BY_ASID: u32 = 1 << 6;
    pub const DECODE_ASSISTS: u32 = 1 << 7;
    pub const PAUSE_FILTER: u32 = 1 << 10;
    pub const AVIC: u32 = 1 << 13;
    pub const V_VMSAVE_VMLOAD: u32 = 1 << 15;
    pub const VGIF: u32 = 1 << 16;
}

/// The CPUID values [`judge`] needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCpuid {
    /// CPUID Fn8000_0000 EAX: the highest extended leaf.
    pub max_extended_leaf: u32,
    /// CPUID Fn8000_0001 ECX (bit 2: SVM).
    pub ext_features_ecx: u32,
    /// CPUID Fn8000_000A EAX, EBX, EDX (meaningful only when the leaf exists).
    pub svm_eax: u32,
    pub svm_ebx: u32,
    pub svm_edx: u32,
}

impl SvmCpuid {
    /// Reads the leaves on this CPU.
    pub fn read() -> Self {
        let max_extended_leaf = raw_cpuid::cpuid!(0x8000_0000).eax;
        let ext_features_ecx = if max_extended_leaf >= 0x8000_0001 {
            raw_cpuid::cpuid!(0x8000_0001).ecx
        } else {
            0
        };
        let svm = if max_extended_leaf >= 0x8000_000A {
            raw_cpuid::cpuid!(0x8000_000A)
        } else {
            raw_cpuid::CpuIdResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        };
        Self {
            max_extended_leaf,
            ext_features_ecx,
            svm_eax: svm.eax,
            svm_ebx: svm.ebx,
            svm_edx: svm.edx,
        }
    }
}

/// Why Ally cannot use this CPU's SVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID Fn8000_0001 ECX[2] is clear (or the leaf is missing).
    NoSvm,
    /// VM_CR.SVMDIS is set: the firmware turned SVM off (`locked`: VM_CR.LOCK too).
    DisabledByFirmware { locked: bool },
    /// A feature Ally needs is missing.
    MissingFeature(&'static str),
}

impl fmt::Display for SvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSvm => f.write_str(
                "this CPU has no AMD SVM (AMD-V): CPUID Fn8000_0001 ECX.SVM[bit 2] is 0 \
                 (under another hypervisor, enable nested virtualization)",
            ),
            Self::DisabledByFirmware { locked: true } => f.write_str(
                "SVM is disabled by the firmware (VM_CR.SVMDIS is set and locked); enable \
                 \"SVM Mode\" / AMD-V in the BIOS setup",
            ),
            Self::DisabledByFirmware { locked: false } => f.write_str(
                "SVM is disabled by the firmware (VM_CR.SVMDIS is set); enable \"SVM Mode\" / \
                 AMD-V in the BIOS setup",
            ),
            Self::MissingFeature(what) => {
                write!(f, "this CPU's SVM lacks {what}, which Ally needs")
            }
        }
    }
}

/// The CPU's SVM capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCapabilities {
    /// SVM revision (CPUID Fn8000_000A EAX[7:0]).
    pub revision: u8,
    /// Number of ASIDs (CPUID Fn8000_000A EBX); ASID 0 is the host's.
    pub asids: u32,
    /// CPUID Fn8000_000A EDX ([`feature`]).
    pub features: u32,
}

impl SvmCapabilities {
    /// Whether the CPU has `feature` (a [`feature`] bit).
    pub const fn has(&self, feature: u32) -> bool {
        self.features & feature == feature
    }

    /// Reads CPUID and VM_CR on this CPU and judges them.
    pub fn detect() -> Result<Self, SvmError> {
        let cpuid = SvmCpuid::read();
        if !has_svm(&cpuid) {
            return Err(SvmError::NoSvm);
        }
        // SAFETY: VM_CR exists on every CPU that reports SVM (APM 15.30.1); Ally runs at CPL 0.
        let vm_cr = unsafe { rdmsr(MSR_VM_CR) };
        judge(&cpuid, vm_cr)
    }

    /// Sets EFER.SVME (APM 15.4) and points VM_HSAVE_PA at `host_save_pa` (APM 15.30.4).
    ///
    /// # Safety
    /// At CPL 0 on a CPU [`SvmCapabilities::detect`] accepted; `host_save_pa` is a 4 KiB-aligned
    /// physical page Ally owns for as long as SVM is on, used for nothing else (the CPU writes
    /// host state there at every VMRUN and reads it at every #VMEXIT).
    pub unsafe fn enable(&self, host_save_pa: u64) {
        assert!(
            host_save_pa.is_multiple_of(4096),
            "VM_HSAVE_PA must be 4 KiB-aligned"
        );
        // SAFETY: guaranteed by the caller: EFER and VM_HSAVE_PA exist with SVM, SVMDIS is
        // clear (so setting SVME does not #GP), and the page is Ally's.
        unsafe {
            wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
            wrmsr(MSR_VM_HSAVE_PA, host_save_pa);
        }
    }
}

fn has_svm(cpuid: &SvmCpuid) -> bool {
    cpuid.max_extended_leaf >= 0x8000_0001 && cpuid.ext_features_ecx & (1 << 2) != 0
}

/// Decides from the CPUID values and VM_CR whether Ally can use SVM: SVM present, not
/// disabled by the firmware (APM 15.4: with VM_CR.SVMDIS set EFER.SVME cannot be set), nested
/// paging (Ally gives the guest real physical memory through NPT) and at least one guest ASID.
pub fn judge(cpuid: &SvmCpuid, vm_cr: u64) -> Result<SvmCapabilities, SvmError> {
    if !has_svm(cpuid) {
        return Err(SvmError::NoSvm);
    }
    if vm_cr & VM_CR_SVMDIS != 0 {
        return Err(SvmError::DisabledByFirmware {
            locked: vm_cr & VM_CR_LOCK != 0,
        });
    }
    if cpuid.max_extended_leaf < 0x8000_000A {
        return Err(SvmError::MissingFeature(
            "the SVM feature leaf (CPUID Fn8000_000A)",
        ));
    }
    let caps = SvmCapabilities {
        revision: cpuid.svm_eax as u8,
        asids: cpuid.svm_ebx,
        features: cpuid.svm_edx,
    };
    if !caps.has(feature::NESTED_PAGING) {
        return Err(SvmError::MissingFeature(
            "nested paging (NPT, CPUID Fn8000_000A EDX[0])",
        ));
    }
    if caps.asids < 2 {
        return Err(SvmError::MissingFeature(
            "a guest ASID (CPUID Fn8000_000A EBX < 2)",
        ));
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Zen-like CPU: revision 1, 32768 ASIDs, NP, LbrVirt, SVML, NRIPS, TscRate,
    /// VmcbClean, FlushByAsid, DecodeAssists, PauseFilter, AVIC, vVMSAVE, vGIF.
    fn zen() -> SvmCpuid {
        SvmCpuid {
            max_extended_leaf: 0x8000_0020,
            ext_features_ecx: 1 << 2,
            svm_eax: 1,
            svm_ebx: 0x8000,
            svm_edx: 0x0001_A4FF,
        }
    }

    #[test]
    fn a_modern_cpu_is_accepted() {
        let caps = judge(&zen(), 0).unwrap();
        assert_eq!((caps.revision, caps.asids), (1, 0x8000));
        for f in [
            feature::NESTED_PAGING,
            feature::LBR_VIRTUALIZATION,
            feature::NRIP_SAVE,
            feature::VMCB_CLEAN,
            feature::FLUSH_BY_ASID,
            feature::DECODE_ASSISTS,
            feature::PAUSE_FILTER,
            feature::AVIC,
            feature::V_VMSAVE_VMLOAD,
            feature::VGIF,
        ] {
            assert!(caps.has(f), "{f:#x}");
        }
        // LOCK alone (firmware locked SVM *on*) is fine.
        assert!(judge(&zen(), VM_CR_LOCK).is_ok());
    }

    #[test]
    fn refusals_explain_themselves() {
        let no_svm = SvmCpuid {
            ext_features_ecx: 0,
            ..zen()
        };
        assert_eq!(judge(&no_svm, 0), Err(SvmError::NoSvm));
        let ancient = SvmCpuid {
            max_extended_leaf: 0x8000_0000,
            ..zen()
        };
        assert_eq!(judge(&ancient, 0), Err(SvmError::NoSvm));
        let e = judge(&zen(), VM_CR_SVMDIS | VM_CR_LOCK).unwrap_err();
        assert_eq!(e, SvmError::DisabledByFirmware { locked: true });
        assert!(e.to_string().contains("BIOS"));
        assert!(judge(&zen(), VM_CR_SVMDIS)
            .unwrap_err()
            .to_string()
            .contains("disabled by the firmware"));
        let no_npt = SvmCpuid {
            svm_edx: zen().svm_edx & !feature::NESTED_PAGING,
            ..zen()
        };
        let e = judge(&no_npt, 0).unwrap_err();
        assert!(matches!(e, SvmError::MissingFeature(_)));
        assert!(e.to_string().contains("nested paging"), "{e}");
        let no_asid = SvmCpuid {
            svm_ebx: 1,
            ..zen()
        };
        assert!(judge(&no_asid, 0).unwrap_err().to_string().contains("ASID"));
        let no_leaf = SvmCpuid {
            max_extended_leaf: 0x8000_0008,
            ..zen()
        };
        assert!(matches!(
            judge(&no_leaf, 0),
            Err(SvmError::MissingFeature(_))
        ));
        assert!(SvmError::NoSvm.to_string().contains("AMD-V"));
    }
}
