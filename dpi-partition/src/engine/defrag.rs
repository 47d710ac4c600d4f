//! IPv4 and IPv6 fragment reassembly for the inline engine.
//!
//! [`Defragmenter::push`] takes every Ethernet frame before inspection. Frames that are not IP
//! fragments come back as [`FragOutcome::NotFragment`]. Fragments are held until their datagram
//! is whole; then [`FragOutcome::Complete`] gives the reassembled datagram as one Ethernet frame
//! for the rules (it decodes with [`packet::decode`](super::packet::decode) like any unfragmented
//! packet: ports, the whole L4 payload) together with the original fragment frames, byte for
//! byte, in arrival order.
//!
//! # Inline policy
//!
//! What Ally inspected is exactly what the receiver can reassemble. Nothing of a datagram is
//! forwarded before it is complete: the pipeline inspects the datagram and then forwards all of
//! its fragments, or none. The fragments never disagree on a byte, so every receiver, whatever
//! its overlap policy, rebuilds the inspected datagram (or discards it: Linux and RFC 5722
//! receivers drop any datagram with overlapping fragments).
//!
//! - Overlapping fragments must carry identical bytes; otherwise the fragment is dropped with
//!   [`DefragDrop::OverlapMismatch`] (an evasion attempt: worth an alert). A fragment that
//!   repeats a held one (same offset, length and MF bit, same bytes) is a retransmission: it is
//!   counted and not stored (nor forwarded). Two fragments at offset 0 must also agree on what
//!   the receiver takes from the first fragment only: the IPv4 options, or the IPv6
//!   unfragmentable extension headers and the Fragment header's next header (RFC 8200 §4.5).
//! - RFC 1858 (and RFC 7112 for IPv6): the first fragment must hold the whole upper-layer header
//!   (TCP header with its options, UDP 8 bytes, ICMP 8 bytes; for IPv6 also every extension
//!   header after the Fragment header); a non-last fragment must carry at least
//!   [`DefragConfig::min_fragment_payload`] bytes; a TCP fragment at offset 8 (it would rewrite
//!   the TCP flags) is refused. These are [`DefragDrop::TinyFragment`].
//! - Inconsistent fragments are [`DefragDrop::Malformed`]: IP lengths that do not fit the frame,
//!   a non-last fragment whose length is not a multiple of 8, two last fragments with different
//!   ends, a fragment past the known end. A datagram over 65535 bytes (IPv4 total length) or
//!   with an IPv6 payload over 65535 bytes (no jumbograms) is [`DefragDrop::TooLarge`].
//! - Whenever a fragment is dropped, the fragments held for its datagram are discarded and the
//!   datagram's identity is remembered until its timeout: later fragments of it are dropped as
//!   [`DefragDrop::Poisoned`]. (Forgetting a poisoned identity early, as happens when its slot
//!   is needed, is safe: nothing of it was forwarded.)
//! - Atomic fragments (offset 0, no more fragments; RFC 6946 for IPv6) are
//!   [`FragOutcome::NotFragment`]: they are whole datagrams and decode as they are.
//!
//! # Forward mode
//!
//! A pipeline that cannot hold frames sets [`DefragConfig::hold`] false: each fragment is
//! checked and kept as above, then forwarded at once ([`FragOutcome::Forward`]), except the
//! one that completes the datagram: it comes back as [`FragOutcome::Complete`] and is forwarded
//! only if the reassembled datagram passes. A receiver delivers nothing of a datagram before it
//! has every fragment, so withholding the last one withholds the datagram; the fragments it
//! already has agree byte for byte with what Ally inspected. After a failing verdict the
//! pipeline calls [`Defragmenter::block_completed`], and every later fragment of that datagram
//! is dropped as [`DefragDrop::Poisoned`]. Since the receiver keeps the forwarded fragments
//! until its own timeout, in this mode
//! - the timeouts must outlast every receiver's ([`DefragConfig::forwarding`]: 90 s), so that
//!   a datagram Ally forgets is one the receiver has forgotten too;
//! - a poisoned identity is never evicted for a new datagram before its timeout (the new
//!   datagram is refused instead: [`DefragDrop::TableFull`]), as a forgotten one would let a
//!   resent completing fragment through.
//!
//! A datagram is identified (RFC 791 §3.2, RFC 8200 §4.5) by IP version, source, destination,
//! identification and, for IPv4, protocol; Ally adds the VLAN IDs of the frame, since fragments
//! on different VLANs reach different receivers.
//!
//! # Bounds
//!
//! At most [`DefragConfig::max_datagrams`] datagrams are in reassembly, holding at most
//! [`DefragConfig::max_bytes`] bytes of fragment frames, each with at most
//! [`DefragConfig::max_fragments_per_datagram`] fragments. When a bound is reached the new
//! fragment is dropped (fail closed: [`DefragDrop::TableFull`], [`DefragDrop::MemoryLimit`],
//! [`DefragDrop::TooManyFragments`]); held datagrams are never evicted for newcomers. A partial
//! datagram is discarded when its timeout (counted from its first fragment, as Linux does) runs
//! out: in [`Defragmenter::expire`], lazily when `push` probes its slot, and in a sweep before a
//! bound refuses a fragment. The table is open-addressed (capacity: a power of two of at least
//! twice `max_datagrams`) with a probe window of 8 slots, indexed by a keyed hash ([`super::keyed`], secret
//! key [`DefragConfig::key`]), so a sender cannot aim many datagrams at one window. `push`
//! never panics, whatever the frame; its cost is bounded by the window and the fragments of one
//! datagram, except for the sweep over the table when a bound is hit.

use alloc::vec::Vec;

use super::keyed::keyed_hash;
use super::packet::{internet_checksum, ipproto};
use super::Timestamp;

/// Slots probed for a datagram.
const PROBE: usize = 8;
/// Largest IPv4 datagram (total length) and IPv6 payload (without jumbograms).
const MAX_IP_LEN: usize = 65_535;

/// Reassembly configuration.
#[derive(Clone, Copy, Debug)]
pub struct DefragConfig {
    /// Datagrams in reassembly at once.
    pub max_datagrams: usize,
    /// Bytes of fragment frames held, over all datagrams.
    pub max_bytes: usize,
    /// Fragments held per datagram.
    pub max_fragments_per_datagram: usize,
    /// Least payload of a non-last fragment. The default, 8, refuses only empty non-last
    /// fragments (non-last lengths are multiples of 8): RFC 791 guarantees 68-byte datagrams,
    /// so a fragmenter never needs to send less than 8 data bytes, and whatever the fragment
    /// sizes the rules see the reassembled datagram, so small fragments hide nothing; larger
    /// values refuse legal (if odd) traffic. The resource cost of small fragments is bounded by
    /// `max_fragments_per_datagram`.
    pub min_fragment_payload: usize,
    /// IPv4 reassembly timeout, microseconds (Linux `ipfrag_time`: 30 s).
    pub timeout_v4_us: u64,
    /// IPv6 reassembly timeout, microseconds (RFC 8200 §4.5: 60 s).
    pub timeout_v6_us: u64,
    /// SipHash key of the table index: a secret, random per boot.
    pub key: [u64; 2],
    /// Hold every fragment until its datagram is whole (true), or forward each one at once
    /// except the one that completes its datagram, which carries the datagram's verdict
    /// (false: for a pipeline that cannot hold frames; see "Forward mode").
    pub hold: bool,
}

impl DefragConfig {
    /// The default bounds with the given hash key (256 datagrams, 1 MiB, 64 fragments per
    /// datagram, 8-byte minimum fragment payload, 30 s for IPv4, 60 s for IPv6).
    pub fn new(key: [u64; 2]) -> DefragConfig {
        DefragConfig {
            max_datagrams: 256,
            max_bytes: 1 << 20,
            max_fragments_per_datagram: 64,
            min_fragment_payload: 8,
            timeout_v4_us: 30_000_000,
            timeout_v6_us: 60_000_000,
            key,
            hold: true,
        }
    }

