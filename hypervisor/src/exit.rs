//! VM-exit decoding: exit reasons, exit qualifications, VM-instruction errors, and a
//! per-reason exit counter table for the power-off report.
//!
//! Section and table numbers are those of the Intel SDM Vol. 3C/3D editions the brief
//! cites (Appendix C, 28.2.1, 31.4); later editions shift chapters by one.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

macro_rules! exit_reasons {
    ($($(#[$m:meta])* $variant:ident = $num:literal => $name:literal,)*) => {
        /// A basic exit reason (SDM Vol. 3D Appendix C, Table C-1).
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
        pub enum ExitReason {
            $($(#[$m])* $variant,)*
            /// A number the SDM does not define (35, 38, 42, 71, or above 77).
            Unknown(u32),
        }

        impl ExitReason {
            /// The reason for a basic exit-reason number (bits 15:0 of the exit-reason field).
            pub const fn from_basic(basic: u32) -> Self {
                match basic {
                    $($num => ExitReason::$variant,)*
                    n => ExitReason::Unknown(n),
                }
            }

            /// The basic exit-reason number.
            pub const fn basic(self) -> u32 {
                match self {
                    $(ExitReason::$variant => $num,)*
                    ExitReason::Unknown(n) => n,
                }
            }

            /// The SDM's name for the reason.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ExitReason::$variant => $name,)*
                    ExitReason::Unknown(_) => "unknown exit reason",
                }
            }
        }
    };
}

exit_reasons! {
    ExceptionOrNmi = 0 => "Exception or non-maskable interrupt (NMI)",
    ExternalInterrupt = 1 => "External interrupt",
    TripleFault = 2 => "Triple fault",
    InitSignal = 3 => "INIT signal",
    StartupIpi = 4 => "Start-up IPI (SIPI)",
    IoSmi = 5 => "I/O system-management interrupt (SMI)",
    OtherSmi = 6 => "Other SMI",
    InterruptWindow = 7 => "Interrupt window",
    NmiWindow = 8 => "NMI window",
    TaskSwitch = 9 => "Task switch",
    Cpuid = 10 => "CPUID",
    Getsec = 11 => "GETSEC",
    Hlt = 12 => "HLT",
    Invd = 13 => "INVD",
    Invlpg = 14 => "INVLPG",
    Rdpmc = 15 => "RDPMC",
    Rdtsc = 16 => "RDTSC",
    Rsm = 17 => "RSM",
    Vmcall = 18 => "VMCALL",
    Vmclear = 19 => "VMCLEAR",
    Vmlaunch = 20 => "VMLAUNCH",
    Vmptrld = 21 => "VMPTRLD",
    Vmptrst = 22 => "VMPTRST",
    Vmread = 23 => "VMREAD",
    Vmresume = 24 => "VMRESUME",
    Vmwrite = 25 => "VMWRITE",
    Vmxoff = 26 => "VMXOFF",
    Vmxon = 27 => "VMXON",
    CrAccess = 28 => "Control-register accesses",
    MovDr = 29 => "MOV DR",
    IoInstruction = 30 => "I/O instruction",
    Rdmsr = 31 => "RDMSR",
    Wrmsr = 32 => "WRMSR",
    EntryFailureGuestState = 33 => "VM-entry failure due to invalid guest state",
    EntryFailureMsrLoading = 34 => "VM-entry failure due to MSR loading",
    Mwait = 36 => "MWAIT",
    MonitorTrapFlag = 37 => "Monitor trap flag",
    Monitor = 39 => "MONITOR",
    Pause = 40 => "PAUSE",
    EntryFailureMachineCheck = 41 => "VM-entry failure due to machine-check event",
    TprBelowThreshold = 43 => "TPR below threshold",
    ApicAccess = 44 => "APIC access",
    VirtualizedEoi = 45 => "Virtualized EOI",
    GdtrIdtrAccess = 46 => "Access to GDTR or IDTR",
    LdtrTrAccess = 47 => "Access to LDTR or TR",
    EptViolation = 48 => "EPT violation",
    EptMisconfiguration = 49 => "EPT misconfiguration",
    Invept = 50 => "INVEPT",
    Rdtscp = 51 => "RDTSCP",
    PreemptionTimer = 52 => "VMX-preemption timer expired",
    Invvpid = 53 => "INVVPID",
    Wbinvd = 54 => "WBINVD or WBNOINVD",
    Xsetbv = 55 => "XSETBV",
    ApicWrite = 56 => "APIC write",
    Rdrand = 57 => "RDRAND",
    Invpcid = 58 => "INVPCID",
    Vmfunc = 59 => "VMFUNC",
    Encls = 60 => "ENCLS",
    Rdseed = 61 => "RDSEED",
    PmlFull = 62 => "Page-modification log full",
    Xsaves = 63 => "XSAVES",
    Xrstors = 64 => "XRSTORS",
    Pconfig = 65 => "PCONFIG",
    SppEvent = 66 => "SPP-related event",
    Umwait = 67 => "UMWAIT",
    Tpause = 68 => "TPAUSE",
    Loadiwkey = 69 => "LOADIWKEY",
    Enclv = 70 => "ENCLV",
    EnqcmdPasidFailure = 72 => "ENQCMD PASID translation failure",
    EnqcmdsPasidFailure = 73 => "ENQCMDS PASID translation failure",
    BusLock = 74 => "Bus lock",
    InstructionTimeout = 75 => "Instruction timeout",
    Seamcall = 76 => "SEAMCALL",
    Tdcall = 77 => "TDCALL",
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Unknown(n) => write!(f, "unknown exit reason {n}"),
            r => f.write_str(r.name()),
        }
    }
}

