//! The boot CPU's start-up sequence (see main.rs for the order).

use crate::backend::{Backend, NoBackend};
use crate::cpus::{self, ApLaunch, OsCoreSetup, Role, SvmCoreSetup, VmxCoreSetup};
use crate::frames::FramePool;
use crate::relocate;
use crate::rules;
use crate::smp;
use alloc::boxed::Box;
use ally_dpi::rules_module::ModuleError;
use ally_dpi::status::DpiStatus;
use ally_hypervisor::acpi;
use ally_hypervisor::addr::{GuestPhysAddr, HostPhysAddr, PhysRange, LARGE_PAGE_SIZE, PAGE_SIZE};
use ally_hypervisor::arch::apic::LocalApic;
use ally_hypervisor::arch::descriptors::CpuTables;
use ally_hypervisor::arch::pci_ports::PortConfigSpace;
use ally_hypervisor::arch::svm::capabilities::SvmCapabilities;
use ally_hypervisor::arch::svm::exits as svm_exits;
use ally_hypervisor::arch::svm::permission_maps;
use ally_hypervisor::arch::svm::vcpu::{SvmPages, SvmStart, SvmVcpu};
use ally_hypervisor::arch::vmx::capabilities::VmxError;
use ally_hypervisor::arch::vmx::launch;
use ally_hypervisor::arch::vmx::vcpu::{intercept_ports, StartState, Vcpu, VcpuPages};
use ally_hypervisor::arch::{instructions, serial::COM2_BASE};
use ally_hypervisor::cmdline::{AllyOptions, CmdlineError};
use ally_hypervisor::guest::GuestRegisters;
use ally_hypervisor::guest_reset;
use ally_hypervisor::memmap::{MemMapError, MemoryKind, MemoryMap, MemoryRegion};
use ally_hypervisor::paging::{EptMemoryType, GuestPaging, PagingError};
use ally_hypervisor::platform::{self, Canary, IdentityMemory, Platform};
use ally_hypervisor::realmode::{self, RealModeError};
use ally_hypervisor::reset::{AcpiResetConfig, AcpiResetPort, ResetGuard};
use ally_hypervisor::sleep::{SleepGuard, SleepPorts};
use core::alloc::Layout;
use core::convert::Infallible;
use core::fmt;
use core::mem::size_of;
use log::info;
use multiboot2::{BootInformation, BootInformationHeader};

const MULTIBOOT2_MAGIC: u32 = 0x36D7_6289;
const FOUR_GIB: u64 = 1 << 32;
/// Frames for Ally's page tables, the EPT, VMXON/VMCS regions and bitmaps.
const FRAME_POOL_SIZE: u64 = 8 * 1024 * 1024;

