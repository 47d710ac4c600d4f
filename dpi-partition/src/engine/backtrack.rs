//! Bounded backtracking matcher for the `pcre` patterns that regex-automata refuses:
//! backreferences, lookahead, lookbehind and atomic groups.
//!
//! regex-automata (the fast path, linear time) still compiles every pattern it accepts; only
//! the rest come here. The pattern is first rewritten so that regex-syntax can parse it: each
//! construct it lacks becomes a plain capture group whose position in the group order is
//! recorded ([`Special`]): `\N`/`\g{N}`/`\k<name>`/`(?P=name)` becomes `(a)` (the `a` tells
//! whether case folding is in force there: it parses to a class under `i`), `(?=`, `(?!`,
//! `(?<=`, `(?<!` and `(?>` become `(`. A literal `{` that starts no quantifier (PCRE reads it
//! as a literal, regex-syntax refuses it) becomes `\{`, `\0`/`\0nn` become `\xNN`. Everything
//! else (classes, escapes, flags, `x` comments, case folding over bytes) is regex-syntax's, with
//! the same settings as the fast path, and its HIR is compiled to a small program for the
//! backtracking machine below.
//!
//! Semantics are PCRE's: leftmost match, alternatives in order, greedy/lazy repetition, a
//! backreference to an unset group fails, case-insensitive backreferences fold ASCII only (C
//! locale), lookaheads and atomic groups are atomic, a lookbehind body must have a bounded
//! length (every length in its range is tried, PCRE requires fixed-length alternatives),
//! multi-line `^` does not match after a newline that ends the subject, and a loop iteration
//! that matches the empty string ends the loop. A single-byte repetition whose possible
//! continuations start with bytes it cannot match is run possessively (PCRE's
//! auto-possessification), which does not change the result.
//!
//! # Bound
//!
//! Backtracking can take exponential time, and the sender chooses the payload. Every search
//! therefore draws from a step budget that its caller owns (the rule's evaluation shares one
//! budget across all its pcre searches: [`STEP_LIMIT`]). One step is one instruction run, one
//! choice point taken back or one start position tried, or four bytes scanned (by a
//! repetition, by the prefilter below) or compared (by a backreference). When the budget is
//! spent the search stops with [`Exceeded`] and the caller decides (the matcher's doc says
//! how: a `drop` rule then matches, other rules do not, and the event is counted). The
//! backtracking stack is capped too ([`MAX_FRAMES`]), and exceeding it is reported the same
//! way, so a search's memory is bounded as well as its time.
//!
//! Two things keep ordinary traffic far from the bound. Each search first runs the pattern
//! with backreferences loosened to "any bytes", lookarounds dropped and large counts loosened
//! ([`relax`]) on regex-automata, in linear time: where that superset does not match, neither
//! does the pattern, and where it does, no match starts before its start. Then a repetition
//! of one byte class gives bytes back (or, lazy, takes more) only at positions where what
//! follows can start, and scans a run of its class once however many starts lie in it.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use regex_automata::meta;
use regex_automata::nfa::thompson::WhichCaptures;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input};
use regex_syntax::hir::{Class, ClassBytes, ClassBytesRange, Hir, HirKind, Look, Repetition};

/// Steps one rule evaluation may spend in this matcher, over all its pcre searches.
///
/// Measured at 2.5-5 ns a step on the host with both cores busy (`cost_at_the_bound` below),
/// so at most about 0.5 ms per rule and buffer. A real attack on a community Oracle rule with
/// 62 KB of other text between its two halves is decided in about 32 000 steps.
pub const STEP_LIMIT: u64 = 100_000;

/// Most backtracking frames one search may hold (16 bytes each: at most 1 MiB).
pub const MAX_FRAMES: usize = 1 << 16;

/// Bytes scanned (by a repetition, by the linear prefilter, or compared by a backreference)
/// per step: a byte of a scanning loop costs about a quarter of an instruction of the machine
/// (about 1 ns against 4), so that a step costs about the same whatever it does.
const SCAN: u64 = 4;

/// Deepest nesting of lookarounds and atomic groups: the machine recurses once per level while
/// matching, and may run on a small stack.
const MAX_NEST: u32 = 8;

/// Largest compiled program, in instructions (counted repetitions are unrolled).
const MAX_INSTS: usize = 50_000;

/// Why a pattern with a possessive quantifier does not load.
pub const POSSESSIVE: &str = "possessive quantifiers are not supported";

/// The search ran out of steps or stack before it could decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exceeded;

/// What a placeholder capture group stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Special {
    /// A backreference to PCRE group `n` (1-based).
    Backref(u32),
    /// A named backreference, resolved once all group names are known.
    NamedBackref(String),
    /// A lookaround assertion.
    Look { behind: bool, negated: bool },
    /// An atomic group.
    Atomic,
}

/// One capture group of the rewritten pattern, in the order regex-syntax numbers them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Group {
    /// A group of the PCRE pattern (its PCRE number is its rank among these).
    Real,
    /// A placeholder.
    Special(Special),
}

/// A pattern rewritten for regex-syntax.
#[derive(Debug)]
pub struct Rewritten {
    /// The rewritten pattern.
    pub source: String,
    groups: Vec<Group>,
    /// The pattern has a possessive quantifier (`a++`, `a*+`, `a?+`, `a{n}+`), which
    /// regex-syntax reads as a repeated repetition: refused everywhere.
    pub possessive: bool,
}

impl Rewritten {
    /// Whether the pattern needs this matcher (it has a construct regex-automata lacks).
    pub fn needs_backtracking(&self) -> bool {
        self.groups.iter().any(|g| matches!(g, Group::Special(_)))
    }
}

/// Whether `chars[i..]` (starting at `{`) is a PCRE quantifier: `{n}`, `{n,}` or `{n,m}`.
fn is_quantifier(chars: &[char], i: usize) -> bool {
    let mut j = i + 1;
    let digits = |j: &mut usize| {
        let s = *j;
        while chars.get(*j).is_some_and(char::is_ascii_digit) {
            *j += 1;
        }
        *j > s
    };
    if !digits(&mut j) {
        return false;
    }
    if chars.get(j) == Some(&',') {
        j += 1;
        digits(&mut j);
    }
    chars.get(j) == Some(&'}')
}

/// Index just past the class that starts at `chars[i] == '['`, as PCRE reads it (a leading
/// `]` or `^]` is literal, `[:name:]` is a POSIX class, escapes are skipped).
fn class_end(chars: &[char], i: usize) -> usize {
    let mut j = i + 1;
    if chars.get(j) == Some(&'^') {
        j += 1;
    }
    if chars.get(j) == Some(&']') {
        j += 1;
    }
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 2,
            '[' if chars.get(j + 1) == Some(&':') => {
                let close = (j + 2..chars.len().saturating_sub(1))
                    .find(|&k| chars[k] == ':' && chars[k + 1] == ']');
                j = close.map_or(j + 1, |k| k + 2);
            }
            ']' => return j + 1,
            _ => j += 1,
        }
    }
    chars.len()
}

/// A group name at `chars[i..]` ended by `close`: (name, index past `close`).
fn group_name(chars: &[char], i: usize, close: char) -> Option<(String, usize)> {
    let end = (i..chars.len()).find(|&k| chars[k] == close)?;
    let name: String = chars[i..end].iter().collect();
    let ok = !name.is_empty()
        && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
        && !name.starts_with(|c: char| c.is_ascii_digit());
    ok.then_some((name, end + 1))
}

