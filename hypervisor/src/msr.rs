//! Which MSRs the guest reaches directly, and what Ally does with the rest: an explicit
//! allow-list, intercept by default (the MSR bitmap, SDM 25.6.9, is built from it).
//!
//! - **Reads** pass through, except the MSRs Ally emulates ([`read_intercepted`]): RDMSR
//!   changes no state, and what it shows of the machine is what bare metal would show.
//! - **Writes** exit unless the MSR is on [`WRITE_ALLOWED`], each entry argued there. An
//!   intercepted write is validated and emulated (IA32_APIC_BASE, the MTRRs, the x2APIC ICR)
//!   or refused with #GP, as a CPU refuses a write to an MSR it does not have ([`judge_write`]).
//!   MSRs outside the bitmap's two ranges always exit (SDM 25.1.3) and get the same treatment.
//!
//! Among the refused: Intel PT (`IA32_RTIT_*`: trace output goes to host-physical memory,
//! Ally's included), the PEBS/BTS store (`IA32_DS_AREA`, `IA32_PEBS_ENABLE`: records written
//! through linear addresses while Ally runs), microcode updates, frequency, power and thermal
//! controls that reach the DPI cores' package, cache and memory-bandwidth allocation shared
//! with them (`IA32_PQR_ASSOC`, the QoS masks), `IA32_MISC_ENABLE` changes, SMM and
//! platform-configuration MSRs (e.g. AMD's MMIO configuration base).

use core::ops::RangeInclusive;

/// IA32_FEATURE_CONTROL (SDM Vol. 4 table 2-2): shown locked with VMX off.
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
/// The x2APIC interrupt command register (IPIs are filtered).
pub const X2APIC_ICR: u32 = 0x830;
/// The VMX capability MSRs, absent for the guest.
pub const VMX_CAPABILITY_MSRS: RangeInclusive<u32> = 0x480..=0x492;
/// Intel PT's MSRs (IA32_RTIT_*): hidden with PT itself.
pub const RTIT_MSRS: [RangeInclusive<u32>; 3] = [0x560..=0x561, 0x570..=0x572, 0x580..=0x587];
/// IA32_MTRRCAP (read-only).
pub const IA32_MTRRCAP: u32 = 0xFE;
/// IA32_MTRR_DEF_TYPE.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
/// The variable-range pairs IA32_MTRR_PHYSBASEn/PHYSMASKn (at most 16 pairs modelled).
pub const MTRR_VARIABLE: RangeInclusive<u32> = 0x200..=0x21F;
/// The fixed-range MTRRs (64K, 2 x 16K, 8 x 4K).
pub const MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F,
];

