//! `host bench`: decode speed of the megakernel at several context positions, reported against
//! the HBM read bandwidth measured by a probe kernel in the same process.
//!
//! For each position P the engine generates `--steps` tokens starting at P (the KV cache
//! before P holds random bf16 data, so attention reads real-looking values, never zeros),
//! choosing them as `--sampling` says: by default as `decode` does, with the checkpoint's
//! generation_config. Bytes per token = every weight once + the KV cache up to the mid-point of the
//! launch. Each figure is the median (and min) over `--reps` launches after a warm-up.
//!
//! With `--prefill`, the prompt side instead: time to first token through prefill
//! (`prefill.rs`).

mod phases;
mod prefill;
mod split_graph;

use anyhow::{bail, ensure, Result};
use host::backend::SamplingParams;
use host::engine::abi::{FLAG_PROFILE_BARRIERS, STREAM_CLUSTER, STREAM_GRID, STREAM_THREADS};
use host::engine::stream_trace::{self, MarkSummary, TraceBlocks};
use host::engine::{GpuEngine, LaunchSpec, StreamStep};
use host::gpu::measure_read_bandwidth;
use host::model::config::GenerationConfig;
use host::model::synth::{write_checkpoint, SynthSpec};
use host::model::{checkpoint, Weights};
use host::stats::median;
use serde_json::json;
use split_graph::Comparison;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Checkpoint folder (default: the HF cache's Qwen/Qwen3-0.6B), unless --synthetic.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Use random weights of the exact Qwen3-0.6B shape (same bytes moved as the real model).
    #[arg(long)]
    synthetic: bool,
    /// Context positions to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,128,512,2048,4096")]
    positions: Vec<u32>,
    /// Tokens generated per timed launch.
    #[arg(long, default_value_t = 64)]
    steps: u32,
    /// Timed launches per position (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Diagnostics: leave stages out (bits: 1 projections, 2 attention, 4 LM head, 8 norms);
    /// the output is meaningless, the time shows what the stages cost.
    #[arg(long, default_value_t = 0, hide = true)]
    skip: u32,
    /// Also time each phase of one layer (and the LM head): cycles of work per block and of
    /// waiting at the barrier that ends it.
    #[arg(long)]
    phases: bool,
    /// Also run each position as the same step split at its barriers into separate kernels,
    /// replayed as one CUDA graph per token, and compare (same logits first, then speed).
    #[arg(long)]
    compare: bool,
    /// How tokens are chosen: `greedy`, `default` (the checkpoint's generation_config, as
    /// `decode` uses it), or `T,K,P` (temperature, top-k, top-p; 0 for K means no top-k).
    /// Repeat the flag to time several in one run.
    #[arg(long, default_value = "default", action = clap::ArgAction::Append, allow_hyphen_values = true)]
    sampling: Vec<String>,
    /// Time the streaming step (kernel/src/stream.rs, `decode`'s path on sm_90+) beside the
    /// megakernel at the same positions and samplings, in the same process, against the same
    /// probe and byte count (samplings it cannot draw, top-p without top-k or top-k above 32,
    /// are the megakernel's alone). It runs by default where the GPU and model allow it; with
    /// --stream, a GPU or model that does not is an error.
    #[arg(long, conflicts_with = "no_stream")]
    stream: bool,
    /// Time the megakernel alone.
    #[arg(long)]
    no_stream: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Instead of the decode table: the time to first token of prompts of these lengths
    /// (random ids), through prefill and one megakernel step as `decode` runs them, and
    /// prefill's TFLOP/s against our GEMM's at 4096^3 measured in the same run.
    #[arg(long, value_delimiter = ',', value_name = "L,...",
          conflicts_with_all = ["positions", "steps", "sampling", "phases", "compare", "skip"])]
    prefill: Option<Vec<usize>>,
    /// With --prefill: positions per prefill chunk; 0 = no prefill, the whole prompt through
    /// the megakernel one position per step, as `decode --prefill-chunk 0` [default: 4096, as `decode`].
    #[arg(long, requires = "prefill", value_name = "N")]
    prefill_chunk: Option<usize>,
}

