//! Rule language: the Snort 3 / Suricata subset for packet-payload rules, parsed into [`Rule`].
//!
//! Header: actions `alert|drop|pass`; protocols `ip|tcp|udp|icmp` (`icmp` = ICMPv4 and ICMPv6,
//! as Suricata); addresses (IPv4, IPv6, CIDR, `[lists]`, `!`, `any`, `$VARS`); ports (`n`,
//! `a:b`, `:b`, `a:`, lists, `!`, `any`, `$VARS`); `->` and `<>`. Variables come from a
//! [`Vars`] table and are expanded at parse time.
//!
//! Options that load:
//! - kept: `msg sid rev gid classtype priority metadata reference service`. `service` is not
//!   used for matching: rules match on their header ports only (Snort 3 also applies them to
//!   flows its service wizard identifies on other ports; this engine identifies no services).
//! - `content` with `|hex|`, escapes `\" \\ \; \: \|`, `!`, and `nocase offset depth distance
//!   within fast_pattern` (+ `fast_pattern_offset/length`, `fast_pattern:only`,
//!   `fast_pattern:o,l`), in both the Snort 2 (separate options) and Snort 3
//!   (`content:"x",depth 16,nocase`) styles. offset/depth mixed with distance/within on one
//!   content, depth or within shorter than the pattern, and negative offsets are refused.
//! - Suricata's `startswith` (= `depth` of the pattern's length from 0), `endswith` (the
//!   match ends at the buffer's end; may be combined with the window options) and `bsize`
//!   (= `bufferlen` without `relative`).
//! - `pcre` (below), `dsize`, `isdataat`, `byte_test`, `byte_jump` (not with `dce`),
//!   `byte_extract` ([`ByteExtract`]) and `byte_math` ([`ByteMath`]), whose variables (at most
//!   [`MAX_VARS`] per rule, defined before use) can stand for content `offset depth distance
//!   within`, the byte_test value and offset, the byte_jump offset, the isdataat position and
//!   byte_math's offset and rvalue; `base64_decode` ([`Base64Decode`]) and `base64_data`.
//! - Sticky buffers (Snort 3): `http_uri http_raw_uri http_header http_raw_header http_method
//!   http_cookie http_raw_cookie http_client_body http_stat_code http_stat_msg file_data`, and
//!   the Suricata names `http.uri http.uri.raw http.header http.header.raw http.method
//!   http.cookie http.request_body http.stat_code http.stat_msg http.host http.user_agent
//!   file.data` ([`HttpBuffer`]; contents in [`super::http`]). Each applies to the
//!   `content`/`pcre`/`bufferlen`/`isdataat`/`byte_*` options after it, until the next buffer
//!   option; `pkt_data`/`raw_data` go back to the packet payload. A buffer option always starts
//!   a new buffer (the Snort 3 reading; Snort 2's `content:"x"; http_uri;` modifier style is not
//!   recognized as such). Buffer options with arguments (`http_header:field x`,
//!   `http_uri:path`, `request`, `with_body`, ...) are refused. `bufferlen:[op]N[,relative]`
//!   ([`BufferLen`]; ops as `dsize`, plus `!=`).
//! - `flow` (`to_server to_client from_server from_client established not_established
//!   stateless`; `no_stream`/`no_frag`, which always hold here since every frame is inspected
//!   as the wire packet it is; `only_stream`: the segment was accepted by the inline stream
//!   tracker, so never without one); `flowbits` (`set unset toggle isset isnotset noalert`, `&`/`|`; an `isset`
//!   of a bit that no loaded rule sets refuses the rule); `flags`; `itype icode icmp_id
//!   icmp_seq`; `ttl id ip_proto fragbits seq ack` ([`HeaderCheck`]); `detection_filter`.
//!
//! - Application protocols (Suricata headers): `http dns tls smtp ssh` ([`AppProto`]); the
//!   rule matches only payloads detected as that protocol on any port ([`super::app`]);
//!   `http tls smtp ssh` imply TCP, `dns` UDP or TCP (ports allowed). Other Suricata protocols
//!   (`ftp`, `smb`, ...) are refused as "unsupported protocol X".
//! - DNS/TLS sticky buffers ([`AppBuffer`]): `dns.query` (`dns_query`), `tls.sni`
//!   (`tls_sni`), with the same buffer rules as HTTP's, and Suricata's `dotprefix` transform
//!   right after either (the buffer with a `.` before it); Snort's `ssl_state` and `ssl_version`
//!   ([`SslFlags`]: comma lists, `!` negation; see [`super::tls`]). One rule's buffers and
//!   `ssl_*` options must all belong to one protocol (and to the header's, if it names one).
//!
//! Everything else makes the rule not load ([`RuleError::Unsupported`] names every such option;
//! [`ParsedRules::summary`] counts them).
//!
//! pcre: `/re/flags` with flags `i s m x` (PCRE meanings), `R` (relative to the cursor), `A`
//! (anchored), `G` (ungreedy), `E` (`$` only at the very end), and `B`/`O` (raw bytes /
//! match-limit override: no effect here, the payload is raw and the step bound always
//! applies). Compiled by regex-automata over bytes (no Unicode, ASCII classes and case
//! folding, as PCRE in the C locale) whenever it accepts the pattern; backreferences,
//! lookahead, lookbehind and atomic groups run on the bounded backtracking matcher instead
//! ([`super::backtrack`]; what happens when its step budget runs out is in
//! [`super::matcher`]). Snort's idiom `(?!\n)\s` is rewritten to the equivalent class
//! `[^\S\n]`. Refused (rule not loaded, reason given): possessive quantifiers, lookbehinds of
//! unbounded length or with backreferences, `\Z`, recursion and other PCRE-only syntax
//! (anything regex-syntax's parser rejects after that rewriting). Without `m`/`E`, `$` has
//! PCRE's meaning (the end, or before a final newline) wherever it is: at the end of the
//! pattern by a second search, elsewhere as a lookahead on the backtracking matcher. One
//! known difference remains: with `m`,
//! regex-automata's `^` also matches after a newline that ends the payload, where PCRE's (and
//! the backtracking matcher's) does not.

use alloc::borrow::ToOwned;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use super::addr::{AddrSet, IpNet, PortSet};
use super::vars::Vars;

/// Why a rule did not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleError {
    /// The line is not `header ( options )`.
    Syntax(String),
    /// A header field is wrong (`field` is action/protocol/address/port/direction).
    Header {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// `$NAME` is not defined.
    UndefinedVar(String),
    /// Options outside the supported subset (each listed once, in rule order).
    Unsupported(Vec<String>),
    /// A supported option with a bad value.
    BadOption { option: String, reason: String },
    /// No `sid`.
    MissingSid,
}

impl RuleError {
    /// Short key used to summarise rejections: the option name for unsupported options, else
    /// the error kind.
    pub fn summary_keys(&self) -> Vec<String> {
        match self {
            RuleError::Unsupported(opts) => opts.clone(),
            RuleError::Syntax(_) => alloc::vec!["(syntax)".into()],
            RuleError::Header { field, value, .. } => {
                alloc::vec![format!("(header {field} {value})")]
            }
            RuleError::UndefinedVar(v) => alloc::vec![format!("(undefined ${v})")],
            RuleError::BadOption { option, .. } => alloc::vec![format!("(bad {option})")],
            RuleError::MissingSid => alloc::vec!["(no sid)".into()],
        }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleError::Syntax(m) => write!(f, "syntax: {m}"),
            RuleError::Header {
                field,
                value,
                reason,
            } => {
                write!(f, "header {field} `{value}`: {reason}")
            }
            RuleError::UndefinedVar(v) => write!(f, "undefined variable ${v}"),
            RuleError::Unsupported(o) => write!(f, "unsupported option(s): {}", o.join(", ")),
            RuleError::BadOption { option, reason } => write!(f, "option {option}: {reason}"),
            RuleError::MissingSid => f.write_str("rule has no sid"),
        }
    }
}

fn bad(option: &str, reason: impl Into<String>) -> RuleError {
    RuleError::BadOption {
        option: option.to_string(),
        reason: reason.into(),
    }
}

/// Rule action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Stop evaluating the frame; forward it; no alerts.
    Pass,
    /// Do not forward; alert with action `blocked`.
    Drop,
    /// Forward; alert with action `allowed`.
    Alert,
}

impl Action {
    /// Keyword as written in rules.
    pub fn keyword(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Alert => "alert",
        }
    }
}

/// Rule protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// Every IPv4/IPv6 packet; payload is the L4 payload when the L4 header parsed, else the IP
    /// payload.
    Ip,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMPv4 and ICMPv6 (as Suricata's `icmp`).
    Icmp,
}

impl Proto {
    /// Keyword as written in rules.
    pub fn keyword(self) -> &'static str {
        match self {
            Proto::Ip => "ip",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// An application protocol of a Suricata rule header (`alert http ...`): the rule matches only
/// payloads detected as that protocol, on any port ([`super::app`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AppProto {
    /// HTTP/1.x (over TCP).
    Http,
    /// DNS (over UDP, or TCP with its 2-byte length prefix).
    Dns,
    /// TLS / SSL (over TCP).
    Tls,
    /// SMTP (over TCP).
    Smtp,
    /// SSH (over TCP).
    Ssh,
}

/// Suricata header protocols this engine does not detect: refused by name.
const UNSUPPORTED_APP_PROTOS: &[&str] = &[
    "ftp",
    "ftp-data",
    "smb",
    "dcerpc",
    "nfs",
    "tftp",
    "krb5",
    "dhcp",
    "snmp",
    "sip",
    "rfb",
    "mqtt",
    "rdp",
    "modbus",
    "dnp3",
    "enip",
    "ikev2",
    "ike",
    "ntp",
    "imap",
    "pop3",
    "http2",
    "quic",
    "telnet",
    "tcp-pkt",
    "tcp-stream",
    "udp-pkt",
    "pkthdr",
];

impl AppProto {
    /// Every protocol, in index order.
    pub const ALL: [AppProto; 5] = [
        AppProto::Http,
        AppProto::Dns,
        AppProto::Tls,
        AppProto::Smtp,
        AppProto::Ssh,
    ];

    /// Keyword as written in rule headers and EVE `app_proto`.
    pub fn keyword(self) -> &'static str {
        match self {
            AppProto::Http => "http",
            AppProto::Dns => "dns",
            AppProto::Tls => "tls",
            AppProto::Smtp => "smtp",
            AppProto::Ssh => "ssh",
        }
    }

    /// The protocol a header keyword names.
    pub fn from_keyword(k: &str) -> Option<AppProto> {
        AppProto::ALL.into_iter().find(|a| a.keyword() == k)
    }

    /// Small code (1-based, 0 = none) kept per flow.
    pub fn code(self) -> u8 {
        self as u8 + 1
    }

    /// The protocol of a code from [`AppProto::code`].
    pub fn from_code(c: u8) -> Option<AppProto> {
        AppProto::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }

    /// The transport the header implies: TCP, except DNS which runs over UDP or TCP (`ip`,
    /// restricted to TCP and UDP packets by the engine).
    pub fn transport(self) -> Proto {
        match self {
            AppProto::Dns => Proto::Ip,
            _ => Proto::Tcp,
        }
    }
}

/// A sticky buffer of a non-HTTP application protocol (Suricata names). Contents: DNS in
/// [`super::dns`], TLS in [`super::tls`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AppBuffer {
    /// `dns.query` (legacy `dns_query`): one question name, dotted, no trailing dot.
    DnsQuery,
    /// `tls.sni` (legacy `tls_sni`): the ClientHello's server_name host name.
    TlsSni,
    /// `dns.query; dotprefix`: the name with a `.` before it.
    DnsQueryDot,
    /// `tls.sni; dotprefix`: the host name with a `.` before it.
    TlsSniDot,
}

impl AppBuffer {
    /// Number of buffers.
    pub const COUNT: usize = 4;
    /// Every buffer, in index order.
    pub const ALL: [AppBuffer; AppBuffer::COUNT] = [
        AppBuffer::DnsQuery,
        AppBuffer::TlsSni,
        AppBuffer::DnsQueryDot,
        AppBuffer::TlsSniDot,
    ];

    /// Index in `0..COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Keyword of the canonical text.
    pub fn keyword(self) -> &'static str {
        match self {
            AppBuffer::DnsQuery => "dns.query",
            AppBuffer::TlsSni => "tls.sni",
            AppBuffer::DnsQueryDot => "dns.query; dotprefix",
            AppBuffer::TlsSniDot => "tls.sni; dotprefix",
        }
    }

    /// The buffer a rule option names (current or legacy Suricata spelling).
    pub fn from_keyword(name: &str) -> Option<AppBuffer> {
        Some(match name {
            "dns.query" | "dns_query" => AppBuffer::DnsQuery,
            "tls.sni" | "tls_sni" => AppBuffer::TlsSni,
            _ => return None,
        })
    }

    /// The protocol whose messages hold the buffer.
    pub fn proto(self) -> AppProto {
        match self {
            AppBuffer::DnsQuery | AppBuffer::DnsQueryDot => AppProto::Dns,
            AppBuffer::TlsSni | AppBuffer::TlsSniDot => AppProto::Tls,
        }
    }
}

/// Snort's `ssl_state` / `ssl_version` list: the option holds when any listed flag is present
/// or any `!`-listed flag is absent (Snort's semantics: the entries are OR'ed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SslFlags {
    /// Flags listed without `!`.
    pub want: u8,
    /// Flags listed with `!`.
    pub not: u8,
}

/// `ssl_state` flag names, bit by bit.
pub const SSL_STATES: [&str; 5] = [
    "client_hello",
    "server_hello",
    "client_keyx",
    "server_keyx",
    "unknown",
];
/// `ssl_version` flag names, bit by bit.
pub const SSL_VERSIONS: [&str; 5] = ["sslv2", "sslv3", "tls1.0", "tls1.1", "tls1.2"];

