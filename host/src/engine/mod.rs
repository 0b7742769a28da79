//! The GPU decode engine: uploads a checkpoint, owns the KV cache and work buffers, and runs
//! the `qwen3_decode_hd*` megakernel (kernel/src/decode.rs) with cooperative launches.
//!
//! One launch runs many decode steps: the prompt is fed one position per step, then each
//! chosen token feeds the next step on the device. Generated tokens arrive through a pinned
//! host-mapped ring while the kernel is still running, which is how `decode` streams.
//!
//! - `upload`: the checkpoint into device memory, the KV cache and work buffers.
//! - `launch`: one launch's settings and the kernel parameters built from them.
//! - `stream`: the generated tokens while the launch runs, and the wait for its end.
//! - `prefill`: prompt positions in chunks through matrix products, into the KV cache.
//! - `score`: a text's NLL through prefill (the final norm, the LM head as a GEMM and the
//!   NLL kernel after each chunk's layers).
//! - `fault`: a device error reported with the step the kernel had reached.
//! - `graph`: the same step as split kernels captured in a CUDA graph (`bench --compare`).
//! - `backend`: [`Backend`] on top of launches: generation, scoring, logits.
//! - `stream_plan`, `stream_step`, `stream_trace`: the streaming step (kernel/src/stream.rs),
//!   its plan and tile order, its launches on this engine's checkpoint, and its trace summed up.

mod backend;
mod fault;
mod graph;
mod launch;
mod prefill;
mod score;
mod stream;
mod stream_decode;
pub mod stream_plan;
mod stream_step;
pub mod stream_trace;
mod upload;

pub use graph::SplitCheck;
pub use launch::{LaunchOutcome, LaunchSpec};
pub use score::SCORE_ROWS;
pub use stream_decode::MAX_STEPS_PER_LAUNCH;
pub use stream_step::{StreamRun, StreamStep, STREAM_KERNEL};

use crate::backend::Backend;
use crate::gpu::{Gpu, HostRing};
use crate::model::Weights;
use anyhow::{ensure, Context, Result};
use cust::memory::{CopyDestination, DeviceBuffer, DeviceCopy};
use half::bf16;
use std::sync::Arc;

/// The structures shared with the kernel: the kernel's own source file, compiled here too.
#[path = "../../../kernel/src/abi.rs"]
pub mod abi;
#[path = "../../../kernel/src/schedule.rs"]
pub mod schedule;
use abi::*;

// SAFETY: plain `#[repr(C)]` data of integers and floats, valid for any bit pattern.
unsafe impl DeviceCopy for LayerPtrs {}
unsafe impl DeviceCopy for LmPartial {}
unsafe impl DeviceCopy for DecodeState {}
unsafe impl DeviceCopy for DecodeParams {}
unsafe impl DeviceCopy for AttentionTestParams {}
unsafe impl DeviceCopy for LmHeadTestParams {}
unsafe impl DeviceCopy for PrefillAttentionParams {}
unsafe impl DeviceCopy for StreamParams {}
unsafe impl DeviceCopy for StreamBlockPlan {}

/// Most end-of-sequence ids one launch stops at: the length of `DecodeParams::eos`.
pub const MAX_EOS: usize = 4;
// Fails to compile if `DecodeParams::eos` changes length without MAX_EOS.
const _: fn(&DecodeParams) -> [u32; MAX_EOS] = |p| p.eos;

/// Positions per prefill chunk of `decode`, `perplexity` and `bench --prefill` (on the GPU) when
/// `--prefill-chunk` is not given. A chunk reads every weight once per layer, and its GEMMs
/// have more tiles (and fill the GPU better) the more rows it has, so one chunk per prompt is
/// fastest; 4096 rows of work buffers are still small beside the weights (about 160 MiB at
/// Qwen3-0.6B's shapes, the largest the q/k/v rows in f32, 64 MiB). A prompt of up to 4097
/// tokens is one chunk (all but its last token are prefilled).
pub const DEFAULT_PREFILL_CHUNK: usize = 4096;

/// The head sizes the kernel has a decode entry for (kernel/src/decode.rs).
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// The decode kernel's entry point for a head_dim of [`HEAD_DIMS`].
pub fn decode_kernel_name(head_dim: usize) -> String {
    format!("qwen3_decode_hd{head_dim}")
}

/// The split kernels' entry point (one phase per launch, for `bench --compare`).
pub fn phase_kernel_name(head_dim: usize) -> String {
    format!("qwen3_phase_hd{head_dim}")
}

