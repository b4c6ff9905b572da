# Enables the CUDA language for flowdiff's own CUDA checks (tests/cuda) when an nvcc can be found.
# Included from the top-level CMakeLists.txt (enable_language must run at directory scope there).
# Sets FLOWDIFF_CUDA_TESTS to ON when the language is enabled.
#
# Defaults, each overridable on the command line:
#   CMAKE_CUDA_COMPILER        nvcc on PATH, else $CUDACXX, else the toolkit find_package found
#   CMAKE_CUDA_HOST_COMPILER   the C++ compiler (so host code sees the same g++ as the .cpp files)
#   CMAKE_CUDA_ARCHITECTURES   90 (Hopper: SASS plus PTX that newer GPUs JIT-compile)
#   CMAKE_CUDA_STANDARD        20
#   CMAKE_CUDA_RUNTIME_LIBRARY Shared (what flowdiff::cuda's CUDA::cudart is)

include(CheckLanguage)

if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND CUDAToolkit_NVCC_EXECUTABLE)
  # FindCUDAToolkit also looks in /usr/local/cuda and $CUDA_PATH, where nvcc is often not on PATH.
  find_program(_flowdiff_nvcc_on_path nvcc)
  if(NOT _flowdiff_nvcc_on_path AND EXISTS "${CUDAToolkit_NVCC_EXECUTABLE}")
    set(ENV{CUDACXX} "${CUDAToolkit_NVCC_EXECUTABLE}")
  endif()
  unset(_flowdiff_nvcc_on_path CACHE)
endif()
if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND NOT DEFINED ENV{CUDAHOSTCXX}
   AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}" CACHE FILEPATH "Host compiler for nvcc")
endif()

check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures to compile for")
  endif()
  enable_language(CUDA)
  # CMake < 3.25.2 does not know nvcc's C++20 flag (CMake issue 23079): teach it. This must come
  # after enable_language, and CMAKE_CUDA_STANDARD after it, or the compiler checks fail.
  if(CMAKE_VERSION VERSION_LESS 3.25.2 AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
     AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0
     AND NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  # flowdiff::cuda links the shared runtime (CUDA::cudart); do not add the static one beside it.
  if(NOT DEFINED CMAKE_CUDA_RUNTIME_LIBRARY)
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  endif()
  if(NOT DEFINED CMAKE_CUDA_STANDARD)
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  endif()
  set(FLOWDIFF_CUDA_TESTS ON)
  message(STATUS "flowdiff: CUDA checks enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "flowdiff: no usable CUDA compiler, the CUDA checks are skipped")
endif()
