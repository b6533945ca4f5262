// CUDA kernels of the token-dispatch ops, with the thin launcher API of dispatch_kernels.h.
//
// Includes only CUDA headers (no torch), so `nvcc -arch=sm_90 -c dispatch_kernels.cu` builds it
// anywhere; tests/unit/ops/test_extension.py does exactly that. The torch binding is dispatch_cuda.cpp.
//
// - routing index: stable counting sort. hist_kernel (per-chunk histograms in shared memory) ->
//   scan_chunks_kernel (per-expert exclusive scan over chunks: base rank of each chunk) ->
//   offsets_kernel (kept counts, expert offsets) -> assign_kernel (one warp per chunk walks its pairs
//   in order; __match_any_sync groups equal experts so ranks stay stable). With a priority and an
//   expert over capacity: assign_kernel<bucket> fills per-expert buckets in token order,
//   select_kernel radix-selects each overflowing expert's capacity-th key (4 passes of 8 bits) and
//   emit_kernel keeps key > threshold plus the earliest ties, laying rows out in token order.
// - permute / gather-sum / unpermute-backward: one block per token (grid-stride), 16-byte vector
//   loads and stores (coalesced along the row) when rows and pointers allow, fp32 accumulation
//   (fp64 for double), slots summed in order j = 0..k-1 and block reductions in a fixed tree:
//   deterministic, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "dispatch_kernels.h"

namespace moe {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kScanBlock = 256;

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
inline int last_error() { return static_cast<int>(cudaGetLastError()); }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Same key as moe::priority_key (dispatch.h): larger priority -> larger key, NaN largest, -0 == +0.
__device__ __forceinline__ uint32_t priority_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) return 0xffffffffu;  // NaN
  if ((u << 1) == 0u) u = 0u;                                                             // -0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive scan of one int64 per thread over a block of BLOCK threads (BLOCK <= 1024, multiple of
// 32); *total gets the block sum. Every thread of the block must call it.
template <int BLOCK>
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* smem /*[32]*/, int64_t* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  int64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) smem[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int64_t s = lane < BLOCK / 32 ? smem[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(kFull, s, o);
      if (lane >= o) s += y;
    }
    smem[lane] = s;
  }
  __syncthreads();
  const int64_t before = wid > 0 ? smem[wid - 1] : 0;
  *total = smem[BLOCK / 32 - 1];
  __syncthreads();
  return before + x - v;
}

// Lanes of the warp holding the same key.
__device__ __forceinline__ unsigned match_peers(long long key) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  return __match_any_sync(kFull, static_cast<unsigned long long>(key));
#else
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l)
    if (__shfl_sync(kFull, key, l) == key) peers |= 1u << l;
  return peers;
#endif
}

// ------------------------------------------------------------------------------- routing index

__global__ void hist_kernel(const int64_t* __restrict__ experts, int64_t n, int64_t E, int64_t chunk,
                            int64_t num_chunks, int32_t* __restrict__ hist, int64_t* info) {
  extern __shared__ int32_t sh[];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) sh[e] = 0;
  __syncthreads();
  const int64_t c = blockIdx.x, begin = c * chunk, end = min64(n, begin + chunk);
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t e = experts[i];
    if (e < 0 || e >= E) {
      bad = true;
      continue;
    }
    atomicAdd(&sh[e], 1);
  }
  if (bad) info[2] = 1;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e * num_chunks + c] = sh[e];
}

// Per expert (block): hist[e, :] -> exclusive scan over chunks (base rank of each chunk); counts[e].
__global__ void scan_chunks_kernel(int32_t* __restrict__ hist, int64_t num_chunks, int64_t* __restrict__ counts) {
  __shared__ int64_t smem[32];
  int32_t* h = hist + static_cast<int64_t>(blockIdx.x) * num_chunks;
  int64_t carry = 0;
  for (int64_t base = 0; base < num_chunks; base += kScanBlock) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < num_chunks ? h[i] : 0;
    int64_t total;
    const int64_t ex = block_exclusive_scan<kScanBlock>(v, smem, &total);
    if (i < num_chunks) h[i] = static_cast<int32_t>(carry + ex);
    carry += total;
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = carry;
}

