//! What the exit handlers need to know about the machine and Ally's place in it, set once by
//! the boot CPU before the guest starts.

use crate::addr::{GuestPhysAddr, PhysRange};
use crate::guest::{GuestMemError, GuestMemory};
use crate::int15::GuestBufferWriter;
use crate::memmap::{MemoryKind, MemoryMap};
use crate::realmode::RealModeStub;
use log::info;
use spin::Once;

/// Regions of Ally's memory whose contents must not change while the guest runs (the image
/// head and the poisoned, still unused DPI memory); checked at power-off to prove that the
/// guest's writes there were discarded.
#[derive(Debug, Clone, Copy)]
pub struct Canary {
    pub ranges: [PhysRange; 2],
    pub checksum: u64,
}

impl Canary {
    /// Records the current contents of `ranges`.
    ///
    /// # Safety
    /// The ranges must be identity-mapped, readable and 8-byte aligned.
    pub unsafe fn new(ranges: [PhysRange; 2]) -> Self {
        // SAFETY: guaranteed by the caller.
        let checksum = unsafe { checksum(&ranges) };
        Self { ranges, checksum }
    }

    /// Whether the ranges still hold what they held at start-up.
    pub fn intact(&self) -> bool {
        // SAFETY: `new`'s caller guaranteed the ranges are Ally's identity-mapped memory.
        unsafe { checksum(&self.ranges) == self.checksum }
    }
}

/// Machine facts for the exit handlers.
pub struct Platform {
    /// The memory map the guest is shown (INT 15h E820/E801/88h).
    pub guest_map: MemoryMap,
    /// Physical ranges the guest must never reach, all absent from the EPT: Ally's region
    /// first, then the MMCONFIG windows.
    pub hidden: heapless::Vec<PhysRange, 8>,
    /// Ally's identity map covers `[0, identity_limit)`.
    pub identity_limit: u64,
    pub realmode: RealModeStub,
    /// The guest's reset requests (8042, ports 0x92 and 0xCF9, the FADT's RESET_REG).
    pub resets: crate::reset::ResetGuard,
    /// The guest's ACPI sleep requests: S5 powers off, S1-S4 are refused.
    pub sleep: crate::sleep::SleepGuard,
    pub canary: Canary,
    /// The CPU that boots the guest (again, after the guest resets).
    pub boot_cpu: u32,
    /// APIC IDs of the OS cores and of the DPI cores.
    pub os_cores: heapless::Vec<u32, 256>,
    pub dpi_cores: heapless::Vec<u32, 256>,
    /// Physical address of the local APIC page (read-only in the EPT/NPT: writes are
    /// filtered, reads reach the guest's own APIC).
    pub apic_base: u64,
    /// Called at the guest's power-off, after the exit counts (the DPI partition's report).
    pub power_off_hook: fn(),
    /// Called after each `ALLY mark` line with its id (the DPI partition's counters snapshot).
    pub mark_hook: fn(u8),
    /// The DPI cores' summed heartbeat (for reports that show the cores kept running).
    pub dpi_heartbeat: fn() -> u64,
    /// The NIC whose queues the DPI partition shadows, if one was claimed.
    pub nic: Option<crate::guards::nic::NicTrap>,
    /// Every I/O APIC of the MADT (absent from the EPT: redirection entries are filtered),
    /// as many as the machine has.
    pub ioapics: &'static [crate::guards::ioapic::IoApicGuard],
    /// Every PCI function with MSI or MSI-X: its message registers are filtered.
    pub pci_interrupts: heapless::Vec<crate::pci::msi::InterruptGuard, MAX_INTERRUPT_FUNCTIONS>,
}

/// Most MSI/MSI-X-capable PCI functions Ally guards (more stops Ally before the guest runs:
/// an unguarded one could aim its messages at a DPI core).
pub const MAX_INTERRUPT_FUNCTIONS: usize = 64;

static PLATFORM: Once<Platform> = Once::new();

