// flowdiff/backend/cuda/all.cuh — the whole CUDA backend in one include (nvcc only): the error
// checks, the Cuda backend with host <-> device copies, cuBLAS GEMM, the fused sampler updates and
// BackendOps<Cuda> (gemm and transfers for backend-generic code such as nn::BackendMLP).
// Generic flowdiff headers (flowdiff/flowdiff.hpp) work on Tensor<T, Cuda> once this is included.
#pragma once

#include "flowdiff/backend/cuda/blas.cuh"
#include "flowdiff/backend/cuda/cuda.cuh"
#include "flowdiff/backend/cuda/dispatch.cuh"
#include "flowdiff/backend/cuda/error.cuh"
#include "flowdiff/backend/cuda/fused_update.cuh"
