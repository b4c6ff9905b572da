// flowdiff/data/idx.hpp — a reader for IDX files, the format of MNIST and Fashion-MNIST (LeCun et
// al.): a 4-byte magic 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 extents d_0 .. d_{n-1},
// then exactly prod(d_k) values, row-major. Only type 0x08 (unsigned byte, the image and label
// files of both data sets) is read; the payload must be exactly d_0 * ... * d_{n-1} bytes. Files
// may be gzip-compressed (detected by the gzip magic 0x1f 0x8b, decompressed with zlib's gzread) or
// raw. Every error is an io_error that names the file and says what is wrong (expected vs found).
//
// Linking: gzip decompression calls zlib, so a program that calls read_idx links flowdiff::io
// (which carries ZLIB::ZLIB). The few zlib functions used are declared below rather than taken from
// <zlib.h>, so that the umbrella header compiles without zlib's development headers.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <vector>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"

// zlib's gzip file API (zlib.h, stable since zlib 1.0); identical redeclarations if zlib.h is also
// included.
extern "C" {
struct gzFile_s;
typedef struct gzFile_s* gzFile;
gzFile gzopen(const char* path, const char* mode);
int gzread(gzFile file, void* buf, unsigned len);
int gzclose(gzFile file);
const char* gzerror(gzFile file, int* errnum);
}

namespace flowdiff::data {

/// An IDX array: its extents and its bytes, row-major (data.size() == product of dims).
struct IdxArray {
  std::vector<index_t> dims;
  std::vector<std::uint8_t> data;
};

namespace detail {

/// The bytes of a file, decompressed on the fly when it starts with the gzip magic.
class ByteSource {
 public:
  explicit ByteSource(const std::filesystem::path& file) : name_(file.string()) {
    std::error_code ec;
    const auto status = std::filesystem::status(file, ec);
    require<io_error>(std::filesystem::exists(status), "read_idx: '", name_, "': no such file");
    require<io_error>(!std::filesystem::is_directory(status), "read_idx: '", name_,
                      "' is a directory, not an IDX file");
    raw_.open(file, std::ios::binary);
    require<io_error>(raw_.is_open(), "read_idx: cannot open '", name_, "' for reading");
    std::array<char, 2> magic{};
    raw_.read(magic.data(), 2);
    const bool two = raw_.gcount() == 2;
    gzip_ = two && static_cast<unsigned char>(magic[0]) == 0x1f &&
            static_cast<unsigned char>(magic[1]) == 0x8b;
    if (gzip_) {
      raw_.close();
      gz_ = gzopen(name_.c_str(), "rb");
      require<io_error>(gz_ != nullptr, "read_idx: cannot open '", name_, "' as gzip");
    } else {
      raw_.clear();
      raw_.seekg(0);
    }
  }
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;
  ~ByteSource() {
    if (gz_ != nullptr) gzclose(gz_);
  }

  bool gzip() const { return gzip_; }

  /// Reads up to n bytes; returns fewer only at the end of the (decompressed) data.
  std::size_t read(void* dst, std::size_t n) {
    auto* out = static_cast<char*>(dst);
    std::size_t done = 0;
    while (done < n) {
      const std::size_t want = std::min<std::size_t>(n - done, std::size_t{1} << 26);
      std::size_t got = 0;
      if (gzip_) {
        const int r = gzread(gz_, out + done, static_cast<unsigned>(want));
        int err = 0;
        const char* msg = gzerror(gz_, &err);
        // gzread reports a truncated stream as a short read with Z_BUF_ERROR (-5) set, so the error
        // state is checked after every read, not only on r < 0.
        require<io_error>(r >= 0 && err == 0, "read_idx: '", name_,
                          "': corrupt or truncated gzip data after ", offset_ + done,
                          " decompressed bytes (zlib: ", msg != nullptr ? msg : "unknown error",
                          ")");
        got = static_cast<std::size_t>(r);
      } else {
        raw_.read(out + done, static_cast<std::streamsize>(want));
        got = static_cast<std::size_t>(raw_.gcount());
        require<io_error>(!raw_.bad(), "read_idx: '", name_, "': read error after ",
                          offset_ + done + got, " bytes");
      }
      done += got;
      if (got < want) break;
    }
    offset_ += done;
    return done;
  }

  /// Reads and discards everything that is left; returns how many bytes that was.
  std::uint64_t skip_rest() {
    std::vector<char> buf(std::size_t{1} << 16);
    std::uint64_t total = 0;
    for (;;) {
      const std::size_t got = read(buf.data(), buf.size());
      total += got;
      if (got < buf.size()) return total;
    }
  }

