//! Bounded flow table for the `flow` option (TCP handshake state, UDP direction).
//!
//! TCP: a SYN (without ACK) creates the flow and makes its sender the client; the server's SYN+ACK
//! and then the client's ACK make it established (3-way handshake). RST removes the flow. Packets
//! of flows whose SYN was not seen (mid-stream) have no flow: rules with `to_server`/`to_client`/
//! `established` do not match them (Suricata's default, `midstream: false`); `stateless` rules
//! do. UDP: the first packet creates the flow (its sender is the client); a packet from the other
//! side makes it established (Suricata's UDP semantics).
//!
//! Flows are keyed by protocol, endpoints and VLAN IDs. The table is open-addressed with a
//! fixed capacity (a power of two), indexed by a keyed hash ([`FlowConfig::key`]), with a probe
//! window of 8 slots; an idle entry past its timeout is reused, otherwise the least recently seen entry of
//! the window is evicted. Every outcome is counted in [`FlowStats`].

use alloc::vec::Vec;
use core::net::IpAddr;

use super::keyed::{flow_key, keyed_hash};
use super::packet::{tcpflags, Packet, L4};

const PROBE: usize = 8;

/// Flow-table configuration.
#[derive(Clone, Copy, Debug)]
pub struct FlowConfig {
    /// Number of slots (rounded up to a power of two, at least 8).
    pub capacity: usize,
    /// Key of the table's hash ([`keyed_hash`]): secret at boot, so that a guest cannot aim
    /// flows at one probe window to push a victim's flowbits out.
    pub key: [u64; 2],
    /// Idle timeout of established TCP flows, microseconds.
    pub established_timeout_us: u64,
    /// Idle timeout of other flows (handshaking TCP, UDP), microseconds.
    pub other_timeout_us: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            capacity: 65536,
            key: [0; 2],
            established_timeout_us: 3_600_000_000,
            other_timeout_us: 60_000_000,
        }
    }
}

/// Flow-table counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows created.
    pub created: u64,
    /// Flows removed by RST.
    pub closed: u64,
    /// Idle flows replaced after their timeout.
    pub expired: u64,
    /// Live flows evicted because their probe window was full.
    pub evicted: u64,
    /// TCP packets that belong to no tracked flow (mid-stream).
    pub midstream: u64,
    /// Flows currently in the table.
    pub active: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    SynSent,
    SynAckSeen,
    Established,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    proto: u8,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    /// [`Packet::vlans`] of its packets: the same addresses on two VLANs are two flows.
    vlans: u32,
    state: State,
    last_seen: u64,
    /// `flowbits` of the flow (bit indices assigned by the engine).
    bits: u128,
    /// Application protocol detected on the flow ([`super::rules::AppProto::code`]; 0: none).
    app: u8,
}

/// Where a packet stands in its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    /// The packet goes client → server.
    pub to_server: bool,
    /// The flow is established.
    pub established: bool,
}

/// The flow table.
#[derive(Debug)]
pub struct FlowTable {
    slots: Vec<Option<Entry>>,
    mask: usize,
    cfg: FlowConfig,
    stats: FlowStats,
    /// Slot of the flow of the packet last passed to [`FlowTable::track`].
    current: Option<usize>,
}

impl FlowTable {
    /// Creates an empty table.
    pub fn new(cfg: FlowConfig) -> FlowTable {
        let cap = cfg.capacity.max(PROBE).next_power_of_two();
        FlowTable {
            slots: alloc::vec![None; cap],
            mask: cap - 1,
            cfg,
            stats: FlowStats::default(),
            current: None,
        }
    }

    /// Flowbits of the flow of the packet last tracked (0 without a flow).
    pub fn current_bits(&self) -> u128 {
        self.current
            .and_then(|i| self.slots[i].as_ref())
            .map_or(0, |e| e.bits)
    }

    /// Replaces the flowbits of the flow of the packet last tracked (no-op without a flow).
    pub fn set_current_bits(&mut self, bits: u128) {
        if let Some(e) = self.current.and_then(|i| self.slots[i].as_mut()) {
            e.bits = bits;
        }
    }

    /// Application protocol code of the flow of the packet last tracked (0: none or no flow).
    pub fn current_app(&self) -> u8 {
        self.current
            .and_then(|i| self.slots[i].as_ref())
            .map_or(0, |e| e.app)
    }

    /// Records the application protocol of the flow of the packet last tracked (no-op without
    /// a flow).
    pub fn set_current_app(&mut self, app: u8) {
        if let Some(e) = self.current.and_then(|i| self.slots[i].as_mut()) {
            e.app = app;
        }
    }

    /// Bytes of the slot array.
    pub fn memory_usage(&self) -> usize {
        self.slots.len() * core::mem::size_of::<Option<Entry>>()
    }

