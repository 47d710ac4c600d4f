//! What makes a PC reboot, recognised in the guest's port writes and triple faults, so that
//! Ally restarts the guest instead of letting the machine (and with it Ally and the DPI
//! partition) reset.
//!
//! Linux's `reboot` tries the ACPI reset register, then the keyboard controller, then port
//! 0xCF9, then a triple fault (`arch/x86/kernel/reboot.c`); other systems use port 0x92.

use core::fmt;

/// The 8042 keyboard controller's command port.
pub const KBC_COMMAND_PORT: u16 = 0x64;
/// The PIIX/ICH Reset Control Register (ACPI's usual RESET_REG too).
pub const RESET_CONTROL_PORT: u16 = 0xCF9;
/// System Control Port A (PS/2 "fast A20 and INIT").
pub const SYSTEM_CONTROL_PORT_A: u16 = 0x92;

/// How the guest asked for a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetSource {
    /// An 8042 "pulse output port" command (0xF0-0xFF) with bit 0 clear: it pulses the CPU
    /// reset line (8042 command set; 0xFE is the usual one).
    Keyboard,
    /// Port 0xCF9 written with RST_CPU (bit 2) set (Intel PIIX4 datasheet 4.1.17, ICH
    /// "Reset Control Register").
    ResetControl,
    /// Port 0x92 written with bit 0 (fast reset) set.
    FastReset,
    /// A triple fault: the processor shuts down, and a PC's chipset resets it.
    TripleFault,
}

impl ResetSource {
    /// The name Ally's reports use.
    pub fn name(self) -> &'static str {
        match self {
            ResetSource::Keyboard => "keyboard-controller",
            ResetSource::ResetControl => "reset-control-cf9",
            ResetSource::FastReset => "fast-reset-92",
            ResetSource::TripleFault => "triple-fault",
        }
    }

    /// Whether Ally intercepts `port` to see reset requests (0xCF9 lies within the PCI
    /// configuration ports Ally intercepts anyway).
    pub fn is_reset_port(port: u16) -> bool {
        matches!(
            port,
            KBC_COMMAND_PORT | RESET_CONTROL_PORT | SYSTEM_CONTROL_PORT_A
        )
    }
}

impl fmt::Display for ResetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The reset an OUT of `value` (`size` bytes) to `port` requests, if any. Accesses that do
/// not request a reset go to the hardware as before.
pub fn reset_request(port: u16, size: u8, value: u32) -> Option<ResetSource> {
    if size != 1 {
        return None;
    }
    let byte = value as u8;
    match port {
        KBC_COMMAND_PORT if byte >= 0xF0 && byte & 1 == 0 => Some(ResetSource::Keyboard),
        RESET_CONTROL_PORT if byte & (1 << 2) != 0 => Some(ResetSource::ResetControl),
        SYSTEM_CONTROL_PORT_A if byte & 1 != 0 => Some(ResetSource::FastReset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_reset_writes_are_recognised() {
        // reboot=k: outb(0xfe, 0x64).
        assert_eq!(reset_request(0x64, 1, 0xFE), Some(ResetSource::Keyboard));
        // reboot=pci: outb(0x02, 0xcf9) (selects a hard reset, resets nothing), then 0x06.
        assert_eq!(reset_request(0xCF9, 1, 0x02), None);
        assert_eq!(
            reset_request(0xCF9, 1, 0x06),
            Some(ResetSource::ResetControl)
        );
        assert_eq!(reset_request(0x92, 1, 0x03), Some(ResetSource::FastReset));
    }

    #[test]
    fn ordinary_controller_traffic_is_not_a_reset() {
        // Keyboard controller commands: read/write command byte, self-test, disable port,
        // A20 through the output port (0xD1), pulse with the reset bit set (0xFF: no line).
        for command in [0x20, 0x60, 0xAA, 0xAD, 0xAE, 0xD1, 0xFF, 0xF1] {
            assert_eq!(reset_request(0x64, 1, command), None, "{command:#x}");
        }
        // Every even pulse command pulses the reset line.
        for command in (0xF0..=0xFE).step_by(2) {
            assert_eq!(reset_request(0x64, 1, command), Some(ResetSource::Keyboard));
        }
        // Fast A20 alone, through port 0x92.
        assert_eq!(reset_request(0x92, 1, 0x02), None);
        // Wider accesses are not these byte registers (a dword at 0xCF8 is CONFIG_ADDRESS).
        assert_eq!(reset_request(0xCF9, 2, 0x0606), None);
        assert_eq!(reset_request(0x64, 2, 0xFE), None);
        // Other ports.
        assert_eq!(reset_request(0x60, 1, 0xFE), None);
        assert_eq!(reset_request(0xCF8, 1, 0x06), None);
    }

    #[test]
    fn reset_ports() {
        for port in [0x64, 0xCF9, 0x92] {
            assert!(ResetSource::is_reset_port(port));
        }
        assert!(!ResetSource::is_reset_port(0x60));
    }
}
