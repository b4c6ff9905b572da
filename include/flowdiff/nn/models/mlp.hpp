// flowdiff/nn/models/mlp.hpp — the MLP vector field u_theta(x, t[, y]) for flat data x: [N, d]
// (toy 2-D distributions, small latents). With e = SinusoidalTimeEmbedding(t) (+ W_y[y] when the
// model is class-conditional; row num_classes of W_y is the null label of CFG):
//   h_0 = [x, e]                                  [N, d + time_dim]
//   a_i = h_i W_i^T + b_i,  h_{i+1} = silu(a_i)   i = 0 .. depth - 1   (width hidden units)
//   u   = h_depth W_depth^T + b_depth             [N, d]
// Backward runs the layers in reverse: dW_i += da_i^T h_i, da_i = silu'(a_i) * (da_{i+1} W_{i+1}),
// and splits dh_0 into dx (the input gradient, for classifier guidance and likelihoods) and de
// (scattered into the label-embedding rows). Parameters carry the names PyTorch's
//   net = nn.Sequential(Linear(d + time_dim, width), SiLU(), ..., Linear(width, d))
//   label_emb = nn.Embedding(num_classes + 1, time_dim)
// gives them: "net.0.weight", "net.0.bias", "net.2.weight", ..., "net.<2 depth>.bias",
// "label_emb.weight", so a state_dict saved from that module loads with nn::load_parameters.
#pragma once

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/core/thread_team.hpp"
#include "flowdiff/nn/layers/activation.hpp"
#include "flowdiff/nn/layers/embedding.hpp"
#include "flowdiff/nn/layers/linear.hpp"
#include "flowdiff/nn/parameters.hpp"

namespace flowdiff::nn {

/// Configuration of nn::MLP.
struct MLPConfig {
  index_t dim;              ///< d: features of x and of the output
  index_t width = 256;      ///< hidden units per layer
  index_t depth = 4;        ///< hidden layers (Linear + SiLU); depth + 1 Linear layers in all
  index_t time_dim = 64;    ///< width of the sinusoidal time embedding (and of the label one)
  index_t num_classes = 0;  ///< 0: unconditional; else labels in [0, num_classes], num_classes = ∅
};

template <class T>
class MLP {
 public:
  using value_type = T;

  /// Everything the forward pass computes and backward needs, plus backward's scratch. Sized on
  /// the first call and whenever N changes; reused (no allocation) while N repeats.
  struct Cache {
    index_t n = 0;
    bool has_forward = false;
    Tensor<label_t> labels;      // [N] (the null label where forward got no labels)
    Tensor<T> emb, label_emb;    // [N, time_dim]
    Tensor<T> h0;                // [N, d + time_dim]
    std::vector<Tensor<T>> pre;  // depth × [N, width]: a_i
    std::vector<Tensor<T>> act;  // depth × [N, width]: silu(a_i)
    Tensor<T> g0, g1;            // [N, width]: backward ping-pong buffers
    Tensor<T> dh0, de;           // [N, d + time_dim], [N, time_dim]
    /// Threads for the small-batch forward (forward_split below). nullptr (the default): the
    /// cache's own team (own_team), or OpenMP's parallel region without one. A team given here
    /// is not owned: it must outlive the forward calls that use it, and two threads must not
    /// run forwards with the same team at once (ThreadTeam::run throws).
    ThreadTeam* team = nullptr;
    /// Whether the small-batch forward, given no team, makes one of its own (`owned_team`, as
    /// many threads as OpenMP would use, spinning ThreadTeam::default_spin after each call
    /// before they sleep) instead of opening an OpenMP parallel region on every call. false:
    /// OpenMP's threads only, for a program that must not have more threads than those.
    bool own_team = true;
    LazyThreadTeam owned_team;  // made by the first split forward; a copied cache makes its own
  };

  MLP(Parameters<T>& ps, const MLPConfig& config, const std::string& prefix = "")
      : cfg_(config), prefix_(prefix), temb_(config.time_dim >= 2 ? config.time_dim : 2) {
    require<config_error>(config.dim >= 1 && config.width >= 1 && config.depth >= 1 &&
                              config.time_dim >= 2 && config.num_classes >= 0,
                          name(),
                          ": need dim >= 1, width >= 1, depth >= 1, time_dim >= 2, num_classes >= "
                          "0; got dim = ",
                          config.dim, ", width = ", config.width, ", depth = ", config.depth,
                          ", time_dim = ", config.time_dim, ", num_classes = ", config.num_classes);
    linears_.reserve(static_cast<std::size_t>(config.depth + 1));
    for (index_t i = 0; i <= config.depth; ++i) {
      const index_t in = i == 0 ? config.dim + config.time_dim : config.width;
      const index_t out = i == config.depth ? config.dim : config.width;
      // nn.Sequential numbering: Linear layers at even indices, SiLU at odd ones.
      linears_.emplace_back(ps, prefix + "net." + std::to_string(2 * i), in, out);
    }
    if (config.num_classes > 0)
      label_emb_.emplace_back(ps, prefix + "label_emb", config.num_classes, config.time_dim);
  }

