//! Every privileged instruction Ally executes, as small `unsafe fn`s.
//!
//! Nothing else in Ally uses inline assembly for privileged work (the entry stubs in `boot/`
//! and the VM-exit trampoline in `vmx::launch` excepted), so a reviewer can audit the whole
//! privileged surface here.

use core::arch::asm;

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP) and Ally must run at CPL 0.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists and we are at CPL 0.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and accept `value`; writing it must not break Ally's own invariants.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 has no side effects; Ally runs at CPL 0.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// The value must keep paging, protection and Ally's mappings valid.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// Reads CR3.
pub fn read_cr3() -> u64 {
    let v;
    // SAFETY: reading CR3 has no side effects; Ally runs at CPL 0.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let v;
    // SAFETY: reading CR4 has no side effects; Ally runs at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR4.
///
/// # Safety
/// The value must be supported by the CPU and keep Ally's paging mode.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}

/// Copies `len` bytes from `src` to `dst` and then loads CR3 with `new_cr3`, touching no
/// memory in between (no stack use): the relocation step of `boot/src/relocate.rs`.
///
/// # Safety
/// Both ranges must be mapped, must not overlap, and `new_cr3` must map the code, stack and
/// data being executed at the same virtual addresses onto the copy.
pub unsafe fn copy_then_load_cr3(src: u64, dst: u64, len: u64, new_cr3: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("rep movsb", "mov cr3, {cr3}",
             inout("rsi") src => _, inout("rdi") dst => _, inout("rcx") len => _,
             cr3 = in(reg) new_cr3, options(nostack))
    };
}

/// Copies `len` bytes of physical memory from `src` to `dst` through Ally's identity map
/// (`rep movsb`), where either may be address 0, which Rust's copy functions may not touch.
///
/// # Safety
/// Both ranges must be identity-mapped memory, must not overlap, and nothing may rely on
/// `dst`'s old contents.
pub unsafe fn copy_physical(src: u64, dst: u64, len: u64) {
    // SAFETY: guaranteed by the caller; the direction flag is clear (System V ABI).
    unsafe {
        asm!("rep movsb",
             inout("rsi") src => _, inout("rdi") dst => _, inout("rcx") len => _,
             options(nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Reading the port must have no side effect that breaks a device Ally or the guest relies on.
pub unsafe fn inb(port: u16) -> u8 {
    let v;
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// The write must not break a device Ally or the guest relies on.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// Reads a 16-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    let v;
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) };
    v
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

/// Reads a 32-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v;
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

/// Sets XCR0 (XSETBV with ECX = 0).
///
/// # Safety
/// CR4.OSXSAVE must be set and `value` must be a valid XCR0 for this CPU (else #GP).
pub unsafe fn xsetbv0(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack))
    };
}

/// The time stamp counter (RDTSC; not serializing: it may read a little early).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions in ring 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes back and invalidates all caches (also Ally's emulation of the guest's INVD).
pub fn wbinvd() {
    // SAFETY: WBINVD only flushes caches; it cannot break memory safety at CPL 0.
    unsafe { asm!("wbinvd", options(nostack)) };
}

/// Loads the GDT register.
///
/// # Safety
/// `pointer` must describe a valid GDT that outlives its use, with Ally's current selectors.
pub unsafe fn lgdt(pointer: &DescriptorTablePointer) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("lgdt [{}]", in(reg) pointer, options(readonly, nostack)) };
}

/// Loads the IDT register.
///
/// # Safety
/// `pointer` must describe a valid IDT that stays alive while interrupts can occur.
pub unsafe fn lidt(pointer: &DescriptorTablePointer) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("lidt [{}]", in(reg) pointer, options(readonly, nostack)) };
}

/// Loads the task register.
///
/// # Safety
/// `selector` must name an available 64-bit TSS descriptor in the current GDT.
pub unsafe fn ltr(selector: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("ltr {0:x}", in(reg) selector, options(nostack)) };
}

/// Reloads CS with `code` and DS/ES/SS with `data` (FS/GS get the null selector).
///
/// # Safety
/// Both selectors must be valid 64-bit code / data descriptors in the current GDT.
pub unsafe fn reload_segments(code: u16, data: u16) {
    // SAFETY: guaranteed by the caller; the far return lands on the next instruction.
    unsafe {
        asm!(
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            code = in(reg) u64::from(code),
            data = in(reg) data,
            tmp = out(reg) _,
        )
    };
}

/// Stores the GDT register.
pub fn sgdt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: SGDT only writes the 10-byte pointer we provide.
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack)) };
    p
}

/// Stores the IDT register.
pub fn sidt() -> DescriptorTablePointer {
    let mut p = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: SIDT only writes the 10-byte pointer we provide.
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack)) };
    p
}

