//! `tofy::fuzzing::checkpoint` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tofy::fuzzing::checkpoint(data));
