//! What the wire carried: Bochs' slirp packet log (`pktlog` in the slirp config), which records
//! every frame the emulated NIC sent to slirp and every frame slirp handed to the NIC.
//!
//! The log is text: a `a packet from guest to host, length N` (or `host to guest`) line per
//! frame, followed by a hex dump (16 bytes a line, then the bytes as characters). Frame counts
//! come from the header lines; the guest's frames are also decoded and searched for payloads
//! that must never reach the wire (the attacks' markers, the content of a `drop` rule) and
//! for 802.3x PAUSE frames.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Frame counts and bytes per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireCounts {
    /// Frames the NIC transmitted (guest to host).
    pub to_host_frames: u64,
    pub to_host_bytes: u64,
    /// Frames slirp delivered to the NIC (host to guest).
    pub to_guest_frames: u64,
    pub to_guest_bytes: u64,
}

const TO_HOST: &str = "a packet from guest to host, length ";
const TO_GUEST: &str = "a packet from host to guest, length ";

/// The MAC Control EtherType of PAUSE frames (IEEE 802.3 Annex 31B), which the guest could
/// make the NIC send with TCTL.SWXOFF.
pub const ETHERTYPE_MAC_CONTROL: u16 = 0x8808;

/// Payloads that must not appear in any frame the guest's NIC put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    /// What the payload is (for the report), and its bytes.
    pub needles: Vec<(String, Vec<u8>)>,
}

/// The guest's frames that carried a forbidden payload, per needle, and its PAUSE frames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireFindings {
    pub counts: WireCounts,
    /// `(name, frames that contain it)`, in the order of [`Forbidden::needles`].
    pub hits: Vec<(String, u64)>,
    pub pause_frames: u64,
}

impl WireFindings {
    /// Nothing forbidden left the guest.
    pub fn clean(&self) -> bool {
        self.pause_frames == 0 && self.hits.iter().all(|(_, n)| *n == 0)
    }
}

impl Forbidden {
    /// What an Ally run must keep off the wire: the TUCSO attack's marker (its frame is
    /// dropped, never sent with a checksum in its payload) and, when the run's inspection
    /// rules are loaded, the upload marker their `drop` rule matches.
    pub fn of_run(inspection: bool) -> Forbidden {
        let mut needles = vec![(
            "tucso-marker".to_string(),
            crate::endpoints::TUCSO_MARKER.to_vec(),
        )];
        if inspection {
            needles.push((
                "dropped-upload-marker".to_string(),
                crate::inspect::FORBIDDEN_UPLOAD.as_bytes().to_vec(),
            ));
        }
        Forbidden { needles }
    }
}

/// `wire-clean`: no frame the guest's NIC sent carried a forbidden payload or was a PAUSE
/// frame (issue 11: nothing uninspected reaches the wire).
pub fn wire_clean_check(findings: &WireFindings) -> crate::checks::Check {
    let mut parts: Vec<String> = findings
        .hits
        .iter()
        .map(|(name, n)| format!("{name} in {n} frame(s)"))
        .collect();
    parts.push(format!("PAUSE frames {}", findings.pause_frames));
    crate::checks::Check::new(
        "wire-clean",
        findings.clean(),
        format!(
            "{} of the guest's {} frames on the wire (slirp's packet log): {}",
            if findings.clean() {
                "none"
            } else {
                "FORBIDDEN in some"
            },
            findings.counts.to_host_frames,
            parts.join(", ")
        ),
    )
}

/// Reads the log once: counts every frame and searches the guest's frames.
struct Scanner<'a> {
    forbidden: &'a Forbidden,
    findings: WireFindings,
    /// The guest frame being read (`None` inside a host frame or before the first header).
    frame: Option<Vec<u8>>,
}

impl<'a> Scanner<'a> {
    fn new(forbidden: &'a Forbidden) -> Self {
        Scanner {
            forbidden,
            findings: WireFindings {
                hits: forbidden
                    .needles
                    .iter()
                    .map(|(n, _)| (n.clone(), 0))
                    .collect(),
                ..WireFindings::default()
            },
            frame: None,
        }
    }

