//! Pass/fail judgement of a run from its marker lines.
//!
//! The same checks serve `ally-run` (which prints them) and the e2e test (which asserts them),
//! so a run is judged the same way everywhere.

use std::fmt;

use crate::attack;
use crate::endpoints::{NetReport, UDP_FLOOD_DATAGRAMS};
use crate::markers::{AllyLine, AllyReport, GuestMarker, GuestReport, MarkerError, Status};
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
    pub fn new(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
        Check {
            name,
            passed,
            detail: detail.into(),
        }
    }

    pub(crate) fn from_result(name: &'static str, r: Result<String, String>) -> Check {
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
    out.push(Check::from_result("pci-guard", pci_guard(ally)));
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
    // TSC ticks per microsecond, from `ALLY clock tsc-hz=..`, to state the handler cost in time.
    let tsc_per_us = ally
        .all("clock")
        .last()
        .and_then(|l| l.number("tsc-hz").ok())
        .map(|hz| hz as f64 / 1e6)
        .filter(|&per_us| per_us > 0.0);
    Ok(e.iter()
        .map(|x| match (x.handler_tsc, tsc_per_us) {
            (Some((mean, max)), Some(per_us)) => format!(
                "{}={} (handler {mean} TSC ticks = {:.2} us mean, {:.1} us max)",
                x.reason,
                x.count,
                mean as f64 / per_us,
                max as f64 / per_us
            ),
            (Some((mean, max)), None) => format!(
                "{}={} (handler {mean} TSC ticks mean, {max} max)",
                x.reason, x.count
            ),
            (None, _) => format!("{}={}", x.reason, x.count),
        })
        .collect::<Vec<_>>()
        .join(" "))
}

/// The rounds of e1000 reloads the guest script runs, each followed by a small download and
/// upload.
pub const RELOAD_ROUNDS: u64 = 2;

/// The guest's transfers against what the host endpoints served and received (issue 4), with
/// or without Ally: every download's SHA-256 and size equal the served file's, every upload
/// was received whole by the host with the guest's SHA-256, and both e1000 reloads happened
/// and their transfers passed.
pub fn network_checks(guest: &GuestReport, net: &NetReport) -> Vec<Check> {
    vec![
        Check::from_result("download", downloads(guest, net)),
        Check::from_result("upload", uploads(guest, net)),
        Check::from_result("nic-reload", reloads(guest, net)),
        Check::from_result("parallel-transfers", parallel_transfers(guest, net)),
        Check::from_result("guest-reboot", guest_reboot(guest, net)),
        Check::from_result("link-flap", link_flap(guest)),
        Check::from_result("pktgen", pktgen(guest, net)),
    ]
}

/// Ally's side of the guest's reboots: it took the guest's reset requests
/// (`ALLY guest-reset source=.. count=N`) and restarted the guest with every other OS core
/// stopped (`ALLY guest-restarted count=N .. stopped=true`), `expected` times (one per reset
/// of the chain, `NetOptions::resets`).
pub fn ally_guest_reset(ally: &AllyReport, expected: usize) -> Check {
    Check::from_result("ally-guest-reset", guest_restarted(ally, expected as u64))
}

fn guest_restarted(ally: &AllyReport, expected: u64) -> Result<String, String> {
    let reset = ally
        .all("guest-reset")
        .last()
        .ok_or("no `ALLY guest-reset` line: Ally did not see the guest's reset")?;
    let restarted = ally
        .all("guest-restarted")
        .last()
        .ok_or("no `ALLY guest-restarted` line: Ally did not restart the guest")?;
    let count = restarted.number("count").map_err(marker_err)?;
    if count != expected || reset.number("count").map_err(marker_err)? != expected {
        return Err(format!(
            "the guest reset {count} times, expected {expected}"
        ));
    }
    if restarted.fields.get("stopped") != Some("true") {
        return Err(format!(
            "an OS core kept running the old guest: {}",
            restarted.line
        ));
    }
    Ok(format!(
        "reset by {} ({} other OS core(s) stopped), guest restarted",
        reset.fields.get("source").unwrap_or("?"),
        restarted.fields.get("other-os-cores").unwrap_or("?")
    ))
}

/// The guest's reset chain (`NetOptions::resets`): the first boot announced its reboot, boot k
/// announced reset method k (`ALLYTEST reset-attack INFO boot=k method=..`), every later boot
/// started (`ALLYTEST rebooted INFO boot=k`), and the last one brought the e1000 up (module
/// loaded, carrier, ping answered) and moved small.bin both ways whole. A method the guest
/// could not use (`skipped=`, e.g. triple-fault from user space) fell back to `reboot -f`
/// (`ALLYTEST reset-fallback`): named in the detail, not a failure of the chain.
fn guest_reboot(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    let resets = &net.options.resets;
    if resets.is_empty() {
        return Ok("not requested".into());
    }
    let first = guest
        .find("reboot")
        .ok_or("no `ALLYTEST reboot` marker: the first boot did not reboot")?;
    if first.status != Some(Status::Info) {
        return Err(format!("the first boot could not reboot: {}", first.line));
    }
    let announced = attack::reset_markers(guest);
    let mut fell_back = Vec::new();
    for (k, method) in resets.iter().enumerate() {
        let boot = k as u64 + 1;
        let r = announced.iter().find(|r| r.boot == boot).ok_or(format!(
            "no `ALLYTEST reset-attack` marker of boot {boot} (method {method})"
        ))?;
        if r.method != method.name() {
            return Err(format!(
                "boot {boot} reset by {}, expected {method}: {}",
                r.method, r.line
            ));
        }
        if let Some(why) = r.fields.get("skipped").or(r.fields.get("error")) {
            fell_back.push(format!("{method} ({why})"));
        }
    }
    let last_boot = resets.len() as u64 + 1;
    let booted: Vec<u64> = guest
        .all("rebooted")
        .filter_map(|m| m.number("boot").ok())
        .collect();
    if let Some(b) = (2..=last_boot).find(|b| !booted.contains(b)) {
        return Err(format!(
            "boot {b} of {last_boot} never started (no `ALLYTEST rebooted INFO boot={b}`); booted: {booted:?}"
        ));
    }
    let second = guest
        .all("rebooted")
        .find(|m| m.number("boot").ok() == Some(last_boot))
        .ok_or("no `ALLYTEST rebooted` marker: the guest did not boot again")?;
    // Every CPU the first boot had came back (the boot CPU started the others again).
    let cpus = |m: &GuestMarker| m.number("nproc").ok();
    let before = guest.find("cpus").and_then(cpus);
    if before.is_some() && cpus(second) != before {
        return Err(format!(
            "the second boot has {:?} CPUs, the first had {before:?}: {}",
            cpus(second),
            second.line
        ));
    }
    let link = guest
        .find("reboot-net")
        .ok_or("no `ALLYTEST reboot-net` marker after the reboot")?;
    if link.status != Some(Status::Info) {
        return Err(format!(
            "the e1000 did not work after the reboot: {}",
            link.line
        ));
    }
    let tagged = |marker: &'static str| {
        guest
            .all(marker)
            .find(|m| m.fields.get("reboot").is_some())
            .ok_or(format!("no `ALLYTEST {marker}` marker with reboot=1"))
    };
    let download = judge_download(tagged("download")?, net)?;
    let mut used = vec![false; net.uploads.len()];
    let upload = judge_upload(tagged("upload")?, net, &mut used)?;
    let chain = if resets.len() > 1 || !fell_back.is_empty() {
        format!(
            "{} resets ({}){}; ",
            resets.len(),
            attack::join(resets),
            if fell_back.is_empty() {
                String::new()
            } else {
                format!(", fell back to reboot -f after: {}", fell_back.join(", "))
            }
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{chain}rebooted at {} s of uptime; last boot at {} s with {} CPU(s): carrier after {} ms, ping {}/3; {download}; {upload}",
        first.fields.get("uptime").unwrap_or("?"),
        second.fields.get("uptime").unwrap_or("?"),
        second.fields.get("nproc").unwrap_or("?"),
        link.fields.get("waited_ms").unwrap_or("?"),
        link.fields.get("ping_received").unwrap_or("?"),
    ))
}

/// `name=small round=1`-style label of a transfer marker.
fn transfer_label(m: &GuestMarker) -> String {
    let mut l = m.fields.get("name").unwrap_or(m.name.as_str()).to_string();
    if let Some(r) = m.fields.get("round") {
        l += &format!(" round {r}");
    }
    if let Some(k) = m.fields.get("stream") {
        l += &format!(" stream {k}");
    }
    if m.fields.get("reboot").is_some() {
        l += " after the reboot";
    }
    l
}

/// `16777216 B in 45.10 s (363 KiB/s)` from a transfer marker's bytes and seconds.
fn throughput(m: &GuestMarker) -> String {
    let bytes = m.number("bytes").unwrap_or(0);
    match m.fields.get("seconds").and_then(|s| s.parse::<f64>().ok()) {
        Some(s) if s > 0.0 => format!(
            "{bytes} B in {s:.2} s ({:.0} KiB/s)",
            bytes as f64 / 1024.0 / s
        ),
        Some(s) => format!("{bytes} B in {s:.2} s"),
        None => format!("{bytes} B"),
    }
}

/// The guest skipped its transfers (no endpoints on its command line).
fn skipped(guest: &GuestReport) -> Option<&GuestMarker> {
    guest
        .find("net")
        .filter(|m| m.fields.get("skipped").is_some())
}

