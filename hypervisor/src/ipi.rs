//! Keeping the guest's inter-processor interrupts and device interrupts away from the DPI
//! cores.
//!
//! Every ICR write of an OS core (xAPIC MMIO offset 0x300, or x2APIC MSR 0x830) comes here
//! before it reaches the hardware. IPIs that reach OS cores only pass unchanged; one that
//! could reach a DPI core — by physical ID, by logical destination, by a broadcast ID or by a
//! shorthand — is dropped for that core and counted, and sent instead as physical unicasts to
//! the OS cores the guest addressed (one of them for lowest priority). ICR layout: SDM Vol. 3A
//! 12.6.1 (Figure 12-12) and 12.12.9 (x2APIC); destinations 12.6.2 and 12.12.10.

use core::fmt;

/// Destination shorthand (ICR bits 19:18).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// Delivery mode (ICR bits 10:8), for counting.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    Startup,
    Reserved,
}

impl DeliveryMode {
    pub const fn from_icr(low: u32) -> Self {
        match (low >> 8) & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::Startup,
            _ => Self::Reserved,
        }
    }

    /// Index for per-mode counters.
    pub const fn index(self) -> usize {
        self as usize
    }

    pub const ALL: [DeliveryMode; 7] = [
        Self::Fixed,
        Self::LowestPriority,
        Self::Smi,
        Self::Nmi,
        Self::Init,
        Self::Startup,
        Self::Reserved,
    ];
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fixed => "fixed",
            Self::LowestPriority => "lowest-priority",
            Self::Smi => "smi",
            Self::Nmi => "nmi",
            Self::Init => "init",
            Self::Startup => "sipi",
            Self::Reserved => "reserved",
        })
    }
}

/// Which APIC mode the guest programs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ApicMode {
    /// xAPIC: 8-bit destination in ICR high bits 31:24; logical = flat/cluster MDA.
    XApic,
    /// x2APIC: 32-bit destination; logical IDs are (cluster << 16) | (1 << (id & 15)).
    X2Apic,
}

/// The machine's CPU partition as the filter needs it.
#[derive(Clone, Copy, Debug)]
pub struct CpuSets<'a> {
    pub os_cores: &'a [u32],
    pub dpi_cores: &'a [u32],
}

/// What to do with one ICR write.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum IpiAction {
    /// Write the ICR as the guest wrote it: it reaches OS cores only.
    Forward,
    /// Send nothing: it addresses DPI cores only, names no OS core, or has a reserved
    /// delivery mode. `dropped`: the DPI cores it could reach, at least 1.
    Drop { dropped: usize },
    /// It could reach a DPI core as well as OS cores: send it instead as physical unicasts,
    /// without shorthand, to each OS core the guest addressed ([`rewritten_targets`]).
    /// `dropped`: the DPI cores it could have reached.
    Rewrite { dropped: usize },
}

/// The x2APIC logical ID of an x2APIC ID (SDM 12.12.10.2).
pub const fn x2apic_logical_id(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

/// Whether a logical destination (an 8-bit MDA or a 32-bit x2APIC one) may be accepted by the
/// DPI core `id`, whichever APIC mode that core is in.
///
/// A DPI core's APIC mode is the firmware's, not necessarily the guest's (the guest switches
/// its own cores), and the SDM does not define how an APIC in one mode reads a message sent
/// in the other. So every reading counts:
/// - in xAPIC mode the DPI core's LDR is 0 (Ally clears it when the core starts), which no
///   MDA matches in the flat or the cluster model; only the broadcast MDA 0xFF reaches it
///   (12.6.2.2), and a 32-bit destination whose low byte is 0xFF may be read as that;
/// - in x2APIC mode its logical ID is fixed by its APIC ID (12.12.10.2): matched by the
///   broadcast 0xFFFF_FFFF and by its cluster with its bit set, an 8-bit MDA read as cluster 0.
fn logical_may_reach(destination: u32, id: u32) -> bool {
    let l = x2apic_logical_id(id);
    destination & 0xFF == 0xFF || (l >> 16 == destination >> 16 && destination & l & 0xFFFF != 0)
}

/// The OS cores a rewritten ICR write goes to: every OS core the guest addressed
/// ([`addresses`], by its guest-programmed logical ID `logical_id(index in os_cores)`), only
/// the first of them for lowest-priority delivery, which asks for one CPU (12.6.2.4).
pub fn rewritten_targets<'a>(
    mode: ApicMode,
    low: u32,
    destination: u32,
    sender: u32,
    cpus: CpuSets<'a>,
    logical_id: impl Fn(usize) -> LogicalId + 'a,
) -> impl Iterator<Item = u32> + 'a {
    let lowest_priority = DeliveryMode::from_icr(low) == DeliveryMode::LowestPriority;
    cpus.os_cores
        .iter()
        .enumerate()
        .filter(move |&(index, &id)| {
            addresses(mode, low, destination, sender, id, logical_id(index))
        })
        .map(|(_, &id)| id)
        .take(if lowest_priority { 1 } else { usize::MAX })
}

