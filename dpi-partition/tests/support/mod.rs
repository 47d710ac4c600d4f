//! What the engine tests share: an alert sink that records what the engine reported, and TCP
//! segments of one connection.

#![allow(dead_code)]

use ally_dpi::engine::{Action, Alert, AlertSink, Direction, Timestamp};

/// Records every alert (sid, "blocked" for drop rules else "allowed", suppressed count) and
/// counts the dropped-frame excerpts.
#[derive(Default)]
pub struct Collect {
    pub alerts: Vec<(u32, &'static str, u64)>,
    pub dropped: usize,
}

impl Collect {
    /// (sid, action) of each alert, in order.
    pub fn sid_actions(&self) -> Vec<(u32, &'static str)> {
        self.alerts.iter().map(|&(s, a, _)| (s, a)).collect()
    }

    /// The sid of each alert, in order.
    pub fn sids(&self) -> Vec<u32> {
        self.alerts.iter().map(|a| a.0).collect()
    }
}

impl AlertSink for Collect {
    fn alert(&mut self, a: &Alert<'_>) {
        let act = if a.rule.action == Action::Drop {
            "blocked"
        } else {
            "allowed"
        };
        self.alerts.push((a.rule.sid, act, a.suppressed));
    }
    fn dropped(&mut self, _: &[u8], _: Direction, _: Timestamp) {
        self.dropped += 1;
    }
}

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const PSH_ACK: u8 = 0x18;
pub const CISN: u32 = 1000;
pub const SISN: u32 = 5000;

/// IPv4 10.0.0.1:4000 <-> 10.0.0.2:80 TCP segment.
pub fn seg(to_server: bool, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sp, dp) = if to_server {
        ([10, 0, 0, 1], [10, 0, 0, 2], 4000u16, 80u16)
    } else {
        ([10, 0, 0, 2], [10, 0, 0, 1], 80, 4000)
    };
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0];
    f.extend_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sp.to_be_bytes());
    f.extend_from_slice(&dp.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Xorshift64: the randomized tests' deterministic source.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The three-way handshake of [`seg`]'s connection, through `e`.
pub fn handshake(e: &mut ally_dpi::engine::Engine, c: &mut Collect) {
    use ally_dpi::engine::Inspector;
    for f in [
        seg(true, SYN, CISN, 0, b""),
        seg(false, SYN | ACK, SISN, CISN + 1, b""),
        seg(true, ACK, CISN + 1, SISN + 1, b""),
    ] {
        assert_eq!(
            e.inspect(&f, Direction::ToWire, Timestamp(1), c),
            ally_dpi::engine::Verdict::Pass
        );
    }
}
