//! libFuzzer entry: the byte interpreter shared with `tests/nic_fuzz.rs`.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/nic_support/mod.rs"]
mod nic_support;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nic_support::ops::run(data);
});
