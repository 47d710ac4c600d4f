//! Rate limits for log lines a guest can trigger at will (a refused access, a rewritten
//! interrupt route, an access to Ally's memory). Each such line costs its OS core ~87 us per
//! byte on COM2 and holds the port lock the DPI core's alert pump needs, so a guest repeating
//! the event must not get a line per event.
//!
//! One [`LogLimit`] per kind of line: the first `first` events print, then only the 2^k-th
//! ones (128th, 256th, ...), so a guest that repeats an event for ever gets a logarithmic
//! number of lines. The counts are exact; [`report`] prints the suppressed ones at power-off.

use core::sync::atomic::{AtomicU64, Ordering};

/// A kind of guest-triggered log line and how often it was triggered.
pub struct LogLimit {
    kind: &'static str,
    first: u64,
    seen: AtomicU64,
}

impl LogLimit {
    /// `kind` names the line in the power-off report; the first `first` events all print.
    pub const fn new(kind: &'static str, first: u64) -> Self {
        Self {
            kind,
            first,
            seen: AtomicU64::new(0),
        }
    }

    /// Counts one event; true when its line should be printed.
    pub fn admit(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        n <= self.first || n.is_power_of_two()
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Events counted.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// Events whose line was printed: the first `first`, then the powers of two above it.
    pub fn printed(&self) -> u64 {
        let seen = self.seen();
        if seen <= self.first {
            return seen;
        }
        // Powers of two in (first, seen].
        let powers_upto = |n: u64| if n == 0 { 0 } else { u64::from(n.ilog2()) + 1 };
        self.first + powers_upto(seen) - powers_upto(self.first)
    }

    /// Events whose line was not printed.
    pub fn suppressed(&self) -> u64 {
        self.seen() - self.printed()
    }
}

/// `ALLY ept-violation`: the guest touched memory Ally keeps out of its EPT.
pub static EPT_VIOLATION: LogLimit = LogLimit::new("ept-violation", 64);
/// `ALLY msr-refused`: a guest WRMSR Ally refused (`crate::msr`), APIC moves included.
pub static MSR_REFUSED: LogLimit = LogLimit::new("msr-refused", 32);
/// `ALLY sleep-refused`: a guest request for S1-S4 (`crate::sleep`).
pub static SLEEP_REFUSED: LogLimit = LogLimit::new("sleep-refused", 16);
/// `ALLY pci-refused`: a configuration write Ally refused (`crate::pci::latch`).
pub static PCI_REFUSED: LogLimit = LogLimit::new("pci-refused", 16);
/// `ALLY nic-refused`: an access to the trapped NIC registers of a width Ally refuses.
pub static NIC_REFUSED: LogLimit = LogLimit::new("nic-refused", 16);
/// `ALLY nic-bar-moved` / `ALLY pci-bar-move-refused`: the guest moves the NIC's BARs.
pub static NIC_BAR_MOVE: LogLimit = LogLimit::new("nic-bar-move", 16);
/// `ALLY msi-rewritten` / `ALLY msi-refused`: MSI routes Ally changed or refused.
pub static MSI_ROUTE: LogLimit = LogLimit::new("msi-route", 16);
/// `ALLY ipi-drop` of IPIs aimed at a DPI core.
pub static IPI_DROP: LogLimit = LogLimit::new("ipi-drop", 64);
/// `ALLY ipi-drop` of broadcasts (Linux sends all-excluding-self call-function IPIs all the
/// time with several OS cores; their small budget leaves `IPI_DROP`'s to the aimed ones).
pub static IPI_DROP_BROADCAST: LogLimit = LogLimit::new("ipi-drop-broadcast", 4);
/// `ALLY ioapic-reroute`: an I/O APIC entry whose destination Ally rewrote.
pub static IOAPIC_REROUTE: LogLimit = LogLimit::new("ioapic-reroute", 64);
/// `ALLY init-emulated` / `ALLY sipi-emulated`: the guest's INIT and SIPI IPIs.
pub static INIT_SIPI: LogLimit = LogLimit::new("init-sipi", 64);
/// `ALLY mark`: the guest asks for a counters snapshot.
pub static MARK: LogLimit = LogLimit::new("mark", 64);

/// `ALLY intremap-conflict` / `ALLY intremap-refused`: interrupts the remapping could not
/// give an entry of their own.
pub static INTREMAP: LogLimit = LogLimit::new("intremap", 16);
/// `ALLY intremap-invalidation-timeout`: an IOMMU did not confirm an invalidation.
pub static IOMMU_COMMAND: LogLimit = LogLimit::new("iommu-command", 8);

/// Every kind, for the power-off report.
pub static ALL: [&LogLimit; 14] = [
    &INTREMAP,
    &IOMMU_COMMAND,
    &EPT_VIOLATION,
    &MSR_REFUSED,
    &SLEEP_REFUSED,
    &PCI_REFUSED,
    &NIC_REFUSED,
    &NIC_BAR_MOVE,
    &MSI_ROUTE,
    &IPI_DROP,
    &IPI_DROP_BROADCAST,
    &IOAPIC_REROUTE,
    &INIT_SIPI,
    &MARK,
];

/// At power-off: `ALLY log-limit kind=.. seen=.. printed=.. suppressed=..` for each kind the
/// guest triggered, then the total suppressed.
pub fn report() {
    let mut total = 0;
    for limit in ALL {
        if limit.seen() > 0 {
            log::info!(
                "ALLY log-limit kind={} seen={} printed={} suppressed={}",
                limit.kind(),
                limit.seen(),
                limit.printed(),
                limit.suppressed()
            );
        }
        total += limit.suppressed();
    }
    log::info!("ALLY log-limits suppressed={total}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_n_then_powers_of_two() {
        let limit = LogLimit::new("x", 5);
        let printed: std::vec::Vec<u64> = (1..=300).filter(|_| limit.admit()).collect();
        assert_eq!(printed, [1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256]);
        assert_eq!(limit.seen(), 300);
        assert_eq!(limit.printed(), 11);
        assert_eq!(limit.suppressed(), 289);
    }

    #[test]
    fn printed_matches_admit_for_every_count() {
        for first in [0, 1, 2, 4, 5, 16, 64] {
            let limit = LogLimit::new("x", first);
            let mut admitted = 0;
            for n in 1..=5000u64 {
                admitted += u64::from(limit.admit());
                assert_eq!(limit.printed(), admitted, "first={first} n={n}");
            }
        }
    }

    #[test]
    fn kinds_are_distinct_and_all_listed() {
        let mut kinds: std::vec::Vec<_> = ALL.iter().map(|l| l.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), ALL.len());
    }
}
