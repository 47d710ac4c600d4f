//! Emulation of the BIOS memory-size services (INT 15h E820h, E801h, 88h) from the
//! guest's filtered memory map.
//!
//! Ally hooks INT 15h in the guest's real-mode interrupt table; the hook traps to Ally,
//! which calls [`emulate_int15`] with the guest's registers. Anything other than the three
//! memory services is [`Int15Result::NotOurs`] and Ally chains to the original vector, so
//! the firmware keeps answering everything else.
//!
//! Register conventions follow the BIOS: only the 16-bit halves named by a service are
//! changed (the upper halves of the 32-bit registers are preserved), except for E820h,
//! which is defined on the full 32-bit registers. Errors set CF and AH=86h ("function not
//! supported"), as SeaBIOS and most BIOSes do.

use crate::addr::GuestPhysAddr;
use crate::memmap::MemoryMap;
use core::fmt;

/// 'SMAP', the E820h signature in EDX on input and EAX on output.
pub const SMAP: u32 = 0x534D_4150;
/// Size of a basic E820h entry (base, length, type).
pub const E820_ENTRY_SIZE: usize = 20;
/// Size of an ACPI 3.0 E820h entry (with the extended-attributes dword).
pub const E820_EXT_ENTRY_SIZE: usize = 24;
/// AH=88h's cap in KiB: 63 MiB above 1 MiB. The value comes from the 16-bit CMOS
/// extended-memory registers (30h/31h) and most BIOSes clamp it here so old software
/// never sees a value past 64 MiB; software that needs more uses E801h or E820h.
pub const AH88_MAX_KIB: u16 = 0xFC00;
/// E801h's cap for memory between 1 MiB and 16 MiB, in KiB (15 MiB).
pub const E801_MAX_LOW_KIB: u16 = 0x3C00;
/// AH value returned with CF set: function not supported / invalid input.
pub const AH_UNSUPPORTED: u8 = 0x86;

const MIB: u64 = 1 << 20;
const FOUR_GIB: u64 = 1 << 32;

/// The guest's registers at the INT 15h trap, and the results written back.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RealModeRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub esi: u32,
    pub edi: u32,
    /// The base of the guest's ES segment (from the VMCS guest-state area; `selector << 4`
    /// in real mode).
    pub es_base: u64,
    /// Output: the carry flag the guest's IRET must see (set = error). Ally copies it into
    /// FLAGS in the interrupt frame on the guest's stack.
    pub carry: bool,
}

impl RealModeRegs {
    fn set_ax(&mut self, v: u16) {
        self.eax = (self.eax & 0xFFFF_0000) | u32::from(v);
    }
    fn set_bx(&mut self, v: u16) {
        self.ebx = (self.ebx & 0xFFFF_0000) | u32::from(v);
    }
    fn set_cx(&mut self, v: u16) {
        self.ecx = (self.ecx & 0xFFFF_0000) | u32::from(v);
    }
    fn set_dx(&mut self, v: u16) {
        self.edx = (self.edx & 0xFFFF_0000) | u32::from(v);
    }
    fn set_ah(&mut self, v: u8) {
        self.eax = (self.eax & 0xFFFF_00FF) | (u32::from(v) << 8);
    }
}

/// Writes into guest memory (implemented by Ally over the guest's RAM as mapped in the EPT).
pub trait GuestBufferWriter {
    /// Writes all of `bytes` at `gpa`. Returns `false`, having written nothing, when any
    /// byte of the destination is not ordinary guest RAM.
    fn write(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> bool;
}

/// Why Ally answered a guest's request with CF set. These are guest mistakes, reported
/// for the log; the guest is resumed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Int15Error {
    /// E820h without EDX='SMAP'.
    BadSignature { edx: u32 },
    /// E820h with ECX below 20.
    BufferTooSmall { ecx: u32 },
    /// E820h with a continuation value past the last entry.
    BadContinuation { ebx: u32, entries: usize },
    /// The ES:DI buffer is not guest RAM.
    BufferNotWritable { gpa: GuestPhysAddr },
}

impl fmt::Display for Int15Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Int15Error::BadSignature { edx } => {
                write!(f, "INT 15h E820h: EDX={edx:#010x} is not 'SMAP'")
            }
            Int15Error::BufferTooSmall { ecx } => {
                write!(f, "INT 15h E820h: buffer size ECX={ecx} is below 20 bytes")
            }
            Int15Error::BadContinuation { ebx, entries } => write!(
                f,
                "INT 15h E820h: continuation EBX={ebx} is past the map's {entries} entries"
            ),
            Int15Error::BufferNotWritable { gpa } => {
                write!(f, "INT 15h E820h: buffer ES:DI={gpa} is not guest RAM")
            }
        }
    }
}

