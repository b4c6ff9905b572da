// flowdiff/train/progress.hpp — what a training run shows while it runs. On a terminal, one line
// redrawn in place: the step, a bar, the average loss since the last report, steps/s and the time
// left (ETA = remaining steps / the run's steps per second so far). Anywhere else (a file, a pipe,
// CI logs) plain log lines every `every` steps, so logs stay readable. Mode::automatic picks the
// bar when the stream is std::cerr or std::cout attached to a terminal whose TERM is not "dumb".
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <ostream>
#include <string>

#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>
#define FLOWDIFF_HAS_ISATTY 1
#endif
#endif

namespace flowdiff::train {

enum class ProgressMode { automatic, bar, lines, quiet };

/// "1h02m", "3m07s", "12.3s".
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  char buf[32];
  if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600) {
    const auto s = static_cast<long>(seconds + 0.5);
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  } else {
    const auto m = static_cast<long>(seconds / 60 + 0.5);
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", m / 60, m % 60);
  }
  return buf;
}

/// Whether `os` is std::cout or std::cerr on a terminal that can redraw a line.
inline bool is_terminal(const std::ostream& os) {
#if defined(FLOWDIFF_HAS_ISATTY)
  int fd = -1;
  if (&os == &std::cerr || &os == &std::clog)
    fd = 2;
  else if (&os == &std::cout)
    fd = 1;
  if (fd < 0 || isatty(fd) == 0) return false;
  const char* term = std::getenv("TERM");
  return term == nullptr || std::string(term) != "dumb";
#else
  (void)os;
  return false;
#endif
}

class Progress {
 public:
  using clock = std::chrono::steady_clock;

  /// total: the last step of the run; first: the step it starts from (> 0 when resumed).
  Progress(std::ostream& os, ProgressMode mode, std::int64_t first, std::int64_t total,
           std::int64_t every)
      : os_(&os),
        bar_(mode == ProgressMode::bar || (mode == ProgressMode::automatic && is_terminal(os))),
        quiet_(mode == ProgressMode::quiet),
        first_(first),
        total_(total),
        every_(every > 0 ? every : 1),
        start_(clock::now()),
        last_draw_(start_) {}

  /// Records the loss of the step that just finished (step = steps done so far).
  void update(std::int64_t step, double loss, double lr) {
    sum_ += loss;
    ++count_;
    if (quiet_) return;
    const auto now = clock::now();
    const bool last = step >= total_;
    if (bar_) {
      // Redraw at most ~10 times a second (and at the end); the average covers the window.
      if (!last && now - last_draw_ < std::chrono::milliseconds(100)) return;
      draw_bar(step, lr, now);
      last_draw_ = now;
      if (step % every_ == 0 || last) reset_window();
      if (last) *os_ << '\n' << std::flush;
    } else if (step % every_ == 0 || last) {
      *os_ << line(step, lr, now) << '\n' << std::flush;
      reset_window();
    }
  }

  /// Steps per second of this run so far.
  double rate(std::int64_t step) const {
    const double s = std::chrono::duration<double>(clock::now() - start_).count();
    return s > 0 ? static_cast<double>(step - first_) / s : 0.0;
  }
  double elapsed() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

  /// A message between progress updates (ends the bar's line first).
  void message(const std::string& text) {
    if (quiet_) return;
    if (bar_) *os_ << '\r' << std::string(100, ' ') << '\r';
    *os_ << text << '\n' << std::flush;
  }

 private:
  double window_mean() const { return count_ > 0 ? sum_ / static_cast<double>(count_) : NAN; }
  void reset_window() {
    sum_ = 0;
    count_ = 0;
  }

  std::string stats(std::int64_t step, double lr, clock::time_point now) const {
    const double secs = std::chrono::duration<double>(now - start_).count();
    const double r = secs > 0 ? static_cast<double>(step - first_) / secs : 0.0;
    const double eta = r > 0 ? static_cast<double>(total_ - step) / r : NAN;
    char buf[160];
    std::snprintf(buf, sizeof buf, "loss %.5f | lr %.2e | %.1f steps/s | %s %s", window_mean(), lr,
                  r, step >= total_ ? "took" : "ETA",
                  format_duration(step >= total_ ? secs : eta).c_str());
    return buf;
  }

  std::string line(std::int64_t step, double lr, clock::time_point now) const {
    const int w = static_cast<int>(std::to_string(total_).size());
    char head[64];
    std::snprintf(head, sizeof head, "step %*lld/%lld  ", w, static_cast<long long>(step),
                  static_cast<long long>(total_));
    return head + stats(step, lr, now);
  }

  void draw_bar(std::int64_t step, double lr, clock::time_point now) {
    constexpr int width = 24;
    const double frac = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1;
    const int filled = static_cast<int>(frac * width);
    std::string bar(width, ' ');
    for (int i = 0; i < filled && i < width; ++i) bar[static_cast<std::size_t>(i)] = '=';
    if (filled < width) bar[static_cast<std::size_t>(filled)] = '>';
    char pct[16];
    std::snprintf(pct, sizeof pct, "%3d%%", static_cast<int>(frac * 100));
    *os_ << '\r' << "[" << bar << "] " << pct << "  " << line(step, lr, now) << "   " << std::flush;
  }

  std::ostream* os_;
  bool bar_, quiet_;
  std::int64_t first_, total_, every_;
  clock::time_point start_, last_draw_;
  double sum_ = 0;
  std::int64_t count_ = 0;
};

}  // namespace flowdiff::train
