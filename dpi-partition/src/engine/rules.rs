//! Rule language: the Snort 3 / Suricata subset for packet-payload rules, parsed into [`Rule`].
//!
//! Supported header: actions `alert|drop|pass`; protocols `ip|tcp|udp|icmp`; addresses (IPv4,
//! IPv6, CIDR, `[lists]`, `!`, `any`, `$VARS`); ports (`n`, `a:b`, `:b`, `a:`, lists, `!`, `any`,
//! `$VARS`); `->` and `<>`.
//!
//! Supported options: `msg sid rev gid classtype priority metadata reference service` (kept;
//! `service` is not used for matching, rules match on their header ports only — Snort 3 would
//! also apply them to flows its service wizard identifies on other ports); `content` with `|hex|`,
//! escapes, `!`, and `nocase offset depth distance within fast_pattern` (+ Snort 3
//! `fast_pattern_offset/length`, Snort 2 `fast_pattern:only` and `fast_pattern:o,l`) in both the
//! Snort 2 (separate options) and Snort 3 (`content:"x",depth 16,nocase`) styles; `pcre`; `dsize`;
//! `flow`; plus `isdataat` and the no-op buffer selectors `pkt_data`/`raw_data` (the packet
//! payload is the only buffer). Everything else makes the rule not load
//! ([`RuleError::Unsupported`] names every such option).
//!
//! pcre: `/re/flags` with flags `i s m x` (PCRE meanings), `R` (relative to the cursor), `A`
//! (anchored), `G` (ungreedy), `E` (`$` only at the very end), and `B`/`O` (raw bytes / match-limit
//! override: no effect here, the payload is raw and regex-automata has no backtracking limit).
//! Compiled by regex-automata over bytes (no Unicode). Snort's idiom `(?!\n)\s` is rewritten to
//! the equivalent class `[^\S\n]`. Refused (rule not loaded, reason given):
//! backreferences, lookaround, atomic groups, possessive quantifiers, `\Z`, other PCRE-only
//! syntax (anything regex-automata's parser rejects), and without `m`/`E` a `$` anywhere but at
//! the end of the pattern (PCRE's `$` there also matches before a final newline, which is handled
//! exactly only at the end).

use alloc::borrow::ToOwned;
use alloc::boxed::Box;
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
}

impl Content {
    /// Whether the window is relative to the cursor.
    pub fn is_relative(&self) -> bool {
        self.distance.is_some() || self.within.is_some()
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

/// Comparison of `dsize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dsize {
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

impl Dsize {
    /// Whether a payload of `len` bytes passes.
    pub fn check(self, len: usize) -> bool {
        let x = u32::try_from(len).unwrap_or(u32::MAX);
        match self {
            Dsize::Eq(n) => x == n,
            Dsize::Ne(n) => x != n,
            Dsize::Lt(n) => x < n,
            Dsize::Gt(n) => x > n,
            Dsize::Le(n) => x <= n,
            Dsize::Ge(n) => x >= n,
            Dsize::Between(a, b) => a < x && x < b,
            Dsize::BetweenIncl(a, b) => a <= x && x <= b,
        }
    }
}

impl fmt::Display for Dsize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dsize::Eq(n) => write!(f, "{n}"),
            Dsize::Ne(n) => write!(f, "!{n}"),
            Dsize::Lt(n) => write!(f, "<{n}"),
            Dsize::Gt(n) => write!(f, ">{n}"),
            Dsize::Le(n) => write!(f, "<={n}"),
            Dsize::Ge(n) => write!(f, ">={n}"),
            Dsize::Between(a, b) => write!(f, "{a}<>{b}"),
            Dsize::BetweenIncl(a, b) => write!(f, "{a}<=>{b}"),
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
}

impl FlowCheck {
    /// Whether any flow requirement is present.
    pub fn is_set(&self) -> bool {
        self.to_server.is_some() || self.established || self.not_established || self.stateless
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
    /// `pkt_data` / `raw_data`: cursor back to the payload start.
    ResetCursor,
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
    pub dsize: Option<Dsize>,
    /// `flow`.
    pub flow: FlowCheck,
    /// Payload steps in rule order.
    pub ops: Vec<PayloadOp>,
}

/// The prefilter literal chosen for a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPattern<'a> {
    /// Bytes (a slice of the content when `fast_pattern_offset/length` is given).
    pub bytes: &'a [u8],
    /// ASCII case-insensitive.
    pub nocase: bool,
}

impl Rule {
    /// The prefilter literal: the content marked `fast_pattern`, else the longest non-negated
    /// content (first one on ties), as Snort and Suricata choose when the rule names none (with a
    /// single buffer, their buffer-priority rules do not apply). `None` — the rule is a candidate
    /// for every packet of its group — when it has no positive content or its explicit fast
    /// pattern is negated.
    pub fn fast_pattern(&self) -> Option<FastPattern<'_>> {
        let contents = self.ops.iter().filter_map(|o| match o {
            PayloadOp::Content(c) => Some(c),
            _ => None,
        });
        let chosen = match contents.clone().find(|c| c.fast_pattern) {
            Some(c) if c.negated => return None,
            Some(c) => c,
            None => {
                let mut best: Option<&Content> = None;
                for c in contents.filter(|c| !c.negated) {
                    if best.is_none_or(|b| c.pattern.len() > b.pattern.len()) {
                        best = Some(c);
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
        })
    }

    /// Whether any step uses the cursor left by an earlier step.
    pub fn has_relative(&self) -> bool {
        self.ops.iter().any(|o| match o {
            PayloadOp::Content(c) => c.is_relative(),
            PayloadOp::Pcre(p) => p.has('R'),
            PayloadOp::IsDataAt(d) => d.relative,
            PayloadOp::ResetCursor => false,
        })
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
    let proto = match header.get(1).copied() {
        Some("ip") => Proto::Ip,
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some("icmp") => Proto::Icmp,
        Some(p) => {
            return Err(header_err(
                "protocol",
                p,
                "only ip, tcp, udp and icmp are supported",
            ))
        }
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
        ops: Vec::new(),
    };
    let opts = split_options(body)?;
    // Reject unsupported options first so the report lists all of them.
    let mut unsupported: Vec<String> = Vec::new();
    for o in &opts {
        let name = o.split_once(':').map_or(*o, |(n, _)| n).trim();
        if !KNOWN.contains(&name) && !unsupported.iter().any(|u| u == name) {
            unsupported.push(name.to_string());
        }
    }
    if !unsupported.is_empty() {
        return Err(RuleError::Unsupported(unsupported));
    }
    let mut have_sid = false;
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
                        apply_modifier(&mut c, k, v)?;
                    }
                }
                rule.ops.push(PayloadOp::Content(c));
                last_content = Some(rule.ops.len() - 1);
            }
            "nocase" | "offset" | "depth" | "distance" | "within" | "fast_pattern" => {
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
                    apply_modifier(c, name, value)?;
                }
            }
            "pcre" => {
                let (negated, raw, rest) = quoted(name, need(name, value)?)?;
                if !rest.trim().is_empty() {
                    return Err(bad(name, "unexpected text after the pattern"));
                }
                let p = parse_pcre(&raw, negated)?;
                super::matcher::compile_pcre(&p).map_err(|e| bad("pcre", e))?;
                rule.ops.push(PayloadOp::Pcre(p));
            }
            "dsize" => rule.dsize = Some(parse_dsize(need(name, value)?)?),
            "flow" => rule.flow = parse_flow(need(name, value)?)?,
            "isdataat" => rule
                .ops
                .push(PayloadOp::IsDataAt(parse_isdataat(need(name, value)?)?)),
            "pkt_data" | "raw_data" => {
                if value.is_some() {
                    return Err(bad(name, "takes no value"));
                }
                if !rule.ops.is_empty() {
                    rule.ops.push(PayloadOp::ResetCursor);
                }
            }
            _ => unreachable!("option list checked against KNOWN"),
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

