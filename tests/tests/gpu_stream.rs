//! The streaming step (`qwen3_stream_step`, kernel/src/stream.rs) on a full-size checkpoint:
//! its greedy choices and logits against the CPU reference and against the megakernel at a
//! long context, bit-identical reruns, launches that chain, requests it refuses without harm,
//! and its sampled draws against the CPU twin of the kernel's draw. Needs an sm_90 GPU.

mod common;
use common::{full_weights, rel_err, top2_margin};
use host::backend::{Backend, SamplingParams, StopReason};
use host::engine::GpuEngine;
use host::model::ops;
use host::model::reference::CpuReference;
use host::model::sampling::{device_gumbel_draw, device_top_k_draw, filtered_distribution};
use host::model::synth::random_ids;

const FULL_TOL: f64 = 5e-3;
const MARGIN: f32 = 0.05;

/// Greedy steps from position 0 (a prompt, then the step's own choices), checked step by step
/// by the CPU reference fed the same tokens: every choice is the CPU's arg-max or within
/// MARGIN of its best logit, and the last step's logits are the CPU's within FULL_TOL.
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_matches_the_cpu_reference() {
    let w = full_weights();
    let engine = GpuEngine::new(&w, 64).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    let prompt = random_ids(5, w.config.vocab_size, 11);
    let n = 16;
    let run = step.run(&engine, 0, &prompt, n, true).unwrap();
    assert_eq!(&run.tokens[..prompt.len()], &prompt[..], "the prompt was not fed as given");
    let mut cpu = CpuReference::new(w.clone(), 64).with_bf16_kv(true);
    let mut checked = 0;
    let mut last = Vec::new();
    for s in 0..n {
        let logits = cpu.forward(run.tokens[s], s);
        if s + 1 >= prompt.len() {
            let chosen = run.tokens[s + 1] as usize;
            let best = ops::argmax(&logits) as usize;
            assert!(
                chosen == best || logits[best] - logits[chosen] < MARGIN,
                "step {s}: the streaming step chose {chosen} (logit {}), the CPU's best is {best} (logit {})",
                logits[chosen],
                logits[best]
            );
            checked += 1;
        }
        last = logits;
    }
    let gpu = run.logits.unwrap();
    let err = rel_err(&gpu, &last);
    eprintln!(
        "{checked} choices checked; last step's logits: relative error {err:.2e}, CPU margin {:.3}",
        top2_margin(&last)
    );
    assert!(err < FULL_TOL, "last step's logits: relative error {err} >= {FULL_TOL}");
}

/// At long contexts the step's logits are the megakernel's on the same KV cache: 77 positions
/// (a partial last page), 300 (some blocks of a cluster take two pages, some one) and 2100
/// (66 pages: every warp of every block takes a page, some two, the last one partial).
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_matches_the_megakernel_at_long_context() {
    let w = full_weights();
    let mut engine = GpuEngine::new(&w, 2112).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    let tokens = random_ids(2102, w.config.vocab_size, 12);
    for p in [300usize, 77, 2100] {
        // The megakernel fills the cache up to p and gives its logits there.
        let mega = engine.logits(&tokens[..=p], &[p]).unwrap().remove(0);
        let run = step.run(&engine, p, &tokens[p..=p], 1, true).unwrap();
        let logits = run.logits.unwrap();
        let err = rel_err(&logits, &mega);
        eprintln!("position {p}: relative error vs the megakernel {err:.2e}");
        assert!(err < FULL_TOL, "position {p}: relative error {err} >= {FULL_TOL}");
        if top2_margin(&mega) > MARGIN {
            assert_eq!(run.tokens[1], ops::argmax(&mega), "position {p}: a different choice than the megakernel's");
        }
    }
}

