//! The embedded PTX, checked without a GPU: every kernel the host looks up is in it, and it calls
//! nothing outside itself (the driver has no libm or libdevice to resolve `.extern .func`).

const ENTRIES: &[&str] = &[
    // kernel/src/probes.rs: sync-bench, bandwidth, and the device-module checks
    "probe_barrier_visibility",
    "probe_split_barrier_visibility",
    "probe_grid_syncs",
    "probe_empty",
    "probe_read_bandwidth",
    "test_warp_reduce",
    "test_block_sum",
    "test_vector_loads",
    "test_bf16",
    "test_math",
    "test_host_ring",
    // kernel/src/decode.rs: one decode entry per supported head_dim (host::engine::decode_kernel_name)
    "qwen3_decode_hd128",
    "qwen3_decode_hd64",
    "qwen3_decode_hd32",
];

fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix(".visible .entry ").or_else(|| l.trim().strip_prefix(".entry "))?;
            Some(rest.split('(').next().unwrap().trim().to_string())
        })
        .collect()
}

#[test]
fn ptx_has_every_expected_entry() {
    let found = entries(qwen3_ptx::PTX);
    for e in ENTRIES {
        assert!(found.iter().any(|f| f == e), "kernel `{e}` is missing from the PTX; it has: {found:?}");
    }
}

#[test]
fn ptx_calls_no_external_functions() {
    let externs: Vec<&str> = qwen3_ptx::PTX.lines().filter(|l| l.contains(".extern .func")).collect();
    assert!(externs.is_empty(), "the PTX declares external functions: {externs:?}");
}

#[test]
fn ptx_targets_the_recorded_arch() {
    let arch = qwen3_ptx::ARCH.trim();
    assert!(arch.starts_with("sm_"), "ARCH = {arch:?}");
    let target =
        qwen3_ptx::PTX.lines().find_map(|l| l.trim().strip_prefix(".target ")).expect("the PTX has no .target line");
    assert!(target.split(',').next().unwrap().trim() == arch, ".target {target} but ARCH = {arch}");
    assert!(qwen3_ptx::PTX.lines().any(|l| l.trim().starts_with(".version ")), "no .version line");
    assert!(!qwen3_ptx::PTX.contains('\0'), "the PTX contains a NUL byte (cuModuleLoadData needs a C string)");
}
