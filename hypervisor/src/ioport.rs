//! Port I/O seen byte by byte. The I/O address space is byte-addressed: an OUT of 2 or 4 bytes
//! at port P writes its byte i to port P + i (SDM Vol. 1, 19.3 "I/O address space"), and a VM
//! exit reports only P and the width. Guards judge the bytes that land in the registers they
//! watch, whatever width and alignment the guest chose, so a word OUT at 0x91 is a write of
//! port 0x92 and a word OUT at 0xCF8 a write of port 0xCF9.

/// One OUT instruction as the exit reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortWrite {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    /// The value, in its low `size` bytes.
    pub value: u32,
}

impl PortWrite {
    pub fn new(port: u16, size: u8, value: u32) -> Self {
        Self { port, size, value }
    }

    /// The byte this access writes to `port`, if it covers it.
    pub fn byte_at(&self, port: u16) -> Option<u8> {
        let lane = u32::from(port).checked_sub(u32::from(self.port))?;
        (lane < u32::from(self.size)).then(|| (self.value >> (8 * lane)) as u8)
    }

    /// What this access writes into the `width`-byte register at `register`: a mask of the
    /// register bits it writes and their values (both aligned to the register), if it touches
    /// the register at all.
    pub fn into_register(&self, register: u16, width: u8) -> Option<(u32, u32)> {
        let (mut mask, mut value) = (0u32, 0u32);
        for i in 0..u16::from(width.min(4)) {
            if let Some(byte) = register.checked_add(i).and_then(|p| self.byte_at(p)) {
                mask |= 0xFF << (8 * i);
                value |= u32::from(byte) << (8 * i);
            }
        }
        (mask != 0).then_some((mask, value))
    }

    /// Whether the access touches any port in `[first, first + count)`.
    pub fn touches(&self, first: u16, count: u16) -> bool {
        let (a, b) = (
            u32::from(self.port),
            u32::from(self.port) + u32::from(self.size),
        );
        let (c, d) = (u32::from(first), u32::from(first) + u32::from(count));
        a < d && c < b
    }

    /// The same access with the byte at `port` replaced (for guards that correct one
    /// register's bits and forward the rest unchanged).
    pub fn with_byte(mut self, port: u16, byte: u8) -> Self {
        if let Some(lane) = u32::from(port).checked_sub(u32::from(self.port)) {
            if lane < u32::from(self.size) {
                let shift = 8 * lane;
                self.value = (self.value & !(0xFF << shift)) | (u32::from(byte) << shift);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_land_on_consecutive_ports() {
        let w = PortWrite::new(0x91, 2, 0x0100);
        assert_eq!(w.byte_at(0x91), Some(0x00));
        assert_eq!(w.byte_at(0x92), Some(0x01));
        assert_eq!(w.byte_at(0x93), None);
        assert_eq!(w.byte_at(0x90), None);
        let d = PortWrite::new(0xCF8, 4, 0x8000_0614);
        assert_eq!(d.byte_at(0xCF9), Some(0x06));
        assert_eq!(d.byte_at(0xCFB), Some(0x80));
        // The top of the port space does not wrap.
        assert_eq!(
            PortWrite::new(0xFFFF, 4, 0xAABB_CCDD).byte_at(0xFFFF),
            Some(0xDD)
        );
        assert_eq!(PortWrite::new(0xFFFF, 4, 0xAABB_CCDD).byte_at(0), None);
    }

    #[test]
    fn partial_register_writes() {
        // A byte OUT to the high byte of a 16-bit register.
        let w = PortWrite::new(0xB005, 1, 0x34);
        assert_eq!(w.into_register(0xB004, 2), Some((0xFF00, 0x3400)));
        // A dword at the register below covers the register's both bytes.
        let d = PortWrite::new(0xB002, 4, 0x3400_1234);
        assert_eq!(d.into_register(0xB004, 2), Some((0xFFFF, 0x3400)));
        assert_eq!(PortWrite::new(0xB000, 4, 0).into_register(0xB004, 2), None);
        assert!(d.touches(0xB005, 1));
        assert!(!d.touches(0xB006, 2));
    }

    #[test]
    fn one_byte_replaced() {
        let w = PortWrite::new(0x91, 2, 0x0001).with_byte(0x92, 0x02);
        assert_eq!(w.value, 0x0201);
        assert_eq!(PortWrite::new(0x60, 1, 0xFE).with_byte(0x61, 0).value, 0xFE);
    }
}