/// The same launch twice gives the same bits; a run split into two launches (the second
/// starting from the first's last choice) gives the same tokens as one launch; requests the
/// step cannot run are refused and leave it able to run the same launch again.
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_is_deterministic_chains_and_refuses_bad_requests() {
    let w = full_weights();
    let engine = GpuEngine::new(&w, 128).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    let prompt = random_ids(3, w.config.vocab_size, 13);
    let a = step.run(&engine, 0, &prompt, 20, true).unwrap();
    let b = step.run(&engine, 0, &prompt, 20, true).unwrap();
    assert_eq!(a.tokens, b.tokens, "reruns chose different tokens");
    let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
    assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()), "reruns gave different logits");

    let first = step.run(&engine, 0, &prompt, 12, false).unwrap();
    let second = step.run(&engine, 12, &first.tokens[12..13], 8, false).unwrap();
    let mut chained = first.tokens[..12].to_vec();
    chained.extend(&second.tokens);
    assert_eq!(chained, a.tokens, "two launches chained differ from one");

    let vocab = w.config.vocab_size as u32;
    let refusals: Vec<(&str, anyhow::Result<host::engine::StreamRun>)> = vec![
        ("no steps", step.run(&engine, 0, &prompt, 0, false)),
        ("too many steps", step.run(&engine, 0, &prompt, 257, false)),
        ("no given token", step.run(&engine, 0, &[], 4, false)),
        ("more given tokens than steps", step.run(&engine, 0, &prompt, 2, false)),
        ("a token beyond the vocabulary", step.run(&engine, 0, &[vocab], 4, false)),
        ("positions beyond the cache", step.run(&engine, 120, &prompt, 9, false)),
    ];
    for (what, r) in refusals {
        let e = r.err().unwrap_or_else(|| panic!("{what}: not refused"));
        eprintln!("{what}: {e:#}");
    }
    let again = step.run(&engine, 0, &prompt, 20, false).unwrap();
    assert_eq!(again.tokens, a.tokens, "after the refusals the same launch chose other tokens");
}