/// What Ally must do after [`emulate_int15`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Int15Result {
    /// Answered; registers updated, CF clear. Return to the guest.
    Handled,
    /// Answered with CF set and AH=86h; the reason is for Ally's log. Return to the guest.
    Rejected(Int15Error),
    /// Not a memory-size service; registers untouched. Chain to the original vector.
    NotOurs,
}

/// Emulates the INT 15h memory-size services from `map` (the guest's filtered map).
pub fn emulate_int15(
    regs: &mut RealModeRegs,
    map: &MemoryMap,
    guest: &mut impl GuestBufferWriter,
) -> Int15Result {
    // Dispatch on AX / AH as the BIOS does (SeaBIOS ignores the upper half of EAX).
    let ax = regs.eax as u16;
    let result = if ax == 0xE820 {
        e820(regs, map, guest)
    } else if ax == 0xE801 {
        e801(regs, map);
        Ok(())
    } else if ax >> 8 == 0x88 {
        let kib = contiguous_kib_from(map, MIB, u64::MAX).min(u64::from(AH88_MAX_KIB));
        regs.set_ax(kib as u16);
        Ok(())
    } else {
        return Int15Result::NotOurs;
    };
    match result {
        Ok(()) => {
            regs.carry = false;
            Int15Result::Handled
        }
        Err(e) => {
            regs.carry = true;
            regs.set_ah(AH_UNSUPPORTED);
            Int15Result::Rejected(e)
        }
    }
}

/// INT 15h, EAX=E820h, Query System Address Map: ACPI 6.5 section 15.1 ("INT 15H, E820H -
/// Query System Address Map"), Tables 15.1-15.4. Entries are the map's entries in order;
/// EBX is the index of the next one.
fn e820(
    regs: &mut RealModeRegs,
    map: &MemoryMap,
    guest: &mut impl GuestBufferWriter,
) -> Result<(), Int15Error> {
    if regs.edx != SMAP {
        return Err(Int15Error::BadSignature { edx: regs.edx });
    }
    if (regs.ecx as usize) < E820_ENTRY_SIZE {
        return Err(Int15Error::BufferTooSmall { ecx: regs.ecx });
    }
    let entries = map.regions();
    let index = regs.ebx as usize;
    let Some(region) = entries.get(index) else {
        return Err(Int15Error::BadContinuation {
            ebx: regs.ebx,
            entries: entries.len(),
        });
    };
    let mut entry = [0u8; E820_EXT_ENTRY_SIZE];
    entry[0..8].copy_from_slice(&region.range.start.to_le_bytes());
    entry[8..16].copy_from_slice(&region.range.len().to_le_bytes());
    entry[16..20].copy_from_slice(&region.kind.to_raw().to_le_bytes());
    // ACPI 3.0 Extended Attributes (Table 15.4): bit 0 set = "enabled, do not ignore".
    entry[20..24].copy_from_slice(&1u32.to_le_bytes());
    let size = if regs.ecx as usize >= E820_EXT_ENTRY_SIZE {
        E820_EXT_ENTRY_SIZE
    } else {
        E820_ENTRY_SIZE
    };
    // Real mode: the buffer is ES:DI, a 16-bit offset.
    let gpa = GuestPhysAddr(regs.es_base.wrapping_add(u64::from(regs.edi & 0xFFFF)));
    if !guest.write(gpa, &entry[..size]) {
        return Err(Int15Error::BufferNotWritable { gpa });
    }
    regs.eax = SMAP;
    regs.ecx = size as u32;
    regs.ebx = if index + 1 < entries.len() {
        (index + 1) as u32
    } else {
        0
    };
    Ok(())
}

/// INT 15h, AX=E801h, Get Memory Size for Large Configurations: AX=CX=KiB of contiguous
/// RAM from 1 MiB up to 16 MiB (at most 3C00h), BX=DX=64 KiB blocks of contiguous RAM from
/// 16 MiB up to 4 GiB.
fn e801(regs: &mut RealModeRegs, map: &MemoryMap) {
    let low_kib = contiguous_kib_from(map, MIB, 16 * MIB).min(u64::from(E801_MAX_LOW_KIB));
    let high_blocks = (contiguous_kib_from(map, 16 * MIB, FOUR_GIB) / 64).min(0xFFFF);
    regs.set_ax(low_kib as u16);
    regs.set_cx(low_kib as u16);
    regs.set_bx(high_blocks as u16);
    regs.set_dx(high_blocks as u16);
}

