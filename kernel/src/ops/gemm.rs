//! bf16 matrix x matrix on the tensor cores: the operation prefill is made of.
//!
//! `C[M, N] = A[M, K] W[N, K]^T`: A the activations (row-major, one row per prompt position),
//! W a weight matrix as the checkpoint stores it (row-major `[out, in]`), C in f32 (row-major).
//! Products are exact and sums are f32, as the CPU twin (`host::model::ops::gemm_bf16`) does,
//! in the tensor cores' order.
//!
//! A block computes one `GEMM_TILE_M x GEMM_TILE_N` (128 x 64) tile of C with 4 warps, each
//! a 64 x 32 piece of it: 4 x 4 `mma.sync` fragments of 16 x 8, 64 f32 accumulators per lane.
//! K goes by in tiles of 32. Each K-tile of A (128 rows) and W (64 rows) is copied into shared
//! memory by `cp.async`, `GEMM_STAGES` (3) tiles deep: while the warps multiply tile `kt`, the
//! copies of tiles `kt + 1` and `kt + 2` are in flight, so the tensor cores do not wait for
//! memory once the pipeline is full. Fragments come out of shared memory with `ldmatrix` (one
//! instruction per 16 x 16 piece of A, per two 8-wide pieces of W).
//!
//! Shape contract (`abi::gemm_shape_error`, which the host checks before it launches and the
//! test kernel checks again): any M >= 1, N a multiple of 64, K a multiple of 32, all three
//! matrices 16-byte aligned. Rows of A past M are copied as zeros (`cp.async`'s zero fill)
//! and their results are not stored; N and K have no partial tiles.

use crate::abi::{GEMM_SMEM_ROW, GEMM_STAGES, GEMM_THREADS, GEMM_TILE_K, GEMM_TILE_M, GEMM_TILE_N};
use crate::device::*;
use crate::ops::mlp::silu;

/// 16 bytes: the unit of shared memory the GEMM is handed, so that its alignment (what
/// `cp.async` and `ldmatrix` need) is part of the type.
#[repr(C, align(16))]
pub struct SmemChunk(pub [u32; 4]);

/// One GEMM, or one split of K of it: device pointers and the shape (see the module's shape
/// contract). A split multiplies columns `k_begin .. k_begin + k_len` of A and W only (`c`
/// then receives that part of the sum, for the caller to add up).
#[derive(Clone, Copy)]
pub struct GemmArgs {
    /// bf16 `[m, k]`, row-major.
    pub a: *const u16,
    /// bf16 `[n, k]`, row-major (`[out, in]`). With `w_up` set: the MLP's gate matrix
    /// `[n / 2, k]`, and `w_up` its up matrix of the same shape (see `gemm_gate_up_silu_tile`).
    pub w: *const u16,
    pub w_up: *const u16,
    /// f32 `[m, n]`, row-major.
    pub c: *mut f32,
    pub m: u32,
    pub n: u32,
    /// The row length of A and W.
    pub k: u32,
    /// The columns of this split: multiples of `GEMM_TILE_K`, inside `0 .. k`.
    pub k_begin: u32,
    pub k_len: u32,
}

// Shared memory: stage `s` holds A's tile (128 rows) then W's tile (64 rows), each row 32 bf16
// of K plus 8 bf16 of padding. Why pad: `ldmatrix` reads eight 16-byte rows per 8 x 8 matrix.
// At the unpadded stride of 64 bytes (16 banks), rows r and r + 2 start on the same bank, a
// 4-way conflict. At 80 bytes (20 banks) the eight rows start on banks 0, 20, 8, 28, 16, 4,
// 24, 12: each covers 4 banks and none overlaps, so each matrix is one shared-memory
// wavefront. Padding rather than an XOR swizzle because the addresses stay plain (row times
// stride) and the cost, 25% more shared memory, still fits 3 stages in 45 KiB. The copies
// into the tiles (16 bytes per lane, two rows per 8 lanes) meet at most 2-way conflicts, and
// they are asynchronous.
const ROW_BYTES: u32 = GEMM_SMEM_ROW * 2;
const A_TILE_BYTES: u32 = GEMM_TILE_M * ROW_BYTES;
const W_TILE_BYTES: u32 = GEMM_TILE_N * ROW_BYTES;
const STAGE_BYTES: u32 = A_TILE_BYTES + W_TILE_BYTES;

/// 16-byte chunks per row of a K-tile, and the rows one pass of the block's threads copies.
const CHUNKS_PER_ROW: u32 = GEMM_TILE_K * 2 / 16;
const ROWS_PER_PASS: u32 = GEMM_THREADS / CHUNKS_PER_ROW;

