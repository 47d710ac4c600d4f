//! HTTP/1.x application-layer buffers: the Snort 3 sticky buffers (`http_uri`, `http_header`,
//! `file_data`, ...) built from an inspected TCP payload, and from the per-flow message state
//! of [`super::http_flow`].
//!
//! # Model
//!
//! An HTTP rule is matched on two views of a TCP segment, and matches when it matches either:
//!
//! 1. **The payload view**, per inspected payload `P`: the stream window when the stream
//!    tracker accepted the segment (up to 1 KiB of earlier bytes, then the new ones), else the
//!    segment's own payload (untracked flows; UDP is never HTTP). Nothing is kept across
//!    payloads: messages are found anywhere in `P` as described below, a body only as far as
//!    `P` holds it after its head.
//! 2. **The flow view**, only for segments the tracker accepted: each direction of the flow
//!    has an incremental parser ([`super::http_flow`]) fed with the segment's new bytes in
//!    stream order. It finds a start line at a line start, accumulates the head (up to 8 KiB,
//!    however many segments it spans), then follows the body's framing (Content-Length,
//!    chunked, or to the connection's end; none for 1xx/204/304 and for responses to HEAD;
//!    a 2xx to CONNECT or a 101 ends parsing of that direction), de-chunking and inflating
//!    (gzip/deflate, one inflater carried across segments) as bytes arrive, and after the body
//!    looks for the next start line (pipelining). A segment yields the messages it made
//!    progress on: the one whose start line completed (start-line buffers), the one whose head
//!    completed (all head buffers, from the complete head, plus any body bytes that followed),
//!    and every message whose decoded body grew: its head buffers again with `file_data` /
//!    `http_client_body` = the body *window*, the last 1 KiB of decoded body bytes from earlier
//!    segments followed by the new ones, so a pattern split between two segments' decoded
//!    output still matches. Such a match counts only when the rule did not already match the
//!    message as it was before the segment (the head as then known, or the window's old part),
//!    so the segment whose bytes complete the match gets the verdict, once. A window that
//!    does not start at the body's first byte, or that hit an inflate cap, is *truncated*
//!    (below). `pkt_data` of these messages is their head.
//!
//! A head over 8 KiB, or a line that starts like a start line and passes 8 KiB without its
//! LF, is an evasion event, and so is a segment that inflates past its bound (a decompression
//! bomb: 128 KiB, or 16 times the segment's bytes for a TSO super-frame, at most about 1 MiB);
//! all flows' buffers share a memory limit: at any of these the segment is dropped and its
//! flow blocked (the stream tracker's fail-closed policy; fail-open stops parsing that
//! direction), counted in `EngineStats::http_dropped` and by reason in
//! [`super::HttpStateStats`]. A body is inflated to its end however long it is (no
//! per-message depth for a server to pad past). Bytes of state per flow: 384
//! inline (one per tracker slot, allocated with the engine), and, only while needed, per
//! direction the head (at most 8 KiB), the body tail (1 KiB) and an inflater (43,272 bytes:
//! decompressor and 32 KiB window): at most about 103 KiB per flow; all flows' heads, tails
//! and inflaters together stay within `HttpStateConfig::max_total_bytes` (4 MiB), so the
//! engine's worst case is 4096 × 384 B + 4 MiB + 4.3 MiB of per-segment scratch, 9.8 MiB
//! ([`super::HttpStateConfig::heap_bound`], reserved in Ally's heap with the stream
//! tracker's).
//!
//! The URI of a request is not available to rules on its response (Snort's `request` option
//! is refused by the rule parser). The rest of this section describes the payload view; the
//! flow view parses each head with the same code.
//!
//! **Messages** are found by trying offset 0 and every line start of `P` in order. A request
//! starts with `METHOD SP target SP HTTP/d.d` (method: 1-32 token characters; the target is
//! everything between the first and the last space, so raw non-UTF-8 bytes and stray spaces do
//! not hide it; the version is matched case-insensitively); a response with
//! `HTTP/d.d SP 3DIGIT [SP reason]`; either line may end in CRLF or a bare LF. The head ends at
//! the first empty line. After a message the search goes on at the line after its head, also
//! inside its body: content of a body is never able to hide a later message, at the price of
//! body lines that look like a start line being taken for extra messages (their bodies overlap;
//! messages are independent views). At most [`MAX_MESSAGES`] messages per payload are kept;
//! messages that lie wholly in the window's old bytes are skipped (they were inspected before).
//!
//! **Heads**: the header block is parsed by `httparse` (fed after a synthetic start line) with
//! invalid header lines skipped (as nginx and browsers do) and obsolete line folding accepted in
//! responses. A head that is not complete in `P` yields only the start-line buffers. More than
//! [`MAX_HEADERS`] header lines, or a header block `httparse` refuses (NUL, lone CR): the header
//! buffers are the whole raw header block (cookie included), there is no cookie buffer, and the
//! body is taken to run to the end of `P`.
//!
//! # Buffers
//!
//! Requests: `http_method`, `http_raw_uri`, `http_uri`, headers, cookie, `http_client_body` and
//! `file_data` (when there is a body), `http.host`, `http.user_agent`. Responses:
//! `http_stat_code`, `http_stat_msg`, headers, cookie (from Set-Cookie), `file_data`. A buffer
//! the message does not have is *absent*: a rule that switches to it does not match (even with
//! only negated contents after it), as in Snort.
//!
//! - `http_raw_uri`: the target as sent. `http_uri`: the normalized target. Origin form
//!   (`/path?query#frag`) and absolute form (`scheme://authority/path?query`, reduced to
//!   `/path?query#frag` as Snort does) are normalized; `*`, authority form and anything else
//!   stay raw. Normalization, per component (path = up to the first `?` or `#`, then the rest):
//!   1. percent-decoding: `%hh` to the byte, `%%` to `%`, other `%` kept; then, where every
//!      byte of a 2- or 3-byte UTF-8 sequence came from `%hh`, the sequence becomes its code
//!      point when that is below 256, else `0xFF` (so the overlong `%c0%af` is `/`); then one
//!      more `%hh` pass when the first produced or kept a `%` (double decoding: `%252e` is `.`);
//!   2. `\` becomes `/` and `+` a space (whole URI, as Snort's defaults);
//!   3. in the path only: runs of `/` collapse, `/./` goes, `/seg/../` goes with its segment,
//!      and a `..` above the root is kept (`/../a` stays); a final `.` or `..` segment leaves a
//!      trailing `/`.
//!
//!   So `/a/%2e%2e%2fb` is `/b` and `/x/..%5c..%5cetc` is `/../etc`.
//! - `http_raw_header`: the header lines as sent (after the start line, without the final empty
//!   line and the last line's terminator). `http_header`: Snort's classic normalized header:
//!   every header line except Cookie (requests) or Set-Cookie (responses), each with its own
//!   line terminator (CRLF between lines, none after the last), percent-decoded as in step 1
//!   above (no path simplification). Skipped invalid lines are only in the raw buffer.
//! - `http_raw_cookie`: the Cookie (Set-Cookie) value, several joined with `, `; `http_cookie`:
//!   the same percent-decoded.
//! - `http.host`: the first Host value, lower-cased; `http.user_agent`: the first User-Agent
//!   value. (Suricata's `http.header` also holds the cookie; here the dotted names are aliases
//!   of the Snort buffers.)
//! - `http_stat_code`: the three digits; `http_stat_msg`: the reason phrase (possibly empty).
//! - Body framing: a Transfer-Encoding whose last coding is `chunked` wins; else Content-Length
//!   (several equal values are one; differing or malformed ones, or a Transfer-Encoding without
//!   `chunked`: the body runs to the end of `P`); else requests have no body and responses run
//!   to the end of `P` (but 1xx, 204 and 304 have none). `file_data` is the body bytes present
//!   in `P`, de-chunked (chunk extensions and trailers dropped; a malformed chunk line ends the
//!   body) and, for `Content-Encoding: gzip`/`x-gzip`/`deflate` (zlib or raw deflate), inflated
//!   as far as the bytes present allow. Other or stacked codings are left as they are.
//!   `http_client_body` (requests only) is `file_data` percent-decoded as in step 1.
//!
//! # Bounds
//!
//! The work per payload is linear in `P` plus the inflated output: each line start is tried
//! once, and a head is parsed once. Bodies may overlap (a start line inside a body), so the
//! body bytes walked per payload (de-chunking, percent-decoding, inflater input) are capped at
//! twice `P` plus [`BODY_WORK_SLACK`]. Inflating stops at [`INFLATE_CAP`] bytes per body and
//! [`INFLATE_BUDGET`] per payload (a decompression bomb costs at most that). A body cut at any
//! of these limits is marked *truncated*. On a truncated buffer only positive evidence counts:
//! a rule whose steps on that buffer include a negated content or pcre, `bufferlen`, a negated
//! `isdataat` or a `byte_jump from_end` does not match (Snort instead evaluates what its depth
//! limits leave, which can make `content:!` true on a cut body). A body cut by the end of `P`
//! (the rest comes in later segments) is not marked: like one of Snort's body sections, it is
//! judged as it is. Decoded bytes live in one arena reused across payloads; it holds at most
//! about three times `P` plus the inflate budget. Nothing here panics on any input.

