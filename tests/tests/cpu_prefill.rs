//! The CPU twin of the whole prefill (host::model::prefill::prefill_forward): its cache does
//! not depend on the chunk size, and, loaded into the CPU reference, gives logits at the last
//! prompt token close to the reference's own (which keeps activations in f32). That distance
//! is the yardstick for the GPU's prefill (tests/tests/gpu_prefill_decode.rs), whose only
//! intended difference from the one-position-per-step path is the same bf16 rounding of the
//! GEMMs' inputs.

mod common;
use common::{rel_err, top2_margin, weights};
use host::backend::Backend;
use host::model::prefill::prefill_forward;
use host::model::reference::CpuReference;
use host::model::synth::random_ids;
use host::model::synth::SynthSpec;
use host::model::{ops, Weights};
use std::sync::Arc;

/// Relative L2 error of the logits at the last of `n` tokens: the twin's prefill of the first
/// `n - 1` in chunks of `chunk`, then one reference step, against the reference alone (with
/// its bf16 KV rounding, as the GPU's cache has).
fn prefill_logits_error(w: &Arc<Weights>, n: usize, chunk: usize, max_ctx: usize) -> (f64, f32, bool) {
    let tokens = random_ids(n, w.config.vocab_size, 5);
    let last = n - 1;
    let mut reference = CpuReference::new(w.clone(), max_ctx).with_bf16_kv(true);
    let want = reference.logits(&tokens, &[last]).unwrap().remove(0);
    let mut twin = CpuReference::new(w.clone(), max_ctx).with_bf16_kv(true);
    twin.load_kv_cache(prefill_forward(w, &tokens[..last], chunk, max_ctx)).unwrap();
    let got = twin.forward(tokens[last], last);
    let err = rel_err(&got, &want);
    let margin = top2_margin(&want);
    let max_abs = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!(
        "prefill of {last} tokens in chunks of {chunk} + 1 step: logits relative error {err:.2e}, largest difference \
         {max_abs:.3}, top-2 margin {margin:.3}"
    );
    (err, margin, ops::argmax(&got) == ops::argmax(&want))
}

#[test]
fn prefill_cache_does_not_depend_on_the_chunk() {
    let w = weights(&SynthSpec::tiny(31), "tiny31");
    let tokens = random_ids(37, w.config.vocab_size, 3);
    let whole = prefill_forward(&w, &tokens, 37, 64);
    for chunk in [1, 16, 36] {
        let c = prefill_forward(&w, &tokens, chunk, 64);
        assert!(c.keys == whole.keys && c.values == whole.values, "chunk {chunk}: a different cache");
    }
    assert_eq!(whole.keys[0].len(), 37 * w.config.kv_dim());
}

#[test]
fn prefill_twin_logits_stay_close_to_the_reference_tiny() {
    let w = weights(&SynthSpec::tiny(32), "tiny32");
    let (err, margin, same) = prefill_logits_error(&w, 37, 16, 64);
    assert!(err < 5e-3, "relative error {err}"); // measured: 1.0e-3
    assert!(same || margin < 0.05, "arg-max differs at a top-2 margin of {margin}");
}

/// The same at full size (28 layers; about a minute on a few CPU cores).
#[test]
#[ignore = "slow on a CPU: the full-size model"]
fn prefill_twin_logits_stay_close_to_the_reference_full_size() {
    let w = weights(&SynthSpec::qwen3_0_6b(7), "full7");
    let (err, margin, same) = prefill_logits_error(&w, 37, 16, 64);
    assert!(err < 2e-2, "relative error {err}"); // measured: 5.6e-3, largest difference 0.043
    assert!(same || margin < 0.05, "arg-max differs at a top-2 margin of {margin}");
}
