//! HTTP/1.x message state across the segments of a tracked TCP flow (see [`super::http`]'s
//! Model for how rules see it).
//!
//! Each direction of each flow the stream tracker accepts bytes for has a [`Half`]: an
//! incremental parser fed with the direction's new bytes, in stream order. It looks for a start
//! line at line starts, accumulates the head up to [`HEAD_MAX`] bytes, then follows the body's
//! framing (`Content-Length`, chunked, or to the connection's end) with a chunk decoder and a
//! gzip/deflate inflater carried from segment to segment, and goes back to looking for a start
//! line after the body (pipelining). Per segment it reports *events* into an [`HttpFrame`]:
//! the message whose start line or head completed in the segment (with its head as known
//! before the segment, for reporting once), and every message whose decoded body grew, with a
//! window of the body: the last [`TAIL_BYTES`] decoded bytes kept from earlier segments, then
//! the new ones.
//!
//! # Bounds
//!
//! A flow's inline state is [`FLOW_STATE_BYTES`] (both directions), one per stream-tracker
//! slot, allocated when the engine is built. On top of that a direction holds, only while it
//! needs them: the head so far or the current message's complete head (at most
//! [`HEAD_MAX`]), the body tail ([`TAIL_BYTES`]) and an inflater ([`INFLATER_BYTES`]: the
//! decompressor and its 32 KiB window). So one flow holds at most `FLOW_STATE_BYTES + 2 *
//! (HEAD_MAX + TAIL_BYTES + INFLATER_BYTES)`, about 100 KiB; all flows' buffers together are
//! capped by [`HttpStateConfig::max_total_bytes`], checked at the end of each segment.
//! A body is inflated to its end, however long: decoding streams through the inflater's
//! window, so a long body costs time, not memory (a cap per message, as Snort's and
//! Suricata's decompression depths, would let a server pad a gzip body past it and hide what
//! follows). What one segment may inflate is bounded: [`FRAME_INFLATE_CAP`], or
//! [`BOMB_RATIO`] times the segment's bytes where that is more (a TSO super-frame), at most
//! [`SEGMENT_INFLATE_MAX`]. A segment that inflates past its bound is a decompression bomb:
//! [`HttpDrop::InflateBomb`] (counted in [`HttpStateStats::inflate_capped`]).
//!
//! A head over [`HEAD_MAX`] (or a line starting like a request or status line that grows past
//! it) is [`HttpDrop::HeadTooLong`]; all buffers over the total is [`HttpDrop::MemoryLimit`].
//! The engine handles both by the stream tracker's limit policy. Nothing here panics on any
//! input.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::http::{self, Coding, Framing, HttpParser, HttpView, Method, StartKind};
use super::stream::FlowId;

/// Largest message head (start line, header lines and the empty line).
pub const HEAD_MAX: usize = 8 * 1024;
/// Decoded body bytes kept from earlier segments as the start of the next body window.
pub const TAIL_BYTES: usize = 1024;
/// Inflated bytes a segment may always produce, all messages together (128 KiB: a full-size
/// segment at a compression ratio of about 88, which text does not reach).
pub const FRAME_INFLATE_CAP: usize = http::INFLATE_BUDGET;
/// Inflated bytes per segment byte a large segment (a TSO super-frame) may produce beyond
/// [`FRAME_INFLATE_CAP`].
pub const BOMB_RATIO: usize = 16;
/// The largest segment Ally inspects (a TSO super-frame: 64 KiB of payload and its headers).
const SEGMENT_MAX: usize = 64 * 1024 + 256;
/// What any one segment may inflate.
pub const SEGMENT_INFLATE_MAX: usize = BOMB_RATIO * SEGMENT_MAX;
/// The deflate window.
const DICT: usize = 32 * 1024;
/// Bytes of a chunk-size line's extension, and of all trailer lines.
const CHUNK_LINE_MAX: u32 = 4096;
/// Heap bytes of one inflater.
pub const INFLATER_BYTES: usize = core::mem::size_of::<DecompressorOxide>() + DICT;
/// Inline bytes of a flow's state (a test checks the real size against it).
pub const FLOW_STATE_BYTES: usize = 384;
/// The per-segment scratch ([`HttpFrame`]) at its largest: heads (the carried one plus the
/// segment's), decoded bytes (tail, segment, inflated output) twice (`file_data` and
/// `http_client_body`), and the normalized header buffers.
pub const FRAME_SCRATCH_BYTES: usize =
    4 * (HEAD_MAX + TAIL_BYTES + SEGMENT_INFLATE_MAX + SEGMENT_MAX);

/// Bounds of the per-flow HTTP state.
#[derive(Clone, Copy, Debug)]
pub struct HttpStateConfig {
    /// Heads, body tails and inflaters of all flows together.
    pub max_total_bytes: usize,
}

impl Default for HttpStateConfig {
    fn default() -> Self {
        HttpStateConfig {
            max_total_bytes: 4 * 1024 * 1024,
        }
    }
}

impl HttpStateConfig {
    /// Worst-case heap bytes with a stream tracker of `max_flows` flows: the inline state of
    /// every slot, the buffers' total and the per-segment scratch.
    pub const fn heap_bound(&self, max_flows: usize) -> usize {
        let slots = if max_flows < 8 { 8 } else { max_flows };
        slots.next_power_of_two() * FLOW_STATE_BYTES + self.max_total_bytes + FRAME_SCRATCH_BYTES
    }
}