use alloc::boxed::Box;
use alloc::vec::Vec;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::matcher::Buffers;
use super::rules::HttpBuffer;

/// Messages kept per payload (later ones are not parsed).
pub const MAX_MESSAGES: usize = 256;
/// Header lines parsed per head.
pub const MAX_HEADERS: usize = 128;
/// Inflated bytes per body.
pub const INFLATE_CAP: usize = 64 * 1024;
/// Inflated bytes per payload, all bodies together.
pub const INFLATE_BUDGET: usize = 128 * 1024;
/// Body bytes one payload may walk (de-chunk, percent-decode, feed to the inflater), beyond
/// twice its length. Bodies of real messages do not overlap, so only start lines found inside
/// other bodies make the sum exceed the payload.
pub const BODY_WORK_SLACK: usize = 4096;
/// Longest method token.
const MAX_METHOD: usize = 32;

/// Where a buffer's bytes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Loc {
    #[default]
    Absent,
    /// A slice of the payload.
    Payload(u32, u32),
    /// A slice of the arena (decoded bytes).
    Arena(u32, u32),
}

/// One HTTP message found in a payload.
#[derive(Clone, Debug)]
pub struct Message {
    /// Offset of its start line in the payload.
    pub start: usize,
    /// Offset after its last byte present in the payload (head, or body as framed).
    pub end: usize,
    /// A request (else a response).
    pub request: bool,
    /// The whole head is in the payload.
    pub head_complete: bool,
    /// Response status code.
    pub status: Option<u16>,
    locs: [Loc; HttpBuffer::COUNT],
    /// Bit per buffer index: cut at an inflate limit.
    truncated: u16,
    /// How the body is delimited (complete heads only; [`Framing::None`] otherwise).
    pub framing: Framing,
    /// The body's content coding.
    pub coding: Coding,
    /// Stream messages ([`HttpParser::parse_head_at`]): `file_data` and `http_client_body` as
    /// they were before the current segment, with their truncation bits.
    old_body: Option<([Loc; 2], u16)>,
}

/// The messages of one payload and their decoded bytes.
#[derive(Debug, Default)]
pub struct HttpView {
    msgs: Vec<Message>,
    arena: Vec<u8>,
}

/// What an EVE record tells about the message an alert matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpMeta<'a> {
    /// Host header value without a port, lower-cased.
    pub hostname: Option<&'a [u8]>,
    /// Request target as sent.
    pub url: Option<&'a [u8]>,
    /// Request method.
    pub method: Option<&'a [u8]>,
    /// User-Agent value.
    pub user_agent: Option<&'a [u8]>,
    /// Response status code.
    pub status: Option<u16>,
}

impl HttpView {
    /// The messages found (in payload order).
    pub fn messages(&self) -> &[Message] {
        &self.msgs
    }

    fn slice<'a>(&'a self, loc: Loc, p: &'a [u8]) -> Option<&'a [u8]> {
        match loc {
            Loc::Absent => None,
            Loc::Payload(a, b) => p.get(a as usize..b as usize),
            Loc::Arena(a, b) => self.arena.get(a as usize..b as usize),
        }
    }

    /// One buffer of message `m` (`p`: the payload it was parsed from).
    pub fn buffer<'a>(&'a self, m: &Message, b: HttpBuffer, p: &'a [u8]) -> Option<&'a [u8]> {
        self.slice(m.locs[b.index()], p)
    }

    /// The buffers of message `m` for a payload program: its HTTP buffers, and as the packet
    /// buffer (`pkt_data`) the message's own bytes in `p`.
    pub fn buffers<'a>(&'a self, m: &Message, p: &'a [u8]) -> Buffers<'a> {
        let mut out = Buffers::pkt(p.get(m.start..m.end.min(p.len())).unwrap_or(&[]));
        for b in HttpBuffer::ALL {
            out.http[b.index()] = self.slice(m.locs[b.index()], p);
        }
        out.truncated = m.truncated;
        out
    }

    /// The decoded buffers of message `m` (those that are not a slice of the payload).
    pub fn decoded(&self, m: &Message) -> impl Iterator<Item = &[u8]> + '_ {
        let locs = m.locs;
        locs.into_iter().filter_map(move |l| match l {
            Loc::Arena(a, b) if b > a => self.arena.get(a as usize..b as usize),
            _ => None,
        })
    }

    /// Forgets every message and decoded byte.
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.arena.clear();
    }

    /// Appends decoded body bytes to the arena (see [`HttpView::attach_body`]); returns the
    /// arena length before them.
    pub fn push_decoded(&mut self, bytes: &[u8]) -> usize {
        let at = self.arena.len();
        self.arena.extend_from_slice(bytes);
        at
    }

    /// The arena's length (where the next decoded bytes go).
    pub fn arena_len(&self) -> usize {
        self.arena.len()
    }

    /// Keeps the first `len` arena bytes.
    pub fn truncate_arena(&mut self, len: usize) {
        self.arena.truncate(len);
    }

    /// The arena bytes from `from` on.
    pub fn arena_from(&self, from: usize) -> &[u8] {
        self.arena.get(from..).unwrap_or(&[])
    }

    /// Makes the arena bytes from `from` to its end message `k`'s body window: its `file_data`
    /// and, for a request, `http_client_body` (percent-decoded). The first `old` bytes of the
    /// window were inspected with an earlier segment: the message's *old* buffers
    /// ([`HttpView::old_buffers`]) have them as the body (absent when `old` is 0). `cut`: the
    /// window does not start at the body's first byte or decoding stopped at a limit; the body
    /// buffers are then marked truncated (only positive evidence counts on them).
    pub fn attach_body(
        &mut self,
        k: usize,
        from: usize,
        old: usize,
        cut: bool,
        parser: &mut HttpParser,
    ) {
        let Some(request) = self.msgs.get(k).map(|m| m.request) else {
            return;
        };
        let end = self.arena.len();
        let from = from.min(end);
        let old_end = from.saturating_add(old).min(end);
        let fd = Loc::Arena(from as u32, end as u32);
        let fdi = HttpBuffer::FileData.index();
        let cbi = HttpBuffer::ClientBody.index();
        let bits = if cut { 1 << fdi | 1 << cbi } else { 0 };
        let (mut cb, mut cb_old) = (Loc::Absent, Loc::Absent);
        if request {
            for (range, out) in [((from, end), &mut cb), ((from, old_end), &mut cb_old)] {
                parser.tmp2.clear();
                decode_chars(
                    &self.arena[range.0..range.1],
                    &mut parser.tmp2,
                    &mut parser.pct,
                );
                *out = if parser.tmp2[..] == self.arena[range.0..range.1] {
                    Loc::Arena(range.0 as u32, range.1 as u32)
                } else {
                    put(self, &parser.tmp2)
                };
            }
        }
        let Some(m) = self.msgs.get_mut(k) else {
            return;
        };
        m.locs[fdi] = fd;
        m.locs[cbi] = cb;
        m.truncated |= bits;
        m.old_body = Some(if old == 0 {
            ([Loc::Absent; 2], 0)
        } else {
            ([Loc::Arena(from as u32, old_end as u32), cb_old], bits)
        });
    }

    /// Message `m`'s buffers as they were before the current segment, for a message with a
    /// body window ([`HttpView::attach_body`]): `None` for other messages.
    pub fn old_buffers<'a>(&'a self, m: &Message, p: &'a [u8]) -> Option<Buffers<'a>> {
        let (locs, bits) = m.old_body?;
        let mut b = self.buffers(m, p);
        let (fdi, cbi) = (HttpBuffer::FileData.index(), HttpBuffer::ClientBody.index());
        b.http[fdi] = self.slice(locs[0], p);
        b.http[cbi] = self.slice(locs[1], p);
        b.truncated = (b.truncated & !(1 << fdi | 1 << cbi)) | bits;
        Some(b)
    }

    /// The message starting at `start`.
    pub fn at_start(&self, start: usize) -> Option<&Message> {
        self.msgs.iter().find(|m| m.start == start)
    }

    /// EVE details of message `m`.
    pub fn meta<'a>(&'a self, m: &Message, p: &'a [u8]) -> HttpMeta<'a> {
        let host = self.buffer(m, HttpBuffer::Host, p).map(|h| {
            // Drop a port, but not inside an IPv6 literal.
            match h.iter().rposition(|&c| c == b':') {
                Some(i) if !h[i..].contains(&b']') && h[i + 1..].iter().all(u8::is_ascii_digit) => {
                    &h[..i]
                }
                _ => h,
            }
        });
        HttpMeta {
            hostname: host,
            url: self.buffer(m, HttpBuffer::RawUri, p),
            method: self.buffer(m, HttpBuffer::Method, p),
            user_agent: self.buffer(m, HttpBuffer::UserAgent, p),
            status: m.status,
        }
    }
}

