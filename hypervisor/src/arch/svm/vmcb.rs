//! The virtual machine control block (VMCB), AMD64 Architecture Programmer's Manual (APM)
//! Vol. 2 Appendix B: a 4 KiB page with the control area at offset 0 (Table B-1) and the
//! state-save area at offset 0x400 (Table B-2). Every named field's offset is checked against
//! the table at compile time below; reserved bytes are private and stay zero.
//!
//! Also here: the intercept bits, the #VMEXIT codes (Appendix C), the EVENTINJ format
//! (15.20), the decoders of EXITINFO1 for IOIO (15.10.2) and nested page faults (15.25.6),
//! conversion of segment attributes between VMX access rights and the VMCB's packed format
//! (15.5.1, Table B-2 note), and the architectural state of a real-mode vCPU at reset.

use core::mem::{offset_of, size_of};

/// A segment register as the VMCB holds it (APM Table B-2): selector, packed attributes,
/// limit and base, 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    /// Descriptor bits 47:40 in 7:0 (type, S, DPL, P) and 55:52 in 11:8 (AVL, L, D/B, G).
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

const _: () = assert!(size_of::<Segment>() == 16);
const _: () = assert!(offset_of!(Segment, attrib) == 2);
const _: () = assert!(offset_of!(Segment, limit) == 4);
const _: () = assert!(offset_of!(Segment, base) == 8);

/// The control area, VMCB offsets 0x000-0x3FF (APM Table B-1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlArea {
    /// 0x000: bits 15:0 intercept reads of CR0-CR15, bits 31:16 writes ([`intercept::cr_read`]).
    pub intercept_cr: u32,
    /// 0x004: bits 15:0 intercept reads of DR0-DR15, bits 31:16 writes.
    pub intercept_dr: u32,
    /// 0x008: bit n intercepts exception vector n.
    pub intercept_exceptions: u32,
    /// 0x00C: [`intercept::misc1`].
    pub intercept_misc1: u32,
    /// 0x010: [`intercept::misc2`].
    pub intercept_misc2: u32,
    /// 0x014: [`intercept::misc3`].
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x24],
    /// 0x03C: PAUSE filter threshold (cycles between PAUSEs that restart the count).
    pub pause_filter_threshold: u16,
    /// 0x03E: PAUSE filter count (PAUSEs before the intercept fires).
    pub pause_filter_count: u16,
    /// 0x040: physical base of the 12 KiB I/O permission map (4 KiB-aligned).
    pub iopm_base_pa: u64,
    /// 0x048: physical base of the 8 KiB MSR permission map (4 KiB-aligned).
    pub msrpm_base_pa: u64,
    /// 0x050: added to the TSC the guest reads.
    pub tsc_offset: u64,
    /// 0x058: the guest's ASID (0 is the host's and makes VMRUN fail).
    pub guest_asid: u32,
    /// 0x05C: [`tlb_control`].
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: virtual interrupt control ([`v_intr`]).
    pub v_intr: u64,
    /// 0x068: bit 0 interrupt shadow, bit 1 guest interrupt mask (RFLAGS.IF at #VMEXIT).
    pub interrupt_shadow: u64,
    /// 0x070: the #VMEXIT code ([`SvmExitCode`]).
    pub exit_code: u64,
    /// 0x078.
    pub exit_info1: u64,
    /// 0x080.
    pub exit_info2: u64,
    /// 0x088: an event whose delivery the exit interrupted ([`EventInjection`] format).
    pub exit_int_info: u64,
    /// 0x090: bit 0 enables nested paging ([`NP_ENABLE`]); bits 1, 2 SEV, SEV-ES.
    pub np_enable: u64,
    /// 0x098: AVIC APIC_BAR (bits 51:0).
    pub avic_apic_bar: u64,
    /// 0x0A0: the GHCB's guest-physical address (SEV-ES).
    pub ghcb_gpa: u64,
    /// 0x0A8: the event to inject at VMRUN ([`EventInjection`]).
    pub event_inj: u64,
    /// 0x0B0: nested page table root (`paging::Npt::ncr3`).
    pub n_cr3: u64,
    /// 0x0B8: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub lbr_virtualization: u64,
    /// 0x0C0: VMCB clean bits ([`clean`]); bits 63:32 reserved.
    pub clean_bits: u32,
    _reserved_0c4: u32,
    /// 0x0C8: next sequential RIP at #VMEXIT (with the NRIPS feature).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub guest_instruction_len: u8,
    /// 0x0D1-0x0DF: the guest instruction bytes.
    pub guest_instruction_bytes: [u8; 15],
    /// 0x0E0: AVIC APIC backing page pointer.
    pub avic_backing_page: u64,
    _reserved_0e8: u64,
    /// 0x0F0: AVIC logical table pointer.
    pub avic_logical_table: u64,
    /// 0x0F8: AVIC physical table pointer and maximum index.
    pub avic_physical_table: u64,
    _reserved_100: [u8; 0x300],
}

