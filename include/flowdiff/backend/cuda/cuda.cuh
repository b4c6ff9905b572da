// flowdiff/backend/cuda/cuda.cuh — the CUDA backend, flowdiff::Cuda: device memory allocated
// stream-ordered (cudaMallocAsync / cudaFreeAsync from the device's memory pool), index-parallel
// loops as one grid-stride kernel that calls the same FLOWDIFF_HOST_DEVICE functor the CPU backend
// runs, device-to-device copies, and deterministic reductions: the input is cut into fixed blocks
// of `reduce_block` elements, each block's threads accumulate in double over a fixed stride and
// combine in a fixed shared-memory tree, and the block partials are reduced again the same way
// until one value is left. No atomics, so the bits depend on the input and the block size only,
// never on the scheduling or the GPU. Everything runs on the per-thread default stream
// (cudaStreamPerThread) unless a stream is passed explicitly. Also: host <-> device copies of
// tensors (to_device / to_host), the device availability query, and device forms of core/ops.hpp's
// host-only helpers (dot, max_abs, all_finite, check_finite) under the same names.
//
// Stream semantics: every operation is ordered on its stream; a Tensor<T, Cuda> frees its memory
// on the per-thread default stream of the thread that destroys it. A tensor used on another
// stream must therefore have that stream synchronised (or joined by an event) before it dies.
// The calls that return a value to the host (sum, reduce_sum, copies to and from host memory)
// synchronise their stream before they return.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/cuda/error.cuh"
#include "flowdiff/backend/segment_reduce.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

