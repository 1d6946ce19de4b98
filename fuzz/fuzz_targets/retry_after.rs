#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apiguard_fuzz::retry_after(data));
