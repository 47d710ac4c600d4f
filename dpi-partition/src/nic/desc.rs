//! 82540EM descriptor formats (SDM 3.2.3 receive descriptor, 3.3.3 legacy transmit descriptor,
//! 3.3.5/3.3.6 TCP/IP context descriptor, 3.3.7 TCP/IP data descriptor). All are 16 bytes,
//! little-endian; they are decoded from and encoded to bytes explicitly so guest memory is never
//! reinterpreted in place.

/// Size of every e1000 descriptor.
pub const DESC_SIZE: usize = 16;

/// Transmit command bits (legacy CMD, context TUCMD and data DCMD share positions: byte 11).
pub mod txcmd {
    /// End of packet.
    pub const EOP: u8 = 0x01;
    /// Insert FCS.
    pub const IFCS: u8 = 0x02;
    /// Insert checksum (legacy only).
    pub const IC: u8 = 0x04;
    /// TCP segmentation enable (data descriptor DCMD / context TUCMD).
    pub const TSE: u8 = 0x04;
    /// Report status: write DD back when done.
    pub const RS: u8 = 0x08;
    /// Descriptor extension: context or data descriptor rather than legacy.
    pub const DEXT: u8 = 0x20;
    /// VLAN packet enable.
    pub const VLE: u8 = 0x40;
    /// Interrupt delay enable.
    pub const IDE: u8 = 0x80;
    /// Context TUCMD: TCP (else UDP).
    pub const TUCMD_TCP: u8 = 0x01;
    /// Context TUCMD: IPv4 (else IPv6).
    pub const TUCMD_IP: u8 = 0x02;
}

/// Transmit status bits (byte 12).
pub mod txsta {
    /// Descriptor done.
    pub const DD: u8 = 0x01;
    /// Excess collisions.
    pub const EC: u8 = 0x02;
    /// Late collision.
    pub const LC: u8 = 0x04;
    /// Transmit underrun.
    pub const TU: u8 = 0x08;
}

/// Data-descriptor packet options (POPTS, byte 13).
pub mod popts {
    /// Insert IP checksum.
    pub const IXSM: u8 = 0x01;
    /// Insert TCP/UDP checksum.
    pub const TXSM: u8 = 0x02;
}

/// Receive status bits (SDM 3.2.3.1).
pub mod rxsta {
    pub const DD: u8 = 0x01;
    pub const EOP: u8 = 0x02;
    /// Ignore checksum indication.
    pub const IXSM: u8 = 0x04;
    pub const VP: u8 = 0x08;
    pub const TCPCS: u8 = 0x20;
    pub const IPCS: u8 = 0x40;
    pub const PIF: u8 = 0x80;
}

/// Receive error bits (SDM 3.2.3.2).
pub mod rxerr {
    pub const CE: u8 = 0x01;
    pub const SE: u8 = 0x02;
    pub const SEQ: u8 = 0x04;
    pub const CXE: u8 = 0x10;
    pub const TCPE: u8 = 0x20;
    pub const IPE: u8 = 0x40;
    pub const RXE: u8 = 0x80;
}

/// Byte offsets shared by the transmit formats.
pub const TX_CMD_OFFSET: usize = 11;
pub const TX_STATUS_OFFSET: usize = 12;

/// DTYP values of extended descriptors (SDM 3.3.5, 3.3.7).
pub const DTYP_CONTEXT: u8 = 0;
pub const DTYP_DATA: u8 = 1;

