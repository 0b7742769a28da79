//! `bench --phases`: where one decode step's time goes, per phase of one layer and the LM head,
//! from the kernel's own cycle counters (FLAG_PROFILE_PHASES).

use anyhow::Result;
use host::engine::abi::{FLAG_PROFILE_PHASES, PROFILE_LAYER, PROFILE_SLOTS};
use host::engine::schedule::{profile_index, PhaseOp, MARKS, PROFILED_PHASES};
use host::engine::{GpuEngine, LaunchSpec};
use host::stats::median;

/// One profiled launch; prints per phase the min, median, mean and max work per block and the
/// mean wait, then the slowest blocks of the LM head.
pub(super) fn print_phases(engine: &mut GpuEngine, spec: &LaunchSpec, token: &[u32], position: u32) -> Result<()> {
    let profiled = LaunchSpec { flags: spec.flags | FLAG_PROFILE_PHASES, ..*spec };
    engine.launch(&profiled, token, None)?;
    let cycles = engine.phase_cycles()?;
    let mhz = engine.gpu().clock_rate_khz()? as f64 / 1e3;
    println!("phases at position {position} (layer {PROFILE_LAYER}; us at the {mhz:.0} MHz max clock):");
    println!("| phase | work min | work median | work mean | work max | wait mean |");
    println!("|---|---:|---:|---:|---:|---:|");
    let blocks = cycles.len() / PROFILE_SLOTS;
    for (i, name) in PROFILED_PHASES.iter().map(|ph| ph.name).enumerate() {
        let work: Vec<f64> = (0..blocks).map(|b| cycles[b * PROFILE_SLOTS + 2 * i] as f64 / mhz).collect();
        let wait: Vec<f64> = (0..blocks).map(|b| cycles[b * PROFILE_SLOTS + 2 * i + 1] as f64 / mhz).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let min = work.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = work.iter().cloned().fold(0.0, f64::max);
        let mid = median(&mut work.clone());
        println!("| {name} | {min:.2} | {mid:.2} | {:.2} | {max:.2} | {:.2} |", mean(&work), mean(&wait));
    }
    // Which blocks hold up the LM head (the last one to finish also reduces every partial).
    let lm = profile_index(PhaseOp::LmHead);
    let mut by_work: Vec<(usize, f64)> =
        (0..blocks).map(|b| (b, cycles[b * PROFILE_SLOTS + 2 * lm] as f64 / mhz)).collect();
    by_work.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest: Vec<String> = by_work.iter().take(8).map(|(b, t)| format!("{b} ({t:.1})")).collect();
    println!("slowest LM-head blocks (us): {}", slowest.join(", "));
    let mean_slot =
        |slot: usize| (0..blocks).map(|b| cycles[b * PROFILE_SLOTS + slot] as f64 / mhz).sum::<f64>() / blocks as f64;
    let marks: Vec<String> = MARKS.iter().map(|&(slot, what)| format!("{what} {:.2}", mean_slot(slot))).collect();
    println!("marks inside phases (us from the phase's start): {}\n", marks.join("; "));
    Ok(())
}
