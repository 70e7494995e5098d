#!/usr/bin/env bash
# The GPU benchmark suite, run on the GPU machine from the repository root with the unpacked
# CUDA binary as $LORALAB (default /tmp/bin/loralab); logs and JSON go to $OUT (default runs/gpu).
#   bash scripts/bench/gpu_suite.sh
set -uo pipefail
LORALAB=${LORALAB:-/tmp/bin/loralab}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
log="$OUT/suite.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
# The GPU's bf16 matrix rate, for model FLOP utilisation.
python3 - <<'PY' 2>&1 | tee -a "$log"
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter(); n = 20
for _ in range(n): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(f"bf16 matmul 8192^3: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
run() { # name, then loralab settings
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/mem_$name.csv &
  local smi=$!
  echo "== $name: $*" | tee -a "$log"
  timeout 150 "$LORALAB" run examples/bench_gpu.lua --set out="$OUT/$name" "$@" 2>&1 | tee -a "$log"
  kill $smi 2>/dev/null
  echo "peak GPU memory used during $name (MiB, nvidia-smi): $(sort -n /tmp/mem_$name.csv | tail -1)" | tee -a "$log"
}
# Each stack in its own process, so that neither holds GPU memory while the other runs.
both() { # name, then settings
  local name=$1; shift
  run "${name}_loralab" "$@" --set python=none
  run "${name}_reference" "$@" --set reference_only=true
}
both q7_256 --set config=scripts/bench/configs/qwen2.5-7b.json --set seq=256
both q7_1024 --set config=scripts/bench/configs/qwen2.5-7b.json --set seq=1024 --set skip=sample
both q05_1024 --set config=scripts/bench/configs/qwen2.5-0.5b.json --set seq=1024 --set skip=sample
run q7_2048_loralab --set config=scripts/bench/configs/qwen2.5-7b.json --set seq=2048 --set skip=sample --set python=none --set steps=1