impl SslFlags {
    /// Whether a TLS payload with the flags `have` passes.
    pub fn check(self, have: u8) -> bool {
        have & self.want != 0 || self.not & !have != 0
    }

    fn parse(option: &str, names: &[&str; 5], v: &str) -> Result<SslFlags, RuleError> {
        let mut f = SslFlags::default();
        for item in v.split(',').map(str::trim) {
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n.trim()),
                None => (false, item),
            };
            let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(name)) else {
                return Err(bad(
                    option,
                    format!("unknown `{name}` (use {})", names.join(", ")),
                ));
            };
            if neg {
                f.not |= 1 << i;
            } else {
                f.want |= 1 << i;
            }
        }
        Ok(f)
    }

    fn write(self, f: &mut fmt::Formatter<'_>, names: &[&str; 5]) -> fmt::Result {
        let mut sep = "";
        for (i, n) in names.iter().enumerate() {
            for (bits, neg) in [(self.want, ""), (self.not, "!")] {
                if bits & 1 << i != 0 {
                    write!(f, "{sep}{neg}{n}")?;
                    sep = ",";
                }
            }
        }
        Ok(())
    }
}

/// A `content` option.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Content {
    /// Bytes to find (`|hex|` and escapes decoded).
    pub pattern: Vec<u8>,
    /// `content:!"..."`: the rule requires the bytes to be absent from the window.
    pub negated: bool,
    /// ASCII case-insensitive.
    pub nocase: bool,
    /// Window start from the buffer start.
    pub offset: Option<u32>,
    /// Window length from `offset`.
    pub depth: Option<u32>,
    /// Window start relative to the end of the previous match (may be negative).
    pub distance: Option<i32>,
    /// Window length from `distance`'s start.
    pub within: Option<u32>,
    /// Explicit `fast_pattern`.
    pub fast_pattern: bool,
    /// `fast_pattern:only` (Snort 2): the content is still evaluated in full here.
    pub fast_pattern_only: bool,
    /// `fast_pattern_offset` / `fast_pattern_length`: the prefilter uses this slice.
    pub fp_slice: Option<(u16, u16)>,
    /// `endswith` (Suricata): the match ends at the end of the buffer.
    pub endswith: bool,
    /// `offset` given as a byte_extract/byte_math variable (index into the rule's variables,
    /// [`var_names`]); the number field is then `None`. Likewise for the three below.
    pub offset_var: Option<u8>,
    /// `depth` as a variable.
    pub depth_var: Option<u8>,
    /// `distance` as a variable.
    pub distance_var: Option<u8>,
    /// `within` as a variable.
    pub within_var: Option<u8>,
}

impl Content {
    /// Whether the window is relative to the cursor.
    pub fn is_relative(&self) -> bool {
        self.distance.is_some()
            || self.within.is_some()
            || self.distance_var.is_some()
            || self.within_var.is_some()
    }

    /// Whether the window is absolute (`offset`/`depth`).
    fn is_absolute(&self) -> bool {
        self.offset.is_some()
            || self.depth.is_some()
            || self.offset_var.is_some()
            || self.depth_var.is_some()
    }
}

/// An HTTP/1.x sticky buffer (Snort 3 `http_*`/`file_data`, and Suricata's dotted names for the
/// same buffers). What each holds is described in [`super::http`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HttpBuffer {
    /// `http_uri` / `http.uri`: the normalized request target.
    Uri,
    /// `http_raw_uri` / `http.uri.raw`: the request target as sent.
    RawUri,
    /// `http_header` / `http.header`: header lines without the cookie header, percent-decoded.
    Header,
    /// `http_raw_header` / `http.header.raw`: the header lines as sent.
    RawHeader,
    /// `http_method` / `http.method`.
    Method,
    /// `http_cookie` / `http.cookie`: the Cookie (request) or Set-Cookie (response) value,
    /// percent-decoded.
    Cookie,
    /// `http_raw_cookie`: the same value as sent.
    RawCookie,
    /// `http_client_body` / `http.request_body`: the request body, decoded and percent-decoded.
    ClientBody,
    /// `http_stat_code` / `http.stat_code`.
    StatCode,
    /// `http_stat_msg` / `http.stat_msg`.
    StatMsg,
    /// `file_data` / `file.data`: the message body, de-chunked and decompressed.
    FileData,
    /// `http.host`: the Host header value, lower-cased.
    Host,
    /// `http.user_agent`: the User-Agent header value.
    UserAgent,
}

impl HttpBuffer {
    /// `file_data` and `http_client_body`: the buffers a body's later segments extend.
    pub const fn is_body(self) -> bool {
        matches!(self, HttpBuffer::FileData | HttpBuffer::ClientBody)
    }

    /// Number of HTTP buffers.
    pub const COUNT: usize = 13;
    /// Every buffer, in index order.
    pub const ALL: [HttpBuffer; HttpBuffer::COUNT] = [
        HttpBuffer::Uri,
        HttpBuffer::RawUri,
        HttpBuffer::Header,
        HttpBuffer::RawHeader,
        HttpBuffer::Method,
        HttpBuffer::Cookie,
        HttpBuffer::RawCookie,
        HttpBuffer::ClientBody,
        HttpBuffer::StatCode,
        HttpBuffer::StatMsg,
        HttpBuffer::FileData,
        HttpBuffer::Host,
        HttpBuffer::UserAgent,
    ];

    /// Index in `0..COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Keyword of the canonical text (the Snort 3 name where Snort has one).
    pub fn keyword(self) -> &'static str {
        match self {
            HttpBuffer::Uri => "http_uri",
            HttpBuffer::RawUri => "http_raw_uri",
            HttpBuffer::Header => "http_header",
            HttpBuffer::RawHeader => "http_raw_header",
            HttpBuffer::Method => "http_method",
            HttpBuffer::Cookie => "http_cookie",
            HttpBuffer::RawCookie => "http_raw_cookie",
            HttpBuffer::ClientBody => "http_client_body",
            HttpBuffer::StatCode => "http_stat_code",
            HttpBuffer::StatMsg => "http_stat_msg",
            HttpBuffer::FileData => "file_data",
            HttpBuffer::Host => "http.host",
            HttpBuffer::UserAgent => "http.user_agent",
        }
    }

    /// The buffer a rule option names (Snort 3 or Suricata spelling).
    pub fn from_keyword(name: &str) -> Option<HttpBuffer> {
        Some(match name {
            "http_uri" | "http.uri" => HttpBuffer::Uri,
            "http_raw_uri" | "http.uri.raw" => HttpBuffer::RawUri,
            "http_header" | "http.header" => HttpBuffer::Header,
            "http_raw_header" | "http.header.raw" => HttpBuffer::RawHeader,
            "http_method" | "http.method" => HttpBuffer::Method,
            "http_cookie" | "http.cookie" => HttpBuffer::Cookie,
            "http_raw_cookie" => HttpBuffer::RawCookie,
            "http_client_body" | "http.request_body" => HttpBuffer::ClientBody,
            "http_stat_code" | "http.stat_code" => HttpBuffer::StatCode,
            "http_stat_msg" | "http.stat_msg" => HttpBuffer::StatMsg,
            "file_data" | "file.data" => HttpBuffer::FileData,
            "http.host" => HttpBuffer::Host,
            "http.user_agent" => HttpBuffer::UserAgent,
            _ => return None,
        })
    }

    /// Whether the buffer can hold bytes that are not a contiguous slice of the inspected
    /// payload (normalized, joined, de-chunked or decompressed), so that a prefilter over the
    /// payload does not cover it.
    pub fn may_be_decoded(self) -> bool {
        matches!(
            self,
            HttpBuffer::Uri
                | HttpBuffer::Header
                | HttpBuffer::Cookie
                | HttpBuffer::RawCookie
                | HttpBuffer::ClientBody
                | HttpBuffer::FileData
                | HttpBuffer::Host
        )
    }
}

/// A `pcre` option.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pcre {
    /// Pattern between the slashes, as written.
    pub source: String,
    /// `pcre:!"..."`.
    pub negated: bool,
    /// Flags as written after the last slash (validated).
    pub flags: String,
}

impl Pcre {
    /// Whether flag `c` is set.
    pub fn has(&self, c: char) -> bool {
        self.flags.contains(c)
    }
}

/// Numeric comparison of `dsize`, `itype`, `icode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumCheck {
    /// `n`
    Eq(u32),
    /// `!n`
    Ne(u32),
    /// `<n`
    Lt(u32),
    /// `>n`
    Gt(u32),
    /// `<=n`
    Le(u32),
    /// `>=n`
    Ge(u32),
    /// `a<>b`: a < x < b (Snort 3 and Suricata).
    Between(u32, u32),
    /// `a<=>b`: a <= x <= b.
    BetweenIncl(u32, u32),
}

impl NumCheck {
    /// Whether a payload of `len` bytes passes.
    pub fn check(self, len: usize) -> bool {
        let x = u32::try_from(len).unwrap_or(u32::MAX);
        match self {
            NumCheck::Eq(n) => x == n,
            NumCheck::Ne(n) => x != n,
            NumCheck::Lt(n) => x < n,
            NumCheck::Gt(n) => x > n,
            NumCheck::Le(n) => x <= n,
            NumCheck::Ge(n) => x >= n,
            NumCheck::Between(a, b) => a < x && x < b,
            NumCheck::BetweenIncl(a, b) => a <= x && x <= b,
        }
    }
}

impl fmt::Display for NumCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumCheck::Eq(n) => write!(f, "{n}"),
            NumCheck::Ne(n) => write!(f, "!{n}"),
            NumCheck::Lt(n) => write!(f, "<{n}"),
            NumCheck::Gt(n) => write!(f, ">{n}"),
            NumCheck::Le(n) => write!(f, "<={n}"),
            NumCheck::Ge(n) => write!(f, ">={n}"),
            NumCheck::Between(a, b) => write!(f, "{a}<>{b}"),
            NumCheck::BetweenIncl(a, b) => write!(f, "{a}<=>{b}"),
        }
    }
}

/// `flow` requirements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCheck {
    /// `to_server` / `from_client`: Some(true); `to_client` / `from_server`: Some(false).
    pub to_server: Option<bool>,
    /// `established`.
    pub established: bool,
    /// `not_established`.
    pub not_established: bool,
    /// `stateless`: match whether or not the packet belongs to a tracked flow.
    pub stateless: bool,
    /// `no_stream`: not a reassembled stream segment (always true here: no reassembly).
    pub no_stream: bool,
    /// `no_frag`: not a defragmented packet (always true here: no defragmentation).
    pub no_frag: bool,
    /// `only_stream`: the segment was accepted by the stream tracker (see [`super::stream`]).
    pub only_stream: bool,
}

impl FlowCheck {
    /// Whether any flow requirement is present.
    pub fn is_set(&self) -> bool {
        self.to_server.is_some()
            || self.established
            || self.not_established
            || self.stateless
            || self.no_stream
            || self.no_frag
            || self.only_stream
    }
}

/// `isdataat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsDataAt {
    /// `!`: require that there is no data at the position.
    pub negated: bool,
    /// Position.
    pub pos: u32,
    /// Relative to the cursor.
    pub relative: bool,
    /// The position is a byte_extract/byte_math variable (`pos` is then 0).
    pub pos_var: Option<u8>,
}

/// One payload-inspection step, evaluated in rule order against a cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadOp {
    /// `content`.
    Content(Content),
    /// `pcre`.
    Pcre(Pcre),
    /// `isdataat`.
    IsDataAt(IsDataAt),
    /// `pkt_data` / `raw_data`: back to the packet buffer, cursor at its start.
    ResetCursor,
    /// An HTTP sticky buffer: later steps read it, cursor at its start; an absent buffer fails.
    Buffer(HttpBuffer),
    /// A DNS or TLS sticky buffer (same rules as [`PayloadOp::Buffer`]).
    AppBuffer(AppBuffer),
    /// `bufferlen`.
    BufferLen(BufferLen),
    /// `byte_test`.
    ByteTest(ByteTest),
    /// `byte_jump`.
    ByteJump(ByteJump),
    /// `byte_extract`.
    ByteExtract(ByteExtract),
    /// `byte_math`.
    ByteMath(ByteMath),
    /// `base64_decode`: decodes base64 text of the current buffer for `base64_data`.
    Base64Decode(Base64Decode),
    /// `base64_data`: later steps read the bytes the last `base64_decode` produced, cursor at
    /// their start (until a buffer option or `pkt_data`).
    Base64Data,
}

/// `bufferlen:[op]N[,relative]` (Snort 3): the length of the current buffer (with
/// `relative`: of its part from the cursor on) passes the [`NumCheck`]; the cursor does not move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferLen {
    /// The comparison.
    pub check: NumCheck,
    /// Measure from the cursor.
    pub relative: bool,
}

/// ICMP header checks (Snort's `itype`, `icode`, `icmp_id`, `icmp_seq`). A rule with any of
/// them matches only ICMP/ICMPv6 packets; `icmp_id`/`icmp_seq` only echo request/reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcmpCheck {
    /// `itype`.
    pub itype: Option<NumCheck>,
    /// `icode`.
    pub icode: Option<NumCheck>,
    /// `icmp_id`.
    pub id: Option<u16>,
    /// `icmp_seq`.
    pub seq: Option<u16>,
}

impl IcmpCheck {
    /// Whether any check is present.
    pub fn is_set(&self) -> bool {
        self.itype.is_some() || self.icode.is_some() || self.id.is_some() || self.seq.is_some()
    }
}

/// How `byte_test`/`byte_jump` read a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Extract {
    /// Bytes to read: 1-4 binary, 1-10 as a string.
    pub bytes: u8,
    /// Offset from the buffer start, or from the cursor with `relative`.
    pub offset: i32,
    /// `relative`.
    pub relative: bool,
    /// `little` (default big endian).
    pub little: bool,
    /// `string` with base 8, 10 or 16 (`oct`, `dec`, `hex`).
    pub string_base: Option<u32>,
    /// `bitmask`: AND, then shift right by the mask's trailing zeros.
    pub bitmask: Option<u32>,
    /// The offset is a byte_extract/byte_math variable (`offset` is then 0).
    pub offset_var: Option<u8>,
}