constexpr int kOffsetsBlock = 1024;

__global__ void offsets_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t capacity,
                               int64_t* __restrict__ kept, int64_t* __restrict__ offsets,
                               int64_t* __restrict__ bucket_start, int64_t* info) {
  __shared__ int64_t smem[32];
  int64_t carry_k = 0, carry_c = 0;
  int over = 0;
  for (int64_t base = 0; base < E; base += kOffsetsBlock) {
    const int64_t e = base + threadIdx.x;
    const int64_t c = e < E ? counts[e] : 0;
    const bool o = capacity >= 0 && c > capacity;
    const int64_t kp = o ? capacity : c;
    over |= o;
    int64_t tk, tc;
    const int64_t exk = block_exclusive_scan<kOffsetsBlock>(kp, smem, &tk);
    const int64_t exc = block_exclusive_scan<kOffsetsBlock>(c, smem, &tc);
    if (e < E) {
      kept[e] = kp;
      offsets[e] = carry_k + exk;
      bucket_start[e] = carry_c + exc;
    }
    carry_k += tk;
    carry_c += tc;
  }
  over = __syncthreads_or(over);
  if (threadIdx.x == 0) {
    info[0] = carry_k;
    info[1] = over ? 1 : 0;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace moe

// glibc's <assert.h> declares this only without NDEBUG; nvcc maps device calls to its device assert
// (what torch's CUDA_KERNEL_ASSERT calls too).
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept __attribute__((__noreturn__));

namespace moe {
namespace cuda {
namespace {

// The asynchronous report of an expert index outside [0, E), for the sync-free dropless path: a
// device-side assert, as torch's own indexing kernels raise (the host sees "device-side assert
// triggered" at its next sync; the message names the op). __assert_fail, not assert(): extensions
// build with NDEBUG.
__global__ void check_experts_kernel(const int64_t* __restrict__ info, int64_t E) {
  if (info[2] != 0) {
    printf("moe routing_index: an expert index is outside [0, %lld)\n", static_cast<long long>(E));
    __assert_fail("moe routing_index: expert index outside [0, num_experts)", __FILE__, __LINE__, __func__);
  }
}

// One warp per chunk walks its pairs in order, so ranks within an expert follow the flat order.
// kBucket: order[bucket_start[e] + rank] = pair. Else: rank < kept[e] -> row offsets[e] + rank.
template <bool kBucket>
__global__ void assign_kernel(const int64_t* __restrict__ experts, int64_t n, int64_t k, int64_t E, int64_t chunk,
                              int64_t num_chunks, const int32_t* __restrict__ hist, const int64_t* __restrict__ kept,
                              const int64_t* __restrict__ offsets, int64_t* __restrict__ dest,
                              int64_t* __restrict__ out) {
  extern __shared__ int32_t run[];
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x;
  for (int64_t e = lane; e < E; e += 32) run[e] = hist[e * num_chunks + c];
  __syncwarp();
  const int64_t begin = c * chunk, end = min64(n, begin + chunk);
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t p = base + lane;
    const bool in_chunk = p < end;
    const int64_t ep = in_chunk ? experts[p] : -1;
    // An index outside [0, E) (counted by hist_kernel, reported by the caller) takes no rank and no
    // row, so nothing here reads or writes out of bounds before that report.
    const bool active = in_chunk && ep >= 0 && ep < E;
    const long long e = active ? ep : -1 - lane;  // inactive lanes match nobody
    const unsigned peers = match_peers(e);
    int64_t r = 0;
    if (active) r = run[e] + __popc(peers & lower);
    __syncwarp();
    if (active && lane == __ffs(peers) - 1) run[e] += __popc(peers);
    __syncwarp();
    if (!active) {
      if (in_chunk && !kBucket) dest[p] = -1;
      continue;
    }
    if (kBucket) {
      out[offsets[e] + r] = p;
    } else if (r < kept[e]) {
      const int64_t row = offsets[e] + r;
      dest[p] = row;
      out[row] = p / k;
    } else {
      dest[p] = -1;
    }
  }
}

// Per overflowing expert: the capacity-th largest key (thresh) and how many pairs with exactly that
// key to keep (take_eq, earliest first). Experts within capacity keep everything.
__global__ void select_kernel(const float* __restrict__ priority, const int64_t* __restrict__ order,
                              const int64_t* __restrict__ counts, const int64_t* __restrict__ bucket_start,
                              int64_t capacity, uint32_t* __restrict__ thresh, int64_t* __restrict__ take_eq) {
  __shared__ int32_t hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_need;
  const int64_t e = blockIdx.x, cnt = counts[e];
  const int64_t* b = order + bucket_start[e];
  if (cnt <= capacity || capacity == 0) {
    if (threadIdx.x == 0) {
      thresh[e] = cnt <= capacity ? 0u : 0xffffffffu;  // keep all : keep none
      take_eq[e] = cnt <= capacity ? cnt : 0;
    }
    return;
  }
  uint32_t prefix = 0, mask = 0;
  int64_t need = capacity;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
      const uint32_t key = priority_key(priority[b[i]]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int bin = 0;
      for (int bb = 255; bb >= 0; --bb) {
        if (above + hist[bb] >= need) {
          bin = bb;
          break;
        }
        above += hist[bb];
      }
      s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s_need = need - above;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 255u << shift;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    thresh[e] = prefix;
    take_eq[e] = need;
  }
}

// Per expert: keep key > thresh, plus the first take_eq pairs with key == thresh (bucket = token
// order); kept pairs get consecutive rows from offsets[e].
__global__ void emit_kernel(const float* __restrict__ priority, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ counts, const int64_t* __restrict__ bucket_start,
                            const int64_t* __restrict__ offsets, const uint32_t* __restrict__ thresh,
                            const int64_t* __restrict__ take_eq, int64_t k, int64_t* __restrict__ dest,
                            int64_t* __restrict__ src) {
  __shared__ int64_t smem[32];
  const int64_t e = blockIdx.x, cnt = counts[e], take = take_eq[e], row0 = offsets[e];
  const uint32_t thr = thresh[e];
  const int64_t* b = order + bucket_start[e];
  int64_t eq_before = 0, kept_before = 0;
  for (int64_t base = 0; base < cnt; base += kScanBlock) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < cnt;
    const int64_t p = active ? b[i] : 0;
    const uint32_t key = active ? priority_key(priority[p]) : 0u;
    const bool eq = active && key == thr;
    int64_t n_eq, n_kept;
    const int64_t eq_rank = eq_before + block_exclusive_scan<kScanBlock>(eq ? 1 : 0, smem, &n_eq);
    const bool keep = active && (key > thr || (eq && eq_rank < take));
    const int64_t rank = kept_before + block_exclusive_scan<kScanBlock>(keep ? 1 : 0, smem, &n_kept);
    if (active) {
      if (keep) {
        dest[p] = row0 + rank;
        src[row0 + rank] = p / k;
      } else {
        dest[p] = -1;
      }
    }
    eq_before += n_eq;
    kept_before += n_kept;
  }
}

// ------------------------------------------------------------------------------ row kernels

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved as one (16-byte when sizeof(T) * N == 16) load / store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Deterministic block sum (fixed shuffle tree, then warp sums in order). All threads must call.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem /*[32]*/) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  A s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < nw; ++w) s += smem[w];
  __syncthreads();
  return s;  // valid in thread 0
}

