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
//!   DPI core's instructions; the bench prints the packet count to divide by. It also reads
//!   the time stamp counter around every `dpi_step` (outside it, so callgrind does not count
//!   it) and prints the DPI core's **cycles per packet** (TSC ticks, less the measured cost of
//!   an empty TSC pair, best of several runs), ns per packet, and for copy mode cycles per
//!   byte copied.
//!
//! In the deterministic run the engine reaches the device model's registers through
//! [`PostedMmio`]: a register write is a store into a small latch (as a posted MMIO write is
//! one store on hardware) and is delivered to the model after `dpi_step` returns. Before that,
//! the model's register emulation (`E1000Model::write32`: decode, atomics, 20-25
//! instructions per TDT or ICS write, ~45 per packet with one packet per doorbell) ran inside
//! `dpi_step` and was counted as DPI work.
//!
//! Last, the cost of one alert record on the DPI core: an EVE alert and a dropped-frame
//! excerpt formatted into the alert ring (the ring is drained between batches, untimed), next
//! to formatting the same record into a `String`, and the synchronous COM2 write at 115200
//! baud that the ring replaced.
//!
//! Usage:
//!   cargo run --release -p ally-dpi --example nic_bench                 # both, all cases
//!   nic_bench alerts                                                    # alert cost only
//!   nic_bench det <case> [packets]                                      # one case, timed
//!   valgrind --tool=callgrind --toggle-collect='*dpi_step*' \
//!     $CARGO_TARGET_DIR/release/examples/nic_bench det <case>           # one case, counted

use ally_dpi::engine::{self, Alert, AlertSink, MgmtWriter, Timestamp};
use ally_dpi::nic::desc::{txcmd, LegacyTxDesc, RxDesc};
use ally_dpi::nic::dpi::{DpiConfig, DpiNic, Mode};
use ally_dpi::nic::mem::{DmaMemory, FakeDma, MemoryPolicy};
use ally_dpi::nic::model::{E1000Model, Flavor, ModelConfig};
use ally_dpi::nic::regs::{icr, rctl, tctl, NicRegisters, Reg};
use ally_dpi::nic::shadow::ShadowRegs;
use ally_dpi::nic::PassAll;
use ally_hypervisor::addr::{HostPhysAddr, PhysRange};
use ally_hypervisor::record_ring::{RecordRing, TxFifo};
use core::arch::x86_64::{_mm_lfence, _rdtsc};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

/// Register writes held by [`PostedMmio`] before they reach the model.
const POSTED: usize = 16;

/// The device's registers as the engine sees them in the lock-step run: a write is latched
/// (one store, like a posted MMIO write on hardware) and delivered to the model by
/// [`PostedMmio::flush`] after `dpi_step`, so the model's register emulation is not counted
/// as DPI work. A read flushes first (as a PCIe read does with posted writes), so the model
/// always sees the writes in order.
struct PostedMmio<'a> {
    model: &'a Model<'a>,
    latch: [Cell<(u32, u32)>; POSTED],
    n: Cell<usize>,
}

impl<'a> PostedMmio<'a> {
    fn new(model: &'a Model<'a>) -> Self {
        Self {
            model,
            latch: std::array::from_fn(|_| Cell::new((0, 0))),
            n: Cell::new(0),
        }
    }

    /// Deliver the latched writes to the model, oldest first.
    #[inline(never)]
    fn flush(&self) {
        for w in &self.latch[..self.n.get()] {
            let (reg, value) = w.get();
            self.model.write32(Reg(reg), value);
        }
        self.n.set(0);
    }
}

impl NicRegisters for PostedMmio<'_> {
    fn read32(&self, reg: Reg) -> u32 {
        self.flush();
        self.model.read32(reg)
    }
    #[inline(always)]
    fn write32(&self, reg: Reg, value: u32) {
        let mut n = self.n.get();
        if n == POSTED {
            // Only configuration bursts (start-up) fill the latch.
            self.flush();
            n = 0;
        }
        self.latch[n].set((reg.0, value));
        self.n.set(n + 1);
    }
}

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

/// A TCP/IPv4 frame of `len` bytes (at least 54) with correct checksums, as a stack sends it
/// without offloads: the queue engine checks them on every frame (`nic::checksum`), so the
/// bench pays for that as the DPI core does.
fn bench_frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len.max(54)];
    f[..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x55, 10, 0, 2, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14..24].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6]);
    f[16..18].copy_from_slice(&((len.max(54) - 14) as u16).to_be_bytes());
    f[26..34].copy_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
    f[34..38].copy_from_slice(&[0x9c, 0x40, 0, 80]);
    f[38..46].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    f[46..50].copy_from_slice(&[0x50, 0x18, 0xff, 0xff]);
    ally_dpi::nic::offload::fill_checksums(&mut f);
    f
}

