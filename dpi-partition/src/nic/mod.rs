//! The e1000 (82540EM) side of Ally's DPI partition.
//!
//! * [`regs`], [`desc`]: the register map and descriptor formats (8254x SDM sections cited).
//! * [`mem`]: DMA memory access and the validator for every guest-supplied address.
//! * [`shadow`]: the guest's view of the queue and interrupt registers, shared by the OS core's
//!   exit handler and the DPI core, with the interrupt race documented and tested.
//! * [`trap`]: what the OS core's exit handler does with a trapped register access.
//! * [`guard`]: every register the guest reaches that Ally does not shadow: forwarded,
//!   filtered or refused, with the manual section that says why.
//! * [`dpi`]: the DPI core's queue engine: guest rings ⇄ DPI-owned real rings, every frame
//!   through a [`PacketHook`].
//! * [`offload`]: transmit checksum and segmentation offloads checked against the frame.
//! * [`checksum`]: frames with a wrong IPv4, TCP or UDP checksum dropped before inspection.
//! * [`model`]: a software 82540EM for host tests and benchmarks.

pub mod checksum;
pub mod desc;
pub mod dpi;
pub mod guard;
pub mod mem;
pub mod model;
pub mod offload;
pub mod regs;
pub mod shadow;
pub mod trap;

/// Which way a frame is travelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the guest, going to the wire (guest TX).
    ToWire,
    /// Received from the wire, going to the guest (guest RX).
    FromWire,
}

/// What the hook decided for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookVerdict {
    Pass,
    Drop,
    /// Not now: the hook kept a copy (an out-of-order TCP segment) and hands it back through
    /// [`PacketHook::take_forward`] once it is in order and passed.
    Hold,
}

/// The inspection hook the queue engine calls for every frame before it reaches the wire or
/// guest memory. `frame` is the whole Ethernet frame (without FCS); for a TSO send it is the
/// unsegmented super-frame as the guest built it.
pub trait PacketHook {
    fn inspect(&mut self, frame: &[u8], dir: Direction) -> HookVerdict;

    /// The next frame the hook held and now releases for `dir`, inspected and passed.
    fn take_forward(&mut self, _dir: Direction) -> Option<alloc::vec::Vec<u8>> {
        None
    }

    /// Whether released frames wait for [`PacketHook::take_forward`] (cheap: polled every
    /// pass of the queue engine).
    fn has_forward(&self) -> bool {
        false
    }
}

/// A hook that passes everything (Ally's behaviour until the engine is attached).
#[derive(Debug, Clone, Copy, Default)]
pub struct PassAll;

impl PacketHook for PassAll {
    #[inline]
    fn inspect(&mut self, _frame: &[u8], _dir: Direction) -> HookVerdict {
        HookVerdict::Pass
    }
}

impl<F: FnMut(&[u8], Direction) -> HookVerdict> PacketHook for F {
    fn inspect(&mut self, frame: &[u8], dir: Direction) -> HookVerdict {
        self(frame, dir)
    }
}
