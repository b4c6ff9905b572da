// flowdiff/io/safetensors.hpp — reading and writing the safetensors format
// (https://github.com/huggingface/safetensors), the tensor-file format of PyTorch checkpoints in
// the Hugging Face ecosystem. A file is: an 8-byte little-endian u64 header length N, N bytes of
// UTF-8 JSON `{name: {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}, ...,
// "__metadata__": {str: str}}` (optionally padded with spaces), then the byte buffer. Offsets are
// relative to the start of the buffer, tensors are row-major little-endian, and the ranges
// [begin, end) must tile the buffer exactly: sorted by begin they start at 0, each begins where the
// previous ended, the last ends at the end of the file, and end - begin == numel * sizeof(dtype).
// The reader is hardened against corrupt or hostile files: a bounds-checked JSON parser of its own
// (objects, arrays, strings, integers; nothing else), a 100 MB header cap, overflow-checked sizes;
// every failure is an io_error naming the file, the tensor and what is wrong. Never a crash.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/shape.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/file.hpp"

namespace flowdiff::io {

/// Element types of the safetensors format (the names are the format's dtype strings).
enum class DType { BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64, F8_E4M3, F8_E5M2 };

/// The format's spelling of a dtype ("F32", "BF16", ...).
inline std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::U16: return "U16";
    case DType::I16: return "I16";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::U32: return "U32";
    case DType::I32: return "I32";
    case DType::F32: return "F32";
    case DType::U64: return "U64";
    case DType::I64: return "I64";
    case DType::F64: return "F64";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8:
    case DType::F8_E4M3:
    case DType::F8_E5M2: return 1;
    case DType::U16:
    case DType::I16:
    case DType::F16:
    case DType::BF16: return 2;
    case DType::U32:
    case DType::I32:
    case DType::F32: return 4;
    case DType::U64:
    case DType::I64:
    case DType::F64: return 8;
  }
  return 0;
}

/// The dtype the writer uses for element type T (float -> F32, double -> F64, int32 -> I32, ...).
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::I32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::I64;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return DType::U8;
  else static_assert(sizeof(T) == 0, "safetensors: unsupported element type (float, double, int32, int64, uint8)");
}

inline std::ostream& operator<<(std::ostream& os, DType d) { return os << dtype_name(d); }

namespace detail::st {

/// Largest accepted JSON header (the reference implementation's limit).
inline constexpr std::uint64_t max_header_size = 100'000'000;
/// Nesting the format needs is 3 (root, tensor entry, shape); anything deeper is rejected before
/// recursion can exhaust the stack.
inline constexpr int max_json_depth = 4;

// ---- a minimal JSON value and parser: only what the format needs ----

struct Json {
  enum class Kind { Object, Array, String, Integer };
  Kind kind = Kind::Object;
  std::string str;                                    // String
  bool negative = false;                              // Integer: sign
  std::uint64_t magnitude = 0;                        // Integer: |value|
  std::vector<std::pair<std::string, Json>> members;  // Object, in file order
  std::vector<Json> items;                            // Array
  std::size_t pos = 0;                                // byte offset in the header, for messages
};

inline std::string_view kind_name(Json::Kind k) {
  switch (k) {
    case Json::Kind::Object: return "an object";
    case Json::Kind::Array: return "an array";
    case Json::Kind::String: return "a string";
    case Json::Kind::Integer: return "an integer";
  }
  return "?";
}

class JsonParser {
 public:
  JsonParser(std::string_view text, std::string_view source) : s_(text), source_(source) {}

  /// Parses the whole text: one object, then only spaces (the format pads the header with them).
  Json parse_document() {
    skip_ws();
    if (peek() != '{') error("the header must be a JSON object starting with '{'");
    Json v = parse_value(0);
    skip_ws();
    if (i_ != s_.size()) error("unexpected trailing characters after the JSON object");
    return v;
  }

