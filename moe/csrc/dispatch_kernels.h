// Launcher API of the CUDA token-dispatch kernels (dispatch_kernels.cu).
//
// Plain C++: no torch and no CUDA headers, so the kernels compile with a bare `nvcc -c` and the torch
// binding (dispatch_cuda.cpp) only needs this header. Pointers are device pointers; `stream` is a
// cudaStream_t; every launcher returns a cudaError_t as int (0 = success), see error_string().
// Strides are in elements; rows of x / y / g are contiguous blocks of d elements.
#pragma once

#include <cstdint>

namespace moe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

const char* error_string(int err);

// ---- routing index: a stable counting sort of the n = T * k (token, slot) pairs by expert.
// Pairs are cut into `num_chunks` chunks of `chunk` consecutive pairs (see routing_chunking).
struct RoutingChunking {
  int64_t num_chunks;
  int64_t chunk;
};
RoutingChunking routing_chunking(int64_t n);
constexpr int64_t kMaxExperts = 8192;  // per-chunk histograms live in shared memory

// Phase 1. hist: int32 [E * num_chunks] workspace (becomes per-(expert, chunk) base ranks);
// counts / kept (= tokens_per_expert) / offsets (exclusive scan of kept) / bucket_start (exclusive
// scan of counts): int64 [E]; info: int64 [3] zero-initialised -> {num_rows, any expert over
// capacity, any expert index outside [0, E)}. capacity < 0 means none.
int routing_count(const int64_t* experts, int64_t n, int64_t E, int64_t capacity, RoutingChunking ch,
                  int32_t* hist, int64_t* counts, int64_t* kept, int64_t* offsets, int64_t* bucket_start,
                  int64_t* info, void* stream);

// Without a host sync (nothing can be dropped, so num_rows = n is known): a device-side assert when
// routing_count found an expert index outside [0, E) (info[2]). Phase 2 skips such pairs (dest -1), so
// nothing reads or writes out of bounds before the assert fires.
int routing_check(const int64_t* info, int64_t E, void* stream);

// Phase 2, by position (no priority, or no expert over capacity): dest [n] and src [num_rows].
int routing_assign(const int64_t* experts, int64_t n, int64_t k, int64_t E, RoutingChunking ch,
                   const int32_t* hist, const int64_t* kept, const int64_t* offsets, int64_t* dest,
                   int64_t* src, void* stream);

// Phase 2, by priority (float32 [n]): buckets the pairs by expert (order: int64 [n] workspace), then
// per expert selects the `capacity` pairs of highest priority (radix select on the float keys; ties
// -> earliest token; thresh: uint32 [E], take_eq: int64 [E] workspaces) and lays them out in token
// order.
int routing_assign_priority(const int64_t* experts, const float* priority, int64_t n, int64_t k, int64_t E,
                            int64_t capacity, RoutingChunking ch, const int32_t* hist, const int64_t* counts,
                            const int64_t* offsets, const int64_t* bucket_start, int64_t* order,
                            uint32_t* thresh, int64_t* take_eq, int64_t* dest, int64_t* src, void* stream);

// ---- permute: out[dest[t * k + j]] = x[t] (row_bytes bytes per row) for every kept slot.
int permute(const void* x, int64_t x_stride_bytes, const int64_t* dest, int64_t T, int64_t k, int64_t row_bytes,
            void* out, void* stream);

// ---- gather-sum: out[t] = sum_j w[t, j] * y[dest[t, j]] over kept slots, in fp32 (fp64 for double),
// j = 0..k-1; w (same dtype as y) may be null (plain sum); out is contiguous [T, d].
int gather_sum(DType dtype, const void* y, int64_t y_stride, const int64_t* dest, const void* w, int64_t T,
               int64_t k, int64_t d, void* out, void* stream);

// ---- unpermute backward: grad_y[dest[t, j]] = w[t, j] * g[t] (contiguous [R, d]);
// grad_w[t, j] = <g[t], y[dest[t, j]]> (0 when dropped), float [T, k] (double for kFloat64).
int unpermute_backward(DType dtype, const void* g, int64_t g_stride, const void* y, int64_t y_stride,
                       const int64_t* dest, const void* w, int64_t T, int64_t k, int64_t d, void* grad_y,
                       void* grad_w, void* stream);

}  // namespace cuda
}  // namespace moe
