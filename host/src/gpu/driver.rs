//! The few CUDA driver calls cust 0.3.2 does not wrap (or wraps without what we need), made
//! directly through `cust::sys`. Every `unsafe` driver call of the GPU layer lives in this file;
//! each returns `anyhow::Result` with the CUDA error's name and what was being done.

use anyhow::{anyhow, bail, Result};
use cust::sys as cu;
use std::ffi::{c_void, CStr, CString};
use std::ptr;

pub use cu::{CUdevice_attribute, CUresult};

/// Turns a driver result into `Ok(())` or an error naming the CUDA error and `what`.
pub fn check(res: CUresult, what: &str) -> Result<()> {
    if res == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(anyhow!("{what}: {}", describe(res)))
}

/// "CUDA_ERROR_X (code): description", from the driver where it can say, else from cust_raw's
/// enum (the link-time stub driver answers nothing).
pub fn describe(res: CUresult) -> String {
    let code = res as i32;
    let mut name: *const std::os::raw::c_char = ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or leaves `name` alone.
    let named = unsafe { cu::cuGetErrorName(res, &mut name) } == CUresult::CUDA_SUCCESS && !name.is_null();
    let name = if named {
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    } else {
        format!("{res:?}")
    };
    let mut text: *const std::os::raw::c_char = ptr::null();
    // SAFETY: as above.
    let has_text = unsafe { cu::cuGetErrorString(res, &mut text) } == CUresult::CUDA_SUCCESS && !text.is_null();
    if has_text {
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        format!("{name} ({code}): {text}")
    } else {
        format!("{name} ({code})")
    }
}

/// `cuInit(0)`; "no CUDA GPU found" when there is no driver or no device.
pub fn init() -> Result<()> {
    // SAFETY: plain FFI call with a flags value.
    let res = unsafe { cu::cuInit(0) };
    match res {
        CUresult::CUDA_SUCCESS => Ok(()),
        CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_STUB_LIBRARY => {
            bail!(
                "no CUDA GPU found: cuInit failed with {} (is an NVIDIA driver installed and a GPU visible? \
                 on a machine with a driver, make sure the link-time stub libcuda is not on LD_LIBRARY_PATH)",
                describe(res)
            )
        }
        _ => bail!("no CUDA GPU found: cuInit failed with {}", describe(res)),
    }
}

