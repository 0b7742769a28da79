//! The decode step split at its barriers into separate kernels (`qwen3_phase_hd*`, one launch
//! per phase: 5 per layer plus the LM head) captured as one CUDA graph, which is what a
//! framework that captures its step in a CUDA graph runs. Both variants run the same device
//! functions on the same grid, so their logits must agree exactly ([`GpuEngine::check_split_step`]).

use super::abi::*;
use super::{dptr, phase_kernel_name, GpuEngine, LaunchSpec};
use crate::backend::{check_ids, SamplingParams};
use crate::gpu::CudaGraph;
use crate::model::ops;
use anyhow::{ensure, Context, Result};
use cust::memory::CopyDestination;
use std::ffi::c_void;

/// One decode step run by the megakernel and by the split graph.
pub struct SplitCheck {
    /// The megakernel's logits.
    pub logits: Vec<f32>,
    /// Largest |difference| of the split graph's logits from them (0 = identical).
    pub max_logit_diff: f32,
    /// Whether the two variants' arg-max tokens agree.
    pub same_token: bool,
}

impl GpuEngine {
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
        let ops = super::schedule::phases_per_step(self.config.num_hidden_layers as u32);
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

    /// Runs the step at `position` that feeds `token` once as the megakernel and once as the
    /// split graph, and compares their logits.
    pub fn check_split_step(&mut self, position: u32, token: u32) -> Result<SplitCheck> {
        let vocab = self.config.vocab_size;
        let mega_logits = self.gpu.alloc::<f32>(vocab, "comparison logits")?;
        let split_logits = self.gpu.alloc::<f32>(vocab, "comparison logits")?;
        let spec = LaunchSpec {
            start_pos: position,
            prompt_len: 1,
            n_steps: 1,
            flags: FLAG_WRITE_LOGITS,
            sampling: Some(SamplingParams::GREEDY),
            logits_out: dptr(&mega_logits),
            ..Default::default()
        };
        self.launch(&spec, &[token], None).context("megakernel step for the comparison")?;
        let graph = self.split_step_graph(position, token, dptr(&split_logits))?;
        graph.launch(self.gpu.stream())?;
        self.gpu.synchronize().context("split-kernel step for the comparison")?;
        let logits = self.gpu.download(&mega_logits)?;
        let split = self.gpu.download(&split_logits)?;
        ensure!(logits.iter().all(|v| v.is_finite()), "the megakernel's logits are not finite");
        let max_logit_diff = logits.iter().zip(&split).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let same_token = ops::argmax(&logits) == ops::argmax(&split);
        Ok(SplitCheck { logits, max_logit_diff, same_token })
    }
}