 private:
  [[noreturn]] void error(std::string_view what) const {
    fail<io_error>(source_, ": malformed safetensors header (JSON byte ", i_, "): ", what);
  }
  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[i_]; }
  char next() {
    if (at_end()) error("unexpected end of the header");
    return s_[i_++];
  }
  void expect(char c, std::string_view what) {
    if (at_end() || s_[i_] != c) error(what);
    ++i_;
  }
  void skip_ws() {
    while (!at_end() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  Json parse_value(int depth) {
    skip_ws();
    if (at_end()) error("unexpected end of the header, expected a value");
    const char c = s_[i_];
    if (c == '{') return parse_object(depth + 1);
    if (c == '[') return parse_array(depth + 1);
    if (c == '"') {
      Json v;
      v.kind = Json::Kind::String;
      v.pos = i_;
      v.str = parse_string();
      return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_integer();
    error("unsupported JSON value (only objects, arrays, strings and integers occur in a header)");
  }

  Json parse_object(int depth) {
    if (depth > max_json_depth) error("JSON nested too deeply");
    Json v;
    v.kind = Json::Kind::Object;
    v.pos = i_;
    expect('{', "expected '{'");
    skip_ws();
    if (peek() == '}') {
      ++i_;
      return v;
    }
    for (;;) {
      skip_ws();
      if (peek() != '"') error("expected a string key");
      std::string key = parse_string();
      skip_ws();
      expect(':', "expected ':' after an object key");
      Json value = parse_value(depth);
      v.members.emplace_back(std::move(key), std::move(value));
      skip_ws();
      const char c = next();
      if (c == '}') return v;
      if (c != ',') {
        --i_;
        error("expected ',' or '}' in an object");
      }
    }
  }

  Json parse_array(int depth) {
    if (depth > max_json_depth) error("JSON nested too deeply");
    Json v;
    v.kind = Json::Kind::Array;
    v.pos = i_;
    expect('[', "expected '['");
    skip_ws();
    if (peek() == ']') {
      ++i_;
      return v;
    }
    for (;;) {
      v.items.push_back(parse_value(depth));
      skip_ws();
      const char c = next();
      if (c == ']') return v;
      if (c != ',') {
        --i_;
        error("expected ',' or ']' in an array");
      }
    }
  }

  Json parse_integer() {
    Json v;
    v.kind = Json::Kind::Integer;
    v.pos = i_;
    if (peek() == '-') {
      v.negative = true;
      ++i_;
    }
    if (at_end() || s_[i_] < '0' || s_[i_] > '9') error("expected a digit");
    if (s_[i_] == '0' && i_ + 1 < s_.size() && s_[i_ + 1] >= '0' && s_[i_ + 1] <= '9')
      error("leading zeros are not allowed in JSON numbers");
    std::uint64_t m = 0;
    while (!at_end() && s_[i_] >= '0' && s_[i_] <= '9') {
      const auto d = static_cast<std::uint64_t>(s_[i_] - '0');
      if (m > (std::numeric_limits<std::uint64_t>::max() - d) / 10) error("integer too large");
      m = m * 10 + d;
      ++i_;
    }
    if (!at_end() && (s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E'))
      error("non-integer number (shapes and offsets are integers)");
    v.magnitude = m;
    return v;
  }

  unsigned hex4() {
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = next();
      unsigned d;
      if (c >= '0' && c <= '9') d = static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') d = static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = static_cast<unsigned>(c - 'A' + 10);
      else error("bad \\u escape: expected 4 hexadecimal digits");
      u = u * 16 + d;
    }
    return u;
  }

  static void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    expect('"', "expected '\"'");
    std::string out;
    for (;;) {
      const char c = next();
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) {
        --i_;
        error("unescaped control character in a string");
      }
      if (c != '\\') {
        out += c;  // UTF-8 validity of the whole header was checked before parsing
        continue;
      }
      const char e = next();
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: a low one must follow
            if (next() != '\\' || next() != 'u') error("unpaired UTF-16 surrogate in a \\u escape");
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("unpaired UTF-16 surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("unpaired UTF-16 surrogate in a \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: --i_; error("unknown escape sequence in a string");
      }
    }
  }

  std::string_view s_;
  std::string_view source_;
  std::size_t i_ = 0;
};

/// Index of the first byte that is not valid UTF-8, or npos.
inline std::size_t invalid_utf8_at(std::string_view s) {
  std::size_t i = 0;
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  while (i < s.size()) {
    const unsigned char c = byte(i);
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1Fu;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0Fu;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return i;
    }
    if (s.size() - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((byte(i + k) & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (byte(i + k) & 0x3Fu);
    }
    const std::uint32_t min_cp = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

inline bool parse_dtype(std::string_view s, DType& out) {
  static constexpr DType all[] = {DType::BOOL, DType::U8,  DType::I8,      DType::U16,
                                  DType::I16,  DType::F16, DType::BF16,    DType::U32,
                                  DType::I32,  DType::F32, DType::U64,     DType::I64,
                                  DType::F64,  DType::F8_E4M3, DType::F8_E5M2};
  for (DType d : all)
    if (dtype_name(d) == s) {
      out = d;
      return true;
    }
  return false;
}

// ---- little-endian loads and element decoding (portable: bytes are composed explicitly) ----

template <class U>
U load_le(const std::byte* p) {
  U v = 0;
  for (std::size_t k = 0; k < sizeof(U); ++k) v |= static_cast<U>(static_cast<U>(p[k]) << (8 * k));
  return v;
}

template <class U>
void store_le(std::byte* p, U v) {
  for (std::size_t k = 0; k < sizeof(U); ++k) p[k] = static_cast<std::byte>((v >> (8 * k)) & 0xFF);
}

/// IEEE binary16 -> float, exactly (every half is a float), including subnormals, inf and NaN.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t man = h & 0x3FFu;
  std::uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    std::uint32_t e = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((man & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

inline float bfloat16_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

inline bool is_float_dtype(DType d) {
  return d == DType::F64 || d == DType::F32 || d == DType::F16 || d == DType::BF16;
}

/// Floating element i as double (exact for every float dtype).
inline double decode_float(DType d, const std::byte* p) {
  switch (d) {
    case DType::F64: return std::bit_cast<double>(load_le<std::uint64_t>(p));
    case DType::F32: return std::bit_cast<float>(load_le<std::uint32_t>(p));
    case DType::F16: return half_to_float(load_le<std::uint16_t>(p));
    case DType::BF16: return bfloat16_to_float(load_le<std::uint16_t>(p));
    default: return 0;
  }
}

/// Integer element as (negative, magnitude) so that U64 and I64 both fit.
struct IntValue {
  bool negative;
  std::uint64_t magnitude;
};

inline IntValue decode_int(DType d, const std::byte* p) {
  const auto from_signed = [](std::int64_t v) {
    return v < 0 ? IntValue{true, static_cast<std::uint64_t>(-(v + 1)) + 1}
                 : IntValue{false, static_cast<std::uint64_t>(v)};
  };
  switch (d) {
    case DType::BOOL:
    case DType::U8: return {false, load_le<std::uint8_t>(p)};
    case DType::U16: return {false, load_le<std::uint16_t>(p)};
    case DType::U32: return {false, load_le<std::uint32_t>(p)};
    case DType::U64: return {false, load_le<std::uint64_t>(p)};
    case DType::I8: return from_signed(static_cast<std::int8_t>(load_le<std::uint8_t>(p)));
    case DType::I16: return from_signed(static_cast<std::int16_t>(load_le<std::uint16_t>(p)));
    case DType::I32: return from_signed(static_cast<std::int32_t>(load_le<std::uint32_t>(p)));
    case DType::I64: return from_signed(static_cast<std::int64_t>(load_le<std::uint64_t>(p)));
    default: return {false, 0};
  }
}

}  // namespace detail::st

/// A parsed safetensors file: the header index and the bytes. Every accessor is bounds-safe;
/// all validation happens in parse(), so a SafetensorsFile that exists is consistent.
class SafetensorsFile {
 public:
  /// Reads and validates the file at `path`; throws io_error naming it on any problem.
  static SafetensorsFile read(const std::filesystem::path& path) {
    std::vector<std::byte> bytes = read_all(path);
    SafetensorsFile f;
    f.source_ = path.string();
    f.bytes_ = std::move(bytes);
    f.index();
    return f;
  }

  /// Validates `bytes` (copied) as a safetensors file; `source_name` appears in error messages.
  static SafetensorsFile parse(std::span<const std::byte> bytes, std::string_view source_name) {
    SafetensorsFile f;
    f.source_ = std::string(source_name);
    f.bytes_.assign(bytes.begin(), bytes.end());
    f.index();
    return f;
  }

  /// Tensor names in lexicographic order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }
  std::size_t size() const { return tensors_.size(); }
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }
  Shape shape(std::string_view name) const { return info(name).shape; }
  DType dtype(std::string_view name) const { return info(name).dtype; }
  /// The file name (or the source name given to parse()) used in messages.
  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The raw little-endian bytes of tensor `name`.
  std::span<const std::byte> raw(std::string_view name) const {
    const Info& e = info(name);
    return std::span<const std::byte>(bytes_).subspan(data_start_ + e.begin, e.end - e.begin);
  }

  /// Tensor `name` converted to T. Floating T: F64/F32/F16/BF16 convert exactly where T can
  /// represent the value (F64 -> float rounds to nearest; a finite value beyond T's range is an
  /// io_error); integer dtypes convert exactly up to 2^digits(T). Integer T: integer dtypes must be
  /// in T's range, floating dtypes must hold integral values in range. F8 dtypes are not supported.
  template <class T>
    requires(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>)
  Tensor<T> tensor(std::string_view name) const {
    const Info& e = info(name);
    Tensor<T> out(e.shape);
    const std::byte* src = bytes_.data() + data_start_ + e.begin;
    const std::size_t esize = dtype_size(e.dtype);
    const auto n = static_cast<std::size_t>(e.shape.numel());
    T* dst = out.data();
    if (e.dtype == DType::F8_E4M3 || e.dtype == DType::F8_E5M2)
      fail<io_error>(source_, ": tensor '", name, "' has dtype ", e.dtype,
                     ", which flowdiff cannot convert (supported: F64, F32, F16, BF16 and integers)");
    if constexpr (std::endian::native == std::endian::little) {
      if (is_same_kind<T>(e.dtype)) {  // the common case: one copy
        if (n > 0) std::memcpy(dst, src, n * sizeof(T));
        return out;
      }
    }
    if (detail::st::is_float_dtype(e.dtype)) {
      for (std::size_t i = 0; i < n; ++i) {
        const double v = detail::st::decode_float(e.dtype, src + i * esize);
        if constexpr (std::is_floating_point_v<T>) {
          if (std::isfinite(v) && std::fabs(v) > static_cast<double>(std::numeric_limits<T>::max()))
            value_error(name, e, i, v, "is beyond the range of the requested floating type");
          dst[i] = static_cast<T>(v);
        } else {
          // Integral and within [lowest, 2^digits): both bounds are exact in double.
          if (!std::isfinite(v) || v != std::trunc(v) ||
              v < static_cast<double>(std::numeric_limits<T>::lowest()) ||
              v >= std::ldexp(1.0, std::numeric_limits<T>::digits))
            value_error(name, e, i, v, "is not an integer in the range of the requested integer type");
          dst[i] = static_cast<T>(v);
        }
      }
      return out;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const auto v = detail::st::decode_int(e.dtype, src + i * esize);
      if (e.dtype == DType::BOOL && v.magnitude > 1)
        fail<io_error>(source_, ": tensor '", name, "' (BOOL) holds byte ", v.magnitude,
                       " at element ", i, "; booleans must be 0 or 1");
      if constexpr (std::is_floating_point_v<T>) {
        const T m = static_cast<T>(v.magnitude);
        dst[i] = v.negative ? -m : m;
      } else {
        using L = std::numeric_limits<T>;
        const bool ok = v.negative
                            ? (L::is_signed && v.magnitude <= static_cast<std::uint64_t>(L::max()) + 1)
                            : v.magnitude <= static_cast<std::uint64_t>(L::max());
        if (!ok)
          fail<io_error>(source_, ": tensor '", name, "' (", e.dtype, ") holds ",
                         v.negative ? "-" : "", v.magnitude, " at element ", i,
                         ", which does not fit the requested integer type");
        // Two's-complement wrap through uint64 is exact here because the value is in range.
        dst[i] = v.negative ? static_cast<T>(-static_cast<std::int64_t>(v.magnitude - 1) - 1)
                            : static_cast<T>(v.magnitude);
      }
    }
    return out;
  }

 private:
  struct Info {
    DType dtype = DType::F32;
    Shape shape;
    std::size_t begin = 0, end = 0;
  };

  template <class T>
  static bool is_same_kind(DType d) {
    return (d == DType::F32 && std::is_same_v<T, float>) ||
           (d == DType::F64 && std::is_same_v<T, double>) ||
           (d == DType::I32 && std::is_same_v<T, std::int32_t>) ||
           (d == DType::I64 && std::is_same_v<T, std::int64_t>) ||
           (d == DType::U8 && std::is_same_v<T, std::uint8_t>) ||
           (d == DType::I8 && std::is_same_v<T, std::int8_t>) ||
           (d == DType::U16 && std::is_same_v<T, std::uint16_t>) ||
           (d == DType::I16 && std::is_same_v<T, std::int16_t>) ||
           (d == DType::U32 && std::is_same_v<T, std::uint32_t>) ||
           (d == DType::U64 && std::is_same_v<T, std::uint64_t>);
  }

  [[noreturn]] void value_error(std::string_view name, const Info& e, std::size_t i, double v,
                                std::string_view what) const {
    fail<io_error>(source_, ": tensor '", name, "' (", e.dtype, ") element ", i, " = ", v, " ",
                   what);
  }

  const Info& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      std::string known;
      std::size_t k = 0;
      for (const auto& [n, i] : tensors_) {
        if (k == 8) {
          known += ", ...";
          break;
        }
        known += (k++ ? ", '" : "'") + n + "'";
      }
      fail<io_error>(source_, ": no tensor named '", name, "' (the file has ", tensors_.size(),
                     " tensors", tensors_.empty() ? "" : ": ", known, ")");
    }
    return it->second;
  }

  static std::vector<std::byte> read_all(const std::filesystem::path& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      fail<io_error>(path.string(), ": cannot read safetensors file: ",
                     std::filesystem::exists(path, ec) ? "not a regular file" : "no such file");
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr)
      fail<io_error>(path.string(), ": cannot open safetensors file: ", std::strerror(errno));
    std::vector<std::byte> out;
    std::byte buf[1 << 16];
    for (;;) {
      const std::size_t got = std::fread(buf, 1, sizeof buf, f);
      out.insert(out.end(), buf, buf + got);
      if (got < sizeof buf) break;
    }
    const bool bad = std::ferror(f) != 0;
    std::fclose(f);
    if (bad) fail<io_error>(path.string(), ": read error after ", out.size(), " bytes");
    return out;
  }

  // Validates the whole file and builds the index. All checks are here.
  void index() {
    using detail::st::Json;
    const std::string& src = source_;
    const std::size_t file_size = bytes_.size();
    if (file_size < 8)
      fail<io_error>(src, ": truncated safetensors file: ", file_size,
                     " bytes, less than the 8-byte header length");
    const std::uint64_t n = detail::st::load_le<std::uint64_t>(bytes_.data());
    if (n > detail::st::max_header_size)
      fail<io_error>(src, ": header length ", n, " exceeds the limit of ",
                     detail::st::max_header_size, " bytes (corrupt file?)");
    if (n > file_size - 8)
      fail<io_error>(src, ": truncated safetensors file: header length ", n, " but only ",
                     file_size - 8, " bytes follow the length field");
    if (n < 2) fail<io_error>(src, ": header length ", n, " is too small for a JSON object");
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data() + 8),
                                static_cast<std::size_t>(n));
    if (const auto bad = detail::st::invalid_utf8_at(text); bad != std::string_view::npos)
      fail<io_error>(src, ": header is not valid UTF-8 (byte ", bad, " of the JSON)");
    const Json root = detail::st::JsonParser(text, src).parse_document();

    data_start_ = 8 + static_cast<std::size_t>(n);
    const std::size_t buffer_size = file_size - data_start_;
    std::vector<std::pair<std::size_t, const std::string*>> order;  // (begin, name) for tiling
    for (const auto& [name, value] : root.members) {
      if (name == "__metadata__") {
        if (metadata_seen_) fail<io_error>(src, ": duplicate \"__metadata__\" entry");
        metadata_seen_ = true;
        if (value.kind != Json::Kind::Object)
          fail<io_error>(src, ": \"__metadata__\" must be an object of strings, got ",
                         detail::st::kind_name(value.kind));
        for (const auto& [k, v] : value.members) {
          if (v.kind != Json::Kind::String)
            fail<io_error>(src, ": metadata '", k, "' must be a string, got ",
                           detail::st::kind_name(v.kind));
          if (!metadata_.emplace(k, v.str).second)
            fail<io_error>(src, ": duplicate metadata key '", k, "'");
        }
        continue;
      }
      if (tensors_.find(name) != tensors_.end())
        fail<io_error>(src, ": duplicate tensor name '", name, "'");
      Info e = parse_entry(name, value, buffer_size);
      const auto it = tensors_.emplace(name, e).first;
      order.emplace_back(e.begin, &it->first);
    }

    // The ranges must tile the buffer: sorted by begin, each starts where the previous ended.
    std::sort(order.begin(), order.end(), [this](const auto& a, const auto& b) {
      const Info& ia = tensors_.find(*a.second)->second;
      const Info& ib = tensors_.find(*b.second)->second;
      return ia.begin != ib.begin ? ia.begin < ib.begin : ia.end < ib.end;
    });
    std::size_t expected = 0;
    const std::string* prev = nullptr;
    for (const auto& [begin, name] : order) {
      const Info& e = tensors_.find(*name)->second;
      if (e.begin != expected) {
        if (prev == nullptr)
          fail<io_error>(src, ": tensor '", *name, "' has data_offsets [", e.begin, ", ", e.end,
                         "] but the first tensor must start at offset 0");
        fail<io_error>(src, ": tensor '", *name, "' has data_offsets [", e.begin, ", ", e.end,
                       "] but the previous tensor '", *prev, "' ends at ", expected,
                       e.begin < expected ? " (overlapping data)" : " (a gap in the buffer)");
      }
      expected = e.end;
      prev = name;
    }
    if (expected != buffer_size)
      fail<io_error>(src, ": the tensors cover ", expected, " bytes of data but the file holds ",
                     buffer_size, " bytes after the header",
                     expected < buffer_size ? " (trailing garbage)" : "");
  }