/// Decides what an OS core's ICR write `(low, destination)` may do (SDM 12.6.1, 12.6.2,
/// 12.12.9). `destination` is the 8-bit xAPIC destination or the 32-bit x2APIC one.
///
/// - Shorthand self: forwarded (the sender is an OS core). All including or excluding self:
///   rewritten when there are DPI cores.
/// - Physical: the broadcast ID (0xFF, 0xFFFF_FFFF) is rewritten; an OS core's ID is
///   forwarded; anything else — a DPI core, or an ID that names no OS core (an x2APIC
///   destination with bits 31:8 set may alias a DPI core in xAPIC mode) — is dropped.
/// - Logical: rewritten when it may reach a DPI core ([`logical_may_reach`]), else forwarded.
/// - The reserved delivery modes (3, 7) are dropped: no guest needs them.
pub fn filter_ipi(mode: ApicMode, low: u32, destination: u32, cpus: CpuSets<'_>) -> IpiAction {
    let dpi_count = cpus.dpi_cores.len();
    if DeliveryMode::from_icr(low) == DeliveryMode::Reserved {
        return IpiAction::Drop {
            dropped: dpi_count.max(1),
        };
    }
    let shorthand = match (low >> 18) & 3 {
        0 => Shorthand::None,
        1 => Shorthand::SelfOnly,
        2 => Shorthand::AllIncludingSelf,
        _ => Shorthand::AllExcludingSelf,
    };
    let broadcast_id = match mode {
        ApicMode::XApic => 0xFF,
        ApicMode::X2Apic => 0xFFFF_FFFF,
    };
    match shorthand {
        Shorthand::SelfOnly => IpiAction::Forward,
        Shorthand::AllIncludingSelf | Shorthand::AllExcludingSelf if dpi_count > 0 => {
            IpiAction::Rewrite { dropped: dpi_count }
        }
        Shorthand::AllIncludingSelf | Shorthand::AllExcludingSelf => IpiAction::Forward,
        Shorthand::None if low & (1 << 11) == 0 => {
            if destination == broadcast_id {
                if dpi_count == 0 {
                    IpiAction::Forward
                } else {
                    IpiAction::Rewrite { dropped: dpi_count }
                }
            } else if cpus.os_cores.contains(&destination) {
                IpiAction::Forward
            } else {
                IpiAction::Drop { dropped: 1 }
            }
        }
        Shorthand::None => {
            let dropped = cpus
                .dpi_cores
                .iter()
                .filter(|&&id| logical_may_reach(destination, id))
                .count();
            if dropped == 0 {
                IpiAction::Forward
            } else {
                IpiAction::Rewrite { dropped }
            }
        }
    }
}

/// How an OS core's local APIC answers logical destinations, as the guest programmed it
/// (xAPIC LDR and DFR; x2APIC logical IDs follow from the APIC ID).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LogicalId {
    /// Logical APIC ID (LDR bits 31:24).
    pub ldr: u8,
    /// DFR model: cluster (`0b0000` in bits 31:28) rather than flat (`0b1111`).
    pub cluster: bool,
}

