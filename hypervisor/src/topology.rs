//! CPU topology: how Ally reads it to keep SMT siblings apart, and what the guest sees of it.
//!
//! - [`IdLayout`] decomposes an APIC ID into its physical core and package (SDM Vol. 3A
//!   9.9.1: CPUID leaf 0x1F or 0xB, or leaves 1 and 4 on older CPUs) and [`choose_dpi_cpus`]
//!   takes the DPI cores as whole physical cores, so that no OS core shares a core (its L1,
//!   L2 and execution units, the channel of L1TF/MDS-class and cache-timing attacks) with a
//!   DPI core.
//! - Leaves 0xB and 0x1F (extended topology) give, per level, the number of logical processors
//!   in this CPU's domain at that level (EBX[15:0]). Ally counts the OS cores whose APIC ID
//!   shares the domain (the bits above the level's shift, EAX[4:0]) and reports no more than
//!   that. The shifts themselves stay: they describe the APIC ID space, which Ally does not
//!   change (the guest decomposes its CPUs' real APIC IDs with them).
//! - Leaf 1 EBX[23:16] and leaf 4 EAX[31:26] are likewise ID-space widths ("maximum number of
//!   addressable IDs", SDM Vol. 2A CPUID), not counts: they are left as the CPU reports them.

use core::fmt;

/// How APIC IDs split into SMT thread, core and package fields.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IdLayout {
    /// APIC ID bits below this select the thread within a core.
    pub smt_shift: u32,
    /// APIC ID bits below this select the logical CPU within a package.
    pub package_shift: u32,
}

/// Bits needed for `n` values (SDM 9.9.1's "find mask width").
fn width(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

impl IdLayout {
    /// Reads the layout through `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]` on any CPU
    /// (the shifts are the same on every CPU of a machine).
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let max_leaf = cpuid(0, 0)[0];
        for leaf in [0x1F, 0xB] {
            if max_leaf < leaf {
                continue;
            }
            let mut layout = None::<Self>;
            for subleaf in 0..8 {
                let [eax, ebx, ecx, _] = cpuid(leaf, subleaf);
                let level_type = (ecx >> 8) & 0xFF;
                if level_type == 0 || ebx & 0xFFFF == 0 {
                    break;
                }
                let shift = eax & 0x1F;
                let l = layout.get_or_insert(Self {
                    smt_shift: 0,
                    package_shift: 0,
                });
                // Level 1 is SMT; every level's shift up to the last is within the package.
                if level_type == 1 {
                    l.smt_shift = shift;
                }
                l.package_shift = l.package_shift.max(shift);
            }
            if let Some(layout) = layout {
                return layout;
            }
        }
        // Leaf 1: without HTT each package has one logical processor; else EBX[23:16] IDs
        // per package, of which leaf 4 EAX[31:26] + 1 cores.
        let [_, ebx, _, edx] = cpuid(1, 0);
        if edx & (1 << 28) == 0 {
            return Self {
                smt_shift: 0,
                package_shift: 0,
            };
        }
        let package_shift = width((ebx >> 16) & 0xFF);
        let cores = if max_leaf >= 4 {
            (cpuid(4, 0)[0] >> 26) + 1
        } else {
            1
        };
        Self {
            smt_shift: package_shift.saturating_sub(width(cores)),
            package_shift,
        }
    }

    /// The physical core of APIC ID `id` (unique across packages).
    pub const fn core_of(&self, id: u32) -> u32 {
        id >> self.smt_shift
    }

    pub const fn package_of(&self, id: u32) -> u32 {
        id >> self.package_shift
    }
}

/// The machine's CPUs as cores and packages, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub threads_per_core: usize,
    pub cores: usize,
    pub packages: usize,
}

impl Topology {
    /// Counts over the CPUs `all`.
    pub fn of(all: &[u32], layout: IdLayout) -> Self {
        let distinct = |key: &dyn Fn(u32) -> u32| {
            let mut keys: heapless::Vec<u32, 256> = all.iter().map(|&id| key(id)).collect();
            keys.sort_unstable();
            match keys.is_empty() {
                true => 0,
                false => 1 + keys.windows(2).filter(|w| w[0] != w[1]).count(),
            }
        };
        let threads_per_core = all
            .iter()
            .map(|&id| siblings(all, layout, id).count())
            .max()
            .unwrap_or(0);
        Self {
            threads_per_core,
            cores: distinct(&|id| layout.core_of(id)),
            packages: distinct(&|id| layout.package_of(id)),
        }
    }
}

