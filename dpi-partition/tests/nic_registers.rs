//! The registers Ally does not shadow, through the OS core's trap path (`TrappedNic`) onto
//! the software e1000: every refusal class, and the sequences Linux's e1000 driver uses at
//! probe and link-up still working (EEPROM reads by bit-banging, TCTL, flow control set-up).

use ally_dpi::nic::guard::Refusal;
use ally_dpi::nic::mem::FakeDma;
use ally_dpi::nic::model::{E1000Model, ModelConfig};
use ally_dpi::nic::regs::{ctrl, eecd, fc, rctl, tctl, NicRegisters, Reg};
use ally_dpi::nic::shadow::ShadowRegs;
use ally_dpi::nic::trap::TrappedNic;
use std::sync::Mutex;

/// A 93C46 Microwire EEPROM (64 words, 6 address bits) behind EECD, as on the 82540EM.
#[derive(Default)]
struct Eeprom {
    words: Vec<u16>,
    write_enabled: bool,
    eecd: u32,
    bits: u32,
    shift: u32,
    /// Reading: the word and how many data bits have been clocked out.
    reading: Option<(usize, u32)>,
    out: bool,
    commands: Vec<&'static str>,
}

impl Eeprom {
    fn new() -> Self {
        Self {
            words: (0..64).map(|i| 0x1000 + i as u16 * 3).collect(),
            ..Self::default()
        }
    }

    fn write(&mut self, value: u32) {
        let rising = self.eecd & eecd::SK == 0 && value & eecd::SK != 0;
        self.eecd = value & !eecd::DO;
        if value & eecd::CS == 0 {
            (self.bits, self.shift, self.reading) = (0, 0, None);
            return;
        }
        if !rising {
            return;
        }
        let di = u32::from(value & eecd::DI != 0);
        if let Some((word, n)) = self.reading {
            self.out = self.words[word % 64] & (0x8000 >> (n % 16)) != 0;
            self.reading = Some(if n % 16 == 15 {
                (word + 1, n + 1)
            } else {
                (word, n + 1)
            });
            return;
        }
        if self.bits == 0 && di == 0 {
            return; // leading zeros before the start bit
        }
        self.shift = (self.shift << 1) | di;
        self.bits += 1;
        let (opcode, address) = ((self.shift >> 6) & 3, (self.shift & 0x3F) as usize);
        match (self.bits, opcode) {
            (9, 0b10) => {
                self.commands.push("READ");
                self.out = false; // the dummy zero
                self.reading = Some((address, 0));
            }
            (9, 0b11) => {
                self.commands.push("ERASE");
                if self.write_enabled {
                    self.words[address] = 0xFFFF;
                }
            }
            (9, 0b00) => match address >> 4 {
                0b11 => {
                    self.commands.push("EWEN");
                    self.write_enabled = true;
                }
                0b00 => {
                    self.commands.push("EWDS");
                    self.write_enabled = false;
                }
                _ => self.commands.push("ERAL/WRAL"),
            },
            (25, _) if (self.shift >> 22) & 3 == 0b01 => {
                self.commands.push("WRITE");
                let address = ((self.shift >> 16) & 0x3F) as usize;
                if self.write_enabled {
                    self.words[address] = self.shift as u16;
                }
            }
            _ => {}
        }
    }
}

/// The software e1000 with an EEPROM on EECD.
struct Device {
    model: E1000Model<&'static FakeDma>,
    eeprom: Mutex<Eeprom>,
}

impl NicRegisters for Device {
    fn read32(&self, reg: Reg) -> u32 {
        if reg == Reg::EECD {
            let e = self.eeprom.lock().unwrap();
            // EE_GNT follows EE_REQ at once.
            let gnt = (e.eecd & (1 << 6)) << 1;
            return e.eecd | gnt | if e.out { eecd::DO } else { 0 };
        }
        self.model.read32(reg)
    }
    fn write32(&self, reg: Reg, value: u32) {
        if reg == Reg::EECD {
            self.eeprom.lock().unwrap().write(value);
        }
        self.model.write32(reg, value)
    }
}

fn device() -> &'static Device {
    let mem: &'static FakeDma = Box::leak(Box::new(FakeDma::new(0, 1 << 20)));
    Box::leak(Box::new(Device {
        model: E1000Model::new(mem, ModelConfig::default()),
        eeprom: Mutex::new(Eeprom::new()),
    }))
}

fn trapped(dev: &'static Device) -> TrappedNic<'static, &'static Device> {
    let shadow: &'static ShadowRegs = Box::leak(Box::new(ShadowRegs::new()));
    TrappedNic::new(shadow, dev)
}

