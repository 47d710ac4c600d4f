//! Pass/fail judgement of a run from its marker lines.
//!
//! The same checks serve `ally-run` (which prints them) and the e2e test (which asserts them),
//! so a run is judged the same way everywhere.

use std::fmt;

use crate::markers::{AllyReport, GuestReport, MarkerError};
use crate::rules::RulesExpect;

/// Guest RAM every run gives the machine, in MiB (Bochs `memory: guest=`, QEMU `-m`).
pub const GUEST_RAM_MIB: u64 = 1024;

/// What Ally makes a read of its hidden memory return (EPT-violation handler: all-ones).
pub const HIDDEN_READ_VALUE: u64 = 0xffff_ffff;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// What was seen (and, on failure, what was expected).
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
        Check {
            name,
            passed,
            detail: detail.into(),
        }
    }

    fn from_result(name: &'static str, r: Result<String, String>) -> Check {
        match r {
            Ok(d) => Check::new(name, true, d),
            Err(d) => Check::new(name, false, d),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{word} {}: {}", self.name, self.detail)
    }
}

fn marker_err(e: MarkerError) -> String {
    e.to_string()
}

/// Checks that hold with or without Ally: the guest booted, ran its script and reached the
/// network.
pub fn guest_checks(guest: &GuestReport) -> Vec<Check> {
    let mut out = vec![Check::new(
        "init",
        guest.init_reached(),
        if guest.init_reached() {
            "guest init ran"
        } else {
            "no `ALLYTEST init PASS` on the guest console"
        },
    )];
    out.push(Check::new(
        "done",
        guest.done(),
        if guest.done() {
            "guest script finished"
        } else {
            "no `ALLYTEST done` on the guest console"
        },
    ));
    out.push(match guest.ping_passed() {
        Some(true) => Check::new("ping", true, guest.find("ping").map_or("", |m| &m.line)),
        Some(false) => Check::new("ping", false, guest.find("ping").map_or("", |m| &m.line)),
        None => Check::new("ping", false, "no `ALLYTEST ping` marker"),
    });
    let failures: Vec<&str> = guest.failures().map(|m| m.line.as_str()).collect();
    out.push(Check::new(
        "no-guest-failures",
        failures.is_empty(),
        if failures.is_empty() {
            "no FAIL markers".to_string()
        } else {
            failures.join("; ")
        },
    ));
    out
}

/// The checks of a demo boot under Ally (issue 2): the guest cannot see, read or write Ally's
/// region, Ally saw the write, and the guest still reaches the network; Ally reports the rules
/// it was given (issue 5).
pub fn ally_checks(guest: &GuestReport, ally: &AllyReport, rules: &RulesExpect) -> Vec<Check> {
    let mut out = guest_checks(guest);
    out.push(Check::from_result("rules", rules_loaded(ally, rules)));
    let region = ally
        .region()
        .map_err(marker_err)
        .and_then(|r| r.ok_or_else(|| "no `ALLY region base=.. size=..` line on COM2".to_string()));
    out.push(Check::from_result(
        "ally-region",
        region
            .clone()
            .map(|(b, s)| format!("base={b:#x} size={s:#x}")),
    ));
    out.push(Check::new(
        "ally-guest-start",
        ally.guest_started(),
        if ally.guest_started() {
            "Ally started the guest"
        } else {
            "no `ALLY guest-start` line"
        },
    ));
    out.push(Check::from_result("memtotal", memtotal(guest, &region)));
    out.push(Check::from_result("memmap", memmap(guest, &region)));
    out.push(Check::from_result("probe-addr", probe_addr(guest, &region)));
    out.push(Check::from_result("devmem-read", devmem_reads(guest)));
    out.push(Check::from_result("devmem-write", devmem_write(guest)));
    out.push(Check::from_result(
        "ept-violation",
        ept_violation(guest, ally),
    ));
    out.push(match ally.canary() {
        Some("intact") => Check::new("canary", true, "ALLY canary status=intact"),
        Some(s) => Check::new("canary", false, format!("ALLY canary status={s}")),
        None => Check::new("canary", false, "no `ALLY canary` line"),
    });
    out.push(Check::from_result("exits", exits(ally)));
    out.push(Check::from_result("guest-cpus", guest_cpus(guest, ally)));
    out.push(Check::from_result("cpu-work", cpu_work(guest, ally)));
    out.push(Check::from_result(
        "os-cores-started",
        os_cores_started(ally),
    ));
    out.push(Check::from_result("cpu-hotplug", cpu_hotplug(guest, ally)));
    out.push(Check::from_result("dpi-heartbeat", dpi_heartbeat(ally)));
    out.push(Check::from_result("ipi-attack", ipi_attack(guest, ally)));
    out.push(match ally.fatal() {
        None => Check::new("no-fatal", true, "no `ALLY fatal` line"),
        Some(l) => Check::new("no-fatal", false, l.line.clone()),
    });
    out
}

