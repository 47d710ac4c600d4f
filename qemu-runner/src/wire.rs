//! What the wire carried, from either capture a run has:
//!
//! - Bochs: slirp's packet log (`pktlog` in the slirp config), which records every frame the
//!   emulated NIC sent to slirp and every frame slirp handed to the NIC. The log is text: a
//!   `a packet from guest to host, length N` (or `host to guest`) line per frame, followed by
//!   a hex dump (16 bytes a line, then the bytes as characters).
//! - QEMU: two pcap files written by `-object filter-dump` on the e1000's netdev, one per
//!   direction (`queue=rx`: the NIC's transmissions; `queue=tx`: what slirp delivered to it),
//!   since pcap records no direction.
//!
//! Frames are counted per direction; the guest's frames are also searched for payloads that
//! must never reach the wire (the attacks' markers, the content of a `drop` rule) and for
//! 802.3x PAUSE frames.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::emulator::{Emulator, MachineFiles};

/// Frame counts and bytes per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireCounts {
    /// Frames the NIC transmitted (guest to host).
    pub to_host_frames: u64,
    pub to_host_bytes: u64,
    /// Frames slirp delivered to the NIC (host to guest).
    pub to_guest_frames: u64,
    pub to_guest_bytes: u64,
    /// Of those, multicast frames (not broadcast): the device takes them only where the
    /// guest's multicast filter (MTA, RCTL.MPE) lets it, and drops the others uncounted.
    /// Known from QEMU's pcaps; Bochs' packet log does not show frames to the guest.
    pub to_guest_multicast: u64,
}

const TO_HOST: &str = "a packet from guest to host, length ";
const TO_GUEST: &str = "a packet from host to guest, length ";

/// A frame's fingerprint as Ally computes it (`ally_dpi::nic::dpi::FINGERPRINT_BYTES`).
pub fn fingerprint(frame: &[u8]) -> u64 {
    use ally_dpi::nic::dpi::{fnv1a, FINGERPRINT_BYTES, FNV_OFFSET};
    fnv1a(FNV_OFFSET, &frame[..frame.len().min(FINGERPRINT_BYTES)])
}

impl WireFindings {
    /// Unicast and broadcast frames to the guest after the last one whose fingerprint is
    /// `last` (the last frame Ally received): the device received in wire order, so those
    /// came after Ally's final count. `None` when the capture has no such frame (or no frame
    /// bytes, as Bochs' log).
    pub fn frames_after(&self, last: u64) -> Option<u64> {
        let at = self.to_guest_frames.iter().rposition(|&(f, _)| f == last)?;
        Some(
            self.to_guest_frames[at + 1..]
                .iter()
                .filter(|&&(_, multicast)| !multicast)
                .count() as u64,
        )
    }
}

/// Whether `frame`'s destination is a multicast address other than the broadcast one (the
/// I/G bit of the first octet, IEEE 802-2014 8.2).
pub fn is_multicast(frame: &[u8]) -> bool {
    match frame.get(..6) {
        Some(dst) => dst[0] & 1 != 0 && dst != [0xFF; 6],
        None => false,
    }
}

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
    /// Each frame to the guest, in wire order, as `(fingerprint, multicast)`: FNV-1a 64 of
    /// its first 60 bytes, as Ally fingerprints the last frame it received
    /// (`ALLY nic-rx-last`). Only from QEMU's pcaps.
    pub to_guest_frames: Vec<(u64, bool)>,
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

/// Where a run's wire frames were recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// Bochs' slirp packet log (text, both directions).
    BochsPktlog(PathBuf),
    /// QEMU's `filter-dump` pcaps, one per direction.
    QemuPcap {
        from_guest: PathBuf,
        to_guest: PathBuf,
    },
}

impl Capture {
    /// The capture a run under `emulator` writes.
    pub fn of_run(emulator: Emulator, files: &MachineFiles) -> Capture {
        match emulator {
            Emulator::Bochs => Capture::BochsPktlog(files.pktlog.clone()),
            Emulator::QemuKvm | Emulator::QemuTcg => Capture::QemuPcap {
                from_guest: files.pcap_from_guest.clone(),
                to_guest: files.pcap_to_guest.clone(),
            },
        }
    }

    /// Counts the frames of both directions and searches the guest's for `forbidden`.
    pub fn scan(&self, forbidden: &Forbidden) -> std::io::Result<WireFindings> {
        match self {
            Capture::BochsPktlog(path) => scan_log(path, forbidden),
            Capture::QemuPcap {
                from_guest,
                to_guest,
            } => scan_pcaps(from_guest, to_guest, forbidden),
        }
    }
}

impl fmt::Display for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capture::BochsPktlog(p) => write!(f, "slirp's packet log {}", p.display()),
            Capture::QemuPcap {
                from_guest,
                to_guest,
            } => write!(
                f,
                "QEMU's filter-dump pcaps {} and {}",
                from_guest.display(),
                to_guest.display()
            ),
        }
    }
}