/// MSRs the guest writes without an exit. Each touches only the logical processor that writes
/// it, or state VMX switches at every entry and exit, and none reaches memory, another core,
/// or anything Ally relies on in VMX root operation.
pub const WRITE_ALLOWED: &[(RangeInclusive<u32>, &str)] = &[
    (0x10..=0x10, "IA32_TSC: this logical processor's TSC only"),
    (
        0x3B..=0x3B,
        "IA32_TSC_ADJUST: this logical processor's TSC only (Linux's TSC sync writes it)",
    ),
    (
        0x48..=0x49,
        "IA32_SPEC_CTRL, IA32_PRED_CMD: this thread's speculation controls",
    ),
    (
        0x8B..=0x8B,
        "IA32_BIOS_SIGN_ID: cleared before CPUID to read the microcode revision; loads nothing",
    ),
    (
        0xC1..=0xC8,
        "IA32_PMCx: this thread's counters (counting only; PMIs go to its own LVT)",
    ),
    (
        0x10B..=0x10B,
        "IA32_FLUSH_CMD: flushes this core's L1D, a mitigation",
    ),
    (
        0x122..=0x123,
        "IA32_TSX_CTRL, IA32_MCU_OPT_CTRL: mitigations of the core, which no DPI core shares",
    ),
    (
        0x140..=0x140,
        "MISC_FEATURES_ENABLES: CPUID faulting for this thread's CPL 3",
    ),
    (
        0x174..=0x176,
        "IA32_SYSENTER_CS/ESP/EIP: guest state in the VMCS, switched at entry and exit",
    ),
    (
        0x179..=0x17B,
        "IA32_MCG_*: machine-check reporting (error reporting only, no memory access)",
    ),
    (
        0x186..=0x18D,
        "IA32_PERFEVTSELx: this thread's event selection",
    ),
    (
        0x1D9..=0x1D9,
        "IA32_DEBUGCTL: cleared at every VM exit (SDM 28.5.1), so LBR/BTS stop in VMX root",
    ),
    (
        0x277..=0x277,
        "IA32_PAT: guest state in the VMCS (loaded at entry, Ally's at exit)",
    ),
    (
        0x280..=0x29F,
        "IA32_MCi_CTL2: corrected-error interrupt thresholds (error reporting only)",
    ),
    (
        0x309..=0x30B,
        "IA32_FIXED_CTRx: this thread's fixed counters",
    ),
    (
        0x38D..=0x390,
        "IA32_FIXED_CTR_CTRL, IA32_PERF_GLOBAL_*: this thread's counters (PEBS stays off: \
         IA32_PEBS_ENABLE and IA32_DS_AREA are refused)",
    ),
    (
        0x400..=0x47F,
        "IA32_MCi_CTL/STATUS/ADDR/MISC: machine-check banks (error reporting only)",
    ),
    (
        0x6A0..=0x6A8,
        "IA32_U_CET, IA32_S_CET, IA32_PLx_SSP, IA32_INTERRUPT_SSP_TABLE_ADDR: CET is off in \
         VMX root (Ally's CR4.CET is clear)",
    ),
    (
        0x6E0..=0x6E0,
        "IA32_TSC_DEADLINE: this thread's local APIC timer",
    ),
    (
        0x800..=0x82F,
        "x2APIC registers below the ICR: this thread's APIC (ID and LDR are read-only)",
    ),
    (
        0x831..=0x8FF,
        "x2APIC registers above the ICR: this thread's APIC (SELF_IPI reaches only itself)",
    ),
    (
        0xDA0..=0xDA0,
        "IA32_XSS: this thread's supervisor state components (Ally uses no XSAVES)",
    ),
    (
        0xC000_0080..=0xC000_0080,
        "IA32_EFER: guest state in the VMCS; the CPU checks the value, Ally follows LMA",
    ),
    (
        0xC000_0081..=0xC000_0084,
        "STAR, LSTAR, CSTAR, FMASK: SYSCALL targets (Ally never executes SYSCALL)",
    ),
    (
        0xC000_0100..=0xC000_0103,
        "FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX: this thread's bases (Ally's FS/GS come \
         from the VMCS host state; it never executes SWAPGS or RDTSCP)",
    ),
];

/// Whether a guest WRMSR of `msr` reaches the hardware without an exit.
pub fn write_passes(msr: u32) -> bool {
    WRITE_ALLOWED.iter().any(|(r, _)| r.contains(&msr))
}

/// Whether a guest RDMSR of `msr` exits (Ally emulates it).
pub fn read_intercepted(msr: u32) -> bool {
    msr == IA32_FEATURE_CONTROL
        || VMX_CAPABILITY_MSRS.contains(&msr)
        || RTIT_MSRS.iter().any(|r| r.contains(&msr))
        || is_mtrr(msr)
}

/// Whether `msr` is one of the MTRRs Ally shadows.
pub fn is_mtrr(msr: u32) -> bool {
    msr == IA32_MTRRCAP
        || msr == IA32_MTRR_DEF_TYPE
        || MTRR_VARIABLE.contains(&msr)
        || MTRR_FIXED.contains(&msr)
}

/// A guest RDMSR or WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    Read,
    Write,
}

/// Which virtualization extension's permission map is being filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VMX: the MSR bitmap covers 0-0x1FFF and 0xC000_0000-0xC000_1FFF (SDM 25.6.9).
    Vmx,
    /// AMD SVM: the MSR permission map also covers 0xC001_0000-0xC001_1FFF (APM Vol. 2 15.11).
    Svm,
}

