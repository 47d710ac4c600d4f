//! The OS-core ⇄ DPI-core contract: doorbells and single-producer/single-consumer rings that
//! live in DPI memory and are shared by two cores.
//!
//! * [`Doorbell`]: one cache line holding a sequence number. The OS core (in its VM-exit
//!   handler) first stores the new shadow register value and then bumps the sequence with
//!   `Release`; the DPI core observes the bump with `Acquire` and therefore also sees the value
//!   stored before it. Rings coalesce: the DPI core only learns "something changed since you
//!   last looked", which is all it needs because it re-reads the shadow registers.
//! * [`SpscRing`]: a lock-free ring of `Copy` items in caller-provided memory (see its docs for
//!   why this is hand-written rather than `heapless::spsc`).

mod doorbell;
mod spsc;

pub use doorbell::{
    timestamp, CachePadded, Doorbell, DoorbellWatcher, WakeHistogram, WakeLatency, WAKE_BUCKETS,
};
pub use spsc::{Consumer, Producer, QueueError, Slot, SpscHeader, SpscRing, SpscStorage};
