//! E820-style physical memory maps: the firmware's map (from multiboot2), the place Ally
//! reserves for itself, and the filtered map the guest is shown.
//!
//! A [`MemoryMap`] is always sorted, non-overlapping and has adjacent entries of the same
//! kind merged. Overlapping firmware entries are resolved as Linux's `e820__update_table`
//! (formerly `sanitize_e820_map`) does: where entries overlap, the more restrictive kind
//! (the larger E820 type number) wins, so usable RAM never hides a reserved range.

use crate::addr::PhysRange;
use core::fmt;
use heapless::Vec;

/// Maximum number of entries in a [`MemoryMap`] (the same as Linux's E820 table on most
/// configurations; real firmware maps have a few dozen).
pub const MAX_REGIONS: usize = 128;

/// An E820 address-range type (ACPI 6.5, 15.1 "INT 15H, E820H - Query System Address Map",
/// Table 15.1 "Address Range Types").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum MemoryKind {
    /// AddressRangeMemory: RAM the OS may use.
    Usable,
    /// AddressRangeReserved.
    Reserved,
    /// AddressRangeACPI: ACPI tables, reclaimable after they are read.
    AcpiReclaimable,
    /// AddressRangeNVS: ACPI non-volatile storage.
    AcpiNvs,
    /// AddressRangeUnusable: RAM with detected errors.
    Unusable,
    /// Any other type (persistent memory, disabled, ...), kept with its raw number.
    /// Construct through [`MemoryKind::from_raw`] so that `Other(1..=5)` never arises.
    Other(u32),
}

impl MemoryKind {
    /// The kind for an E820 / multiboot2 type number.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            1 => MemoryKind::Usable,
            2 => MemoryKind::Reserved,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Unusable,
            n => MemoryKind::Other(n),
        }
    }

    /// The E820 type number.
    pub const fn to_raw(self) -> u32 {
        match self {
            MemoryKind::Usable => 1,
            MemoryKind::Reserved => 2,
            MemoryKind::AcpiReclaimable => 3,
            MemoryKind::AcpiNvs => 4,
            MemoryKind::Unusable => 5,
            MemoryKind::Other(n) => n,
        }
    }

    /// Precedence when entries overlap: larger wins. As in Linux, a larger type number is
    /// more restrictive; type 0 (undefined) is treated as at least as restrictive as
    /// Reserved so that it can never turn into RAM.
    const fn precedence(self) -> (u32, u32) {
        let raw = self.to_raw();
        let rank = if raw < 2 && raw != 1 { 2 } else { raw };
        (rank, raw)
    }

    fn most_restrictive(a: Self, b: Self) -> Self {
        if a.precedence() >= b.precedence() {
            a
        } else {
            b
        }
    }

    fn normalized(self) -> Self {
        Self::from_raw(self.to_raw())
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryKind::Usable => f.write_str("usable"),
            MemoryKind::Reserved => f.write_str("reserved"),
            MemoryKind::AcpiReclaimable => f.write_str("ACPI data"),
            MemoryKind::AcpiNvs => f.write_str("ACPI NVS"),
            MemoryKind::Unusable => f.write_str("unusable"),
            MemoryKind::Other(n) => write!(f, "type {n}"),
        }
    }
}

/// One entry of a memory map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemoryRegion {
    pub range: PhysRange,
    pub kind: MemoryKind,
}

impl MemoryRegion {
    pub const fn new(range: PhysRange, kind: MemoryKind) -> Self {
        Self { range, kind }
    }

    /// An entry from firmware's `(base, length, type)` triple. An entry whose end would
    /// pass 2^64 is clipped at `u64::MAX`.
    pub const fn from_base_len(base: u64, len: u64, raw_type: u32) -> Self {
        let end = match base.checked_add(len) {
            Some(end) => end,
            None => u64::MAX,
        };
        Self {
            range: PhysRange { start: base, end },
            kind: MemoryKind::from_raw(raw_type),
        }
    }
}

impl fmt::Display for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.range, self.kind)
    }
}

/// Errors of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemMapError {
    /// The map would need more than [`MAX_REGIONS`] entries.
    TooManyRegions,
    /// A reservation of zero bytes was asked for.
    ZeroSize,
    /// The alignment is not a power of two.
    BadAlignment { align: u64 },
    /// No usable region can hold the reservation.
    NoRoom {
        size: u64,
        align: u64,
        limit: u64,
        /// The largest usable region (clipped at `limit`) in the map, in bytes.
        largest_usable: u64,
    },
}

