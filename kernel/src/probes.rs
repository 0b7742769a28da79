//! Small kernels that measure or check the device module itself: the grid barrier under
//! load, launch and barrier cost for `sync-bench`, and an HBM read-bandwidth probe that every
//! speed figure is reported against.

use crate::device::*;

/// Each of `rounds` barriers: every block writes `round` into its slot, meets the others,
/// then checks that every other block's slot already holds `round`. A block that sees a stale
/// value counts an error. `slots` has one u32 per block; `errors` is one u32.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_barrier_visibility(
    bar: *mut u32,
    slots: *mut u32,
    errors: *mut u32,
    rounds: u32,
) {
    let nb = grid_dim();
    let me = block_idx();
    let mut sense = grid_sense(bar);
    for round in 1..=rounds {
        if thread_idx() == 0 {
            // A plain (weak) store: the barrier alone must make it visible.
            core::ptr::write_volatile(slots.add(me as usize), round);
        }
        sense = grid_sync(bar, sense);
        let mut bad = 0u32;
        let mut b = thread_idx();
        while b < nb {
            if ld_cg_u32(slots.add(b as usize)) != round {
                bad += 1;
            }
            b += block_dim();
        }
        if bad != 0 {
            atomic_add_relaxed(errors, bad);
        }
        // Nobody may overwrite a slot for the next round before everyone has checked it.
        sense = grid_sync(bar, sense);
    }
}

/// `syncs` consecutive grid barriers and nothing else: the barrier's own cost.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_grid_syncs(bar: *mut u32, syncs: u32) {
    let mut sense = grid_sense(bar);
    for _ in 0..syncs {
        sense = grid_sync(bar, sense);
    }
}

/// An empty kernel: one launch's cost.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_empty(_x: *mut u32) {}

/// Reads `n_vec4` 16-byte words with the same load the GEMVs use and folds them into a
/// checksum (so the loads cannot be optimised away). Read bandwidth = bytes / time.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_read_bandwidth(src: *const u32, n_vec4: u64, out: *mut u32) {
    let stride = (grid_dim() * block_dim()) as u64;
    let mut i = (block_idx() * block_dim() + thread_idx()) as u64;
    let mut acc = 0u32;
    // Four independent loads in flight per thread per iteration.
    while i + 3 * stride < n_vec4 {
        let a = ld_nc_v4(src.add((i * 4) as usize));
        let b = ld_nc_v4(src.add(((i + stride) * 4) as usize));
        let c = ld_nc_v4(src.add(((i + 2 * stride) * 4) as usize));
        let d = ld_nc_v4(src.add(((i + 3 * stride) * 4) as usize));
        acc ^= a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1] ^ b[2] ^ b[3];
        acc ^= c[0] ^ c[1] ^ c[2] ^ c[3] ^ d[0] ^ d[1] ^ d[2] ^ d[3];
        i += 4 * stride;
    }
    while i < n_vec4 {
        let a = ld_nc_v4(src.add((i * 4) as usize));
        acc ^= a[0] ^ a[1] ^ a[2] ^ a[3];
        i += stride;
    }
    if acc == 0x9e37_79b9 {
        // Practically never: keeps `acc` live without a store per thread.
        *out = acc;
    }
}

