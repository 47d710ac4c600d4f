//! Multi-literal prefilters: report every distinct literal that occurs in a buffer.
//!
//! [`Prefilter`] (used by the engine) works in blocks of 64 positions. First, without a
//! branch, each position's bigram (the byte there and the next) is looked up in a 32 KiB table
//! of four flags per bigram: it occurs at offset 0, 1 or 2 of a literal of >= 4 bytes, or it
//! starts a 2–3-byte literal (every case variant of `nocase` literals). Word operations over
//! eight positions at a time then keep the positions whose three consecutive bigrams chain (a
//! literal of >= 4 bytes can start there: its first four bytes are plausible) or that start a
//! short literal. Branches are only taken per candidate, not per byte: a branch per byte
//! mispredicted on every few percent of positions that passed (measured with cachegrind's
//! branch simulation, 217 M mispredicts of the scans became 142 M). A candidate's window is
//! ASCII-case-folded with a few word operations, hashed into a small bitmap of the folded
//! 4-byte prefixes of literals of 4 bytes or more, and looked up directly in a bitmap of the
//! folded 2-byte prefixes of 2–3-byte literals. Only a set bit leads to the literals of that
//! bucket, told apart by one compare of their first eight bytes (many share a 4-byte prefix:
//! `/cgi`, `User`, `Cont`), then a byte-for-byte check of the rest (exact case for
//! case-sensitive literals), so the reported set is exact. 1-byte literals are searched with
//! memchr. The tables are a few KiB to 70 KiB per group and stay in L1/L2, which is what makes
//! this faster than one large automaton.
//!
//! [`AcPrefilter`] is the same contract on one Aho-Corasick automaton (aho-corasick crate,
//! overlapping search): the reference the tests cross-check against, and the benchmark baseline.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind, StartKind};

/// Epoch-stamped "seen" marks: clearing is O(1) per scan.
#[derive(Debug, Default)]
pub struct Marks {
    stamp: Vec<u32>,
    epoch: u32,
}

impl Marks {
    /// Starts a new scan over ids `0..n`.
    pub fn begin(&mut self, n: usize) {
        if self.stamp.len() < n {
            self.stamp.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.epoch = 1;
        }
    }

