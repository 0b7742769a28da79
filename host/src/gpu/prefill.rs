//! Launchers of the prefill kernels besides the GEMM (kernel/src/prefill.rs): ordinary
//! launches of `PREFILL_THREADS` threads on the GPU's stream, returning without waiting.
//! They take raw device addresses, as the engine knows its weights and caches, and so are
//! `unsafe`: the caller vouches that each address holds what the kernel reads or writes.

use super::{kernel_arg as arg, Gpu};
use crate::engine::abi::{
    flash_grid, flash_smem_bytes, prefill_elementwise_grid, prefill_warp_grid, PrefillAttentionParams, PREFILL_THREADS,
};
use anyhow::{ensure, Result};
use std::ffi::c_void;

/// The prefill kernels with a single entry.
pub const PREFILL_KERNELS: [&str; 4] = ["prefill_embed", "prefill_rms_norm", "prefill_add_rms_norm", "prefill_add"];

/// The q/k norm + RoPE entry for `head_dim` (32, 64 or 128).
pub fn qk_rope_kernel_name(head_dim: usize) -> String {
    format!("prefill_qk_rope_hd{head_dim}")
}

/// The prefill attention entry for `head_dim` (32, 64 or 128).
pub fn attention_kernel_name(head_dim: usize) -> String {
    format!("prefill_attention_hd{head_dim}")
}

/// Elements of a launch as the kernels index them (u32).
fn count(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| anyhow::anyhow!("{what}: {n} elements do not fit the kernel's 32-bit indices"))
}

unsafe fn launch(gpu: &Gpu, name: &str, grid: u32, args: &mut [*mut c_void]) -> Result<()> {
    let kernel = gpu.kernel(name)?;
    kernel.launch(gpu.stream(), grid.max(1), PREFILL_THREADS, 0, args)
}

/// `x[r, :] = embed[tokens[r], :]` as f32, `rows` rows of `hidden`.
///
/// # Safety
/// `embed` bf16 `[vocab, hidden]` with every token below vocab, `tokens` u32 `[rows]`, `x` f32
/// `[rows, hidden]`.
pub unsafe fn embed(gpu: &Gpu, embed: u64, tokens: u64, rows: usize, hidden: usize, x: u64) -> Result<()> {
    let n = count(rows * hidden, "prefill_embed")?;
    let (mut e, mut t, mut r, mut h, mut px) = (embed, tokens, rows as u32, hidden as u32, x);
    let mut args = [arg(&mut e), arg(&mut t), arg(&mut r), arg(&mut h), arg(&mut px)];
    launch(gpu, "prefill_embed", prefill_elementwise_grid(n), &mut args)
}

/// `out[r, :] = bf16(rms_norm(x[r, :]) * weight)` for `rows` rows of `n` (a multiple of 4).
///
/// # Safety
/// `x` f32 `[rows, n]` (16-byte aligned), `weight` bf16 `[n]`, `out` bf16 `[rows, n]` (both
/// 8-byte aligned).
pub unsafe fn rms_norm_rows(gpu: &Gpu, x: u64, weight: u64, rows: usize, n: usize, eps: f32, out: u64) -> Result<()> {
    ensure!(n.is_multiple_of(4) && n > 0, "prefill_rms_norm: the row length {n} is not a positive multiple of 4");
    count(rows * n, "prefill_rms_norm")?;
    let (mut px, mut pw, mut r, mut nn, mut e, mut po) = (x, weight, rows as u32, n as u32, eps, out);
    let mut args = [arg(&mut px), arg(&mut pw), arg(&mut r), arg(&mut nn), arg(&mut e), arg(&mut po)];
    launch(gpu, "prefill_rms_norm", prefill_warp_grid(rows as u32), &mut args)
}