/// What the kernel can run: checked before any upload so bad shapes fail with a message.
pub fn check_supported(c: &crate::model::Qwen3Config) -> Result<()> {
    ensure!(HEAD_DIMS.contains(&c.head_dim), "the GPU kernel supports head_dim {HEAD_DIMS:?}, not {}", c.head_dim);
    ensure!(
        c.num_attention_heads.is_multiple_of(c.num_key_value_heads),
        "num_attention_heads must be a multiple of num_key_value_heads"
    );
    ensure!(
        c.num_hidden_layers as u32 <= MAX_LAYERS,
        "the GPU kernel supports at most {MAX_LAYERS} layers, not {}",
        c.num_hidden_layers
    );
    let group = c.num_attention_heads / c.num_key_value_heads;
    ensure!(group as u32 <= MAX_GROUP, "the GPU kernel supports at most {MAX_GROUP} q heads per kv head, not {group}");
    for (name, v, max) in [
        ("hidden_size", c.hidden_size, MAX_HIDDEN),
        ("intermediate_size", c.intermediate_size, MAX_INTER),
        ("q width (heads x head_dim)", c.q_dim(), MAX_Q_DIM),
    ] {
        ensure!(v.is_multiple_of(8), "the GPU kernel needs {name} to be a multiple of 8 (16-byte rows), not {v}");
        // The layer GEMVs hold a warp's rows in registers, sized for Qwen3-0.6B.
        ensure!(v <= max as usize, "the GPU kernel supports {name} up to {max} (Qwen3-0.6B's), not {v}");
    }
    Ok(())
}

/// Device pointer of a buffer, as the kernel ABI wants it.
pub(crate) fn dptr<T: DeviceCopy>(b: &DeviceBuffer<T>) -> u64 {
    b.as_device_ptr().as_raw()
}

pub(crate) fn as_u16(v: &[bf16]) -> &[u16] {
    bytemuck::cast_slice(v)
}

/// A checkpoint on the GPU, ready to decode.
pub struct GpuEngine {
    // Device memory first: fields drop in order, and the context goes with `gpu`, last.
    /// The streaming step `decode` runs on where it can ([`GpuEngine::enable_stream_decode`]).
    stream: Option<std::cell::RefCell<StreamStep>>,
    // Owned only to keep the uploaded weights alive; the kernel reaches them by address.
    _weights: Vec<DeviceBuffer<u16>>,
    layer_table: DeviceBuffer<LayerPtrs>,
    /// The same table on the host: prefill launches a kernel per matrix and reads it here.
    layers: Vec<LayerPtrs>,
    /// Prefill's work buffers, sized by the largest chunk asked for so far (`prefill.rs`).
    prefill_buffers: Option<prefill::PrefillBuffers>,
    rope_cos: DeviceBuffer<f32>,
    rope_sin: DeviceBuffer<f32>,
    x: DeviceBuffer<f32>,
    qkv: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    mlp: DeviceBuffer<f32>,
    attn_partial: DeviceBuffer<f32>,
    attn_count: DeviceBuffer<u32>,
    lm_partial: DeviceBuffer<LmPartial>,
    /// Each block's 32 best logits (top-k / top-p sampling).
    lm_candidates: DeviceBuffer<u64>,
    /// The grid's weight histograms for top-p alone (zero between uses).
    lm_grid_hist: DeviceBuffer<u64>,
    logits: DeviceBuffer<f32>,
    lm_count: DeviceBuffer<u32>,
    barrier: DeviceBuffer<u32>,
    state: DeviceBuffer<DecodeState>,
    barrier_ns: DeviceBuffer<u64>,
    phase_cycles: DeviceBuffer<u32>,
    tokens: DeviceBuffer<u32>,
    kv_caches: Vec<DeviceBuffer<u16>>,
    ring: HostRing,
    embed: u64,
    final_norm: u64,
    lm_head: u64,
    pub config: crate::model::Qwen3Config,
    max_ctx: u32,
    grid: u32,
    smem: u32,
    eos: Vec<u32>,
    /// Test hook (`QWEN3_INJECT_FAULT_AT_STEP`): `decode` makes the kernel fault at this step.
    pub fault_step: Option<u32>,
    /// Positions per prefill chunk for `decode` and `score` (`--prefill-chunk`): with N > 0, a
    /// prompt's tokens before its last go through [`GpuEngine::prefill`] and the megakernel
    /// starts at the last, and a scored text goes through [`GpuEngine::score_prefill`]; 0 (what
    /// [`GpuEngine::new`] sets; the CLI's default is [`DEFAULT_PREFILL_CHUNK`]) feeds every
    /// position to the megakernel, one per step.
    pub prefill_chunk: usize,
    gpu: Gpu,
}

