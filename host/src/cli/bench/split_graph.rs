//! `bench --compare`: the megakernel against the same decode step as split kernels replayed
//! as one CUDA graph per token (`GpuEngine::split_step_graph`), checked to give identical
//! logits before anything is timed.

use anyhow::Result;
use host::engine::GpuEngine;
use host::stats::median;
use std::time::Instant;

/// One position's comparison.
pub(super) struct Comparison {
    /// Median us per token of the split kernels replayed as a graph (one replay per token).
    pub(super) split_us: f64,
    pub(super) split_us_min: f64,
    /// Largest |logit difference| between the two variants for the same step (0 = identical),
    /// and whether their arg-max tokens agree.
    pub(super) max_logit_diff: f32,
    pub(super) same_token: bool,
}

/// Runs one step at `position` both ways and compares the logits, then times `reps` batches
/// of `steps` graph replays.
pub(super) fn compare_at(engine: &mut GpuEngine, position: u32, steps: u32, reps: u32) -> Result<Comparison> {
    let token = 1u32;
    let check = engine.check_split_step(position, token)?;

    // Timed as a decoder would run it: one replay per token, no logits written.
    let graph = engine.split_step_graph(position, token, 0)?;
    graph.launch(engine.gpu().stream())?; // warm-up
    engine.gpu().synchronize()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        for _ in 0..steps {
            graph.launch(engine.gpu().stream())?;
        }
        engine.gpu().synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e6 / steps as f64);
    }
    let split_us_min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Comparison {
        split_us: median(&mut times),
        split_us_min,
        max_logit_diff: check.max_logit_diff,
        same_token: check.same_token,
    })
}

/// Bytes of activations one decode step moves between phases through the L2 (written once,
/// read by the blocks that need them), the same in both variants: every block reads the whole
/// input vector of each GEMV phase (x twice per layer, the attention output, the MLP
/// activation), plus the writes, the attention's q/k/v reads and the LM head's input. The split
/// variant also re-reads each block's residual rows, which the megakernel keeps in shared
/// memory: `extra_split`.
pub(super) fn intermediate_bytes(engine: &GpuEngine) -> (u64, u64) {
    let c = &engine.config;
    let grid = engine.grid() as u64;
    let (h, i, q, kv, d) =
        (c.hidden_size as u64, c.intermediate_size as u64, c.q_dim() as u64, c.kv_dim() as u64, c.head_dim as u64);
    let group = (c.num_attention_heads / c.num_key_value_heads) as u64;
    let per_layer_reads = grid * (2 * h + q + i) + grid * (group + 2) * d;
    let per_layer_writes = (q + 2 * kv) + q + h + i + h;
    let layers = c.num_hidden_layers as u64;
    let total = 4 * (layers * (per_layer_reads + per_layer_writes) + grid * h);
    let extra_split = 4 * layers * 2 * h;
    (total, extra_split)
}
