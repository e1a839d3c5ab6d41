//! Fuzz target `agent`: see `ferry_fuzz::agent`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::agent(data);
});
