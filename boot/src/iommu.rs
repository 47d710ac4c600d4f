//! DMA protection (issue 14): the machine's IOMMUs programmed before any guest runs, so no
//! device the guest drives reaches Ally's region or the DPI memory.
//!
//! VT-d (an ACPI DMAR): every PCI function found on the bus gets a context entry in one
//! root table, which every remapping unit uses (a unit only sees its own devices' requests):
//!
//! * the guest's devices share domain 1, which maps identity what the guest's CPUs reach in
//!   memory: every range of its memory map (RAM, ACPI and firmware-reserved ranges: the
//!   BIOS's disk driver keeps its AHCI command lists in reserved memory) and the DMAR's
//!   RMRRs, minus Ally's region and the real-mode stubs;
//! * the NIC Ally drives is alone in domain 2: its rings and buffers in DPI memory, and in
//!   zero-copy mode the guest's memory too (its buffers are the guest's, validated by the
//!   DPI core before the NIC is given them);
//! * a function not found at start-up (hot-plugged) has no context entry: its DMA faults.
//!
//! The DMAR is hidden from the guest (as the MCFG is) and the units' register pages leave
//! the EPT/NPT, so the guest can neither see nor reprogram them. Faults are polled by the
//! DPI core and at power-off, logged as `ALLY iommu-fault ...` and counted.
//!
//! AMD-Vi (an ACPI IVRS) is found but not programmed yet: Ally refuses to start on such a
//! machine unless `iommu=off` is given. Interrupt remapping is not programmed yet either.

use crate::frames::FramePool;
use crate::start::StartError;
use ally_hypervisor::acpi;
use ally_hypervisor::addr::{GuestPhysAddr, PhysRange, PAGE_SIZE};
use ally_hypervisor::arch::instructions;
use ally_hypervisor::arch::pci_ports::PortConfigSpace;
use ally_hypervisor::cmdline::{AllyOptions, PacketMode, PciAddress};
use ally_hypervisor::iommu::dmar::Dmar;
use ally_hypervisor::iommu::ivrs::Ivrs;
use ally_hypervisor::iommu::remapping::{UnitRegisters, VtdUnit};
use ally_hypervisor::iommu::vtd::{fault_reason_name, FaultAccess, IommuPageTables, RootTable};
use ally_hypervisor::iommu::{DmaDomainPlan, SourceId};
use ally_hypervisor::memmap::MemoryMap;
use ally_hypervisor::paging::GuestPaging;
use ally_hypervisor::pci::functions;
use ally_hypervisor::platform::IdentityMemory;
use core::sync::atomic::{AtomicU64, Ordering};
use log::{info, warn};

/// Domain ids (VT-d 9.3: 0 is reserved when CAP.CM is set).
const GUEST_DOMAIN: u16 = 1;
const NIC_DOMAIN: u16 = 2;

/// Most remapping units Ally drives.
const MAX_UNITS: usize = 8;

/// What the IOMMU set-up must keep out of the guest's devices' reach, and what the NIC Ally
/// drives may reach.
pub struct DmaPolicy<'a> {
    pub guest_map: &'a MemoryMap,
    /// Ally's region (the image, its heap and the DPI memory) and the real-mode stubs.
    pub protected: &'a [PhysRange],
    /// The NIC Ally drives and its rings and buffers.
    pub nic: Option<(PciAddress, PhysRange)>,
    pub identity_limit: u64,
}

/// The register page of a unit, through Ally's identity map.
#[derive(Clone, Copy)]
struct Registers {
    base: u64,
}

impl UnitRegisters for Registers {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `base` is a remapping unit's register page from the DMAR, identity-mapped
        // (below the identity limit, checked at set-up) and taken from the guest; the
        // offsets are the unit's registers.
        unsafe { ((self.base + offset as u64) as *const u32).read_volatile() }
    }
    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { ((self.base + offset as u64) as *mut u32).write_volatile(value) }
    }
    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as for `read32`; the 64-bit registers are 8-byte aligned (VT-d 10.2).
        unsafe { ((self.base + offset as u64) as *const u64).read_volatile() }
    }
    fn write64(&self, offset: usize, value: u64) {
        // SAFETY: as for `read64`.
        unsafe { ((self.base + offset as u64) as *mut u64).write_volatile(value) }
    }
}

