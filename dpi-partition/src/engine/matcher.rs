//! Payload evaluation of one rule: contents, pcre, isdataat, with Snort/Suricata semantics.
//!
//! - Absolute content: the match lies in `[offset, offset + depth)` (no `depth`: to the end).
//! - Relative content (`distance`/`within`): with `base = cursor + distance` (the cursor is the
//!   end of the previous positive content/pcre match, 0 at the start; `distance` may be negative),
//!   the match starts at or after `max(base, 0)` and ends at or before `base + within`.
//! - `endswith`: the match must also end at the buffer's end (so the window must reach it).
//! - Negated content (`!`) succeeds when no match lies in its window and leaves the cursor alone.
//! - `pcre`: searched from the buffer start, or with `R` from the cursor (the subject then starts
//!   at the cursor, so `^` anchors there, as PCRE does); a match moves the cursor to its end.
//! - `isdataat:n` (Snort 3): the byte at `n` (or at `cursor + n` with `relative`) exists; `!`
//!   inverts; the cursor does not move.
//! - `byte_test` reads 1-4 bytes (or a 1-10-character number string) at `offset` from the
//!   buffer start or the cursor, applies `bitmask`, and compares; the cursor does not move.
//!   `byte_jump` reads the same way and moves the cursor to the end of the bytes read plus the
//!   value (times `multiplier`, rounded up to 4 with `align`; from the start with
//!   `from_beginning`, from the end with `from_end`) plus `post_offset`; a target outside the
//!   buffer fails. Both fail when the bytes lie outside the buffer.
//! - `byte_extract` reads like `byte_test`, stores the value (times `multiplier`, rounded up
//!   to `align`) in a variable and moves the cursor past the bytes read; `byte_math` stores
//!   `value oper rvalue` and leaves the cursor. A result that does not fit 32 bits (or a
//!   division by zero) fails the step. Later steps read the variable's value on the same
//!   evaluation path: when an earlier content is retried, the variable is extracted again.
//! - `base64_decode` decodes base64 text of the current buffer (Snort's leniency:
//!   `decode_base64`); `base64_data` makes later steps read the decoded bytes, cursor at 0.
//! - Buffers ([`Buffers`]): each step reads the buffer chosen by the last sticky buffer option
//!   before it (`http_uri`, `file_data`, ...; `pkt_data`/`raw_data`: the packet payload), with
//!   the cursor at 0 after each switch. Switching to a buffer the message does not have fails.
//!   `bufferlen` compares the buffer's length (from the cursor with `relative`). A buffer cut at
//!   a size limit ([`Buffers::truncated`]) fails every rule that reads it with a step that can
//!   succeed on missing bytes (negated content/pcre/isdataat, `bufferlen`, `byte_jump
//!   from_end`): only positive evidence counts on it.
//! - Backtracking: when a later step fails, earlier positive contents and pcres are tried at
//!   their later match positions, so a rule matches whenever some assignment of positions
//!   satisfies every step. Failed (step, cursor) pairs are memoised, which bounds the work to
//!   steps x payload length per rule and packet. Between the first byte_extract, byte_math or
//!   base64_decode and the last step that reads a variable or the decoded bytes, (step,
//!   cursor) does not decide the outcome, so those steps are not memoised: each entry and each
//!   64 bytes scanned there draw on the evaluation budget below (and a decode on it, a step
//!   per 4 bytes), with the same outcome when it runs out.
//!
//! # pcre engines and their bound
//!
//! A pcre compiles with regex-automata whenever it accepts the pattern (linear time, no
//! bound needed). Patterns it refuses for constructs only a backtracking engine can run
//! (backreferences, lookahead, lookbehind, atomic groups) go to [`super::backtrack`], whose
//! searches draw from a step budget of [`STEP_LIMIT`] per rule evaluation, shared by all the
//! rule's pcre searches on that buffer. When it runs out (the sender can craft payloads that
//! make a backreference pattern backtrack exponentially), the evaluation stops and the
//! outcome is decided by the rule's action, not by the payload:
//!
//! - a `drop` rule **matches** (fails closed): the frame is dropped;
//! - a `pass` or `alert` rule does not match (Snort's `pcre_match_limit` behaviour, where the
//!   pcre counts as not matching; for a `pass` rule that is also the closed side, since the
//!   frame is then still judged by the other rules).
//!
//! Either way [`Program::pcre_limit_hits`] counts it (the engine adds each one to its
//! `pcre_limit` counter). Why fail closed for `drop`: with Snort's behaviour a bounded matcher gives
//! the sender a deterministic way past every drop rule whose pcre it can make expensive: pad
//! the attack until the budget runs out. Failing closed makes that padding get the frame
//! dropped instead; the cost is that traffic which really exhausts a drop rule's budget is
//! dropped without a complete match, which the counter shows. Unlike Snort, a negated pcre
//! whose search ran out does not count as "not found" (which would make the negation hold):
//! the rule's action decides, as above. The `O` flag (Snort: no match limit for this pcre) has
//! no effect here: the bound always applies.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use memchr::memmem;
use regex_automata::meta::{self, Regex};
use regex_automata::nfa::thompson::WhichCaptures;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input};

use super::backtrack::{self, Exceeded, STEP_LIMIT};
use super::rules::{
    Action, AppBuffer, Base64Decode, BufferLen, ByteExtract, ByteJump, ByteMath, ByteOp, ByteTest,
    Content, Extract, HttpBuffer, PayloadOp, Pcre, Rule, BASE64_MAX_DECODED, MAX_VARS,
};

