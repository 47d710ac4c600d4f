//! A 16550 UART used for Ally's log and management channel (COM2, 0x2F8; COM1 stays the
//! guest's).

use super::instructions::{inb, outb};
use crate::record_ring::TxFifo;
use core::fmt;

/// I/O base of COM2.
pub const COM2_BASE: u16 = 0x2F8;

/// Line status register offset; its bit 5 (THRE) is set when the transmitter holding
/// register, or with FIFOs on the whole transmit FIFO, is empty (16550 data sheet, LSR).
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;
/// Interrupt identification register; bits 7:6 read 11 when the FIFOs are enabled (16550A).
const IIR: u16 = 2;
/// Transmit FIFO depth of a 16550A.
const FIFO_DEPTH: usize = 16;

/// A polled 16550 UART at a fixed I/O base.
pub struct SerialPort {
    base: u16,
    /// Bytes the transmitter takes once THRE is set: the FIFO depth, or 1 without FIFO.
    tx_depth: usize,
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
        // SAFETY: as above; reading IIR has no side effect with interrupts off.
        let fifo = unsafe { inb(base + IIR) } & 0xC0 == 0xC0;
        Self {
            base,
            tx_depth: if fifo { FIFO_DEPTH } else { 1 },
        }
    }

    fn write_byte(&mut self, byte: u8) {
        // SAFETY: `init` established that this UART is ours; LSR bit 5 = THR empty.
        unsafe {
            let mut spins = 0u32;
            while inb(self.base + LSR) & LSR_THRE == 0 && spins < 100_000 {
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

/// The non-blocking side, for the alert ring: THRE set means the transmit FIFO is empty, so
/// a whole FIFO's worth goes out without waiting; otherwise nothing does.
impl TxFifo for SerialPort {
    fn room(&mut self) -> usize {
        // SAFETY: `init` established that this UART is ours; reading LSR has no side effect
        // on the transmitter.
        if unsafe { inb(self.base + LSR) } & LSR_THRE != 0 {
            self.tx_depth
        } else {
            0
        }
    }

    fn put(&mut self, byte: u8) {
        // SAFETY: as for `room`; the caller stays within the room it reported.
        unsafe { outb(self.base, byte) };
    }
}
