// flowdiff/flowdiff.hpp — the whole library in one include: `#include <flowdiff/flowdiff.hpp>`.
// Every public header of the CPU library, grouped by layer from the bottom (DESIGN.md §2). The CUDA
// backend (flowdiff/backend/cuda/) is not included here: include it explicitly from .cu files
// compiled by nvcc, so that CPU-only users never need the CUDA toolkit. The test
// umbrella_header_complete fails when a public header is missing from this list.
#pragma once

// core: configuration, errors, shapes, tensors and views, RNG, element-wise ops, fields
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/shape.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/core/thread_team.hpp"

// backend: the Backend concept and the CPU backend (OpenMP, own AVX2/AVX-512 float GEMM, Eigen)
#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/backend/cpu/sgemm.hpp"
#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/backend/segment_reduce.hpp"

// paths: schedules, Gaussian paths, parametrisation converters
#include "flowdiff/paths/check_schedule.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/gaussian_path.hpp"
#include "flowdiff/paths/log_snr.hpp"
#include "flowdiff/paths/noise_schedules.hpp"
#include "flowdiff/paths/paths.hpp"
#include "flowdiff/paths/retarget.hpp"
#include "flowdiff/paths/schedule.hpp"

// analytic: exact distributions and their fields (the test oracles)
#include "flowdiff/analytic/analytic.hpp"
#include "flowdiff/analytic/gaussian_mixture.hpp"
#include "flowdiff/analytic/mixture_kernel.hpp"

// guidance: classifier-free and classifier guidance as field adapters
#include "flowdiff/guidance/cfg.hpp"
#include "flowdiff/guidance/classifier.hpp"
#include "flowdiff/guidance/guidance.hpp"
#include "flowdiff/guidance/scale.hpp"

// samplers: time grids, ODE and SDE steppers, integrate(), likelihoods
#include "flowdiff/samplers/adaptive.hpp"
#include "flowdiff/samplers/dpm_solver.hpp"
#include "flowdiff/samplers/fused.hpp"
#include "flowdiff/samplers/grid.hpp"
#include "flowdiff/samplers/integrate.hpp"
#include "flowdiff/samplers/likelihood.hpp"
#include "flowdiff/samplers/ode.hpp"
#include "flowdiff/samplers/sde.hpp"

// metrics: sample-quality metrics
#include "flowdiff/metrics/classifier_metrics.hpp"
#include "flowdiff/metrics/distances.hpp"
#include "flowdiff/metrics/frechet.hpp"

// nn: the flat parameter store, the layers and the gradient checker of the networks
#include "flowdiff/nn/checkpoint.hpp"
#include "flowdiff/nn/parameters.hpp"
#include "flowdiff/nn/gradcheck.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/attention.hpp"
#include "flowdiff/nn/layers/batchnorm.hpp"
#include "flowdiff/nn/layers/broadcast.hpp"
#include "flowdiff/nn/layers/conv.hpp"
#include "flowdiff/nn/layers/conv_phases.hpp"
#include "flowdiff/nn/layers/conv_transpose.hpp"
#include "flowdiff/nn/layers/cross_entropy.hpp"
#include "flowdiff/nn/layers/dropout.hpp"
#include "flowdiff/nn/layers/embedding.hpp"
#include "flowdiff/nn/layers/kernels.hpp"
#include "flowdiff/nn/layers/layer_check.hpp"
#include "flowdiff/nn/layers/linear.hpp"
#include "flowdiff/nn/layers/modulation.hpp"
#include "flowdiff/nn/layers/norm.hpp"
#include "flowdiff/nn/layers/patchify.hpp"
#include "flowdiff/nn/layers/pooling.hpp"
#include "flowdiff/nn/layers/spatial_kernels.hpp"
#include "flowdiff/nn/layers/token_kernels.hpp"
#include "flowdiff/nn/layers/upsample.hpp"
#include "flowdiff/nn/layers/winograd.hpp"
#include "flowdiff/nn/models/classifier.hpp"
#include "flowdiff/nn/models/classifier_backend.hpp"
#include "flowdiff/nn/models/dit.hpp"
#include "flowdiff/nn/models/dit_backend.hpp"
#include "flowdiff/nn/models/mlp.hpp"
#include "flowdiff/nn/models/mlp_backend.hpp"
#include "flowdiff/nn/models/unet.hpp"
#include "flowdiff/nn/models/unet_backend.hpp"
#include "flowdiff/nn/models/vae.hpp"
#include "flowdiff/nn/models/vae_backend.hpp"
#include "flowdiff/nn/as_field.hpp"
#include "flowdiff/nn/latent.hpp"
#include "flowdiff/nn/transfer.hpp"

// io: files, images and plots (PNG encoding links flowdiff::io)
#include "flowdiff/io/file.hpp"
#include "flowdiff/io/image.hpp"
#include "flowdiff/io/plot.hpp"
#include "flowdiff/io/safetensors.hpp"

// train: objectives (CFM, CFG-CFM, DSM), time samplers, the trainer, optimizers, learning-rate
// schedules, EMA, gradient clipping
#include "flowdiff/train/backend_trainer.hpp"
#include "flowdiff/train/clip.hpp"
#include "flowdiff/train/ema.hpp"
#include "flowdiff/train/objective.hpp"
#include "flowdiff/train/optimizer.hpp"
#include "flowdiff/train/progress.hpp"
#include "flowdiff/train/schedule.hpp"
#include "flowdiff/train/time_sampler.hpp"
#include "flowdiff/train/trainer.hpp"
#include "flowdiff/train/vae.hpp"
#include "flowdiff/train/vae_backend.hpp"

// data: toy 2D distributions, image data sets, the IDX reader and Fashion-MNIST (the loaders link
// flowdiff::io), mini-batches
#include "flowdiff/data/batcher.hpp"
#include "flowdiff/data/dataset.hpp"
#include "flowdiff/data/fashion_mnist.hpp"
#include "flowdiff/data/idx.hpp"
#include "flowdiff/data/toy2d.hpp"
