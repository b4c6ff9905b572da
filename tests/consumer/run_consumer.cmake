# cmake -P run_consumer.cmake — one step of flowdiff's consumer tests (see tests/CMakeLists.txt):
#   -DSTEP=install       `cmake --install` flowdiff's build tree into a fresh <WORK_DIR>/prefix
#   -DSTEP=package       configure, build and run this consumer against <WORK_DIR>/prefix
#   -DSTEP=subdirectory  configure, build and run this consumer with add_subdirectory(<source>)
# Other variables: FLOWDIFF_SOURCE_DIR, FLOWDIFF_BINARY_DIR, WORK_DIR, CONFIG, GENERATOR,
# MAKE_PROGRAM, CXX_COMPILER, CXX_FLAGS, EXE_LINKER_FLAGS, EXPECT_CUDA, EXPECT_IO, TOOLCHAIN_FILE —
# passed through so the consumer is built like flowdiff's own tests (same compiler, generator,
# sanitizers, cross toolchain); EMULATOR (a |-separated command) runs a cross-built consumer.
cmake_minimum_required(VERSION 3.25)

foreach(v STEP FLOWDIFF_SOURCE_DIR FLOWDIFF_BINARY_DIR WORK_DIR)
  if(NOT DEFINED ${v} OR "${${v}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${v}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE "${prefix}")
  execute_process(
    COMMAND "${CMAKE_COMMAND}" --install "${FLOWDIFF_BINARY_DIR}" --prefix "${prefix}" ${config_args}
    COMMAND_ECHO STDOUT COMMAND_ERROR_IS_FATAL ANY)
  foreach(f include/flowdiff/flowdiff.hpp share/cmake/flowdiff/flowdiffConfig.cmake
            share/cmake/flowdiff/flowdiffConfigVersion.cmake
            share/cmake/flowdiff/flowdiffTargets.cmake)
    if(NOT EXISTS "${prefix}/${f}")
      message(FATAL_ERROR "run_consumer.cmake: the install is missing ${f}")
    endif()
  endforeach()
  return()
endif()

if(NOT STEP MATCHES "^(package|subdirectory)$")
  message(FATAL_ERROR "run_consumer.cmake: unknown STEP '${STEP}'")
endif()

set(build "${WORK_DIR}/${STEP}")
set(configure_args
    -S "${CMAKE_CURRENT_LIST_DIR}" -B "${build}"
    "-DFLOWDIFF_CONSUMER_MODE=${STEP}"
    "-DFLOWDIFF_CONSUMER_EXPECT_CUDA=${EXPECT_CUDA}"
    "-DFLOWDIFF_CONSUMER_EXPECT_IO=${EXPECT_IO}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
    "-DCMAKE_EXE_LINKER_FLAGS=${EXE_LINKER_FLAGS}")
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(CONFIG)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
if(TOOLCHAIN_FILE)
  list(APPEND configure_args "-DCMAKE_TOOLCHAIN_FILE=${TOOLCHAIN_FILE}")
endif()
if(STEP STREQUAL "package")
  # Only the fresh install may satisfy find_package: never the source tree or a system copy.
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
       -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
  if(NOT EXISTS "${prefix}/share/cmake/flowdiff/flowdiffConfig.cmake")
    message(FATAL_ERROR "run_consumer.cmake: no install in ${prefix} (the consumer_install "
                        "fixture should have made it)")
  endif()
else()
  list(APPEND configure_args "-DFLOWDIFF_SOURCE_DIR=${FLOWDIFF_SOURCE_DIR}")
endif()

# The build tree is kept between runs, so a re-run rebuilds only what changed.
execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args}
                COMMAND_ECHO STDOUT COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${build}" ${config_args}
                COMMAND_ECHO STDOUT COMMAND_ERROR_IS_FATAL ANY)

set(exe "${build}/consumer")
if(CONFIG AND EXISTS "${build}/${CONFIG}/consumer")
  set(exe "${build}/${CONFIG}/consumer")  # multi-config generators
endif()
string(REPLACE "|" ";" emulator "${EMULATOR}")
execute_process(COMMAND ${emulator} "${exe}" COMMAND_ECHO STDOUT COMMAND_ERROR_IS_FATAL ANY)
