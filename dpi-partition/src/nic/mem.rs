//! Memory as the DPI core and the NIC see it, and the validator every guest-supplied address
//! goes through.
//!
//! Guest descriptors and ring bases hold guest-physical addresses. Before the DPI core follows
//! one, [`MemoryPolicy::check`] proves the whole range lies inside one guest RAM range and
//! touches no protected range (Ally's image, the DPI partition), and only then yields the
//! host-physical address (Ally's EPT is an identity map, so the value is unchanged but the type
//! records that it was checked). DPI-owned rings and buffers are addressed directly.

use ally_hypervisor::addr::{GuestPhysAddr, HostPhysAddr, PhysRange};
use core::fmt;

/// Errors of this module: a refused guest range (the reasons are counted per drop) or a bad
/// policy or DMA access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemError {
    /// A zero-length range where data was required.
    ZeroLength,
    /// `address + length` wraps around the 64-bit space.
    Overflow { addr: u64, len: u64 },
    /// The range starts outside every guest RAM range.
    OutsideRam { addr: u64, len: u64 },
    /// The range overlaps Ally's or the DPI partition's memory.
    Protected { addr: u64, len: u64 },
    /// The range starts in guest RAM but runs past the end of its RAM range.
    Straddles { addr: u64, len: u64 },
    /// More ranges than a policy holds.
    TooManyRanges { given: usize, max: usize },
    /// A policy range with `end <= start`.
    EmptyRange(PhysRange),
    /// A DMA access outside the memory an implementation backs (a bug or a bad layout).
    DmaOutOfBounds { addr: u64, len: u64 },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ZeroLength => f.write_str("zero-length buffer"),
            Self::Overflow { addr, len } => {
                write!(f, "range {addr:#x} + {len:#x} overflows the address space")
            }
            Self::OutsideRam { addr, len } => {
                write!(f, "range {addr:#x} + {len:#x} is outside guest RAM")
            }
            Self::Protected { addr, len } => {
                write!(f, "range {addr:#x} + {len:#x} reaches Ally or DPI memory")
            }
            Self::Straddles { addr, len } => {
                write!(
                    f,
                    "range {addr:#x} + {len:#x} straddles the end of a RAM range"
                )
            }
            Self::TooManyRanges { given, max } => {
                write!(f, "{given} memory ranges given, at most {max} supported")
            }
            Self::EmptyRange(r) => write!(f, "memory range {r} is empty"),
            Self::DmaOutOfBounds { addr, len } => {
                write!(
                    f,
                    "DMA access {addr:#x} + {len:#x} is outside backed memory"
                )
            }
        }
    }
}

/// Physical memory as bus-master DMA sees it (identity-mapped on Ally, a byte array in tests).
///
/// `&self` throughout: the guest, the NIC and the DPI core all access it concurrently; the ring
/// protocol (descriptor ownership handed over by register writes and DD bits) orders accesses.
pub trait DmaMemory {
    /// Copy `buf.len()` bytes out of memory at `pa`.
    fn read(&self, pa: HostPhysAddr, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copy `data` into memory at `pa`.
    fn write(&self, pa: HostPhysAddr, data: &[u8]) -> Result<(), MemError>;
    /// Borrow `len` bytes in place (zero-copy inspection, DPI buffers). The caller must own the
    /// range under the ring protocol for as long as the borrow lives; guest memory borrowed this
    /// way can still be changed by a misbehaving guest (the zero-copy mode's documented TOCTOU).
    fn borrow(&self, pa: HostPhysAddr, len: usize) -> Result<&[u8], MemError>;
    /// A window for repeated volatile access to `len` bytes at `pa` (descriptor rings).
    fn window(&self, pa: HostPhysAddr, len: usize) -> Result<DmaWindow<'_>, MemError>;
}

/// A bounds-checked view of `len` bytes of DMA memory, for the engine's hot ring accesses
/// (descriptor rings are read and written many times per poll; going through [`DmaMemory`]
/// each time costs a range check and a `Result` per access). Accesses are volatile: the other
/// side (guest or NIC) changes this memory behind the compiler's back.
#[derive(Clone, Copy)]
pub struct DmaWindow<'a> {
    ptr: *mut u8,
    len: usize,
    /// `len - 7` (saturating): an 8-byte access at `off` is in bounds iff `off < end8`.
    end8: usize,
    /// Whole 16-byte descriptors in the window when it starts 16-byte aligned, else 0.
    ndesc: usize,
    _life: core::marker::PhantomData<&'a u8>,
}

