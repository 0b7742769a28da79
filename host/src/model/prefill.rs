//! CPU twins of the prefill kernels (kernel/src/ops/prefill.rs): the same operations on a
//! chunk of positions, with the GPU's roundings to bf16 (the GEMMs' inputs and the KV cache)
//! made explicit, and otherwise the reference's f32 maths ([`super::ops`]). The GPU unit tests
//! compare each kernel with its twin.

use super::ops;
use half::bf16;

/// The attention heads' shape and the KV cache's: the cache is bf16
/// `[n_kv_heads, max_ctx, head_dim]` per layer, the decode kernel's layout.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub max_ctx: usize,
}

impl HeadShape {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Elements of one layer's K (or V) cache.
    pub fn cache_len(&self) -> usize {
        self.n_kv_heads * self.max_ctx * self.head_dim
    }
    /// Index in the cache of kv head `h`'s row at position `pos`.
    pub fn cache_index(&self, h: usize, pos: usize) -> usize {
        (h * self.max_ctx + pos) * self.head_dim
    }
}

/// `rows` rows of `weight.len()` values: each RMSNormed ([`ops::rms_norm`]) and rounded to
/// bf16, the GEMM's A (`prefill_rms_norm`).
pub fn rms_norm_rows_bf16(x: &[f32], weight: &[bf16], eps: f32) -> Vec<bf16> {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rms_norm_rows_bf16: x is not whole rows of the weight's length");
    x.chunks_exact(n).flat_map(|row| ops::rms_norm(row, weight, eps)).map(bf16::from_f32).collect()
}

/// `bf16(silu(gate) * up)` elementwise (`prefill_silu_mul`).
pub fn silu_mul_bf16(gate: &[f32], up: &[f32]) -> Vec<bf16> {
    ops::silu_mul(gate, up).into_iter().map(bf16::from_f32).collect()
}

/// `x += deltas[0] + deltas[1] + ...` elementwise, the deltas summed in that order first
/// (`prefill_add`, which sums a split-K GEMM's partial products into the residual stream):
/// bit for bit what the GPU computes.
pub fn add_parts(x: &mut [f32], deltas: &[f32]) {
    let n = x.len();
    assert!(
        n > 0 && deltas.len().is_multiple_of(n) && !deltas.is_empty(),
        "add_parts: deltas are not whole parts of x"
    );
    for (i, xi) in x.iter_mut().enumerate() {
        let mut sum = deltas[i];
        for part in deltas.chunks_exact(n).skip(1) {
            sum += part[i];
        }
        *xi += sum;
    }
}

/// `prefill_qk_rope_hd*`: for each of the `rows` rows of `qkv` (`[q_dim + 2 kv_dim]` each,
/// q then k then v), position `start_pos + row`: q heads get q_norm + RoPE (returned,
/// `[rows, q_dim]` f32), k heads k_norm + RoPE and v heads nothing, both rounded to bf16 into
/// the caches at that position. `cos`/`sin` are the whole tables (`[positions][head_dim/2]`).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_append(
    qkv: &[f32],
    start_pos: usize,
    s: &HeadShape,
    q_norm: &[bf16],
    k_norm: &[bf16],
    eps: f32,
    cos: &[f32],
    sin: &[f32],
    k_cache: &mut [bf16],
    v_cache: &mut [bf16],
) -> Vec<f32> {
    let (d, q_dim, kv_dim) = (s.head_dim, s.q_dim(), s.kv_dim());
    let width = q_dim + 2 * kv_dim;
    assert!(qkv.len().is_multiple_of(width), "qk_norm_rope_append: qkv is not whole rows");
    let rows = qkv.len() / width;
    assert!(start_pos + rows <= s.max_ctx, "qk_norm_rope_append: positions beyond the cache");
    assert!(k_cache.len() == s.cache_len() && v_cache.len() == s.cache_len(), "qk_norm_rope_append: cache size");
    let half = d / 2;
    let mut q_out = Vec::with_capacity(rows * q_dim);
    for (r, row) in qkv.chunks_exact(width).enumerate() {
        let pos = start_pos + r;
        let (c, sn) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        let mut q = row[..q_dim].to_vec();
        for head in q.chunks_exact_mut(d) {
            ops::head_norm_rope(head, q_norm, eps, c, sn);
        }
        q_out.extend(q.iter().map(|&v| ops::round_bf16(v)));
        for h in 0..s.n_kv_heads {
            let mut k = row[q_dim + h * d..q_dim + (h + 1) * d].to_vec();
            ops::head_norm_rope(&mut k, k_norm, eps, c, sn);
            let v = &row[q_dim + kv_dim + h * d..q_dim + kv_dim + (h + 1) * d];
            let at = s.cache_index(h, pos);
            for i in 0..d {
                k_cache[at + i] = bf16::from_f32(k[i]);
                v_cache[at + i] = bf16::from_f32(v[i]);
            }
        }
    }
    q_out
}

