//! Frame decoding: Ethernet (+802.1Q/802.1ad tags), IPv4, IPv6 (extension headers skipped),
//! TCP, UDP, ICMP/ICMPv6, and the L4 payload. Frames come from the guest or the wire: every
//! length is checked and malformed frames decode to [`Decoded::NotIp`] or a header-only packet,
//! never a panic. IP length fields are used only when consistent: a zero length (TSO
//! super-frames, whose per-segment lengths the NIC fills in) or one past the end of the frame
//! makes the payload run to the end of the frame, so such frames are still inspected in full.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers (IANA).
pub mod ipproto {
    /// ICMP (RFC 792).
    pub const ICMP: u8 = 1;
    /// TCP (RFC 9293).
    pub const TCP: u8 = 6;
    /// UDP (RFC 768).
    pub const UDP: u8 = 17;
    /// ICMPv6 (RFC 4443).
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits (RFC 9293 §3.1).
pub mod tcpflags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// L4 header summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP ports, flags, sequence and acknowledgement numbers, the advertised window (as sent,
    /// unscaled) and the window-scale option's shift count (RFC 7323 §2, as sent: may exceed 14).
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        wscale: Option<u8>,
    },
    /// UDP ports.
    Udp { sport: u16, dport: u16 },
    /// ICMP or ICMPv6 type and code, and header bytes 4-7 (identifier and sequence number of
    /// echo messages).
    Icmp {
        v6: bool,
        itype: u8,
        code: u8,
        id: u16,
        seq: u16,
    },
    /// Other protocol, a non-first fragment, or a truncated L4 header.
    Other,
}

/// A decoded IP packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number of the L4 header (after IPv6 extension headers).
    pub proto: u8,
    /// L4 summary.
    pub l4: L4,
    /// Payload inspected by rules: after the L4 header, or the IP payload for [`L4::Other`].
    pub payload: &'a [u8],
    /// IP header fields used by `ttl`, `id`, `fragbits`.
    pub ip: IpFields,
    /// The frame's VLAN IDs ([`vlan_tags`]): part of a flow's identity, since the same
    /// addresses on two VLANs are two networks.
    pub vlans: u32,
}

/// IP header fields for the header rule options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpFields {
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 identification, or the IPv6 fragment header's identification (if present).
    pub id: Option<u32>,
    /// Fragment bits as `fragbits` names them: 0x4 reserved (R), 0x2 don't fragment (D), 0x1
    /// more fragments (M). IPv6 has only M (from a fragment header).
    pub frag_bits: u8,
}

impl Packet<'_> {
    /// Source and destination ports (0 for portless protocols).
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            _ => (0, 0),
        }
    }
}

/// Result of decoding a frame.
#[derive(Clone, Copy, Debug)]
pub enum Decoded<'a> {
    /// IPv4 or IPv6 packet.
    Ip(Packet<'a>),
    /// Not IP (ARP, LLDP, ...) or an IP header too short or inconsistent to use.
    NotIp,
}

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100; // IEEE 802.1Q
const ETHERTYPE_QINQ: u16 = 0x88a8; // IEEE 802.1ad

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The Internet checksum (RFC 1071) of `b`.
pub fn internet_checksum(b: &[u8]) -> u16 {
    !(fold(ones_sum(b, 0)) as u16)
}

/// Adds `b`'s 16-bit big-endian words (an odd last byte padded with zero) to `acc`, unfolded:
/// the one's-complement sum behind [`internet_checksum`], for sums over several pieces (a
/// pseudo-header and a segment). `b` starts at an even offset of the checksummed data.
///
/// Eight bytes at a time in the machine's byte order: the one's-complement sum does not
/// depend on byte order except for a swap of the folded result, and 2^16 is 1 modulo 0xffff,
/// so 32-bit halves summed into a u64 fold to the same 16 bits (RFC 1071 §2(B), §2(C)).
pub fn ones_sum(b: &[u8], acc: u64) -> u64 {
    let mut words = b.chunks_exact(8);
    let mut native = 0u64;
    for w in &mut words {
        let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        native += (w & 0xffff_ffff) + (w >> 32);
    }
    let swapped = (fold(native) as u16).to_be();
    let mut acc = acc + u64::from(swapped);
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an unfolded [`ones_sum`] to 16 bits with end-around carries: 0xffff for data that
/// includes its correct checksum.
pub fn fold(mut acc: u64) -> u64 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Ethernet header of `frame` past up to two VLAN tags (802.1ad outer, 802.1Q inner):
/// the ethertype after them, where the L3 header starts, and the VLAN IDs, the outer in bits
/// 12..24 when there are two, the tag count in bits 24..; `None` for a frame cut inside them.
pub fn vlan_tags(frame: &[u8]) -> Option<(u16, usize, u32)> {
    let mut ethertype = be16(frame, 12)?;
    let (mut l3, mut vlans) = (ETH_HDR, 0u32);
    for tags in 1..=2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        let (tci, t) = (be16(frame, l3)?, be16(frame, l3 + 2)?);
        vlans = (vlans << 12 | u32::from(tci & 0x0fff)) & 0x00ff_ffff | tags << 24;
        ethertype = t;
        l3 += 4;
    }
    Some((ethertype, l3, vlans))
}

