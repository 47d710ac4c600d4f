//! Machine-readable lines of the two serial logs.
//!
//! * The guest (COM1) prints `ALLYTEST <name> <PASS|FAIL|INFO> <key=value ...>` and finally
//!   `ALLYTEST done` (see `guest/init`).
//! * Ally (COM2) prints `ALLY <key> <k=v ...>`, possibly after a log prefix such as
//!   `[cpu0 INFO hv] `; lines are matched on the `ALLY ` substring.
//!
//! Values are single words (the guest script replaces spaces with `_`). Numbers are decimal or
//! `0x`-prefixed hexadecimal.

use std::fmt;

/// A parse error for one marker value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerError {
    /// A marker lacks a field the caller needs.
    MissingField { marker: String, field: String },
    /// A field's value is not a number.
    BadNumber {
        marker: String,
        field: String,
        value: String,
    },
}

impl fmt::Display for MarkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarkerError::MissingField { marker, field } => {
                write!(f, "marker `{marker}` has no field `{field}`")
            }
            MarkerError::BadNumber {
                marker,
                field,
                value,
            } => write!(
                f,
                "marker `{marker}` field `{field}`: `{value}` is not a decimal or 0x-hex number"
            ),
        }
    }
}

impl std::error::Error for MarkerError {}

/// Parses `123` or `0x7b` (any case) into a u64.
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// The status word of a guest marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Info,
}

impl Status {
    fn parse(word: &str) -> Option<Status> {
        match word {
            "PASS" => Some(Status::Pass),
            "FAIL" => Some(Status::Fail),
            "INFO" => Some(Status::Info),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Info => "INFO",
        })
    }
}

/// `key=value` words in order. A word without `=` continues the previous value (Ally prints
/// e.g. `reason=EPT violation basic=48`); before any field it is kept with an empty value.
/// Surrounding double quotes are removed from values (`reason="bad option x"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    fn parse<'a>(words: impl Iterator<Item = &'a str>) -> Fields {
        let mut out: Vec<(String, String)> = Vec::new();
        for w in words {
            match (w.split_once('='), out.last_mut()) {
                (Some((k, v)), _) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
                (_, Some((_, prev))) => {
                    prev.push(' ');
                    prev.push_str(w);
                }
                (_, None) => out.push((w.to_string(), String::new())),
            }
        }
        for (_, v) in &mut out {
            if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                *v = v[1..v.len() - 1].to_string();
            }
        }
        Fields(out)
    }

    /// The value of the first field named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One `ALLYTEST` line of the guest console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMarker {
    pub name: String,
    /// `None` only for `ALLYTEST done`, which has no status word.
    pub status: Option<Status>,
    pub fields: Fields,
    /// The whole line as printed, for messages.
    pub line: String,
}

impl GuestMarker {
    /// Parses a console line; `None` when it holds no `ALLYTEST ` marker.
    pub fn parse(line: &str) -> Option<GuestMarker> {
        let line = line.trim_end_matches(['\r', '\n']);
        let at = line.find("ALLYTEST ")?;
        let rest = &line[at + "ALLYTEST ".len()..];
        let mut words = rest.split_whitespace();
        let name = words.next()?.to_string();
        let mut words = words.peekable();
        let status = words.peek().and_then(|w| Status::parse(w));
        if status.is_some() {
            words.next();
        }
        Some(GuestMarker {
            name,
            status,
            fields: Fields::parse(words),
            line: line[at..].to_string(),
        })
    }

    /// A numeric field, with an error naming the marker and field.
    pub fn number(&self, field: &str) -> Result<u64, MarkerError> {
        number_field(&self.name, &self.fields, field)
    }
}

/// One `ALLY ` line of Ally's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllyLine {
    pub key: String,
    pub fields: Fields,
    pub line: String,
}

impl AllyLine {
    /// Parses a COM2 line; `None` when it holds no `ALLY ` marker.
    pub fn parse(line: &str) -> Option<AllyLine> {
        let line = line.trim_end_matches(['\r', '\n']);
        // `ALLY ` must start a word: not the tail of e.g. `RALLY `.
        let at = line
            .match_indices("ALLY ")
            .map(|(i, _)| i)
            .find(|&i| i == 0 || !line.as_bytes()[i - 1].is_ascii_alphanumeric())?;
        let rest = &line[at + "ALLY ".len()..];
        let mut words = rest.split_whitespace();
        let key = words.next()?.to_string();
        Some(AllyLine {
            key,
            fields: Fields::parse(words),
            line: line[at..].to_string(),
        })
    }

