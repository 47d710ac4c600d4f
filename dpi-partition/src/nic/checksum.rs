//! Checksum normalization (issue 12): a frame whose IPv4 header checksum or TCP/UDP checksum
//! is wrong never reaches its receiver's stack. A router or the receiver's IP layer discards
//! it (RFC 1812 §5.2.2, RFC 1122 §3.2.1.2), its TCP or UDP layer discards it (RFC 9293 §3.10.7,
//! RFC 1122 §4.1.3.4). An inspector that takes such a frame into its flow state sees what
//! the endpoint never does: an RST or FIN that ends its view of a flow the endpoint keeps
//! (the split payload around it then matches nothing), or data that the endpoint later
//! receives differently. Whoever can put a frame on the wire can do that: the guest, and on
//! receive any host that knows a flow's addresses and sequence numbers.
//!
//! So the queue engine drops such frames before the hook sees them (`DropReason::Checksum`)
//! and counts them: what Ally inspects is only what a receiver takes. The checksums the
//! device writes after inspection (the guest's TX offload, [`Inserted`]) are not checked,
//! since the frame's own values there are not what the wire carries. Frames the checks cannot
//! judge pass to the engine unchanged: not IP, fragments (the L4 checksum covers the whole
//! datagram, which the engine reassembles), an IP length that does not fit the frame (the
//! engine's decoder judges those), IPv6 with a routing header, and UDP without a checksum (0).

use super::offload::{Headers, Inserted};
use crate::engine::packet::{fold, ones_sum};
use core::fmt;

/// Which checksum of a frame is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumError {
    /// The IPv4 header checksum (RFC 791).
    Ipv4Header,
    /// The TCP checksum over the pseudo-header and the segment (RFC 9293 §3.1).
    Tcp,
    /// A nonzero UDP checksum over the pseudo-header and the datagram (RFC 768).
    Udp,
}

impl fmt::Display for ChecksumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4Header => "wrong IPv4 header checksum",
            Self::Tcp => "wrong TCP checksum",
            Self::Udp => "wrong UDP checksum",
        })
    }
}

/// Checks the checksums of the Ethernet `frame` that the device does not write itself
/// (`inserted`).
pub fn verify(frame: &[u8], inserted: Inserted) -> Result<(), ChecksumError> {
    verify_parsed(frame, Headers::parse(frame).as_ref(), inserted)
}

/// [`verify`] with the frame's headers already parsed (the offload check parsed them).
pub(super) fn verify_parsed(
    frame: &[u8],
    headers: Option<&Headers>,
    inserted: Inserted,
) -> Result<(), ChecksumError> {
    let Some(h) = headers else {
        return Ok(());
    };
    let ip = usize::from(h.ip);
    if h.ipv4 && !inserted.ip && fold(ones_sum(&frame[ip..usize::from(h.ip_end)], 0)) != 0xffff {
        return Err(ChecksumError::Ipv4Header);
    }
    let Some(l4) = h.l4 else {
        return Ok(());
    };
    if inserted.l4 || h.routed {
        return Ok(());
    }
    let (end, addresses) = if h.ipv4 {
        (ip + be16(frame, ip + 2), ip + 12..ip + 20)
    } else {
        (ip + 40 + be16(frame, ip + 4), ip + 8..ip + 40)
    };
    let start = usize::from(l4.start);
    if end < start + usize::from(l4.len) || end > frame.len() {
        return Ok(());
    }
    let mut segment = &frame[start..end];
    if !l4.tcp {
        if be16(segment, 6) == 0 {
            // No checksum (IPv4); IPv6 requires one (RFC 8200 §8.1) but receivers configured
            // for tunnels accept zero (RFC 6935): the engine sees what such a receiver takes.
            return Ok(());
        }
        // The datagram is the UDP length's bytes: a receiver sums those and trims the rest
        // (RFC 768). A length beyond the IP payload is malformed: the engine's decoder judges.
        let udp_len = be16(segment, 4);
        if udp_len < 8 || udp_len > segment.len() {
            return Ok(());
        }
        segment = &segment[..udp_len];
    }
    let proto: u64 = if l4.tcp { 6 } else { 17 };
    let pseudo = ones_sum(&frame[addresses], proto + segment.len() as u64);
    if fold(ones_sum(segment, pseudo)) == 0xffff {
        Ok(())
    } else if l4.tcp {
        Err(ChecksumError::Tcp)
    } else {
        Err(ChecksumError::Udp)
    }
}