/// The state-save area, VMCB offsets 0x400-0xFFF (APM Table B-2; offsets below are from the
/// start of the VMCB, as in the table).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSaveArea {
    /// 0x400.
    pub es: Segment,
    /// 0x410.
    pub cs: Segment,
    /// 0x420.
    pub ss: Segment,
    /// 0x430.
    pub ds: Segment,
    /// 0x440.
    pub fs: Segment,
    /// 0x450.
    pub gs: Segment,
    /// 0x460: only limit and base are used.
    pub gdtr: Segment,
    /// 0x470.
    pub ldtr: Segment,
    /// 0x480: only limit and base are used.
    pub idtr: Segment,
    /// 0x490.
    pub tr: Segment,
    _reserved_4a0: [u8; 0x2B],
    /// 0x4CB: the guest's CPL (SS.DPL is not used for it).
    pub cpl: u8,
    _reserved_4cc: u32,
    /// 0x4D0.
    pub efer: u64,
    _reserved_4d8: [u8; 0x70],
    /// 0x548.
    pub cr4: u64,
    /// 0x550.
    pub cr3: u64,
    /// 0x558.
    pub cr0: u64,
    /// 0x560.
    pub dr7: u64,
    /// 0x568.
    pub dr6: u64,
    /// 0x570.
    pub rflags: u64,
    /// 0x578.
    pub rip: u64,
    _reserved_580: [u8; 0x58],
    /// 0x5D8.
    pub rsp: u64,
    /// 0x5E0: S_CET.
    pub s_cet: u64,
    /// 0x5E8: SSP.
    pub ssp: u64,
    /// 0x5F0: ISST_ADDR.
    pub isst_addr: u64,
    /// 0x5F8.
    pub rax: u64,
    /// 0x600.
    pub star: u64,
    /// 0x608.
    pub lstar: u64,
    /// 0x610.
    pub cstar: u64,
    /// 0x618.
    pub sfmask: u64,
    /// 0x620.
    pub kernel_gs_base: u64,
    /// 0x628.
    pub sysenter_cs: u64,
    /// 0x630.
    pub sysenter_esp: u64,
    /// 0x638.
    pub sysenter_eip: u64,
    /// 0x640.
    pub cr2: u64,
    _reserved_648: [u8; 0x20],
    /// 0x668: the guest's PAT, used with nested paging (APM 15.25.8).
    pub g_pat: u64,
    /// 0x670: DBGCTL (with LBR virtualization).
    pub dbgctl: u64,
    /// 0x678.
    pub br_from: u64,
    /// 0x680.
    pub br_to: u64,
    /// 0x688.
    pub last_excp_from: u64,
    /// 0x690.
    pub last_excp_to: u64,
    _reserved_698: [u8; 0x48],
    /// 0x6E0: the guest's SPEC_CTRL (with V_SPEC_CTRL).
    pub spec_ctrl: u64,
    _reserved_6e8: [u8; 0x1000 - 0x6E8],
}

/// A whole VMCB: one 4 KiB-aligned page.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
}

const _: () = assert!(size_of::<ControlArea>() == 0x400);
const _: () = assert!(size_of::<StateSaveArea>() == 0xC00);
const _: () = assert!(size_of::<Vmcb>() == 4096);
const _: () = assert!(core::mem::align_of::<Vmcb>() == 4096);
const _: () = assert!(offset_of!(Vmcb, save) == 0x400);

/// Checks a control-area field against its APM Table B-1 offset.
macro_rules! control_at {
    ($($field:ident = $offset:expr),* $(,)?) => {
        $(const _: () = assert!(offset_of!(Vmcb, control) + offset_of!(ControlArea, $field)
            == $offset);)*
    };
}

/// Checks a state-save field against its APM Table B-2 offset (from the VMCB's start).
macro_rules! save_at {
    ($($field:ident = $offset:expr),* $(,)?) => {
        $(const _: () = assert!(offset_of!(Vmcb, save) + offset_of!(StateSaveArea, $field)
            == $offset);)*
    };
}

control_at!(
    intercept_cr = 0x000,
    intercept_dr = 0x004,
    intercept_exceptions = 0x008,
    intercept_misc1 = 0x00C,
    intercept_misc2 = 0x010,
    intercept_misc3 = 0x014,
    pause_filter_threshold = 0x03C,
    pause_filter_count = 0x03E,
    iopm_base_pa = 0x040,
    msrpm_base_pa = 0x048,
    tsc_offset = 0x050,
    guest_asid = 0x058,
    tlb_control = 0x05C,
    v_intr = 0x060,
    interrupt_shadow = 0x068,
    exit_code = 0x070,
    exit_info1 = 0x078,
    exit_info2 = 0x080,
    exit_int_info = 0x088,
    np_enable = 0x090,
    avic_apic_bar = 0x098,
    ghcb_gpa = 0x0A0,
    event_inj = 0x0A8,
    n_cr3 = 0x0B0,
    lbr_virtualization = 0x0B8,
    clean_bits = 0x0C0,
    next_rip = 0x0C8,
    guest_instruction_len = 0x0D0,
    guest_instruction_bytes = 0x0D1,
    avic_backing_page = 0x0E0,
    avic_logical_table = 0x0F0,
    avic_physical_table = 0x0F8,
);

save_at!(
    es = 0x400,
    cs = 0x410,
    ss = 0x420,
    ds = 0x430,
    fs = 0x440,
    gs = 0x450,
    gdtr = 0x460,
    ldtr = 0x470,
    idtr = 0x480,
    tr = 0x490,
    cpl = 0x4CB,
    efer = 0x4D0,
    cr4 = 0x548,
    cr3 = 0x550,
    cr0 = 0x558,
    dr7 = 0x560,
    dr6 = 0x568,
    rflags = 0x570,
    rip = 0x578,
    rsp = 0x5D8,
    s_cet = 0x5E0,
    ssp = 0x5E8,
    isst_addr = 0x5F0,
    rax = 0x5F8,
    star = 0x600,
    lstar = 0x608,
    cstar = 0x610,
    sfmask = 0x618,
    kernel_gs_base = 0x620,
    sysenter_cs = 0x628,
    sysenter_esp = 0x630,
    sysenter_eip = 0x638,
    cr2 = 0x640,
    g_pat = 0x668,
    dbgctl = 0x670,
    br_from = 0x678,
    br_to = 0x680,
    last_excp_from = 0x688,
    last_excp_to = 0x690,
    spec_ctrl = 0x6E0,
);

impl Vmcb {
    /// An all-zero VMCB (every reserved field must be zero, APM Appendix B).
    pub fn zeroed() -> Self {
        // SAFETY: `Vmcb` is `repr(C)` plain integers and integer arrays; all-zero bytes are a
        // valid value of each.
        unsafe { core::mem::zeroed() }
    }
}