/// Decodes an Ethernet frame.
pub fn decode(frame: &[u8]) -> Decoded<'_> {
    let Some((ethertype, off, vlans)) = vlan_tags(frame) else {
        return Decoded::NotIp;
    };
    let Some(l3) = frame.get(off..) else {
        return Decoded::NotIp;
    };
    let pkt = match ethertype {
        ETHERTYPE_IPV4 => decode_v4(l3),
        ETHERTYPE_IPV6 => decode_v6(l3),
        _ => None,
    };
    pkt.map_or(Decoded::NotIp, |p| Decoded::Ip(Packet { vlans, ..p }))
}

/// IPv4 (RFC 791): honours IHL and total length (Ethernet padding is not payload); non-first
/// fragments carry no L4 header.
fn decode_v4(b: &[u8]) -> Option<Packet<'_>> {
    let vihl = *b.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || ihl > b.len() {
        return None;
    }
    // The total length bounds the payload (Ethernet padding is not payload) when it is
    // consistent. A TSO super-frame carries 0 here (the NIC fills it in per segment) and a bogus
    // value must not hide bytes from inspection: then the payload runs to the end of the frame.
    let total = usize::from(be16(b, 2)?);
    let total = if (ihl..=b.len()).contains(&total) {
        total
    } else {
        b.len()
    };
    let frag = be16(b, 6)?;
    let frag_offset = frag & 0x1fff;
    let proto = b[9];
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
    let body = &b[ihl..total];
    let mut p = l4(src, dst, proto, body, frag_offset != 0);
    p.ip = IpFields {
        ttl: b[8],
        id: Some(u32::from(be16(b, 4)?)),
        frag_bits: (frag >> 13) as u8 & 0x7,
    };
    Some(p)
}

/// IPv6 (RFC 8200): skips hop-by-hop, routing, fragment, destination-options and AH headers.
fn decode_v6(b: &[u8]) -> Option<Packet<'_>> {
    if b.first()? >> 4 != 6 || b.len() < 40 {
        return None;
    }
    // As for IPv4: 0 (TSO, jumbogram) or a length past the frame means "to the end".
    let plen = usize::from(be16(b, 4)?);
    let plen = if plen == 0 || 40 + plen > b.len() {
        b.len() - 40
    } else {
        plen
    };
    let mut next = b[6];
    let mut s = [0u8; 16];
    s.copy_from_slice(&b[8..24]);
    let mut d = [0u8; 16];
    d.copy_from_slice(&b[24..40]);
    let (src, dst) = (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)));
    let mut body = &b[40..40 + plen];
    let mut later_fragment = false;
    let (mut frag_id, mut more_fragments) = (None, false);
    let hop_limit = b[7];
    // Bounded: each header consumes at least 8 bytes of a payload of at most 64 KiB.
    loop {
        match next {
            0 | 43 | 60 => {
                let len = (usize::from(*body.get(1)?) + 1) * 8;
                next = *body.first()?;
                body = body.get(len..)?;
            }
            51 => {
                let len = (usize::from(*body.get(1)?) + 2) * 4;
                next = *body.first()?;
                body = body.get(len..)?;
            }
            44 => {
                next = *body.first()?;
                let off = be16(body, 2)?;
                later_fragment = off >> 3 != 0;
                frag_id = Some(u32::from_be_bytes([
                    *body.get(4)?,
                    body[5],
                    body[6],
                    body[7],
                ]));
                more_fragments = off & 1 != 0;
                body = body.get(8..)?;
                // After a non-first fragment's header comes fragment data, never headers
                // (RFC 8200 §4.5): walking on would read payload bytes as extension headers,
                // and a payload that fails to parse would make the frame "not IP", unruled.
                if later_fragment {
                    break;
                }
            }
            _ => break,
        }
    }
    let mut p = l4(src, dst, next, body, later_fragment);
    p.ip = IpFields {
        ttl: hop_limit,
        id: frag_id,
        frag_bits: u8::from(more_fragments),
    };
    Some(p)
}

