//! Fuzz target `migration`: see `ferry_fuzz::migration`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::migration(data);
});
