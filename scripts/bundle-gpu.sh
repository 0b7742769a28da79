#!/usr/bin/env bash
# Builds the host binary and the test binaries in release mode and copies the host and the GPU
# test binaries (tests/tests/gpu_*.rs; the CPU tests run under cargo anywhere), stripped, into
# bundle/ (gitignored) with scripts/run-gpu-tests.sh, so a machine with an NVIDIA GPU but no
# Rust toolchain can run the GPU tests (BUNDLE_ALL=1: every test binary, about 60 MiB):
#
#   scripts/bundle-gpu.sh                # here (PTXAS=... to also assemble-check the PTX)
#   cd bundle && ./run-gpu-tests.sh      # there
#
# The binaries link libcuda.so.1 by soname: the machine's driver provides it at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/bundle"
limit_mib=60

rm -rf "$out"
mkdir -p "$out/tests"

echo "== cargo build --release -p host" >&2
cargo build --release -p host
echo "== cargo test --release --workspace --no-run" >&2
json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --workspace --no-run --message-format=json >"$json"

# Test executables: every compiler artifact with a non-null "executable" and profile.test.
if command -v jq >/dev/null; then
    mapfile -t tests < <(jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .executable != null) | .executable' "$json" | sort -u)
else
    mapfile -t tests < <(grep '"reason":"compiler-artifact"' "$json" | grep '"test":true' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | sort -u)
fi
if [ "${#tests[@]}" -eq 0 ]; then
    echo "no test executables found in cargo's output" >&2
    exit 1
fi

strip_copy() { # src dest
    cp "$1" "$2"
    chmod u+w "$2"
    strip --strip-all "$2" 2>/dev/null || objcopy --strip-all "$2" 2>/dev/null || echo "warning: could not strip $2" >&2
}

strip_copy target/release/host "$out/host"
{
    echo "# qwen3 GPU bundle"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "rustc: $(rustc --version)"
    echo "ptx arch: $(cat "$(ls -td target/release/build/qwen3-ptx-*/out | head -1)/kernel.arch" 2>/dev/null || echo unknown)"
    echo
    echo "# file  bytes  sha256"
} >"$out/MANIFEST"
add_manifest() { # path relative to bundle
    printf '%s  %s  %s\n' "$1" "$(stat -c %s "$out/$1")" "$(sha256sum "$out/$1" | cut -d' ' -f1)" >>"$out/MANIFEST"
}
add_manifest host

copied=0
for exe in "${tests[@]}"; do
    name=$(basename "$exe")
    case "$name" in gpu_*) ;; *) [ "${BUNDLE_ALL:-0}" = 1 ] || continue ;; esac
    copied=$((copied + 1))
    strip_copy "$exe" "$out/tests/$name"
    add_manifest "tests/$name"
done
# Fixtures the GPU tests read (the golden tiny checkpoint and HF's outputs on it): the bundle
# carries them, and run-gpu-tests.sh points the tests at its own copy, so the bundle runs
# anywhere, not only inside a checkout.
mkdir -p "$out/fixtures"
cp -r tests/fixtures/golden "$out/fixtures/golden"
cp scripts/run-gpu-tests.sh "$out/run-gpu-tests.sh"
cp scripts/hf_logits.py "$out/hf_logits.py"
cp scripts/torch_prefill.py "$out/torch_prefill.py"
cp scripts/sanitize.sh "$out/sanitize.sh"
chmod +x "$out/run-gpu-tests.sh" "$out/sanitize.sh" "$out/host" "$out"/tests/*

total=$(du -sb "$out" | cut -f1)
echo "bundle: $copied test binaries + host, $((total / 1024 / 1024)) MiB in $out" >&2
if [ "$total" -gt $((limit_mib * 1024 * 1024)) ]; then
    echo "error: the bundle is over ${limit_mib} MiB" >&2
    exit 1
fi
