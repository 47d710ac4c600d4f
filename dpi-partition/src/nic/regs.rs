//! 82540EM register map and bit fields (Intel 8254x Family of Gigabit Ethernet Controllers
//! Software Developer's Manual, "SDM" below, section 13 "Register Descriptions").

use core::fmt;

/// A register's byte offset in BAR0 (SDM 13, table 13-2). All registers Ally touches are 32 bits
/// wide and 4-byte aligned.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Reg(pub u32);

impl Reg {
    pub const CTRL: Reg = Reg(0x0000);
    pub const STATUS: Reg = Reg(0x0008);
    pub const EECD: Reg = Reg(0x0010);
    pub const EERD: Reg = Reg(0x0014);
    pub const CTRL_EXT: Reg = Reg(0x0018);
    pub const FLA: Reg = Reg(0x001C);
    pub const MDIC: Reg = Reg(0x0020);
    pub const FCAL: Reg = Reg(0x0028);
    pub const FCAH: Reg = Reg(0x002C);
    pub const FCT: Reg = Reg(0x0030);
    pub const VET: Reg = Reg(0x0038);
    pub const ICR: Reg = Reg(0x00C0);
    pub const ITR: Reg = Reg(0x00C4);
    pub const ICS: Reg = Reg(0x00C8);
    pub const IMS: Reg = Reg(0x00D0);
    pub const IMC: Reg = Reg(0x00D8);
    pub const RCTL: Reg = Reg(0x0100);
    pub const FCTTV: Reg = Reg(0x0170);
    pub const TCTL: Reg = Reg(0x0400);
    pub const TIPG: Reg = Reg(0x0410);
    pub const FCRTL: Reg = Reg(0x2160);
    pub const FCRTH: Reg = Reg(0x2168);
    pub const RDBAL: Reg = Reg(0x2800);
    pub const RDBAH: Reg = Reg(0x2804);
    pub const RDLEN: Reg = Reg(0x2808);
    pub const RDH: Reg = Reg(0x2810);
    pub const RDT: Reg = Reg(0x2818);
    pub const RDTR: Reg = Reg(0x2820);
    pub const RXDCTL: Reg = Reg(0x2828);
    pub const RADV: Reg = Reg(0x282C);
    pub const RSRPD: Reg = Reg(0x2C00);
    pub const TDBAL: Reg = Reg(0x3800);
    pub const TDBAH: Reg = Reg(0x3804);
    pub const TDLEN: Reg = Reg(0x3808);
    pub const TDH: Reg = Reg(0x3810);
    pub const TDT: Reg = Reg(0x3818);
    pub const TIDV: Reg = Reg(0x3820);
    pub const TXDCTL: Reg = Reg(0x3828);
    pub const TADV: Reg = Reg(0x382C);
    /// Missed Packets Count (SDM 13.7.5): frames the device dropped for lack of a free receive
    /// descriptor or packet buffer space. Clear on read in the SDM; QEMU's and Bochs' models
    /// keep a running count (`shadow::MissedFrames`).
    pub const MPC: Reg = Reg(0x4010);
    pub const RXCSUM: Reg = Reg(0x5000);
    pub const MTA: Reg = Reg(0x5200);
    pub const RAL0: Reg = Reg(0x5400);
    pub const RAH0: Reg = Reg(0x5404);
    pub const WUC: Reg = Reg(0x5800);
    pub const WUFC: Reg = Reg(0x5808);
    pub const MANC: Reg = Reg(0x5820);
    /// Size of the memory BAR (SDM 4.1: 128 KiB of register space).
    pub const BAR0_SIZE: u32 = 0x2_0000;

    /// Index into a `u32` register array.
    pub const fn index(self) -> usize {
        (self.0 >> 2) as usize
    }

