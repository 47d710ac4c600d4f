//! Issue 5's end-to-end inspection test, in the same Ally boot as the rest: the default rules
//! of an Ally run with the network workload (`tests/rules/inspect.rules`, with the port
//! variables the runner writes once its endpoints listen), the split of Ally's management
//! stream (COM2) into `eve.json` and `dropped.pcap`, and the checks of the guest's inspection
//! and ring-base-attack markers against Ally's alerts and counters.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checks::Check;
use crate::endpoints::NetReport;
use crate::markers::{AllyReport, GuestMarker, GuestReport};

/// `drop` of the EICAR string from the inspect-drop HTTP port.
pub const SID_DROP: u64 = 1_000_101;
/// `alert` on the EICAR string from the main HTTP port.
pub const SID_ALERT: u64 = 1_000_102;
/// `drop` of [`FORBIDDEN_UPLOAD`] sent to the upload port.
pub const SID_UPLOAD: u64 = 1_000_103;
/// `alert` on the alert storm's payload to the attack UDP sink (issue 11).
pub const SID_STORM: u64 = 1_000_104;
/// `drop` of the EICAR string in a decoded HTTP body (`file_data`) from the inspect-drop port
/// (issue 12: `eicar.gz`, gzipped and chunked).
pub const SID_GZIP: u64 = 1_000_106;
/// The marker string the guest's inspection upload carries (`guest/init` has its own copy).
pub const FORBIDDEN_UPLOAD: &str = "ALLY-FORBIDDEN-UPLOAD";

/// What `ally-attack ooo-upload` uploads (its `OOO_UPLOAD_PIECES` joined): the host must
/// receive exactly this, one piece of it having been held by Ally as an out-of-order segment.
pub const OOO_UPLOAD: &str = "OOO-UPLOAD piece-A 0123456789abcdef\nOOO-UPLOAD piece-B fedcba9876543210\nOOO-UPLOAD piece-C the-held-segment\n";

/// The rules file, relative to the workspace.
pub const RULES_FILE: &str = "tests/rules/inspect.rules";
/// The variables file the runner writes into the run's directory.
pub const VARS_FILE: &str = "inspect.vars";
/// What the split of COM2 writes into the run's directory.
pub const EVE_FILE: &str = "eve.json";
pub const PCAP_FILE: &str = "dropped.pcap";

/// The ports the inspection rules refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InspectPorts {
    pub http: u16,
    pub inspect_drop: u16,
    pub upload: u16,
    /// The attack UDP sink (`$ALLY_STORM_PORT`, the alert storm's target).
    pub storm: u16,
}

impl InspectPorts {
    /// The variables file for [`RULES_FILE`].
    pub fn vars_text(&self) -> String {
        format!(
            "# Written by ally-run for tests/rules/inspect.rules: this run's endpoint ports.\n\
             portvar ALLY_HTTP_PORT {}\nportvar ALLY_INSPECT_DROP_PORT {}\nportvar ALLY_UPLOAD_PORT {}\nportvar ALLY_STORM_PORT {}\n",
            self.http, self.inspect_drop, self.upload, self.storm
        )
    }
}

pub fn rules_path(workspace: &Path) -> PathBuf {
    workspace.join(RULES_FILE)
}

/// One EVE alert record, the fields the checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EveAlert {
    pub sid: u64,
    pub action: String,
    pub direction: String,
    pub src_port: Option<u64>,
    pub dest_port: Option<u64>,
}

/// Parses one EVE JSON object (an `alert` event).
pub fn parse_eve_alert(json: &str) -> Result<EveAlert, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    if v["event_type"] != "alert" {
        return Err(format!("not an alert event: {json}"));
    }
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no string {what}: {json}"))
    };
    Ok(EveAlert {
        sid: v["alert"]["signature_id"]
            .as_u64()
            .ok_or_else(|| format!("no numeric alert.signature_id: {json}"))?,
        action: text(&v["alert"]["action"], "alert.action")?,
        direction: text(&v["direction"], "direction")?,
        src_port: v["src_port"].as_u64(),
        dest_port: v["dest_port"].as_u64(),
    })
}

/// What the split of COM2 produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub alerts: Vec<EveAlert>,
    /// Records in the pcap, read back from the file.
    pub dropped_frames: usize,
    pub eve_path: PathBuf,
    pub pcap_path: PathBuf,
}

