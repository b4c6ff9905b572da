// flowdiff/core/thread_team.hpp — a persistent team of threads for latency-bound parallel work.
//
// OpenMP starts a parallel region in a few hundred nanoseconds (libgomp wakes its docked threads
// through shared state, and the region's end is a full barrier). That is nothing next to a
// training step, but it is a tenth of a batch-1 MLP forward (about 5.5 us on two cores), which is
// what a sampler calls a hundred times per sample. A ThreadTeam keeps its workers spinning on
// their own cache line between jobs, so a job reaches them as one cache-line transfer, and run()
// returns as soon as every worker has stored "done" into its line.
//
//   flowdiff::ThreadTeam team(2);   // the caller and one worker thread
//   team.run([&](int t, int nt) { /* part t of nt; t = 0 runs on the calling thread */ });
//
// Workers spin for `spin` after each job (200 us by default), then sleep (C++20 atomic wait, a
// futex on Linux) until the next one: a team that is not used costs no CPU, but while it spins
// it occupies its cores, which OpenMP regions of other work would want. Keep one for the phases
// that call small forwards back to back (sampling, serving) and give it spin = 0 (sleep at once)
// or destroy it for the rest. run() is not reentrant: a concurrent or nested call on the same
// team throws config_error. An exception thrown by the job on any thread is rethrown by run()
// after every thread has finished (the first one, the caller's before the workers'); parts that
// wait for each other must therefore not throw between their waits, or the others wait forever.
// No more threads than free cores: a spinning worker that shares a core with the caller delays
// every job by a scheduler time slice. A team's threads do not survive fork(): in the child
// process run() throws config_error instead of waiting for workers that are not there, and the
// destructor leaves them alone (LazyThreadTeam, below, makes a new team there).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <system_error>
#include <thread>
#include <type_traits>

#include "flowdiff/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FLOWDIFF_THREAD_TEAM_ATFORK 1
#endif

namespace flowdiff {

namespace detail {
/// One step of a spin-wait loop: tells the core this thread is waiting (x86 PAUSE, Arm YIELD).
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// How many times this process's ancestry has forked since the first ThreadTeam was made in it
/// (a pthread_atfork child handler, registered by that first team, counts them). A team made at
/// generation g owns threads only while the generation is still g. The one process-wide value
/// of the library; it records a fact about the process and changes no result.
inline std::atomic<std::uint32_t>& fork_generation() {
  static std::atomic<std::uint32_t> generation{0};
#if defined(FLOWDIFF_THREAD_TEAM_ATFORK)
  [[maybe_unused]] static const int registered = pthread_atfork(
      nullptr, nullptr, [] { fork_generation().fetch_add(1, std::memory_order_relaxed); });
#endif
  return generation;
}
}  // namespace detail

class ThreadTeam {
 public:
  static constexpr std::chrono::microseconds default_spin{200};

  /// A team of `threads` (the calling thread of run() and threads - 1 workers); 0: one per
  /// hardware thread (std::thread::hardware_concurrency()). Workers spin for `spin` after each
  /// job before they sleep.
  explicit ThreadTeam(int threads = 0, std::chrono::microseconds spin = default_spin)
      : size_(threads), spin_(spin), generation_(detail::fork_generation().load()) {
    require<config_error>(threads >= 0, "ThreadTeam: threads must be >= 0 (0: one per hardware "
                                        "thread), got ", threads);
    require<config_error>(spin.count() >= 0, "ThreadTeam: spin must be >= 0 us, got ",
                          spin.count());
    if (size_ == 0) size_ = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    orders_ = std::make_unique<Order[]>(static_cast<std::size_t>(size_ - 1));
    reports_ = std::make_unique<Report[]>(static_cast<std::size_t>(size_ - 1));
    threads_ = std::make_unique<std::thread[]>(static_cast<std::size_t>(size_ - 1));
    int started = 0;
    try {
      for (; started < size_ - 1; ++started)
        threads_[static_cast<std::size_t>(started)] =
            std::thread([this, started] {
              const auto w = static_cast<std::size_t>(started);
              work(orders_[w], reports_[w], started + 1);
            });
    } catch (const std::system_error& e) {
      stop(started);
      fail<config_error>("ThreadTeam: could not start worker thread ", started + 1, " of ",
                         size_ - 1, ": ", e.what());
    }
  }