// out[dest[t, j]] = x[t]: the token row is loaded once and stored to each kept row.
template <typename V>
__global__ void permute_kernel(const char* __restrict__ x, int64_t x_stride, const int64_t* __restrict__ dest,
                               int64_t T, int64_t k, int64_t nvec, char* __restrict__ out) {
  extern __shared__ int64_t sdest[];
  const int64_t row_bytes = nvec * static_cast<int64_t>(sizeof(V));
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) sdest[j] = dest[t * k + j];
    __syncthreads();
    const V* xr = reinterpret_cast<const V*>(x + t * x_stride);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const V val = xr[v];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = sdest[j];
        if (r >= 0) reinterpret_cast<V*>(out + r * row_bytes)[v] = val;
      }
    }
  }
}

template <typename T, int N>
__global__ void gather_sum_kernel(const T* __restrict__ y, int64_t y_stride, const int64_t* __restrict__ dest,
                                  const T* __restrict__ w, int64_t Tn, int64_t k, int64_t d, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  extern __shared__ int64_t smem64[];
  int64_t* sdest = smem64;
  A* sw = reinterpret_cast<A*>(smem64 + k);
  const int64_t nvec = d / N;
  for (int64_t t = blockIdx.x; t < Tn; t += gridDim.x) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      sdest[j] = dest[t * k + j];
      sw[j] = w != nullptr ? to_acc(w[t * k + j]) : A(1);
    }
    __syncthreads();
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      A acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = A(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = sdest[j];
        if (r < 0) continue;
        const Vec<T, N> yv = load_vec<T, N>(y + r * y_stride + v * N);
        const A wj = sw[j];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += wj * to_acc(yv.v[i]);
      }
      Vec<T, N> o;