 private:
  std::string name_;
  std::ifstream raw_;
  gzFile gz_ = nullptr;
  bool gzip_ = false;
  std::uint64_t offset_ = 0;
};

inline const char* idx_type_name(unsigned type) {
  switch (type) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "int16";
    case 0x0C:
      return "int32";
    case 0x0D:
      return "float32";
    case 0x0E:
      return "float64";
    default:
      return "not an IDX type";
  }
}

inline std::string dims_string(const std::vector<index_t>& dims) {
  std::string s = "[";
  for (std::size_t k = 0; k < dims.size(); ++k) s += (k ? ", " : "") + std::to_string(dims[k]);
  return s + "]";
}

}  // namespace detail

/// Reads an IDX file of unsigned bytes (raw or gzip-compressed). Throws io_error naming the file
/// when it is missing, is not IDX (magic), holds another element type, has a zero extent or extents
/// whose product overflows, or when its payload is shorter or longer than prod(dims).
inline IdxArray read_idx(const std::filesystem::path& file) {
  detail::ByteSource src(file);
  const std::string name = file.string();
  const char* what = src.gzip() ? " decompressed bytes" : " bytes";

  std::array<std::uint8_t, 4> magic{};
  const std::size_t got_magic = src.read(magic.data(), 4);
  require<io_error>(got_magic == 4, "read_idx: '", name, "': only ", got_magic, what,
                    ", too short for the 4-byte IDX magic");
  require<io_error>(magic[0] == 0 && magic[1] == 0, "read_idx: '", name,
                    "': not an IDX file: the magic must start with bytes 0x00 0x00, got 0x",
                    std::hex, unsigned(magic[0]), " 0x", unsigned(magic[1]));
  const unsigned type = magic[2], ndim = magic[3];
  require<io_error>(type == 0x08, "read_idx: '", name, "': element type 0x", std::hex, type,
                    std::dec, " (", detail::idx_type_name(type),
                    ") is not supported; only 0x08 (unsigned byte) is read");
  require<io_error>(ndim >= 1, "read_idx: '", name,
                    "': the header has 0 dimensions; expected at least 1");

  std::vector<std::uint8_t> header(4 * std::size_t{ndim});
  const std::size_t got_header = src.read(header.data(), header.size());
  require<io_error>(got_header == header.size(), "read_idx: '", name, "': truncated header: ", ndim,
                    " dimensions need ", header.size(), " bytes of extents, got ", got_header);
  IdxArray out;
  out.dims.resize(ndim);
  for (unsigned k = 0; k < ndim; ++k)
    out.dims[k] = static_cast<index_t>((std::uint64_t{header[4 * k]} << 24) |
                                       (std::uint64_t{header[4 * k + 1]} << 16) |
                                       (std::uint64_t{header[4 * k + 2]} << 8) | header[4 * k + 3]);
  std::uint64_t total = 1;
  // Bound the payload well inside index_t and size_t (2^48 bytes is far past any real data set).
  constexpr std::uint64_t max_total = std::uint64_t{1} << 48;
  for (unsigned k = 0; k < ndim; ++k) {
    const auto d = static_cast<std::uint64_t>(out.dims[k]);
    require<io_error>(d >= 1, "read_idx: '", name, "': dimension ", k, " of ",
                      detail::dims_string(out.dims), " is 0; an IDX array must not be empty");
    require<io_error>(total <= max_total / d, "read_idx: '", name, "': the dimensions ",
                      detail::dims_string(out.dims), " overflow: their product exceeds 2^48");
    total *= d;
  }

  // Grow the buffer (geometrically) as bytes arrive rather than allocating prod(dims) up front, so
  // that a corrupt header cannot make us allocate much more than the file really holds.
  const auto expected = static_cast<std::size_t>(total);
  std::size_t have = 0;
  while (have < expected) {
    const std::size_t want = std::min(expected - have, std::max<std::size_t>(have, 1 << 20));
    out.data.resize(have + want);
    const std::size_t got = src.read(out.data.data() + have, want);
    have += got;
    if (got < want) break;
  }
  require<io_error>(have == expected, "read_idx: '", name, "': truncated payload: dims ",
                    detail::dims_string(out.dims), " need ", expected, " bytes after the ",
                    4 + header.size(), "-byte header, got ", have);
  const std::uint64_t extra = src.skip_rest();
  require<io_error>(extra == 0, "read_idx: '", name, "': trailing data: dims ",
                    detail::dims_string(out.dims), " need ", expected, " bytes after the ",
                    4 + header.size(), "-byte header, got ", expected + extra, " (", extra,
                    " too many)");
  return out;
}

}  // namespace flowdiff::data
