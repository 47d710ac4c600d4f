//! Waking the application processors (SDM Vol. 3A 9.4, MP initialization).
//!
//! The boot CPU copies a trampoline into the page below its real-mode stubs (Ally's, absent
//! from the guest's map), fills its parameter block and sends INIT-SIPI-SIPI to one AP at a
//! time. The AP goes real mode → protected mode → long mode with Ally's page tables, takes its
//! stack and calls `ally_ap_entry` with its `ApLaunch`. It signals that it has read the block,
//! so the boot CPU can reuse it for the next AP.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    static ally_ap_trampoline_start: u8;
    static ally_ap_trampoline_end: u8;
}

/// Offsets in the trampoline's parameter block (must match the assembly below).
mod offset {
    pub const CR3: u64 = 8;
    pub const STACK: u64 = 16;
    pub const ENTRY: u64 = 24;
    pub const ARG: u64 = 32;
    pub const STARTED: u64 = 40;
    pub const GDT: u64 = 48;
    pub const GDT_POINTER_BASE: u64 = 82;
    pub const JUMP32_TARGET: u64 = 88;
    pub const PROTECTED_ENTRY: u64 = 98;
}

/// Why an application processor could not be started.
#[derive(Debug, Clone, Copy)]
pub struct ApStartTimeout {
    pub apic_id: u32,
}

/// Copies the trampoline to `page` (below 1 MiB, identity-mapped, 4 KiB-aligned).
///
/// # Safety
/// The page is Ally's and nothing else runs there.
pub unsafe fn install_trampoline(page: u64, cr3: u64, entry: u64) {
    // SAFETY: the linker symbols delimit the trampoline; the page is ours (caller).
    unsafe {
        let start = &ally_ap_trampoline_start as *const u8;
        let len = &ally_ap_trampoline_end as *const u8 as usize - start as usize;
        assert!(len <= 4096, "the AP trampoline outgrew its page");
        core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
        ((page + offset::CR3) as *mut u64).write_volatile(cr3);
        ((page + offset::ENTRY) as *mut u64).write_volatile(entry);
        // The GDT pointer and the far jump into protected mode hold linear addresses.
        ((page + offset::GDT_POINTER_BASE) as *mut u32)
            .write_unaligned((page + offset::GDT) as u32);
        ((page + offset::JUMP32_TARGET) as *mut u32)
            .write_unaligned(page as u32 + offset::PROTECTED_ENTRY as u32);
    }
}

/// Starts the AP `apic_id` with `stack_top` and `arg` and waits until it has taken them.
///
/// # Safety
/// The trampoline is installed at `page`; `arg` stays valid for the AP's lifetime.
pub unsafe fn start_ap(
    page: u64,
    apic_id: u32,
    stack_top: u64,
    arg: u64,
) -> Result<(), ApStartTimeout> {
    // SAFETY: the parameter block is in the trampoline page, identity-mapped (caller).
    let started = unsafe {
        ((page + offset::STACK) as *mut u64).write_volatile(stack_top);
        ((page + offset::ARG) as *mut u64).write_volatile(arg);
        let started = &*((page + offset::STARTED) as *const AtomicU64);
        started.store(0, Ordering::SeqCst);
        started
    };
    let apic = ally_hypervisor::arch::apic::LocalApic::current();
    apic.start_application_processor(apic_id, (page >> 12) as u8);
    for _ in 0..200_000 {
        if started.load(Ordering::SeqCst) != 0 {
            return Ok(());
        }
        ally_hypervisor::arch::apic::io_delay_us(10);
    }
    Err(ApStartTimeout { apic_id })
}

global_asm!(
    r#"
    .section .rodata.ally_ap_trampoline, "a"
    .balign 4096
    .global ally_ap_trampoline_start
ally_ap_trampoline_start:
    .code16
    jmp .Lap_real_mode
    .balign 8
    .quad 0                             /* 8: CR3 */
    .quad 0                             /* 16: stack top */
    .quad 0                             /* 24: entry */
    .quad 0                             /* 32: argument */
    .quad 0                             /* 40: started flag */
    .quad 0                             /* 48: GDT: null */
    .quad 0x00AF9A000000FFFF            /* 56: selector 0x08, 64-bit code */
    .quad 0x00CF92000000FFFF            /* 64: selector 0x10, data */
    .quad 0x00CF9A000000FFFF            /* 72: selector 0x18, 32-bit code */
.Lap_gdt_pointer:
    .short 31                           /* 80: limit (4 entries) */
    .long 0                             /* 82: base (patched) */
.Lap_far_jump:
    .byte 0x66, 0xEA                    /* 86: jmp far 0x18:protected-mode entry */
    .long 0                             /* 88: target (patched) */
    .short 0x18                         /* 92 */
    .long .Lap_long_mode - ally_ap_trampoline_start   /* 94: offset of the 64-bit code */
    /* 98: protected-mode entry, EBX = the trampoline's linear address */
    .code32
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 1 << 5                      /* PAE */
    mov cr4, eax
    mov eax, [ebx + 8]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, (1 << 8) | (1 << 11)        /* LME, NXE */
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16)       /* PG, WP */
    mov cr0, eax
    lea esp, [ebx + 4096]
    push 0x08
    mov eax, [ebx + 94]
    add eax, ebx
    push eax
    retf
    .code64
.Lap_long_mode:
    mov ebx, ebx                        /* upper halves are undefined after the switch */
    mov rsp, [rbx + 16]
    mov rdi, [rbx + 32]
    mov rax, [rbx + 24]
    lock inc qword ptr [rbx + 40]
    call rax
.Lap_halt:
    cli
    hlt
    jmp .Lap_halt

    .code16
.Lap_real_mode:
    cli
    cld
    mov ax, cs
    mov ds, ax
    xor ebx, ebx
    mov bx, ax
    shl ebx, 4
    lgdt [80]                           /* .Lap_gdt_pointer */
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp .Lap_far_jump
    .global ally_ap_trampoline_end
ally_ap_trampoline_end:
    .code64
"#
);
