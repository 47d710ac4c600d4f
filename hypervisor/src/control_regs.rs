//! The checks MOV to CR0/CR4 makes before it changes anything (SDM Vol. 2B "MOV—Move to/from
//! Control Registers", #GP(0) conditions; Vol. 3A 2.5, 10.8.5). Ally emulates the guest's
//! writes to the bits it owns, so it must make the same checks: a combination the CPU would
//! refuse is a #GP in the guest, never a failed VM entry (which would stop the guest) or a
//! fault in VMX root operation.

const CR0_PE: u64 = 1;
const CR0_WP: u64 = 1 << 16;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_CET: u64 = 1 << 23;

/// What the checks need of the vCPU's state.
#[derive(Clone, Copy, Debug)]
pub struct ControlState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer_lme: bool,
    pub efer_lma: bool,
    /// CS.L: the guest runs 64-bit code.
    pub cs_long: bool,
}

/// Why a write faults.
pub type Fault = &'static str;

/// MOV to CR0 of `value`.
pub fn check_cr0(value: u64, s: ControlState) -> Result<(), Fault> {
    if value >> 32 != 0 {
        return Err("CR0[63:32] set");
    }
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return Err("CR0.PG without CR0.PE");
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return Err("CR0.NW without CR0.CD");
    }
    if value & CR0_WP == 0 && s.cr4 & CR4_CET != 0 {
        return Err("CR0.WP cleared with CR4.CET set");
    }
    let enabling_paging = value & CR0_PG != 0 && s.cr0 & CR0_PG == 0;
    if enabling_paging && s.efer_lme && s.cr4 & CR4_PAE == 0 {
        return Err("IA-32e paging without CR4.PAE");
    }
    let disabling_paging = value & CR0_PG == 0 && s.cr0 & CR0_PG != 0;
    if disabling_paging && s.efer_lma && (s.cs_long || s.cr4 & CR4_PCIDE != 0) {
        return Err("CR0.PG cleared in 64-bit mode or with CR4.PCIDE");
    }
    Ok(())
}

/// MOV to CR4 of `value`; `supported` are the bits the CPU lets a guest set (VMX's
/// IA32_VMX_CR4_FIXED1, less VMXE, which Ally hides).
pub fn check_cr4(value: u64, supported: u64, s: ControlState) -> Result<(), Fault> {
    if value & CR4_VMXE != 0 {
        return Err("CR4.VMXE: VMX is hidden");
    }
    if value & !supported != 0 {
        return Err("a reserved or unsupported CR4 bit");
    }
    if s.efer_lma {
        if value & CR4_PAE == 0 {
            return Err("CR4.PAE cleared in IA-32e mode");
        }
        if (value ^ s.cr4) & CR4_LA57 != 0 {
            return Err("CR4.LA57 changed in IA-32e mode");
        }
    }
    if value & CR4_PCIDE != 0 && s.cr4 & CR4_PCIDE == 0 && (!s.efer_lma || s.cr3 & 0xFFF != 0) {
        return Err("CR4.PCIDE set outside IA-32e mode or with CR3[11:0] set");
    }
    if value & CR4_CET != 0 && s.cr0 & CR0_WP == 0 {
        return Err("CR4.CET set with CR0.WP clear");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: ControlState = ControlState {
        cr0: 0x8005_0033,
        cr3: 0x1000,
        cr4: 0x0020_06F0,
        efer_lme: true,
        efer_lma: true,
        cs_long: true,
    };
    const REAL: ControlState = ControlState {
        cr0: 0x10,
        cr3: 0,
        cr4: 0,
        efer_lme: false,
        efer_lma: false,
        cs_long: false,
    };
    const SUPPORTED: u64 = 0x3F_77FF & !CR4_VMXE;

    #[test]
    fn linux_boot_sequence_passes() {
        // Real mode -> protected mode -> PAE -> long mode, as Linux's boot code does.
        assert_eq!(check_cr0(0x11, REAL), Ok(()));
        let protected = ControlState { cr0: 0x11, ..REAL };
        assert_eq!(check_cr4(CR4_PAE, SUPPORTED, protected), Ok(()));
        let pae = ControlState {
            cr4: CR4_PAE,
            efer_lme: true,
            ..protected
        };
        assert_eq!(check_cr0(0x8000_0011, pae), Ok(()));
        assert_eq!(check_cr4(0x0020_06F0, SUPPORTED, LONG), Ok(()));
        assert_eq!(
            check_cr0(0x8005_003B, LONG),
            Ok(()),
            "CR0.TS set by the kernel"
        );
        // Caches off for MTRR programming: CD with NW clear.
        assert_eq!(check_cr0(0xC005_0033, LONG), Ok(()));
    }

    #[test]
    fn faulting_combinations() {
        assert!(check_cr0(0x8000_0000, REAL).is_err(), "PG without PE");
        assert!(check_cr0(0x2000_0011, REAL).is_err(), "NW without CD");
        assert!(check_cr0(1 << 40 | 0x11, REAL).is_err(), "upper half");
        assert!(
            check_cr0(0x0005_0033, LONG).is_err(),
            "PG cleared in 64-bit mode"
        );
        let pae_off = ControlState {
            cr0: 0x11,
            efer_lme: true,
            ..REAL
        };
        assert!(check_cr0(0x8000_0011, pae_off).is_err(), "LME without PAE");
        let cet = ControlState {
            cr4: LONG.cr4 | CR4_CET,
            ..LONG
        };
        assert!(check_cr0(0x8004_0033, cet).is_err(), "WP cleared with CET");
        assert!(check_cr4(LONG.cr4 & !CR4_PAE, SUPPORTED, LONG).is_err());
        assert!(check_cr4(LONG.cr4 | CR4_LA57, SUPPORTED, LONG).is_err());
        assert!(check_cr4(LONG.cr4 | CR4_VMXE, SUPPORTED | CR4_VMXE, LONG).is_err());
        assert!(
            check_cr4(LONG.cr4 | (1 << 30), SUPPORTED, LONG).is_err(),
            "reserved"
        );
        let pcid_cr3 = ControlState {
            cr3: 0x1005,
            ..LONG
        };
        assert!(check_cr4(LONG.cr4 | CR4_PCIDE, SUPPORTED, pcid_cr3).is_err());
        assert!(check_cr4(CR4_PCIDE, SUPPORTED, REAL).is_err());
        assert_eq!(check_cr4(LONG.cr4 | CR4_PCIDE, SUPPORTED, LONG), Ok(()));
        let no_wp = ControlState {
            cr0: 0x8000_0033,
            ..LONG
        };
        assert!(check_cr4(LONG.cr4 | CR4_CET, SUPPORTED | CR4_CET, no_wp).is_err());
    }
}
