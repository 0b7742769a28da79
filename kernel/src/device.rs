//! The device runtime: everything a kernel needs from the hardware, in one place.
//!
//! Rust's atomics lose their memory ordering on nvptx (a `fetch_add(Release)` comes out as a
//! plain `atom.add`, loads get `.sys` scope), so every synchronising access below is written in
//! inline PTX with the scope and ordering spelled out. Nothing outside this module uses `asm!`.

use core::arch::asm;
use core::arch::nvptx;

pub const WARP_SIZE: u32 = 32;
pub const LOG2_E: f32 = core::f32::consts::LOG2_E;

// ---------------------------------------------------------------- unrolling

/// `unroll!(4, k, { ... })`: the block four (or two, eight, twelve, sixteen) times with `k` a constant
/// 0, 1, ... A const-generic count N unrolls as `unroll!(12, k, { if k < N { ... } })`.
/// LLVM declines to unroll loops whose bodies are large, and a loop left rolled indexes its
/// register arrays at run time, which moves them to local memory (seen: GEMV weights and `x`
/// spilled in the hottest loop). Constant indices keep them in registers.
#[macro_export]
macro_rules! unroll {
    (2, $k:ident, $body:block) => {{
        $crate::unroll!(@at $k, $body, 0, 1)
    }};
    (4, $k:ident, $body:block) => {{
        $crate::unroll!(@at $k, $body, 0, 1, 2, 3)
    }};
    (8, $k:ident, $body:block) => {{
        $crate::unroll!(@at $k, $body, 0, 1, 2, 3, 4, 5, 6, 7)
    }};
    (12, $k:ident, $body:block) => {{
        $crate::unroll!(@at $k, $body, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    }};
    (16, $k:ident, $body:block) => {{
        $crate::unroll!(@at $k, $body, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    }};
    (@at $k:ident, $body:block, $($i:literal),*) => {{
        $({
            #[allow(dead_code)]
            const $k: usize = $i;
            $body
        })*
    }};
}

// ---------------------------------------------------------------- indices

#[inline(always)]
pub fn thread_idx() -> u32 {
    unsafe { nvptx::_thread_idx_x() as u32 }
}
#[inline(always)]
pub fn block_idx() -> u32 {
    unsafe { nvptx::_block_idx_x() as u32 }
}
#[inline(always)]
pub fn block_dim() -> u32 {
    unsafe { nvptx::_block_dim_x() as u32 }
}
#[inline(always)]
pub fn grid_dim() -> u32 {
    unsafe { nvptx::_grid_dim_x() as u32 }
}
#[inline(always)]
pub fn lane() -> u32 {
    thread_idx() & (WARP_SIZE - 1)
}
#[inline(always)]
pub fn warp() -> u32 {
    thread_idx() / WARP_SIZE
}
#[inline(always)]
pub fn warps_per_block() -> u32 {
    block_dim() / WARP_SIZE
}
/// Global warp index across the grid.
#[inline(always)]
pub fn global_warp() -> u32 {
    block_idx() * warps_per_block() + warp()
}

// ---------------------------------------------------------------- block-level sync and shared memory

/// `bar.sync 0`: every thread of the block waits here; orders shared-memory accesses.
#[inline(always)]
pub fn sync_threads() {
    unsafe { nvptx::_syncthreads() }
}

// `bar.warp.sync` goes through LLVM's NVVM intrinsic, which LLVM knows to be *convergent*, for
// the reason the shuffles below do: an `asm!` barrier is an ordinary call to LLVM, which may
// duplicate it into both arms of an `if` (it did so with a named `bar.sync`, whose warps then
// met at two different instructions of an aligned barrier: undefined behaviour, and
// compute-sanitizer's synccheck stopped the kernel there).
#[allow(improper_ctypes)]
extern "C" {
    #[link_name = "llvm.nvvm.bar.warp.sync"]
    fn nvvm_bar_warp_sync(mask: u32);
}

/// `bar.warp.sync`: the lanes of the warp meet here; orders their shared-memory accesses.
#[inline(always)]
pub fn sync_warp() {
    unsafe { nvvm_bar_warp_sync(0xffff_ffff) }
}

/// The dynamic shared memory of this launch (its size is the launch's `shared_mem_bytes`).
#[inline(always)]
pub fn dynamic_shared<T>() -> *mut T {
    core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<T>()
}

/// Sleep for about `ns` nanoseconds: keeps spinning waiters off the memory system.
#[inline(always)]
pub fn nanosleep(ns: u32) {
    unsafe { asm!("nanosleep.u32 {0};", in(reg32) ns, options(nostack)) }
}

/// Stop the kernel with an error (the host sees `CUDA_ERROR_ILLEGAL_INSTRUCTION`).
#[inline(always)]
pub fn trap() -> ! {
    unsafe { nvptx::trap() }
}

/// This SM's cycle counter: precise durations within one block.
#[inline(always)]
pub fn clock64() -> u64 {
    let t: u64;
    unsafe { asm!("mov.u64 {0}, %clock64;", out(reg64) t, options(nomem, nostack)) }
    t
}

/// Nanosecond wall clock shared by all SMs (`%globaltimer`; it ticks coarsely, so use it for
/// intervals of microseconds, not single instructions).
#[inline(always)]
pub fn global_timer_ns() -> u64 {
    let t: u64;
    unsafe { asm!("mov.u64 {0}, %globaltimer;", out(reg64) t, options(nomem, nostack)) }
    t
}

// ---------------------------------------------------------------- warp shuffles and reductions

// Shuffles go through LLVM's own NVVM intrinsics, not `asm!`: LLVM knows these are
// *convergent* (every lane of the mask must execute them together), so it never sinks one into
// a branch that only some lanes take. An `asm!` block marked pure was sunk into an
// `if lane() == 0` by LLVM, which leaves 31 lanes out of a full-mask shuffle: garbage or a hang.
#[allow(improper_ctypes)]
extern "C" {
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn nvvm_shfl_bfly_f32(mask: u32, v: f32, lane_mask: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.bfly.i32"]
    fn nvvm_shfl_bfly_i32(mask: u32, v: u32, lane_mask: u32, clamp: u32) -> u32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.f32"]
    fn nvvm_shfl_idx_f32(mask: u32, v: f32, src: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.i32"]
    fn nvvm_shfl_idx_i32(mask: u32, v: u32, src: u32, clamp: u32) -> u32;
    #[link_name = "llvm.nvvm.shfl.sync.up.f32"]
    fn nvvm_shfl_up_f32(mask: u32, v: f32, delta: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.up.i32"]
    fn nvvm_shfl_up_i32(mask: u32, v: u32, delta: u32, clamp: u32) -> u32;
    #[link_name = "llvm.nvvm.vote.ballot.sync"]
    fn nvvm_ballot(mask: u32, pred: bool) -> u32;
}

/// Value of `v` held by lane `lane ^ mask`; all 32 lanes must call it together.
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    unsafe { nvvm_shfl_bfly_f32(0xffff_ffff, v, mask, 0x1f) }
}
#[inline(always)]
pub fn shfl_xor_u32(v: u32, mask: u32) -> u32 {
    unsafe { nvvm_shfl_bfly_i32(0xffff_ffff, v, mask, 0x1f) }
}
/// Value of `v` held by lane `src` of the warp; all 32 lanes must call it together.
#[inline(always)]
pub fn shfl_idx_f32(v: f32, src: u32) -> f32 {
    unsafe { nvvm_shfl_idx_f32(0xffff_ffff, v, src, 0x1f) }
}

#[inline(always)]
pub fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    unsafe { nvvm_shfl_idx_i32(0xffff_ffff, v, src, 0x1f) }
}
#[inline(always)]
pub fn shfl_idx_u64(v: u64, src: u32) -> u64 {
    (shfl_idx_u32((v >> 32) as u32, src) as u64) << 32 | shfl_idx_u32(v as u32, src) as u64
}
#[inline(always)]
pub fn shfl_xor_u64(v: u64, mask: u32) -> u64 {
    (shfl_xor_u32((v >> 32) as u32, mask) as u64) << 32 | shfl_xor_u32(v as u32, mask) as u64
}
/// Value of `v` held by lane `lane - delta` (lanes below `delta` keep their own); all 32 lanes
/// must call it together.
#[inline(always)]
pub fn shfl_up_f32(v: f32, delta: u32) -> f32 {
    unsafe { nvvm_shfl_up_f32(0xffff_ffff, v, delta, 0) }
}
#[inline(always)]
pub fn shfl_up_u64(v: u64, delta: u32) -> u64 {
    let hi = unsafe { nvvm_shfl_up_i32(0xffff_ffff, (v >> 32) as u32, delta, 0) };
    let lo = unsafe { nvvm_shfl_up_i32(0xffff_ffff, v as u32, delta, 0) };
    (hi as u64) << 32 | lo as u64
}
/// Bit `l` set where lane `l`'s `pred` is true; all 32 lanes must call it together.
#[inline(always)]
pub fn ballot(pred: bool) -> u32 {
    unsafe { nvvm_ballot(0xffff_ffff, pred) }
}
/// Inclusive prefix sum over the lanes (lane `l` gets `v_0 + ... + v_l`), in a fixed order.
#[inline(always)]
pub fn warp_prefix_sum(mut v: f32) -> f32 {
    let mut d = 1;
    while d < WARP_SIZE {
        let o = shfl_up_f32(v, d);
        if lane() >= d {
            v += o;
        }
        d <<= 1;
    }
    v
}

/// Inclusive integer prefix sum over the lanes (lane `l` gets `v_0 + ... + v_l`).
#[inline(always)]
pub fn warp_prefix_sum_u64(mut v: u64) -> u64 {
    let mut d = 1;
    while d < WARP_SIZE {
        let o = shfl_up_u64(v, d);
        if lane() >= d {
            v = v.wrapping_add(o);
        }
        d <<= 1;
    }
    v
}

/// Sum over the 32 lanes; every lane gets the result.
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m >>= 1;
    }
    v
}
/// Eight sums over the 32 lanes at once, in 9 shuffles (8 separate [`warp_sum`]s take 40, in
/// 8 dependent chains): each step sends half of the sums still held to the partner lane and
/// keeps the other half. Lane `l` gets the sum of `v[(l >> 2) & 7]`, in a fixed order.
#[inline(always)]
pub fn warp_sum8(v: [f32; 8]) -> f32 {
    let l = lane();
    let (hi4, hi3, hi2) = (l & 16 != 0, l & 8 != 0, l & 4 != 0);
    let mut four = [0.0f32; 4];
    for i in 0..4 {
        let (keep, send) = if hi4 { (v[4 + i], v[i]) } else { (v[i], v[4 + i]) };
        four[i] = keep + shfl_xor_f32(send, 16);
    }
    let mut two = [0.0f32; 2];
    for i in 0..2 {
        let (keep, send) = if hi3 { (four[2 + i], four[i]) } else { (four[i], four[2 + i]) };
        two[i] = keep + shfl_xor_f32(send, 8);
    }
    let (keep, send) = if hi2 { (two[1], two[0]) } else { (two[0], two[1]) };
    let mut s = keep + shfl_xor_f32(send, 4);
    s += shfl_xor_f32(s, 2);
    s + shfl_xor_f32(s, 1)
}
/// Four sums over each group of four lanes (`l & !3 ..`) at once, in 3 shuffles: lane `l`
/// gets the group's sum of `v[l & 3]`, in a fixed order.
#[inline(always)]
pub fn quad_sum4(v: [f32; 4]) -> f32 {
    let l = lane();
    let (hi1, hi0) = (l & 2 != 0, l & 1 != 0);
    let mut two = [0.0f32; 2];
    for i in 0..2 {
        let (keep, send) = if hi1 { (v[2 + i], v[i]) } else { (v[i], v[2 + i]) };
        two[i] = keep + shfl_xor_f32(send, 2);
    }
    let (keep, send) = if hi0 { (two[1], two[0]) } else { (two[0], two[1]) };
    keep + shfl_xor_f32(send, 1)
}
/// Eight sums over each group of eight lanes (`l & !7 ..`) at once, in 7 shuffles: lane `l`
/// gets the group's sum of `v[l & 7]`, in a fixed order.
#[inline(always)]
pub fn group8_sum8(v: [f32; 8]) -> f32 {
    let l = lane();
    let (hi2, hi1, hi0) = (l & 4 != 0, l & 2 != 0, l & 1 != 0);
    let mut four = [0.0f32; 4];
    crate::unroll!(4, i, {
        let (keep, send) = if hi2 { (v[4 + i], v[i]) } else { (v[i], v[4 + i]) };
        four[i] = keep + shfl_xor_f32(send, 4);
    });
    let mut two = [0.0f32; 2];
    crate::unroll!(2, i, {
        let (keep, send) = if hi1 { (four[2 + i], four[i]) } else { (four[i], four[2 + i]) };
        two[i] = keep + shfl_xor_f32(send, 2);
    });
    let (keep, send) = if hi0 { (two[1], two[0]) } else { (two[0], two[1]) };
    keep + shfl_xor_f32(send, 1)
}
/// Integer sum over the 32 lanes (the same in any order); every lane gets the result.
#[inline(always)]
pub fn warp_sum_u64(mut v: u64) -> u64 {
    let mut m = 16;
    while m > 0 {
        v = v.wrapping_add(shfl_xor_u64(v, m));
        m >>= 1;
    }
    v
}
/// Maximum over the 32 lanes; every lane gets the result.
#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v = fmaxf(v, shfl_xor_f32(v, m));
        m >>= 1;
    }
    v
}
/// Arg-max over the lanes: the largest value, ties to the smallest index (as the CPU does).
#[inline(always)]
pub fn warp_argmax(mut v: f32, mut i: u32) -> (f32, u32) {
    let mut m = 16;
    while m > 0 {
        let ov = shfl_xor_f32(v, m);
        let oi = shfl_xor_u32(i, m);
        if better(ov, oi, v, i) {
            v = ov;
            i = oi;
        }
        m >>= 1;
    }
    (v, i)
}
/// Is candidate (v, i) better than the incumbent (bv, bi)? Larger wins; ties to the lower
/// index; NaN never wins.
#[inline(always)]
pub fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    v > bv || (v == bv && i < bi)
}

