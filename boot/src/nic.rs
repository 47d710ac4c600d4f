//! Claiming the NIC and wiring its queue work to the DPI core (the bare-metal glue of issue 4).
//!
//! Start-up, on the boot CPU, before the guest runs:
//! 1. find the 82540EM on the PCI bus (or the function `nic=` names), size its BARs;
//! 2. set up the DPI queue engine in DPI memory, which programs the real rings (the guest's
//!    ring registers only ever reach the shadow file);
//! 3. hand the exit handlers a [`NicTrap`]: the trapped BAR0 pages leave the EPT, the I/O BAR
//!    and the configuration ports go into the I/O bitmap.
//!
//! Afterwards the first DPI core calls [`DpiWork::poll`] in its loop.

use crate::frames::FramePool;
use crate::start::StartError;
use alloc::boxed::Box;
use ally_dpi::engine::{DefragStats, EngineHook, EngineStats, MgmtWriter, StreamStats, Timestamp};
use ally_dpi::nic::dpi::{Counters, DpiConfig, DpiNic, DropReason, Mode};
use ally_dpi::nic::guard::{exits, EXITING_PAGES};
use ally_dpi::nic::mem::{DmaMemory, DmaWindow, MemError, MemoryPolicy};
use ally_dpi::nic::regs::{NicRegisters, Reg};
use ally_dpi::nic::shadow::ShadowRegs;
use ally_dpi::nic::trap::TrappedNic;
use ally_dpi::nic::{Direction, HookVerdict, PacketHook};
use ally_hypervisor::addr::{GuestPhysAddr, HostPhysAddr, PhysRange, PAGE_SIZE};
use ally_hypervisor::arch::instructions;
use ally_hypervisor::arch::logger::{self, AlertChannel};
use ally_hypervisor::arch::pci_ports::PortConfigSpace;
use ally_hypervisor::cmdline::{AllyOptions, PacketMode};
use ally_hypervisor::guards::nic::NicTrap;
use ally_hypervisor::memmap::{MemoryKind, MemoryMap};
use ally_hypervisor::paging::{EptMemoryType, GuestPaging};
use ally_hypervisor::pci::{self, Bar, ConfigSpace, GuardedFunction};
use ally_hypervisor::platform::EPT_GENERATION;
use core::sync::atomic::Ordering;
use log::info;

/// Devices Ally drives (vendor, device): the 82540EM that QEMU and Bochs emulate. Further
/// models (82574, igb) add their IDs here with their own register maps.
const SUPPORTED: &[(u16, u16)] = &[(0x8086, 0x100E)];

/// The device's registers through BAR0 (identity-mapped, uncached by the MTRRs).
pub struct MmioRegisters {
    base: u64,
}

impl NicRegisters for MmioRegisters {
    fn read32(&self, reg: Reg) -> u32 {
        // SAFETY: `base` is the claimed function's BAR0 (128 KiB), identity-mapped, and every
        // `Reg` is an aligned dword offset inside it.
        unsafe { ((self.base + u64::from(reg.0 & 0x1_FFFC)) as *const u32).read_volatile() }
    }
    fn write32(&self, reg: Reg, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { ((self.base + u64::from(reg.0 & 0x1_FFFC)) as *mut u32).write_volatile(value) }
    }
}

/// Physical memory as the DPI core reaches it: Ally's identity map. Guest addresses reach
/// here only after `MemoryPolicy::check`; this layer refuses anything outside the map.
pub struct IdentityDma {
    limit: u64,
}

impl IdentityDma {
    fn pointer(&self, pa: HostPhysAddr, len: usize) -> Result<*mut u8, MemError> {
        let start = pa.as_u64();
        match start.checked_add(len as u64) {
            Some(end) if end <= self.limit && start != 0 => Ok(start as *mut u8),
            _ => Err(MemError::DmaOutOfBounds {
                addr: start,
                len: len as u64,
            }),
        }
    }
}

