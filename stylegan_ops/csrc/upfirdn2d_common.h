// Host-side argument checks of upfirdn2d, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include "host_common.h"
#include "upfirdn2d_tile.h"

namespace sgo {

// Checks the arguments and describes the problem (the tile fields are left to the caller).
// The output is [N, C, (H*up_y + pad_y0 + pad_y1 - fh) / down_y + 1, (W*up_x + pad_x0 + pad_x1 -
// fw) / down_x + 1]; only pad_x0 and pad_y0 matter beyond the output size.
inline UpfirdnShape make_upfirdn2d_shape(const at::Tensor& x, const at::Tensor& f, int64_t up_x, int64_t up_y,
                                         int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1,
                                         int64_t pad_y0, int64_t pad_y1, bool flip_filter) {
  TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be 4-D [N, C, H, W]");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "upfirdn2d: unsupported dtype ", x.scalar_type());
  TORCH_CHECK((f.dim() == 1 || f.dim() == 2) && f.numel() > 0, "upfirdn2d: f must be 1-D or 2-D and non-empty");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: up and down must be >= 1");
  UpfirdnShape s{};
  s.fh = static_cast<int>(f.size(0));
  s.fw = static_cast<int>(f.size(f.dim() - 1));
  const int64_t span_h = x.size(2) * up_y + pad_y0 + pad_y1 - s.fh;
  const int64_t span_w = x.size(3) * up_x + pad_x0 + pad_x1 - s.fw;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "upfirdn2d: the padded input is smaller than the filter");
  s.in_h = static_cast<int>(x.size(2));
  s.in_w = static_cast<int>(x.size(3));
  s.out_h = static_cast<int>(span_h / down_y + 1);
  s.out_w = static_cast<int>(span_w / down_x + 1);
  s.up_x = static_cast<int>(up_x);
  s.up_y = static_cast<int>(up_y);
  s.down_x = static_cast<int>(down_x);
  s.down_y = static_cast<int>(down_y);
  s.pad_x0 = static_cast<int>(pad_x0);
  s.pad_y0 = static_cast<int>(pad_y0);
  s.separable = f.dim() == 1;
  s.flip_filter = flip_filter;
  s.planes = x.size(0) * x.size(1);
  return s;
}

// The filter the kernels read: contiguous, on x's device, in the accumulation type.
inline at::Tensor kernel_filter(const at::Tensor& x, const at::Tensor& f) {
  return f.to(x.device(), x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace sgo