  ThreadTeam(const ThreadTeam&) = delete;
  ThreadTeam& operator=(const ThreadTeam&) = delete;

  ~ThreadTeam() {
    if (forked()) {
      // A child process has the workers' objects but not their threads: joining would wait
      // forever, and destroying joinable std::thread objects would terminate. Leave them be.
      (void)threads_.release();
      return;
    }
    stop(size_ - 1);
  }

  /// Threads in the team, the caller of run() included.
  int size() const noexcept { return size_; }
  std::chrono::microseconds spin() const noexcept { return spin_; }
  /// Whether this process was forked from the one that made the team (its workers are then
  /// the parent's: run() throws).
  bool forked() const noexcept {
    return detail::fork_generation().load(std::memory_order_relaxed) != generation_;
  }

  /// Calls f(t, count) for t = 0 .. count - 1, t = 0 on the calling thread and t >= 1 on workers
  /// 1 .. count - 1 (the others stay idle), and returns when all calls have returned. The threads
  /// run at the same time, so f may wait for other parts (spinning on atomics): every part has
  /// its own thread.
  template <class F>
  void run(F&& f, int count) {
    require<config_error>(count >= 1 && count <= size_, "ThreadTeam::run: count must be in [1, ",
                          size_, "] (the team's size), got ", count);
    if (forked())
      fail<config_error>("ThreadTeam::run: the team was made before this process was forked; "
                         "its worker threads exist only in the parent process");
    if (busy_.exchange(true, std::memory_order_acquire))
      fail<config_error>("ThreadTeam::run: the team is already running a job (a concurrent or "
                         "nested run() call on the same team)");
    struct Release {
      std::atomic<bool>& busy;
      ~Release() { busy.store(false, std::memory_order_release); }
    } release{busy_};

    using Fn = std::remove_reference_t<F>;
    void (*const fn)(void*, int, int) = [](void* c, int t, int n) { (*static_cast<Fn*>(c))(t, n); };
    // The workers read the job's closure from the team's own line when it fits (a lambda's
    // captures), not from the caller's stack: the caller keeps writing its stack while the job
    // runs, and every write to the closure's line would send that line back and forth. Only a
    // callable that a const reference can call: one that changes itself (a `mutable` lambda, a
    // functor with a non-const operator()) must be the caller's own object on every thread.
    void* ctx = const_cast<void*>(static_cast<const volatile void*>(std::addressof(f)));
    if constexpr (sizeof(Fn) <= sizeof(closure_) && std::is_trivially_copyable_v<Fn> &&
                  std::is_invocable_v<const Fn&, int, int>) {
      if (std::memcmp(closure_, ctx, sizeof(Fn)) != 0) std::memcpy(closure_, ctx, sizeof(Fn));
      ctx = closure_;
    }
    const std::uint32_t job = ++jobs_;
    for (int w = 0; w + 1 < count; ++w) {
      Order& o = orders_[static_cast<std::size_t>(w)];
      Report& r = reports_[static_cast<std::size_t>(w)];
      // Written only when they change: a job then dirties no line but the one `job` lives in (the
      // same function from the same stack frame, as a sampler's forward calls are, costs the
      // worker no second line to fetch).
      if (o.fn != fn) o.fn = fn;
      if (o.ctx != ctx) o.ctx = ctx;
      if (o.count != count) o.count = count;
      if (r.error) r.error = nullptr;
      // seq_cst store, then seq_cst load of `sleeping`: either this sees the worker asleep and
      // wakes it, or the worker's own seq_cst check before it sleeps sees the new job.
      o.job.store(job, std::memory_order_seq_cst);
      if (r.sleeping.load(std::memory_order_seq_cst) != 0) o.job.notify_one();
    }
    std::exception_ptr error;
    try {
      f(0, count);
    } catch (...) {
      error = std::current_exception();
    }
    for (int w = 0; w + 1 < count; ++w) {
      Report& r = reports_[static_cast<std::size_t>(w)];
      while (r.done.load(std::memory_order_acquire) != job) detail::spin_pause();
      if (!error && r.error) error = r.error;
    }
    if (error) std::rethrow_exception(error);
  }