/// Ally's `ALLY rules` line against what the run gave it.
fn rules_loaded(ally: &AllyReport, expect: &RulesExpect) -> Result<String, String> {
    let line = ally.find("rules");
    let seen = || line.map_or("no `ALLY rules` line".to_string(), |l| l.line.clone());
    match expect {
        RulesExpect::None => match line {
            Some(l) if l.fields.get("none:").is_some() => Ok(l.line.clone()),
            _ => Err(format!(
                "expected `ALLY rules none` (no rules module), saw: {}",
                seen()
            )),
        },
        RulesExpect::Loaded(n) => match line.map(|l| l.number("loaded")) {
            Some(Ok(got)) if got == *n as u64 => Ok(seen()),
            Some(Err(e)) => Err(e.to_string()),
            _ => Err(format!("expected `ALLY rules loaded={n}`, saw: {}", seen())),
        },
        RulesExpect::Refused(reason) => match ally.fatal() {
            Some(f) if f.line.contains("rules module") => Ok(f.line.clone()),
            _ => Err(format!(
                "the host refuses the blob ({reason}), but Ally did not stop naming the rules \
                 module; saw: {}",
                seen()
            )),
        },
    }
}

/// `(total, dpi)` from `ALLY cpus total=.. dpi=..`.
fn ally_cpus(ally: &AllyReport) -> Result<(u64, u64), String> {
    let line = ally
        .find("cpus")
        .ok_or("no `ALLY cpus total=.. dpi=..` line")?;
    Ok((
        line.number("total").map_err(marker_err)?,
        line.number("dpi").map_err(marker_err)?,
    ))
}

/// Linux's CPU list for CPUs `0..n` (`/sys/devices/system/cpu/present` format).
fn cpu_list(n: u64) -> String {
    match n {
        0 => String::new(),
        1 => "0".to_string(),
        n => format!("0-{}", n - 1),
    }
}

/// The guest sees exactly the OS cores, the CPUs minus the DPI cores, and all of them run:
/// `nproc`, the `/proc/cpuinfo` processors and the present and online CPU lists agree.
fn guest_cpus(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let (total, dpi) = ally_cpus(ally)?;
    let expected = total - dpi;
    let marker = guest
        .find("cpus")
        .ok_or("no `ALLYTEST cpus nproc=..` marker")?;
    let nproc = marker.number("nproc").map_err(marker_err)?;
    let cpuinfo = marker.number("cpuinfo").map_err(marker_err)?;
    let list = cpu_list(expected);
    let mut wrong = Vec::new();
    if nproc != expected {
        wrong.push(format!("nproc={nproc}"));
    }
    if cpuinfo != expected {
        wrong.push(format!("cpuinfo={cpuinfo}"));
    }
    for field in ["present", "online"] {
        let value = marker.fields.get(field).unwrap_or("(missing)");
        if value != list {
            wrong.push(format!("{field}={value}"));
        }
    }
    if wrong.is_empty() {
        Ok(format!(
            "guest nproc=cpuinfo={nproc}, present=online={list}: {total} CPUs - {dpi} DPI core(s)"
        ))
    } else {
        Err(format!(
            "expected {total} CPUs - {dpi} DPI core(s) = {expected} (CPUs {list}), guest shows {}",
            wrong.join(" ")
        ))
    }
}