/// A parsed header line, as offsets into the payload.
#[derive(Clone, Copy, Debug)]
struct Hdr {
    name: (usize, usize),
    value: (usize, usize),
    /// After the line terminator of the line where the value ends.
    line_end: usize,
}

/// How a body is delimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    #[default]
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// To the end of the connection (also conflicting or malformed framing headers).
    Rest,
}

/// Content coding of a body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Coding {
    /// Not decoded.
    #[default]
    Identity,
    /// `gzip` / `x-gzip`.
    Gzip,
    /// `deflate` (zlib or raw).
    Deflate,
}

/// The HTTP parser with its reusable scratch space.
pub struct HttpParser {
    inflater: Box<DecompressorOxide>,
    /// Synthetic head handed to httparse.
    head: Vec<u8>,
    hdrs: Vec<Hdr>,
    /// De-chunked body.
    chunks: Vec<u8>,
    /// Header lines; joined values.
    tmp: Vec<u8>,
    /// Normalization output.
    tmp2: Vec<u8>,
    /// Percent-decoded path before simplification.
    tmp3: Vec<u8>,
    /// Which decoded bytes came from `%hh`.
    pct: Vec<bool>,
    /// Path segments during simplification: (start, end) in the decoded path.
    segs: Vec<(usize, usize)>,
}

impl core::fmt::Debug for HttpParser {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HttpParser")
    }
}

impl Default for HttpParser {
    fn default() -> Self {
        HttpParser::new()
    }
}

pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `HTTP/d.d`, the name in any case.
fn is_version(v: &[u8]) -> bool {
    v.len() == 8
        && v[..5].eq_ignore_ascii_case(b"HTTP/")
        && v[5].is_ascii_digit()
        && v[6] == b'.'
        && v[7].is_ascii_digit()
}

/// Line starting at `at`: (end of its content without CR, offset after its LF).
fn line_at(p: &[u8], at: usize) -> Option<(usize, usize)> {
    let lf = at + memchr::memchr(b'\n', p.get(at..)?)?;
    let end = if lf > at && p[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    Some((end, lf + 1))
}

struct StartLine {
    /// Offset of the line.
    at: usize,
    /// Request: method; response: status code digits.
    a: (usize, usize),
    /// Request: target; response: reason phrase.
    b: (usize, usize),
    status: Option<u16>,
    /// After the line's LF.
    next: usize,
}

fn request_line(p: &[u8], at: usize) -> Option<StartLine> {
    let s = p.get(at..)?;
    let mlen = s.iter().take(MAX_METHOD + 1).position(|&b| !is_tchar(b))?;
    if mlen == 0 || s[mlen] != b' ' {
        return None;
    }
    let (end, next) = line_at(p, at)?;
    let line = &p[at..end];
    let mut e = line.len();
    while e > mlen && matches!(line[e - 1], b' ' | b'\t') {
        e -= 1;
    }
    let sp = memchr::memrchr(b' ', &line[..e])?;
    if sp <= mlen || !is_version(&line[sp + 1..e]) {
        return None;
    }
    let mut ts = mlen;
    while ts < sp && line[ts] == b' ' {
        ts += 1;
    }
    let mut te = sp;
    while te > ts && line[te - 1] == b' ' {
        te -= 1;
    }
    if te == ts {
        return None;
    }
    Some(StartLine {
        at,
        a: (at, at + mlen),
        b: (at + ts, at + te),
        status: None,
        next,
    })
}

fn status_line(p: &[u8], at: usize) -> Option<StartLine> {
    let s = p.get(at..)?;
    if s.len() < 12 || !is_version(&s[..8]) || s[8] != b' ' {
        return None;
    }
    let mut i = 9;
    while s.get(i) == Some(&b' ') {
        i += 1;
    }
    let code = s.get(i..i + 3)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let c = code.iter().fold(0u16, |v, &d| v * 10 + u16::from(d - b'0'));
    let after = at + i + 3;
    let (end, next) = line_at(p, at)?;
    let reason = match p.get(after) {
        Some(b' ') | Some(b'\t') => {
            let mut r = after;
            while r < end && matches!(p[r], b' ' | b'\t') {
                r += 1;
            }
            (r.min(end), end)
        }
        _ if after == end => (end, end),
        _ => return None,
    };
    Some(StartLine {
        at,
        a: (at + i, after),
        b: reason,
        status: Some(c),
        next,
    })
}

/// What a complete start line (the whole of `line`, ending with its LF) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartKind {
    /// A request line; its method.
    Request(Method),
    /// A status line; its code.
    Response(u16),
}

/// Request methods that change how the response is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Head,
    Connect,
    Other,
}

/// Whether `line` (one line with its LF) is a request or status line, as [`HttpParser::parse`]
/// finds them.
pub(crate) fn start_line(line: &[u8]) -> Option<StartKind> {
    if let Some(l) = request_line(line, 0) {
        let m = &line[l.a.0..l.a.1];
        let method = match m {
            b"HEAD" => Method::Head,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        };
        return Some(StartKind::Request(method));
    }
    status_line(line, 0).and_then(|l| l.status.map(StartKind::Response))
}

/// Offset after the empty line that ends a head whose header lines start at `from`.
pub(crate) fn head_end(p: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < p.len() {
        if p[i] == b'\n' {
            return Some(i + 1);
        }
        if p[i] == b'\r' && p.get(i + 1) == Some(&b'\n') {
            return Some(i + 2);
        }
        i += memchr::memchr(b'\n', &p[i..])? + 1;
    }
    None
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|v| v as u8)
}

