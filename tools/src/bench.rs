//! `ally-tools bench`: single-core throughput of the engine's prefilter and full evaluation over
//! the synthetic mix and over 1500-byte frames, per packet (`EngineConfig::default()`) and in
//! Ally's boot configuration (stream tracking and IP reassembly, [`engine_config`]) over the
//! same frames and over realistic flows ([`crate::flows`]); the engine state per flow; and —
//! with `--features hyperscan` — Hyperscan on the same literals and payloads in the same run,
//! with a cross-check of the matched literals. `--pcap` replays captures instead ([`run_pcaps`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use ally_dpi::engine::packet::{decode, Decoded, L4};
use ally_dpi::engine::prefilter::{AcPrefilter, Marks, Prefilter};
use ally_dpi::engine::rules::Rule;
use ally_dpi::engine::stream::FLOW_SLOT_BYTES;
use ally_dpi::engine::{
    DefragStats, Direction, Engine, EngineConfig, EngineStats, Inspector, NullSink, StreamStats,
    Timestamp, Verdict,
};
use ally_dpi::rules_module::{engine_config, TableKeys};
use ally_tools::pcap;

use crate::flows::{generate_flows, generate_flows_with};
use crate::traffic::{generate, GenFrame, TrafficConfig};

/// Fixed keys for the stream tracker's and the reassembler's tables (boot takes them from a
/// random source; any value gives the same work per frame).
const BENCH_KEYS: TableKeys = TableKeys {
    stream: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
    defrag: [0x1111_2222_3333_4444, 0x5555_6666_7777_8888],
    flows: [0x9999_aaaa_bbbb_cccc, 0xdddd_eeee_ffff_0000],
};

/// Added to every timestamp of a replay pass beyond its span: longer than the stream
/// tracker's established-flow timeout (1 h) and the reassembler's 90 s memory of blocked
/// datagrams, so each pass meets none of the previous pass's state (the engine's periodic
/// expiry sweep removes it on the pass's first frame) and every pass does the same work.
const PASS_GAP_US: u64 = 4 * 3600 * 1_000_000;

/// The engine of Ally's DPI core: the boot configuration with [`BENCH_KEYS`].
/// Inspects one frame and takes whatever the engine releases (held out-of-order segments now in
/// order, judged), as the queue engine does after every frame.
pub fn inspect_and_forward(
    engine: &mut Engine,
    bytes: &[u8],
    dir: Direction,
    now: Timestamp,
) -> Verdict {
    let v = engine.inspect(bytes, dir, now, &mut NullSink);
    if engine.has_forward() {
        for d in [Direction::ToWire, Direction::FromWire] {
            while engine.take_forward(d).is_some() {}
        }
    }
    v
}

pub fn boot_engine(rules: Vec<Rule>) -> Result<Engine, String> {
    Engine::new(rules, engine_config(BENCH_KEYS)).map_err(|e| e.to_string())
}

/// Benchmark settings.
pub struct BenchOpts {
    /// Loaded rules.
    pub rules: Vec<Rule>,
    /// Traffic seed.
    pub seed: u64,
    /// Frames in the mix.
    pub frames: usize,
    /// Share of data frames carrying a fast pattern.
    pub hit_share: f64,
    /// Minimum time per measurement.
    pub min_time: Duration,
}

struct Rate {
    gbps: f64,
    mpps: f64,
    /// Share of the wall time this thread was on a CPU (the machine may be shared).
    cpu_share: f64,
}

/// `struct timespec` of Linux x86-64.
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