/// Why the HTTP state refuses a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpDrop {
    /// A message head longer than [`HEAD_MAX`]: evasion (a sensor that gives up on long heads
    /// would miss what follows).
    HeadTooLong,
    /// The flows' buffers would exceed [`HttpStateConfig::max_total_bytes`].
    MemoryLimit,
    /// A segment inflated past its bound ([`SEGMENT_INFLATE_MAX`]): a decompression bomb,
    /// whose undecoded rest could hide anything.
    InflateBomb,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStateStats {
    /// Message heads completed.
    pub messages: u64,
    /// Segments refused for a head over [`HEAD_MAX`].
    pub head_too_long: u64,
    /// Segments refused at the memory limit.
    pub memory_limit: u64,
    /// Directions no longer parsed after a refusal under a fail-open policy.
    pub untracked: u64,
    /// Segments refused as decompression bombs (inflating past their bound).
    pub inflate_capped: u64,
    /// Chunked bodies ended by a malformed chunk line.
    pub malformed_chunked: u64,
    /// Buffer bytes held now (against `max_total_bytes`).
    pub used_bytes: u64,
}

/// How an event's message looked before the segment (so that a rule matching it is reported
/// only when the segment's bytes make the difference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldView {
    /// Nothing of it was known (its start line completed in this segment).
    None,
    /// The head as far as it was known: message `.0` of [`HttpFrame::old`].
    Head(usize),
    /// The same head and the body window's old part ([`HttpView::old_buffers`]).
    Body,
}

/// One message the segment made progress on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its index in [`HttpFrame::view`].
    pub msg: usize,
    /// How it looked before.
    pub old: OldView,
}

/// What one segment produced: message heads (copies, parsed into `view` and `old`, whose
/// payload is `heads`) and events.
#[derive(Debug, Default)]
pub struct HttpFrame {
    /// The events' message heads, one after the other.
    pub heads: Vec<u8>,
    /// The messages as they are now (body windows attached).
    pub view: HttpView,
    /// Heads as they were before the segment.
    pub old: HttpView,
    /// In stream order.
    pub events: Vec<Event>,
}

impl HttpFrame {
    /// Empties it for the next segment.
    pub fn clear(&mut self) {
        self.heads.clear();
        self.view.clear();
        self.old.clear();
        self.events.clear();
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// At a line start, or inside a line that may be a start line (held in `head`).
    #[default]
    Line,
    /// Inside a line that is not a start line: up to its LF.
    Skip,
    /// Accumulating a head whose start line is complete.
    Head,
    /// Inside a body.
    Body,
    /// Not parsed any more (a tunnel, another protocol, or given up).
    Off,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Body {
    #[default]
    Length0,
    Length(u64),
    Chunked(Chunk),
    Rest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a size line.
    Size {
        val: u64,
        digits: u8,
    },
    /// After the size: extension or whitespace up to the LF.
    Ext {
        val: u64,
        len: u32,
    },
    /// CR seen after the size.
    Lf {
        val: u64,
    },
    /// Chunk data still to come.
    Data(u64),
    /// After the data: CRLF or LF.
    DataEnd,
    DataLf,
    /// Trailer lines up to the empty line: bytes of the current line, all bytes.
    Trailer {
        len: u32,
        total: u32,
    },
}

/// Content decoding of the current body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Dec {
    #[default]
    Identity,
    /// Inside the gzip member header: stage, bytes of it read, flags, bytes left of a field.
    Gzip {
        stage: u8,
        n: u8,
        flags: u8,
        left: u16,
    },
    /// Deflate before its first byte.
    DeflateStart,
    /// Deflate after its first byte (zlib detection needs two).
    DeflateFirst(u8),
    /// Inflating.
    Inflate { zlib: bool },
    /// Decoding ended (stream end, error, cap): the rest of the body is not decoded.
    Stop,
}

/// gzip header stages (RFC 1952): fixed part, FEXTRA length (2 bytes) and data, FNAME,
/// FCOMMENT, FHCRC, then deflate data.
const GZ_FIXED: u8 = 0;
const GZ_XLEN: u8 = 1;
const GZ_EXTRA: u8 = 2;
const GZ_NAME: u8 = 3;
const GZ_COMMENT: u8 = 4;
const GZ_HCRC: u8 = 5;
const GZ_DATA: u8 = 6;

/// The first stage at or after `stage` that the flags ask for.
fn gz_next(stage: u8, flags: u8) -> u8 {
    let mut s = stage;
    loop {
        let wanted = match s {
            // The extra field's bytes follow its length only when FEXTRA is set.
            GZ_XLEN | GZ_EXTRA => flags & 4 != 0,
            GZ_NAME => flags & 8 != 0,
            GZ_COMMENT => flags & 16 != 0,
            GZ_HCRC => flags & 2 != 0,
            _ => true,
        };
        if wanted {
            return s;
        }
        s += 1;
    }
}

/// Inside the gzip extra field with `left` bytes of it to skip; past it at 0.
fn gz_extra(left: u16, flags: u8) -> Dec {
    Dec::Gzip {
        stage: if left == 0 {
            gz_next(GZ_NAME, flags)
        } else {
            GZ_EXTRA
        },
        n: 0,
        flags,
        left,
    }
}

struct Inflater {
    d: Box<DecompressorOxide>,
    dict: Vec<u8>,
    pos: usize,
}

impl core::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Inflater at {}", self.pos)
    }
}

