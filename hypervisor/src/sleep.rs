//! ACPI sleep states the guest may enter. S5 (soft-off) is the guest's power-off and reaches
//! the hardware. S1-S4 are refused: suspend would power the DPI cores down or stop them, and
//! the firmware would resume the guest at its waking vector without Ally. A refused request
//! is dropped and counted, and the guest is shown a wake-up (WAK_STS set), so its wait for the
//! transition back to S0 ends and it carries on as after a suspend that did not happen.
//!
//! Registers (ACPI 6.5): PM1x_CNT (4.8.3.2.1: SLP_TYP bits 12:10, SLP_EN bit 13), PM1x_STS
//! (4.8.3.1.1: WAK_STS bit 15), and hardware-reduced ACPI's SLEEP_CONTROL_REG (4.8.3.7:
//! SLP_TYP bits 4:2, SLP_EN bit 5) and SLEEP_STATUS_REG (4.8.3.8: WAK_STS bit 7). The S-state
//! of an SLP_TYP value comes from the DSDT's `\_Sx` objects ([`crate::acpi::SleepTypes`]).
//! Without a `\_S5` Ally cannot tell power-off from suspend and refuses every request.

use crate::acpi::SleepTypes;
use crate::ioport::PortWrite;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One sleep-control register in I/O space and where its fields are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ControlRegister {
    port: u16,
    width: u8,
    /// Position of SLP_TYP (3 bits); SLP_EN is the bit above it.
    typ_shift: u32,
    /// Whether the register's SLP_TYP values are the `\_Sx` packages' second ones (PM1b).
    second: bool,
}

impl ControlRegister {
    fn slp_en(&self) -> u32 {
        1 << (self.typ_shift + 3)
    }
}

/// A status register in I/O space and its WAK_STS bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatusRegister {
    port: u16,
    width: u8,
    wak_sts: u32,
}

/// The I/O ports of the FADT's sleep registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SleepPorts {
    pub pm1a_control: Option<u16>,
    pub pm1b_control: Option<u16>,
    pub pm1a_status: Option<u16>,
    pub pm1b_status: Option<u16>,
    pub sleep_control: Option<u16>,
    pub sleep_status: Option<u16>,
}

/// What a guest OUT does to the sleep registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepVerdict {
    /// It requests no sleep state: forwarded.
    NoSleep,
    /// SLP_EN with S5's SLP_TYP: the guest powers off (forwarded after Ally's report).
    PowerOff,
    /// SLP_EN with any other SLP_TYP: dropped. `state` is the S-state the DSDT gives that
    /// value, if any.
    Refused { slp_typ: u8, state: Option<u8> },
}

/// Judges the guest's sleep requests. Shared by every OS core.
#[derive(Debug, Default)]
pub struct SleepGuard {
    controls: [Option<ControlRegister>; 3],
    statuses: [Option<StatusRegister>; 3],
    types: SleepTypes,
    /// A refused request's wake-up is still to be shown in WAK_STS.
    wake_pending: AtomicBool,
    refused: AtomicU64,
}

impl SleepGuard {
    pub fn new(ports: SleepPorts, types: SleepTypes) -> Self {
        let pm1 = |port: Option<u16>, second| {
            port.map(|port| ControlRegister {
                port,
                width: 2,
                typ_shift: 10,
                second,
            })
        };
        let status = |port: Option<u16>, width, wak_sts| {
            port.map(|port| StatusRegister {
                port,
                width,
                wak_sts,
            })
        };
        Self {
            controls: [
                pm1(ports.pm1a_control, false),
                pm1(ports.pm1b_control, true),
                ports.sleep_control.map(|port| ControlRegister {
                    port,
                    width: 1,
                    typ_shift: 2,
                    second: false,
                }),
            ],
            statuses: [
                status(ports.pm1a_status, 2, 1 << 15),
                status(ports.pm1b_status, 2, 1 << 15),
                status(ports.sleep_status, 1, 1 << 7),
            ],
            types,
            wake_pending: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        }
    }

    /// The ports Ally must intercept (first port, count).
    pub fn ports(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        let controls = self.controls.iter().flatten().map(|c| (c.port, c.width));
        let statuses = self.statuses.iter().flatten().map(|s| (s.port, s.width));
        controls
            .chain(statuses)
            .map(|(port, width)| (port, u16::from(width)))
    }

