// The backend-generic token layers (nn/layers/token_kernels.hpp) and nn::BackendDiT<T, Cpu>
// (nn/models/dit_backend.hpp) against the CPU layers and nn::DiT: BackendLinear (plain and with
// the GELU fused), BackendLayerNorm, GELU (tanh), the adaLN modulation and gate, patchify /
// unpatchify (bit-equal), BackendPatchEmbed and BackendMultiheadSelfAttention (outputs, dx and
// every parameter gradient: fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12); central
// differences in double through the backend layers; BackendDiT against nn::DiT on two tiny
// configurations; four BackendTrainer steps against Trainer + nn::DiT and Euler sampling (plain,
// cfg w = 3) through as_field against nn::DiT (fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|);
// the errors. The bodies are in tests/support/backend_dit_checks.hpp; tests/cuda/test_cuda_dit.cu
// runs them with B = Cuda.
#include <catch2/catch.hpp>
#include <flowdiff/backend/dispatch.hpp>
#include <flowdiff/nn/models/dit_backend.hpp>
#include <flowdiff/train/backend_trainer.hpp>

#include "support/backend_dit_checks.hpp"

namespace fd = flowdiff;

namespace test_nn_backend_dit_detail {

namespace dc = flowdiff::test::dit;

// Each entry of the log is one assertion (its message says what was compared and how closely).
void report(const dc::Log& log) {
  REQUIRE(!log.checks.empty());
  for (const auto& c : log.checks) {
    INFO(c.what);
    CHECK(c.ok);
  }
}

// What BackendTrainer and the samplers accept, at compile time.
static_assert(fd::train::BackendTrainable<fd::nn::BackendDiT<float, fd::Cpu>, float, fd::Cpu>);
static_assert(!fd::train::BackendTrainable<fd::nn::BackendDiT<float, fd::Cpu>, double, fd::Cpu>);
static_assert(fd::nn::FieldModel<fd::nn::BackendDiT<double, fd::Cpu>>);
static_assert(fd::Field<fd::nn::ModelField<fd::nn::BackendDiT<float, fd::Cpu>>, float, fd::Cpu>);
static_assert(
    fd::ConditionalField<fd::nn::ModelField<fd::nn::BackendDiT<double, fd::Cpu>>, double, fd::Cpu>);

}  // namespace test_nn_backend_dit_detail

TEST_CASE("Backend token layers<Cpu> match the CPU layers", "[nn][backend][dit]") {
  namespace dc = flowdiff::test::dit;
  dc::Log log;
  dc::layer_checks<float, fd::Cpu>(log);
  dc::layer_checks<double, fd::Cpu>(log);
  dc::gradcheck_checks<fd::Cpu>(log);
  test_nn_backend_dit_detail::report(log);
}

TEST_CASE("BackendDiT<Cpu> matches nn::DiT (output, dx, every gradient)", "[nn][backend][dit]") {
  namespace dc = flowdiff::test::dit;
  dc::Log log;
  dc::dit_checks<float, fd::Cpu>(log);
  dc::dit_checks<double, fd::Cpu>(log);
  test_nn_backend_dit_detail::report(log);
}

TEST_CASE("BackendTrainer<Cpu> + BackendDiT trains and samples as Trainer + nn::DiT",
          "[nn][backend][dit][train]") {
  namespace dc = flowdiff::test::dit;
  dc::Log log;
  dc::train_checks<float, fd::Cpu>(log);
  dc::train_checks<double, fd::Cpu>(log);
  dc::sample_checks<float, fd::Cpu>(log);
  dc::sample_checks<double, fd::Cpu>(log);
  test_nn_backend_dit_detail::report(log);
}

TEST_CASE("BackendDiT<Cpu> and the token layers refuse bad shapes, labels and configurations",
          "[nn][backend][dit]") {
  namespace dc = flowdiff::test::dit;
  dc::Log log;
  dc::error_checks<fd::Cpu>(log);
  test_nn_backend_dit_detail::report(log);
}
