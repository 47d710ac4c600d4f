//! Shared harness for the NIC tests: fake physical memory, the software e1000, the shadow
//! register file, the DPI engine, and a "guest driver" that programs the rings as Linux's e1000
//! driver does, all through the shadow (as the OS core's exit handler would).
#![allow(dead_code)]

use ally_dpi::nic::desc::{rxsta, txcmd, LegacyTxDesc, RxDesc, TxContextDesc, TxDataDesc};
use ally_dpi::nic::dpi::{DpiConfig, DpiNic};
use ally_dpi::nic::mem::{DmaMemory, FakeDma, MemoryPolicy};
use ally_dpi::nic::model::{E1000Model, Flavor, ModelConfig};
use ally_dpi::nic::regs::{icr, rctl, tctl, Reg};
use ally_dpi::nic::shadow::ShadowRegs;
use ally_dpi::nic::PacketHook;
use ally_hypervisor::addr::{HostPhysAddr, PhysRange};

pub const MIB: u64 = 1 << 20;
/// Guest RAM is [0, 12 MiB); Ally + DPI memory is [12 MiB, 16 MiB).
pub const RAM_END: u64 = 12 * MIB;
pub const MEM_END: u64 = 16 * MIB;
pub const PROTECTED: PhysRange = PhysRange {
    start: RAM_END,
    end: MEM_END,
};
pub const DPI_REGION: PhysRange = PhysRange {
    start: 13 * MIB,
    end: MEM_END,
};

pub const G_TX_RING: u64 = MIB;
pub const G_RX_RING: u64 = MIB + 0x1_0000;
pub const G_TX_BUFS: u64 = 2 * MIB;
pub const G_RX_BUFS: u64 = 5 * MIB;
pub const G_BUF: u64 = 16384;

pub mod ops;

pub type Model = E1000Model<&'static FakeDma>;

pub struct Env<H: PacketHook> {
    pub mem: &'static FakeDma,
    pub model: &'static Model,
    pub shadow: &'static ShadowRegs,
    pub dpi: std::mem::ManuallyDrop<DpiNic<'static, FakeDma, Model, H>>,
    pub tx_n: u32,
    pub tdt: u32,
    pub rx_n: u32,
    pub rx_next: u32,
    pub rdt: u32,
    pub rx_buf: u32,
}

pub fn policy() -> MemoryPolicy {
    MemoryPolicy::new(
        &[PhysRange {
            start: 0,
            end: RAM_END,
        }],
        &[PROTECTED],
    )
    .unwrap()
}

pub fn env<H: PacketHook>(cfg: DpiConfig, flavor: Flavor, immediate: bool, hook: H) -> Env<H> {
    env_with_model(
        cfg,
        ModelConfig {
            flavor,
            immediate,
            ..ModelConfig::default()
        },
        hook,
    )
}

/// [`env`] with a software e1000 configured as `model` says.
pub fn env_with_model<H: PacketHook>(cfg: DpiConfig, model: ModelConfig, hook: H) -> Env<H> {
    let mem: &'static FakeDma = Box::leak(Box::new(FakeDma::new(0, MEM_END as usize)));
    let model: &'static Model = Box::leak(Box::new(E1000Model::new(mem, model)));
    let shadow: &'static ShadowRegs = Box::leak(Box::new(ShadowRegs::new()));
    let dpi = std::mem::ManuallyDrop::new(
        DpiNic::new(shadow, mem, model, policy(), DPI_REGION, cfg, hook).unwrap(),
    );
    Env {
        mem,
        model,
        shadow,
        dpi,
        tx_n: 0,
        tdt: 0,
        rx_n: 0,
        rx_next: 0,
        rdt: 0,
        rx_buf: 2048,
    }
}

/// A deterministic frame of `len` bytes tagged with `seq`.
pub fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8)
        .collect();
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    if len >= 18 {
        f[14..18].copy_from_slice(&seq.to_be_bytes());
    }
    f
}

