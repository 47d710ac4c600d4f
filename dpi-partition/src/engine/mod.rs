//! The inspection engine: Snort-class rules, verdicts and alerts.
//!
//! # API for the DPI loop
//!
//! ```ignore
//! use ally_dpi::engine::{Engine, EngineConfig, Inspector, Direction, Timestamp, Verdict, MgmtWriter};
//! let mut engine = Engine::from_blob(module_bytes, EngineConfig::default())?; // or Engine::pass_all()
//! log!("{}", engine.summary()); // "rules: 1471 loaded (0 drop, 1471 alert, 0 pass) in ..." or pass-all
//! let mut sink = MgmtWriter::new(com2);                 // any core::fmt::Write
//! match engine.inspect(frame, Direction::ToWire, Timestamp(now_us), &mut sink) {
//!     Verdict::Drop => { /* do not forward; count dropped-by-rule */ }
//!     Verdict::Pass | Verdict::Alert => { /* forward */ }
//! }
//! ```
//!
//! - [`Inspector::inspect`] takes one Ethernet frame, its [`Direction`] (`ToWire` = guest TX,
//!   `FromWire` = guest RX) and the time ([`Timestamp`]: microseconds since the Unix epoch), and
//!   returns a [`Verdict`]. Alerts and dropped-frame excerpts go to the [`AlertSink`] passed in
//!   ([`MgmtWriter`] writes the COM2 line format of [`eve`]). `inspect` never panics on any
//!   frame; it allocates only while its scratch buffers grow to the largest frame seen (and for
//!   at most 64 hosts per `detection_filter` rule). Counters: [`Engine::stats`] (frames =
//!   not IP + passed + alerted + dropped) and [`Engine::flow_stats`].
//! - [`EngineHook`] wraps an engine, its sink and a clock as the queue engine's
//!   [`PacketHook`](crate::nic::PacketHook) (`drop` → `HookVerdict::Drop`, a held segment →
//!   `HookVerdict::Hold`, else pass; released segments through `take_forward`).
//! - [`Engine::from_blob`] verifies a compiled blob ([`blob`]) and refuses a bad one with a
//!   [`BlobError`] naming the problem; [`Engine::pass_all`] is the no-rules engine, and
//!   [`Engine::summary`] gives the boot-log line for either.
//!
//! # Semantics
//!
//! - The rule language (what loads, what is refused and why) is described in [`rules`]; the
//!   payload semantics (offset/depth/distance/within, negation, backtracking, pcre, byte_test,
//!   byte_jump, isdataat) in [`matcher`]; `flow` and flowbits state in [`flow`].
//! - Each frame is decoded ([`packet`]: Ethernet, 802.1Q/802.1ad, IPv4, IPv6 with extension
//!   headers skipped, TCP, UDP, ICMP/ICMPv6).
//! - **TCP streams** (with [`EngineConfig::stream`] set, as boot does; `None`, the default,
//!   judges every frame on its own): each TCP frame first goes through the inline normalizer
//!   [`stream`]. A segment ahead of the next expected byte is held when
//!   [`StreamConfig::hold_out_of_order`] is set, as boot does ([`Verdict::Hold`]: the tracker
//!   keeps a copy, bounded per flow and in total); when its gap fills it is judged like any
//!   segment, and if it passes [`Engine::take_forward`] hands it to the queue engine, which
//!   sends it (TX, with the checksums the guest's offload would have inserted) or delivers it
//!   (RX). Without holding it is dropped ([`StreamDrop::OutOfOrder`]; the sender retransmits
//!   it in order). Overlaps with different bytes, out-of-window data, bad RSTs/SYNs and
//!   segments of blocked flows are dropped; these drops skip the rules and are counted in
//!   [`EngineStats::stream_dropped`] and by reason in [`Engine::stream_stats`]. So the bytes
//!   forwarded are exactly the bytes inspected, in order. An accepted segment comes with a
//!   window: up to `context_bytes` (1 KiB) of the direction's earlier bytes, then its new
//!   bytes. *Unanchored* rules (see `stream_eligible`: only `content`/`pcre`, none negated, no
//!   `offset`/`depth`, first op not relative, no anchored or position-dependent pcre, no
//!   `dsize`) are matched on that window (the prefilter scans it too) and count only when they
//!   do not already match the window's old bytes, so a pattern split over any number of
//!   segments is caught on the segment that completes it and is reported once; a second
//!   occurrence within the same 1 KiB context is not reported again. *Anchored* rules (everything
//!   else) and all rules on frames the tracker passed untracked (fail-open limits) inspect the
//!   segment's own L4 payload, as before. A `drop` verdict on an accepted segment blocks the
//!   flow: every later segment, both ways, is dropped. Matches longer than the context plus the
//!   segment are not found.
//! - **HTTP buffers** ([`http`]): a rule with a sticky HTTP buffer (`http_uri`, `file_data`,
//!   ...) is matched per HTTP/1.x message of the TCP payload it inspects: the stream window
//!   when the tracker accepted the segment, else the segment's payload. Its `pkt_data` steps
//!   read the message's bytes in that payload. The payload is parsed at most once per frame,
//!   and only when a rule group with such literals is scanned or such a rule is evaluated; a
//!   frame with no HTTP message matches no such rule. With a window, messages wholly in old
//!   bytes are skipped, and a match on a message that began in old bytes counts only when the
//!   rule does not match the same message cut at the old bytes (reported once, as above).
//!   On accepted segments the rule is also matched on the flow's HTTP message state
//!   ([`http_flow`]: heads however many segments they span, bodies de-chunked and inflated
//!   across segments with 1 KiB of decoded overlap, pipelined messages) and matches when
//!   either view matches; the HTTP state's limits drop the segment and block the flow
//!   ([`http`]'s Model). `flow:only_stream` rules match only segments the tracker accepted.
//! - **Application protocols** ([`app`], [`dns`], [`tls`]): with any `alert http/dns/tls/smtp/
//!   ssh` rule loaded, every TCP/UDP payload is classified by its first bytes and the first
//!   protocol seen is recorded on its flow (the flow table then tracks flows); such a rule
//!   matches when the payload or its flow is of its protocol, on any port. Rules with
//!   `dns.query` are matched per DNS question of the UDP payload or TCP segment, rules with
//!   `tls.sni`/`ssl_state`/`ssl_version` per TCP segment's TLS records (no state across
//!   segments); both parse at most once per frame, and `dns.query` fast patterns are scanned
//!   over the dotted names too.
//! - **IP fragments** (with [`EngineConfig::defrag`] set, as boot does) go through the
//!   reassembler [`defrag`] in *forward mode* (the engine holds only TCP segments): each
//!   fragment is checked (overlaps must agree, RFC 1858/7112 tiny fragments, bounds) and kept,
//!   and forwarded at once ([`EngineStats::frag_forwarded`]) unless it completes its datagram;
//!   the completing fragment is forwarded only if the whole datagram, reassembled, passes the
//!   stream tracker and the rules as an unfragmented frame would. A receiver delivers nothing
//!   of a datagram without every fragment, so a drop verdict withholds the whole datagram; its
//!   identity is then refused for 90 s (longer than receivers keep fragments), so a resent
//!   completing fragment gets nowhere either. Refused fragments count in
//!   [`EngineStats::frag_dropped`], by reason in [`Engine::defrag_stats`]. Without
//!   reassembly, non-first fragments only meet `ip` rules and TCP in fragments is dropped by
//!   the tracker as malformed.
//! - Rules are grouped by protocol and port: per destination port, else per source port, else a
//!   generic group for `any`/negated/wide port sets and `<>` rules (`ip` rules join the generic
//!   group of every protocol). Port groups also hold the generic rules, so a packet scans the
//!   group of its destination port and/or of its source port, or else the generic group;
//!   identical groups share one prefilter. Each group has a prefilter ([`prefilter`]: exact,
//!   cross-checked against aho-corasick and Hyperscan) over every rule's fast pattern
//!   ([`Rule::fast_pattern`]: the `fast_pattern` content, else the longest positive content);
//!   rules with no positive content are candidates for every packet of their group. A fast
//!   pattern in an HTTP buffer is found by the scan of the payload/window when the buffer is a
//!   slice of it (raw URI, method, raw header, ...); the buffers that hold decoded bytes
//!   (normalized URI and headers, joined cookies, de-chunked or inflated bodies) are scanned
//!   with the same prefilter too, only in groups that have such literals and only when they
//!   differ from the payload bytes. In groups with HTTP rules, every buffer (and the head as
//!   `pkt_data`) of the messages the flow's HTTP state reports for the segment is scanned
//!   too. So the prefilter never misses a rule whose fast pattern occurs in its buffer, and a
//!   non-HTTP frame costs one line-start scan in those groups.
//!   Candidates are then checked in full: header, `dsize`, `flow`, ICMP fields, TCP `flags`,
//!   flowbits, the payload program, and `detection_filter`.
//! - Verdict order is Suricata's default action order, **pass > drop > alert**: a matching
//!   `pass` rule ends evaluation, the frame is forwarded and nothing is logged (pass rules are
//!   evaluated first); otherwise any matching `drop` rule drops the frame (in either direction)
//!   and logs `blocked`; matching `alert` rules log `allowed`. All matching drop and alert rules
//!   log (subject to the per-rule rate limit, which never changes the verdict). A rule with
//!   `flowbits:noalert` logs nothing and an `alert` one does not change the verdict; its
//!   flowbit actions still apply. Within an action, flowbit setters are evaluated before other
//!   rules and flowbit checkers last, so a bit set on a packet is visible to checkers on it.

