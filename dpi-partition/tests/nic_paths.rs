//! Every packet path of the DPI queue engine against the software e1000 and fake guest memory.

mod nic_support;

use ally_dpi::nic::desc::{
    popts, rxerr, rxsta, txcmd, txsta, LegacyTxDesc, RxDesc, TxContextDesc, TxDataDesc,
};
use ally_dpi::nic::dpi::{DpiConfig, DropReason, Mode};
use ally_dpi::nic::mem::DmaMemory;
use ally_dpi::nic::model::Flavor;
use ally_dpi::nic::regs::{ctrl, icr, rctl, NicRegisters, Reg};
use ally_dpi::nic::{Direction, HookVerdict, PassAll};
use nic_support::*;

fn cfg(mode: Mode) -> DpiConfig {
    DpiConfig {
        mode,
        ..DpiConfig::default()
    }
}

fn tx_roundtrip(mode: Mode) {
    let mut e = env(cfg(mode), Flavor::Qemu, true, PassAll);
    e.setup(64, 64, 2048);
    let frames: Vec<Vec<u8>> = (0..150)
        .map(|i| frame(i, 60 + (i as usize * 97) % 1455))
        .collect();
    let mut sent = 0;
    for batch in frames.chunks(20) {
        let first = e.tdt;
        for f in batch {
            e.queue_legacy(f);
        }
        e.kick();
        e.run();
        // DD written back on every descriptor (all have RS), TDH caught up, TXDW raised.
        for k in 0..batch.len() as u32 {
            assert_eq!(
                e.guest_tx_status((first + k) % e.tx_n) & txsta::DD,
                txsta::DD
            );
        }
        assert_eq!(e.gr(Reg::TDH), e.tdt);
        assert_ne!(e.shadow.peek_icr() & icr::TXDW, 0);
        sent += batch.len();
    }
    let wire = e.model.take_wire();
    assert_eq!(wire.len(), sent);
    assert_eq!(
        wire, frames,
        "wire must carry exactly the guest's frames, in order"
    );
    let c = e.dpi.counters();
    assert_eq!(c.tx.packets, 150);
    assert_eq!(
        c.tx.bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(c.tx.total_dropped(), 0);
    assert!(c.tx.doorbells >= 8);
}

#[test]
fn nic_tx_legacy_copy_mode() {
    tx_roundtrip(Mode::Copy);
}

#[test]
fn nic_tx_legacy_zero_copy_mode() {
    tx_roundtrip(Mode::ZeroCopy);
}

#[test]
fn nic_tx_multi_descriptor_and_rs_only_where_asked() {
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let mut e = env(cfg(mode), Flavor::Qemu, true, PassAll);
        e.setup(32, 32, 2048);
        let f = frame(7, 1400);
        // Three legacy fragments; RS only on the last, as Linux does.
        for (k, part) in f.chunks(500).enumerate() {
            let buf = e.tx_buf(e.tdt);
            e.write(buf, part);
            let eop = if k == 2 { txcmd::EOP | txcmd::RS } else { 0 };
            e.queue_raw(
                LegacyTxDesc {
                    buffer_addr: buf,
                    length: part.len() as u16,
                    cmd: txcmd::IFCS | eop,
                    ..Default::default()
                }
                .to_bytes(),
            );
        }
        e.kick();
        e.run();
        assert_eq!(e.model.take_wire(), vec![f.clone()]);
        assert_eq!(
            e.guest_tx_status(0),
            0,
            "no RS: the device writes no status"
        );
        assert_eq!(e.guest_tx_status(1), 0);
        assert_eq!(e.guest_tx_status(2), txsta::DD);
        assert_eq!(e.gr(Reg::TDH), 3);
    }
}

fn ipv4_udp(len: usize) -> Vec<u8> {
    let mut f = frame(3, len);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    // Not a fragment: the UDP header is there to checksum.
    f[20..22].copy_from_slice(&[0, 0]);
    f[23] = 17;
    f[24..26].copy_from_slice(&[0, 0]);
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

#[test]
fn nic_tx_context_and_data_checksum_offload() {
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let mut e = env(cfg(mode), Flavor::Qemu, true, PassAll);
        e.setup(32, 32, 2048);
        let f = ipv4_udp(300);
        let ctx = TxContextDesc {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            tucss: 34,
            tucso: 40,
            tucse: 0,
            cmd_and_length: (u32::from(txcmd::DEXT | txcmd::TUCMD_IP) << 24) | 300,
            ..Default::default()
        };
        e.queue_ctx_data(&f, 2, ctx, 0, popts::IXSM | popts::TXSM);
        e.kick();
        e.run();
        let wire = e.model.take_wire();
        assert_eq!(wire.len(), 1);
        // The real device applied the offload from the context Ally posted: the IP header now
        // checksums to zero.
        let mut sum = 0u32;
        for c in wire[0][14..34].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        assert_eq!(sum, 0xFFFF, "IP checksum inserted");
        assert_ne!(&wire[0][40..42], &[0, 0], "UDP checksum inserted");
        assert_eq!(&wire[0][42..], &f[42..]);
        // Three descriptors (context + 2 data); DD on the last (RS).
        assert_eq!(e.guest_tx_status(2) & txsta::DD, txsta::DD);
        assert_eq!(e.gr(Reg::TDH), 3);
    }
}

#[test]
fn nic_tx_tso_super_frame_is_inspected_and_posted() {
    let seen = std::cell::RefCell::new(Vec::new());
    let hook = |f: &[u8], d: Direction| {
        seen.borrow_mut().push((f.len(), d));
        HookVerdict::Pass
    };
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, hook);
    e.setup(64, 32, 2048);
    // TCP over IPv4: 20-byte headers, so HDRLEN 54 is the real header length.
    let mut f = ipv4_udp(30_000);
    f[23] = 6;
    f[46] = 5 << 4;
    f[47] = 0x18;
    let ctx = TxContextDesc {
        ipcss: 14,
        ipcso: 24,
        tucss: 34,
        tucso: 50,
        cmd_and_length: (u32::from(txcmd::DEXT | txcmd::TSE | txcmd::TUCMD_TCP | txcmd::TUCMD_IP)
            << 24)
            | (30_000 - 54),
        hdrlen: 54,
        mss: 1448,
        ..Default::default()
    };
    e.queue_ctx_data(&f, 8, ctx, txcmd::TSE, popts::TXSM | popts::IXSM);
    e.kick();
    e.run();
    assert_eq!(seen.borrow().as_slice(), &[(30_000, Direction::ToWire)]);
    assert_eq!(
        e.model
            .stats
            .tso_unsegmented
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(e.model.take_wire()[0].len(), 30_000);
    assert_eq!(e.gr(Reg::TDH), 9);
    // One guest packet, 21 segments on a real wire: ceil((30000 - 54) / 1448).
    assert_eq!(e.dpi.counters().tx.packets, 1);
    assert_eq!(e.dpi.counters().tx.wire_frames, 21);
}

