//! The `log` backend: every line goes to COM2 as `[cpuN LEVEL target] message`.

use super::serial::{SerialPort, COM2_BASE};
use core::fmt::Write;
use log::{LevelFilter, Metadata, Record};
use spin::Mutex;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);
static LOGGER: SerialLogger = SerialLogger;

struct SerialLogger;

/// The initial APIC ID of the executing CPU (CPUID.01H:EBX[31:24]); Ally's CPU id in logs.
pub fn cpu_id() -> u32 {
    raw_cpuid::cpuid!(1).ebx >> 24
}

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target().trim_start_matches("ally_");
        let mut port = PORT.lock();
        if let Some(port) = port.as_mut() {
            let _ = writeln!(
                port,
                "[cpu{} {:<5} {}] {}",
                cpu_id(),
                record.level(),
                target,
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Sets up COM2 and installs the logger at `level`.
///
/// # Safety
/// COM2 must be a 16550 that only Ally uses (the guest's accesses to it are intercepted).
pub unsafe fn init(level: LevelFilter) {
    // SAFETY: guaranteed by the caller.
    *PORT.lock() = Some(unsafe { SerialPort::init(COM2_BASE) });
    // A second call only changes the level; the logger itself stays installed.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Writes raw text to COM2 bypassing `log` (exception handlers, which may interrupt a
/// holder of the port lock, use this after forcing the lock free).
pub fn emergency_write(args: core::fmt::Arguments<'_>) {
    // SAFETY: only called on the path that halts this CPU; a torn line beats a deadlock.
    unsafe { PORT.force_unlock() };
    if let Some(port) = PORT.lock().as_mut() {
        let _ = port.write_fmt(args);
    }
}

/// Raw records on the management channel (COM2) that are not log lines (EVE alerts, dropped
/// frame excerpts). Text is buffered up to each newline, so a record is written whole, never
/// interleaved with another CPU's log line; a record longer than the buffer is written in
/// pieces rather than lost.
#[derive(Default)]
pub struct ManagementChannel {
    line: heapless::String<2048>,
}

impl ManagementChannel {
    fn flush(&mut self) {
        if let Some(port) = PORT.lock().as_mut() {
            let _ = port.write_str(&self.line);
        }
        self.line.clear();
    }
}

impl Write for ManagementChannel {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            if self.line.push(c).is_err() {
                self.flush();
                let _ = self.line.push(c);
            }
            if c == '\n' {
                self.flush();
            }
        }
        Ok(())
    }
}
