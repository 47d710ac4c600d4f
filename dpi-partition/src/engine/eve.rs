//! Alerts: Suricata EVE JSON alert records, per-rule rate limiting, and the management-stream
//! (COM2) line format.
//!
//! Management stream, one record per line (`\n`-terminated, ASCII):
//!
//! ```text
//! ALLY eve {"timestamp":"2026-11-23T16:03:30.000123+0000","event_type":"alert",...}
//! ALLY pcap <ts_us> <to_wire|from_wire> <orig_len> <hex bytes of the first <=128 bytes>
//! ```
//!
//! `ALLY eve ` is followed by exactly one EVE JSON object. `ALLY pcap ` carries a dropped frame:
//! its timestamp in microseconds since the Unix epoch, the direction, the frame's full length,
//! and a bounded excerpt (lower-case hex, no separators). `ally-tools eve split` turns a captured
//! stream into `eve.json` (one object per line) and a pcap file (link type Ethernet). Other lines
//! (boot log) are ignored by the splitter.

use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::net::IpAddr;

use super::dns::{self, DnsView};
use super::http::HttpMeta;
use super::rules::{Action, AppProto, Rule};
use super::tls;
use super::{Direction, Timestamp};

/// Prefix of an alert line.
pub const EVE_PREFIX: &str = "ALLY eve ";
/// Prefix of a dropped-frame line.
pub const PCAP_PREFIX: &str = "ALLY pcap ";
/// Default bound of a dropped-frame excerpt.
pub const DEFAULT_EXCERPT: usize = 128;

/// `classification.config` of Snort: classtype → (category text, default priority).
const CLASSTYPES: &[(&str, &str, u32)] = &[
    ("not-suspicious", "Not Suspicious Traffic", 3),
    ("unknown", "Unknown Traffic", 3),
    ("bad-unknown", "Potentially Bad Traffic", 2),
    ("attempted-recon", "Attempted Information Leak", 2),
    ("successful-recon-limited", "Information Leak", 2),
    (
        "successful-recon-largescale",
        "Large Scale Information Leak",
        2,
    ),
    ("attempted-dos", "Attempted Denial of Service", 2),
    ("successful-dos", "Denial of Service", 2),
    ("attempted-user", "Attempted User Privilege Gain", 1),
    ("unsuccessful-user", "Unsuccessful User Privilege Gain", 1),
    ("successful-user", "Successful User Privilege Gain", 1),
    (
        "attempted-admin",
        "Attempted Administrator Privilege Gain",
        1,
    ),
    (
        "successful-admin",
        "Successful Administrator Privilege Gain",
        1,
    ),
    ("rpc-portmap-decode", "Decode of an RPC Query", 2),
    ("shellcode-detect", "Executable code was detected", 1),
    ("string-detect", "A suspicious string was detected", 3),
    (
        "suspicious-filename-detect",
        "A suspicious filename was detected",
        2,
    ),
    (
        "suspicious-login",
        "An attempted login using a suspicious username was detected",
        2,
    ),
    ("system-call-detect", "A system call was detected", 2),
    ("tcp-connection", "A TCP connection was detected", 4),
    ("trojan-activity", "A Network Trojan was detected", 1),
    (
        "unusual-client-port-connection",
        "A client was using an unusual port",
        2,
    ),
    ("network-scan", "Detection of a Network Scan", 3),
    (
        "denial-of-service",
        "Detection of a Denial of Service Attack",
        2,
    ),
    (
        "non-standard-protocol",
        "Detection of a non-standard protocol or event",
        2,
    ),
    (
        "protocol-command-decode",
        "Generic Protocol Command Decode",
        3,
    ),
    (
        "web-application-activity",
        "access to a potentially vulnerable web application",
        2,
    ),
    ("web-application-attack", "Web Application Attack", 1),
    ("misc-activity", "Misc activity", 3),
    ("misc-attack", "Misc Attack", 2),
    ("icmp-event", "Generic ICMP event", 3),
    (
        "inappropriate-content",
        "Inappropriate Content was Detected",
        1,
    ),
    (
        "policy-violation",
        "Potential Corporate Privacy Violation",
        1,
    ),
    (
        "default-login-attempt",
        "Attempt to login by a default username and password",
        2,
    ),
    (
        "sdf",
        "Sensitive Data was Transmitted Across the Network",
        2,
    ),
    (
        "file-format",
        "Known malicious file or file based exploit",
        1,
    ),
    (
        "malware-cnc",
        "Known malware command and control traffic",
        1,
    ),
    (
        "client-side-exploit",
        "Known client side exploit attempt",
        1,
    ),
];