pub mod addr;
pub mod app;
pub mod backtrack;
pub mod blob;
pub mod defrag;
pub mod dns;
pub mod eve;
pub mod flow;
pub mod hook;
pub mod http;
pub mod http_flow;
#[cfg(test)]
mod test_rng {
    /// xorshift64*: deterministic pseudo-random numbers for the parsers' fuzz tests.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Below `n` (0 for `n` = 0).
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }
}
pub mod keyed;
pub mod matcher;
pub mod packet;
pub mod prefilter;
pub mod rules;
pub mod stream;
pub mod tls;
pub mod vars;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use blob::BlobError;
pub use defrag::{DefragConfig, DefragDrop, DefragStats};
use defrag::{Defragmenter, FragOutcome};
pub use eve::{Alert, AlertSink, MgmtWriter, NullSink};
pub use flow::{FlowConfig, FlowStats};
pub use hook::EngineHook;
pub use http_flow::{HttpDrop, HttpStateConfig, HttpStateStats};
use http_flow::{HttpFlows, HttpFrame, OldView};
pub use rules::{Action, AppProto, Proto, Rule};
pub use stream::{StreamConfig, StreamDrop, StreamStats};
use stream::{StreamOutcome, StreamTracker};

use flow::{FlowInfo, FlowTable};
use matcher::{Buffers, Memo, Program};
use packet::{Decoded, Packet, L4};
use prefilter::{Marks, Prefilter};

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest TX: from the guest to the wire.
    ToWire,
    /// Guest RX: from the wire to the guest.
    FromWire,
}

impl Direction {
    /// 0 for [`Direction::ToWire`], 1 for [`Direction::FromWire`].
    pub fn index(self) -> usize {
        match self {
            Direction::ToWire => 0,
            Direction::FromWire => 1,
        }
    }

    fn from_index(i: u8) -> Direction {
        if i == 0 {
            Direction::ToWire
        } else {
            Direction::FromWire
        }
    }

    /// Name used in alert records and the management stream.
    pub fn name(self) -> &'static str {
        match self {
            Direction::ToWire => "to_wire",
            Direction::FromWire => "from_wire",
        }
    }
}

/// Microseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub u64);

impl fmt::Display for Timestamp {
    /// Suricata's format: `2026-11-23T16:03:30.000123+0000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1_000_000;
        let us = self.0 % 1_000_000;
        let days = (secs / 86_400) as i64;
        let sod = secs % 86_400;
        // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{us:06}+0000",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        )
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward; no rule alerted (or a `pass` rule matched).
    Pass,
    /// Forward; at least one `alert` rule matched.
    Alert,
    /// Do not forward; a `drop` rule matched.
    Drop,
    /// Do not forward now: an out-of-order TCP segment the stream tracker keeps a copy of
    /// (with [`StreamConfig::hold_out_of_order`]). Once its gap is filled it is judged and, if
    /// it passes, comes back from [`Engine::take_forward`] in sequence order.
    Hold,
}

/// The hook the DPI loop calls for every frame.
pub trait Inspector {
    /// Inspects one Ethernet frame.
    fn inspect(
        &mut self,
        frame: &[u8],
        dir: Direction,
        now: Timestamp,
        sink: &mut dyn AlertSink,
    ) -> Verdict;
}

/// Engine configuration.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Flow table.
    pub flow: FlowConfig,
    /// Alert records per rule per second before suppression.
    pub alerts_per_rule_per_sec: u32,
    /// Inline TCP stream tracking ([`stream`]), or `None` to judge every frame on its own
    /// (the default, which per-packet tests use). Boot sets [`engine_stream_config`] with
    /// `key` from a random source and out-of-order segments held ([`Verdict::Hold`]).
    pub stream: Option<StreamConfig>,
    /// IP reassembly ([`defrag`]) in forward mode, or `None` to judge fragments on their own
    /// (the default). Boot sets [`DefragConfig::forwarding`] with a random key; the engine
    /// holds only TCP segments (through the stream tracker), so `hold` is forced false.
    pub defrag: Option<DefragConfig>,
    /// Bounds of the per-flow HTTP state ([`http_flow`]) kept for the stream tracker's flows
    /// when some rule reads HTTP buffers.
    pub http: HttpStateConfig,
}

/// The engine's stream bounds: 4096 flows, 2 MiB of retained bytes beyond the 1 KiB matching
/// context, no holding (out-of-order segments are dropped; boot's configuration holds them).
pub fn engine_stream_config() -> StreamConfig {
    StreamConfig {
        max_flows: 4096,
        max_bytes_per_flow: 64 * 1024,
        max_total_bytes: 2 * 1024 * 1024,
        context_bytes: 1024,
        retain_bytes: 64 * 1024,
        hold_out_of_order: false,
        ..StreamConfig::default()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            flow: FlowConfig::default(),
            alerts_per_rule_per_sec: 10,
            stream: None,
            defrag: None,
            http: HttpStateConfig::default(),
        }
    }
}

/// Counters. `frames = not_ip + passed + alerted + dropped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Frames inspected.
    pub frames: u64,
    /// Frames that were not IPv4/IPv6 (forwarded, no rules apply).
    pub not_ip: u64,
    /// IP frames forwarded without alert (including by `pass` rules).
    pub passed: u64,
    /// Frames forwarded with at least one alert.
    pub alerted: u64,
    /// Frames dropped by `drop` rules.
    pub dropped: u64,
    /// Frames that matched a `pass` rule.
    pub pass_rule: u64,
    /// Candidate rules evaluated in full.
    pub evaluated: u64,
    /// Rule matches (before rate limiting).
    pub matches: u64,
    /// Alert records emitted.
    pub alerts_emitted: u64,
    /// Alert records suppressed by the rate limit.
    pub alerts_suppressed: u64,
    /// Frames dropped by the stream normalizer (included in `dropped`; by reason in
    /// [`Engine::stream_stats`]`.drops`).
    pub stream_dropped: u64,
    /// TCP frames inspected per packet only because the stream tracker passed them untracked.
    pub stream_untracked: u64,
    /// IP fragments forwarded before their datagram was whole (included in `passed`; the
    /// fragment completing a datagram carries its verdict).
    pub frag_forwarded: u64,
    /// IP fragments dropped by the reassembler (included in `dropped`; by reason in
    /// [`Engine::defrag_stats`]).
    pub frag_dropped: u64,
    /// Datagrams whose completing fragment was dropped by the rules and whose identity could
    /// not be remembered (its fragments are then refused by the rules alone).
    pub frag_unblocked: u64,
    /// Segments dropped by the HTTP state (a head over its bound, or its memory limit; included
    /// in `dropped`; by reason in [`Engine::http_state_stats`]). Their flow is blocked.
    pub http_dropped: u64,
    /// Out-of-order segments held ([`Verdict::Hold`]; not in `passed` or `dropped`: each is
    /// counted there once released and judged).
    pub held: u64,
    /// Held segments released, judged and queued for [`Engine::take_forward`].
    pub released: u64,
    /// Released segments that passed but found the forward queue full (dropped: the sender
    /// retransmits them).
    pub forward_full: u64,
    /// Rule evaluations whose pcre backtracking ran out of steps: `drop` rules matched, others
    /// did not (see [`matcher`]'s doc).
    pub pcre_limit: u64,
}

/// What [`Engine::summary`] reports; its `Display` is the boot-log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineSummary {
    /// Loaded rules.
    pub rules: usize,
    /// `pass` rules.
    pub pass: usize,
    /// `drop` rules.
    pub drop: usize,
    /// `alert` rules.
    pub alert: usize,
    /// Rule groups.
    pub groups: usize,
    /// Compiled ruleset bytes.
    pub bytes: usize,
}

