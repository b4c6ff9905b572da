// tests/cuda/harness.hpp — the frame the CUDA test programs share (nvcc; include it after
// <flowdiff/backend/cuda/all.cuh>): a tally of checks, expect(), two kinds of section — a body
// that calls expect() itself, or one that fills a Log of (ok, message) entries, as the check
// bodies of tests/support/ do — and finish(), the programs' common ending: without a CUDA device
// it prints what the host part checked and returns 77 (ctest's SKIP_RETURN_CODE, so the test
// shows as skipped), or 1 when a host check failed; with a device it names the device, runs the
// device part and returns 1 on any failure, 0 otherwise.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

namespace flowdiff::test::cuda_harness {

struct Tally {
  int failures = 0;
  int checks = 0;
};
inline Tally tally;  // one per test program

inline void expect(bool ok, const std::string& what) {
  ++tally.checks;
  if (!ok) {
    ++tally.failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

/// Runs body(), which calls expect(); an exception is a failed check. Prints the verdict.
template <class F>
void section(const char* name, F&& body) {
  const int before = tally.failures;
  try {
    body();
  } catch (const std::exception& e) {
    expect(false, std::string(name) + ": unexpected exception: " + e.what());
  }
  std::printf("%-56s %s\n", name, tally.failures == before ? "ok" : "FAILED");
}

/// Runs body(log) into a fresh Log (checks: {ok, what}, failures()); prints the verdict, every
/// failure and, with `verbose`, every check (the measured errors, worth reading on a first GPU
/// run). A section that checked nothing fails.
template <class Log, class F>
void log_section(const char* name, bool verbose, F&& body) {
  Log log;
  try {
    body(log);
  } catch (const std::exception& e) {
    log.expect(false, std::string("unexpected exception: ") + e.what());
  }
  if (log.checks.empty()) log.expect(false, "the section checked nothing");
  const int failed = log.failures();
  tally.checks += static_cast<int>(log.checks.size());
  tally.failures += failed;
  std::printf("%-56s %s (%zu checks)\n", name, failed == 0 ? "ok" : "FAILED", log.checks.size());
  for (const auto& c : log.checks)
    if (!c.ok || verbose) std::printf("  %s %s\n", c.ok ? "ok  " : "FAIL", c.what.c_str());
}

/// The ending of every CUDA test program, after its host part: `no_device()` runs the checks that
/// only hold without a device, `device_part()` the device checks.
template <class NoDevice, class DevicePart>
int finish(NoDevice&& no_device, DevicePart&& device_part) {
  std::string why;
  if (flowdiff::cuda::device_count(&why) == 0) {
    no_device();
    if (tally.failures > 0) {
      std::printf("%d of %d host checks FAILED\n", tally.failures, tally.checks);
      return 1;
    }
    std::printf(
        "host checks: %d passed\nSKIPPED: no CUDA device (%s); the device checks did not run\n",
        tally.checks, why.c_str());
    return 77;
  }
  const auto info = flowdiff::cuda::device_info();
  std::printf("device %d: %s, compute capability %d.%d, %d SMs, %.1f GiB\n", info.index,
              info.name.c_str(), info.compute_major, info.compute_minor, info.multiprocessors,
              static_cast<double>(info.global_memory) / (1024.0 * 1024.0 * 1024.0));
  device_part();
  std::printf("%s: %d checks, %d failed\n", tally.failures == 0 ? "ok" : "FAILED", tally.checks,
              tally.failures);
  return tally.failures == 0 ? 0 : 1;
}

template <class DevicePart>
int finish(DevicePart&& device_part) {
  return finish([] {}, device_part);
}

}  // namespace flowdiff::test::cuda_harness
