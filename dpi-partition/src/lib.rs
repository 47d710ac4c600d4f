//! Ally's DPI partition: everything the sequestered DPI cores run.
//!
//! `no_std` + `alloc`; unit-tested on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod engine;
pub mod nic;
pub mod queue;
pub mod rules_module;
pub mod status;