/// Reads the current segment selectors (cs, ss, ds, es, fs, gs, tr).
pub fn segment_selectors() -> [u16; 7] {
    let (cs, ss, ds, es, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: reading segment registers and STR has no side effects.
    unsafe {
        asm!("mov {0:x}, cs", "mov {1:x}, ss", "mov {2:x}, ds", "mov {3:x}, es",
             "mov {4:x}, fs", "mov {5:x}, gs", "str {6:x}",
             out(reg) cs, out(reg) ss, out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs,
             out(reg) tr, options(nomem, nostack))
    };
    [cs, ss, ds, es, fs, gs, tr]
}

/// Enables interrupts and halts until one arrives (the STI shadow covers HLT, so an interrupt
/// pending at the STI still ends the halt), then disables them again.
///
/// # Safety
/// Ring 0 with an IDT that handles every interrupt that can arrive.
pub unsafe fn wait_for_interrupt() {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Whether this CPU has MONITOR/MWAIT (CPUID.01H:ECX[3]).
pub fn has_monitor_mwait() -> bool {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_monitor_mwait())
}

/// Arms address monitoring on the cache line of `line` (MONITOR, SDM Vol. 2B).
///
/// # Safety
/// Ring 0 on a CPU with CPUID.01H:ECX.MONITOR[bit 3]; `line` is mapped.
pub unsafe fn monitor(line: *const u8) {
    // SAFETY: guaranteed by the caller; ECX/EDX = 0 (no extensions or hints).
    unsafe { asm!("monitor", in("rax") line, in("ecx") 0, in("edx") 0, options(nostack)) };
}

/// Enables interrupts and waits (MWAIT) until the monitored line is written or an interrupt
/// arrives (the STI shadow covers MWAIT), then disables interrupts again.
///
/// # Safety
/// As for [`monitor`], after arming it; the IDT handles every interrupt that can arrive.
pub unsafe fn wait_for_write_or_interrupt() {
    // SAFETY: guaranteed by the caller; EAX = 0 (C1 hint), ECX = 0.
    unsafe { asm!("sti", "mwait", "cli", in("eax") 0, in("ecx") 0, options(nostack)) };
}

/// Halts this CPU forever with interrupts disabled.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting stops only this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Opens an interrupt window of one instruction, so that interrupts already pending at the
/// local APIC are taken now (by Ally's IDT) rather than later.
///
/// # Safety
/// Ally's IDT must handle every interrupt that can be pending on this CPU.
pub unsafe fn take_pending_interrupts() {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// The 10-byte operand of LGDT/LIDT/SGDT/SIDT.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}
const _: () = assert!(core::mem::size_of::<DescriptorTablePointer>() == 10);

pub use vmx_instructions::*;

/// VMX instructions (SDM Vol. 3C ch. 31), through the `x86` crate's encodings.
mod vmx_instructions {
    use core::arch::asm;

    /// Enters VMX root operation with the VMXON region at `phys`.
    ///
    /// # Safety
    /// CR4.VMXE is set, the CR0/CR4 fixed bits are honoured, IA32_FEATURE_CONTROL allows VMXON
    /// and `phys` is a 4 KiB-aligned page holding the VMCS revision identifier.
    pub unsafe fn vmxon(phys: u64) -> Result<(), x86::vmx::VmFail> {
        // SAFETY: guaranteed by the caller.
        unsafe { x86::bits64::vmx::vmxon(phys) }
    }

    /// Clears the VMCS at `phys` (SDM 31.3 VMCLEAR).
    ///
    /// # Safety
    /// In VMX root operation; `phys` is a VMCS region owned by Ally.
    pub unsafe fn vmclear(phys: u64) -> Result<(), x86::vmx::VmFail> {
        // SAFETY: guaranteed by the caller.
        unsafe { x86::bits64::vmx::vmclear(phys) }
    }

    /// Makes the VMCS at `phys` current (SDM 31.3 VMPTRLD).
    ///
    /// # Safety
    /// In VMX root operation; `phys` is a cleared VMCS region owned by Ally.
    pub unsafe fn vmptrld(phys: u64) -> Result<(), x86::vmx::VmFail> {
        // SAFETY: guaranteed by the caller.
        unsafe { x86::bits64::vmx::vmptrld(phys) }
    }

    /// Reads a field of the current VMCS; 0 if the field does not exist (the VMREAD fails).
    pub fn vmread(field: u32) -> u64 {
        // SAFETY: VMREAD has no side effect besides RFLAGS; in VMX root with a current VMCS
        // (all callers run after `Vcpu::activate`), a failure is reported, not a fault.
        unsafe { x86::bits64::vmx::vmread(field).unwrap_or(0) }
    }

    /// Writes a field of the current VMCS.
    ///
    /// # Safety
    /// In VMX root with a current VMCS; the value must keep the guest/host state Ally relies on.
    pub unsafe fn vmwrite(field: u32, value: u64) -> Result<(), u32> {
        // SAFETY: guaranteed by the caller.
        unsafe { x86::bits64::vmx::vmwrite(field, value).map_err(|_| field) }
    }

    /// Invalidates EPT-derived translations for all contexts (INVEPT type 2).
    ///
    /// # Safety
    /// In VMX root operation on a CPU that supports INVEPT all-context.
    pub unsafe fn invept_all() {
        let descriptor = [0u64; 2];
        // SAFETY: guaranteed by the caller; the descriptor is a valid 16-byte operand.
        unsafe {
            asm!("invept {}, [{}]", in(reg) 2u64, in(reg) &descriptor, options(nostack));
        }
    }

    /// Invalidates linear translations tagged with `vpid` (INVVPID single-context, type 1).
    ///
    /// # Safety
    /// In VMX root operation on a CPU that supports INVVPID single-context; `vpid` != 0.
    pub unsafe fn invvpid_single(vpid: u16) {
        let descriptor = [u64::from(vpid), 0u64];
        // SAFETY: guaranteed by the caller; the descriptor is a valid 16-byte operand.
        unsafe {
            asm!("invvpid {}, [{}]", in(reg) 1u64, in(reg) &descriptor, options(nostack));
        }
    }
}

/// AMD SVM instructions (APM Vol. 2 ch. 15, instruction pages in APM Vol. 3). VMRUN itself
/// is only executed by the trampoline in `arch::svm::launch`, which must keep it next to the
/// register switch.
pub mod svm {
    use core::arch::asm;

    /// Loads FS, GS, TR and LDTR (with their hidden state), KernelGsBase, STAR, LSTAR, CSTAR,
    /// SFMASK and SYSENTER_CS/ESP/EIP from the VMCB at physical address `vmcb_pa` (APM 15.5.2,
    /// VMLOAD).
    ///
    /// # Safety
    /// EFER.SVME is set, at CPL 0; `vmcb_pa` is a 4 KiB-aligned page holding a state-save area
    /// whose values are valid for this CPU (else #GP, or a host running on bad segments). The
    /// host's FS/GS/TR/SYSCALL state is replaced: the caller must restore it (see `vmsave`)
    /// before anything relies on it, and no interrupt or NMI may arrive meanwhile (GIF = 0).
    pub unsafe fn vmload(vmcb_pa: u64) {
        // SAFETY: guaranteed by the caller; VMLOAD takes the physical address in RAX.
        unsafe { asm!("vmload rax", in("rax") vmcb_pa, options(nostack, preserves_flags)) };
    }

    /// Stores FS, GS, TR, LDTR, KernelGsBase, STAR, LSTAR, CSTAR, SFMASK and
    /// SYSENTER_CS/ESP/EIP into the VMCB at physical address `vmcb_pa` (APM 15.5.2, VMSAVE).
    ///
    /// # Safety
    /// EFER.SVME is set, at CPL 0; `vmcb_pa` is a 4 KiB-aligned page Ally owns (the CPU writes
    /// it through its physical address, outside Rust's view of memory).
    pub unsafe fn vmsave(vmcb_pa: u64) {
        // SAFETY: guaranteed by the caller; VMSAVE takes the physical address in RAX.
        unsafe { asm!("vmsave rax", in("rax") vmcb_pa, options(nostack, preserves_flags)) };
    }

    /// Sets the global interrupt flag (APM 15.17, STGI): held NMIs, SMIs, INITs and (with
    /// RFLAGS.IF) interrupts may be taken from here on.
    ///
    /// # Safety
    /// EFER.SVME is set (or SKINIT is supported), at CPL 0; the host's FS/GS/TR state is its own
    /// again and its IDT handles whatever arrives.
    pub unsafe fn stgi() {
        // SAFETY: guaranteed by the caller.
        unsafe { asm!("stgi", options(nomem, nostack, preserves_flags)) };
    }

    /// Clears the global interrupt flag (APM 15.17, CLGI): interrupts, NMIs, SMIs and INITs are
    /// held until STGI or VMRUN.
    ///
    /// # Safety
    /// EFER.SVME is set, at CPL 0. While GIF = 0 nothing is delivered: the caller sets it again
    /// (STGI, or VMRUN into the guest) in bounded time.
    pub unsafe fn clgi() {
        // SAFETY: guaranteed by the caller.
        unsafe { asm!("clgi", options(nomem, nostack, preserves_flags)) };
    }

    /// Invalidates the TLB mapping of the virtual page `addr` for address space `asid`
    /// (APM 15.16.2, INVLPGA: address in RAX, ASID in ECX).
    ///
    /// # Safety
    /// EFER.SVME is set, at CPL 0. With ASID 0 it drops a host translation, so `addr` must not
    /// be one Ally depends on being cached (it is refetched from the page tables).
    pub unsafe fn invlpga(addr: u64, asid: u32) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            asm!("invlpga rax, ecx", in("rax") addr, in("ecx") asid,
                 options(nostack, preserves_flags))
        };
    }
}
