//! The DPI core's queue engine (issue 4, parts 4, 5 and 7).
//!
//! The guest's rings live in guest memory; the real NIC only ever sees the DPI-owned rings in
//! DPI memory, which only this engine programs. [`DpiNic::poll`] is the DPI loop body:
//!
//! 1. configuration: when the guest changed ring bases/lengths, RCTL/TCTL, TDH/RDH or reset
//!    the device (shadow configuration doorbell), take a consistent snapshot and follow it;
//! 2. TX completion: for each packet the real NIC reports done (DD on its last real
//!    descriptor), write DD back into the guest descriptors that asked for it (RS) exactly as
//!    the device does, advance the guest's TDH, raise TXDW;
//! 3. TX: for each complete guest packet (optional context descriptor, legacy or data
//!    descriptors up to EOP) validate every descriptor, then in copy mode copy the frame into
//!    a DPI buffer (the guest cannot change it after inspection), or in zero-copy mode keep the
//!    validated guest buffers; call the hook; post the real descriptors and write the real TDT
//!    once per poll;
//! 4. RX: for each frame the real NIC received into a DPI buffer, call the hook, copy it into the
//!    guest's next buffers with length/status/errors/DD as the device writes them, advance the
//!    guest's RDH, give the DPI buffers back (real RDT once per poll), raise RXT0.
//!
//! **Refusals** (never followed, never a panic, counted by [`DropReason`]):
//! * a bad *descriptor* (buffer outside guest RAM, in Ally/DPI memory, straddling a RAM range,
//!   wrapping, impossible length, reserved type) drops its packet, which is then *completed
//!   with DD* like any other so that a buggy or hostile descriptor cannot wedge the ring; on RX a
//!   bad guest buffer gets DD|EOP with the RXE error bit and length 0, which drivers discard;
//! * an *offload* (legacy IC, context checksum fields, TSO) that would make the device write
//!   anywhere but the frame's own checksum fields and headers after inspection drops its
//!   packet the same way (`offload`; checked against the assembled frame, [`super::offload`]);
//! * a bad *ring* (base or length outside guest RAM, in protected memory, misaligned, zero or
//!   not a multiple of 128 bytes, a tail beyond the ring) *stops that ring*: nothing is read
//!   or written through it until the guest reprograms it (the stop is counted once).
//!
//! **Back-pressure**: when the real TX ring, the copy arena or the in-flight list is full the
//! engine stops consuming guest descriptors (the guest ring fills, as with a slow NIC); when
//! the guest has no RX buffers, received frames wait in the real ring. Nothing is ever passed
//! on uninspected.
//!
//! **Limits** (documented choices): RX is always copied (zero-copy receive would let the NIC
//! write frames that inspection later drops into guest memory); RXDMT0 and the receive/transmit
//! interrupt delay timers (RDTR/RADV/TIDV/TADV) are not emulated: causes are raised at once,
//! and the interrupt rate is bounded by moderation instead (`ShadowRegs::set_irq_interval`;
//! the guest's ITR still reaches the device, which throttles Ally's doorbell cause with it).

use super::checksum;
use super::desc::{
    rxerr, rxsta, txcmd, txsta, LegacyTxDesc, RxDesc, TxContextDesc, TxDataDesc, TxDesc, DESC_SIZE,
    TX_CMD_OFFSET, TX_STATUS_OFFSET,
};
use super::mem::{DescRun, DmaMemory, DmaWindow, FastRange, MemError, MemoryPolicy};
use super::offload::{Headers, Inserted, Offload, OffloadScan, ScannedDesc};
use super::regs::{ctrl, icr, rctl, tctl, NicRegisters, Reg, RING_LEN_ALIGN, RING_LEN_MAX};
use super::shadow::{GuestConfig, ShadowRegs};
use super::{Direction, HookVerdict, PacketHook};
use crate::queue::{DoorbellWatcher, WakeLatency};
use alloc::vec::Vec;
use ally_hypervisor::addr::{GuestPhysAddr, HostPhysAddr, PhysRange};
use core::fmt;
use core::sync::atomic::{fence, Ordering};

/// Most descriptors one guest packet may use before it is refused.
pub const MAX_PACKET_DESCS: usize = 64;
/// Largest non-TSO frame (the 82540EM's jumbo limit, SDM 13.4.22 LPE).
pub const MAX_FRAME: u32 = 16384;
/// Largest TSO super-frame: 64 KiB of payload plus headers.
pub const MAX_TSO_FRAME: u32 = 65536 + 256;
/// Bytes per real descriptor in copy mode.
const COPY_CHUNK: u32 = 16384;
/// Largest frame a released (held) frame may be: a standard frame with a VLAN tag, without FCS.
const STD_FRAME_MAX: usize = 1518;

/// Why a packet was dropped or a ring stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// The hook said drop.
    Verdict,
    /// A buffer address outside guest RAM.
    OutsideRam,
    /// A buffer (or ring) reaching Ally or DPI memory.
    Protected,
    /// A buffer (or ring) running past the end of its RAM range.
    Straddles,
    /// Address plus length wraps.
    Overflow,
    /// A packet with no data.
    Empty,
    /// A packet longer than the device allows.
    TooLong,
    /// More than [`MAX_PACKET_DESCS`] descriptors without EOP.
    TooManyDescriptors,
    /// A descriptor of a reserved type (DEXT with DTYP other than 0 or 1).
    ReservedDescriptor,
    /// Ring length zero-free but not a multiple of 128 bytes or too large, or misaligned base.
    BadRingLayout,
    /// A tail (TDT/RDT) beyond the end of the ring.
    BadTail,
    /// Guest receive disabled, ring absent or stopped: the frame had nowhere to go.
    GuestRxOff,
    /// The RCTL buffer size is the reserved encoding.
    BadBufferSize,
    /// Packets accepted from a guest ring that was then reset or reprogrammed: they still went
    /// out, but their DD write-back was abandoned (counted, not a loss).
    StaleCompletion,
    /// A checksum or segmentation offload that would change the frame anywhere but its own
    /// checksum fields or header after inspection (see [`super::offload`]).
    Offload,
    /// A wrong IPv4 header, TCP or UDP checksum the device does not write itself: its
    /// receiver would discard the frame, so the hook never sees it ([`super::checksum`]).
    Checksum,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 16;
    /// All reasons, in index order.
    pub const ALL: [DropReason; Self::COUNT] = [
        Self::Verdict,
        Self::OutsideRam,
        Self::Protected,
        Self::Straddles,
        Self::Overflow,
        Self::Empty,
        Self::TooLong,
        Self::TooManyDescriptors,
        Self::ReservedDescriptor,
        Self::BadRingLayout,
        Self::BadTail,
        Self::GuestRxOff,
        Self::BadBufferSize,
        Self::StaleCompletion,
        Self::Offload,
        Self::Checksum,
    ];

    /// Short stable name for COM2 reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Verdict => "verdict",
            Self::OutsideRam => "outside_ram",
            Self::Protected => "protected",
            Self::Straddles => "straddles",
            Self::Overflow => "overflow",
            Self::Empty => "empty",
            Self::TooLong => "too_long",
            Self::TooManyDescriptors => "too_many_descs",
            Self::ReservedDescriptor => "reserved_desc",
            Self::BadRingLayout => "bad_ring_layout",
            Self::BadTail => "bad_tail",
            Self::GuestRxOff => "guest_rx_off",
            Self::BadBufferSize => "bad_buffer_size",
            Self::StaleCompletion => "stale_completion",
            Self::Offload => "offload",
            Self::Checksum => "checksum",
        }
    }

    fn from_mem(e: MemError) -> Self {
        match e {
            MemError::Protected { .. } => Self::Protected,
            MemError::Straddles { .. } => Self::Straddles,
            MemError::Overflow { .. } => Self::Overflow,
            MemError::ZeroLength => Self::Empty,
            _ => Self::OutsideRam,
        }
    }
}

/// Per-direction counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DirCounters {
    /// Packets passed on (to the wire for TX, into guest memory for RX).
    pub packets: u64,
    /// Packets dropped, by [`DropReason`] index.
    pub drops: [u64; DropReason::COUNT],
    /// Bytes of the packets passed on. Between the drop arrays (`repr(C)` keeps the order):
    /// next to `packets` or `wire_frames`, the one-packet TX path's two counter adds became
    /// one vector add (six instructions instead of two).
    pub bytes: u64,
    /// Times the guest ring was stopped, by reason.
    pub ring_stops: [u64; DropReason::COUNT],
    /// Doorbells seen (guest tail writes).
    pub doorbells: u64,
    /// Polls that stopped early for lack of room (real ring, arena or guest buffers).
    pub backpressure: u64,
    /// Frames on the wire side: for TX the frames the device sends (a TSO packet is
    /// segmented into several), for RX the frames taken from the device's ring (delivered
    /// or dropped). Compared with what the wire carried.
    pub wire_frames: u64,
    /// Packets the hook held (out-of-order TCP segments: completed towards their sender but
    /// not passed on now; not drops).
    pub held: u64,
    /// Frames the hook released (held ones now in order, inspected and passed) and this
    /// engine passed on.
    pub released: u64,
    /// Released frames this engine could not pass on: too long for one frame (a held TSO
    /// packet), no guest receive ring (their senders resend them).
    pub released_refused: u64,
}

impl DirCounters {
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    pub fn stopped(&self, r: DropReason) -> u64 {
        self.ring_stops[r as usize]
    }
    /// All drops except stale completions (which were transmitted).
    pub fn total_dropped(&self) -> u64 {
        self.drops.iter().sum::<u64>() - self.drops[DropReason::StaleCompletion as usize]
    }
}

/// Everything the engine counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx: DirCounters,
    pub rx: DirCounters,
    /// Configuration changes followed.
    pub config_changes: u64,
    /// Guest resets (CTRL.RST) followed.
    pub resets: u64,
    /// Guest interrupts raised (shadow causes set).
    pub irqs_raised: u64,
    /// The last frame received from the wire, as `(length, FNV-1a 64 of its first 60 bytes)`, taken
    /// with each sample: lets a test find where Ally's count ends in a capture of the wire.
    pub last_rx_frame: Option<(usize, u64)>,
    /// Frames the device missed (MPC, SDM 13.7.5), taken with each sample: it had no free
    /// descriptor in Ally's receive ring for them, so they reached no ring. With
    /// `rx.wire_frames` they account for every frame the wire delivered to the NIC.
    pub rx_missed: u64,
    /// From a guest tail write (doorbell) to the DPI core acting on it, busy or not.
    pub wake_latency: WakeLatency,
    /// The same, for doorbells that found the DPI core waiting (MWAIT or HLT): how fast an
    /// idle core wakes. The rest of `wake_latency` is the wait behind the batch in progress.
    pub idle_wake_latency: WakeLatency,
}

/// Bytes of a frame its fingerprint covers: the minimum Ethernet frame without FCS.
pub const FINGERPRINT_BYTES: usize = 60;