    /// Counters.
    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    fn expired(&self, e: &Entry, now: u64) -> bool {
        let t = if e.state == State::Established && e.proto != super::packet::ipproto::UDP {
            self.cfg.established_timeout_us
        } else {
            self.cfg.other_timeout_us
        };
        now.saturating_sub(e.last_seen) > t
    }

    fn find(
        &self,
        start: usize,
        proto: u8,
        a: (IpAddr, u16),
        b: (IpAddr, u16),
        vlans: u32,
    ) -> Option<usize> {
        (0..PROBE).map(|k| (start + k) & self.mask).find(|&i| {
            self.slots[i].is_some_and(|e| {
                e.proto == proto
                    && e.vlans == vlans
                    && ((e.client == a && e.server == b) || (e.client == b && e.server == a))
            })
        })
    }

    fn insert(&mut self, start: usize, e: Entry, now: u64) {
        let mut victim = start & self.mask;
        let mut oldest = u64::MAX;
        for k in 0..PROBE {
            let i = (start + k) & self.mask;
            match &self.slots[i] {
                None => {
                    victim = i;
                    break;
                }
                Some(old) if self.expired(old, now) => {
                    victim = i;
                    self.stats.expired += 1;
                    self.stats.active -= 1;
                    break;
                }
                Some(old) if old.last_seen < oldest => {
                    oldest = old.last_seen;
                    victim = i;
                }
                Some(_) => {}
            }
        }
        if self.slots[victim].is_some() {
            self.stats.evicted += 1;
            self.stats.active -= 1;
        }
        self.slots[victim] = Some(e);
        self.current = Some(victim);
        self.stats.created += 1;
        self.stats.active += 1;
    }