/// How DRAM streams slow a chain of dependent L2 hits (what a grid barrier, an input vector
/// load or an attention merge is made of). Warp 0 of each block walks `hops` steps of the
/// cycle in `hot` (4096 words; each step one `ld.global.cg` that hits L2) and writes the SM
/// cycles per step to `out[block]`, while other warps read `rounds` bursts of 8 KiB each
/// (16 x 16 bytes per lane, all requested before any is used, as the GEMVs load their weights)
/// from their own `rounds * 8 KiB` of `big`. Which warps stream is `mode`: 0 none; 1 the
/// warps on other SM sub-partitions than warp 0 (warp % 4 != 0); 2 the other warps on warp 0's
/// sub-partition (warp % 4 == 0); 3 every other warp. For `host sync-bench --l2-latency`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_chain_under_stream(
    big: *const u32,
    rounds: u32,
    hot: *const u32,
    hops: u32,
    mode: u32,
    out: *mut u64,
) {
    let w = warp();
    let streams = match mode {
        1 => w % 4 != 0,
        2 => w % 4 == 0 && w != 0,
        3 => w != 0,
        _ => false,
    };
    let region = big.add(((block_idx() * warps_per_block() + w) as usize) * (rounds as usize) * 2048);
    let burst = |r: u32| {
        let mut v = [[0u32; 4]; 16];
        for (k, d) in v.iter_mut().enumerate() {
            *d = ld_nc_v4(region.add(r as usize * 2048 + k * 128 + lane() as usize * 4));
        }
        v
    };
    let fold = |v: [[u32; 4]; 16]| {
        let mut acc = 0u32;
        for d in v {
            acc ^= d[0] ^ d[1] ^ d[2] ^ d[3];
        }
        acc
    };
    let smem = dynamic_shared::<u32>();
    sync_threads();
    let mut acc = 0u32;
    if streams {
        for r in 0..rounds {
            acc ^= fold(burst(r));
        }
    } else if w == 0 {
        // Bring all of `hot` (4096 words) into L2, and let the streams get going.
        let mut i = lane();
        while i < 4096 {
            acc ^= ld_cg_u32(hot.add(i as usize));
            i += 32;
        }
        let mut j = lane() * 32;
        for _ in 0..32 {
            j = ld_cg_u32(hot.add(j as usize));
        }
        core::ptr::write_volatile(smem.add(lane() as usize), j);
        let t0 = clock64();
        for _ in 0..hops {
            j = ld_cg_u32(hot.add(j as usize));
        }
        // The store needs `j`, so the clock is read after the last step arrived.
        core::ptr::write_volatile(smem.add(lane() as usize), j);
        let t1 = clock64();
        if lane() == 0 {
            *out.add(block_idx() as usize) = (t1 - t0) / hops as u64;
        }
    }
    if acc == 0x9e37_79b9 {
        *out = acc as u64;
    }
}

// ---------------------------------------------------------------- checks of the device module
//
// Kernels for tests/tests/gpu_device.rs. Each exercises one piece of `device` on data the host
// also processes on the CPU, so the test can compare the two bit for bit or within a bound.

/// As `probe_barrier_visibility`, but with the split barrier: between `grid_arrive` and
/// `grid_wait` every block does some unrelated work (as the megakernel streams its next
/// weights there), which must neither break the barrier nor let a stale slot through.
/// `scratch` has one u32 per thread of the grid; it only gives the in-between work a target.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_split_barrier_visibility(
    bar: *mut u32,
    slots: *mut u32,
    errors: *mut u32,
    scratch: *mut u32,
    rounds: u32,
) {
    let nb = grid_dim();
    let me = block_idx();
    let gtid = (me * block_dim() + thread_idx()) as usize;
    let mut sense = grid_sense(bar);
    for round in 1..=rounds {
        if thread_idx() == 0 {
            core::ptr::write_volatile(slots.add(me as usize), round);
        }
        grid_arrive(bar);
        // Independent work while the other blocks arrive; a varying amount per block, so
        // blocks reach `grid_wait` at different times.
        let mut x = round ^ gtid as u32;
        for _ in 0..(me + round) % 8 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        }
        core::ptr::write_volatile(scratch.add(gtid), x);
        sense = grid_wait(bar, sense);
        let mut bad = 0u32;
        let mut b = thread_idx();
        while b < nb {
            if ld_cg_u32(slots.add(b as usize)) != round {
                bad += 1;
            }
            b += block_dim();
        }
        if bad != 0 {
            atomic_add_relaxed(errors, bad);
        }
        sense = grid_sync(bar, sense);
    }
}

/// As `probe_split_barrier_visibility`, with the barrier exactly as the decode kernel uses it:
/// the sense in shared memory (`grid_sense_at`, `grid_wait_at`; one u32 of dynamic shared
/// memory), `grid_arrive` and the wait apart. Besides the slots, each round also checks the
/// block's own shared memory: every thread writes its word before the barrier and reads its
/// neighbour warp's after it, so a wait that let some warps through early would show.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn probe_barrier_at_visibility(
    bar: *mut u32,
    slots: *mut u32,
    errors: *mut u32,
    rounds: u32,
) {
    let nb = grid_dim();
    let me = block_idx();
    let smem = dynamic_shared::<u32>(); // [0] the sense, [1 + t] thread t's word
    let sense = smem;
    let words = smem.add(1);
    grid_sense_at(bar, sense);
    for round in 1..=rounds {
        if thread_idx() == 0 {
            core::ptr::write_volatile(slots.add(me as usize), round);
        }
        *words.add(thread_idx() as usize) = round ^ thread_idx();
        grid_arrive(bar);
        // A varying delay per block, so blocks reach the wait at different times.
        nanosleep((me * 37 + round * 11) % 512);
        grid_wait_at(bar, sense);
        let mut bad = 0u32;
        let mut b = thread_idx();
        while b < nb {
            if ld_cg_u32(slots.add(b as usize)) != round {
                bad += 1;
            }
            b += block_dim();
        }
        let other = (thread_idx() + WARP_SIZE) % block_dim();
        if *words.add(other as usize) != round ^ other {
            bad += 1;
        }
        if bad != 0 {
            atomic_add_relaxed(errors, bad);
        }
        // Nobody overwrites a slot or a word for the next round before everyone has read it.
        grid_arrive(bar);
        grid_wait_at(bar, sense);
    }
}

