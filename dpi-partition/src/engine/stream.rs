//! Inline TCP stream tracking and normalization.
//!
//! Ally sits inline, so instead of guessing how the receiver will reassemble a stream it makes
//! the receiver see exactly the bytes that were inspected: every TCP segment is placed in its
//! flow's byte stream and then either accepted (forwarded), held back until it is in order, or
//! dropped. This defeats the classic evasions (Ptacek & Newsham, 1998): a pattern split over
//! many segments is matched on [`StreamOutcome::Accept`]'s `window` (the previously accepted
//! bytes followed by the new ones); reordered segments are held and released in order; a segment
//! whose bytes differ from bytes already accepted or held (overlap with different content) is
//! dropped, as is data outside the receiver's window; spoofed RSTs and SYNs cannot wipe the
//! tracker's state.
//!
//! # Policy
//!
//! - **Flows** are keyed by the two endpoints (either order) and the frame's VLAN IDs (the same
//!   addresses on two VLANs are two networks; an RST on another VLAN is no RST of this flow). The sender of the first SYN (without
//!   ACK) is the client; a flow first seen through a SYN+ACK has its sender as the server; any
//!   other first segment is a *midstream pickup* (Suricata's `midstream: true`): its sender is
//!   taken as the client and each direction's next sequence number is fixed by the first segment
//!   seen from it (or by the peer's acknowledgement if one was seen).
//! - **Sequence numbers** are compared mod 2^32 (RFC 9293 §3.4). The receiver's window is the
//!   right edge its accepted segments advertised (`ack + window << scale`, the maximum seen: a
//!   window may not shrink, RFC 9293 §3.8.6). The scale applies when both SYNs carried the option
//!   (RFC 7323 §2.2, shift capped at 14); without a handshake the scale is unknown and taken as 14
//!   if no SYN without the option was seen. Data entirely outside
//!   `[next, right edge)` is [`StreamDrop::OutOfWindow`]; bytes before `next` are
//!   retransmissions: identical ones pass (trimmed from the new bytes), different ones are
//!   [`StreamDrop::OverlapMismatch`].
//! - **Retransmission check**: each direction keeps its accepted bytes while the receiver has not
//!   acknowledged them, up to [`StreamConfig::retain_bytes`] (and at least `context_bytes`, the
//!   matching context). Bytes older than that are not compared: if the receiver acknowledged them
//!   it discards them anyway; otherwise they pass unverified and are counted
//!   ([`StreamStats::unverified_bytes`]). Refusing them would break recovery from a loss past Ally
//!   (SACK retransmits holes far behind), so size `retain_bytes` to the bandwidth-delay product.
//! - **RST** (RFC 5961 §3.2): accepted only when its sequence number is exactly the next expected
//!   one (or, before the sender's SYN was seen, when it acknowledges the peer's SYN). An in-window
//!   RST that is not exact is dropped and counted as a challenge case (Ally sends no challenge
//!   ACK; the real peer's RST is exact). Anything else is [`StreamDrop::RstOutOfWindow`]. A bad
//!   RST changes nothing. An accepted RST ends the connection but not the flow: its stream state
//!   is freed and the tuple stays *reset* (until its idle timeout, eviction, or a new SYN that
//!   starts a connection on it). A segment with data or FIN on a reset flow is
//!   [`StreamDrop::AfterReset`]. Removing the flow instead would let an RST the receiver never
//!   gets (sent to another MAC address or VLAN, or with a TTL that expires on the way) wipe the
//!   matching context, the rest of the stream then picked up midstream without it: a pattern
//!   split around the RST would pass.
//! - **SYN**: a SYN whose sequence number is not the one recorded for its direction, or a SYN
//!   from a direction that already sent data, is [`StreamDrop::SynOnEstablished`] and changes
//!   nothing; an identical retransmission is accepted. A SYN+ACK must acknowledge the peer's SYN.
//!   A SYN on a midstream flow that never carried data restarts it as a new flow.
//! - **FIN** fixes the end of its direction's stream: data past it is out of window, a FIN
//!   elsewhere is an overlap mismatch. A flow is removed once both FINs are accepted and
//!   acknowledged, or after its timeout.
//! - **Malformed**: SYN with RST or FIN, no ACK on a segment other than SYN or RST (RFC 9293
//!   §3.10.7.4), a truncated TCP header, TCP in IP fragments (not reassembled here: a first
//!   fragment's payload is not the segment's).
//! - **No-hold mode** ([`StreamConfig::hold_out_of_order`] false): an in-window segment ahead of
//!   the next expected byte is [`StreamDrop::OutOfOrder`] and nothing is stored; the sender
//!   retransmits it, and the retransmission is accepted once it is in order.
//! - [`StreamTracker::block`] (a drop verdict) makes every later segment of the flow, both ways,
//!   [`StreamDrop::Blocked`], except an exact RST, which is passed and closes it.
//!
//! # Bounds
//!
//! The table has `max_flows` entries (slots: the next power of two). A flow may live in any of
//! 16 slots picked by double hashing from one keyed hash (a window of 8 consecutive slots, as
//! before, clustered: a table 44% full refused 0.3% of new flows in the benchmark's synthetic
//! mix, whose flows never close). A new flow takes a free or expired slot of its candidates,
//! else evicts the least recently seen of them that has no stream state (no accepted or held bytes: a
//! handshake or a pure-ACK pickup), else hits the flow limit. Flows with stream state are never
//! evicted, since that would lose the context a split pattern needs. Out-of-order frames are held
//! as copies up to `max_bytes_per_flow` per direction; held frames, frames released but not yet
//! taken, and retained bytes beyond `context_bytes` together stay within `max_total_bytes`.
//! Retained context is at most `2 * context_bytes` per flow, so the worst case is about
//! `max_flows * (size_of entry + 2 * context_bytes) + max_total_bytes`, allocation slack
//! included [`StreamConfig::heap_bound`]. At a limit,
//! [`LimitPolicy::FailClosed`] drops the segment ([`StreamDrop::FlowLimit`],
//! [`StreamDrop::MemoryLimit`]); [`LimitPolicy::FailOpen`] passes it as
//! [`StreamOutcome::Untracked`] and stops tracking that flow (its held frames are released for
//! per-packet inspection). Nothing here panics on any input.
//!
//! Not normalized here: urgent data (URG), TCP options other than window scale (timestamps and
//! PAWS), checksums, TTL. Segments the receiver discards but Ally accepted cannot make Ally skip
//! bytes: the real bytes then differ from the retained ones and are dropped.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::IpAddr;

use super::keyed::{flow_key, keyed_hash};
use super::packet::{ipproto, tcpflags, Packet, L4};
use super::Timestamp;

/// Probe window of the flow table.
const PROBE: usize = 8;
/// Largest receive window RFC 7323 allows is `65535 << 14`, just under 2^30: used when a
/// window is unknown, and as the furthest back a retransmission may reach.
const MAX_WINDOW: i64 = 1 << 30;
/// RFC 7323 §2.3: larger shift counts are taken as 14.
const MAX_WSCALE: u8 = 14;

/// What happens when a limit is hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Drop the segment (and count it): nothing passes uninspected.
    #[default]
    FailClosed,
    /// Pass the segment untracked (and count it): availability over inspection.
    FailOpen,
}

/// Stream-tracker configuration.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// Most flows tracked at once.
    pub max_flows: usize,
    /// Out-of-order frame bytes held per direction of a flow.
    pub max_bytes_per_flow: usize,
    /// Held and released frame bytes plus retained bytes beyond `context_bytes`, all flows.
    pub max_total_bytes: usize,
    /// Accepted bytes before a segment given with it as matching context.
    pub context_bytes: usize,
    /// Accepted bytes kept per direction while unacknowledged, to check retransmissions.
    pub retain_bytes: usize,
    /// Behaviour at a limit.
    pub on_limit: LimitPolicy,
    /// Idle timeout of flows that carried data or completed the handshake, microseconds.
    pub established_timeout_us: u64,
    /// Idle timeout of other flows and of flows with both FINs seen, microseconds.
    pub handshake_timeout_us: u64,
    /// SipHash key of the flow table: set it from a boot-time random source.
    pub key: [u64; 2],
    /// Hold out-of-order segments until the gap is filled (true), or drop them as
    /// [`StreamDrop::OutOfOrder`] without storing anything (false: for a pipeline that cannot
    /// hold and re-inject frames; the sender retransmits them in order).
    pub hold_out_of_order: bool,
}

/// Bytes of a flow slot itself (a test checks the real size against it, so that
/// [`StreamConfig::heap_bound`] stays an upper bound).
pub const FLOW_SLOT_BYTES: usize = 320;

impl StreamConfig {
    /// Worst-case heap bytes of a tracker with this configuration: every slot, each direction's
    /// retained bytes at the most capacity `retain` lets them keep (`2 * context + 64` before it
    /// shrinks them), and the bytes beyond the context (`max_total_bytes`) at twice their
    /// length, as a growing deque may hold them.
    pub const fn heap_bound(&self) -> usize {
        let per_direction = 2 * self.context_bytes + 64;
        self.max_flows.next_power_of_two() * (FLOW_SLOT_BYTES + 2 * per_direction)
            + 2 * self.max_total_bytes
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_flows: 8192,
            max_bytes_per_flow: 256 * 1024,
            max_total_bytes: 16 * 1024 * 1024,
            context_bytes: 1024,
            retain_bytes: 64 * 1024,
            on_limit: LimitPolicy::FailClosed,
            established_timeout_us: 3_600_000_000,
            handshake_timeout_us: 30_000_000,
            key: [0x736f_6d65_5f61_6c6c, 0x795f_6b65_795f_2121],
            hold_out_of_order: true,
        }
    }
}

/// A tracked flow, valid until it is removed (a removed flow's id matches nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowId {
    slot: u32,
    serial: u64,
}

impl FlowId {
    /// Its slot in the flow table.
    pub fn slot(self) -> usize {
        self.slot as usize
    }

    /// The serial number that tells this flow from earlier ones in the same slot (never 0).
    pub fn serial(self) -> u64 {
        self.serial
    }

    /// A flow id for tests of state kept alongside the tracker's.
    #[cfg(test)]
    pub(crate) fn for_test(slot: usize, serial: u64) -> FlowId {
        FlowId {
            slot: slot as u32,
            serial,
        }
    }
}

/// Direction of a segment within its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamDir {
    /// From the client (the SYN's sender, or the first sender of a midstream flow).
    ToServer,
    /// From the server.
    ToClient,
}

impl StreamDir {
    fn from_index(i: usize) -> StreamDir {
        if i == 0 {
            StreamDir::ToServer
        } else {
            StreamDir::ToClient
        }
    }
}

