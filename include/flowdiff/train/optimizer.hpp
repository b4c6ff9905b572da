// flowdiff/train/optimizer.hpp — SGD (momentum, Nesterov), Adam and AdamW over the flat buffers
// of nn::Parameters, with PyTorch's exact update rules (torch.optim, single-tensor path), one pass
// over memory per step and state allocated once on the first step. With g the gradient, p the
// parameter, t the 1-based step:
//   SGD:   g += wd p;  b = g (t = 1) or b = mu b + (1 - dampening) g;  d = nesterov ? g + mu b : b;
//          p -= lr d                                                   (d = g when mu = 0)
//   Adam:  g += wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//          p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (eps outside the sqrt,
//          after the bias correction, as PyTorch)
//   AdamW: p *= 1 - lr wd (decoupled decay, before the moments), then Adam without wd.
// Padding entries of the flat buffers are zero in p and g and stay zero under every rule. Buffers
// (Parameters::add_buffer, e.g. BatchNorm running statistics) lie after the trainable prefix
// [0, trainable_size()) and are never touched: no weight decay, no update.
// State (momentum / moments and the step count) is saved and loaded per parameter name through
// safetensors, so a resumed run continues bit for bit (state on a device backend is downloaded to
// write it and uploaded after loading: nn::add_tensor / nn::load_into).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/safetensors.hpp"
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::train {

struct SgdOptions {
  double lr = 1e-3;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;  // L2 penalty added to the gradient (coupled), as torch.optim.Adam
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // decoupled: p *= 1 - lr wd (torch.optim.AdamW's default 1e-2)
};

namespace detail {

// Named functors rather than lambdas: they run on the host and, under nvcc, on the device, and a
// named type sidesteps nvcc's restrictions on extended lambdas inside class members.

template <class T>
struct SgdKernel {
  T* p;
  const T* g;
  T* buf;  // null without momentum
  T lr, wd, mu, one_minus_dampening;
  bool first, nesterov;
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    T d = g[i];
    if (wd != T(0)) d = d + wd * p[i];
    if (buf != nullptr) {
      const T b = first ? d : buf[i] * mu + one_minus_dampening * d;
      buf[i] = b;
      d = nesterov ? d + mu * b : b;
    }
    p[i] = p[i] + (-lr) * d;
  }
};

template <class T>
struct AdamKernel {
  T* p;
  const T* g;
  T* m;
  T* v;
  T beta1, one_minus_beta1, beta2, one_minus_beta2;
  T coupled_wd;      // Adam: g += wd p
  T param_scale;     // AdamW: p *= 1 - lr wd (1 for Adam)
  T bias2_sqrt;      // sqrt(1 - b2^t)
  T eps;
  T neg_step_size;   // -lr / (1 - b1^t)
  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    T param = p[i];
    T grad = g[i];
    if (coupled_wd != T(0)) grad = grad + coupled_wd * param;
    if (param_scale != T(1)) param = param * param_scale;
    const T mi = m[i] * beta1 + one_minus_beta1 * grad;
    const T vi = v[i] * beta2 + one_minus_beta2 * (grad * grad);
    m[i] = mi;
    v[i] = vi;
    const T denom = sqrt_(vi) / bias2_sqrt + eps;
    p[i] = param + neg_step_size * mi / denom;
  }
  static FLOWDIFF_HOST_DEVICE T sqrt_(T x) {
    using std::sqrt;
    return sqrt(x);
  }
};

inline void check_hyper(std::string_view who, std::string_view what, double value, double lo,
                        bool lo_open, double hi = INFINITY, bool hi_open = true) {
  const bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) &&
                  (hi_open ? value < hi : value <= hi);
  require<config_error>(ok, who, ": ", what, " must lie in ", lo_open ? "(" : "[", lo, ", ", hi,
                        hi_open ? ")" : "]", ", got ", value);
}

/// Checks that `t` was built for `ps` (state sized once, on the first step).
template <class T, Backend B>
void check_state(std::string_view who, const Tensor<T, B>& t, const nn::Parameters<T, B>& ps) {
  require<config_error>(t.numel() == ps.flat_size(), who, ": optimizer state has ", t.numel(),
                        " entries but the parameters' flat buffers have ", ps.flat_size(),
                        "; use one optimizer per parameter set");
}