fn l4<'a>(src: IpAddr, dst: IpAddr, proto: u8, body: &'a [u8], later_fragment: bool) -> Packet<'a> {
    let other = Packet {
        src,
        dst,
        proto,
        l4: L4::Other,
        payload: body,
        ip: IpFields::default(),
        vlans: 0,
    };
    if later_fragment {
        return other;
    }
    match proto {
        ipproto::TCP => {
            let (Some(sport), Some(dport)) = (be16(body, 0), be16(body, 2)) else {
                return other;
            };
            let Some(&doff) = body.get(12) else {
                return other;
            };
            let hl = usize::from(doff >> 4) * 4;
            if hl < 20 || hl > body.len() {
                return other;
            }
            Packet {
                src,
                dst,
                proto,
                l4: L4::Tcp {
                    sport,
                    dport,
                    flags: body[13],
                    seq: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    ack: u32::from_be_bytes([body[8], body[9], body[10], body[11]]),
                    window: u16::from_be_bytes([body[14], body[15]]),
                    wscale: tcp_wscale(&body[20..hl]),
                },
                payload: &body[hl..],
                ip: IpFields::default(),
                vlans: 0,
            }
        }
        ipproto::UDP => {
            let (Some(sport), Some(dport), Some(ulen)) =
                (be16(body, 0), be16(body, 2), be16(body, 4))
            else {
                return other;
            };
            // UDP length covers header + data; a shorter IP payload means a truncated datagram.
            let end = usize::from(ulen).clamp(8, body.len());
            Packet {
                src,
                dst,
                proto,
                l4: L4::Udp { sport, dport },
                payload: &body[8..end],
                ip: IpFields::default(),
                vlans: 0,
            }
        }
        ipproto::ICMP | ipproto::ICMPV6 => {
            if body.len() < 8 {
                return other;
            }
            let l4 = L4::Icmp {
                v6: proto == ipproto::ICMPV6,
                itype: body[0],
                code: body[1],
                id: u16::from_be_bytes([body[4], body[5]]),
                seq: u16::from_be_bytes([body[6], body[7]]),
            };
            Packet {
                src,
                dst,
                proto,
                l4,
                payload: &body[8..],
                ip: IpFields::default(),
                vlans: 0,
            }
        }
        _ => other,
    }
}

