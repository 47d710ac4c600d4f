//! Arbitrary CPU state, page tables, instruction bytes and faulting address into Ally's
//! MMIO emulator; `check_emulation_invariants` panics if anything but a clean refusal or a
//! correct emulation comes out (see its documentation for the input layout).
#![no_main]

use ally_hypervisor::guest::testing::check_emulation_invariants;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_emulation_invariants(data);
});
