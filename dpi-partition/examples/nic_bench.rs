//! DPI-core queue benchmark: the engine against the software e1000 in shared memory.
//!
//! Two measurements per case (64 B and 1500 B frames; bulk = 32 packets per doorbell or one
//! packet per doorbell; copy or zero-copy transmit; plus copy-mode receive):
//!
//! * **threaded**: a producer thread plays the guest (fills its TX ring, writes TDT through the
//!   shadow, reclaims by the shadow TDH) while the DPI thread runs `poll` and the device model;
//!   prints packets per second (wall clock, shared machine: indicative only);
//! * **deterministic**: the same work in lock-step on one thread, DPI work isolated in
//!   `dpi_step` so `valgrind --tool=callgrind --toggle-collect='*dpi_step*'` counts only the
//!   DPI core's instructions; the bench prints the packet count to divide by.
//!
//! Usage:
//!   cargo run --release -p ally-dpi --example nic_bench                 # both, all cases
//!   valgrind --tool=callgrind --toggle-collect='*dpi_step*' \
//!     target/release/examples/nic_bench det <case>                      # one case, counted

use ally_dpi::nic::desc::{txcmd, LegacyTxDesc, RxDesc};
use ally_dpi::nic::dpi::{DpiConfig, DpiNic, Mode};
use ally_dpi::nic::mem::{DmaMemory, FakeDma, MemoryPolicy};
use ally_dpi::nic::model::{E1000Model, Flavor, ModelConfig};
use ally_dpi::nic::regs::{icr, rctl, tctl, Reg};
use ally_dpi::nic::shadow::ShadowRegs;
use ally_dpi::nic::PassAll;
use ally_hypervisor::addr::{HostPhysAddr, PhysRange};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const RAM_END: u64 = 12 * MIB;
const MEM_END: u64 = 16 * MIB;
const DPI_REGION: PhysRange = PhysRange {
    start: 13 * MIB,
    end: MEM_END,
};
const G_TX_RING: u64 = MIB;
const G_RX_RING: u64 = MIB + 0x1_0000;
const G_TX_BUFS: u64 = 2 * MIB;
const G_RX_BUFS: u64 = 6 * MIB;
const TX_N: u32 = 256;
const RX_N: u32 = 256;

type Model<'a> = E1000Model<&'a FakeDma>;
type Nic<'a> = DpiNic<'a, FakeDma, Model<'a>, PassAll>;

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    len: usize,
    batch: u32,
    mode: Mode,
    rx: bool,
}

const CASES: [Case; 10] = [
    Case {
        name: "tx-zc-64-bulk",
        len: 64,
        batch: 32,
        mode: Mode::ZeroCopy,
        rx: false,
    },
    Case {
        name: "tx-zc-64-single",
        len: 64,
        batch: 1,
        mode: Mode::ZeroCopy,
        rx: false,
    },
    Case {
        name: "tx-zc-1500-bulk",
        len: 1500,
        batch: 32,
        mode: Mode::ZeroCopy,
        rx: false,
    },
    Case {
        name: "tx-zc-1500-single",
        len: 1500,
        batch: 1,
        mode: Mode::ZeroCopy,
        rx: false,
    },
    Case {
        name: "tx-copy-64-bulk",
        len: 64,
        batch: 32,
        mode: Mode::Copy,
        rx: false,
    },
    Case {
        name: "tx-copy-64-single",
        len: 64,
        batch: 1,
        mode: Mode::Copy,
        rx: false,
    },
    Case {
        name: "tx-copy-1500-bulk",
        len: 1500,
        batch: 32,
        mode: Mode::Copy,
        rx: false,
    },
    Case {
        name: "tx-copy-1500-single",
        len: 1500,
        batch: 1,
        mode: Mode::Copy,
        rx: false,
    },
    Case {
        name: "rx-copy-64-bulk",
        len: 64,
        batch: 32,
        mode: Mode::Copy,
        rx: true,
    },
    Case {
        name: "rx-copy-1500-bulk",
        len: 1500,
        batch: 32,
        mode: Mode::Copy,
        rx: true,
    },
];

struct World {
    mem: FakeDma,
    shadow: ShadowRegs,
}