/// Linux e1000's Microwire EEPROM access for the 82540 (`e1000_hw.c`: acquire, shift out,
/// shift in, standby, release), as the guest performs it through the trap path.
struct LinuxEeprom<'a>(&'a TrappedNic<'static, &'static Device>);

const EE_REQ: u32 = 1 << 6;
const ADDRESS_BITS: u32 = 6;

impl LinuxEeprom<'_> {
    fn rd(&self) -> u32 {
        self.0.guest_read(Reg::EECD.0)
    }
    fn wr(&self, v: u32) {
        self.0.guest_write(Reg::EECD.0, v)
    }
    fn acquire(&self) {
        let mut e = self.rd() | EE_REQ;
        self.wr(e);
        e &= !(eecd::DI | eecd::SK);
        self.wr(e);
        self.wr(e | eecd::CS);
    }
    fn shift_out(&self, data: u32, count: u32) {
        let mut e = self.rd() & !(eecd::DO | eecd::DI);
        for i in (0..count).rev() {
            e &= !eecd::DI;
            if data & (1 << i) != 0 {
                e |= eecd::DI;
            }
            self.wr(e);
            self.wr(e | eecd::SK);
            self.wr(e);
        }
        self.wr(e & !eecd::DI);
    }
    fn shift_in(&self) -> u16 {
        let mut e = self.rd() & !(eecd::DO | eecd::DI);
        let mut data = 0u16;
        for _ in 0..16 {
            data <<= 1;
            self.wr(e | eecd::SK);
            e = self.rd() & !eecd::DI;
            if e & eecd::DO != 0 {
                data |= 1;
            }
            e &= !eecd::SK;
            self.wr(e);
        }
        data
    }
    fn standby(&self) {
        let mut e = self.rd() & !(eecd::CS | eecd::SK);
        self.wr(e);
        e |= eecd::SK;
        self.wr(e);
        e |= eecd::CS;
        self.wr(e);
        self.wr(e & !eecd::SK);
    }
    fn release(&self) {
        let e = self.rd() & !(eecd::CS | eecd::DI);
        self.wr(e);
        self.wr(e | eecd::SK);
        self.wr(e);
        self.wr(e & !EE_REQ);
    }
    fn read(&self, first: u32, n: u32) -> Vec<u16> {
        self.acquire();
        let words = (first..first + n)
            .map(|address| {
                self.shift_out(0b110, 3);
                self.shift_out(address, ADDRESS_BITS);
                let word = self.shift_in();
                self.standby();
                word
            })
            .collect();
        self.release();
        words
    }
    /// `e1000_write_eeprom_microwire`: EWEN, WRITE per word, EWDS.
    fn write(&self, address: u32, word: u16) {
        self.acquire();
        self.shift_out(0b10011, 5);
        self.shift_out(0, ADDRESS_BITS - 2);
        self.standby();
        self.shift_out(0b101, 3);
        self.shift_out(address, ADDRESS_BITS);
        self.shift_out(u32::from(word), 16);
        self.standby();
        self.shift_out(0b10000, 5);
        self.shift_out(0, ADDRESS_BITS - 2);
        self.release();
    }
}

#[test]
fn linux_reads_the_eeprom_by_bit_banging_and_cannot_write_it() {
    let dev = device();
    let nic = trapped(dev);
    let linux = LinuxEeprom(&nic);
    let expected: Vec<u16> = (0..64).map(|i| 0x1000 + i * 3).collect();
    assert_eq!(linux.read(0, 64), expected);
    assert_eq!(nic.guard.refused(Refusal::EepromWrite), 0);
    // ethtool -E: EWEN, WRITE, EWDS; none of them reaches the EEPROM.
    linux.write(0, 0xDEAD);
    linux.write(1, 0xBEEF);
    assert_eq!(nic.guard.refused(Refusal::EepromWrite), 6);
    {
        let e = dev.eeprom.lock().unwrap();
        assert!(!e.write_enabled);
        assert_eq!(e.commands.iter().filter(|c| **c != "READ").count(), 0);
        assert_eq!(&e.words[..], &expected[..]);
    }
    // Reads still work afterwards.
    assert_eq!(linux.read(0, 2), [0x1000, 0x1003]);
    // The flash stays write-disabled whatever the guest asks (EECD.FWE = 10b).
    nic.guest_write(Reg::EECD.0, eecd::FWE_ENABLED);
    assert_eq!(
        dev.eeprom.lock().unwrap().eecd & eecd::FWE_MASK,
        eecd::FWE_DISABLED
    );
    assert_eq!(nic.guard.refused(Refusal::Fwe), 1);
}