/// The 16-bit big-endian value at `at` (callers check the bounds).
fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packet::build;
    use crate::nic::offload::fill_checksums;
    use alloc::vec::Vec;

    fn ip(s: &str) -> core::net::IpAddr {
        s.parse().unwrap()
    }

    /// A TCP/IPv4 frame with `flags` and correct checksums.
    fn tcp4(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = build::frame(
            ip("10.0.2.15"),
            ip("10.0.2.2"),
            6,
            &build::tcp(40000, 80, flags),
            payload,
        );
        fill_checksums(&mut f);
        f
    }

    #[test]
    fn correct_frames_pass_and_each_wrong_checksum_is_named() {
        let good = tcp4(0x18, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(verify(&good, Inserted::NONE), Ok(()));
        let mut bad_ip = good.clone();
        bad_ip[14 + 10] ^= 0x5a;
        assert_eq!(
            verify(&bad_ip, Inserted::NONE),
            Err(ChecksumError::Ipv4Header)
        );
        // A wrong IPv4 header is judged before the segment.
        bad_ip[14 + 20 + 16] ^= 1;
        assert_eq!(
            verify(&bad_ip, Inserted::NONE),
            Err(ChecksumError::Ipv4Header)
        );
        let mut bad_tcp = good.clone();
        let last = bad_tcp.len() - 1;
        bad_tcp[last] ^= 0x01;
        assert_eq!(verify(&bad_tcp, Inserted::NONE), Err(ChecksumError::Tcp));
        // The device writes them: whatever the frame holds there passes.
        assert_eq!(
            verify(
                &bad_tcp,
                Inserted {
                    ip: false,
                    l4: true
                }
            ),
            Ok(())
        );
        let mut both = bad_tcp.clone();
        both[14 + 10] ^= 0x5a;
        assert_eq!(verify(&both, Inserted::ALL), Ok(()));
        assert_eq!(
            verify(
                &both,
                Inserted {
                    ip: true,
                    l4: false
                }
            ),
            Err(ChecksumError::Tcp)
        );
    }

    #[test]
    fn an_exact_rst_with_a_broken_header_is_refused() {
        // The rst-split attack's RST: valid TCP checksum, broken IPv4 header checksum.
        let mut rst = tcp4(0x14, b"");
        assert_eq!(verify(&rst, Inserted::NONE), Ok(()));
        rst[24] ^= 0x5a;
        assert_eq!(verify(&rst, Inserted::NONE), Err(ChecksumError::Ipv4Header));
    }

    #[test]
    fn udp_over_both_ip_versions_and_udp_without_a_checksum() {
        for (src, dst) in [("10.0.2.15", "10.0.2.2"), ("fe80::1", "fe80::2")] {
            let payload = b"\x12\x34 some query bytes";
            let mut f = build::frame(
                ip(src),
                ip(dst),
                17,
                &build::udp(5353, 53, payload.len()),
                payload,
            );
            fill_checksums(&mut f);
            assert_eq!(verify(&f, Inserted::NONE), Ok(()), "{src}");
            let l4 = if src.contains(':') { 14 + 40 } else { 14 + 20 };
            let sum = [f[l4 + 6], f[l4 + 7]];
            let last = f.len() - 1;
            f[last] ^= 0x80;
            assert_eq!(verify(&f, Inserted::NONE), Err(ChecksumError::Udp), "{src}");
            // Bytes after the UDP length are not the datagram's.
            f[last] ^= 0x80;
            let mut trailing = f.clone();
            let plen = if src.contains(':') { 18 } else { 16 };
            let ip_len = u16::from_be_bytes([trailing[plen], trailing[plen + 1]]) + 3;
            trailing[plen..plen + 2].copy_from_slice(&ip_len.to_be_bytes());
            if !src.contains(':') {
                trailing[24..26].fill(0);
                let sum = crate::engine::packet::internet_checksum(&trailing[14..34]);
                trailing[24..26].copy_from_slice(&sum.to_be_bytes());
            }
            trailing.extend([1, 2, 3]);
            assert_eq!(verify(&trailing, Inserted::NONE), Ok(()), "{src}");
            f[last] ^= 0x80;
            // 0: no checksum.
            f[l4 + 6..l4 + 8].fill(0);
            assert_eq!(verify(&f, Inserted::NONE), Ok(()), "{src}");
            assert_ne!(sum, [0, 0]);
        }
    }

    #[test]
    fn frames_the_checks_cannot_judge_pass_to_the_engine() {
        // Not IP (ARP), truncated below the IP length, a later fragment.
        let mut arp = alloc::vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(verify(&arp, Inserted::NONE), Ok(()));
        let mut cut = tcp4(0x18, b"0123456789");
        let last = cut.len() - 1;
        cut[last] ^= 1;
        cut.truncate(cut.len() - 4);
        assert_eq!(verify(&cut, Inserted::NONE), Ok(()));
        let mut frag = tcp4(0x18, b"0123456789");
        frag[14 + 6] = 0x20; // MF
        frag[14 + 10..14 + 12].fill(0);
        let sum = crate::engine::packet::internet_checksum(&frag[14..34]);
        frag[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
        let last = frag.len() - 1;
        frag[last] ^= 1;
        assert_eq!(verify(&frag, Inserted::NONE), Ok(()));
        // Ethernet padding after the IP length is not summed.
        let mut padded = tcp4(0x18, b"x");
        padded.extend([0xee; 9]);
        assert_eq!(verify(&padded, Inserted::NONE), Ok(()));
    }
}