/// Why Ally stopped before starting the guest.
pub enum StartError {
    NotMultiboot2(u32),
    BadBootInfo,
    Options(CmdlineError<'static>),
    CommandLineTooLong,
    NoMemoryMap,
    MemoryMap(MemMapError),
    Paging(PagingError),
    OutOfFrames,
    Vmx(VmxError),
    NoBackend(NoBackend),
    Acpi(acpi::AcpiError),
    OutOfHeap,
    Rules(ModuleError),
    ApDidNotStart(u32),
    RealMode(RealModeError),
    GuestEntryFailed {
        rflags: u64,
        error: u64,
    },
    NotAnOsCore(u32),
    Nic(ally_hypervisor::pci::PciError),
    NicMemory(ally_dpi::nic::mem::MemError),
    NicEngine(ally_dpi::nic::dpi::DpiError),
    NoRuleEngine,
    AlertChannelTaken,
    PciInterrupts(ally_hypervisor::pci::msi::ScanError),
    TooManyEcamWindows,
    UnguardablePowerRegister(&'static str, acpi::RegisterBlock),
    UninspectedNetwork {
        function: ally_hypervisor::pci::FoundFunction,
    },
    NoNicToInspect,
    IoApicLayout {
        id: u8,
        address: u32,
    },
    Topology(ally_hypervisor::topology::TopologyError),
    /// No IOMMU Ally can program, and no `iommu=off`.
    NoIommu(&'static str),
    Dmar(ally_hypervisor::iommu::dmar::DmarError),
    Ivrs(ally_hypervisor::iommu::ivrs::IvrsError),
    Iommu(ally_hypervisor::iommu::IommuError),
    IommuUnit(u64, &'static str),
    IommuUnitError(u64, ally_hypervisor::iommu::remapping::UnitError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMultiboot2(m) => write!(f, "not started by a multiboot2 loader (EAX={m:#x}); boot Ally with GRUB's `multiboot2`"),
            Self::BadBootInfo => write!(f, "the multiboot2 boot information is malformed"),
            Self::Options(e) => write!(f, "bad command line: {e}"),
            Self::CommandLineTooLong => write!(f, "the command line is longer than {} bytes", COMMAND_LINE_MAX - 1),
            Self::NoMemoryMap => write!(f, "the boot loader passed no memory map"),
            Self::MemoryMap(e) => write!(f, "memory map: {e}"),
            Self::Paging(e) => write!(f, "page tables: {e}"),
            Self::OutOfFrames => write!(f, "Ally's frame pool is exhausted"),
            Self::Vmx(e) => write!(f, "{e}"),
            Self::NoBackend(e) => write!(f, "{e}"),
            Self::Acpi(e) => write!(f, "ACPI: {e}"),
            Self::OutOfHeap => write!(f, "Ally's heap is exhausted (raise heap=)"),
            Self::Rules(e) => write!(f, "{e}"),
            Self::ApDidNotStart(id) => write!(f, "the CPU with APIC ID {id} did not answer INIT-SIPI-SIPI"),
            Self::RealMode(e) => write!(f, "{e}"),
            Self::GuestEntryFailed { rflags, error } => write!(f, "VMLAUNCH failed (rflags={rflags:#x}, VM-instruction error {error})"),
            Self::NotAnOsCore(id) => write!(f, "the CPU with APIC ID {id} is no OS core but was made a guest CPU"),
            Self::Nic(e) => write!(f, "{e}"),
            Self::NicMemory(e) => write!(f, "NIC: the guest's memory map cannot be guarded: {e}"),
            Self::NicEngine(e) => write!(f, "NIC queue engine (option \"dpi_mem\"?): {e}"),
            Self::NoRuleEngine => write!(f, "the rule engine was not built before the NIC was claimed"),
            Self::AlertChannelTaken => write!(f, "the alert channel was already given to another rule engine"),
            Self::PciInterrupts(e) => write!(f, "PCI message-signalled interrupts cannot all be guarded: {e}"),
            Self::TooManyEcamWindows => write!(f, "ACPI MCFG: more than 7 MMCONFIG windows to hide"),
            Self::UninspectedNetwork { function } => write!(f, "network controller {} ({:04x}:{:04x}) is not the NIC Ally inspects: the guest could send and receive through it uninspected; remove it, or give uninspected_network=allow", function.address, function.vendor, function.device),
            Self::NoNicToInspect => write!(f, "rules were given but there is no NIC to inspect (no 8086:100e found, or none at nic=): the guest's network would go uninspected; give uninspected_network=allow to boot anyway"),
            Self::UnguardablePowerRegister(name, block) => write!(f, "ACPI FADT: {name} is at {block:x?}, where Ally cannot guard it (only I/O ports, and bus 0 configuration space for RESET_REG): the guest could suspend or reset the machine behind Ally"),
            Self::Topology(e) => write!(f, "{e}"),
            Self::IoApicLayout { id, address } => write!(f, "ACPI MADT: I/O APIC {id} at {address:#x} does not have a page of its own, so Ally cannot guard it"),
            Self::NoIommu(why) => write!(f, "no IOMMU: {why}; without one any device the guest programs can read and write Ally's memory. Enable VT-d or AMD-Vi (IOMMU) in the firmware setup, or give iommu=off to run without DMA protection"),
            Self::Dmar(e) => write!(f, "ACPI DMAR: {e}"),
            Self::Ivrs(e) => write!(f, "ACPI IVRS: {e}"),
            Self::Iommu(e) => write!(f, "IOMMU tables: {e}"),
            Self::IommuUnit(base, why) => write!(f, "IOMMU at {base:#x}: {why}"),
            Self::IommuUnitError(base, e) => write!(f, "IOMMU at {base:#x}: {e}"),
        }
    }
}

impl From<MemMapError> for StartError {
    fn from(e: MemMapError) -> Self {
        Self::MemoryMap(e)
    }
}
impl From<PagingError> for StartError {
    fn from(e: PagingError) -> Self {
        Self::Paging(e)
    }
}
impl From<VmxError> for StartError {
    fn from(e: VmxError) -> Self {
        Self::Vmx(e)
    }
}

const COMMAND_LINE_MAX: usize = 1024;
static COMMAND_LINE: spin::Once<heapless::String<COMMAND_LINE_MAX>> = spin::Once::new();
static mut BSP_TABLES: CpuTables = CpuTables::new();
static mut BSP_VCPU: Option<Vcpu> = None;
const EXIT_STACK_SIZE: usize = 64 * 1024;
#[repr(C, align(4096))]
struct ExitStack([u8; EXIT_STACK_SIZE]);
static mut BSP_EXIT_STACK: ExitStack = ExitStack([0; EXIT_STACK_SIZE]);

/// The start-up sequence; returns only on error.
pub fn start(magic: u32, boot_info_addr: u32) -> Result<Infallible, StartError> {
    if magic != MULTIBOOT2_MAGIC {
        return Err(StartError::NotMultiboot2(magic));
    }
    // SAFETY: a multiboot2 loader passed this address; the low 4 GiB are identity-mapped.
    let boot_info =
        unsafe { BootInformation::load(boot_info_addr as usize as *const BootInformationHeader) }
            .map_err(|_| StartError::BadBootInfo)?;

    let cmdline = boot_info
        .command_line_tag()
        .and_then(|t| t.cmdline().ok())
        .unwrap_or("");
    // Keep a copy that outlives the boot information, for error messages that quote it.
    let cmdline: &'static str = COMMAND_LINE.call_once(|| {
        let mut copy = heapless::String::new();
        for c in cmdline.chars() {
            if copy.push(c).is_err() {
                break;
            }
        }
        copy
    });
    if cmdline.len() >= COMMAND_LINE_MAX {
        return Err(StartError::CommandLineTooLong);
    }
    info!("command line: \"{cmdline}\"");
    let options = AllyOptions::parse(cmdline).map_err(StartError::Options)?;
    log::set_max_level(options.log);
    // The rules module sizes the heap, so it is found before Ally's region is placed.
    let rules = rules::plan(&boot_info, options.heap).map_err(StartError::Rules)?;
    let heap_size = rules.heap;

    let firmware_map = MemoryMap::from_entries(
        boot_info
            .memory_map_tag()
            .ok_or(StartError::NoMemoryMap)?
            .memory_areas()
            .iter()
            .map(|a| MemoryRegion::from_base_len(a.start_address(), a.size(), u32::from(a.typ()))),
    )?;
    for region in firmware_map.iter() {
        info!("firmware map: {region}");
    }

    // Ally's region: image, frame pool, heap, DPI memory — at the top of a RAM range.
    let image = relocate::loaded_image();
    let region_size = (relocate::image_span() + FRAME_POOL_SIZE + heap_size + options.dpi_mem)
        .div_ceil(LARGE_PAGE_SIZE)
        * LARGE_PAGE_SIZE;
    let mut avoid: heapless::Vec<PhysRange, 40> = heapless::Vec::new();
    let _ = avoid.push(PhysRange {
        start: 0,
        end: 0x10_0000,
    });
    let _ = avoid.push(image);
    let _ = avoid.push(PhysRange {
        start: boot_info.start_address() as u64,
        end: boot_info.end_address() as u64,
    });
    for module in boot_info.module_tags() {
        let _ = avoid.push(PhysRange {
            start: u64::from(module.start_address()),
            end: u64::from(module.end_address()),
        });
    }
    let mut region =
        firmware_map.place_reservation(region_size, LARGE_PAGE_SIZE, FOUR_GIB, &avoid)?;
    // Take the range's unaligned tail too, so that Ally sits at the very top of the RAM range
    // (no stray guest RAM above it; EPT maps the boundary with 4 KiB pages).
    if let Some(range) = firmware_map.usable_range_containing(region.start) {
        if range.end - region.end < LARGE_PAGE_SIZE {
            region.end = range.end;
        }
    }
    info!(
        "ALLY region base={:#x} size={:#x}",
        region.start,
        region.len()
    );
    info!("ALLY image size={}", image.len());

    // Page tables and the copy.
    // The identity maps (Ally's and the guest's) reach the top of RAM, and at least 4 GiB for
    // the devices below it. Reserved ranges above 4 GiB are left out: QEMU's AMD machines
    // reserve the HyperTransport window at 1012 GiB, which would cost 4 MiB of tables for
    // nothing behind it (a guest access there reads as nothing, like any hidden address).
    let ram_top = firmware_map
        .iter()
        .filter(|r| r.kind != MemoryKind::Reserved || r.range.end <= FOUR_GIB)
        .map(|r| r.range.end)
        .max()
        .unwrap_or(FOUR_GIB);
    let identity_limit = ram_top.max(FOUR_GIB).div_ceil(1 << 30) * (1 << 30);
    let pool_start = region.start + relocate::image_span();
    let mut frames = FramePool::new(PhysRange {
        start: pool_start,
        end: pool_start + FRAME_POOL_SIZE,
    });
    // SAFETY: the region is free RAM (placed above, avoiding the image, boot info and
    // modules), 2 MiB-aligned, and the pool lies after the image span.
    unsafe { relocate::relocate(region.start, identity_limit, &mut frames)? };
    info!("running from the reserved region");

    let heap_start = pool_start + FRAME_POOL_SIZE;
    // SAFETY: the heap range lies in Ally's region after the frame pool, is identity-mapped
    // and used by nothing else.
    unsafe { crate::HEAP.init(heap_start as *mut u8, heap_size as usize) };
    // SAFETY: the heap is ready; the module is identity-mapped RAM that no guest or other CPU
    // uses yet (the APs start later).
    unsafe { rules::load(&rules) }.map_err(StartError::Rules)?;
    crate::clock::calibrate();

    // SAFETY: BSP_TABLES is used by this CPU alone, for ever.
    unsafe { (*core::ptr::addr_of_mut!(BSP_TABLES)).load() };

    // SAFETY: ring 0 on the boot CPU, before any guest.
    let backend = unsafe { Backend::probe() }.map_err(StartError::NoBackend)?;
    match &backend {
        Backend::Vmx(caps) => {
            info!(
                "VMX: revision {:#x}, secondary controls {:#x}, EPT/VPID caps {:#x}",
                caps.vmcs_revision, caps.secondary, caps.ept_vpid_cap
            );
            log::debug!(
                "VMX fixed bits: CR0 {:#x}/{:#x}, CR4 {:#x}/{:#x}",
                caps.cr0_fixed0,
                caps.cr0_fixed1,
                caps.cr4_fixed0,
                caps.cr4_fixed1
            );
        }
        Backend::Svm(caps) => info!(
            "SVM: revision {}, {} ASIDs, features {:#x}",
            caps.revision, caps.asids, caps.features
        ),
    }

    // The guest's view: real-mode stubs in stolen conventional memory, filtered map, EPT.
    // SAFETY: the IVT and BDA are identity-mapped and no guest runs yet.
    let stub = unsafe { realmode::install(backend.hypercall()) }.map_err(StartError::RealMode)?;
    info!("real-mode stubs at {:#x} (INT 15h hooked)", stub.base);
    let guest_map = firmware_map.without(&[region, stub.taken])?;
    for region in guest_map.iter() {
        info!("guest map: {region}");
    }

    let (resets, sleep) = power_guards(identity_limit)?;
    let cpus = partition_cpus(identity_limit, &options)?;

    let mut paging = backend.new_paging(&mut frames)?;
    let ecam_windows = hide_mmconfig(identity_limit)?;
    let mut hidden = heapless::Vec::<PhysRange, 8>::new();
    let _ = hidden.push(region);
    hidden.extend(ecam_windows.iter().copied());
    map_guest_physical(
        &mut paging,
        &mut frames,
        &firmware_map,
        &hidden,
        identity_limit,
    )?;
    // The local APIC page is read-only in the EPT/NPT: reads (the guest's own APIC, as
    // Ally's filter would return them) reach the hardware without an exit; every write
    // exits and is filtered (`guards/apic.rs`: the ICR above all).
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let apic_base = unsafe { instructions::rdmsr(0x1B) } & 0xF_FFFF_F000;
    paging.map_read_only(
        GuestPhysAddr(apic_base),
        HostPhysAddr(apic_base),
        PAGE_SIZE,
        EptMemoryType::Uncacheable,
        &mut frames,
    )?;

    // DPI memory (the region's tail) is unused until the DPI partition starts: poison it, so
    // that a leak of its contents would be recognisable, and guard it with the image head.
    let dpi_memory = PhysRange {
        start: heap_start + heap_size,
        end: region.end,
    };
    // SAFETY: DPI memory is identity-mapped, 8-byte aligned and used by nothing yet.
    unsafe { poison(dpi_memory) };
    info!(
        "ALLY dpi-memory base={:#x} size={:#x} poison={:#x}",
        dpi_memory.start,
        dpi_memory.len(),
        POISON
    );
    let image_head = PhysRange {
        start: region.start,
        end: region.start + 2 * PAGE_SIZE,
    };
    // SAFETY: the first page of DPI memory is the DPI status page; all-zero is its initial
    // state, and nothing else uses it.
    let dpi_status: &'static DpiStatus = unsafe {
        core::ptr::write_bytes(dpi_memory.start as *mut u8, 0, PAGE_SIZE as usize);
        &*(dpi_memory.start as *const DpiStatus)
    };
    DPI_STATUS.call_once(|| dpi_status);
    // The NIC's rings and buffers take the end of DPI memory; the rest stays poisoned and
    // guarded by the canary.
    let nic_region = PhysRange {
        start: (dpi_memory.end - crate::nic::region_bytes(&options)) & !(PAGE_SIZE - 1),
        end: dpi_memory.end,
    };
    let dpi_guarded = PhysRange {
        start: dpi_memory.start + PAGE_SIZE,
        end: nic_region.start.max(dpi_memory.start + PAGE_SIZE),
    };
    // The I/O APICs leave the EPT too: no redirection entry may name a DPI core.
    let found_ioapics = io_apics(identity_limit)?;
    let mut ioapics = alloc::vec::Vec::with_capacity(found_ioapics.len());
    for &(base, _) in &found_ioapics {
        paging.unmap_page(GuestPhysAddr(base), &mut frames)?;
        let guard = ally_hypervisor::guards::ioapic::IoApicGuard::new(base);
        info!(
            "ALLY ioapic guarded base={base:#x} entries={}",
            guard.entries()
        );
        ioapics.push(guard);
    }
    info!("ALLY ioapics count={}", ioapics.len());
    let ioapics = ioapics.leak();
    let os_cores = cpus.os_cores();
    let pci_interrupts = guard_pci_interrupts(ally_hypervisor::ipi::CpuSets {
        os_cores: &os_cores,
        dpi_cores: &cpus.dpi,
    })?;
    let claimed = crate::nic::claim(&options, &guest_map, region, nic_region, identity_limit)?;
    crate::nic::refuse_uninspected_network(
        &options,
        rules.given(),
        claimed.as_ref().map(|c| c.trap.function.address),
    )?;
    // DMA protection, before any guest or DPI core runs: the guest's devices reach what its
    // CPUs reach, the NIC its rings.
    crate::iommu::protect(
        &options,
        &crate::iommu::DmaPolicy {
            guest_map: &guest_map,
            protected: &[region, stub.taken],
            nic: claimed
                .as_ref()
                .map(|c| (c.trap.function.address, nic_region)),
            identity_limit,
            ioapics: &found_ioapics,
            msi_functions: &pci_interrupts
                .iter()
                .filter(|g| g.capabilities.msi.is_some())
                .map(|g| g.address)
                .collect::<heapless::Vec<_, { platform::MAX_INTERRUPT_FUNCTIONS }>>(),
        },
        &mut paging,
        &mut frames,
    )?;
    let mut nic_trap = None;
    let mut nic_ports = heapless::Vec::<core::ops::Range<u32>, 1>::new();
    if let Some(claimed) = claimed {
        for page in claimed.trapped_pages {
            paging.unmap_page(GuestPhysAddr(page), &mut frames)?;
        }
        nic_ports = claimed.ports;
        nic_trap = Some(claimed.trap);
        *crate::nic::DPI_WORK.lock() = Some(claimed.work);
    }
    let platform = platform::install(Platform {
        guest_map,
        hidden,
        identity_limit,
        realmode: stub,
        resets,
        sleep,
        // SAFETY: both ranges are Ally's identity-mapped, 8-byte aligned memory.
        canary: unsafe { Canary::new([image_head, dpi_guarded]) },
        power_off_hook: report_dpi_status,
        mark_hook: crate::nic::mark,
        dpi_heartbeat,
        boot_cpu: cpus.boot_cpu,
        os_cores,
        dpi_cores: cpus.dpi.clone(),
        apic_base,
        nic: nic_trap,
        ioapics,
        pci_interrupts,
    });
    crate::iommu::apply_interrupt_remapping(platform);

