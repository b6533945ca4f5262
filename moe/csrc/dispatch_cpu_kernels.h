// CPU row kernels of the token-dispatch ops, compiled once per instruction set:
//   dispatch_cpu.cpp       -> namespace moe::base  (the compiler's baseline, e.g. x86-64 SSE2)
//   dispatch_cpu_avx2.cpp  -> namespace moe::avx2  (#pragma GCC target("avx2,f16c"))
// and picked at run time (moe::row_kernels()). Include after the torch headers, with MOE_CPU_ISA
// naming the namespace (and MOE_CPU_F16C defined when F16C intrinsics may be used).
//
// No FMA is enabled and sums run in a fixed order, so both builds give bitwise identical results.
//
// The gather kernels read rows at random places of y. One row at a time, a core gets about a third
// of its sequential read bandwidth (each 4-8 KiB row is a fresh, short stream for the hardware
// prefetchers). So they walk a *group* of tokens holding >= kMinStreams kept rows and interleave
// those rows in kBlockBytes pieces: many concurrent streams keep enough misses in flight (measured
// here, random 8 KiB rows on 2 cores: 8 rows x 256 B pieces ~2x row-at-a-time).
#ifndef MOE_CPU_ISA
#error "define MOE_CPU_ISA before including dispatch_cpu_kernels.h"
#endif

