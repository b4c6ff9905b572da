// examples/common/cli.hpp — the tiny command-line parser every flowdiff example uses: declared
// flags with defaults and help text, `--flag value` or `--flag=value`, `--help`, and a clear
// flowdiff::config_error naming the flag for an unknown flag or a value that does not parse.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <flowdiff/core/error.hpp>
#include <flowdiff/paths/schedule.hpp>
#include <flowdiff/samplers/grid.hpp>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace flowdiff::examples {

class Cli {
 public:
  Cli(std::string program, std::string summary)
      : program_(std::move(program)), summary_(std::move(summary)) {}

  /// Declares --name with a default value (the type is taken from it) and a help line.
  template <class V>
  V& option(const std::string& name, V default_value, const std::string& help) {
    auto slot = std::make_shared<Slot<V>>(default_value);
    std::ostringstream def;
    def << default_value;
    entries_.push_back({name, help, def.str(), [slot, name](const std::string& text) {
                          std::istringstream is(text);
                          V v{};
                          if constexpr (std::is_same_v<V, std::string>) {
                            v = text;
                          } else {
                            is >> v;
                            require<config_error>(!is.fail() && is.eof(), "--", name,
                                                  ": cannot parse '", text, "'");
                          }
                          slot->value = v;
                        }});
    if (!before_.empty()) {  // list it just before --before_
      const auto at = std::find_if(entries_.begin(), entries_.end(),
                                   [&](const Entry& e) { return e.name == before_; });
      require<config_error>(at != entries_.end(), program_, ": place_before: no flag --", before_);
      std::rotate(at, entries_.end() - 1, entries_.end());
    }
    holders_.push_back(slot);
    return slot->value;
  }

  /// The flags declared from now on are listed in --help just before --name (in the order they
  /// are declared), so that flags declared by a shared helper and by the program itself can
  /// interleave; an empty name lists them at the end again (the default).
  void place_before(std::string name) { before_ = std::move(name); }

  /// Parses argv; returns false if --help was printed (the caller should exit 0).
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        print_help();
        return false;
      }
      require<config_error>(arg.rfind("--", 0) == 0, program_, ": unexpected argument '", arg,
                            "' (flags start with --; see --help)");
      std::string name = arg.substr(2), value;
      const auto eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      } else {
        require<config_error>(i + 1 < argc, program_, ": flag --", name, " needs a value");
        value = argv[++i];
      }
      bool found = false;
      for (auto& e : entries_)
        if (e.name == name) {
          e.set(value);
          found = true;
        }
      require<config_error>(found, program_, ": unknown flag --", name, " (see --help)");
    }
    return true;
  }

  void print_help() const {
    std::cout << "usage: " << program_ << " [flags]\n\n" << summary_ << "\n\nflags:\n";
    for (const auto& e : entries_) {
      std::string head = "  --" + e.name;
      if (head.size() < 22) head.resize(22, ' ');
      std::cout << head << ' ' << e.help << " (default: " << e.def << ")\n";
    }
    std::cout << "  --help               print this help\n";
  }

 private:
  struct HolderBase {
    virtual ~HolderBase() = default;
  };
  template <class V>
  struct Slot : HolderBase {
    explicit Slot(V v) : value(std::move(v)) {}
    V value;
  };
  struct Entry {
    std::string name, help, def;
    std::function<void(const std::string&)> set;
  };
  std::string program_, summary_, before_;
  std::vector<Entry> entries_;
  std::vector<std::shared_ptr<HolderBase>> holders_;
};

/// Seconds of wall time since t0.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// A comma-separated flag value ("1,3,5") as a list; config_error naming the flag and the item
/// that does not parse, or an empty list.
template <class V>
std::vector<V> parse_list(const std::string& flag, const std::string& text) {
  std::vector<V> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::istringstream is(item);
    V v{};
    is >> v;
    require<config_error>(!is.fail() && is.eof(), "--", flag, ": cannot parse '", item, "' in '",
                          text, "' (a comma-separated list)");
    out.push_back(v);
  }
  require<config_error>(!out.empty(), "--", flag, ": empty list");
  return out;
}

/// The help text of a --grid flag (parse_time_grid's forms).
inline constexpr const char* time_grid_help =
    "sampling time grid: uniform, shift:S (shifted_grid: S > 1 finer steps near the data, "
    "S < 1 near the noise) or dpm (dpm_solver_grid: uniform in log-SNR inside [0.5/steps, "
    "1 - 0.5/steps], the ends as single steps)";

/// A --grid flag value as the time grid of `steps` steps from t = 0 to t = 1 under the linear
/// path: "uniform" (uniform_grid), "shift:S" with a finite S > 0 (shifted_grid(steps, S): S > 1
/// takes finer steps near the data, S < 1 near the noise) or "dpm" (dpm_solver_grid);
/// config_error naming the flag otherwise.
inline std::vector<float> parse_time_grid(const std::string& flag, const std::string& text,
                                          long steps) {
  if (text == "uniform") return uniform_grid<float>(steps);
  if (text == "dpm") return dpm_solver_grid<float>(schedules::Linear{}, steps);
  const std::string prefix = "shift:";
  require<config_error>(text.rfind(prefix, 0) == 0, "--", flag,
                        ": expected 'uniform', 'shift:S' (S > 0) or 'dpm', got '", text, "'");
  std::istringstream is(text.substr(prefix.size()));
  double s = 0;
  is >> s;
  require<config_error>(!is.fail() && is.eof() && std::isfinite(s) && s > 0, "--", flag,
                        ": the shift must be a finite number > 0, got '", text, "'");
  return shifted_grid<float>(steps, static_cast<float>(s));
}

}  // namespace flowdiff::examples