/// EFER.SVME (bit 12): SVM enabled. Also required in the *guest's* EFER in the VMCB: VMRUN
/// fails its consistency checks with VMEXIT_INVALID when it is clear (APM 15.5.1).
pub const EFER_SVME: u64 = 1 << 12;

/// The power-on value of PAT (APM Vol. 2 7.8.2; the same as Intel's), the guest's G_PAT at
/// reset.
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;

/// NP_ENABLE (VMCB 0x090) bit 0: nested paging (APM 15.25.3).
pub const NP_ENABLE: u64 = 1 << 0;

/// Interrupt shadow field (VMCB 0x068, APM 15.21.5).
pub mod interrupt_shadow {
    /// The guest is in an interrupt shadow (after STI or MOV SS).
    pub const SHADOW: u64 = 1 << 0;
    /// The guest's RFLAGS.IF at #VMEXIT (read-only for the host).
    pub const GUEST_INTERRUPT_MASK: u64 = 1 << 1;
}

/// TLB_CONTROL values (VMCB 0x05C, APM 15.16.1).
pub mod tlb_control {
    /// Flush nothing.
    pub const DO_NOTHING: u8 = 0;
    /// Flush the entire TLB, all ASIDs (host included).
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID (needs FlushByAsid, CPUID 0x8000_000A EDX[6]).
    pub const FLUSH_GUEST: u8 = 3;
    /// Flush this guest's non-global entries (needs FlushByAsid).
    pub const FLUSH_GUEST_NON_GLOBAL: u8 = 7;
}

/// V_INTR fields (VMCB 0x060, APM 15.21.1, Table B-1).
pub mod v_intr {
    /// Bits 7:0: the virtual TPR.
    pub const V_TPR_MASK: u64 = 0xFF;
    /// A virtual interrupt is pending.
    pub const V_IRQ: u64 = 1 << 8;
    /// Bits 19:16: the virtual interrupt's priority.
    pub const V_INTR_PRIO_SHIFT: u32 = 16;
    /// Ignore the virtual TPR for the pending virtual interrupt.
    pub const V_IGN_TPR: u64 = 1 << 20;
    /// Virtualize masking: the guest's RFLAGS.IF and TPR control only virtual interrupts,
    /// the host's RFLAGS.IF physical ones.
    pub const V_INTR_MASKING: u64 = 1 << 24;
    /// Bits 39:32: the virtual interrupt's vector.
    pub const V_INTR_VECTOR_SHIFT: u32 = 32;
}

/// VMCB clean bits (VMCB 0x0C0, APM 15.15.3): a set bit tells the CPU that the fields of that
/// group are unchanged since the last VMRUN with this VMCB on this CPU. Clear them all
/// (write 0) whenever in doubt.
pub mod clean {
    /// Intercept vectors, TSC offset, pause filter.
    pub const INTERCEPTS: u32 = 1 << 0;
    /// IOPM_BASE, MSRPM_BASE.
    pub const IOPM: u32 = 1 << 1;
    /// ASID.
    pub const ASID: u32 = 1 << 2;
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub const TPR: u32 = 1 << 3;
    /// NP_ENABLE, N_CR3, G_PAT.
    pub const NP: u32 = 1 << 4;
    /// CR0, CR3, CR4, EFER.
    pub const CRX: u32 = 1 << 5;
    /// DR6, DR7.
    pub const DRX: u32 = 1 << 6;
    /// GDTR, IDTR.
    pub const DT: u32 = 1 << 7;
    /// ES, CS, SS, DS, CPL.
    pub const SEG: u32 = 1 << 8;
    /// CR2.
    pub const CR2: u32 = 1 << 9;
    /// DBGCTL, BR_FROM, BR_TO, LASTEXCP_FROM, LASTEXCP_TO.
    pub const LBR: u32 = 1 << 10;
    /// AVIC fields.
    pub const AVIC: u32 = 1 << 11;
}

/// Intercept bits (APM Table B-1, 15.7-15.13).
pub mod intercept {
    /// Bit in the CR intercept word (0x000) for reads of CRn.
    pub const fn cr_read(n: u32) -> u32 {
        1 << n
    }
    /// Bit in the CR intercept word (0x000) for writes of CRn.
    pub const fn cr_write(n: u32) -> u32 {
        1 << (16 + n)
    }
    /// Bit in the DR intercept word (0x004) for reads of DRn.
    pub const fn dr_read(n: u32) -> u32 {
        1 << n
    }
    /// Bit in the DR intercept word (0x004) for writes of DRn.
    pub const fn dr_write(n: u32) -> u32 {
        1 << (16 + n)
    }
    /// Bit in the exception intercept word (0x008) for exception vector `v`.
    pub const fn exception(v: u8) -> u32 {
        1 << v
    }