    // The ports every vCPU intercepts: COM2 (Ally's), PCI configuration mechanism #1 (MSI
    // registers and the NIC's BARs are guarded), the guest's reset and sleep requests and the
    // NIC's I/O BAR.
    let mut ports = heapless::Vec::<core::ops::Range<u32>, 16>::new();
    let _ = ports.push(u32::from(COM2_BASE)..u32::from(COM2_BASE) + 8);
    let _ = ports.push(0xCF8..0xD00);
    for (port, count) in platform.resets.ports().chain(platform.sleep.ports()) {
        ports
            .push(u32::from(port)..u32::from(port) + u32::from(count))
            .map_err(|_| StartError::OutOfFrames)?;
    }
    for range in nic_ports {
        ports.push(range).map_err(|_| StartError::OutOfFrames)?;
    }
    let guest = GuestStart {
        cpus: &cpus,
        stub: &stub,
        paging,
        frames,
        dpi_status,
        ports: &ports,
    };
    match backend {
        Backend::Vmx(caps) => launch_vmx(caps, guest),
        Backend::Svm(caps) => launch_svm(caps, guest),
    }
}

/// What the boot CPU hands the backend to start the guest with.
struct GuestStart<'a> {
    cpus: &'a CpuPartition,
    stub: &'a realmode::RealModeStub,
    paging: GuestPaging,
    frames: FramePool,
    dpi_status: &'static DpiStatus,
    ports: &'a [core::ops::Range<u32>],
}

