//! The decode step's schedule (kernel/src/schedule.rs), which the megakernel, the split kernels,
//! the profiler and `host bench` all read: its numbering and its dataflow.

use host::engine::schedule::*;

#[test]
fn phases_are_numbered_layer_by_layer_then_the_lm_head() {
    // Qwen3-0.6B: 28 layers of 5 phases and the LM head, the step's 141 grid barriers.
    assert_eq!(phases_per_step(28), 141);
    for n_layers in [1u32, 2, 28] {
        let mut seen = Vec::new();
        for i in 0..phases_per_step(n_layers) {
            seen.push(phase_at(i, n_layers).unwrap_or_else(|| panic!("phase {i} of {n_layers} layers")));
        }
        assert_eq!(phase_at(phases_per_step(n_layers), n_layers), None, "past the end");
        let mut want = Vec::new();
        for layer in 0..n_layers {
            want.extend(LAYER_PHASES.iter().map(|ph| (layer, ph.op)));
        }
        want.push((n_layers, PhaseOp::LmHead));
        assert_eq!(seen, want, "{n_layers} layers");
    }
}

#[test]
fn every_phase_reads_what_an_earlier_phase_wrote() {
    // Written before the step starts: the fed token, and the cache of earlier positions.
    let mut written = vec![Buffer::Token, Buffer::KvCache];
    let mut step: Vec<Phase> = Vec::new();
    for _layer in 0..2 {
        step.extend(LAYER_PHASES);
    }
    step.push(HEAD_PHASE);
    for (i, ph) in step.iter().enumerate() {
        for b in ph.reads {
            // x before layer 0's q/k/v is that phase's own write (the embedding row).
            let own = i == 0 && *b == Buffer::X && ph.writes.contains(b);
            assert!(own || written.contains(b), "phase {i} ({}) reads {b:?} before any phase writes it", ph.name);
        }
        written.extend(ph.writes);
    }
    assert!(written.contains(&Buffer::NextToken), "the step ends without the next token");
}

#[test]
fn the_profile_names_each_phase_once() {
    let names: Vec<&str> = PROFILED_PHASES.iter().map(|ph| ph.name).collect();
    for (i, n) in names.iter().enumerate() {
        assert!(!names[..i].contains(n), "{n} twice");
        assert_eq!(profile_index(PROFILED_PHASES[i].op), i);
    }
    assert_eq!(profile_index(PhaseOp::LmHead), PROFILED_PHASES.len() - 1);
    let slots = host::engine::abi::PROFILE_SLOTS;
    for (slot, what) in MARKS {
        assert!(slot >= 2 * PROFILED_PHASES.len() && slot < slots, "mark {what} in slot {slot}");
    }
}