/// Work ran on every OS core: for each guest CPU a `cpu-work` marker whose pinned loop ran
/// on that CPU.
fn cpu_work(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let (total, dpi) = ally_cpus(ally)?;
    let mut seen = Vec::new();
    for cpu in 0..total - dpi {
        let marker = guest
            .all("cpu-work")
            .find(|m| m.number("cpu").ok() == Some(cpu))
            .ok_or_else(|| format!("no `ALLYTEST cpu-work cpu={cpu}` marker"))?;
        let ran_on = marker.number("ran_on").map_err(marker_err)?;
        if ran_on != cpu {
            return Err(format!(
                "work pinned to CPU {cpu} ran on {ran_on}: {}",
                marker.line
            ));
        }
        seen.push(cpu.to_string());
    }
    Ok(format!("a pinned loop ran on CPU {}", seen.join(", ")))
}

/// With several OS cores, the guest took every CPU but CPU 0 offline and back online (an
/// INIT-SIPI-SIPI to each vCPU that had run, emulated by Ally), and work pinned to the last CPU
/// ran there afterwards.
fn cpu_hotplug(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let (total, dpi) = ally_cpus(ally)?;
    let n = total - dpi;
    if n < 2 {
        return Ok(format!("{n} OS core: nothing to take offline"));
    }
    let marker = guest
        .find("cpu-hotplug")
        .ok_or("no `ALLYTEST cpu-hotplug` marker")?;
    let last = n - 1;
    let field = |f: &str| marker.fields.get(f).unwrap_or("(missing)").to_string();
    let (offline, online) = (field("offline_list"), field("online_list"));
    let ran_on = marker.number("ran_on").map_err(marker_err)?;
    if marker.number("cpu").map_err(marker_err)? != last
        || offline != "0"
        || online != cpu_list(n)
        || ran_on != last
    {
        return Err(format!(
            "expected CPUs 1-{last} offline (online CPUs 0) then online ({}) and work on CPU \
             {last}: {}",
            cpu_list(n),
            marker.line
        ));
    }
    Ok(format!(
        "CPUs 1-{last} offline (online CPUs {offline}), online again ({online}), work ran on CPU {last}"
    ))
}

/// Every OS core was started by the guest (Ally emulates the guest's INIT and SIPI) and runs
/// the guest at power-off.
fn os_cores_started(ally: &AllyReport) -> Result<String, String> {
    let (total, dpi) = ally_cpus(ally)?;
    let cores: Vec<_> = ally.all("os-core").collect();
    if cores.len() as u64 != total - dpi {
        return Err(format!(
            "{} `ALLY os-core` lines for {} OS core(s)",
            cores.len(),
            total - dpi
        ));
    }
    if let Some(idle) = cores
        .iter()
        .find(|l| l.fields.get("state") != Some("Running"))
    {
        return Err(format!("an OS core does not run the guest: {}", idle.line));
    }
    let emulated = ally
        .find("ipi-emulated")
        .ok_or("no `ALLY ipi-emulated init=.. sipi=..` line")?;
    let sipis = emulated.number("sipi").map_err(marker_err)?;
    if sipis < total - dpi - 1 {
        return Err(format!(
            "{sipis} SIPI(s) emulated for {} application processor(s): {}",
            total - dpi - 1,
            emulated.line
        ));
    }
    Ok(format!(
        "{} OS core(s) running; {}",
        cores.len(),
        emulated.line.trim_start_matches("ALLY ")
    ))
}

/// Every DPI core reported a heartbeat that advanced.
fn dpi_heartbeat(ally: &AllyReport) -> Result<String, String> {
    let (_, dpi) = ally_cpus(ally)?;
    let mut seen = Vec::new();
    for line in ally.all("dpi-core") {
        let beats = line.number("heartbeat").map_err(marker_err)?;
        if beats < 2 {
            return Err(format!("DPI core heartbeat did not advance: {}", line.line));
        }
        seen.push(format!(
            "apic {}: {beats}",
            line.number("apic").map_err(marker_err)?
        ));
    }
    if seen.len() as u64 == dpi {
        Ok(seen.join(", "))
    } else {
        Err(format!(
            "{} `ALLY dpi-core` lines for {dpi} DPI core(s)",
            seen.len()
        ))
    }
}