    /// Forward mode (see the module documentation) with the default bounds: both timeouts
    /// 90 s, longer than any receiver keeps a partial datagram (Linux 30 s for IPv4, RFC 8200
    /// 60 s for IPv6), since the receiver holds the fragments Ally forwarded.
    pub fn forwarding(key: [u64; 2]) -> DefragConfig {
        DefragConfig {
            timeout_v4_us: 90_000_000,
            timeout_v6_us: 90_000_000,
            hold: false,
            ..DefragConfig::new(key)
        }
    }

    /// Most heap bytes the table takes: its slots, the fragment frames (`max_bytes`, copied
    /// at their exact size) and each datagram's fragment list at its largest, plus one
    /// reassembled datagram.
    pub const fn heap_bound(&self) -> usize {
        let cap = {
            let c = self.max_datagrams.saturating_mul(2);
            (if c > PROBE { c } else { PROBE }).next_power_of_two()
        };
        cap * core::mem::size_of::<Option<Entry>>()
            + self.max_bytes
            + self.max_datagrams
                * self.max_fragments_per_datagram
                * 2
                * core::mem::size_of::<Fragment>()
            + MAX_IP_LEN
            + 64
    }
}

/// Why a fragment was dropped. Its datagram's held fragments are discarded too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefragDrop {
    /// Overlapping fragments differ (bytes, or the first fragment's headers): evasion.
    OverlapMismatch,
    /// RFC 1858 / RFC 7112: a small non-last fragment, a first fragment without the whole
    /// upper-layer header, or a TCP fragment at offset 8.
    TinyFragment,
    /// The datagram already holds `max_fragments_per_datagram` fragments.
    TooManyFragments,
    /// Over 65535 bytes reassembled (IPv4 total length, IPv6 payload length).
    TooLarge,
    /// No room for another datagram.
    TableFull,
    /// No room for the fragment's bytes.
    MemoryLimit,
    /// Inconsistent lengths, offsets or ends.
    Malformed,
    /// The datagram was dropped before (for one of the other reasons) and has not timed out.
    Poisoned,
}

/// What to do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FragOutcome {
    /// Not an IP fragment: inspect the frame as it is.
    NotFragment,
    /// The fragment is held (or was a retransmission of a held one): nothing to forward yet.
    Held,
    /// Forward mode: the fragment is kept for reassembly (or repeats a kept one); forward it.
    Forward,
    /// The datagram is whole.
    Complete {
        /// The reassembled datagram as one Ethernet frame: the first fragment's L2 header (VLAN
        /// tags included) and IP header, IPv4 with MF and offset cleared, total length and
        /// checksum fixed; IPv6 without the Fragment header, next header and payload length
        /// fixed.
        datagram: Vec<u8>,
        /// The fragment frames as received, in arrival order: forward them if and only if the
        /// datagram passes inspection.
        fragments: Vec<Vec<u8>>,
    },
    /// Drop the fragment.
    Drop(DefragDrop),
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefragStats {
    /// Fragments pushed (every frame that was not [`FragOutcome::NotFragment`]).
    pub fragments: u64,
    /// Datagrams reassembled.
    pub completed: u64,
    /// Retransmitted fragments not stored.
    pub duplicates: u64,
    /// Partial datagrams discarded at their timeout.
    pub timeouts: u64,
    /// Drops by reason.
    pub overlap_mismatch: u64,
    /// See [`DefragDrop::TinyFragment`].
    pub tiny_fragment: u64,
    /// See [`DefragDrop::TooManyFragments`].
    pub too_many_fragments: u64,
    /// See [`DefragDrop::TooLarge`].
    pub too_large: u64,
    /// See [`DefragDrop::TableFull`].
    pub table_full: u64,
    /// See [`DefragDrop::MemoryLimit`].
    pub memory_limit: u64,
    /// See [`DefragDrop::Malformed`].
    pub malformed: u64,
    /// See [`DefragDrop::Poisoned`].
    pub poisoned: u64,
    /// Datagrams in reassembly now.
    pub held_datagrams: u64,
    /// Bytes of fragment frames held now.
    pub held_bytes: u64,
    /// Most bytes ever held.
    pub peak_bytes: u64,
}

/// The identity of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// IPv4 protocol (0 for IPv6, whose key has none).
    proto: u8,
    id: u32,
    /// VLAN IDs of the frame (outer, inner) with the tag count.
    vlans: u32,
}

impl Key {
    fn bytes(&self) -> [u8; 42] {
        let mut b = [0u8; 42];
        b[0] = u8::from(self.v6);
        b[1..17].copy_from_slice(&self.src);
        b[17..33].copy_from_slice(&self.dst);
        b[33] = self.proto;
        b[34..38].copy_from_slice(&self.id.to_le_bytes());
        b[38..42].copy_from_slice(&self.vlans.to_le_bytes());
        b
    }
}

/// Where a fragment's parts lie in its frame.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Offset of the IP header.
    l3: usize,
    /// Header bytes the reassembled datagram takes from the first fragment: the IPv4 header
    /// with options, or the IPv6 header with the unfragmentable extension headers.
    unfrag: usize,
    /// IPv6: index of the next-header byte that names the Fragment header.
    nh_at: usize,
    /// Upper-layer protocol: IPv4 protocol, or the IPv6 Fragment header's next header.
    proto: u8,
    /// Start of the fragment data.
    data: usize,
    /// Fragment data length.
    len: usize,
    /// Byte offset of the data in the datagram.
    off: usize,
    /// More fragments follow.
    more: bool,
}

impl Piece {
    fn end(&self) -> usize {
        self.off + self.len
    }

    /// Reassembled length beyond which the datagram is too large: IPv4 counts its header,
    /// IPv6 its extension headers but not the fixed 40 bytes.
    fn header_cost(&self, v6: bool) -> usize {
        if v6 {
            self.unfrag - 40
        } else {
            self.unfrag
        }
    }

    /// What the receiver takes from the first fragment only, beyond the key.
    fn first_headers<'a>(&self, frame: &'a [u8], v6: bool) -> (&'a [u8], u8) {
        let skip = if v6 { 40 } else { 20 };
        (&frame[self.l3 + skip..self.l3 + self.unfrag], self.proto)
    }
}

enum Parsed {
    NotFragment,
    /// A fragment without a usable identity.
    Bad(DefragDrop),
    /// A fragment, and its own validity.
    Fragment(Key, Result<Piece, DefragDrop>),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the headers of a frame as far as fragment reassembly needs them. Like the decoder,
/// up to two VLAN tags and the IPv6 hop-by-hop, routing, destination-options and AH headers are
/// skipped, so every frame the decoder sees as a fragment is one here.
fn parse(frame: &[u8], cfg: &DefragConfig) -> Parsed {
    let Some((ethertype, l3, vlans)) = super::packet::vlan_tags(frame) else {
        return Parsed::NotFragment;
    };
    let ip = frame.get(l3..).unwrap_or_default();
    let parsed = match ethertype {
        0x0800 => parse_v4(ip, l3, vlans),
        0x86dd => parse_v6(ip, l3, vlans),
        _ => return Parsed::NotFragment,
    };
    match parsed {
        Parsed::Fragment(key, Ok(p)) => {
            let checked = check(&p, &frame[p.data..p.data + p.len], key.v6, cfg).map(|()| p);
            Parsed::Fragment(key, checked)
        }
        other => other,
    }
}

fn parse_v4(b: &[u8], l3: usize, vlans: u32) -> Parsed {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return Parsed::NotFragment;
    }
    let frag = u16::from_be_bytes([b[6], b[7]]);
    let (off, more) = (usize::from(frag & 0x1fff) * 8, frag & 0x2000 != 0);
    if off == 0 && !more {
        return Parsed::NotFragment;
    }
    let v4mapped = |a: &[u8]| {
        let mut x = [0u8; 16];
        x[12..].copy_from_slice(a);
        x
    };
    let key = Key {
        v6: false,
        src: v4mapped(&b[12..16]),
        dst: v4mapped(&b[16..20]),
        proto: b[9],
        id: u32::from(u16::from_be_bytes([b[4], b[5]])),
        vlans,
    };
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if ihl < 20 || total < ihl || total > b.len() {
        return Parsed::Fragment(key, Err(DefragDrop::Malformed));
    }
    let piece = Piece {
        l3,
        unfrag: ihl,
        nh_at: 0,
        proto: b[9],
        data: l3 + ihl,
        len: total - ihl,
        off,
        more,
    };
    Parsed::Fragment(key, Ok(piece))
}