/// IA32_EFER.
pub const IA32_EFER: u32 = 0xC000_0080;
/// IA32_DEBUGCTL.
pub const IA32_DEBUGCTL: u32 = 0x1D9;
/// AMD VM_CR (APM Vol. 2 15.30.1).
pub const AMD_VM_CR: u32 = 0xC001_0114;
/// AMD VM_HSAVE_PA (APM Vol. 2 15.30.4).
pub const AMD_VM_HSAVE_PA: u32 = 0xC001_0117;

/// Where SVM must intercept what the policy above lets through on VMX: `(msr, reads too,
/// why)`. Writes of these MSRs are always intercepted on SVM.
pub const SVM_INTERCEPTED: &[(u32, bool, &str)] = &[
    (
        IA32_EFER,
        true,
        "EFER lives in the VMCB and the guest's EFER must keep SVME set, or the next VMRUN \
         fails (APM 15.5.1): writes are validated by Ally, which keeps SVME set, and reads \
         show SVME clear, as SVM is hidden like VMX",
    ),
    (
        IA32_DEBUGCTL,
        false,
        "#VMEXIT does not clear DEBUGCTL as a VMX exit does (SDM 28.5.1); only LBR \
         virtualization (APM 15.23) switches it, so without it a guest value would stay live \
         in the host",
    ),
    (
        AMD_VM_CR,
        true,
        "VM_CR controls SVM itself (SVMDIS, LOCK): hidden, never written by the guest",
    ),
    (
        AMD_VM_HSAVE_PA,
        true,
        "VM_HSAVE_PA is where VMRUN saves Ally's state: a guest write would redirect it",
    ),
];

/// Whether `msr` lies in a range the permission map of `virt` covers; accesses to the MSRs
/// outside them always exit (SDM 25.1.3; APM 15.11).
pub fn in_permission_map(msr: u32, virt: Virtualization) -> bool {
    msr < 0x2000
        || (0xC000_0000..0xC000_2000).contains(&msr)
        || (virt == Virtualization::Svm && (0xC001_0000..0xC001_2000).contains(&msr))
}

/// The one decision both permission maps are built from: whether a guest `access` of `msr`
/// reaches the hardware without an exit under `virt`. Reads pass unless Ally emulates them
/// ([`read_intercepted`]), writes pass when on [`WRITE_ALLOWED`]; on SVM, [`SVM_INTERCEPTED`]
/// overrides both; MSRs outside the map's ranges always exit.
pub fn passes(msr: u32, access: MsrAccess, virt: Virtualization) -> bool {
    if !in_permission_map(msr, virt) {
        return false;
    }
    if virt == Virtualization::Svm {
        let overridden = SVM_INTERCEPTED
            .iter()
            .any(|&(m, reads, _)| m == msr && (access == MsrAccess::Write || reads));
        if overridden {
            return false;
        }
    }
    match access {
        MsrAccess::Read => !read_intercepted(msr),
        MsrAccess::Write => write_passes(msr),
    }
}

/// Fills a VMX MSR bitmap (SDM 25.6.9: read bits for MSRs 0-0x1FFF, then for
/// 0xC0000000-0xC0001FFF, then the write bits likewise) from [`passes`].
pub fn fill_bitmap(bitmap: &mut [u8; 4096]) {
    bitmap.fill(0);
    for (base, first) in [(0usize, 0u32), (1024, 0xC000_0000)] {
        for index in 0..0x2000usize {
            let msr = first + index as u32;
            let bit = 1u8 << (index % 8);
            if !passes(msr, MsrAccess::Read, Virtualization::Vmx) {
                bitmap[base + index / 8] |= bit;
            }
            if !passes(msr, MsrAccess::Write, Virtualization::Vmx) {
                bitmap[base + 2048 + index / 8] |= bit;
            }
        }
    }
}

/// What Ally does with an intercepted WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteVerdict {
    /// Validated: write it to the hardware (IA32_APIC_BASE).
    Hardware,
    /// Kept in the vCPU's MTRR shadow.
    Mtrr,
    /// The x2APIC ICR: an IPI for the filter.
    X2apicIcr,
    /// A write that leaves the MSR as it is (IA32_MISC_ENABLE): retired, nothing written.
    Unchanged,
    /// #GP in the guest, as on a CPU without this MSR or with a reserved bit set.
    Refuse(&'static str),
}

