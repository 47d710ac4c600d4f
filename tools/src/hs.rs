//! Minimal Hyperscan FFI (Debian's libhyperscan-dev), for the benchmark's reference numbers only.
//! Built with `--features hyperscan`.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::ptr;

#[repr(C)]
struct HsDatabase {
    _private: [u8; 0],
}
#[repr(C)]
struct HsScratch {
    _private: [u8; 0],
}
#[repr(C)]
struct HsCompileError {
    message: *const c_char,
    expression: c_int,
}

type MatchHandler =
    unsafe extern "C" fn(c_uint, c_ulonglong, c_ulonglong, c_uint, *mut c_void) -> c_int;

#[link(name = "hs")]
unsafe extern "C" {
    fn hs_compile_lit_multi(
        expressions: *const *const c_char,
        flags: *const c_uint,
        ids: *const c_uint,
        lens: *const usize,
        elements: c_uint,
        mode: c_uint,
        platform: *const c_void,
        db: *mut *mut HsDatabase,
        error: *mut *mut HsCompileError,
    ) -> c_int;
    fn hs_free_compile_error(error: *mut HsCompileError) -> c_int;
    fn hs_alloc_scratch(db: *const HsDatabase, scratch: *mut *mut HsScratch) -> c_int;
    fn hs_free_scratch(scratch: *mut HsScratch) -> c_int;
    fn hs_free_database(db: *mut HsDatabase) -> c_int;
    fn hs_database_size(db: *const HsDatabase, size: *mut usize) -> c_int;
    fn hs_scan(
        db: *const HsDatabase,
        data: *const c_char,
        length: c_uint,
        flags: c_uint,
        scratch: *mut HsScratch,
        on_event: MatchHandler,
        context: *mut c_void,
    ) -> c_int;
}

const HS_FLAG_CASELESS: c_uint = 1;
const HS_FLAG_SINGLEMATCH: c_uint = 8;
const HS_MODE_BLOCK: c_uint = 1;

/// A block-mode literal database with its scratch space.
pub struct Literals {
    db: *mut HsDatabase,
    scratch: *mut HsScratch,
}

impl Literals {
    /// Compiles `lits` (bytes, caseless); literal `i` reports id `i` at most once per scan.
    pub fn new(lits: &[(Vec<u8>, bool)]) -> Result<Literals, String> {
        let ptrs: Vec<*const c_char> = lits.iter().map(|l| l.0.as_ptr().cast()).collect();
        let lens: Vec<usize> = lits.iter().map(|l| l.0.len()).collect();
        let flags: Vec<c_uint> = lits
            .iter()
            .map(|l| HS_FLAG_SINGLEMATCH | if l.1 { HS_FLAG_CASELESS } else { 0 })
            .collect();
        let ids: Vec<c_uint> = (0..lits.len() as c_uint).collect();
        let mut db = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: the four arrays have `lits.len()` elements and outlive the call; `db`/`err`
        // are valid out-pointers; a null platform means "this host".
        let rc = unsafe {
            hs_compile_lit_multi(
                ptrs.as_ptr(),
                flags.as_ptr(),
                ids.as_ptr(),
                lens.as_ptr(),
                lits.len() as c_uint,
                HS_MODE_BLOCK,
                ptr::null(),
                &mut db,
                &mut err,
            )
        };
        if rc != 0 {
            let msg = if err.is_null() {
                format!("hs_compile_lit_multi failed ({rc})")
            } else {
                // SAFETY: on failure `err` points to a compile error with a C-string message,
                // which we read and then free exactly once.
                unsafe {
                    let m = CStr::from_ptr((*err).message)
                        .to_string_lossy()
                        .into_owned();
                    let e = (*err).expression;
                    hs_free_compile_error(err);
                    format!("hyperscan: literal {e}: {m}")
                }
            };
            return Err(msg);
        }
        let mut scratch = ptr::null_mut();
        // SAFETY: `db` is the valid database compiled above; `scratch` is an out-pointer.
        let rc = unsafe { hs_alloc_scratch(db, &mut scratch) };
        if rc != 0 {
            // SAFETY: `db` was allocated by Hyperscan and is freed once here.
            unsafe { hs_free_database(db) };
            return Err(format!("hs_alloc_scratch failed ({rc})"));
        }
        Ok(Literals { db, scratch })
    }

