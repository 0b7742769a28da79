//! A whole safetensors file's bytes through the header parser: Ok or Err, never a panic, and
//! every accepted tensor's byte range inside the data section.
#![no_main]

use host::model::checkpoint::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((data_start, tensors)) = parse_header(data) {
        assert!(data_start <= data.len());
        for entry in tensors.values() {
            assert!(entry.begin <= entry.end && data_start + entry.end <= data.len());
        }
    }
});