/// Rewrites a PCRE pattern for regex-syntax (see the module doc). `extended`: the `x` flag.
pub fn rewrite(src: &str, extended: bool) -> Result<Rewritten, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len() + 16);
    let mut groups: Vec<Group> = Vec::new();
    let mut names: Vec<(String, u32)> = Vec::new();
    let real = |g: &[Group]| g.iter().filter(|g| **g == Group::Real).count() as u32;
    let backref = |out: &mut String, groups: &mut Vec<Group>, s: Special| {
        out.push_str("(a)");
        groups.push(Group::Special(s));
    };
    let mut possessive = false;
    // The previous token was a quantifier.
    let mut quantified = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let after_quantifier = core::mem::replace(&mut quantified, false);
        match c {
            '*' | '+' | '?' => {
                if c == '+' && after_quantifier {
                    possessive = true;
                }
                quantified = c != '+' || !after_quantifier;
                out.push(c);
                i += 1;
            }
            '{' if is_quantifier(&chars, i) => {
                let end = (i..chars.len()).find(|&k| chars[k] == '}').unwrap_or(i) + 1;
                out.extend(&chars[i..end]);
                quantified = true;
                i = end;
            }
            '\\' => {
                let Some(&d) = chars.get(i + 1) else {
                    out.push('\\');
                    i += 1;
                    continue;
                };
                match d {
                    '1'..='9' => {
                        let mut j = i + 1;
                        let mut n: u32 = 0;
                        while let Some(v) = chars.get(j).and_then(|c| c.to_digit(10)) {
                            n = n.saturating_mul(10).saturating_add(v);
                            j += 1;
                        }
                        if n >= 10 && n > real(&groups) {
                            return Err(format!("octal escape \\{n} is not supported"));
                        }
                        backref(&mut out, &mut groups, Special::Backref(n));
                        i = j;
                    }
                    '0' => {
                        let mut j = i + 2;
                        let mut v: u32 = 0;
                        while j < i + 4 && chars.get(j).is_some_and(|c| ('0'..='7').contains(c)) {
                            v = v * 8 + chars[j].to_digit(8).unwrap_or(0);
                            j += 1;
                        }
                        out.push_str(&format!("\\x{v:02X}"));
                        i = j;
                    }
                    'g' => {
                        // \gN, \g-N, \g{N}, \g{-N}, \g{name}
                        let (body, j) = if chars.get(i + 2) == Some(&'{') {
                            let end = (i + 3..chars.len())
                                .find(|&k| chars[k] == '}')
                                .ok_or("unterminated \\g{")?;
                            (chars[i + 3..end].iter().collect::<String>(), end + 1)
                        } else {
                            let mut j = i + 2;
                            if chars.get(j) == Some(&'-') {
                                j += 1;
                            }
                            while chars.get(j).is_some_and(char::is_ascii_digit) {
                                j += 1;
                            }
                            (chars[i + 2..j].iter().collect::<String>(), j)
                        };
                        let s = if let Some(rel) = body.strip_prefix('-') {
                            let k: u32 = rel.parse().map_err(|_| "bad \\g reference")?;
                            let n = real(&groups) + 1;
                            if k == 0 || k >= n {
                                return Err("\\g reference to a group before the first".into());
                            }
                            Special::Backref(n - k)
                        } else if let Ok(n) = body.parse::<u32>() {
                            Special::Backref(n)
                        } else if !body.is_empty() {
                            Special::NamedBackref(body)
                        } else {
                            return Err("bad \\g reference".into());
                        };
                        backref(&mut out, &mut groups, s);
                        i = j;
                    }
                    'k' => {
                        let close = match chars.get(i + 2) {
                            Some('<') => '>',
                            Some('\'') => '\'',
                            Some('{') => '}',
                            _ => return Err("bad \\k reference".into()),
                        };
                        let (name, j) =
                            group_name(&chars, i + 3, close).ok_or("bad \\k reference")?;
                        backref(&mut out, &mut groups, Special::NamedBackref(name));
                        i = j;
                    }
                    _ => {
                        out.push('\\');
                        out.push(d);
                        i += 2;
                    }
                }
            }
            '[' => {
                let end = class_end(&chars, i);
                out.extend(&chars[i..end]);
                i = end;
            }
            '{' if !is_quantifier(&chars, i) => {
                out.push_str("\\{");
                i += 1;
            }
            '#' if extended => {
                let end = (i..chars.len())
                    .find(|&k| chars[k] == '\n')
                    .map_or(chars.len(), |k| k + 1);
                out.extend(&chars[i..end]);
                i = end;
            }
            '(' if chars.get(i + 1) == Some(&'?') => {
                let rest: String = chars[i + 2..chars.len().min(i + 5)].iter().collect();
                let look = |behind, negated| Special::Look { behind, negated };
                let special = [
                    ("=", look(false, false)),
                    ("!", look(false, true)),
                    ("<=", look(true, false)),
                    ("<!", look(true, true)),
                    (">", Special::Atomic),
                ]
                .into_iter()
                .find(|(p, _)| rest.starts_with(p));
                if let Some((p, s)) = special {
                    out.push('(');
                    groups.push(Group::Special(s));
                    i += 2 + p.len();
                } else if rest.starts_with('#') {
                    // (?#comment)
                    let end = (i..chars.len())
                        .find(|&k| chars[k] == ')')
                        .ok_or("unterminated (?# comment")?;
                    i = end + 1;
                } else if rest.starts_with("P=") {
                    let (name, j) = group_name(&chars, i + 4, ')').ok_or("bad (?P= reference")?;
                    backref(&mut out, &mut groups, Special::NamedBackref(name));
                    i = j;
                } else if let Some(close) = match chars.get(i + 2) {
                    Some('<') => Some('>'),
                    Some('\'') => Some('\''),
                    Some('P') if chars.get(i + 3) == Some(&'<') => Some('>'),
                    _ => None,
                } {
                    let at = if chars[i + 2] == 'P' { i + 4 } else { i + 3 };
                    let (name, j) = group_name(&chars, at, close).ok_or("bad group name")?;
                    groups.push(Group::Real);
                    names.push((name.clone(), real(&groups)));
                    out.push_str("(?P<");
                    out.push_str(&name);
                    out.push('>');
                    i = j;
                } else {
                    out.push_str("(?");
                    i += 2;
                }
            }
            '(' => {
                groups.push(Group::Real);
                out.push('(');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    for g in &mut groups {
        if let Group::Special(Special::NamedBackref(name)) = g {
            let n = names
                .iter()
                .find(|(k, _)| k == name)
                .map(|&(_, n)| n)
                .ok_or_else(|| format!("reference to unknown group {name}"))?;
            *g = Group::Special(Special::Backref(n));
        }
    }
    Ok(Rewritten {
        source: out,
        groups,
        possessive,
    })
}

/// A set of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn has(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] >> (b & 63) & 1 != 0
    }
    fn add(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    fn union(self, o: ByteSet) -> ByteSet {
        let mut r = self;
        for (a, b) in r.0.iter_mut().zip(o.0) {
            *a |= b;
        }
        r
    }
    fn disjoint(&self, o: &ByteSet) -> bool {
        self.0.iter().zip(o.0).all(|(a, b)| a & b == 0)
    }
    fn of_class(c: &Class) -> ByteSet {
        let mut s = ByteSet::default();
        match c {
            Class::Bytes(b) => {
                for r in b.ranges() {
                    for x in r.start()..=r.end() {
                        s.add(x);
                    }
                }
            }
            // Not produced with Unicode off; code points above 0xFF cannot be one byte.
            Class::Unicode(u) => {
                for r in u.ranges() {
                    for x in u32::from(r.start())..=u32::from(r.end()).min(0xFF) {
                        s.add(x as u8);
                    }
                }
            }
        }
        s
    }
}

/// One instruction.
#[derive(Clone, Debug)]
enum Inst {
    /// Success of the whole pattern, or of a lookaround or atomic body.
    Match,
    Lit(Box<[u8]>),
    Set(ByteSet),
    Look(Look),
    /// Try the first target, then (on backtracking) the second.
    Split(usize, usize),
    Jmp(usize),
    /// Store the position in a slot (undone on backtracking).
    Save(usize),
    /// End of a loop iteration: if the position still equals the slot (the iteration matched
    /// the empty string), leave the loop for `exit` (PCRE breaks such a loop), else go on.
    Progress {
        slot: usize,
        exit: usize,
    },
    /// Fail unless the position equals the slot (the end of a lookbehind body).
    EndAt(usize),
    Backref {
        group: usize,
        casei: bool,
    },
    /// `set{min,max}`: runs of one byte class, without a frame per byte.
    Repeat {
        set: ByteSet,
        min: u32,
        max: u32,
        greedy: bool,
        possessive: bool,
        /// The continuation must consume one of these bytes first (see `Compiler::repetition`).
        skip: Option<ByteSet>,
    },
    /// Lookaround: body at `body` (ends in `Match`), continue at `next`. A lookbehind tries
    /// body lengths `behind.0..=behind.1`, with the start position in slot `mark`.
    Assert {
        body: usize,
        next: usize,
        negated: bool,
        behind: Option<(u32, u32)>,
        mark: usize,
    },
    Atomic {
        body: usize,
        next: usize,
    },
}