/// Layer 0 of one step at position 0, piece by piece against the CPU's ops: the input norm,
/// the q/k/v rows, the attention output (at position 0, each q head's v row), the residual
/// after o and after the MLP.
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_layer0_pieces_match_the_cpu() {
    use host::engine::abi::*;
    let w = full_weights();
    let engine = GpuEngine::new(&w, 64).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    let token = 4321u32;
    let probe = step.probe_layer0(&engine, 0, token).unwrap();
    let c = &w.config;
    let (hidden, d, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
    let l = &w.layers[0];
    let x: Vec<f32> = w.embed_tokens[token as usize * hidden..][..hidden].iter().map(|v| v.to_f32()).collect();
    let h = ops::rms_norm(&x, &l.input_layernorm, eps);
    let mut qkv = ops::gemv(&l.q_proj, c.q_dim(), hidden, &h);
    let mut k = ops::gemv(&l.k_proj, c.kv_dim(), hidden, &h);
    let v = ops::gemv(&l.v_proj, c.kv_dim(), hidden, &h);
    let raw_k = k.clone();
    qkv.extend(&raw_k);
    qkv.extend(&v);
    let (cos, sin) = ops::rope_table(c.rope_theta, d, 1);
    for head in k.chunks_exact_mut(d) {
        ops::head_norm_rope(head, &l.k_norm, eps, &cos, &sin);
    }
    let group = c.num_attention_heads / c.num_key_value_heads;
    let attn: Vec<f32> = (0..c.q_dim()).map(|i| ops::round_bf16(v[(i / d / group) * d + i % d])).collect();
    let mut x_attn = x.clone();
    for (xi, oi) in x_attn.iter_mut().zip(ops::gemv(&l.o_proj, hidden, c.q_dim(), &attn)) {
        *xi += oi;
    }
    let h2 = ops::rms_norm(&x_attn, &l.post_attention_layernorm, eps);
    let gate = ops::gemv(&l.gate_proj, c.intermediate_size, hidden, &h2);
    let up = ops::gemv(&l.up_proj, c.intermediate_size, hidden, &h2);
    let act = ops::silu_mul(&gate, &up);
    let mut x_mlp = x_attn.clone();
    for (xi, di) in x_mlp.iter_mut().zip(ops::gemv(&l.down_proj, hidden, c.intermediate_size, &act)) {
        *xi += di;
    }
    // Block 0 (kv head 0): what its cluster sent (rank r: q rows 32 r.., then its k or v rows)
    // and what it attends with.
    let mut recv = Vec::new();
    for r in 0..8 {
        recv.extend(&qkv[32 * r..32 * r + 32]);
        let kv = if r < 4 { c.q_dim() + 32 * r } else { c.q_dim() + c.kv_dim() + 32 * (r - 4) };
        recv.extend(&qkv[kv..kv + 32]);
    }
    let mut attended = Vec::new();
    for head in 0..2 {
        let mut q = qkv[head * d..head * d + d].to_vec();
        ops::head_norm_rope(&mut q, &l.q_norm, eps, &cos, &sin);
        attended.extend(q);
    }
    attended.extend(k[..d].iter().map(|&v| ops::round_bf16(v)));
    attended.extend(v[..d].iter().map(|&v| ops::round_bf16(v)));
    let pieces = [
        ("input norm", STREAM_PROBE_XN, &h),
        ("block 0's q/k/v from its cluster", STREAM_PROBE_RECV, &recv),
        ("block 0's attended q, k, v", STREAM_PROBE_ATTENDED, &attended),
        ("q/k/v rows", STREAM_PROBE_QKV, &qkv),
        ("attention output", STREAM_PROBE_ATTN, &attn),
        ("residual after o", STREAM_PROBE_X_ATTN, &x_attn),
        ("residual after the MLP", STREAM_PROBE_X_MLP, &x_mlp),
    ];
    let mut bad = Vec::new();
    for (what, at, want) in pieces {
        let got = &probe[at as usize..at as usize + want.len()];
        if let Some(i) = got.iter().position(|v| !v.is_finite()) {
            eprintln!(
                "{what}: not finite at {i} ({} of {} values)",
                got.iter().filter(|v| !v.is_finite()).count(),
                got.len()
            );
            bad.push(what);
            continue;
        }
        let err = rel_err(got, want);
        let worst = got
            .iter()
            .zip(want.iter())
            .enumerate()
            .max_by(|a, b| (a.1 .0 - a.1 .1).abs().partial_cmp(&(b.1 .0 - b.1 .1).abs()).unwrap());
        eprintln!("{what}: relative error {err:.2e}; worst at {:?}", worst.map(|(i, (g, c))| (i, *g, *c)));
        if err > 1e-3 {
            bad.push(what);
        }
    }
    let part = &probe[STREAM_PROBE_WARP_PART as usize..][..264];
    eprintln!("block 0 warp 0, head 0: max {} sum {} acc[..4] {:?}", part[0], part[1], &part[4..8]);
    eprintln!("block 0 warp 0, head 1: max {} sum {} acc[..4] {:?}", part[132], part[133], &part[136..140]);
    let recv = &probe[STREAM_PROBE_ATTN_RECV as usize..][..288];
    for r in 0..8 {
        eprintln!(
            "block 0's attention partial from rank {r}: max {} sum {} acc[..3] {:?}",
            recv[36 * r],
            recv[36 * r + 1],
            &recv[36 * r + 2..36 * r + 5]
        );
    }
    eprintln!("v[..4] {:?}", &attended[384..388]);
    assert!(bad.is_empty(), "pieces off: {bad:?}");
}

/// One step each at positions 1, 300 and 1100 over a random KV cache (what sanitize.sh runs
/// the tools on: few launches, short and long context, each way of folding cached pages): the
/// logits are finite and the token each step chose is their arg-max (the blocks' bests met
/// right).
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_chooses_its_logits_arg_max_at_short_and_long_context() {
    let w = full_weights();
    let mut engine = GpuEngine::new(&w, 1152).unwrap();
    engine.randomize_kv_cache(3).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    for pos in [1usize, 300, 1100] {
        let run = step.run(&engine, pos, &[77], 1, true).unwrap();
        let logits = run.logits.unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "position {pos}: logits not finite");
        assert_eq!(run.tokens[1], ops::argmax(&logits), "position {pos}: the chosen token is not the logits' arg-max");
        // The same step sampled: a top-k draw (Qwen3's defaults) and a Gumbel-max.
        for s in [TOP_K_DEFAULT, GUMBEL] {
            step.set_sampling(&s).unwrap();
            let sampled = step.run(&engine, pos, &[77], 1, true).unwrap();
            step.set_sampling(&SamplingParams::GREEDY).unwrap();
            let again = sampled.logits.unwrap();
            assert!(same_bits(&again, &logits), "position {pos}, {s:?}: sampling changed the logits");
            check_draw(&logits, &s, pos as u32, sampled.tokens[1]);
        }
    }
}

