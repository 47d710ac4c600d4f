//! What makes a PC reboot, recognised in the guest's port writes and triple faults, so that
//! Ally restarts the guest instead of letting the machine (and with it Ally and the DPI
//! partition) reset.
//!
//! Linux's `reboot` tries the ACPI reset register, then the keyboard controller, then port
//! 0xCF9, then a triple fault (`arch/x86/kernel/reboot.c`); other systems use port 0x92 or the
//! 8042's output port. Writes are judged byte by byte ([`PortWrite`]): a word OUT at 0x91
//! writes port 0x92, and a word OUT at 0xCF8 (only a dword there is CONFIG_ADDRESS) writes
//! port 0xCF9, as on the hardware.
//!
//! Ally also keeps the A20 gate open (port 0x92 bit 1 and the 8042 output port's bit 1): a
//! closed gate masks address bit 20 of every access on CPUs and emulators that still model
//! it, Ally's own in VMX root operation included.

use crate::cmdline::PciAddress;
use crate::ioport::PortWrite;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// The 8042 keyboard controller's command port.
pub const KBC_COMMAND_PORT: u16 = 0x64;
/// The 8042's data port (the output port's new value follows command 0xD1 here).
pub const KBC_DATA_PORT: u16 = 0x60;
/// The PIIX/ICH Reset Control Register (ACPI's usual RESET_REG too).
pub const RESET_CONTROL_PORT: u16 = 0xCF9;
/// System Control Port A (PS/2 "fast A20 and INIT").
pub const SYSTEM_CONTROL_PORT_A: u16 = 0x92;
/// CONFIG_ADDRESS: a dword OUT there is no write of port 0xCF9 (PCI Local Bus 3.0 3.2.2.3.2).
const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// 8042 command "write output port": the next byte written to port 0x60 becomes the output
/// port, whose bit 0 is the CPU reset line (active low) and bit 1 the A20 gate.
const KBC_WRITE_OUTPUT_PORT: u8 = 0xD1;
const A20_GATE: u8 = 1 << 1;

/// How the guest asked for a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetSource {
    /// An 8042 "pulse output port" command (0xF0-0xFF) with bit 0 clear: it pulses the CPU
    /// reset line (8042 command set; 0xFE is the usual one).
    Keyboard,
    /// The 8042's output port written (command 0xD1, then the byte at port 0x60) with its
    /// reset line (bit 0) low.
    KeyboardOutputPort,
    /// Port 0xCF9 written with RST_CPU (bit 2) set (Intel PIIX4 datasheet 4.1.17, ICH
    /// "Reset Control Register").
    ResetControl,
    /// Port 0x92 written with bit 0 (fast reset) set.
    FastReset,
    /// The FADT's RESET_REG written with its RESET_VALUE (ACPI 6.5, 4.8.4.6).
    AcpiResetRegister,
    /// A triple fault: the processor shuts down, and a PC's chipset resets it.
    TripleFault,
}

impl ResetSource {
    /// The name Ally's reports use.
    pub fn name(self) -> &'static str {
        match self {
            ResetSource::Keyboard => "keyboard-controller",
            ResetSource::KeyboardOutputPort => "keyboard-output-port",
            ResetSource::ResetControl => "reset-control-cf9",
            ResetSource::FastReset => "fast-reset-92",
            ResetSource::AcpiResetRegister => "acpi-reset-register",
            ResetSource::TripleFault => "triple-fault",
        }
    }
}

impl fmt::Display for ResetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The FADT's RESET_REG when it is an I/O port (its PCI-configuration form goes through the
/// configuration guard; a memory-space one is refused at start-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiResetPort {
    pub port: u16,
    pub value: u8,
}

/// The FADT's RESET_REG when it lies in bus 0's configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiResetConfig {
    pub function: PciAddress,
    pub offset: u16,
    pub value: u8,
}