#pragma unroll
      for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(acc[i]);
      store_vec<T, N>(out + t * d + v * N, o);
    }
  }
}

template <typename T, int N>
__global__ void unpermute_bwd_kernel(const T* __restrict__ g, int64_t g_stride, const T* __restrict__ y,
                                     int64_t y_stride, const int64_t* __restrict__ dest, const T* __restrict__ w,
                                     int64_t Tn, int64_t k, int64_t d, T* __restrict__ gy,
                                     typename Acc<T>::type* __restrict__ gw) {
  using A = typename Acc<T>::type;
  extern __shared__ int64_t smem64[];
  int64_t* sdest = smem64;
  A* sw = reinterpret_cast<A*>(smem64 + k);
  A* red = sw + k;  // [32]
  const int64_t nvec = d / N;
  for (int64_t t = blockIdx.x; t < Tn; t += gridDim.x) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      sdest[j] = dest[t * k + j];
      sw[j] = to_acc(w[t * k + j]);
    }
    __syncthreads();
    const T* gt = g + t * g_stride;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = sdest[j];  // uniform over the block
      if (r < 0) {
        if (threadIdx.x == 0) gw[t * k + j] = A(0);
        continue;
      }
      const A wj = sw[j];
      const T* yr = y + r * y_stride;
      T* gyr = gy + r * d;
      A part = A(0);
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Vec<T, N> gv = load_vec<T, N>(gt + v * N);
        const Vec<T, N> yv = load_vec<T, N>(yr + v * N);
        Vec<T, N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const A ga = to_acc(gv.v[i]);
          o.v[i] = from_acc<T>(wj * ga);
          part += ga * to_acc(yv.v[i]);
        }
        store_vec<T, N>(gyr + v * N, o);
      }
      const A s = block_sum(part, red);
      if (threadIdx.x == 0) gw[t * k + j] = s;
    }
  }
}

// ------------------------------------------------------------------------------ launch helpers

