//! GPU checks of the device module (kernel/src/device.rs) and of the host's GPU layer, through
//! the test kernels in kernel/src/probes.rs. Every GPU test is ignored by default; run them on a
//! machine with an NVIDIA GPU:
//!
//!     cargo test --release -p tests --test gpu_device -- --ignored --test-threads=1
//!
//! Results are compared with the CPU bit for bit where the device computes exactly (shuffle
//! reductions are replayed in the same order on the CPU), and within documented error bounds
//! for the approximate math instructions.

mod common;
use common::watchdog;
use cust::memory::DeviceBuffer;
use host::gpu::{Gpu, HostRing};
use std::ffi::c_void;
use std::time::{Duration, Instant};

/// Seconds a test waits for its kernel before calling it stuck (60, or QWEN3_WATCHDOG_SECS).
const WAIT_SECS: u64 = 60;

fn open_gpu() -> Gpu {
    match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => panic!("opening GPU 0: {e:#}"),
    }
}

/// Kernel arguments as `cuLaunchKernel` wants them: pointers to each argument's value.
/// Each argument must be a mutable local (a `u64` device pointer or a scalar).
macro_rules! args {
    ($($v:ident),* $(,)?) => { [$( &mut $v as *mut _ as *mut c_void ),*] };
}

fn dptr<T: cust::memory::DeviceCopy>(b: &DeviceBuffer<T>) -> u64 {
    b.as_device_ptr().as_raw()
}

/// splitmix64: reproducible test data without extra dependencies.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

// ---------------------------------------------------------------- the host layer itself

