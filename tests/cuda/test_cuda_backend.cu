// tests/cuda/test_cuda_backend.cu — the CUDA backend against its CPU reference, kernel by kernel,
// with DESIGN.md §4's tolerances: error conversion, device tensors and copies, the grid-stride
// parallel_for running the CPU's functors, the deterministic sum, segment_reduce (a block per
// segment, against its host reference), Philox fills (integer streams
// and uniforms bit-equal to the CPU, normals within a few ulp), cuBLAS GEMM (plain and strided-
// batched, row-major like the CPU gemm) and the fused CFG + Euler / Euler–Maruyama updates (against
// the CPU's Cfg adapter and steppers, against the same generic path running on the GPU, and as
// integrate() picks them by itself under Cfg) and log-likelihoods (the augmented reverse ODE with
// each divergence, against the CPU and the closed form).
// A part of the one CUDA test program (test_cuda.cu includes it; `test_cuda backend` runs it,
// ctest's cuda_backend). The checks that need no GPU (error messages, the device query) always
// run. Without a device the part then prints "SKIPPED" and returns 77, which ctest reports as
// skipped; 0: all passed, 1: a check failed (each failure is printed with what was compared and by
// how much).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <flowdiff/guidance/cfg.hpp>
#include <flowdiff/nn/layers/kernels.hpp>
#include <flowdiff/nn/layers/spatial_kernels.hpp>
#include <flowdiff/samplers/adaptive.hpp>
#include <flowdiff/samplers/dpm_solver.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <flowdiff/samplers/integrate.hpp>
#include <flowdiff/samplers/likelihood.hpp>
#include <flowdiff/samplers/ode.hpp>
#include <flowdiff/samplers/sde.hpp>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.hpp"

