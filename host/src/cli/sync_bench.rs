//! `host sync-bench`: what one grid-wide barrier costs next to one kernel launch, measured with
//! our own Rust kernels (`probe_grid_syncs`, `probe_empty` in kernel/src/probes.rs). This is the
//! number the megakernel design rests on: a decode step needs a few hundred global syncs, and
//! each costs either a grid barrier (one cooperative kernel) or a kernel boundary.
//!
//! Four measurements, each on the GPU clock (events), after warm-up, repeated `--reps` times:
//! a cooperative kernel with N grid barriers, the same with 1, N plain launches of an empty
//! kernel, and one CUDA graph of N empty kernels. Per-op costs follow from them.

use anyhow::{bail, Result};
use host::gpu::{measure_l2_latency, Gpu};
use host::stats::median;
use std::ffi::c_void;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct SyncBenchArgs {
    /// Blocks in the grid (default: one per SM).
    #[arg(long)]
    blocks: Option<u32>,
    /// Threads per block.
    #[arg(long, default_value_t = 256)]
    threads: u32,
    /// Grid barriers per cooperative kernel, and kernels per launch batch and per graph.
    #[arg(long, default_value_t = 225)]
    syncs: u32,
    /// Timed repetitions of each measurement (the median and minimum are reported).
    #[arg(long, default_value_t = 30)]
    reps: u32,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// Also measure an L2 round trip while other warps of the same blocks stream from DRAM
    /// (probe_chain_under_stream; allocates about 0.6 GB). Markdown only.
    #[arg(long)]
    l2_latency: bool,
}

/// Reference figures from the design analysis (N = 225), in microseconds.
struct Reference {
    label: &'static str,
    coop_n: Option<f64>,
    coop_1: Option<f64>,
    launches: Option<f64>,
    graph: Option<f64>,
}

const REFERENCES: [Reference; 2] = [
    Reference {
        label: "RTX 3090, 82x256 (CUDA C++)",
        coop_n: Some(167.3),
        coop_1: Some(3.9),
        launches: Some(347.5),
        graph: Some(186.9),
    },
    Reference {
        label: "H200, 132x256 (CUDA C++ cooperative_groups)",
        coop_n: Some(220.0),
        coop_1: None,
        launches: Some(1071.0),
        graph: Some(162.0),
    },
];
const REFERENCE_N: f64 = 225.0;

