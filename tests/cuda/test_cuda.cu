// tests/cuda/test_cuda.cu — the one CUDA test program: the six parts (test_cuda_<part>.cu, each in
// its own namespace flowdiff::test::cuda_<part> with a run() in place of main) compiled as one nvcc
// translation unit. They share most of their template instantiations (the CPU models and layers
// they compare against, the backend-generic models on Cpu and Cuda), so one compilation costs about
// a third of six separate programs' (153 s of CPU instead of about 460 s, measured with nvcc 13 on
// the development machine): the largest single saving of CI time.
//
//   test_cuda PART...   runs the named parts in order, each from a fresh tally (as separate
//                       programs would); ctest runs one part per entry (cuda_backend, cuda_mlp,
//                       ...)
//   test_cuda all       runs every part
//   test_cuda --list    prints the parts and what each checks
//
// Exit status: 1 if a part failed or an argument is not a part; else 77 (ctest's SKIP_RETURN_CODE)
// if a part skipped its device checks (no CUDA device); else 0.
#include "test_cuda_backend.cu"
#include "test_cuda_dit.cu"
#include "test_cuda_layers.cu"
#include "test_cuda_mlp.cu"
#include "test_cuda_unet.cu"
#include "test_cuda_vae.cu"

namespace {

struct Part {
  const char* name;
  const char* what;
  int (*run)();
};

constexpr Part parts[] = {
    {"backend", "device tensors, parallel_for, reductions, Philox, cuBLAS GEMM, fused updates",
     flowdiff::test::cuda_backend::run},
    {"mlp", "BackendMLP, BackendTrainer, optimizers, checkpoints, sampling",
     flowdiff::test::cuda_mlp::run},
    {"layers", "image layers, BackendUNet forward/backward, BatchNorm, classifier",
     flowdiff::test::cuda_layers::run},
    {"unet", "BackendUNet training, checkpoints and sampling", flowdiff::test::cuda_unet::run},
    {"vae", "BackendVAE and train_vae", flowdiff::test::cuda_vae::run},
    {"dit", "token layers, BackendDiT, its training and sampling", flowdiff::test::cuda_dit::run},
};

const Part* find_part(const std::string& name) {
  for (const Part& p : parts)
    if (name == p.name) return &p;
  return nullptr;
}

int usage(const char* program) {
  std::printf("usage: %s PART... | all | --list\nparts:", program);
  for (const Part& p : parts) std::printf(" %s", p.name);
  std::printf("\n");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<const Part*> chosen;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--list") {
      for (const Part& p : parts) std::printf("%-8s %s\n", p.name, p.what);
      return 0;
    }
    if (arg == "all") {
      for (const Part& p : parts) chosen.push_back(&p);
    } else if (const Part* p = find_part(arg)) {
      chosen.push_back(p);
    } else {
      std::printf("test_cuda: unknown part '%s'\n", arg.c_str());
      return usage(argv[0]);
    }
  }
  if (chosen.empty()) return usage(argv[0]);

  bool failed = false;
  bool skipped = false;
  for (const Part* p : chosen) {
    flowdiff::test::cuda_harness::tally = {};
    if (chosen.size() > 1) std::printf("\n===== part %s\n", p->name);
    const int rc = p->run();
    failed = failed || (rc != 0 && rc != 77);
    skipped = skipped || rc == 77;
  }
  return failed ? 1 : skipped ? 77 : 0;
}