/// `x += deltas[0] + deltas[1] + ...` (as [`add`]), then `out[r, :] = bf16(rms_norm(x[r, :]) *
/// weight)` (as [`rms_norm_rows`]), for `rows` rows of `n` (a multiple of 4): a split-K
/// GEMM's residual add and the next norm in one launch.
///
/// # Safety
/// `x` f32 `[rows, n]`, `deltas` f32 `[parts, rows, n]` (both 16-byte aligned), `weight` bf16
/// `[n]`, `out` bf16 `[rows, n]` (8-byte aligned).
#[allow(clippy::too_many_arguments)]
pub unsafe fn add_rms_norm(
    gpu: &Gpu,
    x: u64,
    deltas: u64,
    parts: usize,
    weight: u64,
    rows: usize,
    n: usize,
    eps: f32,
    out: u64,
) -> Result<()> {
    ensure!(n.is_multiple_of(4) && n > 0, "prefill_add_rms_norm: the row length {n} is not a positive multiple of 4");
    ensure!((1..=8).contains(&parts), "prefill_add_rms_norm: {parts} deltas; it adds 1 to 8");
    count(rows * n * parts, "prefill_add_rms_norm")?;
    let (mut px, mut d, mut np, mut pw) = (x, deltas, parts as u32, weight);
    let (mut r, mut nn, mut e, mut po) = (rows as u32, n as u32, eps, out);
    let mut args =
        [arg(&mut px), arg(&mut d), arg(&mut np), arg(&mut pw), arg(&mut r), arg(&mut nn), arg(&mut e), arg(&mut po)];
    launch(gpu, "prefill_add_rms_norm", prefill_warp_grid(rows as u32), &mut args)
}

/// `x += deltas[0] + deltas[1] + ...` over `n` elements, `parts` deltas of `n` back to back
/// (the slices of a split-K GEMM, `gemm_bf16_split_raw`), summed in that order.
///
/// # Safety
/// `x` f32 `[n]`, `deltas` f32 `[parts, n]`.
pub unsafe fn add(gpu: &Gpu, x: u64, deltas: u64, n: usize, parts: usize) -> Result<()> {
    ensure!(parts >= 1, "prefill_add: no deltas to add");
    let n = count(n, "prefill_add")?;
    count(n as usize * parts, "prefill_add's deltas")?;
    let (mut px, mut d, mut nn, mut np) = (x, deltas, n, parts as u32);
    let mut args = [arg(&mut px), arg(&mut d), arg(&mut nn), arg(&mut np)];
    launch(gpu, "prefill_add", prefill_elementwise_grid(n), &mut args)
}

/// Checks what both head kernels rely on: a head_dim they have an entry for, whole GQA
/// groups, and the chunk's positions inside the cache.
fn check_heads(p: &PrefillAttentionParams, what: &str) -> Result<()> {
    ensure!(matches!(p.head_dim, 32 | 64 | 128), "{what}: head_dim {} has no entry (32, 64, 128)", p.head_dim);
    ensure!(
        p.n_kv_heads > 0 && p.n_heads.is_multiple_of(p.n_kv_heads),
        "{what}: {} q heads are not whole groups of {} kv heads",
        p.n_heads,
        p.n_kv_heads
    );
    ensure!(p.rows > 0, "{what}: an empty chunk");
    ensure!(
        p.start_pos as u64 + p.rows as u64 <= p.max_ctx as u64,
        "{what}: positions {}..{} are beyond the KV cache of {} positions",
        p.start_pos,
        p.start_pos as u64 + p.rows as u64,
        p.max_ctx
    );
    let warps = p.rows as u64 * (p.n_heads as u64 + 2 * p.n_kv_heads as u64);
    ensure!(warps * 32 <= u32::MAX as u64, "{what}: {} rows of heads do not fit 32-bit thread indices", p.rows);
    Ok(())
}

