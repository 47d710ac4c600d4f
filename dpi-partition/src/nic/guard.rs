//! Every 82540EM register the guest can reach, and what Ally does with it (issue 11 item 7).
//!
//! The 8254x Software Developer's Manual ("SDM"), section 13, table 13-2, lists the registers
//! in BAR0. Ally decides for each 4 KiB page ([`page_policy`]) whether the guest reaches the
//! device directly (EPT-mapped) or exits, and for each register on an exiting page
//! ([`register_policy`]) whether it is shadowed, forwarded, forwarded with some bits or
//! values Ally refuses, or refused. The rule behind every decision: the guest must not make
//! the device send or receive a frame outside the rings Ally inspects, read a frame before its
//! verdict, change what the device does with Ally's rings, or change the device for the next
//! boot. Everything that cannot do any of that is forwarded, and says why below.
//!
//! A refusal is counted by class ([`Refusal`]), reported at power-off in one line, and the
//! first few are logged one per access.

use super::model::SpinLock;
use super::regs::{ctrl, eecd, fc, mdic, rctl, tctl, wuc, NicRegisters, Reg};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

const PAGE: u32 = 0x1000;

/// What a 4 KiB page of BAR0 is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePolicy {
    /// Absent from the EPT; every access exits and goes through [`register_policy`].
    Trapped,
    /// Absent from the EPT; nothing on it reaches the device (reads return 0).
    Refused(Refusal),
    /// Mapped to the device: everything on it is harmless (see [`page_policy`]).
    Passthrough,
}

/// The policy of the page holding `offset` (SDM table 13-2; the 82540EM decodes 128 KiB).
pub const fn page_policy(offset: u32) -> PagePolicy {
    match offset / PAGE {
        // Control and interrupts (0), receive (2), transmit (3), filters and wake-up (5): the
        // queue registers, and registers next to them Ally must filter. Statistics (4): MPC
        // is Ally's count of the frames the device missed as well as the guest's, and may
        // clear on read (`shadow::MissedFrames`); the driver reads the page every two seconds.
        0 | 2 | 3 | 4 | 5 => PagePolicy::Trapped,
        // 1: PBA, the receive/transmit split of the packet buffer, which the device applies
        // only at its reset (SDM 13.4.23), which the guest cannot cause. 9: the flexible
        // wake-up filter tables FFMT/FFVT (13.6.10-11), inert while WUFC stays 0 (refused
        // below).
        1 | 9 => PagePolicy::Passthrough,
        // The 82542 aliases of RDFH/RDFT/TDFH/TDFT (0x8000-0x8018): the packet buffer FIFO
        // pointers, refused like the registers they alias.
        8 => PagePolicy::Refused(Refusal::Fifo),
        // 0x10000-0x1FFFF: the packet buffer memory itself (SDM 13.5, diagnostics): frames
        // before their verdict (RX) or after it (TX).
        0x10..=0x1F => PagePolicy::Refused(Refusal::Pbm),
        // Nothing the 82540EM defines: fail closed.
        _ => PagePolicy::Refused(Refusal::Reserved),
    }
}

const BAR0_PAGES: u32 = Reg::BAR0_SIZE / PAGE;

const fn exiting_page_count() -> usize {
    let (mut n, mut page) = (0, 0);
    while page < BAR0_PAGES {
        if !matches!(page_policy(page * PAGE), PagePolicy::Passthrough) {
            n += 1;
        }
        page += 1;
    }
    n
}

/// BAR0 offsets of the pages absent from the guest's EPT (trapped and refused).
pub const EXITING_PAGES: [u32; exiting_page_count()] = {
    let mut pages = [0; exiting_page_count()];
    let (mut i, mut page) = (0, 0);
    while page < BAR0_PAGES {
        if !matches!(page_policy(page * PAGE), PagePolicy::Passthrough) {
            pages[i] = page * PAGE;
            i += 1;
        }
        page += 1;
    }
    pages
};