fn policy() -> MemoryPolicy {
    MemoryPolicy::new(
        &[PhysRange {
            start: 0,
            end: RAM_END,
        }],
        &[PhysRange {
            start: RAM_END,
            end: MEM_END,
        }],
    )
    .expect("policy")
}

/// Program the guest's rings through the shadow, as its driver would.
fn guest_setup(w: &World, model: &Model<'_>, len: usize) {
    let gw = |r: Reg, v: u32| w.shadow.guest_write(r, v, model);
    for i in 0..TX_N {
        let buf = G_TX_BUFS + u64::from(i) * 2048;
        w.mem.write(HostPhysAddr(buf), &vec![0x5A; len]).unwrap();
        let d = LegacyTxDesc {
            buffer_addr: buf,
            length: len as u16,
            cmd: txcmd::EOP | txcmd::IFCS | txcmd::RS,
            ..Default::default()
        };
        w.mem
            .write(HostPhysAddr(G_TX_RING + u64::from(i) * 16), &d.to_bytes())
            .unwrap();
    }
    for i in 0..RX_N {
        let d = RxDesc {
            buffer_addr: G_RX_BUFS + u64::from(i) * 2048,
            ..Default::default()
        };
        w.mem
            .write(HostPhysAddr(G_RX_RING + u64::from(i) * 16), &d.to_bytes())
            .unwrap();
    }
    gw(Reg::TDBAL, G_TX_RING as u32);
    gw(Reg::TDBAH, 0);
    gw(Reg::TDLEN, TX_N * 16);
    gw(Reg::TDH, 0);
    gw(Reg::TDT, 0);
    gw(Reg::TCTL, tctl::EN);
    gw(Reg::RDBAL, G_RX_RING as u32);
    gw(Reg::RDBAH, 0);
    gw(Reg::RDLEN, RX_N * 16);
    gw(Reg::RDH, 0);
    gw(Reg::RDT, RX_N - 1);
    gw(Reg::RCTL, rctl::EN | rctl::BAM);
    gw(Reg::IMS, icr::TXDW | icr::RXT0);
}

/// Everything the DPI core does for one loop iteration. Not inlined so callgrind can isolate it.
#[inline(never)]
fn dpi_step(nic: &mut Nic<'_>) -> u64 {
    nic.poll()
}

/// Lock-step run: returns packets moved.
fn deterministic(c: Case, packets: u64) -> u64 {
    let w = World {
        mem: FakeDma::new(0, MEM_END as usize),
        shadow: ShadowRegs::new(),
    };
    let model = E1000Model::new(
        &w.mem,
        ModelConfig {
            flavor: Flavor::Qemu,
            immediate: false,
        },
    );
    let cfg = DpiConfig {
        mode: c.mode,
        tx_ring: 256,
        rx_ring: 256,
        ..DpiConfig::default()
    };
    let mut nic = DpiNic::new(
        &w.shadow,
        &w.mem,
        &model,
        policy(),
        DPI_REGION,
        cfg,
        PassAll,
    )
    .expect("dpi");
    guest_setup(&w, &model, c.len);
    dpi_step(&mut nic);
    let frame = vec![0xA5u8; c.len];
    let (mut tdt, mut rdt, mut done) = (0u32, RX_N - 1, 0u64);
    while done < packets {
        if c.rx {
            for _ in 0..c.batch {
                model.inject(&frame);
            }
            model.process();
            dpi_step(&mut nic);
            // The guest takes the frames and returns the buffers.
            for _ in 0..c.batch {
                rdt = (rdt + 1) % RX_N;
                w.mem
                    .write(HostPhysAddr(G_RX_RING + u64::from(rdt) * 16 + 8), &[0; 8])
                    .unwrap();
            }
            w.shadow.guest_write(Reg::RDT, rdt, &model);
        } else {
            // Steady state: one DPI loop iteration per doorbell completes the previous batch
            // and posts this one.
            tdt = (tdt + c.batch) % TX_N;
            w.shadow.guest_write(Reg::TDT, tdt, &model);
            dpi_step(&mut nic);
            model.process();
            model.take_wire();
        }
        w.shadow.guest_read(Reg::ICR, &model);
        done += u64::from(c.batch);
    }
    // Complete the last batch.
    dpi_step(&mut nic);
    let cnt = nic.counters();
    let moved = if c.rx { cnt.rx.packets } else { cnt.tx.packets };
    assert_eq!(moved, done, "every packet moved");
    assert_eq!(nic.tx_in_flight(), 0, "every packet completed");
    moved
}