/// The buffers a payload program reads: the packet payload and, for a rule with HTTP sticky
/// buffers, one HTTP message's buffers ([`super::http`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Buffers<'a> {
    /// `pkt_data` / `raw_data`.
    pub pkt: &'a [u8],
    /// HTTP buffers by [`HttpBuffer::index`]; `None`: the message has no such buffer.
    pub http: [Option<&'a [u8]>; HttpBuffer::COUNT],
    /// Bit per HTTP buffer index: cut at a size limit (only positive evidence counts).
    pub truncated: u16,
    /// DNS/TLS buffers by [`AppBuffer::index`]; `None`: the message has no such buffer.
    pub app: [Option<&'a [u8]>; AppBuffer::COUNT],
}

impl<'a> Buffers<'a> {
    /// Only the packet payload.
    pub fn pkt(pkt: &'a [u8]) -> Buffers<'a> {
        Buffers {
            pkt,
            ..Buffers::default()
        }
    }

    /// Whether HTTP buffer `b` was cut at a size limit.
    pub fn is_truncated(&self, b: HttpBuffer) -> bool {
        self.truncated & 1 << b.index() != 0
    }
}

/// Finds the `$` characters of a pattern that are regex anchors (unescaped, outside classes).
fn dollar_positions(src: &str) -> Vec<usize> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut class_depth = 0u32;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => {
                class_depth += 1;
                // `[]...]` and `[^]...]`: the first `]` is literal.
                if b.get(i + 1) == Some(&b'^') {
                    i += 1;
                }
                if b.get(i + 1) == Some(&b']') {
                    i += 1;
                }
            }
            b']' if class_depth > 0 => class_depth -= 1,
            b'$' if class_depth == 0 => out.push(i),
            _ => {}
        }
        i += 1;
    }
    out
}

/// The engine that runs one pcre.
// Boxed as a whole in [`Op::Pcre`]; boxing the larger variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum PcreEngine {
    /// regex-automata: every pattern it accepts (linear time).
    Automata { re: Regex, cache: meta::Cache },
    /// The bounded backtracking matcher: patterns with backreferences or lookaround.
    Backtrack(backtrack::Regex),
}

/// A compiled `pcre` option.
#[derive(Debug)]
pub struct CompiledPcre {
    engine: PcreEngine,
    negated: bool,
    relative: bool,
    anchored: bool,
    /// The pattern ended in a non-multiline `$`, compiled as `\z`; PCRE's `$` also matches
    /// before a final newline, so the search is retried without a trailing `\n`.
    end_dollar: bool,
}

/// PCRE's `$` without the `m` flag: the end of the subject, or before a newline that ends it.
/// A lookahead, so such a pattern runs on the backtracking matcher; used where `$` is not the
/// pattern's last item (a trailing `$` stays linear: see [`CompiledPcre::find`]).
const PCRE_DOLLAR: &str = r"(?=\n?\z)";

/// The pattern as regex-automata reads it, its syntax settings, and whether it ended in a
/// non-multiline `$` (see [`CompiledPcre`]).
fn pcre_source(p: &Pcre) -> Result<(String, syntax::Config, bool), String> {
    let multi = p.has('m');
    // Snort's idiom `(?!\n)\s` ("whitespace but not a newline") is a one-character lookahead
    // followed by a one-character class: exactly the class `[^\S\n]`, which needs no lookaround.
    let mut src = p.source.replace(r"(?!\n)\s", r"[^\S\n]");
    let mut end_dollar = false;
    if !multi {
        let dollars = dollar_positions(&src);
        let significant_end = if p.has('x') {
            src.trim_end().len()
        } else {
            src.len()
        };
        if p.has('E') {
            for &d in dollars.iter().rev() {
                src.replace_range(d..d + 1, r"\z");
            }
        } else if let [last] = dollars[..] {
            if last + 1 == significant_end {
                src.replace_range(last..last + 1, r"\z");
                end_dollar = true;
            } else {
                src.replace_range(last..last + 1, PCRE_DOLLAR);
            }
        } else {
            for &d in dollars.iter().rev() {
                src.replace_range(d..d + 1, PCRE_DOLLAR);
            }
        }
    }
    let syn = syntax::Config::new()
        .unicode(false)
        .utf8(false)
        .case_insensitive(p.has('i'))
        .multi_line(multi)
        .dot_matches_new_line(p.has('s'))
        .ignore_whitespace(p.has('x'))
        .swap_greed(p.has('G'));
    Ok((src, syn, end_dollar))
}

/// Checks that a pcre option is supported, by parsing it only (the rule parser uses this; the
/// engine compiles the pattern once, when it is built).
pub fn check_pcre(p: &Pcre) -> Result<(), String> {
    let (src, syn, _) = pcre_source(p)?;
    if syntax::parse_with(&src, &syn).is_ok() {
        return match backtrack::rewrite(&src, p.has('x')) {
            Ok(rw) if rw.possessive => Err(unsupported(backtrack::POSSESSIVE.into())),
            _ => Ok(()),
        };
    }
    // What regex-automata refuses may still run on the backtracking matcher (compiling it is
    // as cheap as parsing).
    let rw = backtrack::rewrite(&src, p.has('x')).map_err(unsupported)?;
    if rw.needs_backtracking() {
        backtrack::compile(&rw, &syn).map_err(unsupported)?;
    } else {
        syntax::parse_with(&rw.source, &syn).map_err(|e| unsupported(format!("{e}")))?;
    }
    Ok(())
}

fn unsupported(msg: String) -> String {
    format!("pattern not supported: {}", one_line(&msg))
}