/// Records what a guest reboot restores (conventional memory, the 8259 masks), as the
/// guest's first instruction finds it; then the nested paging is the BAR-move path's.
fn before_first_guest_instruction(
    paging: GuestPaging,
    frames: FramePool,
) -> Result<(), StartError> {
    // From here on the EPT/NPT changes only when the guest moves the NIC's BAR.
    crate::nic::hand_over_paging(paging, frames);
    let reset_buffer = leak_zeroed(guest_reset::LOW_MEMORY_BYTES)?;
    // SAFETY: on the boot CPU, just before the guest first runs (the other OS cores wait for
    // its SIPI); the buffer was just allocated, is never freed and nothing else uses it.
    unsafe {
        guest_reset::record_boot_state(core::slice::from_raw_parts_mut(
            reset_buffer,
            guest_reset::LOW_MEMORY_BYTES,
        ))
    };
    info!("ALLY guest-start");
    Ok(())
}

/// VMX: the shared MSR and I/O bitmaps, the OS cores, the boot CPU's VMCS, VMLAUNCH.
fn launch_vmx(
    caps: ally_hypervisor::arch::vmx::capabilities::VmxCapabilities,
    guest: GuestStart<'_>,
) -> Result<Infallible, StartError> {
    let GuestStart {
        cpus,
        stub,
        paging,
        mut frames,
        dpi_status,
        ports,
    } = guest;
    // The MSR and I/O bitmaps are the same for every vCPU: one copy, shared.
    let pages = VcpuPages {
        vmxon: frame(&mut frames)?,
        vmcs: frame(&mut frames)?,
        msr_bitmap: frame(&mut frames)?,
        io_bitmap_a: frame(&mut frames)?,
        io_bitmap_b: frame(&mut frames)?,
    };
    // SAFETY: the bitmap frames were just allocated, zeroed and are identity-mapped.
    unsafe {
        ally_hypervisor::msr::fill_bitmap(&mut *(pages.msr_bitmap as *mut [u8; 4096]));
        let io_a = &mut *(pages.io_bitmap_a as *mut [u8; 4096]);
        let io_b = &mut *(pages.io_bitmap_b as *mut [u8; 4096]);
        for range in ports {
            intercept_ports(io_a, io_b, range.clone());
        }
    }
    let eptp = paging.root_pointer();
    start_application_processors(cpus, stub, dpi_status, &mut frames, &mut |frames| {
        let exit_stack = leak_zeroed(EXIT_STACK_SIZE)? as u64;
        Ok(OsCoreSetup::Vmx(VmxCoreSetup {
            vpid: 0,
            pages: VcpuPages {
                vmxon: frame(frames)?,
                vmcs: frame(frames)?,
                ..pages
            },
            eptp,
            exit_stack_top: exit_stack + EXIT_STACK_SIZE as u64 - 16,
            vcpu_slot: Box::leak(Box::new(None)),
        }))
    })?;
    info!("frame pool: {} KiB left", frames.remaining() / 1024);

    // SAFETY: BSP_VCPU is written once here, before the first VM exit can read it.
    let vcpu = unsafe {
        let slot = &mut *core::ptr::addr_of_mut!(BSP_VCPU);
        slot.insert(Vcpu::new(cpus.boot_cpu, 1, caps, pages))
    };
    // The boot CPU runs the guest from the start; the other OS cores wait for its SIPI.
    vcpu.mailbox
        .ok_or(StartError::NotAnOsCore(cpus.boot_cpu))?
        .set_running();
    // SAFETY: on the boot CPU, once; the pages are zeroed and identity-mapped.
    unsafe { vcpu.activate()? };
    // The exit stack's top holds the vCPU pointer the trampoline passes to the handler.
    // SAFETY: the exit stack is used by this CPU alone.
    let exit_stack_top = unsafe {
        let base = core::ptr::addr_of_mut!(BSP_EXIT_STACK) as u64;
        let top = base + EXIT_STACK_SIZE as u64 - 16;
        (top as *mut u64).write(vcpu as *mut Vcpu as u64);
        top
    };
    // SAFETY: BSP_TABLES was loaded above and lives for ever.
    let tss_base = unsafe { (*core::ptr::addr_of!(BSP_TABLES)).tss_base() };
    vcpu.configure(
        eptp,
        StartState::RealMode {
            segment: stub.segment,
        },
        exit_stack_top,
        tss_base,
        launch::ally_vmexit_entry as *const () as u64,
    )?;
    // SAFETY: EPT and VPID were checked in `probe_and_enable`.
    unsafe { instructions::invept_all() };
    before_first_guest_instruction(paging, frames)?;
    // SAFETY: the VMCS is complete and current; exits land on the exit stack set above.
    let rflags = unsafe { launch::vmlaunch(&GuestRegisters::default()) };
    Err(StartError::GuestEntryFailed {
        rflags,
        error: instructions::vmread(x86::vmx::vmcs::ro::VM_INSTRUCTION_ERROR),
    })
}