/// The CUDA version the driver supports, e.g. 13000 for 13.0.
pub fn driver_version() -> Result<i32> {
    let mut v = 0;
    check(unsafe { cu::cuDriverGetVersion(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

pub fn device_attribute(dev: cu::CUdevice, attr: CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer.
    check(unsafe { cu::cuDeviceGetAttribute(&mut v, attr, dev) }, &format!("cuDeviceGetAttribute({attr:?})"))?;
    Ok(v)
}

/// Makes `ctx` current on the calling thread (cheap when it already is).
pub fn set_current(ctx: cu::CUcontext) -> Result<()> {
    check(unsafe { cu::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")
}

/// `(free, total)` bytes of device memory of the current context's device.
pub fn memory_info() -> Result<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    check(unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) }, "cuMemGetInfo")?;
    Ok((free, total))
}

/// `cuMemsetD8(ptr, 0, bytes)` (synchronous with respect to the host).
pub fn memset_zero(ptr: cu::CUdeviceptr, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    check(unsafe { cu::cuMemsetD8_v2(ptr, 0, bytes) }, "cuMemsetD8")
}

/// `cuMemsetD8Async(ptr, 0, bytes)` on `stream`: ordered with the stream's kernels.
pub fn memset_zero_async(ptr: cu::CUdeviceptr, bytes: usize, stream: cu::CUstream) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    check(unsafe { cu::cuMemsetD8Async(ptr, 0, bytes, stream) }, "cuMemsetD8Async")
}

/// `cuMemsetD32(ptr, value, words)`.
pub fn memset_u32(ptr: cu::CUdeviceptr, value: u32, words: usize) -> Result<()> {
    if words == 0 {
        return Ok(());
    }
    check(unsafe { cu::cuMemsetD32_v2(ptr, value, words) }, "cuMemsetD32")
}

// ---------------------------------------------------------------- modules and functions

/// A module loaded from PTX; unloaded on drop (the owner keeps its context alive and current).
pub struct RawModule(pub cu::CUmodule);

impl RawModule {
    /// JIT-compiles `ptx` for the current context's device. A failure carries the JIT's
    /// error log (and info log) when the driver wrote one.
    pub fn load_ptx(ptx: &str) -> Result<RawModule> {
        const LOG: usize = 64 * 1024;
        let image = CString::new(ptx).map_err(|_| anyhow!("the PTX contains a NUL byte"))?;
        let mut err_log = vec![0u8; LOG];
        let mut info_log = vec![0u8; LOG];
        let mut opts = [
            cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            cu::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
            cu::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        ];
        // Option values are passed by value where they fit in a pointer (the sizes).
        let mut vals: [*mut c_void; 4] = [
            err_log.as_mut_ptr() as *mut c_void,
            LOG as *mut c_void,
            info_log.as_mut_ptr() as *mut c_void,
            LOG as *mut c_void,
        ];
        let mut module: cu::CUmodule = ptr::null_mut();
        // SAFETY: the image is NUL-terminated, the option arrays have equal length, the log
        // buffers outlive the call and their sizes are given.
        let res = unsafe {
            cu::cuModuleLoadDataEx(
                &mut module,
                image.as_ptr() as *const c_void,
                opts.len() as u32,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            )
        };
        if res != CUresult::CUDA_SUCCESS {
            let text = |b: &[u8]| {
                String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).trim().to_string()
            };
            let (e, i) = (text(&err_log), text(&info_log));
            let mut msg = format!("loading the kernel PTX (JIT for this GPU) failed: {}", describe(res));
            if !e.is_empty() {
                msg.push_str(&format!("\nJIT error log:\n{e}"));
            }
            if !i.is_empty() {
                msg.push_str(&format!("\nJIT info log:\n{i}"));
            }
            bail!(msg);
        }
        Ok(RawModule(module))
    }

    pub fn function(&self, name: &str) -> Result<cu::CUfunction> {
        let cname = CString::new(name).map_err(|_| anyhow!("kernel name {name:?} contains a NUL byte"))?;
        let mut f: cu::CUfunction = ptr::null_mut();
        // SAFETY: valid module handle and NUL-terminated name.
        let res = unsafe { cu::cuModuleGetFunction(&mut f, self.0, cname.as_ptr()) };
        if res == CUresult::CUDA_ERROR_NOT_FOUND {
            bail!("kernel `{name}` is not in the PTX module (is it `#[no_mangle] pub unsafe extern \"ptx-kernel\"`?)");
        }
        check(res, &format!("cuModuleGetFunction({name})"))?;
        Ok(f)
    }
}

impl Drop for RawModule {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the handle came from cuModuleLoadDataEx and is unloaded once.
            unsafe { cu::cuModuleUnload(self.0) };
            self.0 = ptr::null_mut();
        }
    }
}

pub fn func_attribute(f: cu::CUfunction, attr: cu::CUfunction_attribute) -> Result<i32> {
    let mut v = 0;
    check(unsafe { cu::cuFuncGetAttribute(&mut v, attr, f) }, &format!("cuFuncGetAttribute({attr:?})"))?;
    Ok(v)
}

pub fn set_max_dynamic_smem(f: cu::CUfunction, bytes: u32) -> Result<()> {
    let bytes_i = i32::try_from(bytes).map_err(|_| anyhow!("{bytes} bytes of shared memory is too many"))?;
    check(
        unsafe {
            cu::cuFuncSetAttribute(
                f,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes_i,
            )
        },
        &format!("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES = {bytes})"),
    )
}

/// Blocks of `f` that fit on one SM at once with this block size and dynamic shared memory.
pub fn occupancy(f: cu::CUfunction, threads: u32, dynamic_smem: u32) -> Result<u32> {
    let mut n = 0;
    check(
        unsafe { cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, threads as i32, dynamic_smem as usize) },
        &format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({threads} threads, {dynamic_smem} B dynamic smem)"),
    )?;
    Ok(n.max(0) as u32)
}

