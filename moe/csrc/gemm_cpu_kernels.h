// fp32 GEMM of the expert ops on AVX2 + FMA (dispatch_cpu_avx2.cpp compiles it; the baseline build has
// none and the ops call ATen's GEMM instead): C = A @ B with A [M, K] and B [K, N], where either operand
// may be read through a row index and C may be written through one, scaled per row and added to.
//
// Why the expert ops carry their own GEMM: with 64-128 small experts a layer's GEMMs are a few hundred
// rows each over weights that are cold in cache (128 experts of hidden 128 at d=512: 100 MB of fp32
// weights, read twice a pass, and 100 MB of weight gradients written). Called as a black box, MKL packs
// each expert's cold weights before computing (a stall per call), clears each fresh weight gradient
// before writing it (a pass over 100 MB), and needs every token row gathered into a contiguous buffer
// and every output row written out for a separate combine. Here the weights' next column panel is
// prefetched while the current one computes, the gathers happen in the packing the GEMM does anyway,
// single-pass weight gradients are streamed to memory, and the output tile goes straight into the
// token's accumulator row times its gate (the combine).
//
// The method is the usual one (Goto / BLIS): A packed into 6-row panels and B into 16-column panels of
// KC-long slices, a 6 x 16 register-blocked FMA micro-kernel over them. FMA rounds once per
// multiply-add, so results agree with ATen's GEMM within fp32 rounding, not bitwise.
//
// Include after dispatch.h inside a target("avx2,fma") region with MOE_CPU_ISA defined.
#ifndef MOE_CPU_ISA
#error "define MOE_CPU_ISA before including gemm_cpu_kernels.h"
#endif