impl<'a> DmaWindow<'a> {
    /// A window of no bytes (every access out of bounds).
    pub const fn empty() -> Self {
        Self {
            ptr: core::ptr::null_mut(),
            len: 0,
            end8: 0,
            ndesc: 0,
            _life: core::marker::PhantomData,
        }
    }
}

impl DmaWindow<'_> {
    /// A window onto `[ptr, ptr + len)`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for the window's lifetime
    /// (memory that the implementor of [`DmaMemory`] backs).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr,
            len,
            end8: len.saturating_sub(7),
            ndesc: if (ptr as usize).is_multiple_of(16) {
                len / 16
            } else {
                0
            },
            _life: core::marker::PhantomData,
        }
    }

    /// Window length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read a little-endian u64 at `off` (0 when out of bounds, which the engine's ring
    /// arithmetic never produces).
    #[inline(always)]
    pub fn read_u64(&self, off: usize) -> u64 {
        if off < self.end8 {
            // SAFETY: `off + 8 <= len` (checked), so `p` is in the window.
            let p = unsafe { self.ptr.add(off) };
            if p as usize & 7 == 0 {
                // SAFETY: in bounds, 8-byte aligned (checked), valid memory per `new`.
                u64::from_le(unsafe { core::ptr::read_volatile(p as *const u64) })
            } else {
                // SAFETY: in bounds; `[u8; 8]` has no alignment requirement.
                u64::from_le_bytes(unsafe { core::ptr::read_volatile(p as *const [u8; 8]) })
            }
        } else {
            0
        }
    }

    /// Write a little-endian u64 at `off` (ignored when out of bounds).
    #[inline(always)]
    pub fn write_u64(&self, off: usize, v: u64) {
        if off < self.end8 {
            // SAFETY: `off + 8 <= len` (checked), so `p` is in the window.
            let p = unsafe { self.ptr.add(off) };
            if p as usize & 7 == 0 {
                // SAFETY: in bounds, 8-byte aligned (checked), valid memory per `new`.
                unsafe { core::ptr::write_volatile(p as *mut u64, v.to_le()) };
            } else {
                // SAFETY: in bounds; `[u8; 8]` has no alignment requirement.
                unsafe { core::ptr::write_volatile(p as *mut [u8; 8], v.to_le_bytes()) };
            }
        }
    }

    /// Descriptor `i`'s low (`half` 0) or high (`half` 1) quadword; 0 when `i` is outside
    /// the window. One comparison: descriptors are aligned by construction.
    #[inline(always)]
    pub fn desc_u64(&self, i: u32, half: usize) -> u64 {
        if (i as usize) < self.ndesc {
            // SAFETY: descriptor `i` lies inside the window (`i < len / 16`), the window starts
            // 16-byte aligned (checked in `new`), so the quadword is aligned and in bounds.
            u64::from_le(unsafe {
                core::ptr::read_volatile((self.ptr as *const u64).add(i as usize * 2 + (half & 1)))
            })
        } else {
            0
        }
    }

    /// Write descriptor `i`'s low or high quadword (ignored when outside the window).
    #[inline(always)]
    pub fn set_desc_u64(&self, i: u32, half: usize, v: u64) {
        if (i as usize) < self.ndesc {
            // SAFETY: as in `desc_u64`.
            unsafe {
                core::ptr::write_volatile(
                    (self.ptr as *mut u64).add(i as usize * 2 + (half & 1)),
                    v.to_le(),
                )
            };
        }
    }

    /// Write both quadwords of descriptor `i` (low first; ignored when outside the window):
    /// one range check for the descriptor.
    #[inline(always)]
    pub fn set_desc(&self, i: u32, lo: u64, hi: u64) {
        if (i as usize) < self.ndesc {
            // SAFETY: as in `desc_u64`; both quadwords belong to descriptor `i`.
            unsafe {
                let p = (self.ptr as *mut u64).add(i as usize * 2);
                core::ptr::write_volatile(p, lo.to_le());
                core::ptr::write_volatile(p.add(1), hi.to_le());
            }
        }
    }

    /// Byte `b` (0..16) of descriptor `i`; 0 when outside the window.
    #[inline(always)]
    pub fn desc_u8(&self, i: u32, b: usize) -> u8 {
        if (i as usize) < self.ndesc {
            // SAFETY: descriptor `i` is inside the window and `b & 15` stays inside it.
            unsafe { core::ptr::read_volatile(self.ptr.add(i as usize * 16 + (b & 15))) }
        } else {
            0
        }
    }

    /// Byte `b` (0..16) of descriptor `i`, `None` when `i` is outside the window (one
    /// comparison that can double as the caller's test for an out-of-range sentinel index).
    #[inline(always)]
    pub fn try_desc_u8(&self, i: u32, b: usize) -> Option<u8> {
        if (i as usize) < self.ndesc {
            // SAFETY: as in `desc_u8`.
            Some(unsafe { core::ptr::read_volatile(self.ptr.add(i as usize * 16 + (b & 15))) })
        } else {
            None
        }
    }

    /// Write byte `b` (0..16) of descriptor `i` (ignored when outside the window).
    #[inline(always)]
    pub fn set_desc_u8(&self, i: u32, b: usize, v: u8) {
        if (i as usize) < self.ndesc {
            // SAFETY: as in `desc_u8`.
            unsafe { core::ptr::write_volatile(self.ptr.add(i as usize * 16 + (b & 15)), v) };
        }
    }

    /// Descriptors `first..first + count` as a [`DescRun`], checked once here so that a loop
    /// over the run needs no per-access range check (its accessors compare against the run's
    /// own length, which the loop bound already implies). Empty unless every descriptor of the
    /// run lies inside the window.
    #[inline(always)]
    pub fn run(&self, first: u32, count: u32) -> DescRun<'_> {
        let (first, count) = (first as usize, count as usize);
        // u32 operands: the sum cannot overflow a usize.
        let count = if first + count <= self.ndesc {
            count
        } else {
            0
        };
        DescRun {
            // `wrapping_add`: no dereference happens unless `count > 0`, which implies
            // `first < ndesc`, i.e. the pointer stays inside the window.
            ptr: (self.ptr as *mut u64).wrapping_add(first * 2),
            count,
            _life: core::marker::PhantomData,
        }
    }

    /// Read the byte at `off` (0 when out of bounds).
    #[inline(always)]
    pub fn read_u8(&self, off: usize) -> u8 {
        if off < self.len {
            // SAFETY: in bounds (checked); valid memory per `new`'s contract.
            unsafe { core::ptr::read_volatile(self.ptr.add(off)) }
        } else {
            0
        }
    }

    /// Write the byte at `off` (ignored when out of bounds).
    #[inline(always)]
    pub fn write_u8(&self, off: usize, v: u8) {
        if off < self.len {
            // SAFETY: in bounds (checked); valid memory per `new`'s contract.
            unsafe { core::ptr::write_volatile(self.ptr.add(off), v) };
        }
    }
}