/// Bytes that can start a match of `h`, and whether `h` can match the empty string; `None`
/// when unknown (assertions, backreferences).
fn first(h: &Hir, groups: &[Group]) -> Option<(ByteSet, bool)> {
    match h.kind() {
        HirKind::Empty => Some((ByteSet::default(), true)),
        HirKind::Literal(l) => {
            let mut s = ByteSet::default();
            s.add(*l.0.first()?);
            Some((s, false))
        }
        HirKind::Class(c) => Some((ByteSet::of_class(c), false)),
        HirKind::Look(_) => None,
        HirKind::Repetition(r) => {
            let (s, e) = first(&r.sub, groups)?;
            Some((s, e || r.min == 0))
        }
        HirKind::Capture(c) => match groups.get(c.index as usize - 1) {
            Some(Group::Real) | Some(Group::Special(Special::Atomic)) => first(&c.sub, groups),
            _ => None,
        },
        HirKind::Concat(xs) => {
            let mut set = ByteSet::default();
            for x in xs {
                let (s, e) = first(x, groups)?;
                set = set.union(s);
                if !e {
                    return Some((set, false));
                }
            }
            Some((set, true))
        }
        HirKind::Alternation(xs) => {
            let mut set = ByteSet::default();
            let mut empty = false;
            for x in xs {
                let (s, e) = first(x, groups)?;
                set = set.union(s);
                empty |= e;
            }
            Some((set, empty))
        }
    }
}

/// Shortest and longest match length of `h` (`None` longest: unbounded); `None` when not
/// known (a backreference).
fn span(h: &Hir, groups: &[Group]) -> Option<(u64, Option<u64>)> {
    Some(match h.kind() {
        HirKind::Empty | HirKind::Look(_) => (0, Some(0)),
        HirKind::Literal(l) => (l.0.len() as u64, Some(l.0.len() as u64)),
        HirKind::Class(_) => (1, Some(1)),
        HirKind::Repetition(r) => {
            let (lo, hi) = span(&r.sub, groups)?;
            let max = match (hi, r.max) {
                (Some(0), _) => Some(0),
                (Some(h), Some(m)) => Some(h.saturating_mul(u64::from(m))),
                _ => None,
            };
            (lo.saturating_mul(u64::from(r.min)), max)
        }
        HirKind::Capture(c) => match groups.get(c.index as usize - 1)? {
            Group::Special(Special::Look { .. }) => (0, Some(0)),
            Group::Special(Special::Backref(_) | Special::NamedBackref(_)) => return None,
            _ => span(&c.sub, groups)?,
        },
        HirKind::Concat(xs) => {
            let (mut lo, mut hi) = (0u64, Some(0u64));
            for x in xs {
                let (l, h) = span(x, groups)?;
                lo = lo.saturating_add(l);
                hi = hi.zip(h).map(|(a, b)| a.saturating_add(b));
            }
            (lo, hi)
        }
        HirKind::Alternation(xs) => {
            let (mut lo, mut hi) = (u64::MAX, Some(0u64));
            for x in xs {
                let (l, h) = span(x, groups)?;
                lo = lo.min(l);
                hi = hi.zip(h).map(|(a, b)| a.max(b));
            }
            (lo, hi)
        }
    })
}

/// The one-byte set `h` matches, if it always matches exactly one byte of a set.
fn single_byte(h: &Hir) -> Option<ByteSet> {
    match h.kind() {
        HirKind::Class(c) => Some(ByteSet::of_class(c)),
        HirKind::Literal(l) if l.0.len() == 1 => {
            let mut s = ByteSet::default();
            s.add(l.0[0]);
            Some(s)
        }
        _ => None,
    }
}

/// What may follow an expression: the bytes the rest of the pattern can consume first, and
/// whether it can succeed consuming nothing (`None`: unknown, such as an assertion, a
/// backreference or a lookbehind's end check). The end of the pattern is `(∅, true)`.
type Follow = Option<(ByteSet, bool)>;

/// The follow of the pattern's (or a lookahead or atomic body's) end.
const END: Follow = Some((ByteSet([0; 4]), true));

struct Compiler<'a> {
    insts: Vec<Inst>,
    groups: &'a [Group],
    /// PCRE group number - 1 -> regex-syntax capture index.
    real: Vec<u32>,
    slots: usize,
    /// Lookarounds and atomic groups around the expression being compiled.
    nest: u32,
}

impl Compiler<'_> {
    /// Compiles the body of a lookaround or atomic group, one level deeper.
    fn body(&mut self, h: &Hir, after: Follow) -> Result<(), String> {
        if self.nest >= MAX_NEST {
            return Err(format!(
                "lookarounds and atomic groups nested more than {MAX_NEST} deep"
            ));
        }
        self.nest += 1;
        let r = self.compile(h, after);
        self.nest -= 1;
        r
    }

    fn emit(&mut self, i: Inst) -> Result<usize, String> {
        if self.insts.len() >= MAX_INSTS {
            return Err("pattern too large for the backtracking matcher".into());
        }
        self.insts.push(i);
        Ok(self.insts.len() - 1)
    }

    fn pc(&self) -> usize {
        self.insts.len()
    }

    fn new_slot(&mut self) -> usize {
        self.slots += 1;
        self.slots - 1
    }

    /// Follow of `xs[k]` inside a concatenation followed by `after`.
    fn follow_in(&self, xs: &[Hir], k: usize, after: Follow) -> Follow {
        let mut set = ByteSet::default();
        for x in &xs[k + 1..] {
            let (s, e) = first(x, self.groups)?;
            set = set.union(s);
            if !e {
                return Some((set, false));
            }
        }
        let (a, end) = after?;
        Some((set.union(a), end))
    }

    fn compile(&mut self, h: &Hir, after: Follow) -> Result<(), String> {
        match h.kind() {
            HirKind::Empty => {}
            HirKind::Literal(l) => {
                self.emit(Inst::Lit(l.0.clone()))?;
            }
            HirKind::Class(c) => {
                self.emit(Inst::Set(ByteSet::of_class(c)))?;
            }
            HirKind::Look(l) => {
                if matches!(
                    l,
                    Look::WordUnicode
                        | Look::WordUnicodeNegate
                        | Look::WordStartUnicode
                        | Look::WordEndUnicode
                        | Look::WordStartHalfUnicode
                        | Look::WordEndHalfUnicode
                ) {
                    return Err("Unicode word boundaries are not supported".into());
                }
                self.emit(Inst::Look(*l))?;
            }
            HirKind::Repetition(r) => self.repetition(r, after)?,
            HirKind::Capture(c) => {
                let idx = c.index as usize;
                match self.groups.get(idx - 1).cloned() {
                    Some(Group::Real) => {
                        self.emit(Inst::Save(2 * idx))?;
                        self.compile(&c.sub, after)?;
                        self.emit(Inst::Save(2 * idx + 1))?;
                    }
                    Some(Group::Special(Special::Backref(n))) => {
                        let Some(&target) = self.real.get((n as usize).wrapping_sub(1)) else {
                            return Err(format!("reference to non-existent group {n}"));
                        };
                        let casei = !matches!(c.sub.kind(), HirKind::Literal(_));
                        self.emit(Inst::Backref {
                            group: target as usize,
                            casei,
                        })?;
                    }
                    Some(Group::Special(Special::Look { behind, negated })) => {
                        let lens = if behind {
                            let (lo, hi) = span(&c.sub, self.groups)
                                .ok_or("backreference in a lookbehind is not supported")?;
                            let hi = hi.ok_or("lookbehind of unbounded length")?;
                            let cap = u64::from(u16::MAX);
                            if hi > cap {
                                return Err("lookbehind longer than 65535 bytes".into());
                            }
                            Some((lo as u32, hi as u32))
                        } else {
                            None
                        };
                        let mark = if behind { self.new_slot() } else { 0 };
                        let at = self.emit(Inst::Jmp(0))?;
                        let body = self.pc();
                        // A lookahead body ends the search (any continuation is fine); a
                        // lookbehind body must end at the mark.
                        self.body(&c.sub, if behind { None } else { END })?;
                        if behind {
                            self.emit(Inst::EndAt(mark))?;
                        }
                        self.emit(Inst::Match)?;
                        let next = self.pc();
                        self.insts[at] = Inst::Assert {
                            body,
                            next,
                            negated,
                            behind: lens,
                            mark,
                        };
                    }
                    Some(Group::Special(Special::Atomic)) => {
                        let at = self.emit(Inst::Jmp(0))?;
                        let body = self.pc();
                        self.body(&c.sub, END)?;
                        self.emit(Inst::Match)?;
                        let next = self.pc();
                        self.insts[at] = Inst::Atomic { body, next };
                    }
                    _ => return Err("internal: unknown capture group".into()),
                }
            }
            HirKind::Concat(xs) => {
                for (k, x) in xs.iter().enumerate() {
                    let f = self.follow_in(xs, k, after);
                    self.compile(x, f)?;
                }
            }
            HirKind::Alternation(xs) => {
                let mut jumps = Vec::new();
                for (k, x) in xs.iter().enumerate() {
                    if k + 1 < xs.len() {
                        let split = self.emit(Inst::Split(0, 0))?;
                        self.compile(x, after)?;
                        jumps.push(self.emit(Inst::Jmp(0))?);
                        let next = self.pc();
                        self.insts[split] = Inst::Split(split + 1, next);
                    } else {
                        self.compile(x, after)?;
                    }
                }
                let end = self.pc();
                for j in jumps {
                    self.insts[j] = Inst::Jmp(end);
                }
            }
        }
        Ok(())
    }

    fn repetition(&mut self, r: &Repetition, after: Follow) -> Result<(), String> {
        if let Some(set) = single_byte(&r.sub) {
            // Auto-possessive: if nothing that can follow starts with a byte of the set, giving
            // bytes back can never let the continuation match (it would have to match empty,
            // which it then also does where the run ends). Greedy only: a lazy repetition
            // stops early where the continuation matches empty.
            let possessive = r.greedy && after.is_some_and(|(f, _)| f.disjoint(&set));
            // A continuation that must consume one of these bytes first can only start where
            // one is: the other positions are skipped when giving bytes back or taking more.
            let skip = after.and_then(|(f, end)| (!end).then_some(f));
            self.emit(Inst::Repeat {
                set,
                min: r.min,
                max: r.max.unwrap_or(u32::MAX),
                greedy: r.greedy,
                possessive,
                skip,
            })?;
            return Ok(());
        }
        // Inside the loop, the body may be followed by itself or by what follows the loop.
        let inner = match (first(&r.sub, self.groups), after) {
            (Some((s, _)), Some((a, end))) => Some((s.union(a), end)),
            _ => None,
        };
        for _ in 0..r.min {
            self.compile(&r.sub, inner)?;
        }
        let may_be_empty = span(&r.sub, self.groups).is_none_or(|(lo, _)| lo == 0);
        match r.max.map(|m| m - r.min) {
            None => {
                let split = self.emit(Inst::Split(0, 0))?;
                let mark = may_be_empty.then(|| self.new_slot());
                if let Some(m) = mark {
                    self.emit(Inst::Save(m))?;
                }
                self.compile(&r.sub, inner)?;
                let progress = mark.map(|m| self.emit(Inst::Progress { slot: m, exit: 0 }));
                self.emit(Inst::Jmp(split))?;
                let exit = self.pc();
                if let (Some(slot), Some(at)) = (mark, progress.transpose()?) {
                    self.insts[at] = Inst::Progress { slot, exit };
                }
                self.insts[split] = if r.greedy {
                    Inst::Split(split + 1, exit)
                } else {
                    Inst::Split(exit, split + 1)
                };
            }
            Some(n) => {
                let mut splits = Vec::new();
                for _ in 0..n {
                    splits.push(self.emit(Inst::Split(0, 0))?);
                    self.compile(&r.sub, inner)?;
                }
                let exit = self.pc();
                for s in splits {
                    self.insts[s] = if r.greedy {
                        Inst::Split(s + 1, exit)
                    } else {
                        Inst::Split(exit, s + 1)
                    };
                }
            }
        }
        Ok(())
    }
}