/// Percent-decoding as in step 1 of the module docs, appended to `out`.
fn decode_chars(src: &[u8], out: &mut Vec<u8>, pct: &mut Vec<bool>) {
    let start = out.len();
    pct.clear();
    let (mut double, mut utf8) = (false, false);
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        if b != b'%' {
            out.push(b);
            pct.push(false);
            i += 1;
            continue;
        }
        let pair = (
            src.get(i + 1).copied().and_then(hex),
            src.get(i + 2).copied().and_then(hex),
        );
        if let (Some(h), Some(l)) = pair {
            let v = h << 4 | l;
            double |= v == b'%';
            utf8 |= v & 0xE0 == 0xC0 || v & 0xF0 == 0xE0;
            out.push(v);
            pct.push(true);
            i += 3;
        } else {
            double = true;
            out.push(b'%');
            pct.push(false);
            i += if src.get(i + 1) == Some(&b'%') { 2 } else { 1 };
        }
    }
    if utf8 {
        let buf = &mut out[start..];
        let n = buf.len();
        let (mut r, mut w) = (0, 0);
        let cont = |x: u8| x & 0xC0 == 0x80;
        while r < n {
            let b = buf[r];
            let enc = |k: usize| pct.get(r + k).copied().unwrap_or(false);
            let (cp, len) = if enc(0) && b & 0xE0 == 0xC0 && r + 1 < n && enc(1) && cont(buf[r + 1])
            {
                (u32::from(b & 0x1F) << 6 | u32::from(buf[r + 1] & 0x3F), 2)
            } else if enc(0)
                && b & 0xF0 == 0xE0
                && r + 2 < n
                && enc(1)
                && enc(2)
                && cont(buf[r + 1])
                && cont(buf[r + 2])
            {
                (
                    u32::from(b & 0x0F) << 12
                        | u32::from(buf[r + 1] & 0x3F) << 6
                        | u32::from(buf[r + 2] & 0x3F),
                    3,
                )
            } else {
                (u32::from(b), 1)
            };
            let v = u8::try_from(cp).unwrap_or(0xFF);
            double |= len > 1 && v == b'%';
            buf[w] = v;
            w += 1;
            r += len;
        }
        out.truncate(start + w);
    }
    if double {
        let buf = &mut out[start..];
        let n = buf.len();
        let (mut r, mut w) = (0, 0);
        while r < n {
            let pair = if buf[r] == b'%' && r + 2 < n {
                hex(buf[r + 1]).zip(hex(buf[r + 2]))
            } else {
                None
            };
            match pair {
                Some((h, l)) => {
                    buf[w] = h << 4 | l;
                    r += 3;
                }
                None => {
                    buf[w] = buf[r];
                    r += 1;
                }
            }
            w += 1;
        }
        out.truncate(start + w);
    }
}

/// `\` to `/`, `+` to space.
fn substitute(buf: &mut [u8]) {
    for b in buf {
        match *b {
            b'\\' => *b = b'/',
            b'+' => *b = b' ',
            _ => {}
        }
    }
}

/// Path simplification (step 3 of the module docs) of `path` (starting with `/`), appended to
/// `out`.
fn simplify_path(path: &[u8], out: &mut Vec<u8>, segs: &mut Vec<(usize, usize)>) {
    segs.clear();
    let mut trailing = false;
    let body = path.strip_prefix(b"/").unwrap_or(path);
    let base = path.len() - body.len();
    let mut pos = base;
    let pieces = body.split(|&b| b == b'/');
    let count = body.iter().filter(|&&b| b == b'/').count() + 1;
    for (k, seg) in pieces.enumerate() {
        let last = k + 1 == count;
        let range = (pos, pos + seg.len());
        pos += seg.len() + 1;
        match seg {
            b"" | b"." => trailing = last,
            b".." => {
                match segs.last() {
                    Some(&(a, b)) if &path[a..b] != b".." => {
                        segs.pop();
                    }
                    _ => segs.push(range),
                }
                trailing = last;
            }
            _ => {
                segs.push(range);
                trailing = false;
            }
        }
    }
    out.push(b'/');
    for (i, &(a, b)) in segs.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(&path[a..b]);
    }
    if trailing && !segs.is_empty() {
        out.push(b'/');
    }
}

/// Whether a header name equals `want` (ASCII case-insensitive).
fn name_is(p: &[u8], h: &Hdr, want: &str) -> bool {
    p[h.name.0..h.name.1].eq_ignore_ascii_case(want.as_bytes())
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &v[s..e.max(s)]
}

/// Parses a gzip member header (RFC 1952): offset of the deflate data.
fn gzip_header(d: &[u8]) -> Option<usize> {
    if d.len() < 10 || d[0] != 0x1f || d[1] != 0x8b || d[2] != 8 {
        return None;
    }
    let flags = d[3];
    let mut i = 10;
    if flags & 4 != 0 {
        let xlen = usize::from(u16::from_le_bytes([*d.get(i)?, *d.get(i + 1)?]));
        i += 2 + xlen;
    }
    for bit in [8u8, 16] {
        if flags & bit != 0 {
            i += memchr::memchr(0, d.get(i..)?)? + 1;
        }
    }
    if flags & 2 != 0 {
        i += 2;
    }
    (i <= d.len()).then_some(i)
}

/// Whether `d` starts with a zlib header (RFC 1950) using deflate.
pub(crate) fn is_zlib(d: &[u8]) -> bool {
    d.len() >= 2 && d[0] & 0x0F == 8 && (u16::from(d[0]) << 8 | u16::from(d[1])) % 31 == 0
}

impl HttpParser {
    /// A parser with empty scratch space.
    pub fn new() -> HttpParser {
        HttpParser {
            inflater: Box::default(),
            head: Vec::new(),
            hdrs: Vec::new(),
            chunks: Vec::new(),
            tmp: Vec::new(),
            tmp2: Vec::new(),
            tmp3: Vec::new(),
            pct: Vec::new(),
            segs: Vec::new(),
        }
    }

    /// Finds the messages of payload `p` into `view`, skipping those that end at or before
    /// `min_end` (bytes inspected before).
    pub fn parse(&mut self, p: &[u8], min_end: usize, view: &mut HttpView) {
        view.msgs.clear();
        view.arena.clear();
        let mut budget = Budget {
            inflate: INFLATE_BUDGET,
            body: p.len().saturating_mul(2).saturating_add(BODY_WORK_SLACK),
        };
        let mut at = 0;
        while at < p.len() && view.msgs.len() < MAX_MESSAGES {
            let line = request_line(p, at)
                .map(|l| (l, true))
                .or_else(|| status_line(p, at).map(|l| (l, false)));
            match line {
                Some((l, request)) => {
                    let (head_end, end) =
                        self.message(p, l, request, min_end, &mut budget, view, false);
                    // The search goes on at line starts after the head (a window may start
                    // inside a body), and at the end of a framed body: a pipelined message
                    // may follow it at once, not at a line start.
                    at = match end {
                        Some(e)
                            if e < p.len()
                                && (request_line(p, e).is_some()
                                    || status_line(p, e).is_some()) =>
                        {
                            e
                        }
                        _ => head_end,
                    };
                }
                None => {
                    at = match memchr::memchr(b'\n', &p[at..]) {
                        Some(i) => at + i + 1,
                        None => p.len(),
                    }
                }
            }
        }
    }

    /// Parses the message head that starts at `at` in `p` (and ends at or before the end of
    /// `p`) into `view`, appending to what it holds: the start-line buffers, and the header
    /// buffers, framing and coding when the head is complete in `p`. The body is not looked
    /// at ([`HttpView::attach_body`] adds it). Returns the message's index in the view, or
    /// `None` when no start line is at `at`. Used for messages kept across segments
    /// ([`super::http_flow`]).
    pub fn parse_head_at(&mut self, p: &[u8], at: usize, view: &mut HttpView) -> Option<usize> {
        let line = request_line(p, at)
            .map(|l| (l, true))
            .or_else(|| status_line(p, at).map(|l| (l, false)))?;
        let mut budget = Budget {
            inflate: 0,
            body: 0,
        };
        let n = view.msgs.len();
        self.message(p, line.0, line.1, 0, &mut budget, view, true);
        (view.msgs.len() > n).then_some(n)
    }