impl Reference {
    /// From the N-vs-1 difference where both were measured, else N-sync time / N.
    fn per_sync(&self) -> Option<f64> {
        let c = self.coop_n?;
        Some(match self.coop_1 {
            Some(c1) => (c - c1) / (REFERENCE_N - 1.0),
            None => c / REFERENCE_N,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    median_us: f64,
    min_us: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    let median_us = median(&mut v);
    Stat { median_us, min_us: v[0] }
}

pub fn run(args: SyncBenchArgs) -> Result<()> {
    if args.syncs < 2 {
        bail!("--syncs must be at least 2 (the per-barrier cost is (N-sync time - 1-sync time) / (N - 1))");
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if args.l2_latency && args.json {
        bail!("--l2-latency prints a markdown table only; run it without --json");
    }
    // Every kernel in kernel/ carries `.maxntid 512` (build.rs), so no block may be larger.
    if args.threads == 0 || args.threads > 512 || !args.threads.is_multiple_of(32) {
        bail!("--threads must be a multiple of 32 between 32 and 512");
    }
    let gpu = Gpu::new(args.device)?;
    let blocks = args.blocks.unwrap_or(gpu.sm_count());
    let threads = args.threads;
    let n = args.syncs;

    let syncs_k = gpu.kernel("probe_grid_syncs")?;
    let empty_k = gpu.kernel("probe_empty")?;
    let per_sm = syncs_k.max_blocks_per_sm(threads, 0)?;
    if blocks == 0 || blocks > per_sm * gpu.sm_count() {
        bail!(
            "grid cannot be co-resident: {blocks} blocks of {threads} threads requested, at most {} fit \
             ({per_sm} per SM x {} SMs)",
            per_sm * gpu.sm_count(),
            gpu.sm_count()
        );
    }
    // The barrier word: zero once; every barrier leaves its low 31 bits at zero again.
    let bar = gpu.alloc::<u32>(1, "the grid barrier")?;
    let bar_ptr = bar.as_device_ptr().as_raw();

    let coop = |syncs: u32| -> Result<()> {
        let mut p = bar_ptr;
        let mut s = syncs;
        let mut args = [&mut p as *mut u64 as *mut c_void, &mut s as *mut u32 as *mut c_void];
        // SAFETY: probe_grid_syncs(bar: *mut u32, syncs: u32); `bar` is a live device word.
        unsafe { syncs_k.launch_cooperative(gpu.stream(), blocks, threads, 0, &mut args) }
    };
    let launches = |count: u32| -> Result<()> {
        let mut p = bar_ptr;
        for _ in 0..count {
            let mut args = [&mut p as *mut u64 as *mut c_void];
            // SAFETY: probe_empty(_x: *mut u32) never dereferences its argument.
            unsafe { empty_k.launch(gpu.stream(), blocks, threads, 0, &mut args)? };
        }
        Ok(())
    };

    // Warm up (module load, first-launch costs, clocks) and catch a deadlock before timing.
    for _ in 0..3 {
        coop(n)?;
        coop(1)?;
        launches(n)?;
    }
    gpu.synchronize_timeout(Duration::from_secs(20))?;
    gpu.begin_capture()?;
    let captured = launches(n);
    let graph = gpu.end_capture();
    captured?;
    let graph = graph?;
    for _ in 0..3 {
        graph.launch(gpu.stream())?;
    }
    gpu.synchronize_timeout(Duration::from_secs(20))?;

    let (mut t_coop_n, mut t_coop_1, mut t_launch, mut t_graph) = (vec![], vec![], vec![], vec![]);
    for _ in 0..args.reps {
        t_coop_n.push(gpu.time_ms(|| coop(n))? as f64 * 1e3);
        t_coop_1.push(gpu.time_ms(|| coop(1))? as f64 * 1e3);
        t_launch.push(gpu.time_ms(|| launches(n))? as f64 * 1e3);
        t_graph.push(gpu.time_ms(|| graph.launch(gpu.stream()))? as f64 * 1e3);
    }
    gpu.synchronize()?;
    let word = gpu.download(&bar)?[0];
    if word & 0x7fff_ffff != 0 {
        bail!("the grid barrier word ended at {word:#010x}: its low 31 bits should be zero (barrier bug)");
    }

    let (coop_n, coop_1, launch, graph_t) = (stat(t_coop_n), stat(t_coop_1), stat(t_launch), stat(t_graph));
    let nf = n as f64;
    let per_sync = (coop_n.median_us - coop_1.median_us) / (nf - 1.0);
    let per_launch = launch.median_us / nf;
    let per_graph = graph_t.median_us / nf;

    if args.json {
        let s = |x: Stat| serde_json::json!({ "median_us": x.median_us, "min_us": x.min_us });
        let refs: Vec<_> = REFERENCES
            .iter()
            .map(|r| {
                serde_json::json!({
                    "label": r.label, "n": REFERENCE_N,
                    "coop_n_us": r.coop_n, "coop_1_us": r.coop_1, "launches_us": r.launches, "graph_us": r.graph,
                    "per_grid_sync_us": r.per_sync(),
                    "per_launch_us": r.launches.map(|l| l / REFERENCE_N),
                    "per_graph_kernel_us": r.graph.map(|g| g / REFERENCE_N),
                })
            })
            .collect();
        let out = serde_json::json!({
            "device": gpu.name(), "sm_count": gpu.sm_count(),
            "compute_capability": format!("{}.{}", gpu.compute_capability().0, gpu.compute_capability().1),
            "blocks": blocks, "threads": threads, "n": n, "reps": args.reps,
            "coop_n_syncs": s(coop_n), "coop_1_sync": s(coop_1), "n_launches": s(launch), "graph_n_kernels": s(graph_t),
            "per_grid_sync_us": per_sync, "per_launch_us": per_launch, "per_graph_kernel_us": per_graph,
            "reference": refs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    let r0 = &REFERENCES[0];
    let r1 = &REFERENCES[1];
    println!(
        "## sync-bench: {} (sm_{}{}, {} SMs), {blocks} x {threads}, N = {n}, {} reps\n",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count(),
        args.reps
    );
    println!("| measurement | median us | min us | {} | {} |", r0.label, r1.label);
    println!("|---|---:|---:|---:|---:|");
    let row = |what: String, s: Stat, a: Option<f64>, b: Option<f64>| {
        println!("| {what} | {:.2} | {:.2} | {} | {} |", s.median_us, s.min_us, fmt(a), fmt(b));
    };
    row(format!("cooperative kernel, {n} grid syncs"), coop_n, r0.coop_n, r1.coop_n);
    row("cooperative kernel, 1 grid sync".into(), coop_1, r0.coop_1, r1.coop_1);
    row(format!("{n} launches of an empty kernel"), launch, r0.launches, r1.launches);
    row(format!("CUDA graph of {n} empty kernels"), graph_t, r0.graph, r1.graph);
    let per = |what: &str, v: f64, a: Option<f64>, b: Option<f64>| {
        println!("| {what} | {v:.3} | | {} | {} |", fmt(a), fmt(b));
    };
    per("per grid sync ((N - 1) syncs difference)", per_sync, r0.per_sync(), r1.per_sync());
    per("per kernel launch", per_launch, r0.launches.map(|l| l / REFERENCE_N), r1.launches.map(|l| l / REFERENCE_N));
    per("per graph kernel", per_graph, r0.graph.map(|g| g / REFERENCE_N), r1.graph.map(|g| g / REFERENCE_N));
    println!(
        "\nTimes are GPU event intervals around the enqueued work, so single launches include their launch \
         latency. Reference columns: the design analysis's measurements with N = 225 (per-op: RTX 3090 grid \
         sync from the 225-vs-1 difference, H200 grid sync as 225-sync time / 225)."
    );
    if args.l2_latency {
        l2_latency(&gpu)?;
    }
    Ok(())
}

fn l2_latency(gpu: &Gpu) -> Result<()> {
    let rows = measure_l2_latency(gpu)?;
    let mhz = gpu.clock_rate_khz()? as f64 / 1e3;
    println!(
        "\n## one L2 round trip while DRAM streams ({} blocks x 384 threads; warp 0 of each block walks \
         64 dependent L2 hits while other warps stream 8 KiB bursts)\n",
        gpu.sm_count()
    );
    println!("| warps streaming per block | cycles per L2 hit (median over blocks) | min | max | ns (median) | streamed GB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let gbs = if r.streaming_warps > 0 { format!("{:.0}", r.streamed_gb_s) } else { "-".into() };
        let (med, lo, hi) = r.cycles;
        println!("| {} | {med} | {lo} | {hi} | {:.0} | {gbs} |", r.label, med as f64 * 1e3 / mhz);
    }
    println!(
        "\nStreamed GB/s is the bursts' bytes over the whole kernel's time (the walk included), a lower \
         bound on the streaming rate."
    );
    Ok(())
}