/// Whether an access at `offset` exits (its page is not mapped to the device).
pub const fn exits(offset: u32) -> bool {
    !matches!(page_policy(offset), PagePolicy::Passthrough)
}

/// What Ally refused, by class: the power-off report's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// TCTL.SWXOFF: a PAUSE frame no rule saw (SDM 13.4.33).
    Swxoff,
    /// CTRL.TFCE: the MAC sending XOFF/XON on its own (13.4.1).
    Tfce,
    /// FCRTL.XONE: XON frames (13.4.13).
    Xone,
    /// FCTTV other than 0: the pause time of XOFF frames (13.4.12).
    Fcttv,
    /// FCAL/FCAH/FCT other than the PAUSE address and type (13.4.6-8).
    FcAddr,
    /// VET other than 0x8100: the TPID the MAC inserts and strips (13.4.9).
    Vet,
    /// RCTL.LBM: transmitted frames looped back as received ones (13.4.22).
    Lbm,
    /// MDIC write setting the PHY's loopback (PHY register 0 bit 14).
    PhyLoopback,
    /// CTRL bits the 82540EM reserves (13.4.1, "write as 0b").
    CtrlReserved,
    /// Packet buffer FIFO pointers and counts (RDFH..RDFPC, TDFH..TDFPC, 13.5).
    Fifo,
    /// Packet buffer memory (BAR0 + 0x10000..0x1FFFF, 13.5).
    Pbm,
    /// A Microwire EEPROM command other than READ (13.4.3, 5.x "EEPROM interface").
    EepromWrite,
    /// EECD.FWE = 10b: flash writes enabled (13.4.3).
    Fwe,
    /// FLA writes (flash access, 13.4.4.x).
    Fla,
    /// WUC/WUFC enabling wake-up, WUPM reads (the stored wake-up frame, 13.6).
    Wakeup,
    /// MANC writes (management: ARP replies the MAC sends itself, 13.6.x).
    Manc,
    /// RSRPD writes: Ally's interrupt doorbell cause (13.4.2x).
    Rsrpd,
    /// RXDCTL/TXDCTL writes: how the device fetches Ally's rings (13.4.x).
    DescCtl,
    /// An offset the 82540EM does not define.
    Reserved,
}

impl Refusal {
    pub const ALL: [Refusal; 19] = [
        Refusal::Swxoff,
        Refusal::Tfce,
        Refusal::Xone,
        Refusal::Fcttv,
        Refusal::FcAddr,
        Refusal::Vet,
        Refusal::Lbm,
        Refusal::PhyLoopback,
        Refusal::CtrlReserved,
        Refusal::Fifo,
        Refusal::Pbm,
        Refusal::EepromWrite,
        Refusal::Fwe,
        Refusal::Fla,
        Refusal::Wakeup,
        Refusal::Manc,
        Refusal::Rsrpd,
        Refusal::DescCtl,
        Refusal::Reserved,
    ];

    /// The key in `ALLY nic-refused`.
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::Swxoff => "SWXOFF",
            Refusal::Tfce => "TFCE",
            Refusal::Xone => "XONE",
            Refusal::Fcttv => "FCTTV",
            Refusal::FcAddr => "FC-ADDR",
            Refusal::Vet => "VET",
            Refusal::Lbm => "LBM",
            Refusal::PhyLoopback => "PHY-loopback",
            Refusal::CtrlReserved => "CTRL-reserved",
            Refusal::Fifo => "FIFO",
            Refusal::Pbm => "PBM",
            Refusal::EepromWrite => "EEPROM-write",
            Refusal::Fwe => "FWE",
            Refusal::Fla => "FLA",
            Refusal::Wakeup => "WAKEUP",
            Refusal::Manc => "MANC",
            Refusal::Rsrpd => "RSRPD",
            Refusal::DescCtl => "DESC-CTL",
            Refusal::Reserved => "RESERVED",
        }
    }
}