impl DmaMemory for IdentityDma {
    fn read(&self, pa: HostPhysAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let src = self.pointer(pa, buf.len())?;
        // SAFETY: the range is identity-mapped RAM (bounds checked); `buf` is Ally's own.
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write(&self, pa: HostPhysAddr, data: &[u8]) -> Result<(), MemError> {
        let dst = self.pointer(pa, data.len())?;
        // SAFETY: as for `read`; `data` may lie in DPI memory too, so `copy` (overlap-safe).
        unsafe { core::ptr::copy(data.as_ptr(), dst, data.len()) };
        Ok(())
    }
    fn borrow(&self, pa: HostPhysAddr, len: usize) -> Result<&[u8], MemError> {
        let p = self.pointer(pa, len)?;
        // SAFETY: identity-mapped for Ally's lifetime; the ring protocol gives the caller the
        // range for as long as it borrows it.
        Ok(unsafe { core::slice::from_raw_parts(p, len) })
    }
    fn window(&self, pa: HostPhysAddr, len: usize) -> Result<DmaWindow<'_>, MemError> {
        let p = self.pointer(pa, len)?;
        // SAFETY: identity-mapped for Ally's lifetime (bounds checked).
        Ok(unsafe { DmaWindow::new(p, len) })
    }
}

/// The rule engine with its alert channel and clock. The channel is a ring in Ally's memory
/// that the DPI core pumps to COM2 when idle (`logger::pump_alerts`): an alert never makes it
/// wait for the UART, and one that finds the ring full is lost and counted (fail-open for
/// alerts only; verdicts do not depend on it).
type RuleEngine = EngineHook<MgmtWriter<AlertChannel>, fn() -> Timestamp>;

/// What inspects each frame: the rule engine (issue 5), which passes every frame when no
/// rules were loaded.
pub struct Inspector(Box<RuleEngine>);

impl PacketHook for Inspector {
    #[inline]
    fn inspect(&mut self, frame: &[u8], dir: Direction) -> HookVerdict {
        self.0.inspect(frame, dir)
    }

    fn take_forward(&mut self, dir: Direction) -> Option<alloc::vec::Vec<u8>> {
        self.0.take_forward(dir)
    }

    #[inline]
    fn has_forward(&self) -> bool {
        self.0.has_forward()
    }
}

fn clock() -> Timestamp {
    Timestamp(crate::clock::now_us())
}

type Engine = DpiNic<'static, IdentityDma, MmioRegisters, Inspector>;

/// The DPI core's share: the queue engine, created on the boot CPU and used by the first DPI
/// core alone afterwards.
pub struct DpiWork {
    engine: Engine,
    polls_since_publish: u32,
}

// SAFETY: the engine (raw DMA windows onto DPI memory and guest rings) is built on the boot
// CPU before any AP runs and then used by exactly one DPI core; nothing else touches it.
unsafe impl Send for DpiWork {}

/// What the claimed NIC leaves for the rest of start-up.
pub struct ClaimedNic {
    pub trap: NicTrap,
    pub work: DpiWork,
    /// BAR0 pages to remove from the EPT (trapped and refused ones).
    pub trapped_pages: [u64; EXITING_PAGES.len()],
    /// Ports to intercept: the I/O BAR (the configuration ports always are).
    pub ports: heapless::Vec<core::ops::Range<u32>, 1>,
}

/// The queue engine, waiting for the first DPI core to take it.
pub static DPI_WORK: spin::Mutex<Option<DpiWork>> = spin::Mutex::new(None);

/// The EPT or NPT and the frames to extend it, handed over by the boot CPU before the guest
/// starts, for the BAR moves the guest makes.
static PAGING_EDITOR: spin::Mutex<Option<(GuestPaging, FramePool)>> = spin::Mutex::new(None);
/// Where the device decodes BAR0 (it never moves).
static DEVICE_BAR: spin::Once<u64> = spin::Once::new();

/// Hands the EPT/NPT and the frame pool over for later edits (after the last start-up use).
pub fn hand_over_paging(paging: GuestPaging, frames: FramePool) {
    *PAGING_EDITOR.lock() = Some((paging, frames));
}

