// upfirdn2d on CUDA: one block per output tile and image plane (planes beyond the grid's z limit
// loop), running the shared tile algorithm of upfirdn2d_tile.h with the block's threads.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda_launch.h"

namespace sgo {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGridZ = 65535;

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                 const acc_t<scalar_t>* __restrict__ f, UpfirdnShape s, acc_t<scalar_t> gain) {
  using acc = acc_t<scalar_t>;
  // One untyped buffer: a typed `extern __shared__` array would clash between instantiations.
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  acc* sf = reinterpret_cast<acc*>(shared_raw);  // [fh][fw]
  acc* sx = sf + s.fh * s.fw;                    // [tile_in_h][tile_in_w]
  load_filter(sf, f, s, gain, threadIdx.x, blockDim.x);
  const TileOrigin o = tile_origin(s, blockIdx.y, blockIdx.x);
  for (int64_t plane = blockIdx.z; plane < s.planes; plane += gridDim.z) {
    __syncthreads();  // the filter is written, and the previous plane's reads of sx are done
    load_tile(sx, x + plane * s.in_h * s.in_w, s, o, threadIdx.x, blockDim.x);
    __syncthreads();
    compute_tile(y + plane * s.out_h * s.out_w, sx, sf, s, o, threadIdx.x, blockDim.x);
  }
}

}  // namespace

template <typename scalar_t>
const char* launch_upfirdn2d(scalar_t* y, const scalar_t* x, const acc_t<scalar_t>* f, const UpfirdnShape& s,
                             acc_t<scalar_t> gain) {
  const dim3 grid(static_cast<unsigned>(ceil_div64(s.out_w, s.tile_out_w)),
                  static_cast<unsigned>(ceil_div64(s.out_h, s.tile_out_h)),
                  static_cast<unsigned>(std::min(s.planes, kMaxGridZ)));
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div64(s.tile_out_h * s.tile_out_w, kWarp) * kWarp));
  const size_t shared = static_cast<size_t>(upfirdn2d_buffer_elems(s)) * sizeof(acc_t<scalar_t>);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  upfirdn2d_kernel<scalar_t><<<grid, threads, shared, stream>>>(y, x, f, s, gain);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#define SGO_INSTANTIATE(T) \
  template const char* launch_upfirdn2d<T>(T*, const T*, const acc_t<T>*, const UpfirdnShape&, acc_t<T>);
SGO_INSTANTIATE(c10::Half)
SGO_INSTANTIATE(c10::BFloat16)
SGO_INSTANTIATE(float)
SGO_INSTANTIATE(double)
#undef SGO_INSTANTIATE

}  // namespace sgo
