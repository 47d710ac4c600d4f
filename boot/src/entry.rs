//! The multiboot2 header and the 32-bit entry that brings the boot CPU to long mode.
//!
//! GRUB enters `ally_start32` in 32-bit protected mode with paging off, EAX = the multiboot2
//! magic and EBX = the physical address of the boot information (Multiboot2 spec §3.3). The
//! entry builds temporary page tables that identity-map the first 4 GiB and map the higher
//! half (`KERNEL_VMA`) onto the first 1 GiB, enables long mode and calls `ally_main` on the
//! boot stack. Everything here lives in `.boot`, at its physical address.

use core::arch::global_asm;

/// Where the image is linked in the higher half; physical = virtual - KERNEL_VMA.
pub const KERNEL_VMA: u64 = 0xFFFF_FFFF_8000_0000;
/// Size of the boot CPU's stack (in .bss, so it moves with the image). `start` builds the
/// `Platform` (the PCI and I/O APIC guards' tables) on it: 64 KiB overflowed into the heap
/// allocator's state once the I/O APIC guards kept the firmware's entries.
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

#[repr(C, align(16))]
pub struct Stack(pub [u8; BOOT_STACK_SIZE]);

/// The boot CPU's stack; later also its VM-exit stack.
#[no_mangle]
pub static mut BOOT_STACK: Stack = Stack([0; BOOT_STACK_SIZE]);

global_asm!(
    r#"
    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long 0xE85250D6                 /* magic */
    .long 0                          /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header_start
    .long -(0xE85250D6 + 0 + (mb2_header_end - mb2_header_start))
    /* end tag */
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .boot.data, "aw"
    .balign 4096
boot_pml4:      .fill 512, 8, 0
boot_pdpt_low:  .fill 512, 8, 0
boot_pdpt_high: .fill 512, 8, 0
boot_pd:        .fill 2048, 8, 0     /* four page directories: 0-4 GiB in 2 MiB pages */
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF         /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF         /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
boot_magic: .long 0
boot_info:  .long 0
boot_early_stack: .fill 1024, 1, 0
boot_early_stack_top:

    .section .boot.text, "ax"
    .code32
    .global ally_start32
ally_start32:
    cli
    cld
    mov [boot_magic], eax
    mov [boot_info], ebx
    lea esp, [boot_early_stack_top]

    /* Long mode available? (CPUID.80000001H:EDX.LM[bit 29]) */
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    bt edx, 29
    jnc no_long_mode

    /* Identity map 0-4 GiB with 2 MiB pages: PD entries = addr | PS | RW | P. */
    lea edi, [boot_pd]
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [edi + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov [edi + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jne 1b

    /* PDPT low: four PDs. */
    lea eax, [boot_pd]
    or eax, 3
    mov [boot_pdpt_low], eax
    add eax, 4096
    mov [boot_pdpt_low + 8], eax
    add eax, 4096
    mov [boot_pdpt_low + 16], eax
    add eax, 4096
    mov [boot_pdpt_low + 24], eax
    /* PDPT high, entry 510 (0xFFFFFFFF80000000): the first PD, i.e. physical 0-1 GiB. */
    lea eax, [boot_pd]
    or eax, 3
    mov [boot_pdpt_high + 510 * 8], eax
    /* PML4: entry 0 low, entry 511 high. */
    lea eax, [boot_pdpt_low]
    or eax, 3
    mov [boot_pml4], eax
    lea eax, [boot_pdpt_high]
    or eax, 3
    mov [boot_pml4 + 511 * 8], eax

    /* CR4.PAE, CR3, EFER.LME|NXE, CR0.PG|WP|PE. */
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    lea eax, [boot_pml4]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, (1 << 8) | (1 << 11)
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    push 0x08
    lea eax, [long_mode_entry]
    push eax
    retf

no_long_mode:
    /* Say so on COM2 (Ally's log port) and stop. */
    lea esi, [no_lm_msg]
2:
    mov al, [esi]
    test al, al
    jz 3f
    mov dx, 0x2F8
    out dx, al
    inc esi
    jmp 2b
3:
    hlt
    jmp 3b
no_lm_msg: .asciz "ALLY fatal reason=cpu-has-no-long-mode\r\n"

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    movabs rsp, offset {stack} + {stack_size}
    mov edi, [boot_magic]
    mov esi, [boot_info]
    movabs rax, offset {main}
    call rax
4:
    hlt
    jmp 4b
"#,
    stack = sym BOOT_STACK,
    stack_size = const BOOT_STACK_SIZE,
    main = sym crate::ally_main,
);
