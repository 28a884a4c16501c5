//! `cachet::fuzz::frame`: see host/src/fuzz.rs for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cachet::fuzz::frame(data));
