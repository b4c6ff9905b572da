// flowdiff/train/schedule.hpp — learning-rate schedules as plain functions of the step (0-based
// index of the optimizer step about to be taken), so a resumed run gets the same rate from the
// step count alone:
//   linear warmup:  lr(s) = base * min(1, (s + 1) / W)            (the first step already moves)
//   cosine decay:   lr(s) = floor + (base - floor) (1 + cos(pi min(s, T) / T)) / 2
//   warmup+cosine:  linear warmup for s < W, then cosine decay over the remaining T - W steps.
// Call `opt.set_lr(schedule(step))` before `opt.step(ps)`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "flowdiff/core/error.hpp"

namespace flowdiff::train {

/// base * min(1, (step + 1) / warmup_steps); warmup_steps = 0 means no warmup.
inline double linear_warmup(std::int64_t step, double base_lr, std::int64_t warmup_steps) {
  require<config_error>(step >= 0, "linear_warmup: step must be >= 0, got ", step);
  require<config_error>(warmup_steps >= 0, "linear_warmup: warmup_steps must be >= 0, got ", warmup_steps);
  if (step >= warmup_steps) return base_lr;
  return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
}

/// Cosine from base_lr at step 0 to min_lr at step total_steps, constant min_lr afterwards.
inline double cosine_decay(std::int64_t step, double base_lr, std::int64_t total_steps, double min_lr = 0) {
  require<config_error>(step >= 0, "cosine_decay: step must be >= 0, got ", step);
  require<config_error>(total_steps >= 1, "cosine_decay: total_steps must be >= 1, got ", total_steps);
  const double x = static_cast<double>(std::min(step, total_steps)) / static_cast<double>(total_steps);
  return min_lr + (base_lr - min_lr) * 0.5 * (1 + std::cos(std::numbers::pi * x));
}

/// Linear warmup over warmup_steps, then cosine decay to min_lr at total_steps.
inline double warmup_cosine(std::int64_t step, double base_lr, std::int64_t warmup_steps,
                            std::int64_t total_steps, double min_lr = 0) {
  require<config_error>(warmup_steps >= 0 && warmup_steps < total_steps,
                        "warmup_cosine: need 0 <= warmup_steps < total_steps, got warmup_steps ",
                        warmup_steps, " and total_steps ", total_steps);
  if (step < warmup_steps) return linear_warmup(step, base_lr, warmup_steps);
  return cosine_decay(step - warmup_steps, base_lr, total_steps - warmup_steps, min_lr);
}

/// The warmup+cosine schedule as a value: `opt.set_lr(sched(step))`.
struct WarmupCosine {
  double base_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  double min_lr = 0;
  double operator()(std::int64_t step) const {
    return warmup_cosine(step, base_lr, warmup_steps, total_steps, min_lr);
  }
};

}  // namespace flowdiff::train
