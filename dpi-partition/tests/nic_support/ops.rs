//! A byte-driven interpreter of hostile guest behaviour against the DPI engine, shared by the
//! randomized test (`tests/nic_fuzz.rs`) and the cargo-fuzz target (`fuzz/`).
//!
//! The guest writes arbitrary descriptors (addresses picked from a menu of good, protected,
//! outside-RAM and straddling values, or raw), arbitrary values to every shadowed register and
//! its aliases, while frames arrive from the wire and the DPI core and device run in any order.
//! Invariants checked at the end: nothing panicked; Ally's memory (outside the DPI rings) is
//! byte-for-byte unchanged; every frame that reached the wire or guest memory went through the
//! hook (in copy mode, with the exact bytes inspected).

use super::*;
use ally_dpi::nic::desc::{popts, txcmd, RxDesc, TxContextDesc};
use ally_dpi::nic::dpi::{DpiConfig, Mode};
use ally_dpi::nic::mem::DmaMemory;
use ally_dpi::nic::model::Flavor;
use ally_dpi::nic::regs::Reg;
use ally_dpi::nic::{Direction, HookVerdict, PacketHook};
use ally_hypervisor::addr::HostPhysAddr;
use std::collections::HashMap;

/// Counts and remembers what was inspected.
#[derive(Default)]
pub struct Recorder {
    pub to_wire: HashMap<Vec<u8>, u64>,
    pub to_wire_count: u64,
    pub from_wire_count: u64,
    pub drop_every: u8,
}

impl PacketHook for Recorder {
    fn inspect(&mut self, frame: &[u8], dir: Direction) -> HookVerdict {
        if self.drop_every != 0 && frame.first().copied().unwrap_or(0) % self.drop_every == 0 {
            return HookVerdict::Drop;
        }
        match dir {
            Direction::ToWire => {
                *self.to_wire.entry(frame.to_vec()).or_default() += 1;
                self.to_wire_count += 1;
            }
            Direction::FromWire => self.from_wire_count += 1,
        }
        HookVerdict::Pass
    }
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn addr(&mut self, good: u64) -> Option<u64> {
        Some(match self.u8()? % 8 {
            0..=2 => good,
            3 => RAM_END - u64::from(self.u8()?),
            4 => DPI_REGION.start + u64::from(self.u16()?),
            5 => MEM_END + u64::from(self.u32()?),
            6 => u64::MAX - u64::from(self.u8()?),
            _ => u64::from(self.u32()?),
        })
    }
}

const REGS: [u32; 27] = [
    0x0000, 0x00C0, 0x00C8, 0x00D0, 0x00D8, 0x0100, 0x0400, 0x2800, 0x2804, 0x2808, 0x2810, 0x2818,
    0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x0110, 0x0114, 0x0118, 0x0120, 0x0128, 0x0420, 0x0424,
    0x0428, 0x0430, 0x0438,
];

