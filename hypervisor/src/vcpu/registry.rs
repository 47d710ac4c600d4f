//! Every vCPU's exit counters, for the power-off report and the marks.

use crate::exit::{ExitCounters, ExitReason};
use crate::platform::platform;
use core::sync::atomic::{AtomicPtr, Ordering};
use log::info;

/// Every vCPU's exit counters, by OS core index, registered as each vCPU is configured.
static VCPU_EXITS: [AtomicPtr<ExitCounters>; 256] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];

/// Makes a vCPU's exit counts part of the power-off report. Only a vCPU's own counters are
/// registered, and vCPUs live in static slots for as long as Ally runs.
pub fn register_exit_counters(apic_id: u32, exits: &ExitCounters) {
    if let Some(index) = crate::guards::init_sipi::os_index(apic_id) {
        VCPU_EXITS[index].store(
            exits as *const ExitCounters as *mut ExitCounters,
            Ordering::Release,
        );
    }
}

/// The exit counters of every vCPU registered so far, with its index.
pub fn registered_exits() -> impl Iterator<Item = (usize, &'static ExitCounters)> {
    VCPU_EXITS.iter().enumerate().filter_map(|(index, p)| {
        let p = p.load(Ordering::Acquire);
        // SAFETY: registered pointers are to the counters of vCPUs, which live for as long
        // as Ally runs; the counters are atomics, safe to read from any CPU.
        (!p.is_null()).then(|| (index, unsafe { &*p }))
    })
}

/// One line per reason: the count and the handler's TSC ticks per exit (mean and longest;
/// the VM exit and VM entry transitions themselves are not included). Both backends count
/// under the SDM's basic exit-reason numbers (SVM maps its exit codes onto them), so the
/// reports read alike.
pub fn print_exits(exits: &ExitCounters) {
    for cost in exits.costs() {
        info!(
            "ALLY exits reason={} basic={} count={} handler-tsc-mean={} handler-tsc-max={}",
            ExitReason::from_basic(cost.basic),
            cost.basic,
            cost.timed,
            cost.mean(),
            cost.max_cycles
        );
    }
}

/// At power-off: the exits of all vCPUs by reason (`ALLY exits`), then each vCPU's total.
pub fn report_all_exits() {
    let mut sum = ExitCounters::new();
    for (_, exits) in registered_exits() {
        sum.merge(exits);
    }
    print_exits(&sum);
    for (index, exits) in registered_exits() {
        info!(
            "ALLY vcpu-exits apic={} total={}",
            platform().os_cores.get(index).copied().unwrap_or(u32::MAX),
            exits.total()
        );
    }
}
