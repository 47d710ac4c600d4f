//! The exit policy both backends share: each function takes the decoded exit and a
//! [`GuestCpu`], decides, and emulates or forwards.

use super::{ExitResult, GuestCpu, StopReason, Vendor, VECTOR_GP, VECTOR_UD};
use crate::addr::GuestPhysAddr;
use crate::arch::instructions;
use crate::exit::ExitReason;
use crate::guards::nic::{self as nic_guard, PortAccess};
use crate::guards::{apic as apic_guard, pci_config as pci_guard};
use crate::guest::{
    emulate_follow_on, emulate_mmio, AccessKind, AccessWidth, GuestCpuState, GuestMemory,
    GuestRegisters, MmioHandler,
};
use crate::int15::{emulate_int15, Int15Result, RealModeRegs};
use crate::ioport::PortWrite;
use crate::log_limit;
use crate::msr::{self, MsrContext, WriteVerdict};
use crate::platform::{platform, PhysicalMemory};
use crate::reset::{PortVerdict, ResetSource};
use crate::sleep::SleepVerdict;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use log::{error, info, warn};

// ---- CPUID --------------------------------------------------------------------------------

/// The CPUID result the guest sees for `leaf`/`subleaf`, given the hardware's `raw`
/// `[eax, ebx, ecx, edx]`: the virtualization extension, Intel PT and (where the guest cannot
/// enable XSAVE) the XSAVE-managed features hidden, OSXSAVE/OSPKE mirroring the guest's CR4,
/// the topology leaves showing the guest's own cores.
pub fn filter_cpuid(cpu: &impl GuestCpu, leaf: u32, subleaf: u32, raw: [u32; 4]) -> [u32; 4] {
    let [mut eax, mut ebx, mut ecx, mut edx] = raw;
    let can_xsave = cpu.guest_can_use_xsave();
    let cr4 = cpu.guest_cr4();
    match leaf {
        1 => {
            // Hide VMX (bit 5) and report no hypervisor (bit 31): the guest must not learn
            // of Ally.
            ecx &= !((1 << 5) | (1 << 31));
            // OSXSAVE (bit 27) mirrors CR4.OSXSAVE — the guest's, not Ally's (SDM Vol. 2A).
            const OSXSAVE: u32 = 1 << 27;
            ecx &= !OSXSAVE;
            if cr4 & (1 << 18) != 0 {
                ecx |= OSXSAVE;
            }
            // Where the guest cannot set CR4.OSXSAVE (IA32_VMX_CR4_FIXED1 bit 18 is 0, as in
            // Bochs 2.7), XSAVE and the AVX state it manages cannot work: report them absent.
            if !can_xsave {
                const XSAVE: u32 = 1 << 26;
                const AVX: u32 = 1 << 28;
                const FMA: u32 = 1 << 12;
                const F16C: u32 = 1 << 29;
                ecx &= !(XSAVE | AVX | FMA | F16C);
            }
        }
        0xB | 0x1F => {
            // The guest's own cores only (see `crate::topology`).
            [eax, ebx, ecx, edx] = crate::topology::guest_topology_leaf(
                leaf,
                cpu.apic_id(),
                raw,
                &platform().os_cores,
            );
        }
        // Leaf 0x14 enumerates Intel PT, which Ally hides.
        0x14 => [eax, ebx, ecx, edx] = [0; 4],
        0xD if !can_xsave => [eax, ebx, ecx, edx] = [0; 4],
        7 if subleaf == 0 => {
            if !can_xsave {
                // AVX2 (EBX 5) and the AVX-512 family need XSAVE-managed state.
                const AVX_FAMILY_EBX: u32 = (1 << 5)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31);
                ebx &= !AVX_FAMILY_EBX;
                ecx &= !((1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 3));
                edx &= !((1 << 2) | (1 << 3) | (1 << 8) | (1 << 23));
            }
            // Intel PT (EBX bit 25) is hidden: its MSRs are refused (`crate::msr`).
            ebx &= !(1 << 25);
            // OSPKE (ECX bit 4) mirrors the guest's CR4.PKE (bit 22).
            ecx &= !(1 << 4);
            if cr4 & (1 << 22) != 0 {
                ecx |= 1 << 4;
            }
        }
        // SVM (ECX bit 2) hidden on AMD (APM Vol. 3 E.4.2), and its feature leaf empty.
        0x8000_0001 if cpu.vendor() == Vendor::Svm => ecx &= !(1 << 2),
        0x8000_000A if cpu.vendor() == Vendor::Svm => [eax, ebx, ecx, edx] = [0; 4],
        _ => {}
    }
    [eax, ebx, ecx, edx]
}

