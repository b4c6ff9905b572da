// tests/cuda/test_cuda_unet.cu — nn::BackendUNet trained by train::BackendTrainer and sampled
// through nn::as_field on the CUDA backend, with the check bodies of
// tests/support/backend_unet_checks.hpp (shared with tests/test_nn_backend_unet.cpp, which runs
// them with B = Cpu):
//   host part (always): the bodies with B = Cpu compiled by nvcc's host pass: four CFM steps with
//   CFG dropout, AdamW, clipping and EMA against train::Trainer + nn::UNet (losses, gradient norm,
//   parameters, EMA element-wise: fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|), an interrupted
//   + resumed run bit-equal to the straight one and its checkpoint loaded by Trainer + nn::UNet,
//   Euler / Heun sampling plain and under cfg w = 3 against as_field(nn::UNet) (same rule), the
//   errors (attention, labels outside [0, K], class counts).
//   device part (with a GPU): the same bodies with B = Cuda against the same CPU references and
//   rules (the products are cuBLAS's and the reductions the device's fixed-order ones, so the
//   summation orders differ from nn::UNet's as the CPU backend's do), resume bit for bit on the
//   device (its kernels and reductions are deterministic), device labels refused by count.
// Without a device: prints "SKIPPED" and exits with 77 after the host part (ctest: skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <string>

#include "../support/backend_unet_checks.hpp"

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

int failures = 0;
int checks = 0;

// Runs one body into a fresh log; prints its verdict, every failure and, with `verbose`, every
// check (the measured errors and bit-equal counts, worth reading on a first run on a GPU).
template <class F>
void section(const char* name, bool verbose, F&& body) {
  ut::Log log;
  try {
    body(log);
  } catch (const std::exception& e) {
    log.expect(false, std::string("unexpected exception: ") + e.what());
  }
  if (log.checks.empty()) log.expect(false, "the section checked nothing");
  const int failed = log.failures();
  checks += static_cast<int>(log.checks.size());
  failures += failed;
  std::printf("%-56s %s (%zu checks)\n", name, failed == 0 ? "ok" : "FAILED", log.checks.size());
  for (const auto& c : log.checks)
    if (!c.ok || verbose) std::printf("  %s %s\n", c.ok ? "ok  " : "FAIL", c.what.c_str());
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

int main() {
  std::printf("flowdiff CUDA U-Net training and sampling tests\n");
  host_checks();
  std::string why;
  if (fd::cuda::device_count(&why) == 0) {
    if (failures > 0) {
      std::printf("%d of %d host checks FAILED\n", failures, checks);
      return 1;
    }
    std::printf(
        "host checks: %d passed\nSKIPPED: no CUDA device (%s); the device checks did not run\n",
        checks, why.c_str());
    return 77;
  }
  const auto info = fd::cuda::device_info();
  std::printf("device %d: %s, compute capability %d.%d\n", info.index, info.name.c_str(),
              info.compute_major, info.compute_minor);
  device_checks();
  std::printf("%s: %d checks, %d failed\n", failures == 0 ? "ok" : "FAILED", checks, failures);
  return failures == 0 ? 0 : 1;
}
