//! Rules across TCP segment boundaries: the engine with its inline stream tracker
//! (`EngineConfig::stream`), no-hold mode.

use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{
    engine_stream_config, Direction, Engine, EngineConfig, Inspector, StreamDrop, Timestamp,
    Verdict,
};

/// Client data at stream offset `off` (0 = first byte after the SYN).
fn cdata(off: u32, payload: &[u8]) -> Vec<u8> {
    seg(true, PSH_ACK, CISN + 1 + off, SISN + 1, payload)
}

mod support;
use support::{seg, Collect, ACK, CISN, PSH_ACK, RST, SISN, SYN};

fn engine(rules: &str) -> Engine {
    let p = parse_rules(rules, &Vars::snort_defaults());
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected);
    let cfg = EngineConfig {
        stream: Some(engine_stream_config()),
        ..EngineConfig::default()
    };
    Engine::new(p.rules, cfg).unwrap()
}

fn run(e: &mut Engine, f: &[u8], c: &mut Collect) -> Verdict {
    e.inspect(f, Direction::ToWire, Timestamp(1), c)
}

fn handshake(e: &mut Engine) {
    let mut c = Collect::default();
    for f in [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
    ] {
        assert_eq!(run(e, &f, &mut c), Verdict::Pass);
    }
}

const DROP_RULE: &str = "drop tcp any any -> any any (content:\"FORBIDDEN\"; sid:1;)\n";

/// Sends `data` split at `cuts` (stream offsets); returns the verdicts.
fn send_split(e: &mut Engine, data: &[u8], cuts: &[usize], c: &mut Collect) -> Vec<Verdict> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(data.len());
    bounds
        .windows(2)
        .map(|w| run(e, &cdata(w[0] as u32, &data[w[0]..w[1]]), c))
        .collect()
}

fn one_byte_split(handshake_first: bool) {
    let mut e = engine(DROP_RULE);
    if handshake_first {
        handshake(&mut e);
    }
    let data = b"xxFORBIDDENyy";
    let cuts: Vec<usize> = (1..data.len()).collect();
    let mut c = Collect::default();
    let v = send_split(&mut e, data, &cuts, &mut c);
    // Bytes 0..=10: the segment carrying the final 'N' (offset 10) completes the match.
    for (i, v) in v.iter().enumerate() {
        let want = if i < 10 { Verdict::Pass } else { Verdict::Drop };
        assert_eq!(*v, want, "segment {i}");
    }
    assert_eq!(c.sid_actions(), vec![(1, "blocked")]);
    assert_eq!(c.dropped, 1);
    // The server's reply is dropped too (flow blocked both ways).
    let back = seg(false, PSH_ACK, SISN + 1, CISN + 14, b"ok");
    assert_eq!(run(&mut e, &back, &mut c), Verdict::Drop);
    let st = e.stream_stats();
    assert_eq!(st.drops.get(StreamDrop::Blocked), 3);
    assert_eq!(e.stats().stream_dropped, 3);
    assert_eq!(c.alerts.len(), 1);
}

#[test]
fn split_one_byte_segments_with_handshake() {
    one_byte_split(true);
}

#[test]
fn split_one_byte_segments_midstream() {
    one_byte_split(false);
}

#[test]
fn split_in_two_and_three_at_every_point() {
    let data = b"aFORBIDDENb";
    for i in 1..data.len() {
        for j in i..=data.len() {
            let cuts: Vec<usize> = if j == i || j == data.len() {
                vec![i]
            } else {
                vec![i, j]
            };
            let mut e = engine(DROP_RULE);
            handshake(&mut e);
            let mut c = Collect::default();
            let v = send_split(&mut e, data, &cuts, &mut c);
            // The match ends at offset 10 (exclusive): the segment holding byte 9 completes it.
            let mut bounds = vec![0];
            bounds.extend_from_slice(&cuts);
            let completing = bounds.iter().rposition(|&b| b <= 9).unwrap();
            for (k, v) in v.iter().enumerate() {
                let want = if k < completing {
                    Verdict::Pass
                } else {
                    Verdict::Drop
                };
                assert_eq!(*v, want, "cuts {cuts:?} segment {k}");
            }
            assert_eq!(c.sid_actions(), vec![(1, "blocked")], "cuts {cuts:?}");
        }
    }
}

