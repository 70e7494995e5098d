"""cuBLAS's rates at a decoding step's product shapes (rows = tokens in the step).

    python3 scripts/bench/gemm_rates.py [--rows 840,896] [--backend default|cublaslt|tunable]

For each frozen product of a Qwen2.5-7B decoder layer and the logits, the time of
`x (rows, K) @ W^T (K, N)` in bf16 and its rate against the bf16 matrix peak measured on
8192^3. `tunable` lets PyTorch's TunableOp time every cuBLASLt algorithm its heuristic offers
and keep the fastest: the best that the library itself gives at that shape.
"""
import argparse, time, torch

p = argparse.ArgumentParser()
p.add_argument("--rows", default="840")
p.add_argument("--backend", default="default")
args = p.parse_args()
if args.backend == "tunable":
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)
    torch.cuda.tunable.set_max_tuning_iterations(30)
elif args.backend == "cublaslt":
    torch.backends.cuda.preferred_blas_library("cublaslt")
elif args.backend == "cublas":
    torch.backends.cuda.preferred_blas_library("cublas")

def timed(f, reps=50):
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps  # ms

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
peak = 2 * 8192**3 / (timed(lambda: a @ a, 20) / 1e3) / 1e12
print(f"backend {args.backend}: bf16 8192^3 {peak:.0f} TFLOP/s")
shapes = [("q/k/v", 3584, 4608), ("o", 3584, 3584), ("gate", 3584, 18944),
          ("gate+up stacked", 3584, 37888), ("down", 18944, 3584), ("logits", 3584, 152064)]
for rows in [int(r) for r in args.rows.split(",")]:
    total = 0.0
    for name, k, n in shapes:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        ms = timed(lambda: x @ w.t())
        tf = 2 * rows * k * n / (ms / 1e3) / 1e12
        per_layer = {"q/k/v": 1, "o": 1, "gate": 2, "down": 1}.get(name, 0)
        total += ms * 28 * per_layer + (ms if name == "logits" else 0)
        print(f"rows {rows:5d} {name:16s} K {k:6d} N {n:6d}: {ms*1e3:8.1f} us {tf:6.0f} TFLOP/s ({tf/peak:.0%})")
    print(f"rows {rows}: a step's products (28 layers, gate and up apart, logits) {total:.2f} ms")
