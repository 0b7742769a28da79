//! The prefill kernels (kernel/src/ops/prefill.rs) on the GPU against their CPU twins
//! (host::model::prefill), through the launchers the engine uses (host::gpu::prefill), on
//! random data, at chunk and cache boundaries: one-row chunks, chunk tails, chunks that start
//! past position 0 and chunks that end at the cache's last position; GQA groups 2 and 4 and
//! head_dim 32, 64 and 128. Outputs start as NaN, so an element a kernel forgot fails.
//!
//! Tolerances: values the GPU rounds to bf16 (the norm's rows, SiLU * up, q, K, attention) may
//! sit one bf16 step (2^-8 relative) from the CPU's rounding of its own f32, whose last bits
//! differ (approximate rsqrt/exp2, summation order); V is stored unchanged, so bit-exact.
//! Attention's tensor cores also take the softmax weights as bf16, which its twin does not:
//! each weight off by up to 2^-9 of itself moves an output by at most 2^-9 of the largest
//! |v| (`within_attention`).

mod common;
use common::{bits, download, download_bf16, dptr, finish, gpu, rel_err, Rng};
use cust::memory::DeviceBuffer;
use half::bf16;
use host::engine::abi::PrefillAttentionParams;
use host::gpu::{prefill, Gpu};
use host::model::ops;
use host::model::prefill::{self as twin, HeadShape};

/// `got` (a GPU value rounded to bf16) against the CPU's f32 `want`: within one bf16 step of
/// it plus `abs` (what the two sides' f32 may differ by before rounding). NaN never passes.
fn within_bf16_step(got: f32, want: f32, abs: f32) -> bool {
    (got - want).abs() <= want.abs() / 128.0 + abs
}

/// An attention output `got` (bf16, from bf16 softmax weights) against the twin's `want`
/// (exact weights), for values |v| <= `v_max`: one bf16 step of the output, plus what the
/// weights' rounding can move it (2^-9 v_max), plus `abs`.
fn within_attention(got: f32, want: f32, v_max: f32, abs: f32) -> bool {
    within_bf16_step(got, want, v_max / 512.0 + abs)
}

