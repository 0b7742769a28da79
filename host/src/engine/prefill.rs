//! Prefill: prompt positions through the model a chunk of M at a time, as matrix products,
//! filling the decode kernel's KV cache exactly where the megakernel would have (same layout,
//! same bf16 rounding of K and V), so that the megakernel can continue from the first position
//! after them. No LM head runs here: the megakernel's step at the last prompt token computes
//! the logits it needs, as it does today (except when a text is scored: then each chunk's
//! rows go on to the final norm, an LM-head GEMM and the NLL kernel, `score.rs`).
//!
//! Per chunk (positions `p0 .. p0 + m`), after the embedding rows, per layer (ordinary
//! launches on the engine's stream, in order, so each sees the previous one's writes):
//!
//! ```text
//! x (f32) -> RMSNorm -> bf16 rows -> q/k/v GEMM (the stacked wqkv) -> q/k norm + RoPE, K/V
//!   into the cache at p0..p0+m -> causal attention over 0..=p (tensor cores, bf16) -> o GEMM
//!   (split K) -> x += its slices, RMSNorm (one launch) -> gate/up GEMM with SiLU(gate) * up
//!   in its epilogue (bf16) -> down GEMM (split K) -> x += its slices, and the next layer's
//!   RMSNorm (one launch)
//! ```
//!
//! Splitting K gives the GEMMs with N = hidden (few tiles of C) enough blocks to fill the GPU
//! (`residual_splits`); their slices are summed in a fixed order, so a prefill gives the same
//! bits on every run.
//!
//! Activations enter the GEMMs as bf16 (the megakernel's GEMVs read them in f32): the one
//! numerical difference from the one-position-per-step path, and why prefill's logits are
//! compared with a tolerance rather than bit for bit.

use super::abi::{gemm_grid, PrefillAttentionParams, FLAG_WRITE_LOGITS, GEMM_TILE_K};
use super::score::ScoreTargets;
use super::{dptr, GpuEngine, LaunchSpec};
use crate::backend::check_ids;
use crate::gpu::{check_gemm_shape, gemm_bf16_raw, gemm_bf16_split_raw, gemm_gate_up_silu_raw, prefill, Gpu};
use anyhow::{bail, ensure, Context, Result};
use cust::memory::{CopyDestination, DeviceBuffer};

/// The work buffers of chunks of up to `chunk` positions (all row-major, a row per position).
pub(super) struct PrefillBuffers {
    chunk: usize,
    /// f32 `[chunk, hidden]`: the residual stream of the chunk.
    x: DeviceBuffer<f32>,
    /// bf16 `[chunk, hidden]`: a norm's output, the q/k/v and gate/up GEMMs' A.
    normed: DeviceBuffer<u16>,
    /// f32 `[chunk, q_dim + 2 kv_dim]`.
    qkv: DeviceBuffer<f32>,
    /// bf16 `[chunk, q_dim]`: q after its norm and RoPE, attention's A.
    q: DeviceBuffer<u16>,
    /// bf16 `[chunk, q_dim]`: attention output, the o GEMM's A.
    attn: DeviceBuffer<u16>,
    /// f32 `[splits, rows, hidden]`: the o and down GEMMs' partial products (one per split of
    /// K, `residual_splits`), before the residual add sums them; sized for the most
    /// `splits * rows` of any chunk up to `chunk` rows.
    proj: DeviceBuffer<f32>,
    /// bf16 `[chunk, inter]`: SiLU(gate) * up (the fused gate/up GEMM's output), the down
    /// GEMM's A.
    act: DeviceBuffer<u16>,
}

impl PrefillBuffers {
    fn new(gpu: &Gpu, chunk: usize, hidden: usize, q_dim: usize, kv_dim: usize, inter: usize) -> Result<Self> {
        let sms = gpu.sm_count();
        let proj_rows = (1..=chunk)
            .map(|m| m * residual_splits(m, hidden, q_dim, sms).max(residual_splits(m, hidden, inter, sms)))
            .max()
            .unwrap_or(chunk);
        Ok(PrefillBuffers {
            chunk,
            x: gpu.alloc(chunk * hidden, "prefill residual")?,
            normed: gpu.alloc(chunk * hidden, "prefill normed rows")?,
            qkv: gpu.alloc(chunk * (q_dim + 2 * kv_dim), "prefill q/k/v")?,
            q: gpu.alloc(chunk * q_dim, "prefill q")?,
            attn: gpu.alloc(chunk * q_dim, "prefill attention output")?,
            proj: gpu.alloc(proj_rows * hidden, "prefill projections")?,
            act: gpu.alloc(chunk * inter, "prefill MLP activations")?,
        })
    }
}

