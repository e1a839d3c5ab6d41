//! Fuzz target `package_file`: see `ferry_fuzz::package_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::package_file(data);
});