  const MLPConfig& config() const { return cfg_; }
  index_t dim() const { return cfg_.dim; }
  index_t num_classes() const { return cfg_.num_classes; }
  bool conditional() const { return cfg_.num_classes > 0; }
  /// The label meaning "no class" (classifier-free guidance); only for conditional models.
  label_t null_label() const { return static_cast<label_t>(cfg_.num_classes); }

  /// PyTorch's defaults: Linear U(±1/sqrt(in)), Embedding N(0, 1).
  void init(Parameters<T>& ps, Generator& gen) const {
    for (const auto& l : linears_) l.init(ps, gen);
    for (const auto& e : label_emb_) e.init(ps, gen);
  }

  // x: [N, d], t: [N], y: [N] or empty / {} (a conditional model then uses the null label),
  // out: [N, d]. Fills `cache` for backward.
  void forward(const Parameters<T>& ps, View<const T> x, View<const T> t, View<const label_t> y,
               View<T> out, Cache& cache) const {
    const index_t n = check_forward(x, t, y, out);
    prepare(cache, n);
    const index_t d = cfg_.dim, td = cfg_.time_dim, in0 = d + td;

    temb_.forward(t, cache.emb.view());
    if (conditional()) {
      if (absent(y))
        fill(cache.labels.view(), null_label());
      else
        copy(cache.labels.view(), y);
      label_emb_[0].forward(ps, cache.labels.view(), cache.label_emb.view());
      add_inplace(cache.emb.view(), cache.label_emb.view());
    }
    // h0 = [x, e], row by row.
    T* h0 = cache.h0.data();
    const T* px = x.data();
    const T* pe = cache.emb.data();
    for (index_t r = 0; r < n; ++r) {
      for (index_t j = 0; j < d; ++j) h0[r * in0 + j] = px[r * d + j];
      for (index_t j = 0; j < td; ++j) h0[r * in0 + d + j] = pe[r * td + j];
    }
    if (!forward_split(ps, out, cache)) {
      View<const T> h = cache.h0.view();
      for (std::size_t i = 0; i < cache.pre.size(); ++i) {
        linears_[i].forward_silu(ps, h, cache.pre[i].view(), cache.act[i].view());
        h = cache.act[i].view();
      }
      linears_.back().forward(ps, h, out);
    }
    cache.has_forward = true;
  }

  /// Forwards of at most split_max_rows rows with at least this many bytes of weights split
  /// every layer's outputs over the OpenMP threads (forward_split). Below it the weights sit in
  /// one core's L2 and the threads' start and barriers cost more than they save.
  static constexpr std::size_t split_min_weight_bytes = std::size_t(384) << 10;
  /// The largest batch forward_split takes: sgemm's unpacked small-batch products go up to 16
  /// rows, run serially (far below its threading threshold), and cut at any multiple of 16
  /// output features into the same bits. Larger batches thread inside each product.
  static constexpr index_t split_max_rows = 16;

  // dout: [N, d] (N of the last forward), dx: [N, d] or empty / {} (skipped). Parameter gradients
  // accumulate
  // (+=); dx is overwritten. Uses the activations of the last forward() with this cache.
  void backward(Parameters<T>& ps, View<const T> dout, View<T> dx, Cache& cache) const {
    require<config_error>(cache.has_forward, name(),
                          ": backward() needs the cache of a forward() call first");
    const index_t n = cache.n, d = cfg_.dim, td = cfg_.time_dim, in0 = d + td;
    check_shape("dout", dout, Shape{n, d});
    if (!absent(dx)) check_shape("dx", dx, Shape{n, d});

    const index_t depth = cfg_.depth;
    // g: gradient w.r.t. the output of the layer being processed; ping-pong between g0 and g1
    // because Linear::backward reads dy while it writes dx.
    View<const T> g = dout;
    Tensor<T>* bufs[2] = {&cache.g0, &cache.g1};
    for (index_t i = depth; i >= 1; --i) {
      const auto k = static_cast<std::size_t>(i);
      View<T> dh = bufs[i % 2]->view();
      // dh = silu'(pre) (g W): the activation's derivative in the product's epilogue
      linears_[k].backward_through_silu(ps, cache.act[k - 1].view(), g, cache.pre[k - 1].view(),
                                        dh);
      g = dh;
    }
    // The first layer: its input gradient is needed only for dx or the label embedding.
    const bool need_dh0 = !absent(dx) || conditional();
    linears_[0].backward(ps, cache.h0.view(), g,
                         need_dh0 ? cache.dh0.view() : View<T>(nullptr, Shape{0}));
    if (!need_dh0) return;
    const T* dh0 = cache.dh0.data();
    if (!absent(dx)) {
      T* pdx = dx.data();
      for (index_t r = 0; r < n; ++r)
        for (index_t j = 0; j < d; ++j) pdx[r * d + j] = dh0[r * in0 + j];
    }
    if (conditional()) {
      T* de = cache.de.data();
      for (index_t r = 0; r < n; ++r)
        for (index_t j = 0; j < td; ++j) de[r * td + j] = dh0[r * in0 + d + j];
      label_emb_[0].backward(ps, cache.labels.view(), cache.de.view());
    }
  }