/// Block-wide sum: every thread gets the result. `scratch` holds one f32 per warp and is
/// free for reuse when this returns.
#[inline(always)]
pub unsafe fn block_sum(v: f32, scratch: *mut f32) -> f32 {
    let w = warp_sum(v);
    if lane() == 0 {
        *scratch.add(warp() as usize) = w;
    }
    sync_threads();
    let mut total = 0.0;
    for k in 0..warps_per_block() {
        total += *scratch.add(k as usize);
    }
    sync_threads();
    total
}

#[inline(always)]
pub fn fmaxf(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe { asm!("max.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(nomem, nostack, pure)) }
    r
}

#[inline(always)]
pub fn fminf(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe { asm!("min.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(nomem, nostack, pure)) }
    r
}

// ---------------------------------------------------------------- math

/// 2^x via `ex2.approx` (libm's `expf` does not survive the NVPTX backend).
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("ex2.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(nomem, nostack, pure)) }
    r
}
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp2(x * LOG2_E)
}
/// log2(x) via `lg2.approx` (about 2 ulp).
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("lg2.approx.ftz.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(nomem, nostack, pure)) }
    r
}
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    log2(x) * core::f32::consts::LN_2
}
/// Fused multiply-add, one rounding (`fma.rn.f32`).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    core::intrinsics::fmaf32(a, b, c)
}
/// 1/sqrt(x), correctly rounded-ish (`rsqrt.approx`, 2 ulp): used only for RMSNorm.
#[inline(always)]
pub fn rsqrt(x: f32) -> f32 {
    let r: f32;
    unsafe { asm!("rsqrt.approx.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(nomem, nostack, pure)) }
    r
}
#[inline(always)]
pub fn sin_cos(x: f32) -> (f32, f32) {
    let s: f32;
    let c: f32;
    unsafe {
        asm!("sin.approx.f32 {0}, {1};", out(reg32) s, in(reg32) x, options(nomem, nostack, pure));
        asm!("cos.approx.f32 {0}, {1};", out(reg32) c, in(reg32) x, options(nomem, nostack, pure));
    }
    (s, c)
}

// ---------------------------------------------------------------- bf16

/// bf16 bits to f32: bf16 is the top half of an f32.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
/// The low and high bf16 of a packed pair, as f32.
#[inline(always)]
pub fn bf16x2_to_f32(w: u32) -> (f32, f32) {
    (f32::from_bits(w << 16), f32::from_bits(w & 0xffff_0000))
}
/// f32 to bf16 bits, round to nearest even (`cvt.rn.bf16.f32`), NaN stays NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let r: u16;
    unsafe { asm!("cvt.rn.bf16.f32 {0}, {1};", out(reg16) r, in(reg32) x, options(nomem, nostack, pure)) }
    r
}

/// `x` rounded to the nearest bf16 (as `f32_to_bf16` rounds), back in f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// Four packed bf16 (two words) as f32.
#[inline(always)]
pub fn bf16x4_to_f32(w: [u32; 2]) -> [f32; 4] {
    let (a, b) = bf16x2_to_f32(w[0]);
    let (c, d) = bf16x2_to_f32(w[1]);
    [a, b, c, d]
}

// ---------------------------------------------------------------- vector loads

/// 16 bytes through the read-only (non-coherent) path: for data no thread of this launch
/// writes, i.e. weights. `p` must be 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_nc_v4(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.nc.L1::no_allocate.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p,
         options(readonly, nostack, pure));
    [a, b, c, d]
}
/// 8 bytes through the read-only path (constant data: norm weights, embedding rows).
#[inline(always)]
pub unsafe fn ld_nc_v2(p: *const u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!("ld.global.nc.v2.u32 {{{0}, {1}}}, [{2}];", out(reg32) a, out(reg32) b, in(reg64) p,
         options(readonly, nostack, pure));
    [a, b]
}
/// 16 bytes of f32 through the coherent path, bypassing L1 (`.cg`): activations written by
/// other blocks earlier in this launch must not be served from a stale L1 line.
#[inline(always)]
pub unsafe fn ld_cg_f32x4(p: *const f32) -> [f32; 4] {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!("ld.global.cg.v4.f32 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p,
         options(readonly, nostack));
    [a, b, c, d]
}
#[inline(always)]
pub unsafe fn ld_cg_f32(p: *const f32) -> f32 {
    let a: f32;
    asm!("ld.global.cg.f32 {0}, [{1}];", out(reg32) a, in(reg64) p, options(readonly, nostack));
    a
}
#[inline(always)]
pub unsafe fn ld_cg_u64(p: *const u64) -> u64 {
    let a: u64;
    asm!("ld.global.cg.u64 {0}, [{1}];", out(reg64) a, in(reg64) p, options(readonly, nostack));
    a
}
#[inline(always)]
pub unsafe fn ld_cg_u32(p: *const u32) -> u32 {
    let a: u32;
    asm!("ld.global.cg.u32 {0}, [{1}];", out(reg32) a, in(reg64) p, options(readonly, nostack));
    a
}
/// 16 bytes of u32 via `.cg` (L2 only): for the KV cache, written earlier in this launch.
#[inline(always)]
pub unsafe fn ld_cg_v4(p: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.cg.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p,
         options(readonly, nostack));
    [a, b, c, d]
}
/// 8 bytes (4 bf16) via `.cg`: one lane's share of a 128-wide KV row.
#[inline(always)]
pub unsafe fn ld_cg_v2(p: *const u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!("ld.global.cg.v2.u32 {{{0}, {1}}}, [{2}];", out(reg32) a, out(reg32) b, in(reg64) p, options(readonly, nostack));
    [a, b]
}
#[inline(always)]
pub unsafe fn ld_cg_u16(p: *const u16) -> u16 {
    let a: u16;
    asm!("ld.global.cg.u16 {0}, [{1}];", out(reg16) a, in(reg64) p, options(readonly, nostack));
    a
}

