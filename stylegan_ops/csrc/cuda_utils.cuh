// Small helpers shared by the CUDA kernels.
#pragma once

#include <cstdint>

namespace sgo {

constexpr int kWarp = 32;

// Integer division and modulo rounding toward minus infinity (C++ truncates toward zero); b > 0.
__host__ __device__ __forceinline__ int floor_div(int a, int b) {
  const int q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return -floor_div(-a, b); }
__host__ __device__ __forceinline__ int pos_mod(int a, int b) { return a - floor_div(a, b) * b; }

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sgo
