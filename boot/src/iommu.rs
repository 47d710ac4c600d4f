//! DMA protection (issue 14): the machine's IOMMUs programmed before any guest runs, so no
//! device the guest drives reaches Ally's region or the DPI memory.
//!
//! VT-d (an ACPI DMAR): every PCI function found on the bus gets a context entry in one
//! root table, which every remapping unit uses (a unit only sees its own devices' requests).
//! The domains, on both vendors:
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
//! AMD-Vi (an ACPI IVRS, used when there is no DMAR): one device table of all 65,536
//! device IDs, shared by every IOMMU, in which every ID not found on the bus is blocked (an
//! entry with V = 0 would pass its DMA untranslated); the same two domains in AMD-Vi's I/O
//! page-table format; the IVRS hidden and each IOMMU's 16 KiB register window out of the
//! NPT.
//!
//! Interrupt remapping, on both: every interrupt a device sends goes through tables Ally
//! owns, which the I/O APIC and MSI guards fill with the guest's filtered programming
//! (`ally_hypervisor::iommu::interrupts`). VT-d: one table on every unit, queued
//! invalidation, compatibility-format interrupts blocked. AMD-Vi: a table per I/O APIC and
//! MSI function, every other device ID's interrupts aborted, no NMI/INIT/ExtINT/SMI pass.

use crate::frames::FramePool;
use crate::start::StartError;
use ally_hypervisor::acpi;
use ally_hypervisor::addr::HostPhysAddr;
use ally_hypervisor::addr::{GuestPhysAddr, PhysRange, PAGE_SIZE};
use ally_hypervisor::arch::instructions;
use ally_hypervisor::arch::pci_ports::PortConfigSpace;
use ally_hypervisor::cmdline::{AllyOptions, PacketMode, PciAddress};
use ally_hypervisor::iommu::amd_remap::{self, AmdRemapping};
use ally_hypervisor::iommu::amd_unit::{AmdViLayout, AmdViUnit};
use ally_hypervisor::iommu::amdvi::IntCtl;
use ally_hypervisor::iommu::amdvi::{DeviceTableEntry, Event, IoPageTables};
use ally_hypervisor::iommu::dmar::DeviceScopeKind;
use ally_hypervisor::iommu::dmar::Dmar;
use ally_hypervisor::iommu::interrupts::{self, IommuMemory};
use ally_hypervisor::iommu::ivrs::Ivrs;
use ally_hypervisor::iommu::ivrs::{IvhdEntry, SpecialVariety};
use ally_hypervisor::iommu::remapping::{UnitRegisters, VtdUnit};
use ally_hypervisor::iommu::vtd::regs as vtd_regs;
use ally_hypervisor::iommu::vtd::{fault_reason_name, FaultAccess, IommuPageTables, RootTable};
use ally_hypervisor::iommu::vtd_remap::{self, VtdRemapping};
use ally_hypervisor::iommu::{
    DmaDomainPlan, DmaPageTables, IommuError, PageSizes, PagingLevels, SourceId,
};
use ally_hypervisor::memmap::MemoryMap;
use ally_hypervisor::paging::GuestPaging;
use ally_hypervisor::pci::functions;
use ally_hypervisor::platform::IdentityMemory;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// The guarded I/O APICs (register base, APIC ID) and PCI functions with MSI: the
    /// interrupt sources whose messages are remapped.
    pub ioapics: &'a [(u64, u8)],
    pub msi_functions: &'a [PciAddress],
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

/// A unit Ally enabled, for fault polling.
enum Unit {
    Vtd(Registers),
    /// The registers and the event log.
    Amd(Registers, HostPhysAddr),
}

