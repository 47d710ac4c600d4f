//! The engine as the queue engine's [`crate::nic::PacketHook`].
//!
//! ```ignore
//! let hook = EngineHook { engine, sink: MgmtWriter::new(com2), clock: || Timestamp(now_us()) };
//! ```
//! `drop` verdicts become [`HookVerdict::Drop`], held out-of-order segments
//! [`HookVerdict::Hold`] (forwarded later through [`PacketHook::take_forward`]); `pass` and
//! `alert` verdicts forward the frame.

use super::{AlertSink, Direction, Engine, Inspector, Timestamp, Verdict};
use crate::nic::{self, HookVerdict, PacketHook};

impl From<nic::Direction> for Direction {
    fn from(d: nic::Direction) -> Self {
        match d {
            nic::Direction::ToWire => Direction::ToWire,
            nic::Direction::FromWire => Direction::FromWire,
        }
    }
}

/// An [`Engine`] with its alert sink and clock, ready to be the DPI loop's hook.
#[derive(Debug)]
pub struct EngineHook<S: AlertSink, C: FnMut() -> Timestamp> {
    /// The engine.
    pub engine: Engine,
    /// Where alerts and dropped-frame excerpts go (on Ally the alert ring, pumped to COM2 by
    /// the DPI core when idle: `ally_hypervisor::arch::logger`).
    pub sink: S,
    /// Current time for alert records, flow timeouts and rate limits.
    pub clock: C,
}

impl<S: AlertSink, C: FnMut() -> Timestamp> PacketHook for EngineHook<S, C> {
    fn inspect(&mut self, frame: &[u8], dir: nic::Direction) -> HookVerdict {
        let now = (self.clock)();
        match self.engine.inspect(frame, dir.into(), now, &mut self.sink) {
            Verdict::Drop => HookVerdict::Drop,
            Verdict::Hold => HookVerdict::Hold,
            Verdict::Pass | Verdict::Alert => HookVerdict::Pass,
        }
    }

    fn take_forward(&mut self, dir: nic::Direction) -> Option<alloc::vec::Vec<u8>> {
        self.engine.take_forward(dir.into())
    }

    fn has_forward(&self) -> bool {
        self.engine.has_forward()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::eve::{parse_mgmt_line, MgmtLine};
    use crate::engine::rules::parse_rules;
    use crate::engine::vars::Vars;
    use crate::engine::{EngineConfig, MgmtWriter};
    use alloc::string::String;
    use ally_hypervisor::record_ring::{RecordRing, RingProducer, TxFifo};

    #[test]
    fn drop_rule_drops_through_the_hook() {
        let p = parse_rules(
            "drop tcp any any -> any any (msg:\"x\"; content:\"EVIL\"; sid:1;)",
            &Vars::new(),
        );
        let engine = Engine::new(p.rules, EngineConfig::default()).unwrap();
        let mut t = 0;
        let mut hook = EngineHook {
            engine,
            sink: MgmtWriter::new(String::new()),
            clock: move || {
                t += 1;
                Timestamp(t)
            },
        };
        let ip = |s: &str| s.parse().unwrap();
        let bad = crate::engine::packet::build::frame(
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            6,
            &crate::engine::packet::build::tcp(1, 80, 0x18),
            b"..EVIL..",
        );
        let good = crate::engine::packet::build::frame(
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            6,
            &crate::engine::packet::build::tcp(1, 80, 0x18),
            b"fine",
        );
        assert_eq!(
            hook.inspect(&bad, nic::Direction::FromWire),
            HookVerdict::Drop
        );
        assert_eq!(
            hook.inspect(&good, nic::Direction::ToWire),
            HookVerdict::Pass
        );
        assert!(hook
            .sink
            .out
            .starts_with("ALLY eve {\"timestamp\":\"1970-01-01T00:00:00.000001+0000\""));
        assert!(hook.sink.out.contains("\"direction\":\"from_wire\""));
        assert_eq!(hook.sink.out.lines().count(), 2); // alert + pcap line
    }

    /// A transmitter that takes a few bytes per poll.
    struct Fifo(alloc::vec::Vec<u8>);

    impl TxFifo for Fifo {
        fn room(&mut self) -> usize {
            7
        }
        fn put(&mut self, byte: u8) {
            self.0.push(byte);
        }
    }

    fn drop_hook<const N: usize>(
        ring: &RecordRing<N>,
    ) -> EngineHook<MgmtWriter<RingProducer<'_, N>>, impl FnMut() -> Timestamp> {
        let p = parse_rules(
            "drop tcp any any -> any any (msg:\"x\"; content:\"EVIL\"; sid:1;)",
            &Vars::new(),
        );
        EngineHook {
            engine: Engine::new(p.rules, EngineConfig::default()).unwrap(),
            sink: MgmtWriter::new(ring.producer(2048).unwrap()),
            clock: || Timestamp(1),
        }
    }

    fn evil() -> alloc::vec::Vec<u8> {
        let ip = |s: &str| s.parse().unwrap();
        crate::engine::packet::build::frame(
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            6,
            &crate::engine::packet::build::tcp(1, 80, 0x18),
            b"..EVIL..",
        )
    }

    #[test]
    fn records_through_the_alert_ring_come_out_whole_and_parse() {
        let ring = RecordRing::<4096>::new();
        let mut hook = drop_hook(&ring);
        for _ in 0..3 {
            assert_eq!(
                hook.inspect(&evil(), nic::Direction::ToWire),
                HookVerdict::Drop
            );
        }
        let mut fifo = Fifo(alloc::vec::Vec::new());
        while ring.has_pending() {
            ring.pump(&mut fifo);
        }
        let text = String::from_utf8(fifo.0).unwrap();
        let lines: alloc::vec::Vec<_> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 6); // 3 x (alert + pcap)
        for line in lines {
            let parsed = parse_mgmt_line(line).unwrap();
            assert_ne!(parsed, MgmtLine::Other, "{line}");
        }
        assert_eq!(ring.stats().written, 6);
    }

    #[test]
    fn a_full_alert_ring_loses_records_not_verdicts() {
        // Too small for any record: every alert is lost, every bad frame still dropped.
        let ring = RecordRing::<64>::new();
        let mut hook = drop_hook(&ring);
        for _ in 0..5 {
            assert_eq!(
                hook.inspect(&evil(), nic::Direction::FromWire),
                HookVerdict::Drop
            );
        }
        let s = ring.stats();
        assert_eq!((s.lost, s.written, s.pending), (10, 0, 0));
        assert_eq!(hook.sink.write_errors, 0);
    }
}
