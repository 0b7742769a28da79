//! Compiles `kernel/` to one PTX file that the host embeds (the role `cuda_builder` plays in
//! Rust-CUDA), using rustc's own NVPTX backend.
//!
//! The nvptx target links with `llvm-bitcode-linker`, which rustup does not ship. This build
//! script is its own replacement: rustc is told to use the compiled build script itself as the
//! linker (flavor `llbc`), and when it runs with `QWEN3_PTX_LINK_MODE` set it links the way that
//! tool would, with the toolchain's llvm-tools:
//!
//!   llvm-link --ignore-non-bitcode  ->  opt (internalize all but the kernels, O3, globaldce)  ->  llc
//!
//! Environment:
//! - `QWEN3_SM` picks the target arch: `sm_90` (default), `sm_89`, `sm_80`, ...
//! - `PTXAS` names a ptxas binary: the PTX is then assembled for that arch and the build fails
//!   on any error, and the resource report (registers, spills) lands next to the PTX.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const LINK_MODE: &str = "QWEN3_PTX_LINK_MODE";

fn main() {
    if env::var_os(LINK_MODE).is_some() {
        if let Err(e) = link(env::args_os().skip(1).collect()) {
            eprintln!("qwen3 ptx linker: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = build_kernel() {
        panic!("building the PTX kernel failed:\n{e}");
    }
}

fn build_kernel() -> Result<(), String> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernel_dir = root.join("kernel");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let sm = env::var("QWEN3_SM").unwrap_or_else(|_| "sm_90".to_string());
    if !sm.starts_with("sm_") || sm[3..].parse::<u32>().map_or(true, |v| v < 70) {
        return Err(format!("QWEN3_SM={sm}: expected sm_70 or newer, e.g. sm_90"));
    }

    println!("cargo:rerun-if-changed=kernel/src");
    println!("cargo:rerun-if-changed=kernel/Cargo.toml");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=QWEN3_SM");
    println!("cargo:rerun-if-env-changed=PTXAS");

    // LLVM's default PTX ISA version for an arch is older than the instructions we use:
    // 7.8 for sm_80/sm_89 (L1::no_allocate, ...), 8.1 for sm_90 (`st.async`, the streaming
    // step's hand-offs inside a cluster).
    let ptx_isa = if sm[3..].parse::<u32>().unwrap() < 90 { "+ptx78" } else { "+ptx81" };
    let features = format!(" -C target-feature={ptx_isa}");
    let rustflags = format!(
        "-C target-cpu={sm}{features} -C linker-flavor=llbc -C linker={} -Zunstable-options -Cpanic=immediate-abort",
        env::current_exe().unwrap().display()
    );
    // One target folder per arch: switching QWEN3_SM never reuses a stale link.
    let target_dir = out_dir.join(format!("kernel-target-{sm}"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&kernel_dir)
        .args(["build", "--release", "--target", "nvptx64-nvidia-cuda", "-Zbuild-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", &rustflags)
        .env(LINK_MODE, &sm)
        .env("QWEN3_PTX_MATTR", ptx_isa)
        .env("QWEN3_PTX_TOOLS", llvm_tools_dir()?);
    // Nothing of the outer (host) build may leak into the device build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo for the kernel: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build of kernel/ for nvptx64-nvidia-cuda failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let built = target_dir.join("nvptx64-nvidia-cuda/release/qwen3_kernel.ptx");
    let ptx = fs::read_to_string(&built).map_err(|e| format!("reading {}: {e}", built.display()))?;
    check_ptx(&ptx)?;
    let ptx = add_launch_bounds(&ptx);
    let dest = out_dir.join("kernel.ptx");
    fs::write(&dest, &ptx).map_err(|e| format!("writing {}: {e}", dest.display()))?;
    fs::write(out_dir.join("kernel.arch"), &sm).unwrap();

    // The report is embedded too (empty without PTXAS), so a test can hold the kernels to a
    // spill budget.
    let mut report = String::new();
    if let Some(ptxas) = env::var_os("PTXAS").filter(|p| !p.is_empty()) {
        report = assemble(Path::new(&ptxas), &dest, &sm, &out_dir)?;
        for line in report.lines().filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill")) {
            println!("cargo:warning=ptxas: {line}");
        }
    }
    fs::write(out_dir.join("ptxas-report.txt"), &report).unwrap();
    Ok(())
}

/// A PTX module must not call anything outside itself: the driver has no libm or libdevice.
fn check_ptx(ptx: &str) -> Result<(), String> {
    let externs: Vec<&str> = ptx.lines().filter(|l| l.contains(".extern .func")).collect();
    if !externs.is_empty() {
        return Err(format!(
            "the PTX calls functions that do not exist on the device (use the device module's \
             replacements, e.g. device::exp instead of expf):\n{}",
            externs.join("\n")
        ));
    }
    if !ptx.contains(".entry") {
        return Err("the PTX has no kernel entry points".into());
    }
    Ok(())
}

/// Every kernel in kernel/ runs with at most `MAX_THREADS` threads per block. Rust has no
/// `__launch_bounds__`, so the bound is written into the PTX (`.maxntid`) after each entry's
/// parameter list: ptxas then keeps each kernel within 65536 / bound registers per thread, so
/// that a block of that size can always launch. Kernels listed in `LAUNCH_BOUNDS` get their own
/// bound (the decode kernel: its block size, `abi::DECODE_THREADS`, so it may use more
/// registers per thread).
const MAX_THREADS: u32 = 512;
/// Entries are name prefixes (`qwen3_decode` covers every `qwen3_decode_hd*`); the split
/// kernels (`qwen3_phase_hd*`) run with the decode kernel's block size.
/// Prefill attention runs 128 threads a block (`abi::PREFILL_THREADS`) and holds a 16 x head_dim
/// f32 output tile per warp in registers: at the default bound's 128 registers it spills.
/// The streaming step runs 288 (eight consumer warps and the loader, `abi::STREAM_THREADS`).
const LAUNCH_BOUNDS: &[(&str, u32)] =
    &[("qwen3_decode", 384), ("qwen3_phase", 384), ("prefill_attention", 128), ("qwen3_stream", 288)];

fn add_launch_bounds(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len() + 1024);
    let mut bound = None;
    for line in ptx.lines() {
        if line.starts_with(".visible .entry") || line.starts_with(".entry") {
            let name = line.split_whitespace().find_map(|w| w.strip_suffix('(')).unwrap_or("");
            bound = Some(LAUNCH_BOUNDS.iter().find(|(n, _)| name.starts_with(n)).map_or(MAX_THREADS, |(_, b)| *b));
        }
        if let (Some(b), "{") = (bound, line.trim()) {
            out.push_str(&format!(".maxntid {b}, 1, 1\n"));
            bound = None;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn assemble(ptxas: &Path, ptx: &Path, sm: &str, out_dir: &Path) -> Result<String, String> {
    let out = Command::new(ptxas)
        .arg(format!("-arch={sm}"))
        .args(["-v", "-O3", "-o"])
        .arg(out_dir.join("kernel.cubin"))
        .arg(ptx)
        .output()
        .map_err(|e| format!("cannot run ptxas at {}: {e}", ptxas.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("ptxas rejected the PTX:\n{text}"));
    }
    Ok(text)
}

/// The toolchain's llvm-tools (`rustup component add llvm-tools`), next to its rustc.
fn llvm_tools_dir() -> Result<PathBuf, String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out =
        Command::new(&rustc).args(["--print", "sysroot"]).output().map_err(|e| format!("cannot run {rustc}: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let host = env::var("HOST").unwrap();
    let dir = sysroot.join("lib/rustlib").join(host).join("bin");
    if !dir.join("llvm-link").exists() {
        return Err(format!(
            "llvm-link not found in {}: install the toolchain's llvm-tools \
             (`rustup component add llvm-tools`; rust-toolchain.toml lists it)",
            dir.display()
        ));
    }
    Ok(dir)
}

// ---------------------------------------------------------------- linker mode

/// Called by rustc as `<linker> [--export-symbol S]... [-o OUT] inputs...` (flavor llbc).
fn link(args: Vec<OsString>) -> Result<(), String> {
    let tools = PathBuf::from(env::var_os("QWEN3_PTX_TOOLS").ok_or("QWEN3_PTX_TOOLS unset")?);
    let sm = env::var(LINK_MODE).unwrap();
    let mut inputs = Vec::new();
    let mut exports = Vec::new();
    let mut output = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().to_string();
        match s.as_str() {
            "-o" => output = it.next().map(PathBuf::from),
            "--export-symbol" => exports.extend(it.next().map(|v| v.to_string_lossy().to_string())),
            "--target" | "--target-cpu" | "--linker-path" | "--bitcode-linker-path" | "-L" => {
                it.next();
            }
            _ if s.starts_with('-') => {} // optimisation level and the like: we always use O3
            _ if Path::new(&a).is_dir() => {}
            _ => inputs.push(PathBuf::from(a)),
        }
    }
    let output = output.ok_or("no -o given")?;
    if exports.is_empty() {
        return Err("rustc named no exported symbols: the kernel crate has no kernels".into());
    }
    let work = output.with_extension("link");
    fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let linked = work.join("linked.bc");
    run(Command::new(tools.join("llvm-link")).arg("--ignore-non-bitcode").args(&inputs).arg("-o").arg(&linked))?;

    // Everything but the exported kernels becomes internal, so O3 can inline and drop it.
    let api = work.join("exports.txt");
    fs::write(&api, exports.join("\n")).map_err(|e| e.to_string())?;
    let optimized = work.join("optimized.bc");
    run(Command::new(tools.join("opt"))
        .arg(format!("--internalize-public-api-file={}", api.display()))
        .arg("--passes=internalize,default<O3>,globaldce")
        .arg(&linked)
        .arg("-o")
        .arg(&optimized))?;
    let mattr = env::var("QWEN3_PTX_MATTR").unwrap_or_default();
    let mut llc = Command::new(tools.join("llc"));
    if !mattr.is_empty() {
        llc.arg(format!("--mattr={mattr}"));
    }
    run(llc.arg(format!("--mcpu={sm}")).arg("-O3").arg(&optimized).arg("-o").arg(&output))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!("{:?} failed:\n{}", cmd, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}
