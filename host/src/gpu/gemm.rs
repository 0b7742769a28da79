//! The tensor-core GEMM (kernel/src/ops/gemm.rs) from the host: `C = A W^T` with bf16 A
//! `[m, k]` (activations) and W `[n, k]` (a weight matrix, `[out, in]`), f32 C `[m, n]`. The
//! shape contract lives in the shared ABI (`abi::gemm_shape_error`); shapes outside it are
//! refused here, before anything reaches the GPU.

use super::{kernel_arg, Gpu};
use crate::engine::abi::{gemm_grid, gemm_shape_error, gemm_split_error, GEMM_SMEM_BYTES, GEMM_THREADS};
use anyhow::{bail, Context, Result};
use cust::memory::{DeviceCopy, DeviceSlice};

/// `Ok` when the GEMM can compute `C[m, n] = A[m, k] W[n, k]^T`: m >= 1, n a multiple of 64,
/// k a multiple of 32 (`abi::gemm_shape_error`).
pub fn check_gemm_shape(m: usize, n: usize, k: usize) -> Result<()> {
    let what = || format!("gemm C[{m}, {n}] = A[{m}, {k}] x W[{n}, {k}]^T");
    let (Ok(m32), Ok(n32), Ok(k32)) = (u32::try_from(m), u32::try_from(n), u32::try_from(k)) else {
        bail!("{}: a dimension does not fit in 32 bits", what());
    };
    if let Some(why) = gemm_shape_error(m32, n32, k32) {
        bail!("{}: {why}", what());
    }
    Ok(())
}

fn check_buffer<T: DeviceCopy>(buf: &DeviceSlice<T>, elements: usize, name: &str) -> Result<u64> {
    if buf.len() < elements {
        bail!("gemm: {name} holds {} elements, the shape needs {elements}", buf.len());
    }
    let ptr = buf.as_device_ptr().as_raw();
    // cp.async copies 16-byte chunks, and the kernel stores C in 8-byte pairs.
    if !ptr.is_multiple_of(16) {
        bail!("gemm: {name} at {ptr:#x} is not 16-byte aligned");
    }
    Ok(ptr)
}

/// Enqueues `c = a w^T` on the GPU's stream and returns without waiting (errors of the kernel
/// itself show at the next synchronisation). `a` holds bf16 bits `[m, k]`, `w` bf16 bits
/// `[n, k]`, `c` f32 `[m, n]`, all row-major. Refuses a shape or buffer the kernel cannot take.
pub fn gemm_bf16(
    gpu: &Gpu,
    a: &DeviceSlice<u16>,
    w: &DeviceSlice<u16>,
    c: &mut DeviceSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    check_gemm_shape(m, n, k)?;
    let pa = check_buffer(a, m * k, "A")?;
    let pw = check_buffer(w, n * k, "W")?;
    let pc = check_buffer(c, m * n, "C")?;
    // SAFETY: the buffers were just checked to hold the shape and to be 16-byte aligned.
    unsafe { gemm_bf16_raw(gpu, pa, pw, pc, m, n, k) }
}

/// [`gemm_bf16`] on raw device addresses (the engine's weights are known by address only):
/// checks the shape and the alignment, not what the addresses hold.
///
/// # Safety
/// `a`, `w` and `c` must be device allocations of at least `m * k` bf16, `n * k` bf16 and
/// `m * n` f32, live until the kernel has run.
pub unsafe fn gemm_bf16_raw(gpu: &Gpu, a: u64, w: u64, c: u64, m: usize, n: usize, k: usize) -> Result<()> {
    gemm_bf16_split_raw(gpu, a, w, c, m, n, k, 1)
}

/// The MLP's gate and up projections and SiLU(gate) * up in one GEMM (`gemm_gate_up_silu`):
/// `act = bf16(silu(a w_gate^T) * (a w_up^T))`, bf16 `a [m, k]`, `w_gate`, `w_up` `[inter, k]`,
/// bf16 `act [m, inter]`. The shape contract is the GEMM's for N = 2 inter.
///
/// # Safety
/// The addresses must be device allocations of those sizes, 16-byte aligned, live until the
/// kernel has run.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_gate_up_silu_raw(
    gpu: &Gpu,
    a: u64,
    w_gate: u64,
    w_up: u64,
    act: u64,
    m: usize,
    inter: usize,
    k: usize,
) -> Result<()> {
    check_gemm_shape(m, 2 * inter, k).context("the fused gate/up GEMM")?;
    check_mma(gpu)?;
    for (name, ptr) in [("A", a), ("W_gate", w_gate), ("W_up", w_up), ("act", act)] {
        if !ptr.is_multiple_of(16) {
            bail!("gemm_gate_up_silu: {name} at {ptr:#x} is not 16-byte aligned");
        }
    }
    let (mut pa, mut pg, mut pu, mut pc) = (a, w_gate, w_up, act);
    let (mut m32, mut i32_, mut k32) = (m as u32, inter as u32, k as u32);
    let mut args = [
        kernel_arg(&mut pa),
        kernel_arg(&mut pg),
        kernel_arg(&mut pu),
        kernel_arg(&mut pc),
        kernel_arg(&mut m32),
        kernel_arg(&mut i32_),
        kernel_arg(&mut k32),
    ];
    let kernel = gpu.kernel("gemm_gate_up_silu")?;
    // SAFETY: the arguments match gemm_gate_up_silu(a, w_gate, w_up: *const u16, act: *mut u16,
    // m, inter, k: u32); the shape is one the kernel takes; the caller vouches for the buffers.
    unsafe { kernel.launch(gpu.stream(), gemm_grid(m32, 2 * i32_), GEMM_THREADS, GEMM_SMEM_BYTES, &mut args) }
}

