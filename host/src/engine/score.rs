//! Scoring a text through prefill (`perplexity` on the GPU): the teacher-forced NLL of every
//! token after the first, with the text's positions run through prefill's layers in chunks
//! (`prefill.rs`) instead of one megakernel step each. After each chunk's last layer,
//! `enqueue_prefill` hands its rows to [`GpuEngine::enqueue_score_chunk`]:
//!
//! ```text
//! x (f32, the chunk's final hidden states) -> final RMSNorm (prefill_rms_norm) -> bf16 rows
//!   -> per at most SCORE_ROWS rows: LM-head GEMM (the [vocab, hidden] matrix, the tied
//!      embedding or lm_head) -> f32 logits [rows, vocab] -> prefill_nll against the next
//!      token ids -> nll[position]
//! ```
//!
//! The text's last position has no next token to score, so it is not prefilled at all
//! (nothing would read its K/V or its logits), just as the megakernel's score launch never
//! runs it. Unlike that path, every activation enters its GEMM as bf16, the LM head's input
//! too (the megakernel's LM head reads the normed row in f32): the NLLs agree within a
//! tolerance, not bit for bit (tests/tests/gpu_score.rs).

use super::prefill::PrefillBuffers;
use super::{dptr, GpuEngine};
use crate::backend::check_request;
use crate::gpu::{check_gemm_shape, gemm_bf16_raw, prefill};
use anyhow::{bail, Context, Result};

/// Most rows one LM-head GEMM takes: its f32 logits buffer holds this many rows of the
/// vocabulary (156 MB at Qwen3's 151936), whatever the chunk size.
pub const SCORE_ROWS: usize = 256;

/// Where a scored prefill's chunks put their results (`enqueue_prefill`'s hook): addresses of
/// device buffers that [`GpuEngine::score_prefill`] owns and keeps alive until the prefill has
/// finished. Built only there, with the sizes below.
pub(super) struct ScoreTargets {
    /// u32 `[n]`, n the positions prefilled: the target of each (the text's next token).
    targets: u64,
    /// f32 `[n]`: the NLL of each target.
    nll: u64,
    /// f32 `[rows, vocab]`: one LM-head GEMM's logits.
    logits: u64,
    rows: usize,
}

impl GpuEngine {
    /// What scoring through prefill needs of this model beyond prefill's own shapes: an LM head
    /// the GEMM can compute (a vocabulary that is a multiple of 64, as Qwen3's 151936 is).
    pub fn check_score_prefill(&self) -> Result<()> {
        let c = &self.config;
        check_gemm_shape(1, c.vocab_size, c.hidden_size).context("scoring through prefill: the LM head of this model")
    }

    /// Teacher-forced scoring through prefill: for each i in 1..tokens.len(), the NLL (nats) of
    /// `tokens[i]` given `tokens[..i]`, positions `0 .. tokens.len() - 1` prefilled in chunks
    /// of `chunk` into the KV cache, each chunk's rows scored after its last layer (see the
    /// module). Empty for fewer than 2 tokens. The request is checked as the megakernel's
    /// score checks it (ids, the KV cache), and the chunk and shapes as prefill checks them.
    pub fn score_prefill(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        check_request("text", tokens, 0, c.vocab_size, self.max_ctx as usize)?;
        let Some((_, before_last)) = tokens.split_last() else { return Ok(Vec::new()) };
        if before_last.is_empty() {
            return Ok(Vec::new());
        }
        // Refused before the large logits buffer is allocated.
        self.check_prefill(before_last, 0, chunk)?;
        self.check_score_prefill()?;
        let n = before_last.len();
        let rows = SCORE_ROWS.min(chunk).min(n);
        let targets = self.gpu.upload(&tokens[1..], "score targets")?;
        // NaN until written: a row the scoring missed cannot pass for a likely token.
        let nll = self.gpu.upload(&vec![f32::NAN; n], "NLL output")?;
        let logits = self.gpu.alloc::<f32>(rows * c.vocab_size, "score logits")?;
        let score = ScoreTargets { targets: dptr(&targets), nll: dptr(&nll), logits: dptr(&logits), rows };
        // Waits for every launch, also when one fails, before the buffers are freed.
        self.prefill_scored(before_last, 0, chunk, Some(&score)).context("scoring through prefill")?;
        let out = self.gpu.download(&nll).context("reading the NLL")?;
        if let Some(i) = out.iter().position(|v| v.is_nan()) {
            bail!("scoring through prefill: the NLL of token {} is NaN (NaN logits, or a row not scored)", i + 1);
        }
        Ok(out)
    }

    /// Enqueues the scoring of chunk rows `p0 .. p0 + m` of a prefill (their final hidden
    /// states in `b`'s residual rows): the final norm into `b`'s normed rows, then per at most
    /// `s.rows` rows the LM-head GEMM into `s.logits` and `prefill_nll` into `s.nll[p0 ..]`.
    ///
    /// # Safety
    /// `s` must be [`GpuEngine::score_prefill`]'s, for a prefill of at least `p0 + m` positions;
    /// `b` must hold at least `m` rows, and the chunk's layers must have been enqueued before.
    pub(super) unsafe fn enqueue_score_chunk(
        &self,
        s: &ScoreTargets,
        b: &PrefillBuffers,
        p0: usize,
        m: usize,
    ) -> Result<()> {
        let c = &self.config;
        let (hidden, vocab) = (c.hidden_size, c.vocab_size);
        let gpu = &self.gpu;
        let at = |r: usize, rows: usize| format!("scoring through prefill: positions {}..{}", p0 + r, p0 + r + rows);
        // SAFETY (every launch): `b` holds `m >= rows` rows of `hidden`, `s.logits` `s.rows`
        // rows of `vocab`, `s.targets` and `s.nll` one word per prefilled position (the
        // caller's contract); the final norm and the LM head are this engine's weights.
        unsafe {
            prefill::rms_norm_rows(gpu, b.residual(), self.final_norm, m, hidden, c.rms_norm_eps, b.normed_rows())
                .with_context(|| at(0, m))?;
            let mut r = 0;
            while r < m {
                let rows = s.rows.min(m - r);
                let (a, first) = (b.normed_rows() + (2 * r * hidden) as u64, (4 * (p0 + r)) as u64);
                gemm_bf16_raw(gpu, a, self.lm_head, s.logits, rows, vocab, hidden).with_context(|| at(r, rows))?;
                prefill::nll(gpu, s.logits, s.targets + first, rows, vocab, s.nll + first)
                    .with_context(|| at(r, rows))?;
                r += rows;
            }
        }
        Ok(())
    }
}
