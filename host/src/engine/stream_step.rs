//! The streaming step (`qwen3_stream_step`, kernel/src/stream.rs) on an engine's checkpoint:
//! the same weights, KV cache and RoPE tables the megakernel reads, plus o and down in the
//! step's tile order, its plan, and its hand-off buffers. A launch runs up to
//! [`StreamStep::MAX_STEPS`] steps from a position, prompt tokens first, and chooses each
//! token greedily or by sampling ([`StreamStep::set_sampling`]: temperature alone, or top-k up
//! to 32 with any top-p: the megakernel's draws, from the same noise of seed and position).

use super::abi::*;
use super::stream_plan::{
    block_plans, check_stream_shape, down_tiles, o_tiles, parse_copies_in_flight, parse_poll_gap, MlpSplit,
};
use super::{dptr, GpuEngine};
use crate::backend::{check_ids, SamplingParams};
use crate::model::Weights;
use anyhow::{ensure, Context, Result};
use cust::memory::{CopyDestination, DeviceBuffer};
use std::ffi::c_void;

pub const STREAM_KERNEL: &str = "qwen3_stream_step";

/// What one launch produced: `tokens[s]` was fed at step `s` (the prompt, then the choices),
/// and `tokens[n_steps]` is the last step's choice; the last step's logits if asked for.
#[derive(Clone, Debug)]
pub struct StreamRun {
    pub tokens: Vec<u32>,
    pub logits: Option<Vec<f32>>,
}

/// Holds no borrow of its engine (so the engine can still run the megakernel between
/// launches); each launch takes the engine it was made from.
pub struct StreamStep {
    /// The engine's layer table, to refuse another engine's launches.
    layers: u64,
    _o_tiles: DeviceBuffer<u16>,
    _down_tiles: DeviceBuffer<u16>,
    _plan: DeviceBuffer<StreamBlockPlan>,
    sums: DeviceBuffer<u64>,
    best: DeviceBuffer<u64>,
    _candidates: DeviceBuffer<u64>,
    arrivals: DeviceBuffer<u32>,
    tokens: DeviceBuffer<u32>,
    logits: DeviceBuffer<f32>,
    probe: DeviceBuffer<f32>,
    trace: DeviceBuffer<u64>,
    params: StreamParams,
    /// False only under QWEN3_STREAM_PLAIN_LAUNCH=1, for ncu (see `Kernel::launch_clusters`).
    cooperative: bool,
}