/// One download marker against the served file: `Ok(summary)` or why it failed.
fn judge_download(m: &GuestMarker, net: &NetReport) -> Result<String, String> {
    let label = transfer_label(m);
    if m.status != Some(Status::Info) {
        return Err(format!("{label} failed in the guest: {}", m.line));
    }
    let name = m.fields.get("name").ok_or_else(|| {
        marker_err(MarkerError::MissingField {
            marker: m.name.clone(),
            field: "name".into(),
        })
    })?;
    let file = net
        .file(name)
        .ok_or_else(|| format!("{label}: the host serves no file `{name}`: {}", m.line))?;
    let bytes = m.number("bytes").map_err(marker_err)?;
    let sha = m.fields.get("sha256").unwrap_or("none");
    if bytes != file.bytes || sha != file.sha256 {
        return Err(format!(
            "{label}: the guest got {bytes} B sha256={sha}, the host served {} B sha256={}",
            file.bytes, file.sha256
        ));
    }
    Ok(format!("{label}: {}", throughput(m)))
}

/// The transfer markers with `name` and `round` (`None`: no round field), outside the
/// parallel phase.
fn transfers<'a>(
    guest: &'a GuestReport,
    marker: &'a str,
    name: Option<&'a str>,
    round: Option<u64>,
) -> impl Iterator<Item = &'a GuestMarker> + 'a {
    guest.all(marker).filter(move |m| {
        name.is_none_or(|n| m.fields.get("name") == Some(n))
            && m.fields.get("round").map(crate::markers::parse_number) == round.map(Some)
            && m.fields.get("stream").is_none()
            && m.fields.get("reboot").is_none()
    })
}

/// The parallel phase's marker of `stream` (`download` or `upload`).
fn stream_transfer<'a>(
    guest: &'a GuestReport,
    marker: &'a str,
    stream: u64,
) -> Result<&'a GuestMarker, String> {
    guest
        .all(marker)
        .find(|m| m.number("stream").ok() == Some(stream))
        .ok_or_else(|| format!("no `ALLYTEST {marker} stream={stream}` marker"))
}

/// The parallel phase: each of the `streams` concurrent downloads of small.bin arrived whole
/// (size and SHA-256), and each concurrent upload of it was received whole by the host.
fn parallel_transfers(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    let streams = u64::from(net.options.streams);
    if streams == 0 {
        return Ok("skipped (streams=0)".into());
    }
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its transfers: {}", m.line));
    }
    let mut used = vec![false; net.uploads.len()];
    let mut seconds = [None, None];
    for stream in 1..=streams {
        let download = stream_transfer(guest, "download", stream)?;
        judge_download(download, net)?;
        let upload = stream_transfer(guest, "upload", stream)?;
        judge_upload(upload, net, &mut used)?;
        seconds = [download, upload].map(|m| m.fields.get("seconds"));
    }
    let total = streams * net.options.small_bytes;
    let rate = |s: Option<&str>| match s.and_then(|s| s.parse::<f64>().ok()) {
        Some(s) if s > 0.0 => format!("in {s:.2} s ({:.0} KiB/s)", total as f64 / 1024.0 / s),
        _ => "in ? s".into(),
    };
    Ok(format!(
        "{streams} streams of {} B: downloads {} and uploads {} all intact",
        net.options.small_bytes,
        rate(seconds[0]),
        rate(seconds[1])
    ))
}

/// Issue 15's bulk transmit: pktgen sent every frame of both runs (64 and 1500 bytes; at least
/// the count asked for, the last burst of 32 may go past it) through
/// Ally, and the host's UDP sink received them (slirp may lose datagrams under a burst, so the
/// count is reported; more than were sent, or none, fails).
fn pktgen(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    let count = u64::from(net.options.pktgen);
    if count == 0 {
        return Ok("skipped (pktgen=0)".into());
    }
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its transfers: {}", m.line));
    }
    let mut parts = Vec::new();
    for (size, received) in [(64, net.udp.pktgen_small), (1500, net.udp.pktgen_large)] {
        let m = guest
            .all("pktgen")
            .find(|m| m.fields.get("size") == Some(&size.to_string()))
            .ok_or(format!(
                "no `ALLYTEST pktgen` marker for {size}-byte frames"
            ))?;
        if m.status != Some(Status::Info) {
            return Err(format!("pktgen failed: {}", m.line));
        }
        let sent = m.number("sent").map_err(|e| format!("{e}: {}", m.line))?;
        // Bursts of 32 may overshoot the count to the end of the last burst.
        if sent < count {
            return Err(format!(
                "pktgen sent {sent} of {count} {size}-byte frames: {}",
                m.line
            ));
        }
        if received == 0 || received > sent {
            return Err(format!(
                "the host's UDP sink received {received} of {sent} {size}-byte pktgen frames"
            ));
        }
        parts.push(format!(
            "{size} B: {sent} sent in {} s, {received} received by the host",
            m.fields.get("seconds").unwrap_or("?")
        ));
    }
    Ok(parts.join("; "))
}

fn downloads(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its transfers: {}", m.line));
    }
    let mut seen = Vec::new();
    for m in guest.all("download") {
        seen.push(judge_download(m, net)?);
    }
    let mut expected = vec![("big", None)];
    expected.extend((1..=RELOAD_ROUNDS).map(|r| ("small", Some(r))));
    for (name, round) in expected {
        if transfers(guest, "download", Some(name), round)
            .next()
            .is_none()
        {
            return Err(format!(
                "no `ALLYTEST download` marker for name={name}{}",
                round.map(|r| format!(" round={r}")).unwrap_or_default()
            ));
        }
    }
    Ok(seen.join("; "))
}

/// One upload marker against the host's records: `Ok(summary)` or why it failed. `used`
/// marks host records already matched (each upload is received once).
fn judge_upload(m: &GuestMarker, net: &NetReport, used: &mut [bool]) -> Result<String, String> {
    let label = match (m.fields.get("round"), m.fields.get("stream")) {
        (Some(r), _) => format!("upload round {r}"),
        (None, Some(k)) => format!("upload stream {k}"),
        (None, None) if m.fields.get("reboot").is_some() => "upload after the reboot".into(),
        (None, None) => "upload".into(),
    };
    if m.status != Some(Status::Info) {
        return Err(format!("{label} failed in the guest: {}", m.line));
    }
    let bytes = m.number("bytes").map_err(marker_err)?;
    let sha = m.fields.get("sha256").unwrap_or("none");
    let small = ["round", "stream", "reboot"];
    let expected = if small.iter().any(|k| m.fields.get(k).is_some()) {
        net.options.small_bytes
    } else {
        net.options.upload_bytes
    };
    if bytes != expected {
        return Err(format!(
            "{label}: the guest sent {bytes} B, it was told to send {expected} B"
        ));
    }
    let echoed = (
        m.fields
            .get("host_bytes")
            .and_then(crate::markers::parse_number),
        m.fields.get("host_sha256"),
    );
    if echoed != (Some(bytes), Some(sha)) {
        return Err(format!(
            "{label}: the host's reply to the guest does not match what the guest sent: {}",
            m.line
        ));
    }
    let hit = net
        .uploads
        .iter()
        .enumerate()
        .find(|(i, u)| !used[*i] && u.complete && u.bytes == bytes && u.sha256 == sha);
    match hit {
        Some((i, _)) => {
            used[i] = true;
            Ok(format!("{label}: {}", throughput(m)))
        }
        None => Err(format!(
            "{label}: the host recorded no complete upload of {bytes} B sha256={sha} (it recorded: {})",
            describe_uploads(net)
        )),
    }
}