/// How a guest write is rewritten before it goes on (to the shadow or the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// CTRL: TFCE and the reserved bits cleared (RST and PHY_RST are the shadow's).
    Ctrl,
    /// Only `keep` goes on; anything else the guest set is a `Refusal`.
    Mask(u32, Refusal),
    /// The device keeps `value` whatever the guest writes; another value is a `Refusal`.
    Fixed(u32, Refusal),
    /// EECD: the Microwire decoder ([`Microwire`]) and FWE held disabled.
    Eecd,
    /// MDIC: PHY loopback cleared.
    Mdic,
}

/// What Ally does with the register at an exiting offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// As the shadow file decides: emulated if shadowed, else forwarded unchanged.
    Forward,
    /// Reads forwarded; writes rewritten by the filter.
    Filter(Filter),
    /// Reads forwarded; writes refused (nothing reaches the device).
    WriteRefused(Refusal),
    /// Reads return 0 and writes are refused. Zero rather than all ones: for the FIFO
    /// registers it reads as an empty FIFO (head = tail = count = 0) and for the buffer memory
    /// as no data, a consistent device state; all ones is what a driver takes for a removed
    /// device.
    Refused(Refusal),
}

/// The policy for a dword at `offset` on an exiting page (SDM table 13-2, 82540EM column).
pub const fn register_policy(offset: u32) -> Policy {
    use Policy::{Filter as F, Forward, Refused, WriteRefused};
    match offset {
        // --- Page 0: general, interrupts, receive/transmit control, 82542 aliases.
        0x0000 => F(Filter::Ctrl),
        // STATUS (13.4.2, read only), EERD (13.4.4: the device reads an EEPROM word itself;
        // read commands only), CTRL_EXT (13.4.6: SDP pins, EEPROM reload of the MAC address
        // and init words, link mode; no ring or frame state).
        0x0008 | 0x0014 | 0x0018 => Forward,
        0x0010 => F(Filter::Eecd),
        0x001C => WriteRefused(Refusal::Fla),
        0x0020 => F(Filter::Mdic),
        0x0028 => F(Filter::Fixed(fc::FCAL, Refusal::FcAddr)),
        0x002C => F(Filter::Fixed(fc::FCAH, Refusal::FcAddr)),
        0x0030 => F(Filter::Fixed(fc::FCT, Refusal::FcAddr)),
        0x0038 => F(Filter::Fixed(fc::VLAN_ETHERTYPE, Refusal::Vet)),
        // 82542 alias of RA (receive address filters, see 0x5400).
        0x0040..=0x00BC => Forward,
        // ICR, ICS, IMS, IMC are shadowed; ITR (13.4.18) only spaces the device's interrupts.
        0x00C0 | 0x00C4 | 0x00C8 | 0x00D0 | 0x00D8 => Forward,
        0x0100 => F(Filter::Mask(!rctl::LBM_MASK, Refusal::Lbm)),
        // 82542 aliases of the shadowed RX ring registers and of RDTR (a delay timer).
        0x0108 | 0x0110 | 0x0114 | 0x0118 | 0x0120 | 0x0128 => Forward,
        // FCRTH (13.4.14; also its 82542 alias): a threshold, inert without TFCE.
        0x0160 | 0x2168 => Forward,
        0x0168 | 0x2160 => F(Filter::Mask(!fc::XONE, Refusal::Xone)),
        0x0170 => F(Filter::Fixed(0, Refusal::Fcttv)),
        // TXCW/RXCW (13.4.15-16): the TBI/SerDes configuration words; the 82540EM is copper
        // only, they reach no wire.
        0x0178 | 0x0180 => Forward,
        // 82542 alias of MTA (multicast filter, see 0x5200).
        0x0200..=0x03FC => Forward,
        0x0400 => F(Filter::Mask(!tctl::SWXOFF, Refusal::Swxoff)),
        // TIPG (13.4.34), AIFS (13.4.35): gaps between frames, not frames.
        0x0410 | 0x0458 => Forward,
        // 82542 aliases of the shadowed TX ring registers and of TIDV (a delay timer).
        0x0420 | 0x0424 | 0x0428 | 0x0430 | 0x0438 | 0x0440 => Forward,
        // 82542 alias of VFTA (VLAN filter, see 0x5600).
        0x0600..=0x07FC => Forward,
        // LEDCTL (13.4.x): the LEDs.
        0x0E00 => Forward,
        // --- Page 2: receive.
        0x2410..=0x2430 => Refused(Refusal::Fifo),
        // Shadowed ring registers; RDTR, RADV: delay timers.
        0x2800 | 0x2804 | 0x2808 | 0x2810 | 0x2818 | 0x2820 | 0x282C => Forward,
        0x2828 => WriteRefused(Refusal::DescCtl),
        0x2C00 => WriteRefused(Refusal::Rsrpd),
        // --- Page 3: transmit.
        // TXDMAC (13.4.36): descriptor prefetch on or off, timing only.
        0x3000 => Forward,
        0x3410..=0x3430 => Refused(Refusal::Fifo),
        // Shadowed ring registers; TIDV, TADV: delay timers; TSPMT (13.4.x): TSO DMA
        // thresholds and padding, not frame contents.
        0x3800 | 0x3804 | 0x3808 | 0x3810 | 0x3818 | 0x3820 | 0x382C | 0x3830 => Forward,
        0x3828 => WriteRefused(Refusal::DescCtl),
        // --- Page 4: statistics (13.7), read only or clear on read; MPC is shared with Ally
        // by the shadow file. The rest of the page is not the 82540EM's.
        0x4000..=0x40FC => Forward,
        // --- Page 5: receive filters and wake-up.
        // RXCSUM (13.4.x): checksum results in Ally's RX descriptors. MTA, RA, VFTA (13.5):
        // which frames the device accepts; every accepted frame still goes through Ally's
        // RX ring and inspection, and a frame not accepted reaches nobody.
        0x5000 | 0x5200..=0x53FC | 0x5400..=0x547C | 0x5600..=0x57FC => Forward,
        0x5800 => F(Filter::Mask(wuc::PME_STATUS, Refusal::Wakeup)),
        0x5808 => F(Filter::Fixed(0, Refusal::Wakeup)),
        // WUS (status), IPAV, IP4AT, IP6AT (addresses for wake-up and ARP offload, both off),
        // WUPL (a length, only set by wake-up).
        0x5810 | 0x5838 | 0x5840..=0x5858 | 0x5880..=0x588C | 0x5900 => Forward,
        0x5820 => WriteRefused(Refusal::Manc),
        0x5A00..=0x5A7C => Refused(Refusal::Wakeup),
        // FFLT (13.6.x): flexible filter lengths, inert with WUFC at 0.
        0x5F00..=0x5F18 => Forward,
        _ => match page_policy(offset) {
            PagePolicy::Refused(why) => Refused(why),
            PagePolicy::Passthrough => Forward,
            PagePolicy::Trapped => Refused(Refusal::Reserved),
        },
    }
}

