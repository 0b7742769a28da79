//! The latency of one L2 round trip while other warps stream from DRAM
//! (`probe_chain_under_stream` in kernel/src/probes.rs), for `sync-bench --l2-latency`.

use super::{kernel_arg, Gpu};
use anyhow::Result;

/// One row of `measure_l2_latency`.
#[derive(Debug, Clone)]
pub struct L2Latency {
    pub label: &'static str,
    /// Warps per block streaming from DRAM meanwhile.
    pub streaming_warps: u32,
    /// SM cycles per dependent L2 hit: median, min and max over the blocks.
    pub cycles: (u64, u64, u64),
    /// The bursts' bytes over the kernel's time (0 without streams).
    pub streamed_gb_s: f64,
}

/// The decode kernel's critical chains are dependent round trips to L2 (barrier polls, input
/// vectors, attention merges) made while weights stream from DRAM. This measures one such round
/// trip (warp 0 of every block walking a cycle of L2-resident words) with 0, 2, 9 or 11 other
/// warps of each 384-thread block streaming 8 KiB bursts, as the GEMVs request their weights.
pub fn measure_l2_latency(gpu: &Gpu) -> Result<Vec<L2Latency>> {
    let (blocks, threads, rounds, hops) = (gpu.sm_count(), 384u32, 48u32, 64u32);
    let big = gpu.alloc::<u32>((blocks * threads / 32 * rounds * 2048) as usize, "streamed buffer")?;
    // A cycle through all 4096 words, each step to another 128-byte line.
    let hot_v: Vec<u32> = (0..4096u32).map(|j| (j + 97 * 33) % 4096).collect();
    let hot = gpu.upload(&hot_v, "L2-resident cycle")?;
    let out = gpu.alloc::<u64>(blocks as usize, "cycles per step")?;
    let k = gpu.kernel("probe_chain_under_stream")?;
    let modes = [
        (0u32, "none", 0u32),
        (2, "2, on warp 0's sub-partition", 2),
        (1, "9, on the other sub-partitions", 9),
        (3, "11, all others", 11),
    ];
    let mut rows = Vec::new();
    for (mode, label, streaming_warps) in modes {
        let mut ms = 0.0;
        // The first run warms up (module load, the cycle into L2); the last one counts.
        for _ in 0..3 {
            let (mut pb, mut pr, mut ph, mut hp, mut m, mut po) = (
                big.as_device_ptr().as_raw(),
                rounds,
                hot.as_device_ptr().as_raw(),
                hops,
                mode,
                out.as_device_ptr().as_raw(),
            );
            let mut a = [
                kernel_arg(&mut pb),
                kernel_arg(&mut pr),
                kernel_arg(&mut ph),
                kernel_arg(&mut hp),
                kernel_arg(&mut m),
                kernel_arg(&mut po),
            ];
            // SAFETY: probe_chain_under_stream(big, rounds, hot, hops, mode, out): `big` holds
            // every warp's rounds * 8 KiB, `hot` 4096 words, `out` one u64 per block; 128 bytes
            // of dynamic shared memory.
            ms = gpu.time_ms(|| unsafe { k.launch(gpu.stream(), blocks, threads, 128, &mut a) })? as f64;
        }
        let mut v = gpu.download(&out)?;
        v.sort_unstable();
        let bytes = (streaming_warps * blocks * rounds) as f64 * 8192.0;
        rows.push(L2Latency {
            label,
            streaming_warps,
            cycles: (v[v.len() / 2], v[0], v[v.len() - 1]),
            streamed_gb_s: bytes / (ms * 1e-3) / 1e9,
        });
    }
    Ok(rows)
}
