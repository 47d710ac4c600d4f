//! Entering the guest and coming back: VMLAUNCH, the VM-exit trampoline and VMRESUME.
//!
//! On every VM exit the CPU loads RSP from the VMCS host-RSP field: the top of this CPU's exit
//! stack, where `Vcpu::activate` stored a pointer to the CPU's `Vcpu` (SDM Vol. 3C 28.5.1).
//! The trampoline saves the guest's GPRs in `GuestRegisters` order, calls
//! `ally_handle_vmexit(regs, vcpu)`, restores them and executes VMRESUME.

use crate::guest::state::GuestRegisters;
use core::arch::global_asm;

extern "C" {
    /// Loads the guest GPRs from `regs` and executes VMLAUNCH. Returns only when VMLAUNCH
    /// fails, with RFLAGS (CF: VMfailInvalid; ZF: VMfailValid, see the VM-instruction error).
    fn ally_vmlaunch(regs: *const GuestRegisters) -> u64;
    /// The host RIP of every VM exit.
    pub fn ally_vmexit_entry();
}

/// Executes VMLAUNCH with `regs` in the guest's GPRs; returns the failing RFLAGS.
///
/// # Safety
/// A fully initialised, current VMCS whose host state points at `ally_vmexit_entry` and a valid
/// exit stack.
pub unsafe fn vmlaunch(regs: &GuestRegisters) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { ally_vmlaunch(regs) }
}

global_asm!(
    r#"
    .section .text.ally_vmx, "ax"
    .global ally_vmlaunch
ally_vmlaunch:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov rax, [rdi + 0]
    mov rcx, [rdi + 8]
    mov rdx, [rdi + 16]
    mov rbx, [rdi + 24]
    mov rbp, [rdi + 40]
    mov rsi, [rdi + 48]
    mov r8,  [rdi + 64]
    mov r9,  [rdi + 72]
    mov r10, [rdi + 80]
    mov r11, [rdi + 88]
    mov r12, [rdi + 96]
    mov r13, [rdi + 104]
    mov r14, [rdi + 112]
    mov r15, [rdi + 120]
    mov rdi, [rdi + 56]
    vmlaunch
    pushfq
    pop rax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

    .global ally_vmexit_entry
ally_vmexit_entry:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rdi
    push rsi
    push rbp
    push rax                /* RSP placeholder: the guest RSP lives in the VMCS */
    push rbx
    push rdx
    push rcx
    push rax
    mov rdi, rsp
    mov rsi, [rsp + 128]    /* the Vcpu pointer stored at the top of the exit stack */
    call ally_handle_vmexit
    pop rax
    pop rcx
    pop rdx
    pop rbx
    add rsp, 8
    pop rbp
    pop rsi
    pop rdi
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    vmresume
    /* VMRESUME failed: report it (never returns). */
    pushfq
    pop rdi
    and rsp, -16
    call ally_vmresume_failed
    ud2
"#
);
