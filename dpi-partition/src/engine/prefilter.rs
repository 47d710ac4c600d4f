//! Multi-literal prefilter: reports every distinct literal that occurs in a buffer.
//!
//! One Aho-Corasick automaton (aho-corasick crate, ASCII case-insensitive so that `nocase`
//! literals need no second pass) with overlapping search; hits of case-sensitive literals are
//! verified byte for byte, so the reported set is exact for both kinds.

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

/// A compiled literal set.
#[derive(Debug)]
pub struct Prefilter {
    ac: Option<AhoCorasick>,
    lits: Vec<Lit>,
    /// Automaton pattern id → literal ids sharing its case-folded bytes.
    pat_lits: Vec<Vec<u32>>,
}

impl Prefilter {
    /// Builds the prefilter. Literal `i` of the input keeps id `i`; identical (bytes, nocase)
    /// pairs are fine (each id is reported).
    pub fn new(literals: &[(Vec<u8>, bool)]) -> Result<Prefilter, String> {
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
            return Ok(Prefilter {
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
        Ok(Prefilter {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut marks = Marks::default();
        let mut got = Vec::new();
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
