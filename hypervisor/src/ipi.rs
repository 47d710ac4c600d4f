//! Keeping the guest's inter-processor interrupts away from the DPI cores.
//!
//! Every ICR write of an OS core (xAPIC MMIO offset 0x300, or x2APIC MSR 0x830) comes here
//! before it reaches the hardware. IPIs between OS cores pass unchanged; any IPI aimed at a DPI
//! core — by physical ID, by logical destination, by the broadcast ID or by a shorthand — is
//! dropped for that core and counted; broadcasts are rewritten as unicasts to the OS cores.
//! ICR layout: SDM Vol. 3A 12.6.1 (Figure 12-12) and 12.12.9 (x2APIC).

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
    /// Write the ICR as the guest wrote it.
    Forward,
    /// Send nothing: every target was a DPI core.
    Drop { dropped: usize },
    /// Send the same IPI (no shorthand, physical destination) to each OS core instead — the
    /// sender too when `include_self` — see [`unicast_targets`]; `dropped` DPI cores were
    /// removed.
    Unicast { include_self: bool, dropped: usize },
    /// Logical destination with the DPI cores' bits removed (x2APIC clusters, xAPIC flat).
    Logical { destination: u32, dropped: usize },
}

/// The x2APIC logical ID of an x2APIC ID (SDM 12.12.10.2).
pub const fn x2apic_logical_id(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

/// The OS cores a rewritten broadcast goes to.
pub fn unicast_targets<'a>(
    cpus: CpuSets<'a>,
    sender: u32,
    include_self: bool,
) -> impl Iterator<Item = u32> + 'a {
    cpus.os_cores
        .iter()
        .copied()
        .filter(move |&id| include_self || id != sender)
}