impl GpuEngine {
    /// The streaming step on this engine's checkpoint (`w` must be the one it was built from:
    /// o and down are uploaded again in the step's tile order).
    pub fn stream_step(&self, w: &Weights) -> Result<StreamStep> {
        let c = &self.config;
        check_stream_shape(c)?;
        ensure!(
            w.config.num_hidden_layers == c.num_hidden_layers && w.config.vocab_size == c.vocab_size,
            "the streaming step was given other weights than the engine's"
        );
        let (major, minor) = self.gpu.compute_capability();
        ensure!(
            major >= 9,
            "the streaming step needs sm_90 or newer (thread-block clusters, bulk copies); {} is sm_{major}{minor}",
            self.gpu.name()
        );
        let kernel = self
            .gpu
            .kernel(STREAM_KERNEL)
            .context("the PTX was built without the streaming step (QWEN3_SM below sm_90?)")?;
        kernel.set_max_dynamic_smem(STREAM_SMEM_BYTES)?;
        let clusters = kernel.max_active_clusters(STREAM_CLUSTER, STREAM_THREADS, STREAM_SMEM_BYTES)?;
        ensure!(
            clusters >= STREAM_CLUSTERS,
            "the streaming step needs {STREAM_CLUSTERS} clusters of {STREAM_CLUSTER} blocks resident at once; {} holds {clusters}",
            self.gpu.name()
        );
        let mut o = Vec::new();
        let mut down = Vec::new();
        for l in &w.layers {
            o.extend(o_tiles(&l.o_proj));
            down.extend(down_tiles(&l.down_proj));
        }
        let gpu = &self.gpu;
        let o_tiles = gpu.upload(&o, "o_proj in the streaming step's tiles")?;
        let down_tiles = gpu.upload(&down, "down_proj in the streaming step's tiles")?;
        // Experiments: QWEN3_STREAM_SPLIT=even splits the MLP by bytes alone, heads:N gives each
        // block with attention N units.
        let split = match std::env::var("QWEN3_STREAM_SPLIT") {
            Err(_) => MlpSplit::RingFirst,
            Ok(v) => MlpSplit::parse(&v).with_context(|| {
                format!("QWEN3_STREAM_SPLIT={v}: expected even, ring or heads:N with N units the blocks can take")
            })?,
        };
        let plan = gpu.upload(&block_plans(c.vocab_size, split), "streaming plan")?;
        // QWEN3_STREAM_IN_FLIGHT=N: each loader's bulk copies on their way at once.
        let copies_in_flight = match std::env::var("QWEN3_STREAM_IN_FLIGHT") {
            Err(_) => STREAM_COPIES_IN_FLIGHT,
            Ok(v) => parse_copies_in_flight(&v).with_context(|| {
                format!("QWEN3_STREAM_IN_FLIGHT={v}: expected 1 to {STREAM_RING_PAGES} bulk copies")
            })?,
        };
        let n_layers = c.num_hidden_layers as u32;
        let sums = gpu.alloc::<u64>(2 * stream_sum_words(n_layers) as usize, "streaming hand-off sums")?;
        let best = gpu.alloc::<u64>(StreamStep::MAX_STEPS, "streaming best keys")?;
        let candidates =
            gpu.alloc::<u64>((2 * STREAM_GRID * STREAM_MAX_TOP_K) as usize, "streaming top-k candidates")?;
        let arrivals = gpu.alloc::<u32>(1, "streaming arrivals")?;
        let tokens = gpu.alloc::<u32>(StreamStep::MAX_STEPS + 1, "streaming tokens")?;
        let logits = gpu.alloc::<f32>(c.vocab_size, "streaming logits")?;
        let probe = gpu.alloc::<f32>(STREAM_PROBE_WORDS as usize, "streaming probe")?;
        let trace = gpu.alloc::<u64>((STREAM_GRID * STREAM_TRACE_MARKS) as usize, "streaming trace")?;
        let params = StreamParams {
            layers: dptr(&self.layer_table),
            o_tiles: dptr(&o_tiles),
            down_tiles: dptr(&down_tiles),
            plan: dptr(&plan),
            embed: self.embed,
            final_norm: self.final_norm,
            lm_head: self.lm_head,
            rope_cos: dptr(&self.rope_cos),
            rope_sin: dptr(&self.rope_sin),
            sums: dptr(&sums),
            best: dptr(&best),
            candidates: dptr(&candidates),
            arrivals: dptr(&arrivals),
            tokens: dptr(&tokens),
            logits_out: dptr(&logits),
            n_layers,
            vocab: c.vocab_size as u32,
            max_ctx: self.max_ctx,
            eps: c.rms_norm_eps,
            top_p: 1.0, // greedy until `set_sampling`
            // Under compute-sanitizer (which sets the tests' watchdog) a poll takes far longer.
            spin_limit: if std::env::var_os("QWEN3_WATCHDOG_SECS").is_some() { u32::MAX } else { 1 << 24 },
            copies_in_flight,
            // Experiments: QWEN3_STREAM_POLL_GAP=N idles N SM cycles between polls of a hand-off.
            poll_gap_cycles: match std::env::var("QWEN3_STREAM_POLL_GAP") {
                Err(_) => STREAM_POLL_GAP_CYCLES,
                Ok(v) => parse_poll_gap(&v).with_context(|| {
                    format!("QWEN3_STREAM_POLL_GAP={v}: expected SM cycles, 0 to {STREAM_MAX_POLL_GAP}")
                })?,
            },
            // Experiments: QWEN3_STREAM_QUIET=0 lets every loader stream through the hand-offs.
            flags: if std::env::var_os("QWEN3_STREAM_QUIET").is_some_and(|v| v == "0") {
                0
            } else {
                STREAM_FLAG_QUIET_HANDOFF
            },
            ..StreamParams::default()
        };
        Ok(StreamStep {
            layers: params.layers,
            _o_tiles: o_tiles,
            _down_tiles: down_tiles,
            _plan: plan,
            sums,
            best,
            _candidates: candidates,
            arrivals,
            tokens,
            logits,
            probe,
            trace,
            params,
            // Experiments: ncu cannot replay a cooperative cluster launch; the grid is resident
            // by the cluster check above either way.
            cooperative: std::env::var_os("QWEN3_STREAM_PLAIN_LAUNCH").is_none_or(|v| v != "1"),
        })
    }
}

impl StreamStep {
    /// Most steps one launch runs (the best-key and token buffers).
    pub const MAX_STEPS: usize = 256;

    /// Whether the kernel draws as `s` asks: greedy, temperature alone (top-k 0, top-p 1), or
    /// top-k 1 ..= 32 with any top-p. Top-p alone (a nucleus of any width) and top-k above 32
    /// are the megakernel's.
    pub fn supports(s: &SamplingParams) -> bool {
        s.is_greedy() || (s.top_k <= STREAM_MAX_TOP_K && (s.top_k > 0 || s.top_p >= 1.0))
    }

