//! What the engine tests share: an alert sink that records what the engine reported.

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
    #[allow(dead_code)]
    pub fn sid_actions(&self) -> Vec<(u32, &'static str)> {
        self.alerts.iter().map(|&(s, a, _)| (s, a)).collect()
    }

    /// The sid of each alert, in order.
    #[allow(dead_code)]
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