  /// run(f, size()).
  template <class F>
  void run(F&& f) {
    run(std::forward<F>(f), size_);
  }

 private:
  // What run() writes for a worker (the line the worker spins on) and what the worker writes
  // back (the line run() waits on): one cache-line transfer each way per job.
  struct alignas(64) Order {
    std::atomic<std::uint32_t> job{0};  // run()'s job number: a new one starts the worker
    int count = 0;
    void (*fn)(void*, int, int) = nullptr;  // nullptr with a new job: stop
    void* ctx = nullptr;
  };
  struct alignas(64) Report {
    std::atomic<std::uint32_t> done{0};      // the last job the worker finished
    std::atomic<std::uint32_t> sleeping{0};  // 1 while the worker waits in job.wait()
    std::exception_ptr error;                // what the job threw there
  };

  void work(Order& o, Report& r, int t) {
    using clock = std::chrono::steady_clock;
    std::uint32_t seen = 0;
    for (;;) {
      std::uint32_t job = o.job.load(std::memory_order_acquire);
      if (job == seen) {
        // The deadline is read from the clock after a first stretch of spinning, not at once:
        // a job that follows at once then finds the worker already spinning.
        clock::time_point deadline{};
        for (unsigned n = 1; (job = o.job.load(std::memory_order_acquire)) == seen; ++n) {
          detail::spin_pause();
          if (n == 256) deadline = clock::now() + spin_;
          if (n % 256 == 0 && clock::now() >= deadline) {
            r.sleeping.store(1, std::memory_order_seq_cst);
            o.job.wait(seen, std::memory_order_seq_cst);  // returns once job != seen
            r.sleeping.store(0, std::memory_order_relaxed);
          }
        }
      }
      seen = job;
      if (o.fn == nullptr) return;
      try {
        o.fn(o.ctx, t, o.count);
      } catch (...) {
        r.error = std::current_exception();
      }
      r.done.store(job, std::memory_order_release);
    }
  }

  // Stops and joins the first `n` workers.
  void stop(int n) noexcept {
    const std::uint32_t job = ++jobs_;
    for (int w = 0; w < n; ++w) {
      Order& o = orders_[static_cast<std::size_t>(w)];
      o.fn = nullptr;
      o.job.store(job, std::memory_order_seq_cst);
      o.job.notify_one();
    }
    for (int w = 0; w < n; ++w) threads_[static_cast<std::size_t>(w)].join();
  }

  int size_;
  std::chrono::microseconds spin_;
  std::uint32_t generation_;  // detail::fork_generation() when the team was made
  std::uint32_t jobs_ = 0;  // run()'s last job number (only run() and stop() touch it)
  std::atomic<bool> busy_{false};
  alignas(64) unsigned char closure_[128] = {};  // a copy of run()'s callable, when it fits
  std::unique_ptr<Order[]> orders_;
  std::unique_ptr<Report[]> reports_;
  std::unique_ptr<std::thread[]> threads_;
};

/// A ThreadTeam that an object makes for itself on first use, such as the one in a model's
/// forward cache: get(threads) returns a team of that size, made on the first call and made
/// again when the size asked for changes or the process was forked since. Copies start with no
/// team (each makes its own, so copies used from different threads never share one); moves
/// take the team along.
class LazyThreadTeam {
 public:
  LazyThreadTeam() = default;
  LazyThreadTeam(const LazyThreadTeam&) noexcept {}
  LazyThreadTeam& operator=(const LazyThreadTeam&) noexcept { return *this; }
  LazyThreadTeam(LazyThreadTeam&&) noexcept = default;
  LazyThreadTeam& operator=(LazyThreadTeam&&) noexcept = default;

  /// The team of `threads` threads (ThreadTeam's default spin), made if there is none yet.
  ThreadTeam& get(int threads) {
    if (!team_ || team_->size() != threads || team_->forked()) {
      team_.reset();
      team_ = std::make_unique<ThreadTeam>(threads);
    }
    return *team_;
  }
  /// The team made so far, or nullptr.
  ThreadTeam* current() const noexcept { return team_.get(); }
  /// Ends the team's threads now (the next get() makes new ones).
  void reset() noexcept { team_.reset(); }

 private:
  std::unique_ptr<ThreadTeam> team_;
};

}  // namespace flowdiff