/// Each warp's piece of the block's tile: a 2 x 2 arrangement of 64 x 32 pieces.
const WARP_M: u32 = 64;
const WARP_N: u32 = 32;
/// `mma.sync` fragments per warp piece: 16-row pieces of A by 8-column pieces of W.
const FRAGS_M: usize = (WARP_M / 16) as usize;
const FRAGS_N: usize = (WARP_N / 8) as usize;

const _: () = {
    assert!(GEMM_THREADS == 128 && GEMM_TILE_M == 2 * WARP_M && GEMM_TILE_N == 2 * WARP_N);
    // The fragment loops below are unrolled by `unroll!(4, ..)` and `unroll!(2, ..)`.
    assert!(FRAGS_M == 4 && FRAGS_N == 4 && GEMM_TILE_K == 32);
    assert!(GEMM_TILE_M % ROWS_PER_PASS == 0 && GEMM_TILE_N % ROWS_PER_PASS == 0);
    assert!(GEMM_STAGES >= 2 && ROW_BYTES % 16 == 0);
    // The gate/up epilogue's exchange: 64 values per lane of two warps per pair of warps.
    assert!(2 * 2 * 64 * 32 * 4 <= STAGES_BYTES);
};
const STAGES_BYTES: u32 = GEMM_STAGES * STAGE_BYTES;

/// The f32 accumulators of one lane: `[fragment row][fragment column]`, each the 4 values
/// of an m16n8 fragment (device.rs's layout of C).
type Accumulators = [[[f32; 4]; FRAGS_N]; FRAGS_M];

/// Starts the copies of K-tile `kt` of this block's rows of A (from `m0`) and W (from `n0`)
/// into stage `stage` of shared memory. Thread `t` copies chunk `t % 4` of rows `t / 4 + 32 i`:
/// four consecutive threads read one row's 64 contiguous bytes.
#[inline(always)]
unsafe fn copy_k_tile(g: &GemmArgs, m0: u32, n0: u32, kt: u32, stage_address: u32) {
    let t = thread_idx();
    let chunk = t % CHUNKS_PER_ROW;
    let first_row = t / CHUNKS_PER_ROW;
    let column = (g.k_begin + kt * GEMM_TILE_K + chunk * 8) as usize;
    let k = g.k as usize;
    let mut r = first_row;
    while r < GEMM_TILE_M {
        let row = m0 + r;
        let valid = row < g.m;
        // Rows past M read nothing (zero fill) but still need an address inside A.
        let src_row = if valid { row } else { g.m - 1 } as usize;
        let src = g.a.add(src_row * k + column) as *const u8;
        cp_async_16(stage_address + r * ROW_BYTES + chunk * 16, src, valid);
        r += ROWS_PER_PASS;
    }
    let mut r = first_row;
    while r < GEMM_TILE_N {
        // Fused gate/up: the tile's first half of W rows are gate rows n0 / 2 .., the second
        // half the up rows of the same outputs.
        let src = if g.w_up.is_null() {
            g.w.add((n0 + r) as usize * k + column)
        } else if r < GEMM_TILE_N / 2 {
            g.w.add((n0 / 2 + r) as usize * k + column)
        } else {
            g.w_up.add((n0 / 2 + r - GEMM_TILE_N / 2) as usize * k + column)
        } as *const u8;
        cp_async_16(stage_address + A_TILE_BYTES + r * ROW_BYTES + chunk * 16, src, true);
        r += ROWS_PER_PASS;
    }
}

/// Multiplies the K-tile in the stage at `stage_address` into `acc`: two steps of k = 16, each
/// 4 `ldmatrix` of A, 2 of W and 16 `mma.sync`. `a_lane` and `w_lane` are this lane's byte
/// offsets for `ldmatrix` within the warp's rows of the A and W tiles.
#[inline(always)]
unsafe fn multiply_k_tile(acc: &mut Accumulators, stage_address: u32, a_lane: u32, w_lane: u32) {
    crate::unroll!(2, KS, {
        // 16 bf16 of k = 32 bytes further along each row.
        let k_bytes = KS as u32 * 32;
        let mut a = [[0u32; 4]; FRAGS_M];
        crate::unroll!(4, MI, {
            a[MI] = ldmatrix_x4(stage_address + a_lane + MI as u32 * 16 * ROW_BYTES + k_bytes);
        });
        let mut b = [[0u32; 2]; FRAGS_N];
        crate::unroll!(2, NP, {
            // Matrices 0 and 1: b[0], b[1] of columns 16 NP..+8; 2 and 3: of the next 8.
            let r = ldmatrix_x4(stage_address + A_TILE_BYTES + w_lane + NP as u32 * 16 * ROW_BYTES + k_bytes);
            b[2 * NP] = [r[0], r[1]];
            b[2 * NP + 1] = [r[2], r[3]];
        });
        crate::unroll!(4, MI, {
            crate::unroll!(4, NJ, {
                mma_bf16_m16n8k16(&mut acc[MI][NJ], a[MI], b[NJ]);
            });
        });
    });
}