/// Why a segment is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamDrop {
    /// Its bytes (or FIN position) differ from bytes already accepted or held: evasion.
    OverlapMismatch,
    /// Its data lies entirely outside the receiver's window, or past the direction's FIN.
    OutOfWindow,
    /// RST outside the window, or for no tracked flow.
    RstOutOfWindow,
    /// RST inside the window but not at the next expected sequence number (RFC 5961 §3.2).
    RstNotExact,
    /// A SYN that is not a retransmission of its direction's SYN.
    SynOnEstablished,
    /// The flow was blocked by [`StreamTracker::block`].
    Blocked,
    /// The flow table is full ([`LimitPolicy::FailClosed`]).
    FlowLimit,
    /// Holding the segment would exceed a memory limit ([`LimitPolicy::FailClosed`]).
    MemoryLimit,
    /// Invalid flag combination, truncated header, or an IP fragment.
    Malformed,
    /// An in-window segment ahead of the next expected byte while
    /// [`StreamConfig::hold_out_of_order`] is false.
    OutOfOrder,
    /// Data or FIN on a flow an accepted RST ended (only a new SYN opens the tuple again).
    AfterReset,
}

/// What to do with a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamOutcome<'a> {
    /// Not TCP: not the tracker's business.
    NotTcp,
    /// Forward the frame after inspecting `window`: up to `context_bytes` of the direction's
    /// previously accepted bytes, then the segment's new bytes from `new_from` on (empty for a
    /// control segment or a pure retransmission). Report only matches ending at or after
    /// `new_from`. Then forward what [`StreamTracker::take_released`] returns.
    Accept {
        flow: FlowId,
        dir: StreamDir,
        window: &'a [u8],
        new_from: usize,
    },
    /// Out of order: the tracker keeps a copy; do not forward the frame now. It (or an identical
    /// copy) comes back from [`StreamTracker::take_released`] once the gap is filled.
    Held,
    /// Do not forward.
    Drop(StreamDrop),
    /// A limit was hit under [`LimitPolicy::FailOpen`]: forward after per-packet inspection.
    Untracked,
}

/// A held frame that is now in order: inspect `window` as for [`StreamOutcome::Accept`], then
/// forward `frame`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Its flow.
    pub flow: FlowId,
    /// Its direction.
    pub dir: StreamDir,
    /// The frame as it arrived.
    pub frame: Vec<u8>,
    /// Context followed by the frame's new bytes (just its payload, `new_from` 0, when the flow
    /// went untracked under [`LimitPolicy::FailOpen`]).
    pub window: Vec<u8>,
    /// Where the new bytes start in `window`.
    pub new_from: usize,
    /// The caller's tag of the held frame ([`StreamTracker::segment_tagged`]).
    pub tag: u8,
}

impl Released {
    fn charge(&self) -> usize {
        self.frame.len() + self.window.len()
    }
}

/// Drops by reason: one counter per [`StreamDrop`] variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub overlap_mismatch: u64,
    pub out_of_window: u64,
    pub rst_out_of_window: u64,
    pub rst_not_exact: u64,
    pub syn_on_established: u64,
    pub blocked: u64,
    pub flow_limit: u64,
    pub memory_limit: u64,
    pub malformed: u64,
    pub out_of_order: u64,
    pub after_reset: u64,
}

impl StreamDrop {
    /// Every reason.
    pub const ALL: [StreamDrop; 11] = [
        StreamDrop::OverlapMismatch,
        StreamDrop::OutOfWindow,
        StreamDrop::RstOutOfWindow,
        StreamDrop::RstNotExact,
        StreamDrop::SynOnEstablished,
        StreamDrop::Blocked,
        StreamDrop::FlowLimit,
        StreamDrop::MemoryLimit,
        StreamDrop::Malformed,
        StreamDrop::OutOfOrder,
        StreamDrop::AfterReset,
    ];
}

impl DropCounts {
    /// The drops counted after `earlier` (a reading of the same counters).
    pub fn since(&self, earlier: &DropCounts) -> DropCounts {
        let mut d = DropCounts::default();
        for why in StreamDrop::ALL {
            *d.field_mut(why) = self.get(why).saturating_sub(earlier.get(why));
        }
        d
    }

    /// The counter of `why`.
    pub fn get(mut self, why: StreamDrop) -> u64 {
        *self.field_mut(why)
    }

    fn bump(&mut self, why: StreamDrop) {
        *self.field_mut(why) += 1;
    }

    fn field_mut(&mut self, why: StreamDrop) -> &mut u64 {
        match why {
            StreamDrop::OverlapMismatch => &mut self.overlap_mismatch,
            StreamDrop::OutOfWindow => &mut self.out_of_window,
            StreamDrop::RstOutOfWindow => &mut self.rst_out_of_window,
            StreamDrop::RstNotExact => &mut self.rst_not_exact,
            StreamDrop::SynOnEstablished => &mut self.syn_on_established,
            StreamDrop::Blocked => &mut self.blocked,
            StreamDrop::FlowLimit => &mut self.flow_limit,
            StreamDrop::MemoryLimit => &mut self.memory_limit,
            StreamDrop::Malformed => &mut self.malformed,
            StreamDrop::OutOfOrder => &mut self.out_of_order,
            StreamDrop::AfterReset => &mut self.after_reset,
        }
    }
}

/// Stream-tracker counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Flows created (`created = closed + expired + evicted + active`).
    pub created: u64,
    /// Flows removed by both FINs acknowledged (or by an RST on an untracked flow).
    pub closed: u64,
    /// Connections an accepted RST ended (their flows stay, reset, in `active`).
    pub reset: u64,
    /// Flows removed after their idle timeout.
    pub expired: u64,
    /// Flows without stream state evicted for a new flow (or restarted by a SYN).
    pub evicted: u64,
    /// Flows currently tracked.
    pub active: u64,
    /// Flows picked up without their handshake.
    pub midstream: u64,
    /// New stream bytes accepted (in order or released).
    pub accepted_bytes: u64,
    /// Out-of-order segments held now.
    pub held_segments: u64,
    /// Most segments held at once.
    pub held_peak: u64,
    /// Held segments released in order.
    pub released: u64,
    /// Held segments freed without release (flow closed, blocked, expired, untracked).
    pub discarded: u64,
    /// Retransmitted, unacknowledged bytes older than the retained bytes (passed unchecked).
    pub unverified_bytes: u64,
    /// In-window RSTs that were not exact (RFC 5961 challenge-ACK cases).
    pub rst_challenge: u64,
    /// Limits hit under [`LimitPolicy::FailOpen`].
    pub fail_open: u64,
    /// Segments passed as [`StreamOutcome::Untracked`].
    pub untracked: u64,
    /// Dropped segments by reason.
    pub drops: DropCounts,
}

/// An out-of-order frame.
#[derive(Debug)]
struct Held {
    /// Sequence number of its first data byte.
    seq: u32,
    /// The caller's tag ([`StreamTracker::segment_tagged`]).
    tag: u8,
    fin: bool,
    frame: Vec<u8>,
    /// The payload within `frame`.
    at: usize,
    len: usize,
}

impl Held {
    fn data(&self) -> &[u8] {
        self.frame.get(self.at..self.at + self.len).unwrap_or(&[])
    }

    fn end(&self) -> u32 {
        self.seq.wrapping_add(self.len as u32)
    }
}

/// One direction of a flow: what its sender sent and what it advertised for the peer.
#[derive(Debug, Default)]
struct Half {
    /// Sequence number of this side's SYN.
    isn: Option<u32>,
    /// Window-scale shift of this side's SYN.
    wscale: Option<u8>,
    /// Next sequence number expected from this side (the receiver's RCV.NXT).
    next: Option<u32>,
    /// Highest acknowledgement this side sent (for the peer's bytes).
    ack: Option<u32>,
    /// Right edge of the window this side advertised: the peer's data must start below it.
    right: Option<u32>,
    /// Sequence number of this side's FIN.
    fin: Option<u32>,
    /// Accepted bytes, ending at `next` (before the FIN).
    kept: VecDeque<u8>,
    /// Out-of-order frames, in sequence order.
    held: VecDeque<Held>,
    /// Frame bytes in `held`.
    held_bytes: usize,
    /// Some data was accepted.
    data: bool,
}

impl Half {
    /// Whether `data` at `seq` differs from held bytes where they overlap.
    fn conflicts_with_held(&self, seq: u32, data: &[u8]) -> bool {
        self.held.iter().any(|h| {
            let rel = sdiff(h.seq, seq);
            let (lo, hi) = (rel.max(0), (rel + h.len as i64).min(data.len() as i64));
            lo < hi
                && data.get(lo as usize..hi as usize)
                    != h.data().get((lo - rel) as usize..(hi - rel) as usize)
        })
    }

    /// Sequence number after the last accepted data byte (`next`, less an accepted FIN).
    fn data_end(&self) -> Option<u32> {
        let n = self.next?;
        let fin_done = self.fin.is_some_and(|f| f.wrapping_add(1) == n);
        Some(n.wrapping_sub(u32::from(fin_done)))
    }
}

#[derive(Debug)]
struct Flow {
    serial: u64,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    /// [`Packet::vlans`] of its frames.
    vlans: u32,
    /// Index 0: client → server.
    half: [Half; 2],
    last_seen: u64,
    blocked: bool,
    untracked: bool,
    handshake_done: bool,
    /// An accepted RST ended the connection: no stream state, data and FIN refused.
    reset: bool,
}

impl Flow {
    fn new(
        serial: u64,
        client: (IpAddr, u16),
        server: (IpAddr, u16),
        vlans: u32,
        now: u64,
    ) -> Flow {
        Flow {
            serial,
            client,
            server,
            vlans,
            half: Default::default(),
            last_seen: now,
            blocked: false,
            untracked: false,
            handshake_done: false,
            reset: false,
        }
    }

    /// No stream state would be lost by evicting it.
    fn stateless(&self) -> bool {
        !self.blocked && !self.untracked && self.half.iter().all(|h| !h.data && h.held.is_empty())
    }

    fn timeout(&self, cfg: &StreamConfig) -> u64 {
        // The receiver of an RST that went astray keeps its connection as long as an idle
        // established one.
        if self.reset {
            return cfg.established_timeout_us;
        }
        let closing = self.half.iter().all(|h| h.fin.is_some());
        if !closing && (self.handshake_done || self.half.iter().any(|h| h.data)) {
            cfg.established_timeout_us
        } else {
            cfg.handshake_timeout_us
        }
    }

    /// Window shift of non-SYN segments from `d`.
    fn shift(&self, d: usize) -> u8 {
        let [a, b] = &self.half;
        if a.isn.is_some() && b.isn.is_some() {
            match (a.wscale, b.wscale) {
                (Some(_), Some(_)) => self.half[d].wscale.unwrap_or(0).min(MAX_WSCALE),
                _ => 0,
            }
        } else if self
            .half
            .iter()
            .any(|h| h.isn.is_some() && h.wscale.is_none())
        {
            0
        } else {
            MAX_WSCALE
        }
    }

    /// Receive window for data from `d`, relative to `d`'s next sequence number.
    fn window(&self, d: usize, next: u32) -> i64 {
        self.half[1 - d]
            .right
            .map_or(MAX_WINDOW, |r| sdiff(r, next).max(0))
    }
}

/// Signed distance `a - b` in sequence space (RFC 9293 §3.4): valid within ±2^31.
fn sdiff(a: u32, b: u32) -> i64 {
    i64::from(a.wrapping_sub(b) as i32)
}

