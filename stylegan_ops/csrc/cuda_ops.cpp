// Host side of the CUDA extension: argument checks, allocation, dtype dispatch and the Python
// bindings. The kernels live in the .cu files behind cuda_launch.h, so nvcc never parses ATen or
// pybind11 and the slow torch/extension.h is compiled once, by the host compiler.
#include <torch/extension.h>

#include "bias_act_common.h"
#include "cuda_launch.h"
#include "upfirdn2d_common.h"

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

// Same contract as upfirdn2d_cpu (upfirdn2d_cpu.cpp), for CUDA tensors.
at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, int64_t up_x, int64_t up_y, int64_t down_x,
                          int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
                          bool flip_filter, double gain) {
  TORCH_CHECK(x.is_cuda(), "upfirdn2d: x must be a CUDA tensor");
  UpfirdnShape s = make_upfirdn2d_shape(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, flip_filter);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = kernel_filter(x, f);
  TORCH_CHECK(choose_upfirdn2d_tile(s, fc.element_size(), kCudaMaxBufferBytes, kCudaMaxTile), "upfirdn2d: the ", s.fh,
              "x", s.fw, " filter does not fit in shared memory");
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
