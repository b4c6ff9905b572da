// toy2d_cuda — examples/toy2d.cpp compiled by nvcc (linked to flowdiff::cuda): the same program,
// whose --device cuda trains the MLPs on a GPU when one is usable (and otherwise says so in one
// line and runs on the CPU). Built when CMake finds the CUDA toolkit.
#include "toy2d.cpp"
