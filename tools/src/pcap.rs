//! Minimal pcap (libpcap classic format, microsecond timestamps, link type Ethernet) writer and reader.

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

/// Reads a little-endian microsecond pcap written by [`write_header`]/[`write_record`].
pub fn read_all(r: &mut impl std::io::Read) -> Result<Vec<Record>, String> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)
        .map_err(|e| format!("read pcap: {e}"))?;
    if buf.len() < 24 || buf[..4] != MAGIC_US.to_le_bytes() {
        return Err("not a little-endian microsecond pcap file".into());
    }
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut at = 24;
    let mut out = Vec::new();
    while at < buf.len() {
        if buf.len() - at < 16 {
            return Err(format!("truncated record header at byte {at}"));
        }
        let (s, us, incl, orig) = (
            le32(&buf, at),
            le32(&buf, at + 4),
            le32(&buf, at + 8) as usize,
            le32(&buf, at + 12),
        );
        at += 16;
        if buf.len() - at < incl {
            return Err(format!("truncated record data at byte {at}"));
        }
        out.push(Record {
            ts_us: u64::from(s) * 1_000_000 + u64::from(us),
            orig_len: orig,
            data: buf[at..at + incl].to_vec(),
        });
        at += incl;
    }
    Ok(out)
}