impl fmt::Display for EngineSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules == 0 {
            return f.write_str("rules: none loaded, every frame passes uninspected by rules");
        }
        write!(
            f,
            "rules: {} loaded ({} drop, {} alert, {} pass) in {} groups, {} KiB compiled",
            self.rules,
            self.drop,
            self.alert,
            self.pass,
            self.groups,
            self.bytes.div_ceil(1024)
        )
    }
}

/// Error while building an engine from rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// The blob was refused.
    Blob(BlobError),
    /// A rule's pcre did not compile (sid, reason).
    Pcre { sid: u32, reason: String },
    /// A group's prefilter could not be built.
    Prefilter(String),
    /// The ruleset uses more than [`MAX_FLOWBITS`] flowbit names (first rule over the limit).
    TooManyFlowbits { sid: u32 },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Blob(e) => write!(f, "{e}"),
            EngineError::Pcre { sid, reason } => write!(f, "rule sid {sid}: pcre: {reason}"),
            EngineError::Prefilter(e) => write!(f, "{e}"),
            EngineError::TooManyFlowbits { sid } => write!(
                f,
                "rule sid {sid}: more than {MAX_FLOWBITS} distinct flowbit names in the ruleset"
            ),
        }
    }
}

impl From<BlobError> for EngineError {
    fn from(e: BlobError) -> Self {
        EngineError::Blob(e)
    }
}

/// A rule ready to evaluate.
#[derive(Debug)]
struct Compiled {
    rule: Rule,
    program: Program,
    rate: eve::RateLimit,
    /// Flowbit conditions: (command, mask, any).
    fb_checks: Vec<(rules::FlowbitCmd, u128, bool)>,
    /// Flowbit actions applied on match: (command, mask).
    fb_actions: Vec<(rules::FlowbitCmd, u128)>,
    /// `detection_filter` hosts: (address, window start us, matches in the window).
    df_hosts: Vec<(core::net::IpAddr, u64, u32)>,
    /// Unanchored payload program ([`stream_eligible`]): matched on the stream window.
    on_stream: bool,
    /// The program reads HTTP buffers: matched per HTTP message ([`http`]).
    http: bool,
    /// It reads a body buffer (`file_data`, `http_client_body`).
    reads_body: bool,
    /// Matched per DNS question or TLS payload instead ([`dns`], [`tls`]): the rule reads their
    /// buffers or has `ssl_state`/`ssl_version`.
    msg: Option<AppProto>,
}

/// Whether a rule's payload is matched on the TCP stream window instead of the segment's own
/// payload: it has at least one payload op; every op is a `content` or `pcre`, none negated;
/// no content has `offset` or `depth`, and the first op is not relative (`distance`/`within`,
/// pcre `R`), and none is `endswith`; no pcre is anchored or position-dependent (flags `A`, `E`, `R` on the first op,
/// `B`; `^`, `$`, `\A`, `\Z`, `\z`, `\G` in the pattern); and the rule has no `dsize`. Such
/// a program matches a buffer whenever it matches a sub-slice of it, so matching on a window
/// that extends the segment backwards finds split matches and nothing anchored changes
/// meaning. Everything else (isdataat, byte_test, byte_jump, pkt_data, negation, absolute
/// positions) is judged per segment.
fn stream_eligible(r: &Rule) -> bool {
    if r.ops.is_empty() || r.dsize.is_some() {
        return false;
    }
    r.ops.iter().enumerate().all(|(i, op)| match op {
        rules::PayloadOp::Content(c) => {
            !c.negated
                && !c.endswith
                && c.offset.is_none()
                && c.depth.is_none()
                && (i > 0 || !c.is_relative())
        }
        rules::PayloadOp::Pcre(p) => {
            !p.negated
                && !p.has('A')
                && !p.has('E')
                && !p.has('B')
                && (i > 0 || !p.has('R'))
                && !p.source.contains(['^', '$'])
                && !["\\A", "\\Z", "\\z", "\\G"]
                    .iter()
                    .any(|a| p.source.contains(a))
        }
        _ => false,
    })
}

/// Hosts tracked per `detection_filter` rule.
const DF_HOSTS: usize = 64;

/// Counts a match for `detection_filter`; true once the host is over the count in its window.
fn detection_filter_exceeded(
    df: &rules::DetectionFilter,
    hosts: &mut Vec<(core::net::IpAddr, u64, u32)>,
    host: core::net::IpAddr,
    now: u64,
) -> bool {
    let window = u64::from(df.seconds) * 1_000_000;
    let count = match hosts.iter_mut().find(|h| h.0 == host) {
        Some(h) => {
            if now.saturating_sub(h.1) >= window || now < h.1 {
                *h = (host, now, 1);
            } else {
                h.2 = h.2.saturating_add(1);
            }
            h.2
        }
        None => {
            if hosts.len() >= DF_HOSTS {
                if let Some(oldest) = (0..hosts.len()).min_by_key(|&i| hosts[i].1) {
                    hosts.swap_remove(oldest);
                }
            }
            hosts.push((host, now, 1));
            1
        }
    };
    count > df.count
}

/// Most distinct flowbit names one ruleset may use (they live in a `u128` per flow).
pub const MAX_FLOWBITS: usize = 128;

/// Order within an action: flowbit setters before plain rules before flowbit checkers, so a bit
/// set by one rule is visible to checkers on the same packet (as Suricata orders them).
fn flowbit_rank(r: &Rule) -> u8 {
    if r.flowbits.iter().any(|f| f.cmd.is_check()) {
        2
    } else if r.flowbits.is_empty() {
        1
    } else {
        0
    }
}

/// A port group: its prefilter, literal → rules map and always-candidates.
#[derive(Debug)]
struct Group {
    pf: Prefilter,
    /// Literal id → rule index.
    lit_rule: Vec<u32>,
    /// Rules without a fast pattern.
    always: Vec<u32>,
    /// Some fast pattern lives in an HTTP buffer that may hold decoded bytes
    /// ([`rules::HttpBuffer::may_be_decoded`]): the decoded buffers are scanned too.
    decoded: bool,
    /// Some member rule reads HTTP buffers: the buffers of the HTTP state's messages are
    /// scanned too.
    http: bool,
    /// Rules that read a body buffer (`file_data`, `http_client_body`) but whose fast pattern
    /// lies elsewhere: candidates on every segment that extends a body in the flow's HTTP
    /// state, whose head is then not scanned again.
    body_sticky: Vec<u32>,
    /// Some fast pattern lives in `dns.query` (dotted names are not payload bytes): the
    /// question names (each after a `.`) are scanned too.
    dns_names: bool,
    /// Some fast pattern lives in `tls.sni; dotprefix`: the dot-prefixed SNI is scanned too.
    sni_dot: bool,
}

/// Groups of one protocol class.
#[derive(Debug, Default)]
struct ProtoGroups {
    dst: Vec<(u16, u32)>,
    src: Vec<(u16, u32)>,
    generic: Option<u32>,
}

/// Protocol classes with their own groups.
const CLASSES: usize = 4;
const C_TCP: usize = 0;
const C_UDP: usize = 1;
const C_ICMP: usize = 2;
const C_OTHER: usize = 3;
/// A port set with more ports than this goes to the generic group.
const MAX_GROUP_PORTS: usize = 256;

/// The rule engine.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Compiled>,
    groups: Vec<Group>,
    classes: [ProtoGroups; CLASSES],
    flows: FlowTable,
    needs_flow: bool,
    cfg: EngineConfig,
    stats: EngineStats,
    lit_marks: Marks,
    rule_marks: Marks,
    cands: Vec<u32>,
    memo: Memo,
    stream: Option<StreamTracker>,
    defrag: Option<Defragmenter>,
    /// Copy of the current stream window (the tracker's borrow ends before rules run).
    win: Vec<u8>,
    last_expire: u64,
    /// HTTP parser and the current frame's parsed views (built on first use per frame).
    http: HttpScratch,
    /// Per-flow HTTP state of the stream tracker's flows (with a tracker and HTTP rules).
    http_flows: Option<HttpFlows>,
    /// What the HTTP state reported for the current segment.
    hframe: HttpFrame,
    /// Released segments that passed, per direction ([`Direction::index`]), for
    /// [`Engine::take_forward`], and their bytes.
    forward: [VecDeque<Vec<u8>>; 2],
    forward_bytes: usize,
    /// The HTTP state parses the current segment's direction: its view replaces the payload
    /// view of the stream window (which would parse the window's messages again, head and
    /// all, on every segment, and would take a body's text for messages).
    http_tracked: bool,
    /// Some rule has an application-protocol header: payloads are classified ([`app`]).
    has_app: bool,
    /// The current frame's DNS and TLS views (built on first use per frame).
    app: AppScratch,
}