  Info parse_entry(const std::string& name, const detail::st::Json& value,
                   std::size_t buffer_size) const {
    using detail::st::Json;
    const std::string& src = source_;
    if (value.kind != Json::Kind::Object)
      fail<io_error>(src, ": tensor '", name, "' must be an object, got ",
                     detail::st::kind_name(value.kind));
    const Json* dtype = nullptr;
    const Json* shape = nullptr;
    const Json* offsets = nullptr;
    for (const auto& [k, v] : value.members) {
      const Json** slot = k == "dtype" ? &dtype : k == "shape" ? &shape
                          : k == "data_offsets" ? &offsets : nullptr;
      if (slot == nullptr) fail<io_error>(src, ": tensor '", name, "' has an unknown field '", k, "'");
      if (*slot != nullptr) fail<io_error>(src, ": tensor '", name, "' has a duplicate field '", k, "'");
      *slot = &v;
    }
    if (dtype == nullptr || shape == nullptr || offsets == nullptr)
      fail<io_error>(src, ": tensor '", name, "' lacks the field '",
                     dtype == nullptr ? "dtype" : shape == nullptr ? "shape" : "data_offsets", "'");
    Info e;
    if (dtype->kind != Json::Kind::String || !detail::st::parse_dtype(dtype->str, e.dtype))
      fail<io_error>(src, ": tensor '", name, "' has an unknown dtype ",
                     dtype->kind == Json::Kind::String ? "'" + dtype->str + "'"
                                                       : std::string(detail::st::kind_name(dtype->kind)));
    if (shape->kind != Json::Kind::Array)
      fail<io_error>(src, ": tensor '", name, "': shape must be an array of integers");
    if (shape->items.size() > static_cast<std::size_t>(Shape::max_rank))
      fail<io_error>(src, ": tensor '", name, "' has rank ", shape->items.size(),
                     "; flowdiff supports at most ", Shape::max_rank, " dimensions");
    // The product of the non-zero extents must fit index_t even when another extent is 0, so
    // that Shape::numel() can never overflow whatever order it multiplies in.
    std::uint64_t numel = 1;
    bool overflow = false, has_zero = false;
    for (const Json& d : shape->items) {
      if (d.kind != Json::Kind::Integer || d.negative ||
          d.magnitude > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()))
        fail<io_error>(src, ": tensor '", name, "': shape dimensions must be integers in [0, 2^63)",
                       d.kind == Json::Kind::Integer && d.negative ? ", got a negative one" : "");
      e.shape.push_back(static_cast<index_t>(d.magnitude));
      if (d.magnitude == 0) has_zero = true;
      else overflow = overflow || __builtin_mul_overflow(numel, d.magnitude, &numel);
    }
    std::uint64_t nbytes = 0;
    overflow = overflow || numel > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()) ||
               __builtin_mul_overflow(numel, dtype_size(e.dtype), &nbytes);
    if (overflow)
      fail<io_error>(src, ": tensor '", name, "' has shape ", e.shape,
                     " whose byte size overflows 64 bits");
    if (has_zero) nbytes = 0;
    if (offsets->kind != Json::Kind::Array || offsets->items.size() != 2 ||
        offsets->items[0].kind != Json::Kind::Integer || offsets->items[1].kind != Json::Kind::Integer ||
        offsets->items[0].negative || offsets->items[1].negative)
      fail<io_error>(src, ": tensor '", name,
                     "': data_offsets must be an array of two non-negative integers");
    const std::uint64_t begin = offsets->items[0].magnitude;
    const std::uint64_t end = offsets->items[1].magnitude;
    if (begin > end)
      fail<io_error>(src, ": tensor '", name, "' has data_offsets [", begin, ", ", end,
                     "] with begin > end");
    if (end > buffer_size)
      fail<io_error>(src, ": tensor '", name, "' has data_offsets [", begin, ", ", end,
                     "] beyond the end of the data (", buffer_size, " bytes; truncated file?)");
    if (end - begin != nbytes)
      fail<io_error>(src, ": tensor '", name, "' has data_offsets [", begin, ", ", end, "] but shape ",
                     e.shape, " of ", e.dtype, " needs ", nbytes, " bytes");
    e.begin = static_cast<std::size_t>(begin);
    e.end = static_cast<std::size_t>(end);
    return e;
  }

  std::string source_;
  std::vector<std::byte> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, Info, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
  bool metadata_seen_ = false;
};

