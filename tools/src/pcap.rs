//! Minimal pcap (libpcap classic format) writer (microsecond timestamps, Ethernet) and reader
//! (either byte order, micro- or nanosecond timestamps; a few link types turned into Ethernet).

use std::io::{self, Write};

/// Link type Ethernet (LINKTYPE_ETHERNET).
const LINKTYPE_ETHERNET: u32 = 1;
const MAGIC_US: u32 = 0xa1b2_c3d4;

/// Writes the pcap global header.
pub fn write_header(w: &mut impl Write, snaplen: u32) -> io::Result<()> {
    w.write_all(&MAGIC_US.to_le_bytes())?;
    w.write_all(&2u16.to_le_bytes())?;
    w.write_all(&4u16.to_le_bytes())?;
    w.write_all(&0i32.to_le_bytes())?; // thiszone
    w.write_all(&0u32.to_le_bytes())?; // sigfigs
    w.write_all(&snaplen.to_le_bytes())?;
    w.write_all(&LINKTYPE_ETHERNET.to_le_bytes())
}

/// Writes one record: `data` is the captured part, `orig_len` the frame's full length.
pub fn write_record(w: &mut impl Write, ts_us: u64, orig_len: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&((ts_us / 1_000_000) as u32).to_le_bytes())?;
    w.write_all(&((ts_us % 1_000_000) as u32).to_le_bytes())?;
    w.write_all(&(data.len() as u32).to_le_bytes())?;
    w.write_all(&orig_len.to_le_bytes())?;
    w.write_all(data)
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Microseconds since the epoch.
    pub ts_us: u64,
    /// Full frame length.
    pub orig_len: u32,
    /// Captured bytes.
    pub data: Vec<u8>,
}

/// Magic of a nanosecond-resolution pcap.
const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// First four bytes of a pcapng file (its Section Header Block type).
const PCAPNG_SHB: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// Link types [`ethernet_frame`] turns into Ethernet frames (the tcpdump.org LINKTYPE_ list).
pub mod linktype {
    /// BSD loopback: a 4-byte address family in the writer's byte order.
    pub const NULL: u32 = 0;
    /// Ethernet.
    pub const ETHERNET: u32 = 1;
    /// Raw IPv4 or IPv6 (and its older number 12).
    pub const RAW: u32 = 101;
    /// Raw IP, the older number some writers use.
    pub const RAW_OLD: u32 = 12;
    /// Linux cooked capture v1: a 16-byte header ending in the EtherType.
    pub const LINUX_SLL: u32 = 113;
    /// Raw IPv4.
    pub const IPV4: u32 = 228;
    /// Raw IPv6.
    pub const IPV6: u32 = 229;
}

/// A classic pcap file read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The file's link type.
    pub linktype: u32,
    /// Its records in file order.
    pub records: Vec<Record>,
}

/// Reads a pcap written by [`write_header`]/[`write_record`]: Ethernet only.
pub fn read_all(r: &mut impl std::io::Read) -> Result<Vec<Record>, String> {
    let c = read_capture(r)?;
    if c.linktype != LINKTYPE_ETHERNET {
        return Err(format!(
            "link type {} (only Ethernet, 1, is read here)",
            c.linktype
        ));
    }
    Ok(c.records)
}

/// Reads a classic pcap file of either byte order, microsecond or nanosecond timestamps
/// (nanoseconds are truncated to microseconds). pcapng is refused with an error saying so.
pub fn read_capture(r: &mut impl std::io::Read) -> Result<Capture, String> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)
        .map_err(|e| format!("read pcap: {e}"))?;
    if buf.len() >= 4 && buf[..4] == PCAPNG_SHB {
        return Err(
            "pcapng file: only classic pcap is read (convert with `editcap -F pcap IN OUT`)".into(),
        );
    }
    if buf.len() < 24 {
        return Err("not a pcap file (shorter than its 24-byte header)".into());
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    let (big, nanos) = if magic == MAGIC_US.to_le_bytes() {
        (false, false)
    } else if magic == MAGIC_US.to_be_bytes() {
        (true, false)
    } else if magic == MAGIC_NS.to_le_bytes() {
        (false, true)
    } else if magic == MAGIC_NS.to_be_bytes() {
        (true, true)
    } else {
        return Err(format!(
            "not a pcap file (magic {:02x}{:02x}{:02x}{:02x})",
            magic[0], magic[1], magic[2], magic[3]
        ));
    };
    let rd32 = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    };
    // The link type's upper bits carry FCS information (pcap file format, LinkType field).
    let linktype = rd32(&buf, 20) & 0x0fff_ffff;
    let mut at = 24;
    let mut records = Vec::new();
    while at < buf.len() {
        if buf.len() - at < 16 {
            return Err(format!("truncated record header at byte {at}"));
        }
        let (s, frac, incl, orig) = (
            rd32(&buf, at),
            rd32(&buf, at + 4),
            rd32(&buf, at + 8) as usize,
            rd32(&buf, at + 12),
        );
        at += 16;
        if buf.len() - at < incl {
            return Err(format!("truncated record data at byte {at}"));
        }
        let us = if nanos { frac / 1000 } else { frac };
        records.push(Record {
            ts_us: u64::from(s) * 1_000_000 + u64::from(us),
            orig_len: orig,
            data: buf[at..at + incl].to_vec(),
        });
        at += incl;
    }
    Ok(Capture { linktype, records })
}

