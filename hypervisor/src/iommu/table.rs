//! The identity-map builder VT-d second-level tables and AMD-Vi I/O page tables share:
//! both are radix trees of 512 eight-byte entries per 4 KiB table, 9 address bits per level,
//! leaves at level 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB). Only the entry encodings differ,
//! behind [`EntryFormat`].

use super::{DmaAccess, DmaTranslation, IommuError, MapStats, PageSizes, PagingLevels};
use crate::addr::{HostPhysAddr, PhysRange, PAGE_SIZE};
use crate::paging::{FrameAllocator, TableMemory, ENTRIES};
use core::marker::PhantomData;

/// Address bits 51:12 of an entry, in both formats.
pub(super) const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// One vendor's entry encoding. Levels count from 1 (the table of 4 KiB pages).
pub trait EntryFormat {
    fn is_present(entry: u64) -> bool;
    /// Whether a present `entry` at `level` maps a page rather than pointing at a table.
    fn is_leaf(entry: u64, level: u32) -> bool;
    /// An entry at `level` pointing at the table `table` of level `level - 1`.
    fn table_entry(table: HostPhysAddr, level: u32) -> u64;
    /// An entry at `level` mapping the page at `addr`.
    fn leaf_entry(addr: u64, level: u32, access: DmaAccess) -> u64;
    fn access(entry: u64) -> DmaAccess;
}

/// Bytes one entry at `level` covers.
pub(super) const fn level_size(level: u32) -> u64 {
    PAGE_SIZE << (9 * (level - 1))
}

const fn index(addr: u64, level: u32) -> usize {
    ((addr >> (12 + 9 * (level - 1))) as usize) % ENTRIES
}

/// A tree of I/O page tables under `root`.
pub struct Tables<F: EntryFormat> {
    pub(super) root: HostPhysAddr,
    pub(super) levels: PagingLevels,
    sizes: PageSizes,
    format: PhantomData<F>,
}

// Not derived: a derive would require `F: Clone` of the marker type.
impl<F: EntryFormat> Clone for Tables<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: EntryFormat> Copy for Tables<F> {}

impl<F: EntryFormat> PartialEq for Tables<F> {
    fn eq(&self, other: &Self) -> bool {
        (self.root, self.levels, self.sizes) == (other.root, other.levels, other.sizes)
    }
}
impl<F: EntryFormat> Eq for Tables<F> {}

impl<F: EntryFormat> core::fmt::Debug for Tables<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tables")
            .field("root", &self.root)
            .field("levels", &self.levels)
            .field("sizes", &self.sizes)
            .finish()
    }
}

impl<F: EntryFormat> Tables<F> {
    pub fn new(
        levels: PagingLevels,
        sizes: PageSizes,
        alloc: &mut impl FrameAllocator,
    ) -> Result<Self, IommuError> {
        let root = alloc
            .allocate_zeroed_frame()
            .ok_or(IommuError::OutOfFrames)?;
        Ok(Self {
            root,
            levels,
            sizes,
            format: PhantomData,
        })
    }

    fn leaf_allowed(&self, level: u32) -> bool {
        match level {
            1 => true,
            2 => self.sizes.two_mib,
            3 => self.sizes.one_gib,
            _ => false,
        }
    }

    pub(super) fn map_identity<M: TableMemory + FrameAllocator>(
        &mut self,
        range: PhysRange,
        access: DmaAccess,
        mem: &mut M,
    ) -> Result<MapStats, IommuError> {
        for (what, value) in [
            ("DMA range start", range.start),
            ("DMA range end", range.end),
        ] {
            if value % PAGE_SIZE != 0 {
                return Err(IommuError::Unaligned { what, value });
            }
        }
        if range.end < range.start {
            return Err(IommuError::Inverted {
                what: "DMA range",
                range,
            });
        }
        if range.end > self.levels.limit() {
            return Err(IommuError::AboveAddressWidth {
                range,
                width: self.levels.address_width(),
            });
        }
        let mut stats = MapStats::default();
        if !range.is_empty() {
            let top = self.levels.count();
            self.map_level(self.root, top, range, access, mem, &mut stats)?;
        }
        Ok(stats)
    }