inline bool aligned(const void* p, int64_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

inline int threads_for(int64_t nvec) {
  int64_t t = ((nvec + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

inline unsigned grid_for(int64_t T) { return static_cast<unsigned>(T < (1 << 20) ? (T > 0 ? T : 1) : (1 << 20)); }

template <typename T, int N>
int launch_gather_sum(const void* y, int64_t y_stride, const int64_t* dest, const void* w, int64_t T_, int64_t k,
                      int64_t d, void* out, cudaStream_t s) {
  using A = typename Acc<T>::type;
  const size_t smem = static_cast<size_t>(k) * (sizeof(int64_t) + sizeof(A));
  gather_sum_kernel<T, N><<<grid_for(T_), threads_for(d / N), smem, s>>>(
      static_cast<const T*>(y), y_stride, dest, static_cast<const T*>(w), T_, k, d, static_cast<T*>(out));
  return last_error();
}

template <typename T, int N>
int launch_unpermute_bwd(const void* g, int64_t g_stride, const void* y, int64_t y_stride, const int64_t* dest,
                         const void* w, int64_t T_, int64_t k, int64_t d, void* gy, void* gw, cudaStream_t s) {
  using A = typename Acc<T>::type;
  const size_t smem = static_cast<size_t>(k) * (sizeof(int64_t) + sizeof(A)) + 32 * sizeof(A);
  unpermute_bwd_kernel<T, N><<<grid_for(T_), threads_for(d / N), smem, s>>>(
      static_cast<const T*>(g), g_stride, static_cast<const T*>(y), y_stride, dest, static_cast<const T*>(w), T_, k,
      d, static_cast<T*>(gy), static_cast<A*>(gw));
  return last_error();
}

// 16-byte vectors when the row length, strides and base pointers allow it; else one element.
template <typename T>
bool can_vectorize(int64_t d, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int64_t N = 16 / sizeof(T);
  if (d % N != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned(p, 16)) return false;
  for (int64_t s : strides)
    if (s % N != 0) return false;
  return true;
}

template <typename T>
int gather_sum_typed(const void* y, int64_t y_stride, const int64_t* dest, const void* w, int64_t T_, int64_t k,
                     int64_t d, void* out, cudaStream_t s) {
  if (can_vectorize<T>(d, {y, out}, {y_stride}))
    return launch_gather_sum<T, 16 / sizeof(T)>(y, y_stride, dest, w, T_, k, d, out, s);
  return launch_gather_sum<T, 1>(y, y_stride, dest, w, T_, k, d, out, s);
}

template <typename T>
int unpermute_bwd_typed(const void* g, int64_t g_stride, const void* y, int64_t y_stride, const int64_t* dest,
                        const void* w, int64_t T_, int64_t k, int64_t d, void* gy, void* gw, cudaStream_t s) {
  if (can_vectorize<T>(d, {g, y, gy}, {g_stride, y_stride}))
    return launch_unpermute_bwd<T, 16 / sizeof(T)>(g, g_stride, y, y_stride, dest, w, T_, k, d, gy, gw, s);
  return launch_unpermute_bwd<T, 1>(g, g_stride, y, y_stride, dest, w, T_, k, d, gy, gw, s);
}

}  // namespace

// ------------------------------------------------------------------------------------ launchers

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

RoutingChunking routing_chunking(int64_t n) {
  int64_t chunk = (n + 2047) / 2048;
  chunk = ((chunk + 31) / 32) * 32;
  if (chunk < 1024) chunk = 1024;
  const int64_t num = n > 0 ? (n + chunk - 1) / chunk : 1;
  return {num, chunk};
}

int routing_count(const int64_t* experts, int64_t n, int64_t E, int64_t capacity, RoutingChunking ch, int32_t* hist,
                  int64_t* counts, int64_t* kept, int64_t* offsets, int64_t* bucket_start, int64_t* info,
                  void* stream) {
  if (E < 1 || E > kMaxExperts) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = as_stream(stream);
  const size_t smem = static_cast<size_t>(E) * sizeof(int32_t);
  hist_kernel<<<static_cast<unsigned>(ch.num_chunks), 256, smem, s>>>(experts, n, E, ch.chunk, ch.num_chunks, hist,
                                                                      info);
  if (int err = last_error()) return err;
  scan_chunks_kernel<<<static_cast<unsigned>(E), kScanBlock, 0, s>>>(hist, ch.num_chunks, counts);
  if (int err = last_error()) return err;
  offsets_kernel<<<1, kOffsetsBlock, 0, s>>>(counts, E, capacity, kept, offsets, bucket_start, info);
  return last_error();
}

int routing_check(const int64_t* info, int64_t E, void* stream) {
  check_experts_kernel<<<1, 1, 0, as_stream(stream)>>>(info, E);
  return last_error();
}

int routing_assign(const int64_t* experts, int64_t n, int64_t k, int64_t E, RoutingChunking ch, const int32_t* hist,
                   const int64_t* kept, const int64_t* offsets, int64_t* dest, int64_t* src, void* stream) {
  if (n == 0) return 0;
  const size_t smem = static_cast<size_t>(E) * sizeof(int32_t);
  assign_kernel<false><<<static_cast<unsigned>(ch.num_chunks), 32, smem, as_stream(stream)>>>(
      experts, n, k, E, ch.chunk, ch.num_chunks, hist, kept, offsets, dest, src);
  return last_error();
}

int routing_assign_priority(const int64_t* experts, const float* priority, int64_t n, int64_t k, int64_t E,
                            int64_t capacity, RoutingChunking ch, const int32_t* hist, const int64_t* counts,
                            const int64_t* offsets, const int64_t* bucket_start, int64_t* order, uint32_t* thresh,
                            int64_t* take_eq, int64_t* dest, int64_t* src, void* stream) {
  if (n == 0) return 0;
  cudaStream_t s = as_stream(stream);
  const size_t smem = static_cast<size_t>(E) * sizeof(int32_t);
  assign_kernel<true><<<static_cast<unsigned>(ch.num_chunks), 32, smem, s>>>(
      experts, n, k, E, ch.chunk, ch.num_chunks, hist, nullptr, bucket_start, nullptr, order);
  if (int err = last_error()) return err;
  select_kernel<<<static_cast<unsigned>(E), 256, 0, s>>>(priority, order, counts, bucket_start, capacity, thresh,
                                                         take_eq);
  if (int err = last_error()) return err;
  emit_kernel<<<static_cast<unsigned>(E), kScanBlock, 0, s>>>(priority, order, counts, bucket_start, offsets, thresh,
                                                              take_eq, k, dest, src);
  return last_error();
}

int permute(const void* x, int64_t x_stride_bytes, const int64_t* dest, int64_t T_, int64_t k, int64_t row_bytes,
            void* out, void* stream) {
  if (T_ == 0 || row_bytes == 0) return 0;
  cudaStream_t s = as_stream(stream);
  const size_t smem = static_cast<size_t>(k) * sizeof(int64_t);
  const char* xp = static_cast<const char*>(x);
  char* op = static_cast<char*>(out);
  if (row_bytes % 16 == 0 && x_stride_bytes % 16 == 0 && aligned(x, 16) && aligned(out, 16)) {
    const int64_t nvec = row_bytes / 16;
    permute_kernel<uint4><<<grid_for(T_), threads_for(nvec), smem, s>>>(xp, x_stride_bytes, dest, T_, k, nvec, op);
  } else if (row_bytes % 4 == 0 && x_stride_bytes % 4 == 0 && aligned(x, 4) && aligned(out, 4)) {
    const int64_t nvec = row_bytes / 4;
    permute_kernel<uint32_t><<<grid_for(T_), threads_for(nvec), smem, s>>>(xp, x_stride_bytes, dest, T_, k, nvec,
                                                                          op);
  } else {
    permute_kernel<uint8_t><<<grid_for(T_), threads_for(row_bytes), smem, s>>>(xp, x_stride_bytes, dest, T_, k,
                                                                              row_bytes, op);
  }
  return last_error();
}

int gather_sum(DType dtype, const void* y, int64_t y_stride, const int64_t* dest, const void* w, int64_t T_,
               int64_t k, int64_t d, void* out, void* stream) {
  if (T_ == 0 || d == 0) return 0;
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case DType::kFloat32: return gather_sum_typed<float>(y, y_stride, dest, w, T_, k, d, out, s);
    case DType::kFloat64: return gather_sum_typed<double>(y, y_stride, dest, w, T_, k, d, out, s);
    case DType::kFloat16: return gather_sum_typed<__half>(y, y_stride, dest, w, T_, k, d, out, s);
    case DType::kBFloat16: return gather_sum_typed<__nv_bfloat16>(y, y_stride, dest, w, T_, k, d, out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int unpermute_backward(DType dtype, const void* g, int64_t g_stride, const void* y, int64_t y_stride,
                       const int64_t* dest, const void* w, int64_t T_, int64_t k, int64_t d, void* grad_y,
                       void* grad_w, void* stream) {
  if (T_ == 0) return 0;
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case DType::kFloat32:
      return unpermute_bwd_typed<float>(g, g_stride, y, y_stride, dest, w, T_, k, d, grad_y, grad_w, s);
    case DType::kFloat64:
      return unpermute_bwd_typed<double>(g, g_stride, y, y_stride, dest, w, T_, k, d, grad_y, grad_w, s);
    case DType::kFloat16:
      return unpermute_bwd_typed<__half>(g, g_stride, y, y_stride, dest, w, T_, k, d, grad_y, grad_w, s);
    case DType::kBFloat16:
      return unpermute_bwd_typed<__nv_bfloat16>(g, g_stride, y, y_stride, dest, w, T_, k, d, grad_y, grad_w, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace moe