/// Every way a guest descriptor can be bad: refused, counted by reason, completed with DD,
/// nothing reaches the wire, and a good packet after each still goes out.
#[test]
fn nic_tx_bad_descriptors_are_refused_and_completed() {
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let mut e = env(cfg(mode), Flavor::Qemu, true, PassAll);
        // 128 descriptors: enough room for a packet longer than MAX_PACKET_DESCS.
        e.setup(128, 32, 2048);
        let legacy = |addr: u64, len: u16| {
            LegacyTxDesc {
                buffer_addr: addr,
                length: len,
                cmd: txcmd::EOP | txcmd::RS | txcmd::IFCS,
                ..Default::default()
            }
            .to_bytes()
        };
        let mut reserved =
            TxDataDesc::new(0x1000, 64, txcmd::DEXT | txcmd::EOP | txcmd::RS, 0, 0).to_bytes();
        reserved[10] = 0x30;
        let long = TxDataDesc::new(
            G_TX_BUFS,
            20_000,
            txcmd::DEXT | txcmd::EOP | txcmd::RS,
            0,
            0,
        )
        .to_bytes();
        let cases: Vec<([u8; 16], DropReason)> = vec![
            (legacy(RAM_END + 0x100, 64), DropReason::Protected),
            (legacy(DPI_REGION.start, 64), DropReason::Protected),
            (legacy(RAM_END - 32, 64), DropReason::Protected),
            (legacy(MEM_END + 0x1000, 64), DropReason::OutsideRam),
            (legacy(u64::MAX - 10, 64), DropReason::Overflow),
            (legacy(G_TX_BUFS, 0), DropReason::Empty),
            (reserved, DropReason::ReservedDescriptor),
            (long, DropReason::TooLong),
        ];
        let protected_before = e.read(RAM_END, 4096);
        let good = frame(1, 100);
        for (raw, why) in &cases {
            let before = e.dpi.counters().tx.dropped(*why);
            let bad_idx = e.queue_raw(*raw);
            let good_idx = e.queue_legacy(&good);
            e.kick();
            e.run();
            assert_eq!(
                e.dpi.counters().tx.dropped(*why),
                before + 1,
                "{why:?} counted"
            );
            assert_eq!(
                e.guest_tx_status(bad_idx) & txsta::DD,
                txsta::DD,
                "{why:?} completed"
            );
            assert_eq!(e.guest_tx_status(good_idx) & txsta::DD, txsta::DD);
            assert_eq!(
                e.model.take_wire(),
                vec![good.clone()],
                "{why:?}: only the good frame"
            );
        }
        // A packet with no EOP within the limit.
        for _ in 0..ally_dpi::nic::dpi::MAX_PACKET_DESCS {
            let buf = e.tx_buf(e.tdt);
            e.queue_raw(
                LegacyTxDesc {
                    buffer_addr: buf,
                    length: 10,
                    cmd: txcmd::IFCS,
                    ..Default::default()
                }
                .to_bytes(),
            );
        }
        e.kick();
        e.run();
        e.queue_legacy(&good);
        e.kick();
        e.run();
        assert_eq!(
            e.dpi.counters().tx.dropped(DropReason::TooManyDescriptors),
            1
        );
        assert_eq!(e.model.take_wire(), vec![good.clone()]);
        assert_eq!(
            e.read(RAM_END, 4096),
            protected_before,
            "protected memory untouched"
        );
        assert_eq!(e.dpi.counters().tx.packets, cases.len() as u64 + 1);
    }
}

#[test]
fn nic_tx_bad_ring_stops_ring_until_reprogrammed() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 32, 2048);
    for (base, len, why) in [
        (DPI_REGION.start, 512, DropReason::Protected),
        (RAM_END - 256, 512, DropReason::Protected),
        (MEM_END + 4096, 512, DropReason::OutsideRam),
    ] {
        let before = e.dpi.counters().tx.stopped(why);
        e.gw(Reg::TDBAL, base as u32);
        e.gw(Reg::TDBAH, (base >> 32) as u32);
        e.gw(Reg::TDLEN, len);
        e.gw(Reg::TDT, 3);
        e.run();
        assert_eq!(
            e.dpi.counters().tx.stopped(why),
            before + 1,
            "{base:#x}: {why:?}"
        );
        assert!(e.model.take_wire().is_empty());
    }
    // Length not a multiple of 128 cannot even be expressed (bits 6:0 are dropped), but an
    // oversized TDT can.
    e.setup(32, 32, 2048);
    e.gw(Reg::TDT, 40);
    e.run();
    assert_eq!(e.dpi.counters().tx.stopped(DropReason::BadTail), 1);
    e.setup(32, 32, 2048);
    e.queue_legacy(&frame(9, 64));
    e.kick();
    e.run();
    assert_eq!(e.model.take_wire(), vec![frame(9, 64)]);
}

#[test]
fn nic_tx_backpressure_when_real_ring_is_full() {
    let c = DpiConfig {
        tx_ring: 8,
        ..cfg(Mode::ZeroCopy)
    };
    let mut e = env(c, Flavor::Qemu, false, PassAll);
    e.setup(64, 32, 2048);
    let frames: Vec<Vec<u8>> = (0..40).map(|i| frame(i, 64)).collect();
    for f in &frames {
        e.queue_legacy(f);
    }
    e.kick();
    e.run();
    // The device has not run: only 7 real descriptors are free; the rest wait in the guest ring.
    assert_eq!(e.dpi.counters().tx.packets, 7);
    assert!(e.dpi.counters().tx.backpressure > 0);
    assert_eq!(e.gr(Reg::TDH), 0);
    let mut wire = Vec::new();
    for _ in 0..20 {
        e.model.process();
        e.run();
        wire.extend(e.model.take_wire());
    }
    assert_eq!(wire, frames);
    assert_eq!(e.gr(Reg::TDH), 40);
}

/// The tests' hook: drops frames whose first payload byte (offset 14) is 0xBA.
fn drop_marked(f: &[u8], _d: Direction) -> HookVerdict {
    if f[14] == 0xBA {
        HookVerdict::Drop
    } else {
        HookVerdict::Pass
    }
}