/// Requests of one direction awaiting their responses on the other: 2 bits each (0 other,
/// 1 HEAD, 2 CONNECT), oldest lowest; only the first 32 are remembered (later ones count).
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    bits: u64,
    n: u16,
}

impl Pending {
    fn push(&mut self, m: Method) {
        let v = match m {
            Method::Head => 1,
            Method::Connect => 2,
            Method::Other => 0,
        };
        if self.n < 32 {
            self.bits |= v << (2 * self.n);
        }
        self.n = self.n.saturating_add(1);
    }

    fn pop(&mut self) -> Method {
        if self.n == 0 {
            return Method::Other;
        }
        let v = self.bits & 3;
        self.bits >>= 2;
        self.n -= 1;
        match v {
            1 => Method::Head,
            2 => Method::Connect,
            _ => Method::Other,
        }
    }
}

/// One direction's parser state.
#[derive(Debug, Default)]
struct Half {
    phase: Phase,
    /// Line phase: the candidate start line so far; Head: the head so far; Body: the complete
    /// head of the current message.
    head: Vec<u8>,
    /// Head phase: where the last incomplete line of `head` starts.
    scan: u32,
    /// Last decoded body bytes of the current message (at most [`TAIL_BYTES`]).
    tail: Vec<u8>,
    /// Decoded body bytes of the current message so far.
    decoded: u64,
    body: Body,
    dec: Dec,
    inflater: Option<Inflater>,
    /// Requests sent this way.
    sent: Pending,
    /// A message was seen this way.
    seen_http: bool,
    /// Bytes of buffers charged against the total.
    charged: usize,
}

/// A flow's state.
#[derive(Debug, Default)]
struct FlowState {
    /// The tracker's serial of the flow this state belongs to (0: none).
    serial: u64,
    half: [Half; 2],
}

/// The per-flow HTTP state of the stream tracker's flows.
#[derive(Debug)]
pub struct HttpFlows {
    cfg: HttpStateConfig,
    slots: Vec<FlowState>,
    used: usize,
    stats: HttpStateStats,
}

/// What one segment's walk shares.
struct Ctx<'a> {
    parser: &'a mut HttpParser,
    out: &'a mut HttpFrame,
    stats: &'a mut HttpStateStats,
    /// Inflated bytes in this segment.
    inflated: usize,
    /// What this segment may inflate.
    inflate_budget: usize,
    /// The segment inflated past its budget.
    bomb: bool,
    /// The open body window: (event message index, arena start, old bytes, cut).
    win: Option<(usize, usize, usize, bool)>,
}

/// Known method names (with their space): a line starting with one is taken for a request
/// line when it grows past [`HEAD_MAX`] before its LF.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Whether `h` (the start of a line) may still be a request or status line.
fn could_start(h: &[u8]) -> bool {
    let n = h.len().min(5);
    if h[..n].eq_ignore_ascii_case(&b"HTTP/"[..n]) {
        return true;
    }
    let m = h
        .iter()
        .take(33)
        .position(|&b| !http::is_tchar(b))
        .unwrap_or(h.len().min(33));
    if m == h.len() {
        return m <= 32;
    }
    (1..=32).contains(&m) && h[m] == b' '
}

/// Whether a line starting with `h` that has no LF within [`HEAD_MAX`] is an over-long start
/// line (rather than some other protocol's long line).
fn looks_like_start(h: &[u8], seen_http: bool) -> bool {
    seen_http
        || h.get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"HTTP/"))
        || METHODS.iter().any(|m| h.starts_with(m))
}

/// Grows `v` so that `add` more bytes fit, doubling up to `max` (capacity stays within `max`
/// when the contents do).
fn grow(v: &mut Vec<u8>, add: usize, max: usize) {
    let need = v.len().saturating_add(add);
    if need <= v.capacity() {
        return;
    }
    let cap = need
        .max(v.capacity().saturating_mul(2).min(max))
        .max(256.min(max));
    v.reserve_exact(cap - v.len());
}

impl HttpFlows {
    /// State for a tracker of `max_flows` flows (its slot count).
    pub fn new(max_flows: usize, cfg: HttpStateConfig) -> HttpFlows {
        let n = max_flows.max(8).next_power_of_two();
        HttpFlows {
            cfg,
            slots: (0..n).map(|_| FlowState::default()).collect(),
            used: 0,
            stats: HttpStateStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> HttpStateStats {
        HttpStateStats {
            used_bytes: self.used as u64,
            ..self.stats
        }
    }

    /// Frees the state of `flow` (blocked, or refused).
    pub fn forget(&mut self, flow: FlowId) {
        if let Some(s) = self.slots.get_mut(flow.slot()) {
            if s.serial == flow.serial() {
                for h in &mut s.half {
                    self.used -= h.charged;
                    *h = Half::default();
                }
                s.serial = 0;
            }
        }
    }

    /// Whether one direction of `flow` is parsed: fed, and neither given up nor past the end
    /// of HTTP (a tunnel after CONNECT, a protocol switch).
    pub fn parses(&self, flow: FlowId, to_server: bool) -> bool {
        self.slots.get(flow.slot()).is_some_and(|s| {
            s.serial == flow.serial() && s.half[usize::from(!to_server)].phase != Phase::Off
        })
    }

    /// Stops parsing one direction of `flow` (fail-open refusal): its buffers are freed.
    pub fn give_up(&mut self, flow: FlowId, to_server: bool) {
        if let Some(s) = self.slots.get_mut(flow.slot()) {
            if s.serial == flow.serial() {
                let h = &mut s.half[usize::from(!to_server)];
                self.used -= h.charged;
                *h = Half {
                    phase: Phase::Off,
                    ..Half::default()
                };
                self.stats.untracked += 1;
            }
        }
    }

    /// Frees the state of every flow `live` says is gone.
    pub fn sweep(&mut self, mut live: impl FnMut(usize, u64) -> bool) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.serial != 0 && !live(i, s.serial) {
                for h in &mut s.half {
                    self.used -= h.charged;
                    *h = Half::default();
                }
                s.serial = 0;
            }
        }
    }