/// CPUID: the filtered hardware answer.
pub fn handle_cpuid(cpu: &mut impl GuestCpu, regs: &mut GuestRegisters) -> ExitResult {
    let leaf = regs.rax as u32;
    let subleaf = regs.rcx as u32;
    let r = raw_cpuid::cpuid!(leaf, subleaf);
    let [eax, ebx, ecx, edx] = filter_cpuid(cpu, leaf, subleaf, [r.eax, r.ebx, r.ecx, r.edx]);
    regs.rax = u64::from(eax);
    regs.rbx = u64::from(ebx);
    regs.rcx = u64::from(ecx);
    regs.rdx = u64::from(edx);
    cpu.skip_instruction();
    Ok(())
}

// ---- MSRs ---------------------------------------------------------------------------------

/// Guest WRMSRs refused with #GP (`crate::msr`).
static MSR_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Guest MTRR writes kept in the vCPU's shadow.
static MTRR_SHADOWED: AtomicU64 = AtomicU64::new(0);

/// VM_CR (APM Vol. 2 15.30.1): bit 3 LOCK, bit 4 SVMDIS.
const VM_CR: u32 = 0xC001_0114;
const VM_CR_LOCK: u64 = 1 << 3;
const VM_CR_SVMDIS: u64 = 1 << 4;

/// RDMSR of an intercepted MSR.
pub fn handle_rdmsr(cpu: &mut impl GuestCpu, regs: &mut GuestRegisters) -> ExitResult {
    let index = regs.rcx as u32;
    let value = match index {
        // Locked, with VMX disabled: what a CPU without VMX shows (SDM Vol. 4 table 2-2).
        msr::IA32_FEATURE_CONTROL if cpu.vendor() == Vendor::Vmx => Some(1),
        // SVM disabled and locked (APM Vol. 2 15.30.1): what a CPU whose firmware turned
        // SVM off shows.
        VM_CR if cpu.vendor() == Vendor::Svm => Some(VM_CR_SVMDIS | VM_CR_LOCK),
        m if msr::is_mtrr(m) => cpu.mtrr().read(m),
        // The VMX capability MSRs, Intel PT's (hidden in CPUID), SVM's and MSRs outside the
        // bitmap's ranges: absent, as on a CPU without them.
        _ => None,
    };
    let Some(value) = value else {
        cpu.inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    };
    regs.rax = value & 0xFFFF_FFFF;
    regs.rdx = value >> 32;
    cpu.skip_instruction();
    Ok(())
}

fn x2apic_enabled() -> bool {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    unsafe { instructions::rdmsr(msr::IA32_APIC_BASE) & (1 << 10) != 0 }
}

