//! Typed physical addresses: a guest-physical address is never silently used as a
//! host-physical one (Ally's EPT is an identity map today, but the types keep the two
//! apart so that a future non-identity mapping cannot be misused).

use core::fmt;

/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a 2 MiB large page.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;

macro_rules! phys_addr_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// The address rounded down to `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// The address rounded up to `align` (a power of two), or `None` on overflow.
            pub const fn checked_align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// `self + offset`, or `None` on overflow.
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

phys_addr_type!(
    /// An address in the guest's physical address space (what the guest's page tables,
    /// descriptors and ring bases contain).
    GuestPhysAddr
);
phys_addr_type!(
    /// An address in the machine's physical address space (what Ally's own page tables,
    /// the VMCS and EPT entries contain).
    HostPhysAddr
);

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    /// `[start, start + len)`; `None` when the end overflows.
    pub const fn from_start_len(start: u64, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        let a = GuestPhysAddr(0x1234_5678);
        assert_eq!(a.align_down(PAGE_SIZE), GuestPhysAddr(0x1234_5000));
        assert_eq!(
            a.checked_align_up(PAGE_SIZE),
            Some(GuestPhysAddr(0x1234_6000))
        );
        assert!(!a.is_aligned(PAGE_SIZE));
        assert_eq!(HostPhysAddr(u64::MAX).checked_align_up(PAGE_SIZE), None);
    }

    #[test]
    fn ranges() {
        let r = PhysRange::from_start_len(0x1000, 0x1000).unwrap();
        assert!(r.contains(0x1fff) && !r.contains(0x2000));
        assert!(r.overlaps(&PhysRange {
            start: 0x1fff,
            end: 0x3000
        }));
        assert!(!r.overlaps(&PhysRange {
            start: 0x2000,
            end: 0x3000
        }));
        assert_eq!(PhysRange::from_start_len(u64::MAX, 2), None);
    }
}
