//! The host's GPU layer: one device, its primary context, the kernel module built from
//! `kernel/` (`qwen3_ptx::PTX`), one stream, and what the engine and the benchmarks need on top
//! of cust 0.3.2: cooperative launches with a co-residency check, CUDA graphs captured from the
//! stream, event timing, and pinned device-mapped host memory ([`HostRing`]).
//!
//! Kernel arguments are passed the way `cuLaunchKernel` takes `kernelParams`: one pointer per
//! kernel parameter, each pointing at that argument's value (a device pointer is a `u64`).
//!
//! All driver calls cust does not wrap are in `driver.rs` (private).

pub mod bandwidth;
pub(crate) mod driver;
pub mod gemm;
pub mod l2_latency;
pub mod prefill;

pub use bandwidth::measure_read_bandwidth;
pub use gemm::{
    check_gemm_shape, gemm_bf16, gemm_bf16_raw, gemm_bf16_split_raw, gemm_gate_up_silu_raw, measure_gemm_rate,
};
pub use l2_latency::{measure_l2_latency, L2Latency};

use anyhow::{anyhow, bail, Context as _, Result};
use cust::context::Context;
use cust::device::Device;
use cust::error::CudaError;
use cust::event::{Event, EventFlags};
use cust::memory::{CopyDestination, DeviceBuffer, DeviceCopy, DeviceSlice};
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

/// One CUDA device with the kernel module loaded and a stream to run it on.
///
/// Safe to create more than once in a process, from any thread: every `Gpu` retains the
/// device's primary context (shared, reference-counted by the driver) and loads its own module.
/// Methods make the context current on the calling thread before they touch the driver.
///
/// Device buffers ([`DeviceBuffer`]) do not borrow the `Gpu`: drop them before it (the primary
/// context goes away with the last `Gpu` of the process, and with it all device memory).
/// One kernel argument as `cuLaunchKernel` takes it: the address of the value.
pub(crate) fn kernel_arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

pub struct Gpu {
    // Fields drop in this order: the module and stream before the context they live in.
    module: driver::RawModule,
    stream: Stream,
    name: String,
    sm_count: u32,
    cc: (u32, u32),
    cooperative: bool,
    max_smem_optin: u32,
    l2_bytes: u32,
    raw_ctx: cu::CUcontext,
    _device: Device,
    _ctx: Context,
}