fn le64(b: &[u8; 16], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
fn le32(b: &[u8; 16], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le16(b: &[u8; 16], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Legacy transmit descriptor (SDM 3.3.3, table 3-8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LegacyTxDesc {
    pub buffer_addr: u64,
    pub length: u16,
    /// Checksum offset.
    pub cso: u8,
    pub cmd: u8,
    /// Status in bits 3:0, reserved 7:4.
    pub status: u8,
    /// Checksum start.
    pub css: u8,
    pub special: u16,
}
const _: () = assert!(core::mem::size_of::<LegacyTxDesc>() == DESC_SIZE);

impl LegacyTxDesc {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            buffer_addr: le64(b, 0),
            length: le16(b, 8),
            cso: b[10],
            cmd: b[11],
            status: b[12],
            css: b[13],
            special: le16(b, 14),
        }
    }
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.buffer_addr.to_le_bytes());
        b[8..10].copy_from_slice(&self.length.to_le_bytes());
        b[10] = self.cso;
        b[11] = self.cmd;
        b[12] = self.status;
        b[13] = self.css;
        b[14..16].copy_from_slice(&self.special.to_le_bytes());
        b
    }
}

/// TCP/IP context descriptor (SDM 3.3.6, table 3-10): offload parameters for following data
/// descriptors; carries no buffer address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TxContextDesc {
    /// IP checksum start, offset, end.
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    /// TCP/UDP checksum start, offset, end.
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    /// PAYLEN bits 19:0, DTYP 23:20 (= 0), TUCMD 31:24.
    pub cmd_and_length: u32,
    pub status: u8,
    /// Header length (TSO).
    pub hdrlen: u8,
    /// Maximum segment size (TSO).
    pub mss: u16,
}
const _: () = assert!(core::mem::size_of::<TxContextDesc>() == DESC_SIZE);

impl TxContextDesc {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            ipcss: b[0],
            ipcso: b[1],
            ipcse: le16(b, 2),
            tucss: b[4],
            tucso: b[5],
            tucse: le16(b, 6),
            cmd_and_length: le32(b, 8),
            status: b[12],
            hdrlen: b[13],
            mss: le16(b, 14),
        }
    }
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.ipcss;
        b[1] = self.ipcso;
        b[2..4].copy_from_slice(&self.ipcse.to_le_bytes());
        b[4] = self.tucss;
        b[5] = self.tucso;
        b[6..8].copy_from_slice(&self.tucse.to_le_bytes());
        b[8..12].copy_from_slice(&self.cmd_and_length.to_le_bytes());
        b[12] = self.status;
        b[13] = self.hdrlen;
        b[14..16].copy_from_slice(&self.mss.to_le_bytes());
        b
    }
    pub fn paylen(&self) -> u32 {
        self.cmd_and_length & 0xF_FFFF
    }
    pub fn tucmd(&self) -> u8 {
        (self.cmd_and_length >> 24) as u8
    }
}

/// TCP/IP data descriptor (SDM 3.3.7, table 3-12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TxDataDesc {
    pub buffer_addr: u64,
    /// DTALEN bits 19:0, DTYP 23:20 (= 1), DCMD 31:24.
    pub cmd_and_length: u32,
    pub status: u8,
    pub popts: u8,
    pub special: u16,
}
const _: () = assert!(core::mem::size_of::<TxDataDesc>() == DESC_SIZE);

impl TxDataDesc {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            buffer_addr: le64(b, 0),
            cmd_and_length: le32(b, 8),
            status: b[12],
            popts: b[13],
            special: le16(b, 14),
        }
    }
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.buffer_addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.cmd_and_length.to_le_bytes());
        b[12] = self.status;
        b[13] = self.popts;
        b[14..16].copy_from_slice(&self.special.to_le_bytes());
        b
    }
    pub fn length(&self) -> u32 {
        self.cmd_and_length & 0xF_FFFF
    }
    pub fn dcmd(&self) -> u8 {
        (self.cmd_and_length >> 24) as u8
    }
    /// Build a data descriptor.
    pub fn new(addr: u64, len: u32, dcmd: u8, popts: u8, special: u16) -> Self {
        Self {
            buffer_addr: addr,
            cmd_and_length: (len & 0xF_FFFF)
                | (u32::from(DTYP_DATA) << 20)
                | (u32::from(dcmd) << 24),
            status: 0,
            popts,
            special,
        }
    }
}

