//! The Qwen3 decode megakernel as PTX, built from `kernel/` by this package's build.rs.

/// PTX text of every kernel in `kernel/`, ready for `cuModuleLoadData`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel.ptx"));

/// The arch the PTX was generated for (`sm_90` unless `QWEN3_SM` chose another).
pub const ARCH: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel.arch"));

/// ptxas's `-v` report on `PTX` when the build assembled it (`PTXAS` set, as in CI), else empty.
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas-report.txt"));
