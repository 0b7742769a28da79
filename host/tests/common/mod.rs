//! Running the `host` binary from the CLI tests (each `tests/*.rs` is its own crate and uses
//! this as `mod common;`).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `host` with a deadline; a hang fails the test instead of stalling it.
pub fn host<S: AsRef<OsStr>>(args: &[S]) -> Output {
    const LIMIT: Duration = Duration::from_secs(60);
    let mut child = Command::new(env!("CARGO_BIN_EXE_host"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running host");
    let start = Instant::now();
    while child.try_wait().expect("waiting for host").is_none() {
        if start.elapsed() > LIMIT {
            child.kill().ok();
            let _ = child.wait();
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
            panic!("host {shown:?} still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting host's output")
}

pub fn ok(args: &[&str]) -> String {
    let out = host(args);
    assert!(out.status.success(), "host {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail cleanly; returns its one-line error.
pub fn fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = host(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked") && !stderr.contains("stack backtrace"), "host {shown:?} panicked: {stderr}");
    assert_eq!(out.status.code(), Some(1), "host {shown:?} should fail with status 1: {stderr}");
    assert!(stderr.starts_with("error: "), "host {shown:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "host {shown:?}: more than one line: {stderr}");
    assert!(out.stdout.is_empty(), "host {shown:?} printed output besides the error");
    stderr
}

pub fn tokenizer_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-tokenizer")
}

/// The tiny synthetic checkpoint: vocab 512, no tokenizer, max_position_embeddings 40960.
pub fn synth_tiny(dir: &Path, extra: &[&str]) {
    let out = dir.to_str().unwrap();
    let mut args = vec!["synth", "--out", out, "--layers", "2", "--hidden", "64", "--intermediate", "128"];
    args.extend(["--heads", "4", "--kv-heads", "2", "--head-dim", "32"]);
    args.extend(extra);
    ok(&args);
}