fn describe_uploads(net: &NetReport) -> String {
    if net.uploads.is_empty() {
        return "none".into();
    }
    net.uploads
        .iter()
        .map(|u| {
            format!(
                "{} B sha256={}{}",
                u.bytes,
                u.sha256,
                u.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn uploads(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its transfers: {}", m.line));
    }
    let mut used = vec![false; net.uploads.len()];
    let mut seen = Vec::new();
    for m in guest.all("upload") {
        seen.push(judge_upload(m, net, &mut used)?);
    }
    let rounds = std::iter::once(None).chain((1..=RELOAD_ROUNDS).map(Some));
    for round in rounds {
        if transfers(guest, "upload", None, round).next().is_none() {
            return Err(format!(
                "no `ALLYTEST upload` marker{}",
                round.map(|r| format!(" for round={r}")).unwrap_or_default()
            ));
        }
    }
    Ok(seen.join("; "))
}

/// The guest took its link down and up (no module reload): carrier came back and the gateway
/// answered.
fn link_flap(guest: &GuestReport) -> Result<String, String> {
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its transfers: {}", m.line));
    }
    let m = guest
        .find("link-flap")
        .ok_or("no `ALLYTEST link-flap` marker")?;
    if m.status != Some(Status::Info) {
        return Err(format!("the link did not come back: {}", m.line));
    }
    Ok(format!(
        "carrier after {} ms, ping {}/3",
        m.fields.get("waited_ms").unwrap_or("?"),
        m.fields.get("ping_received").unwrap_or("?")
    ))
}

fn reloads(guest: &GuestReport, net: &NetReport) -> Result<String, String> {
    if let Some(m) = skipped(guest) {
        return Err(format!("the guest skipped its e1000 reloads: {}", m.line));
    }
    let mut seen = Vec::new();
    for round in 1..=RELOAD_ROUNDS {
        let m = guest
            .all("reload")
            .find(|m| m.number("round").ok() == Some(round))
            .ok_or_else(|| format!("no `ALLYTEST reload round={round}` marker"))?;
        if m.status != Some(Status::Info) {
            return Err(format!("reload round {round} failed: {}", m.line));
        }
        let download = transfers(guest, "download", Some("small"), Some(round))
            .next()
            .ok_or_else(|| format!("no small download after reload round {round}"))?;
        judge_download(download, net)?;
        let mut used = vec![false; net.uploads.len()];
        let upload = transfers(guest, "upload", None, Some(round))
            .next()
            .ok_or_else(|| format!("no small upload after reload round {round}"))?;
        judge_upload(upload, net, &mut used)?;
        seen.push(format!(
            "round {round}: carrier after {} ms, ping {}/3, small download and upload OK",
            m.fields.get("waited_ms").unwrap_or("?"),
            m.fields.get("ping_received").unwrap_or("?")
        ));
    }
    Ok(seen.join("; "))
}

/// The frame drops an Ally run of the workload may make: frames that arrive while the guest's
/// receiver is off (an e1000 module reload), and the rule engine's drop verdicts (the
/// inspection checks account for those). Ring stops (e.g. `protected`, the ring-base attack)
/// are not frame drops. Any other reason with dropped packets is an error.
pub const ALLOWED_DROP_REASONS: [&str; 2] = ["guest_rx_off", "verdict"];

/// One direction's `ALLY nic-tx` / `ALLY nic-rx` counters (the last such line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NicCounters {
    packets: u64,
    bytes: u64,
    dropped: u64,
    doorbells: u64,
    backpressure: u64,
}

fn nic_counters(ally: &AllyReport, key: &str) -> Result<NicCounters, String> {
    let l = ally.all(key).last().ok_or_else(|| {
        format!("no `ALLY {key} packets=.. bytes=.. dropped=.. doorbells=.. backpressure=..` line")
    })?;
    let n = |f: &str| l.number(f).map_err(marker_err);
    Ok(NicCounters {
        packets: n("packets")?,
        bytes: n("bytes")?,
        dropped: n("dropped")?,
        doorbells: n("doorbells")?,
        backpressure: n("backpressure")?,
    })
}

/// Ally's frame counts against the wire's (slirp's packet log, QEMU's capture): every frame
/// the NIC took off the wire went through Ally (delivered to the guest or dropped, and
/// counted) or was missed by the device for lack of a free descriptor in Ally's receive ring
/// (its MPC, which Ally reads: `ALLY nic-rx-missed`); and every frame Ally posted reached the
/// wire (a TSO packet counted as its segments; the device may send more frames than that
/// estimate, which the detail reports). At power-off Ally stops the receiver (RCTL.EN) before
/// its final count; a frame the wire carries after that (a host retransmitting to a blocked
/// flow) is refused by the device and reaches no ring, so up to
/// [`FRAMES_AFTER_RECEIVER_STOP`] such frames are allowed and reported, never the reverse
/// (Ally counting a frame the wire did not carry).
/// `after_last`: frames the capture shows after the last frame Ally received (see
/// [`crate::wire::WireFindings::frames_after`]), which came after the receiver stopped.
pub fn nic_wire_balance(
    ally: &AllyReport,
    wire: &crate::wire::WireCounts,
    after_last: Option<u64>,
) -> Check {
    let frames = |key: &str, field: &str| -> Result<u64, String> {
        let l = ally
            .all(key)
            .last()
            .ok_or_else(|| format!("no `ALLY {key} ... {field}=N` line"))?;
        l.number(field).map_err(marker_err)
    };
    Check::from_result(
        "nic-wire-balance",
        (|| {
            let (rx, tx) = (
                frames("nic-rx", "wire-frames")?,
                frames("nic-tx", "wire-frames")?,
            );
            let missed = frames("nic-rx-missed", "frames")?;
            // Multicast frames the device's filter may have refused as the guest programmed
            // it never reach Ally, nor MPC.
            let accounted = rx + missed;
            let unaccounted = wire.to_guest_frames.saturating_sub(accounted);
            let late = unaccounted.saturating_sub(wire.to_guest_multicast);
            // Late frames the capture proves came after Ally's last one, and up to
            // FRAMES_AFTER_RECEIVER_STOP more where it cannot tell (Bochs' log).
            let allowed = FRAMES_AFTER_RECEIVER_STOP.max(after_last.unwrap_or(0));
            if accounted > wire.to_guest_frames || late > allowed {
                return Err(format!(
                    "the wire delivered {} frames to the NIC ({} multicast), Ally accounts for {accounted} ({rx} taken off its ring, {missed} the device missed)",
                    wire.to_guest_frames, wire.to_guest_multicast
                ));
            }
            let filtered = unaccounted - late;
            // TX: at least every frame Ally posted reached the wire. The device can send more
            // frames than Ally's TSO estimate (ceil(payload / MSS) per super-frame): observed
            // under Bochs, not yet explained, reported below.
            if wire.to_host_frames < tx {
                return Err(format!(
                    "the NIC sent {} frames to the wire, fewer than the {tx} Ally posted",
                    wire.to_host_frames
                ));
            }
            Ok(format!(
                "wire to guest {} frames ({} B) = Ally RX delivered + dropped ({rx}) + missed by the device, no free descriptor ({missed}) + multicast the guest's filter refused ({filtered}){}{}; wire from guest {} frames ({} B) >= Ally TX posted {tx} (difference {})",
                wire.to_guest_frames,
                wire.to_guest_bytes,
                if late > 0 {
                    format!(" + {late} after the receiver stopped at power-off")
                } else {
                    String::new()
                },
                match after_last {
                    Some(n) => format!(" (the capture shows {n} after Ally's last frame)"),
                    None => String::new(),
                },
                wire.to_host_frames,
                wire.to_host_bytes,
                wire.to_host_frames - tx
            ))
        })(),
    )
}

/// Frames the wire may carry to the NIC after Ally stopped the receiver for its final count.
pub const FRAMES_AFTER_RECEIVER_STOP: u64 = 2;

/// `(reason, packets, ring-stops)` of every `ALLY nic-<dir>-drop` line.
fn drop_reasons(ally: &AllyReport, key: &str) -> Result<Vec<(String, u64, u64)>, String> {
    ally.all(key)
        .map(|l: &AllyLine| {
            let reason = l
                .fields
                .get("reason")
                .ok_or_else(|| {
                    marker_err(MarkerError::MissingField {
                        marker: l.key.clone(),
                        field: "reason".into(),
                    })
                })?
                .to_string();
            Ok((
                reason,
                l.number("packets").map_err(marker_err)?,
                l.number("ring-stops").map_err(marker_err)?,
            ))
        })
        .collect()
}

/// Ally's NIC counters for a run of the guest's network workload, under any rules (issue 4). Not part of [`ally_checks`]: the caller adds them to a run that intercepts the
/// NIC. From COM2 lines printed at the guest's power-off:
/// `ALLY nic-tx|nic-rx packets=N bytes=N dropped=N doorbells=N backpressure=N`,
/// `ALLY nic-tx-drop|nic-rx-drop reason=NAME packets=N ring-stops=N`,
/// `ALLY nic-exits register=NAME reads=N writes=N`,
/// `ALLY nic-exits total=N packets=N exits-per-packet=X.YY`.
/// `attack_frames`: the TX frames of the run's attacks that Ally must drop, by reason.
pub fn nic_checks(
    guest: &GuestReport,
    ally: &AllyReport,
    attack_frames: AttackDrops,
) -> Vec<Check> {
    vec![
        Check::from_result("nic-traffic", nic_traffic(ally, attack_frames)),
        Check::from_result("nic-bytes", nic_bytes(guest, ally)),
        Check::from_result("nic-exits", nic_exits(ally)),
        Check::from_result("nic-transfer-exits", nic_transfer_exits(guest, ally)),
    ]
}

/// One `ALLY nic-mark` snapshot with the `ALLY mark` line of the same id.
struct ExitSnapshot {
    vm_exits: u64,
    apic_exits: u64,
    nic_exits: u64,
    /// Flush reads emulated in the exit of the write before them (no exit of their own).
    fused: u64,
    wire: u64,
    irqs: u64,
    registers: Vec<(String, u64)>,
    apic_registers: Vec<(String, u64)>,
}

fn exit_snapshot(ally: &AllyReport, id: u64) -> Result<ExitSnapshot, String> {
    let with_id = |key: &'static str| {
        ally.all(key)
            .find(|l| l.number("id").ok() == Some(id))
            .ok_or(format!(
                "no `ALLY {key} id={id}` line (the guest marks its transfers)"
            ))
    };
    let mark = with_id("mark")?;
    let nic = with_id("nic-mark")?;
    let registers = register_counts(nic)?;
    // Older images print no APIC breakdown: an empty one then.
    let apic_registers = match ally
        .all("apic-mark")
        .find(|l| l.number("id").ok() == Some(id))
    {
        Some(line) => register_counts(line)?,
        None => Vec::new(),
    };
    Ok(ExitSnapshot {
        // Every vCPU's exits where Ally prints them (the transfer may run on any OS core).
        vm_exits: mark
            .number("all-exits")
            .or_else(|_| mark.number("exits"))
            .map_err(marker_err)?,
        apic_exits: mark.number("apic-mmio-exits").map_err(marker_err)?,
        nic_exits: nic.number("exits").map_err(marker_err)?,
        // Older images fuse nothing.
        fused: nic.number("fused").unwrap_or(0),
        wire: nic.number("tx-wire").map_err(marker_err)?
            + nic.number("rx-wire").map_err(marker_err)?,
        irqs: nic.number("irq-doorbells").map_err(marker_err)?,
        registers,
        apic_registers,
    })
}

/// `registers=NAME:READS/WRITES,...` of a mark line, as `(name, reads + writes)`.
fn register_counts(line: &AllyLine) -> Result<Vec<(String, u64)>, String> {
    let mut registers = Vec::new();
    for item in line
        .fields
        .get("registers")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let parsed = item.split_once(':').and_then(|(name, rw)| {
            let (r, w) = rw.split_once('/')?;
            Some((
                name.to_string(),
                r.parse::<u64>().ok()? + w.parse::<u64>().ok()?,
            ))
        });
        registers.push(parsed.ok_or(format!("bad registers= item `{item}` in: {}", line.line))?);
    }
    Ok(registers)
}