#[test]
fn linux_link_setup_and_transmit_control_pass_and_flow_control_transmission_does_not() {
    let dev = device();
    let nic = trapped(dev);
    // e1000_setup_link: the PAUSE address and type, the thresholds with XON, the pause time.
    nic.guest_write(Reg::FCAL.0, fc::FCAL);
    nic.guest_write(Reg::FCAH.0, fc::FCAH);
    nic.guest_write(Reg::FCT.0, fc::FCT);
    nic.guest_write(Reg::VET.0, fc::VLAN_ETHERTYPE);
    nic.guest_write(Reg::FCRTL.0, 0x7000 | fc::XONE);
    nic.guest_write(Reg::FCRTH.0, 0x8000);
    nic.guest_write(Reg::FCTTV.0, 0xFFFF);
    // e1000_configure_tx: TCTL without SWXOFF.
    let tctl = tctl::EN | tctl::PSP | (0x0F << 4) | (0x40 << 12);
    nic.guest_write(Reg::TCTL.0, tctl);
    // Link up with full flow control: CTRL.RFCE | CTRL.TFCE.
    nic.guest_write(
        Reg::CTRL.0,
        ctrl::FD | ctrl::SLU | ctrl::ASDE | (1 << 27) | ctrl::TFCE,
    );
    let m = &dev.model;
    assert_eq!(
        (m.read32(Reg::FCAL), m.read32(Reg::FCAH), m.read32(Reg::FCT)),
        (fc::FCAL, fc::FCAH, fc::FCT)
    );
    assert_eq!(m.read32(Reg::VET), 0x8100);
    assert_eq!(m.read32(Reg::FCRTL), 0x7000, "XON never enabled");
    assert_eq!(m.read32(Reg::FCRTH), 0x8000);
    assert_eq!(m.read32(Reg::FCTTV), 0);
    assert_eq!(nic.shadow.config().unwrap().tctl, tctl);
    // Receive flow control (honouring the partner's PAUSE) stays; transmitting it does not.
    assert_eq!(
        m.read32(Reg::CTRL),
        ctrl::FD | ctrl::SLU | ctrl::ASDE | (1 << 27)
    );
    for (why, n) in [
        (Refusal::FcAddr, 0),
        (Refusal::Vet, 0),
        (Refusal::Swxoff, 0),
        (Refusal::Xone, 1),
        (Refusal::Fcttv, 1),
        (Refusal::Tfce, 1),
        (Refusal::CtrlReserved, 0),
    ] {
        assert_eq!(nic.guard.refused(why), n, "{}", why.name());
    }
    // A guest that asks for a PAUSE frame, or makes its own pause frames' address, type, TPID.
    nic.guest_write(Reg::TCTL.0, tctl | tctl::SWXOFF);
    assert_eq!(nic.shadow.config().unwrap().tctl, tctl);
    nic.guest_write(Reg::FCAL.0, 0x1234_5678);
    nic.guest_write(Reg::FCT.0, 0x0800);
    nic.guest_write(0x0168, fc::XONE); // FCRTL's 82542 alias
    nic.guest_write(Reg::VET.0, 0x88A8);
    nic.guest_write(Reg::CTRL.0, ctrl::SLU | (1 << 1) | (1 << 4));
    assert_eq!(m.read32(Reg::FCAL), fc::FCAL);
    assert_eq!(m.read32(Reg::FCT), fc::FCT);
    assert_eq!(m.read32(Reg::FCRTL), 0);
    assert_eq!(m.read32(Reg::VET), 0x8100);
    assert_eq!(m.read32(Reg::CTRL), ctrl::SLU);
    for (why, n) in [
        (Refusal::Swxoff, 1),
        (Refusal::FcAddr, 2),
        (Refusal::Xone, 2),
        (Refusal::Vet, 1),
        (Refusal::CtrlReserved, 1),
    ] {
        assert_eq!(nic.guard.refused(why), n, "{}", why.name());
    }
}