    /// Marks `i`; true the first time in this scan.
    #[inline]
    pub fn first(&mut self, i: usize) -> bool {
        match self.stamp.get_mut(i) {
            Some(s) if *s != self.epoch => {
                *s = self.epoch;
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Lit {
    bytes: Box<[u8]>,
    nocase: bool,
    /// The first eight bytes (fewer if shorter; lowered for `nocase`), little-endian, and the
    /// mask of the bytes it has: bucket neighbours (often literals with one 4-byte prefix,
    /// such as `/cgi-bin/...`) are told apart by one compare before any byte loop.
    head: u64,
    head_mask: u64,
}

/// A compiled literal set on Aho-Corasick.
#[derive(Debug)]
pub struct AcPrefilter {
    ac: Option<AhoCorasick>,
    lits: Vec<Lit>,
    /// Automaton pattern id → literal ids sharing its case-folded bytes.
    pat_lits: Vec<Vec<u32>>,
}

/// The literals as both prefilters store them: nocase ones lowered, none empty.
fn normalized_literals(literals: &[(Vec<u8>, bool)]) -> Result<Vec<Lit>, String> {
    let lits: Vec<Lit> = literals
        .iter()
        .map(|(b, nc)| {
            let bytes: Box<[u8]> = if *nc {
                b.to_ascii_lowercase().into()
            } else {
                b.clone().into()
            };
            let head_mask = match bytes.len() {
                n @ 0..8 => (1u64 << (8 * n)) - 1,
                _ => u64::MAX,
            };
            Lit {
                head: word8(&bytes),
                head_mask,
                bytes,
                nocase: *nc,
            }
        })
        .collect();
    if lits.iter().any(|l| l.bytes.is_empty()) {
        return Err(String::from("prefilter: empty literal"));
    }
    Ok(lits)
}

impl AcPrefilter {
    /// Builds the prefilter. Literal `i` of the input keeps id `i`; identical (bytes, nocase)
    /// pairs are fine (each id is reported).
    pub fn new(literals: &[(Vec<u8>, bool)]) -> Result<AcPrefilter, String> {
        let lits = normalized_literals(literals)?;
        // Identical case-folded literals share one automaton pattern.
        let mut uniq: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        let mut pat_lits: Vec<Vec<u32>> = Vec::new();
        for (i, l) in lits.iter().enumerate() {
            let n = uniq.len();
            let p = *uniq.entry(l.bytes.to_ascii_lowercase()).or_insert(n);
            if p == pat_lits.len() {
                pat_lits.push(Vec::new());
            }
            pat_lits[p].push(i as u32);
        }
        if uniq.is_empty() {
            return Ok(AcPrefilter {
                ac: None,
                lits,
                pat_lits,
            });
        }
        let mut pats: Vec<&[u8]> = alloc::vec![&[][..]; uniq.len()];
        for (k, &i) in &uniq {
            pats[i] = k;
        }
        let build = |kind| {
            AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .kind(kind)
                .start_kind(StartKind::Unanchored)
                .build(&pats)
        };
        // A DFA is fastest but can exceed its size limit on huge sets; then let the crate pick.
        let ac = build(Some(AhoCorasickKind::DFA))
            .or_else(|_| build(None))
            .map_err(|e| alloc::format!("prefilter build failed: {e}"))?;
        Ok(AcPrefilter {
            ac: Some(ac),
            lits,
            pat_lits,
        })
    }

    /// Calls `hit(id)` once for every literal that occurs in `hay`. `marks` must have been
    /// started for at least `self.len()` ids.
    #[inline]
    pub fn scan(&self, hay: &[u8], marks: &mut Marks, mut hit: impl FnMut(usize)) {
        let Some(ac) = &self.ac else { return };
        for m in ac.find_overlapping_iter(hay) {
            for &id in &self.pat_lits[m.pattern().as_usize()] {
                let id = id as usize;
                let lit = &self.lits[id];
                if !lit.nocase && hay[m.start()..m.end()] != *lit.bytes {
                    continue;
                }
                if marks.first(id) {
                    hit(id);
                }
            }
        }
    }

    /// Number of literals.
    pub fn len(&self) -> usize {
        self.lits.len()
    }

    /// Whether there are no literals.
    pub fn is_empty(&self) -> bool {
        self.lits.is_empty()
    }

    /// Heap bytes used by the automaton and the literal tables.
    pub fn memory_usage(&self) -> usize {
        self.ac.as_ref().map_or(0, AhoCorasick::memory_usage)
            + self
                .lits
                .iter()
                .map(|l| l.bytes.len() + core::mem::size_of::<Lit>())
                .sum::<usize>()
            + self
                .pat_lits
                .iter()
                .map(|v| v.len() * 4 + core::mem::size_of::<Vec<u32>>())
                .sum::<usize>()
    }
}

/// Folds the ASCII upper-case letters among the eight bytes of `w` to lower case.
#[inline(always)]
fn fold8(w: u64) -> u64 {
    // Per byte b < 0x80: b + 0x3f sets bit 7 iff b >= b'A'; b + 0x25 sets it iff b > b'Z'.
    // Neither sum carries into the next byte (0x7f + 0x3f < 0x100).
    let low7 = w & 0x7f7f_7f7f_7f7f_7f7f;
    let ge_a = low7.wrapping_add(0x3f3f_3f3f_3f3f_3f3f);
    let gt_z = low7.wrapping_add(0x2525_2525_2525_2525);
    let upper = ge_a & !gt_z & !w & 0x8080_8080_8080_8080;
    w | (upper >> 2)
}

/// [`fold8`] on four bytes (bytes fold on their own, so the upper zeros change nothing).
#[inline(always)]
fn fold4(w: u32) -> u32 {
    fold8(u64::from(w)) as u32
}

/// Little-endian word of up to eight bytes of `b` (zeros past its end).
#[inline(always)]
fn word8(b: &[u8]) -> u64 {
    match b.get(..8) {
        Some(q) => u64::from_le_bytes([q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]]),
        None => {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(w)
        }
    }
}

/// Folded little-endian key of the first `k` (1..=4) bytes of `b`.
fn key(b: &[u8], k: usize) -> u32 {
    let mut w = [0u8; 4];
    w[..k].copy_from_slice(&b[..k]);
    let mask = if k == 4 {
        u32::MAX
    } else {
        (1u32 << (8 * k)) - 1
    };
    fold4(u32::from_le_bytes(w)) & mask
}

/// Literal ids grouped by prefix key.
#[derive(Debug, Default)]
struct Buckets {
    keys: Vec<u32>,
    starts: Vec<u32>,
    ids: Vec<u32>,
}

impl Buckets {
    fn build(mut pairs: Vec<(u32, u32)>) -> Buckets {
        pairs.sort_unstable();
        let mut b = Buckets::default();
        for (k, id) in pairs {
            if b.keys.last() != Some(&k) {
                b.keys.push(k);
                b.starts.push(b.ids.len() as u32);
            }
            b.ids.push(id);
        }
        b.starts.push(b.ids.len() as u32);
        b
    }

    #[inline]
    fn get(&self, k: u32) -> &[u32] {
        match self.keys.binary_search(&k) {
            Ok(i) => &self.ids[self.starts[i] as usize..self.starts[i + 1] as usize],
            Err(_) => &[],
        }
    }

    fn memory_usage(&self) -> usize {
        (self.keys.len() + self.starts.len() + self.ids.len()) * 4
    }
}

/// Literal ids grouped by their bit in a hashed bitmap, found in O(1) from the bitmap word
/// already loaded: the bucket of set bit `i` is the number of set bits before it (a rank), so
/// no key search is needed. Literals whose keys hash to the same bit share a bucket; the
/// byte-for-byte check sorts them out.
#[derive(Debug, Default)]
struct RankBuckets {
    /// Per bitmap word: set bits in the words before it.
    rank: Vec<u32>,
    starts: Vec<u32>,
    ids: Vec<u32>,
}

impl RankBuckets {
    /// `pairs`: (bit, literal id), every bit set in `map` and only those.
    fn build(map: &[u64], mut pairs: Vec<(u32, u32)>) -> RankBuckets {
        pairs.sort_unstable();
        let mut b = RankBuckets::default();
        let mut seen = 0u32;
        for w in map {
            b.rank.push(seen);
            seen += w.count_ones();
        }
        let mut last = None;
        for (bit, id) in pairs {
            if last != Some(bit) {
                last = Some(bit);
                b.starts.push(b.ids.len() as u32);
            }
            b.ids.push(id);
        }
        b.starts.push(b.ids.len() as u32);
        b
    }

    /// The literals of bit `i`, set in `word` (the bitmap word holding it).
    #[inline]
    fn get(&self, word: u64, i: usize) -> &[u32] {
        let below = word & ((1u64 << (i & 63)) - 1);
        let r = self.rank.get(i >> 6).map_or(0, |&r| r as usize) + below.count_ones() as usize;
        match (self.starts.get(r), self.starts.get(r + 1)) {
            (Some(&a), Some(&b)) => self.ids.get(a as usize..b as usize).unwrap_or(&[]),
            _ => &[],
        }
    }

    fn memory_usage(&self) -> usize {
        (self.rank.len() + self.starts.len() + self.ids.len()) * 4
    }
}

/// A bitmap over all 16-bit values.
type Bits64K = [u64; 1024];

/// Bit `k` of a 64 Kibit map; the fixed size lets the compiler drop the bounds check.
#[inline(always)]
fn bit64k(map: &Bits64K, k: u16) -> bool {
    map[usize::from(k >> 6)] & (1u64 << (k & 63)) != 0
}

fn set_bit(map: &mut [u64], i: usize) {
    map[i >> 6] |= 1u64 << (i & 63);
}

/// Multiplicative hash constant (2^32 / golden ratio).
const HASH_MUL: u32 = 0x9e37_79b1;

/// The engine's literal prefilter (see the module documentation).
#[derive(Debug)]
pub struct Prefilter {
    lits: Vec<Lit>,
    /// First stage, four flags per bigram `b0 | b1 << 8` (two bigrams per byte): [`AT0`],
    /// [`AT1`], [`AT2`] when the bigram occurs at offset 0, 1 or 2 of a literal of 4 bytes or
    /// more, [`SHORT`] when it starts a 2-3-byte literal (every case variant of `nocase`
    /// literals). A position is a candidate when its bigram and the next two chain (a literal
    /// of >= 4 bytes can start there) or its bigram starts a short literal.
    pairs: Box<[u8; 32768]>,
    /// Bitmap over hashed folded 4-byte prefixes of literals of >= 4 bytes.
    bloom: Vec<u64>,
    shift: u32,
    /// Literals of >= 4 bytes by their bit in `bloom`.
    long: RankBuckets,
    /// Bitmap over folded 2-byte prefixes of 2-3-byte literals (empty if none).
    bits2: Option<Box<Bits64K>>,
    short2: Buckets,
    /// 1-byte literals: (needle bytes, literal ids), found with memchr (SIMD) so that frequent
    /// bytes do not load the bigram filter.
    /// Distinct byte values that 1-byte literals match (both cases for `nocase`), and for
    /// each the literal ids it completes.
    singles: Vec<(u8, Vec<u32>)>,
    has_short: bool,
}

impl Prefilter {
    /// Builds the prefilter. Literal `i` of the input keeps id `i`; identical (bytes, nocase)
    /// pairs are fine (each id is reported).
    pub fn new(literals: &[(Vec<u8>, bool)]) -> Result<Prefilter, String> {
        let lits = normalized_literals(literals)?;
        let n_long = lits.iter().filter(|l| l.bytes.len() >= 4).count();
        // About 64 bits per literal keeps false positives near 1.5%; 2^10..2^18 bits.
        let bits = (n_long * 64).next_power_of_two().clamp(1 << 10, 1 << 18);
        let shift = 32 - bits.trailing_zeros();
        let mut bloom = alloc::vec![0u64; bits / 64];
        let (mut long, mut s2) = (Vec::new(), Vec::new());
        let mut bits2: Option<Box<Bits64K>> = None;
        let mut singles: Vec<(u8, Vec<u32>)> = Vec::new();
        for (i, l) in lits.iter().enumerate() {
            let id = i as u32;
            match l.bytes.len() {
                1 => {
                    let b = l.bytes[0];
                    let upper = b.to_ascii_uppercase();
                    let needles: &[u8] = if l.nocase && upper != b {
                        &[b, upper]
                    } else {
                        &[b][..]
                    };
                    for &n in needles {
                        match singles.iter_mut().find(|s| s.0 == n) {
                            Some(s) => s.1.push(id),
                            None => singles.push((n, alloc::vec![id])),
                        }
                    }
                }
                2 | 3 => {
                    let k = key(&l.bytes, 2);
                    set_bit(
                        &mut bits2.get_or_insert_with(|| Box::new([0; 1024]))[..],
                        k as usize,
                    );
                    s2.push((k, id));
                }
                _ => {
                    let k = key(&l.bytes, 4);
                    let b = (k.wrapping_mul(HASH_MUL) >> shift) as usize;
                    set_bit(&mut bloom, b);
                    long.push((b as u32, id));
                }
            }
        }
        let has_short = !s2.is_empty();
        let variants = |b: u8, nocase: bool| -> [u8; 2] {
            if nocase {
                [b.to_ascii_lowercase(), b.to_ascii_uppercase()]
            } else {
                [b, b]
            }
        };
        let mut pairs: Box<[u8; 32768]> = Box::new([0; 32768]);
        for l in &lits {
            let offsets: &[(usize, u8)] = match l.bytes.len() {
                1 => &[],
                2 | 3 => &[(0, SHORT)],
                _ => &[(0, AT0), (1, AT1), (2, AT2)],
            };
            for &(at, flag) in offsets {
                for b0 in variants(l.bytes[at], l.nocase) {
                    for b1 in variants(l.bytes[at + 1], l.nocase) {
                        let k = usize::from(b0) | usize::from(b1) << 8;
                        pairs[k >> 1] |= flag << ((k & 1) * 4);
                    }
                }
            }
        }
        let long = RankBuckets::build(&bloom, long);
        Ok(Prefilter {
            lits,
            pairs,
            bloom,
            shift,
            long,
            bits2,
            short2: Buckets::build(s2),
            singles,
            has_short,
        })
    }

    /// Number of literals.
    pub fn len(&self) -> usize {
        self.lits.len()
    }

    /// Whether there are no literals.
    pub fn is_empty(&self) -> bool {
        self.lits.is_empty()
    }

    /// Heap bytes of the tables and literal copies.
    pub fn memory_usage(&self) -> usize {
        (self.bloom.len() + if self.bits2.is_some() { 1024 } else { 0 }) * 8
            + self.pairs.len()
            + self.long.memory_usage()
            + self.short2.memory_usage()
            + self
                .singles
                .iter()
                .map(|s| s.1.len() * 4 + 32)
                .sum::<usize>()
            + self
                .lits
                .iter()
                .map(|l| l.bytes.len() + core::mem::size_of::<Lit>())
                .sum::<usize>()
    }

    #[inline(never)]
    fn verify(
        &self,
        ids: &[u32],
        hay: &[u8],
        at: usize,
        marks: &mut Marks,
        hit: &mut impl FnMut(usize),
    ) {
        for &id in ids {
            let id = id as usize;
            let lit = &self.lits[id];
            let Some(s) = hay.get(at..at + lit.bytes.len()) else {
                continue;
            };
            // Short literals: an inline loop beats a memcmp call.
            let ok = if lit.nocase {
                s.eq_ignore_ascii_case(&lit.bytes)
            } else if s.len() <= 16 {
                s.iter().zip(lit.bytes.iter()).all(|(a, b)| a == b)
            } else {
                *s == *lit.bytes
            };
            if ok && marks.first(id) {
                hit(id);
            }
        }
    }

    /// Checks the >= 4-byte literals `ids` at `at`, where the haystack's next eight bytes (zeros
    /// past its end) are `raw` and, case-folded, `folded`.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn verify_long(
        &self,
        ids: &[u32],
        raw: u64,
        folded: u64,
        hay: &[u8],
        at: usize,
        marks: &mut Marks,
        hit: &mut impl FnMut(usize),
    ) {
        for &id in ids {
            let id = id as usize;
            let lit = &self.lits[id];
            if (if lit.nocase { folded } else { raw }) & lit.head_mask != lit.head {
                continue;
            }
            let Some(s) = hay.get(at..at + lit.bytes.len()) else {
                continue;
            };
            let (Some(s), Some(t)) = (s.get(8..), lit.bytes.get(8..)) else {
                // Eight bytes or fewer: the head compare was the whole check.
                if marks.first(id) {
                    hit(id);
                }
                continue;
            };
            let ok = if lit.nocase {
                s.eq_ignore_ascii_case(t)
            } else {
                s == t
            };
            if ok && marks.first(id) {
                hit(id);
            }
        }
    }

    #[inline(always)]
    fn short_at(
        &self,
        w: u32,
        hay: &[u8],
        at: usize,
        marks: &mut Marks,
        hit: &mut impl FnMut(usize),
    ) {
        let k2 = w & 0xffff;
        if self.bits2.as_ref().is_some_and(|b| bit64k(b, k2 as u16)) {
            self.verify(self.short2.get(k2), hay, at, marks, hit);
        }
    }

    /// Second stage at a candidate position of the bigram chain.
    #[inline(never)]
    fn check_at(&self, hay: &[u8], i: usize, marks: &mut Marks, hit: &mut impl FnMut(usize)) {
        let w = match hay.get(i..i + 4) {
            Some(q) => {
                let w = fold4(u32::from_le_bytes([q[0], q[1], q[2], q[3]]));
                let b = (w.wrapping_mul(HASH_MUL) >> self.shift) as usize;
                let word = self.bloom.get(b >> 6).copied().unwrap_or(0);
                if word & (1u64 << (b & 63)) != 0 {
                    let raw = word8(&hay[i..]);
                    let ids = self.long.get(word, b);
                    self.verify_long(ids, raw, fold8(raw), hay, i, marks, hit);
                }
                w
            }
            None => {
                // Fewer than 4 bytes left: only 2-3-byte literals fit.
                let mut b = [0u8; 4];
                b[..hay.len() - i].copy_from_slice(&hay[i..]);
                fold4(u32::from_le_bytes(b))
            }
        };
        if self.has_short {
            self.short_at(w, hay, i, marks, hit);
        }
    }

    /// Calls `hit(id)` once for every literal that occurs in `hay`. `marks` must have been
    /// started for at least `self.len()` ids.
    pub fn scan(&self, hay: &[u8], marks: &mut Marks, mut hit: impl FnMut(usize)) {
        if self.lits.is_empty() || hay.is_empty() {
            return;
        }
        // 1-byte literals: memchr3 over three needles at a time; each found needle leaves the
        // batch and the search goes on after it with the rest.
        for batch in self.singles.chunks(3) {
            let mut left: [Option<&(u8, Vec<u32>)>; 3] =
                [batch.first(), batch.get(1), batch.get(2)];
            let mut from = 0;
            loop {
                let mut live = left.iter().flatten().map(|e| e.0);
                let rest = &hay[from..];
                let pos = match (live.next(), live.next(), live.next()) {
                    (None, _, _) => None,
                    (Some(a), None, _) => memchr::memchr(a, rest),
                    (Some(a), Some(b), None) => memchr::memchr2(a, b, rest),
                    (Some(a), Some(b), Some(c)) => memchr::memchr3(a, b, c, rest),
                };
                let Some(p) = pos else { break };
                let byte = rest[p];
                for slot in left.iter_mut() {
                    if slot.is_some_and(|e| e.0 == byte) {
                        for &id in slot.take().map_or(&[][..], |e| &e.1[..]) {
                            if marks.first(id as usize) {
                                hit(id as usize);
                            }
                        }
                    }
                }
                from += p + 1;
            }
        }
        if hay.len() < 2 {
            return;
        }
        // Blocks of BLOCK positions: the flags of each position's bigram are looked up without
        // a branch, then eight positions at a time are tested with word operations (SWAR), so
        // the only branches left are per block lane and per candidate.
        const BLOCK: usize = 64;
        let positions = hay.len() - 1;
        let mut flags = [0u8; BLOCK + 10];
        let mut base = 0;
        while base < positions {
            // Positions base.. plus the two after the block that chain into its last ones.
            let upto = (base + BLOCK + 2).min(positions);
            let window = &hay[base..=upto];
            for (f, w) in flags.iter_mut().zip(window.windows(2)) {
                let k = usize::from(w[0]) | usize::from(w[1]) << 8;
                *f = self.pairs[k >> 1] >> ((k & 1) * 4);
            }
            if upto - base < BLOCK + 2 {
                // The last block: no chaining past the last bigram.
                flags[upto - base..].iter_mut().for_each(|f| *f = 0);
            }
            let lanes = (positions - base).min(BLOCK);
            for lane in (0..lanes).step_by(8) {
                let word = |at: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&flags[at..at + 8]);
                    u64::from_le_bytes(b)
                };
                const LOW: u64 = 0x0101_0101_0101_0101;
                let (w0, w1, w2) = (word(lane), word(lane + 1), word(lane + 2));
                let mut cand = ((w0 & (w1 >> 1) & (w2 >> 2)) | (w0 >> 3)) & LOW;
                if lanes - lane < 8 {
                    cand &= (1u64 << (8 * (lanes - lane))) - 1;
                }
                while cand != 0 {
                    let i = base + lane + (cand.trailing_zeros() / 8) as usize;
                    self.check_at(hay, i, marks, &mut hit);
                    cand &= cand - 1;
                }
            }
            base += BLOCK;
        }
    }
}

