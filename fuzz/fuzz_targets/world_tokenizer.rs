//! `tofy::fuzzing::world_tokenizer` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tofy::fuzzing::world_tokenizer(data));
