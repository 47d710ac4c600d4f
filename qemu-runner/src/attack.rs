//! Issue 11's guest-side attacks: what a scenario asks the guest to run (`ally.attacks=` and
//! `ally.resets=` on its kernel command line), the attacker binary (`guest/attack`, built for
//! x86_64-unknown-linux-musl and put in the initramfs as /bin/ally-attack), and the parsing of
//! its marker lines (`ALLYTEST attack-<name> INFO key=value ...`) in one place, so checks on
//! Ally's side can be written against [`AttackMarker`]s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::checks::Check;
use crate::emulator::{Iommu, Machine};
use crate::endpoints::{NetReport, UdpCounts};
use crate::markers::{parse_number, AllyReport, Fields, GuestMarker, GuestReport};
use crate::tool::{self, ToolError};
use ally_dpi::queue::WakeHistogram;

/// The attacker's Rust target (a static binary: the initramfs has no C library).
pub const ATTACK_TARGET: &str = "x86_64-unknown-linux-musl";

/// One attack of `ally-attack` (its subcommand name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attack {
    /// SLP_TYP|SLP_EN into PM1_CNT for every S1-S4 of the DSDT.
    Sleep,
    /// WRMSRs: trace/DS output, PEBS, MTRR, MISC_ENABLE, PERF_CTL, power limit, APIC base...
    Msr,
    /// The CONFIG_ADDRESS/CONFIG_DATA race between two CPUs at the NIC's BAR1, odd accesses.
    PciRace,
    /// Logical-mode fixed, NMI, lowest-priority and INIT IPIs.
    IpiLogical,
    /// TCTL.SWXOFF and the flow-control registers.
    Swxoff,
    /// A bit-banged EEPROM write of word 0.
    Eeprom,
    /// A TX context descriptor aiming TUCSO into the payload (after `rmmod e1000`).
    Tucso,
    /// A burst of UDP datagrams each alerted on, with ping RTTs idle and during it.
    AlertStorm,
    /// The forbidden upload content sent one byte per TCP segment.
    SplitUpload,
    /// A forbidden UDP datagram over the MTU, which the guest's IP layer fragments.
    FragUdp,
    /// Forged segments ahead of two live uploads: a copy of the upload's own bytes (held and
    /// sent once in order) and the forbidden content (held, then dropped).
    OooUpload,
    /// The forbidden upload split around an exact RST its receiver never gets (a bad IPv4
    /// header checksum, which slirp drops as a router would).
    RstSplit,
    /// Issue 14: the AHCI controller programmed to DMA from and into Ally's region (q35;
    /// skipped where there is no AHCI controller). Judged by [`dma_check`].
    Dma,
}

impl Attack {
    pub const ALL: [Attack; 13] = [
        Attack::Sleep,
        Attack::Msr,
        Attack::PciRace,
        Attack::IpiLogical,
        Attack::Swxoff,
        Attack::Eeprom,
        Attack::Tucso,
        Attack::AlertStorm,
        Attack::SplitUpload,
        Attack::FragUdp,
        Attack::OooUpload,
        Attack::RstSplit,
        Attack::Dma,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::Sleep => "sleep",
            Attack::Msr => "msr",
            Attack::PciRace => "pci-race",
            Attack::IpiLogical => "ipi-logical",
            Attack::Swxoff => "swxoff",
            Attack::Eeprom => "eeprom",
            Attack::Tucso => "tucso",
            Attack::AlertStorm => "alert-storm",
            Attack::SplitUpload => "split-upload",
            Attack::FragUdp => "frag-udp",
            Attack::OooUpload => "ooo-upload",
            Attack::RstSplit => "rst-split",
            Attack::Dma => "dma",
        }
    }

    /// The guest marker the attack prints.
    pub fn marker_name(self) -> String {
        format!("attack-{}", self.name())
    }

    pub fn parse(s: &str) -> Option<Attack> {
        Attack::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A way to reset the PC (`ally-attack reset <method>`), one per boot of the reset chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetMethod {
    /// 8042 command 0xFE (pulse the reset line).
    KbcPulse,
    /// 8042 command 0xD1, then output-port byte 0xFE (reset line bit 0 clear).
    KbcOutput,
    /// A word write at 0x91: 0x92 gets 0x01 (fast reset).
    Port92Word,
    /// A word write at 0xCF8: 0xCF9 gets 0x06.
    Cf9Word,
    /// A byte write of 0x06 to 0xCF9.
    Cf9Byte,
    /// The FADT's RESET_REG/RESET_VALUE.
    AcpiResetReg,
    /// Needs ring 0: the guest reports it skipped.
    TripleFault,
    /// busybox `reboot -f` (the kernel's own reset path).
    Reboot,
}

impl ResetMethod {
    pub const ALL: [ResetMethod; 8] = [
        ResetMethod::KbcPulse,
        ResetMethod::KbcOutput,
        ResetMethod::Port92Word,
        ResetMethod::Cf9Word,
        ResetMethod::Cf9Byte,
        ResetMethod::AcpiResetReg,
        ResetMethod::TripleFault,
        ResetMethod::Reboot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResetMethod::KbcPulse => "kbc-pulse",
            ResetMethod::KbcOutput => "kbc-output",
            ResetMethod::Port92Word => "port92-word",
            ResetMethod::Cf9Word => "cf9-word",
            ResetMethod::Cf9Byte => "cf9-byte",
            ResetMethod::AcpiResetReg => "acpi-reset-reg",
            ResetMethod::TripleFault => "triple-fault",
            ResetMethod::Reboot => "reboot",
        }
    }

    pub fn parse(s: &str) -> Option<ResetMethod> {
        ResetMethod::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl fmt::Display for ResetMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a comma-separated list with `parse`, naming the first unknown word.
pub fn parse_list<T>(s: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|w| !w.is_empty())
        .map(|w| parse(w).ok_or_else(|| format!("unknown `{w}`")))
        .collect()
}

/// `a,b,c` of a list of names.
pub fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The kernel command-line words for the attacks and the reset chain (empty when none).
pub fn guest_cmdline(attacks: &[Attack], resets: &[ResetMethod]) -> String {
    let mut w = Vec::new();
    if !attacks.is_empty() {
        w.push(format!("ally.attacks={}", join(attacks)));
    }
    if !resets.is_empty() {
        w.push(format!("ally.resets={}", join(resets)));
    }
    w.join(" ")
}

/// One attack's marker: the attack and its key=values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttackMarker {
    pub attack: Attack,
    pub fields: Fields,
    pub line: String,
}

impl AttackMarker {
    fn from_marker(m: &GuestMarker) -> Option<AttackMarker> {
        let attack = Attack::parse(m.name.strip_prefix("attack-")?)?;
        Some(AttackMarker {
            attack,
            fields: m.fields.clone(),
            line: m.line.clone(),
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key)
    }

    /// The numeric field `key`, or an error naming the field and the line.
    pub fn number(&self, key: &str) -> Result<u64, String> {
        self.get(key)
            .and_then(parse_number)
            .ok_or(format!("no number `{key}=` in {}", self.line))
    }

    /// Why the attack did not run, when it says so (`skipped=`, `error=`, `refused=`).
    pub fn not_run(&self) -> Option<String> {
        ["refused", "error"]
            .into_iter()
            .find_map(|k| self.get(k).map(|v| format!("{k}={v}")))
    }
}

/// Every attack marker of the guest console, in order.
pub fn attack_markers(guest: &GuestReport) -> Vec<AttackMarker> {
    guest
        .markers
        .iter()
        .filter_map(AttackMarker::from_marker)
        .collect()
}

/// The marker of `attack`, if it printed one.
pub fn find(guest: &GuestReport, attack: Attack) -> Option<AttackMarker> {
    attack_markers(guest)
        .into_iter()
        .find(|m| m.attack == attack)
}

/// One reset of the chain as the guest announced it (`ALLYTEST reset-attack INFO boot=K
/// method=M ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetMarker {
    pub boot: u64,
    pub method: String,
    pub fields: Fields,
    pub line: String,
}

pub fn reset_markers(guest: &GuestReport) -> Vec<ResetMarker> {
    guest
        .all("reset-attack")
        .map(|m| ResetMarker {
            boot: m.number("boot").unwrap_or(0),
            method: m.fields.get("method").unwrap_or("").to_string(),
            fields: m.fields.clone(),
            line: m.line.clone(),
        })
        .collect()
}

/// `attack-markers`: every attack the scenario asked for printed its marker, and ran (no
/// `error=` or `refused=`; `skipped=` is the attack's own judgement, e.g. one CPU). Ally's
/// side of each attack is judged elsewhere.
pub fn attack_markers_check(guest: &GuestReport, requested: &[Attack]) -> Check {
    Check::from_result("attack-markers", judge_markers(guest, requested))
}

fn judge_markers(guest: &GuestReport, requested: &[Attack]) -> Result<String, String> {
    if requested.is_empty() {
        return Ok("no attacks requested".into());
    }
    let seen = attack_markers(guest);
    let mut missing = Vec::new();
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for &a in requested {
        match seen.iter().find(|m| m.attack == a) {
            None => missing.push(a.marker_name()),
            Some(m) => match m.not_run() {
                Some(why) => failed.push(format!("{a}: {why}")),
                None => summary.push(match m.get("skipped") {
                    Some(s) => format!("{a} (skipped={s})"),
                    None => a.to_string(),
                }),
            },
        }
    }
    if !missing.is_empty() || !failed.is_empty() {
        return Err(format!(
            "missing markers: [{}]; attacks that could not run: [{}]",
            missing.join(", "),
            failed.join("; ")
        ));
    }
    Ok(format!(
        "every requested attack reported: {}",
        summary.join(", ")
    ))
}

/// `attack-refused`: for each attack the scenario ran, the evidence that Ally refused it,
/// from Ally's own counters (COM2) and what the guest and the host's UDP sink saw. One check
/// for the whole suite, naming every attack's evidence.
pub fn ally_defences_check(
    guest: &GuestReport,
    ally: &AllyReport,
    net: &NetReport,
    requested: &[Attack],
) -> Check {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for &attack in requested {
        let marker = find(guest, attack);
        if marker.as_ref().and_then(|m| m.get("skipped")).is_some() {
            ok.push(format!("{attack}: skipped by the guest"));
            continue;
        }
        match ally_refused(attack, marker.as_ref(), ally, net) {
            Ok(evidence) => ok.push(format!("{attack}: {evidence}")),
            Err(why) => failed.push(format!("{attack}: {why}")),
        }
    }
    if failed.is_empty() {
        Check::new("attack-refused", true, ok.join("; "))
    } else {
        Check::new(
            "attack-refused",
            false,
            format!(
                "not refused: {}; refused: {}",
                failed.join("; "),
                ok.join("; ")
            ),
        )
    }
}

/// A numeric field of the last `ALLY <key>` line that has it.
fn ally_count(ally: &AllyReport, key: &str, field: &str) -> Option<u64> {
    ally.all(key)
        .filter_map(|l| l.fields.get(field)?.parse().ok())
        .last()
}