/// Builds the regex-automata engine; `Err((true, _))` for a syntax error.
fn automata(src: &str, syn: syntax::Config) -> Result<Regex, (bool, String)> {
    Regex::builder()
        .syntax(syn)
        .configure(
            // The lazy DFA keeps pcre fast on full-size payloads; its cache is capped (and the
            // one-pass DFA, which only serves anchored searches, is off) to bound memory. Only
            // the overall match is needed, so no capture groups are compiled; pcre runs only
            // after the rule's contents matched, so regex-level literal prefilters are not
            // worth their build cost (about a third of all allocation while loading a ruleset).
            Regex::config()
                .utf8_empty(false)
                .onepass(false)
                .hybrid_cache_capacity(64 * 1024)
                .which_captures(WhichCaptures::Implicit)
                .auto_prefilter(false),
        )
        .build(src)
        .map_err(|e| match e.syntax_error() {
            Some(se) => (true, unsupported(format!("{se}"))),
            None => (false, format!("pattern not supported: {e}")),
        })
}

/// Compiles a pcre option: with regex-automata when it accepts the pattern, else with the
/// bounded backtracking matcher.
pub fn compile_pcre(p: &Pcre) -> Result<CompiledPcre, String> {
    let (src, syn, end_dollar) = pcre_source(p)?;
    let rewritten = backtrack::rewrite(&src, p.has('x'));
    if rewritten.as_ref().is_ok_and(|rw| rw.possessive) {
        return Err(unsupported(backtrack::POSSESSIVE.into()));
    }
    let engine = match automata(&src, syn) {
        Ok(re) => PcreEngine::Automata {
            cache: re.create_cache(),
            re,
        },
        Err((false, e)) => return Err(e),
        Err((true, e)) => {
            let rw = rewritten.map_err(unsupported)?;
            if rw.needs_backtracking() {
                PcreEngine::Backtrack(backtrack::compile(&rw, &syn).map_err(unsupported)?)
            } else if rw.source != src {
                // Only PCRE spellings regex-syntax lacks (a literal `{`, `\0`): still linear.
                let re = automata(&rw.source, syn).map_err(|(_, e)| e)?;
                PcreEngine::Automata {
                    cache: re.create_cache(),
                    re,
                }
            } else {
                return Err(e);
            }
        }
    };
    Ok(CompiledPcre {
        engine,
        negated: p.negated,
        relative: p.has('R'),
        anchored: p.has('A'),
        end_dollar,
    })
}

/// The last line of a multi-line parser message (the part that says what is wrong).
fn one_line(msg: &str) -> String {
    msg.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(msg)
        .trim()
        .into()
}

impl CompiledPcre {
    /// One search of `hay` from `from` with the pattern as compiled.
    fn search(
        &mut self,
        hay: &[u8],
        from: usize,
        budget: &mut u64,
    ) -> Result<Option<(usize, usize)>, Exceeded> {
        match &mut self.engine {
            PcreEngine::Automata { re, cache } => {
                let anchored = if self.anchored {
                    Anchored::Yes
                } else {
                    Anchored::No
                };
                let input = Input::new(hay).range(from..).anchored(anchored);
                Ok(re.search_with(cache, &input).map(|m| (m.start(), m.end())))
            }
            PcreEngine::Backtrack(re) => re.find(hay, from, self.anchored, budget),
        }
    }

    /// Leftmost match in `hay` starting at or after `from`: (start, end). The backtracking
    /// matcher spends `budget`; `Err` when it ran out.
    fn find(
        &mut self,
        hay: &[u8],
        from: usize,
        budget: &mut u64,
    ) -> Result<Option<(usize, usize)>, Exceeded> {
        if self.anchored && from > 0 {
            return Ok(None);
        }
        let full = self.search(hay, from, budget)?;
        if !self.end_dollar || hay.last() != Some(&b'\n') || from >= hay.len() {
            return Ok(full);
        }
        let alt = self.search(&hay[..hay.len() - 1], from, budget)?;
        Ok(match (full, alt) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        })
    }
}

/// A compiled `content` option.
#[derive(Debug)]
pub struct CompiledContent {
    /// Pattern; lower-cased when `nocase`.
    pat: Vec<u8>,
    /// Exact-case finder; `None` for `nocase` (searched by [`find_nocase`]).
    finder: Option<Box<memmem::Finder<'static>>>,
    negated: bool,
    relative: bool,
    offset: u32,
    depth: Option<u32>,
    distance: i32,
    within: Option<u32>,
    endswith: bool,
    /// Variables replacing offset, depth, distance, within.
    vars: [Option<u8>; 4],
}

impl CompiledContent {
    fn new(c: &Content) -> CompiledContent {
        let pat: Vec<u8> = if c.nocase {
            c.pattern.to_ascii_lowercase()
        } else {
            c.pattern.clone()
        };
        let finder = (!c.nocase).then(|| Box::new(memmem::Finder::new(&pat).into_owned()));
        CompiledContent {
            pat,
            finder,
            negated: c.negated,
            relative: c.is_relative(),
            offset: c.offset.unwrap_or(0),
            depth: c.depth,
            distance: c.distance.unwrap_or(0),
            within: c.within,
            endswith: c.endswith,
            vars: [c.offset_var, c.depth_var, c.distance_var, c.within_var],
        }
    }

    /// Search window `[lo, hi)` for a buffer of `n` bytes and the current cursor; `None` if empty.
    /// Variables (`vars`) give offset, depth, distance or within where the rule names one.
    fn window(&self, n: usize, cursor: usize, vars: &Vars) -> Option<(usize, usize)> {
        let n64 = n as i64;
        // Every term fits in i64 (u32 or i32 values, a cursor within the buffer).
        let [offset, depth, distance, within] =
            self.vars.map(|v| v.map(|v| i64::from(var(vars, v))));
        let (lo, hi) = if self.relative {
            let base = cursor as i64 + distance.unwrap_or(i64::from(self.distance));
            let within = within.or(self.within.map(i64::from));
            let hi = within.map_or(n64, |w| (base + w).min(n64));
            (base.max(0), hi)
        } else {
            let lo = offset.unwrap_or(i64::from(self.offset));
            let depth = depth.or(self.depth.map(i64::from));
            let hi = depth.map_or(n64, |d| (lo + d).min(n64));
            (lo, hi)
        };
        let m = self.pat.len() as i64;
        // `endswith`: the only match position is the one that ends the buffer, if the window
        // reaches the end.
        let lo = if self.endswith {
            if hi != n64 {
                return None;
            }
            lo.max(n64 - m)
        } else {
            lo
        };
        if hi - lo < m {
            return None;
        }
        Some((lo as usize, hi as usize))
    }