/// The guest's INIT, SIPI, NMI and fixed IPIs at APIC IDs it does not see were all dropped
/// by Ally, and the DPI cores kept beating after the last drop.
fn ipi_attack(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let marker = guest
        .find("ipi-attack")
        .ok_or("no `ALLYTEST ipi-attack` marker")?;
    let sent = marker.number("sent").map_err(marker_err)?;
    let (_, dpi) = ally_cpus(ally)?;
    if dpi == 0 {
        return Ok(format!(
            "no DPI core to protect; the guest sent {sent} IPIs"
        ));
    }
    if sent == 0 {
        return Err(format!("the guest could not send any IPI: {}", marker.line));
    }
    let mut counts = Vec::new();
    for mode in ["init", "sipi", "nmi", "fixed"] {
        let line = ally
            .all("ipi-dropped")
            .find(|l| l.fields.get("mode") == Some(mode))
            .ok_or_else(|| format!("no `ALLY ipi-dropped mode={mode}` line"))?;
        let n = line.number("count").map_err(marker_err)?;
        if n == 0 {
            return Err(format!("Ally dropped no {mode} IPI aimed at a DPI core"));
        }
        counts.push(format!("{mode}={n}"));
    }
    let at_last_drop = ally
        .all("ipi-drop")
        .filter_map(|l| l.number("heartbeat").ok())
        .max()
        .ok_or("no `ALLY ipi-drop ... heartbeat=` line")?;
    let final_beats: u64 = ally
        .all("dpi-core")
        .filter_map(|l| l.number("heartbeat").ok())
        .sum();
    if final_beats <= at_last_drop {
        return Err(format!(
            "DPI heartbeat {final_beats} at power-off did not advance past {at_last_drop} at the last dropped IPI"
        ));
    }
    Ok(format!(
        "guest sent {sent}; dropped {}; DPI heartbeat {at_last_drop} -> {final_beats}",
        counts.join(" ")
    ))
}

fn memtotal(guest: &GuestReport, region: &Result<(u64, u64), String>) -> Result<String, String> {
    let kb = guest
        .memtotal_kb()
        .map_err(marker_err)?
        .ok_or("no `ALLYTEST meminfo` marker")?;
    let (_, size) = region.clone()?;
    let limit = (GUEST_RAM_MIB << 20).saturating_sub(size);
    let bytes = kb.saturating_mul(1024);
    if bytes <= limit {
        Ok(format!(
            "MemTotal {bytes:#x} <= guest RAM {:#x} - Ally region {size:#x}",
            GUEST_RAM_MIB << 20
        ))
    } else {
        Err(format!(
            "MemTotal {bytes:#x} exceeds guest RAM {:#x} - Ally region {size:#x} = {limit:#x}",
            GUEST_RAM_MIB << 20
        ))
    }
}

fn memmap(guest: &GuestReport, region: &Result<(u64, u64), String>) -> Result<String, String> {
    let (base, size) = region.clone()?;
    let map = guest.memmap().map_err(marker_err)?;
    if map.is_empty() {
        return Err("no `ALLYTEST memmap` markers".into());
    }
    let bad: Vec<String> = map
        .iter()
        .filter(|e| e.is_ram() && e.overlaps(base, size))
        .map(|e| format!("{:#x}-{:#x}", e.start, e.end_inclusive))
        .collect();
    if bad.is_empty() {
        Ok(format!(
            "{} entries, no System RAM in [{base:#x}, {:#x})",
            map.len(),
            base + size
        ))
    } else {
        Err(format!(
            "System RAM entries (end inclusive) {} overlap Ally's region [{base:#x}, {:#x})",
            bad.join(", "),
            base + size
        ))
    }
}

