//! Transmit offloads checked against the frame they change (issue 11 item 8).
//!
//! The 82540EM changes a transmitted frame *after* the DPI core inspected it: legacy
//! descriptors with IC write a checksum of the bytes from CSS to the end at CSO (8254x SDM
//! 3.3.3.1); data descriptors with POPTS IXSM/TXSM write checksums at the context descriptor's
//! IPCSO/TUCSO (SDM 3.3.5, 3.3.6); TSE cuts the payload after HDRLEN bytes into MSS-sized
//! segments, each with the header replicated and rewritten (SDM 3.5). A guest that aims an
//! offset into the payload has the device write a guest-predictable 16-bit value into bytes
//! inspection already passed; a TSO context whose HDRLEN does not match the headers makes the
//! device replicate payload as "header".
//!
//! So every offload a packet asks for is checked against the frame's real headers, parsed
//! here from the same bytes the hook inspects, and a packet whose offload writes anywhere but
//! the IPv4 header checksum or the TCP/UDP checksum field of *that* frame is refused (the
//! engine drops it as `DropReason::Offload`). What Linux's e1000 driver does (`e1000_tx_csum`:
//! a context per packet with TUCSS at the L4 header, TUCSO at its checksum, TUCSE 0, IP fields
//! 0 and TXSM; `e1000_tso`: IPCSS/IPCSO/IPCSE on the IPv4 header, TUCSS/TUCSO on TCP, HDRLEN
//! the Ethernet+IP+TCP headers, TSE, TXSM and IXSM on IPv4) passes.
//!
//! In zero-copy mode the check, like inspection, reads the guest's buffers, which the guest
//! can still change before the device reads them: the documented limit of that mode.
//!
//! **TSO and inspection.** The hook sees the unsegmented super-frame. That is equivalent to
//! what reaches the wire when the checks below hold: HDRLEN is exactly the parsed
//! Ethernet+IP+TCP header, so the device's payload is exactly the inspected payload after it,
//! cut at MSS boundaries in order, and the device changes only header fields of each segment
//! (IPv4 total length and identification, IPv6 payload length, TCP sequence number, PSH/FIN
//! cleared on all but the last segment, the checksums), derived from the inspected header.
//! The receiver's TCP reassembles exactly the inspected byte stream, which is what a
//! Snort-class engine inspects (content across the segment boundaries is seen whole, not
//! missed). Flags whose meaning a replicated header would change are refused with TSE: SYN and
//! RST (each segment would be a new SYN/RST) and URG (the urgent pointer, relative to each
//! segment's sequence number, would mark different bytes than inspection saw). What differs
//! per segment and can change a rule's verdict is the per-packet size (`dsize`) and the
//! sequence number; rules see the super-frame's.

use super::desc::{popts, txcmd, TxContextDesc};
use crate::engine::packet::{fold, internet_checksum, ones_sum};
use core::fmt;

/// Smallest TSO MSS accepted: below it a 64 KiB super-frame becomes over a thousand frames,
/// and no real path needs it (IPv4's minimum MTU of 576 gives 536).
pub const MIN_TSO_MSS: u16 = 64;