/// `E` (1, 2 or 4) consecutive f32 written earlier in this launch, aligned to their size, in
/// one load through L2 (a lane's share of an attention head).
#[inline(always)]
pub unsafe fn ld_cg_f32s<const E: usize>(p: *const f32) -> [f32; E] {
    let mut out = [0.0f32; E];
    if E == 4 {
        let v = ld_cg_f32x4(p);
        for e in 0..E {
            out[e] = v[e];
        }
    } else if E == 2 {
        let v = ld_cg_v2(p as *const u32);
        for e in 0..E {
            out[e] = f32::from_bits(v[e]);
        }
    } else {
        out[0] = ld_cg_f32(p);
    }
    out
}

/// `E` (1, 2 or 4) consecutive read-only f32 at `p` (aligned to their size) in one load.
#[inline(always)]
pub unsafe fn ld_nc_f32s<const E: usize>(p: *const f32) -> [f32; E] {
    let mut out = [0.0f32; E];
    if E == 4 {
        let v = ld_nc_v4(p as *const u32);
        for e in 0..E {
            out[e] = f32::from_bits(v[e]);
        }
    } else if E == 2 {
        let v = ld_nc_v2(p as *const u32);
        for e in 0..E {
            out[e] = f32::from_bits(v[e]);
        }
    } else {
        out[0] = *p;
    }
    out
}

