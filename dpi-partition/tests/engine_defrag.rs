//! IP fragments through the engine with its reassembler in forward mode
//! (`EngineConfig::defrag`): every fragment but the completing one is forwarded at once, and
//! the completing one carries the whole datagram's verdict.

use ally_dpi::engine::packet::internet_checksum;
use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, DefragConfig, Direction, Engine, EngineConfig, Inspector, Timestamp,
    Verdict,
};

const KEY: [u64; 2] = [0x1111_2222_3333_4444, 0x5555_6666_7777_8888];
const MARKER: &[u8] = b"ALLY-FRAGMENTED-SECRET";

/// An IPv4 10.0.0.1 -> 10.0.0.2 frame carrying `ip_payload` (the datagram's bytes from
/// `offset`), with identification `id` and the MF bit `more`.
fn frame(proto: u8, id: u16, offset: usize, more: bool, ip_payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0];
    f.extend_from_slice(&((20 + ip_payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    f.extend_from_slice(&field.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let sum = internet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(ip_payload);
    f
}

/// A UDP datagram 4000 -> 9999 (header and data: the IP payload).
fn udp(data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&4000u16.to_be_bytes());
    u.extend_from_slice(&9999u16.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// The fragments of an IP payload cut at the given offsets (multiples of 8).
fn fragments(proto: u8, id: u16, payload: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut edges = vec![0];
    edges.extend_from_slice(cuts);
    edges.push(payload.len());
    edges
        .windows(2)
        .map(|w| frame(proto, id, w[0], w[1] < payload.len(), &payload[w[0]..w[1]]))
        .collect()
}

/// `filler` bytes, the marker, more filler: the marker starts at data byte `at`.
fn data_with_marker(at: usize, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    d[at..at + MARKER.len()].copy_from_slice(MARKER);
    d
}

mod support;
use support::Collect;

fn engine(rules: &str, defrag: bool) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    let cfg = EngineConfig {
        stream: Some(engine_stream_config()),
        defrag: defrag.then(|| DefragConfig::forwarding(KEY)),
        ..EngineConfig::default()
    };
    Engine::new(p.rules, cfg).unwrap()
}

const UDP_DROP: &str =
    "drop udp any any -> any 9999 (msg:\"fragmented secret\"; content:\"ALLY-FRAGMENTED-SECRET\"; sid:1;)";

fn verdicts(e: &mut Engine, frames: &[Vec<u8>], secs: u64, c: &mut Collect) -> Vec<Verdict> {
    frames
        .iter()
        .map(|f| e.inspect(f, Direction::ToWire, Timestamp(1 + secs * 1_000_000), c))
        .collect()
}

#[test]
fn a_marker_split_over_udp_fragments_is_dropped_with_the_completing_fragment() {
    // Marker across the cut at 504 (data byte 496 = payload byte 504 minus the UDP header).
    let payload = udp(&data_with_marker(490, 1400));
    let frags = fragments(17, 7, &payload, &[504, 1008]);
    // Without reassembly each fragment passes: the evasion.
    let mut c = Collect::default();
    let mut plain = engine(UDP_DROP, false);
    assert_eq!(verdicts(&mut plain, &frags, 0, &mut c), [Verdict::Pass; 3]);
    let mut e = engine(UDP_DROP, true);
    assert_eq!(
        verdicts(&mut e, &frags, 0, &mut c),
        [Verdict::Pass, Verdict::Pass, Verdict::Drop]
    );
    assert_eq!(c.sids(), [1]);
    // The receiver holds the first two: the completing one resent, or the whole datagram
    // resent, gets nowhere while a receiver could still reassemble it.
    assert_eq!(verdicts(&mut e, &frags[2..], 10, &mut c), [Verdict::Drop]);
    assert_eq!(verdicts(&mut e, &frags, 89, &mut c), [Verdict::Drop; 3]);
    let s = e.stats();
    assert_eq!(
        (s.frag_forwarded, s.frag_dropped, s.frag_unblocked),
        (2, 4, 0)
    );
    assert_eq!(e.defrag_stats().completed, 1);
}

#[test]
fn fragments_arriving_in_any_order_are_judged_when_whole() {
    let payload = udp(&data_with_marker(1000, 1400));
    let mut frags = fragments(17, 8, &payload, &[504, 1008]);
    frags.reverse(); // the marker's fragment (no UDP header, no ports) first
    let mut e = engine(UDP_DROP, true);
    let mut c = Collect::default();
    assert_eq!(
        verdicts(&mut e, &frags, 0, &mut c),
        [Verdict::Pass, Verdict::Pass, Verdict::Drop]
    );
}

#[test]
fn clean_fragmented_datagrams_pass_whole() {
    let payload = udp(&data_with_marker(10, 3000)
        .iter()
        .map(|b| b.to_ascii_uppercase() ^ 0x20)
        .collect::<Vec<_>>());
    let frags = fragments(17, 9, &payload, &[1480, 2960]);
    let mut e = engine(UDP_DROP, true);
    let mut c = Collect::default();
    assert_eq!(verdicts(&mut e, &frags, 0, &mut c), [Verdict::Pass; 3]);
    assert!(c.alerts.is_empty());
    assert_eq!(e.defrag_stats().completed, 1);
}

#[test]
fn conflicting_overlaps_are_dropped_and_poison_the_datagram() {
    let payload = udp(&data_with_marker(100, 1400));
    let frags = fragments(17, 10, &payload, &[504, 1008]);
    // An overlap over bytes 496..504 with different bytes.
    let mut bad = payload[496..1008].to_vec();
    bad[0] ^= 0xff;
    let overlap = frame(17, 10, 496, true, &bad);
    let mut e = engine(UDP_DROP, true);
    let mut c = Collect::default();
    assert_eq!(verdicts(&mut e, &frags[..1], 0, &mut c), [Verdict::Pass]);
    assert_eq!(verdicts(&mut e, &[overlap], 0, &mut c), [Verdict::Drop]);
    assert_eq!(
        verdicts(&mut e, &frags[1..], 0, &mut c),
        [Verdict::Drop, Verdict::Drop]
    );
}

#[test]
fn a_tcp_segment_in_fragments_goes_through_the_stream_tracker_whole() {
    let rules = "drop tcp any any -> any any (content:\"ALLY-FRAGMENTED-SECRET\"; sid:2;)";
    // A mid-stream segment (no handshake seen: picked up) carrying the marker across the cut.
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&4000u16.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes());
    tcp.extend_from_slice(&5000u32.to_be_bytes());
    tcp.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(&data_with_marker(40, 200));
    let frags = fragments(6, 11, &tcp, &[64]);
    let mut e = engine(rules, true);
    let mut c = Collect::default();
    assert_eq!(
        verdicts(&mut e, &frags, 0, &mut c),
        [Verdict::Pass, Verdict::Drop]
    );
    assert_eq!(c.sids(), [2]);
    // Without reassembly, TCP in fragments is refused by the stream tracker.
    let mut plain = engine(rules, false);
    assert_eq!(verdicts(&mut plain, &frags, 0, &mut c), [Verdict::Drop; 2]);
}

/// A receiver's reassembly of one identification: every byte from the fragments it got, the
/// first or the last copy of a byte kept; when the last fragment came and no byte is missing
/// the datagram is delivered and the next fragment starts a new one.
struct Reassembly {
    bytes: Vec<Option<u8>>,
    total: Option<usize>,
    last_wins: bool,
    delivered: Vec<Vec<u8>>,
}

impl Reassembly {
    fn new(last_wins: bool) -> Self {
        Reassembly {
            bytes: Vec::new(),
            total: None,
            last_wins,
            delivered: Vec::new(),
        }
    }

    fn take(&mut self, offset: usize, more: bool, data: &[u8]) {
        if self.bytes.len() < offset + data.len() {
            self.bytes.resize(offset + data.len(), None);
        }
        for (i, &b) in data.iter().enumerate() {
            let slot = &mut self.bytes[offset + i];
            if self.last_wins || slot.is_none() {
                *slot = Some(b);
            }
        }
        if !more {
            self.total = Some(offset + data.len());
        }
        if let Some(d) = self.datagram() {
            self.delivered.push(d);
            self.bytes.clear();
            self.total = None;
        }
    }

    fn datagram(&self) -> Option<Vec<u8>> {
        let total = self.total?;
        self.bytes.get(..total)?.iter().copied().collect()
    }
}

/// Random fragment schedules of one UDP datagram against first-wins and last-wins receivers:
/// cuts on 8-byte boundaries, reordering, duplicates, and overlapping fragments that carry
/// either the benign bytes or a copy with the marker. Whatever the engine forwards, no
/// receiver reassembles a datagram holding the marker (and with reassembly off, one does).
#[test]
fn no_fragment_schedule_gets_the_marker_to_the_receiver() {
    let mut x = 0x6a09_e667_f3bc_c909u64;
    let mut below = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut leaked_without_reassembly = 0;
    for round in 0..300 {
        let len = 64 + below(1500);
        let clean: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let at = below(len - MARKER.len());
        let mut marked = clean.clone();
        marked[at..at + MARKER.len()].copy_from_slice(MARKER);
        // The marker always on the wire in full: either datagram may be the one completed.
        let (a, b) = (udp(&clean), udp(&marked));
        let total = a.len();
        let unit = [8, 16, 64, 512][below(4)];
        let mut frags: Vec<(usize, usize, bool)> = Vec::new();
        let mut off = 0;
        while off < total {
            let n = (8 * (below(unit / 8) + 1)).min(total - off);
            frags.push((off, n, below(2) == 0));
            off += n;
        }
        for _ in 0..below(frags.len() + 2) {
            let k = frags.len();
            match below(3) {
                0 => frags.swap(below(k), below(k)),
                1 => {
                    let f = frags[below(k)];
                    frags.insert(below(k + 1), (f.0, f.1, !f.2));
                }
                _ => {
                    let o = 8 * below(total / 8);
                    let n = (8 * (below(unit / 8) + 1)).min(total - o);
                    frags.insert(below(k + 1), (o, n, below(2) == 0));
                }
            }
        }
        for reassembly in [true, false] {
            let mut e = engine(UDP_DROP, reassembly);
            let mut c = Collect::default();
            let mut rx = [Reassembly::new(false), Reassembly::new(true)];
            for (i, &(o, n, alt)) in frags.iter().enumerate() {
                let src = if alt { &b } else { &a };
                let more = o + n < total;
                let f = frame(17, 77, o, more, &src[o..o + n]);
                let v = e.inspect(&f, Direction::ToWire, Timestamp(1 + i as u64), &mut c);
                if v != Verdict::Drop {
                    for r in &mut rx {
                        r.take(o, more, &src[o..o + n]);
                    }
                }
            }
            for (r, policy) in rx.iter().zip(["first-wins", "last-wins"]) {
                let leaked = r
                    .delivered
                    .iter()
                    .any(|d| d.windows(MARKER.len()).any(|w| w == MARKER));
                if reassembly {
                    assert!(
                        !leaked,
                        "round {round}: a {policy} receiver reassembled the marker from {frags:?}"
                    );
                } else {
                    leaked_without_reassembly += usize::from(leaked);
                }
            }
        }
    }
    assert!(leaked_without_reassembly > 0);
}