/// One packet per doorbell (the engine's one-descriptor path): a hook drop and a full real
/// ring, with earlier packets still in flight (the device runs only when told).
#[test]
fn nic_tx_one_per_doorbell_drop_and_backpressure() {
    let hook = drop_marked;
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let c = DpiConfig {
            tx_ring: 8,
            ..cfg(mode)
        };
        let mut e = env(c, Flavor::Qemu, false, hook);
        e.setup(64, 32, 2048);
        let frames: Vec<Vec<u8>> = (0..12)
            .map(|i| {
                let mut f = frame(i, 64 + i as usize);
                if i % 4 == 2 {
                    f[14] = 0xBA;
                }
                f
            })
            .collect();
        let mut polls_moved = Vec::new();
        for f in &frames {
            e.queue_legacy(f);
            e.kick();
            polls_moved.push(e.dpi.poll());
        }
        // The device has not run: seven real descriptors hold the first seven good frames;
        // the drops in between (frames 2 and 6) were consumed and counted, not posted.
        let cnt = e.dpi.counters().clone();
        assert_eq!(cnt.tx.packets, 7);
        assert_eq!(cnt.tx.dropped(DropReason::Verdict), 2);
        assert_eq!(polls_moved[..9], [1; 9], "one packet moved per doorbell");
        assert_eq!(polls_moved[9..], [0; 3], "then the real ring is full");
        assert_eq!(cnt.tx.backpressure, 3);
        assert_eq!(e.gr(Reg::TDH), 0, "nothing completed before the device ran");
        assert_eq!(e.dpi.tx_in_flight(), 9);
        // The device sends; everything completes in order, drops with DD like the rest.
        let mut wire = Vec::new();
        for _ in 0..10 {
            e.model.process();
            e.run();
            wire.extend(e.model.take_wire());
        }
        let good: Vec<Vec<u8>> = frames.iter().filter(|f| f[14] != 0xBA).cloned().collect();
        assert_eq!(wire, good);
        for i in 0..12 {
            assert_eq!(
                e.guest_tx_status(i) & txsta::DD,
                txsta::DD,
                "descriptor {i}"
            );
        }
        assert_eq!(e.gr(Reg::TDH), 12);
        let cnt = e.dpi.counters();
        assert_eq!(cnt.tx.packets, 9);
        assert_eq!(cnt.tx.wire_frames, 9);
        assert_eq!(
            cnt.tx.bytes,
            good.iter().map(|f| f.len() as u64).sum::<u64>()
        );
        assert_eq!(cnt.tx.dropped(DropReason::Verdict), 3);
        assert_eq!(cnt.tx.packets + cnt.tx.total_dropped(), 12);
        assert_eq!(e.dpi.tx_in_flight(), 0);
    }
}

fn rx_roundtrip(flavor: Flavor) {
    let mut e = env(cfg(Mode::Copy), flavor, true, PassAll);
    e.setup(32, 16, 2048);
    let frames: Vec<Vec<u8>> = (0..100)
        .map(|i| frame(i, 60 + (i as usize * 131) % 1455))
        .collect();
    let mut got = Vec::new();
    for batch in frames.chunks(10) {
        for f in batch {
            e.model.inject(f);
        }
        e.run();
        assert_ne!(e.shadow.peek_icr() & icr::RXT0, 0);
        for (f, d) in e.guest_rx() {
            assert_eq!(d.status & (rxsta::DD | rxsta::EOP), rxsta::DD | rxsta::EOP);
            assert_eq!(d.errors, 0);
            assert_eq!(usize::from(d.length), f.len());
            got.push(f);
        }
        assert_eq!(e.gr(Reg::RDH), e.rx_next);
    }
    assert_eq!(got, frames);
    let c = e.dpi.counters();
    assert_eq!(c.rx.packets, 100);
    assert_eq!(c.rx.total_dropped(), 0);
}

#[test]
fn nic_rx_qemu() {
    rx_roundtrip(Flavor::Qemu);
}

#[test]
fn nic_rx_bochs_quirk_never_triggered() {
    rx_roundtrip(Flavor::Bochs);
}

#[test]
fn nic_rx_split_across_guest_and_real_buffers() {
    // Guest buffers of 1024: a 1500-byte frame takes two guest descriptors.
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 16, 1024);
    let f = frame(5, 1500);
    e.model.inject(&f);
    e.run();
    let first = RxDesc::from_bytes(&e.read(G_RX_RING, 16).try_into().unwrap());
    assert_eq!(first.status, rxsta::DD, "no EOP on the first part");
    assert_eq!(first.length, 1024);
    let got = e.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, f);
    // A 5000-byte jumbo frame spans three 2048-byte DPI buffers and one 8192 guest buffer.
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 16, 8192);
    let j = frame(6, 5000);
    e.model.inject(&j);
    e.run();
    let got = e.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, j);
    assert_eq!(got[0].1.length, 5000);
}

#[test]
fn nic_rx_waits_for_guest_buffers() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 16, 2048);
    // The guest holds back all buffers: RDT == RDH means none (SDM 3.2.6).
    e.gw(Reg::RDT, 0);
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 200)).collect();
    for f in &frames {
        e.model.inject(f);
    }
    e.run();
    assert_eq!(e.dpi.counters().rx.packets, 0);
    assert!(e.dpi.counters().rx.backpressure > 0);
    e.gw(Reg::RDT, 15);
    e.run();
    let got: Vec<Vec<u8>> = e.guest_rx().into_iter().map(|(f, _)| f).collect();
    assert_eq!(got, frames);
}

#[test]
fn nic_rx_bad_guest_buffer_gets_error_and_no_write() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 16, 2048);
    let before = e.read(DPI_REGION.start - 4096, 4096);
    for (k, addr) in [DPI_REGION.start - 4096, MEM_END + 8192, RAM_END - 100]
        .into_iter()
        .enumerate()
    {
        let d = RxDesc {
            buffer_addr: addr,
            ..Default::default()
        };
        e.write(G_RX_RING + k as u64 * 16, &d.to_bytes());
    }
    for i in 0..4 {
        e.model.inject(&frame(i, 300));
    }
    e.run();
    for k in 0..3u64 {
        let d = RxDesc::from_bytes(&e.read(G_RX_RING + k * 16, 16).try_into().unwrap());
        assert_eq!(
            (d.status, d.errors, d.length),
            (rxsta::DD | rxsta::EOP, rxerr::RXE, 0)
        );
    }
    assert_eq!(e.read(DPI_REGION.start - 4096, 4096), before);
    let c = e.dpi.counters();
    assert_eq!(c.rx.dropped(DropReason::Protected), 2);
    assert_eq!(c.rx.dropped(DropReason::OutsideRam), 1);
    assert_eq!(c.rx.packets, 1);
    let got = e.guest_rx();
    assert_eq!(got.last().unwrap().0, frame(3, 300));
}

