//! The 82540EM pieces the NIC attacks need (8254x Family SDM): register offsets, the
//! microwire EEPROM commands, TX descriptors, and a UDP/IPv4 frame. Pure: host-tested.

/// Register offsets in BAR0 (SDM 13.4).
pub const CTRL: usize = 0x0000;
pub const STATUS: usize = 0x0008;
pub const EECD: usize = 0x0010;
pub const EERD: usize = 0x0014;
pub const FCAL: usize = 0x0028;
pub const FCAH: usize = 0x002c;
pub const FCTTV: usize = 0x0170;
pub const TCTL: usize = 0x0400;
/// Packet buffer allocation (SDM 13.4.23): on a page Ally leaves mapped.
pub const PBA: usize = 0x1000;
pub const TIPG: usize = 0x0410;
pub const TDBAL: usize = 0x3800;
pub const TDBAH: usize = 0x3804;
pub const TDLEN: usize = 0x3808;
pub const TDH: usize = 0x3810;
pub const TDT: usize = 0x3818;
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;

/// CTRL.SLU, set link up (SDM 13.4.1).
pub const CTRL_SLU: u32 = 1 << 6;
/// TCTL bits (SDM 13.4.33): EN, PSP, CT = 0x10, COLD = 0x40, SWXOFF.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;
pub const TCTL_CT_COLD: u32 = (0x10 << 4) | (0x40 << 12);
pub const TCTL_SWXOFF: u32 = 1 << 22;
/// TIPG for IEEE 802.3 copper (SDM 13.4.34): IPGT 10, IPGR1 8, IPGR2 6.
pub const TIPG_COPPER: u32 = 10 | (8 << 10) | (6 << 20);

/// EECD bits (SDM 13.4.3).
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
/// EERD bits on the 82540EM (SDM 13.4.4): START, DONE, address at 15:8, data at 31:16.
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;

/// Address bits of the 82540EM's 64-word microwire EEPROM.
pub const EEPROM_ADDR_BITS: u32 = 6;

/// A microwire command as (value, bit count), shifted out MSB first (SDM 5.3.1): the start
/// bit, the 2-bit opcode and the address.
pub fn microwire_command(opcode: u8, addr: u8) -> (u32, u32) {
    let bits = 1 + 2 + EEPROM_ADDR_BITS;
    let v =
        (1 << (bits - 1)) | (u32::from(opcode & 3) << EEPROM_ADDR_BITS) | u32::from(addr & 0x3f);
    (v, bits)
}

/// Microwire opcodes (93C46, SDM 5.3.1): READ 10, WRITE 01, and 00 with the address's top
/// two bits selecting EWEN (11) / EWDS (00).
pub const OP_READ: u8 = 0b10;
pub const OP_WRITE: u8 = 0b01;
pub const OP_EXT: u8 = 0b00;
pub const ADDR_EWEN: u8 = 0b11_0000;
pub const ADDR_EWDS: u8 = 0b00_0000;

/// TX descriptor bits (SDM 3.3.6-3.3.7): DTYP (bits 23:20 of the length dword) 0 = context,
/// 1 = data; command byte: EOP, IFCS, RS, DEXT; POPTS TXSM; status DD.
pub const DTYP_DATA: u32 = 1 << 20;
pub const DCMD_EOP: u8 = 1 << 0;
pub const DCMD_IFCS: u8 = 1 << 1;
pub const DCMD_RS: u8 = 1 << 3;
pub const DCMD_DEXT: u8 = 1 << 5;
/// TUCMD.IP: IPv4 (for the context descriptor); TUCMD.TCP clear = UDP.
pub const TUCMD_IP: u8 = 1 << 1;
pub const POPTS_TXSM: u8 = 1 << 1;
pub const STA_DD: u8 = 1 << 0;
pub const DESC_BYTES: usize = 16;

/// A TCP/IP context descriptor (SDM 3.3.6): checksum start, offset and end (0 = to the end).
pub fn context_descriptor(tucss: u8, tucso: u8, tucse: u16) -> [u8; DESC_BYTES] {
    let mut d = [0u8; DESC_BYTES];
    d[4] = tucss;
    d[5] = tucso;
    d[6..8].copy_from_slice(&tucse.to_le_bytes());
    // PAYLEN 0, DTYP 0 (context), TUCMD: DEXT | IP (UDP), RS for a write-back.
    d[11] = DCMD_DEXT | TUCMD_IP | DCMD_RS;
    d
}