fn parse_v6(b: &[u8], l3: usize, vlans: u32) -> Parsed {
    if b.len() < 40 || b[0] >> 4 != 6 {
        return Parsed::NotFragment;
    }
    let (mut next, mut nh_at, mut at) = (b[6], 6, 40);
    // Bounded: each header moves `at` forward by at least 8 bytes of the frame.
    while next != 44 {
        let unit = match next {
            0 | 43 | 60 => 8,
            51 => 4,
            _ => return Parsed::NotFragment,
        };
        let (Some(&n), Some(&l)) = (b.get(at), b.get(at + 1)) else {
            return Parsed::NotFragment;
        };
        let len = (usize::from(l) + 1 + usize::from(next == 51)) * unit;
        (next, nh_at, at) = (n, at, at + len);
    }
    let (Some(offset), Some(id)) = (be16(b, at + 2), be32(b, at + 4)) else {
        return Parsed::Bad(DefragDrop::Malformed);
    };
    let (off, more) = (usize::from(offset >> 3) * 8, offset & 1 != 0);
    if off == 0 && !more {
        return Parsed::NotFragment;
    }
    let addr = |at: usize| {
        let mut x = [0u8; 16];
        x.copy_from_slice(&b[at..at + 16]);
        x
    };
    let key = Key {
        v6: true,
        src: addr(8),
        dst: addr(24),
        proto: 0,
        id,
        vlans,
    };
    let end = 40 + usize::from(u16::from_be_bytes([b[4], b[5]]));
    if end > b.len() || end < at + 8 {
        // A zero payload length (jumbogram, TSO) cannot hold a Fragment header either.
        return Parsed::Fragment(key, Err(DefragDrop::Malformed));
    }
    let piece = Piece {
        l3,
        unfrag: at,
        nh_at: l3 + nh_at,
        proto: b[at],
        data: l3 + at + 8,
        len: end - at - 8,
        off,
        more,
    };
    Parsed::Fragment(key, Ok(piece))
}

/// Checks one fragment on its own.
fn check(p: &Piece, data: &[u8], v6: bool, cfg: &DefragConfig) -> Result<(), DefragDrop> {
    if p.more && !p.len.is_multiple_of(8) {
        return Err(DefragDrop::Malformed);
    }
    if p.more && p.len < cfg.min_fragment_payload {
        return Err(DefragDrop::TinyFragment);
    }
    if p.header_cost(v6) + p.end() > MAX_IP_LEN {
        return Err(DefragDrop::TooLarge);
    }
    if p.proto == ipproto::TCP && p.off == 8 {
        return Err(DefragDrop::TinyFragment);
    }
    if p.off == 0 {
        upper_header_whole(p.proto, data, v6)?;
    }
    Ok(())
}

/// RFC 1858 / RFC 7112: the first fragment holds every header up to the upper-layer one, whole.
fn upper_header_whole(mut next: u8, data: &[u8], v6: bool) -> Result<(), DefragDrop> {
    let mut at = 0;
    // Bounded: each header moves `at` forward by at least 8 bytes of the fragment.
    while v6 && matches!(next, 0 | 43 | 44 | 51 | 60) {
        if next == 44 {
            return Err(DefragDrop::Malformed); // a second Fragment header
        }
        let (Some(&n), Some(&l)) = (data.get(at), data.get(at + 1)) else {
            return Err(DefragDrop::TinyFragment);
        };
        at += if next == 51 {
            (usize::from(l) + 2) * 4
        } else {
            (usize::from(l) + 1) * 8
        };
        next = n;
    }
    let need = match next {
        ipproto::TCP => data
            .get(at + 12)
            .map_or(20, |d| usize::from(d >> 4) * 4)
            .max(20),
        ipproto::UDP | ipproto::ICMP | ipproto::ICMPV6 => 8,
        _ => 0,
    };
    if data.len() < at + need {
        return Err(DefragDrop::TinyFragment);
    }
    Ok(())
}

/// A held fragment.
#[derive(Debug)]
struct Fragment {
    frame: Vec<u8>,
    p: Piece,
}

impl Fragment {
    fn data(&self) -> &[u8] {
        &self.frame[self.p.data..self.p.data + self.p.len]
    }
}

/// A datagram in reassembly.
#[derive(Debug, Default)]
struct Datagram {
    /// In arrival order.
    frags: Vec<Fragment>,
    /// Bytes of the frames held.
    bytes: usize,
    /// Data length, once the last fragment arrived.
    end: Option<usize>,
    /// Index of the first fragment (offset 0) in `frags`.
    first: Option<usize>,
    /// Furthest data byte held.
    reach: usize,
}

impl Datagram {
    /// Whether `p` is new (true), a retransmission (false), or conflicts with what is held.
    fn admit(&self, p: &Piece, frame: &[u8], v6: bool) -> Result<bool, DefragDrop> {
        let end = p.end();
        match (self.end, p.more) {
            (Some(e), false) if e != end => return Err(DefragDrop::Malformed),
            (None, false) if end < self.reach => return Err(DefragDrop::Malformed),
            (Some(e), true) if end > e => return Err(DefragDrop::Malformed),
            _ => {}
        }
        let data = &frame[p.data..p.data + p.len];
        let mut repeat = false;
        for f in &self.frags {
            let (lo, hi) = (p.off.max(f.p.off), end.min(f.p.end()));
            if lo < hi && data[lo - p.off..hi - p.off] != f.data()[lo - f.p.off..hi - f.p.off] {
                return Err(DefragDrop::OverlapMismatch);
            }
            repeat |= f.p.off == p.off && f.p.len == p.len && f.p.more == p.more;
        }
        let first = self.first.map(|i| &self.frags[i]);
        if let Some(f) = first.filter(|_| p.off == 0) {
            if f.p.first_headers(&f.frame, v6) != p.first_headers(frame, v6) {
                return Err(DefragDrop::OverlapMismatch);
            }
        }
        let cost = first.map(|f| &f.p).or((p.off == 0).then_some(p));
        if cost.is_some_and(|c| c.header_cost(v6) + self.reach.max(end) > MAX_IP_LEN) {
            return Err(DefragDrop::TooLarge);
        }
        Ok(!repeat)
    }

    fn store(&mut self, frame: &[u8], p: Piece) {
        if p.off == 0 && self.first.is_none() {
            self.first = Some(self.frags.len());
        }
        if !p.more {
            self.end = Some(p.end());
        }
        self.reach = self.reach.max(p.end());
        self.bytes += frame.len();
        self.frags.push(Fragment {
            frame: frame.to_vec(),
            p,
        });
    }

    /// The first fragment and the data length, once every byte is held.
    fn whole(&self) -> Option<(usize, usize)> {
        let (first, end) = (self.first?, self.end?);
        let mut runs: Vec<(usize, usize)> =
            self.frags.iter().map(|f| (f.p.off, f.p.end())).collect();
        runs.sort_unstable();
        let mut covered = 0;
        for (lo, hi) in runs {
            if lo > covered {
                return None;
            }
            covered = covered.max(hi);
        }
        (covered >= end).then_some((first, end))
    }

