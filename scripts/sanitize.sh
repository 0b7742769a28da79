#!/usr/bin/env bash
# compute-sanitizer's four tools (memcheck, racecheck, synccheck, initcheck) over the op
# kernels' GPU unit tests and a few megakernel decode steps at short and long context.
# Run on the GPU machine inside the folder scripts/bundle-gpu.sh made:
#   bash sanitize.sh [MODEL_DIR]
# MODEL_DIR defaults to a tiny synthetic checkpoint made here (racecheck on the full-size
# model takes too long for a session). Prints one summary line per run and a total; exits
# non-zero if any run reported errors or did not finish.
set -u
cd "$(dirname "$0")"
san=${COMPUTE_SANITIZER:-compute-sanitizer}
limit=${SANITIZE_TIMEOUT:-300}
model=${1:-/tmp/qwen3-sanitize-tiny}
[ -f "$model/model.safetensors" ] || ./host synth --out "$model" --layers 2 --hidden 64 --intermediate 128 \
    --heads 4 --kv-heads 2 --head-dim 32 --vocab 512 >/dev/null
ops=$(ls tests/gpu_ops-* 2>/dev/null | head -1)
[ -n "$ops" ] || ops=./gpu_ops
long_ids=$(seq -s, 1 1200 | awk -F, '{for(i=1;i<=NF;i++) printf "%s%d", (i>1?",":""), $i % 500}')
bad=0
run() { # name, command...
    local name=$1; shift
    local log; log=$(mktemp)
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local summary; summary=$(grep -E "ERROR SUMMARY|LEAK SUMMARY" "$log" | tail -1)
    if [ $rc -ne 0 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$log"; then
        bad=$((bad + 1))
        echo "FAIL  $name (exit $rc): ${summary:-no summary}"
        grep -E "^=========" "$log" | head -20
    else
        echo "ok    $name: $summary"
    fi
    rm -f "$log"
}
# SANITIZE_QUICK=1: every tool on the short decode, memcheck also on the long one and the op
# kernels (for a GPU session with little time left).
for tool in memcheck racecheck synccheck initcheck; do
    extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    run "$tool decode (3 prompt + 4 new tokens)" "$san" --tool "$tool" "${extra[@]}" \
        ./host decode --model "$model" --prompt-ids 1,2,3 --max-new-tokens 4 --json
    [ "${SANITIZE_QUICK:-0}" = 1 ] && [ "$tool" != memcheck ] && continue
    run "$tool decode (1200-token context)" "$san" --tool "$tool" "${extra[@]}" \
        ./host decode --model "$model" --prompt-ids "$long_ids" --max-new-tokens 2 --max-context 1300 --json
    run "$tool op kernels" "$san" --tool "$tool" "${extra[@]}" \
        "$ops" --ignored --test-threads=1 rms_norm gemv gate_up head_norm_rope attention ties
done
echo "sanitizer runs with errors: $bad"
[ $bad -eq 0 ]