impl LogicalId {
    /// After reset: LDR 0, DFR flat (SDM 12.6.2.2).
    pub const RESET: Self = Self {
        ldr: 0,
        cluster: false,
    };

    /// From the guest's LDR and DFR register values.
    pub const fn from_registers(ldr: u32, dfr: u32) -> Self {
        Self {
            ldr: (ldr >> 24) as u8,
            cluster: (dfr >> 28) & 0xF == 0,
        }
    }
}

/// Whether the ICR write `(low, destination)` from `sender` addresses the CPU `id` (SDM 12.6.2:
/// shorthands, physical and logical destinations, the broadcast ID). For the INIT and SIPI
/// emulation, which must find the OS cores a guest IPI is meant for.
pub fn addresses(
    mode: ApicMode,
    low: u32,
    destination: u32,
    sender: u32,
    id: u32,
    logical_id: LogicalId,
) -> bool {
    match (low >> 18) & 3 {
        1 => return id == sender,
        2 => return true,
        3 => return id != sender,
        _ => {}
    }
    let logical = low & (1 << 11) != 0;
    match mode {
        ApicMode::XApic => {
            let mda = (destination & 0xFF) as u8;
            if mda == 0xFF {
                return true;
            }
            if !logical {
                return u32::from(mda) == id;
            }
            let ldr = logical_id.ldr;
            if logical_id.cluster {
                mda >> 4 == ldr >> 4 && mda & ldr & 0xF != 0
            } else {
                mda & ldr != 0
            }
        }
        ApicMode::X2Apic => {
            if destination == 0xFFFF_FFFF {
                return true;
            }
            if !logical {
                return destination == id;
            }
            let l = x2apic_logical_id(id);
            destination >> 16 == l >> 16 && destination & l & 0xFFFF != 0
        }
    }
}

/// Where a device interrupt (an I/O APIC redirection entry, 82093AA 3.2.4; or an MSI
/// address, SDM 12.11.1) may go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RouteAction {
    /// The destination reaches OS cores only.
    Keep,
    /// The destination could reach a DPI core (its ID, the broadcast ID, or a logical
    /// destination that may reach one): a device interrupt cannot be split into unicasts, so
    /// it goes to the first OS core instead, physical destination mode.
    Rewrite { destination: u32, dropped: usize },
}