/// Builds a safetensors file in memory: add tensors (copied), set metadata, then bytes() or
/// write(). Tensors are stored in name order; the header is padded with spaces to a multiple of 8
/// bytes so that the data is 8-byte aligned, as the reference writer does.
class SafetensorsWriter {
 public:
  /// Adds a copy of `t` as `name` (float -> F32, double -> F64, int32 -> I32, int64 -> I64,
  /// uint8 -> U8). Names must be unique, non-empty and not "__metadata__" (config_error).
  template <class T>
  void add(std::string name, View<const T> t) {
    using U = std::remove_const_t<T>;
    require<config_error>(!name.empty(), "SafetensorsWriter::add: empty tensor name");
    require<config_error>(name != "__metadata__",
                          "SafetensorsWriter::add: '__metadata__' is reserved for the metadata");
    require<config_error>(entries_.find(name) == entries_.end(),
                          "SafetensorsWriter::add: duplicate tensor name '", name, "'");
    Entry e;
    e.dtype = dtype_of<U>();
    e.shape = t.shape();
    const auto n = static_cast<std::size_t>(t.numel());
    e.data.resize(n * sizeof(U));
    for (std::size_t i = 0; i < n; ++i) {
      using Bits = std::conditional_t<sizeof(U) == 8, std::uint64_t,
                   std::conditional_t<sizeof(U) == 4, std::uint32_t, std::uint8_t>>;
      detail::st::store_le<Bits>(e.data.data() + i * sizeof(U), std::bit_cast<Bits>(t.data()[i]));
    }
    entries_.emplace(std::move(name), std::move(e));
  }
  template <class T>
  void add(std::string name, const Tensor<T>& t) {
    add<T>(std::move(name), t.view());
  }
  template <class T>
    requires(!std::is_const_v<T>)
  void add(std::string name, View<T> t) {
    add<T>(std::move(name), View<const T>(t));
  }

  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }
  bool contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }

  /// The complete file.
  std::vector<std::byte> bytes() const {
    std::string h = "{";
    std::size_t offset = 0;
    bool first = true;
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata_) {
        if (!first) h += ',';
        first = false;
        append_json_string(h, k);
        h += ':';
        append_json_string(h, v);
      }
      h += '}';
      first = false;
    }
    for (const auto& [name, e] : entries_) {
      if (!first) h += ',';
      first = false;
      append_json_string(h, name);
      h += ":{\"dtype\":\"";
      h += dtype_name(e.dtype);
      h += "\",\"shape\":[";
      for (int d = 0; d < e.shape.rank(); ++d) {
        if (d) h += ',';
        h += std::to_string(e.shape[d]);
      }
      h += "],\"data_offsets\":[" + std::to_string(offset) + ',' +
           std::to_string(offset + e.data.size()) + "]}";
      offset += e.data.size();
    }
    h += '}';
    h.append((8 - h.size() % 8) % 8, ' ');
    std::vector<std::byte> out(8 + h.size() + offset);
    detail::st::store_le<std::uint64_t>(out.data(), h.size());
    std::memcpy(out.data() + 8, h.data(), h.size());
    std::size_t at = 8 + h.size();
    for (const auto& [name, e] : entries_) {
      if (!e.data.empty()) std::memcpy(out.data() + at, e.data.data(), e.data.size());
      at += e.data.size();
    }
    return out;
  }

  /// Writes the file atomically (temporary file, fsync, rename): a crash never leaves a torn file.
  void write(const std::filesystem::path& path) const {
    const std::vector<std::byte> b = bytes();
    write_file_atomic(path, std::span<const unsigned char>(
                                reinterpret_cast<const unsigned char*>(b.data()), b.size()));
  }

 private:
  struct Entry {
    DType dtype = DType::F32;
    Shape shape;
    std::vector<std::byte> data;
  };

  static void append_json_string(std::string& out, std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    out += '"';
    for (const char c : s) {
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        out += '\\';
        out += c;
      } else if (u < 0x20) {
        out += "\\u00";
        out += hex[u >> 4];
        out += hex[u & 15];
      } else {
        out += c;
      }
    }
    out += '"';
  }

  std::map<std::string, Entry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace flowdiff::io
