//! CPUID topology as the guest sees it: only its OS cores (the DPI cores are hidden).
//!
//! - Leaves 0xB and 0x1F (extended topology) give, per level, the number of logical processors
//!   in this CPU's domain at that level (EBX[15:0]). Ally counts the OS cores whose APIC ID
//!   shares the domain (the bits above the level's shift, EAX[4:0]) and reports no more than
//!   that. The shifts themselves stay: they describe the APIC ID space, which Ally does not
//!   change (the guest decomposes its CPUs' real APIC IDs with them).
//! - Leaf 1 EBX[23:16] and leaf 4 EAX[31:26] are likewise ID-space widths ("maximum number of
//!   addressable IDs", SDM Vol. 2A CPUID), not counts: they are left as the CPU reports them.

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