    /// A numeric field, with an error naming the line and field.
    pub fn number(&self, field: &str) -> Result<u64, MarkerError> {
        number_field(&self.key, &self.fields, field)
    }
}

fn number_field(marker: &str, fields: &Fields, field: &str) -> Result<u64, MarkerError> {
    let value = fields.get(field).ok_or_else(|| MarkerError::MissingField {
        marker: marker.to_string(),
        field: field.to_string(),
    })?;
    parse_number(value).ok_or_else(|| MarkerError::BadNumber {
        marker: marker.to_string(),
        field: field.to_string(),
        value: value.to_string(),
    })
}

/// One entry of the guest's `/sys/firmware/memmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemmapEntry {
    pub start: u64,
    /// Inclusive, exactly as the kernel prints it.
    pub end_inclusive: u64,
    /// The type with spaces replaced by `_`, e.g. `System_RAM`, `Reserved`, `ACPI_Tables`.
    pub kind: String,
}

impl MemmapEntry {
    pub fn is_ram(&self) -> bool {
        self.kind == "System_RAM"
    }

    /// Whether `[start, end_inclusive]` intersects `[base, base + size)`.
    pub fn overlaps(&self, base: u64, size: u64) -> bool {
        size != 0 && self.start < base.saturating_add(size) && base <= self.end_inclusive
    }
}

/// A `devmem-read` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevmemRead {
    pub addr: u64,
    /// `Err(message)` when devmem itself failed.
    pub value: Result<u64, String>,
}

/// Everything the guest reported, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    pub markers: Vec<GuestMarker>,
}

impl GuestReport {
    pub fn parse(log: &str) -> GuestReport {
        GuestReport {
            markers: log.lines().filter_map(GuestMarker::parse).collect(),
        }
    }

    /// The first marker with this name.
    pub fn find(&self, name: &str) -> Option<&GuestMarker> {
        self.markers.iter().find(|m| m.name == name)
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a GuestMarker> + 'a {
        self.markers.iter().filter(move |m| m.name == name)
    }

    pub fn init_reached(&self) -> bool {
        self.find("init")
            .is_some_and(|m| m.status == Some(Status::Pass))
    }

    pub fn done(&self) -> bool {
        self.find("done").is_some()
    }

    pub fn memtotal_kb(&self) -> Result<Option<u64>, MarkerError> {
        self.find("meminfo")
            .map(|m| m.number("memtotal_kb"))
            .transpose()
    }

    pub fn memmap(&self) -> Result<Vec<MemmapEntry>, MarkerError> {
        self.all("memmap")
            .map(|m| {
                Ok(MemmapEntry {
                    start: m.number("start")?,
                    end_inclusive: m.number("end")?,
                    kind: m
                        .fields
                        .get("type")
                        .ok_or_else(|| MarkerError::MissingField {
                            marker: m.name.clone(),
                            field: "type".into(),
                        })?
                        .to_string(),
                })
            })
            .collect()
    }

    pub fn probe_addr(&self) -> Result<Option<u64>, MarkerError> {
        self.find("probe").map(|m| m.number("addr")).transpose()
    }

    pub fn devmem_reads(&self) -> Result<Vec<DevmemRead>, MarkerError> {
        self.all("devmem-read")
            .map(devmem_result("value"))
            .collect()
    }

    /// The read-back after the write (`readback=` or `error=`).
    pub fn devmem_write(&self) -> Result<Option<DevmemRead>, MarkerError> {
        self.find("devmem-write")
            .map(devmem_result("readback"))
            .transpose()
    }

    /// `Some(true)` for `ping PASS`, `Some(false)` for `ping FAIL`.
    pub fn ping_passed(&self) -> Option<bool> {
        self.find("ping").map(|m| m.status == Some(Status::Pass))
    }

    pub fn nproc(&self) -> Result<Option<u64>, MarkerError> {
        self.find("cpus").map(|m| m.number("nproc")).transpose()
    }

    /// Every marker with status FAIL.
    pub fn failures(&self) -> impl Iterator<Item = &GuestMarker> {
        self.markers
            .iter()
            .filter(|m| m.status == Some(Status::Fail))
    }
}

fn devmem_result(
    value_field: &'static str,
) -> impl Fn(&GuestMarker) -> Result<DevmemRead, MarkerError> {
    move |m| {
        let addr = m.number("addr")?;
        let value = match m.fields.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(m.number(value_field)?),
        };
        Ok(DevmemRead { addr, value })
    }
}

/// One `ALLY exits` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitCount {
    pub reason: String,
    pub count: u64,
    /// The handler's mean and longest TSC ticks per exit (`handler-tsc-mean`/`-max`), when
    /// Ally reports them.
    pub handler_tsc: Option<(u64, u64)>,
}

