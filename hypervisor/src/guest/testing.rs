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

/// Reads fuzz input little-endian, yielding zeros once it runs out.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// A `fmt::Write` that discards everything (to run the `Display` impls).
struct Sink;

impl fmt::Write for Sink {
    fn write_str(&mut self, _: &str) -> fmt::Result {
        Ok(())
    }
}

/// Number of guest pages [`check_emulation_invariants`] builds from its input.
pub const FUZZ_PAGES: usize = 8;

/// Length of the fixed header of a [`check_emulation_invariants`] input, in this order:
/// mode u8, flags u8, cr3 u16, maxphyaddr u8, rip u64, cs base u32, es/ss base u16 each,
/// ds base u32, fs/gs base u64 each, small-register mask u16, rax..r15 u64 each, access u8,
/// gpa u32, device read value u64, probe linear address u64 (all little-endian). The rest
/// fills guest-physical pages 0, 1, … (4 KiB each).
pub const FUZZ_HEADER_LEN: usize = 192;

/// Builds a guest (CPU state, up to [`FUZZ_PAGES`] pages of RAM at guest-physical
/// 0..0x8000 holding page tables and code, an MMIO device) from arbitrary bytes, runs
/// [`super::emulate::emulate_mmio`], [`super::paging_walk::translate`] and
/// [`super::decode::decode_mmio`] on it, and checks what must hold whatever the input:
///
/// - nothing panics (all arithmetic on guest values is checked or wrapping);
/// - a refused access leaves the CPU state untouched and never reaches the device;
/// - an emulated access reaches the device exactly once, at the faulting address and the
///   decoded width, writes only its destination register (loads) or no register (stores),
///   and moves RIP by the instruction length within the mode's IP width.
///
/// Returns whether the access was emulated (rather than refused). This is a test harness:
/// it panics when an invariant breaks, which is what the fuzz target (`fuzz/`) and the host
/// test that feeds it pseudo-random inputs look for.
pub fn check_emulation_invariants(data: &[u8]) -> bool {
    use super::decode::decode_mmio;
    use super::emulate::{emulate_mmio, MmioDirection};
    use super::paging_walk::translate;
    use super::state::{bits, AccessKind, CpuMode, GuestCpuState, GuestRegisters, SegmentBases};

    let mut c = Cursor(data);
    let mode = c.u8();
    let flags = c.u8();
    let flag = |bit: u8, value: u64| if flags & (1 << bit) != 0 { value } else { 0 };
    // Paging mode: 0 real, 1 protected without paging, 2 32-bit paging, 3 PAE, 4 4-level,
    // 5 5-level; CS.L/CS.D chosen separately so that odd combinations are reached too.
    let (cr0, cr4, efer) = match mode % 6 {
        0 => (0, 0, 0),
        1 => (bits::CR0_PE, 0, 0),
        2 => (bits::CR0_PE | bits::CR0_PG, bits::CR4_PSE, 0),
        3 => (bits::CR0_PE | bits::CR0_PG, bits::CR4_PAE, 0),
        4 => (
            bits::CR0_PE | bits::CR0_PG,
            bits::CR4_PAE,
            bits::EFER_LME | bits::EFER_LMA,
        ),
        _ => (
            bits::CR0_PE | bits::CR0_PG,
            bits::CR4_PAE | bits::CR4_LA57,
            bits::EFER_LME | bits::EFER_LMA,
        ),
    };
    let cs_access_rights = match (mode / 6) % 4 {
        0 => 0x9b,
        1 => 0x9b | bits::AR_DB,
        2 => 0x9b | bits::AR_L,
        _ => 0x9b | bits::AR_L | bits::AR_DB,
    };
    let mut cpu = GuestCpuState {
        cr0: cr0 | flag(0, bits::CR0_WP),
        cr3: u64::from(c.u16()) & 0x7fe0,
        cr4: cr4 | flag(1, bits::CR4_SMEP) | flag(2, bits::CR4_SMAP),
        efer: efer | flag(3, bits::EFER_NXE),
        rflags: 2 | flag(4, bits::RFLAGS_AC) | flag(5, bits::RFLAGS_VM),
        cs_selector: 0,
        cs_access_rights,
        ss_access_rights: if flags & (1 << 6) != 0 { 0xf3 } else { 0x93 },
        max_phys_addr_bits: c.u8(),
        ..Default::default()
    };
    cpu.rip = c.u64();
    cpu.cs_base = u64::from(c.u32());
    cpu.segment_bases = SegmentBases {
        es: u64::from(c.u16()),
        ss: u64::from(c.u16()),
        ds: u64::from(c.u32()),
        fs: c.u64(),
        gs: c.u64(),
    };
    // Registers: a bit set in `small` keeps only the low 16 bits (addresses that land on
    // the guest's pages), the others take all 64.
    let small = c.u16();
    let mut regs = [0u64; 16];
    for (i, r) in regs.iter_mut().enumerate() {
        let v = c.u64();
        *r = if small & (1 << i) != 0 { v & 0xffff } else { v };
    }
    cpu.regs = GuestRegisters {
        rax: regs[0],
        rcx: regs[1],
        rdx: regs[2],
        rbx: regs[3],
        rsp: regs[4],
        rbp: regs[5],
        rsi: regs[6],
        rdi: regs[7],
        r8: regs[8],
        r9: regs[9],
        r10: regs[10],
        r11: regs[11],
        r12: regs[12],
        r13: regs[13],
        r14: regs[14],
        r15: regs[15],
    };
    let access = match c.u8() % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let gpa = GuestPhysAddr(u64::from(c.u32()));
    let read_value = c.u64();
    let probe_gla = c.u64();

    let mut mem = FakeGuestMemory::<FUZZ_PAGES>::new();
    for page in 0..FUZZ_PAGES {
        let at = GuestPhysAddr((page as u64) * PAGE_SIZE);
        let take = c.0.len().min(PAGE);
        let (chunk, rest) = c.0.split_at(take);
        c.0 = rest;
        // Pages past the end of the input stay unmapped (not RAM).
        if chunk.is_empty() {
            break;
        }
        if mem.load(at, chunk).is_err() {
            break;
        }
    }

    // Translation and decoding on their own.
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
        if let Err(e) = translate(&cpu, probe_gla, kind, &mem) {
            let _ = fmt::write(&mut Sink, format_args!("{e}"));
        }
    }
    for m in [CpuMode::Bits16, CpuMode::Bits32, CpuMode::Bits64] {
        match decode_mmio(data, m, cpu.rip) {
            Ok(i) => {
                assert!((1..=15).contains(&i.len), "length {} out of range", i.len);
                // The prefix-scan address size agrees with the decoder's registers.
                for r in [i.mem.base, i.mem.index].into_iter().flatten() {
                    assert_eq!(
                        r.width().bytes() * 8,
                        u64::from(i.mem.address_bits),
                        "address size vs {r} in {:?}",
                        i.bytes
                    );
                }
            }
            Err(e) => {
                let _ = fmt::write(&mut Sink, format_args!("{e}"));
            }
        }
    }

    let before = cpu;
    let mut dev = RecordingMmio::new(read_value);
    match emulate_mmio(&mut cpu, gpa, access, &mem, &mut dev) {
        Err(e) => {
            let _ = fmt::write(&mut Sink, format_args!("{e}"));
            assert_eq!(cpu, before, "a refused access changed the guest: {e:?}");
            assert!(
                dev.log.is_empty(),
                "a refused access reached the device: {e:?}"
            );
            false
        }
        Ok(a) => {
            let _ = fmt::write(&mut Sink, format_args!("{a}"));
            assert_eq!(dev.log.len(), 1, "one device access per instruction");
            let rec = dev.log[0];
            assert_eq!((rec.gpa, rec.width), (gpa, a.width));
            assert!(access != AccessKind::Fetch);
            match a.direction {
                MmioDirection::Read => assert_eq!(rec.written, None),
                MmioDirection::Write => {
                    assert_eq!(rec.written, Some(a.value));
                    assert_eq!(a.dest, None);
                }
            }
            assert_eq!(a.value & !a.width.mask(), 0, "value wider than the access");
            let len = a.instruction.len as u64;
            assert!((1..=15).contains(&len));
            let ip_mask = match before.mode() {
                CpuMode::Bits16 => 0xffff,
                CpuMode::Bits32 => 0xffff_ffff,
                CpuMode::Bits64 => u64::MAX,
            };
            assert_eq!(cpu.rip, before.rip.wrapping_add(len) & ip_mask);
            let changed_other = (0..16u8).any(|i| {
                Some(i) != a.dest.map(|d| d.index()) && cpu.regs.get(i) != before.regs.get(i)
            });
            assert!(
                !changed_other,
                "a register other than the destination changed"
            );
            let mut rest = cpu;
            rest.regs = before.regs;
            rest.rip = before.rip;
            assert_eq!(rest, before, "state other than registers and RIP changed");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the fuzz harness pseudo-random inputs on the stable toolchain, so that the
    /// invariants are checked in every test run and not only under `cargo fuzz`. Half the
    /// inputs are real-mode guests with a supported MOV at RIP whose operand is the faulting
    /// address, so that the emulation path itself is exercised, not only the refusals.
    #[test]
    fn emulation_invariants_hold_for_pseudo_random_guests() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        // (code, is a store); every operand is [bx], [di], [si] or moffs16 = V.
        const MOVS: [(&[u8], bool); 7] = [
            (&[0x89, 0x07], true),              // mov [bx], ax
            (&[0x8b, 0x05], false),             // mov ax, [di]
            (&[0x66, 0x0f, 0xb6, 0x04], false), // movzx eax, byte [si]
            (&[0xc6, 0x07, 0x5a], true),        // mov byte [bx], 0x5a
            (&[0x88, 0x27], true),              // mov [bx], ah
            (&[0x66, 0x0f, 0xbf, 0x04], false), // movsx eax, word [si]
            (&[0xa1, 0, 0], false),             // mov ax, [moffs16]
        ];
        let mut emulated = 0;
        let mut buf = std::vec![0u8; FUZZ_HEADER_LEN + 2 * PAGE];
        for round in 0..4000 {
            let len = if round % 2 == 0 {
                buf.len()
            } else {
                (next() as usize) % buf.len()
            };
            for b in buf[..len].iter_mut() {
                *b = next() as u8;
            }
            if round % 2 == 0 {
                let v = (next() & 0x7ff0) as u16; // never crossing a page
                let rip = (next() & 0x0ff0) as usize;
                let (code, store) = MOVS[(next() as usize) % MOVS.len()];
                let mut h = std::vec::Vec::new();
                h.extend_from_slice(&[0, 0]); // real mode, no flags
                h.extend_from_slice(&0u16.to_le_bytes()); // cr3
                h.push(0); // maxphyaddr
                h.extend_from_slice(&(rip as u64).to_le_bytes());
                h.extend_from_slice(&[0; 4 + 2 + 2 + 4 + 8 + 8]); // segment bases
                h.extend_from_slice(&0xffffu16.to_le_bytes()); // all registers small
                for _ in 0..16 {
                    h.extend_from_slice(&(u64::from(v) | (next() << 16)).to_le_bytes());
                }
                h.push(if store { 1 } else { 0 });
                h.extend_from_slice(&u32::from(v).to_le_bytes());
                assert_eq!(h.len() + 16, FUZZ_HEADER_LEN);
                buf[..h.len()].copy_from_slice(&h);
                let at = FUZZ_HEADER_LEN + rip;
                buf[at..at + code.len()].copy_from_slice(code);
                if code[0] == 0xa1 {
                    buf[at + 1..at + 3].copy_from_slice(&v.to_le_bytes());
                }
            }
            let did_emulate = check_emulation_invariants(&buf[..len]);
            if round % 2 == 0 {
                // Everything the MOV needs is in place: it must be emulated.
                assert!(did_emulate, "round {round} was refused");
                emulated += 1;
            }
        }
        assert_eq!(emulated, 2000);
    }

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
