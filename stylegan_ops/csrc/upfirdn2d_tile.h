// The upfirdn2d algorithm, shared by the CUDA kernel (one block per tile, threads strided over
// each loop) and the CPU kernel (one task per tile, a single "thread"): both run exactly this
// code, so the CPU tests check the CUDA kernel's index arithmetic too.
//
// Output pixel o (per axis) reads the zero-inserted, padded signal at m = o * down - pad0 + t for
// taps t = 0..taps-1; the real (non-inserted) samples among those are input pixels m / up, where m
// is a multiple of up. A tile of outputs is computed from the input pixels its taps can reach,
// staged in a buffer (shared memory on the GPU) with zeros outside the image. Only taps that meet a
// real sample are visited, so upsampling costs no multiplications by zero, and only kept outputs
// are computed, so downsampling costs no discarded work.
#pragma once

#include <cstdint>

#include "sgo_common.h"

namespace sgo {

// Tiling limits. CUDA: an output tile per block of at most 32x32 pixels, its buffer in the shared
// memory any GPU offers without an opt-in. CPU: one tile per task, its buffer within a core's L2.
constexpr int kCudaMaxTile = 32;
constexpr int64_t kCudaMaxBufferBytes = 48 * 1024;
constexpr int kCpuMaxTile = 64;
constexpr int64_t kCpuMaxBufferBytes = 64 * 1024;

struct UpfirdnShape {
  int in_h, in_w, out_h, out_w;
  int up_x, up_y, down_x, down_y, pad_x0, pad_y0;
  int fh, fw;
  bool separable;    // f is 1-D (fh == fw taps) and applies along both axes
  bool flip_filter;  // true: correlate with f as given; false: convolve (correlate with f flipped)
  int tile_out_h, tile_out_w, tile_in_h, tile_in_w;  // set by choose_upfirdn2d_tile
  int64_t planes;    // N * C
};

// Elements of the per-tile buffer: the correlation filter, then the input tile.
SGO_HD int64_t upfirdn2d_buffer_elems(const UpfirdnShape& s) {
  return static_cast<int64_t>(s.fh) * s.fw + static_cast<int64_t>(s.tile_in_h) * s.tile_in_w;
}

// Sets the tile fields of s: the largest output tile (at most max_tile square, no larger than the
// output) whose buffer fits in max_bytes. An input tile spans at most ((tile - 1) * down + taps -
// 1) / up + 1 samples per axis. Returns false if not even a 1x1 tile fits.
inline bool choose_upfirdn2d_tile(UpfirdnShape& s, int64_t acc_bytes, int64_t max_bytes, int max_tile) {
  int th = 1, tw = 1;
  while (th < max_tile && th < s.out_h) th *= 2;
  while (tw < max_tile && tw < s.out_w) tw *= 2;
  for (;;) {
    s.tile_out_h = th;
    s.tile_out_w = tw;
    s.tile_in_h = ((th - 1) * s.down_y + s.fh - 1) / s.up_y + 1;
    s.tile_in_w = ((tw - 1) * s.down_x + s.fw - 1) / s.up_x + 1;
    if (upfirdn2d_buffer_elems(s) * acc_bytes <= max_bytes) return true;
    if (th == 1 && tw == 1) return false;
    if (th >= tw) th /= 2; else tw /= 2;
  }
}

// Where tile (ty, tx) starts: its first output pixel and the first input pixel its taps can reach.
struct TileOrigin {
  int oy0, ox0, iy0, ix0;
};

SGO_HD TileOrigin tile_origin(const UpfirdnShape& s, int ty, int tx) {
  TileOrigin o;
  o.oy0 = ty * s.tile_out_h;
  o.ox0 = tx * s.tile_out_w;
  o.iy0 = ceil_div(o.oy0 * s.down_y - s.pad_y0, s.up_y);
  o.ix0 = ceil_div(o.ox0 * s.down_x - s.pad_x0, s.up_x);
  return o;
}

// sf[t][u] = gain * (the correlation filter): f flipped unless flip_filter; a separable f becomes
// its outer product.
template <typename acc>
SGO_HD void load_filter(acc* sf, const acc* f, const UpfirdnShape& s, acc gain, int tid, int nthreads) {
  for (int i = tid; i < s.fh * s.fw; i += nthreads) {
    const int t = i / s.fw, u = i % s.fw;
    const int ft = s.flip_filter ? t : s.fh - 1 - t;
    const int fu = s.flip_filter ? u : s.fw - 1 - u;
    sf[i] = (s.separable ? f[ft] * f[fu] : f[ft * s.fw + fu]) * gain;
  }
}

// sx[i][j] = x[iy0 + i][ix0 + j] of one plane, or 0 outside the image.
template <typename scalar_t, typename acc>
SGO_HD void load_tile(acc* sx, const scalar_t* x, const UpfirdnShape& s, const TileOrigin& o, int tid, int nthreads) {
  for (int i = tid; i < s.tile_in_h * s.tile_in_w; i += nthreads) {
    const int iy = o.iy0 + i / s.tile_in_w, ix = o.ix0 + i % s.tile_in_w;
    const bool inside = iy >= 0 && iy < s.in_h && ix >= 0 && ix < s.in_w;
    sx[i] = inside ? static_cast<acc>(x[static_cast<int64_t>(iy) * s.in_w + ix]) : acc(0);
  }
}

// The tile's outputs of one plane, from the staged input tile and filter.
template <typename scalar_t, typename acc>
SGO_HD void compute_tile(scalar_t* y, const acc* sx, const acc* sf, const UpfirdnShape& s, const TileOrigin& o,
                         int tid, int nthreads) {
  for (int i = tid; i < s.tile_out_h * s.tile_out_w; i += nthreads) {
    const int oy = o.oy0 + i / s.tile_out_w, ox = o.ox0 + i % s.tile_out_w;
    if (oy >= s.out_h || ox >= s.out_w) continue;
    const int my = oy * s.down_y - s.pad_y0, mx = ox * s.down_x - s.pad_x0;
    const int t0 = pos_mod(-my, s.up_y), u0 = pos_mod(-mx, s.up_x);  // first taps on real samples
    // my + t0 is a multiple of up, so this division is exact even when negative.
    const int ty0 = (my + t0) / s.up_y - o.iy0, tx0 = (mx + u0) / s.up_x - o.ix0;
    acc sum = 0;
    for (int t = t0, ty = ty0; t < s.fh; t += s.up_y, ++ty) {
      const acc* frow = sf + t * s.fw;
      const acc* xrow = sx + ty * s.tile_in_w;
      for (int u = u0, tx = tx0; u < s.fw; u += s.up_x, ++tx) sum += xrow[tx] * frow[u];
    }
    y[static_cast<int64_t>(oy) * s.out_w + ox] = static_cast<scalar_t>(sum);
  }
}

}  // namespace sgo
