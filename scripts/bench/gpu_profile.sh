#!/usr/bin/env bash
# GPU time per kernel, from Nsight Compute, summed by kernel name: where a LoRA training step
# (PART=train, the default) or batched sampling (PART=sample) spends its time. Run on the GPU
# machine from the repository root:
#   bash scripts/bench/gpu_profile.sh [config] [seq] [layers] [extra --set settings...]
#   PART=sample bash scripts/bench/gpu_profile.sh scripts/bench/configs/qwen2.5-7b.json 0 2 \
#     --set prompts=84 --set sample_batch=840 --set max_tokens=64
# The model has the config's shape cut to `layers` layers (default 2), so that the profile,
# which serialises every kernel, stays short. Output: $OUT/profile.csv and a summary on stdout.
# NCU_ARGS adds Nsight Compute options: "--clock-control none" times the kernels at the clocks
# the GPU runs at (by default the profiler locks them at their base).
set -uo pipefail
LORALAB=${LORALAB:-/tmp/bin/loralab}
OUT=${OUT:-runs/gpu}
CONFIG=${1:-scripts/bench/configs/qwen2.5-7b.json}
SEQ=${2:-1024}
LAYERS=${3:-2}
PART=${PART:-train}
if [ "$PART" = sample ]; then
  what=(--set skip=train)
else
  what=(--set seq="$SEQ" --set grad_accum=1 --set steps=1 --set skip=sample)
fi
NCU=${NCU:-/usr/local/cuda/bin/ncu}
mkdir -p "$OUT"
python3 - "$CONFIG" "$LAYERS" > /tmp/profile_config.json <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] = int(sys.argv[2]); print(json.dumps(c))
PY
# shellcheck disable=SC2086 # NCU_ARGS is a list of options
timeout "${PROFILE_TIMEOUT:-400}" "$NCU" ${NCU_ARGS:-} --metrics gpu__time_duration.sum --csv --print-units base \
  "$LORALAB" run examples/bench_gpu.lua --set config=/tmp/profile_config.json "${what[@]}" \
  --set python=none --set out=/tmp/profile "${@:4}" \
  > "$OUT/profile.csv" 2> "$OUT/profile.err"
tail -3 "$OUT/profile.err"
python3 - "$OUT/profile.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; ki = head.index("Kernel Name"); vi = head.index("Metric Value")
t = collections.Counter(); n = collections.Counter()
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    name = r[ki][:110]; t[name] += v; n[name] += 1
total = sum(t.values())
print(f"{len(rows) - 1} kernels, {total / 1e6:.1f} ms of GPU time")
for name, v in t.most_common(30):
    print(f"{100 * v / total:5.1f}%  {v / 1e6:8.2f} ms  {n[name]:5d}x  {name}")
PY