/// SVM: the shared I/O and MSR permission maps, the OS cores, the boot CPU's VMCB, the run
/// loop.
fn launch_svm(caps: SvmCapabilities, guest: GuestStart<'_>) -> Result<Infallible, StartError> {
    let GuestStart {
        cpus,
        stub,
        paging,
        mut frames,
        dpi_status,
        ports,
    } = guest;
    let iopm = frames
        .allocate_contiguous(permission_maps::IOPM_BYTES / PAGE_SIZE as usize)
        .ok_or(StartError::OutOfFrames)?;
    let msrpm = frames
        .allocate_contiguous(permission_maps::MSRPM_BYTES / PAGE_SIZE as usize)
        .ok_or(StartError::OutOfFrames)?;
    // SAFETY: both maps were just allocated, zeroed, contiguous and identity-mapped.
    unsafe {
        let iopm = &mut *(iopm as *mut [u8; permission_maps::IOPM_BYTES]);
        for range in ports {
            permission_maps::intercept_ports(iopm, range.clone());
        }
        permission_maps::fill_msrpm(&mut *(msrpm as *mut [u8; permission_maps::MSRPM_BYTES]));
    }
    let n_cr3 = paging.root_pointer();
    let shared = SvmPages {
        vmcb: 0,
        host_save: 0,
        host_vmcb: 0,
        iopm,
        msrpm,
    };
    start_application_processors(cpus, stub, dpi_status, &mut frames, &mut |frames| {
        Ok(OsCoreSetup::Svm(SvmCoreSetup {
            caps,
            pages: SvmPages {
                vmcb: frame(frames)?,
                host_save: frame(frames)?,
                host_vmcb: frame(frames)?,
                ..shared
            },
            n_cr3,
            vcpu_slot: Box::leak(Box::new(None)),
        }))
    })?;
    info!("frame pool: {} KiB left", frames.remaining() / 1024);
    let pages = SvmPages {
        vmcb: frame(&mut frames)?,
        host_save: frame(&mut frames)?,
        host_vmcb: frame(&mut frames)?,
        ..shared
    };
    let vcpu = Box::leak(Box::new(SvmVcpu::new(cpus.boot_cpu, caps, pages, n_cr3)));
    vcpu.mailbox
        .ok_or(StartError::NotAnOsCore(cpus.boot_cpu))?
        .set_running();
    // SAFETY: on the boot CPU, once, with Ally's GDT, TSS and segment bases loaded; the pages
    // are zeroed, aligned and identity-mapped.
    unsafe { crate::cpus::enable_svm(&caps, &pages) };
    vcpu.configure(SvmStart::Boot {
        segment: stub.segment,
    });
    before_first_guest_instruction(paging, frames)?;
    svm_exits::run_loop(vcpu)
}

