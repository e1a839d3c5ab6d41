//! Fuzz target `package_table`: see `ferry_fuzz::package_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::package_table(data);
});
