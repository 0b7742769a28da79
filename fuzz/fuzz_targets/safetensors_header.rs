//! A whole safetensors file's bytes through the header parser: Ok or Err, never a panic, and
//! every accepted tensor's byte range inside the data section.
#![no_main]

use host::model::tensor_file::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((data_start, tensors)) = parse_header(data) {
        assert!(data_start <= data.len());
        for info in tensors.values() {
            let (begin, end) = info.data_offsets;
            assert!(begin <= end && data_start + end <= data.len());
        }
    }
});