/// The counts of `b` minus those of `a`, by register, largest first, zeros left out.
fn register_deltas(a: &[(String, u64)], b: &[(String, u64)]) -> Vec<(String, u64)> {
    let mut by_register: Vec<(String, u64)> = b
        .iter()
        .map(|(reg, n)| {
            let before = a.iter().find(|(r, _)| r == reg).map_or(0, |(_, n)| *n);
            (reg.clone(), n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    by_register.sort_by_key(|r| std::cmp::Reverse(r.1));
    by_register
}

/// Exits per wire frame for the big download (marks 3-4, around `wget`) and the big upload
/// (marks 5-6, around `nc`), and when the guest ran the parallel phase, its downloads (7-8)
/// and uploads (9-10): the NIC's trapped-register exits, by register, and all the OS cores'
/// VM exits in the same stretch (the APIC's among them). A report, not a threshold.
fn nic_transfer_exits(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let parallel = guest
        .all("download")
        .any(|m| m.fields.get("stream").is_some());
    let transfers = [
        ("download", 3, 4),
        ("upload", 5, 6),
        ("parallel download", 7, 8),
        ("parallel upload", 9, 10),
    ];
    let mut parts = Vec::new();
    for (name, from, to) in transfers.into_iter().take(if parallel { 4 } else { 2 }) {
        let (a, b) = (exit_snapshot(ally, from)?, exit_snapshot(ally, to)?);
        parts.push(transfer_exits(name, from, to, &a, &b)?);
    }
    // pktgen's bursts (bulk transmit, one tail write per 32 frames), the host's UDP flood into
    // the guest (bulk receive) and the alert-storm attack's paced sends (without and with
    // alerts), when the run had them: traffic that does not depend on slirp's TCP window.
    for (name, from, to) in [
        ("pktgen 64 B", 11, 12),
        ("pktgen 1500 B", 13, 14),
        ("UDP flood into the guest", 15, 16),
        (
            "paced UDP sends (alert storm, quiet)",
            ALERT_STORM_MARKS.0,
            ALERT_STORM_MARKS.1,
        ),
        (
            "paced UDP sends (alert storm, alerting)",
            ALERT_STORM_MARKS.1,
            ALERT_STORM_MARKS.2,
        ),
    ] {
        if let (Ok(a), Ok(b)) = (exit_snapshot(ally, from), exit_snapshot(ally, to)) {
            parts.push(transfer_exits(name, from, to, &a, &b)?);
        }
    }
    if let Some(m) = guest.find("udp-flood") {
        parts.push(format!(
            "UDP flood: the guest received {} of {UDP_FLOOD_DATAGRAMS} datagrams",
            m.fields.get("received").unwrap_or("?")
        ));
    }
    // The guest's own timing of one trapped access (`ally-attack exit-cost`), when it ran.
    if let Some(m) = guest.find("exit-cost") {
        let field = |k: &str| m.fields.get(k).unwrap_or("?");
        parts.push(format!(
            "exit round trip seen by the guest: {} TSC ticks = {} ns per trapped register read (trapped {} ns, untrapped {} ns, {} reads each)",
            field("round_trip_tsc"),
            field("round_trip_ns"),
            field("trapped_ns"),
            field("direct_ns"),
            field("reads")
        ));
    }
    Ok(parts.join("; "))
}

/// The alert-storm attack's marks: its quiet flood (the guest sending paced datagrams)
/// starts at the first, its storm at the second and ends at the third
/// (`attack::MARK_FLOOD`, `MARK_STORM`, `MARK_STORM_END`).
const ALERT_STORM_MARKS: (u64, u64, u64) = (41, 42, 43);

/// One transfer's exits per wire frame between two snapshots.
fn transfer_exits(
    name: &str,
    from: u64,
    to: u64,
    a: &ExitSnapshot,
    b: &ExitSnapshot,
) -> Result<String, String> {
    let wire = b.wire.saturating_sub(a.wire);
    if wire == 0 {
        return Err(format!(
            "no wire frames between marks {from} and {to} ({name})"
        ));
    }
    let per = |n: u64| n as f64 / wire as f64;
    let nic = b.nic_exits.saturating_sub(a.nic_exits);
    let fused = b.fused.saturating_sub(a.fused);
    let vm = b.vm_exits.saturating_sub(a.vm_exits);
    let apic = b.apic_exits.saturating_sub(a.apic_exits);
    let by_register = register_deltas(&a.registers, &b.registers);
    let apic_by_register = register_deltas(&a.apic_registers, &b.apic_registers);
    let registers: Vec<String> = by_register
        .iter()
        .map(|(reg, n)| format!("{reg} {n} ({:.3})", per(*n)))
        .collect();
    let apic_registers: Vec<String> = apic_by_register
        .iter()
        .take(4)
        .map(|(reg, n)| format!("{reg} {n}"))
        .collect();
    Ok(format!(
        "{name}: {wire} wire frames, {nic} NIC exits = {:.3}/frame [{}], {fused} flush reads fused into the write's exit ({:.3}/frame), {} guest interrupts ({:.1} frames each); all VM exits {vm} = {:.3}/frame, APIC {apic} = {:.3}/frame{}",
        per(nic),
        registers.join(", "),
        per(fused),
        b.irqs.saturating_sub(a.irqs),
        wire as f64 / b.irqs.saturating_sub(a.irqs).max(1) as f64,
        per(vm),
        per(apic),
        if apic_registers.is_empty() {
            String::new()
        } else {
            format!(" [{}]", apic_registers.join(", "))
        }
    ))
}

/// TX frames a run's attacks send that Ally drops before inspection, by drop reason: the only
/// such drops [`nic_checks`] allows (any other is a frame of the guest's own stack refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttackDrops {
    /// Offloads aimed into the payload (`offload`): the TUCSO attack's one frame.
    pub offload: u64,
    /// Wrong checksums (`checksum`): the rst-split attack's astray RST.
    pub checksum: u64,
}

impl AttackDrops {
    /// The most `packets` drops for `reason` the attacks explain.
    fn allows(&self, reason: &str, packets: u64) -> bool {
        match reason {
            "offload" => packets <= self.offload,
            "checksum" => packets <= self.checksum,
            _ => false,
        }
    }
}

fn nic_traffic(ally: &AllyReport, attack_frames: AttackDrops) -> Result<String, String> {
    let mut seen = Vec::new();
    for dir in ["tx", "rx"] {
        let key = format!("nic-{dir}");
        let c = nic_counters(ally, &key)?;
        if c.packets == 0 {
            return Err(format!(
                "Ally moved no {dir} packet: `ALLY {key} packets=0`"
            ));
        }
        let reasons = drop_reasons(ally, &format!("nic-{dir}-drop"))?;
        let allowed_reason = |r: &str| ALLOWED_DROP_REASONS.contains(&r);
        // The attacker's offload and astray frames are expected drops; any other such drop
        // is a frame of the guest's own stack Ally refused.
        let attack_drop = |r: &str, p: u64| dir == "tx" && attack_frames.allows(r, p);
        let bad: Vec<String> = reasons
            .iter()
            .filter(|(r, p, _)| !allowed_reason(r) && !attack_drop(r, *p) && *p > 0)
            .map(|(r, p, s)| format!("{r}: {p} packets, {s} ring stops"))
            .collect();
        if !bad.is_empty() {
            return Err(format!(
                "{dir} drops for reasons other than {}: {}",
                ALLOWED_DROP_REASONS.join(" and "),
                bad.join(", ")
            ));
        }
        let allowed: Vec<String> = reasons
            .iter()
            .filter(|(r, p, _)| (allowed_reason(r) || attack_drop(r, *p)) && *p > 0)
            .map(|(r, p, _)| format!("{r}: {p}"))
            .collect();
        let allowed_sum: u64 = reasons
            .iter()
            .filter(|(r, p, _)| allowed_reason(r) || attack_drop(r, *p))
            .map(|(_, p, _)| p)
            .sum();
        let stops: Vec<String> = reasons
            .iter()
            .filter(|(_, _, s)| *s > 0)
            .map(|(r, _, s)| format!("{r}={s}"))
            .collect();
        if c.dropped > allowed_sum {
            return Err(format!(
                "{dir} dropped={} but only {allowed_sum} are counted under {}",
                c.dropped,
                ALLOWED_DROP_REASONS.join(" or ")
            ));
        }
        seen.push(format!(
            "{dir} {} packets {} B, {} doorbells, {} back-pressure, {} dropped ({}), ring stops: {}",
            c.packets,
            c.bytes,
            c.doorbells,
            c.backpressure,
            c.dropped,
            if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") },
            if stops.is_empty() { "none".to_string() } else { stops.join(" ") }
        ));
    }
    Ok(seen.join("; "))
}

/// The bytes of the guest's `INFO` markers named `marker`.
fn guest_bytes(guest: &GuestReport, marker: &str) -> Result<u64, String> {
    guest
        .all(marker)
        .filter(|m| m.status == Some(Status::Info))
        .map(|m| m.number("bytes").map_err(marker_err))
        .sum()
}

fn nic_bytes(guest: &GuestReport, ally: &AllyReport) -> Result<String, String> {
    let down = guest_bytes(guest, "download")?;
    let up = guest_bytes(guest, "upload")?;
    if down == 0 || up == 0 {
        return Err(format!(
            "the guest reports {down} B downloaded and {up} B uploaded: nothing to compare"
        ));
    }
    let rx = nic_counters(ally, "nic-rx")?;
    let tx = nic_counters(ally, "nic-tx")?;
    if rx.bytes < down {
        return Err(format!(
            "Ally's RX moved {} B, less than the {down} B the guest downloaded",
            rx.bytes
        ));
    }
    if tx.bytes < up {
        return Err(format!(
            "Ally's TX moved {} B, less than the {up} B the guest uploaded",
            tx.bytes
        ));
    }
    Ok(format!(
        "RX {} B >= {down} B downloaded; TX {} B >= {up} B uploaded",
        rx.bytes, tx.bytes
    ))
}

fn nic_exits(ally: &AllyReport) -> Result<String, String> {
    let total = ally
        .all("nic-exits")
        .find(|l| l.fields.get("total").is_some())
        .ok_or("no `ALLY nic-exits total=.. packets=.. exits-per-packet=..` line")?;
    let exits = total.number("total").map_err(marker_err)?;
    let packets = total.number("packets").map_err(marker_err)?;
    let per = total
        .fields
        .get("exits-per-packet")
        .ok_or("no exits-per-packet= on the `ALLY nic-exits total=..` line")?;
    let per_value: f64 = per
        .parse()
        .map_err(|_| format!("exits-per-packet=`{per}` is not a number"))?;
    if exits == 0 || packets == 0 {
        return Err(format!("no NIC exits or no packets: {}", total.line));
    }
    let computed = exits as f64 / packets as f64;
    // Ally prints the quotient cut (not rounded) to hundredths.
    if per_value > computed + 1e-9 || computed - per_value >= 0.01 {
        return Err(format!(
            "exits-per-packet={per} but total/packets = {exits}/{packets} = {computed:.4}"
        ));
    }
    let mut registers = Vec::new();
    for l in ally
        .all("nic-exits")
        .filter(|l| l.fields.get("register").is_some())
    {
        registers.push(format!(
            "{} r{}/w{}",
            l.fields.get("register").unwrap_or("?"),
            l.number("reads").map_err(marker_err)?,
            l.number("writes").map_err(marker_err)?
        ));
    }
    Ok(format!(
        "{exits} NIC exits for {packets} packets = {per} per packet ({})",
        if registers.is_empty() {
            "no per-register lines".to_string()
        } else {
            registers.join(", ")
        }
    ))
}

/// The PCI configuration guard ran (issue 3, MSI; issue 4, MMCONFIG): Ally reported how it
/// treats MMCONFIG (`ALLY pci-mmconfig absent` or `hidden base=..`) at start-up and, at
/// power-off, `ALLY pci-guard functions=N guarded-accesses=N msi-rewrites=N msi-refusals=N
/// msix-accesses=N`.
fn pci_guard(ally: &AllyReport) -> Result<String, String> {
    let mmconfig = ally
        .find("pci-mmconfig")
        .ok_or("no `ALLY pci-mmconfig` line: Ally did not say whether MMCONFIG is guarded")?;
    let guard = ally
        .find("pci-guard")
        .ok_or("no `ALLY pci-guard functions=..` line at power-off")?;
    let field = |name: &str| guard.number(name).map_err(marker_err);
    Ok(format!(
        "MMCONFIG {}; {} MSI-capable function(s) guarded; {} guarded configuration accesses, {} MSI rewrites, {} refused, {} MSI-X accesses",
        mmconfig.line.trim_start_matches("ALLY pci-mmconfig "),
        field("functions")?,
        field("guarded-accesses")?,
        field("msi-rewrites")?,
        field("msi-refusals")?,
        field("msix-accesses")?
    ))
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
ALLY pci-mmconfig absent
ALLY pci-guard functions=0 guarded-accesses=12 msi-rewrites=0 msi-refusals=0 msix-accesses=0
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
        let pci = c.iter().find(|c| c.name == "pci-guard").unwrap();
        assert_eq!(
            pci.detail,
            "MMCONFIG absent; 0 MSI-capable function(s) guarded; 12 guarded configuration accesses, 0 MSI rewrites, 0 refused, 0 MSI-X accesses"
        );
        let a = GOOD_ALLY.replace("ALLY pci-mmconfig absent\n", "");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["pci-guard"]);
        let a = GOOD_ALLY.replace("msi-rewrites=0", "msi-rewrites=x");
        assert_eq!(failed(&judge(GOOD_GUEST, &a)), ["pci-guard"]);
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
    fn exits_detail_states_the_handler_cost() {
        let a = AllyReport::parse(
            "ALLY clock tsc-hz=2000000000 rtc-unix=1\n\
             ALLY exits reason=EPT-violation basic=48 count=7 handler-tsc-mean=3000 handler-tsc-max=9000\n\
             ALLY exits reason=CPUID basic=10 count=2\n",
        );
        assert_eq!(
            exits(&a).unwrap(),
            "EPT-violation=7 (handler 3000 TSC ticks = 1.50 us mean, 4.5 us max) CPUID=2"
        );
        let no_clock = AllyReport::parse(
            "ALLY exits reason=EPT-violation basic=48 count=7 handler-tsc-mean=3000 handler-tsc-max=9000\n",
        );
        assert_eq!(
            exits(&no_clock).unwrap(),
            "EPT-violation=7 (handler 3000 TSC ticks mean, 9000 max)"
        );
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

    use crate::attack::ResetMethod;
    use crate::endpoints::{NetOptions, ServedFile, UploadRecord};

    const SHA_BIG: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const SHA_SMALL: &str = "2222222222222222222222222222222222222222222222222222222222222222";
    const SHA_UP: &str = "3333333333333333333333333333333333333333333333333333333333333333";
    const SHA_UP1: &str = "4444444444444444444444444444444444444444444444444444444444444444";
    const SHA_UP2: &str = "5555555555555555555555555555555555555555555555555555555555555555";

    fn net_guest() -> String {
        format!(
            "\
ALLYTEST net INFO http=40001 upload=40002 upload_bytes=16777216 small_bytes=1048576
ALLYTEST download INFO name=big bytes=16777216 sha256={SHA_BIG} seconds=40.00 bytes_per_s=419430
ALLYTEST upload INFO bytes=16777216 sha256={SHA_UP} host_bytes=16777216 host_sha256={SHA_UP} seconds=50.00 bytes_per_s=335544
ALLYTEST download INFO name=small stream=1 streams=2 bytes=1048576 sha256={SHA_SMALL} seconds=2.00
ALLYTEST download INFO name=small stream=2 streams=2 bytes=1048576 sha256={SHA_SMALL} seconds=2.00
ALLYTEST upload INFO stream=1 streams=2 bytes=1048576 sha256={SHA_SMALL} host_bytes=1048576 host_sha256={SHA_SMALL} seconds=4.00
ALLYTEST upload INFO stream=2 streams=2 bytes=1048576 sha256={SHA_SMALL} host_bytes=1048576 host_sha256={SHA_SMALL} seconds=4.00
ALLYTEST pktgen INFO size=64 count=2000 sent=2000 errors=0 seconds=3.10
ALLYTEST pktgen INFO size=1500 count=2000 sent=2000 errors=0 seconds=9.50
ALLYTEST link-flap INFO carrier=1 waited_ms=200 ping_received=3 seconds=2.10
ALLYTEST reload INFO round=1 rmmod=0 insmod=0 carrier=1 waited_ms=1400 ping_received=3
ALLYTEST download INFO name=small round=1 bytes=1048576 sha256={SHA_SMALL} seconds=3.00 bytes_per_s=349525
ALLYTEST upload INFO round=1 bytes=1048576 sha256={SHA_UP1} host_bytes=1048576 host_sha256={SHA_UP1} seconds=4.00 bytes_per_s=262144
ALLYTEST reload INFO round=2 rmmod=0 insmod=0 carrier=1 waited_ms=1200 ping_received=3
ALLYTEST download INFO name=small round=2 bytes=1048576 sha256={SHA_SMALL} seconds=3.00 bytes_per_s=349525
ALLYTEST upload INFO round=2 bytes=1048576 sha256={SHA_UP2} host_bytes=1048576 host_sha256={SHA_UP2} seconds=4.00 bytes_per_s=262144
"
        )
    }

    fn upload_record(bytes: u64, sha256: &str) -> UploadRecord {
        UploadRecord {
            peer: "127.0.0.1:5000".into(),
            bytes,
            sha256: sha256.into(),
            complete: true,
            seconds: 1.0,
            error: None,
            forbidden: false,
        }
    }

    fn net_host() -> NetReport {
        NetReport {
            options: NetOptions {
                streams: 2,
                ..NetOptions::default()
            },
            http_port: 40001,
            upload_port: 40002,
            inspect_drop_port: 40003,
            attack_udp_port: 40004,
            udp_flood_port: 40005,
            udp_flood_sent: 2000,
            udp: crate::endpoints::UdpCounts {
                pktgen_small: 1990,
                pktgen_large: 2000,
                ..Default::default()
            },
            files: vec![
                ServedFile {
                    name: "big".into(),
                    bytes: 16 << 20,
                    sha256: SHA_BIG.into(),
                },
                ServedFile {
                    name: "small".into(),
                    bytes: 1 << 20,
                    sha256: SHA_SMALL.into(),
                },
            ],
            requests: Vec::new(),
            uploads: vec![
                upload_record(16 << 20, SHA_UP),
                upload_record(1 << 20, SHA_UP1),
                upload_record(1 << 20, SHA_UP2),
                upload_record(1 << 20, SHA_SMALL),
                upload_record(1 << 20, SHA_SMALL),
            ],
            errors: Vec::new(),
        }
    }

    fn judge_net(guest: &str, host: &NetReport) -> Vec<Check> {
        network_checks(&GuestReport::parse(guest), host)
    }

    #[test]
    fn good_transfers_pass() {
        let c = judge_net(&net_guest(), &net_host());
        assert!(all_passed(&c), "{c:#?}");
        assert_eq!(
            c[0].detail,
            "big: 16777216 B in 40.00 s (410 KiB/s); small stream 1: 1048576 B in 2.00 s (512 KiB/s); small stream 2: 1048576 B in 2.00 s (512 KiB/s); small round 1: 1048576 B in 3.00 s (341 KiB/s); small round 2: 1048576 B in 3.00 s (341 KiB/s)"
        );
        assert_eq!(
            c[3].detail,
            "2 streams of 1048576 B: downloads in 2.00 s (1024 KiB/s) and uploads in 4.00 s (512 KiB/s) all intact"
        );
        assert_eq!(c[5].detail, "carrier after 200 ms, ping 3/3");
        let g = net_guest().replace("link-flap INFO", "link-flap FAIL");
        assert_eq!(failed(&judge_net(&g, &net_host())), ["link-flap"]);
        assert!(c[2]
            .detail
            .starts_with("round 1: carrier after 1400 ms, ping 3/3"));
    }

    const SHA_REBOOT: &str = "6666666666666666666666666666666666666666666666666666666666666666";

    fn rebooted_guest() -> String {
        format!(
            "{}\
ALLYTEST reboot INFO boot=1 uptime=200.10
ALLYTEST cpus INFO nproc=3 present=0-2 online=0-2 cpuinfo=3
ALLYTEST reset-attack INFO boot=1 method=reboot
ALLYTEST rebooted INFO boot=2 uptime=3.20 nproc=3
ALLYTEST reboot-net INFO insmod=0 carrier=1 waited_ms=400 ping_received=3
ALLYTEST download INFO name=small reboot=1 bytes=1048576 sha256={SHA_SMALL} seconds=2.00
ALLYTEST upload INFO reboot=1 bytes=1048576 sha256={SHA_REBOOT} host_bytes=1048576 host_sha256={SHA_REBOOT} seconds=2.00
",
            net_guest()
        )
    }

    fn rebooted_host() -> NetReport {
        let mut host = net_host();
        host.options.resets = vec![ResetMethod::Reboot];
        host.uploads.push(upload_record(1 << 20, SHA_REBOOT));
        host
    }

    #[test]
    fn a_reboot_needs_both_boots_and_the_network_after_it() {
        let c = judge_net(&rebooted_guest(), &rebooted_host());
        assert!(all_passed(&c), "{c:#?}");
        assert_eq!(
            c[4].detail,
            "rebooted at 200.10 s of uptime; last boot at 3.20 s with 3 CPU(s): carrier after 400 ms, ping 3/3; small after the reboot: 1048576 B in 2.00 s (512 KiB/s); upload after the reboot: 1048576 B in 2.00 s (512 KiB/s)"
        );
        // Not requested: nothing to judge, and the tagged transfers do not count as others.
        assert_eq!(
            judge_net(&net_guest(), &net_host())[4].detail,
            "not requested"
        );
        for (from, to) in [
            ("ALLYTEST rebooted INFO", "x"),
            ("reboot-net INFO", "reboot-net FAIL"),
            ("ALLYTEST reboot INFO", "ALLYTEST reboot FAIL"),
            ("download INFO name=small reboot=1", "x"),
            ("uptime=3.20 nproc=3", "uptime=3.20 nproc=1"),
            ("reset-attack INFO boot=1 method=reboot", "x"),
            ("method=reboot", "method=kbc-pulse"),
        ] {
            let g = rebooted_guest().replacen(from, to, 1);
            assert_eq!(
                failed(&judge_net(&g, &rebooted_host())),
                ["guest-reboot"],
                "{from}"
            );
        }
        // The host did not receive the upload after the reboot (every upload is judged).
        let mut host = rebooted_host();
        host.uploads.pop();
        assert_eq!(
            failed(&judge_net(&rebooted_guest(), &host)),
            ["upload", "guest-reboot"]
        );
    }

    #[test]
    fn a_reset_chain_needs_every_boot_and_the_network_after_the_last() {
        let mut host = rebooted_host();
        host.options.resets = vec![
            ResetMethod::KbcOutput,
            ResetMethod::TripleFault,
            ResetMethod::Reboot,
        ];
        let chain = rebooted_guest().replace(
            "ALLYTEST reset-attack INFO boot=1 method=reboot\nALLYTEST rebooted INFO boot=2 uptime=3.20 nproc=3\n",
            "ALLYTEST reset-attack INFO boot=1 method=kbc-output ibf_clear=1\n\
             ALLYTEST rebooted INFO boot=2 uptime=3.00 nproc=3\n\
             ALLYTEST reset-attack INFO boot=2 ping_received=3 method=triple-fault skipped=needs_ring0\n\
             ALLYTEST reset-fallback INFO boot=2 method=triple-fault\n\
             ALLYTEST rebooted INFO boot=3 uptime=3.10 nproc=3\n\
             ALLYTEST reset-attack INFO boot=3 ping_received=3 method=reboot\n\
             ALLYTEST rebooted INFO boot=4 uptime=3.20 nproc=3\n",
        );
        let c = judge_net(&chain, &host);
        assert!(all_passed(&c), "{c:#?}");
        assert!(
            c[4].detail.starts_with(
                "3 resets (kbc-output,triple-fault,reboot), fell back to reboot -f after: triple-fault (needs_ring0); rebooted at 200.10 s of uptime; last boot at 3.20 s"
            ),
            "{}",
            c[4].detail
        );
        for (from, to) in [
            ("ALLYTEST rebooted INFO boot=3", "x"),
            (
                "boot=3 ping_received=3 method=reboot",
                "boot=3 method=cf9-word",
            ),
            ("ALLYTEST reset-attack INFO boot=1", "x"),
        ] {
            let g = chain.replacen(from, to, 1);
            assert_eq!(failed(&judge_net(&g, &host)), ["guest-reboot"], "{from}");
        }
    }

    #[test]
    fn ally_must_restart_the_guest_once_with_the_other_cores_stopped() {
        let good = "[cpu0 INFO hv] ALLY guest-reset source=keyboard-controller count=1 rip=0xffffffff81000000\n\
            [cpu0 INFO hv] ALLY guest-restarted count=1 source=keyboard-controller other-os-cores=0 stopped=true\n";
        let c = ally_guest_reset(&AllyReport::parse(good), 1);
        assert!(c.passed, "{c}");
        assert_eq!(
            c.detail,
            "reset by keyboard-controller (0 other OS core(s) stopped), guest restarted"
        );
        assert!(!ally_guest_reset(&AllyReport::parse(""), 1).passed);
        assert!(
            !ally_guest_reset(
                &AllyReport::parse(&good.replace("stopped=true", "stopped=false")),
                1
            )
            .passed
        );
        let twice = good.replace("count=1", "count=2");
        assert!(!ally_guest_reset(&AllyReport::parse(&twice), 1).passed);
        assert!(ally_guest_reset(&AllyReport::parse(&twice), 2).passed);
    }

    #[test]
    fn the_parallel_phase_needs_every_stream_whole() {
        let missing = net_guest().replacen("download INFO name=small stream=2", "x", 1);
        assert_eq!(
            failed(&judge_net(&missing, &net_host())),
            ["parallel-transfers"]
        );
        let mut host = net_host();
        host.uploads.pop();
        let c = judge_net(&net_guest(), &host);
        assert!(failed(&c).contains(&"parallel-transfers"), "{c:#?}");
        let mut none = net_host();
        none.options.streams = 0;
        let c = judge_net(&net_guest(), &none);
        assert_eq!(c[3].detail, "skipped (streams=0)");
    }

    #[test]
    fn a_corrupt_download_fails() {
        let g = net_guest().replacen(SHA_BIG, SHA_SMALL, 1);
        let c = judge_net(&g, &net_host());
        assert_eq!(failed(&c), ["download"]);
        assert_eq!(
            c[0].detail,
            format!("big: the guest got 16777216 B sha256={SHA_SMALL}, the host served 16777216 B sha256={SHA_BIG}")
        );
        // A short small download after the second reload fails the reload check too.
        let g = net_guest().replace(
            &format!("round=2 bytes=1048576 sha256={SHA_SMALL}"),
            &format!("round=2 bytes=1000 sha256={SHA_SMALL}"),
        );
        assert_eq!(
            failed(&judge_net(&g, &net_host())),
            ["download", "nic-reload"]
        );
        let g = net_guest().replace("download INFO name=big", "download FAIL name=big");
        assert_eq!(failed(&judge_net(&g, &net_host())), ["download"]);
    }

    #[test]
    fn an_upload_the_host_did_not_get_whole_fails() {
        let mut h = net_host();
        h.uploads[0] = UploadRecord {
            bytes: 1000,
            complete: false,
            error: Some("cut after 1000 bytes: the run ended".into()),
            ..upload_record(1000, SHA_BIG)
        };
        let c = judge_net(&net_guest(), &h);
        assert_eq!(failed(&c), ["upload"]);
        assert!(
            c[1].detail
                .contains("the host recorded no complete upload of 16777216 B"),
            "{}",
            c[1].detail
        );
        // Same bytes, other hash.
        let mut h = net_host();
        h.uploads[0].sha256 = SHA_BIG.into();
        assert_eq!(failed(&judge_net(&net_guest(), &h)), ["upload"]);
        // The guest sent less than it was told to.
        let mut h = net_host();
        h.options.upload_bytes = 32 << 20;
        assert_eq!(failed(&judge_net(&net_guest(), &h)), ["upload"]);
        // The echoed line disagrees with what the guest sent.
        let g = net_guest().replacen(&format!("host_sha256={SHA_UP}"), "host_sha256=none", 1);
        assert_eq!(failed(&judge_net(&g, &net_host())), ["upload"]);
    }

    #[test]
    fn pktgen_needs_every_frame_sent_and_some_received() {
        let c = judge_net(&net_guest(), &net_host());
        let pktgen = c.iter().find(|c| c.name == "pktgen").unwrap();
        assert_eq!(
            pktgen.detail,
            "64 B: 2000 sent in 3.10 s, 1990 received by the host; 1500 B: 2000 sent in 9.50 s, 2000 received by the host"
        );
        let short = net_guest().replace(
            "size=1500 count=2000 sent=2000",
            "size=1500 count=2000 sent=1999",
        );
        assert_eq!(failed(&judge_net(&short, &net_host())), ["pktgen"]);
        let mut host = net_host();
        host.udp.pktgen_small = 0;
        assert_eq!(failed(&judge_net(&net_guest(), &host)), ["pktgen"]);
        host.udp.pktgen_small = 2001;
        assert_eq!(failed(&judge_net(&net_guest(), &host)), ["pktgen"]);
        let missing: String = net_guest()
            .lines()
            .filter(|l| !l.contains("size=64 "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(failed(&judge_net(&missing, &net_host())), ["pktgen"]);
    }

    #[test]
    fn missing_rounds_and_skipped_workload_fail() {
        let g: String = net_guest()
            .lines()
            .filter(|l| !l.contains("round=2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            failed(&judge_net(&g, &net_host())),
            ["download", "upload", "nic-reload"]
        );
        let g = net_guest().replace("reload INFO round=1", "reload FAIL round=1");
        assert_eq!(failed(&judge_net(&g, &net_host())), ["nic-reload"]);
        let c = judge_net(
            "ALLYTEST net INFO skipped=no_endpoints_on_the_kernel_command_line\n",
            &net_host(),
        );
        assert_eq!(
            failed(&c),
            [
                "download",
                "upload",
                "nic-reload",
                "parallel-transfers",
                "link-flap",
                "pktgen"
            ]
        );
        assert!(c[0].detail.starts_with("the guest skipped its transfers"));
    }

    const GOOD_NIC: &str = "\
[cpu1 INFO dpi] ALLY nic-tx packets=15000 bytes=23600000 dropped=0 doorbells=9000 backpressure=2 wire-frames=15000
ALLY nic-rx packets=16000 bytes=23500000 dropped=3 doorbells=400 backpressure=0 wire-frames=16003
ALLY nic-rx-drop reason=guest_rx_off packets=3 ring-stops=1
ALLY nic-exits register=TDT reads=0 writes=9000
ALLY nic-exits register=RDT reads=0 writes=400
ALLY nic-exits total=9400 queue=9400 forwarded=0 packets=31000 exits-per-packet=0.30 queue-exits-per-packet=0.30
[cpu0 INFO hv] ALLY mark id=3 vcpu=0 exits=1000 ept-violations=900 apic-mmio-exits=500 ioapic-exits=0 dpi-heartbeat=5
[cpu0 INFO hv] ALLY nic-mark id=3 exits=100 fused=5 forwarded=10 tx-packets=10 rx-packets=20 tx-wire=10 rx-wire=20 irqs-raised=9 irq-doorbells=8 registers=ICR:4/0,STATUS:10/0
[cpu0 INFO hv] ALLY apic-mark id=3 registers=EOI:0/100,TMICT:0/50
[cpu0 INFO hv] ALLY apic-mark id=4 registers=EOI:0/1300,TMICT:0/750,ICR_LOW:0/1
[cpu0 INFO hv] ALLY mark id=4 vcpu=0 exits=5000 ept-violations=4000 apic-mmio-exits=2500 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=4 fused=305 exits=1100 forwarded=410 tx-packets=1010 rx-packets=2020 tx-wire=1010 rx-wire=2020 irqs-raised=209 irq-doorbells=208 registers=ICR:204/0,TDT:0/300,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=5 vcpu=0 exits=6000 ept-violations=5000 apic-mmio-exits=3000 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=5 fused=305 exits=1200 forwarded=410 tx-packets=1010 rx-packets=2020 tx-wire=1010 rx-wire=2020 irqs-raised=209 irq-doorbells=208 registers=ICR:204/0,TDT:0/300,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=6 vcpu=0 exits=6600 ept-violations=5500 apic-mmio-exits=3300 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=6 fused=305 exits=1600 forwarded=410 tx-packets=1030 rx-packets=2120 tx-wire=2010 rx-wire=2120 irqs-raised=259 irq-doorbells=258 registers=ICR:254/0,TDT:0/650,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=7 vcpu=0 exits=6700 ept-violations=5600 apic-mmio-exits=3400 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=7 fused=305 exits=1700 forwarded=410 tx-packets=1030 rx-packets=2120 tx-wire=2010 rx-wire=2120 irqs-raised=259 irq-doorbells=258 registers=ICR:254/0,TDT:0/650,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=8 vcpu=0 exits=6900 ept-violations=5800 apic-mmio-exits=3500 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=8 fused=305 exits=1800 forwarded=410 tx-packets=1130 rx-packets=3120 tx-wire=2110 rx-wire=3120 irqs-raised=269 irq-doorbells=268 registers=ICR:264/0,TDT:0/740,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=9 vcpu=0 exits=7000 ept-violations=5900 apic-mmio-exits=3600 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=9 fused=305 exits=1810 forwarded=410 tx-packets=1130 rx-packets=3120 tx-wire=2110 rx-wire=3120 irqs-raised=269 irq-doorbells=268 registers=ICR:264/0,TDT:0/740,STATUS:410/0
[cpu0 INFO hv] ALLY mark id=10 vcpu=0 exits=7200 ept-violations=6100 apic-mmio-exits=3700 ioapic-exits=0 dpi-heartbeat=9
[cpu0 INFO hv] ALLY nic-mark id=10 fused=305 exits=2010 forwarded=410 tx-packets=1430 rx-packets=3420 tx-wire=2710 rx-wire=3420 irqs-raised=289 irq-doorbells=288 registers=ICR:284/0,TDT:0/920,STATUS:410/0
";

    fn judge_nic(ally: &str) -> Vec<Check> {
        nic_checks(
            &GuestReport::parse(&net_guest()),
            &AllyReport::parse(ally),
            AttackDrops::default(),
        )
    }

    /// The nic-traffic check of [`GOOD_NIC`] with `dropped` more frames dropped for `reason`
    /// in direction `dir`, judged with the attacks' frames `attacks`.
    fn nic_traffic_with_drop(reason: &str, dir: &str, dropped: u64, attacks: AttackDrops) -> Check {
        let ally = if dir == "tx" {
            GOOD_NIC.replace(
                "ALLY nic-tx packets=15000 bytes=23600000 dropped=0",
                &format!("ALLY nic-tx packets=15000 bytes=23600000 dropped={dropped}"),
            )
        } else {
            // On top of the 3 guest_rx_off drops, each a wire frame too.
            GOOD_NIC.replace(
                "dropped=3 doorbells=400 backpressure=0 wire-frames=16003",
                &format!(
                    "dropped={} doorbells=400 backpressure=0 wire-frames={}",
                    3 + dropped,
                    16003 + dropped
                ),
            )
        } + &format!(
            "[cpu1 INFO dpi] ALLY nic-{dir}-drop reason={reason} packets={dropped} ring-stops=0\n"
        );
        nic_checks(
            &GuestReport::parse(&net_guest()),
            &AllyReport::parse(&ally),
            attacks,
        )
        .remove(0)
    }

    #[test]
    fn the_attack_frames_are_the_only_offload_and_checksum_drops_allowed() {
        let attacks = |offload, checksum| AttackDrops { offload, checksum };
        let c = nic_traffic_with_drop("offload", "tx", 1, attacks(1, 1));
        assert!(c.passed, "{c}");
        assert!(c.detail.contains("tx 15000 packets 23600000 B, 9000 doorbells, 2 back-pressure, 1 dropped (offload: 1)"), "{c}");
        // Without the attack, or with more offload drops than attack frames: a refused frame
        // of the guest's own driver.
        assert!(!nic_traffic_with_drop("offload", "tx", 1, attacks(0, 1)).passed);
        assert!(!nic_traffic_with_drop("offload", "tx", 2, attacks(1, 2)).passed);
        // The astray RST's checksum drop, with the attack and without.
        let c = nic_traffic_with_drop("checksum", "tx", 1, attacks(0, 1));
        assert!(c.passed, "{c}");
        assert!(!nic_traffic_with_drop("checksum", "tx", 1, attacks(0, 0)).passed);
        // A received frame with a wrong checksum is never an attack frame of the guest's.
        let c = nic_traffic_with_drop("checksum", "rx", 1, attacks(0, 1));
        assert!(
            !c.passed && c.detail.contains("rx drops for reasons other than"),
            "{c}"
        );
    }

    #[test]
    fn nic_counters_of_a_good_run_pass() {
        let c = judge_nic(GOOD_NIC);
        assert!(all_passed(&c), "{c:#?}");
        assert!(c[0].detail.contains("rx 16000 packets 23500000 B, 400 doorbells, 0 back-pressure, 3 dropped (guest_rx_off: 3), ring stops: guest_rx_off=1"), "{}", c[0].detail);
        assert_eq!(
            c[2].detail,
            "9400 NIC exits for 31000 packets = 0.30 per packet (TDT r0/w9000, RDT r0/w400)"
        );
        assert_eq!(
            c[3].detail,
            "download: 3000 wire frames, 1000 NIC exits = 0.333/frame [STATUS 400 (0.133), TDT 300 (0.100), ICR 200 (0.067)], 300 flush reads fused into the write's exit (0.100/frame), 200 guest interrupts (15.0 frames each); all VM exits 4000 = 1.333/frame, APIC 2000 = 0.667/frame [EOI 1200, TMICT 700, ICR_LOW 1]; \
             upload: 1100 wire frames, 400 NIC exits = 0.364/frame [TDT 350 (0.318), ICR 50 (0.045)], 0 flush reads fused into the write's exit (0.000/frame), 50 guest interrupts (22.0 frames each); all VM exits 600 = 0.545/frame, APIC 300 = 0.273/frame; \
             parallel download: 1100 wire frames, 100 NIC exits = 0.091/frame [TDT 90 (0.082), ICR 10 (0.009)], 0 flush reads fused into the write's exit (0.000/frame), 10 guest interrupts (110.0 frames each); all VM exits 200 = 0.182/frame, APIC 100 = 0.091/frame; \
             parallel upload: 900 wire frames, 200 NIC exits = 0.222/frame [TDT 180 (0.200), ICR 20 (0.022)], 0 flush reads fused into the write's exit (0.000/frame), 20 guest interrupts (45.0 frames each); all VM exits 200 = 0.222/frame, APIC 100 = 0.111/frame"
        );
    }

    #[test]
    fn transfer_exits_need_both_marks_of_each_transfer() {
        let a: String = GOOD_NIC
            .lines()
            .filter(|l| !l.contains("nic-mark id=6"))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = judge_nic(&a);
        assert_eq!(failed(&c), ["nic-transfer-exits"]);
        assert_eq!(
            c[3].detail,
            "no `ALLY nic-mark id=6` line (the guest marks its transfers)"
        );
        let a = GOOD_NIC.replace("registers=ICR:254/0", "registers=ICR254/0");
        assert_eq!(failed(&judge_nic(&a)), ["nic-transfer-exits"]);
    }

    #[test]
    fn nic_checks_fail_on_drops_short_counts_and_missing_lines() {
        let a = GOOD_NIC.replace("reason=guest_rx_off", "reason=protected");
        assert_eq!(failed(&judge_nic(&a)), ["nic-traffic"]);
        assert_eq!(
            judge_nic(&a)[0].detail,
            "rx drops for reasons other than guest_rx_off and verdict: protected: 3 packets, 1 ring stops"
        );
        // Drops not accounted for by a reason.
        let a = GOOD_NIC.replace("dropped=0 doorbells=9000", "dropped=5 doorbells=9000");
        assert_eq!(failed(&judge_nic(&a)), ["nic-traffic"]);
        let a = GOOD_NIC.replace("nic-tx packets=15000", "nic-tx packets=0");
        assert_eq!(failed(&judge_nic(&a)), ["nic-traffic"]);
        // RX moved fewer bytes than the guest downloaded (16 MiB + 2 x 1 MiB + 2 x 1 MiB).
        let a = GOOD_NIC.replace("bytes=23500000", "bytes=20000000");
        assert_eq!(failed(&judge_nic(&a)), ["nic-bytes"]);
        let a = GOOD_NIC.replace("exits-per-packet=0.30", "exits-per-packet=1.30");
        assert_eq!(failed(&judge_nic(&a)), ["nic-exits"]);
        // 9400 / 31000 = 0.3032: 0.30 (cut) passes, 0.31 does not.
        let a = GOOD_NIC.replace("exits-per-packet=0.30", "exits-per-packet=0.31");
        assert_eq!(failed(&judge_nic(&a)), ["nic-exits"]);
        // A ring stop under another reason, without drops, is reported, not failed.
        let a = GOOD_NIC.replace(
            "ALLY nic-exits register=TDT",
            "ALLY nic-tx-drop reason=overflow packets=0 ring-stops=2\nALLY nic-exits register=TDT",
        );
        let c = judge_nic(&a);
        assert!(all_passed(&c), "{c:#?}");
        assert!(
            c[0].detail.contains("ring stops: overflow=2"),
            "{}",
            c[0].detail
        );
        // Drop verdicts of the rules are frame drops the inspection checks account for.
        let a = GOOD_NIC.replace(
            "ALLY nic-exits register=TDT",
            "ALLY nic-tx-drop reason=verdict packets=4 ring-stops=0\nALLY nic-exits register=TDT",
        )
        .replace("dropped=0 doorbells=9000", "dropped=4 doorbells=9000");
        let c = judge_nic(&a);
        assert!(all_passed(&c), "{c:#?}");
        assert!(
            c[0].detail.contains("4 dropped (verdict: 4)"),
            "{}",
            c[0].detail
        );
        let c = judge_nic("ALLY poweroff\n");
        assert_eq!(
            failed(&c),
            [
                "nic-traffic",
                "nic-bytes",
                "nic-exits",
                "nic-transfer-exits"
            ]
        );
        assert_eq!(
            c[0].detail,
            "no `ALLY nic-tx packets=.. bytes=.. dropped=.. doorbells=.. backpressure=..` line"
        );
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

    fn nic_wire_balance_(ally: &AllyReport, wire: &crate::wire::WireCounts) -> Check {
        nic_wire_balance(ally, wire, None)
    }

    #[test]
    fn wire_balance_needs_equal_frame_counts() {
        let ally = AllyReport::parse(
            "[cpu0 INFO  ally::nic] ALLY nic-tx packets=5 bytes=900 dropped=0 doorbells=5 backpressure=0 wire-frames=7\n\
             [cpu0 INFO  ally::nic] ALLY nic-rx packets=3 bytes=400 dropped=1 doorbells=2 backpressure=0 wire-frames=4\n\
             [cpu0 INFO  ally::nic] ALLY nic-rx-missed frames=0 register=MPC\n",
        );
        let wire = |to_host_frames, to_guest_frames| crate::wire::WireCounts {
            to_host_frames,
            to_host_bytes: 1000,
            to_guest_frames,
            to_guest_bytes: 500,
            to_guest_multicast: 0,
        };
        assert!(nic_wire_balance_(&ally, &wire(7, 4)).passed);
        // Ally counting a frame the wire did not carry.
        assert!(!nic_wire_balance_(&ally, &wire(7, 3)).passed);
        // One or two frames after the receiver stopped at power-off: reported.
        let c = nic_wire_balance_(&ally, &wire(7, 5));
        assert!(
            c.passed && c.detail.contains("+ 1 after the receiver stopped"),
            "{c}"
        );
        assert!(nic_wire_balance_(&ally, &wire(7, 6)).passed);
        assert!(!nic_wire_balance_(&ally, &wire(7, 7)).passed);
        assert!(!nic_wire_balance_(&ally, &wire(6, 4)).passed);
        // More frames on the wire than Ally's TSO estimate: reported, not failed.
        assert!(nic_wire_balance_(&ally, &wire(9, 4)).passed);
        assert!(!nic_wire_balance(&AllyReport::parse(""), &wire(7, 4), None).passed);
    }

    #[test]
    fn wire_balance_counts_filtered_multicast_and_late_frames() {
        let report = AllyReport::parse(
            "[cpu0 INFO  ally::nic] ALLY nic-tx packets=5 bytes=900 dropped=0 doorbells=5 backpressure=0 wire-frames=7\n\
             [cpu0 INFO  ally::nic] ALLY nic-rx packets=30 bytes=400 dropped=0 doorbells=2 backpressure=0 wire-frames=30\n\
             [cpu0 INFO  ally::nic] ALLY nic-rx-missed frames=0 register=MPC\n",
        );
        let wire = |to_guest_frames, to_guest_multicast| crate::wire::WireCounts {
            to_host_frames: 7,
            to_host_bytes: 1000,
            to_guest_frames,
            to_guest_bytes: 500,
            to_guest_multicast,
        };
        // 30 through Ally, 10 multicast the filter refused.
        let c = nic_wire_balance_(&report, &wire(40, 10));
        assert!(c.passed && c.detail.contains("refused (10)"), "{c}");
        // Multicast excuses only multicast: 10 unicast frames lost fail.
        assert!(!nic_wire_balance_(&report, &wire(40, 0)).passed);
        // Frames the capture shows after Ally's last one are late, however many.
        let c = nic_wire_balance(&report, &wire(52, 10), Some(12));
        assert!(
            c.passed && c.detail.contains("12 after the receiver stopped"),
            "{c}"
        );
        assert!(!nic_wire_balance(&report, &wire(52, 10), Some(10)).passed);
        // Frames the device missed (MPC) are accounted, and only as many as it counted.
        let missed = |taken: u64, missed: u64| {
            AllyReport::parse(&format!(
                "[cpu0 INFO  ally::nic] ALLY nic-tx packets=5 bytes=900 dropped=0 doorbells=5 backpressure=0 wire-frames=7\n\
                 [cpu0 INFO  ally::nic] ALLY nic-rx packets={taken} bytes=400 dropped=0 doorbells=2 backpressure=0 wire-frames={taken}\n\
                 [cpu0 INFO  ally::nic] ALLY nic-rx-missed frames={missed} register=MPC\n"
            ))
        };
        let c = nic_wire_balance(&missed(9_329, 671), &wire(10_000, 0), Some(0));
        assert!(
            c.passed && c.detail.contains("no free descriptor (671)"),
            "{c}"
        );
        assert!(!nic_wire_balance(&missed(9_329, 668), &wire(10_000, 0), Some(0)).passed);
        assert!(!nic_wire_balance(&missed(9_329, 672), &wire(10_000, 0), Some(0)).passed);
        // Without the missed-frame line there is no balance.
        let c = nic_wire_balance_(
            &AllyReport::parse(
                "[cpu0 INFO  ally::nic] ALLY nic-tx packets=5 bytes=900 dropped=0 doorbells=5 backpressure=0 wire-frames=7\n\
                 [cpu0 INFO  ally::nic] ALLY nic-rx packets=30 bytes=400 dropped=0 doorbells=2 backpressure=0 wire-frames=30\n",
            ),
            &wire(30, 0),
        );
        assert!(!c.passed && c.detail.contains("nic-rx-missed"), "{c}");
    }
}