    /// First match start in `buf[from..hi]` (match must end by `hi`).
    fn find(&self, buf: &[u8], from: usize, hi: usize) -> Option<usize> {
        let hay = buf.get(from..hi)?;
        if hay.len() < self.pat.len() {
            return None;
        }
        let pos = match &self.finder {
            Some(f) => f.find(hay),
            None => find_nocase(hay, &self.pat),
        };
        pos.map(|p| p + from)
    }
}

/// ASCII case-insensitive search; `pat` is lower-case.
pub fn find_nocase(hay: &[u8], pat: &[u8]) -> Option<usize> {
    let first = *pat.first()?;
    let last_start = hay.len().checked_sub(pat.len())?;
    let upper = first.to_ascii_uppercase();
    let mut i = 0;
    while i <= last_start {
        let rel = if upper != first {
            memchr::memchr2(first, upper, &hay[i..=last_start])?
        } else {
            memchr::memchr(first, &hay[i..=last_start])?
        };
        let s = i + rel;
        if hay[s..s + pat.len()].eq_ignore_ascii_case(pat) {
            return Some(s);
        }
        i = s + 1;
    }
    None
}

/// One compiled step.
#[derive(Debug)]
enum Op {
    Content(CompiledContent),
    Pcre(Box<CompiledPcre>),
    IsDataAt {
        negated: bool,
        pos: u32,
        relative: bool,
        pos_var: Option<u8>,
    },
    Reset,
    Buffer(HttpBuffer),
    AppBuffer(AppBuffer),
    BufferLen(BufferLen),
    ByteTest(ByteTest),
    ByteJump(ByteJump),
    ByteExtract(Box<ByteExtract>),
    ByteMath(Box<ByteMath>),
    Base64Decode(Base64Decode),
    Base64Data,
}

/// Values of the rule's byte_extract/byte_math variables on the current evaluation path.
type Vars = [u32; MAX_VARS];

/// Variable `v` (the parser only hands out indices below [`MAX_VARS`]).
fn var(vars: &Vars, v: u8) -> u32 {
    vars.get(usize::from(v)).copied().unwrap_or(0)
}

/// The buffer id ([`Program::buf_of`]) of `base64_data`: the last decode's bytes.
const DECODED: u8 = u8::MAX;

/// What the byte_extract, byte_math and base64_decode steps on the current evaluation path left
/// for the steps after them.
#[derive(Clone, Copy, Debug, Default)]
struct PathState<'d> {
    vars: Vars,
    /// `base64_data`'s bytes.
    decoded: &'d [u8],
    /// The decode stopped at [`BASE64_MAX_DECODED`] or read a truncated buffer: only positive
    /// evidence counts on it (as on a truncated HTTP buffer).
    decoded_cut: bool,
}

impl PathState<'_> {
    /// This state with variable `slot` set to `value` (`None`: no such slot).
    fn with_var(mut self, slot: u8, value: u32) -> Option<Self> {
        *self.vars.get_mut(usize::from(slot))? = value;
        Some(self)
    }
}

/// The RFC 4648 decoder (standard alphabet) with Snort's leniency for what is left after the
/// text is cut at its first non-alphabet byte: padding optional, trailing bits ignored.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes the base64 text at the start of `src` as Snort's `base64_decode` reads it: white
/// space and line breaks are skipped, the text ends at the first other byte outside the
/// alphabet (`=` included), a last group of 2 or 3 characters gives its 1 or 2 bytes (a lone
/// character none). `text` is scratch. Returns (bytes of `src` scanned, whether the output
/// stopped at [`BASE64_MAX_DECODED`]); `out` holds the bytes.
fn decode_base64(src: &[u8], text: &mut Vec<u8>, out: &mut Vec<u8>) -> (usize, bool) {
    const MAX_TEXT: usize = BASE64_MAX_DECODED / 3 * 4;
    text.clear();
    out.clear();
    let mut scanned = 0;
    let mut capped = false;
    for &b in src {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => {
                if text.len() == MAX_TEXT {
                    capped = true;
                    break;
                }
                text.push(b);
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => break,
        }
        scanned += 1;
    }
    if text.len() % 4 == 1 {
        text.pop();
    }
    if base64::Engine::decode_vec(&BASE64, &text[..], out).is_err() {
        out.clear();
    }
    (scanned, capped)
}

/// Reads the number `e` describes with the cursor at `cursor`: (value, position after the bytes
/// consumed). `None` when the bytes lie outside the buffer or a string has no digits.
fn extract(buf: &[u8], cursor: usize, e: &Extract, vars: &Vars) -> Option<(u32, usize)> {
    let base = if e.relative { cursor as i64 } else { 0 };
    let offset = e
        .offset_var
        .map_or(i64::from(e.offset), |v| i64::from(var(vars, v)));
    let at = usize::try_from(base + offset).ok()?;
    let (mut value, end) = match e.string_base {
        None => {
            let bytes = buf.get(at..at + usize::from(e.bytes))?;
            let mut v = 0u32;
            if e.little {
                for &b in bytes.iter().rev() {
                    v = v << 8 | u32::from(b);
                }
            } else {
                for &b in bytes {
                    v = v << 8 | u32::from(b);
                }
            }
            (v, at + bytes.len())
        }
        Some(radix) => {
            // As C strtoul over at most `bytes` bytes: leading white space, an optional sign,
            // `0x` for hex, then digits; no digits is a failure.
            let s = buf.get(at..)?;
            let s = &s[..s.len().min(usize::from(e.bytes))];
            let mut i = 0;
            while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
                i += 1;
            }
            let neg = match s.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            if radix == 16
                && s.get(i) == Some(&b'0')
                && matches!(s.get(i + 1), Some(b'x' | b'X'))
                && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
            {
                i += 2;
            }
            let start = i;
            let mut v: u64 = 0;
            while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(radix)) {
                v = v
                    .saturating_mul(u64::from(radix))
                    .saturating_add(u64::from(d));
                i += 1;
            }
            if i == start {
                return None;
            }
            let v = if neg { v.wrapping_neg() } else { v };
            (v as u32, at + i)
        }
    };
    if let Some(m) = e.bitmask {
        value &= m;
        if value != 0 {
            value >>= m.trailing_zeros();
        }
    }
    Some((value, end))
}