/// A TCP/IP data descriptor (SDM 3.3.7) with EOP, IFCS, RS and POPTS.TXSM.
pub fn data_descriptor(buffer: u64, len: u16) -> [u8; DESC_BYTES] {
    let mut d = [0u8; DESC_BYTES];
    d[..8].copy_from_slice(&buffer.to_le_bytes());
    let dword = u32::from(len) | DTYP_DATA;
    d[8..12].copy_from_slice(&dword.to_le_bytes());
    d[11] = DCMD_EOP | DCMD_IFCS | DCMD_RS | DCMD_DEXT;
    d[13] = POPTS_TXSM;
    d
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offsets in an untagged Ethernet + IPv4 (no options) + UDP frame.
pub const IP_START: usize = 14;
pub const UDP_START: usize = IP_START + 20;
pub const PAYLOAD_START: usize = UDP_START + 8;

/// An Ethernet/IPv4/UDP frame, UDP checksum 0 (none), IP header checksum filled in.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(PAYLOAD_START + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0xa11eu16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let c = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&ports.0.to_be_bytes());
    f.extend_from_slice(&ports.1.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The MAC address in RAL0/RAH0 (SDM 13.4.62): bytes 0-3 low, 4-5 high.
pub fn mac_from_ral(ral: u32, rah: u32) -> [u8; 6] {
    let l = ral.to_le_bytes();
    let h = rah.to_le_bytes();
    [l[0], l[1], l[2], l[3], h[0], h[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microwire_commands() {
        // READ word 0: 1 10 000000 = 0x180
        assert_eq!(microwire_command(OP_READ, 0), (0x180, 9));
        // EWEN: 1 00 110000 = 0x130
        assert_eq!(microwire_command(OP_EXT, ADDR_EWEN), (0x130, 9));
        // WRITE word 5: 1 01 000101 = 0x145
        assert_eq!(microwire_command(OP_WRITE, 5), (0x145, 9));
    }

    #[test]
    fn descriptors() {
        let c = context_descriptor(34, 46, 0);
        assert_eq!(&c[4..8], &[34, 46, 0, 0]);
        assert_eq!(c[11], 0x2a, "DEXT | IP | RS, DTYP 0");
        assert_eq!(c[11] & 1, 0, "UDP");
        let d = data_descriptor(0x1234_5000, 60);
        assert_eq!(u64::from_le_bytes(d[..8].try_into().unwrap()), 0x1234_5000);
        assert_eq!(u16::from_le_bytes([d[8], d[9]]), 60);
        assert_eq!(d[10] & 0xf0, 0x10, "DTYP data");
        assert_eq!(d[11], 0x2b, "EOP | IFCS | RS | DEXT");
        assert_eq!(d[13], POPTS_TXSM);
    }

    #[test]
    fn checksum_known_vector() {
        // The IPv4 header example of RFC 1071 practice (Wikipedia's): checksum 0xB861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        assert_eq!(internet_checksum(&[0xff]), 0x00ff);
    }

    #[test]
    fn udp_frame_layout() {
        let f = udp_frame(
            [2; 6],
            [4; 6],
            [10, 0, 2, 15],
            [10, 0, 2, 2],
            (4000, 5555),
            b"ALLY",
        );
        assert_eq!(f.len(), PAYLOAD_START + 4);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(
            internet_checksum(&f[IP_START..UDP_START]),
            0,
            "header checksum"
        );
        assert_eq!(
            u16::from_be_bytes([f[UDP_START + 2], f[UDP_START + 3]]),
            5555
        );
        assert_eq!(u16::from_be_bytes([f[UDP_START + 4], f[UDP_START + 5]]), 12);
        assert_eq!(&f[PAYLOAD_START..], b"ALLY");
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:55:0a:00:02:02"),
            Some([0x52, 0x55, 10, 0, 2, 2])
        );
        assert_eq!(parse_mac("52:55:0a:00:02"), None);
        assert_eq!(parse_mac("52:55:0a:00:02:02:01"), None);
        assert_eq!(
            mac_from_ral(0x1200_5452, 0x8000_5634),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
    }
}
