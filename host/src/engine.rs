//! The GPU decode engine: uploads a checkpoint, owns the KV cache and work buffers, and runs
//! the `qwen3_decode_hd*` megakernel (kernel/src/decode.rs) with cooperative launches.
//!
//! One launch runs many decode steps: the prompt is fed one position per step, then each
//! chosen token feeds the next step on the device. Generated tokens arrive through a pinned
//! host-mapped ring while the kernel is still running, which is how `decode` streams.

use crate::generate::{check_ids, check_max_context, check_request, Backend, Generation, SamplingParams, StopReason};
use crate::gpu::{CudaGraph, Gpu, HostRing};
use crate::model::{ops, Weights};
use anyhow::{bail, ensure, Context, Result};
use cust::memory::{CopyDestination, DeviceBuffer, DeviceCopy};
use half::bf16;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The structures shared with the kernel: the kernel's own source file, compiled here too.
#[path = "../../kernel/src/abi.rs"]
pub mod abi;
use abi::*;

// SAFETY: plain `#[repr(C)]` data of integers and floats, valid for any bit pattern.
unsafe impl DeviceCopy for LayerPtrs {}
unsafe impl DeviceCopy for LmPartial {}
unsafe impl DeviceCopy for DecodeState {}
unsafe impl DeviceCopy for DecodeParams {}
unsafe impl DeviceCopy for AttentionTestParams {}
unsafe impl DeviceCopy for LmHeadTestParams {}

/// Most end-of-sequence ids one launch stops at: the length of `DecodeParams::eos`.
pub const MAX_EOS: usize = 4;
// Fails to compile if `DecodeParams::eos` changes length without MAX_EOS.
const _: fn(&DecodeParams) -> [u32; MAX_EOS] = |p| p.eos;

/// The decode kernel's entry point for a head_dim (one per supported size: see decode.rs).
pub fn decode_kernel_name(head_dim: usize) -> String {
    format!("qwen3_decode_hd{head_dim}")
}

/// The split kernels' entry point (one phase per launch, for `bench --compare`).
pub fn phase_kernel_name(head_dim: usize) -> String {
    format!("qwen3_phase_hd{head_dim}")
}

/// What the kernel can run: checked before any upload so bad shapes fail with a message.
pub fn check_supported(c: &crate::model::Qwen3Config) -> Result<()> {
    ensure!(matches!(c.head_dim, 32 | 64 | 128), "the GPU kernel supports head_dim 32, 64 or 128, not {}", c.head_dim);
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
fn dptr<T: DeviceCopy>(b: &DeviceBuffer<T>) -> u64 {
    b.as_device_ptr().as_raw()
}

fn as_u16(v: &[bf16]) -> &[u16] {
    bytemuck::cast_slice(v)
}

/// Result of one launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchOutcome {
    pub steps_done: u32,
    pub stop_reason: u32,
    /// Wall time from launch to completion.
    pub elapsed: Duration,
}

/// One launch's settings (see `GpuEngine::launch`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchSpec {
    pub start_pos: u32,
    pub prompt_len: u32,
    pub n_steps: u32,
    pub flags: u32,
    pub sampling: Option<SamplingParams>,
    pub logits_out: u64,
    pub nll_out: u64,
    /// Diagnostics (abi::SKIP_*): stages to leave out; outputs are then meaningless.
    pub debug_skip: u32,
    /// Test hook: make the kernel fault when it reaches this step.
    pub fault_step: Option<u32>,
}

/// A checkpoint on the GPU, ready to decode.
pub struct GpuEngine {
    // Device memory first: fields drop in order, and the context goes with `gpu`, last.
    // Owned only to keep the uploaded weights alive; the kernel reaches them by address.
    _weights: Vec<DeviceBuffer<u16>>,
    layer_table: DeviceBuffer<LayerPtrs>,
    rope_cos: DeviceBuffer<f32>,
    rope_sin: DeviceBuffer<f32>,
    x: DeviceBuffer<f32>,
    qkv: DeviceBuffer<f32>,
    attn: DeviceBuffer<f32>,
    mlp: DeviceBuffer<f32>,
    attn_partial: DeviceBuffer<f32>,
    attn_count: DeviceBuffer<u32>,
    lm_partial: DeviceBuffer<LmPartial>,
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
    /// Test hook (`QWEN3_INJECT_FAULT_AT_STEP`): `generate` makes the kernel fault at this step.
    pub fault_step: Option<u32>,
    gpu: Gpu,
}