/// Why a packet's offload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// A context descriptor after a data descriptor of the same packet.
    ContextAfterData,
    /// Legacy and data descriptors in one packet.
    MixedDescriptors,
    /// Descriptors of one packet asking for different offloads (IC, CSO/CSS, POPTS, TSE).
    Inconsistent,
    /// Reserved POPTS bits set.
    ReservedOptions(u8),
    /// An offload with no context descriptor the device would apply (none posted yet, or the
    /// last one posted is for TSO while the packet is not, or the reverse).
    NoContext,
    /// The packet's context has TSE and its data descriptors do not, or the reverse.
    TseMismatch,
    /// The frame has no IPv4/IPv6 header with the TCP or UDP header the offload needs (not
    /// IP, a fragment, another protocol, or truncated).
    NoHeaders,
    /// A checksum start that is not the header the checksum belongs to.
    ChecksumStart { start: u16, expected: u16 },
    /// A checksum offset that is not the checksum field of the frame's header.
    ChecksumOffset { offset: u16, expected: u16 },
    /// A checksum end other than 0 (end of packet) or the header's last byte.
    ChecksumEnd { end: u16, expected: u16 },
    /// An IP checksum offload for a frame that is not IPv4 (IPv6 has no header checksum).
    NotIpv4,
    /// TSE for a frame that is not TCP, or a context not marked TCP.
    TsoNotTcp,
    /// TSE with the context's IP version (TUCMD.IP) not the frame's.
    TsoIpVersion,
    /// TSE with a HDRLEN other than the frame's Ethernet+IP+TCP header length.
    TsoHeaderLength { hdrlen: u8, real: u16 },
    /// TSE with an MSS below [`MIN_TSO_MSS`] or segments larger than the device's frame limit.
    TsoMss { mss: u16, hdrlen: u8 },
    /// TSE with PAYLEN not the frame's length after HDRLEN, or no payload.
    TsoPayloadLength { paylen: u32, real: u32 },
    /// TSE on a segment with SYN, RST or URG set.
    TsoFlags(u8),
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ContextAfterData => f.write_str("context descriptor after a data descriptor"),
            Self::MixedDescriptors => f.write_str("legacy and data descriptors in one packet"),
            Self::Inconsistent => {
                f.write_str("descriptors of one packet ask for different offloads")
            }
            Self::ReservedOptions(p) => write!(f, "reserved POPTS bits {p:#04x}"),
            Self::NoContext => f.write_str("offload without a matching context descriptor"),
            Self::TseMismatch => f.write_str("TSE differs between context and data descriptors"),
            Self::NoHeaders => f.write_str("offload on a frame without IP and TCP/UDP headers"),
            Self::ChecksumStart { start, expected } => {
                write!(f, "checksum start {start}, the header starts at {expected}")
            }
            Self::ChecksumOffset { offset, expected } => write!(
                f,
                "checksum offset {offset}, the checksum field is at {expected}"
            ),
            Self::ChecksumEnd { end, expected } => {
                write!(f, "checksum end {end}, must be 0 or {expected}")
            }
            Self::NotIpv4 => f.write_str("IP checksum offload on a frame that is not IPv4"),
            Self::TsoNotTcp => f.write_str("TCP segmentation of a frame that is not TCP"),
            Self::TsoIpVersion => f.write_str("TCP segmentation context for the other IP version"),
            Self::TsoHeaderLength { hdrlen, real } => {
                write!(f, "TSO HDRLEN {hdrlen}, the headers are {real} bytes")
            }
            Self::TsoMss { mss, hdrlen } => write!(
                f,
                "TSO MSS {mss} with {hdrlen} header bytes: at least {MIN_TSO_MSS}, segments at most {} bytes",
                super::dpi::MAX_FRAME
            ),
            Self::TsoPayloadLength { paylen, real } => {
                write!(f, "TSO PAYLEN {paylen}, the payload is {real} bytes")
            }
            Self::TsoFlags(fl) => write!(f, "TCP segmentation with flags {fl:#04x} (SYN/RST/URG)"),
        }
    }
}

/// What one packet's descriptors ask the device to do, collected while the engine scans them
/// ([`OffloadScan::desc`]), before its frame is assembled.
#[derive(Debug, Clone, Copy, Default)]
pub struct OffloadScan {
    /// The packet's own context descriptor (the last one before its data).
    pub context: Option<TxContextDesc>,
    legacy: bool,
    /// First legacy descriptor's (IC, CSO, CSS); CSO/CSS only with IC.
    legacy_csum: Option<(u8, u8)>,
    /// First data descriptor's (POPTS, TSE).
    data: Option<(u8, bool)>,
    error: Option<OffloadError>,
}

/// Kind of a scanned descriptor, as far as offloads go.
#[derive(Debug, Clone, Copy)]
pub enum ScannedDesc {
    Context(TxContextDesc),
    /// Legacy descriptor: its CMD, CSO and CSS.
    Legacy {
        cmd: u8,
        cso: u8,
        css: u8,
    },
    /// Data descriptor: its DCMD and POPTS.
    Data {
        dcmd: u8,
        popts: u8,
    },
}

impl OffloadScan {
    /// Record one descriptor of the packet (in ring order).
    #[inline]
    pub fn desc(&mut self, d: ScannedDesc) {
        let fail = match d {
            ScannedDesc::Context(c) => {
                if self.data.is_some() {
                    Some(OffloadError::ContextAfterData)
                } else {
                    self.context = Some(c);
                    None
                }
            }
            ScannedDesc::Legacy { cmd, cso, css } => {
                // With IC clear CSO/CSS are ignored by the device (and often stale).
                let csum = (cmd & txcmd::IC != 0).then_some((cso, css));
                if self.data.is_some() {
                    Some(OffloadError::MixedDescriptors)
                } else if self.legacy && self.legacy_csum != csum {
                    Some(OffloadError::Inconsistent)
                } else {
                    self.legacy = true;
                    self.legacy_csum = csum;
                    None
                }
            }
            ScannedDesc::Data { dcmd, popts } => {
                let this = (popts, dcmd & txcmd::TSE != 0);
                if self.legacy {
                    Some(OffloadError::MixedDescriptors)
                } else if self.data.is_some_and(|d| d != this) {
                    Some(OffloadError::Inconsistent)
                } else {
                    self.data = Some(this);
                    None
                }
            }
        };
        if let Some(e) = fail {
            self.error.get_or_insert(e);
        }
    }

