//! Multi-literal prefilters: report every distinct literal that occurs in a buffer.
//!
//! [`Prefilter`] (used by the engine) slides a 4-byte window over the buffer once. The window is
//! first tested against a 64 Kibit bigram table of the literals' possible first two bytes (one
//! L1 lookup per byte; most positions stop there), then against a hashed table of their first
//! three bytes (or a table of 2-byte literals). A passing window is ASCII-case-folded with a
//! few word operations, hashed into a small bitmap of the folded 4-byte prefixes of literals of
//! 4 bytes or more, and looked up directly in a bitmap of the folded 2-byte prefixes of 2–3-byte
//! literals. Only a set bit leads to the literals with that prefix and a byte-for-byte check
//! (exact case for case-sensitive literals), so the reported set is exact. 1-byte literals are
//! searched with memchr. The tables are a few KiB to 50 KiB per group and stay in L1/L2, which is
//! what makes this faster than one large automaton. The tables are a few KiB to
//! 40 KiB per group and stay in L1/L2, which is what makes it faster than a large automaton.
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
        .map(|(b, nc)| Lit {
            bytes: if *nc {
                b.to_ascii_lowercase().into()
            } else {
                b.clone().into()
            },
            nocase: *nc,
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

/// Folds the ASCII upper-case letters among the four bytes of `w` to lower case.
#[inline(always)]
fn fold4(w: u32) -> u32 {
    // Per byte b < 0x80: b + 0x3f sets bit 7 iff b >= b'A'; b + 0x25 sets it iff b > b'Z'.
    // Neither sum carries into the next byte (0x7f + 0x3f < 0x100).
    let low7 = w & 0x7f7f_7f7f;
    let ge_a = low7.wrapping_add(0x3f3f_3f3f);
    let gt_z = low7.wrapping_add(0x2525_2525);
    let upper = ge_a & !gt_z & !w & 0x8080_8080;
    w | (upper >> 2)
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

#[inline(always)]
fn bit(map: &[u64], i: usize) -> bool {
    map[i >> 6] & (1u64 << (i & 63)) != 0
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

/// Hash of a trigram into a table of 2^(32 - shift) bits.
#[inline(always)]
fn trigram_hash(b0: u8, b1: u8, b2: u8, shift: u32) -> usize {
    let w = u32::from(b0) | u32::from(b1) << 8 | u32::from(b2) << 16;
    (w.wrapping_mul(HASH_MUL) >> shift) as usize
}

/// Multiplicative hash constant (2^32 / golden ratio).
const HASH_MUL: u32 = 0x9e37_79b1;

/// The engine's literal prefilter (see the module documentation).
#[derive(Debug)]
pub struct Prefilter {
    lits: Vec<Lit>,
    /// First stage: bit `b0 | b1 << 8` is set when some literal can start with bytes b0 b1 (all
    /// case variants of `nocase` literals; every b1 for 1-byte literals). Most positions stop
    /// here after one L1 lookup, without folding or hashing.
    bigram: Box<Bits64K>,
    /// Bigrams that start a 2-byte literal (these positions skip the trigram test).
    bigram_short: Box<Bits64K>,
    /// Hashed trigrams (all case variants) that start a literal of 3 bytes or more, tested
    /// inline at positions that pass the bigram table before the out-of-line second stage.
    trigram: Vec<u64>,
    tri_shift: u32,
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
        let mut bigram: Box<Bits64K> = Box::new([0; 1024]);
        let variants = |b: u8, nocase: bool| -> [u8; 2] {
            if nocase {
                [b.to_ascii_lowercase(), b.to_ascii_uppercase()]
            } else {
                [b, b]
            }
        };
        let mut bigram_short: Box<Bits64K> = Box::new([0; 1024]);
        // About 16 bits per trigram variant (a few % false positives), 4 Kibit to 256 Kibit.
        let variants_total: usize = lits
            .iter()
            .filter(|l| l.bytes.len() >= 3)
            .map(|l| if l.nocase { 8 } else { 1 })
            .sum();
        let tri_bits = (variants_total * 16)
            .next_power_of_two()
            .clamp(1 << 12, 1 << 18);
        let tri_shift = 32 - tri_bits.trailing_zeros();
        let mut trigram = alloc::vec![0u64; tri_bits / 64];
        for l in &lits {
            for b0 in variants(l.bytes[0], l.nocase) {
                let Some(&b1) = l.bytes.get(1) else { continue };
                for b1 in variants(b1, l.nocase) {
                    let k = usize::from(b0) | usize::from(b1) << 8;
                    set_bit(&mut bigram[..], k);
                    match l.bytes.get(2) {
                        None => set_bit(&mut bigram_short[..], k),
                        Some(&b2) => {
                            for b2 in variants(b2, l.nocase) {
                                set_bit(&mut trigram, trigram_hash(b0, b1, b2, tri_shift));
                            }
                        }
                    }
                }
            }
        }
        let long = RankBuckets::build(&bloom, long);
        Ok(Prefilter {
            lits,
            bigram,
            bigram_short,
            trigram,
            tri_shift,
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
        (self.bloom.len() + self.trigram.len() + 2048 + if self.bits2.is_some() { 1024 } else { 0 })
            * 8
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

    /// Second stage at a position that passed the bigram filter.
    #[inline(never)]
    fn check_at(&self, hay: &[u8], i: usize, marks: &mut Marks, hit: &mut impl FnMut(usize)) {
        let w = match hay.get(i..i + 4) {
            Some(q) => {
                let w = fold4(u32::from_le_bytes([q[0], q[1], q[2], q[3]]));
                let b = (w.wrapping_mul(HASH_MUL) >> self.shift) as usize;
                let word = self.bloom.get(b >> 6).copied().unwrap_or(0);
                if word & (1u64 << (b & 63)) != 0 {
                    self.verify(self.long.get(word, b), hay, i, marks, hit);
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
        let table: &Bits64K = &self.bigram;
        for (i, pair) in hay.windows(2).enumerate() {
            let k = u16::from_le_bytes([pair[0], pair[1]]);
            if !bit64k(table, k) {
                continue;
            }
            // Skip the second stage when no literal of 3+ bytes can start here (trigram clear)
            // and no 2-byte literal does either.
            if let Some(&b2) = hay.get(i + 2) {
                if !bit(
                    &self.trigram,
                    trigram_hash(pair[0], pair[1], b2, self.tri_shift),
                ) && !bit64k(&self.bigram_short, k)
                {
                    continue;
                }
            }
            self.check_at(hay, i, marks, &mut hit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold4_is_ascii_lowercase() {
        for b in 0..=255u8 {
            let w = u32::from_le_bytes([b, b'Q', 0xC1, b]);
            let f = fold4(w).to_le_bytes();
            assert_eq!(
                f,
                [b.to_ascii_lowercase(), b'q', 0xC1, b.to_ascii_lowercase()],
                "{b:#x}"
            );
        }
    }

    /// The hash prefilter reports exactly what the Aho-Corasick reference reports.
    #[test]
    fn matches_aho_corasick_reference() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"aAbBcC\x00\xff-";
        let mut lits = Vec::new();
        for _ in 0..300 {
            let len = 1 + (rnd() % 7) as usize;
            let l: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            lits.push((l, rnd() % 2 == 0));
        }
        let ours = Prefilter::new(&lits).unwrap();
        let reference = AcPrefilter::new(&lits).unwrap();
        let mut m = Marks::default();
        for round in 0..400 {
            let len = (rnd() % 40) as usize + round % 3;
            let hay: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
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
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"abcdefgHIJ0123/.";
        let lits: Vec<(Vec<u8>, bool)> = (0..6000)
            .map(|_| {
                let len = 4 + (rnd() % 5) as usize;
                let l = (0..len)
                    .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                    .collect();
                (l, rnd() % 3 == 0)
            })
            .collect();
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
            let len = 50 + (rnd() % 200) as usize;
            let hay: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            found += same_as_reference(&ours, &reference, lits.len(), &hay, &mut m);
        }
        assert!(found > 100, "{found}");
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