/// Ethernet + IPv4 (20 bytes, not a fragment) + TCP (20 bytes, ACK|PSH) + `payload` bytes,
/// tagged with `seq`: IP at 14 (checksum at 24), TCP at 34 (checksum at 50), payload at 54.
/// The IPv4 header checksum is correct (a stack computes it unless the device inserts it);
/// the TCP checksum is 0, the pseudo-header seed of an offload (see [`tcp4_frame_summed`]).
pub fn tcp4_frame(seq: u32, payload: usize) -> Vec<u8> {
    let mut f = frame(seq, 54 + payload);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[20..22].copy_from_slice(&[0x40, 0]);
    f[23] = 6;
    f[24..26].copy_from_slice(&[0, 0]);
    f[46] = 5 << 4;
    f[47] = 0x18;
    f[50..52].copy_from_slice(&[0, 0]);
    let sum = ally_dpi::engine::packet::internet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f
}

/// [`tcp4_frame`] with its TCP checksum correct too: a frame sent without offloads.
pub fn tcp4_frame_summed(seq: u32, payload: usize) -> Vec<u8> {
    let mut f = tcp4_frame(seq, payload);
    ally_dpi::nic::offload::fill_checksums(&mut f);
    f
}

/// Bytes of a [`tcp4_frame`] the device's checksum offloads may write after inspection.
pub const TCP4_CHECKSUM_BYTES: [usize; 4] = [24, 25, 50, 51];

impl<H: PacketHook> Drop for Env<H> {
    fn drop(&mut self) {
        // SAFETY: `dpi` is dropped exactly once, here, and never used afterwards; it is the
        // only holder of references to the three leaked boxes below besides `self`.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.dpi) };
        // SAFETY: the three references came from `Box::leak` in `env`, nothing borrows them
        // any more (the engine is gone and `self` is being dropped), and each is freed once.
        unsafe {
            drop(Box::from_raw(
                self.shadow as *const ShadowRegs as *mut ShadowRegs,
            ));
            drop(Box::from_raw(self.model as *const Model as *mut Model));
            drop(Box::from_raw(self.mem as *const FakeDma as *mut FakeDma));
        }
    }
}

impl<H: PacketHook> Env<H> {
    pub fn gw(&self, reg: Reg, v: u32) {
        self.shadow.guest_write(reg, v, self.model);
    }
    pub fn gr(&self, reg: Reg) -> u32 {
        self.shadow.guest_read(reg, self.model)
    }
    pub fn write(&self, pa: u64, data: &[u8]) {
        self.mem.write(HostPhysAddr(pa), data).unwrap();
    }
    pub fn read(&self, pa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read(HostPhysAddr(pa), &mut b).unwrap();
        b
    }

    /// Program both rings and enable the device, in the Linux driver's order.
    pub fn setup(&mut self, tx_n: u32, rx_n: u32, rx_buf: u32) {
        self.tx_n = tx_n;
        self.rx_n = rx_n;
        self.rx_buf = rx_buf;
        self.tdt = 0;
        self.rx_next = 0;
        for i in 0..tx_n {
            self.write(G_TX_RING + u64::from(i) * 16, &[0; 16]);
        }
        self.gw(Reg::TDBAL, G_TX_RING as u32);
        self.gw(Reg::TDBAH, 0);
        self.gw(Reg::TDLEN, tx_n * 16);
        self.gw(Reg::TDH, 0);
        self.gw(Reg::TDT, 0);
        self.gw(Reg::TCTL, tctl::EN | tctl::PSP);
        for i in 0..rx_n {
            let d = RxDesc {
                buffer_addr: G_RX_BUFS + u64::from(i) * G_BUF,
                ..Default::default()
            };
            self.write(G_RX_RING + u64::from(i) * 16, &d.to_bytes());
        }
        self.gw(Reg::RDBAL, G_RX_RING as u32);
        self.gw(Reg::RDBAH, 0);
        self.gw(Reg::RDLEN, rx_n * 16);
        self.gw(Reg::RDH, 0);
        self.rdt = rx_n - 1;
        self.gw(Reg::RDT, self.rdt);
        let bits = rctl::for_buffer_size(rx_buf).unwrap();
        self.gw(
            Reg::RCTL,
            rctl::EN | rctl::BAM | bits | if rx_buf > 2048 { rctl::LPE } else { 0 },
        );
        self.gw(
            Reg::IMS,
            icr::RXT0 | icr::TXDW | icr::LSC | icr::RXSEQ | icr::RXDMT0,
        );
        // The DPI core follows the new configuration (it polls continuously on Ally).
        self.run();
    }

