#!/usr/bin/env bash
# The quick sweep of everything, timed: every registered task x every registered estimator x seeds
# 0,1 at the quick budget, two worker processes (issue #23's held sweep; its goal: 10 minutes on the
# 2-core box).  Prints the wall time and the cell-seconds per task.  Run it alone: it is a timing.
#   bash benchmarks/quick_sweep.sh [OUT_DIR]      (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)/sweep}"
tasks=$(python -c "import tasks; print(','.join(tasks.available()))")
ests=$(python -c "import estimators; print(','.join(estimators.available()))")
start=$SECONDS
# exit status 1: some cells failed, each recorded with its reason (listed below)
estbench run --tasks "$tasks" --estimators "$ests" --seeds 0,1 -j 2 --out "$out" --quiet \
    > "$out.log" 2>&1 || status=$?
if [ "${status:-0}" -gt 1 ]; then tail -5 "$out.log"; exit "$status"; fi
if [ ! -d "$out" ]; then tail -5 "$out.log"; exit 1; fi  # estbench did not start
python - "$out" "$((SECONDS - start))" <<'PY'
import sys
import estbench
_, cells = estbench.load(sys.argv[1])
wall = float(sys.argv[2])
print(f"{sys.argv[1]}: {len(cells)} cells, wall {int(wall // 60)} min {wall % 60:.0f} s, "
      f"{cells.seconds.sum():,.0f} cell-seconds; status {cells.status.value_counts().to_dict()}")
per = cells.groupby("task").seconds.agg(["sum", "median", "max"]).sort_values("sum", ascending=False)
print(per.round(1).to_string())
for _, c in cells[cells.status == "failed"].iterrows():
    print(f"failed: {c.task} x {c.estimator} seed {c.seed}: {c.error}")
PY
