#!/usr/bin/env bash
# compute-sanitizer's four tools (memcheck, racecheck, synccheck, initcheck) over the op
# kernels' GPU unit tests and a few megakernel decode steps at short and long context.
# Run on the GPU machine inside the folder scripts/bundle-gpu.sh made:
#   bash sanitize.sh [MODEL_DIR]
# MODEL_DIR defaults to a tiny synthetic checkpoint made here (head_dim 32; racecheck on long
# full-size runs takes too long for a session). With SANITIZE_FULL_MODEL=DIR (a full-size
# `host synth` checkpoint) the four tools also run a short decode with the head_dim-128 kernel
# Qwen3-0.6B uses (the default sampling, and top-p alone), memcheck and synccheck a 1200-token
# context, racecheck steps at position 300 (bench over a random KV cache), a 300-token prompt
# and a 40-token perplexity through prefill (racecheck: 130 and 20), and memcheck runs
# `bench --compare` once (the split kernels). The full-size decode runs name the megakernel
# (--megakernel; decode's default is the streaming step where it can draw); those named by
# their context feed every prompt token to it (--prefill-chunk 0, the path they were written
# for); the prefill runs say so. The streaming step's runs come last: its GPU test at three
# positions, and decode on it (prefill, then its launches, drawing top-k). Prints one
# summary line per run and a total; exits non-zero if any run reported errors or did not
# finish. SANITIZE_TOOLS="racecheck ..." runs a subset; SANITIZE_ONLY=REGEX only the runs whose
# name matches; SANITIZE_TIMEOUT (s) bounds each run;
# SANITIZE_TINY=0 runs only the full-size model's part; SANITIZE_STREAM=0 leaves out the
# streaming step's runs (they need an sm_90 GPU).
set -u
cd "$(dirname "$0")"
san=${COMPUTE_SANITIZER:-compute-sanitizer}
limit=${SANITIZE_TIMEOUT:-300}
# Under the sanitizer a launch runs far slower than the engine's stuck-kernel watchdog expects.
export QWEN3_WATCHDOG_SECS=$limit
model=${1:-/tmp/qwen3-sanitize-tiny}
[ -f "$model/model.safetensors" ] || ./host synth --out "$model" --layers 2 --hidden 64 --intermediate 128 \
    --heads 4 --kv-heads 2 --head-dim 32 --vocab 512 >/dev/null