#[test]
fn nic_rx_disabled_receiver() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, false, PassAll);
    e.setup(32, 16, 2048);
    // While the guest receives, the device filters as the guest asked (here: no promiscuity).
    assert_eq!(
        e.model.read32(Reg::RCTL) & (rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM),
        rctl::EN | rctl::BAM
    );
    // A frame lands in the DPI ring, then the guest turns its receiver off.
    e.model.inject(&frame(1, 100));
    e.model.process();
    e.gw(Reg::RCTL, e.gr(Reg::RCTL) & !rctl::EN);
    e.run();
    assert_eq!(e.dpi.counters().rx.dropped(DropReason::GuestRxOff), 1);
    // The real receiver stays on: a frame arriving now is Ally's to drop and count, where the
    // device would have dropped it uncounted.
    let real = e.model.read32(Reg::RCTL);
    assert_eq!(
        real & (rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM),
        rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM,
        "every frame, to be counted: {real:#x}"
    );
    e.model.inject(&frame(2, 100));
    e.model.process();
    e.run();
    assert_eq!(e.dpi.counters().rx.dropped(DropReason::GuestRxOff), 2);
    assert_eq!(e.dpi.counters().rx.wire_frames, 2);
    assert_eq!(
        e.model
            .stats
            .rx_discarded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(e.guest_rx().is_empty());
}

#[test]
fn nic_hook_drops_in_both_directions() {
    let hook = drop_marked;
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let mut e = env(cfg(mode), Flavor::Qemu, true, hook);
        e.setup(32, 16, 2048);
        let mut bad = frame(1, 100);
        bad[14] = 0xBA;
        let good = frame(2, 100);
        let bi = e.queue_legacy(&bad);
        e.queue_legacy(&good);
        e.kick();
        e.model.inject(&bad);
        e.model.inject(&good);
        e.run();
        assert_eq!(e.model.take_wire(), vec![good.clone()]);
        assert_eq!(e.guest_tx_status(bi) & txsta::DD, txsta::DD);
        let got: Vec<Vec<u8>> = e.guest_rx().into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, vec![good.clone()]);
        let c = e.dpi.counters();
        assert_eq!(
            (
                c.tx.dropped(DropReason::Verdict),
                c.rx.dropped(DropReason::Verdict)
            ),
            (1, 1)
        );
        // Balance: every guest frame sent or counted; every received frame delivered or counted.
        assert_eq!(c.tx.packets + c.tx.total_dropped(), 2);
        assert_eq!(c.rx.packets + c.rx.total_dropped(), 2);
    }
}

/// Issue 12's checksum normalization: frames whose receiver would discard them for a wrong
/// IPv4 header, TCP or UDP checksum are dropped before the hook, both ways, on the TX fast
/// path (one legacy descriptor) and the general path (a context offload inserting the other
/// checksum), counted as `checksum`, completed in order, and the frames around them pass.
#[test]
fn nic_frames_with_wrong_checksums_never_reach_the_hook() {
    for mode in [Mode::Copy, Mode::ZeroCopy] {
        let inspected = std::cell::RefCell::new(Vec::new());
        let hook = |f: &[u8], _: Direction| {
            inspected.borrow_mut().push(f.to_vec());
            HookVerdict::Pass
        };
        let mut e = env(cfg(mode), Flavor::Qemu, true, hook);
        e.setup(32, 16, 2048);
        let good = tagged_tcp(1, 300);
        let mut bad_ip = tagged_tcp(2, 300);
        bad_ip[24] ^= 0x5a;
        let mut bad_tcp = tagged_tcp(3, 300);
        bad_tcp[100] ^= 0x01;
        // TXSM: the device writes the TCP checksum, so its 0 seed is fine; the IPv4 header
        // checksum is the frame's own, and wrong.
        let seeded = |seq: u32| {
            let mut f = tcp4_frame(seq, 300);
            f[26..30].copy_from_slice(&seq.to_be_bytes());
            f[24..26].fill(0);
            let sum = ally_dpi::engine::packet::internet_checksum(&f[14..34]);
            f[24..26].copy_from_slice(&sum.to_be_bytes());
            f
        };
        let mut offload_bad_ip = seeded(4);
        offload_bad_ip[24] ^= 0x5a;
        let ctx = ally_dpi::nic::desc::TxContextDesc {
            tucss: 34,
            tucso: 50,
            cmd_and_length: (u32::from(txcmd::DEXT | txcmd::TUCMD_TCP) << 24),
            ..Default::default()
        };
        let offload_ok = seeded(5);
        let first = e.queue_legacy(&good);
        e.queue_legacy(&bad_ip);
        e.queue_legacy(&bad_tcp);
        e.queue_ctx_data(&offload_bad_ip, 1, ctx, 0, ally_dpi::nic::desc::popts::TXSM);
        e.queue_ctx_data(&offload_ok, 1, ctx, 0, ally_dpi::nic::desc::popts::TXSM);
        e.kick();
        for f in [&good, &bad_ip, &bad_tcp] {
            e.model.inject(f);
        }
        e.run();
        let wire = e.model.take_wire();
        assert_eq!(wire.len(), 2, "{mode:?}");
        assert_eq!(wire[0], good, "{mode:?}");
        assert_eq!(&wire[1][26..30], &5u32.to_be_bytes(), "{mode:?}");
        for i in first..first + 3 {
            assert_eq!(e.guest_tx_status(i) & txsta::DD, txsta::DD, "{mode:?} {i}");
        }
        assert_eq!(
            e.gr(Reg::TDH),
            e.tdt,
            "{mode:?}: every descriptor completed"
        );
        let got: Vec<Vec<u8>> = e.guest_rx().into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, vec![good.clone()], "{mode:?}");
        // The hook saw the two TX frames that went out and the one received.
        let seen = inspected.borrow();
        assert_eq!(seen.len(), 3, "{mode:?}");
        assert!(seen
            .iter()
            .all(|f| f[26..30] == 1u32.to_be_bytes() || f[26..30] == 5u32.to_be_bytes()));
        let c = e.dpi.counters();
        assert_eq!(
            (
                c.tx.dropped(DropReason::Checksum),
                c.rx.dropped(DropReason::Checksum),
                c.tx.total_dropped(),
                c.rx.total_dropped()
            ),
            (3, 2, 3, 2),
            "{mode:?}"
        );
    }
}