/// Moves the guest's window onto BAR0 from `from` to `to` (both already checked by the exit
/// handler): the old window leaves the EPT, the new one maps the device's passthrough pages
/// (uncached) and leaves the trapped and refused ones absent.
fn remap_registers_bar(from: u64, to: u64) -> Result<(), &'static str> {
    let device = *DEVICE_BAR.get().ok_or("no NIC claimed")?;
    let mut editor = PAGING_EDITOR.lock();
    let (paging, frames) = editor.as_mut().ok_or("the EPT is not editable yet")?;
    for offset in (0..u64::from(Reg::BAR0_SIZE)).step_by(PAGE_SIZE as usize) {
        // Pages that were never mapped (the trapped ones) are fine to skip.
        let _ = paging.unmap_page(GuestPhysAddr(from + offset), frames);
    }
    for offset in (0..u64::from(Reg::BAR0_SIZE)).step_by(PAGE_SIZE as usize) {
        if exits(offset as u32) {
            let _ = paging.unmap_page(GuestPhysAddr(to + offset), frames);
        } else {
            paging
                .map(
                    GuestPhysAddr(to + offset),
                    HostPhysAddr(device + offset),
                    PAGE_SIZE,
                    false,
                    EptMemoryType::Uncacheable,
                    frames,
                )
                .map_err(|_| "Ally's frame pool cannot hold the new EPT entries")?;
        }
    }
    EPT_GENERATION.fetch_add(1, Ordering::AcqRel);
    // Under SVM every vCPU, this one included, flushes before its next VMRUN.
    if let GuestPaging::Ept(_) = paging {
        // SAFETY: in VMX root on an OS core (the exit handler); INVEPT support was checked.
        unsafe { instructions::invept_all() };
    }
    Ok(())
}

/// Counters the DPI core publishes for the power-off report.
static PUBLISHED: spin::Mutex<Option<Counters>> = spin::Mutex::new(None);

/// The rule engine's counters, published with the NIC's.
#[derive(Clone, Copy, Default)]
struct EngineCounters {
    engine: EngineStats,
    stream: StreamStats,
    defrag: DefragStats,
}
static PUBLISHED_ENGINE: spin::Mutex<Option<EngineCounters>> = spin::Mutex::new(None);
/// Set by the power-off report: the DPI core's next poll publishes at once (its periodic
/// publication trails by up to 64 polls, which at the idle timer's pace is frames the wire
/// already carried) and then bumps `PUBLICATIONS`.
static PUBLISH_NOW: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static PUBLICATIONS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// How long the report waits for that publication before reporting what it has (and saying so).
const FINAL_PUBLISH_WAIT_US: u64 = 200_000;
static TRAPPED: spin::Once<&'static TrappedNic<'static, &'static MmioRegisters>> =
    spin::Once::new();

/// Fails closed on a network Ally would not inspect (issue 11 item 9): rules given but no NIC
/// claimed, or any other network controller (PCI base class 0x02) on the bus, which the guest
/// could drive around Ally. `uninspected_network=allow` boots anyway, and says so.
pub fn refuse_uninspected_network(
    options: &AllyOptions,
    rules_given: bool,
    claimed: Option<ally_hypervisor::cmdline::PciAddress>,
) -> Result<(), StartError> {
    let cs = PortConfigSpace;
    const CLASS_NETWORK: u32 = 0x02;
    let other = pci::functions(&cs)
        .find(|f| Some(f.address) != claimed && cs.read32(f.address, 0x08) >> 24 == CLASS_NETWORK);
    let refusal = match (other, claimed) {
        (Some(function), _) => Some(StartError::UninspectedNetwork { function }),
        (None, None) if rules_given => Some(StartError::NoNicToInspect),
        _ => None,
    };
    match refusal {
        Some(e) if options.allow_uninspected_network => {
            log::warn!("ALLY uninspected-network allowed (uninspected_network=allow): {e}");
            Ok(())
        }
        Some(e) => Err(e),
        None => {
            info!("ALLY network-check inspected-nic={claimed:?} other-network-controllers=0");
            Ok(())
        }
    }
}