/// What becomes of a guest OUT to a port the reset guard watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortVerdict {
    /// The write requests a reset: Ally resets the guest's platform instead.
    Reset(ResetSource),
    /// The write goes to the hardware as given (A20 kept open).
    Forward(PortWrite),
}

/// Recognises reset requests in the guest's port writes. Shared by every OS core.
#[derive(Debug, Default)]
pub struct ResetGuard {
    acpi: Option<AcpiResetPort>,
    acpi_config: Option<AcpiResetConfig>,
    /// The 8042 was last given command 0xD1: its next data byte is the output port.
    kbc_output_port_next: AtomicBool,
}

impl ResetGuard {
    pub const fn new(acpi: Option<AcpiResetPort>, acpi_config: Option<AcpiResetConfig>) -> Self {
        Self {
            acpi,
            acpi_config,
            kbc_output_port_next: AtomicBool::new(false),
        }
    }

    /// The ports Ally must intercept (first port, count) for this guard to see every write
    /// that resets the machine (0xCF9 lies within the configuration ports, intercepted anyway).
    pub fn ports(&self) -> impl Iterator<Item = (u16, u16)> {
        [
            Some((KBC_DATA_PORT, 1)),
            Some((KBC_COMMAND_PORT, 1)),
            Some((SYSTEM_CONTROL_PORT_A, 1)),
            Some((RESET_CONTROL_PORT, 1)),
            self.acpi.map(|r| (r.port, 1)),
        ]
        .into_iter()
        .flatten()
    }

    /// Whether the write touches a port this guard judges.
    pub fn watches(&self, w: &PortWrite) -> bool {
        self.ports().any(|(first, count)| w.touches(first, count))
    }

    /// Judges a configuration write of `size` bytes at `offset` of `function` (through the
    /// data ports): the FADT's RESET_REG may live there.
    pub fn judge_config_write(
        &self,
        function: PciAddress,
        offset: u8,
        size: u8,
        value: u32,
    ) -> Option<ResetSource> {
        let reg = self.acpi_config.filter(|r| r.function == function)?;
        let write = PortWrite::new(u16::from(offset), size, value);
        (write.byte_at(reg.offset) == Some(reg.value)).then_some(ResetSource::AcpiResetRegister)
    }

