//! What the wire carried: Bochs' slirp packet log (`pktlog` in the slirp config), which records
//! every frame the emulated NIC sent to slirp and every frame slirp handed to the NIC.
//!
//! The log is text: a `a packet from guest to host, length N` (or `host to guest`) line per
//! frame, followed by a hex dump. Only the header lines are read.

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

impl WireCounts {
    /// Counts the frames of a slirp packet log.
    pub fn from_log(path: &Path) -> std::io::Result<WireCounts> {
        let mut counts = WireCounts::default();
        for line in BufReader::new(File::open(path)?).lines() {
            counts.add_line(&line?);
        }
        Ok(counts)
    }

    fn add_line(&mut self, line: &str) {
        let length = |rest: &str| rest.trim().parse::<u64>().unwrap_or(0);
        if let Some(rest) = line.strip_prefix(TO_HOST) {
            self.to_host_frames += 1;
            self.to_host_bytes += length(rest);
        } else if let Some(rest) = line.strip_prefix(TO_GUEST) {
            self.to_guest_frames += 1;
            self.to_guest_bytes += length(rest);
        }
    }

    /// Counts from log text (tests).
    pub fn from_text(text: &str) -> WireCounts {
        let mut counts = WireCounts::default();
        for line in text.lines() {
            counts.add_line(line);
        }
        counts
    }
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
}