/// Not ignored: without a driver (CI with the stub libcuda), opening a GPU must fail with a
/// clear message; with one, it must work.
#[test]
fn gpu_new_fails_cleanly_or_works() {
    match Gpu::new(0) {
        Ok(g) => assert!(g.sm_count() > 0),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("no CUDA GPU found"), "unexpected error text: {msg}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_layer_basics() {
    let gpu = open_gpu();
    // A second handle on the same device, alive at the same time.
    let gpu2 = open_gpu();
    println!(
        "{} (sm_{}{}), {} SMs, driver {}, coop {}, smem opt-in {} B, L2 {} B",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count(),
        gpu.driver_version().unwrap(),
        gpu.supports_cooperative_launch(),
        gpu.max_shared_per_block_optin(),
        gpu.l2_cache_bytes()
    );
    assert!(!gpu.name().is_empty());
    assert!(gpu.sm_count() > 0);
    assert!(gpu.compute_capability().0 >= 8);
    assert!(gpu.supports_cooperative_launch());
    assert_eq!(gpu.name(), gpu2.name());
    let (free, total) = gpu.memory_info().unwrap();
    assert!(free > 0 && free <= total, "free {free} total {total}");

    // Unknown kernel: a clear error.
    let err = gpu.kernel("no_such_kernel").err().expect("looking up a missing kernel must fail");
    assert!(format!("{err:#}").contains("no_such_kernel"), "{err:#}");

    // Out of memory: the promised message.
    let err = gpu.alloc::<u8>(total * 4, "an impossible buffer").expect_err("allocating 4x the GPU must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("out of GPU memory allocating") && msg.contains("an impossible buffer"), "{msg}");

    // alloc zeroes; upload/download round-trips.
    let z = gpu.alloc::<u32>(1000, "zeros").unwrap();
    assert!(gpu.download(&z).unwrap().iter().all(|&v| v == 0));
    let data: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let up = gpu.upload(&data, "data").unwrap();
    assert_eq!(gpu.download(&up).unwrap(), data);
    // Buffers from the second handle work while the first lives.
    let up2 = gpu2.upload(&data, "data2").unwrap();
    assert_eq!(gpu2.download(&up2).unwrap(), data);
    drop(up2);
    drop(gpu2);
    // ...and the first handle still works after the second is gone.
    assert_eq!(gpu.download(&up).unwrap(), data);

    // Co-residency checks.
    let k = gpu.kernel("probe_grid_syncs").unwrap();
    let per_sm = k.max_blocks_per_sm(256, 0).unwrap();
    assert!(per_sm >= 1);
    assert_eq!(k.cooperative_grid(256, 0, 1).unwrap(), gpu.sm_count());
    let err = k.cooperative_grid(256, 0, per_sm + 1).expect_err("too many blocks per SM must fail");
    assert!(format!("{err:#}").contains("grid cannot be co-resident"), "{err:#}");
    let bar = gpu.alloc::<u32>(1, "bar").unwrap();
    let (mut b, mut n) = (dptr(&bar), 1u32);
    let too_many = per_sm * gpu.sm_count() + 1;
    let err = unsafe { k.launch_cooperative(gpu.stream(), too_many, 256, 0, &mut args!(b, n)) }
        .expect_err("an oversized cooperative grid must be refused");
    assert!(format!("{err:#}").contains("co-resident"), "{err:#}");
    // Shared memory above the opt-in limit is refused before the driver sees it.
    assert!(k.set_max_dynamic_smem(gpu.max_shared_per_block_optin() + 1).is_err());
    k.set_max_dynamic_smem(64 * 1024).unwrap();
    gpu.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_capture_and_timing() {
    let gpu = open_gpu();
    let n_vec4 = 1u32 << 16;
    let mut rng = Rng(7);
    let data: Vec<u32> = (0..n_vec4 * 4).map(|_| rng.next_u32()).collect();
    let src = gpu.upload(&data, "src").unwrap();
    let d1 = gpu.alloc::<u32>(data.len(), "d1").unwrap();
    let d2 = gpu.alloc::<u32>(data.len(), "d2").unwrap();
    let d3 = gpu.alloc::<u32>(data.len(), "d3").unwrap();
    let k = gpu.kernel("test_vector_loads").unwrap();
    let (mut s, mut n, mut a, mut b, mut c) = (dptr(&src), n_vec4, dptr(&d1), dptr(&d2), dptr(&d3));

    gpu.begin_capture().unwrap();
    for _ in 0..5 {
        unsafe { k.launch(gpu.stream(), 64, 256, 0, &mut args!(s, n, a, b, c)) }.unwrap();
    }
    let graph = gpu.end_capture().unwrap();
    // Capturing ran nothing.
    assert!(gpu.download(&d1).unwrap().iter().all(|&v| v == 0), "a captured launch ran during capture");
    graph.launch(gpu.stream()).unwrap();
    gpu.synchronize().unwrap();
    assert_eq!(gpu.download(&d1).unwrap(), data);
    assert_eq!(gpu.download(&d3).unwrap(), data);

    let ms = gpu.time_ms(|| graph.launch(gpu.stream())).unwrap();
    println!("graph of 5 copies of 1 MiB: {ms:.4} ms");
    assert!(ms > 0.0 && ms < 1000.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn read_bandwidth_probe() {
    let gpu = open_gpu();
    let bw = host::gpu::measure_read_bandwidth(&gpu, 1 << 30).unwrap();
    println!("{}: read bandwidth {:.0} GB/s", gpu.name(), bw / 1e9);
    assert!(bw > 100e9 && bw < 20e12, "implausible bandwidth {bw}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn l2_latency_probe() {
    let gpu = open_gpu();
    let rows = host::gpu::measure_l2_latency(&gpu).unwrap();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        println!("{}: {:?} cycles per L2 hit, {:.0} GB/s streamed", r.label, r.cycles, r.streamed_gb_s);
        let (med, lo, hi) = r.cycles;
        // An L2 hit takes a few hundred cycles; zero means the walk never ran, a huge value that
        // it went to DRAM or hung.
        assert!(lo > 50 && lo <= med && med <= hi && hi < 100_000, "implausible cycles {:?} ({})", r.cycles, r.label);
        if r.streaming_warps > 0 {
            assert!(r.streamed_gb_s > 10.0 && r.streamed_gb_s < 20_000.0, "implausible stream {}", r.streamed_gb_s);
        }
    }
}

// ---------------------------------------------------------------- the grid barrier

/// Which barrier-visibility kernel `barrier_check` runs.
#[derive(Clone, Copy, PartialEq)]
enum BarrierKind {
    /// `grid_sync`, the sense in a register.
    Sync,
    /// `grid_arrive`, other work, `grid_wait`.
    Split,
    /// The decode kernel's form: the sense in shared memory (`grid_wait_at`).
    SenseInShared,
}

/// Runs a barrier-visibility kernel cooperatively with `blocks` blocks of 256 threads for
/// `rounds` rounds and checks: no stale slot seen, every slot at `rounds`, the barrier word's
/// low 31 bits back at zero.
fn barrier_check(gpu: &Gpu, kind: BarrierKind, blocks: u32, rounds: u32) {
    let name = match kind {
        BarrierKind::Sync => "probe_barrier_visibility",
        BarrierKind::Split => "probe_split_barrier_visibility",
        BarrierKind::SenseInShared => "probe_barrier_at_visibility",
    };
    let k = gpu.kernel(name).unwrap();
    let threads = 256;
    // probe_barrier_at_visibility: the sense, then one word per thread.
    let smem = if kind == BarrierKind::SenseInShared { 4 * (1 + threads) } else { 0 };
    let bar = gpu.alloc::<u32>(1, "bar").unwrap();
    let slots = gpu.alloc::<u32>(blocks as usize, "slots").unwrap();
    let errors = gpu.alloc::<u32>(1, "errors").unwrap();
    let scratch = gpu.alloc::<u32>((blocks * threads) as usize, "scratch").unwrap();
    let (mut b, mut s, mut e, mut x, mut r) = (dptr(&bar), dptr(&slots), dptr(&errors), dptr(&scratch), rounds);
    let t0 = Instant::now();
    unsafe {
        if kind == BarrierKind::Split {
            k.launch_cooperative(gpu.stream(), blocks, threads, smem, &mut args!(b, s, e, x, r)).unwrap();
        } else {
            k.launch_cooperative(gpu.stream(), blocks, threads, smem, &mut args!(b, s, e, r)).unwrap();
        }
    }
    if let Err(err) = gpu.synchronize_timeout(watchdog(WAIT_SECS)) {
        // The kernel is stuck on the GPU: nothing after this can run in this process.
        eprintln!("{name} with {blocks} blocks: {err:#}");
        std::process::exit(101);
    }
    let dt = t0.elapsed();
    let errs = gpu.download(&errors).unwrap()[0];
    let word = gpu.download(&bar).unwrap()[0];
    let slots_v = gpu.download(&slots).unwrap();
    println!(
        "{name}: {blocks} blocks x {threads}, {rounds} rounds ({} barriers) in {:.1} ms: {errs} errors, bar = {word:#x}",
        rounds * 2,
        dt.as_secs_f64() * 1e3
    );
    assert_eq!(errs, 0, "{name}: {errs} stale reads after barriers ({blocks} blocks)");
    assert_eq!(word & 0x7fff_ffff, 0, "{name}: barrier word {word:#x} has arrivals left over");
    assert!(slots_v.iter().all(|&v| v == rounds), "{name}: some block did not finish every round");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grid_barrier_one_block_per_sm() {
    let gpu = open_gpu();
    let k = gpu.kernel("probe_barrier_visibility").unwrap();
    let grid = k.cooperative_grid(256, 0, 1).unwrap();
    barrier_check(&gpu, BarrierKind::Sync, grid, 5000);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grid_barrier_several_blocks_per_sm() {
    let gpu = open_gpu();
    let k = gpu.kernel("probe_barrier_visibility").unwrap();
    let fit = k.max_blocks_per_sm(256, 0).unwrap();
    if fit < 2 {
        println!("only {fit} block(s) of 256 threads fit per SM: skipping");
        return;
    }
    barrier_check(&gpu, BarrierKind::Sync, k.cooperative_grid(256, 0, 2).unwrap(), 5000);
    // Every block the SMs can hold at once: the most contended barrier.
    barrier_check(&gpu, BarrierKind::Sync, k.cooperative_grid(256, 0, fit.min(8)).unwrap(), 1000);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grid_barrier_odd_grids() {
    let gpu = open_gpu();
    for blocks in [1, 2, 7, gpu.sm_count() - 1] {
        barrier_check(&gpu, BarrierKind::Sync, blocks, 2000);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn split_grid_barrier() {
    let gpu = open_gpu();
    let k = gpu.kernel("probe_split_barrier_visibility").unwrap();
    barrier_check(&gpu, BarrierKind::Split, k.cooperative_grid(256, 0, 1).unwrap(), 5000);
    if k.max_blocks_per_sm(256, 0).unwrap() >= 2 {
        barrier_check(&gpu, BarrierKind::Split, k.cooperative_grid(256, 0, 2).unwrap(), 5000);
    }
    barrier_check(&gpu, BarrierKind::Split, 7, 2000);
}

/// The decode kernel's barrier (sense in shared memory, arrival and wait apart), thousands of
/// consecutive uses, at one and two blocks per SM and on an odd grid.
#[test]
#[ignore = "needs a CUDA GPU"]
fn grid_barrier_with_sense_in_shared_memory() {
    let gpu = open_gpu();
    let k = gpu.kernel("probe_barrier_at_visibility").unwrap();
    let smem = 4 * (1 + 256);
    // QWEN3_BARRIER_ROUNDS: fewer rounds under compute-sanitizer (sanitize.sh), where each
    // barrier is far slower; still thousands of consecutive barriers.
    let rounds = std::env::var("QWEN3_BARRIER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000u32);
    barrier_check(&gpu, BarrierKind::SenseInShared, k.cooperative_grid(256, smem, 1).unwrap(), rounds);
    if k.max_blocks_per_sm(256, smem).unwrap() >= 2 {
        barrier_check(&gpu, BarrierKind::SenseInShared, k.cooperative_grid(256, smem, 2).unwrap(), rounds);
    }
    barrier_check(&gpu, BarrierKind::SenseInShared, 7, rounds);
}

/// Repeated launches reuse the barrier word without a reset.
#[test]
#[ignore = "needs a CUDA GPU"]
fn grid_barrier_across_launches() {
    let gpu = open_gpu();
    let k = gpu.kernel("probe_grid_syncs").unwrap();
    let grid = k.cooperative_grid(256, 0, 1).unwrap();
    let bar = gpu.alloc::<u32>(1, "bar").unwrap();
    let mut b = dptr(&bar);
    let mut total = 0u64;
    for syncs in [1u32, 2, 3, 225, 1000, 7] {
        let mut s = syncs;
        unsafe { k.launch_cooperative(gpu.stream(), grid, 256, 0, &mut args!(b, s)).unwrap() };
        total += syncs as u64;
    }
    gpu.synchronize_timeout(watchdog(WAIT_SECS)).unwrap_or_else(|e| {
        eprintln!("{e:#}");
        std::process::exit(101)
    });
    let word = gpu.download(&bar).unwrap()[0];
    // Each barrier flips the top bit once and leaves the low bits at zero.
    assert_eq!(word, ((total % 2) as u32) << 31, "barrier word {word:#x} after {total} barriers");
}

// ---------------------------------------------------------------- warp and block reductions

const WARP: usize = 32;

/// The device's xor-butterfly, replayed on the CPU in the same order (bit-exact reference).
fn butterfly<T: Copy>(mut v: [T; WARP], f: impl Fn(T, T) -> T) -> [T; WARP] {
    let mut m = 16;
    while m > 0 {
        let prev = v;
        for l in 0..WARP {
            v[l] = f(prev[l], prev[l ^ m]);
        }
        m >>= 1;
    }
    v
}

/// The halving butterfly on the CPU: at each lane mask in turn a lane keeps the half of its
/// sums its mask bit names and adds its partner's copy of them (own first, as the GPU does).
fn halving_sums(v: &[[f32; 8]; WARP], masks: [usize; 3]) -> [f32; WARP] {
    let mut held: Vec<Vec<f32>> = v.iter().map(|x| x.to_vec()).collect();
    for m in masks {
        let prev = held.clone();
        for (l, h) in held.iter_mut().enumerate() {
            let half = prev[l].len() / 2;
            let at = if l & m != 0 { half } else { 0 };
            *h = (0..half).map(|i| prev[l][at + i] + prev[l ^ m][at + i]).collect();
        }
    }
    std::array::from_fn(|l| held[l][0])
}

/// `warp_sum8` replayed on the CPU in the same order: halving at lane masks 16, 8, 4, then
/// masks 2 and 1 sum the one left.
fn warp_sum8_cpu(v: &[[f32; 8]; WARP]) -> [f32; WARP] {
    let mut one = halving_sums(v, [16, 8, 4]);
    for m in [2usize, 1] {
        let prev = one;
        for (l, x) in one.iter_mut().enumerate() {
            *x = prev[l] + prev[l ^ m];
        }
    }
    one
}

/// `warp_sum8`, `quad_sum4` and `group8_sum8` (the butterflies the streaming step's GEMVs and
/// attention reduce with) give their CPU twins' bits and the sums they are meant to hold.
#[test]
#[ignore = "needs a CUDA GPU"]
fn warp_sum8_matches_cpu() {
    let gpu = open_gpu();
    let n_warps = 1024usize;
    let mut rng = Rng(3);
    let v: Vec<f32> = (0..n_warps * WARP * 8)
        .map(|_| rng.uniform(-1.0, 1.0) * 2f32.powi((rng.next_u32() % 30) as i32 - 15))
        .collect();
    let vb = gpu.upload(&v, "v").unwrap();
    let out = gpu.alloc::<f32>(n_warps * WARP, "out").unwrap();
    let quad = gpu.alloc::<f32>(n_warps * WARP, "quad").unwrap();
    let group = gpu.alloc::<f32>(n_warps * WARP, "group").unwrap();
    let k = gpu.kernel("test_warp_sum8").unwrap();
    let (mut pv, mut nw, mut po, mut pq, mut pg) = (dptr(&vb), n_warps as u32, dptr(&out), dptr(&quad), dptr(&group));
    unsafe { k.launch(gpu.stream(), (n_warps * WARP / 256) as u32, 256, 0, &mut args!(pv, nw, po, pq, pg)).unwrap() };
    gpu.synchronize().unwrap();
    let (out, quad, group) = (gpu.download(&out).unwrap(), gpu.download(&quad).unwrap(), gpu.download(&group).unwrap());
    for w in 0..n_warps {
        let lanes: [[f32; 8]; WARP] = std::array::from_fn(|l| v[8 * (w * WARP + l)..][..8].try_into().unwrap());
        let want = warp_sum8_cpu(&lanes);
        // group8_sum8: halving at masks 4, 2, 1 leaves lane l with sum l & 7 over its group of
        // eight lanes (what fold_half's scores take).
        let want_group = halving_sums(&lanes, [4, 2, 1]);
        for l in 0..WARP {
            let got = group[w * WARP + l];
            assert_eq!(got.to_bits(), want_group[l].to_bits(), "group8_sum8: warp {w} lane {l}");
            let (g, i) = (l & !7, l & 7);
            let exact: f64 = (g..g + 8).map(|m| lanes[m][i] as f64).sum();
            let scale: f64 = (g..g + 8).map(|m| (lanes[m][i] as f64).abs()).sum();
            assert!((got as f64 - exact).abs() <= 1e-5 * scale, "group8_sum8: warp {w} lane {l}: {got} is not {exact}");
        }
        for l in 0..WARP {
            let got = out[w * WARP + l];
            assert_eq!(got.to_bits(), want[l].to_bits(), "warp {w} lane {l}: gpu {got} cpu twin {}", want[l]);
            // And it is the sum lane l is meant to hold: index (l >> 2) & 7 over all lanes.
            let i = (l >> 2) & 7;
            let exact: f64 = lanes.iter().map(|x| x[i] as f64).sum();
            let scale: f64 = lanes.iter().map(|x| (x[i] as f64).abs()).sum();
            assert!((got as f64 - exact).abs() <= 1e-5 * scale, "warp {w} lane {l}: {got} is not sum {i} ({exact})");
            // quad_sum4: (own + partner at lane ^ 2) for the half bit 1 keeps, then with lane ^ 1.
            let g = l & !3;
            let half = |m: usize| {
                let at = if m & 2 != 0 { 2 } else { 0 };
                [lanes[m][at] + lanes[m ^ 2][at], lanes[m][at + 1] + lanes[m ^ 2][at + 1]]
            };
            let want_quad = half(l)[l & 1] + half(l ^ 1)[l & 1];
            assert_eq!(quad[w * WARP + l].to_bits(), want_quad.to_bits(), "quad_sum4: warp {w} lane {l}");
            let exact: f64 = (g..g + 4).map(|m| lanes[m][l & 3] as f64).sum();
            assert!(
                (quad[w * WARP + l] as f64 - exact).abs()
                    <= 1e-5 * (g..g + 4).map(|m| (lanes[m][l & 3] as f64).abs()).sum::<f64>()
            );
        }
    }
}

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    v > bv || (v == bv && i < bi)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn warp_reductions_match_cpu() {
    let gpu = open_gpu();
    let n_warps = 8192usize;
    let mut rng = Rng(1);
    let mut v = vec![0f32; n_warps * WARP];
    let mut idx = vec![0u32; n_warps * WARP];
    for w in 0..n_warps {
        let lanes = &mut v[w * WARP..(w + 1) * WARP];
        match w % 8 {
            // All equal: the arg-max is the lowest index.
            0 => lanes.iter_mut().for_each(|x| *x = 1.5),
            // A few distinct values, many ties.
            1 => lanes.iter_mut().for_each(|x| *x = (rng.next_u32() % 3) as f32),
            // Large dynamic range: the sum's rounding depends on the order.
            2 => lanes
                .iter_mut()
                .for_each(|x| *x = rng.uniform(-1.0, 1.0) * 2f32.powi((rng.next_u32() % 40) as i32 - 20)),
            // Masked logits.
            3 => lanes.iter_mut().for_each(|x| {
                *x = if rng.next_u32().is_multiple_of(4) { f32::NEG_INFINITY } else { rng.uniform(-30.0, 30.0) }
            }),
            _ => lanes.iter_mut().for_each(|x| *x = rng.uniform(-100.0, 100.0)),
        }
        // Indices: lane order, reversed, or random (distinct within the warp), so "lowest
        // index" is not always "lowest lane".
        let ids = &mut idx[w * WARP..(w + 1) * WARP];
        for (l, id) in ids.iter_mut().enumerate() {
            *id = match (w / 8) % 3 {
                0 => (w * WARP + l) as u32,
                1 => (w * WARP + WARP - 1 - l) as u32,
                _ => (rng.next_u32() & !31) | l as u32,
            };
        }
        if (w / 8) % 3 == 2 {
            // Shuffle the random ids across lanes.
            for l in (1..WARP).rev() {
                let j = (rng.next_u32() as usize) % (l + 1);
                ids.swap(l, j);
            }
        }
    }
    let (vb, ib) = (gpu.upload(&v, "v").unwrap(), gpu.upload(&idx, "idx").unwrap());
    let sum = gpu.alloc::<f32>(n_warps, "sum").unwrap();
    let max = gpu.alloc::<f32>(n_warps, "max").unwrap();
    let av = gpu.alloc::<f32>(n_warps, "amax_v").unwrap();
    let ai = gpu.alloc::<u32>(n_warps, "amax_i").unwrap();
    let errors = gpu.alloc::<u32>(1, "errors").unwrap();
    let k = gpu.kernel("test_warp_reduce").unwrap();
    let (mut pv, mut pi, mut nw) = (dptr(&vb), dptr(&ib), n_warps as u32);
    let (mut ps, mut pm, mut pav, mut pai, mut pe) = (dptr(&sum), dptr(&max), dptr(&av), dptr(&ai), dptr(&errors));
    let threads = 256u32;
    let blocks = (n_warps * WARP) as u32 / threads;
    unsafe { k.launch(gpu.stream(), blocks, threads, 0, &mut args!(pv, pi, nw, ps, pm, pav, pai, pe)).unwrap() };
    gpu.synchronize().unwrap();
    let (sum, max, av, ai) = (
        gpu.download(&sum).unwrap(),
        gpu.download(&max).unwrap(),
        gpu.download(&av).unwrap(),
        gpu.download(&ai).unwrap(),
    );
    assert_eq!(gpu.download(&errors).unwrap()[0], 0, "lanes of a warp disagree on a reduction");

    for w in 0..n_warps {
        let lanes: [f32; WARP] = v[w * WARP..(w + 1) * WARP].try_into().unwrap();
        let ids: [u32; WARP] = idx[w * WARP..(w + 1) * WARP].try_into().unwrap();
        let s = butterfly(lanes, |a, b| a + b)[0];
        assert_eq!(sum[w].to_bits(), s.to_bits(), "warp_sum of warp {w}: gpu {} cpu {s}", sum[w]);
        let m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max[w], m, "warp_max of warp {w}");
        // The plain CPU arg-max: largest value, ties to the lowest index.
        let (mut bv, mut bi) = (lanes[0], ids[0]);
        for l in 1..WARP {
            if better(lanes[l], ids[l], bv, bi) {
                (bv, bi) = (lanes[l], ids[l]);
            }
        }
        assert_eq!((av[w], ai[w]), (bv, bi), "warp_argmax of warp {w}: values {lanes:?} ids {ids:?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn block_sum_matches_cpu() {
    let gpu = open_gpu();
    let k = gpu.kernel("test_block_sum").unwrap();
    let mut rng = Rng(2);
    // Every kernel is built with `.maxntid 512` (build.rs), so 512 is the largest block.
    for threads in [32u32, 96, 256, 512] {
        let blocks = 300u32;
        let n = (blocks * threads) as usize;
        let v: Vec<f32> =
            (0..n).map(|_| rng.uniform(-1.0, 1.0) * 2f32.powi((rng.next_u32() % 24) as i32 - 12)).collect();
        let vb = gpu.upload(&v, "v").unwrap();
        let out = gpu.alloc::<f32>(2 * blocks as usize, "out").unwrap();
        let errors = gpu.alloc::<u32>(1, "errors").unwrap();
        let (mut pv, mut po, mut pe) = (dptr(&vb), dptr(&out), dptr(&errors));
        let smem = threads / 32 * 4;
        unsafe { k.launch(gpu.stream(), blocks, threads, smem, &mut args!(pv, po, pe)).unwrap() };
        gpu.synchronize().unwrap();
        let out = gpu.download(&out).unwrap();
        assert_eq!(
            gpu.download(&errors).unwrap()[0],
            0,
            "threads of a block disagree on block_sum ({threads} threads)"
        );
        for b in 0..blocks as usize {
            let x = &v[b * threads as usize..(b + 1) * threads as usize];
            // Per warp the butterfly, then the warp totals in warp order from 0.0.
            let reference = |scale: f32| {
                let mut total = 0f32;
                for w in x.chunks(WARP) {
                    let lanes: [f32; WARP] = std::array::from_fn(|l| scale * w[l]);
                    total += butterfly(lanes, |a, b| a + b)[0];
                }
                total
            };
            assert_eq!(out[2 * b].to_bits(), reference(1.0).to_bits(), "block_sum, {threads} threads, block {b}");
            assert_eq!(
                out[2 * b + 1].to_bits(),
                reference(2.0).to_bits(),
                "second block_sum, {threads} threads, block {b}"
            );
        }
    }
}

// ---------------------------------------------------------------- 128-bit loads

#[test]
#[ignore = "needs a CUDA GPU"]
fn vector_loads_copy_exactly() {
    let gpu = open_gpu();
    let n_vec4 = (1u32 << 20) + 3; // 16 MiB and a ragged tail
    let mut rng = Rng(3);
    let data: Vec<u32> = (0..n_vec4 * 4).map(|_| rng.next_u32()).collect();
    let src = gpu.upload(&data, "src").unwrap();
    let dsts: Vec<_> = (0..3).map(|i| gpu.alloc::<u32>(data.len(), &format!("dst{i}")).unwrap()).collect();
    let k = gpu.kernel("test_vector_loads").unwrap();
    let (mut s, mut n) = (dptr(&src), n_vec4);
    let (mut a, mut b, mut c) = (dptr(&dsts[0]), dptr(&dsts[1]), dptr(&dsts[2]));
    unsafe { k.launch(gpu.stream(), gpu.sm_count() * 4, 256, 0, &mut args!(s, n, a, b, c)).unwrap() };
    gpu.synchronize().unwrap();
    for (name, d) in ["ld_nc_v4", "ld_cg_v4", "ld_cg_f32x4"].iter().zip(&dsts) {
        let got = gpu.download(d).unwrap();
        if let Some(i) = (0..data.len()).find(|&i| got[i] != data[i]) {
            panic!("{name}: word {i} is {:#x}, expected {:#x}", got[i], data[i]);
        }
    }
}

// ---------------------------------------------------------------- bf16

fn is_bf16_nan(b: u16) -> bool {
    b & 0x7f80 == 0x7f80 && b & 0x007f != 0
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_conversions_match_half() {
    let gpu = open_gpu();
    let n = 1usize << 20;
    let mut rng = Rng(4);
    // f32 inputs: special values, rounding ties and near-ties, subnormals, then random bits.
    let mut x: Vec<f32> = Vec::with_capacity(n);
    let specials: &[u32] = &[
        0x0000_0000,
        0x8000_0000,
        0x3f80_0000,
        0xbf80_0000,
        0x7f80_0000,
        0xff80_0000, // 0, -0, 1, -1, inf, -inf
        0x7fc0_0000,
        0xffc0_0000,
        0x7f80_0001,
        0x7fff_ffff,
        0xff80_8000,
        0x7fa0_0000, // NaNs
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f7f_8000,
        0x7f7f_7fff,
        0x7f7e_8000, // near the top: overflow to inf on round-up
        0x0080_0000,
        0x007f_ffff,
        0x0000_0001,
        0x0000_8000,
        0x0001_8000,
        0x0000_8001,
        0x0000_7fff,
        0x8000_8000, // subnormals
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x3f80_7fff,
        0xbf80_8000,
        0xbf81_8000, // ties: to even
        0x3fff_8000,
        0x3fff_ffff,
        0x4000_0000,
    ];
    x.extend(specials.iter().map(|&b| f32::from_bits(b)));
    // Every bf16 value with the low half exactly at a tie, just below, and just above.
    for hi in 0..=0xffffu32 {
        for lo in [0x8000u32, 0x7fff, 0x8001, 0] {
            x.push(f32::from_bits(hi << 16 | lo));
        }
    }
    while x.len() < n {
        x.push(f32::from_bits(rng.next_u32()));
    }
    x.truncate(n);
    // bf16 inputs: every pattern 16 times, shuffled (so pairs mix all combinations).
    let mut b: Vec<u16> = (0..n).map(|i| (i & 0xffff) as u16).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        b.swap(i, j);
    }

    let xb = gpu.upload(&x, "x").unwrap();
    let bb = gpu.upload(&b, "b").unwrap();
    let to_bf16 = gpu.alloc::<u16>(n, "to_bf16").unwrap();
    let to_f32 = gpu.alloc::<f32>(n, "to_f32").unwrap();
    let pair_f32 = gpu.alloc::<f32>(n, "pair_f32").unwrap();
    let k = gpu.kernel("test_bf16").unwrap();
    let (mut px, mut pb, mut nn) = (dptr(&xb), dptr(&bb), n as u32);
    let (mut p1, mut p2, mut p3) = (dptr(&to_bf16), dptr(&to_f32), dptr(&pair_f32));
    unsafe { k.launch(gpu.stream(), gpu.sm_count() * 4, 256, 0, &mut args!(px, pb, nn, p1, p2, p3)).unwrap() };
    gpu.synchronize().unwrap();
    let (to_bf16, to_f32, pair_f32) =
        (gpu.download(&to_bf16).unwrap(), gpu.download(&to_f32).unwrap(), gpu.download(&pair_f32).unwrap());

    for i in 0..n {
        let want = half::bf16::from_f32(x[i]).to_bits();
        let got = to_bf16[i];
        if x[i].is_nan() {
            assert!(is_bf16_nan(got), "f32_to_bf16(NaN {:#010x}) = {got:#06x}, not a NaN", x[i].to_bits());
        } else {
            assert_eq!(
                got,
                want,
                "f32_to_bf16({:#010x} = {:e}): gpu {got:#06x}, half {want:#06x}",
                x[i].to_bits(),
                x[i]
            );
        }
        // bf16 -> f32 is exact: the bf16 bits are the top half.
        let want32 = (b[i] as u32) << 16;
        assert_eq!(to_f32[i].to_bits(), want32, "bf16_to_f32({:#06x})", b[i]);
        if !is_bf16_nan(b[i]) {
            assert_eq!(half::bf16::from_bits(b[i]).to_f32().to_bits(), want32);
        }
        if i < n / 2 {
            assert_eq!(pair_f32[2 * i].to_bits(), (b[2 * i] as u32) << 16, "bf16x2_to_f32 low half, pair {i}");
            assert_eq!(pair_f32[2 * i + 1].to_bits(), (b[2 * i + 1] as u32) << 16, "bf16x2_to_f32 high half, pair {i}");
        }
    }
}

// ---------------------------------------------------------------- approximate math

#[test]
#[ignore = "needs a CUDA GPU"]
fn approximate_math_within_bounds() {
    let gpu = open_gpu();
    let n = 1usize << 20;
    let mut rng = Rng(5);
    // exp/exp2 inputs: [-80, 80] (results stay normal), plus the softmax edge cases.
    let mut x: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, 80.0, -80.0, f32::NEG_INFINITY, -200.0, -1000.0, -1e30];
    while x.len() < n {
        x.push(rng.uniform(-80.0, 80.0));
    }
    // rsqrt inputs: log-uniform over [1e-30, 1e30].
    let y: Vec<f32> = (0..n).map(|_| 10f32.powf(rng.uniform(-30.0, 30.0))).collect();
    // sin/cos inputs: [-pi, pi] (the range sin.approx/cos.approx are specified for); the tail
    // of the buffer holds larger angles, measured but not asserted.
    let wide = n - 4096;
    let z: Vec<f32> = (0..n)
        .map(|i| {
            if i < wide {
                rng.uniform(-std::f32::consts::PI, std::f32::consts::PI)
            } else {
                rng.uniform(-5000.0, 5000.0)
            }
        })
        .collect();

    let (xb, yb, zb) = (gpu.upload(&x, "x").unwrap(), gpu.upload(&y, "y").unwrap(), gpu.upload(&z, "z").unwrap());
    let outs: Vec<_> = (0..5).map(|i| gpu.alloc::<f32>(n, &format!("out{i}")).unwrap()).collect();
    let k = gpu.kernel("test_math").unwrap();
    let (mut px, mut py, mut pz, mut nn) = (dptr(&xb), dptr(&yb), dptr(&zb), n as u32);
    let (mut o0, mut o1, mut o2, mut o3, mut o4) =
        (dptr(&outs[0]), dptr(&outs[1]), dptr(&outs[2]), dptr(&outs[3]), dptr(&outs[4]));
    unsafe {
        k.launch(gpu.stream(), gpu.sm_count() * 4, 256, 0, &mut args!(px, py, pz, nn, o0, o1, o2, o3, o4)).unwrap()
    };
    gpu.synchronize().unwrap();
    let o: Vec<Vec<f32>> = outs.iter().map(|b| gpu.download(b).unwrap()).collect();
    let (e, e2, rs, s, c) = (&o[0], &o[1], &o[2], &o[3], &o[4]);

    const ULP: f64 = 1.0 / (1u64 << 23) as f64;
    let (mut worst_exp, mut worst_exp2, mut worst_rsqrt, mut worst_sc, mut worst_sc_wide) =
        (0f64, 0f64, 0f64, 0f64, 0f64);
    for i in 0..n {
        let xi = x[i] as f64;
        if x[i] < -100.0 {
            // Far below the smallest normal result: flushed to exactly zero (softmax masks).
            assert_eq!(e[i], 0.0, "exp({}) = {}", x[i], e[i]);
            assert_eq!(e2[i], 0.0, "exp2({}) = {}", x[i], e2[i]);
            continue;
        }
        // exp = ex2.approx(x * log2 e): CUDA documents __expf as 2 + floor(1.173 |x|) ulp.
        let rel = ((e[i] as f64 - xi.exp()) / xi.exp()).abs();
        worst_exp = worst_exp.max(rel / ULP);
        assert!(rel <= (3.0 + 1.2 * xi.abs()) * ULP, "exp({}) = {}, want {} (rel {rel:e})", x[i], e[i], xi.exp());
        let rel2 = ((e2[i] as f64 - xi.exp2()) / xi.exp2()).abs();
        worst_exp2 = worst_exp2.max(rel2 / ULP);
        assert!(rel2 <= 4.0 * ULP, "exp2({}) = {}, want {} (rel {rel2:e})", x[i], e2[i], xi.exp2());

        let want = 1.0 / (y[i] as f64).sqrt();
        let relr = ((rs[i] as f64 - want) / want).abs();
        worst_rsqrt = worst_rsqrt.max(relr / ULP);
        assert!(relr <= 4.0 * ULP, "rsqrt({}) = {}, want {want} (rel {relr:e})", y[i], rs[i]);

        let zi = z[i] as f64;
        let err = ((s[i] as f64) - zi.sin()).abs().max(((c[i] as f64) - zi.cos()).abs());
        if i < wide {
            worst_sc = worst_sc.max(err);
            assert!(
                err <= 2f64.powi(-20),
                "sin_cos({}) = ({}, {}), want ({}, {})",
                z[i],
                s[i],
                c[i],
                zi.sin(),
                zi.cos()
            );
        } else {
            worst_sc_wide = worst_sc_wide.max(err);
        }
    }
    assert_eq!(e[6], 0.0, "exp(-inf) must be 0");
    println!(
        "worst: exp {worst_exp:.2} ulp, exp2 {worst_exp2:.2} ulp, rsqrt {worst_rsqrt:.2} ulp, \
         sin/cos abs {worst_sc:.2e} on [-pi, pi], {worst_sc_wide:.2e} on [-5000, 5000] (not asserted)"
    );
}

// ---------------------------------------------------------------- host-mapped memory

#[test]
#[ignore = "needs a CUDA GPU"]
fn host_ring_both_ways() {
    const MAGIC: u32 = 0x5a5a_0000; // kernel/src/probes.rs: HOST_RING_MAGIC
    const DONE: u32 = 0x00d0_0e00; // HOST_RING_DONE
    const TIMEOUT: u32 = 0xdead_0000; // HOST_RING_TIMEOUT
    let gpu = open_gpu();
    let n = 64usize;
    let ring: HostRing = gpu.host_ring(n).unwrap();
    assert_eq!(ring.len(), n);
    assert!((0..n).all(|i| ring.read(i) == 0), "a new HostRing must be zeroed");
    assert!(ring.device_ptr() != 0);
    let k = gpu.kernel("test_host_ring").unwrap();
    let (mut p, mut nn, mut t) = (ring.device_ptr(), n as u32, 10_000_000_000u64);
    unsafe { k.launch(gpu.stream(), 1, 32, 0, &mut args!(p, nn, t)).unwrap() };

    // The kernel's writes show up while it is still running (it waits for our flag).
    let start = Instant::now();
    while !(1..n - 1).all(|i| ring.read(i) == MAGIC ^ i as u32) {
        if start.elapsed() > Duration::from_secs(10) {
            let seen: Vec<u32> = (0..n).map(|i| ring.read(i)).collect();
            panic!("the kernel's writes did not reach the host in 10 s: {seen:x?}");
        }
        std::hint::spin_loop();
    }
    let seen_after = start.elapsed();
    assert_eq!(ring.read(n - 1), 0, "the kernel answered before the host set the flag");
    // Now the other way: the host sets the flag, the kernel sees it and answers.
    ring.write(0, 1);
    let start = Instant::now();
    while ring.read(n - 1) == 0 {
        if start.elapsed() > Duration::from_secs(15) {
            panic!("no answer from the kernel in 15 s");
        }
        std::hint::spin_loop();
    }
    let answer = ring.read(n - 1);
    println!("kernel -> host in {seen_after:?}, host -> kernel -> host in {:?}", start.elapsed());
    assert_ne!(answer, TIMEOUT, "the kernel never saw the host's flag");
    assert_eq!(answer, DONE);
    gpu.synchronize_timeout(watchdog(WAIT_SECS)).unwrap();
}