/// The units Ally enabled, for fault polling.
static UNITS: spin::Once<heapless::Vec<Registers, MAX_UNITS>> = spin::Once::new();
static FAULTS: AtomicU64 = AtomicU64::new(0);
static OVERFLOWS: AtomicU64 = AtomicU64::new(0);
/// TSC of the last poll, so that the DPI core looks at most every [`POLL_TSC`] cycles.
static LAST_POLL: AtomicU64 = AtomicU64::new(0);
const POLL_TSC: u64 = 1 << 22;

/// Programs the IOMMUs, or refuses to go on without one (unless `iommu=off`).
pub fn protect(
    options: &AllyOptions,
    policy: &DmaPolicy<'_>,
    paging: &mut GuestPaging,
    frames: &mut FramePool,
) -> Result<(), StartError> {
    let mut memory = IdentityMemory {
        limit: policy.identity_limit,
    };
    let rsdp = acpi::find_rsdp(&memory).map_err(StartError::Acpi)?;
    let dmar = Dmar::find(&memory, &rsdp).map_err(StartError::Dmar)?;
    let amd = match Ivrs::find(&memory, &rsdp) {
        Ok(found) => found.is_some(),
        // A malformed IVRS still says the machine has AMD-Vi.
        Err(_) => true,
    };
    if options.iommu_off {
        warn!(
            "ALLY iommu status=off: iommu=off given; DMA PROTECTION IS OFF: any device the guest programs can read and write Ally's and the DPI partition's memory (dmar={} ivrs={})",
            dmar.is_some(),
            amd
        );
        return Ok(());
    }
    let Some((mut table, dmar)) = dmar else {
        return Err(StartError::NoIommu(if amd {
            "the machine has AMD-Vi (ACPI IVRS), which Ally does not program yet"
        } else {
            "the firmware describes no IOMMU (no ACPI DMAR or IVRS table: VT-d/AMD-Vi absent or disabled in the firmware setup)"
        }));
    };
    let reserved: heapless::Vec<PhysRange, 16> = dmar.reserved_ranges().take(16).collect();
    // What the guest's CPUs reach: its map within the identity map (which leaves out
    // reserved ranges above 4 GiB, such as QEMU's HyperTransport window at 1012 GiB).
    let guest_ranges: heapless::Vec<PhysRange, 64> = policy
        .guest_map
        .iter()
        .map(|r| r.range)
        .filter(|r| r.start < policy.identity_limit)
        .map(|r| PhysRange {
            start: r.start,
            end: r.end.min(policy.identity_limit),
        })
        .take(64)
        .collect();
    let guest = DmaDomainPlan::guest(&guest_ranges, policy.protected, &reserved)
        .map_err(StartError::Iommu)?;
    let nic = match policy.nic {
        Some((function, rings)) => Some((
            function,
            DmaDomainPlan::dpi_device(&[rings]).map_err(StartError::Iommu)?,
        )),
        None => None,
    };
    let top = guest
        .ranges()
        .iter()
        .chain(nic.iter().flat_map(|(_, plan)| plan.ranges()))
        .map(|r| r.end)
        .max()
        .unwrap_or(PAGE_SIZE);

    let mut units = heapless::Vec::<Registers, MAX_UNITS>::new();
    let mut root = None;
    for drhd in &dmar.units {
        let base = drhd.register_base.0;
        let pages = 1u64 << drhd.size.min(8);
        if base + pages * PAGE_SIZE > policy.identity_limit {
            return Err(StartError::IommuUnit(
                base,
                "its registers lie above the identity map",
            ));
        }
        let regs = Registers { base };
        let unit = VtdUnit::new(regs);
        let levels = unit
            .levels_for(top)
            .map_err(|e| StartError::IommuUnitError(base, e))?;
        let sizes = unit.cap.second_level_page_sizes();
        // One root table for all units, built with the first unit's paging.
        let root_table = match root {
            Some(r) => r,
            None => {
                let r = build_root_table(frames, levels, sizes, &guest, nic.as_ref(), options)?;
                root = Some(r);
                r
            }
        };
        if !unit.ecap.coherent() {
            // The unit's page walks do not snoop the caches (ECAP.C = 0, VT-d 6.6).
            instructions::wbinvd();
        }
        unit.enable(root_table.root())
            .map_err(|e| StartError::IommuUnitError(base, e))?;
        for page in 0..pages {
            paging.unmap_page(GuestPhysAddr(base + page * PAGE_SIZE), frames)?;
        }
        info!(
            "ALLY iommu unit=vt-d base={base:#x} pages={pages} levels={} cap={:#x} ecap={:#x} translation=on",
            levels.count(),
            unit.cap.0,
            unit.ecap.0
        );
        units
            .push(regs)
            .map_err(|_| StartError::IommuUnit(base, "more than 8 remapping units"))?;
    }
    if units.is_empty() {
        return Err(StartError::NoIommu("the DMAR lists no remapping unit"));
    }
    acpi::hide_table(&mut memory, &mut table);
    for r in guest.ranges() {
        log::debug!("iommu guest domain maps {r}");
    }
    info!(
        "ALLY iommu status=on kind=vt-d units={} guest-ranges={} rmrrs={} nic={} dmar=hidden",
        units.len(),
        guest.ranges().len(),
        reserved.len(),
        match &policy.nic {
            Some((f, rings)) => alloc::format!("{f}:{rings}"),
            None => alloc::string::String::from("none"),
        }
    );
    UNITS.call_once(|| units);
    Ok(())
}

