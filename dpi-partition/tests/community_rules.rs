//! Parse run over the Snort 3 community ruleset, when it is available: prints how many rules load
//! and why the others do not. Skipped (with a note), not failed, when the file is absent.
//!
//! Location: `$ALLY_COMMUNITY_RULES`, else `../shared/data/snort3-community.rules` from the repo root.

use ally_dpi::engine::rules::parse_rules;
use ally_dpi::engine::vars::Vars;
use ally_dpi::engine::{blob, Engine, EngineConfig};
use std::path::PathBuf;

fn ruleset_path() -> PathBuf {
    match std::env::var_os("ALLY_COMMUNITY_RULES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/snort3-community.rules"),
    }
}

#[test]
fn community_ruleset_coverage() {
    let path = ruleset_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!(
            "SKIPPED: community ruleset not found at {} (set ALLY_COMMUNITY_RULES)",
            path.display()
        );
        return;
    };
    let parsed = parse_rules(&text, &Vars::snort_defaults());
    let total = parsed.rules.len() + parsed.rejected.len();
    println!(
        "community ruleset: {} rules, {} loaded ({:.1}%), {} not loaded",
        total,
        parsed.rules.len(),
        100.0 * parsed.rules.len() as f64 / total.max(1) as f64,
        parsed.rejected.len()
    );
    println!("not loaded, by option (a rule counts once per option it uses):");
    for (opt, n) in parsed.summary() {
        println!("  {n:5}  {opt}");
    }
    let mut reasons: std::collections::BTreeMap<String, (usize, Vec<u32>)> = Default::default();
    for r in &parsed.rejected {
        if !matches!(r.error, ally_dpi::engine::rules::RuleError::Unsupported(_)) {
            let e = reasons.entry(r.error.to_string()).or_default();
            e.0 += 1;
            if e.1.len() < 5 {
                e.1.extend(r.sid);
            }
        }
    }
    println!("not loaded for a bad or refused value:");
    for (why, (n, sids)) in &reasons {
        println!("  {n:5}  {why} (e.g. sids {sids:?})");
    }
    assert_eq!(
        total,
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .count()
    );
    assert!(!parsed.rules.is_empty());
    let no_fp: Vec<&ally_dpi::engine::Rule> = parsed
        .rules
        .iter()
        .filter(|r| r.fast_pattern().is_none())
        .collect();
    println!(
        "rules without a fast pattern (candidates for every packet of their group): {} (sids {:?}...)",
        no_fp.len(),
        no_fp.iter().take(12).map(|r| r.sid).collect::<Vec<_>>()
    );
    // Everything that loads survives the blob round trip and builds an engine.
    let b = blob::encode(&parsed.rules);
    let back = blob::decode(&b).expect("blob of loaded rules decodes");
    assert_eq!(back, parsed.rules);
    let e = Engine::new(back, EngineConfig::default()).expect("engine builds");
    let (gm, rm) = e.memory_breakdown();
    println!(
        "memory: prefilter groups {} KiB, rules+regexes {} KiB",
        gm / 1024,
        rm / 1024
    );
    println!(
        "compiled: {} rules, {} groups, {} KiB ruleset memory, blob {} KiB",
        e.rule_count(),
        e.group_count(),
        e.memory_usage() / 1024,
        b.len() / 1024
    );
}