/// `cuLaunchKernel` of a 1-D grid.
///
/// # Safety
/// `params` must point to one valid argument value per kernel parameter, of the right types.
pub unsafe fn launch(
    f: cu::CUfunction,
    stream: cu::CUstream,
    grid: u32,
    block: u32,
    dynamic_smem: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    let p = if params.is_empty() { ptr::null_mut() } else { params.as_mut_ptr() };
    check(cu::cuLaunchKernel(f, grid, 1, 1, block, 1, 1, dynamic_smem, stream, p, ptr::null_mut()), "cuLaunchKernel")
}

// cuLaunchKernelEx and cuOccupancyMaxActiveClusters (CUDA 12) are newer than cust_raw's
// bindings: their structures as cuda.h lays them out.
#[repr(C)]
#[derive(Clone, Copy)]
struct LaunchAttribute {
    id: u32,
    _pad: u32,
    /// `CUlaunchAttributeValue`, a 64-byte union: the cluster's dimensions or the
    /// cooperative flag in its first words.
    value: [u32; 16],
}

#[repr(C)]
struct LaunchConfig {
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem_bytes: u32,
    stream: cu::CUstream,
    attrs: *mut LaunchAttribute,
    num_attrs: u32,
}

const LAUNCH_ATTRIBUTE_COOPERATIVE: u32 = 2;
const LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: u32 = 4;

extern "C" {
    fn cuLaunchKernelEx(
        config: *const LaunchConfig,
        f: cu::CUfunction,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> CUresult;
    fn cuOccupancyMaxActiveClusters(n: *mut i32, f: cu::CUfunction, config: *const LaunchConfig) -> CUresult;
}

fn cluster_attributes(cluster: u32, cooperative: bool) -> Vec<LaunchAttribute> {
    let mut dims = [0u32; 16];
    dims[..3].copy_from_slice(&[cluster, 1, 1]);
    let mut attrs = vec![LaunchAttribute { id: LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, _pad: 0, value: dims }];
    if cooperative {
        let mut one = [0u32; 16];
        one[0] = 1;
        attrs.push(LaunchAttribute { id: LAUNCH_ATTRIBUTE_COOPERATIVE, _pad: 0, value: one });
    }
    attrs
}

/// Clusters of `cluster` blocks of `f` that can be resident at once (`cuOccupancyMaxActiveClusters`).
pub fn max_active_clusters(f: cu::CUfunction, cluster: u32, block: u32, dynamic_smem: u32) -> Result<u32> {
    let mut attrs = cluster_attributes(cluster, false);
    let config = LaunchConfig {
        grid: [cluster, 1, 1],
        block: [block, 1, 1],
        shared_mem_bytes: dynamic_smem,
        stream: ptr::null_mut(),
        attrs: attrs.as_mut_ptr(),
        num_attrs: attrs.len() as u32,
    };
    let mut n = 0;
    // SAFETY: `config` and its attributes outlive the call; `n` is a valid out-pointer.
    check(unsafe { cuOccupancyMaxActiveClusters(&mut n, f, &config) }, "cuOccupancyMaxActiveClusters")?;
    Ok(n.max(0) as u32)
}

/// `cuLaunchKernelEx` of a 1-D grid in clusters of `cluster` blocks, cooperative (every block
/// resident at once, which the driver then guarantees) or not (for profilers that cannot
/// replay a cooperative cluster launch; residency is then the caller's check).
///
/// # Safety
/// As [`launch`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_clusters(
    f: cu::CUfunction,
    stream: cu::CUstream,
    grid: u32,
    cluster: u32,
    block: u32,
    dynamic_smem: u32,
    cooperative: bool,
    params: &mut [*mut c_void],
) -> Result<()> {
    let mut attrs = cluster_attributes(cluster, cooperative);
    let config = LaunchConfig {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_mem_bytes: dynamic_smem,
        stream,
        attrs: attrs.as_mut_ptr(),
        num_attrs: attrs.len() as u32,
    };
    let p = if params.is_empty() { ptr::null_mut() } else { params.as_mut_ptr() };
    check(cuLaunchKernelEx(&config, f, p, ptr::null_mut()), "cuLaunchKernelEx")
}