    /// The register an offset really addresses. The 8254x keeps 82542-compatible aliases of
    /// the ring registers (SDM 13.2, table 13-2 "alias" offsets): a write to 0x0420 programs
    /// TDBAL. Anything that filters register accesses must look through them, or a guest could
    /// move the real rings by writing an alias.
    pub const fn canonical(self) -> Reg {
        match self.0 {
            0x0110 => Reg::RDBAL,
            0x0114 => Reg::RDBAH,
            0x0118 => Reg::RDLEN,
            0x0120 => Reg::RDH,
            0x0128 => Reg::RDT,
            0x0108 => Reg::RDTR,
            0x0420 => Reg::TDBAL,
            0x0424 => Reg::TDBAH,
            0x0428 => Reg::TDLEN,
            0x0430 => Reg::TDH,
            0x0438 => Reg::TDT,
            0x0440 => Reg::TIDV,
            0x0160 => Reg::FCRTH,
            0x0168 => Reg::FCRTL,
            _ => self,
        }
    }
}

impl Reg {
    /// The register's name in the SDM, for the registers Ally shadows or counts by name.
    pub fn name(self) -> &'static str {
        match self {
            Reg::CTRL => "CTRL",
            Reg::STATUS => "STATUS",
            Reg::ICR => "ICR",
            Reg::ICS => "ICS",
            Reg::IMS => "IMS",
            Reg::IMC => "IMC",
            Reg::RCTL => "RCTL",
            Reg::TCTL => "TCTL",
            Reg::RDBAL => "RDBAL",
            Reg::RDBAH => "RDBAH",
            Reg::RDLEN => "RDLEN",
            Reg::RDH => "RDH",
            Reg::RDT => "RDT",
            Reg::TDBAL => "TDBAL",
            Reg::TDBAH => "TDBAH",
            Reg::TDLEN => "TDLEN",
            Reg::TDH => "TDH",
            Reg::TDT => "TDT",
            Reg::EECD => "EECD",
            Reg::EERD => "EERD",
            Reg::CTRL_EXT => "CTRL_EXT",
            Reg::MDIC => "MDIC",
            Reg::ITR => "ITR",
            Reg::RDTR => "RDTR",
            Reg::RADV => "RADV",
            Reg::TIDV => "TIDV",
            Reg::TADV => "TADV",
            Reg::MPC => "MPC",
            _ => "other",
        }
    }
}

impl fmt::Debug for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "other" => write!(f, "Reg({:#x})", self.0),
            name => f.write_str(name),
        }
    }
}

/// Device control (SDM 13.4.1).
pub mod ctrl {
    pub const FD: u32 = 1 << 0;
    pub const LRST: u32 = 1 << 3;
    pub const ASDE: u32 = 1 << 5;
    pub const SLU: u32 = 1 << 6;
    /// Device reset; self-clearing (SDM 13.4.1, 8.x "Software reset").
    pub const RST: u32 = 1 << 26;
    /// Transmit flow control enable: the MAC sends XOFF/XON frames on its own.
    pub const TFCE: u32 = 1 << 28;
    /// VLAN mode enable: the MAC inserts the tag of a VLE descriptor on transmit and strips
    /// an 802.1Q tag (VET) from a received frame into the descriptor's special field, VP set
    /// (SDM 13.4.1, 3.2.3.1, 3.3.3.1).
    pub const VME: u32 = 1 << 30;
    pub const PHY_RST: u32 = 1 << 31;
    /// The bits the 82540EM defines (SDM 13.4.1, table 13-3): FD, LRST, ASDE, SLU, ILOS,
    /// SPEED, FRCSPD, FRCDPLX, SDP0/1_DATA, ADVD3WUC, EN_PHY_PWR_MGMT, SDP0/1_IODIR, RST,
    /// RFCE, TFCE, VME, PHY_RST. The rest are reserved ("write as 0b").
    pub const DEFINED: u32 = 0xDCFC_1BE9;
}

/// Device status (SDM 13.4.2).
pub mod status {
    pub const FD: u32 = 1 << 0;
    /// Link up.
    pub const LU: u32 = 1 << 1;
    /// Speed 1000 Mb/s (bits 7:6 = 10b).
    pub const SPEED_1000: u32 = 2 << 6;
}