namespace moe {
namespace MOE_CPU_ISA {

#ifndef MOE_CPU_BLOCK_BYTES  // tuning knobs (compile-time)
#define MOE_CPU_BLOCK_BYTES 256
#endif
#ifndef MOE_CPU_MIN_STREAMS
#define MOE_CPU_MIN_STREAMS 8
#endif
#ifndef MOE_CPU_PREFETCH
#define MOE_CPU_PREFETCH 1
#endif
#ifndef MOE_CPU_STREAM_MIN_BYTES
#define MOE_CPU_STREAM_MIN_BYTES (int64_t(16) << 20)
#endif
constexpr int64_t kBlockBytes = MOE_CPU_BLOCK_BYTES;
constexpr int64_t kMinStreams = MOE_CPU_MIN_STREAMS;
constexpr int64_t kMaxGroupTokens = 16;
constexpr int kLanes = 16;  // partial sums of a dot product (fixed order -> deterministic)

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// ---- conversions of a block of m elements to / from the accumulation type

inline void to_acc(const c10::BFloat16* __restrict__ s, float* __restrict__ d, int64_t m) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t bits = static_cast<uint32_t>(u[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    d[i] = f;
  }
}

inline void from_acc(const float* __restrict__ s, c10::BFloat16* __restrict__ d, int64_t m) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < m; ++i) {  // round to nearest even, NaN -> 0x7fc0 (as c10::BFloat16)
    uint32_t bits;
    std::memcpy(&bits, &s[i], sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    u[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

inline void to_acc(const c10::Half* __restrict__ s, float* __restrict__ d, int64_t m) {
  int64_t i = 0;
#ifdef MOE_CPU_F16C
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < m; ++i) d[i] = static_cast<float>(s[i]);
}

inline void from_acc(const float* __restrict__ s, c10::Half* __restrict__ d, int64_t m) {
  int64_t i = 0;
#ifdef MOE_CPU_F16C
  for (; i + 8 <= m; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < m; ++i) d[i] = static_cast<c10::Half>(s[i]);
}

// ---- row copies

// Rows of several KiB: non-temporal (streaming) stores avoid reading the destination line before
// writing it, which is most of the win for a memory-bound scatter; only worth it for outputs too big
// to stay in cache for the next op anyway (see use_streaming).
inline void copy_row(char* __restrict__ dst, const char* __restrict__ src, int64_t bytes, bool stream) {
#ifdef MOE_HAVE_SSE2
  if (stream && ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0) {
    int64_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i e = _mm_load_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), e);
    }
    for (; i < bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_load_si128(reinterpret_cast<const __m128i*>(src + i)));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

inline void stream_fence(bool stream) {
#ifdef MOE_HAVE_SSE2
  if (stream) _mm_sfence();
#endif
  (void)stream;
}

inline bool use_streaming(int64_t out_bytes) { return out_bytes >= MOE_CPU_STREAM_MIN_BYTES; }

inline int64_t group_tokens(int64_t k) {
  return std::min<int64_t>(kMaxGroupTokens, std::max<int64_t>(1, (kMinStreams + k - 1) / std::max<int64_t>(k, 1)));
}

// Kept rows of tokens [t0, t1): row pointers, weights, flat slot t * k + j, row index, per-token ranges.
template <typename scalar_t, typename acc_t>
struct Group {
  std::vector<const scalar_t*> rows;
  std::vector<acc_t> w;
  std::vector<int64_t> slot;
  std::vector<int64_t> row;
  std::vector<int64_t> begin;  // token t0 + i has rows [begin[i], begin[i + 1])

  void collect(const scalar_t* y, int64_t y_stride, const int64_t* dest, const scalar_t* wp, int64_t k, int64_t t0,
               int64_t t1) {
    rows.clear();
    w.clear();
    slot.clear();
    row.clear();
    begin.clear();
    for (int64_t t = t0; t < t1; ++t) {
      begin.push_back(static_cast<int64_t>(rows.size()));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = dest[t * k + j];
        if (r < 0) continue;
        rows.push_back(y + r * y_stride);
        w.push_back(wp != nullptr ? static_cast<acc_t>(wp[t * k + j]) : acc_t(1));
        slot.push_back(t * k + j);
        row.push_back(r);
      }
    }
    begin.push_back(static_cast<int64_t>(rows.size()));
  }
};

// Software prefetch (into L2) of block [c, c + m) of every row of the next group, issued while the
// current group works on the same block: the random rows are then in flight one group ahead.
template <typename scalar_t, typename acc_t>
inline void prefetch_block(const Group<scalar_t, acc_t>& next, int64_t c, int64_t m) {
#if defined(MOE_HAVE_SSE2) && MOE_CPU_PREFETCH
  for (const scalar_t* r : next.rows) {
    const char* p = reinterpret_cast<const char*>(r + c);
    for (int64_t off = 0; off < m * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
      _mm_prefetch(p + off, _MM_HINT_T1);
  }
#else
  (void)next, (void)c, (void)m;
#endif
}

// ---- permute: out[dest[t, j]] = x[t], whole-row copies. An output small enough to stay in cache for the
// experts (below MOE_CPU_STREAM_MIN_BYTES) is walked in its own order: written front to back, with
// only x, T rows, read at random places; at T=2048, k=8, rows of 512 B, one thread: 0.73 -> 0.58 ms
// (0.92 -> 0.71 with caches flushed before each call). A larger one is walked in token order with
// streaming stores, each token row read once: in out's order it measured slower (rows of 2 KiB: 1.5
// -> 2.3 ms). Rows no (token, slot) writes are zero.
inline void permute_rows(const char* x, int64_t x_stride_bytes, const int64_t* dest, int64_t T, int64_t k, int64_t R,
                         int64_t row_bytes, char* out) {
  const bool stream = use_streaming(R * row_bytes);
  std::vector<int64_t> src(static_cast<size_t>(R), -1);  // src[r]: the token row r copies
  for (int64_t i = 0; i < T * k; ++i)
    if (dest[i] >= 0) src[dest[i]] = i / std::max<int64_t>(k, 1);
  if (!stream) {
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes));
    at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (src[r] < 0) std::memset(out + r * row_bytes, 0, static_cast<size_t>(row_bytes));
        else std::memcpy(out + r * row_bytes, x + src[r] * x_stride_bytes, static_cast<size_t>(row_bytes));
      }
    });
    return;
  }
  for (int64_t r = 0; r < R; ++r)
    if (src[r] < 0) std::memset(out + r * row_bytes, 0, static_cast<size_t>(row_bytes));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes * std::max<int64_t>(k, 1)));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const char* s = x + t * x_stride_bytes;
      const int64_t* d = dest + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = d[j];
        if (r >= 0) copy_row(out + r * row_bytes, s, row_bytes, stream);
      }
    }
    stream_fence(stream);
  });
}