/// NaN as bf16 bits: the poison of bf16 outputs and of cache rows no kernel may read.
const NAN_BF16: u16 = 0x7fc0;

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_rms_norm_rows_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng(101);
    // One row (M = 1), a chunk tail, a chunk of Qwen3-0.6B's hidden size; a tiny-model row.
    for (rows, n) in [(1usize, 1024usize), (5, 1024), (37, 1024), (16, 64), (3, 200)] {
        let x = rng.vec(rows * n, 3.0);
        let w = rng.bf16s(n, 1.5);
        let (dx, dw) = (gpu.upload(&x, "x").unwrap(), gpu.upload(&bits(&w), "w").unwrap());
        let out = gpu.upload(&vec![NAN_BF16; rows * n], "out").unwrap();
        unsafe { prefill::rms_norm_rows(&gpu, dptr(&dx), dptr(&dw), rows, n, 1e-6, dptr(&out)) }.unwrap();
        finish(&gpu, "prefill_rms_norm");
        let got = download_bf16(&out);
        let want = twin::rms_norm_rows_bf16(&x, &w, 1e-6);
        for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
            assert!(within_bf16_step(g, w.to_f32(), 1e-6), "rms_norm rows={rows} n={n} [{i}]: gpu {g}, cpu {w}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_embed_add_and_add_rms_norm_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng(102);
    // Embedding: rows of the table, exactly.
    let (vocab, hidden, rows) = (300usize, 64usize, 7usize);
    let table = rng.bf16s(vocab * hidden, 1.0);
    let tokens: Vec<u32> = (0..rows).map(|i| ((i * 97 + 5) % vocab) as u32).collect();
    let (dt, dtok) = (gpu.upload(&bits(&table), "embed").unwrap(), gpu.upload(&tokens, "tokens").unwrap());
    let x = gpu.upload(&vec![f32::NAN; rows * hidden], "x").unwrap();
    unsafe { prefill::embed(&gpu, dptr(&dt), dptr(&dtok), rows, hidden, dptr(&x)) }.unwrap();
    finish(&gpu, "prefill_embed");
    let got = download(&x);
    for (r, &t) in tokens.iter().enumerate() {
        for c in 0..hidden {
            assert_eq!(got[r * hidden + c], table[t as usize * hidden + c].to_f32(), "embed row {r} col {c}");
        }
    }

    // The residual add, alone and with the next norm, at a chunk of Qwen3-0.6B's hidden size
    // and at a ragged count.
    for n in [37 * 1024usize, 1001] {
        // x += the sum of 1, 3 or 8 deltas: f32 additions in a fixed order, exact to the bit.
        for parts in [1usize, 3, 8] {
            let (a, d) = (rng.vec(n, 2.0), rng.vec(n * parts, 2.0));
            let (da, dd) = (gpu.upload(&a, "x").unwrap(), gpu.upload(&d, "deltas").unwrap());
            unsafe { prefill::add(&gpu, dptr(&da), dptr(&dd), n, parts) }.unwrap();
            finish(&gpu, "prefill_add");
            let mut want = a.clone();
            twin::add_parts(&mut want, &d);
            assert_eq!(download(&da), want, "prefill_add n={n} parts={parts}");
        }
    }
    // x += deltas then RMSNorm of the rows: x exactly as add_parts, the rows within a bf16 step.
    for (rows, width, parts) in [(37usize, 1024usize, 4usize), (3, 64, 1), (130, 1024, 8)] {
        let (a, d) = (rng.vec(rows * width, 2.0), rng.vec(rows * width * parts, 1.0));
        let w = rng.bf16s(width, 1.5);
        let (da, dd) = (gpu.upload(&a, "x").unwrap(), gpu.upload(&d, "deltas").unwrap());
        let dw = gpu.upload(&bits(&w), "norm weight").unwrap();
        let out = gpu.upload(&vec![NAN_BF16; rows * width], "normed").unwrap();
        unsafe { prefill::add_rms_norm(&gpu, dptr(&da), dptr(&dd), parts, dptr(&dw), rows, width, 1e-6, dptr(&out)) }
            .unwrap();
        finish(&gpu, "prefill_add_rms_norm");
        let mut want_x = a.clone();
        twin::add_parts(&mut want_x, &d);
        let what = format!("prefill_add_rms_norm rows={rows} width={width} parts={parts}");
        assert_eq!(download(&da), want_x, "{what}: x");
        let want = twin::rms_norm_rows_bf16(&want_x, &w, 1e-6);
        for (i, (&g, w)) in download_bf16(&out).iter().zip(&want).enumerate() {
            assert!(within_bf16_step(g, w.to_f32(), 1e-5), "{what} [{}, {}]: gpu {g}, cpu {w}", i / width, i % width);
        }
    }
}

/// The MLP's gate and up GEMMs with SiLU(gate) * up in the epilogue (`gemm_gate_up_silu`)
/// against the twin: the two CPU GEMMs, then `silu_mul_bf16`. Each product within the GEMM's
/// tolerance (1e-4 of the sum of |a w|, as tests/gpu_ops.rs states it) moves the output by at
/// most `|silu'| <= 1.1` times the gate's error times |up| plus |silu(gate)| times the up's
/// error; plus the output's bf16 step. Shapes: M = 1, tails, Qwen3-0.6B's MLP, the tiny one.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_gate_up_silu_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(104);
    for (m, inter, k) in [(1usize, 3072usize, 1024usize), (130, 3072, 1024), (257, 128, 64), (64, 32, 96)] {
        let a = rng.bf16s(m * k, 1.0);
        let (wg, wu) = (rng.bf16s(inter * k, 0.1), rng.bf16s(inter * k, 0.1));
        let da = gpu.upload(&bits(&a), "A").unwrap();
        let (dg, du) = (gpu.upload(&bits(&wg), "W_gate").unwrap(), gpu.upload(&bits(&wu), "W_up").unwrap());
        let dact = gpu.upload(&vec![NAN_BF16; m * inter], "act").unwrap();
        unsafe { host::gpu::gemm_gate_up_silu_raw(&gpu, dptr(&da), dptr(&dg), dptr(&du), dptr(&dact), m, inter, k) }
            .unwrap();
        finish(&gpu, "gemm_gate_up_silu");
        let (gate, up) = (ops::gemm_bf16(&a, &wg, m, inter, k), ops::gemm_bf16(&a, &wu, m, inter, k));
        let abs = |x: &[bf16]| -> Vec<bf16> { x.iter().map(|v| bf16::from_f32(v.to_f32().abs())).collect() };
        let abs_a = abs(&a);
        let (sg, su) = (ops::gemm_bf16(&abs_a, &abs(&wg), m, inter, k), ops::gemm_bf16(&abs_a, &abs(&wu), m, inter, k));
        let want = twin::silu_mul_bf16(&gate, &up);
        let silu = |g: f32| g / (1.0 + (-g).exp());
        for (i, (&got, w)) in download_bf16(&dact).iter().zip(&want).enumerate() {
            let (eg, eu) = (1e-4 * sg[i], 1e-4 * su[i]);
            let moved = 1.1 * eg * (up[i].abs() + eu) + silu(gate[i]).abs() * eu;
            assert!(
                within_bf16_step(got, w.to_f32(), moved + 1e-6),
                "gemm_gate_up_silu {m}x{inter}x{k} [{}, {}]: gpu {got}, cpu {w} (gate {}, up {})",
                i / inter,
                i % inter,
                gate[i],
                up[i]
            );
        }
    }
    // 2 x inter must be a multiple of the GEMM's tile width (64).
    let e = unsafe { host::gpu::gemm_gate_up_silu_raw(&gpu, 0, 0, 0, 0, 4, 48, 64) }.unwrap_err();
    assert!(format!("{e:#}").contains("multiple of"), "{e:#}");
}