namespace cuda::kernels {

/// f(i) for every i in [0, n): each thread takes i = first, first + stride, ... (grid-stride).
template <class F>
__global__ void for_each(index_t n, F f) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

/// partial[b] = the combination (op) of g(i) over block b = [b * chunk, min(n, (b + 1) * chunk)),
/// in double: thread k combines i = lo + k, lo + k + Threads, ... in that order, starting from
/// `identity`, then the Threads values are combined pairwise in a fixed tree. The order of every
/// operation is fixed by (n, chunk, Threads) alone.
template <int Threads, class G, class Op>
__global__ void __launch_bounds__(Threads)
    reduce_blocks(index_t n, index_t chunk, G g, Op op, double identity, double* partial) {
  static_assert((Threads & (Threads - 1)) == 0, "reduce_blocks: Threads must be a power of two");
  __shared__ double s[Threads];
  const index_t lo = static_cast<index_t>(blockIdx.x) * chunk;
  const index_t hi = lo + chunk < n ? lo + chunk : n;
  double acc = identity;
  for (index_t i = lo + threadIdx.x; i < hi; i += Threads) acc = op(acc, static_cast<double>(g(i)));
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = Threads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) s[threadIdx.x] = op(s[threadIdx.x], s[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

/// segment_reduce (backend/segment_reduce.hpp's protocol): block b takes segments b, b + gridDim,
/// ...; for each pass thread t sums elements t, t + Threads, ... of the segment in double, the
/// block adds the Threads partial sums in a fixed tree (s[t] += s[t + w], w = Threads / 2, ..., 1)
/// and thread 0 writes the segment's results with r.put. The order is
/// segment_reduce_reference<Threads>'s.
template <int Threads, class R>
__global__ void __launch_bounds__(Threads) segment_reduce(index_t segs, R r) {
  static_assert((Threads & (Threads - 1)) == 0, "segment_reduce: Threads must be a power of two");
  constexpr int K = R::width;
  __shared__ double part[K][Threads];
  __shared__ double sums[segment_reduce_max_sums];
  const int t = static_cast<int>(threadIdx.x);
  const index_t len = r.size();
  for (index_t s = blockIdx.x; s < segs; s += gridDim.x) {
    for (int p = 0; p < R::passes; ++p) {
      double acc[K];
      for (int k = 0; k < K; ++k) acc[k] = 0.0;
      for (index_t i = t; i < len; i += Threads) {
        double v[K];
        r.element(s, i, p, sums, v);
        for (int k = 0; k < K; ++k) acc[k] += v[k];
      }
      for (int k = 0; k < K; ++k) part[k][t] = acc[k];
      __syncthreads();
      for (int w = Threads / 2; w > 0; w /= 2) {
        if (t < w)
          for (int k = 0; k < K; ++k) part[k][t] += part[k][t + w];
        __syncthreads();
      }
      if (t == 0)
        for (int k = 0; k < K; ++k) sums[p * K + k] = part[k][0];
      __syncthreads();  // every thread sees this pass's sums before the next pass reads them
    }
    if (t == 0) r.put(s, sums);
    __syncthreads();  // sums is rewritten by the next segment
  }
}

/// The combinations reduce() offers: a + b; the larger / smaller, NaN winning (so a NaN anywhere
/// is never lost, as max_abs promises).
struct Plus {
  FLOWDIFF_HOST_DEVICE double operator()(double a, double b) const { return a + b; }
};
struct Max {
  FLOWDIFF_HOST_DEVICE double operator()(double a, double b) const {
    return a != a ? a : (b != b ? b : (a < b ? b : a));
  }
};
struct Min {
  FLOWDIFF_HOST_DEVICE double operator()(double a, double b) const {
    return a != a ? a : (b != b ? b : (b < a ? b : a));
  }
};

/// p[i] as a double: the element accessor of sum() and of the later reduction passes.
template <class T>
struct Load {
  const T* p;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const { return static_cast<double>(p[i]); }
};

}  // namespace cuda::kernels

struct Cuda {
  static constexpr const char* name = "cuda";
  static constexpr bool host_accessible = false;
  /// Threads per block of parallel_for.
  static constexpr int block_threads = 256;
  /// At most this many blocks per parallel_for; larger loops stride (enough to fill any current
  /// GPU several times over: an H100 holds 132 x 8 blocks of 256 threads at once).
  static constexpr index_t max_blocks = index_t{1} << 16;
  /// Elements per block of the deterministic reduction, and its threads per block.
  static constexpr index_t reduce_block = 8192;
  static constexpr int reduce_threads = 256;

  /// The stream every call without an explicit stream uses.
  static cudaStream_t default_stream() { return cudaStreamPerThread; }

  /// Uninitialised device storage for n elements (nullptr for n <= 0), ordered on `stream`.
  template <class T>
  static T* allocate(index_t n, cudaStream_t stream = cudaStreamPerThread) {
    if (n <= 0) return nullptr;
    require<config_error>(
        static_cast<std::size_t>(n) <= std::numeric_limits<std::size_t>::max() / sizeof(T),
        "Cuda::allocate: ", n, " elements of ", sizeof(T), " bytes overflow size_t");
    void* p = nullptr;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    const cudaError_t e = cudaMallocAsync(&p, bytes, stream);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      fail<cuda_error>("Cuda::allocate: cudaMallocAsync of ", bytes, " bytes (", n,
                       " elements) failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
                       ")");
    }
    return static_cast<T*>(p);
  }

  /// Returns p to the pool, ordered on `stream`. Never throws: a destructor calls it, possibly
  /// after the runtime has shut down at program exit, when there is nothing left to free.
  template <class T>
  static void deallocate(T* p, cudaStream_t stream = cudaStreamPerThread) noexcept {
    if (p == nullptr) return;
    if (cudaFreeAsync(const_cast<std::remove_const_t<T>*>(p), stream) != cudaSuccess)
      (void)cudaGetLastError();
  }

  /// f(i) for i in [0, n) on `stream`, asynchronously. f is a FLOWDIFF_HOST_DEVICE functor or a
  /// FLOWDIFF_LAMBDA, copied to the device by value: it must capture device pointers and plain
  /// values only.
  template <class F>
  static void parallel_for(cudaStream_t stream, index_t n, F f) {
    if (n <= 0) return;
    const index_t want = (n + block_threads - 1) / block_threads;
    const auto blocks = static_cast<unsigned>(want < max_blocks ? want : max_blocks);
    cuda::kernels::for_each<<<blocks, block_threads, 0, stream>>>(n, f);
    FLOWDIFF_CUDA_CHECK_LAUNCH("flowdiff::cuda::kernels::for_each", stream);
  }

  /// The Backend form: on the per-thread default stream. `work_per_item` is a CPU hint (when to
  /// use threads); a GPU loop always runs on the device.
  template <class F>
  static void parallel_for(index_t n, F f, index_t work_per_item = 1) {
    (void)work_per_item;
    parallel_for(cudaStreamPerThread, n, f);
  }

  /// r's segmented reduction (backend/segment_reduce.hpp) over segments [0, segs) on `stream`,
  /// asynchronously: one block of reduce_threads threads per segment (the order of
  /// segment_reduce_reference<reduce_threads>). r is copied to the device by value.
  template <class R>
  static void segment_reduce(cudaStream_t stream, index_t segs, const R& r) {
    static_assert(R::passes * R::width <= segment_reduce_max_sums, "segment_reduce: too many sums");
    if (segs <= 0) return;
    const auto blocks = static_cast<unsigned>(segs < max_blocks ? segs : max_blocks);
    cuda::kernels::segment_reduce<reduce_threads><<<blocks, reduce_threads, 0, stream>>>(segs, r);
    FLOWDIFF_CUDA_CHECK_LAUNCH("flowdiff::cuda::kernels::segment_reduce", stream);
  }
  /// The Backend form, on the per-thread default stream (`work_per_item`: a CPU hint).
  template <class R>
  static void segment_reduce(index_t segs, const R& r, index_t work_per_item = 1) {
    (void)work_per_item;
    segment_reduce(cudaStreamPerThread, segs, r);
  }

  /// Device-to-device copy of n elements, ordered on `stream`.
  template <class T>
  static void copy(T* dst, const T* src, index_t n, cudaStream_t stream = cudaStreamPerThread) {
    if (n <= 0 || dst == src) return;
    FLOWDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T),
                                        cudaMemcpyDeviceToDevice, stream));
  }

  /// Waits for everything queued on `stream`, reporting any fault of a kernel run there.
  static void synchronize(cudaStream_t stream = cudaStreamPerThread) {
    FLOWDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  /// Deterministic reduction of g(i) for i in [0, n) with `op` (cuda::kernels::Plus, Max, Min or
  /// any associative device functor double(double, double)) in double, `identity` for n == 0.
  /// g is a device functor. Synchronises `stream` (the result is returned to the host).
  template <class G, class Op>
  static double reduce(index_t n, G g, Op op, double identity,
                       cudaStream_t stream = cudaStreamPerThread) {
    if (n <= 0) return identity;
    // Passes: n -> nb[0] partials -> nb[1] -> ... -> 1, each pass one launch of reduce_blocks.
    index_t total = 0;
    for (index_t m = n; m > 1;) {
      m = (m + reduce_block - 1) / reduce_block;
      total += m;
    }
    if (total == 0) total = 1;  // n == 1: one pass writing one partial
    require<config_error>(
        (n + reduce_block - 1) / reduce_block <= index_t{std::numeric_limits<int>::max()},
        "Cuda::reduce: ", n, " elements need too many blocks");
    double* buf = allocate<double>(total, stream);
    struct Free {
      double* p;
      cudaStream_t s;
      ~Free() { Cuda::deallocate(p, s); }
    } guard{buf, stream};

    index_t m = (n + reduce_block - 1) / reduce_block;
    double* out = buf;
    cuda::kernels::reduce_blocks<reduce_threads>
        <<<static_cast<unsigned>(m), reduce_threads, 0, stream>>>(n, reduce_block, g, op, identity,
                                                                  out);
    FLOWDIFF_CUDA_CHECK_LAUNCH("flowdiff::cuda::kernels::reduce_blocks", stream);
    while (m > 1) {
      const index_t next = (m + reduce_block - 1) / reduce_block;
      double* in = out;
      out = in + m;
      cuda::kernels::reduce_blocks<reduce_threads>
          <<<static_cast<unsigned>(next), reduce_threads, 0, stream>>>(
              m, reduce_block, cuda::kernels::Load<double>{in}, op, identity, out);
      FLOWDIFF_CUDA_CHECK_LAUNCH("flowdiff::cuda::kernels::reduce_blocks", stream);
      m = next;
    }
    double result = 0;
    FLOWDIFF_CUDA_CHECK(
        cudaMemcpyAsync(&result, out, sizeof(double), cudaMemcpyDeviceToHost, stream));
    FLOWDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
    return result;
  }

  /// Deterministic sum of g(i) for i in [0, n), accumulated in double; g is a device functor.
  /// Synchronises `stream` (the result is returned to the host).
  template <class G>
  static double reduce_sum(index_t n, G g, cudaStream_t stream = cudaStreamPerThread) {
    return reduce(n, g, cuda::kernels::Plus{}, 0.0, stream);
  }

  /// Deterministic sum of p[0..n) (accumulated in double, rounded to T once at the end).
  template <class T>
  static T sum(const T* p, index_t n, cudaStream_t stream = cudaStreamPerThread) {
    return static_cast<T>(reduce_sum(n, cuda::kernels::Load<T>{p}, stream));
  }
};

