// tests/support/files.hpp — file helpers shared by the tests: a scratch directory removed at the
// end of the test, and the path of a committed fixture (tests/fixtures/...).
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace flowdiff::test {

/// A fresh temporary directory named after the test (and the process, so concurrent test programs
/// never share one), removed with everything in it when the object goes out of scope.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name)
      : path(std::filesystem::temp_directory_path() /
             ("flowdiff_test_" + name + "_" + std::to_string(static_cast<long long>(::getpid())))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::filesystem::path operator/(const std::string& file) const { return path / file; }
};

/// tests/fixtures/<file>: the fixtures written by tools/make_fixtures.sh and committed.
inline std::filesystem::path fixture_path(const std::string& file) {
  return std::filesystem::path(__FILE__).parent_path().parent_path() / "fixtures" / file;
}

}  // namespace flowdiff::test