/// Warp reductions: warp `w` of the grid reduces `v[32w .. 32w+32]` (and the indices
/// `idx[32w ..]` for the arg-max). Lane 0 writes `sum[w]`, `max[w]`, `amax_v[w]`, `amax_i[w]`.
/// Every lane's results are compared with lane 0's: a lane that disagrees counts in `errors`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_warp_reduce(
    v: *const f32,
    idx: *const u32,
    n_warps: u32,
    sum: *mut f32,
    max: *mut f32,
    amax_v: *mut f32,
    amax_i: *mut u32,
    errors: *mut u32,
) {
    let w = global_warp();
    if w >= n_warps {
        return;
    }
    let k = (w * WARP_SIZE + lane()) as usize;
    let x = *v.add(k);
    let s = warp_sum(x);
    let m = warp_max(x);
    let (av, ai) = warp_argmax(x, *idx.add(k));
    // All lanes must hold the same results (bit for bit).
    let same = |a: u32| shfl_idx_f32(f32::from_bits(a), 0).to_bits() == a;
    if !(same(s.to_bits()) && same(m.to_bits()) && same(av.to_bits()) && same(ai)) {
        atomic_add_relaxed(errors, 1);
    }
    if lane() == 0 {
        *sum.add(w as usize) = s;
        *max.add(w as usize) = m;
        *amax_v.add(w as usize) = av;
        *amax_i.add(w as usize) = ai;
    }
}

/// `warp_sum8` over each warp: lane `l` of warp `w` sums `v[8 (32 w + l) .. + 8]` with the
/// warp's other lanes and writes what it gets to `out[32 w + l]`; `quad_sum4` of the first
/// four of them to `quad[32 w + l]`; `group8_sum8` of all eight to `group[32 w + l]`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_warp_sum8(
    v: *const f32,
    n_warps: u32,
    out: *mut f32,
    quad: *mut f32,
    group: *mut f32,
) {
    let w = global_warp();
    if w >= n_warps {
        return;
    }
    let k = (w * WARP_SIZE + lane()) as usize;
    let mut x = [0.0f32; 8];
    for (i, xi) in x.iter_mut().enumerate() {
        *xi = *v.add(8 * k + i);
    }
    *out.add(k) = warp_sum8(x);
    *quad.add(k) = quad_sum4([x[0], x[1], x[2], x[3]]);
    *group.add(k) = group8_sum8(x);
}

/// `block_sum` twice in a row over the same scratch: block `b` sums `v[b*blockDim ..]`, then
/// twice those values. Thread 0 writes `out[2b]` and `out[2b+1]`; any thread whose results
/// differ from thread 0's counts in `errors`. Needs `4 * warps` bytes of dynamic shared memory.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_block_sum(v: *const f32, out: *mut f32, errors: *mut u32) {
    let scratch = dynamic_shared::<f32>();
    let x = *v.add((block_idx() * block_dim() + thread_idx()) as usize);
    let a = block_sum(x, scratch);
    let b = block_sum(2.0 * x, scratch);
    // Publish thread 0's results through global memory and compare within the block.
    let o = out.add(2 * block_idx() as usize);
    if thread_idx() == 0 {
        *o = a;
        *o.add(1) = b;
    }
    sync_threads();
    if (*o).to_bits() != a.to_bits() || (*o.add(1)).to_bits() != b.to_bits() {
        atomic_add_relaxed(errors, 1);
    }
}