const TOP_K_DEFAULT: SamplingParams = SamplingParams { temperature: 0.6, top_k: 20, top_p: 0.95, seed: 5 };
const GUMBEL: SamplingParams = SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 6 };
/// Decisions closer than this to another answer are left unchecked (f32 sums and fast
/// exponentials on the GPU, f64 on the CPU).
const DRAW_MARGIN: f64 = 1e-4;

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The token a sampled step at `pos` chose against the CPU twin of its draw on the same
/// logits; false when the decision was too close to call.
fn check_draw(logits: &[f32], s: &SamplingParams, pos: u32, chosen: u32) -> bool {
    let want = if s.top_k == 0 { device_gumbel_draw(logits, s, pos) } else { device_top_k_draw(logits, s, pos) };
    if want.margin < DRAW_MARGIN {
        return false;
    }
    assert_eq!(chosen, want.token, "position {pos}, {s:?}: the step drew another token than its CPU twin");
    true
}

/// Sampled steps drawn as the CPU twin of the kernel's draw says, seed after seed, on the very
/// logits the step computed: top-k with and without top-p, top-k 1 and 32, temperature alone.
/// Over the seeds the top-k draws spread over their candidates as `filtered_distribution`
/// says (within a few standard errors) and never leave them; a sampled generation is the same
/// for the same seed, chains across launches, and differs for another seed. Sampling
/// parameters the kernel cannot draw are refused, and change nothing.
#[test]
#[ignore = "needs a CUDA GPU"]
fn stream_step_samples_as_its_cpu_twin_draws() {
    let w = full_weights();
    let engine = GpuEngine::new(&w, 128).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    let pos = 3usize;
    let prompt = random_ids(pos + 1, w.config.vocab_size, 17);
    let greedy = step.run(&engine, 0, &prompt, pos + 1, true).unwrap();
    let logits = greedy.logits.unwrap();
    let cases = [
        TOP_K_DEFAULT,
        SamplingParams { temperature: 1.0, top_k: 32, top_p: 1.0, seed: 0 },
        SamplingParams { temperature: 0.7, top_k: 5, top_p: 0.8, seed: 0 },
        SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 },
        GUMBEL,
    ];
    let seeds = 300u64;
    for case in cases {
        let (mut checked, mut counts) = (0u32, std::collections::HashMap::new());
        for seed in 0..seeds {
            let s = SamplingParams { seed: 1000 * seed + 7, ..case };
            step.set_sampling(&s).unwrap();
            let run = step.run(&engine, 0, &prompt, pos + 1, seed == 0).unwrap();
            if let Some(l) = &run.logits {
                assert!(same_bits(l, &logits), "{s:?}: sampling changed the logits");
            }
            assert_eq!(&run.tokens[..=pos], &prompt[..], "{s:?}: the prompt steps were not fed as given");
            let token = run.tokens[pos + 1];
            checked += check_draw(&logits, &s, pos as u32, token) as u32;
            *counts.entry(token).or_insert(0u32) += 1;
        }
        assert!(checked as u64 >= seeds * 9 / 10, "{case:?}: only {checked} of {seeds} draws far enough from an edge");
        if case.top_k > 1 {
            let want = filtered_distribution(&logits, &case);
            for (&t, &c) in &counts {
                let p = want.iter().find(|&&(id, _)| id == t).map_or(0.0, |&(_, p)| p);
                let (freq, n) = (c as f64 / seeds as f64, seeds as f64);
                let tol = 5.0 * (p * (1.0 - p) / n).sqrt() + 1.0 / n;
                assert!(p > 0.0, "{case:?}: token {t} drawn {c} times, outside the distribution");
                assert!((freq - p).abs() <= tol, "{case:?}: token {t} drawn {freq:.3}, expected {p:.3}");
            }
            eprintln!("{case:?}: {} distinct tokens of {} candidates over {seeds} seeds", counts.len(), want.len());
        }
    }

    // A generation: the same seed, the same tokens, in one launch or two; another seed, others.
    step.set_sampling(&TOP_K_DEFAULT).unwrap();
    let a = step.run(&engine, 0, &prompt[..2], 40, false).unwrap();
    let first = step.run(&engine, 0, &prompt[..2], 25, false).unwrap();
    let second = step.run(&engine, 25, &first.tokens[25..26], 15, false).unwrap();
    let mut chained = first.tokens[..25].to_vec();
    chained.extend(&second.tokens);
    assert_eq!(chained, a.tokens, "a sampled generation in two launches differs from one");
    step.set_sampling(&SamplingParams { seed: 99, ..TOP_K_DEFAULT }).unwrap();
    let other = step.run(&engine, 0, &prompt[..2], 40, false).unwrap();
    assert_ne!(other.tokens, a.tokens, "another seed drew the same 38 tokens");

    // What only the megakernel draws is refused, and the setting stays as it was.
    for bad in [
        SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, seed: 0 },
        SamplingParams { temperature: 0.6, top_k: 33, top_p: 1.0, seed: 0 },
        SamplingParams { temperature: 0.6, top_k: 20, top_p: 0.0, seed: 0 },
    ] {
        let e = step.set_sampling(&bad).err().unwrap_or_else(|| panic!("{bad:?}: not refused"));
        eprintln!("{bad:?}: {e:#}");
    }
    let again = step.run(&engine, 0, &prompt[..2], 40, false).unwrap();
    assert_eq!(again.tokens, other.tokens, "a refused setting changed the draws");
}