/// One `--sampling` value: its label and the parameters.
fn parse_sampling(s: &str, defaults: &GenerationConfig) -> Result<(String, SamplingParams)> {
    let p = match s {
        "greedy" => SamplingParams::GREEDY,
        "default" => defaults.sampling(0),
        _ => {
            let parts: Vec<&str> = s.split(',').collect();
            ensure!(parts.len() == 3, "--sampling takes greedy, default or T,K,P; got {s:?}");
            let temperature: f32 =
                parts[0].trim().parse().map_err(|_| anyhow::anyhow!("--sampling {s:?}: bad temperature"))?;
            let top_k: u32 = parts[1].trim().parse().map_err(|_| anyhow::anyhow!("--sampling {s:?}: bad top-k"))?;
            let top_p: f32 = parts[2].trim().parse().map_err(|_| anyhow::anyhow!("--sampling {s:?}: bad top-p"))?;
            ensure!(temperature >= 0.0 && temperature.is_finite(), "--sampling {s:?}: temperature must be >= 0");
            ensure!(top_p > 0.0 && top_p <= 1.0, "--sampling {s:?}: top-p must be in (0, 1]");
            SamplingParams { temperature, top_k, top_p, seed: 0 }
        }
    };
    let label =
        if p.is_greedy() { "greedy".to_string() } else { format!("T={} k={} p={}", p.temperature, p.top_k, p.top_p) };
    Ok((if s == "default" { format!("default ({label})") } else { label }, p))
}

/// Random Qwen3-0.6B-shaped weights: written to a temporary folder by the same code as
/// `host synth`, loaded back through the checkpoint loader, then deleted.
fn synthetic_weights(seed: u64) -> Result<(Weights, GenerationConfig)> {
    let dir = std::env::temp_dir().join(format!("qwen3-bench-synth-{}", std::process::id()));
    write_checkpoint(&dir, &SynthSpec::qwen3_0_6b(seed))?;
    let w = checkpoint::load(&dir, false).and_then(|w| Ok((w, GenerationConfig::from_model_dir(&dir)?)));
    std::fs::remove_dir_all(&dir).ok();
    w
}

/// One row of the table.
struct Row {
    sampling: String,
    position: u32,
    us_median: f64,
    us_min: f64,
    bytes: u64,
    barrier_share: f64,
    comparison: Option<Comparison>,
}