/// A compiled pattern.
#[derive(Debug)]
pub struct Regex {
    insts: Vec<Inst>,
    slots: usize,
    /// Bytes a match can start with, when known and the pattern cannot match empty.
    start: Option<ByteSet>,
    /// The pattern without what needs backtracking ([`relax`]), run by regex-automata first:
    /// where it does not match, the pattern cannot either.
    relaxed: Option<(meta::Regex, meta::Cache)>,
    scratch: Scratch,
}

/// Counted repetitions above this are loosened in [`relax`].
const RELAX_COUNT: u32 = 16;

/// `h` with every backreference replaced by "any bytes", lookarounds by the empty string and
/// atomic groups and captures by their contents: it matches wherever `h` matches (and more),
/// and regex-automata runs it in linear time.
fn relax(h: &Hir, groups: &[Group]) -> Hir {
    let relax_all = |xs: &[Hir]| xs.iter().map(|x| relax(x, groups)).collect::<Vec<_>>();
    match h.kind() {
        // Large counts (`[^']{1075,}`) are loosened to keep the automaton small: x{n,m}
        // becomes x{1,} (or x* for n = 0), which matches wherever x{n,m} does.
        HirKind::Repetition(r) => {
            let big = r.min > RELAX_COUNT || r.max.is_some_and(|m| m > RELAX_COUNT);
            Hir::repetition(Repetition {
                min: if big { r.min.min(1) } else { r.min },
                max: if big { None } else { r.max },
                greedy: r.greedy,
                sub: Box::new(relax(&r.sub, groups)),
            })
        }
        HirKind::Capture(c) => match groups.get(c.index as usize - 1) {
            Some(Group::Special(Special::Backref(_))) => Hir::repetition(Repetition {
                min: 0,
                max: None,
                greedy: true,
                sub: Box::new(Hir::class(Class::Bytes(ClassBytes::new([
                    ClassBytesRange::new(0, 255),
                ])))),
            }),
            Some(Group::Special(Special::Look { .. })) => Hir::empty(),
            _ => relax(&c.sub, groups),
        },
        HirKind::Concat(xs) => Hir::concat(relax_all(xs)),
        HirKind::Alternation(xs) => Hir::alternation(relax_all(xs)),
        _ => h.clone(),
    }
}

/// One backtracking frame (16 bytes).
#[derive(Clone, Copy, Debug)]
enum Frame {
    /// Resume at `pc`, `pos`.
    Alt { pc: u32, pos: u32 },
    /// Put `old` back into `slot`.
    Restore { slot: u32, old: u32 },
    /// A greedy repetition at `pos` may give one byte back, down to `min_pos`; resume at `pc`.
    Greedy { pc: u32, min_pos: u32, pos: u32 },
    /// A lazy repetition at `pos` may take one more byte, up to `max_pos`; resume at `pc`.
    Lazy { pc: u32, pos: u32, max_pos: u32 },
}

/// Reusable search memory.
#[derive(Debug, Default)]
struct Scratch {
    slots: Vec<u32>,
    stack: Vec<Frame>,
    /// Per `Repeat` instruction: (from, run end) of the last run computed, so that trying
    /// every start inside one long run scans it once.
    runs: Vec<(u32, u32)>,
}

const UNSET: u32 = u32::MAX;

fn word(hay: &[u8], pos: usize) -> bool {
    hay.get(pos).is_some_and(|&b| regex_syntax::is_word_byte(b))
}

fn look_at(l: Look, hay: &[u8], pos: usize) -> bool {
    let n = hay.len();
    let before = pos > 0 && word(hay, pos - 1);
    let after = word(hay, pos);
    match l {
        Look::Start => pos == 0,
        Look::End => pos == n,
        // PCRE: multi-line `^` does not match after a newline that ends the subject.
        Look::StartLF => pos == 0 || (pos < n && hay[pos - 1] == b'\n'),
        Look::EndLF => pos == n || hay[pos] == b'\n',
        Look::StartCRLF => {
            pos == 0
                || (pos < n
                    && (hay[pos - 1] == b'\n' || (hay[pos - 1] == b'\r' && hay[pos] != b'\n')))
        }
        Look::EndCRLF => {
            pos == n
                || hay[pos] == b'\r'
                || (hay[pos] == b'\n' && (pos == 0 || hay[pos - 1] != b'\r'))
        }
        Look::WordAscii => before != after,
        Look::WordAsciiNegate => before == after,
        Look::WordStartAscii => !before && after,
        Look::WordEndAscii => before && !after,
        Look::WordStartHalfAscii => !before,
        Look::WordEndHalfAscii => !after,
        _ => false,
    }
}

