//! Device errors during a launch, reported with the step the kernel had reached.

use super::abi::*;
use super::{GpuEngine, LaunchSpec};

impl GpuEngine {
    /// A device error during a launch, with the step (and position) the kernel had reached,
    /// read from the host-mapped ring, which stays readable after the context is lost.
    pub(super) fn launch_error(&self, e: anyhow::Error, spec: &LaunchSpec) -> anyhow::Error {
        let step = self.ring.read(RING_STEP);
        // The marker is an asynchronous store to host memory: a fault right after a step starts
        // can still find the previous step's marker, so the report names both.
        let at = if step == 0 {
            "before its first step".to_string()
        } else {
            format!(
                "in decode step {} or {} of {} (position {} or {})",
                step,
                step + 1,
                spec.n_steps,
                spec.start_pos + step - 1,
                spec.start_pos + step
            )
        };
        e.context(format!(
            "qwen3_decode failed {at}; the GPU context is unusable after a device fault, so exit and start again"
        ))
    }
}