    /// Maps `span`, which lies inside the part of the address space `table` (at `level`)
    /// covers.
    fn map_level<M: TableMemory + FrameAllocator>(
        &self,
        table: HostPhysAddr,
        level: u32,
        span: PhysRange,
        access: DmaAccess,
        mem: &mut M,
        stats: &mut MapStats,
    ) -> Result<(), IommuError> {
        let size = level_size(level);
        let (mut at, end) = (span.start, span.end);
        while at < end {
            let slot = at & !(size - 1);
            let stop = end.min(slot + size);
            let idx = index(at, level);
            let entry = mem.table(table)[idx];
            let present = F::is_present(entry);
            let leaf = present && F::is_leaf(entry, level);
            if at == slot && stop == slot + size && self.leaf_allowed(level) {
                if present && !leaf {
                    // A table from an earlier mapping: fill it rather than orphan it.
                    let next = HostPhysAddr(entry & ADDR_MASK);
                    let sub = PhysRange {
                        start: at,
                        end: stop,
                    };
                    self.map_level(next, level - 1, sub, access, mem, stats)?;
                } else {
                    mem.table(table)[idx] = F::leaf_entry(slot, level, access);
                    match level {
                        1 => stats.pages_4k += 1,
                        2 => stats.pages_2m += 1,
                        _ => stats.pages_1g += 1,
                    }
                }
            } else {
                // Part of the slot, or a page size the hardware lacks: one level down.
                let next = if leaf {
                    self.split(table, idx, entry, level, mem, stats)?
                } else if present {
                    HostPhysAddr(entry & ADDR_MASK)
                } else {
                    let new = mem.allocate_zeroed_frame().ok_or(IommuError::OutOfFrames)?;
                    stats.tables += 1;
                    mem.table(table)[idx] = F::table_entry(new, level);
                    new
                };
                let sub = PhysRange {
                    start: at,
                    end: stop,
                };
                self.map_level(next, level - 1, sub, access, mem, stats)?;
            }
            at = stop;
        }
        Ok(())
    }

    /// Replaces the large page `entry` (at `table[idx]`) with a table of the 512 smaller
    /// pages it covered, filled before it is linked so a concurrent walk sees one or the
    /// other.
    fn split<M: TableMemory + FrameAllocator>(
        &self,
        table: HostPhysAddr,
        idx: usize,
        entry: u64,
        level: u32,
        mem: &mut M,
        stats: &mut MapStats,
    ) -> Result<HostPhysAddr, IommuError> {
        let new = mem.allocate_zeroed_frame().ok_or(IommuError::OutOfFrames)?;
        stats.tables += 1;
        let base = entry & ADDR_MASK & !(level_size(level) - 1);
        let sub = level_size(level - 1);
        let access = F::access(entry);
        for (i, e) in mem.table(new).iter_mut().enumerate() {
            *e = F::leaf_entry(base + i as u64 * sub, level - 1, access);
        }
        mem.table(table)[idx] = F::table_entry(new, level);
        Ok(new)
    }

    pub(super) fn translate(
        &self,
        iova: u64,
        mem: &mut impl TableMemory,
    ) -> Option<DmaTranslation> {
        if iova >= self.levels.limit() {
            return None;
        }
        let mut table = self.root;
        for level in (1..=self.levels.count()).rev() {
            let entry = mem.table(table)[index(iova, level)];
            if !F::is_present(entry) {
                return None;
            }
            if F::is_leaf(entry, level) {
                let size = level_size(level);
                let base = entry & ADDR_MASK & !(size - 1);
                return Some(DmaTranslation {
                    hpa: HostPhysAddr(base | (iova & (size - 1))),
                    access: F::access(entry),
                    page_size: size,
                });
            }
            table = HostPhysAddr(entry & ADDR_MASK);
        }
        None
    }
}

impl<F: EntryFormat> super::DmaPageTables for Tables<F> {
    fn root(&self) -> HostPhysAddr {
        self.root
    }
    fn levels(&self) -> PagingLevels {
        self.levels
    }
    fn map_identity<M: TableMemory + FrameAllocator>(
        &mut self,
        range: PhysRange,
        access: DmaAccess,
        mem: &mut M,
    ) -> Result<MapStats, IommuError> {
        Tables::map_identity(self, range, access, mem)
    }
    fn translate(&self, iova: u64, mem: &mut impl TableMemory) -> Option<DmaTranslation> {
        Tables::translate(self, iova, mem)
    }
}
