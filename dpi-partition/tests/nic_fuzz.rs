//! Randomized hostile-guest scenarios (the same interpreter as the cargo-fuzz target under
//! `fuzz/`): no panic, Ally memory untouched, nothing passed uninspected.

mod nic_support;

use ally_dpi::nic::dpi::DropReason;

#[test]
fn nic_fuzz_random_guest_behaviour() {
    let mut seed = 0x1234_5678_9ABC_DEF1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sum = ally_dpi::nic::dpi::Counters::default();
    for _ in 0..300 {
        let len = (next() % 1500) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let c = nic_support::ops::run(&data);
        sum.tx.packets += c.tx.packets;
        sum.rx.packets += c.rx.packets;
        for i in 0..DropReason::COUNT {
            sum.tx.drops[i] += c.tx.drops[i];
            sum.rx.drops[i] += c.rx.drops[i];
            sum.tx.ring_stops[i] += c.tx.ring_stops[i];
            sum.rx.ring_stops[i] += c.rx.ring_stops[i];
        }
    }
    println!("{sum:?}");
    // The scenarios must actually exercise the paths and the refusals.
    assert!(sum.tx.packets > 100 && sum.rx.packets > 100);
    for r in [
        DropReason::Protected,
        DropReason::OutsideRam,
        DropReason::Overflow,
        DropReason::Offload,
    ] {
        assert!(sum.tx.dropped(r) > 0, "no TX drop for {r:?}");
    }
    assert!(sum.rx.dropped(DropReason::Protected) > 0);
    assert!(sum.tx.ring_stops.iter().sum::<u64>() > 0);
}

#[test]
fn nic_fuzz_register_aliases_cannot_move_the_real_rings() {
    use ally_dpi::nic::regs::{NicRegisters, Reg};
    let mut e = nic_support::env(
        ally_dpi::nic::dpi::DpiConfig::default(),
        ally_dpi::nic::model::Flavor::Qemu,
        true,
        ally_dpi::nic::PassAll,
    );
    e.setup(32, 16, 2048);
    let real_tdbal = e.model.read32(Reg::TDBAL);
    let real_rdbal = e.model.read32(Reg::RDBAL);
    // 82542 aliases of TDBAL and RDBAL.
    e.gw(Reg(0x0420), 0x1000);
    e.gw(Reg(0x0110), 0x2000);
    assert_eq!(e.model.read32(Reg::TDBAL), real_tdbal);
    assert_eq!(e.model.read32(Reg::RDBAL), real_rdbal);
    assert_eq!(e.gr(Reg::TDBAL), 0x1000);
    assert_eq!(e.gr(Reg(0x0110)), 0x2000);
}