/// `byte_test` operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOp {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `=`
    Eq,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `&`: (value & compare) != 0
    And,
    /// `^`: (value ^ compare) != 0
    Xor,
}

impl ByteOp {
    fn symbol(self) -> &'static str {
        match self {
            ByteOp::Lt => "<",
            ByteOp::Le => "<=",
            ByteOp::Eq => "=",
            ByteOp::Gt => ">",
            ByteOp::Ge => ">=",
            ByteOp::And => "&",
            ByteOp::Xor => "^",
        }
    }
}

/// `byte_test`: compare a number read from the payload; the cursor does not move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteTest {
    /// Where and how to read.
    pub extract: Extract,
    /// `!`.
    pub negated: bool,
    /// Operator.
    pub op: ByteOp,
    /// Compare value.
    pub value: u32,
    /// The compare value is a byte_extract/byte_math variable (`value` is then 0).
    pub value_var: Option<u8>,
}

/// `byte_jump`: read a number and move the cursor by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ByteJump {
    /// Where and how to read.
    pub extract: Extract,
    /// `multiplier`.
    pub multiplier: Option<u32>,
    /// `align`: round the jump up to a multiple of 4.
    pub align: bool,
    /// `from_beginning`: jump from the buffer start instead of the end of the read bytes.
    pub from_beginning: bool,
    /// `from_end`: jump from the buffer end.
    pub from_end: bool,
    /// `post_offset`.
    pub post_offset: i32,
}

/// Most distinct `byte_extract`/`byte_math` variables one rule may define (Snort allows 2,
/// Suricata has no fixed limit): the evaluation keeps them in a fixed array.
pub const MAX_VARS: usize = 4;

/// `byte_extract:<bytes>,<offset>,<name>[,relative][,multiplier m][,big|little][,string]
/// [,hex|dec|oct][,align 2|4][,bitmask m]`: reads a number as `byte_test` does, applies the
/// bitmask, the multiplier and the alignment (round up), and stores it in variable `var`; the
/// cursor moves to the end of the bytes read. A result above `u32::MAX` fails the step.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ByteExtract {
    /// Where and how to read.
    pub extract: Extract,
    /// Variable name.
    pub name: String,
    /// Its index among the rule's variables ([`var_names`]).
    pub var: u8,
    /// `multiplier`.
    pub multiplier: Option<u32>,
    /// `align` 2 or 4.
    pub align: Option<u8>,
}

/// `byte_math` operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MathOp {
    /// `+`
    #[default]
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (integer division)
    Div,
    /// `<<`
    Shl,
    /// `>>`
    Shr,
}

impl MathOp {
    fn symbol(self) -> &'static str {
        match self {
            MathOp::Add => "+",
            MathOp::Sub => "-",
            MathOp::Mul => "*",
            MathOp::Div => "/",
            MathOp::Shl => "<<",
            MathOp::Shr => ">>",
        }
    }

    /// `value oper rvalue` in 32 bits; `None` when the exact result does not fit (overflow,
    /// a negative difference, division by zero, a shift of 32 or more).
    pub fn apply(self, value: u32, rvalue: u32) -> Option<u32> {
        match self {
            MathOp::Add => value.checked_add(rvalue),
            MathOp::Sub => value.checked_sub(rvalue),
            MathOp::Mul => value.checked_mul(rvalue),
            MathOp::Div => value.checked_div(rvalue),
            MathOp::Shl => {
                let wide = u64::from(value)
                    .checked_shl(rvalue)
                    .filter(|_| rvalue < 32)?;
                u32::try_from(wide).ok()
            }
            MathOp::Shr => value.checked_shr(rvalue),
        }
    }
}

/// `byte_math:bytes n,offset o,oper op,rvalue v,result name[,relative][,endian big|little]
/// [,string hex|dec|oct][,bitmask m]` (Snort 3 / Suricata): reads a number as `byte_test`
/// does (bitmask applied), computes `value oper rvalue` ([`MathOp::apply`]; no result, no
/// match) and stores it in variable `var`; the cursor does not move.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ByteMath {
    /// Where and how to read.
    pub extract: Extract,
    /// Operator.
    pub oper: MathOp,
    /// Right operand.
    pub rvalue: u32,
    /// The right operand is a variable (`rvalue` is then 0).
    pub rvalue_var: Option<u8>,
    /// Result variable name.
    pub name: String,
    /// Its index among the rule's variables ([`var_names`]).
    pub var: u8,
}

/// `base64_decode[:bytes n][,offset o][,relative]`: decodes the base64 text that starts `o`
/// bytes after the buffer start (the cursor with `relative`), reading at most `n` bytes (else
/// to the buffer end). As Snort: white space and line breaks are skipped, decoding stops at
/// the first other byte outside the alphabet (or `=`), a last partial group gives the bytes
/// it holds, and nothing decoded fails the step. The output is capped at
/// [`BASE64_MAX_DECODED`] bytes. The cursor does not move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Base64Decode {
    /// `bytes`: most input bytes read.
    pub bytes: Option<u32>,
    /// `offset`.
    pub offset: u32,
    /// `relative`.
    pub relative: bool,
}

/// Most bytes one `base64_decode` produces (Snort's decode buffer is the same size); a decode
/// cut there is judged like a truncated HTTP buffer (only positive evidence counts).
pub const BASE64_MAX_DECODED: usize = 65_535;

/// The names of a rule's `byte_extract`/`byte_math` variables, by index.
pub fn var_names(ops: &[PayloadOp]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for op in ops {
        let name = match op {
            PayloadOp::ByteExtract(b) => b.name.as_str(),
            PayloadOp::ByteMath(b) => b.name.as_str(),
            _ => continue,
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A parsed rule with variables expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Action.
    pub action: Action,
    /// Protocol.
    pub proto: Proto,
    /// Source addresses.
    pub src: AddrSet,
    /// Source ports.
    pub src_ports: PortSet,
    /// `<>`: also match with source and destination swapped.
    pub bidirectional: bool,
    /// Destination addresses.
    pub dst: AddrSet,
    /// Destination ports.
    pub dst_ports: PortSet,
    /// `msg`.
    pub msg: String,
    /// `sid`.
    pub sid: u32,
    /// `gid` (default 1).
    pub gid: u32,
    /// `rev` (default 0).
    pub rev: u32,
    /// `classtype`.
    pub classtype: Option<String>,
    /// `priority`.
    pub priority: Option<u32>,
    /// `metadata` values (kept, unused).
    pub metadata: Vec<String>,
    /// `reference` values (kept, unused).
    pub references: Vec<String>,
    /// `service` values (kept, unused for matching).
    pub services: Vec<String>,
    /// `dsize`.
    pub dsize: Option<NumCheck>,
    /// `flow`.
    pub flow: FlowCheck,
    /// `itype`, `icode`, `icmp_id`, `icmp_seq`.
    pub icmp: IcmpCheck,
    /// `flowbits` commands other than `noalert`, in rule order.
    pub flowbits: Vec<Flowbits>,
    /// `flowbits:noalert`: the rule matches (and sets bits) but logs nothing.
    pub noalert: bool,
    /// `flags` (TCP).
    pub tcp_flags: Option<TcpFlags>,
    /// `ttl`, `id`, `ip_proto`, `fragbits`, `seq`, `ack`.
    pub hdr: HeaderCheck,
    /// `detection_filter`.
    pub detection_filter: Option<DetectionFilter>,
    /// The header's application protocol (`alert http ...`), with `proto` its transport.
    pub app_proto: Option<AppProto>,
    /// `ssl_state` (Snort).
    pub ssl_state: Option<SslFlags>,
    /// `ssl_version` (Snort).
    pub ssl_version: Option<SslFlags>,
    /// Payload steps in rule order.
    pub ops: Vec<PayloadOp>,
}

/// IP/TCP header field checks. `ttl` is the IPv4 TTL or IPv6 hop limit; `id` the IPv4
/// identification (IPv6: the fragment header's, else no match); `ip_proto` the protocol after
/// IPv6 extension headers; `fragbits` uses M (more fragments), D (don't fragment), R (reserved);
/// `seq`/`ack` match TCP packets only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HeaderCheck {
    /// `ttl`.
    pub ttl: Option<NumCheck>,
    /// `id`.
    pub id: Option<NumCheck>,
    /// `ip_proto`.
    pub ip_proto: Option<NumCheck>,
    /// `fragbits` (a [`TcpFlags`]-style check over the M/D/R bits).
    pub fragbits: Option<TcpFlags>,
    /// `seq`.
    pub seq: Option<NumCheck>,
    /// `ack`.
    pub ack: Option<NumCheck>,
}

fn parse_ip_proto(v: &str) -> Result<NumCheck, RuleError> {
    let v = v.trim();
    let (prefix, name) = match v.find(|c: char| c.is_ascii_alphanumeric()) {
        Some(i) => v.split_at(i),
        None => return Err(bad("ip_proto", "missing protocol")),
    };
    let n = match name {
        "icmp" => "1",
        "igmp" => "2",
        "tcp" => "6",
        "udp" => "17",
        "gre" => "47",
        "esp" => "50",
        "ah" => "51",
        "icmpv6" | "ipv6-icmp" => "58",
        other => other,
    };
    let check = parse_num_check("ip_proto", &format!("{prefix}{n}"))?;
    Ok(check)
}

fn parse_fragbits(v: &str) -> Result<TcpFlags, RuleError> {
    const O: &str = "fragbits";
    let mut mode = FlagMode::Exact;
    let mut bits = 0u8;
    for c in v.trim().chars() {
        let m = match c.to_ascii_uppercase() {
            'M' => {
                bits |= 1;
                continue;
            }
            'D' => {
                bits |= 2;
                continue;
            }
            'R' => {
                bits |= 4;
                continue;
            }
            '+' => FlagMode::All,
            '*' => FlagMode::Any,
            '!' => FlagMode::Not,
            other => return Err(bad(O, format!("unknown bit `{other}` (use M, D, R)"))),
        };
        if mode != FlagMode::Exact {
            return Err(bad(O, "more than one of + * !"));
        }
        mode = m;
    }
    if bits == 0 {
        return Err(bad(O, "no bits"));
    }
    Ok(TcpFlags {
        mode,
        flags: bits,
        mask: 0,
    })
}

/// `flags` match mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagMode {
    /// No modifier: exactly these flags (outside the mask).
    Exact,
    /// `+`: these flags and possibly others.
    All,
    /// `*`: any of these flags.
    Any,
    /// `!`: none of these flags.
    Not,
}

/// `flags:[+*!]<FSRPAUCE120>[,<mask>]` (bits F 0x01, S 0x02, R 0x04, P 0x08, A 0x10, U 0x20,
/// E/2 0x40, C/1 0x80, 0 = none); mask bits are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlags {
    /// Mode.
    pub mode: FlagMode,
    /// Flags.
    pub flags: u8,
    /// Ignored bits.
    pub mask: u8,
}

impl TcpFlags {
    /// Whether a packet with TCP flags `f` matches.
    pub fn check(&self, f: u8) -> bool {
        let f = f & !self.mask;
        match self.mode {
            FlagMode::Exact => f == self.flags,
            FlagMode::All => f & self.flags == self.flags,
            FlagMode::Any => f & self.flags != 0,
            FlagMode::Not => f & self.flags == 0,
        }
    }
}

const FLAG_CHARS: [(char, u8); 10] = [
    ('F', 0x01),
    ('S', 0x02),
    ('R', 0x04),
    ('P', 0x08),
    ('A', 0x10),
    ('U', 0x20),
    ('E', 0x40),
    ('C', 0x80),
    ('2', 0x40),
    ('1', 0x80),
];

fn flag_bits(option: &str, s: &str) -> Result<u8, RuleError> {
    let mut v = 0u8;
    for c in s.chars() {
        match FLAG_CHARS.iter().find(|x| x.0 == c.to_ascii_uppercase()) {
            Some(&(_, b)) => v |= b,
            None if c == '0' => {}
            None => return Err(bad(option, format!("unknown flag `{c}`"))),
        }
    }
    Ok(v)
}

