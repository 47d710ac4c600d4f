//! Random segment schedules against a model receiver: whatever order, duplication, overlap
//! and size the sender's segments come in, the receiver never reassembles a forbidden string
//! from the segments the engine forwards, and a stream without it gets through whole once the
//! sender retransmits what was dropped.
//!
//! The receiver keeps out-of-order segments (as Linux does) and delivers bytes in sequence
//! order; the sender's bytes are consistent (overlaps repeat the same bytes), so its
//! reassembly policy does not matter. The sender retransmits everything in order at the end,
//! as its recovery would after the drops.

use std::collections::BTreeMap;

use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, Direction, Engine, EngineConfig, Inspector, Timestamp, Verdict,
};

mod support;
use support::{handshake, seg, Collect, Rng, ACK, CISN, PSH_ACK, SISN};

const MARKER: &[u8] = b"FORBIDDEN-MARKER";

/// A receiver: out-of-order segments kept, bytes delivered in order. `last_wins`: a pending
/// segment at the same offset is replaced by a newer one (else the first is kept).
#[derive(Default)]
struct Receiver {
    delivered: Vec<u8>,
    pending: BTreeMap<usize, Vec<u8>>,
    last_wins: bool,
}

impl Receiver {
    /// A segment carrying the stream's bytes from offset `at`.
    fn take(&mut self, at: usize, data: &[u8]) {
        if self.last_wins || !self.pending.contains_key(&at) {
            self.pending.insert(at, data.to_vec());
        }
        while let Some((&at, _)) = self.pending.first_key_value() {
            let have = self.delivered.len();
            if at > have {
                break;
            }
            let (at, d) = self.pending.pop_first().unwrap();
            if at + d.len() > have {
                self.delivered.extend_from_slice(&d[have - at..]);
            }
        }
    }
}

/// The segments of `stream`: random cuts, then reordering, duplicates and overlapping
/// retransmissions; each is (offset, length).
fn schedule(rng: &mut Rng, len: usize) -> Vec<(usize, usize)> {
    let max = [1, 3, 16, 200, 1400][rng.below(5)];
    let mut segs = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (rng.below(max) + 1).min(len - at);
        segs.push((at, n));
        at += n;
    }
    let k = segs.len();
    for _ in 0..rng.below(k / 2 + 2) {
        match rng.below(3) {
            // Swap two segments.
            0 => {
                let (a, b) = (rng.below(k), rng.below(k));
                segs.swap(a, b);
            }
            // A duplicate, later.
            1 => {
                let s = segs[rng.below(segs.len())];
                let to = rng.below(segs.len() + 1);
                segs.insert(to, s);
            }
            // An overlapping retransmission of some range.
            _ => {
                let a = rng.below(len);
                let n = (rng.below(max * 2) + 1).min(len - a);
                let to = rng.below(segs.len() + 1);
                segs.insert(to, (a, n));
            }
        }
    }
    segs
}

fn engine() -> Engine {
    engine_holding(false)
}