/// `mma.sync` with bf16 needs sm_80.
fn check_mma(gpu: &Gpu) -> Result<()> {
    if gpu.compute_capability() < (8, 0) {
        bail!(
            "gemm: mma.sync with bf16 needs compute capability 8.0 or newer, {} is {:?}",
            gpu.name(),
            gpu.compute_capability()
        );
    }
    Ok(())
}

/// [`gemm_bf16_raw`] with K cut into `splits` equal parts, each part's product written to its
/// own `[m, n]` slice of `c` (`c + s m n`, f32): the slices sum to `a w^T`. More blocks for a
/// shape with few tiles of C (small M, or N = hidden), for the caller to add up.
///
/// # Safety
/// As [`gemm_bf16_raw`], with `c` holding `splits * m * n` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_split_raw(
    gpu: &Gpu,
    a: u64,
    w: u64,
    c: u64,
    m: usize,
    n: usize,
    k: usize,
    splits: usize,
) -> Result<()> {
    check_gemm_shape(m, n, k)?;
    let splits32 = u32::try_from(splits).unwrap_or(0);
    if let Some(why) = gemm_split_error(m as u32, n as u32, k as u32, splits32) {
        bail!("gemm C[{m}, {n}] = A[{m}, {k}] x W[{n}, {k}]^T in {splits} splits of K: {why}");
    }
    check_mma(gpu)?;
    for (name, ptr) in [("A", a), ("W", w), ("C", c)] {
        // cp.async copies 16-byte chunks, and the kernel stores C in 8-byte pairs.
        if !ptr.is_multiple_of(16) {
            bail!("gemm: {name} at {ptr:#x} is not 16-byte aligned");
        }
    }
    let (mut pa, mut pw, mut pc) = (a, w, c);
    let (mut m32, mut n32, mut k32, mut s32) = (m as u32, n as u32, k as u32, splits32);
    let mut args = [
        kernel_arg(&mut pa),
        kernel_arg(&mut pw),
        kernel_arg(&mut pc),
        kernel_arg(&mut m32),
        kernel_arg(&mut n32),
        kernel_arg(&mut k32),
        kernel_arg(&mut s32),
    ];
    let kernel = gpu.kernel("gemm_bf16")?;
    let grid = gemm_grid(m32, n32) * s32;
    // SAFETY: the arguments match the kernel gemm_bf16(a: *const u16, w: *const u16, c: *mut f32,
    // m: u32, n: u32, k: u32, splits: u32); the shape is one the kernel takes, and the caller
    // vouches for the buffers.
    unsafe { kernel.launch(gpu.stream(), grid, GEMM_THREADS, GEMM_SMEM_BYTES, &mut args) }
}

/// The matrix rate the GEMM itself reaches, in FLOP/s: `gemm_bf16` at M = N = K = `size`
/// (4096 is what `bench --prefill` reports against) on random bf16 data in [-1, 1] (constant
/// or zero data can draw less power, so clock higher, than real activations). One warm-up
/// launch, then the median of seven timings of three back-to-back launches each, 2 M N K FLOP
/// per launch.
pub fn measure_gemm_rate(gpu: &Gpu, size: usize) -> Result<f64> {
    check_gemm_shape(size, size, size).context("measure_gemm_rate")?;
    let n = size * size;
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = || -> Vec<u16> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                half::bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0).to_bits()
            })
            .collect()
    };
    let a = gpu.upload(&random(), "GEMM probe A")?;
    let w = gpu.upload(&random(), "GEMM probe W")?;
    let mut c = gpu.alloc::<f32>(n, "GEMM probe C")?;
    gemm_bf16(gpu, &a, &w, &mut c, size, size, size)?;
    gpu.synchronize().context("measure_gemm_rate: the warm-up launch")?;
    const LAUNCHES: usize = 3;
    let mut times = Vec::new();
    for _ in 0..7 {
        let ms = gpu.time_ms(|| {
            for _ in 0..LAUNCHES {
                gemm_bf16(gpu, &a, &w, &mut c, size, size, size)?;
            }
            Ok(())
        })?;
        times.push(ms as f64 / LAUNCHES as f64);
    }
    let ms = crate::stats::median(&mut times);
    if ms <= 0.0 {
        bail!("measure_gemm_rate: the GEMM took no measurable time");
    }
    Ok(2.0 * (size as f64).powi(3) / (ms * 1e-3))
}
