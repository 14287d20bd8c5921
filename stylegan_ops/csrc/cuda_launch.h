// The interface between the host code (cuda_ops.cpp, compiled by the host compiler with torch's
// headers) and the kernels (*.cu, compiled by nvcc with no torch headers beyond c10's scalar
// types). Keeping ATen out of nvcc's view cuts the CUDA build time several-fold.
#pragma once

#include <cstdint>

#include "bias_act_math.h"

namespace sgo {

// Accumulation type: float for float16 / bfloat16 / float32 tensors, double for float64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// bias_act over n elements in storage order; element i has channel (i / inner) % channels, and
// b (or r) may be null where unused. See bias_act_math.h for act and mode.
// Returns nullptr on success, else the CUDA error message.
template <typename scalar_t>
const char* launch_bias_act(scalar_t* out, const scalar_t* v, const scalar_t* r, const scalar_t* b, int64_t n,
                            int64_t inner, int64_t channels, int act, int mode, Params<acc_t<scalar_t>> p);

struct UpfirdnShape {
  int in_h, in_w, out_h, out_w;
  int up_x, up_y, down_x, down_y, pad_x0, pad_y0;
  int fh, fw;
  bool separable;    // f is 1-D and applies along both axes
  bool flip_filter;  // true: correlate with f as given; false: convolve (correlate with f flipped)
  int tile_out_h, tile_out_w, tile_in_h, tile_in_w;  // set by choose_upfirdn2d_tile
  int64_t planes;    // N * C
};

// Picks the output tile of each CUDA block (filling the tile fields of s) so that its input tile
// and the filter fit in shared memory. Returns false if not even a 1x1 tile fits.
bool choose_upfirdn2d_tile(UpfirdnShape& s, int64_t acc_bytes);

// y [planes, out_h, out_w] = upfirdn2d(x [planes, in_h, in_w]) with filter f (fh * fw values, or
// fh for a separable filter, in the accumulation type) scaled by gain. Returns nullptr on success.
template <typename scalar_t>
const char* launch_upfirdn2d(scalar_t* y, const scalar_t* x, const acc_t<scalar_t>* f, const UpfirdnShape& s,
                             acc_t<scalar_t> gain);

}  // namespace sgo