    /// Whether the packet's data descriptors ask for TCP segmentation.
    pub fn tse(&self) -> bool {
        self.data.is_some_and(|(_, tse)| tse)
    }

    /// The offload the device will apply, given `carried`, the context the device holds from
    /// an earlier packet (the 82540EM keeps one context until the next context descriptor,
    /// SDM 3.3.5). A carried context is used only when its TSE matches the packet's: emulators
    /// that keep separate TSO and checksum contexts (QEMU) would otherwise apply a different,
    /// older one than the one checked.
    pub fn request(&self, carried: Option<TxContextDesc>) -> Result<Offload, OffloadError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some((cso, css)) = self.legacy_csum {
            return Ok(Offload::Legacy { cso, css });
        }
        let Some((options, tse)) = self.data else {
            return Ok(Offload::None);
        };
        if options & !(popts::IXSM | popts::TXSM) != 0 {
            return Err(OffloadError::ReservedOptions(options));
        }
        if options == 0 && !tse {
            return Ok(Offload::None);
        }
        let ctx_tse = |c: &TxContextDesc| c.tucmd() & txcmd::TSE != 0;
        let context = match self.context {
            Some(c) if ctx_tse(&c) != tse => return Err(OffloadError::TseMismatch),
            Some(c) => c,
            None => match carried {
                Some(c) if ctx_tse(&c) == tse => c,
                _ => return Err(OffloadError::NoContext),
            },
        };
        Ok(Offload::Context {
            context,
            options,
            tse,
        })
    }
}

/// The offload a packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    None,
    /// Legacy IC: checksum from CSS to the end stored at CSO.
    Legacy {
        cso: u8,
        css: u8,
    },
    /// Data descriptors with `options` (POPTS) and TSE under `context`.
    Context {
        context: TxContextDesc,
        options: u8,
        tse: bool,
    },
}

/// Which checksums of a frame the device writes after inspection, so that the frame's own
/// values there are not what the wire carries ([`super::checksum::verify`] skips them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inserted {
    /// The IPv4 header checksum.
    pub ip: bool,
    /// The TCP or UDP checksum.
    pub l4: bool,
}

impl Inserted {
    /// Nothing: the frame goes out as it is.
    pub const NONE: Inserted = Inserted {
        ip: false,
        l4: false,
    };
    /// Everything (TSO: every segment's headers and checksums are the device's).
    pub const ALL: Inserted = Inserted { ip: true, l4: true };
}

impl Offload {
    /// Check the offload against the frame it applies to (the bytes the hook inspects).
    pub fn check(&self, frame: &[u8]) -> Result<(), OffloadError> {
        self.checked(frame, Headers::parse(frame).as_ref())
            .map(|_| ())
    }