/// The root table: every function on the bus in the guest's domain, the NIC in its own.
fn build_root_table(
    frames: &mut FramePool,
    levels: ally_hypervisor::iommu::PagingLevels,
    sizes: ally_hypervisor::iommu::PageSizes,
    guest: &DmaDomainPlan,
    nic: Option<&(PciAddress, DmaDomainPlan)>,
    options: &AllyOptions,
) -> Result<RootTable, StartError> {
    let mut guest_tables =
        IommuPageTables::new(levels, sizes, frames).map_err(StartError::Iommu)?;
    let stats = guest
        .map_into(&mut guest_tables, frames)
        .map_err(StartError::Iommu)?;
    info!(
        "ALLY iommu guest-domain pages-4k={} pages-2m={} pages-1g={} tables={}",
        stats.pages_4k, stats.pages_2m, stats.pages_1g, stats.tables
    );
    let nic_tables = match nic {
        Some((_, plan)) => {
            let mut t = IommuPageTables::new(levels, sizes, frames).map_err(StartError::Iommu)?;
            plan.map_into(&mut t, frames).map_err(StartError::Iommu)?;
            if options.mode == PacketMode::ZeroCopy {
                guest.map_into(&mut t, frames).map_err(StartError::Iommu)?;
            }
            Some(t)
        }
        None => None,
    };
    let mut root = RootTable::new(frames).map_err(StartError::Iommu)?;
    let mut devices = 0;
    for f in functions(&PortConfigSpace) {
        let a = f.address;
        let id = SourceId::new(a.bus, a.device, a.function);
        let entry = match (nic, &nic_tables) {
            (Some((nic_function, _)), Some(t)) if *nic_function == a => t.context_entry(NIC_DOMAIN),
            _ => guest_tables.context_entry(GUEST_DOMAIN),
        };
        root.set_context(id, entry, frames)
            .map_err(StartError::Iommu)?;
        devices += 1;
    }
    info!("ALLY iommu devices={devices} (guest domain {GUEST_DOMAIN}, NIC domain {NIC_DOMAIN})");
    Ok(root)
}

/// Logs and counts the faults the units recorded; at most every [`POLL_TSC`] cycles unless
/// `now` is asked for.
pub fn poll_faults(now: bool) {
    let Some(units) = UNITS.get() else {
        return;
    };
    let tsc = instructions::rdtsc();
    let last = LAST_POLL.load(Ordering::Relaxed);
    if !now && tsc.wrapping_sub(last) < POLL_TSC {
        return;
    }
    LAST_POLL.store(tsc, Ordering::Relaxed);
    for regs in units {
        let unit = VtdUnit::new(*regs);
        let poll = unit.take_faults(|f| {
            let n = FAULTS.fetch_add(1, Ordering::Relaxed);
            if n < 64 {
                warn!(
                    "ALLY iommu-fault device={} address={:#x} access={} reason={:#04x} ({}) unit={:#x}",
                    f.source,
                    f.address,
                    match f.access {
                        FaultAccess::Read => "read",
                        FaultAccess::Write => "write",
                    },
                    f.reason,
                    fault_reason_name(f.reason),
                    regs.base
                );
            }
        });
        if poll.overflowed {
            OVERFLOWS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// At the guest's power-off.
pub fn report() {
    poll_faults(true);
    match UNITS.get() {
        Some(units) => info!(
            "ALLY iommu units={} faults={} overflows={}",
            units.len(),
            FAULTS.load(Ordering::Relaxed),
            OVERFLOWS.load(Ordering::Relaxed)
        ),
        None => warn!("ALLY iommu status=off: the guest ran without DMA protection"),
    }
}
