//! Fuzz target `nbd`: see `ferry_fuzz::nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::nbd(data);
});