/// The full 32-bit exit-reason field (SDM Vol. 3C 24.9.1, Table 24-15).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ExitReasonField(pub u32);

impl ExitReasonField {
    /// Bits 15:0.
    pub const fn basic(self) -> u32 {
        self.0 & 0xFFFF
    }
    pub const fn reason(self) -> ExitReason {
        ExitReason::from_basic(self.basic())
    }
    /// Bit 27: the exit happened in enclave mode.
    pub const fn enclave_mode(self) -> bool {
        self.0 & (1 << 27) != 0
    }
    /// Bit 28: a pending MTF VM exit.
    pub const fn pending_mtf(self) -> bool {
        self.0 & (1 << 28) != 0
    }
    /// Bit 29: VM exit from VMX root operation (SMM dual-monitor only).
    pub const fn from_vmx_root(self) -> bool {
        self.0 & (1 << 29) != 0
    }
    /// Bit 31: VM-entry failure (the basic reason is 33, 34 or 41).
    pub const fn entry_failure(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

/// The kind of control-register access (Table 28-3, bits 5:4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CrAccessType {
    MovToCr,
    MovFromCr,
    Clts,
    Lmsw,
}

/// Exit qualification for control-register accesses (SDM Vol. 3C 28.2.1, Table 28-3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CrAccess {
    /// Bits 3:0: the control register (0, 3, 4 or 8; 0 for CLTS and LMSW).
    pub cr: u8,
    pub access_type: CrAccessType,
    /// Bit 6: LMSW's operand is in memory (else a register).
    pub lmsw_memory_operand: bool,
    /// Bits 11:8: the general-purpose register of a MOV (0 = RAX, 1 = RCX, 2 = RDX,
    /// 3 = RBX, 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI, 8..15 = R8..R15).
    pub gpr: u8,
    /// Bits 31:16: LMSW's source data.
    pub lmsw_source: u16,
}

impl CrAccess {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            cr: (qualification & 0xF) as u8,
            access_type: match (qualification >> 4) & 0b11 {
                0 => CrAccessType::MovToCr,
                1 => CrAccessType::MovFromCr,
                2 => CrAccessType::Clts,
                _ => CrAccessType::Lmsw,
            },
            lmsw_memory_operand: qualification & (1 << 6) != 0,
            gpr: ((qualification >> 8) & 0xF) as u8,
            lmsw_source: (qualification >> 16) as u16,
        }
    }
}

/// Exit qualification for I/O instructions (SDM Vol. 3C 28.2.1, Table 28-5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IoQualification {
    /// Bits 2:0 plus one: access size in bytes (1, 2 or 4).
    pub size: u8,
    /// Bit 3: IN/INS (else OUT/OUTS).
    pub is_in: bool,
    /// Bit 4: INS/OUTS.
    pub string: bool,
    /// Bit 5: REP prefix.
    pub rep: bool,
    /// Bit 6: the port was an immediate operand (else DX).
    pub immediate: bool,
    /// Bits 31:16.
    pub port: u16,
}

