//! Ally's real-mode footprint in the guest: a boot stub that loads the first hard disk's MBR
//! exactly as the BIOS would, and an INT 15h hook that answers the memory-size services from
//! Ally's filtered map (as BitVisor does). Both live in the top KiB of conventional
//! memory; the page below it holds the application processors' start-up trampoline. The BDA
//! (0040:0013), and so INT 12h, stop reporting all of it.
//!
//! Each stub ends in VMCALL at a known address; Ally accepts VMCALL only there, in real mode.

use crate::addr::PhysRange;
use core::arch::global_asm;

extern "C" {
    static ally_realmode_start: u8;
    static ally_realmode_end: u8;
    static ally_realmode_int15: u8;
    static ally_realmode_int15_vmcall: u8;
    static ally_realmode_boot_failed_vmcall: u8;
    static ally_realmode_orig_int15: u8;
}

/// Where the stubs were placed.
#[derive(Debug, Clone, Copy)]
pub struct RealModeStub {
    /// Physical address of the stolen KiB (the stub's segment base).
    pub base: u64,
    /// The stub's real-mode segment (`base >> 4`); the boot stub starts at offset 0.
    pub segment: u16,
    /// Linear address of the VMCALL in the INT 15h hook.
    pub int15_vmcall: u64,
    /// Linear address of the VMCALL the boot stub makes when the MBR cannot be loaded.
    pub boot_failed_vmcall: u64,
    /// The 4 KiB page below the stubs where application processors start (SIPI vector =
    /// page >> 12); Ally's, like the stubs.
    pub trampoline_page: u64,
    /// All conventional memory Ally took: `[trampoline_page, old top of base memory)`.
    pub taken: PhysRange,
}

/// Why the stubs could not be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealModeError {
    BadBaseMemory(u16),
}

impl core::fmt::Display for RealModeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadBaseMemory(kib) => write!(
                f,
                "the BIOS data area reports {kib} KiB of conventional memory (expected 64..=640)"
            ),
        }
    }
}

fn symbol_offset(sym: &u8) -> u64 {
    // SAFETY: only the address of the linker symbols is used.
    let start = unsafe { &ally_realmode_start } as *const u8 as u64;
    sym as *const u8 as u64 - start
}

/// The instruction the stubs leave the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// VMCALL, `0F 01 C1` (Intel; an AMD CPU raises #UD for it).
    Vmcall,
    /// VMMCALL, `0F 01 D9` (AMD; an Intel CPU raises #UD for it).
    Vmmcall,
}

impl Hypercall {
    /// The instruction's third byte (ModRM); both are `0F 01 xx`, three bytes long.
    const fn modrm(self) -> u8 {
        match self {
            Hypercall::Vmcall => 0xC1,
            Hypercall::Vmmcall => 0xD9,
        }
    }
}

/// Rewrites the hypercall at `stub` (assembled as VMCALL) into `kind`; false when the bytes
/// there are not a VMCALL.
fn patch_hypercall(stub: &mut [u8], kind: Hypercall) -> bool {
    match stub {
        [0x0F, 0x01, modrm, ..] if *modrm == Hypercall::Vmcall.modrm() => {
            *modrm = kind.modrm();
            true
        }
        _ => false,
    }
}

/// Steals 1 KiB of conventional memory, copies the stubs there, makes their hypercalls
/// `hypercall` and hooks INT 15h.
///
/// # Safety
/// Physical memory below 1 MiB must be identity-mapped and hold the BIOS's IVT and BDA, and
/// no guest may run yet.
pub unsafe fn install(hypercall: Hypercall) -> Result<RealModeStub, RealModeError> {
    const BDA_BASE_MEMORY_KIB: usize = 0x413;
    const IVT_INT15: usize = 0x15 * 4;
    // SAFETY: the caller guarantees the BDA and IVT are identity-mapped and not in use.
    unsafe {
        let kib_ptr = BDA_BASE_MEMORY_KIB as *mut u16;
        let kib = kib_ptr.read_volatile();
        if !(64..=640).contains(&kib) {
            return Err(RealModeError::BadBaseMemory(kib));
        }
        let old_top = u64::from(kib) * 1024;
        let base = old_top - 1024;
        let trampoline_page = (base & !0xFFF) - 0x1000;
        let new_kib = (trampoline_page / 1024) as u16;
        let start = &ally_realmode_start as *const u8;
        let len = (&ally_realmode_end as *const u8 as usize) - (start as usize);
        assert!(len <= 1024, "the real-mode stubs outgrew their KiB");
        core::ptr::copy_nonoverlapping(start, base as *mut u8, len);
        let segment = (base >> 4) as u16;
        let int15_vmcall = base + symbol_offset(&ally_realmode_int15_vmcall);
        let boot_failed_vmcall = base + symbol_offset(&ally_realmode_boot_failed_vmcall);
        for at in [int15_vmcall, boot_failed_vmcall] {
            let bytes = core::slice::from_raw_parts_mut(at as *mut u8, 3);
            assert!(
                patch_hypercall(bytes, hypercall),
                "the real-mode stub's hypercall is not where its symbol says"
            );
        }

        let ivt = IVT_INT15 as *mut u32;
        let original = ivt.read_volatile();
        let orig_slot = base + symbol_offset(&ally_realmode_orig_int15);
        (orig_slot as *mut u32).write_volatile(original);
        let hook_offset = symbol_offset(&ally_realmode_int15) as u32;
        ivt.write_volatile((u32::from(segment) << 16) | hook_offset);
        kib_ptr.write_volatile(new_kib);

        Ok(RealModeStub {
            base,
            segment,
            int15_vmcall,
            boot_failed_vmcall,
            trampoline_page,
            taken: PhysRange {
                start: trampoline_page,
                end: old_top,
            },
        })
    }
}

