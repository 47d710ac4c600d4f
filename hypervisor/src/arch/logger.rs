//! The `log` backend: every line goes to COM2 as `[cpuN LEVEL target] message`.
//!
//! COM2 also carries the DPI core's records (EVE alerts, dropped-frame excerpts). Those go
//! through [`ALERT_RING`] in Ally's memory, so the DPI core never waits for the UART: it
//! pumps the ring in its idle time without blocking ([`pump_alerts`]), and the power-off
//! report flushes it ([`flush_alerts`]). The port lock is shared with the log lines; the DPI
//! core only ever try-locks it, and a log line first finishes an alert record the pump left
//! half-written, so the two never interleave mid-line.

use super::serial::{SerialPort, COM2_BASE};
use crate::record_ring::{RecordRing, RingProducer, RingStats};
use core::fmt::Write;
use log::{LevelFilter, Metadata, Record};
use spin::Mutex;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Bytes of the alert ring: at COM2's 115200 baud (about 11.5 KB/s) some 5.7 s of records.
pub const ALERT_RING_BYTES: usize = 64 * 1024;
/// Longest alert record kept (a longer one is lost, and counted). It also bounds how long a
/// log line may wait to finish a record the DPI core's pump began (~87 us per byte).
pub const ALERT_RECORD_MAX: usize = 2048;

/// The DPI core's records, waiting for COM2.
pub static ALERT_RING: RecordRing<ALERT_RING_BYTES> = RecordRing::new();

/// Where the DPI core writes its records (`fmt::Write`; a newline ends a record).
pub type AlertChannel = RingProducer<'static, ALERT_RING_BYTES>;

/// The alert ring's producer: `None` after the first call (it has one producer).
pub fn alert_channel() -> Option<AlertChannel> {
    ALERT_RING.producer(ALERT_RECORD_MAX)
}

/// Writes alert records to COM2 while its transmit FIFO has room; never waits, not even for
/// the port lock (a log line holding it means: retry at the next idle poll). Returns whether
/// records still wait.
pub fn pump_alerts() -> bool {
    if !ALERT_RING.has_pending() {
        return false;
    }
    if let Some(mut port) = PORT.try_lock() {
        if let Some(port) = port.as_mut() {
            ALERT_RING.pump(port);
        }
    }
    ALERT_RING.has_pending()
}

/// Writes every alert record published so far, waiting for the UART (the power-off report),
/// and returns the ring's counters.
pub fn flush_alerts() -> RingStats {
    if let Some(port) = PORT.lock().as_mut() {
        ALERT_RING.flush(port, core::hint::spin_loop);
    }
    ALERT_RING.stats()
}
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
            if ALERT_RING.in_record() {
                ALERT_RING.finish_record(port, core::hint::spin_loop);
            }
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
        // An alert record the pump began ends first (bounded: it gives up on a stuck UART).
        if ALERT_RING.in_record() {
            ALERT_RING.finish_record(port, core::hint::spin_loop);
        }
        let _ = port.write_fmt(args);
    }
}
