//! End-to-end: boot the test guest under Bochs (or QEMU/KVM), with and without Ally, and judge
//! from the guest's own console and Ally's log. One Ally boot plus one baseline boot; the two
//! run in parallel (about 2 minutes each under Bochs on one CPU, plus about 1.5 minutes of
//! guest network workload: the baseline took 3.5 minutes in all).
//!
//! Run with `cargo test -p ally-tests --features e2e -- --nocapture` (scripts/test.sh does).

use ally_runner::rules::prepare_rules;
use ally_runner::{run, Mode, Outcome, RulesInput, RunOptions};
use ally_tests::{check, failures, prebuilt_ally_image};

/// The guest alone: validates the guest pipeline (disk, syslinux, kernel, initramfs, e1000,
/// slirp, the host endpoints and the guest's transfers) independently of Ally, so a failure of
/// the Ally boot can be told apart.
#[test]
fn baseline_guest_boots_and_pings() {
    let result = run(&RunOptions::new(Mode::Baseline, "e2e-baseline")).expect("baseline run");
    println!("{result}");
    assert_eq!(result.outcome, Outcome::Completed, "{}", failures(&result));
    assert!(result.guest.init_reached(), "guest init not reached");
    assert_eq!(
        result.guest.ping_passed(),
        Some(true),
        "ping 10.0.2.2 failed"
    );
    // Issue 4's workload without Ally: 16 MiB each way with SHA-256 checked on the host, two
    // e1000 reloads each followed by a smaller transfer.
    for name in ["download", "upload", "nic-reload"] {
        let c = check(&result, name);
        assert!(c.passed, "{c}\nall failures:\n{}", failures(&result));
    }
    assert!(
        result.passed(),
        "baseline checks failed:\n{}",
        failures(&result)
    );
}

/// A small rules file without variables (one `drop`, one `alert` rule), for the corrupt-blob
/// test. The Ally boot loads the runner's default, `tests/rules/inspect.rules`.
fn e2e_rules() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/e2e.rules")
}

/// Issue 2's demo boot: GRUB → Ally → the unmodified guest from disk, every check in one boot;
/// with issue 4's network workload through Ally's e1000 path and issue 5's inspection test
/// under the runner's default rules (`tests/rules/inspect.rules`, whose rule count Ally
/// reports), and issue 4's ring-base attack.
#[test]
fn ally_hides_its_region_and_guest_pings() {
    let mut opts = RunOptions::new(Mode::Ally, "e2e-ally");
    assert!(
        opts.net.is_some() && opts.rules.is_none(),
        "the default rules apply"
    );
    // 1 OS core + 1 DPI core (issue 3's first scenario; Ally's default dpi_cores=1).
    opts.cpus = 2;
    opts.ally_image = prebuilt_ally_image();
    if opts.ally_image.is_none() {
        // cargo keeps its own target directory locked while this test runs.
        opts.ally_target_dir = Some(opts.out_root.join("cargo-target"));
    }
    let result = run(&opts).expect("Ally run");
    println!("{result}");
    // Each named check, so a failure message says exactly which property broke.
    for name in [
        "run",
        // `ALLY rules loaded=4`: the rules module was found, verified and built.
        "rules",
        "init",
        "ally-region",
        "ally-guest-start",
        // MemTotal * 1024 <= 1024 MiB - Ally's region size.
        "memtotal",
        // No /sys/firmware/memmap System RAM entry overlaps Ally's region.
        "memmap",
        // The first byte after the guest's highest RAM below 4 GiB is Ally's region base.
        "probe-addr",
        // Every devmem read there is 0xFFFFFFFF: none of Ally's data.
        "devmem-read",
        // After writing 0x5a5a5a5a the read-back is still 0xFFFFFFFF.
        "devmem-write",
        // Ally logged an EPT violation for the write.
        "ept-violation",
        "canary",
        "ping",
        "exits",
        // The guest sees exactly its OS cores (the DPI core is gone from MADT and MP table).
        "guest-cpus",
        // Every DPI core's heartbeat advanced while the guest ran.
        "dpi-heartbeat",
        // The guest's INIT, SIPI, NMI and fixed IPIs at hidden APIC IDs (and an NMI to
        // all-excluding-self) never reached the DPI core, which kept beating.
        "ipi-attack",
        "no-fatal",
        "done",
        "no-guest-failures",
        // Issue 4 through Ally: 16 MiB each way and the e1000 reloads, SHA-256 checked.
        "download",
        "upload",
        "nic-reload",
        // Ally's counters: frames moved, drops only by verdict or with the receiver off.
        "nic-traffic",
        "nic-bytes",
        "nic-exits",
        "nic-wire-balance",
        // COM2 split into eve.json and dropped.pcap; the pcap holds dropped frames.
        "eve-pcap",
        // eicar.bin from the drop port is not intact, with a `blocked` alert of its sid.
        "inspect-drop",
        // eicar.bin from the alert port is intact, with an `allowed` alert of its sid.
        "inspect-alert",
        // The upload carrying the forbidden marker never reached the host intact; `blocked`.
        "inspect-upload",
        // Both NIC rings aimed at Ally's memory: Ally refused them, its memory is intact.
        "ring-attack",
    ] {
        let c = check(&result, name);
        assert!(c.passed, "{c}\nall failures:\n{}", failures(&result));
    }
    let rules = result.ally.find("rules").expect("no `ALLY rules` line");
    assert_eq!(rules.number("loaded").ok(), Some(4), "{}", rules.line);
    assert_eq!(rules.number("drop").ok(), Some(2), "{}", rules.line);
    assert!(result.passed(), "{}", failures(&result));
}