fn at_least(ally: &AllyReport, key: &str, field: &str, min: u64) -> Result<String, String> {
    match ally_count(ally, key, field) {
        Some(n) if n >= min => Ok(format!("ALLY {key} {field}={n}")),
        Some(n) => Err(format!("ALLY {key} {field}={n}, expected at least {min}")),
        None => Err(format!("no `ALLY {key} {field}=` line")),
    }
}

/// Ally's last count of TX frames dropped for `reason` (`ALLY nic-tx-drop reason=.. packets=N`).
fn tx_drops(ally: &AllyReport, reason: &str) -> u64 {
    ally.all("nic-tx-drop")
        .filter(|l| l.fields.get("reason") == Some(reason))
        .filter_map(|l| l.fields.get("packets")?.parse::<u64>().ok())
        .last()
        .unwrap_or(0)
}

fn ally_refused(
    attack: Attack,
    marker: Option<&AttackMarker>,
    ally: &AllyReport,
    net: &NetReport,
) -> Result<String, String> {
    let udp = &net.udp;
    let marker = marker.ok_or("no guest marker")?;
    let guest = |key: &str| marker.get(key).unwrap_or("none").to_string();
    match attack {
        Attack::Sleep => {
            if marker.get("alive") != Some("1") {
                return Err(format!("the guest did not keep running: {}", marker.line));
            }
            at_least(ally, "power-guard", "sleep-refused", 1).map(|e| format!("{e}, guest alive"))
        }
        Attack::Msr => {
            let gp = ["0x560", "0x570", "0x600", "0x3f1"];
            let reached: Vec<_> = gp.iter().filter(|k| guest(k) != "EIO").collect();
            if !reached.is_empty() {
                return Err(format!("writes without #GP in the guest: {reached:?}"));
            }
            at_least(ally, "msr-guard", "refused", gp.len() as u64)
                .map(|e| format!("{e}, PT/DS/PEBS writes #GP"))
        }
        Attack::PciRace => {
            let (before, after) = (guest("bar1_before"), guest("bar1_after"));
            if before != after {
                return Err(format!("the NIC's I/O BAR moved: {before} -> {after}"));
            }
            Ok(format!(
                "I/O BAR unchanged ({after}) after {} racing iterations",
                guest("iterations")
            ))
        }
        Attack::IpiLogical => {
            let dropped: u64 = ally
                .all("ipi-dropped")
                .filter_map(|l| l.fields.get("count")?.parse::<u64>().ok())
                .sum();
            let rewritten = ally_count(ally, "ipi-rewritten", "count").unwrap_or(0);
            if dropped + rewritten == 0 {
                return Err("Ally dropped or rewrote no IPI".into());
            }
            Ok(format!("ipi-dropped={dropped} ipi-rewritten={rewritten}"))
        }
        Attack::Swxoff => at_least(ally, "nic-refused", "SWXOFF", 1),
        Attack::Eeprom => {
            if guest("before") != guest("after") {
                return Err(format!("EEPROM word 0 changed: {}", marker.line));
            }
            at_least(ally, "nic-refused", "EEPROM-write", 1)
                .map(|e| format!("{e}, word 0 still {}", guest("after")))
        }
        Attack::Tucso => {
            if udp.tucso != 0 {
                return Err(format!("the host received {} TUCSO frame(s)", udp.tucso));
            }
            let drops = tx_drops(ally, "offload");
            if drops == 0 {
                return Err("no `ALLY nic-tx-drop reason=offload` drop".into());
            }
            Ok(format!("offload drops={drops}, host received none"))
        }
        Attack::AlertStorm => alert_storm_evidence(marker, ally, udp),
        Attack::SplitUpload => split_upload_evidence(marker, net),
        Attack::OooUpload => ooo_upload_evidence(marker, ally, net),
        Attack::RstSplit => rst_split_evidence(marker, ally, net),
        Attack::FragUdp => frag_udp_evidence(marker, ally, &net.udp),
        // With or without an IOMMU it has its own check, which knows the machine's.
        Attack::Dma => Ok("judged by the dma-iommu check".into()),
    }
}

/// What the DMA attack is judged against: the machine, its IOMMU, and whether Ally was told to
/// run without one (`iommu=off` on its command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSetup {
    pub machine: Machine,
    pub iommu: Iommu,
    pub ally_iommu_off: bool,
}

impl DmaSetup {
    pub fn of_run(machine: Machine, iommu: Iommu, ally_options: &str) -> DmaSetup {
        DmaSetup {
            machine,
            iommu,
            ally_iommu_off: ally_options.split_whitespace().any(|w| w == "iommu=off"),
        }
    }
}

/// One `ALLY iommu-fault device=BB:DD.F address=0x.. reason=..` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuFault {
    pub device: String,
    pub address: u64,
    pub reason: String,
}

/// Every IOMMU fault Ally reported (lines without a device or a numeric address are skipped).
pub fn iommu_faults(ally: &AllyReport) -> Vec<IommuFault> {
    ally.all("iommu-fault")
        .filter_map(|l| {
            Some(IommuFault {
                device: l.fields.get("device")?.to_string(),
                address: parse_number(l.fields.get("address")?)?,
                reason: l.fields.get("reason").unwrap_or("none").to_string(),
            })
        })
        .collect()
}

/// Whether a fault at `address` is the attack's at `target`: in the pages its `bytes` from
/// `target` touch (VT-d fault records give the page only, 4 KiB-aligned; AMD-Vi's event log
/// the address).
pub fn fault_near(address: u64, target: u64, bytes: u64) -> bool {
    let first = target & !0xfff;
    let end = target.saturating_add(bytes.max(1)).next_multiple_of(0x1000);
    (first..end).contains(&address)
}

/// One DMA transfer of the attack: a sector.
const DMA_BYTES: u64 = 512;

/// `dma-iommu`: issue 14's DMA attack. With an IOMMU, Ally reported the AHCI's fault at the
/// target, the leak read back no data and the canary is intact; without one (and Ally told
/// `iommu=off`) the test documents the hole: it passes when data leaked and fails when none
/// did (then the attack itself is broken). Either way the control DMA through the attacker's
/// own page must have worked, or the attack proves nothing.
pub fn dma_check(guest: &GuestReport, ally: &AllyReport, setup: DmaSetup) -> Check {
    Check::from_result(
        "dma-iommu",
        judge_dma(find(guest, Attack::Dma).as_ref(), ally, setup),
    )
}

/// What the leak brought back: the number of non-zero bytes of the scratch sector the device
/// wrote from the target (zeroed before), with its digest and first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leak {
    status: String,
    nonzero: u64,
    digest: String,
    head: String,
}

impl Leak {
    fn of(marker: &AttackMarker) -> Result<Leak, String> {
        let status = marker.get("leak_status").unwrap_or("none").to_string();
        let nonzero = marker
            .get("leak_bytes_nonzero")
            .and_then(parse_number)
            .ok_or_else(|| {
                format!(
                    "the leaked sector was not read back (leak_status={status}, leak_readback={}): {}",
                    marker.get("leak_readback").unwrap_or("none"),
                    marker.line
                )
            })?;
        Ok(Leak {
            status,
            nonzero,
            digest: marker.get("leak_digest").unwrap_or("none").to_string(),
            head: marker.get("leak_head").unwrap_or("none").to_string(),
        })
    }

    fn leaked(&self) -> bool {
        self.nonzero > 0
    }
}

/// A DMA attack the guest skipped (no AHCI controller): fine on a machine without one, a
/// failure on q35, whose ICH9 AHCI controller is the attack's bus master.
fn skipped_dma(marker: &AttackMarker, setup: DmaSetup) -> Option<Result<String, String>> {
    let s = marker.get("skipped")?;
    Some(if setup.machine == Machine::Q35 {
        Err(format!(
            "skipped ({s}) on q35, whose ICH9 AHCI controller is the attack's bus master: {}",
            marker.line
        ))
    } else {
        Ok(format!(
            "skipped by the guest ({s}): the {} machine has no AHCI controller",
            setup.machine
        ))
    })
}