    /// Whether an access at `port` of `size` bytes touches a sleep register.
    pub fn watches(&self, port: u16, size: u8) -> bool {
        let access = PortWrite::new(port, size, 0);
        self.ports()
            .any(|(first, count)| access.touches(first, count))
    }

    /// Judges an OUT; a refused one is counted and its wake-up armed.
    pub fn judge_write(&self, w: PortWrite) -> SleepVerdict {
        for s in self.statuses.iter().flatten() {
            // Writing 1 to WAK_STS clears it (the guest acknowledged the wake-up).
            if w.into_register(s.port, s.width)
                .is_some_and(|(mask, value)| mask & value & s.wak_sts != 0)
            {
                self.wake_pending.store(false, Ordering::Relaxed);
            }
        }
        for c in self.controls.iter().flatten() {
            let Some((mask, value)) = w.into_register(c.port, c.width) else {
                continue;
            };
            // SLP_TYP and SLP_EN share one byte, so a write that sets SLP_EN gives SLP_TYP too.
            if mask & c.slp_en() == 0 || value & c.slp_en() == 0 {
                continue;
            }
            let slp_typ = ((value >> c.typ_shift) & 0b111) as u8;
            // S5's value first: firmware may give S4 the same one (Bochs' DSDT does), and
            // then the hardware can only power off.
            let s5 = self.types.0[5].map(|(a, b)| if c.second { b } else { a });
            if s5 == Some(slp_typ) {
                return SleepVerdict::PowerOff;
            }
            let state = self.types.state_of(slp_typ, c.second);
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.wake_pending.store(true, Ordering::Relaxed);
            return SleepVerdict::Refused { slp_typ, state };
        }
        SleepVerdict::NoSleep
    }

    /// The value an IN returns, given what the hardware returned: WAK_STS shows a refused
    /// request's wake-up until the guest clears it.
    pub fn adjust_read(&self, port: u16, size: u8, hardware: u32) -> u32 {
        if !self.wake_pending.load(Ordering::Relaxed) {
            return hardware;
        }
        let mut value = hardware;
        for s in self.statuses.iter().flatten() {
            let bit = s.wak_sts.trailing_zeros();
            let wak_port = s.port + (bit / 8) as u16;
            if let Some(lane) = wak_port.checked_sub(port).filter(|&l| l < u16::from(size)) {
                value |= 1 << (8 * u32::from(lane) + bit % 8);
            }
        }
        value
    }

