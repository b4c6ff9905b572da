// nn::BackendVAE<T, Cpu> (nn/models/vae_backend.hpp) and train_vae on it (train/vae_backend.hpp)
// against nn::VAE and the CPU train_vae from the same weights and seeds: forward's noise
// (bit-equal), mu, logvar, x^, the loss, dx and every parameter gradient on two tiny
// configurations (fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12 + 1e-12 |ref|), four
// training steps (fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|), checkpoints both ways, init,
// and the errors. The bodies are in tests/support/backend_vae_checks.hpp; tests/cuda/
// test_cuda_vae.cu runs them with B = Cuda.
#include <catch2/catch.hpp>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/models/vae_backend.hpp>
#include <flowdiff/train/vae_backend.hpp>

#include "support/backend_vae_checks.hpp"

namespace fd = flowdiff;

namespace test_nn_backend_vae_detail {

namespace vc = flowdiff::test::vae;

// Each entry of the log is one assertion (its message says what was compared and how closely).
void report(const vc::Log& log) {
  REQUIRE(!log.checks.empty());
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK(c.ok);
  }
}

}  // namespace test_nn_backend_vae_detail

TEST_CASE("BackendVAE<Cpu> computes nn::VAE's encode, decode, loss and gradients",
          "[nn][backend][vae]") {
  namespace vc = flowdiff::test::vae;
  vc::Log log;
  vc::model_checks<float, fd::Cpu>(log);
  vc::model_checks<double, fd::Cpu>(log);
  test_nn_backend_vae_detail::report(log);
}

TEST_CASE("train_vae(BackendVAE<Cpu>) follows train_vae(nn::VAE)", "[nn][backend][vae][train]") {
  namespace vc = flowdiff::test::vae;
  vc::Log log;
  vc::train_checks<float, fd::Cpu>(log);
  vc::train_checks<double, fd::Cpu>(log);
  test_nn_backend_vae_detail::report(log);
}

TEST_CASE("BackendVAE<Cpu>: checkpoints both ways and init", "[nn][backend][vae]") {
  namespace vc = flowdiff::test::vae;
  vc::Log log;
  vc::checkpoint_checks<fd::Cpu>(log);
  test_nn_backend_vae_detail::report(log);
}

TEST_CASE("load_or_train_vae trains BackendVAE<Cpu> through its hook and caches the result",
          "[nn][backend][vae][train]") {
  namespace vc = flowdiff::test::vae;
  vc::Log log;
  vc::cache_checks<fd::Cpu>(log);
  test_nn_backend_vae_detail::report(log);
}

TEST_CASE("BackendVAE<Cpu>: errors name the model, the argument and the shapes",
          "[nn][backend][vae][errors]") {
  namespace vc = flowdiff::test::vae;
  vc::Log log;
  vc::error_checks<fd::Cpu>(log);
  test_nn_backend_vae_detail::report(log);
}
