// tests/cuda/test_cuda_dit.cu — the backend-generic token layers (nn/layers/token_kernels.hpp) and
// nn::BackendDiT (nn/models/dit_backend.hpp) on the CUDA backend, with the check bodies of
// tests/support/backend_dit_checks.hpp (shared with tests/test_nn_backend_dit.cpp, which runs them
// with B = Cpu):
//   host part (always): the bodies with B = Cpu compiled by nvcc's host pass: BackendLinear (plain
//   and with the GELU fused), BackendLayerNorm, GELU (tanh), the adaLN modulation and gate,
//   patchify / unpatchify (bit-equal), BackendPatchEmbed and BackendMultiheadSelfAttention against
//   the CPU layers (fp32 normalised MSE <= 1e-7, fp64 element-wise 1e-12); central differences in
//   double; BackendDiT against nn::DiT on two tiny configurations; four BackendTrainer steps
//   against Trainer + nn::DiT and Euler sampling (plain, cfg w = 3) against as_field(nn::DiT)
//   (fp32 1e-5 + 1e-4 |ref|, fp64 1e-11 + 1e-9 |ref|); the errors.
//   device part (with a GPU): the same bodies with B = Cuda against the same CPU references (fp32
//   normalised MSE <= 1e-7 and fp64 <= 1e-24: the products are cuBLAS's, the per-head products
//   one strided-batched call per head; GELU element-wise at the fp32 rule: the same explicitly
//   rounded operations; patches bit-equal), central differences through the device layers, the
//   trainer and sampler rules as on the host, device labels refused by count.
// A part of the one CUDA test program (test_cuda.cu includes it): `test_cuda dit` runs it, as
// ctest's cuda_dit. Without a device: prints "SKIPPED" and returns 77 after the host part (ctest:
// skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <flowdiff/backend/cuda/all.cuh>
#include <string>

#include "../support/backend_dit_checks.hpp"
#include "harness.hpp"

namespace flowdiff::test::cuda_dit {

namespace fd = flowdiff;
namespace dc = flowdiff::test::dit;
using fd::Cpu;
using fd::Cuda;

namespace {

// BackendTrainer's model and the samplers' fields, on the device, at compile time.
static_assert(fd::train::BackendTrainable<fd::nn::BackendDiT<float, Cuda>, float, Cuda>);
static_assert(fd::Field<fd::nn::ModelField<fd::nn::BackendDiT<float, Cuda>>, float, Cuda>);
static_assert(
    fd::ConditionalField<fd::nn::ModelField<fd::nn::BackendDiT<double, Cuda>>, double, Cuda>);

// The shared section (tests/cuda/harness.hpp) with this program's Log type.
template <class F>
void section(const char* name, bool verbose, F&& body) {
  flowdiff::test::cuda_harness::log_section<dc::Log>(name, verbose, body);
}

void host_checks() {
  section("token layers, B = Cpu under nvcc", false, [](dc::Log& log) {
    dc::layer_checks<float, Cpu>(log);
    dc::layer_checks<double, Cpu>(log);
  });
  section("central differences, B = Cpu under nvcc", false,
          [](dc::Log& log) { dc::gradcheck_checks<Cpu>(log); });
  section("BackendDiT, B = Cpu under nvcc", false, [](dc::Log& log) {
    dc::dit_checks<float, Cpu>(log);
    dc::dit_checks<double, Cpu>(log);
  });
  section("BackendTrainer + as_field(BackendDiT), B = Cpu under nvcc", false, [](dc::Log& log) {
    dc::train_checks<float, Cpu>(log);
    dc::train_checks<double, Cpu>(log);
    dc::sample_checks<float, Cpu>(log);
    dc::sample_checks<double, Cpu>(log);
  });
  section("errors, B = Cpu under nvcc", false, [](dc::Log& log) { dc::error_checks<Cpu>(log); });
}

void device_checks() {
  section("token layers on Cuda vs the CPU layers", true, [](dc::Log& log) {
    dc::layer_checks<float, Cuda>(log);
    dc::layer_checks<double, Cuda>(log);
  });
  section("central differences on Cuda", true,
          [](dc::Log& log) { dc::gradcheck_checks<Cuda>(log); });
  section("BackendDiT<Cuda> vs nn::DiT", true, [](dc::Log& log) {
    dc::dit_checks<float, Cuda>(log);
    dc::dit_checks<double, Cuda>(log);
  });
  section("BackendTrainer<Cuda> + as_field(BackendDiT<Cuda>) vs nn::DiT", true, [](dc::Log& log) {
    dc::train_checks<float, Cuda>(log);
    dc::train_checks<double, Cuda>(log);
    dc::sample_checks<float, Cuda>(log);
    dc::sample_checks<double, Cuda>(log);
  });
  section("errors on Cuda", false, [](dc::Log& log) { dc::error_checks<Cuda>(log); });
}

}  // namespace

int run() {
  std::printf("flowdiff CUDA token-layer and DiT tests\n");
  host_checks();
  return flowdiff::test::cuda_harness::finish([] { device_checks(); });
}

}  // namespace flowdiff::test::cuda_dit
