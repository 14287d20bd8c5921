// Host-side argument checks and layout handling of bias_act, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "bias_act_math.h"
#include "host_common.h"

namespace sgo {

// The tensors a bias_act kernel reads, in one common dense layout, plus where the channel index of
// a storage offset comes from: element i (in storage order) belongs to channel (i / inner) % channels.
// This holds for every non-overlapping dense layout (contiguous, channels_last, ...), so such inputs
// are processed in place of a copy, and the output keeps their memory format.
struct BiasActInputs {
  at::Tensor v;  // x (forward) or the incoming gradient, non-overlapping and dense
  at::Tensor r;  // saved reference with v's strides, or undefined in the forward mode
  at::Tensor b;  // contiguous bias, or undefined
  int64_t channels = 1;
  int64_t inner = 1;
};

// A tensor with exactly `like`'s strides holding `t`'s values (no copy when they already match).
inline at::Tensor with_strides_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

inline BiasActInputs prepare_bias_act(const at::Tensor& v, const at::Tensor& b, const at::Tensor& r,
                                      int64_t dim, int64_t act, int64_t mode, at::DeviceType device) {
  TORCH_CHECK(v.device().type() == device, "bias_act: x is on ", v.device(), ", this kernel runs on ", device);
  TORCH_CHECK(is_kernel_dtype(v.scalar_type()), "bias_act: unsupported dtype ", v.scalar_type());
  TORCH_CHECK(dim >= 0 && dim < std::max<int64_t>(v.dim(), 1), "bias_act: dim ", dim, " out of range for ", v.dim(), "-D x");
  TORCH_CHECK(act >= 0 && act < kNumActs, "bias_act: unknown activation code ", act);
  TORCH_CHECK(mode >= 0 && mode < kNumModes, "bias_act: unknown mode ", mode);
  BiasActInputs in;
  in.v = v.is_non_overlapping_and_dense() ? v : v.contiguous();
  if (b.defined() && b.numel() > 0) {
    TORCH_CHECK(b.dim() == 1 && b.numel() == v.size(dim), "bias_act: b must have shape [", v.size(dim), "]");
    TORCH_CHECK(b.scalar_type() == v.scalar_type() && b.device() == v.device(), "bias_act: b must match x in dtype and device");
    in.b = b.contiguous();
    if (v.size(dim) > 1) {
      in.channels = v.size(dim);
      in.inner = in.v.stride(dim);
    }
  }
  if (mode != kForward) {
    TORCH_CHECK(r.sizes() == v.sizes(), "bias_act: the saved reference must have x's shape");
    TORCH_CHECK(r.scalar_type() == v.scalar_type() && r.device() == v.device(), "bias_act: the saved reference must match x in dtype and device");
    in.r = with_strides_of(r, in.v);
  }
  return in;
}

}  // namespace sgo
