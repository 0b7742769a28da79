//! Qwen3-0.6B decode on one GPU with a Rust megakernel, plus everything around it: config and
//! checkpoint loading, tokenizer and chat template, a CPU reference forward, sampling, and the
//! GPU engine that launches the kernel built from `kernel/`. The `host` binary's subcommands
//! (src/cli/) are built on this library.

pub mod backend;
pub mod engine;
pub mod gpu;
pub mod model;
pub mod stats;

// Former paths that some files still import (model/sampling.rs, and the tests gpu_device.rs,
// gpu_hf.rs, cpu_golden.rs, cpu_sampling.rs): `generate` was the name of `backend`, and
// `syncbench` held the L2 latency probe. Remove once they import the new paths.
#[doc(hidden)]
pub use backend as generate;
#[doc(hidden)]
pub mod syncbench {
    pub use crate::gpu::measure_l2_latency;
}