/// One allowed guest range windowed for a hot path's inline buffer test ([`FastRange::bytes`]),
/// which accepts exactly what [`MemoryPolicy::check`] accepts inside that range, in two
/// unsigned comparisons (the first of which doubles as the caller's length limit).
#[derive(Clone, Copy)]
pub struct FastRange<'a> {
    start: u64,
    /// The range's length `W` (the window's length).
    span: u64,
    /// Longest buffer accepted: `min(max_len, W)` as given to [`FastRange::new`], 0 when there
    /// is no window (then nothing is accepted). A u64 like `len` in `bytes`' arithmetic.
    max_len: u64,
    win: DmaWindow<'a>,
}

impl<'a> FastRange<'a> {
    /// A range that accepts nothing.
    pub const fn empty() -> Self {
        Self {
            start: 0,
            span: 0,
            max_len: 0,
            win: DmaWindow::empty(),
        }
    }

    /// The policy's largest allowed range windowed in `mem`, for buffers of at most `max_len`
    /// bytes (empty when there is no allowed range or `mem` cannot window it).
    pub fn largest<M: DmaMemory>(policy: &MemoryPolicy, mem: &'a M, max_len: u32) -> Self {
        let (start, end) = policy.largest_allowed();
        let span = end - start;
        let Ok(n) = usize::try_from(span) else {
            return Self::empty();
        };
        match mem.window(HostPhysAddr(start), n) {
            Ok(win) if span != 0 => Self::new(start, win, max_len),
            _ => Self::empty(),
        }
    }

