// tests/cuda/test_cuda_mlp.cu — the backend-generic MLP field and its training step on the CUDA
// backend, with the bodies of tests/support/backend_mlp_checks.hpp (shared with the Catch2 test
// tests/test_nn_backend.cpp, which runs them with B = Cpu):
//   host part (always): the same bodies with B = Cpu compiled by nvcc's host pass, bit-equal to
//   nn::MLP and train::Trainer (so the host side of the functors nvcc compiles is the CPU's); the
//   device-choice fallback; BackendOps<Cuda> / BackendMLP<float, Cuda> construction errors.
//   device part (with a GPU): nn::BackendMLP<T, Cuda> forward / backward against nn::MLP
//   (normalised MSE <= 1e-7 in fp32, 1e-24 in fp64: the products are cuBLAS's, DESIGN.md §4),
//   a few train::BackendTrainer<float, Cuda> steps (CFM, CFG-CFM, DSM) against train::Trainer
//   (losses and parameters within atol 1e-5 + rtol 1e-4: per-step rounding compounded through
//   Adam), Sgd / Adam / AdamW / Ema / clip_grad_norm on Parameters<float, Cuda> against the same
//   code on the CPU (element-wise rule), device label checks, and sampling through
//   nn::as_field(BackendMLP<float, Cuda>) (plain, conditional, cfg w = 3; Euler, Heun,
//   Euler–Maruyama) against as_field(nn::MLP) on the CPU (atol 1e-5 + rtol 1e-4), and
//   BackendTrainer<float, Cuda>'s checkpoints (an interrupted + resumed run byte-equal to the
//   straight one on the GPU; Trainer's step-5 checkpoint finished on the GPU within the rule;
//   the GPU's final checkpoint loaded by the CPU Trainer exactly); Cfg's set_condition range-
//   checking device labels by a device reduction (the count and the range in the message).
// A part of the one CUDA test program (test_cuda.cu includes it): `test_cuda mlp` runs it, as
// ctest's cuda_mlp. Without a device: prints "SKIPPED" and returns 77 after the host part (ctest:
// skipped).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../support/backend_mlp_checks.hpp"
#include "harness.hpp"

namespace flowdiff::test::cuda_mlp {

namespace fd = flowdiff;
namespace nn = flowdiff::nn;
using fd::Cpu;
using fd::Cuda;
using fd::index_t;

namespace {

using flowdiff::test::cuda_harness::expect;
using flowdiff::test::cuda_harness::section;

template <class T>
std::string str(T v) {
  return fd::detail::concat(v);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// sum (a - b)^2 / sum b^2 after checking that both are finite and b is not all zero (inf if not).
template <class T>
double nmse(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size() || b.empty()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(static_cast<double>(a[i])) || !std::isfinite(static_cast<double>(b[i])))
      return std::numeric_limits<double>::infinity();
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return den > 0 ? num / den : std::numeric_limits<double>::infinity();
}

template <class T>
void expect_nmse(const std::string& what, const std::vector<T>& got, const std::vector<T>& ref,
                 double bound) {
  const double e = nmse(got, ref);
  expect(e <= bound, what + ": normalised MSE " + str(e) + " > " + str(bound));
}

/// |got - ref| <= atol + rtol |ref| everywhere, after the finite / non-zero checks.
template <class T>
void expect_close(const std::string& what, const std::vector<T>& got, const std::vector<T>& ref,
                  double atol, double rtol) {
  if (got.size() != ref.size()) {
    expect(false, what + ": sizes differ (" + str(got.size()) + " vs " + str(ref.size()) + ")");
    return;
  }
  double worst = 0, ref_max = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double a = static_cast<double>(got[i]), b = static_cast<double>(ref[i]);
    if (!std::isfinite(a) || !std::isfinite(b)) {
      expect(false, what + ": non-finite value at " + str(i));
      return;
    }
    ref_max = std::max(ref_max, std::abs(b));
    const double r = std::abs(a - b) / (atol + rtol * std::abs(b));
    if (r > worst) {
      worst = r;
      at = i;
    }
  }
  expect(ref_max > 0, what + ": the reference is all zero");
  expect(worst <= 1, what + ": |got - ref| <= " + str(atol) + " + " + str(rtol) +
                         " |ref| violated by a factor " + str(worst) + " at " + str(at) + " (got " +
                         str(static_cast<double>(got[at])) + ", ref " +
                         str(static_cast<double>(ref[at])) + ")");
}

template <class T>
std::size_t count_equal(const std::vector<T>& a, const std::vector<T>& b) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += a[i] == b[i];
  return n;
}