    /// Updates the table with `pkt` (TCP and UDP only) and returns the packet's flow position.
    pub fn track(&mut self, pkt: &Packet<'_>, now: u64) -> Option<FlowInfo> {
        self.current = None;
        let (flags, sport, dport) = match pkt.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                ..
            } => (Some(flags), sport, dport),
            L4::Udp { sport, dport } => (None, sport, dport),
            _ => return None,
        };
        let me = (pkt.src, sport);
        let peer = (pkt.dst, dport);
        let start = keyed_hash(self.cfg.key, &flow_key(pkt.proto, me, peer, pkt.vlans)) as usize;
        let found = self.find(start, pkt.proto, me, peer, pkt.vlans);
        if let Some(i) = found {
            if self.slots[i].is_some_and(|e| self.expired(&e, now)) {
                self.slots[i] = None;
                self.stats.expired += 1;
                self.stats.active -= 1;
                return self.track(pkt, now);
            }
        }
        let Some(flags) = flags else {
            // UDP.
            return Some(match found {
                Some(i) => {
                    self.current = Some(i);
                    let e = self.slots[i].as_mut()?;
                    e.last_seen = now;
                    let to_server = e.client == me;
                    if !to_server {
                        e.state = State::Established;
                    }
                    FlowInfo {
                        to_server,
                        established: e.state == State::Established,
                    }
                }
                None => {
                    let e = Entry {
                        proto: pkt.proto,
                        client: me,
                        server: peer,
                        vlans: pkt.vlans,
                        state: State::SynSent,
                        last_seen: now,
                        bits: 0,
                        app: 0,
                    };
                    self.insert(start, e, now);
                    FlowInfo {
                        to_server: true,
                        established: false,
                    }
                }
            });
        };
        let syn = flags & tcpflags::SYN != 0;
        let ack = flags & tcpflags::ACK != 0;
        if flags & tcpflags::RST != 0 {
            let info = found.and_then(|i| {
                let e = self.slots[i].take()?;
                self.stats.closed += 1;
                self.stats.active -= 1;
                Some(FlowInfo {
                    to_server: e.client == me,
                    established: e.state == State::Established,
                })
            });
            if info.is_none() {
                self.stats.midstream += 1;
            }
            return info;
        }
        match found {
            None if syn && !ack => {
                let e = Entry {
                    proto: pkt.proto,
                    client: me,
                    server: peer,
                    vlans: pkt.vlans,
                    state: State::SynSent,
                    last_seen: now,
                    bits: 0,
                    app: 0,
                };
                self.insert(start, e, now);
                Some(FlowInfo {
                    to_server: true,
                    established: false,
                })
            }
            None => {
                self.stats.midstream += 1;
                None
            }
            Some(i) => {
                self.current = Some(i);
                let e = self.slots[i].as_mut()?;
                e.last_seen = now;
                let to_server = e.client == me;
                if syn && !ack && to_server && e.state != State::SynSent {
                    // A new SYN on a reused 4-tuple restarts the handshake.
                    e.state = State::SynSent;
                } else {
                    e.state = match (e.state, to_server, syn, ack) {
                        (State::SynSent, false, true, true) => State::SynAckSeen,
                        (State::SynAckSeen, true, false, true) => State::Established,
                        (s, _, _, _) => s,
                    };
                }
                Some(FlowInfo {
                    to_server,
                    established: e.state == State::Established,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packet::{build, decode, Decoded};

    fn pkt(f: &[u8]) -> Packet<'_> {
        match decode(f) {
            Decoded::Ip(p) => p,
            Decoded::NotIp => panic!(),
        }
    }

    fn tcpf(src: &str, sp: u16, dst: &str, dp: u16, flags: u8) -> alloc::vec::Vec<u8> {
        build::frame(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            6,
            &build::tcp(sp, dp, flags),
            b"",
        )
    }

    #[test]
    fn handshake_and_direction() {
        let mut t = FlowTable::new(FlowConfig::default());
        let c = "10.0.0.1";
        let s = "10.0.0.2";
        let syn = tcpf(c, 4000, s, 80, tcpflags::SYN);
        let synack = tcpf(s, 80, c, 4000, tcpflags::SYN | tcpflags::ACK);
        let ack = tcpf(c, 4000, s, 80, tcpflags::ACK);
        let data_back = tcpf(s, 80, c, 4000, tcpflags::ACK);
        assert_eq!(
            t.track(&pkt(&syn), 1),
            Some(FlowInfo {
                to_server: true,
                established: false
            })
        );
        assert_eq!(
            t.track(&pkt(&synack), 2),
            Some(FlowInfo {
                to_server: false,
                established: false
            })
        );
        assert_eq!(
            t.track(&pkt(&ack), 3),
            Some(FlowInfo {
                to_server: true,
                established: true
            })
        );
        assert_eq!(
            t.track(&pkt(&data_back), 4),
            Some(FlowInfo {
                to_server: false,
                established: true
            })
        );
        let rst = tcpf(s, 80, c, 4000, tcpflags::RST);
        assert!(t.track(&pkt(&rst), 5).is_some());
        assert_eq!(t.track(&pkt(&ack), 6), None);
        let st = t.stats();
        assert_eq!(
            (st.created, st.closed, st.midstream, st.active),
            (1, 1, 1, 0)
        );
    }

    /// The same addresses and ports on two VLANs are two flows, with their own flowbits.
    #[test]
    fn vlans_make_flows_apart() {
        let mut t = FlowTable::new(FlowConfig::default());
        let tagged = |f: &[u8], vid: u16| -> alloc::vec::Vec<u8> {
            [&f[..12], &[0x81, 0x00], &vid.to_be_bytes()[..], &f[12..]].concat()
        };
        let syn = tcpf("10.0.0.1", 4000, "10.0.0.2", 80, tcpflags::SYN);
        assert!(t.track(&pkt(&tagged(&syn, 5)), 1).is_some());
        t.set_current_bits(0b1);
        assert!(t.track(&pkt(&tagged(&syn, 6)), 2).is_some());
        assert_eq!(t.current_bits(), 0);
        assert_eq!(t.stats().created, 2);
        assert!(t.track(&pkt(&tagged(&syn, 5)), 3).is_some());
        assert_eq!(t.current_bits(), 0b1);
    }

    #[test]
    fn midstream_has_no_flow() {
        let mut t = FlowTable::new(FlowConfig::default());
        let f = tcpf("1.1.1.1", 1, "2.2.2.2", 2, tcpflags::ACK);
        assert_eq!(t.track(&pkt(&f), 0), None);
        assert_eq!(t.stats().midstream, 1);
    }

    #[test]
    fn bounded_with_eviction_and_expiry() {
        let cfg = FlowConfig {
            capacity: 8,
            key: [1, 2],
            established_timeout_us: 100,
            other_timeout_us: 50,
        };
        let mut t = FlowTable::new(cfg);
        for p in 0..100u16 {
            let f = tcpf("10.0.0.1", 1000 + p, "10.0.0.2", 80, tcpflags::SYN);
            t.track(&pkt(&f), u64::from(p));
        }
        let st = t.stats();
        assert_eq!(st.created, 100);
        assert!(st.active <= 8);
        assert_eq!(st.created - st.evicted - st.expired, st.active);
        // Far in the future every entry is expired and gets reused.
        let f = tcpf("10.0.0.9", 9, "10.0.0.2", 80, tcpflags::SYN);
        t.track(&pkt(&f), 1_000_000);
        assert!(t.stats().expired >= 1);
    }

    #[test]
    fn udp_established_after_reply() {
        let mut t = FlowTable::new(FlowConfig::default());
        let q = build::frame(
            "10.0.0.1".parse().unwrap(),
            "8.8.8.8".parse().unwrap(),
            17,
            &build::udp(5000, 53, 0),
            b"",
        );
        let r = build::frame(
            "8.8.8.8".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            17,
            &build::udp(53, 5000, 0),
            b"",
        );
        assert_eq!(
            t.track(&pkt(&q), 0),
            Some(FlowInfo {
                to_server: true,
                established: false
            })
        );
        assert_eq!(
            t.track(&pkt(&r), 1),
            Some(FlowInfo {
                to_server: false,
                established: true
            })
        );
    }
}