/// The window-scale option (kind 3, length 3) among TCP options (RFC 9293 §3.2): `None` if
/// absent or if the option list is malformed before it.
fn tcp_wscale(mut opts: &[u8]) -> Option<u8> {
    loop {
        match *opts.first()? {
            0 => return None,
            1 => opts = &opts[1..],
            kind => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 {
                    return None;
                }
                if kind == 3 && len == 3 {
                    return opts.get(2).copied();
                }
                opts = opts.get(len..)?;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod build {
    //! Frame builders for tests.
    use alloc::vec::Vec;
    use core::net::IpAddr;

    /// Builds Ethernet + IP + L4 + payload. `l4` is `(proto, header bytes)`.
    pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, l4hdr: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
        let body_len = l4hdr.len() + payload.len();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = (20 + body_len) as u16;
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(body_len as u16).to_be_bytes());
                f.extend_from_slice(&[proto, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(l4hdr);
        f.extend_from_slice(payload);
        f
    }

    /// TCP header with the given ports and flags.
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        h
    }

    /// UDP header for `payload_len` bytes of data.
    pub fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sums_match_the_reference_checksum() {
        // RFC 1071's reference, a byte pair at a time, on every length (odd tails included).
        let reference = |b: &[u8]| {
            let mut sum: u32 = b
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            !(sum as u16)
        };
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..data.len() {
            let b = &data[..len];
            assert_eq!(!(fold(ones_sum(b, 0)) as u16), reference(b), "len {len}");
            assert_eq!(internet_checksum(b), reference(b), "len {len}");
        }
    }

    #[test]
    fn tcp_v4_with_padding() {
        let mut f = frame(
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            6,
            &tcp(1234, 80, 0x18),
            b"GET /",
        );
        f.extend_from_slice(&[0; 6]); // Ethernet padding after the IP datagram
        let Decoded::Ip(p) = decode(&f) else { panic!() };
        assert_eq!(p.ports(), (1234, 80));
        assert_eq!(p.payload, b"GET /");
        assert!(matches!(p.l4, L4::Tcp { flags: 0x18, .. }));
    }

    #[test]
    fn tcp_window_and_wscale() {
        // Data offset 8 (32 bytes): MSS 1460, NOP, window scale 7, NOP, NOP, NOP, NOP.
        let mut h = tcp(1234, 80, tcpflags::SYN);
        h[12] = 0x80;
        h[14..16].copy_from_slice(&29200u16.to_be_bytes());
        h.extend_from_slice(&[2, 4, 0x05, 0xb4, 1, 3, 3, 7, 1, 1, 1, 1]);
        let f = frame(ip("10.0.0.1"), ip("10.0.0.2"), 6, &h, b"");
        let Decoded::Ip(p) = decode(&f) else { panic!() };
        assert!(matches!(
            p.l4,
            L4::Tcp {
                window: 29200,
                wscale: Some(7),
                ..
            }
        ));
        assert!(p.payload.is_empty());
        // No options, then options cut short (length byte past the end, zero length).
        assert_eq!(tcp_wscale(&[]), None);
        assert_eq!(tcp_wscale(&[2, 4, 5]), None);
        assert_eq!(tcp_wscale(&[8, 0, 3, 3, 9]), None);
        assert_eq!(tcp_wscale(&[0, 3, 3, 9]), None);
        assert_eq!(tcp_wscale(&[1, 1, 3, 3, 15]), Some(15));
    }

    #[test]
    fn vlan_and_v6_ext() {
        let mut f = frame(ip("2001:db8::1"), ip("2001:db8::2"), 0, &[], &[]);
        // Hop-by-hop header (8 bytes) then UDP.
        let payload = b"dns?";
        let mut body = alloc::vec![ipproto::UDP, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&udp(53, 5353, payload.len()));
        body.extend_from_slice(payload);
        f[14 + 4..14 + 6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        f.extend_from_slice(&body);
        // Insert an 802.1Q tag.
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f[12..]);
        let Decoded::Ip(p) = decode(&tagged) else {
            panic!()
        };
        assert_eq!(p.proto, ipproto::UDP);
        assert_eq!(p.ports(), (53, 5353));
        assert_eq!(p.payload, payload);
    }

    /// A non-first IPv6 fragment whose data begins like a destination-options header (next
    /// header 60 in the fragment header, then bytes that do not parse as one) is still IP: its
    /// data is the payload `ip` rules see, not headers to walk (once, it decoded as not IP and
    /// was passed with no rule run).
    #[test]
    fn later_v6_fragment_data_is_not_walked_as_headers() {
        let mut f = frame(ip("2001:db8::1"), ip("2001:db8::2"), 44, &[], &[]);
        // Fragment header: next 60 (destination options), offset 8 (in 8-byte units: 1), M=1.
        let mut body = alloc::vec![60, 0, 0, 0x09, 0, 0, 0, 42];
        // Fragment data: a length byte claiming far more than there is.
        let data = [0u8, 0xff, 1, 2, 3, 4, 5, 6, b'E', b'V', b'I', b'L'];
        body.extend_from_slice(&data);
        f[14 + 4..14 + 6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        f.extend_from_slice(&body);
        let Decoded::Ip(p) = decode(&f) else {
            panic!("a later fragment must decode as IP")
        };
        assert_eq!(p.l4, L4::Other);
        assert_eq!(p.payload, data);
        assert_eq!(p.ip.id, Some(42));
        assert_eq!(p.ip.frag_bits, 1);
    }

    #[test]
    fn malformed_never_panics() {
        let good = frame(ip("10.0.0.1"), ip("10.0.0.2"), 6, &tcp(1, 2, 2), b"xyz");
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x4f;
        assert!(matches!(decode(&bad_ihl), Decoded::NotIp));
        let mut bad_doff = good.clone();
        bad_doff[14 + 20 + 12] = 0xf0;
        let Decoded::Ip(p) = decode(&bad_doff) else {
            panic!()
        };
        assert_eq!(p.l4, L4::Other);
        // Pseudo-random garbage.
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut g = good.clone();
            for b in g.iter_mut().skip(12) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x.is_multiple_of(7) {
                    *b = x as u8;
                }
            }
            let _ = decode(&g);
        }
    }
}