// ---------------------------------------------------------------------------------------------
// Host part.
// ---------------------------------------------------------------------------------------------

void host_checks() {
  section("BackendMLP<Cpu> under nvcc == nn::MLP", [] {
    for (const auto& c : fd::test::mlp_cases()) {
      const auto ref = fd::test::mlp_reference<float>(c);
      const auto got = fd::test::mlp_on_backend<float, Cpu>(c);
      expect(same_bits(got.out, ref.out) && same_bits(got.grads, ref.grads) &&
                 same_bits(got.dx, ref.dx) && same_bits(got.params, ref.params),
             c.name + ": the host pass of nvcc's functors gives nn::MLP's bits");
    }
  });
  section("BackendTrainer<Cpu> under nvcc == Trainer", [] {
    for (const auto& c : fd::test::train_cases()) {
      const auto ref = fd::test::train_reference<float>(c);
      const auto got = fd::test::train_on_backend<float, Cpu>(c);
      expect(got.losses == ref.losses && same_bits(got.params, ref.params) &&
                 same_bits(got.ema, ref.ema) && got.offset == ref.offset,
             c.name + ": bit-equal losses, parameters, EMA and generator offset");
    }
  });
  section("as_field(BackendMLP<Cpu>) under nvcc", [] {
    for (const auto& c : fd::test::sample_cases()) {
      const auto ref = fd::test::sample_reference<float>(c);
      const auto got = fd::test::sample_on_backend<float, Cpu>(c);
      expect(same_bits(got.x, ref.x) && got.offset == ref.offset && !same_bits(ref.x, ref.x0),
             c.name + ": bit-equal samples and generator offset");
    }
  });
  section("BackendTrainer<Cpu> checkpoints under nvcc", [] {
    const auto r = fd::test::checkpoint_runs<float, Cpu>();
    expect(r.straight.losses.size() == 10 && r.straight_file.size() > 1000,
           "the straight run trained and wrote its checkpoint");
    expect(r.interrupted_step == 5 && r.resumed_first_step == 5 && r.resumed_drawn == 10,
           "interrupted at the step-5 checkpoint, resumed there, the source's position restored");
    expect(same_bits(r.resumed.params, r.straight.params) &&
               same_bits(r.resumed.ema, r.straight.ema) && r.resumed.offset == r.straight.offset &&
               r.resumed_file == r.straight_file && r.resumed_csv == r.straight_csv,
           "resumed == straight bit for bit (parameters, EMA, generator, file, CSV)");
    expect(r.cpu_file == r.straight_file && same_bits(r.from_cpu.params, r.straight.params) &&
               r.cpu_loaded_step == 10 && same_bits(r.cpu_loaded, r.straight.params),
           "Trainer's checkpoint is the same file and loads either way");
    expect(r.wrong_seed.find("trained with seed 99") != std::string::npos &&
               r.bad_every.find("checkpoint_every must be >= 0") != std::string::npos,
           "another seed and a negative checkpoint_every are refused; got: " + r.wrong_seed +
               " / " + r.bad_every);
  });
  section("device choice (host)", [] {
    std::ostringstream log;
    const fd::Device d = fd::cuda::resolve_device(fd::Device::cpu, log);
    expect(d == fd::Device::cpu && log.str().empty(), "--device cpu never asks the runtime");
    std::string why;
    const int n = fd::cuda::device_count(&why);
    const fd::Device e = fd::cuda::resolve_device(fd::Device::cuda, log);
    expect((n > 0) == (e == fd::Device::cuda), "cuda is chosen exactly when a device is present");
    if (n == 0)
      expect(log.str().find("running on the CPU") != std::string::npos &&
                 log.str().find(why) != std::string::npos,
             "the fallback notice names the runtime's reason; got: " + log.str());
  });
}

// ---------------------------------------------------------------------------------------------
// Device part.
// ---------------------------------------------------------------------------------------------

