//! `ally-tools`: host-side commands for Ally.
//!
//! ```text
//! ally-tools rules compile <rules> [--vars FILE] -o <blob>   compile rules into a blob for GRUB module2
//! ally-tools rules check <rules> [--vars FILE]               report what loads and why the rest does not
//! ally-tools eve split <stream> --eve <out.json> --pcap <out.pcap>
//! ally-tools traffic gen --seed N [--frames N] [--hit-share F] [--rules FILE] [--flows 1] -o <out.pcap>
//! ally-tools bench [--rules FILE] [--vars FILE] [--seed N] [--frames N] [--hit-share F] [--secs S]
//! ally-tools bench --pcap FILE|DIR [--rules FILE] [--vars FILE] [--secs S]
//! ally-tools replay <in.pcap> --blob <blob> [--dir to_wire|from_wire] -o <stream>
//! ```
//!
//! Without `--vars`, Snort 3's default variables are used (every network `any`, default ports).

mod alloc_count;
mod bench;
mod flows;
#[cfg(feature = "hyperscan")]
mod hs;
mod traffic;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ally_dpi::engine::blob;
use ally_dpi::engine::rules::{parse_rules, ParsedRules};
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{Direction, Engine, EngineConfig, Inspector, MgmtWriter, Timestamp};
use ally_tools::eve::split as eve_split;
use ally_tools::{compile, pcap};

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

const USAGE: &str = "usage:
  ally-tools rules compile <rules> [--vars FILE] -o <blob>
  ally-tools rules check <rules> [--vars FILE]
  ally-tools eve split <stream> --eve <out.json> --pcap <out.pcap>
  ally-tools traffic gen --seed N [--frames N] [--hit-share F] [--rules FILE] [--vars FILE] [--flows 1] -o <out.pcap>
  ally-tools bench [--rules FILE] [--vars FILE] [--seed N] [--frames N] [--hit-share F] [--secs S]
  ally-tools bench --pcap FILE|DIR [--rules FILE] [--vars FILE] [--secs S]
  ally-tools replay <in.pcap> --blob <blob> [--dir to_wire|from_wire] -o <stream>";

/// Parsed command line: positional arguments and `--flag value` options.
struct Args {
    pos: Vec<String>,
    opts: Vec<(String, String)>,
}

impl Args {
    fn parse(raw: &[String]) -> Result<Args, String> {
        let mut pos = Vec::new();
        let mut opts = Vec::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if a.starts_with('-') && a.len() > 1 {
                let v = it
                    .next()
                    .ok_or_else(|| format!("option {a} needs a value"))?;
                opts.push((a.clone(), v.clone()));
            } else {
                pos.push(a.clone());
            }
        }
        Ok(Args { pos, opts })
    }

    fn opt(&self, names: &[&str]) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self.opts.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(format!("unknown option {k}")),
            None => Ok(()),
        }
    }

    fn num<T: std::str::FromStr>(&self, names: &[&str], default: T) -> Result<T, String> {
        match self.opt(names) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("{}: `{v}` is not a valid number", names[0])),
            None => Ok(default),
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_vars(args: &Args) -> Result<Vars, String> {
    match args.opt(&["--vars"]) {
        Some(p) => compile::vars(Some(&read(Path::new(p))?)).map_err(|e| format!("{p}: {e}")),
        None => compile::vars(None).map_err(|e| e.to_string()),
    }
}

fn load_rules(path: &Path, args: &Args) -> Result<ParsedRules, String> {
    Ok(parse_rules(&read(path)?, &load_vars(args)?))
}

fn print_report(p: &ParsedRules, verbose: bool) {
    let total = p.rules.len() + p.rejected.len();
    println!(
        "loaded {} of {} rules; {} not loaded",
        p.rules.len(),
        total,
        p.rejected.len()
    );
    if p.rejected.is_empty() {
        return;
    }
    if verbose {
        println!("not loaded:");
        for r in &p.rejected {
            println!("  {r}");
        }
    }
    println!("not loaded, by option (a rule counts once per option):");
    for (opt, n) in p.summary() {
        println!("  {n:6}  {opt}");
    }
}

fn community_rules_default() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ALLY_COMMUNITY_RULES") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("../shared/data/snort3-community.rules");
    p.exists().then_some(p)
}