    /// Builds the reassembled frame; returns it with the fragment frames.
    fn assemble(self, first: usize, end: usize, v6: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
        let head = &self.frags[first];
        let p = head.p;
        let hdr_end = p.l3 + p.unfrag;
        let mut out = Vec::with_capacity(hdr_end + end);
        out.extend_from_slice(&head.frame[..hdr_end]);
        out.resize(hdr_end + end, 0);
        for f in &self.frags {
            out[hdr_end + f.p.off..][..f.p.len].copy_from_slice(f.data());
        }
        // Lengths fit in 16 bits: `admit` checked `header_cost + end`.
        let ip = &mut out[p.l3..hdr_end];
        if v6 {
            ip[4..6].copy_from_slice(&((p.unfrag - 40 + end) as u16).to_be_bytes());
            out[p.nh_at] = p.proto;
        } else {
            ip[2..4].copy_from_slice(&((p.unfrag + end) as u16).to_be_bytes());
            ip[6] &= 0xc0; // keep the reserved and DF bits; MF and the offset become 0
            ip[7] = 0;
            ip[10..12].fill(0);
            let sum = internet_checksum(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (out, self.frags.into_iter().map(|f| f.frame).collect())
    }
}

#[derive(Debug)]
enum State {
    Live(Datagram),
    Poisoned,
}

#[derive(Debug)]
struct Entry {
    key: Key,
    expires: u64,
    state: State,
}

/// The reassembly table.
#[derive(Debug)]
pub struct Defragmenter {
    slots: Vec<Option<Entry>>,
    mask: usize,
    cfg: DefragConfig,
    stats: DefragStats,
    held_bytes: usize,
    /// Forward mode: the slot and identity of the datagram the last `push` completed.
    last_completed: Option<(usize, Key)>,
}

impl Defragmenter {
    /// An empty table.
    pub fn new(cfg: DefragConfig) -> Defragmenter {
        let cap = cfg
            .max_datagrams
            .saturating_mul(2)
            .max(PROBE)
            .next_power_of_two();
        Defragmenter {
            slots: (0..cap).map(|_| None).collect(),
            mask: cap - 1,
            cfg,
            stats: DefragStats::default(),
            held_bytes: 0,
            last_completed: None,
        }
    }

    /// Counters.
    pub fn stats(&self) -> DefragStats {
        DefragStats {
            held_bytes: self.held_bytes as u64,
            ..self.stats
        }
    }

    /// Bytes of fragment frames held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Takes one frame; see [`FragOutcome`].
    pub fn push(&mut self, frame: &[u8], now: Timestamp) -> FragOutcome {
        let now = now.0;
        let (key, piece) = match parse(frame, &self.cfg) {
            Parsed::NotFragment => return FragOutcome::NotFragment,
            Parsed::Bad(reason) => {
                self.stats.fragments += 1;
                return self.reject(reason);
            }
            Parsed::Fragment(key, piece) => (key, piece),
        };
        self.stats.fragments += 1;
        let start = keyed_hash(self.cfg.key, &key.bytes()) as usize;
        // The datagram leaves its slot while this fragment is weighed; it goes back unless it
        // is completed or dropped.
        let (i, expires, mut d) = match self.find(start, &key, now) {
            Some(i) => match self.take(i) {
                Some(Entry {
                    state: State::Live(d),
                    expires,
                    ..
                }) => (i, expires, d),
                poisoned => {
                    self.slots[i] = poisoned;
                    return self.reject(DefragDrop::Poisoned);
                }
            },
            None => {
                if let Err(reason) = piece {
                    return match self.vacancy(start) {
                        Some(i) => self.poison(i, key, reason, now),
                        None => self.reject(reason),
                    };
                }
                let Some(i) = self.reserve(start, now) else {
                    return self.reject(DefragDrop::TableFull);
                };
                let expires = now.saturating_add(self.timeout(&key));
                (i, expires, Datagram::default())
            }
        };
        let p = match piece {
            Ok(p) => p,
            Err(reason) => return self.poison(i, key, reason, now),
        };
        match d.admit(&p, frame, key.v6) {
            Err(reason) => return self.poison(i, key, reason, now),
            Ok(false) => {
                self.stats.duplicates += 1;
                self.put(i, key, expires, d);
                return self.kept();
            }
            Ok(true) if d.frags.len() >= self.cfg.max_fragments_per_datagram => {
                return self.poison(i, key, DefragDrop::TooManyFragments, now);
            }
            Ok(true) => {}
        }
        let over = |s: &Self| s.held_bytes + d.bytes + frame.len() > s.cfg.max_bytes;
        if over(self) {
            self.expire_at(now);
            if over(self) {
                return self.poison(i, key, DefragDrop::MemoryLimit, now);
            }
        }
        d.store(frame, p);
        let Some((first, end)) = d.whole() else {
            self.put(i, key, expires, d);
            return self.kept();
        };
        self.stats.completed += 1;
        self.last_completed = Some((i, key));
        self.stats.peak_bytes = self
            .stats
            .peak_bytes
            .max((self.held_bytes + d.bytes) as u64);
        let (datagram, fragments) = d.assemble(first, end, key.v6);
        FragOutcome::Complete {
            datagram,
            fragments,
        }
    }

    /// A kept fragment's outcome: held, or forwarded in forward mode.
    fn kept(&self) -> FragOutcome {
        if self.cfg.hold {
            FragOutcome::Held
        } else {
            FragOutcome::Forward
        }
    }

    /// Forward mode: the datagram that the last [`FragOutcome::Complete`] gave failed
    /// inspection. Its identity is remembered as poisoned until its timeout, so that no later
    /// fragment of it (a resent completing fragment) reaches the receiver, which still holds
    /// the others. Returns false when there was no such datagram or no slot for it (the table
    /// window is full of live datagrams): the caller then fails closed on its own.
    pub fn block_completed(&mut self, now: Timestamp) -> bool {
        let Some((i, key)) = self.last_completed.take() else {
            return false;
        };
        // The datagram left slot `i` when it completed; take it again unless another one
        // moved in since, else another vacancy of its window.
        let start = keyed_hash(self.cfg.key, &key.bytes()) as usize;
        let slot = if self.slots[i].is_none() {
            Some(i)
        } else {
            self.vacancy(start)
        };
        let Some(slot) = slot else {
            return false;
        };
        self.take(slot);
        self.slots[slot] = Some(Entry {
            key,
            expires: now.0.saturating_add(self.timeout(&key)),
            state: State::Poisoned,
        });
        true
    }

    /// Discards the partial datagrams (and forgets the poisoned identities) whose timeout ran
    /// out.
    pub fn expire(&mut self, now: Timestamp) {
        self.expire_at(now.0);
    }

    fn expire_at(&mut self, now: u64) {
        for i in 0..self.slots.len() {
            self.expire_slot(i, now);
        }
    }

    fn expire_slot(&mut self, i: usize, now: u64) {
        if self.slots[i].as_ref().is_some_and(|e| now >= e.expires) {
            if let Some(Entry {
                state: State::Live(_),
                ..
            }) = self.take(i)
            {
                self.stats.timeouts += 1;
            }
        }
    }

    fn timeout(&self, key: &Key) -> u64 {
        if key.v6 {
            self.cfg.timeout_v6_us
        } else {
            self.cfg.timeout_v4_us
        }
    }

    /// The slot of `key` in its window, after expiring the window's timed-out entries.
    fn find(&mut self, start: usize, key: &Key, now: u64) -> Option<usize> {
        let mut found = None;
        for k in 0..PROBE {
            let i = (start + k) & self.mask;
            self.expire_slot(i, now);
            if self.slots[i].as_ref().is_some_and(|e| e.key == *key) {
                found = found.or(Some(i));
            }
        }
        found
    }

    /// A slot for a new entry in the window: an empty one, else (hold mode only) the poisoned
    /// one that expires first (a live datagram is never evicted).
    fn vacancy(&self, start: usize) -> Option<usize> {
        let window = (0..PROBE).map(|k| (start + k) & self.mask);
        let evict = self.cfg.hold;
        window
            .clone()
            .find(|&i| self.slots[i].is_none())
            .or_else(|| {
                if !evict {
                    return None;
                }
                window
                    .filter_map(|i| Some((i, self.slots[i].as_ref()?)))
                    .filter(|(_, e)| matches!(e.state, State::Poisoned))
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(i, _)| i)
            })
    }

    /// A slot for a new datagram, if the bounds allow one (after a sweep if they do not).
    fn reserve(&mut self, start: usize, now: u64) -> Option<usize> {
        let room = |s: &Self| (s.stats.held_datagrams as usize) < s.cfg.max_datagrams;
        let mut i = self.vacancy(start);
        if i.is_none() || !room(self) {
            self.expire_at(now);
            i = self.vacancy(start);
        }
        i.filter(|_| room(self))
    }

    /// Puts a live datagram into slot `i`.
    fn put(&mut self, i: usize, key: Key, expires: u64, d: Datagram) {
        self.stats.held_datagrams += 1;
        self.held_bytes += d.bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.held_bytes as u64);
        self.slots[i] = Some(Entry {
            key,
            expires,
            state: State::Live(d),
        });
    }