/// What the write is judged against.
#[derive(Clone, Copy, Debug)]
pub struct MsrContext {
    /// MAXPHYADDR (CPUID 0x80000008 EAX[7:0]).
    pub max_phys_bits: u8,
    /// CPUID.1:ECX.x2APIC.
    pub x2apic_supported: bool,
    /// The MSR's current hardware value, where Ally may read it (IA32_APIC_BASE and
    /// IA32_MISC_ENABLE, both architectural).
    pub current: u64,
}

/// Judges an intercepted WRMSR of `value` to `msr`.
pub fn judge_write(msr: u32, value: u64, ctx: MsrContext) -> WriteVerdict {
    match msr {
        IA32_APIC_BASE => apic_base_write(value, ctx),
        IA32_MISC_ENABLE if value == ctx.current => WriteVerdict::Unchanged,
        IA32_MISC_ENABLE => WriteVerdict::Refuse("IA32_MISC_ENABLE changes are package-wide"),
        X2APIC_ICR => WriteVerdict::X2apicIcr,
        IA32_MTRRCAP => WriteVerdict::Refuse("IA32_MTRRCAP is read-only"),
        m if is_mtrr(m) => match mtrr_value_valid(m, value, ctx.max_phys_bits) {
            true => WriteVerdict::Mtrr,
            false => WriteVerdict::Refuse("an invalid MTRR value"),
        },
        m if m == IA32_FEATURE_CONTROL || VMX_CAPABILITY_MSRS.contains(&m) => {
            WriteVerdict::Refuse("VMX is hidden")
        }
        m if RTIT_MSRS.iter().any(|r| r.contains(&m)) => {
            WriteVerdict::Refuse("Intel PT writes trace data to host-physical memory")
        }
        0x600 | 0x3F1 => WriteVerdict::Refuse("PEBS/BTS records are written while Ally runs"),
        0x79 => WriteVerdict::Refuse("microcode updates reach every thread of the core"),
        0x199..=0x19B | 0x1B0 | 0x1FC | 0xE2 | 0x600..=0x6FF | 0x770..=0x777 => {
            WriteVerdict::Refuse("power, frequency and thermal controls reach the DPI cores")
        }
        0xC8F..=0xD8F => {
            WriteVerdict::Refuse("cache and bandwidth allocation is shared with the DPI cores")
        }
        _ => WriteVerdict::Refuse("not on Ally's MSR allow-list"),
    }
}

/// IA32_APIC_BASE (SDM Vol. 3A 11.4.4, 11.12.1, 11.12.5): reserved bits, x2APIC support and
/// the mode transitions the CPU forbids are #GP. Ally keeps the APIC at its address (moving
/// it would take the page out of the EPT trap that filters IPIs), so a base change is
/// refused too.
fn apic_base_write(value: u64, ctx: MsrContext) -> WriteVerdict {
    const BSP: u64 = 1 << 8;
    const EXTD: u64 = 1 << 10;
    const EN: u64 = 1 << 11;
    let base_mask = ((1u64 << ctx.max_phys_bits.min(52)) - 1) & !0xFFF;
    let reserved = !(base_mask | BSP | EXTD | EN);
    if value & reserved != 0 {
        return WriteVerdict::Refuse("reserved IA32_APIC_BASE bits");
    }
    if value & EXTD != 0 && !ctx.x2apic_supported {
        return WriteVerdict::Refuse("x2APIC mode on a CPU without it");
    }
    let mode = |v: u64| (v & EN != 0, v & EXTD != 0);
    match (mode(ctx.current), mode(value)) {
        (_, (false, true)) => return WriteVerdict::Refuse("EXTD without EN is invalid"),
        ((true, true), (true, false)) => {
            return WriteVerdict::Refuse("x2APIC to xAPIC mode without disabling first")
        }
        ((false, _), (true, true)) => {
            return WriteVerdict::Refuse("disabled to x2APIC mode without xAPIC first")
        }
        _ => {}
    }
    if value & base_mask != ctx.current & base_mask {
        return WriteVerdict::Refuse("the local APIC stays at its address");
    }
    WriteVerdict::Hardware
}