fn write_flag_bits(f: &mut fmt::Formatter<'_>, v: u8) -> fmt::Result {
    if v == 0 {
        return f.write_str("0");
    }
    for &(c, b) in &FLAG_CHARS[..8] {
        if v & b != 0 {
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

fn parse_tcp_flags(v: &str) -> Result<TcpFlags, RuleError> {
    const O: &str = "flags";
    let (main, mask) = match v.split_once(',') {
        Some((a, m)) => (a.trim(), flag_bits(O, m.trim())?),
        None => (v.trim(), 0),
    };
    let mut mode = FlagMode::Exact;
    let mut letters = String::new();
    for c in main.chars() {
        let m = match c {
            '+' => FlagMode::All,
            '*' => FlagMode::Any,
            '!' => FlagMode::Not,
            _ => {
                letters.push(c);
                continue;
            }
        };
        if mode != FlagMode::Exact {
            return Err(bad(O, "more than one of + * !"));
        }
        mode = m;
    }
    if letters.is_empty() {
        return Err(bad(O, "no flags"));
    }
    Ok(TcpFlags {
        mode,
        flags: flag_bits(O, &letters)?,
        mask,
    })
}

/// `detection_filter:track by_src|by_dst,count c,seconds s`: the rule takes effect for a host
/// only once it has matched more than `count` times within a window of `seconds` that starts at
/// the host's first match (the window restarts after it ends). Until then the rule counts as not
/// matching (no verdict, no flowbit action, no alert). Up to 64 hosts are tracked per rule; the
/// one whose window started first is forgotten when a new host comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectionFilter {
    /// `by_src` (else `by_dst`).
    pub by_src: bool,
    /// `count`.
    pub count: u32,
    /// `seconds`.
    pub seconds: u32,
}

fn parse_detection_filter(v: &str) -> Result<DetectionFilter, RuleError> {
    const O: &str = "detection_filter";
    let (mut by_src, mut count, mut seconds) = (None, None, None);
    for part in v.split(',').map(str::trim) {
        let (k, a) = part
            .split_once(char::is_whitespace)
            .map_or((part, ""), |(k, a)| (k, a.trim()));
        match k {
            "track" => {
                by_src = Some(match a {
                    "by_src" => true,
                    "by_dst" => false,
                    _ => return Err(bad(O, format!("track `{a}` (use by_src or by_dst)"))),
                })
            }
            "count" => count = Some(num(O, a)?),
            "seconds" => seconds = Some(num(O, a)?),
            _ => return Err(bad(O, format!("unknown argument `{part}`"))),
        }
    }
    match (by_src, count, seconds) {
        (Some(by_src), Some(count), Some(seconds)) if seconds > 0 => Ok(DetectionFilter {
            by_src,
            count,
            seconds,
        }),
        _ => Err(bad(O, "needs track, count and seconds (> 0)")),
    }
}

/// A `flowbits` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlowbitCmd {
    /// `set`: on match, set the bits.
    Set,
    /// `unset`: on match, clear the bits.
    Unset,
    /// `toggle`: on match, flip the bits.
    Toggle,
    /// `isset`: all bits set (`a&b`) or any (`a|b`).
    IsSet,
    /// `isnotset`: all bits clear (`a&b`) or any clear (`a|b`).
    IsNotSet,
}

impl FlowbitCmd {
    fn keyword(self) -> &'static str {
        match self {
            FlowbitCmd::Set => "set",
            FlowbitCmd::Unset => "unset",
            FlowbitCmd::Toggle => "toggle",
            FlowbitCmd::IsSet => "isset",
            FlowbitCmd::IsNotSet => "isnotset",
        }
    }

    /// Whether the command is a condition (evaluated before the payload) rather than an action.
    pub fn is_check(self) -> bool {
        matches!(self, FlowbitCmd::IsSet | FlowbitCmd::IsNotSet)
    }
}

/// `flowbits:<cmd>,<names>`; per-flow bits (TCP and UDP flows of the flow table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flowbits {
    /// Command.
    pub cmd: FlowbitCmd,
    /// Bit names.
    pub names: Vec<String>,
    /// Names joined with `|` (any) rather than `&` (all).
    pub any: bool,
}

/// The prefilter literal chosen for a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPattern<'a> {
    /// Bytes (a slice of the content when `fast_pattern_offset/length` is given).
    pub bytes: &'a [u8],
    /// ASCII case-insensitive.
    pub nocase: bool,
    /// The HTTP buffer the content reads (`None`: the packet payload or an app buffer).
    pub buffer: Option<HttpBuffer>,
    /// The DNS/TLS buffer the content reads.
    pub app_buffer: Option<AppBuffer>,
}

impl Rule {
    /// The prefilter literal: the content marked `fast_pattern`, else the longest non-negated
    /// content of any buffer (first one on ties), as Snort and Suricata choose when the rule
    /// names none (their buffer priorities are not applied: the engine scans every literal
    /// wherever its buffer's bytes can be, so the choice only affects speed). `None` — the rule
    /// is a candidate for every packet of its group — when it has no positive content or its
    /// explicit fast pattern is negated.
    pub fn fast_pattern(&self) -> Option<FastPattern<'_>> {
        // Each content with the buffer it reads (`None`: the packet). Contents of base64_data
        // are left out: their bytes are nowhere in the traffic for a prefilter to find.
        type Buf = (Option<HttpBuffer>, Option<AppBuffer>);
        let contents = self
            .ops
            .iter()
            .scan(
                ((None, None), false),
                |(buf, decoded): &mut (Buf, bool), o| {
                    Some(match o {
                        PayloadOp::Buffer(b) => {
                            (*buf, *decoded) = ((Some(*b), None), false);
                            None
                        }
                        PayloadOp::AppBuffer(b) => {
                            (*buf, *decoded) = ((None, Some(*b)), false);
                            None
                        }
                        PayloadOp::ResetCursor => {
                            (*buf, *decoded) = ((None, None), false);
                            None
                        }
                        PayloadOp::Base64Data => {
                            *decoded = true;
                            None
                        }
                        PayloadOp::Content(c) if !*decoded => Some((c, *buf)),
                        _ => None,
                    })
                },
            )
            .flatten();
        let (chosen, (buffer, app_buffer)) = match contents.clone().find(|c| c.0.fast_pattern) {
            Some((c, _)) if c.negated => return None,
            Some(c) => c,
            None => {
                let mut best: Option<(&Content, Buf)> = None;
                for (c, b) in contents.filter(|c| !c.0.negated) {
                    if best.is_none_or(|x| c.pattern.len() > x.0.pattern.len()) {
                        best = Some((c, b));
                    }
                }
                best?
            }
        };
        let bytes = match chosen.fp_slice {
            Some((off, len)) => {
                &chosen.pattern[usize::from(off)..usize::from(off) + usize::from(len)]
            }
            None => &chosen.pattern[..],
        };
        Some(FastPattern {
            bytes,
            nocase: chosen.nocase,
            buffer,
            app_buffer,
        })
    }

    /// Whether any step uses the cursor left by an earlier step.
    pub fn has_relative(&self) -> bool {
        self.ops.iter().any(|o| match o {
            PayloadOp::Content(c) => c.is_relative(),
            PayloadOp::Pcre(p) => p.has('R'),
            PayloadOp::IsDataAt(d) => d.relative,
            PayloadOp::ByteTest(b) => b.extract.relative,
            PayloadOp::ByteJump(b) => b.extract.relative,
            PayloadOp::ByteExtract(b) => b.extract.relative,
            PayloadOp::ByteMath(b) => b.extract.relative,
            PayloadOp::Base64Decode(b) => b.relative,
            PayloadOp::BufferLen(b) => b.relative,
            PayloadOp::ResetCursor
            | PayloadOp::Buffer(_)
            | PayloadOp::AppBuffer(_)
            | PayloadOp::Base64Data => false,
        })
    }

    /// Whether any step reads a body buffer (`file_data`, `http_client_body`).
    pub fn reads_body(&self) -> bool {
        self.ops
            .iter()
            .any(|o| matches!(o, PayloadOp::Buffer(b) if b.is_body()))
    }

    /// Whether any step reads an HTTP buffer.
    pub fn uses_http(&self) -> bool {
        self.ops.iter().any(|o| matches!(o, PayloadOp::Buffer(_)))
    }

    /// The protocol whose messages the rule is matched on: HTTP for HTTP buffers, DNS or TLS
    /// for their buffers, TLS for `ssl_state`/`ssl_version` (the parser allows only one).
    pub fn message_proto(&self) -> Option<AppProto> {
        let mut out =
            (self.ssl_state.is_some() || self.ssl_version.is_some()).then_some(AppProto::Tls);
        for o in &self.ops {
            match o {
                PayloadOp::Buffer(_) => out = Some(AppProto::Http),
                PayloadOp::AppBuffer(b) => out = Some(b.proto()),
                _ => {}
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Splits `text` into options at `;` outside double quotes (backslash escapes the next char).
fn split_options(body: &str) -> Result<Vec<&str>, RuleError> {
    let mut out = Vec::new();
    let bytes = body.as_bytes();
    let mut start = 0;
    let mut in_q = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'"' => in_q = !in_q,
            b';' if !in_q => {
                out.push(body[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if in_q {
        return Err(RuleError::Syntax(
            "unterminated quoted string in options".into(),
        ));
    }
    let tail = body.get(start..).unwrap_or("").trim();
    if !tail.is_empty() {
        out.push(tail);
    }
    out.retain(|o| !o.is_empty());
    Ok(out)
}

/// Splits at `sep` outside quotes and brackets.
fn split_top(s: &str, sep: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let (mut depth, mut in_q, mut start, mut i) = (0i32, false, 0, 0);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'"' => in_q = !in_q,
            b'[' if !in_q => depth += 1,
            b']' if !in_q => depth -= 1,
            c if c == sep && !in_q && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(s.get(start..).unwrap_or("").trim());
    out
}

/// Reads a leading `"..."` from `s` (after an optional `!`): returns (negated, raw inner text,
/// rest after the closing quote).
fn quoted(option: &str, s: &str) -> Result<(bool, String, String), RuleError> {
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('!') {
        Some(r) => (true, r.trim_start()),
        None => (false, s),
    };
    let Some(body) = s.strip_prefix('"') else {
        return Err(bad(option, "expected a quoted string"));
    };
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Ok((neg, body[..i].to_string(), body[i + 1..].to_string())),
            _ => i += 1,
        }
    }
    Err(bad(option, "unterminated quoted string"))
}

/// Decodes a content string: `|41 42|` hex runs and `\"`, `\\`, `\;`, `\:`, `\|` escapes.
pub fn decode_content(raw: &str) -> Result<Vec<u8>, RuleError> {
    let mut out = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    let mut in_hex = false;
    let mut nib: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        if in_hex {
            match c {
                b'|' => {
                    if nib.is_some() {
                        return Err(bad("content", "odd number of hex digits"));
                    }
                    in_hex = false;
                }
                b' ' | b'\t' => {
                    if nib.is_some() {
                        return Err(bad("content", "hex byte split by a space"));
                    }
                }
                _ => {
                    let v = (c as char)
                        .to_digit(16)
                        .ok_or_else(|| bad("content", format!("bad hex digit `{}`", c as char)))?
                        as u8;
                    match nib.take() {
                        Some(h) => out.push(h << 4 | v),
                        None => nib = Some(v),
                    }
                }
            }
        } else {
            match c {
                b'|' => in_hex = true,
                b'\\' => {
                    let n = *b
                        .get(i + 1)
                        .ok_or_else(|| bad("content", "trailing backslash"))?;
                    if !matches!(n, b'"' | b'\\' | b';' | b':' | b'|') {
                        return Err(bad("content", format!("bad escape `\\{}`", n as char)));
                    }
                    out.push(n);
                    i += 1;
                }
                b'"' | b';' => {
                    return Err(bad("content", format!("unescaped `{}`", c as char)));
                }
                _ => out.push(c),
            }
        }
        i += 1;
    }
    if in_hex {
        return Err(bad("content", "unterminated |hex| run"));
    }
    if out.is_empty() {
        return Err(bad("content", "empty pattern"));
    }
    Ok(out)
}

fn unescape_text(raw: &str) -> String {
    let mut s = String::with_capacity(raw.len());
    let mut it = raw.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                s.push(n);
            }
        } else {
            s.push(c);
        }
    }
    s
}

fn num<T: core::str::FromStr>(option: &str, v: &str) -> Result<T, RuleError> {
    v.trim()
        .parse::<T>()
        .map_err(|_| bad(option, format!("`{}` is not a valid number", v.trim())))
}

const MAX_VAR_DEPTH: u32 = 16;

fn var_value<'v>(vars: &'v Vars, name: &str) -> Result<&'v str, RuleError> {
    vars.get(name)
        .ok_or_else(|| RuleError::UndefinedVar(name.to_string()))
}

fn header_err(field: &'static str, value: &str, reason: &str) -> RuleError {
    RuleError::Header {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses an address field.
pub fn parse_addr(s: &str, vars: &Vars) -> Result<AddrSet, RuleError> {
    parse_addr_d(s.trim(), vars, 0)
}

fn parse_addr_d(s: &str, vars: &Vars, depth: u32) -> Result<AddrSet, RuleError> {
    if depth > MAX_VAR_DEPTH {
        return Err(header_err(
            "address",
            s,
            "variables nest too deeply (loop?)",
        ));
    }
    if let Some(rest) = s.strip_prefix('!') {
        let inner = parse_addr_d(rest.trim(), vars, depth)?;
        if inner == AddrSet::Any {
            return Err(header_err("address", s, "`!any` matches nothing"));
        }
        return Ok(AddrSet::Not(Box::new(inner)));
    }
    if let Some(name) = s.strip_prefix('$') {
        return parse_addr_d(var_value(vars, name)?.trim(), vars, depth + 1);
    }
    if s == "any" {
        return Ok(AddrSet::Any);
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let items = split_top(inner, b',')
            .into_iter()
            .filter(|i| !i.is_empty())
            .map(|i| parse_addr_d(i, vars, depth))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            return Err(header_err("address", s, "empty list"));
        }
        return Ok(AddrSet::List(items));
    }
    IpNet::parse(s)
        .map(AddrSet::Net)
        .ok_or_else(|| header_err("address", s, "not an IP, CIDR, list, `any` or $VAR"))
}

/// Parses a port field.
pub fn parse_ports(s: &str, vars: &Vars) -> Result<PortSet, RuleError> {
    parse_ports_d(s.trim(), vars, 0)
}

fn parse_ports_d(s: &str, vars: &Vars, depth: u32) -> Result<PortSet, RuleError> {
    if depth > MAX_VAR_DEPTH {
        return Err(header_err("port", s, "variables nest too deeply (loop?)"));
    }
    if let Some(rest) = s.strip_prefix('!') {
        let inner = parse_ports_d(rest.trim(), vars, depth)?;
        if inner == PortSet::Any {
            return Err(header_err("port", s, "`!any` matches nothing"));
        }
        return Ok(PortSet::Not(Box::new(inner)));
    }
    if let Some(name) = s.strip_prefix('$') {
        return parse_ports_d(var_value(vars, name)?.trim(), vars, depth + 1);
    }
    if s == "any" {
        return Ok(PortSet::Any);
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let items = split_top(inner, b',')
            .into_iter()
            .filter(|i| !i.is_empty())
            .map(|i| parse_ports_d(i, vars, depth))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            return Err(header_err("port", s, "empty list"));
        }
        return Ok(PortSet::List(items));
    }
    let port = |p: &str| -> Result<u16, RuleError> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(header_err(
                "port",
                s,
                "not a port number, range, list, `any` or $VAR",
            ));
        }
        p.parse::<u16>()
            .map_err(|_| header_err("port", s, "port above 65535"))
    };
    match s.split_once(':') {
        Some((a, b)) => {
            let lo = if a.is_empty() { 0 } else { port(a)? };
            let hi = if b.is_empty() { u16::MAX } else { port(b)? };
            if a.is_empty() && b.is_empty() {
                return Err(header_err("port", s, "empty range"));
            }
            if lo > hi {
                return Err(header_err("port", s, "range start above its end"));
            }
            Ok(PortSet::Range(lo, hi))
        }
        None => {
            let p = port(s)?;
            Ok(PortSet::Range(p, p))
        }
    }
}

