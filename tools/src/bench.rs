//! `ally-tools bench`: single-core throughput of the engine's prefilter and full evaluation over
//! the synthetic mix and over 1500-byte frames, and — with `--features hyperscan` — Hyperscan on
//! the same literals and payloads in the same run, with a cross-check of the matched literals.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ally_dpi::engine::packet::{decode, Decoded};
use ally_dpi::engine::prefilter::{AcPrefilter, Marks, Prefilter};
use ally_dpi::engine::rules::Rule;
use ally_dpi::engine::{Direction, Engine, EngineConfig, Inspector, NullSink, Timestamp, Verdict};

use crate::traffic::{generate, GenFrame, TrafficConfig};

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

/// Nanoseconds this thread has spent on a CPU (Linux `schedstat`), so figures are per core even
/// when other processes compete for the cores.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn measure(
    min: Duration,
    bytes_per_pass: usize,
    frames_per_pass: usize,
    mut pass: impl FnMut(),
) -> Rate {
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
    let mut verdicts = [0usize; 3];
    for f in frames {
        let dir = if f.to_server {
            Direction::ToWire
        } else {
            Direction::FromWire
        };
        let v = engine.inspect(&f.bytes, dir, Timestamp(f.ts_us), &mut NullSink);
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
            engine.inspect(&f.bytes, dir, Timestamp(f.ts_us), &mut NullSink);
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
        "mix (64-1514 B frames)",
        &mut engine,
        &mix,
        &all,
        o.min_time,
    );

    let big_cfg = TrafficConfig {
        fixed_size: Some(1514),
        ..mix_cfg
    };
    let big = generate(&big_cfg);
    let data: Vec<usize> = (0..big.len()).filter(|&i| big[i].data).collect();
    let mut engine2 = Engine::new(rules, EngineConfig::default()).map_err(|e| e.to_string())?;
    run_set(
        "1500-byte IP packets (1514 B frames)",
        &mut engine2,
        &big,
        &data,
        o.min_time,
    );

    // Same literals, same payloads: our prefilter vs Hyperscan.
    let payloads: Vec<&[u8]> = mix
        .iter()
        .filter_map(|f| match decode(&f.bytes) {
            Decoded::Ip(p) if !p.payload.is_empty() => Some(p.payload),
            _ => None,
        })
        .collect();
    let bytes: usize = payloads.iter().map(|p| p.len()).sum();
    let pf = Prefilter::new(&lits)?;
    let acpf = AcPrefilter::new(&lits)?;
    let mut marks = Marks::default();
    println!(
        "literal scan: {} literals over {} payloads ({} bytes); ally prefilter {:.2} MiB, aho-corasick {:.1} MiB",
        lits.len(),
        payloads.len(),
        bytes,
        pf.memory_usage() as f64 / 1048576.0,
        acpf.memory_usage() as f64 / 1048576.0
    );
    let mut hist = [0usize; 5];
    for l in &lits {
        hist[l.0.len().min(5) - 1] += 1;
    }
    println!(
        "  literal lengths: 1 B: {}, 2 B: {}, 3 B: {}, 4 B: {}, >=5 B: {}",
        hist[0], hist[1], hist[2], hist[3], hist[4]
    );
    let mut ours: Vec<Vec<usize>> = vec![Vec::new(); payloads.len()];
    for (i, p) in payloads.iter().enumerate() {
        marks.begin(pf.len());
        pf.scan(p, &mut marks, |id| ours[i].push(id));
        ours[i].sort_unstable();
    }
    let mut n = 0usize;
    let ac = measure(o.min_time, bytes, payloads.len(), || {
        for p in &payloads {
            marks.begin(pf.len());
            pf.scan(p, &mut marks, |_| n += 1);
        }
    });
    print_rate("ally prefilter (hashed windows), all literals", &ac);
    let mut mismatches = 0usize;
    for (i, p) in payloads.iter().enumerate() {
        let mut v = Vec::new();
        marks.begin(acpf.len());
        acpf.scan(p, &mut marks, |id| v.push(id));
        v.sort_unstable();
        mismatches += usize::from(v != ours[i]);
    }
    let acr = measure(o.min_time, bytes, payloads.len(), || {
        for p in &payloads {
            marks.begin(acpf.len());
            acpf.scan(p, &mut marks, |_| n += 1);
        }
    });
    print_rate("aho-corasick crate (overlapping DFA), same", &acr);
    println!("  aho-corasick vs hashed windows: {mismatches} payloads differ");
    hyperscan_compare(&lits, &payloads, &ours, bytes, o.min_time, &ac);
    let (gm, rm) = engine2.memory_breakdown();
    println!(
        "after the runs (regex caches warm): compiled memory {:.1} MiB (prefilters {:.1} MiB, rules+regexes {:.1} MiB)",
        (gm + rm) as f64 / 1048576.0,
        gm as f64 / 1048576.0,
        rm as f64 / 1048576.0
    );
    Ok(())
}

#[cfg(feature = "hyperscan")]
fn hyperscan_compare(
    lits: &[(Vec<u8>, bool)],
    payloads: &[&[u8]],
    ours: &[Vec<usize>],
    bytes: usize,
    min: Duration,
    ac: &Rate,
) {
    let mut hs = match crate::hs::Literals::new(lits) {
        Ok(h) => h,
        Err(e) => {
            println!("hyperscan: {e}");
            return;
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
    println!(
        "cross-check: {} payloads, {} literal matches, {} payloads differ",
        payloads.len(),
        matched,
        mismatches
    );
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
}

#[cfg(not(feature = "hyperscan"))]
fn hyperscan_compare(
    _: &[(Vec<u8>, bool)],
    _: &[&[u8]],
    _: &[Vec<usize>],
    _: usize,
    _: Duration,
    _: &Rate,
) {
    println!("hyperscan: not built (apt-get install libhyperscan-dev; cargo run --release -p ally-tools --features hyperscan -- bench)");
}