/// Decides what an OS core's ICR write `(low, destination)` may do.
///
/// `logical_ids` gives, for xAPIC logical mode, the LDR value of each DPI core (Ally leaves
/// them 0, which no logical destination matches; a non-zero value is honoured).
pub fn filter_ipi(
    mode: ApicMode,
    low: u32,
    destination: u32,
    cpus: CpuSets<'_>,
    xapic_dpi_logical_ids: &[u8],
) -> IpiAction {
    let shorthand = match (low >> 18) & 3 {
        0 => Shorthand::None,
        1 => Shorthand::SelfOnly,
        2 => Shorthand::AllIncludingSelf,
        _ => Shorthand::AllExcludingSelf,
    };
    let logical = low & (1 << 11) != 0;
    let broadcast_id = match mode {
        ApicMode::XApic => 0xFF,
        ApicMode::X2Apic => 0xFFFF_FFFF,
    };
    let dpi_count = cpus.dpi_cores.len();
    match shorthand {
        Shorthand::SelfOnly => IpiAction::Forward,
        Shorthand::AllIncludingSelf if dpi_count > 0 => IpiAction::Unicast {
            include_self: true,
            dropped: dpi_count,
        },
        Shorthand::AllExcludingSelf if dpi_count > 0 => IpiAction::Unicast {
            include_self: false,
            dropped: dpi_count,
        },
        Shorthand::AllIncludingSelf | Shorthand::AllExcludingSelf => IpiAction::Forward,
        Shorthand::None if !logical => {
            if destination == broadcast_id {
                if dpi_count == 0 {
                    IpiAction::Forward
                } else {
                    IpiAction::Unicast {
                        include_self: true,
                        dropped: dpi_count,
                    }
                }
            } else if cpus.dpi_cores.contains(&destination) {
                IpiAction::Drop { dropped: 1 }
            } else {
                IpiAction::Forward
            }
        }
        Shorthand::None => {
            // Logical destination: remove every DPI core's logical bits.
            let (mask, dropped) = match mode {
                ApicMode::X2Apic => {
                    let mut dest = destination;
                    let mut dropped = 0;
                    if destination == broadcast_id {
                        return IpiAction::Unicast {
                            include_self: true,
                            dropped: dpi_count,
                        };
                    }
                    for &id in cpus.dpi_cores {
                        let l = x2apic_logical_id(id);
                        if l >> 16 == dest >> 16 && dest & l & 0xFFFF != 0 {
                            dest &= !(l & 0xFFFF);
                            dropped += 1;
                        }
                    }
                    (dest, dropped)
                }
                ApicMode::XApic => {
                    let mut dest = destination & 0xFF;
                    let mut dropped = 0;
                    for &l in xapic_dpi_logical_ids {
                        // Flat model: a CPU accepts when MDA & LDR != 0 (12.6.2.2).
                        if l != 0 && dest & u32::from(l) != 0 {
                            dest &= !u32::from(l);
                            dropped += 1;
                        }
                    }
                    (dest, dropped)
                }
            };
            let empty = match mode {
                ApicMode::X2Apic => mask & 0xFFFF == 0,
                ApicMode::XApic => mask == 0,
            };
            if dropped == 0 {
                IpiAction::Forward
            } else if empty {
                IpiAction::Drop { dropped }
            } else {
                IpiAction::Logical {
                    destination: mask,
                    dropped,
                }
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
    /// Rewrite the destination: DPI cores removed (logical), or redirected to the first OS
    /// core (a physical DPI core or the broadcast ID, which a device interrupt cannot
    /// narrow otherwise).
    Rewrite {
        destination: u32,
        logical: bool,
        dropped: usize,
    },
}

/// Filters a device interrupt's xAPIC destination (`destination` = 8-bit APIC ID or logical
/// MDA) the same way as an IPI: no DPI core may receive it.
pub fn filter_device_interrupt(
    delivery_mode: u32,
    logical: bool,
    destination: u32,
    cpus: CpuSets<'_>,
) -> RouteAction {
    let low = ((delivery_mode & 7) << 8) | if logical { 1 << 11 } else { 0 };
    let first_os_core = cpus.os_cores.first().copied().unwrap_or(0);
    match filter_ipi(ApicMode::XApic, low, destination & 0xFF, cpus, &[]) {
        IpiAction::Forward => RouteAction::Keep,
        IpiAction::Logical {
            destination,
            dropped,
        } => RouteAction::Rewrite {
            destination,
            logical: true,
            dropped,
        },
        IpiAction::Drop { dropped } | IpiAction::Unicast { dropped, .. } => RouteAction::Rewrite {
            destination: first_os_core,
            logical: false,
            dropped,
        },
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
    const NMI: u32 = 4 << 8;
    const INIT: u32 = 5 << 8;
    const SIPI: u32 = (6 << 8) | 0x9A;
    const FIXED: u32 = 0x40;
    const LOGICAL: u32 = 1 << 11;
    const ALL_INCL: u32 = 2 << 18;
    const ALL_EXCL: u32 = 3 << 18;
    const SELF: u32 = 1 << 18;

    fn x(low: u32, dest: u32) -> IpiAction {
        filter_ipi(ApicMode::XApic, low, dest, CPUS, &[])
    }

    #[test]
    fn ipis_between_os_cores_pass_unchanged() {
        for low in [NMI, INIT, SIPI, FIXED] {
            assert_eq!(x(low, 1), IpiAction::Forward);
            assert_eq!(x(low, 2), IpiAction::Forward);
        }
        assert_eq!(x(FIXED | SELF, 0), IpiAction::Forward);
    }

    #[test]
    fn every_delivery_mode_to_a_dpi_core_is_dropped() {
        for low in [NMI, INIT, SIPI, FIXED, 2 << 8, 1 << 8] {
            assert_eq!(x(low, 3), IpiAction::Drop { dropped: 1 }, "{low:#x}");
        }
    }

    #[test]
    fn broadcasts_become_unicasts_to_os_cores() {
        assert_eq!(
            x(NMI | ALL_EXCL, 0),
            IpiAction::Unicast {
                include_self: false,
                dropped: 1
            }
        );
        assert_eq!(
            x(INIT | ALL_INCL, 0),
            IpiAction::Unicast {
                include_self: true,
                dropped: 1
            }
        );
        assert_eq!(
            x(FIXED, 0xFF),
            IpiAction::Unicast {
                include_self: true,
                dropped: 1
            }
        );
        let others: Vec<u32> = unicast_targets(CPUS, 0, false).collect();
        assert_eq!(others, [1, 2]);
        let all: Vec<u32> = unicast_targets(CPUS, 0, true).collect();
        assert_eq!(all, [0, 1, 2]);
    }

    #[test]
    fn without_dpi_cores_broadcasts_pass() {
        let cpus = CpuSets {
            os_cores: &OS,
            dpi_cores: &[],
        };
        assert_eq!(
            filter_ipi(ApicMode::XApic, NMI | ALL_EXCL, 0, cpus, &[]),
            IpiAction::Forward
        );
    }

    #[test]
    fn xapic_logical_destinations_lose_dpi_bits() {
        // Ally leaves the DPI core's LDR at 0: no logical destination can reach it.
        assert_eq!(x(FIXED | LOGICAL, 0xFF), IpiAction::Forward);
        // A DPI core with a logical ID (not Ally's setup, but honoured).
        let a = filter_ipi(ApicMode::XApic, FIXED | LOGICAL, 0x0F, CPUS, &[0x08]);
        assert_eq!(
            a,
            IpiAction::Logical {
                destination: 0x07,
                dropped: 1
            }
        );
        let a = filter_ipi(ApicMode::XApic, NMI | LOGICAL, 0x08, CPUS, &[0x08]);
        assert_eq!(a, IpiAction::Drop { dropped: 1 });
    }

    #[test]
    fn x2apic_physical_and_cluster_destinations() {
        let f = |low, dest| filter_ipi(ApicMode::X2Apic, low, dest, CPUS, &[]);
        assert_eq!(f(INIT, 3), IpiAction::Drop { dropped: 1 });
        assert_eq!(f(INIT, 2), IpiAction::Forward);
        // Cluster 0, bits for IDs 0..3: the DPI core's bit 3 goes.
        assert_eq!(
            f(NMI | LOGICAL, 0x0000_000F),
            IpiAction::Logical {
                destination: 0x7,
                dropped: 1
            }
        );
        assert_eq!(
            f(NMI | LOGICAL, 0x0000_0008),
            IpiAction::Drop { dropped: 1 }
        );
        // Another cluster is untouched.
        assert_eq!(f(NMI | LOGICAL, 0x0001_0008), IpiAction::Forward);
        assert_eq!(x2apic_logical_id(0x13), 0x0001_0008);
        assert_eq!(
            f(FIXED, 0xFFFF_FFFF),
            IpiAction::Unicast {
                include_self: true,
                dropped: 1
            }
        );
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
        let cpus = CpuSets {
            os_cores: &OS,
            dpi_cores: &DPI,
        };
        // Fixed delivery to an OS core: kept.
        assert_eq!(
            filter_device_interrupt(0, false, 1, cpus),
            RouteAction::Keep
        );
        // To the DPI core (APIC 3) or to every CPU (0xFF): the first OS core instead.
        for dest in [3, 0xFF] {
            assert_eq!(
                filter_device_interrupt(0, false, dest, cpus),
                RouteAction::Rewrite {
                    destination: 0,
                    logical: false,
                    dropped: 1
                }
            );
        }
        // NMI delivery is filtered the same way.
        assert!(matches!(
            filter_device_interrupt(4, false, 3, cpus),
            RouteAction::Rewrite { destination: 0, .. }
        ));
        // Logical destinations: DPI cores have no logical ID (LDR 0), nothing to remove.
        assert_eq!(
            filter_device_interrupt(1, true, 0x0F, cpus),
            RouteAction::Keep
        );
    }
}
