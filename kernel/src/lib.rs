//! Qwen3-0.6B decode megakernel, written in Rust for `nvptx64-nvidia-cuda`.
//!
//! `device` is the small runtime every kernel builds on (the role `cuda_std` plays in
//! Rust-CUDA): indices, shared memory, warp shuffles, vector loads, GPU-scope atomics and
//! the grid-wide barrier. All inline assembly lives there.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, core_intrinsics, gpu_intrinsics)]
#![feature(gpu_launch_sized_workgroup_mem, link_llvm_intrinsics)]
#![allow(internal_features)]

pub mod abi;
pub mod decode;
pub mod device;
pub mod op_tests;
pub mod ops;
pub mod prefill;
pub mod probes;
pub mod schedule;
#[cfg(target_feature = "sm_90")]
pub mod stream;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // `-Cpanic=immediate-abort` keeps panics out of codegen; this only satisfies no_std.
    unsafe { core::arch::nvptx::trap() }
}