impl fmt::Display for MemMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemMapError::TooManyRegions => {
                write!(f, "the memory map needs more than {MAX_REGIONS} entries")
            }
            MemMapError::ZeroSize => f.write_str("a reservation of 0 bytes was requested"),
            MemMapError::BadAlignment { align } => {
                write!(f, "reservation alignment {align:#x} is not a power of two")
            }
            MemMapError::NoRoom {
                size,
                align,
                limit,
                largest_usable,
            } => write!(
                f,
                "no usable RAM region below {limit:#x} holds {size:#x} bytes aligned to \
                 {align:#x} outside the ranges in use (largest usable region below the \
                 limit: {largest_usable:#x} bytes)"
            ),
        }
    }
}

/// A sorted, non-overlapping, merged physical memory map.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct MemoryMap {
    regions: Vec<MemoryRegion, MAX_REGIONS>,
}

/// Appends `region` to a sorted list, merging it into the last entry when they touch and
/// have the same kind. Empty regions are dropped.
fn push_merged(
    out: &mut Vec<MemoryRegion, MAX_REGIONS>,
    range: PhysRange,
    kind: MemoryKind,
) -> Result<(), MemMapError> {
    if range.is_empty() {
        return Ok(());
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.range.end == range.start {
            last.range.end = range.end;
            return Ok(());
        }
    }
    out.push(MemoryRegion { range, kind })
        .map_err(|_| MemMapError::TooManyRegions)
}