/// Splits of K for a GEMM whose partial products the residual add sums (the o and down
/// projections, N = hidden: few tiles of C, e.g. 16 at M = 128, 128 at M = 1024): double
/// them while the launch stays within four blocks per SM (what fits at once: 128 threads and
/// 45 KiB of shared memory a block) and each split keeps 8 K-tiles or more, so that its copy
/// pipeline fills. At most 8.
pub fn residual_splits(m: usize, n: usize, k: usize, sm_count: u32) -> usize {
    let tiles = gemm_grid(m as u32, n as u32) as usize;
    let mut s = 1;
    while s < 8
        && tiles * s * 2 <= 4 * sm_count as usize
        && k.is_multiple_of(2 * s * GEMM_TILE_K as usize)
        && k / (2 * s) >= 8 * GEMM_TILE_K as usize
    {
        s *= 2;
    }
    s
}

impl GpuEngine {
    /// Checks a prefill request: a chunk size the GEMMs take for this model, ids within the
    /// vocabulary, positions within the KV cache (with no tokens: the chunk and the model's
    /// shapes alone).
    pub fn check_prefill(&self, tokens: &[u32], start_pos: u32, chunk: usize) -> Result<()> {
        let c = &self.config;
        ensure!(chunk >= 1, "prefill: the chunk size must be at least 1 position");
        ensure!(chunk <= u32::MAX as usize / 4, "prefill: a chunk of {chunk} positions is too large");
        check_ids("prefill", tokens, c.vocab_size)?;
        let end = start_pos as u64 + tokens.len() as u64;
        if end > self.max_ctx as u64 {
            bail!(
                "prefill: positions {start_pos}..{end} are beyond the KV cache of {} positions (--max-context)",
                self.max_ctx
            );
        }
        let (hidden, inter, q_dim, kv_dim) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        for (what, n, k) in [
            ("q/k/v projection", q_dim + 2 * kv_dim, hidden),
            ("o projection", hidden, q_dim),
            ("gate/up projection", 2 * inter, hidden),
            ("down projection", hidden, inter),
        ] {
            check_gemm_shape(chunk, n, k).with_context(|| format!("prefill's {what} of this model"))?;
        }
        ensure!(hidden.is_multiple_of(4), "prefill: hidden size {hidden} is not a multiple of 4");
        Ok(())
    }

    /// Runs `tokens` at positions `start_pos ..` through every layer, `chunk` positions at a
    /// time (the last chunk may be shorter), writing their K and V into the KV cache, and
    /// waits for the GPU. Positions before `start_pos` must already be in the cache (an
    /// earlier prefill or launch); nothing after the last position is touched. Computes no
    /// logits: run the megakernel from position `start_pos + tokens.len()` for those.
    pub fn prefill(&mut self, tokens: &[u32], start_pos: u32, chunk: usize) -> Result<()> {
        self.prefill_scored(tokens, start_pos, chunk, None)
    }

    /// [`GpuEngine::prefill`], and with `score`, each chunk's NLL against its targets after the
    /// chunk's last layer (`score.rs`).
    pub(super) fn prefill_scored(
        &mut self,
        tokens: &[u32],
        start_pos: u32,
        chunk: usize,
        score: Option<&ScoreTargets>,
    ) -> Result<()> {
        self.check_prefill(tokens, start_pos, chunk)?;
        if tokens.is_empty() {
            return Ok(());
        }
        let c = self.config.clone();
        let (hidden, inter, q_dim, kv_dim) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        // Chunks never exceed the prompt: a short prompt needs no buffers of a large chunk.
        let chunk = chunk.min(tokens.len());
        if self.prefill_buffers.as_ref().is_none_or(|b| b.chunk < chunk) {
            self.prefill_buffers = None; // free the smaller buffers first
            self.prefill_buffers = Some(PrefillBuffers::new(&self.gpu, chunk, hidden, q_dim, kv_dim, inter)?);
        }
        // All ids at once, before any launch: one upload, never racing a kernel that reads it.
        let ids = self.gpu.upload(tokens, "prefill token ids")?;
        // Enqueue every chunk; whether that stops early or not, wait for what was enqueued
        // before `ids` and the buffers can be freed or reused.
        let enqueued = self.enqueue_prefill(dptr(&ids), tokens.len(), start_pos, chunk, score);
        // `ids` must outlive the kernels that read it; errors of any kernel surface here.
        let finished = self.gpu.synchronize().with_context(|| {
            format!("prefill of positions {start_pos}..{} (chunks of {chunk})", start_pos as usize + tokens.len())
        });
        drop(ids);
        enqueued?;
        finished
    }

