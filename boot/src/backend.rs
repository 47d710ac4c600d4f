//! Which virtualization extension runs the guest: Intel VMX (VMCS, EPT) or AMD SVM (VMCB,
//! nested page tables). Everything the guest sees is the same on both; only how a vCPU is
//! entered and how its exits are read differ (`ally_hypervisor::arch::{vmx, svm}`).

use ally_hypervisor::arch::svm::capabilities::{SvmCapabilities, SvmError};
use ally_hypervisor::arch::vmx::capabilities::{VmxCapabilities, VmxError};
use ally_hypervisor::paging::{Ept, GuestPaging, Npt, PagingError};
use ally_hypervisor::realmode::Hypercall;
use core::fmt;

/// The extension found on the boot CPU, enabled.
#[derive(Clone, Copy)]
pub enum Backend {
    Vmx(VmxCapabilities),
    Svm(SvmCapabilities),
}

/// Neither extension is usable: both reasons, so that the operator sees what each lacks.
#[derive(Debug)]
pub struct NoBackend {
    pub vmx: VmxError,
    pub svm: SvmError,
}

impl fmt::Display for NoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this CPU can run no guest under Ally: Intel VMX: {}; AMD SVM: {}",
            self.vmx, self.svm
        )
    }
}

impl Backend {
    /// VMX where CPUID reports it, else SVM.
    ///
    /// # Safety
    /// Ring 0 on the boot CPU, before any guest runs (VMX locks IA32_FEATURE_CONTROL).
    pub unsafe fn probe() -> Result<Self, NoBackend> {
        // SAFETY: guaranteed by the caller.
        let vmx = match unsafe { VmxCapabilities::probe_and_enable() } {
            Ok(caps) => return Ok(Backend::Vmx(caps)),
            Err(e) => e,
        };
        match SvmCapabilities::detect() {
            Ok(caps) => Ok(Backend::Svm(caps)),
            Err(svm) => Err(NoBackend { vmx, svm }),
        }
    }

    /// What Ally's real-mode stubs leave the guest with.
    pub fn hypercall(&self) -> Hypercall {
        match self {
            Backend::Vmx(_) => Hypercall::Vmcall,
            Backend::Svm(_) => Hypercall::Vmmcall,
        }
    }

    /// An empty EPT or nested page table.
    pub fn new_paging(
        &self,
        alloc: &mut impl ally_hypervisor::paging::FrameAllocator,
    ) -> Result<GuestPaging, PagingError> {
        Ok(match self {
            Backend::Vmx(_) => GuestPaging::Ept(Ept::new(alloc)?),
            Backend::Svm(_) => GuestPaging::Npt(Npt::new(alloc)?),
        })
    }
}
