#!/usr/bin/env bash
# The hot-path fixes timed before and after, per forward, on a quiet machine: benchmarks/hotpath.py run from
# a checkout of BEFORE (a commit) and from this tree, interleaved (before, after, before, after) so that drift
# of the machine hits both alike. Writes benchmarks/results/hotpath-cpu-{before,after}-{1,2}.json and a summary.
#   bash benchmarks/run_hotpath.sh a3ebe04
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: run_hotpath.sh COMMIT_BEFORE}
wt=$(mktemp -d)
git worktree add -q "$wt" "$before"
trap 'git worktree remove --force "$wt"' EXIT
out=benchmarks/results
for i in 1 2; do
  PYTHONPATH="$wt/src" python3 benchmarks/hotpath.py --label "before-$before" --json "$out/hotpath-cpu-before-$i.json" > "$wt/before-$i.log"; head -2 "$wt/before-$i.log"
  python3 benchmarks/hotpath.py --label after --json "$out/hotpath-cpu-after-$i.json" > "$wt/after-$i.log"; head -2 "$wt/after-$i.log"
done
python3 benchmarks/summarize_hotpath.py "$out"/hotpath-cpu-*.json | tee "$out/hotpath-cpu.md"