/// Splits Ally's COM2 with the tools' splitter into `dir/eve.json` and `dir/dropped.pcap`,
/// parses every alert and reads the pcap back.
pub fn split_com2(com2: &str, dir: &Path) -> Result<Split, String> {
    let eve_path = dir.join(EVE_FILE);
    let pcap_path = dir.join(PCAP_FILE);
    let mut eve = Vec::new();
    let create = |p: &Path| fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut pcap = BufWriter::new(create(&pcap_path)?);
    let (_, written) = ally_tools::eve::split(com2, &mut eve, &mut pcap)
        .map_err(|e| format!("COM2 management stream: {e}"))?;
    pcap.flush()
        .map_err(|e| format!("{}: {e}", pcap_path.display()))?;
    drop(pcap);
    fs::write(&eve_path, &eve).map_err(|e| format!("{}: {e}", eve_path.display()))?;
    let eve = String::from_utf8_lossy(&eve);
    let alerts = eve
        .lines()
        .enumerate()
        .map(|(i, l)| parse_eve_alert(l).map_err(|e| format!("{EVE_FILE} line {}: {e}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut f = fs::File::open(&pcap_path).map_err(|e| format!("{}: {e}", pcap_path.display()))?;
    let records =
        ally_tools::pcap::read_all(&mut f).map_err(|e| format!("{}: {e}", pcap_path.display()))?;
    if records.len() != written {
        return Err(format!(
            "{} holds {} records, the splitter wrote {written}",
            pcap_path.display(),
            records.len()
        ));
    }
    Ok(Split {
        alerts,
        dropped_frames: written,
        eve_path,
        pcap_path,
    })
}

/// The checks of an Ally run under the inspection rules: `eve-pcap`, `inspect-drop`,
/// `inspect-alert`, `inspect-upload`, `inspect-gzip`.
pub fn inspect_checks(
    guest: &GuestReport,
    net: &NetReport,
    split: &Result<Split, String>,
) -> Vec<Check> {
    let split = split.as_ref();
    vec![
        Check::from_result(
            "eve-pcap",
            split.map_err(Clone::clone).and_then(|s| {
                if s.dropped_frames == 0 {
                    return Err(format!(
                        "{} holds no dropped frame ({} alert records in {})",
                        s.pcap_path.display(),
                        s.alerts.len(),
                        s.eve_path.display()
                    ));
                }
                Ok(format!(
                    "{} alert records -> {}; {} dropped frames -> {}",
                    s.alerts.len(),
                    s.eve_path.display(),
                    s.dropped_frames,
                    s.pcap_path.display()
                ))
            }),
        ),
        Check::from_result(
            "inspect-drop",
            split
                .map_err(Clone::clone)
                .and_then(|s| inspect_drop(guest, net, s)),
        ),
        Check::from_result(
            "inspect-alert",
            split
                .map_err(Clone::clone)
                .and_then(|s| inspect_alert(guest, net, s)),
        ),
        Check::from_result(
            "inspect-upload",
            split
                .map_err(Clone::clone)
                .and_then(|s| inspect_upload(guest, net, s)),
        ),
        Check::from_result(
            "inspect-gzip",
            split
                .map_err(Clone::clone)
                .and_then(|s| inspect_gzip(guest, net, s)),
        ),
    ]
}

fn marker<'a>(guest: &'a GuestReport, name: &str) -> Result<&'a GuestMarker, String> {
    guest
        .find(name)
        .ok_or_else(|| format!("no `ALLYTEST {name}` marker"))
}

/// `(bytes, sha256)` of a marker.
fn bytes_sha(m: &GuestMarker) -> Result<(u64, &str), String> {
    let bytes = m.number("bytes").map_err(|e| e.to_string())?;
    Ok((bytes, m.fields.get("sha256").unwrap_or("none")))
}

/// The alerts of `sid`; `Err` unless one has `action` and `direction`.
fn alert_with(s: &Split, sid: u64, action: &str, direction: &str) -> Result<String, String> {
    let of_sid: Vec<&EveAlert> = s.alerts.iter().filter(|a| a.sid == sid).collect();
    let hits = of_sid
        .iter()
        .filter(|a| a.action == action && a.direction == direction)
        .count();
    if hits == 0 {
        let seen: Vec<String> = of_sid
            .iter()
            .map(|a| format!("{}/{}", a.action, a.direction))
            .collect();
        return Err(format!(
            "no EVE alert with signature_id {sid}, action `{action}`, direction {direction} in {} (alerts of that sid: {})",
            s.eve_path.display(),
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        ));
    }
    Ok(format!(
        "{hits} EVE alert(s) sid {sid} action={action} direction={direction}"
    ))
}

fn eicar(net: &NetReport) -> Result<(u64, &str), String> {
    net.file("eicar")
        .map(|f| (f.bytes, f.sha256.as_str()))
        .ok_or_else(|| "the host serves no eicar.bin".to_string())
}

fn inspect_drop(guest: &GuestReport, net: &NetReport, s: &Split) -> Result<String, String> {
    let m = marker(guest, "inspect-drop")?;
    let (bytes, sha) = bytes_sha(m)?;
    let (served, served_sha) = eicar(net)?;
    if bytes == served && sha == served_sha {
        return Err(format!(
            "the guest got eicar.bin intact ({bytes} B sha256={sha}) from the drop port: {}",
            m.line
        ));
    }
    let alert = alert_with(s, SID_DROP, "blocked", "from_wire")?;
    Ok(format!(
        "the guest got {bytes} of {served} B (rc={}), not the served file; {alert}",
        m.fields.get("rc").unwrap_or("?")
    ))
}

/// The gzipped, chunked EICAR file: the guest must not get it, and Ally must say it dropped it
/// on the decoded body's rule.
fn inspect_gzip(guest: &GuestReport, net: &NetReport, s: &Split) -> Result<String, String> {
    let m = marker(guest, "inspect-gzip")?;
    let (bytes, sha) = bytes_sha(m)?;
    let f = net
        .file("eicar-gz")
        .ok_or_else(|| "the host serves no eicar.gz".to_string())?;
    if bytes == f.bytes && sha == f.sha256 {
        return Err(format!(
            "the guest got eicar.gz intact ({bytes} B sha256={sha}): {}",
            m.line
        ));
    }
    let alert = alert_with(s, SID_GZIP, "blocked", "from_wire")?;
    Ok(format!(
        "the guest got {bytes} of {} B of the gzipped, chunked file (rc={}); {alert}",
        f.bytes,
        m.fields.get("rc").unwrap_or("?")
    ))
}

fn inspect_alert(guest: &GuestReport, net: &NetReport, s: &Split) -> Result<String, String> {
    let m = marker(guest, "inspect-alert")?;
    let (bytes, sha) = bytes_sha(m)?;
    let (served, served_sha) = eicar(net)?;
    if bytes != served || sha != served_sha {
        return Err(format!(
            "the guest got {bytes} B sha256={sha}, the host served {served} B sha256={served_sha}: {}",
            m.line
        ));
    }
    let alert = alert_with(s, SID_ALERT, "allowed", "from_wire")?;
    Ok(format!(
        "eicar.bin intact ({bytes} B, SHA-256 equal, {} s); {alert}",
        m.fields.get("seconds").unwrap_or("?")
    ))
}

fn inspect_upload(guest: &GuestReport, net: &NetReport, s: &Split) -> Result<String, String> {
    let m = marker(guest, "inspect-upload")?;
    let (bytes, sha) = bytes_sha(m)?;
    if bytes == 0 {
        return Err(format!("the guest sent an empty file: {}", m.line));
    }
    if let Some(u) = net
        .uploads
        .iter()
        .find(|u| u.complete && u.bytes == bytes && u.sha256 == sha)
    {
        return Err(format!(
            "the host received the forbidden upload intact ({} B sha256={}) from {}",
            u.bytes, u.sha256, u.peer
        ));
    }
    let host = m.fields.get("host_bytes").unwrap_or("none");
    if host == bytes.to_string() {
        return Err(format!(
            "the host echoed the whole upload to the guest: {}",
            m.line
        ));
    }
    let alert = alert_with(s, SID_UPLOAD, "blocked", "to_wire")?;
    let most = net
        .uploads
        .iter()
        .filter(|u| !u.complete)
        .map(|u| u.bytes)
        .max();
    Ok(format!(
        "the host did not receive the {bytes} B upload intact (echo: {host}; largest incomplete upload: {}); {alert}",
        most.map(|b| format!("{b} B")).unwrap_or_else(|| "none".into())
    ))
}

/// Issue 4 item 7: the guest aimed both rings at Ally's memory; Ally refused both (ring stops
/// with reason `protected`) and its memory is intact.
pub fn ring_attack_check(guest: &GuestReport, ally: &AllyReport) -> Check {
    Check::from_result(
        "ring-attack",
        (|| {
            let m = marker(guest, "ring-attack")?;
            if let Some(why) = m.fields.get("skipped") {
                return Err(format!("the guest did not attack: {why}"));
            }
            for dir in ["rx", "tx"] {
                if m.fields.get(dir) != Some("OK") {
                    return Err(format!(
                        "the guest's devmem writes to the {dir} ring registers failed: {}",
                        m.line
                    ));
                }
            }
            let mut seen = Vec::new();
            for dir in ["rx", "tx"] {
                let key = format!("nic-{dir}-drop");
                let l = ally
                    .all(&key)
                    .find(|l| l.fields.get("reason") == Some("protected"))
                    .ok_or_else(|| {
                        format!("no `ALLY {key} reason=protected ...` line: Ally did not refuse the {dir} ring")
                    })?;
                let stops = l.number("ring-stops").map_err(|e| e.to_string())?;
                if stops == 0 {
                    return Err(format!("Ally stopped no {dir} ring: {}", l.line));
                }
                seen.push(format!("{dir} ring-stops={stops}"));
            }
            match ally.canary() {
                Some("intact") => {}
                Some(s) => return Err(format!("ALLY canary status={s}")),
                None => return Err("no `ALLY canary` line".into()),
            }
            Ok(format!(
                "rings aimed at {} through BAR0 {}: Ally refused them (reason protected: {}), canary intact",
                m.fields.get("target").unwrap_or("?"),
                m.fields.get("bar").unwrap_or("?"),
                seen.join(", ")
            ))
        })(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{eicar_contents, file_contents, sha256_hex, ServedFile, UploadRecord};
    use ally_dpi::engine::{Direction, Engine, Inspector, MgmtWriter, Timestamp, Verdict};

    const PORTS: InspectPorts = InspectPorts {
        http: 40001,
        inspect_drop: 40002,
        upload: 40003,
        storm: 40004,
    };

    /// Ethernet + IPv4 + TCP (checksums zero: the engine does not verify them).
    fn tcp_frame(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x55, 10, 0, 2, 2, 0x08, 0x00,
        ];
        let total = (20 + 20 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 2, 2, 10, 0, 2, 15]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Ethernet + IPv4 + UDP from the guest (checksums zero).
    fn udp_frame(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x52, 0x55, 10, 0, 2, 2, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00,
        ];
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// The rules file, compiled with this run's kind of variables file, gives the verdicts and
    /// sids the checks expect, port by port.
    #[test]
    fn rules_file_matches_the_checks() {
        let ws = crate::run::workspace_root();
        let text = fs::read_to_string(rules_path(&ws)).unwrap();
        let vars = ally_tools::compile::vars(Some(&PORTS.vars_text())).unwrap();
        let c = ally_tools::compile::compile(&text, &vars).unwrap();
        assert!(c.parsed.rejected.is_empty(), "{:?}", c.parsed.rejected);
        // As Ally builds it: stream tracking and reassembly on.
        let keys = ally_dpi::rules_module::TableKeys {
            stream: [1, 2],
            defrag: [3, 4],
            flows: [5, 6],
        };
        let mut engine =
            Engine::from_blob(&c.blob, ally_dpi::rules_module::engine_config(keys)).unwrap();
        let mut gz_response =
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for chunk in crate::endpoints::eicar_gzip().chunks(crate::endpoints::GZIP_CHUNK) {
            gz_response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            gz_response.extend_from_slice(chunk);
            gz_response.extend_from_slice(b"\r\n");
        }
        gz_response.extend_from_slice(b"0\r\n\r\n");
        let eicar = eicar_contents(1, 1 << 20);
        let seg = &eicar[..1460];
        let benign = file_contents(1, "big", 1460);
        let mut upload = benign[..500].to_vec();
        upload.extend_from_slice(FORBIDDEN_UPLOAD.as_bytes());
        type Case<'a> = (&'a str, Vec<u8>, Direction, Verdict, Option<(u64, &'a str)>);
        let cases: [Case; 11] = [
            (
                "eicar from the drop port",
                tcp_frame(40002, 5555, seg),
                Direction::FromWire,
                Verdict::Drop,
                Some((SID_DROP, "blocked")),
            ),
            (
                "eicar from the alert port",
                tcp_frame(40001, 5555, seg),
                Direction::FromWire,
                Verdict::Alert,
                Some((SID_ALERT, "allowed")),
            ),
            (
                "eicar from another port",
                tcp_frame(40009, 5555, seg),
                Direction::FromWire,
                Verdict::Pass,
                None,
            ),
            (
                "benign from the drop port",
                // Another connection: the drop above blocked the first one's flow.
                tcp_frame(40002, 5558, &benign),
                Direction::FromWire,
                Verdict::Pass,
                None,
            ),
            (
                "marker to the upload port",
                tcp_frame(5555, 40003, &upload),
                Direction::ToWire,
                Verdict::Drop,
                Some((SID_UPLOAD, "blocked")),
            ),
            (
                "marker to another port",
                tcp_frame(5555, 40001, &upload),
                Direction::ToWire,
                Verdict::Pass,
                None,
            ),
            (
                "alert storm datagram to the storm port",
                udp_frame(40000, 40004, b"ALLY-ALERT-STORM seq=000001"),
                Direction::ToWire,
                Verdict::Alert,
                Some((SID_STORM, "allowed")),
            ),
            (
                "gzipped chunked EICAR from the drop port",
                tcp_frame(40002, 5556, &gz_response),
                Direction::FromWire,
                Verdict::Drop,
                Some((SID_GZIP, "blocked")),
            ),
            (
                "gzipped chunked EICAR from the alert port",
                tcp_frame(40001, 5557, &gz_response),
                Direction::FromWire,
                Verdict::Pass,
                None,
            ),
            (
                "fragmented-secret datagram to the storm port",
                udp_frame(40000, 40004, b"FRAG seq=001 ALLY-FRAGMENTED-SECRET"),
                Direction::ToWire,
                Verdict::Drop,
                Some((1_000_105, "blocked")),
            ),
            (
                "alert storm datagram to another port",
                udp_frame(40000, 40003, b"ALLY-ALERT-STORM seq=000001"),
                Direction::ToWire,
                Verdict::Pass,
                None,
            ),
        ];
        for (i, (what, frame, dir, verdict, alert)) in cases.into_iter().enumerate() {
            let mut sink = MgmtWriter::new(String::new());
            let v = engine.inspect(
                &frame,
                dir,
                Timestamp(1_000_000 * (i as u64 + 1)),
                &mut sink,
            );
            assert_eq!(v, verdict, "{what}");
            let out = sink.out;
            let alerts: Vec<EveAlert> = out
                .lines()
                .filter_map(|l| l.strip_prefix("ALLY eve "))
                .map(|j| parse_eve_alert(j).unwrap())
                .collect();
            match alert {
                Some((sid, action)) => {
                    assert_eq!(alerts.len(), 1, "{what}: {out}");
                    assert_eq!(
                        (alerts[0].sid, alerts[0].action.as_str()),
                        (sid, action),
                        "{what}"
                    );
                }
                None => assert!(alerts.is_empty(), "{what}: {out}"),
            }
        }
    }

    #[test]
    fn eve_alerts_parse_and_bad_ones_are_named() {
        let a = parse_eve_alert(r#"{"timestamp":"x","event_type":"alert","src_ip":"10.0.2.2","src_port":80,"dest_ip":"10.0.2.15","dest_port":5,"proto":"TCP","direction":"from_wire","alert":{"action":"blocked","gid":1,"signature_id":1000101,"rev":1,"signature":"a \"q\" }"}}"#).unwrap();
        assert_eq!(
            a,
            EveAlert {
                sid: SID_DROP,
                action: "blocked".into(),
                direction: "from_wire".into(),
                src_port: Some(80),
                dest_port: Some(5),
            }
        );
        assert!(parse_eve_alert("{\"event_type\":\"alert\"")
            .unwrap_err()
            .starts_with("not JSON"));
        assert_eq!(
            parse_eve_alert(
                r#"{"event_type":"alert","direction":"to_wire","alert":{"action":"allowed"}}"#
            )
            .unwrap_err(),
            r#"no numeric alert.signature_id: {"event_type":"alert","direction":"to_wire","alert":{"action":"allowed"}}"#
        );
    }

    fn eve(sid: u64, action: &str, dir: &str) -> String {
        format!(
            r#"[cpu1 INFO] ALLY eve {{"event_type":"alert","direction":"{dir}","alert":{{"action":"{action}","signature_id":{sid}}}}}"#
        )
    }

    fn net() -> NetReport {
        NetReport {
            files: vec![
                ServedFile {
                    name: "eicar".into(),
                    bytes: 4096,
                    sha256: "e1".into(),
                },
                ServedFile {
                    name: "eicar-gz".into(),
                    bytes: 150,
                    sha256: "g1".into(),
                },
            ],
            uploads: vec![UploadRecord {
                peer: "x".into(),
                bytes: 1001,
                sha256: sha256_hex(b"x"),
                complete: false,
                seconds: 1.0,
                error: Some("cut after 1001 bytes: the run ended".into()),
                forbidden: false,
            }],
            ..NetReport::default()
        }
    }

    const GUEST: &str = "\
ALLYTEST inspect-drop INFO port=2 bytes=1000 sha256=aa rc=143 seconds=20.00
ALLYTEST inspect-alert INFO port=1 bytes=4096 sha256=e1 rc=0 seconds=9.00
ALLYTEST inspect-upload INFO port=3 bytes=5000 sha256=up host_bytes=none host_sha256=none rc=143 seconds=20.00
ALLYTEST inspect-gzip INFO port=2 bytes=0 sha256=none rc=143 seconds=10.00
";

    fn judge(guest: &str, com2: &str) -> Vec<Check> {
        let dir = std::env::temp_dir().join(format!(
            "ally-inspect-test-{}-{}",
            std::process::id(),
            sha256_hex(com2.as_bytes())
        ));
        fs::create_dir_all(&dir).unwrap();
        let split = split_com2(com2, &dir);
        let c = inspect_checks(&GuestReport::parse(guest), &net(), &split);
        fs::remove_dir_all(&dir).unwrap();
        c
    }

    fn failed(c: &[Check]) -> Vec<&'static str> {
        c.iter().filter(|c| !c.passed).map(|c| c.name).collect()
    }

    fn good_com2() -> String {
        [
            eve(SID_DROP, "blocked", "from_wire"),
            eve(SID_ALERT, "allowed", "from_wire"),
            eve(SID_UPLOAD, "blocked", "to_wire"),
            eve(SID_GZIP, "blocked", "from_wire"),
            "ALLY pcap 1000 from_wire 1514 0011aabb".into(),
            "ALLY poweroff".into(),
        ]
        .join("\n")
    }

    #[test]
    fn a_good_inspection_passes() {
        let c = judge(GUEST, &good_com2());
        assert_eq!(failed(&c), Vec::<&str>::new(), "{c:#?}");
        assert!(
            c[0].detail.starts_with("4 alert records -> "),
            "{}",
            c[0].detail
        );
        assert_eq!(
            c[1].detail,
            "the guest got 1000 of 4096 B (rc=143), not the served file; 1 EVE alert(s) sid 1000101 action=blocked direction=from_wire"
        );
    }

    #[test]
    fn inspection_failures_are_named() {
        // The drop port's download arrived intact.
        let g = GUEST.replace("bytes=1000 sha256=aa", "bytes=4096 sha256=e1");
        assert_eq!(failed(&judge(&g, &good_com2())), ["inspect-drop"]);
        // The alert port's download was cut.
        let g = GUEST.replace("bytes=4096 sha256=e1 rc=0", "bytes=4000 sha256=e1 rc=0");
        assert_eq!(failed(&judge(&g, &good_com2())), ["inspect-alert"]);
        // The host echoed the whole upload.
        let g = GUEST.replace("host_bytes=none", "host_bytes=5000");
        assert_eq!(failed(&judge(&g, &good_com2())), ["inspect-upload"]);
        // The gzipped file arrived intact, or without Ally's decoded-body alert.
        let g = GUEST.replace(
            "bytes=0 sha256=none rc=143 seconds=10",
            "bytes=150 sha256=g1 rc=0 seconds=1",
        );
        assert_eq!(failed(&judge(&g, &good_com2())), ["inspect-gzip"]);
        let com2 = good_com2().replace(&eve(SID_GZIP, "blocked", "from_wire"), "");
        assert_eq!(failed(&judge(GUEST, &com2)), ["inspect-gzip"]);
        // An alert with the wrong action or direction does not count.
        let com2 = good_com2().replace(
            &eve(SID_DROP, "blocked", "from_wire"),
            &eve(SID_DROP, "allowed", "from_wire"),
        );
        let c = judge(GUEST, &com2);
        assert_eq!(failed(&c), ["inspect-drop"]);
        assert!(
            c[1].detail
                .ends_with("(alerts of that sid: allowed/from_wire)"),
            "{}",
            c[1].detail
        );
        let com2 = good_com2().replace(
            &eve(SID_UPLOAD, "blocked", "to_wire"),
            &eve(SID_UPLOAD, "blocked", "from_wire"),
        );
        assert_eq!(failed(&judge(GUEST, &com2)), ["inspect-upload"]);
        // No dropped frame in the pcap.
        let com2 = good_com2().replace("ALLY pcap 1000 from_wire 1514 0011aabb", "");
        let c = judge(GUEST, &com2);
        assert_eq!(failed(&c), ["eve-pcap"]);
        // A broken management line fails every inspection check, naming it.
        let com2 = good_com2() + "\nALLY pcap 1 sideways 60 00";
        let c = judge(GUEST, &com2);
        assert_eq!(failed(&c).len(), 5);
        assert_eq!(
            c[0].detail,
            "COM2 management stream: line 7: ALLY pcap line: missing or bad direction"
        );
        // A missing marker.
        let c = judge(&GUEST.replace("inspect-alert", "x"), &good_com2());
        assert_eq!(c[2].detail, "no `ALLYTEST inspect-alert` marker");
    }

    const RING_COM2: &str = "\
ALLY nic-tx-drop reason=verdict packets=3 ring-stops=0
ALLY nic-tx-drop reason=protected packets=0 ring-stops=1
ALLY nic-rx-drop reason=protected packets=0 ring-stops=2
ALLY canary status=intact
";
    const RING_GUEST: &str =
        "ALLYTEST ring-attack INFO bar=0x00000000febc0000 target=0x3c000000 rx=OK tx=OK\n";

    fn ring(guest: &str, com2: &str) -> Check {
        ring_attack_check(&GuestReport::parse(guest), &AllyReport::parse(com2))
    }

    #[test]
    fn ring_attack_needs_both_rings_stopped_and_the_canary() {
        let c = ring(RING_GUEST, RING_COM2);
        assert!(c.passed, "{c}");
        assert_eq!(c.detail, "rings aimed at 0x3c000000 through BAR0 0x00000000febc0000: Ally refused them (reason protected: rx ring-stops=2, tx ring-stops=1), canary intact");
        let c = ring(
            RING_GUEST,
            &RING_COM2.replace(
                "ALLY nic-rx-drop reason=protected packets=0 ring-stops=2\n",
                "",
            ),
        );
        assert_eq!(
            c.detail,
            "no `ALLY nic-rx-drop reason=protected ...` line: Ally did not refuse the rx ring"
        );
        let c = ring(
            RING_GUEST,
            &RING_COM2.replace(
                "protected packets=0 ring-stops=1",
                "protected packets=0 ring-stops=0",
            ),
        );
        assert!(
            !c.passed && c.detail.starts_with("Ally stopped no tx ring"),
            "{c}"
        );
        let c = ring(RING_GUEST, &RING_COM2.replace("intact", "damaged"));
        assert_eq!(c.detail, "ALLY canary status=damaged");
        let c = ring(&RING_GUEST.replace("tx=OK", "tx=FAIL"), RING_COM2);
        assert!(
            !c.passed
                && c.detail
                    .starts_with("the guest's devmem writes to the tx ring"),
            "{c}"
        );
        let c = ring(
            "ALLYTEST ring-attack INFO skipped=no_probe_address_or_no_nic\n",
            RING_COM2,
        );
        assert_eq!(
            c.detail,
            "the guest did not attack: no_probe_address_or_no_nic"
        );
    }
}
