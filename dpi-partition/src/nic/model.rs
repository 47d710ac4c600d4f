//! A software 82540EM (device side) for host tests and the benchmark.
//!
//! It implements [`NicRegisters`] over an atomic register file and does DMA through a
//! [`DmaMemory`]: transmit descriptors are fetched from the ring at TDBA (for Ally that is the
//! DPI-owned ring in DPI memory), frames go to a wire queue, frames injected from the wire are
//! written into receive buffers with length/status/DD/EOP. Semantics follow the 8254x SDM and
//! the two emulators Ally is tested on:
//!
//! * ICR is read-to-clear and write-1-to-clear; ICS sets causes; IMS sets and IMC clears mask
//!   bits; the interrupt line is `ICR & IMS != 0` (SDM 13.4.17–13.4.21).
//! * CTRL.RST resets every register to its default and self-clears (SDM 13.4.1).
//! * A TDT or RDT write processes the rings at once, as both QEMU and Bochs do (with
//!   [`ModelConfig::immediate`]); otherwise [`E1000Model::process`] is driven by a thread.
//! * [`Flavor::Bochs`]: right after a write to RDT, RDT == RDH reads as a full ring of buffers
//!   (Bochs 2.7 `e1000_has_rxbufs` with `check_rxov` clear); once the device has consumed a
//!   descriptor, RDT == RDH means empty again. [`Flavor::Qemu`]: RDT == RDH is always empty.
//! * Transmit checksum offload (legacy IC/CSO/CSS, data-descriptor IXSM/TXSM with a context) is
//!   applied; TCP segmentation (TSE) is *not* modelled: the super-frame goes to the wire whole
//!   and is counted in [`ModelStats::tso_unsegmented`].
//! * VLAN mode (CTRL.VME): a VLE descriptor's special field goes out as an 802.1Q tag after
//!   the MAC addresses, inserted after the checksums (SDM 3.3.3.1); a received 802.1Q frame
//!   loses its tag into every descriptor's special field, VP set (3.2.3.1; QEMU's
//!   `e1000_receive_iov`).
//! * A frame for which there are not enough receive buffers stays queued on the wire
//!   (the device exerts back-pressure instead of dropping, so tests can count exactly).

use super::desc::{
    rxsta, txcmd, txsta, RxDesc, TxContextDesc, TxDesc, DESC_SIZE, TX_STATUS_OFFSET,
};
use super::mem::DmaMemory;
use super::regs::{ctrl, icr, rctl, status, tctl, NicRegisters, Reg};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use ally_hypervisor::addr::HostPhysAddr;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Which emulator's receive-ring quirk to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Qemu,
    Bochs,
}

/// Model options.
#[derive(Debug, Clone, Copy)]
pub struct ModelConfig {
    pub flavor: Flavor,
    /// Process rings inside TDT/RDT writes (both emulators do).
    pub immediate: bool,
    /// Frames the receive packet buffer holds while no descriptor is free (0: unbounded). A
    /// frame arriving when it is full is missed and counted in MPC (SDM 13.7.5), as QEMU's
    /// e1000 misses the frames it cannot place when the ring runs out.
    pub rx_fifo_frames: usize,
    /// MPC keeps its count on read, as QEMU 7.2's and Bochs 2.7's e1000 do, rather than
    /// clearing (SDM 13.7).
    pub mpc_running: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            flavor: Flavor::Qemu,
            immediate: true,
            rx_fifo_frames: 0,
            mpc_running: false,
        }
    }
}

/// Largest frame the model assembles from transmit descriptors (TSO super-frames included).
pub const MODEL_MAX_TX_FRAME: usize = 64 * 1024 + 256;

