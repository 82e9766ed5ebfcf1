#!/usr/bin/env bash
# Fuzzing in CI, bounded: build both libFuzzer targets, run each for
# FUZZ_SECS (default 30) on the committed seeds, then push MUTATE_FRAMES
# (default 200,000) mutated frames through `decode` (benches/mutate.rs, in
# the test profile, which `cargo test` builds anyway). Any panic fails the run;
# libFuzzer leaves the input in fuzz/artifacts/<target>/.
#
# Only the stable toolchain is installed: cargo fuzz passes -Z flags, which
# RUSTC_BOOTSTRAP=1 lets stable rustc take. It is set for cargo fuzz only:
# exported, it would also change the fingerprints of the main build
# (proc-macro2 reruns its build script when it changes) and rebuild every
# dependency of `cargo test`. Sanitizer: none (ASan works here
# too, `-s address`, but makes `reducers` 15x slower for little gain over
# safe Rust; see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")"

FUZZ_SECS=${FUZZ_SECS:-30}
MUTATE_FRAMES=${MUTATE_FRAMES:-200000}
fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }

log() { printf '== fuzz: %s\n' "$*"; }
started=$SECONDS

if ! fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (once per machine)"
  cargo install --locked cargo-fuzz
fi

log "cargo fuzz build"
fuzz build -s none

corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
for target in decode reducers; do
  log "cargo fuzz run $target for ${FUZZ_SECS}s"
  mkdir -p "$corpus/$target"
  max_len=4096
  [ "$target" = reducers ] && max_len=8192
  # New inputs go to a scratch corpus; the seeds are only read.
  status=0
  fuzz run -s none "$target" "$corpus/$target" "seeds/$target" -- \
    -dict=json.dict -max_len=$max_len -timeout=10 -rss_limit_mb=2048 \
    -max_total_time="$FUZZ_SECS" -print_final_stats=1 >"$corpus/$target.log" 2>&1 || status=$?
  grep -E '^#[0-9]+ +(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec)' \
    "$corpus/$target.log" || true
  if [ "$status" != 0 ]; then
    tail -n 60 "$corpus/$target.log"
    log "$target failed (exit $status): the input is in fuzz/artifacts/$target/"
    exit "$status"
  fi
done

log "mutation bench: $MUTATE_FRAMES frames through decode (test profile)"
(cd .. && MUTATE_FRAMES=$MUTATE_FRAMES cargo test --bench mutate)

log "done in $((SECONDS - started))s"