/// q/k norm + RoPE of a chunk's q/k/v rows; K and V go into the cache at
/// `start_pos .. start_pos + rows`, q to `p.q` (see `PrefillAttentionParams`).
///
/// # Safety
/// Every address in `p` must hold what `PrefillAttentionParams` says for its shape.
pub unsafe fn qk_rope(gpu: &Gpu, p: &PrefillAttentionParams) -> Result<()> {
    check_heads(p, "prefill q/k norm + RoPE")?;
    let mut params = *p;
    let grid = prefill_warp_grid(p.rows * (p.n_heads + 2 * p.n_kv_heads));
    launch(gpu, &qk_rope_kernel_name(p.head_dim as usize), grid, &mut [arg(&mut params)])
}

/// Causal attention of a chunk's q (`p.q`, bf16) over the cache, into `p.out` (bf16), on the
/// tensor cores.
///
/// # Safety
/// As [`qk_rope`]; the chunk's K and V must be in the cache (its launch enqueued earlier).
pub unsafe fn attention(gpu: &Gpu, p: &PrefillAttentionParams) -> Result<()> {
    check_heads(p, "prefill attention")?;
    let mut params = *p;
    let kernel = gpu.kernel(&attention_kernel_name(p.head_dim as usize))?;
    let smem = flash_smem_bytes(p.head_dim);
    // `allow_attention_smem` opted the kernel in when the module loaded, where the card has it.
    ensure!(
        smem <= gpu.max_shared_per_block_optin(),
        "prefill attention at head_dim {} needs {smem} bytes of shared memory per block; {} allows {}",
        p.head_dim,
        gpu.name(),
        gpu.max_shared_per_block_optin()
    );
    kernel.launch(gpu.stream(), flash_grid(p.rows, p.n_heads), PREFILL_THREADS, smem, &mut [arg(&mut params)])
}

/// Lets the attention entries use the dynamic shared memory they take (above the default 48 KiB
/// at head_dim 128) for the module's lifetime, so that launches need no driver call for it:
/// `Gpu::new` calls it once. Where the card allows less, or the module lacks an entry (another
/// build's PTX through QWEN3_PTX_FILE), nothing is set and [`attention`] says so at its launch.
pub(crate) fn allow_attention_smem(gpu: &Gpu) {
    for head_dim in [128u32, 64, 32] {
        if let Ok(kernel) = gpu.kernel(&attention_kernel_name(head_dim as usize)) {
            let smem = flash_smem_bytes(head_dim);
            if smem <= gpu.max_shared_per_block_optin() {
                let _ = kernel.set_max_dynamic_smem(smem);
            }
        }
    }
}

/// `nll[r] = logsumexp(logits[r, :]) - logits[r, targets[r]]` for `rows` rows of `vocab` f32
/// logits (`prefill_nll`: one block per row).
///
/// # Safety
/// `logits` f32 `[rows, vocab]`, `targets` u32 `[rows]` (each below `vocab`: the kernel writes
/// NaN for one that is not), `nll` f32 `[rows]`.
pub unsafe fn nll(gpu: &Gpu, logits: u64, targets: u64, rows: usize, vocab: usize, nll: u64) -> Result<()> {
    ensure!(rows > 0 && vocab > 0, "prefill_nll: an empty matrix of logits ({rows} x {vocab})");
    // One block per row, in a 1-D grid.
    ensure!(rows <= i32::MAX as usize, "prefill_nll: {rows} rows are more than a 1-D grid has blocks");
    let vocab = count(vocab, "prefill_nll")?;
    let (mut l, mut t, mut r, mut v, mut o) = (logits, targets, rows as u32, vocab, nll);
    let mut args = [arg(&mut l), arg(&mut t), arg(&mut r), arg(&mut v), arg(&mut o)];
    let kernel = gpu.kernel("prefill_nll")?;
    let smem = crate::engine::abi::PREFILL_NLL_SMEM_BYTES;
    kernel.launch(gpu.stream(), rows as u32, PREFILL_THREADS, smem, &mut args)
}