namespace moe {
namespace MOE_CPU_ISA {
namespace gemm {

constexpr int64_t kMR = 6, kNR = 16;  // micro-tile: 12 of the 16 ymm registers accumulate
constexpr int64_t kKC = 256;          // K slice: a B micro-panel (kKC x 16 fp32 = 16 KiB) stays in L1
constexpr int64_t kMC = 144;          // rows of A packed at once (144 x 256 fp32 = 144 KiB, in L2)

// Row o of an operand's storage: p + (idx ? idx[o] : o) * ld.
inline const float* storage_row(const GemmOperand& x, int64_t o) { return x.p + (x.idx ? x.idx[o] : o) * x.ld; }

inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                       __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// A rows [i0, i0 + mc), columns [k0, k0 + kc) into 6-row panels: Ap[panel][k][6], rows past mc zero.
// The buffer needs 2 floats of slack past the last panel (the transposed stores write 8 floats).
inline void pack_a(const GemmOperand& A, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* Ap) {
  for (int64_t ip = 0; ip < mc; ip += kMR, Ap += kc * kMR) {
    const int64_t mr = std::min(kMR, mc - ip);
    if (A.trans) {  // A(i, k) = storage row k, column i: 6 contiguous floats per k
      for (int64_t k = 0; k < kc; ++k) {
        const float* r = storage_row(A, k0 + k) + i0 + ip;
        for (int64_t i = 0; i < kMR; ++i) Ap[k * kMR + i] = i < mr ? r[i] : 0.f;
      }
      continue;
    }
    const float* rows[kMR];  // A(i, k) = storage row i, column k: a 6-row transpose
    for (int64_t i = 0; i < kMR; ++i) rows[i] = storage_row(A, i0 + ip + std::min(i, mr - 1)) + k0;
    int64_t k = 0;
    if (mr == kMR) {
      for (; k + 8 <= kc; k += 8) {  // an 8 x 8 transpose of the 6 rows (2 unused); stores of 8 overlap
        __m256 v0 = _mm256_loadu_ps(rows[0] + k), v1 = _mm256_loadu_ps(rows[1] + k), v2 = _mm256_loadu_ps(rows[2] + k),
               v3 = _mm256_loadu_ps(rows[3] + k), v4 = _mm256_loadu_ps(rows[4] + k), v5 = _mm256_loadu_ps(rows[5] + k),
               v6 = v5, v7 = v5;
        transpose8(v0, v1, v2, v3, v4, v5, v6, v7);
        float* o = Ap + k * kMR;
        _mm256_storeu_ps(o + 0 * kMR, v0);
        _mm256_storeu_ps(o + 1 * kMR, v1);
        _mm256_storeu_ps(o + 2 * kMR, v2);
        _mm256_storeu_ps(o + 3 * kMR, v3);
        _mm256_storeu_ps(o + 4 * kMR, v4);
        _mm256_storeu_ps(o + 5 * kMR, v5);
        _mm256_storeu_ps(o + 6 * kMR, v6);
        _mm256_storeu_ps(o + 7 * kMR, v7);
      }
    }
    for (; k < kc; ++k)
      for (int64_t i = 0; i < kMR; ++i) Ap[k * kMR + i] = i < mr ? rows[i][k] : 0.f;
  }
}

// B columns [j0, j0 + nr) (nr <= 16), rows [k0, k0 + kc) into one 16-column panel Bp[k][16], zero past nr.
inline void pack_b_panel(const GemmOperand& B, int64_t k0, int64_t kc, int64_t j0, int64_t nr, float* Bp) {
  if (!B.trans) {  // B(k, j) = storage row k: 16 contiguous floats per k
    for (int64_t k = 0; k < kc; ++k) {
      const float* r = storage_row(B, k0 + k) + j0;
      if (nr == kNR) {
        _mm256_store_ps(Bp + k * kNR, _mm256_loadu_ps(r));
        _mm256_store_ps(Bp + k * kNR + 8, _mm256_loadu_ps(r + 8));
      } else {
        for (int64_t j = 0; j < kNR; ++j) Bp[k * kNR + j] = j < nr ? r[j] : 0.f;
      }
    }
    return;
  }
  // B(k, j) = storage row j, column k: a 16-row transpose, 8 x 8 blocks
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t jh = half * 8, nh = std::max<int64_t>(0, std::min<int64_t>(8, nr - jh));
    if (nh == 0) {
      for (int64_t k = 0; k < kc; ++k) _mm256_store_ps(Bp + k * kNR + jh, _mm256_setzero_ps());
      continue;
    }
    const float* r[8];
    for (int64_t j = 0; j < 8; ++j) r[j] = storage_row(B, j0 + jh + std::min(j, nh - 1)) + k0;
    int64_t k = 0;
    if (nh == 8) {
      for (; k + 8 <= kc; k += 8) {
        __m256 v0 = _mm256_loadu_ps(r[0] + k), v1 = _mm256_loadu_ps(r[1] + k), v2 = _mm256_loadu_ps(r[2] + k),
               v3 = _mm256_loadu_ps(r[3] + k), v4 = _mm256_loadu_ps(r[4] + k), v5 = _mm256_loadu_ps(r[5] + k),
               v6 = _mm256_loadu_ps(r[6] + k), v7 = _mm256_loadu_ps(r[7] + k);
        transpose8(v0, v1, v2, v3, v4, v5, v6, v7);
        float* o = Bp + k * kNR + jh;
        _mm256_store_ps(o + 0 * kNR, v0);
        _mm256_store_ps(o + 1 * kNR, v1);
        _mm256_store_ps(o + 2 * kNR, v2);
        _mm256_store_ps(o + 3 * kNR, v3);
        _mm256_store_ps(o + 4 * kNR, v4);
        _mm256_store_ps(o + 5 * kNR, v5);
        _mm256_store_ps(o + 6 * kNR, v6);
        _mm256_store_ps(o + 7 * kNR, v7);
      }
    }
    for (; k < kc; ++k)
      for (int64_t j = 0; j < 8; ++j) Bp[k * kNR + jh + j] = j < nh ? r[j][k] : 0.f;
  }
}

// One cache line into L1. Inline asm, not _mm_prefetch: GCC 12 at -O3 deleted the loops below, which
// hold nothing but prefetches (found by counting the instructions in the built library).
inline void prefetch_line(const float* p) { asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(p))); }

