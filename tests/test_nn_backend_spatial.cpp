// The backend-generic image layers (nn/layers/spatial_kernels.hpp) with B = Cpu: BackendConv2d,
// BackendGroupNorm (plain and fused with SiLU), BackendUpsampleNearest2d and the per-channel
// broadcast against the CPU layers nn::Conv2d, nn::GroupNorm, nn::UpsampleNearest2d and the
// U-Net's add_broadcast / sum_spatial (forward, dx, parameter gradients; DESIGN.md §4 tolerances,
// element-wise 1e-12 in double, bit-equal where the arithmetic is the same), central differences
// in double through the backend layers, the shape / configuration errors, and nn::BackendUNet
// (nn/models/unet_backend.hpp, with and without the midcoder attention) against nn::UNet. The
// bodies are in
// tests/support/backend_spatial_checks.hpp; tests/cuda/test_cuda_layers.cu runs them with
// B = Cuda.
#include <catch2/catch.hpp>
#include <cmath>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/layers/spatial_kernels.hpp>
#include <vector>

#include "support/backend_spatial_checks.hpp"

namespace fd = flowdiff;

namespace test_nn_backend_spatial_detail {

namespace sc = flowdiff::test::spatial;

// Each entry of the log is one assertion (its message says what was compared and how closely).
void report(const sc::Log& log) {
  REQUIRE(!log.checks.empty());
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK(c.ok);
  }
}

}  // namespace test_nn_backend_spatial_detail

TEST_CASE("BackendConv2d<Cpu> matches nn::Conv2d (y, dx, dW, db)", "[nn][backend][spatial]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::conv_checks<float, fd::Cpu>(log);
  sc::conv_checks<double, fd::Cpu>(log);
  CHECK(log.checks.size() >= 2 * 3 * sc::conv_cases().size() - 2);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("BackendGroupNorm<Cpu> matches nn::GroupNorm (+ SiLU)", "[nn][backend][spatial]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::norm_checks<float, fd::Cpu>(log);
  sc::norm_checks<double, fd::Cpu>(log);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("BackendUpsampleNearest2d<Cpu> and the per-channel broadcast are bit-equal to the CPU",
          "[nn][backend][spatial]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::upsample_checks<float, fd::Cpu>(log);
  sc::upsample_checks<double, fd::Cpu>(log);
  sc::broadcast_checks<float, fd::Cpu>(log);
  sc::broadcast_checks<double, fd::Cpu>(log);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("Backend spatial layers<Cpu>: gradients match central differences",
          "[nn][backend][spatial][gradcheck]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::gradcheck_conv<fd::Cpu>(log);
  sc::gradcheck_norm<fd::Cpu>(log);
  sc::gradcheck_upsample_broadcast<fd::Cpu>(log);
  CHECK(log.checks.size() == 9);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("Backend spatial layers<Cpu>: errors name the layer, the expected and the actual shape",
          "[nn][backend][spatial]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::error_checks<fd::Cpu>(log);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("BackendUNet<Cpu> (with and without attention) matches nn::UNet",
          "[nn][backend][spatial][unet]") {
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  sc::unet_checks<float, fd::Cpu>(log);
  sc::unet_checks<double, fd::Cpu>(log);
  test_nn_backend_spatial_detail::report(log);
}

TEST_CASE("The spatial checks fail when they should", "[nn][backend][spatial]") {
  // The comparison helpers themselves: a wrong value, a NaN, an all-zero reference.
  namespace sc = flowdiff::test::spatial;
  sc::Log log;
  const std::vector<float> ref{1.0f, -2.0f, 3.0f}, zero{0.0f, 0.0f, 0.0f};
  sc::compare(log, "off by 1e-2", std::vector<float>{1.0f, -2.0f, 3.03f}, ref,
              sc::tolerance<float, fd::Cpu>());
  sc::compare(log, "NaN", std::vector<float>{1.0f, NAN, 3.0f}, ref,
              sc::tolerance<float, fd::Cpu>());
  sc::compare(log, "zero reference", zero, zero, sc::tolerance<float, fd::Cpu>());
  sc::compare(log, "1 ulp in double", std::vector<double>{1.0, -2.0, 3.0 + 1e-9},
              std::vector<double>{1.0, -2.0, 3.0}, sc::tolerance<double, fd::Cpu>());
  sc::compare_exact(log, "one bit", std::vector<float>{1.0f, -2.0f, std::nextafter(3.0f, 4.0f)},
                    ref);
  sc::compare_exact(log, "exact zero reference", zero, zero);
  REQUIRE(log.checks.size() == 6);
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK_FALSE(c.ok);
  }
  sc::Log good;
  sc::compare(good, "equal", ref, ref, sc::tolerance<float, fd::Cpu>());
  sc::compare_exact(good, "equal", ref, ref);
  CHECK(good.failures() == 0);
}
