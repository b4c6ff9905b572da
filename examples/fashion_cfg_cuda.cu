// fashion_cfg_cuda — examples/fashion_cfg.cpp compiled by nvcc (linked to flowdiff::cuda): the same
// program, whose --device cuda trains and samples the U-Net on a GPU when one is usable (and
// otherwise says so in one line and runs on the CPU). Built when CMake finds the CUDA toolkit.
#include "fashion_cfg.cpp"