    /// Enqueues the launches of a prefill of `n` tokens (u32 ids at device address `ids`) at
    /// positions `start_pos ..`, in chunks of `chunk`, on the buffers `prefill` allocated (`prefill_buffers`);
    /// with `score`, each chunk's scoring launches follow its layers (`score.rs`).
    fn enqueue_prefill(
        &self,
        ids: u64,
        n: usize,
        start_pos: u32,
        chunk: usize,
        score: Option<&ScoreTargets>,
    ) -> Result<()> {
        let c = &self.config;
        let (hidden, inter, q_dim, kv_dim) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let b = self.prefill_buffers.as_ref().context("prefill: no work buffers")?;
        let gpu = &self.gpu;
        let sms = gpu.sm_count();
        let eps = c.rms_norm_eps;
        let mut p0 = 0usize;
        while p0 < n {
            let m = chunk.min(n - p0);
            let start = start_pos + p0 as u32;
            // SAFETY (every launch below): each address is a live allocation of this engine,
            // sized for its role at `chunk >= m` rows (PrefillBuffers, upload.rs); ids are
            // within the vocabulary and positions within the cache (check_prefill).
            unsafe {
                prefill::embed(gpu, self.embed, ids + 4 * p0 as u64, m, hidden, dptr(&b.x))
                    .context("prefill: embedding")?;
                // Each layer's input norm runs with the residual add before it (the previous
                // layer's down projection), except the first's.
                let first_norm = self.layers.first().map_or(0, |lw| lw.input_norm);
                prefill::rms_norm_rows(gpu, dptr(&b.x), first_norm, m, hidden, eps, dptr(&b.normed))
                    .context("prefill: layer 0")?;
                // x += the split-K slices of `proj`, then the norm with `weight` into `normed`.
                let add_norm = |splits: usize, weight: u64| {
                    prefill::add_rms_norm(
                        gpu,
                        dptr(&b.x),
                        dptr(&b.proj),
                        splits,
                        weight,
                        m,
                        hidden,
                        eps,
                        dptr(&b.normed),
                    )
                };
                for (layer, lw) in self.layers.iter().enumerate() {
                    let at = || format!("prefill: layer {layer}, positions {start}..{}", start as usize + m);
                    gemm_bf16_raw(gpu, dptr(&b.normed), lw.wqkv, dptr(&b.qkv), m, q_dim + 2 * kv_dim, hidden)
                        .with_context(at)?;
                    let heads = PrefillAttentionParams {
                        qkv: dptr(&b.qkv),
                        q_norm: lw.q_norm,
                        k_norm: lw.k_norm,
                        rope_cos: dptr(&self.rope_cos),
                        rope_sin: dptr(&self.rope_sin),
                        k_cache: lw.k_cache,
                        v_cache: lw.v_cache,
                        q: dptr(&b.q),
                        out: dptr(&b.attn),
                        rows: m as u32,
                        start_pos: start,
                        n_heads: c.num_attention_heads as u32,
                        n_kv_heads: c.num_key_value_heads as u32,
                        head_dim: c.head_dim as u32,
                        max_ctx: self.max_ctx,
                        eps,
                        _pad: 0,
                    };
                    prefill::qk_rope(gpu, &heads).with_context(at)?;
                    prefill::attention(gpu, &heads).with_context(at)?;
                    let s = residual_splits(m, hidden, q_dim, sms);
                    gemm_bf16_split_raw(gpu, dptr(&b.attn), lw.wo, dptr(&b.proj), m, hidden, q_dim, s)
                        .with_context(at)?;
                    add_norm(s, lw.post_norm).with_context(at)?;
                    gemm_gate_up_silu_raw(gpu, dptr(&b.normed), lw.w_gate, lw.w_up, dptr(&b.act), m, inter, hidden)
                        .with_context(at)?;
                    let s = residual_splits(m, hidden, inter, sms);
                    gemm_bf16_split_raw(gpu, dptr(&b.act), lw.w_down, dptr(&b.proj), m, hidden, inter, s)
                        .with_context(at)?;
                    match self.layers.get(layer + 1) {
                        Some(next) => add_norm(s, next.input_norm),
                        None => prefill::add(gpu, dptr(&b.x), dptr(&b.proj), m * hidden, s),
                    }
                    .with_context(at)?;
                }
            }
            if let Some(score) = score {
                // SAFETY: the launches above leave the chunk's last hidden states in `b`'s
                // residual rows, in stream order before the scoring's.
                unsafe { self.enqueue_score_chunk(score, b, p0, m) }?;
            }
            p0 += m;
        }
        Ok(())
    }
}