    /// `win` standing for physical `[start, start + win.len())`, which the caller has checked
    /// to be one allowed range of its policy.
    pub fn new(start: u64, win: DmaWindow<'a>, max_len: u32) -> Self {
        let span = win.len() as u64;
        Self {
            start,
            span,
            max_len: span.min(u64::from(max_len)),
            win,
        }
    }

    /// The buffer `[addr, addr + len)` in place when `1 <= len <= max_len` and it lies inside
    /// the range, else `None` (the caller then asks [`MemoryPolicy::check`]).
    ///
    /// Exactness (with `W = span`, `off = addr - start` modulo 2^64): the first comparison
    /// gives `1 <= len <= max_len <= W`, so `W - len` does not wrap. If `addr >= start`,
    /// `off = addr - start` and `off <= W - len` is `addr + len <= start + W`, i.e. the buffer
    /// ends inside the range (no overflow: `start + W` is the range's end, a u64). If
    /// `addr < start`, `off = 2^64 - (start - addr) >= 2^64 - start`, while
    /// `W - len < W <= 2^64 - 1 - start`, so the buffer is refused. Hence this accepts exactly
    /// the non-empty buffers of at most `max_len` bytes inside `[start, start + W)`, each of
    /// which `MemoryPolicy::check` accepts (at the same address: the range is allowed).
    #[inline(always)]
    pub fn bytes(&self, addr: u64, len: u64) -> Option<&'a [u8]> {
        if len.wrapping_sub(1) < self.max_len {
            let off = addr.wrapping_sub(self.start);
            if off <= self.span - len {
                // SAFETY: `off + len <= span == win.len()` (shown above), so the bytes lie
                // inside the window, valid memory per `DmaWindow::new` for `'a`.
                return Some(unsafe {
                    core::slice::from_raw_parts(self.win.ptr.add(off as usize), len as usize)
                });
            }
        }
        None
    }
}

/// Consecutive whole descriptors of a [`DmaWindow`] (see [`DmaWindow::run`]), indexed from 0.
#[derive(Clone, Copy)]
pub struct DescRun<'a> {
    /// Descriptor 0's first quadword (16-byte aligned when `count > 0`).
    ptr: *mut u64,
    count: usize,
    _life: core::marker::PhantomData<&'a u8>,
}

impl DescRun<'_> {
    /// Descriptors in the run.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the run is empty.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Descriptor `k`'s low (`half` 0) or high (`half` 1) quadword; 0 when `k` is outside the
    /// run.
    #[inline(always)]
    pub fn get(&self, k: usize, half: usize) -> u64 {
        if k < self.count {
            // SAFETY: descriptor `k` of the run is descriptor `first + k < ndesc` of its window
            // (`DmaWindow::run`), 16-byte aligned and valid per `DmaWindow::new`.
            u64::from_le(unsafe { core::ptr::read_volatile(self.ptr.add(k * 2 + (half & 1))) })
        } else {
            0
        }
    }

    /// Write descriptor `k`'s low or high quadword (ignored when outside the run).
    #[inline(always)]
    pub fn set(&self, k: usize, half: usize, v: u64) {
        if k < self.count {
            // SAFETY: as in `get`.
            unsafe { core::ptr::write_volatile(self.ptr.add(k * 2 + (half & 1)), v.to_le()) };
        }
    }

    /// Byte `b` (0..16) of descriptor `k`; 0 when outside the run.
    #[inline(always)]
    pub fn get_u8(&self, k: usize, b: usize) -> u8 {
        if k < self.count {
            // SAFETY: as in `get`; `b & 15` stays inside the descriptor.
            unsafe { core::ptr::read_volatile((self.ptr.add(k * 2) as *const u8).add(b & 15)) }
        } else {
            0
        }
    }

    /// Write byte `b` (0..16) of descriptor `k` (ignored when outside the run).
    #[inline(always)]
    pub fn set_u8(&self, k: usize, b: usize, v: u8) {
        if k < self.count {
            // SAFETY: as in `get_u8`.
            unsafe { core::ptr::write_volatile((self.ptr.add(k * 2) as *mut u8).add(b & 15), v) };
        }
    }
}