static_assert(Backend<Cuda>);

namespace cuda {

/// The number of CUDA devices this process can use; 0 when there is none or no usable driver
/// (the runtime's error is cleared, not thrown). `why`, if given, receives the reason for 0.
inline int device_count(std::string* why = nullptr) noexcept {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // "no device" / "insufficient driver" is not sticky: clear it
    if (why != nullptr) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why != nullptr) *why = "the CUDA runtime reports 0 devices";
  return n;
}

/// Whether a CUDA device is present and usable.
inline bool available() noexcept { return device_count() > 0; }

/// What the current (or a given) device is.
struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0, compute_minor = 0;
  int multiprocessors = 0;
  std::size_t global_memory = 0;  ///< bytes
};

inline DeviceInfo device_info(int device = -1) {
  if (device < 0) FLOWDIFF_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp p{};
  FLOWDIFF_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return {device, p.name, p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem};
}

/// Host -> device copy of src into dst (same element count); returns when the copy is complete,
/// so src may be reused at once.
template <class T>
void copy_to_device(View<T, Cuda> dst, std::type_identity_t<View<const T, Cpu>> src,
                    cudaStream_t stream = cudaStreamPerThread) {
  require<shape_error>(dst.numel() == src.numel(), "cuda::copy_to_device: destination has ",
                       dst.numel(), " elements, source has ", src.numel());
  if (src.numel() == 0) return;
  FLOWDIFF_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(),
                                      static_cast<std::size_t>(src.numel()) * sizeof(T),
                                      cudaMemcpyHostToDevice, stream));
  FLOWDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// Device -> host copy of src into dst (same element count); returns when dst holds the values,
