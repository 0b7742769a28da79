//! What every decoder offers, whether it runs on the CPU (the reference) or on the GPU (the
//! megakernel): generation with streaming, teacher-forced scoring, and teacher-forced logits.

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

/// A decoder for one sequence. Positions start at 0 with each call (each call resets the KV
/// cache).
pub trait Backend {
    /// Short name for reports: "cpu" or "gpu".
    fn name(&self) -> &'static str;

    /// Largest prompt + generated length this backend accepts (its KV cache size).
    fn max_context(&self) -> usize;

    /// Runs `prompt` (at least one token), then generates up to `max_new` tokens, calling
    /// `on_token` with each new token as soon as it is known. Stops after an `eos` token (which
    /// is included in the result), at `max_new`, or when `on_token` returns false. Returns the
    /// generated tokens.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> anyhow::Result<Vec<u32>>;

    /// Teacher-forced scoring: for each i in 1..tokens.len(), the negative log-likelihood
    /// (nats) of tokens[i] given tokens[..i]. Length tokens.len() - 1.
    fn score(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>>;

    /// Teacher-forced logits: row i is the logits (vocab_size values) after tokens[..=i], for
    /// each i in `positions` (ascending, all < tokens.len()).
    fn logits(&mut self, tokens: &[u32], positions: &[usize]) -> anyhow::Result<Vec<Vec<f32>>>;
}