/// Options that are parsed and kept or evaluated.
const KNOWN: &[&str] = &[
    "msg",
    "sid",
    "rev",
    "gid",
    "classtype",
    "priority",
    "metadata",
    "reference",
    "service",
    "content",
    "nocase",
    "offset",
    "depth",
    "distance",
    "within",
    "fast_pattern",
    "pcre",
    "dsize",
    "flow",
    "isdataat",
    "pkt_data",
    "raw_data",
    "itype",
    "icode",
    "icmp_id",
    "icmp_seq",
    "byte_test",
    "byte_jump",
    "flowbits",
    "flags",
    "detection_filter",
    "ttl",
    "id",
    "ip_proto",
    "fragbits",
    "seq",
    "ack",
    "bufferlen",
    "bsize",
    "dotprefix",
    "startswith",
    "endswith",
    "ssl_state",
    "ssl_version",
    "byte_extract",
    "byte_math",
    "base64_decode",
    "base64_data",
];

/// Joins `\`-continued lines and drops comments and blank lines: (1-based first line, text).
pub fn rule_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if cur.is_empty() {
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            start = i + 1;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        out.push((start, core::mem::take(&mut cur)));
    }
    if !cur.is_empty() {
        out.push((start, cur));
    }
    out
}

/// Best-effort sid of an unparsable rule, for reports.
pub fn sniff_sid(line: &str) -> Option<u32> {
    let body = &line[line.find('(')? + 1..];
    split_options(body).ok()?.into_iter().find_map(|o| {
        let (n, v) = o.split_once(':')?;
        (n.trim() == "sid").then(|| v.trim().parse().ok()).flatten()
    })
}

/// Parses one rule.
pub fn parse_rule(line: &str, vars: &Vars) -> Result<Rule, RuleError> {
    let line = line.trim();
    let open = line
        .find('(')
        .ok_or_else(|| RuleError::Syntax("no `(` option list".into()))?;
    let close = line.rfind(')').filter(|&c| c > open);
    let close = close.ok_or_else(|| RuleError::Syntax("no closing `)`".into()))?;
    if !line[close + 1..].trim().is_empty() {
        return Err(RuleError::Syntax("text after the closing `)`".into()));
    }
    let header: Vec<&str> = split_ws_top(&line[..open]);
    let body = &line[open + 1..close];

    let action = match header.first().copied() {
        Some("alert") => Action::Alert,
        Some("drop") => Action::Drop,
        Some("pass") => Action::Pass,
        Some(a) => {
            return Err(header_err(
                "action",
                a,
                "only alert, drop and pass are supported",
            ))
        }
        None => return Err(RuleError::Syntax("empty header".into())),
    };
    let (proto, app_proto) = match header.get(1).copied() {
        Some("ip") => (Proto::Ip, None),
        Some("tcp") => (Proto::Tcp, None),
        Some("udp") => (Proto::Udp, None),
        Some("icmp") => (Proto::Icmp, None),
        Some(p) => match AppProto::from_keyword(p) {
            Some(a) => (a.transport(), Some(a)),
            None if UNSUPPORTED_APP_PROTOS.contains(&p) => {
                return Err(header_err(
                    "protocol",
                    p,
                    &format!(
                        "unsupported protocol {p} (application protocols detected here: \
                         http, dns, tls, smtp, ssh)"
                    ),
                ))
            }
            None => {
                return Err(header_err(
                    "protocol",
                    p,
                    "only ip, tcp, udp, icmp, http, dns, tls, smtp and ssh are supported",
                ))
            }
        },
        None => return Err(RuleError::Syntax("header has no protocol".into())),
    };
    if header.len() != 7 {
        return Err(RuleError::Syntax(format!(
            "header needs `action proto src sport dir dst dport`, found {} fields",
            header.len()
        )));
    }
    let src = parse_addr(header[2], vars)?;
    let src_ports = parse_ports(header[3], vars)?;
    let bidirectional = match header[4] {
        "->" => false,
        "<>" => true,
        d => return Err(header_err("direction", d, "use `->` or `<>`")),
    };
    let dst = parse_addr(header[5], vars)?;
    let dst_ports = parse_ports(header[6], vars)?;
    if matches!(proto, Proto::Ip | Proto::Icmp)
        && app_proto.is_none()
        && (src_ports != PortSet::Any || dst_ports != PortSet::Any)
    {
        return Err(header_err(
            "port",
            header[3],
            "ip and icmp rules take `any` ports",
        ));
    }

    let mut rule = Rule {
        action,
        proto,
        src,
        src_ports,
        bidirectional,
        dst,
        dst_ports,
        msg: String::new(),
        sid: 0,
        gid: 1,
        rev: 0,
        classtype: None,
        priority: None,
        metadata: Vec::new(),
        references: Vec::new(),
        services: Vec::new(),
        dsize: None,
        flow: FlowCheck::default(),
        icmp: IcmpCheck::default(),
        flowbits: Vec::new(),
        noalert: false,
        tcp_flags: None,
        hdr: HeaderCheck::default(),
        detection_filter: None,
        app_proto,
        ssl_state: None,
        ssl_version: None,
        ops: Vec::new(),
    };
    let opts = split_options(body)?;
    // Reject unsupported options first so the report lists all of them.
    let mut unsupported: Vec<String> = Vec::new();
    for o in &opts {
        let name = o.split_once(':').map_or(*o, |(n, _)| n).trim();
        if !KNOWN.contains(&name)
            && HttpBuffer::from_keyword(name).is_none()
            && AppBuffer::from_keyword(name).is_none()
            && !unsupported.iter().any(|u| u == name)
        {
            unsupported.push(name.to_string());
        }
    }
    if !unsupported.is_empty() {
        return Err(RuleError::Unsupported(unsupported));
    }
    let mut have_sid = false;
    // byte_extract/byte_math variables defined so far, by index.
    let mut vars_seen: Vec<String> = Vec::new();
    // Index into rule.ops of the content Snort 2 style modifiers apply to.
    let mut last_content: Option<usize> = None;
    for o in opts {
        let (name, value) = match o.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (o.trim(), None),
        };
        match name {
            "msg" => rule.msg = unescape_text(&quoted(name, need(name, value)?)?.1),
            "sid" => {
                rule.sid = num(name, need(name, value)?)?;
                have_sid = true;
            }
            "rev" => rule.rev = num(name, need(name, value)?)?,
            "gid" => rule.gid = num(name, need(name, value)?)?,
            "classtype" => rule.classtype = Some(need(name, value)?.to_string()),
            "priority" => rule.priority = Some(num(name, need(name, value)?)?),
            "metadata" => rule.metadata.push(need(name, value)?.to_string()),
            "reference" => rule.references.push(need(name, value)?.to_string()),
            "service" => rule
                .services
                .extend(need(name, value)?.split(',').map(|s| s.trim().to_string())),
            "content" => {
                let (negated, raw, rest) = quoted(name, need(name, value)?)?;
                let mut c = Content {
                    pattern: decode_content(&raw)?,
                    negated,
                    ..Content::default()
                };
                let rest = rest.trim();
                if !rest.is_empty() {
                    let Some(mods) = rest.strip_prefix(',') else {
                        return Err(bad(name, format!("unexpected `{rest}` after the pattern")));
                    };
                    for m in mods.split(',') {
                        let m = m.trim();
                        let (k, v) = match m.split_once(char::is_whitespace) {
                            Some((k, v)) => (k, Some(v.trim())),
                            None => (m, None),
                        };
                        apply_modifier(&mut c, k, v, &vars_seen)?;
                    }
                }
                rule.ops.push(PayloadOp::Content(c));
                last_content = Some(rule.ops.len() - 1);
            }
            "nocase" | "offset" | "depth" | "distance" | "within" | "fast_pattern"
            | "startswith" | "endswith" => {
                let Some(PayloadOp::Content(c)) = last_content.and_then(|i| rule.ops.get_mut(i))
                else {
                    return Err(bad(name, "no preceding content"));
                };
                if name == "fast_pattern" {
                    match value {
                        None => c.fast_pattern = true,
                        Some("only") => {
                            c.fast_pattern = true;
                            c.fast_pattern_only = true;
                        }
                        Some(v) => {
                            let (a, b) = v
                                .split_once(',')
                                .ok_or_else(|| bad(name, "expected `only` or `offset,length`"))?;
                            c.fast_pattern = true;
                            c.fp_slice = Some((num(name, a)?, num(name, b)?));
                        }
                    }
                } else {
                    apply_modifier(c, name, value, &vars_seen)?;
                }
            }
            "pcre" => {
                let (negated, raw, rest) = quoted(name, need(name, value)?)?;
                if !rest.trim().is_empty() {
                    return Err(bad(name, "unexpected text after the pattern"));
                }
                let p = parse_pcre(&raw, negated)?;
                super::matcher::check_pcre(&p).map_err(|e| bad("pcre", e))?;
                rule.ops.push(PayloadOp::Pcre(p));
            }
            "dsize" => rule.dsize = Some(parse_num_check(name, need(name, value)?)?),
            "itype" => rule.icmp.itype = Some(parse_num_check(name, need(name, value)?)?),
            "icode" => rule.icmp.icode = Some(parse_num_check(name, need(name, value)?)?),
            "icmp_id" => rule.icmp.id = Some(num(name, need(name, value)?)?),
            "icmp_seq" => rule.icmp.seq = Some(num(name, need(name, value)?)?),
            "byte_test" => rule.ops.push(PayloadOp::ByteTest(parse_byte_test(
                need(name, value)?,
                &vars_seen,
            )?)),
            "byte_jump" => rule.ops.push(PayloadOp::ByteJump(parse_byte_jump(
                need(name, value)?,
                &vars_seen,
            )?)),
            "byte_extract" => rule.ops.push(PayloadOp::ByteExtract(parse_byte_extract(
                need(name, value)?,
                &mut vars_seen,
            )?)),
            "byte_math" => rule.ops.push(PayloadOp::ByteMath(parse_byte_math(
                need(name, value)?,
                &mut vars_seen,
            )?)),
            "base64_decode" => rule
                .ops
                .push(PayloadOp::Base64Decode(parse_base64_decode(value)?)),
            "base64_data" => {
                if value.is_some() {
                    return Err(bad(name, "takes no value"));
                }
                if !rule
                    .ops
                    .iter()
                    .any(|o| matches!(o, PayloadOp::Base64Decode(_)))
                {
                    return Err(bad(name, "needs a base64_decode before it"));
                }
                rule.ops.push(PayloadOp::Base64Data);
            }
            "flow" => rule.flow = parse_flow(need(name, value)?)?,
            "flags" => rule.tcp_flags = Some(parse_tcp_flags(need(name, value)?)?),
            "ttl" => rule.hdr.ttl = Some(parse_num_check(name, need(name, value)?)?),
            "id" => rule.hdr.id = Some(parse_num_check(name, need(name, value)?)?),
            "ip_proto" => rule.hdr.ip_proto = Some(parse_ip_proto(need(name, value)?)?),
            "fragbits" => rule.hdr.fragbits = Some(parse_fragbits(need(name, value)?)?),
            "seq" => rule.hdr.seq = Some(parse_num_check(name, need(name, value)?)?),
            "ack" => rule.hdr.ack = Some(parse_num_check(name, need(name, value)?)?),
            "detection_filter" => {
                rule.detection_filter = Some(parse_detection_filter(need(name, value)?)?)
            }
            "flowbits" => match parse_flowbits(need(name, value)?)? {
                Some(fb) => rule.flowbits.push(fb),
                None => rule.noalert = true,
            },
            "isdataat" => rule.ops.push(PayloadOp::IsDataAt(parse_isdataat(
                need(name, value)?,
                &vars_seen,
            )?)),
            "pkt_data" | "raw_data" => {
                if value.is_some() {
                    return Err(bad(name, "takes no value"));
                }
                if !rule.ops.is_empty() {
                    rule.ops.push(PayloadOp::ResetCursor);
                }
            }
            "bufferlen" => rule
                .ops
                .push(PayloadOp::BufferLen(parse_bufferlen(need(name, value)?)?)),
            // Suricata's `bsize`: the length of the whole current buffer (as `bufferlen`).
            "bsize" => rule.ops.push(PayloadOp::BufferLen(BufferLen {
                check: parse_num_check(name, need(name, value)?)?,
                relative: false,
            })),
            "ssl_state" => {
                rule.ssl_state = Some(SslFlags::parse(name, &SSL_STATES, need(name, value)?)?)
            }
            "ssl_version" => {
                rule.ssl_version = Some(SslFlags::parse(name, &SSL_VERSIONS, need(name, value)?)?)
            }
            // Suricata's `dotprefix` transform, right after `dns.query` or `tls.sni`.
            "dotprefix" => {
                let dotted = match rule.ops.last() {
                    Some(PayloadOp::AppBuffer(AppBuffer::DnsQuery)) => AppBuffer::DnsQueryDot,
                    Some(PayloadOp::AppBuffer(AppBuffer::TlsSni)) => AppBuffer::TlsSniDot,
                    _ => {
                        return Err(RuleError::Unsupported(alloc::vec![
                            "dotprefix (only right after dns.query or tls.sni)".into()
                        ]))
                    }
                };
                if value.is_some() {
                    return Err(bad(name, "takes no value"));
                }
                if let Some(last) = rule.ops.last_mut() {
                    *last = PayloadOp::AppBuffer(dotted);
                }
            }
            _ if AppBuffer::from_keyword(name).is_some() => {
                if value.is_some() {
                    return Err(bad(name, "takes no value"));
                }
                if let Some(b) = AppBuffer::from_keyword(name) {
                    rule.ops.push(PayloadOp::AppBuffer(b));
                }
            }
            _ => match HttpBuffer::from_keyword(name) {
                // Sub-options (`field`, `request`, `with_body`, uri components, ...) are not
                // implemented: refuse rather than ignore them.
                Some(_) if value.is_some() => {
                    return Err(RuleError::Unsupported(alloc::vec![format!(
                        "{name}:{}",
                        value.unwrap_or("")
                    )]));
                }
                Some(b) => rule.ops.push(PayloadOp::Buffer(b)),
                None => unreachable!("option list checked against KNOWN"),
            },
        }
    }
    if !have_sid {
        return Err(RuleError::MissingSid);
    }
    validate(&rule)?;
    Ok(rule)
}