#[test]
fn nic_interrupts_mask_read_to_clear_and_passthrough() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(32, 16, 2048);
    e.gw(Reg::IMC, 0xFFFF_FFFF);
    e.gr(Reg::ICR);
    e.model.inject(&frame(1, 64));
    e.run();
    assert_eq!(e.shadow.peek_icr() & icr::RXT0, icr::RXT0);
    assert!(!e.model.irq_pending(), "masked: no interrupt");
    e.gw(Reg::IMS, icr::RXT0);
    assert!(
        e.model.irq_pending(),
        "unmasking a pending cause asserts the line"
    );
    assert_eq!(e.gr(Reg::ICR), icr::RXT0);
    assert!(!e.model.irq_pending());
    assert_eq!(e.gr(Reg::ICR), 0, "read-to-clear");
    // ICS from the guest, write-1-to-clear ICR, IMS readback.
    e.gw(Reg::ICS, icr::TXDW);
    assert!(!e.model.irq_pending());
    e.gw(Reg::IMS, icr::TXDW | icr::LSC);
    assert!(e.model.irq_pending());
    e.gw(Reg::ICR, icr::TXDW);
    assert_eq!(e.shadow.peek_icr(), 0);
    assert_eq!(e.gr(Reg::IMS), icr::RXT0 | icr::TXDW | icr::LSC);
    // Masking everything drops Ally's doorbell cause from the line.
    e.gw(Reg::ICS, icr::RXT0);
    assert!(e.model.irq_pending());
    e.gw(Reg::IMC, icr::RXT0);
    assert!(!e.model.irq_pending());
    e.gr(Reg::ICR);
    // Link status change is the real device's own cause, passed through when enabled.
    e.model.set_link(false);
    assert!(e.model.irq_pending());
    assert_eq!(e.gr(Reg::ICR), icr::LSC);
    assert_eq!(e.gr(Reg::STATUS) & 2, 0, "STATUS is forwarded: link down");
}

#[test]
fn nic_reset_mid_flight_loses_nothing_accepted() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, false, PassAll);
    e.setup(32, 16, 2048);
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 500)).collect();
    for f in &frames {
        e.queue_legacy(f);
    }
    e.kick();
    e.run();
    assert_eq!(e.dpi.tx_in_flight(), 5);
    // The driver resets (rmmod / reload): clear the old ring memory as a freed page would be.
    e.gw(Reg::CTRL, ctrl::RST | ctrl::SLU);
    for i in 0..32 {
        e.write(G_TX_RING + i * 16, &[0xEE; 16]);
    }
    assert_eq!(e.gr(Reg::TDLEN), 0);
    assert_eq!(e.gr(Reg::RCTL), 0);
    assert_eq!(e.gr(Reg::IMS), 0);
    assert_eq!(
        e.model.read32(Reg::CTRL) & ctrl::RST,
        0,
        "the real device is not reset"
    );
    e.model.process();
    e.run();
    // Accepted frames still went out; the old ring was not written to.
    assert_eq!(e.model.take_wire(), frames);
    assert_eq!(e.read(G_TX_RING, 16), vec![0xEE; 16]);
    assert_eq!(e.dpi.counters().tx.dropped(DropReason::StaleCompletion), 5);
    assert_eq!(e.dpi.counters().resets, 1);
    // The driver comes back with a different ring size; traffic flows again.
    e.setup(16, 8, 2048);
    let f = frame(77, 300);
    e.queue_legacy(&f);
    e.kick();
    e.model.inject(&f);
    for _ in 0..3 {
        e.model.process();
        e.run();
    }
    assert_eq!(e.model.take_wire(), vec![f.clone()]);
    assert_eq!(e.guest_rx()[0].0, f);
}

#[test]
fn nic_ring_size_change_and_tctl_toggle() {
    let mut e = env(cfg(Mode::ZeroCopy), Flavor::Qemu, true, PassAll);
    e.setup(64, 16, 2048);
    e.queue_legacy(&frame(1, 64));
    e.kick();
    e.run();
    e.setup(32, 16, 2048);
    assert_eq!(e.gr(Reg::TDLEN), 512);
    // TCTL.EN off: nothing is consumed until it is back on.
    e.gw(Reg::TCTL, 0);
    e.queue_legacy(&frame(2, 64));
    e.kick();
    e.run();
    assert_eq!(e.model.take_wire(), vec![frame(1, 64)]);
    e.gw(Reg::TCTL, ally_dpi::nic::regs::tctl::EN);
    e.run();
    assert_eq!(e.model.take_wire(), vec![frame(2, 64)]);
}

#[test]
fn nic_model_registers_and_bochs_rdt_quirk() {
    for (flavor, expect) in [(Flavor::Qemu, 0u64), (Flavor::Bochs, 1)] {
        let mem: &'static _ = Box::leak(Box::new(ally_dpi::nic::mem::FakeDma::new(
            0,
            4 * MIB as usize,
        )));
        let m = ally_dpi::nic::model::E1000Model::new(
            mem,
            ally_dpi::nic::model::ModelConfig {
                flavor,
                immediate: true,
                ..Default::default()
            },
        );
        // ICR: read-to-clear, write-1-to-clear; ICS/IMS/IMC; CTRL.RST defaults.
        m.write32(Reg::ICS, icr::RXT0 | icr::TXDW);
        m.write32(Reg::ICR, icr::TXDW);
        m.write32(Reg::IMS, icr::RXT0);
        assert!(m.irq_pending());
        m.write32(Reg::IMC, icr::RXT0);
        assert!(!m.irq_pending());
        assert_eq!(m.read32(Reg::ICR), icr::RXT0);
        assert_eq!(m.read32(Reg::ICR), 0);
        m.write32(Reg::RCTL, rctl::EN);
        m.write32(Reg::CTRL, ctrl::RST);
        assert_eq!(m.read32(Reg::RCTL), 0);
        assert_eq!(m.read32(Reg::CTRL) & ctrl::RST, 0);
        // RX ring of 8 with RDT == RDH == 0 just written.
        for i in 0..8u64 {
            let d = RxDesc {
                buffer_addr: 0x10_0000 + i * 2048,
                ..Default::default()
            };
            mem.write(
                ally_hypervisor::addr::HostPhysAddr(0x1000 + i * 16),
                &d.to_bytes(),
            )
            .unwrap();
        }
        m.write32(Reg::RDBAL, 0x1000);
        m.write32(Reg::RDLEN, 128);
        m.write32(Reg::RCTL, rctl::EN);
        m.write32(Reg::RDT, 0);
        m.inject(&frame(1, 64));
        assert_eq!(
            m.stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed),
            expect,
            "{flavor:?}"
        );
    }
}

