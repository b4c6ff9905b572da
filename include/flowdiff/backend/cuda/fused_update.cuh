// flowdiff/backend/cuda/fused_update.cuh — the fused sampler updates (CFG combination + Euler or
// Euler–Maruyama step + noise in one kernel) under their CUDA-backend names. They are
// backend-generic and live in flowdiff/samplers/fused.hpp; with B = Cuda each is one kernel on the
// per-thread default stream. Euler and EulerMaruyama use them by themselves under a Cfg field.
#pragma once

#include "flowdiff/backend/cuda/cuda.cuh"
#include "flowdiff/samplers/fused.hpp"

namespace flowdiff::cuda {

using flowdiff::cfg_euler_maruyama_step;
using flowdiff::cfg_euler_step;
using flowdiff::euler_maruyama_coefficients;
using flowdiff::FusedStep;

}  // namespace flowdiff::cuda