/// WRMSR of an intercepted MSR: judged by `crate::msr`, refused ones get #GP.
pub fn handle_wrmsr(cpu: &mut impl GuestCpu, regs: &mut GuestRegisters) -> ExitResult {
    let index = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xFFFF_FFFF);
    let current = match index {
        // SAFETY: both are architectural on every x86-64 CPU Ally runs on.
        msr::IA32_APIC_BASE | msr::IA32_MISC_ENABLE => unsafe { instructions::rdmsr(index) },
        _ => 0,
    };
    let context = MsrContext {
        max_phys_bits: raw_cpuid::cpuid!(0x8000_0008).eax as u8,
        x2apic_supported: raw_cpuid::cpuid!(1).ecx & (1 << 21) != 0,
        current,
    };
    let refusal = match msr::judge_write(index, value, context) {
        WriteVerdict::Hardware => {
            // SAFETY: IA32_APIC_BASE, validated as the CPU would (no #GP in Ally) and with
            // the APIC left at its address.
            unsafe { instructions::wrmsr(index, value) };
            None
        }
        WriteVerdict::Unchanged => None,
        WriteVerdict::X2apicIcr if x2apic_enabled() => {
            apic_guard::write_x2apic_icr(value, cpu.apic_id());
            None
        }
        WriteVerdict::X2apicIcr => Some("the x2APIC ICR in xAPIC mode"),
        WriteVerdict::Mtrr => {
            MTRR_SHADOWED.fetch_add(1, Ordering::Relaxed);
            (!cpu.mtrr().write(index, value)).then_some("an MTRR this CPU does not have")
        }
        WriteVerdict::Refuse(why) => Some(why),
    };
    if let Some(why) = refusal {
        MSR_REFUSED.fetch_add(1, Ordering::Relaxed);
        if log_limit::MSR_REFUSED.admit() {
            warn!(
                "ALLY msr-refused msr={index:#x} value={value:#x} cpu={} reason=\"{why}\"",
                cpu.apic_id()
            );
        }
        cpu.inject_exception(VECTOR_GP, Some(0));
        return Ok(());
    }
    cpu.skip_instruction();
    Ok(())
}

/// Prints the MSR guard's counters (at the guest's power-off).
pub fn report_msrs() {
    info!(
        "ALLY msr-guard refused={} mtrr-shadowed={} write-allow-list={}",
        MSR_REFUSED.load(Ordering::Relaxed),
        MTRR_SHADOWED.load(Ordering::Relaxed),
        msr::WRITE_ALLOWED.len()
    );
}

// ---- Port I/O -----------------------------------------------------------------------------

/// An intercepted IN or OUT, decoded by the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortIo {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub is_in: bool,
    /// INS/OUTS.
    pub string: bool,
}

/// An S-state for reports: `S3`, or `unknown` for an SLP_TYP no `\_Sx` object names.
struct SleepState(Option<u8>);

impl fmt::Display for SleepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "S{s}"),
            None => f.write_str("unknown"),
        }
    }
}

const COM2_SCRATCH: u16 = crate::arch::serial::COM2_BASE + 7;

/// Intercepted port accesses by port, for the power-off report: the first
/// [`PORT_SLOTS`] ports seen get a slot each, the rest are summed in the last.
const PORT_SLOTS: usize = 32;
static PORT_EXIT_PORTS: [core::sync::atomic::AtomicU32; PORT_SLOTS] =
    [const { core::sync::atomic::AtomicU32::new(u32::MAX) }; PORT_SLOTS];
static PORT_EXIT_COUNTS: [AtomicU64; PORT_SLOTS] = [const { AtomicU64::new(0) }; PORT_SLOTS];