/// The checks a CPU makes on an MTRR write (SDM Vol. 3A 12.11.2-12.11.3): memory types 0,
/// 1, 4, 5, 6 only; no bits above MAXPHYADDR or in reserved positions.
fn mtrr_value_valid(msr: u32, value: u64, max_phys_bits: u8) -> bool {
    let type_ok = |t: u64| matches!(t, 0 | 1 | 4 | 5 | 6);
    let phys_mask = ((1u64 << max_phys_bits.min(52)) - 1) & !0xFFF;
    if msr == IA32_MTRR_DEF_TYPE {
        // Type in 7:0, FE bit 10, E bit 11.
        return value & !0xCFF == 0 && type_ok(value & 0xFF);
    }
    if MTRR_FIXED.contains(&msr) {
        return (0..8).all(|i| type_ok((value >> (8 * i)) & 0xFF));
    }
    if (msr - MTRR_VARIABLE.start()).is_multiple_of(2) {
        // PHYSBASE: type in 7:0, base above bit 12.
        value & !(phys_mask | 0xFF) == 0 && type_ok(value & 0xFF)
    } else {
        // PHYSMASK: valid bit 11, mask above bit 12.
        value & !(phys_mask | (1 << 11)) == 0
    }
}

/// A vCPU's view of the MTRRs. With EPT the guest's accesses take their memory type from the
/// EPT (and the guest's PAT), not from the MTRRs (SDM 29.3.7.2), so the guest's MTRR writes
/// change nothing real: Ally keeps them here and the hardware MTRRs, which also set the
/// memory types of Ally's own code and the DPI memory, stay the firmware's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MtrrShadow {
    cap: u64,
    def_type: u64,
    variable: [u64; 32],
    fixed: [u64; 11],
}

impl MtrrShadow {
    /// The firmware's MTRRs as `read` returns them (`read` is called only for the MSRs
    /// IA32_MTRRCAP says exist).
    pub fn capture(mut read: impl FnMut(u32) -> u64) -> Self {
        let cap = read(IA32_MTRRCAP);
        let mut s = Self {
            cap,
            def_type: read(IA32_MTRR_DEF_TYPE),
            ..Self::default()
        };
        let count = ((cap & 0xFF) as usize).min(16);
        for i in 0..2 * count {
            s.variable[i] = read(MTRR_VARIABLE.start() + i as u32);
        }
        if cap & (1 << 8) != 0 {
            for (slot, msr) in s.fixed.iter_mut().zip(MTRR_FIXED) {
                *slot = read(msr);
            }
        }
        s
    }

    fn slot(&mut self, msr: u32) -> Option<&mut u64> {
        let variable_pairs = ((self.cap & 0xFF) as usize).min(16);
        match msr {
            IA32_MTRRCAP => Some(&mut self.cap),
            IA32_MTRR_DEF_TYPE => Some(&mut self.def_type),
            m if MTRR_VARIABLE.contains(&m) => {
                let i = (m - MTRR_VARIABLE.start()) as usize;
                (i < 2 * variable_pairs).then(|| &mut self.variable[i])
            }
            m if self.cap & (1 << 8) != 0 => MTRR_FIXED
                .iter()
                .position(|&f| f == m)
                .map(|i| &mut self.fixed[i]),
            _ => None,
        }
    }

    /// The guest's RDMSR; `None` for an MTRR this CPU does not have (#GP).
    pub fn read(&mut self, msr: u32) -> Option<u64> {
        self.slot(msr).map(|v| *v)
    }