impl MemoryMap {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            regions: Vec::new(),
        }
    }

    /// Builds a map from firmware entries in any order, possibly overlapping. Empty entries
    /// are ignored.
    pub fn from_entries<I>(entries: I) -> Result<Self, MemMapError>
    where
        I: IntoIterator<Item = MemoryRegion>,
    {
        let mut map = Self::new();
        for e in entries {
            map.insert(e)?;
        }
        Ok(map)
    }

    /// Adds one entry; where it overlaps existing entries the more restrictive kind wins.
    pub fn insert(&mut self, region: MemoryRegion) -> Result<(), MemMapError> {
        let new = region.range;
        if new.is_empty() {
            return Ok(());
        }
        let kind = region.kind.normalized();
        let mut out: Vec<MemoryRegion, MAX_REGIONS> = Vec::new();
        // `cursor`: everything of `new` below it has been emitted.
        let mut cursor = new.start;
        for r in &self.regions {
            let r_range = r.range;
            // The part of `new` that lies in the gap before `r`.
            let gap_end = r_range.start.min(new.end);
            if cursor < gap_end {
                push_merged(
                    &mut out,
                    PhysRange {
                        start: cursor,
                        end: gap_end,
                    },
                    kind,
                )?;
            }
            // `r` split into below / overlapping / above `new`.
            let ov_start = r_range.start.max(new.start);
            let ov_end = r_range.end.min(new.end);
            if ov_start < ov_end {
                push_merged(
                    &mut out,
                    PhysRange {
                        start: r_range.start,
                        end: ov_start,
                    },
                    r.kind,
                )?;
                push_merged(
                    &mut out,
                    PhysRange {
                        start: ov_start,
                        end: ov_end,
                    },
                    MemoryKind::most_restrictive(r.kind, kind),
                )?;
                push_merged(
                    &mut out,
                    PhysRange {
                        start: ov_end,
                        end: r_range.end,
                    },
                    r.kind,
                )?;
            } else {
                push_merged(&mut out, r_range, r.kind)?;
            }
            cursor = cursor.max(r_range.end);
        }
        if cursor < new.end {
            push_merged(
                &mut out,
                PhysRange {
                    start: cursor,
                    end: new.end,
                },
                kind,
            )?;
        }
        self.regions = out;
        Ok(())
    }

    /// All entries, ascending.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// All entries, ascending.
    pub fn iter(&self) -> core::slice::Iter<'_, MemoryRegion> {
        self.regions.iter()
    }

    /// The usable RAM ranges, ascending.
    pub fn usable(&self) -> impl DoubleEndedIterator<Item = PhysRange> + '_ {
        self.regions
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .map(|r| r.range)
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The kind of the byte at `addr`, or `None` when no entry covers it.
    pub fn kind_at(&self, addr: u64) -> Option<MemoryKind> {
        self.regions
            .iter()
            .find(|r| r.range.contains(addr))
            .map(|r| r.kind)
    }

    /// Whether all of `range` (non-empty) is usable RAM.
    pub fn is_usable_ram(&self, range: PhysRange) -> bool {
        // Adjacent usable entries are merged, so one entry must hold the whole range.
        !range.is_empty()
            && self
                .usable()
                .any(|u| u.start <= range.start && range.end <= u.end)
    }

    /// Total bytes of usable RAM.
    pub fn total_usable(&self) -> u64 {
        self.usable().map(|r| r.len()).sum()
    }

    /// The usable range containing `addr`, if any.
    pub fn usable_range_containing(&self, addr: u64) -> Option<PhysRange> {
        self.usable().find(|r| r.contains(addr))
    }

    /// Finds where to put a reservation "at the top of a RAM range": the highest
    /// `align`-aligned range of `size` bytes that lies entirely inside one usable entry,
    /// ends at or below `limit`, and overlaps none of `avoid`.
    pub fn place_reservation(
        &self,
        size: u64,
        align: u64,
        limit: u64,
        avoid: &[PhysRange],
    ) -> Result<PhysRange, MemMapError> {
        if size == 0 {
            return Err(MemMapError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(MemMapError::BadAlignment { align });
        }
        let mut largest_usable = 0;
        for usable in self.usable().rev() {
            let floor = usable.start;
            let mut top = usable.end.min(limit);
            largest_usable = largest_usable.max(top.saturating_sub(floor));
            while let Some(candidate_start) = top.checked_sub(size) {
                let start = candidate_start & !(align - 1);
                if start < floor {
                    break;
                }
                let candidate = PhysRange {
                    start,
                    end: start + size,
                };
                // Any placement below must end at or below the lowest start of the
                // avoided ranges that overlap this candidate (it cannot lie above them).
                match avoid
                    .iter()
                    .filter(|a| !a.is_empty() && a.overlaps(&candidate))
                    .map(|a| a.start)
                    .min()
                {
                    None => return Ok(candidate),
                    Some(next_top) => top = next_top,
                }
            }
        }
        Err(MemMapError::NoRoom {
            size,
            align,
            limit,
            largest_usable,
        })
    }

    /// The map with `hidden` removed: entries are cut (not re-typed) so that no entry
    /// covers any byte of a hidden range. This is the map the guest is shown.
    pub fn without(&self, hidden: &[PhysRange]) -> Result<MemoryMap, MemMapError> {
        let mut out: Vec<MemoryRegion, MAX_REGIONS> = Vec::new();
        for r in &self.regions {
            // Emit the parts of `r` not covered by any hidden range, in ascending order.
            let mut cursor = r.range.start;
            while cursor < r.range.end {
                // The hidden range covering `cursor`, if any: skip past its end.
                if let Some(end) = hidden
                    .iter()
                    .filter(|h| h.contains(cursor))
                    .map(|h| h.end)
                    .max()
                {
                    cursor = end;
                    continue;
                }
                // Otherwise emit up to the next hidden start within `r`.
                let next = hidden
                    .iter()
                    .filter(|h| !h.is_empty() && h.start > cursor)
                    .map(|h| h.start)
                    .min()
                    .unwrap_or(u64::MAX)
                    .min(r.range.end);
                push_merged(
                    &mut out,
                    PhysRange {
                        start: cursor,
                        end: next,
                    },
                    r.kind,
                )?;
                cursor = next;
            }
        }
        Ok(MemoryMap { regions: out })
    }
}

impl<'a> IntoIterator for &'a MemoryMap {
    type Item = &'a MemoryRegion;
    type IntoIter = core::slice::Iter<'a, MemoryRegion>;
    fn into_iter(self) -> Self::IntoIter {
        self.regions.iter()
    }
}

impl fmt::Display for MemoryMap {
    /// One line per entry, as Ally logs the map.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.regions {
            writeln!(f, "  {r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    fn e(start: u64, end: u64, raw: u32) -> MemoryRegion {
        MemoryRegion::new(r(start, end), MemoryKind::from_raw(raw))
    }

    use super::fixtures::bochs_map;

    #[test]
    fn kinds_round_trip() {
        for raw in 0..10 {
            assert_eq!(MemoryKind::from_raw(raw).to_raw(), raw);
        }
        assert_eq!(MemoryKind::from_raw(4), MemoryKind::AcpiNvs);
        assert_eq!(MemoryKind::from_raw(12), MemoryKind::Other(12));
        assert_eq!(MemoryKind::Other(12).to_string(), "type 12");
    }

