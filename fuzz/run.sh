#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each for a while; exits non-zero if any target crashed.
#
#   fuzz/run.sh [seconds_per_target] [target ...]    (default: 60 s, every target)
#
# Each target starts from the committed seeds in fuzz/corpus/<target>/ and writes what it finds
# to fuzz/corpus-local/<target>/ (not committed), so repeated runs keep building on it. Crash
# inputs land in fuzz/artifacts/<target>/, the full libFuzzer log in fuzz/artifacts/<target>.log.
# docs/development.md says how to reproduce a crash and refresh the committed corpora.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
shift || true

# cargo-fuzz needs unstable compiler flags (-Zsanitizer=address); stable 1.95 accepts them with this.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

start=$SECONDS
cargo fuzz build
echo "fuzz build: $((SECONDS - start)) s"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus-local/$t" "artifacts/$t"
    log="artifacts/$t.log"
    echo "fuzz $t: ${secs} s"
    # -malloc_limit_mb: one allocation above this is a crash (unbounded allocation from input);
    # -timeout: one input running longer than this is a crash (a hang).
    if cargo fuzz run "$t" "corpus-local/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^#[0-9]+ +DONE' "$log" | tail -n 1 || true
    else
        echo "fuzz $t FAILED (full log: fuzz/$log):"
        grep -m 1 -A 16 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$log" || tail -n 40 "$log"
        grep -A 2 -E '^Failing input:' "$log" || true
        failed+=("$t")
    fi
done

echo "fuzz targets ran ${secs} s each; crashed: ${failed[*]:-none} (inputs in fuzz/artifacts/)"
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