    /// The guest's WRMSR (already validated); `false` for an MTRR this CPU does not have.
    pub fn write(&mut self, msr: u32, value: u64) -> bool {
        match self.slot(msr) {
            Some(slot) if msr != IA32_MTRRCAP => {
                *slot = value;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(current: u64) -> MsrContext {
        MsrContext {
            max_phys_bits: 39,
            x2apic_supported: true,
            current,
        }
    }

    #[test]
    fn dangerous_msrs_are_never_written_directly() {
        for msr in [
            0x560,
            0x561,
            0x570,
            0x571,
            0x572,
            0x580,
            0x587, // Intel PT
            0x600,
            0x3F1, // DS area, PEBS
            0x79,  // microcode update
            0x199,
            0x19A,
            0x1B0,
            0x1FC,
            0xE2,
            0x610,
            0x770,
            0x774, // power and frequency
            0x200,
            0x201,
            0x2FF,
            0x250,
            0x26F, // MTRRs
            0x1A0, // MISC_ENABLE
            0x3A,
            0x480,
            0x1B,
            0x830, // emulated
            0xC8F,
            0xC90, // QoS
            0xC001_0058,
            0x9B,
            0x4000_0000, // AMD MMIO config base, SMM monitor, hypervisor
        ] {
            assert!(!write_passes(msr), "{msr:#x} passes");
            assert!(
                matches!(
                    judge_write(msr, 1, ctx(0xFEE0_0900)),
                    WriteVerdict::Refuse(_)
                        | WriteVerdict::Mtrr
                        | WriteVerdict::X2apicIcr
                        | WriteVerdict::Unchanged
                ),
                "{msr:#x}"
            );
        }
        for msr in [
            0x560,
            0x570,
            0x600,
            0x3F1,
            0x79,
            0x199,
            0x610,
            0xC90,
            0xC001_0058,
        ] {
            assert!(
                matches!(judge_write(msr, 0, ctx(0)), WriteVerdict::Refuse(_)),
                "{msr:#x}"
            );
        }
    }

    #[test]
    fn what_linux_writes_all_the_time_passes() {
        for msr in [
            0xC000_0100,
            0xC000_0101,
            0xC000_0102,
            0xC000_0080,
            0xC000_0082,
            0x48,
            0x49,
            0x6E0,
            0x80B,
            0x838,
            0x83F,
            0x277,
            0x1D9,
            0x8B,
            0x3B,
            0x174,
            0x186,
            0x38F,
        ] {
            assert!(write_passes(msr), "{msr:#x}");
        }
        assert!(!write_passes(0x830));
        // The allow-list's entries do not overlap the emulated MSRs.
        for (range, why) in WRITE_ALLOWED {
            assert!(!why.is_empty());
            for msr in range.clone() {
                assert!(!read_intercepted(msr), "{msr:#x} ({why})");
                assert_ne!(msr, IA32_APIC_BASE);
                assert_ne!(msr, X2APIC_ICR);
            }
        }
    }

    #[test]
    fn bitmap_follows_the_policy() {
        let mut bitmap = [0xAAu8; 4096];
        fill_bitmap(&mut bitmap);
        let bit =
            |offset: usize, index: u32| bitmap[offset + index as usize / 8] >> (index % 8) & 1;
        // Reads: FEATURE_CONTROL and MTRRs exit, APIC_BASE does not.
        assert_eq!(bit(0, 0x3A), 1);
        assert_eq!(bit(0, 0x200), 1);
        assert_eq!(bit(0, 0x1B), 0);
        assert_eq!(bit(1024, 0x80), 0, "EFER reads pass");
        // Writes: FS_BASE and TSC_DEADLINE pass, PT, DS_AREA, APIC_BASE, the ICR exit.
        assert_eq!(bit(3072, 0x100), 0);
        assert_eq!(bit(2048, 0x6E0), 0);
        for msr in [0x570, 0x600, 0x1B, 0x830, 0x199, 0x1FFF] {
            assert_eq!(bit(2048, msr), 1, "{msr:#x}");
        }
        assert_eq!(bit(3072, 0x1FFF), 1);
        let passing_writes: usize = (0..0x2000)
            .filter(|&i| bit(2048, i) == 0)
            .chain((0..0x2000).filter(|&i| bit(3072, i) == 0))
            .count();
        let listed: usize = WRITE_ALLOWED.iter().map(|(r, _)| r.clone().count()).sum();
        assert_eq!(passing_writes, listed);
    }

    #[test]
    fn reads_pass_except_what_ally_emulates() {
        for msr in [
            0x3A, 0x480, 0x491, 0x560, 0x570, 0xFE, 0x2FF, 0x200, 0x20F, 0x250, 0x26F,
        ] {
            assert!(read_intercepted(msr), "{msr:#x}");
        }
        for msr in [0x10, 0x1B, 0x1A0, 0xC000_0080, 0x830, 0x600] {
            assert!(!read_intercepted(msr), "{msr:#x}");
        }
    }

    #[test]
    fn apic_base_transitions() {
        let xapic = 0xFEE0_0900; // BSP, EN, base 0xFEE00000
        let x2apic = xapic | (1 << 10);
        assert_eq!(
            judge_write(IA32_APIC_BASE, xapic, ctx(xapic)),
            WriteVerdict::Hardware
        );
        assert_eq!(
            judge_write(IA32_APIC_BASE, x2apic, ctx(xapic)),
            WriteVerdict::Hardware
        );
        // Disable, from either mode.
        assert_eq!(
            judge_write(IA32_APIC_BASE, 0xFEE0_0100, ctx(x2apic)),
            WriteVerdict::Hardware
        );
        for (value, current) in [
            (xapic | 1, xapic),         // reserved bit 0
            (xapic | (1 << 9), xapic),  // reserved bit 9
            (xapic | (1 << 45), xapic), // above MAXPHYADDR
            (xapic, x2apic),            // x2APIC -> xAPIC
            (0xFEE0_0500, xapic),       // EXTD without EN
            (x2apic, 0xFEE0_0100),      // disabled -> x2APIC
            (0xFED0_0900, xapic),       // moved
        ] {
            assert!(
                matches!(
                    judge_write(IA32_APIC_BASE, value, ctx(current)),
                    WriteVerdict::Refuse(_)
                ),
                "{value:#x} from {current:#x}"
            );
        }
        let no_x2 = MsrContext {
            x2apic_supported: false,
            ..ctx(xapic)
        };
        assert!(matches!(
            judge_write(IA32_APIC_BASE, x2apic, no_x2),
            WriteVerdict::Refuse(_)
        ));
    }

    #[test]
    fn misc_enable_only_unchanged() {
        assert_eq!(
            judge_write(0x1A0, 0x850089, ctx(0x850089)),
            WriteVerdict::Unchanged
        );
        assert!(matches!(
            judge_write(0x1A0, 0x850088, ctx(0x850089)),
            WriteVerdict::Refuse(_)
        ));
    }

    #[test]
    fn mtrr_shadow_keeps_the_guest_view() {
        // Two variable pairs, fixed ranges, WC.
        let hw = |msr: u32| match msr {
            IA32_MTRRCAP => 0x502,
            IA32_MTRR_DEF_TYPE => 0xC06,
            0x200 => 0x6,
            0x201 => 0x7F_8000_0800,
            0x250 => 0x0606_0606_0606_0606,
            _ => 0,
        };
        let mut s = MtrrShadow::capture(hw);
        assert_eq!(s.read(IA32_MTRRCAP), Some(0x502));
        assert_eq!(s.read(0x201), Some(0x7F_8000_0800));
        assert_eq!(s.read(0x204), None, "only two pairs");
        assert_eq!(s.read(0x250), Some(0x0606_0606_0606_0606));
        // Linux sets a range uncachable; the shadow keeps it, the hardware is untouched.
        let base = 0xC000_0000;
        assert_eq!(judge_write(0x202, base, ctx(0)), WriteVerdict::Mtrr);
        assert!(s.write(0x202, base));
        assert_eq!(s.read(0x202), Some(base));
        assert!(!s.write(0x204, 0));
        assert!(!s.write(IA32_MTRRCAP, 0));
        // Invalid values: type 2, 3, 7; bits above MAXPHYADDR; reserved bits.
        for (msr, v) in [
            (0x200, 0x2),
            (0x200, 0x7),
            (0x200, 1 << 45),
            (0x201, 0x400),
            (0x2FF, 0x3),
            (0x2FF, 0x1006),
            (0x250, 0x0606_0606_0606_0603),
        ] {
            assert!(
                matches!(judge_write(msr, v, ctx(0)), WriteVerdict::Refuse(_)),
                "{msr:#x}={v:#x}"
            );
        }
        assert!(matches!(
            judge_write(IA32_MTRRCAP, 0, ctx(0)),
            WriteVerdict::Refuse(_)
        ));
    }
}
