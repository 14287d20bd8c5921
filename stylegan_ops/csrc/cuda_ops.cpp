// Host side of the CUDA extension: argument checks, allocation, dtype dispatch and the Python
// bindings. The kernels live in the .cu files behind cuda_launch.h, so nvcc never parses ATen or
// pybind11 and the slow torch/extension.h is compiled once, by the host compiler.
#include <torch/extension.h>

#include "bias_act_common.h"
#include "cuda_launch.h"

namespace sgo {
namespace {

void check_launch(const char* error, const char* op) { TORCH_CHECK(error == nullptr, op, ": CUDA error: ", error); }

// Same contract as bias_act_cpu (bias_act_cpu.cpp), for CUDA tensors.
at::Tensor bias_act_cuda(const at::Tensor& v, const at::Tensor& b, const at::Tensor& r, int64_t dim, int64_t act,
                         int64_t mode, double alpha, double gain, double clamp) {
  const BiasActInputs in = prepare_bias_act(v, b, r, dim, act, mode, at::kCUDA);
  const c10::DeviceGuard guard(in.v.device());
  at::Tensor out = at::empty_like(in.v);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v.scalar_type(), "bias_act_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const Params<acc> p{static_cast<acc>(alpha), static_cast<acc>(gain), static_cast<acc>(clamp)};
    check_launch(launch_bias_act<scalar_t>(out.data_ptr<scalar_t>(), in.v.data_ptr<scalar_t>(),
                                           in.r.defined() ? in.r.data_ptr<scalar_t>() : nullptr,
                                           in.b.defined() ? in.b.data_ptr<scalar_t>() : nullptr, out.numel(), in.inner,
                                           in.channels, static_cast<int>(act), static_cast<int>(mode), p),
                 "bias_act");
  });
  return out;
}

// x: [N, C, H, W]; f: [fh, fw], or [k] for a separable filter (converted to float32, or float64
// for float64 x). Returns [N, C, (H*up_y + pad_y0 + pad_y1 - fh) / down_y + 1,
// (W*up_x + pad_x0 + pad_x1 - fw) / down_x + 1], contiguous, scaled by gain (the whole 2-D gain).
at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, int64_t up_x, int64_t up_y, int64_t down_x,
                          int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
                          bool flip_filter, double gain) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "upfirdn2d: x must be a 4-D CUDA tensor");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "upfirdn2d: unsupported dtype ", x.scalar_type());
  TORCH_CHECK((f.dim() == 1 || f.dim() == 2) && f.numel() > 0, "upfirdn2d: f must be 1-D or 2-D and non-empty");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: up and down must be >= 1");
  const c10::DeviceGuard guard(x.device());
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = f.to(x.device(), acc_type).contiguous();

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
  TORCH_CHECK(choose_upfirdn2d_tile(s, at::elementSize(acc_type)), "upfirdn2d: the ", s.fh, "x", s.fw,
              " filter does not fit in shared memory");

  at::Tensor y = at::empty({x.size(0), x.size(1), s.out_h, s.out_w}, xc.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cuda", [&] {
    using acc = acc_t<scalar_t>;
    check_launch(launch_upfirdn2d<scalar_t>(y.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), fc.data_ptr<acc>(), s,
                                            static_cast<acc>(gain)),
                 "upfirdn2d");
  });
  return y;
}

}  // namespace
}  // namespace sgo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("bias_act", &sgo::bias_act_cuda, "Fused bias + activation + gain + clamp and its derivatives (CUDA)",
        py::arg("v"), py::arg("b"), py::arg("r"), py::arg("dim"), py::arg("act"), py::arg("mode"), py::arg("alpha"),
        py::arg("gain"), py::arg("clamp"));
  m.def("upfirdn2d", &sgo::upfirdn2d_cuda, "Upsample, pad, FIR filter and downsample in one pass (CUDA)",
        py::arg("x"), py::arg("f"), py::arg("up_x"), py::arg("up_y"), py::arg("down_x"), py::arg("down_y"),
        py::arg("pad_x0"), py::arg("pad_x1"), py::arg("pad_y0"), py::arg("pad_y1"), py::arg("flip_filter"),
        py::arg("gain"));
}
