//! What every decoder offers, whether it runs on the CPU (the reference) or on the GPU (the
//! megakernel): generation with streaming, teacher-forced scoring, and teacher-forced logits;
//! and the checks every request passes before a backend runs it.

use crate::model::Qwen3Config;
use anyhow::{bail, Result};

/// How the next token is chosen. `temperature == 0` means greedy (arg-max, ties to the lowest
/// id). `top_k == 0` and `top_p >= 1` switch those filters off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was generated (it is the last token returned).
    Eos,
    /// The requested number of new tokens was generated.
    MaxNewTokens,
    /// `on_token` returned false.
    Cancelled,
}

impl StopReason {
    /// The name reports use: "eos", "max_new_tokens" or "cancelled".
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What one generation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Whether a generation stops after `token`, its `count`-th new one, in the kernel's order:
/// an end-of-sequence token first, then the caller's stop (`go_on` false), then `max_new`.
pub fn stop_after(token: u32, go_on: bool, count: usize, max_new: usize, eos: &[u32]) -> Option<StopReason> {
    if eos.contains(&token) {
        Some(StopReason::Eos)
    } else if !go_on {
        Some(StopReason::Cancelled)
    } else if count == max_new {
        Some(StopReason::MaxNewTokens)
    } else {
        None
    }
}

/// A decoder for one sequence. Positions start at 0 with each call (each call resets the KV
/// cache).
pub trait Backend {
    /// Short name for reports: "cpu" or "gpu".
    fn name(&self) -> &'static str;

    /// Largest prompt + generated length this backend accepts (its KV cache size).
    fn max_context(&self) -> usize;

    /// What `decode` with `sampling` runs on, for reports ("reference" unless a backend
    /// says otherwise).
    fn decode_kernel(&self, _sampling: &SamplingParams) -> &'static str {
        "reference"
    }

    /// Runs `prompt` (at least one token), then generates up to `max_new` tokens, calling
    /// `on_token` with each new token as soon as it is known. Stops after an `eos` token (which
    /// is included in the result), at `max_new`, or when `on_token` returns false (an `eos`
    /// token reports `Eos` even then). The request is checked with [`check_request`] first.
    fn decode(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation>;

    /// [`decode`](Backend::decode)'s tokens alone.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        Ok(self.decode(prompt, max_new, sampling, eos, on_token)?.tokens)
    }

    /// Teacher-forced scoring: for each i in 1..tokens.len(), the negative log-likelihood
    /// (nats) of tokens[i] given tokens[..i]. Length tokens.len() - 1.
    fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;

    /// Teacher-forced logits: row i is the logits (vocab_size values) after tokens[..=i], for
    /// each i in `positions` (ascending, all < tokens.len()).
    fn logits(&mut self, tokens: &[u32], positions: &[usize]) -> Result<Vec<Vec<f32>>>;
}

/// Largest KV cache a backend sets up, whatever config.json claims: the CPU reference's RoPE
/// table alone is `max_context * head_dim` floats, allocated up front.
const MAX_CONTEXT: usize = 1 << 24;

/// The KV-cache size when none is asked for: 4096 positions, or the model's own limit where
/// that is smaller.
pub fn default_max_context(config: &Qwen3Config) -> usize {
    config.max_position_embeddings.min(4096)
}

/// Refuses a KV-cache size (`--max-context`) below `min` positions, beyond the model's
/// `max_position_embeddings`, or beyond `MAX_CONTEXT`.
pub fn check_max_context(max_context: usize, min: usize, config: &Qwen3Config) -> Result<()> {
    if max_context < min {
        bail!("--max-context must be at least {min}, got {max_context}");
    }
    if max_context > config.max_position_embeddings {
        bail!(
            "--max-context {max_context} exceeds the model's max_position_embeddings ({})",
            config.max_position_embeddings
        );
    }
    if max_context > MAX_CONTEXT {
        bail!("--max-context {max_context} is more than this tool supports ({MAX_CONTEXT})");
    }
    Ok(())
}

/// Refuses token ids the model has no embedding for; `what` names the tokens ("prompt").
pub(crate) fn check_ids(what: &str, tokens: &[u32], vocab_size: usize) -> Result<()> {
    if let Some((i, &id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab_size) {
        bail!(
            "{what} token #{i} is id {id}, outside the vocabulary of {vocab_size} ids (0..{})",
            vocab_size.saturating_sub(1)
        );
    }
    Ok(())
}

/// The one check of a request, made by the CLI before it loads a checkpoint and by every
/// backend before it runs: `tokens` (the prompt or the text scored, `what` names it) is not
/// empty, holds ids of the vocabulary only, and with `new_tokens` more fits `max_context`.
pub fn check_request(
    what: &str,
    tokens: &[u32],
    new_tokens: usize,
    vocab_size: usize,
    max_context: usize,
) -> Result<()> {
    if tokens.is_empty() {
        bail!("the {what} has no tokens (it is empty); at least one is needed");
    }
    check_ids(what, tokens, vocab_size)?;
    // checked_add: a huge count of new tokens must not wrap around and pass.
    let need = tokens.len().checked_add(new_tokens);
    if need.is_none_or(|need| need > max_context) {
        let asked = if new_tokens > 0 {
            format!("{what} of {} tokens + {new_tokens} new tokens", tokens.len())
        } else {
            format!("{what} of {} tokens", tokens.len())
        };
        bail!("{asked} is beyond the maximum context of {max_context} positions (the KV cache's size, --max-context)");
    }
    Ok(())
}