/// Computes tile `tile` of C (tiles numbered with M fastest: consecutive blocks share a tile
/// of W, so each weight is read from memory about once while the few tiles of A stay in L2).
/// All `GEMM_THREADS` threads of the block call it together; `smem` is `GEMM_SMEM_BYTES` of
/// shared memory, free for reuse when it returns (it ends with a barrier).
///
/// # Safety
/// The shape must pass `abi::gemm_shape_error`, `tile < abi::gemm_grid(m, n)`, the pointers
/// must hold their matrices and be 16-byte aligned, and the block must have `GEMM_THREADS`
/// threads.
#[inline(always)]
pub unsafe fn gemm_bf16_tile(g: &GemmArgs, tile: u32, smem: *mut SmemChunk) {
    let (m0, n0) = tile_origin(g, tile);
    let acc = multiply_tile(g, m0, n0, smem);

    // Store: lane (g, t) holds C[g][2t..2t+2] and C[g + 8][2t..2t+2] of each fragment, 8
    // bytes each (N even and the column even, so 8-byte aligned).
    let l = lane();
    let (warp_m0, warp_n0) = warp_origin();
    let group = l >> 2;
    let t2 = (l & 3) * 2;
    let n = g.n as usize;
    crate::unroll!(4, MI, {
        let row = m0 + warp_m0 + MI as u32 * 16 + group;
        crate::unroll!(4, NJ, {
            let col = (n0 + warp_n0 + NJ as u32 * 8 + t2) as usize;
            let f = acc[MI][NJ];
            if row < g.m {
                store_f32_pair(g.c.add(row as usize * n + col), f[0], f[1]);
            }
            if row + 8 < g.m {
                store_f32_pair(g.c.add((row + 8) as usize * n + col), f[2], f[3]);
            }
        });
    });
}

/// `act[r][j] = bf16(silu(gate[r][j]) * up[r][j])` with gate = `a w^T` and up = `a w_up^T`
/// (`g.n` = 2 x the MLP width, `g.c` unused): the MLP's two matrices as one GEMM whose
/// tiles each hold 32 outputs' gate columns (warps 0 and 2) and the same outputs' up columns
/// (warps 1 and 3), so that SiLU(gate) * up happens in the epilogue and neither f32 product
/// goes to memory. The up warps hand their accumulators to the gate warps through shared
/// memory (free once the product is done), in the fragment layout both share. Rounding as
/// the CPU twin's `silu_mul_bf16` of its two GEMMs. Called as `gemm_bf16_tile` is.
///
/// # Safety
/// As `gemm_bf16_tile`, with `g.w_up` set, `act` bf16 `[m, n / 2]`.
#[inline(always)]
pub unsafe fn gemm_gate_up_silu_tile(g: &GemmArgs, act: *mut u16, tile: u32, smem: *mut SmemChunk) {
    let (m0, n0) = tile_origin(g, tile);
    let acc = multiply_tile(g, m0, n0, smem);
    let (warp_m0, warp_n0) = warp_origin();
    let l = lane();
    // Slot of (fragment value, warp pair, lane): consecutive lanes in consecutive words.
    let exchange = smem as *mut f32;
    let pair = warp() >> 1;
    let slot = |i: usize| (i * 2 + pair as usize) * 32 + l as usize;
    if warp_n0 != 0 {
        crate::unroll!(4, MI, {
            crate::unroll!(4, NJ, {
                crate::unroll!(4, E, {
                    *exchange.add(slot((MI * 4 + NJ) * 4 + E)) = acc[MI][NJ][E];
                });
            });
        });
    }
    sync_threads();
    if warp_n0 == 0 {
        let group = l >> 2;
        let t2 = (l & 3) * 2;
        let width = (g.n / 2) as usize;
        crate::unroll!(4, MI, {
            let row = m0 + warp_m0 + MI as u32 * 16 + group;
            crate::unroll!(4, NJ, {
                let j = (n0 / 2 + NJ as u32 * 8 + t2) as usize;
                let gate = acc[MI][NJ];
                let up = |e: usize| *exchange.add(slot((MI * 4 + NJ) * 4 + e));
                if row < g.m {
                    let v = pack_bf16x2(silu(gate[0]) * up(0), silu(gate[1]) * up(1));
                    *(act.add(row as usize * width + j) as *mut u32) = v;
                }
                if row + 8 < g.m {
                    let v = pack_bf16x2(silu(gate[2]) * up(2), silu(gate[3]) * up(3));
                    *(act.add((row + 8) as usize * width + j) as *mut u32) = v;
                }
            });
        });
    }
}

