//! `decode` on the streaming step (kernel/src/stream.rs): the engine's generation path where
//! the GPU and the sampling allow it (sm_90, Qwen3-0.6B's shape, greedy, temperature alone or
//! top-k up to 32), the megakernel's elsewhere.
//!
//! The prompt goes through prefill (all but its last token) as for the megakernel; then the
//! streaming step runs launches of a few steps each, its tokens handed to the caller as each
//! launch ends. A launch has no end-of-sequence test of its own, so the host checks each token
//! and stops at the first end (the steps a launch ran past it are discarded: their positions
//! are rewritten by the next request). Launches grow from one step (the first token as soon
//! as it is known) to [`MAX_STEPS_PER_LAUNCH`]: the host's gap between two launches is then
//! paid once per that many tokens, and a token waits at most one launch to be shown.

use super::{GpuEngine, StreamStep};
use crate::backend::{stop_after, Generation, SamplingParams};
use crate::model::Weights;
use anyhow::Result;
use std::cell::RefCell;

/// Steps of the longest launch: 32 steps are about 14 ms on an H200, short enough for text
/// to stream, long enough that the gap between launches costs little.
pub const MAX_STEPS_PER_LAUNCH: usize = 32;

impl GpuEngine {
    /// Lets `decode` run on the streaming step ([`GpuEngine::stream_step`], `w` the engine's
    /// own checkpoint) where the sampling allows; an error leaves the megakernel in charge.
    pub fn enable_stream_decode(&mut self, w: &Weights) -> Result<()> {
        self.stream = Some(RefCell::new(self.stream_step(w)?));
        Ok(())
    }

    /// Whether `decode` with `sampling` runs on the streaming step.
    pub fn decodes_with_stream_step(&self, sampling: &SamplingParams) -> bool {
        self.stream.is_some() && StreamStep::supports(sampling) && self.fault_step.is_none()
    }

    /// [`crate::backend::Backend::decode`] on the streaming step, for a checked request with
    /// `max_new` > 0.
    pub(super) fn decode_streaming(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let last = prompt.len() - 1;
        let mut pos = 0;
        if self.prefill_chunk > 0 && last > 0 {
            self.prefill(&prompt[..last], 0, self.prefill_chunk)?;
            pos = last;
        }
        // The step's launches read the engine: the step itself sits in a cell of it.
        let engine: &GpuEngine = self;
        let mut step = engine.stream.as_ref().expect("decode_streaming without a streaming step").borrow_mut();
        step.set_sampling(sampling)?;
        // Without prefill, the prompt's tokens before its last fill the cache through the step.
        while pos < last {
            let n = (last - pos).min(StreamStep::MAX_STEPS);
            step.run(engine, pos, &prompt[pos..pos + n], n, false)?;
            pos += n;
        }
        let mut tokens = Vec::new();
        let mut fed = prompt[last];
        let mut steps = 1;
        loop {
            let n = steps.min(max_new - tokens.len());
            let run = step.run(engine, pos, &[fed], n, false)?;
            for &t in &run.tokens[1..=n] {
                tokens.push(t);
                if let Some(stop) = stop_after(t, on_token(t), tokens.len(), max_new, eos) {
                    return Ok(Generation { tokens, stop });
                }
            }
            pos += n;
            fed = run.tokens[n];
            steps = (2 * steps).min(MAX_STEPS_PER_LAUNCH);
        }
    }
}