    /// The first miscellaneous intercept word (VMCB 0x00C).
    pub mod misc1 {
        pub const INTR: u32 = 1 << 0;
        pub const NMI: u32 = 1 << 1;
        pub const SMI: u32 = 1 << 2;
        pub const INIT: u32 = 1 << 3;
        pub const VINTR: u32 = 1 << 4;
        /// Writes of CR0 that change bits other than CR0.TS or CR0.MP.
        pub const CR0_SEL_WRITE: u32 = 1 << 5;
        pub const IDTR_READ: u32 = 1 << 6;
        pub const GDTR_READ: u32 = 1 << 7;
        pub const LDTR_READ: u32 = 1 << 8;
        pub const TR_READ: u32 = 1 << 9;
        pub const IDTR_WRITE: u32 = 1 << 10;
        pub const GDTR_WRITE: u32 = 1 << 11;
        pub const LDTR_WRITE: u32 = 1 << 12;
        pub const TR_WRITE: u32 = 1 << 13;
        pub const RDTSC: u32 = 1 << 14;
        pub const RDPMC: u32 = 1 << 15;
        pub const PUSHF: u32 = 1 << 16;
        pub const POPF: u32 = 1 << 17;
        pub const CPUID: u32 = 1 << 18;
        pub const RSM: u32 = 1 << 19;
        pub const IRET: u32 = 1 << 20;
        /// Software interrupts (INTn).
        pub const INTN: u32 = 1 << 21;
        pub const INVD: u32 = 1 << 22;
        pub const PAUSE: u32 = 1 << 23;
        pub const HLT: u32 = 1 << 24;
        pub const INVLPG: u32 = 1 << 25;
        pub const INVLPGA: u32 = 1 << 26;
        /// IN/OUT/INS/OUTS are checked against the I/O permission map.
        pub const IOIO_PROT: u32 = 1 << 27;
        /// RDMSR/WRMSR are checked against the MSR permission map.
        pub const MSR_PROT: u32 = 1 << 28;
        pub const TASK_SWITCH: u32 = 1 << 29;
        /// The processor entering a frozen state on FERR (legacy FPU error handling).
        pub const FERR_FREEZE: u32 = 1 << 30;
        /// Shutdown (a triple fault).
        pub const SHUTDOWN: u32 = 1 << 31;
    }

    /// The second miscellaneous intercept word (VMCB 0x010).
    pub mod misc2 {
        /// Must be set: VMRUN fails its consistency checks otherwise (APM 15.5.1).
        pub const VMRUN: u32 = 1 << 0;
        pub const VMMCALL: u32 = 1 << 1;
        pub const VMLOAD: u32 = 1 << 2;
        pub const VMSAVE: u32 = 1 << 3;
        pub const STGI: u32 = 1 << 4;
        pub const CLGI: u32 = 1 << 5;
        pub const SKINIT: u32 = 1 << 6;
        pub const RDTSCP: u32 = 1 << 7;
        pub const ICEBP: u32 = 1 << 8;
        /// WBINVD and WBNOINVD.
        pub const WBINVD: u32 = 1 << 9;
        /// MONITOR and MONITORX.
        pub const MONITOR: u32 = 1 << 10;
        /// MWAIT and MWAITX, unconditionally.
        pub const MWAIT: u32 = 1 << 11;
        /// MWAIT and MWAITX, only when the monitor hardware is armed.
        pub const MWAIT_CONDITIONAL: u32 = 1 << 12;
        pub const XSETBV: u32 = 1 << 13;
        pub const RDPRU: u32 = 1 << 14;
        /// EFER writes, as a trap after the write completed.
        pub const EFER_WRITE_TRAP: u32 = 1 << 15;
        /// CRn writes as a trap (bits 31:16).
        pub const fn cr_write_trap(n: u32) -> u32 {
            1 << (16 + n)
        }
    }

    /// The third miscellaneous intercept word (VMCB 0x014).
    pub mod misc3 {
        pub const INVLPGB: u32 = 1 << 0;
        pub const INVLPGB_ILLEGAL: u32 = 1 << 1;
        pub const INVPCID: u32 = 1 << 2;
        pub const MCOMMIT: u32 = 1 << 3;
        pub const TLBSYNC: u32 = 1 << 4;
    }
}

/// #VMEXIT codes (VMCB EXITCODE, APM Appendix C, Table C-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmExitCode {
    /// 0x00-0x0F: read of CRn.
    CrRead(u8),
    /// 0x10-0x1F: write of CRn.
    CrWrite(u8),
    /// 0x20-0x2F: read of DRn.
    DrRead(u8),
    /// 0x30-0x3F: write of DRn.
    DrWrite(u8),
    /// 0x40-0x5F: exception vector n.
    Exception(u8),
    Intr,
    Nmi,
    Smi,
    Init,
    Vintr,
    Cr0SelWrite,
    IdtrRead,
    GdtrRead,
    LdtrRead,
    TrRead,
    IdtrWrite,
    GdtrWrite,
    LdtrWrite,
    TrWrite,
    Rdtsc,
    Rdpmc,
    Pushf,
    Popf,
    Cpuid,
    Rsm,
    Iret,
    /// INTn.
    Swint,
    Invd,
    Pause,
    Hlt,
    Invlpg,
    Invlpga,
    /// IN/OUT/INS/OUTS ([`IoioInfo`]).
    Ioio,
    /// RDMSR (EXITINFO1 = 0) or WRMSR (EXITINFO1 = 1).
    Msr,
    TaskSwitch,
    FerrFreeze,
    Shutdown,
    Vmrun,
    Vmmcall,
    Vmload,
    Vmsave,
    Stgi,
    Clgi,
    Skinit,
    Rdtscp,
    Icebp,
    Wbinvd,
    Monitor,
    Mwait,
    MwaitConditional,
    Xsetbv,
    Rdpru,
    EferWriteTrap,
    /// 0x90-0x9F: trap after a write of CRn.
    CrWriteTrap(u8),
    Invlpgb,
    InvlpgbIllegal,
    Invpcid,
    Mcommit,
    Tlbsync,
    /// 0x400: nested page fault ([`NpfInfo`]; EXITINFO2 = the guest-physical address).
    Npf,
    AvicIncompleteIpi,
    AvicNoAccel,
    Vmgexit,
    /// -1: VMRUN found invalid guest state (APM 15.5.1).
    Invalid,
    /// A code this table does not name.
    Unknown(u64),
}