// ---- gather-sum: out[t] = sum over kept j of w[t, j] * y[dest[t, j]] (w == nullptr -> 1), in acc_t,
// in the order j = 0..k-1, written once.
template <typename scalar_t>
void gather_sum_t(const scalar_t* y, int64_t y_stride, const int64_t* dest, const scalar_t* w, int64_t T, int64_t k,
                  int64_t d, scalar_t* out) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t B = kBlockBytes / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t es = static_cast<int64_t>(sizeof(scalar_t));
  const int64_t G = group_tokens(k);
  const int64_t ngroups = (T + G - 1) / G;
  const bool stream = use_streaming(T * d * es);
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, G * (k + 1) * d * es));
  at::parallel_for(0, ngroups, grain, [&](int64_t gb, int64_t ge) {
    Group<scalar_t, acc_t> grp, nxt;
    alignas(64) acc_t acc[B];
    alignas(64) acc_t conv[B];
    alignas(64) scalar_t tmp[B];
    if (gb < ge) nxt.collect(y, y_stride, dest, w, k, gb * G, std::min(T, gb * G + G));
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t t0 = g * G, t1 = std::min(T, t0 + G);
      std::swap(grp, nxt);
      if (g + 1 < ge) nxt.collect(y, y_stride, dest, w, k, t1, std::min(T, t1 + G));
      else nxt.rows.clear();
      for (int64_t c = 0; c < d; c += B) {
        const int64_t m = std::min(B, d - c);
        prefetch_block(nxt, c, m);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t nb = grp.begin[t - t0], ne = grp.begin[t - t0 + 1];
          scalar_t* o = out + t * d + c;
          if (nb == ne) {
            std::memset(static_cast<void*>(o), 0, static_cast<size_t>(m * es));
            continue;
          }
          for (int64_t q = nb; q < ne; ++q) {
            const acc_t* __restrict__ src;
            if constexpr (kSame) {
              src = grp.rows[q] + c;
            } else {
              to_acc(grp.rows[q] + c, conv, m);
              src = conv;
            }
            const acc_t wv = grp.w[q];
            if (q == nb) {
              for (int64_t i = 0; i < m; ++i) acc[i] = wv * src[i];
            } else {
              for (int64_t i = 0; i < m; ++i) acc[i] += wv * src[i];
            }
          }
          if constexpr (kSame) {
            copy_row(reinterpret_cast<char*>(o), reinterpret_cast<const char*>(acc), m * es, stream);
          } else {
            from_acc(acc, tmp, m);
            copy_row(reinterpret_cast<char*>(o), reinterpret_cast<const char*>(tmp), m * es, stream);
          }
        }
      }
    }
    stream_fence(stream);
  });
}

// ---- unpermute backward: grad_y[dest[t, j]] = w[t, j] * g[t]; grad_w[t, j] = <g[t], y[dest[t, j]]>
// (0 for dropped slots). Both paths sum a dot product in kLanes lanes (element i into lane i % kLanes,
// in increasing i) reduced in the same fixed tree, so they give bitwise the same results.

// Rows of at most kSmallRowBytes (d_model up to 2048 in fp32): a whole row at a time, the lanes in
// registers, in the order of y's rows (see unpermute_bwd_small_rows). Measured on one thread (fp32,
// per call): 16K rows of 512 B 4.0 -> 2.4 ms (token order, whole rows; a copy of grad_y's bytes 1.4),
// then, on another machine with caches flushed before each call, 1.7 -> 1.1 ms in y's order; 16K rows
// of 2 KiB (two threads, freed memory kept) 3.4 -> 2.1 ms. The blocked path below (many rows
// interleaved in kBlockBytes pieces) keeps rows wider than that.
#ifndef MOE_CPU_SMALL_ROW_BYTES
#define MOE_CPU_SMALL_ROW_BYTES 8192
#endif
constexpr int64_t kSmallRowBytes = MOE_CPU_SMALL_ROW_BYTES;

// A dot product in a fixed order: lanes[l] += a[q] * b[q] for q = l (mod kLanes) over n elements (the
// tail into the first lanes), then the lanes summed pairwise: the same result whatever the vector width.
template <typename acc_t>
inline void dot_lanes(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n, acc_t* lanes) {
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[q + l] * b[q + l];
  for (int l = 0; q < n; ++q, ++l) lanes[l] += a[q] * b[q];
}

template <typename acc_t>
inline acc_t sum_lanes(acc_t* lanes) {
  for (int s2 = kLanes / 2; s2 > 0; s2 /= 2)
    for (int l = 0; l < s2; ++l) lanes[l] += lanes[l + s2];
  return lanes[0];
}

// n elements of a row in the accumulation type: the row itself when it has that type, else converted into buf.
inline const float* row_as_acc(const float* row, float*, int64_t) { return row; }
inline const double* row_as_acc(const double* row, double*, int64_t) { return row; }
template <typename scalar_t>
inline const float* row_as_acc(const scalar_t* row, float* buf, int64_t n) {
  to_acc(row, buf, n);
  return buf;
}