/// Compiles a rewritten pattern with the fast path's syntax settings.
pub fn compile(rw: &Rewritten, syn: &syntax::Config) -> Result<Regex, String> {
    if rw.possessive {
        return Err(POSSESSIVE.into());
    }
    let hir = syntax::parse_with(&rw.source, syn).map_err(|e| format!("{e}"))?;
    let real: Vec<u32> = rw
        .groups
        .iter()
        .enumerate()
        .filter(|(_, g)| **g == Group::Real)
        .map(|(k, _)| k as u32 + 1)
        .collect();
    let mut c = Compiler {
        insts: Vec::new(),
        groups: &rw.groups,
        real,
        slots: 2 * (rw.groups.len() + 1),
        nest: 0,
    };
    c.compile(&hir, END)?;
    c.emit(Inst::Match)?;
    let start = match first(&hir, &rw.groups) {
        Some((s, false)) => Some(s),
        _ => None,
    };
    let runs = alloc::vec![(UNSET, UNSET); c.insts.len()];
    // Same engine settings as the fast path's (matcher.rs): bounded lazy-DFA cache, no
    // captures. A pattern too large for it just goes without this prefilter.
    let relaxed = meta::Regex::builder()
        .configure(
            meta::Regex::config()
                .utf8_empty(false)
                .onepass(false)
                .hybrid_cache_capacity(64 * 1024)
                .which_captures(WhichCaptures::Implicit)
                .auto_prefilter(false),
        )
        .build_from_hir(&relax(&hir, &rw.groups))
        .ok()
        .map(|re| {
            let cache = re.create_cache();
            (re, cache)
        });
    Ok(Regex {
        slots: c.slots,
        insts: c.insts,
        start,
        relaxed,
        scratch: Scratch {
            slots: alloc::vec![UNSET; c.slots],
            stack: Vec::new(),
            runs,
        },
    })
}

/// One search over a haystack.
struct Vm<'a> {
    insts: &'a [Inst],
    hay: &'a [u8],
    s: &'a mut Scratch,
    budget: &'a mut u64,
}

impl Vm<'_> {
    fn tick(&mut self, n: u64) -> Result<(), Exceeded> {
        match self.budget.checked_sub(n) {
            Some(left) => {
                *self.budget = left;
                Ok(())
            }
            None => {
                *self.budget = 0;
                Err(Exceeded)
            }
        }
    }

    fn push(&mut self, f: Frame) -> Result<(), Exceeded> {
        if self.s.stack.len() >= MAX_FRAMES {
            return Err(Exceeded);
        }
        self.s.stack.push(f);
        Ok(())
    }

    fn set_slot(&mut self, slot: usize, pos: usize) -> Result<(), Exceeded> {
        let old = self.s.slots[slot];
        self.push(Frame::Restore {
            slot: slot as u32,
            old,
        })?;
        self.s.slots[slot] = pos as u32;
        Ok(())
    }

    /// End of the run of `set` bytes starting at `pos` (not capped by any maximum).
    fn run_end(&mut self, pc: usize, set: &ByteSet, pos: usize) -> Result<usize, Exceeded> {
        let (from, end) = self.s.runs[pc];
        if from != UNSET && from as usize <= pos && pos <= end as usize {
            self.tick(1)?;
            return Ok(end as usize);
        }
        let mut e = pos;
        while e < self.hay.len() && set.has(self.hay[e]) {
            e += 1;
        }
        self.tick((e - pos) as u64 / SCAN + 1)?;
        self.s.runs[pc] = (pos as u32, e as u32);
        Ok(e)
    }

    /// Drops the choice points above `base`, keeping the capture undo records (a successful
    /// atomic body or positive lookaround is never re-entered, but its captures stay undoable).
    fn cut(&mut self, base: usize) {
        let mut w = base;
        for r in base..self.s.stack.len() {
            if let f @ Frame::Restore { .. } = self.s.stack[r] {
                self.s.stack[w] = f;
                w += 1;
            }
        }
        self.s.stack.truncate(w);
    }

    /// Undoes everything above `base` (a negative lookaround whose body matched).
    fn unwind(&mut self, base: usize) {
        while self.s.stack.len() > base {
            if let Some(Frame::Restore { slot, old }) = self.s.stack.pop() {
                self.s.slots[slot as usize] = old;
            }
        }
    }

    /// Runs from `pc` at `pos` until a `Match` (the end position) or until every choice made
    /// since the call is exhausted (`None`, with the stack back where it was).
    fn run(&mut self, mut pc: usize, mut pos: usize) -> Result<Option<usize>, Exceeded> {
        let base = self.s.stack.len();
        let (hay, insts) = (self.hay, self.insts);
        let n = hay.len();
        loop {
            self.tick(1)?;
            let ok = match &insts[pc] {
                Inst::Match => return Ok(Some(pos)),
                Inst::Lit(l) => {
                    let ok = hay.get(pos..).is_some_and(|h| h.starts_with(l));
                    if ok {
                        pos += l.len();
                        pc += 1;
                    }
                    ok
                }
                Inst::Set(set) => {
                    let ok = pos < n && set.has(hay[pos]);
                    if ok {
                        pos += 1;
                        pc += 1;
                    }
                    ok
                }
                Inst::Look(l) => {
                    let ok = look_at(*l, hay, pos);
                    pc += 1;
                    ok
                }
                &Inst::Split(a, b) => {
                    self.push(Frame::Alt {
                        pc: b as u32,
                        pos: pos as u32,
                    })?;
                    pc = a;
                    true
                }
                &Inst::Jmp(a) => {
                    pc = a;
                    true
                }
                &Inst::Save(slot) => {
                    self.set_slot(slot, pos)?;
                    pc += 1;
                    true
                }
                &Inst::Progress { slot, exit } => {
                    pc = if self.s.slots[slot] == pos as u32 {
                        exit
                    } else {
                        pc + 1
                    };
                    true
                }
                &Inst::EndAt(slot) => {
                    pc += 1;
                    self.s.slots[slot] == pos as u32
                }
                &Inst::Backref { group, casei } => {
                    let (a, b) = (self.s.slots[2 * group], self.s.slots[2 * group + 1]);
                    if a == UNSET || b == UNSET || a > b {
                        false
                    } else {
                        let (a, b) = (a as usize, b as usize);
                        let len = b - a;
                        self.tick(len as u64 / SCAN)?;
                        let ok = match hay.get(pos..pos + len) {
                            Some(h) if casei => h.eq_ignore_ascii_case(&hay[a..b]),
                            Some(h) => h == &hay[a..b],
                            None => false,
                        };
                        pos += len;
                        pc += 1;
                        ok
                    }
                }
                &Inst::Repeat {
                    ref set,
                    min,
                    max,
                    greedy,
                    possessive,
                    ..
                } => {
                    let set = *set;
                    let avail = self.run_end(pc, &set, pos)? - pos;
                    let (min, max) = (min as usize, max as usize);
                    if avail < min {
                        false
                    } else {
                        let hi = pos + avail.min(max);
                        let lo = pos + min;
                        if possessive {
                            pos = hi;
                        } else if greedy {
                            if hi > lo {
                                self.push(Frame::Greedy {
                                    pc: pc as u32 + 1,
                                    min_pos: lo as u32,
                                    pos: hi as u32,
                                })?;
                            }
                            pos = hi;
                        } else {
                            if hi > lo {
                                self.push(Frame::Lazy {
                                    pc: pc as u32 + 1,
                                    pos: lo as u32,
                                    max_pos: hi as u32,
                                })?;
                            }
                            pos = lo;
                        }
                        pc += 1;
                        true
                    }
                }
                &Inst::Assert {
                    body,
                    next,
                    negated,
                    behind,
                    mark,
                } => {
                    let sub = self.s.stack.len();
                    let found = match behind {
                        None => self.run(body, pos)?.is_some(),
                        Some((lo, hi)) => {
                            let saved = self.s.slots[mark];
                            self.s.slots[mark] = pos as u32;
                            let mut found = false;
                            for len in lo as usize..=(hi as usize).min(pos) {
                                if self.run(body, pos - len)?.is_some() {
                                    found = true;
                                    break;
                                }
                            }
                            self.s.slots[mark] = saved;
                            found
                        }
                    };
                    if found && negated {
                        self.unwind(sub);
                    } else if found {
                        self.cut(sub);
                    }
                    pc = next;
                    found != negated
                }
                &Inst::Atomic { body, next } => {
                    let sub = self.s.stack.len();
                    match self.run(body, pos)? {
                        Some(end) => {
                            self.cut(sub);
                            pos = end;
                            pc = next;
                            true
                        }
                        None => false,
                    }
                }
            };
            if ok {
                continue;
            }
            // Backtrack.
            loop {
                if self.s.stack.len() <= base {
                    return Ok(None);
                }
                self.tick(1)?;
                match self.s.stack.pop() {
                    Some(Frame::Alt { pc: p, pos: q }) => {
                        (pc, pos) = (p as usize, q as usize);
                        break;
                    }
                    Some(Frame::Restore { slot, old }) => self.s.slots[slot as usize] = old,
                    Some(Frame::Greedy {
                        pc: p,
                        min_pos,
                        pos: q,
                    }) => {
                        let (p, min_pos) = (p as usize, min_pos as usize);
                        let mut q = q as usize - 1;
                        if let Inst::Repeat { skip: Some(f), .. } = &insts[p - 1] {
                            let top = q;
                            while q > min_pos && !(q < n && f.has(hay[q])) {
                                q -= 1;
                            }
                            self.tick((top - q) as u64 / SCAN)?;
                            if !(q < n && f.has(hay[q])) {
                                continue;
                            }
                        }
                        if q > min_pos {
                            self.s.stack.push(Frame::Greedy {
                                pc: p as u32,
                                min_pos: min_pos as u32,
                                pos: q as u32,
                            });
                        }
                        (pc, pos) = (p, q);
                        break;
                    }
                    Some(Frame::Lazy {
                        pc: p,
                        pos: q,
                        max_pos,
                    }) => {
                        let (p, max_pos) = (p as usize, max_pos as usize);
                        let mut q = q as usize + 1;
                        if let Inst::Repeat { skip: Some(f), .. } = &insts[p - 1] {
                            let bottom = q;
                            while q < max_pos && !(q < n && f.has(hay[q])) {
                                q += 1;
                            }
                            self.tick((q - bottom) as u64 / SCAN)?;
                            if !(q < n && f.has(hay[q])) {
                                continue;
                            }
                        }
                        if q < max_pos {
                            self.s.stack.push(Frame::Lazy {
                                pc: p as u32,
                                pos: q as u32,
                                max_pos: max_pos as u32,
                            });
                        }
                        (pc, pos) = (p, q);
                        break;
                    }
                    None => return Ok(None),
                }
            }
        }
    }
}