/// The named codes in order from 0x60 (APM Table C-1).
const FROM_0X60: [SvmExitCode; 0x45] = {
    use SvmExitCode::*;
    [
        Intr,
        Nmi,
        Smi,
        Init,
        Vintr,
        Cr0SelWrite,
        IdtrRead,
        GdtrRead,
        LdtrRead,
        TrRead,
        IdtrWrite,
        GdtrWrite,
        LdtrWrite,
        TrWrite,
        Rdtsc,
        Rdpmc,
        Pushf,
        Popf,
        Cpuid,
        Rsm,
        Iret,
        Swint,
        Invd,
        Pause,
        Hlt,
        Invlpg,
        Invlpga,
        Ioio,
        Msr,
        TaskSwitch,
        FerrFreeze,
        Shutdown,
        Vmrun,
        Vmmcall,
        Vmload,
        Vmsave,
        Stgi,
        Clgi,
        Skinit,
        Rdtscp,
        Icebp,
        Wbinvd,
        Monitor,
        Mwait,
        MwaitConditional,
        Xsetbv,
        Rdpru,
        EferWriteTrap,
        // 0x90-0x9F are CrWriteTrap, decoded separately; placeholders keep the indices.
        CrWriteTrap(0),
        CrWriteTrap(1),
        CrWriteTrap(2),
        CrWriteTrap(3),
        CrWriteTrap(4),
        CrWriteTrap(5),
        CrWriteTrap(6),
        CrWriteTrap(7),
        CrWriteTrap(8),
        CrWriteTrap(9),
        CrWriteTrap(10),
        CrWriteTrap(11),
        CrWriteTrap(12),
        CrWriteTrap(13),
        CrWriteTrap(14),
        CrWriteTrap(15),
        Invlpgb,
        InvlpgbIllegal,
        Invpcid,
        Mcommit,
        Tlbsync,
    ]
};

impl SvmExitCode {
    /// VMEXIT_INVALID.
    pub const INVALID: u64 = u64::MAX;
    /// VMEXIT_NPF.
    pub const NPF: u64 = 0x400;

    /// Names the raw EXITCODE.
    pub fn from_raw(code: u64) -> Self {
        let low = (code & 0xF) as u8;
        match code {
            0x00..=0x0F => Self::CrRead(low),
            0x10..=0x1F => Self::CrWrite(low),
            0x20..=0x2F => Self::DrRead(low),
            0x30..=0x3F => Self::DrWrite(low),
            0x40..=0x5F => Self::Exception((code - 0x40) as u8),
            0x60..=0xA4 => FROM_0X60[(code - 0x60) as usize],
            0x400 => Self::Npf,
            0x401 => Self::AvicIncompleteIpi,
            0x402 => Self::AvicNoAccel,
            0x403 => Self::Vmgexit,
            Self::INVALID => Self::Invalid,
            other => Self::Unknown(other),
        }
    }

    /// The raw EXITCODE.
    pub fn to_raw(self) -> u64 {
        match self {
            Self::CrRead(n) => u64::from(n & 0xF),
            Self::CrWrite(n) => 0x10 + u64::from(n & 0xF),
            Self::DrRead(n) => 0x20 + u64::from(n & 0xF),
            Self::DrWrite(n) => 0x30 + u64::from(n & 0xF),
            Self::Exception(v) => 0x40 + u64::from(v & 0x1F),
            Self::CrWriteTrap(n) => 0x90 + u64::from(n & 0xF),
            Self::Npf => Self::NPF,
            Self::AvicIncompleteIpi => 0x401,
            Self::AvicNoAccel => 0x402,
            Self::Vmgexit => 0x403,
            Self::Invalid => Self::INVALID,
            Self::Unknown(code) => code,
            named => {
                let index = FROM_0X60.iter().position(|&c| c == named).unwrap_or(0);
                0x60 + index as u64
            }
        }
    }
}

/// Event types of EVENTINJ and EXITINTINFO (APM 15.20).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventType {
    /// External or virtual interrupt.
    Interrupt = 0,
    Nmi = 2,
    /// Exception (fault or trap).
    Exception = 3,
    /// Software interrupt (INTn).
    SoftwareInterrupt = 4,
}

/// An event to inject at VMRUN (VMCB EVENTINJ, APM 15.20): vector in bits 7:0, type in 10:8,
/// error code valid in bit 11, valid in bit 31, error code in 63:32. EXITINTINFO has the same
/// format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventInjection(pub u64);

impl EventInjection {
    const VALID: u64 = 1 << 31;
    const ERROR_CODE_VALID: u64 = 1 << 11;

    /// A valid event of `kind` with `vector`, without an error code.
    pub const fn new(kind: EventType, vector: u8) -> Self {
        Self(vector as u64 | ((kind as u64) << 8) | Self::VALID)
    }

    /// External interrupt `vector`.
    pub const fn interrupt(vector: u8) -> Self {
        Self::new(EventType::Interrupt, vector)
    }

    /// An NMI (the CPU ignores the vector; 2 by convention).
    pub const fn nmi() -> Self {
        Self::new(EventType::Nmi, 2)
    }

    /// Exception `vector` (e.g. #UD 6), without an error code.
    pub const fn exception(vector: u8) -> Self {
        Self::new(EventType::Exception, vector)
    }

    /// The same event with `code` as its error code (#DF, #TS, #NP, #SS, #GP, #PF, #AC).
    pub const fn with_error_code(self, code: u32) -> Self {
        Self((self.0 & 0xFFFF_FFFF) | Self::ERROR_CODE_VALID | ((code as u64) << 32))
    }

    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    /// The type field; `None` for the reserved encodings.
    pub const fn kind(self) -> Option<EventType> {
        match (self.0 >> 8) & 0b111 {
            0 => Some(EventType::Interrupt),
            2 => Some(EventType::Nmi),
            3 => Some(EventType::Exception),
            4 => Some(EventType::SoftwareInterrupt),
            _ => None,
        }
    }

    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    pub const fn error_code(self) -> Option<u32> {
        if self.0 & Self::ERROR_CODE_VALID != 0 {
            Some((self.0 >> 32) as u32)
        } else {
            None
        }
    }
}

