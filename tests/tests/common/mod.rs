//! Helpers shared by the test files (each `tests/*.rs` is its own crate; `mod common;`): the
//! comparisons, GPU buffers and waiting, seeded test data, synthetic checkpoints.
#![allow(dead_code)]

use host::model::ops;

/// ||a - b|| / ||b||, refusing non-finite values in `a` (the GPU side).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    assert!(a.iter().all(|v| v.is_finite()), "the GPU produced a non-finite value");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Largest logit minus the second largest.
pub fn top2_margin(v: &[f32]) -> f32 {
    let best = ops::argmax(v) as usize;
    let second = v.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, &x)| x).fold(f32::NEG_INFINITY, f32::max);
    v[best] - second
}

/// (tokens, chunk, max context) of the tiny model's prefill and scoring checks against the CPU
/// and the megakernel: chunks 16 + 16 + 4; M = 1 throughout; one chunk larger than the tokens;
/// the last token at the cache's last position; a single position.
pub const TINY_PREFILL_CASES: [(usize, usize, usize); 5] =
    [(37, 16, 64), (37, 1, 64), (37, 128, 64), (64, 16, 64), (2, 16, 64)];

// ---------------------------------------------------------------- GPU buffers and waiting

use cust::memory::{CopyDestination, DeviceBuffer, DeviceCopy};
use half::bf16;
use host::gpu::Gpu;
use host::model::synth::{write_checkpoint, SynthSpec};
use host::model::{checkpoint, Weights};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn gpu() -> Gpu {
    Gpu::new(0).expect("these tests need a CUDA GPU")
}

pub fn dptr<T: DeviceCopy>(b: &DeviceBuffer<T>) -> u64 {
    b.as_device_ptr().as_raw()
}

pub fn download<T: DeviceCopy + Default + Clone>(b: &DeviceBuffer<T>) -> Vec<T> {
    let mut v = vec![T::default(); b.len()];
    b.copy_to(&mut v[..]).unwrap();
    v
}

pub fn download_bf16(b: &DeviceBuffer<u16>) -> Vec<f32> {
    download(b).into_iter().map(|x| bf16::from_bits(x).to_f32()).collect()
}

pub fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|b| b.to_bits()).collect()
}

/// How long a test waits for its kernels before it calls them stuck: `default_secs`, or
/// `QWEN3_WATCHDOG_SECS` when set (what sanitize.sh sets: under compute-sanitizer a kernel runs
/// a hundred times slower).
pub fn watchdog(default_secs: u64) -> std::time::Duration {
    let secs = std::env::var("QWEN3_WATCHDOG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_secs);
    std::time::Duration::from_secs(secs)
}

/// Waits for the kernels; a kernel that hangs would stall every later test, so give up on the
/// whole process after 30 s (or the `watchdog` setting).
pub fn finish(gpu: &Gpu, what: &str) {
    if let Err(e) = gpu.synchronize_timeout(watchdog(30)) {
        eprintln!("{what}: {e:#}");
        std::process::exit(3);
    }
}

/// splitmix64: test data that is the same on every run for the same seed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(-scale, scale)).collect()
    }
    pub fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.uniform(-scale, scale))).collect()
    }
}

// ---------------------------------------------------------------- checkpoints

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen3-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Synthetic weights of `spec`, written by `host synth`'s code and loaded back through the
/// checkpoint loader.
pub fn weights(spec: &SynthSpec, name: &str) -> Arc<Weights> {
    let dir = temp_dir(name);
    write_checkpoint(&dir, spec).unwrap();
    let w = checkpoint::load(&dir, false).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    Arc::new(w)
}

pub fn tiny_weights(seed: u64) -> Arc<Weights> {
    weights(&SynthSpec::tiny(seed), &format!("tiny{seed}"))
}

/// A full-size Qwen3-0.6B-shaped checkpoint: `QWEN3_FULL_CHECKPOINT` if set (e.g. one made by
/// `host synth`), else synthesised into a temporary folder.
pub fn full_weights() -> Arc<Weights> {
    if let Ok(dir) = std::env::var("QWEN3_FULL_CHECKPOINT") {
        return Arc::new(checkpoint::load(Path::new(&dir), false).unwrap());
    }
    weights(&SynthSpec::qwen3_0_6b(7), "full")
}