impl Regex {
    /// Leftmost match starting at or after `from` (only at `from` with `anchored`): (start,
    /// end). Spends steps from `budget`; `Err` when it runs out (or the stack is full).
    pub fn find(
        &mut self,
        hay: &[u8],
        from: usize,
        anchored: bool,
        budget: &mut u64,
    ) -> Result<Option<(usize, usize)>, Exceeded> {
        if hay.len() >= UNSET as usize {
            return Err(Exceeded);
        }
        let mut start = from;
        if let Some((re, cache)) = &mut self.relaxed {
            // One linear pass, charged as scanned bytes: most subjects end here.
            let n = hay.len().saturating_sub(from) as u64;
            *budget = budget.checked_sub(n / SCAN).ok_or(Exceeded)?;
            let how = if anchored {
                Anchored::Yes
            } else {
                Anchored::No
            };
            // The pattern's matches are among the relaxed one's, so none starts before the
            // leftmost relaxed match.
            let input = Input::new(hay).range(from..).anchored(how);
            match re.search_with(cache, &input) {
                None => return Ok(None),
                Some(m) => start = m.start(),
            }
        }
        for r in &mut self.scratch.runs {
            *r = (UNSET, UNSET);
        }
        let mut vm = Vm {
            insts: &self.insts,
            hay,
            s: &mut self.scratch,
            budget,
        };
        let mut result = Ok(None);
        while start <= hay.len() {
            if let Some(set) = &self.start {
                if !anchored {
                    match hay[start..].iter().position(|&b| set.has(b)) {
                        Some(k) => start += k,
                        None => break,
                    }
                } else if !hay.get(start).is_some_and(|&b| set.has(b)) {
                    break;
                }
            }
            if let Err(e) = vm.tick(1) {
                result = Err(e);
                break;
            }
            match vm.run(0, start) {
                Ok(Some(end)) => {
                    result = Ok(Some((start, end)));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if anchored {
                break;
            }
            start += 1;
        }
        // Leave the scratch clean (and small) for the next search.
        let s = &mut self.scratch;
        s.stack.clear();
        if s.stack.capacity() > 1024 {
            s.stack.shrink_to(1024);
        }
        for v in &mut s.slots {
            *v = UNSET;
        }
        result
    }

    /// Heap bytes (program and scratch).
    pub fn memory_usage(&self) -> usize {
        self.insts.len() * core::mem::size_of::<Inst>()
            + self
                .insts
                .iter()
                .map(|i| match i {
                    Inst::Lit(l) => l.len(),
                    _ => 0,
                })
                .sum::<usize>()
            + self.slots * 4
            + self.scratch.stack.capacity() * core::mem::size_of::<Frame>()
            + self.scratch.runs.len() * 8
            + self
                .relaxed
                .as_ref()
                .map_or(0, |(re, c)| re.memory_usage() + c.memory_usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::matcher::{Memo, Program};
    use crate::engine::rules::parse_rule;
    use crate::engine::vars::Vars;
    use alloc::vec;

    /// The fast path's syntax settings for `flags` (see matcher::pcre_source).
    fn syn(flags: &str) -> syntax::Config {
        syntax::Config::new()
            .unicode(false)
            .utf8(false)
            .case_insensitive(flags.contains('i'))
            .multi_line(flags.contains('m'))
            .dot_matches_new_line(flags.contains('s'))
            .ignore_whitespace(flags.contains('x'))
    }

    fn re(pat: &str, flags: &str) -> Regex {
        let rw = rewrite(pat, flags.contains('x')).unwrap();
        compile(&rw, &syn(flags)).unwrap_or_else(|e| panic!("{pat}: {e}"))
    }

    fn find(pat: &str, flags: &str, hay: &[u8]) -> Option<(usize, usize)> {
        let mut budget = STEP_LIMIT;
        re(pat, flags).find(hay, 0, false, &mut budget).unwrap()
    }

    #[test]
    fn backreferences_on_bytes() {
        assert_eq!(find(r"(\w+) \1", "", b"hello hello"), Some((0, 11)));
        assert_eq!(find(r"(\w+) \1", "", b"hello world"), None);
        // Backtracking into the group: `aaa` then `aa` fail, a later start succeeds.
        assert_eq!(find(r"(a+)b\1", "", b"aaabaa"), Some((1, 6)));
        // Non-UTF-8 bytes, in the group and around it.
        let pat = r"(\xff\xfe+)x\1";
        assert_eq!(
            find(pat, "", b"\x00\xff\xfe\xfex\xff\xfe\xfe\x80"),
            Some((1, 8))
        );
        assert_eq!(find(pat, "", b"\x00\xff\xfe\xfex\xff\xfe\xfd"), None);
        assert_eq!(find(r"(.)\1", "s", b"a\x80\x80"), Some((1, 3)));
        assert_eq!(find(r"(.)\1", "s", b"\x80\x81"), None);
        // Other spellings, and a group that did not take part fails its reference.
        assert_eq!(find(r"(a)(b)\g{-1}\g1", "", b"abba"), Some((0, 4)));
        assert_eq!(find(r"(?P<q>['])x(?P=q)\k<q>", "", b"'x''"), Some((0, 4)));
        assert_eq!(find(r"(?:(a)|b)\1", "", b"bb"), None);
        assert_eq!(find(r"(?:(a)|b)c\1", "", b"bcaca"), Some((2, 5)));
    }

    #[test]
    fn case_insensitive_backreferences() {
        assert_eq!(find(r"(abc)\1", "i", b"xabcABC"), Some((1, 7)));
        assert_eq!(find(r"(abc)\1", "", b"xabcABC"), None);
        assert_eq!(find(r"(abc)(?i)\1", "", b"abcAbC"), Some((0, 6)));
        // ASCII folding only: 0xC0 and 0xE0 are not a case pair in the C locale.
        assert_eq!(find(r"(\xc0)\1", "i", b"\xc0\xe0"), None);
    }

    #[test]
    fn lookaround_and_atomic_groups() {
        assert_eq!(find(r"a(?=b)", "", b"acab"), Some((2, 3)));
        assert_eq!(find(r"a(?!b)", "", b"abac"), Some((2, 3)));
        assert_eq!(find(r"(?<=ab)c", "", b"acbcabc"), Some((6, 7)));
        assert_eq!(find(r"(?<!a)b", "", b"abcb"), Some((3, 4)));
        assert_eq!(find(r"(?<=a|bc)d", "", b"xdbcd"), Some((4, 5)));
        // Captures made in a positive lookahead stay set.
        assert_eq!(find(r"(?=(\w+))\1!", "", b"ab ab!"), Some((3, 6)));
        // Atomic: `a+` keeps every `a`, so `ab` cannot follow.
        assert_eq!(find(r"(?>a+)ab", "", b"aaab"), None);
        assert_eq!(find(r"(?:a+)ab", "", b"aaab"), Some((0, 4)));
        // A `{` that starts no quantifier is literal (PCRE), sid 1930's pattern.
        let imap = r"({(?=\d+}[^\n]*?\sAUTH)|AUTH\s[^\n]*?{(?=\d+}))";
        assert_eq!(find(imap, "ims", b"a1 auth {300}\r\n"), Some((3, 9)));
        assert_eq!(find(imap, "ims", b"a1 auth {x300}\r\n"), None);
    }

    #[test]
    fn refused_constructs() {
        let deep = "(?=".repeat(9) + "a" + &")".repeat(9);
        assert!(compile(&rewrite(&deep[3..deep.len() - 1], false).unwrap(), &syn("")).is_ok());
        for pat in [
            &deep,
            r"(?<=a+)b",
            r"(?<=\1)b(a)",
            r"(a)\2",
            r"a++",
            r"(?1)(a)",
            r"\k<nope>(a)",
        ] {
            let r = rewrite(pat, false).and_then(|rw| compile(&rw, &syn("")).map(|_| ()));
            assert!(r.is_err(), "{pat}");
        }
    }

    /// The two Oracle patterns of the community ruleset (sids 2576 and 2599 and ~230 like them).
    #[test]
    fn community_oracle_patterns() {
        let sid2576 = r"((\w+)[\r\n\s]*\x3a=[\r\n\s]*(\x27[^\x27]{1024,}\x27|\x22[^\x22]{1024,}\x22)[\r\n\s]*\x3b.*package_prefix[\r\n\s]*=>[\r\n\s]*\2|package_prefix\s*=>\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|(\w+)[\r\n\s]*\x3a=[\r\n\s]*(\x27[^\x27]{1024,}\x27|\x22[^\x22]{1024,}\x22)[\r\n\s]*\x3b.*procedure_prefix[\r\n\s]*=>[\r\n\s]*\2|procedure_prefix\s*=>\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|\(\s*((\x27[^\x27]*\x27|\x22[^\x22]+\x22)\s*,\s*){3}(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|\(\s*((\x27[^\x27]*\x27|\x22[^\x22]+\x22)\s*,\s*){4}(\x27[^\x27]{1024,}|\x22[^\x22]{1024,}))";
        let sid2599 = r"((\w+)[\r\n\s]*\x3a=[\r\n\s]*(\x27[^\x27]{1024,}\x27|\x22[^\x22]{1024,}\x22)[\r\n\s]*\x3b.*sname[\r\n\s]*=>[\r\n\s]*\2|sname\s*=>\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|(\w+)[\r\n\s]*\x3a=[\r\n\s]*(\x27[^\x27]{1024,}\x27|\x22[^\x22]{1024,}\x22)[\r\n\s]*\x3b.*oname[\r\n\s]*=>[\r\n\s]*\2|oname\s*=>\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|\(\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,})|\(\s*(\x27[^\x27]*\x27|\x22[^\x22]+\x22)\s*,\s*(\x27[^\x27]{1024,}|\x22[^\x22]{1024,}))";
        let long = "A".repeat(1100);
        let attack = |var: &str, key: &str, arg: &str| {
            format!("DECLARE {var} VARCHAR2(2000);\nBEGIN\n {var} := '{long}';\n dbms_repcat.x(\n{key}\t=> {arg});\nEND;")
        };
        // The long string is passed through a variable: only the backreference sees it.
        let hit = attack("buf", "PACKAGE_PREFIX", "buf");
        let (s, e) = find(sid2576, "is", hit.as_bytes()).unwrap();
        assert!(hit[s..e].starts_with("buf := '") && hit[s..e].ends_with("=> buf"));
        assert_eq!(
            find(
                sid2576,
                "is",
                attack("buf", "package_prefix", "bug").as_bytes()
            ),
            None
        );
        // Short string: not an overflow.
        let short = hit.replace(&long, "x");
        assert_eq!(find(sid2576, "is", short.as_bytes()), None);
        // 62 KB of other text between the two halves: still decided within the bound.
        let filler = "select * from dual where x = 1;\n".repeat(2000);
        let far = hit.replace(" dbms_repcat", &(filler.clone() + " dbms_repcat"));
        assert_eq!(far.len(), hit.len() + filler.len());
        let mut budget = STEP_LIMIT;
        let mut r = re(sid2576, "is");
        assert!(r
            .find(far.as_bytes(), 0, false, &mut budget)
            .unwrap()
            .is_some());
        assert!(budget > STEP_LIMIT / 2, "{budget}");
        // Ordinary text costs only the linear prefilter pass.
        let mut budget = STEP_LIMIT;
        let text = filler.as_bytes();
        assert_eq!(r.find(text, 0, false, &mut budget), Ok(None));
        assert_eq!(STEP_LIMIT - budget, text.len() as u64 / SCAN);
        assert!(find(sid2599, "is", attack("v1", "sname", "V1").as_bytes()).is_some());
        assert_eq!(
            find(sid2599, "is", attack("v1", "sname", "v2").as_bytes()),
            None
        );
        // Its `oname` branch refers to group 2, which only the `sname` branch sets: in PCRE a
        // reference to a group that did not take part fails, so that branch never matches.
        assert_eq!(
            find(sid2599, "is", attack("v1", "oname", "v1").as_bytes()),
            None
        );
    }

    /// Catastrophic backtracking stops at the step bound.
    #[test]
    fn catastrophic_pattern_is_bounded() {
        let mut r = re(r"(a+)+\1b", "");
        // The trailing `cb` passes the relaxed prefilter (`a+.*b`), not the pattern.
        let mut hay = vec![b'a'; 65536];
        hay.extend_from_slice(b"cb");
        let mut budget = STEP_LIMIT;
        assert_eq!(r.find(&hay, 0, false, &mut budget), Err(Exceeded));
        assert_eq!(budget, 0);
        // The same pattern decides quickly on a short subject, and the scratch is reusable.
        let mut budget = STEP_LIMIT;
        assert_eq!(r.find(b"aaab", 0, false, &mut budget), Ok(Some((0, 4))));
        let mut budget = STEP_LIMIT;
        assert_eq!(r.find(b"aaaaaaaa", 0, false, &mut budget), Ok(None));
        assert!(budget > 0);
        // Loops of possibly-empty bodies end after an empty iteration, which keeps its
        // captures (PCRE): here group 1 ends up empty.
        assert_eq!(find(r"(a*)*\1b", "", b"aab"), Some((0, 3)));
        assert_eq!(find(r"(?:(a|)*)*\1c", "", b"aab"), None);
    }

    /// Differential test against regex-automata (leftmost-first, as PCRE) on random patterns
    /// without backreferences: the compiler, the machine and auto-possessification agree.
    #[test]
    fn agrees_with_regex_automata() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        fn gen(rnd: &mut dyn FnMut(u64) -> u64, depth: u32) -> String {
            let atom = |rnd: &mut dyn FnMut(u64) -> u64| -> String {
                ["a", "b", "c", "[ab]", "[^a]", ".", "ab", r"\w", "[bc]"][rnd(9) as usize].into()
            };
            let mut s = String::new();
            for _ in 0..1 + rnd(3) {
                let mut a = if depth > 0 && rnd(3) == 0 {
                    let mut g = gen(rnd, depth - 1);
                    if rnd(2) == 0 {
                        g.push('|');
                        g.push_str(&gen(rnd, depth - 1));
                    }
                    format!("({g})")
                } else {
                    atom(rnd)
                };
                a.push_str(
                    [
                        "", "", "*", "+", "?", "{1,2}", "{2}", "*?", "+?", "??", "{0,3}?",
                    ][rnd(11) as usize],
                );
                s.push_str(&a);
            }
            s
        }
        // Loops whose body can match empty differ by design: PCRE (and this matcher) end the
        // loop after an empty iteration, finite automata skip that iteration.
        fn empty_loop(h: &Hir) -> bool {
            match h.kind() {
                HirKind::Repetition(r) => {
                    (r.max != Some(1) && r.sub.properties().minimum_len() == Some(0))
                        || empty_loop(&r.sub)
                }
                HirKind::Capture(c) => empty_loop(&c.sub),
                HirKind::Concat(xs) | HirKind::Alternation(xs) => xs.iter().any(empty_loop),
                _ => false,
            }
        }
        let (mut checked, mut exceeded) = (0, 0);
        while checked < 16_000 {
            let pat = gen(&mut rnd, 2);
            if empty_loop(&syntax::parse_with(&pat, &syn("")).unwrap()) {
                continue;
            }
            let fast = regex_automata::meta::Regex::builder()
                .syntax(syn(""))
                .build(&pat)
                .unwrap();
            let mut slow = re(&pat, "");
            for _ in 0..8 {
                let hay: Vec<u8> = (0..rnd(10)).map(|_| b"abcx"[rnd(4) as usize]).collect();
                let want = fast.find(&hay[..]).map(|m| (m.start(), m.end()));
                let mut budget = STEP_LIMIT;
                // Nested ambiguous loops can be exponential even on 9 bytes: such searches stop
                // at the bound, and are rare here.
                let Ok(got) = slow.find(&hay, 0, false, &mut budget) else {
                    exceeded += 1;
                    continue;
                };
                assert_eq!(got, want, "{pat} on {:?}", String::from_utf8_lossy(&hay));
                checked += 1;
            }
        }
        assert!(exceeded < checked / 100, "{exceeded} of {checked} exceeded");
    }

    fn program(rule: &str) -> Program {
        let r = parse_rule(rule, &Vars::new()).unwrap_or_else(|e| panic!("{rule}: {e}"));
        Program::new(&r).unwrap()
    }

    /// `R`: the subject starts at the cursor (so `^` anchors there) and a match moves it.
    #[test]
    fn relative_through_the_matcher() {
        let mut memo = Memo::default();
        let mut p = program(
            r#"alert tcp any any -> any any (content:"id="; pcre:"/^(\w)\1/R"; content:"!",within 1; sid:1;)"#,
        );
        assert!(p.matches(b"xx id=aa!", &mut memo));
        assert!(!p.matches(b"xx id=ab!", &mut memo));
        assert!(!p.matches(b"aa id=x aa!", &mut memo));
        // The second `id=` is tried when the first one's pcre fails.
        assert!(p.matches(b"id=ab id=bb!", &mut memo));
        assert!(!p.matches(b"id=aa?", &mut memo));
        // sid 1930: the pcre ends after `{`, where byte_test reads the literal's length.
        let mut imap = program(
            r#"alert tcp any any -> any 143 (content:"AUTH",fast_pattern,nocase; pcre:"/({(?=\d+}[^\n]*?\sAUTH)|AUTH\s[^\n]*?{(?=\d+}))/ims"; byte_test:5,>,256,0,relative,string,dec; sid:1930;)"#,
        );
        assert!(!imap.matches(b"A1 AUTHENTICATE {999}\r\n", &mut memo));
        assert!(imap.matches(b"A1 AUTH {999}\r\n", &mut memo));
        assert!(!imap.matches(b"A1 AUTH {99}\r\n", &mut memo));
        assert!(imap.matches(b"A1 {300} x AUTH\r\n", &mut memo));
        assert_eq!(imap.pcre_limit_hits(), 0);
    }

    /// Running out of steps: a `drop` rule matches (fails closed), an `alert` rule does not,
    /// and both count it.
    #[test]
    fn exhaustion_policy_by_action() {
        let mut memo = Memo::default();
        let opts = r#"(content:"aaaa"; pcre:"/(a+)+\1b/"; sid:1;)"#;
        let mut alert = program(&(String::from("alert tcp any any -> any any ") + opts));
        let mut drop = program(&(String::from("drop tcp any any -> any any ") + opts));
        let mut neg =
            program(r#"alert tcp any any -> any any (content:"aaaa"; pcre:!"/(a+)+\1b/"; sid:1;)"#);
        let mut evil = vec![b'a'; 4096];
        evil.extend_from_slice(b"cb");
        assert!(!alert.matches(&evil, &mut memo));
        assert!(drop.matches(&evil, &mut memo));
        // Not "pcre not found, so the negation holds": the action decides.
        assert!(!neg.matches(&evil, &mut memo));
        assert_eq!(
            (
                alert.pcre_limit_hits(),
                drop.pcre_limit_hits(),
                neg.pcre_limit_hits()
            ),
            (1, 1, 1)
        );
        // A decidable payload is judged on its content and not counted.
        assert!(alert.matches(b"aaaaab", &mut memo));
        assert!(drop.matches(b"aaaaab", &mut memo));
        assert!(!drop.matches(b"aaaa", &mut memo));
        assert!(neg.matches(b"aaaa", &mut memo));
        assert_eq!(drop.pcre_limit_hits(), 1);
        assert!(format!("{drop:?}").contains("Backtrack"));
    }
}

/// Cost of a search that runs out of steps (timing: `cargo test --release -p ally-dpi --lib
/// cost_at_the_bound -- --ignored --nocapture`).
#[cfg(test)]
mod cost {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn cost_at_the_bound() {
        let syn = syntax::Config::new()
            .unicode(false)
            .utf8(false)
            .case_insensitive(true)
            .dot_matches_new_line(true);
        let oracle = r"((\w+)[\r\n\s]*\x3a=[\r\n\s]*(\x27[^\x27]{1075,}\x27|\x22[^\x22]{1075,}\x22)[\r\n\s]*\x3b.*gname[\r\n\s]*=>[\r\n\s]*\2|gname\s*=>\s*(\x27[^\x27]{1075,}|\x22[^\x22]{1075,})|\(\s*(\x27[^\x27]{1075,}|\x22[^\x22]{1075,}))";
        let text: alloc::vec::Vec<u8> = (0..65536u32)
            .map(|i| b"lorem ipsum dolor sit amet, \r\n"[i as usize % 30])
            .collect();
        let mut crafted = alloc::vec![b'a'; 30_000];
        crafted.extend_from_slice(b":='");
        crafted.extend(core::iter::repeat_n(b'x', 1100));
        crafted.extend_from_slice(b"';");
        crafted.extend(core::iter::repeat_n(b'y', 30_000));
        crafted.extend_from_slice(b" gname => zz");
        // A real attack (the long string passed through a variable) in a 64 KiB window.
        let mut real = b"buf := '".to_vec();
        real.extend(core::iter::repeat_n(b'x', 1100));
        real.extend_from_slice(b"';\n");
        real.extend(text[..62_000].iter());
        real.extend_from_slice(b"\ndbms_repcat.x(gname => buf);");
        let mut a64 = alloc::vec![b'a'; 65536];
        a64.extend_from_slice(b"cb");
        let cases: [(&str, &[u8]); 6] = [
            (r"(a+)+\1b", &a64),
            (r"(a+)+\1b", &a64[65536 - 1500..]),
            (r"(a+)+\1b", &[b'a'; 65536]),
            (oracle, &crafted),
            (oracle, &text),
            (oracle, &real),
        ];
        for (pat, hay) in cases {
            let rw = rewrite(pat, false).unwrap();
            let mut re = compile(&rw, &syn).unwrap();
            let runs = 20;
            let t = Instant::now();
            let mut out = Ok(None);
            let mut used = 0;
            for _ in 0..runs {
                let mut budget = STEP_LIMIT;
                out = re.find(hay, 0, false, &mut budget);
                used = STEP_LIMIT - budget;
            }
            let per = t.elapsed() / runs;
            std::println!(
                "{:.20}… on {} bytes: {out:?}, {used} steps, {per:?} per search, {:.1} ns/step",
                pat,
                hay.len(),
                per.as_nanos() as f64 / used.max(1) as f64
            );
        }
    }
}
