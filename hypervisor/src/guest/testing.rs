//! Test doubles for guest memory and MMIO devices, heap-free so that they build everywhere
//! (host tests, the fuzz target, other crates' tests).

use core::fmt;

use heapless::Vec;

use super::emulate::MmioHandler;
use super::memory::{GuestMemError, GuestMemory};
use super::state::AccessWidth;
use crate::addr::{GuestPhysAddr, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;

/// Why a page could not be added to a [`FakeGuestMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeMemError {
    /// All `capacity` pages are in use.
    Full { capacity: usize },
    /// The range overflows the address space.
    AddressOverflow { gpa: GuestPhysAddr, len: usize },
}

impl fmt::Display for FakeMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeMemError::Full { capacity } => {
                write!(f, "fake guest memory is full ({capacity} pages)")
            }
            FakeMemError::AddressOverflow { gpa, len } => {
                write!(f, "range {gpa} (+{len:#x} bytes) overflows")
            }
        }
    }
}

/// Sparse guest RAM made of at most `N` 4 KiB pages; every other address is "not RAM", as an
/// EPT-unmapped page would be.
pub struct FakeGuestMemory<const N: usize = 32> {
    pages: Vec<(u64, [u8; PAGE]), N>,
}

impl<const N: usize> Default for FakeGuestMemory<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FakeGuestMemory<N> {
    pub const fn new() -> Self {
        Self { pages: Vec::new() }
    }

    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        self.pages.iter().find(|(p, _)| *p == pfn).map(|(_, d)| d)
    }

    fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8; PAGE]> {
        self.pages
            .iter_mut()
            .find(|(p, _)| *p == pfn)
            .map(|(_, d)| d)
    }

    /// Makes `[gpa, gpa + len)` RAM (zero-filled where new).
    pub fn map(&mut self, gpa: GuestPhysAddr, len: usize) -> Result<(), FakeMemError> {
        let overflow = FakeMemError::AddressOverflow { gpa, len };
        if len == 0 {
            return Ok(());
        }
        let last = gpa.0.checked_add(len as u64 - 1).ok_or(overflow)?;
        for pfn in (gpa.0 / PAGE_SIZE)..=(last / PAGE_SIZE) {
            if self.page(pfn).is_none() {
                self.pages
                    .push((pfn, [0; PAGE]))
                    .map_err(|_| FakeMemError::Full { capacity: N })?;
            }
        }
        Ok(())
    }

    /// Maps the range and stores `bytes` there.
    pub fn load(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> Result<(), FakeMemError> {
        self.map(gpa, bytes.len())?;
        self.write(gpa, bytes)
            .map_err(|_| FakeMemError::AddressOverflow {
                gpa,
                len: bytes.len(),
            })
    }

    /// Maps and stores a little-endian u32 (a 32-bit paging entry).
    pub fn load_u32(&mut self, gpa: GuestPhysAddr, v: u32) -> Result<(), FakeMemError> {
        self.load(gpa, &v.to_le_bytes())
    }

    /// Maps and stores a little-endian u64 (a PAE / 4-level paging entry).
    pub fn load_u64(&mut self, gpa: GuestPhysAddr, v: u64) -> Result<(), FakeMemError> {
        self.load(gpa, &v.to_le_bytes())
    }

    /// Removes a page again (the guest's RAM shrank, or a test models an unmapped page).
    pub fn unmap_page(&mut self, gpa: GuestPhysAddr) {
        let pfn = gpa.0 / PAGE_SIZE;
        self.pages.retain(|(p, _)| *p != pfn);
    }

    /// Calls `f(page_offset_in_buf, page_data_range)` for each page piece of the range.
    fn for_each_piece(
        gpa: GuestPhysAddr,
        len: usize,
        mut f: impl FnMut(usize, u64, usize, usize) -> Result<(), GuestMemError>,
    ) -> Result<(), GuestMemError> {
        if len == 0 {
            return Ok(());
        }
        gpa.0
            .checked_add(len as u64 - 1)
            .ok_or(GuestMemError::AddressOverflow { gpa, len })?;
        let mut done = 0usize;
        while done < len {
            let addr = gpa.0 + done as u64;
            let off = (addr % PAGE_SIZE) as usize;
            let n = (PAGE - off).min(len - done);
            f(done, addr / PAGE_SIZE, off, n)?;
            done += n;
        }
        Ok(())
    }
}

impl<const N: usize> GuestMemory for FakeGuestMemory<N> {
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len();
        Self::for_each_piece(gpa, len, |done, pfn, off, n| {
            let page = self.page(pfn).ok_or(GuestMemError::NotGuestRam {
                gpa: GuestPhysAddr(pfn * PAGE_SIZE + off as u64),
                len: n,
            })?;
            buf[done..done + n].copy_from_slice(&page[off..off + n]);
            Ok(())
        })
    }

    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        // Check every page first so that a failed write changes nothing.
        Self::for_each_piece(gpa, buf.len(), |_, pfn, off, n| {
            self.page(pfn)
                .map(|_| ())
                .ok_or(GuestMemError::NotGuestRam {
                    gpa: GuestPhysAddr(pfn * PAGE_SIZE + off as u64),
                    len: n,
                })
        })?;
        Self::for_each_piece(gpa, buf.len(), |done, pfn, off, n| {
            if let Some(page) = self.page_mut(pfn) {
                page[off..off + n].copy_from_slice(&buf[done..done + n]);
            }
            Ok(())
        })
    }
}

/// One access a [`RecordingMmio`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRecord {
    pub gpa: GuestPhysAddr,
    pub width: AccessWidth,
    /// `None` for a read, `Some(value)` for a write.
    pub written: Option<u64>,
}

/// An MMIO device that answers every read with `read_value` as it is (bits above the
/// access width included: the emulator must drop them) and records the first 16 accesses.
#[derive(Default)]
pub struct RecordingMmio {
    pub read_value: u64,
    pub log: Vec<MmioRecord, 16>,
}

impl RecordingMmio {
    pub fn new(read_value: u64) -> Self {
        Self {
            read_value,
            log: Vec::new(),
        }
    }
}

impl MmioHandler for RecordingMmio {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        let _ = self.log.push(MmioRecord {
            gpa,
            width,
            written: None,
        });
        self.read_value
    }

    fn write(&mut self, gpa: GuestPhysAddr, width: AccessWidth, value: u64) {
        let _ = self.log.push(MmioRecord {
            gpa,
            width,
            written: Some(value),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_pages_span_and_refuse_holes() {
        let mut m = FakeGuestMemory::<4>::new();
        m.load(GuestPhysAddr(0x1ffe), &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.read(GuestPhysAddr(0x1ffe), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(
            m.read(GuestPhysAddr(0x2ffe), &mut b),
            Err(GuestMemError::NotGuestRam {
                gpa: GuestPhysAddr(0x3000),
                len: 2
            })
        );
        // A write that would touch an unmapped page changes nothing.
        assert!(m.write(GuestPhysAddr(0x2ffe), &[9, 9, 9, 9]).is_err());
        m.read(GuestPhysAddr(0x2ffc), &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        assert!(m.read(GuestPhysAddr(u64::MAX - 1), &mut b).is_err());
        m.map(GuestPhysAddr(0x10_0000), 3 * PAGE).unwrap_err();
        m.unmap_page(GuestPhysAddr(0x1000));
        assert!(m.read_u32(GuestPhysAddr(0x1ffc)).is_err());
    }
}
