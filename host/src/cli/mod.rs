//! Command-line parsing (clap derive) and the shared bits of the subcommands.

mod decode;
mod perplexity;
mod synth;
mod tokenize;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use host::generate::Backend;
use host::model::reference::CpuReference;
use host::model::{checkpoint, Qwen3Config, Weights};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "host", version, about = "Qwen3-0.6B decode on one GPU with a Rust megakernel (and a CPU reference)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Decode(decode::DecodeArgs),
    /// Mean negative log-likelihood and perplexity of a text under the model.
    Perplexity(perplexity::PerplexityArgs),
    /// Print the token ids of a text.
    Tokenize(tokenize::TokenizeArgs),
    /// Write a checkpoint with random weights (Qwen3-0.6B layout by default).
    Synth(synth::SynthArgs),
    /// Measure decode speed on the GPU.
    Bench(host::bench::BenchArgs),
    /// Measure the cost of the kernel's grid-wide synchronisation.
    SyncBench(host::syncbench::SyncBenchArgs),
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Decode(args) => decode::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Bench(args) => host::bench::run(args),
        Command::SyncBench(args) => host::syncbench::run(args),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The megakernel on the GPU.
    Gpu,
    /// The CPU reference (slow; for checking).
    Cpu,
}

/// `1,2,3` (spaces allowed) as token ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    let ids = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("token id {s:?} is not a non-negative integer")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("no token ids given");
    }
    Ok(ids)
}

/// Refuses ids the model has no embedding for.
pub fn check_ids(ids: &[u32], vocab_size: usize) -> anyhow::Result<()> {
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
        bail!("token #{i} is id {id}, but the model's vocabulary has only {vocab_size} ids (0..{})", vocab_size - 1);
    }
    Ok(())
}

/// Largest KV cache the CLI sets up, whatever config.json claims: the CPU reference's RoPE table
/// alone is `max_context * head_dim` floats, allocated up front.
pub const MAX_CONTEXT: usize = 1 << 24;

/// Refuses a `--max-context` below `min`, beyond the model's positions, or absurdly large.
pub fn check_max_context(max_context: usize, min: usize, config: &Qwen3Config) -> anyhow::Result<()> {
    if max_context < min {
        bail!("--max-context must be at least {min}, got {max_context}");
    }
    if max_context > config.max_position_embeddings {
        bail!(
            "--max-context {max_context} exceeds the model's max_position_embeddings ({})",
            config.max_position_embeddings
        );
    }
    if max_context > MAX_CONTEXT {
        bail!("--max-context {max_context} is more than this tool supports ({MAX_CONTEXT})");
    }
    Ok(())
}

/// A text argument as UTF-8; names the flag when it is not.
pub fn utf8_arg<'a>(flag: &str, value: &'a OsStr) -> anyhow::Result<&'a str> {
    value.to_str().ok_or_else(|| {
        anyhow!("{flag} is not valid UTF-8 text ({}); the tokenizer needs UTF-8", value.to_string_lossy())
    })
}

/// Loads the checkpoint (with a progress bar) and opens the backend for `device`.
pub fn open_backend(dir: &Path, device: Device, max_context: usize) -> anyhow::Result<Box<dyn Backend>> {
    let weights: Weights =
        checkpoint::load(dir, true).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let weights = Arc::new(weights);
    match device {
        Device::Gpu => host::engine::open_gpu_backend(weights, max_context),
        Device::Cpu => Ok(Box::new(CpuReference::new(weights, max_context))),
    }
}

/// `--model` or the HF cache.
pub fn model_dir(arg: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    checkpoint::resolve_model_dir(arg.as_deref())
}