/// PCI Express enhanced configuration (MMCONFIG, PCI Firmware 3.0 4.1.2): when the firmware
/// describes ECAM windows in an MCFG table, Ally hides that table from the guest and keeps
/// the windows out of the EPT, so the guest configures devices through mechanism #1 (ports
/// 0xCF8/0xCFC), which `guards::pci_config` filters; an access to a window reads all ones. The price:
/// the guest does not see extended configuration space (offsets 0x100 and up).
fn hide_mmconfig(identity_limit: u64) -> Result<heapless::Vec<PhysRange, 7>, StartError> {
    let mut memory = IdentityMemory {
        limit: identity_limit,
    };
    let rsdp = acpi::find_rsdp(&memory).map_err(StartError::Acpi)?;
    let mut mcfg = match acpi::find_table(&memory, &rsdp, b"MCFG") {
        Ok(t) => t,
        Err(acpi::AcpiError::TableNotFound { .. }) => {
            info!("ALLY pci-mmconfig absent");
            return Ok(heapless::Vec::new());
        }
        Err(e) => return Err(StartError::Acpi(e)),
    };
    let allocations = acpi::mcfg_allocations(&memory, &mcfg).map_err(StartError::Acpi)?;
    let mut windows = heapless::Vec::new();
    for a in &allocations {
        let (start, end) = a.window();
        windows
            .push(PhysRange { start, end })
            .map_err(|_| StartError::TooManyEcamWindows)?;
        info!(
            "ALLY pci-mmconfig hidden base={start:#x} end={end:#x} segment={} buses={:#x}-{:#x}",
            a.segment, a.start_bus, a.end_bus
        );
    }
    acpi::hide_table(&mut memory, &mut mcfg);
    Ok(windows)
}

/// Every PCI function with MSI or MSI-X, adopted: its MSI address filtered (a firmware value
/// aimed at a DPI core is rewritten now) and MSI-X turned off; the guest's later writes go
/// through `guards::pci_config`. Before the guest runs.
fn guard_pci_interrupts(
    sets: ally_hypervisor::ipi::CpuSets<'_>,
) -> Result<
    heapless::Vec<ally_hypervisor::pci::msi::InterruptGuard, { platform::MAX_INTERRUPT_FUNCTIONS }>,
    StartError,
> {
    use ally_hypervisor::pci::msi::{scan_interrupt_capabilities, InterruptGuard};
    let found =
        scan_interrupt_capabilities::<{ platform::MAX_INTERRUPT_FUNCTIONS }>(&PortConfigSpace)
            .map_err(StartError::PciInterrupts)?;
    let mut guards = heapless::Vec::new();
    for function in &found {
        let guard = InterruptGuard::adopt(&PortConfigSpace, function, sets);
        info!(
            "ALLY pci-interrupts guarded={} msi={} msix-hidden={} malformed-capabilities={}",
            function.function.address,
            function.capabilities.msi.is_some(),
            function.capabilities.msix.is_some(),
            function.capabilities.malformed
        );
        // Capacity: `found` has the same bound.
        let _ = guards.push(guard);
    }
    info!("ALLY pci-interrupts functions={}", guards.len());
    Ok(guards)
}

/// Identity EPT of guest-physical memory: RAM write-back, everything else uncached, Ally's
/// region absent. 2 MiB pages where a whole large page has one kind, 4 KiB pages elsewhere.
fn map_guest_physical(
    paging: &mut GuestPaging,
    frames: &mut FramePool,
    map: &MemoryMap,
    hidden: &[PhysRange],
    limit: u64,
) -> Result<(), StartError> {
    let is_hidden = |range: PhysRange| hidden.iter().any(|h| h.overlaps(&range));
    let is_ram = |range: PhysRange| {
        map.iter().any(|r| {
            matches!(
                r.kind,
                MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
            ) && r.range.start <= range.start
                && range.end <= r.range.end
        })
    };
    let touches_ram = |range: PhysRange| {
        map.iter().any(|r| {
            matches!(
                r.kind,
                MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
            ) && r.range.overlaps(&range)
        })
    };
    let mut map_one = |range: PhysRange, ram: bool, frames: &mut FramePool| {
        let memtype = if ram {
            EptMemoryType::WriteBack
        } else {
            EptMemoryType::Uncacheable
        };
        paging.map(
            GuestPhysAddr(range.start),
            HostPhysAddr(range.start),
            range.len(),
            true,
            memtype,
            frames,
        )
    };
    let mut addr = 0u64;
    while addr < limit {
        let large = PhysRange {
            start: addr,
            end: addr + LARGE_PAGE_SIZE,
        };
        let uniform = !is_hidden(large) && (is_ram(large) || !touches_ram(large));
        if uniform {
            map_one(large, is_ram(large), frames)?;
        } else {
            for page in (large.start..large.end).step_by(PAGE_SIZE as usize) {
                let small = PhysRange {
                    start: page,
                    end: page + PAGE_SIZE,
                };
                if !is_hidden(small) {
                    map_one(small, is_ram(small), frames)?;
                }
            }
        }
        addr = large.end;
    }
    Ok(())
}