/// Bumped after every change to the shared EPT that removes or redirects a mapping (a BAR
/// move). The CPU that makes the change invalidates at once; every other OS core does on its
/// next VM exit. Until then it may still reach the old window through a cached translation:
/// the device's untrapped registers, which the guest owns anyway — never a trapped page,
/// since trapped pages are never present and not-present entries are not cached (SDM 29.4.1).
pub static EPT_GENERATION: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Publishes the platform description (once, before the first VM entry).
pub fn install(platform: Platform) -> &'static Platform {
    PLATFORM.call_once(|| platform)
}

/// The platform description.
///
/// # Panics
/// If called before [`install`] — a broken start-up order, not a guest action.
pub fn platform() -> &'static Platform {
    PLATFORM
        .get()
        .expect("platform described before the first VM entry")
}

impl Platform {
    /// The OS and DPI cores, for the interrupt filters.
    pub fn cpu_sets(&self) -> crate::ipi::CpuSets<'_> {
        crate::ipi::CpuSets {
            os_cores: &self.os_cores,
            dpi_cores: &self.dpi_cores,
        }
    }

    /// Whether the guest may place a device's registers at `[start, start + len)`: inside
    /// the EPT's identity range, clear of every range its memory map lists (RAM, ACPI, the
    /// firmware), of the first MiB, of Ally's memory and of the local APIC page.
    pub fn device_range_allowed(&self, start: u64, len: u64) -> Result<(), &'static str> {
        let range = PhysRange::from_start_len(start, len).ok_or("the range wraps")?;
        if range.end > self.identity_limit {
            return Err("beyond the memory Ally maps for the guest");
        }
        if range.start < 0x10_0000 {
            return Err("in the first MiB");
        }
        if self.guest_map.iter().any(|r| r.range.overlaps(&range)) {
            return Err("overlaps a range of the guest's memory map");
        }
        if self.hidden.iter().any(|h| h.overlaps(&range)) {
            return Err("overlaps Ally's memory");
        }
        let apic = PhysRange::from_start_len(self.apic_base, 0x1000).ok_or("APIC")?;
        if apic.overlaps(&range) {
            return Err("overlaps the local APIC");
        }
        Ok(())
    }

    /// Whether Ally may touch `[start, start + len)` on the guest's behalf (page walks,
    /// instruction fetch, the INT 15h buffer): the guest's RAM as its map shows it, plus the
    /// first MiB (IVT, BDA, BIOS code), never Ally's ranges and never device memory above
    /// 1 MiB, whose registers may change state when read.
    fn reachable(&self, start: u64, len: usize) -> bool {
        let Some(range) = PhysRange::from_start_len(start, len as u64) else {
            return false;
        };
        if range.end > self.identity_limit || self.hidden.iter().any(|h| h.overlaps(&range)) {
            return false;
        }
        range.end <= 0x10_0000
            || self.guest_map.iter().any(|r| {
                matches!(
                    r.kind,
                    MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
                ) && r.range.start <= range.start
                    && range.end <= r.range.end
            })
    }
}