    /// Sleep requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The SLP_TYP values the DSDT gave (for the start-up report).
    pub fn types(&self) -> &SleepTypes {
        &self.types
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs' and QEMU's PIIX4 PM block: PM1a_EVT at 0xB000, PM1a_CNT at 0xB004; the DSDT
    /// defines S3 = 1, S4 = 2, S5 = 0.
    fn piix4() -> SleepGuard {
        SleepGuard::new(
            SleepPorts {
                pm1a_control: Some(0xB004),
                pm1a_status: Some(0xB000),
                ..SleepPorts::default()
            },
            SleepTypes([None, None, None, Some((1, 1)), Some((2, 2)), Some((0, 0))]),
        )
    }

    const SLP_EN: u32 = 1 << 13;

    #[test]
    fn power_off_passes_and_suspend_is_refused() {
        let g = piix4();
        // Linux's power-off: SLP_TYP = S5's, then SLP_EN.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, 0x0001)),
            SleepVerdict::NoSleep
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | 1)),
            SleepVerdict::PowerOff
        );
        // S3 and S4.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | (1 << 10) | 1)),
            SleepVerdict::Refused {
                slp_typ: 1,
                state: Some(3)
            }
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | (2 << 10))),
            SleepVerdict::Refused {
                slp_typ: 2,
                state: Some(4)
            }
        );
        // A value no \_Sx names.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | (6 << 10))),
            SleepVerdict::Refused {
                slp_typ: 6,
                state: None
            }
        );
        assert_eq!(g.refused(), 3);
    }

    #[test]
    fn byte_and_straddling_writes_are_judged() {
        let g = piix4();
        // The high byte alone holds SLP_EN and SLP_TYP.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB005, 1, 0x24)),
            SleepVerdict::Refused {
                slp_typ: 1,
                state: Some(3)
            }
        );
        // A dword at PM1a_EVT+2 (enable register) spans PM1a_CNT.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB002, 4, (SLP_EN | (1 << 10)) << 16)),
            SleepVerdict::Refused {
                slp_typ: 1,
                state: Some(3)
            }
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0xB002, 4, SLP_EN << 16)),
            SleepVerdict::PowerOff
        );
        // The low byte (SCI_EN, ...) cannot request sleep.
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 1, 0xFF)),
            SleepVerdict::NoSleep
        );
        assert!(g.watches(0xB002, 4));
        assert!(g.watches(0xB005, 1));
        assert!(g.watches(0xB000, 1));
        assert!(!g.watches(0xB008, 4));
    }

    #[test]
    fn refused_suspend_shows_a_wake_up_until_acknowledged() {
        let g = piix4();
        assert_eq!(g.adjust_read(0xB000, 2, 0x0001), 0x0001);
        g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | (1 << 10)));
        assert_eq!(g.adjust_read(0xB000, 2, 0x0001), 0x8001);
        assert_eq!(g.adjust_read(0xB001, 1, 0x00), 0x80);
        assert_eq!(g.adjust_read(0xB000, 1, 0x00), 0x00);
        assert_eq!(g.adjust_read(0xB000, 4, 0x0000_0000), 0x0000_8000);
        // Writing 1 to WAK_STS clears it; other status bits do not.
        g.judge_write(PortWrite::new(0xB000, 2, 0x0001));
        assert_eq!(g.adjust_read(0xB000, 2, 0), 0x8000);
        g.judge_write(PortWrite::new(0xB000, 2, 0x8000));
        assert_eq!(g.adjust_read(0xB000, 2, 0), 0);
    }

    #[test]
    fn s4_sharing_s5s_value_powers_off() {
        // Bochs' DSDT: \_S3 = 1, \_S4 = 0, \_S5 = 0.
        let g = SleepGuard::new(
            SleepPorts {
                pm1a_control: Some(0xB004),
                ..SleepPorts::default()
            },
            SleepTypes([None, None, None, Some((1, 1)), Some((0, 0)), Some((0, 0))]),
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN)),
            SleepVerdict::PowerOff
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0xB004, 2, SLP_EN | (1 << 10))),
            SleepVerdict::Refused {
                slp_typ: 1,
                state: Some(3)
            }
        );
    }

    #[test]
    fn without_s5_every_request_is_refused() {
        let g = SleepGuard::new(
            SleepPorts {
                pm1a_control: Some(0x404),
                ..SleepPorts::default()
            },
            SleepTypes::default(),
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0x404, 2, SLP_EN)),
            SleepVerdict::Refused {
                slp_typ: 0,
                state: None
            }
        );
    }

    #[test]
    fn pm1b_uses_the_second_values_and_hardware_reduced_registers() {
        let g = SleepGuard::new(
            SleepPorts {
                pm1a_control: Some(0x1804),
                pm1b_control: Some(0x1884),
                sleep_control: Some(0x1900),
                sleep_status: Some(0x1901),
                ..SleepPorts::default()
            },
            SleepTypes([None, None, None, Some((5, 3)), None, Some((7, 6))]),
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0x1804, 2, SLP_EN | (7 << 10))),
            SleepVerdict::PowerOff
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0x1884, 2, SLP_EN | (6 << 10))),
            SleepVerdict::PowerOff
        );
        assert_eq!(
            g.judge_write(PortWrite::new(0x1884, 2, SLP_EN | (7 << 10))),
            SleepVerdict::Refused {
                slp_typ: 7,
                state: None
            }
        );
        // SLEEP_CONTROL_REG: SLP_TYP bits 4:2, SLP_EN bit 5.
        assert_eq!(
            g.judge_write(PortWrite::new(0x1900, 1, (1 << 5) | (5 << 2))),
            SleepVerdict::Refused {
                slp_typ: 5,
                state: Some(3)
            }
        );
        assert_eq!(g.adjust_read(0x1901, 1, 0), 0x80);
        assert_eq!(
            g.judge_write(PortWrite::new(0x1900, 1, (1 << 5) | (7 << 2))),
            SleepVerdict::PowerOff
        );
    }
}