/// after everything queued before on `stream` has run.
template <class T>
void copy_to_host(View<T, Cpu> dst, std::type_identity_t<View<const T, Cuda>> src,
                  cudaStream_t stream = cudaStreamPerThread) {
  require<shape_error>(dst.numel() == src.numel(), "cuda::copy_to_host: destination has ",
                       dst.numel(), " elements, source has ", src.numel());
  if (src.numel() == 0) return;
  FLOWDIFF_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(),
                                      static_cast<std::size_t>(src.numel()) * sizeof(T),
                                      cudaMemcpyDeviceToHost, stream));
  FLOWDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace cuda

/// A tensor or view on the CUDA backend / on the CPU backend.
template <class X>
concept CudaTensor = TensorLike<X> && std::is_same_v<backend_of<X>, Cuda>;
template <class X>
concept HostTensor = TensorLike<X> && std::is_same_v<backend_of<X>, Cpu>;

namespace cuda::kernels {
template <class T, class U>
struct Product {
  const T* a;
  const U* b;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    return static_cast<double>(a[i]) * static_cast<double>(b[i]);
  }
};
/// |p[i]| (NaN stays NaN).
template <class T>
struct Abs {
  const T* p;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double v = static_cast<double>(p[i]);
    return v < 0 ? -v : v;
  }
};
/// i where p[i] is not finite, else n (so the minimum is the first non-finite index, or n).
/// v - v is 0 exactly for finite v and NaN for inf and NaN.
template <class T>
struct NonFiniteIndex {
  const T* p;
  index_t n;
  FLOWDIFF_HOST_DEVICE double operator()(index_t i) const {
    const double v = static_cast<double>(p[i]);
    return static_cast<double>(v - v == 0 ? n : i);
  }
};
}  // namespace cuda::kernels