/// Whitespace split of the header, keeping `[a, b]` lists together.
fn split_ws_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let (mut depth, mut start, mut i) = (0i32, None, 0);
    while i < b.len() {
        let c = b[i];
        match c {
            b'[' => depth += 1,
            b']' => depth -= 1,
            _ => {}
        }
        if c.is_ascii_whitespace() && depth <= 0 {
            if let Some(st) = start.take() {
                out.push(&s[st..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
        i += 1;
    }
    if let Some(st) = start {
        out.push(&s[st..]);
    }
    out
}

fn need<'a>(name: &str, v: Option<&'a str>) -> Result<&'a str, RuleError> {
    v.ok_or_else(|| bad(name, "needs a value"))
}

fn apply_modifier(
    c: &mut Content,
    k: &str,
    v: Option<&str>,
    vars: &[String],
) -> Result<(), RuleError> {
    let need = || v.ok_or_else(|| bad(k, "needs a value"));
    if matches!(k, "offset" | "depth" | "distance" | "within") {
        if let Some(var) = var_ref(k, need()?, vars)? {
            let (slot, other_set) = match k {
                "offset" => (&mut c.offset_var, c.offset.is_some()),
                "depth" => (&mut c.depth_var, c.depth.is_some()),
                "distance" => (&mut c.distance_var, c.distance.is_some()),
                _ => (&mut c.within_var, c.within.is_some()),
            };
            if other_set || slot.is_some() {
                return Err(bad(k, "given twice"));
            }
            *slot = Some(var);
            return Ok(());
        }
        let var_set = match k {
            "offset" => c.offset_var.is_some(),
            "depth" => c.depth_var.is_some(),
            "distance" => c.distance_var.is_some(),
            _ => c.within_var.is_some(),
        };
        if var_set {
            return Err(bad(k, "given twice"));
        }
    }
    match k {
        "nocase" => c.nocase = true,
        "fast_pattern" => c.fast_pattern = true,
        "offset" => {
            let n: i32 = num(k, need()?)?;
            c.offset = Some(u32::try_from(n).map_err(|_| bad(k, "negative offset"))?);
        }
        "depth" => c.depth = Some(num(k, need()?)?),
        "distance" => c.distance = Some(num(k, need()?)?),
        "within" => c.within = Some(num(k, need()?)?),
        // Suricata: `startswith` is `offset:0; depth:<pattern length>`.
        "startswith" => {
            if c.offset.is_some() || c.depth.is_some() || c.is_relative() {
                return Err(bad(k, "mixed with offset, depth, distance or within"));
            }
            c.depth = Some(u32::try_from(c.pattern.len()).map_err(|_| bad(k, "pattern too long"))?);
        }
        "endswith" => c.endswith = true,
        "fast_pattern_offset" => {
            let o = num(k, need()?)?;
            c.fp_slice = Some((o, c.fp_slice.map_or(0, |s| s.1)));
        }
        "fast_pattern_length" => {
            let l = num(k, need()?)?;
            c.fp_slice = Some((c.fp_slice.map_or(0, |s| s.0), l));
        }
        _ => {
            return Err(RuleError::Unsupported(alloc::vec![format!(
                "content modifier {k}"
            )]))
        }
    }
    Ok(())
}

fn parse_pcre(raw: &str, negated: bool) -> Result<Pcre, RuleError> {
    let body = raw
        .strip_prefix('/')
        .ok_or_else(|| bad("pcre", "must be /pattern/flags"))?;
    let end = body
        .rfind('/')
        .ok_or_else(|| bad("pcre", "no closing `/`"))?;
    let (source, flags) = (&body[..end], &body[end + 1..]);
    for f in flags.chars() {
        if !"ismxRAGEBO".contains(f) {
            return Err(RuleError::Unsupported(alloc::vec![format!(
                "pcre flag {f}"
            )]));
        }
    }
    Ok(Pcre {
        source: source.to_string(),
        negated,
        flags: flags.to_string(),
    })
}

fn parse_num_check(option: &str, v: &str) -> Result<NumCheck, RuleError> {
    let n = |s: &str| num::<u32>(option, s);
    let v = v.trim();
    if let Some((a, b)) = v.split_once("<=>") {
        return Ok(NumCheck::BetweenIncl(n(a)?, n(b)?));
    }
    if let Some((a, b)) = v.split_once("<>") {
        return Ok(NumCheck::Between(n(a)?, n(b)?));
    }
    Ok(if let Some(r) = v.strip_prefix("<=") {
        NumCheck::Le(n(r)?)
    } else if let Some(r) = v.strip_prefix(">=") {
        NumCheck::Ge(n(r)?)
    } else if let Some(r) = v.strip_prefix('<') {
        NumCheck::Lt(n(r)?)
    } else if let Some(r) = v.strip_prefix('>') {
        NumCheck::Gt(n(r)?)
    } else if let Some(r) = v.strip_prefix('!') {
        NumCheck::Ne(n(r)?)
    } else if let Some(r) = v.strip_prefix('=') {
        NumCheck::Eq(n(r)?)
    } else {
        NumCheck::Eq(n(v)?)
    })
}

/// `None` for `noalert`.
fn parse_flowbits(v: &str) -> Result<Option<Flowbits>, RuleError> {
    const O: &str = "flowbits";
    let mut parts = v.split(',').map(str::trim);
    let cmd = match parts.next().unwrap_or("") {
        "noalert" => {
            return match parts.next() {
                None => Ok(None),
                Some(_) => Err(bad(O, "noalert takes no bit names")),
            };
        }
        "set" => FlowbitCmd::Set,
        "unset" => FlowbitCmd::Unset,
        "toggle" => FlowbitCmd::Toggle,
        "isset" => FlowbitCmd::IsSet,
        "isnotset" => FlowbitCmd::IsNotSet,
        other => {
            return Err(RuleError::Unsupported(alloc::vec![format!(
                "flowbits:{other}"
            )]))
        }
    };
    let names = parts.next().ok_or_else(|| bad(O, "missing bit names"))?;
    if parts.next().is_some() {
        return Err(RuleError::Unsupported(alloc::vec!["flowbits group".into()]));
    }
    let (any, sep) = match (names.contains('|'), names.contains('&')) {
        (true, true) => return Err(bad(O, "mixes `&` and `|`")),
        (true, false) if !cmd.is_check() => {
            return Err(bad(O, "`|` only makes sense with isset/isnotset"));
        }
        (true, false) => (true, '|'),
        _ => (false, '&'),
    };
    let names: Vec<String> = names.split(sep).map(|n| n.trim().to_string()).collect();
    if names
        .iter()
        .any(|n| n.is_empty() || n.contains(char::is_whitespace))
    {
        return Err(bad(O, "empty or malformed bit name"));
    }
    Ok(Some(Flowbits { cmd, names, any }))
}

fn parse_flow(v: &str) -> Result<FlowCheck, RuleError> {
    let mut f = FlowCheck::default();
    for item in v.split(',').map(str::trim) {
        let dir = |f: &mut FlowCheck, ts: bool| {
            if f.to_server.is_some_and(|x| x != ts) {
                return Err(bad("flow", "both to_server and to_client"));
            }
            f.to_server = Some(ts);
            Ok(())
        };
        match item {
            "to_server" | "from_client" => dir(&mut f, true)?,
            "to_client" | "from_server" => dir(&mut f, false)?,
            "established" => f.established = true,
            "not_established" => f.not_established = true,
            "stateless" => f.stateless = true,
            // Every packet this engine sees is a wire packet (no stream reassembly and no IP
            // defragmentation), so "not a rebuilt packet" always holds.
            "no_stream" => f.no_stream = true,
            "no_frag" => f.no_frag = true,
            // Matched only on segments the inline stream tracker accepted (in order, verified
            // against retransmissions): the closest thing to Snort's rebuilt stream data here.
            "only_stream" => f.only_stream = true,
            other => {
                return Err(RuleError::Unsupported(alloc::vec![format!("flow:{other}")]));
            }
        }
    }
    if f.established && f.not_established {
        return Err(bad("flow", "both established and not_established"));
    }
    Ok(f)
}

/// Number as Snort reads it: decimal, or hex with `0x`.
fn int_value(option: &str, v: &str) -> Result<i64, RuleError> {
    let v = v.trim();
    let (neg, body) = match v.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, v),
    };
    let parsed = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(h) => i64::from_str_radix(h, 16),
        None => body.parse::<i64>(),
    };
    match parsed {
        Ok(n)
            if body
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'x' || b == b'X') =>
        {
            Ok(if neg { -n } else { n })
        }
        _ if body
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_') =>
        {
            Err(bad(
                option,
                format!("`{v}`: a variable is not allowed here (a number is)"),
            ))
        }
        _ => Err(bad(option, format!("`{v}` is not a valid number"))),
    }
}

fn int_in<T: TryFrom<i64>>(option: &str, v: &str) -> Result<T, RuleError> {
    let n = int_value(option, v)?;
    T::try_from(n).map_err(|_| bad(option, format!("`{}` is out of range", v.trim())))
}

/// Applies the modifiers shared by byte_test and byte_jump; returns false for an unknown one.
fn extract_modifier(option: &str, e: &mut Extract, m: &str) -> Result<bool, RuleError> {
    match m {
        "relative" => e.relative = true,
        "big" => e.little = false,
        "little" => e.little = true,
        "string" => e.string_base = Some(e.string_base.unwrap_or(10)),
        "dec" | "hex" | "oct" => {
            if e.string_base.is_none() {
                return Err(bad(option, "dec/hex/oct need `string` before them"));
            }
            e.string_base = Some(match m {
                "dec" => 10,
                "hex" => 16,
                _ => 8,
            });
        }
        "dce" => return Err(RuleError::Unsupported(alloc::vec![format!("{option}:dce")])),
        _ => match m.strip_prefix("bitmask") {
            Some(v) if v.starts_with(char::is_whitespace) => {
                let mask: u32 = int_in(option, v)?;
                if mask == 0 {
                    return Err(bad(option, "bitmask 0"));
                }
                e.bitmask = Some(mask);
            }
            _ => return Ok(false),
        },
    }
    Ok(true)
}

fn check_extract(option: &str, e: &Extract) -> Result<(), RuleError> {
    let max = if e.string_base.is_some() { 10 } else { 4 };
    if e.bytes == 0 || e.bytes > max {
        return Err(bad(option, format!("byte count must be 1-{max}")));
    }
    if let Some(m) = e.bitmask {
        let mask_bytes = (32 - m.leading_zeros()).div_ceil(8);
        if e.string_base.is_none() && mask_bytes > u32::from(e.bytes) {
            return Err(bad(option, "bitmask wider than the bytes read"));
        }
    }
    Ok(())
}

/// `v` as a reference to a variable an earlier byte_extract/byte_math defined: `None` when
/// `v` is a number, an error when it is a name no earlier option defined.
fn var_ref(option: &str, v: &str, vars: &[String]) -> Result<Option<u8>, RuleError> {
    let v = v.trim();
    if !v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return Ok(None);
    }
    match vars.iter().position(|n| n == v) {
        Some(i) => Ok(Some(i as u8)),
        None => Err(bad(
            option,
            format!(
                "`{v}` is neither a number nor a variable of an earlier byte_extract/byte_math"
            ),
        )),
    }
}

/// The index of variable `name` (a new one if no earlier option defined it).
fn define_var(option: &str, name: &str, vars: &mut Vec<String>) -> Result<u8, RuleError> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(bad(option, format!("bad variable name `{name}`")));
    }
    if let Some(i) = vars.iter().position(|n| n == name) {
        return Ok(i as u8);
    }
    if vars.len() >= MAX_VARS {
        return Err(bad(
            option,
            format!("more than {MAX_VARS} byte_extract/byte_math variables in one rule"),
        ));
    }
    vars.push(name.to_string());
    Ok((vars.len() - 1) as u8)
}

/// An offset that may be a variable: (number, variable).
fn offset_or_var(option: &str, v: &str, vars: &[String]) -> Result<(i32, Option<u8>), RuleError> {
    match var_ref(option, v, vars)? {
        Some(var) => Ok((0, Some(var))),
        None => Ok((int_in(option, v)?, None)),
    }
}

