//! The guest's PCI configuration accesses through mechanism #1 (ports 0xCF8-0xCFF, PCI Local
//! Bus 3.0 3.2.2.3.2), always intercepted:
//!
//! - the MSI and MSI-X registers of every function that has them go through that function's
//!   [`InterruptGuard`] (no message may target a DPI core; MSI-X stays hidden and off);
//! - the claimed NIC's BARs and command register go through its `GuardedFunction`
//!   (`nic_guard`);
//! - everything else is forwarded unchanged at the guest's width.
//!
//! Each vCPU keeps its guest's CONFIG_ADDRESS (`crate::pci::latch`); every data-port access
//! selects it on the hardware and completes under one lock, so cores cannot interleave a
//! selection between another's check and access. Bridge bus numbers and the host bridge's
//! decode registers are refused on every function.

use crate::arch::instructions;
use crate::arch::pci_ports::PortConfigSpace;
use crate::guards::nic::{self as nic_guard, forward};
use crate::pci::latch::{self, ConfigPortAccess, ProtectedRegister};
use crate::pci::msi::{InterruptGuard, InterruptWrite, MsiRoute};
use crate::pci::{ConfigAddress, ConfigSpace};
use crate::platform::{platform, Platform};
use core::sync::atomic::{AtomicU64, Ordering};

/// Serialises Ally's use of the hardware's CONFIG_ADDRESS latch: select, then access.
static CONFIG_LOCK: spin::Mutex<()> = spin::Mutex::new(());
/// Guest configuration accesses a guard answered or filtered.
pub static GUARDED_ACCESSES: AtomicU64 = AtomicU64::new(0);
/// Writes Ally dropped: mechanism #2 registers, misaligned data accesses, bridge bus numbers,
/// the host bridge's decode registers.
static LEGACY_REFUSED: AtomicU64 = AtomicU64::new(0);
static MISALIGNED_REFUSED: AtomicU64 = AtomicU64::new(0);
static BRIDGE_BUS_REFUSED: AtomicU64 = AtomicU64::new(0);
static HOST_DECODE_REFUSED: AtomicU64 = AtomicU64::new(0);
static IOMMU_CAPABILITY_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Whether `port` belongs to the configuration mechanism (CONFIG_ADDRESS or CONFIG_DATA).
pub fn is_config_port(port: u16) -> bool {
    (ConfigAddress::PORT..ConfigAddress::DATA_PORT + 4).contains(&port)
}

/// What a configuration-port access came to.
pub enum ConfigOutcome {
    /// Done; an IN's value.
    Done(Option<u32>),
    /// The write hit the FADT's RESET_REG in configuration space with RESET_VALUE.
    Reset,
}

/// The guest's IN/OUT on a configuration port; `latch` is this vCPU's CONFIG_ADDRESS.
pub fn config_port_access(
    latch: &mut u32,
    port: u16,
    size: u8,
    is_in: bool,
    value: u32,
) -> ConfigOutcome {
    let result = match latch::classify(port, size, is_in, value) {
        ConfigPortAccess::Address if is_in => Some(*latch),
        ConfigPortAccess::Address => {
            *latch = value;
            None
        }
        ConfigPortAccess::Data { byte } => {
            let address = ConfigAddress(*latch);
            let offset = address.register() + byte;
            if !is_in
                && address.enabled()
                && platform()
                    .resets
                    .judge_config_write(address.function(), offset, size, value)
                    .is_some()
            {
                return ConfigOutcome::Reset;
            }
            let _selected = CONFIG_LOCK.lock();
            // SAFETY: Ally owns the latch (under CONFIG_LOCK); the guest's own selection.
            unsafe { instructions::outl(ConfigAddress::PORT, address.0) };
            config_data_access(platform(), address, offset, port, size, is_in, value)
        }
        ConfigPortAccess::Legacy { reset_control } => {
            if let Some(byte) = reset_control {
                // The reset guard found no reset in it: the selection bits are the guest's.
                // SAFETY: the reset control register is a plain byte register.
                unsafe { instructions::outb(0xCF9, byte) };
            }
            if !is_in && (size > 1 || port != 0xCF9) {
                LEGACY_REFUSED.fetch_add(1, Ordering::Relaxed);
            }
            is_in.then_some(u32::MAX)
        }
        ConfigPortAccess::Refused => {
            MISALIGNED_REFUSED.fetch_add(1, Ordering::Relaxed);
            is_in.then_some(u32::MAX)
        }
    };
    ConfigOutcome::Done(result)
}

/// A data-port access, with the guest's CONFIG_ADDRESS selected on the hardware and
/// CONFIG_LOCK held.
fn config_data_access(
    p: &Platform,
    address: ConfigAddress,
    offset: u8,
    port: u16,
    size: u8,
    is_in: bool,
    value: u32,
) -> Option<u32> {
    let function = address.function();
    if address.enabled() && !is_in {
        let header_type = || {
            // SAFETY: Ally owns the latch; reading the header type has no side effect, and
            // the guest's selection is restored before the write is judged further.
            unsafe {
                let header = ConfigAddress::new(function, 0x0C).0;
                instructions::outl(ConfigAddress::PORT, header);
                let ty = (instructions::inl(ConfigAddress::DATA_PORT) >> 16) as u8;
                instructions::outl(ConfigAddress::PORT, address.0);
                ty
            }
        };
        if let Some(register) = latch::protected_write(function, offset, size, header_type) {
            let counter = match register {
                ProtectedRegister::BridgeBusNumbers => &BRIDGE_BUS_REFUSED,
                ProtectedRegister::HostBridgeDecode => &HOST_DECODE_REFUSED,
                ProtectedRegister::IommuCapability => &IOMMU_CAPABILITY_REFUSED,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if crate::log_limit::PCI_REFUSED.admit() {
                log::warn!(
                    "ALLY pci-refused function={function} offset={offset:#x} size={size} value={value:#x} register={}",
                    register.name()
                );
            }
            return None;
        }
    }
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
            // SAFETY: Ally owns the latch (CONFIG_LOCK is held); the guest's selection again.
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
        "ALLY pci-guard functions={} guarded-accesses={} msi-rewrites={rewrites} msi-refusals={refusals} msix-accesses={msix} legacy-writes-refused={} misaligned-refused={} bridge-bus-refused={} host-decode-refused={} iommu-capability-refused={}",
        p.pci_interrupts.len(),
        GUARDED_ACCESSES.load(Ordering::Relaxed),
        LEGACY_REFUSED.load(Ordering::Relaxed),
        MISALIGNED_REFUSED.load(Ordering::Relaxed),
        BRIDGE_BUS_REFUSED.load(Ordering::Relaxed),
        HOST_DECODE_REFUSED.load(Ordering::Relaxed),
        IOMMU_CAPABILITY_REFUSED.load(Ordering::Relaxed)
    );
}
