// Host-side helpers shared by the entry points of every op (CPU and CUDA).
#pragma once

// Narrow ATen headers rather than ATen/ATen.h: they parse several times faster, and every
// second counts in a JIT build on a small machine.
#include <ATen/core/Tensor.h>

namespace sgo {

// The tensor types the kernels are instantiated for.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace sgo