/// The GEMM with K split (what the o and down projections run, `residual_splits`): each
/// split's slice of C is the product of its columns of A and W, within the GEMM's tolerance
/// (as tests/gpu_ops.rs states it: 1e-4 of the sum of |a w|), and nothing past the last slice
/// is written. Shapes: M = 1, a tail past a tile, N = hidden and narrow, K of o and down.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_split_k_slices_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng(103);
    for (m, n, k, splits) in
        [(1usize, 1024usize, 2048usize, 8usize), (130, 1024, 3072, 4), (257, 64, 1024, 2), (64, 128, 256, 8)]
    {
        let (a, w) = (rng.bf16s(m * k, 1.0), rng.bf16s(n * k, 1.0));
        let (da, dw) = (gpu.upload(&bits(&a), "A").unwrap(), gpu.upload(&bits(&w), "W").unwrap());
        // One slice more than the launch writes: it must stay NaN.
        let dc = gpu.upload(&vec![f32::NAN; (splits + 1) * m * n], "C").unwrap();
        unsafe { host::gpu::gemm_bf16_split_raw(&gpu, dptr(&da), dptr(&dw), dptr(&dc), m, n, k, splits) }.unwrap();
        finish(&gpu, "gemm_bf16 (split K)");
        let got = download(&dc);
        let kl = k / splits;
        let columns = |x: &[bf16], rows: usize, s: usize| -> Vec<bf16> {
            (0..rows).flat_map(|r| x[r * k + s * kl..r * k + (s + 1) * kl].iter().copied()).collect()
        };
        let abs = |x: &[bf16]| -> Vec<bf16> { x.iter().map(|v| bf16::from_f32(v.to_f32().abs())).collect() };
        for s in 0..splits {
            let (sa, sw) = (columns(&a, m, s), columns(&w, n, s));
            let want = ops::gemm_bf16(&sa, &sw, m, n, kl);
            let scale = ops::gemm_bf16(&abs(&sa), &abs(&sw), m, n, kl);
            for i in 0..m * n {
                let g = got[s * m * n + i];
                assert!(
                    g.is_finite() && (g - want[i]).abs() as f64 <= 1e-4 * scale[i] as f64 + 1e-30,
                    "gemm {m}x{n}x{k} split {s} of {splits} [{}, {}]: gpu {g}, cpu {}",
                    i / n,
                    i % n,
                    want[i]
                );
            }
        }
        assert!(got[splits * m * n..].iter().all(|v| v.is_nan()), "gemm {m}x{n}x{k}: wrote past its {splits} slices");
        let e = unsafe { host::gpu::gemm_bf16_split_raw(&gpu, dptr(&da), dptr(&dw), dptr(&dc), m, n, k, 3) };
        assert!(k % 96 == 0 || e.is_err(), "gemm {m}x{n}x{k}: 3 splits of K should be refused");
    }
}

