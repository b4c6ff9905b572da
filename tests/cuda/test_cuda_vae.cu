// tests/cuda/test_cuda_vae.cu — nn::BackendVAE and train_vae on the CUDA backend, with the check
// bodies of tests/support/backend_vae_checks.hpp (shared with tests/test_nn_backend_vae.cpp, which
// runs them with B = Cpu):
//   host part (always): the bodies with B = Cpu compiled by nvcc's host pass: BackendVAE against
//   nn::VAE on two tiny configurations (forward's noise bit-equal, mu, logvar, x^, the loss, dx and
//   every parameter gradient: fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12 + 1e-12 |ref|),
//   four train_vae steps against the CPU train_vae (fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9
//   |ref|), checkpoints both ways, init, the errors.
//   device part (with a GPU): the same bodies with B = Cuda against the same CPU references (the
//   noise within fill_normal's element-wise rule, fp64 by normalised MSE <= 1e-24: cuBLAS and the
//   device's reductions sum in other orders than nn::VAE), init within fill_uniform's rule, and
//   load_or_train_vae training on the device through its hook (fashion_latent --device cuda).
// A part of the one CUDA test program (test_cuda.cu includes it): `test_cuda vae` runs it, as
// ctest's cuda_vae. Without a device: prints "SKIPPED" and returns 77 after the host part (ctest:
// skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <flowdiff/backend/cuda/all.cuh>

#include "../support/backend_vae_checks.hpp"
#include "harness.hpp"

namespace flowdiff::test::cuda_vae {

namespace fd = flowdiff;
namespace vc = flowdiff::test::vae;
using fd::Cpu;
using fd::Cuda;

namespace {

// The shared section (tests/cuda/harness.hpp) with this program's Log type.
template <class F>
void section(const char* name, bool verbose, F&& body) {
  flowdiff::test::cuda_harness::log_section<vc::Log>(name, verbose, body);
}

void host_checks() {
  section("BackendVAE vs nn::VAE, B = Cpu under nvcc", false, [](vc::Log& log) {
    vc::model_checks<float, Cpu>(log);
    vc::model_checks<double, Cpu>(log);
  });
  section("train_vae(BackendVAE), B = Cpu under nvcc", false, [](vc::Log& log) {
    vc::train_checks<float, Cpu>(log);
    vc::train_checks<double, Cpu>(log);
  });
  section("checkpoints and init, B = Cpu under nvcc", false,
          [](vc::Log& log) { vc::checkpoint_checks<Cpu>(log); });
  section("errors, B = Cpu under nvcc", false, [](vc::Log& log) { vc::error_checks<Cpu>(log); });
}

void device_checks() {
  section("BackendVAE<Cuda> vs nn::VAE", true, [](vc::Log& log) {
    vc::model_checks<float, Cuda>(log);
    vc::model_checks<double, Cuda>(log);
  });
  section("train_vae(BackendVAE<Cuda>) vs train_vae(nn::VAE)", true, [](vc::Log& log) {
    vc::train_checks<float, Cuda>(log);
    vc::train_checks<double, Cuda>(log);
  });
  section("checkpoints and init on Cuda", true,
          [](vc::Log& log) { vc::checkpoint_checks<Cuda>(log); });
  section("load_or_train_vae training on Cuda (its hook)", true,
          [](vc::Log& log) { vc::cache_checks<Cuda>(log); });
  section("errors on Cuda", true, [](vc::Log& log) { vc::error_checks<Cuda>(log); });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA VAE tests\n");
  host_checks();
  return flowdiff::test::cuda_harness::finish([] { device_checks(); });
}

}  // namespace flowdiff::test::cuda_vae
