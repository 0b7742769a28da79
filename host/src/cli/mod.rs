//! Command-line parsing (clap derive) and the shared bits of the subcommands.

mod bench;
mod decode;
mod perplexity;
mod sync_bench;
mod synth;
mod tokenize;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use host::backend::{check_max_context, default_max_context, Backend};
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
    Bench(bench::BenchArgs),
    /// Measure the cost of the kernel's grid-wide synchronisation.
    SyncBench(sync_bench::SyncBenchArgs),
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Decode(args) => decode::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Bench(args) => bench::run(args),
        Command::SyncBench(args) => sync_bench::run(args),
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

/// `--max-context` as given, else [`default_max_context`]; refused below `min` positions or
/// beyond what the model and this tool support.
pub fn max_context(arg: Option<usize>, min: usize, config: &Qwen3Config) -> anyhow::Result<usize> {
    let max_context = arg.unwrap_or_else(|| default_max_context(config));
    check_max_context(max_context, min, config)?;
    Ok(max_context)
}

/// A text argument as UTF-8; names the flag when it is not.
pub fn utf8_arg<'a>(flag: &str, value: &'a OsStr) -> anyhow::Result<&'a str> {
    value.to_str().ok_or_else(|| {
        anyhow!("{flag} is not valid UTF-8 text ({}); the tokenizer needs UTF-8", value.to_string_lossy())
    })
}

/// Loads the checkpoint (with a progress bar) and opens the backend for `device`. On the GPU,
/// prompts and scored texts go through prefill in chunks of `prefill_chunk` positions
/// (`--prefill-chunk`; 0: off, every position through the megakernel), by default
/// [`host::engine::DEFAULT_PREFILL_CHUNK`]. The CPU reference has no prefill: it ignores the
/// default and refuses a chunk asked for.
pub fn open_backend(
    dir: &Path,
    device: Device,
    max_context: usize,
    prefill_chunk: Option<usize>,
    stream_decode: bool,
) -> anyhow::Result<Box<dyn Backend>> {
    // Refused (before anything loads) rather than ignored, which would seem to have used it.
    anyhow::ensure!(
        device == Device::Gpu || prefill_chunk.unwrap_or(0) == 0,
        "--prefill-chunk runs the GPU's prefill kernels; the CPU reference (--device cpu) has none"
    );
    let weights: Weights =
        checkpoint::load(dir, true).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let weights = Arc::new(weights);
    match device {
        Device::Gpu => host::engine::open_gpu_backend(weights, max_context, prefill_chunk, stream_decode),
        Device::Cpu => Ok(Box::new(CpuReference::new(weights, max_context))),
    }
}

/// `--model` or the HF cache.
pub fn model_dir(arg: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    checkpoint::resolve_model_dir(arg.as_deref())
}