/// The record as an Ethernet frame: as it is for Ethernet, else behind a synthetic Ethernet
/// header carrying the EtherType of its network layer. `None` for other link types and for
/// records too short for their link header.
pub fn ethernet_frame(linktype: u32, data: &[u8]) -> Option<Vec<u8>> {
    const IPV4: [u8; 2] = [0x08, 0x00];
    const IPV6: [u8; 2] = [0x86, 0xdd];
    let (ethertype, l3): ([u8; 2], &[u8]) = match linktype {
        LINKTYPE_ETHERNET => return Some(data.to_vec()),
        linktype::RAW | linktype::RAW_OLD => match data.first()? >> 4 {
            4 => (IPV4, data),
            6 => (IPV6, data),
            _ => return None,
        },
        linktype::IPV4 => (IPV4, data),
        linktype::IPV6 => (IPV6, data),
        linktype::NULL => {
            // The family is in the writer's byte order: AF_INET is 2, AF_INET6 24, 28 or 30.
            let fam = data.get(..4)?;
            let v = if fam[0] != 0 { fam[0] } else { fam[3] };
            match v {
                2 => (IPV4, &data[4..]),
                24 | 28 | 30 => (IPV6, &data[4..]),
                _ => return None,
            }
        }
        linktype::LINUX_SLL => {
            let h = data.get(..16)?;
            ([h[14], h[15]], &data[16..])
        }
        _ => return None,
    };
    let mut f = Vec::with_capacity(14 + l3.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ethertype);
    f.extend_from_slice(l3);
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_records_round_trip() {
        let mut w = Vec::new();
        write_header(&mut w, 65535).unwrap();
        let frames: [&[u8]; 3] = [&[1, 2, 3], &[], &[0xff; 1514]];
        for (i, f) in frames.iter().enumerate() {
            write_record(&mut w, 1_000_000 * i as u64 + 7, f.len() as u32 + 4, f).unwrap();
        }
        let c = read_capture(&mut w.as_slice()).unwrap();
        assert_eq!(c.linktype, LINKTYPE_ETHERNET);
        assert_eq!(c.records.len(), 3);
        for (i, r) in c.records.iter().enumerate() {
            assert_eq!(r.data, frames[i]);
            assert_eq!(r.ts_us, 1_000_000 * i as u64 + 7);
            assert_eq!(r.orig_len as usize, frames[i].len() + 4);
        }
        assert_eq!(read_all(&mut w.as_slice()).unwrap(), c.records);
        // A cut record is an error, not a silent short read.
        let e = read_capture(&mut &w[..w.len() - 1]).unwrap_err();
        assert!(e.contains("truncated record data"), "{e}");
    }

    #[test]
    fn big_endian_nanosecond_and_pcapng() {
        let mut w = Vec::new();
        w.extend_from_slice(&MAGIC_NS.to_be_bytes());
        w.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        w.extend_from_slice(&linktype::RAW.to_be_bytes());
        w.extend_from_slice(&5u32.to_be_bytes());
        w.extend_from_slice(&1_500_000u32.to_be_bytes());
        w.extend_from_slice(&1u32.to_be_bytes());
        w.extend_from_slice(&1u32.to_be_bytes());
        w.push(0x45);
        let c = read_capture(&mut w.as_slice()).unwrap();
        assert_eq!(c.linktype, linktype::RAW);
        assert_eq!(c.records[0].ts_us, 5_001_500);
        let eth = ethernet_frame(c.linktype, &c.records[0].data).unwrap();
        assert_eq!(&eth[12..], &[0x08, 0x00, 0x45]);
        assert!(read_all(&mut w.as_slice())
            .unwrap_err()
            .contains("link type 101"));
        let e = read_capture(&mut &[0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0][..]).unwrap_err();
        assert!(e.contains("pcapng"), "{e}");
        // Linux cooked capture: the EtherType is kept, the 16-byte header replaced.
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x86, 0xdd, 0x60]);
        assert_eq!(
            &ethernet_frame(linktype::LINUX_SLL, &sll).unwrap()[12..],
            &[0x86, 0xdd, 0x60]
        );
        assert_eq!(
            ethernet_frame(linktype::NULL, &[2, 0, 0, 0, 0x45]).unwrap()[12..],
            [8, 0, 0x45]
        );
        assert_eq!(ethernet_frame(9, &[0; 20]), None);
    }
}