fn parse_byte_test(v: &str, vars: &[String]) -> Result<ByteTest, RuleError> {
    const O: &str = "byte_test";
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    if parts.len() < 4 {
        return Err(bad(O, "expected bytes, operator, value, offset"));
    }
    let (offset, offset_var) = offset_or_var(O, parts[3], vars)?;
    let mut extract = Extract {
        bytes: num(O, parts[0])?,
        offset,
        offset_var,
        ..Extract::default()
    };
    let (negated, op_text) = match parts[1].strip_prefix('!') {
        Some(r) => (true, r.trim()),
        None => (false, parts[1]),
    };
    let op = match op_text {
        "" if negated => ByteOp::Eq,
        "<" => ByteOp::Lt,
        "<=" => ByteOp::Le,
        "=" => ByteOp::Eq,
        ">" => ByteOp::Gt,
        ">=" => ByteOp::Ge,
        "&" => ByteOp::And,
        "^" => ByteOp::Xor,
        other => return Err(bad(O, format!("unknown operator `{other}`"))),
    };
    let value_var = var_ref(O, parts[2], vars)?;
    let value = match value_var {
        Some(_) => 0,
        None => u32::try_from(int_value(O, parts[2])?)
            .map_err(|_| bad(O, "compare value out of range"))?,
    };
    for m in &parts[4..] {
        if !extract_modifier(O, &mut extract, m)? {
            return Err(bad(O, format!("unknown modifier `{m}`")));
        }
    }
    check_extract(O, &extract)?;
    Ok(ByteTest {
        extract,
        negated,
        op,
        value,
        value_var,
    })
}

fn parse_byte_jump(v: &str, vars: &[String]) -> Result<ByteJump, RuleError> {
    const O: &str = "byte_jump";
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    if parts.len() < 2 {
        return Err(bad(O, "expected bytes, offset"));
    }
    let (offset, offset_var) = offset_or_var(O, parts[1], vars)?;
    let mut j = ByteJump {
        extract: Extract {
            bytes: num(O, parts[0])?,
            offset,
            offset_var,
            ..Extract::default()
        },
        ..ByteJump::default()
    };
    for m in &parts[2..] {
        if extract_modifier(O, &mut j.extract, m)? {
            continue;
        }
        let (k, arg) = match m.split_once(char::is_whitespace) {
            Some((k, a)) => (k, Some(a.trim())),
            None => (*m, None),
        };
        match (k, arg) {
            ("align", None) => j.align = true,
            ("from_beginning", None) => j.from_beginning = true,
            ("from_end", None) => j.from_end = true,
            ("multiplier", Some(a)) => {
                let f: u32 = int_in(O, a)?;
                if f == 0 {
                    return Err(bad(O, "multiplier 0"));
                }
                j.multiplier = Some(f);
            }
            ("post_offset", Some(a)) => j.post_offset = int_in(O, a)?,
            _ => return Err(bad(O, format!("unknown modifier `{m}`"))),
        }
    }
    if j.from_beginning && j.from_end {
        return Err(bad(O, "from_beginning and from_end together"));
    }
    check_extract(O, &j.extract)?;
    Ok(j)
}

fn parse_byte_extract(v: &str, vars: &mut Vec<String>) -> Result<ByteExtract, RuleError> {
    const O: &str = "byte_extract";
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    if parts.len() < 3 {
        return Err(bad(O, "expected bytes, offset, name"));
    }
    let mut b = ByteExtract {
        extract: Extract {
            bytes: num(O, parts[0])?,
            offset: int_in(O, parts[1])?,
            ..Extract::default()
        },
        ..ByteExtract::default()
    };
    for m in &parts[3..] {
        if extract_modifier(O, &mut b.extract, m)? {
            continue;
        }
        match m
            .split_once(char::is_whitespace)
            .map(|(k, a)| (k, a.trim()))
        {
            Some(("multiplier", a)) => {
                let f: u32 = int_in(O, a)?;
                if !(1..=65_535).contains(&f) {
                    return Err(bad(O, "multiplier must be 1-65535"));
                }
                b.multiplier = Some(f);
            }
            Some(("align", a)) => match a {
                "2" => b.align = Some(2),
                "4" => b.align = Some(4),
                _ => return Err(bad(O, "align must be 2 or 4")),
            },
            _ => return Err(bad(O, format!("unknown modifier `{m}`"))),
        }
    }
    check_extract(O, &b.extract)?;
    b.var = define_var(O, parts[2], vars)?;
    b.name = parts[2].to_string();
    Ok(b)
}

fn parse_byte_math(v: &str, vars: &mut Vec<String>) -> Result<ByteMath, RuleError> {
    const O: &str = "byte_math";
    let mut m = ByteMath::default();
    let (mut bytes, mut offset, mut oper, mut rvalue, mut result) = (None, None, None, None, None);
    for part in v.split(',').map(str::trim) {
        let (k, a) = part
            .split_once(char::is_whitespace)
            .map_or((part, ""), |(k, a)| (k, a.trim()));
        match (k, a) {
            ("bytes", a) => bytes = Some(num::<u8>(O, a)?),
            ("offset", a) => offset = Some(a),
            ("oper", a) => {
                oper = Some(match a {
                    "+" => MathOp::Add,
                    "-" => MathOp::Sub,
                    "*" => MathOp::Mul,
                    "/" => MathOp::Div,
                    "<<" => MathOp::Shl,
                    ">>" => MathOp::Shr,
                    _ => return Err(bad(O, format!("unknown oper `{a}`"))),
                })
            }
            ("rvalue", a) => rvalue = Some(a),
            ("result", a) => result = Some(a),
            ("relative", "") => m.extract.relative = true,
            ("endian", "big") => m.extract.little = false,
            ("endian", "little") => m.extract.little = true,
            ("string", a) => {
                m.extract.string_base = Some(match a {
                    "dec" => 10,
                    "hex" => 16,
                    "oct" => 8,
                    _ => return Err(bad(O, format!("string `{a}` (use hex, dec or oct)"))),
                })
            }
            ("dce", "") => return Err(RuleError::Unsupported(alloc::vec!["byte_math:dce".into()])),
            ("bitmask", _) => {
                if !extract_modifier(O, &mut m.extract, part)? {
                    return Err(bad(O, format!("bad bitmask `{part}`")));
                }
            }
            _ => return Err(bad(O, format!("unknown argument `{part}`"))),
        }
    }
    let (Some(bytes), Some(offset), Some(oper), Some(rvalue), Some(result)) =
        (bytes, offset, oper, rvalue, result)
    else {
        return Err(bad(O, "needs bytes, offset, oper, rvalue and result"));
    };
    m.extract.bytes = bytes;
    (m.extract.offset, m.extract.offset_var) = offset_or_var(O, offset, vars)?;
    m.oper = oper;
    m.rvalue_var = var_ref(O, rvalue, vars)?;
    if m.rvalue_var.is_none() {
        m.rvalue = int_in(O, rvalue)?;
        if m.rvalue == 0 && oper == MathOp::Div {
            return Err(bad(O, "division by rvalue 0"));
        }
        if m.rvalue >= 32 && matches!(oper, MathOp::Shl | MathOp::Shr) {
            return Err(bad(O, "shift by 32 or more"));
        }
    }
    check_extract(O, &m.extract)?;
    m.var = define_var(O, result, vars)?;
    m.name = result.to_string();
    Ok(m)
}

fn parse_base64_decode(v: Option<&str>) -> Result<Base64Decode, RuleError> {
    const O: &str = "base64_decode";
    let mut d = Base64Decode::default();
    let Some(v) = v else { return Ok(d) };
    for part in v.split(',').map(str::trim) {
        let (k, a) = part
            .split_once(char::is_whitespace)
            .map_or((part, ""), |(k, a)| (k, a.trim()));
        match (k, a) {
            ("relative", "") => d.relative = true,
            ("bytes", a) => {
                let n: u32 = num(O, a)?;
                if n == 0 {
                    return Err(bad(O, "bytes 0"));
                }
                d.bytes = Some(n);
            }
            ("offset", a) => d.offset = num(O, a)?,
            _ => return Err(bad(O, format!("unknown argument `{part}`"))),
        }
    }
    Ok(d)
}

fn parse_bufferlen(v: &str) -> Result<BufferLen, RuleError> {
    let (num_part, relative) = match v.split_once(',').map(|(n, m)| (n, m.trim())) {
        Some((n, "relative")) => (n, true),
        Some((_, m)) => return Err(bad("bufferlen", format!("unknown argument `{m}`"))),
        None => (v, false),
    };
    let num_part = num_part.trim();
    let check = match num_part.strip_prefix("!=") {
        Some(r) => NumCheck::Ne(num("bufferlen", r)?),
        None => parse_num_check("bufferlen", num_part)?,
    };
    Ok(BufferLen { check, relative })
}

fn parse_isdataat(v: &str, vars: &[String]) -> Result<IsDataAt, RuleError> {
    let mut parts = v.split(',').map(str::trim);
    let first = parts.next().unwrap_or("");
    let (negated, n) = match first.strip_prefix('!') {
        Some(r) => (true, r.trim()),
        None => (false, first),
    };
    let pos_var = var_ref("isdataat", n, vars)?;
    let mut d = IsDataAt {
        negated,
        pos: if pos_var.is_some() {
            0
        } else {
            num("isdataat", n)?
        },
        relative: false,
        pos_var,
    };
    for p in parts {
        match p {
            "relative" => d.relative = true,
            "rawbytes" => {}
            other => return Err(bad("isdataat", format!("unknown argument `{other}`"))),
        }
    }
    Ok(d)
}