namespace flowdiff::test::cuda_backend {

namespace fd = flowdiff;
using fd::Cpu;
using fd::Cuda;
using fd::index_t;

namespace {

// ---------------------------------------------------------------------------------------------
// A minimal harness: every check prints on failure; main returns 1 if any failed.
// ---------------------------------------------------------------------------------------------

using flowdiff::test::cuda_harness::expect;
using flowdiff::test::cuda_harness::section;

/// Runs f and reports whether it threw E with a message containing every one of `parts`.
template <class E, class F>
bool throws_with(F&& f, std::initializer_list<const char*> parts, std::string* message = nullptr) {
  try {
    f();
  } catch (const E& e) {
    const std::string m = e.what();
    if (message != nullptr) *message = m;
    for (const char* p : parts)
      if (m.find(p) == std::string::npos) return false;
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

template <class T>
std::string str(T v) {
  return fd::detail::concat(v);
}

/// Element-wise rule |a - b| <= atol + rtol |ref|, after checking both are finite and the
/// reference is not trivially zero. Returns the largest violation ratio (<= 1 passes).
template <class T>
double elementwise_ratio(const std::vector<T>& got, const std::vector<T>& ref, double atol,
                         double rtol, std::string* note) {
  if (got.size() != ref.size()) {
    *note = "sizes differ";
    return std::numeric_limits<double>::infinity();
  }
  double worst = 0, ref_max = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double a = static_cast<double>(got[i]), b = static_cast<double>(ref[i]);
    if (!std::isfinite(a) || !std::isfinite(b)) {
      *note = "non-finite value at " + str(i) + ": got " + str(a) + ", ref " + str(b);
      return std::numeric_limits<double>::infinity();
    }
    ref_max = std::max(ref_max, std::abs(b));
    const double r = std::abs(a - b) / (atol + rtol * std::abs(b));
    if (r > worst) {
      worst = r;
      at = i;
    }
  }
  if (ref_max == 0) {
    *note = "reference is all zero";
    return std::numeric_limits<double>::infinity();
  }
  *note = "worst at " + str(at) + ": got " + str(static_cast<double>(got[at])) + ", ref " +
          str(static_cast<double>(ref[at]));
  return worst;
}

template <class T>
constexpr double atol_of() {
  return std::is_same_v<T, float> ? 1e-6 : 1e-12;
}
template <class T>
constexpr double rtol_of() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

template <class T>
void expect_close(const std::string& what, const std::vector<T>& got, const std::vector<T>& ref,
                  double atol = atol_of<T>(), double rtol = rtol_of<T>()) {
  std::string note;
  const double r = elementwise_ratio(got, ref, atol, rtol, &note);
  expect(r <= 1.0, what + ": |got - ref| <= " + str(atol) + " + " + str(rtol) +
                       " |ref| violated by a factor " + str(r) + " (" + note + ")");
}

/// Distance in units in the last place between two finite values of the same sign class.
template <class T>
std::int64_t ulp_distance(T a, T b) {
  using I = std::conditional_t<std::is_same_v<T, float>, std::int32_t, std::int64_t>;
  I ia, ib;
  std::memcpy(&ia, &a, sizeof(T));
  std::memcpy(&ib, &b, sizeof(T));
  // Map the sign-magnitude bit patterns onto a monotonic integer line.
  const auto key = [](I v) -> std::int64_t {
    return v < 0 ? static_cast<std::int64_t>(std::numeric_limits<I>::min()) - v : v;
  };
  const std::int64_t d = key(ia) - key(ib);
  return d < 0 ? -d : d;
}

template <class T>
std::vector<T> host_vector(fd::View<const T, Cuda> v) {
  auto h = fd::to_host(v);
  return h.to_vector();
}
template <class T>
std::vector<T> host_vector(const fd::Tensor<T, Cuda>& t) {
  return host_vector(t.view());
}

// ---------------------------------------------------------------------------------------------
// Host part: needs no GPU.
// ---------------------------------------------------------------------------------------------

cudaError_t returns_invalid_device() { return cudaErrorInvalidDevice; }

void host_checks() {
  section("error conversion (host)", [] {
    std::string m;
    expect(throws_with<fd::cuda_error>(
               [] {
                 fd::cuda::check(cudaErrorInvalidValue, "cudaMemcpy(dst, src, n, kind)",
                                 "/some/dir/kernel.cu", 42);
               },
               {"cudaMemcpy(dst, src, n, kind)", "kernel.cu:42", "cudaErrorInvalidValue",
                cudaGetErrorString(cudaErrorInvalidValue)},
               &m),
           "cuda::check names the call, file:line, error name and description; got: " + m);
    expect(m.find("/some/dir") == std::string::npos, "the file is named without its directory");
    expect(throws_with<fd::error>(
               [] { FLOWDIFF_CUDA_CHECK(returns_invalid_device()); },
               {"returns_invalid_device()", "test_cuda_backend.cu:", "cudaErrorInvalidDevice"}, &m),
           "FLOWDIFF_CUDA_CHECK stringises the call and records this file; got: " + m);
    expect(
        throws_with<fd::cuda_error>(
            [] { FLOWDIFF_CUDA_CHECK(static_cast<cublasStatus_t>(CUBLAS_STATUS_NOT_INITIALIZED)); },
            {"CUBLAS_STATUS_NOT_INITIALIZED", "test_cuda_backend.cu:"}, &m),
        "cuBLAS statuses become cuda_error with the status name; got: " + m);
    bool threw = false;
    try {
      FLOWDIFF_CUDA_CHECK(cudaSuccess);
      FLOWDIFF_CUDA_CHECK(CUBLAS_STATUS_SUCCESS);
    } catch (...) {
      threw = true;
    }
    expect(!threw, "success statuses do not throw");
    // The reduction functors (device code, callable on the host).
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    const fd::cuda::kernels::Max mx;
    const fd::cuda::kernels::Min mn;
    expect(mx(1, 2) == 2 && mx(2, 1) == 2 && mn(1, 2) == 1 && mn(-inf, 3) == -inf,
           "Max / Min combine as expected");
    expect(std::isnan(mx(nan, 1)) && std::isnan(mx(1, nan)) && std::isnan(mn(nan, 1)) &&
               std::isnan(mn(1, nan)),
           "Max / Min never lose a NaN, whichever side it is on");
    const float vals[] = {1.0f, std::numeric_limits<float>::infinity(), -2.0f,
                          std::numeric_limits<float>::quiet_NaN()};
    const fd::cuda::kernels::NonFiniteIndex<float> nf{vals, 4};
    const fd::cuda::kernels::Abs<float> ab{vals};
    expect(nf(0) == 4 && nf(1) == 1 && nf(2) == 4 && nf(3) == 3 && ab(2) == 2 && std::isnan(ab(3)),
           "NonFiniteIndex flags inf and NaN only; Abs keeps NaN");
    fd::Tensor<float, Cuda> empty;  // no allocation, no CUDA call, with or without a device
    expect(empty.numel() == 0 && empty.data() == nullptr, "an empty device tensor owns nothing");
  });
}

// ---------------------------------------------------------------------------------------------
// Device part.
// ---------------------------------------------------------------------------------------------

struct AffineMap {  // the same FLOWDIFF_HOST_DEVICE functor on both backends
  float a, b;
  FLOWDIFF_HOST_DEVICE float operator()(float x) const { return a * x + b; }
};

void device_tensors() {
  section("device tensors and copies", [] {
    fd::Generator gen{11};
    auto h = fd::randn<float>({37, 5, 3}, gen);
    auto d = fd::to_device(h);
    expect(d.shape() == h.shape(), "to_device keeps the shape");
    auto back = fd::to_host(d);
    expect(back.to_vector() == h.to_vector(), "host -> device -> host is bit-exact");
    auto c = d.clone();
    expect(host_vector(c) == h.to_vector(), "clone copies device memory");
    auto f = fd::Tensor<double, Cuda>::full({1000}, 2.5);
    const auto fv = host_vector(f);
    expect(std::all_of(fv.begin(), fv.end(), [](double v) { return v == 2.5; }),
           "Tensor<double, Cuda>::full fills on the device");
    auto z = fd::Tensor<float, Cuda>::zeros({3, 7});
    const auto zv = host_vector(z);
    expect(std::all_of(zv.begin(), zv.end(), [](float v) { return v == 0.0f; }), "zeros");
    z.resize({21});
    expect(z.shape() == fd::Shape{21}, "resize to the same element count keeps storage");
    z.resize({0});
    expect(z.data() == nullptr, "resize to 0 elements frees the storage");
    auto e = fd::to_device(fd::Tensor<float>(fd::Shape{0, 4}));
    expect(e.numel() == 0 && fd::to_host(e).numel() == 0, "empty tensors round-trip");
    fd::Tensor<float, Cuda> small({5});
    expect(throws_with<fd::shape_error>([&] { fd::cuda::copy_to_device(small.view(), h.view()); },
                                        {"copy_to_device", "5", "555"}),
           "copy_to_device rejects a size mismatch, naming both sizes");
    // View conversions and row access work on device views without touching device memory.
    auto rows = d.view().rows(2, 4);
    expect(host_vector(fd::View<const float, Cuda>(rows)) ==
               std::vector<float>(h.data() + 2 * 15, h.data() + 4 * 15),
           "rows(2, 4) of a device view is the right sub-range");
    std::string m;
    expect(throws_with<fd::cuda_error>([] { (void)Cuda::allocate<float>(index_t{1} << 46); },
                                       {"Cuda::allocate", "cudaMallocAsync", "bytes"}, &m),
           "an impossible allocation throws cuda_error naming its size; got: " + m);
    float* p = nullptr;
    cudaError_t launch_error = cudaSuccess;
    expect(throws_with<fd::cuda_error>(
               [&] {
                 fd::cuda::kernels::for_each<<<1, 4096, 0, cudaStreamPerThread>>>(
                     index_t{1}, FLOWDIFF_LAMBDA(index_t i) { p[i] = 0; });
                 launch_error = cudaPeekAtLastError();
                 FLOWDIFF_CUDA_CHECK_LAUNCH("for_each", cudaStreamPerThread);
               },
               {"launch of for_each", "test_cuda_backend.cu:"}, &m),
           "a bad launch configuration throws cuda_error naming the kernel; got: " + m);
    expect(launch_error != cudaSuccess && cudaPeekAtLastError() == cudaSuccess,
           "the launch error was reported and cleared");
    Cuda::synchronize();
  });
}

void parallel_loops() {
  section("parallel_for / transform", [] {
    // Larger than max_blocks * block_threads, so the grid-stride loop is exercised.
    const index_t n = Cuda::max_blocks * Cuda::block_threads + 12345;
    fd::Generator gen{3};
    auto x = fd::rand<float>({n}, gen);
    auto xd = fd::to_device(x);
    fd::Tensor<float> y({n});
    fd::Tensor<float, Cuda> yd({n});
    const AffineMap f{1.75f, -0.5f};
    fd::transform(y, f, x);
    fd::transform(yd, f, xd);
    const auto got = host_vector(yd);
    expect_close("transform(a x + b) on the device vs the CPU", got, y.to_vector());
    index_t same = 0;
    for (index_t i = 0; i < n; ++i) same += got[static_cast<std::size_t>(i)] == y[i];
    std::printf(
        "  transform: %lld of %lld elements bit-equal to the CPU (FMA contraction may "
        "differ)\n",
        static_cast<long long>(same), static_cast<long long>(n));

    // Generic ops from core/ops.hpp on device tensors: axpy, scale, fill, copy, row_sum.
    fd::Tensor<double> a({40, 33}), b({40, 33});
    fd::fill_uniform(a, gen, -1.0, 1.0);
    fd::fill_uniform(b, gen, -1.0, 1.0);
    auto ad = fd::to_device(a);
    auto bd = fd::to_device(b);
    fd::axpy(a, 0.25, b);
    fd::axpy(ad, 0.25, bd);
    fd::scale(a, -3.0);
    fd::scale(ad, -3.0);
    expect_close("axpy + scale on the device", host_vector(ad), a.to_vector());
    fd::Tensor<double> rs({40});
    fd::Tensor<double, Cuda> rsd({40});
    fd::row_sum<double, Cpu>(a.view(), rs.view());
    fd::row_sum<double, Cuda>(ad.view(), rsd.view());
    expect_close("row_sum on the device", host_vector(rsd), rs.to_vector());
    fd::fill(bd, 7.0);
    fd::copy(ad, bd);
    const auto av = host_vector(ad);
    expect(std::all_of(av.begin(), av.end(), [](double v) { return v == 7.0; }), "fill + copy");

    // A FLOWDIFF_LAMBDA through the Backend interface, on the default and an explicit stream.
    fd::Tensor<index_t, Cuda> idx({100000});
    index_t* pi = idx.data();
    Cuda::parallel_for(
        idx.numel(), FLOWDIFF_LAMBDA(index_t i) { pi[i] = 3 * i + 1; });
    cudaStream_t s = nullptr;
    FLOWDIFF_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    Cuda::synchronize();  // idx was written on the per-thread stream
    Cuda::parallel_for(
        s, idx.numel(), FLOWDIFF_LAMBDA(index_t i) { pi[i] += 1; });
    Cuda::synchronize(s);
    FLOWDIFF_CUDA_CHECK(cudaStreamDestroy(s));
    const auto iv = host_vector(idx);
    bool ok = true;
    for (index_t i = 0; i < idx.numel(); ++i)
      ok = ok && iv[static_cast<std::size_t>(i)] == 3 * i + 2;
    expect(ok, "FLOWDIFF_LAMBDA loops on the per-thread and an explicit stream");
  });
}

void reductions() {
  section("deterministic sum", [] {
    fd::Generator gen{5};
    // One pass, block edges, two passes, and three passes (more than reduce_block^2 elements).
    const index_t sizes[] = {1,
                             7,
                             Cuda::reduce_block - 1,
                             Cuda::reduce_block,
                             8193,
                             1000003,
                             Cuda::reduce_block * Cuda::reduce_block + 101};
    for (const index_t n : sizes) {
      fd::Tensor<float, Cuda> xd({n});
      fd::fill_uniform(xd, gen, -1.0f, 2.0f);
      const auto x = fd::to_host(xd);
      const float cpu = fd::sum(x);
      const float gpu = fd::sum(xd);
      const float again = Cuda::sum(xd.data(), n);
      double abs_sum = 0;
      for (index_t i = 0; i < n; ++i) abs_sum += std::abs(static_cast<double>(x[i]));
      // Both accumulate in double (in different orders) and round once: at most 1 float ulp apart.
      expect(ulp_distance(cpu, gpu) <= 1,
             "sum of " + str(n) + " floats: gpu " + str(gpu) + ", cpu " + str(cpu));
      expect(std::memcmp(&gpu, &again, sizeof(float)) == 0,
             "sum of " + str(n) + " floats is the same bits when repeated");
      const double gd = Cuda::reduce_sum(n, fd::cuda::kernels::Load<float>{xd.data()});
      const double cd = Cpu::reduce_sum(n, [&](index_t i) { return static_cast<double>(x[i]); });
      expect(std::abs(gd - cd) <= 1e-12 * abs_sum,
             "double sum of " + str(n) + " elements: gpu " + str(gd) + ", cpu " + str(cd));
    }
    // The same bits on another stream; a dot product through reduce_sum with a device functor.
    const index_t n = 3000017;
    fd::Tensor<double, Cuda> ad({n}), bd({n});
    fd::fill_normal(ad, gen);
    fd::fill_normal(bd, gen);
    const double* pa = ad.data();
    const double* pb = bd.data();
    auto prod = FLOWDIFF_LAMBDA(index_t i) { return pa[i] * pb[i]; };
    const double d1 = Cuda::reduce_sum(n, prod);
    cudaStream_t s = nullptr;
    FLOWDIFF_CUDA_CHECK(cudaStreamCreate(&s));
    const double d2 = Cuda::reduce_sum(n, prod, s);
    FLOWDIFF_CUDA_CHECK(cudaStreamDestroy(s));
    expect(std::memcmp(&d1, &d2, sizeof(double)) == 0,
           "reduce_sum is the same bits on two streams");
    const auto a = fd::to_host(ad);
    const auto b = fd::to_host(bd);
    const double cpu = fd::dot(a, b);
    double scale = 0;
    for (index_t i = 0; i < n; ++i) scale += std::abs(a[i] * b[i]);
    expect(std::abs(d1 - cpu) <= 1e-12 * scale,
           "dot via reduce_sum: gpu " + str(d1) + ", cpu " + str(cpu));
    expect(Cuda::sum(static_cast<const float*>(nullptr), 0) == 0.0f, "the empty sum is 0");

    // The device forms of dot, sum_squares, max_abs, all_finite and check_finite.
    const double gdot = fd::dot(ad, bd);
    expect(std::abs(gdot - cpu) <= 1e-12 * scale,
           "dot(device, device): gpu " + str(gdot) + ", cpu " + str(cpu));
    const double gss = fd::sum_squares(ad), css = fd::sum_squares(a);
    expect(std::abs(gss - css) <= 1e-12 * css,
           "sum_squares on the device: gpu " + str(gss) + ", cpu " + str(css));
    expect(fd::max_abs(ad) == fd::max_abs(a), "max_abs on the device equals the CPU's exactly");
    expect(fd::all_finite(ad), "all_finite on a finite device tensor");
    bool threw = false;
    try {
      fd::check_finite("clean", ad);
    } catch (...) {
      threw = true;
    }
    expect(!threw, "check_finite passes a finite device tensor");
    auto bad = a.clone();
    bad[2000003] = std::numeric_limits<double>::quiet_NaN();
    bad[777] = -std::numeric_limits<double>::infinity();
    const auto bad_d = fd::to_device(bad);
    expect(!fd::all_finite(bad_d), "all_finite finds a NaN and an inf on the device");
    expect(std::isnan(fd::max_abs(bad_d)), "max_abs on the device propagates NaN");
    std::string m;
    expect(throws_with<fd::numeric_error>(
               [&] { fd::check_finite("grads", bad_d); },
               {"grads: element 777 of a tensor of shape [3000017]", "-inf"}, &m),
           "check_finite names the first non-finite device element; got: " + m);
    fd::Tensor<float, Cuda> none({0});
    expect(fd::max_abs(none) == 0.0f && fd::all_finite(none), "max_abs / all_finite of nothing");
  });
}

// Cuda::segment_reduce against its host reference (segment_reduce_reference<reduce_threads>,
// the block's order on the host): GroupNorm statistics (two passes) over sets shorter and longer
// than the block, GroupNorm parameter gradients (two sums per element, accumulating), a Linear
// bias gradient, and more segments than the grid has blocks (grid-stride). nvcc may contract the
// element arithmetic into FMAs, so within 1e-12 (double sums), float outputs within 2 ulp; the
// same bits when repeated.
void segment_reductions() {
  section("segment_reduce (a block per segment) vs its host reference", [] {
    namespace kn = fd::nn::kernels;
    fd::Generator gen{17};
    for (const index_t len : {index_t{37}, index_t{1000}}) {
      const index_t n = 3, channels = 8, groups = 4, cg = channels / groups, sets = n * groups;
      fd::Tensor<float, Cuda> xd({n, channels, len}), dyd({n, channels, len});
      fd::fill_normal(xd, gen);
      fd::fill_normal(dyd, gen);
      const auto x = fd::to_host(xd);
      const auto dy = fd::to_host(dyd);
      const std::string tag = "[" + str(n) + ", " + str(channels) + ", " + str(len) + "]";
      // Statistics: device vs host reference, then repeated (same bits).
      fd::Tensor<float, Cuda> mean_d({sets}), rstd_d({sets});
      Cuda::segment_reduce(sets, kn::GroupNormStats<float>{mean_d.data(), rstd_d.data(),
                                                           xd.data(), cg * len, 1e-5});
      fd::Tensor<float> mean({sets}), rstd({sets});
      fd::segment_reduce_reference<Cuda::reduce_threads>(
          sets, kn::GroupNormStats<float>{mean.data(), rstd.data(), x.data(), cg * len, 1e-5});
      const auto mg = host_vector(mean_d), rg = host_vector(rstd_d);
      expect_close("GroupNormStats mean " + tag, mg, mean.to_vector(), 1e-12, 2.5e-7);
      expect_close("GroupNormStats rstd " + tag, rg, rstd.to_vector(), 1e-12, 2.5e-7);
      Cuda::segment_reduce(sets, kn::GroupNormStats<float>{mean_d.data(), rstd_d.data(),
                                                           xd.data(), cg * len, 1e-5});
      expect(host_vector(mean_d) == mg && host_vector(rstd_d) == rg,
             "GroupNormStats " + tag + " is the same bits when repeated");
      // Parameter gradients, accumulated onto nonzero values (the host statistics on both).
      const auto mean_h = fd::to_device(mean), rstd_h = fd::to_device(rstd);
      fd::Tensor<float> dg = fd::randn<float>({channels}, gen);
      fd::Tensor<float> db = fd::randn<float>({channels}, gen);
      auto dg_d = fd::to_device(dg), db_d = fd::to_device(db);
      Cuda::segment_reduce(channels, kn::GroupNormParamGrad<float>{
                                         dg_d.data(), db_d.data(), xd.data(), dyd.data(),
                                         mean_h.data(), rstd_h.data(), n, channels, groups, len});
      fd::segment_reduce_reference<Cuda::reduce_threads>(
          channels, kn::GroupNormParamGrad<float>{dg.data(), db.data(), x.data(), dy.data(),
                                                  mean.data(), rstd.data(), n, channels, groups,
                                                  len});
      expect_close("GroupNormParamGrad dgamma " + tag, host_vector(dg_d), dg.to_vector(), 1e-12,
                   2.5e-7);
      expect_close("GroupNormParamGrad dbeta " + tag, host_vector(db_d), db.to_vector(), 1e-12,
                   2.5e-7);
      // A bias gradient: dy as [n len rows, channels columns].
      fd::Tensor<float> bias = fd::randn<float>({channels}, gen);
      auto bias_d = fd::to_device(bias);
      Cuda::segment_reduce(channels, kn::BiasGrad<float>{bias_d.data(), dyd.data(), n * len,
                                                         channels});
      fd::segment_reduce_reference<Cuda::reduce_threads>(
          channels, kn::BiasGrad<float>{bias.data(), dy.data(), n * len, channels});
      expect_close("BiasGrad " + tag, host_vector(bias_d), bias.to_vector(), 1e-12, 2.5e-7);
    }
    // More segments than Cuda::max_blocks: the blocks stride over them.
    const index_t segs = Cuda::max_blocks + 4321, len = 5;
    fd::Tensor<double, Cuda> yd({1, segs, len});
    fd::fill_normal(yd, gen);
    const auto y = fd::to_host(yd);
    fd::Tensor<double> sums = fd::randn<double>({segs}, gen);
    auto sums_d = fd::to_device(sums);
    Cuda::segment_reduce(segs, kn::ChannelGradSum<double>{sums_d.data(), yd.data(), 1, segs, len});
    fd::segment_reduce_reference<Cuda::reduce_threads>(
        segs, kn::ChannelGradSum<double>{sums.data(), y.data(), 1, segs, len});
    expect_close("ChannelGradSum over " + str(segs) + " segments", host_vector(sums_d),
                 sums.to_vector(), 1e-12, 1e-12);
  });
}

// Raw Philox words of the blocks fill_normal / fill_uniform use for a [rows, d] tensor.
struct PhiloxWords {
  std::uint32_t* out;
  fd::rng_detail::Stream s;
  index_t nb;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const auto b = s.block(static_cast<std::uint32_t>(k % nb), static_cast<std::uint32_t>(k / nb));
    for (int l = 0; l < 4; ++l) out[4 * k + l] = b.v[l];
  }
};

template <class T>
void philox_fills_for() {
  const char* tn = std::is_same_v<T, float> ? "float" : "double";
  const fd::Shape shape{37, 1001};  // rows not a multiple of the per-block count
  fd::Generator g_cpu{20261201}, g_gpu{20261201};
  fd::Tensor<T> u(shape);
  fd::Tensor<T, Cuda> ud(shape);
  fd::fill_uniform(u, g_cpu);
  fd::fill_uniform(ud, g_gpu);
  expect(host_vector(ud) == u.to_vector(),
         std::string("fill_uniform<") + tn + "> on [0, 1) is bit-equal to the CPU");
  fd::fill_uniform(u, g_cpu, T(-2), T(3));
  fd::fill_uniform(ud, g_gpu, T(-2), T(3));
  expect_close(std::string("fill_uniform<") + tn + "> on [-2, 3)", host_vector(ud), u.to_vector());
  fd::Tensor<T> z(shape);
  fd::Tensor<T, Cuda> zd(shape);
  fd::fill_normal(z, g_cpu);
  fd::fill_normal(zd, g_gpu);
  const auto zg = host_vector(zd);
  expect_close(std::string("fill_normal<") + tn + ">", zg, z.to_vector());
  std::int64_t worst = 0;
  for (index_t i = 0; i < z.numel(); ++i)
    worst = std::max(worst, ulp_distance(zg[static_cast<std::size_t>(i)], z[i]));
  std::printf("  fill_normal<%s>: largest difference to the CPU %lld ulp\n", tn,
              static_cast<long long>(worst));
  expect(worst <= 16, std::string("fill_normal<") + tn + "> within a few ulp of the CPU (" +
                          str(worst) + " ulp)");
  expect(g_cpu.offset() == 3 && g_gpu.offset() == 3, "each fill consumes one counter value");

  // Sample i does not depend on the batch size: rows of a [rows, d] and a [2 rows + 1, d] fill.
  fd::Generator g1{99}, g2{99};
  fd::Tensor<T, Cuda> small(shape), big({2 * shape[0] + 1, shape[1]});
  fd::fill_normal(small, g1);
  fd::fill_normal(big, g2);
  const auto sv = host_vector(small);
  const auto bv = host_vector(fd::View<const T, Cuda>(big.view().rows(0, shape[0])));
  expect(sv == bv, std::string("fill_normal<") + tn + ">: sample i is independent of batch size");
}

void philox() {
  section("Philox fills", [] {
    // The integer stream itself: every word of every block bit-equal to the host's.
    fd::Generator gen{0xC0FFEEull << 20};
    const auto s = gen.next_stream();
    const index_t rows = 129, nb = 257;
    fd::Tensor<std::uint32_t, Cuda> words({rows * nb * 4});
    Cuda::parallel_for(rows * nb, PhiloxWords{words.data(), s, nb});
    const auto w = host_vector(words);
    index_t bad = 0;
    for (index_t k = 0; k < rows * nb; ++k) {
      const auto b =
          s.block(static_cast<std::uint32_t>(k % nb), static_cast<std::uint32_t>(k / nb));
      for (int l = 0; l < 4; ++l) bad += w[static_cast<std::size_t>(4 * k + l)] != b.v[l];
    }
    expect(bad == 0, "Philox4x32-10 words on the device equal the host's (" + str(bad) + " of " +
                         str(rows * nb * 4) + " differ)");
    const auto kat = fd::Philox4x32::hash(0, 0, 0, 0, 0, 0);
    expect(kat.v[0] == 0x6627e8d5u, "Random123 known answer on the host");
    philox_fills_for<float>();
    philox_fills_for<double>();
  });
}

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

/// C = alpha op(A) op(B) + beta C0 in double, row-major, the reference for both backends.
template <class T>
std::vector<double> gemm_reference(fd::Trans ta, fd::Trans tb, index_t m, index_t n, index_t k,
                                   double alpha, const T* a, index_t lda, const T* b, index_t ldb,
                                   double beta, const T* c0, index_t ldc) {
  std::vector<double> c(static_cast<std::size_t>(m * n));
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      double s = 0;
      for (index_t p = 0; p < k; ++p) {
        const double av = ta == fd::Trans::no ? a[i * lda + p] : a[p * lda + i];
        const double bv = tb == fd::Trans::no ? b[p * ldb + j] : b[j * ldb + p];
        s += av * bv;
      }
      c[static_cast<std::size_t>(i * n + j)] =
          alpha * s + (beta == 0 ? 0.0 : beta * static_cast<double>(c0[i * ldc + j]));
    }
  return c;
}

/// Normalised MSE sum (got - ref)^2 / sum ref^2 after checking got is finite and ref non-zero.
template <class T>
double nmse(const std::vector<T>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    num += (g - ref[i]) * (g - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? num / den : std::numeric_limits<double>::infinity();
}

template <class T>
constexpr double nmse_bound() {
  return std::is_same_v<T, float> ? 1e-7 : 1e-24;
}

const char* trans_name(fd::Trans t) { return t == fd::Trans::no ? "N" : "T"; }

template <class T>
void gemm_for(fd::cuda::Blas& blas) {
  const char* tn = std::is_same_v<T, float> ? "float" : "double";
  fd::Generator gen{77};
  struct Dims {
    index_t m, n, k;
  };
  for (const Dims dims : {Dims{37, 53, 29}, Dims{256, 192, 320}, Dims{1, 65, 7}}) {
    for (const fd::Trans ta : {fd::Trans::no, fd::Trans::yes})
      for (const fd::Trans tb : {fd::Trans::no, fd::Trans::yes}) {
        const index_t m = dims.m, n = dims.n, k = dims.k;
        fd::Tensor<T> a = ta == fd::Trans::no ? fd::Tensor<T>({m, k}) : fd::Tensor<T>({k, m});
        fd::Tensor<T> b = tb == fd::Trans::no ? fd::Tensor<T>({k, n}) : fd::Tensor<T>({n, k});
        fd::Tensor<T> c({m, n});
        fd::fill_uniform(a, gen, T(-1), T(1));
        fd::fill_uniform(b, gen, T(-1), T(1));
        fd::fill_uniform(c, gen, T(-1), T(1));
        const T alpha = T(0.75), beta = T(-0.5);
        const auto ref = gemm_reference(ta, tb, m, n, k, alpha, a.data(), a.dim(1), b.data(),
                                        b.dim(1), beta, c.data(), n);
        auto ad = fd::to_device(a);
        auto bd = fd::to_device(b);
        auto cd = fd::to_device(c);
        fd::gemm(blas, ta, tb, alpha, ad, bd, beta, cd);
        const std::string what = std::string("gemm<") + tn + "> " + trans_name(ta) +
                                 trans_name(tb) + " [" + str(m) + "x" + str(n) + "x" + str(k) + "]";
        const double e = nmse(host_vector(cd), ref);
        expect(e <= nmse_bound<T>(), what + ": cuBLAS NMSE " + str(e));
      }
  }
  // beta = 0 must not read C (NaN there stays out of the result); k = 0 gives C = beta C.
  {
    fd::Tensor<T> a({9, 4}), b({4, 11});
    fd::fill_uniform(a, gen, T(-1), T(1));
    fd::fill_uniform(b, gen, T(-1), T(1));
    auto cd = fd::Tensor<T, Cuda>::full({9, 11}, std::numeric_limits<T>::quiet_NaN());
    fd::gemm(blas, fd::Trans::no, fd::Trans::no, T(1), fd::to_device(a), fd::to_device(b), T(0),
             cd);
    const auto ref = gemm_reference(fd::Trans::no, fd::Trans::no, 9, 11, 4, 1.0, a.data(), 4,
                                    b.data(), 11, 0.0, static_cast<const T*>(nullptr), 11);
    expect(nmse(host_vector(cd), ref) <= nmse_bound<T>(),
           std::string("gemm<") + tn + "> with beta = 0 ignores NaN in C");
    auto c2 = fd::Tensor<T, Cuda>::full({3, 5}, T(2));
    fd::gemm(blas, fd::Trans::no, fd::Trans::no, T(1), fd::Tensor<T, Cuda>({3, 0}),
             fd::Tensor<T, Cuda>({0, 5}), T(0.5), c2);
    const auto c2v = host_vector(c2);
    expect(std::all_of(c2v.begin(), c2v.end(), [](T v) { return v == T(1); }),
           std::string("gemm<") + tn + "> with k = 0 computes C = beta C");
  }
  // Strided-batched, every transpose combination, against per-batch double references.
  for (const fd::Trans ta : {fd::Trans::no, fd::Trans::yes})
    for (const fd::Trans tb : {fd::Trans::no, fd::Trans::yes}) {
      const index_t batch = 6, m = 17, n = 23, k = 31;
      fd::Tensor<T> a(ta == fd::Trans::no ? fd::Shape{batch, m, k} : fd::Shape{batch, k, m});
      fd::Tensor<T> b(tb == fd::Trans::no ? fd::Shape{batch, k, n} : fd::Shape{batch, n, k});
      fd::Tensor<T> c({batch, m, n});
      fd::fill_uniform(a, gen, T(-1), T(1));
      fd::fill_uniform(b, gen, T(-1), T(1));
      fd::fill_uniform(c, gen, T(-1), T(1));
      auto ad = fd::to_device(a);
      auto bd = fd::to_device(b);
      auto cd = fd::to_device(c);
      fd::gemm_batched<T>(blas, ta, tb, T(1.25), ad, bd, T(0.5), cd);
      std::vector<double> ref;
      const index_t sa = a.row_size(), sb = b.row_size();
      for (index_t i = 0; i < batch; ++i) {
        const auto r = gemm_reference(ta, tb, m, n, k, 1.25, a.data() + i * sa, a.dim(2),
                                      b.data() + i * sb, b.dim(2), 0.5, c.data() + i * m * n, n);
        ref.insert(ref.end(), r.begin(), r.end());
      }
      const double e = nmse(host_vector(cd), ref);
      expect(e <= nmse_bound<T>(), std::string("gemm_batched<") + tn + "> " + trans_name(ta) +
                                       trans_name(tb) + ": NMSE " + str(e));
    }
  // The raw form with padded leading dimensions and a batch stride larger than the matrix.
  {
    const index_t batch = 3, m = 12, n = 10, k = 8, lda = k + 3, ldb = n + 5, ldc = n + 2;
    const index_t sa = m * lda + 7, sb = k * ldb + 1, sc = m * ldc + 4;
    fd::Tensor<T> a({batch * sa}), b({batch * sb}), c({batch * sc});
    fd::fill_uniform(a, gen, T(-1), T(1));
    fd::fill_uniform(b, gen, T(-1), T(1));
    fd::fill_uniform(c, gen, T(-1), T(1));
    auto ad = fd::to_device(a);
    auto bd = fd::to_device(b);
    auto cd = fd::to_device(c);
    fd::cuda::gemm_strided_batched<T>(blas, fd::Trans::no, fd::Trans::no, m, n, k, T(1), ad.data(),
                                      lda, sa, bd.data(), ldb, sb, T(-1), cd.data(), ldc, sc,
                                      batch);
    const auto got = host_vector(cd);
    bool untouched = true;
    double e = 0;
    for (index_t i = 0; i < batch; ++i) {
      const auto r = gemm_reference(fd::Trans::no, fd::Trans::no, m, n, k, 1.0, a.data() + i * sa,
                                    lda, b.data() + i * sb, ldb, -1.0, c.data() + i * sc, ldc);
      std::vector<T> g;
      for (index_t r0 = 0; r0 < m; ++r0)
        for (index_t j = 0; j < ldc; ++j) {
          const std::size_t at = static_cast<std::size_t>(i * sc + r0 * ldc + j);
          if (j < n)
            g.push_back(got[at]);
          else
            untouched = untouched && got[at] == c[static_cast<index_t>(at)];
        }
      e = std::max(e, nmse(g, r));
    }
    expect(e <= nmse_bound<T>(),
           std::string("gemm_strided_batched<") + tn + "> with padding: NMSE " + str(e));
    expect(untouched,
           std::string("gemm_strided_batched<") + tn + "> leaves the padding of C untouched");
  }
}

void gemm() {
  section("cuBLAS GEMM", [] {
    fd::cuda::Blas blas;
    gemm_for<float>(blas);
    gemm_for<double>(blas);
    fd::Tensor<float, Cuda> a({4, 5}), b({6, 3}), c({4, 3});
    expect(throws_with<fd::shape_error>(
               [&] { fd::gemm(blas, fd::Trans::no, fd::Trans::no, 1.0f, a, b, 0.0f, c); },
               {"inner dimensions", "[4, 5]", "[6, 3]"}),
           "gemm rejects mismatched inner dimensions, naming both shapes");
    fd::cuda::Blas moved = std::move(blas);
    expect(moved.handle() != nullptr && blas.handle() == nullptr, "Blas is move-only RAII");
  });
}

// ---------------------------------------------------------------------------------------------
// The GEMM mapping on the host: the column-major call gemm_strided_batched hands to cuBLAS, run
// through a reference column-major BLAS, must give the row-major product.
// ---------------------------------------------------------------------------------------------

/// BLAS semantics, column-major, in double: C = alpha op(A) op(B) + beta C for each batch.
template <class T>
void reference_cublas(const fd::cuda::ColumnMajorGemm<T>& g, double alpha, double beta) {
  for (int bi = 0; bi < g.batch; ++bi) {
    const T* a = g.a + bi * g.stride_a;
    const T* b = g.b + bi * g.stride_b;
    T* c = g.c + bi * g.stride_c;
    for (int i = 0; i < g.m; ++i)
      for (int j = 0; j < g.n; ++j) {
        double s = 0;
        for (int p = 0; p < g.k; ++p) {
          const double av = g.transa == CUBLAS_OP_N ? a[i + p * g.lda] : a[p + i * g.lda];
          const double bv = g.transb == CUBLAS_OP_N ? b[p + j * g.ldb] : b[j + p * g.ldb];
          s += av * bv;
        }
        T& cij = c[i + j * g.ldc];
        cij = static_cast<T>(alpha * s + (beta == 0 ? 0.0 : beta * static_cast<double>(cij)));
      }
  }
}

void host_gemm_mapping() {
  section("GEMM row-major mapping (host)", [] {
    fd::Generator gen{31};
    for (const fd::Trans ta : {fd::Trans::no, fd::Trans::yes})
      for (const fd::Trans tb : {fd::Trans::no, fd::Trans::yes}) {
        const index_t batch = 3, m = 7, n = 5, k = 4;
        const index_t a_rows = ta == fd::Trans::no ? m : k, a_cols = ta == fd::Trans::no ? k : m;
        const index_t b_rows = tb == fd::Trans::no ? k : n, b_cols = tb == fd::Trans::no ? n : k;
        const index_t lda = a_cols + 2, ldb = b_cols + 1, ldc = n + 3;
        const index_t sa = a_rows * lda + 5, sb = b_rows * ldb, sc = m * ldc + 1;
        fd::Tensor<double> a({batch * sa}), b({batch * sb}), c({batch * sc});
        fd::fill_uniform(a, gen, -1.0, 1.0);
        fd::fill_uniform(b, gen, -1.0, 1.0);
        fd::fill_uniform(c, gen, -1.0, 1.0);
        std::vector<double> ref;
        for (index_t i = 0; i < batch; ++i) {
          const auto r = gemm_reference(ta, tb, m, n, k, 0.5, a.data() + i * sa, lda,
                                        b.data() + i * sb, ldb, 2.0, c.data() + i * sc, ldc);
          ref.insert(ref.end(), r.begin(), r.end());
        }
        const auto g = fd::cuda::column_major_form<double>(
            ta, tb, m, n, k, a.data(), lda, sa, b.data(), ldb, sb, c.data(), ldc, sc, batch);
        reference_cublas(g, 0.5, 2.0);
        std::vector<double> got;
        for (index_t i = 0; i < batch; ++i)
          for (index_t r = 0; r < m; ++r)
            for (index_t j = 0; j < n; ++j) got.push_back(c[i * sc + r * ldc + j]);
        expect_close(std::string("row-major ") + trans_name(ta) + trans_name(tb) +
                         " through the column-major call",
                     got, ref);
      }
    std::string m;
    expect(throws_with<fd::config_error>(
               [] {
                 (void)fd::cuda::column_major_form<float>(fd::Trans::no, fd::Trans::no, 4, 5, 6,
                                                          nullptr, 5, 0, nullptr, 5, 0, nullptr, 5,
                                                          0, 1);
               },
               {"lda = 5", "needs >= 6"}, &m),
           "a too small leading dimension is named; got: " + m);
    expect(throws_with<fd::config_error>(
               [] {
                 (void)fd::cuda::column_major_form<float>(fd::Trans::no, fd::Trans::no, 4, 5, 6,
                                                          nullptr, 6, 24, nullptr, 5, 30, nullptr,
                                                          5, 10, 2);
               },
               {"stride_c = 10"}, &m),
           "overlapping batched outputs are rejected; got: " + m);
  });
}

// ---------------------------------------------------------------------------------------------
// Fused sampler updates against the CPU's Cfg + Euler / EulerMaruyama, with one conditional field
// written once for both backends.
// ---------------------------------------------------------------------------------------------

/// out[i, j] = a_y (1 - t) x[i, j] + t b_y[j]: an affine field per class y (y = classes is ∅).
struct AffineClassKernel {
  float* out;
  const float* x;
  const fd::label_t* y;
  const float* a;  // [classes + 1]
  const float* b;  // [classes + 1, d]
  index_t d;
  float t;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const {
    const index_t i = k / d, j = k % d;
    const fd::label_t c = y[i];
    out[k] = a[c] * (1.0f - t) * x[k] + t * b[c * d + j];
  }
};

template <class B>
struct AffineClassField {
  using value_type = float;
  using backend = B;
  fd::Tensor<float, B> a, b;
  index_t classes;

  index_t num_classes() const { return classes; }
  void operator()(fd::View<const float, B> x, fd::View<float, B> out, float t,
                  fd::View<const fd::label_t, B> y) {
    B::parallel_for(x.numel(), AffineClassKernel{out.data(), x.data(), y.data(), a.data(), b.data(),
                                                 x.row_size(), t});
  }
};

template <class B, class T>
fd::Tensor<T, B> on(const fd::Tensor<T>& h) {
  if constexpr (std::is_same_v<B, Cuda>) {
    return fd::to_device(h);
  } else {
    return h.clone();
  }
}
template <class T, class B>
std::vector<T> to_vector(const fd::Tensor<T, B>& t) {
  if constexpr (std::is_same_v<B, Cuda>) {
    return host_vector(t);
  } else {
    return t.to_vector();
  }
}

/// Host data of the fused tests: a labelled batch (∅ included as a condition) and the field.
struct FusedSetup {
  static constexpr index_t n = 64, classes = 4;
  fd::Shape shape{n, 3, 5, 7};  // 105 features: not a multiple of the Philox block
  fd::Tensor<float> a, b, x0;
  fd::Tensor<fd::label_t> labels, labels2;  // [N] and [2N]: y, then ∅
  std::vector<float> grid = fd::uniform_grid<float>(8);

  FusedSetup() : a({classes + 1}), b({classes + 1, 105}), labels({n}), labels2({2 * n}) {
    fd::Generator gen{8};
    fd::fill_uniform(a, gen, -1.5f, 0.5f);
    fd::fill_normal(b, gen);
    x0 = fd::randn<float>(shape, gen);
    for (index_t i = 0; i < n; ++i) {
      labels[i] = static_cast<fd::label_t>(i % (classes + 1));
      labels2[i] = labels[i];
      labels2[n + i] = static_cast<fd::label_t>(classes);
    }
  }
  std::vector<float> sub_grid(index_t steps) const {
    return {grid.begin(), grid.begin() + steps + 1};
  }
};

/// The fused sampling loop on backend B, by hand: per step one 2N evaluation of the conditional
/// field and one fused pass (sigma = 0: CFG + Euler; sigma > 0: CFG + Euler–Maruyama with in-pass
/// noise).
template <class B>
std::vector<float> fused_run(const FusedSetup& s, double w, double sigma, index_t steps,
                             fd::Generator& gen) {
  AffineClassField<B> field{on<B>(s.a), on<B>(s.b), FusedSetup::classes};
  const auto labels2 = on<B>(s.labels2);
  auto x = on<B>(s.x0);
  const index_t n = x.rows();
  fd::Tensor<float, B> x2(x.shape().with_rows(2 * n)), u2(x.shape().with_rows(2 * n));
  const auto grid = s.sub_grid(steps);
  for (std::size_t k = 0; k + 1 < grid.size(); ++k) {
    const float t = grid[k], h = grid[k + 1] - grid[k];
    B::copy(x2.data(), x.data(), x.numel());
    B::copy(x2.data() + x.numel(), x.data(), x.numel());
    field(x2.view(), u2.view(), t, labels2.view());
    const fd::View<const float, B> cond = u2.view().rows(0, n), uncond = u2.view().rows(n, 2 * n);
    if (sigma == 0)
      fd::cuda::cfg_euler_step(x.view(), cond, uncond, w, h);
    else
      fd::cuda::cfg_euler_maruyama_step(x.view(), cond, uncond, w, fd::schedules::Linear{}, sigma,
                                        t, h, gen);
  }
  return to_vector(x);
}

/// Forwards field(x, out, t) only: hides Cfg::evaluate_halves, so that the steppers take their
/// unfused path.
template <class G, class B>
struct HideHalves {
  G& g;
  void operator()(fd::View<const float, B> x, fd::View<float, B> out, float t) { g(x, out, t); }
};

/// The library's own path on backend B: the Cfg adapter and the Euler / EulerMaruyama stepper
/// through integrate(). fused = false hides the halves (a combination pass, fill_normal, an update
/// pass); fused = true is what integrate() does with a Cfg by itself: the fused update.
/// rescale > 0: CFG rescale with that phi (integrate() then takes the unfused path itself).
template <class B>
std::vector<float> library_run(const FusedSetup& s, double w, double sigma, index_t steps,
                               fd::Generator& gen, bool fused = false, double rescale = 0) {
  AffineClassField<B> field{on<B>(s.a), on<B>(s.b), FusedSetup::classes};
  const auto labels = on<B>(s.labels);
  auto x = on<B>(s.x0);
  auto g = fd::cfg(field, w, fd::CfgOptions{.rescale = rescale});
  g.set_condition(labels.view());
  HideHalves<decltype(g), B> hidden{g};
  const auto run = [&](auto& f) {
    if (sigma == 0)
      fd::integrate(fd::Euler{}, f, x, s.sub_grid(steps));
    else
      fd::integrate(fd::euler_maruyama(fd::schedules::Linear{}, sigma, gen), f, x,
                    s.sub_grid(steps));
  };
  if (fused)
    run(g);
  else
    run(hidden);
  return to_vector(x);
}

/// An ODE stepper through integrate() on backend B over `grid`, guided (Cfg with w = 2): Heun
/// (a two-stage stepper, three inputs per transform), Midpoint, RK4, DPM-Solver++(2M), Dopri5;
/// each is compiled for Cuda this way. The field evaluations go to *evaluations when given.
template <class B, class Stepper>
std::vector<float> stepper_run(const FusedSetup& s, const Stepper& stepper,
                               const std::vector<float>& grid, fd::index_t* evaluations = nullptr) {
  AffineClassField<B> field{on<B>(s.a), on<B>(s.b), FusedSetup::classes};
  const auto labels = on<B>(s.labels);
  auto x = on<B>(s.x0);
  auto g = fd::cfg(field, 2.0);
  g.set_condition(labels.view());
  const auto stats = fd::integrate(stepper, g, x, grid);
  if (evaluations != nullptr) *evaluations = stats.field_evaluations;
  return to_vector(x);
}

/// Dopri5 at atol = rtol = 1e-5 (over [0, 1] in one grid interval below): its error norm is a
/// deterministic reduction on the backend, whose value steers the steps.
fd::Dopri5 dopri5(fd::Dopri5::ErrorNorm norm = fd::Dopri5::ErrorNorm::batch) {
  fd::Dopri5 d{.atol = 1e-5, .rtol = 1e-5};
  d.error_norm = norm;
  return d;
}

/// Runs `compare(what, w, sigma)` over the guidance scales and noise levels tested.
template <class F>
void for_each_case(F&& compare) {
  for (const double w : {1.0, 3.0, 0.0})
    for (const double sigma : {0.0, 0.8})
      compare("w = " + str(w) + ", sigma = " + str(sigma), w, sigma);
}

void report_bit_equal(const std::string& what, const std::vector<float>& a,
                      const std::vector<float>& b) {
  std::size_t same = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) same += a[i] == b[i];
  std::printf("  %s: bit-equal on %zu of %zu elements\n", what.c_str(), same, a.size());
}

void host_fused() {
  section("fused update functors (host)", [] {
    const FusedSetup s;
    const index_t steps = static_cast<index_t>(s.grid.size()) - 1;
    for_each_case([&](const std::string& what, double w, double sigma) {
      fd::Generator g1{2026}, g2{2026}, g3{2026};
      const auto fused = fused_run<Cpu>(s, w, sigma, steps, g1);
      const auto lib = library_run<Cpu>(s, w, sigma, steps, g2);
      const auto auto_fused = library_run<Cpu>(s, w, sigma, steps, g3, true);
      expect_close("fused functors on the host vs Cfg + stepper (" + what + ")", fused, lib);
      report_bit_equal("host fused vs library, " + what, fused, lib);
      expect(auto_fused == lib, "integrate's own fusion under Cfg gives the unfused bits (" +
                                    what + ")");
      expect(g1.offset() == g2.offset() && g3.offset() == g2.offset(),
             "the fused step consumes the generator as EulerMaruyama does (" + what + ")");
      // CFG rescale (phi 0.7): integrate() declines the fusion, so both calls take one path.
      fd::Generator g4{2026}, g5{2026};
      const auto rescaled = library_run<Cpu>(s, w, sigma, steps, g4, false, 0.7);
      const auto rescaled_auto = library_run<Cpu>(s, w, sigma, steps, g5, true, 0.7);
      expect(rescaled == rescaled_auto,
             "CFG rescale: integrate() under Cfg gives the unfused bits (" + what + ")");
    });
    fd::Tensor<float> x({4, 3}), c({4, 3}), u({4, 2});
    expect(throws_with<fd::shape_error>(
               [&] { fd::cuda::cfg_euler_step(x.view(), c.view(), u.view(), 2.0, 0.1f); },
               {"cfg_euler_step", "uncond", "[4, 2]"}),
           "cfg_euler_step rejects a mismatched uncond shape");
    fd::Generator g{1};
    expect(throws_with<fd::config_error>(
               [&] {
                 fd::cuda::cfg_euler_maruyama_step(x.view(), c.view(), c.view(), 2.0,
                                                   fd::schedules::Linear{}, 0.5, 0.5f, -0.1f, g);
               },
               {"forward in time"}),
           "cfg_euler_maruyama_step rejects a backward stochastic step");
    expect(throws_with<fd::config_error>(
               [&] {
                 fd::cuda::cfg_euler_step(x.view(), c.view(), c.view(),
                                          std::numeric_limits<double>::infinity(), 0.1f);
               },
               {"w must be finite"}),
           "cfg_euler_step rejects a non-finite w");
  });
}

void fused_updates() {
  section("fused CFG + Euler / Euler-Maruyama", [] {
    const FusedSetup s;
    const index_t steps = static_cast<index_t>(s.grid.size()) - 1;
    for_each_case([&](const std::string& what, double w, double sigma) {
      fd::Generator g_cpu1{2026}, g_gpu1{2026}, g_cpu{2026}, g_fused{2026}, g_lib{2026},
          g_auto{2026};
      const auto cpu1 = library_run<Cpu>(s, w, sigma, 1, g_cpu1);
      const auto gpu1 = fused_run<Cuda>(s, w, sigma, 1, g_gpu1);
      expect_close("fused kernel, one step vs CPU (" + what + ")", gpu1, cpu1);
      const auto cpu = library_run<Cpu>(s, w, sigma, steps, g_cpu);
      const auto fused = fused_run<Cuda>(s, w, sigma, steps, g_fused);
      const auto lib = library_run<Cuda>(s, w, sigma, steps, g_lib);
      // Eight steps: each within the element-wise rule, compounded through the field.
      expect_close("fused kernel, " + str(steps) + " steps vs CPU (" + what + ")", fused, cpu, 1e-5,
                   1e-4);
      expect_close("generic library on the GPU, " + str(steps) + " steps vs CPU (" + what + ")",
                   lib, cpu, 1e-5, 1e-4);
      expect_close("fused kernel vs generic library on the GPU (" + what + ")", fused, lib, 1e-5,
                   1e-4);
      report_bit_equal("GPU fused vs GPU library, " + what, fused, lib);
      // integrate() fuses by itself under Cfg: the same kernel on the same inputs as fused_run.
      const auto auto_fused = library_run<Cuda>(s, w, sigma, steps, g_auto, true);
      expect_close("integrate's own fusion vs the fused kernel on the GPU (" + what + ")",
                   auto_fused, fused, 0, 1e-6);
      report_bit_equal("GPU integrate's fusion vs the fused kernel, " + what, auto_fused, fused);
      expect(g_fused.offset() == g_cpu.offset() && g_lib.offset() == g_cpu.offset() &&
                 g_auto.offset() == g_cpu.offset(),
             "the GPU paths consume the generator as the CPU does (" + what + ")");
    });
    expect_close("Heun + Cfg on the GPU vs the CPU, " + str(steps) + " steps",
                 stepper_run<Cuda>(s, fd::Heun{}, s.grid), stepper_run<Cpu>(s, fd::Heun{}, s.grid),
                 1e-5, 1e-4);
    expect_close("Midpoint + Cfg on the GPU vs the CPU",
                 stepper_run<Cuda>(s, fd::Midpoint{}, s.grid),
                 stepper_run<Cpu>(s, fd::Midpoint{}, s.grid), 1e-5, 1e-4);
    expect_close("RK4 + Cfg on the GPU vs the CPU", stepper_run<Cuda>(s, fd::RK4{}, s.grid),
                 stepper_run<Cpu>(s, fd::RK4{}, s.grid), 1e-5, 1e-4);
    const auto dpm = fd::dpm_solver_pp_2m(fd::schedules::Linear{});
    expect_close("DPM-Solver++(2M) + Cfg on the GPU vs the CPU", stepper_run<Cuda>(s, dpm, s.grid),
                 stepper_run<Cpu>(s, dpm, s.grid), 1e-5, 1e-4);
    // Dopri5: the same accepted steps up to the last bits of the error estimate (GPU and CPU sum
    // in another order), so the same evaluations in practice; the endpoint within the rule.
    const auto whole = fd::uniform_grid<float>(1);
    fd::index_t nfe_gpu = 0, nfe_cpu = 0;
    const auto dopri_gpu = stepper_run<Cuda>(s, dopri5(), whole, &nfe_gpu);
    const auto dopri_cpu = stepper_run<Cpu>(s, dopri5(), whole, &nfe_cpu);
    expect_close("Dopri5 + Cfg on the GPU vs the CPU (" + str(nfe_gpu) + " and " + str(nfe_cpu) +
                     " evaluations)",
                 dopri_gpu, dopri_cpu, 1e-4, 1e-4);
    expect(nfe_gpu > 6 && nfe_gpu <= nfe_cpu + 12 && nfe_cpu <= nfe_gpu + 12,
           "Dopri5 takes as many steps on the GPU as on the CPU, within two (" + str(nfe_gpu) +
               " and " + str(nfe_cpu) + " evaluations)");
    expect(throws_with<fd::config_error>(
               [&] { stepper_run<Cuda>(s, dopri5(fd::Dopri5::ErrorNorm::worst_sample), whole); },
               {"worst_sample", "CPU only"}),
           "Dopri5's worst-sample norm refuses a device backend");
  });
  section("CFG rescale on the GPU", [] {
    // The per-row standard deviations (double sums, one thread per row) against the CPU's,
    // through Euler and Euler-Maruyama (integrate() does not fuse under rescale).
    const FusedSetup s;
    const index_t steps = static_cast<index_t>(s.grid.size()) - 1;
    for (const double phi : {0.7, 1.0})
      for_each_case([&](const std::string& what, double w, double sigma) {
        fd::Generator g_cpu{2026}, g_gpu{2026};
        const auto cpu = library_run<Cpu>(s, w, sigma, steps, g_cpu, true, phi);
        const auto gpu = library_run<Cuda>(s, w, sigma, steps, g_gpu, true, phi);
        expect_close("CFG rescale phi = " + str(phi) + ", " + str(steps) + " steps, GPU vs CPU (" +
                         what + ")",
                     gpu, cpu, 1e-5, 1e-4);
        expect(g_gpu.offset() == g_cpu.offset(),
               "CFG rescale: the GPU consumes the generator as the CPU does (" + what + ")");
      });
  });
}

// ---------------------------------------------------------------------------------------------
// Likelihoods: the augmented reverse ODE on the device against the CPU and the closed form.
// ---------------------------------------------------------------------------------------------

/// z ~ N(mu, s^2 I) under the linear path: u_t(x) = mu + c_t (x - t mu), div u = d c_t,
/// c_t = (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (tests/test_likelihood.cpp's flow).
struct GaussianFlowKernel {
  double* out;
  const double* x;
  double mu, c, t;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const { out[k] = mu + c * (x[k] - t * mu); }
};
struct FillKernel {
  double* out;
  double v;
  FLOWDIFF_HOST_DEVICE void operator()(index_t k) const { out[k] = v; }
};

template <class B>
struct GaussianFlow {
  static constexpr double mu = 1.0, s = 0.5;
  static double c(double t) {
    return (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) * (1 - t));
  }
  void operator()(fd::View<const double, B> x, fd::View<double, B> out, double t) {
    B::parallel_for(x.numel(), GaussianFlowKernel{out.data(), x.data(), mu, c(t), t});
  }
  void divergence(fd::View<const double, B> x, fd::View<double, B> div, double t) {
    B::parallel_for(div.numel(), FillKernel{div.data(), double(x.dim(1)) * c(t)});
  }
};