fn probe_addr(guest: &GuestReport, region: &Result<(u64, u64), String>) -> Result<String, String> {
    let (base, size) = region.clone()?;
    let marker = guest
        .find("probe")
        .ok_or("no `ALLYTEST probe addr=..` marker")?;
    let addr = marker.number("addr").map_err(marker_err)?;
    let hole = marker.number("hole").map_err(marker_err)?;
    if hole != base {
        return Err(format!(
            "the first byte after the guest's highest RAM below 4 GiB is {hole:#x}, Ally's region base is {base:#x}"
        ));
    }
    if addr < base || addr >= base + size {
        return Err(format!(
            "guest probes {addr:#x}, outside Ally's region [{base:#x}, {:#x})",
            base + size
        ));
    }
    Ok(format!(
        "the guest's RAM ends at Ally's region base {hole:#x}; it probes {addr:#x} inside the region"
    ))
}

fn devmem_reads(guest: &GuestReport) -> Result<String, String> {
    let reads = guest.devmem_reads().map_err(marker_err)?;
    if reads.is_empty() {
        return Err("no `ALLYTEST devmem-read` markers".into());
    }
    let mut seen = Vec::new();
    for r in &reads {
        match &r.value {
            Ok(v) if *v == HIDDEN_READ_VALUE => seen.push(format!("{:#x}={v:#x}", r.addr)),
            Ok(v) => {
                return Err(format!(
                    "read at {:#x} returned {v:#x}, expected {HIDDEN_READ_VALUE:#x}",
                    r.addr
                ))
            }
            Err(e) => return Err(format!("devmem at {:#x} failed: {e}", r.addr)),
        }
    }
    Ok(seen.join(" "))
}

fn devmem_write(guest: &GuestReport) -> Result<String, String> {
    let w = guest
        .devmem_write()
        .map_err(marker_err)?
        .ok_or("no `ALLYTEST devmem-write` marker")?;
    match w.value {
        Ok(v) if v == HIDDEN_READ_VALUE => Ok(format!(
            "after writing 0x5a5a5a5a at {:#x} it reads {v:#x}",
            w.addr
        )),
        Ok(v) => Err(format!(
            "after writing 0x5a5a5a5a at {:#x} it reads {v:#x}, expected {HIDDEN_READ_VALUE:#x}",
            w.addr
        )),
        Err(e) => Err(format!("devmem write at {:#x} failed: {e}", w.addr)),
    }
}

fn ept_violation(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let w = guest
        .devmem_write()
        .map_err(marker_err)?
        .ok_or("no `ALLYTEST devmem-write` marker")?;
    let v = ally.ept_violations().map_err(marker_err)?;
    // devmem maps the page, so compare at page granularity as well as exactly.
    let hit = v
        .iter()
        .find(|e| e.is_write() && e.gpa == w.addr)
        .or_else(|| {
            v.iter()
                .find(|e| e.is_write() && e.gpa >> 12 == w.addr >> 12)
        });
    match hit {
        Some(e) => Ok(format!(
            "ALLY ept-violation gpa={:#x} access=write action={}",
            e.gpa,
            e.action.as_deref().unwrap_or("?")
        )),
        None => Err(format!(
            "no `ALLY ept-violation access=write` at {:#x} ({} ept-violation lines)",
            w.addr,
            v.len()
        )),
    }
}