#[test]
fn alert_rule_alerts_once_for_a_split_match() {
    let mut e = engine("alert tcp any any -> any any (content:\"SECRET\"; sid:7;)\n");
    handshake(&mut e);
    let mut c = Collect::default();
    let v = send_split(&mut e, b"SECRETxyz", &[3, 6, 7, 8], &mut c);
    assert_eq!(
        v,
        vec![
            Verdict::Pass,
            Verdict::Alert,
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Pass
        ]
    );
    assert_eq!(c.sid_actions(), vec![(7, "allowed")]);
}

#[test]
fn out_of_order_dropped_then_retransmission_passes() {
    let mut e = engine(DROP_RULE);
    handshake(&mut e);
    let mut c = Collect::default();
    assert_eq!(run(&mut e, &cdata(0, b"FORB"), &mut c), Verdict::Pass);
    // Ahead of the next expected byte: dropped, not stored.
    assert_eq!(run(&mut e, &cdata(6, b"DEN"), &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::OutOfOrder), 1);
    assert!(c.alerts.is_empty());
    // The sender retransmits in order: the gap fills and the match completes.
    assert_eq!(run(&mut e, &cdata(4, b"ID"), &mut c), Verdict::Pass);
    assert_eq!(run(&mut e, &cdata(6, b"DEN"), &mut c), Verdict::Drop);
    assert_eq!(c.sid_actions(), vec![(1, "blocked")]);
}

#[test]
fn overlap_with_different_bytes_is_dropped() {
    let mut e = engine(DROP_RULE);
    handshake(&mut e);
    let mut c = Collect::default();
    assert_eq!(run(&mut e, &cdata(0, b"FORBxx"), &mut c), Verdict::Pass);
    // Rewrites bytes 4..6: dropped (the receiver keeps "xx").
    assert_eq!(run(&mut e, &cdata(4, b"IDDEN"), &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::OverlapMismatch), 1);
    assert!(c.alerts.is_empty());
}

#[test]
fn spoofed_rst_does_not_reset_the_flow() {
    let mut e = engine(DROP_RULE);
    handshake(&mut e);
    let mut c = Collect::default();
    assert_eq!(run(&mut e, &cdata(0, b"FORBI"), &mut c), Verdict::Pass);
    let rst = seg(true, RST | ACK, CISN + 1 + 5_000_000, SISN + 1, b"");
    assert_eq!(run(&mut e, &rst, &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::RstOutOfWindow), 1);
    assert_eq!(run(&mut e, &cdata(5, b"DDEN"), &mut c), Verdict::Drop);
    assert_eq!(c.sid_actions(), vec![(1, "blocked")]);
}

/// An RST the receiver never gets (sent to another MAC address or VLAN, or with a TTL that
/// expires on the way) ends the connection for Ally: what follows on the tuple is refused,
/// never picked up midstream without the context of the pattern split around the RST.
#[test]
fn a_pattern_split_around_an_rst_is_dropped() {
    let mut e = engine(DROP_RULE);
    handshake(&mut e);
    let mut c = Collect::default();
    assert_eq!(run(&mut e, &cdata(0, b"FORBI"), &mut c), Verdict::Pass);
    let rst = seg(true, RST | ACK, CISN + 1 + 5, SISN + 1, b"");
    assert_eq!(run(&mut e, &rst, &mut c), Verdict::Pass);
    assert_eq!(run(&mut e, &cdata(5, b"DDEN"), &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::AfterReset), 1);
    assert_eq!(e.stream_stats().reset, 1);
}