/// Filters a device interrupt's xAPIC destination (`destination` = 8-bit APIC ID or logical
/// MDA) the same way as an IPI: no DPI core may receive it. Physical IDs that name no CPU at
/// all are kept (an 8-bit destination aliases nothing; the interrupt is lost, as on the
/// hardware).
pub fn filter_device_interrupt(logical: bool, destination: u32, cpus: CpuSets<'_>) -> RouteAction {
    let destination = destination & 0xFF;
    let rewrite = |dropped| RouteAction::Rewrite {
        destination: cpus.os_cores.first().copied().unwrap_or(0),
        dropped,
    };
    // The delivery mode does not change who may accept it (lowest priority arbitrates among
    // the CPUs the destination matches); the filter judges the destination as a fixed IPI's.
    let low = if logical { 1 << 11 } else { 0 };
    match filter_ipi(ApicMode::XApic, low, destination, cpus) {
        IpiAction::Forward => RouteAction::Keep,
        IpiAction::Rewrite { dropped } => rewrite(dropped),
        IpiAction::Drop { dropped } if cpus.dpi_cores.contains(&destination) => rewrite(dropped),
        IpiAction::Drop { .. } => RouteAction::Keep,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const OS: [u32; 3] = [0, 1, 2];
    pub(crate) const DPI: [u32; 1] = [3];
    /// Three OS cores (APIC IDs 0-2) and one DPI core (3), for every filter's tests.
    pub(crate) const CPUS: CpuSets<'static> = CpuSets {
        os_cores: &OS,
        dpi_cores: &DPI,
    };
    /// SMT pairs (0,1) (4,5) for the OS, (2,3) (6,7) for the DPI partition.
    const PAIRS: CpuSets<'static> = CpuSets {
        os_cores: &[0, 1, 4, 5],
        dpi_cores: &[2, 3, 6, 7],
    };
    const LOWEST: u32 = 1 << 8;
    const SMI: u32 = 2 << 8;
    const NMI: u32 = 4 << 8;
    const INIT: u32 = (5 << 8) | (1 << 14);
    const SIPI: u32 = (6 << 8) | 0x9A;
    const FIXED: u32 = 0x40;
    const LOGICAL: u32 = 1 << 11;
    const SELF: u32 = 1 << 18;
    const ALL_INCL: u32 = 2 << 18;
    const ALL_EXCL: u32 = 3 << 18;
    const MODES: [u32; 6] = [FIXED, LOWEST | 0x40, SMI, NMI, INIT, SIPI];

    fn x(low: u32, dest: u32) -> IpiAction {
        filter_ipi(ApicMode::XApic, low, dest, CPUS)
    }
    fn x2(low: u32, dest: u32) -> IpiAction {
        filter_ipi(ApicMode::X2Apic, low, dest, CPUS)
    }
    fn targets(mode: ApicMode, low: u32, dest: u32, sender: u32, ids: &[LogicalId]) -> Vec<u32> {
        rewritten_targets(mode, low, dest, sender, CPUS, |i| ids[i]).collect()
    }
    const RESET3: [LogicalId; 3] = [LogicalId::RESET; 3];

    #[test]
    fn ipis_between_os_cores_pass_unchanged() {
        for low in MODES {
            assert_eq!(x(low, 1), IpiAction::Forward);
            assert_eq!(x2(low, 2), IpiAction::Forward);
            assert_eq!(x(low | SELF, 0), IpiAction::Forward);
        }
    }

    #[test]
    fn every_delivery_mode_to_a_dpi_core_is_dropped() {
        for low in MODES {
            assert_eq!(x(low, 3), IpiAction::Drop { dropped: 1 }, "{low:#x}");
            assert_eq!(x2(low, 3), IpiAction::Drop { dropped: 1 }, "{low:#x}");
        }
    }

    #[test]
    fn reserved_delivery_modes_are_dropped() {
        for mode in [3 << 8, 7 << 8] {
            assert_eq!(x(mode | 0x40, 1), IpiAction::Drop { dropped: 1 });
            assert_eq!(x(mode | 0x40 | SELF, 0), IpiAction::Drop { dropped: 1 });
        }
    }

    #[test]
    fn broadcasts_become_unicasts_to_the_os_cores() {
        let rewrite = IpiAction::Rewrite { dropped: 1 };
        for low in MODES {
            assert_eq!(x(low | ALL_EXCL, 0), rewrite);
            assert_eq!(x(low | ALL_INCL, 0), rewrite);
            assert_eq!(x(low, 0xFF), rewrite, "physical 0xFF");
            assert_eq!(x(low | LOGICAL, 0xFF), rewrite, "logical MDA 0xFF");
            assert_eq!(x2(low, 0xFFFF_FFFF), rewrite);
            assert_eq!(x2(low | LOGICAL, 0xFFFF_FFFF), rewrite);
        }
        let t = |low, dest| targets(ApicMode::XApic, low, dest, 1, &RESET3);
        assert_eq!(t(FIXED | ALL_EXCL, 0), [0, 2]);
        assert_eq!(t(FIXED | ALL_INCL, 0), [0, 1, 2]);
        assert_eq!(t(NMI, 0xFF), [0, 1, 2]);
        // Logical 0xFF is a broadcast even to CPUs whose LDR is still 0.
        assert_eq!(t(FIXED | LOGICAL, 0xFF), [0, 1, 2]);
        let t2 = |low, dest| targets(ApicMode::X2Apic, low, dest, 1, &RESET3);
        assert_eq!(t2(FIXED, 0xFFFF_FFFF), [0, 1, 2]);
        assert_eq!(t2(FIXED | LOGICAL, 0xFFFF_FFFF), [0, 1, 2]);
    }

    #[test]
    fn without_dpi_cores_broadcasts_pass() {
        let cpus = CpuSets {
            os_cores: &OS,
            dpi_cores: &[],
        };
        for (low, dest) in [(NMI | ALL_EXCL, 0), (FIXED, 0xFF), (FIXED | LOGICAL, 0xFF)] {
            assert_eq!(
                filter_ipi(ApicMode::XApic, low, dest, cpus),
                IpiAction::Forward
            );
        }
    }

    #[test]
    fn xapic_logical_masks_and_the_dfr_the_guest_chose() {
        // Flat: the guest's LDRs are bits 0-2; the DPI core's LDR is 0. A mask of OS cores
        // passes; one with bit 3 may reach the DPI core if it is in x2APIC mode (cluster 0,
        // bit 3), so it is rewritten to exactly the OS cores the guest meant.
        let flat = [1u32, 2, 4].map(|b| LogicalId::from_registers(b << 24, 0xFFFF_FFFF));
        assert_eq!(x(FIXED | LOGICAL, 0x06), IpiAction::Forward);
        assert_eq!(x(FIXED | LOGICAL, 0x0F), IpiAction::Rewrite { dropped: 1 });
        assert_eq!(
            targets(ApicMode::XApic, FIXED | LOGICAL, 0x0F, 0, &flat),
            [0, 1, 2]
        );
        assert_eq!(
            targets(ApicMode::XApic, FIXED | LOGICAL, 0x0A, 0, &flat),
            [1]
        );
        // The guest switches its cores to the cluster model: the filter's verdict does not
        // depend on the guest's DFR (the DPI core's is Ally's); the targets do.
        let cluster =
            [0x11u32, 0x12, 0x21].map(|l| LogicalId::from_registers(l << 24, 0x0FFF_FFFF));
        assert_eq!(x(FIXED | LOGICAL, 0x06), IpiAction::Forward);
        assert_eq!(
            targets(ApicMode::XApic, FIXED | LOGICAL, 0x0F, 0, &cluster),
            Vec::<u32>::new(),
            "cluster 0 holds no OS core"
        );
        assert_eq!(x(FIXED | LOGICAL, 0x1B), IpiAction::Rewrite { dropped: 1 });
        assert_eq!(
            targets(ApicMode::XApic, FIXED | LOGICAL, 0x1B, 0, &cluster),
            [0, 1]
        );
        assert_eq!(
            targets(ApicMode::XApic, NMI | LOGICAL, 0xFF, 0, &cluster),
            [0, 1, 2]
        );
        // A cluster-15 MDA (0xF?): for DPI cores 2, 3, 6, 7 of the SMT platform, read as
        // x2APIC cluster 0, bits 4-7 include 6 and 7, and bit 2 is core 2.
        let p = |mda| filter_ipi(ApicMode::XApic, FIXED | LOGICAL, mda, PAIRS);
        assert_eq!(p(0xF1), IpiAction::Rewrite { dropped: 2 });
        assert_eq!(p(0xF4), IpiAction::Rewrite { dropped: 3 });
        assert_eq!(p(0x33), IpiAction::Forward);
    }

    #[test]
    fn x2apic_physical_destinations_with_high_bits_name_no_os_core() {
        for dest in [0x103, 0x1FF, 0x100, 0x8000_0003, 0xFF, 0x0000_FFFF] {
            assert_eq!(x2(FIXED, dest), IpiAction::Drop { dropped: 1 }, "{dest:#x}");
            assert_eq!(x2(NMI, dest), IpiAction::Drop { dropped: 1 }, "{dest:#x}");
        }
        // Under xAPIC the ICR's high dword carries only 8 destination bits.
        assert_eq!(x(FIXED, 0x02), IpiAction::Forward);
    }

    #[test]
    fn x2apic_logical_clusters() {
        // Cluster 0, bits for IDs 0..3: the DPI core's bit 3 is in it.
        assert_eq!(
            x2(NMI | LOGICAL, 0x0000_000F),
            IpiAction::Rewrite { dropped: 1 }
        );
        assert_eq!(
            targets(ApicMode::X2Apic, NMI | LOGICAL, 0xF, 0, &RESET3),
            [0, 1, 2]
        );
        assert_eq!(
            x2(NMI | LOGICAL, 0x0000_0008),
            IpiAction::Rewrite { dropped: 1 }
        );
        assert!(targets(ApicMode::X2Apic, NMI | LOGICAL, 0x8, 0, &RESET3).is_empty());
        assert_eq!(x2(NMI | LOGICAL, 0x0000_0007), IpiAction::Forward);
        // Another cluster's bit 3 is APIC ID 0x13, no DPI core.
        assert_eq!(x2(NMI | LOGICAL, 0x0001_0008), IpiAction::Forward);
        assert_eq!(x2apic_logical_id(0x13), 0x0001_0008);
        // A low byte of 0xFF may read as the xAPIC broadcast to a DPI core in xAPIC mode.
        assert_eq!(
            x2(FIXED | LOGICAL, 0x0001_00FF),
            IpiAction::Rewrite { dropped: 1 }
        );
    }

    #[test]
    fn lowest_priority_goes_to_one_os_core() {
        for (mode, low, dest) in [
            (ApicMode::XApic, LOWEST | LOGICAL, 0xFF),
            (ApicMode::XApic, LOWEST | ALL_EXCL, 0),
            (ApicMode::XApic, LOWEST, 0xFF),
            (ApicMode::X2Apic, LOWEST | LOGICAL, 0xF),
        ] {
            assert_eq!(
                filter_ipi(mode, low | 0x40, dest, CPUS),
                IpiAction::Rewrite { dropped: 1 }
            );
            let t = targets(mode, low | 0x40, dest, 0, &RESET3);
            assert_eq!(t.len(), 1, "{mode:?} {low:#x} {dest:#x}");
            assert!(OS.contains(&t[0]));
        }
        assert_eq!(
            targets(ApicMode::XApic, LOWEST | ALL_EXCL, 0, 0, &RESET3),
            [1]
        );
    }

    /// One way an APIC may read a message: the destination as it reads it, the broadcast ID
    /// it compares with, and its own mode.
    #[derive(Clone, Copy)]
    struct Reading {
        dest: u32,
        broadcast: u32,
        receiver_x2apic: bool,
    }

    /// Whether an APIC with `id` and xAPIC logical register `ldr` takes the message
    /// `(low, reading)` from `sender` (SDM 12.6.2, 12.12.10): a reference written apart from
    /// the filter.
    fn accepts(low: u32, r: Reading, sender: u32, id: u32, ldr: LogicalId) -> bool {
        match (low >> 18) & 3 {
            1 => return id == sender,
            2 => return true,
            3 => return id != sender,
            _ => {}
        }
        let d = r.dest;
        if d == r.broadcast {
            return true;
        }
        match (r.receiver_x2apic, low & LOGICAL != 0) {
            (_, false) => d == id,
            (true, true) => {
                let l = x2apic_logical_id(id);
                l >> 16 == d >> 16 && d & l & 0xFFFF != 0
            }
            (false, true) if d > 0xFF => false,
            (false, true) if ldr.cluster => {
                d >> 4 == u32::from(ldr.ldr >> 4) && d & u32::from(ldr.ldr) & 0xF != 0
            }
            (false, true) => d & u32::from(ldr.ldr) != 0,
        }
    }

    /// How the guest's own cores read its message: in its mode.
    fn guest_reading(mode: ApicMode, dest: u32) -> Reading {
        match mode {
            ApicMode::XApic => Reading {
                dest: dest & 0xFF,
                broadcast: 0xFF,
                receiver_x2apic: false,
            },
            ApicMode::X2Apic => Reading {
                dest,
                broadcast: 0xFFFF_FFFF,
                receiver_x2apic: true,
            },
        }
    }

    /// Every way a DPI core, in either APIC mode, may read the message.
    fn dpi_readings(mode: ApicMode, dest: u32) -> Vec<Reading> {
        let r = |dest, broadcast, receiver_x2apic| Reading {
            dest,
            broadcast,
            receiver_x2apic,
        };
        match mode {
            ApicMode::XApic => vec![r(dest & 0xFF, 0xFF, false), r(dest & 0xFF, 0xFF, true)],
            ApicMode::X2Apic => vec![
                r(dest, 0xFFFF_FFFF, true),
                r(dest, 0xFFFF_FFFF, false),
                r(dest & 0xFF, 0xFF, false),
            ],
        }
    }

    #[test]
    fn no_combination_reaches_a_dpi_core_and_rewrites_keep_the_guests_targets() {
        let guest_ids: [[LogicalId; 4]; 3] = [
            [LogicalId::RESET; 4],
            [1u32, 2, 4, 8].map(|b| LogicalId::from_registers(b << 24, 0xFFFF_FFFF)),
            [0x11u32, 0x12, 0x21, 0x22].map(|l| LogicalId::from_registers(l << 24, 0x0FFF_FFFF)),
        ];
        let x2_dests = [
            0,
            1,
            2,
            3,
            5,
            6,
            0xFF,
            0x100,
            0x103,
            0x1FF,
            0x0000_000F,
            0x0000_0008,
            0x0000_0033,
            0x0001_0008,
            0x0000_00FF,
            0x0001_00FF,
            0x0000_00C0,
            0x8000_0003,
            0xFFFF_FFFF,
        ];
        // Ally's DPI cores: LDR 0 in either xAPIC model.
        let dpi_ldrs = [
            LogicalId::RESET,
            LogicalId {
                ldr: 0,
                cluster: true,
            },
        ];
        let mut checked = 0;
        for cpus in [CPUS, PAIRS] {
            for mode in [ApicMode::XApic, ApicMode::X2Apic] {
                let dests: Vec<u32> = match mode {
                    ApicMode::XApic => (0..=0xFF).collect(),
                    ApicMode::X2Apic => x2_dests.to_vec(),
                };
                for delivery in MODES.into_iter().chain([3 << 8, 7 << 8]) {
                    for low in [0, LOGICAL, SELF, ALL_INCL, ALL_EXCL].map(|b| b | delivery) {
                        for &dest in &dests {
                            for ids in &guest_ids {
                                for &sender in cpus.os_cores {
                                    let action = filter_ipi(mode, low, dest, cpus);
                                    let ctx = format!(
                                        "{mode:?} low={low:#x} dest={dest:#x} sender={sender} {action:?}"
                                    );
                                    let meant: Vec<u32> = cpus
                                        .os_cores
                                        .iter()
                                        .enumerate()
                                        .filter(|&(i, &id)| {
                                            accepts(
                                                low,
                                                guest_reading(mode, dest),
                                                sender,
                                                id,
                                                ids[i],
                                            )
                                        })
                                        .map(|(_, &id)| id)
                                        .collect();
                                    match action {
                                        IpiAction::Forward => {
                                            for (&dpi, r) in cpus.dpi_cores.iter().flat_map(|d| {
                                                dpi_readings(mode, dest)
                                                    .into_iter()
                                                    .map(move |r| (d, r))
                                            }) {
                                                for ldr in dpi_ldrs {
                                                    assert!(
                                                        !accepts(low, r, sender, dpi, ldr),
                                                        "reaches DPI core {dpi}: {ctx}"
                                                    );
                                                }
                                            }
                                        }
                                        IpiAction::Rewrite { dropped } => {
                                            assert!(dropped > 0, "{ctx}");
                                            let t: Vec<u32> = rewritten_targets(
                                                mode,
                                                low,
                                                dest,
                                                sender,
                                                cpus,
                                                |i| ids[i],
                                            )
                                            .collect();
                                            assert!(t.iter().all(|id| cpus.os_cores.contains(id)));
                                            if delivery == LOWEST | 0x40 {
                                                assert_eq!(t.len(), meant.len().min(1), "{ctx}");
                                                assert!(t.iter().all(|id| meant.contains(id)));
                                            } else {
                                                assert_eq!(t, meant, "{ctx}");
                                            }
                                        }
                                        IpiAction::Drop { dropped } => {
                                            assert!(dropped > 0, "{ctx}");
                                            let reserved = matches!(delivery >> 8, 3 | 7);
                                            assert!(reserved || meant.is_empty(), "{ctx}");
                                        }
                                    }
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn addressed_cpus_by_shorthand_physical_and_broadcast() {
        let r = LogicalId::RESET;
        let a = |low, dest, id| addresses(ApicMode::XApic, low, dest, 0, id, r);
        assert!(a(INIT, 1, 1));
        assert!(!a(INIT, 1, 2));
        assert!(a(SIPI, 0xFF, 2), "broadcast ID");
        assert!(a(INIT | ALL_EXCL, 0, 1));
        assert!(!a(INIT | ALL_EXCL, 0, 0), "not the sender");
        assert!(a(INIT | ALL_INCL, 0, 0));
        assert!(a(FIXED | SELF, 7, 0));
        assert!(!a(FIXED | SELF, 0, 1));
        // xAPIC destinations are 8 bits: the high bits of ICR high are not part of them.
        assert!(a(INIT, 0x102, 2));
        let x = |low, dest, id| addresses(ApicMode::X2Apic, low, dest, 0, id, r);
        assert!(x(INIT, 0x102, 0x102));
        assert!(!x(INIT, 0x102, 2));
        assert!(x(INIT, 0xFFFF_FFFF, 5));
    }

    #[test]
    fn addressed_cpus_by_logical_destination() {
        let flat = LogicalId::from_registers(0x0400_0000, 0xFFFF_FFFF);
        assert_eq!(
            flat,
            LogicalId {
                ldr: 4,
                cluster: false
            }
        );
        let a = |dest, l| addresses(ApicMode::XApic, INIT | LOGICAL, dest, 0, 2, l);
        assert!(a(0x06, flat));
        assert!(!a(0x09, flat));
        assert!(
            !a(0x01, LogicalId::RESET),
            "LDR 0 matches no logical destination"
        );
        let cluster = LogicalId::from_registers(0x2100_0000, 0x0FFF_FFFF);
        assert!(cluster.cluster);
        assert!(a(0x23, cluster));
        assert!(!a(0x13, cluster), "another cluster");
        assert!(!a(0x22, cluster));
        // x2APIC: cluster from the ID; ID 0x12 is cluster 1, bit 2.
        let x = |dest| addresses(ApicMode::X2Apic, INIT | LOGICAL, dest, 0, 0x12, flat);
        assert!(x(0x0001_0004));
        assert!(!x(0x0000_0004));
        assert!(!x(0x0001_0002));
    }

    #[test]
    fn device_interrupts_never_reach_a_dpi_core() {
        // To an OS core, or to an ID that names no CPU: kept.
        assert_eq!(filter_device_interrupt(false, 1, CPUS), RouteAction::Keep);
        assert_eq!(filter_device_interrupt(false, 9, CPUS), RouteAction::Keep);
        // To the DPI core (APIC 3), to every CPU (0xFF), or logical 0xFF: the first OS core.
        for (logical, dest) in [(false, 3), (false, 0xFF), (true, 0xFF)] {
            assert_eq!(
                filter_device_interrupt(logical, dest, CPUS),
                RouteAction::Rewrite {
                    destination: 0,
                    dropped: 1
                },
                "{logical} {dest:#x}"
            );
        }
        // Logical masks: the DPI core's LDR is 0; bit 3 is its x2APIC cluster-0 bit.
        assert_eq!(filter_device_interrupt(true, 0x07, CPUS), RouteAction::Keep);
        assert!(matches!(
            filter_device_interrupt(true, 0x0F, CPUS),
            RouteAction::Rewrite { destination: 0, .. }
        ));
    }
}