/// Finds and claims the NIC. `Ok(None)` when there is none and `nic=` did not ask for one.
pub fn claim(
    options: &AllyOptions,
    guest_map: &MemoryMap,
    protected: PhysRange,
    dpi_region: PhysRange,
    identity_limit: u64,
) -> Result<Option<ClaimedNic>, StartError> {
    let cs = PortConfigSpace;
    let found = match pci::find_function(&cs, SUPPORTED, options.nic) {
        Ok(found) => found,
        Err(pci::PciError::NotFound) => {
            info!("ALLY nic none: no supported NIC found, no queue to shadow");
            return Ok(None);
        }
        Err(e) => return Err(StartError::Nic(e)),
    };
    let address = found.address;
    let bars = pci::probe_bars(&cs, address);
    let original = core::array::from_fn(|i| cs.read32(address, pci::REG_BAR0 + 4 * i as u8));
    let command = cs.read32(address, pci::REG_COMMAND) as u16;
    let registers_bar = match bars[0] {
        Bar::Memory { base, size, .. } if size >= u64::from(Reg::BAR0_SIZE) && base != 0 => {
            PhysRange {
                start: base,
                end: base + u64::from(Reg::BAR0_SIZE),
            }
        }
        bar => {
            return Err(StartError::Nic(pci::PciError::NoRegisterBar {
                address,
                bar,
                expected: u64::from(Reg::BAR0_SIZE),
            }))
        }
    };
    let io_ports = bars.iter().find_map(|bar| match *bar {
        Bar::Io { base, size } if base != 0 => Some(base..base + size),
        _ => None,
    });
    // Decoding and bus mastering on: the DPI core drives the device from now on.
    cs.write32(
        address,
        pci::REG_COMMAND,
        u32::from(GuardedFunction::device_command(command)),
    );
    info!(
        "ALLY nic claimed={address} id={:04x}:{:04x} bar0={:#x} io={:?} mode={:?}",
        found.vendor, found.device, registers_bar.start, io_ports, options.mode
    );

    let shadow: &'static ShadowRegs = Box::leak(Box::new(ShadowRegs::new()));
    shadow.set_irq_interval(options.irq_moderation);
    info!(
        "ALLY nic-moderation cycles={} us={}",
        options.irq_moderation,
        options.irq_moderation / crate::clock::tsc_per_us().max(1)
    );
    let real: &'static MmioRegisters = Box::leak(Box::new(MmioRegisters {
        base: registers_bar.start,
    }));
    let dma: &'static IdentityDma = Box::leak(Box::new(IdentityDma {
        limit: identity_limit,
    }));
    let ram: heapless::Vec<PhysRange, 32> = guest_map
        .iter()
        .filter(|r| r.kind == MemoryKind::Usable)
        .map(|r| r.range)
        .collect();
    let policy = MemoryPolicy::new(&ram, &[protected]).map_err(StartError::NicMemory)?;
    let config = dpi_config(options);
    let alerts = logger::alert_channel().ok_or(StartError::AlertChannelTaken)?;
    let hook = crate::rules::take_engine_hook(MgmtWriter::new(alerts), clock as fn() -> Timestamp)
        .ok_or(StartError::NoRuleEngine)?;
    let engine = DpiNic::new(
        shadow,
        dma,
        real,
        policy,
        dpi_region,
        config,
        Inspector(Box::new(hook)),
    )
    .map_err(StartError::NicEngine)?;
    let trapped: &'static TrappedNic<'static, &'static MmioRegisters> = Box::leak(Box::new(
        TrappedNic::new(shadow, real).with_waker(wake_dpi_core),
    ));
    TRAPPED.call_once(|| trapped);
    DEVICE_BAR.call_once(|| registers_bar.start);

    let mut guarded = GuardedFunction::new(address, bars, original, command);
    if let Some(pm) = pci::msi::walk_capabilities(&cs, address).pm {
        guarded = guarded.with_power_management(pm, cs.read32(address, pm));
    }
    let mut ports = heapless::Vec::new();
    if let Some(io) = &io_ports {
        let _ = ports.push(u32::from(io.start)..u32::from(io.end));
    }
    Ok(Some(ClaimedNic {
        trap: NicTrap::new(
            guarded,
            registers_bar,
            io_ports,
            trapped,
            remap_registers_bar,
        ),
        work: DpiWork {
            engine,
            polls_since_publish: 0,
        },
        trapped_pages: EXITING_PAGES.map(|page| registers_bar.start + u64::from(page)),
        ports,
    }))
}

