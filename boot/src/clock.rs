//! Wall-clock time for alert records: the CMOS real-time clock read once at start-up, advanced
//! by the time stamp counter, whose rate is measured against the PIT.

use ally_hypervisor::arch::instructions::{inb, outb};
use core::sync::atomic::{AtomicU64, Ordering};

/// TSC ticks per second (0 until [`calibrate`]).
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BASE: AtomicU64 = AtomicU64::new(0);
/// Microseconds since the Unix epoch at `TSC_AT_BASE`.
static BASE_US: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;
/// 50 ms of PIT channel 2 (fits its 16-bit counter: 59,659 ticks).
const CALIBRATION_PIT_TICKS: u16 = (PIT_HZ / 20) as u16;

fn tsc() -> u64 {
    ally_dpi::queue::timestamp()
}

/// Measures the TSC rate and reads the RTC. Before the guest runs (the PIT's channel 2 and
/// the CMOS index port are then Ally's alone).
pub fn calibrate() {
    // SAFETY: PIT channel 2 gate (port 0x61 bit 0) and mode/count ports exist on every PC;
    // nothing else uses channel 2 before the guest starts.
    let ticks = unsafe {
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
        outb(0x42, CALIBRATION_PIT_TICKS as u8);
        outb(0x42, (CALIBRATION_PIT_TICKS >> 8) as u8);
        let start = tsc();
        // OUT2 (port 0x61 bit 5) goes high at terminal count.
        let mut spins = 0u64;
        while inb(0x61) & 0x20 == 0 && spins < 100_000_000 {
            spins += 1;
        }
        let end = tsc();
        outb(0x61, gate);
        end - start
    };
    let hz = ticks * PIT_HZ / u64::from(CALIBRATION_PIT_TICKS);
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    let base = rtc_unix_seconds().unwrap_or(0);
    TSC_AT_BASE.store(tsc(), Ordering::Relaxed);
    BASE_US.store(base * 1_000_000, Ordering::Relaxed);
    log::info!("ALLY clock tsc-hz={hz} rtc-unix={base}");
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed).max(1);
    let elapsed = tsc().saturating_sub(TSC_AT_BASE.load(Ordering::Relaxed));
    BASE_US.load(Ordering::Relaxed) + (u128::from(elapsed) * 1_000_000 / u128::from(hz)) as u64
}

/// TSC ticks per microsecond (for reporting latencies).
pub fn tsc_per_us() -> u64 {
    (TSC_HZ.load(Ordering::Relaxed) / 1_000_000).max(1)
}

fn cmos(register: u8) -> u8 {
    // SAFETY: the CMOS index/data ports; bit 7 of the index keeps NMIs as they are set by
    // firmware (Ally does not change it). Before the guest runs.
    unsafe {
        outb(0x70, register);
        inb(0x71)
    }
}

/// The RTC's date and time (MC146818: registers 0, 2, 4, 7, 8, 9, century 0x32), read twice
/// until stable and not during an update.
fn rtc_unix_seconds() -> Option<u64> {
    let read = || {
        for _ in 0..1_000_000 {
            if cmos(0x0A) & 0x80 == 0 {
                break;
            }
        }
        [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0B].map(cmos)
    };
    let mut now = read();
    for _ in 0..4 {
        let again = read();
        if again == now {
            break;
        }
        now = again;
    }
    let [s, m, h, day, month, year, century, status_b] = now;
    let binary = status_b & 0x04 != 0;
    let bcd = |v: u8| {
        if binary {
            u64::from(v)
        } else {
            u64::from(v & 0x0F) + u64::from(v >> 4) * 10
        }
    };
    let hour = if status_b & 0x02 == 0 && h & 0x80 != 0 {
        (bcd(h & 0x7F) % 12) + 12 // 12-hour clock, PM
    } else {
        bcd(h & 0x7F)
    };
    let century = match bcd(century) {
        c @ 19..=21 => c,
        _ => 20,
    };
    let year = century * 100 + bcd(year);
    let (month, day) = (bcd(month), bcd(day));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + bcd(m) * 60 + bcd(s))
}

/// Days since 1970-01-01 of a Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