/// The 82540EM's Microwire EEPROM (a 93C46/93C66, SDM 5.x, 13.4.3) as EECD's bit-banging
/// drives it: the EEPROM samples DI on each rising SK while CS is high; a command is a start
/// bit 1, a two-bit opcode (10b READ; 01b WRITE, 11b ERASE, 00b EWEN/EWDS/ERAL/WRAL) and an
/// address. Ally lets READ through and aborts every other command by dropping CS before the
/// edge that would clock in its second opcode bit, so the EEPROM never decodes it; CS stays
/// low until the guest drops it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Microwire {
    state: WireState,
    /// SK, CS and DI as the device last received them.
    last: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum WireState {
    /// CS low.
    #[default]
    Idle,
    /// CS high, waiting for the start bit.
    Selected,
    /// Start bit seen, then `n` opcode bits, the first being 1 when `n` is 1.
    Opcode(u8),
    /// A READ: the address and the data clock through untouched.
    Read,
    /// A refused command: CS held low until the guest lowers it.
    Aborted,
}

/// The EECD writes a guest write becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EecdWrites {
    /// Written first: the new CS/DI with SK still low, so the device sees them settled before
    /// the rising edge (as the decoder assumes).
    pub setup: Option<u32>,
    pub value: u32,
    /// This write aborted a command other than READ.
    pub aborted: bool,
}

