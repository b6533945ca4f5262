// CPU kernel of the routers' top-k, one token per vector lane, compiled once per instruction set like
// dispatch_cpu_kernels.h (include after experts_cpu_kernels.h, whose vector types it uses, with
// MOE_CPU_ISA naming the namespace).
//
// topk_vectors: fp32 scores s[t * token_stride + e * expert_stride] (rows [T, E], or expert-major: the
// transpose of a contiguous [E, T]), tokens [t0, t1) in whole vectors; rows are transposed a vector
// of tokens at a time into a small expert-major block first. One vector lane per token: each lane
// keeps its k best (score, index) pairs sorted, and every expert, in increasing index, replaces a
// lane's last pair when it ranks strictly above it and then bubbles up past the pairs it ranks
// strictly above. So equal scores keep ascending index order and NaN ranks first, the order of
// router_cpu.cpp's row kernel, without a branch per token. The bubble runs all k levels: stopping at
// the first level where no lane moves measured 2-3x slower (the branch mispredicts).
// One thread, 2,048 tokens, k = 8: 0.25 / 0.29 ms (expert-major / rows) for 64 experts, 0.43 / 0.51 ms
// for 128; the row kernel of router_cpu.cpp: 1.2 and 1.7 ms on rows.
#ifndef MOE_CPU_ISA
#error "define MOE_CPU_ISA before including router_cpu_kernels.h"
#endif

namespace moe {
namespace MOE_CPU_ISA {

inline vint ranks_above_v(vfloat a, vfloat b) { return (a > b) | ((a != a) & (b == b)); }

inline vfloat select_v(vint m, vfloat a, vfloat b) { return (vfloat)(((vint)a & m) | ((vint)b & ~m)); }
inline vint select_v(vint m, vint a, vint b) { return (a & m) | (b & ~m); }

inline bool any_v(vint m) {
  int32_t lanes[kLanesF];
  std::memcpy(lanes, &m, sizeof(lanes));
  int32_t r = 0;
  for (int64_t l = 0; l < kLanesF; ++l) r |= lanes[l];
  return r != 0;
}

void topk_vectors(const float* s, int64_t token_stride, int64_t expert_stride, int64_t t0, int64_t t1, int64_t E,
                  int64_t k, int64_t* out) {
  vfloat best[kTopkMaxK];
  vint idx[kTopkMaxK];
  // token-major scores (rows): each vector of tokens is first transposed into `block`, expert-major
  std::vector<float> block(static_cast<size_t>(token_stride == 1 ? 0 : E * kLanesF));
  for (int64_t t = t0; t + kLanesF <= t1; t += kLanesF) {
    const float* src = s + t * token_stride;
    int64_t ld = expert_stride;
    if (token_stride != 1) {
      for (int64_t l = 0; l < kLanesF; ++l)
        for (int64_t e = 0; e < E; ++e) block[e * kLanesF + l] = src[l * token_stride + e * expert_stride];
      src = block.data();
      ld = kLanesF;
    }
    for (int64_t e = 0; e < E; ++e) {
      const vfloat v = load_v(src + e * ld);
      const vint ev = vint{} + static_cast<int32_t>(e);
      int64_t i;
      if (e < k) {  // filling: append, then bubble up
        best[e] = v;
        idx[e] = ev;
        i = e;
      } else {
        const vint m = ranks_above_v(v, best[k - 1]);
        if (!any_v(m)) continue;
        best[k - 1] = select_v(m, v, best[k - 1]);
        idx[k - 1] = select_v(m, ev, idx[k - 1]);
        i = k - 1;
      }
      for (; i > 0; --i) {
        const vint m = ranks_above_v(best[i], best[i - 1]);
        const vfloat hi = select_v(m, best[i], best[i - 1]), lo = select_v(m, best[i - 1], best[i]);
        const vint ihi = select_v(m, idx[i], idx[i - 1]), ilo = select_v(m, idx[i - 1], idx[i]);
        best[i - 1] = hi;
        best[i] = lo;
        idx[i - 1] = ihi;
        idx[i] = ilo;
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      int32_t lanes[kLanesF];
      std::memcpy(lanes, &idx[i], sizeof(lanes));
      for (int64_t l = 0; l < kLanesF; ++l) out[(t + l) * k + i] = lanes[l];
    }
  }
}

}  // namespace MOE_CPU_ISA
}  // namespace moe
