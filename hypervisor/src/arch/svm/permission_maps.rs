//! The I/O permission map (IOPM, APM Vol. 2 15.10.1) and the MSR permission map (MSRPM,
//! APM 15.11), both physically contiguous, 4 KiB-aligned and named in the VMCB (IOPM_BASE_PA,
//! MSRPM_BASE_PA). A set bit intercepts.

use crate::msr::{passes, MsrAccess, Virtualization};
use core::ops::Range;

/// IOPM size: three pages (APM 15.10.1). One bit per port 0-0xFFFF fills the first two; the
/// third holds the bits a multi-byte access at the top of the port space reaches.
pub const IOPM_BYTES: usize = 12 * 1024;
/// MSRPM size: two pages (APM 15.11).
pub const MSRPM_BYTES: usize = 8 * 1024;

/// Sets the IOPM bits of `ports`, so that IN/OUT/INS/OUTS touching any of them exit (with the
/// IOIO_PROT intercept). Bits past the map's end are ignored.
pub fn intercept_ports(iopm: &mut [u8; IOPM_BYTES], ports: Range<u32>) {
    for port in ports {
        let Some(byte) = iopm.get_mut(port as usize / 8) else {
            break;
        };
        *byte |= 1 << (port % 8);
    }
}

/// Whether an access of `size` bytes (1, 2 or 4) at `port` exits: the CPU checks the bits of
/// every port the access touches (APM 15.10.1), so a word at 0x3F7 exits if 0x3F8 is
/// intercepted; at 0xFFFF the bits above 0xFFFF in the third page are checked.
pub fn port_access_intercepted(iopm: &[u8; IOPM_BYTES], port: u16, size: u8) -> bool {
    (u32::from(port)..u32::from(port) + u32::from(size)).any(|p| {
        iopm.get(p as usize / 8)
            .is_some_and(|b| b >> (p % 8) & 1 != 0)
    })
}

/// The MSRPM byte holding `msr`'s two bits and the bit of its read intercept (the write
/// intercept is the next bit), or `None` for an MSR outside the map (always intercepted).
///
/// APM 15.11, Table 15-7: bytes 0x000-0x7FF cover MSRs 0-0x1FFF, 0x800-0xFFF cover
/// 0xC000_0000-0xC000_1FFF, 0x1000-0x17FF cover 0xC001_0000-0xC001_1FFF; 0x1800-0x1FFF are
/// reserved. Two bits per MSR, read then write, so four MSRs per byte.
pub fn msrpm_position(msr: u32) -> Option<(usize, u8)> {
    let (vector, index) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (1, msr - 0xC000_0000),
        0xC001_0000..=0xC001_1FFF => (2, msr - 0xC001_0000),
        _ => return None,
    };
    let bit = 2 * index as usize;
    Some((vector * 0x800 + bit / 8, (bit % 8) as u8))
}

/// Whether the MSRPM intercepts `access` of `msr` (MSRs outside the map always exit).
pub fn msr_intercepted(msrpm: &[u8; MSRPM_BYTES], msr: u32, access: MsrAccess) -> bool {
    let Some((byte, read_bit)) = msrpm_position(msr) else {
        return true;
    };
    let bit = match access {
        MsrAccess::Read => read_bit,
        MsrAccess::Write => read_bit + 1,
    };
    msrpm[byte] >> bit & 1 != 0
}