/// KiB of usable RAM contiguous from `from`, counted up to `limit`.
fn contiguous_kib_from(map: &MemoryMap, from: u64, limit: u64) -> u64 {
    map.usable_range_containing(from)
        .map_or(0, |r| (r.end.min(limit).saturating_sub(from)) / 1024)
}

/// KiB of conventional memory (usable RAM contiguous from 0, below 640 KiB) for INT 12h
/// and the BDA word at 40:13h, kept consistent with the filtered map.
pub fn conventional_memory_kib(map: &MemoryMap) -> u16 {
    contiguous_kib_from(map, 0, 640 * 1024) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PhysRange;
    use crate::memmap::{MemoryKind, MemoryRegion};

    /// Guest RAM from 0 to `mem.len()`, with an optional unwritable window.
    struct FakeGuest {
        mem: std::vec::Vec<u8>,
        forbidden: PhysRange,
    }

    impl FakeGuest {
        fn new() -> Self {
            Self {
                mem: vec![0xAA; 0x10000],
                forbidden: PhysRange::default(),
            }
        }
        fn read(&self, at: usize, len: usize) -> &[u8] {
            &self.mem[at..at + len]
        }
    }

    impl GuestBufferWriter for FakeGuest {
        fn write(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> bool {
            let Some(r) = PhysRange::from_start_len(gpa.0, bytes.len() as u64) else {
                return false;
            };
            if r.end > self.mem.len() as u64 || r.overlaps(&self.forbidden) {
                return false;
            }
            self.mem[r.start as usize..r.end as usize].copy_from_slice(bytes);
            true
        }
    }

    fn e(start: u64, end: u64, raw: u32) -> MemoryRegion {
        MemoryRegion::new(PhysRange { start, end }, MemoryKind::from_raw(raw))
    }

    /// Bochs with 1 GiB, Ally's region [0x3a000000, 0x3fe00000) removed.
    fn guest_map() -> MemoryMap {
        crate::memmap::fixtures::bochs_map()
            .without(&[PhysRange {
                start: 0x3a000000,
                end: 0x3fe00000,
            }])
            .unwrap()
    }

    fn e820_regs(ebx: u32, ecx: u32) -> RealModeRegs {
        RealModeRegs {
            eax: 0xE820,
            ebx,
            ecx,
            edx: SMAP,
            edi: 0x1000,
            es_base: 0x2000, // ES=0x200
            carry: true,
            ..Default::default()
        }
    }

    fn le64(b: &[u8]) -> u64 {
        u64::from_le_bytes(b.try_into().unwrap())
    }
    fn le32(b: &[u8]) -> u32 {
        u32::from_le_bytes(b.try_into().unwrap())
    }

    #[test]
    fn e820_walks_the_whole_map() {
        let map = guest_map();
        let mut g = FakeGuest::new();
        let mut regs = e820_regs(0, 24);
        let mut seen = std::vec::Vec::new();
        loop {
            assert_eq!(emulate_int15(&mut regs, &map, &mut g), Int15Result::Handled);
            assert!(!regs.carry);
            assert_eq!(regs.eax, SMAP);
            assert_eq!(regs.ecx, 24);
            let entry = g.read(0x3000, 24);
            seen.push(e(
                le64(&entry[0..8]),
                le64(&entry[0..8]) + le64(&entry[8..16]),
                le32(&entry[16..20]),
            ));
            assert_eq!(le32(&entry[20..24]), 1, "extended attributes: enabled");
            if regs.ebx == 0 {
                break;
            }
            // The caller passes the same registers back (Linux re-sets EAX/ECX/EDX).
            regs.eax = 0xE820;
            regs.ecx = 24;
            regs.edx = SMAP;
        }
        assert_eq!(seen.as_slice(), map.regions());
        // Ally's region is not usable RAM in what the guest saw.
        assert!(seen
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .all(|r| !r.range.overlaps(&PhysRange {
                start: 0x3a000000,
                end: 0x3fe00000
            })));
    }

    #[test]
    fn e820_20_byte_entries() {
        let map = guest_map();
        let mut g = FakeGuest::new();
        let mut regs = e820_regs(3, 20);
        assert_eq!(emulate_int15(&mut regs, &map, &mut g), Int15Result::Handled);
        assert_eq!(regs.ecx, 20);
        assert_eq!(regs.ebx, 4);
        assert_eq!(le64(g.read(0x3000, 8)), 0x100000);
        assert_eq!(le64(g.read(0x3008, 8)), 0x3a000000 - 0x100000);
        assert_eq!(le32(g.read(0x3010, 4)), 1);
        // The 21st byte is untouched.
        assert_eq!(g.read(0x3014, 4), &[0xAA; 4]);
        // A larger buffer still gets one 24-byte entry.
        let mut regs = e820_regs(0, 4096);
        assert_eq!(emulate_int15(&mut regs, &map, &mut g), Int15Result::Handled);
        assert_eq!(regs.ecx, 24);
    }

    #[test]
    fn e820_uses_16_bit_di() {
        let map = guest_map();
        let mut g = FakeGuest::new();
        let mut regs = e820_regs(0, 20);
        regs.edi = 0xFFFF_0100;
        regs.es_base = 0;
        assert_eq!(emulate_int15(&mut regs, &map, &mut g), Int15Result::Handled);
        assert_eq!(le64(g.read(0x108, 8)), 0x9fc00);
    }

    #[test]
    fn e820_bad_input_sets_carry() {
        let map = guest_map();
        let mut g = FakeGuest::new();
        let before = g.mem.clone();

        let mut regs = e820_regs(0, 24);
        regs.edx = 0x1234;
        assert_eq!(
            emulate_int15(&mut regs, &map, &mut g),
            Int15Result::Rejected(Int15Error::BadSignature { edx: 0x1234 })
        );
        assert!(regs.carry);
        assert_eq!((regs.eax >> 8) & 0xFF, 0x86);

        let mut regs = e820_regs(0, 19);
        assert_eq!(
            emulate_int15(&mut regs, &map, &mut g),
            Int15Result::Rejected(Int15Error::BufferTooSmall { ecx: 19 })
        );
        assert!(regs.carry);

        let mut regs = e820_regs(map.len() as u32, 24);
        assert_eq!(
            emulate_int15(&mut regs, &map, &mut g),
            Int15Result::Rejected(Int15Error::BadContinuation {
                ebx: map.len() as u32,
                entries: map.len()
            })
        );
        let mut regs = e820_regs(u32::MAX, 24);
        assert!(matches!(
            emulate_int15(&mut regs, &map, &mut g),
            Int15Result::Rejected(Int15Error::BadContinuation { .. })
        ));

        g.forbidden = PhysRange {
            start: 0x3000,
            end: 0x3001,
        };
        let mut regs = e820_regs(0, 24);
        assert_eq!(
            emulate_int15(&mut regs, &map, &mut g),
            Int15Result::Rejected(Int15Error::BufferNotWritable {
                gpa: GuestPhysAddr(0x3000)
            })
        );
        assert_eq!(g.mem, before, "nothing written on any error");

        // An empty map has no entry 0.
        let mut regs = e820_regs(0, 24);
        assert!(matches!(
            emulate_int15(&mut regs, &MemoryMap::new(), &mut g),
            Int15Result::Rejected(Int15Error::BadContinuation { entries: 0, .. })
        ));
        assert_eq!(
            Int15Error::BadSignature { edx: 0x1234 }.to_string(),
            "INT 15h E820h: EDX=0x00001234 is not 'SMAP'"
        );
    }

    #[test]
    fn e801_reports_contiguous_ram() {
        let map = guest_map();
        let mut g = FakeGuest::new();
        let mut regs = RealModeRegs {
            eax: 0xABCD_E801,
            ebx: 0x1111_0000,
            carry: true,
            ..Default::default()
        };
        assert_eq!(emulate_int15(&mut regs, &map, &mut g), Int15Result::Handled);
        assert!(!regs.carry);
        assert_eq!(regs.eax, 0xABCD_3C00, "15 MiB, upper half preserved");
        assert_eq!(regs.ecx & 0xFFFF, 0x3C00);
        // 16 MiB .. 0x3a000000 (Ally's region starts there) in 64 KiB blocks.
        let blocks = (0x3a000000 - 16 * MIB) / 0x10000;
        assert_eq!(regs.ebx, 0x1111_0000 | blocks as u32);
        assert_eq!(regs.edx & 0xFFFF, blocks as u32);
    }

    #[test]
    fn e801_small_machine_and_holes() {
        // 8 MiB machine.
        let map = MemoryMap::from_entries([e(0, 0x9fc00, 1), e(MIB, 8 * MIB, 1)]).unwrap();
        let mut regs = RealModeRegs {
            eax: 0xE801,
            ..Default::default()
        };
        emulate_int15(&mut regs, &map, &mut FakeGuest::new());
        assert_eq!(regs.eax, 7 * 1024);
        assert_eq!(regs.ebx, 0);
        // ISA hole at 15-16 MiB: the low count stops at the hole, the high count is separate.
        let map = MemoryMap::from_entries([
            e(MIB, 15 * MIB, 1),
            e(16 * MIB, 64 * MIB, 1),
            e(64 * MIB, 80 * MIB, 2),
        ])
        .unwrap();
        let mut regs = RealModeRegs {
            eax: 0xE801,
            ..Default::default()
        };
        emulate_int15(&mut regs, &map, &mut FakeGuest::new());
        assert_eq!(regs.eax, 14 * 1024);
        assert_eq!(regs.ebx, 48 * 16);
        // RAM above 4 GiB is not counted.
        let map = MemoryMap::from_entries([e(MIB, 8 << 30, 1)]).unwrap();
        let mut regs = RealModeRegs {
            eax: 0xE801,
            ..Default::default()
        };
        emulate_int15(&mut regs, &map, &mut FakeGuest::new());
        assert_eq!(regs.ebx, ((FOUR_GIB - 16 * MIB) / 0x10000) as u32);
    }

    #[test]
    fn ah88_is_capped() {
        let map = guest_map();
        let mut regs = RealModeRegs {
            eax: 0x8800,
            carry: true,
            ..Default::default()
        };
        assert_eq!(
            emulate_int15(&mut regs, &map, &mut FakeGuest::new()),
            Int15Result::Handled
        );
        assert_eq!(regs.eax, 0xFC00);
        assert!(!regs.carry);
        let map = MemoryMap::from_entries([e(MIB, 9 * MIB, 1)]).unwrap();
        let mut regs = RealModeRegs {
            eax: 0x88FF,
            ..Default::default()
        };
        emulate_int15(&mut regs, &map, &mut FakeGuest::new());
        assert_eq!(regs.eax, 8 * 1024);
        // No RAM at 1 MiB.
        let mut regs = RealModeRegs {
            eax: 0x8800,
            ..Default::default()
        };
        emulate_int15(&mut regs, &MemoryMap::new(), &mut FakeGuest::new());
        assert_eq!(regs.eax, 0);
    }

    #[test]
    fn other_services_are_not_ours() {
        let map = guest_map();
        for eax in [0xC000, 0x8600, 0xE980, 0x2401, 0xE802, 0x0000_4F00] {
            let mut regs = RealModeRegs {
                eax,
                ebx: 7,
                carry: true,
                ..Default::default()
            };
            let before = regs;
            assert_eq!(
                emulate_int15(&mut regs, &map, &mut FakeGuest::new()),
                Int15Result::NotOurs
            );
            assert_eq!(regs, before);
        }
    }

    /// Counts writes; refuses buffers above 96 KiB.
    #[derive(Default)]
    struct Counting {
        calls: usize,
        bytes: usize,
    }

    impl GuestBufferWriter for Counting {
        fn write(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> bool {
            self.calls += 1;
            self.bytes += bytes.len();
            gpa.0 < 0x1_8000
        }
    }

    /// Arbitrary guest registers never panic, never write outside the buffer, and either
    /// answer with CF clear, reject with CF set, or leave the registers untouched.
    #[test]
    fn random_guest_registers() {
        let map = guest_map();
        let mut seed = 0x0123_4567_89AB_CDEF_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000 {
            let mut regs = RealModeRegs {
                eax: match i % 4 {
                    0 => 0xE820,
                    1 => 0xE801,
                    2 => 0x8800 | (next() as u32 & 0xFF),
                    _ => next() as u32,
                },
                ebx: if i % 3 == 0 {
                    next() as u32 % 12
                } else {
                    next() as u32
                },
                ecx: next() as u32 % 64,
                edx: if i % 2 == 0 { SMAP } else { next() as u32 },
                esi: next() as u32,
                edi: next() as u32,
                es_base: next() % 0x1_0000,
                carry: next() % 2 == 0,
            };
            let before = regs;
            let mut g = Counting::default();
            match emulate_int15(&mut regs, &map, &mut g) {
                Int15Result::Handled => assert!(!regs.carry),
                Int15Result::Rejected(_) => assert!(regs.carry),
                Int15Result::NotOurs => assert_eq!(regs, before),
            }
            assert!(g.calls <= 1 && g.bytes <= E820_EXT_ENTRY_SIZE);
        }
    }

    #[test]
    fn conventional_memory() {
        assert_eq!(conventional_memory_kib(&guest_map()), 639);
        let map = MemoryMap::from_entries([e(0, 0x100000, 1)]).unwrap();
        assert_eq!(conventional_memory_kib(&map), 640);
        assert_eq!(conventional_memory_kib(&MemoryMap::new()), 0);
    }
}