// The host-only helpers of core/ops.hpp for device tensors, under the same names, so generic code
// calling them compiles for Tensor<T, Cuda> too. Deterministic reductions; each synchronises.

/// Sum of a[i] * b[i], accumulated in double (as on the CPU).
template <CudaTensor A, CudaTensor Bt>
value_type_of<A> dot(const A& a, const Bt& b) {
  const auto va = view_of(a);
  const auto vb = view_of(b);
  require<shape_error>(va.numel() == vb.numel(), "dot: operands have ", va.numel(), " and ",
                       vb.numel(), " elements");
  using T = value_type_of<A>;
  using U = value_type_of<Bt>;
  return static_cast<T>(
      Cuda::reduce_sum(va.numel(), cuda::kernels::Product<T, U>{va.data(), vb.data()}));
}

/// Largest |x[i]| (0 for an empty tensor; NaN if any element is NaN).
template <CudaTensor X>
value_type_of<X> max_abs(const X& x) {
  const auto v = view_of(x);
  using T = value_type_of<X>;
  return static_cast<T>(
      Cuda::reduce(v.numel(), cuda::kernels::Abs<T>{v.data()}, cuda::kernels::Max{}, 0.0));
}

namespace cuda {
/// The index of the first element of x that is not finite, or x.numel() if all are.
template <class T>
index_t first_nonfinite(View<const T, Cuda> x) {
  const index_t n = x.numel();
  return static_cast<index_t>(Cuda::reduce(n, kernels::NonFiniteIndex<T>{x.data(), n},
                                           kernels::Min{}, static_cast<double>(n)));
}
}  // namespace cuda

template <CudaTensor X>
bool all_finite(const X& x) {
  const View<const value_type_of<X>, Cuda> v = view_of(x);
  return cuda::first_nonfinite(v) == v.numel();
}

/// Throws numeric_error naming the first non-finite element of x (as the CPU's check_finite).
template <CudaTensor X>
void check_finite(std::string_view what, const X& x) {
  using T = value_type_of<X>;
  const View<const T, Cuda> v = view_of(x);
  const index_t i = cuda::first_nonfinite(v);
  if (i == v.numel()) return;
  T value{};
  FLOWDIFF_CUDA_CHECK(cudaMemcpyAsync(&value, v.data() + i, sizeof(T), cudaMemcpyDeviceToHost,
                                      cudaStreamPerThread));
  FLOWDIFF_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
  fail<numeric_error>(what, ": element ", i, " of a tensor of shape ", v.shape(),
                      " is not finite (", value, ")");
}

/// A device copy of a host tensor or view (same shape): `auto xd = to_device(x);`
template <HostTensor X>
Tensor<value_type_of<X>, Cuda> to_device(const X& x, cudaStream_t stream = cudaStreamPerThread) {
  using T = value_type_of<X>;
  const View<const T, Cpu> v = view_of(x);
  Tensor<T, Cuda> d(v.shape());  // allocated on the per-thread default stream
  if (stream != cudaStreamPerThread) Cuda::synchronize(cudaStreamPerThread);
  cuda::copy_to_device(d.view(), v, stream);
  return d;
}

/// A host copy of a device tensor or view (same shape): `auto x = to_host(xd);`
template <CudaTensor X>
Tensor<value_type_of<X>, Cpu> to_host(const X& x, cudaStream_t stream = cudaStreamPerThread) {
  using T = value_type_of<X>;
  const View<const T, Cuda> v = view_of(x);
  Tensor<T, Cpu> h(v.shape());
  cuda::copy_to_host(h.view(), v, stream);
  return h;
}

}  // namespace flowdiff
