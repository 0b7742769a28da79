//! Qwen3-0.6B decode on one GPU with a Rust megakernel, plus everything around it: config and
//! checkpoint loading, tokenizer and chat template, a CPU reference forward, sampling, and the
//! GPU engine that launches the kernel built from `kernel/`. The `host` binary's subcommands
//! (src/cli/) are built on this library.

pub mod backend;
pub mod engine;
pub mod gpu;
pub mod model;
pub mod stats;
