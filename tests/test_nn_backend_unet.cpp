// nn::BackendUNet<T, Cpu> trained by train::BackendTrainer and sampled through nn::as_field,
// against train::Trainer and as_field with nn::UNet from the same weights and seeds: a few CFM
// steps with CFG dropout, AdamW (eps 1e-6), clipping and EMA (losses, gradient norm, parameters,
// EMA element-wise: fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|, because the conv / GroupNorm
// sums run in another order than nn::UNet's; the generator offset exactly), an interrupted +
// resumed run equal to the straight one bit for bit and its checkpoint loaded by Trainer +
// nn::UNet, Euler / Heun sampling plain and under cfg w = 3 (same rule), and the errors (attention
// heads, labels outside [0, K], class counts). The bodies are in
// tests/support/backend_unet_checks.hpp; tests/cuda/test_cuda_unet.cu runs them with B = Cuda.
#include <catch2/catch.hpp>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/models/mlp_backend.hpp>
#include <flowdiff/nn/models/unet_backend.hpp>
#include <flowdiff/train/backend_trainer.hpp>

#include "support/backend_unet_checks.hpp"

namespace fd = flowdiff;

namespace test_nn_backend_unet_detail {

namespace ut = flowdiff::test::unet_train;

// Each entry of the log is one assertion (its message says what was compared and how closely).
void report(const ut::Log& log) {
  REQUIRE(!log.checks.empty());
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK(c.ok);
  }
}

// What BackendTrainer accepts as a model, at compile time.
static_assert(fd::train::BackendTrainable<fd::nn::BackendUNet<float, fd::Cpu>, float, fd::Cpu>);
static_assert(fd::train::BackendTrainable<fd::nn::BackendMLP<double, fd::Cpu>, double, fd::Cpu>);
static_assert(!fd::train::BackendTrainable<fd::nn::BackendUNet<float, fd::Cpu>, double, fd::Cpu>);
static_assert(!fd::train::BackendTrainable<fd::nn::UNetConfig, float, fd::Cpu>);
static_assert(fd::nn::FieldModel<fd::nn::BackendUNet<float, fd::Cpu>>);
static_assert(fd::Field<fd::nn::ModelField<fd::nn::BackendUNet<float, fd::Cpu>>, float, fd::Cpu>);
static_assert(fd::ConditionalField<fd::nn::ModelField<fd::nn::BackendUNet<double, fd::Cpu>>, double,
                                   fd::Cpu>);

}  // namespace test_nn_backend_unet_detail

TEST_CASE("BackendTrainer<Cpu> trains BackendUNet as Trainer trains nn::UNet",
          "[nn][backend][unet][train]") {
  namespace ut = flowdiff::test::unet_train;
  ut::Log log;
  ut::train_checks<float, fd::Cpu>(log);
  ut::train_checks<double, fd::Cpu>(log);
  test_nn_backend_unet_detail::report(log);
}

TEST_CASE("BackendTrainer<Cpu> + BackendUNet: resume bit for bit; the file loads into Trainer",
          "[nn][backend][unet][train]") {
  namespace ut = flowdiff::test::unet_train;
  ut::Log log;
  ut::checkpoint_checks<fd::Cpu>(log);
  test_nn_backend_unet_detail::report(log);
}

TEST_CASE("as_field(BackendUNet<Cpu>) samples as as_field(nn::UNet) (Euler, Heun, cfg)",
          "[nn][backend][unet][sample]") {
  namespace ut = flowdiff::test::unet_train;
  ut::Log log;
  ut::sample_checks<float, fd::Cpu>(log);
  ut::sample_checks<double, fd::Cpu>(log);
  test_nn_backend_unet_detail::report(log);
}

TEST_CASE("BackendUNet<Cpu>: attention heads, bad labels and class counts are refused by name",
          "[nn][backend][unet]") {
  namespace ut = flowdiff::test::unet_train;
  ut::Log log;
  ut::error_checks<fd::Cpu>(log);
  test_nn_backend_unet_detail::report(log);
}
