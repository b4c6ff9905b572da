// flowdiff/io/file.hpp — atomic file writing: the bytes go to "<path>.tmp.<random>" in the same
// directory, are flushed and fsync'ed, and only then renamed over <path>. A crash or a full disk
// leaves either the old file or the new one, never a torn mix (POSIX rename is atomic).
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flowdiff/core/error.hpp"

namespace flowdiff::io {

/// Writes `bytes` to `path` atomically; creates missing parent directories. Throws io_error.
inline void write_file_atomic(const std::filesystem::path& path, std::span<const unsigned char> bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.has_parent_path()) {
    fs::create_directories(path.parent_path(), ec);
    require<io_error>(!ec, "write_file_atomic: cannot create directory '",
                      path.parent_path().string(), "': ", ec.message());
  }
  std::string tmp = path.string() + ".tmp.XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  require<io_error>(fd >= 0, "write_file_atomic: cannot create a temporary file next to '",
                    path.string(), "': ", std::strerror(errno));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail<io_error>("write_file_atomic: writing '", path.string(), "' failed after ", done,
                     " of ", bytes.size(), " bytes: ", std::strerror(e));
    }
    done += static_cast<std::size_t>(w);
  }
  const bool synced = ::fsync(fd) == 0;
  const int sync_errno = errno;
  ::fchmod(fd, 0644);
  ::close(fd);
  if (!synced) {
    ::unlink(tmp.c_str());
    fail<io_error>("write_file_atomic: fsync of '", path.string(), "' failed: ",
                   std::strerror(sync_errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    fail<io_error>("write_file_atomic: cannot rename the temporary file to '", path.string(),
                   "': ", std::strerror(e));
  }
}

}  // namespace flowdiff::io