const WIRE: u32 = eecd::SK | eecd::CS | eecd::DI;

impl Microwire {
    /// The guest writes `value` to EECD.
    pub fn write(&mut self, value: u32) -> EecdWrites {
        let mut out = EecdWrites {
            setup: None,
            value,
            aborted: false,
        };
        if value & eecd::CS == 0 {
            self.state = WireState::Idle;
        } else if self.state == WireState::Idle {
            self.state = WireState::Selected;
        }
        if self.state == WireState::Aborted {
            out.value &= !(eecd::CS | eecd::SK);
        } else if value & eecd::CS != 0 && self.last & eecd::SK == 0 && value & eecd::SK != 0 {
            let bit = value & eecd::DI != 0;
            self.state = match (self.state, bit) {
                (WireState::Selected, true) => WireState::Opcode(0),
                (WireState::Opcode(0), true) => WireState::Opcode(1),
                (WireState::Opcode(1), false) => WireState::Read,
                (WireState::Opcode(_), _) => WireState::Aborted,
                (state, _) => state,
            };
            if self.state == WireState::Aborted {
                out.value &= !(eecd::CS | eecd::SK);
                out.aborted = true;
            } else if (value ^ self.last) & (eecd::CS | eecd::DI) != 0 {
                out.setup = Some(value & !eecd::SK);
            }
        }
        self.last = out.value & WIRE;
        out
    }
}

/// Log lines for the first refusals only (a guest can make millions).
const LOGGED_REFUSALS: u64 = 16;

/// The filters' state and counters for one NIC, on the OS cores' exit path.
#[derive(Default)]
pub struct RegisterGuard {
    refused: [AtomicU64; Refusal::ALL.len()],
    eeprom: SpinLock<Microwire>,
    logged: AtomicU64,
}

impl Default for SpinLock<Microwire> {
    fn default() -> Self {
        SpinLock::new(Microwire::default())
    }
}

/// What to do with a guest write after the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    /// Pass this value on (to the shadow file, which forwards what it does not shadow).
    Pass(u32),
    /// Nothing more to do (refused, or the guard wrote the device itself).
    Done,
}