impl<T: DmaMemory + ?Sized> DmaMemory for &T {
    fn window(&self, pa: HostPhysAddr, len: usize) -> Result<DmaWindow<'_>, MemError> {
        (**self).window(pa, len)
    }
    fn read(&self, pa: HostPhysAddr, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(pa, buf)
    }
    fn write(&self, pa: HostPhysAddr, data: &[u8]) -> Result<(), MemError> {
        (**self).write(pa, data)
    }
    fn borrow(&self, pa: HostPhysAddr, len: usize) -> Result<&[u8], MemError> {
        (**self).borrow(pa, len)
    }
}

/// Most RAM (or protected) ranges a policy holds; real E820 maps have a handful.
pub const MAX_RANGES: usize = 32;

/// Which guest-physical ranges a guest-supplied address may reach.
#[derive(Debug, Clone)]
pub struct MemoryPolicy {
    /// Guest RAM minus protected ranges, sorted: a valid range lies inside one of these.
    allowed: [PhysRange; MAX_RANGES * 2],
    n_allowed: usize,
    ram: [PhysRange; MAX_RANGES],
    n_ram: usize,
    protected: [PhysRange; MAX_RANGES],
    n_protected: usize,
}

impl MemoryPolicy {
    /// A policy from the guest's RAM ranges and the ranges it must never reach.
    pub fn new(ram: &[PhysRange], protected: &[PhysRange]) -> Result<Self, MemError> {
        for given in [ram.len(), protected.len()] {
            if given > MAX_RANGES {
                return Err(MemError::TooManyRanges {
                    given,
                    max: MAX_RANGES,
                });
            }
        }
        if let Some(r) = ram.iter().chain(protected).find(|r| r.is_empty()) {
            return Err(MemError::EmptyRange(*r));
        }
        let mut p = Self {
            allowed: [PhysRange::default(); MAX_RANGES * 2],
            n_allowed: 0,
            ram: [PhysRange::default(); MAX_RANGES],
            n_ram: ram.len(),
            protected: [PhysRange::default(); MAX_RANGES],
            n_protected: protected.len(),
        };
        p.ram[..ram.len()].copy_from_slice(ram);
        p.protected[..protected.len()].copy_from_slice(protected);
        // Subtract every protected range from every RAM range. Pieces are collected in a
        // scratch list that may grow by one per cut; overflowing pieces beyond the capacity
        // would be dropped, which only makes the policy stricter.
        let mut pieces = [PhysRange::default(); MAX_RANGES * 2];
        let mut n = 0;
        for r in ram {
            if n < pieces.len() {
                pieces[n] = *r;
                n += 1;
            }
        }
        for prot in protected {
            let mut out = [PhysRange::default(); MAX_RANGES * 2];
            let mut m = 0;
            for piece in &pieces[..n] {
                let mut push = |r: PhysRange| {
                    if !r.is_empty() && m < out.len() {
                        out[m] = r;
                        m += 1;
                    }
                };
                if !piece.overlaps(prot) {
                    push(*piece);
                } else {
                    push(PhysRange {
                        start: piece.start,
                        end: prot.start.max(piece.start),
                    });
                    push(PhysRange {
                        start: prot.end.min(piece.end),
                        end: piece.end,
                    });
                }
            }
            pieces = out;
            n = m;
        }
        pieces[..n].sort_unstable_by_key(|r| r.start);
        p.allowed = pieces;
        p.n_allowed = n;
        Ok(p)
    }

    /// Validate a guest range and return where it is in host-physical memory.
    #[inline]
    pub fn check(&self, gpa: GuestPhysAddr, len: u64) -> Result<HostPhysAddr, MemError> {
        let start = gpa.as_u64();
        let end = start.wrapping_add(len);
        // One comparison refuses both a zero length and a wrap-around.
        if end > start {
            for r in &self.allowed[..self.n_allowed] {
                if r.start <= start && end <= r.end {
                    // Identity EPT: guest-physical equals host-physical for guest RAM.
                    return Ok(HostPhysAddr(start));
                }
            }
        }
        Err(self.classify(start, len))
    }