/// The DNS and TLS views of the frame being judged, parsed at most once per frame from the
/// L4 payload (`tcp`: a TCP segment's payload, else UDP).
#[derive(Debug, Default)]
struct AppScratch {
    dns: dns::DnsView,
    dns_done: bool,
    tls: tls::TlsView,
    tls_done: bool,
    /// The SNI with a `.` before it (`tls.sni; dotprefix`), built with the TLS view.
    sni_dot: Vec<u8>,
}

impl AppScratch {
    fn reset(&mut self) {
        self.dns_done = false;
        self.tls_done = false;
    }

    fn dns(&mut self, p: &[u8], tcp: bool) -> &dns::DnsView {
        if !self.dns_done {
            dns::parse(p, tcp, &mut self.dns);
            self.dns_done = true;
        }
        &self.dns
    }

    fn tls(&mut self, p: &[u8]) -> &tls::TlsView {
        if !self.tls_done {
            self.tls = tls::parse(p);
            self.tls_done = true;
            self.sni_dot.clear();
            if let Some(s) = self.tls.sni(p) {
                self.sni_dot.push(b'.');
                self.sni_dot.extend_from_slice(s);
            }
        }
        &self.tls
    }
}

/// Index of the first DNS question of payload `p` that the program matches (each question
/// name is one `dns.query` buffer; `pkt_data` is the DNS message).
fn dns_match(
    prog: &mut Program,
    memo: &mut Memo,
    sc: &mut AppScratch,
    p: &[u8],
    tcp: bool,
) -> Option<usize> {
    let msg = dns::message(p, tcp).unwrap_or(&[]);
    let view = sc.dns(p, tcp);
    view.questions().iter().position(|q| {
        let mut b = Buffers::pkt(msg);
        b.app[rules::AppBuffer::DnsQuery.index()] = Some(view.name(q));
        b.app[rules::AppBuffer::DnsQueryDot.index()] = Some(view.dot_name(q));
        prog.matches_buffers(&b, memo)
    })
}

/// Whether a rule matched per TLS payload holds: the payload is TLS, `ssl_state` and
/// `ssl_version` pass, and the program matches with `tls.sni` (absent without an SNI).
fn tls_match(
    rule: &Rule,
    prog: &mut Program,
    memo: &mut Memo,
    sc: &mut AppScratch,
    p: &[u8],
) -> bool {
    let view = *sc.tls(p);
    if !view.is_tls
        || rule.ssl_state.is_some_and(|f| !f.check(view.states))
        || rule.ssl_version.is_some_and(|f| !f.check(view.versions))
    {
        return false;
    }
    let mut b = Buffers::pkt(p);
    b.app[rules::AppBuffer::TlsSni.index()] = view.sni(p);
    b.app[rules::AppBuffer::TlsSniDot.index()] = view.sni(p).map(|_| &sc.sni_dot[..]);
    prog.matches_buffers(&b, memo)
}

/// The HTTP messages of the frame being judged, parsed at most once per frame.
#[derive(Debug, Default)]
struct HttpScratch {
    parser: http::HttpParser,
    /// Messages of the inspected payload that reach into its new bytes.
    cur: http::HttpView,
    /// Messages of the payload's old bytes (the stream window before the segment).
    old: http::HttpView,
    cur_done: bool,
    old_done: bool,
}

impl HttpScratch {
    fn current(&mut self, p: &[u8], new_from: usize) -> &http::HttpView {
        if !self.cur_done {
            self.parser.parse(p, new_from, &mut self.cur);
            self.cur_done = true;
        }
        &self.cur
    }
}

/// The first message of the HTTP payload `p` (new bytes from `new_from`) that the program
/// matches, and that it did not already match with only the old bytes: its index in the current
/// view.
fn http_match(
    prog: &mut Program,
    memo: &mut Memo,
    hs: &mut HttpScratch,
    p: &[u8],
    new_from: usize,
) -> Option<usize> {
    hs.current(p, new_from);
    let HttpScratch {
        parser,
        cur,
        old,
        old_done,
        ..
    } = hs;
    for (k, m) in cur.messages().iter().enumerate() {
        if !prog.matches_buffers(&cur.buffers(m, p), memo) {
            continue;
        }
        if m.start < new_from {
            let old_p = &p[..new_from];
            if !*old_done {
                parser.parse(old_p, 0, old);
                *old_done = true;
            }
            if let Some(om) = old.at_start(m.start) {
                if prog.matches_buffers(&old.buffers(om, old_p), memo) {
                    continue;
                }
            }
        }
        return Some(k);
    }
    None
}

/// Which view an HTTP rule matched in.
#[derive(Clone, Copy, Debug)]
enum HttpHit {
    /// Message `.0` of the inspected payload ([`HttpScratch::cur`]).
    Payload(usize),
    /// Event `.0` of the flow's HTTP state ([`Engine::hframe`]).
    Stream(usize),
}

/// The first event of the flow's HTTP state for this segment whose message the program
/// matches now but did not match as it was before the segment.
///
/// A segment that only extended a body (`OldView::Body`) changes nothing a rule that reads no
/// body buffer sees, so such a rule is not run on it (`reads_body` false): it would match now
/// exactly when it matched before.
fn stream_http_match(
    prog: &mut Program,
    memo: &mut Memo,
    f: &HttpFrame,
    reads_body: bool,
) -> Option<usize> {
    for (k, e) in f.events.iter().enumerate() {
        if e.old == OldView::Body && !reads_body {
            continue;
        }
        let Some(m) = f.view.messages().get(e.msg) else {
            continue;
        };
        if !prog.matches_buffers(&f.view.buffers(m, &f.heads), memo) {
            continue;
        }
        let old = match e.old {
            OldView::None => None,
            OldView::Head(j) => f
                .old
                .messages()
                .get(j)
                .map(|om| f.old.buffers(om, &f.heads)),
            OldView::Body => f.view.old_buffers(m, &f.heads),
        };
        if old.is_some_and(|b| prog.matches_buffers(&b, memo)) {
            continue;
        }
        return Some(k);
    }
    None
}

// The engine is built where the blob is (the BSP at boot) and then runs on a DPI core.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Engine>();
};

fn class_of_rule(p: Proto) -> Option<usize> {
    match p {
        Proto::Tcp => Some(C_TCP),
        Proto::Udp => Some(C_UDP),
        Proto::Icmp => Some(C_ICMP),
        Proto::Ip => None,
    }
}

/// Whether an `ip` rule can match packets of `class`. With `ip_proto:N` it can only match
/// packets of that protocol: their class, or the "other" class where packets land whose L4
/// header did not decode (non-first fragments, truncated headers).
fn ip_rule_fits_class(r: &Rule, class: usize) -> bool {
    // `alert dns` (DNS over UDP or TCP).
    if r.app_proto.is_some() {
        return matches!(class, C_TCP | C_UDP);
    }
    let Some(rules::NumCheck::Eq(n)) = r.hdr.ip_proto else {
        return true;
    };
    let proto_class = match n {
        6 => C_TCP,
        17 => C_UDP,
        1 | 58 => C_ICMP,
        _ => C_OTHER,
    };
    class == proto_class || class == C_OTHER
}

fn class_of_packet(p: &Packet<'_>) -> usize {
    match p.l4 {
        L4::Tcp { .. } => C_TCP,
        L4::Udp { .. } => C_UDP,
        L4::Icmp { .. } => C_ICMP,
        L4::Other => C_OTHER,
    }
}

impl Engine {
    /// An engine with no rules: every frame passes.
    pub fn pass_all() -> Engine {
        Engine::new(Vec::new(), EngineConfig::default()).unwrap_or_else(|_| unreachable!())
    }

    /// Verifies a compiled blob and builds the engine.
    pub fn from_blob(blob: &[u8], cfg: EngineConfig) -> Result<Engine, EngineError> {
        Engine::new(blob::decode(blob)?, cfg)
    }