/// `cuLaunchCooperativeKernel` of a 1-D grid.
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_cooperative(
    f: cu::CUfunction,
    stream: cu::CUstream,
    grid: u32,
    block: u32,
    dynamic_smem: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    let p = if params.is_empty() { ptr::null_mut() } else { params.as_mut_ptr() };
    check(
        cu::cuLaunchCooperativeKernel(f, grid, 1, 1, block, 1, 1, dynamic_smem, stream, p),
        "cuLaunchCooperativeKernel",
    )
}

/// `Ok(true)` when all work on the stream has finished, `Ok(false)` while some is pending.
pub fn stream_done(stream: cu::CUstream) -> Result<bool> {
    let res = unsafe { cu::cuStreamQuery(stream) };
    if res == CUresult::CUDA_ERROR_NOT_READY {
        return Ok(false);
    }
    check(res, "cuStreamQuery")?;
    Ok(true)
}

pub fn stream_synchronize(stream: cu::CUstream) -> Result<()> {
    check(unsafe { cu::cuStreamSynchronize(stream) }, "cuStreamSynchronize")
}

// ---------------------------------------------------------------- graphs

/// Starts capturing `stream` into a graph. Thread-local mode: other threads' CUDA calls do not
/// disturb the capture; this thread must not call synchronous CUDA APIs until it ends.
pub fn begin_capture(stream: cu::CUstream) -> Result<()> {
    check(
        unsafe { cu::cuStreamBeginCapture_v2(stream, cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) },
        "cuStreamBeginCapture",
    )
}

/// Ends the capture and instantiates the graph: `(graph, executable graph)`.
pub fn end_capture(stream: cu::CUstream) -> Result<(cu::CUgraph, cu::CUgraphExec)> {
    let mut graph: cu::CUgraph = ptr::null_mut();
    check(unsafe { cu::cuStreamEndCapture(stream, &mut graph) }, "cuStreamEndCapture")?;
    if graph.is_null() {
        bail!("cuStreamEndCapture returned no graph (was the capture invalidated?)");
    }
    let mut exec: cu::CUgraphExec = ptr::null_mut();
    let res = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
    if let Err(e) = check(res, "cuGraphInstantiateWithFlags") {
        unsafe { cu::cuGraphDestroy(graph) };
        return Err(e);
    }
    Ok((graph, exec))
}

pub fn graph_launch(exec: cu::CUgraphExec, stream: cu::CUstream) -> Result<()> {
    check(unsafe { cu::cuGraphLaunch(exec, stream) }, "cuGraphLaunch")
}

pub fn graph_destroy(graph: cu::CUgraph, exec: cu::CUgraphExec) {
    // SAFETY: handles from end_capture, destroyed once by CudaGraph's Drop.
    unsafe {
        if !exec.is_null() {
            cu::cuGraphExecDestroy(exec);
        }
        if !graph.is_null() {
            cu::cuGraphDestroy(graph);
        }
    }
}

// ---------------------------------------------------------------- pinned, device-mapped host memory

/// `cuMemHostAlloc(DEVICEMAP | PORTABLE)` of `bytes`, zeroed: `(host pointer, device pointer)`.
pub fn host_alloc_mapped(bytes: usize) -> Result<(*mut c_void, cu::CUdeviceptr)> {
    let mut host: *mut c_void = ptr::null_mut();
    check(
        unsafe { cu::cuMemHostAlloc(&mut host, bytes, cu::CU_MEMHOSTALLOC_DEVICEMAP | cu::CU_MEMHOSTALLOC_PORTABLE) },
        &format!("cuMemHostAlloc({bytes} bytes, DEVICEMAP | PORTABLE)"),
    )?;
    // SAFETY: the driver returned `bytes` writable bytes at `host`.
    unsafe { ptr::write_bytes(host as *mut u8, 0, bytes) };
    let mut dev: cu::CUdeviceptr = 0;
    if let Err(e) = check(unsafe { cu::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }, "cuMemHostGetDevicePointer") {
        host_free(host);
        return Err(e);
    }
    Ok((host, dev))
}

pub fn host_free(host: *mut c_void) {
    if !host.is_null() {
        // SAFETY: `host` came from cuMemHostAlloc and is freed once.
        unsafe { cu::cuMemFreeHost(host) };
    }
}