/// (category, severity) of a rule: the classtype's description and priority, overridden by
/// `priority`; unknown or missing classtype: the classtype name (or empty) and severity 3.
pub fn category_and_severity(rule: &Rule) -> (&str, u32) {
    let (cat, prio) = match rule.classtype.as_deref() {
        Some(c) => CLASSTYPES
            .iter()
            .find(|x| x.0 == c)
            .map_or((c, 3), |&(_, text, p)| (text, p)),
        None => ("", 3),
    };
    (cat, rule.priority.unwrap_or(prio))
}

/// One alert, as handed to an [`AlertSink`].
#[derive(Clone, Copy, Debug)]
pub struct Alert<'a> {
    /// Packet time.
    pub ts: Timestamp,
    /// Direction of the frame.
    pub dir: Direction,
    /// Source address.
    pub src: IpAddr,
    /// Source port (0 without ports).
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// The rule that matched.
    pub rule: &'a Rule,
    /// Alerts of this rule suppressed by the rate limit since its previous emitted alert.
    pub suppressed: u64,
    /// The HTTP message the rule matched, for rules with HTTP buffers.
    pub http: Option<HttpMeta<'a>>,
    /// The application protocol and its DNS/TLS metadata, for rules with a protocol header or
    /// DNS/TLS buffers.
    pub app: AppMeta<'a>,
}

/// What an EVE record tells about a DNS or TLS match.
#[derive(Clone, Copy, Debug, Default)]
pub struct AppMeta<'a> {
    /// `app_proto`: the rule's header protocol, or the protocol of its buffers.
    pub proto: Option<AppProto>,
    /// The DNS message whose question matched (`dns.query` records every question).
    pub dns: Option<&'a DnsView>,
    /// The TLS payload the rule matched.
    pub tls: Option<TlsMeta<'a>>,
}

/// EVE `tls` fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsMeta<'a> {
    /// SNI host name.
    pub sni: Option<&'a [u8]>,
    /// Hello version ([`super::tls::TlsView::version`]).
    pub version: Option<u16>,
}

