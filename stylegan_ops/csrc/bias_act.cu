// Fused bias + activation + gain + clamp on CUDA, and its first and second derivatives.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda_launch.h"

namespace sgo {
namespace {

constexpr int kBiasActThreads = 256;
// Grid-stride loop: more blocks than this only add scheduling work.
constexpr int64_t kBiasActMaxBlocks = 65536;

// Element i (storage order) of v, r and out; its channel is (i / inner) % channels.
template <int A, int M, typename scalar_t, typename acc>
__device__ __forceinline__ void bias_act_loop(scalar_t* __restrict__ out, const scalar_t* __restrict__ v,
                                              const scalar_t* __restrict__ r, const scalar_t* __restrict__ b,
                                              int64_t n, int64_t inner, int64_t channels, const Params<acc>& p) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (ChannelWalker ch(i, stride, inner, channels); i < n; i += stride, ch.advance()) {
    const acc bias = b ? static_cast<acc>(b[ch.channel]) : acc(0);
    const acc ri = (M == kForward) ? acc(0) : static_cast<acc>(r[i]);
    out[i] = static_cast<scalar_t>(bias_act_element<A, M>(static_cast<acc>(v[i]), ri, bias, p));
  }
}

// One kernel per dtype; the activation and mode are uniform across the launch and select a loop
// specialised at compile time (no per-element branching on them).
template <typename scalar_t>
__global__ void bias_act_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ v,
                                const scalar_t* __restrict__ r, const scalar_t* __restrict__ b, int64_t n,
                                int64_t inner, int64_t channels, int act, int mode, Params<acc_t<scalar_t>> p) {
  with_act(act, [&](auto a_tag) {
    with_mode(mode, [&](auto m_tag) {
      bias_act_loop<decltype(a_tag)::value, decltype(m_tag)::value>(out, v, r, b, n, inner, channels, p);
    });
  });
}

}  // namespace

template <typename scalar_t>
const char* launch_bias_act(scalar_t* out, const scalar_t* v, const scalar_t* r, const scalar_t* b, int64_t n,
                            int64_t inner, int64_t channels, int act, int mode, Params<acc_t<scalar_t>> p) {
  const int blocks = static_cast<int>(std::min(ceil_div64(n, kBiasActThreads), kBiasActMaxBlocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bias_act_kernel<scalar_t><<<blocks, kBiasActThreads, 0, stream>>>(out, v, r, b, n, inner, channels, act, mode, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#define SGO_INSTANTIATE(T)                                                                                       \
  template const char* launch_bias_act<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int, \
                                          Params<acc_t<T>>);
SGO_INSTANTIATE(c10::Half)
SGO_INSTANTIATE(c10::BFloat16)
SGO_INSTANTIATE(float)
SGO_INSTANTIATE(double)
#undef SGO_INSTANTIATE

}  // namespace sgo