#[test]
fn loopback_is_refused_in_the_mac_and_the_phy() {
    let dev = device();
    let nic = trapped(dev);
    nic.guest_write(Reg::RCTL.0, rctl::EN | rctl::BAM | (1 << 6));
    assert_eq!(nic.shadow.config().unwrap().rctl, rctl::EN | rctl::BAM);
    // MDIC write of PHY control (register 0) with loopback, PHY address 1.
    let write_phy_ctrl = (1 << 26) | (1 << 21) | 0x1140;
    nic.guest_write(Reg::MDIC.0, write_phy_ctrl | (1 << 14));
    assert_eq!(dev.model.read32(Reg::MDIC), write_phy_ctrl);
    // A read of PHY control, and a write of another PHY register with bit 14, pass.
    nic.guest_write(Reg::MDIC.0, (2 << 26) | (1 << 21) | (1 << 14));
    nic.guest_write(Reg::MDIC.0, (1 << 26) | (4 << 16) | (1 << 21) | (1 << 14));
    assert_eq!(
        dev.model.read32(Reg::MDIC),
        (1 << 26) | (4 << 16) | (1 << 21) | (1 << 14)
    );
    assert_eq!(nic.guard.refused(Refusal::Lbm), 1);
    assert_eq!(nic.guard.refused(Refusal::PhyLoopback), 1);
}

#[test]
fn packet_buffer_fifos_wakeup_memory_and_reserved_offsets_read_zero_and_ignore_writes() {
    let dev = device();
    let nic = trapped(dev);
    let m = &dev.model;
    // What the device holds there (a frame's bytes, FIFO pointers).
    for offset in [
        0x2410, 0x3418, 0x3430, 0x8010, 0x10000, 0x1FFFC, 0x5A00, 0x0004, 0x0138,
    ] {
        m.write32(Reg(offset), 0xA5A5_0000 | offset);
    }
    for (offset, why) in [
        (0x2410, Refusal::Fifo),
        (0x3418, Refusal::Fifo),
        (0x3430, Refusal::Fifo),
        (0x8010, Refusal::Fifo),
        (0x10000, Refusal::Pbm),
        (0x1FFFC, Refusal::Pbm),
        (0x5A00, Refusal::Wakeup),
        (0x0004, Refusal::Reserved),
        (0x0138, Refusal::Reserved),
    ] {
        let before = nic.guard.refused(why);
        assert_eq!(nic.guest_read(offset), 0, "{offset:#x}");
        nic.guest_write(offset, 0x5A5A);
        assert_eq!(m.read32(Reg(offset)), 0xA5A5_0000 | offset, "{offset:#x}");
        assert_eq!(nic.guard.refused(why), before + 2, "{offset:#x}");
    }
}

#[test]
fn writes_that_reach_past_the_rings_are_refused_and_their_reads_pass() {
    let dev = device();
    let nic = trapped(dev);
    let m = &dev.model;
    for (reg, why) in [
        (Reg::FLA, Refusal::Fla),
        (Reg::MANC, Refusal::Manc),
        (Reg::RSRPD, Refusal::Rsrpd),
        (Reg::RXDCTL, Refusal::DescCtl),
        (Reg::TXDCTL, Refusal::DescCtl),
    ] {
        m.write32(reg, 0x0101_0000);
        nic.guest_write(reg.0, 0xFFFF);
        assert_eq!(m.read32(reg), 0x0101_0000, "{reg:?}");
        assert_eq!(nic.guest_read(reg.0), 0x0101_0000, "{reg:?}");
        assert!(nic.guard.refused(why) >= 1, "{reg:?}");
    }
    // Wake-up: only PME_Status (write 1 to clear) gets through; no wake-up filter is enabled.
    nic.guest_write(Reg::WUC.0, 0b1111);
    assert_eq!(m.read32(Reg::WUC), 0b0100);
    nic.guest_write(Reg::WUFC.0, 0x2);
    assert_eq!(m.read32(Reg::WUFC), 0);
    nic.guest_write(Reg::WUC.0, 0);
    nic.guest_write(Reg::WUFC.0, 0);
    assert_eq!(nic.guard.refused(Refusal::Wakeup), 2);
    // Receive filters are the guest's.
    nic.guest_write(Reg::RAL0.0, 0x5634_1200);
    nic.guest_write(Reg::MTA.0 + 8, 0x10);
    assert_eq!(m.read32(Reg::RAL0), 0x5634_1200);
    assert_eq!(m.read32(Reg(Reg::MTA.0 + 8)), 0x10);
}

#[test]
fn the_report_names_every_class() {
    let dev = device();
    let nic = trapped(dev);
    nic.guest_read(0x10000);
    nic.guest_write(Reg::TCTL.0, tctl::SWXOFF);
    let mut line = String::new();
    nic.guard.write_counts(&mut line).unwrap();
    assert!(line.starts_with("SWXOFF=1 TFCE=0 "), "{line}");
    assert!(line.contains(" PBM=1 "), "{line}");
    assert!(line.contains(" EEPROM-write=0 "), "{line}");
    assert_eq!(line.split(' ').count(), Refusal::ALL.len());
}
