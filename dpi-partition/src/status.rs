//! The DPI partition's status page: the first page of DPI memory, written by the DPI cores and
//! read by Ally's management reports (COM2). One cache line per DPI core, so that cores never
//! share a line they write.

use core::sync::atomic::{AtomicU64, Ordering};

/// The most DPI cores the status page describes.
pub const MAX_DPI_CORES: usize = 32;

/// One DPI core's counters, alone on its cache line.
#[repr(C, align(64))]
pub struct CoreStatus {
    /// The core's APIC ID (0 until the core has started).
    pub apic_id: AtomicU64,
    /// Incremented once per pass of the DPI loop (at least once per timer wake-up).
    pub heartbeat: AtomicU64,
    /// Wake-ups of the idle wait (timer or doorbell).
    pub wakeups: AtomicU64,
}

/// The status page.
#[repr(C, align(4096))]
pub struct DpiStatus {
    pub cores: [CoreStatus; MAX_DPI_CORES],
}

const _: () = assert!(core::mem::size_of::<CoreStatus>() == 64);
const _: () = assert!(core::mem::size_of::<DpiStatus>() == 4096);

impl CoreStatus {
    /// Records one pass of the DPI loop.
    pub fn beat(&self) {
        self.heartbeat.fetch_add(1, Ordering::Relaxed);
    }
}

impl DpiStatus {
    /// A snapshot of `(apic_id, heartbeat, wakeups)` for the started cores.
    pub fn snapshot(&self) -> impl Iterator<Item = (usize, u64, u64, u64)> + '_ {
        self.cores.iter().enumerate().filter_map(|(i, c)| {
            let id = c.apic_id.load(Ordering::Relaxed);
            let beat = c.heartbeat.load(Ordering::Relaxed);
            (beat != 0).then(|| (i, id, beat, c.wakeups.load(Ordering::Relaxed)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_started_cores_only() {
        // SAFETY: all-zero bytes are a valid DpiStatus (atomics of 0).
        let status: DpiStatus = unsafe { core::mem::zeroed() };
        status.cores[1].apic_id.store(3, Ordering::Relaxed);
        status.cores[1].beat();
        status.cores[1].beat();
        let seen: Vec<_> = status.snapshot().collect();
        assert_eq!(seen, vec![(1, 3, 2, 0)]);
    }
}