    /// Feeds `data`, the new bytes of an accepted segment of `flow` (`to_server`: from the
    /// client), reporting events into `out` (which the caller cleared). On an error the
    /// caller drops the segment and blocks the flow, or gives the direction up.
    pub fn feed(
        &mut self,
        flow: FlowId,
        to_server: bool,
        data: &[u8],
        parser: &mut HttpParser,
        out: &mut HttpFrame,
    ) -> Result<(), HttpDrop> {
        let Some(s) = self.slots.get_mut(flow.slot()) else {
            return Ok(());
        };
        if s.serial != flow.serial() {
            // A new flow in this slot: the old one's state goes.
            for h in &mut s.half {
                self.used -= h.charged;
                *h = Half::default();
            }
            s.serial = flow.serial();
        }
        let d = usize::from(!to_server);
        let [a, b] = &mut s.half;
        let (me, peer) = if d == 0 { (a, b) } else { (b, a) };
        let mut cx = Ctx {
            parser,
            out,
            stats: &mut self.stats,
            inflated: 0,
            inflate_budget: FRAME_INFLATE_CAP
                .max(BOMB_RATIO.saturating_mul(data.len()))
                .min(SEGMENT_INFLATE_MAX),
            bomb: false,
            win: None,
        };
        let r = me.feed(&mut peer.sent, data, &mut cx);
        let r = r.and_then(|()| me.finish(&mut cx));
        // A bomb, once the walk has ended well otherwise.
        let r = match r {
            Ok(()) if cx.bomb => Err(HttpDrop::InflateBomb),
            r => r,
        };
        // Charge what the direction keeps.
        let keep = me.head.capacity()
            + me.tail.capacity()
            + me.inflater.as_ref().map_or(0, |_| INFLATER_BYTES);
        self.used = self.used - me.charged + keep;
        me.charged = keep;
        r?;
        if self.used > self.cfg.max_total_bytes {
            self.stats.memory_limit += 1;
            return Err(HttpDrop::MemoryLimit);
        }
        Ok(())
    }
}

impl Half {
    /// Walks `data`. `peer_sent`: the other direction's pending requests (this one's
    /// responses answer them).
    fn feed(
        &mut self,
        peer_sent: &mut Pending,
        data: &[u8],
        cx: &mut Ctx<'_>,
    ) -> Result<(), HttpDrop> {
        // Head bytes known before this segment (of a message whose start line is complete).
        let mut head_old = if self.phase == Phase::Head {
            self.head.len()
        } else {
            0
        };
        let mut i = 0;
        while i < data.len() {
            match self.phase {
                Phase::Off => return Ok(()),
                Phase::Skip => match memchr::memchr(b'\n', &data[i..]) {
                    Some(k) => {
                        i += k + 1;
                        self.phase = Phase::Line;
                    }
                    None => i = data.len(),
                },
                Phase::Line => {
                    let rest = &data[i..];
                    let lf = memchr::memchr(b'\n', rest);
                    let k = lf.map_or(rest.len(), |k| k + 1);
                    if self.head.len() + k > HEAD_MAX {
                        let mut h = self.head.clone();
                        h.extend_from_slice(&rest[..k.min(16)]);
                        if could_start(&h) && looks_like_start(&h, self.seen_http) {
                            cx.stats.head_too_long += 1;
                            return Err(HttpDrop::HeadTooLong);
                        }
                        self.head = Vec::new();
                        self.phase = if lf.is_some() {
                            Phase::Line
                        } else {
                            Phase::Skip
                        };
                        i += k;
                        continue;
                    }
                    grow(&mut self.head, k, HEAD_MAX);
                    self.head.extend_from_slice(&rest[..k]);
                    i += k;
                    if !could_start(&self.head) {
                        self.head.clear();
                        if lf.is_none() {
                            self.phase = Phase::Skip;
                        }
                        continue;
                    }
                    if lf.is_none() {
                        continue;
                    }
                    if http::start_line(&self.head).is_none() {
                        self.head.clear();
                        continue;
                    }
                    // A start line: its head follows (known before: nothing, since the line
                    // completed now).
                    head_old = 0;
                    self.phase = Phase::Head;
                    self.scan = self.head.len() as u32;
                    self.seen_http = true;
                }
                Phase::Head => {
                    let before = self.head.len();
                    let n = (data.len() - i).min(HEAD_MAX - before);
                    grow(&mut self.head, n, HEAD_MAX);
                    self.head.extend_from_slice(&data[i..i + n]);
                    match http::head_end(&self.head, self.scan as usize) {
                        Some(e) => {
                            self.head.truncate(e);
                            i += e - before;
                            self.head_complete(peer_sent, head_old, cx);
                            head_old = 0;
                        }
                        None => {
                            i += n;
                            let from = self.scan as usize;
                            if let Some(k) = memchr::memrchr(b'\n', &self.head[from..]) {
                                self.scan = (from + k + 1) as u32;
                            }
                            if i < data.len() {
                                cx.stats.head_too_long += 1;
                                return Err(HttpDrop::HeadTooLong);
                            }
                        }
                    }
                }
                Phase::Body => i += self.body(&data[i..], cx)?,
            }
        }
        // A start line completed here but not its head: its start-line buffers.
        if self.phase == Phase::Head && head_old == 0 && !self.head.is_empty() {
            let base = cx.out.heads.len();
            cx.out.heads.extend_from_slice(&self.head);
            if let Some(k) = cx
                .parser
                .parse_head_at(&cx.out.heads, base, &mut cx.out.view)
            {
                cx.out.events.push(Event {
                    msg: k,
                    old: OldView::None,
                });
            }
        }
        Ok(())
    }