/// Run one byte-driven scenario; panics if an invariant fails.
pub fn run(data: &[u8]) -> ally_dpi::nic::dpi::Counters {
    let mut b = Bytes(data);
    let Some(head) = b.u8() else {
        return Default::default();
    };
    let mode = if head & 1 == 0 {
        Mode::Copy
    } else {
        Mode::ZeroCopy
    };
    let flavor = if head & 2 == 0 {
        Flavor::Qemu
    } else {
        Flavor::Bochs
    };
    let immediate = head & 4 == 0;
    let hook = Recorder {
        drop_every: (head >> 4) % 5,
        ..Default::default()
    };
    let cfg = DpiConfig {
        mode,
        tx_ring: 16,
        rx_ring: 16,
        ..DpiConfig::default()
    };
    let mut e = env(cfg, flavor, immediate, hook);
    // "Ally memory": everything protected below the DPI region carries a pattern.
    let ally = (RAM_END, DPI_REGION.start);
    let pattern: Vec<u8> = (0..(ally.1 - ally.0)).map(|i| (i * 7 + 3) as u8).collect();
    e.write(ally.0, &pattern);
    e.setup(32, 16, 2048);
    let mut steps = 0;
    while let Some(op) = b.u8() {
        steps += 1;
        if steps > 400 {
            break;
        }
        match op % 10 {
            0 => {
                // A guest TX descriptor at TDT with an address from the menu.
                let Some(mut raw) = (0..16).map(|_| b.u8()).collect::<Option<Vec<u8>>>() else {
                    break;
                };
                let Some(addr) = b.addr(e.tx_buf(e.tdt)) else {
                    break;
                };
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                if op & 0x80 != 0 {
                    raw[11] |= txcmd::EOP | txcmd::RS;
                }
                let raw: [u8; 16] = raw.try_into().unwrap();
                e.queue_raw(raw);
            }
            1 if op & 0x40 != 0 => {
                // A TCP frame with a context and data descriptors whose offload fields are
                // Linux's, with one of them (or none) replaced by a guest-chosen byte.
                let (Some(which), Some(v), Some(opts), Some(parts)) =
                    (b.u8(), b.u8(), b.u8(), b.u8())
                else {
                    break;
                };
                let payload = 100 + usize::from(v) * 13;
                let f = tcp4_frame(u32::from(op), payload);
                let tse = which & 0x80 != 0;
                let mut c = TxContextDesc {
                    ipcss: 14,
                    ipcso: 24,
                    ipcse: 33,
                    tucss: 34,
                    tucso: 50,
                    cmd_and_length: (u32::from(
                        txcmd::DEXT
                            | txcmd::TUCMD_TCP
                            | txcmd::TUCMD_IP
                            | if tse { txcmd::TSE } else { 0 },
                    ) << 24)
                        | payload as u32,
                    hdrlen: 54,
                    mss: 536,
                    ..Default::default()
                };
                match which % 10 {
                    0 => c.ipcss = v,
                    1 => c.ipcso = v,
                    2 => c.ipcse = u16::from(v),
                    3 => c.tucss = v,
                    4 => c.tucso = v,
                    5 => c.tucse = u16::from(v),
                    6 => c.hdrlen = v,
                    7 => c.mss = u16::from(v),
                    _ => {}
                }
                let popts = [0, popts::TXSM, popts::IXSM, popts::TXSM | popts::IXSM, opts]
                    [usize::from(opts % 5)];
                let dcmd = if tse { txcmd::TSE } else { 0 };
                e.queue_ctx_data(&f, usize::from(parts % 3) + 1, c, dcmd, popts);
                e.kick();
            }
            1 => {
                let f = frame(u32::from(op), 60 + usize::from(op) * 5);
                e.queue_legacy(&f);
                e.kick();
            }
            2 => e.kick(),
            3 => {
                let (Some(r), Some(v)) = (b.u8(), b.u32()) else {
                    break;
                };
                let reg = Reg(REGS[usize::from(r) % REGS.len()]);
                // Ring bases get menu addresses too, so protected and straddling rings occur.
                let v = if matches!(reg.canonical(), Reg::TDBAL | Reg::RDBAL) && r & 0x80 != 0 {
                    b.addr(G_TX_RING).map_or(v, |a| a as u32)
                } else {
                    v
                };
                e.gw(reg, v);
            }
            4 => {
                let Some(len) = b.u16() else { break };
                e.model
                    .inject(&frame(u32::from(len), usize::from(len % 3000) + 14));
            }
            5 => {
                for _ in 0..(op >> 4) + 1 {
                    e.dpi.poll();
                }
            }
            6 => e.model.process(),
            7 => {
                let Some(i) = b.u8() else { break };
                let Some(addr) = b.addr(G_RX_BUFS + u64::from(i % 16) * G_BUF) else {
                    break;
                };
                let d = RxDesc {
                    buffer_addr: addr,
                    ..Default::default()
                };
                e.write(G_RX_RING + u64::from(i % 16) * 16, &d.to_bytes());
            }
            8 => {
                e.gr(Reg::ICR);
            }
            _ => {
                // Return every received buffer, as the driver's clean-up does.
                for i in 0..16u64 {
                    e.write(G_RX_RING + i * 16 + 8, &[0; 8]);
                }
                e.gw(Reg::RDT, e.gr(Reg::RDH).wrapping_sub(1) & 15);
            }
        }
    }
    for _ in 0..4 {
        e.model.process();
        e.run();
    }
    // Ally's memory is untouched.
    let mut now = vec![0u8; pattern.len()];
    e.mem.read(HostPhysAddr(ally.0), &mut now).unwrap();
    assert!(now == pattern, "Ally memory was modified");
    // Nothing reached the wire uninspected.
    let wire = e.model.take_wire();
    let c = e.dpi.counters().clone();
    let hook = e.dpi.hook_mut();
    assert!(
        wire.len() as u64 <= hook.to_wire_count,
        "more frames on the wire than inspected"
    );
    assert_eq!(c.tx.packets, hook.to_wire_count);
    if mode == Mode::Copy {
        for f in &wire {
            if hook.to_wire.contains_key(f) {
                continue;
            }
            // Offloads may have written checksum fields after inspection, nothing else: the
            // only offloaded frames with IP headers are `tcp4_frame`s (the model does not
            // segment TSO super-frames).
            assert!(
                hook.to_wire.keys().any(|k| k.len() == f.len()
                    && (0..f.len())
                        .filter(|&i| k[i] != f[i])
                        .all(|i| TCP4_CHECKSUM_BYTES.contains(&i))),
                "a {}-byte frame on the wire differs from every inspected frame beyond its checksum fields",
                f.len()
            );
        }
    }
    assert!(
        c.rx.packets <= hook.from_wire_count,
        "a frame reached the guest uninspected"
    );
    c
}
