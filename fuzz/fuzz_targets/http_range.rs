//! Fuzz target `http_range`: see `ferry_fuzz::http_range`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::http_range(data);
});