/// One `ALLY ept-violation` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EptViolation {
    pub gpa: u64,
    pub access: String,
    pub action: Option<String>,
}

impl EptViolation {
    /// Whether the access was a write (`access=write`, any case).
    pub fn is_write(&self) -> bool {
        self.access.eq_ignore_ascii_case("write")
    }
}

/// Everything Ally reported on COM2, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllyReport {
    pub lines: Vec<AllyLine>,
}

impl AllyReport {
    pub fn parse(log: &str) -> AllyReport {
        AllyReport {
            lines: log.lines().filter_map(AllyLine::parse).collect(),
        }
    }

    pub fn find(&self, key: &str) -> Option<&AllyLine> {
        self.lines.iter().find(|l| l.key == key)
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a AllyLine> + 'a {
        self.lines.iter().filter(move |l| l.key == key)
    }

    /// Ally's reserved region `(base, size)` from `ALLY region base=.. size=..`.
    pub fn region(&self) -> Result<Option<(u64, u64)>, MarkerError> {
        self.find("region")
            .map(|l| Ok((l.number("base")?, l.number("size")?)))
            .transpose()
    }

    pub fn image_size(&self) -> Result<Option<u64>, MarkerError> {
        self.find("image").map(|l| l.number("size")).transpose()
    }

    pub fn guest_started(&self) -> bool {
        self.find("guest-start").is_some()
    }

    pub fn ept_violations(&self) -> Result<Vec<EptViolation>, MarkerError> {
        self.all("ept-violation")
            .map(|l| {
                Ok(EptViolation {
                    gpa: l.number("gpa")?,
                    access: l
                        .fields
                        .get("access")
                        .ok_or_else(|| MarkerError::MissingField {
                            marker: l.key.clone(),
                            field: "access".into(),
                        })?
                        .to_string(),
                    action: l.fields.get("action").map(str::to_string),
                })
            })
            .collect()
    }

    pub fn exits(&self) -> Result<Vec<ExitCount>, MarkerError> {
        self.all("exits")
            .map(|l| {
                Ok(ExitCount {
                    reason: l
                        .fields
                        .get("reason")
                        .ok_or_else(|| MarkerError::MissingField {
                            marker: l.key.clone(),
                            field: "reason".into(),
                        })?
                        .to_string(),
                    count: l.number("count")?,
                    handler_tsc: match (l.number("handler-tsc-mean"), l.number("handler-tsc-max")) {
                        (Ok(mean), Ok(max)) => Some((mean, max)),
                        _ => None,
                    },
                })
            })
            .collect()
    }

    /// The `status=` of the last `ALLY canary` line.
    pub fn canary(&self) -> Option<&str> {
        self.all("canary")
            .last()
            .and_then(|l| l.fields.get("status"))
    }

    pub fn powered_off(&self) -> bool {
        self.find("poweroff").is_some()
    }

    /// The first `ALLY fatal` line, whole.
    pub fn fatal(&self) -> Option<&AllyLine> {
        self.find("fatal")
    }
}

