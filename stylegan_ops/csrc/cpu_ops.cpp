// Python bindings of the CPU extension. The kernels are in their own files, which include ATen
// only, so the slow-to-compile torch/extension.h is parsed once and in parallel with them.
#include <torch/extension.h>

#include "upfirdn2d_tile.h"

namespace sgo {
at::Tensor bias_act_cpu(const at::Tensor& v, const at::Tensor& b, const at::Tensor& r, int64_t dim, int64_t act,
                        int64_t mode, double alpha, double gain, double clamp);
at::Tensor upfirdn2d_cpu(const at::Tensor& x, const at::Tensor& f, int64_t up_x, int64_t up_y, int64_t down_x,
                         int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1,
                         bool flip_filter, double gain, int64_t max_tile, int64_t max_buffer_bytes);
}  // namespace sgo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("bias_act", &sgo::bias_act_cpu, "Fused bias + activation + gain + clamp and its derivatives (CPU)",
        py::arg("v"), py::arg("b"), py::arg("r"), py::arg("dim"), py::arg("act"), py::arg("mode"), py::arg("alpha"),
        py::arg("gain"), py::arg("clamp"));
  m.def("upfirdn2d", &sgo::upfirdn2d_cpu, "Upsample, pad, FIR filter and downsample in one pass (CPU)",
        py::arg("x"), py::arg("f"), py::arg("up_x"), py::arg("up_y"), py::arg("down_x"), py::arg("down_y"),
        py::arg("pad_x0"), py::arg("pad_x1"), py::arg("pad_y0"), py::arg("pad_y1"), py::arg("flip_filter"),
        py::arg("gain"), py::arg("max_tile") = sgo::kCpuMaxTile, py::arg("max_buffer_bytes") = sgo::kCpuMaxBufferBytes);
  // The CUDA kernel's tiling, for tests that run it through this (same) code on the CPU.
  m.attr("cuda_max_tile") = sgo::kCudaMaxTile;
  m.attr("cuda_max_buffer_bytes") = sgo::kCudaMaxBufferBytes;
}