/// The checkpoint `--model` (or the HF cache's) names, or `--synthetic`'s random weights.
fn load_weights(args: &BenchArgs) -> Result<(Weights, GenerationConfig)> {
    if args.synthetic {
        return synthetic_weights(1);
    }
    let dir = checkpoint::resolve_model_dir(args.model.as_deref())?;
    Ok((checkpoint::load(&dir, !args.json)?, GenerationConfig::from_model_dir(&dir)?))
}

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.steps >= 1 && args.reps >= 1, "--steps and --reps must be at least 1");
    if let Some(lengths) = &args.prefill {
        return prefill::run(&args, lengths);
    }
    ensure!(!args.positions.is_empty(), "--positions is empty");
    // A malformed --sampling fails before the checkpoint loads (the defaults come with it).
    for s in &args.sampling {
        parse_sampling(s, &GenerationConfig::default())?;
    }
    let (weights, gen_config) = load_weights(&args)?;
    let samplings = args.sampling.iter().map(|s| parse_sampling(s, &gen_config)).collect::<Result<Vec<_>>>()?;
    ensure!(
        !args.stream || samplings.iter().any(|(_, p)| StreamStep::supports(p)),
        "--stream: the streaming step draws greedy, with temperature alone or with top-k 1 to 32 (and any top-p); \
         none of the --sampling values is one of those"
    );
    let max_pos = *args.positions.iter().max().unwrap();
    let max_ctx = (max_pos + args.steps + 1) as usize;
    if max_ctx > weights.config.max_position_embeddings {
        bail!(
            "position {max_pos} + {} steps is beyond the model's {} positions",
            args.steps,
            weights.config.max_position_embeddings
        );
    }
    let mut engine = GpuEngine::new(&weights, max_ctx)?;
    // Built only when it will be timed: it uploads o and down a second time.
    let mut stream = if args.no_stream {
        None
    } else {
        match engine.stream_step(&weights) {
            Ok(step) => Some(step),
            Err(e) if args.stream => return Err(e.context("--stream")),
            Err(e) => {
                eprintln!("note: the megakernel alone (no streaming step here): {e:#}");
                None
            }
        }
    };
    drop(weights);
    engine.set_eos(&[])?; // random weights may well produce an EOS id; time every step
    engine.randomize_kv_cache(0x5eed)?;
    let probe = measure_read_bandwidth(engine.gpu(), 2 << 30)?;

    let mut rows = Vec::new();
    let mut stream_rows = Vec::new();
    for ((label, sampling), &p) in samplings.iter().flat_map(|s| args.positions.iter().map(move |p| (s, p))) {
        let spec = LaunchSpec {
            start_pos: p,
            prompt_len: 1,
            n_steps: args.steps,
            sampling: Some(*sampling),
            debug_skip: args.skip,
            ..Default::default()
        };
        let token = [1u32];
        engine.launch(&spec, &token, None)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..args.reps {
            let (out, _) = engine.launch(&spec, &token, None)?;
            ensure!(
                out.steps_done == args.steps,
                "the launch stopped after {} of {} steps",
                out.steps_done,
                args.steps
            );
            times.push(out.elapsed.as_secs_f64() * 1e6 / args.steps as f64);
        }
        let us_min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let us_median = median(&mut times);
        // Barrier waits, from a separate profiled launch (the timer reads cost a little).
        let profiled = LaunchSpec { flags: spec.flags | FLAG_PROFILE_BARRIERS, ..spec };
        let (out, _) = engine.launch(&profiled, &token, None)?;
        let waits = engine.barrier_wait_ns()?;
        let mean_wait_ns = waits.iter().sum::<u64>() as f64 / waits.len() as f64;
        let barrier_share = mean_wait_ns / (out.elapsed.as_secs_f64() * 1e9);
        let bytes = engine.weight_bytes_per_step() + engine.kv_bytes_per_step(p + args.steps / 2);
        if args.phases && !args.json {
            phases::print_phases(&mut engine, &spec, &token, p)?;
        }
        let comparison =
            if args.compare { Some(split_graph::compare_at(&mut engine, p, args.steps, args.reps)?) } else { None };
        rows.push(Row { sampling: label.clone(), position: p, us_median, us_min, bytes, barrier_share, comparison });
        if let (Some(step), true) = (stream.as_mut(), StreamStep::supports(sampling)) {
            step.set_sampling(sampling)?;
            let mut row = time_stream_step(step, &engine, p, args.steps, args.reps, bytes)?;
            row.sampling = label.clone();
            let marks = step.trace(&engine, p as usize, args.steps as usize)?;
            let clock_khz = engine.gpu().clock_rate_khz()? as f64;
            for (blocks, summary) in row.trace.iter_mut() {
                *summary = stream_trace::summarize(&marks, clock_khz, *blocks);
            }
            stream_rows.push(row);
        }
    }

    let (act_bytes, act_extra_split) = split_graph::intermediate_bytes(&engine);

    let name = engine.gpu().name().to_string();
    if args.json {
        let r: Vec<_> = rows
            .iter()
            .map(|r| {
                let gbs = r.bytes as f64 / (r.us_median * 1e-6) / 1e9;
                let split = r.comparison.as_ref().map(|c| {
                    json!({
                        "us_per_token_median": c.split_us,
                        "us_per_token_min": c.split_us_min,
                        "tokens_per_s": 1e6 / c.split_us,
                        "percent_of_probe": 100.0 * r.bytes as f64 / (c.split_us * 1e-6) / probe,
                        "kernel_launches_per_step": engine.barriers_per_step(),
                        "max_logit_diff_vs_megakernel": c.max_logit_diff,
                        "same_token_as_megakernel": c.same_token,
                    })
                });
                json!({
                    "sampling": r.sampling,
                    "position": r.position,
                    "tokens_per_s": 1e6 / r.us_median,
                    "us_per_token_median": r.us_median,
                    "us_per_token_min": r.us_min,
                    "bytes_per_token": r.bytes,
                    "gb_per_s": gbs,
                    "percent_of_probe": 100.0 * gbs * 1e9 / probe,
                    "barrier_wait_share": r.barrier_share,
                    "split_graph": split,
                })
            })
            .collect();
        let out = json!({
            "device": name,
            "grid": engine.grid(),
            "threads": engine.threads(),
            "barriers_per_step": engine.barriers_per_step(),
            "probe_read_gb_per_s": probe / 1e9,
            "steps_per_launch": args.steps,
            "reps": args.reps,
            "activation_bytes_per_step": act_bytes,
            "activation_bytes_per_step_split_extra": act_extra_split,
            "rows": r,
            "streaming_step": stream_rows.iter().map(|r| json!({
                "sampling": r.sampling,
                "position": r.position,
                "tokens_per_s": 1e6 / r.us_median,
                "us_per_token_median": r.us_median,
                "us_per_token_min": r.us_min,
                "gb_per_s": r.bytes as f64 / (r.us_median * 1e-6) / 1e9,
                "percent_of_probe": 100.0 * r.bytes as f64 / (r.us_median * 1e-6) / probe,
                "trace": r.trace.iter().map(|(blocks, summary)| json!({
                    "blocks": format!("{blocks:?}").to_lowercase(),
                    "marks": summary.iter().map(|m| json!({
                        "name": m.name,
                        "median_us": m.median_us,
                        "latest_us": m.latest_us,
                        "latest_block": m.latest_block,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "## bench: {name}, {} blocks x {} threads, {} grid barriers per step, {} steps per launch, median of {}\n",
        engine.grid(),
        engine.threads(),
        engine.barriers_per_step(),
        args.steps,
        args.reps
    );
    if args.skip != 0 {
        println!("DIAGNOSTIC RUN: stages left out (mask {}); these are not decode speeds\n", args.skip);
    }
    println!("read bandwidth probe: {:.0} GB/s\n", probe / 1e9);
    println!(
        "| sampling | position | tok/s | us/token (median) | us/token (min) | MB/token | GB/s | % of probe | barrier wait |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let speed = speed_cells(r.us_median, r.us_min, r.bytes, probe);
        println!("| {} | {} | {speed} | {:.1}% |", r.sampling, r.position, 100.0 * r.barrier_share);
    }
    if args.compare {
        print_comparison(&rows, probe, engine.barriers_per_step(), args.steps, act_bytes, act_extra_split);
    }
    if !stream_rows.is_empty() {
        println!(
            "\n## the streaming step: {STREAM_GRID} blocks in clusters of {STREAM_CLUSTER}, {STREAM_THREADS} threads, \
             no grid barrier\n"
        );
        println!(
            "| sampling | position | tok/s | us/token (median) | us/token (min) | MB/token | GB/s | % of probe | vs megakernel |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &stream_rows {
            let mega = rows.iter().find(|m| m.position == r.position && m.sampling == r.sampling);
            let ratio = mega.map_or(String::new(), |m| format!("{:.2}x", m.us_median / r.us_median));
            let speed = speed_cells(r.us_median, r.us_min, r.bytes, probe);
            println!("| {} | {} | {speed} | {ratio} |", r.sampling, r.position);
        }
        println!(
            "\ntrace of the last step of a launch (median / latest, the latest block's number; us after the layer's \
             or the LM head's start):\n"
        );
        for r in &stream_rows {
            for (blocks, summary) in &r.trace {
                // A layer's marks per kind of block; the LM head, the token and the step once.
                let step_marks = |m: &&MarkSummary| LAST_MARKS.contains(&m.name);
                let items: Vec<String> = match blocks {
                    TraceBlocks::All => summary.iter().filter(step_marks).map(trace_cell).collect(),
                    _ => summary.iter().filter(|m| !step_marks(m)).map(trace_cell).collect(),
                };
                let what = match blocks {
                    TraceBlocks::Heads => "blocks with attention",
                    TraceBlocks::Others => "other blocks",
                    TraceBlocks::All => "all blocks",
                };
                println!("- {}, position {}, {what}: {}", r.sampling, r.position, items.join(", "));
            }
        }
    }
    Ok(())
}

/// A table row's speed cells: tok/s, us/token (median, min), MB/token, GB/s, % of the probe.
fn speed_cells(us_median: f64, us_min: f64, bytes: u64, probe: f64) -> String {
    let gbs = bytes as f64 / (us_median * 1e-6) / 1e9;
    format!(
        "{:.0} | {us_median:.1} | {us_min:.1} | {:.1} | {gbs:.0} | {:.1}%",
        1e6 / us_median,
        bytes as f64 / 1e6,
        100.0 * gbs * 1e9 / probe
    )
}

/// The trace's marks of a step rather than of a layer.
const LAST_MARKS: [&str; 3] = ["LM head pages", "token known", "step"];

fn trace_cell(m: &MarkSummary) -> String {
    format!("{} {:.2}/{:.2} (b{})", m.name, m.median_us, m.latest_us, m.latest_block)
}

/// One row of the streaming step's table.
struct StreamRow {
    sampling: String,
    position: u32,
    us_median: f64,
    us_min: f64,
    bytes: u64,
    /// The trace's marks over the blocks with attention, the others, and all of them.
    trace: [(TraceBlocks, Vec<MarkSummary>); 3],
}

/// The streaming step at position `p`: `steps` tokens a launch, one warm-up, `reps` timed
/// launches, each from launch to completion as the megakernel's rows are timed.
fn time_stream_step(
    step: &mut StreamStep,
    engine: &GpuEngine,
    p: u32,
    steps: u32,
    reps: u32,
    bytes: u64,
) -> Result<StreamRow> {
    let token = [1u32];
    step.run(engine, p as usize, &token, steps as usize, false)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        step.launch(engine, p as usize, &token, steps as usize, false)?;
        engine.gpu().synchronize()?;
        times.push(started.elapsed().as_secs_f64() * 1e6 / steps as f64);
    }
    let us_min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let trace = [(TraceBlocks::Heads, Vec::new()), (TraceBlocks::Others, Vec::new()), (TraceBlocks::All, Vec::new())];
    Ok(StreamRow { sampling: String::new(), position: p, us_median: median(&mut times), us_min, bytes, trace })
}

fn print_comparison(rows: &[Row], probe: f64, barriers: u32, steps: u32, act_bytes: u64, act_extra: u64) {
    println!("\n## megakernel vs the same step as {barriers} kernels in a CUDA graph\n");
    println!(
        "| position | variant | tok/s | us/token (median) | us/token (min) | % of probe | grid barriers per step | \
         launches per step | barrier wait | logits vs megakernel |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let Some(c) = &r.comparison else { continue };
        let pct = |us: f64| 100.0 * r.bytes as f64 / (us * 1e-6) / probe;
        println!(
            "| {} | megakernel | {:.0} | {:.1} | {:.1} | {:.1}% | {barriers} | 1/{steps} | {:.1}% | |",
            r.position,
            1e6 / r.us_median,
            r.us_median,
            r.us_min,
            pct(r.us_median),
            100.0 * r.barrier_share
        );
        println!(
            "| {} | split + graph | {:.0} | {:.1} | {:.1} | {:.1}% | 0 | {barriers} | | {} (max diff {:.1e}), {} |",
            r.position,
            1e6 / c.split_us,
            c.split_us,
            c.split_us_min,
            pct(c.split_us),
            if c.max_logit_diff == 0.0 { "identical" } else { "differ" },
            c.max_logit_diff,
            if c.same_token { "same token" } else { "DIFFERENT TOKEN" }
        );
    }
    println!(
        "\nactivations between phases (through L2, both variants): {:.1} MB per step; the split kernels \
         also re-read each block's residual rows: +{:.0} KB",
        act_bytes as f64 / 1e6,
        act_extra as f64 / 1e3
    );
}
