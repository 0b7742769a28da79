//! `host bench --prefill 128,1024,4096`: the time to first token of prompts of L tokens, run
//! the way `decode` runs them: `GpuEngine::prefill` of the first L - 1 tokens in chunks of
//! `--prefill-chunk`, then one greedy megakernel step at position L - 1, which computes the
//! first new token. Each figure is the median over `--reps` runs after a warm-up run (the
//! first prefill of a size allocates its work buffers), wall time on the host, as a user of
//! `decode` waits for it.
//!
//! Prefill's FLOPs per layer, for m = L - 1 positions from position 0: 2 m n k for each of the
//! q/k/v, o, gate, up and down GEMMs, and for attention 4 head_dim per (query, key) pair and q
//! head (q.k and p.v, a multiply-add each), over the m (m + 1) / 2 causal pairs. Its TFLOP/s
//! are reported against our own GEMM's (`gemm_bf16` at 4096^3, `gpu::measure_gemm_rate`)
//! measured in the same process: the matrix rate prefill could reach if it were all GEMM.
//!
//! With `--prefill-chunk 0` the whole prompt goes through the megakernel in one launch (as
//! `decode --prefill-chunk 0` does): only the time to first token is measured.

use super::{load_weights, BenchArgs};
use anyhow::{ensure, Result};
use host::backend::SamplingParams;
use host::engine::{GpuEngine, LaunchSpec, DEFAULT_PREFILL_CHUNK};
use host::gpu::measure_gemm_rate;
use host::model::synth::random_ids;
use host::model::Qwen3Config;
use host::stats::median;
use serde_json::json;
use std::time::Instant;

/// M = N = K of the GEMM probe.
const PROBE_SIZE: usize = 4096;

/// FLOPs of a prefill of `m` positions from position 0 (see the module).
fn prefill_flops(c: &Qwen3Config, m: usize) -> f64 {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let weights_per_position = (q + 2 * kv) * h + h * q + 2 * i * h + h * i;
    let gemm = 2.0 * m as f64 * weights_per_position as f64;
    let pairs = m as f64 * (m as f64 + 1.0) / 2.0;
    let attention = 4.0 * (c.head_dim * c.num_attention_heads) as f64 * pairs;
    c.num_hidden_layers as f64 * (gemm + attention)
}

/// One prompt length's figures.
struct Row {
    tokens: usize,
    ttft_s: f64,
    ttft_min_s: f64,
    /// None without prefill (`--prefill-chunk 0`).
    prefill_s: Option<f64>,
    flops: f64,
}

/// One run: `(time to first token, time of the prefill)` in seconds (the latter None with
/// `chunk` 0).
fn time_to_first_token(engine: &mut GpuEngine, tokens: &[u32], chunk: usize) -> Result<(f64, Option<f64>)> {
    let last = tokens.len() - 1;
    let greedy = Some(SamplingParams::GREEDY);
    let start = Instant::now();
    let (prefill_s, spec) = if chunk > 0 {
        engine.prefill(&tokens[..last], 0, chunk)?;
        let prefilled = start.elapsed().as_secs_f64();
        (
            Some(prefilled),
            LaunchSpec { start_pos: last as u32, prompt_len: 1, n_steps: 1, sampling: greedy, ..Default::default() },
        )
    } else {
        let n = tokens.len() as u32;
        (None, LaunchSpec { start_pos: 0, prompt_len: n, n_steps: n, sampling: greedy, ..Default::default() })
    };
    let fed = &tokens[spec.start_pos as usize..];
    let (outcome, generated) = engine.launch(&spec, fed, None)?;
    let ttft = start.elapsed().as_secs_f64();
    ensure!(
        outcome.steps_done == spec.n_steps && generated.len() == 1,
        "the launch ran {} of {} steps and generated {} tokens, not 1",
        outcome.steps_done,
        spec.n_steps,
        generated.len()
    );
    Ok((ttft, prefill_s))
}