fn judge_dma(
    marker: Option<&AttackMarker>,
    ally: &AllyReport,
    setup: DmaSetup,
) -> Result<String, String> {
    let marker = marker.ok_or("no `ALLYTEST attack-dma` marker")?;
    if let Some(why) = marker.not_run() {
        return Err(format!("the attack could not run ({why}): {}", marker.line));
    }
    if let Some(verdict) = skipped_dma(marker, setup) {
        return verdict;
    }
    let guest = |key: &str| marker.get(key).unwrap_or("none");
    if guest("control") != "ok" {
        return Err(format!(
            "the control DMA through the attacker's own page failed (control={}, errors={}): the attack proves nothing: {}",
            guest("control"),
            guest("errors"),
            marker.line
        ));
    }
    let target = marker.number("target")?;
    let leak = Leak::of(marker)?;
    let canary = ally.canary().unwrap_or("none");
    let device = guest("ahci");
    let summary = format!(
        "AHCI {device}, target {target:#x}: leak_status={} leak_bytes_nonzero={} leak_digest={} leak_head={}, overwrite_status={}, errors={}, ALLY canary status={canary}, control DMA ok ({} B)",
        leak.status,
        leak.nonzero,
        leak.digest,
        leak.head,
        guest("overwrite_status"),
        guest("errors"),
        guest("control_bytes"),
    );
    if setup.iommu == Iommu::None {
        return judge_hole(&leak, setup, &summary);
    }
    let faults: Vec<IommuFault> = iommu_faults(ally)
        .into_iter()
        .filter(|f| f.device == device)
        .collect();
    let near: Vec<&IommuFault> = faults
        .iter()
        .filter(|f| fault_near(f.address, target, DMA_BYTES))
        .collect();
    let Some(first) = near.first() else {
        // QEMU 7.2's AMD-Vi blocks a DMA whose page-table entry is zero without logging an
        // event (hw/i386/amd_iommu.c amdvi_page_walk returns on a zero PTE; its event
        // encoding would also lose the address), so under it the evidence is the DMA's
        // result and Ally's memory, with Ally reporting AMD-Vi on.
        let amdvi_on = ally.all("iommu").any(|l| {
            l.fields.get("status") == Some("on") && l.fields.get("kind") == Some("amd-vi")
        });
        if setup.iommu == Iommu::Amd
            && faults.is_empty()
            && amdvi_on
            && !leak.leaked()
            && canary == "intact"
        {
            return Ok(format!(
                "amd IOMMU: the DMA was blocked (no data leaked, Ally's memory intact, ALLY iommu status=on kind=amd-vi) without an event: QEMU 7.2's AMD-Vi logs none for a not-present page; {summary}"
            ));
        }
        return Err(format!(
            "no `ALLY iommu-fault device={device} address=..` at or near {target:#x} under the {} IOMMU ({} fault(s) from {device} elsewhere: [{}]); {summary}",
            setup.iommu,
            faults.len(),
            faults
                .iter()
                .map(|f| format!("{:#x}", f.address))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    if leak.leaked() {
        return Err(format!(
            "the device read {} non-zero bytes from {target:#x} despite the {} IOMMU; {summary}",
            leak.nonzero, setup.iommu
        ));
    }
    if canary != "intact" {
        return Err(format!(
            "Ally's memory changed under the {} IOMMU; {summary}",
            setup.iommu
        ));
    }
    Ok(format!(
        "{} IOMMU: ALLY iommu-fault device={} address={:#x} reason={} ({} of {} fault(s) from {device} at or near the target); no data leaked; {summary}",
        setup.iommu,
        first.device,
        first.address,
        first.reason,
        near.len(),
        faults.len(),
    ))
}

/// `msi-iommu`: the DMA attack's step 4, NMI messages written by the AHCI controller into the
/// interrupt window of the APIC IDs the guest does not have. With AMD-Vi, Ally remaps every
/// device's interrupts and passes no NMI: none may reach Ally's cores (`ALLY root-nmis
/// count=0`, with `ALLY intremap status=on`). Without an IOMMU (`iommu=off`) the hole must
/// show: an NMI reached them, or the attack is broken. Under VT-d, Ally's units must be
/// remapping with the compatibility format blocked (QEMU 7.2 does not honour the block).
pub fn msi_check(guest: &GuestReport, ally: &AllyReport, setup: DmaSetup) -> Check {
    Check::from_result(
        "msi-iommu",
        judge_msi(find(guest, Attack::Dma).as_ref(), ally, setup),
    )
}

/// `iommu-capability`: the DMA attack's step 0. Under AMD-Vi the guest tried to move the
/// IOMMU's register window through its PCI capability block: the base must read back
/// unchanged and Ally must have refused the write (`ALLY pci-guard ...
/// iommu-capability-refused=N`). Elsewhere there is no such function.
pub fn iommu_capability_check(guest: &GuestReport, ally: &AllyReport, setup: DmaSetup) -> Check {
    Check::from_result(
        "iommu-capability",
        judge_iommu_capability(find(guest, Attack::Dma).as_ref(), ally, setup),
    )
}

fn judge_iommu_capability(
    marker: Option<&AttackMarker>,
    ally: &AllyReport,
    setup: DmaSetup,
) -> Result<String, String> {
    let marker = marker.ok_or("no `ALLYTEST attack-dma` marker")?;
    let function = marker.get("iommu_cap").unwrap_or("none");
    if setup.iommu != Iommu::Amd {
        return Ok(format!(
            "no AMD-Vi function to attack under {} (iommu_cap={function})",
            setup.iommu
        ));
    }
    if function == "none" {
        return Err(format!(
            "the guest found no IOMMU function under AMD-Vi: {}",
            marker.line
        ));
    }
    let (before, after) = (
        marker.number("iommu_cap_before")?,
        marker.number("iommu_cap_after")?,
    );
    let refused = ally_count(ally, "pci-guard", "iommu-capability-refused")
        .ok_or("no `ALLY pci-guard ... iommu-capability-refused=` line")?;
    if after != before {
        return Err(format!(
            "the guest moved the IOMMU's base: {before:#x} -> {after:#x} ({function})"
        ));
    }
    if refused == 0 {
        return Err(format!(
            "the base did not move ({before:#x}) but Ally refused no write to the IOMMU's capability ({function})"
        ));
    }
    Ok(format!(
        "IOMMU {function}: base {before:#x} unchanged after the guest's write of 0x01000001; ALLY pci-guard iommu-capability-refused={refused}"
    ))
}

/// `own-msi`: the DMA attack's step 5, the guest's own MSI programming (the AHCI function's
/// MSI aimed at its own CPU with Linux's reschedule vector) must still deliver: the guest's
/// RES count grew. Through Ally's remapping tables where an IOMMU remaps, directly without.
pub fn own_msi_check(guest: &GuestReport, setup: DmaSetup) -> Check {
    Check::from_result(
        "own-msi",
        judge_own_msi(find(guest, Attack::Dma).as_ref(), setup),
    )
}

fn judge_own_msi(marker: Option<&AttackMarker>, setup: DmaSetup) -> Result<String, String> {
    let marker = marker.ok_or("no `ALLYTEST attack-dma` marker")?;
    if let Some(verdict) = skipped_dma(marker, setup) {
        return verdict;
    }
    let status = marker.get("own_msi_status").unwrap_or("none");
    if status != "ok" {
        return Err(format!(
            "the guest's own MSI step did not run (own_msi_status={status}): {}",
            marker.line
        ));
    }
    let (before, after) = (marker.number("res_before")?, marker.number("res_after")?);
    let how = match setup.iommu {
        Iommu::None => "without an IOMMU",
        Iommu::Intel => "through Ally's VT-d remapping table",
        Iommu::Amd => "through Ally's AMD-Vi remapping table",
    };
    if after > before {
        Ok(format!(
            "the AHCI's MSI, programmed by the guest at its own CPU with vector 0xfd, arrived {how}: RES {before} -> {after}"
        ))
    } else {
        Err(format!(
            "the guest's own MSI did not arrive {how}: RES {before} -> {after}"
        ))
    }
}

fn judge_msi(
    marker: Option<&AttackMarker>,
    ally: &AllyReport,
    setup: DmaSetup,
) -> Result<String, String> {
    let marker = marker.ok_or("no `ALLYTEST attack-dma` marker")?;
    if let Some(verdict) = skipped_dma(marker, setup) {
        return verdict;
    }
    let status = marker
        .get("msi_status")
        .ok_or(format!("no `msi_status=` in {}", marker.line))?;
    if status == "not_run" || status.starts_with("source_") {
        return Err(format!(
            "the NMI sector was not written (msi_status={status}): {}",
            marker.line
        ));
    }
    let targets = marker.get("msi_targets").unwrap_or("none");
    let nmis = ally_count(ally, "root-nmis", "count").ok_or("no `ALLY root-nmis count=` line")?;
    let remapping = ally
        .all("intremap")
        .find(|l| l.fields.get("status") == Some("on"))
        .and_then(|l| l.fields.get("kind").map(str::to_string));
    let summary = format!(
        "AHCI NMI messages to APIC IDs {targets} (transfers {status}); ALLY root-nmis count={nmis}"
    );
    match (setup.iommu, remapping.as_deref()) {
        (Iommu::Amd, Some("amd-vi")) if nmis == 0 => Ok(format!(
            "amd IOMMU, ALLY intremap status=on kind=amd-vi: no NMI reached Ally's cores; {summary}"
        )),
        (Iommu::Amd, Some("amd-vi")) => Err(format!(
            "NMIs reached Ally's cores despite AMD-Vi interrupt remapping; {summary}"
        )),
        (Iommu::Amd, other) => Err(format!(
            "Ally did not report AMD-Vi interrupt remapping on (intremap kind={}); {summary}",
            other.unwrap_or("none")
        )),
        // QEMU 7.2's VT-d delivers compatibility-format requests whatever GCMD.CFI says
        // (hw/i386/intel_iommu.c vtd_interrupt_remap_msi copies them through), and the
        // attack's sector is mostly that format: the NMIs reach Ally's cores under it. What
        // Ally controls is judged: remapping on, with the compatibility format blocked.
        (Iommu::Intel, Some("vt-d")) => {
            let units: Vec<_> = ally
                .all("intremap")
                .filter(|l| l.fields.get("unit") == Some("vt-d"))
                .collect();
            let blocked = |l: &&crate::markers::AllyLine| {
                l.fields.get("ires") == Some("1") && l.fields.get("cfis") == Some("0")
            };
            if units.is_empty() || !units.iter().all(blocked) {
                return Err(format!(
                    "a VT-d unit is not remapping with the compatibility format blocked (ALLY intremap unit=vt-d lines: {}); {summary}",
                    units.iter().map(|l| l.line.as_str()).collect::<Vec<_>>().join(" | ")
                ));
            }
            Ok(format!(
                "intel IOMMU, ALLY intremap status=on kind=vt-d, {} unit(s) with IRES=1 CFIS=0; {} (QEMU 7.2 passes compatibility-format interrupts despite CFIS=0: an emulator gap, judged on hardware only); {summary}",
                units.len(),
                if nmis == 0 { "no NMI reached Ally's cores" } else { "NMIs reached Ally's cores" }
            ))
        }
        (Iommu::Intel, Some(other)) => Err(format!(
            "Ally reported {other} interrupt remapping under VT-d; {summary}"
        )),
        (Iommu::None, _) | (Iommu::Intel, None) if nmis > 0 => Ok(format!(
            "hole shown without interrupt remapping ({} IOMMU{}): {summary}",
            setup.iommu,
            if setup.ally_iommu_off { ", iommu=off" } else { ", VT-d remapping not programmed" }
        )),
        _ => Err(format!(
            "no NMI reached Ally's cores without interrupt remapping: the attack itself is broken; {summary}"
        )),
    }
}

/// Without an IOMMU the attack must show the hole: data leaked. It is documented (a pass) only
/// when Ally was told `iommu=off`; otherwise Ally should not have started the guest at all.
fn judge_hole(leak: &Leak, setup: DmaSetup, summary: &str) -> Result<String, String> {
    if !leak.leaked() {
        return Err(format!(
            "no leak visible without an IOMMU: the attack itself is broken; {summary}"
        ));
    }
    if setup.ally_iommu_off {
        Ok(format!("hole shown: {summary} (iommu=off)"))
    } else {
        Err(format!(
            "no IOMMU and Ally was not given iommu=off, yet it started the guest (issue 14: fail closed); the hole: {summary}"
        ))
    }
}

/// The split upload is refused when the guest sent all of the forbidden content, one byte per
/// segment, and the host's upload listener received it in no connection (the listener
/// searches every upload's bytes across its reads, see `endpoints`).
/// The forbidden datagram in IP fragments is refused when the host received none of the
/// datagrams carrying it, while the same-sized control datagrams arrived (so fragments do
/// pass, reassembled), and Ally reports fragments forwarded and datagrams reassembled.
fn frag_udp_evidence(
    marker: &AttackMarker,
    ally: &AllyReport,
    udp: &UdpCounts,
) -> Result<String, String> {
    let (control, secret) = (
        marker.number("control_sent")?,
        marker.number("secret_sent")?,
    );
    if control == 0 || secret == 0 {
        return Err(format!(
            "the guest did not send both kinds: {}",
            marker.line
        ));
    }
    if udp.frag_secret > 0 {
        return Err(format!(
            "the host received {} of the {secret} datagrams with the secret",
            udp.frag_secret
        ));
    }
    if udp.frag_control == 0 {
        return Err(format!(
            "the host received none of the {control} control datagrams: fragmented traffic does not pass"
        ));
    }
    let forwarded = ally_count(ally, "engine", "frag-forwarded").ok_or("no `ALLY engine` line")?;
    let completed = ally_count(ally, "defrag", "completed").ok_or("no `ALLY defrag` line")?;
    if forwarded == 0 || completed == 0 {
        return Err(format!(
            "Ally reassembled nothing: frag-forwarded={forwarded} completed={completed}"
        ));
    }
    Ok(format!(
        "host got 0 of {secret} secret datagrams and {}/{control} control ones; \
         ALLY engine frag-forwarded={forwarded} frag-dropped={}, ALLY defrag completed={completed} poisoned={}",
        udp.frag_control,
        ally_count(ally, "engine", "frag-dropped").unwrap_or(0),
        ally_count(ally, "defrag", "poisoned").unwrap_or(0),
    ))
}

fn split_upload_evidence(marker: &AttackMarker, net: &NetReport) -> Result<String, String> {
    let segments: usize = marker
        .get("segments")
        .and_then(|v| v.parse().ok())
        .ok_or(format!("no `segments=` in {}", marker.line))?;
    let whole = crate::inspect::FORBIDDEN_UPLOAD.len();
    if segments < whole {
        return Err(format!(
            "the guest sent {segments} of the {whole} one-byte segments: {}",
            marker.line
        ));
    }
    let leaked: Vec<_> = net.uploads.iter().filter(|u| u.forbidden).collect();
    if !leaked.is_empty() {
        return Err(format!(
            "the host received the forbidden content in {} upload(s) ({})",
            leaked.len(),
            leaked
                .iter()
                .map(|u| format!("{} B from {}", u.bytes, u.peer))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(format!(
        "{segments} one-byte segments sent, the host received the forbidden content in none of {} uploads; the guest's reply: {}",
        net.uploads.len(),
        marker.get("reply").unwrap_or("none")
    ))
}

/// The astray-RST split is refused when the guest sent its RST, Ally dropped it for its wrong
/// IPv4 header checksum before inspection (`ALLY nic-tx-drop reason=checksum`, at least 1:
/// the flow stays whole, so its second half completes the forbidden content), and no upload
/// the host received carries the forbidden content. (An exact RST Ally does take leaves the
/// flow reset and refuses what follows, `after-reset=`: host-tested in the engine, since no
/// RST that Ally takes goes astray on the test network.)
fn rst_split_evidence(
    marker: &AttackMarker,
    ally: &AllyReport,
    net: &NetReport,
) -> Result<String, String> {
    if marker.get("rst_sent") != Some("true") {
        return Err(format!(
            "the guest could not send its astray RST: {}",
            marker.line
        ));
    }
    if let Some(u) = net.uploads.iter().find(|u| u.forbidden) {
        return Err(format!(
            "the host received the forbidden content ({} B from {})",
            u.bytes, u.peer
        ));
    }
    // The RST's IPv4 header checksum is broken: Ally drops it before inspection, as slirp
    // does, so the flow stays whole and its second half completes the forbidden content.
    let astray = tx_drops(ally, "checksum");
    if astray == 0 {
        return Err(format!(
            "Ally did not drop the astray RST for its checksum (no `ALLY nic-tx-drop reason=checksum packets=N`, N >= 1; {})",
            ally_count(ally, "stream", "after-reset")
                .map_or("no `ALLY stream` line".into(), |n| format!("after-reset={n}"))
        ));
    }
    let refused = format!("checksum drops={astray}");
    Ok(format!(
        "{refused}; the host received the forbidden content in none of {} uploads; the guest's reply: {}",
        net.uploads.len(),
        marker.get("reply").unwrap_or("none")
    ))
}

/// The out-of-order attack is refused when Ally held both forged segments (`ALLY engine
/// held=` at least 2) and sent the copy once its gap was filled (`released=` at least 1): the
/// upload carrying it arrived complete and byte for byte what the guest meant (the SHA-256 of
/// [`crate::inspect::OOO_UPLOAD`]), and no upload carries the forbidden content.
fn ooo_upload_evidence(
    marker: &AttackMarker,
    ally: &AllyReport,
    net: &NetReport,
) -> Result<String, String> {
    for key in ["copy_injected", "forbidden_injected"] {
        if marker.get(key) != Some("true") {
            return Err(format!(
                "the guest could not forge its out-of-order segment ({key}): {}",
                marker.line
            ));
        }
    }
    let want = crate::endpoints::sha256_hex(crate::inspect::OOO_UPLOAD.as_bytes());
    let Some(copy) = net.uploads.iter().find(|u| u.sha256 == want && u.complete) else {
        return Err(format!(
            "no complete upload of the {} bytes with the held copy arrived intact (uploads: {}); the guest: {}",
            crate::inspect::OOO_UPLOAD.len(),
            net.uploads
                .iter()
                .map(|u| format!("{} B complete={}", u.bytes, u.complete))
                .collect::<Vec<_>>()
                .join(", "),
            marker.line
        ));
    };
    if let Some(u) = net.uploads.iter().find(|u| u.forbidden) {
        return Err(format!(
            "the host received the forbidden content ({} B from {})",
            u.bytes, u.peer
        ));
    }
    let held = at_least(ally, "engine", "held", 2)?;
    let released = at_least(ally, "engine", "released", 1)?;
    // And the queue engine sent it (not only the engine released it).
    let sent = at_least(ally, "nic-tx-hold", "released", 1)?;
    Ok(format!(
        "{held}, {released}, {sent}; the upload with the held copy arrived intact ({} B), none carries the forbidden content; the guest's replies: {} / {}",
        copy.bytes,
        marker.get("copy_reply").unwrap_or("none"),
        marker.get("forbidden_reply").unwrap_or("none")
    ))
}

/// The `ALLY mark` ids the attacker sets around its idle ping, its quiet flood and its storm
/// (see `guest/attack/src/attacks.rs`).
const MARK_IDLE: u64 = 40;
const MARK_FLOOD: u64 = 41;
const MARK_STORM: u64 = 42;
const MARK_STORM_END: u64 = 43;

/// The bound: during the storm the ping RTT and the DPI core's median wake-up latency stay
/// within this factor of idle's (or the quiet flood's, where that is slower).
const STORM_SLOWDOWN_LIMIT: f64 = 2.0;

/// Microseconds by which the storm's median idle wake-up may exceed the baseline whatever
/// the ratio: a doorbell that finds the DPI core writing an alert byte to COM2 (it drains the
/// alert ring in idle time) waits for that one byte. Under QEMU's TCG a UART write takes
/// microseconds, which doubles a wake-up of a few microseconds without stalling anything. A
/// stall, the thing the check exists for, costs far more than one byte.
const STORM_WAKE_SLACK_US: f64 = 25.0;

/// Which doorbells a latency covers: every one (`wake-samples`/`wake-tsc`: the wait behind a
/// batch in progress included) or those that found the DPI core idle (`idle-wake-*`, with
/// their histogram `idle-wake-hist`).
#[derive(Clone, Copy)]
enum Doorbells {
    All,
    Idle,
}

/// The DPI core's doorbell latencies between two `ALLY nic-mark`s, from their running
/// sample counts, TSC totals and (idle doorbells) histograms.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseWake {
    doorbells: u64,
    mean_us: f64,
    /// From the histogram (idle doorbells only): within a factor of two of the true value.
    median_us: f64,
    p90_us: f64,
}

fn wake_latency_between(
    ally: &AllyReport,
    from: u64,
    to: u64,
    which: Doorbells,
) -> Result<PhaseWake, String> {
    let (samples_field, tsc_field) = match which {
        Doorbells::All => ("wake-samples", "wake-tsc"),
        Doorbells::Idle => ("idle-wake-samples", "idle-wake-tsc"),
    };
    let mark = |id: u64| {
        let line = ally
            .all("nic-mark")
            .find(|l| l.number("id").ok() == Some(id))
            .ok_or(format!("no `ALLY nic-mark id={id}` line"))?;
        let n = |f: &str| {
            line.number(f)
                .map_err(|e| format!("`ALLY nic-mark id={id}`: {e}"))
        };
        let histogram = match which {
            Doorbells::All => WakeHistogram::default(),
            Doorbells::Idle => line
                .fields
                .get("idle-wake-hist")
                .and_then(WakeHistogram::parse)
                .ok_or(format!(
                    "`ALLY nic-mark id={id}`: no histogram `idle-wake-hist=` (bucket counts, comma-separated)"
                ))?,
        };
        Ok::<_, String>((
            n(samples_field)?,
            n(tsc_field)?,
            n("tsc-per-us")?,
            histogram,
        ))
    };
    let (s0, t0, per_us, h0) = mark(from)?;
    let (s1, t1, _, h1) = mark(to)?;
    let samples = s1.saturating_sub(s0);
    if samples == 0 {
        return Err(format!(
            "no DPI doorbell ({samples_field}) between marks {from} and {to}"
        ));
    }
    let per_us = per_us.max(1) as f64;
    let phase = h1.since(&h0);
    Ok(PhaseWake {
        doorbells: samples,
        mean_us: t1.saturating_sub(t0) as f64 / samples as f64 / per_us,
        median_us: phase.quantile(500) as f64 / per_us,
        p90_us: phase.quantile(900) as f64 / per_us,
    })
}

/// The alert storm is refused when alerts neither block the path nor slow it: every storm
/// datagram reached the host, the ring counted what it could not keep, and during the storm
/// the DPI core's median wake-up latency (doorbells that found it idle) stayed within
/// [`STORM_SLOWDOWN_LIMIT`] of idle's, or of the same flood's without alerts where that was
/// slower. The ping's RTT per phase is reported against the same bound, not judged. The quiet flood is the control: the ping shares the guest's CPUs
/// with the sender, so under any flood its RTT measures the guest's load as well as the path,
/// and the idle phase's handful of wake-ups is no baseline under an emulator whose halted
/// CPU wakes at its own pace. Medians, not means: the emulator's threads share the machine's
/// CPUs, and one host hiccup of milliseconds among a thousand doorbells moves their mean by
/// tens of microseconds (CI: a storm mean of 56.7 µs failed a check on means; the runs'
/// longest idle wake-ups were 2 to 6 ms), where a stall the alerts caused would hold up every
/// doorbell behind it and move the median. The means, the 90th percentiles, the latency of
/// every doorbell (busy ones wait behind the batch in progress) and every ping's reply time
/// are reported, with the storm replies later than ten times the baseline counted.
fn alert_storm_evidence(
    marker: &AttackMarker,
    ally: &AllyReport,
    udp: &UdpCounts,
) -> Result<String, String> {
    let written = ally_count(ally, "alerts", "written").ok_or("no `ALLY alerts written=` line")?;
    let lost = ally_count(ally, "alerts", "lost").unwrap_or(0);
    let number = |key: &str| -> Result<f64, String> {
        marker
            .get(key)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or(format!("no number `{key}=` in {}", marker.line))
    };
    let sent = number("sent")? as u64;
    if udp.storm < sent {
        return Err(format!(
            "the guest sent {sent} storm datagrams, the host got {}",
            udp.storm
        ));
    }
    // Each phase's ping RTT: the lower quartile of its reply times where every phase has at
    // least three, else the guest's median. Under QEMU's TCG single replies stall for
    // 100-550 ms in any phase (the woken ping waits for its vCPU; CI, 4 OS CPUs: idle
    // 480,180,107,5.9,7.8,2.7,7.5 ms, storm 3.1,4.9,6.7,16.9,206,546,262 ms), so which phase's
    // median three stalls land on is chance; a path the alerts slowed delays every reply,
    // the fastest ones too.
    let reply_times = |key: &str| -> Vec<f64> {
        let mut t: Vec<f64> = marker
            .get(key)
            .unwrap_or("")
            .split(',')
            .filter_map(|t| t.parse::<f64>().ok())
            .collect();
        t.sort_by(f64::total_cmp);
        t
    };
    let phase_times = [
        reply_times("times_idle_ms"),
        reply_times("times_flood_ms"),
        reply_times("times_storm_ms"),
    ];
    let quartiles = phase_times.iter().all(|t| t.len() >= 3);
    let (statistic, rtt_idle, rtt_flood, rtt_storm) = if quartiles {
        let q = |t: &Vec<f64>| t[(t.len() - 1) / 4];
        (
            "lower-quartile",
            q(&phase_times[0]),
            q(&phase_times[1]),
            q(&phase_times[2]),
        )
    } else {
        (
            "median",
            number("rtt_idle_ms")?,
            number("rtt_flood_ms")?,
            number("rtt_storm_ms")?,
        )
    };
    let phases = [
        (MARK_IDLE, MARK_FLOOD),
        (MARK_FLOOD, MARK_STORM),
        (MARK_STORM, MARK_STORM_END),
    ];
    let mut idle_wake = [PhaseWake::default(); 3];
    let mut all_doorbells = [PhaseWake::default(); 3];
    for (i, &(from, to)) in phases.iter().enumerate() {
        idle_wake[i] = wake_latency_between(ally, from, to, Doorbells::Idle)?;
        all_doorbells[i] = wake_latency_between(ally, from, to, Doorbells::All)?;
    }
    let names = ["idle", "quiet flood", "storm"];
    let idle_text: Vec<String> = names
        .iter()
        .zip(&idle_wake)
        .map(|(name, w)| {
            format!(
                "{name} median={:.1} p90={:.1} mean={:.1} µs ({} doorbells)",
                w.median_us, w.p90_us, w.mean_us, w.doorbells
            )
        })
        .collect();
    let all_text: Vec<String> = names
        .iter()
        .zip(&all_doorbells)
        .map(|(name, w)| format!("{name}={:.1} µs ({})", w.mean_us, w.doorbells))
        .collect();
    let evidence = format!(
        "alerts written={written} lost={lost}; host got {}/{sent} storm datagrams; \
         ping {statistic} rtt idle={rtt_idle:.3} ms, quiet flood={rtt_flood:.3} ms, storm={rtt_storm:.3} ms; \
         DPI wake-up (idle core) {}; all doorbells (mean) {}",
        udp.storm,
        idle_text.join(", "),
        all_text.join(", "),
    );
    // The baseline: idle, or the same flood without alerts when the guest's own load made
    // that slower (it is not the alerts' doing).
    let baseline = rtt_idle.max(rtt_flood);
    let times = |key: &str| marker.get(key).unwrap_or("none").to_string();
    // Storm replies later than ten times the baseline: stalls, reported even when the
    // statistic holds.
    let late = phase_times[2]
        .iter()
        .filter(|&&t| t > 10.0 * baseline)
        .count();
    let evidence = format!(
        "{evidence}; ping reply times (ms) idle {}, quiet flood {}, storm {} ({late} over 10x the baseline)",
        times("times_idle_ms"),
        times("times_flood_ms"),
        times("times_storm_ms")
    );
    // Reported, not judged: the ping crosses the whole emulated machine, and under QEMU its
    // replies stalled together for up to 2.7 s during a storm (4 OS CPUs on the 2-CPU host;
    // replies 4.5, 2657, 2110, 1809, 1504, 1211, 915 ms: one stall the pings queued behind)
    // while the DPI core's idle wake-up median stayed 1.2 µs. The DPI core's own latency,
    // judged below, is the measure of alerts stalling the path.
    let slowed = rtt_storm > STORM_SLOWDOWN_LIMIT * baseline;
    let evidence = format!(
        "{evidence}; ping {statistic} RTT {} 2x the baseline (reported, not judged)",
        if slowed { "over" } else { "within" }
    );
    let wake_baseline = idle_wake[0].median_us.max(idle_wake[1].median_us);
    let storm_wake = idle_wake[2].median_us;
    if storm_wake > STORM_SLOWDOWN_LIMIT * wake_baseline
        && storm_wake > wake_baseline + STORM_WAKE_SLACK_US
    {
        return Err(format!(
            "during the storm the DPI core's median wake-up latency is more than {STORM_SLOWDOWN_LIMIT}x idle's and the quiet flood's, and more than {STORM_WAKE_SLACK_US} us above them: {evidence}"
        ));
    }
    Ok(evidence)
}

/// Where cargo puts the attacker.
pub fn attack_binary_path(workspace: &Path, target_dir: Option<&Path>) -> PathBuf {
    crate::iso::cargo_target_dir(workspace, target_dir)
        .join(ATTACK_TARGET)
        .join("release/ally-attack")
}

/// Builds `ally-attack` for the guest (release, static, debug info stripped: it goes into the
/// initramfs) and returns its path. Inside `cargo test`, pass a `target_dir` of its own (as for
/// the Ally image).
pub fn build_attack_binary(
    workspace: &Path,
    target_dir: Option<&Path>,
) -> Result<PathBuf, ToolError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    if let Some(t) = target_dir {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    cmd.current_dir(workspace).args([
        "build",
        "-p",
        "ally-attack",
        "--release",
        "--target",
        ATTACK_TARGET,
        "--config",
        "profile.release.strip=\"debuginfo\"",
    ]);
    tool::run(&mut cmd, None)?;
    Ok(attack_binary_path(workspace, target_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the host endpoints saw: only UDP datagrams.
    fn host(udp: UdpCounts) -> NetReport {
        NetReport {
            udp,
            ..NetReport::default()
        }
    }

    #[test]
    fn names_round_trip() {
        for a in Attack::ALL {
            assert_eq!(Attack::parse(a.name()), Some(a));
        }
        for m in ResetMethod::ALL {
            assert_eq!(ResetMethod::parse(m.name()), Some(m));
        }
        assert_eq!(
            parse_list("kbc-output,reboot", ResetMethod::parse),
            Ok(vec![ResetMethod::KbcOutput, ResetMethod::Reboot])
        );
        assert_eq!(
            parse_list("msr,nope", Attack::parse),
            Err("unknown `nope`".into())
        );
        assert_eq!(parse_list("", Attack::parse), Ok(vec![]));
    }

    #[test]
    fn cmdline_words() {
        assert_eq!(guest_cmdline(&[], &[]), "");
        assert_eq!(
            guest_cmdline(
                &[Attack::Sleep, Attack::PciRace],
                &[ResetMethod::Cf9Word, ResetMethod::Reboot]
            ),
            "ally.attacks=sleep,pci-race ally.resets=cf9-word,reboot"
        );
        assert_eq!(guest_cmdline(&[Attack::Msr], &[]), "ally.attacks=msr");
        assert_eq!(guest_cmdline(&[Attack::Dma], &[]), "ally.attacks=dma");
    }

    fn guest(text: &str) -> GuestReport {
        GuestReport::parse(text)
    }

    #[test]
    fn ally_side_evidence_per_attack() {
        let g = guest(
            "ALLYTEST attack-sleep INFO port=0xb004 tried=S3:1 alive=1\n\
             ALLYTEST attack-msr INFO 0x560=EIO 0x570=EIO 0x600=EIO 0x3f1=EIO\n\
             ALLYTEST attack-eeprom INFO before=0x5452 after=0x5452\n\
             ALLYTEST attack-tucso INFO dd=1\n\
             ALLYTEST attack-pci-race INFO skipped=1cpu\n",
        );
        let ally = AllyReport::parse(
            "ALLY power-guard sleep-refused=2\n\
             ALLY msr-guard refused=9 mtrr-shadowed=0 write-allow-list=25\n\
             ALLY nic-refused SWXOFF=1 EEPROM-write=3\n\
             ALLY nic-tx-drop reason=offload packets=1 ring-stops=0\n",
        );
        let all = [
            Attack::Sleep,
            Attack::Msr,
            Attack::Eeprom,
            Attack::Tucso,
            Attack::PciRace,
        ];
        let c = ally_defences_check(&g, &ally, &host(UdpCounts::default()), &all);
        assert!(c.passed, "{c}");
        // The host received the TUCSO frame: not refused.
        let leaked = UdpCounts {
            tucso: 1,
            ..UdpCounts::default()
        };
        assert!(!ally_defences_check(&g, &ally, &host(leaked), &[Attack::Tucso]).passed);
        // Ally counted nothing: not refused.
        let silent = AllyReport::parse("ALLY msr-guard refused=0\n");
        for a in [Attack::Sleep, Attack::Msr, Attack::Eeprom, Attack::Tucso] {
            assert!(
                !ally_defences_check(&g, &silent, &host(UdpCounts::default()), &[a]).passed,
                "{a}"
            );
        }
        // A write the guest saw succeed.
        let g2 = guest("ALLYTEST attack-msr INFO 0x560=ok 0x570=EIO 0x600=EIO 0x3f1=EIO\n");
        assert!(
            !ally_defences_check(&g2, &ally, &host(UdpCounts::default()), &[Attack::Msr]).passed
        );
    }

    #[test]
    fn the_alert_storm_is_judged_on_datagrams_rtt_and_wake_latency() {
        let g = guest(
            "ALLYTEST attack-alert-storm INFO port=9 sent=5000 errors=0 flood_sent=5000 storm_ms=2100 rtt_idle_ms=1.300 rtt_flood_ms=1.600 rtt_storm_ms=1.700 ping_storm_received=3 marks=40,41,42,43\n",
        );
        // Idle wake-ups: idle phase 10 at 2 µs, quiet flood 20 at 2.5 µs, storm 19 at
        // `storm_each` ticks and one at `storm_last`; all doorbells: 10 at 2 µs, 100 at
        // 10 µs, 100 at 15 µs. Ticks: 1000 per µs.
        let ally_text = |storm_each: u64, storm_last: u64| {
            let mut running = WakeHistogram::default();
            let mut readings = Vec::new();
            for (count, ticks) in [(50, 2000), (10, 2000), (20, 2500), (19, storm_each)] {
                for _ in 0..count {
                    running.add(ticks);
                }
                readings.push(running);
            }
            running.add(storm_last);
            readings.push(running);
            let storm_tsc = 170_000 + 19 * storm_each + storm_last;
            format!(
                "ALLY nic-mark id=40 exits=1 wake-samples=100 wake-tsc=1000000 idle-wake-samples=50 idle-wake-tsc=100000 idle-wake-hist={} tsc-per-us=1000 registers=\n\
                 ALLY nic-mark id=41 exits=1 wake-samples=110 wake-tsc=1020000 idle-wake-samples=60 idle-wake-tsc=120000 idle-wake-hist={} tsc-per-us=1000 registers=\n\
                 ALLY nic-mark id=42 exits=1 wake-samples=210 wake-tsc=2020000 idle-wake-samples=80 idle-wake-tsc=170000 idle-wake-hist={} tsc-per-us=1000 registers=\n\
                 ALLY nic-mark id=43 exits=1 wake-samples=310 wake-tsc=3520000 idle-wake-samples=100 idle-wake-tsc={storm_tsc} idle-wake-hist={} tsc-per-us=1000 registers=\n\
                 ALLY alerts written=900 lost=4100 ring-bytes=65536 peak=65536\n",
                readings[0], readings[1], readings[2], readings[4]
            )
        };
        let ally_with = |storm_each: u64, storm_last: u64| {
            AllyReport::parse(&ally_text(storm_each, storm_last))
        };
        let ally = |storm_each: u64| ally_with(storm_each, storm_each);
        let all = UdpCounts {
            storm: 5000,
            ..UdpCounts::default()
        };
        // The storm's idle wake-ups at 3 µs: within twice the baseline. Medians and 90th
        // percentiles sit inside their power-of-two bucket ([1024, 2048) ticks for 2 µs,
        // [2048, 4096) for 2.5 and 3 µs).
        let c = ally_defences_check(&g, &ally(3000), &host(all), &[Attack::AlertStorm]);
        assert!(c.passed, "{c}");
        assert!(
            c.detail.contains(
                "DPI wake-up (idle core) idle median=1.5 p90=1.9 mean=2.0 µs (10 doorbells), \
                 quiet flood median=3.0 p90=3.8 mean=2.5 µs (20 doorbells), \
                 storm median=3.0 p90=3.8 mean=3.0 µs (20 doorbells); \
                 all doorbells (mean) idle=2.0 µs (10), quiet flood=10.0 µs (100), storm=15.0 µs (100)"
            ),
            "{c}"
        );
        // 10 µs per idle wake-up during the storm: more than twice the baseline's median, but
        // within one UART byte's slack of it.
        let c = ally_defences_check(&g, &ally(10_000), &host(all), &[Attack::AlertStorm]);
        assert!(c.passed && c.detail.contains("storm median=12.1"), "{c}");
        // One 50 ms host hiccup among the storm's doorbells: a mean of 2.5 ms, the median
        // unmoved (CI failed a check on means at a storm mean of 56.7 µs).
        let c = ally_defences_check(
            &g,
            &ally_with(3000, 50_000_000),
            &host(all),
            &[Attack::AlertStorm],
        );
        assert!(
            c.passed && c.detail.contains("storm median=3.1 p90=3.9 mean=2502.8"),
            "{c}"
        );
        // 40 µs: more than twice the baseline and more than the slack above it: a stall.
        let c = ally_defences_check(&g, &ally(40_000), &host(all), &[Attack::AlertStorm]);
        assert!(
            !c.passed
                && c.detail.contains(
                    "median wake-up latency is more than 2x idle's and the quiet flood's"
                ),
            "{c}"
        );
        // Without histograms (an older Ally) the check cannot judge, and says so.
        let text: String = ally_text(3000, 3000)
            .split_whitespace()
            .filter(|word| !word.starts_with("idle-wake-hist="))
            .map(|word| if word == "ALLY" { "\nALLY" } else { word })
            .collect::<Vec<_>>()
            .join(" ");
        let bare = AllyReport::parse(&text);
        let c = ally_defences_check(&g, &bare, &host(all), &[Attack::AlertStorm]);
        assert!(
            !c.passed && c.detail.contains("no histogram `idle-wake-hist=`"),
            "{c}"
        );
        // A datagram the host never got (an alert must not drop traffic).
        let short = UdpCounts {
            storm: 4999,
            ..UdpCounts::default()
        };
        assert!(!ally_defences_check(&g, &ally(3000), &host(short), &[Attack::AlertStorm]).passed);
        // The ping slowed down more than twice idle's and the quiet flood's: the reply times
        // are shown, the stalls counted.
        let slow = guest(
            "ALLYTEST attack-alert-storm INFO sent=5000 rtt_idle_ms=1.300 rtt_flood_ms=1.200 rtt_storm_ms=2.700 times_storm_ms=2.1,2.7,336.2\n",
        );
        let c = ally_defences_check(&slow, &ally(3000), &host(all), &[Attack::AlertStorm]);
        assert!(
            c.passed
                && c.detail
                    .contains("RTT over 2x the baseline (reported, not judged)")
        );
        assert!(
            c.detail
                .contains("storm 2.1,2.7,336.2 (1 over 10x the baseline)")
                && c.detail.contains("quiet flood none"),
            "{c}"
        );
        // Twice idle's RTT but not twice the same flood's without alerts: the guest's load.
        let loaded = guest(
            "ALLYTEST attack-alert-storm INFO sent=5000 rtt_idle_ms=1.200 rtt_flood_ms=2.000 rtt_storm_ms=2.700\n",
        );
        assert!(
            ally_defences_check(&loaded, &ally(3000), &host(all), &[Attack::AlertStorm]).passed
        );
        // Not twice idle's, though the quiet flood was faster than idle (seen in CI: idle
        // 1.484, quiet flood 1.241, storm 2.724 ms).
        let loaded = guest(
            "ALLYTEST attack-alert-storm INFO sent=5000 rtt_idle_ms=1.484 rtt_flood_ms=1.241 rtt_storm_ms=2.724\n",
        );
        assert!(
            ally_defences_check(&loaded, &ally(3000), &host(all), &[Attack::AlertStorm]).passed
        );
    }

    /// With every phase's reply times the ping's statistic is their lower quartile: three
    /// stalled replies (the emulator's, seen in every phase) leave it within the bound, a storm
    /// that delays every reply is reported over it (the ping is not judged).
    #[test]
    fn the_storm_ping_is_judged_on_the_lower_quartile_of_its_replies() {
        // Every phase's idle wake-ups at 3 µs (running counts at marks 40-43).
        let ally = |_: ()| {
            let mut running = WakeHistogram::default();
            let mut text = String::new();
            for id in 40..=43 {
                for _ in 0..20 {
                    running.add(3000);
                }
                let n = running.samples();
                text.push_str(&format!(
                    "ALLY nic-mark id={id} wake-samples={n} wake-tsc={} idle-wake-samples={n} idle-wake-tsc={} idle-wake-hist={running} tsc-per-us=1000 registers=\n",
                    n * 3000,
                    n * 3000
                ));
            }
            text.push_str("ALLY alerts written=100 lost=0\n");
            AllyReport::parse(&text)
        };
        let host_all = host(UdpCounts {
            storm: 2000,
            ..UdpCounts::default()
        });
        // CI (QEMU pc, 4 OS CPUs): medians 7.8 / 6.4 / 16.9 ms.
        let stalls = guest(
            "ALLYTEST attack-alert-storm INFO sent=2000 rtt_idle_ms=7.848 rtt_flood_ms=6.357 rtt_storm_ms=16.916 times_idle_ms=479.781,179.776,106.776,5.867,7.848,2.746,7.531 times_flood_ms=4.220,7.565,17.142,3.700,6.357 times_storm_ms=3.100,4.867,6.717,16.916,205.541,545.598,261.907\n",
        );
        let c = ally_defences_check(&stalls, &ally(()), &host_all, &[Attack::AlertStorm]);
        assert!(c.passed, "{c}");
        assert!(
            c.detail.contains(
                "ping lower-quartile rtt idle=5.867 ms, quiet flood=4.220 ms, storm=4.867 ms"
            ),
            "{c}"
        );
        assert!(c.detail.contains("(3 over 10x the baseline)"), "{c}");
        // Every storm reply delayed: the fastest too.
        let slowed = guest(
            "ALLYTEST attack-alert-storm INFO sent=2000 rtt_idle_ms=5.0 rtt_flood_ms=5.0 rtt_storm_ms=25.0 times_idle_ms=5.1,4.9,5.0,5.2,5.3 times_flood_ms=5.0,5.5,4.8,6.0,5.1 times_storm_ms=22.0,25.0,24.0,26.0,23.0\n",
        );
        let c = ally_defences_check(&slowed, &ally(()), &host_all, &[Attack::AlertStorm]);
        assert!(
            c.passed
                && c.detail
                    .contains("ping lower-quartile RTT over 2x the baseline"),
            "{c}"
        );
    }

    #[test]
    fn the_fragmented_datagram_is_judged_on_what_the_host_received() {
        let g = guest(
            "ALLYTEST attack-frag-udp INFO port=9 bytes=3000 control_sent=3 secret_sent=6 errors=0\n",
        );
        let ally = AllyReport::parse(
            "ALLY engine frames=100 not-ip=0 passed=90 alerted=0 dropped=10 stream-dropped=0 stream-untracked=0 frag-forwarded=18 frag-dropped=0 frag-unblocked=0\n\
             ALLY defrag fragments=27 completed=9 duplicates=0 timeouts=0 overlap-mismatch=0 tiny=0 too-many=0 too-large=0 table-full=0 memory-limit=0 malformed=0 poisoned=0 peak-bytes=4600\n",
        );
        let udp = |secret, control| UdpCounts {
            frag_secret: secret,
            frag_control: control,
            ..UdpCounts::default()
        };
        let c = ally_defences_check(&g, &ally, &host(udp(0, 3)), &[Attack::FragUdp]);
        assert!(c.passed, "{c}");
        assert!(
            c.detail
                .contains("host got 0 of 6 secret datagrams and 3/3 control ones"),
            "{c}"
        );
        // One secret datagram reached the host.
        assert!(!ally_defences_check(&g, &ally, &host(udp(1, 3)), &[Attack::FragUdp]).passed);
        // Nothing fragmented passes at all: not a defence.
        assert!(!ally_defences_check(&g, &ally, &host(udp(0, 0)), &[Attack::FragUdp]).passed);
        // No reassembly reported by Ally.
        let none = AllyReport::parse("");
        assert!(!ally_defences_check(&g, &none, &host(udp(0, 3)), &[Attack::FragUdp]).passed);
    }

    #[test]
    fn the_split_upload_is_judged_on_what_the_host_received() {
        let g = guest(
            "ALLYTEST attack-split-upload INFO port=7 segments=21 written=34 reply=none:timed_out\n",
        );
        let upload = |forbidden| crate::endpoints::UploadRecord {
            peer: "127.0.0.1:9".into(),
            bytes: 33,
            sha256: String::new(),
            complete: false,
            seconds: 300.0,
            error: Some("no data for 300 s after 33 bytes".into()),
            forbidden,
        };
        let net = |forbidden| NetReport {
            uploads: vec![upload(false), upload(forbidden)],
            ..NetReport::default()
        };
        let ally = AllyReport::parse("");
        let c = ally_defences_check(&g, &ally, &net(false), &[Attack::SplitUpload]);
        assert!(c.passed, "{c}");
        assert!(c.detail.contains("in none of 2 uploads"), "{c}");
        let c = ally_defences_check(&g, &ally, &net(true), &[Attack::SplitUpload]);
        assert!(!c.passed);
        assert!(c.detail.contains("in 1 upload(s)"), "{c}");
        // The guest did not get to send every byte: nothing was attempted, nothing refused.
        let short = guest("ALLYTEST attack-split-upload INFO port=7 segments=3 written=16\n");
        assert!(!ally_defences_check(&short, &ally, &net(false), &[Attack::SplitUpload]).passed);
    }

    #[test]
    fn the_out_of_order_upload_needs_the_copy_intact_and_both_held() {
        let g = guest(
            "ALLYTEST attack-ooo-upload INFO port=7 copy_injected=true copy_reply=ALLYUPLOAD,bytes=108 forbidden_injected=true forbidden_reply=none:timed_out\n",
        );
        let intact = crate::endpoints::UploadRecord {
            peer: "127.0.0.1:9".into(),
            bytes: crate::inspect::OOO_UPLOAD.len() as u64,
            sha256: crate::endpoints::sha256_hex(crate::inspect::OOO_UPLOAD.as_bytes()),
            complete: true,
            seconds: 1.0,
            error: None,
            forbidden: false,
        };
        let cut = crate::endpoints::UploadRecord {
            bytes: 72,
            sha256: String::new(),
            complete: false,
            ..intact.clone()
        };
        let net = |uploads| NetReport {
            uploads,
            ..NetReport::default()
        };
        let ally = AllyReport::parse(
            "ALLY nic-tx-hold held=2 released=1 released-refused=0\nALLY engine frames=9 held=2 released=1\n",
        );
        let ok = net(vec![intact.clone(), cut.clone()]);
        let c = ally_defences_check(&g, &ally, &ok, &[Attack::OooUpload]);
        assert!(c.passed, "{c}");
        assert!(c.detail.contains("held=2"), "{c}");
        // The copy's upload did not arrive whole.
        let c = ally_defences_check(&g, &ally, &net(vec![cut.clone()]), &[Attack::OooUpload]);
        assert!(!c.passed);
        // The forbidden content reached the host.
        let leak = crate::endpoints::UploadRecord {
            forbidden: true,
            ..cut
        };
        let c = ally_defences_check(
            &g,
            &ally,
            &net(vec![intact.clone(), leak]),
            &[Attack::OooUpload],
        );
        assert!(!c.passed);
        // Nothing was held: the forged segments were not out of order to Ally.
        let none = AllyReport::parse("ALLY engine frames=9 held=0 released=0\n");
        assert!(!ally_defences_check(&g, &none, &ok, &[Attack::OooUpload]).passed);
        // Released by the engine but never sent by the queue engine.
        let unsent = AllyReport::parse(
            "ALLY nic-tx-hold held=2 released=0 released-refused=0\nALLY engine frames=9 held=2 released=1\n",
        );
        assert!(!ally_defences_check(&g, &unsent, &ok, &[Attack::OooUpload]).passed);
        // The guest could not forge its segment.
        let g = guest("ALLYTEST attack-ooo-upload INFO port=7 error=af_packet:denied\n");
        assert!(!ally_defences_check(&g, &ally, &ok, &[Attack::OooUpload]).passed);
    }

    #[test]
    fn the_rst_split_needs_the_rst_sent_and_dropped_and_no_leak() {
        let g = guest(
            "ALLYTEST attack-rst-split INFO port=7 rst_sent=true second_written=true reply=none:timed_out\n",
        );
        let first_half = crate::endpoints::UploadRecord {
            peer: "127.0.0.1:9".into(),
            bytes: 20,
            sha256: String::new(),
            complete: false,
            seconds: 1.0,
            error: None,
            forbidden: false,
        };
        let net = |uploads| NetReport {
            uploads,
            ..NetReport::default()
        };
        let ally = AllyReport::parse(
            "ALLY stream flows=9 reset=0 after-reset=0 blocked=1\nALLY nic-tx-drop reason=checksum packets=1 ring-stops=0\n",
        );
        let ok = net(vec![first_half.clone()]);
        let c = ally_defences_check(&g, &ally, &ok, &[Attack::RstSplit]);
        assert!(c.passed && c.detail.contains("checksum drops=1"), "{c}");
        // The whole content reached the host (the flow was picked up after the RST).
        let leak = crate::endpoints::UploadRecord {
            bytes: 41,
            complete: true,
            forbidden: true,
            ..first_half
        };
        assert!(!ally_defences_check(&g, &ally, &net(vec![leak]), &[Attack::RstSplit]).passed);
        // Ally took the RST (no checksum drop): it believed what the receiver never got.
        let took = AllyReport::parse("ALLY stream flows=9 reset=1 after-reset=3\n");
        let c = ally_defences_check(&g, &took, &ok, &[Attack::RstSplit]);
        assert!(!c.passed && c.detail.contains("after-reset=3"), "{c}");
        // The RST never left the guest.
        let g = guest("ALLYTEST attack-rst-split INFO port=7 rst_sent=false\n");
        assert!(!ally_defences_check(&g, &ally, &ok, &[Attack::RstSplit]).passed);
    }

    /// The DMA attack's marker: `nonzero` bytes came back from the target.
    fn dma_marker(nonzero: u64) -> GuestReport {
        let (digest, head) = if nonzero == 0 {
            ("a8c7f832281a39c5", "00000000000000000000000000000000")
        } else {
            ("5c1b1bfd0b2a6e3d", "d65052e8000000001800000017ac2bfd")
        };
        guest(&format!(
            "ALLYTEST attack-dma INFO ahci=00:1f.2 target=0x38600000 target_from=iomem pci_command=0x107 abar=0xfebf1000 sectors=131072 scratch_lba=131069 control=ok control_bytes=512 leak_status=ok leak_bytes=512 leak_bytes_nonzero={nonzero} leak_digest={digest} leak_head={head} overwrite_status=ok overwrite_bytes=512 errors=none port_stopped=1\n"
        ))
    }

    #[test]
    fn the_msi_attack_needs_remapping_and_no_nmi_with_amd_vi_and_an_nmi_without() {
        let marker = |status: &str| {
            guest(&format!(
                "ALLYTEST attack-dma INFO ahci=00:1f.2 control=ok msi_targets=1,2,3 msi_status={status}\n"
            ))
        };
        let ok = marker("ok,ok,ok");
        let on = |nmis: u64| {
            AllyReport::parse(&format!(
                "ALLY intremap status=on kind=amd-vi ioapics=1\nALLY root-nmis count={nmis}\n"
            ))
        };
        let c = msi_check(&ok, &on(0), setup(Iommu::Amd, ""));
        assert!(c.passed, "{c}");
        assert!(!msi_check(&ok, &on(2), setup(Iommu::Amd, "")).passed);
        // Remapping not reported on; no count at all; the sector never written.
        let off = AllyReport::parse("ALLY root-nmis count=0\n");
        assert!(!msi_check(&ok, &off, setup(Iommu::Amd, "")).passed);
        assert!(!msi_check(&ok, &AllyReport::parse(""), setup(Iommu::Amd, "")).passed);
        assert!(!msi_check(&marker("not_run"), &on(0), setup(Iommu::Amd, "")).passed);
        // Without an IOMMU: the hole must show.
        let hole = AllyReport::parse("ALLY root-nmis count=3\n");
        let c = msi_check(&ok, &hole, setup(Iommu::None, "iommu=off"));
        assert!(c.passed && c.detail.starts_with("hole shown"), "{c}");
        assert!(!msi_check(&ok, &off, setup(Iommu::None, "iommu=off")).passed);
        // VT-d: the units must remap with the compatibility format blocked.
        let vtd = |cfis: u8| {
            AllyReport::parse(&format!(
                "ALLY intremap unit=vt-d base=0xfed90000 gsts=0xc7000000 ires=1 cfis={cfis} qies=1\nALLY intremap status=on kind=vt-d\nALLY root-nmis count=1\n"
            ))
        };
        let c = msi_check(&ok, &vtd(0), setup(Iommu::Intel, ""));
        assert!(c.passed && c.detail.contains("IRES=1 CFIS=0"), "{c}");
        assert!(!msi_check(&ok, &vtd(1), setup(Iommu::Intel, "")).passed);
        assert!(!msi_check(&ok, &on(0), setup(Iommu::Intel, "")).passed);
    }

    #[test]
    fn the_iommu_capability_must_hold_and_ally_must_have_refused() {
        let m = |after: &str| {
            guest(&format!(
                "ALLYTEST attack-dma INFO ahci=00:1f.2 iommu_cap=00:01.0 iommu_cap_before=0xfed80001 iommu_cap_after={after}\n"
            ))
        };
        let refused = |n: u64| {
            AllyReport::parse(&format!(
                "ALLY pci-guard functions=2 iommu-capability-refused={n}\n"
            ))
        };
        let c = iommu_capability_check(&m("0xfed80001"), &refused(1), setup(Iommu::Amd, ""));
        assert!(c.passed, "{c}");
        assert!(
            !iommu_capability_check(&m("0x1000001"), &refused(1), setup(Iommu::Amd, "")).passed
        );
        assert!(
            !iommu_capability_check(&m("0xfed80001"), &refused(0), setup(Iommu::Amd, "")).passed
        );
        let none = guest("ALLYTEST attack-dma INFO ahci=00:1f.2 iommu_cap=none\n");
        assert!(iommu_capability_check(&none, &refused(0), setup(Iommu::Intel, "")).passed);
        assert!(!iommu_capability_check(&none, &refused(0), setup(Iommu::Amd, "")).passed);
    }

    #[test]
    fn the_guests_own_msi_must_arrive() {
        let marker =
            |fields: &str| guest(&format!("ALLYTEST attack-dma INFO ahci=00:1f.2 {fields}\n"));
        let c = own_msi_check(
            &marker("own_msi_status=ok res_before=0 res_after=1"),
            setup(Iommu::Amd, ""),
        );
        assert!(c.passed && c.detail.contains("AMD-Vi"), "{c}");
        assert!(
            !own_msi_check(
                &marker("own_msi_status=ok res_before=2 res_after=2"),
                setup(Iommu::Intel, "")
            )
            .passed
        );
        assert!(
            !own_msi_check(
                &marker("own_msi_status=command_timeout"),
                setup(Iommu::None, "iommu=off")
            )
            .passed
        );
        assert!(
            !own_msi_check(
                &marker("own_msi_status=ok res_before=0"),
                setup(Iommu::Amd, "")
            )
            .passed
        );
    }

    fn setup(iommu: Iommu, ally_options: &str) -> DmaSetup {
        DmaSetup::of_run(Machine::Q35, iommu, ally_options)
    }

    const FAULTS: &str = "[cpu0 WARN iommu] ALLY iommu-fault device=00:1f.2 address=0x38600000 reason=not-present write=0\n\
                          [cpu0 WARN iommu] ALLY iommu-fault device=00:1f.2 address=0x38600000 reason=not-present write=1\n\
                          ALLY canary status=intact ranges=..\n";

    #[test]
    fn with_an_iommu_the_dma_attack_needs_the_fault_no_leak_and_the_canary() {
        let ally = AllyReport::parse(FAULTS);
        for iommu in [Iommu::Intel, Iommu::Amd] {
            let c = dma_check(&dma_marker(0), &ally, setup(iommu, ""));
            assert!(c.passed, "{c}");
            assert!(
                c.detail.starts_with(&format!(
                    "{iommu} IOMMU: ALLY iommu-fault device=00:1f.2 address=0x38600000 reason=not-present (2 of 2 fault(s) from 00:1f.2 at or near the target); no data leaked; AHCI 00:1f.2, target 0x38600000: leak_status=ok leak_bytes_nonzero=0"
                )),
                "{c}"
            );
        }
        // AMD-Vi gives the address, VT-d the page: both are near.
        let exact = AllyReport::parse(
            "ALLY iommu-fault device=00:1f.2 address=0x386001f8 reason=io-page-fault\nALLY canary status=intact\n",
        );
        assert!(dma_check(&dma_marker(0), &exact, setup(Iommu::Amd, "")).passed);
        // Data came back from the target.
        let c = dma_check(&dma_marker(301), &ally, setup(Iommu::Intel, ""));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with(
                "the device read 301 non-zero bytes from 0x38600000 despite the intel IOMMU"
            ),
            "{c}"
        );
        // AMD-Vi on, no event, nothing leaked, the canary intact: QEMU 7.2's silent block.
        let silent = AllyReport::parse(
            "ALLY iommu status=on kind=amd-vi units=1\nALLY canary status=intact\n",
        );
        let c = dma_check(&dma_marker(0), &silent, setup(Iommu::Amd, ""));
        assert!(c.passed && c.detail.contains("without an event"), "{c}");
        // Not for VT-d, not when AMD-Vi was not reported on, not with a leak.
        assert!(!dma_check(&dma_marker(0), &silent, setup(Iommu::Intel, "")).passed);
        let off = AllyReport::parse("ALLY canary status=intact\n");
        assert!(!dma_check(&dma_marker(0), &off, setup(Iommu::Amd, "")).passed);
        assert!(!dma_check(&dma_marker(5), &silent, setup(Iommu::Amd, "")).passed);
        // No fault; a fault of another device; a fault elsewhere.
        for log in [
            "ALLY canary status=intact\n",
            "ALLY iommu-fault device=00:02.0 address=0x38600000 reason=x\nALLY canary status=intact\n",
            "ALLY iommu-fault device=00:1f.2 address=0x38602000 reason=x\nALLY canary status=intact\n",
        ] {
            let c = dma_check(&dma_marker(0), &AllyReport::parse(log), setup(Iommu::Intel, ""));
            assert!(!c.passed, "{log}: {c}");
            assert!(
                c.detail.starts_with(
                    "no `ALLY iommu-fault device=00:1f.2 address=..` at or near 0x38600000 under the intel IOMMU"
                ),
                "{c}"
            );
        }
        // The overwrite got through somewhere: the canary says so.
        let damaged = AllyReport::parse(&FAULTS.replace("intact", "damaged"));
        let c = dma_check(&dma_marker(0), &damaged, setup(Iommu::Amd, ""));
        assert!(!c.passed);
        assert!(c.detail.contains("ALLY canary status=damaged"), "{c}");
    }

    #[test]
    fn without_an_iommu_the_dma_attack_documents_the_hole() {
        let ally = AllyReport::parse("ALLY canary status=damaged ranges=..\n");
        let c = dma_check(
            &dma_marker(301),
            &ally,
            setup(Iommu::None, "log=info iommu=off"),
        );
        assert!(c.passed, "{c}");
        assert_eq!(
            c.detail,
            "hole shown: AHCI 00:1f.2, target 0x38600000: leak_status=ok leak_bytes_nonzero=301 leak_digest=5c1b1bfd0b2a6e3d leak_head=d65052e8000000001800000017ac2bfd, overwrite_status=ok, errors=none, ALLY canary status=damaged, control DMA ok (512 B) (iommu=off)"
        );
        // Nothing leaked with nothing in the way: the attack is broken.
        let c = dma_check(&dma_marker(0), &ally, setup(Iommu::None, "iommu=off"));
        assert!(!c.passed);
        assert!(
            c.detail
                .starts_with("no leak visible without an IOMMU: the attack itself is broken"),
            "{c}"
        );
        // Ally started the guest without an IOMMU and without iommu=off.
        let c = dma_check(&dma_marker(301), &ally, setup(Iommu::None, "iommu=offx"));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with(
                "no IOMMU and Ally was not given iommu=off, yet it started the guest (issue 14: fail closed); the hole: AHCI 00:1f.2"
            ),
            "{c}"
        );
    }

    #[test]
    fn the_dma_attack_must_run_on_q35_and_its_control_must_work() {
        let ally = AllyReport::parse(FAULTS);
        let skipped = guest("ALLYTEST attack-dma INFO skipped=no_ahci\n");
        let pc = DmaSetup::of_run(Machine::Pc, Iommu::None, "");
        let c = dma_check(&skipped, &ally, pc);
        assert!(c.passed, "{c}");
        assert_eq!(
            c.detail,
            "skipped by the guest (no_ahci): the pc machine has no AHCI controller"
        );
        assert!(!dma_check(&skipped, &ally, setup(Iommu::Intel, "")).passed);
        assert!(!dma_check(&guest(""), &ally, pc).passed);
        let broken = guest(
            "ALLYTEST attack-dma INFO ahci=00:1f.2 target=0x38600000 control=read_tfes control_bytes=0 leak_status=not_run overwrite_status=not_run errors=control_read:tfes:is=0x40000001:tfd=0x451\n",
        );
        let c = dma_check(&broken, &ally, setup(Iommu::Intel, ""));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with("the control DMA through the attacker's own page failed (control=read_tfes, errors=control_read:tfes:is=0x40000001:tfd=0x451)"),
            "{c}"
        );
        let unread = guest(
            "ALLYTEST attack-dma INFO ahci=00:1f.2 target=0x38600000 control=ok leak_status=ok leak_readback=ok/timeout\n",
        );
        let c = dma_check(&unread, &ally, setup(Iommu::Intel, ""));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with(
                "the leaked sector was not read back (leak_status=ok, leak_readback=ok/timeout)"
            ),
            "{c}"
        );
        let error =
            guest("ALLYTEST attack-dma INFO ahci=00:1f.2 error=port_not_implemented_pi0x0\n");
        assert!(!dma_check(&error, &ally, setup(Iommu::Intel, "")).passed);
        // `attack-refused` leaves it to this check.
        let c = ally_defences_check(
            &dma_marker(0),
            &ally,
            &host(UdpCounts::default()),
            &[Attack::Dma],
        );
        assert!(c.passed, "{c}");
        assert_eq!(c.detail, "dma: judged by the dma-iommu check");
    }

    #[test]
    fn iommu_faults_and_their_distance_from_the_target() {
        let ally = AllyReport::parse(
            "ALLY iommu-fault device=00:1f.2 address=0x38600000 reason=not present\n\
             ALLY iommu-fault device=00:1f.2 address=junk reason=x\n\
             ALLY iommu-fault address=0x1000\n",
        );
        assert_eq!(
            iommu_faults(&ally),
            [IommuFault {
                device: "00:1f.2".into(),
                address: 0x3860_0000,
                reason: "not present".into(),
            }]
        );
        assert!(fault_near(0x3860_0000, 0x3860_0000, 512));
        assert!(fault_near(0x3860_01ff, 0x3860_0000, 512));
        assert!(fault_near(0x3860_0fff, 0x3860_0000, 512));
        assert!(!fault_near(0x3860_1000, 0x3860_0000, 512));
        assert!(!fault_near(0x385f_f000, 0x3860_0000, 512));
        // A transfer across a page boundary reaches the next page.
        assert!(fault_near(0x3860_1000, 0x3860_0f00, 512));
        assert_eq!(
            DmaSetup::of_run(Machine::Q35, Iommu::Amd, "log=info iommu=off"),
            DmaSetup {
                machine: Machine::Q35,
                iommu: Iommu::Amd,
                ally_iommu_off: true
            }
        );
        assert!(!DmaSetup::of_run(Machine::Q35, Iommu::None, "iommu=on").ally_iommu_off);
    }

    #[test]
    fn markers_are_parsed_in_one_place() {
        let g = guest(
            "ALLYTEST init PASS\n\
             ALLYTEST attack-msr INFO target=0x100000 0x560=EIO 0x570=EIO\n\
             ALLYTEST attack-pci-race INFO skipped=1cpu\n\
             ALLYTEST attack-bogus INFO x=1\n\
             ALLYTEST reset-attack INFO boot=1 method=kbc-output ibf_clear=1\n\
             ALLYTEST reset-attack INFO boot=2 ping_received=3 method=reboot\n",
        );
        let all = attack_markers(&g);
        assert_eq!(all.len(), 2);
        let msr = find(&g, Attack::Msr).unwrap();
        assert_eq!(msr.get("0x560"), Some("EIO"));
        assert_eq!(msr.not_run(), None);
        let r = reset_markers(&g);
        assert_eq!(
            r.iter()
                .map(|m| (m.boot, m.method.as_str()))
                .collect::<Vec<_>>(),
            [(1, "kbc-output"), (2, "reboot")]
        );
    }

    #[test]
    fn every_requested_attack_needs_its_marker() {
        let g = guest(
            "ALLYTEST attack-msr INFO 0x560=EIO\n\
             ALLYTEST attack-pci-race INFO skipped=1cpu\n\
             ALLYTEST attack-sleep INFO error=read_FACP:x\n",
        );
        let c = attack_markers_check(&g, &[Attack::Msr, Attack::PciRace]);
        assert!(c.passed, "{c}");
        assert_eq!(
            c.detail,
            "every requested attack reported: msr, pci-race (skipped=1cpu)"
        );
        let c = attack_markers_check(&g, &[Attack::Msr, Attack::Sleep, Attack::Tucso]);
        assert!(!c.passed);
        assert_eq!(
            c.detail,
            "missing markers: [attack-tucso]; attacks that could not run: [sleep: error=read_FACP:x]"
        );
        assert!(attack_markers_check(&guest(""), &[]).passed);
        let refused = guest("ALLYTEST attack-msr INFO refused=not_the_test_guest\n");
        assert!(!attack_markers_check(&refused, &[Attack::Msr]).passed);
    }
}