/// The CPUs of `all` on the same physical core as `id`, `id` included.
pub fn siblings(all: &[u32], layout: IdLayout, id: u32) -> impl Iterator<Item = u32> + '_ {
    all.iter()
        .copied()
        .filter(move |&other| layout.core_of(other) == layout.core_of(id))
}

/// Why the DPI cores cannot be chosen.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TopologyError {
    /// Whole physical cores other than the boot CPU's hold fewer CPUs than requested.
    NotEnoughWholeCores { requested: usize, available: usize },
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotEnoughWholeCores {
                requested,
                available,
            } => write!(
                f,
                "option \"dpi_cores\": {requested} DPI cores must be whole physical cores \
                 (no OS core may share a core with a DPI core), and the physical cores other \
                 than the boot CPU's hold only {available} CPUs"
            ),
        }
    }
}

/// The DPI cores for `requested` of the sorted CPUs `all`: whole physical cores, the highest
/// APIC IDs first, never the boot CPU's core. When a core has more threads than are still
/// needed, its other threads become DPI cores too (they run the DPI loop, idle, hidden from
/// the guest): a sibling left to the guest would share the DPI core's caches and execution
/// units. The result is sorted and may hold more than `requested`.
pub fn choose_dpi_cpus(
    all: &[u32],
    boot_cpu: u32,
    requested: usize,
    layout: IdLayout,
) -> Result<heapless::Vec<u32, 256>, TopologyError> {
    let mut dpi: heapless::Vec<u32, 256> = heapless::Vec::new();
    let boot_core = layout.core_of(boot_cpu);
    for &id in all.iter().rev() {
        if dpi.len() >= requested {
            break;
        }
        if layout.core_of(id) == boot_core || dpi.contains(&id) {
            continue;
        }
        for sibling in siblings(all, layout, id) {
            // Capacity: `all` has the same bound.
            let _ = dpi.push(sibling);
        }
    }
    if dpi.len() < requested {
        return Err(TopologyError::NotEnoughWholeCores {
            requested,
            available: all
                .iter()
                .filter(|&&id| layout.core_of(id) != boot_core)
                .count(),
        });
    }
    dpi.sort_unstable();
    Ok(dpi)
}

