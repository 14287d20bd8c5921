// Element-wise math of bias_act, shared by the C++ CPU kernel and the CUDA kernel so the two
// cannot drift apart. Everything here is plain arithmetic on the accumulation type T (float for
// float16/bfloat16/float32 tensors, double for float64).
//
// Notation: z = x + b (pre-activation), a = act(z), y = clamp(a * gain, -clamp, clamp).
// The backward passes express d(y)/d(z) either through z ("Z modes", needs the saved input x) or
// through the saved output y ("Y modes": a = y / gain), which lets autograd keep y, a tensor the
// next layer keeps anyway, instead of an extra copy of x.
#pragma once

#include <math.h>

#include "sgo_common.h"

namespace sgo {

// Must match _ACTIVATIONS[...].code in stylegan_ops/bias_act.py.
enum Act : int { kLinear = 0, kRelu, kLrelu, kTanh, kSigmoid, kElu, kSelu, kSoftplus, kSwish, kNumActs };

// Must match _Mode in stylegan_ops/bias_act.py.
//   kForward: out = clamp(act(v + b) * gain)                     v = x
//   kGradZ:   out = v * dy/dz evaluated at z = r + b             v = incoming gradient, r = x
//   kGrad2Z:  out = v * d(dy/dz)/dz at z = r + b                 (second derivative)
//   kGradY:   out = v * dy/dz expressed through r = y
//   kGrad2Y:  out = v * d(dy/dz)/dy expressed through r = y
enum Mode : int { kForward = 0, kGradZ, kGrad2Z, kGradY, kGrad2Y, kNumModes };

template <typename T>
struct Params {
  T alpha;  // lrelu slope
  T gain;   // output scale
  T clamp;  // < 0: no clamping
};

SGO_HD float sgo_exp(float v) { return expf(v); }
SGO_HD double sgo_exp(double v) { return exp(v); }
SGO_HD float sgo_tanh(float v) { return tanhf(v); }
SGO_HD double sgo_tanh(double v) { return tanh(v); }
SGO_HD float sgo_log1p(float v) { return log1pf(v); }
SGO_HD double sgo_log1p(double v) { return log1p(v); }

template <typename T>
SGO_HD T sgo_sigmoid(T z) { return T(1) / (T(1) + sgo_exp(-z)); }

// SELU constants (Klambauer et al. 2017), the same ones torch.nn.functional.selu uses.
template <typename T> SGO_HD T selu_scale() { return T(1.0507009873554804934193349852946); }
template <typename T> SGO_HD T selu_alpha() { return T(1.6732632423543772848170429916717); }

// torch.nn.functional.softplus switches to the identity above this input, to avoid exp overflow.
template <typename T> SGO_HD T softplus_threshold() { return T(20); }

// a = act(z)
template <int A, typename T>
SGO_HD T act_value(T z, T alpha) {
  switch (A) {
    case kRelu: return z > T(0) ? z : T(0);
    case kLrelu: return z > T(0) ? z : z * alpha;
    case kTanh: return sgo_tanh(z);
    case kSigmoid: return sgo_sigmoid(z);
    case kElu: return z > T(0) ? z : sgo_exp(z) - T(1);
    case kSelu: return z > T(0) ? selu_scale<T>() * z : selu_scale<T>() * selu_alpha<T>() * (sgo_exp(z) - T(1));
    case kSoftplus: return z > softplus_threshold<T>() ? z : sgo_log1p(sgo_exp(z));
    case kSwish: return z * sgo_sigmoid(z);
    default: return z;  // kLinear
  }
}

// da/dz as a function of z.
template <int A, typename T>
SGO_HD T act_d1_z(T z, T alpha) {
  switch (A) {
    case kRelu: return z > T(0) ? T(1) : T(0);
    case kLrelu: return z > T(0) ? T(1) : alpha;
    case kTanh: { const T t = sgo_tanh(z); return T(1) - t * t; }
    case kSigmoid: { const T s = sgo_sigmoid(z); return s * (T(1) - s); }
    case kElu: return z > T(0) ? T(1) : sgo_exp(z);
    case kSelu: return z > T(0) ? selu_scale<T>() : selu_scale<T>() * selu_alpha<T>() * sgo_exp(z);
    case kSoftplus: return z > softplus_threshold<T>() ? T(1) : sgo_sigmoid(z);
    case kSwish: { const T s = sgo_sigmoid(z); return s * (T(1) + z * (T(1) - s)); }
    default: return T(1);
  }
}

// d2a/dz2 as a function of z.
template <int A, typename T>
SGO_HD T act_d2_z(T z, T /*alpha: lrelu is piecewise linear*/) {
  switch (A) {
    case kTanh: { const T t = sgo_tanh(z); return T(-2) * t * (T(1) - t * t); }
    case kSigmoid: { const T s = sgo_sigmoid(z); return s * (T(1) - s) * (T(1) - T(2) * s); }
    case kElu: return z > T(0) ? T(0) : sgo_exp(z);
    case kSelu: return z > T(0) ? T(0) : selu_scale<T>() * selu_alpha<T>() * sgo_exp(z);
    case kSoftplus: { if (z > softplus_threshold<T>()) return T(0); const T s = sgo_sigmoid(z); return s * (T(1) - s); }
    case kSwish: { const T s = sgo_sigmoid(z); return s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s)); }
    default: return T(0);  // piecewise linear activations
  }
}