impl RegisterGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many refusals of `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    fn refuse(&self, why: Refusal, offset: u32, access: fmt::Arguments<'_>) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOGGED_REFUSALS {
            log::warn!(
                "ALLY nic-register-refused class={} offset={offset:#x} {access}",
                why.name()
            );
        }
    }

    /// A guest read at `offset`: whether it may reach the shadow file or the device (else it
    /// reads 0).
    pub fn read_allowed(&self, offset: u32) -> bool {
        match register_policy(offset) {
            Policy::Refused(why) => {
                self.refuse(why, offset, format_args!("access=read"));
                false
            }
            _ => true,
        }
    }

    /// A guest write of `value` at `offset`.
    pub fn write<R: NicRegisters>(&self, offset: u32, value: u32, real: &R) -> WriteAction {
        let refused = |why| {
            self.refuse(why, offset, format_args!("access=write value={value:#x}"));
        };
        match register_policy(offset) {
            Policy::Forward => WriteAction::Pass(value),
            Policy::Refused(why) | Policy::WriteRefused(why) => {
                refused(why);
                WriteAction::Done
            }
            Policy::Filter(Filter::Ctrl) => {
                if value & ctrl::TFCE != 0 {
                    refused(Refusal::Tfce);
                }
                if value & !ctrl::DEFINED != 0 {
                    refused(Refusal::CtrlReserved);
                }
                WriteAction::Pass(value & ctrl::DEFINED & !ctrl::TFCE)
            }
            Policy::Filter(Filter::Mask(keep, why)) => {
                if value & !keep != 0 {
                    refused(why);
                }
                WriteAction::Pass(value & keep)
            }
            Policy::Filter(Filter::Fixed(fixed, why)) => {
                if value != fixed {
                    refused(why);
                }
                WriteAction::Pass(fixed)
            }
            Policy::Filter(Filter::Mdic) => {
                let loopback = value & mdic::OP_MASK == mdic::OP_WRITE
                    && value & mdic::REGADD_MASK == mdic::PHY_CTRL << mdic::REGADD_SHIFT
                    && value & mdic::PHY_CTRL_LOOPBACK != 0;
                if loopback {
                    refused(Refusal::PhyLoopback);
                    return WriteAction::Pass(value & !mdic::PHY_CTRL_LOOPBACK);
                }
                WriteAction::Pass(value)
            }
            Policy::Filter(Filter::Eecd) => {
                if value & eecd::FWE_MASK == eecd::FWE_ENABLED {
                    refused(Refusal::Fwe);
                }
                let value = (value & !eecd::FWE_MASK) | eecd::FWE_DISABLED;
                // The decoder and the device must see the same sequence: one writer at a time.
                let mut wire = self.eeprom.lock();
                let writes = wire.write(value);
                if writes.aborted {
                    refused(Refusal::EepromWrite);
                }
                if let Some(setup) = writes.setup {
                    real.write32(Reg::EECD, setup);
                }
                real.write32(Reg::EECD, writes.value);
                WriteAction::Done
            }
        }
    }

    /// `KEY=N` for every refusal class, space-separated.
    pub fn write_counts(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        for (i, why) in Refusal::ALL.iter().enumerate() {
            if i > 0 {
                out.write_char(' ')?;
            }
            write!(out, "{}={}", why.name(), self.refused(*why))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_table_is_complete_and_in_order() {
        for (i, why) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i);
        }
    }

    #[test]
    fn only_pba_and_flexible_filters_stay_mapped() {
        let mapped: std::vec::Vec<u32> = (0..BAR0_PAGES)
            .map(|p| p * PAGE)
            .filter(|&o| !exits(o))
            .collect();
        assert_eq!(mapped, [0x1000, 0x9000]);
        assert_eq!(EXITING_PAGES.len(), 30);
        // Statistics exit (MPC is shared with Ally) and are forwarded; the rest of their
        // page is reserved.
        for stat in [0x4000, 0x4010, 0x40FC] {
            assert_eq!(register_policy(stat), Policy::Forward, "{stat:#x}");
        }
        assert_eq!(register_policy(0x4100), Policy::Refused(Refusal::Reserved));
        assert!(EXITING_PAGES.contains(&0x8000));
        assert!((0x10000..0x20000)
            .step_by(0x1000)
            .all(|p| EXITING_PAGES.contains(&p)));
        // Every page the queue registers live on exits.
        for reg in super::super::shadow::SHADOWED {
            assert!(exits(reg.0), "{reg:?}");
        }
    }

    #[test]
    fn refused_and_reserved_offsets() {
        for fifo in [
            0x2410, 0x2418, 0x2420, 0x2428, 0x2430, 0x3410, 0x3430, 0x8000, 0x8018,
        ] {
            assert_eq!(register_policy(fifo), Policy::Refused(Refusal::Fifo));
        }
        assert_eq!(register_policy(0x10000), Policy::Refused(Refusal::Pbm));
        assert_eq!(register_policy(0x1FFFC), Policy::Refused(Refusal::Pbm));
        assert_eq!(register_policy(0x5A40), Policy::Refused(Refusal::Wakeup));
        // The 82542's second receive queue and CTRL_DUP are not the 82540EM's.
        for reserved in [0x0004, 0x0138, 0x0150, 0x3900, 0x2900, 0xE000, 0x0FFC] {
            assert_eq!(
                register_policy(reserved),
                Policy::Refused(Refusal::Reserved),
                "{reserved:#x}"
            );
        }
        assert_eq!(register_policy(0x3818), Policy::Forward);
    }

    /// The bits a Microwire EEPROM clocks in for `bits` (MSB first) from a write sequence.
    fn clock_out(m: &mut Microwire, base: u32, bits: &[bool]) -> std::vec::Vec<EecdWrites> {
        let mut out = std::vec::Vec::new();
        for &b in bits {
            let v = base | eecd::CS | if b { eecd::DI } else { 0 };
            out.push(m.write(v));
            out.push(m.write(v | eecd::SK));
            out.push(m.write(v));
        }
        out
    }

    #[test]
    fn read_command_passes_untouched() {
        let mut m = Microwire::default();
        m.write(eecd::CS);
        // Start, 10b READ, six address bits, then sixteen data clocks.
        let mut bits = std::vec![true, true, false, false, false, false, true, true, false];
        bits.extend([false; 16]);
        for w in clock_out(&mut m, 0, &bits) {
            assert!(!w.aborted);
            assert_ne!(w.value & eecd::CS, 0);
        }
        assert_eq!(m.state, WireState::Read);
        assert_eq!(m.write(0).value, 0);
        assert_eq!(m.state, WireState::Idle);
    }

    #[test]
    fn every_other_command_is_aborted_before_its_opcode_completes() {
        for (opcode, abort_at) in [([false, true], 0), ([true, true], 1), ([false, false], 0)] {
            let mut m = Microwire::default();
            m.write(eecd::CS);
            let writes = clock_out(&mut m, 0, &[true, opcode[0], opcode[1], true, true]);
            // Three writes per bit; the rising edge is the second. Bit 0 is the start bit.
            let edge = 3 * (1 + abort_at) + 1;
            assert!(writes[edge].aborted, "{opcode:?}");
            assert_eq!(writes[edge].value & (eecd::CS | eecd::SK), 0);
            // Until the guest drops CS, the EEPROM stays deselected.
            for w in &writes[edge + 1..] {
                assert_eq!(w.value & eecd::CS, 0);
                assert!(!w.aborted);
            }
            assert_eq!(m.write(0).value, 0);
            m.write(eecd::CS);
            assert_eq!(m.state, WireState::Selected);
        }
    }

    #[test]
    fn di_and_cs_settle_before_the_clock_edge() {
        let mut m = Microwire::default();
        // CS, DI and SK rise in one write: CS and DI go first, SK low.
        let w = m.write(eecd::CS | eecd::DI | eecd::SK);
        assert_eq!(w.setup, Some(eecd::CS | eecd::DI));
        assert_eq!(w.value, eecd::CS | eecd::DI | eecd::SK);
        assert_eq!(m.state, WireState::Opcode(0));
        // DI changed while SK was high then a falling edge: nothing sampled.
        m.write(eecd::CS);
        assert_eq!(m.state, WireState::Opcode(0));
        // DI=0 with the edge: opcode 0x -> aborted (the decoder used the new DI).
        let w = m.write(eecd::CS | eecd::SK);
        assert!(w.aborted);
    }

    #[test]
    fn leading_zeros_before_the_start_bit_are_ignored() {
        let mut m = Microwire::default();
        m.write(eecd::CS);
        clock_out(&mut m, 0, &[false, false, false]);
        assert_eq!(m.state, WireState::Selected);
        clock_out(&mut m, 0, &[true, true, false]);
        assert_eq!(m.state, WireState::Read);
    }
}