    pub fn tx_desc_addr(&self, i: u32) -> u64 {
        G_TX_RING + u64::from(i % self.tx_n) * 16
    }
    pub fn tx_buf(&self, i: u32) -> u64 {
        G_TX_BUFS + u64::from(i % self.tx_n) * G_BUF
    }

    /// Queue one raw descriptor at TDT (without publishing it).
    pub fn queue_raw(&mut self, raw: [u8; 16]) -> u32 {
        let i = self.tdt;
        self.write(self.tx_desc_addr(i), &raw);
        self.tdt = (self.tdt + 1) % self.tx_n;
        i
    }

    /// Queue a legacy single-descriptor frame.
    pub fn queue_legacy(&mut self, f: &[u8]) -> u32 {
        self.queue_legacy_with(f, 0, 0)
    }

    /// Queue a legacy single-descriptor frame for which the device inserts the 802.1Q tag
    /// `tci` (VLE; in VLAN mode).
    pub fn queue_legacy_vlan(&mut self, f: &[u8], tci: u16) -> u32 {
        self.queue_legacy_with(f, txcmd::VLE, tci)
    }

    /// Queue a legacy single-descriptor frame with EOP, IFCS, RS and `cmd`, and `special`.
    fn queue_legacy_with(&mut self, f: &[u8], cmd: u8, special: u16) -> u32 {
        let buf = self.tx_buf(self.tdt);
        self.write(buf, f);
        self.queue_raw(
            LegacyTxDesc {
                buffer_addr: buf,
                length: f.len() as u16,
                cmd: txcmd::EOP | txcmd::IFCS | txcmd::RS | cmd,
                special,
                ..Default::default()
            }
            .to_bytes(),
        )
    }

    /// Queue a frame split into `parts` data descriptors after a context descriptor.
    pub fn queue_ctx_data(
        &mut self,
        f: &[u8],
        parts: usize,
        ctx: TxContextDesc,
        dcmd: u8,
        popts: u8,
    ) {
        self.queue_raw(ctx.to_bytes());
        let chunk = f.len().div_ceil(parts);
        for (k, piece) in f.chunks(chunk).enumerate() {
            let buf = self.tx_buf(self.tdt);
            self.write(buf, piece);
            let last = k + 1 == f.len().div_ceil(chunk);
            let cmd =
                txcmd::DEXT | txcmd::IFCS | dcmd | if last { txcmd::EOP | txcmd::RS } else { 0 };
            self.queue_raw(TxDataDesc::new(buf, piece.len() as u32, cmd, popts, 0).to_bytes());
        }
    }

    /// Publish queued descriptors (one TDT write, as the driver does).
    pub fn kick(&self) {
        self.gw(Reg::TDT, self.tdt);
    }

    /// Run the DPI loop until it is idle.
    pub fn run(&mut self) -> u64 {
        let mut total = 0;
        let mut idle = 0;
        while idle < 3 {
            let w = self.dpi.poll();
            total += w;
            idle = if w == 0 { idle + 1 } else { 0 };
        }
        total
    }

    pub fn guest_tx_status(&self, i: u32) -> u8 {
        self.read(self.tx_desc_addr(i) + 12, 1)[0]
    }

    /// Collect frames the guest has received (DD set), returning its buffers like a driver.
    pub fn guest_rx(&mut self) -> Vec<(Vec<u8>, RxDesc)> {
        let mut out = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        loop {
            let at = G_RX_RING + u64::from(self.rx_next) * 16;
            let raw: [u8; 16] = self.read(at, 16).try_into().unwrap();
            let d = RxDesc::from_bytes(&raw);
            if d.status & rxsta::DD == 0 {
                break;
            }
            if d.length != 0 {
                cur.extend(self.read(d.buffer_addr, usize::from(d.length)));
            }
            if d.status & rxsta::EOP != 0 {
                out.push((std::mem::take(&mut cur), d));
            }
            // Clear the status and give the buffer back.
            self.write(at + 8, &[0; 8]);
            self.rdt = self.rx_next;
            self.rx_next = (self.rx_next + 1) % self.rx_n;
            self.gw(Reg::RDT, self.rdt);
        }
        out
    }
}