// SAFETY: the CUDA driver API is thread-safe; every method makes the (primary) context current
// on the calling thread first, and the raw handles are only used through the driver.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Opens device `ordinal`: driver init, primary context, JIT of the kernel PTX, a stream.
    pub fn new(ordinal: u32) -> Result<Gpu> {
        driver::init()?;
        let count = Device::num_devices().map_err(|e| anyhow!("no CUDA GPU found: cuDeviceGetCount failed: {e}"))?;
        if count == 0 {
            bail!("no CUDA GPU found: the driver reports no devices");
        }
        if ordinal >= count {
            bail!("no CUDA GPU found with ordinal {ordinal}: the driver reports {count} device(s)");
        }
        let device = Device::get_device(ordinal).map_err(|e| anyhow!("cuDeviceGet({ordinal}): {e}"))?;
        let name = device.name().map_err(|e| anyhow!("cuDeviceGetName: {e}"))?;
        let ctx = Context::new(device)
            .map_err(|e| anyhow!("retaining the primary context of GPU {ordinal} ({name}): {e}"))?;
        let raw_ctx = ctx.as_raw();
        driver::set_current(raw_ctx)?;

        let dev = device.as_raw();
        let attr = |a| driver::device_attribute(dev, a);
        use cu::CUdevice_attribute as A;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let cooperative = attr(A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? != 0;
        let max_smem_optin = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let l2_bytes = attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u32;

        // PTX for sm_XY only JITs on devices of compute capability X.Y or newer.
        let arch = qwen3_ptx::ARCH.trim();
        if let Some(v) = arch.strip_prefix("sm_").and_then(|v| v.parse::<u32>().ok()) {
            if cc.0 * 10 + cc.1 < v {
                bail!(
                    "the kernels were built for {arch}, but GPU {ordinal} ({name}) is sm_{}{}: \
                     rebuild with QWEN3_SM=sm_{}{}",
                    cc.0,
                    cc.1,
                    cc.0,
                    cc.1
                );
            }
        }
        // Developer knob: QWEN3_PTX_FILE loads another build's PTX (same ABI) into this binary,
        // so two kernels can be compared on one card by one binary.
        let module = match std::env::var_os("QWEN3_PTX_FILE").filter(|f| !f.is_empty()) {
            Some(file) => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("QWEN3_PTX_FILE={}: cannot read it", file.to_string_lossy()))?;
                driver::RawModule::load_ptx(&text)
                    .with_context(|| format!("QWEN3_PTX_FILE={} on GPU {ordinal} ({name})", file.to_string_lossy()))?
            }
            None => driver::RawModule::load_ptx(qwen3_ptx::PTX)
                .with_context(|| format!("on GPU {ordinal} ({name}, sm_{}{}), PTX built for {arch}", cc.0, cc.1))?,
        };
        // A blocking stream (cust never makes non-blocking ones): it orders after cust's
        // synchronous copies and memsets, which run on the legacy default stream.
        let stream = Stream::new(StreamFlags::DEFAULT, None).map_err(|e| anyhow!("cuStreamCreate: {e}"))?;
        let gpu = Gpu {
            module,
            stream,
            name,
            sm_count,
            cc,
            cooperative,
            max_smem_optin,
            l2_bytes,
            raw_ctx,
            _device: device,
            _ctx: ctx,
        };
        prefill::allow_attention_smem(&gpu);
        Ok(gpu)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }
    /// Whether the device supports cooperative launches (every sm_80+ GPU does).
    pub fn supports_cooperative_launch(&self) -> bool {
        self.cooperative
    }
    /// Most shared memory one block may use after opting in (`set_max_dynamic_smem`).
    pub fn max_shared_per_block_optin(&self) -> u32 {
        self.max_smem_optin
    }
    /// The SM clock's peak rate in kHz (cycle counts to time).
    pub fn clock_rate_khz(&self) -> Result<u32> {
        Ok(driver::device_attribute(self._device.as_raw(), cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?
            as u32)
    }

    pub fn l2_cache_bytes(&self) -> u32 {
        self.l2_bytes
    }
    /// The CUDA version of the driver, e.g. 13000 for 13.0.
    pub fn driver_version(&self) -> Result<i32> {
        driver::driver_version()
    }

    /// Makes this GPU's context current on the calling thread (every method does this itself;
    /// call it before using cust APIs directly from another thread).
    pub(crate) fn make_current(&self) -> Result<()> {
        driver::set_current(self.raw_ctx)
    }

    /// `(free, total)` bytes of device memory.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.make_current()?;
        driver::memory_info()
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// A kernel of the module, by its (unmangled) name.
    pub fn kernel(&self, name: &str) -> Result<Kernel<'_>> {
        self.make_current()?;
        let func = self.module.function(name)?;
        Ok(Kernel { gpu: self, func, name: name.to_string(), occupancy: Cell::new(None) })
    }

    fn alloc_uninit<T: DeviceCopy>(&self, n: usize, what: &str) -> Result<DeviceBuffer<T>> {
        self.make_current()?;
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| anyhow!("allocating {n} elements for {what}: size overflows"))?;
        // SAFETY: callers initialise the buffer (zero it or copy into it) before returning it.
        match unsafe { DeviceBuffer::<T>::uninitialized(n) } {
            Ok(b) => Ok(b),
            Err(CudaError::OutOfMemory) => {
                let (free, total) = driver::memory_info().unwrap_or((0, 0));
                bail!(
                    "out of GPU memory allocating {:.1} MiB for {what}: {:.0} MiB free of {:.0} MiB",
                    bytes as f64 / MIB,
                    free as f64 / MIB,
                    total as f64 / MIB
                )
            }
            Err(e) => bail!("allocating {:.1} MiB for {what}: {e} ({e:?})", bytes as f64 / MIB),
        }
    }

    /// A zero-initialised device buffer of `n` elements; `what` names it in errors.
    pub fn alloc<T: DeviceCopy>(&self, n: usize, what: &str) -> Result<DeviceBuffer<T>> {
        let buf = self.alloc_uninit::<T>(n, what)?;
        if n > 0 && std::mem::size_of::<T>() > 0 {
            driver::memset_zero(buf.as_device_ptr().as_raw(), n * std::mem::size_of::<T>())
                .with_context(|| format!("zeroing {what}"))?;
        }
        Ok(buf)
    }

    /// Zeroes `buf` in stream order (after the kernels enqueued before, before those after).
    pub fn zero_async<T: DeviceCopy>(&self, buf: &DeviceSlice<T>) -> Result<()> {
        self.make_current()?;
        driver::memset_zero_async(
            buf.as_device_ptr().as_raw(),
            buf.len() * std::mem::size_of::<T>(),
            self.stream.as_inner(),
        )
    }

    /// A device buffer holding a copy of `data`.
    pub fn upload<T: DeviceCopy>(&self, data: &[T], what: &str) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc_uninit::<T>(data.len(), what)?;
        if !data.is_empty() && std::mem::size_of::<T>() > 0 {
            buf.copy_from(data).map_err(|e| anyhow!("copying {what} to the GPU: {e} ({e:?})"))?;
        }
        Ok(buf)
    }

    /// A copy of a device buffer (or slice of one) in host memory. Waits for the copy, and so
    /// for the stream's earlier work.
    pub fn download<T: DeviceCopy + Default + Clone>(&self, buf: &DeviceSlice<T>) -> Result<Vec<T>> {
        self.make_current()?;
        let mut v = vec![T::default(); buf.len()];
        if !v.is_empty() && std::mem::size_of::<T>() > 0 {
            buf.copy_to(&mut v[..]).map_err(|e| anyhow!("copying {} elements from the GPU: {e} ({e:?})", v.len()))?;
        }
        Ok(v)
    }

    /// Waits for all work on the stream; reports any error a kernel raised.
    pub fn synchronize(&self) -> Result<()> {
        self.make_current()?;
        driver::stream_synchronize(self.stream.as_inner())
    }

    /// `Ok(true)` when all work enqueued on the stream has finished (`cuStreamQuery`), `Ok(false)`
    /// while some is still running; an error a kernel raised shows up here too.
    pub fn stream_done(&self) -> Result<bool> {
        self.make_current()?;
        driver::stream_done(self.stream.as_inner())
    }

    /// As [`synchronize`](Self::synchronize), but gives up after `timeout` with an error (a
    /// grid barrier that deadlocks spins forever). The work keeps running on the GPU; the
    /// process should exit after such an error.
    pub fn synchronize_timeout(&self, timeout: Duration) -> Result<()> {
        self.make_current()?;
        let start = Instant::now();
        loop {
            if driver::stream_done(self.stream.as_inner())? {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("GPU work did not finish within {timeout:?} (a deadlocked grid barrier?)");
            }
            if start.elapsed() > Duration::from_millis(2) {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// GPU time of the work `f` enqueues on the stream, in milliseconds (events recorded
    /// before and after it; waits for the work to finish).
    pub fn time_ms(&self, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        self.make_current()?;
        let start = Event::new(EventFlags::DEFAULT).map_err(|e| anyhow!("cuEventCreate: {e}"))?;
        let end = Event::new(EventFlags::DEFAULT).map_err(|e| anyhow!("cuEventCreate: {e}"))?;
        start.record(&self.stream).map_err(|e| anyhow!("cuEventRecord: {e}"))?;
        f()?;
        end.record(&self.stream).map_err(|e| anyhow!("cuEventRecord: {e}"))?;
        end.synchronize().map_err(|e| anyhow!("waiting for the timed GPU work: {e} ({e:?})"))?;
        end.elapsed_time_f32(&start).map_err(|e| anyhow!("cuEventElapsedTime: {e}"))
    }

    /// Starts recording the stream's work into a graph instead of running it (thread-local
    /// capture: until `end_capture`, this thread must not call synchronous CUDA functions such as
    /// `alloc`, `upload`, `download` or `synchronize`).
    pub fn begin_capture(&self) -> Result<()> {
        self.make_current()?;
        driver::begin_capture(self.stream.as_inner())
    }

    /// Ends the capture started by `begin_capture` and instantiates the graph.
    pub fn end_capture(&self) -> Result<CudaGraph> {
        self.make_current()?;
        let (graph, exec) = driver::end_capture(self.stream.as_inner())?;
        Ok(CudaGraph { graph, exec })
    }

    /// A [`HostRing`] of `n_u32` words (makes the context current first).
    pub fn host_ring(&self, n_u32: usize) -> Result<HostRing> {
        self.make_current()?;
        HostRing::new(n_u32)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // The module and the stream are destroyed in the primary context: make it current.
        let _ = driver::set_current(self.raw_ctx);
    }
}

/// A kernel of the module, ready to launch.
pub struct Kernel<'a> {
    gpu: &'a Gpu,
    func: cu::CUfunction,
    name: String,
    /// The last occupancy query, `(threads, dynamic smem, blocks per SM)`, so that repeated
    /// launches with the same shape do not ask the driver again.
    occupancy: Cell<Option<(u32, u32, u32)>>,
}

impl Kernel<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers per thread the JIT assigned.
    pub fn registers(&self) -> Result<u32> {
        self.gpu.make_current()?;
        Ok(driver::func_attribute(self.func, cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)? as u32)
    }

    /// Allows launches with up to `bytes` of dynamic shared memory (above 48 KiB needs this).
    pub fn set_max_dynamic_smem(&self, bytes: u32) -> Result<()> {
        self.gpu.make_current()?;
        if bytes > self.gpu.max_smem_optin {
            bail!(
                "kernel {} asks for {bytes} bytes of dynamic shared memory; {} allows at most {} per block",
                self.name,
                self.gpu.name,
                self.gpu.max_smem_optin
            );
        }
        self.occupancy.set(None);
        driver::set_max_dynamic_smem(self.func, bytes).with_context(|| format!("kernel {}", self.name))
    }

    /// How many blocks of this kernel fit on one SM at once (the occupancy API).
    pub fn max_blocks_per_sm(&self, threads: u32, dynamic_smem: u32) -> Result<u32> {
        if let Some((t, s, n)) = self.occupancy.get() {
            if (t, s) == (threads, dynamic_smem) {
                return Ok(n);
            }
        }
        self.gpu.make_current()?;
        let n = driver::occupancy(self.func, threads, dynamic_smem).with_context(|| format!("kernel {}", self.name))?;
        self.occupancy.set(Some((threads, dynamic_smem, n)));
        Ok(n)
    }

    fn require_cooperative(&self) -> Result<()> {
        if !self.gpu.cooperative {
            bail!("{} does not support cooperative launches", self.gpu.name);
        }
        Ok(())
    }

    /// The grid of a cooperative launch with `blocks_per_sm` blocks on every SM:
    /// `sm_count * blocks_per_sm`, or an error if that many cannot be co-resident.
    pub fn cooperative_grid(&self, threads: u32, dynamic_smem: u32, blocks_per_sm: u32) -> Result<u32> {
        self.require_cooperative()?;
        if blocks_per_sm == 0 {
            bail!("cooperative_grid: blocks_per_sm must be at least 1");
        }
        let fit = self.max_blocks_per_sm(threads, dynamic_smem)?;
        if fit < blocks_per_sm {
            let regs = self.registers().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
            bail!(
                "grid cannot be co-resident: kernel {} with {threads} threads per block, {dynamic_smem} bytes of \
                 dynamic shared memory and {regs} registers per thread fits {fit} block(s) per SM on {}, \
                 {blocks_per_sm} requested",
                self.name,
                self.gpu.name
            );
        }
        Ok(self.gpu.sm_count * blocks_per_sm)
    }

    /// Cooperative launch (`cuLaunchCooperativeKernel`): all `grid` blocks run at once, so grid
    /// barriers are safe. Checks first that `grid` blocks can be co-resident.
    ///
    /// # Safety
    /// `args` must hold one pointer per kernel parameter, each to a value of that parameter's
    /// type, and every pointer the kernel dereferences must be valid for its accesses.
    pub unsafe fn launch_cooperative(
        &self,
        stream: &Stream,
        grid: u32,
        block: u32,
        dynamic_smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.require_cooperative()?;
        let fit = self.max_blocks_per_sm(block, dynamic_smem)?;
        let max = fit * self.gpu.sm_count;
        if grid == 0 || grid > max {
            bail!(
                "cooperative launch of {} with {grid} blocks of {block} threads ({dynamic_smem} bytes of dynamic \
                 shared memory): at most {max} blocks can be co-resident ({fit} per SM x {} SMs)",
                self.name,
                self.gpu.sm_count
            );
        }
        self.gpu.make_current()?;
        driver::launch_cooperative(self.func, stream.as_inner(), grid, block, dynamic_smem, args).with_context(|| {
            format!("kernel {} (grid {grid}, block {block}, {dynamic_smem} B dynamic smem)", self.name)
        })
    }

    /// Launch of `grid` blocks in thread-block clusters of `cluster` (sm_90+), after checking
    /// with the driver that all of them can be resident at once; cooperative unless
    /// `cooperative` is false (ncu cannot profile a cooperative cluster launch: the check
    /// above is then all that stands for the guarantee).
    ///
    /// # Safety
    /// As [`launch_cooperative`](Self::launch_cooperative).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_clusters(
        &self,
        stream: &Stream,
        grid: u32,
        cluster: u32,
        block: u32,
        dynamic_smem: u32,
        cooperative: bool,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        if cooperative {
            self.require_cooperative()?;
        }
        let fit = self.max_active_clusters(cluster, block, dynamic_smem)?;
        if grid == 0 || !grid.is_multiple_of(cluster) || grid / cluster > fit {
            bail!(
                "launch of {} with {grid} blocks in clusters of {cluster} ({block} threads, {dynamic_smem} bytes of \
                 dynamic shared memory): {} holds at most {fit} such clusters at once",
                self.name,
                self.gpu.name
            );
        }
        self.gpu.make_current()?;
        driver::launch_clusters(self.func, stream.as_inner(), grid, cluster, block, dynamic_smem, cooperative, args)
            .with_context(|| format!("kernel {} (grid {grid} in clusters of {cluster}, block {block})", self.name))
    }

    /// Clusters of `cluster` blocks of this kernel that fit on the GPU at once.
    pub fn max_active_clusters(&self, cluster: u32, block: u32, dynamic_smem: u32) -> Result<u32> {
        self.gpu.make_current()?;
        driver::max_active_clusters(self.func, cluster, block, dynamic_smem)
            .with_context(|| format!("kernel {}", self.name))
    }

    /// Ordinary launch (`cuLaunchKernel`) of a 1-D grid.
    ///
    /// # Safety
    /// As [`launch_cooperative`](Self::launch_cooperative).
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        grid: u32,
        block: u32,
        dynamic_smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.gpu.make_current()?;
        driver::launch(self.func, stream.as_inner(), grid, block, dynamic_smem, args).with_context(|| {
            format!("kernel {} (grid {grid}, block {block}, {dynamic_smem} B dynamic smem)", self.name)
        })
    }
}