    /// How the following launches choose their tokens past the prompt (greedy until set).
    /// Refuses what the kernel cannot draw ([`Self::supports`]), leaving the setting as it was.
    pub fn set_sampling(&mut self, s: &SamplingParams) -> Result<()> {
        ensure!(
            Self::supports(s),
            "the streaming step samples with temperature alone or with top-k 1 to {STREAM_MAX_TOP_K} (and any top-p); \
             temperature {}, top-k {}, top-p {} needs the megakernel",
            s.temperature,
            s.top_k,
            s.top_p
        );
        ensure!(
            s.temperature.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0,
            "sampling parameters out of range: {s:?}"
        );
        let greedy = s.is_greedy();
        self.params.temperature = if greedy { 0.0 } else { s.temperature };
        self.params.top_k = if greedy { 0 } else { s.top_k };
        self.params.top_p = if greedy { 1.0 } else { s.top_p };
        self.params.seed_lo = s.seed as u32;
        self.params.seed_hi = (s.seed >> 32) as u32;
        Ok(())
    }

    /// Enqueues one launch: `prompt` fed at positions `start_pos ..`, then each step's choice,
    /// `n_steps` steps in all. Refuses what it cannot run, before touching any buffer.
    pub fn launch(
        &mut self,
        e: &GpuEngine,
        start_pos: usize,
        prompt: &[u32],
        n_steps: usize,
        want_logits: bool,
    ) -> Result<()> {
        ensure!(dptr(&e.layer_table) == self.layers, "a streaming step launched on another engine than its own");
        ensure!(
            (1..=Self::MAX_STEPS).contains(&n_steps),
            "a streaming launch runs 1 to {} steps, not {n_steps}",
            Self::MAX_STEPS
        );
        ensure!(
            !prompt.is_empty() && prompt.len() <= n_steps,
            "a streaming launch takes 1 to n_steps ({n_steps}) given tokens, not {}",
            prompt.len()
        );
        ensure!(
            start_pos + n_steps <= e.max_ctx as usize,
            "positions {start_pos}..{} are beyond the KV cache of {} positions",
            start_pos + n_steps,
            e.max_ctx
        );
        check_ids("the streaming step's", prompt, e.config.vocab_size)?;
        self.tokens.index(..prompt.len()).copy_from(prompt).context("uploading tokens")?;
        let gpu = e.gpu();
        gpu.zero_async(&self.sums)?;
        gpu.zero_async(&self.best)?;
        gpu.zero_async(&self.arrivals)?;
        let mut params = StreamParams {
            start_pos: start_pos as u32,
            prompt_len: prompt.len() as u32,
            n_steps: n_steps as u32,
            flags: if want_logits { STREAM_FLAG_LOGITS } else { 0 } | self.params.flags,
            ..self.params
        };
        let kernel = gpu.kernel(STREAM_KERNEL)?;
        let mut args = [&mut params as *mut StreamParams as *mut c_void];
        // SAFETY: one argument, a StreamParams by value, as qwen3_stream_step takes; every
        // pointer in it is a live allocation of this step or its engine, sized for the shape
        // `check_stream_shape` accepted and for these positions.
        unsafe {
            kernel.launch_clusters(
                gpu.stream(),
                STREAM_GRID,
                STREAM_CLUSTER,
                STREAM_THREADS,
                STREAM_SMEM_BYTES,
                self.cooperative,
                &mut args,
            )
        }
        .context("launching qwen3_stream_step")
    }

    /// One step at `pos` of `token` that also records layer 0's pieces (`abi::STREAM_PROBE_*`),
    /// for tests that check them one by one.
    pub fn probe_layer0(&mut self, e: &GpuEngine, pos: usize, token: u32) -> Result<Vec<f32>> {
        self.params.probe = dptr(&self.probe);
        let run = self.run(e, pos, &[token], 1, false);
        self.params.probe = 0;
        run?;
        e.gpu().download(&self.probe)
    }

    /// One launch of `n_steps` from `start_pos` that records the trace of its last step: per
    /// block, SM cycles at each `StreamMark` (abi.rs), `STREAM_TRACE_MARKS` a block.
    pub fn trace(&mut self, e: &GpuEngine, start_pos: usize, n_steps: usize) -> Result<Vec<u64>> {
        e.gpu().zero_async(&self.trace)?;
        self.params.trace = dptr(&self.trace);
        let run = self.run(e, start_pos, &[1], n_steps, false);
        self.params.trace = 0;
        run?;
        e.gpu().download(&self.trace)
    }

    /// One launch, waited for: its tokens and, if asked, the last step's logits.
    pub fn run(
        &mut self,
        e: &GpuEngine,
        start_pos: usize,
        prompt: &[u32],
        n_steps: usize,
        want_logits: bool,
    ) -> Result<StreamRun> {
        self.launch(e, start_pos, prompt, n_steps, want_logits)?;
        let gpu = e.gpu();
        gpu.synchronize().context("running qwen3_stream_step")?;
        let tokens = gpu.download(&self.tokens.index(..n_steps + 1))?;
        let logits = if want_logits { Some(gpu.download(&self.logits)?) } else { None };
        Ok(StreamRun { tokens, logits })
    }
}