/// Operator input: an unknown option stops Ally before any guest runs, with a message naming
/// the option (issue 2, "Bad input").
#[test]
fn unknown_option_stops_ally_before_the_guest() {
    let mut opts = RunOptions::new(Mode::Ally, "e2e-bad-option");
    opts.ally_image = prebuilt_ally_image();
    if opts.ally_image.is_none() {
        opts.ally_target_dir = Some(opts.out_root.join("cargo-target"));
    }
    opts.ally_options = "log=info frobnicate=1".to_string();
    opts.timeout = std::time::Duration::from_secs(600);
    let result = run(&opts).expect("Ally run");
    println!("{result}");
    let fatal = result
        .ally
        .fatal()
        .expect("Ally printed no `ALLY fatal` line");
    assert!(
        fatal.line.contains("frobnicate"),
        "the fatal line does not name the option: {}",
        fatal.line
    );
    assert!(
        !result.ally.guest_started(),
        "a guest was started despite the bad option"
    );
    assert!(
        !result.guest.init_reached(),
        "the guest ran despite the bad option"
    );
}

/// Operator input: a rules blob whose checksum does not match stops Ally before any guest runs,
/// with a message naming the rules module and the problem (issue 5). Ally stops right after
/// reading its options, so no guest boots.
#[test]
fn corrupt_rules_blob_stops_ally_before_the_guest() {
    let mut opts = RunOptions::new(Mode::Ally, "e2e-bad-rules");
    opts.ally_image = prebuilt_ally_image();
    if opts.ally_image.is_none() {
        opts.ally_target_dir = Some(opts.out_root.join("cargo-target"));
    }
    // A good blob of the e2e rules with one payload byte flipped.
    let dir = opts.out_root.join("e2e-bad-rules-input");
    std::fs::create_dir_all(&dir).expect("input directory");
    let blob = dir.join("corrupt.blob");
    prepare_rules(
        &RulesInput::Compile {
            rules: e2e_rules(),
            vars: None,
        },
        &blob,
    )
    .expect("compile the e2e rules");
    let mut bytes = std::fs::read(&blob).expect("read the blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&blob, &bytes).expect("write the corrupt blob");
    opts.rules = Some(RulesInput::Blob(blob));
    opts.timeout = std::time::Duration::from_secs(600);
    let result = run(&opts).expect("Ally run");
    println!("{result}");
    let fatal = result
        .ally
        .fatal()
        .expect("Ally printed no `ALLY fatal` line");
    assert!(
        fatal.line.contains("rules module (boot module 1,")
            && fatal.line.contains("checksum mismatch"),
        "the fatal line does not name the rules module and the problem: {}",
        fatal.line
    );
    assert!(
        check(&result, "rules").passed,
        "{}",
        check(&result, "rules")
    );
    assert!(
        !result.ally.guest_started(),
        "a guest was started despite the corrupt rules"
    );
    assert!(
        !result.guest.init_reached(),
        "the guest ran despite the corrupt rules"
    );
}