    /// Empties slot `i`, releasing what it held.
    fn take(&mut self, i: usize) -> Option<Entry> {
        let e = self.slots[i].take()?;
        if let State::Live(d) = &e.state {
            self.stats.held_datagrams -= 1;
            self.held_bytes -= d.bytes;
        }
        Some(e)
    }

    /// Drops the fragment and remembers its datagram (whose fragments are discarded) as
    /// poisoned in slot `i` until its timeout.
    fn poison(&mut self, i: usize, key: Key, reason: DefragDrop, now: u64) -> FragOutcome {
        let expires = now.saturating_add(self.timeout(&key));
        self.slots[i] = Some(Entry {
            key,
            expires,
            state: State::Poisoned,
        });
        self.reject(reason)
    }

    /// Counts a drop.
    fn reject(&mut self, reason: DefragDrop) -> FragOutcome {
        let s = &mut self.stats;
        let count = match reason {
            DefragDrop::OverlapMismatch => &mut s.overlap_mismatch,
            DefragDrop::TinyFragment => &mut s.tiny_fragment,
            DefragDrop::TooManyFragments => &mut s.too_many_fragments,
            DefragDrop::TooLarge => &mut s.too_large,
            DefragDrop::TableFull => &mut s.table_full,
            DefragDrop::MemoryLimit => &mut s.memory_limit,
            DefragDrop::Malformed => &mut s.malformed,
            DefragDrop::Poisoned => &mut s.poisoned,
        };
        *count += 1;
        FragOutcome::Drop(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packet::{build, decode, Decoded, Packet};
    use alloc::vec;
    use core::net::IpAddr;

    const T0: Timestamp = Timestamp(1_000_000_000);
    const SEC: u64 = 1_000_000;

    fn at(secs: u64) -> Timestamp {
        Timestamp(T0.0 + secs * SEC)
    }

    fn cfg() -> DefragConfig {
        DefragConfig::new([0x0123_4567_89ab_cdef, 0x0f1e_2d3c_4b5a_6978])
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn l3_of(f: &[u8]) -> usize {
        let mut l3 = 14;
        while matches!(be16(f, l3 - 2), Some(0x8100 | 0x88a8)) {
            l3 += 4;
        }
        l3
    }

    fn fix_v4(f: &mut [u8]) {
        let l3 = l3_of(f);
        let ihl = usize::from(f[l3] & 0x0f) * 4;
        f[l3 + 10..l3 + 12].fill(0);
        let sum = internet_checksum(&f[l3..l3 + ihl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    }

    /// An IPv4 datagram frame with identification `id`, flags clear and a valid checksum.
    fn v4(id: u16, proto: u8, l4: &[u8], data: &[u8]) -> Vec<u8> {
        let mut f = build::frame(ip("10.0.0.1"), ip("10.0.0.2"), proto, l4, data);
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20] = 0;
        fix_v4(&mut f);
        f
    }

    fn v4_tcp(id: u16, data: &[u8]) -> Vec<u8> {
        v4(id, ipproto::TCP, &build::tcp(1234, 80, 0x18), data)
    }

    /// A fragment of IPv4 datagram `d` carrying `data` at byte offset `off`.
    fn frag4_raw(d: &[u8], off: usize, data: &[u8], more: bool) -> Vec<u8> {
        let l3 = l3_of(d);
        let ihl = usize::from(d[l3] & 0x0f) * 4;
        let mut f = d[..l3 + ihl].to_vec();
        f.extend_from_slice(data);
        f[l3 + 2..l3 + 4].copy_from_slice(&((ihl + data.len()) as u16).to_be_bytes());
        let field = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        f[l3 + 6..l3 + 8].copy_from_slice(&field.to_be_bytes());
        fix_v4(&mut f);
        f
    }

    /// The fragment of IPv4 datagram `d` holding IP payload bytes `lo..hi`.
    fn frag4(d: &[u8], lo: usize, hi: usize) -> Vec<u8> {
        let l3 = l3_of(d);
        let body = &d[l3 + usize::from(d[l3] & 0x0f) * 4..];
        frag4_raw(d, lo, &body[lo..hi], hi < body.len())
    }

    /// An IPv6 datagram frame, with an 8-byte hop-by-hop header (PadN) if `hbh`.
    fn v6(hbh: bool, proto: u8, l4: &[u8], data: &[u8]) -> Vec<u8> {
        let (s, d) = (ip("2001:db8::1"), ip("2001:db8::2"));
        let mut f = build::frame(s, d, if hbh { 0 } else { proto }, &[], &[]);
        if hbh {
            f.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]);
        }
        f.extend_from_slice(l4);
        f.extend_from_slice(data);
        let plen = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f
    }

    /// A fragment of IPv6 datagram `d` (whose unfragmentable part is `unfrag` bytes from the
    /// IP header: 40, or 48 with the hop-by-hop header) carrying `data` at offset `off`.
    fn frag6_raw(d: &[u8], unfrag: usize, off: usize, data: &[u8], more: bool) -> Vec<u8> {
        let nh_at = 14 + if unfrag == 40 { 6 } else { 40 };
        let mut f = d[..14 + unfrag].to_vec();
        f[nh_at] = 44;
        f.extend_from_slice(&[d[nh_at], 0]);
        f.extend_from_slice(&((off as u16) | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        f.extend_from_slice(data);
        let plen = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f
    }

    fn frag6(d: &[u8], unfrag: usize, lo: usize, hi: usize) -> Vec<u8> {
        let body = &d[14 + unfrag..];
        frag6_raw(d, unfrag, lo, &body[lo..hi], hi < body.len())
    }

    fn packet(f: &[u8]) -> Packet<'_> {
        match decode(f) {
            Decoded::Ip(p) => p,
            Decoded::NotIp => panic!("not IP"),
        }
    }

    /// Pushes `frames` in order; all but the last must be held; returns the last outcome.
    fn push_all(d: &mut Defragmenter, frames: &[Vec<u8>], now: Timestamp) -> FragOutcome {
        let (last, held) = frames.split_last().unwrap();
        for f in held {
            assert_eq!(d.push(f, now), FragOutcome::Held);
        }
        d.push(last, now)
    }

    fn complete(o: FragOutcome) -> (Vec<u8>, Vec<Vec<u8>>) {
        match o {
            FragOutcome::Complete {
                datagram,
                fragments,
            } => (datagram, fragments),
            o => panic!("not complete: {o:?}"),
        }
    }

    #[test]
    fn v4_tcp_three_fragments_in_reverse_order() {
        let data = bytes(100);
        let dgram = v4_tcp(7, &data); // 120 bytes of IP payload
        let frags = [
            frag4(&dgram, 80, 120),
            frag4(&dgram, 40, 80),
            frag4(&dgram, 0, 40),
        ];
        let mut d = Defragmenter::new(cfg());
        let (datagram, fragments) = complete(push_all(&mut d, &frags, T0));
        assert_eq!(datagram, dgram);
        assert_eq!(internet_checksum(&datagram[14..34]), 0);
        assert_eq!(fragments, frags);
        let p = packet(&datagram);
        assert_eq!(p.ports(), (1234, 80));
        assert_eq!(p.payload, &data[..]);
        let s = d.stats();
        assert_eq!((s.fragments, s.completed, s.held_datagrams), (3, 1, 0));
        assert_eq!((d.held_bytes(), s.held_bytes), (0, 0));
        assert_eq!(s.peak_bytes, frags.iter().map(|f| f.len() as u64).sum());
    }

    #[test]
    fn vlan_tags_kept_and_keyed() {
        let data = bytes(64);
        let plain = v4(9, ipproto::UDP, &build::udp(53, 5353, data.len()), &data);
        // 802.1ad outer tag (VID 100) and 802.1Q inner tag (VID 5).
        let tagged = |vid: u8| {
            let mut t = plain[..12].to_vec();
            t.extend_from_slice(&[0x88, 0xa8, 0x00, 100, 0x81, 0x00, 0x00, vid]);
            t.extend_from_slice(&plain[12..]);
            t
        };
        let dgram = tagged(5);
        let frags = [frag4(&dgram, 0, 24), frag4(&dgram, 24, 72)];
        let mut d = Defragmenter::new(cfg());
        // The same datagram on another VLAN is another datagram.
        let other = frag4(&tagged(6), 24, 72);
        assert_eq!(d.push(&other, T0), FragOutcome::Held);
        let (datagram, fragments) = complete(push_all(&mut d, &frags, T0));
        assert_eq!(datagram, dgram);
        assert_eq!(fragments, frags);
        let p = packet(&datagram);
        assert_eq!((p.ports(), p.payload), ((53, 5353), &data[..]));
        assert_eq!(d.stats().held_datagrams, 1);
    }

    #[test]
    fn v6_fragment_header_after_hop_by_hop() {
        let data = bytes(150);
        let dgram = v6(true, ipproto::TCP, &build::tcp(4321, 443, 0x18), &data);
        let frags = [
            frag6(&dgram, 48, 96, 170),
            frag6(&dgram, 48, 0, 48),
            frag6(&dgram, 48, 48, 96),
        ];
        let mut d = Defragmenter::new(cfg());
        let (datagram, fragments) = complete(push_all(&mut d, &frags, T0));
        assert_eq!(datagram, dgram);
        assert_eq!(fragments, frags);
        let p = packet(&datagram);
        assert_eq!((p.proto, p.ports()), (ipproto::TCP, (4321, 443)));
        assert_eq!(p.payload, &data[..]);
        // Without extension headers too.
        let dgram = v6(false, ipproto::UDP, &build::udp(1, 2, data.len()), &data);
        let frags = [frag6(&dgram, 40, 0, 80), frag6(&dgram, 40, 80, 158)];
        assert_eq!(complete(push_all(&mut d, &frags, T0)).0, dgram);
    }

    #[test]
    fn atomic_fragments_and_other_frames_are_not_fragments() {
        let mut d = Defragmenter::new(cfg());
        let mut dont_fragment = v4_tcp(1, b"abc");
        dont_fragment[20] = 0x40;
        assert_eq!(d.push(&dont_fragment, T0), FragOutcome::NotFragment);
        // RFC 6946: offset 0 without M is a whole datagram, and decodes as one.
        let dgram = v6(false, ipproto::UDP, &build::udp(7, 9, 4), b"ping");
        let atomic = frag6(&dgram, 40, 0, 12);
        assert_eq!(d.push(&atomic, T0), FragOutcome::NotFragment);
        let p = packet(&atomic);
        assert_eq!((p.ports(), p.payload), ((7, 9), &b"ping"[..]));
        let mut arp = dgram.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        for f in [&dgram[..], &arp[..], &dgram[..13], &[0u8; 0][..]] {
            assert_eq!(d.push(f, T0), FragOutcome::NotFragment);
        }
        assert_eq!(d.stats(), DefragStats::default());
    }

    #[test]
    fn identical_overlaps_and_retransmissions_are_accepted() {
        let dgram = v4_tcp(3, &bytes(100));
        let (a, b, c) = (
            frag4(&dgram, 0, 48),
            frag4(&dgram, 40, 88),
            frag4(&dgram, 88, 120),
        );
        let mut d = Defragmenter::new(cfg());
        assert_eq!(d.push(&a, T0), FragOutcome::Held);
        assert_eq!(d.push(&b, T0), FragOutcome::Held); // bytes 40..48 again, identical
        let held = d.held_bytes();
        assert_eq!(d.push(&a, T0), FragOutcome::Held); // a retransmission: not stored
        assert_eq!(d.held_bytes(), held);
        let (datagram, fragments) = complete(d.push(&c, T0));
        assert_eq!(datagram, dgram);
        assert_eq!(fragments, [a, b, c]);
        assert_eq!(d.stats().duplicates, 1);
    }

    #[test]
    fn overlap_mismatch_drops_and_poisons_the_datagram() {
        let dgram = v4_tcp(4, &bytes(100));
        let (a, mut b, c) = (
            frag4(&dgram, 0, 48),
            frag4(&dgram, 40, 88),
            frag4(&dgram, 88, 120),
        );
        b[34 + 3] ^= 0xff; // datagram byte 43, also held in `a`
        let mut d = Defragmenter::new(cfg());
        assert_eq!(d.push(&a, T0), FragOutcome::Held);
        let drop = FragOutcome::Drop(DefragDrop::OverlapMismatch);
        assert_eq!(d.push(&b, T0), drop);
        assert_eq!((d.held_bytes(), d.stats().held_datagrams), (0, 0));
        // Later fragments of the datagram are dropped until its timeout...
        let poisoned = FragOutcome::Drop(DefragDrop::Poisoned);
        assert_eq!(d.push(&c, at(29)), poisoned);
        assert_eq!(d.push(&a, at(29)), poisoned);
        // ... then it may start afresh.
        assert_eq!(d.push(&a, at(30)), FragOutcome::Held);
        let s = d.stats();
        assert_eq!((s.overlap_mismatch, s.poisoned, s.timeouts), (1, 2, 0));
        // Differing bytes that overlap nothing are just data.
        let mut d = Defragmenter::new(cfg());
        let mut b2 = frag4(&dgram, 48, 88);
        b2[34] ^= 0xff;
        assert_eq!(d.push(&a, T0), FragOutcome::Held);
        assert_eq!(d.push(&b2, T0), FragOutcome::Held);
    }

    #[test]
    fn first_fragments_must_agree_on_their_headers() {
        let data = bytes(40);
        let tcp = v6(false, ipproto::TCP, &build::tcp(1, 2, 0), &data);
        let mut udp = tcp.clone();
        udp[20] = ipproto::UDP;
        let mut d = Defragmenter::new(cfg());
        assert_eq!(d.push(&frag6(&tcp, 40, 0, 32), T0), FragOutcome::Held);
        // Same bytes, but the receiver would take the other first fragment's protocol.
        assert_eq!(
            d.push(&frag6(&udp, 40, 0, 32), T0),
            FragOutcome::Drop(DefragDrop::OverlapMismatch)
        );
    }

    #[test]
    fn tiny_fragments() {
        let tiny = FragOutcome::Drop(DefragDrop::TinyFragment);
        let dgram = v4_tcp(5, &bytes(100));
        let mut d = Defragmenter::new(cfg());
        // The first fragment must hold the whole TCP header (RFC 1858).
        assert_eq!(d.push(&frag4(&dgram, 0, 16), T0), tiny);
        let dgram = v4_tcp(6, &bytes(100));
        // A TCP fragment at offset 8 would rewrite the header's flags.
        assert_eq!(d.push(&frag4(&dgram, 8, 48), T0), tiny);
        // Small non-last fragments.
        let dgram = v4_tcp(7, &bytes(100));
        let mut strict = Defragmenter::new(DefragConfig {
            min_fragment_payload: 16,
            ..cfg()
        });
        assert_eq!(strict.push(&frag4(&dgram, 24, 32), T0), tiny);
        assert_eq!(d.push(&frag4_raw(&dgram, 24, &[], true), T0), tiny);
        // UDP needs 8 bytes; they suffice.
        let udp = v4(8, ipproto::UDP, &build::udp(1, 2, 40), &bytes(40));
        assert_eq!(d.push(&frag4(&udp, 0, 8), T0), FragOutcome::Held);
        // IPv6: the upper-layer header behind a destination-options header must be in the
        // first fragment (RFC 7112).
        let mut body = vec![ipproto::TCP, 0, 1, 4, 0, 0, 0, 0];
        body.extend_from_slice(&build::tcp(1, 2, 0));
        let dgram = v6(false, 60, &body, &bytes(40));
        assert_eq!(d.push(&frag6(&dgram, 40, 0, 24), T0), tiny);
        assert_eq!(d.stats().tiny_fragment, 4);
    }

    #[test]
    fn malformed_fragments() {
        let bad = FragOutcome::Drop(DefragDrop::Malformed);
        let dgram = v4_tcp(10, &bytes(100));
        let mut d = Defragmenter::new(cfg());
        // A non-last length must be a multiple of 8.
        assert_eq!(d.push(&frag4_raw(&dgram, 0, &dgram[34..78], true), T0), bad);
        // Two different ends.
        let dgram = v4_tcp(11, &bytes(100));
        assert_eq!(d.push(&frag4(&dgram, 80, 120), T0), FragOutcome::Held);
        assert_eq!(
            d.push(&frag4_raw(&dgram, 80, &dgram[114..146], false), T0),
            bad
        );
        // Past the known end.
        let dgram = v4_tcp(12, &bytes(100));
        assert_eq!(d.push(&frag4(&dgram, 80, 120), T0), FragOutcome::Held);
        assert_eq!(d.push(&frag4_raw(&dgram, 112, &[0; 16], true), T0), bad);
        // An end before data already held.
        let dgram = v4_tcp(13, &bytes(100));
        assert_eq!(d.push(&frag4(&dgram, 48, 96), T0), FragOutcome::Held);
        assert_eq!(
            d.push(&frag4_raw(&dgram, 40, &dgram[74..122], false), T0),
            bad
        );
        // An IPv4 total length past the frame.
        let mut long = frag4(&v4_tcp(14, &bytes(100)), 0, 48);
        long[17] += 1;
        assert_eq!(d.push(&long, T0), bad);
        // A truncated IPv6 Fragment header.
        let v6f = frag6(
            &v6(false, ipproto::UDP, &build::udp(1, 2, 40), &bytes(40)),
            40,
            0,
            24,
        );
        assert_eq!(d.push(&v6f[..58], T0), bad);
        assert_eq!(d.stats().malformed, 6);
        assert_eq!(d.held_bytes(), 0);
    }

    #[test]
    fn datagrams_over_65535_bytes_are_too_large() {
        let too_large = FragOutcome::Drop(DefragDrop::TooLarge);
        // Exactly 65535 bytes of IPv4 datagram: 45 fragments.
        let data = bytes(65_535 - 28);
        let dgram = v4(20, ipproto::UDP, &build::udp(9, 10, data.len()), &data);
        let frags: Vec<Vec<u8>> = (0..65_515)
            .step_by(1480)
            .map(|lo| frag4(&dgram, lo, (lo + 1480).min(65_515)))
            .collect();
        let mut d = Defragmenter::new(cfg());
        let (datagram, fragments) = complete(push_all(&mut d, &frags, T0));
        assert_eq!((datagram.len(), fragments.len()), (14 + 65_535, 45));
        assert_eq!(packet(&datagram).payload, &data[..]);
        // One byte more.
        let dgram = v4(21, ipproto::UDP, &build::udp(9, 10, 0), &[]);
        assert_eq!(
            d.push(&frag4_raw(&dgram, 65_512, &[0; 24], false), T0),
            too_large
        );
        // The first fragment's header counts: 24 bytes with options, and data up to 65512.
        let plain = v4(22, ipproto::UDP, &build::udp(9, 10, 0), &[]);
        let last = frag4_raw(&plain, 65_504, &[0; 8], false);
        assert_eq!(d.push(&last, T0), FragOutcome::Held);
        let mut opts = plain.clone();
        opts[14] = 0x46;
        opts.splice(34..34, [1, 1, 1, 0]); // NOP, NOP, NOP, end of options
        let first = frag4_raw(&opts, 0, &build::udp(9, 10, 0), true);
        assert_eq!(d.push(&first, T0), too_large);
        // IPv6: the payload (extension headers included) is limited to 65535.
        let dgram = v6(true, ipproto::UDP, &build::udp(1, 2, 0), &[]);
        assert_eq!(
            d.push(&frag6_raw(&dgram, 48, 65_520, &[0; 8], false), T0),
            too_large
        );
        let last = frag6_raw(&dgram, 40, 65_520, &[0; 8], false);
        assert_eq!(d.push(&last, at(60)), FragOutcome::Held);
        assert_eq!(d.stats().too_large, 3);
    }

    #[test]
    fn too_many_fragments() {
        let dgram = v4_tcp(30, &bytes(100));
        let mut d = Defragmenter::new(DefragConfig {
            max_fragments_per_datagram: 4,
            ..cfg()
        });
        let frags: Vec<Vec<u8>> = [0, 24, 32, 40, 48]
            .windows(2)
            .map(|w| frag4(&dgram, w[0], w[1]))
            .collect();
        for f in &frags {
            assert_eq!(d.push(f, T0), FragOutcome::Held);
        }
        assert_eq!(
            d.push(&frag4(&dgram, 48, 56), T0),
            FragOutcome::Drop(DefragDrop::TooManyFragments)
        );
        assert_eq!(d.held_bytes(), 0);
    }

    #[test]
    fn full_table_fails_closed() {
        let mut d = Defragmenter::new(DefragConfig {
            max_datagrams: 4,
            ..cfg()
        });
        let dgrams: Vec<Vec<u8>> = (0..5).map(|id| v4_tcp(id, &bytes(100))).collect();
        for g in &dgrams[..4] {
            assert_eq!(d.push(&frag4(g, 0, 64), T0), FragOutcome::Held);
        }
        let newcomer = frag4(&dgrams[4], 0, 64);
        assert_eq!(
            d.push(&newcomer, T0),
            FragOutcome::Drop(DefragDrop::TableFull)
        );
        // The held datagrams are untouched: one completes and makes room.
        complete(d.push(&frag4(&dgrams[0], 64, 120), T0));
        assert_eq!(d.push(&newcomer, T0), FragOutcome::Held);
        let late = frag4(&v4_tcp(9, &bytes(100)), 0, 64);
        assert_eq!(d.push(&late, T0), FragOutcome::Drop(DefragDrop::TableFull));
        // Timeouts make room too.
        assert_eq!(d.push(&late, at(30)), FragOutcome::Held);
        let s = d.stats();
        assert_eq!((s.table_full, s.timeouts, s.held_datagrams), (2, 4, 1));
    }

    #[test]
    fn memory_limit() {
        let dgram = v4_tcp(40, &bytes(100));
        let frags = [
            frag4(&dgram, 0, 48),
            frag4(&dgram, 48, 96),
            frag4(&dgram, 96, 120),
        ];
        let mut d = Defragmenter::new(DefragConfig {
            max_bytes: frags[0].len() + frags[1].len() + 10,
            ..cfg()
        });
        assert_eq!(d.push(&frags[0], T0), FragOutcome::Held);
        assert_eq!(d.push(&frags[1], T0), FragOutcome::Held);
        assert_eq!(
            d.push(&frags[2], T0),
            FragOutcome::Drop(DefragDrop::MemoryLimit)
        );
        assert_eq!(d.held_bytes(), 0);
        assert_eq!(
            d.stats().peak_bytes,
            (frags[0].len() + frags[1].len()) as u64
        );
    }

    #[test]
    fn timeouts() {
        let v4d = v4_tcp(50, &bytes(100));
        let v6d = v6(false, ipproto::UDP, &build::udp(1, 2, 40), &bytes(40));
        let mut d = Defragmenter::new(cfg());
        assert_eq!(d.push(&frag4(&v4d, 0, 48), T0), FragOutcome::Held);
        assert_eq!(d.push(&frag6(&v6d, 40, 0, 24), T0), FragOutcome::Held);
        d.expire(at(29));
        assert_eq!(d.stats().held_datagrams, 2);
        d.expire(at(30)); // IPv4: 30 s
        assert_eq!((d.stats().held_datagrams, d.stats().timeouts), (1, 1));
        // Lazily in push: the late fragment starts a new datagram.
        assert_eq!(d.push(&frag6(&v6d, 40, 24, 48), at(60)), FragOutcome::Held);
        let s = d.stats();
        assert_eq!((s.held_datagrams, s.timeouts), (1, 2));
        assert_eq!(d.held_bytes(), frag6(&v6d, 40, 24, 48).len());
    }

    /// Checks the bookkeeping against the table.
    fn consistent(d: &Defragmenter) {
        let live: Vec<&Datagram> = d
            .slots
            .iter()
            .filter_map(|e| match &e.as_ref()?.state {
                State::Live(g) => Some(g),
                State::Poisoned => None,
            })
            .collect();
        let bytes: usize = live.iter().map(|g| g.bytes).sum();
        let frames: usize = live
            .iter()
            .flat_map(|g| &g.frags)
            .map(|f| f.frame.len())
            .sum();
        assert_eq!((bytes, frames), (d.held_bytes(), d.held_bytes()));
        assert_eq!(live.len() as u64, d.stats().held_datagrams);
        assert!(live.len() <= d.cfg.max_datagrams && d.held_bytes() <= d.cfg.max_bytes);
        assert!(live
            .iter()
            .all(|g| g.frags.len() <= d.cfg.max_fragments_per_datagram));
    }

    fn forwarding() -> DefragConfig {
        DefragConfig::forwarding(cfg().key)
    }

    #[test]
    fn forward_mode_forwards_all_but_the_completing_fragment() {
        let dgram = v4_tcp(11, &bytes(100));
        let frags = [
            frag4(&dgram, 0, 40),
            frag4(&dgram, 80, 120),
            frag4(&dgram, 40, 80),
        ];
        let mut d = Defragmenter::new(forwarding());
        assert_eq!(d.push(&frags[0], T0), FragOutcome::Forward);
        assert_eq!(d.push(&frags[1], T0), FragOutcome::Forward);
        // A repeat of a kept fragment goes on too (the receiver may have lost it).
        assert_eq!(d.push(&frags[1], T0), FragOutcome::Forward);
        let (datagram, _) = complete(d.push(&frags[2], T0));
        assert_eq!(datagram, dgram);
        // Passed: nothing is remembered, the identity may start a new datagram.
        assert_eq!(d.push(&frags[0], at(1)), FragOutcome::Forward);
        assert_eq!(d.stats().duplicates, 1);
    }

    #[test]
    fn forward_mode_blocks_a_failed_datagram_until_receivers_forget_it() {
        let dgram = v4_tcp(12, &bytes(100));
        let (a, b) = (frag4(&dgram, 0, 64), frag4(&dgram, 64, 120));
        let mut d = Defragmenter::new(forwarding());
        assert!(!d.block_completed(T0), "nothing completed yet");
        assert_eq!(d.push(&a, T0), FragOutcome::Forward);
        complete(d.push(&b, T0));
        // The rules dropped it: the receiver holds `a`, so a resent `b` must not pass, nor a
        // new `a`, for longer than any receiver keeps `a` (Linux 30 s, RFC 8200 60 s).
        assert!(d.block_completed(T0));
        assert!(!d.block_completed(T0), "only once per completion");
        let poisoned = FragOutcome::Drop(DefragDrop::Poisoned);
        assert_eq!(d.push(&b, at(1)), poisoned);
        assert_eq!(d.push(&a, at(60)), poisoned);
        assert_eq!(d.push(&b, at(89)), poisoned);
        assert_eq!(d.push(&a, at(90)), FragOutcome::Forward);
        // Partial datagrams also outlast the receivers: `b` alone 70 s after `a` would
        // complete a receiver's datagram if Ally had forgotten `a`.
        let mut d = Defragmenter::new(forwarding());
        assert_eq!(d.push(&a, T0), FragOutcome::Forward);
        complete(d.push(&b, at(70)));
    }

    #[test]
    fn forward_mode_never_evicts_a_poisoned_identity() {
        // Every slot of the (8-slot) table poisoned: a new datagram is refused rather than
        // taking a poisoned slot, whose resent fragments would then pass.
        let mut d = Defragmenter::new(DefragConfig {
            max_datagrams: 4,
            ..forwarding()
        });
        let mut poisoned = Vec::new();
        for id in 0..100u16 {
            let g = v4_tcp(id, &bytes(100));
            let (a, mut b) = (frag4(&g, 0, 48), frag4(&g, 40, 88));
            b[34 + 3] ^= 0xff;
            match d.push(&a, T0) {
                FragOutcome::Forward => {}
                FragOutcome::Drop(DefragDrop::TableFull) => break,
                o => panic!("{o:?}"),
            }
            assert_eq!(
                d.push(&b, T0),
                FragOutcome::Drop(DefragDrop::OverlapMismatch)
            );
            poisoned.push(a);
        }
        assert_eq!(poisoned.len(), 8, "the table has 8 slots");
        for a in &poisoned {
            assert_eq!(d.push(a, at(1)), FragOutcome::Drop(DefragDrop::Poisoned));
        }
        // In hold mode the oldest poisoned identity gives way (nothing of it was forwarded).
        let mut h = Defragmenter::new(DefragConfig {
            max_datagrams: 4,
            ..cfg()
        });
        for id in 0..9u16 {
            let g = v4_tcp(id, &bytes(100));
            let (a, mut b) = (frag4(&g, 0, 48), frag4(&g, 40, 88));
            b[34 + 3] ^= 0xff;
            assert_eq!(h.push(&a, T0), FragOutcome::Held, "datagram {id}");
            assert_eq!(
                h.push(&b, T0),
                FragOutcome::Drop(DefragDrop::OverlapMismatch)
            );
        }
    }

    #[test]
    fn heap_bound_covers_the_default_tables() {
        let b = forwarding().heap_bound();
        assert!(
            b >= (1 << 20) + 512 * core::mem::size_of::<Option<Entry>>(),
            "{b}"
        );
        assert!(b < 4 << 20, "{b}");
    }

    #[test]
    fn garbled_fragments_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut frags = Vec::new();
        for id in 0..4u16 {
            let data = bytes(200 + usize::from(id) * 8);
            let g = v4_tcp(id, &data);
            let cuts = [0, 64, 128, g.len() - 34];
            frags.extend(cuts.windows(2).map(|w| frag4(&g, w[0], w[1])));
            let g = v6(
                id % 2 == 0,
                ipproto::UDP,
                &build::udp(1, 2, data.len()),
                &data,
            );
            let unfrag = if id % 2 == 0 { 48 } else { 40 };
            let cuts = [0, 64, 128, g.len() - 14 - unfrag];
            frags.extend(cuts.windows(2).map(|w| frag6(&g, unfrag, w[0], w[1])));
        }
        let mut d = Defragmenter::new(DefragConfig {
            max_datagrams: 6,
            max_bytes: 1000,
            max_fragments_per_datagram: 3,
            ..cfg()
        });
        let mut now = T0.0;
        let mut completed = 0;
        for _ in 0..20_000 {
            let mut f = frags[rand() as usize % frags.len()].clone();
            match rand() % 4 {
                0 => {}
                1 => f.truncate(rand() as usize % (f.len() + 1)),
                _ => {
                    for _ in 0..=rand() % 4 {
                        let i = 12 + rand() as usize % (f.len() - 12);
                        f[i] = rand() as u8;
                    }
                }
            }
            now += rand() % (2 * SEC);
            if let FragOutcome::Complete { datagram, .. } = d.push(&f, Timestamp(now)) {
                completed += 1;
                assert!(matches!(decode(&datagram), Decoded::Ip(_)));
            }
            consistent(&d);
            if rand() % 500 == 0 {
                d.expire(Timestamp(now));
                consistent(&d);
            }
        }
        assert!(completed > 0);
        let s = d.stats();
        let reasons = [
            s.overlap_mismatch,
            s.malformed,
            s.table_full,
            s.memory_limit,
        ];
        assert!(s.timeouts > 0 && reasons.iter().all(|&n| n > 0), "{s:?}");
    }
}