/// log p_1 of every row of x on backend B with the given divergence (Hutchinson: 3 probes from a
/// generator seeded 11; RK4 on 40 steps then, Dopri5 at 1e-9 otherwise).
template <class B>
std::vector<double> likelihood_run(const fd::Tensor<double>& x, fd::Divergence how) {
  GaussianFlow<B> flow;
  const auto xb = on<B>(x);
  fd::Tensor<double, B> lp(fd::Shape{x.rows()});
  const fd::LikelihoodOptions opt{.divergence = how, .probes = 3};
  if (how == fd::Divergence::hutchinson) {
    fd::Generator gen{11};
    fd::log_likelihood(fd::RK4{}, flow, xb.view(), lp.view(),
                       fd::uniform_grid<double>(40, 1.0, 0.0), opt, &gen);
  } else {
    fd::log_likelihood(flow, xb.view(), lp.view(), opt, 1e-9, 1e-9);
  }
  return to_vector(lp);
}

void likelihoods() {
  section("log_likelihood on the GPU", [] {
    for (const index_t d : {2, 7}) {
      fd::Generator gen{5};
      auto x = fd::randn<double>({48, d}, gen);
      fd::transform(x, [](double v) { return 1.0 + 0.5 * v; }, x);  // data of the flow
      std::vector<double> closed(48);
      for (index_t i = 0; i < 48; ++i) {
        double q = 0;
        for (index_t j = 0; j < d; ++j) q += (x(i, j) - 1.0) * (x(i, j) - 1.0);
        closed[static_cast<std::size_t>(i)] =
            -0.5 * double(d) * std::log(2 * 3.141592653589793 * 0.25) - q / (2 * 0.25);
      }
      for (const auto how :
           {fd::Divergence::exact, fd::Divergence::jacobian, fd::Divergence::hutchinson}) {
        const std::string what = "d = " + str(d) + ", divergence " + str(int(how));
        const auto gpu = likelihood_run<Cuda>(x, how), cpu = likelihood_run<Cpu>(x, how);
        // Dopri5's step sizes come from a device reduction (not the CPU's bits), hence 1e-7.
        expect_close("log_likelihood GPU vs CPU (" + what + ")", gpu, cpu, 1e-7, 1e-7);
        // Hutchinson's probes are random, so only the deterministic ones meet the closed form
        // (the flow's Jacobian is c_t I, so every probe gives the exact trace here: all three).
        expect_close("log_likelihood on the GPU vs the closed form (" + what + ")", gpu, closed,
                     1e-4, 1e-5);
      }
    }
  });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA backend tests\n");
  host_checks();
  host_gemm_mapping();
  host_fused();
  return flowdiff::test::cuda_harness::finish(
      [] {
        // Without a device every allocation must fail cleanly, as a flowdiff exception.
        std::string m;
        expect(throws_with<fd::cuda_error>([] { (void)Cuda::allocate<float>(16); },
                                           {"Cuda::allocate", "cudaMallocAsync"}, &m),
               "allocating without a device throws cuda_error; got: " + m);
      },
      [] {
        device_tensors();
        parallel_loops();
        reductions();
        segment_reductions();
        philox();
        gemm();
        fused_updates();
        likelihoods();
      });
}

}  // namespace flowdiff::test::cuda_backend