    /// [`Offload::check`] with the frame's headers already parsed (`Headers::parse`, shared
    /// with the checksum check), returning which checksums the device will write.
    pub(super) fn checked(
        &self,
        frame: &[u8],
        headers: Option<&Headers>,
    ) -> Result<Inserted, OffloadError> {
        match *self {
            Offload::None => Ok(Inserted::NONE),
            Offload::Legacy { cso, css } => {
                let h = headers.ok_or(OffloadError::NoHeaders)?;
                let (cso, css) = (u16::from(cso), u16::from(css));
                // The IPv4 header checksum (from the IP header) or the L4 checksum (from the L4
                // header); the device sums to the end of the packet either way.
                if h.ipv4 && css == h.ip {
                    expect_offset(cso, h.ip + IPV4_CSUM)?;
                    return Ok(Inserted {
                        ip: true,
                        l4: false,
                    });
                }
                let l4 = h.l4.ok_or(OffloadError::NoHeaders)?;
                expect_start(css, l4.start)?;
                expect_offset(cso, l4.csum_field())?;
                Ok(Inserted {
                    ip: false,
                    l4: true,
                })
            }
            Offload::Context {
                context: c,
                options,
                tse,
            } => {
                let h = headers.ok_or(OffloadError::NoHeaders)?;
                if tse {
                    check_tso(&c, h, frame.len())?;
                }
                if options & popts::IXSM != 0 {
                    if !h.ipv4 {
                        return Err(OffloadError::NotIpv4);
                    }
                    expect_start(u16::from(c.ipcss), h.ip)?;
                    expect_offset(u16::from(c.ipcso), h.ip + IPV4_CSUM)?;
                    expect_end(c.ipcse, h.ip_end - 1)?;
                }
                if options & popts::TXSM != 0 {
                    let l4 = h.l4.ok_or(OffloadError::NoHeaders)?;
                    expect_start(u16::from(c.tucss), l4.start)?;
                    expect_offset(u16::from(c.tucso), l4.csum_field())?;
                    // Each TSO segment is summed to its own end: only 0 says that.
                    let end = if tse {
                        0
                    } else {
                        u16::try_from(frame.len() - 1).unwrap_or(0)
                    };
                    expect_end(c.tucse, end)?;
                }
                Ok(if tse {
                    // Each segment's lengths, ID and sequence number are the device's: the
                    // super-frame's checksums are not any segment's.
                    Inserted::ALL
                } else {
                    Inserted {
                        ip: options & popts::IXSM != 0,
                        l4: options & popts::TXSM != 0,
                    }
                })
            }
        }
    }
}

/// TSE: the context must describe exactly this frame's headers and payload.
fn check_tso(c: &TxContextDesc, h: &Headers, len: usize) -> Result<(), OffloadError> {
    let l4 = match h.l4 {
        Some(l4) if l4.tcp && c.tucmd() & txcmd::TUCMD_TCP != 0 => l4,
        _ => return Err(OffloadError::TsoNotTcp),
    };
    if (c.tucmd() & txcmd::TUCMD_IP != 0) != h.ipv4 {
        return Err(OffloadError::TsoIpVersion);
    }
    // The device rewrites the IP lengths/ID from IPCSS and the sequence number from TUCSS.
    expect_start(u16::from(c.ipcss), h.ip)?;
    expect_start(u16::from(c.tucss), l4.start)?;
    let real = l4.start + l4.len;
    if u16::from(c.hdrlen) != real {
        return Err(OffloadError::TsoHeaderLength {
            hdrlen: c.hdrlen,
            real,
        });
    }
    if c.mss < MIN_TSO_MSS || u32::from(c.hdrlen) + u32::from(c.mss) > super::dpi::MAX_FRAME {
        return Err(OffloadError::TsoMss {
            mss: c.mss,
            hdrlen: c.hdrlen,
        });
    }
    let payload = (len - usize::from(real)) as u32;
    if payload == 0 || c.paylen() != payload {
        return Err(OffloadError::TsoPayloadLength {
            paylen: c.paylen(),
            real: payload,
        });
    }
    if l4.flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
        return Err(OffloadError::TsoFlags(l4.flags));
    }
    Ok(())
}

fn expect_start(start: u16, expected: u16) -> Result<(), OffloadError> {
    if start == expected {
        Ok(())
    } else {
        Err(OffloadError::ChecksumStart { start, expected })
    }
}

fn expect_offset(offset: u16, expected: u16) -> Result<(), OffloadError> {
    if offset == expected {
        Ok(())
    } else {
        Err(OffloadError::ChecksumOffset { offset, expected })
    }
}

/// A checksum end (inclusive, SDM 3.3.6): 0 means the end of the packet.
fn expect_end(end: u16, expected: u16) -> Result<(), OffloadError> {
    if end == 0 || end == expected {
        Ok(())
    } else {
        Err(OffloadError::ChecksumEnd { end, expected })
    }
}

/// IPv4 header checksum field offset (RFC 791).
const IPV4_CSUM: u16 = 10;
/// TCP checksum field offset (RFC 9293 §3.1).
const TCP_CSUM: u16 = 16;
/// UDP checksum field offset (RFC 768).
const UDP_CSUM: u16 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_URG: u8 = 0x20;