// Software prefetch of the memory pack_b_panel(B, k0, kc, j0, nr) will read: its cache lines with
// numbers [lo, hi) (so a panel's lines can be spread over the micro-kernel calls before it).
inline int64_t panel_lines(const GemmOperand& B, int64_t kc, int64_t nr) {
  return B.trans ? nr * ((kc + 15) / 16) : kc;
}
inline void prefetch_b_panel(const GemmOperand& B, int64_t k0, int64_t kc, int64_t j0, int64_t nr, int64_t lo,
                             int64_t hi) {
  hi = std::min(hi, panel_lines(B, kc, nr));
  if (lo >= hi) return;
  if (B.trans) {  // line l: storage row j0 + l / per_row, chunk l % per_row (one division, then counters)
    const int64_t per_row = (kc + 15) / 16;
    int64_t row = lo / per_row, chunk = lo - row * per_row;
    const float* r = storage_row(B, j0 + row) + k0;
    for (int64_t l = lo; l < hi; ++l) {
      prefetch_line(r + chunk * 16);
      if (++chunk == per_row) {
        chunk = 0;
        if (l + 1 < hi) r = storage_row(B, j0 + ++row) + k0;
      }
    }
  } else {
    for (int64_t l = lo; l < hi; ++l)
      prefetch_line(storage_row(B, k0 + l) + j0);
  }
}

// One full 16-column row of a tile: c[0..16) = alpha * (v0, v1) (+ c when add).
inline void store_row16(float* c, __m256 v0, __m256 v1, const float* alpha, bool add, bool stream) {
  if (alpha) {
    const __m256 sv = _mm256_set1_ps(*alpha);
    v0 = _mm256_mul_ps(v0, sv);
    v1 = _mm256_mul_ps(v1, sv);
  }
  if (add) {
    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c + 8));
  }
  if (stream && (reinterpret_cast<uintptr_t>(c) & 31) == 0) {
    _mm256_stream_ps(c, v0);
    _mm256_stream_ps(c + 8, v1);
  } else {
    _mm256_storeu_ps(c, v0);
    _mm256_storeu_ps(c + 8, v1);
  }
}