/// `decode` on the streaming step (the engine's path where it can draw): without prefill the
/// same tokens as one launch of the step from the same prompt (so its launches of 1, 2, 4, ...
/// steps chain exactly), greedy and sampled, past the longest launch; it stops at the first
/// end-of-sequence token (included) and where the caller says stop, and hands every token to
/// the caller once. With the prompt through prefill, each greedy choice is the megakernel's
/// arg-max over the same sequence, or within MARGIN of its best logit. Sampling the step cannot
/// draw goes to the megakernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_runs_on_the_streaming_step_and_stops_where_asked() {
    let w = full_weights();
    let mut engine = GpuEngine::new(&w, 256).unwrap();
    let mut step = engine.stream_step(&w).unwrap();
    engine.enable_stream_decode(&w).unwrap();
    let greedy = SamplingParams::GREEDY;
    let top_p_alone = SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, seed: 0 };
    assert!(engine.decodes_with_stream_step(&greedy) && engine.decodes_with_stream_step(&TOP_K_DEFAULT));
    assert!(!engine.decodes_with_stream_step(&top_p_alone), "top-p alone is the megakernel's");
    assert_eq!(engine.decode_kernel(&top_p_alone), "megakernel");
    let prompt = random_ids(7, w.config.vocab_size, 21);
    let n = 2 * host::engine::MAX_STEPS_PER_LAUNCH + 6;
    engine.prefill_chunk = 0;
    for s in [greedy, TOP_K_DEFAULT] {
        step.set_sampling(&s).unwrap();
        let one = step.run(&engine, 0, &prompt, prompt.len() - 1 + n, false).unwrap();
        let want = &one.tokens[prompt.len()..];
        let mut seen = Vec::new();
        let g = engine
            .decode(&prompt, n, &s, &[], &mut |t| {
                seen.push(t);
                true
            })
            .unwrap();
        assert_eq!(g.tokens, want, "{s:?}: decode's launches differ from one launch");
        assert_eq!(seen, g.tokens, "{s:?}: the caller was not handed each token once");
        assert_eq!(g.stop, StopReason::MaxNewTokens);
        let eos = want[40];
        let first = want.iter().position(|&t| t == eos).unwrap();
        let g = engine.decode(&prompt, n, &s, &[eos, u32::MAX - 1], &mut |_| true).unwrap();
        assert_eq!((g.tokens.as_slice(), g.stop), (&want[..=first], StopReason::Eos), "{s:?}: the stop at {eos}");
        let mut calls = 0;
        let g = engine
            .decode(&prompt, n, &s, &[], &mut |_| {
                calls += 1;
                calls < 5
            })
            .unwrap();
        assert_eq!((g.tokens.as_slice(), g.stop), (&want[..5], StopReason::Cancelled), "{s:?}: the caller's stop");
    }

    engine.prefill_chunk = 16;
    let prompt = random_ids(40, w.config.vocab_size, 22);
    let g = engine.decode(&prompt, 12, &greedy, &[], &mut |_| true).unwrap();
    assert_eq!(g.tokens.len(), 12);
    let seq: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
    let positions: Vec<usize> = (prompt.len() - 1..seq.len() - 1).collect();
    let rows = engine.logits(&seq, &positions).unwrap();
    for (i, logits) in rows.iter().enumerate() {
        let (chosen, best) = (g.tokens[i] as usize, ops::argmax(logits) as usize);
        assert!(
            chosen == best || logits[best] - logits[chosen] < MARGIN,
            "token {i}: the streaming decode chose {chosen} (logit {}), the megakernel's best is {best} (logit {})",
            logits[chosen],
            logits[best]
        );
    }
}