    /// Parses the message whose start line is `l`; returns where the search goes on (the end
    /// of its head) and, for a complete head with a framed body (a length, or chunks that
    /// ended), where the message ends. `head_only`: leave the body out.
    #[allow(clippy::too_many_arguments)]
    fn message(
        &mut self,
        p: &[u8],
        l: StartLine,
        request: bool,
        min_end: usize,
        budget: &mut Budget,
        view: &mut HttpView,
        head_only: bool,
    ) -> (usize, Option<usize>) {
        let mut m = Message {
            start: l.at,
            end: p.len(),
            request,
            head_complete: false,
            status: l.status,
            locs: [Loc::Absent; HttpBuffer::COUNT],
            truncated: 0,
            framing: Framing::None,
            coding: Coding::Identity,
            old_body: None,
        };
        let pay = |r: (usize, usize)| Loc::Payload(r.0 as u32, r.1 as u32);
        let Some(hend) = head_end(p, l.next) else {
            // Head not complete: start-line buffers only.
            if m.end > min_end {
                self.start_line_buffers(p, &l, request, &mut m, view);
                view.msgs.push(m);
            }
            return (p.len(), None);
        };
        m.head_complete = true;
        let parsed = self.parse_headers(p, (l.next, hend), request);
        let framing = if parsed {
            self.framing(p, request, l.status)
        } else {
            Framing::Rest
        };
        m.framing = framing;
        if parsed {
            m.coding = self.coding(p);
        }
        m.end = match framing {
            Framing::None => hend,
            Framing::Length(n) => {
                usize::try_from(n).map_or(p.len(), |n| hend.saturating_add(n).min(p.len()))
            }
            Framing::Rest | Framing::Chunked => p.len(),
        };
        let mut cut = false;
        // Where the message ends, when its framing says so within `p`.
        let mut framed_end = match framing {
            Framing::None => Some(hend),
            Framing::Length(_) => Some(m.end),
            Framing::Rest | Framing::Chunked => None,
        };
        if framing == Framing::Chunked && !head_only {
            let (end, walked, c) = self.dechunk(p, hend, budget.body);
            budget.body -= walked;
            m.end = end;
            cut = c;
            framed_end = (end < p.len()).then_some(end);
        }
        if m.end <= min_end {
            return (hend, framed_end);
        }
        self.start_line_buffers(p, &l, request, &mut m, view);
        // Raw header: the header lines without the final empty line and last terminator.
        let mut rh_end = hend;
        while rh_end > l.next && matches!(p[rh_end - 1], b'\r' | b'\n') {
            rh_end -= 1;
        }
        let raw_header = (l.next, rh_end);
        m.locs[HttpBuffer::RawHeader.index()] = pay(raw_header);
        let cookie_name = if request { "cookie" } else { "set-cookie" };
        // Normalized header: lines without the cookie header, percent-decoded.
        self.tmp.clear();
        if parsed {
            for h in &self.hdrs {
                if !name_is(p, h, cookie_name) {
                    self.tmp
                        .extend_from_slice(&p[h.name.0..h.line_end.min(hend)]);
                }
            }
            while matches!(self.tmp.last(), Some(b'\r' | b'\n')) {
                self.tmp.pop();
            }
        } else {
            self.tmp.extend_from_slice(&p[raw_header.0..raw_header.1]);
        }
        self.tmp2.clear();
        decode_chars(&self.tmp, &mut self.tmp2, &mut self.pct);
        m.locs[HttpBuffer::Header.index()] = if self.tmp2[..] == p[raw_header.0..raw_header.1] {
            pay(raw_header)
        } else {
            put(view, &self.tmp2)
        };
        if parsed {
            self.header_values(p, &mut m, view, cookie_name);
        }
        if framing != Framing::None && !head_only {
            if cut {
                m.truncated |= 1 << HttpBuffer::FileData.index();
            }
            self.body(p, hend, framing, parsed, budget, &mut m, view);
        }
        view.msgs.push(m);
        (hend, framed_end)
    }

    /// Method, targets (requests) or status code and message (responses).
    fn start_line_buffers(
        &mut self,
        p: &[u8],
        l: &StartLine,
        request: bool,
        m: &mut Message,
        view: &mut HttpView,
    ) {
        let pay = |r: (usize, usize)| Loc::Payload(r.0 as u32, r.1 as u32);
        if request {
            m.locs[HttpBuffer::Method.index()] = pay(l.a);
            m.locs[HttpBuffer::RawUri.index()] = pay(l.b);
            let raw = &p[l.b.0..l.b.1];
            self.tmp2.clear();
            self.normalize_uri(raw);
            m.locs[HttpBuffer::Uri.index()] = if self.tmp2[..] == *raw {
                pay(l.b)
            } else {
                put(view, &self.tmp2)
            };
        } else {
            m.locs[HttpBuffer::StatCode.index()] = pay(l.a);
            m.locs[HttpBuffer::StatMsg.index()] = pay(l.b);
        }
    }

