// Fused bias + activation + gain + clamp on the CPU: one pass over memory where the reference
// path makes three to five (add, activation, multiply, clamp), each allocating a temporary.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "bias_act_common.h"

namespace sgo {
namespace {

// Rows shorter than this are grouped so that a parallel chunk amortises its scheduling cost.
constexpr int64_t kGrainElements = 32768;

// One contiguous run of `n` elements. With kBiasPerElement the bias varies along the run (bias dim
// is the fastest-varying one); otherwise the whole run shares `bias`. Both forms keep the inner loop
// free of index arithmetic so the compiler can vectorise it.
template <int A, int M, bool kBiasPerElement, typename scalar_t, typename acc>
inline void run_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ v, const scalar_t* __restrict__ r,
                    const scalar_t* __restrict__ b_row, acc bias, int64_t n, const Params<acc> p) {
  // p by value and restrict-qualified pointers: otherwise the compiler must assume that writing
  // out[j] may change p or the inputs, reloads them every element and gives up vectorising.
  for (int64_t j = 0; j < n; ++j) {
    const acc bj = kBiasPerElement ? static_cast<acc>(b_row[j]) : bias;
    const acc rj = (M == kForward) ? acc(0) : static_cast<acc>(r[j]);
    out[j] = static_cast<scalar_t>(bias_act_element<A, M>(static_cast<acc>(v[j]), rj, bj, p));
  }
}

template <int A, int M, typename scalar_t>
void run(at::Tensor& out, const BiasActInputs& in, const Params<acc_t<scalar_t>>& p) {
  using acc = acc_t<scalar_t>;
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* v = in.v.data_ptr<scalar_t>();
  const scalar_t* r = in.r.defined() ? in.r.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = in.b.defined() ? in.b.data_ptr<scalar_t>() : nullptr;
  const int64_t numel = in.v.numel();
  if (b == nullptr || in.channels == 1) {  // one bias (or none) for everything: split evenly
    const acc bias = b ? static_cast<acc>(b[0]) : acc(0);
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      run_row<A, M, false, scalar_t, acc>(o + begin, v + begin, r ? r + begin : nullptr, nullptr, bias, end - begin, p);
    });
    return;
  }
  // Storage viewed as [outer, channels, inner]; a row is one run with a single bias, or, when the
  // bias dim is the fastest-varying one (inner == 1), one run over all channels.
  const bool per_element = in.inner == 1;
  const int64_t row_len = per_element ? in.channels : in.inner;
  const int64_t rows = numel / row_len;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / row_len);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * row_len;
      const scalar_t* r_row = r ? r + off : nullptr;
      if (per_element) {
        run_row<A, M, true>(o + off, v + off, r_row, b, acc(0), row_len, p);
      } else {
        const acc bias = static_cast<acc>(b[row % in.channels]);
        run_row<A, M, false, scalar_t, acc>(o + off, v + off, r_row, nullptr, bias, row_len, p);
      }
    }
  });
}

}  // namespace

// v: x (mode 0) or the incoming gradient; b: bias [v.size(dim)] or empty; r: the saved x or y
// (modes 1-4) or empty. Returns a tensor shaped and strided like v (see bias_act_math.h for modes).
at::Tensor bias_act_cpu(const at::Tensor& v, const at::Tensor& b, const at::Tensor& r, int64_t dim,
                        int64_t act, int64_t mode, double alpha, double gain, double clamp) {
  const BiasActInputs in = prepare_bias_act(v, b, r, dim, act, mode, at::kCPU);
  at::Tensor out = at::empty_like(in.v);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v.scalar_type(), "bias_act_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const Params<acc> p{static_cast<acc>(alpha), static_cast<acc>(gain), static_cast<acc>(clamp)};
    with_act(static_cast<int>(act), [&](auto a_tag) {
      with_mode(static_cast<int>(mode), [&](auto m_tag) {
        run<decltype(a_tag)::value, decltype(m_tag)::value, scalar_t>(out, in, p);
      });
    });
  });
  return out;
}

}  // namespace sgo
