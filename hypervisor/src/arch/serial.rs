//! A 16550 UART used for Ally's log and management channel (COM2, 0x2F8; COM1 stays the
//! guest's).

use super::instructions::{inb, outb};
use core::fmt;

/// I/O base of COM2.
pub const COM2_BASE: u16 = 0x2F8;

/// A polled 16550 UART at a fixed I/O base.
pub struct SerialPort {
    base: u16,
}

impl SerialPort {
    /// Programs the UART for 115200 8N1, FIFOs on, interrupts off.
    ///
    /// # Safety
    /// The port range `base..base+8` must be a 16550 UART that only Ally drives.
    pub unsafe fn init(base: u16) -> Self {
        // SAFETY: the caller guarantees we own this UART (16550 register layout).
        unsafe {
            outb(base + 1, 0x00); // IER: no interrupts
            outb(base + 3, 0x80); // LCR: DLAB on
            outb(base, 0x01); // divisor 1 = 115200 baud
            outb(base + 1, 0x00);
            outb(base + 3, 0x03); // LCR: 8N1, DLAB off
            outb(base + 2, 0xC7); // FCR: enable + clear FIFOs
            outb(base + 4, 0x03); // MCR: DTR | RTS
        }
        Self { base }
    }

    fn write_byte(&mut self, byte: u8) {
        // SAFETY: `init` established that this UART is ours; LSR bit 5 = THR empty.
        unsafe {
            let mut spins = 0u32;
            while inb(self.base + 5) & 0x20 == 0 && spins < 100_000 {
                spins += 1;
                core::hint::spin_loop();
            }
            outb(self.base, byte);
        }
    }
}

impl fmt::Write for SerialPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
        Ok(())
    }
}