    /// Database size in bytes.
    pub fn size(&self) -> usize {
        let mut n = 0;
        // SAFETY: `self.db` is a valid database for the life of `self`.
        unsafe { hs_database_size(self.db, &mut n) };
        n
    }

    /// Calls `hit(id)` for each literal found in `data`.
    pub fn scan(&mut self, data: &[u8], hit: &mut dyn FnMut(usize)) {
        unsafe extern "C" fn on_match(
            id: c_uint,
            _from: c_ulonglong,
            _to: c_ulonglong,
            _flags: c_uint,
            ctx: *mut c_void,
        ) -> c_int {
            // SAFETY: `ctx` is the `&mut &mut dyn FnMut` passed to hs_scan below, live for the
            // whole scan, and Hyperscan calls back on the scanning thread only.
            let f = unsafe { &mut *ctx.cast::<&mut dyn FnMut(usize)>() };
            f(id as usize);
            0
        }
        let mut h: &mut dyn FnMut(usize) = hit;
        // SAFETY: `db` and `scratch` are valid and not shared; `data` is valid for its length;
        // the context pointer outlives the call.
        unsafe {
            hs_scan(
                self.db,
                data.as_ptr().cast(),
                data.len() as c_uint,
                0,
                self.scratch,
                on_match,
                (&mut h as *mut &mut dyn FnMut(usize)).cast(),
            );
        }
    }
}

impl Drop for Literals {
    fn drop(&mut self) {
        // SAFETY: both were allocated by Hyperscan in `new` and are freed exactly once.
        unsafe {
            hs_free_scratch(self.scratch);
            hs_free_database(self.db);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Literals;
    use ally_dpi::engine::prefilter::{Marks, Prefilter};

    /// The engine's prefilter and Hyperscan report the same literals on random literal sets
    /// (1-9 bytes, case-sensitive and `nocase`) and haystacks of 0-300 bytes over a small
    /// alphabet, so that matches are frequent, block edges are crossed and case matters.
    #[test]
    fn prefilter_agrees_with_hyperscan() {
        let mut x = 0x005e_ed0f_a11e_u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"abAB\r\n\x00\xff";
        let pick = |n: usize, rnd: &mut dyn FnMut() -> u64| -> Vec<u8> {
            (0..n)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect()
        };
        let mut checked = 0;
        let mut found = 0;
        for _ in 0..20 {
            let lits: Vec<(Vec<u8>, bool)> = (0..200)
                .map(|_| {
                    let len = 1 + (rnd() % 9) as usize;
                    let nocase = rnd() % 2 == 0;
                    let mut l = pick(len, &mut rnd);
                    if nocase {
                        l.make_ascii_lowercase();
                    }
                    (l, nocase)
                })
                .collect();
            let pf = Prefilter::new(&lits).unwrap();
            let mut hs = Literals::new(&lits).unwrap();
            let mut marks = Marks::default();
            for _ in 0..100 {
                let len = (rnd() % 300) as usize;
                let hay = pick(len, &mut rnd);
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                marks.begin(pf.len());
                pf.scan(&hay, &mut marks, |i| ours.push(i));
                hs.scan(&hay, &mut |i| theirs.push(i));
                ours.sort_unstable();
                theirs.sort_unstable();
                theirs.dedup();
                assert_eq!(ours, theirs, "haystack {hay:?}");
                checked += 1;
                found += ours.len();
            }
        }
        assert_eq!(checked, 2000);
        assert!(found > 10_000, "{found}");
    }
}
