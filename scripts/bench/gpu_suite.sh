#!/usr/bin/env bash
# The GPU benchmark suite, run on the GPU machine from the repository root with the unpacked
# CUDA binary as $LORALAB (default /tmp/bin/loralab); logs and JSON go to $OUT (default runs/gpu).
#   bash scripts/bench/gpu_suite.sh [train7b] [sample7b] [small] [families]    (no argument: the
#   first three parts; each part fits in one ten-minute call). families: Qwen3-8B, Mistral-7B and
#   Gemma-2-9B training against PEFT; with $LORALAB_BASE, also Qwen2.5-7B under that earlier binary and this
#   one, side by side, for regressions.
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
  timeout 300 "$LORALAB" run examples/bench_gpu.lua --set out="$OUT/$name" "$@" 2>&1 | tee -a "$log"
  kill $smi 2>/dev/null
  echo "peak GPU memory used during $name (MiB, nvidia-smi): $(sort -n /tmp/mem_$name.csv | tail -1)" | tee -a "$log"
}
# Each stack runs in its own process, so that neither holds GPU memory while the other runs.
Q7=scripts/bench/configs/qwen2.5-7b.json
parts=${*:-train7b sample7b small}
for part in $parts; do
  case $part in
    train7b)
      run q7_256_loralab --set config=$Q7 --set seq=256 --set skip=sample --set python=none
      run q7_256_loralab_ckpt --set config=$Q7 --set seq=256 --set skip=sample --set python=none --set gradient_checkpointing=true
      run q7_256_reference --set config=$Q7 --set seq=256 --set skip=sample --set reference_only=true
      run q7_1024_loralab --set config=$Q7 --set seq=1024 --set skip=sample --set python=none --set steps=2
      run q7_1024_loralab_ckpt --set config=$Q7 --set seq=1024 --set skip=sample --set python=none --set steps=2 --set gradient_checkpointing=true
      run q7_1024_reference --set config=$Q7 --set seq=1024 --set skip=sample --set reference_only=true --set steps=2
      run q7_2048_loralab_ckpt --set config=$Q7 --set seq=2048 --set skip=sample --set python=none --set steps=1 --set gradient_checkpointing=true
      # The study's own rows: short, with LoRA dropout 0.05.
      run q7_128_dropout_loralab --set config=$Q7 --set seq=128 --set skip=sample --set python=none --set lora_dropout=0.05
      run q7_128_dropout_reference --set config=$Q7 --set seq=128 --set skip=sample --set reference_only=true --set lora_dropout=0.05
      ;;
    sample7b) # the study's evaluation: 28 questions x 12 personas, 10 completions, 512 tokens
      run q7_sample_loralab --set config=$Q7 --set skip=train --set python=none --set prompts=336 --set max_tokens=512 --set sample_batch=840
      run q7_sample_reference --set config=$Q7 --set skip=train --set reference_only=true --set prompts=32 --set max_tokens=512
      ;;
    families)
      for f in qwen3-8b mistral-7b gemma-2-9b; do
        C=scripts/bench/configs/$f.json
        run ${f}_1024_loralab --set config=$C --set seq=1024 --set skip=sample --set python=none --set steps=2
        run ${f}_1024_reference --set config=$C --set seq=1024 --set skip=sample --set reference_only=true --set steps=2
      done
      if [ -n "${LORALAB_BASE:-}" ]; then
        run q7_1024_this --set config=$Q7 --set seq=1024 --set skip=sample --set python=none --set steps=2
        LORALAB=$LORALAB_BASE run q7_1024_base --set config=$Q7 --set seq=1024 --set skip=sample --set python=none --set steps=2
      fi
      ;;
    small)
      for size in 0.5b 1.5b; do
        C=scripts/bench/configs/qwen2.5-$size.json
        run q${size}_256_loralab --set config=$C --set seq=256 --set skip=sample --set python=none
        run q${size}_1024_loralab --set config=$C --set seq=1024 --set skip=sample --set python=none
        run q${size}_reference_256 --set config=$C --set seq=256 --set skip=sample --set reference_only=true
        run q${size}_reference_1024 --set config=$C --set seq=1024 --set skip=sample --set reference_only=true
      done
      ;;
  esac
done