/// The engine, holding out-of-order segments (`hold`) or dropping them.
fn engine_holding(hold: bool) -> Engine {
    let rules =
        "drop tcp any any -> any any (msg:\"marker\"; content:\"FORBIDDEN-MARKER\"; sid:1;)\n";
    let p = parse_rules(rules, &Vars::snort_defaults());
    Engine::new(
        p.rules,
        EngineConfig {
            stream: Some(ally_dpi::engine::StreamConfig {
                hold_out_of_order: hold,
                ..engine_stream_config()
            }),
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

/// Runs one schedule (then the in-order retransmission of the whole stream in `tail`-byte
/// segments): what the receiver assembled, and whether the engine blocked the flow.
fn run(stream: &[u8], segs: &[(usize, usize)], tail: usize) -> (Vec<u8>, bool) {
    let all: Vec<(usize, usize, bool)> = segs.iter().map(|&(a, n)| (a, n, false)).collect();
    let (got, _, blocked) = run_mixed(stream, stream, &all, tail);
    (got, blocked)
}

/// [`run`] where each segment carries the bytes of `a` or, where its flag is set, of `b`
/// (the same length): what a first-wins and a last-wins receiver assembled, and whether the
/// engine blocked the flow.
fn run_mixed(
    a: &[u8],
    b: &[u8],
    segs: &[(usize, usize, bool)],
    tail: usize,
) -> (Vec<u8>, Vec<u8>, bool) {
    let stream = a;
    let mut e = engine();
    let mut c = Collect::default();
    handshake(&mut e, &mut c);
    let mut rx = Receiver::default();
    let mut rx_last = Receiver {
        last_wins: true,
        ..Receiver::default()
    };
    let mut blocked = false;
    let retransmit: Vec<(usize, usize, bool)> = (0..stream.len())
        .step_by(tail)
        .map(|a| (a, tail.min(stream.len() - a), false))
        .collect();
    for &(at, n, alt) in segs.iter().chain(&retransmit) {
        let data = if alt { &b[at..at + n] } else { &a[at..at + n] };
        let f = seg(true, PSH_ACK, CISN + 1 + at as u32, SISN + 1, data);
        match e.inspect(&f, Direction::ToWire, Timestamp(2), &mut c) {
            Verdict::Drop => blocked |= !c.alerts.is_empty(),
            _ => {
                rx.take(at, data);
                rx_last.take(at, data);
            }
        }
        // The receiver acknowledges what it has, so the window moves on.
        acknowledge(&mut e, &mut c, rx.delivered.len());
    }
    (rx.delivered, rx_last.delivered, blocked)
}

/// The receiver acknowledges the `delivered` bytes it has, so the window moves on.
fn acknowledge(e: &mut Engine, c: &mut Collect, delivered: usize) {
    let ack = seg(false, ACK, SISN + 1, CISN + 1 + delivered as u32, b"");
    e.inspect(&ack, Direction::FromWire, Timestamp(2), c);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_schedule_gets_the_marker_to_the_receiver() {
    let mut rng = Rng(0x51af_d7ed_558c_cd11);
    for round in 0..200 {
        let len = 200 + rng.below(6000);
        let mut stream: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
        let with_marker = rng.below(3) != 0;
        if with_marker {
            let at = rng.below(len - MARKER.len());
            stream[at..at + MARKER.len()].copy_from_slice(MARKER);
        }
        let segs = schedule(&mut rng, len);
        let tail = [1, 50, 1400][rng.below(3)];
        let (got, blocked) = run(&stream, &segs, tail);
        let label = format!(
            "round {round}: {} segments, {len} bytes, marker {with_marker}",
            segs.len()
        );
        if with_marker {
            assert!(blocked, "{label}: not blocked");
            assert!(
                !contains(&got, MARKER),
                "{label}: the receiver assembled the marker"
            );
        } else {
            assert!(!blocked, "{label}: blocked");
            assert_eq!(got, stream, "{label}: the receiver did not get the stream");
        }
    }
}

/// Overlaps whose bytes differ: each segment carries the benign stream's bytes or those of a
/// copy with the marker, so a receiver that keeps the first or the last copy of a range could
/// assemble the marker from pieces the engine saw apart. The engine drops any segment whose
/// bytes differ from bytes it already accepted, so neither receiver ever assembles it.
#[test]
fn no_mix_of_differing_overlaps_gets_the_marker_to_the_receiver() {
    let mut rng = Rng(0x94d0_49bb_1331_11eb);
    for round in 0..200 {
        let len = 200 + rng.below(3000);
        let a: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
        let mut b = a.clone();
        let at = rng.below(len - MARKER.len());
        b[at..at + MARKER.len()].copy_from_slice(MARKER);
        let segs: Vec<(usize, usize, bool)> = schedule(&mut rng, len)
            .into_iter()
            .map(|(s, n)| (s, n, rng.below(2) == 0))
            .collect();
        let tail = [1, 50, 1400][rng.below(3)];
        let (first, last, blocked) = run_mixed(&a, &b, &segs, tail);
        let label = format!(
            "round {round}: {} segments, {len} bytes, blocked {blocked}",
            segs.len()
        );
        assert!(
            !contains(&first, MARKER),
            "{label}: a first-wins receiver assembled the marker"
        );
        assert!(
            !contains(&last, MARKER),
            "{label}: a last-wins receiver assembled the marker"
        );
    }
}

/// With out-of-order segments held (the boot configuration), a schedule of a clean stream
/// that stays within the hold bounds gets through whole without any retransmission (the held
/// segments are forwarded once their gaps fill); past the bounds (many tiny segments) the
/// sender's retransmission completes it; a stream with the marker never reaches the receiver
/// whole.
#[test]
fn holding_delivers_every_schedule_without_retransmission() {
    let mut rng = Rng(0x3c6e_f372_fe94_f82b);
    let mut whole_without_resend = 0;
    for round in 0..200 {
        let len = 200 + rng.below(6000);
        let mut stream: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
        let with_marker = rng.below(3) == 0;
        if with_marker {
            let at = rng.below(len - MARKER.len());
            stream[at..at + MARKER.len()].copy_from_slice(MARKER);
        }
        let segs = schedule(&mut rng, len);
        let mut e = engine_holding(true);
        let mut c = Collect::default();
        handshake(&mut e, &mut c);
        let mut rx = Receiver::default();
        let (mut held, mut dropped, mut blocked) = (0, 0, false);
        let resend: Vec<(usize, usize)> = (0..len)
            .step_by(1400)
            .map(|a| (a, 1400.min(len - a)))
            .collect();
        for (k, &(at, n)) in segs.iter().chain(&resend).enumerate() {
            if k == segs.len() && !with_marker && dropped == 0 {
                // Everything sent once, nothing dropped: the receiver has it all.
                assert_eq!(
                    rx.delivered, stream,
                    "round {round}: not whole before the resend"
                );
                whole_without_resend += 1;
            }
            let data = &stream[at..at + n];
            let f = seg(true, PSH_ACK, CISN + 1 + at as u32, SISN + 1, data);
            match e.inspect(&f, Direction::ToWire, Timestamp(2), &mut c) {
                Verdict::Drop => {
                    dropped += 1;
                    blocked |= !c.alerts.is_empty();
                }
                Verdict::Hold => held += 1,
                _ => rx.take(at, data),
            }
            // What the gap released: the frames as they came, in order.
            while let Some(r) = e.take_forward(Direction::ToWire) {
                let seq = u32::from_be_bytes(r[38..42].try_into().unwrap());
                let at = seq.wrapping_sub(CISN + 1) as usize;
                rx.take(at, &r[54..]);
            }
            assert!(e.take_forward(Direction::FromWire).is_none());
            acknowledge(&mut e, &mut c, rx.delivered.len());
        }
        let label = format!(
            "round {round}: {} segments, {len} bytes, marker {with_marker}, {held} held, {dropped} dropped",
            segs.len()
        );
        if with_marker {
            assert!(blocked, "{label}: not blocked");
            assert!(
                !contains(&rx.delivered, MARKER),
                "{label}: the receiver assembled the marker"
            );
        } else {
            assert!(!blocked, "{label}: blocked");
            assert_eq!(
                rx.delivered, stream,
                "{label}: the receiver did not get the stream"
            );
        }
        assert_eq!(e.stats().held, held as u64, "{label}");
    }
    assert!(whole_without_resend > 60, "{whole_without_resend}");
}
