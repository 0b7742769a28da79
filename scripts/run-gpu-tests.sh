#!/usr/bin/env bash
# Runs every test binary of a bundle made by scripts/bundle-gpu.sh, GPU tests included, on a
# machine with an NVIDIA GPU and driver (no cargo needed). Run from anywhere:
#
#   bundle/run-gpu-tests.sh [extra libtest args, e.g. a test-name filter]
#
# Each binary runs with --include-ignored --test-threads=1 under a timeout (TEST_TIMEOUT
# seconds, default 900). Prints "N passed, M failed" and exits non-zero on any failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
timeout_s=${TEST_TIMEOUT:-900}

# Never let the link-time stub driver shadow the real one: drop LD_LIBRARY_PATH entries that
# hold our stub (it lives in target/*/build/host-*/out).
if [ -n "${LD_LIBRARY_PATH:-}" ]; then
    kept=()
    IFS=: read -ra dirs <<<"$LD_LIBRARY_PATH"
    for d in "${dirs[@]}"; do
        case "$d" in */build/host-*/out | */build/host-*/out/) echo "ignoring stub driver dir on LD_LIBRARY_PATH: $d" >&2 ;; *) kept+=("$d") ;; esac
    done
    LD_LIBRARY_PATH=$(IFS=:; echo "${kept[*]:-}")
    export LD_LIBRARY_PATH
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1'; then
    echo "warning: ldconfig knows no libcuda.so.1: is the NVIDIA driver installed?" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L

# Tests that read fixtures find the bundle's own copy (QWEN3_TEST_FIXTURES), wherever the
# bundle was copied to; the test binaries' compiled-in source paths exist only on the build
# machine.
if [ -z "${QWEN3_TEST_FIXTURES:-}" ] && [ -d "$here/fixtures" ]; then
    export QWEN3_TEST_FIXTURES="$here/fixtures"
fi
cd "$here"
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

# gpu_hf compares against HF transformers' logits on the full-size checkpoint: where the
# checkpoint is given and torch is here but the logits are not, make them (48 ids; positions
# 0, 7, 31 and 47).
if [ -n "${QWEN3_FULL_CHECKPOINT:-}" ] && [ -z "${QWEN3_HF_LOGITS:-}" ] && [ -f "$here/hf_logits.py" ] \
    && python3 -c "import torch, transformers" 2>/dev/null; then
    hf_json=$(mktemp --suffix=.json)
    ids=$(python3 -c "import random; r = random.Random(5); print(','.join(str(r.randrange(150000)) for _ in range(48)))")
    if python3 "$here/hf_logits.py" --model "$QWEN3_FULL_CHECKPOINT" --ids "$ids" --positions 0,7,31,47 --out "$hf_json"; then
        export QWEN3_HF_LOGITS=$hf_json
    else
        echo "warning: scripts/hf_logits.py failed; gpu_hf will fail for want of QWEN3_HF_LOGITS" >&2
    fi
fi

passed=0 failed=0 ignored=0 bad_bins=()
[ -x "$here/host" ] && { "$here/host" --help >/dev/null 2>&1 && echo "host binary: starts" || { echo "host binary: FAILED to start" >&2; bad_bins+=(host); }; }
for bin in "$here"/tests/*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    echo "=== $name"
    log=$(mktemp)
    timeout --kill-after=10 "$timeout_s" "$bin" --include-ignored --test-threads=1 "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^test result: ' "$log" | tail -1)
    if [ -n "$line" ]; then
        p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
        f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
        i=$(sed -E 's/.* ([0-9]+) ignored.*/\1/' <<<"$line")
        passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + i))
    fi
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "$name: timed out after ${timeout_s}s" >&2
        # A crash or exit before libtest's summary still counts as a failure.
        if [ -z "$line" ] || [ "$f" = 0 ]; then failed=$((failed + 1)); fi
        bad_bins+=("$name (exit $rc)")
    fi
    rm -f "$log"
done

echo
[ "${#bad_bins[@]}" -gt 0 ] && echo "failing binaries: ${bad_bins[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "${#bad_bins[@]}" -eq 0 ]