/// The later of two sequence numbers.
fn seq_max(a: Option<u32>, b: u32) -> u32 {
    a.map_or(b, |a| if sdiff(b, a) > 0 { b } else { a })
}

/// The TCP fields of one segment.
#[derive(Clone, Copy)]
struct Seg {
    syn: bool,
    ack: Option<u32>,
    rst: bool,
    fin: bool,
    seq: u32,
    window: u16,
    wscale: Option<u8>,
    /// Payload offset in the frame.
    at: usize,
    len: usize,
}

/// What processing a segment did.
enum Step {
    Accept(usize),
    Held,
    Closed,
    Untracked,
}

/// The stream tracker.
#[derive(Debug)]
pub struct StreamTracker {
    cfg: StreamConfig,
    slots: Vec<Option<Flow>>,
    mask: usize,
    serial: u64,
    stats: StreamStats,
    /// Bytes counted against `max_total_bytes`.
    used: usize,
    released: VecDeque<Released>,
    /// The window of the last [`StreamOutcome::Accept`].
    scratch: Vec<u8>,
    /// The tag of the segment being processed.
    tag: u8,
}

impl StreamTracker {
    /// An empty tracker.
    pub fn new(cfg: StreamConfig) -> StreamTracker {
        let cap = cfg.max_flows.max(PROBE).next_power_of_two();
        StreamTracker {
            cfg,
            slots: (0..cap).map(|_| None).collect(),
            mask: cap - 1,
            serial: 0,
            stats: StreamStats::default(),
            used: 0,
            released: VecDeque::new(),
            scratch: Vec::new(),
            tag: 0,
        }
    }

