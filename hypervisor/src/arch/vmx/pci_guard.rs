//! The guest's PCI configuration accesses through mechanism #1 (ports 0xCF8-0xCFF, PCI Local
//! Bus 3.0 3.2.2.3.2), always intercepted:
//!
//! - the MSI and MSI-X registers of every function that has them go through that function's
//!   [`InterruptGuard`] (no message may target a DPI core; MSI-X stays hidden and off);
//! - the claimed NIC's BARs and command register go through its `GuardedFunction`
//!   (`nic_guard`);
//! - everything else is forwarded unchanged at the guest's width.
//!
//! Ally mirrors the guest's CONFIG_ADDRESS to know which function a data-port access reaches.
//! When a guard writes a different register than the guest addressed, Ally selects it, writes,
//! and puts the guest's CONFIG_ADDRESS back, all within the one exit (the guest's own
//! configuration lock keeps its CPUs from interleaving).

use super::nic_guard::{self, forward};
use super::platform::{platform, Platform};
use crate::arch::instructions;
use crate::arch::pci_ports::PortConfigSpace;
use crate::pci::msi::{InterruptGuard, InterruptWrite, MsiRoute};
use crate::pci::{ConfigAddress, ConfigSpace};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The guest's last CONFIG_ADDRESS (port 0xCF8), mirrored when Ally forwards it.
static CONFIG_ADDRESS: AtomicU32 = AtomicU32::new(0);
/// Guest configuration accesses a guard answered or filtered.
pub static GUARDED_ACCESSES: AtomicU64 = AtomicU64::new(0);

/// Whether `port` belongs to the configuration mechanism (CONFIG_ADDRESS or CONFIG_DATA).
pub fn is_config_port(port: u16) -> bool {
    (ConfigAddress::PORT..ConfigAddress::DATA_PORT + 4).contains(&port)
}

/// The guest's IN/OUT on a configuration port; returns the value of an IN.
pub fn config_port_access(port: u16, size: u8, is_in: bool, value: u32) -> Option<u32> {
    if port < ConfigAddress::DATA_PORT {
        // Only a dword at 0xCF8 is CONFIG_ADDRESS; narrower accesses (0xCF9 is the reset
        // control register on many chipsets) go to the hardware untouched.
        if port == ConfigAddress::PORT && size == 4 && !is_in {
            CONFIG_ADDRESS.store(value, Ordering::Relaxed);
        }
        // SAFETY: the guest owns the configuration mechanism; Ally forwards at the same width.
        return unsafe { forward(port, size, is_in, value) };
    }
    config_data_access(platform(), port, size, is_in, value)
}

fn config_data_access(p: &Platform, port: u16, size: u8, is_in: bool, value: u32) -> Option<u32> {
    let address = ConfigAddress(CONFIG_ADDRESS.load(Ordering::Relaxed));
    let function = address.function();
    let offset = address.register() + (port - ConfigAddress::DATA_PORT) as u8;
    let interrupts = p
        .pci_interrupts
        .iter()
        .find(|g| g.address == function && g.owns(offset));
    let nic = p.nic.as_ref().filter(|n| n.function.address == function);
    if !address.enabled() || (interrupts.is_none() && nic.is_none()) {
        // SAFETY: a register no guard covers: the guest's own business.
        return unsafe { forward(port, size, is_in, value) };
    }
    GUARDED_ACCESSES.fetch_add(1, Ordering::Relaxed);
    // SAFETY: CONFIG_ADDRESS selects the guarded register's dword; reading configuration
    // space has no side effect.
    let device_dword = unsafe { instructions::inl(ConfigAddress::DATA_PORT) };
    match (interrupts, nic) {
        (Some(guard), _) if is_in => Some(guard.read(offset, size, device_dword)),
        (Some(guard), _) => {
            interrupt_write(p, guard, address, offset, size, value, device_dword);
            None
        }
        (None, Some(nic)) => {
            nic_guard::config_access(nic, offset, size, is_in, value, device_dword)
        }
        // Unreachable: one of the two was found above.
        (None, None) => None,
    }
}

fn interrupt_write(
    p: &Platform,
    guard: &InterruptGuard,
    address: ConfigAddress,
    offset: u8,
    size: u8,
    value: u32,
    device_dword: u32,
) {
    match guard.write(offset, size, value, device_dword, p.cpu_sets()) {
        InterruptWrite::Forward => {
            let port = ConfigAddress::DATA_PORT + u16::from(offset & 3);
            // SAFETY: the guard lets this write through unchanged.
            unsafe { forward(port, size, false, value) };
        }
        InterruptWrite::Device { writes, route } => {
            for (register, dword) in writes {
                PortConfigSpace.write32(guard.address, register, dword);
            }
            // SAFETY: restores the guest's CONFIG_ADDRESS after Ally's own selections.
            unsafe { instructions::outl(ConfigAddress::PORT, address.0) };
            report_route(guard, route);
        }
    }
}

fn report_route(guard: &InterruptGuard, route: Option<MsiRoute>) {
    let what = match route {
        Some(MsiRoute::Rewritten {
            destination,
            dropped,
        }) => {
            if crate::log_limit::MSI_ROUTE.admit() {
                log::warn!(
                    "ALLY msi-rewritten function={} destination={destination:#x} dropped={dropped}",
                    guard.address
                );
            }
            return;
        }
        Some(MsiRoute::Refused) => "refused",
        _ => return,
    };
    if crate::log_limit::MSI_ROUTE.admit() {
        log::warn!(
            "ALLY msi-{what} function={} reason=\"not an interrupt address\" device-address={:#x}",
            guard.address,
            guard.device_address()
        );
    }
}

/// Prints the guards' counters (at the guest's power-off).
pub fn report() {
    let p = platform();
    let (mut rewrites, mut refusals, mut msix) = (0, 0, 0);
    for g in &p.pci_interrupts {
        let c = &g.counters;
        let (r, f, x) = (
            c.msi_rewrites.load(Ordering::Relaxed),
            c.msi_refusals.load(Ordering::Relaxed),
            c.msix_accesses.load(Ordering::Relaxed),
        );
        if r + f + x > 0 {
            log::info!(
                "ALLY pci-interrupts function={} msi-rewrites={r} msi-refusals={f} msix-accesses={x}",
                g.address
            );
        }
        (rewrites, refusals, msix) = (rewrites + r, refusals + f, msix + x);
    }
    log::info!(
        "ALLY pci-guard functions={} guarded-accesses={} msi-rewrites={rewrites} msi-refusals={refusals} msix-accesses={msix}",
        p.pci_interrupts.len(),
        GUARDED_ACCESSES.load(Ordering::Relaxed)
    );
}