/// `E` (1, 2 or 4) consecutive read-only bf16 at `p` (aligned to their size), as f32.
#[inline(always)]
pub unsafe fn ld_nc_bf16s<const E: usize>(p: *const u16) -> [f32; E] {
    let mut out = [0.0f32; E];
    if E == 4 {
        let v = bf16x4_to_f32(ld_nc_v2(p as *const u32));
        for e in 0..E {
            out[e] = v[e];
        }
    } else if E == 2 {
        let (a, b) = bf16x2_to_f32(*(p as *const u32));
        out[0] = a;
        out[E - 1] = b;
    } else {
        out[0] = bf16_to_f32(*p);
    }
    out
}

// ---------------------------------------------------------------- shared-memory atomics

/// `atom.shared.add.u32` on a shared-memory address (block scope is all it needs).
#[inline(always)]
pub unsafe fn shared_atomic_add(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    let a = p as u64;
    asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {1}; atom.shared.add.u32 {0}, [s], {2}; }}",
         out(reg32) old, in(reg64) a, in(reg32) v, options(nostack));
    old
}

/// Adds a 64-bit `v` to the word pair (`lo`, `hi`) in shared memory with two 32-bit atomics:
/// the low add returns the old low word, whose overflow is the carry into the high word.
/// Every add's carry comes from the value that add replaced, so once all adds are done the
/// pair holds the exact sum mod 2^64 in any order (a weight histogram summed this way is
/// deterministic). Why not `red.shared.add.u64`: ptxas makes it a compare-and-swap loop on
/// sm_90 (`ATOMS.CAST.SPIN.64`), which lanes adding to one word retry in turn; the 32-bit
/// add is one `ATOMS.ADD`. Read the pair only after a barrier that follows every add.
#[inline(always)]
pub unsafe fn shared_atomic_add_u64_pair(lo: *mut u32, hi: *mut u32, v: u64) {
    let v_lo = v as u32;
    let old = shared_atomic_add(lo, v_lo);
    let carry = (old.wrapping_add(v_lo) < old) as u32;
    let up = (v >> 32) as u32 + carry;
    if up != 0 {
        shared_atomic_add(hi, up);
    }
}