/// `prefill_attention_hd*`: each of the `q.len() / q_dim` rows of `q` (position
/// `start_pos + row`) attends causally over cache positions `0 ..= start_pos + row`
/// ([`ops::attention`], GQA, softmax in f64). Returns `[rows, q_dim]` in f32; the GPU rounds
/// the same values to bf16, and its tensor cores also take the softmax weights as bf16 (the
/// one rounding the twin leaves out: an error of about 2^-9 of each weight, averaged over the
/// keys).
pub fn causal_attention(q: &[f32], start_pos: usize, s: &HeadShape, k_cache: &[bf16], v_cache: &[bf16]) -> Vec<f32> {
    let (d, q_dim, kv_dim) = (s.head_dim, s.q_dim(), s.kv_dim());
    assert!(q.len().is_multiple_of(q_dim), "causal_attention: q is not whole rows");
    let rows = q.len() / q_dim;
    let len = start_pos + rows;
    assert!(len <= s.max_ctx, "causal_attention: positions beyond the cache");
    // The cache position-major, as ops::attention takes it: [len][kv_dim].
    let (mut keys, mut values) = (vec![0.0f32; len * kv_dim], vec![0.0f32; len * kv_dim]);
    for pos in 0..len {
        for h in 0..s.n_kv_heads {
            let at = s.cache_index(h, pos);
            for i in 0..d {
                keys[pos * kv_dim + h * d + i] = k_cache[at + i].to_f32();
                values[pos * kv_dim + h * d + i] = v_cache[at + i].to_f32();
            }
        }
    }
    let mut out = Vec::with_capacity(rows * q_dim);
    for (r, qr) in q.chunks_exact(q_dim).enumerate() {
        let n = start_pos + r + 1;
        out.extend(ops::attention(qr, &keys, &values, s.n_heads, s.n_kv_heads, d, n));
    }
    out
}

/// The KV cache a prefill leaves, per layer position-major `[len][kv_dim]` (as
/// [`super::reference::CpuReference`] keeps it), every value already rounded to bf16.
pub struct PrefillCache {
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    /// The residual stream after the last layer, position-major `[len][hidden]` f32: what the
    /// final norm and the LM head read when a text is scored through prefill
    /// ([`super::score::score_through_prefill`]).
    pub hidden: Vec<f32>,
}

/// The CPU twin of the GPU engine's whole prefill (host/src/engine/prefill.rs) from position
/// 0: `tokens` in chunks of `chunk`, each layer's activations rounded to bf16 wherever the GPU
/// hands them to a GEMM (the normed rows, the attention output, SiLU * up), K and V rounded as
/// the cache stores them. Its cache, loaded into the CPU reference
/// ([`super::reference::CpuReference::load_kv_cache`]), gives the logits the GPU's prefill plus
/// one megakernel step should approach (up to summation order and approximate exp/rsqrt).
pub fn prefill_forward(w: &super::Weights, tokens: &[u32], chunk: usize, max_context: usize) -> PrefillCache {
    let c = &w.config;
    assert!(chunk >= 1 && tokens.len() <= max_context, "prefill_forward: bad chunk or too many tokens");
    let (hidden, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
    let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
    let (cos, sin) = ops::rope_table(c.rope_theta, d, max_context.max(1));
    let half = d / 2;
    let layers = c.num_hidden_layers;
    let mut cache =
        PrefillCache { keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers], hidden: Vec::new() };
    for (ci, ids) in tokens.chunks(chunk).enumerate() {
        let (p0, m) = (ci * chunk, ids.len());
        let mut x: Vec<f32> = ids
            .iter()
            .flat_map(|&t| w.embed_tokens[t as usize * hidden..(t as usize + 1) * hidden].iter().map(|b| b.to_f32()))
            .collect();
        for (l, lw) in w.layers.iter().enumerate() {
            let h = rms_norm_rows_bf16(&x, &lw.input_layernorm, eps);
            let q_all = ops::gemm_bf16(&h, &lw.q_proj, m, q_dim, hidden);
            let k_all = ops::gemm_bf16(&h, &lw.k_proj, m, kv_dim, hidden);
            let v_all = ops::gemm_bf16(&h, &lw.v_proj, m, kv_dim, hidden);
            let mut q_rows = Vec::with_capacity(m * q_dim);
            for r in 0..m {
                let pos = p0 + r;
                let (cr, sr) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
                let mut q = q_all[r * q_dim..(r + 1) * q_dim].to_vec();
                for head in q.chunks_exact_mut(d) {
                    ops::head_norm_rope(head, &lw.q_norm, eps, cr, sr);
                }
                q_rows.push(q.iter().map(|&v| ops::round_bf16(v)).collect::<Vec<f32>>());
                let mut k = k_all[r * kv_dim..(r + 1) * kv_dim].to_vec();
                for head in k.chunks_exact_mut(d) {
                    ops::head_norm_rope(head, &lw.k_norm, eps, cr, sr);
                }
                cache.keys[l].extend(k.iter().map(|&v| ops::round_bf16(v)));
                cache.values[l].extend(v_all[r * kv_dim..(r + 1) * kv_dim].iter().map(|&v| ops::round_bf16(v)));
            }
            let mut attn = Vec::with_capacity(m * q_dim);
            for (r, q) in q_rows.iter().enumerate() {
                let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
                let a = ops::attention(q, &cache.keys[l], &cache.values[l], heads, kv_heads, d, p0 + r + 1);
                attn.extend(a.into_iter().map(bf16::from_f32));
            }
            let o = ops::gemm_bf16(&attn, &lw.o_proj, m, hidden, q_dim);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm_rows_bf16(&x, &lw.post_attention_layernorm, eps);
            let gate = ops::gemm_bf16(&h, &lw.gate_proj, m, inter, hidden);
            let up = ops::gemm_bf16(&h, &lw.up_proj, m, inter, hidden);
            let act = silu_mul_bf16(&gate, &up);
            let down = ops::gemm_bf16(&act, &lw.down_proj, m, hidden, inter);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        cache.hidden.extend_from_slice(&x);
    }
    cache
}