fn byte_test(b: &ByteTest, buf: &[u8], cursor: usize, vars: &Vars) -> bool {
    let Some((v, _)) = extract(buf, cursor, &b.extract, vars) else {
        return false;
    };
    let c = b.value_var.map_or(b.value, |x| var(vars, x));
    let ok = match b.op {
        ByteOp::Lt => v < c,
        ByteOp::Le => v <= c,
        ByteOp::Eq => v == c,
        ByteOp::Gt => v > c,
        ByteOp::Ge => v >= c,
        ByteOp::And => v & c != 0,
        ByteOp::Xor => v ^ c != 0,
    };
    ok != b.negated
}

/// New cursor after a `byte_jump`, if it stays within `0..=len`.
fn byte_jump(j: &ByteJump, buf: &[u8], cursor: usize, vars: &Vars) -> Option<usize> {
    let (v, after) = extract(buf, cursor, &j.extract, vars)?;
    // i128: value x multiplier is up to 2^64 and the sum must not wrap on guest data.
    let mut jump = i128::from(v) * i128::from(j.multiplier.unwrap_or(1));
    if j.align {
        jump = (jump + 3) / 4 * 4;
    }
    let from = if j.from_beginning {
        0
    } else if j.from_end {
        buf.len() as i128
    } else {
        after as i128
    };
    let pos = from + jump + i128::from(j.post_offset);
    usize::try_from(pos).ok().filter(|&p| p <= buf.len())
}

/// `byte_extract`'s value (multiplied, aligned) and the cursor after it; `None` when the bytes
/// are not there or the value does not fit 32 bits.
fn byte_extract(x: &ByteExtract, buf: &[u8], cursor: usize, vars: &Vars) -> Option<(u32, usize)> {
    let (v, after) = extract(buf, cursor, &x.extract, vars)?;
    let mut v = v.checked_mul(x.multiplier.unwrap_or(1))?;
    if let Some(a) = x.align {
        v = v.checked_next_multiple_of(u32::from(a))?;
    }
    Some((v, after))
}

/// `byte_math`'s result; `None` when the bytes are not there or the result does not fit.
fn byte_math(m: &ByteMath, buf: &[u8], cursor: usize, vars: &Vars) -> Option<u32> {
    let (v, _) = extract(buf, cursor, &m.extract, vars)?;
    let rvalue = m.rvalue_var.map_or(m.rvalue, |x| var(vars, x));
    m.oper.apply(v, rvalue)
}

impl Op {
    fn uses_cursor(&self) -> bool {
        match self {
            Op::Content(c) => c.relative,
            Op::Pcre(p) => p.relative,
            Op::IsDataAt { relative, .. } => *relative,
            Op::Reset | Op::Buffer(_) | Op::AppBuffer(_) => false,
            Op::BufferLen(b) => b.relative,
            Op::ByteTest(b) => b.extract.relative,
            Op::ByteJump(j) => j.extract.relative,
            Op::ByteExtract(x) => x.extract.relative,
            Op::ByteMath(m) => m.extract.relative,
            Op::Base64Decode(d) => d.relative,
            Op::Base64Data => false,
        }
    }

    /// Whether the step sets a variable or the decoded buffer.
    fn sets_state(&self) -> bool {
        matches!(
            self,
            Op::ByteExtract(_) | Op::ByteMath(_) | Op::Base64Decode(_)
        )
    }

    /// Whether the step reads a variable.
    fn reads_vars(&self) -> bool {
        match self {
            Op::Content(c) => c.vars.iter().any(Option::is_some),
            Op::IsDataAt { pos_var, .. } => pos_var.is_some(),
            Op::ByteTest(b) => b.value_var.is_some() || b.extract.offset_var.is_some(),
            Op::ByteJump(j) => j.extract.offset_var.is_some(),
            Op::ByteMath(m) => m.rvalue_var.is_some() || m.extract.offset_var.is_some(),
            _ => false,
        }
    }

    /// Whether the step can succeed because bytes are missing (so it may not run on a
    /// truncated buffer): negation, a length check, a jump from the end.
    fn needs_whole_buffer(&self) -> bool {
        match self {
            Op::Content(c) => c.negated,
            Op::Pcre(p) => p.negated,
            Op::IsDataAt { negated, .. } => *negated,
            Op::BufferLen(_) => true,
            Op::ByteJump(j) => j.from_end,
            Op::Reset
            | Op::Buffer(_)
            | Op::AppBuffer(_)
            | Op::ByteTest(_)
            | Op::ByteExtract(_)
            | Op::ByteMath(_)
            | Op::Base64Decode(_)
            | Op::Base64Data => false,
        }
    }

