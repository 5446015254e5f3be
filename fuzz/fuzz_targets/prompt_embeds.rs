//! `tofy::fuzzing::prompt_embeds` on every input libFuzzer makes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tofy::fuzzing::prompt_embeds(data));