#[test]
fn nic_counters_balance_under_mixed_traffic() {
    let hook = |f: &[u8], _d: Direction| {
        if f[20].is_multiple_of(7) {
            HookVerdict::Drop
        } else {
            HookVerdict::Pass
        }
    };
    let mut e = env(cfg(Mode::Copy), Flavor::Bochs, true, hook);
    e.setup(64, 32, 2048);
    let mut seed = 12345u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut sent, mut injected) = (0u64, 0u64);
    let mut delivered = 0u64;
    for round in 0..200 {
        for _ in 0..(rnd() % 8) {
            let f = frame(round, 60 + (rnd() % 1400) as usize);
            if rnd() % 11 == 0 {
                e.queue_raw(
                    LegacyTxDesc {
                        buffer_addr: RAM_END + 64,
                        length: 64,
                        cmd: txcmd::EOP | txcmd::RS,
                        ..Default::default()
                    }
                    .to_bytes(),
                );
            } else {
                e.queue_legacy(&f);
            }
            sent += 1;
        }
        e.kick();
        for _ in 0..(rnd() % 6) {
            e.model
                .inject(&frame(round + 1000, 60 + (rnd() % 1400) as usize));
            injected += 1;
        }
        e.run();
        delivered += e.guest_rx().len() as u64;
    }
    let c = e.dpi.counters();
    let wire = e.model.take_wire().len() as u64;
    assert_eq!(c.tx.packets, wire);
    assert_eq!(c.tx.packets + c.tx.total_dropped(), sent);
    assert_eq!(c.rx.packets, delivered);
    assert_eq!(c.rx.packets + c.rx.total_dropped(), injected);
    assert!(c.tx.dropped(DropReason::Verdict) > 0 && c.tx.dropped(DropReason::Protected) > 0);
}

/// Doorbells seen by the first poll after the loop waited count as idle wake-ups as well;
/// those seen by a busy loop count only in the overall doorbell latency.
#[test]
fn idle_wake_ups_are_told_from_busy_doorbells() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(64, 64, 2048);
    e.run();
    let before = e.dpi.counters().clone();

    e.queue_legacy(&frame(1, 100));
    e.kick();
    e.run();
    let busy = e.dpi.counters().clone();
    assert_eq!(
        busy.wake_latency.samples(),
        before.wake_latency.samples() + 1
    );
    assert_eq!(
        busy.idle_wake_latency.samples(),
        before.idle_wake_latency.samples()
    );

    e.queue_legacy(&frame(2, 100));
    e.kick();
    e.dpi.note_woken();
    e.run();
    let woken = e.dpi.counters().clone();
    assert_eq!(
        woken.wake_latency.samples(),
        busy.wake_latency.samples() + 1
    );
    assert_eq!(
        woken.idle_wake_latency.samples(),
        busy.idle_wake_latency.samples() + 1
    );

    // The mark is consumed by one poll: a later doorbell is a busy one again.
    e.queue_legacy(&frame(3, 100));
    e.kick();
    e.run();
    let after = e.dpi.counters().clone();
    assert_eq!(
        after.idle_wake_latency.samples(),
        woken.idle_wake_latency.samples()
    );
    assert_eq!(
        after.wake_latency.samples(),
        woken.wake_latency.samples() + 1
    );
}

/// The last frame taken off the wire is fingerprinted (length and FNV-1a 64) with each
/// sample, from the DPI buffer that still holds it.
#[test]
fn nic_last_received_frame_is_fingerprinted() {
    use ally_dpi::nic::dpi::{fnv1a, FINGERPRINT_BYTES, FNV_OFFSET};
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, PassAll);
    e.setup(64, 64, 2048);
    e.dpi.sample_device_statistics();
    assert_eq!(e.dpi.counters().last_rx_frame, None);
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(100 + i, 64 + 300 * i as usize))
        .collect();
    for f in &frames {
        e.model.inject(f);
    }
    e.run();
    assert_eq!(e.guest_rx().len(), 5);
    e.dpi.sample_device_statistics();
    let last = frames.last().unwrap();
    assert_eq!(
        e.dpi.counters().last_rx_frame,
        Some((last.len(), fnv1a(FNV_OFFSET, &last[..FINGERPRINT_BYTES])))
    );
}

/// Frames the device misses while Ally's receive ring is full (the guest gives no buffers)
/// are counted in MPC: Ally's count takes every one of them, the guest's driver reads the
/// same count through the trapped register as the device keeps it, and the wire balances.
fn missed_frames_are_counted(mpc_running: bool) {
    let fifo = 8;
    let mut e = env_with_model(
        cfg(Mode::Copy),
        ally_dpi::nic::model::ModelConfig {
            rx_fifo_frames: fifo,
            mpc_running,
            ..Default::default()
        },
        PassAll,
    );
    e.setup(32, 16, 2048);
    let missed = |e: &Env<PassAll>| {
        e.model
            .stats
            .rx_missed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Ally samples MPC before anything was missed: nothing to count.
    e.dpi.sample_missed_frames();
    assert_eq!(e.dpi.counters().rx_missed, 0);
    // The guest holds back every buffer: Ally's ring fills, then the device's buffer.
    e.gw(Reg::RDT, 0);
    let real_ring = DpiConfig::default().rx_ring as usize;
    let sent = real_ring + fifo + 100;
    for i in 0..sent {
        e.model.inject(&frame(i as u32, 200));
        e.run();
    }
    let first = missed(&e);
    assert!(first >= 100, "{first}");
    // The guest's driver reads MPC before Ally samples it: both still see every frame.
    assert_eq!(u64::from(e.gr(Reg::MPC)), first);
    let again = if mpc_running { first } else { 0 };
    assert_eq!(u64::from(e.gr(Reg::MPC)), again, "the device's semantics");
    e.dpi.sample_missed_frames();
    assert_eq!(e.dpi.counters().rx_missed, first);
    e.dpi.sample_missed_frames();
    assert_eq!(e.dpi.counters().rx_missed, first, "counted once");
    // More missed frames, now sampled by Ally first: the guest's next read still has them.
    for i in 0..7 {
        e.model.inject(&frame(10_000 + i, 200));
    }
    e.dpi.sample_missed_frames();
    assert_eq!(e.dpi.counters().rx_missed, first + 7);
    let expect = if mpc_running { first + 7 } else { 7 };
    assert_eq!(u64::from(e.gr(Reg::MPC)), expect);
    // A guest reset clears a clearing count for the guest, never Ally's count.
    e.model.inject(&frame(20_000, 200));
    e.gw(Reg::CTRL, e.gr(Reg::CTRL) | ctrl::RST);
    let expect = if mpc_running { first + 8 } else { 0 };
    assert_eq!(u64::from(e.gr(Reg::MPC)), expect);
    e.dpi.sample_missed_frames();
    assert_eq!(e.dpi.counters().rx_missed, first + 8);
    assert_eq!(missed(&e), first + 8);
    // The guest gives its buffers back: what the device held arrives; the wire balances.
    e.setup(32, 16, 2048);
    for _ in 0..64 {
        e.guest_rx();
        e.run();
    }
    e.dpi.sample_missed_frames();
    let c = e.dpi.counters();
    assert_eq!(e.model.wire_in_len(), 0);
    assert_eq!(c.rx.wire_frames + c.rx_missed, sent as u64 + 8);
}

#[test]
fn nic_rx_missed_frames_counted_with_a_clearing_mpc() {
    missed_frames_are_counted(false);
}

#[test]
fn nic_rx_missed_frames_counted_with_a_running_mpc() {
    missed_frames_are_counted(true);
}

/// A hook that holds every frame tagged with an odd sequence number until the next frame of
/// its direction passes, then releases it (as the stream tracker releases an out-of-order
/// segment once its gap is filled).
#[derive(Default)]
struct HoldOdd {
    held: [Option<Vec<u8>>; 2],
    released: [std::collections::VecDeque<Vec<u8>>; 2],
    /// The 802.1Q tag of every frame inspected, by direction (`None`: untagged).
    tags_seen: [Vec<Option<u16>>; 2],
}

/// The 802.1Q TCI of a tagged frame.
fn vlan_tci(frame: &[u8]) -> Option<u16> {
    (frame[12..14] == [0x81, 0x00]).then(|| u16::from_be_bytes([frame[14], frame[15]]))
}

/// The sequence number [`tagged_tcp`] put in a frame, behind a VLAN tag or not.
fn frame_seq(frame: &[u8]) -> u32 {
    let at = if vlan_tci(frame).is_some() { 30 } else { 26 };
    u32::from_be_bytes(frame[at..at + 4].try_into().unwrap())
}

/// `frame` with an 802.1Q tag after its MAC addresses.
fn with_vlan_tag(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::ToWire => 0,
        Direction::FromWire => 1,
    }
}