    /// Whether the step replaces the cursor without reading it.
    fn sets_cursor_fresh(&self) -> bool {
        match self {
            Op::Content(c) => !c.negated && !c.relative,
            Op::Pcre(p) => !p.negated && !p.relative,
            Op::Reset | Op::Buffer(_) | Op::AppBuffer(_) | Op::Base64Data => true,
            Op::ByteJump(j) => !j.extract.relative,
            Op::ByteExtract(x) => !x.extract.relative,
            Op::IsDataAt { .. }
            | Op::ByteTest(_)
            | Op::BufferLen(_)
            | Op::ByteMath(_)
            | Op::Base64Decode(_) => false,
        }
    }
}

/// Buffer number of the first app buffer (after the packet and the HTTP buffers).
const APP_BASE: u8 = 1 + HttpBuffer::COUNT as u8;

/// The bytes of buffer `b` (0: the packet; `1..APP_BASE`: HTTP buffer `b - 1`; from
/// `APP_BASE`: app buffer `b - APP_BASE`; empty when absent).
fn buffer<'a>(bufs: &Buffers<'a>, b: u8) -> &'a [u8] {
    let slot = match b {
        0 => return bufs.pkt,
        k if k < APP_BASE => bufs.http.get(usize::from(k) - 1),
        k => bufs.app.get(usize::from(k - APP_BASE)),
    };
    slot.copied().flatten().unwrap_or(&[])
}

/// Scratch space for the failure memo, reused across evaluations.
#[derive(Debug, Default)]
pub struct Memo {
    bits: Vec<u64>,
    width: usize,
}

impl Memo {
    fn reset(&mut self, steps: usize, positions: usize) {
        let words = (steps * positions).div_ceil(64);
        self.bits.clear();
        self.bits.resize(words, 0);
        self.width = positions;
    }
    fn idx(&self, step: usize, cursor: usize) -> (usize, u64) {
        let bit = step * self.width + cursor;
        (bit / 64, 1u64 << (bit % 64))
    }
    fn failed(&self, step: usize, cursor: usize) -> bool {
        if cursor >= self.width {
            return false;
        }
        let (w, m) = self.idx(step, cursor);
        self.bits.get(w).is_some_and(|x| x & m != 0)
    }
    fn mark(&mut self, step: usize, cursor: usize) {
        if cursor >= self.width {
            return;
        }
        let (w, m) = self.idx(step, cursor);
        if let Some(x) = self.bits.get_mut(w) {
            *x |= m;
        }
    }
}

/// The payload program of one rule.
#[derive(Debug)]
pub struct Program {
    ops: Vec<Op>,
    /// `dep[i]`: a later step reads the cursor that step `i` leaves, so step `i` must try all its
    /// match positions (backtracking); otherwise the first one decides.
    dep: Vec<bool>,
    relative: bool,
    /// A `drop` rule: an evaluation whose pcre budget ran out matches (see the module doc).
    fail_closed: bool,
    /// Backtracking steps left in the current evaluation.
    budget: u64,
    /// The current evaluation ran out of budget.
    exceeded: bool,
    /// Evaluations that ran out of budget.
    limit_hits: u64,
    /// `buf_of[i]`: the buffer step `i` reads (0: the packet, `k`: HTTP buffer `k - 1`).
    buf_of: Vec<u8>,
    /// The distinct values of `buf_of`.
    used: Vec<u8>,
    /// HTTP buffers (bit per index) read by a step that may not run on a truncated buffer.
    whole: u16,
    /// `live[i]`: step `i`'s outcome depends on variables or decoded bytes an earlier step of
    /// the same path set, so (step, cursor) does not decide it: not memoised, and each entry
    /// costs a step of the budget instead (see the module doc).
    live: Vec<bool>,
    /// Scratch of base64_decode: the text without white space, and the decoded bytes.
    b64_text: Vec<u8>,
    b64_out: Vec<u8>,
}

impl Program {
    /// Compiles the payload steps of `rule`.
    pub fn new(rule: &Rule) -> Result<Program, String> {
        let mut ops = Vec::with_capacity(rule.ops.len());
        for op in &rule.ops {
            ops.push(match op {
                PayloadOp::Content(c) => Op::Content(CompiledContent::new(c)),
                PayloadOp::Pcre(p) => Op::Pcre(Box::new(compile_pcre(p)?)),
                PayloadOp::IsDataAt(d) => Op::IsDataAt {
                    negated: d.negated,
                    pos: d.pos,
                    relative: d.relative,
                    pos_var: d.pos_var,
                },
                PayloadOp::ResetCursor => Op::Reset,
                PayloadOp::Buffer(b) => Op::Buffer(*b),
                PayloadOp::AppBuffer(b) => Op::AppBuffer(*b),
                PayloadOp::BufferLen(b) => Op::BufferLen(*b),
                PayloadOp::ByteTest(b) => Op::ByteTest(*b),
                PayloadOp::ByteJump(j) => Op::ByteJump(*j),
                PayloadOp::ByteExtract(x) => Op::ByteExtract(Box::new(x.clone())),
                PayloadOp::ByteMath(m) => Op::ByteMath(Box::new(m.clone())),
                PayloadOp::Base64Decode(d) => Op::Base64Decode(*d),
                PayloadOp::Base64Data => Op::Base64Data,
            });
        }
        let (mut buf_of, mut used, mut whole) = (Vec::with_capacity(ops.len()), Vec::new(), 0u16);
        let mut cur = 0u8;
        for op in &ops {
            match op {
                Op::Reset => cur = 0,
                Op::Buffer(b) => cur = b.index() as u8 + 1,
                Op::AppBuffer(b) => cur = APP_BASE + b.index() as u8,
                Op::Base64Data => cur = DECODED,
                _ => {}
            }
            buf_of.push(cur);
            if cur == DECODED {
                // Judged by `PathState::decoded_cut` when it runs.
                continue;
            }
            if !used.contains(&cur) {
                used.push(cur);
            }
            if cur > 0 && cur < APP_BASE && op.needs_whole_buffer() {
                whole |= 1 << (cur - 1);
            }
        }
        // Steps between the first state setter and the last state reader (a step on the
        // decoded buffer reads state, as does a base64_decode of it).
        let first_setter = ops.iter().position(Op::sets_state);
        let last_reader = (0..ops.len())
            .rev()
            .find(|&i| ops[i].reads_vars() || buf_of[i] == DECODED);
        let live: Vec<bool> = (0..=ops.len())
            .map(|i| match (first_setter, last_reader) {
                (Some(f), Some(l)) => f < i && i <= l,
                _ => false,
            })
            .collect();
        let mut dep = alloc::vec![false; ops.len()];
        for (i, d) in dep.iter_mut().enumerate() {
            for later in &ops[i + 1..] {
                if later.uses_cursor() {
                    *d = true;
                    break;
                }
                if later.sets_cursor_fresh() {
                    break;
                }
            }
        }
        let relative = dep.iter().any(|&d| d);
        Ok(Program {
            ops,
            dep,
            relative,
            fail_closed: rule.action == Action::Drop,
            budget: STEP_LIMIT,
            exceeded: false,
            limit_hits: 0,
            buf_of,
            used,
            whole,
            live,
            b64_text: Vec::new(),
            b64_out: Vec::new(),
        })
    }