    /// The largest allowed range as `(start, end)` (`(0, 0)` when there is none), for callers
    /// that test the common case inline before calling [`MemoryPolicy::check`] (the largest:
    /// on a PC the first is the 640 KiB of conventional memory, where few buffers live).
    #[inline]
    pub fn largest_allowed(&self) -> (u64, u64) {
        self.allowed[..self.n_allowed]
            .iter()
            .max_by_key(|r| r.end - r.start)
            .map_or((0, 0), |r| (r.start, r.end))
    }

    /// The precise reason a range was refused (slow path).
    #[cold]
    fn classify(&self, addr: u64, len: u64) -> MemError {
        if len == 0 {
            return MemError::ZeroLength;
        }
        let Some(range) = PhysRange::from_start_len(addr, len) else {
            return MemError::Overflow { addr, len };
        };
        if self.protected[..self.n_protected]
            .iter()
            .any(|p| p.overlaps(&range))
        {
            return MemError::Protected { addr, len };
        }
        if self.ram[..self.n_ram].iter().any(|r| r.contains(addr)) {
            MemError::Straddles { addr, len }
        } else {
            MemError::OutsideRam { addr, len }
        }
    }

    /// Whether a host range lies in protected memory (used to check Ally's own layout).
    pub fn is_protected(&self, range: &PhysRange) -> bool {
        self.protected[..self.n_protected]
            .iter()
            .any(|p| p.overlaps(range))
    }
}

/// A flat, zero-filled byte array standing for physical memory `[base, base + len)`, shared by
/// threads in host tests and the benchmark: the "guest", the "NIC" and the DPI code all access
/// it at once, as they would real RAM.
pub struct FakeDma {
    base: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `FakeDma` is a model of physical RAM; concurrent accesses are ordered by the ring
// protocol under test (atomics in registers and doorbells), exactly as DMA is on hardware.
unsafe impl Sync for FakeDma {}
// SAFETY: the allocation is owned and freed in `Drop`; nothing is thread-bound.
unsafe impl Send for FakeDma {}

impl FakeDma {
    /// Memory covering `[base, base + len)`.
    pub fn new(base: u64, len: usize) -> Self {
        let b: alloc::boxed::Box<[u8]> = alloc::vec![0u8; len].into_boxed_slice();
        let ptr = alloc::boxed::Box::into_raw(b) as *mut u8;
        Self { base, ptr, len }
    }

    /// The covered range.
    pub fn range(&self) -> PhysRange {
        PhysRange {
            start: self.base,
            end: self.base + self.len as u64,
        }
    }