    /// Counters.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Bytes counted against `max_total_bytes`: held and released-but-untaken frames (with
    /// their windows) and retained bytes beyond `context_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.used
    }

    /// Next held frame that became in order (call until `None` after every
    /// [`segment`](Self::segment)). Frames of a flow blocked meanwhile are dropped.
    pub fn take_released(&mut self) -> Option<Released> {
        while let Some(r) = self.released.pop_front() {
            self.used -= r.charge();
            if self.flow(r.flow).is_some_and(|f| f.blocked) {
                self.stats.drops.bump(StreamDrop::Blocked);
                continue;
            }
            return Some(r);
        }
        None
    }

    /// The behaviour at a limit.
    pub fn on_limit(&self) -> LimitPolicy {
        self.cfg.on_limit
    }

    /// Blocks `flow`: its later segments are [`StreamDrop::Blocked`] until it closes or expires.
    /// Its held frames are discarded.
    pub fn block(&mut self, flow: FlowId) {
        if self.flow(flow).is_none() {
            return;
        }
        let slot = flow.slot as usize;
        self.free_state(slot);
        if let Some(f) = self.slots[slot].as_mut() {
            f.blocked = true;
        }
    }

    /// Removes the flows idle past their timeout.
    pub fn expire(&mut self, now: Timestamp) {
        for i in 0..self.slots.len() {
            if self.slots[i]
                .as_ref()
                .is_some_and(|f| self.is_expired(f, now.0))
            {
                self.remove(i);
                self.stats.expired += 1;
            }
        }
    }

    /// Whether the flow in `slot` with serial number `serial` is still tracked.
    pub fn is_live(&self, slot: usize, serial: u64) -> bool {
        self.slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|f| f.serial == serial)
    }

    fn flow(&self, id: FlowId) -> Option<&Flow> {
        self.slots
            .get(id.slot as usize)?
            .as_ref()
            .filter(|f| f.serial == id.serial)
    }

    fn is_expired(&self, f: &Flow, now: u64) -> bool {
        now.saturating_sub(f.last_seen) > f.timeout(&self.cfg)
    }

    /// Frees a flow's held frames and retained bytes (counting the frames as discarded).
    fn free_state(&mut self, slot: usize) {
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        for h in &mut f.half {
            self.stats.discarded += h.held.len() as u64;
            self.stats.held_segments -= h.held.len() as u64;
            self.used -= h.held_bytes + h.kept.len().saturating_sub(self.cfg.context_bytes);
            *h = Half {
                next: h.next,
                isn: h.isn,
                fin: h.fin,
                ..Half::default()
            };
        }
    }

    /// An accepted RST: the flow's stream state is freed and the flow stays, reset.
    fn end_by_reset(&mut self, slot: usize) {
        self.free_state(slot);
        if let Some(f) = self.slots[slot].as_mut() {
            f.half = Default::default();
            f.blocked = false;
            f.reset = true;
            self.stats.reset += 1;
        }
    }

    fn remove(&mut self, slot: usize) {
        self.free_state(slot);
        if self.slots[slot].take().is_some() {
            self.stats.active -= 1;
        }
    }

    fn reject(&mut self, why: StreamDrop) -> StreamOutcome<'_> {
        self.stats.drops.bump(why);
        StreamOutcome::Drop(why)
    }

    /// Places one TCP segment in its stream. `frame` is the Ethernet frame `pkt` was decoded
    /// from (held frames are copied from it). Never panics.
    pub fn segment(&mut self, pkt: &Packet<'_>, frame: &[u8], now: Timestamp) -> StreamOutcome<'_> {
        self.segment_tagged(pkt, frame, now, 0)
    }

    /// [`segment`](Self::segment) with a tag that a frame held now carries when it is
    /// released ([`Released::tag`]): the engine's direction through the NIC.
    pub fn segment_tagged(
        &mut self,
        pkt: &Packet<'_>,
        frame: &[u8],
        now: Timestamp,
        tag: u8,
    ) -> StreamOutcome<'_> {
        self.tag = tag;
        let now = now.0;
        let L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
            window,
            wscale,
        } = pkt.l4
        else {
            return if pkt.proto == ipproto::TCP {
                self.reject(StreamDrop::Malformed)
            } else {
                StreamOutcome::NotTcp
            };
        };
        let has = |f: u8| flags & f != 0;
        let len = pkt.payload.len();
        // The payload must lie within `frame`, so held copies can be cut from it.
        let at = if len == 0 {
            Some(0)
        } else {
            (pkt.payload.as_ptr() as usize)
                .checked_sub(frame.as_ptr() as usize)
                .filter(|at| at.checked_add(len).is_some_and(|e| e <= frame.len()))
        };
        let (syn, rst, fin) = (has(tcpflags::SYN), has(tcpflags::RST), has(tcpflags::FIN));
        let malformed = (syn && (rst || fin))
            || (!has(tcpflags::ACK) && !syn && !rst)
            || pkt.ip.frag_bits & 1 != 0
            || len as i64 >= MAX_WINDOW;
        let Some(at) = at.filter(|_| !malformed) else {
            return self.reject(StreamDrop::Malformed);
        };
        let s = Seg {
            syn,
            ack: has(tcpflags::ACK).then_some(ack),
            rst,
            fin,
            seq,
            window,
            wscale,
            at,
            len,
        };
        let me = (pkt.src, sport);
        let peer = (pkt.dst, dport);
        let vlans = pkt.vlans;
        let start = keyed_hash(self.cfg.key, &flow_key(ipproto::TCP, me, peer, vlans));
        let slot = match self.find(start, me, peer, vlans, now) {
            Some(i) => i,
            None if rst => return self.reject(StreamDrop::RstOutOfWindow),
            None => match self.create(start, me, peer, vlans, &s, now) {
                Ok(i) => i,
                Err(why) => return self.limit(why),
            },
        };
        self.restart(slot, me, &s);
        let Some(f) = self.slots[slot].as_ref() else {
            return self.reject(StreamDrop::Malformed);
        };
        let flow = FlowId {
            slot: slot as u32,
            serial: f.serial,
        };
        let d = usize::from(f.client != me);
        let dir = StreamDir::from_index(d);
        match self.process(slot, d, &s, frame, now) {
            Ok(Step::Accept(new_from)) => {
                self.close_if_done(slot);
                StreamOutcome::Accept {
                    flow,
                    dir,
                    window: &self.scratch,
                    new_from,
                }
            }
            Ok(Step::Closed) => {
                self.scratch.clear();
                StreamOutcome::Accept {
                    flow,
                    dir,
                    window: &self.scratch,
                    new_from: 0,
                }
            }
            Ok(Step::Held) => StreamOutcome::Held,
            Ok(Step::Untracked) => {
                self.stats.untracked += 1;
                StreamOutcome::Untracked
            }
            Err(why) => self.reject(why),
        }
    }

    /// A limit was hit: drop, or pass untracked.
    fn limit(&mut self, why: StreamDrop) -> StreamOutcome<'_> {
        match self.cfg.on_limit {
            LimitPolicy::FailClosed => self.reject(why),
            LimitPolicy::FailOpen => {
                self.stats.fail_open += 1;
                self.stats.untracked += 1;
                StreamOutcome::Untracked
            }
        }
    }

    /// The flow of `a`–`b`, removing it if it is past its timeout.
    /// The slots a flow whose key hashes to `hash` may occupy: 2 x [`PROBE`] of them, by
    /// double hashing (a start and an odd step from the hash's two halves), so that occupied
    /// slots do not cluster as in windows of consecutive slots.
    fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> {
        let (start, step) = (hash as usize, ((hash >> 32) as usize) | 1);
        let mask = self.mask;
        (0..2 * PROBE).map(move |k| start.wrapping_add(k.wrapping_mul(step)) & mask)
    }

    fn find(
        &mut self,
        start: u64,
        a: (IpAddr, u16),
        b: (IpAddr, u16),
        vlans: u32,
        now: u64,
    ) -> Option<usize> {
        let i = self.candidates(start).find(|&i| {
            self.slots[i].as_ref().is_some_and(|f| {
                f.vlans == vlans
                    && ((f.client == a && f.server == b) || (f.client == b && f.server == a))
            })
        })?;
        if self.slots[i]
            .as_ref()
            .is_some_and(|f| self.is_expired(f, now))
        {
            self.remove(i);
            self.stats.expired += 1;
            return None;
        }
        Some(i)
    }

    /// A new flow for a segment from `me` to `peer` (no flow exists).
    fn create(
        &mut self,
        start: u64,
        me: (IpAddr, u16),
        peer: (IpAddr, u16),
        vlans: u32,
        s: &Seg,
        now: u64,
    ) -> Result<usize, StreamDrop> {
        let mut free = None;
        let mut victim: Option<(usize, u64)> = None;
        let candidates: [usize; 2 * PROBE] = {
            let mut c = [0; 2 * PROBE];
            for (slot, i) in c.iter_mut().zip(self.candidates(start)) {
                *slot = i;
            }
            c
        };
        for i in candidates {
            match &self.slots[i] {
                None => {
                    free.get_or_insert(i);
                }
                Some(f) if self.is_expired(f, now) => {
                    self.remove(i);
                    self.stats.expired += 1;
                    free.get_or_insert(i);
                }
                Some(f) if f.stateless() && victim.is_none_or(|(_, t)| f.last_seen < t) => {
                    victim = Some((i, f.last_seen));
                }
                Some(_) => {}
            }
        }
        let i = match (free, victim) {
            (Some(i), _) if (self.stats.active as usize) < self.cfg.max_flows => i,
            (_, Some((v, _))) => {
                self.remove(v);
                self.stats.evicted += 1;
                v
            }
            _ => return Err(StreamDrop::FlowLimit),
        };
        // A SYN+ACK's sender is the server; otherwise the sender is (taken as) the client.
        let (client, server) = if s.syn && s.ack.is_some() {
            (peer, me)
        } else {
            (me, peer)
        };
        if !(s.syn && s.ack.is_none()) {
            self.stats.midstream += 1;
        }
        self.serial += 1;
        self.slots[i] = Some(Flow::new(self.serial, client, server, vlans, now));
        self.stats.created += 1;
        self.stats.active += 1;
        Ok(i)
    }

    /// A SYN (without ACK) on a reset flow, or on a midstream pickup that never carried data,
    /// is a new connection on the tuple: the flow starts over with the SYN's sender as the
    /// client.
    fn restart(&mut self, slot: usize, me: (IpAddr, u16), s: &Seg) {
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        let picked_up = f.half.iter().any(|h| h.next.is_some());
        let fresh_pickup = picked_up && f.stateless() && f.half.iter().all(|h| h.isn.is_none());
        if !s.syn || s.ack.is_some() || !(f.reset || fresh_pickup) {
            return;
        }
        let other = if f.client == me { f.server } else { f.client };
        self.serial += 1;
        *f = Flow::new(self.serial, me, other, f.vlans, f.last_seen);
        self.stats.evicted += 1;
        self.stats.created += 1;
    }

    /// Processes a segment from side `d` of the flow in `slot`; on error nothing changed.
    fn process(
        &mut self,
        slot: usize,
        d: usize,
        s: &Seg,
        frame: &[u8],
        now: u64,
    ) -> Result<Step, StreamDrop> {
        let Some(f) = self.slots[slot].as_mut() else {
            return Err(StreamDrop::Malformed);
        };
        f.last_seen = now;
        if f.untracked {
            if s.rst {
                self.remove(slot);
                self.stats.closed += 1;
            }
            return Ok(Step::Untracked);
        }
        if f.reset {
            // The connection is over: nothing of it may reach the receiver unseen. A new SYN
            // was handled by `restart`; a bare ACK or RST carries nothing to inspect.
            if s.len > 0 || s.fin || s.syn {
                return Err(StreamDrop::AfterReset);
            }
            return Ok(Step::Closed);
        }
        let (h, p) = (&f.half[d], &f.half[1 - d]);
        if s.rst {
            // RFC 5961 §3.2; before this side's SYN, RFC 9293 §3.10.7.3 (an RST acknowledging
            // the peer's SYN).
            let exact = match h.next {
                Some(n) => s.seq == n,
                None => s.ack.is_some() && s.ack == p.next,
            };
            if exact {
                self.end_by_reset(slot);
                return Ok(Step::Closed);
            }
            if f.blocked {
                return Err(StreamDrop::Blocked);
            }
            let in_window = h
                .next
                .is_some_and(|n| (0..f.window(d, n)).contains(&sdiff(s.seq, n)));
            if in_window {
                self.stats.rst_challenge += 1;
                return Err(StreamDrop::RstNotExact);
            }
            return Err(StreamDrop::RstOutOfWindow);
        }
        if f.blocked {
            return Err(StreamDrop::Blocked);
        }
        if s.syn {
            // Only a retransmission of this side's SYN, or its first SYN before it sent data.
            if h.isn.map_or(h.next.is_some(), |isn| s.seq != isn) {
                return Err(StreamDrop::SynOnEstablished);
            }
            if let (Some(a), Some(pisn), Some(pn)) = (s.ack, p.isn, p.next) {
                // A SYN+ACK acknowledges the peer's SYN (and possibly some of its SYN data).
                if sdiff(a, pisn) < 1 || sdiff(a, pn) > 0 {
                    return Err(StreamDrop::OutOfWindow);
                }
            }
        }
        let data_seq = s.seq.wrapping_add(u32::from(s.syn));
        // The sender's next data byte: as tracked, else (a first segment) from the SYN, from what
        // the peer acknowledged, or (midstream) from this segment.
        let next = h.data_end();
        let next = next.or(if s.syn { None } else { p.ack });
        let step = self.place(slot, d, next.unwrap_or(data_seq), data_seq, s, frame)?;
        let Some(f) = self.slots[slot].as_mut() else {
            return Ok(step);
        };
        if s.syn && f.half[d].isn.is_none() {
            f.half[d].isn = Some(s.seq);
            f.half[d].wscale = s.wscale;
        }
        if let Some(a) = s.ack {
            self.on_ack(slot, d, a, s);
        }
        Ok(step)
    }

    /// Applies an acknowledgement and window from side `d` (its segment was accepted or held).
    fn on_ack(&mut self, slot: usize, d: usize, ack: u32, s: &Seg) {
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        // An acknowledgement of bytes never passed to this side is ignored (RFC 9293
        // §3.10.7.4): it must not widen the window or release retained bytes.
        if f.half[1 - d].next.is_some_and(|n| sdiff(ack, n) > 0) {
            return;
        }
        if !s.syn && f.half.iter().all(|h| h.isn.is_some()) {
            f.handshake_done = true;
        }
        let shift = if s.syn { 0 } else { f.shift(d) };
        let right = ack.wrapping_add(u32::from(s.window) << shift);
        let h = &mut f.half[d];
        h.ack = Some(seq_max(h.ack, ack));
        h.right = Some(seq_max(h.right, right));
        self.retain(slot, 1 - d, &[]);
    }

    /// Places the data of `s` (starting at `seq`) in direction `d`, whose next expected
    /// sequence number is `next`.
    fn place(
        &mut self,
        slot: usize,
        d: usize,
        next: u32,
        seq: u32,
        s: &Seg,
        frame: &[u8],
    ) -> Result<Step, StreamDrop> {
        let Some(f) = self.slots[slot].as_mut() else {
            return Err(StreamDrop::Malformed);
        };
        let data = frame.get(s.at..s.at + s.len).unwrap_or(&[]);
        let h = &f.half[d];
        let end = seq.wrapping_add(s.len as u32);
        let off = sdiff(seq, next);
        let window = f.window(d, next);
        if s.len == 0 && !s.fin {
            // A control segment (pure ACK, SYN): no stream bytes. It may sit one past the data
            // (after a FIN); one far from the window is refused.
            if off < -MAX_WINDOW || off > window + 1 {
                return Err(StreamDrop::OutOfWindow);
            }
            return Ok(Step::Accept(self.accept(slot, d, next, &[], None)));
        }
        if let Some(fin) = h.fin {
            if sdiff(end, fin) > 0 {
                return Err(StreamDrop::OutOfWindow);
            }
            if s.fin && end != fin {
                return Err(StreamDrop::OverlapMismatch);
            }
        }
        let fin_conflict = (h.fin.is_none() && sdiff(end, next) < 0)
            || h.held.iter().any(|x| sdiff(x.end(), end) > 0);
        if s.fin && fin_conflict {
            return Err(StreamDrop::OverlapMismatch);
        }
        if off < -MAX_WINDOW {
            return Err(StreamDrop::OutOfWindow);
        }
        if off > 0 {
            if off >= window {
                return Err(StreamDrop::OutOfWindow);
            }
            if h.conflicts_with_held(seq, data) {
                return Err(StreamDrop::OverlapMismatch);
            }
            if !self.cfg.hold_out_of_order {
                return Err(StreamDrop::OutOfOrder);
            }
            return self.hold(slot, d, next, seq, s, frame);
        }
        // Bytes before `next` are a retransmission: compare what is retained.
        let old = ((-off) as usize).min(data.len());
        let kept = h.kept.len() as i64;
        // Bytes `verified_from..old` are among the retained ones (which end at `next`).
        let verified_from = (-kept - off).clamp(0, old as i64) as usize;
        let k0 = (kept + off + verified_from as i64).max(0) as usize;
        let peer_ack = f.half[1 - d].ack;
        let acked = |upto: u32| peer_ack.is_some_and(|a| sdiff(a, upto) >= 0);
        // A keep-alive may carry one garbage byte just before `next` (RFC 9293 §3.8.4).
        let keepalive = s.len == 1 && off == -1 && acked(next);
        let same = verified_from == old
            || h.kept
                .range(k0..k0 + old - verified_from)
                .eq(&data[verified_from..old]);
        if !same && !keepalive {
            return Err(StreamDrop::OverlapMismatch);
        }
        let acked = acked(seq.wrapping_add(verified_from as u32));
        let new = &data[old..];
        if !new.is_empty() && (window == 0 || h.conflicts_with_held(next, new)) {
            return Err(if window == 0 {
                StreamDrop::OutOfWindow
            } else {
                StreamDrop::OverlapMismatch
            });
        }
        if !acked {
            self.stats.unverified_bytes += verified_from as u64;
        }
        let new_from = self.accept(slot, d, next, new, s.fin.then_some(end));
        self.release(slot, d);
        Ok(Step::Accept(new_from))
    }

    /// Appends in-order `new` bytes to direction `d`: fills the scratch window and returns
    /// where the new bytes start in it.
    fn accept(&mut self, slot: usize, d: usize, next: u32, new: &[u8], fin: Option<u32>) -> usize {
        let ctx = self.cfg.context_bytes;
        let Some(f) = self.slots[slot].as_mut() else {
            return 0;
        };
        let h = &mut f.half[d];
        self.scratch.clear();
        let keep_from = h.kept.len().saturating_sub(ctx);
        self.scratch.extend(h.kept.range(keep_from..));
        let new_from = self.scratch.len();
        self.scratch.extend_from_slice(new);
        let mut n = next.wrapping_add(new.len() as u32);
        if fin.is_some() {
            h.fin = fin;
        }
        if h.fin == Some(n) {
            n = n.wrapping_add(1);
        }
        h.next = Some(n);
        h.data |= !new.is_empty();
        self.stats.accepted_bytes += new.len() as u64;
        self.retain(slot, d, new);
        new_from
    }

    /// Appends `new` to the retained bytes of direction `d` and trims them: keep the context,
    /// and unacknowledged bytes up to `retain_bytes` as the memory budget allows.
    fn retain(&mut self, slot: usize, d: usize, new: &[u8]) {
        let (ctx, retain, total) = (
            self.cfg.context_bytes,
            self.cfg.retain_bytes,
            self.cfg.max_total_bytes,
        );
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        let peer_ack = f.half[1 - d].ack;
        let h = &mut f.half[d];
        let before = h.kept.len().saturating_sub(ctx);
        h.kept.extend(new);
        let len = h.kept.len();
        // Bytes not yet acknowledged: those after the peer's ACK.
        let unacked = match (peer_ack, h.data_end()) {
            (Some(a), Some(e)) => sdiff(e, a).clamp(0, len as i64) as usize,
            _ => len,
        };
        let others = self.used - before;
        let budget = ctx.saturating_add(total.saturating_sub(others));
        let want = unacked.min(retain).max(ctx).min(budget);
        if len > want {
            h.kept.drain(..len - want);
        }
        if h.kept.capacity() > h.kept.len().max(ctx).saturating_mul(2).saturating_add(64) {
            h.kept.shrink_to(h.kept.len().max(ctx));
        }
        self.used = others + h.kept.len().saturating_sub(ctx);
    }

    /// Holds an out-of-order segment of direction `d`.
    fn hold(
        &mut self,
        slot: usize,
        d: usize,
        next: u32,
        seq: u32,
        s: &Seg,
        frame: &[u8],
    ) -> Result<Step, StreamDrop> {
        let (per_flow, total) = (self.cfg.max_bytes_per_flow, self.cfg.max_total_bytes);
        let Some(f) = self.slots[slot].as_mut() else {
            return Err(StreamDrop::Malformed);
        };
        let h = &mut f.half[d];
        h.next.get_or_insert(next);
        let end = seq.wrapping_add(s.len as u32);
        // An identical copy is already held (conflicts were ruled out): nothing to add.
        let covered = |x: &Held| sdiff(seq, x.seq) >= 0 && sdiff(x.end(), end) >= 0;
        if h.held.iter().any(|x| covered(x) && (x.fin || !s.fin)) {
            return Ok(Step::Held);
        }
        if h.held_bytes + frame.len() > per_flow || self.used + frame.len() > total {
            return match self.cfg.on_limit {
                LimitPolicy::FailClosed => Err(StreamDrop::MemoryLimit),
                LimitPolicy::FailOpen => {
                    self.stats.fail_open += 1;
                    self.untrack(slot);
                    Ok(Step::Untracked)
                }
            };
        }
        let at = h
            .held
            .partition_point(|x| sdiff(x.seq, next) <= sdiff(seq, next));
        h.held.insert(
            at,
            Held {
                seq,
                tag: self.tag,
                fin: s.fin,
                frame: frame.to_vec(),
                at: s.at,
                len: s.len,
            },
        );
        if s.fin {
            h.fin = Some(end);
        }
        h.held_bytes += frame.len();
        self.used += frame.len();
        self.stats.held_segments += 1;
        self.stats.held_peak = self.stats.held_peak.max(self.stats.held_segments);
        Ok(Step::Held)
    }

    /// Moves the held segments of direction `d` that are now in order to the release queue.
    /// The scratch window (the current segment's) is kept.
    fn release(&mut self, slot: usize, d: usize) {
        let current = core::mem::take(&mut self.scratch);
        self.release_in_order(slot, d);
        self.scratch = current;
    }

    fn release_in_order(&mut self, slot: usize, d: usize) {
        loop {
            let Some(f) = self.slots[slot].as_mut() else {
                return;
            };
            let serial = f.serial;
            let h = &mut f.half[d];
            let Some(next) = h.data_end() else { return };
            if h.held.front().is_none_or(|x| sdiff(x.seq, next) > 0) {
                return;
            }
            let Some(x) = h.held.pop_front() else { return };
            h.held_bytes -= x.frame.len();
            self.used -= x.frame.len();
            self.stats.held_segments -= 1;
            self.stats.released += 1;
            let skip = (sdiff(next, x.seq) as usize).min(x.len);
            let new = x.data().get(skip..).unwrap_or(&[]);
            let new_from = self.accept(slot, d, next, new, x.fin.then_some(x.end()));
            let r = Released {
                flow: FlowId {
                    slot: slot as u32,
                    serial,
                },
                dir: StreamDir::from_index(d),
                frame: x.frame,
                window: core::mem::take(&mut self.scratch),
                new_from,
                tag: x.tag,
            };
            self.used += r.charge();
            self.released.push_back(r);
        }
    }

    /// Stops tracking the flow in `slot` ([`LimitPolicy::FailOpen`]): its held frames are
    /// released for per-packet inspection.
    fn untrack(&mut self, slot: usize) {
        let Some(f) = self.slots[slot].as_mut() else {
            return;
        };
        f.untracked = true;
        let serial = f.serial;
        for (d, h) in f.half.iter_mut().enumerate() {
            for x in h.held.drain(..) {
                self.stats.held_segments -= 1;
                self.stats.released += 1;
                self.used -= x.frame.len();
                let r = Released {
                    flow: FlowId {
                        slot: slot as u32,
                        serial,
                    },
                    dir: StreamDir::from_index(d),
                    window: x.data().to_vec(),
                    frame: x.frame,
                    new_from: 0,
                    tag: x.tag,
                };
                self.used += r.charge();
                self.released.push_back(r);
            }
            h.held_bytes = 0;
        }
    }

    /// Removes the flow in `slot` once both FINs are accepted and acknowledged.
    fn close_if_done(&mut self, slot: usize) {
        let Some(f) = self.slots[slot].as_ref() else {
            return;
        };
        let done = (0..2).all(|d| {
            let (h, p) = (&f.half[d], &f.half[1 - d]);
            match (h.fin, h.next, p.ack) {
                (Some(fin), Some(n), Some(a)) => {
                    let after = fin.wrapping_add(1);
                    n == after && sdiff(a, after) >= 0
                }
                _ => false,
            }
        });
        if done {
            self.remove(slot);
            self.stats.closed += 1;
        }
    }
}