/// FNV-1a 64 (offset basis and prime of the FNV specification): a frame's fingerprint.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds `bytes` into the FNV-1a 64 `hash`.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Copy or zero-copy transmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy every frame into DPI memory before inspection (default; no TOCTOU window).
    Copy,
    /// Post validated guest buffers directly and inspect in place (opt-in: the guest could
    /// change a frame between inspection and transmission).
    ZeroCopy,
}

/// Engine sizing.
#[derive(Debug, Clone, Copy)]
pub struct DpiConfig {
    pub mode: Mode,
    /// Real TX ring descriptors (multiple of 8, at most 4096).
    pub tx_ring: u32,
    /// Real RX ring descriptors (multiple of 8, at most 4096).
    pub rx_ring: u32,
    /// Real RX buffer size (one of the RCTL sizes, at least 2048).
    pub rx_buf: u32,
    /// Copy-mode transmit arena, bytes (at least [`MAX_TSO_FRAME`]).
    pub tx_arena: u32,
}

impl Default for DpiConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Copy,
            tx_ring: 256,
            rx_ring: 256,
            rx_buf: 2048,
            tx_arena: 512 * 1024,
        }
    }
}

impl DpiConfig {
    /// Bytes of DPI memory the engine needs.
    pub fn region_bytes(&self) -> u64 {
        let rings = (u64::from(self.tx_ring) + u64::from(self.rx_ring)) * DESC_SIZE as u64;
        rings + u64::from(self.rx_ring) * u64::from(self.rx_buf) + u64::from(self.tx_arena)
    }
}

/// Errors setting the engine up (operator or layout errors, not guest input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpiError {
    /// A ring size that is zero, not a multiple of 8, or above 4096.
    BadRingSize { which: &'static str, descs: u32 },
    /// The RX buffer size is not one RCTL can express or is below 2048.
    BadRxBuffer(u32),
    /// The copy arena is smaller than the largest frame.
    ArenaTooSmall(u32),
    /// The DPI region is too small or misaligned.
    BadRegion { region: PhysRange, need: u64 },
    /// The DPI region is reachable by the guest (not in the policy's protected ranges).
    RegionNotProtected(PhysRange),
    /// Initialising DPI memory failed.
    Dma(MemError),
}

impl fmt::Display for DpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRingSize { which, descs } => write!(
                f,
                "{which} ring of {descs} descriptors: must be a non-zero multiple of 8, at most 4096"
            ),
            Self::BadRxBuffer(n) => {
                write!(f, "RX buffer size {n}: must be 2048, 4096, 8192 or 16384")
            }
            Self::ArenaTooSmall(n) => {
                write!(f, "TX copy arena of {n} bytes is smaller than {MAX_TSO_FRAME}")
            }
            Self::BadRegion { region, need } => write!(
                f,
                "DPI NIC region {region} must be 4 KiB aligned and hold {need:#x} bytes"
            ),
            Self::RegionNotProtected(r) => {
                write!(f, "DPI NIC region {r} is not protected from the guest")
            }
            Self::Dma(e) => write!(f, "DPI memory access failed: {e}"),
        }
    }
}

/// `DpiNic::cfg_seen` before the first configuration is followed (a generation the
/// configuration doorbell never reaches: it counts guest writes from 0). `poll` compares the
/// doorbell with `cfg_seen` alone, as it compared it with `u64::MAX` for "never" before.
const CFG_NEVER: u64 = u64::MAX;

/// A validated guest ring.
#[derive(Clone, Copy)]
struct GuestRing<'a> {
    base: HostPhysAddr,
    n: u32,
    win: DmaWindow<'a>,
}

impl GuestRing<'_> {
    #[inline]
    fn desc(&self, i: u32) -> HostPhysAddr {
        HostPhysAddr(self.base.as_u64() + u64::from(i) * DESC_SIZE as u64)
    }
    #[inline(always)]
    fn next(&self, i: u32) -> u32 {
        if i + 1 == self.n {
            0
        } else {
            i + 1
        }
    }
}

/// Validate a guest ring (base, byte length) against the policy.
fn validate_ring<'a, M: DmaMemory>(
    policy: &MemoryPolicy,
    mem: &'a M,
    base: u64,
    len: u32,
) -> Result<Option<GuestRing<'a>>, DropReason> {
    if len == 0 {
        return Ok(None);
    }
    if !len.is_multiple_of(RING_LEN_ALIGN) || len > RING_LEN_MAX || !base.is_multiple_of(16) {
        return Err(DropReason::BadRingLayout);
    }
    let pa = policy
        .check(GuestPhysAddr(base), u64::from(len))
        .map_err(DropReason::from_mem)?;
    let win = mem
        .window(pa, len as usize)
        .map_err(|_| DropReason::OutsideRam)?;
    Ok(Some(GuestRing {
        base: pa,
        n: len / DESC_SIZE as u32,
        win,
    }))
}

/// [`InFlight::real_last`] of a dropped packet (nothing posted): never a real ring index (the
/// real ring has at most 4096 descriptors, so indices also fit the entry's u16).
const NOT_POSTED: u16 = u16::MAX;

/// One packet accepted from the guest and not yet completed (24 bytes: the one-packet path
/// writes and reads one per packet).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Arena position after this packet (copy mode).
    arena_end: u64,
    guest_first: u32,
    /// Index of the packet's last real descriptor ([`NOT_POSTED`]: dropped, nothing posted).
    real_last: u16,
    /// The real descriptor after `real_last` (the clean index once it is done; 0 when not
    /// posted).
    real_next: u16,
    epoch: u32,
    /// Guest descriptors covered (at most [`COALESCE_MAX`] or [`MAX_PACKET_DESCS`]).
    guest_count: u16,
    /// Packets this entry covers (at most its descriptors).
    packets: u16,
}

impl InFlight {
    /// The last real descriptor, when the packets were posted.
    #[inline(always)]
    fn posted(&self) -> Option<u32> {
        (self.real_last != NOT_POSTED).then_some(u32::from(self.real_last))
    }
    #[inline(always)]
    fn count(&self) -> u32 {
        u32::from(self.guest_count)
    }
}

/// Packets accepted and not yet completed, oldest first: a fixed ring (no allocation on the
/// hot path). Consecutive packets posted in one poll share one entry.
struct InFlightRing {
    buf: Vec<InFlight>,
    head: usize,
    len: usize,
}

impl InFlightRing {
    fn with_capacity(cap: usize) -> Self {
        let blank = InFlight {
            guest_first: 0,
            guest_count: 0,
            packets: 0,
            real_last: NOT_POSTED,
            real_next: 0,
            arena_end: 0,
            epoch: 0,
        };
        Self {
            buf: alloc::vec![blank; cap],
            head: 0,
            len: 0,
        }
    }
    #[inline(always)]
    fn is_full(&self) -> bool {
        self.len == self.buf.len()
    }
    #[inline(always)]
    fn front(&self) -> Option<InFlight> {
        (self.len != 0).then(|| self.buf[self.head])
    }
    #[inline(always)]
    fn pop_front(&mut self) {
        if self.len != 0 {
            self.head = if self.head + 1 == self.buf.len() {
                0
            } else {
                self.head + 1
            };
            self.len -= 1;
        }
    }
    #[inline(always)]
    fn back_mut(&mut self) -> Option<&mut InFlight> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.head + self.len - 1;
        if i >= self.buf.len() {
            i -= self.buf.len();
        }
        Some(&mut self.buf[i])
    }
    #[inline(always)]
    fn push_back(&mut self, f: InFlight) -> bool {
        if self.is_full() {
            return false;
        }
        let mut i = self.head + self.len;
        if i >= self.buf.len() {
            i -= self.buf.len();
        }
        self.buf[i] = f;
        self.len += 1;
        true
    }
}

/// Most guest descriptors one in-flight entry covers (bounds the write-back loop).
const COALESCE_MAX: u32 = 64;
// `InFlight` counts descriptors in a u16.
const _: () = assert!(COALESCE_MAX <= u16::MAX as u32 && MAX_PACKET_DESCS <= u16::MAX as usize);

/// A fragment of a guest packet, validated.
#[derive(Debug, Clone, Copy, Default)]
struct Frag {
    pa: u64,
    len: u32,
    /// The guest's descriptor, for zero-copy reposting.
    raw: [u8; 16],
}

struct TxState<'a> {
    ring: Option<GuestRing<'a>>,
    stopped: bool,
    enabled: bool,
    /// `ring` while `!stopped && enabled`, else `None`: the ring to consume, or none (one test
    /// per poll; set with `ring`, `stopped` and `enabled`).
    live: Option<GuestRing<'a>>,
    next: u32,
    epoch: u32,
    real_tail: u32,
    real_clean: u32,
    inflight: InFlightRing,
    arena_head: u64,
    arena_tail: u64,
    /// The last context descriptor posted to the real ring: the device applies it to data
    /// descriptors until the next one (8254x SDM 3.3.5), so a packet without its own context
    /// is checked against it.
    real_ctx: Option<TxContextDesc>,
}

struct RxState<'a> {
    ring: Option<GuestRing<'a>>,
    stopped: bool,
    enabled: bool,
    buf: u32,
    next: u32,
    real_next: u32,
    /// The last frame taken off the real ring: `(first descriptor, descriptors, bytes)`;
    /// its buffers still hold it (the device never refills the descriptor RDT names).
    last: Option<(u32, u32, usize)>,
}

/// Physical layout of the engine's DPI memory.
#[derive(Debug, Clone, Copy)]
struct Layout {
    tx_ring: u64,
    rx_ring: u64,
    rx_bufs: u64,
    arena: u64,
}

/// The DPI core's engine for one NIC.
pub struct DpiNic<'a, M: DmaMemory, R: NicRegisters, H: PacketHook> {
    shadow: &'a ShadowRegs,
    mem: &'a M,
    real: &'a R,
    policy: MemoryPolicy,
    /// The policy's largest allowed range windowed (empty when the memory cannot window it),
    /// for the TX fast path's inline buffer and length test and in-place borrow
    /// ([`DpiNic::tx_fast_accept`]).
    fast: FastRange<'a>,
    cfg: DpiConfig,
    layout: Layout,
    hook: H,
    tx: TxState<'a>,
    rx: RxState<'a>,
    /// The real TX and RX rings (DPI memory), for the hot path.
    tx_win: DmaWindow<'a>,
    rx_win: DmaWindow<'a>,
    guest_cfg: GuestConfig,
    /// The configuration generation followed last ([`CFG_NEVER`] before the first).
    cfg_seen: u64,
    tx_watch: DoorbellWatcher,
    rx_watch: DoorbellWatcher,
    /// The loop waited since the last poll ([`DpiNic::note_woken`]).
    woken: bool,
    scratch: Vec<u8>,
    /// A frame with its 802.1Q tag put back where the device adds or took it off (VLAN
    /// mode), for the hook: what the wire carries is what is inspected and what a held
    /// frame keeps.
    tagged: Vec<u8>,
    frags: [Frag; MAX_PACKET_DESCS],
    counters: Counters,
    /// A released frame that found no room yet, per direction.
    released_tx: Option<Vec<u8>>,
    released_rx: Option<Vec<u8>>,
}

