//! Transmit offloads against the software e1000 (issue 11 item 8): what Linux's e1000 driver
//! sends passes in both modes and the device applies it; offloads aimed anywhere but the
//! frame's own checksum fields and headers are dropped (`DropReason::Offload`), counted,
//! completed with DD, never inspected or sent, and the packets after them still go out.

mod nic_support;

use ally_dpi::nic::desc::{popts, txcmd, txsta, LegacyTxDesc, TxContextDesc};
use ally_dpi::nic::dpi::{DpiConfig, DropReason, Mode};
use ally_dpi::nic::model::Flavor;
use ally_dpi::nic::regs::Reg;
use ally_dpi::nic::{Direction, HookVerdict};
use nic_support::*;
use std::cell::Cell;

const MODES: [Mode; 2] = [Mode::Copy, Mode::ZeroCopy];

fn cfg(mode: Mode) -> DpiConfig {
    DpiConfig {
        mode,
        ..DpiConfig::default()
    }
}

fn tcp4(payload: usize) -> Vec<u8> {
    tcp4_frame(9, payload)
}

/// Ethernet + IPv6 (40 bytes) + UDP: UDP at 54 (checksum at 60), payload at 62.
fn udp6(payload: usize) -> Vec<u8> {
    let mut f = frame(4, 62 + payload);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    f[20] = 17;
    f[58..60].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    f[60..62].copy_from_slice(&[0, 0]);
    f
}

fn tucmd(bits: u8, paylen: u32) -> u32 {
    (u32::from(txcmd::DEXT | bits) << 24) | paylen
}

/// `e1000_tx_csum`'s context: IP fields 0, TUCSS the L4 header, TUCSO its checksum, TUCSE 0.
fn csum_ctx(tucss: u8, tucso: u8, tcp: bool) -> TxContextDesc {
    TxContextDesc {
        tucss,
        tucso,
        cmd_and_length: tucmd(if tcp { txcmd::TUCMD_TCP } else { 0 }, 0),
        ..Default::default()
    }
}

/// `e1000_tso`'s context for [`tcp4`] with `payload` bytes.
fn tso_ctx(payload: usize) -> TxContextDesc {
    TxContextDesc {
        ipcss: 14,
        ipcso: 24,
        ipcse: 33,
        tucss: 34,
        tucso: 50,
        tucse: 0,
        cmd_and_length: tucmd(
            txcmd::TSE | txcmd::TUCMD_TCP | txcmd::TUCMD_IP,
            payload as u32,
        ),
        status: 0,
        hdrlen: 54,
        mss: 1448,
    }
}

/// Ones-complement sum of 16-bit words, folded.
fn fold(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// Counts the frames the hook inspected.
fn counting(n: &Cell<u32>) -> impl FnMut(&[u8], Direction) -> HookVerdict + '_ {
    move |_, _| {
        n.set(n.get() + 1);
        HookVerdict::Pass
    }
}

#[test]
fn linux_checksum_and_tso_offloads_pass_and_are_applied() {
    for mode in MODES {
        let inspected = Cell::new(0);
        let mut e = env(cfg(mode), Flavor::Qemu, true, counting(&inspected));
        e.setup(64, 32, 2048);
        // TCP checksum offload, the frame in two data descriptors.
        let f = tcp4(700);
        e.queue_ctx_data(&f, 2, csum_ctx(34, 50, true), 0, popts::TXSM);
        // The next packet without a context: the device's (checksum) context still applies.
        let g = tcp4(300);
        for (k, piece) in g.chunks(200).enumerate() {
            let buf = e.tx_buf(e.tdt);
            e.write(buf, piece);
            let eop = if k == 1 { txcmd::EOP | txcmd::RS } else { 0 };
            e.queue_raw(
                ally_dpi::nic::desc::TxDataDesc::new(
                    buf,
                    piece.len() as u32,
                    txcmd::DEXT | txcmd::IFCS | eop,
                    popts::TXSM,
                    0,
                )
                .to_bytes(),
            );
        }
        // UDP over IPv6.
        let u = udp6(400);
        e.queue_ctx_data(&u, 1, csum_ctx(54, 60, false), 0, popts::TXSM);
        // TSO on IPv4 with the IP checksum, as e1000_tso.
        let t = tcp4(10_000);
        e.queue_ctx_data(
            &t,
            4,
            tso_ctx(10_000),
            txcmd::TSE,
            popts::TXSM | popts::IXSM,
        );
        e.kick();
        e.run();
        let wire = e.model.take_wire();
        assert_eq!(wire.len(), 4, "{mode:?}");
        // The device wrote only the checksum fields; the L4 checksums now verify (the
        // driver's seed was 0, so the sum over the L4 bytes is all ones).
        for (sent, orig, l4) in [(&wire[0], &f, 34), (&wire[1], &g, 34), (&wire[2], &u, 54)] {
            let field = l4 + if l4 == 34 { 16 } else { 6 };
            assert_eq!(&sent[..field], &orig[..field], "{mode:?}");
            assert_eq!(&sent[field + 2..], &orig[field + 2..], "{mode:?}");
            assert_eq!(fold(&sent[l4..]), 0xFFFF, "{mode:?}: checksum inserted");
        }
        assert_eq!(wire[3], t, "{mode:?}: the model does not segment");
        let c = e.dpi.counters();
        assert_eq!((c.tx.packets, c.tx.total_dropped()), (4, 0), "{mode:?}");
        // ceil(10000 / 1448) segments on a real wire.
        assert_eq!(c.tx.wire_frames, 3 + 7, "{mode:?}");
        assert_eq!(inspected.get(), 4);
        assert_eq!(e.gr(Reg::TDH), e.tdt);
    }
}