#[cfg(test)]
impl StreamTracker {
    /// Recomputes the accounting from the flows and checks it.
    fn check_invariants(&self) {
        let ctx = self.cfg.context_bytes;
        let (mut used, mut held, mut active) = (0, 0, 0);
        for f in self.slots.iter().flatten() {
            active += 1;
            for h in &f.half {
                assert_eq!(h.held_bytes, h.held.iter().map(|x| x.frame.len()).sum());
                assert!(h.held_bytes <= self.cfg.max_bytes_per_flow);
                assert!(h.kept.len() <= ctx.max(self.cfg.retain_bytes));
                let n = h.next.unwrap_or(0);
                assert!(h
                    .held
                    .iter()
                    .zip(h.held.iter().skip(1))
                    .all(|(a, b)| sdiff(a.seq, n) <= sdiff(b.seq, n)));
                used += h.held_bytes + h.kept.len().saturating_sub(ctx);
                held += h.held.len() as u64;
            }
        }
        used += self.released.iter().map(Released::charge).sum::<usize>();
        assert_eq!(used, self.used);
        assert_eq!(held, self.stats.held_segments);
        assert_eq!(active, self.stats.active);
        let st = self.stats;
        assert_eq!(st.created, st.closed + st.expired + st.evicted + st.active);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packet::tcpflags::{ACK, FIN, RST, SYN};
    use crate::engine::packet::{build, decode, Decoded};
    use alloc::vec;
    use alloc::vec::Vec;

    const PSH: u8 = 0x08;
    const C: (&str, u16) = ("10.0.0.1", 40000);
    const S: (&str, u16) = ("10.0.0.2", 80);
    const CISN: u32 = 1000;
    const SISN: u32 = 5000;

    /// A TCP segment from `src` to `dst`.
    #[allow(clippy::too_many_arguments)]
    fn seg_full(
        src: (&str, u16),
        dst: (&str, u16),
        flags: u8,
        seq: u32,
        ack: u32,
        win: u16,
        wscale: Option<u8>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut h = build::tcp(src.1, dst.1, flags);
        h[4..8].copy_from_slice(&seq.to_be_bytes());
        h[8..12].copy_from_slice(&ack.to_be_bytes());
        h[14..16].copy_from_slice(&win.to_be_bytes());
        if let Some(w) = wscale {
            h[12] = 0x60;
            h.extend_from_slice(&[1, 3, 3, w]);
        }
        build::frame(
            src.0.parse().unwrap(),
            dst.0.parse().unwrap(),
            6,
            &h,
            payload,
        )
    }

    fn seg(
        src: (&str, u16),
        dst: (&str, u16),
        flags: u8,
        seq: u32,
        ack: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        seg_full(src, dst, flags, seq, ack, 65535, None, payload)
    }

    /// Client data at stream offset `off` (0 = first byte after the SYN).
    fn cdata(off: u32, payload: &[u8]) -> Vec<u8> {
        seg(C, S, ACK | PSH, CISN + 1 + off, SISN + 1, payload)
    }

    fn sdata(off: u32, payload: &[u8]) -> Vec<u8> {
        seg(S, C, ACK | PSH, SISN + 1 + off, CISN + 1, payload)
    }

    #[derive(Debug, PartialEq)]
    enum Out {
        NotTcp,
        Accept {
            dir: StreamDir,
            window: Vec<u8>,
            new_from: usize,
        },
        Held,
        Drop(StreamDrop),
        Untracked,
    }

    fn acc(dir: StreamDir, window: &[u8], new_from: usize) -> Out {
        Out::Accept {
            dir,
            window: window.to_vec(),
            new_from,
        }
    }

    fn feed_at(t: &mut StreamTracker, f: &[u8], now: u64) -> (Out, Option<FlowId>) {
        let Decoded::Ip(p) = decode(f) else {
            panic!("not IP")
        };
        let r = match t.segment(&p, f, Timestamp(now)) {
            StreamOutcome::NotTcp => (Out::NotTcp, None),
            StreamOutcome::Accept {
                flow,
                dir,
                window,
                new_from,
            } => (
                Out::Accept {
                    dir,
                    window: window.to_vec(),
                    new_from,
                },
                Some(flow),
            ),
            StreamOutcome::Held => (Out::Held, None),
            StreamOutcome::Drop(why) => (Out::Drop(why), None),
            StreamOutcome::Untracked => (Out::Untracked, None),
        };
        t.check_invariants();
        r
    }

    fn feed(t: &mut StreamTracker, f: &[u8]) -> Out {
        feed_at(t, f, 1).0
    }

    fn tracker() -> StreamTracker {
        StreamTracker::new(StreamConfig::default())
    }

    /// SYN, SYN+ACK (advertising `swin`), ACK; returns the flow.
    fn handshake_with(
        t: &mut StreamTracker,
        cws: Option<u8>,
        sws: Option<u8>,
        swin: u16,
    ) -> FlowId {
        let syn = seg_full(C, S, SYN, CISN, 0, 64240, cws, b"");
        let synack = seg_full(S, C, SYN | ACK, SISN, CISN + 1, swin, sws, b"");
        assert_eq!(feed(t, &syn), acc(StreamDir::ToServer, b"", 0));
        assert_eq!(feed(t, &synack), acc(StreamDir::ToClient, b"", 0));
        let (out, id) = feed_at(t, &seg(C, S, ACK, CISN + 1, SISN + 1, b""), 1);
        assert_eq!(out, acc(StreamDir::ToServer, b"", 0));
        id.unwrap()
    }

    fn handshake(t: &mut StreamTracker) -> FlowId {
        handshake_with(t, None, None, 65535)
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let mut t = tracker();
        handshake(&mut t);
        assert_eq!(
            feed(&mut t, &cdata(0, b"GET /")),
            acc(StreamDir::ToServer, b"GET /", 0)
        );
        assert_eq!(
            feed(&mut t, &sdata(0, b"HTTP")),
            acc(StreamDir::ToClient, b"HTTP", 0)
        );
        assert_eq!(
            feed(&mut t, &cdata(5, b" x")),
            acc(StreamDir::ToServer, b"GET / x", 5)
        );
        let st = t.stats();
        assert_eq!(
            (st.created, st.active, st.midstream, st.accepted_bytes),
            (1, 1, 0, 11)
        );
    }

    #[test]
    fn attack_split_into_one_byte_segments() {
        let mut t = tracker();
        handshake(&mut t);
        let word = b"ATTACK";
        for i in 0..word.len() {
            let out = feed(&mut t, &cdata(i as u32, &word[i..=i]));
            assert_eq!(out, acc(StreamDir::ToServer, &word[..=i], i));
        }
    }

    #[test]
    fn a_table_two_thirds_full_of_flows_with_state_still_takes_new_ones() {
        // 620 midstream flows with data (never evictable) in 1024 slots: with one window of
        // 8 consecutive slots per flow, 9 of them found theirs full.
        let mut t = StreamTracker::new(StreamConfig {
            max_flows: 1024,
            ..StreamConfig::default()
        });
        let mut refused = 0;
        for n in 0..620u32 {
            let client = format!("10.1.{}.{}", n / 200, n % 200 + 1);
            let f = seg((&client, 40000 + (n % 7) as u16), S, ACK | PSH, 1, 1, b"x");
            match feed(&mut t, &f) {
                Out::Accept { .. } => {}
                Out::Drop(StreamDrop::FlowLimit) => refused += 1,
                other => panic!("flow {n}: {other:?}"),
            }
        }
        assert_eq!(refused, 0, "{:?}", t.stats());
        assert_eq!(t.stats().active, 620);
    }

    #[test]
    fn a_flow_slot_fits_its_heap_bound() {
        // The slot itself; its deques' buffers are the context and `max_total_bytes`.
        let slot = core::mem::size_of::<Option<Flow>>();
        assert!(slot <= FLOW_SLOT_BYTES, "a slot is {slot} bytes");
        let c = StreamConfig {
            max_flows: 3000,
            context_bytes: 1024,
            max_total_bytes: 1 << 20,
            ..StreamConfig::default()
        };
        assert_eq!(
            c.heap_bound(),
            4096 * (FLOW_SLOT_BYTES + 2 * (2048 + 64)) + (2 << 20)
        );
    }

    #[test]
    fn context_is_bounded() {
        let mut t = StreamTracker::new(StreamConfig {
            context_bytes: 4,
            ..StreamConfig::default()
        });
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"0123456789"));
        assert_eq!(
            feed(&mut t, &cdata(10, b"AB")),
            acc(StreamDir::ToServer, b"6789AB", 4)
        );
    }

    #[test]
    fn reversed_delivery_is_held_then_released_in_order() {
        let mut t = tracker();
        let flow = handshake(&mut t);
        let word = b"ATTACK";
        let frames: Vec<_> = (0..word.len())
            .map(|i| cdata(i as u32, &word[i..=i]))
            .collect();
        for f in frames[1..].iter().rev() {
            assert_eq!(feed(&mut t, f), Out::Held);
            assert!(t.take_released().is_none());
        }
        assert_eq!(t.stats().held_segments, 5);
        assert!(t.held_bytes() > 0);
        assert_eq!(feed(&mut t, &frames[0]), acc(StreamDir::ToServer, b"A", 0));
        for (i, f) in frames.iter().enumerate().skip(1) {
            let r = t.take_released().unwrap();
            assert_eq!((r.flow, r.dir), (flow, StreamDir::ToServer));
            assert_eq!(&r.frame, f);
            assert_eq!((&r.window[..], r.new_from), (&word[..=i], i));
        }
        assert!(t.take_released().is_none());
        let st = t.stats();
        assert_eq!((st.held_segments, st.held_peak, st.released), (0, 5, 5));
        assert_eq!(t.held_bytes(), 0);
        // The stream continues after the released bytes.
        assert_eq!(
            feed(&mut t, &cdata(6, b"!")),
            acc(StreamDir::ToServer, b"ATTACK!", 6)
        );
    }

    #[test]
    fn out_of_order_is_dropped_without_holding() {
        let mut t = StreamTracker::new(StreamConfig {
            hold_out_of_order: false,
            ..StreamConfig::default()
        });
        handshake(&mut t);
        assert_eq!(
            feed(&mut t, &cdata(1, b"B")),
            Out::Drop(StreamDrop::OutOfOrder)
        );
        assert_eq!(t.held_bytes(), 0);
        assert_eq!(t.stats().held_segments, 0);
        assert_eq!(t.stats().drops.out_of_order, 1);
        assert_eq!(
            feed(&mut t, &cdata(0, b"A")),
            acc(StreamDir::ToServer, b"A", 0)
        );
        assert!(t.take_released().is_none());
        // The retransmission in order passes and extends the stream.
        assert_eq!(
            feed(&mut t, &cdata(1, b"B")),
            acc(StreamDir::ToServer, b"AB", 1)
        );
    }

    #[test]
    fn retransmitted_bytes_are_trimmed() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"ABCD"));
        assert_eq!(
            feed(&mut t, &cdata(0, b"ABCDEF")),
            acc(StreamDir::ToServer, b"ABCDEF", 4)
        );
        assert_eq!(
            feed(&mut t, &cdata(1, b"BCD")),
            acc(StreamDir::ToServer, b"ABCDEF", 6)
        );
        assert_eq!(t.stats().accepted_bytes, 6);
    }

    #[test]
    fn overlap_with_different_bytes_is_dropped() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"ABCD"));
        let mismatch = Out::Drop(StreamDrop::OverlapMismatch);
        assert_eq!(feed(&mut t, &cdata(0, b"ABXD")), mismatch);
        assert_eq!(feed(&mut t, &cdata(2, b"XYEF")), mismatch);
        assert_eq!(
            feed(&mut t, &cdata(4, b"EF")),
            acc(StreamDir::ToServer, b"ABCDEF", 4)
        );
        assert_eq!(t.stats().drops.get(StreamDrop::OverlapMismatch), 2);
    }

    #[test]
    fn overlap_with_held_bytes_is_checked() {
        let mut t = tracker();
        handshake(&mut t);
        let mismatch = Out::Drop(StreamDrop::OverlapMismatch);
        assert_eq!(feed(&mut t, &cdata(2, b"CD")), Out::Held);
        // In-order bytes that disagree with held ones, then held against held.
        assert_eq!(feed(&mut t, &cdata(0, b"ABXY")), mismatch);
        assert_eq!(feed(&mut t, &cdata(3, b"ZE")), mismatch);
        // Agreeing overlaps are fine; an identical copy is not stored twice.
        assert_eq!(feed(&mut t, &cdata(3, b"DE")), Out::Held);
        assert_eq!(feed(&mut t, &cdata(2, b"CD")), Out::Held);
        assert_eq!(t.stats().held_segments, 2);
        assert_eq!(
            feed(&mut t, &cdata(0, b"ABC")),
            acc(StreamDir::ToServer, b"ABC", 0)
        );
        let r = t.take_released().unwrap();
        assert_eq!((&r.window[..], r.new_from), (&b"ABCD"[..], 3));
        let r = t.take_released().unwrap();
        assert_eq!((&r.window[..], r.new_from), (&b"ABCDE"[..], 4));
        assert!(t.take_released().is_none());
    }

    #[test]
    fn data_outside_the_window_is_dropped() {
        let mut t = tracker();
        handshake_with(&mut t, None, None, 100);
        let oow = Out::Drop(StreamDrop::OutOfWindow);
        assert_eq!(feed(&mut t, &cdata(200, b"far")), oow);
        assert_eq!(feed(&mut t, &cdata(50, b"near")), Out::Held);
        assert_eq!(feed(&mut t, &cdata(0x8000_0000, b"x")), oow);
        assert_eq!(feed(&mut t, &cdata(0xb000_0000, b"x")), oow);
        assert_eq!(t.stats().drops.out_of_window, 3);
    }

    #[test]
    fn window_scale_needs_both_syns() {
        // Both SYNs carry the option: the server's window 10 means 10 << 7 = 1280.
        let mut t = tracker();
        handshake_with(&mut t, Some(7), Some(7), 10);
        assert_eq!(
            feed(&mut t, &cdata(1000, b"x")),
            Out::Drop(StreamDrop::OutOfWindow)
        );
        feed(
            &mut t,
            &seg_full(S, C, ACK, SISN + 1, CISN + 1, 10, None, b""),
        );
        assert_eq!(feed(&mut t, &cdata(1000, b"x")), Out::Held);
        // Only the server's SYN carries it: unscaled.
        let mut t = tracker();
        handshake_with(&mut t, None, Some(7), 10);
        feed(
            &mut t,
            &seg_full(S, C, ACK, SISN + 1, CISN + 1, 10, None, b""),
        );
        assert_eq!(
            feed(&mut t, &cdata(1000, b"x")),
            Out::Drop(StreamDrop::OutOfWindow)
        );
        assert_eq!(feed(&mut t, &cdata(5, b"x")), Out::Held);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut t = tracker();
        let isn = u32::MAX - 2;
        feed(&mut t, &seg(C, S, SYN, isn, 0, b""));
        feed(
            &mut t,
            &seg(S, C, SYN | ACK, SISN, isn.wrapping_add(1), b""),
        );
        feed(&mut t, &seg(C, S, ACK, isn.wrapping_add(1), SISN + 1, b""));
        let word = b"ATTACK";
        let at = |i: usize| {
            seg(
                C,
                S,
                ACK,
                isn.wrapping_add(1 + i as u32),
                SISN + 1,
                &word[i..=i],
            )
        };
        // Bytes 4 and 5 (past the wrap) first, then 0..3 crossing it.
        assert_eq!(feed(&mut t, &at(5)), Out::Held);
        assert_eq!(feed(&mut t, &at(4)), Out::Held);
        for i in 0..4 {
            assert_eq!(
                feed(&mut t, &at(i)),
                acc(StreamDir::ToServer, &word[..=i], i)
            );
        }
        let windows: Vec<_> = core::iter::from_fn(|| t.take_released())
            .map(|r| r.window)
            .collect();
        assert_eq!(windows, vec![b"ATTAC".to_vec(), b"ATTACK".to_vec()]);
    }

    #[test]
    fn exact_rst_ends_the_connection_and_later_data_is_refused() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"abc"));
        let rst = seg(S, C, RST | ACK, SISN + 1, CISN + 4, b"");
        assert_eq!(feed(&mut t, &rst), acc(StreamDir::ToClient, b"", 0));
        let st = t.stats();
        assert_eq!((st.reset, st.closed, st.active), (1, 0, 1));
        assert_eq!(t.held_bytes(), 0);
        // The stream's continuation is refused, not picked up midstream without its context,
        // both ways, and so is a FIN.
        let after = Out::Drop(StreamDrop::AfterReset);
        assert_eq!(feed(&mut t, &cdata(3, b"def")), after);
        assert_eq!(feed(&mut t, &sdata(0, b"reply")), after);
        assert_eq!(
            feed(&mut t, &seg(C, S, FIN | ACK, CISN + 4, SISN + 1, b"")),
            after
        );
        assert_eq!(t.stats().drops.after_reset, 3);
        assert_eq!(t.stats().midstream, 0);
        // A bare ACK or another RST carries nothing: passed.
        let ack = seg(C, S, ACK, CISN + 4, SISN + 1, b"");
        assert_eq!(feed(&mut t, &ack), acc(StreamDir::ToServer, b"", 0));
        // A new SYN opens the tuple again, as a new connection.
        let created = t.stats().created;
        let syn = seg(C, S, SYN, CISN + 100_000, 0, b"");
        assert!(matches!(feed(&mut t, &syn), Out::Accept { .. }));
        assert_eq!(t.stats().created, created + 1);
        let synack = seg(S, C, SYN | ACK, SISN + 50_000, CISN + 100_001, b"");
        assert!(matches!(feed(&mut t, &synack), Out::Accept { .. }));
        let ack = seg(C, S, ACK, CISN + 100_001, SISN + 50_001, b"");
        assert!(matches!(feed(&mut t, &ack), Out::Accept { .. }));
        assert_eq!(
            feed(
                &mut t,
                &seg(C, S, ACK, CISN + 100_001, SISN + 50_001, b"new")
            ),
            acc(StreamDir::ToServer, b"new", 0)
        );
    }

    /// The evasion the reset state stops: an RST the receiver never gets (another MAC
    /// address, another VLAN, a TTL that expires) must not wipe the matching context of a
    /// pattern split around it.
    #[test]
    fn a_pattern_split_around_an_rst_is_not_passed_as_new_data() {
        let mut t = tracker();
        handshake(&mut t);
        assert_eq!(
            feed(&mut t, &cdata(0, b"EV")),
            acc(StreamDir::ToServer, b"EV", 0)
        );
        let rst = seg(C, S, RST | ACK, CISN + 3, SISN + 1, b"");
        assert_eq!(feed(&mut t, &rst), acc(StreamDir::ToServer, b"", 0));
        assert_eq!(
            feed(&mut t, &cdata(2, b"IL")),
            Out::Drop(StreamDrop::AfterReset)
        );
    }

    #[test]
    fn rst_answering_a_syn_closes_the_flow() {
        let mut t = tracker();
        feed(&mut t, &seg(C, S, SYN, CISN, 0, b""));
        assert_eq!(
            feed(&mut t, &seg(S, C, RST | ACK, 0, CISN + 1, b"")),
            acc(StreamDir::ToClient, b"", 0)
        );
        assert_eq!(t.stats().reset, 1);
        // The SYN's retransmission is a new connection attempt on the tuple.
        assert!(matches!(
            feed(&mut t, &seg(C, S, SYN, CISN, 0, b"")),
            Out::Accept { .. }
        ));
    }

    #[test]
    fn inexact_rst_in_window_is_dropped() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"abc"));
        let rst = seg(C, S, RST | ACK, CISN + 1 + 3 + 10, SISN + 1, b"");
        assert_eq!(feed(&mut t, &rst), Out::Drop(StreamDrop::RstNotExact));
        assert_eq!(t.stats().rst_challenge, 1);
        assert_eq!(
            feed(&mut t, &cdata(3, b"d")),
            acc(StreamDir::ToServer, b"abcd", 3)
        );
    }

    #[test]
    fn spoofed_rst_out_of_window_keeps_the_flow() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"ATT"));
        let rst = seg(S, C, RST, SISN + 1 + 1_000_000, 0, b"");
        assert_eq!(feed(&mut t, &rst), Out::Drop(StreamDrop::RstOutOfWindow));
        let rst = seg(C, S, RST, CISN - 5, 0, b"");
        assert_eq!(feed(&mut t, &rst), Out::Drop(StreamDrop::RstOutOfWindow));
        assert_eq!(
            feed(&mut t, &cdata(3, b"ACK")),
            acc(StreamDir::ToServer, b"ATTACK", 3)
        );
        assert_eq!(t.stats().closed, 0);
        // An RST for no flow is not passed either.
        let stray = seg(("10.9.9.9", 1), S, RST, 7, 0, b"");
        assert_eq!(feed(&mut t, &stray), Out::Drop(StreamDrop::RstOutOfWindow));
    }

    #[test]
    fn syn_on_established_is_dropped() {
        let mut t = tracker();
        // An identical SYN retransmission during the handshake is fine.
        assert_eq!(
            feed(&mut t, &seg(C, S, SYN, CISN, 0, b"")),
            acc(StreamDir::ToServer, b"", 0)
        );
        assert_eq!(
            feed(&mut t, &seg(C, S, SYN, CISN, 0, b"")),
            acc(StreamDir::ToServer, b"", 0)
        );
        // A SYN+ACK must acknowledge the SYN.
        let bad = seg(S, C, SYN | ACK, SISN, CISN + 77, b"");
        assert_eq!(feed(&mut t, &bad), Out::Drop(StreamDrop::OutOfWindow));
        feed(&mut t, &seg(S, C, SYN | ACK, SISN, CISN + 1, b""));
        feed(&mut t, &seg(C, S, ACK, CISN + 1, SISN + 1, b""));
        feed(&mut t, &cdata(0, b"ATT"));
        let syn = Out::Drop(StreamDrop::SynOnEstablished);
        assert_eq!(feed(&mut t, &seg(C, S, SYN, 777, 0, b"")), syn);
        assert_eq!(feed(&mut t, &seg(S, C, SYN | ACK, 888, 778, b"")), syn);
        assert_eq!(t.stats().drops.syn_on_established, 2);
        assert_eq!(
            feed(&mut t, &cdata(3, b"ACK")),
            acc(StreamDir::ToServer, b"ATTACK", 3)
        );
    }

    #[test]
    fn fins_close_the_flow() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"bye"));
        let cfin = seg(C, S, FIN | ACK, CISN + 4, SISN + 1, b"");
        assert_eq!(feed(&mut t, &cfin), acc(StreamDir::ToServer, b"bye", 3));
        // Nothing may follow the FIN; a FIN elsewhere contradicts it.
        assert_eq!(
            feed(&mut t, &cdata(4, b"more")),
            Out::Drop(StreamDrop::OutOfWindow)
        );
        let other_fin = seg(C, S, FIN | ACK, CISN + 3, SISN + 1, b"");
        assert_eq!(
            feed(&mut t, &other_fin),
            Out::Drop(StreamDrop::OverlapMismatch)
        );
        // The FIN's retransmission is fine.
        assert_eq!(feed(&mut t, &cfin), acc(StreamDir::ToServer, b"bye", 3));
        let sfin = seg(S, C, FIN | ACK, SISN + 1, CISN + 5, b"");
        assert_eq!(feed(&mut t, &sfin), acc(StreamDir::ToClient, b"", 0));
        assert_eq!(t.stats().active, 1);
        let last_ack = seg(C, S, ACK, CISN + 5, SISN + 2, b"");
        assert_eq!(feed(&mut t, &last_ack), acc(StreamDir::ToServer, b"bye", 3));
        let st = t.stats();
        assert_eq!((st.closed, st.active), (1, 0));
    }

    #[test]
    fn midstream_pickup() {
        let mut t = tracker();
        assert_eq!(
            feed(&mut t, &sdata(100, b"hello")),
            acc(StreamDir::ToServer, b"hello", 0)
        );
        // The client's first bytes start where the server's ACK said.
        assert_eq!(
            feed(&mut t, &cdata(0, b"hi")),
            acc(StreamDir::ToClient, b"hi", 0)
        );
        assert_eq!(
            feed(&mut t, &sdata(105, b"!")),
            acc(StreamDir::ToServer, b"hello!", 5)
        );
        assert_eq!(feed(&mut t, &sdata(110, b"?")), Out::Held);
        let st = t.stats();
        assert_eq!((st.created, st.midstream), (1, 1));
        // A SYN still cannot reset it.
        let syn = seg(C, S, SYN, 1, 0, b"");
        assert_eq!(feed(&mut t, &syn), Out::Drop(StreamDrop::SynOnEstablished));
    }

    #[test]
    fn midstream_first_bytes_follow_the_peers_ack() {
        let mut t = tracker();
        // The server acknowledged up to client offset 10: bytes before it are old, after it held.
        feed(&mut t, &seg(S, C, ACK, SISN + 1, CISN + 11, b""));
        assert_eq!(feed(&mut t, &cdata(11, b"z")), Out::Held);
        assert_eq!(
            feed(&mut t, &cdata(8, b"abc")),
            acc(StreamDir::ToClient, b"c", 0)
        );
        let r = t.take_released().unwrap();
        assert_eq!((&r.window[..], r.new_from), (&b"cz"[..], 1));
    }

    #[test]
    fn syn_restarts_a_dataless_pickup() {
        let mut t = tracker();
        // A stray ACK from the server is picked up with the server as "client" ...
        feed(&mut t, &seg(S, C, ACK, 9, 9, b""));
        // ... and the real connection's SYN starts the flow over.
        assert_eq!(
            feed(&mut t, &seg(C, S, SYN, CISN, 0, b"")),
            acc(StreamDir::ToServer, b"", 0)
        );
        let st = t.stats();
        assert_eq!((st.created, st.evicted, st.active), (2, 1, 1));
        feed(&mut t, &seg(S, C, SYN | ACK, SISN, CISN + 1, b""));
        assert_eq!(
            feed(&mut t, &cdata(0, b"x")),
            acc(StreamDir::ToServer, b"x", 0)
        );
    }

    #[test]
    fn block_drops_both_directions() {
        let mut t = tracker();
        let flow = handshake(&mut t);
        feed(&mut t, &cdata(0, b"evil"));
        assert_eq!(feed(&mut t, &cdata(8, b"late")), Out::Held);
        t.block(flow);
        let st = t.stats();
        assert_eq!((st.discarded, st.held_segments), (1, 0));
        assert_eq!(t.held_bytes(), 0);
        let blocked = Out::Drop(StreamDrop::Blocked);
        assert_eq!(feed(&mut t, &cdata(4, b"more")), blocked);
        assert_eq!(feed(&mut t, &sdata(0, b"reply")), blocked);
        assert_eq!(feed(&mut t, &seg(C, S, SYN, 1, 0, b"")), blocked);
        assert_eq!(t.stats().drops.blocked, 3);
        // Only an exact RST passes, and it ends the connection: nothing more of it passes.
        assert_eq!(
            feed(&mut t, &seg(S, C, RST, SISN + 2, 0, b"")),
            Out::Drop(StreamDrop::Blocked)
        );
        assert_eq!(
            feed(&mut t, &seg(S, C, RST, SISN + 1, 0, b"")),
            acc(StreamDir::ToClient, b"", 0)
        );
        assert_eq!(t.stats().reset, 1);
        assert_eq!(
            feed(&mut t, &cdata(4, b"more")),
            Out::Drop(StreamDrop::AfterReset)
        );
    }

    #[test]
    fn block_drops_pending_releases() {
        let mut t = tracker();
        let flow = handshake(&mut t);
        feed(&mut t, &cdata(1, b"b"));
        feed(&mut t, &cdata(2, b"c"));
        assert_eq!(
            feed(&mut t, &cdata(0, b"a")),
            acc(StreamDir::ToServer, b"a", 0)
        );
        t.block(flow);
        assert!(t.take_released().is_none());
        assert_eq!(t.stats().drops.blocked, 2);
        assert_eq!(t.held_bytes(), 0);
    }

    fn small(policy: LimitPolicy) -> StreamConfig {
        StreamConfig {
            max_flows: 1,
            max_bytes_per_flow: 200,
            on_limit: policy,
            ..StreamConfig::default()
        }
    }

    #[test]
    fn memory_limit_fail_closed() {
        let mut t = StreamTracker::new(small(LimitPolicy::FailClosed));
        handshake(&mut t);
        let mut outs = Vec::new();
        for i in 1..10 {
            outs.push(feed(&mut t, &cdata(2 * i, b"x")));
        }
        let held = outs.iter().filter(|o| **o == Out::Held).count();
        // Three 55-byte frames fit in 200 bytes.
        assert_eq!(held, 3, "{outs:?}");
        assert!(outs[held..]
            .iter()
            .all(|o| *o == Out::Drop(StreamDrop::MemoryLimit)));
        assert_eq!(t.stats().drops.memory_limit, (9 - held) as u64);
        assert!(t.held_bytes() <= 200);
        // In-order data still flows.
        assert_eq!(
            feed(&mut t, &cdata(0, b"a")),
            acc(StreamDir::ToServer, b"a", 0)
        );
    }

    #[test]
    fn memory_limit_fail_open() {
        let mut t = StreamTracker::new(small(LimitPolicy::FailOpen));
        handshake(&mut t);
        let mut outs = Vec::new();
        for i in 1..10 {
            outs.push(feed(&mut t, &cdata(2 * i, &[b'0' + i as u8])));
        }
        let held = outs.iter().filter(|o| **o == Out::Held).count();
        assert_eq!(outs[held], Out::Untracked);
        // The held frames come back for per-packet inspection, in order.
        let released: Vec<_> = core::iter::from_fn(|| t.take_released()).collect();
        assert_eq!(released.len(), held);
        assert_eq!(
            (&released[0].window[..], released[0].new_from),
            (&b"1"[..], 0)
        );
        // The flow stays untracked.
        assert_eq!(feed(&mut t, &cdata(0, b"a")), Out::Untracked);
        let st = t.stats();
        assert_eq!(
            (st.fail_open, st.untracked, st.held_segments),
            (1, 1 + (9 - held) as u64, 0)
        );
        assert_eq!(t.held_bytes(), 0);
    }

    #[test]
    fn flow_limit_fail_closed_and_eviction() {
        let mut t = StreamTracker::new(small(LimitPolicy::FailClosed));
        let other = ("10.0.0.3", 5555);
        // A handshake-only flow carries no stream state: a new flow evicts it.
        feed(&mut t, &seg(other, S, SYN, 1, 0, b""));
        handshake(&mut t);
        assert_eq!(t.stats().evicted, 1);
        // A flow with accepted bytes is never evicted.
        feed(&mut t, &cdata(0, b"x"));
        let syn = seg(other, S, SYN, 1, 0, b"");
        assert_eq!(feed(&mut t, &syn), Out::Drop(StreamDrop::FlowLimit));
        assert_eq!(t.stats().drops.flow_limit, 1);
        assert_eq!(
            feed(&mut t, &cdata(1, b"y")),
            acc(StreamDir::ToServer, b"xy", 1)
        );
    }

    #[test]
    fn flow_limit_fail_open() {
        let mut t = StreamTracker::new(small(LimitPolicy::FailOpen));
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"x"));
        let other = ("10.0.0.3", 5555);
        assert_eq!(feed(&mut t, &seg(other, S, SYN, 1, 0, b"")), Out::Untracked);
        let st = t.stats();
        assert_eq!((st.fail_open, st.untracked, st.active), (1, 1, 1));
    }

    #[test]
    fn idle_flows_expire() {
        let mut t = StreamTracker::new(StreamConfig {
            handshake_timeout_us: 10,
            established_timeout_us: 100,
            ..StreamConfig::default()
        });
        handshake(&mut t);
        feed_at(&mut t, &seg(("10.0.0.3", 5555), S, SYN, 1, 0, b""), 1);
        t.expire(Timestamp(50));
        assert_eq!((t.stats().expired, t.stats().active), (1, 1));
        t.expire(Timestamp(200));
        assert_eq!((t.stats().expired, t.stats().active), (2, 0));
    }

    #[test]
    fn retained_bytes_check_retransmissions_until_acked() {
        let mut t = StreamTracker::new(StreamConfig {
            context_bytes: 4,
            retain_bytes: 64,
            ..StreamConfig::default()
        });
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"0123456789"));
        // Unacknowledged: all ten bytes are checked (beyond the 4-byte context).
        assert_eq!(
            feed(&mut t, &cdata(0, b"X1")),
            Out::Drop(StreamDrop::OverlapMismatch)
        );
        assert_eq!(t.held_bytes(), 6);
        // Acknowledged: only the context is kept, older bytes are the receiver's past.
        feed(&mut t, &seg(S, C, ACK, SISN + 1, CISN + 11, b""));
        assert_eq!(t.held_bytes(), 0);
        assert_eq!(
            feed(&mut t, &cdata(0, b"X1")),
            acc(StreamDir::ToServer, b"6789", 4)
        );
        assert_eq!(
            feed(&mut t, &cdata(6, b"6X")),
            Out::Drop(StreamDrop::OverlapMismatch)
        );
        assert_eq!(t.stats().unverified_bytes, 0);
        // Past `retain_bytes`, unacknowledged old bytes pass unchecked and are counted.
        let mut t = StreamTracker::new(StreamConfig {
            context_bytes: 4,
            retain_bytes: 4,
            ..StreamConfig::default()
        });
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"0123456789"));
        assert_eq!(
            feed(&mut t, &cdata(0, b"X12345678")),
            acc(StreamDir::ToServer, b"6789", 4)
        );
        assert_eq!(t.stats().unverified_bytes, 6);
    }

    #[test]
    fn keepalive_garbage_byte_passes() {
        let mut t = tracker();
        handshake(&mut t);
        feed(&mut t, &cdata(0, b"abc"));
        feed(&mut t, &seg(S, C, ACK, SISN + 1, CISN + 4, b""));
        assert_eq!(
            feed(&mut t, &cdata(2, b"\0")),
            acc(StreamDir::ToServer, b"abc", 3)
        );
    }

    #[test]
    fn not_tcp_and_malformed() {
        let mut t = tracker();
        let udp = build::frame(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            17,
            &build::udp(1, 2, 0),
            b"",
        );
        assert_eq!(feed(&mut t, &udp), Out::NotTcp);
        let bad = Out::Drop(StreamDrop::Malformed);
        assert_eq!(feed(&mut t, &seg(C, S, SYN | RST, 1, 0, b"")), bad);
        assert_eq!(feed(&mut t, &seg(C, S, SYN | FIN, 1, 0, b"")), bad);
        assert_eq!(feed(&mut t, &seg(C, S, PSH, 1, 0, b"data")), bad);
        let mut cut = seg(C, S, ACK, 1, 0, b"");
        cut[14 + 20 + 12] = 0xf0; // data offset past the end
        assert_eq!(feed(&mut t, &cut), bad);
        let mut frag = cdata(0, b"x");
        frag[14 + 6] |= 0x20; // IPv4 more-fragments
        assert_eq!(feed(&mut t, &frag), bad);
        // A packet that was not decoded from the frame given.
        let f = cdata(0, b"x");
        let Decoded::Ip(p) = decode(&f) else { panic!() };
        let other = f.clone();
        assert_eq!(
            t.segment(&p, &other, Timestamp(0)),
            StreamOutcome::Drop(StreamDrop::Malformed)
        );
        assert_eq!(t.stats().drops.malformed, 6);
        assert_eq!(t.stats().created, 0);
    }

    #[test]
    fn random_segments_never_panic_and_stay_bounded() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let hosts = [
            ("10.0.0.1", 1000),
            ("10.0.0.2", 80),
            ("10.0.0.3", 1001),
            ("10.0.0.4", 443),
        ];
        let flags = [
            SYN,
            SYN | ACK,
            ACK,
            ACK | PSH,
            ACK | FIN,
            RST,
            RST | ACK,
            FIN,
            0,
            0xff,
        ];
        for (policy, hold) in [
            (LimitPolicy::FailClosed, true),
            (LimitPolicy::FailOpen, true),
            (LimitPolicy::FailOpen, false),
        ] {
            let cfg = StreamConfig {
                max_flows: 3,
                max_bytes_per_flow: 600,
                max_total_bytes: 1500,
                context_bytes: 8,
                retain_bytes: 64,
                on_limit: policy,
                established_timeout_us: 5000,
                handshake_timeout_us: 500,
                key: [rnd(), rnd()],
                hold_out_of_order: hold,
            };
            let mut t = StreamTracker::new(cfg);
            let mut now = 0;
            let mut ids = Vec::new();
            for _ in 0..30_000 {
                let r = rnd();
                let a = hosts[(r % 4) as usize];
                let b = hosts[((r >> 2) % 4) as usize];
                // Sequence numbers near a few bases, so segments overlap and fill gaps.
                let base = [0u32, 0xffff_ff00, 5000][((r >> 4) % 3) as usize];
                let seq = base.wrapping_add((rnd() % 300) as u32);
                let ack = [0u32, 0xffff_ff00, 5000][((r >> 6) % 3) as usize]
                    .wrapping_add((rnd() % 300) as u32);
                let len: usize = [0, 1, 3, 20, 200][((r >> 8) % 5) as usize];
                let payload: Vec<u8> = (0..len)
                    .map(|i| b"ab"[((r >> (10 + i % 20)) & 1) as usize])
                    .collect();
                let f = seg_full(
                    a,
                    b,
                    flags[((r >> 32) % flags.len() as u64) as usize],
                    seq,
                    ack,
                    (rnd() % 2000) as u16,
                    ((r >> 40) & 1 == 1).then_some(((r >> 41) % 16) as u8),
                    &payload,
                );
                now += rnd() % 50;
                let (_, id) = feed_at(&mut t, &f, now);
                ids.extend(id);
                while t.take_released().is_some() {}
                match rnd() % 200 {
                    0 => t.expire(Timestamp(now)),
                    1 => {
                        if let Some(&id) = ids.get((rnd() % (ids.len() as u64 + 1)) as usize) {
                            t.block(id);
                        }
                    }
                    _ => {}
                }
                t.check_invariants();
                assert!(t.held_bytes() <= cfg.max_total_bytes);
            }
            let st = t.stats();
            assert!(st.accepted_bytes > 0, "{st:?}");
            if cfg.hold_out_of_order {
                assert!(st.released > 0, "{st:?}");
            } else {
                assert!(st.released == 0 && st.drops.out_of_order > 0, "{st:?}");
            }
        }
    }
}