void device_mlp() {
  section("BackendMLP<Cuda> forward / backward", [] {
    for (const auto& c : fd::test::mlp_cases()) {
      const auto ref = fd::test::mlp_reference<float>(c);
      const auto got = fd::test::mlp_on_backend<float, Cuda>(c);
      expect_nmse(c.name + ": u(x, t, y) on the GPU vs nn::MLP", got.out, ref.out, 1e-7);
      expect_nmse(c.name + ": parameter gradients", got.grads, ref.grads, 1e-7);
      if (c.dx) expect_nmse(c.name + ": dx", got.dx, ref.dx, 1e-7);
      expect(same_bits(got.params, ref.params), c.name + ": host -> device -> host is exact");
      std::printf("  %s: %zu of %zu outputs bit-equal to the CPU\n", c.name.c_str(),
                  count_equal(got.out, ref.out), ref.out.size());
    }
    const auto c = fd::test::mlp_cases()[1];
    const auto ref = fd::test::mlp_reference<double>(c);
    const auto got = fd::test::mlp_on_backend<double, Cuda>(c);
    expect_nmse("double: u", got.out, ref.out, 1e-24);
    expect_nmse("double: parameter gradients", got.grads, ref.grads, 1e-24);
    expect_nmse("double: dx", got.dx, ref.dx, 1e-24);
  });
  section("BackendMLP<Cuda> label checks", [] {
    nn::Parameters<float, Cuda> ps;
    nn::BackendMLP<float, Cuda> mlp(
        ps, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 3});
    ps.allocate();
    typename nn::BackendMLP<float, Cuda>::Cache cache;
    auto x = fd::Tensor<float, Cuda>::zeros({5, 2});
    auto t = fd::Tensor<float, Cuda>::zeros({5});
    fd::Tensor<float, Cuda> out({5, 2});
    fd::Tensor<fd::label_t> yh(fd::Shape{5});
    for (index_t i = 0; i < 5; ++i) yh[i] = static_cast<fd::label_t>(2 * i - 1);  // -1 .. 7
    const auto y = fd::to_device(yh);
    std::string m;
    try {
      mlp.forward(ps, x.view(), t.view(), y.view(), out.view(), cache);
    } catch (const fd::config_error& e) {
      m = e.what();
    }
    expect(
        m.find("3 of the 5 labels") != std::string::npos && m.find("[0, 3]") != std::string::npos,
        "device labels outside [0, K] are counted and reported; got: " + m);
  });
}

void device_sampling() {
  section("as_field(BackendMLP<Cuda>) sampling vs CPU", [] {
    for (const auto& c : fd::test::sample_cases()) {
      const auto ref = fd::test::sample_reference<float>(c);
      const auto got = fd::test::sample_on_backend<float, Cuda>(c);
      expect(!same_bits(ref.x, ref.x0), c.name + ": the reference samples moved");
      expect_close(c.name + ": samples after " + str(c.steps) + " steps", got.x, ref.x, 1e-5, 1e-4);
      expect(got.offset == ref.offset, c.name + ": the generator advanced as on the CPU");
      std::printf("  %s: %zu of %zu sample values bit-equal to the CPU\n", c.name.c_str(),
                  count_equal(got.x, ref.x), ref.x.size());
    }
  });
}

void device_labels() {
  section("Cfg::set_condition checks device labels", [] {
    nn::Parameters<float, Cuda> ps;
    nn::BackendMLP<float, Cuda> mlp(
        ps, {.dim = 2, .width = 8, .depth = 1, .time_dim = 4, .num_classes = 3});
    ps.allocate();
    auto g = fd::cfg(nn::as_field(mlp, ps), 3.0f);
    const auto bad = fd::to_device(fd::Tensor<fd::label_t>::from({6}, {0, -1, 4, 3, 9, 2}));
    std::string m;
    try {
      g.set_condition(fd::View<const fd::label_t, Cuda>(bad.view()));
    } catch (const fd::config_error& e) {
      m = e.what();
    }
    expect(m.find("cfg::set_condition: 3 of the 6 labels lie outside [0, 3] (3 is the null "
                  "label)") != std::string::npos,
           "bad device labels are counted and the range named; got: " + m);
    expect(g.batch_size() == 0, "a refused set_condition sets nothing");
    const auto good = fd::to_device(fd::Tensor<fd::label_t>::from({5}, {0, 1, 2, 3, 3}));
    g.set_condition(fd::View<const fd::label_t, Cuda>(good.view()));
    expect(g.batch_size() == 5, "good device labels are accepted");
    // Many blocks of the reduction: the exact count.
    fd::Tensor<fd::label_t> big(fd::Shape{200001});
    for (index_t i = 0; i < big.numel(); ++i) big[i] = static_cast<fd::label_t>(i % 4);
    for (index_t k = 0; k < 17; ++k)
      big[k * 11113 + 5] = k % 2 == 0 ? fd::label_t{4} : fd::label_t{-2};
    const auto bigd = fd::to_device(big);
    m.clear();
    try {
      fd::detail::check_labels_by_count<Cuda>("cfg::set_condition", bigd.view(), 3);
    } catch (const fd::config_error& e) {
      m = e.what();
    }
    expect(m.find("17 of the 200001 labels lie outside [0, 3]") != std::string::npos,
           "the count over 25 reduction blocks is exact; got: " + m);
  });
}