 private:
  std::string name() const { return prefix_.empty() ? std::string("MLP") : prefix_ + " (MLP)"; }

  template <class U>
  void check_shape(const char* arg, View<U> v, const Shape& expected) const {
    if (!(v.shape() == expected))
      fail<shape_error>(name(), ": ", arg, ": expected shape ", expected, ", got ", v.shape());
  }

  index_t check_forward(View<const T> x, View<const T> t, View<const label_t> y,
                        View<T> out) const {
    if (x.rank() != 2 || x.dim(1) != cfg_.dim || x.dim(0) < 1)
      fail<shape_error>(name(), ": x: expected shape [N, ", cfg_.dim, "] with N >= 1, got ",
                        x.shape());
    const index_t n = x.dim(0);
    check_shape("t", t, Shape{n});
    check_shape("out", out, Shape{n, cfg_.dim});
    if (!absent(y)) {
      if (!conditional())
        fail<config_error>(name(), ": labels y were given (shape ", y.shape(),
                           ") but the model is unconditional (num_classes = 0)");
      check_shape("y", y, Shape{n});
    }
    return n;
  }

  // Batches of 1 to split_max_rows (float, weights of at least split_min_weight_bytes, and
  // cache.team of two or more threads, or else more than one OpenMP thread outside a parallel
  // region): one job of the team / one parallel region for the whole chain of products, each
  // thread computing a range of every layer's output features (multiples of 16, so the same
  // bits as the serial forward on any thread count). A batch-1 product streams
  // its weights once and does one FMA per weight loaded, so it runs at the speed of the cache
  // that holds them: split this way, each core keeps its share of every layer in its own L2
  // (0.43 MB each for the 4 x 256 MLP, whose 0.86 MB spill one core's 1 MB L2 into L3) and the
  // shares stream in parallel. A batch of 2 to 16 rows does that many FMAs per weight, and its
  // products, serial inside sgemm (far below its threading threshold), gain the second core's
  // FMA units as well. Between
  // layers each thread publishes how many layers it has finished (its own cache line, release)
  // and waits for the others' counts (acquire) instead of a full barrier: one cache-line transfer
  // each way per layer, which matters when the two cores sit far apart (a barrier there cost
  // about 1 us). At most one thread per split_min_weight_bytes / 2 of weights takes part. The
  // job runs on a ThreadTeam (cache.team, else the cache's own) unless the cache opts out: its
  // spinning workers start the job sooner than libgomp's fork, and its end waits only for their
  // "done" lines, not a barrier: 5.1 against 5.4-5.7 us for the 4 x 256 MLP at batch 1 on a
  // 2-core Xeon (benchmarks/README.md). Returns false (nothing done) where the serial forward
  // applies, and always without flowdiff's own GEMM (off x86, or FLOWDIFF_NO_SGEMM): Eigen's
  // product blocks by its shape, so a range of features would not get the serial bits.
  bool forward_split(const Parameters<T>& ps, View<T> out, Cache& cache) const {
    if constexpr (std::is_same_v<T, float>) {
      const index_t n = cache.n;
      if (n > split_max_rows || simd::best_isa() == simd::Isa::none) return false;
      int available = 1;
      ThreadTeam* threads = cache.team;
      if (threads != nullptr) {
        available = threads->size();
      } else {
#if defined(_OPENMP)
        if (!omp_in_parallel()) available = omp_get_max_threads();
#endif
      }
      if (available < 2) return false;
      std::size_t bytes = 0;
      for (const auto& l : linears_)
        bytes += static_cast<std::size_t>(l.in_features() * l.out_features()) * sizeof(T);
      if (bytes < split_min_weight_bytes) return false;
      constexpr int max_team = 8;
      const int team = static_cast<int>(
          std::min<std::size_t>({static_cast<std::size_t>(available), std::size_t(max_team),
                                 bytes / (split_min_weight_bytes / 2)}));
      struct alignas(64) Progress {
        std::atomic<index_t> layers{0};
      };
      Progress progress[max_team];
      // Captures by value but for ps and cache, whose objects the caller does not write during
      // the job: a worker reads the closure, and a ThreadTeam copies it into its own cache line
      // (at the same stack address from call to call, the copy is not even rewritten).
      auto body = [this, &ps, &cache, prog = &progress[0], n, pout = out.data()](int t, int nt) {
        const index_t depth = cfg_.depth;
        // Thread t's share of `width` features: whole blocks of 16, the tail to the last thread.
        auto range = [t, nt](index_t width, index_t& j0, index_t& j1) {
          const index_t blocks = width / 16;
          j0 = blocks * t / nt * 16;
          j1 = t + 1 == nt ? width : blocks * (t + 1) / nt * 16;
        };
        auto wait_for = [&](index_t layers) {
          for (int u = 0; u < nt; ++u)
            while (u != t && prog[u].layers.load(std::memory_order_acquire) < layers)
              flowdiff::detail::spin_pause();
        };
        const T* h = cache.h0.data();
        index_t j0 = 0, j1 = 0;
        for (index_t i = 0; i < depth; ++i) {
          const auto k = static_cast<std::size_t>(i);
          range(linears_[k].out_features(), j0, j1);
          linears_[k].forward_columns(ps, h, n, cache.pre[k].data(), cache.act[k].data(), j0, j1,
                                      Linear<T>::Act::silu);
          prog[t].layers.store(i + 1, std::memory_order_release);
          // An output layer of at most 16 features runs on thread 0 alone (below): the others
          // go straight on to the job's end, where thread 0 would otherwise wait for them
          // (90 ns less per call, timed by the TSC on the Xeon of 2026-12-07).
          if (i + 1 < depth || t == 0 || cfg_.dim > 16) wait_for(i + 1);
          h = cache.act[k].data();
        }
        if (cfg_.dim > 16) {
          range(cfg_.dim, j0, j1);
        } else {
          j0 = 0;
          j1 = t == 0 ? cfg_.dim : 0;
        }
        linears_.back().forward_columns(ps, h, n, pout, nullptr, j0, j1, Linear<T>::Act::none);
      };
      if (threads == nullptr && cache.own_team) threads = &cache.owned_team.get(team);
      if (threads != nullptr) {
        threads->run(body, team);
      } else {
#if defined(_OPENMP)
#pragma omp parallel num_threads(team)
        body(omp_get_thread_num(), omp_get_num_threads());
#endif
      }
      return true;
    }
    (void)ps;
    (void)out;
    (void)cache;
    return false;
  }

