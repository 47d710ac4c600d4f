//! The engine as the queue engine's [`crate::nic::PacketHook`].
//!
//! ```ignore
//! let hook = EngineHook { engine, sink: MgmtWriter::new(com2), clock: || Timestamp(now_us()) };
//! ```
//! `drop` verdicts become [`HookVerdict::Drop`]; `pass` and `alert` verdicts forward the frame.

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
    /// Where alerts and dropped-frame excerpts go (COM2 on Ally).
    pub sink: S,
    /// Current time for alert records, flow timeouts and rate limits.
    pub clock: C,
}

impl<S: AlertSink, C: FnMut() -> Timestamp> PacketHook for EngineHook<S, C> {
    fn inspect(&mut self, frame: &[u8], dir: nic::Direction) -> HookVerdict {
        let now = (self.clock)();
        match self.engine.inspect(frame, dir.into(), now, &mut self.sink) {
            Verdict::Drop => HookVerdict::Drop,
            Verdict::Pass | Verdict::Alert => HookVerdict::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::parse_rules;
    use crate::engine::vars::Vars;
    use crate::engine::{EngineConfig, MgmtWriter};
    use alloc::string::String;

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
}