/// Threaded run: a guest producer thread and the DPI + device thread; returns packets/s.
fn threaded(c: Case, packets: u64) -> f64 {
    let w = World {
        mem: FakeDma::new(0, MEM_END as usize),
        shadow: ShadowRegs::new(),
    };
    let model = E1000Model::new(
        &w.mem,
        ModelConfig {
            flavor: Flavor::Qemu,
            immediate: false,
        },
    );
    let cfg = DpiConfig {
        mode: c.mode,
        tx_ring: 256,
        rx_ring: 256,
        ..DpiConfig::default()
    };
    let mut nic = DpiNic::new(
        &w.shadow,
        &w.mem,
        &model,
        policy(),
        DPI_REGION,
        cfg,
        PassAll,
    )
    .expect("dpi");
    guest_setup(&w, &model, c.len);
    nic.poll();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        let (w, model, stop) = (&w, &model, &stop);
        s.spawn(move || {
            // The guest: keep the TX ring (or the RX buffers) topped up, `batch` per doorbell.
            let mut produced = 0u64;
            let mut tdt = 0u32;
            let mut rdt = RX_N - 1;
            while produced < packets {
                if c.rx {
                    let rdh = w.shadow.rdh();
                    // Return every buffer the DPI core has filled.
                    let mut gave = 0;
                    while (rdt + 1) % RX_N != rdh && gave < c.batch {
                        rdt = (rdt + 1) % RX_N;
                        w.mem
                            .write(HostPhysAddr(G_RX_RING + u64::from(rdt) * 16 + 8), &[0; 8])
                            .unwrap();
                        gave += 1;
                    }
                    if gave > 0 {
                        w.shadow.guest_write(Reg::RDT, rdt, model);
                        produced += u64::from(gave);
                    }
                } else {
                    let tdh = w.shadow.tdh();
                    let free = (tdh + TX_N - tdt - 1) % TX_N;
                    if free >= c.batch {
                        tdt = (tdt + c.batch) % TX_N;
                        w.shadow.guest_write(Reg::TDT, tdt, model);
                        produced += u64::from(c.batch);
                    }
                }
                if model.irq_pending() {
                    w.shadow.guest_read(Reg::ICR, model);
                }
                std::hint::spin_loop();
            }
            stop.store(true, Ordering::Release);
        });
        let frame = vec![0xA5u8; c.len];
        loop {
            if c.rx && model.wire_in_len() < 64 {
                for _ in 0..32 {
                    model.inject(&frame);
                }
            }
            model.process();
            if !c.rx {
                model.take_wire();
            }
            dpi_step(&mut nic);
            let cnt = nic.counters();
            let moved = if c.rx { cnt.rx.packets } else { cnt.tx.packets };
            if stop.load(Ordering::Acquire) && moved + 256 >= packets {
                break;
            }
        }
    });
    let cnt = nic.counters();
    let moved = if c.rx { cnt.rx.packets } else { cnt.tx.packets };
    moved as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 3 && args[1] == "det" {
        let Some(c) = CASES.iter().find(|c| c.name == args[2]) else {
            eprintln!(
                "unknown case {:?}; cases: {:?}",
                args[2],
                CASES.map(|c| c.name)
            );
            std::process::exit(2);
        };
        let n: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        let moved = deterministic(*c, n);
        println!(
            "case {} packets {} bytes {}",
            c.name,
            moved,
            moved * c.len as u64
        );
        return;
    }
    println!(
        "{:<22} {:>12} {:>14} {:>10}",
        "case", "threaded pps", "lock-step pps", "Gbit/s"
    );
    for c in CASES {
        let n = if c.len > 1000 { 200_000 } else { 500_000 };
        let pps = threaded(c, n);
        let t = Instant::now();
        let moved = deterministic(c, n);
        let det_pps = moved as f64 / t.elapsed().as_secs_f64();
        println!(
            "{:<22} {:>12.0} {:>14.0} {:>10.2}",
            c.name,
            pps,
            det_pps,
            pps * c.len as f64 * 8.0 / 1e9
        );
    }
}