    /// Evaluations that ran out of backtracking steps (each decided by the rule's action: see
    /// the module doc).
    pub fn pcre_limit_hits(&self) -> u64 {
        self.limit_hits
    }

    /// Heap bytes of the compiled steps (regexes with their caches, patterns).
    pub fn memory_usage(&self) -> usize {
        self.ops
            .iter()
            .map(|o| match o {
                Op::Content(c) => c.pat.len() * 2,
                Op::Pcre(p) => match &p.engine {
                    PcreEngine::Automata { re, cache } => re.memory_usage() + cache.memory_usage(),
                    PcreEngine::Backtrack(re) => re.memory_usage(),
                },
                _ => 0,
            })
            .sum::<usize>()
            + self.ops.len() * core::mem::size_of::<Op>()
    }

    /// Whether the program has no steps.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether the program reads an HTTP buffer.
    pub fn uses_http(&self) -> bool {
        self.used.iter().any(|&b| b > 0 && b < APP_BASE)
    }

    /// Runs the program over `buf` (the packet buffer only).
    pub fn matches(&mut self, buf: &[u8], memo: &mut Memo) -> bool {
        self.matches_buffers(&Buffers::pkt(buf), memo)
    }

    /// Runs the program over `bufs`. When the pcre budget runs out, the rule's action decides
    /// (see the module doc).
    pub fn matches_buffers(&mut self, bufs: &Buffers<'_>, memo: &mut Memo) -> bool {
        if self.whole & bufs.truncated != 0 {
            return false;
        }
        if self.relative {
            let width = self
                .used
                .iter()
                .map(|&b| buffer(bufs, b).len())
                .max()
                .unwrap_or(0);
            memo.reset(self.ops.len() + 1, width + 1);
        }
        self.budget = STEP_LIMIT;
        self.exceeded = false;
        let matched = self.eval(0, 0, bufs, PathState::default(), memo);
        if self.exceeded {
            self.limit_hits += 1;
            return self.fail_closed;
        }
        matched
    }

    /// Spends `cost` of the evaluation budget; false (the evaluation stops) when it runs out.
    fn charge(&mut self, cost: u64) -> bool {
        match self.budget.checked_sub(cost) {
            Some(left) => {
                self.budget = left;
                true
            }
            None => {
                self.budget = 0;
                self.exceeded = true;
                false
            }
        }
    }

    /// Budget cost of scanning `bytes` bytes in a live step (memchr-speed scans: about 64 bytes
    /// cost what one backtracking step does).
    fn scan_cost(bytes: usize) -> u64 {
        1 + bytes as u64 / 64
    }

    fn next(
        &mut self,
        i: usize,
        cursor: usize,
        bufs: &Buffers<'_>,
        st: PathState<'_>,
        memo: &mut Memo,
    ) -> bool {
        if self.live.get(i).copied().unwrap_or(false) {
            return self.charge(1) && self.eval(i, cursor, bufs, st, memo);
        }
        if !self.relative {
            return self.eval(i, cursor, bufs, st, memo);
        }
        if memo.failed(i, cursor) {
            return false;
        }
        let ok = self.eval(i, cursor, bufs, st, memo);
        if !ok {
            memo.mark(i, cursor);
        }
        ok
    }