// ---------------------------------------------------------------- tensor cores (sm_80+)
//
// The three instructions a tensor-core GEMM is built from: `cp.async` copies global memory
// into shared memory without passing through registers (so a block can have the next tiles
// in flight while it computes on this one), `ldmatrix` loads a warp's operand fragments from
// shared memory in the layout `mma.sync` wants, and `mma.sync` multiplies them. All three need
// sm_80 or newer (the README's minimum GPU); on an older `QWEN3_SM` the driver would reject
// the module.
//
// Shared-memory operands are 32-bit shared-window addresses (`shared_address`): the window is
// far below 4 GiB, and a kernel that computes its base address once and adds offsets to it
// spends fewer instructions per load than converting a generic pointer in every asm block.
// Only `shared_address` is `pure`. `cp.async` and `ldmatrix` touch memory the compiler cannot
// see (shared memory filled asynchronously), so they must stay where they are relative to the
// barriers and to each other. `ldmatrix` and `mma.sync` are also warp-collective (`.aligned`:
// all 32 lanes execute the same instruction): a pure block may be sunk into a branch that
// only some lanes take (seen with a shuffle, see the shuffles' note), so they are not pure
// either, and callers keep them out of lane-dependent branches.
//
// Fragment layouts, as the PTX ISA defines them for m16n8k16 with 16-bit inputs. In a warp,
// lane `l` is in *group* `g = l / 4` and has index `t = l % 4` within it. A register of A or
// B holds two consecutive bf16 along k, the lower k in the low half.
//
//   A (16 x 16, m by k, "row"): a[0] = A[g][2t..2t+2]      a[1] = A[g+8][2t..2t+2]
//                                a[2] = A[g][2t+8..2t+10]   a[3] = A[g+8][2t+8..2t+10]
//   B (16 x 8, k by n, "col"):   b[0] = B[2t..2t+2][g]      b[1] = B[2t+8..2t+10][g]
//   C, D (16 x 8, f32):          c[0], c[1] = C[g][2t], C[g][2t+1]
//                                c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//
// "col" for B means each of its registers holds two elements of one *column* of B (adjacent
// k): exactly two adjacent elements of one row of a weight matrix stored [n, k], as the
// checkpoint stores [out, in]. So W's rows load with the plain (non-transposing) `ldmatrix`.

/// The shared-window address of a pointer into shared memory (`cvta.to.shared`), for the
/// `ldmatrix` and `cp.async` wrappers below. `p` must point into this block's shared memory.
#[inline(always)]
pub fn shared_address<T>(p: *const T) -> u32 {
    let a: u32;
    unsafe {
        asm!("{{ .reg .u64 s; cvta.to.shared.u64 s, {1}; cvt.u32.u64 {0}, s; }}",
             out(reg32) a, in(reg64) p, options(nomem, nostack, pure))
    }
    a
}

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: four 8x8 matrices of 16-bit elements from shared
/// memory, one register of each per lane. All 32 lanes call it together (it is `.sync.aligned`).
///
/// Lanes `8i .. 8i+8` give the addresses of the eight rows of matrix `i` (lane `8i + r`: row
/// `r`), each row 16 contiguous bytes, 16-byte aligned. Register `i` of lane `l` then holds
/// elements `2(l % 4)` and `2(l % 4) + 1` of row `l / 4` of matrix `i`: the A/B fragment layout
/// above with `g = l / 4`, `t = l % 4`, for an 8x8 piece. So for the 16x16 A fragment at
/// rows m0.., columns k0.. of a row-major tile, lane `l` points at row `m0 + l % 16`, column
/// `k0 + 8 (l / 16)`, and the four registers are a[0..4] in order.
#[inline(always)]
pub unsafe fn ldmatrix_x4(row_address: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg32) row_address,
         options(readonly, nostack));
    [a, b, c, d]
}

/// `ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16`: as [`ldmatrix_x4`], each 8x8 matrix
/// transposed on the way: register `i` of lane `l` holds elements `l / 4` of rows `2(l % 4)`
/// and `2(l % 4) + 1` of matrix `i`. That is the B fragment of a row-major `[k][n]` tile (two
/// adjacent k of one column n), e.g. V stored `[key][dim]` as the B of `P V`.
#[inline(always)]
pub unsafe fn ldmatrix_x4_trans(row_address: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg32) row_address,
         options(readonly, nostack));
    [a, b, c, d]
}

/// Two f32 rounded to bf16 (`cvt.rn.bf16x2.f32`) and packed as one fragment register: `lo` in
/// the low half (the lower k or column index), as `mma.sync` and memory order expect.
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) hi, in(reg32) lo, options(nomem, nostack, pure))
    }
    r
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: `acc += A * B` for one warp, A 16x16
/// and B 16x8 bf16 (fragments as laid out above), `acc` the 16x8 f32 accumulator fragment. All
/// 32 lanes call it together. The products are exact in f32; how the tensor core rounds its
/// sums is its own (not the IEEE order of a CPU loop), so compare with a tolerance.
#[inline(always)]
pub fn mma_bf16_m16n8k16(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    unsafe {
        asm!("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \
              {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{0}, {1}, {2}, {3}}};",
             inout(reg32) acc[0], inout(reg32) acc[1], inout(reg32) acc[2], inout(reg32) acc[3],
             in(reg32) a[0], in(reg32) a[1], in(reg32) a[2], in(reg32) a[3],
             in(reg32) b[0], in(reg32) b[1],
             options(nomem, nostack));
    }
}