/// The guards of the FADT's reset and sleep registers. Without ACPI Ally still runs (the
/// legacy reset ports are guarded, and no sleep register is known to the guest either); a
/// register outside I/O space stops Ally, since the guest could reach it unguarded.
fn power_guards(identity_limit: u64) -> Result<(ResetGuard, SleepGuard), StartError> {
    let memory = IdentityMemory {
        limit: identity_limit,
    };
    let control = acpi::find_rsdp(&memory)
        .and_then(|rsdp| acpi::find_table(&memory, &rsdp, b"FACP"))
        .and_then(|fadt| acpi::fadt_sleep_control(&memory, &fadt));
    let control = match control {
        Ok(control) => control,
        Err(e) => {
            log::warn!("no ACPI FADT ({e}): legacy reset ports guarded, no sleep registers");
            return Ok((ResetGuard::new(None, None), SleepGuard::default()));
        }
    };
    if let Some((name, block)) = control.unguardable() {
        return Err(StartError::UnguardablePowerRegister(name, block));
    }
    let types = control
        .dsdt
        .and_then(|pa| acpi::AcpiTable::load(&memory, pa, 36).ok())
        .filter(|t| &t.header.signature == b"DSDT")
        .map(|dsdt| acpi::dsdt_sleep_types(&memory, &dsdt))
        .unwrap_or_default();
    let ports = SleepPorts {
        pm1a_control: control.pm1a.and_then(acpi::RegisterBlock::io_port),
        pm1b_control: control.pm1b.and_then(acpi::RegisterBlock::io_port),
        pm1a_status: control.pm1a_status.and_then(acpi::RegisterBlock::io_port),
        pm1b_status: control.pm1b_status.and_then(acpi::RegisterBlock::io_port),
        sleep_control: control
            .sleep_control_reg
            .and_then(acpi::RegisterBlock::io_port),
        sleep_status: control
            .sleep_status_reg
            .and_then(acpi::RegisterBlock::io_port),
    };
    let acpi_reset = control.reset.and_then(|r| {
        r.block.io_port().map(|port| AcpiResetPort {
            port,
            value: r.value,
        })
    });
    info!(
        "ALLY power-guard sleep-ports={ports:x?} sleep-types={:?} s5={} reset-register={:x?}",
        types.0,
        if types.0[5].is_some() {
            "known"
        } else {
            "unknown (every sleep request refused)"
        },
        control.reset
    );
    let acpi_reset_config = control.reset.and_then(|r| match r.block {
        acpi::RegisterBlock::PciConfig {
            device,
            function,
            offset,
        } => Some(AcpiResetConfig {
            function: ally_hypervisor::cmdline::PciAddress {
                bus: 0,
                device,
                function,
            },
            offset,
            value: r.value,
        }),
        _ => None,
    });
    Ok((
        ResetGuard::new(acpi_reset, acpi_reset_config),
        SleepGuard::new(ports, types),
    ))
}

/// The word unused DPI memory holds ("ALLYALLY").
const POISON: u64 = 0x594C_4C41_594C_4C41;

/// Fills `range` with [`POISON`].
///
/// # Safety
/// The range must be identity-mapped, 8-byte aligned memory that nothing else uses.
unsafe fn poison(range: PhysRange) {
    for addr in (range.start..range.end).step_by(8) {
        // SAFETY: guaranteed by the caller.
        unsafe { (addr as *mut u64).write_volatile(POISON) };
    }
}

/// The machine's CPUs and their roles.
pub struct CpuPartition {
    pub boot_cpu: u32,
    /// Every enabled CPU's APIC ID, from the MADT.
    pub all: heapless::Vec<u32, 256>,
    /// The DPI cores: the highest `dpi_cores` APIC IDs (never the boot CPU).
    pub dpi: heapless::Vec<u32, 256>,
}

impl CpuPartition {
    /// The OS cores' APIC IDs: every CPU that is not a DPI core.
    pub fn os_cores(&self) -> heapless::Vec<u32, 256> {
        self.all
            .iter()
            .copied()
            .filter(|id| !self.dpi.contains(id))
            .collect()
    }
}

/// Reads the CPUs from the MADT, chooses the DPI cores and removes them from the MADT and
/// the MP table, so the guest neither sees nor starts them.
fn partition_cpus(identity_limit: u64, options: &AllyOptions) -> Result<CpuPartition, StartError> {
    let mut memory = IdentityMemory {
        limit: identity_limit,
    };
    let rsdp = acpi::find_rsdp(&memory).map_err(StartError::Acpi)?;
    let mut madt = acpi::find_table(&memory, &rsdp, b"APIC").map_err(StartError::Acpi)?;
    let processors = acpi::madt_processors(&memory, &madt).map_err(StartError::Acpi)?;
    let boot_cpu = LocalApic::current().id();
    let mut all: heapless::Vec<u32, 256> = processors
        .iter()
        .filter(|p| p.enabled)
        .map(|p| p.apic_id)
        .collect();
    all.sort_unstable();
    options
        .validate_against_cores(all.len() as u32)
        .map_err(StartError::Options)?;
    let dpi = choose_dpi_cpus(&all, boot_cpu, options.dpi_cores as usize)?;
    let removed = acpi::remove_madt_cpus(&mut memory, &mut madt, &dpi).map_err(StartError::Acpi)?;
    info!(
        "CPUs (APIC IDs) {:?}: DPI cores {:?}; {removed} MADT entries hidden",
        all.as_slice(),
        dpi.as_slice()
    );
    info!(
        "ALLY cpus total={} dpi={} os={}",
        all.len(),
        dpi.len(),
        all.len() - dpi.len()
    );
    match acpi::find_mp_table(&memory) {
        Ok(mut table) => match acpi::remove_mp_cpus(&mut memory, &mut table, &dpi) {
            Ok(n) => info!("{n} MP-table processor entries hidden"),
            Err(e) => return Err(StartError::Acpi(e)),
        },
        Err(acpi::AcpiError::NoMpTable) => info!("no MP table"),
        Err(e) => return Err(StartError::Acpi(e)),
    }
    Ok(CpuPartition { boot_cpu, all, dpi })
}

/// The DPI cores as whole physical cores (`ally_hypervisor::topology`), reported with the
/// machine's topology.
fn choose_dpi_cpus(
    all: &[u32],
    boot_cpu: u32,
    requested: usize,
) -> Result<heapless::Vec<u32, 256>, StartError> {
    use alloc::string::String;
    use ally_hypervisor::topology::{self, IdLayout, Topology};
    use core::fmt::Write;
    let layout = IdLayout::from_cpuid(|leaf, subleaf| {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    });
    let dpi = topology::choose_dpi_cpus(all, boot_cpu, requested, layout)
        .map_err(StartError::Topology)?;
    let t = Topology::of(all, layout);
    let mut dpi_cpus = String::new();
    for (i, id) in dpi.iter().enumerate() {
        let _ = write!(dpi_cpus, "{}{id}", if i > 0 { "," } else { "" });
    }
    let mut pairs = String::new();
    for &id in all {
        let mut core = topology::siblings(all, layout, id);
        if core.next() == Some(id) && topology::siblings(all, layout, id).count() > 1 {
            let _ = write!(pairs, "{}{id}", if pairs.is_empty() { "" } else { "," });
            for sibling in core {
                let _ = write!(pairs, "+{sibling}");
            }
        }
    }
    info!(
        "ALLY topology threads-per-core={} cores={} packages={} dpi-cpus={} siblings={}",
        t.threads_per_core,
        t.cores,
        t.packages,
        if dpi_cpus.is_empty() {
            "none"
        } else {
            &dpi_cpus
        },
        if pairs.is_empty() { "none" } else { &pairs }
    );
    if dpi.len() > requested {
        log::warn!(
            "ALLY dpi-cores requested={requested} taken={} reason=\"whole physical cores: the SMT siblings of a DPI core are DPI cores too, idle and hidden\"",
            dpi.len()
        );
    }
    Ok(dpi)
}

