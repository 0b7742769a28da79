//! The GPU's achievable read bandwidth, measured with the kernel's own 128-bit loads
//! (`probe_read_bandwidth`): the yardstick every speed figure of the bench is reported against.

use super::{driver, kernel_arg, Gpu};
use crate::stats::median;
use anyhow::{bail, Result};

/// Bytes per second `probe_read_bandwidth` reads from a buffer of `bytes` (at least 1 GiB is
/// sensible: well past the L2) filled with non-zero data. Two warm-up runs, then the median
/// of seven timed runs.
pub fn measure_read_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let n_vec4 = bytes / 16;
    if n_vec4 == 0 {
        bail!("measure_read_bandwidth: {bytes} bytes is too small");
    }
    let buf = gpu.alloc::<u32>(n_vec4 * 4, "the read-bandwidth probe buffer")?;
    // Non-zero data: a page of zeros could in principle be served by compression.
    driver::memset_u32(buf.as_device_ptr().as_raw(), 0x3f80_1234, n_vec4 * 4)?;
    let out = gpu.alloc::<u32>(1, "the read-bandwidth probe result")?;
    let kernel = gpu.kernel("probe_read_bandwidth")?;
    let threads = 256;
    let per_sm = kernel.max_blocks_per_sm(threads, 0)?.clamp(1, 8);
    let grid = gpu.sm_count() * per_sm;

    let mut src = buf.as_device_ptr().as_raw();
    let mut n = n_vec4 as u64;
    let mut dst = out.as_device_ptr().as_raw();
    let mut run = || -> Result<()> {
        let mut args = [kernel_arg(&mut src), kernel_arg(&mut n), kernel_arg(&mut dst)];
        // SAFETY: the arguments match probe_read_bandwidth(src: *const u32, n_vec4: u64,
        // out: *mut u32), and the buffers hold n_vec4 * 16 and 4 bytes.
        unsafe { kernel.launch(gpu.stream(), grid, threads, 0, &mut args) }
    };
    for _ in 0..2 {
        run()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..7 {
        times.push(gpu.time_ms(&mut run)? as f64);
    }
    let ms = median(&mut times);
    if ms <= 0.0 {
        bail!("measure_read_bandwidth: the probe took no measurable time");
    }
    Ok((n_vec4 * 16) as f64 / (ms * 1e-3))
}
