// upfirdn2d on CUDA: upsample by zero insertion, pad (or crop), correlate with a FIR filter, and keep
// every down-th sample, in one pass. Each block computes a tile of output pixels of one image plane
// from a tile of input pixels staged in shared memory. Only the filter taps that meet a real
// (non-inserted) input sample are visited, so upsampling costs no multiplications by zero, and only
// the kept output samples are computed, so downsampling costs no discarded work.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda_launch.h"
#include "cuda_utils.cuh"

namespace sgo {
namespace {

// Dynamic shared memory any GPU offers without an opt-in.
constexpr int64_t kMaxSharedBytes = 48 * 1024;
constexpr int kMaxTile = 32;  // output tile side, before shrinking to fit shared memory
constexpr int kMaxThreads = 256;
constexpr int kMaxGridZ = 65535;

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                 const acc_t<scalar_t>* __restrict__ f, UpfirdnShape s, acc_t<scalar_t> gain) {
  using acc = acc_t<scalar_t>;
  // One untyped buffer: a typed `extern __shared__` array would clash between instantiations.
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  acc* sf = reinterpret_cast<acc*>(shared_raw);  // correlation filter [fh][fw], gain folded in
  acc* sx = sf + s.fh * s.fw;                    // input tile [tile_in_h][tile_in_w]

  for (int i = threadIdx.x; i < s.fh * s.fw; i += blockDim.x) {
    const int t = i / s.fw, u = i % s.fw;
    const int ft = s.flip_filter ? t : s.fh - 1 - t;
    const int fu = s.flip_filter ? u : s.fw - 1 - u;
    sf[i] = (s.separable ? f[ft] * f[fu] : f[ft * s.fw + fu]) * gain;
  }

  // Output pixel o reads the zero-inserted, padded signal at m = o * down - pad0 + t for taps t; the
  // real samples among those are input pixels m / up, where m is a multiple of up.
  const int oy0 = blockIdx.y * s.tile_out_h;
  const int ox0 = blockIdx.x * s.tile_out_w;
  const int iy0 = ceil_div(oy0 * s.down_y - s.pad_y0, s.up_y);  // first input row the tile can touch
  const int ix0 = ceil_div(ox0 * s.down_x - s.pad_x0, s.up_x);
  const int tile_in = s.tile_in_h * s.tile_in_w;
  const int tile_out = s.tile_out_h * s.tile_out_w;

  for (int64_t plane = blockIdx.z; plane < s.planes; plane += gridDim.z) {
    const scalar_t* xp = x + plane * s.in_h * s.in_w;
    scalar_t* yp = y + plane * s.out_h * s.out_w;
    __syncthreads();  // the previous plane's reads of sx (and the filter writes) are complete
    for (int i = threadIdx.x; i < tile_in; i += blockDim.x) {
      const int iy = iy0 + i / s.tile_in_w, ix = ix0 + i % s.tile_in_w;
      const bool inside = iy >= 0 && iy < s.in_h && ix >= 0 && ix < s.in_w;
      sx[i] = inside ? static_cast<acc>(xp[iy * s.in_w + ix]) : acc(0);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < tile_out; i += blockDim.x) {
      const int oy = oy0 + i / s.tile_out_w, ox = ox0 + i % s.tile_out_w;
      if (oy >= s.out_h || ox >= s.out_w) continue;
      const int my = oy * s.down_y - s.pad_y0, mx = ox * s.down_x - s.pad_x0;
      const int t0 = pos_mod(-my, s.up_y), u0 = pos_mod(-mx, s.up_x);  // first taps on real samples
      // my + t0 is a multiple of up, so this division is exact even when negative.
      const int ty0 = (my + t0) / s.up_y - iy0, tx0 = (mx + u0) / s.up_x - ix0;
      acc sum = 0;
      for (int t = t0, ty = ty0; t < s.fh; t += s.up_y, ++ty) {
        const acc* frow = sf + t * s.fw;
        const acc* xrow = sx + ty * s.tile_in_w;
        for (int u = u0, tx = tx0; u < s.fw; u += s.up_x, ++tx) sum += xrow[tx] * frow[u];
      }
      yp[oy * s.out_w + ox] = static_cast<scalar_t>(sum);
    }
  }
}

int next_pow2(int v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

int64_t shared_bytes(const UpfirdnShape& s, int64_t acc_bytes) {
  return acc_bytes * (static_cast<int64_t>(s.fh) * s.fw + static_cast<int64_t>(s.tile_in_h) * s.tile_in_w);
}

}  // namespace

// The input tile spans the taps of every output of the tile: ((tile - 1) * down + taps - 1) / up + 1
// samples per axis bounds it. Start at kMaxTile (or the output size) and halve the longer side.
bool choose_upfirdn2d_tile(UpfirdnShape& s, int64_t acc_bytes) {
  int th = std::min(kMaxTile, next_pow2(s.out_h)), tw = std::min(kMaxTile, next_pow2(s.out_w));
  for (;;) {
    s.tile_out_h = th;
    s.tile_out_w = tw;
    s.tile_in_h = ((th - 1) * s.down_y + s.fh - 1) / s.up_y + 1;
    s.tile_in_w = ((tw - 1) * s.down_x + s.fw - 1) / s.up_x + 1;
    if (shared_bytes(s, acc_bytes) <= kMaxSharedBytes) return true;
    if (th == 1 && tw == 1) return false;
    if (th >= tw) th /= 2; else tw /= 2;
  }
}

template <typename scalar_t>
const char* launch_upfirdn2d(scalar_t* y, const scalar_t* x, const acc_t<scalar_t>* f, const UpfirdnShape& s,
                             acc_t<scalar_t> gain) {
  const dim3 grid(static_cast<unsigned>(ceil_div64(s.out_w, s.tile_out_w)),
                  static_cast<unsigned>(ceil_div64(s.out_h, s.tile_out_h)),
                  static_cast<unsigned>(std::min<int64_t>(s.planes, kMaxGridZ)));
  const int threads = std::min<int>(kMaxThreads, static_cast<int>(ceil_div64(s.tile_out_h * s.tile_out_w, kWarp) * kWarp));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  upfirdn2d_kernel<scalar_t><<<grid, threads, shared_bytes(s, sizeof(acc_t<scalar_t>)), stream>>>(y, x, f, s, gain);
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