  void prepare(Cache& c, index_t n) const {
    const index_t w = cfg_.width, td = cfg_.time_dim, in0 = cfg_.dim + td;
    const auto depth = static_cast<std::size_t>(cfg_.depth);
    c.has_forward = false;
    if (c.n == n && c.pre.size() == depth) return;
    c.labels.resize(Shape{n});
    c.emb.resize(Shape{n, td});
    c.label_emb.resize(Shape{n, td});
    c.h0.resize(Shape{n, in0});
    c.pre.resize(depth);
    c.act.resize(depth);
    for (std::size_t i = 0; i < depth; ++i) {
      c.pre[i].resize(Shape{n, w});
      c.act[i].resize(Shape{n, w});
    }
    c.g0.resize(Shape{n, w});
    c.g1.resize(Shape{n, w});
    c.dh0.resize(Shape{n, in0});
    c.de.resize(Shape{n, td});
    c.n = n;
  }

  // An omitted optional argument: an empty view, or a default-constructed one (whose rank-0 shape
  // counts one element, so empty() alone would not recognise `{}`).
  template <class U>
  static bool absent(View<U> v) {
    return v.data() == nullptr || v.empty();
  }

  static void add_inplace(View<T> a, View<const T> b) {
    T* pa = a.data();
    const T* pb = b.data();
    for (index_t i = 0; i < a.numel(); ++i) pa[i] += pb[i];
  }

  MLPConfig cfg_;
  std::string prefix_;
  SinusoidalTimeEmbedding<T> temb_;
  std::vector<Linear<T>> linears_;       // depth + 1 layers
  std::vector<Embedding<T>> label_emb_;  // one layer when conditional, else none
};

}  // namespace flowdiff::nn