    fn line(&mut self, line: &str) {
        let length = |rest: &str| rest.trim().parse::<u64>().unwrap_or(0);
        if let Some(rest) = line.strip_prefix(TO_HOST) {
            self.end_frame();
            let counts = &mut self.findings.counts;
            counts.to_host_frames += 1;
            counts.to_host_bytes += length(rest);
            self.frame = Some(Vec::new());
        } else if let Some(rest) = line.strip_prefix(TO_GUEST) {
            self.end_frame();
            let counts = &mut self.findings.counts;
            counts.to_guest_frames += 1;
            counts.to_guest_bytes += length(rest);
        } else if line.starts_with("--") {
            self.end_frame();
        } else if let Some(frame) = &mut self.frame {
            // `ff ff 00 ..  text`: up to 16 hex bytes, two spaces, the characters.
            let hex = line.split("  ").next().unwrap_or("");
            frame.extend(
                hex.split_ascii_whitespace()
                    .filter_map(|b| u8::from_str_radix(b, 16).ok()),
            );
        }
    }

    fn end_frame(&mut self) {
        let Some(frame) = self.frame.take() else {
            return;
        };
        if frame.len() >= 14 && u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE_MAC_CONTROL
        {
            self.findings.pause_frames += 1;
        }
        for ((_, needle), (_, hits)) in self
            .forbidden
            .needles
            .iter()
            .zip(self.findings.hits.iter_mut())
        {
            if !needle.is_empty() && frame.windows(needle.len()).any(|w| w == needle.as_slice()) {
                *hits += 1;
            }
        }
    }

    fn finish(mut self) -> WireFindings {
        self.end_frame();
        self.findings
    }
}

impl WireCounts {
    /// Counts the frames of a slirp packet log.
    pub fn from_log(path: &Path) -> std::io::Result<WireCounts> {
        scan_log(
            path,
            &Forbidden {
                needles: Vec::new(),
            },
        )
        .map(|f| f.counts)
    }

    /// Counts from log text (tests).
    pub fn from_text(text: &str) -> WireCounts {
        scan_text(
            text,
            &Forbidden {
                needles: Vec::new(),
            },
        )
        .counts
    }
}

/// Counts the frames of a slirp packet log and searches the guest's for `forbidden`.
pub fn scan_log(path: &Path, forbidden: &Forbidden) -> std::io::Result<WireFindings> {
    let mut scanner = Scanner::new(forbidden);
    for line in BufReader::new(File::open(path)?).lines() {
        scanner.line(&line?);
    }
    Ok(scanner.finish())
}

/// [`scan_log`] of log text (tests).
pub fn scan_text(text: &str, forbidden: &Forbidden) -> WireFindings {
    let mut scanner = Scanner::new(forbidden);
    for line in text.lines() {
        scanner.line(line);
    }
    scanner.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_frames_by_direction_and_ignores_dumps() {
        let log = "slirp packetmover readable log file\n--\n\
            a packet from guest to host, length 90\n33 33 00 00  33..\n--\n\
            a packet from host to guest, length 64\n52 54 00 12\n--\n\
            a packet from guest to host, length 60\nff ff\n";
        assert_eq!(
            WireCounts::from_text(log),
            WireCounts {
                to_host_frames: 2,
                to_host_bytes: 150,
                to_guest_frames: 1,
                to_guest_bytes: 64
            }
        );
    }

    #[test]
    fn finds_forbidden_payloads_and_pause_frames_in_guest_frames_only() {
        let log = "slirp packetmover readable log file\n--\n\
            a packet from guest to host, length 20\n\
            01 80 c2 00 00 01 52 54 00 12 34 56 88 08 00 01  ......RT..4V....\n\
            ff ff 41 42                                      ..AB\n\
            --\n\
            a packet from host to guest, length 20\n\
            52 54 00 12 34 56 52 55 0a 00 02 02 08 00 41 42  RT..4VRU......AB\n\
            43 44 00 00                                      CD..\n\
            --\n\
            a packet from guest to host, length 20\n\
            52 55 0a 00 02 02 52 54 00 12 34 56 08 00 00 41  RU....RT..4V...A\n\
            42 43 44 00                                      BCD.\n";
        let forbidden = Forbidden {
            needles: vec![
                ("abcd".into(), b"ABCD".to_vec()),
                ("xyz".into(), b"XYZ".to_vec()),
            ],
        };
        let f = scan_text(log, &forbidden);
        assert_eq!(f.counts.to_host_frames, 2);
        assert_eq!(f.counts.to_guest_frames, 1);
        // "ABCD" across the dump's line break of the second guest frame; the host frame's
        // copy does not count.
        assert_eq!(f.hits, [("abcd".to_string(), 1), ("xyz".to_string(), 0)]);
        assert_eq!(f.pause_frames, 1);
        assert!(!f.clean());
        let none = scan_text(
            "a packet from guest to host, length 2\n00 11  ..\n",
            &forbidden,
        );
        assert!(none.clean());
    }
}