    /// The head in `head` is complete: report it and set up its body.
    fn head_complete(&mut self, peer_sent: &mut Pending, head_old: usize, cx: &mut Ctx<'_>) {
        cx.stats.messages += 1;
        let base = cx.out.heads.len();
        cx.out.heads.extend_from_slice(&self.head);
        let kind = http::start_line(&self.head[..=memchr::memchr(b'\n', &self.head).unwrap_or(0)]);
        let Some(k) = cx
            .parser
            .parse_head_at(&cx.out.heads, base, &mut cx.out.view)
        else {
            self.end_message();
            return;
        };
        // The head as it was known: the start line at least (else nothing).
        let old = if head_old > 0 {
            let p = &cx.out.heads[..base + head_old];
            match cx.parser.parse_head_at(p, base, &mut cx.out.old) {
                Some(j) => OldView::Head(j),
                None => OldView::None,
            }
        } else {
            OldView::None
        };
        cx.out.events.push(Event { msg: k, old });
        let (mut framing, coding) = match cx.out.view.messages().get(k) {
            Some(m) => (m.framing, m.coding),
            None => (Framing::None, Coding::Identity),
        };
        match kind {
            Some(StartKind::Request(m)) => self.sent.push(m),
            Some(StartKind::Response(code)) if code >= 200 => match peer_sent.pop() {
                Method::Head => framing = Framing::None,
                Method::Connect if code < 300 => {
                    self.end_message();
                    self.phase = Phase::Off;
                    return;
                }
                _ => {}
            },
            Some(StartKind::Response(101)) => {
                // Switching protocols: what follows is not HTTP.
                peer_sent.pop();
                self.end_message();
                self.phase = Phase::Off;
                return;
            }
            _ => {}
        }
        self.body = match framing {
            Framing::None => {
                self.end_message();
                return;
            }
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Chunk::Size { val: 0, digits: 0 }),
            Framing::Rest => Body::Rest,
        };
        self.dec = match coding {
            Coding::Identity => Dec::Identity,
            Coding::Gzip => Dec::Gzip {
                stage: GZ_FIXED,
                n: 0,
                flags: 0,
                left: 0,
            },
            Coding::Deflate => Dec::DeflateStart,
        };
        self.decoded = 0;
        self.phase = Phase::Body;
        // The body window starts with this event's message.
        cx.win = Some((k, cx.out.view.arena_len(), 0, false));
    }

    /// The current message ended: back to looking for a start line.
    fn end_message(&mut self) {
        self.head = Vec::new();
        self.tail = Vec::new();
        self.inflater = None;
        self.body = Body::Length0;
        self.dec = Dec::Identity;
        self.decoded = 0;
        self.phase = Phase::Line;
    }

    /// Body bytes at the start of `d`: returns how many were consumed.
    fn body(&mut self, d: &[u8], cx: &mut Ctx<'_>) -> Result<usize, HttpDrop> {
        match self.body {
            Body::Length0 => {
                self.close_window(cx, true);
                self.end_message();
                Ok(0)
            }
            Body::Length(n) => {
                let take = usize::try_from(n).map_or(d.len(), |n| n.min(d.len()));
                self.decode(&d[..take], cx);
                let left = n - take as u64;
                self.body = Body::Length(left);
                if left == 0 {
                    self.close_window(cx, true);
                    self.end_message();
                }
                Ok(take)
            }
            Body::Rest => {
                self.decode(d, cx);
                Ok(d.len())
            }
            Body::Chunked(c) => Ok(self.chunked(c, d, cx)),
        }
    }

    /// Chunked framing from state `c` over `d`: bytes consumed.
    fn chunked(&mut self, mut c: Chunk, d: &[u8], cx: &mut Ctx<'_>) -> usize {
        let mut i = 0;
        while i < d.len() {
            if let Chunk::Data(n) = c {
                let take = usize::try_from(n).map_or(d.len() - i, |n| n.min(d.len() - i));
                self.decode(&d[i..i + take], cx);
                i += take;
                let left = n - take as u64;
                c = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            let b = d[i];
            let next = match c {
                Chunk::Size { val, digits } => match (b as char).to_digit(16) {
                    Some(h) if digits < 16 => Some(Chunk::Size {
                        val: val << 4 | u64::from(h),
                        digits: digits + 1,
                    }),
                    _ if digits == 0 || digits >= 16 => None,
                    _ => match b {
                        b'\r' => Some(Chunk::Lf { val }),
                        b'\n' => Some(chunk_line_done(val)),
                        b';' | b' ' | b'\t' => Some(Chunk::Ext { val, len: 0 }),
                        _ => None,
                    },
                },
                Chunk::Ext { val, len } => match b {
                    b'\n' => Some(chunk_line_done(val)),
                    _ if len >= CHUNK_LINE_MAX => None,
                    _ => Some(Chunk::Ext { val, len: len + 1 }),
                },
                Chunk::Lf { val } => (b == b'\n').then(|| chunk_line_done(val)),
                Chunk::DataEnd => match b {
                    b'\r' => Some(Chunk::DataLf),
                    b'\n' => Some(Chunk::Size { val: 0, digits: 0 }),
                    _ => None,
                },
                Chunk::DataLf => (b == b'\n').then_some(Chunk::Size { val: 0, digits: 0 }),
                Chunk::Trailer { len, total } => {
                    if total >= CHUNK_LINE_MAX {
                        None
                    } else if b == b'\n' && len == 0 {
                        // The empty line: the message ends after it.
                        self.close_window(cx, true);
                        self.end_message();
                        return i + 1;
                    } else {
                        let len = match b {
                            b'\n' => 0,
                            b'\r' => len,
                            _ => len + 1,
                        };
                        Some(Chunk::Trailer {
                            len,
                            total: total + 1,
                        })
                    }
                }
                Chunk::Data(_) => None,
            };
            match next {
                Some(n) => {
                    c = n;
                    i += 1;
                }
                None => {
                    // Malformed: the body ends here. At a line start the line may be the next
                    // message; else the rest of the line is skipped.
                    cx.stats.malformed_chunked += 1;
                    let at_line_start = matches!(c, Chunk::Size { digits: 0, .. });
                    self.close_window(cx, true);
                    self.end_message();
                    if !at_line_start {
                        self.phase = Phase::Skip;
                    }
                    return i;
                }
            }
        }
        self.body = Body::Chunked(c);
        i
    }

    /// Decodes body bytes (after framing).
    fn decode(&mut self, mut d: &[u8], cx: &mut Ctx<'_>) {
        while !d.is_empty() {
            match self.dec {
                Dec::Identity => {
                    self.emit(d, false, cx);
                    return;
                }
                Dec::Stop => return,
                Dec::DeflateStart => {
                    self.dec = Dec::DeflateFirst(d[0]);
                    d = &d[1..];
                }
                Dec::DeflateFirst(b0) => {
                    let zlib = http::is_zlib(&[b0, d[0]]);
                    self.start_inflate(zlib);
                    self.inflate(&[b0], cx);
                }
                Dec::Gzip {
                    stage,
                    n,
                    flags,
                    left,
                } => {
                    let b = d[0];
                    d = &d[1..];
                    self.dec = match stage {
                        GZ_FIXED => {
                            let ok = match n {
                                0 => b == 0x1f,
                                1 => b == 0x8b,
                                2 => b == 8,
                                _ => true,
                            };
                            let flags = if n == 3 { b } else { flags };
                            if !ok {
                                Dec::Stop
                            } else if n == 9 {
                                Dec::Gzip {
                                    stage: gz_next(GZ_XLEN, flags),
                                    n: 0,
                                    flags,
                                    left: 0,
                                }
                            } else {
                                Dec::Gzip {
                                    stage,
                                    n: n + 1,
                                    flags,
                                    left,
                                }
                            }
                        }
                        GZ_XLEN if n == 0 => Dec::Gzip {
                            stage,
                            n: 1,
                            flags,
                            left: u16::from(b),
                        },
                        // The extra field's length, then its bytes (RFC 1952 2.3.1.1).
                        GZ_XLEN => gz_extra(left | u16::from(b) << 8, flags),
                        GZ_EXTRA => gz_extra(left.saturating_sub(1), flags),
                        GZ_NAME | GZ_COMMENT => Dec::Gzip {
                            stage: if b == 0 {
                                gz_next(stage + 1, flags)
                            } else {
                                stage
                            },
                            n: 0,
                            flags,
                            left,
                        },
                        _ if n == 0 => Dec::Gzip {
                            stage,
                            n: 1,
                            flags,
                            left,
                        },
                        _ => Dec::Gzip {
                            stage: GZ_DATA,
                            n: 0,
                            flags,
                            left,
                        },
                    };
                    if let Dec::Gzip { stage: GZ_DATA, .. } = self.dec {
                        self.start_inflate(false);
                    }
                }
                Dec::Inflate { .. } => {
                    self.inflate(d, cx);
                    return;
                }
            }
        }
    }

    fn start_inflate(&mut self, zlib: bool) {
        self.inflater = Some(Inflater {
            d: Box::default(),
            dict: vec![0; DICT],
            pos: 0,
        });
        self.dec = Dec::Inflate { zlib };
    }

    /// Feeds the inflater; its output goes to the window up to the caps.
    fn inflate(&mut self, input: &[u8], cx: &mut Ctx<'_>) {
        let Dec::Inflate { zlib } = self.dec else {
            return;
        };
        let Some(mut inf) = self.inflater.take() else {
            self.dec = Dec::Stop;
            return;
        };
        let mut flags =
            inflate_flags::TINFL_FLAG_HAS_MORE_INPUT | inflate_flags::TINFL_FLAG_IGNORE_ADLER32;
        if zlib {
            flags |= inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER;
        }
        let mut at = 0;
        let mut stop = false;
        loop {
            let (status, used, written) =
                decompress(&mut inf.d, &input[at..], &mut inf.dict, inf.pos, flags);
            at += used;
            let out_end = (inf.pos + written).min(DICT);
            // The segment's bound: past it, a bomb.
            let give = written.min(cx.inflate_budget.saturating_sub(cx.inflated));
            if give > 0 {
                let bytes = &inf.dict[inf.pos..inf.pos + give];
                cx.inflated += give;
                self.emit(bytes, false, cx);
            }
            if give < written {
                cx.stats.inflate_capped += 1;
                cx.bomb = true;
                self.emit(&[], true, cx);
                stop = true;
                break;
            }
            inf.pos = out_end & (DICT - 1);
            match status {
                TINFLStatus::HasMoreOutput => {
                    if used == 0 && written == 0 {
                        stop = true;
                        break;
                    }
                }
                TINFLStatus::NeedsMoreInput => break,
                _ => {
                    stop = true;
                    break;
                }
            }
        }
        if stop {
            self.dec = Dec::Stop;
        } else {
            self.inflater = Some(inf);
        }
    }

    /// Decoded body bytes (`cut`: decoding stopped at a cap): appended to the message's
    /// window, which opens on the first bytes of a segment.
    fn emit(&mut self, bytes: &[u8], cut: bool, cx: &mut Ctx<'_>) {
        if bytes.is_empty() && !cut {
            return;
        }
        if cx.win.is_none() {
            // A body that continues from an earlier segment: its head again, then the tail.
            let base = cx.out.heads.len();
            cx.out.heads.extend_from_slice(&self.head);
            let Some(k) = cx
                .parser
                .parse_head_at(&cx.out.heads, base, &mut cx.out.view)
            else {
                return;
            };
            cx.out.events.push(Event {
                msg: k,
                old: OldView::Body,
            });
            let from = cx.out.view.push_decoded(&self.tail);
            let front_cut = self.decoded > self.tail.len() as u64;
            cx.win = Some((k, from, self.tail.len(), front_cut));
        }
        cx.out.view.push_decoded(bytes);
        self.decoded += bytes.len() as u64;
        if cut {
            if let Some(w) = cx.win.as_mut() {
                w.3 = true;
            }
        }
    }

    /// Attaches the open window to its message; `ended`: the message is over (else its last
    /// bytes become the tail).
    fn close_window(&mut self, cx: &mut Ctx<'_>, ended: bool) {
        let Some((k, from, old, cut)) = cx.win.take() else {
            return;
        };
        if !ended {
            let w = cx.out.view.arena_from(from);
            let keep = &w[w.len().saturating_sub(TAIL_BYTES)..];
            if self.tail.capacity() < TAIL_BYTES {
                self.tail = Vec::with_capacity(TAIL_BYTES);
            }
            self.tail.clear();
            self.tail.extend_from_slice(keep);
        }
        if cx.out.view.arena_len() == from {
            // No body bytes (a head event whose body had none here): no body buffers.
            return;
        }
        cx.out.view.attach_body(k, from, old, cut, cx.parser);
    }

    /// End of the segment.
    fn finish(&mut self, cx: &mut Ctx<'_>) -> Result<(), HttpDrop> {
        let ended = self.phase != Phase::Body;
        self.close_window(cx, ended);
        if self.head.is_empty() && self.head.capacity() > 0 {
            self.head = Vec::new();
        }
        Ok(())
    }
}