/// A minimal test-and-set lock (the model's device state; the EECD decoder in `guard`).
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked` (acquire on lock, release on unlock).
unsafe impl<T: Send> Sync for SpinLock<T> {}

pub(crate) struct Guard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    pub(crate) const fn new(v: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(v),
        }
    }
    pub(crate) fn lock(&self) -> Guard<'_, T> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Guard(self)
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to `value` exists.
        unsafe { &*self.0.value.get() }
    }
}
impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access through the guard.
        unsafe { &mut *self.0.value.get() }
    }
}
impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

/// Counters the model keeps (all monotonic).
#[derive(Debug, Default)]
pub struct ModelStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames discarded because the receiver was disabled or misconfigured.
    pub rx_discarded: AtomicU64,
    /// Frames missed because the packet buffer was full (each also counted in MPC).
    pub rx_missed: AtomicU64,
    /// TSE frames sent unsegmented (not modelled).
    pub tso_unsegmented: AtomicU64,
    /// Descriptor or buffer DMA that fell outside memory.
    pub dma_errors: AtomicU64,
    /// TX frames longer than [`MODEL_MAX_TX_FRAME`], discarded.
    pub tx_oversize: AtomicU64,
    /// Number of resets (CTRL.RST).
    pub resets: AtomicU64,
}

struct DeviceState {
    frame: Vec<u8>,
    /// Options of the frame being assembled, from its first descriptor.
    first: Option<TxDesc>,
    context: TxContextDesc,
    /// The tag to insert: VLE and the special field of the frame's EOP descriptor.
    vlan: Option<u16>,
    oversize: bool,
    wire_out: VecDeque<Vec<u8>>,
    wire_in: VecDeque<Vec<u8>>,
    /// Bochs: set once the device consumed an RX descriptor, cleared by an RDT write.
    check_rxov: bool,
}

/// The software e1000.
pub struct E1000Model<M: DmaMemory> {
    regs: Box<[AtomicU32]>,
    mem: M,
    cfg: ModelConfig,
    state: SpinLock<DeviceState>,
    pub stats: ModelStats,
}

fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Internet checksum of `frame[start..end]` stored big-endian at `frame[at..at + 2]` (the
/// device adds to whatever seed the driver left there, e.g. a pseudo-header sum).
fn insert_checksum(frame: &mut [u8], start: usize, end: usize, at: usize) {
    let end = end.min(frame.len());
    if start >= end || at + 2 > frame.len() {
        return;
    }
    let mut sum = ones_complement_sum(&frame[start..end], 0);
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let v = !(sum as u16);
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

impl<M: DmaMemory> E1000Model<M> {
    /// A device in its power-on state, doing DMA through `mem`.
    pub fn new(mem: M, cfg: ModelConfig) -> Self {
        let regs: Box<[AtomicU32]> = (0..Reg::BAR0_SIZE / 4).map(|_| AtomicU32::new(0)).collect();
        let m = Self {
            regs,
            mem,
            cfg,
            state: SpinLock::new(DeviceState {
                frame: Vec::new(),
                first: None,
                context: TxContextDesc::default(),
                vlan: None,
                oversize: false,
                wire_out: VecDeque::new(),
                wire_in: VecDeque::new(),
                check_rxov: false,
            }),
            stats: ModelStats::default(),
        };
        m.reset_registers();
        m
    }

    fn reg(&self, r: Reg) -> &AtomicU32 {
        &self.regs[r.index()]
    }

    fn get(&self, r: Reg) -> u32 {
        self.reg(r).load(Ordering::Acquire)
    }

    fn reset_registers(&self) {
        for r in self.regs.iter() {
            r.store(0, Ordering::Relaxed);
        }
        // SDM 13.4.2: full duplex, 1000 Mb/s, link up (the emulators report link up at once).
        self.reg(Reg::STATUS).store(
            status::FD | status::LU | status::SPEED_1000,
            Ordering::Release,
        );
        self.reg(Reg::CTRL)
            .store(ctrl::FD | ctrl::SLU, Ordering::Release);
    }

    /// The DMA memory the device uses.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Whether the interrupt line is asserted (`ICR & IMS`).
    pub fn irq_pending(&self) -> bool {
        self.get(Reg::ICR) & self.get(Reg::IMS) != 0
    }

    /// Peek at ICR without clearing it.
    pub fn peek_icr(&self) -> u32 {
        self.get(Reg::ICR)
    }

    /// Peek at IMS.
    pub fn peek_ims(&self) -> u32 {
        self.get(Reg::IMS)
    }

    /// Change the link state; raises LSC like the hardware.
    pub fn set_link(&self, up: bool) {
        if up {
            self.reg(Reg::STATUS).fetch_or(status::LU, Ordering::AcqRel);
        } else {
            self.reg(Reg::STATUS)
                .fetch_and(!status::LU, Ordering::AcqRel);
        }
        self.reg(Reg::ICR).fetch_or(icr::LSC, Ordering::AcqRel);
    }

    /// Put a frame on the wire towards the device (it is received when buffers allow, or
    /// missed when the packet buffer is full).
    pub fn inject(&self, frame: &[u8]) {
        {
            let mut st = self.state.lock();
            if self.cfg.rx_fifo_frames != 0 && st.wire_in.len() >= self.cfg.rx_fifo_frames {
                // SDM 13.7.5: MPC saturates rather than wrapping.
                let mpc = self.reg(Reg::MPC);
                let _ = mpc.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_add(1));
                self.stats.rx_missed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            st.wire_in.push_back(frame.to_vec());
        }
        if self.cfg.immediate {
            self.process();
        }
    }

    /// Frames injected but not yet received (waiting for buffers).
    pub fn wire_in_len(&self) -> usize {
        self.state.lock().wire_in.len()
    }

    /// Take every frame the device has transmitted so far.
    pub fn take_wire(&self) -> Vec<Vec<u8>> {
        self.state.lock().wire_out.drain(..).collect()
    }

    /// Run the transmit and receive engines once over whatever the registers allow.
    pub fn process(&self) {
        let mut st = self.state.lock();
        self.process_tx(&mut st);
        self.process_rx(&mut st);
    }

    fn ring(&self, bal: Reg, bah: Reg, len: Reg) -> (u64, u32) {
        let base = (u64::from(self.get(bah)) << 32) | u64::from(self.get(bal) & !0xF);
        (base, self.get(len) / DESC_SIZE as u32)
    }

    fn process_tx(&self, st: &mut DeviceState) {
        if self.get(Reg::TCTL) & tctl::EN == 0 {
            return;
        }
        let (base, n) = self.ring(Reg::TDBAL, Reg::TDBAH, Reg::TDLEN);
        let mut head = self.get(Reg::TDH);
        let tail = self.get(Reg::TDT);
        if n == 0 || head >= n || tail >= n {
            return;
        }
        let mut cause = 0;
        while head != tail {
            let at = HostPhysAddr(base + u64::from(head) * DESC_SIZE as u64);
            let mut raw = [0u8; DESC_SIZE];
            if self.mem.read(at, &mut raw).is_err() {
                self.stats.dma_errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let desc = TxDesc::parse(&raw);
            let (addr, len, eop) = match desc {
                TxDesc::Context(c) => {
                    st.context = c;
                    (0, 0, false)
                }
                TxDesc::Legacy(l) => {
                    st.vlan = (l.cmd & txcmd::VLE != 0).then_some(l.special);
                    (l.buffer_addr, l.length as usize, l.cmd & txcmd::EOP != 0)
                }
                TxDesc::Data(d) => {
                    st.vlan = (d.dcmd() & txcmd::VLE != 0).then_some(d.special);
                    (
                        d.buffer_addr,
                        d.length() as usize,
                        d.dcmd() & txcmd::EOP != 0,
                    )
                }
                TxDesc::Reserved(_) => (0, 0, false),
            };
            if matches!(desc, TxDesc::Legacy(_) | TxDesc::Data(_)) {
                if st.first.is_none() {
                    st.first = Some(desc);
                }
                if st.frame.len() + len > MODEL_MAX_TX_FRAME {
                    st.oversize = true;
                } else if len != 0 {
                    let old = st.frame.len();
                    st.frame.resize(old + len, 0);
                    if self
                        .mem
                        .read(HostPhysAddr(addr), &mut st.frame[old..])
                        .is_err()
                    {
                        self.stats.dma_errors.fetch_add(1, Ordering::Relaxed);
                        st.oversize = true;
                    }
                }
                if eop {
                    self.emit(st);
                }
            }
            if raw[11] & txcmd::RS != 0 {
                let sta =
                    (raw[TX_STATUS_OFFSET] | txsta::DD) & !(txsta::EC | txsta::LC | txsta::TU);
                let _ = self
                    .mem
                    .write(HostPhysAddr(at.as_u64() + TX_STATUS_OFFSET as u64), &[sta]);
                cause |= icr::TXDW;
            }
            head = (head + 1) % n;
            self.reg(Reg::TDH).store(head, Ordering::Release);
        }
        if cause != 0 || head == tail {
            self.raise(cause | icr::TXQE);
        }
    }

    fn emit(&self, st: &mut DeviceState) {
        let mut frame = core::mem::take(&mut st.frame);
        let first = st.first.take();
        let vlan = st.vlan.take();
        if core::mem::take(&mut st.oversize) {
            self.stats.tx_oversize.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match first {
            Some(TxDesc::Legacy(l)) if l.cmd & txcmd::IC != 0 => {
                // SDM 3.3.3.1: checksum from CSS to the end, stored at CSO.
                insert_checksum(&mut frame, l.css as usize, usize::MAX, l.cso as usize);
            }
            Some(TxDesc::Data(d)) => {
                let c = st.context;
                if d.dcmd() & txcmd::TSE != 0 {
                    self.stats.tso_unsegmented.fetch_add(1, Ordering::Relaxed);
                } else {
                    // SDM 3.3.6: a zero end offset means "to the end of the packet".
                    let end = |e: u16| if e == 0 { usize::MAX } else { e as usize + 1 };
                    if d.popts & super::desc::popts::IXSM != 0 {
                        insert_checksum(
                            &mut frame,
                            c.ipcss as usize,
                            end(c.ipcse),
                            c.ipcso as usize,
                        );
                    }
                    if d.popts & super::desc::popts::TXSM != 0 {
                        insert_checksum(
                            &mut frame,
                            c.tucss as usize,
                            end(c.tucse),
                            c.tucso as usize,
                        );
                    }
                }
            }
            _ => {}
        }
        if let Some(tci) = vlan.filter(|_| self.get(Reg::CTRL) & ctrl::VME != 0) {
            let at = frame.len().min(12);
            frame.splice(at..at, [0x81, 0x00, (tci >> 8) as u8, tci as u8]);
        }
        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.stats
            .tx_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        st.wire_out.push_back(frame);
    }

    fn process_rx(&self, st: &mut DeviceState) {
        let mut cause = 0;
        while let Some(wire) = st.wire_in.front() {
            // VLAN mode: the tag goes into the descriptors (VET is 0x8100: Ally refuses others).
            let (untagged, vlan) = match wire.get(12..16) {
                Some(&[0x81, 0x00, hi, lo]) if self.get(Reg::CTRL) & ctrl::VME != 0 => {
                    let mut untagged = wire[..12].to_vec();
                    untagged.extend_from_slice(&wire[16..]);
                    (Some(untagged), Some(u16::from_be_bytes([hi, lo])))
                }
                _ => (None, None),
            };
            let frame = untagged.as_deref().unwrap_or(wire);
            let rctl_v = self.get(Reg::RCTL);
            let (base, n) = self.ring(Reg::RDBAL, Reg::RDBAH, Reg::RDLEN);
            let bufsize = rctl::buffer_size(rctl_v);
            let mut head = self.get(Reg::RDH);
            let tail = self.get(Reg::RDT);
            let (Some(bufsize), true) = (
                bufsize,
                rctl_v & rctl::EN != 0 && n != 0 && head < n && tail < n,
            ) else {
                st.wire_in.pop_front();
                self.stats.rx_discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let avail = match head.cmp(&tail) {
                core::cmp::Ordering::Less => tail - head,
                core::cmp::Ordering::Greater => n - head + tail,
                core::cmp::Ordering::Equal => {
                    if self.cfg.flavor == Flavor::Bochs && !st.check_rxov {
                        n
                    } else {
                        0
                    }
                }
            };
            let need = frame.len().div_ceil(bufsize as usize).max(1) as u32;
            if avail < need {
                break;
            }
            let mut off = 0;
            for i in 0..need {
                let at = HostPhysAddr(base + u64::from(head) * DESC_SIZE as u64);
                let mut raw = [0u8; DESC_SIZE];
                if self.mem.read(at, &mut raw).is_err() {
                    self.stats.dma_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let mut d = RxDesc::from_bytes(&raw);
                let chunk = (frame.len() - off).min(bufsize as usize);
                if self
                    .mem
                    .write(HostPhysAddr(d.buffer_addr), &frame[off..off + chunk])
                    .is_err()
                {
                    self.stats.dma_errors.fetch_add(1, Ordering::Relaxed);
                }
                off += chunk;
                d.length = chunk as u16;
                d.csum = 0;
                d.errors = 0;
                d.special = vlan.unwrap_or(0);
                d.status = rxsta::DD
                    | if i + 1 == need { rxsta::EOP } else { 0 }
                    | if vlan.is_some() { rxsta::VP } else { 0 };
                let _ = self
                    .mem
                    .write(HostPhysAddr(at.as_u64() + 8), &d.writeback_bytes());
                head = (head + 1) % n;
                st.check_rxov = true;
                self.reg(Reg::RDH).store(head, Ordering::Release);
            }
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            st.wire_in.pop_front();
            cause |= icr::RXT0;
        }
        if cause != 0 {
            self.raise(cause);
        }
    }

    fn raise(&self, cause: u32) {
        self.reg(Reg::ICR).fetch_or(cause, Ordering::AcqRel);
    }
}

impl<M: DmaMemory> NicRegisters for E1000Model<M> {
    fn read32(&self, reg: Reg) -> u32 {
        if reg.0 >= Reg::BAR0_SIZE || reg.0 & 3 != 0 {
            return 0;
        }
        let reg = reg.canonical();
        match reg {
            // SDM 13.4.17: reading ICR clears it; 13.7: so does reading a statistic.
            Reg::ICR => self.reg(Reg::ICR).swap(0, Ordering::AcqRel),
            Reg::MPC if !self.cfg.mpc_running => self.reg(Reg::MPC).swap(0, Ordering::AcqRel),
            // IMC and ICS are write-only.
            Reg::IMC | Reg::ICS => 0,
            _ => self.get(reg),
        }
    }

    fn write32(&self, reg: Reg, value: u32) {
        if reg.0 >= Reg::BAR0_SIZE || reg.0 & 3 != 0 {
            return;
        }
        // Like the hardware, the model honours the 82542 register aliases.
        let reg = reg.canonical();
        match reg {
            Reg::CTRL => {
                if value & ctrl::RST != 0 {
                    let mut st = self.state.lock();
                    self.reset_registers();
                    st.frame.clear();
                    st.first = None;
                    st.oversize = false;
                    st.check_rxov = false;
                    self.stats.resets.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.reg(Reg::CTRL).store(value, Ordering::Release);
                }
            }
            Reg::STATUS => {}
            Reg::ICR => {
                self.reg(Reg::ICR).fetch_and(!value, Ordering::AcqRel);
            }
            Reg::ICS => self.raise(value & icr::ALL),
            Reg::IMS => {
                self.reg(Reg::IMS)
                    .fetch_or(value & icr::ALL, Ordering::AcqRel);
            }
            Reg::IMC => {
                self.reg(Reg::IMS).fetch_and(!value, Ordering::AcqRel);
            }
            Reg::RDT => {
                let mut st = self.state.lock();
                self.reg(Reg::RDT).store(value & 0xFFFF, Ordering::Release);
                st.check_rxov = false;
                if self.cfg.immediate {
                    self.process_rx(&mut st);
                }
            }
            Reg::TDT => {
                self.reg(Reg::TDT).store(value & 0xFFFF, Ordering::Release);
                if self.cfg.immediate {
                    self.process();
                }
            }
            Reg::RCTL | Reg::TCTL => {
                self.reg(reg).store(value, Ordering::Release);
                if self.cfg.immediate {
                    self.process();
                }
            }
            Reg::TDLEN | Reg::RDLEN => {
                self.reg(reg).store(value & 0xF_FF80, Ordering::Release);
            }
            _ => self.reg(reg).store(value, Ordering::Release),
        }
    }
}