/// Bytes of DPI memory the queue engine needs (4 KiB multiple).
pub fn region_bytes(options: &AllyOptions) -> u64 {
    dpi_config(options).region_bytes().div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// The queue engine's sizing for the operator's options.
fn dpi_config(options: &AllyOptions) -> DpiConfig {
    DpiConfig {
        mode: match options.mode {
            PacketMode::Copy => Mode::Copy,
            PacketMode::ZeroCopy => Mode::ZeroCopy,
        },
        ..DpiConfig::default()
    }
}

/// The APIC ID of the DPI core serving the NIC (set when it takes the work).
static SERVING_CORE: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// The OS core's exit handler, after a tail write, when the serving DPI core is halted: a
/// fixed IPI on the vector of the core's timer, whose handler only counts and acknowledges it.
fn wake_dpi_core() {
    ally_hypervisor::arch::apic::LocalApic::current().send_fixed_preserving_guest(
        SERVING_CORE.load(Ordering::Relaxed),
        ally_hypervisor::arch::descriptors::TIMER_VECTOR,
    );
}

impl DpiWork {
    /// Called by the DPI core that takes the work: tail writes wake this core when it halts.
    pub fn serve_on(&self, apic_id: u32) {
        SERVING_CORE.store(apic_id, Ordering::Relaxed);
    }

    /// Whether the core halts (then tail writes send it an interrupt) or not. Set before the
    /// last doorbell check ahead of HLT: see `TrappedNic::guest_write`.
    pub fn set_halted(&self, halted: bool) {
        if let Some(trapped) = TRAPPED.get() {
            trapped.shadow.dpi_halted.store(halted, Ordering::SeqCst);
            core::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// The line an idle DPI core monitors, and whether work arrived meanwhile.
    pub fn wake_line(&self) -> *const u8 {
        self.engine.wake_line()
    }
    pub fn doorbell_pending(&self) -> bool {
        self.engine.doorbell_pending()
    }

    /// The core waited (MWAIT or HLT): the next poll's doorbells are idle wake-ups.
    pub fn note_woken(&mut self) {
        self.engine.note_woken();
    }

    /// One pass of the queue engine; returns the frames moved.
    pub fn poll(&mut self) -> u64 {
        let moved = self.engine.poll();
        // Publishing clones the counters: every 64 polls, busy or idle, not per busy poll.
        self.polls_since_publish += 1;
        let requested = PUBLISH_NOW.load(Ordering::Acquire);
        if self.polls_since_publish >= 64 || requested {
            if let Some(mut published) = PUBLISHED_ENGINE.try_lock() {
                let e = &self.engine.hook_mut().0.engine;
                *published = Some(EngineCounters {
                    engine: e.stats(),
                    stream: e.stream_stats(),
                    defrag: e.defrag_stats(),
                });
            }
            if let Some(mut published) = PUBLISHED.try_lock() {
                self.engine.sample_device_statistics();
                // The device's missed-frame count costs a register read (under TCG, a trip
                // through QEMU's device model under its big lock): only for the publications
                // someone waits for (marks, power-off), not the periodic ones.
                if requested {
                    self.engine.sample_missed_frames();
                }
                *published = Some(self.engine.counters().clone());
                self.polls_since_publish = 0;
                if requested {
                    PUBLISH_NOW.store(false, Ordering::Release);
                    PUBLICATIONS.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        moved
    }
}

/// Stops the NIC's receiver, then asks for a fresh publication: whether it came.
fn request_final_publication() -> bool {
    let Some(trapped) = TRAPPED.get() else {
        return true;
    };
    // The guest is powering off: stop the receiver first (SDM 13.4.22 RCTL.EN), so the
    // counts below are final. A frame the wire still carries now stays on the wire.
    let rctl = trapped.real.read32(Reg::RCTL);
    trapped
        .real
        .write32(Reg::RCTL, rctl & !ally_dpi::nic::regs::rctl::EN);
    request_publication()
}

/// Asks the serving DPI core for a publication after one more poll (which also harvests
/// frames the NIC delivered since its last one) and waits for it, bounded: whether it came.
fn request_publication() -> bool {
    if TRAPPED.get().is_none() {
        return true;
    }
    let before = PUBLICATIONS.load(Ordering::Acquire);
    PUBLISH_NOW.store(true, Ordering::Release);
    // The DPI core's timer wakes it within one period; the IPI only shortens the wait.
    wake_dpi_core();
    let deadline = crate::clock::now_us() + FINAL_PUBLISH_WAIT_US;
    while PUBLICATIONS.load(Ordering::Acquire) == before {
        if crate::clock::now_us() >= deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// `ALLY nic-mark`: the NIC's counters at an `ALLY mark` (the guest asks around a transfer),
/// so that exits per wire frame can be computed for that transfer alone. The DPI core is
/// asked for a fresh publication first (`fresh=0` when it did not come in time, and the
/// counters then trail by up to 64 polls). The doorbell latencies' running sample counts and
/// TSC totals (all doorbells, and those that found the core idle), and the idle ones'
/// running histogram, let the runner compare them between two marks (e.g. idle against an
/// alert storm).
pub fn mark(id: u8) {
    let alerts = logger::ALERT_RING.stats();
    info!(
        "ALLY alerts-mark id={id} written={} lost={} ring-bytes={} peak={}",
        alerts.written, alerts.lost, alerts.capacity, alerts.peak
    );
    let Some(trapped) = TRAPPED.get() else {
        return;
    };
    let fresh = request_publication();
    let counters = PUBLISHED.lock().clone().unwrap_or_default();
    let mut registers = alloc::string::String::new();
    let _ = ally_hypervisor::exit::write_register_counts(&mut registers, trapped.exits.nonzero());
    info!(
        "ALLY nic-mark id={id} exits={} fused={} forwarded={} tx-packets={} rx-packets={} tx-wire={} rx-wire={} irqs-raised={} irq-doorbells={} wake-samples={} wake-tsc={} idle-wake-samples={} idle-wake-tsc={} idle-wake-hist={} tsc-per-us={} fresh={} registers={registers}",
        trapped.exits.total(),
        trapped.exits.fused.load(Ordering::Relaxed),
        trapped.exits.forwarded(),
        counters.tx.packets,
        counters.rx.packets,
        counters.tx.wire_frames,
        counters.rx.wire_frames,
        counters.irqs_raised,
        trapped.shadow.irq_doorbells.load(Ordering::Relaxed),
        counters.wake_latency.samples(),
        counters.wake_latency.total(),
        counters.idle_wake_latency.samples(),
        counters.idle_wake_latency.total(),
        counters.idle_wake_latency.histogram(),
        crate::clock::tsc_per_us(),
        u8::from(fresh)
    );
}

/// The NIC's counters at the guest's power-off: the alert records still in the ring first
/// (waiting for the UART is fine here) and the ring's counters, then frames, bytes and drops
/// by direction and reason, exits by register, and exits per frame.
pub fn report() {
    let fresh = request_final_publication();
    let alerts = logger::flush_alerts();
    info!(
        "ALLY alerts written={} lost={} ring-bytes={} peak={}",
        alerts.written, alerts.lost, alerts.capacity, alerts.peak
    );
    let Some(trapped) = TRAPPED.get() else {
        return;
    };
    let counters = PUBLISHED.lock().clone().unwrap_or_default();
    if !fresh {
        log::warn!(
            "ALLY nic-report stale=1 reason=\"the DPI core did not publish within {FINAL_PUBLISH_WAIT_US} us\""
        );
    }
    for (name, dir) in [("tx", &counters.tx), ("rx", &counters.rx)] {
        info!(
            "ALLY nic-{name} packets={} bytes={} dropped={} doorbells={} backpressure={} wire-frames={}",
            dir.packets,
            dir.bytes,
            dir.total_dropped(),
            dir.doorbells,
            dir.backpressure,
            dir.wire_frames
        );
        if dir.held + dir.released + dir.released_refused > 0 {
            info!(
                "ALLY nic-{name}-hold held={} released={} released-refused={}",
                dir.held, dir.released, dir.released_refused
            );
        }
        for reason in DropReason::ALL {
            let (dropped, stopped) = (dir.dropped(reason), dir.stopped(reason));
            if dropped + stopped > 0 {
                info!(
                    "ALLY nic-{name}-drop reason={} packets={dropped} ring-stops={stopped}",
                    reason.name()
                );
            }
        }
    }
    // Frames the device missed for lack of a free descriptor in Ally's receive ring: the wire
    // carried them, no ring did (with `nic-rx wire-frames` they account for the wire).
    info!(
        "ALLY nic-rx-missed frames={} register=MPC",
        counters.rx_missed
    );
    if let Some((len, fingerprint)) = counters.last_rx_frame {
        info!("ALLY nic-rx-last len={len} fnv60={fingerprint:#018x}");
    }
    info!(
        "ALLY nic-events config-changes={} resets={} irqs-raised={} irq-doorbells={} irqs-moderated={} dpi-wake-ipis={}",
        counters.config_changes,
        counters.resets,
        counters.irqs_raised,
        trapped.shadow.irq_doorbells.load(Ordering::Relaxed),
        trapped.shadow.irqs_moderated.load(Ordering::Relaxed),
        trapped.shadow.wake_ipis.load(Ordering::Relaxed)
    );
    let per_us = crate::clock::tsc_per_us();
    for (kind, wake) in [
        ("all", counters.wake_latency),
        ("idle", counters.idle_wake_latency),
    ] {
        info!(
            "ALLY dpi-wake-latency doorbells={kind} samples={} mean-tsc={} min-tsc={} max-tsc={} mean-us={} median-us={} p99-us={} max-us={} hist={}",
            wake.samples(),
            wake.mean(),
            wake.min(),
            wake.max(),
            wake.mean() / per_us,
            wake.histogram().quantile(500) / per_us,
            wake.histogram().quantile(990) / per_us,
            wake.max() / per_us,
            wake.histogram()
        );
    }
    for (name, reads, writes) in trapped.exits.nonzero() {
        info!("ALLY nic-exits register={name} reads={reads} writes={writes}");
    }
    // Forwarded registers share the queue registers' pages (EEPROM, MDIC, STATUS): the
    // driver's probe makes thousands of those accesses, its packet path few.
    let exits = trapped.exits.total();
    let forwarded = trapped.exits.forwarded();
    let packets = counters.tx.packets + counters.rx.packets;
    let per_packet = |n: u64| {
        let hundredths = (n * 100).checked_div(packets).unwrap_or(0);
        alloc::format!("{}.{:02}", hundredths / 100, hundredths % 100)
    };
    info!(
        "ALLY nic-exits total={exits} queue={} forwarded={forwarded} fused={} packets={packets} exits-per-packet={} queue-exits-per-packet={}",
        exits - forwarded,
        trapped.exits.fused.load(Ordering::Relaxed),
        per_packet(exits),
        per_packet(exits - forwarded)
    );
    report_engine();
}

/// `ALLY engine`, `ALLY stream` and `ALLY defrag` lines: the rule engine's verdicts and what
/// the stream normalizer and the reassembler refused, by reason.
fn report_engine() {
    let Some(c) = *PUBLISHED_ENGINE.lock() else {
        return;
    };
    let e = c.engine;
    info!(
        "ALLY engine frames={} not-ip={} passed={} alerted={} dropped={} stream-dropped={} stream-untracked={} frag-forwarded={} frag-dropped={} frag-unblocked={} held={} released={} forward-full={}",
        e.frames,
        e.not_ip,
        e.passed,
        e.alerted,
        e.dropped,
        e.stream_dropped,
        e.stream_untracked,
        e.frag_forwarded,
        e.frag_dropped,
        e.frag_unblocked,
        e.held,
        e.released,
        e.forward_full
    );
    let s = c.stream;
    let d = s.drops;
    info!(
        "ALLY stream flows={} midstream={} active={} reset={} accepted-bytes={} overlap-mismatch={} out-of-window={} rst-out-of-window={} rst-not-exact={} syn-on-established={} after-reset={} blocked={} out-of-order={} flow-limit={} memory-limit={} malformed={}",
        s.created,
        s.midstream,
        s.active,
        s.reset,
        s.accepted_bytes,
        d.overlap_mismatch,
        d.out_of_window,
        d.rst_out_of_window,
        d.rst_not_exact,
        d.syn_on_established,
        d.after_reset,
        d.blocked,
        d.out_of_order,
        d.flow_limit,
        d.memory_limit,
        d.malformed
    );
    let f = c.defrag;
    info!(
        "ALLY defrag fragments={} completed={} duplicates={} timeouts={} overlap-mismatch={} tiny={} too-many={} too-large={} table-full={} memory-limit={} malformed={} poisoned={} peak-bytes={}",
        f.fragments,
        f.completed,
        f.duplicates,
        f.timeouts,
        f.overlap_mismatch,
        f.tiny_fragment,
        f.too_many_fragments,
        f.too_large,
        f.table_full,
        f.memory_limit,
        f.malformed,
        f.poisoned,
        f.peak_bytes
    );
}