/// Writes each parameter's slice of a flat state buffer as "<prefix><state>.<param name>".
template <class T, Backend B>
void add_state(io::SafetensorsWriter& w, const nn::Parameters<T, B>& ps, const Tensor<T, B>& flat,
               const std::string& key) {
  for (const auto& e : ps.entries())
    nn::add_tensor<T, B>(w, key + "." + e.name,
                         flat.view().flat().rows(e.offset, e.offset + e.numel()).reshape(e.shape));
}

template <class T, Backend B>
void load_state(const io::SafetensorsFile& f, const nn::Parameters<T, B>& ps, Tensor<T, B>& flat,
                const std::string& key) {
  Tensor<T, B> fresh = Tensor<T, B>::zeros(Shape{ps.flat_size()});  // padding stays zero
  for (const auto& e : ps.entries())
    nn::load_into(f, key + "." + e.name, fresh.view().rows(e.offset, e.offset + e.numel()).reshape(e.shape));
  flat = std::move(fresh);
}

inline void add_step(io::SafetensorsWriter& w, const std::string& prefix, std::int64_t step) {
  const Tensor<std::int64_t> s = Tensor<std::int64_t>::from(Shape{1}, {step});
  w.add(prefix + "step", s.view());
}

inline std::int64_t load_step(const io::SafetensorsFile& f, const std::string& prefix) {
  const Tensor<std::int64_t> s = nn::load_checked<std::int64_t>(f, prefix + "step", Shape{1});
  require<io_error>(s[0] >= 0, f.source(), ": tensor '", prefix, "step' holds a negative step ", s[0]);
  return s[0];
}

}  // namespace detail

/// Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and L2 weight
/// decay, exactly as torch.optim.SGD (the first step copies the gradient into the buffer).
template <class T = float, Backend B = Cpu>
class Sgd {
 public:
  explicit Sgd(SgdOptions o = {}) : o_(o) {
    detail::check_hyper("Sgd", "lr", o.lr, 0, false);
    detail::check_hyper("Sgd", "momentum", o.momentum, 0, false);
    detail::check_hyper("Sgd", "dampening", o.dampening, 0, false, 1, false);
    detail::check_hyper("Sgd", "weight_decay", o.weight_decay, 0, false);
    require<config_error>(!o.nesterov || (o.momentum > 0 && o.dampening == 0),
                          "Sgd: nesterov needs momentum > 0 and dampening = 0, got momentum ",
                          o.momentum, " and dampening ", o.dampening);
  }

  /// One update of every parameter from its gradient.
  void step(nn::Parameters<T, B>& ps) {
    const bool momentum = o_.momentum != 0;
    if (momentum && buf_.numel() == 0) buf_ = Tensor<T, B>::zeros(Shape{ps.flat_size()});
    if (momentum) detail::check_state("Sgd", buf_, ps);
    const detail::SgdKernel<T> k{ps.flat_params().data(), ps.flat_grads().data(),
                                 momentum ? buf_.data() : nullptr, static_cast<T>(o_.lr),
                                 static_cast<T>(o_.weight_decay), static_cast<T>(o_.momentum),
                                 static_cast<T>(1 - o_.dampening), step_ == 0, o_.nesterov};
    B::parallel_for(ps.trainable_size(), k);  // buffers lie after the trainable prefix
    ++step_;
  }

  double lr() const { return o_.lr; }
  /// Sets the learning rate for the next steps (schedules call this each step).
  void set_lr(double lr) {
    detail::check_hyper("Sgd", "lr", lr, 0, false);
    o_.lr = lr;
  }
  const SgdOptions& options() const { return o_; }
  /// Number of steps taken.
  std::int64_t steps() const { return step_; }

  /// Adds the state ("<prefix>momentum_buffer.<name>" per parameter, "<prefix>step") to `w`.
  void save_state(io::SafetensorsWriter& w, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "optimizer.") const {
    detail::add_step(w, prefix, step_);
    if (o_.momentum != 0 && step_ > 0) {
      detail::check_state("Sgd", buf_, ps);
      detail::add_state(w, ps, buf_, prefix + "momentum_buffer");
    }
  }
  void load_state(const io::SafetensorsFile& f, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "optimizer.") {
    const std::int64_t s = detail::load_step(f, prefix);
    if (o_.momentum != 0 && s > 0) detail::load_state(f, ps, buf_, prefix + "momentum_buffer");
    step_ = s;
  }