    /// Builds the engine from parsed rules.
    pub fn new(mut rules: Vec<Rule>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        // Pass rules first, then drop, then alert; file order within an action.
        rules.sort_by_key(|r| (r.action, flowbit_rank(r)));
        let has_app = rules.iter().any(|r| r.app_proto.is_some());
        // Detected protocols are kept per flow, so app rules need the flow table.
        let needs_flow = has_app
            || rules
                .iter()
                .any(|r| r.flow.is_set() || !r.flowbits.is_empty());
        let mut bit_of: BTreeMap<String, u32> = BTreeMap::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for rule in rules {
            let program = Program::new(&rule).map_err(|reason| EngineError::Pcre {
                sid: rule.sid,
                reason,
            })?;
            let (mut fb_checks, mut fb_actions) = (Vec::new(), Vec::new());
            for fb in &rule.flowbits {
                let mut mask = 0u128;
                for name in &fb.names {
                    let next = bit_of.len() as u32;
                    let bit = *bit_of.entry(name.clone()).or_insert(next);
                    if bit as usize >= MAX_FLOWBITS {
                        return Err(EngineError::TooManyFlowbits { sid: rule.sid });
                    }
                    mask |= 1u128 << bit;
                }
                if fb.cmd.is_check() {
                    fb_checks.push((fb.cmd, mask, fb.any));
                } else {
                    fb_actions.push((fb.cmd, mask));
                }
            }
            let on_stream = stream_eligible(&rule);
            let http = program.uses_http();
            let reads_body = rule.reads_body();
            let msg = rule
                .message_proto()
                .filter(|p| matches!(p, AppProto::Dns | AppProto::Tls));
            compiled.push(Compiled {
                msg,
                rule,
                program,
                rate: eve::RateLimit::default(),
                fb_checks,
                fb_actions,
                df_hosts: Vec::new(),
                on_stream,
                http,
                reads_body,
            });
        }
        let mut engine = Engine {
            rules: compiled,
            groups: Vec::new(),
            classes: Default::default(),
            flows: FlowTable::new(cfg.flow),
            needs_flow,
            cfg,
            stats: EngineStats::default(),
            lit_marks: Marks::default(),
            rule_marks: Marks::default(),
            cands: Vec::new(),
            memo: Memo::default(),
            stream: cfg.stream.map(StreamTracker::new),
            defrag: cfg
                .defrag
                .map(|dc| Defragmenter::new(DefragConfig { hold: false, ..dc })),
            win: Vec::new(),
            last_expire: 0,
            http_flows: None,
            hframe: HttpFrame::default(),
            forward: [VecDeque::new(), VecDeque::new()],
            forward_bytes: 0,
            http_tracked: false,
            http: HttpScratch::default(),
            has_app,
            app: AppScratch::default(),
        };
        if let Some(sc) = cfg.stream {
            if engine.rules.iter().any(|c| c.http) {
                engine.http_flows = Some(HttpFlows::new(sc.max_flows, cfg.http));
            }
        }
        engine.build_groups()?;
        Ok(engine)
    }

    fn build_groups(&mut self) -> Result<(), EngineError> {
        // Rule sets keyed by member list, so identical groups (e.g. every $HTTP_PORTS port)
        // share one prefilter.
        let mut by_members: BTreeMap<Vec<u32>, u32> = BTreeMap::new();
        for class in 0..CLASSES {
            let mut generic: Vec<u32> = Vec::new();
            let mut dst: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
            let mut src: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
            for (i, c) in self.rules.iter().enumerate() {
                let r = &c.rule;
                let i = i as u32;
                match class_of_rule(r.proto) {
                    None => {
                        if ip_rule_fits_class(r, class) {
                            generic.push(i);
                        }
                        continue;
                    }
                    Some(k) if k != class => continue,
                    Some(_) => {}
                }
                if r.bidirectional || class == C_ICMP {
                    generic.push(i);
                } else if let Some(ports) = r.dst_ports.enumerate(MAX_GROUP_PORTS) {
                    ports
                        .into_iter()
                        .for_each(|p| dst.entry(p).or_default().push(i));
                } else if let Some(ports) = r.src_ports.enumerate(MAX_GROUP_PORTS) {
                    ports
                        .into_iter()
                        .for_each(|p| src.entry(p).or_default().push(i));
                } else {
                    generic.push(i);
                }
            }
            let mut pg = ProtoGroups::default();
            for (map, out) in [(dst, &mut pg.dst), (src, &mut pg.src)] {
                for (port, mut members) in map {
                    // Port groups include the generic rules so that most packets need one scan.
                    members.extend_from_slice(&generic);
                    members.sort_unstable();
                    let g = self.group_for(&mut by_members, members)?;
                    out.push((port, g));
                }
            }
            if !generic.is_empty() {
                pg.generic = Some(self.group_for(&mut by_members, generic)?);
            }
            self.classes[class] = pg;
        }
        Ok(())
    }

    fn group_for(
        &mut self,
        by_members: &mut BTreeMap<Vec<u32>, u32>,
        members: Vec<u32>,
    ) -> Result<u32, EngineError> {
        if let Some(&g) = by_members.get(&members) {
            return Ok(g);
        }
        let mut lits = Vec::new();
        let mut lit_rule = Vec::new();
        let mut always = Vec::new();
        let mut decoded = false;
        let mut dns_names = false;
        let mut sni_dot = false;
        let mut http = false;
        let mut body_sticky = Vec::new();
        for &i in &members {
            let c = &self.rules[i as usize];
            http |= c.http;
            let fast = c.rule.fast_pattern();
            let fast_in_body = fast
                .as_ref()
                .is_some_and(|fp| fp.buffer.is_some_and(rules::HttpBuffer::is_body));
            if c.reads_body && !fast_in_body {
                body_sticky.push(i);
            }
            match fast {
                Some(fp) => {
                    decoded |= fp.buffer.is_some_and(rules::HttpBuffer::may_be_decoded);
                    dns_names |= matches!(
                        fp.app_buffer,
                        Some(rules::AppBuffer::DnsQuery | rules::AppBuffer::DnsQueryDot)
                    );
                    sni_dot |= fp.app_buffer == Some(rules::AppBuffer::TlsSniDot);
                    lits.push((fp.bytes.to_vec(), fp.nocase));
                    lit_rule.push(i);
                }
                None => always.push(i),
            }
        }
        let pf = Prefilter::new(&lits).map_err(EngineError::Prefilter)?;
        let g = self.groups.len() as u32;
        self.groups.push(Group {
            pf,
            lit_rule,
            always,
            decoded,
            http,
            body_sticky,
            dns_names,
            sni_dot,
        });
        by_members.insert(members, g);
        Ok(g)
    }

    /// Number of loaded rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// One line for the boot log: the loaded rule count by action, or that everything passes.
    pub fn summary(&self) -> EngineSummary {
        let mut by_action = [0usize; 3];
        for c in &self.rules {
            by_action[c.rule.action as usize] += 1;
        }
        EngineSummary {
            rules: self.rules.len(),
            pass: by_action[Action::Pass as usize],
            drop: by_action[Action::Drop as usize],
            alert: by_action[Action::Alert as usize],
            groups: self.groups.len(),
            bytes: self.memory_usage(),
        }
    }

    /// Number of distinct rule groups (each with its own prefilter).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Reassembler counters.
    pub fn defrag_stats(&self) -> DefragStats {
        self.defrag.as_ref().map(|d| d.stats()).unwrap_or_default()
    }

    /// Worst-case heap bytes of the reassembler ([`DefragConfig::heap_bound`]).
    pub fn defrag_bound_bytes(&self) -> usize {
        self.cfg.defrag.map_or(0, |d| d.heap_bound())
    }

    /// Stream-tracker counters (drops by reason in `.drops`).
    pub fn stream_stats(&self) -> StreamStats {
        self.stream.as_ref().map(|t| t.stats()).unwrap_or_default()
    }

    /// Worst-case heap bytes of the stream tracker under its configuration (see [`stream`]'s
    /// bounds): flow entries with their context plus `max_total_bytes`.
    pub fn stream_bound_bytes(&self) -> usize {
        self.cfg.stream.map_or(0, |s| s.heap_bound())
    }

    /// Counters of the per-flow HTTP state.
    pub fn http_state_stats(&self) -> HttpStateStats {
        self.http_flows
            .as_ref()
            .map(|h| h.stats())
            .unwrap_or_default()
    }

    /// Worst-case heap bytes of the per-flow HTTP state ([`HttpStateConfig::heap_bound`]; 0
    /// without a stream tracker).
    pub fn http_state_bound_bytes(&self) -> usize {
        self.cfg
            .stream
            .map_or(0, |s| self.cfg.http.heap_bound(s.max_flows))
    }

    /// Flow-table counters.
    pub fn flow_stats(&self) -> FlowStats {
        self.flows.stats()
    }

    /// Approximate heap bytes of the compiled ruleset: prefilters, group tables, regexes and
    /// rule data (the flow table is separate: [`Engine::flow_table_bytes`]).
    pub fn memory_usage(&self) -> usize {
        let (g, r) = self.memory_breakdown();
        g + r
    }

    /// (prefilter groups, rules incl. regexes) heap bytes.
    pub fn memory_breakdown(&self) -> (usize, usize) {
        let groups: usize = self
            .groups
            .iter()
            .map(|g| g.pf.memory_usage() + (g.lit_rule.len() + g.always.len()) * 4)
            .sum();
        let rules: usize = self
            .rules
            .iter()
            .map(|c| {
                core::mem::size_of::<Compiled>() + rule_heap(&c.rule) + c.program.memory_usage()
            })
            .sum();
        let classes: usize = self
            .classes
            .iter()
            .map(|c| (c.dst.len() + c.src.len()) * 8)
            .sum();
        (groups + classes, rules)
    }