/// Receives alerts and dropped frames from the engine.
pub trait AlertSink {
    /// A rule matched (already rate limited).
    fn alert(&mut self, alert: &Alert<'_>);
    /// A frame was dropped by a `drop` rule.
    fn dropped(&mut self, frame: &[u8], dir: Direction, ts: Timestamp);
}

/// Discards everything.
#[derive(Debug, Default)]
pub struct NullSink;

impl AlertSink for NullSink {
    fn alert(&mut self, _: &Alert<'_>) {}
    fn dropped(&mut self, _: &[u8], _: Direction, _: Timestamp) {}
}

fn proto_name(p: u8) -> Option<&'static str> {
    Some(match p {
        1 => "ICMP",
        6 => "TCP",
        17 => "UDP",
        58 => "IPv6-ICMP",
        _ => return None,
    })
}

/// Writes `s` as a JSON string literal.
pub fn write_json_str(w: &mut dyn Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

/// Writes bytes as a JSON string literal: printable ASCII as is, everything else escaped as
/// `\u00XX` (each byte as its Latin-1 code point).
pub fn write_json_bytes(w: &mut dyn Write, s: &[u8]) -> fmt::Result {
    w.write_char('"')?;
    for &b in s {
        match b {
            b'"' => w.write_str("\\\"")?,
            b'\\' => w.write_str("\\\\")?,
            0x20..=0x7e => w.write_char(b as char)?,
            _ => write!(w, "\\u{b:04x}")?,
        }
    }
    w.write_char('"')
}

/// Writes one EVE alert object (no trailing newline). An alert of a rule with HTTP buffers adds
/// `"app_proto":"http"` and an `http` object with what the matched message has of Suricata's
/// `hostname`, `url`, `http_user_agent`, `http_method` and `status` (a response carries no
/// request fields: no HTTP state links it to its request). A rule with a protocol header or
/// DNS/TLS buffers adds `app_proto`; a `dns.query` match adds
/// `"dns":{"query":[{"type":"query","id":N,"rrname":"...","rrtype":"A"},...]}` (every question
/// of the message; an unnamed type as its number), a TLS match `"tls":{"sni":...,"version":...}`
/// (what the payload has).
pub fn write_eve(w: &mut dyn Write, a: &Alert<'_>) -> fmt::Result {
    let (category, severity) = category_and_severity(a.rule);
    write!(w, "{{\"timestamp\":\"{}\",\"event_type\":\"alert\",", a.ts)?;
    write!(w, "\"src_ip\":\"{}\",\"src_port\":{},", a.src, a.sport)?;
    write!(w, "\"dest_ip\":\"{}\",\"dest_port\":{},", a.dst, a.dport)?;
    match proto_name(a.proto) {
        Some(p) => write!(w, "\"proto\":\"{p}\",")?,
        None => write!(w, "\"proto\":\"{}\",", a.proto)?,
    }
    write!(w, "\"direction\":\"{}\",", a.dir.name())?;
    let action = if a.rule.action == Action::Drop {
        "blocked"
    } else {
        "allowed"
    };
    write!(
        w,
        "\"alert\":{{\"action\":\"{action}\",\"gid\":{},",
        a.rule.gid
    )?;
    write!(
        w,
        "\"signature_id\":{},\"rev\":{},\"signature\":",
        a.rule.sid, a.rule.rev
    )?;
    write_json_str(w, &a.rule.msg)?;
    w.write_str(",\"category\":")?;
    write_json_str(w, category)?;
    write!(
        w,
        ",\"severity\":{severity},\"suppressed\":{}}}",
        a.suppressed
    )?;
    if let Some(h) = &a.http {
        w.write_str(",\"app_proto\":\"http\",\"http\":{")?;
        let mut sep = "";
        for (key, v) in [
            ("hostname", h.hostname),
            ("url", h.url),
            ("http_user_agent", h.user_agent),
            ("http_method", h.method),
        ] {
            if let Some(v) = v {
                write!(w, "{sep}\"{key}\":")?;
                write_json_bytes(w, v)?;
                sep = ",";
            }
        }
        if let Some(st) = h.status {
            write!(w, "{sep}\"status\":{st}")?;
        }
        w.write_char('}')?;
    } else if let Some(p) = a.app.proto {
        write!(w, ",\"app_proto\":\"{}\"", p.keyword())?;
    }
    if let Some(d) = a.app.dns {
        w.write_str(",\"dns\":{\"query\":[")?;
        for (i, q) in d.questions().iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            write!(w, "{sep}{{\"type\":\"query\",\"id\":{},\"rrname\":", d.id)?;
            write_json_bytes(w, d.name(q))?;
            match dns::rrtype_name(q.rrtype) {
                Some(n) => write!(w, ",\"rrtype\":\"{n}\"}}")?,
                None => write!(w, ",\"rrtype\":\"{}\"}}", q.rrtype)?,
            }
        }
        w.write_str("]}")?;
    }
    if let Some(t) = a.app.tls {
        w.write_str(",\"tls\":{")?;
        let mut sep = "";
        if let Some(s) = t.sni {
            w.write_str("\"sni\":")?;
            write_json_bytes(w, s)?;
            sep = ",";
        }
        if let Some(v) = t.version {
            match tls::version_name(v) {
                Some(n) => write!(w, "{sep}\"version\":\"{n}\"")?,
                None => write!(w, "{sep}\"version\":\"0x{v:04x}\"")?,
            }
        }
        w.write_char('}')?;
    }
    w.write_char('}')
}

/// Per-rule rate limiter: at most `max_per_sec` alerts per rule per second; the rest are counted
/// and reported in the next emitted alert's `suppressed` field.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateLimit {
    window_start: u64,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed_since_last)` when the alert may be emitted.
    pub fn admit(&mut self, now_us: u64, max_per_sec: u32) -> Option<u64> {
        if now_us.saturating_sub(self.window_start) >= 1_000_000 || now_us < self.window_start {
            self.window_start = now_us;
            self.in_window = 0;
        }
        if self.in_window < max_per_sec {
            self.in_window += 1;
            Some(core::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Writes the management stream (`ALLY eve` / `ALLY pcap` lines) into any `fmt::Write`.
#[derive(Debug)]
pub struct MgmtWriter<W: Write> {
    /// Destination (COM2 on Ally, a `String` on the host).
    pub out: W,
    /// Bytes of a dropped frame kept in its excerpt.
    pub excerpt: usize,
    /// Records that failed to write.
    pub write_errors: u64,
}

impl<W: Write> MgmtWriter<W> {
    /// A writer with the default excerpt bound.
    pub fn new(out: W) -> Self {
        MgmtWriter {
            out,
            excerpt: DEFAULT_EXCERPT,
            write_errors: 0,
        }
    }
}

impl<W: Write> AlertSink for MgmtWriter<W> {
    fn alert(&mut self, alert: &Alert<'_>) {
        let r = self
            .out
            .write_str(EVE_PREFIX)
            .and_then(|_| write_eve(&mut self.out, alert))
            .and_then(|_| self.out.write_char('\n'));
        if r.is_err() {
            self.write_errors += 1;
        }
    }

    fn dropped(&mut self, frame: &[u8], dir: Direction, ts: Timestamp) {
        let r = (|| {
            write!(
                self.out,
                "{PCAP_PREFIX}{} {} {} ",
                ts.0,
                dir.name(),
                frame.len()
            )?;
            for b in &frame[..frame.len().min(self.excerpt)] {
                write!(self.out, "{b:02x}")?;
            }
            self.out.write_char('\n')
        })();
        if r.is_err() {
            self.write_errors += 1;
        }
    }
}

/// Error in a management-stream line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MgmtError {
    /// `ALLY pcap` line with a missing or bad field.
    BadPcapField(&'static str),
    /// Odd length or non-hex character in the excerpt.
    BadHex,
    /// `ALLY eve` line whose payload is not a JSON object.
    BadEve,
}

impl fmt::Display for MgmtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MgmtError::BadPcapField(n) => write!(f, "ALLY pcap line: missing or bad {n}"),
            MgmtError::BadHex => {
                f.write_str("ALLY pcap line: excerpt is not an even-length hex string")
            }
            MgmtError::BadEve => f.write_str("ALLY eve line: payload is not a JSON object"),
        }
    }
}

/// One parsed management-stream line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MgmtLine<'a> {
    /// EVE JSON object text.
    Eve(&'a str),
    /// Dropped-frame excerpt.
    Pcap {
        /// Microseconds since the Unix epoch.
        ts_us: u64,
        /// Direction.
        dir: Direction,
        /// Full frame length.
        orig_len: u32,
        /// Excerpt bytes.
        data: Vec<u8>,
    },
    /// Anything else (boot log).
    Other,
}

/// Parses one line (a trailing `\r` is ignored; the prefix may follow other text on the line,
/// as when a serial console interleaves output).
pub fn parse_mgmt_line(line: &str) -> Result<MgmtLine<'_>, MgmtError> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(i) = line.find(EVE_PREFIX) {
        let json = line[i + EVE_PREFIX.len()..].trim();
        if !(json.starts_with('{') && json.ends_with('}')) {
            return Err(MgmtError::BadEve);
        }
        return Ok(MgmtLine::Eve(json));
    }
    let Some(i) = line.find(PCAP_PREFIX) else {
        return Ok(MgmtLine::Other);
    };
    let mut f = line[i + PCAP_PREFIX.len()..].split_ascii_whitespace();
    let ts_us = f
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or(MgmtError::BadPcapField("timestamp"))?;
    let dir = match f.next() {
        Some("to_wire") => Direction::ToWire,
        Some("from_wire") => Direction::FromWire,
        _ => return Err(MgmtError::BadPcapField("direction")),
    };
    let orig_len = f
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or(MgmtError::BadPcapField("length"))?;
    let hex = f.next().unwrap_or("");
    if !hex.len().is_multiple_of(2) {
        return Err(MgmtError::BadHex);
    }
    let mut data = Vec::with_capacity(hex.len() / 2);
    for pair in hex.as_bytes().chunks(2) {
        let s = core::str::from_utf8(pair).map_err(|_| MgmtError::BadHex)?;
        data.push(u8::from_str_radix(s, 16).map_err(|_| MgmtError::BadHex)?);
    }
    if f.next().is_some() {
        return Err(MgmtError::BadPcapField("end of line"));
    }
    Ok(MgmtLine::Pcap {
        ts_us,
        dir,
        orig_len,
        data,
    })
}