/// Offsets of a frame's headers, as the device's offsets count them (from the first byte of
/// the frame in the buffers). Parsed like the engine's decoder (`engine::packet`): up to two
/// VLAN tags, IPv4 with IHL, IPv6 with hop-by-hop, routing and destination-options headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Headers {
    /// IP header start.
    pub(super) ip: u16,
    pub(super) ipv4: bool,
    /// IPv4: IP start + IHL (first byte after the header).
    pub(super) ip_end: u16,
    /// IPv6 with a routing header: the TCP/UDP pseudo-header's destination is the routing
    /// header's last address, not the IPv6 header's (RFC 8200 §8.1).
    pub(super) routed: bool,
    /// TCP or UDP header, when the frame has a whole one and is not a fragment.
    pub(super) l4: Option<L4Header>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct L4Header {
    pub(super) start: u16,
    pub(super) tcp: bool,
    /// TCP data offset in bytes, 8 for UDP.
    pub(super) len: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
}

impl L4Header {
    fn csum_field(&self) -> u16 {
        self.start + if self.tcp { TCP_CSUM } else { UDP_CSUM }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

impl Headers {
    /// `None`: not an IP frame the offloads can apply to. Offsets above 255 fit no
    /// descriptor's 8-bit fields; they are kept (as u16) and simply never match.
    pub(super) fn parse(frame: &[u8]) -> Option<Self> {
        let mut ethertype = be16(frame, 12)?;
        let mut off = 14usize;
        for _ in 0..2 {
            if ethertype != 0x8100 && ethertype != 0x88a8 {
                break;
            }
            ethertype = be16(frame, off + 2)?;
            off += 4;
        }
        let ip = off;
        let (ipv4, ip_end, mut proto, mut fragment, mut l4) = match ethertype {
            0x0800 => {
                let vihl = *frame.get(ip)?;
                let ihl = usize::from(vihl & 0x0f) * 4;
                if vihl >> 4 != 4 || ihl < 20 || frame.len() < ip + ihl {
                    return None;
                }
                // MF or a fragment offset: no whole L4 header to checksum.
                let fragment = be16(frame, ip + 6)? & 0x3fff != 0;
                (true, ip + ihl, frame[ip + 9], fragment, ip + ihl)
            }
            0x86dd => {
                if frame.get(ip)? >> 4 != 6 || frame.len() < ip + 40 {
                    return None;
                }
                (false, ip + 40, frame[ip + 6], false, ip + 40)
            }
            _ => return None,
        };
        let mut routed = false;
        if !ipv4 {
            // Extension headers the engine also skips; a fragment header or AH ends the walk
            // (no L4 header the device could checksum).
            for _ in 0..8 {
                match proto {
                    0 | 43 | 60 => {
                        routed |= proto == 43;
                        proto = *frame.get(l4)?;
                        l4 += (usize::from(*frame.get(l4 + 1)?) + 1) * 8;
                    }
                    44 | 51 => {
                        fragment = true;
                        break;
                    }
                    _ => break,
                }
            }
        }
        // Offsets beyond u16 cannot occur (headers sit in the first few hundred bytes of the
        // frame), but are clamped rather than truncated: a clamped offset matches no field.
        let clamp = |v: usize| u16::try_from(v).unwrap_or(u16::MAX);
        let header = match proto {
            6 if !fragment => {
                let len = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
                (len >= 20 && frame.len() >= l4 + len).then(|| L4Header {
                    start: clamp(l4),
                    tcp: true,
                    len: clamp(len),
                    flags: frame[l4 + 13],
                })
            }
            17 if !fragment && frame.len() >= l4 + 8 => Some(L4Header {
                start: clamp(l4),
                tcp: false,
                len: 8,
                flags: 0,
            }),
            _ => None,
        };
        Some(Self {
            ip: clamp(ip),
            ipv4,
            ip_end: clamp(ip_end),
            routed,
            l4: header,
        })
    }
}

/// Fills in the checksums of an Ethernet frame as the device's offloads would (a frame
/// whose offload request did not come with it): the IPv4 header checksum and the TCP or UDP
/// checksum over IPv4 or IPv6 (RFC 1071, RFC 793 §3.1, RFC 768, RFC 8200 §8.1; a UDP
/// checksum of 0 becomes 0xFFFF). Anything it cannot parse (fragments, IPv6 extension headers,
/// truncated frames) is left as it is.
pub fn fill_checksums(frame: &mut [u8]) {
    let mut l3 = 14;
    let mut ethertype = match frame.get(12..14) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => return,
    };
    if ethertype == 0x8100 {
        let Some(t) = frame.get(16..18) else { return };
        ethertype = u16::from_be_bytes([t[0], t[1]]);
        l3 = 18;
    }
    // The pseudo-header's sum (addresses, protocol, L4 length), unfolded.
    let (proto, l4, pseudo) = match ethertype {
        0x0800 => {
            let Some(&vihl) = frame.get(l3) else { return };
            let ihl = usize::from(vihl & 0x0F) * 4;
            let Some(h) = frame.get(l3..l3 + ihl) else {
                return;
            };
            if ihl < 20 {
                return;
            }
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3FFF;
            let proto = h[9];
            let pseudo = ones_sum(
                &h[12..20],
                u64::from(proto) + total.saturating_sub(ihl) as u64,
            );
            frame[l3 + 10..l3 + 12].fill(0);
            let sum = internet_checksum(&frame[l3..l3 + ihl]);
            frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            if frag != 0 || total < ihl || l3 + total > frame.len() {
                return;
            }
            (proto, (l3 + ihl)..(l3 + total), pseudo)
        }
        0x86DD => {
            let Some(h) = frame.get(l3..l3 + 40) else {
                return;
            };
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let proto = h[6];
            if l3 + 40 + plen > frame.len() {
                return;
            }
            let pseudo = ones_sum(&h[8..40], u64::from(proto) + plen as u64);
            (proto, (l3 + 40)..(l3 + 40 + plen), pseudo)
        }
        _ => return,
    };
    let at = match proto {
        6 if l4.len() >= 20 => 16,
        17 if l4.len() >= 8 => 6,
        _ => return,
    };
    let start = l4.start;
    frame[start + at..start + at + 2].fill(0);
    let mut sum = !(fold(ones_sum(&frame[l4], pseudo)) as u16);
    if proto == 17 && sum == 0 {
        sum = 0xFFFF;
    }
    frame[start + at..start + at + 2].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Ethernet + IPv4 (IHL words) + TCP (20 bytes + options) + payload.
    fn tcp4(ihl: u8, tcp_opts: usize, payload: usize) -> Vec<u8> {
        let mut f = alloc::vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = alloc::vec![0u8; usize::from(ihl) * 4];
        ip[0] = 0x40 | ihl;
        ip[9] = 6;
        f.extend(ip);
        let mut tcp = alloc::vec![0u8; 20 + tcp_opts];
        tcp[12] = (((20 + tcp_opts) / 4) as u8) << 4;
        tcp[13] = 0x18;
        f.extend(tcp);
        f.extend((0..payload).map(|i| i as u8));
        f
    }

    fn udp6(ext: bool) -> Vec<u8> {
        let mut f = alloc::vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = alloc::vec![0u8; 40];
        ip[0] = 0x60;
        ip[6] = if ext { 0 } else { 17 };
        f.extend(ip);
        if ext {
            let mut hbh = alloc::vec![0u8; 8];
            hbh[0] = 17;
            f.extend(hbh);
        }
        f.extend([0u8; 8]);
        f.extend([0xAAu8; 100]);
        f
    }

    fn ctx(ipcss: u8, ipcso: u8, ipcse: u16, tucss: u8, tucso: u8, tucmd: u8) -> TxContextDesc {
        TxContextDesc {
            ipcss,
            ipcso,
            ipcse,
            tucss,
            tucso,
            tucse: 0,
            cmd_and_length: u32::from(txcmd::DEXT | tucmd) << 24,
            ..Default::default()
        }
    }

    fn tso(c: TxContextDesc, hdrlen: u8, mss: u16, paylen: u32) -> TxContextDesc {
        TxContextDesc {
            cmd_and_length: c.cmd_and_length | u32::from(txcmd::TSE) << 24 | paylen,
            hdrlen,
            mss,
            ..c
        }
    }

    fn with(c: TxContextDesc, options: u8, tse: bool) -> Offload {
        Offload::Context {
            context: c,
            options,
            tse,
        }
    }

    #[test]
    fn headers_of_ipv4_ipv6_vlan() {
        let h = Headers::parse(&tcp4(5, 12, 10)).unwrap();
        assert_eq!((h.ip, h.ipv4, h.ip_end), (14, true, 34));
        assert_eq!(h.l4.map(|l| (l.start, l.tcp, l.len)), Some((34, true, 32)));
        let h = Headers::parse(&udp6(true)).unwrap();
        assert_eq!(h.l4.map(|l| (l.start, l.tcp)), Some((62, false)));
        let mut v = tcp4(6, 0, 4);
        v.splice(12..12, [0x81, 0x00, 0, 5]);
        let h = Headers::parse(&v).unwrap();
        assert_eq!((h.ip, h.l4.map(|l| l.start)), (18, Some(42)));
        // A fragment has no L4 header; ARP no IP header; a truncated TCP header none.
        let mut frag = tcp4(5, 0, 10);
        frag[20] = 0x20;
        assert_eq!(Headers::parse(&frag).unwrap().l4, None);
        let mut arp = tcp4(5, 0, 10);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(Headers::parse(&arp), None);
        assert_eq!(Headers::parse(&tcp4(5, 0, 0)[..50]).unwrap().l4, None);
    }

    #[test]
    fn linux_checksum_and_tso_contexts_pass() {
        // e1000_tx_csum: IP fields 0, TUCSS/TUCSO on the L4 header, TXSM.
        let f = tcp4(5, 12, 100);
        let c = ctx(0, 0, 0, 34, 50, txcmd::TUCMD_TCP);
        assert_eq!(with(c, popts::TXSM, false).check(&f), Ok(()));
        let f6 = udp6(true);
        assert_eq!(
            with(ctx(0, 0, 0, 62, 68, 0), popts::TXSM, false).check(&f6),
            Ok(())
        );
        // e1000_tso on IPv4: IPCSE the IP header's last byte, HDRLEN Ethernet+IP+TCP.
        let big = tcp4(5, 12, 4000);
        let c = tso(
            ctx(14, 24, 33, 34, 50, txcmd::TUCMD_TCP | txcmd::TUCMD_IP),
            66,
            1448,
            4000,
        );
        assert_eq!(with(c, popts::TXSM | popts::IXSM, true).check(&big), Ok(()));
        // Legacy IC on the TCP checksum.
        let l = Offload::Legacy { cso: 50, css: 34 };
        assert_eq!(l.check(&f), Ok(()));
    }

    #[test]
    fn offsets_into_the_payload_are_refused() {
        let f = tcp4(5, 0, 100);
        let into_payload = ctx(0, 0, 0, 34, 80, txcmd::TUCMD_TCP);
        assert_eq!(
            with(into_payload, popts::TXSM, false).check(&f),
            Err(OffloadError::ChecksumOffset {
                offset: 80,
                expected: 50
            })
        );
        // A start inside the payload with the offset its "checksum field".
        let shifted = ctx(0, 0, 0, 60, 76, txcmd::TUCMD_TCP);
        assert!(with(shifted, popts::TXSM, false).check(&f).is_err());
        // IPCSO elsewhere.
        let ip = ctx(14, 30, 33, 34, 50, txcmd::TUCMD_TCP);
        assert!(with(ip, popts::IXSM, false).check(&f).is_err());
        // IPCSE beyond the header.
        let ip = ctx(14, 24, 40, 34, 50, txcmd::TUCMD_TCP);
        assert!(matches!(
            with(ip, popts::IXSM, false).check(&f),
            Err(OffloadError::ChecksumEnd { .. })
        ));
        // IP checksum on IPv6.
        assert_eq!(
            with(ctx(14, 24, 0, 62, 68, 0), popts::IXSM, false).check(&udp6(true)),
            Err(OffloadError::NotIpv4)
        );
        // Legacy CSO into the payload, CSS elsewhere.
        assert!(Offload::Legacy { cso: 70, css: 34 }.check(&f).is_err());
        assert!(Offload::Legacy { cso: 50, css: 40 }.check(&f).is_err());
        assert_eq!(Offload::Legacy { cso: 24, css: 14 }.check(&f), Ok(()));
        // Checksums on a frame without TCP/UDP.
        let mut frag = f.clone();
        frag[20] = 0x20;
        assert_eq!(
            Offload::Legacy { cso: 50, css: 34 }.check(&frag),
            Err(OffloadError::NoHeaders)
        );
    }

    #[test]
    fn tso_contexts_must_describe_the_frame() {
        let f = tcp4(5, 0, 3000);
        let base = ctx(14, 24, 33, 34, 50, txcmd::TUCMD_TCP | txcmd::TUCMD_IP);
        let ok = tso(base, 54, 1460, 3000);
        let opts = popts::TXSM | popts::IXSM;
        assert_eq!(with(ok, opts, true).check(&f), Ok(()));
        let bad = |c: TxContextDesc| with(c, opts, true).check(&f).unwrap_err();
        assert_eq!(
            bad(tso(base, 60, 1460, 2994)),
            OffloadError::TsoHeaderLength {
                hdrlen: 60,
                real: 54
            }
        );
        assert!(matches!(
            bad(tso(base, 54, 8, 3000)),
            OffloadError::TsoMss { .. }
        ));
        assert!(matches!(
            bad(tso(base, 54, 0, 3000)),
            OffloadError::TsoMss { .. }
        ));
        assert!(matches!(
            bad(tso(base, 54, 16384, 3000)),
            OffloadError::TsoMss { .. }
        ));
        assert!(matches!(
            bad(tso(base, 54, 1460, 2000)),
            OffloadError::TsoPayloadLength { .. }
        ));
        let v6 = ctx(14, 24, 33, 34, 50, txcmd::TUCMD_TCP);
        assert_eq!(bad(tso(v6, 54, 1460, 3000)), OffloadError::TsoIpVersion);
        let udp = ctx(14, 24, 33, 34, 50, txcmd::TUCMD_IP);
        assert_eq!(bad(tso(udp, 54, 1460, 3000)), OffloadError::TsoNotTcp);
        let mut syn = f.clone();
        syn[47] |= TCP_SYN;
        assert_eq!(
            with(ok, opts, true).check(&syn),
            Err(OffloadError::TsoFlags(0x1A))
        );
        // TUCSE other than 0 with TSE.
        let end = TxContextDesc { tucse: 3053, ..ok };
        assert!(matches!(bad(end), OffloadError::ChecksumEnd { .. }));
    }

    #[test]
    fn scan_picks_the_context_the_device_applies() {
        let c = ctx(0, 0, 0, 34, 50, txcmd::TUCMD_TCP);
        let t = tso(c, 54, 1460, 100);
        let data = |popts, tse| ScannedDesc::Data {
            dcmd: txcmd::DEXT | if tse { txcmd::TSE } else { 0 },
            popts,
        };
        // Own context.
        let mut s = OffloadScan::default();
        s.desc(ScannedDesc::Context(c));
        s.desc(data(popts::TXSM, false));
        s.desc(data(popts::TXSM, false));
        assert_eq!(s.request(Some(t)), Ok(with(c, popts::TXSM, false)));
        // Carried only when its TSE matches.
        let mut s = OffloadScan::default();
        s.desc(data(popts::TXSM, false));
        assert_eq!(s.request(Some(c)), Ok(with(c, popts::TXSM, false)));
        assert_eq!(s.request(Some(t)), Err(OffloadError::NoContext));
        assert_eq!(s.request(None), Err(OffloadError::NoContext));
        // No offload asked: no context needed.
        let mut s = OffloadScan::default();
        s.desc(data(0, false));
        assert_eq!(s.request(None), Ok(Offload::None));
        // Own context with the other TSE.
        let mut s = OffloadScan::default();
        s.desc(ScannedDesc::Context(t));
        s.desc(data(popts::TXSM, false));
        assert_eq!(s.request(None), Err(OffloadError::TseMismatch));
        // Disagreeing descriptors, context after data, mixing, reserved options.
        let mut s = OffloadScan::default();
        s.desc(data(popts::TXSM, false));
        s.desc(data(popts::TXSM | popts::IXSM, false));
        assert_eq!(s.request(Some(c)), Err(OffloadError::Inconsistent));
        let mut s = OffloadScan::default();
        s.desc(data(popts::TXSM, false));
        s.desc(ScannedDesc::Context(c));
        assert_eq!(s.request(Some(c)), Err(OffloadError::ContextAfterData));
        let mut s = OffloadScan::default();
        s.desc(ScannedDesc::Legacy {
            cmd: 0,
            cso: 0,
            css: 0,
        });
        s.desc(data(0, false));
        assert_eq!(s.request(None), Err(OffloadError::MixedDescriptors));
        let mut s = OffloadScan::default();
        s.desc(data(0x80, false));
        assert_eq!(s.request(Some(c)), Err(OffloadError::ReservedOptions(0x80)));
        // Legacy: IC and CSO/CSS must agree; without IC stale CSO/CSS do not matter.
        let legacy = |cmd, cso| ScannedDesc::Legacy { cmd, cso, css: 34 };
        let mut s = OffloadScan::default();
        s.desc(legacy(0, 1));
        s.desc(legacy(txcmd::EOP, 9));
        assert_eq!(s.request(None), Ok(Offload::None));
        let mut s = OffloadScan::default();
        s.desc(legacy(txcmd::IC, 50));
        s.desc(legacy(txcmd::IC | txcmd::EOP, 60));
        assert_eq!(s.request(None), Err(OffloadError::Inconsistent));
        let mut s = OffloadScan::default();
        s.desc(legacy(txcmd::IC, 50));
        s.desc(legacy(txcmd::EOP, 50));
        assert_eq!(s.request(None), Err(OffloadError::Inconsistent));
    }
}