    #[test]
    fn typical_map_is_kept_as_is() {
        let m = bochs_map();
        assert_eq!(m.len(), 6);
        assert_eq!(m.regions()[3], e(0x100000, 0x3fff0000, 1));
        assert_eq!(m.total_usable(), 0x9fc00 + 0x3fff0000 - 0x100000);
        assert!(m.is_usable_ram(r(0x200000, 0x300000)));
        assert!(!m.is_usable_ram(r(0x9f000, 0xa1000)));
        assert!(!m.is_usable_ram(r(0x3ffe0000, 0x40000000)));
        assert!(!m.is_usable_ram(r(0x1000, 0x1000)));
        assert_eq!(m.kind_at(0xf0000), Some(MemoryKind::Reserved));
        assert_eq!(m.kind_at(0xa0000), None);
        assert_eq!(m.usable().count(), 2);
        assert_eq!(
            m.usable_range_containing(0x100000),
            Some(r(0x100000, 0x3fff0000))
        );
    }

    #[test]
    fn overlapping_unsorted_input_is_sanitized() {
        let m = MemoryMap::from_entries([
            e(0x100000, 0x800000, 1),
            e(0, 0xa0000, 1),
            // Reserved hole inside RAM: reserved wins.
            e(0x400000, 0x500000, 2),
            // RAM claimed over ACPI: ACPI wins.
            e(0x700000, 0x900000, 1),
            e(0x780000, 0x7a0000, 3),
            // Adjacent usable: merged.
            e(0x900000, 0xa00000, 1),
            e(0, 0, 2),
        ])
        .unwrap();
        assert_eq!(
            m.regions(),
            &[
                e(0, 0xa0000, 1),
                e(0x100000, 0x400000, 1),
                e(0x400000, 0x500000, 2),
                e(0x500000, 0x780000, 1),
                e(0x780000, 0x7a0000, 3),
                e(0x7a0000, 0xa00000, 1),
            ]
        );
        // Order of input does not matter.
        let mut entries: std::vec::Vec<_> = m.iter().copied().collect();
        entries.reverse();
        entries.push(e(0x450000, 0x460000, 1));
        assert_eq!(MemoryMap::from_entries(entries).unwrap(), m);
    }

    #[test]
    fn overlap_precedence_matches_linux() {
        // Same range given as usable, NVS and unusable: unusable (5) is the largest type.
        let m =
            MemoryMap::from_entries([e(0, 0x1000, 4), e(0, 0x1000, 1), e(0, 0x1000, 5)]).unwrap();
        assert_eq!(m.regions(), &[e(0, 0x1000, 5)]);
        // An entry spanning several existing ones.
        let m =
            MemoryMap::from_entries([e(0x1000, 0x2000, 3), e(0x3000, 0x4000, 1), e(0, 0x5000, 2)])
                .unwrap();
        // Reserved covers the usable entry but not the (more restrictive) ACPI one.
        assert_eq!(
            m.regions(),
            &[e(0, 0x1000, 2), e(0x1000, 0x2000, 3), e(0x2000, 0x5000, 2)]
        );
        // Type 0 never becomes usable RAM.
        let m = MemoryMap::from_entries([e(0, 0x2000, 1), e(0x1000, 0x2000, 0)]).unwrap();
        assert_eq!(m.regions(), &[e(0, 0x1000, 1), e(0x1000, 0x2000, 0)]);
    }

    #[test]
    fn wrapping_entry_is_clipped() {
        let region = MemoryRegion::from_base_len(u64::MAX - 0xfff, 0x2000, 2);
        assert_eq!(region.range, r(u64::MAX - 0xfff, u64::MAX));
    }

    #[test]
    fn too_many_regions_is_an_error() {
        let entries = (0..200u64).map(|i| e(i * 0x2000, i * 0x2000 + 0x1000, 1));
        assert_eq!(
            MemoryMap::from_entries(entries),
            Err(MemMapError::TooManyRegions)
        );
    }

    #[test]
    fn reservation_at_top_of_ram_below_4g() {
        let m = bochs_map();
        let got = m
            .place_reservation(96 * MIB, 2 * MIB, 4 * GIB, &[])
            .unwrap();
        // The top of 0x100000..0x3fff0000, 2 MiB aligned.
        assert_eq!(got, r(0x3fe00000 - 96 * MIB, 0x3fe00000));
        assert!(m.is_usable_ram(got));
    }