impl ally_dpi::nic::PacketHook for HoldOdd {
    fn inspect(&mut self, frame: &[u8], dir: Direction) -> HookVerdict {
        let i = dir_index(dir);
        self.tags_seen[i].push(vlan_tci(frame));
        let seq = frame_seq(frame);
        if seq % 2 == 1 {
            self.held[i] = Some(frame.to_vec());
            return HookVerdict::Hold;
        }
        if let Some(h) = self.held[i].take() {
            self.released[i].push_back(h);
        }
        HookVerdict::Pass
    }
    fn take_forward(&mut self, dir: Direction) -> Option<Vec<u8>> {
        self.released[dir_index(dir)].pop_front()
    }
    fn has_forward(&self) -> bool {
        self.released.iter().any(|q| !q.is_empty())
    }
}

/// A TCP/IPv4 frame whose IP source address carries `seq` (read back at bytes 26..30), its
/// checksums correct (sent without offloads).
fn tagged_tcp(seq: u32, payload: usize) -> Vec<u8> {
    let mut f = tcp4_frame(seq, payload);
    f[26..30].copy_from_slice(&seq.to_be_bytes());
    ally_dpi::nic::offload::fill_checksums(&mut f);
    f
}

/// Whether a TCP/IPv4 frame's IP header and TCP checksums are right (RFC 1071).
fn checksums_hold(f: &[u8]) -> bool {
    use ally_dpi::engine::packet::internet_checksum;
    let ip_ok = internet_checksum(&f[14..34]) == 0;
    let tcp_len = f.len() - 34;
    let mut p = Vec::new();
    p.extend_from_slice(&f[26..34]);
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    p.extend_from_slice(&f[34..]);
    ip_ok && internet_checksum(&p) == 0
}

fn tx_hold_and_release(mode: Mode) {
    let mut e = env(cfg(mode), Flavor::Qemu, true, HoldOdd::default());
    e.setup(64, 64, 2048);
    // Held: 1, 3; passed: 2, 4, each releasing the one held before it.
    let frames: Vec<Vec<u8>> = (1..=4).map(|s| tagged_tcp(s, 100 + s as usize)).collect();
    for f in &frames {
        e.queue_legacy(f);
    }
    e.kick();
    e.run();
    // Every guest descriptor completed, held ones included: the guest's ring moves on.
    for k in 0..4 {
        assert_eq!(
            e.guest_tx_status(k) & txsta::DD,
            txsta::DD,
            "descriptor {k}"
        );
    }
    assert_eq!(e.gr(Reg::TDH), e.tdt);
    let wire = e.model.take_wire();
    let seqs: Vec<u32> = wire
        .iter()
        .map(|f| u32::from_be_bytes(f[26..30].try_into().unwrap()))
        .collect();
    // Released frames go out after the poll's batch, in the order they were released (a TCP
    // receiver puts them back in sequence).
    assert_eq!(seqs, [2, 4, 1, 3]);
    // Released frames carry what the guest sent, with the checksums Ally filled in.
    for (w, s) in wire.iter().zip(&seqs) {
        let f = &frames[*s as usize - 1];
        assert_eq!(w.len(), f.len());
        if s % 2 == 1 {
            assert!(checksums_hold(w), "seq {s}");
            assert_eq!(w[34..50], f[34..50]);
            assert_eq!(w[52..], f[52..]);
        } else {
            assert_eq!(w, f);
        }
    }
    let c = e.dpi.counters();
    assert_eq!((c.tx.held, c.tx.released, c.tx.released_refused), (2, 2, 0));
    assert_eq!(c.tx.packets, 4);
    assert_eq!(c.tx.total_dropped(), 0);
    // The engine goes on as before.
    let more = tagged_tcp(6, 60);
    e.queue_legacy(&more);
    e.kick();
    e.run();
    assert_eq!(e.model.take_wire(), vec![more]);
    assert_eq!(e.gr(Reg::TDH), e.tdt);
}

#[test]
fn nic_tx_held_frames_go_out_when_released_copy_mode() {
    tx_hold_and_release(Mode::Copy);
}

#[test]
fn nic_tx_held_frames_go_out_when_released_zero_copy_mode() {
    tx_hold_and_release(Mode::ZeroCopy);
}