/// `cp.async.cg.shared.global`, 16 bytes: starts copying `src` (global, 16-byte aligned) to the
/// shared-window address `dst` (16-byte aligned) and returns at once. `.cg` caches in L2 only:
/// a tile is read once per block, so keeping it in L1 would only evict others. When `valid`
/// is false nothing is read and the 16 bytes are zero-filled (the `src-size` operand is 0),
/// so rows past the end of a matrix become zeros; `src` must still be a valid address (pass
/// one inside the matrix). The copy belongs to the next `cp_async_commit_group`'s group; it
/// is not visible until `cp_async_wait_group` says its group is done and (for other threads)
/// a barrier follows.
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: *const u8, valid: bool) {
    let src_size: u32 = if valid { 16 } else { 0 };
    asm!("cp.async.cg.shared.global [{0}], [{1}], 16, {2};",
         in(reg32) dst, in(reg64) src, in(reg32) src_size, options(nostack));
}

/// `cp.async.commit_group`: closes a group of this thread's `cp_async_16` copies, to be waited
/// for together. Committing with no copies makes an empty group, which keeps the count of
/// groups (what `cp_async_wait_group` counts) the same in every iteration of a pipeline.
#[inline(always)]
pub unsafe fn cp_async_commit_group() {
    asm!("cp.async.commit_group;", options(nostack));
}

/// `cp.async.wait_group PENDING`: waits until at most `PENDING` of this thread's committed
/// groups are unfinished (the most recent ones). Only this thread's copies: a `sync_threads`
/// must follow before other threads read what they wrote.
#[inline(always)]
pub unsafe fn cp_async_wait_group<const PENDING: u32>() {
    asm!("cp.async.wait_group {0};", const PENDING, options(nostack));
}

// ---------------------------------------------------------------- GPU-scope atomics

/// `atom.add.acq_rel.gpu`: returns the old value; releases this thread's earlier writes and
/// acquires those released by whoever wrote the value it read.
#[inline(always)]
pub unsafe fn atomic_add_acq_rel(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    asm!("atom.add.acq_rel.gpu.u32 {0}, [{1}], {2};", out(reg32) old, in(reg64) p, in(reg32) v, options(nostack));
    old
}
/// Relaxed GPU-scope add, for counters that order nothing.
#[inline(always)]
pub unsafe fn atomic_add_relaxed(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    asm!("atom.add.relaxed.gpu.u32 {0}, [{1}], {2};", out(reg32) old, in(reg64) p, in(reg32) v, options(nostack));
    old
}
#[inline(always)]
pub unsafe fn ld_acquire(p: *const u32) -> u32 {
    let v: u32;
    asm!("ld.acquire.gpu.global.u32 {0}, [{1}];", out(reg32) v, in(reg64) p, options(nostack));
    v
}
/// Store to host-mapped (system) memory, visible to the CPU once released.
#[inline(always)]
pub unsafe fn st_release_sys(p: *mut u32, v: u32) {
    asm!("st.release.sys.global.u32 [{0}], {1};", in(reg64) p, in(reg32) v, options(nostack));
}
/// Relaxed store to host-mapped memory: no fence, the writer does not wait for it.
#[inline(always)]
pub unsafe fn st_relaxed_sys(p: *mut u32, v: u32) {
    asm!("st.relaxed.sys.global.u32 [{0}], {1};", in(reg64) p, in(reg32) v, options(nostack));
}
/// Relaxed load from host-mapped memory: the thread goes on until the value is used.
#[inline(always)]
pub unsafe fn ld_relaxed_sys(p: *const u32) -> u32 {
    let v: u32;
    asm!("ld.relaxed.sys.global.u32 {0}, [{1}];", out(reg32) v, in(reg64) p, options(nostack));
    v
}
#[inline(always)]
pub unsafe fn ld_acquire_sys(p: *const u32) -> u32 {
    let v: u32;
    asm!("ld.acquire.sys.global.u32 {0}, [{1}];", out(reg32) v, in(reg64) p, options(nostack));
    v
}

/// `prefetch.global.L2`: brings the line holding `p` into L2; nothing comes back, nothing
/// waits for it.
#[inline(always)]
pub unsafe fn prefetch_l2<T>(p: *const T) {
    asm!("prefetch.global.L2 [{0}];", in(reg64) p, options(nostack, readonly));
}

/// `v` through an `asm!` mov the compiler cannot see through: a value that is the same in
/// every iteration of a loop is then not hoisted out of it (and held in a register through
/// the whole loop) by computations on it.
#[inline(always)]
pub fn opaque(v: u32) -> u32 {
    let r: u32;
    unsafe { asm!("mov.u32 {0}, {1};", out(reg32) r, in(reg32) v, options(nostack)) };
    r
}

/// `red.add.release.gpu`: an add whose result nobody waits for; releases this thread's
/// earlier writes (and, after a `bar.sync`, its block's) to whoever acquires the sum.
#[inline(always)]
pub unsafe fn red_add_release(p: *mut u32, v: u32) {
    asm!("red.release.gpu.global.add.u32 [{0}], {1};", in(reg64) p, in(reg32) v, options(nostack));
}

/// `red.relaxed.gpu.global.add.u64`: a 64-bit add to global memory (one `RED.E.ADD.64`, not a
/// compare-and-swap loop as in shared memory); unordered: a release that follows publishes it.
#[inline(always)]
pub unsafe fn red_add_relaxed_u64(p: *mut u64, v: u64) {
    asm!("red.relaxed.gpu.global.add.u64 [{0}], {1};", in(reg64) p, in(reg64) v, options(nostack));
}

// ---------------------------------------------------------------- the grid-wide barrier