    #[test]
    fn reservation_avoids_modules_and_image() {
        let m = bochs_map();
        let module = r(0x3f000000, 0x3f100000);
        let image = r(0x3a000000, 0x3a400000);
        // 64 MiB fits between the image and the module.
        let got = m
            .place_reservation(64 * MIB, 2 * MIB, 4 * GIB, &[module, image])
            .unwrap();
        assert_eq!(got, r(0x3b000000, 0x3f000000));
        // 80 MiB does not: it goes below the image.
        let got = m
            .place_reservation(80 * MIB, 2 * MIB, 4 * GIB, &[module, image])
            .unwrap();
        assert_eq!(got, r(0x3a000000 - 80 * MIB, 0x3a000000));
        // A small one fits between the module and the top.
        let got = m
            .place_reservation(MIB, 2 * MIB, 4 * GIB, &[module])
            .unwrap();
        assert_eq!(got, r(0x3fe00000, 0x3ff00000));
        // Between the image and the module: 0x3a400000..0x3f000000 (76 MiB).
        let got = m
            .place_reservation(
                16 * MIB,
                4096,
                4 * GIB,
                &[module, image, r(0x3f100000, 0x3fff0000)],
            )
            .unwrap();
        assert_eq!(got, r(0x3f000000 - 16 * MIB, 0x3f000000));
    }

    #[test]
    fn reservation_with_ram_above_4g_respects_limit() {
        let m = MemoryMap::from_entries([
            e(0, 0x9fc00, 1),
            e(0x100000, 0xbfff0000, 1),
            e(0xbfff0000, 0xc0000000, 3),
            e(0xfffc0000, 0x1_0000_0000, 2),
            e(0x1_0000_0000, 0x4_4000_0000, 1),
        ])
        .unwrap();
        let got = m
            .place_reservation(128 * MIB, 2 * MIB, 4 * GIB, &[])
            .unwrap();
        assert_eq!(got.end, 0xbfe00000);
        // Without the limit the top of high RAM is chosen.
        let got = m
            .place_reservation(128 * MIB, 2 * MIB, u64::MAX, &[])
            .unwrap();
        assert_eq!(got, r(0x4_4000_0000 - 128 * MIB, 0x4_4000_0000));
        // A limit in the middle of a region clips it.
        let got = m
            .place_reservation(MIB, MIB, 0x2_0000_0000 + 0x1234, &[])
            .unwrap();
        assert_eq!(got, r(0x2_0000_0000 - MIB, 0x2_0000_0000));
    }

    #[test]
    fn reservation_falls_back_to_lower_region() {
        let m = MemoryMap::from_entries([e(0x100000, 0x800000, 1), e(0x1000000, 0x1100000, 1)])
            .unwrap();
        // The upper region is too small for 2 MiB.
        let got = m
            .place_reservation(2 * MIB, 2 * MIB, u64::MAX, &[])
            .unwrap();
        assert_eq!(got, r(0x600000, 0x800000));
    }

    #[test]
    fn no_room_errors() {
        let m = bochs_map();
        let err = m
            .place_reservation(2 * GIB, 2 * MIB, 4 * GIB, &[])
            .unwrap_err();
        assert_eq!(
            err,
            MemMapError::NoRoom {
                size: 2 * GIB,
                align: 2 * MIB,
                limit: 4 * GIB,
                largest_usable: 0x3fff0000 - 0x100000
            }
        );
        assert!(err
            .to_string()
            .contains("no usable RAM region below 0x100000000"));
        // Everything avoided.
        assert!(matches!(
            m.place_reservation(4096, 4096, 4 * GIB, &[r(0, 4 * GIB)]),
            Err(MemMapError::NoRoom { .. })
        ));
        // Limit below all RAM but the first 640K.
        assert!(m.place_reservation(MIB, 4096, MIB, &[]).is_err());
        assert_eq!(
            m.place_reservation(0, 4096, MIB, &[]),
            Err(MemMapError::ZeroSize)
        );
        assert_eq!(
            m.place_reservation(4096, 3000, MIB, &[]),
            Err(MemMapError::BadAlignment { align: 3000 })
        );
        assert!(MemoryMap::new()
            .place_reservation(4096, 4096, u64::MAX, &[])
            .is_err());
    }