/// A segment the stream tracker drops changes nothing of its flow: a spoofed RST must not
/// wipe the flowbits a `flowbits:isset` rule needs.
#[test]
fn a_dropped_rst_keeps_the_flowbits() {
    let rules = "alert tcp any any -> any any (content:\"LOGIN\"; flowbits:set,auth; flowbits:noalert; sid:1;)\n\
                 drop tcp any any -> any any (content:\"SECRET\"; flowbits:isset,auth; sid:2;)\n";
    let mut e = engine(rules);
    handshake(&mut e);
    let mut c = Collect::default();
    assert_eq!(run(&mut e, &cdata(0, b"LOGIN "), &mut c), Verdict::Pass);
    // In the window but not exact (RFC 5961): the tracker drops it.
    let rst = seg(true, RST | ACK, CISN + 1 + 100, SISN + 1, b"");
    assert_eq!(run(&mut e, &rst, &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::RstNotExact), 1);
    assert_eq!(run(&mut e, &cdata(6, b"SECRET"), &mut c), Verdict::Drop);
    assert_eq!(c.sid_actions(), vec![(2, "blocked")]);
}

/// `frame` 802.1Q-tagged for VLAN `vid`.
fn on_vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    [
        &frame[..12],
        &[0x81, 0x00],
        &vid.to_be_bytes()[..],
        &frame[12..],
    ]
    .concat()
}

/// The same addresses and ports on two VLANs are two flows: an exact RST on VLAN 6 is no RST
/// of VLAN 5's flow (there is no flow on VLAN 6 to end), whose split pattern is still found.
#[test]
fn flows_on_two_vlans_are_apart() {
    let mut e = engine(DROP_RULE);
    let mut c = Collect::default();
    for f in [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
    ] {
        assert_eq!(run(&mut e, &on_vlan(&f, 5), &mut c), Verdict::Pass);
    }
    let v5 = |f: Vec<u8>| on_vlan(&f, 5);
    assert_eq!(run(&mut e, &v5(cdata(0, b"FORBI")), &mut c), Verdict::Pass);
    // Other bytes at the same place on VLAN 6: another stream (picked up midstream), no
    // overlap with VLAN 5's.
    assert_eq!(
        run(&mut e, &on_vlan(&cdata(0, b"other"), 6), &mut c),
        Verdict::Pass
    );
    assert_eq!(e.stream_stats().drops.get(StreamDrop::OverlapMismatch), 0);
    // VLAN 5's exact RST, sent on VLAN 7 where no such flow exists.
    let rst = seg(true, RST | ACK, CISN + 1 + 5, SISN + 1, b"");
    assert_eq!(run(&mut e, &on_vlan(&rst, 7), &mut c), Verdict::Drop);
    assert_eq!(e.stream_stats().drops.get(StreamDrop::RstOutOfWindow), 1);
    assert_eq!(run(&mut e, &v5(cdata(5, b"DDEN")), &mut c), Verdict::Drop);
    assert_eq!(c.sid_actions(), vec![(1, "blocked")]);
    assert_eq!(e.stream_stats().created, 2);
}

#[test]
fn anchored_rules_judge_each_segment() {
    let rules = "alert tcp any any -> any any (content:\"GET\"; depth:3; sid:1;)\n\
                 alert tcp any any -> any any (content:\"ab\"; offset:2; sid:2;)\n\
                 alert tcp any any -> any any (dsize:3; content:\"xyz\"; sid:3;)\n";
    let mut e = engine(rules);
    handshake(&mut e);
    let mut c = Collect::default();
    // "GE" + "T /": per segment, "GET" at depth 3 is never seen.
    assert_eq!(run(&mut e, &cdata(0, b"GE"), &mut c), Verdict::Pass);
    assert_eq!(run(&mut e, &cdata(2, b"T /"), &mut c), Verdict::Pass);
    // "ab" at offset 2 of the segment itself.
    assert_eq!(run(&mut e, &cdata(5, b"..ab"), &mut c), Verdict::Alert);
    // dsize is the segment's size.
    assert_eq!(run(&mut e, &cdata(9, b"xy"), &mut c), Verdict::Pass);
    assert_eq!(run(&mut e, &cdata(11, b"z"), &mut c), Verdict::Pass);
    assert_eq!(run(&mut e, &cdata(12, b"xyz"), &mut c), Verdict::Alert);
    assert_eq!(c.sid_actions(), vec![(2, "allowed"), (3, "allowed")]);
}
