//! One launch of the decode kernel: its settings ([`LaunchSpec`]), the kernel parameters built
//! from them, and the cooperative launch itself.

use super::abi::*;
use super::{decode_kernel_name, dptr, GpuEngine, MAX_EOS};
use crate::backend::{check_ids, SamplingParams};
use anyhow::{ensure, Context, Result};
use cust::memory::CopyDestination;
use std::ffi::c_void;
use std::time::{Duration, Instant};

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

impl GpuEngine {
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

    /// The kernel parameters for one launch described by `spec`.
    pub(super) fn params(&self, spec: &LaunchSpec) -> Result<DecodeParams> {
        let s = spec.sampling.unwrap_or(SamplingParams::GREEDY);
        // top-k 0 with top-p < 1 is top-p alone, which the kernel draws from exactly.
        let top_k = s.top_k;
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
            lm_candidates: dptr(&self.lm_candidates),
            lm_grid_hist: dptr(&self.lm_grid_hist),
        })
    }
}