fn apply_modifier(c: &mut Content, k: &str, v: Option<&str>) -> Result<(), RuleError> {
    let need = || v.ok_or_else(|| bad(k, "needs a value"));
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

fn parse_dsize(v: &str) -> Result<Dsize, RuleError> {
    let n = |s: &str| num::<u32>("dsize", s);
    let v = v.trim();
    if let Some((a, b)) = v.split_once("<=>") {
        return Ok(Dsize::BetweenIncl(n(a)?, n(b)?));
    }
    if let Some((a, b)) = v.split_once("<>") {
        return Ok(Dsize::Between(n(a)?, n(b)?));
    }
    Ok(if let Some(r) = v.strip_prefix("<=") {
        Dsize::Le(n(r)?)
    } else if let Some(r) = v.strip_prefix(">=") {
        Dsize::Ge(n(r)?)
    } else if let Some(r) = v.strip_prefix('<') {
        Dsize::Lt(n(r)?)
    } else if let Some(r) = v.strip_prefix('>') {
        Dsize::Gt(n(r)?)
    } else if let Some(r) = v.strip_prefix('!') {
        Dsize::Ne(n(r)?)
    } else if let Some(r) = v.strip_prefix('=') {
        Dsize::Eq(n(r)?)
    } else {
        Dsize::Eq(n(v)?)
    })
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

fn parse_isdataat(v: &str) -> Result<IsDataAt, RuleError> {
    let mut parts = v.split(',').map(str::trim);
    let first = parts.next().unwrap_or("");
    let (negated, n) = match first.strip_prefix('!') {
        Some(r) => (true, r.trim()),
        None => (false, first),
    };
    let mut d = IsDataAt {
        negated,
        pos: num("isdataat", n)?,
        relative: false,
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
    let mut fp = 0;
    for op in &rule.ops {
        let PayloadOp::Content(c) = op else { continue };
        let len = c.pattern.len() as u64;
        if (c.offset.is_some() || c.depth.is_some()) && c.is_relative() {
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

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {} (",
            self.action.keyword(),
            self.proto.keyword(),
            self.src,
            self.src_ports,
            if self.bidirectional { "<>" } else { "->" },
            self.dst,
            self.dst_ports
        )?;
        f.write_str(" msg:")?;
        write_quoted_text(f, &self.msg)?;
        f.write_str(";")?;
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
            write!(f, " flow:{};", parts.join(","))?;
        }
        if let Some(d) = self.dsize {
            write!(f, " dsize:{d};")?;
        }
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
                    write!(f, " isdataat:{neg}{}{rel};", d.pos)?;
                }
                PayloadOp::ResetCursor => f.write_str(" pkt_data;")?,
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
    out
}