static UNITS: spin::Once<heapless::Vec<Unit, MAX_UNITS>> = spin::Once::new();
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
    let dmar = Dmar::find(&memory, &rsdp);
    let ivrs = Ivrs::find(&memory, &rsdp);
    if options.iommu_off {
        warn!(
            "ALLY iommu status=off: iommu=off given; DMA PROTECTION IS OFF: any device the guest programs can read and write Ally's and the DPI partition's memory (dmar={} ivrs={})",
            !matches!(dmar, Ok(None)),
            !matches!(ivrs, Ok(None))
        );
        return Ok(());
    }
    let (dmar, ivrs) = (
        dmar.map_err(StartError::Dmar)?,
        ivrs.map_err(StartError::Ivrs)?,
    );
    let (units, kind) = match (dmar, ivrs) {
        (Some((mut table, dmar)), _) => {
            let reserved: heapless::Vec<PhysRange, 16> = dmar.reserved_ranges().take(16).collect();
            let plans = Plans::new(policy, &reserved)?;
            let units = enable_vtd(&dmar, &plans, options, policy, paging, frames)?;
            acpi::hide_table(&mut memory, &mut table);
            (units, "vt-d")
        }
        (None, Some((mut table, ivrs))) => {
            let reserved: heapless::Vec<PhysRange, 16> = ivrs.reserved_ranges().take(16).collect();
            let plans = Plans::new(policy, &reserved)?;
            let units = enable_amdvi(&ivrs, &plans, options, policy, paging, frames)?;
            acpi::hide_table(&mut memory, &mut table);
            (units, "amd-vi")
        }
        (None, None) => {
            return Err(StartError::NoIommu(
                "the firmware describes no IOMMU (no ACPI DMAR or IVRS table: VT-d/AMD-Vi absent or disabled in the firmware setup)",
            ))
        }
    };
    info!(
        "ALLY iommu status=on kind={kind} units={} nic={} acpi-table=hidden",
        units.len(),
        match &policy.nic {
            Some((f, rings)) => alloc::format!("{f}:{rings}"),
            None => alloc::string::String::from("none"),
        }
    );
    UNITS.call_once(|| units);
    Ok(())
}

/// The two domains' ranges.
struct Plans {
    guest: DmaDomainPlan,
    nic: Option<(PciAddress, DmaDomainPlan)>,
    /// The end of the highest mapped range.
    top: u64,
}

impl Plans {
    fn new(policy: &DmaPolicy<'_>, reserved: &[PhysRange]) -> Result<Self, StartError> {
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
        let guest = DmaDomainPlan::guest(&guest_ranges, policy.protected, reserved)
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
        for r in guest.ranges() {
            log::debug!("iommu guest domain maps {r}");
        }
        info!(
            "ALLY iommu guest-ranges={} reserved-ranges={}",
            guest.ranges().len(),
            reserved.len()
        );
        Ok(Self { guest, nic, top })
    }

    /// Maps both domains into fresh tables of the vendor's format (`new`).
    fn build<T: DmaPageTables>(
        &self,
        frames: &mut FramePool,
        options: &AllyOptions,
        mut new: impl FnMut(&mut FramePool) -> Result<T, IommuError>,
    ) -> Result<(T, Option<T>), StartError> {
        let mut guest = new(frames).map_err(StartError::Iommu)?;
        let stats = self
            .guest
            .map_into(&mut guest, frames)
            .map_err(StartError::Iommu)?;
        info!(
            "ALLY iommu guest-domain pages-4k={} pages-2m={} pages-1g={} tables={}",
            stats.pages_4k, stats.pages_2m, stats.pages_1g, stats.tables
        );
        let nic = match &self.nic {
            Some((_, plan)) => {
                let mut t = new(frames).map_err(StartError::Iommu)?;
                plan.map_into(&mut t, frames).map_err(StartError::Iommu)?;
                if options.mode == PacketMode::ZeroCopy {
                    self.guest
                        .map_into(&mut t, frames)
                        .map_err(StartError::Iommu)?;
                }
                Some(t)
            }
            None => None,
        };
        Ok((guest, nic))
    }

    /// Every PCI function on the bus with the tables and domain it gets: the NIC Ally drives
    /// its own (when it has tables), every other function the guest's.
    fn assign<'t, T>(
        &'t self,
        guest: &'t T,
        nic: Option<&'t T>,
    ) -> impl Iterator<Item = (SourceId, &'t T, u16)> + 't {
        functions(&PortConfigSpace).map(move |f| {
            let a = f.address;
            let id = SourceId::from(a);
            match nic {
                Some(t) if matches!(&self.nic, Some((n, _)) if *n == a) => (id, t, NIC_DOMAIN),
                _ => (id, guest, GUEST_DOMAIN),
            }
        })
    }
}