/// Grid-wide barrier for a cooperative launch: no thread passes until every thread of every
/// block has arrived, and all writes made before it are visible to all threads after it.
///
/// One 32-bit word in global memory, zero before the first launch, serves any number of
/// consecutive barriers with no reset. Block 0 adds `2^31 - (blocks - 1)`, every other block
/// adds 1: the total per barrier is exactly `2^31`, so the top bit (the barrier's *sense*)
/// flips once, at the last arrival, and the low 31 bits return to zero. Any partial sum stays
/// below `2^31` past the current base, so a waiter can never see a false flip from blocks that
/// already ran ahead to the next barrier.
///
/// The adds are `red` (no result comes back): a block knows the sense to wait for without the
/// word's old value, because its warp 0 reads the sense once (`grid_sense`) before the block's
/// first arrival, when no barrier can complete without it, and then flips its copy at every
/// barrier. The last block to arrive thus starts waiting at once rather than after an
/// atomic's round trip to L2. Spreading the arrivals over 4 or 8 counters on separate lines
/// was slower: contention on one word is not what a barrier costs here (docs/performance.md,
/// experiments log).
///
/// Ordering: `bar.sync` orders the block's writes before thread 0's release add (release is
/// cumulative), the acquire loads make every other block's released writes visible to
/// warp 0, and the second `bar.sync` extends that to the whole block.
const SENSE: u32 = 0x8000_0000;

/// The barrier's sense as warp 0 of this block must track it (see above): call before the
/// block's first arrival at `bar` in this launch. Other warps get a value they never use.
#[inline(always)]
pub unsafe fn grid_sense(bar: *mut u32) -> u32 {
    if warp() == 0 {
        ld_acquire(bar) & SENSE
    } else {
        0
    }
}

/// `grid_sense` into `*sense` (shared memory), the form `grid_wait_at` reads: all threads call
/// it before the block's first arrival; the `sync_threads` of that arrival publishes it to
/// warp 0.
#[inline(always)]
pub unsafe fn grid_sense_at(bar: *mut u32, sense: *mut u32) {
    let s = grid_sense(bar);
    if thread_idx() == 0 {
        *sense = s;
    }
}

/// Announces this block's arrival (all threads call it; thread 0 adds).
#[inline(always)]
pub unsafe fn grid_arrive(bar: *mut u32) {
    sync_threads();
    if thread_idx() == 0 {
        let inc = if block_idx() == 0 { SENSE - (grid_dim() - 1) } else { 1 };
        red_add_release(bar, inc);
    }
}

/// Waits until every block has arrived at the barrier whose sense was `sense`; returns the
/// sense of the next one. `grid_arrive` and `grid_wait` are the two halves of `grid_sync`, so
/// a block can do independent work (e.g. request its next weights) in between.
///
/// Warp 0 polls, every lane reading the same word (one load per poll): a branch that is the
/// same for every lane of a warp, which in the decode kernel also left ptxas six more
/// registers for everything else than thread 0 alone polling did.
#[inline(always)]
pub unsafe fn grid_wait(bar: *mut u32, sense: u32) -> u32 {
    if warp() == 0 {
        while ld_acquire(bar) & SENSE == sense {}
    }
    sync_threads();
    sense ^ SENSE
}

/// `grid_wait` with the sense kept in memory (shared memory in the decode kernel, so that no
/// register holds it through the code between barriers): waits, then flips `*sense`.
#[inline(always)]
pub unsafe fn grid_wait_at(bar: *mut u32, sense: *mut u32) {
    if warp() == 0 {
        let s = *sense;
        while ld_acquire(bar) & SENSE == s {}
        // Every lane has read the old sense before lane 0 replaces it.
        sync_warp();
        if lane() == 0 {
            *sense = s ^ SENSE;
        }
    }
    sync_threads();
}

/// `grid_arrive` then `grid_wait`.
#[inline(always)]
pub unsafe fn grid_sync(bar: *mut u32, sense: u32) -> u32 {
    grid_arrive(bar);
    grid_wait(bar, sense)
}

// ---------------------------------------------------------------- sm_90: bulk copies, mbarriers, clusters
//
// What the streaming step (kernel/src/stream.rs) is built from. A *bulk copy*
// (`cp.async.bulk`, the TMA engine) moves bytes from global into shared memory with no thread
// and no register involved; it counts its bytes on an *mbarrier* in shared memory, which a
// consumer waits on by phase parity. `st.async` stores into another block of the same
// thread-block cluster and counts its bytes on that block's mbarrier in the same way, so a
// hand-off inside a cluster needs no fence: the receiver's wait is what orders it. Shared
// addresses are 32-bit shared-window addresses (`shared_address`); `mapa` turns one into the
// address of the same byte in another block of the cluster.
//
// None of these is `pure`: each either changes memory the compiler cannot see or must stay
// where it is relative to the waits.

// The named barrier `id` among the first `threads` threads of the block (a multiple of 32),
// through LLVM's intrinsic, which LLVM knows to be convergent (see `sync_warp`'s note on why
// not `asm!`): the streaming step's consumer warps meet here while its loader warp goes on.
#[allow(improper_ctypes)]
extern "C" {
    #[link_name = "llvm.nvvm.barrier.cta.sync.aligned.count"]
    fn nvvm_barrier_sync_count(id: u32, threads: u32);
}

#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn named_barrier(id: u32, threads: u32) {
    unsafe { nvvm_barrier_sync_count(id, threads) }
}

#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn mbarrier_init(bar: u32, count: u32) {
    asm!("mbarrier.init.shared::cta.b64 [{0}], {1};", in(reg32) bar, in(reg32) count, options(nostack));
}

/// Makes this block's `mbarrier_init`s visible to the cluster's other blocks (and to the
/// bulk-copy engine) before they signal them; a cluster barrier must follow.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn fence_mbarrier_init() {
    asm!("fence.mbarrier_init.release.cluster;", options(nostack));
}