    #[test]
    fn reservation_never_straddles_entries() {
        // Two adjacent regions of different kinds: usable then reserved then usable.
        let m =
            MemoryMap::from_entries([e(0, 0x3000, 1), e(0x3000, 0x4000, 2), e(0x4000, 0x6000, 1)])
                .unwrap();
        assert_eq!(
            m.place_reservation(0x2000, 0x1000, u64::MAX, &[]),
            Ok(r(0x4000, 0x6000))
        );
        assert_eq!(
            m.place_reservation(0x3000, 0x1000, u64::MAX, &[]),
            Ok(r(0, 0x3000))
        );
        assert!(m.place_reservation(0x4000, 0x1000, u64::MAX, &[]).is_err());
    }

    #[test]
    fn without_removes_and_splits() {
        let m = bochs_map();
        let ally = r(0x3a000000, 0x3fe00000);
        let guest = m.without(&[ally]).unwrap();
        assert_eq!(guest.len(), 7);
        assert_eq!(guest.regions()[3], e(0x100000, 0x3a000000, 1));
        assert_eq!(guest.regions()[4], e(0x3fe00000, 0x3fff0000, 1));
        assert_eq!(guest.total_usable(), m.total_usable() - ally.len());
        assert!(!guest.is_usable_ram(r(0x3a000000, 0x3a001000)));
        assert_eq!(guest.kind_at(0x3b000000), None);

        // A hidden range across entry boundaries; overlapping hidden ranges; empty hidden.
        let guest = m
            .without(&[r(0x9f000, 0x200000), r(0x150000, 0x180000), r(5, 5)])
            .unwrap();
        assert_eq!(
            &guest.regions()[..3],
            &[
                e(0, 0x9f000, 1),
                e(0x200000, 0x3fff0000, 1),
                e(0x3fff0000, 0x40000000, 3)
            ]
        );
        // Hiding everything leaves nothing.
        assert!(m.without(&[r(0, u64::MAX)]).unwrap().is_empty());
        // Hiding nothing changes nothing.
        assert_eq!(m.without(&[]).unwrap(), m);
    }

    #[test]
    fn display_lists_entries() {
        let m = MemoryMap::from_entries([e(0, 0x1000, 1), e(0x1000, 0x2000, 4)]).unwrap();
        assert_eq!(
            m.to_string(),
            "  [0x0, 0x1000) usable\n  [0x1000, 0x2000) ACPI NVS\n"
        );
    }

    /// Brute force: the sanitized map gives every sampled byte the most restrictive kind
    /// of the input entries covering it.
    #[test]
    fn sanitize_matches_brute_force() {
        let mut seed = 0x1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let entries: std::vec::Vec<MemoryRegion> = (0..(next() % 12))
                .map(|_| {
                    let s = next() % 64;
                    let l = next() % 16;
                    e(s * 0x1000, (s + l) * 0x1000, (next() % 6) as u32)
                })
                .collect();
            let m = MemoryMap::from_entries(entries.iter().copied()).unwrap();
            for w in m.regions().windows(2) {
                assert!(w[0].range.end <= w[1].range.start);
                assert!(!(w[0].range.end == w[1].range.start && w[0].kind == w[1].kind));
            }
            for page in 0..80u64 {
                let addr = page * 0x1000;
                let expect = entries
                    .iter()
                    .filter(|x| x.range.contains(addr))
                    .map(|x| x.kind)
                    .reduce(MemoryKind::most_restrictive);
                assert_eq!(m.kind_at(addr), expect, "addr {addr:#x} in {entries:?}");
            }
            // Reservations land in usable RAM and respect avoid ranges.
            let avoid = [r(0x8000, 0x10000)];
            if let Ok(p) = m.place_reservation(0x2000, 0x1000, u64::MAX, &avoid) {
                assert!(m.is_usable_ram(p));
                assert!(!p.overlaps(&avoid[0]));
            }
        }
    }
}

/// Memory maps shared by the host tests of this crate.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// Bochs/QEMU with 1 GiB of RAM, as the firmware reports it.
    pub(crate) fn bochs_map() -> MemoryMap {
        let e = |start, end, raw| {
            MemoryRegion::new(PhysRange { start, end }, MemoryKind::from_raw(raw))
        };
        MemoryMap::from_entries([
            e(0, 0x9fc00, 1),
            e(0x9fc00, 0xa0000, 2),
            e(0xf0000, 0x100000, 2),
            e(0x100000, 0x3fff0000, 1),
            e(0x3fff0000, 0x4000_0000, 3),
            e(0xfffc0000, 0x1_0000_0000, 2),
        ])
        .unwrap()
    }
}