global_asm!(
    r#"
    .section .rodata.ally_realmode, "a"
    .code16
    .global ally_realmode_start
ally_realmode_start:
    /* Boot stub, entered at offset 0 with CS = the stub's segment. As the BIOS does
       (BIOS Boot Specification 1.01 §6.5.1): read LBA 0 of drive 80h to 0000:7C00,
       check the 55AA signature, jump there with DL = 80h. */
    cli
    xor ax, ax
    mov ss, ax
    mov sp, 0x7C00
    mov ds, ax
    mov es, ax
    sti
    mov si, 3                        /* tries */
1:
    mov ax, 0x0201                   /* read 1 sector */
    mov bx, 0x7C00
    mov cx, 0x0001                   /* cylinder 0, sector 1 */
    mov dx, 0x0080                   /* head 0, drive 80h */
    int 0x13
    jnc 2f
    xor ax, ax                       /* reset the drive and retry */
    mov dx, 0x0080
    int 0x13
    dec si
    jnz 1b
    mov ax, 1                        /* code 1: the read failed */
    jmp 3f
2:
    cmp word ptr [0x7DFE], 0xAA55
    je 4f
    mov ax, 2                        /* code 2: no boot signature */
3:
    .global ally_realmode_boot_failed_vmcall
ally_realmode_boot_failed_vmcall:
    vmcall
    hlt
    jmp 3b
4:
    xor ax, ax
    xor bx, bx
    xor cx, cx
    xor si, si
    xor di, di
    xor bp, bp
    mov dx, 0x0080
    .byte 0xEA                       /* jmp far 0000:7C00 */
    .word 0x7C00, 0x0000

    /* INT 15h hook: the memory-size services go to Ally, everything else to the BIOS. */
    .global ally_realmode_int15
ally_realmode_int15:
    cmp ax, 0xE820
    je 5f
    cmp ax, 0xE801
    je 5f
    cmp ah, 0x88
    je 5f
    .byte 0x2E, 0xFF, 0x2E           /* jmp far cs:[orig_int15] */
    .word ally_realmode_orig_int15 - ally_realmode_start
5:
    .global ally_realmode_int15_vmcall
ally_realmode_int15_vmcall:
    vmcall                           /* Ally fills the registers and CF in the IRET frame */
    iret

    .balign 4
    .global ally_realmode_orig_int15
ally_realmode_orig_int15:
    .long 0
    .global ally_realmode_end
ally_realmode_end:
    .code64
"#
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmcall_becomes_vmmcall_and_nothing_else_is_touched() {
        let mut bytes = [0x0F, 0x01, 0xC1, 0x90];
        assert!(patch_hypercall(&mut bytes, Hypercall::Vmmcall));
        assert_eq!(bytes, [0x0F, 0x01, 0xD9, 0x90]);
        // Patched once, it is no VMCALL any more.
        assert!(!patch_hypercall(&mut bytes, Hypercall::Vmmcall));
        let mut same = [0x0F, 0x01, 0xC1];
        assert!(patch_hypercall(&mut same, Hypercall::Vmcall));
        assert_eq!(same, [0x0F, 0x01, 0xC1]);
        assert!(!patch_hypercall(&mut [0xCD, 0x15, 0x00], Hypercall::Vmcall));
        assert!(!patch_hypercall(&mut [0x0F, 0x01], Hypercall::Vmcall));
    }
}