/// EXITINFO1 of an IOIO intercept (APM 15.10.2, Figure 15-2). EXITINFO2 holds the RIP of the
/// instruction after the IN/OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoioInfo {
    pub port: u16,
    /// IN/INS (bit 0 set) rather than OUT/OUTS.
    pub input: bool,
    /// INS/OUTS (bit 2).
    pub string: bool,
    /// REP prefix (bit 3).
    pub rep: bool,
    /// Operand size in bytes (one-hot bits 6:4: 1, 2 or 4).
    pub size: u8,
    /// Address size in bits (one-hot bits 9:7: 16, 32 or 64).
    pub address_bits: u8,
    /// Segment of a string instruction (bits 12:10; 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS).
    pub segment: u8,
}

impl IoioInfo {
    /// Decodes EXITINFO1; `None` when the size or address-size field is not one-hot.
    pub fn decode(info1: u64) -> Option<Self> {
        let size = match (info1 >> 4) & 0b111 {
            0b001 => 1,
            0b010 => 2,
            0b100 => 4,
            _ => return None,
        };
        let address_bits = match (info1 >> 7) & 0b111 {
            0b001 => 16,
            0b010 => 32,
            0b100 => 64,
            // Not a string instruction: the CPU still reports the address size, but be
            // lenient for plain IN/OUT.
            0 if info1 & (1 << 2) == 0 => 0,
            _ => return None,
        };
        Some(Self {
            port: (info1 >> 16) as u16,
            input: info1 & 1 != 0,
            string: info1 & (1 << 2) != 0,
            rep: info1 & (1 << 3) != 0,
            size,
            address_bits,
            segment: ((info1 >> 10) & 0b111) as u8,
        })
    }
}

/// EXITINFO1 of a nested page fault (APM 15.25.6): the #PF error code in the low bits plus
/// where in the walk the fault happened. EXITINFO2 holds the faulting guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NpfInfo(pub u64);