impl IoQualification {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            // Encodings 0, 1 and 3 are defined; 2 is not used by the CPU.
            size: (qualification & 0b111) as u8 + 1,
            is_in: qualification & (1 << 3) != 0,
            string: qualification & (1 << 4) != 0,
            rep: qualification & (1 << 5) != 0,
            immediate: qualification & (1 << 6) != 0,
            port: (qualification >> 16) as u16,
        }
    }
}

/// Exit qualification for EPT violations (SDM Vol. 3C 28.2.1, Table 28-7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EptViolation {
    /// Bit 0: the access was a data read.
    pub read: bool,
    /// Bit 1: the access was a data write.
    pub write: bool,
    /// Bit 2: the access was an instruction fetch.
    pub fetch: bool,
    /// Bits 5:3: what the EPT entries allowed (the AND over the walk): read, write,
    /// execute (supervisor-mode execute with mode-based execute control).
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// Bit 6: user-mode execute allowed (mode-based execute control only).
    pub user_executable: bool,
    /// Bit 7: the guest-linear-address field is valid.
    pub gla_valid: bool,
    /// Bit 8 (meaningful when `gla_valid`): the access was to the translated linear
    /// address (else to a guest paging-structure entry).
    pub translated_access: bool,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
    /// Bit 13: shadow-stack access.
    pub shadow_stack: bool,
    /// Bit 16: the access was asynchronous to instruction execution (e.g. a PT trace).
    pub asynchronous: bool,
}

impl EptViolation {
    pub fn decode(qualification: u64) -> Self {
        let bit = |n: u32| qualification & (1 << n) != 0;
        Self {
            read: bit(0),
            write: bit(1),
            fetch: bit(2),
            readable: bit(3),
            writable: bit(4),
            executable: bit(5),
            user_executable: bit(6),
            gla_valid: bit(7),
            translated_access: bit(7) && bit(8),
            nmi_unblocking: bit(12),
            shadow_stack: bit(13),
            asynchronous: bit(16),
        }
    }

    /// Whether the EPT entries did not map the address at all (no permission bit set).
    pub const fn not_present(&self) -> bool {
        !self.readable && !self.writable && !self.executable
    }
}

impl fmt::Display for EptViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = if self.fetch {
            "fetch"
        } else if self.write {
            "write"
        } else if self.read {
            "read"
        } else {
            "access"
        };
        let c = |b, ch| if b { ch } else { '-' };
        write!(
            f,
            "{access} (EPT allowed {}{}{}{})",
            c(self.readable, 'r'),
            c(self.writable, 'w'),
            c(self.executable, 'x'),
            if self.gla_valid {
                ", linear address valid"
            } else {
                ""
            }
        )
    }
}

/// A VM-instruction error number, read from the VMCS after a VMX instruction fails with
/// VMfailValid (SDM Vol. 3C 31.4, Table 31-1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VmInstructionError(pub u32);

impl VmInstructionError {
    /// The SDM's description, or `None` for numbers it does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => {
                "VM entry with executive-VMCS pointer not VMXON pointer \
                   (when attempting to deactivate the dual-monitor treatment of SMIs and SMM)"
            }
            19 => {
                "VMCALL with non-clear VMCS (when attempting to activate the dual-monitor \
                   treatment of SMIs and SMM)"
            }
            20 => "VMCALL with invalid VM-exit control fields",
            22 => {
                "VMCALL with incorrect MSEG revision identifier (when attempting to \
                   activate the dual-monitor treatment of SMIs and SMM)"
            }
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => {
                "VMCALL with invalid SMM-monitor features (when attempting to activate \
                   the dual-monitor treatment of SMIs and SMM)"
            }
            25 => {
                "VM entry with invalid VM-execution control fields in executive VMCS \
                   (when attempting to return from SMM)"
            }
            26 => "VM entry with events blocked by MOV SS",
            28 => "Invalid operand to INVEPT/INVVPID",
            _ => return None,
        })
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (VM-instruction error {})", self.0),
            None if self.0 == 0 => f.write_str("no VM-instruction error recorded (0)"),
            None => write!(f, "undefined VM-instruction error {}", self.0),
        }
    }
}

/// Basic reasons below this are counted individually; larger ones share one bucket.
pub const COUNTED_REASONS: usize = 128;