template <typename scalar_t>
void unpermute_bwd_small_rows(const scalar_t* g, int64_t g_stride, const scalar_t* y, int64_t y_stride,
                              const int64_t* dest, const scalar_t* w, int64_t T, int64_t k, int64_t d, int64_t R,
                              scalar_t* gy, typename AccType<scalar_t>::type* gw, bool stream) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t kMax = kSmallRowBytes / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t es = static_cast<int64_t>(sizeof(scalar_t));
  // Walked in y's order, not the tokens': y is read and grad_y written front to back (the hardware
  // prefetcher streams both), and only g, T rows, is read at random places (it stays in cache). The
  // token order read y and wrote grad_y at random places: at T=2048, k=8, d=128 (fp32, one thread,
  // caches flushed before each call) 1.9 -> 1.1 ms. src[r] = t * k + j of the pair row r belongs to.
  std::vector<int64_t> src(static_cast<size_t>(R), -1);
  for (int64_t i = 0; i < T * k; ++i) {
    if (dest[i] >= 0) src[dest[i]] = i;
    else gw[i] = acc_t(0);
  }
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 3 * d * es));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t gbuf[kMax];
    alignas(64) acc_t ybuf[kMax];
    alignas(64) acc_t wg[kMax];
    alignas(64) scalar_t tmp[kMax];
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* dst = gy + r * d;
      const int64_t i = src[r];
      if (i < 0) {  // a row no pair reads: its gradient is zero
        std::memset(dst, 0, static_cast<size_t>(d * es));
        continue;
      }
      const acc_t* __restrict__ gs = row_as_acc(g + (i / k) * g_stride, gbuf, d);
      const acc_t* __restrict__ ys = row_as_acc(y + r * y_stride, ybuf, d);
      acc_t lanes[kLanes] = {};
      dot_lanes(gs, ys, d, lanes);
      gw[i] = sum_lanes(lanes);
      const acc_t wv = static_cast<acc_t>(w[i]);
      if constexpr (kSame) {
        if (!stream) {
          for (int64_t c = 0; c < d; ++c) dst[c] = wv * gs[c];
          continue;
        }
        for (int64_t c = 0; c < d; ++c) wg[c] = wv * gs[c];
        copy_row(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(wg), d * es, stream);
      } else {
        for (int64_t c = 0; c < d; ++c) wg[c] = wv * gs[c];
        from_acc(wg, tmp, d);
        copy_row(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(tmp), d * es, stream);
      }
    }
    stream_fence(stream);
  });
}

