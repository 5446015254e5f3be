//! `tofy::fuzzing::chat_request` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tofy::fuzzing::chat_request(data));