    /// Judges one OUT. Writes that request no reset are forwarded with the A20 gate kept
    /// open.
    pub fn judge(&self, w: PortWrite) -> PortVerdict {
        // A dword at 0xCF8 is CONFIG_ADDRESS, not a write of ports 0xCF8-0xCFB.
        let config_address = w.port == CONFIG_ADDRESS_PORT && w.size == 4;
        let written = |port: u16| {
            if config_address && (CONFIG_ADDRESS_PORT..CONFIG_ADDRESS_PORT + 4).contains(&port) {
                None
            } else {
                w.byte_at(port)
            }
        };
        if written(RESET_CONTROL_PORT).is_some_and(|rc| rc & (1 << 2) != 0) {
            return PortVerdict::Reset(ResetSource::ResetControl);
        }
        if let Some(acpi) = self.acpi {
            if written(acpi.port) == Some(acpi.value) {
                return PortVerdict::Reset(ResetSource::AcpiResetRegister);
            }
        }
        let mut forward = w;
        if let Some(a) = written(SYSTEM_CONTROL_PORT_A) {
            if a & 1 != 0 {
                return PortVerdict::Reset(ResetSource::FastReset);
            }
            forward = forward.with_byte(SYSTEM_CONTROL_PORT_A, a | A20_GATE);
        }
        if let Some(command) = written(KBC_COMMAND_PORT) {
            self.kbc_output_port_next
                .store(command == KBC_WRITE_OUTPUT_PORT, Ordering::Relaxed);
            if command >= 0xF0 && command & 1 == 0 {
                return PortVerdict::Reset(ResetSource::Keyboard);
            }
        }
        if let Some(data) = written(KBC_DATA_PORT) {
            if self.kbc_output_port_next.swap(false, Ordering::Relaxed) {
                if data & 1 == 0 {
                    return PortVerdict::Reset(ResetSource::KeyboardOutputPort);
                }
                forward = forward.with_byte(KBC_DATA_PORT, data | A20_GATE);
            }
        }
        PortVerdict::Forward(forward)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(guard: &ResetGuard, port: u16, size: u8, value: u32) -> Option<ResetSource> {
        match guard.judge(PortWrite::new(port, size, value)) {
            PortVerdict::Reset(source) => Some(source),
            PortVerdict::Forward(_) => None,
        }
    }

    fn forwarded(guard: &ResetGuard, port: u16, size: u8, value: u32) -> u32 {
        match guard.judge(PortWrite::new(port, size, value)) {
            PortVerdict::Forward(w) => w.value,
            PortVerdict::Reset(source) => panic!("{port:#x} <- {value:#x} reset ({source})"),
        }
    }

    #[test]
    fn linux_reset_writes_are_recognised() {
        let g = ResetGuard::default();
        // reboot=k: outb(0xfe, 0x64).
        assert_eq!(judge(&g, 0x64, 1, 0xFE), Some(ResetSource::Keyboard));
        // reboot=pci: outb(0x02, 0xcf9) (selects a hard reset, resets nothing), then 0x06.
        assert_eq!(judge(&g, 0xCF9, 1, 0x02), None);
        assert_eq!(judge(&g, 0xCF9, 1, 0x06), Some(ResetSource::ResetControl));
        assert_eq!(judge(&g, 0x92, 1, 0x03), Some(ResetSource::FastReset));
    }

    #[test]
    fn wider_and_misaligned_writes_reach_the_reset_registers() {
        let g = ResetGuard::default();
        // A word OUT at 0xCF8 is no CONFIG_ADDRESS write: its high byte lands in 0xCF9.
        assert_eq!(judge(&g, 0xCF8, 2, 0x0600), Some(ResetSource::ResetControl));
        assert_eq!(judge(&g, 0xCF9, 2, 0x0006), Some(ResetSource::ResetControl));
        assert_eq!(
            judge(&g, 0xCF6, 4, 0x0600_0000),
            Some(ResetSource::ResetControl)
        );
        // ... but a dword at 0xCF8 is CONFIG_ADDRESS, whatever its second byte.
        assert_eq!(judge(&g, 0xCF8, 4, 0x8000_0600), None);
        // Port 0x92 through a word at 0x91 or a dword at 0x90.
        assert_eq!(judge(&g, 0x91, 2, 0x0100), Some(ResetSource::FastReset));
        assert_eq!(
            judge(&g, 0x90, 4, 0x0001_0000),
            Some(ResetSource::FastReset)
        );
        // The 8042 command through a word at 0x63.
        assert_eq!(judge(&g, 0x63, 2, 0xFE00), Some(ResetSource::Keyboard));
    }

    #[test]
    fn keyboard_controller_output_port() {
        let g = ResetGuard::default();
        // outb(0xD1, 0x64); outb(0xFE, 0x60): the reset line (bit 0) low.
        assert_eq!(judge(&g, 0x64, 1, 0xD1), None);
        assert_eq!(
            judge(&g, 0x60, 1, 0xFE),
            Some(ResetSource::KeyboardOutputPort)
        );
        // A20 on through the output port (0xDF), as boot loaders do: forwarded.
        assert_eq!(judge(&g, 0x64, 1, 0xD1), None);
        assert_eq!(forwarded(&g, 0x60, 1, 0xDF), 0xDF);
        // The output port's byte is consumed: the next data byte is keyboard data.
        assert_eq!(forwarded(&g, 0x60, 1, 0xFE), 0xFE);
        // Another command in between cancels the output-port write.
        assert_eq!(judge(&g, 0x64, 1, 0xD1), None);
        assert_eq!(judge(&g, 0x64, 1, 0x20), None);
        assert_eq!(forwarded(&g, 0x60, 1, 0x00), 0x00);
    }

    #[test]
    fn the_a20_gate_stays_open() {
        let g = ResetGuard::default();
        // Port 0x92 with A20 off: forwarded with A20 on.
        assert_eq!(forwarded(&g, 0x92, 1, 0x00), 0x02);
        assert_eq!(forwarded(&g, 0x91, 2, 0x00AA), 0x02AA);
        // The 8042 output port with A20 off (0xDD): A20 stays on.
        assert_eq!(judge(&g, 0x64, 1, 0xD1), None);
        assert_eq!(forwarded(&g, 0x60, 1, 0xDD), 0xDF);
    }

    #[test]
    fn acpi_reset_register() {
        let g = ResetGuard::new(
            Some(AcpiResetPort {
                port: 0xB2,
                value: 0x55,
            }),
            None,
        );
        assert_eq!(
            judge(&g, 0xB2, 1, 0x55),
            Some(ResetSource::AcpiResetRegister)
        );
        assert_eq!(
            judge(&g, 0xB1, 2, 0x5500),
            Some(ResetSource::AcpiResetRegister)
        );
        assert_eq!(judge(&g, 0xB2, 1, 0x54), None);
        assert!(g.ports().any(|p| p == (0xB2, 1)));
        assert!(g.watches(&PortWrite::new(0xB0, 4, 0)));
    }

    #[test]
    fn acpi_reset_register_in_configuration_space() {
        let lpc = PciAddress {
            bus: 0,
            device: 0x1F,
            function: 0,
        };
        let g = ResetGuard::new(
            None,
            Some(AcpiResetConfig {
                function: lpc,
                offset: 0xAD,
                value: 0x0E,
            }),
        );
        let reset = Some(ResetSource::AcpiResetRegister);
        assert_eq!(g.judge_config_write(lpc, 0xAD, 1, 0x0E), reset);
        assert_eq!(g.judge_config_write(lpc, 0xAC, 4, 0x0000_0E00), reset);
        assert_eq!(g.judge_config_write(lpc, 0xAC, 4, 0x0000_0F00), None);
        assert_eq!(g.judge_config_write(lpc, 0xAE, 2, 0x0E0E), None);
        let other = PciAddress { device: 2, ..lpc };
        assert_eq!(g.judge_config_write(other, 0xAD, 1, 0x0E), None);
        assert_eq!(
            ResetGuard::default().judge_config_write(lpc, 0xAD, 1, 0x0E),
            None
        );
    }

    #[test]
    fn ordinary_controller_traffic_is_not_a_reset() {
        let g = ResetGuard::default();
        // Keyboard controller commands: read/write command byte, self-test, disable port,
        // pulse with the reset bit set (0xFF: no line).
        for command in [0x20, 0x60, 0xAA, 0xAD, 0xAE, 0xFF, 0xF1] {
            assert_eq!(judge(&g, 0x64, 1, command), None, "{command:#x}");
        }
        // Every even pulse command pulses the reset line.
        for command in (0xF0..=0xFE).step_by(2) {
            assert_eq!(judge(&g, 0x64, 1, command), Some(ResetSource::Keyboard));
        }
        // Fast A20 alone, through port 0x92.
        assert_eq!(judge(&g, 0x92, 1, 0x02), None);
        // Keyboard data without command 0xD1, other ports.
        assert_eq!(judge(&g, 0x60, 1, 0xFE), None);
        assert_eq!(judge(&g, 0xCF8, 1, 0x06), None);
        assert_eq!(judge(&g, 0x61, 1, 0xFE), None);
    }

    #[test]
    fn watched_ports() {
        let g = ResetGuard::default();
        for port in [0x60, 0x64, 0xCF9, 0x92] {
            assert!(g.watches(&PortWrite::new(port, 1, 0)), "{port:#x}");
        }
        assert!(g.watches(&PortWrite::new(0x91, 2, 0)));
        assert!(!g.watches(&PortWrite::new(0x61, 1, 0)));
    }
}
