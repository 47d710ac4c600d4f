//! Entering the guest and coming back under SVM: one call of [`run_guest`] is one VMRUN and
//! the #VMEXIT that ends it. Unlike VMX there is no separate exit entry point: #VMEXIT
//! resumes the host at the instruction after VMRUN (APM Vol. 2 15.5.2), so the caller loops:
//! `run_guest`, handle the exit, `run_guest` again.
//!
//! The sequence (`ally_svm_run` below):
//!
//! 1. push the host's callee-saved registers (RBX, RBP, R12-R15; the System V ABI), the
//!    `regs` pointer, the host save-area address and the guest VMCB address;
//! 2. CLGI: from here until the host state is back, no interrupt, NMI, SMI or INIT may be
//!    taken (APM 15.17). Step 3 puts the guest's TR (and so its TSS and IST stacks) and GS
//!    base in the CPU, where a host NMI handler would run on them;
//! 3. VMLOAD of the guest VMCB: the guest's FS, GS, TR, LDTR (with hidden state),
//!    KernelGsBase, STAR, LSTAR, CSTAR, SFMASK and SYSENTER_CS/ESP/EIP (APM 15.5.2);
//! 4. the guest's GPRs from `regs`, except RAX and RSP, which VMRUN loads from the VMCB's
//!    state-save area (APM 15.5.1);
//! 5. VMRUN with RAX = the guest VMCB's physical address. It saves part of the host state into
//!    the VM_HSAVE_PA page (CS, RIP, RSP, RAX, RFLAGS, CR0/CR3/CR4, EFER, GDTR/IDTR, ES/SS/DS;
//!    APM 15.5.1), loads the guest's and sets GIF. The host's FS, GS, TR, LDTR and the MSRs of
//!    step 3 are *not* saved by VMRUN: hence the VMSAVE/VMLOAD pair around it;
//! 6. #VMEXIT (APM 15.6): the CPU stores the guest state into the VMCB, reloads the host's
//!    from VM_HSAVE_PA (RAX, RSP and RIP included) and clears GIF. The GPRs other than RAX and
//!    RSP still hold the guest's values: they are stored into `regs` (RAX serves as scratch);
//! 7. VMSAVE of the guest VMCB (the guest's FS/GS/TR/... of step 3 as the guest left them),
//!    then VMLOAD of `host_vmcb_pa`, the page the caller filled with VMSAVE before the first
//!    run: Ally's own FS, GS, TR, LDTR and SYSCALL/SYSENTER MSRs are back;
//! 8. the callee-saved registers are restored and the call returns.
//!
//! GIF stays 0 on return: the exit handler runs with GIF = 0 (and RFLAGS.IF = 0, as all of
//! Ally's host code), so NMIs and SMIs are held until the next VMRUN sets GIF again, or until
//! the caller executes `instructions::svm::stgi` to take them in the host. The guest's RAX,
//! RSP, RIP, RFLAGS, control registers and the segments not named in step 3 live in the VMCB:
//! the handler reads and writes them there (copying RAX into `regs.rax` when it wants one
//! register file). DR0-DR3, XCR0 and the FPU/SSE state are not switched here.

use crate::guest::state::GuestRegisters;
use core::arch::global_asm;

extern "C" {
    fn ally_svm_run(vmcb_pa: u64, host_vmcb_pa: u64, regs: *mut GuestRegisters);
}

/// Runs the guest once: VMLOAD, VMRUN, (#VMEXIT), VMSAVE, VMLOAD of the host (see the module
/// documentation for the exact sequence, after APM Vol. 2 15.5.1-15.5.2 and 15.6). Returns
/// after the #VMEXIT with the guest's GPRs (but RAX and RSP, which are in the VMCB) in `regs`,
/// the exit code in the VMCB, and GIF = 0.
///
/// # Safety
/// EFER.SVME is set and VM_HSAVE_PA points at a host-save page
/// (`SvmCapabilities::enable`); RFLAGS.IF is clear. `vmcb_pa` is the 4 KiB-aligned physical
/// address of a VMCB Ally owns whose state passes VMRUN's consistency checks (APM 15.5.1; a
/// failure is reported as VMEXIT_INVALID in the VMCB, not as a fault) and whose intercepts
/// keep the host safe (VMRUN must be intercepted). `host_vmcb_pa` is another 4 KiB page,
/// filled by `instructions::svm::vmsave` on this CPU after Ally loaded its own GDT, TSS,
/// FS/GS bases and SYSCALL MSRs. Both pages are identity-mapped (`regs` is reached through its
/// virtual address while the host's CR3 is loaded).
pub unsafe fn run_guest(vmcb_pa: u64, host_vmcb_pa: u64, regs: &mut GuestRegisters) {
    // SAFETY: guaranteed by the caller; the trampoline preserves every callee-saved register
    // and RSP, and writes only `regs` (besides the two VMCBs the CPU writes).
    unsafe { ally_svm_run(vmcb_pa, host_vmcb_pa, regs) }
}

// GuestRegisters offsets: rax 0, rcx 8, rdx 16, rbx 24, rsp 32, rbp 40, rsi 48, rdi 56,
// r8 64 ... r15 120 (crate::guest::state).
global_asm!(
    r#"
    .section .text.ally_svm, "ax"
    .global ally_svm_run
ally_svm_run:
    /* rdi = guest VMCB pa, rsi = host save-area pa, rdx = regs */
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdx                /* [rsp + 16] after the next two pushes: regs */
    push rsi                /* [rsp + 8]: host save area */
    push rdi                /* [rsp + 0]: guest VMCB */
    clgi
    mov rax, rdi
    vmload rax
    mov rcx, [rdx + 8]
    mov rbx, [rdx + 24]
    mov rbp, [rdx + 40]
    mov rsi, [rdx + 48]
    mov rdi, [rdx + 56]
    mov r8,  [rdx + 64]
    mov r9,  [rdx + 72]
    mov r10, [rdx + 80]
    mov r11, [rdx + 88]
    mov r12, [rdx + 96]
    mov r13, [rdx + 104]
    mov r14, [rdx + 112]
    mov r15, [rdx + 120]
    mov rdx, [rdx + 16]
    vmrun rax
    /* #VMEXIT: RSP and RAX are the host's again, the other GPRs the guest's. */
    mov rax, [rsp + 16]
    mov [rax + 8],   rcx
    mov [rax + 16],  rdx
    mov [rax + 24],  rbx
    mov [rax + 40],  rbp
    mov [rax + 48],  rsi
    mov [rax + 56],  rdi
    mov [rax + 64],  r8
    mov [rax + 72],  r9
    mov [rax + 80],  r10
    mov [rax + 88],  r11
    mov [rax + 96],  r12
    mov [rax + 104], r13
    mov [rax + 112], r14
    mov [rax + 120], r15
    pop rax
    vmsave rax
    pop rax
    vmload rax
    pop rdx
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);