impl GpuEngine {
    /// The logits at the last of `tokens` (positions `0 .. tokens.len()`): every token before
    /// it through [`GpuEngine::prefill`] in chunks of `chunk`, then one megakernel step at the
    /// last, which computes its LM head as a decode step does.
    pub fn prefill_logits(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        self.prefill_logits_from(tokens, 0, chunk)
    }

    /// As [`GpuEngine::prefill_logits`] with positions `0 .. from` already in the cache (an
    /// earlier prefill of `tokens[..from]`): only `tokens[from .. last]` are prefilled.
    pub fn prefill_logits_from(&mut self, tokens: &[u32], from: usize, chunk: usize) -> Result<Vec<f32>> {
        let Some((&last_token, before)) = tokens.split_last() else {
            bail!("prefill_logits: no tokens");
        };
        ensure!(
            from <= before.len(),
            "prefill_logits: {from} positions cached, but only {} precede the last",
            before.len()
        );
        self.prefill(&before[from..], from as u32, chunk)?;
        let vocab = self.config.vocab_size;
        let out = self.gpu.alloc::<f32>(vocab, "logits output")?;
        let spec = LaunchSpec {
            start_pos: before.len() as u32,
            prompt_len: 1,
            n_steps: 1,
            flags: FLAG_WRITE_LOGITS,
            logits_out: dptr(&out),
            ..Default::default()
        };
        self.launch(&spec, &[last_token], None)?;
        let mut row = vec![0f32; vocab];
        out.copy_to(&mut row[..]).context("reading logits")?;
        Ok(row)
    }
}

impl GpuEngine {
    /// Layer `layer`'s cached K and V of positions `0 .. positions`, position-major
    /// `[positions][kv_dim]` as f32 (the layout of `model::prefill::PrefillCache`), for tests
    /// and diagnostics: where a prefill and its CPU twin part ways.
    pub fn download_kv(&self, layer: usize, positions: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        ensure!(layer < c.num_hidden_layers, "download_kv: no layer {layer}");
        ensure!(positions <= self.max_ctx as usize, "download_kv: {positions} positions exceed the cache");
        let (d, kv_heads, max_ctx) = (c.head_dim, c.num_key_value_heads, self.max_ctx as usize);
        let mut out = Vec::with_capacity(2);
        for cache in &self.kv_caches[2 * layer..2 * layer + 2] {
            let raw = self.gpu.download(cache).context("download_kv")?;
            let mut rows = Vec::with_capacity(positions * kv_heads * d);
            for pos in 0..positions {
                for h in 0..kv_heads {
                    let at = (h * max_ctx + pos) * d;
                    rows.extend(raw[at..at + d].iter().map(|&b| half::bf16::from_bits(b).to_f32()));
                }
            }
            out.push(rows);
        }
        let v = out.pop().expect("two caches");
        Ok((out.pop().expect("two caches"), v))
    }
}

impl PrefillBuffers {
    /// Device address of the residual rows (f32 `[chunk, hidden]`): after a chunk's last layer,
    /// its final hidden states, which scoring normalises (`score.rs`).
    pub(super) fn residual(&self) -> u64 {
        dptr(&self.x)
    }

    /// Device address of the bf16 `[chunk, hidden]` rows the norms write for the GEMMs; free
    /// after a chunk's last layer (scoring puts its final norm there).
    pub(super) fn normed_rows(&self) -> u64 {
        dptr(&self.normed)
    }
}
