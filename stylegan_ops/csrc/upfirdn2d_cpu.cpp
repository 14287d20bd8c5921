// upfirdn2d on the CPU: the shared tile algorithm (upfirdn2d_tile.h) with one task per output
// tile and image plane. It exists because it runs exactly the CUDA kernel's code, so that the
// tests check that code on machines without a GPU. It is not the fast CPU path: in
// benchmarks/ops.py it beats the reference (a strided depthwise conv2d) only for upsampling and
// loses for filtering, so impl='auto' keeps the reference on the CPU; impl='cpu' runs this.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "upfirdn2d_common.h"

namespace sgo {
namespace {

constexpr int64_t kGrainMacs = 1 << 16;

}  // namespace

// x: [N, C, H, W]; f: [fh, fw], or [k] for a separable filter (used in float32, float64 for
// float64 x). Returns [N, C, (H*up_y + pad_y0 + pad_y1 - fh) / down_y + 1,
// (W*up_x + pad_x0 + pad_x1 - fw) / down_x + 1], contiguous, scaled by gain (the whole 2-D gain).
// Tiles are at most max_tile square with a buffer of at most max_buffer_bytes; tests pass the CUDA
// kernel's limits (or tiny ones) to run its exact tiling here.
at::Tensor upfirdn2d_cpu(const at::Tensor& x, const at::Tensor& f, int64_t up_x, int64_t up_y, int64_t down_x,
                         int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
                         bool flip_filter, double gain, int64_t max_tile, int64_t max_buffer_bytes) {
  TORCH_CHECK(x.device().is_cpu(), "upfirdn2d: x must be a CPU tensor");
  UpfirdnShape s = make_upfirdn2d_shape(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, flip_filter);
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = kernel_filter(x, f);
  TORCH_CHECK(max_tile >= 1, "upfirdn2d: max_tile must be >= 1");
  TORCH_CHECK(choose_upfirdn2d_tile(s, fc.element_size(), max_buffer_bytes, static_cast<int>(max_tile)),
              "upfirdn2d: the ", s.fh, "x", s.fw, " filter is too large");
  at::Tensor y = at::empty({x.size(0), x.size(1), s.out_h, s.out_w}, xc.options());
  if (y.numel() == 0) return y;
  const int tiles_y = static_cast<int>(ceil_div64(s.out_h, s.tile_out_h));
  const int tiles_x = static_cast<int>(ceil_div64(s.out_w, s.tile_out_w));
  const int64_t tiles = static_cast<int64_t>(tiles_y) * tiles_x;
  // Tasks per parallel chunk: enough multiply-adds that small calls (gradcheck, 4x4 layers) run
  // on the calling thread instead of paying for a parallel region.
  const int64_t macs_per_task = static_cast<int64_t>(s.tile_out_h) * s.tile_out_w * s.fh * s.fw / (s.up_x * s.up_y) + 1;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / macs_per_task);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc* fp = fc.data_ptr<acc>();
    at::parallel_for(0, s.planes * tiles, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> buffer(static_cast<size_t>(upfirdn2d_buffer_elems(s)));
      acc* sf = buffer.data();
      acc* sx = sf + s.fh * s.fw;
      load_filter(sf, fp, s, static_cast<acc>(gain), 0, 1);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t plane = task / tiles;
        const int tile = static_cast<int>(task % tiles);
        const TileOrigin o = tile_origin(s, tile / tiles_x, tile % tiles_x);
        load_tile(sx, xp + plane * s.in_h * s.in_w, s, o, 0, 1);
        compute_tile(yp + plane * s.out_h * s.out_w, sx, sf, s, o, 0, 1);
      }
    });
  });
  return y;
}

}  // namespace sgo