unsafe extern "C" {
    /// POSIX `clock_gettime` (glibc).
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// Linux's `CLOCK_THREAD_CPUTIME_ID`.
const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

/// Nanoseconds this thread has spent on a CPU, so figures are per core even when other
/// processes compete for the cores. `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` brings the
/// scheduler's count up to date when read; `/proc/thread-self/schedstat`, read before, moves
/// only at scheduler ticks (4 ms here), which quantized 50 ms slices of one or two passes.
fn thread_cpu_ns() -> Option<u64> {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec` for the duration of the call.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn measure(
    min: Duration,
    bytes_per_pass: usize,
    frames_per_pass: usize,
    mut pass: impl FnMut(),
) -> Rate {
    // `ALLY_BENCH_PASSES=N`: exactly N passes per figure, for instruction counts under
    // valgrind (callgrind/cachegrind), which do not depend on the machine's other load.
    if let Some(n) = std::env::var("ALLY_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let w0 = Instant::now();
        (0..n).for_each(|_| pass());
        let per_sec = n as f64 / w0.elapsed().as_secs_f64().max(1e-9);
        return Rate {
            gbps: bytes_per_pass as f64 * per_sec * 8.0 / 1e9,
            mpps: frames_per_pass as f64 * per_sec / 1e6,
            cpu_share: 1.0,
        };
    }
    pass(); // warm caches
            // Time in slices of >= 50 ms and report the median slice: the machine may be shared, and
            // CPU time (not wall time) keeps time-slicing by other processes out of the figures.
    let start = Instant::now();
    let (mut rates, mut shares) = (Vec::new(), Vec::new());
    while start.elapsed() < min || rates.len() < 5 {
        let (w0, c0) = (Instant::now(), thread_cpu_ns());
        let mut passes = 0u64;
        while w0.elapsed() < Duration::from_millis(50) {
            pass();
            passes += 1;
        }
        let wall = w0.elapsed().as_secs_f64();
        let cpu = match (c0, thread_cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => wall,
        };
        rates.push(passes as f64 / cpu);
        shares.push(cpu / wall);
    }
    rates.sort_by(f64::total_cmp);
    shares.sort_by(f64::total_cmp);
    let passes_per_sec = rates[rates.len() / 2];
    Rate {
        gbps: bytes_per_pass as f64 * passes_per_sec * 8.0 / 1e9,
        mpps: frames_per_pass as f64 * passes_per_sec / 1e6,
        cpu_share: shares[shares.len() / 2],
    }
}

fn print_rate(label: &str, r: &Rate) {
    println!(
        "  {label:<46} {:>7.2} Gbps {:>7.3} Mpps  (on-CPU {:.0}% of wall time)",
        r.gbps,
        r.mpps,
        r.cpu_share * 100.0
    );
}

fn run_set(name: &str, engine: &mut Engine, frames: &[GenFrame], timed: &[usize], min: Duration) {
    // Warm-up over every frame (handshakes establish the flows the timed frames belong to).
    let mut verdicts = [0usize; 4];
    for f in frames {
        let dir = if f.to_server {
            Direction::ToWire
        } else {
            Direction::FromWire
        };
        let v = inspect_and_forward(engine, &f.bytes, dir, Timestamp(f.ts_us));
        verdicts[v as usize] += 1;
    }
    let bytes: usize = timed.iter().map(|&i| frames[i].bytes.len()).sum();
    let hits = timed.iter().filter(|&&i| frames[i].hit).count();
    println!(
        "{name}: {} frames timed ({} bytes, avg {} B, {:.1}% carry a fast pattern); verdicts on the warm-up pass: {} pass, {} alert, {} drop",
        timed.len(),
        bytes,
        bytes / timed.len().max(1),
        100.0 * hits as f64 / timed.len().max(1) as f64,
        verdicts[Verdict::Pass as usize],
        verdicts[Verdict::Alert as usize],
        verdicts[Verdict::Drop as usize]
    );
    let mut cands = 0usize;
    let pf = measure(min, bytes, timed.len(), || {
        for &i in timed {
            cands += engine.prefilter_only(&frames[i].bytes);
        }
    });
    print_rate("(a) prefilter alone (decode + group scans)", &pf);
    let mut per_pass = 0usize;
    for &i in timed {
        per_pass += engine.prefilter_only(&frames[i].bytes);
    }
    let _ = cands;
    let before = engine.stats();
    let full = measure(min, bytes, timed.len(), || {
        for &i in timed {
            let f = &frames[i];
            let dir = if f.to_server {
                Direction::ToWire
            } else {
                Direction::FromWire
            };
            inspect_and_forward(engine, &f.bytes, dir, Timestamp(f.ts_us));
        }
    });
    print_rate("(b) full evaluation (verdict per frame)", &full);
    let after = engine.stats();
    println!(
        "  candidate rules per frame: {:.2}; rules evaluated in full per frame: {:.2}",
        per_pass as f64 / timed.len().max(1) as f64,
        (after.evaluated - before.evaluated) as f64 / (after.frames - before.frames).max(1) as f64
    );
}

fn dir_of(f: &GenFrame) -> Direction {
    if f.to_server {
        Direction::ToWire
    } else {
        Direction::FromWire
    }
}

/// A trace replayed pass after pass through one engine, each pass later than the last by the
/// trace's span plus [`PASS_GAP_US`] (see there).
/// The first pass starts [`PASS_GAP_US`] after `clock`, the latest time the engine has seen
/// (which each pass advances), so one engine can replay several traces in turn.
struct Replay<'a> {
    frames: &'a [(Direction, u64, &'a [u8])],
    span: u64,
    /// Added to the trace's timestamps on the first pass.
    offset: u64,
    pass: u64,
}

impl<'a> Replay<'a> {
    fn new(frames: &'a [(Direction, u64, &'a [u8])], clock: u64) -> Replay<'a> {
        let first = frames.iter().map(|f| f.1).min().unwrap_or(0);
        let last = frames.iter().map(|f| f.1).max().unwrap_or(0);
        Replay {
            frames,
            span: last - first + PASS_GAP_US,
            offset: (clock + PASS_GAP_US).saturating_sub(first),
            pass: 0,
        }
    }

    /// The latest time the passes so far gave the engine.
    fn clock(&self) -> u64 {
        let last = self.frames.iter().map(|f| f.1).max().unwrap_or(0);
        last + self.offset + self.pass.saturating_sub(1) * self.span
    }

    /// One pass; verdict counts (pass, alert, drop, hold).
    fn run(&mut self, engine: &mut Engine) -> [usize; 4] {
        let shift = self.offset + self.pass * self.span;
        self.pass += 1;
        let mut v = [0usize; 4];
        for &(dir, ts, bytes) in self.frames {
            v[inspect_and_forward(engine, bytes, dir, Timestamp(ts + shift)) as usize] += 1;
        }
        v
    }
}

/// What the boot configuration did with one pass: verdicts and why frames were dropped.
/// The engine's counters at one moment.
struct Snap(EngineStats, StreamStats, DefragStats);

fn snap(e: &Engine) -> Snap {
    Snap(e.stats(), e.stream_stats(), e.defrag_stats())
}

fn print_pass(engine: &Engine, before: Snap, verdicts: [usize; 4]) {
    let Snap(before, sb, db) = before;
    let s = engine.stats();
    let st = engine.stream_stats();
    let d = st.drops.since(&sb.drops);
    println!(
        "  one pass: {} pass, {} alert, {} drop, {} held ({} released) (stream {}: out-of-order {}, out-of-window {}, overlap {}, blocked {}, malformed {}, flow-limit {}, memory-limit {}, other {}; fragments {}); {} fragments forwarded, {} datagrams reassembled; {} alert records",
        verdicts[Verdict::Pass as usize],
        verdicts[Verdict::Alert as usize],
        verdicts[Verdict::Drop as usize],
        verdicts[Verdict::Hold as usize],
        s.released - before.released,
        s.stream_dropped - before.stream_dropped,
        d.out_of_order,
        d.out_of_window,
        d.overlap_mismatch,
        d.blocked,
        d.malformed,
        d.flow_limit,
        d.memory_limit,
        d.rst_out_of_window + d.rst_not_exact + d.syn_on_established + d.after_reset,
        s.frag_dropped - before.frag_dropped,
        s.frag_forwarded - before.frag_forwarded,
        engine.defrag_stats().completed - db.completed,
        s.alerts_emitted - before.alerts_emitted,
    );
    println!(
        "  stream: {} flows created, {} closed, {} reset, {} expired, {} evicted, {} midstream",
        st.created - sb.created,
        st.closed - sb.closed,
        st.reset - sb.reset,
        st.expired - sb.expired,
        st.evicted - sb.evicted,
        st.midstream - sb.midstream
    );
}

/// Full evaluation in the boot configuration over every frame of `frames` (the tracker needs
/// each flow whole, so no frame is left out of the timing).
fn run_boot_set(
    name: &str,
    engine: &mut Engine,
    clock: &mut u64,
    frames: &[GenFrame],
    min: Duration,
) {
    let trace: Vec<(Direction, u64, &[u8])> = frames
        .iter()
        .map(|f| (dir_of(f), f.ts_us, &f.bytes[..]))
        .collect();
    let bytes: usize = frames.iter().map(|f| f.bytes.len()).sum();
    let full_frames = frames.iter().filter(|f| f.bytes.len() == 1514).count();
    let hits = frames.iter().filter(|f| f.hit).count();
    let mut replay = Replay::new(&trace, *clock);
    let before = snap(engine);
    let verdicts = replay.run(engine);
    println!(
        "{name}: {} frames timed ({} bytes, avg {} B, {:.0}% of them 1514 B, {:.1}% carry a fast pattern)",
        frames.len(),
        bytes,
        bytes / frames.len().max(1),
        100.0 * full_frames as f64 / frames.len().max(1) as f64,
        100.0 * hits as f64 / frames.len().max(1) as f64,
    );
    print_pass(engine, before, verdicts);
    let before = engine.stats();
    let full = measure(min, bytes, frames.len(), || {
        replay.run(engine);
    });
    *clock = replay.clock();
    print_rate("(c) boot configuration: full evaluation", &full);
    let after = engine.stats();
    println!(
        "  rules evaluated in full per frame: {:.2}",
        (after.evaluated - before.evaluated) as f64 / (after.frames - before.frames).max(1) as f64
    );
}

/// Engine state per tracked flow: the slot sizes, and the heap the engine grows by while
/// thousands of flows are open at once (the per-direction bytes kept for matching context).
fn state_per_flow(engine: &mut Engine, clock: u64, cfg: &TrafficConfig) {
    let slots = engine_config(BENCH_KEYS)
        .stream
        .map_or(0, |s| s.max_flows.next_power_of_two());
    let flow_cap = EngineConfig::default().flow.capacity.next_power_of_two();
    println!(
        "state per flow: stream tracker slot {FLOW_SLOT_BYTES} B ({slots} slots preallocated, {:.1} MiB bound with retained bytes), flow table (flowbits) slot {} B ({flow_cap} slots preallocated)",
        engine.stream_bound_bytes() as f64 / 1048576.0,
        engine.flow_table_bytes() / flow_cap,
    );
    let frames = generate_flows_with(
        &TrafficConfig {
            frames: 150_000,
            ..cfg.clone()
        },
        2000,
    );
    let trace: Vec<(Direction, u64, &[u8])> = frames
        .iter()
        .map(|f| (dir_of(f), f.ts_us, &f.bytes[..]))
        .collect();
    // A first pass grows the engine's scratch buffers; the second, 4 h later, starts from no
    // flows (the first frame's expiry sweep) and is measured at its busiest point.
    let mut replay = Replay::new(&trace, clock);
    replay.run(engine);
    let shift = replay.offset + replay.pass * replay.span;
    let live0 = crate::alloc_count::live();
    let (mut best_flows, mut best_heap) = (0u64, 0isize);
    for (i, &(dir, ts, bytes)) in trace.iter().enumerate() {
        inspect_and_forward(engine, bytes, dir, Timestamp(ts + shift));
        if i % 256 == 0 {
            let active = engine.stream_stats().active;
            if active > best_flows {
                best_flows = active;
                best_heap = crate::alloc_count::live() as isize - live0 as isize;
            }
        }
    }
    println!(
        "  measured: {best_flows} flows open at once (up to 2000 TCP and UDP flows generated concurrently) grew the heap by {} KiB: {} B per open flow beyond its slots",
        best_heap / 1024,
        best_heap / best_flows.max(1) as isize
    );
}

/// Distinct fast-pattern literals of the rules.
pub fn fast_patterns(rules: &[Rule]) -> Vec<(Vec<u8>, bool)> {
    let set: BTreeSet<(Vec<u8>, bool)> = rules
        .iter()
        .filter_map(|r| r.fast_pattern())
        .map(|fp| {
            let b = if fp.nocase {
                fp.bytes.to_ascii_lowercase()
            } else {
                fp.bytes.to_vec()
            };
            (b, fp.nocase)
        })
        .collect();
    set.into_iter().collect()
}

/// Runs the benchmark and prints the figures.
pub fn run(o: BenchOpts) -> Result<(), String> {
    let lits = fast_patterns(&o.rules);
    let rules = o.rules;
    let mut engine =
        Engine::new(rules.clone(), EngineConfig::default()).map_err(|e| e.to_string())?;
    let mut boot = boot_engine(rules.clone())?;
    let mut clock = 0u64;
    let (gm, rm) = engine.memory_breakdown();
    println!(
        "ruleset: {} rules, {} groups, {} distinct fast patterns; compiled memory {:.1} MiB (prefilters {:.1} MiB, rules+regexes {:.1} MiB); flow table {:.1} MiB",
        engine.rule_count(),
        engine.group_count(),
        lits.len(),
        (gm + rm) as f64 / 1048576.0,
        gm as f64 / 1048576.0,
        rm as f64 / 1048576.0,
        engine.flow_table_bytes() as f64 / 1048576.0
    );
    println!(
        "one thread; each figure is the median of >= 5 slices of 50 ms, per second of this \
         thread's CPU time (so other load on the machine is not counted); seed {}; {} s per figure",
        o.seed,
        o.min_time.as_secs_f64()
    );
    let literals: Vec<Vec<u8>> = lits.iter().map(|l| l.0.clone()).collect();
    let mix_cfg = TrafficConfig {
        seed: o.seed,
        frames: o.frames,
        hit_share: o.hit_share,
        fixed_size: None,
        literals: literals.clone(),
    };
    let mix = generate(&mix_cfg);
    let all: Vec<usize> = (0..mix.len()).collect();
    run_set(
        "mix (64-1514 B frames), per packet",
        &mut engine,
        &mix,
        &all,
        o.min_time,
    );
    run_boot_set(
        "mix (64-1514 B frames), boot configuration",
        &mut boot,
        &mut clock,
        &mix,
        o.min_time,
    );

    let big_cfg = TrafficConfig {
        fixed_size: Some(1514),
        ..mix_cfg.clone()
    };
    let big = generate(&big_cfg);
    let data: Vec<usize> = (0..big.len()).filter(|&i| big[i].data).collect();
    let mut engine2 = Engine::new(rules, EngineConfig::default()).map_err(|e| e.to_string())?;
    run_set(
        "1500-byte IP packets (1514 B frames), per packet",
        &mut engine2,
        &big,
        &data,
        o.min_time,
    );
    run_boot_set(
        "1500-byte IP packets (1514 B data frames and their flows' handshakes), boot configuration",
        &mut boot,
        &mut clock,
        &big,
        o.min_time,
    );
    let flows = generate_flows(&mix_cfg);
    run_boot_set(
        "flows (HTTP/1.1, TLS, DNS, UDP, IP fragments), boot configuration",
        &mut boot,
        &mut clock,
        &flows,
        o.min_time,
    );
    state_per_flow(&mut boot, clock, &mix_cfg);

    // Same literals, same payloads: our prefilter against aho-corasick and Hyperscan, on every
    // set; any difference in what they report fails the benchmark.
    let mut hist = [0usize; 5];
    for l in &lits {
        hist[l.0.len().min(5) - 1] += 1;
    }
    println!(
        "fast-pattern lengths: 1 B: {}, 2 B: {}, 3 B: {}, 4 B: {}, >=5 B: {}",
        hist[0], hist[1], hist[2], hist[3], hist[4]
    );
    let mut differ = 0;
    for (name, set) in [("mix", &mix), ("1500 B", &big), ("flows", &flows)] {
        let payloads = payloads_of(set.iter().map(|f| &f.bytes[..]));
        differ += compare_literal_scans(name, &lits, &payloads, o.min_time)?;
    }
    let (gm, rm) = engine2.memory_breakdown();
    println!(
        "after the runs (regex caches warm): compiled memory {:.1} MiB (prefilters {:.1} MiB, rules+regexes {:.1} MiB)",
        (gm + rm) as f64 / 1048576.0,
        gm as f64 / 1048576.0,
        rm as f64 / 1048576.0
    );
    literal_verdict(differ)
}

/// The benchmark's result once every set's literal scans were compared.
fn literal_verdict(differ: usize) -> Result<(), String> {
    match differ {
        0 => Ok(()),
        n => Err(format!(
            "the literal scanners disagree on {n} payloads (see MISMATCH above)"
        )),
    }
}

/// The non-empty L4 payloads of frames.
fn payloads_of<'a>(frames: impl Iterator<Item = &'a [u8]>) -> Vec<&'a [u8]> {
    frames
        .filter_map(|f| match decode(f) {
            Decoded::Ip(p) if !p.payload.is_empty() => Some(p.payload),
            _ => None,
        })
        .collect()
}

/// Scans `payloads` for all `lits` with the engine's prefilter, the aho-corasick crate and
/// (built with `--features hyperscan`) Hyperscan, prints each one's rate and returns how many
/// payloads the scanners disagree on.
fn compare_literal_scans(
    set: &str,
    lits: &[(Vec<u8>, bool)],
    payloads: &[&[u8]],
    min: Duration,
) -> Result<usize, String> {
    let bytes: usize = payloads.iter().map(|p| p.len()).sum();
    let pf = Prefilter::new(lits)?;
    let acpf = AcPrefilter::new(lits)?;
    let mut marks = Marks::default();
    println!(
        "literal scan, {set}: {} literals over {} payloads ({} bytes); ally prefilter {:.2} MiB, aho-corasick {:.1} MiB",
        lits.len(),
        payloads.len(),
        bytes,
        pf.memory_usage() as f64 / 1048576.0,
        acpf.memory_usage() as f64 / 1048576.0
    );
    let mut ours: Vec<Vec<usize>> = vec![Vec::new(); payloads.len()];
    for (i, p) in payloads.iter().enumerate() {
        marks.begin(pf.len());
        pf.scan(p, &mut marks, |id| ours[i].push(id));
        ours[i].sort_unstable();
    }
    let mut n = 0usize;
    let ally = measure(min, bytes, payloads.len(), || {
        for p in payloads {
            marks.begin(pf.len());
            pf.scan(p, &mut marks, |_| n += 1);
        }
    });
    print_rate("ally prefilter, all literals", &ally);
    let mut differ = 0usize;
    for (i, p) in payloads.iter().enumerate() {
        let mut v = Vec::new();
        marks.begin(acpf.len());
        acpf.scan(p, &mut marks, |id| v.push(id));
        v.sort_unstable();
        if v != ours[i] {
            differ += 1;
            if differ <= 3 {
                println!(
                    "  MISMATCH payload {i}: ally {:?} aho-corasick {v:?}",
                    ours[i]
                );
            }
        }
    }
    let acr = measure(min, bytes, payloads.len(), || {
        for p in payloads {
            marks.begin(acpf.len());
            acpf.scan(p, &mut marks, |_| n += 1);
        }
    });
    print_rate("aho-corasick crate (overlapping DFA), same", &acr);
    let matched: usize = ours.iter().map(Vec::len).sum();
    println!("  {matched} literal matches; aho-corasick differs on {differ} payloads");
    Ok(differ + hyperscan_compare(lits, payloads, &ours, bytes, min, &ally))
}

#[cfg(feature = "hyperscan")]
fn hyperscan_compare(
    lits: &[(Vec<u8>, bool)],
    payloads: &[&[u8]],
    ours: &[Vec<usize>],
    bytes: usize,
    min: Duration,
    ac: &Rate,
) -> usize {
    let mut hs = match crate::hs::Literals::new(lits) {
        Ok(h) => h,
        Err(e) => {
            println!("hyperscan: {e}");
            return 0;
        }
    };
    let mut mismatches = 0usize;
    let mut matched = 0usize;
    for (i, p) in payloads.iter().enumerate() {
        let mut theirs = Vec::new();
        hs.scan(p, &mut |id| theirs.push(id));
        theirs.sort_unstable();
        theirs.dedup();
        matched += theirs.len();
        if theirs != ours[i] {
            mismatches += 1;
            if mismatches <= 3 {
                println!(
                    "  MISMATCH payload {i}: ally {:?} hyperscan {:?}",
                    ours[i], theirs
                );
            }
        }
    }
    println!("  hyperscan: {matched} literal matches, differs on {mismatches} payloads");
    let mut n = 0usize;
    let r = measure(min, bytes, payloads.len(), || {
        for p in payloads {
            hs.scan(p, &mut |_| n += 1);
        }
    });
    print_rate("hyperscan 5.4 (libhs), all literals", &r);
    println!(
        "  ratio ally/hyperscan: {:.2}x (target >= 0.5x); hyperscan database {:.1} MiB",
        ac.gbps / r.gbps,
        hs.size() as f64 / 1048576.0
    );
    mismatches
}

#[cfg(not(feature = "hyperscan"))]
fn hyperscan_compare(
    _: &[(Vec<u8>, bool)],
    _: &[&[u8]],
    _: &[Vec<usize>],
    _: usize,
    _: Duration,
    _: &Rate,
) -> usize {
    println!("  hyperscan: not built (apt-get install libhyperscan-dev; cargo run --release -p ally-tools --features hyperscan -- bench)");
    0
}

/// Settings of a capture replay.
pub struct PcapOpts {
    /// Loaded rules.
    pub rules: Vec<Rule>,
    /// A pcap file, or a directory whose files are all replayed (in name order).
    pub path: std::path::PathBuf,
    /// Minimum time per measurement.
    pub min_time: Duration,
}

/// The pcap files of `path`: itself, or the regular files of a directory in name order.
fn capture_files(path: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

/// Endpoints of a frame's flow, in a canonical order, and whether the sender is the first of
/// them; `None` for frames that are not IP.
type FlowKey = (Vec<u8>, Vec<u8>, u8);

fn flow_key(frame: &[u8]) -> Option<(FlowKey, bool, Option<u8>)> {
    let Decoded::Ip(p) = decode(frame) else {
        return None;
    };
    let (sp, dp) = p.ports();
    let a = format!("{:?}/{sp}", p.src).into_bytes();
    let b = format!("{:?}/{dp}", p.dst).into_bytes();
    let flags = match p.l4 {
        L4::Tcp { flags, .. } => Some(flags),
        _ => None,
    };
    Some(if a <= b {
        ((a, b, p.proto), true, flags)
    } else {
        ((b, a, p.proto), false, flags)
    })
}

/// Directions as Ally would see them with the client behind it: a flow's client (the sender of
/// its first SYN, the receiver of a SYN-ACK seen first, else the sender of its first frame)
/// sends `ToWire`. Frames that are not IP go `ToWire`.
fn directions(frames: &[Vec<u8>]) -> Vec<Direction> {
    // Per flow: whether its first endpoint is the client.
    let mut client_first: BTreeMap<FlowKey, bool> = BTreeMap::new();
    frames
        .iter()
        .map(|f| {
            let Some((key, sender_first, flags)) = flow_key(f) else {
                return Direction::ToWire;
            };
            // SYN without ACK: the sender is the client; SYN-ACK: the receiver is.
            let sender_is_client = !matches!(flags, Some(fl) if fl & 0x12 == 0x12);
            let first_is_client = *client_first
                .entry(key)
                .or_insert(sender_first == sender_is_client);
            if sender_first == first_is_client {
                Direction::ToWire
            } else {
                Direction::FromWire
            }
        })
        .collect()
}

/// Replays captures through the boot configuration, both directions (see [`directions`]),
/// every file after the last one's flows have expired, and reports the throughput per core and
/// what the engine did with the frames.
pub fn run_pcaps(o: PcapOpts) -> Result<(), String> {
    let files = capture_files(&o.path)?;
    let single = files.len() == 1 && !o.path.is_dir();
    let mut frames: Vec<(Direction, u64, Vec<u8>)> = Vec::new();
    let (mut used, mut skipped_frames) = (0usize, 0usize);
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut base = 1_795_449_600_000_000u64;
    for path in &files {
        let read = std::fs::File::open(path)
            .map_err(|e| e.to_string())
            .and_then(|mut f| pcap::read_capture(&mut f));
        let cap = match read {
            Ok(c) => c,
            Err(e) if single => return Err(format!("{}: {e}", path.display())),
            Err(e) => {
                // Group the reasons ("truncated record data at byte N" counts as one).
                let reason = e.split(" at byte ").next().unwrap_or(&e).to_string();
                *refused.entry(reason).or_default() += 1;
                continue;
            }
        };
        let eth: Vec<(u64, Vec<u8>)> = cap
            .records
            .iter()
            .filter_map(|r| pcap::ethernet_frame(cap.linktype, &r.data).map(|f| (r.ts_us, f)))
            .collect();
        skipped_frames += cap.records.len() - eth.len();
        if cap.records.is_empty() {
            *refused.entry("no records".into()).or_default() += 1;
            continue;
        }
        if eth.is_empty() {
            *refused
                .entry(format!(
                    "no frames of a link type replayed here (link type {})",
                    cap.linktype
                ))
                .or_default() += 1;
            continue;
        }
        used += 1;
        let first = eth.iter().map(|f| f.0).min().unwrap_or(0);
        let last = eth.iter().map(|f| f.0).max().unwrap_or(0);
        let dirs = directions(&eth.iter().map(|f| f.1.clone()).collect::<Vec<_>>());
        for ((ts, f), d) in eth.into_iter().zip(dirs) {
            frames.push((d, base + (ts - first), f));
        }
        base += last - first + PASS_GAP_US;
    }
    if frames.is_empty() {
        return Err(format!("{}: no frames to replay", o.path.display()));
    }
    let lits = fast_patterns(&o.rules);
    let mut engine = boot_engine(o.rules)?;
    let trace: Vec<(Direction, u64, &[u8])> =
        frames.iter().map(|(d, t, f)| (*d, *t, &f[..])).collect();
    let bytes: usize = trace.iter().map(|f| f.2.len()).sum();
    let to_wire = trace.iter().filter(|f| f.0 == Direction::ToWire).count();
    println!(
        "captures: {} of {} files replayed ({} frames of other link types left out); {} frames, \
         {} bytes (avg {} B), {to_wire} to_wire / {} from_wire",
        used,
        files.len(),
        skipped_frames,
        trace.len(),
        bytes,
        bytes / trace.len(),
        trace.len() - to_wire
    );
    for (why, n) in &refused {
        println!("  {n} files not replayed: {why}");
    }
    let mut replay = Replay::new(&trace, 0);
    let before = snap(&engine);
    let verdicts = replay.run(&mut engine);
    let s = engine.stats();
    println!(
        "  {} frames not IP; {} rule matches, {} pcre step limits",
        s.not_ip - before.0.not_ip,
        s.matches - before.0.matches,
        s.pcre_limit - before.0.pcre_limit
    );
    print_pass(&engine, before, verdicts);
    let r = measure(o.min_time, bytes, trace.len(), || {
        replay.run(&mut engine);
    });
    print_rate("(c) boot configuration: full evaluation", &r);
    let payloads = payloads_of(trace.iter().map(|f| f.2));
    literal_verdict(compare_literal_scans(
        "captures", &lits, &payloads, o.min_time,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::generate_flows;

    fn tiny_rules() -> Vec<Rule> {
        ally_dpi::engine::rules::parse_rules(
            "drop tcp any any -> any any (msg:\"evil\"; content:\"EVILSTRING\"; sid:1;)\n",
            &ally_dpi::engine::vars::Vars::new(),
        )
        .rules
    }

    #[test]
    fn directions_follow_the_client() {
        let frames = generate_flows(&TrafficConfig {
            seed: 4,
            frames: 3000,
            hit_share: 0.0,
            fixed_size: None,
            literals: Vec::new(),
        });
        let bytes: Vec<Vec<u8>> = frames.iter().map(|f| f.bytes.clone()).collect();
        let dirs = directions(&bytes);
        for (f, d) in frames.iter().zip(dirs) {
            assert_eq!(d, dir_of(f));
        }
    }

    #[test]
    fn pcap_written_then_replayed_gives_the_same_verdicts() {
        let frames = generate_flows(&TrafficConfig {
            seed: 5,
            frames: 4000,
            hit_share: 0.05,
            fixed_size: None,
            literals: vec![b"EVILSTRING".to_vec()],
        });
        let dir = std::env::temp_dir().join(format!("ally-bench-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("flows.pcap");
        let mut w = Vec::new();
        pcap::write_header(&mut w, 65535).unwrap();
        for f in &frames {
            pcap::write_record(&mut w, f.ts_us, f.bytes.len() as u32, &f.bytes).unwrap();
        }
        std::fs::write(&file, &w).unwrap();
        std::fs::write(dir.join("not-a.pcap"), [0x0a, 0x0d, 0x0d, 0x0a, 0, 0]).unwrap();
        // Straight through the boot engine, in the generator's directions...
        let mut direct = boot_engine(tiny_rules()).unwrap();
        let mut want = [0usize; 4];
        for f in &frames {
            let v = inspect_and_forward(&mut direct, &f.bytes, dir_of(f), Timestamp(f.ts_us));
            want[v as usize] += 1;
        }
        assert!(want[Verdict::Drop as usize] > 5, "{want:?}");
        // ...and read back from the file, with directions from the flows: the same verdicts.
        let cap = pcap::read_capture(&mut std::fs::File::open(&file).unwrap()).unwrap();
        let eth: Vec<Vec<u8>> = cap
            .records
            .iter()
            .map(|r| pcap::ethernet_frame(cap.linktype, &r.data).unwrap())
            .collect();
        assert_eq!(eth.len(), frames.len());
        let dirs = directions(&eth);
        let mut replayed = boot_engine(tiny_rules()).unwrap();
        let mut got = [0usize; 4];
        for ((r, f), d) in cap.records.iter().zip(&eth).zip(dirs) {
            got[inspect_and_forward(&mut replayed, f, d, Timestamp(r.ts_us)) as usize] += 1;
        }
        assert_eq!(got, want);
        // The directory replay takes the good file and refuses the pcapng one.
        assert!(run_pcaps(PcapOpts {
            rules: tiny_rules(),
            path: dir.clone(),
            min_time: Duration::from_millis(1),
        })
        .is_ok());
        let e = run_pcaps(PcapOpts {
            rules: tiny_rules(),
            path: dir.join("not-a.pcap"),
            min_time: Duration::from_millis(1),
        })
        .unwrap_err();
        assert!(e.contains("pcapng"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
