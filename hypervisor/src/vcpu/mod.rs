//! The vendor-neutral side of a VM exit: what an exit handler may ask of the CPU about the
//! guest that exited and do to it ([`GuestCpu`]), and the policy every backend shares
//! ([`policy`]): port I/O, MSRs, CPUID filtering, nested-paging faults on the pages Ally
//! traps or hides, the real-mode hypercalls and the power-off report.
//!
//! `arch::vmx` implements [`GuestCpu`] on the VMCS, `arch::svm` on the VMCB; the host tests
//! run the policy against a mock.

pub mod policy;
pub mod registry;

use crate::exit::ExitCounters;
use crate::guest::{GuestCpuState, GuestRegisters};
use crate::reset::ResetSource;
use core::fmt;

/// Why the guest was stopped.
#[derive(Debug)]
pub enum StopReason {
    /// An exit Ally does not expect: the backend's number for it and its name.
    Unhandled {
        code: u64,
        name: &'static str,
    },
    EntryFailed {
        code: u64,
    },
    GuestRequested(&'static str),
    Emulation(crate::guest::EmulationError),
    BadCrAccess,
    Int15(&'static str),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unhandled { code, name } => write!(f, "unhandled exit {code:#x} ({name})"),
            Self::EntryFailed { code } => write!(f, "VM entry failed (exit code {code:#x})"),
            Self::GuestRequested(what) => write!(f, "{what}"),
            Self::Emulation(e) => write!(f, "cannot emulate the guest's access: {e}"),
            Self::BadCrAccess => write!(f, "unsupported control-register access"),
            Self::Int15(what) => write!(f, "INT 15h hook: {what}"),
        }
    }
}

/// What an exit handler returns: `Err` stops the guest with a report.
pub type ExitResult = Result<(), StopReason>;

/// Exception vectors Ally injects (SDM Vol. 3A 6.3.1, APM Vol. 2 8.2).
pub const VECTOR_UD: u8 = 6;
pub const VECTOR_GP: u8 = 13;

/// Which virtualization extension the guest must not see (CPUID filtering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Intel VMX: CPUID.1:ECX.VMX hidden.
    Vmx,
    /// AMD SVM: CPUID.80000001h:ECX.SVM hidden, leaf 8000000Ah empty.
    Svm,
}

/// The guest's CPU as an exit handler sees it: one exit's view of the VMCS or VMCB.
pub trait GuestCpu {
    /// The local APIC ID of the CPU the handler runs on.
    fn apic_id(&self) -> u32;
    /// Which extension runs the guest (what CPUID must hide).
    fn vendor(&self) -> Vendor;
    /// The guest's registers, control registers and segments, for decoding and emulation.
    fn state(&self, regs: &GuestRegisters) -> GuestCpuState;
    /// Writes an emulated stretch's registers, RSP, RIP (and RFLAGS when it changed them)
    /// back; the retired instruction ends blocking by STI / MOV SS.
    fn commit(&mut self, regs: &mut GuestRegisters, cpu: &GuestCpuState, rflags_changed: bool);
    /// Moves RIP past the instruction that exited (for exits that are instructions).
    fn skip_instruction(&mut self);
    /// Delivers hardware exception `vector` at the next entry (no error code in real mode).
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// CR0.PE as the guest sees it.
    fn in_protected_mode(&self) -> bool;
    /// CS.base + RIP.
    fn linear_rip(&self) -> u64;
    /// The guest's DR7 (armed breakpoints forbid fusing instructions into one exit).
    fn dr7(&self) -> u64;
    /// CR4 as the guest sees it (Ally's own bits taken from the read shadow).
    fn guest_cr4(&self) -> u64;
    /// Whether the guest may set CR4.OSXSAVE (else XSAVE and AVX are hidden).
    fn guest_can_use_xsave(&self) -> bool;
    /// The guest's SS base and RSP (the INT 15h hook's IRET frame) and ES base.
    fn ss_base(&self) -> u64;
    fn es_base(&self) -> u64;
    fn rsp(&self) -> u64;
    /// The CONFIG_ADDRESS this vCPU's guest last wrote (`crate::pci::latch`).
    fn config_address(&mut self) -> &mut u32;
    /// The guest's MTRR view.
    fn mtrr(&mut self) -> &mut crate::msr::MtrrShadow;
    /// This vCPU's exit counters.
    fn exits(&self) -> &ExitCounters;
    /// The guest asked for a platform reset: restart it (the boot CPU) or hand the reset
    /// over and wait for the next boot's SIPI (another OS core).
    fn platform_reset(&mut self, regs: &mut GuestRegisters, source: ResetSource) -> ExitResult;
}