/// Exit counts by basic reason (no heap; one table per vCPU, summed with [`merge`]).
///
/// Only the vCPU's own CPU counts (`record`); other CPUs may read the counts at any time (the
/// power-off report sums every vCPU's), so they are atomics, read and written with relaxed
/// loads and stores: as cheap as plain memory on x86.
///
/// [`merge`]: ExitCounters::merge
pub struct ExitCounters {
    counts: [AtomicU64; COUNTED_REASONS],
    other: AtomicU64,
    /// Time stamp counter ticks spent in Ally's handler per reason (from the dispatcher's
    /// first instruction to its return to the VMRESUME trampoline), and the longest one.
    cycles: [AtomicU64; COUNTED_REASONS],
    max_cycles: [AtomicU64; COUNTED_REASONS],
}

/// The handler cost of one exit reason: exits timed, their TSC ticks in total, the longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCost {
    pub basic: u32,
    pub timed: u64,
    pub cycles: u64,
    pub max_cycles: u64,
}

impl ExitCost {
    /// Mean ticks per timed exit (0 when none was timed).
    pub fn mean(&self) -> u64 {
        self.cycles.checked_div(self.timed).unwrap_or(0)
    }
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ExitCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter_nonzero()).finish()
    }
}

/// Writes `NAME:READS/WRITES` items separated by commas: the `registers=` field of the mark
/// lines (APIC and NIC exits by register).
pub fn write_register_counts<'a>(
    out: &mut impl core::fmt::Write,
    counts: impl IntoIterator<Item = (&'a str, u64, u64)>,
) -> core::fmt::Result {
    for (i, (name, reads, writes)) in counts.into_iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(out, "{sep}{name}:{reads}/{writes}")?;
    }
    Ok(())
}

fn bump(counter: &AtomicU64) {
    let n = counter.load(Ordering::Relaxed);
    counter.store(n.saturating_add(1), Ordering::Relaxed);
}