/// The register page(s) of a unit leave the guest's nested paging.
fn hide_registers(
    base: u64,
    pages: u64,
    policy: &DmaPolicy<'_>,
    paging: &mut GuestPaging,
    frames: &mut FramePool,
) -> Result<(), StartError> {
    if base + pages * PAGE_SIZE > policy.identity_limit {
        return Err(StartError::IommuUnit(
            base,
            "its registers lie above the identity map",
        ));
    }
    for page in 0..pages {
        paging.unmap_page(GuestPhysAddr(base + page * PAGE_SIZE), frames)?;
    }
    Ok(())
}

/// VT-d: one root table, every unit on it.
fn enable_vtd(
    dmar: &Dmar,
    plans: &Plans,
    options: &AllyOptions,
    policy: &DmaPolicy<'_>,
    paging: &mut GuestPaging,
    frames: &mut FramePool,
) -> Result<heapless::Vec<Unit, MAX_UNITS>, StartError> {
    let mut units = heapless::Vec::new();
    let mut root = None;
    for drhd in &dmar.units {
        let base = drhd.register_base.0;
        let pages = 1u64 << drhd.size.min(8);
        hide_registers(base, pages, policy, paging, frames)?;
        let regs = Registers { base };
        let unit = VtdUnit::new(regs);
        let levels = unit
            .levels_for(plans.top)
            .map_err(|e| StartError::IommuUnitError(base, e))?;
        let sizes = unit.cap.second_level_page_sizes();
        // One root table for all units, built with the first unit's paging.
        let root_table = match root {
            Some(r) => r,
            None => {
                let r = build_root_table(frames, plans, options, |f| {
                    IommuPageTables::new(levels, sizes, f)
                })?;
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
        info!(
            "ALLY iommu unit=vt-d base={base:#x} pages={pages} levels={} cap={:#x} ecap={:#x} translation=on",
            levels.count(),
            unit.cap.0,
            unit.ecap.0
        );
        units
            .push(Unit::Vtd(regs))
            .map_err(|_| StartError::IommuUnit(base, "more than 8 remapping units"))?;
    }
    if units.is_empty() {
        return Err(StartError::NoIommu("the DMAR lists no remapping unit"));
    }
    remap_vtd_interrupts(dmar, &units, policy, frames)?;
    Ok(units)
}

/// VT-d interrupt remapping on every unit, over one table: queued invalidation on, the
/// table pointer set, the interrupt entry cache invalidated, remapping on with
/// compatibility-format interrupts blocked; then the guards fill the table.
fn remap_vtd_interrupts(
    dmar: &Dmar,
    units: &[Unit],
    policy: &DmaPolicy<'_>,
    frames: &mut FramePool,
) -> Result<(), StartError> {
    let completion: &'static AtomicU32 =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(AtomicU32::new(0)));
    let table = leak_words::<AtomicU64>(2 * vtd_remap::TABLE_ENTRIES, PAGE_SIZE as usize)?;
    let remapping: &'static VtdRemapping<Registers> =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(VtdRemapping::new(table, completion)));
    for unit in units {
        let Unit::Vtd(regs) = unit else { continue };
        let vtd = VtdUnit::new(*regs);
        let queue = frame_words::<AtomicU64>(frames)?;
        vtd.enable_queued_invalidation(queue.phys)
            .and_then(|()| vtd.set_interrupt_table(table.phys, vtd_remap::TABLE_SIZE))
            .map_err(|e| StartError::IommuUnitError(regs.base, e))?;
        remapping
            .add_unit(*regs, queue)
            .map_err(|_| StartError::IommuUnit(regs.base, "more than 8 remapping units"))?;
    }
    remapping.invalidate_all();
    for unit in units {
        let Unit::Vtd(regs) = unit else { continue };
        let vtd = VtdUnit::new(*regs);
        vtd.enable_interrupt_remapping()
            .map_err(|e| StartError::IommuUnitError(regs.base, e))?;
        let gsts = vtd.global_status();
        info!(
            "ALLY intremap unit=vt-d base={:#x} gsts={gsts:#x} ires={} cfis={} qies={}",
            regs.base,
            u8::from(gsts & vtd_regs::GSTS_IRES != 0),
            u8::from(gsts & vtd_regs::GSTS_CFIS != 0),
            u8::from(gsts & vtd_regs::GSTS_QIES != 0)
        );
    }
    for &(base, id) in policy.ioapics {
        let scope = dmar
            .units
            .iter()
            .flat_map(|drhd| dmar.scopes(drhd.scopes))
            .find(|s| s.kind == DeviceScopeKind::IoApic && s.enumeration_id == id);
        let source = scope.and_then(|s| {
            s.source_id(|bridge| {
                // The bridge's secondary bus number (PCI-to-PCI Bridge 1.2, 3.2.5.3).
                let bus_numbers = ally_hypervisor::pci::ConfigSpace::read32(
                    &PortConfigSpace,
                    bridge.into(),
                    0x18,
                );
                Some((bus_numbers >> 8) as u8)
            })
        });
        let Some(source) = source else {
            warn!("ALLY intremap ioapic={base:#x} id={id}: the DMAR names no source ID for it; its interrupts are blocked");
            continue;
        };
        remapping
            .add_ioapic(base, source)
            .map_err(|_| StartError::IommuUnit(base, "more than 8 I/O APICs"))?;
        info!("ALLY intremap ioapic={base:#x} id={id} source={source}");
    }
    for &function in policy.msi_functions {
        remapping
            .add_function(function)
            .map_err(|_| StartError::IommuUnit(0, "more than 64 MSI functions"))?;
    }
    interrupts::install(remapping);
    info!(
        "ALLY intremap status=on kind=vt-d ioapics={} msi-functions={} entries={} (compatibility-format interrupts blocked; every entry checks its requester)",
        policy.ioapics.len(),
        policy.msi_functions.len(),
        vtd_remap::TABLE_ENTRIES
    );
    Ok(())
}

/// Bytes of an AMD-Vi register window Ally hides (the registers through the event and
/// command pointers and status, 48882 3.4: 16 KiB).
const AMDVI_WINDOW_PAGES: u64 = 4;

/// AMD-Vi: one device table of every device ID (an entry with V = 0 would let its device's
/// DMA through untranslated), shared by every IOMMU; a command buffer and an event log each.
fn enable_amdvi(
    ivrs: &Ivrs,
    plans: &Plans,
    options: &AllyOptions,
    policy: &DmaPolicy<'_>,
    paging: &mut GuestPaging,
    frames: &mut FramePool,
) -> Result<heapless::Vec<Unit, MAX_UNITS>, StartError> {
    const ENTRIES: u32 = 1 << 16;
    let levels = if plans.top <= PagingLevels::Three.limit() {
        PagingLevels::Three
    } else {
        PagingLevels::Four
    };
    let (guest, nic) = plans.build(frames, options, |f| {
        IoPageTables::new(levels, PageSizes::ALL, f)
    })?;
    // 2 MiB: from the heap, which lies in Ally's region (identity-mapped, hidden).
    let layout = core::alloc::Layout::from_size_align(ENTRIES as usize * 32, PAGE_SIZE as usize)
        .map_err(|_| StartError::OutOfHeap)?;
    // SAFETY: the layout has a non-zero size.
    let device_table = unsafe { alloc::alloc::alloc_zeroed(layout) } as *mut DeviceTableEntry;
    if device_table.is_null() {
        return Err(StartError::OutOfHeap);
    }
    // SAFETY: just allocated for ENTRIES entries, zeroed (a valid value), never freed.
    let entries = unsafe { core::slice::from_raw_parts_mut(device_table, ENTRIES as usize) };
    // Every entry's interrupts are aborted (IV = 1, IntCtl = abort, no pass bits) but
    // those of the sources the guest programs, which get a remapping table of their own.
    entries.fill(DeviceTableEntry::blocked());
    let mut devices = 0;
    for (id, tables, domain) in plans.assign(&guest, nic.as_ref()) {
        entries[usize::from(id.0)] = tables.device_table_entry(domain);
        devices += 1;
    }
    info!("ALLY iommu devices={devices} (guest domain {GUEST_DOMAIN}, NIC domain {NIC_DOMAIN}), every other device ID blocked");
    let completion: &'static AtomicU64 =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(AtomicU64::new(0)));
    let remapping: &'static AmdRemapping<Registers> =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(AmdRemapping::new(completion)));
    let mut table = |device: SourceId| -> Result<IommuMemory<AtomicU32>, StartError> {
        let words = leak_words::<AtomicU32>(amd_remap::TABLE_ENTRIES, 128)?;
        let entry = &mut entries[usize::from(device.0)];
        *entry = entry.with_interrupt_table(words.phys, amd_remap::TABLE_LEN_LOG2, IntCtl::Remap);
        Ok(words)
    };
    for &(base, id) in policy.ioapics {
        let device = ivrs.preferred_units().find_map(|ivhd| {
            ivrs.entries(ivhd.entries).iter().find_map(|e| match *e {
                IvhdEntry::Special {
                    variety: SpecialVariety::IoApic,
                    handle,
                    device,
                    ..
                } if handle == id => Some(device),
                _ => None,
            })
        });
        let Some(device) = device else {
            warn!("ALLY intremap ioapic={base:#x} id={id}: the IVRS names no requester ID for it; its interrupts are blocked");
            continue;
        };
        let words = table(device)?;
        remapping
            .add_ioapic(base, device, words)
            .map_err(|_| StartError::IommuUnit(base, "more than 8 I/O APICs"))?;
        info!("ALLY intremap ioapic={base:#x} id={id} device={device}");
    }
    for &function in policy.msi_functions {
        let words = table(SourceId::from(function))?;
        remapping
            .add_function(function, words)
            .map_err(|_| StartError::IommuUnit(0, "more than 64 MSI functions"))?;
    }
    let mut units = heapless::Vec::new();
    // The IOMMUs' capability blocks hold their register windows' base: not the guest's.
    let capabilities: heapless::Vec<(PciAddress, u8), 8> = ivrs
        .preferred_units()
        .filter(|ivhd| ivhd.capability_offset >= 0x40 && ivhd.capability_offset <= 0xE8)
        .map(|ivhd| (PciAddress::from(ivhd.device), ivhd.capability_offset as u8))
        .take(8)
        .collect();
    ally_hypervisor::pci::latch::protect_iommu_capabilities(capabilities);
    for ivhd in ivrs.preferred_units() {
        let base = ivhd.base.0;
        hide_registers(base, AMDVI_WINDOW_PAGES, policy, paging, frames)?;
        let commands = frame_words::<AtomicU32>(frames)?;
        let command_buffer = commands.phys;
        let event_log = frames.allocate_zeroed().ok_or(StartError::OutOfFrames)?;
        let regs = Registers { base };
        let unit = AmdViUnit::new(regs);
        unit.enable(&AmdViLayout {
            device_table: HostPhysAddr(device_table as u64),
            device_entries: ENTRIES,
            command_buffer,
            event_log,
        })
        .map_err(|e| StartError::IommuUnitError(base, e))?;
        remapping
            .add_unit(regs, commands)
            .map_err(|_| StartError::IommuUnit(base, "more than 8 IOMMUs"))?;
        info!(
            "ALLY iommu unit=amd-vi base={base:#x} device={} levels={} translation=on",
            ivhd.device,
            levels.count()
        );
        units
            .push(Unit::Amd(regs, event_log))
            .map_err(|_| StartError::IommuUnit(base, "more than 8 IOMMUs"))?;
    }
    if units.is_empty() {
        return Err(StartError::NoIommu("the IVRS lists no IOMMU"));
    }
    interrupts::install(remapping);
    info!(
        "ALLY intremap status=on kind=amd-vi ioapics={} msi-functions={} (every other device's interrupts aborted; NMI, INIT, ExtINT and SMI pass from none)",
        policy.ioapics.len(),
        policy.msi_functions.len()
    );
    Ok(units)
}

/// The root table: every function on the bus in the guest's domain, the NIC in its own.
fn build_root_table(
    frames: &mut FramePool,
    plans: &Plans,
    options: &AllyOptions,
    new: impl FnMut(&mut FramePool) -> Result<IommuPageTables, IommuError>,
) -> Result<RootTable, StartError> {
    let (guest, nic) = plans.build(frames, options, new)?;
    let mut root = RootTable::new(frames).map_err(StartError::Iommu)?;
    let mut devices = 0;
    for (id, tables, domain) in plans.assign(&guest, nic.as_ref()) {
        root.set_context(id, tables.context_entry(domain), frames)
            .map_err(StartError::Iommu)?;
        devices += 1;
    }
    info!("ALLY iommu devices={devices} (guest domain {GUEST_DOMAIN}, NIC domain {NIC_DOMAIN}), functions found later have no context entry");
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
    for unit in units {
        let poll = match unit {
            Unit::Vtd(regs) => VtdUnit::new(*regs).take_faults(|f| {
                fault(
                    regs.base,
                    f.source,
                    f.address,
                    match f.access {
                        FaultAccess::Read => "read",
                        FaultAccess::Write => "write",
                    },
                    f.reason,
                    fault_reason_name(f.reason),
                )
            }),
            Unit::Amd(regs, log) => {
                let read = |offset: u64| {
                    // SAFETY: the event log is a frame of Ally's, identity-mapped; the offset
                    // is below its size (the head and tail pointers are masked and wrapped).
                    unsafe { ((log.0 + offset) as *const [u32; 4]).read_volatile() }
                };
                let clear = |offset: u64| {
                    // SAFETY: as for `read`.
                    unsafe { ((log.0 + offset) as *mut [u32; 4]).write_volatile([0; 4]) }
                };
                AmdViUnit::new(*regs).take_events(read, clear, |e| {
                    fault(
                        regs.base,
                        e.device,
                        e.address,
                        if e.flags & Event::FLAG_WRITE != 0 {
                            "write"
                        } else {
                            "read"
                        },
                        e.code,
                        e.name(),
                    )
                })
            }
        };
        if poll.overflowed {
            OVERFLOWS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a fault and logs the first 64.
fn fault(unit: u64, device: SourceId, address: u64, access: &str, reason: u8, name: &str) {
    let n = FAULTS.fetch_add(1, Ordering::Relaxed);
    if n < 64 {
        warn!(
            "ALLY iommu-fault device={device} address={address:#x} access={access} reason={reason:#04x} ({name}) unit={unit:#x}"
        );
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

/// `count` zeroed atomics from the heap (Ally's region: identity-mapped, hidden from the
/// guest and from its devices), aligned to `align` bytes, never freed: memory an IOMMU reads.
fn leak_words<T>(count: usize, align: usize) -> Result<IommuMemory<T>, StartError> {
    let layout = core::alloc::Layout::from_size_align(count * core::mem::size_of::<T>(), align)
        .map_err(|_| StartError::OutOfHeap)?;
    // SAFETY: the layout has a non-zero size.
    let at = unsafe { alloc::alloc::alloc_zeroed(layout) } as *const T;
    if at.is_null() {
        return Err(StartError::OutOfHeap);
    }
    Ok(IommuMemory {
        // SAFETY: just allocated for `count` values of T, an atomic integer for which zero
        // bytes are a valid value; never freed.
        words: unsafe { core::slice::from_raw_parts(at, count) },
        phys: HostPhysAddr(at as u64),
    })
}

/// A zeroed frame of Ally's as the atomics an IOMMU reads (a command buffer or an
/// invalidation queue).
fn frame_words<T>(frames: &mut FramePool) -> Result<IommuMemory<T>, StartError> {
    let frame = frames.allocate_zeroed().ok_or(StartError::OutOfFrames)?;
    Ok(IommuMemory {
        // SAFETY: a zeroed frame of Ally's (identity-mapped, never freed), used only through
        // these atomics from now on; T is an atomic integer, for which zero is valid.
        words: unsafe {
            core::slice::from_raw_parts(
                frame.0 as *const T,
                PAGE_SIZE as usize / core::mem::size_of::<T>(),
            )
        },
        phys: frame,
    })
}

/// Interrupt remapping is on: every guarded I/O APIC entry and MSI goes through it from
/// now on, rewritten from what the firmware left. Before the guest runs.
pub fn apply_interrupt_remapping(platform: &ally_hypervisor::platform::Platform) {
    if interrupts::remapping().is_none() {
        return;
    }
    for ioapic in platform.ioapics {
        ioapic.reapply_entries_for(platform.cpu_sets());
    }
    for function in &platform.pci_interrupts {
        function.apply_remapping(&PortConfigSpace, platform.cpu_sets());
    }
}
