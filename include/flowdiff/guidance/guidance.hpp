// flowdiff/guidance/guidance.hpp — guidance in one include: classifier-free guidance
// u~ = (1 - w) u(x|∅) + w u(x|y) with optional rescale, classifier guidance
// u~ = u(x) + w b_t ∇_x log p_t(y|x), and guidance scales w(t) (constant, limited interval, callable).
#pragma once

#include "flowdiff/guidance/cfg.hpp"
#include "flowdiff/guidance/classifier.hpp"
#include "flowdiff/guidance/scale.hpp"