template <typename scalar_t>
void unpermute_bwd_t(const scalar_t* g, int64_t g_stride, const scalar_t* y, int64_t y_stride, const int64_t* dest,
                     const scalar_t* w, int64_t T, int64_t k, int64_t d, int64_t R, scalar_t* gy,
                     typename AccType<scalar_t>::type* gw) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t B = kBlockBytes / static_cast<int64_t>(sizeof(scalar_t));
  static_assert(B % kLanes == 0, "a block holds whole lane groups");
  const int64_t es = static_cast<int64_t>(sizeof(scalar_t));
  const int64_t G = group_tokens(k);
  const int64_t ngroups = (T + G - 1) / G;
  int64_t kept = 0;  // rows written = kept slots
  for (int64_t i = 0; i < T * k; ++i) kept += dest[i] >= 0;
  const bool stream = use_streaming(kept * d * es);
  if (d * es > kSmallRowBytes && kept < R) {  // rows no pair reads: their gradient is zero
    std::vector<char> read(static_cast<size_t>(R), 0);
    for (int64_t i = 0; i < T * k; ++i)
      if (dest[i] >= 0) read[dest[i]] = 1;
    for (int64_t r = 0; r < R; ++r)
      if (!read[r]) std::memset(gy + r * d, 0, static_cast<size_t>(d * es));
  }
  if (d * es <= kSmallRowBytes) {
    unpermute_bwd_small_rows<scalar_t>(g, g_stride, y, y_stride, dest, w, T, k, d, R, gy, gw, stream);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, G * (2 * k + 1) * d * es));
  at::parallel_for(0, ngroups, grain, [&](int64_t gb, int64_t ge) {
    Group<scalar_t, acc_t> grp, nxt;
    std::vector<acc_t> part;
    alignas(64) acc_t gblk[B];
    alignas(64) acc_t conv[B];
    alignas(64) acc_t wg[B];
    alignas(64) scalar_t tmp[B];
    if (gb < ge) nxt.collect(y, y_stride, dest, w, k, gb * G, std::min(T, gb * G + G));
    for (int64_t gi = gb; gi < ge; ++gi) {
      const int64_t t0 = gi * G, t1 = std::min(T, t0 + G);
      std::swap(grp, nxt);
      if (gi + 1 < ge) nxt.collect(y, y_stride, dest, w, k, t1, std::min(T, t1 + G));
      else nxt.rows.clear();
      const int64_t n = static_cast<int64_t>(grp.rows.size());
      part.assign(static_cast<size_t>(n * kLanes), acc_t(0));
      for (int64_t i = t0 * k; i < t1 * k; ++i) gw[i] = acc_t(0);
      for (int64_t c = 0; c < d; c += B) {
        const int64_t m = std::min(B, d - c);
        prefetch_block(nxt, c, m);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t nb = grp.begin[t - t0], ne = grp.begin[t - t0 + 1];
          if (nb == ne) continue;
          const acc_t* __restrict__ gsrc;
          if constexpr (kSame) {
            gsrc = g + t * g_stride + c;
          } else {
            to_acc(g + t * g_stride + c, gblk, m);
            gsrc = gblk;
          }
          for (int64_t q = nb; q < ne; ++q) {
            const acc_t* __restrict__ ysrc;
            if constexpr (kSame) {
              ysrc = grp.rows[q] + c;
            } else {
              to_acc(grp.rows[q] + c, conv, m);
              ysrc = conv;
            }
            const acc_t wv = grp.w[q];
            acc_t* __restrict__ p = part.data() + q * kLanes;
            if (m == B) {
              for (int64_t i0 = 0; i0 < B; i0 += kLanes)
                for (int l = 0; l < kLanes; ++l) p[l] += gsrc[i0 + l] * ysrc[i0 + l];
            } else {
              for (int64_t i = 0; i < m; ++i) p[i % kLanes] += gsrc[i] * ysrc[i];
            }
            for (int64_t i = 0; i < m; ++i) wg[i] = wv * gsrc[i];
            scalar_t* dst = gy + grp.row[q] * d + c;
            if constexpr (kSame) {
              copy_row(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(wg), m * es, stream);
            } else {
              from_acc(wg, tmp, m);
              copy_row(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(tmp), m * es, stream);
            }
          }
        }
      }
      for (int64_t q = 0; q < n; ++q) {
        acc_t* p = part.data() + q * kLanes;
        for (int s = kLanes / 2; s > 0; s /= 2)
          for (int l = 0; l < s; ++l) p[l] += p[l + s];
        gw[grp.slot[q]] = p[0];
      }
    }
    stream_fence(stream);
  });
}

// ---- entry points (external linkage, one set per ISA namespace)

void gather_sum(at::ScalarType dtype, const void* y, int64_t y_stride, const int64_t* dest, const void* w,
                int64_t T, int64_t k, int64_t d, void* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_gather_sum_cpu", [&] {
    gather_sum_t<scalar_t>(static_cast<const scalar_t*>(y), y_stride, dest, static_cast<const scalar_t*>(w), T, k,
                           d, static_cast<scalar_t*>(out));
  });
}

void unpermute_bwd(at::ScalarType dtype, const void* g, int64_t g_stride, const void* y, int64_t y_stride,
                   const int64_t* dest, const void* w, int64_t T, int64_t k, int64_t d, int64_t R, void* gy,
                   void* gw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_unpermute_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    unpermute_bwd_t<scalar_t>(static_cast<const scalar_t*>(g), g_stride, static_cast<const scalar_t*>(y), y_stride,
                              dest, static_cast<const scalar_t*>(w), T, k, d, R, static_cast<scalar_t*>(gy),
                              static_cast<acc_t*>(gw));
  });
}

void permute(const char* x, int64_t x_stride_bytes, const int64_t* dest, int64_t T, int64_t k, int64_t R,
             int64_t row_bytes, char* out) {
  permute_rows(x, x_stride_bytes, dest, T, k, R, row_bytes, out);
}

}  // namespace MOE_CPU_ISA
}  // namespace moe