/// Copies `n_vec4` 16-byte words from `src` three times, once with each 128-bit load:
/// `ld_nc_v4` into `dst_nc`, `ld_cg_v4` into `dst_cg`, `ld_cg_f32x4` into `dst_f32` (as bits).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_vector_loads(
    src: *const u32,
    n_vec4: u32,
    dst_nc: *mut [u32; 4],
    dst_cg: *mut [u32; 4],
    dst_f32: *mut [u32; 4],
) {
    let mut i = block_idx() * block_dim() + thread_idx();
    while i < n_vec4 {
        let p = src.add(4 * i as usize);
        *dst_nc.add(i as usize) = ld_nc_v4(p);
        *dst_cg.add(i as usize) = ld_cg_v4(p);
        let f = ld_cg_f32x4(p as *const f32);
        *dst_f32.add(i as usize) = [f[0].to_bits(), f[1].to_bits(), f[2].to_bits(), f[3].to_bits()];
        i += grid_dim() * block_dim();
    }
}

/// bf16 conversions over `n` elements: `to_bf16[i] = f32_to_bf16(x[i])`,
/// `to_f32[i] = bf16_to_f32(b[i])`, and `pair_f32[2i], pair_f32[2i+1]` = the two halves of the
/// packed word `b[2i] | b[2i+1] << 16` via `bf16x2_to_f32` (for even `i < n / 2`).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_bf16(
    x: *const f32,
    b: *const u16,
    n: u32,
    to_bf16: *mut u16,
    to_f32: *mut f32,
    pair_f32: *mut f32,
) {
    let mut i = block_idx() * block_dim() + thread_idx();
    while i < n {
        let k = i as usize;
        *to_bf16.add(k) = f32_to_bf16(*x.add(k));
        *to_f32.add(k) = bf16_to_f32(*b.add(k));
        if i < n / 2 {
            let w = *b.add(2 * k) as u32 | (*b.add(2 * k + 1) as u32) << 16;
            let (lo, hi) = bf16x2_to_f32(w);
            *pair_f32.add(2 * k) = lo;
            *pair_f32.add(2 * k + 1) = hi;
        }
        i += grid_dim() * block_dim();
    }
}

/// The approximate math functions over `n` inputs: `exp(x)`, `exp2(x)`, `rsqrt(y)`, and
/// `sin_cos(z)` into `sin`/`cos`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_math(
    x: *const f32,
    y: *const f32,
    z: *const f32,
    n: u32,
    out_exp: *mut f32,
    out_exp2: *mut f32,
    out_rsqrt: *mut f32,
    out_sin: *mut f32,
    out_cos: *mut f32,
) {
    let mut i = block_idx() * block_dim() + thread_idx();
    while i < n {
        let k = i as usize;
        *out_exp.add(k) = exp(*x.add(k));
        *out_exp2.add(k) = exp2(*x.add(k));
        *out_rsqrt.add(k) = rsqrt(*y.add(k));
        let (s, c) = sin_cos(*z.add(k));
        *out_sin.add(k) = s;
        *out_cos.add(k) = c;
        i += grid_dim() * block_dim();
    }
}

/// Host-mapped memory both ways, as the decode loop uses it to stream tokens out and read a
/// cancel flag. One thread: writes `ring[i] = HOST_RING_MAGIC ^ i` for `1 <= i < n - 1` with
/// system-scope release stores, then waits (acquire loads) for the host to set `ring[0] = 1`,
/// and answers with `ring[n - 1] = HOST_RING_DONE`; after `timeout_ns` without the flag it
/// writes `HOST_RING_TIMEOUT` there instead, so a broken path fails rather than hangs.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_host_ring(ring: *mut u32, n: u32, timeout_ns: u64) {
    if block_idx() != 0 || thread_idx() != 0 || n < 3 {
        return;
    }
    for i in 1..n - 1 {
        st_release_sys(ring.add(i as usize), HOST_RING_MAGIC ^ i);
    }
    let start = global_timer_ns();
    let mut answer = HOST_RING_DONE;
    while ld_acquire_sys(ring) != 1 {
        if global_timer_ns().wrapping_sub(start) > timeout_ns {
            answer = HOST_RING_TIMEOUT;
            break;
        }
        nanosleep(1000);
    }
    st_release_sys(ring.add(n as usize - 1), answer);
}

/// Values `test_host_ring` writes (the host test uses the same constants).
pub const HOST_RING_MAGIC: u32 = 0x5a5a_0000;
pub const HOST_RING_DONE: u32 = 0x00d0_0e00;
pub const HOST_RING_TIMEOUT: u32 = 0xdead_0000;
