// Definitions shared by every kernel source, host and device, C++ and CUDA alike.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SGO_HD __host__ __device__ __forceinline__
#else
#define SGO_HD inline
#endif

namespace sgo {

// Accumulation type: float for float16 / bfloat16 / float32 tensors, double for float64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Integer division and modulo rounding toward minus infinity (C++ truncates toward zero); b > 0.
SGO_HD int floor_div(int a, int b) {
  const int q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
SGO_HD int ceil_div(int a, int b) { return -floor_div(-a, b); }
SGO_HD int pos_mod(int a, int b) { return a - floor_div(a, b) * b; }

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sgo