/// Fills the MSRPM from Ally's MSR policy ([`crate::msr::passes`] for SVM): the same
/// allow-list as the VMX MSR bitmap, plus the SVM-only intercepts of
/// [`crate::msr::SVM_INTERCEPTED`] (EFER, whose guest copy must keep SVME; DEBUGCTL; VM_CR and
/// VM_HSAVE_PA). The reserved fourth 2 KiB stays all ones, like an MSR the map does not name.
pub fn fill_msrpm(msrpm: &mut [u8; MSRPM_BYTES]) {
    msrpm.fill(0xFF);
    for first in [0u32, 0xC000_0000, 0xC001_0000] {
        for msr in first..first + 0x2000 {
            let Some((byte, read_bit)) = msrpm_position(msr) else {
                continue;
            };
            if passes(msr, MsrAccess::Read, Virtualization::Svm) {
                msrpm[byte] &= !(1 << read_bit);
            }
            if passes(msr, MsrAccess::Write, Virtualization::Svm) {
                msrpm[byte] &= !(1 << (read_bit + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msr::{fill_bitmap, read_intercepted, SVM_INTERCEPTED, WRITE_ALLOWED};

    fn vmx_intercepted(bitmap: &[u8; 4096], msr: u32, access: MsrAccess) -> bool {
        let (base, index) = match msr {
            0..=0x1FFF => (0, msr),
            0xC000_0000..=0xC000_1FFF => (1024, msr - 0xC000_0000),
            _ => return true,
        };
        let base = base + if access == MsrAccess::Write { 2048 } else { 0 };
        bitmap[base + index as usize / 8] >> (index % 8) & 1 != 0
    }

    fn svm_override(msr: u32, access: MsrAccess) -> bool {
        SVM_INTERCEPTED
            .iter()
            .any(|&(m, reads, _)| m == msr && (access == MsrAccess::Write || reads))
    }

    #[test]
    fn msrpm_matches_the_vmx_bitmap() {
        let mut bitmap = [0u8; 4096];
        fill_bitmap(&mut bitmap);
        let mut msrpm = [0u8; MSRPM_BYTES];
        fill_msrpm(&mut msrpm);
        // Every MSR both maps cover: the same decision, except the SVM-only intercepts.
        let mut compared = 0;
        for msr in (0..0x2000).chain(0xC000_0000..0xC000_2000) {
            for access in [MsrAccess::Read, MsrAccess::Write] {
                let vmx = vmx_intercepted(&bitmap, msr, access);
                let svm = msr_intercepted(&msrpm, msr, access);
                if svm_override(msr, access) {
                    assert!(svm, "{msr:#x} {access:?} must exit on SVM");
                } else {
                    assert_eq!(vmx, svm, "{msr:#x} {access:?}");
                    compared += 1;
                }
            }
        }
        assert!(compared > 0x7FF0);
        // Each policy entry explicitly.
        for (range, why) in WRITE_ALLOWED {
            for msr in range.clone() {
                let svm_write = msr_intercepted(&msrpm, msr, MsrAccess::Write);
                assert_eq!(
                    svm_write,
                    svm_override(msr, MsrAccess::Write),
                    "{msr:#x} ({why})"
                );
                assert!(!vmx_intercepted(&bitmap, msr, MsrAccess::Write));
            }
        }
        for msr in (0..0x2000).filter(|&m| read_intercepted(m)) {
            assert!(msr_intercepted(&msrpm, msr, MsrAccess::Read), "{msr:#x}");
        }
    }

    #[test]
    fn svm_specific_intercepts() {
        let mut msrpm = [0u8; MSRPM_BYTES];
        fill_msrpm(&mut msrpm);
        for access in [MsrAccess::Read, MsrAccess::Write] {
            assert!(msr_intercepted(&msrpm, 0xC000_0080, access), "EFER");
            assert!(msr_intercepted(&msrpm, 0xC001_0114, access), "VM_CR");
            assert!(msr_intercepted(&msrpm, 0xC001_0117, access), "VM_HSAVE_PA");
            // Outside the three vectors: always.
            assert!(msr_intercepted(&msrpm, 0x4000_0000, access));
            assert!(msr_intercepted(&msrpm, 0xC002_0000, access));
        }
        assert!(msr_intercepted(&msrpm, 0x1D9, MsrAccess::Write), "DEBUGCTL");
        assert!(!msr_intercepted(&msrpm, 0x1D9, MsrAccess::Read));
        // FS_BASE, LSTAR, KERNEL_GS_BASE and TSC_DEADLINE pass both ways.
        for msr in [0xC000_0100, 0xC000_0082, 0xC000_0102, 0x6E0] {
            assert!(!msr_intercepted(&msrpm, msr, MsrAccess::Read), "{msr:#x}");
            assert!(!msr_intercepted(&msrpm, msr, MsrAccess::Write), "{msr:#x}");
        }
        // AMD's third vector: reads pass (RDMSR changes nothing), writes exit (not allowed).
        assert!(
            !msr_intercepted(&msrpm, 0xC001_0015, MsrAccess::Read),
            "HWCR"
        );
        assert!(msr_intercepted(&msrpm, 0xC001_0015, MsrAccess::Write));
        assert!(msr_intercepted(&msrpm, 0xC001_0058, MsrAccess::Write));
        // The reserved fourth vector is left all ones.
        assert!(msrpm[0x1800..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn msrpm_positions() {
        assert_eq!(msrpm_position(0), Some((0, 0)));
        assert_eq!(msrpm_position(3), Some((0, 6)));
        assert_eq!(msrpm_position(4), Some((1, 0)));
        assert_eq!(msrpm_position(0x1FFF), Some((0x7FF, 6)));
        assert_eq!(msrpm_position(0xC000_0080), Some((0x800 + 0x20, 0)));
        assert_eq!(msrpm_position(0xC001_0114), Some((0x1000 + 0x45, 0)));
        assert_eq!(msrpm_position(0xC001_0117), Some((0x1000 + 0x45, 6)));
        assert_eq!(msrpm_position(0x2000), None);
        assert_eq!(msrpm_position(0xC000_2000), None);
        assert_eq!(msrpm_position(0xC001_2000), None);
    }

    #[test]
    fn iopm_bits_and_multibyte_accesses() {
        let mut iopm = [0u8; IOPM_BYTES];
        intercept_ports(&mut iopm, 0x3F8..0x400);
        intercept_ports(&mut iopm, 0xCF8..0xCFC);
        assert_eq!(iopm[0x3F8 / 8], 0xFF);
        assert_eq!(iopm[0xCF8 / 8], 0x0F);
        assert!(port_access_intercepted(&iopm, 0x3F8, 1));
        assert!(!port_access_intercepted(&iopm, 0x3F7, 1));
        assert!(port_access_intercepted(&iopm, 0x3F7, 2), "touches 0x3F8");
        assert!(port_access_intercepted(&iopm, 0x3F6, 4));
        assert!(!port_access_intercepted(&iopm, 0x400, 4));
        assert!(port_access_intercepted(&iopm, 0xCF8, 4));
        assert!(!port_access_intercepted(&iopm, 0xCFC, 4), "PCI data passes");
        // The top of the port space reaches the third page.
        assert!(!port_access_intercepted(&iopm, 0xFFFF, 4));
        intercept_ports(&mut iopm, 0x1_0000..0x1_0001);
        assert_eq!(iopm[0x2000], 1);
        assert!(port_access_intercepted(&iopm, 0xFFFF, 2));
        // Past the end: ignored, no panic.
        intercept_ports(&mut iopm, 0x1_7FFF..0x2_0000);
        assert_eq!(iopm[IOPM_BYTES - 1], 0x80);
        let set: u32 = iopm.iter().map(|b| b.count_ones()).sum();
        assert_eq!(set, 8 + 4 + 1 + 1);
    }
}
