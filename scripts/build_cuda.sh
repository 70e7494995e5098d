#!/usr/bin/env bash
# Builds the CUDA binary of loralab on a machine without a GPU or CUDA toolkit, for an H100/H200
# machine with driver 580 (CUDA 13.0) and the CUDA 13 libraries in /usr/local/cuda/lib64.
#
#   bash scripts/build_cuda.sh          -> dist/loralab-cuda.xz (unpack there with `xz -d`)
#   bash scripts/build_cuda.sh --tests  -> also dist/loralab-cuda-tests.xz (tests/cuda.rs)
#
# The toolkit comes from NVIDIA's PyPI wheels; the driver library is replaced at link time by a
# stub (never shipped) and found at run time on the GPU machine through the binary's run path.
# On a machine with a CUDA toolkit, `cargo build --release --features cuda` is all it takes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.cuda-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 "nvidia-cuda-cccl==13.0.*" nvidia-cublas==13.0.2.14 \
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

# The wheels ship versioned libraries only: add the names the linker looks for.
(cd "$CU/lib" && for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
  [ -e "lib$l" ] && ln -sf "lib$l" "lib${l%.*}"; done)

# A link-only stub of the driver library: one empty function per driver symbol cudarc declares.
# cudarc's source must be unpacked first: on a fresh machine nothing has fetched it yet.
cargo fetch --locked
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | head -n 1)
[ -n "$CUDARC" ] || { echo "cudarc 0.19 not found in the cargo registry after cargo fetch" >&2; exit 1; }
mkdir -p "$CU/lib/stubs"
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | awk '{print "void " $4 "(void) {}"}' | sort -u > "$CU/lib/stubs/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/stub.c"

export CUDA_HOME="$CU" CUDA_PATH="$CU" PATH="$CU/bin:$PATH" CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$CU/lib/stubs:$CU/lib:${LIBRARY_PATH:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$PWD/target-cuda}"
cargo build --release --features cuda
mkdir -p dist
strip -o dist/loralab-cuda "$CARGO_TARGET_DIR/release/loralab"
xz -T2 -6 -f dist/loralab-cuda
ls -la dist/loralab-cuda.xz
# With --tests: also the GPU kernel tests (tests/cuda.rs), to run there as dist/loralab-cuda-tests.
if [ "${1:-}" = "--tests" ]; then
  cargo test --release --features cuda --test cuda --no-run
  tests=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
    grep '"name":"cuda"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  strip -o dist/loralab-cuda-tests "$tests"
  xz -T2 -6 -f dist/loralab-cuda-tests
  ls -la dist/loralab-cuda-tests.xz
fi