    /// Bytes of the flow table.
    pub fn flow_table_bytes(&self) -> usize {
        self.flows.memory_usage()
    }

    /// Runs only the prefilter stage on a frame and returns the number of candidate rules
    /// (benchmarks use this to time the prefilter alone).
    pub fn prefilter_only(&mut self, frame: &[u8]) -> usize {
        let Decoded::Ip(pkt) = packet::decode(frame) else {
            return 0;
        };
        self.http.cur_done = false;
        self.app.reset();
        let http_p = if matches!(pkt.l4, L4::Tcp { .. }) {
            pkt.payload
        } else {
            &[]
        };
        self.collect_candidates(&pkt, &[], http_p, 0);
        self.cands.len()
    }

    /// Candidates from the prefilter over the payload and, if not empty, the stream window
    /// (`win`; the payload is not scanned again when it is the window's tail). In groups with
    /// fast patterns in decodable HTTP buffers, the decoded buffers of the HTTP messages of
    /// `http_p` (new bytes from `http_new`) are scanned too; every other buffer is a slice of
    /// the payload or window, which are scanned already.
    fn collect_candidates(&mut self, pkt: &Packet<'_>, win: &[u8], http_p: &[u8], http_new: usize) {
        self.cands.clear();
        self.rule_marks.begin(self.rules.len());
        let class = &self.classes[class_of_packet(pkt)];
        let (sp, dp) = pkt.ports();
        let lookup =
            |v: &[(u16, u32)], p: u16| v.binary_search_by_key(&p, |e| e.0).ok().map(|i| v[i].1);
        // Port groups contain the generic rules; a packet with both a destination and a source
        // port group scans both, and the marks keep a generic rule from being evaluated twice.
        let (dg, sg) = (lookup(&class.dst, dp), lookup(&class.src, sp));
        let scan = if dg.is_none() && sg.is_none() {
            [class.generic, None]
        } else {
            [dg, sg]
        };
        for g in scan.into_iter().flatten() {
            let group = &self.groups[g as usize];
            self.lit_marks.begin(group.pf.len());
            let (marks, cands, lit_rule) = (&mut self.rule_marks, &mut self.cands, &group.lit_rule);
            let mut push = |lit: usize| {
                let r = lit_rule[lit];
                if marks.first(r as usize) {
                    cands.push(r);
                }
            };
            if win.is_empty() || !win.ends_with(pkt.payload) {
                group.pf.scan(pkt.payload, &mut self.lit_marks, &mut push);
            }
            if !win.is_empty() {
                group.pf.scan(win, &mut self.lit_marks, &mut push);
            }
            if group.decoded && !http_p.is_empty() {
                let view = self.http.current(http_p, http_new);
                for m in view.messages() {
                    for d in view.decoded(m) {
                        group.pf.scan(d, &mut self.lit_marks, &mut push);
                    }
                }
            }
            let mut body_extended = false;
            if group.http {
                let f = &self.hframe;
                for e in &f.events {
                    let Some(m) = f.view.messages().get(e.msg) else {
                        continue;
                    };
                    if e.old != OldView::Body {
                        // The head, and the buffers that are not a slice of it (normalized,
                        // decoded, the body window).
                        let head = f.view.buffers(m, &f.heads).pkt;
                        group.pf.scan(head, &mut self.lit_marks, &mut push);
                        for x in f.view.decoded(m) {
                            group.pf.scan(x, &mut self.lit_marks, &mut push);
                        }
                        continue;
                    }
                    // The segment only extended the body: a rule can newly match only if it
                    // reads a body buffer (one on the head alone matched, or not, when the
                    // head was complete, and counts only when it did not match before). Such
                    // a rule's fast pattern in a body window is found by scanning the
                    // windows, except that `file_data` of a body neither chunked nor coded
                    // is bytes of the stream window, scanned above; with its fast pattern
                    // elsewhere it is a candidate on every body segment.
                    let raw =
                        m.coding == http::Coding::Identity && m.framing != http::Framing::Chunked;
                    for buffer in [rules::HttpBuffer::FileData, rules::HttpBuffer::ClientBody] {
                        if buffer == rules::HttpBuffer::FileData && raw {
                            continue;
                        }
                        if let Some(x) = f.view.buffer(m, buffer, &f.heads) {
                            group.pf.scan(x, &mut self.lit_marks, &mut push);
                        }
                    }
                    body_extended = true;
                }
            }
            if group.dns_names {
                if let Some(tcp) = tcp_or_udp(pkt) {
                    let view = self.app.dns(pkt.payload, tcp);
                    for q in view.questions() {
                        group
                            .pf
                            .scan(view.dot_name(q), &mut self.lit_marks, &mut push);
                    }
                }
            }
            if group.sni_dot && matches!(pkt.l4, L4::Tcp { .. }) {
                self.app.tls(pkt.payload);
                group
                    .pf
                    .scan(&self.app.sni_dot, &mut self.lit_marks, &mut push);
            }
            let sticky = if body_extended {
                &group.body_sticky[..]
            } else {
                &[]
            };
            for &r in group.always.iter().chain(sticky) {
                if self.rule_marks.first(r as usize) {
                    self.cands.push(r);
                }
            }
        }
        self.cands.sort_unstable();
    }
}

/// `Some(true)` for TCP, `Some(false)` for UDP, else `None`.
fn tcp_or_udp(pkt: &Packet<'_>) -> Option<bool> {
    match pkt.l4 {
        L4::Tcp { .. } => Some(true),
        L4::Udp { .. } => Some(false),
        _ => None,
    }
}

fn rule_heap(r: &Rule) -> usize {
    let ops: usize = r
        .ops
        .iter()
        .map(|o| match o {
            rules::PayloadOp::Content(c) => c.pattern.len(),
            rules::PayloadOp::Pcre(p) => p.source.len() + p.flags.len(),
            _ => 0,
        })
        .sum();
    r.msg.len() + ops + r.ops.len() * core::mem::size_of::<rules::PayloadOp>()
}

fn header_matches(r: &Rule, pkt: &Packet<'_>) -> bool {
    let (sp, dp) = pkt.ports();
    let fwd = r.src.contains(pkt.src)
        && r.dst.contains(pkt.dst)
        && r.src_ports.contains(sp)
        && r.dst_ports.contains(dp);
    fwd || (r.bidirectional
        && r.src.contains(pkt.dst)
        && r.dst.contains(pkt.src)
        && r.src_ports.contains(dp)
        && r.dst_ports.contains(sp))
}

/// `itype`/`icode`/`icmp_id`/`icmp_seq`; echo id/seq only on echo request/reply (ICMP 8/0,
/// ICMPv6 128/129).
fn icmp_matches(c: &rules::IcmpCheck, pkt: &Packet<'_>) -> bool {
    if !c.is_set() {
        return true;
    }
    let L4::Icmp {
        v6,
        itype,
        code,
        id,
        seq,
    } = pkt.l4
    else {
        return false;
    };
    let echo = if v6 {
        matches!(itype, 128 | 129)
    } else {
        matches!(itype, 0 | 8)
    };
    c.itype.is_none_or(|t| t.check(usize::from(itype)))
        && c.icode.is_none_or(|t| t.check(usize::from(code)))
        && c.id.is_none_or(|x| echo && x == id)
        && c.seq.is_none_or(|x| echo && x == seq)
}

fn header_fields_match(h: &rules::HeaderCheck, pkt: &Packet<'_>) -> bool {
    let num = |c: Option<rules::NumCheck>, v: Option<u32>| match (c, v) {
        (None, _) => true,
        (Some(c), Some(v)) => c.check(v as usize),
        (Some(_), None) => false,
    };
    let (seq, ack) = match pkt.l4 {
        L4::Tcp { seq, ack, .. } => (Some(seq), Some(ack)),
        _ => (None, None),
    };
    num(h.ttl, Some(u32::from(pkt.ip.ttl)))
        && num(h.id, pkt.ip.id)
        && num(h.ip_proto, Some(u32::from(pkt.proto)))
        && num(h.seq, seq)
        && num(h.ack, ack)
        && h.fragbits.is_none_or(|f| f.check(pkt.ip.frag_bits))
}

fn tcp_flags_match(t: Option<rules::TcpFlags>, pkt: &Packet<'_>) -> bool {
    match (t, pkt.l4) {
        (None, _) => true,
        (Some(t), L4::Tcp { flags, .. }) => t.check(flags),
        (Some(_), _) => false,
    }
}

