//! Ally's own GDT, TSS and IDT (one set per CPU). Exceptions in Ally are bugs or broken
//! hardware: each handler prints the CPU state on COM2 and halts that CPU.

use super::instructions::{self, DescriptorTablePointer};
use core::arch::global_asm;
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

/// Kernel code selector (64-bit).
pub const CODE_SELECTOR: u16 = 0x08;
/// Kernel data selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task-state segment selector (VMX requires a non-null host TR, SDM 26.2.3).
pub const TSS_SELECTOR: u16 = 0x18;

/// 64-bit task-state segment (SDM Vol. 3A 8.7).
#[repr(C, packed(4))]
pub struct TaskStateSegment {
    reserved0: u32,
    pub rsp: [u64; 3],
    reserved1: u64,
    pub ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    pub iomap_base: u16,
}
const _: () = assert!(size_of::<TaskStateSegment>() == 104);

/// One interrupt gate (SDM Vol. 3A 6.14.1).
#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(size_of::<IdtEntry>() == 16);

impl IdtEntry {
    /// A present, DPL 0, 64-bit interrupt gate (SDM Vol. 3A 6.14.1).
    fn gate(handler: u64, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The vector of the local APIC timer that wakes idle DPI cores.
pub const TIMER_VECTOR: u8 = 0xF0;

/// NMIs taken in VMX root operation (on DPI cores, or on an OS core during an exit).
pub static NMI_COUNT: AtomicU64 = AtomicU64::new(0);
/// Timer interrupts taken by idle DPI cores.
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Interrupts on vectors Ally does not use (taken in VMX root, e.g. a guest's fixed IPI
/// rewritten from a broadcast while an OS core still waits for its SIPI): acknowledged and
/// dropped, as a CPU in wait-for-SIPI does not take them either.
pub static STRAY_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// The spurious-interrupt vector Ally programs while it uses a local APIC.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

#[no_mangle]
extern "C" fn ally_nmi_interrupt() {
    NMI_COUNT.fetch_add(1, Ordering::Relaxed);
}

#[no_mangle]
extern "C" fn ally_timer_interrupt() {
    TIMER_TICKS.fetch_add(1, Ordering::Relaxed);
    super::apic::LocalApic::current().eoi();
}

#[no_mangle]
extern "C" fn ally_stray_interrupt() {
    STRAY_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    super::apic::LocalApic::current().eoi();
}

/// A spurious interrupt sets no in-service bit: no EOI (SDM Vol. 3A 12.9).
#[no_mangle]
extern "C" fn ally_spurious_interrupt() {
    STRAY_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
}

const EMERGENCY_STACK_SIZE: usize = 16 * 1024;

/// A CPU's descriptor tables and its emergency stack (IST1, used for #DF and NMI).
#[repr(C, align(16))]
pub struct CpuTables {
    gdt: [u64; 5],
    tss: TaskStateSegment,
    idt: [IdtEntry; 256],
    emergency_stack: [u8; EMERGENCY_STACK_SIZE],
}

impl CpuTables {
    pub const fn new() -> Self {
        Self {
            gdt: [0; 5],
            tss: TaskStateSegment {
                reserved0: 0,
                rsp: [0; 3],
                reserved1: 0,
                ist: [0; 7],
                reserved2: 0,
                reserved3: 0,
                iomap_base: size_of::<TaskStateSegment>() as u16,
            },
            idt: [IdtEntry {
                offset_low: 0,
                selector: 0,
                ist: 0,
                type_attr: 0,
                offset_mid: 0,
                offset_high: 0,
                reserved: 0,
            }; 256],
            emergency_stack: [0; EMERGENCY_STACK_SIZE],
        }
    }

    /// Fills the tables and loads GDTR, CS/DS/SS, TR and IDTR on this CPU.
    ///
    /// # Safety
    /// `self` must live for as long as the CPU runs Ally (a `static`), and be used by one CPU.
    pub unsafe fn load(&'static mut self) {
        self.gdt[1] = 0x00AF_9A00_0000_FFFF; // 64-bit code, DPL 0
        self.gdt[2] = 0x00CF_9200_0000_FFFF; // data, DPL 0
        let tss_base = &self.tss as *const TaskStateSegment as u64;
        let tss_limit = (size_of::<TaskStateSegment>() - 1) as u64;
        // Available 64-bit TSS (type 9), present (SDM Vol. 3A 8.2.3, 16-byte descriptor).
        self.gdt[3] = (tss_limit & 0xFFFF)
            | ((tss_base & 0xFF_FFFF) << 16)
            | (0x89 << 40)
            | (((tss_base >> 24) & 0xFF) << 56);
        self.gdt[4] = tss_base >> 32;
        let stack_top = self.emergency_stack.as_ptr() as u64 + EMERGENCY_STACK_SIZE as u64;
        self.tss.ist[0] = stack_top & !0xF;
        self.tss.iomap_base = size_of::<TaskStateSegment>() as u16;

        // SAFETY: the linker places `ally_isr_table` (32 stub addresses) in .rodata.
        let stubs = unsafe { &ally_isr_table };
        for (vector, handler) in stubs.iter().enumerate() {
            // #DF (8) runs on the emergency stack.
            self.idt[vector] = IdtEntry::gate(*handler, if vector == 8 { 1 } else { 0 });
        }
        // An NMI (e.g. an OS core's broadcast) is counted and survived, on the emergency stack.
        self.idt[2] = IdtEntry::gate(ally_nmi_isr as *const () as u64, 1);
        // Every external-interrupt vector is survived: Ally's timer, the spurious vector, and
        // any other (stray) one, acknowledged and dropped.
        for vector in 32..256 {
            self.idt[vector] = IdtEntry::gate(ally_stray_isr as *const () as u64, 0);
        }
        self.idt[usize::from(SPURIOUS_VECTOR)] =
            IdtEntry::gate(ally_spurious_isr as *const () as u64, 0);
        self.idt[usize::from(TIMER_VECTOR)] = IdtEntry::gate(ally_timer_isr as *const () as u64, 0);

        let gdt_ptr = DescriptorTablePointer {
            limit: (size_of::<[u64; 5]>() - 1) as u16,
            base: self.gdt.as_ptr() as u64,
        };
        let idt_ptr = DescriptorTablePointer {
            limit: (size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: self.idt.as_ptr() as u64,
        };
        // SAFETY: the tables are 'static and well-formed; the selectors match the GDT above.
        unsafe {
            instructions::lgdt(&gdt_ptr);
            instructions::reload_segments(CODE_SELECTOR, DATA_SELECTOR);
            instructions::ltr(TSS_SELECTOR);
            instructions::lidt(&idt_ptr);
        }
    }

    /// Base address of this CPU's TSS (the VMCS host TR base).
    pub fn tss_base(&self) -> u64 {
        &self.tss as *const TaskStateSegment as u64
    }
}

impl Default for CpuTables {
    fn default() -> Self {
        Self::new()
    }
}

extern "C" {
    static ally_isr_table: [u64; 32];
    fn ally_nmi_isr();
    fn ally_timer_isr();
    fn ally_stray_isr();
    fn ally_spurious_isr();
}

/// What the exception stubs push, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

#[no_mangle]
extern "C" fn ally_exception_handler(frame: &ExceptionFrame) -> ! {
    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("unknown");
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    super::logger::emergency_write(format_args!(
        "\nALLY fatal reason=exception cpu={} vector={} ({}) error={:#x}\n\
         rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x}\n\
         rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n\
         r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}\n",
        super::logger::cpu_id(),
        frame.vector,
        name,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        instructions::read_cr0(),
        cr2,
        instructions::read_cr3(),
        instructions::read_cr4(),
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15,
    ));
    instructions::halt_forever()
}

global_asm!(
    r#"
    .section .text.ally_isr, "ax"
    .macro ALLY_ISR_NOERR n
ally_isr_\n:
    push 0
    push \n
    jmp ally_isr_common
    .endm
    .macro ALLY_ISR_ERR n
ally_isr_\n:
    push \n
    jmp ally_isr_common
    .endm

    ALLY_ISR_NOERR 0
    ALLY_ISR_NOERR 1
    ALLY_ISR_NOERR 2
    ALLY_ISR_NOERR 3
    ALLY_ISR_NOERR 4
    ALLY_ISR_NOERR 5
    ALLY_ISR_NOERR 6
    ALLY_ISR_NOERR 7
    ALLY_ISR_ERR 8
    ALLY_ISR_NOERR 9
    ALLY_ISR_ERR 10
    ALLY_ISR_ERR 11
    ALLY_ISR_ERR 12
    ALLY_ISR_ERR 13
    ALLY_ISR_ERR 14
    ALLY_ISR_NOERR 15
    ALLY_ISR_NOERR 16
    ALLY_ISR_ERR 17
    ALLY_ISR_NOERR 18
    ALLY_ISR_NOERR 19
    ALLY_ISR_NOERR 20
    ALLY_ISR_ERR 21
    ALLY_ISR_NOERR 22
    ALLY_ISR_NOERR 23
    ALLY_ISR_NOERR 24
    ALLY_ISR_NOERR 25
    ALLY_ISR_NOERR 26
    ALLY_ISR_NOERR 27
    ALLY_ISR_NOERR 28
    ALLY_ISR_ERR 29
    ALLY_ISR_ERR 30
    ALLY_ISR_NOERR 31

ally_isr_common:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call ally_exception_handler
    ud2

    /* Interrupts Ally survives: save the caller-saved registers, call Rust, return. */
    .macro ALLY_ISR_CALL name, handler
    .global \name
\name:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    call \handler
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq
    .endm
    ALLY_ISR_CALL ally_nmi_isr, ally_nmi_interrupt
    ALLY_ISR_CALL ally_timer_isr, ally_timer_interrupt
    ALLY_ISR_CALL ally_stray_isr, ally_stray_interrupt
    ALLY_ISR_CALL ally_spurious_isr, ally_spurious_interrupt

    .section .rodata.ally_isr_table, "a"
    .balign 8
    .global ally_isr_table
ally_isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad ally_isr_\n
    .endr
"#
);