/// Adjusts the `[eax, ebx, ecx, edx]` of CPUID leaf 0xB or 0x1F (any subleaf) on the CPU with
/// `apic_id`; any other leaf is returned unchanged.
pub fn guest_topology_leaf(leaf: u32, apic_id: u32, regs: [u32; 4], os_cores: &[u32]) -> [u32; 4] {
    let [eax, ebx, ecx, edx] = regs;
    let level_type = (ecx >> 8) & 0xFF;
    if !(leaf == 0xB || leaf == 0x1F) || (level_type == 0 && ebx & 0xFFFF == 0) {
        return regs;
    }
    let shift = eax & 0x1F;
    let domain = |id: u32| id >> shift;
    let visible = os_cores
        .iter()
        .filter(|&&id| domain(id) == domain(apic_id))
        .count()
        .max(1) as u32;
    let count = (ebx & 0xFFFF).min(visible);
    [eax, (ebx & !0xFFFF) | count, ecx, edx]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID with the given leaves (unlisted ones read as zero).
    fn cpuid(leaves: &'static [((u32, u32), [u32; 4])]) -> impl Fn(u32, u32) -> [u32; 4] {
        move |leaf, subleaf| {
            leaves
                .iter()
                .find(|(key, _)| *key == (leaf, subleaf))
                .map(|(_, regs)| *regs)
                .unwrap_or([0; 4])
        }
    }

    const SMT2: IdLayout = IdLayout {
        smt_shift: 1,
        package_shift: 4,
    };
    const NO_SMT: IdLayout = IdLayout {
        smt_shift: 0,
        package_shift: 0,
    };

    #[test]
    fn layout_from_the_extended_topology_leaves() {
        // 2 threads per core (shift 1), 16 IDs per package (shift 4), leaf 0xB.
        let c = cpuid(&[
            ((0, 0), [0xD, 0, 0, 0]),
            ((0xB, 0), [1, 2, 0x100, 0]),
            ((0xB, 1), [4, 12, 0x201, 0]),
            ((0xB, 2), [0, 0, 2, 0]),
        ]);
        assert_eq!(IdLayout::from_cpuid(c), SMT2);
        // Leaf 0x1F with a die level above the core: the package is above the die.
        let c = cpuid(&[
            ((0, 0), [0x1F, 0, 0, 0]),
            ((0x1F, 0), [1, 2, 0x100, 0]),
            ((0x1F, 1), [4, 16, 0x201, 0]),
            ((0x1F, 2), [6, 32, 0x502, 0]),
        ]);
        assert_eq!(
            IdLayout::from_cpuid(c),
            IdLayout {
                smt_shift: 1,
                package_shift: 6
            }
        );
    }

    #[test]
    fn layout_from_leaves_1_and_4() {
        // Bochs 2.7 with count=N: leaf 0xB's subleaf 0 has level type 0, no HTT: each CPU is
        // its own package, no SMT.
        let bochs = cpuid(&[
            ((0, 0), [0xD, 0, 0, 0]),
            ((0xB, 0), [2, 4, 0, 1]),
            ((1, 0), [0x663, 0x0001_0800, 0, 0x0780_FBFF]),
        ]);
        assert_eq!(IdLayout::from_cpuid(bochs), NO_SMT);
        // HTT, 16 IDs per package, 4 cores (leaf 4 EAX[31:26] = 3): 2 threads per core... of
        // 16/4 = 4 IDs per core, shift 2.
        let old = cpuid(&[
            ((0, 0), [0xA, 0, 0, 0]),
            ((1, 0), [0, 0x0010_0800, 0, 1 << 28]),
            ((4, 0), [3 << 26, 0, 0, 0]),
        ]);
        assert_eq!(
            IdLayout::from_cpuid(old),
            IdLayout {
                smt_shift: 2,
                package_shift: 4
            }
        );
        // HTT but one core per package of 2 IDs (a Pentium 4 with Hyper-Threading).
        let p4 = cpuid(&[
            ((0, 0), [2, 0, 0, 0]),
            ((1, 0), [0, 0x0002_0800, 0, 1 << 28]),
        ]);
        assert_eq!(
            IdLayout::from_cpuid(p4),
            IdLayout {
                smt_shift: 1,
                package_shift: 1
            }
        );
    }

    #[test]
    fn dpi_cores_are_whole_physical_cores() {
        let all = [0, 1, 2, 3, 4, 5, 6, 7];
        // One requested on SMT-2: the sibling comes along.
        assert_eq!(choose_dpi_cpus(&all, 0, 1, SMT2).unwrap(), [6, 7]);
        assert_eq!(choose_dpi_cpus(&all, 0, 2, SMT2).unwrap(), [6, 7]);
        assert_eq!(choose_dpi_cpus(&all, 0, 3, SMT2).unwrap(), [4, 5, 6, 7]);
        // Never the boot CPU's core, even when it has the highest IDs.
        assert_eq!(choose_dpi_cpus(&all, 7, 1, SMT2).unwrap(), [4, 5]);
        // Everything but the boot CPU's core; not one more.
        assert_eq!(
            choose_dpi_cpus(&all, 0, 6, SMT2).unwrap(),
            [2, 3, 4, 5, 6, 7]
        );
        assert_eq!(
            choose_dpi_cpus(&all, 0, 7, SMT2),
            Err(TopologyError::NotEnoughWholeCores {
                requested: 7,
                available: 6
            })
        );
        // A one-core SMT-2 machine has no core to spare.
        assert!(choose_dpi_cpus(&[0, 1], 0, 1, SMT2).is_err());
        // Nothing requested, nothing taken.
        assert!(choose_dpi_cpus(&all, 0, 0, SMT2).unwrap().is_empty());
    }

    #[test]
    fn without_smt_the_highest_ids_as_before() {
        let all = [0, 1, 2, 3];
        assert_eq!(choose_dpi_cpus(&all, 0, 1, NO_SMT).unwrap(), [3]);
        assert_eq!(choose_dpi_cpus(&all, 3, 2, NO_SMT).unwrap(), [1, 2]);
        assert_eq!(choose_dpi_cpus(&[0, 1, 2], 0, 2, NO_SMT).unwrap(), [1, 2]);
        let t = Topology::of(&all, NO_SMT);
        assert_eq!(
            t,
            Topology {
                threads_per_core: 1,
                cores: 4,
                packages: 4
            }
        );
    }

    #[test]
    fn odd_counts_and_gaps_in_the_ids() {
        // Five CPUs: cores (0,1), (2,3) and a lone thread 4 (its sibling 5 disabled).
        let all = [0, 1, 2, 3, 4];
        assert_eq!(choose_dpi_cpus(&all, 0, 1, SMT2).unwrap(), [4]);
        assert_eq!(choose_dpi_cpus(&all, 0, 2, SMT2).unwrap(), [2, 3, 4]);
        let t = Topology::of(&all, SMT2);
        assert_eq!(
            t,
            Topology {
                threads_per_core: 2,
                cores: 3,
                packages: 1
            }
        );
        // Two packages of 2 cores x 2 threads, IDs 0-3 and 16-19.
        let all = [0, 1, 2, 3, 16, 17, 18, 19];
        assert_eq!(choose_dpi_cpus(&all, 0, 1, SMT2).unwrap(), [18, 19]);
        assert_eq!(Topology::of(&all, SMT2).packages, 2);
        let pairs: Vec<u32> = siblings(&all, SMT2, 17).collect();
        assert_eq!(pairs, [16, 17]);
    }

    #[test]
    fn bochs_four_processors_three_os_cores() {
        // Bochs 2.7 with `count=4`: subleaf 0 says 4 processors below shift 2 (level type 0).
        let r = guest_topology_leaf(0xB, 1, [2, 4, 0, 1], &[0, 1, 2]);
        assert_eq!(r, [2, 3, 0, 1]);
        // The terminating subleaf stays all-zero.
        assert_eq!(
            guest_topology_leaf(0xB, 1, [0, 0, 1, 1], &[0, 1, 2]),
            [0, 0, 1, 1]
        );
    }

    #[test]
    fn smt_and_core_levels_count_the_os_cores_of_each_domain() {
        // 2 threads per core (shift 1), 8 logical per package (shift 3); DPI cores 6 and 7.
        let os = [0, 1, 2, 3, 4, 5];
        let smt = [1, 2, 0x100, 5];
        let core = [3, 8, 0x201, 5];
        assert_eq!(guest_topology_leaf(0xB, 5, smt, &os)[1], 2);
        assert_eq!(guest_topology_leaf(0xB, 5, core, &os)[1], 6);
        // Only the count changes; it never grows.
        assert_eq!(guest_topology_leaf(0x1F, 5, core, &os), [3, 6, 0x201, 5]);
        assert_eq!(guest_topology_leaf(0xB, 4, [1, 1, 0x100, 4], &os)[1], 1);
        // A core whose sibling (7) is a DPI core.
        let os = [0, 1, 2, 3, 4, 5, 6];
        assert_eq!(guest_topology_leaf(0xB, 6, [1, 2, 0x100, 6], &os)[1], 1);
    }

    #[test]
    fn other_leaves_are_unchanged() {
        let r = [0x1234, 0x0004_0800, 5, 6];
        assert_eq!(guest_topology_leaf(1, 0, r, &[0]), r);
        assert_eq!(guest_topology_leaf(4, 0, r, &[0]), r);
    }

    #[test]
    fn a_wide_shift_puts_every_cpu_in_one_domain() {
        assert_eq!(
            guest_topology_leaf(0xB, 9, [31, 8, 0x201, 9], &[0, 9])[1],
            2
        );
        // EAX[4:0] is the whole shift: higher EAX bits are reserved, not part of it.
        assert_eq!(
            guest_topology_leaf(0xB, 9, [0x21, 8, 0x201, 9], &[0, 9])[1],
            1
        );
    }
}