    /// Normalizes a request target into `tmp2` (module docs).
    fn normalize_uri(&mut self, raw: &[u8]) {
        let path_start = if raw.first() == Some(&b'/') {
            Some(0)
        } else {
            // Absolute form: scheme "://" authority, then the path.
            let scheme = raw
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || b"+-.".contains(&b)));
            match scheme {
                Some(s)
                    if s > 0 && raw[0].is_ascii_alphabetic() && raw[s..].starts_with(b"://") =>
                {
                    let auth = s + 3;
                    Some(
                        raw[auth..]
                            .iter()
                            .position(|b| b"/?#".contains(b))
                            .map_or(raw.len(), |i| auth + i),
                    )
                }
                _ => None,
            }
        };
        let Some(ps) = path_start else {
            self.tmp2.extend_from_slice(raw);
            return;
        };
        let rest = &raw[ps..];
        let split = rest
            .iter()
            .position(|b| b"?#".contains(b))
            .unwrap_or(rest.len());
        let (path, tail) = rest.split_at(split);
        self.tmp3.clear();
        if path.first() != Some(&b'/') {
            self.tmp3.push(b'/');
        }
        decode_chars(path, &mut self.tmp3, &mut self.pct);
        substitute(&mut self.tmp3);
        simplify_path(&self.tmp3, &mut self.tmp2, &mut self.segs);
        let t = self.tmp2.len();
        decode_chars(tail, &mut self.tmp2, &mut self.pct);
        substitute(&mut self.tmp2[t..]);
    }

    /// Parses the header lines `[block.0, block.1)` (ending with the empty line) with httparse
    /// into `hdrs`; false when it refuses them.
    fn parse_headers(&mut self, p: &[u8], block: (usize, usize), request: bool) -> bool {
        self.hdrs.clear();
        let prefix: &[u8] = if request {
            b"GET / HTTP/1.1\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\n"
        };
        self.head.clear();
        self.head.extend_from_slice(prefix);
        self.head.extend_from_slice(&p[block.0..block.1]);
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut cfg = httparse::ParserConfig::default();
        cfg.ignore_invalid_headers_in_requests(true)
            .ignore_invalid_headers_in_responses(true)
            .allow_obsolete_multiline_headers_in_responses(true)
            .allow_spaces_after_header_name_in_responses(true);
        let headers: &[httparse::Header<'_>] = if request {
            let mut r = httparse::Request::new(&mut storage);
            match cfg.parse_request(&mut r, &self.head) {
                Ok(httparse::Status::Complete(_)) => r.headers,
                _ => return false,
            }
        } else {
            let mut r = httparse::Response::new(&mut storage);
            match cfg.parse_response(&mut r, &self.head) {
                Ok(httparse::Status::Complete(_)) => r.headers,
                _ => return false,
            }
        };
        // Offsets in the synthetic head map back to the payload.
        let base = self.head.as_ptr() as usize + prefix.len();
        let off = |s: &[u8]| -> Option<usize> {
            let o = (s.as_ptr() as usize).checked_sub(base)?;
            (o + s.len() <= block.1 - block.0).then_some(block.0 + o)
        };
        for h in headers {
            let (Some(n), Some(v)) = (off(h.name.as_bytes()), off(h.value)) else {
                continue;
            };
            let vend = v + h.value.len();
            let line_end =
                memchr::memchr(b'\n', &p[vend..block.1]).map_or(block.1, |i| vend + i + 1);
            self.hdrs.push(Hdr {
                name: (n, n + h.name.len()),
                value: (v, vend),
                line_end,
            });
        }
        true
    }

    fn values<'a>(&'a self, p: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.hdrs
            .iter()
            .filter(move |h| name_is(p, h, name))
            .map(move |h| &p[h.value.0..h.value.1])
    }

    /// The content coding of the parsed head (`hdrs`).
    fn coding(&self, p: &[u8]) -> Coding {
        match self.values(p, "content-encoding").last().map(trim) {
            Some(v) if v.eq_ignore_ascii_case(b"gzip") || v.eq_ignore_ascii_case(b"x-gzip") => {
                Coding::Gzip
            }
            Some(v) if v.eq_ignore_ascii_case(b"deflate") => Coding::Deflate,
            _ => Coding::Identity,
        }
    }

    fn framing(&self, p: &[u8], request: bool, status: Option<u16>) -> Framing {
        if let Some(c) = status {
            if c < 200 || c == 204 || c == 304 {
                return Framing::None;
            }
        }
        if let Some(te) = self.values(p, "transfer-encoding").last() {
            let last = te.rsplit(|&b| b == b',').next().map_or(&[][..], trim);
            return if last.eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked
            } else {
                Framing::Rest
            };
        }
        let mut len: Option<u64> = None;
        for v in self.values(p, "content-length") {
            for item in v.split(|&b| b == b',') {
                let item = trim(item);
                let n = core::str::from_utf8(item)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok());
                match (n, len) {
                    (Some(n), None) => len = Some(n),
                    (Some(n), Some(l)) if n == l => {}
                    _ => return Framing::Rest,
                }
            }
        }
        match len {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None if request => Framing::None,
            None => Framing::Rest,
        }
    }

    /// De-chunks the body starting at `from` into `chunks`, walking at most `limit` bytes:
    /// (where the body ends, bytes walked, cut at the limit).
    fn dechunk(&mut self, p: &[u8], from: usize, limit: usize) -> (usize, usize, bool) {
        let cut = from.saturating_add(limit) < p.len();
        let p = &p[..p.len().min(from.saturating_add(limit))];
        let end = self.dechunk_all(p, from);
        (end, end - from, cut && end == p.len())
    }

    fn dechunk_all(&mut self, p: &[u8], from: usize) -> usize {
        self.chunks.clear();
        let mut i = from;
        loop {
            let Ok(httparse::Status::Complete((used, size))) = httparse::parse_chunk_size(&p[i..])
            else {
                // Partial size line: the body goes on past the payload; malformed: it ends.
                return if httparse::parse_chunk_size(&p[i..]).is_ok() {
                    p.len()
                } else {
                    i
                };
            };
            i += used;
            if size == 0 {
                // Trailers up to the empty line.
                return head_end(p, i).unwrap_or(p.len());
            }
            let avail = p.len() - i;
            let take = usize::try_from(size).map_or(avail, |s| s.min(avail));
            self.chunks.extend_from_slice(&p[i..i + take]);
            i += take;
            if (take as u64) < size {
                return p.len();
            }
            match p.get(i..) {
                Some([b'\r', b'\n', ..]) => i += 2,
                Some([b'\n', ..]) => i += 1,
                Some([]) | Some([b'\r']) | None => return p.len(),
                Some(_) => return i,
            }
        }
    }

    fn header_values(&mut self, p: &[u8], m: &mut Message, view: &mut HttpView, cookie: &str) {
        let pay = |r: (usize, usize)| Loc::Payload(r.0 as u32, r.1 as u32);
        // Cookie values: one is a payload slice, several are joined.
        let mut first: Option<(usize, usize)> = None;
        let mut count = 0;
        self.tmp.clear();
        for h in self.hdrs.iter().filter(|h| name_is(p, h, cookie)) {
            if count > 0 {
                self.tmp.extend_from_slice(b", ");
            }
            self.tmp.extend_from_slice(&p[h.value.0..h.value.1]);
            first.get_or_insert(h.value);
            count += 1;
        }
        if let Some(f) = first {
            let raw_loc = if count == 1 {
                pay(f)
            } else {
                put(view, &self.tmp)
            };
            m.locs[HttpBuffer::RawCookie.index()] = raw_loc;
            self.tmp2.clear();
            decode_chars(&self.tmp, &mut self.tmp2, &mut self.pct);
            m.locs[HttpBuffer::Cookie.index()] = if self.tmp2 == self.tmp {
                raw_loc
            } else {
                put(view, &self.tmp2)
            };
        }
        if let Some(h) = self.hdrs.iter().find(|h| name_is(p, h, "host")) {
            let v = &p[h.value.0..h.value.1];
            m.locs[HttpBuffer::Host.index()] = if v.iter().any(u8::is_ascii_uppercase) {
                let start = view.arena.len();
                view.arena.extend(v.iter().map(u8::to_ascii_lowercase));
                Loc::Arena(start as u32, view.arena.len() as u32)
            } else {
                pay(h.value)
            };
        }
        if let Some(h) = self.hdrs.iter().find(|h| name_is(p, h, "user-agent")) {
            m.locs[HttpBuffer::UserAgent.index()] = pay(h.value);
        }
    }

    /// `file_data` and `http_client_body` of a body starting at `from` (ending at `m.end`).
    #[allow(clippy::too_many_arguments)]
    fn body(
        &mut self,
        p: &[u8],
        from: usize,
        framing: Framing,
        parsed: bool,
        budget: &mut Budget,
        m: &mut Message,
        view: &mut HttpView,
    ) {
        if m.end <= from {
            return;
        }
        let coding = if parsed {
            self.coding(p)
        } else {
            Coding::Identity
        };
        let chunked = framing == Framing::Chunked;
        let fd = HttpBuffer::FileData.index();
        let loc = match (coding, chunked) {
            (Coding::Identity, false) => Loc::Payload(from as u32, m.end as u32),
            (Coding::Identity, true) => put(view, &self.chunks),
            (c, _) => {
                let input: &[u8] = if chunked {
                    &self.chunks
                } else {
                    &p[from..m.end]
                };
                let fed = input.len().min(budget.body);
                budget.body -= fed;
                let cap = INFLATE_CAP.min(budget.inflate);
                let start = view.arena.len();
                let (n, truncated) =
                    inflate(&mut self.inflater, c, &input[..fed], cap, &mut view.arena);
                budget.inflate -= n;
                if truncated || fed < input.len() {
                    m.truncated |= 1 << fd;
                }
                Loc::Arena(start as u32, (start + n) as u32)
            }
        };
        m.locs[fd] = loc;
        if m.request {
            let cb = HttpBuffer::ClientBody.index();
            let full = view.slice(loc, p).unwrap_or(&[]);
            let body = &full[..full.len().min(budget.body)];
            budget.body -= body.len();
            if body.len() < full.len() {
                m.truncated |= 1 << cb;
            }
            self.tmp2.clear();
            decode_chars(body, &mut self.tmp2, &mut self.pct);
            let same = self.tmp2[..] == *full;
            m.locs[cb] = if same { loc } else { put(view, &self.tmp2) };
            if m.truncated & 1 << fd != 0 {
                m.truncated |= 1 << cb;
            }
        }
    }
}

/// What one payload may still cost: inflated bytes, and body bytes walked.
struct Budget {
    inflate: usize,
    body: usize,
}

/// Appends `bytes` to the arena.
fn put(view: &mut HttpView, bytes: &[u8]) -> Loc {
    let start = view.arena.len();
    view.arena.extend_from_slice(bytes);
    Loc::Arena(start as u32, view.arena.len() as u32)
}