/// `wire-clean`: no frame the guest's NIC sent carried a forbidden payload or was a PAUSE
/// frame (issue 11: nothing uninspected reaches the wire).
pub fn wire_clean_check(findings: &WireFindings, capture: &Capture) -> crate::checks::Check {
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
            "{} of the guest's {} frames on the wire ({}): {}",
            if findings.clean() {
                "none"
            } else {
                "FORBIDDEN in some"
            },
            findings.counts.to_host_frames,
            match capture {
                Capture::BochsPktlog(_) => "slirp's packet log",
                Capture::QemuPcap { .. } => "QEMU's filter-dump pcap",
            },
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
        self.guest_frame(&frame);
    }

    /// Searches one frame the guest's NIC sent.
    fn guest_frame(&mut self, frame: &[u8]) {
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

/// The pcap link type of Ethernet frames.
pub const LINKTYPE_ETHERNET: u32 = 1;

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Reads `buf.len()` bytes, or returns `false` at a clean end of the file (no byte read).
fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(invalid(format!(
                    "truncated: {got} of {} bytes at the end",
                    buf.len()
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Calls `frame` with each record's captured bytes of a classic pcap stream (either byte
/// order, micro- or nanosecond timestamps; Ethernet only). A record cut short by the end of
/// the file (the emulator killed mid-write) ends the stream without an error.
pub fn read_pcap(mut r: impl Read, mut frame: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut head = [0u8; 24];
    if !read_exact_or_eof(&mut r, &mut head)? {
        return Err(invalid("empty file: no pcap header".into()));
    }
    let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let big_endian = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => false,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => true,
        0x0a0d_0d0a => return Err(invalid("pcapng, not classic pcap".into())),
        m => return Err(invalid(format!("not a pcap file (magic {m:#010x})"))),
    };
    let word = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let link_type = word(&head[20..24]);
    if link_type != LINKTYPE_ETHERNET {
        return Err(invalid(format!(
            "link type {link_type} is not Ethernet ({LINKTYPE_ETHERNET})"
        )));
    }
    let mut frames = 0;
    let mut data = Vec::new();
    loop {
        let mut rec = [0u8; 16];
        match read_exact_or_eof(&mut r, &mut rec) {
            Ok(true) => {}
            Ok(false) => return Ok(frames),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(frames),
            Err(e) => return Err(e),
        }
        let incl = word(&rec[8..12]) as usize;
        if incl > 1 << 18 {
            return Err(invalid(format!(
                "record {} claims {incl} captured bytes",
                frames + 1
            )));
        }
        data.resize(incl, 0);
        match read_exact_or_eof(&mut r, &mut data) {
            Ok(true) => {}
            Ok(false) if incl == 0 => {}
            Ok(false) => return Ok(frames),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(frames),
            Err(e) => return Err(e),
        }
        frame(&data);
        frames += 1;
    }
}

/// Counts the frames of QEMU's two pcaps and searches the guest's (`from_guest`) for
/// `forbidden`. Bytes are the captured lengths (QEMU captures whole frames).
pub fn scan_pcaps(
    from_guest: &Path,
    to_guest: &Path,
    forbidden: &Forbidden,
) -> std::io::Result<WireFindings> {
    let open = |p: &Path| {
        File::open(p)
            .map(BufReader::new)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let with_path = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    };
    let mut scanner = Scanner::new(forbidden);
    read_pcap(open(from_guest)?, |f| {
        scanner.findings.counts.to_host_frames += 1;
        scanner.findings.counts.to_host_bytes += f.len() as u64;
        scanner.guest_frame(f);
    })
    .map_err(with_path(from_guest))?;
    read_pcap(open(to_guest)?, |f| {
        let counts = &mut scanner.findings.counts;
        counts.to_guest_frames += 1;
        counts.to_guest_bytes += f.len() as u64;
        let multicast = is_multicast(f);
        if multicast {
            counts.to_guest_multicast += 1;
        }
        scanner
            .findings
            .to_guest_frames
            .push((fingerprint(f), multicast));
    })
    .map_err(with_path(to_guest))?;
    Ok(scanner.finish())
}

/// The bytes of a classic little-endian pcap (microseconds, Ethernet) holding `frames`
/// (tests; the same layout QEMU's filter-dump writes on x86).
pub fn pcap_bytes(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65536u32.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
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
                to_guest_bytes: 64,
                to_guest_multicast: 0
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

    fn frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x52, 0x55, 0x0a, 0, 2, 2, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn reads_pcap_records_in_either_byte_order() {
        let a = frame(0x0800, b"one");
        let b = frame(0x0806, b"second frame");
        let le = pcap_bytes(&[&a, &b]);
        let mut seen = Vec::new();
        assert_eq!(
            read_pcap(le.as_slice(), |f| seen.push(f.to_vec())).unwrap(),
            2
        );
        assert_eq!(seen, [a.clone(), b.clone()]);
        // The same file written big-endian (header words and record lengths swapped).
        let mut be = le.clone();
        let swap = |v: &mut Vec<u8>, at: usize| v[at..at + 4].reverse();
        for at in [0, 20] {
            swap(&mut be, at);
        }
        be[4..6].reverse();
        be[6..8].reverse();
        let mut at = 24;
        for f in [&a, &b] {
            for off in [0, 4, 8, 12] {
                swap(&mut be, at + off);
            }
            at += 16 + f.len();
        }
        let mut seen = Vec::new();
        assert_eq!(
            read_pcap(be.as_slice(), |f| seen.push(f.to_vec())).unwrap(),
            2
        );
        assert_eq!(seen, [a, b]);
    }

    #[test]
    fn pcap_errors_and_a_cut_last_record() {
        let err = |bytes: &[u8]| read_pcap(bytes, |_| {}).unwrap_err().to_string();
        assert_eq!(err(b""), "empty file: no pcap header");
        assert_eq!(
            err(&[
                0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]),
            "pcapng, not classic pcap"
        );
        assert_eq!(err(&[0u8; 24]), "not a pcap file (magic 0x00000000)");
        let mut raw_ip = pcap_bytes(&[]);
        raw_ip[20] = 101;
        assert_eq!(err(&raw_ip), "link type 101 is not Ethernet (1)");
        // An emulator killed mid-write leaves a partial record: the whole ones count.
        let mut cut = pcap_bytes(&[&frame(0x0800, b"whole"), &frame(0x0800, b"cut short")]);
        cut.truncate(cut.len() - 4);
        assert_eq!(read_pcap(cut.as_slice(), |_| {}).unwrap(), 1);
        assert_eq!(read_pcap(pcap_bytes(&[]).as_slice(), |_| {}).unwrap(), 0);
    }

    #[test]
    fn scans_qemu_pcaps_by_direction() {
        let dir = std::env::temp_dir().join(format!("ally-wire-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (dir.join("from.pcap"), dir.join("to.pcap"));
        let pause = frame(ETHERTYPE_MAC_CONTROL, &[0, 1, 0xff, 0xff]);
        let bad = frame(0x0800, b"..xxABCDyy..");
        let fine = frame(0x0800, b"hello");
        std::fs::write(&from, pcap_bytes(&[&pause, &bad, &fine])).unwrap();
        // A host frame with the needle does not count: only the guest's frames are searched.
        let host = frame(0x0800, b"ABCD from the host");
        std::fs::write(&to, pcap_bytes(&[&host])).unwrap();
        let forbidden = Forbidden {
            needles: vec![("abcd".into(), b"ABCD".to_vec())],
        };
        let capture = Capture::QemuPcap {
            from_guest: from.clone(),
            to_guest: to.clone(),
        };
        let f = capture.scan(&forbidden).unwrap();
        assert_eq!(
            f.counts,
            WireCounts {
                to_host_frames: 3,
                to_host_bytes: (pause.len() + bad.len() + fine.len()) as u64,
                to_guest_frames: 1,
                to_guest_bytes: host.len() as u64,
                to_guest_multicast: 0,
            }
        );
        assert_eq!(f.hits, [("abcd".to_string(), 1)]);
        assert_eq!(f.pause_frames, 1);
        let c = wire_clean_check(&f, &capture);
        assert!(!c.passed);
        assert!(
            c.detail.contains("(QEMU's filter-dump pcap)"),
            "{}",
            c.detail
        );
        std::fs::remove_file(&to).unwrap();
        let e = capture.scan(&forbidden).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", to.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_capture_follows_the_emulator() {
        let files = MachineFiles::in_dir(Path::new("/o"));
        assert_eq!(
            Capture::of_run(Emulator::Bochs, &files),
            Capture::BochsPktlog("/o/slirp-packets.log".into())
        );
        let q = Capture::of_run(Emulator::QemuTcg, &files);
        assert_eq!(
            q.to_string(),
            "QEMU's filter-dump pcaps /o/wire-from-guest.pcap and /o/wire-to-guest.pcap"
        );
        assert_eq!(Capture::of_run(Emulator::QemuKvm, &files), q);
    }

    #[test]
    fn multicast_is_the_group_bit_but_broadcast() {
        assert!(is_multicast(&[0x33, 0x33, 0, 0, 0, 1, 0x86, 0xdd]));
        assert!(is_multicast(&[0x01, 0x00, 0x5e, 0, 0, 0xfb]));
        assert!(!is_multicast(&[0xff; 14]));
        assert!(!is_multicast(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 8, 0]));
        assert!(!is_multicast(&[0x33, 0x33]));
    }

    #[test]
    fn frames_after_the_last_copy_of_allys_last_frame() {
        let findings = WireFindings {
            to_guest_frames: vec![
                (1, false),
                (2, false),
                (7, true),
                (2, false),
                (3, false),
                (9, true),
                (4, false),
            ],
            ..WireFindings::default()
        };
        // After the last copy of 2: frames 3 and 4 (the multicast one is counted apart).
        assert_eq!(findings.frames_after(2), Some(2));
        assert_eq!(findings.frames_after(4), Some(0));
        assert_eq!(findings.frames_after(5), None);
        assert_eq!(fingerprint(&[0u8; 100]), fingerprint(&[0u8; 60]));
        assert_ne!(fingerprint(&[0u8; 59]), fingerprint(&[0u8; 60]));
    }
}
