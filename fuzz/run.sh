#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, then prints what
# each one covered. Usage: fuzz/run.sh SECONDS [TARGET...]
#
# - Installs cargo-fuzz (pinned) under target/tools on first use; libFuzzer
#   needs a nightly compiler's flags, and this machine has only stable, so
#   RUSTC_BOOTSTRAP=1. Builds with debug assertions and overflow checks into
#   target/fuzz; without a sanitizer (the code under test is safe Rust, and
#   AddressSanitizer adds minutes to a CI build) unless FUZZ_SANITIZER=address.
# - Each target starts from its committed seeds (fuzz/seeds/<target>, which
#   hold every input a run ever failed on, as regress-*) plus the corpus
#   earlier runs grew on this machine (target/fuzz-corpus/<target>).
# - FUZZ_SEED fixes libFuzzer's random seed (default 0: a new one each run).
#   CI sets it, so the mutations it tries from the committed seeds are the
#   same every run and a failure there is one a rerun reproduces.
# - A failing input is saved to target/fuzz-artifacts/<target>/ and the
#   script exits non-zero naming it; copy it to fuzz/seeds/<target>/regress-<name>
#   once fixed, so every later run replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
log() { printf '[fuzz/run.sh] %s\n' "$*" >&2; }

tools="$root/target/tools"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  log "installing cargo-fuzz 0.13.2 under target/tools (at most 10 minutes)"
  install_start=$(date +%s)
  CARGO_TARGET_DIR="$tools/build" timeout 600 cargo install cargo-fuzz --version 0.13.2 --locked --root "$tools" --quiet
  log "installed in $(( $(date +%s) - install_start )) s"
  # The build tree of the install is hundreds of MB the fuzz build never reads.
  rm -rf "$tools/build"
fi
export PATH="$tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# A clean clone gains nothing from incremental state.
export CARGO_INCREMENTAL=0

cd fuzz
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
log "building ${#targets[@]} targets"
build_start=$(date +%s)
sanitizer=${FUZZ_SANITIZER:-none}
cargo fuzz build --sanitizer "$sanitizer" --target-dir "$root/target/fuzz" --codegen-units 16 >&2
log "built in $(( $(date +%s) - build_start )) s"

bin="$root/target/fuzz/x86_64-unknown-linux-gnu/release"
# One target per core at a time (FUZZ_JOBS to change it).
jobs=${FUZZ_JOBS:-$(nproc)}
status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT

run_one() {
  local t=$1
  local corpus="$root/target/fuzz-corpus/$t"
  local artifacts="$root/target/fuzz-artifacts/$t/"
  local out="$root/target/fuzz-logs/$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$out")" "seeds/$t"
  # -timeout: one input taking ten seconds is a hang; -rss_limit_mb: a leak.
  if "$bin/$t" "$corpus" "seeds/$t" -max_total_time="$secs" -seed="${FUZZ_SEED:-0}" -timeout=10 -rss_limit_mb=2048 \
      -max_len=16384 -print_final_stats=1 -artifact_prefix="$artifacts" > "$out" 2>&1; then
    echo ok > "$status_dir/$t"
  else
    echo failed > "$status_dir/$t"
  fi
}

log "running ${#targets[@]} targets, ${secs} s each, $jobs at a time"
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_one "$t" &
  running=$((running + 1))
done
wait || true

status=0
summary=()
for t in "${targets[@]}"; do
  out="$root/target/fuzz-logs/$t.log"
  if [ "$(cat "$status_dir/$t" 2>/dev/null)" != ok ]; then
    status=1
    log "$t FAILED: $(grep -m1 -E 'panicked at|ERROR: |Test unit written to' "$out" || true)"
    grep -A12 -m1 'panicked at' "$out" >&2 || tail -30 "$out" >&2
    ls -1 "$root/target/fuzz-artifacts/$t/" >&2
  fi
  # The last status line: edges covered (cov), features (ft), corpus size, executions.
  last=$(grep -E '^#[0-9]+' "$out" | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$out" | tail -1)
  summary+=("$(printf '%-16s %8s %8s %8s %10s' "$t" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${runs:-?}")")
done
printf '%-16s %8s %8s %8s %10s\n' target cov ft corpus runs
printf '%s\n' "${summary[@]}"
exit $status
