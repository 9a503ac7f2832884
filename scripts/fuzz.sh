#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) and prints one line per target with
# the executions libFuzzer reported. Installs what it needs: a nightly toolchain
# (rustup) and cargo-fuzz (into ~/.cache/snapreg/tools). A crash fails the run and
# leaves its input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
tools="$HOME/.cache/snapreg/tools"
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR="$HOME/.cache/snapreg-fuzz-target"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install --locked cargo-fuzz --root "$tools"
fi

cd fuzz
# -s none: the fuzzed code is safe Rust (zstd's C is not instrumented by ASAN either);
# -a: debug assertions, so integer overflows panic instead of wrapping.
cargo +nightly fuzz build -s none -a
summary=()
for target in $(cargo +nightly fuzz list); do
  scratch="$(mktemp -d)"
  log="$scratch.log"
  if ! cargo +nightly fuzz run -s none -a "$target" "$scratch" "corpus/$target" \
      -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz target $target failed: input saved under fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs="$(grep -Eo '^Done [0-9]+ runs in [0-9]+ second' "$log" | awk '{print $2" runs in "$5" s"}')"
  summary+=("$target: $runs")
  rm -rf "$scratch" "$log"
done
printf 'fuzz %s\n' "${summary[@]}"