pub(super) fn run(args: &BenchArgs, lengths: &[usize]) -> Result<()> {
    ensure!(!lengths.is_empty(), "--prefill is empty");
    if let Some(&l) = lengths.iter().find(|&&l| l < 2) {
        anyhow::bail!("--prefill {l}: a prompt needs at least 2 tokens for one of them to be prefilled");
    }
    let chunk = args.prefill_chunk.unwrap_or(DEFAULT_PREFILL_CHUNK);
    let (weights, _) = load_weights(args)?;
    let c = weights.config.clone();
    let longest = *lengths.iter().max().expect("not empty");
    // The first new token takes the position after the prompt.
    let max_ctx = longest + 1;
    ensure!(
        max_ctx <= c.max_position_embeddings,
        "--prefill {longest}: a prompt of {longest} tokens and its first new token are beyond the model's {} positions",
        c.max_position_embeddings
    );
    let mut engine = GpuEngine::new(&weights, max_ctx)?;
    drop(weights);
    engine.set_eos(&[])?;
    if chunk > 0 {
        // The chunk and the model's shapes, checked before the probe's seconds are spent.
        engine.check_prefill(&[], 0, chunk)?;
    }
    let probe = measure_gemm_rate(engine.gpu(), PROBE_SIZE)?;

    let mut rows = Vec::new();
    for &l in lengths {
        let tokens = random_ids(l, c.vocab_size, 0x5eed + l as u64);
        time_to_first_token(&mut engine, &tokens, chunk)?; // warm-up
        let (mut ttft, mut prefill) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            let (t, p) = time_to_first_token(&mut engine, &tokens, chunk)?;
            ttft.push(t);
            prefill.extend(p);
        }
        let ttft_min_s = ttft.iter().cloned().fold(f64::INFINITY, f64::min);
        let prefill_s = (!prefill.is_empty()).then(|| median(&mut prefill));
        rows.push(Row { tokens: l, ttft_s: median(&mut ttft), ttft_min_s, prefill_s, flops: prefill_flops(&c, l - 1) });
    }

    let name = engine.gpu().name().to_string();
    let tflops = |r: &Row| r.prefill_s.map(|s| r.flops / s / 1e12);
    if args.json {
        let r: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "prompt_tokens": r.tokens,
                    "ttft_ms": r.ttft_s * 1e3,
                    "ttft_ms_min": r.ttft_min_s * 1e3,
                    "prompt_tokens_per_s": r.tokens as f64 / r.ttft_s,
                    "prefill_ms": r.prefill_s.map(|s| s * 1e3),
                    "prefill_flops": r.flops,
                    "prefill_tflops": tflops(r),
                    "percent_of_gemm_probe": tflops(r).map(|t| 100.0 * t * 1e12 / probe),
                })
            })
            .collect();
        let out = json!({
            "device": name,
            "prefill_chunk": chunk,
            "reps": args.reps,
            "gemm_probe_size": PROBE_SIZE,
            "gemm_probe_tflops": probe / 1e12,
            "rows": r,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let how =
        if chunk > 0 { format!("prefill in chunks of {chunk}") } else { "no prefill (the megakernel alone)".into() };
    println!(
        "## bench --prefill: {name}, {how}, then one greedy megakernel step; median of {} after a warm-up\n",
        args.reps
    );
    println!("GEMM probe (gemm_bf16 at {PROBE_SIZE}^3): {:.1} TFLOP/s\n", probe / 1e12);
    println!("| prompt tokens | TTFT ms | prompt tok/s | prefill ms | prefill TFLOP/s | % of GEMM probe |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let or_dash = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in &rows {
        let percent = tflops(r).map_or("-".to_string(), |t| format!("{:.1}%", 100.0 * t * 1e12 / probe));
        println!(
            "| {} | {:.2} | {:.0} | {} | {} | {percent} |",
            r.tokens,
            r.ttft_s * 1e3,
            r.tokens as f64 / r.ttft_s,
            or_dash(r.prefill_s.map(|s| s * 1e3), 2),
            or_dash(tflops(r), 1),
        );
    }
    Ok(())
}