/// Random inputs of the head kernels for `rows` chunk rows at positions `start ..`: q/k/v rows
/// (within 3), q/k norm weights, the RoPE tables, and K/V caches holding random rows (within 2)
/// before `start`, as earlier chunks would have left them, and NaN from `start` on.
struct HeadInputs {
    qkv: Vec<f32>,
    qn: Vec<bf16>,
    kn: Vec<bf16>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    kc: Vec<bf16>,
    vc: Vec<bf16>,
}

impl HeadInputs {
    fn random(rng: &mut Rng, s: &HeadShape, rows: usize, start: usize) -> HeadInputs {
        let d = s.head_dim;
        let qkv = rng.vec(rows * (s.q_dim() + 2 * s.kv_dim()), 3.0);
        let (qn, kn) = (rng.bf16s(d, 1.5), rng.bf16s(d, 1.5));
        let (cos, sin) = ops::rope_table(1e6, d, s.max_ctx);
        let mut kc = vec![bf16::from_bits(NAN_BF16); s.cache_len()];
        let mut vc = kc.clone();
        for h in 0..s.n_kv_heads {
            for p in 0..start {
                for i in 0..d {
                    kc[s.cache_index(h, p) + i] = bf16::from_f32(rng.uniform(-2.0, 2.0));
                    vc[s.cache_index(h, p) + i] = bf16::from_f32(rng.uniform(-2.0, 2.0));
                }
            }
        }
        HeadInputs { qkv, qn, kn, cos, sin, kc, vc }
    }

    /// The q/k/v rows, norm weights and RoPE tables on the GPU (the caches, which each test
    /// uploads as it needs them, are left out).
    fn upload(&self, gpu: &Gpu) -> HeadBuffers {
        HeadBuffers {
            qkv: gpu.upload(&self.qkv, "qkv").unwrap(),
            q_norm: gpu.upload(&bits(&self.qn), "q_norm").unwrap(),
            k_norm: gpu.upload(&bits(&self.kn), "k_norm").unwrap(),
            cos: gpu.upload(&self.cos, "cos").unwrap(),
            sin: gpu.upload(&self.sin, "sin").unwrap(),
        }
    }
}

/// `HeadInputs::upload`'s buffers.
struct HeadBuffers {
    qkv: DeviceBuffer<f32>,
    q_norm: DeviceBuffer<u16>,
    k_norm: DeviceBuffer<u16>,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
}