/// Inflates `input` (gzip, or zlib/raw deflate) appending at most `cap` bytes to `out`:
/// (bytes written, cut at the cap with more output pending).
fn inflate(
    d: &mut DecompressorOxide,
    coding: Coding,
    input: &[u8],
    cap: usize,
    out: &mut Vec<u8>,
) -> (usize, bool) {
    let (data, zlib) = match coding {
        Coding::Gzip => match gzip_header(input) {
            Some(i) => (&input[i..], false),
            None => return (0, false),
        },
        _ => (input, is_zlib(input)),
    };
    let start = out.len();
    out.resize(start + cap, 0);
    d.init();
    let mut flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT
        | inflate_flags::TINFL_FLAG_IGNORE_ADLER32;
    if zlib {
        flags |= inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER;
    }
    let (mut inp, mut pos) = (0, 0);
    let mut truncated = false;
    loop {
        let (status, used, written) = decompress(d, &data[inp..], &mut out[start..], pos, flags);
        inp += used;
        pos += written;
        match status {
            TINFLStatus::HasMoreOutput => {
                truncated = pos >= cap;
                if truncated || (used == 0 && written == 0) {
                    break;
                }
            }
            _ => break,
        }
    }
    out.truncate(start + pos);
    (pos, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    fn parse(p: &[u8]) -> HttpView {
        let mut view = HttpView::default();
        HttpParser::new().parse(p, 0, &mut view);
        view
    }

    fn buf(p: &[u8], b: HttpBuffer) -> Option<Vec<u8>> {
        let v = parse(p);
        let m = v.messages().first()?;
        v.buffer(m, b, p).map(<[u8]>::to_vec)
    }

    fn uri(target: &str) -> String {
        let req = alloc::format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(buf(req.as_bytes(), HttpBuffer::Uri).unwrap()).unwrap()
    }

    #[test]
    fn uri_normalization() {
        assert_eq!(uri("/index.html"), "/index.html");
        assert_eq!(uri("/a/%2e%2e%2fb"), "/b");
        assert_eq!(uri("/a/b/%2e%2e%2f%2e%2e%2fetc/passwd"), "/etc/passwd");
        assert_eq!(uri("/x/..%5c..%5cetc"), "/../etc");
        assert_eq!(uri("/../../etc/passwd"), "/../../etc/passwd");
        assert_eq!(uri("/a/./b//c///d"), "/a/b/c/d");
        assert_eq!(uri("/a/b/.."), "/a/");
        assert_eq!(uri("/a/."), "/a/");
        assert_eq!(uri("/.."), "/../");
        assert_eq!(uri("/a\\b\\..\\c"), "/a/c");
        assert_eq!(uri("/%63%68%6F%63"), "/choc");
        assert_eq!(uri("/p?q=a+b&r=%41/../x"), "/p?q=a b&r=A/../x");
        assert_eq!(uri("/a%252e%252e/b"), "/a../b");
        assert_eq!(uri("/a/%252e%252e/b"), "/b");
        assert_eq!(uri("/%c0%af"), "/");
        assert_eq!(uri("/x%c0%afy"), "/x/y");
        assert_eq!(uri("/100%"), "/100%");
        assert_eq!(uri("/a%%41"), "/aA");
        assert_eq!(uri("http://Example.com:8080/a/../b?c"), "/b?c");
        assert_eq!(uri("http://example.com"), "/");
        assert_eq!(uri("*"), "*");
        assert_eq!(uri("example.com:443"), "example.com:443");
        // The raw URI is as sent.
        let r = b"GET /a/%2e%2e/b HTTP/1.1\r\n\r\n";
        assert_eq!(buf(r, HttpBuffer::RawUri).unwrap(), b"/a/%2e%2e/b");
    }

    #[test]
    fn request_line_is_lenient() {
        let r = b"GET /a b\xff HTTP/1.1\r\n\r\n";
        assert_eq!(buf(r, HttpBuffer::RawUri).unwrap(), b"/a b\xff");
        let r = b"POST  /x   http/1.0\n\n";
        assert_eq!(buf(r, HttpBuffer::Method).unwrap(), b"POST");
        assert_eq!(buf(r, HttpBuffer::RawUri).unwrap(), b"/x");
        assert!(parse(b"GET /x\r\n\r\n").messages().is_empty());
        assert!(parse(b"hello world\r\n").messages().is_empty());
        assert!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            .messages()
            .is_empty());
    }

    const REQ: &[u8] = b"POST /upload?id=7 HTTP/1.1\r\n\
        Host: WWW.Example.com:8080\r\n\
        User-Agent: evil/1.0\r\n\
        Cookie: sess=%41B\r\n\
        X-Path: /a%2fb\r\n\
        Content-Length: 9\r\n\
        \r\n\
        a=%27x%27";

    #[test]
    fn request_buffers() {
        let v = parse(REQ);
        assert_eq!(v.messages().len(), 1);
        let m = &v.messages()[0];
        assert!(m.request && m.head_complete);
        assert_eq!(m.end, REQ.len());
        let b = |x| v.buffer(m, x, REQ).map(<[u8]>::to_vec);
        assert_eq!(b(HttpBuffer::Method).unwrap(), b"POST");
        assert_eq!(b(HttpBuffer::Host).unwrap(), b"www.example.com:8080");
        assert_eq!(b(HttpBuffer::UserAgent).unwrap(), b"evil/1.0");
        assert_eq!(b(HttpBuffer::RawCookie).unwrap(), b"sess=%41B");
        assert_eq!(b(HttpBuffer::Cookie).unwrap(), b"sess=AB");
        assert_eq!(
            b(HttpBuffer::Header).unwrap(),
            &b"Host: WWW.Example.com:8080\r\nUser-Agent: evil/1.0\r\nX-Path: /a/b\r\nContent-Length: 9"[..]
        );
        let raw = b(HttpBuffer::RawHeader).unwrap();
        assert!(raw.starts_with(b"Host:") && raw.ends_with(b"Content-Length: 9"));
        assert!(raw.windows(6).any(|w| w == b"Cookie"));
        assert_eq!(b(HttpBuffer::FileData).unwrap(), b"a=%27x%27");
        assert_eq!(b(HttpBuffer::ClientBody).unwrap(), b"a='x'");
        assert!(b(HttpBuffer::StatCode).is_none());
        let meta = v.meta(m, REQ);
        assert_eq!(meta.hostname, Some(&b"www.example.com"[..]));
        assert_eq!(meta.url, Some(&b"/upload?id=7"[..]));
    }

    #[test]
    fn get_has_no_body_and_pipelines() {
        let p = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\n\r\n";
        let v = parse(p);
        assert_eq!(v.messages().len(), 2);
        assert!(v
            .buffer(&v.messages()[0], HttpBuffer::FileData, p)
            .is_none());
        assert_eq!(
            v.buffer(&v.messages()[1], HttpBuffer::Uri, p).unwrap(),
            b"/two"
        );
        // Only messages ending after min_end are kept.
        let mut view = HttpView::default();
        HttpParser::new().parse(p, 30, &mut view);
        assert_eq!(view.messages().len(), 1);
        assert_eq!(view.messages()[0].start, 30);
    }

    #[test]
    fn partial_head_gives_start_line_only() {
        let p = b"GET /adm%69n HTTP/1.1\r\nHost: a\r\nUser-Ag";
        let v = parse(p);
        let m = &v.messages()[0];
        assert!(!m.head_complete);
        assert_eq!(v.buffer(m, HttpBuffer::Uri, p).unwrap(), b"/admin");
        assert!(v.buffer(m, HttpBuffer::Header, p).is_none());
        assert!(v.buffer(m, HttpBuffer::Host, p).is_none());
    }

    #[test]
    fn response_chunked() {
        let p = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=b\r\n\r\n\
                  4;ext=1\r\nMARK\r\n5\r\nER-12\r\n0\r\nTrailer: x\r\n\r\nHTTP/1.1 404 Not Found\r\n\r\n";
        let v = parse(p);
        assert_eq!(v.messages().len(), 2);
        let m = &v.messages()[0];
        assert_eq!(m.status, Some(200));
        assert_eq!(v.buffer(m, HttpBuffer::FileData, p).unwrap(), b"MARKER-12");
        assert_eq!(v.buffer(m, HttpBuffer::StatCode, p).unwrap(), b"200");
        assert_eq!(v.buffer(m, HttpBuffer::StatMsg, p).unwrap(), b"OK");
        assert_eq!(v.buffer(m, HttpBuffer::Cookie, p).unwrap(), b"a=b");
        assert!(v.buffer(m, HttpBuffer::ClientBody, p).is_none());
        let m2 = &v.messages()[1];
        assert_eq!(m2.start, m.end);
        assert_eq!(v.buffer(m2, HttpBuffer::StatMsg, p).unwrap(), b"Not Found");
        // A chunk cut by the end of the payload: what is there.
        let p = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n10\r\nMARK";
        assert_eq!(buf(p, HttpBuffer::FileData).unwrap(), b"MARK");
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 8, 0, 0, 0, 0, 0, 3];
        out.extend_from_slice(b"name.txt\0");
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 6));
        out.extend_from_slice(&[0; 8]);
        out
    }

    #[test]
    fn response_gzip_and_deflate() {
        let mut text = Vec::new();
        for i in 0..2000 {
            text.extend_from_slice(alloc::format!("line {i} ").as_bytes());
        }
        text.extend_from_slice(b"SECRET-MARKER");
        let z = gzip(&text);
        let mut p = alloc::format!(
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
            z.len()
        )
        .into_bytes();
        p.extend_from_slice(&z);
        assert_eq!(buf(&p, HttpBuffer::FileData).unwrap(), text);
        // Chunked and zlib-wrapped deflate.
        let z = miniz_oxide::deflate::compress_to_vec_zlib(b"inflated MARKER", 6);
        let mut p =
            b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        p.extend_from_slice(alloc::format!("{:x}\r\n", 3).as_bytes());
        p.extend_from_slice(&z[..3]);
        p.extend_from_slice(alloc::format!("\r\n{:x}\r\n", z.len() - 3).as_bytes());
        p.extend_from_slice(&z[3..]);
        p.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(buf(&p, HttpBuffer::FileData).unwrap(), b"inflated MARKER");
        // Raw deflate labelled deflate.
        let z = miniz_oxide::deflate::compress_to_vec(b"raw MARKER", 6);
        let mut p = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\n\r\n".to_vec();
        p.extend_from_slice(&z);
        assert_eq!(buf(&p, HttpBuffer::FileData).unwrap(), b"raw MARKER");
    }

    #[test]
    fn decompression_bomb_is_capped_and_marked() {
        let zeros = vec![b'A'; 4 * 1024 * 1024];
        let z = gzip(&zeros);
        assert!(z.len() < 16 * 1024);
        let mut p = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
        p.extend_from_slice(&z);
        let v = parse(&p);
        let m = &v.messages()[0];
        let b = v.buffers(m, &p);
        assert_eq!(
            b.http[HttpBuffer::FileData.index()].unwrap().len(),
            INFLATE_CAP
        );
        assert!(b.is_truncated(HttpBuffer::FileData));
        // The per-payload budget bounds several bombs together.
        let one = p.clone();
        let mut many = Vec::new();
        for _ in 0..5 {
            many.extend_from_slice(&one);
        }
        let v = parse(&many);
        let total: usize = v
            .messages()
            .iter()
            .filter_map(|m| v.buffer(m, HttpBuffer::FileData, &many))
            .map(<[u8]>::len)
            .sum();
        assert!(total <= INFLATE_BUDGET, "{total}");
    }

    #[test]
    fn overlapping_bodies_are_bounded() {
        // Each request's body runs to the end and holds the next request: without the body
        // budget, decoding them all would be quadratic.
        let one = b"POST /x HTTP/1.1\r\nContent-Length: 999999\r\n\r\n%41%42\r\n";
        let mut p = Vec::new();
        for _ in 0..200 {
            p.extend_from_slice(one);
        }
        let v = parse(&p);
        assert_eq!(v.messages().len(), 200);
        let walked: usize = v
            .messages()
            .iter()
            .filter_map(|m| v.buffer(m, HttpBuffer::ClientBody, &p))
            .map(<[u8]>::len)
            .sum();
        assert!(walked <= 2 * p.len() + BODY_WORK_SLACK, "{walked}");
        // The first bodies are whole, later ones cut and marked.
        let first = v.buffers(&v.messages()[0], &p);
        assert!(!first.is_truncated(HttpBuffer::ClientBody));
        let last = v.buffers(&v.messages()[150], &p);
        assert!(last.is_truncated(HttpBuffer::ClientBody));
        // The same with chunked bodies.
        let one = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n";
        let mut p = Vec::new();
        for _ in 0..200 {
            p.extend_from_slice(one);
        }
        let v = parse(&p);
        assert_eq!(v.messages().len(), 200);
    }

    #[test]
    fn truncated_gzip_gives_what_is_there() {
        let text = b"0123456789 the MARKER is early, then much more text follows here".repeat(50);
        let z = gzip(&text);
        let mut p =
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 99999\r\n\r\n".to_vec();
        p.extend_from_slice(&z[..z.len() / 2]);
        let fd = buf(&p, HttpBuffer::FileData).unwrap();
        assert!(!fd.is_empty() && text.starts_with(&fd));
    }

    #[test]
    fn framing_rules() {
        // Conflicting lengths: the body runs to the end.
        let p = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcdefgh";
        assert_eq!(buf(p, HttpBuffer::FileData).unwrap(), b"abcdefgh");
        // A 304 has no body; the next line start is searched.
        let p = b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let v = parse(p);
        assert_eq!(v.messages().len(), 2);
        assert!(v
            .buffer(&v.messages()[0], HttpBuffer::FileData, p)
            .is_none());
        assert_eq!(
            v.buffer(&v.messages()[1], HttpBuffer::FileData, p).unwrap(),
            b"ok"
        );
        // A body line that looks like a request is a message too (bodies never hide one).
        let p =
            b"POST /a HTTP/1.1\r\nContent-Length: 40\r\n\r\nx\r\nGET /hidden HTTP/1.1\r\n\r\n....";
        let v = parse(p);
        assert_eq!(v.messages().len(), 2);
        assert_eq!(
            v.buffer(&v.messages()[1], HttpBuffer::Uri, p).unwrap(),
            b"/hidden"
        );
    }

    #[test]
    fn header_flood_falls_back_to_raw() {
        let mut p = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 10) {
            p.extend_from_slice(alloc::format!("X-{i}: v\r\n").as_bytes());
        }
        p.extend_from_slice(b"Cookie: c=1\r\n\r\nbody");
        let v = parse(&p);
        let m = &v.messages()[0];
        let h = v.buffer(m, HttpBuffer::Header, &p).unwrap();
        assert!(h.ends_with(b"Cookie: c=1"));
        assert_eq!(v.buffer(m, HttpBuffer::FileData, &p).unwrap(), b"body");
    }

    use crate::engine::test_rng::Rng;

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut seeds: Vec<Vec<u8>> = vec![REQ.to_vec()];
        seeds.push(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
                .to_vec(),
        );
        seeds[1].extend_from_slice(b"a\r\n");
        seeds[1].extend_from_slice(&gzip(b"hello hello hello")[..10]);
        seeds[1].extend_from_slice(b"\r\n5\r\n");
        seeds.push(b"GET /%c0%af%%2%252e/../\\x HTTP/1.0\n\n".to_vec());
        let alphabet = b"GET HTTP/1.1 \r\n:%2e./\\0123456789abcdefchunked;,\x00\x1f\x8b\x08\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut parser = HttpParser::new();
        let mut view = HttpView::default();
        for round in 0..20_000 {
            let mut p = seeds[round % seeds.len()].clone();
            for _ in 0..rng.below(8) + 1 {
                match rng.below(4) {
                    0 if !p.is_empty() => {
                        let i = rng.below(p.len());
                        p[i] = alphabet[rng.below(alphabet.len())];
                    }
                    1 => {
                        let i = rng.below(p.len() + 1);
                        p.insert(i, alphabet[rng.below(alphabet.len())]);
                    }
                    2 if !p.is_empty() => {
                        let i = rng.below(p.len());
                        p.truncate(i);
                    }
                    _ => {
                        let i = rng.below(p.len() + 1);
                        let n = rng.below(16);
                        let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                        p.splice(i..i, junk);
                    }
                }
            }
            let min_end = rng.below(p.len() + 1);
            parser.parse(&p, min_end, &mut view);
            for m in view.messages() {
                assert!(m.start <= m.end && m.end <= p.len());
                let b = view.buffers(m, &p);
                for x in b.http.iter().flatten() {
                    assert!(x.len() <= p.len() + INFLATE_CAP + 1);
                }
                let _ = view.meta(m, &p);
            }
        }
    }
}
