// flowdiff/paths/paths.hpp — every probability-path header in one include: schedules
// x = alpha_t z + beta_t eps with exact derivatives, their checks and log-SNR, the Gaussian path and
// its conditional targets, conversions between velocity, score, noise, data and v parametrisations,
// DDPM and VE noise-schedule converters, and re-targeting a velocity field to another schedule.
#pragma once

#include "flowdiff/paths/check_schedule.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/gaussian_path.hpp"
#include "flowdiff/paths/log_snr.hpp"
#include "flowdiff/paths/noise_schedules.hpp"
#include "flowdiff/paths/retarget.hpp"
#include "flowdiff/paths/schedule.hpp"
