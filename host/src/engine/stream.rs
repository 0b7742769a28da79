//! The tokens of a running launch: read from the host-mapped ring as the kernel publishes them,
//! handed to the caller, and the wait for the launch to end (with a watchdog for a kernel
//! that never does).

use super::abi::*;
use super::{GpuEngine, LaunchOutcome, LaunchSpec};
use crate::gpu::HostRing;
use anyhow::{bail, Context, Result};
use cust::memory::CopyDestination;
use std::time::{Duration, Instant};

impl GpuEngine {
    /// Streams the running launch's tokens to `on_token` and waits for it to finish.
    pub(super) fn stream_tokens(
        &mut self,
        spec: &LaunchSpec,
        started: Instant,
        mut on_token: Option<&mut dyn FnMut(u32) -> bool>,
    ) -> Result<(LaunchOutcome, Vec<u32>)> {
        let mut seen = 0usize;
        let mut generated = Vec::new();
        let mut cancelled = false;
        let mut drain = |ring: &HostRing, generated: &mut Vec<u32>, seen: &mut usize, cancelled: &mut bool| {
            // Slots fill in order, each with token + 1; zero is not yet written.
            while RING_TOKENS + *seen < ring.len() {
                let slot = ring.read(RING_TOKENS + *seen);
                if slot == 0 {
                    break;
                }
                let t = slot - 1;
                generated.push(t);
                *seen += 1;
                if let Some(cb) = on_token.as_mut() {
                    if !*cancelled && !cb(t) {
                        ring.write(RING_CANCEL, 1);
                        *cancelled = true;
                    }
                }
            }
        };
        // A step takes well under 10 ms even at 40k context; a launch far past that is stuck
        // (a barrier that never completes), and waiting longer would only hide it. Tools that
        // slow kernels down a hundredfold (compute-sanitizer) set QWEN3_WATCHDOG_SECS.
        let base = std::env::var("QWEN3_WATCHDOG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
        let watchdog = Duration::from_secs(base) + Duration::from_millis(20) * spec.n_steps;
        loop {
            let status = self.gpu.stream_done();
            // Tokens published before a fault still reach the caller.
            drain(&self.ring, &mut generated, &mut seen, &mut cancelled);
            let done = status.map_err(|e| self.launch_error(e, spec))?;
            if done {
                break;
            }
            if started.elapsed() > watchdog {
                bail!(
                    "qwen3_decode did not finish within {watchdog:?} ({} steps): the kernel is stuck; exit the process",
                    spec.n_steps
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.gpu.synchronize().map_err(|e| self.launch_error(e, spec))?;
        drain(&self.ring, &mut generated, &mut seen, &mut cancelled);
        let elapsed = started.elapsed();
        let mut st = [DecodeState::default()];
        self.state.copy_to(&mut st[..]).context("reading decode state")?;
        Ok((LaunchOutcome { steps_done: st[0].steps_done, stop_reason: st[0].stop_reason, elapsed }, generated))
    }
}