impl<'a, M: DmaMemory, R: NicRegisters, H: PacketHook> DpiNic<'a, M, R, H> {
    /// Set up the engine in `region` (DPI memory, protected from the guest by `policy`) and
    /// program the real device's rings. The guest's view starts as the shadow describes it.
    pub fn new(
        shadow: &'a ShadowRegs,
        mem: &'a M,
        real: &'a R,
        policy: MemoryPolicy,
        region: PhysRange,
        cfg: DpiConfig,
        hook: H,
    ) -> Result<Self, DpiError> {
        for (which, descs) in [("TX", cfg.tx_ring), ("RX", cfg.rx_ring)] {
            if descs == 0 || !descs.is_multiple_of(8) || descs > 4096 {
                return Err(DpiError::BadRingSize { which, descs });
            }
        }
        if cfg.rx_buf < 2048 || rctl::for_buffer_size(cfg.rx_buf).is_none() {
            return Err(DpiError::BadRxBuffer(cfg.rx_buf));
        }
        if cfg.mode == Mode::Copy && cfg.tx_arena < MAX_TSO_FRAME {
            return Err(DpiError::ArenaTooSmall(cfg.tx_arena));
        }
        let need = cfg.region_bytes();
        if !region.start.is_multiple_of(4096) || region.len() < need {
            return Err(DpiError::BadRegion { region, need });
        }
        if !policy.is_protected(&region) || policy.check(GuestPhysAddr(region.start), 1).is_ok() {
            return Err(DpiError::RegionNotProtected(region));
        }
        let tx_ring = region.start;
        let rx_ring = tx_ring + u64::from(cfg.tx_ring) * DESC_SIZE as u64;
        let rx_bufs = rx_ring + u64::from(cfg.rx_ring) * DESC_SIZE as u64;
        let arena = rx_bufs + u64::from(cfg.rx_ring) * u64::from(cfg.rx_buf);
        let fast = FastRange::largest(&policy, mem, MAX_FRAME);
        let mut nic = Self {
            shadow,
            mem,
            real,
            policy,
            fast,
            cfg,
            layout: Layout {
                tx_ring,
                rx_ring,
                rx_bufs,
                arena,
            },
            hook,
            tx: TxState {
                ring: None,
                stopped: false,
                enabled: false,
                live: None,
                next: 0,
                epoch: 0,
                real_tail: 0,
                real_clean: 0,
                inflight: InFlightRing::with_capacity(cfg.tx_ring as usize * 2),
                arena_head: 0,
                arena_tail: 0,
                real_ctx: None,
            },
            rx: RxState {
                last: None,
                ring: None,
                stopped: false,
                enabled: false,
                buf: 2048,
                next: 0,
                real_next: 0,
            },
            tx_win: mem
                .window(HostPhysAddr(tx_ring), cfg.tx_ring as usize * DESC_SIZE)
                .map_err(DpiError::Dma)?,
            rx_win: mem
                .window(HostPhysAddr(rx_ring), cfg.rx_ring as usize * DESC_SIZE)
                .map_err(DpiError::Dma)?,
            guest_cfg: GuestConfig::default(),
            cfg_seen: CFG_NEVER,
            tx_watch: DoorbellWatcher::new(&shadow.tx_doorbell),
            rx_watch: DoorbellWatcher::new(&shadow.rx_doorbell),
            woken: false,
            scratch: Vec::with_capacity(MAX_TSO_FRAME as usize),
            tagged: Vec::new(),
            released_tx: None,
            released_rx: None,
            frags: [Frag::default(); MAX_PACKET_DESCS],
            counters: Counters::default(),
        };
        nic.program_device()?;
        Ok(nic)
    }

    /// The engine's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Takes the fingerprint of the last received frame into the counters (called with each
    /// publication of the counters, not per poll).
    pub fn sample_device_statistics(&mut self) {
        self.counters.last_rx_frame = self.last_rx_fingerprint();
    }

    /// Takes the device's missed-frame count into the counters: a read of its MPC, through
    /// the share kept for the guest's driver ([`super::shadow::MissedFrames`]; the
    /// statistics clear on read).
    pub fn sample_missed_frames(&mut self) {
        self.counters.rx_missed = self.shadow.missed.collect(self.real);
    }

    /// `(length, fingerprint)` of the last frame taken off the real RX ring: FNV-1a 64 of
    /// its first [`FINGERPRINT_BYTES`] (a frame's headers, TCP sequence numbers included;
    /// the same whether or not the device appended the FCS).
    fn last_rx_fingerprint(&self) -> Option<(usize, u64)> {
        let (first, _, total) = self.rx.last?;
        let buffer =
            self.layout.rx_bufs + u64::from(first % self.cfg.rx_ring) * u64::from(self.cfg.rx_buf);
        let mut head = [0u8; FINGERPRINT_BYTES];
        let len = total.min(FINGERPRINT_BYTES);
        self.mem.read(HostPhysAddr(buffer), &mut head[..len]).ok()?;
        Some((total, fnv1a(FNV_OFFSET, &head[..len])))
    }