// The [mr, nr] tile at C rows crow[0..mr), column col: alpha[i] * (A panel @ B panel), stored (first)
// or added. stream: non-temporal stores (write-once outputs; 32-byte aligned full rows only).
inline void micro_kernel(int64_t kc, const float* __restrict__ Ap, const float* __restrict__ Bp, float* const* crow,
                         const float* alpha, int64_t col, int64_t mr, int64_t nr, bool add, bool stream) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, Ap += kMR, Bp += kNR) {
    const __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
    __m256 a = _mm256_broadcast_ss(Ap + 0);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(Ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(Ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(Ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(Ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(Ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  const __m256 acc[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (mr == kMR && nr == kNR) {  // a full tile: straight from the registers
    for (int64_t i = 0; i < kMR; ++i)
      store_row16(crow[i] + col, acc[i][0], acc[i][1], alpha ? alpha + i : nullptr, add, stream);
    return;
  }
  alignas(32) float t[kMR][kNR];  // a partial tile: through memory
  for (int64_t i = 0; i < kMR; ++i) {
    _mm256_store_ps(t[i], acc[i][0]);
    _mm256_store_ps(t[i] + 8, acc[i][1]);
  }
  for (int64_t i = 0; i < mr; ++i) {
    float* c = crow[i] + col;
    if (nr == kNR) {
      store_row16(c, _mm256_load_ps(t[i]), _mm256_load_ps(t[i] + 8), alpha ? alpha + i : nullptr, add, stream);
    } else {
      const float s = alpha ? alpha[i] : 1.f;
      for (int64_t j = 0; j < nr; ++j) c[j] = (add ? c[j] : 0.f) + (alpha ? s * t[i][j] : t[i][j]);
    }
  }
}

// Per-thread packing buffers, grow-only (aligned to 64 bytes, 2 floats of slack for pack_a).
inline float* packing_buffer(std::vector<float>& buf, int64_t floats) {
  if (static_cast<int64_t>(buf.size()) < floats + 32) buf.resize(static_cast<size_t>(floats + 32));
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// C (M x N) = / += A (M x K) @ B (K x N); see GemmOutput. Single-threaded: the callers parallelise.
// Loop order (K slice, A block of kMC rows, B panel, A panel): in the first A block each B panel is
// packed just before use while the next one's memory is prefetched across the micro-kernel calls, so
// cold weights stream in behind the arithmetic; later A blocks reuse the packed panels.
inline void sgemm(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B, const GemmOutput& C) {
  if (M <= 0 || N <= 0) return;
  thread_local std::vector<float> a_buf, b_buf;
  thread_local std::vector<float*> crow;
  if (K <= 0) {  // an empty sum: C = 0 (or unchanged)
    if (!C.accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C.p + (C.idx ? C.idx[i] : i) * C.ld, 0, N * sizeof(float));
    return;
  }
  const int64_t kc_max = std::min(K, kKC), mc_max = std::min(M, kMC);
  const int64_t n_panels = (N + kNR - 1) / kNR;
  float* Ap = packing_buffer(a_buf, kc_max * ((mc_max + kMR - 1) / kMR * kMR));
  float* Bp = packing_buffer(b_buf, kc_max * n_panels * kNR);
  crow.resize(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) crow[i] = C.p + (C.idx ? C.idx[i] : i) * C.ld;
  const bool stream = C.stream && !C.accumulate && K <= kKC;
  // B panels in the order they are first packed: (K slice, panel). Panel q + kAhead is prefetched while
  // panel q computes; with one A block that runs on into the next K slice.
  constexpr int64_t kAhead = 2;
  const bool one_block = M <= kMC;
  const auto prefetch_ahead = [&](int64_t k0, int64_t jp, int64_t lo, int64_t hi) {
    int64_t jn = jp + kAhead, kn = k0;
    if (jn >= n_panels) {
      if (!one_block || k0 + kKC >= K) return;
      jn -= n_panels;
      kn += kKC;
    }
    const int64_t j0 = jn * kNR;
    prefetch_b_panel(B, kn, std::min(kKC, K - kn), j0, std::min(kNR, N - j0), lo, hi);
  };
  for (int64_t jp = 0; jp < std::min(kAhead, n_panels); ++jp)  // lands while A is packed
    prefetch_b_panel(B, 0, kc_max, jp * kNR, std::min(kNR, N - jp * kNR), 0, INT64_MAX);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool add = C.accumulate || k0 > 0;
    if (k0 > 0 && !one_block)
      for (int64_t jp = 0; jp < std::min(kAhead, n_panels); ++jp)
        prefetch_b_panel(B, k0, kc, jp * kNR, std::min(kNR, N - jp * kNR), 0, INT64_MAX);
    for (int64_t i0 = 0; i0 < M; i0 += kMC) {
      const int64_t mc = std::min(kMC, M - i0), a_panels = (mc + kMR - 1) / kMR;
      pack_a(A, i0, mc, k0, kc, Ap);
      for (int64_t jp = 0; jp < n_panels; ++jp) {
        const int64_t j0 = jp * kNR, nr = std::min(kNR, N - j0);
        float* panel = Bp + jp * kc * kNR;
        const bool first = i0 == 0;
        if (first) pack_b_panel(B, k0, kc, j0, nr, panel);
        // the panel kAhead on is at most 16 columns of at most kKC rows
        const int64_t per_call = first ? (panel_lines(B, kKC, kNR) + a_panels - 1) / a_panels : 0;
        for (int64_t q = 0; q < a_panels; ++q) {
          if (first) prefetch_ahead(k0, jp, q * per_call, (q + 1) * per_call);
          // the next tile's C rows (scattered token rows, in L3 at best), so its epilogue does not wait
          if (!stream) {
            const bool last = q + 1 == a_panels;
            const int64_t iq = i0 + (last ? 0 : (q + 1) * kMR), jq = last ? j0 + kNR : j0;
            if (jq < N)
              for (int64_t i = iq; i < std::min(iq + kMR, i0 + mc); ++i) prefetch_line(crow[i] + jq);
          }
          const int64_t ip = q * kMR;
          micro_kernel(kc, Ap + ip * kc, panel, crow.data() + i0 + ip, C.alpha ? C.alpha + i0 + ip : nullptr, j0,
                       std::min(kMR, mc - ip), nr, add, stream);
        }
      }
    }
  }
  if (stream) _mm_sfence();
}

}  // namespace gemm

inline void sgemm(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B, const GemmOutput& C) {
  gemm::sgemm(M, N, K, A, B, C);
}

}  // namespace MOE_CPU_ISA
}  // namespace moe