fn count_port_exit(port: u16) {
    let port = u32::from(port);
    for slot in 0..PORT_SLOTS - 1 {
        let owner = &PORT_EXIT_PORTS[slot];
        // A plain load finds a taken slot; only a free one costs a locked exchange (the exit
        // path passes here on every intercepted IN/OUT).
        let mut current = owner.load(Ordering::Acquire);
        if current == u32::MAX {
            current =
                match owner.compare_exchange(u32::MAX, port, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => port,
                    Err(existing) => existing,
                };
        }
        if current == port {
            PORT_EXIT_COUNTS[slot].fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    PORT_EXIT_COUNTS[PORT_SLOTS - 1].fetch_add(1, Ordering::Relaxed);
}

/// `ALLY io-exits`: the intercepted port accesses by port, at the guest's power-off.
pub fn report_port_exits() {
    let mut line = heapless::String::<512>::new();
    for slot in 0..PORT_SLOTS {
        let count = PORT_EXIT_COUNTS[slot].load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        let port = PORT_EXIT_PORTS[slot].load(Ordering::Relaxed);
        let _ = if slot == PORT_SLOTS - 1 {
            core::fmt::Write::write_fmt(&mut line, format_args!("other:{count},"))
        } else {
            core::fmt::Write::write_fmt(&mut line, format_args!("{port:#x}:{count},"))
        };
    }
    info!("ALLY io-exits ports={}", line.trim_end_matches(','));
}

/// An intercepted port access: resets, sleep states, the PCI configuration latch, the NIC's
/// I/O BAR, Ally's COM2.
pub fn handle_port_io(
    cpu: &mut impl GuestCpu,
    regs: &mut GuestRegisters,
    io: PortIo,
) -> ExitResult {
    count_port_exit(io.port);
    if io.string {
        return Err(StopReason::GuestRequested(
            "string I/O on a port Ally intercepts (unsupported)",
        ));
    }
    let platform = platform();
    let width_mask: u64 = match io.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    let mut value = (regs.rax & width_mask) as u32;
    let access = PortWrite::new(io.port, io.size, value);
    if !io.is_in {
        if platform.resets.watches(&access) {
            match platform.resets.judge(access) {
                PortVerdict::Reset(source) => return cpu.platform_reset(regs, source),
                PortVerdict::Forward(corrected) => value = corrected.value,
            }
        }
        match platform.sleep.judge_write(access) {
            SleepVerdict::NoSleep => {}
            // S5: report first, then let the write reach the hardware (below).
            SleepVerdict::PowerOff => {
                info!(
                    "ALLY guest-sleep port={:#x} value={value:#x} state=S5",
                    io.port
                );
                crate::platform::report_power_off();
            }
            SleepVerdict::Refused { slp_typ, state } => {
                if log_limit::SLEEP_REFUSED.admit() {
                    warn!(
                        "ALLY sleep-refused port={:#x} value={value:#x} slp_typ={slp_typ} state={} count={}",
                        io.port,
                        SleepState(state),
                        platform.sleep.refused()
                    );
                }
                cpu.skip_instruction();
                return Ok(());
            }
        }
    }
    let handled = if pci_guard::is_config_port(io.port) {
        match pci_guard::config_port_access(cpu.config_address(), io.port, io.size, io.is_in, value)
        {
            pci_guard::ConfigOutcome::Done(result) => Some(result),
            pci_guard::ConfigOutcome::Reset => {
                return cpu.platform_reset(regs, ResetSource::AcpiResetRegister)
            }
        }
    } else if platform.resets.watches(&access) || platform.sleep.watches(io.port, io.size) {
        // The 8042, port 0x92 and the ACPI PM registers otherwise belong to the guest.
        // SAFETY: the guest owns these ports; Ally forwards the access at the same width
        // (judged above: no reset, no sleep state but S5, the A20 gate open).
        let result = unsafe { nic_guard::forward(io.port, io.size, io.is_in, value) };
        Some(result.map(|v| platform.sleep.adjust_read(io.port, io.size, v)))
    } else {
        match platform
            .nic
            .as_ref()
            .map(|nic| nic_guard::port_access(nic, io.port, io.size, io.is_in, value))
        {
            Some(PortAccess::Done(result)) => Some(result),
            _ => None,
        }
    };
    if let Some(result) = handled {
        if let Some(v) = result {
            // IN of 4 bytes zero-extends into RAX; narrower ones keep the upper bits.
            regs.rax = if io.size == 4 {
                u64::from(v)
            } else {
                (regs.rax & !width_mask) | (u64::from(v) & width_mask)
            };
        }
        cpu.skip_instruction();
        return Ok(());
    }
    // COM2 is Ally's: the guest sees no UART there (reads float high, writes are dropped).
    // A byte written to its scratch register asks Ally for a counters snapshot (a test
    // harness measuring exit rates between two marks; rate-limited by `log_limit::MARK`).
    if !io.is_in && io.port == COM2_SCRATCH {
        report_mark(regs.rax as u8, cpu);
    }
    if io.is_in {
        regs.rax |= width_mask;
        if io.size == 4 {
            regs.rax &= 0xFFFF_FFFF;
        }
    }
    cpu.skip_instruction();
    Ok(())
}

/// `ALLY mark`: this vCPU's exits, the APIC and I/O APIC exits, and the DPI heartbeat.
fn report_mark(id: u8, cpu: &impl GuestCpu) {
    if !log_limit::MARK.admit() {
        return;
    }
    use core::sync::atomic::Ordering::Relaxed;
    info!(
        "ALLY mark id={id} vcpu={} exits={} all-exits={} ept-violations={} apic-mmio-exits={} ioapic-exits={} dpi-heartbeat={}",
        cpu.apic_id(),
        cpu.exits().total(),
        super::registry::registered_exits()
            .map(|(_, exits)| exits.total())
            .sum::<u64>(),
        cpu.exits().get(ExitReason::EptViolation.basic()),
        apic_guard::apic_mmio_exits(),
        crate::guards::ioapic::IOAPIC_EXITS.load(Relaxed),
        (platform().dpi_heartbeat)()
    );
    let mut registers = heapless::String::<512>::new();
    let _ = crate::exit::write_register_counts(&mut registers, apic_guard::exits_by_register());
    info!("ALLY apic-mark id={id} registers={registers}");
    (platform().mark_hook)(id);
}

// ---- Nested-paging faults -----------------------------------------------------------------

/// Accesses to memory Ally keeps out of the guest's EPT/NPT: reads return all ones (as from
/// a bus with nothing behind it), writes are discarded; each is logged (rate-limited).
struct HiddenMemory;

impl MmioHandler for HiddenMemory {
    fn read(&mut self, _gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        match width.bytes() {
            8 => u64::MAX,
            n => (1u64 << (8 * n as u32)) - 1,
        }
    }
    fn write(&mut self, _gpa: GuestPhysAddr, _width: AccessWidth, _value: u64) {}
}

/// Emulates the access that faulted against `handler`; on success the new registers and RIP
/// go back to the guest.
fn emulate_access(
    cpu: &mut impl GuestCpu,
    regs: &mut GuestRegisters,
    gpa: GuestPhysAddr,
    access: AccessKind,
    handler: &mut impl MmioHandler,
) -> Result<crate::guest::EmulatedAccess, crate::guest::EmulationError> {
    let mut state = cpu.state(regs);
    let done = emulate_mmio(&mut state, gpa, access, &PhysicalMemory, handler)?;
    cpu.commit(regs, &state, false);
    Ok(done)
}

/// DR7's L0–L3 and G0–G3 enables (SDM Vol. 3B 18.2.4): with a breakpoint armed, an
/// instruction boundary inside a fused stretch would be observable.
const DR7_BREAKPOINT_ENABLES: u64 = 0xff;

/// A trapped NIC register access; after a write, the driver's flush read that follows within
/// a few instructions is emulated in the same exit ([`emulate_follow_on`]) and counted as
/// fused, not as an exit.
fn emulate_nic_access(
    cpu: &mut impl GuestCpu,
    regs: &mut GuestRegisters,
    gpa: GuestPhysAddr,
    access: AccessKind,
    nic: &nic_guard::NicTrap,
    offset: u64,
) -> Result<(), crate::guest::EmulationError> {
    let mut state: GuestCpuState = cpu.state(regs);
    emulate_mmio(
        &mut state,
        gpa,
        access,
        &PhysicalMemory,
        &mut nic_guard::NicMmio::exit(nic, offset),
    )?;
    let mut rflags_changed = false;
    if access == AccessKind::Write && cpu.dr7() & DR7_BREAKPOINT_ENABLES == 0 {
        let before = state.rflags;
        let fused = emulate_follow_on(&mut state, &PhysicalMemory, |gpa: GuestPhysAddr| {
            nic.trapped_offset(gpa)
                .map(|offset| nic_guard::NicMmio::fused(nic, offset))
        });
        rflags_changed = fused.is_some() && state.rflags != before;
    }
    cpu.commit(regs, &state, rflags_changed);
    Ok(())
}

/// A guest access to a page the EPT/NPT leaves out: the local APIC (ICR filtered), an I/O
/// APIC (redirection entries filtered), the NIC's trapped registers, or memory Ally hides.
pub fn handle_guest_memory_fault(
    cpu: &mut impl GuestCpu,
    regs: &mut GuestRegisters,
    gpa: GuestPhysAddr,
    access: AccessKind,
) -> ExitResult {
    let apic_base = platform().apic_base;
    if gpa.0 & !0xFFF == apic_base {
        let mut apic = apic_guard::XApicMmio {
            apic_base,
            sender: cpu.apic_id(),
        };
        emulate_access(cpu, regs, gpa, access, &mut apic).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    if let Some(mut ioapic) = platform()
        .ioapics
        .iter()
        .find(|io| io.base == gpa.0 & !0xFFF)
    {
        emulate_access(cpu, regs, gpa, access, &mut ioapic).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    if let Some((nic, offset)) = platform()
        .nic
        .as_ref()
        .and_then(|nic| Some((nic, nic.trapped_offset(gpa)?)))
    {
        emulate_nic_access(cpu, regs, gpa, access, nic, offset).map_err(StopReason::Emulation)?;
        return Ok(());
    }
    match emulate_access(cpu, regs, gpa, access, &mut HiddenMemory) {
        Ok(done) => {
            if log_limit::EPT_VIOLATION.admit() {
                // What Ally really holds there, to show the guest did not get it.
                // (Ally's region is the first hidden range; the others are device windows.)
                let in_hidden = platform().hidden.first().is_some_and(|h| h.contains(gpa.0));
                let actual = if in_hidden && gpa.0.is_multiple_of(8) {
                    // SAFETY: the address is in Ally's own identity-mapped region, aligned.
                    unsafe { (gpa.0 as *const u64).read_volatile() }
                } else {
                    0
                };
                let (kind, action) = if access == AccessKind::Write {
                    ("write", "discarded")
                } else {
                    ("read", "read-as-ones")
                };
                warn!(
                    "ALLY ept-violation gpa={:#x} access={} width={} value={:#x} actual={:#x} rip={:#x} action={}",
                    gpa.0,
                    kind,
                    done.width.bytes(),
                    done.value,
                    actual,
                    done.old_rip,
                    action
                );
            }
            Ok(())
        }
        Err(e) => {
            warn!(
                "ALLY ept-violation gpa={:#x} access={:?} action=stop",
                gpa.0, access
            );
            Err(StopReason::Emulation(e))
        }
    }
}

// ---- Hypercalls from Ally's real-mode stubs -----------------------------------------------

/// VMCALL (VMX) or VMMCALL (SVM): accepted only at the two stubs' addresses in real mode
/// (`crate::realmode`); anywhere else #UD, as on a CPU without the extension.
pub fn handle_hypercall(cpu: &mut impl GuestCpu, regs: &mut GuestRegisters) -> ExitResult {
    let linear_rip = cpu.linear_rip();
    let platform = platform();
    if !cpu.in_protected_mode() && linear_rip == platform.realmode.int15_vmcall {
        return emulate_int15_hook(cpu, regs);
    }
    if !cpu.in_protected_mode() && linear_rip == platform.realmode.boot_failed_vmcall {
        error!(
            "ALLY fatal reason=guest-boot-failed code={:#x}",
            regs.rax & 0xFFFF
        );
        return Err(StopReason::GuestRequested(
            "the BIOS could not read the first hard disk's MBR",
        ));
    }
    cpu.inject_exception(VECTOR_UD, None);
    Ok(())
}

/// Answers the guest's INT 15h memory-size call trapped at the hook's hypercall.
fn emulate_int15_hook(cpu: &mut impl GuestCpu, regs: &mut GuestRegisters) -> ExitResult {
    let platform = platform();
    let mut rm = RealModeRegs {
        eax: regs.rax as u32,
        ebx: regs.rbx as u32,
        ecx: regs.rcx as u32,
        edx: regs.rdx as u32,
        esi: regs.rsi as u32,
        edi: regs.rdi as u32,
        es_base: cpu.es_base(),
        carry: false,
    };
    let mut buffer = crate::platform::Int15Buffer {
        map: &platform.guest_map,
    };
    match emulate_int15(&mut rm, &platform.guest_map, &mut buffer) {
        Int15Result::Handled => {}
        Int15Result::Rejected(why) => warn!("guest INT 15h rejected: {why}"),
        Int15Result::NotOurs => {
            // The hook only traps the memory-size services; anything else came here by a jump.
            rm.eax = (rm.eax & 0xFFFF_00FF) | (0x86 << 8);
            rm.carry = true;
        }
    }
    let low32 = |r: &mut u64, v: u32| *r = (*r & !0xFFFF_FFFF) | u64::from(v);
    low32(&mut regs.rax, rm.eax);
    low32(&mut regs.rbx, rm.ebx);
    low32(&mut regs.rcx, rm.ecx);
    low32(&mut regs.rdx, rm.edx);

    // CF goes into FLAGS of the 16-bit IRET frame (IP, CS, FLAGS) at SS:SP.
    let frame_flags = cpu.ss_base() + ((cpu.rsp() + 4) & 0xFFFF);
    let mut flags = [0u8; 2];
    let mut memory = PhysicalMemory;
    if memory.read(GuestPhysAddr(frame_flags), &mut flags).is_err() {
        return Err(StopReason::Int15("the guest's stack is not in guest RAM"));
    }
    let mut value = u16::from_le_bytes(flags);
    if rm.carry {
        value |= 1;
    } else {
        value &= !1;
    }
    if memory
        .write(GuestPhysAddr(frame_flags), &value.to_le_bytes())
        .is_err()
    {
        return Err(StopReason::Int15("the guest's stack is not in guest RAM"));
    }
    cpu.skip_instruction();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCounters;

    /// A vCPU whose guest state is plain fields: what the policy asked for is recorded.
    struct MockCpu {
        vendor: Vendor,
        cr4: u64,
        xsave: bool,
        skipped: u32,
        injected: Option<(u8, Option<u32>)>,
        mtrr: crate::msr::MtrrShadow,
        exits: ExitCounters,
        config_address: u32,
    }

    impl MockCpu {
        fn new(vendor: Vendor) -> Self {
            Self {
                vendor,
                cr4: 0,
                xsave: true,
                skipped: 0,
                injected: None,
                // Two variable MTRRs, fixed ones present (IA32_MTRRCAP = 0x502).
                mtrr: crate::msr::MtrrShadow::capture(|m| if m == 0xFE { 0x502 } else { 0 }),
                exits: ExitCounters::new(),
                config_address: 0,
            }
        }
    }

    impl GuestCpu for MockCpu {
        fn apic_id(&self) -> u32 {
            0
        }
        fn vendor(&self) -> Vendor {
            self.vendor
        }
        fn state(&self, regs: &GuestRegisters) -> GuestCpuState {
            GuestCpuState {
                regs: *regs,
                ..GuestCpuState::default()
            }
        }
        fn commit(&mut self, regs: &mut GuestRegisters, cpu: &GuestCpuState, _: bool) {
            *regs = cpu.regs;
        }
        fn skip_instruction(&mut self) {
            self.skipped += 1;
        }
        fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
            self.injected = Some((vector, error_code));
        }
        fn in_protected_mode(&self) -> bool {
            true
        }
        fn linear_rip(&self) -> u64 {
            0
        }
        fn dr7(&self) -> u64 {
            0x400
        }
        fn guest_cr4(&self) -> u64 {
            self.cr4
        }
        fn guest_can_use_xsave(&self) -> bool {
            self.xsave
        }
        fn ss_base(&self) -> u64 {
            0
        }
        fn es_base(&self) -> u64 {
            0
        }
        fn rsp(&self) -> u64 {
            0
        }
        fn config_address(&mut self) -> &mut u32 {
            &mut self.config_address
        }
        fn mtrr(&mut self) -> &mut crate::msr::MtrrShadow {
            &mut self.mtrr
        }
        fn exits(&self) -> &ExitCounters {
            &self.exits
        }
        fn platform_reset(&mut self, _: &mut GuestRegisters, _: ResetSource) -> ExitResult {
            Err(StopReason::GuestRequested("reset"))
        }
    }

    const ALL: [u32; 4] = [u32::MAX; 4];

    #[test]
    fn vmx_is_hidden_on_intel_and_svm_on_amd() {
        let intel = MockCpu::new(Vendor::Vmx);
        let amd = MockCpu::new(Vendor::Svm);
        assert_eq!(filter_cpuid(&intel, 1, 0, ALL)[2] & (1 << 5), 0, "VMX");
        assert_eq!(
            filter_cpuid(&intel, 1, 0, ALL)[2] & (1 << 31),
            0,
            "hypervisor bit"
        );
        assert_eq!(
            filter_cpuid(&amd, 1, 0, ALL)[2] & (1 << 31),
            0,
            "hypervisor bit"
        );
        assert_eq!(
            filter_cpuid(&amd, 0x8000_0001, 0, ALL)[2] & (1 << 2),
            0,
            "SVM"
        );
        assert_eq!(
            filter_cpuid(&amd, 0x8000_000A, 0, ALL),
            [0; 4],
            "SVM features"
        );
        // Intel's extended leaves pass (LAHF/LZCNT and the rest in 8000_0001h).
        assert_eq!(filter_cpuid(&intel, 0x8000_0001, 0, ALL), ALL);
    }

    #[test]
    fn osxsave_and_ospke_follow_the_guests_cr4() {
        let mut cpu = MockCpu::new(Vendor::Svm);
        assert_eq!(filter_cpuid(&cpu, 1, 0, ALL)[2] & (1 << 27), 0);
        assert_eq!(filter_cpuid(&cpu, 7, 0, ALL)[2] & (1 << 4), 0);
        cpu.cr4 = (1 << 18) | (1 << 22);
        assert_ne!(filter_cpuid(&cpu, 1, 0, ALL)[2] & (1 << 27), 0);
        assert_ne!(filter_cpuid(&cpu, 7, 0, ALL)[2] & (1 << 4), 0);
        // Intel PT stays hidden whatever the vendor.
        assert_eq!(filter_cpuid(&cpu, 7, 0, ALL)[1] & (1 << 25), 0);
        assert_eq!(filter_cpuid(&cpu, 0x14, 0, ALL), [0; 4]);
    }

    #[test]
    fn without_xsave_the_avx_family_is_absent() {
        let mut cpu = MockCpu::new(Vendor::Vmx);
        cpu.xsave = false;
        let leaf1 = filter_cpuid(&cpu, 1, 0, ALL);
        assert_eq!(leaf1[2] & ((1 << 26) | (1 << 28)), 0);
        assert_eq!(filter_cpuid(&cpu, 0xD, 0, ALL), [0; 4]);
        assert_eq!(filter_cpuid(&cpu, 7, 0, ALL)[1] & (1 << 5), 0, "AVX2");
    }

    #[test]
    fn the_hidden_extension_reads_as_firmware_disabled() {
        let mut regs = GuestRegisters {
            rcx: u64::from(VM_CR),
            ..GuestRegisters::default()
        };
        let mut amd = MockCpu::new(Vendor::Svm);
        handle_rdmsr(&mut amd, &mut regs).unwrap();
        assert_eq!(regs.rax, VM_CR_SVMDIS | VM_CR_LOCK);
        assert_eq!((amd.skipped, amd.injected), (1, None));

        // On Intel VM_CR does not exist: #GP, RIP unchanged.
        let mut intel = MockCpu::new(Vendor::Vmx);
        regs.rcx = u64::from(VM_CR);
        handle_rdmsr(&mut intel, &mut regs).unwrap();
        assert_eq!(
            (intel.skipped, intel.injected),
            (0, Some((VECTOR_GP, Some(0))))
        );
        // IA32_FEATURE_CONTROL: locked with VMX off on Intel, absent on AMD.
        regs.rcx = u64::from(msr::IA32_FEATURE_CONTROL);
        handle_rdmsr(&mut intel, &mut regs).unwrap();
        assert_eq!(regs.rax, 1);
        handle_rdmsr(&mut amd, &mut regs).unwrap();
        assert_eq!(amd.injected, Some((VECTOR_GP, Some(0))));
    }

    #[test]
    fn mtrr_reads_come_from_the_vcpus_shadow() {
        let mut cpu = MockCpu::new(Vendor::Svm);
        let mut regs = GuestRegisters {
            rcx: 0xFE,
            ..GuestRegisters::default()
        };
        handle_rdmsr(&mut cpu, &mut regs).unwrap();
        assert_eq!(regs.rax, 0x502);
        assert_eq!(cpu.skipped, 1);
    }
}