/// Bigram flags (see [`Prefilter::pairs`]).
const AT0: u8 = 1;
const AT1: u8 = 2;
const AT2: u8 = 4;
const SHORT: u8 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_ascii_lowercase() {
        for b in 0..=255u8 {
            let w = u32::from_le_bytes([b, b'Q', 0xC1, b]);
            let f = fold4(w).to_le_bytes();
            assert_eq!(
                f,
                [b.to_ascii_lowercase(), b'q', 0xC1, b.to_ascii_lowercase()],
                "{b:#x}"
            );
            let w8 = u64::from_le_bytes([b'Z', 0xDA, b, b'@', b'[', b, b'A', b]);
            let l = b.to_ascii_lowercase();
            assert_eq!(
                fold8(w8).to_le_bytes(),
                [b'z', 0xDA, l, b'@', b'[', l, b'a', l],
                "{b:#x}"
            );
        }
    }

    /// Xorshift strings over a small alphabet, so that literals occur often.
    struct Strings {
        x: u64,
        alphabet: &'static [u8],
    }

    impl Strings {
        fn next(&mut self) -> u64 {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            self.x
        }

        fn string(&mut self, len: usize) -> Vec<u8> {
            (0..len)
                .map(|_| self.alphabet[(self.next() % self.alphabet.len() as u64) as usize])
                .collect()
        }

        /// `n` literals of `min..min + spread` bytes, one in `nocase_in` of them `nocase`.
        fn literals(
            &mut self,
            n: usize,
            min: usize,
            spread: u64,
            nocase_in: u64,
        ) -> Vec<(Vec<u8>, bool)> {
            (0..n)
                .map(|_| {
                    let len = min + (self.next() % spread) as usize;
                    let l = self.string(len);
                    (l, self.next().is_multiple_of(nocase_in))
                })
                .collect()
        }
    }

    /// The hash prefilter reports exactly what the Aho-Corasick reference reports.
    #[test]
    fn matches_aho_corasick_reference() {
        let mut g = Strings {
            x: 0x2545_f491_4f6c_dd1d,
            alphabet: b"aAbBcC\x00\xff-",
        };
        let lits = g.literals(300, 1, 7, 2);
        let ours = Prefilter::new(&lits).unwrap();
        let reference = AcPrefilter::new(&lits).unwrap();
        let mut m = Marks::default();
        for round in 0..400 {
            let len = (g.next() % 40) as usize + round % 3;
            let hay = g.string(len);
            same_as_reference(&ours, &reference, lits.len(), &hay, &mut m);
        }
    }

    /// Scans `hay` with both prefilters and asserts they report the same literals; returns
    /// how many.
    fn same_as_reference(
        ours: &Prefilter,
        reference: &AcPrefilter,
        literals: usize,
        hay: &[u8],
        m: &mut Marks,
    ) -> usize {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        m.begin(literals);
        ours.scan(hay, m, |i| a.push(i));
        m.begin(literals);
        reference.scan(hay, m, |i| b.push(i));
        a.sort();
        b.sort();
        assert_eq!(a, b, "haystack {hay:?}");
        a.len()
    }

    /// Thousands of long literals: many share a bloom bit (and so a bucket) with literals of
    /// other prefixes; the set reported stays exact.
    #[test]
    fn shared_bloom_buckets_stay_exact() {
        let mut g = Strings {
            x: 0x9e37_79b9_7f4a_7c15,
            alphabet: b"abcdefgHIJ0123/.",
        };
        let lits = g.literals(6000, 4, 5, 3);
        let ours = Prefilter::new(&lits).unwrap();
        let shared = ours.long.starts.len() - 1;
        let distinct: alloc::collections::BTreeSet<u32> =
            lits.iter().map(|l| key(&l.0, 4)).collect();
        assert!(
            shared < distinct.len(),
            "{shared} buckets, {} keys",
            distinct.len()
        );
        let reference = AcPrefilter::new(&lits).unwrap();
        let mut m = Marks::default();
        let mut found = 0;
        for _ in 0..300 {
            let len = 50 + (g.next() % 200) as usize;
            let hay = g.string(len);
            found += same_as_reference(&ours, &reference, lits.len(), &hay, &mut m);
        }
        assert!(found > 100, "{found}");
    }

    /// Haystacks of every length around the scan's 64-position blocks, with literals of 1-9
    /// bytes found across block edges and at the very end.
    #[test]
    fn block_edges_stay_exact() {
        let mut g = Strings {
            x: 0x0123_4567_89ab_cdef,
            alphabet: b"xyXY\r\n",
        };
        let lits = g.literals(120, 1, 9, 2);
        let ours = Prefilter::new(&lits).unwrap();
        let reference = AcPrefilter::new(&lits).unwrap();
        let mut m = Marks::default();
        let mut found = 0;
        for len in (0..=200).chain([255, 256, 257, 1500]) {
            for _ in 0..4 {
                let hay = g.string(len);
                found += same_as_reference(&ours, &reference, lits.len(), &hay, &mut m);
            }
        }
        assert!(found > 1000, "{found}");
    }

    #[test]
    fn exact_set_case_rules() {
        let lits = alloc::vec![
            (b"abc".to_vec(), false),
            (b"ABC".to_vec(), true),
            (b"bcd".to_vec(), false),
            (b"zzz".to_vec(), false),
            (b"abc".to_vec(), false),
        ];
        let pf = Prefilter::new(&lits).unwrap();
        let ac = AcPrefilter::new(&lits).unwrap();
        let mut marks = Marks::default();
        let mut got = Vec::new();
        marks.begin(ac.len());
        ac.scan(b"xxABCD abcd", &mut marks, |i| got.push(i));
        got.sort();
        assert_eq!(got, alloc::vec![0, 1, 2, 4]);
        got.clear();
        marks.begin(pf.len());
        pf.scan(b"xxABCD abcd", &mut marks, |i| got.push(i));
        got.sort();
        // "abc" (cs) occurs in "abcd"; "ABC" nocase occurs; "bcd" occurs; duplicate id 4 too.
        assert_eq!(got, alloc::vec![0, 1, 2, 4]);
        got.clear();
        marks.begin(pf.len());
        pf.scan(b"ABCD", &mut marks, |i| got.push(i));
        assert_eq!(got, alloc::vec![1]);
    }
}