/// The first row and column of C of tile `tile` (tiles numbered with M fastest).
#[inline(always)]
fn tile_origin(g: &GemmArgs, tile: u32) -> (u32, u32) {
    let m_tiles = g.m.div_ceil(GEMM_TILE_M);
    ((tile % m_tiles) * GEMM_TILE_M, (tile / m_tiles) * GEMM_TILE_N)
}

/// This warp's piece of the block's tile: first row and column within it.
#[inline(always)]
fn warp_origin() -> (u32, u32) {
    ((warp() >> 1) * WARP_M, (warp() & 1) * WARP_N)
}

/// The product of the block's tile at (`m0`, `n0`), this lane's accumulators; ends with a
/// barrier after which the shared memory is free.
#[inline(always)]
unsafe fn multiply_tile(g: &GemmArgs, m0: u32, n0: u32, smem: *mut SmemChunk) -> Accumulators {
    let smem_address = shared_address(smem);
    let k_tiles = g.k_len / GEMM_TILE_K;

    // Fill the pipeline: tiles 0 .. STAGES - 1, one commit group each (empty past K's end, so
    // that the loop's group count is the same for every K).
    let mut s = 0;
    while s < GEMM_STAGES - 1 {
        if s < k_tiles {
            copy_k_tile(g, m0, n0, s, smem_address + s * STAGE_BYTES);
        }
        cp_async_commit_group();
        s += 1;
    }

    // This lane's `ldmatrix` row (see device::ldmatrix_x4). A: lanes 0-15 point at rows 0-15
    // of a 16 x 16 piece at k 0, lanes 16-31 at the same rows at k 8. W: lanes 0-7 rows 0-7
    // at k 0, lanes 8-15 rows 0-7 at k 8, lanes 16-31 the same for rows 8-15.
    let l = lane();
    let (warp_m0, warp_n0) = warp_origin();
    let a_lane = (warp_m0 + (l & 15)) * ROW_BYTES + (l >> 4) * 16;
    let w_lane = (warp_n0 + (l & 7) + ((l >> 4) << 3)) * ROW_BYTES + ((l >> 3) & 1) * 16;

    let mut acc: Accumulators = [[[0.0; 4]; FRAGS_N]; FRAGS_M];
    let mut read_stage = 0;
    let mut write_stage = GEMM_STAGES - 1;
    let mut kt = 0;
    while kt < k_tiles {
        // Groups committed so far: STAGES - 1 + kt. Leaving STAGES - 2 of them pending means
        // tile kt (group kt) has landed, for this thread's copies; the barrier makes that
        // true of every thread's, and also says every warp is done with tile kt - 1, whose
        // stage (write_stage) the next copies overwrite.
        cp_async_wait_group::<{ GEMM_STAGES - 2 }>();
        sync_threads();
        let next = kt + GEMM_STAGES - 1;
        if next < k_tiles {
            copy_k_tile(g, m0, n0, next, smem_address + write_stage * STAGE_BYTES);
        }
        cp_async_commit_group();
        multiply_k_tile(&mut acc, smem_address + read_stage * STAGE_BYTES, a_lane, w_lane);
        read_stage = if read_stage + 1 == GEMM_STAGES { 0 } else { read_stage + 1 };
        write_stage = if write_stage + 1 == GEMM_STAGES { 0 } else { write_stage + 1 };
        kt += 1;
    }
    // The groups still open are empty; wait for them anyway, and for every warp to finish
    // reading, so that the caller may reuse the shared memory.
    cp_async_wait_group::<0>();
    sync_threads();
    acc
}

/// `p[0] = lo, p[1] = hi` in one 8-byte store (`p` 8-byte aligned).
#[inline(always)]
unsafe fn store_f32_pair(p: *mut f32, lo: f32, hi: f32) {
    *(p as *mut u64) = (hi.to_bits() as u64) << 32 | lo.to_bits() as u64;
}