/// Flowbit conditions against the packet's flow (bits are all clear without a flow).
fn flowbits_hold(checks: &[(rules::FlowbitCmd, u128, bool)], bits: u128, has_flow: bool) -> bool {
    let bits = if has_flow { bits } else { 0 };
    checks.iter().all(|&(cmd, mask, any)| {
        let set = bits & mask;
        match (cmd, any) {
            (rules::FlowbitCmd::IsSet, false) => set == mask,
            (rules::FlowbitCmd::IsSet, true) => set != 0,
            (_, false) => set == 0,
            (_, true) => set != mask,
        }
    })
}

fn flow_matches(f: &rules::FlowCheck, info: Option<FlowInfo>) -> bool {
    if !f.is_set() {
        return true;
    }
    let needs_state = f.to_server.is_some() || f.established || f.not_established;
    if !needs_state {
        return true; // `stateless` only
    }
    let Some(info) = info else { return false };
    f.to_server.is_none_or(|ts| ts == info.to_server)
        && (!f.established || info.established)
        && (!f.not_established || !info.established)
}

impl Inspector for Engine {
    fn inspect(
        &mut self,
        frame: &[u8],
        dir: Direction,
        now: Timestamp,
        sink: &mut dyn AlertSink,
    ) -> Verdict {
        let Some(defrag) = self.defrag.as_mut() else {
            return self.inspect_datagram(frame, dir, now, sink);
        };
        if self.rules.is_empty() {
            return self.inspect_datagram(frame, dir, now, sink);
        }
        match defrag.push(frame, now) {
            FragOutcome::NotFragment => self.inspect_datagram(frame, dir, now, sink),
            FragOutcome::Forward => {
                self.stats.frames += 1;
                self.stats.passed += 1;
                self.stats.frag_forwarded += 1;
                Verdict::Pass
            }
            // `Held` is not produced in forward mode; never forward a frame the reassembler
            // kept.
            FragOutcome::Held | FragOutcome::Drop(_) => {
                self.stats.frames += 1;
                self.stats.dropped += 1;
                self.stats.frag_dropped += 1;
                Verdict::Drop
            }
            FragOutcome::Complete { datagram, .. } => {
                // The rules judge the whole datagram; the verdict is the completing
                // fragment's.
                let v = self.inspect_datagram(&datagram, dir, now, sink);
                if v == Verdict::Drop {
                    let remembered = self.defrag.as_mut().is_some_and(|d| d.block_completed(now));
                    if !remembered {
                        self.stats.frag_unblocked += 1;
                    }
                }
                v
            }
        }
    }
}

impl Engine {
    /// Inspects one frame that is not a fragment (or a reassembled datagram).
    fn inspect_datagram(
        &mut self,
        frame: &[u8],
        dir: Direction,
        now: Timestamp,
        sink: &mut dyn AlertSink,
    ) -> Verdict {
        self.stats.frames += 1;
        let Decoded::Ip(pkt) = packet::decode(frame) else {
            self.stats.not_ip += 1;
            return Verdict::Pass;
        };
        // With a stream tracker a TCP segment changes its flow's state (flowbits; an RST
        // ending it) only once the tracker accepted it: one it drops never reaches the
        // receiver (a spoofed RST must not wipe the flowbits), one it holds is tracked when
        // released.
        let defer_flow = self.stream.is_some() && matches!(pkt.l4, packet::L4::Tcp { .. });
        let info = if self.needs_flow && !defer_flow {
            self.flows.track(&pkt, now.0)
        } else {
            None
        };
        if self.rules.is_empty() {
            self.stats.passed += 1;
            return Verdict::Pass;
        }
        let Some(tracker) = self.stream.as_mut() else {
            return self.judge(&pkt, frame, info, dir, now, sink, None, 0);
        };
        if now.0.saturating_sub(self.last_expire) >= 1_000_000
            || self.stats.frames.is_multiple_of(4096)
        {
            self.last_expire = now.0;
            tracker.expire(now);
            if let Some(d) = self.defrag.as_mut() {
                d.expire(now);
            }
            if let Some(h) = self.http_flows.as_mut() {
                h.sweep(|slot, serial| tracker.is_live(slot, serial));
            }
        }
        // The stream window (empty when the frame is judged per packet) and where its new bytes
        // start.
        let mut win = core::mem::take(&mut self.win);
        win.clear();
        self.hframe.clear();
        self.http_tracked = false;
        let (mut stream_flow, mut new_from) = (None, 0);
        match tracker.segment_tagged(&pkt, frame, now, dir.index() as u8) {
            StreamOutcome::NotTcp => {}
            StreamOutcome::Untracked => self.stats.stream_untracked += 1,
            StreamOutcome::Held => {
                // The tracker keeps a copy: judged and forwarded once in order.
                self.win = win;
                self.stats.held += 1;
                return Verdict::Hold;
            }
            StreamOutcome::Drop(_) => {
                self.win = win;
                self.stats.stream_dropped += 1;
                self.stats.dropped += 1;
                return Verdict::Drop;
            }
            StreamOutcome::Accept {
                flow,
                dir: sdir,
                window,
                new_from: nf,
            } => {
                win.extend_from_slice(window);
                stream_flow = Some(flow);
                new_from = nf;
                let to_server = sdir == stream::StreamDir::ToServer;
                if !self.feed_http(flow, to_server, &win, nf) {
                    self.win = win;
                    self.stats.http_dropped += 1;
                    self.stats.dropped += 1;
                    sink.dropped(frame, dir, now);
                    return Verdict::Drop;
                }
            }
        }
        let info = if self.needs_flow && defer_flow {
            self.flows.track(&pkt, now.0)
        } else {
            info
        };
        let v = self.judge(
            &pkt,
            frame,
            info,
            dir,
            now,
            sink,
            stream_flow.map(|f| (f, &win[..])),
            new_from,
        );
        self.win = win;
        self.judge_released(now, sink);
        v
    }
}

/// Bytes of released segments the forward queues hold at most (both directions): beyond
/// it a released segment is dropped ([`EngineStats::forward_full`]) and its sender resends
/// it. The tracker's own bound on held bytes keeps this from being reached while the caller
/// takes what is released after every frame.
const FORWARD_MAX_BYTES: usize = 512 * 1024;

impl Engine {
    /// Feeds a stream segment's new bytes (`win[new_from..]`) to the flow's HTTP state and
    /// notes whether it parses that direction. `false`: the segment is dropped and the flow
    /// blocked (the HTTP state refused it under the fail-closed policy).
    fn feed_http(
        &mut self,
        flow: stream::FlowId,
        to_server: bool,
        win: &[u8],
        new_from: usize,
    ) -> bool {
        self.hframe.clear();
        self.http_tracked = false;
        let fed = match self.http_flows.as_mut() {
            Some(h) if new_from < win.len() => h.feed(
                flow,
                to_server,
                &win[new_from..],
                &mut self.http.parser,
                &mut self.hframe,
            ),
            _ => Ok(()),
        };
        if fed.is_err() {
            let fail_closed = self
                .stream
                .as_ref()
                .is_some_and(|t| t.on_limit() == stream::LimitPolicy::FailClosed);
            if let Some(h) = self.http_flows.as_mut() {
                if fail_closed {
                    h.forget(flow);
                } else {
                    h.give_up(flow, to_server);
                }
            }
            self.hframe.clear();
            if fail_closed {
                // The tracker accepted these bytes: only blocking the flow keeps a
                // retransmission of them from passing uninspected.
                if let Some(t) = self.stream.as_mut() {
                    t.block(flow);
                }
                return false;
            }
        }
        self.http_tracked = self
            .http_flows
            .as_ref()
            .is_some_and(|h| h.parses(flow, to_server));
        true
    }

    /// Judges the held segments the last frame released, in order, and queues those that
    /// pass for [`Engine::take_forward`].
    fn judge_released(&mut self, now: Timestamp, sink: &mut dyn AlertSink) {
        loop {
            let Some(r) = self.stream.as_mut().and_then(StreamTracker::take_released) else {
                return;
            };
            let dir = Direction::from_index(r.tag);
            let Decoded::Ip(pkt) = packet::decode(&r.frame) else {
                continue;
            };
            let info = if self.needs_flow {
                self.flows.track(&pkt, now.0)
            } else {
                None
            };
            let to_server = r.dir == stream::StreamDir::ToServer;
            let v = if self.feed_http(r.flow, to_server, &r.window, r.new_from) {
                self.judge(
                    &pkt,
                    &r.frame,
                    info,
                    dir,
                    now,
                    sink,
                    Some((r.flow, &r.window[..])),
                    r.new_from,
                )
            } else {
                self.stats.http_dropped += 1;
                self.stats.dropped += 1;
                sink.dropped(&r.frame, dir, now);
                Verdict::Drop
            };
            if v == Verdict::Drop {
                continue;
            }
            self.stats.released += 1;
            if self.forward_bytes + r.frame.len() > FORWARD_MAX_BYTES {
                self.stats.forward_full += 1;
                continue;
            }
            self.forward_bytes += r.frame.len();
            self.forward[dir.index()].push_back(r.frame);
        }
    }

