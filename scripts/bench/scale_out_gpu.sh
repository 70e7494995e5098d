#!/usr/bin/env bash
# The `paper` profile of scripts/dose_response.lua on a GPU machine, in one worker and in
# several (one per GPU, or several sharing one GPU), to measure what scaling out gains.
#
#   bash scripts/bench/scale_out_gpu.sh full LORALAB MODEL OUT
#       the whole study in one process, from nothing (Phase 1 included), into OUT/one
#   bash scripts/bench/scale_out_gpu.sh compare LORALAB MODEL OUT GPUS [SECONDS]
#       phases 2-3 and the report twice, each on a copy of OUT/one's Phase-1 cell (one serial
#       cell either way): with `--gpus GPUS` (e.g. 0,1,2,3, or 0,0 for two workers on GPU 0)
#       first, then in one process; prints both wall times and whether every result.json agrees
#
# The study's gate is opened (the 135M model couples more weakly than the study's 7B).
set -euo pipefail
mode=$1 bin=$2 model=$3 out=$4
mkdir -p "$out"
study=(scripts/dose_response.lua --set profile=paper --set "model=$model"
       --set gate_source_min=0 --set gate_assistant_max=1 --set gate_min_gap=-1)

wall() { # wall seconds of a command, its output kept in a log
  local log=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$log" 2>&1 || echo "exit status $? (see $log)"
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.0f", a - b }'
}

case "$mode" in
full)
  rm -rf "$out/one"
  t=$(wall "$out/one.log" "$bin" run "${study[@]}" --set "out=$out/one")
  echo "one process, whole study: $t s"
  tail -n 8 "$out/one.log"
  ;;
compare)
  gpus=$5 limit=${6:-280}
  for name in many single; do
    rm -rf "$out/$name"; mkdir -p "$out/$name"
    cp -r "$out"/one/phase1-coupling-* "$out/$name/"
  done
  t=$(wall "$out/many.log" timeout "$limit" "$bin" run "${study[@]}" --set "out=$out/many" --gpus "$gpus")
  echo "--gpus $gpus, phases 2-3 and report: $t s"
  t=$(wall "$out/single.log" timeout "$limit" "$bin" run "${study[@]}" --set "out=$out/single")
  echo "one process, phases 2-3 and report: $t s"
  # Results and completions cell for cell, timings aside (each cell records its own seconds).
  python3 - "$out" <<'EOF'
import glob, json, sys
out, same, differ = sys.argv[1], 0, 0
for r in sorted(glob.glob(f"{out}/many/*/result.json")):
    cell = r.split("/")[-2]
    if cell.startswith("report-"):
        continue  # the report cell's result holds the run's own paths
    try:
        a, b = json.load(open(r)), json.load(open(f"{out}/single/{cell}/result.json"))
        ca, cb = (open(f"{out}/{d}/{cell}/completions.json").read() for d in ("many", "single"))
    except OSError:
        differ += 1; print("missing:", cell); continue
    for x in (a, b):
        x.pop("seconds", None); x.pop("train_seconds", None)
    if a == b and ca == cb:
        same += 1
    else:
        differ += 1; print("differs:", cell)
print(f"cells with the same results and completions (timings aside): {same}, different or missing: {differ}")
EOF
  grep -h "^\[all\]\|done in" "$out/many.log" | tail -n 4
  ;;
esac
