// tests/cuda/test_cuda_unet.cu — nn::BackendUNet trained by train::BackendTrainer and sampled
// through nn::as_field on the CUDA backend, with the check bodies of
// tests/support/backend_unet_checks.hpp (shared with tests/test_nn_backend_unet.cpp, which runs
// them with B = Cpu):
//   host part (always): the bodies with B = Cpu compiled by nvcc's host pass: four CFM steps with
//   CFG dropout, AdamW, clipping and EMA against train::Trainer + nn::UNet (losses, gradient norm,
//   parameters, EMA element-wise: fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|), an interrupted
//   + resumed run bit-equal to the straight one and its checkpoint loaded by Trainer + nn::UNet,
//   Euler / Heun sampling plain and under cfg w = 3 against as_field(nn::UNet) (same rule), the
//   errors (attention heads, labels outside [0, K], class counts).
//   device part (with a GPU): the same bodies with B = Cuda against the same CPU references and
//   rules (the products are cuBLAS's and the reductions the device's fixed-order ones, so the
//   summation orders differ from nn::UNet's as the CPU backend's do), resume bit for bit on the
//   device (its kernels and reductions are deterministic), device labels refused by count.
// A part of the one CUDA test program (test_cuda.cu includes it): `test_cuda unet` runs it, as
// ctest's cuda_unet. Without a device: prints "SKIPPED" and returns 77 after the host part (ctest:
// skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <string>

#include "../support/backend_unet_checks.hpp"
#include "harness.hpp"

namespace flowdiff::test::cuda_unet {

namespace fd = flowdiff;
namespace ut = flowdiff::test::unet_train;
using fd::Cpu;
using fd::Cuda;

namespace {

// BackendTrainer's model and the samplers' fields, on the device, at compile time.
static_assert(fd::train::BackendTrainable<fd::nn::BackendUNet<float, Cuda>, float, Cuda>);
static_assert(fd::Field<fd::nn::ModelField<fd::nn::BackendUNet<float, Cuda>>, float, Cuda>);
static_assert(
    fd::ConditionalField<fd::nn::ModelField<fd::nn::BackendUNet<float, Cuda>>, float, Cuda>);

// The shared section (tests/cuda/harness.hpp) with this program's Log type.
template <class F>
void section(const char* name, bool verbose, F&& body) {
  flowdiff::test::cuda_harness::log_section<ut::Log>(name, verbose, body);
}

void host_checks() {
  section("BackendTrainer + BackendUNet, B = Cpu under nvcc", false, [](ut::Log& log) {
    ut::train_checks<float, Cpu>(log);
    ut::train_checks<double, Cpu>(log);
  });
  section("checkpoints, B = Cpu under nvcc", false,
          [](ut::Log& log) { ut::checkpoint_checks<Cpu>(log); });
  section("as_field(BackendUNet), B = Cpu under nvcc", false, [](ut::Log& log) {
    ut::sample_checks<float, Cpu>(log);
    ut::sample_checks<double, Cpu>(log);
  });
  section("errors, B = Cpu under nvcc", false, [](ut::Log& log) { ut::error_checks<Cpu>(log); });
}

void device_checks() {
  section("BackendTrainer<Cuda> + BackendUNet vs Trainer + nn::UNet", true, [](ut::Log& log) {
    ut::train_checks<float, Cuda>(log);
    ut::train_checks<double, Cuda>(log);
  });
  section("checkpoints on Cuda", true, [](ut::Log& log) { ut::checkpoint_checks<Cuda>(log); });
  section("as_field(BackendUNet<Cuda>) vs as_field(nn::UNet)", true, [](ut::Log& log) {
    ut::sample_checks<float, Cuda>(log);
    ut::sample_checks<double, Cuda>(log);
  });
  section("errors on Cuda", true, [](ut::Log& log) { ut::error_checks<Cuda>(log); });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA U-Net training and sampling tests\n");
  host_checks();
  return flowdiff::test::cuda_harness::finish([] { device_checks(); });
}

}  // namespace flowdiff::test::cuda_unet