    /// The next released segment to forward in direction `dir` (judged and passed; in the
    /// order its stream needs). Call after every frame until `None`, or when the ring has
    /// room again.
    pub fn take_forward(&mut self, dir: Direction) -> Option<Vec<u8>> {
        let f = self.forward[dir.index()].pop_front()?;
        self.forward_bytes -= f.len();
        Some(f)
    }

    /// Whether released segments wait for [`Engine::take_forward`].
    pub fn has_forward(&self) -> bool {
        self.forward_bytes != 0
    }
}

impl Engine {
    /// Runs the rules on a decoded frame; `stream` is its flow and stream window when the
    /// tracker accepted it (new bytes from `new_from`).
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &mut self,
        pkt: &Packet<'_>,
        frame: &[u8],
        info: Option<FlowInfo>,
        dir: Direction,
        now: Timestamp,
        sink: &mut dyn AlertSink,
        stream: Option<(stream::FlowId, &[u8])>,
        new_from: usize,
    ) -> Verdict {
        let pkt = *pkt;
        let (stream_flow, win) = match stream {
            Some((f, w)) => (Some(f), w),
            None => (None, &[][..]),
        };
        // The payload HTTP rules read: none where the flow's HTTP state parses this direction,
        // else the stream window, else the segment (TCP only).
        let (http_p, http_new) = match (pkt.l4, stream_flow) {
            (L4::Tcp { .. }, Some(_)) if self.http_tracked => (&[][..], 0),
            (L4::Tcp { .. }, Some(_)) => (win, new_from),
            (L4::Tcp { .. }, None) => (pkt.payload, 0),
            _ => (&[][..], 0),
        };
        self.http.cur_done = false;
        self.http.old_done = false;
        self.app.reset();
        let l4 = tcp_or_udp(&pkt);
        // The application protocol: the flow's, and the payload's own (recorded on the flow
        // when it has none yet).
        let (flow_app, detected) = match l4 {
            Some(tcp) if self.has_app => {
                let flow_app = AppProto::from_code(self.flows.current_app());
                let p = pkt.payload;
                let detected = (if tcp { app::detect_tcp(p) } else { None })
                    .or_else(|| self.app.dns(p, tcp).is_dns().then_some(AppProto::Dns));
                if let (None, Some(d), Some(_)) = (flow_app, detected, info) {
                    self.flows.set_current_app(d.code());
                }
                (flow_app, detected)
            }
            _ => (None, None),
        };
        self.collect_candidates(&pkt, win, http_p, http_new);
        let mut verdict = Verdict::Pass;
        let (sp, dp) = pkt.ports();
        for k in 0..self.cands.len() {
            let r = self.cands[k] as usize;
            let c = &mut self.rules[r];
            self.stats.evaluated += 1;
            let on_stream = c.on_stream && stream_flow.is_some();
            let mut http_msg = None;
            let mut dns_q = None;
            let limit_hits = c.program.pcre_limit_hits();
            let rejected = !header_matches(&c.rule, &pkt)
                || !c.rule.app_proto.is_none_or(|a| {
                    c.msg == Some(a)
                        || (c.http && a == AppProto::Http)
                        || flow_app == Some(a)
                        || detected == Some(a)
                })
                || c.rule.dsize.is_some_and(|d| !d.check(pkt.payload.len()))
                || !flow_matches(&c.rule.flow, info)
                || (c.rule.flow.only_stream && stream_flow.is_none())
                || !icmp_matches(&c.rule.icmp, &pkt)
                || !tcp_flags_match(c.rule.tcp_flags, &pkt)
                || !header_fields_match(&c.rule.hdr, &pkt)
                || !flowbits_hold(&c.fb_checks, self.flows.current_bits(), info.is_some())
                || !(if let Some(m) = c.msg {
                    match (m, l4) {
                        (AppProto::Dns, Some(tcp)) => {
                            dns_q = dns_match(
                                &mut c.program,
                                &mut self.memo,
                                &mut self.app,
                                pkt.payload,
                                tcp,
                            );
                            dns_q.is_some()
                        }
                        (_, Some(true)) => tls_match(
                            &c.rule,
                            &mut c.program,
                            &mut self.memo,
                            &mut self.app,
                            pkt.payload,
                        ),
                        _ => false,
                    }
                } else if c.http {
                    http_msg = http_match(
                        &mut c.program,
                        &mut self.memo,
                        &mut self.http,
                        http_p,
                        http_new,
                    )
                    .map(HttpHit::Payload)
                    .or_else(|| {
                        stream_http_match(
                            &mut c.program,
                            &mut self.memo,
                            &self.hframe,
                            c.reads_body,
                        )
                        .map(HttpHit::Stream)
                    });
                    http_msg.is_some()
                } else if on_stream {
                    // A match counts only if none lies wholly in already-inspected bytes.
                    c.program.matches(win, &mut self.memo)
                        && (new_from == 0 || !c.program.matches(&win[..new_from], &mut self.memo))
                } else {
                    c.program.matches(pkt.payload, &mut self.memo)
                });
            // Counted here, once per evaluation that ran out, so that stats() is O(1).
            self.stats.pcre_limit += c.program.pcre_limit_hits() - limit_hits;
            if rejected {
                continue;
            }
            if let Some(df) = &c.rule.detection_filter {
                let host = if df.by_src { pkt.src } else { pkt.dst };
                if !detection_filter_exceeded(df, &mut c.df_hosts, host, now.0) {
                    continue;
                }
            }
            self.stats.matches += 1;
            if !c.fb_actions.is_empty() && info.is_some() {
                let mut bits = self.flows.current_bits();
                for &(cmd, mask) in &c.fb_actions {
                    bits = match cmd {
                        rules::FlowbitCmd::Set => bits | mask,
                        rules::FlowbitCmd::Unset => bits & !mask,
                        _ => bits ^ mask,
                    };
                }
                self.flows.set_current_bits(bits);
            }
            match c.rule.action {
                Action::Pass => {
                    self.stats.pass_rule += 1;
                    self.stats.passed += 1;
                    return Verdict::Pass;
                }
                Action::Drop => verdict = Verdict::Drop,
                Action::Alert if c.rule.noalert => {}
                Action::Alert => {
                    if verdict == Verdict::Pass {
                        verdict = Verdict::Alert;
                    }
                }
            }
            if c.rule.noalert {
                continue; // flowbits:noalert: matched (bits applied), nothing logged
            }
            match c.rate.admit(now.0, self.cfg.alerts_per_rule_per_sec) {
                Some(suppressed) => {
                    self.stats.alerts_emitted += 1;
                    let http = http_msg.and_then(|hit| match hit {
                        HttpHit::Payload(k) => {
                            let view = &self.http.cur;
                            view.messages().get(k).map(|m| view.meta(m, http_p))
                        }
                        HttpHit::Stream(k) => {
                            let f = &self.hframe;
                            let m = f.view.messages().get(f.events.get(k)?.msg)?;
                            Some(f.view.meta(m, &f.heads))
                        }
                    });
                    let app = eve::AppMeta {
                        proto: c.rule.app_proto.or(c.msg),
                        dns: dns_q.map(|_| &self.app.dns),
                        tls: (c.msg == Some(AppProto::Tls)).then(|| eve::TlsMeta {
                            sni: self.app.tls.sni(pkt.payload),
                            version: self.app.tls.version(),
                        }),
                    };
                    sink.alert(&Alert {
                        http,
                        app,
                        ts: now,
                        dir,
                        src: pkt.src,
                        sport: sp,
                        dst: pkt.dst,
                        dport: dp,
                        proto: pkt.proto,
                        rule: &c.rule,
                        suppressed,
                    });
                }
                None => self.stats.alerts_suppressed += 1,
            }
        }
        match verdict {
            Verdict::Pass => self.stats.passed += 1,
            Verdict::Alert => self.stats.alerted += 1,
            Verdict::Drop => {
                if let (Some(flow), Some(t)) = (stream_flow, self.stream.as_mut()) {
                    t.block(flow);
                    if let Some(h) = self.http_flows.as_mut() {
                        h.forget(flow);
                    }
                }
                self.stats.dropped += 1;
                sink.dropped(frame, dir, now);
            }
            // The rules never hold a frame (only the stream tracker does).
            Verdict::Hold => {}
        }
        verdict
    }
}
