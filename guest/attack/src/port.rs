//! x86 port I/O. The only inline assembly of the attacker.

use std::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The calling thread must have I/O privilege for `port` (`iopl(3)` or `ioperm`), else the
/// kernel kills it with SIGSEGV; the write's effect on the device is the caller's intent.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller holds I/O privilege for `port`; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a word to an I/O port (the device sees bytes `port` and `port + 1`).
///
/// # Safety
/// As [`outb`], for `port` and `port + 1`.
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller holds I/O privilege for both ports; `out` touches no memory.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a dword to an I/O port.
///
/// # Safety
/// As [`outb`], for `port..port + 4`.
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller holds I/O privilege for the four ports; `out` touches no memory.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As [`outb`]; a read may have side effects on the device.
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller holds I/O privilege for `port`; `in` touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Reads a word from an I/O port.
///
/// # Safety
/// As [`inb`], for `port` and `port + 1`.
pub unsafe fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: the caller holds I/O privilege for both ports; `in` touches no memory.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    };
    v
}
