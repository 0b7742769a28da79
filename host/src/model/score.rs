//! CPU twins of scoring a text through prefill (host/src/engine/score.rs): the NLL kernel
//! (`prefill_nll`, kernel/src/ops/nll.rs) and the whole path: prefill's layers
//! ([`super::prefill::prefill_forward`]), the final norm rounded to bf16 (the GPU runs
//! `prefill_rms_norm` with the final norm's weight, so the LM-head GEMM gets bf16 rows), the
//! LM head as a matrix product, and the NLL of each row against the next token.

use super::{ops, prefill, Weights};

/// `prefill_nll`: for each row of `logits` (`[targets.len(), vocab]`, row-major),
/// `logsumexp(row) - row[target]`, i.e. `-log_softmax(row)[target]`, computed in f64 as the
/// reference's `score` does ([`ops::log_softmax_at`]). Panics on a target outside the
/// vocabulary (the kernel writes NaN there; the host never asks).
pub fn nll_rows(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f32> {
    assert!(vocab > 0 && logits.len() == targets.len() * vocab, "nll_rows: logits are not one row per target");
    logits
        .chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            assert!((t as usize) < vocab, "nll_rows: target {t} is outside the vocabulary of {vocab}");
            -ops::log_softmax_at(row, t as usize)
        })
        .collect()
}

/// The CPU twin of [`crate::engine::GpuEngine::score_prefill`]: the NLL (nats) of each of
/// `tokens[1..]` given the tokens before it, with the GPU's roundings: every position but the
/// last through the twin of prefill in chunks of `chunk`, then per position the final RMSNorm
/// rounded to bf16, the LM head (f32 sums of exact bf16 products) and [`nll_rows`]. The
/// rows do not depend on one another, so neither does the result on `chunk` or on how many
/// rows the GPU puts through its LM head at once. Empty for fewer than 2 tokens.
pub fn score_through_prefill(w: &Weights, tokens: &[u32], chunk: usize, max_context: usize) -> Vec<f32> {
    if tokens.len() < 2 {
        return Vec::new();
    }
    let c = &w.config;
    let (hidden, vocab) = (c.hidden_size, c.vocab_size);
    let before_last = &tokens[..tokens.len() - 1];
    let cache = prefill::prefill_forward(w, before_last, chunk, max_context);
    let normed = prefill::rms_norm_rows_bf16(&cache.hidden, &w.norm, c.rms_norm_eps);
    // Rows of logits held at once: bounds the memory only (64 x 151936 f32 is 39 MB).
    const ROWS: usize = 64;
    let mut nll = Vec::with_capacity(before_last.len());
    for (rows, targets) in normed.chunks(ROWS * hidden).zip(tokens[1..].chunks(ROWS)) {
        let logits = ops::gemm_bf16(rows, w.lm_head(), targets.len(), vocab, hidden);
        nll.extend(nll_rows(&logits, vocab, targets));
    }
    nll
}