fn exits(ally: &AllyReport) -> Result<String, String> {
    let e = ally.exits().map_err(marker_err)?;
    if e.is_empty() {
        return Err("no `ALLY exits reason=.. count=..` lines".into());
    }
    Ok(e.iter()
        .map(|x| format!("{}={}", x.reason, x.count))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Whether every check passed.
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_GUEST: &str = "\
ALLYTEST init PASS
ALLYTEST meminfo INFO memtotal_kb=950000
ALLYTEST memmap INFO start=0x0 end=0x9efff type=System_RAM
ALLYTEST memmap INFO start=0x100000 end=0x3dfeffff type=System_RAM
ALLYTEST memmap INFO start=0x3fff0000 end=0x3fffffff type=ACPI_Tables
ALLYTEST probe INFO addr=0x3dff0000 hole=0x3dff0000 next=0x3fff0000
ALLYTEST devmem-read INFO addr=0x3dff0000 value=0xFFFFFFFF
ALLYTEST devmem-read INFO addr=0x3dff1000 value=0xFFFFFFFF
ALLYTEST devmem-read INFO addr=0x3dff0010 value=0xFFFFFFFF
ALLYTEST devmem-write INFO addr=0x3dff0010 readback=0xFFFFFFFF
ALLYTEST ping PASS target=10.0.2.2 received=3 sent=3
ALLYTEST cpus INFO nproc=1 present=0 online=0 cpuinfo=1
ALLYTEST cpu-work INFO cpu=0 ran_on=0
ALLYTEST ipi-attack INFO own=0 targets=1,2 sent=9
ALLYTEST done
";

    const GOOD_ALLY: &str = "\
[cpu0 INFO hv] ALLY region base=0x3dff0000 size=0x2000000
ALLY rules none: passing every frame
ALLY cpus total=2 dpi=1 os=1
ALLY guest-start
ALLY ept-violation gpa=0x3dff0010 access=write action=skip
ALLY exits reason=CPUID count=10
ALLY canary status=intact
ALLY ipi-drop mode=nmi icr=0x400 dest=0x1 dropped=1 heartbeat=40
ALLY ipi-dropped mode=fixed count=1
ALLY ipi-dropped mode=nmi count=2
ALLY ipi-dropped mode=init count=1
ALLY ipi-dropped mode=sipi count=1
ALLY ipi-emulated init=0 sipi=0
ALLY os-core index=0 apic=0 state=Running
ALLY dpi-core index=0 apic=1 heartbeat=57 wakeups=56
ALLY poweroff
";

    fn judge(guest: &str, ally: &str) -> Vec<Check> {
        ally_checks(
            &GuestReport::parse(guest),
            &AllyReport::parse(ally),
            &RulesExpect::None,
        )
    }

    fn failed(checks: &[Check]) -> Vec<&'static str> {
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn ipi_attack_needs_every_mode_dropped_and_a_live_dpi_core() {
        let a = GOOD_ALLY.replace("mode=sipi count=1", "mode=sipi count=0");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["ipi-attack"]);
        let a = GOOD_ALLY.replace("dropped=1 heartbeat=40", "dropped=1 heartbeat=57");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["ipi-attack"]);
        let g = GOOD_GUEST.replace("sent=9", "sent=0");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["ipi-attack"]);
    }

    #[test]
    fn cpu_partition_checks_fail_on_a_visible_dpi_core_or_a_stopped_heartbeat() {
        let g = GOOD_GUEST.replace("nproc=1", "nproc=2");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["guest-cpus"]);
        // A stopped DPI core also fails the attack check (no beat after the last drop).
        let a = GOOD_ALLY.replace("heartbeat=57", "heartbeat=1");
        assert_eq!(
            failed(&judge(GOOD_GUEST, &a)),
            ["dpi-heartbeat", "ipi-attack"]
        );
        let a = GOOD_ALLY.replace("ALLY dpi-core index=0 apic=1 heartbeat=57 wakeups=56\n", "");
        assert_eq!(
            failed(&judge(GOOD_GUEST, &a)),
            ["dpi-heartbeat", "ipi-attack"]
        );
    }

    #[test]
    fn good_run_passes() {
        let c = judge(GOOD_GUEST, GOOD_ALLY);
        assert!(all_passed(&c), "{c:#?}");
    }

    #[test]
    fn rules_check_compares_the_count_ally_reports() {
        let rules_check = |ally: &str, expect: RulesExpect| {
            let c = ally_checks(
                &GuestReport::parse(GOOD_GUEST),
                &AllyReport::parse(ally),
                &expect,
            );
            c.into_iter().find(|c| c.name == "rules").unwrap()
        };
        let loaded = GOOD_ALLY.replace(
            "ALLY rules none: passing every frame",
            "[cpu0 INFO hv] ALLY rules loaded=2 drop=1 alert=1 pass=0 groups=2 bytes=9",
        );
        assert!(rules_check(&loaded, RulesExpect::Loaded(2)).passed);
        let c = rules_check(&loaded, RulesExpect::Loaded(3));
        assert!(!c.passed);
        assert!(c
            .detail
            .starts_with("expected `ALLY rules loaded=3`, saw: ALLY rules loaded=2"));
        // Rules given but Ally says it has none, and the other way round.
        assert!(!rules_check(GOOD_ALLY, RulesExpect::Loaded(2)).passed);
        assert!(!rules_check(&loaded, RulesExpect::None).passed);
        assert!(rules_check(GOOD_ALLY, RulesExpect::None).passed);
        // A blob the host refuses: Ally must stop naming the rules module.
        let refused = RulesExpect::Refused("rules blob: bad magic".into());
        let fatal = "ALLY fatal reason=\"rules module (boot module 1, 30 bytes) refused: x\"\n";
        assert!(rules_check(fatal, refused.clone()).passed);
        assert!(!rules_check("ALLY fatal reason=\"bad command line\"\n", refused).passed);
    }

    #[test]
    fn leaked_data_fails_devmem_read() {
        let g = GOOD_GUEST.replace(
            "addr=0x3dff1000 value=0xFFFFFFFF",
            "addr=0x3dff1000 value=0x12345678",
        );
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["devmem-read"]);
    }

    #[test]
    fn devmem_error_fails() {
        let g = GOOD_GUEST.replace(
            "addr=0x3dff0010 readback=0xFFFFFFFF",
            "addr=0x3dff0010 error=devmem:_mmap:_Operation_not_permitted",
        );
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["devmem-write"]);
    }

    #[test]
    fn write_that_sticks_fails() {
        let g = GOOD_GUEST.replace("readback=0xFFFFFFFF", "readback=0x5A5A5A5A");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["devmem-write"]);
    }

    #[test]
    fn ram_overlapping_region_fails() {
        let g = GOOD_GUEST.replace("end=0x3dfeffff", "end=0x3dff0fff");
        let c = judge(&g, GOOD_ALLY);
        assert_eq!(failed(&c), ["memmap"]);
    }

    #[test]
    fn too_much_memory_fails() {
        // 1 GiB - 32 MiB = 0x3e000000 bytes = 1015808 KiB; one KiB more is too much.
        let g = GOOD_GUEST.replace("memtotal_kb=950000", "memtotal_kb=1015809");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["memtotal"]);
        let g = GOOD_GUEST.replace("memtotal_kb=950000", "memtotal_kb=1015808");
        assert!(all_passed(&judge(&g, GOOD_ALLY)));
    }

    #[test]
    fn wrong_probe_and_missing_lines_fail() {
        let g = GOOD_GUEST.replace("hole=0x3dff0000", "hole=0x3fff0000");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["probe-addr"]);
        let g = GOOD_GUEST.replace("probe INFO addr=0x3dff0000", "probe INFO addr=0x40000000");
        assert_eq!(failed(&judge(&g, GOOD_ALLY)), ["probe-addr"]);
        let a = GOOD_ALLY.replace(
            "ALLY ept-violation gpa=0x3dff0010 access=write action=skip\n",
            "",
        );
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["ept-violation"]);
        let a = GOOD_ALLY.replace("status=intact", "status=damaged");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["canary"]);
        let a = GOOD_ALLY.replace("ALLY exits reason=CPUID count=10\n", "");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["exits"]);
        let a = format!("{GOOD_ALLY}ALLY fatal reason=x\n");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["no-fatal"]);
    }

    #[test]
    fn no_ally_output_fails_region_checks() {
        let c = judge(GOOD_GUEST, "");
        let f = failed(&c);
        for name in [
            "ally-region",
            "memtotal",
            "memmap",
            "probe-addr",
            "canary",
            "exits",
        ] {
            assert!(f.contains(&name), "{name} should fail: {c:#?}");
        }
    }

    #[test]
    fn ping_fail_and_missing_done() {
        let g = GOOD_GUEST
            .replace("ping PASS", "ping FAIL")
            .replace("ALLYTEST done\n", "");
        let c = guest_checks(&GuestReport::parse(&g));
        assert_eq!(failed(&c), ["done", "ping", "no-guest-failures"]);
    }

    const GOOD_GUEST_3: &str = "\
ALLYTEST cpus INFO nproc=3 present=0-2 online=0-2 cpuinfo=3
ALLYTEST cpu-work INFO cpu=0 ran_on=0
ALLYTEST cpu-work INFO cpu=1 ran_on=1
ALLYTEST cpu-work INFO cpu=2 ran_on=2
ALLYTEST cpu-hotplug INFO offline_list=0 online_list=0-2 cpu=2 ran_on=2 errors=
";
    const GOOD_ALLY_3: &str = "\
ALLY cpus total=4 dpi=1 os=3
ALLY ipi-emulated init=2 sipi=2
ALLY os-core index=0 apic=0 state=Running
ALLY os-core index=1 apic=1 state=Running
ALLY os-core index=2 apic=2 state=Running
";

    fn judge_cpus(guest: &str, ally: &str) -> Vec<Result<String, String>> {
        let (g, a) = (GuestReport::parse(guest), AllyReport::parse(ally));
        vec![
            guest_cpus(&g, &a),
            cpu_work(&g, &a),
            os_cores_started(&a),
            cpu_hotplug(&g, &a),
        ]
    }

    #[test]
    fn three_os_cores_pass_the_cpu_checks() {
        for r in judge_cpus(GOOD_GUEST_3, GOOD_ALLY_3) {
            assert!(r.is_ok(), "{r:?}");
        }
        assert_eq!(cpu_list(3), "0-2");
        assert_eq!(cpu_list(1), "0");
    }

    #[test]
    fn cpu_checks_fail_when_an_os_core_is_missing_or_idle() {
        // Linux could not start CPU 2: every view shows 2 CPUs.
        let g = GOOD_GUEST_3
            .replace(
                "nproc=3 present=0-2 online=0-2 cpuinfo=3",
                "nproc=2 present=0-2 online=0-1 cpuinfo=2",
            )
            .replace("ALLYTEST cpu-work INFO cpu=2 ran_on=2\n", "")
            .replace(
                "online_list=0-2 cpu=2 ran_on=2",
                "online_list=0-1 cpu=1 ran_on=1",
            );
        let a = GOOD_ALLY_3
            .replace("sipi=2", "sipi=1")
            .replace("apic=2 state=Running", "apic=2 state=WaitForSipi");
        let r = judge_cpus(&g, &a);
        assert!(r.iter().all(|r| r.is_err()), "{r:?}");
        // One view alone disagreeing fails the check.
        let g = GOOD_GUEST_3.replace("online=0-2", "online=0-1");
        assert!(guest_cpus(&GuestReport::parse(&g), &AllyReport::parse(GOOD_ALLY_3)).is_err());
        // Work that did not run where it was pinned.
        let g = GOOD_GUEST_3.replace("cpu=1 ran_on=1", "cpu=1 ran_on=0");
        assert!(cpu_work(&GuestReport::parse(&g), &AllyReport::parse(GOOD_ALLY_3)).is_err());
        // The CPU did not come back online.
        let g = GOOD_GUEST_3.replace("online_list=0-2", "online_list=0-1");
        assert!(cpu_hotplug(&GuestReport::parse(&g), &AllyReport::parse(GOOD_ALLY_3)).is_err());
        let g = GOOD_GUEST_3.replace("ALLYTEST cpu-hotplug", "ALLYTEST other");
        assert!(cpu_hotplug(&GuestReport::parse(&g), &AllyReport::parse(GOOD_ALLY_3)).is_err());
        // Too few SIPIs emulated although every core claims to run.
        let a = GOOD_ALLY_3.replace("sipi=2", "sipi=1");
        assert!(os_cores_started(&AllyReport::parse(&a)).is_err());
    }
}
