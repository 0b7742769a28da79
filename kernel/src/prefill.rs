//! The kernels of a prefill chunk: `gemm_bf16` (`ops::gemm`, the matrix products) and the
//! `prefill_*` ones around it. Ordinary launches of `abi::PREFILL_THREADS` threads, no shared
//! memory (the GEMM: `abi::GEMM_THREADS` threads and `abi::GEMM_SMEM_BYTES`; attention:
//! `abi::flash_smem_bytes`); the host (host/src/engine/prefill.rs) runs them in order, per layer:
//!
//! (`prefill_rms_norm` for the first layer) -> q/k/v GEMM -> `prefill_qk_rope_hd*` ->
//! `prefill_attention_hd*` -> o GEMM (split K) -> `prefill_add_rms_norm` -> `gemm_gate_up_silu`
//! -> down GEMM (split K) -> `prefill_add_rms_norm` with the next layer's norm (`prefill_add`
//! after the last), after `prefill_embed` once per chunk.
//!
//! The head-sized kernels have one entry per head_dim, as the decode kernel does, so that each
//! is compiled for its own register tile.

use crate::abi::{
    flash_grid, gemm_grid, gemm_shape_error, gemm_split_error, PrefillAttentionParams, GEMM_THREADS, PREFILL_THREADS,
};
use crate::device::*;
use crate::ops::flash_attention::flash_attention;
use crate::ops::gemm::{gemm_bf16_tile, gemm_gate_up_silu_tile, GemmArgs, SmemChunk};
use crate::ops::prefill::*;

/// `c = a w^T` (bf16 `a [m, k]`, `w [n, k]`, f32 `c [m, n]`), one tile of C per block, K cut
/// into `splits` equal parts: split `s` writes its partial product to `c + s m n` (the parts
/// sum to the product; with `splits` = 1 that is the product). Launch
/// `abi::gemm_grid(m, n) * splits` blocks of `abi::GEMM_THREADS` threads with
/// `abi::GEMM_SMEM_BYTES` of shared memory. Traps on a shape outside `abi::gemm_split_error`'s
/// contract or a block of another size.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn gemm_bf16(
    a: *const u16,
    w: *const u16,
    c: *mut f32,
    m: u32,
    n: u32,
    k: u32,
    splits: u32,
) {
    if block_dim() != GEMM_THREADS || gemm_split_error(m, n, k, splits).is_some() {
        trap();
    }
    let tiles = gemm_grid(m, n);
    if block_idx() >= tiles * splits {
        return;
    }
    // Consecutive blocks take consecutive tiles of one split, as without splits.
    let (split, tile) = (block_idx() / tiles, block_idx() % tiles);
    let k_len = k / splits;
    let c = c.add((split * m * n) as usize);
    let args = GemmArgs { a, w, w_up: core::ptr::null(), c, m, n, k, k_begin: split * k_len, k_len };
    gemm_bf16_tile(&args, tile, dynamic_shared::<SmemChunk>());
}

/// The MLP's first half as one GEMM: `act = bf16(silu(a w_gate^T) * (a w_up^T))` (bf16 `a [m,
/// k]`, `w_gate` and `w_up` `[inter, k]`, bf16 `act [m, inter]`), `ops::gemm`'s
/// `gemm_gate_up_silu_tile`. Launch `abi::gemm_grid(m, 2 inter)` blocks of `abi::GEMM_THREADS`
/// threads with `abi::GEMM_SMEM_BYTES` of shared memory. Traps on a shape outside
/// `abi::gemm_shape_error(m, 2 inter, k)` or a block of another size.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn gemm_gate_up_silu(
    a: *const u16,
    w_gate: *const u16,
    w_up: *const u16,
    act: *mut u16,
    m: u32,
    inter: u32,
    k: u32,
) {
    let n = 2 * inter;
    if block_dim() != GEMM_THREADS || gemm_shape_error(m, n, k).is_some() {
        trap();
    }
    if block_idx() >= gemm_grid(m, n) {
        return;
    }
    let args = GemmArgs { a, w: w_gate, w_up, c: core::ptr::null_mut(), m, n, k, k_begin: 0, k_len: k };
    gemm_gate_up_silu_tile(&args, act, block_idx(), dynamic_shared::<SmemChunk>());
}