/// FNV-1a over 64-bit words of physical ranges: cheap, and enough to detect a change.
///
/// # Safety
/// The ranges must be identity-mapped, readable and 8-byte aligned.
unsafe fn checksum(ranges: &[PhysRange]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for range in ranges {
        for addr in (range.start..range.end).step_by(8) {
            // SAFETY: guaranteed by the caller.
            let word = unsafe { (addr as *const u64).read_volatile() };
            hash = (hash ^ word).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

/// Guest-physical memory through Ally's identity map, refusing Ally's hidden ranges.
pub struct PhysicalMemory;

impl GuestMemory for PhysicalMemory {
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        if !platform().reachable(gpa.0, buf.len()) {
            return Err(GuestMemError::NotGuestRam {
                gpa,
                len: buf.len(),
            });
        }
        let aligned = gpa.0.is_multiple_of(buf.len() as u64);
        // An aligned load of 2, 4 or 8 bytes is one access, as the guest's own would be
        // (SDM Vol. 3A 9.1.1), so a value another CPU is storing never tears.
        let addr = gpa.0 as usize;
        match buf.len() {
            2 if aligned => {
                // SAFETY: the range is identity-mapped (below `identity_limit`), is not Ally's,
                // and the value is aligned to its width.
                let value = unsafe { read_aligned::<u16>(addr) };
                buf.copy_from_slice(&value.to_le_bytes());
            }
            4 if aligned => {
                // SAFETY: as for the u16.
                let value = unsafe { read_aligned::<u32>(addr) };
                buf.copy_from_slice(&value.to_le_bytes());
            }
            8 if aligned => {
                // SAFETY: as for the u16.
                let value = unsafe { read_aligned::<u64>(addr) };
                buf.copy_from_slice(&value.to_le_bytes());
            }
            // SAFETY: the range is identity-mapped and is not Ally's.
            _ => unsafe {
                core::ptr::copy_nonoverlapping(gpa.0 as *const u8, buf.as_mut_ptr(), buf.len())
            },
        }
        Ok(())
    }

    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        if !platform().reachable(gpa.0, buf.len()) {
            return Err(GuestMemError::NotGuestRam {
                gpa,
                len: buf.len(),
            });
        }
        // SAFETY: as for `read`; the guest could write this memory itself.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), gpa.0 as *mut u8, buf.len()) };
        Ok(())
    }
}

/// One volatile load of a `T` at `addr`.
///
/// # Safety
/// `addr` must be identity-mapped, readable and aligned for `T`.
unsafe fn read_aligned<T: Copy>(addr: usize) -> T {
    // SAFETY: the caller's contract.
    unsafe { (addr as *const T).read_volatile() }
}

/// The INT 15h writer: only usable guest RAM may receive the E820 buffer.
pub struct Int15Buffer<'a> {
    pub map: &'a MemoryMap,
}

impl GuestBufferWriter for Int15Buffer<'_> {
    fn write(&mut self, gpa: GuestPhysAddr, bytes: &[u8]) -> bool {
        let Some(range) = PhysRange::from_start_len(gpa.0, bytes.len() as u64) else {
            return false;
        };
        // Below 1 MiB the BIOS scratch areas are fine too; above it only the map's RAM.
        if range.end > 0x10_0000 && !self.map.is_usable_ram(range) {
            return false;
        }
        PhysicalMemory.write(gpa, bytes).is_ok()
    }
}

/// Printed when the guest powers off: the canary check and the exit counts of every vCPU.
pub fn report_power_off() {
    let canary = platform().canary;
    info!(
        "ALLY canary status={} ranges={},{}",
        if canary.intact() { "intact" } else { "damaged" },
        canary.ranges[0],
        canary.ranges[1]
    );
    crate::vcpu::registry::report_all_exits();
    crate::vcpu::policy::report_msrs();
    crate::vcpu::policy::report_port_exits();
    info!(
        "ALLY power-guard sleep-refused={}",
        platform().sleep.refused()
    );
    crate::guards::apic::report();
    (platform().power_off_hook)();
    crate::log_limit::report();
    info!("ALLY poweroff");
}

/// All physical memory through Ally's identity map, for Ally's own start-up work (ACPI
/// tables, the IVT and BDA) before any guest runs.
pub struct IdentityMemory {
    /// The identity map covers `[0, limit)`.
    pub limit: u64,
}

impl crate::acpi::PhysMemory for IdentityMemory {
    fn read(&self, pa: u64, buf: &mut [u8]) {
        if pa
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.limit)
        {
            // SAFETY: the range is identity-mapped (below `limit`).
            unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, buf.as_mut_ptr(), buf.len()) };
        } else {
            buf.fill(0xFF);
        }
    }

    fn write(&mut self, pa: u64, buf: &[u8]) {
        if pa
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.limit)
        {
            // SAFETY: the range is identity-mapped; Ally writes firmware tables only before
            // the guest starts.
            unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), pa as *mut u8, buf.len()) };
        }
    }
}