void device_training() {
  section("BackendTrainer<Cuda> vs Trainer (CPU)", [] {
    for (const auto& c : fd::test::train_cases()) {
      const auto ref = fd::test::train_reference<float>(c);
      const auto got = fd::test::train_on_backend<float, Cuda>(c);
      expect_close(c.name + ": losses", got.losses, ref.losses, 1e-5, 1e-4);
      expect_close(c.name + ": gradient norm of the last step", got.norms, ref.norms, 1e-5, 1e-4);
      expect_close(c.name + ": parameters after " + str(c.steps) + " steps", got.params, ref.params,
                   1e-5, 1e-4);
      expect_close(c.name + ": EMA", got.ema, ref.ema, 1e-5, 1e-4);
      expect(got.offset == ref.offset, c.name + ": the generator advanced as on the CPU");
      std::printf("  %s: %zu of %zu parameters bit-equal to the CPU\n", c.name.c_str(),
                  count_equal(got.params, ref.params), ref.params.size());
    }
  });
  section("BackendTrainer<Cuda> checkpoints", [] {
    const auto r = fd::test::checkpoint_runs<float, Cuda>();
    const auto ref = fd::test::checkpoint_runs<float, Cpu>();
    expect(r.straight.losses.size() == 10 && r.straight_file.size() > 1000,
           "the straight run trained and wrote its checkpoint");
    expect(r.interrupted_step == 5 && r.resumed_first_step == 5 && r.resumed_drawn == 10,
           "interrupted at the step-5 checkpoint, resumed there, the source's position restored");
    // The device is deterministic (fixed-order reductions, the same cuBLAS calls): a resumed
    // run should reproduce the straight one on the GPU bit for bit.
    expect(same_bits(r.resumed.params, r.straight.params) &&
               same_bits(r.resumed.ema, r.straight.ema) && r.resumed.offset == r.straight.offset,
           "resumed == straight on the GPU, bit for bit (parameters, EMA, generator)");
    expect(r.resumed_file == r.straight_file,
           "the resumed run's final checkpoint file is the straight run's, byte for byte");
    expect(r.resumed_csv == r.straight_csv, "the loss CSV holds each step once, same losses");
    expect_close("straight run on the GPU vs the CPU: parameters", r.straight.params,
                 ref.straight.params, 1e-5, 1e-4);
    expect_close("Trainer's step-5 checkpoint finished on the GPU: parameters", r.from_cpu.params,
                 ref.straight.params, 1e-5, 1e-4);
    expect_close("... EMA", r.from_cpu.ema, ref.straight.ema, 1e-5, 1e-4);
    expect(r.cpu_loaded_step == 10 && same_bits(r.cpu_loaded, r.straight.params),
           "the GPU's final checkpoint loads into the CPU Trainer exactly");
    expect(r.wrong_seed.find("trained with seed 99") != std::string::npos,
           "resuming with another seed is refused; got: " + r.wrong_seed);
  });
  section("optimizers / EMA / clip on Cuda vs Cpu", [] {
    const auto cpu = fd::test::optim_on_backend<float, Cpu>();
    const auto gpu = fd::test::optim_on_backend<float, Cuda>();
    expect_close("Sgd (momentum 0.9, Nesterov, wd), 3 steps", gpu.sgd, cpu.sgd, 1e-6, 1e-5);
    expect_close("Adam (L2 wd), 3 steps", gpu.adam, cpu.adam, 1e-6, 1e-5);
    expect_close("AdamW, 3 steps", gpu.adamw, cpu.adamw, 1e-6, 1e-5);
    expect_close("Ema after each Adam step", gpu.ema, cpu.ema, 1e-6, 1e-5);
    expect(same_bits(gpu.swapped, gpu.ema), "Ema::swap puts the average into the parameters");
    expect(std::abs(gpu.norm - cpu.norm) <= 1e-6 * cpu.norm,
           "clip_grad_norm's norm: " + str(gpu.norm) + " vs " + str(cpu.norm));
    expect_close("clipped gradients", gpu.clipped, cpu.clipped, 1e-6, 1e-5);
  });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA MLP tests\n");
  host_checks();
  return flowdiff::test::cuda_harness::finish([] {
    device_mlp();
    device_sampling();
    device_labels();
    device_training();
  });
}

}  // namespace flowdiff::test::cuda_mlp