impl GpuEngine {
    /// End-of-sequence ids the kernel stops at (`decode` sets them per call). The kernel
    /// compares each token with up to [`MAX_EOS`] of them; a longer list is refused, since
    /// dropping some would let generation run past an end it was asked to stop at.
    pub fn set_eos(&mut self, eos: &[u32]) -> Result<()> {
        ensure!(
            eos.len() <= MAX_EOS,
            "the GPU kernel stops at up to {MAX_EOS} end-of-sequence ids, {} given ({eos:?})",
            eos.len()
        );
        self.eos = eos.to_vec();
        Ok(())
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    pub fn grid(&self) -> u32 {
        self.grid
    }
    pub fn threads(&self) -> u32 {
        DECODE_THREADS
    }
    /// Grid barriers in one full decode step: one per phase of the schedule (`schedule::phases_per_step`).
    pub fn barriers_per_step(&self) -> u32 {
        schedule::phases_per_step(self.config.num_hidden_layers as u32)
    }
    /// Bytes of weights one decode step reads (every matrix and norm once, one embedding row).
    pub fn weight_bytes_per_step(&self) -> u64 {
        let c = &self.config;
        let (h, i, q, kv, d) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let per_layer = h * (q + 2 * kv) + q * h + 2 * i * h + h * i + 2 * h + 2 * d;
        (2 * (c.num_hidden_layers * per_layer + c.vocab_size * h + h + h)) as u64
    }
    /// Bytes of KV cache one step at position `pos` reads (keys and values of 0..=pos).
    pub fn kv_bytes_per_step(&self, pos: u32) -> u64 {
        let c = &self.config;
        (2 * 2 * c.num_hidden_layers * c.kv_dim() * (pos as usize + 1)) as u64
    }

    /// Per block, the FLAG_PROFILE_PHASES record of the last launch that asked for it:
    /// `PROFILE_SLOTS` u32 each (work and wait cycles of the six phases).
    pub fn phase_cycles(&self) -> Result<Vec<u32>> {
        let mut v = vec![0u32; self.phase_cycles.len()];
        self.phase_cycles.copy_to(&mut v[..]).context("reading phase timers")?;
        Ok(v)
    }

    /// Per-block nanoseconds spent waiting in barriers during the last profiled launch.
    pub fn barrier_wait_ns(&self) -> Result<Vec<u64>> {
        let mut v = vec![0u64; self.grid as usize];
        self.barrier_ns.copy_to(&mut v[..]).context("reading barrier timers")?;
        Ok(v)
    }
}

/// Opens the GPU backend for the CLI.
/// `QWEN3_INJECT_FAULT_AT_STEP=N` (tests only) makes generation fault at decode step N
/// (0-based), to check that device errors are reported with their name and step.
/// `prefill_chunk` sets [`GpuEngine::prefill_chunk`]: `Some(n)` as given (a model whose
/// shapes prefill cannot take is refused for n > 0), `None` [`DEFAULT_PREFILL_CHUNK`] where
/// the model's shapes allow prefill and scoring through it, else 0 with a note on stderr.
/// With `stream_decode`, `decode` runs on the streaming step where the GPU, the model and the
/// sampling allow it ([`GpuEngine::enable_stream_decode`]; where they do not, a note says why).
pub fn open_gpu_backend(
    weights: Arc<Weights>,
    max_context: usize,
    prefill_chunk: Option<usize>,
    stream_decode: bool,
) -> Result<Box<dyn Backend>> {
    let mut engine = GpuEngine::new(&weights, max_context)?;
    if stream_decode {
        if let Err(e) = engine.enable_stream_decode(&weights) {
            eprintln!("note: decoding with the megakernel: {e:#}");
        }
    }
    // The model's shapes (and a chunk asked for) against prefill's kernels, before any prompt.
    let chunk = prefill_chunk.filter(|&n| n > 0).unwrap_or(1);
    let shapes = engine.check_prefill(&[], 0, chunk).and_then(|()| engine.check_score_prefill());
    engine.prefill_chunk = match (prefill_chunk, shapes) {
        (Some(n), Err(e)) if n > 0 => return Err(e.context(format!("--prefill-chunk {n}"))),
        (Some(n), _) => n,
        (None, Ok(())) => DEFAULT_PREFILL_CHUNK,
        (None, Err(e)) => {
            eprintln!("note: prompts go through the megakernel one position per step, not prefill: {e:#}");
            0
        }
    };
    if let Ok(v) = std::env::var("QWEN3_INJECT_FAULT_AT_STEP") {
        engine.fault_step = Some(v.parse().context("QWEN3_INJECT_FAULT_AT_STEP must be a step number")?);
    }
    Ok(Box::new(engine))
}