/// An instantiated CUDA graph, captured from the stream (`Gpu::begin_capture` /
/// `Gpu::end_capture`). Destroyed on drop.
pub struct CudaGraph {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
}

impl CudaGraph {
    /// Enqueues one run of the whole graph on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<()> {
        driver::graph_launch(self.exec, stream.as_inner())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        driver::graph_destroy(self.graph, self.exec);
    }
}

/// Pinned host memory the GPU can address directly (`cuMemHostAlloc` with `DEVICEMAP |
/// PORTABLE`): `n` u32 words, zeroed. A running kernel streams results into it (system-scope
/// release stores, `device::st_release_sys`) and reads flags the host writes (system-scope
/// acquire loads) — for tokens out and a cancel flag in. Freed on drop.
///
/// Needs a current CUDA context to create (see [`Gpu::host_ring`]).
pub struct HostRing {
    host: *mut u32,
    dev: u64,
    n: usize,
}

// SAFETY: the memory is plain pinned host memory, accessed only with volatile word accesses.
unsafe impl Send for HostRing {}
unsafe impl Sync for HostRing {}

impl HostRing {
    pub fn new(n_u32: usize) -> Result<HostRing> {
        if n_u32 == 0 {
            bail!("HostRing::new: at least one word is needed");
        }
        let (host, dev) = driver::host_alloc_mapped(n_u32 * 4)?;
        Ok(HostRing { host: host as *mut u32, dev, n: n_u32 })
    }

    /// The address a kernel uses for word 0.
    pub fn device_ptr(&self) -> u64 {
        self.dev
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Word `i`, as the GPU last wrote it (a volatile read followed by an acquire fence).
    pub fn read(&self, i: usize) -> u32 {
        assert!(i < self.n, "HostRing::read({i}) out of {} words", self.n);
        // SAFETY: in bounds of the allocation; volatile because the GPU writes it concurrently.
        let v = unsafe { std::ptr::read_volatile(self.host.add(i)) };
        fence(Ordering::Acquire);
        v
    }

    /// Sets word `i` (a release fence, then a volatile write), for the GPU to read.
    pub fn write(&self, i: usize, v: u32) {
        assert!(i < self.n, "HostRing::write({i}) out of {} words", self.n);
        fence(Ordering::Release);
        // SAFETY: in bounds; volatile because the GPU reads it concurrently.
        unsafe { std::ptr::write_volatile(self.host.add(i), v) };
    }

    /// Zeroes every word.
    pub fn clear(&self) {
        for i in 0..self.n {
            self.write(i, 0);
        }
    }
}

impl Drop for HostRing {
    fn drop(&mut self) {
        driver::host_free(self.host as *mut c_void);
    }
}