/// A transmit descriptor as the device interprets it (SDM 3.3: DEXT selects legacy vs
/// extended, DTYP selects context vs data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDesc {
    Legacy(LegacyTxDesc),
    Context(TxContextDesc),
    Data(TxDataDesc),
    /// DEXT with a DTYP other than 0 or 1: reserved; the device's behaviour is undefined.
    Reserved(u8),
}

impl TxDesc {
    pub fn parse(b: &[u8; 16]) -> Self {
        if b[TX_CMD_OFFSET] & txcmd::DEXT == 0 {
            return TxDesc::Legacy(LegacyTxDesc::from_bytes(b));
        }
        match b[10] >> 4 {
            DTYP_CONTEXT => TxDesc::Context(TxContextDesc::from_bytes(b)),
            DTYP_DATA => TxDesc::Data(TxDataDesc::from_bytes(b)),
            other => TxDesc::Reserved(other),
        }
    }
}

/// Receive descriptor (SDM 3.2.3, table 3-1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RxDesc {
    pub buffer_addr: u64,
    pub length: u16,
    /// Packet checksum.
    pub csum: u16,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
}
const _: () = assert!(core::mem::size_of::<RxDesc>() == DESC_SIZE);

impl RxDesc {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            buffer_addr: le64(b, 0),
            length: le16(b, 8),
            csum: le16(b, 10),
            status: b[12],
            errors: b[13],
            special: le16(b, 14),
        }
    }
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.buffer_addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.writeback_bytes());
        b
    }
    /// The upper 8 bytes the device writes back (length, csum, status, errors, special).
    pub fn writeback_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.length.to_le_bytes());
        b[2..4].copy_from_slice(&self.csum.to_le_bytes());
        b[4] = self.status;
        b[5] = self.errors;
        b[6..8].copy_from_slice(&self.special.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_round_trip_and_layout() {
        let d = LegacyTxDesc {
            buffer_addr: 0x1122_3344_5566_7788,
            length: 0x5EA,
            cso: 3,
            cmd: txcmd::EOP | txcmd::RS | txcmd::IFCS,
            status: 0,
            css: 7,
            special: 0xABCD,
        };
        let b = d.to_bytes();
        assert_eq!(b[0], 0x88);
        assert_eq!(b[8], 0xEA);
        assert_eq!(b[11], 0x0B);
        assert_eq!(TxDesc::parse(&b), TxDesc::Legacy(d));
    }

    #[test]
    fn extended_descriptors_parse_by_dtyp() {
        let d = TxDataDesc::new(
            0x1000,
            0x12345,
            txcmd::DEXT | txcmd::EOP | txcmd::TSE,
            popts::TXSM,
            0,
        );
        assert_eq!(d.length(), 0x12345);
        assert_eq!(d.dcmd() & txcmd::TSE, txcmd::TSE);
        assert_eq!(TxDesc::parse(&d.to_bytes()), TxDesc::Data(d));
        let c = TxContextDesc {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 50,
            tucse: 0,
            cmd_and_length: 4000 | (u32::from(txcmd::DEXT | txcmd::TSE | txcmd::TUCMD_TCP) << 24),
            status: 0,
            hdrlen: 54,
            mss: 1448,
        };
        assert_eq!(c.paylen(), 4000);
        assert_eq!(TxDesc::parse(&c.to_bytes()), TxDesc::Context(c));
        let mut r = d.to_bytes();
        r[10] = 0x30;
        assert_eq!(TxDesc::parse(&r), TxDesc::Reserved(3));
    }

    #[test]
    fn rx_round_trip() {
        let d = RxDesc {
            buffer_addr: 0xdead_b000,
            length: 60,
            csum: 0x1234,
            status: rxsta::DD | rxsta::EOP,
            errors: rxerr::RXE,
            special: 5,
        };
        assert_eq!(RxDesc::from_bytes(&d.to_bytes()), d);
        assert_eq!(d.to_bytes()[12], rxsta::DD | rxsta::EOP);
    }
}