#[test]
fn nic_rx_held_frames_reach_the_guest_when_released() {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, HoldOdd::default());
    e.setup(32, 16, 2048);
    let frames: Vec<Vec<u8>> = (1..=4).map(|s| tagged_tcp(s, 200)).collect();
    for f in &frames {
        e.model.inject(f);
    }
    e.run();
    let got = e.guest_rx();
    let seqs: Vec<u32> = got
        .iter()
        .map(|(f, _)| u32::from_be_bytes(f[26..30].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, [2, 4, 1, 3]);
    for (f, d) in &got {
        assert_eq!(
            f,
            &frames[u32::from_be_bytes(f[26..30].try_into().unwrap()) as usize - 1]
        );
        assert_eq!(d.status & (rxsta::DD | rxsta::EOP), rxsta::DD | rxsta::EOP);
        assert_eq!(d.errors, 0);
    }
    // A released frame's checksums were not checked by the device: IXSM says so.
    assert_ne!(got[2].1.status & rxsta::IXSM, 0);
    assert_eq!(got[0].1.status & rxsta::IXSM, 0);
    assert_ne!(e.shadow.peek_icr() & icr::RXT0, 0);
    let c = e.dpi.counters();
    assert_eq!((c.rx.held, c.rx.released, c.rx.packets), (2, 2, 4));
    assert_eq!(e.gr(Reg::RDH), e.rx_next);
}

/// PCP 5, VLAN 42.
const TCI: u16 = 5 << 13 | 42;

/// VLAN mode: the hook inspects each frame with the tag the device inserts (VLE), and a held
/// frame goes out with it when released (Ally sends it tagged in the frame). Without VLAN mode
/// the device ignores VLE, and so does Ally.
fn tx_vlan_hold_and_release(mode: Mode, vlan_mode: bool) {
    let mut e = env(cfg(mode), Flavor::Qemu, true, HoldOdd::default());
    e.setup(64, 64, 2048);
    e.gw(Reg::CTRL, ctrl::SLU | if vlan_mode { ctrl::VME } else { 0 });
    let frames: Vec<Vec<u8>> = (1..=4).map(|s| tagged_tcp(s, 100 + s as usize)).collect();
    for f in &frames {
        e.queue_legacy_vlan(f, TCI);
    }
    e.kick();
    e.run();
    let tag = vlan_mode.then_some(TCI);
    assert_eq!(e.dpi.hook_mut().tags_seen[0], [tag; 4]);
    let wire = e.model.take_wire();
    let seqs: Vec<u32> = wire.iter().map(|f| frame_seq(f)).collect();
    assert_eq!(seqs, [2, 4, 1, 3]);
    for (w, s) in wire.iter().zip(&seqs) {
        assert_eq!(vlan_tci(w), tag, "seq {s}: {w:02x?}");
        let untagged = match tag {
            Some(_) => [&w[..12], &w[16..]].concat(),
            None => w.clone(),
        };
        let f = &frames[*s as usize - 1];
        assert_eq!(untagged.len(), f.len());
        if s % 2 == 1 {
            assert!(checksums_hold(&untagged), "seq {s}");
            assert_eq!(untagged[34..50], f[34..50]);
        } else {
            assert_eq!(&untagged, f);
        }
    }
    let c = e.dpi.counters();
    assert_eq!((c.tx.held, c.tx.released, c.tx.released_refused), (2, 2, 0));
    assert_eq!(c.tx.total_dropped(), 0);
    assert_eq!(e.gr(Reg::TDH), e.tdt);
}

#[test]
fn nic_tx_vlan_tag_is_inspected_and_kept_by_released_frames_copy_mode() {
    tx_vlan_hold_and_release(Mode::Copy, true);
}

#[test]
fn nic_tx_vlan_tag_is_inspected_and_kept_by_released_frames_zero_copy_mode() {
    tx_vlan_hold_and_release(Mode::ZeroCopy, true);
}

#[test]
fn nic_tx_vle_without_vlan_mode_inserts_no_tag() {
    tx_vlan_hold_and_release(Mode::Copy, false);
}

/// VLAN mode on receive: the device takes the tag off into the descriptors (VP); the hook
/// inspects the frame as the wire carried it, and a held frame reaches the guest as the device
/// would have delivered it, untagged with VP and the tag in its special field. Without VLAN
/// mode the tag stays in the frame throughout.
fn rx_vlan_hold_and_release(vlan_mode: bool) {
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, HoldOdd::default());
    e.setup(32, 16, 2048);
    e.gw(Reg::CTRL, ctrl::SLU | if vlan_mode { ctrl::VME } else { 0 });
    let frames: Vec<Vec<u8>> = (1..=4).map(|s| tagged_tcp(s, 200)).collect();
    for f in &frames {
        e.model.inject(&with_vlan_tag(f, TCI));
    }
    e.run();
    assert_eq!(e.dpi.hook_mut().tags_seen[1], [Some(TCI); 4]);
    let got = e.guest_rx();
    let seqs: Vec<u32> = got.iter().map(|(f, _)| frame_seq(f)).collect();
    assert_eq!(seqs, [2, 4, 1, 3]);
    for (f, d) in &got {
        let sent = &frames[frame_seq(f) as usize - 1];
        if vlan_mode {
            assert_eq!(f, sent);
            assert_ne!(d.status & rxsta::VP, 0, "{d:?}");
            assert_eq!(d.special, TCI);
        } else {
            assert_eq!(f, &with_vlan_tag(sent, TCI));
            assert_eq!(d.status & rxsta::VP, 0, "{d:?}");
        }
    }
    let c = e.dpi.counters();
    assert_eq!((c.rx.held, c.rx.released, c.rx.packets), (2, 2, 4));
}

#[test]
fn nic_rx_vlan_tag_is_inspected_and_kept_by_released_frames() {
    rx_vlan_hold_and_release(true);
}

#[test]
fn nic_rx_without_vlan_mode_keeps_the_tag_in_the_frame() {
    rx_vlan_hold_and_release(false);
}

/// A released frame too long for one frame (a held TSO packet) is not sent; counted.
#[test]
fn nic_tx_released_frame_over_a_standard_frame_is_refused() {
    struct ReleaseBig(bool);
    impl ally_dpi::nic::PacketHook for ReleaseBig {
        fn inspect(&mut self, _: &[u8], _: Direction) -> HookVerdict {
            HookVerdict::Pass
        }
        fn take_forward(&mut self, dir: Direction) -> Option<Vec<u8>> {
            (dir == Direction::ToWire && !std::mem::replace(&mut self.0, true))
                .then(|| tagged_tcp(9, 3000))
        }
        fn has_forward(&self) -> bool {
            !self.0
        }
    }
    let mut e = env(cfg(Mode::Copy), Flavor::Qemu, true, ReleaseBig(false));
    e.setup(64, 64, 2048);
    e.run();
    assert!(e.model.take_wire().is_empty());
    assert_eq!(e.dpi.counters().tx.released_refused, 1);
}
