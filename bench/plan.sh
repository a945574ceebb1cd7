#!/usr/bin/env bash
# Planner benchmark: generates a synthetic catalog (default 1,000,000 rows, URL images), then
# measures wall time and peak RSS (GNU time) of
#   1. planning it into an empty state file, and
#   2. re-planning it when every row is done (the nightly "nothing changed" case),
# each in its own process. Targets: under 20 s and under 150 MB peak RSS each.
#
#   bench/plan.sh [ROWS] [WORKDIR]
#
# Measured on the shared 2-core machine (release build, marble-counter prompt, 1,000,000 rows,
# 99 MB catalog, 851 MB state file), with other builds running beside it:
#   plan into empty store     16.5 s   peak RSS 121 MB
#   re-plan, every row done   17.9 s   peak RSS 123 MB
# Under heavier load (load average 4-5) the same runs took 25-29 s: the plan is CPU-bound.
#
# Builds the release example once (`cargo build --release --example plan_bench`); honours
# CARGO_TARGET_DIR. The work directory keeps the catalog (~150 MB) and state file (~1 GB at 1M rows).
set -euo pipefail

rows=${1:-1000000}
work=${2:-${TMPDIR:-/tmp}/backdrop-plan-bench}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/examples/plan_bench
prompt=$root/prompts/marble-counter.txt

(cd "$root" && cargo build --release --quiet --example plan_bench)
mkdir -p "$work"
catalog=$work/catalog-$rows.csv
state=$work/state.db
[ -f "$catalog" ] || "$bin" generate "$catalog" "$rows"
rm -f "$state" "$state-wal" "$state-shm"

measure() {
    local label=$1
    shift
    local log=$work/time-$label.txt
    /usr/bin/time -v "$@" >"$work/out-$label.txt" 2>"$log"
    local wall rss
    wall=$(grep 'Elapsed (wall clock)' "$log" | awk '{print $NF}')
    rss=$(grep 'Maximum resident set size' "$log" | awk '{print $NF}')
    printf '%-28s wall %8s   peak RSS %6d MB   (%s)\n' "$label" "$wall" $((rss / 1024)) \
        "$(grep -E '^planned in' "$work/out-$label.txt" || true)"
}

echo "catalog: $rows rows, $(du -h "$catalog" | cut -f1)   prompt: $(basename "$prompt")"
measure "plan into empty store" "$bin" plan "$catalog" "$prompt" "$state"
grep -E '^  (new|rows|to run)' "$work/out-plan into empty store.txt" || true
"$bin" mark-done "$state" >/dev/null
measure "re-plan, every row done" "$bin" plan "$catalog" "$prompt" "$state"
grep -E '^  (new|rows|to run)' "$work/out-re-plan, every row done.txt" || true
echo "state file: $(du -h "$state" | cut -f1)"