#[test]
fn offloads_aimed_outside_the_checksum_fields_are_dropped() {
    for mode in MODES {
        let inspected = Cell::new(0);
        let mut e = env(cfg(mode), Flavor::Qemu, true, counting(&inspected));
        e.setup(128, 32, 2048);
        let f = tcp4(1000);
        let good = frame(1, 100);
        // Each case queues one bad packet; the number of expected drops grows by one each.
        type Case = (&'static str, TxContextDesc, u8, u8);
        let ip = TxContextDesc {
            ipcss: 14,
            ipcso: 24,
            ipcse: 33,
            ..csum_ctx(34, 50, true)
        };
        let tso = tso_ctx(1000);
        let cases: Vec<Case> = vec![
            // TUCSO into the payload: the device would write a guest-chosen sum there.
            ("tucso in payload", csum_ctx(34, 90, true), 0, popts::TXSM),
            // TUCSS and TUCSO shifted into the payload together.
            ("tucss in payload", csum_ctx(60, 76, true), 0, popts::TXSM),
            // UDP's checksum offset on a TCP frame.
            ("udp offset on tcp", csum_ctx(34, 40, false), 0, popts::TXSM),
            // TUCSE short of the end.
            (
                "tucse",
                TxContextDesc {
                    tucse: 70,
                    ..csum_ctx(34, 50, true)
                },
                0,
                popts::TXSM,
            ),
            // IPCSO elsewhere (into the TCP header's sequence number).
            ("ipcso", TxContextDesc { ipcso: 38, ..ip }, 0, popts::IXSM),
            ("ipcss", TxContextDesc { ipcss: 20, ..ip }, 0, popts::IXSM),
            ("ipcse", TxContextDesc { ipcse: 60, ..ip }, 0, popts::IXSM),
            // TSO: HDRLEN that takes 10 payload bytes as header, or misses TCP bytes.
            (
                "hdrlen long",
                TxContextDesc {
                    hdrlen: 64,
                    cmd_and_length: tso.cmd_and_length - 10,
                    ..tso
                },
                txcmd::TSE,
                popts::TXSM | popts::IXSM,
            ),
            (
                "hdrlen short",
                TxContextDesc {
                    hdrlen: 40,
                    cmd_and_length: tso.cmd_and_length + 14,
                    ..tso
                },
                txcmd::TSE,
                popts::TXSM | popts::IXSM,
            ),
            // Absurd MSS: zero, tiny, larger than a frame.
            (
                "mss 0",
                TxContextDesc { mss: 0, ..tso },
                txcmd::TSE,
                popts::TXSM,
            ),
            (
                "mss 1",
                TxContextDesc { mss: 1, ..tso },
                txcmd::TSE,
                popts::TXSM,
            ),
            (
                "mss huge",
                TxContextDesc { mss: 20_000, ..tso },
                txcmd::TSE,
                popts::TXSM,
            ),
            // PAYLEN not the payload.
            (
                "paylen",
                TxContextDesc {
                    cmd_and_length: tso.cmd_and_length + 1,
                    ..tso
                },
                txcmd::TSE,
                popts::TXSM,
            ),
            // TSE on the data descriptors only, or on the context only.
            (
                "tse data only",
                csum_ctx(34, 50, true),
                txcmd::TSE,
                popts::TXSM,
            ),
            ("tse context only", tso, 0, popts::TXSM),
            // Reserved POPTS bits.
            ("popts", csum_ctx(34, 50, true), 0, popts::TXSM | 0x10),
        ];
        let mut drops = 0;
        for (what, ctx, dcmd, options) in &cases {
            let first = e.tdt;
            e.queue_ctx_data(&f, 2, *ctx, *dcmd, *options);
            let last = (e.tdt + e.tx_n - 1) % e.tx_n;
            let good_idx = e.queue_legacy(&good);
            e.kick();
            e.run();
            drops += 1;
            let c = e.dpi.counters();
            assert_eq!(c.tx.dropped(DropReason::Offload), drops, "{mode:?} {what}");
            assert_eq!(c.tx.total_dropped(), drops, "{mode:?} {what}");
            assert_eq!(e.model.take_wire(), vec![good.clone()], "{mode:?} {what}");
            assert_eq!(
                e.guest_tx_status(last) & txsta::DD,
                txsta::DD,
                "{mode:?} {what}"
            );
            assert_eq!(e.guest_tx_status(good_idx) & txsta::DD, txsta::DD);
            assert_ne!(first, last);
        }
        // Only the good frames were inspected.
        assert_eq!(inspected.get() as usize, cases.len(), "{mode:?}");
        assert_eq!(e.dpi.counters().tx.packets, cases.len() as u64);
        assert_eq!(e.gr(Reg::TDH), e.tdt);
    }
}

fn legacy_ic(e: &mut Env<impl ally_dpi::nic::PacketHook>, f: &[u8], css: u8, cso: u8) -> u32 {
    let buf = e.tx_buf(e.tdt);
    e.write(buf, f);
    e.queue_raw(
        LegacyTxDesc {
            buffer_addr: buf,
            length: f.len() as u16,
            cso,
            css,
            cmd: txcmd::EOP | txcmd::IFCS | txcmd::RS | txcmd::IC,
            ..Default::default()
        }
        .to_bytes(),
    )
}

#[test]
fn legacy_checksum_insertion_is_checked_against_the_frame() {
    for mode in MODES {
        // Both the one-packet-per-doorbell path and a batch.
        for batch in [false, true] {
            let inspected = Cell::new(0);
            let mut e = env(cfg(mode), Flavor::Qemu, true, counting(&inspected));
            e.setup(64, 32, 2048);
            let f = tcp4(500);
            // Only the IPv4 header checksum inserted: the TCP checksum must be right already.
            let g = tcp4_frame_summed(9, 500);
            let not_ip = frame(2, 200);
            // (CSS, CSO, frame, passes)
            let cases: [(u8, u8, &[u8], bool); 6] = [
                (34, 50, &f, true),
                // The IPv4 header checksum from the IP header.
                (14, 24, &g, true),
                // CSO into the payload, CSS into the payload, CSO into the TCP sequence number.
                (34, 120, &f, false),
                (54, 50, &f, false),
                (34, 38, &f, false),
                // No IP header at all.
                (14, 24, &not_ip, false),
            ];
            for (css, cso, frame, _) in cases {
                legacy_ic(&mut e, frame, css, cso);
                if !batch {
                    e.kick();
                    e.run();
                }
            }
            e.kick();
            e.run();
            let wire = e.model.take_wire();
            assert_eq!(wire.len(), 2, "{mode:?} batch={batch}");
            assert_eq!(&wire[0][..50], &f[..50]);
            assert_eq!(&wire[0][52..], &f[52..]);
            assert_eq!(fold(&wire[0][34..]), 0xFFFF, "TCP checksum inserted");
            assert_eq!(&wire[1][..24], &g[..24]);
            assert_eq!(&wire[1][26..], &g[26..]);
            let c = e.dpi.counters();
            assert_eq!(
                c.tx.dropped(DropReason::Offload),
                4,
                "{mode:?} batch={batch}"
            );
            assert_eq!(c.tx.total_dropped(), 4);
            assert_eq!(inspected.get(), 2);
            for i in 0..cases.len() as u32 {
                assert_eq!(e.guest_tx_status(i) & txsta::DD, txsta::DD);
            }
        }
    }
}

#[test]
fn legacy_fragments_must_agree_on_the_checksum() {
    for mode in MODES {
        let mut e = env(cfg(mode), Flavor::Qemu, true, ally_dpi::nic::PassAll);
        e.setup(32, 32, 2048);
        let f = tcp4(500);
        for (k, piece) in f.chunks(300).enumerate() {
            let buf = e.tx_buf(e.tdt);
            e.write(buf, piece);
            // The second fragment points CSO elsewhere.
            let (eop, cso) = if k == 1 {
                (txcmd::EOP | txcmd::RS, 90)
            } else {
                (0, 50)
            };
            e.queue_raw(
                LegacyTxDesc {
                    buffer_addr: buf,
                    length: piece.len() as u16,
                    cso,
                    css: 34,
                    cmd: txcmd::IFCS | txcmd::IC | eop,
                    ..Default::default()
                }
                .to_bytes(),
            );
        }
        e.kick();
        e.run();
        assert!(e.model.take_wire().is_empty());
        assert_eq!(e.dpi.counters().tx.dropped(DropReason::Offload), 1);
        assert_eq!(e.guest_tx_status(1) & txsta::DD, txsta::DD);
    }
}

/// Queue `f` as `parts` data descriptors without a context descriptor.
fn queue_data_only(
    e: &mut Env<impl ally_dpi::nic::PacketHook>,
    f: &[u8],
    parts: usize,
    dcmd: u8,
    options: u8,
) {
    let chunk = f.len().div_ceil(parts);
    let n = f.len().div_ceil(chunk);
    for (k, piece) in f.chunks(chunk).enumerate() {
        let buf = e.tx_buf(e.tdt);
        e.write(buf, piece);
        let eop = if k + 1 == n {
            txcmd::EOP | txcmd::RS
        } else {
            0
        };
        e.queue_raw(
            ally_dpi::nic::desc::TxDataDesc::new(
                buf,
                piece.len() as u32,
                txcmd::DEXT | txcmd::IFCS | dcmd | eop,
                options,
                0,
            )
            .to_bytes(),
        );
    }
}

#[test]
fn packets_without_a_context_are_checked_against_the_one_the_device_holds() {
    for mode in MODES {
        let mut e = env(cfg(mode), Flavor::Qemu, true, ally_dpi::nic::PassAll);
        e.setup(64, 32, 2048);
        let f = tcp4(3000);
        let steps: [(&str, bool); 6] = [
            // No context posted yet.
            ("none yet", false),
            // A TSO context is posted with its packet.
            ("tso with context", true),
            // A checksum packet would get the TSO context (or, on QEMU, an older one).
            ("csum after tso", false),
            // A TSO packet of the same layout reuses it.
            ("tso carried", true),
            // A TSO packet of another length does not match its PAYLEN.
            ("tso carried, other length", false),
            // A checksum context after the data descriptors.
            ("context after data", false),
        ];
        queue_data_only(&mut e, &f, 2, 0, popts::TXSM);
        e.queue_ctx_data(&f, 3, tso_ctx(3000), txcmd::TSE, popts::TXSM | popts::IXSM);
        queue_data_only(&mut e, &f, 2, 0, popts::TXSM);
        queue_data_only(&mut e, &f, 2, txcmd::TSE, popts::TXSM | popts::IXSM);
        queue_data_only(
            &mut e,
            &tcp4(2000),
            2,
            txcmd::TSE,
            popts::TXSM | popts::IXSM,
        );
        // Data (no EOP), context, data (EOP).
        for (k, piece) in f.chunks(f.len().div_ceil(2)).enumerate() {
            if k == 1 {
                e.queue_raw(csum_ctx(34, 50, true).to_bytes());
            }
            let buf = e.tx_buf(e.tdt);
            e.write(buf, piece);
            let eop = if k == 1 { txcmd::EOP | txcmd::RS } else { 0 };
            e.queue_raw(
                ally_dpi::nic::desc::TxDataDesc::new(
                    buf,
                    piece.len() as u32,
                    txcmd::DEXT | txcmd::IFCS | eop,
                    popts::TXSM,
                    0,
                )
                .to_bytes(),
            );
        }
        let last = (e.tdt + e.tx_n - 1) % e.tx_n;
        e.kick();
        e.run();
        let passed = steps.iter().filter(|(_, ok)| *ok).count();
        let c = e.dpi.counters();
        assert_eq!(c.tx.packets as usize, passed, "{mode:?}");
        assert_eq!(
            c.tx.dropped(DropReason::Offload) as usize,
            steps.len() - passed,
            "{mode:?}"
        );
        assert_eq!(e.model.take_wire(), vec![f.clone(), f.clone()], "{mode:?}");
        assert_eq!(e.guest_tx_status(last) & txsta::DD, txsta::DD);
        assert_eq!(e.gr(Reg::TDH), e.tdt);
    }
}