    /// The hook (e.g. to read an engine's own statistics).
    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.hook
    }

    /// Packets accepted from the guest whose completion is pending.
    pub fn tx_in_flight(&self) -> usize {
        let q = &self.tx.inflight;
        (0..q.len)
            .map(|k| q.buf[(q.head + k) % q.buf.len()].packets as usize)
            .sum()
    }

    fn program_device(&mut self) -> Result<(), DpiError> {
        let (r, l, c) = (self.real, self.layout, self.cfg);
        // Clear both real rings' descriptors, then give every RX buffer to the device.
        let zero = [0u8; DESC_SIZE];
        for i in 0..c.tx_ring {
            self.mem
                .write(HostPhysAddr(l.tx_ring + u64::from(i) * 16), &zero)
                .map_err(DpiError::Dma)?;
        }
        for i in 0..c.rx_ring {
            let d = RxDesc {
                buffer_addr: l.rx_bufs + u64::from(i) * u64::from(c.rx_buf),
                ..Default::default()
            };
            self.mem
                .write(HostPhysAddr(l.rx_ring + u64::from(i) * 16), &d.to_bytes())
                .map_err(DpiError::Dma)?;
        }
        r.write32(Reg::TCTL, 0);
        r.write32(Reg::RCTL, 0);
        r.write32(Reg::TDBAL, l.tx_ring as u32);
        r.write32(Reg::TDBAH, (l.tx_ring >> 32) as u32);
        r.write32(Reg::TDLEN, c.tx_ring * DESC_SIZE as u32);
        r.write32(Reg::TDH, 0);
        r.write32(Reg::TDT, 0);
        r.write32(Reg::RDBAL, l.rx_ring as u32);
        r.write32(Reg::RDBAH, (l.rx_ring >> 32) as u32);
        r.write32(Reg::RDLEN, c.rx_ring * DESC_SIZE as u32);
        r.write32(Reg::RDH, 0);
        // All but one buffer: RDT never equals RDH unless the ring is really full, so the
        // Bochs reading of RDT == RDH as "all buffers free" can never occur.
        r.write32(Reg::RDT, c.rx_ring - 1);
        self.tx.real_tail = 0;
        self.tx.real_clean = 0;
        self.tx.real_ctx = None;
        self.rx.real_next = 0;
        self.rx.last = None;
        self.shadow.program_real_mask(r);
        r.write32(Reg::TCTL, tctl::EN | tctl::PSP | (0x0F << 4) | (0x40 << 12));
        self.cfg_seen = CFG_NEVER;
        self.reconcile();
        Ok(())
    }

    /// The doorbell an idle DPI core should watch (MONITOR): the guest's transmit tail.
    pub fn wake_line(&self) -> *const u8 {
        &self.shadow.tx_doorbell as *const _ as *const u8
    }

    /// The DPI loop waited (MWAIT or HLT) since the last poll: doorbells the next poll sees
    /// rang while the core was idle, and also count as idle wake-ups.
    pub fn note_woken(&mut self) {
        self.woken = true;
    }

    /// Whether a tail doorbell rang since the last poll (checked after arming MONITOR, so a
    /// ring between the poll and the wait is never slept through).
    pub fn doorbell_pending(&self) -> bool {
        self.tx_watch.pending(&self.shadow.tx_doorbell)
            || self.rx_watch.pending(&self.shadow.rx_doorbell)
    }

    /// One iteration of the DPI loop for this NIC; returns the number of packets moved
    /// (passed or dropped) in either direction.
    pub fn poll(&mut self) -> u64 {
        // In a local: the doorbells' atomic loads would otherwise reload the field each time.
        let shadow = self.shadow;
        if shadow.cfg_doorbell.sequence() != self.cfg_seen {
            self.reconcile();
        }
        let woken = core::mem::take(&mut self.woken);
        let tx_rings = self.tx_watch.poll(&shadow.tx_doorbell);
        if tx_rings > 0 {
            self.counters.tx.doorbells += tx_rings;
            self.counters.wake_latency.record(&shadow.tx_doorbell);
            if woken {
                self.counters.idle_wake_latency.record(&shadow.tx_doorbell);
            }
        }
        let rx_rings = self.rx_watch.poll(&shadow.rx_doorbell);
        if rx_rings > 0 {
            self.counters.rx.doorbells += rx_rings;
            self.counters.wake_latency.record(&shadow.rx_doorbell);
            if woken {
                self.counters.idle_wake_latency.record(&shadow.rx_doorbell);
            }
        }
        let mut work = self.tx_complete();
        work += self.tx_consume();
        work += self.rx_receive();
        if self.released_tx.is_some() || self.released_rx.is_some() || self.hook.has_forward() {
            work += self.forward_released();
        }
        self.shadow.release_held_interrupt(self.real);
        work
    }

    /// Whether the guest changed the configuration since this poll followed it, read after
    /// a tail. A driver's reset writes TDH (or RDH, or a new ring) and then the tail; both
    /// go through the guard in that order, so a tail from after the change shows the change
    /// here too, and belongs to a ring this poll does not know yet: the next poll follows
    /// the configuration first. (Without this, the old ring's position was scanned through
    /// the new ring's zeroed descriptors: `too_many_descs` drops at the guest's reboots.)
    #[inline]
    fn reconfigured_since_poll(&self) -> bool {
        self.shadow.cfg_doorbell.sequence() != self.cfg_seen
    }

    /// Follow the guest's configuration.
    #[cold]
    #[inline(never)]
    fn reconcile(&mut self) {
        let Some(g) = self.shadow.config() else {
            return;
        };
        let old = self.guest_cfg;
        let first = self.cfg_seen == CFG_NEVER;
        self.cfg_seen = g.generation;
        self.guest_cfg = g;
        self.counters.config_changes += 1;
        if !first && g.resets != old.resets {
            self.counters.resets += 1;
        }
        // TX ring: a new base/length, a TDH write or a reset abandons the old ring's pending
        // write-backs (the guest may have freed that memory).
        if first
            || g.tdba != old.tdba
            || g.tdlen != old.tdlen
            || g.tdh_writes != old.tdh_writes
            || g.resets != old.resets
        {
            self.tx.epoch = self.tx.epoch.wrapping_add(1);
            self.tx.stopped = false;
            self.tx.ring = match validate_ring(&self.policy, self.mem, g.tdba, g.tdlen) {
                Ok(r) => r,
                Err(why) => {
                    self.stop_tx(why);
                    None
                }
            };
            self.tx.next = match self.tx.ring {
                Some(r) if g.tdh < r.n => g.tdh,
                _ => 0,
            };
        }
        self.tx.enabled = g.tctl & tctl::EN != 0;
        self.tx.live = self.tx.ring.filter(|_| !self.tx.stopped && self.tx.enabled);
        if first
            || g.rdba != old.rdba
            || g.rdlen != old.rdlen
            || g.rdh_writes != old.rdh_writes
            || g.resets != old.resets
            || g.rctl != old.rctl
        {
            self.rx.stopped = false;
            self.rx.ring = match validate_ring(&self.policy, self.mem, g.rdba, g.rdlen) {
                Ok(r) => r,
                Err(why) => {
                    self.stop_rx(why);
                    None
                }
            };
            self.rx.next = match self.rx.ring {
                Some(r) if g.rdh < r.n => g.rdh,
                _ => 0,
            };
            match rctl::buffer_size(g.rctl) {
                Some(b) => self.rx.buf = b,
                None => self.stop_rx(DropReason::BadBufferSize),
            }
        }
        self.rx.enabled = g.rctl & rctl::EN != 0;
        // Real RCTL: the receiver always on, with Ally's buffer size; the guest's filters and
        // options while its receiver is on, else every frame. A frame that arrives while the
        // guest's receiver is off (its driver reconfiguring, a reset) is taken off Ally's ring
        // and dropped and counted (`guest_rx_off`): with the real receiver off, or filtering
        // as a reset guest's RCTL of 0 would (no broadcast), the device would drop it
        // uncounted (SDM 13.4.22; QEMU's e1000 also drops every frame its net queue held at
        // the next RDT or RCTL write). Real TCTL stays enabled so that packets already
        // accepted still go out.
        let bsize = rctl::for_buffer_size(self.cfg.rx_buf).unwrap_or(0);
        let options = if self.rx.enabled {
            g.rctl & !(rctl::BSIZE_MASK | rctl::BSEX)
        } else {
            rctl::UPE | rctl::MPE | rctl::BAM
        };
        let real_rctl = options | bsize | rctl::EN;
        self.real.write32(Reg::RCTL, real_rctl);
        self.real
            .write32(Reg::TCTL, (g.tctl & !tctl::EN) | tctl::EN | tctl::PSP);
    }

    fn stop_tx(&mut self, why: DropReason) {
        self.tx.live = None;
        if !self.tx.stopped {
            self.tx.stopped = true;
            self.counters.tx.ring_stops[why as usize] += 1;
        }
    }

    fn stop_rx(&mut self, why: DropReason) {
        if !self.rx.stopped {
            self.rx.stopped = true;
            self.counters.rx.ring_stops[why as usize] += 1;
        }
    }

    fn real_tx_desc(&self, i: u32) -> HostPhysAddr {
        HostPhysAddr(self.layout.tx_ring + u64::from(i) * DESC_SIZE as u64)
    }

    fn real_rx_desc(&self, i: u32) -> HostPhysAddr {
        HostPhysAddr(self.layout.rx_ring + u64::from(i) * DESC_SIZE as u64)
    }

    /// Complete packets the real NIC has sent.
    #[inline(always)]
    fn tx_complete(&mut self) -> u64 {
        match self.tx.inflight.len {
            0 => 0,
            1 => self.tx_complete_one(),
            _ => self.tx_complete_all(),
        }
    }

    /// [`DpiNic::tx_complete`] with exactly one entry in flight (the usual state between
    /// doorbells): the same checks and effects as [`DpiNic::tx_complete_all`] for a posted
    /// entry of the current ring that does not wrap, which is the common case; anything else
    /// goes to the general loop.
    #[inline(always)]
    fn tx_complete_one(&mut self) -> u64 {
        let f = self.tx.inflight.buf[self.tx.inflight.head];
        // A dropped entry's `NOT_POSTED` lies outside the real ring: the window's range check
        // is the test for it.
        let last = u32::from(f.real_last);
        let (Some(status), Some(ring)) = (
            self.tx_win.try_desc_u8(last, TX_STATUS_OFFSET),
            self.tx.ring,
        ) else {
            return self.tx_complete_all();
        };
        let end = f.guest_first + f.count();
        if f.epoch != self.tx.epoch || end > ring.n {
            return self.tx_complete_all();
        }
        if status & txsta::DD == 0 {
            return 0;
        }
        // Our write-backs come after the NIC's DD, as the device's come after its reads.
        fence(Ordering::Acquire);
        // A run outside the ring's window (impossible for a validated ring) writes nothing.
        let mut wrote = false;
        if f.guest_count == 1 {
            // One packet per doorbell: one descriptor, no loop (a run of constant length, so
            // its range check is the one comparison `guest_first < ndesc`).
            let d = ring.win.run(f.guest_first, 1);
            wrote = !d.is_empty() && complete_desc(d, 0);
        } else {
            let d = ring.win.run(f.guest_first, f.count());
            for k in 0..d.len() {
                wrote |= complete_desc(d, k);
            }
        }
        self.tx.real_clean = u32::from(f.real_next);
        self.tx.arena_tail = f.arena_end.max(self.tx.arena_tail);
        // The only entry is done: the list is empty (its head may stay where it is).
        self.tx.inflight.len = 0;
        // Published after every DD it covers.
        self.shadow.set_tdh(if end == ring.n { 0 } else { end });
        if wrote {
            // Nothing is in flight any more.
            let mut cause = icr::TXDW;
            if self.shadow.tdt() == self.tx.next {
                cause |= icr::TXQE;
            }
            self.raise(cause);
        }
        u64::from(f.guest_count)
    }

    /// [`DpiNic::tx_complete`] in general: every entry whose packets are done, in order.
    #[inline(never)]
    fn tx_complete_all(&mut self) -> u64 {
        let mut done = 0;
        let mut wrote = false;
        let tx_n = self.cfg.tx_ring;
        // Locals (see `tx_fast_mode`): the volatile stores must not force field reloads.
        let txw = self.tx_win;
        let ring = self.tx.ring;
        let epoch = self.tx.epoch;
        let mut clean = self.tx.real_clean;
        let mut arena_tail = self.tx.arena_tail;
        let mut new_tdh = None;
        while let Some(f) = self.tx.inflight.front() {
            if let Some(last) = f.posted() {
                if txw.desc_u8(last, TX_STATUS_OFFSET) & txsta::DD == 0 {
                    break;
                }
                clean = if last + 1 == tx_n { 0 } else { last + 1 };
            }
            // Our write-backs come after the NIC's DD, as the device's come after its reads.
            fence(Ordering::Acquire);
            match ring {
                Some(ring) if f.epoch == epoch => {
                    // Usually one run that does not wrap, so the loop needs no wrap or range
                    // checks; a wrapping entry goes descriptor by descriptor. A descriptor
                    // outside the ring's window (impossible for a validated ring) is skipped.
                    let mut i = f.guest_first;
                    let d = ring.win.run(i, f.count());
                    if i + f.count() <= ring.n && d.len() == f.count() as usize {
                        for k in 0..d.len() {
                            wrote |= complete_desc(d, k);
                        }
                        i += f.count();
                        if i == ring.n {
                            i = 0;
                        }
                    } else {
                        for _ in 0..f.count() {
                            wrote |= complete_desc(ring.win.run(i, 1), 0);
                            i = ring.next(i);
                        }
                    }
                    new_tdh = Some(i);
                }
                // Only posted packets are stale; dropped ones were already counted.
                _ if f.posted().is_some() => {
                    self.counters.tx.drops[DropReason::StaleCompletion as usize] +=
                        u64::from(f.packets)
                }
                _ => {}
            }
            arena_tail = f.arena_end.max(arena_tail);
            self.tx.inflight.pop_front();
            done += u64::from(f.guest_count);
        }
        self.tx.real_clean = clean;
        self.tx.arena_tail = arena_tail;
        if let Some(tdh) = new_tdh {
            // Published after every DD it covers.
            self.shadow.set_tdh(tdh);
        }
        if wrote {
            let mut cause = icr::TXDW;
            if self.tx.inflight.len == 0 && self.shadow.tdt() == self.tx.next {
                cause |= icr::TXQE;
            }
            self.raise(cause);
        }
        done
    }

    fn raise(&mut self, cause: u32) {
        self.counters.irqs_raised += 1;
        self.shadow.raise(cause, self.real);
    }

    #[inline(always)]
    fn real_tx_free(&self) -> u32 {
        let (c, t) = (self.tx.real_clean, self.tx.real_tail);
        if c > t {
            c - t - 1
        } else {
            self.cfg.tx_ring - (t - c) - 1
        }
    }

    /// The hot loop: consecutive packets that each fit one legacy descriptor (EOP, no DEXT),
    /// with the ring state in locals so it stays in registers. Stops at the first descriptor
    /// it does not handle (the general path then does, with precise refusal reasons).
    /// Returns (packets moved, back-pressure, posted anything).
    #[inline(always)]
    fn tx_fast(&mut self, ring: GuestRing<'a>, tdt: u32) -> (u64, bool, bool) {
        // One loop per mode, so each stays small enough to live in registers.
        match self.cfg.mode {
            Mode::ZeroCopy => self.tx_fast_mode::<false>(ring, tdt),
            Mode::Copy => self.tx_fast_mode::<true>(ring, tdt),
        }
    }

    /// Inspect one accepted single-descriptor packet (buffer `pa`, `len` bytes, `frame` borrowed
    /// by [`DpiNic::tx_fast_accept`]): in copy mode copy it into the arena first (`arena` is the
    /// arena head, given back on a drop). Returns the address the real descriptor points at.
    #[inline(always)]
    fn tx_fast_verdict<const COPY: bool>(
        &mut self,
        pa: u64,
        len: u32,
        frame: &'a [u8],
        arena: &mut u64,
    ) -> Result<u64, FastStop> {
        // A single legacy descriptor without IC: the device writes no checksum. Checked on
        // the bytes the hook inspects (in copy mode the copy: the guest's buffer can change).
        let judge = |hook: &mut H, frame: &[u8]| {
            if checksum::verify(frame, Inserted::NONE).is_err() {
                None
            } else {
                Some(hook.inspect(frame, Direction::ToWire))
            }
        };
        let (addr, verdict) = match COPY {
            false => (pa, judge(&mut self.hook, frame)),
            true => {
                let before = *arena;
                let Some(at) = arena_alloc(
                    arena,
                    self.tx.arena_tail,
                    self.cfg.tx_arena,
                    self.layout.arena,
                    len,
                ) else {
                    return Err(FastStop::NoArena);
                };
                let copied = self.mem.write(HostPhysAddr(at), frame).is_ok();
                let verdict = match self.mem.borrow(HostPhysAddr(at), len as usize) {
                    Ok(frame) if copied => judge(&mut self.hook, frame),
                    _ => Some(HookVerdict::Drop),
                };
                if verdict != Some(HookVerdict::Pass) {
                    *arena = before;
                }
                (at, verdict)
            }
        };
        match verdict {
            Some(HookVerdict::Pass) => Ok(addr),
            Some(HookVerdict::Drop) => Err(FastStop::Dropped),
            Some(HookVerdict::Hold) => Err(FastStop::Held),
            None => Err(FastStop::BadChecksum),
        }
    }

    /// [`DpiNic::tx_fast_mode`] when exactly one new guest descriptor is waiting (one packet
    /// per doorbell): the same checks and effects without the run set-up. `gwin` is the guest
    /// ring's window, `n` its length, `next` the descriptor and `after` the one after it.
    #[inline(always)]
    fn tx_fast_single<const COPY: bool>(
        &mut self,
        gwin: DmaWindow<'a>,
        n: u32,
        next: u32,
        after: u32,
    ) -> (u64, bool, bool) {
        let hi = gwin.desc_u64(next, 1);
        let lo = gwin.desc_u64(next, 0);
        let Some((pa, len, frame)) = self.tx_fast_accept(hi, lo) else {
            // Not a packet this path posts: the general path refuses or handles it.
            return (0, false, false);
        };
        // The real ring has room for one more descriptor unless the tail would reach the
        // clean index (`real_tx_free() == 0`).
        let tail = self.tx.real_tail;
        let new_tail = if tail + 1 == self.cfg.tx_ring {
            0
        } else {
            tail + 1
        };
        if new_tail == self.tx.real_clean {
            return (0, true, false);
        }
        let mut arena = self.tx.arena_head;
        let addr = match self.tx_fast_verdict::<COPY>(pa, len, frame, &mut arena) {
            Ok(addr) => addr,
            Err(FastStop::NoArena) => return (0, true, false),
            Err(stop) => {
                if self.tx.inflight.is_full() {
                    // Inspected again next time; back-pressure meanwhile.
                    return (0, true, false);
                }
                self.count_unposted(&stop);
                self.finish_unposted(1, after);
                return (1, false, false);
            }
        };
        // As in `tx_fast_mode`: the guest's command with RS set, status cleared.
        self.tx_win.set_desc(
            tail,
            addr,
            (hi & !(0xFF << 32)) | (u64::from(txcmd::RS) << 24),
        );
        if COPY {
            // (Zero-copy mode never moves the arena.)
            self.tx.arena_head = arena;
        }
        self.push_inflight_one(tail, new_tail, n);
        self.tx.next = after;
        self.tx.real_tail = new_tail;
        self.counters.tx.packets += 1;
        self.counters.tx.wire_frames += 1;
        self.counters.tx.bytes += u64::from(len);
        (1, false, true)
    }

    #[inline(always)]
    fn tx_fast_mode<const COPY: bool>(
        &mut self,
        ring: GuestRing<'a>,
        tdt: u32,
    ) -> (u64, bool, bool) {
        let next = self.tx.next;
        let after = ring.next(next);
        if after == tdt {
            return self.tx_fast_single::<COPY>(ring.win, ring.n, next, after);
        }
        let rn = self.cfg.tx_ring;
        // Locals, not fields: the volatile descriptor stores below could alias `self` as far as
        // the compiler knows, which would force a reload of every field after each store.
        let gwin = ring.win;
        let txw = self.tx_win;
        let mut next = self.tx.next;
        let mut tail = self.tx.real_tail;
        let mut free = self.real_tx_free();
        let mut arena = self.tx.arena_head;
        let (mut pkts, mut bytes) = (0u32, 0u64);
        let (mut stop, mut dropped) = (false, None);
        // Runs of descriptors contiguous in both rings (neither wraps inside a run), at most
        // the free real descriptors: the loop below needs no wrap or range checks.
        while next != tdt && pkts < COALESCE_MAX {
            let g_avail = if tdt > next {
                tdt - next
            } else {
                ring.n - next
            };
            let want = g_avail.min(rn - tail).min(free).min(COALESCE_MAX - pkts);
            if want == 0 {
                // The real ring is full: back-pressure if the next packet is one this path
                // posts; anything else (a refusal) the general path handles without room.
                let hi = gwin.desc_u64(next, 1);
                let lo = gwin.desc_u64(next, 0);
                stop = self.tx_fast_accept(hi, lo).is_some();
                break;
            }
            let g = gwin.run(next, want);
            let r = txw.run(tail, want);
            let run = g.len().min(r.len());
            let mut k = 0;
            while k < run {
                let hi = g.get(k, 1);
                let lo = g.get(k, 0);
                let Some((pa, len, frame)) = self.tx_fast_accept(hi, lo) else {
                    break;
                };
                let addr = match self.tx_fast_verdict::<COPY>(pa, len, frame, &mut arena) {
                    Ok(addr) => addr,
                    Err(FastStop::NoArena) => {
                        stop = true;
                        break;
                    }
                    Err(why) => {
                        dropped = Some(why);
                        break;
                    }
                };
                // The guest's command (IFCS, VLE...; never IC here), checksum fields and VLAN
                // tag, status cleared, RS set so the NIC reports completion.
                r.set(k, 0, addr);
                r.set(k, 1, (hi & !(0xFF << 32)) | (u64::from(txcmd::RS) << 24));
                bytes += u64::from(len);
                k += 1;
            }
            // `k <= run <= want`: both indices stay inside their rings.
            let k = k as u32;
            next += k;
            if next == ring.n {
                next = 0;
            }
            tail += k;
            if tail == rn {
                tail = 0;
            }
            free -= k;
            pkts += k;
            if k < want || stop || dropped.is_some() {
                break;
            }
        }
        self.tx.arena_head = arena;
        if pkts != 0 {
            let last = if tail == 0 { rn - 1 } else { tail - 1 };
            self.push_inflight(pkts, pkts, last, tail, ring.n);
            self.tx.next = next;
            self.tx.real_tail = tail;
            self.counters.tx.packets += u64::from(pkts);
            self.counters.tx.wire_frames += u64::from(pkts);
            self.counters.tx.bytes += bytes;
        }
        if let Some(why) = &dropped {
            if !self.tx.inflight.is_full() {
                self.count_unposted(why);
                self.finish_unposted(1, ring.next(next));
                return (u64::from(pkts) + 1, false, pkts != 0);
            }
        }
        // A drop that cannot be recorded yet (in-flight list full) is inspected again next
        // time; treat it as back-pressure.
        (u64::from(pkts), stop || dropped.is_some(), pkts != 0)
    }

    /// The fast path's test of one guest descriptor (high and low quadwords): a legacy
    /// descriptor with EOP and without IC (a checksum insertion is checked against the frame by
    /// the general path) or VLE (the general path shows the hook the tag the device adds), a length in `1..=MAX_FRAME` and a buffer the policy allows.
    /// Returns the buffer's host-physical address, length and bytes (in place); `None` leaves
    /// the packet to the general path (which refuses it with a precise reason, or handles it;
    /// that includes an allowed buffer the memory cannot lend, which it drops).
    #[inline(always)]
    fn tx_fast_accept(&self, hi: u64, lo: u64) -> Option<(u64, u32, &'a [u8])> {
        // As a u64 (the range test's width; one zero-extension instead of two).
        let len = hi & 0xFFFF;
        if (hi >> 24) as u8 & (txcmd::DEXT | txcmd::EOP | txcmd::IC | txcmd::VLE) != txcmd::EOP {
            return None;
        }
        // A length in `1..=MAX_FRAME` (the range was made with that limit) and a buffer inside
        // the policy's largest allowed range: two comparisons, exactly `MemoryPolicy::check`
        // there (see `FastRange::bytes`). An empty range accepts nothing here.
        if let Some(frame) = self.fast.bytes(lo, len) {
            return Some((lo, len as u32, frame));
        }
        self.tx_fast_accept_other(lo, len as u32)
    }

    /// [`DpiNic::tx_fast_accept`] for a buffer outside the largest allowed range (or too long
    /// for it): the same length limits and the policy's full check.
    #[inline(never)]
    fn tx_fast_accept_other(&self, lo: u64, len: u32) -> Option<(u64, u32, &'a [u8])> {
        if len == 0 || len > MAX_FRAME {
            return None;
        }
        let pa = self.policy.check(GuestPhysAddr(lo), u64::from(len)).ok()?;
        let frame = self.mem.borrow(pa, len as usize).ok()?;
        Some((pa.as_u64(), len, frame))
    }

    /// Record `packets` accepted packets covering `count` guest descriptors whose last real
    /// descriptor is `real_last` (`real_next` the one after it), merged into the previous entry
    /// when contiguous.
    #[inline(always)]
    fn push_inflight(
        &mut self,
        count: u32,
        packets: u32,
        real_last: u32,
        real_next: u32,
        n: u32,
    ) -> bool {
        let (first, epoch, arena_end) = (self.tx.next, self.tx.epoch, self.tx.arena_head);
        debug_assert_eq!(real_next, (real_last + 1) % self.cfg.tx_ring);
        // Real ring indices are below 4096 (`new`): they fit the entry's u16 and are never
        // NOT_POSTED.
        let (real_last, real_next) = (real_last as u16, real_next as u16);
        if let Some(b) = self.tx.inflight.back_mut() {
            let mut end = b.guest_first + b.count();
            if end >= n {
                end -= n;
            }
            if b.posted().is_some()
                && b.epoch == epoch
                && end == first
                && b.count() + count <= COALESCE_MAX
            {
                // At most COALESCE_MAX descriptors (and no more packets): fits a u16.
                b.guest_count += count as u16;
                b.packets += packets as u16;
                b.real_last = real_last;
                b.real_next = real_next;
                b.arena_end = arena_end;
                return true;
            }
        }
        // `count <= MAX_PACKET_DESCS` or `COALESCE_MAX`, `packets <= count`: they fit a u16.
        self.tx.inflight.push_back(InFlight {
            guest_first: first,
            guest_count: count as u16,
            packets: packets as u16,
            real_last,
            real_next,
            arena_end,
            epoch,
        })
    }

    /// [`DpiNic::push_inflight`] for one posted single-descriptor packet (real descriptor
    /// `real_last`, followed by `real_next`): written straight into an empty list (the usual
    /// state with one packet per doorbell, where the previous packet completed first), else
    /// merged or appended.
    #[inline(always)]
    fn push_inflight_one(&mut self, real_last: u32, real_next: u32, n: u32) {
        let (first, epoch, arena_end) = (self.tx.next, self.tx.epoch, self.tx.arena_head);
        debug_assert_eq!(real_next, (real_last + 1) % self.cfg.tx_ring);
        let q = &mut self.tx.inflight;
        if q.len != 0 {
            self.push_inflight(1, 1, real_last, real_next, n);
            return;
        }
        // `head < buf.len()` always; an empty list's next entry goes there.
        q.buf[q.head] = InFlight {
            guest_first: first,
            guest_count: 1,
            packets: 1,
            // Below 4096 (`new`).
            real_last: real_last as u16,
            real_next: real_next as u16,
            arena_end,
            epoch,
        };
        q.len = 1;
    }

    /// Consume new guest TX descriptors.
    #[inline(always)]
    fn tx_consume(&mut self) -> u64 {
        // By reference: only two fields are needed here (a copy of the whole ring went
        // through the stack).
        let Some(ring) = self.tx.live.as_ref() else {
            return 0;
        };
        let (n, gwin) = (ring.n, ring.win);
        let tdt = self.shadow.tdt();
        if self.reconfigured_since_poll() {
            return 0;
        }
        let next = self.tx.next;
        if tdt == next {
            // Nothing new (`next < ring.n`, so the tail is valid).
            return 0;
        }
        // One new descriptor (one packet per doorbell): the fast path's one-descriptor case
        // without the loop. A refusal (nothing moved, no back-pressure) goes to the loop,
        // whose general path counts it.
        let after = if next + 1 == n { 0 } else { next + 1 };
        if after == tdt && !self.tx.inflight.is_full() {
            let (m, stop, posted) = match self.cfg.mode {
                Mode::ZeroCopy => self.tx_fast_single::<false>(gwin, n, next, after),
                Mode::Copy => self.tx_fast_single::<true>(gwin, n, next, after),
            };
            if stop {
                self.counters.tx.backpressure += 1;
                return m;
            }
            if m != 0 {
                if posted {
                    // As in `tx_consume_loop`.
                    fence(Ordering::Release);
                    self.real.write32(Reg::TDT, self.tx.real_tail);
                }
                return m;
            }
        }
        match self.tx.live {
            Some(ring) => self.tx_consume_loop(ring, tdt),
            None => 0,
        }
    }

    /// [`DpiNic::tx_consume`] in general: runs of packets, multi-descriptor packets, refusals.
    #[inline(never)]
    fn tx_consume_loop(&mut self, ring: GuestRing<'a>, tdt: u32) -> u64 {
        if tdt >= ring.n {
            self.stop_tx(DropReason::BadTail);
            return 0;
        }
        let mut moved = 0;
        let mut posted = false;
        while self.tx.next != tdt {
            if self.tx.inflight.is_full() {
                self.counters.tx.backpressure += 1;
                break;
            }
            // Fast path: runs of single-descriptor legacy packets.
            let (m, stop, p) = self.tx_fast(ring, tdt);
            moved += m;
            posted |= p;
            if stop {
                self.counters.tx.backpressure += 1;
                break;
            }
            if m != 0 {
                continue;
            }
            match self.tx_general(ring, tdt) {
                General::Moved(p) => {
                    moved += 1;
                    posted |= p;
                }
                General::Stop => break,
            }
        }
        if posted {
            // Descriptors are in memory before the tail moves (an MMIO write on hardware is
            // ordered after earlier stores on x86; the fence states the requirement).
            fence(Ordering::Release);
            self.real.write32(Reg::TDT, self.tx.real_tail);
        }
        moved
    }

    /// The general TX path for one packet (context + data descriptors, multi-fragment
    /// packets, TSO, refusals); kept out of line so the fast path stays small.
    #[inline(never)]
    fn tx_general(&mut self, ring: GuestRing<'a>, tdt: u32) -> General {
        // General path. Scan one packet: [context...] data... up to EOP.
        let mut idx = self.tx.next;
        let mut count = 0u32;
        let mut nfrags = 0usize;
        let mut total: u32 = 0;
        let mut err: Option<DropReason> = None;
        let mut ctx: Option<[u8; 16]> = None;
        let mut first: Option<[u8; 16]> = None;
        let mut offload = OffloadScan::default();
        // The tag the device inserts: VLE and the special field of the EOP descriptor
        // (SDM 3.3.3.1, 3.3.7.1), in VLAN mode only.
        let mut vlan_tag: Option<u16> = None;
        let mut complete = false;
        while idx != tdt {
            if count as usize == MAX_PACKET_DESCS {
                err.get_or_insert(DropReason::TooManyDescriptors);
                complete = true;
                // Rare and unexplained under QEMU (3 in a whole run): the first few are logged
                // with where the scan started, to tell a guest's packet from a ring the DPI
                // core lost its place in.
                static LOGGED: core::sync::atomic::AtomicU32 =
                    core::sync::atomic::AtomicU32::new(0);
                if LOGGED.fetch_add(1, Ordering::Relaxed) < 8 {
                    let mut head = [0u8; 16];
                    let _ = self.mem.read(ring.desc(self.tx.next), &mut head);
                    log::warn!(
                        "ALLY nic-tx-too-many-descs start={} tdt={} ring={} total={} first={:02x?}",
                        self.tx.next,
                        tdt,
                        ring.n,
                        total,
                        head
                    );
                }
                break;
            }
            let mut raw = [0u8; 16];
            if self.mem.read(ring.desc(idx), &mut raw).is_err() {
                // The ring was validated; a failure here means the layout changed under us.
                self.stop_tx(DropReason::OutsideRam);
                return General::Stop;
            }
            count += 1;
            idx = if idx + 1 == ring.n { 0 } else { idx + 1 };
            let (addr, len, eop) = match TxDesc::parse(&raw) {
                TxDesc::Context(c) => {
                    ctx = Some(raw);
                    offload.desc(ScannedDesc::Context(c));
                    continue;
                }
                TxDesc::Reserved(_) => {
                    err.get_or_insert(DropReason::ReservedDescriptor);
                    if raw[TX_CMD_OFFSET] & txcmd::EOP != 0 {
                        complete = true;
                        break;
                    }
                    continue;
                }
                TxDesc::Legacy(l) => {
                    offload.desc(ScannedDesc::Legacy {
                        cmd: l.cmd,
                        cso: l.cso,
                        css: l.css,
                    });
                    vlan_tag = (l.cmd & txcmd::VLE != 0).then_some(l.special);
                    (l.buffer_addr, u32::from(l.length), l.cmd & txcmd::EOP != 0)
                }
                TxDesc::Data(d) => {
                    offload.desc(ScannedDesc::Data {
                        dcmd: d.dcmd(),
                        popts: d.popts,
                    });
                    vlan_tag = (d.dcmd() & txcmd::VLE != 0).then_some(d.special);
                    (d.buffer_addr, d.length(), d.dcmd() & txcmd::EOP != 0)
                }
            };
            if first.is_none() {
                first = Some(raw);
            }
            if len != 0 && err.is_none() {
                match self.policy.check(GuestPhysAddr(addr), u64::from(len)) {
                    Ok(pa) => {
                        self.frags[nfrags] = Frag {
                            pa: pa.as_u64(),
                            len,
                            raw,
                        };
                        nfrags += 1;
                        total = total.saturating_add(len);
                    }
                    Err(e) => err = Some(DropReason::from_mem(e)),
                }
            }
            if eop {
                complete = true;
                break;
            }
        }
        if !complete {
            // The guest has not published the rest of this packet yet.
            return General::Stop;
        }
        let tse = offload.tse();
        let limit = if tse { MAX_TSO_FRAME } else { MAX_FRAME };
        if err.is_none() && total == 0 {
            err = Some(DropReason::Empty);
        } else if err.is_none() && total > limit {
            err = Some(DropReason::TooLong);
        }
        // What the device will do to the frame: checked against the frame below, once it is
        // assembled (the descriptors alone can already be inconsistent).
        let offload = match offload.request(self.tx.real_ctx) {
            Ok(o) => o,
            Err(_) => {
                err.get_or_insert(DropReason::Offload);
                Offload::None
            }
        };
        if let Some(why) = err {
            self.counters.tx.drops[why as usize] += 1;
            self.finish_unposted(count, idx);
            return General::Moved(false);
        }
        // Room on the real ring (and in the arena)?
        let data_descs = match self.cfg.mode {
            Mode::Copy => total.div_ceil(COPY_CHUNK),
            Mode::ZeroCopy => nfrags as u32,
        };
        let need = data_descs + u32::from(ctx.is_some());
        if need > self.real_tx_free() {
            self.counters.tx.backpressure += 1;
            return General::Stop;
        }
        let vlan_tag = vlan_tag.filter(|_| self.guest_cfg.ctrl & ctrl::VME != 0);
        let arena_before = self.tx.arena_head;
        let verdict = match self.cfg.mode {
            Mode::Copy => {
                let Some(at) = self.arena_alloc(total) else {
                    self.counters.tx.backpressure += 1;
                    return General::Stop;
                };
                let mut off = 0u64;
                let mut ok = true;
                for f in &self.frags[..nfrags] {
                    let dst = HostPhysAddr(at + off);
                    ok &= match self.mem.borrow(HostPhysAddr(f.pa), f.len as usize) {
                        Ok(src) => self.mem.write(dst, src).is_ok(),
                        Err(_) => false,
                    };
                    off += u64::from(f.len);
                }
                match self.mem.borrow(HostPhysAddr(at), total as usize) {
                    Ok(frame) if ok => {
                        judge(&mut self.hook, &offload, frame, vlan_tag, &mut self.tagged)
                    }
                    _ => Some(Some(DropReason::Verdict)),
                }
            }
            Mode::ZeroCopy => {
                if nfrags == 1 {
                    match self
                        .mem
                        .borrow(HostPhysAddr(self.frags[0].pa), total as usize)
                    {
                        Ok(frame) => {
                            judge(&mut self.hook, &offload, frame, vlan_tag, &mut self.tagged)
                        }
                        Err(_) => Some(Some(DropReason::Verdict)),
                    }
                } else {
                    self.scratch.clear();
                    let mut ok = true;
                    for f in &self.frags[..nfrags] {
                        let old = self.scratch.len();
                        self.scratch.resize(old + f.len as usize, 0);
                        ok &= self
                            .mem
                            .read(HostPhysAddr(f.pa), &mut self.scratch[old..])
                            .is_ok();
                    }
                    if ok {
                        judge(
                            &mut self.hook,
                            &offload,
                            &self.scratch,
                            vlan_tag,
                            &mut self.tagged,
                        )
                    } else {
                        Some(Some(DropReason::Verdict))
                    }
                }
            }
        };
        if let Some(why) = verdict {
            // Give the arena space back: nothing after it was allocated.
            self.tx.arena_head = arena_before;
            match why {
                Some(why) => self.counters.tx.drops[why as usize] += 1,
                None => self.counters.tx.held += 1,
            }
            self.finish_unposted(count, idx);
            return General::Moved(false);
        }
        self.counters.tx.wire_frames += match offload {
            // TSO: the device cuts the payload after the headers into MSS-sized segments
            // (8254x SDM 3.5); the context was checked (HDRLEN, MSS at least MIN_TSO_MSS).
            Offload::Context {
                context: c,
                tse: true,
                ..
            } => {
                let payload = total.saturating_sub(u32::from(c.hdrlen));
                u64::from(payload.div_ceil(u32::from(c.mss).max(1)).max(1))
            }
            _ => 1,
        };
        let last = self.post(ctx, first, nfrags, total);
        let next_real = self.tx.real_tail;
        self.push_inflight(count, 1, last, next_real, ring.n);
        self.tx.next = idx;
        self.counters.tx.packets += 1;
        self.counters.tx.bytes += u64::from(total);
        General::Moved(true)
    }

    /// Counts a packet the fast path's hook call did not pass.
    fn count_unposted(&mut self, why: &FastStop) {
        match why {
            FastStop::Held => self.counters.tx.held += 1,
            FastStop::BadChecksum => self.counters.tx.drops[DropReason::Checksum as usize] += 1,
            _ => self.counters.tx.drops[DropReason::Verdict as usize] += 1,
        }
    }

    /// A dropped (or held) packet: complete it in order with everything before it.
    fn finish_unposted(&mut self, count: u32, idx: u32) {
        // Room was checked at the top of the consume loop.
        self.tx.inflight.push_back(InFlight {
            guest_first: self.tx.next,
            // At most MAX_PACKET_DESCS descriptors: fits a u16.
            guest_count: count as u16,
            packets: 1,
            real_last: NOT_POSTED,
            real_next: 0,
            arena_end: self.tx.arena_head,
            epoch: self.tx.epoch,
        });
        self.tx.next = idx;
    }

    /// Reserve `len` contiguous arena bytes; returns their physical address.
    fn arena_alloc(&mut self, len: u32) -> Option<u64> {
        let tail = self.tx.arena_tail;
        arena_alloc(
            &mut self.tx.arena_head,
            tail,
            self.cfg.tx_arena,
            self.layout.arena,
            len,
        )
    }

    /// Write the real descriptors for an accepted packet; returns the last one's index.
    fn post(
        &mut self,
        ctx: Option<[u8; 16]>,
        first: Option<[u8; 16]>,
        nfrags: usize,
        total: u32,
    ) -> u32 {
        let n = self.cfg.tx_ring;
        let put = |this: &mut Self, mut raw: [u8; 16]| -> u32 {
            raw[TX_STATUS_OFFSET] = 0;
            let i = this.tx.real_tail;
            // The real ring is DPI memory laid out by `new`; a failure is impossible there.
            let _ = this.mem.write(this.real_tx_desc(i), &raw);
            this.tx.real_tail = if i + 1 == n { 0 } else { i + 1 };
            i
        };
        if let Some(mut c) = ctx {
            c[TX_CMD_OFFSET] &= !txcmd::RS;
            put(self, c);
            self.tx.real_ctx = Some(TxContextDesc::from_bytes(&c));
        }
        let mut last = 0;
        match self.cfg.mode {
            Mode::ZeroCopy => {
                for k in 0..nfrags {
                    let mut raw = self.frags[k].raw;
                    raw[TX_CMD_OFFSET] &= !(txcmd::RS | txcmd::EOP);
                    if k + 1 == nfrags {
                        raw[TX_CMD_OFFSET] |= txcmd::RS | txcmd::EOP;
                    }
                    last = put(self, raw);
                }
            }
            Mode::Copy => {
                let first = first.unwrap_or([0u8; 16]);
                let at = self.tx.arena_head - u64::from(total);
                let base = self.layout.arena + at % u64::from(self.cfg.tx_arena);
                let chunks = total.div_ceil(COPY_CHUNK);
                for k in 0..chunks {
                    let off = k * COPY_CHUNK;
                    let len = (total - off).min(COPY_CHUNK);
                    let end = if k + 1 == chunks {
                        txcmd::EOP | txcmd::RS
                    } else {
                        0
                    };
                    let raw = match TxDesc::parse(&first) {
                        TxDesc::Data(d) => {
                            let dcmd = (d.dcmd() & !(txcmd::EOP | txcmd::RS)) | end;
                            TxDataDesc::new(base + u64::from(off), len, dcmd, d.popts, d.special)
                                .to_bytes()
                        }
                        _ => {
                            let l = LegacyTxDesc::from_bytes(&first);
                            LegacyTxDesc {
                                buffer_addr: base + u64::from(off),
                                length: len as u16,
                                cso: l.cso,
                                cmd: (l.cmd & !(txcmd::EOP | txcmd::RS)) | end,
                                status: 0,
                                css: l.css,
                                special: l.special,
                            }
                            .to_bytes()
                        }
                    };
                    last = put(self, raw);
                }
            }
        }
        last
    }

    /// Passes on the frames the hook released (held out-of-order segments now in order and
    /// passed): to the wire, and into the guest's receive ring. A frame that finds no room
    /// waits for the next poll.
    #[cold]
    #[inline(never)]
    fn forward_released(&mut self) -> u64 {
        self.tx_post_released() + self.rx_deliver_released()
    }

    /// Posts released frames on the real TX ring as plain single-descriptor frames from the
    /// arena. The guest's checksum offload does not come with them (the hook kept the frame
    /// as inspected), so Ally fills in the IPv4 header and TCP/UDP checksums (RFC 1071) itself.
    /// Its VLAN tag is in the frame (the hook saw the frame as the wire carries it), so the
    /// descriptor asks for no insertion.
    fn tx_post_released(&mut self) -> u64 {
        let mut posted = 0u64;
        while let Some(mut frame) = self
            .released_tx
            .take()
            .or_else(|| self.hook.take_forward(Direction::ToWire))
        {
            // A held TSO packet cannot go out as one frame: its sender resends the bytes.
            if frame.len() < 14 || frame.len() > STD_FRAME_MAX.min(self.cfg.tx_arena as usize) {
                self.counters.tx.released_refused += 1;
                continue;
            }
            if self.real_tx_free() == 0 || self.tx.inflight.is_full() {
                self.released_tx = Some(frame);
                break;
            }
            let len = frame.len() as u32;
            let Some(at) = self.arena_alloc(len) else {
                self.released_tx = Some(frame);
                break;
            };
            super::offload::fill_checksums(&mut frame);
            if self.mem.write(HostPhysAddr(at), &frame).is_err() {
                self.counters.tx.released_refused += 1;
                continue;
            }
            let raw = LegacyTxDesc {
                buffer_addr: at,
                length: len as u16,
                cso: 0,
                cmd: txcmd::EOP | txcmd::IFCS | txcmd::RS,
                status: 0,
                css: 0,
                special: 0,
            }
            .to_bytes();
            let i = self.tx.real_tail;
            // The real ring is DPI memory laid out by `new`; a failure is impossible there.
            let _ = self.mem.write(self.real_tx_desc(i), &raw);
            self.tx.real_tail = if i + 1 == self.cfg.tx_ring { 0 } else { i + 1 };
            // No guest descriptor to complete: an entry of none, in order with the rest.
            // Real ring indices are below 4096 (`new`): they fit the entry's u16.
            self.tx.inflight.push_back(InFlight {
                guest_first: self.tx.next,
                guest_count: 0,
                packets: 1,
                real_last: i as u16,
                real_next: self.tx.real_tail as u16,
                arena_end: self.tx.arena_head,
                epoch: self.tx.epoch,
            });
            self.counters.tx.released += 1;
            self.counters.tx.packets += 1;
            self.counters.tx.wire_frames += 1;
            self.counters.tx.bytes += u64::from(len);
            posted += 1;
        }
        if posted > 0 {
            fence(Ordering::Release);
            self.real.write32(Reg::TDT, self.tx.real_tail);
        }
        posted
    }

    /// Delivers released frames into the guest's receive ring, as received frames whose
    /// checksums the device did not check (IXSM: the guest's stack checks them).
    fn rx_deliver_released(&mut self) -> u64 {
        let mut delivered = 0u64;
        while let Some(mut frame) = self
            .released_rx
            .take()
            .or_else(|| self.hook.take_forward(Direction::FromWire))
        {
            // The frame as the wire carried it: in VLAN mode its tag goes into the special
            // field, VP set, as the device would have delivered it (the guest's stack finds
            // its VLAN interface by that tag).
            let mut last = RxDesc {
                status: rxsta::IXSM,
                ..Default::default()
            };
            if self.guest_cfg.ctrl & ctrl::VME != 0 {
                if let Some((tci, untagged)) = strip_vlan_tag(&frame) {
                    frame = untagged;
                    last.status |= rxsta::VP;
                    last.special = tci;
                }
            }
            let room = self.guest_rx_room(frame.len());
            let outcome = match room {
                Ok((ring, need)) => self.write_rx(ring, need, &frame, last),
                Err(d) => d,
            };
            match outcome {
                Deliver::Wait => {
                    self.released_rx = Some(frame);
                    break;
                }
                Deliver::Done => {
                    self.counters.rx.released += 1;
                    self.counters.rx.packets += 1;
                    self.counters.rx.bytes += frame.len() as u64;
                    delivered += 1;
                }
                Deliver::Dropped(_) | Deliver::Held => self.counters.rx.released_refused += 1,
            }
        }
        if delivered > 0 {
            self.raise(icr::RXT0);
        }
        delivered
    }

    /// Move received frames from the real ring into the guest's.
    #[inline(always)]
    fn rx_receive(&mut self) -> u64 {
        // Nothing received: one byte read (the common case when only TX is busy), inline in
        // `poll`; the receive work is out of line so that it does not crowd TX's registers.
        if self.rx_win.desc_u8(self.rx.real_next, 12) & rxsta::DD == 0 {
            return 0;
        }
        self.rx_receive_frames()
    }

    /// [`DpiNic::rx_receive`] once a frame is there.
    #[inline(never)]
    fn rx_receive_frames(&mut self) -> u64 {
        let n = self.cfg.rx_ring;
        let mut moved = 0;
        let mut recycled = false;
        let mut delivered = false;
        loop {
            // Find a complete frame: DD on every descriptor up to EOP.
            let first = self.rx.real_next;
            let mut k = 0u32;
            let mut total = 0usize;
            let mut last = RxDesc::default();
            let mut complete = false;
            while k < n {
                let mut raw = [0u8; 16];
                if self
                    .mem
                    .read(self.real_rx_desc((first + k) % n), &mut raw)
                    .is_err()
                {
                    break;
                }
                let d = RxDesc::from_bytes(&raw);
                if d.status & rxsta::DD == 0 {
                    break;
                }
                k += 1;
                total += usize::from(d.length);
                last = d;
                if d.status & rxsta::EOP != 0 {
                    complete = true;
                    break;
                }
            }
            if !complete {
                break;
            }
            let verdict = self.deliver(first, k, total, last);
            match verdict {
                Deliver::Wait => {
                    self.counters.rx.backpressure += 1;
                    break;
                }
                Deliver::Done => {
                    delivered = true;
                    self.counters.rx.packets += 1;
                    self.counters.rx.bytes += total as u64;
                }
                Deliver::Dropped(why) => self.counters.rx.drops[why as usize] += 1,
                Deliver::Held => self.counters.rx.held += 1,
            }
            self.counters.rx.wire_frames += 1;
            self.rx.last = Some((first, k, total));
            // Give the DPI buffers back: clear their status so DD means "new".
            for j in 0..k {
                let at = HostPhysAddr(self.real_rx_desc((first + j) % n).as_u64() + 8);
                let _ = self.mem.write(at, &[0u8; 8]);
            }
            self.rx.real_next = (first + k) % n;
            recycled = true;
            moved += 1;
        }
        if recycled {
            fence(Ordering::Release);
            self.real.write32(Reg::RDT, (self.rx.real_next + n - 1) % n);
        }
        if delivered {
            self.raise(icr::RXT0);
        }
        moved
    }

    /// The guest's receive ring when it has buffers for a frame of `total` bytes: the ring and
    /// the buffers needed; else what to do with the frame.
    fn guest_rx_room(&mut self, total: usize) -> Result<(GuestRing<'a>, u32), Deliver> {
        let Some(ring) = self.rx.ring else {
            return Err(Deliver::Dropped(DropReason::GuestRxOff));
        };
        if self.rx.stopped || !self.rx.enabled {
            return Err(Deliver::Dropped(DropReason::GuestRxOff));
        }
        let rdt = self.shadow.rdt();
        if self.reconfigured_since_poll() {
            return Err(Deliver::Wait);
        }
        if rdt >= ring.n {
            self.stop_rx(DropReason::BadTail);
            return Err(Deliver::Dropped(DropReason::GuestRxOff));
        }
        let need = total.div_ceil(self.rx.buf as usize).max(1) as u32;
        // SDM 3.2.6: head == tail means no buffers.
        let avail = (rdt + ring.n - self.rx.next) % ring.n;
        if avail < need {
            return Err(Deliver::Wait);
        }
        Ok((ring, need))
    }

    /// Deliver one received frame (`k` real descriptors from `first`) to the guest.
    fn deliver(&mut self, first: u32, k: u32, total: usize, last: RxDesc) -> Deliver {
        let n = self.cfg.rx_ring;
        let (ring, need) = match self.guest_rx_room(total) {
            Ok(r) => r,
            Err(d) => return d,
        };
        // The frame, contiguous: in place when it fits one DPI buffer, else gathered into the
        // scratch buffer (taken out of `self` while the frame is in use).
        let rxbuf = |i: u32| self.layout.rx_bufs + u64::from(i % n) * u64::from(self.cfg.rx_buf);
        let mut scratch = core::mem::take(&mut self.scratch);
        let frame: &[u8] = if k == 1 {
            match self.mem.borrow(HostPhysAddr(rxbuf(first)), total) {
                Ok(f) => f,
                Err(_) => {
                    self.scratch = scratch;
                    return Deliver::Dropped(DropReason::OutsideRam);
                }
            }
        } else {
            scratch.clear();
            let mut left = total;
            for j in 0..k {
                let mut raw = [0u8; 16];
                let _ = self.mem.read(self.real_rx_desc((first + j) % n), &mut raw);
                let len = usize::from(RxDesc::from_bytes(&raw).length).min(left);
                let old = scratch.len();
                scratch.resize(old + len, 0);
                let _ = self
                    .mem
                    .read(HostPhysAddr(rxbuf(first + j)), &mut scratch[old..]);
                left -= len;
            }
            &scratch
        };
        // As it came off the wire: no receiver takes a frame with a wrong checksum.
        if checksum::verify(frame, Inserted::NONE).is_err() {
            self.scratch = scratch;
            return Deliver::Dropped(DropReason::Checksum);
        }
        // VLAN mode took the tag off into the special field (VP): the hook sees the frame as
        // the wire carried it, and a held frame keeps its tag.
        // Untagged frames (the common case) cost one bit test.
        let verdict = if last.status & rxsta::VP != 0 {
            insert_vlan_tag(&mut self.tagged, frame, last.special);
            self.hook.inspect(&self.tagged, Direction::FromWire)
        } else {
            self.hook.inspect(frame, Direction::FromWire)
        };
        let d = match verdict {
            HookVerdict::Pass => self.write_rx(ring, need, frame, last),
            HookVerdict::Drop => Deliver::Dropped(DropReason::Verdict),
            HookVerdict::Hold => Deliver::Held,
        };
        self.scratch = scratch;
        d
    }

    /// Writes `frame` into the guest's next `need` receive buffers with the write-back the
    /// device makes (`last`: the status, errors, checksum and VLAN tag of its last descriptor).
    fn write_rx(&mut self, ring: GuestRing<'a>, need: u32, frame: &[u8], last: RxDesc) -> Deliver {
        let gbuf = self.rx.buf as usize;
        let total = frame.len();
        // Validate every guest buffer before writing any.
        let mut bad: Option<DropReason> = None;
        let mut addrs = [0u64; MAX_PACKET_DESCS];
        if need as usize > MAX_PACKET_DESCS {
            bad = Some(DropReason::TooLong);
        } else {
            for c in 0..need {
                let mut raw = [0u8; 8];
                let at = ring.desc((self.rx.next + c) % ring.n);
                let len = (total - c as usize * gbuf).min(gbuf) as u64;
                let checked = self
                    .mem
                    .read(at, &mut raw)
                    .map_err(|_| DropReason::OutsideRam)
                    .and_then(|_| {
                        self.policy
                            .check(GuestPhysAddr(u64::from_le_bytes(raw)), len)
                            .map_err(DropReason::from_mem)
                    });
                match checked {
                    Ok(pa) => addrs[c as usize] = pa.as_u64(),
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
        }
        for c in 0..need {
            let at = ring.desc((self.rx.next + c) % ring.n);
            let is_last = c + 1 == need;
            let wb = match bad {
                // Refused buffer: consume the descriptors with an error so the driver
                // discards them and the ring keeps moving; nothing is written to the buffer.
                Some(_) => RxDesc {
                    status: rxsta::DD | rxsta::EOP,
                    errors: rxerr::RXE,
                    ..Default::default()
                },
                None => {
                    let off = c as usize * gbuf;
                    let len = (total - off).min(gbuf);
                    let _ = self
                        .mem
                        .write(HostPhysAddr(addrs[c as usize]), &frame[off..off + len]);
                    // As the device: DD on each, EOP and the checksum/error results on the last.
                    let (status, errors, csum, special) = if is_last {
                        (
                            last.status | rxsta::DD | rxsta::EOP,
                            last.errors,
                            last.csum,
                            last.special,
                        )
                    } else {
                        ((last.status & !rxsta::EOP) | rxsta::DD, 0, 0, last.special)
                    };
                    RxDesc {
                        buffer_addr: 0,
                        length: len as u16,
                        csum,
                        status,
                        errors,
                        special,
                    }
                }
            };
            fence(Ordering::Release);
            let _ = self
                .mem
                .write(HostPhysAddr(at.as_u64() + 8), &wb.writeback_bytes());
        }
        self.rx.next = (self.rx.next + need) % ring.n;
        self.shadow.set_rdh(self.rx.next);
        match bad {
            Some(why) => Deliver::Dropped(why),
            None => Deliver::Done,
        }
    }
}

/// Write back one completed guest TX descriptor as the device does: when it asked for status
/// (RS), DD set and the collision/underrun bits clear. Returns whether it wrote.
#[inline(always)]
fn complete_desc(d: DescRun<'_>, k: usize) -> bool {
    if d.get_u8(k, TX_CMD_OFFSET) & txcmd::RS == 0 {
        return false;
    }
    let sta = d.get_u8(k, TX_STATUS_OFFSET);
    d.set_u8(
        k,
        TX_STATUS_OFFSET,
        (sta | txsta::DD) & !(txsta::EC | txsta::LC | txsta::TU),
    );
    true
}

/// Reserve `len` contiguous bytes of the copy arena (a byte FIFO freed in completion order):
/// `head`/`tail` are free-running byte counts, `size` the arena size at physical `base`.
#[inline(always)]
fn arena_alloc(head: &mut u64, tail: u64, size: u32, base: u64, len: u32) -> Option<u64> {
    let size = u64::from(size);
    let len = u64::from(len);
    let used = *head - tail;
    let pos = *head % size;
    let pad = if pos + len > size { size - pos } else { 0 };
    if used + pad + len > size {
        return None;
    }
    *head += pad + len;
    Some(base + (pos + pad) % size)
}

/// The general path's verdict on one assembled frame: its offload checked against it first
/// (a refused offload is not inspected; its offsets are the buffer's, before any tag), then
/// the hook, on the frame with the tag `vlan_tag` the device inserts (built in `tagged`).
/// `None` passes it; `Some(None)` means the hook held it.
#[inline]
fn judge<H: PacketHook>(
    hook: &mut H,
    offload: &Offload,
    frame: &[u8],
    vlan_tag: Option<u16>,
    tagged: &mut Vec<u8>,
) -> Option<Option<DropReason>> {
    let headers = Headers::parse(frame);
    let Ok(inserted) = offload.checked(frame, headers.as_ref()) else {
        return Some(Some(DropReason::Offload));
    };
    if checksum::verify_parsed(frame, headers.as_ref(), inserted).is_err() {
        return Some(Some(DropReason::Checksum));
    }
    let on_wire = match vlan_tag {
        Some(tci) => {
            insert_vlan_tag(tagged, frame, tci);
            &tagged[..]
        }
        None => frame,
    };
    match hook.inspect(on_wire, Direction::ToWire) {
        HookVerdict::Pass => None,
        HookVerdict::Drop => Some(Some(DropReason::Verdict)),
        HookVerdict::Hold => Some(None),
    }
}

/// The IEEE 802.1Q TPID, the only VET Ally lets the guest program (SDM 13.4.9).
const VLAN_TPID: [u8; 2] = [0x81, 0x00];

/// Bytes of the destination and source MAC addresses, after which a VLAN tag sits.
const MAC_ADDRESSES: usize = 12;

/// `frame` with the 802.1Q tag `tci` after its MAC addresses, into `out`: the frame the device
/// sends for a VLE descriptor (SDM 3.3.3.1) or received before VLAN mode took the tag off
/// into the special field (3.2.3.1).
fn insert_vlan_tag(out: &mut Vec<u8>, frame: &[u8], tci: u16) {
    let split = frame.len().min(MAC_ADDRESSES);
    out.clear();
    out.extend_from_slice(&frame[..split]);
    out.extend_from_slice(&VLAN_TPID);
    out.extend_from_slice(&tci.to_be_bytes());
    out.extend_from_slice(&frame[split..]);
}

/// The tag of an 802.1Q-tagged `frame` and the frame without it, as VLAN mode delivers it;
/// `None` for an untagged frame.
fn strip_vlan_tag(frame: &[u8]) -> Option<(u16, Vec<u8>)> {
    if frame.get(MAC_ADDRESSES..MAC_ADDRESSES + 2)? != VLAN_TPID {
        return None;
    }
    let tci = frame.get(MAC_ADDRESSES + 2..MAC_ADDRESSES + 4)?;
    let tci = u16::from_be_bytes([tci[0], tci[1]]);
    let mut untagged = Vec::with_capacity(frame.len() - 4);
    untagged.extend_from_slice(&frame[..MAC_ADDRESSES]);
    untagged.extend_from_slice(&frame[MAC_ADDRESSES + 4..]);
    Some((tci, untagged))
}

/// Why the TX fast path stopped at an accepted descriptor.
enum FastStop {
    /// The copy arena is full (back-pressure).
    NoArena,
    /// The hook dropped the packet.
    Dropped,
    /// The hook held the packet (it forwards it later).
    Held,
    /// A checksum its receiver would refuse ([`DropReason::Checksum`]); the hook did not see it.
    BadChecksum,
}

/// What the general TX path did with one packet.
enum General {
    /// Consumed (posted when `true`, else dropped and completed).
    Moved(bool),
    /// Stop consuming for this poll (incomplete packet, back-pressure, ring stopped).
    Stop,
}

enum Deliver {
    Done,
    Wait,
    Dropped(DropReason),
    /// The hook held the frame (it forwards it later).
    Held,
}