    #[inline]
    fn offset(&self, pa: HostPhysAddr, len: usize) -> Result<usize, MemError> {
        // Below `base` wraps to a huge offset and fails the first comparison.
        let off = pa.as_u64().wrapping_sub(self.base);
        if off <= self.len as u64 && len as u64 <= self.len as u64 - off {
            Ok(off as usize)
        } else {
            Err(MemError::DmaOutOfBounds {
                addr: pa.as_u64(),
                len: len as u64,
            })
        }
    }
}

impl Drop for FakeDma {
    fn drop(&mut self) {
        let slice = core::ptr::slice_from_raw_parts_mut(self.ptr, self.len);
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a boxed slice of this length in
        // `new` and are freed exactly once here.
        drop(unsafe { alloc::boxed::Box::from_raw(slice) });
    }
}

impl DmaMemory for FakeDma {
    #[inline]
    fn read(&self, pa: HostPhysAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(pa, buf.len())?;
        // SAFETY: `offset` proved `[off, off + buf.len())` lies inside the allocation; `buf` is
        // a distinct Rust buffer so the ranges cannot overlap.
        unsafe { core::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    #[inline]
    fn write(&self, pa: HostPhysAddr, data: &[u8]) -> Result<(), MemError> {
        let off = self.offset(pa, data.len())?;
        // SAFETY: as in `read`; `data` may itself be borrowed from this memory (a DMA copy
        // between two ranges), so use `copy` which tolerates overlap.
        unsafe { core::ptr::copy(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    fn window(&self, pa: HostPhysAddr, len: usize) -> Result<DmaWindow<'_>, MemError> {
        let off = self.offset(pa, len)?;
        // SAFETY: `[off, off + len)` is inside the allocation, which lives as long as `self`.
        Ok(unsafe { DmaWindow::new(self.ptr.add(off), len) })
    }

    #[inline]
    fn borrow(&self, pa: HostPhysAddr, len: usize) -> Result<&[u8], MemError> {
        let off = self.offset(pa, len)?;
        // SAFETY: in bounds (checked); the allocation lives as long as `self`. Writers are
        // excluded by the ring protocol for as long as the caller owns the range.
        Ok(unsafe { core::slice::from_raw_parts(self.ptr.add(off), len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    fn policy() -> MemoryPolicy {
        // RAM [0, 0x9f000) and [1 MiB, 64 MiB); Ally+DPI at [48 MiB, 56 MiB).
        MemoryPolicy::new(
            &[r(0, 0x9_f000), r(0x10_0000, 0x400_0000)],
            &[r(0x300_0000, 0x380_0000)],
        )
        .unwrap()
    }

    #[test]
    fn accepts_ram_and_refuses_by_reason() {
        let p = policy();
        let g = GuestPhysAddr;
        assert_eq!(p.check(g(0x20_0000), 2048), Ok(HostPhysAddr(0x20_0000)));
        assert_eq!(
            p.check(g(0x37f_fff0), 16),
            Err(MemError::Protected {
                addr: 0x37f_fff0,
                len: 16
            })
        );
        assert_eq!(
            p.check(g(0x2ff_fff0), 32),
            Err(MemError::Protected {
                addr: 0x2ff_fff0,
                len: 32
            })
        );
        assert_eq!(p.check(g(0x380_0000), 64), Ok(HostPhysAddr(0x380_0000)));
        assert_eq!(
            p.check(g(0xa_0000), 4),
            Err(MemError::OutsideRam {
                addr: 0xa_0000,
                len: 4
            })
        );
        assert_eq!(
            p.check(g(0x9_eff0), 0x20),
            Err(MemError::Straddles {
                addr: 0x9_eff0,
                len: 0x20
            })
        );
        assert_eq!(
            p.check(g(0x3ff_fff0), 0x20),
            Err(MemError::Straddles {
                addr: 0x3ff_fff0,
                len: 0x20
            })
        );
        assert_eq!(p.check(g(0x20_0000), 0), Err(MemError::ZeroLength));
        assert_eq!(
            p.check(g(u64::MAX - 3), 8),
            Err(MemError::Overflow {
                addr: u64::MAX - 3,
                len: 8
            })
        );
        assert_eq!(
            p.check(g(0x1_0000_0000), 8),
            Err(MemError::OutsideRam {
                addr: 0x1_0000_0000,
                len: 8
            })
        );
    }

    #[test]
    fn policy_construction_errors() {
        assert_eq!(
            MemoryPolicy::new(&[r(5, 5)], &[]).err(),
            Some(MemError::EmptyRange(r(5, 5)))
        );
        let many = [r(0, 1); MAX_RANGES + 1];
        assert!(matches!(
            MemoryPolicy::new(&many, &[]),
            Err(MemError::TooManyRanges { .. })
        ));
        assert!(
            alloc::format!("{}", MemError::Protected { addr: 1, len: 2 }).contains("Ally or DPI")
        );
    }

    #[test]
    fn fake_dma_bounds() {
        let m = FakeDma::new(0x1000, 0x100);
        m.write(HostPhysAddr(0x10f0), &[1; 16]).unwrap();
        let mut b = [0u8; 16];
        m.read(HostPhysAddr(0x10f0), &mut b).unwrap();
        assert_eq!(b, [1; 16]);
        assert!(m.read(HostPhysAddr(0x10f1), &mut b).is_err());
        assert!(m.read(HostPhysAddr(0xfff), &mut b).is_err());
        assert!(m.borrow(HostPhysAddr(u64::MAX), 2).is_err());
        assert_eq!(m.borrow(HostPhysAddr(0x1100), 0).unwrap().len(), 0);
    }

    /// `FastRange::bytes` against the definition and `MemoryPolicy::check` at the boundaries:
    /// the range's start and end, `end - len` and `end - len + 1`, addresses below the start
    /// whose offset wraps around, and the top of the address space.
    #[test]
    fn fast_range_is_exactly_the_policy_inside_its_range() {
        const MAX: u32 = 0x4000;
        // Allowed: [0x1000, 0x9000), [0x1_0000, 0x2_0000) (the largest), [0x2_1000, 0x3_0000).
        let p = MemoryPolicy::new(
            &[r(0x1000, 0x9000), r(0x1_0000, 0x3_0000)],
            &[r(0x2_0000, 0x2_1000)],
        )
        .unwrap();
        let m = FakeDma::new(0, 0x3_0000);
        let f = FastRange::largest(&p, &m, MAX);
        let (start, end) = (0x1_0000u64, 0x2_0000u64);
        let lens = [
            0,
            1,
            2,
            63,
            64,
            1500,
            MAX - 1,
            MAX,
            MAX + 1,
            0x1_0000,
            u32::MAX,
        ];
        let mut addrs = alloc::vec![0, 1, 0x1000, 0x8fff, u64::MAX, u64::MAX - 1];
        for base in [start, end, 0x2_1000, 0x3_0000] {
            for d in [0u64, 1, 2, 63, 64, 1500, 0x3fff, 0x4000, 0x4001] {
                addrs.push(base.wrapping_add(d));
                addrs.push(base.wrapping_sub(d));
            }
        }
        // Below the start by amounts that make `addr - start` wrap to just under 2^64.
        for k in [1u64, 64, 0x4000, start] {
            addrs.push(start.wrapping_sub(k));
        }
        // Offsets that wrap to values near the span (2^64 + W - len).
        for l in lens {
            addrs.push(end.wrapping_sub(u64::from(l)));
            addrs.push(end.wrapping_sub(u64::from(l)).wrapping_add(1));
            addrs.push(start.wrapping_add(u64::MAX - u64::from(l)));
        }
        for &a in &addrs {
            for l in lens {
                let inside = (1..=MAX).contains(&l)
                    && a >= start
                    && a.checked_add(u64::from(l)).is_some_and(|e| e <= end);
                let got = f.bytes(a, u64::from(l));
                assert_eq!(got.is_some(), inside, "addr {a:#x} len {l:#x}");
                if let Some(b) = got {
                    assert_eq!(p.check(GuestPhysAddr(a), u64::from(l)), Ok(HostPhysAddr(a)));
                    let want = m.borrow(HostPhysAddr(a), l as usize).unwrap();
                    assert_eq!((b.as_ptr(), b.len()), (want.as_ptr(), want.len()));
                }
            }
        }
        // The named boundaries, for the record.
        assert!(f.bytes(start, 64).is_some());
        assert!(f.bytes(start - 1, 64).is_none());
        assert!(f.bytes(end - 64, 64).is_some());
        assert!(f.bytes(end - 63, 64).is_none());
        assert!(f.bytes(end - u64::from(MAX), u64::from(MAX)).is_some());
        assert!(f.bytes(u64::MAX - 63, 64).is_none());
        assert!(f.bytes(start, 0).is_none());
        assert!(f.bytes(start, u64::from(MAX) + 1).is_none());

        // A largest range shorter than `max_len`: the length limit becomes the range's length.
        let p = MemoryPolicy::new(&[r(0x1000, 0x1800)], &[]).unwrap();
        let f = FastRange::largest(&p, &m, MAX);
        assert!(f.bytes(0x1000, 0x800).is_some());
        assert!(f.bytes(0x1000, 0x801).is_none());
        assert!(f.bytes(0x17ff, 1).is_some());
        assert!(f.bytes(0x1800, 1).is_none());
        assert!(f.bytes(0xfff, 1).is_none());
        // No window: nothing.
        let f = FastRange::empty();
        for a in [0, 1, u64::MAX] {
            for l in [0, 1, u64::from(MAX), u64::MAX] {
                assert!(f.bytes(a, l).is_none());
            }
        }
    }
}