/// Checks that need the whole rule.
fn validate(rule: &Rule) -> Result<(), RuleError> {
    // The buffers of one rule come from one protocol's messages, the header's if it names one.
    let mut protos: Vec<(AppProto, &str)> = Vec::new();
    if rule.ssl_state.is_some() {
        protos.push((AppProto::Tls, "ssl_state"));
    }
    if rule.ssl_version.is_some() {
        protos.push((AppProto::Tls, "ssl_version"));
    }
    for o in &rule.ops {
        match o {
            PayloadOp::Buffer(b) => protos.push((AppProto::Http, b.keyword())),
            PayloadOp::AppBuffer(b) => protos.push((b.proto(), b.keyword())),
            _ => {}
        }
    }
    if let Some(&(first, _)) = protos.first() {
        if let Some(&(other, opt)) = protos.iter().find(|p| p.0 != first) {
            return Err(bad(
                opt,
                format!(
                    "mixes {} and {} buffers in one rule",
                    first.keyword(),
                    other.keyword()
                ),
            ));
        }
        if let Some(h) = rule.app_proto.filter(|&h| h != first) {
            return Err(bad(
                protos[0].1,
                format!("a {} buffer in an `{}` rule", first.keyword(), h.keyword()),
            ));
        }
    }
    let mut fp = 0;
    for op in &rule.ops {
        let PayloadOp::Content(c) = op else { continue };
        let len = c.pattern.len() as u64;
        if c.is_absolute() && c.is_relative() {
            return Err(bad(
                "content",
                "offset/depth (absolute) mixed with distance/within (relative) on one content",
            ));
        }
        if c.depth.is_some_and(|d| u64::from(d) < len) {
            return Err(bad("depth", "shorter than the pattern"));
        }
        if c.within.is_some_and(|w| u64::from(w) < len) {
            return Err(bad("within", "shorter than the pattern"));
        }
        if c.fast_pattern {
            fp += 1;
        }
        if let Some((o, l)) = c.fp_slice {
            if l == 0 || u64::from(o) + u64::from(l) > len {
                return Err(bad("fast_pattern", "offset/length outside the pattern"));
            }
        }
    }
    if fp > 1 {
        return Err(bad("fast_pattern", "set on more than one content"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Canonical text (the form stored in the compiled blob; parses back to an equal Rule)

fn write_quoted_text(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ';') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

fn write_content_bytes(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut in_hex = false;
    for &b in bytes {
        let plain = (0x20..0x7f).contains(&b) && !matches!(b, b'"' | b';' | b'\\' | b'|' | b':');
        if plain {
            if in_hex {
                f.write_str("|")?;
                in_hex = false;
            }
            write!(f, "{}", b as char)?;
        } else {
            if in_hex {
                write!(f, " {b:02X}")?;
            } else {
                write!(f, "|{b:02X}")?;
                in_hex = true;
            }
        }
    }
    if in_hex {
        f.write_str("|")?;
    }
    Ok(())
}

fn write_extract_mods(f: &mut fmt::Formatter<'_>, e: &Extract) -> fmt::Result {
    if e.relative {
        f.write_str(",relative")?;
    }
    if e.little {
        f.write_str(",little")?;
    }
    match e.string_base {
        Some(16) => f.write_str(",string,hex")?,
        Some(8) => f.write_str(",string,oct")?,
        Some(_) => f.write_str(",string,dec")?,
        None => {}
    }
    if let Some(m) = e.bitmask {
        write!(f, ",bitmask {m:#x}")?;
    }
    Ok(())
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {} (",
            self.action.keyword(),
            self.app_proto
                .map_or(self.proto.keyword(), AppProto::keyword),
            self.src,
            self.src_ports,
            if self.bidirectional { "<>" } else { "->" },
            self.dst,
            self.dst_ports
        )?;
        f.write_str(" msg:")?;
        write_quoted_text(f, &self.msg)?;
        f.write_str(";")?;
        for fb in &self.flowbits {
            let sep = if fb.any { "|" } else { "&" };
            write!(f, " flowbits:{},{};", fb.cmd.keyword(), fb.names.join(sep))?;
        }
        if self.noalert {
            f.write_str(" flowbits:noalert;")?;
        }
        if let Some(t) = self.tcp_flags {
            f.write_str(" flags:")?;
            match t.mode {
                FlagMode::Exact => {}
                FlagMode::All => f.write_str("+")?,
                FlagMode::Any => f.write_str("*")?,
                FlagMode::Not => f.write_str("!")?,
            }
            write_flag_bits(f, t.flags)?;
            if t.mask != 0 {
                f.write_str(",")?;
                write_flag_bits(f, t.mask)?;
            }
            f.write_str(";")?;
        }
        for (name, c) in [
            ("ttl", self.hdr.ttl),
            ("id", self.hdr.id),
            ("ip_proto", self.hdr.ip_proto),
            ("seq", self.hdr.seq),
            ("ack", self.hdr.ack),
        ] {
            if let Some(c) = c {
                write!(f, " {name}:{c};")?;
            }
        }
        if let Some(t) = self.hdr.fragbits {
            f.write_str(" fragbits:")?;
            match t.mode {
                FlagMode::Exact => {}
                FlagMode::All => f.write_str("+")?,
                FlagMode::Any => f.write_str("*")?,
                FlagMode::Not => f.write_str("!")?,
            }
            for (c, b) in [('M', 1), ('D', 2), ('R', 4)] {
                if t.flags & b != 0 {
                    write!(f, "{c}")?;
                }
            }
            f.write_str(";")?;
        }
        if let Some(d) = self.detection_filter {
            let t = if d.by_src { "by_src" } else { "by_dst" };
            write!(
                f,
                " detection_filter:track {t},count {},seconds {};",
                d.count, d.seconds
            )?;
        }
        if let Some(fl) = self.flow.is_set().then_some(self.flow) {
            let mut parts: Vec<&str> = Vec::new();
            match fl.to_server {
                Some(true) => parts.push("to_server"),
                Some(false) => parts.push("to_client"),
                None => {}
            }
            if fl.established {
                parts.push("established");
            }
            if fl.not_established {
                parts.push("not_established");
            }
            if fl.stateless {
                parts.push("stateless");
            }
            if fl.no_stream {
                parts.push("no_stream");
            }
            if fl.no_frag {
                parts.push("no_frag");
            }
            if fl.only_stream {
                parts.push("only_stream");
            }
            write!(f, " flow:{};", parts.join(","))?;
        }
        if let Some(d) = self.dsize {
            write!(f, " dsize:{d};")?;
        }
        if let Some(v) = self.ssl_state {
            f.write_str(" ssl_state:")?;
            v.write(f, &SSL_STATES)?;
            f.write_str(";")?;
        }
        if let Some(v) = self.ssl_version {
            f.write_str(" ssl_version:")?;
            v.write(f, &SSL_VERSIONS)?;
            f.write_str(";")?;
        }
        if let Some(d) = self.icmp.itype {
            write!(f, " itype:{d};")?;
        }
        if let Some(d) = self.icmp.icode {
            write!(f, " icode:{d};")?;
        }
        if let Some(d) = self.icmp.id {
            write!(f, " icmp_id:{d};")?;
        }
        if let Some(d) = self.icmp.seq {
            write!(f, " icmp_seq:{d};")?;
        }
        let names = var_names(&self.ops);
        // A number, or the variable that replaces it.
        let nv = |n: &dyn fmt::Display, var: Option<u8>| -> String {
            match var {
                Some(v) => names
                    .get(usize::from(v))
                    .copied()
                    .unwrap_or("?")
                    .to_string(),
                None => n.to_string(),
            }
        };
        for op in &self.ops {
            match op {
                PayloadOp::Content(c) => {
                    f.write_str(" content:")?;
                    if c.negated {
                        f.write_str("!")?;
                    }
                    f.write_str("\"")?;
                    write_content_bytes(f, &c.pattern)?;
                    f.write_str("\"")?;
                    if c.nocase {
                        f.write_str(",nocase")?;
                    }
                    if let Some(v) = c.offset {
                        write!(f, ",offset {v}")?;
                    }
                    if let Some(v) = c.depth {
                        write!(f, ",depth {v}")?;
                    }
                    if let Some(v) = c.distance {
                        write!(f, ",distance {v}")?;
                    }
                    if let Some(v) = c.within {
                        write!(f, ",within {v}")?;
                    }
                    if c.endswith {
                        f.write_str(",endswith")?;
                    }
                    for (k, var) in [
                        ("offset", c.offset_var),
                        ("depth", c.depth_var),
                        ("distance", c.distance_var),
                        ("within", c.within_var),
                    ] {
                        if var.is_some() {
                            write!(f, ",{k} {}", nv(&0, var))?;
                        }
                    }
                    f.write_str(";")?;
                    if c.fast_pattern {
                        match (c.fast_pattern_only, c.fp_slice) {
                            (true, _) => f.write_str(" fast_pattern:only;")?,
                            (false, Some((o, l))) => write!(f, " fast_pattern:{o},{l};")?,
                            (false, None) => f.write_str(" fast_pattern;")?,
                        }
                    }
                }
                PayloadOp::Pcre(p) => {
                    let neg = if p.negated { "!" } else { "" };
                    write!(f, " pcre:{neg}\"/{}/{}\";", p.source, p.flags)?;
                }
                PayloadOp::IsDataAt(d) => {
                    let neg = if d.negated { "!" } else { "" };
                    let rel = if d.relative { ",relative" } else { "" };
                    write!(f, " isdataat:{neg}{}{rel};", nv(&d.pos, d.pos_var))?;
                }
                PayloadOp::ResetCursor => f.write_str(" pkt_data;")?,
                PayloadOp::Buffer(b) => write!(f, " {};", b.keyword())?,
                PayloadOp::AppBuffer(b) => write!(f, " {};", b.keyword())?,
                PayloadOp::BufferLen(b) => {
                    let rel = if b.relative { ",relative" } else { "" };
                    write!(f, " bufferlen:{}{rel};", b.check)?;
                }
                PayloadOp::ByteTest(b) => {
                    let neg = if b.negated { "!" } else { "" };
                    let e = &b.extract;
                    write!(
                        f,
                        " byte_test:{},{neg}{},{},{}",
                        e.bytes,
                        b.op.symbol(),
                        nv(&b.value, b.value_var),
                        nv(&e.offset, e.offset_var)
                    )?;
                    write_extract_mods(f, e)?;
                    f.write_str(";")?;
                }
                PayloadOp::ByteJump(j) => {
                    let e = &j.extract;
                    write!(f, " byte_jump:{},{}", e.bytes, nv(&e.offset, e.offset_var))?;
                    write_extract_mods(f, e)?;
                    if let Some(m) = j.multiplier {
                        write!(f, ",multiplier {m}")?;
                    }
                    if j.align {
                        f.write_str(",align")?;
                    }
                    if j.from_beginning {
                        f.write_str(",from_beginning")?;
                    }
                    if j.from_end {
                        f.write_str(",from_end")?;
                    }
                    if j.post_offset != 0 {
                        write!(f, ",post_offset {}", j.post_offset)?;
                    }
                    f.write_str(";")?;
                }
                PayloadOp::ByteExtract(b) => {
                    let e = &b.extract;
                    write!(f, " byte_extract:{},{},{}", e.bytes, e.offset, b.name)?;
                    write_extract_mods(f, e)?;
                    if let Some(m) = b.multiplier {
                        write!(f, ",multiplier {m}")?;
                    }
                    if let Some(a) = b.align {
                        write!(f, ",align {a}")?;
                    }
                    f.write_str(";")?;
                }
                PayloadOp::ByteMath(m) => {
                    let e = &m.extract;
                    write!(
                        f,
                        " byte_math:bytes {},offset {},oper {},rvalue {},result {}",
                        e.bytes,
                        nv(&e.offset, e.offset_var),
                        m.oper.symbol(),
                        nv(&m.rvalue, m.rvalue_var),
                        m.name
                    )?;
                    if e.relative {
                        f.write_str(",relative")?;
                    }
                    if e.little {
                        f.write_str(",endian little")?;
                    }
                    match e.string_base {
                        Some(16) => f.write_str(",string hex")?,
                        Some(8) => f.write_str(",string oct")?,
                        Some(_) => f.write_str(",string dec")?,
                        None => {}
                    }
                    if let Some(b) = e.bitmask {
                        write!(f, ",bitmask {b:#x}")?;
                    }
                    f.write_str(";")?;
                }
                PayloadOp::Base64Decode(d) => {
                    let mut args: Vec<String> = Vec::new();
                    if let Some(n) = d.bytes {
                        args.push(format!("bytes {n}"));
                    }
                    if d.offset != 0 {
                        args.push(format!("offset {}", d.offset));
                    }
                    if d.relative {
                        args.push("relative".into());
                    }
                    if args.is_empty() {
                        f.write_str(" base64_decode;")?;
                    } else {
                        write!(f, " base64_decode:{};", args.join(","))?;
                    }
                }
                PayloadOp::Base64Data => f.write_str(" base64_data;")?,
            }
        }
        if let Some(c) = &self.classtype {
            write!(f, " classtype:{c};")?;
        }
        if let Some(p) = self.priority {
            write!(f, " priority:{p};")?;
        }
        for m in &self.metadata {
            write!(f, " metadata:{m};")?;
        }
        for r in &self.references {
            write!(f, " reference:{r};")?;
        }
        if !self.services.is_empty() {
            write!(f, " service:{};", self.services.join(","))?;
        }
        write!(
            f,
            " gid:{}; sid:{}; rev:{}; )",
            self.gid, self.sid, self.rev
        )
    }
}

/// A rule that did not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line of the rule's first line.
    pub line: usize,
    /// Its sid, when one could be read.
    pub sid: Option<u32>,
    /// Why.
    pub error: RuleError,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sid {
            Some(s) => write!(f, "line {} sid {}: {}", self.line, s, self.error),
            None => write!(f, "line {} (no sid): {}", self.line, self.error),
        }
    }
}

/// Result of parsing a rules file.
#[derive(Clone, Debug, Default)]
pub struct ParsedRules {
    /// Loaded rules, in file order.
    pub rules: Vec<Rule>,
    /// Rules that did not load.
    pub rejected: Vec<Rejected>,
}

impl ParsedRules {
    /// Rejection counts by option (or error kind), most frequent first.
    pub fn summary(&self) -> Vec<(String, usize)> {
        let mut map: alloc::collections::BTreeMap<String, usize> = Default::default();
        for r in &self.rejected {
            for k in r.error.summary_keys() {
                *map.entry(k).or_default() += 1;
            }
        }
        let mut v: Vec<(String, usize)> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// Parses a whole rules file; rules that fail are reported, not fatal. Duplicate (gid, sid)
/// pairs are rejected after the first.
pub fn parse_rules(text: &str, vars: &Vars) -> ParsedRules {
    let mut out = ParsedRules::default();
    let mut seen = alloc::collections::BTreeSet::new();
    for (line, rule_text) in rule_lines(text) {
        match parse_rule(&rule_text, vars) {
            Ok(r) => {
                if seen.insert((r.gid, r.sid)) {
                    out.rules.push(r);
                } else {
                    out.rejected.push(Rejected {
                        line,
                        sid: Some(r.sid),
                        error: RuleError::BadOption {
                            option: "sid".to_owned(),
                            reason: format!("duplicate gid:sid {}:{}", r.gid, r.sid),
                        },
                    });
                }
            }
            Err(error) => out.rejected.push(Rejected {
                line,
                sid: sniff_sid(&rule_text),
                error,
            }),
        }
    }
    let lines = lines_of(text);
    // The parser only checks pcre syntax; building can still fail (e.g. a size limit). Refuse
    // such rules here, one by one, rather than letting the engine build fail for the set.
    let mut kept = Vec::with_capacity(out.rules.len());
    for r in core::mem::take(&mut out.rules) {
        match super::matcher::Program::new(&r) {
            Ok(_) => kept.push(r),
            Err(reason) => out.rejected.push(Rejected {
                line: lines.get(&(r.gid, r.sid)).copied().unwrap_or(0),
                sid: Some(r.sid),
                error: RuleError::BadOption {
                    option: "pcre".into(),
                    reason,
                },
            }),
        }
    }
    out.rules = kept;
    drop_unsatisfiable_flowbits(&mut out, &lines);
    out
}

/// Line numbers of the loaded rules, by (gid, sid).
fn lines_of(text: &str) -> BTreeMap<(u32, u32), usize> {
    let mut m = BTreeMap::new();
    for (line, t) in rule_lines(text) {
        if let Some(sid) = sniff_sid(&t) {
            let gid = t
                .find('(')
                .and_then(|o| split_options(&t[o + 1..]).ok())
                .and_then(|opts| {
                    opts.into_iter().find_map(|o| {
                        let (n, v) = o.split_once(':')?;
                        (n.trim() == "gid").then(|| v.trim().parse().ok()).flatten()
                    })
                })
                .unwrap_or(1);
            m.entry((gid, sid)).or_insert(line);
        }
    }
    m
}

/// A rule that requires `isset` of a bit that no loaded rule sets or toggles can never match:
/// refuse it (naming the bit) instead of loading a dead rule; repeat until stable, since a
/// refused rule may have been the only setter of another bit.
fn drop_unsatisfiable_flowbits(out: &mut ParsedRules, lines: &BTreeMap<(u32, u32), usize>) {
    loop {
        let settable: alloc::collections::BTreeSet<String> = out
            .rules
            .iter()
            .flat_map(|r| r.flowbits.iter())
            .filter(|fb| matches!(fb.cmd, FlowbitCmd::Set | FlowbitCmd::Toggle))
            .flat_map(|fb| fb.names.iter().cloned())
            .collect();
        let dead = |r: &Rule| -> Option<String> {
            r.flowbits
                .iter()
                .filter(|fb| fb.cmd == FlowbitCmd::IsSet)
                .find_map(|fb| {
                    let missing: Vec<&str> = fb
                        .names
                        .iter()
                        .map(String::as_str)
                        .filter(|n| !settable.contains(*n))
                        .collect();
                    let unsatisfiable = if fb.any {
                        missing.len() == fb.names.len()
                    } else {
                        !missing.is_empty()
                    };
                    unsatisfiable.then(|| missing.join(", "))
                })
        };
        let (mut keep, mut drop) = (Vec::new(), Vec::new());
        for r in core::mem::take(&mut out.rules) {
            match dead(&r) {
                Some(names) => drop.push((r, names)),
                None => keep.push(r),
            }
        }
        out.rules = keep;
        if drop.is_empty() {
            return;
        }
        for (r, names) in drop {
            out.rejected.push(Rejected {
                line: lines.get(&(r.gid, r.sid)).copied().unwrap_or(0),
                sid: Some(r.sid),
                error: RuleError::BadOption {
                    option: "flowbits".into(),
                    reason: format!("isset of `{names}`, which no loaded rule sets"),
                },
            });
        }
    }
}
