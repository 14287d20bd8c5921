// The interface between the host code (cuda_ops.cpp, compiled by the host compiler with torch's
// headers) and the kernels (*.cu, compiled by nvcc with no torch headers beyond c10's scalar
// types). Keeping ATen out of nvcc's view cuts the CUDA build time several-fold.
#pragma once

#include <cstdint>

#include "bias_act_math.h"
#include "sgo_common.h"
#include "upfirdn2d_tile.h"

namespace sgo {

// bias_act over n elements in storage order; element i has channel (i / inner) % channels, and
// b (or r) may be null where unused. See bias_act_math.h for act and mode.
// Returns nullptr on success, else the CUDA error message.
template <typename scalar_t>
const char* launch_bias_act(scalar_t* out, const scalar_t* v, const scalar_t* r, const scalar_t* b, int64_t n,
                            int64_t inner, int64_t channels, int act, int mode, Params<acc_t<scalar_t>> p);

// y [planes, out_h, out_w] = upfirdn2d(x [planes, in_h, in_w]) with filter f (fh * fw values, or
// fh for a separable filter, in the accumulation type) scaled by gain; s's tile fields must come
// from choose_upfirdn2d_tile(s, sizeof(acc), kCudaMaxBufferBytes, kCudaMaxTile).
// Returns nullptr on success, else the CUDA error message.
template <typename scalar_t>
const char* launch_upfirdn2d(scalar_t* y, const scalar_t* x, const acc_t<scalar_t>* f, const UpfirdnShape& s,
                             acc_t<scalar_t> gain);

}  // namespace sgo