/// Interrupt causes, shared by ICR/ICS/IMS/IMC (SDM 13.4.17–13.4.21).
pub mod icr {
    /// Transmit descriptor written back.
    pub const TXDW: u32 = 1 << 0;
    /// Transmit queue empty.
    pub const TXQE: u32 = 1 << 1;
    /// Link status change.
    pub const LSC: u32 = 1 << 2;
    /// Receive sequence error.
    pub const RXSEQ: u32 = 1 << 3;
    /// Receive descriptor minimum threshold reached.
    pub const RXDMT0: u32 = 1 << 4;
    /// Receiver overrun.
    pub const RXO: u32 = 1 << 6;
    /// Receiver timer interrupt (frame received).
    pub const RXT0: u32 = 1 << 7;
    pub const MDAC: u32 = 1 << 9;
    pub const RXCFG: u32 = 1 << 10;
    pub const TXD_LOW: u32 = 1 << 15;
    /// Small receive packet detected; Ally uses it as its own doorbell cause (see `shadow`).
    pub const SRPD: u32 = 1 << 16;
    /// Every cause bit the 82540EM defines.
    pub const ALL: u32 = 0x0001_F6DF;
}

/// Receive control (SDM 13.4.22).
pub mod rctl {
    pub const EN: u32 = 1 << 1;
    pub const SBP: u32 = 1 << 2;
    pub const UPE: u32 = 1 << 3;
    pub const MPE: u32 = 1 << 4;
    /// Long packet enable (frames > 1522 bytes).
    pub const LPE: u32 = 1 << 5;
    pub const BAM: u32 = 1 << 15;
    /// Buffer size, bits 17:16.
    pub const BSIZE_MASK: u32 = 3 << 16;
    pub const BSIZE_SHIFT: u32 = 16;
    /// Buffer size extension (x16).
    pub const BSEX: u32 = 1 << 25;
    /// Loopback mode, bits 7:6 (00b normal).
    pub const LBM_MASK: u32 = 3 << 6;
    /// Strip Ethernet CRC.
    pub const SECRC: u32 = 1 << 26;

    /// The receive buffer size RCTL selects (SDM 13.4.22 BSIZE/BSEX), `None` for the reserved
    /// encoding BSEX=1, BSIZE=00.
    pub const fn buffer_size(rctl: u32) -> Option<u32> {
        let bsize = (rctl & BSIZE_MASK) >> BSIZE_SHIFT;
        if rctl & BSEX == 0 {
            Some(2048 >> bsize)
        } else if bsize == 0 {
            None
        } else {
            Some(32768 >> bsize)
        }
    }

    /// RCTL bits selecting `size` (one of 256..2048, 4096, 8192, 16384).
    pub const fn for_buffer_size(size: u32) -> Option<u32> {
        match size {
            2048 => Some(0),
            1024 => Some(1 << BSIZE_SHIFT),
            512 => Some(2 << BSIZE_SHIFT),
            256 => Some(3 << BSIZE_SHIFT),
            16384 => Some(BSEX | (1 << BSIZE_SHIFT)),
            8192 => Some(BSEX | (2 << BSIZE_SHIFT)),
            4096 => Some(BSEX | (3 << BSIZE_SHIFT)),
            _ => None,
        }
    }
}

/// Transmit control (SDM 13.4.33).
pub mod tctl {
    pub const EN: u32 = 1 << 1;
    pub const PSP: u32 = 1 << 3;
    /// Software XOFF: the MAC sends one PAUSE frame (self-clearing).
    pub const SWXOFF: u32 = 1 << 22;
}

/// EEPROM/flash control (SDM 13.4.3): the driver bit-bangs the Microwire EEPROM through it.
pub mod eecd {
    /// Clock input to the EEPROM.
    pub const SK: u32 = 1 << 0;
    /// Chip select.
    pub const CS: u32 = 1 << 1;
    /// Data input to the EEPROM.
    pub const DI: u32 = 1 << 2;
    /// Data output from the EEPROM (read only).
    pub const DO: u32 = 1 << 3;
    /// Flash write enable, bits 5:4: 01b disabled, 10b enabled.
    pub const FWE_MASK: u32 = 3 << 4;
    pub const FWE_DISABLED: u32 = 1 << 4;
    pub const FWE_ENABLED: u32 = 2 << 4;
}

