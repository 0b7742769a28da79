//! The CPU reference decoder: HF transformers' Qwen3 forward, one token at a time, in f32 over
//! the bf16 weights, built only from [`super::ops`]. It is the yardstick the GPU engine is
//! checked against and a (slow) backend in its own right.

use super::ops;
use super::sampling::Sampler;
use super::Weights;
use crate::backend::{check_request, stop_after, Backend, Generation, SamplingParams, StopReason};
use anyhow::{bail, ensure};
use half::bf16;
use std::sync::Arc;

pub struct CpuReference {
    weights: Arc<Weights>,
    max_context: usize,
    /// Round each key and value to bf16 as it enters the cache, as the GPU (whose KV cache is
    /// bf16) does; off by default, which matches HF running in f32.
    pub round_kv_to_bf16: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Per layer, position-major `[len][kv_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

fn widen_row(row: &[bf16]) -> Vec<f32> {
    row.iter().map(|w| w.to_f32()).collect()
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl CpuReference {
    pub fn new(weights: Arc<Weights>, max_context: usize) -> Self {
        let c = &weights.config;
        let (cos, sin) = ops::rope_table(c.rope_theta, c.head_dim, max_context);
        let layers = c.num_hidden_layers;
        CpuReference {
            weights,
            max_context,
            round_kv_to_bf16: false,
            cos,
            sin,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            len: 0,
        }
    }

    /// Builder form of [`CpuReference::round_kv_to_bf16`].
    pub fn with_bf16_kv(mut self, on: bool) -> Self {
        self.round_kv_to_bf16 = on;
        self
    }

    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    /// Empties the KV cache; the next token is position 0.
    pub fn reset(&mut self) {
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            cache.clear();
        }
        self.len = 0;
    }

    /// Replaces the KV cache with `cache` (e.g. [`super::prefill::prefill_forward`]'s): per
    /// layer, position-major `[len][kv_dim]`, the same length in every layer and at most the
    /// context. The next token is then position `len`.
    pub fn load_kv_cache(&mut self, cache: super::prefill::PrefillCache) -> anyhow::Result<()> {
        let c = &self.weights.config;
        let kv_dim = c.kv_dim();
        let layers = c.num_hidden_layers;
        ensure!(cache.keys.len() == layers && cache.values.len() == layers, "a KV cache of another layer count");
        let len = cache.keys[0].len() / kv_dim;
        for v in cache.keys.iter().chain(&cache.values) {
            ensure!(v.len() == len * kv_dim, "KV cache layers of different lengths, or not whole positions");
        }
        ensure!(len <= self.max_context, "a KV cache of {len} positions is beyond the context of {}", self.max_context);
        self.keys = cache.keys;
        self.values = cache.values;
        self.len = len;
        Ok(())
    }

    /// Positions currently in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `token` at position `pos` (which must be the number of tokens already cached) and
    /// returns the logits. Panics on misuse; [`CpuReference::try_forward`] returns an error
    /// instead.
    pub fn forward(&mut self, token: u32, pos: usize) -> Vec<f32> {
        self.try_forward(token, pos).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_forward(&mut self, token: u32, pos: usize) -> anyhow::Result<Vec<f32>> {
        self.step(token, pos, true).map(|l| l.expect("logits requested"))
    }

    /// One decoder step; the LM head (the single largest matrix) is skipped when the logits are
    /// not wanted, e.g. for all but the last prompt token.
    fn step(&mut self, token: u32, pos: usize, want_logits: bool) -> anyhow::Result<Option<Vec<f32>>> {
        let w = Arc::clone(&self.weights);
        let c = &w.config;
        ensure!((token as usize) < c.vocab_size, "token id {token} is out of range (vocab size {})", c.vocab_size);
        ensure!(pos == self.len, "position {pos} given but {} positions are cached", self.len);
        ensure!(pos < self.max_context, "position {pos} is beyond the context of {} tokens", self.max_context);
        let (hidden, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
        let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let half = d / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];

        let t = token as usize;
        let mut x = widen_row(&w.embed_tokens[t * hidden..(t + 1) * hidden]);
        for (l, lw) in w.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &lw.input_layernorm, eps);
            let mut q = ops::gemv(&lw.q_proj, q_dim, hidden, &h);
            let mut k = ops::gemv(&lw.k_proj, kv_dim, hidden, &h);
            let mut v = ops::gemv(&lw.v_proj, kv_dim, hidden, &h);
            for head in q.chunks_exact_mut(d) {
                ops::head_norm_rope(head, &lw.q_norm, eps, cos, sin);
            }
            for head in k.chunks_exact_mut(d) {
                ops::head_norm_rope(head, &lw.k_norm, eps, cos, sin);
            }
            if self.round_kv_to_bf16 {
                for value in k.iter_mut().chain(v.iter_mut()) {
                    *value = ops::round_bf16(*value);
                }
            }
            self.keys[l].extend_from_slice(&k);
            self.values[l].extend_from_slice(&v);
            let attn = ops::attention(
                &q,
                &self.keys[l],
                &self.values[l],
                c.num_attention_heads,
                c.num_key_value_heads,
                d,
                pos + 1,
            );
            add_into(&mut x, &ops::gemv(&lw.o_proj, hidden, q_dim, &attn));

            let h = ops::rms_norm(&x, &lw.post_attention_layernorm, eps);
            let gate = ops::gemv(&lw.gate_proj, inter, hidden, &h);
            let up = ops::gemv(&lw.up_proj, inter, hidden, &h);
            let act = ops::silu_mul(&gate, &up);
            add_into(&mut x, &ops::gemv(&lw.down_proj, hidden, inter, &act));
        }
        self.len += 1;
        if !want_logits {
            return Ok(None);
        }
        let xn = ops::rms_norm(&x, &w.norm, eps);
        Ok(Some(ops::gemv(w.lm_head(), c.vocab_size, hidden, &xn)))
    }
}

impl Backend for CpuReference {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn decode(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampling: &SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> anyhow::Result<Generation> {
        check_request("prompt", prompt, max_new, self.weights.config.vocab_size, self.max_context)?;
        self.reset();
        let mut tokens = Vec::new();
        if max_new == 0 {
            return Ok(Generation { tokens, stop: StopReason::MaxNewTokens });
        }
        let last = prompt.len() - 1;
        for (pos, &t) in prompt[..last].iter().enumerate() {
            self.step(t, pos, false)?;
        }
        let mut logits = self.try_forward(prompt[last], last)?;
        let mut sampler = Sampler::new(*sampling);
        loop {
            let next = sampler.sample(&logits);
            tokens.push(next);
            if let Some(stop) = stop_after(next, on_token(next), tokens.len(), max_new, eos) {
                return Ok(Generation { tokens, stop });
            }
            logits = self.try_forward(next, self.len)?;
        }
    }

    fn score(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        check_request("text", tokens, 0, self.weights.config.vocab_size, self.max_context)?;
        self.reset();
        let mut nll = Vec::with_capacity(tokens.len().saturating_sub(1));
        for (pos, pair) in tokens.windows(2).enumerate() {
            let logits = self.try_forward(pair[0], pos)?;
            nll.push(-ops::log_softmax_at(&logits, pair[1] as usize));
        }
        Ok(nll)
    }

    fn logits(&mut self, tokens: &[u32], positions: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
        check_request("text", tokens, 0, self.weights.config.vocab_size, self.max_context)?;
        ensure!(positions.windows(2).all(|p| p[0] < p[1]), "logit positions must be strictly ascending");
        if let Some(&p) = positions.iter().find(|&&p| p >= tokens.len()) {
            bail!("logit position {p} is beyond the {} tokens given", tokens.len());
        }
        self.reset();
        let mut rows = Vec::with_capacity(positions.len());
        let end = positions.last().map_or(0, |&p| p + 1);
        let mut wanted = positions.iter().peekable();
        for (pos, &t) in tokens[..end].iter().enumerate() {
            let want = wanted.peek() == Some(&&pos);
            if let Some(row) = self.step(t, pos, want)? {
                rows.push(row);
                wanted.next();
            }
        }
        Ok(rows)
    }
}