// da/dz as a function of a = act(z). Only valid for activations the Python side marks invertible
// (not swish; lrelu only with alpha >= 0 so the sign of a tells the branch).
template <int A, typename T>
SGO_HD T act_d1_a(T a, T alpha) {
  switch (A) {
    case kRelu: return a > T(0) ? T(1) : T(0);
    case kLrelu: return a > T(0) ? T(1) : alpha;
    case kTanh: return T(1) - a * a;
    case kSigmoid: return a * (T(1) - a);
    case kElu: return a > T(0) ? T(1) : a + T(1);
    case kSelu: return a > T(0) ? selu_scale<T>() : a + selu_scale<T>() * selu_alpha<T>();
    case kSoftplus: return T(1) - sgo_exp(-a);
    default: return T(1);
  }
}

// d/da of act_d1_a.
template <int A, typename T>
SGO_HD T act_d2_a(T a, T /*alpha*/) {
  switch (A) {
    case kTanh: return T(-2) * a;
    case kSigmoid: return T(1) - T(2) * a;
    case kElu: return a > T(0) ? T(0) : T(1);
    case kSelu: return a > T(0) ? T(0) : T(1);
    case kSoftplus: return sgo_exp(-a);
    default: return T(0);
  }
}

// One output element. `v` is x (forward) or the incoming gradient; `r` is the saved reference
// (x in the Z modes, y in the Y modes; unused in kForward); `bias` is the bias of v's channel.
template <int A, int M, typename T>
SGO_HD T bias_act_element(T v, T r, T bias, const Params<T>& p) {
  const bool clamped = p.clamp >= T(0);
  if (M == kForward) {
    T y = act_value<A>(v + bias, p.alpha) * p.gain;
    // Written with comparisons (not fmin/fmax) so that NaN propagates like torch.clamp.
    if (clamped) y = y > p.clamp ? p.clamp : (y < -p.clamp ? -p.clamp : y);
    return y;
  }
  if (M == kGradZ || M == kGrad2Z) {
    const T z = r + bias;
    // Inclusive bound, like the gradient of torch.clamp in the reference path.
    if (clamped) {
      const T y = act_value<A>(z, p.alpha) * p.gain;
      if (!(y >= -p.clamp && y <= p.clamp)) return T(0);
    }
    const T d = (M == kGradZ) ? act_d1_z<A>(z, p.alpha) : act_d2_z<A>(z, p.alpha);
    return v * d * p.gain;
  }
  // Y modes. A saved y on the clamp bound cannot tell "clamped" from "exactly on it"; treat it as
  // clamped (a measure-zero set, where any subgradient is fine).
  if (clamped && !(r > -p.clamp && r < p.clamp)) return T(0);
  const T a = r / p.gain;  // the caller never uses Y modes with gain == 0
  if (M == kGradY) return v * act_d1_a<A>(a, p.alpha) * p.gain;
  return v * act_d2_a<A>(a, p.alpha);  // d/dy [gain * d1(y / gain)] = d2(a)
}

// The bias channel (i / inner) % channels of the indices i = start, start + stride, ... of a
// grid-stride loop, kept up to date by additions: a 64-bit division per element would cost more
// than the rest of the element's work.
struct ChannelWalker {
  int64_t inner, channels;
  int64_t rem;      // i % inner
  int64_t channel;  // (i / inner) % channels
  int64_t step_rem, step_channel;  // the same for stride

  SGO_HD ChannelWalker(int64_t start, int64_t stride, int64_t inner_, int64_t channels_)
      : inner(inner_), channels(channels_), rem(start % inner_), channel((start / inner_) % channels_),
        step_rem(stride % inner_), step_channel((stride / inner_) % channels_) {}

  // i += stride. rem + step_rem < 2 * inner carries at most once into the quotient, and
  // channel + step_channel + carry < 2 * channels wraps at most once.
  SGO_HD void advance() {
    rem += step_rem;
    channel += step_channel;
    if (rem >= inner) {
      rem -= inner;
      ++channel;
    }
    if (channel >= channels) channel -= channels;
  }
};

// Calls f(std::integral_constant-like tag) with the activation / mode as a compile-time constant,
// so that loops can be instantiated per activation and mode without a branch per element.
template <int V> struct Tag { static constexpr int value = V; };

template <typename F>
SGO_HD void with_act(int act, F&& f) {
  switch (act) {
    case kRelu: f(Tag<kRelu>()); break;
    case kLrelu: f(Tag<kLrelu>()); break;
    case kTanh: f(Tag<kTanh>()); break;
    case kSigmoid: f(Tag<kSigmoid>()); break;
    case kElu: f(Tag<kElu>()); break;
    case kSelu: f(Tag<kSelu>()); break;
    case kSoftplus: f(Tag<kSoftplus>()); break;
    case kSwish: f(Tag<kSwish>()); break;
    default: f(Tag<kLinear>()); break;
  }
}

template <typename F>
SGO_HD void with_mode(int mode, F&& f) {
  switch (mode) {
    case kGradZ: f(Tag<kGradZ>()); break;
    case kGrad2Z: f(Tag<kGrad2Z>()); break;
    case kGradY: f(Tag<kGradY>()); break;
    case kGrad2Y: f(Tag<kGrad2Y>()); break;
    default: f(Tag<kForward>()); break;
  }
}

}  // namespace sgo
