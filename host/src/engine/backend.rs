//! [`Backend`] for the GPU engine: generation, scoring and teacher-forced logits as launches.

use super::abi::*;
use super::{dptr, GpuEngine, LaunchSpec};
use crate::backend::{check_request, Backend, Generation, SamplingParams, StopReason};
use anyhow::{bail, ensure, Context, Result};
use cust::memory::CopyDestination;

impl GpuEngine {
    /// [`check_request`] against this engine's vocabulary and KV cache.
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

    fn decode_kernel(&self, sampling: &SamplingParams) -> &'static str {
        if self.decodes_with_stream_step(sampling) {
            "streaming step"
        } else {
            "megakernel"
        }
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
        if self.decodes_with_stream_step(sampling) {
            return self.decode_streaming(prompt, max_new, sampling, eos, on_token);
        }
        // With prefill on, every prompt token but the last fills the cache in chunks first,
        // and the megakernel starts at the last one (the step that computes the first logits).
        let last = prompt.len() - 1;
        let fed = if self.prefill_chunk > 0 && last > 0 {
            self.prefill(&prompt[..last], 0, self.prefill_chunk)?;
            &prompt[last..]
        } else {
            prompt
        };
        let spec = LaunchSpec {
            start_pos: (prompt.len() - fed.len()) as u32,
            prompt_len: fed.len() as u32,
            n_steps: (fed.len() - 1 + max_new) as u32,
            sampling: Some(*sampling),
            fault_step: self.fault_step,
            ..Default::default()
        };
        let (outcome, tokens) = self.launch(&spec, fed, Some(on_token))?;
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
        // With prefill on, every position through prefill's layers and an LM-head GEMM per
        // chunk (score.rs); else one megakernel step per position.
        if self.prefill_chunk > 0 {
            return self.score_prefill(tokens, self.prefill_chunk);
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