ops=$(ls tests/gpu_ops-* 2>/dev/null | head -1)
[ -n "$ops" ] || ops=./gpu_ops
device=$(ls tests/gpu_device-* 2>/dev/null | head -1)
prefill=$(ls tests/gpu_prefill-* 2>/dev/null | head -1)
score=$(ls tests/gpu_score-* 2>/dev/null | head -1)
ids() { seq -s, 1 "$1" | awk -F, '{for(i=1;i<=NF;i++) printf "%s%d", (i>1?",":""), $i % 500}'; }
tools=${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
bad=0
lines=()
run() { # name, command...
    local name=$1; shift
    # SANITIZE_ONLY=REGEX: only the runs whose name matches (to spread one tool's runs over
    # several processes).
    if [ -n "${SANITIZE_ONLY:-}" ] && ! [[ $name =~ $SANITIZE_ONLY ]]; then return; fi
    local log; log=$(mktemp)
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local summary; summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    # racecheck reports "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)".
    if [ $rc -ne 0 ] || ! grep -qE "ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards displayed \(0 errors, 0 warnings\)" "$log"; then
        bad=$((bad + 1))
        echo "FAIL  $name (exit $rc): ${summary:-no summary}"
        lines+=("FAIL  $name (exit $rc): ${summary:-no summary}")
        grep -E "^=========" "$log" | head -20
        grep -vE "^=========" "$log" | tail -3
    else
        echo "ok    $name: $summary"
        lines+=("ok    $name: $summary")
    fi
    rm -f "$log"
}
# SANITIZE_QUICK=1: every tool on the short decode, memcheck also on the long one and the op
# kernels (for a GPU session with little time left).
# SANITIZE_TINY=0 leaves out the tiny model and the op kernels (runs with SANITIZE_FULL_MODEL only).
for tool in $tools; do
    [ "${SANITIZE_TINY:-1}" = 0 ] && break
    extra=()
    # racecheck is the slowest by far: its long run uses a 300-token context (still split over
    # ten blocks per kv head, so the cross-block merge runs) instead of 1200.
    long=1200
    [ "$tool" = racecheck ] && extra=(--racecheck-report all) && long=300
    run "$tool decode (3 prompt + 4 new tokens)" "$san" --tool "$tool" "${extra[@]}" \
        ./host decode --model "$model" --prompt-ids 1,2,3 --max-new-tokens 4 --json --prefill-chunk 0
    # decode's default: the prompt but its last token through prefill (chunks 16 + 16 + 4).
    run "$tool decode, 37-token prompt through prefill (chunks of 16)" "$san" --tool "$tool" "${extra[@]}" \
        ./host decode --model "$model" --prompt-ids "$(ids 37)" --max-new-tokens 2 --max-context 64 --json \
        --prefill-chunk 16
    [ "${SANITIZE_QUICK:-0}" = 1 ] && [ "$tool" != memcheck ] && continue
    run "$tool decode ($long-token context)" "$san" --tool "$tool" "${extra[@]}" \
        ./host decode --model "$model" --prompt-ids "$(ids $long)" --max-new-tokens 2 --max-context 1300 --json \
        --prefill-chunk 0
    # Every op kernel's test and the tensor-core GEMM at every tested shape; then the LM head's
    # draws with fewer of them (the paths, not the statistics, are what the tools check; racecheck
    # takes minutes per hundred draws).
    run "$tool op kernels" "$san" --tool "$tool" "${extra[@]}" \
        "$ops" --ignored --test-threads=1 rms_norm gemv gate_up head_norm_rope attention gemm_bf16_matches
    trials=300
    [ "$tool" = racecheck ] && trials=40
    QWEN3_SAMPLING_TRIALS=$trials run "$tool sampling kernels ($trials draws a case)" "$san" --tool "$tool" "${extra[@]}" \
        "$ops" --ignored --test-threads=1 ties sampling
    QWEN3_SAMPLING_TRIALS=$trials run "$tool top-p draw by every block at full vocabulary" "$san" --tool "$tool" \
        "${extra[@]}" "$ops" --ignored --test-threads=1 top_p_grid
    # The prefill kernels (embedding, row norms, q/k norm + RoPE with the K/V append,
    # attention over the cache, elementwise ops) at chunk and cache boundaries.
    [ -n "$prefill" ] && run "$tool prefill kernels" "$san" --tool "$tool" "${extra[@]}" \
        "$prefill" --ignored --test-threads=1
    # Scoring's NLL kernel (one block per row, rows of 151936 logits and small ones).
    [ -n "$score" ] && run "$tool NLL kernel (prefill_nll)" "$san" --tool "$tool" "${extra[@]}" \
        "$score" --ignored --test-threads=1 prefill_nll
    # The grid barrier as the decode kernel uses it (sense in shared memory).
    [ -n "$device" ] && QWEN3_BARRIER_ROUNDS=1000 run "$tool grid barrier (sense in shared memory, 2000 uses)" \
        "$san" --tool "$tool" "${extra[@]}" "$device" --ignored --test-threads=1 grid_barrier_with_sense_in_shared_memory
done
if [ -n "${SANITIZE_FULL_MODEL:-}" ]; then
    for tool in $tools; do
        extra=()
        [ "$tool" = racecheck ] && extra=(--racecheck-report all)
        run "$tool full-size decode (3 prompt + 2 new tokens)" "$san" --tool "$tool" "${extra[@]}" \
            ./host decode --model "$SANITIZE_FULL_MODEL" --prompt-ids 1,2,3 --max-new-tokens 2 --json --prefill-chunk 0 --megakernel
        # Top-p alone: every block takes part in the draw (grid barriers inside the LM head).
        run "$tool full-size decode, top-p alone (3 prompt + 2 new tokens)" "$san" --tool "$tool" "${extra[@]}" \
            ./host decode --model "$SANITIZE_FULL_MODEL" --prompt-ids 1,2,3 --max-new-tokens 2 --json \
            --temperature 0.6 --top-k 0 --top-p 0.95 --prefill-chunk 0
        # Long context on the head_dim-128 kernel: several splits per kv head, so the cross-block
        # merge (and, above 8 splits, its two-warp form) runs. initcheck is left to the tiny model.
        [ "$tool" = initcheck ] && continue
        [ "${SANITIZE_QUICK:-0}" = 1 ] && [ "$tool" != memcheck ] && continue
        # A long prompt through the chunked prefill (then the megakernel from its last position):
        # several chunks, each attending over the earlier ones' cache in several key tiles.
        # racecheck checks every shared-memory access of some thousand tensor-core launches,
        # so it takes 130 tokens (chunks 64 + 64 + 1: row tiles, key tiles and a chunk of one
        # row) where the other tools take 300.
        plen=300
        [ "$tool" = racecheck ] && plen=130
        run "$tool full-size decode, $plen-token prompt through prefill (chunks of 64)" "$san" --tool "$tool" "${extra[@]}" \
            ./host decode --model "$SANITIZE_FULL_MODEL" --prompt-ids "$(ids $plen)" --max-new-tokens 2 --max-context 400 \
            --json --prefill-chunk 64 --megakernel
        # perplexity through prefill: 39 positions in chunks of 16 + 16 + 7 (racecheck: 19 in one
        # chunk), each chunk's rows through the final norm, the LM head's GEMM (N = 151936) and
        # the NLL kernel.
        ptok=40 pchunk=16
        [ "$tool" = racecheck ] && ptok=20 pchunk=32
        run "$tool full-size perplexity, $ptok tokens through prefill (chunks of $pchunk)" "$san" --tool "$tool" "${extra[@]}" \
            ./host perplexity --model "$SANITIZE_FULL_MODEL" --ids "$(ids $ptok)" --max-context 64 --json --prefill-chunk $pchunk
        if [ "$tool" = racecheck ]; then
            # A 300-token prompt is 300 steps, more than ten minutes under racecheck at full
            # size: bench starts at position 300 over a random KV cache instead (the same code
            # path: ten splits per kv head, so the cross-block merge runs), and draws top-p alone.
            run "$tool full-size steps at position 300 (bench, top-p alone)" "$san" --tool "$tool" "${extra[@]}" \
                ./host bench --model "$SANITIZE_FULL_MODEL" --positions 300 --steps 2 --reps 1 --sampling 0.6,0,0.95 --no-stream
        else
            run "$tool full-size decode (1200-token context)" "$san" --tool "$tool" "${extra[@]}" \
                ./host decode --model "$SANITIZE_FULL_MODEL" --prompt-ids "$(ids 1200)" --max-new-tokens 2 --max-context 1300 --json \
                --prefill-chunk 0 --megakernel
        fi
    done
    [[ " $tools " == *" memcheck "* ]] && run "memcheck full-size bench --compare (megakernel + split kernels)" "$san" --tool memcheck \
        ./host bench --model "$SANITIZE_FULL_MODEL" --positions 5 --steps 2 --reps 1 --compare --no-stream
    # The streaming step (sm_90: clusters, bulk copies, st.async hand-offs): one step at
    # position 1 and one at 300 (blocks fold one cached page with all their warps, or two with
    # two warps a page) and one at 1100 (four or five a block: full, partial and empty half
    # pages) over a random KV cache, from its GPU test.
    # racecheck follows every shared-memory access of 120 blocks: on all 28 layers and the
    # whole vocabulary it does not finish in a session's limits, so it runs the same code on
    # Qwen3-0.6B's widths with 2 layers and a 4096-row LM head (every room, page kind, hand-off
    # and the token exchange; only fewer repetitions).
    stream=$(ls tests/gpu_stream-* 2>/dev/null | head -1)
    if [ "${SANITIZE_STREAM:-1}" = 1 ] && [ -n "$stream" ]; then
        narrow=/tmp/qwen3-sanitize-stream-2layers
        [ -f "$narrow/model.safetensors" ] || ./host synth --out "$narrow" --layers 2 --vocab 4096 --seed 7 >/dev/null
        for tool in $tools; do
            extra=() model=$SANITIZE_FULL_MODEL what="full-size"
            [ "$tool" = racecheck ] && extra=(--racecheck-report all) model=$narrow what="2-layer full-width"
            QWEN3_FULL_CHECKPOINT=$model run "$tool $what streaming step (positions 1, 300 and 1100)" \
                "$san" --tool "$tool" "${extra[@]}" "$stream" --ignored --exact \
                stream_step_chooses_its_logits_arg_max_at_short_and_long_context
            # decode's own path on it: the prompt through prefill, then launches of 1, 2, 4 and
            # 1 steps drawing top-k (Qwen3's default sampling).
            run "$tool $what decode on the streaming step (20-token prompt through prefill, 8 new tokens)" \
                "$san" --tool "$tool" "${extra[@]}" ./host decode --model "$model" --prompt-ids "$(ids 20)" \
                --max-new-tokens 8 --max-context 64 --json --prefill-chunk 16 --temperature 0.6 --top-k 20 --top-p 0.95
        done
    fi
fi
# The summary again, one line per run, last (the end of a long log is what gets read).
echo
echo "== compute-sanitizer summary"
printf '%s\n' "${lines[@]}"
echo "sanitizer runs: ${#lines[@]}, with errors: $bad"
[ $bad -eq 0 ]
