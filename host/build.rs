//! Builds the link-time stand-in for the CUDA driver (see cuda-stub/lib64/libcuda_stub.c), so
//! the host links where no CUDA toolkit is installed. The binary records `libcuda.so.1` as its
//! dependency, which the real driver provides at run time.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let src = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("cuda-stub/lib64/libcuda_stub.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = cc::Build::new().get_compiler();
    let lib = out.join("libcuda.so");
    let status = Command::new(cc.path())
        .args(["-shared", "-fPIC", "-O0", "-w", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("running the C compiler for the CUDA stub");
    assert!(status.success(), "compiling the CUDA driver stub failed");
    std::fs::copy(&lib, out.join("libcuda.so.1")).unwrap();
    // .ci/run finds the stub here (target/release/build/host-*/out) for machines without a driver.
    println!("cargo:rustc-link-search=native={}", out.display());
}
