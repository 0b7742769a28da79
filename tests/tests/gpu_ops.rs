//! Every operation of the decode step on the GPU against its CPU twin (host::model::ops).
//! Each test runs the very device function the megakernel uses, through its test kernel in
//! kernel/src/op_tests.rs, on fresh random data.

mod common;
use common::{bits, download, dptr, finish, gpu, rel_err, Rng};
use cust::memory::DeviceBuffer;
use half::bf16;
use host::engine::abi::*;
use host::gpu::Gpu;
use host::model::ops;
use std::ffi::c_void;

/// A buffer pre-filled with NaN, so an element the kernel forgot to write fails the test.
fn poisoned(gpu: &Gpu, n: usize) -> DeviceBuffer<f32> {
    gpu.upload(&vec![f32::NAN; n], "output").unwrap()
}

fn launch(gpu: &Gpu, name: &str, grid: u32, smem: u32, args: &mut [*mut c_void]) {
    let k = gpu.kernel(name).unwrap();
    if smem > 48 * 1024 {
        k.set_max_dynamic_smem(smem).unwrap();
    }
    unsafe { k.launch(gpu.stream(), grid, OP_TEST_THREADS, smem, args).unwrap() };
    finish(gpu, name);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(1);
    for n in [64usize, 1024, 2048] {
        let x = rng.vec(n, 3.0);
        let w = rng.bf16s(n, 1.5);
        let (dx, dw, out) = (gpu.upload(&x, "x").unwrap(), gpu.upload(&bits(&w), "w").unwrap(), poisoned(&gpu, n));
        let (mut px, mut pw, mut pn, mut eps, mut po) = (dptr(&dx), dptr(&dw), n as u32, 1e-6f32, dptr(&out));
        let mut args = [
            &mut px as *mut _ as *mut c_void,
            &mut pw as *mut _ as _,
            &mut pn as *mut _ as _,
            &mut eps as *mut _ as _,
            &mut po as *mut _ as _,
        ];
        launch(&gpu, "test_rms_norm", 1, (gemv_vector_words(n as u32) + 32) * 4, &mut args);
        let err = rel_err(&download(&out), &ops::rms_norm(&x, &w, 1e-6));
        assert!(err < 1e-5, "rms_norm n={n}: relative error {err}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(2);
    // Qwen3-0.6B's shapes (qkv, o, down), a ragged one, and a tiny one, each with one block per
    // SM (one round of rows per warp, as in decode) and with 7 blocks (many rounds per warp).
    for (rows, cols) in [(4096usize, 1024usize), (1024, 2048), (1024, 3072), (1000, 136), (3, 8)] {
        let w = rng.bf16s(rows * cols, 0.05);
        let x = rng.vec(cols, 2.0);
        let want = ops::gemv(&w, rows, cols, &x);
        for grid in [gpu.sm_count(), 7] {
            let (dw, dx, dy) =
                (gpu.upload(&bits(&w), "w").unwrap(), gpu.upload(&x, "x").unwrap(), poisoned(&gpu, rows));
            let (mut pw, mut r, mut c, mut px, mut py) = (dptr(&dw), rows as u32, cols as u32, dptr(&dx), dptr(&dy));
            let mut args = [
                &mut pw as *mut _ as *mut c_void,
                &mut r as *mut _ as _,
                &mut c as *mut _ as _,
                &mut px as *mut _ as _,
                &mut py as *mut _ as _,
            ];
            launch(&gpu, "test_gemv", grid, gemv_vector_words(cols as u32) * 4, &mut args);
            let err = rel_err(&download(&dy), &want);
            assert!(err < 1e-5, "gemv {rows}x{cols} on {grid} blocks: relative error {err}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gate_up_silu_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(3);
    for (inter, hidden) in [(3072usize, 1024usize), (128, 64)] {
        let g = rng.bf16s(inter * hidden, 0.05);
        let u = rng.bf16s(inter * hidden, 0.05);
        let x = rng.vec(hidden, 2.0);
        let want = ops::silu_mul(&ops::gemv(&g, inter, hidden, &x), &ops::gemv(&u, inter, hidden, &x));
        for grid in [gpu.sm_count(), 7] {
            let (dg, du, dx, out) = (
                gpu.upload(&bits(&g), "g").unwrap(),
                gpu.upload(&bits(&u), "u").unwrap(),
                gpu.upload(&x, "x").unwrap(),
                poisoned(&gpu, inter),
            );
            let (mut pg, mut pu, mut i, mut h, mut px, mut po) =
                (dptr(&dg), dptr(&du), inter as u32, hidden as u32, dptr(&dx), dptr(&out));
            let mut args = [
                &mut pg as *mut _ as *mut c_void,
                &mut pu as *mut _ as _,
                &mut i as *mut _ as _,
                &mut h as *mut _ as _,
                &mut px as *mut _ as _,
                &mut po as *mut _ as _,
            ];
            launch(&gpu, "test_gate_up_silu", grid, gemv_vector_words(hidden as u32) * 4, &mut args);
            let err = rel_err(&download(&out), &want);
            assert!(err < 1e-5, "gate/up/silu {inter}x{hidden} on {grid} blocks: relative error {err}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn head_norm_rope_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(4);
    for head_dim in [128usize, 64, 32] {
        let n_heads = 16;
        let pos = 1234;
        let (cos, sin) = ops::rope_table(1e6, head_dim, pos + 1);
        let half = head_dim / 2;
        let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        let x = rng.vec(n_heads * head_dim, 4.0);
        let w = rng.bf16s(head_dim, 1.5);
        let (dx, dw, dc, ds, out) = (
            gpu.upload(&x, "x").unwrap(),
            gpu.upload(&bits(&w), "w").unwrap(),
            gpu.upload(c, "cos").unwrap(),
            gpu.upload(s, "sin").unwrap(),
            poisoned(&gpu, n_heads * head_dim),
        );
        let (mut px, mut pw, mut nh, mut hd, mut eps, mut pc, mut ps, mut po) =
            (dptr(&dx), dptr(&dw), n_heads as u32, head_dim as u32, 1e-6f32, dptr(&dc), dptr(&ds), dptr(&out));
        let mut args = [
            &mut px as *mut _ as *mut c_void,
            &mut pw as *mut _ as _,
            &mut nh as *mut _ as _,
            &mut hd as *mut _ as _,
            &mut eps as *mut _ as _,
            &mut pc as *mut _ as _,
            &mut ps as *mut _ as _,
            &mut po as *mut _ as _,
        ];
        let warps = (OP_TEST_THREADS / 32) as usize;
        launch(&gpu, "test_head_norm_rope", n_heads.div_ceil(warps) as u32, 0, &mut args);
        let mut want = x.clone();
        for h in want.chunks_mut(head_dim) {
            ops::head_norm_rope(h, &w, 1e-6, c, s);
        }
        let err = rel_err(&download(&out), &want);
        assert!(err < 1e-5, "head_norm_rope head_dim={head_dim}: relative error {err}");
    }
}

/// One attention phase at context length `len` (new position `len - 1`) against the CPU:
/// q/k norm + RoPE, the KV append, and split attention with the last-block merge.
fn attention_case(gpu: &Gpu, len: usize, n_heads: usize, n_kv: usize, head_dim: usize, max_ctx: usize, seed: u64) {
    let mut rng = Rng(seed);
    let pos = len - 1;
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv * head_dim);
    let qkv = rng.vec(q_dim + 2 * kv_dim, 3.0);
    let (qn, kn) = (rng.bf16s(head_dim, 1.5), rng.bf16s(head_dim, 1.5));
    let (cos, sin) = ops::rope_table(1e6, head_dim, max_ctx);
    // Cache: [kv_head][max_ctx][head_dim] bf16; positions before `pos` random, the rest poison.
    let mut kc = vec![bf16::NAN; n_kv * max_ctx * head_dim];
    let mut vc = kc.clone();
    for h in 0..n_kv {
        for p in 0..pos {
            for d in 0..head_dim {
                kc[(h * max_ctx + p) * head_dim + d] = bf16::from_f32(rng.uniform(-2.0, 2.0));
                vc[(h * max_ctx + p) * head_dim + d] = bf16::from_f32(rng.uniform(-2.0, 2.0));
            }
        }
    }
    let group = (n_heads / n_kv) as u32;
    let smem = attention_smem_words(OP_TEST_THREADS / 32, group, head_dim as u32) * 4;
    let bufs = (
        gpu.upload(&qkv, "qkv").unwrap(),
        gpu.upload(&bits(&qn), "qn").unwrap(),
        gpu.upload(&bits(&kn), "kn").unwrap(),
        gpu.upload(&cos[pos * head_dim / 2..], "cos").unwrap(),
        gpu.upload(&sin[pos * head_dim / 2..], "sin").unwrap(),
        gpu.upload(&bits(&kc), "k cache").unwrap(),
        gpu.upload(&bits(&vc), "v cache").unwrap(),
        poisoned(gpu, q_dim),
        gpu.alloc::<f32>(n_heads * MAX_SPLITS as usize * (head_dim + 2), "partials").unwrap(),
        gpu.alloc::<u32>(n_kv, "counts").unwrap(),
    );
    let mut t = AttentionTestParams {
        qkv: dptr(&bufs.0),
        q_norm: dptr(&bufs.1),
        k_norm: dptr(&bufs.2),
        cos: dptr(&bufs.3),
        sin: dptr(&bufs.4),
        k_cache: dptr(&bufs.5),
        v_cache: dptr(&bufs.6),
        out: dptr(&bufs.7),
        partial: dptr(&bufs.8),
        count: dptr(&bufs.9),
        n_heads: n_heads as u32,
        n_kv_heads: n_kv as u32,
        head_dim: head_dim as u32,
        max_ctx: max_ctx as u32,
        max_splits: MAX_SPLITS,
        pos: pos as u32,
        eps: 1e-6,
        _pad: 0,
    };
    let mut args = [&mut t as *mut _ as *mut c_void];
    launch(gpu, "test_attention", gpu.sm_count(), smem, &mut args);

    // CPU: normalise + rotate q and the new k, round the new k and v to bf16 like the cache.
    let half = head_dim / 2;
    let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
    let mut q = qkv[..q_dim].to_vec();
    for h in q.chunks_mut(head_dim) {
        ops::head_norm_rope(h, &qn, 1e-6, c, s);
    }
    let mut k_new = qkv[q_dim..q_dim + kv_dim].to_vec();
    for h in k_new.chunks_mut(head_dim) {
        ops::head_norm_rope(h, &kn, 1e-6, c, s);
    }
    let v_new = &qkv[q_dim + kv_dim..];
    let mut keys = vec![0f32; len * kv_dim];
    let mut values = vec![0f32; len * kv_dim];
    for p in 0..len {
        for h in 0..n_kv {
            for d in 0..head_dim {
                let (kv, vv) = if p == pos {
                    (ops::round_bf16(k_new[h * head_dim + d]), ops::round_bf16(v_new[h * head_dim + d]))
                } else {
                    (kc[(h * max_ctx + p) * head_dim + d].to_f32(), vc[(h * max_ctx + p) * head_dim + d].to_f32())
                };
                keys[p * kv_dim + h * head_dim + d] = kv;
                values[p * kv_dim + h * head_dim + d] = vv;
            }
        }
    }
    let want = ops::attention(&q, &keys, &values, n_heads, n_kv, head_dim, len);
    let err = rel_err(&download(&bufs.7), &want);
    assert!(err < 2e-4, "attention len={len} heads={n_heads}/{n_kv} d={head_dim}: relative error {err}");

    // The append: the cache row at `pos` holds exactly the rounded new k and v.
    let kc_out = download(&bufs.5);
    let vc_out = download(&bufs.6);
    for h in 0..n_kv {
        for d in 0..head_dim {
            let i = (h * max_ctx + pos) * head_dim + d;
            let k_err = (bf16::from_bits(kc_out[i]).to_f32() - keys[pos * kv_dim + h * head_dim + d]).abs();
            assert!(
                k_err <= 1e-2 * keys[pos * kv_dim + h * head_dim + d].abs().max(1.0),
                "K append at head {h} dim {d}"
            );
            assert_eq!(
                bf16::from_bits(vc_out[i]).to_f32(),
                values[pos * kv_dim + h * head_dim + d],
                "V append at head {h} dim {d}"
            );
        }
    }
    // The merge counters are back to zero for the next use.
    assert!(download(&bufs.9).iter().all(|&c| c == 0), "attention counters not reset");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu_at_several_lengths() {
    let gpu = gpu();
    for (i, len) in [1usize, 17, 300, 4096].into_iter().enumerate() {
        attention_case(&gpu, len, 16, 8, 128, 4096, 10 + i as u64);
    }
    // The tiny test model's shape (head_dim 32, 2 q heads per kv head) and a 4-way group.
    attention_case(&gpu, 23, 4, 2, 32, 64, 20);
    attention_case(&gpu, 77, 16, 4, 64, 128, 21);
}

/// Splits of the context per kv head the attention phase uses (`ops::attention::split_plan`:
/// at most MAX_SPLITS, at least 12 positions each, one per warp of a block).
fn active_splits(len: u32, n_kv: u32, grid: u32) -> u32 {
    let splits = (grid / n_kv).clamp(1, MAX_SPLITS);
    let chunk = len.div_ceil(splits).max(OP_TEST_THREADS / 32);
    len.div_ceil(chunk)
}

/// The merge across blocks in each of its forms: 2 splits (one batch), 10 (two warps per q head
/// and a named barrier among them) and 32 (the most), for groups of 2 and 4 q heads. These
/// paths only run at long context; compute-sanitizer's synccheck and racecheck run this test
/// (sanitize.sh), since a barrier that not all of its threads reach at the same instruction
/// can still give the right numbers.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_merge_at_2_10_and_32_splits() {
    let gpu = gpu();
    let grid = gpu.sm_count();
    for (n_heads, n_kv, head_dim) in [(4usize, 2usize, 128usize), (8, 2, 64), (8, 4, 32)] {
        for (want, len) in [(2u32, 20u32), (10, 120), (32, 1200)] {
            let got = active_splits(len, n_kv as u32, grid);
            assert_eq!(got, want, "{grid} SMs: a {len}-position context is not split {want} ways over {n_kv} kv heads");
            attention_case(&gpu, len as usize, n_heads, n_kv, head_dim, 1280, 40 + want as u64 + n_heads as u64);
        }
    }
}

struct LmHeadRun {
    tokens: Vec<u32>,
    lse: f32,
    target_logit: f32,
    /// What the finishing block got from block 0 (`LmHeadArgs::forward`).
    forward: u32,
    logits: Vec<f32>,
}

/// How the LM head test kernel draws top-p alone: as the split kernels do (the one block that
/// finishes), or as the decode kernel does (every block, `ops::lm_head::grid_top_p`).
#[derive(Clone, Copy, PartialEq, Debug)]
enum TopPDraw {
    OneBlock,
    Grid,
}

#[allow(clippy::too_many_arguments)]
fn run_lm_head(
    gpu: &Gpu,
    w: &[bf16],
    vocab: usize,
    hidden: usize,
    xn: &[f32],
    target: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    trials: u32,
    grid: u32,
    draw: TopPDraw,
) -> LmHeadRun {
    let dw = gpu.upload(&bits(w), "lm head").unwrap();
    let dx = gpu.upload(xn, "xn").unwrap();
    let logits = poisoned(gpu, vocab);
    let scratch = gpu.alloc::<f32>(vocab, "scratch").unwrap();
    let partial = gpu.alloc::<LmPartial>(grid as usize, "partials").unwrap();
    let candidates = gpu.alloc::<u64>(grid as usize * 32, "candidates").unwrap();
    let grid_hist = gpu.alloc::<u64>(LM_GRID_HIST_WORDS as usize, "top-p histograms").unwrap();
    let count = gpu.alloc::<u32>(1, "count").unwrap();
    let barrier = gpu.alloc::<u32>(1, "barrier").unwrap();
    let tokens = gpu.upload(&vec![u32::MAX; trials as usize], "tokens").unwrap();
    let lse = gpu.alloc::<f32>(3, "lse").unwrap();
    let mut t = LmHeadTestParams {
        xn: dptr(&dx),
        weight: dptr(&dw),
        logits_out: dptr(&logits),
        logits_scratch: dptr(&scratch),
        partial: dptr(&partial),
        count: dptr(&count),
        barrier: dptr(&barrier),
        tokens_out: dptr(&tokens),
        lse_out: dptr(&lse),
        vocab: vocab as u32,
        hidden: hidden as u32,
        target,
        temperature,
        top_k,
        top_p,
        seed_lo: 0x1234_5678,
        seed_hi: 0x9abc,
        pos: 0,
        trials,
        candidates: dptr(&candidates),
        grid_hist: if draw == TopPDraw::Grid { dptr(&grid_hist) } else { 0 },
    };
    // The last word: the grid barrier's sense.
    let smem = (gemv_vector_words(hidden as u32) + lm_head_words(OP_TEST_THREADS / 32) + 1) * 4;
    let k = gpu.kernel("test_lm_head").unwrap();
    k.set_max_dynamic_smem(smem).unwrap();
    let mut args = [&mut t as *mut _ as *mut c_void];
    unsafe { k.launch_cooperative(gpu.stream(), grid, OP_TEST_THREADS, smem, &mut args).unwrap() };
    finish(gpu, "test_lm_head");
    assert_eq!(download(&count), [0], "LM-head counter not reset");
    assert!(download(&grid_hist).iter().all(|&v| v == 0), "top-p histograms not zeroed after use");
    let l = download(&lse);
    LmHeadRun {
        tokens: download(&tokens),
        lse: l[0],
        target_logit: l[1],
        forward: l[2].to_bits(),
        logits: download(&logits),
    }
}

fn log_sum_exp(v: &[f32]) -> f64 {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lm_head_argmax_and_log_sum_exp_match_cpu() {
    let gpu = gpu();
    let mut rng = Rng(5);
    let (vocab, hidden) = (151_936usize, 1024usize);
    let w = rng.bf16s(vocab * hidden, 0.05);
    let xn = rng.vec(hidden, 2.0);
    let target = 77_777;
    let r = run_lm_head(&gpu, &w, vocab, hidden, &xn, target, 0.0, 0, 1.0, 1, gpu.sm_count(), TopPDraw::OneBlock);
    let want = ops::gemv(&w, vocab, hidden, &xn);
    let err = rel_err(&r.logits, &want);
    assert!(err < 1e-5, "LM-head logits: relative error {err}");
    // The chosen token is the arg-max of the GPU's own logits (ties to the lowest id) ...
    assert_eq!(r.tokens[0], ops::argmax(&r.logits), "greedy token is not the arg-max of the logits");
    // ... and the CPU's, unless the top two are closer than the rounding difference.
    let cpu = ops::argmax(&want) as usize;
    if r.tokens[0] as usize != cpu {
        let margin = (want[cpu] - want[r.tokens[0] as usize]).abs();
        assert!(margin < 1e-4, "GPU chose {} but the CPU {cpu} with margin {margin}", r.tokens[0]);
    }
    let lse_err = (r.lse as f64 - log_sum_exp(&want)).abs();
    assert!(lse_err < 1e-3, "log-sum-exp off by {lse_err}");
    assert_eq!(r.forward, LM_FORWARD_TEST, "the finishing block did not get block 0's forwarded word");
    assert!(
        (r.target_logit - want[target as usize]).abs() < 1e-4,
        "target logit {} vs {}",
        r.target_logit,
        want[target as usize]
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lm_head_ties_go_to_the_lowest_id() {
    let gpu = gpu();
    let mut rng = Rng(6);
    let (vocab, hidden) = (5000usize, 64usize);
    let mut w = rng.bf16s(vocab * hidden, 0.01);
    let xn: Vec<f32> = (0..hidden).map(|i| if i % 2 == 0 { 1.0 } else { 0.5 }).collect();
    // Three identical, clearly largest rows in different blocks' slices: the lowest id wins.
    let best: Vec<bf16> = (0..hidden).map(|_| bf16::from_f32(0.5)).collect();
    for row in [4321usize, 1234, 3000] {
        w[row * hidden..(row + 1) * hidden].copy_from_slice(&best);
    }
    let r = run_lm_head(&gpu, &w, vocab, hidden, &xn, u32::MAX, 0.0, 0, 1.0, 1, gpu.sm_count(), TopPDraw::OneBlock);
    assert_eq!(r.tokens[0], 1234);
    assert_eq!(ops::argmax(&r.logits), 1234);
}

/// Sampling draws follow the CPU's distribution (temperature, top-k, top-p) within a few
/// standard errors, on every path: Gumbel-max (temperature only), the 32 best across the grid
/// (top-k <= 32, top-p alone with a narrow nucleus, top-k = 1), and the one-block finishes
/// over every logit (top-k above 32; top-p alone with a nucleus wider than 32). No token
/// outside the distribution is ever drawn, and the same seed draws the same tokens.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sampling_distribution_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(7);
    let trials = sampling_trials(6000);
    // (vocab, weight scale): peaked logits over 12 tokens, and flat ones over 300 (wide nuclei).
    for (vocab, scale) in [(12usize, 0.3f32), (300, 0.02)] {
        let hidden = 64usize;
        let w = rng.bf16s(vocab * hidden, scale);
        let xn = rng.vec(hidden, 1.0);
        let cases: &[(f32, u32, f32)] = if vocab == 12 {
            &[(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 8, 0.8), (0.8, 0, 0.7), (1.0, 1, 1.0), (0.6, 20, 0.95)]
        } else {
            &[(1.0, 40, 1.0), (1.0, 0, 0.9), (0.6, 20, 0.95), (1.0, 256, 0.5)]
        };
        for &(temperature, top_k, top_p) in cases {
            let draw =
                |how| run_lm_head(&gpu, &w, vocab, hidden, &xn, u32::MAX, temperature, top_k, top_p, trials, 4, how);
            let r = draw(TopPDraw::OneBlock);
            check_draws(&r, vocab, temperature, top_k, top_p, trials);
            if vocab == 300 || top_k == 20 {
                let again = draw(TopPDraw::OneBlock);
                assert_eq!(r.tokens, again.tokens, "T={temperature} k={top_k} p={top_p}: same seed, other tokens");
            }
            if top_k == 0 && top_p < 1.0 {
                // The decode kernel's draw of top-p alone (every block) picks the very tokens
                // the one-block draw does.
                let grid = draw(TopPDraw::Grid);
                assert_eq!(r.tokens, grid.tokens, "T={temperature} p={top_p}: the grid draw differs from one block's");
            }
        }
    }
}

/// Top-p alone over the full vocabulary with flat logits (a nucleus of thousands, far past
/// the 32 best): the decode kernel's draw by every block (five grid barriers of histogram
/// rounds) and the one-block draw over all logits choose the same tokens, and those tokens
/// are spread over the nucleus, never outside it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn top_p_grid_draw_matches_one_block_at_full_vocab() {
    let gpu = gpu();
    let mut rng = Rng(8);
    let (vocab, hidden, trials) = (151_936usize, 64usize, sampling_trials(64));
    let w = rng.bf16s(vocab * hidden, 0.05);
    let xn = rng.vec(hidden, 1.0);
    let grid = gpu.sm_count();
    for (temperature, top_p) in [(0.6f32, 0.95f32), (1.0, 0.5)] {
        let draw = |how| run_lm_head(&gpu, &w, vocab, hidden, &xn, u32::MAX, temperature, 0, top_p, trials, grid, how);
        let one = draw(TopPDraw::OneBlock);
        let all = draw(TopPDraw::Grid);
        let params = host::backend::SamplingParams { temperature, top_k: 0, top_p, seed: 0 };
        let nucleus = host::model::sampling::filtered_distribution(&one.logits, &params);
        assert!(nucleus.len() > 1000, "T={temperature} p={top_p}: nucleus of only {} tokens", nucleus.len());
        assert_eq!(one.tokens, all.tokens, "T={temperature} p={top_p}: the grid draw differs from one block's");
        let mut inside: Vec<u32> = nucleus.iter().map(|&(id, _)| id).collect();
        inside.sort_unstable();
        // The token at the nucleus' edge may differ by rounding (integer vs f64 weights).
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| one.logits[b].partial_cmp(&one.logits[a]).unwrap().then(a.cmp(&b)));
        let edge = order[nucleus.len()] as u32;
        for &t in &one.tokens {
            assert!(inside.binary_search(&t).is_ok() || t == edge, "token {t} outside the nucleus");
        }
        let mut distinct = one.tokens.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > trials as usize / 2, "{} distinct tokens in {trials} draws", distinct.len());
    }
}

/// Draws per case: `default`, or fewer when QWEN3_SAMPLING_TRIALS says so (the sanitizer's runs:
/// the bounds are in standard errors, so they widen with fewer).
fn sampling_trials(default: u32) -> u32 {
    let env = std::env::var("QWEN3_SAMPLING_TRIALS").ok().and_then(|v| v.parse::<u32>().ok());
    env.map_or(default, |t| t.min(default))
}

/// The draws of `r` against the distribution the CPU defines on the GPU's own logits.
fn check_draws(r: &LmHeadRun, vocab: usize, temperature: f32, top_k: u32, top_p: f32, trials: u32) {
    let params = host::backend::SamplingParams { temperature, top_k, top_p, seed: 0 };
    let want = host::model::sampling::filtered_distribution(&r.logits, &params);
    let mut counts = vec![0u32; vocab];
    for &t in &r.tokens {
        assert!((t as usize) < vocab, "token {t} out of range");
        counts[t as usize] += 1;
    }
    let mut p_of = vec![0f64; vocab];
    for &(id, p) in &want {
        p_of[id as usize] = p;
    }
    let label = format!("vocab {vocab}, T={temperature} k={top_k} p={top_p} ({} tokens kept)", want.len());
    for (i, &c) in counts.iter().enumerate() {
        let (p, freq) = (p_of[i], c as f64 / trials as f64);
        let tol = 5.0 * (p * (1.0 - p) / trials as f64).sqrt() + 2e-3;
        assert!((freq - p).abs() <= tol, "{label}: token {i} drawn {freq:.4}, expected {p:.4}");
    }
    // Outside the distribution: never (the token just past its edge may differ by rounding).
    let edge = want.len();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| r.logits[b].partial_cmp(&r.logits[a]).unwrap().then(a.cmp(&b)));
    let outside: u32 = order.iter().skip(edge + 1).map(|&i| counts[i]).sum();
    assert_eq!(outside, 0, "{label}: {outside} draws outside the distribution");
}

/// `|a|` elementwise (exact in bf16): `gemm_bf16` of these is each entry's `sum |a_p w_p|`,
/// the scale its rounding error is measured against.
fn abs_bf16(v: &[bf16]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_bits(x.to_bits() & 0x7fff)).collect()
}

/// The GEMM's tolerance, per entry: `|gpu - cpu| <= GEMM_TOLERANCE * sum_p |a_p w_p|`. Both
/// sides sum exact products in f32, in different orders (the CPU in 16 partial sums, the
/// tensor cores in their own order and rounding), so each is within about `k / 16 * 2^-24`
/// of the exact sum relative to that scale in the worst case; 1e-4 covers k = 3072 with a wide
/// margin, and a wrong fragment layout or a missing tile is off by the order of 1.
const GEMM_TOLERANCE: f64 = 1e-4;

/// Whether the GPU's entry `got` is within tolerance of the CPU's `want` (a NaN, an entry the
/// kernel never wrote, is not).
fn gemm_entry_ok(got: f32, want: f32, scale: f32) -> bool {
    got.is_finite() && (got as f64 - want as f64).abs() <= GEMM_TOLERANCE * scale as f64 + 1e-30
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_bf16_matches_cpu() {
    let gpu = gpu();
    let mut rng = Rng(7);
    // M: one position, chunk tails inside one 128-row tile (7, 64, 100), one row into a third
    // tile (257). K: two K-tiles, and Qwen3's hidden and MLP widths. Then the LM head's shape
    // (N = 151936 = 64 x 2374 tiles wide) at a short chunk.
    let cases = [64usize, 1024, 3072]
        .into_iter()
        .flat_map(|k| [64usize, 1024, 2048].into_iter().map(move |n| (n, k, &[1usize, 7, 64, 100, 257][..])))
        .chain([(151936, 1024, &[7usize][..])]);
    for (n, k, ms) in cases {
        let w = rng.bf16s(n * k, 1.0);
        let dw = gpu.upload(&bits(&w), "w").unwrap();
        for &m in ms {
            let a = rng.bf16s(m * k, 1.0);
            let want = ops::gemm_bf16(&a, &w, m, n, k);
            let scale = ops::gemm_bf16(&abs_bf16(&a), &abs_bf16(&w), m, n, k);
            let da = gpu.upload(&bits(&a), "a").unwrap();
            let mut dc = poisoned(&gpu, m * n);
            host::gpu::gemm_bf16(&gpu, &da, &dw, &mut dc, m, n, k).unwrap();
            finish(&gpu, "gemm_bf16");
            let got = download(&dc);
            for i in 0..m * n {
                assert!(
                    gemm_entry_ok(got[i], want[i], scale[i]),
                    "gemm {m}x{n}x{k} [{}, {}]: gpu {}, cpu {} (|a||w| sums to {})",
                    i / n,
                    i % n,
                    got[i],
                    want[i],
                    scale[i]
                );
            }
            let err = rel_err(&got, &want);
            assert!(err < GEMM_TOLERANCE, "gemm {m}x{n}x{k}: relative error {err}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_bf16_refuses_shapes_it_cannot_do() {
    let gpu = gpu();
    let a = gpu.upload(&vec![0u16; 8 * 96], "a").unwrap();
    let w = gpu.upload(&vec![0u16; 96 * 96], "w").unwrap();
    let mut c = poisoned(&gpu, 8 * 96);
    // N = 96 is not a multiple of 64: refused before launch, nothing written.
    assert!(host::gpu::gemm_bf16(&gpu, &a, &w, &mut c, 8, 96, 96).is_err());
    // A buffer too short for the shape.
    assert!(host::gpu::gemm_bf16(&gpu, &a, &w, &mut c, 9, 64, 96).is_err());
    gpu.synchronize().unwrap();
    assert!(download(&c).iter().all(|v| v.is_nan()), "a refused GEMM wrote to C");
}

/// Achieved TFLOP/s at M = N = K = 4096 (median of 7 timings of 3 back-to-back launches each,
/// after a warm-up), printed for the record; correctness on a sample of entries.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_bf16_throughput_at_4096() {
    let gpu = gpu();
    let (m, n, k) = (4096usize, 4096usize, 4096usize);
    let mut rng = Rng(8);
    let a = rng.bf16s(m * k, 1.0);
    let w = rng.bf16s(n * k, 1.0);
    let (da, dw) = (gpu.upload(&bits(&a), "a").unwrap(), gpu.upload(&bits(&w), "w").unwrap());
    let mut dc = poisoned(&gpu, m * n);
    host::gpu::gemm_bf16(&gpu, &da, &dw, &mut dc, m, n, k).unwrap();
    finish(&gpu, "gemm_bf16");
    const LAUNCHES: usize = 3;
    let mut times = Vec::new();
    for _ in 0..7 {
        let ms = gpu
            .time_ms(|| {
                for _ in 0..LAUNCHES {
                    host::gpu::gemm_bf16(&gpu, &da, &dw, &mut dc, m, n, k)?;
                }
                Ok(())
            })
            .unwrap();
        times.push(ms as f64 / LAUNCHES as f64);
    }
    let ms = host::stats::median(&mut times);
    let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    println!("gemm_bf16 {m}x{n}x{k} on {}: {ms:.3} ms per launch, {tflops:.1} TFLOP/s (median of 7)", gpu.name());
    assert!(tflops.is_finite() && tflops > 0.0, "TFLOP/s = {tflops}");

    let got = download(&dc);
    for _ in 0..512 {
        let (i, j) = ((rng.next() % m as u64) as usize, (rng.next() % n as u64) as usize);
        let (ra, rw) = (&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        let want = ops::dot_bf16_bf16(ra, rw);
        let scale = ops::dot_bf16_bf16(&abs_bf16(ra), &abs_bf16(rw));
        let g = got[i * n + j];
        assert!(gemm_entry_ok(g, want, scale), "gemm 4096^3 [{i}, {j}]: gpu {g}, cpu {want} (|a||w| sums to {scale})");
    }
}

/// `measure_gemm_rate` (the yardstick of `bench --prefill`): a plausible rate at a small size,
/// printed, and a size the GEMM cannot take refused with the shape's reason.
#[test]
#[ignore = "needs a CUDA GPU"]
fn measure_gemm_rate_is_plausible() {
    let gpu = gpu();
    let rate = host::gpu::measure_gemm_rate(&gpu, 1024).unwrap();
    println!("measure_gemm_rate(1024) on {}: {:.1} TFLOP/s", gpu.name(), rate / 1e12);
    // Above 1 TFLOP/s (a tensor-core GEMM of 2 GFLOP), below 10 PFLOP/s (no card's bf16 peak).
    assert!(rate > 1e12 && rate < 1e16, "{rate} FLOP/s");
    let e = host::gpu::measure_gemm_rate(&gpu, 100).unwrap_err();
    assert!(format!("{e:#}").contains("multiple of"), "{e:#}");
}
