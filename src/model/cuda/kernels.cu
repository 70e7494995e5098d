// Every fused kernel as one translation unit, which build.rs compiles to one PTX module (feature
// `cuda`): each op's kernels live beside its Rust code in src/model/ops/<op>/, and its launchers
// in that folder's cuda.rs.
#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

#include "../ops/attention/flash.cu"
#include "../ops/attention/decode.cu"  // after flash.cu: it uses its fragment helpers
#include "../ops/attention/heads.cu"
#include "../ops/attention/softmax.cu"
#include "../ops/dropout/dropout.cu"
#include "../ops/gated/gated.cu"
#include "../ops/gather/take_rows.cu"
#include "../ops/linear/augment.cu"
#include "../ops/loss/cross_entropy.cu"
#include "../ops/optimizer/optimizer.cu"
#include "../ops/rms_norm/rms_norm.cu"
#include "../ops/sampling/gumbel.cu"