/// The I/O APICs' register pages, from the MADT (type 1 entries): every one, however many.
/// Each must have a page of its own (the guard is found by its page): one that does not
/// stops Ally rather than stay unguarded.
/// The MADT's I/O APICs: register base and APIC ID.
fn io_apics(identity_limit: u64) -> Result<alloc::vec::Vec<(u64, u8)>, StartError> {
    let memory = IdentityMemory {
        limit: identity_limit,
    };
    let rsdp = acpi::find_rsdp(&memory).map_err(StartError::Acpi)?;
    let madt = acpi::find_table(&memory, &rsdp, b"APIC").map_err(StartError::Acpi)?;
    let mut found = alloc::vec::Vec::new();
    for entry in acpi::madt_entries(&memory, &madt) {
        if let acpi::MadtEntry::IoApic { id, address, .. } = entry.map_err(StartError::Acpi)?.2 {
            let base = u64::from(address);
            if base % PAGE_SIZE != 0 || found.iter().any(|&(b, _)| b == base) {
                return Err(StartError::IoApicLayout { id, address });
            }
            found.push((base, id));
        }
    }
    Ok(found)
}

const AP_STACK_SIZE: usize = 64 * 1024;

/// A zeroed frame from Ally's pool.
fn frame(frames: &mut FramePool) -> Result<u64, StartError> {
    frames
        .allocate_zeroed()
        .map(|f| f.0)
        .ok_or(StartError::OutOfFrames)
}

/// A zeroed, 4 KiB-aligned heap block that lives for ever.
fn leak_zeroed(size: usize) -> Result<*mut u8, StartError> {
    let layout = Layout::from_size_align(size, 4096).map_err(|_| StartError::OutOfHeap)?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        Err(StartError::OutOfHeap)
    } else {
        Ok(ptr)
    }
}

/// Wakes every CPU but the boot CPU, one at a time: DPI cores enter the DPI loop, OS cores
/// (given their resources by `os_core`) wait for the guest's SIPI.
fn start_application_processors(
    cpus: &CpuPartition,
    stub: &realmode::RealModeStub,
    dpi_status: &'static DpiStatus,
    frames: &mut FramePool,
    os_core: &mut dyn FnMut(&mut FramePool) -> Result<OsCoreSetup, StartError>,
) -> Result<(), StartError> {
    // SAFETY: the trampoline page is Ally's (taken from conventional memory above) and
    // identity-mapped; Ally's page tables lie below 4 GiB in its region.
    unsafe {
        smp::install_trampoline(
            stub.trampoline_page,
            instructions::read_cr3(),
            cpus::ally_ap_entry as *const () as u64,
        )
    };
    let mut next_vpid = 2u16;
    let mut dpi_index = 0usize;
    for &apic_id in cpus.all.iter().filter(|&&id| id != cpus.boot_cpu) {
        // SAFETY: zeroed memory is a valid CpuTables (all fields are integers or arrays of
        // them); `load` fills it on the AP.
        let tables = unsafe { &mut *(leak_zeroed(size_of::<CpuTables>())? as *mut CpuTables) };
        let role = if cpus.dpi.contains(&apic_id) {
            dpi_index += 1;
            Role::DpiCore {
                index: dpi_index - 1,
                status: dpi_status,
            }
        } else {
            let mut setup = os_core(frames)?;
            if let OsCoreSetup::Vmx(vmx) = &mut setup {
                vmx.vpid = next_vpid;
                next_vpid += 1;
            }
            Role::OsCore(setup)
        };
        let launch = Box::leak(Box::new(ApLaunch {
            apic_id,
            role,
            tables,
        }));
        let stack_top = leak_zeroed(AP_STACK_SIZE)? as u64 + AP_STACK_SIZE as u64;
        // SAFETY: the trampoline is installed; `launch` is leaked and so lives for ever.
        unsafe {
            smp::start_ap(
                stub.trampoline_page,
                apic_id,
                stack_top,
                launch as *mut ApLaunch as u64,
            )
        }
        .map_err(|e| StartError::ApDidNotStart(e.apic_id))?;
    }
    Ok(())
}

static DPI_STATUS: spin::Once<&'static DpiStatus> = spin::Once::new();

/// The sum of the DPI cores' heartbeats.
fn dpi_heartbeat() -> u64 {
    DPI_STATUS
        .get()
        .map(|status| status.snapshot().map(|(_, _, beats, _)| beats).sum())
        .unwrap_or(0)
}

/// At the guest's power-off: the DPI cores' heartbeats and the NMIs Ally absorbed.
fn report_dpi_status() {
    if let Some(status) = DPI_STATUS.get() {
        for (index, apic_id, heartbeat, wakeups) in status.snapshot() {
            info!("ALLY dpi-core index={index} apic={apic_id} heartbeat={heartbeat} wakeups={wakeups}");
        }
    }
    crate::nic::report();
    crate::iommu::report();
    ally_hypervisor::iommu::interrupts::report();
    ally_hypervisor::guards::pci_config::report();
    if let Some(nic) = &platform::platform().nic {
        ally_hypervisor::guards::nic::report(nic);
    }
    info!(
        "ALLY root-nmis count={}",
        ally_hypervisor::arch::descriptors::NMI_COUNT.load(core::sync::atomic::Ordering::Relaxed)
    );
    info!(
        "ALLY root-stray-interrupts count={}",
        ally_hypervisor::arch::descriptors::STRAY_INTERRUPTS
            .load(core::sync::atomic::Ordering::Relaxed)
    );
}