impl ExitCounters {
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; COUNTED_REASONS],
            other: AtomicU64::new(0),
            cycles: [const { AtomicU64::new(0) }; COUNTED_REASONS],
            max_cycles: [const { AtomicU64::new(0) }; COUNTED_REASONS],
        }
    }

    /// Adds the handler time of one exit with basic reason `basic` (recorded by the vCPU's
    /// own CPU, like [`record`](Self::record)); reasons beyond the table are not timed.
    pub fn record_cycles(&self, basic: u32, ticks: u64) {
        let i = basic as usize;
        if let (Some(total), Some(max)) = (self.cycles.get(i), self.max_cycles.get(i)) {
            let sum = total.load(Ordering::Relaxed).saturating_add(ticks);
            total.store(sum, Ordering::Relaxed);
            if ticks > max.load(Ordering::Relaxed) {
                max.store(ticks, Ordering::Relaxed);
            }
        }
    }

    /// The handler cost of every reason seen, ascending. `timed` is the exit count: an exit
    /// whose handler never returned (it stopped the guest) counts with no ticks.
    pub fn costs(&self) -> impl Iterator<Item = ExitCost> + '_ {
        self.iter_nonzero().map(|(basic, count)| {
            let i = basic as usize;
            ExitCost {
                basic,
                timed: count,
                cycles: self.cycles[i].load(Ordering::Relaxed),
                max_cycles: self.max_cycles[i].load(Ordering::Relaxed),
            }
        })
    }

    /// Counts one exit with basic reason `basic` (saturating). Only one CPU may record into a
    /// table (its vCPU's): the increment is a load and a store, not a locked add.
    pub fn record(&self, basic: u32) {
        bump(self.counts.get(basic as usize).unwrap_or(&self.other));
    }

    /// The count for `basic`.
    pub fn get(&self, basic: u32) -> u64 {
        self.counts
            .get(basic as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Exits with a basic reason of [`COUNTED_REASONS`] or more (none are defined today).
    pub fn other(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }

    /// All exits counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(self.other(), |sum, c| {
            sum.saturating_add(c.load(Ordering::Relaxed))
        })
    }

    /// Adds another table (e.g. another vCPU's) into this one.
    pub fn merge(&mut self, other: &ExitCounters) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            let sum = a.get_mut().saturating_add(b.load(Ordering::Relaxed));
            *a.get_mut() = sum;
        }
        let sum = self.other.get_mut().saturating_add(other.other());
        *self.other.get_mut() = sum;
        for (a, b) in self.cycles.iter_mut().zip(other.cycles.iter()) {
            let sum = a.get_mut().saturating_add(b.load(Ordering::Relaxed));
            *a.get_mut() = sum;
        }
        for (a, b) in self.max_cycles.iter_mut().zip(other.max_cycles.iter()) {
            let max = (*a.get_mut()).max(b.load(Ordering::Relaxed));
            *a.get_mut() = max;
        }
    }

    /// `(basic reason, count)` for every reason seen, ascending; pass the number to
    /// [`ExitReason::from_basic`] for its name. The `other` bucket is not included.
    pub fn iter_nonzero(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .enumerate()
            .filter(|&(_, c)| c != 0)
            .map(|(i, c)| (i as u32, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_reason_round_trips() {
        let unused = [35, 38, 42, 71];
        for n in 0..=77u32 {
            let r = ExitReason::from_basic(n);
            assert_eq!(r.basic(), n);
            if unused.contains(&n) {
                assert_eq!(r, ExitReason::Unknown(n));
            } else {
                assert!(!matches!(r, ExitReason::Unknown(_)), "{n} has no name");
                assert_ne!(r.name(), "unknown exit reason");
            }
        }
        assert_eq!(ExitReason::from_basic(78), ExitReason::Unknown(78));
        assert_eq!(ExitReason::from_basic(0xFFFF), ExitReason::Unknown(0xFFFF));
    }

    #[test]
    fn names_follow_the_sdm() {
        assert_eq!(ExitReason::from_basic(10), ExitReason::Cpuid);
        assert_eq!(ExitReason::from_basic(28), ExitReason::CrAccess);
        assert_eq!(ExitReason::from_basic(30), ExitReason::IoInstruction);
        assert_eq!(ExitReason::from_basic(48), ExitReason::EptViolation);
        assert_eq!(ExitReason::from_basic(55), ExitReason::Xsetbv);
        assert_eq!(ExitReason::from_basic(77), ExitReason::Tdcall);
        assert_eq!(ExitReason::EptViolation.to_string(), "EPT violation");
        assert_eq!(
            ExitReason::EntryFailureGuestState.to_string(),
            "VM-entry failure due to invalid guest state"
        );
        assert_eq!(
            ExitReason::Unknown(35).to_string(),
            "unknown exit reason 35"
        );
    }

    #[test]
    fn exit_reason_field() {
        let f = ExitReasonField(0x8000_0021);
        assert!(f.entry_failure());
        assert_eq!(f.reason(), ExitReason::EntryFailureGuestState);
        let f = ExitReasonField((1 << 28) | (1 << 27) | 48);
        assert!(f.pending_mtf() && f.enclave_mode() && !f.entry_failure() && !f.from_vmx_root());
        assert_eq!(f.basic(), 48);
        assert!(ExitReasonField(1 << 29).from_vmx_root());
    }

    #[test]
    fn cr_access_decoding() {
        // MOV CR4, RBX: cr=4, type 0, gpr 3.
        let q = CrAccess::decode(0x0304);
        assert_eq!(q.cr, 4);
        assert_eq!(q.access_type, CrAccessType::MovToCr);
        assert_eq!(q.gpr, 3);
        // MOV R15, CR3: type 1.
        let q = CrAccess::decode((15 << 8) | (1 << 4) | 3);
        assert_eq!(
            (q.cr, q.access_type, q.gpr),
            (3, CrAccessType::MovFromCr, 15)
        );
        assert_eq!(CrAccess::decode(2 << 4).access_type, CrAccessType::Clts);
        // LMSW [mem] with source 0x0011.
        let q = CrAccess::decode((0x0011 << 16) | (1 << 6) | (3 << 4));
        assert_eq!(q.access_type, CrAccessType::Lmsw);
        assert!(q.lmsw_memory_operand);
        assert_eq!(q.lmsw_source, 0x0011);
        // Upper bits ignored.
        assert_eq!(
            CrAccess::decode(0xFFFF_FFFF_0000_0000 | 0x0304).lmsw_source,
            0
        );
    }

    #[test]
    fn io_decoding() {
        // OUT DX, AL to 0xB004 (ACPI PM1a_CNT on QEMU/Bochs-like chipsets).
        let q = IoQualification::decode(0xB004_0000);
        assert_eq!(
            q,
            IoQualification {
                size: 1,
                is_in: false,
                string: false,
                rep: false,
                immediate: false,
                port: 0xB004
            }
        );
        // IN EAX, imm8 0x60.
        let q = IoQualification::decode((0x60 << 16) | (1 << 6) | (1 << 3) | 3);
        assert_eq!(
            (q.size, q.is_in, q.immediate, q.port),
            (4, true, true, 0x60)
        );
        // REP INSW from DX=0x1F0.
        let q = IoQualification::decode((0x1F0 << 16) | (1 << 5) | (1 << 4) | (1 << 3) | 1);
        assert_eq!((q.size, q.string, q.rep, q.port), (2, true, true, 0x1F0));
    }

    #[test]
    fn ept_violation_decoding() {
        // Write to an unmapped page with a valid linear address (to the translation).
        let v = EptViolation::decode(0x182);
        assert!(v.write && !v.read && !v.fetch);
        assert!(v.not_present());
        assert!(v.gla_valid && v.translated_access);
        assert_eq!(
            v.to_string(),
            "write (EPT allowed ---, linear address valid)"
        );
        // Fetch from a read-only page.
        let v = EptViolation::decode(0b1100);
        assert!(v.fetch && v.readable && !v.writable && !v.executable);
        assert!(!v.not_present());
        // Bit 8 means nothing without bit 7.
        assert!(!EptViolation::decode(1 << 8).translated_access);
        let v = EptViolation::decode((1 << 12) | (1 << 13) | (1 << 16) | (1 << 6));
        assert!(v.nmi_unblocking && v.shadow_stack && v.asynchronous && v.user_executable);
    }

    #[test]
    fn vm_instruction_errors() {
        assert_eq!(
            VmInstructionError(7).to_string(),
            "VM entry with invalid control field(s) (VM-instruction error 7)"
        );
        assert_eq!(
            VmInstructionError(28).name(),
            Some("Invalid operand to INVEPT/INVVPID")
        );
        for undefined in [0, 14, 21, 27, 29, 1000] {
            assert_eq!(VmInstructionError(undefined).name(), None);
        }
        assert_eq!(
            VmInstructionError(14).to_string(),
            "undefined VM-instruction error 14"
        );
        assert_eq!(
            VmInstructionError(0).to_string(),
            "no VM-instruction error recorded (0)"
        );
        let defined = (0..40).filter(|&n| VmInstructionError(n).name().is_some());
        assert_eq!(defined.count(), 25);
    }

    #[test]
    fn counters() {
        let c = ExitCounters::new();
        for _ in 0..3 {
            c.record(30);
        }
        c.record(10);
        c.record(0xFFFF);
        assert_eq!(c.get(30), 3);
        assert_eq!(c.get(11), 0);
        assert_eq!(c.get(100_000), 0);
        assert_eq!(c.other(), 1);
        assert_eq!(c.total(), 5);
        let seen: std::vec::Vec<_> = c.iter_nonzero().collect();
        assert_eq!(seen, [(10, 1), (30, 3)]);

        let mut sum = ExitCounters::default();
        sum.merge(&c);
        sum.merge(&c);
        assert_eq!(sum.get(30), 6);
        assert_eq!(sum.total(), 10);

        c.record_cycles(30, 100);
        c.record_cycles(30, 500);
        c.record_cycles(30, 300);
        c.record_cycles(0xFFFF, 7);
        let cost: std::vec::Vec<_> = c.costs().collect();
        assert_eq!(cost[1].basic, 30);
        assert_eq!(
            (cost[1].timed, cost[1].cycles, cost[1].max_cycles),
            (3, 900, 500)
        );
        assert_eq!(cost[1].mean(), 300);
        assert_eq!(cost[0].mean(), 0, "reason 10 was counted, never timed");
        let mut sum = ExitCounters::default();
        sum.merge(&c);
        sum.merge(&c);
        let s30 = sum.costs().find(|e| e.basic == 30).unwrap();
        assert_eq!((s30.cycles, s30.max_cycles, s30.mean()), (1800, 500, 300));

        let full = ExitCounters::new();
        full.counts[48].store(u64::MAX, Ordering::Relaxed);
        full.record(48);
        assert_eq!(full.get(48), u64::MAX);
        assert_eq!(full.total(), u64::MAX);
    }
}