    fn eval(
        &mut self,
        i: usize,
        cursor: usize,
        bufs: &Buffers<'_>,
        st: PathState<'_>,
        memo: &mut Memo,
    ) -> bool {
        if self.exceeded {
            return false;
        }
        let Some(op) = self.ops.get(i) else {
            return true;
        };
        let b = self.buf_of[i];
        let buf = if b == DECODED {
            if st.decoded_cut && op.needs_whole_buffer() {
                return false;
            }
            st.decoded
        } else {
            buffer(bufs, b)
        };
        let n = buf.len();
        let live = self.live[i];
        match op {
            Op::Reset => self.next(i + 1, 0, bufs, st, memo),
            Op::Buffer(b) => bufs.http[b.index()].is_some() && self.next(i + 1, 0, bufs, st, memo),
            Op::AppBuffer(b) => {
                bufs.app[b.index()].is_some() && self.next(i + 1, 0, bufs, st, memo)
            }
            Op::Base64Data => self.next(i + 1, 0, bufs, st, memo),
            Op::BufferLen(b) => {
                let len = if b.relative {
                    n.saturating_sub(cursor)
                } else {
                    n
                };
                b.check.check(len) && self.next(i + 1, cursor, bufs, st, memo)
            }
            Op::ByteTest(b) => {
                byte_test(b, buf, cursor, &st.vars) && self.next(i + 1, cursor, bufs, st, memo)
            }
            Op::ByteJump(j) => match byte_jump(j, buf, cursor, &st.vars) {
                Some(c) => self.next(i + 1, c, bufs, st, memo),
                None => false,
            },
            Op::ByteExtract(x) => {
                let Some((v, after)) = byte_extract(x, buf, cursor, &st.vars) else {
                    return false;
                };
                st.with_var(x.var, v)
                    .is_some_and(|st| self.next(i + 1, after, bufs, st, memo))
            }
            Op::ByteMath(m) => {
                let Some(v) = byte_math(m, buf, cursor, &st.vars) else {
                    return false;
                };
                st.with_var(m.var, v)
                    .is_some_and(|st| self.next(i + 1, cursor, bufs, st, memo))
            }
            Op::Base64Decode(d) => {
                let base = if d.relative { cursor as u64 } else { 0 } + u64::from(d.offset);
                let Some(start) = usize::try_from(base).ok().filter(|&s| s < n) else {
                    return false;
                };
                let end = d
                    .bytes
                    .map_or(n, |len| start.saturating_add(len as usize).min(n));
                let src_cut = match b {
                    DECODED => st.decoded_cut,
                    0 => false,
                    k => bufs.truncated & 1 << (k - 1) != 0,
                };
                let mut out = core::mem::take(&mut self.b64_out);
                let (scanned, capped) =
                    decode_base64(&buf[start..end], &mut self.b64_text, &mut out);
                let ok = !out.is_empty()
                    && self.charge(1 + scanned as u64 / 4)
                    && self.next(
                        i + 1,
                        cursor,
                        bufs,
                        PathState {
                            decoded: &out,
                            decoded_cut: capped || src_cut,
                            ..st
                        },
                        memo,
                    );
                self.b64_out = out;
                ok
            }
            Op::IsDataAt {
                negated,
                pos,
                relative,
                pos_var,
            } => {
                let pos = pos_var.map_or(*pos, |v| var(&st.vars, v));
                let at = if *relative { cursor as u64 } else { 0 } + u64::from(pos);
                if (at < n as u64) != *negated {
                    self.next(i + 1, cursor, bufs, st, memo)
                } else {
                    false
                }
            }
            Op::Content(c) => {
                let win = c.window(n, cursor, &st.vars);
                if c.negated {
                    let found = win.is_some_and(|(lo, hi)| c.find(buf, lo, hi).is_some());
                    let cost = win.map_or(0, |(lo, hi)| hi - lo);
                    return (!live || self.charge(Self::scan_cost(cost)))
                        && !found
                        && self.next(i + 1, cursor, bufs, st, memo);
                }
                let Some((lo, hi)) = win else { return false };
                let m = c.pat.len();
                let mut from = lo;
                loop {
                    let found = self.content_at(i, buf, from, hi);
                    if live {
                        let scanned = found.map_or(hi, |s| s + m) - from;
                        if !self.charge(Self::scan_cost(scanned)) {
                            return false;
                        }
                    }
                    let Some(s) = found else { return false };
                    if self.next(i + 1, s + m, bufs, st, memo) {
                        return true;
                    }
                    if !self.dep[i] || self.exceeded {
                        return false;
                    }
                    from = s + 1;
                }
            }
            Op::Pcre(p) => {
                let base = if p.relative { cursor.min(n) } else { 0 };
                let negated = p.negated;
                if live && !self.charge(Self::scan_cost(n - base)) {
                    return false;
                }
                if negated {
                    let Op::Pcre(p) = &mut self.ops[i] else {
                        return false;
                    };
                    let Ok(found) = p.find(&buf[base..], 0, &mut self.budget) else {
                        self.exceeded = true;
                        return false;
                    };
                    return found.is_none() && self.next(i + 1, cursor, bufs, st, memo);
                }
                let mut from = 0;
                loop {
                    let Op::Pcre(p) = &mut self.ops[i] else {
                        return false;
                    };
                    let Ok(found) = p.find(&buf[base..], from, &mut self.budget) else {
                        self.exceeded = true;
                        return false;
                    };
                    let Some((s, e)) = found else {
                        return false;
                    };
                    if self.next(i + 1, base + e, bufs, st, memo) {
                        return true;
                    }
                    if !self.dep[i] || base + s >= n || self.exceeded {
                        return false;
                    }
                    if live && !self.charge(Self::scan_cost(n - base - s)) {
                        return false;
                    }
                    from = s + 1;
                }
            }
        }
    }

    fn content_at(&self, i: usize, buf: &[u8], from: usize, hi: usize) -> Option<usize> {
        match &self.ops[i] {
            Op::Content(c) => c.find(buf, from, hi),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decode_is_capped_and_lenient() {
        let (mut text, mut out) = (Vec::new(), Vec::new());
        // 4 characters give 3 bytes: the cap is reached exactly, then more text is left.
        let src = alloc::vec![b'A'; BASE64_MAX_DECODED / 3 * 4 + 8];
        let (scanned, capped) = decode_base64(&src, &mut text, &mut out);
        assert!(capped);
        assert_eq!(out.len(), BASE64_MAX_DECODED);
        assert_eq!(scanned, BASE64_MAX_DECODED / 3 * 4);
        let (_, capped) = decode_base64(b"YWJj\r\n ZA==rest", &mut text, &mut out);
        assert!(!capped);
        assert_eq!(out, b"abcd");
        // A lone last character gives nothing; `=` ends the text.
        decode_base64(b"YWJjZ", &mut text, &mut out);
        assert_eq!(out, b"abc");
        decode_base64(b"=YWJj", &mut text, &mut out);
        assert!(out.is_empty());
    }
}