impl GpuEngine {
    /// Uploads `weights` and allocates a KV cache of `max_context` positions on GPU 0.
    pub fn new(weights: &Weights, max_context: usize) -> Result<GpuEngine> {
        Self::with_gpu(Gpu::new(0)?, weights, max_context)
    }

    pub fn with_gpu(gpu: Gpu, w: &Weights, max_context: usize) -> Result<GpuEngine> {
        let c = w.config.clone();
        check_supported(&c)?;
        check_max_context(max_context, 1, &c)?;
        let (hidden, inter, head_dim) = (c.hidden_size as u32, c.intermediate_size as u32, c.head_dim as u32);
        let (q_dim, kv_dim) = (c.q_dim() as u32, c.kv_dim() as u32);
        let group = (c.num_attention_heads / c.num_key_value_heads) as u32;
        let base_smem = decode_smem_bytes(hidden, q_dim, inter, group, head_dim).next_multiple_of(16);
        let smem = base_smem;

        let kernel = gpu.kernel(&decode_kernel_name(c.head_dim))?;
        if smem > 48 * 1024 {
            kernel.set_max_dynamic_smem(smem)?;
        }
        let grid = kernel.cooperative_grid(DECODE_THREADS, smem, 1)?;
        ensure!(
            hidden.div_ceil(grid) <= MAX_OWN_ROWS,
            "hidden size {hidden} over {grid} blocks gives each more than {MAX_OWN_ROWS} rows of the residual stream"
        );
        ensure!(
            grid >= c.num_key_value_heads as u32,
            "the GPU has too few SMs ({grid}) for {} kv heads",
            c.num_key_value_heads
        );

        // Weights, packed the way the kernel reads them: q, k, v rows stacked into one matrix.
        let mut weights = Vec::new();
        let mut up = |data: &[u16], what: &str| -> Result<u64> {
            let b = gpu.upload(data, what)?;
            let p = dptr(&b);
            weights.push(b);
            Ok(p)
        };
        let embed = up(as_u16(&w.embed_tokens), "embed_tokens")?;
        let final_norm = up(as_u16(&w.norm), "norm")?;
        let lm_head = match &w.lm_head {
            Some(m) => up(as_u16(m), "lm_head")?,
            None => embed,
        };
        let max_ctx = max_context as u32;
        let mut kv_caches = Vec::new();
        let mut table = Vec::new();
        for (i, l) in w.layers.iter().enumerate() {
            let mut qkv = Vec::with_capacity(l.q_proj.len() + l.k_proj.len() + l.v_proj.len());
            qkv.extend_from_slice(as_u16(&l.q_proj));
            qkv.extend_from_slice(as_u16(&l.k_proj));
            qkv.extend_from_slice(as_u16(&l.v_proj));
            let cache_len = c.num_key_value_heads * max_context * c.head_dim;
            let k_cache = gpu.alloc::<u16>(cache_len, &format!("layer {i} K cache"))?;
            let v_cache = gpu.alloc::<u16>(cache_len, &format!("layer {i} V cache"))?;
            table.push(LayerPtrs {
                input_norm: up(as_u16(&l.input_layernorm), "input_layernorm")?,
                wqkv: up(&qkv, "qkv_proj")?,
                q_norm: up(as_u16(&l.q_norm), "q_norm")?,
                k_norm: up(as_u16(&l.k_norm), "k_norm")?,
                wo: up(as_u16(&l.o_proj), "o_proj")?,
                post_norm: up(as_u16(&l.post_attention_layernorm), "post_attention_layernorm")?,
                w_gate: up(as_u16(&l.gate_proj), "gate_proj")?,
                w_up: up(as_u16(&l.up_proj), "up_proj")?,
                w_down: up(as_u16(&l.down_proj), "down_proj")?,
                k_cache: dptr(&k_cache),
                v_cache: dptr(&v_cache),
            });
            kv_caches.push(k_cache);
            kv_caches.push(v_cache);
        }
        let layer_table = gpu.upload(&table, "layer table")?;
        let (cos, sin) = ops::rope_table(c.rope_theta, c.head_dim, max_context);
        let rope_cos = gpu.upload(&cos, "RoPE cos table")?;
        let rope_sin = gpu.upload(&sin, "RoPE sin table")?;
        let n_heads = c.num_attention_heads;
        let engine = GpuEngine {
            x: gpu.alloc(c.hidden_size, "residual")?,
            qkv: gpu.alloc((q_dim + 2 * kv_dim) as usize, "qkv")?,
            attn: gpu.alloc(q_dim as usize, "attention output")?,
            mlp: gpu.alloc(c.intermediate_size, "mlp activations")?,
            attn_partial: gpu.alloc(n_heads * MAX_SPLITS as usize * (c.head_dim + 2), "attention partials")?,
            attn_count: gpu.alloc(c.num_key_value_heads, "attention counters")?,
            lm_partial: gpu.alloc(grid as usize, "LM-head partials")?,
            logits: gpu.alloc(c.vocab_size, "logits")?,
            lm_count: gpu.alloc(1, "LM-head counter")?,
            barrier: gpu.alloc(1, "grid barrier")?,
            state: gpu.alloc(1, "decode state")?,
            barrier_ns: gpu.alloc(grid as usize, "barrier timers")?,
            phase_cycles: gpu.alloc(grid as usize * PROFILE_SLOTS, "phase timers")?,
            tokens: gpu.alloc(max_context + 1, "tokens")?,
            ring: gpu.host_ring(RING_TOKENS + max_context + 1)?,
            _weights: weights,
            layer_table,
            rope_cos,
            rope_sin,
            kv_caches,
            embed,
            final_norm,
            lm_head,
            eos: c.eos_token_ids.clone(),
            fault_step: None,
            config: c,
            max_ctx,
            grid,
            smem,
            gpu,
        };
        Ok(engine)
    }

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
    pub fn shared_bytes(&self) -> u32 {
        self.smem
    }
    pub fn max_ctx(&self) -> u32 {
        self.max_ctx
    }
    /// Grid barriers in one full decode step (five per layer plus the LM head's).
    pub fn barriers_per_step(&self) -> u32 {
        5 * self.config.num_hidden_layers as u32 + 1
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

    /// Fills every KV cache with random bf16 values (benchmarks: positions before the one
    /// timed hold realistic data, never zeros).
    pub fn randomize_kv_cache(&mut self, seed: u64) -> Result<()> {
        let mut s = seed | 1;
        for cache in &mut self.kv_caches {
            let v: Vec<u16> = (0..cache.len())
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0).to_bits()
                })
                .collect();
            cache.copy_from(&v[..]).context("uploading random KV cache")?;
        }
        Ok(())
    }

    /// Runs one launch. `tokens[0]` is fed at `start_pos`; the first `prompt_len` tokens are
    /// given, the rest chosen on the device. `on_token` (if any) sees each generated token as
    /// it is published; returning false asks the kernel to stop after the current token.
    pub fn launch(
        &mut self,
        spec: &LaunchSpec,
        tokens: &[u32],
        on_token: Option<&mut dyn FnMut(u32) -> bool>,
    ) -> Result<(LaunchOutcome, Vec<u32>)> {
        ensure!(spec.n_steps >= 1 && spec.prompt_len >= 1, "a launch needs at least one step and one given token");
        ensure!(tokens.len() >= spec.prompt_len as usize, "fewer tokens than prompt_len");
        ensure!(
            spec.start_pos + spec.n_steps <= self.max_ctx,
            "positions {}..{} are beyond the KV cache of {} positions",
            spec.start_pos,
            spec.start_pos + spec.n_steps,
            self.max_ctx
        );
        check_ids("launch's", tokens, self.config.vocab_size)?;
        let n_given = (spec.prompt_len as usize).min(tokens.len());
        self.tokens.index(..n_given).copy_from(&tokens[..n_given]).context("uploading tokens")?;
        self.state.copy_from(&[DecodeState::default()]).context("resetting decode state")?;
        self.ring.clear();
        let mut params = self.params(spec)?;
        let kernel = self.gpu.kernel(&decode_kernel_name(self.config.head_dim))?;
        let started = Instant::now();
        let mut args = [&mut params as *mut DecodeParams as *mut c_void];
        // SAFETY: one argument, a DecodeParams by value, as qwen3_decode takes; every pointer
        // in it is a live allocation of this engine sized for these dimensions.
        unsafe { kernel.launch_cooperative(self.gpu.stream(), self.grid, DECODE_THREADS, self.smem, &mut args) }
            .context("launching qwen3_decode")?;
        self.stream_tokens(spec, started, on_token)
    }

    /// Captures one greedy decode step at `pos` that feeds `token` as a CUDA graph of the split
    /// kernels (`qwen3_phase_hd*`): one launch per phase, 5 per layer plus the LM head, the
    /// kernel boundaries in place of the megakernel's grid barriers. Each replay recomputes
    /// the same step; `logits_out` (device f32[vocab], or 0) receives its logits.
    pub fn split_step_graph(&mut self, pos: u32, token: u32, logits_out: u64) -> Result<CudaGraph> {
        ensure!(pos < self.max_ctx, "position {pos} is beyond the KV cache of {} positions", self.max_ctx);
        check_ids("graph's", &[token], self.config.vocab_size)?;
        self.tokens.index(..1).copy_from(&[token]).context("uploading tokens")?;
        self.state.copy_from(&[DecodeState::default()]).context("resetting decode state")?;
        let spec = LaunchSpec {
            start_pos: pos,
            prompt_len: 1,
            n_steps: 1,
            flags: if logits_out != 0 { FLAG_WRITE_LOGITS } else { 0 },
            logits_out,
            ..Default::default()
        };
        let mut params = DecodeParams { ring: 0, ..self.params(&spec)? };
        let kernel = self.gpu.kernel(&phase_kernel_name(self.config.head_dim))?;
        if self.smem > 48 * 1024 {
            kernel.set_max_dynamic_smem(self.smem)?;
        }
        let ops = 5 * self.config.num_hidden_layers as u32 + 1;
        self.gpu.synchronize()?;
        self.gpu.begin_capture()?;
        let mut captured = Ok(());
        for mut op in 0..ops {
            let mut args = [&mut params as *mut DecodeParams as *mut c_void, &mut op as *mut u32 as *mut c_void];
            // SAFETY: qwen3_phase takes (DecodeParams, u32) by value; every pointer in the
            // params is a live allocation of this engine sized for these dimensions.
            captured = unsafe { kernel.launch(self.gpu.stream(), self.grid, DECODE_THREADS, self.smem, &mut args) };
            if captured.is_err() {
                break;
            }
        }
        let graph = self.gpu.end_capture();
        captured.context("capturing the split kernels")?;
        graph
    }

    /// The kernel parameters for one launch described by `spec`.
    fn params(&self, spec: &LaunchSpec) -> Result<DecodeParams> {
        let s = spec.sampling.unwrap_or(SamplingParams::GREEDY);
        let top_k = if s.temperature > 0.0 && s.top_k == 0 && s.top_p < 1.0 { MAX_TOP_K } else { s.top_k };
        ensure!(top_k <= MAX_TOP_K, "the GPU sampler supports top-k up to {MAX_TOP_K}, not {top_k}");
        let c = &self.config;
        let mut eos = [0u32; MAX_EOS];
        eos[..self.eos.len()].copy_from_slice(&self.eos);
        Ok(DecodeParams {
            layers: dptr(&self.layer_table),
            embed: self.embed,
            final_norm: self.final_norm,
            lm_head: self.lm_head,
            rope_cos: dptr(&self.rope_cos),
            rope_sin: dptr(&self.rope_sin),
            x: dptr(&self.x),
            qkv: dptr(&self.qkv),
            attn: dptr(&self.attn),
            mlp: dptr(&self.mlp),
            attn_partial: dptr(&self.attn_partial),
            attn_count: dptr(&self.attn_count),
            lm_partial: dptr(&self.lm_partial),
            logits: dptr(&self.logits),
            lm_count: dptr(&self.lm_count),
            barrier: dptr(&self.barrier),
            state: dptr(&self.state),
            barrier_ns: dptr(&self.barrier_ns),
            tokens: dptr(&self.tokens),
            ring: self.ring.device_ptr(),
            logits_out: spec.logits_out,
            nll_out: spec.nll_out,
            vocab: c.vocab_size as u32,
            hidden: c.hidden_size as u32,
            inter: c.intermediate_size as u32,
            n_layers: c.num_hidden_layers as u32,
            n_heads: c.num_attention_heads as u32,
            n_kv_heads: c.num_key_value_heads as u32,
            head_dim: c.head_dim as u32,
            max_ctx: self.max_ctx,
            max_splits: MAX_SPLITS,
            eps: c.rms_norm_eps,
            start_pos: spec.start_pos,
            prompt_len: spec.prompt_len,
            n_steps: spec.n_steps,
            flags: spec.flags,
            eos,
            n_eos: self.eos.len() as u32,
            temperature: s.temperature.max(0.0),
            top_k,
            top_p: s.top_p,
            seed_lo: s.seed as u32,
            seed_hi: (s.seed >> 32) as u32,
            debug_skip: spec.debug_skip,
            fault_step: spec.fault_step.unwrap_or(u32::MAX),
            phase_cycles: dptr(&self.phase_cycles),
        })
    }

    /// Streams the running launch's tokens to `on_token` and waits for it to finish.
    fn stream_tokens(
        &mut self,
        spec: &LaunchSpec,
        started: Instant,
        mut on_token: Option<&mut dyn FnMut(u32) -> bool>,
    ) -> Result<(LaunchOutcome, Vec<u32>)> {
        let mut seen = 0usize;
        let mut generated = Vec::new();
        let mut cancelled = false;
        let mut drain = |ring: &HostRing, generated: &mut Vec<u32>, seen: &mut usize, cancelled: &mut bool| {
            // Slots fill in order, each with token + 1; zero is not yet written.
            while RING_TOKENS + *seen < ring.len() {
                let slot = ring.read(RING_TOKENS + *seen);
                if slot == 0 {
                    break;
                }
                let t = slot - 1;
                generated.push(t);
                *seen += 1;
                if let Some(cb) = on_token.as_mut() {
                    if !*cancelled && !cb(t) {
                        ring.write(RING_CANCEL, 1);
                        *cancelled = true;
                    }
                }
            }
        };
        // A step takes well under 10 ms even at 40k context; a launch far past that is stuck
        // (a barrier that never completes), and waiting longer would only hide it. Tools that
        // slow kernels down a hundredfold (compute-sanitizer) set QWEN3_WATCHDOG_SECS.
        let base = std::env::var("QWEN3_WATCHDOG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
        let watchdog = Duration::from_secs(base) + Duration::from_millis(20) * spec.n_steps;
        loop {
            let status = self.gpu.stream_done();
            // Tokens published before a fault still reach the caller.
            drain(&self.ring, &mut generated, &mut seen, &mut cancelled);
            let done = status.map_err(|e| self.launch_error(e, spec))?;
            if done {
                break;
            }
            if started.elapsed() > watchdog {
                bail!(
                    "qwen3_decode did not finish within {watchdog:?} ({} steps): the kernel is stuck; exit the process",
                    spec.n_steps
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.gpu.synchronize().map_err(|e| self.launch_error(e, spec))?;
        drain(&self.ring, &mut generated, &mut seen, &mut cancelled);
        let elapsed = started.elapsed();
        let mut st = [DecodeState::default()];
        self.state.copy_to(&mut st[..]).context("reading decode state")?;
        Ok((LaunchOutcome { steps_done: st[0].steps_done, stop_reason: st[0].stop_reason, elapsed }, generated))
    }

    /// A device error during a launch, with the step (and position) the kernel had reached,
    /// read from the host-mapped ring, which stays readable after the context is lost.
    fn launch_error(&self, e: anyhow::Error, spec: &LaunchSpec) -> anyhow::Error {
        let step = self.ring.read(RING_STEP);
        // The marker is an asynchronous store to host memory: a fault right after a step starts
        // can still find the previous step's marker, so the report names both.
        let at = if step == 0 {
            "before its first step".to_string()
        } else {
            format!(
                "in decode step {} or {} of {} (position {} or {})",
                step,
                step + 1,
                spec.n_steps,
                spec.start_pos + step - 1,
                spec.start_pos + step
            )
        };
        e.context(format!(
            "qwen3_decode failed {at}; the GPU context is unusable after a device fault, so exit and start again"
        ))
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

    fn check_request(&self, what: &str, tokens: &[u32], new_tokens: usize) -> Result<()> {
        check_request(what, tokens, new_tokens, self.config.vocab_size, self.max_ctx as usize)
    }
}

impl Backend for GpuEngine {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn max_context(&self) -> usize {
        self.max_ctx as usize
    }

    fn decode(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        self.check_request("prompt", prompt, max_new)?;
        if max_new == 0 {
            return Ok(Generation { tokens: Vec::new(), stop: StopReason::MaxNewTokens });
        }
        self.set_eos(eos)?;
        let spec = LaunchSpec {
            start_pos: 0,
            prompt_len: prompt.len() as u32,
            n_steps: (prompt.len() - 1 + max_new) as u32,
            sampling: Some(*sampling),
            fault_step: self.fault_step,
            ..Default::default()
        };
        let (outcome, tokens) = self.launch(&spec, prompt, Some(on_token))?;
        let stop = match outcome.stop_reason {
            STOP_EOS => StopReason::Eos,
            STOP_CANCELLED => StopReason::Cancelled,
            STOP_STEPS => StopReason::MaxNewTokens,
            other => bail!("qwen3_decode ended with stop reason {other}, which the host does not know"),
        };
        Ok(Generation { tokens, stop })
    }

    fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_request("text", tokens, 0)?;
        if tokens.len() < 2 {
            return Ok(Vec::new());
        }
        let nll = self.gpu.alloc::<f32>(tokens.len() - 1, "NLL output")?;
        let spec = LaunchSpec {
            start_pos: 0,
            prompt_len: tokens.len() as u32,
            n_steps: (tokens.len() - 1) as u32,
            flags: FLAG_LM_HEAD_ON_PROMPT,
            nll_out: dptr(&nll),
            ..Default::default()
        };
        self.launch(&spec, tokens, None)?;
        let mut out = vec![0f32; tokens.len() - 1];
        nll.copy_to(&mut out[..]).context("reading NLL")?;
        Ok(out)
    }

    fn logits(&mut self, tokens: &[u32], positions: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.check_request("text", tokens, 0)?;
        ensure!(positions.windows(2).all(|w| w[0] < w[1]), "positions must be ascending");
        ensure!(positions.iter().all(|&p| p < tokens.len()), "a position is beyond the tokens");
        let vocab = self.config.vocab_size;
        let out_buf = self.gpu.alloc::<f32>(vocab, "logits output")?;
        let mut rows = Vec::new();
        let mut next = 0usize; // first position not yet in the KV cache
        for &p in positions {
            if p > next {
                // Teacher-forced steps next..p, no LM head.
                let spec = LaunchSpec {
                    start_pos: next as u32,
                    prompt_len: (tokens.len() - next) as u32,
                    n_steps: (p - next) as u32,
                    ..Default::default()
                };
                self.launch(&spec, &tokens[next..], None)?;
            }
            let spec = LaunchSpec {
                start_pos: p as u32,
                prompt_len: (tokens.len() - p) as u32,
                n_steps: 1,
                flags: FLAG_WRITE_LOGITS,
                logits_out: dptr(&out_buf),
                ..Default::default()
            };
            self.launch(&spec, &tokens[p..], None)?;
            let mut row = vec![0f32; vocab];
            out_buf.copy_to(&mut row[..]).context("reading logits")?;
            rows.push(row);
            next = p + 1;
        }
        Ok(rows)
    }
}

/// Opens the GPU backend for the CLI.
/// `QWEN3_INJECT_FAULT_AT_STEP=N` (tests only) makes generation fault at decode step N
/// (0-based), to check that device errors are reported with their name and step.
pub fn open_gpu_backend(weights: Arc<Weights>, max_context: usize) -> Result<Box<dyn Backend>> {
    let mut engine = GpuEngine::new(&weights, max_context)?;
    if let Ok(v) = std::env::var("QWEN3_INJECT_FAULT_AT_STEP") {
        engine.fault_step = Some(v.parse().context("QWEN3_INJECT_FAULT_AT_STEP must be a step number")?);
    }
    Ok(Box::new(engine))
}