/// One chunk of `rows` positions from `start` through q/k norm + RoPE (with the K/V append)
/// and causal attention, against the twins. Cache rows before `start` hold random values (as
/// earlier chunks would have left them), rows from `start + rows` on hold NaN: attention
/// reading one of those, or a later position of its own chunk (the causal mask), fails.
fn chunk_case(gpu: &Gpu, s: HeadShape, start: usize, rows: usize, seed: u64) {
    let mut rng = Rng(seed);
    let what = format!(
        "heads {}/{} d={} start={start} rows={rows} max_ctx={}",
        s.n_heads, s.n_kv_heads, s.head_dim, s.max_ctx
    );
    let (d, q_dim) = (s.head_dim, s.q_dim());
    let inputs = HeadInputs::random(&mut rng, &s, rows, start);
    let dev = inputs.upload(gpu);
    let HeadInputs { qkv, qn, kn, cos, sin, kc, vc } = inputs;
    let (dkc, dvc) = (gpu.upload(&bits(&kc), "k cache").unwrap(), gpu.upload(&bits(&vc), "v cache").unwrap());
    let dq = gpu.upload(&vec![NAN_BF16; rows * q_dim], "q").unwrap();
    let dout = gpu.upload(&vec![NAN_BF16; rows * q_dim], "attention out").unwrap();
    let p = PrefillAttentionParams {
        qkv: dptr(&dev.qkv),
        q_norm: dptr(&dev.q_norm),
        k_norm: dptr(&dev.k_norm),
        rope_cos: dptr(&dev.cos),
        rope_sin: dptr(&dev.sin),
        k_cache: dptr(&dkc),
        v_cache: dptr(&dvc),
        q: dptr(&dq),
        out: dptr(&dout),
        rows: rows as u32,
        start_pos: start as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: d as u32,
        max_ctx: s.max_ctx as u32,
        eps: 1e-6,
        _pad: 0,
    };
    unsafe { prefill::qk_rope(gpu, &p) }.unwrap();
    finish(gpu, "prefill_qk_rope");
    let gpu_q = download_bf16(&dq);
    let (gpu_kc, gpu_vc) = (download(&dkc), download(&dvc));

    // q/k norm + RoPE and the append.
    let (mut want_kc, mut want_vc) = (kc.clone(), vc.clone());
    let want_q = twin::qk_norm_rope_append(&qkv, start, &s, &qn, &kn, 1e-6, &cos, &sin, &mut want_kc, &mut want_vc);
    for (i, (&g, &w)) in gpu_q.iter().zip(&want_q).enumerate() {
        assert!(within_bf16_step(g, w, 1e-6), "{what}: q row {} [{}]: gpu {g}, cpu {w}", i / q_dim, i % q_dim);
    }
    for i in 0..s.cache_len() {
        let (g, w) = (bf16::from_bits(gpu_kc[i]).to_f32(), want_kc[i].to_f32());
        let (h, pos) = (i / d / s.max_ctx, i / d % s.max_ctx);
        if (start..start + rows).contains(&pos) {
            assert!(within_bf16_step(g, w, 1e-6), "{what}: K cache head {h} pos {pos} [{}]: gpu {g}, cpu {w}", i % d);
        } else {
            assert_eq!(gpu_kc[i], want_kc[i].to_bits(), "{what}: K cache head {h} pos {pos} changed");
        }
        assert_eq!(gpu_vc[i], want_vc[i].to_bits(), "{what}: V cache head {h} pos {pos} [{}]", i % d);
    }

    // Attention, from the GPU's own q and cache, so that this checks the attention kernel alone.
    unsafe { prefill::attention(gpu, &p) }.unwrap();
    finish(gpu, "prefill_attention");
    let gpu_kc: Vec<bf16> = gpu_kc.into_iter().map(bf16::from_bits).collect();
    let gpu_vc: Vec<bf16> = gpu_vc.into_iter().map(bf16::from_bits).collect();
    let want = twin::causal_attention(&gpu_q, start, &s, &gpu_kc, &gpu_vc);
    let got = download_bf16(&dout);
    // |v| <= 3: the chunk's own rows come from `qkv` (within 3), earlier ones within 2.
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let (r, col) = (i / q_dim, i % q_dim);
        assert!(
            within_attention(g, w, 3.0, 1e-5),
            "{what}: attention row {r} (position {}) head {} [{}]: gpu {g}, cpu {w}",
            start + r,
            col / d,
            col % d
        );
    }
    let err = rel_err(&got, &want);
    eprintln!("{what}: attention relative error {err:.2e}");
    assert!(err < 4e-3, "{what}: attention relative error {err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_attention_chunks_match_cpu() {
    let gpu = gpu();
    let shape = |n_heads, n_kv_heads, head_dim, max_ctx| HeadShape { n_heads, n_kv_heads, head_dim, max_ctx };
    // (shape, start, rows): a first chunk, M = 1 at 0 and later, a tail after full chunks, a
    // chunk ending at the cache's last position, and a long context.
    let cases = [
        (shape(16, 8, 128, 4096), 0, 16), // Qwen3-0.6B: group 2, head_dim 128
        (shape(16, 8, 128, 4096), 37, 1),
        (shape(16, 8, 128, 4096), 1000, 37),
        (shape(8, 2, 128, 64), 48, 16), // group 4, ends at max_ctx
        (shape(4, 2, 32, 64), 0, 1),    // the tiny model: group 2, head_dim 32
        (shape(4, 2, 32, 64), 32, 5),
        (shape(4, 1, 32, 64), 16, 16),   // group 4, head_dim 32
        (shape(16, 4, 64, 128), 0, 37),  // group 4, head_dim 64
        (shape(8, 4, 64, 128), 100, 28), // group 2, head_dim 64, ends at max_ctx
        // Several tiles of 64 rows (the last one partial) and of 64 keys.
        (shape(16, 8, 128, 1024), 0, 130),
        (shape(16, 8, 128, 1024), 100, 200),
        (shape(4, 2, 32, 256), 3, 150),
        (shape(8, 2, 64, 256), 64, 192), // group 4, tiles aligned to the chunk, ends at max_ctx
    ];
    for (seed, (s, start, rows)) in (200..).zip(cases) {
        chunk_case(&gpu, s, start, rows, seed);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_launchers_refuse_bad_chunks() {
    let gpu = gpu();
    let base = PrefillAttentionParams {
        rows: 4,
        start_pos: 60,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        max_ctx: 64,
        ..Default::default()
    };
    // Positions 60..64 fit a cache of 64; nothing is launched on these null addresses because
    // each case below is refused first.
    for (p, why) in [
        (PrefillAttentionParams { rows: 5, ..base }, "beyond the KV cache"),
        (PrefillAttentionParams { head_dim: 96, ..base }, "has no entry"),
        (PrefillAttentionParams { n_kv_heads: 3, ..base }, "whole groups"),
        (PrefillAttentionParams { rows: 0, ..base }, "empty chunk"),
    ] {
        let e = unsafe { prefill::qk_rope(&gpu, &p) }.unwrap_err();
        assert!(format!("{e:#}").contains(why), "qk_rope: {e:#} (wanted `{why}`)");
        let e = unsafe { prefill::attention(&gpu, &p) }.unwrap_err();
        assert!(format!("{e:#}").contains(why), "attention: {e:#} (wanted `{why}`)");
    }
    let e = unsafe { prefill::rms_norm_rows(&gpu, 0, 0, 1, 62, 1e-6, 0) }.unwrap_err();
    assert!(format!("{e:#}").contains("multiple of 4"), "{e:#}");
}

/// Prefill writes K and V exactly as the decode kernel does: the same q/k/v row at the same
/// position, through the decode attention phase (`test_attention`, the megakernel's device
/// function) and through `prefill_qk_rope` (M = 1), leaves bit-identical cache rows; and the
/// two attention outputs agree within prefill's bf16 roundings (of q and of the weights).
#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_kv_rows_are_bit_identical_to_decode() {
    use host::engine::abi::{attention_smem_words, AttentionTestParams, MAX_SPLITS, OP_TEST_THREADS};
    use std::ffi::c_void;
    let gpu = gpu();
    for (seed, (n_heads, n_kv, d, pos)) in
        (300..).zip([(16usize, 8usize, 128usize, 300usize), (4, 2, 32, 0), (16, 4, 64, 63)])
    {
        let mut rng = Rng(seed);
        let max_ctx = 512;
        let s = HeadShape { n_heads, n_kv_heads: n_kv, head_dim: d, max_ctx };
        let q_dim = s.q_dim();
        let inputs = HeadInputs::random(&mut rng, &s, 1, pos);
        let dev = inputs.upload(&gpu);
        let HeadInputs { kc: cache, vc: vcache, .. } = inputs;

        // Decode: one attention phase at `pos`.
        let (dk_dec, dv_dec) = (gpu.upload(&bits(&cache), "k").unwrap(), gpu.upload(&bits(&vcache), "v").unwrap());
        let out_dec = gpu.upload(&vec![f32::NAN; q_dim], "decode out").unwrap();
        let partial = gpu.alloc::<f32>(n_heads * MAX_SPLITS as usize * (d + 2), "partials").unwrap();
        let count = gpu.alloc::<u32>(n_kv, "counts").unwrap();
        let half = d / 2;
        let mut t = AttentionTestParams {
            qkv: dptr(&dev.qkv),
            q_norm: dptr(&dev.q_norm),
            k_norm: dptr(&dev.k_norm),
            cos: dptr(&dev.cos) + (pos * half * 4) as u64,
            sin: dptr(&dev.sin) + (pos * half * 4) as u64,
            k_cache: dptr(&dk_dec),
            v_cache: dptr(&dv_dec),
            out: dptr(&out_dec),
            partial: dptr(&partial),
            count: dptr(&count),
            n_heads: n_heads as u32,
            n_kv_heads: n_kv as u32,
            head_dim: d as u32,
            max_ctx: max_ctx as u32,
            max_splits: MAX_SPLITS,
            pos: pos as u32,
            eps: 1e-6,
            _pad: 0,
        };
        let smem = attention_smem_words(OP_TEST_THREADS / 32, (n_heads / n_kv) as u32, d as u32) * 4;
        let k = gpu.kernel("test_attention").unwrap();
        let mut args = [&mut t as *mut _ as *mut c_void];
        unsafe { k.launch(gpu.stream(), gpu.sm_count(), OP_TEST_THREADS, smem, &mut args) }.unwrap();
        finish(&gpu, "test_attention");

        // Prefill: a chunk of one row at `pos`.
        let (dk_pre, dv_pre) = (gpu.upload(&bits(&cache), "k").unwrap(), gpu.upload(&bits(&vcache), "v").unwrap());
        let dq = gpu.upload(&vec![NAN_BF16; q_dim], "q").unwrap();
        let out_pre = gpu.upload(&vec![NAN_BF16; q_dim], "prefill out").unwrap();
        let p = PrefillAttentionParams {
            qkv: dptr(&dev.qkv),
            q_norm: dptr(&dev.q_norm),
            k_norm: dptr(&dev.k_norm),
            rope_cos: dptr(&dev.cos),
            rope_sin: dptr(&dev.sin),
            k_cache: dptr(&dk_pre),
            v_cache: dptr(&dv_pre),
            q: dptr(&dq),
            out: dptr(&out_pre),
            rows: 1,
            start_pos: pos as u32,
            n_heads: n_heads as u32,
            n_kv_heads: n_kv as u32,
            head_dim: d as u32,
            max_ctx: max_ctx as u32,
            eps: 1e-6,
            _pad: 0,
        };
        unsafe { prefill::qk_rope(&gpu, &p) }.unwrap();
        unsafe { prefill::attention(&gpu, &p) }.unwrap();
        finish(&gpu, "prefill_qk_rope + prefill_attention");

        let what = format!("heads {n_heads}/{n_kv} d={d} pos={pos}");
        assert!(download(&dk_pre) == download(&dk_dec), "{what}: the K caches differ");
        assert!(download(&dv_pre) == download(&dv_dec), "{what}: the V caches differ");
        let (dec, pre) = (download(&out_dec), download_bf16(&out_pre));
        for (i, (&g, &w)) in pre.iter().zip(&dec).enumerate() {
            // Decode keeps q and the softmax weights in f32; prefill rounds both to bf16.
            assert!(within_attention(g, w, 3.0, 1e-3), "{what}: attention [{i}]: prefill {g}, decode {w}");
        }
    }
}
