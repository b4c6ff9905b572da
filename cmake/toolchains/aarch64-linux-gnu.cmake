# Cross build for 64-bit ARM Linux with Debian's cross compiler (g++-aarch64-linux-gnu); the
# tests run under qemu-user (qemu-aarch64) with the cross sysroot. scripts/cross_check.sh uses it.
# Eigen and Catch2 are header-only, so the build machine's copies serve; stb and zlib are
# libraries of the build machine's architecture and are not looked for (no flowdiff::io, so no
# examples and no file-format tests).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
set(CMAKE_DISABLE_FIND_PACKAGE_ZLIB ON)
set(CMAKE_DISABLE_FIND_PACKAGE_stb ON)
