//! config.json / generation_config.json parsing: any bytes give Ok or Err, never a panic.
#![no_main]

use host::model::config::GenerationConfig;
use host::model::Qwen3Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Qwen3Config::from_json_str(text) {
            // What callers compute from an accepted config must not overflow either.
            let _ = (c.q_dim(), c.kv_dim());
            let _ = c.to_hf_json();
        }
        let _ = GenerationConfig::from_json_str(text);
    }
});