/// `x[r] = embed[tokens[r]]` (f32) for `rows` rows of `hidden`. Any grid.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_embed(
    embed: *const u16,
    tokens: *const u32,
    rows: u32,
    hidden: u32,
    x: *mut f32,
) {
    embed_rows(embed, tokens, rows, hidden, x)
}

/// bf16 RMSNorm of `rows` rows of `n` (a multiple of 4), one warp per row:
/// `abi::prefill_warp_grid(rows)` blocks.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_rms_norm(
    x: *const f32,
    weight: *const u16,
    rows: u32,
    n: u32,
    eps: f32,
    out: *mut u16,
) {
    rms_norm_row_bf16(x, weight, rows, n, eps, out)
}

/// `x += deltas[0] + ... + deltas[parts - 1]` then `out = bf16(rms_norm(x) * weight)`, rows
/// of `n` (a multiple of 4), one warp per row: `abi::prefill_warp_grid(rows)` blocks; `parts`
/// 1 ..= 8 (traps otherwise).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_add_rms_norm(
    x: *mut f32,
    deltas: *const f32,
    parts: u32,
    weight: *const u16,
    rows: u32,
    n: u32,
    eps: f32,
    out: *mut u16,
) {
    if parts == 0 || parts as usize > MAX_ADD_PARTS {
        trap();
    }
    add_parts_rms_norm_row_bf16(x, deltas, parts, weight, rows, n, eps, out)
}

/// `x += delta_0 + delta_1 + ...` over `n` elements, `parts` deltas of `n` each back to back
/// (a split-K GEMM's partial products). Any grid.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_add(x: *mut f32, deltas: *const f32, n: u32, parts: u32) {
    add_parts_into(x, deltas, n, parts)
}

// q/k norm + RoPE + K/V append: `abi::prefill_warp_grid(rows * (n_heads + 2 n_kv_heads))`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_qk_rope_hd128(p: PrefillAttentionParams) {
    qk_norm_rope_append::<4>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_qk_rope_hd64(p: PrefillAttentionParams) {
    qk_norm_rope_append::<2>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_qk_rope_hd32(p: PrefillAttentionParams) {
    qk_norm_rope_append::<1>(&p)
}

// Causal attention of the chunk over the cache, on the tensor cores (`ops::flash_attention`):
// `abi::flash_grid(rows, n_heads)` blocks of `PREFILL_THREADS`, `abi::flash_smem_bytes(head_dim)`
// of dynamic shared memory.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_attention_hd128(p: PrefillAttentionParams) {
    attention_entry::<8, 16>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_attention_hd64(p: PrefillAttentionParams) {
    attention_entry::<4, 8>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_attention_hd32(p: PrefillAttentionParams) {
    attention_entry::<2, 4>(&p)
}

/// Traps on a launch the tiling does not fit (another block size, a grid past the tiles), so
/// that a launcher's mistake is an error, not wrong attention.
#[inline(always)]
unsafe fn attention_entry<const KS: usize, const NT: usize>(p: &PrefillAttentionParams) {
    if block_dim() != PREFILL_THREADS || p.head_dim != 16 * KS as u32 {
        trap();
    }
    if block_idx() >= flash_grid(p.rows, p.n_heads) {
        return;
    }
    flash_attention::<KS, NT>(p, dynamic_shared::<SmemChunk>())
}

// ---------------------------------------------------------------- scoring (after the layers)

/// Teacher-forced NLL of rows of logits (`ops::nll`): `nll[r] = logsumexp(logits[r, :]) -
/// logits[r, targets[r]]` for `rows` rows of `vocab` f32 logits (the LM-head GEMM's output when
/// a text is scored through prefill; the host's final norm is `prefill_rms_norm` with the
/// final norm weight). One block of `abi::PREFILL_THREADS` threads per row (`rows` blocks;
/// fewer also work) with `abi::PREFILL_NLL_SMEM_BYTES` of shared memory; traps on another
/// block size, for which that shared memory would be too small.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn prefill_nll(
    logits: *const f32,
    targets: *const u32,
    rows: u32,
    vocab: u32,
    nll: *mut f32,
) {
    if block_dim() != crate::abi::PREFILL_THREADS {
        trap();
    }
    crate::ops::nll::nll_rows(logits, targets, rows, vocab, nll, dynamic_shared::<f32>())
}
