// flowdiff/analytic/analytic.hpp — the exact oracles in one include: labelled Gaussian mixtures with
// their closed-form marginals p_t, vector fields, scores, data/noise predictions and classifier
// gradients under any Schedule (see gaussian_mixture.hpp for the equations).
#pragma once

#include "flowdiff/analytic/gaussian_mixture.hpp"
#include "flowdiff/analytic/mixture_kernel.hpp"
