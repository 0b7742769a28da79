//! Our CPU reference and the GPU megakernel against HF transformers on the same full-size
//! synthetic checkpoint. The HF side is produced on the GPU machine by scripts/hf_logits.py:
//!
//!   host synth --out DIR
//!   python3 scripts/hf_logits.py --model DIR --ids <IDS> --positions <POS> --out hf.json
//!   QWEN3_FULL_CHECKPOINT=DIR QWEN3_HF_LOGITS=hf.json gpu_hf --ignored
//!
//! Tolerances: CPU (f32, f32 KV cache, like HF in float32) within 1e-4 relative L2 of HF;
//! GPU (bf16 KV cache) within 1e-2, with the same arg-max wherever HF's top-2 margin is > 0.05;
//! GPU through prefill (the positions before in chunks of 4, bf16 activations into the tensor
//! cores, then one megakernel step) within 1.5e-2, the tolerance its test against the CPU
//! reference has (gpu_prefill_decode.rs), with the same arg-max rule. The streaming step
//! (sm_90; bf16 KV cache, every id fed as a prompt token) within 1e-2, same arg-max rule.

mod common;
use common::{rel_err, top2_margin};
use host::backend::Backend;
use host::engine::{GpuEngine, StreamStep};
use host::model::reference::CpuReference;
use host::model::{checkpoint, ops};
use std::path::Path;
use std::sync::Arc;

/// HF's side (scripts/hf_logits.py's JSON): the ids, the positions kept and their logits; and
/// the checkpoint they were computed on.
struct HfLogits {
    ids: Vec<u32>,
    positions: Vec<usize>,
    rows: Vec<Vec<f32>>,
    weights: Arc<host::model::Weights>,
}

fn hf_logits() -> HfLogits {
    let dir = std::env::var("QWEN3_FULL_CHECKPOINT").expect("set QWEN3_FULL_CHECKPOINT to a checkpoint folder");
    let hf_path = std::env::var("QWEN3_HF_LOGITS").expect("set QWEN3_HF_LOGITS to scripts/hf_logits.py's output");
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf_path).unwrap()).unwrap();
    let ids: Vec<u32> = hf["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let positions: Vec<usize> =
        hf["positions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let rows: Vec<Vec<f32>> = hf["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let weights = Arc::new(checkpoint::load(Path::new(&dir), false).unwrap());
    HfLogits { ids, positions, rows, weights }
}

#[test]
#[ignore = "needs a CUDA GPU, a checkpoint (QWEN3_FULL_CHECKPOINT) and HF's logits on it (QWEN3_HF_LOGITS)"]
fn cpu_and_gpu_match_hf_on_a_full_size_checkpoint() {
    let HfLogits { ids, positions, rows: hf_rows, weights: w } = hf_logits();
    let mut cpu = CpuReference::new(w.clone(), ids.len());
    let cpu_rows = cpu.logits(&ids, &positions).unwrap();
    let mut gpu = GpuEngine::new(&w, ids.len()).unwrap();
    let gpu_rows = gpu.logits(&ids, &positions).unwrap();
    for (i, p) in positions.iter().enumerate() {
        let (c, g, h) = (&cpu_rows[i], &gpu_rows[i], &hf_rows[i]);
        let (ce, ge) = (rel_err(c, h), rel_err(g, h));
        eprintln!("position {p}: CPU vs HF {ce:.2e}, GPU vs HF {ge:.2e}, HF top-2 margin {:.3}", top2_margin(h));
        assert!(ce < 1e-4, "position {p}: CPU vs HF relative error {ce}");
        assert!(ge < 1e-2, "position {p}: GPU vs HF relative error {ge}");
        if top2_margin(h) > 0.05 {
            assert_eq!(ops::argmax(g), ops::argmax(h), "position {p}: GPU arg-max differs from HF's");
            assert_eq!(ops::argmax(c), ops::argmax(h), "position {p}: CPU arg-max differs from HF's");
        }
    }
    // The same positions through prefill, as `decode` runs a prompt: every id before p in
    // chunks of 4, then the megakernel's step at p.
    for (i, &p) in positions.iter().enumerate() {
        let g = gpu.prefill_logits(&ids[..=p], 4).unwrap();
        let h = &hf_rows[i];
        let e = rel_err(&g, h);
        eprintln!("position {p}: GPU through prefill vs HF {e:.2e}");
        assert!(e < 1.5e-2, "position {p}: GPU through prefill vs HF relative error {e}");
        if top2_margin(h) > 0.05 {
            assert_eq!(ops::argmax(&g), ops::argmax(h), "position {p}: prefill's arg-max differs from HF's");
        }
    }
}

/// The streaming step fed HF's ids from position 0, one launch per kept position (the last
/// step's logits are that position's).
#[test]
#[ignore = "needs an sm_90 CUDA GPU, a checkpoint (QWEN3_FULL_CHECKPOINT) and HF's logits on it (QWEN3_HF_LOGITS)"]
fn stream_step_matches_hf_on_a_full_size_checkpoint() {
    let hf = hf_logits();
    let engine = GpuEngine::new(&hf.weights, hf.ids.len()).unwrap();
    let mut step = engine.stream_step(&hf.weights).unwrap();
    let mut checked = 0;
    for (i, &p) in hf.positions.iter().enumerate() {
        if p + 1 > StreamStep::MAX_STEPS {
            continue;
        }
        let run = step.run(&engine, 0, &hf.ids[..=p], p + 1, true).unwrap();
        let (g, h) = (run.logits.unwrap(), &hf.rows[i]);
        let e = rel_err(&g, h);
        eprintln!("position {p}: streaming step vs HF {e:.2e}, HF top-2 margin {:.3}", top2_margin(h));
        assert!(e < 1e-2, "position {p}: streaming step vs HF relative error {e}");
        if top2_margin(h) > 0.05 {
            assert_eq!(ops::argmax(&g), ops::argmax(h), "position {p}: the streaming step's arg-max differs from HF's");
        }
        checked += 1;
    }
    assert!(checked > 0, "HF's positions are all past the streaming step's {} steps", StreamStep::MAX_STEPS);
}