fn chunk_line_done(val: u64) -> Chunk {
    if val == 0 {
        Chunk::Trailer { len: 0, total: 0 }
    } else {
        Chunk::Data(val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::HttpBuffer;
    use alloc::vec::Vec;

    /// A gzip member with every optional header field.
    fn gzip(data: &[u8]) -> Vec<u8> {
        gzip_with(data, 0x1e)
    }

    /// A gzip member whose header has the optional fields `flags` names (RFC 1952 2.3.1:
    /// FHCRC 2, FEXTRA 4, FNAME 8, FCOMMENT 16).
    fn gzip_with(data: &[u8], flags: u8) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 3];
        if flags & 4 != 0 {
            out.extend_from_slice(&[4, 0, b'a', b'b', 2, 0]);
        }
        if flags & 8 != 0 {
            out.extend_from_slice(b"name\0");
        }
        if flags & 16 != 0 {
            out.extend_from_slice(b"comment\0");
        }
        if flags & 2 != 0 {
            out.extend_from_slice(&[0x12, 0x34]);
        }
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 6));
        out.extend_from_slice(&[0; 8]);
        out
    }

    use crate::engine::test_rng::Rng;

    /// Feeds `stream` to one direction of a flow in random pieces; returns per message (in
    /// order of their heads) the decoded body bytes that were new in each window, joined.
    fn bodies(stream: &[u8], rng: &mut Rng, max_piece: usize) -> Vec<Vec<u8>> {
        let mut flows = HttpFlows::new(8, HttpStateConfig::default());
        let mut parser = HttpParser::new();
        let mut out = HttpFrame::default();
        let flow = FlowId::for_test(3, 1);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = (rng.below(max_piece) + 1).min(stream.len() - at);
            out.clear();
            flows
                .feed(flow, false, &stream[at..at + n], &mut parser, &mut out)
                .unwrap();
            at += n;
            for e in &out.events {
                let m = &out.view.messages()[e.msg];
                if e.old != OldView::Body && m.head_complete {
                    got.push(Vec::new());
                }
                let b = out.view.buffers(m, &out.heads);
                let Some(fd) = b.http[HttpBuffer::FileData.index()] else {
                    continue;
                };
                let old = match e.old {
                    OldView::Body => out
                        .view
                        .old_buffers(m, &out.heads)
                        .and_then(|o| o.http[HttpBuffer::FileData.index()])
                        .map_or(0, <[u8]>::len),
                    _ => 0,
                };
                got.last_mut().unwrap().extend_from_slice(&fd[old..]);
            }
        }
        assert_eq!(flows.stats().used_bytes, flows.used as u64);
        flows.sweep(|_, _| false);
        assert_eq!(flows.used, 0);
        got
    }

    #[test]
    fn flow_state_fits_its_bound() {
        let n = core::mem::size_of::<FlowState>();
        assert!(n <= FLOW_STATE_BYTES, "a flow's state is {n} bytes");
        // The figures the module doc gives.
        const { assert!(INFLATER_BYTES <= 44 * 1024) };
        let worst = FLOW_STATE_BYTES + 2 * (HEAD_MAX + TAIL_BYTES + INFLATER_BYTES);
        assert!(worst <= 106 * 1024, "{worst}");
        let bound = HttpStateConfig::default().heap_bound(4096);
        assert_eq!(bound, 4096 * 384 + (4 << 20) + FRAME_SCRATCH_BYTES);
        assert!(bound <= 10_040 * 1024, "{bound}");
    }

    #[test]
    fn bodies_decode_the_same_in_any_segmentation() {
        let mut text = Vec::new();
        for i in 0..3000 {
            text.extend_from_slice(alloc::format!("{i} ").as_bytes());
        }
        let zl = miniz_oxide::deflate::compress_to_vec_zlib(&text, 6);
        // Every combination of the optional header fields (FLG 0 is what servers send).
        for flags in (0..32).step_by(2) {
            let z = gzip_with(&text, flags);
            let mut s = alloc::format!(
                "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
                z.len()
            )
            .into_bytes();
            s.extend_from_slice(&z);
            s.extend_from_slice(b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n");
            s.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: deflate\r\n\r\n",
        );
            for c in zl.chunks(333) {
                s.extend_from_slice(alloc::format!("{:X};x=y\r\n", c.len()).as_bytes());
                s.extend_from_slice(c);
                s.extend_from_slice(b"\r\n");
            }
            s.extend_from_slice(b"0\r\nT: 1\r\n\r\nHTTP/1.0 200 OK\r\n\r\nto the end");
            let mut rng = Rng(0x1234_5678);
            for max_piece in [1, 3, 50, 700, 5000] {
                let got = bodies(&s, &mut rng, max_piece);
                assert_eq!(got.len(), 4, "FLG {flags}, pieces of up to {max_piece}");
                assert_eq!(got[0], text, "FLG {flags}, pieces of up to {max_piece}");
                assert!(got[1].is_empty());
                assert_eq!(got[2], text);
                assert_eq!(got[3], b"to the end");
            }
        }
    }

    #[test]
    fn random_and_mutated_streams_never_panic() {
        let mut seed =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
                .to_vec();
        let z = gzip(b"hello hello hello hello");
        seed.extend_from_slice(alloc::format!("{:x}\r\n", z.len()).as_bytes());
        seed.extend_from_slice(&z);
        seed.extend_from_slice(b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        let alphabet = b"GET HTTP/1.1 \r\n:0123456789abcdef;\x00\x1f\x8b\x08\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut flows = HttpFlows::new(8, HttpStateConfig::default());
        let mut parser = HttpParser::new();
        let mut out = HttpFrame::default();
        for round in 0..3000u64 {
            let mut p = seed.clone();
            for _ in 0..rng.below(8) + 1 {
                let i = rng.below(p.len() + 1);
                match rng.below(3) {
                    0 if i < p.len() => p[i] = alphabet[rng.below(alphabet.len())],
                    1 => p.insert(i, alphabet[rng.below(alphabet.len())]),
                    _ => p.truncate(i.max(1)),
                }
            }
            let flow = FlowId::for_test(rng.below(8), 1 + round / 4);
            let mut at = 0;
            while at < p.len() {
                let n = (rng.below(40) + 1).min(p.len() - at);
                out.clear();
                let _ = flows.feed(flow, round % 2 == 0, &p[at..at + n], &mut parser, &mut out);
                at += n;
                for e in &out.events {
                    let m = &out.view.messages()[e.msg];
                    let _ = out.view.buffers(m, &out.heads);
                    let _ = out.view.old_buffers(m, &out.heads);
                }
            }
        }
        flows.sweep(|_, _| false);
        assert_eq!(flows.used, 0);
    }
}