 private:
  SgdOptions o_;
  Tensor<T, B> buf_;
  std::int64_t step_ = 0;
};

namespace detail {

/// Adam and AdamW share everything but where the weight decay enters.
template <class T, Backend B>
class AdamCore {
 public:
  void step(nn::Parameters<T, B>& ps) {
    if (m_.numel() == 0) {
      m_ = Tensor<T, B>::zeros(Shape{ps.flat_size()});
      v_ = Tensor<T, B>::zeros(Shape{ps.flat_size()});
    }
    check_state(name_, m_, ps);
    ++step_;
    // Scalars in double, as PyTorch computes them in Python, then rounded to T once.
    const double t = static_cast<double>(step_);
    const double bias1 = 1 - std::pow(o_.beta1, t);
    const double bias2 = 1 - std::pow(o_.beta2, t);
    const AdamKernel<T> k{ps.flat_params().data(),
                          ps.flat_grads().data(),
                          m_.data(),
                          v_.data(),
                          static_cast<T>(o_.beta1),
                          static_cast<T>(1 - o_.beta1),
                          static_cast<T>(o_.beta2),
                          static_cast<T>(1 - o_.beta2),
                          static_cast<T>(decoupled_ ? 0.0 : o_.weight_decay),
                          static_cast<T>(decoupled_ ? 1 - o_.lr * o_.weight_decay : 1.0),
                          static_cast<T>(std::sqrt(bias2)),
                          static_cast<T>(o_.eps),
                          static_cast<T>(-(o_.lr / bias1))};
    B::parallel_for(ps.trainable_size(), k);  // buffers lie after the trainable prefix
  }

  double lr() const { return o_.lr; }
  void set_lr(double lr) {
    check_hyper(name_, "lr", lr, 0, false);
    o_.lr = lr;
  }
  const AdamOptions& options() const { return o_; }
  std::int64_t steps() const { return step_; }

  /// Adds "<prefix>exp_avg.<name>", "<prefix>exp_avg_sq.<name>" (PyTorch's state names) and
  /// "<prefix>step" to `w`.
  void save_state(io::SafetensorsWriter& w, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "optimizer.") const {
    add_step(w, prefix, step_);
    if (step_ == 0) return;
    check_state(name_, m_, ps);
    add_state(w, ps, m_, prefix + "exp_avg");
    add_state(w, ps, v_, prefix + "exp_avg_sq");
  }
  void load_state(const io::SafetensorsFile& f, const nn::Parameters<T, B>& ps,
                  const std::string& prefix = "optimizer.") {
    const std::int64_t s = load_step(f, prefix);
    if (s > 0) {
      Tensor<T, B> m, v;
      detail::load_state(f, ps, m, prefix + "exp_avg");
      detail::load_state(f, ps, v, prefix + "exp_avg_sq");
      m_ = std::move(m);
      v_ = std::move(v);
    } else {
      m_ = Tensor<T, B>();
      v_ = Tensor<T, B>();
    }
    step_ = s;
  }

 protected:
  AdamCore(const char* name, AdamOptions o, bool decoupled) : name_(name), o_(o), decoupled_(decoupled) {
    check_hyper(name, "lr", o.lr, 0, false);
    check_hyper(name, "beta1", o.beta1, 0, false, 1, true);
    check_hyper(name, "beta2", o.beta2, 0, false, 1, true);
    check_hyper(name, "eps", o.eps, 0, false);
    check_hyper(name, "weight_decay", o.weight_decay, 0, false);
  }

 private:
  const char* name_;
  AdamOptions o_;
  bool decoupled_;
  Tensor<T, B> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace detail

/// torch.optim.Adam (amsgrad = false): L2 weight decay added to the gradient.
template <class T = float, Backend B = Cpu>
class Adam : public detail::AdamCore<T, B> {
 public:
  explicit Adam(AdamOptions o = {}) : detail::AdamCore<T, B>("Adam", o, false) {}
};

/// torch.optim.AdamW (amsgrad = false): decoupled weight decay p *= 1 - lr wd before the update.
template <class T = float, Backend B = Cpu>
class AdamW : public detail::AdamCore<T, B> {
 public:
  explicit AdamW(AdamWOptions o = {})
      : detail::AdamCore<T, B>("AdamW", AdamOptions{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay}, true) {}
};

}  // namespace flowdiff::train
