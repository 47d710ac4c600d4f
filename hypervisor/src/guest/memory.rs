//! Access to guest-physical memory.

use core::fmt;

use crate::addr::GuestPhysAddr;

/// Why a guest-physical access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// The range is not guest RAM that Ally may touch on the guest's behalf (MMIO, Ally's or
    /// the DPI partition's memory, or nothing at all).
    NotGuestRam { gpa: GuestPhysAddr, len: usize },
    /// `gpa + len` overflows the 64-bit address space.
    AddressOverflow { gpa: GuestPhysAddr, len: usize },
}

impl fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestMemError::NotGuestRam { gpa, len } => {
                write!(
                    f,
                    "guest-physical range {gpa} (+{len:#x} bytes) is not guest RAM"
                )
            }
            GuestMemError::AddressOverflow { gpa, len } => {
                write!(f, "guest-physical range {gpa} (+{len:#x} bytes) overflows")
            }
        }
    }
}

/// Guest-physical memory as Ally reaches it. An implementation must refuse every range the
/// guest itself could not reach through the EPT (Ally's and the DPI partition's memory,
/// trapped MMIO), so that a guest cannot make Ally read hidden memory by pointing its page
/// tables or RIP there.
pub trait GuestMemory {
    /// Fills `buf` from guest-physical `gpa`; the range may span pages.
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError>;
    /// Stores `buf` at guest-physical `gpa`; the range may span pages.
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError>;

    /// Reads a little-endian u32.
    fn read_u32(&self, gpa: GuestPhysAddr) -> Result<u32, GuestMemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Reads a little-endian u64.
    fn read_u64(&self, gpa: GuestPhysAddr) -> Result<u64, GuestMemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl<M: GuestMemory + ?Sized> GuestMemory for &mut M {
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        (**self).read(gpa, buf)
    }
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        (**self).write(gpa, buf)
    }
}