/// MDI control (SDM 13.4.5): a PHY register access.
pub mod mdic {
    pub const DATA_MASK: u32 = 0xFFFF;
    pub const REGADD_SHIFT: u32 = 16;
    pub const REGADD_MASK: u32 = 0x1F << REGADD_SHIFT;
    pub const OP_MASK: u32 = 3 << 26;
    pub const OP_WRITE: u32 = 1 << 26;
    /// PHY register 0 (control), bit 14: loopback (IEEE 802.3 22.2.4.1.2).
    pub const PHY_CTRL: u32 = 0;
    pub const PHY_CTRL_LOOPBACK: u32 = 1 << 14;
}

/// Flow control (SDM 13.4.6-13.4.8, 13.4.13, 13.4.14).
pub mod fc {
    /// The values the manual prescribes for FCAL, FCAH and FCT: the 802.3x PAUSE address
    /// 01:80:C2:00:00:01 and the MAC control Ethertype 0x8808.
    pub const FCAL: u32 = 0x00C2_8001;
    pub const FCAH: u32 = 0x0100;
    pub const FCT: u32 = 0x8808;
    /// FCRTL bit 31: send XON when the receive FIFO drains below the low threshold.
    pub const XONE: u32 = 1 << 31;
    /// The IEEE 802.1Q TPID VET must hold (SDM 13.4.9).
    pub const VLAN_ETHERTYPE: u32 = 0x8100;
}

/// Wake-up control (SDM 13.6.1): APME, PME_EN, PME_STATUS, APMPME.
pub mod wuc {
    /// PME_Status, write 1 to clear: the only bit the guest may write.
    pub const PME_STATUS: u32 = 1 << 2;
}

/// Descriptor ring length rules (SDM 13.4.27 RDLEN, 13.4.39 TDLEN): a multiple of 128 bytes,
/// bits 19:7 only, so at most 2^20 − 128 bytes.
pub const RING_LEN_ALIGN: u32 = 128;
pub const RING_LEN_MAX: u32 = (1 << 20) - 128;

/// Access to a NIC's 32-bit registers: the real device's BAR0 through volatile MMIO on bare
/// metal, the software model in tests. `&self` because the OS core's exit handler and the DPI
/// core share the device.
pub trait NicRegisters {
    /// Read a register (reads may have side effects, e.g. ICR clears on read).
    fn read32(&self, reg: Reg) -> u32;
    /// Write a register.
    fn write32(&self, reg: Reg, value: u32);
}

impl<T: NicRegisters + ?Sized> NicRegisters for &T {
    fn read32(&self, reg: Reg) -> u32 {
        (**self).read32(reg)
    }
    fn write32(&self, reg: Reg, value: u32) {
        (**self).write32(reg, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_buffer_sizes_round_trip() {
        for size in [256, 512, 1024, 2048, 4096, 8192, 16384] {
            let bits = rctl::for_buffer_size(size).unwrap();
            assert_eq!(rctl::buffer_size(bits | rctl::EN), Some(size));
        }
        assert_eq!(rctl::buffer_size(rctl::BSEX), None);
        assert_eq!(rctl::for_buffer_size(3000), None);
    }

    #[test]
    fn register_names() {
        assert_eq!(alloc::format!("{:?}", Reg::TDT), "TDT");
        assert_eq!(alloc::format!("{:?}", Reg(0x5400)), "Reg(0x5400)");
        assert_eq!(Reg::TDT.index(), 0x3818 / 4);
        assert_eq!(Reg(0x0420).canonical(), Reg::TDBAL);
        assert_eq!(Reg(0x0128).canonical(), Reg::RDT);
        assert_eq!(Reg::ICR.canonical(), Reg::ICR);
    }
}