/// Program the guest's rings through the shadow, as its driver would.
fn guest_setup(w: &World, model: &Model<'_>, len: usize) {
    let gw = |r: Reg, v: u32| w.shadow.guest_write(r, v, model);
    for i in 0..TX_N {
        let buf = G_TX_BUFS + u64::from(i) * 2048;
        w.mem
            .write(HostPhysAddr(buf), &bench_frame(len, 0x5A))
            .unwrap();
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
fn dpi_step<R: NicRegisters>(nic: &mut DpiNic<'_, FakeDma, R, PassAll>) -> u64 {
    nic.poll()
}

/// The time stamp counter, ordered after earlier instructions (LFENCE; RDTSC).
#[inline(always)]
fn tsc() -> u64 {
    // SAFETY: LFENCE and RDTSC have no preconditions in user mode (CR4.TSD clear on the hosts
    // the bench runs on; the DPI core itself reads the TSC the same way).
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}

/// Ticks an empty `tsc()` pair costs (the least of many), subtracted from every sample.
fn tsc_overhead() -> u64 {
    (0..10_000)
        .map(|_| {
            let t = tsc();
            tsc().wrapping_sub(t)
        })
        .min()
        .unwrap_or(0)
}

/// TSC ticks per nanosecond, against the monotonic clock.
fn tsc_per_ns() -> f64 {
    let (t0, c0) = (Instant::now(), tsc());
    while t0.elapsed() < Duration::from_millis(50) {
        std::hint::spin_loop();
    }
    let (dt, dc) = (t0.elapsed(), tsc() - c0);
    dc as f64 / dt.as_nanos() as f64
}

/// What one lock-step run measured.
#[derive(Clone, Copy, Debug)]
struct Det {
    packets: u64,
    /// TSC ticks spent inside `dpi_step` (less the timing overhead).
    dpi_ticks: u64,
    /// TSC ticks of the whole loop (guest, model and DPI work).
    loop_ticks: u64,
}

/// Lock-step run.
fn deterministic(c: Case, packets: u64, overhead: u64) -> Det {
    let w = World {
        mem: FakeDma::new(0, MEM_END as usize),
        shadow: ShadowRegs::new(),
    };
    let model = E1000Model::new(
        &w.mem,
        ModelConfig {
            flavor: Flavor::Qemu,
            immediate: false,
            ..ModelConfig::default()
        },
    );
    let mmio = PostedMmio::new(&model);
    let cfg = DpiConfig {
        mode: c.mode,
        tx_ring: 256,
        rx_ring: 256,
        ..DpiConfig::default()
    };
    let mut nic =
        DpiNic::new(&w.shadow, &w.mem, &mmio, policy(), DPI_REGION, cfg, PassAll).expect("dpi");
    mmio.flush();
    guest_setup(&w, &model, c.len);
    dpi_step(&mut nic);
    mmio.flush();
    let frame = bench_frame(c.len, 0xA5);
    let (mut tdt, mut rdt, mut done) = (0u32, RX_N - 1, 0u64);
    let mut dpi_ticks = 0u64;
    let mut step = |nic: &mut DpiNic<'_, FakeDma, PostedMmio<'_>, PassAll>| {
        let t = tsc();
        dpi_step(nic);
        dpi_ticks += tsc().wrapping_sub(t).saturating_sub(overhead);
        mmio.flush();
    };
    let start = tsc();
    while done < packets {
        if c.rx {
            for _ in 0..c.batch {
                model.inject(&frame);
            }
            model.process();
            step(&mut nic);
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
            step(&mut nic);
            model.process();
            model.take_wire();
        }
        w.shadow.guest_read(Reg::ICR, &model);
        done += u64::from(c.batch);
    }
    // Complete the last batch.
    step(&mut nic);
    let loop_ticks = tsc() - start;
    let cnt = nic.counters();
    let moved = if c.rx { cnt.rx.packets } else { cnt.tx.packets };
    assert_eq!(moved, done, "every packet moved");
    assert_eq!(nic.tx_in_flight(), 0, "every packet completed");
    Det {
        packets: moved,
        dpi_ticks,
        loop_ticks,
    }
}

/// Best (least DPI time) of `runs` lock-step runs: the machine is shared, noise only adds.
fn deterministic_best(c: Case, packets: u64, runs: usize, overhead: u64) -> Det {
    (0..runs)
        .map(|_| deterministic(c, packets, overhead))
        .min_by_key(|d| d.dpi_ticks)
        .expect("at least one run")
}

/// One line of timing results for a lock-step run.
fn det_report(c: Case, d: Det, per_ns: f64) -> String {
    let pk = d.packets as f64;
    let cyc = d.dpi_ticks as f64 / pk;
    let per_byte = match c.mode {
        // Copy mode (TX copies into the arena, RX into the guest's buffers): cycles per byte.
        Mode::Copy => format!("{:>9.3}", d.dpi_ticks as f64 / (pk * c.len as f64)),
        Mode::ZeroCopy => format!("{:>9}", "-"),
    };
    format!(
        "{:>10.1} {:>8.1} {} {:>12.1}",
        cyc,
        cyc / per_ns,
        per_byte,
        d.loop_ticks as f64 / pk
    )
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
            ..ModelConfig::default()
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
        let frame = bench_frame(c.len, 0xA5);
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

/// A transmitter that takes everything at once (drains the ring between timed batches).
struct Discard;

impl TxFifo for Discard {
    fn room(&mut self) -> usize {
        usize::MAX
    }
    fn put(&mut self, byte: u8) {
        std::hint::black_box(byte);
    }
}

/// Nanoseconds per call of `record` (best of 5 runs of `n` calls in batches of 64, `drain`
/// between batches, untimed).
fn ns_per_record<S>(
    n: u64,
    state: &mut S,
    mut record: impl FnMut(&mut S, u64),
    mut drain: impl FnMut(&mut S),
) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut timed = Duration::ZERO;
        for batch in 0..n / 64 {
            let t = Instant::now();
            for i in 0..64 {
                record(state, batch * 64 + i);
            }
            timed += t.elapsed();
            drain(state);
        }
        best = best.min(timed.as_nanos() as f64 / (n / 64 * 64) as f64);
    }
    best
}

/// The DPI core's cost per alert record with the alert ring (`ALLY eve` and `ALLY pcap`).
fn alerts() {
    const N: u64 = 200_000;
    let parsed = engine::rules::parse_rules(
        "alert tcp any any -> any any (msg:\"ET POLICY bench alert\"; classtype:policy-violation; content:\"x\"; sid:2000001; rev:3;)",
        &engine::vars::Vars::new(),
    );
    let rule = &parsed.rules[0];
    let alert = |i: u64| Alert {
        ts: Timestamp(1_700_000_000_000_000 + i),
        dir: engine::Direction::FromWire,
        src: "10.0.2.2".parse().unwrap(),
        sport: 40000 + (i % 1000) as u16,
        dst: "10.0.2.15".parse().unwrap(),
        dport: 80,
        proto: 6,
        rule,
        suppressed: 0,
        http: None,
        app: Default::default(),
    };
    let frame = vec![0xA5u8; 1500];
    let ring: Box<RecordRing<{ 64 * 1024 }>> = Box::new(RecordRing::new());
    let mut sink = MgmtWriter::new(ring.producer(2048).unwrap());
    let mut text = MgmtWriter::new(String::new());
    let mut record_bytes = [0usize; 2];
    for (k, kind) in ["eve", "pcap"].into_iter().enumerate() {
        let emit = |s: &mut dyn AlertSink, i: u64| match k {
            0 => s.alert(&alert(i)),
            _ => s.dropped(&frame, engine::Direction::ToWire, Timestamp(i)),
        };
        emit(&mut text, 0);
        record_bytes[k] = text.out.len();
        let ring_ns = ns_per_record(
            N,
            &mut sink,
            |sink, i| emit(sink, i),
            |_| {
                ring.flush(&mut Discard, || {});
            },
        );
        let string_ns = ns_per_record(N, &mut text, |t, i| emit(t, i), |t| t.out.clear());
        println!(
            "alert record {kind:<4} {:>4} B: {ring_ns:>6.0} ns into the ring, {string_ns:>6.0} ns into a String; a synchronous COM2 write took {:.1} ms",
            record_bytes[k],
            (record_bytes[k] + 1) as f64 * 10.0 / 115_200.0 * 1e3
        );
    }
    let s = ring.stats();
    println!(
        "alert ring: written={} lost={} ring-bytes={} peak={}",
        s.written, s.lost, s.capacity, s.peak
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("alerts") {
        alerts();
        return;
    }
    let overhead = tsc_overhead();
    let per_ns = tsc_per_ns();
    let header = format!(
        "{:>10} {:>8} {:>9} {:>12}",
        "dpi cyc/p", "dpi ns/p", "cyc/byte", "loop cyc/p"
    );
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
        let runs: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
        let d = deterministic_best(*c, n, runs, overhead);
        println!(
            "case {} packets {} bytes {}",
            c.name,
            d.packets,
            d.packets * c.len as u64
        );
        println!("{:<22} {header}", "tsc");
        println!("{:<22} {}", c.name, det_report(*c, d, per_ns));
        return;
    }
    println!("TSC {per_ns:.3} ticks/ns, {overhead} ticks per timing pair (subtracted)");
    println!(
        "{:<22} {:>12} {:>14} {:>10} {header}",
        "case", "threaded pps", "lock-step pps", "Gbit/s"
    );
    for c in CASES {
        let n = if c.len > 1000 { 200_000 } else { 500_000 };
        let pps = threaded(c, n);
        let t = Instant::now();
        let first = deterministic(c, n, overhead);
        let det_pps = first.packets as f64 / t.elapsed().as_secs_f64();
        let best = deterministic_best(c, n, 4, overhead);
        let d = if first.dpi_ticks < best.dpi_ticks {
            first
        } else {
            best
        };
        println!(
            "{:<22} {:>12.0} {:>14.0} {:>10.2} {}",
            c.name,
            pps,
            det_pps,
            pps * c.len as f64 * 8.0 / 1e9,
            det_report(c, d, per_ns)
        );
    }
    alerts();
}