/// Whether a guest console line shows a kernel panic.
pub fn is_kernel_panic(line: &str) -> bool {
    line.contains("Kernel panic - not syncing")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_LOG: &str = "\
[    0.000000] Linux version 6.1.0\r
ALLYTEST init PASS\r
ALLYTEST meminfo INFO memtotal_kb=968000\r
ALLYTEST memmap INFO start=0x0 end=0x9fbff type=System_RAM\r
ALLYTEST memmap INFO start=0x100000 end=0x3d7fffff type=System_RAM\r
ALLYTEST memmap INFO start=0xfffc0000 end=0xffffffff type=Reserved\r
ALLYTEST probe INFO addr=0x3d800000\r
ALLYTEST devmem-read INFO addr=0x3d800000 value=0xFFFFFFFF\r
ALLYTEST devmem-read INFO addr=0x3d801000 error=devmem:_can't_open\r
ALLYTEST devmem-write INFO addr=0x3d800010 readback=0xFFFFFFFF\r
[   12.3] e1000: eth0 NIC Link is Up ALLYTEST ping PASS target=10.0.2.2 received=3 sent=3\r
ALLYTEST cpus INFO nproc=1 present=0\r
ALLYTEST done\r
";

    #[test]
    fn guest_markers_parse() {
        let r = GuestReport::parse(GUEST_LOG);
        assert!(r.init_reached());
        assert!(r.done());
        assert_eq!(r.memtotal_kb().unwrap(), Some(968000));
        let mm = r.memmap().unwrap();
        assert_eq!(mm.len(), 3);
        assert_eq!(mm[1].start, 0x100000);
        assert_eq!(mm[1].end_inclusive, 0x3d7f_ffff);
        assert!(mm[1].is_ram());
        assert!(!mm[2].is_ram());
        assert_eq!(r.probe_addr().unwrap(), Some(0x3d80_0000));
        let reads = r.devmem_reads().unwrap();
        assert_eq!(reads[0].value, Ok(0xffff_ffff));
        assert_eq!(reads[1].value, Err("devmem:_can't_open".to_string()));
        let w = r.devmem_write().unwrap().unwrap();
        assert_eq!((w.addr, w.value), (0x3d80_0010, Ok(0xffff_ffff)));
        // A marker after a kernel message on the same line is still found.
        assert_eq!(r.ping_passed(), Some(true));
        assert_eq!(r.nproc().unwrap(), Some(1));
        assert_eq!(r.failures().count(), 0);
        let done = r.find("done").unwrap();
        assert_eq!(done.status, None);
        assert!(done.fields.0.is_empty());
    }

    #[test]
    fn guest_bad_number_is_named() {
        let r = GuestReport::parse("ALLYTEST meminfo INFO memtotal_kb=unknown\n");
        let e = r.memtotal_kb().unwrap_err();
        assert_eq!(
            e.to_string(),
            "marker `meminfo` field `memtotal_kb`: `unknown` is not a decimal or 0x-hex number"
        );
        let r = GuestReport::parse("ALLYTEST probe INFO\n");
        assert!(matches!(
            r.probe_addr(),
            Err(MarkerError::MissingField { .. })
        ));
    }

    #[test]
    fn empty_log_has_nothing() {
        let r = GuestReport::parse("garbage\nALLYTEST\n");
        assert!(r.markers.is_empty());
        assert!(!r.init_reached());
        assert_eq!(r.ping_passed(), None);
        assert_eq!(r.memtotal_kb().unwrap(), None);
    }

    const ALLY_LOG: &str = "\
[cpu0 INFO hv] ALLY region base=0x3d800000 size=0x2000000
ALLY image size=12345
[cpu0 INFO hv] ALLY guest-start
RALLY notamarker x=1
[cpu0 WARN hv] ALLY ept-violation gpa=0x3d800010 access=write action=skip
ALLY ept-violation gpa=0x3d800000 access=read action=ones
ALLY exits reason=CPUID count=123
[cpu0 INFO hv] ALLY exits reason=EPT violation basic=48 count=4
ALLY canary status=intact
ALLY poweroff
";

    #[test]
    fn ally_lines_parse() {
        let r = AllyReport::parse(ALLY_LOG);
        assert_eq!(r.lines.len(), 9);
        assert_eq!(r.region().unwrap(), Some((0x3d80_0000, 0x200_0000)));
        assert_eq!(r.image_size().unwrap(), Some(12345));
        assert!(r.guest_started());
        let v = r.ept_violations().unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].gpa, 0x3d80_0010);
        assert_eq!(v[0].access, "write");
        assert_eq!(v[0].action.as_deref(), Some("skip"));
        let e = r.exits().unwrap();
        assert_eq!(e[1].reason, "EPT violation");
        assert_eq!(e[1].count, 4);
        assert_eq!(e[0].count, 123);
        assert_eq!(r.canary(), Some("intact"));
        assert!(r.powered_off());
        assert!(r.fatal().is_none());
    }

    #[test]
    fn ally_fatal_is_found() {
        let r = AllyReport::parse("[cpu0 ERROR hv] ALLY fatal reason=unknown-exit exit=48\n");
        assert_eq!(
            r.fatal().unwrap().fields.get("reason"),
            Some("unknown-exit")
        );
    }

    #[test]
    fn memmap_overlap_is_inclusive_aware() {
        let e = MemmapEntry {
            start: 0x100000,
            end_inclusive: 0x3d7f_ffff,
            kind: "System_RAM".into(),
        };
        assert!(!e.overlaps(0x3d80_0000, 0x200_0000));
        assert!(e.overlaps(0x3d7f_ffff, 1));
        assert!(e.overlaps(0, 0x100001));
        assert!(!e.overlaps(0, 0x100000));
        assert!(!e.overlaps(0x200000, 0));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0xFFFFFFFF"), Some(0xffff_ffff));
        assert_eq!(parse_number("42"), Some(42));
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("-1"), None);
        assert!(is_kernel_panic("[ 1.0] Kernel panic - not syncing: VFS"));
    }
}