fn cmd_rules(sub: &str, args: &Args) -> Result<ExitCode, String> {
    let path = args.pos.get(2).ok_or("missing <rules> file")?;
    match sub {
        "compile" => {
            args.check_known(&["--vars", "-o", "--output"])?;
            let out = args.opt(&["-o", "--output"]).ok_or("missing -o <blob>")?;
            let p = load_rules(Path::new(path), args)?;
            print_report(&p, true);
            // Self-check: what Ally will run is exactly what was compiled.
            let b = compile::encode_checked(&p.rules).map_err(|e| e.to_string())?;
            // Build the engine from the blob as Ally will, and show its boot line and the heap
            // that takes (a bump allocator needs the total, a freeing one the peak).
            let mark = alloc_count::start();
            let engine =
                Engine::from_blob(&b, EngineConfig::default()).map_err(|e| e.to_string())?;
            let (total, peak) = alloc_count::since(mark);
            println!("{}", engine.summary());
            println!(
                "loading it allocates {:.1} MiB in total, {:.1} MiB at peak (flow table included)",
                total as f64 / 1048576.0,
                peak as f64 / 1048576.0
            );
            println!(
                "Ally sizes its heap for it at {} MiB (a smaller heap= is refused)",
                ally_dpi::rules_module::heap_needed(b.len() as u64) >> 20
            );
            fs::write(out, &b).map_err(|e| format!("{out}: {e}"))?;
            println!(
                "wrote {out}: {} rules, {} bytes (format v{})",
                p.rules.len(),
                b.len(),
                blob::BLOB_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
        "check" => {
            args.check_known(&["--vars"])?;
            let p = load_rules(Path::new(path), args)?;
            print_report(&p, true);
            Ok(if p.rules.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        other => Err(format!("unknown `rules {other}`")),
    }
}

fn cmd_eve_split(args: &Args) -> Result<ExitCode, String> {
    args.check_known(&["--eve", "--pcap"])?;
    let input = args.pos.get(2).ok_or("missing <stream> file")?;
    let eve_path = args.opt(&["--eve"]).ok_or("missing --eve <out.json>")?;
    let pcap_path = args.opt(&["--pcap"]).ok_or("missing --pcap <out.pcap>")?;
    let raw = fs::read(input).map_err(|e| format!("{input}: {e}"))?;
    // A serial capture may hold stray non-UTF-8 bytes: keep the lines, replace the bytes.
    let stream = String::from_utf8_lossy(&raw);
    let mut eve =
        BufWriter::new(fs::File::create(eve_path).map_err(|e| format!("{eve_path}: {e}"))?);
    let mut pcap =
        BufWriter::new(fs::File::create(pcap_path).map_err(|e| format!("{pcap_path}: {e}"))?);
    let (a, d) = eve_split(&stream, &mut eve, &mut pcap)?;
    eve.flush().map_err(|e| e.to_string())?;
    pcap.flush().map_err(|e| e.to_string())?;
    println!("{a} alert records -> {eve_path}; {d} dropped-frame excerpts -> {pcap_path}");
    Ok(ExitCode::SUCCESS)
}

fn cmd_traffic_gen(args: &Args) -> Result<ExitCode, String> {
    args.check_known(&[
        "--seed",
        "--frames",
        "--hit-share",
        "--rules",
        "--vars",
        "--flows",
        "-o",
        "--output",
    ])?;
    let out = args
        .opt(&["-o", "--output"])
        .ok_or("missing -o <out.pcap>")?;
    let literals = match args.opt(&["--rules"]) {
        Some(r) => bench::fast_patterns(&load_rules(Path::new(r), args)?.rules)
            .into_iter()
            .map(|l| l.0)
            .collect(),
        None => {
            vec![br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*".to_vec()]
        }
    };
    let cfg = traffic::TrafficConfig {
        seed: args.num(&["--seed"], 1)?,
        frames: args.num(&["--frames"], 10_000)?,
        hit_share: args.num(&["--hit-share"], 0.02)?,
        fixed_size: None,
        literals,
    };
    let frames = if args.opt(&["--flows"]) == Some("1") {
        flows::generate_flows(&cfg)
    } else {
        traffic::generate(&cfg)
    };
    let mut w = BufWriter::new(fs::File::create(out).map_err(|e| format!("{out}: {e}"))?);
    pcap::write_header(&mut w, 65535).map_err(|e| e.to_string())?;
    for f in &frames {
        pcap::write_record(&mut w, f.ts_us, f.bytes.len() as u32, &f.bytes)
            .map_err(|e| e.to_string())?;
    }
    w.flush().map_err(|e| e.to_string())?;
    let hits = frames.iter().filter(|f| f.hit).count();
    println!(
        "wrote {out}: {} frames (seed {}), {hits} carry a rule literal",
        frames.len(),
        cfg.seed
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs a compiled blob over a pcap as the DPI core would, writing the management stream
/// (`ALLY eve` / `ALLY pcap` lines) and printing the verdict counts.
fn cmd_replay(args: &Args) -> Result<ExitCode, String> {
    args.check_known(&["--blob", "--dir", "-o", "--output"])?;
    let input = args.pos.get(1).ok_or("missing <in.pcap>")?;
    let blob_path = args.opt(&["--blob"]).ok_or("missing --blob <blob>")?;
    let out = args.opt(&["-o", "--output"]).ok_or("missing -o <stream>")?;
    let dir = match args.opt(&["--dir"]).unwrap_or("from_wire") {
        "to_wire" => Direction::ToWire,
        "from_wire" => Direction::FromWire,
        other => return Err(format!("--dir: `{other}` (use to_wire or from_wire)")),
    };
    let b = fs::read(blob_path).map_err(|e| format!("{blob_path}: {e}"))?;
    let mut engine =
        Engine::from_blob(&b, EngineConfig::default()).map_err(|e| format!("{blob_path}: {e}"))?;
    println!("{}", engine.summary());
    let mut f = fs::File::open(input).map_err(|e| format!("{input}: {e}"))?;
    let records = pcap::read_all(&mut f).map_err(|e| format!("{input}: {e}"))?;
    let mut sink = MgmtWriter::new(String::new());
    for r in &records {
        engine.inspect(&r.data, dir, Timestamp(r.ts_us), &mut sink);
    }
    fs::write(out, &sink.out).map_err(|e| format!("{out}: {e}"))?;
    let s = engine.stats();
    println!(
        "{} frames: {} passed, {} alerted, {} dropped, {} not IP; {} alert records ({} suppressed) -> {out}",
        s.frames, s.passed, s.alerted, s.dropped, s.not_ip, s.alerts_emitted, s.alerts_suppressed
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench(args: &Args) -> Result<ExitCode, String> {
    args.check_known(&[
        "--rules",
        "--vars",
        "--seed",
        "--frames",
        "--hit-share",
        "--secs",
        "--pcap",
    ])?;
    let path = match args.opt(&["--rules"]) {
        Some(p) => PathBuf::from(p),
        None => community_rules_default().ok_or(
            "no --rules given and the community ruleset is not at $ALLY_COMMUNITY_RULES or ../shared/data/snort3-community.rules",
        )?,
    };
    let p = load_rules(&path, args)?;
    println!(
        "rules: {} ({} loaded, {} not loaded)",
        path.display(),
        p.rules.len(),
        p.rejected.len()
    );
    let min_time = Duration::from_secs_f64(args.num(&["--secs"], 2.0)?);
    if let Some(pcaps) = args.opt(&["--pcap"]) {
        bench::run_pcaps(bench::PcapOpts {
            rules: p.rules,
            path: PathBuf::from(pcaps),
            min_time,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    bench::run(bench::BenchOpts {
        rules: p.rules,
        seed: args.num(&["--seed"], 1)?,
        frames: args.num(&["--frames"], 20_000)?,
        hit_share: args.num(&["--hit-share"], 0.02)?,
        min_time,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run(raw: &[String]) -> Result<ExitCode, String> {
    let args = Args::parse(raw)?;
    let p: Vec<&str> = args.pos.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["rules", sub, ..] => cmd_rules(sub, &args),
        ["eve", "split", ..] => cmd_eve_split(&args),
        ["traffic", "gen", ..] => cmd_traffic_gen(&args),
        ["bench", ..] => cmd_bench(&args),
        ["replay", ..] => cmd_replay(&args),
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    match run(&raw) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ally-tools: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_stream() {
        let stream = "boot: hello\r\nALLY eve {\"event_type\":\"alert\"}\r\n\
                      ALLY pcap 1000001 to_wire 70 0011aabb\nnoise ALLY eve {\"a\":1}\n";
        let mut eve = Vec::new();
        let mut pcap_out = Vec::new();
        let (a, d) = eve_split(stream, &mut eve, &mut pcap_out).unwrap();
        assert_eq!((a, d), (2, 1));
        assert_eq!(
            String::from_utf8(eve).unwrap(),
            "{\"event_type\":\"alert\"}\n{\"a\":1}\n"
        );
        let recs = pcap::read_all(&mut pcap_out.as_slice()).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[0],
            pcap::Record {
                ts_us: 1_000_001,
                orig_len: 70,
                data: vec![0, 0x11, 0xaa, 0xbb]
            }
        );
        let err = eve_split(
            "ALLY pcap x to_wire 1 00\n",
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.contains("line 1") && err.contains("timestamp"), "{err}");
    }

    #[test]
    fn gen_compile_replay_split_end_to_end() {
        let dir = std::env::temp_dir().join(format!("ally-tools-e2e-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
        fs::write(
            p("r.rules"),
            "drop tcp any any -> any any (msg:\"EICAR\"; content:\"EICAR-STANDARD\"; sid:1; rev:2;)\n",
        )
        .unwrap();
        let run_args = |a: &[&str]| run(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(run_args(&["rules", "compile", &p("r.rules"), "-o", &p("r.blob")]).is_ok());
        let gen = [
            "traffic",
            "gen",
            "--seed",
            "3",
            "--frames",
            "3000",
            "--hit-share",
            "0.05",
        ];
        let mut gen: Vec<&str> = gen.to_vec();
        let out = p("t.pcap");
        gen.extend(["-o", &out]);
        assert!(run_args(&gen).is_ok());
        assert!(run_args(&[
            "replay",
            &p("t.pcap"),
            "--blob",
            &p("r.blob"),
            "-o",
            &p("s.txt")
        ])
        .is_ok());
        let split = [&p("s.txt"), "--eve", &p("eve.json"), "--pcap", &p("d.pcap")];
        assert!(run_args(&[&["eve", "split"][..], &split[..]].concat()).is_ok());
        let eve = fs::read_to_string(p("eve.json")).unwrap();
        let drops = pcap::read_all(&mut fs::File::open(p("d.pcap")).unwrap()).unwrap();
        // The generator planted the EICAR string in about 5% of the data frames; every such
        // frame is dropped, alerted (rate limit: 10/s/rule) and excerpted.
        assert!(drops.len() > 20, "{} drops", drops.len());
        assert!(eve.lines().count() >= 10);
        assert!(eve
            .lines()
            .all(|l| l.contains("\"signature_id\":1") && l.contains("\"blocked\"")));
        assert!(drops
            .iter()
            .all(|d| d.data.len() <= 128 && d.orig_len as usize >= d.data.len()));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn args_errors_are_precise() {
        let a = Args::parse(&["bench".into(), "--seed".into(), "x".into()]).unwrap();
        assert_eq!(
            a.num::<u64>(&["--seed"], 1).unwrap_err(),
            "--seed: `x` is not a valid number"
        );
        assert!(Args::parse(&["--seed".into()]).is_err());
        let a = Args::parse(&[
            "rules".into(),
            "check".into(),
            "f".into(),
            "--bogus".into(),
            "1".into(),
        ])
        .unwrap();
        assert_eq!(
            a.check_known(&["--vars"]).unwrap_err(),
            "unknown option --bogus"
        );
    }

    #[test]
    fn compile_and_check_round_trip() {
        let dir = std::env::temp_dir().join(format!("ally-tools-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let rules = dir.join("r.rules");
        let vars = dir.join("vars");
        let out = dir.join("r.blob");
        fs::write(
            &rules,
            "drop tcp $EXTERNAL_NET any -> $HOME_NET 80 (msg:\"x\"; content:\"EICAR\"; sid:1;)\n\
                           alert tcp any any -> any any (msg:\"y\"; tag:session,10,packets; sid:2;)\n",
        )
        .unwrap();
        fs::write(&vars, "ipvar HOME_NET 10.0.0.0/8\n").unwrap();
        let raw: Vec<String> = [
            "rules",
            "compile",
            rules.to_str().unwrap(),
            "--vars",
            vars.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(run(&raw).unwrap(), ExitCode::SUCCESS);
        let b = fs::read(&out).unwrap();
        let loaded = blob::decode(&b).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].dst.to_string(), "10.0.0.0/8");
        let raw: Vec<String> = ["rules", "check", "/nonexistent/x.rules"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(run(&raw).unwrap_err().contains("/nonexistent/x.rules"));
        fs::remove_dir_all(&dir).ok();
    }
}