impl NpfInfo {
    /// The nested page was present (a protection fault) rather than not present.
    pub const fn present(self) -> bool {
        self.0 & 1 != 0
    }
    /// A write access.
    pub const fn write(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// A user access (every nested walk is one, APM 15.25.5).
    pub const fn user(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// A reserved bit was set in a nested page-table entry.
    pub const fn reserved_bit(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// An instruction fetch.
    pub const fn fetch(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// The fault happened translating the guest's final physical address.
    pub const fn final_translation(self) -> bool {
        self.0 & (1 << 32) != 0
    }
    /// The fault happened translating a guest page-table access (the guest's own walk).
    pub const fn page_table_walk(self) -> bool {
        self.0 & (1 << 33) != 0
    }
}

/// VMX segment access rights (SDM Vol. 3C 25.4.1, Table 25-2: descriptor bits 47:40 in 7:0,
/// 55:52 in 15:12, "unusable" in bit 16) to the VMCB's packed attributes (APM 15.5.1,
/// Table B-2: bits 47:40 in 7:0 and 55:52 in 11:8). An unusable VMX segment becomes an
/// attribute with P (bit 7) clear, which is how SVM holds a null segment.
pub const fn vmx_to_svm_attrib(access_rights: u32) -> u16 {
    const UNUSABLE: u32 = 1 << 16;
    let attrib = (access_rights & 0xFF) | ((access_rights >> 4) & 0xF00);
    if access_rights & UNUSABLE != 0 {
        (attrib & !0x80) as u16
    } else {
        attrib as u16
    }
}

/// The VMCB's packed attributes back to VMX access rights; an attribute with P clear is
/// reported unusable (bit 16), as VMX would hold a null segment.
pub const fn svm_to_vmx_access_rights(attrib: u16) -> u32 {
    let attrib = attrib as u32;
    let rights = (attrib & 0xFF) | ((attrib & 0xF00) << 4);
    if attrib & 0x80 == 0 {
        rights | (1 << 16)
    } else {
        rights
    }
}

/// Segment attributes of the reset state (APM Vol. 2 14.1.3, Table 14-1; packed format).
pub mod attrib {
    /// Present, code, execute/read, accessed.
    pub const REAL_MODE_CODE: u16 = 0x9B;
    /// Present, data, read/write, accessed.
    pub const REAL_MODE_DATA: u16 = 0x93;
    /// Present, LDT.
    pub const LDT: u16 = 0x82;
    /// Present, busy 32-bit TSS (VMRUN accepts a busy 16- or 32-bit TSS in TR).
    pub const TSS_BUSY_32: u16 = 0x8B;
}

/// Which reset a real-mode start models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RealModeStart {
    /// The boot CPU entering Ally's real-mode boot stub, as the BIOS hands over to the MBR:
    /// caches on (CR0 = 0x10).
    Boot,
    /// An application processor started by INIT then SIPI: caches off (CR0.CD and CR0.NW
    /// set, CR0 = 0x6000_0010).
    AfterInit,
}

impl StateSaveArea {
    /// Writes the architectural state after INIT (APM Vol. 2 14.1.3, Table 14-1) with
    /// execution starting at `segment:0` in real mode: CS selector `segment`, base
    /// `segment << 4`; the other data segments 0 with limit 0xFFFF; GDTR limit 0xFFFF, IDTR
    /// limit 0x3FF; RFLAGS 2; DR6 0xFFFF_0FF0, DR7 0x400; G_PAT at its power-on value.
    ///
    /// EFER is SVME only: VMRUN refuses a guest EFER with SVME clear (APM 15.5.1,
    /// consistency checks), so the guest's EFER always carries it and Ally intercepts EFER
    /// reads and writes to hide it (see `crate::msr::SVM_INTERCEPTED`).
    ///
    /// Leaves RAX 0; the guest's other GPRs are the caller's (`GuestRegisters`).
    pub fn real_mode_reset(&mut self, segment: u16, start: RealModeStart) {
        let data = Segment {
            selector: 0,
            attrib: attrib::REAL_MODE_DATA,
            limit: 0xFFFF,
            base: 0,
        };
        self.cs = Segment {
            selector: segment,
            attrib: attrib::REAL_MODE_CODE,
            limit: 0xFFFF,
            base: u64::from(segment) << 4,
        };
        self.ds = data;
        self.es = data;
        self.fs = data;
        self.gs = data;
        self.ss = data;
        self.gdtr = Segment {
            limit: 0xFFFF,
            ..Segment::default()
        };
        self.idtr = Segment {
            limit: 0x3FF,
            ..Segment::default()
        };
        self.ldtr = Segment {
            attrib: attrib::LDT,
            limit: 0xFFFF,
            ..Segment::default()
        };
        self.tr = Segment {
            attrib: attrib::TSS_BUSY_32,
            limit: 0xFFFF,
            ..Segment::default()
        };
        self.cpl = 0;
        self.efer = EFER_SVME;
        self.cr0 = match start {
            RealModeStart::Boot => 0x10,
            RealModeStart::AfterInit => 0x6000_0010,
        };
        self.cr2 = 0;
        self.cr3 = 0;
        self.cr4 = 0;
        self.dr6 = 0xFFFF_0FF0;
        self.dr7 = 0x400;
        self.rflags = 0x2;
        self.rip = 0;
        self.rsp = 0;
        self.rax = 0;
        self.star = 0;
        self.lstar = 0;
        self.cstar = 0;
        self.sfmask = 0;
        self.kernel_gs_base = 0;
        self.sysenter_cs = 0;
        self.sysenter_esp = 0;
        self.sysenter_eip = 0;
        self.g_pat = PAT_POWER_ON;
        self.dbgctl = 0;
        self.s_cet = 0;
        self.ssp = 0;
        self.isst_addr = 0;
        self.spec_ctrl = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip() {
        for code in (0..0x100u64).chain(0x3F0..0x410).chain([u64::MAX, 1 << 40]) {
            assert_eq!(SvmExitCode::from_raw(code).to_raw(), code, "{code:#x}");
        }
        use SvmExitCode::*;
        for (code, name) in [
            (0x00, CrRead(0)),
            (0x13, CrWrite(3)),
            (0x27, DrRead(7)),
            (0x3F, DrWrite(15)),
            (0x4E, Exception(14)),
            (0x5F, Exception(31)),
            (0x60, Intr),
            (0x61, Nmi),
            (0x62, Smi),
            (0x63, Init),
            (0x64, Vintr),
            (0x65, Cr0SelWrite),
            (0x72, Cpuid),
            (0x73, Rsm),
            (0x74, Iret),
            (0x75, Swint),
            (0x76, Invd),
            (0x77, Pause),
            (0x78, Hlt),
            (0x79, Invlpg),
            (0x7A, Invlpga),
            (0x7B, Ioio),
            (0x7C, Msr),
            (0x7D, TaskSwitch),
            (0x7E, FerrFreeze),
            (0x7F, Shutdown),
            (0x80, Vmrun),
            (0x81, Vmmcall),
            (0x82, Vmload),
            (0x83, Vmsave),
            (0x84, Stgi),
            (0x85, Clgi),
            (0x86, Skinit),
            (0x87, Rdtscp),
            (0x88, Icebp),
            (0x89, Wbinvd),
            (0x8A, Monitor),
            (0x8B, Mwait),
            (0x8C, MwaitConditional),
            (0x8D, Xsetbv),
            (0x8E, Rdpru),
            (0x8F, EferWriteTrap),
            (0x90, CrWriteTrap(0)),
            (0x9F, CrWriteTrap(15)),
            (0xA0, Invlpgb),
            (0xA4, Tlbsync),
            (0xA5, Unknown(0xA5)),
            (0x400, Npf),
            (0x401, AvicIncompleteIpi),
            (0x402, AvicNoAccel),
            (0x403, Vmgexit),
            (u64::MAX, Invalid),
        ] {
            assert_eq!(SvmExitCode::from_raw(code), name, "{code:#x}");
        }
    }

    #[test]
    fn event_injection_encoding() {
        // #GP(0x18): vector 13, type 3, EV, V, error code in 63:32.
        let gp = EventInjection::exception(13).with_error_code(0x18);
        assert_eq!(gp.0, 0x0000_0018_0000_0B0D | (1 << 31));
        assert_eq!(gp.vector(), 13);
        assert_eq!(gp.kind(), Some(EventType::Exception));
        assert_eq!(gp.error_code(), Some(0x18));
        assert!(gp.is_valid());
        assert_eq!(EventInjection::interrupt(0x30).0, 0x8000_0030);
        assert_eq!(EventInjection::interrupt(0x30).error_code(), None);
        assert_eq!(EventInjection::nmi().0, 0x8000_0202);
        assert_eq!(
            EventInjection::new(EventType::SoftwareInterrupt, 0x80).0,
            0x8000_0480
        );
        assert_eq!(EventInjection(0x100).kind(), None, "type 1 is reserved");
        assert!(!EventInjection(0).is_valid());
    }

    #[test]
    fn segment_attributes_convert_both_ways() {
        // 64-bit code: type 0xB, S, P, L, G.
        assert_eq!(vmx_to_svm_attrib(0xA09B), 0xA9B);
        assert_eq!(svm_to_vmx_access_rights(0xA9B), 0xA09B);
        // 32-bit flat data with AVL, D/B and G.
        assert_eq!(vmx_to_svm_attrib(0xD093), 0xD93);
        assert_eq!(svm_to_vmx_access_rights(0xD93), 0xD093);
        // Real-mode attributes and the TSS are unchanged by the packing.
        for a in [0x9B, 0x93, 0x8B, 0x82] {
            assert_eq!(vmx_to_svm_attrib(a), a as u16);
            assert_eq!(svm_to_vmx_access_rights(a as u16), a);
        }
        // Unusable <-> not present.
        assert_eq!(vmx_to_svm_attrib(0x1_0000), 0);
        assert_eq!(vmx_to_svm_attrib(0x1_C093) & 0x80, 0);
        assert_eq!(svm_to_vmx_access_rights(0), 0x1_0000);
        // Every usable VMX value with reserved bits 11:8 clear survives the round trip.
        for ar in 0..0x1_0000u32 {
            if ar & 0xF00 == 0 && ar & 0x80 != 0 {
                assert_eq!(svm_to_vmx_access_rights(vmx_to_svm_attrib(ar)), ar);
            }
        }
    }

    #[test]
    fn ioio_exit_info() {
        // OUT DX, AL to 0x3F8: port, 8-bit, 16-bit... address size reported 64.
        let out = IoioInfo::decode(0x03F8_0000 | (1 << 4) | (1 << 9)).unwrap();
        assert_eq!(
            out,
            IoioInfo {
                port: 0x3F8,
                input: false,
                string: false,
                rep: false,
                size: 1,
                address_bits: 64,
                segment: 0
            }
        );
        // REP INSW from port 0x1F0, 32-bit addressing, ES.
        let ins =
            IoioInfo::decode(0x01F0_0000 | 1 | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 8)).unwrap();
        assert!(ins.input && ins.string && ins.rep);
        assert_eq!((ins.port, ins.size, ins.address_bits), (0x1F0, 2, 32));
        // OUTSD with a DS override... segment field 3; IN EAX from 0xCFC.
        let outs = IoioInfo::decode((1 << 2) | (1 << 6) | (1 << 7) | (3 << 10)).unwrap();
        assert_eq!((outs.segment, outs.size, outs.address_bits), (3, 4, 16));
        assert_eq!(
            IoioInfo::decode(0x0CFC_0000 | 1 | (1 << 6)).unwrap().size,
            4
        );
        // Not one-hot.
        assert_eq!(IoioInfo::decode(0), None);
        assert_eq!(IoioInfo::decode(0b11 << 4), None);
        assert_eq!(IoioInfo::decode((1 << 2) | (1 << 4)), None);
    }

    #[test]
    fn npf_exit_info() {
        let write_not_present = NpfInfo((1 << 32) | (1 << 1) | (1 << 2));
        assert!(!write_not_present.present());
        assert!(write_not_present.write() && write_not_present.user());
        assert!(write_not_present.final_translation());
        assert!(!write_not_present.page_table_walk());
        let walk = NpfInfo((1 << 33) | 1 | (1 << 2));
        assert!(walk.present() && walk.page_table_walk() && !walk.final_translation());
        assert!(!walk.write() && !walk.fetch() && !walk.reserved_bit());
        let fetch_rsvd = NpfInfo((1 << 4) | (1 << 3) | 1);
        assert!(fetch_rsvd.fetch() && fetch_rsvd.reserved_bit());
    }

    #[test]
    fn real_mode_reset_state() {
        let mut vmcb = Box::new(Vmcb::zeroed());
        vmcb.save.rip = 0x1234;
        vmcb.save.real_mode_reset(0x9A00, RealModeStart::AfterInit);
        let s = &vmcb.save;
        assert_eq!(
            s.cs,
            Segment {
                selector: 0x9A00,
                attrib: 0x9B,
                limit: 0xFFFF,
                base: 0x9_A000
            }
        );
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.selector, seg.attrib, seg.limit, seg.base),
                (0, 0x93, 0xFFFF, 0)
            );
        }
        assert_eq!((s.gdtr.limit, s.idtr.limit), (0xFFFF, 0x3FF));
        assert_eq!((s.tr.attrib, s.ldtr.attrib), (0x8B, 0x82));
        assert_eq!(s.cr0, 0x6000_0010);
        assert_eq!(s.efer, EFER_SVME);
        assert_eq!((s.rflags, s.rip, s.dr7), (2, 0, 0x400));
        assert_eq!(s.g_pat, 0x0007_0406_0007_0406);
        vmcb.save.real_mode_reset(0x1000, RealModeStart::Boot);
        assert_eq!(vmcb.save.cr0, 0x10);
        // The control area is untouched, and the bytes land at the APM's offsets.
        assert_eq!(vmcb.control, Vmcb::zeroed().control);
        // SAFETY: `Vmcb` is 4096 bytes of plain integers.
        let bytes: &[u8; 4096] = unsafe { &*(&*vmcb as *const Vmcb as *const [u8; 4096]) };
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(0x4D0), 1 << 12, "EFER");
        assert_eq!(u64_at(0x558), 0x10, "CR0");
        assert_eq!(u64_at(0x668), PAT_POWER_ON, "G_PAT");
        assert_eq!(u16::from_le_bytes([bytes[0x410], bytes[0x411]]), 0x1000);
        assert_eq!(u64_at(0x418), 0x1_0000, "CS base");
    }

    #[test]
    fn intercept_bits() {
        assert_eq!(intercept::cr_write(0), 1 << 16);
        assert_eq!(intercept::cr_read(8), 1 << 8);
        assert_eq!(intercept::dr_write(7), 1 << 23);
        assert_eq!(intercept::exception(18), 1 << 18);
        assert_eq!(intercept::misc1::CPUID, 1 << 18);
        assert_eq!(intercept::misc1::IOIO_PROT, 1 << 27);
        assert_eq!(intercept::misc1::MSR_PROT, 1 << 28);
        assert_eq!(intercept::misc1::SHUTDOWN, 1 << 31);
        assert_eq!(intercept::misc2::VMRUN, 1);
        assert_eq!(intercept::misc2::XSETBV, 1 << 13);
        assert_eq!(intercept::misc2::cr_write_trap(4), 1 << 20);
    }
}