/// One arrival on a local mbarrier (a consumer warp freeing a ring page).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn mbarrier_arrive(bar: u32) {
    asm!("{{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [{0}]; }}", in(reg32) bar, options(nostack));
}

/// One arrival that also expects `bytes` more to land in this phase (bulk copies or
/// `st.async`); bytes may land before the arrival, the phase completes once both are in.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx(bar: u32, bytes: u32) {
    asm!("{{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [{0}], {1}; }}",
         in(reg32) bar, in(reg32) bytes, options(nostack));
}

/// Waits until the phase of parity `parity` of a local mbarrier has completed. Acquires at
/// CTA scope: enough for bulk copies, whose bytes the barrier itself counts.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn mbarrier_wait(bar: u32, parity: u32) {
    loop {
        let done: u32;
        asm!("{{ .reg .pred done; mbarrier.try_wait.parity.shared::cta.b64 done, [{1}], {2}; selp.u32 {0}, 1, 0, done; }}",
             out(reg32) done, in(reg32) bar, in(reg32) parity, options(nostack));
        if done != 0 {
            return;
        }
    }
}

/// As [`mbarrier_wait`], acquiring at cluster scope: for data other blocks of the cluster
/// stored here with `st.async`.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn mbarrier_wait_cluster(bar: u32, parity: u32) {
    loop {
        let done: u32;
        asm!("{{ .reg .pred done; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [{1}], {2}; selp.u32 {0}, 1, 0, done; }}",
             out(reg32) done, in(reg32) bar, in(reg32) parity, options(nostack));
        if done != 0 {
            return;
        }
    }
}

/// `cp.async.bulk` of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global
/// memory into this block's shared memory at `dst`, counted on the mbarrier `bar`.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn bulk_copy_to_shared(dst: u32, src: u64, bytes: u32, bar: u32) {
    asm!("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [{0}], [{1}], {2}, [{3}];",
         in(reg32) dst, in(reg64) src, in(reg32) bytes, in(reg32) bar, options(nostack));
}

/// Orders this thread's earlier accesses through the generic proxy (or those it acquired) before
/// its later bulk copies, which read global memory through the async proxy.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn fence_proxy_async_global() {
    asm!("fence.proxy.async.global;", options(nostack));
}

/// The address of shared byte `addr` of cluster block `rank` (`mapa`).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub fn cluster_address(addr: u32, rank: u32) -> u32 {
    let r: u32;
    unsafe {
        asm!("mapa.shared::cluster.u32 {0}, {1}, {2};", out(reg32) r, in(reg32) addr, in(reg32) rank,
             options(nomem, nostack, pure))
    };
    r
}

/// 16 bytes into another cluster block's shared memory (`remote`, from `cluster_address`),
/// counted on its mbarrier `remote_bar`.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn st_async_v4(remote: u32, v: [u32; 4], remote_bar: u32) {
    asm!("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [{0}], {{{1}, {2}, {3}, {4}}}, [{5}];",
         in(reg32) remote, in(reg32) v[0], in(reg32) v[1], in(reg32) v[2], in(reg32) v[3], in(reg32) remote_bar,
         options(nostack));
}

/// 8 bytes, as [`st_async_v4`].
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn st_async_v2(remote: u32, v: [u32; 2], remote_bar: u32) {
    asm!("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [{0}], {{{1}, {2}}}, [{3}];",
         in(reg32) remote, in(reg32) v[0], in(reg32) v[1], in(reg32) remote_bar, options(nostack));
}

/// 4 bytes, as [`st_async_v4`].
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn st_async_b32(remote: u32, v: u32, remote_bar: u32) {
    asm!("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [{0}], {1}, [{2}];",
         in(reg32) remote, in(reg32) v, in(reg32) remote_bar, options(nostack));
}

/// Every thread of every block of the cluster meets here; orders memory at cluster scope.
/// Not `.aligned`: the loader warp's lanes arrive from different places.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn cluster_sync() {
    asm!("barrier.cluster.arrive.release;", "barrier.cluster.wait.acquire;", options(nostack));
}

/// 16 bytes of a shared-window address (a ring page written by a bulk copy, after its wait).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn ld_shared_v4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.shared.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
         out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg32) addr, options(readonly, nostack));
    [a, b, c, d]
}

/// 8 bytes of a shared-window address.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn ld_shared_v2(addr: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!("ld.shared.v2.u32 {{{0}, {1}}}, [{2}];", out(reg32) a, out(reg32) b, in(reg32) addr, options(readonly, nostack));
    [a, b]
}

/// Two 64-bit words written by other blocks' atomics, relaxed at GPU scope (no `CCTL.IVALL`:
/// a poll that orders nothing; the words carry their own completeness).
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn ld_relaxed_v2_u64(p: *const u64) -> [u64; 2] {
    let (a, b): (u64, u64);
    asm!("ld.relaxed.gpu.global.v2.u64 {{{0}, {1}}}, [{2}];", out(reg64) a, out(reg64) b, in(reg64) p, options(nostack));
    [a, b]
}

/// `red.relaxed.gpu.global.max.u64`.
#[cfg(target_feature = "sm_90")]
#[inline(always)]
pub unsafe fn red_max_relaxed_u64(p: *mut u64, v: u64) {
    asm!("red.relaxed.gpu.global.max.u64 [{0}], {1};", in(reg64) p, in(reg64) v, options(nostack));
}

/// `cvt.rni.s64.f32`: the nearest integer, ties to even (finite, in range: the caller clamps).
#[inline(always)]
pub fn f32_to_i64_nearest(x: f32) -> i64 {
    let r: i64;
    unsafe { asm!("cvt.rni.s64.f32 {0}, {1};", out(reg64) r, in(reg32) x, options(nomem, nostack, pure)) };
    r
}
