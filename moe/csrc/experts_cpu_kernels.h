// CPU row kernels of the fused SwiGLU (the expert activation), compiled once per instruction set
// like dispatch_cpu_kernels.h (include after it, with MOE_CPU_ISA naming the namespace):
//
//   swiglu_fwd: act[r, i] = silu(gate) * up,  gate = h13[r, i], up = h13[r, h + i]
//   swiglu_bwd: grad_h13[r, i] = g * up * silu'(gate),  grad_h13[r, h + i] = g * silu(gate),
//               g = grad_act[r, i],  silu'(x) = s * (1 + x * (1 - s)),  s = sigmoid(x)
//
// One pass over the rows instead of silu + mul forward and mul + mul + silu_backward (recomputing
// silu) backward. The rows are walked by the calling thread: the callers parallelise. fp32 math
// (fp64 for double; bf16 / fp16 are converted in blocks): exp is a branch-free Cephes-style
// polynomial on vectors; no FMA, so the baseline and AVX2 builds give bitwise identical results.
#ifndef MOE_CPU_ISA
#error "define MOE_CPU_ISA before including experts_cpu_kernels.h"
#endif

namespace moe {
namespace MOE_CPU_ISA {

// fp32 math on GCC vector types (8 lanes in the AVX2 build, 4 = SSE2 in the baseline; the compiler
// maps the operators to packed instructions). Lanes are independent, so the width does not change
// any result.
#ifdef MOE_CPU_F16C
#define MOE_SWIGLU_LANES 8
#else
#define MOE_SWIGLU_LANES 4
#endif
constexpr int64_t kLanesF = MOE_SWIGLU_LANES;
typedef float vfloat __attribute__((vector_size(4 * MOE_SWIGLU_LANES)));
typedef int32_t vint __attribute__((vector_size(4 * MOE_SWIGLU_LANES)));

inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// e^x per lane: x clamped to [-87, 88] (so 2^n stays a normal float), n = round(x / ln 2),
// r = x - n ln 2 (two-part ln 2), e^r by the Cephes expf polynomial (about 1 ulp), times 2^n built
// in the exponent bits. A NaN lane gives a finite value here; the callers multiply by x, so NaN
// still comes out of silu.
inline vfloat exp_v(vfloat x) {
  x = x < -87.0f ? vfloat{} - 87.0f : x;
  x = x > 88.0f ? vfloat{} + 88.0f : x;
  vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  n = n == n ? n : vfloat{};
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * (r * r) + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return y * (vfloat)bits;  // same-size vector cast: reinterprets the bits
}

inline vfloat swiglu_fwd_v(vfloat g, vfloat u) { return g / (1.0f + exp_v(-g)) * u; }

inline void swiglu_bwd_v(vfloat ga, vfloat g, vfloat u, vfloat& dg, vfloat& du) {
  const vfloat s = 1.0f / (1.0f + exp_v(-g));
  du = ga * (g * s);
  dg = (ga * u) * (s * (1.0f + g * (1.0f - s)));
}

inline void swiglu_fwd_block(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ a,
                             int64_t m) {
  int64_t i = 0;
  for (; i + kLanesF <= m; i += kLanesF) store_v(a + i, swiglu_fwd_v(load_v(g + i), load_v(u + i)));
  if (i < m) {  // tail through a zero-padded vector
    float gb[kLanesF] = {}, ub[kLanesF] = {}, ab[kLanesF];
    std::memcpy(gb, g + i, (m - i) * sizeof(float));
    std::memcpy(ub, u + i, (m - i) * sizeof(float));
    store_v(ab, swiglu_fwd_v(load_v(gb), load_v(ub)));
    std::memcpy(a + i, ab, (m - i) * sizeof(float));
  }
}

inline void swiglu_bwd_block(const float* __restrict__ ga, const float* __restrict__ g, const float* __restrict__ u,
                             float* __restrict__ dg, float* __restrict__ du, int64_t m) {
  int64_t i = 0;
  vfloat dgv, duv;
  for (; i + kLanesF <= m; i += kLanesF) {
    swiglu_bwd_v(load_v(ga + i), load_v(g + i), load_v(u + i), dgv, duv);
    store_v(dg + i, dgv);
    store_v(du + i, duv);
  }
  if (i < m) {
    float gab[kLanesF] = {}, gb[kLanesF] = {}, ub[kLanesF] = {}, dgb[kLanesF], dub[kLanesF];
    const size_t bytes = (m - i) * sizeof(float);
    std::memcpy(gab, ga + i, bytes);
    std::memcpy(gb, g + i, bytes);
    std::memcpy(ub, u + i, bytes);
    swiglu_bwd_v(load_v(gab), load_v(gb), load_v(ub), dgv, duv);
    store_v(dgb, dgv);
    store_v(dub, duv);
    std::memcpy(dg + i, dgb, bytes);
    std::memcpy(du + i, dub, bytes);
  }
}

// double (tests, gradcheck): plain std::exp
inline void swiglu_fwd_block(const double* __restrict__ g, const double* __restrict__ u, double* __restrict__ a,
                             int64_t m) {
  for (int64_t i = 0; i < m; ++i) a[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
}

inline void swiglu_bwd_block(const double* __restrict__ ga, const double* __restrict__ g,
                             const double* __restrict__ u, double* __restrict__ dg, double* __restrict__ du,
                             int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-g[i]));
    du[i] = ga[i] * (g[i] * s);
    dg[i] = (ga[i] * u[i]) * (s * (1.0 + g[i] * (1.0 - s)));
  }
}

constexpr int64_t kSwigluBlock = 256;  // elements converted at a time for bf16 / fp16
static_assert(kSwigluBlock % kLanes == 0, "a block's dot product ends on whole lanes");

template <typename scalar_t>
void swiglu_fwd_t(const scalar_t* h13, int64_t ld_h13, int64_t rows, int64_t h, scalar_t* act, int64_t ld_act) {
  using acc_t = typename AccType<scalar_t>::type;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* g = h13 + r * ld_h13;
    const scalar_t* u = g + h;
    scalar_t* a = act + r * ld_act;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      swiglu_fwd_block(g, u, a, h);
    } else {
      acc_t gb[kSwigluBlock], ub[kSwigluBlock], ab[kSwigluBlock];
      for (int64_t c = 0; c < h; c += kSwigluBlock) {
        const int64_t m = std::min(kSwigluBlock, h - c);
        to_acc(g + c, gb, m);
        to_acc(u + c, ub, m);
        swiglu_fwd_block(gb, ub, ab, m);
        from_acc(ab, a + c, m);
      }
    }
  }
}

template <typename scalar_t>
void swiglu_bwd_t(const scalar_t* grad_act, int64_t ld_ga, const scalar_t* h13, int64_t ld_h13, int64_t rows,
                  int64_t h, scalar_t* grad_h13, int64_t ld_gh13) {
  using acc_t = typename AccType<scalar_t>::type;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ga = grad_act + r * ld_ga;
    const scalar_t* g = h13 + r * ld_h13;
    const scalar_t* u = g + h;
    scalar_t* dg = grad_h13 + r * ld_gh13;
    scalar_t* du = dg + h;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      swiglu_bwd_block(ga, g, u, dg, du, h);
    } else {
      acc_t gab[kSwigluBlock], gb[kSwigluBlock], ub[kSwigluBlock], dgb[kSwigluBlock], dub[kSwigluBlock];
      for (int64_t c = 0; c < h; c += kSwigluBlock) {
        const int64_t m = std::min(kSwigluBlock, h - c);
        to_acc(ga + c, gab, m);
        to_acc(g + c, gb, m);
        to_acc(u + c, ub, m);
        swiglu_bwd_block(gab, gb, ub, dgb, dub, m);
        from_acc(dgb, dg + c, m);
        from_acc(dub, du + c, m);
      }
    }
  }
}

// ---- the gates of routed rows (the routed op, experts_cpu.cpp: permute, experts and weighted combine in one)
//
//   combine_rows: acc[tokens[r]] += gate[r] * y[r] for the m rows of y [m, d] (gate 1 when gates is
//                 nullptr: the input gradient's per-token sum); acc [T, d] and gates in the
//                 accumulation type
//   gate_rows:    grad_gate[r] = <ga[r], act[r]> (ga [m, h] the gradient of the expert's activation before
//                 the gate, act [m, h]: <grad_out[t], y[r]> without y), then ga[r] *= gate[r] and
//                 go[r] *= gate[r] (go [m, d] the gathered grad_out rows): the gated gradients
// Sums in a fixed order (kLanes partial sums), no FMA: bitwise the same in both builds.

template <typename scalar_t, typename acc_t>
void combine_rows_t(const scalar_t* y, const int64_t* tokens, const acc_t* gates, int64_t m, int64_t d, acc_t* acc) {
  for (int64_t r = 0; r < m; ++r) {
    acc_t* __restrict__ dst = acc + tokens[r] * d;
    const scalar_t* __restrict__ src = y + r * d;
    const acc_t g = gates ? gates[r] : acc_t(1);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int64_t q = 0; q < d; ++q) dst[q] += g * src[q];
    } else {
      acc_t buf[kSwigluBlock];
      for (int64_t c = 0; c < d; c += kSwigluBlock) {
        const int64_t n = std::min(kSwigluBlock, d - c);
        to_acc(src + c, buf, n);
        for (int64_t q = 0; q < n; ++q) dst[c + q] += g * buf[q];
      }
    }
  }
}

// x[0..n) *= g, in the accumulation type (one rounding for bf16 / fp16)
template <typename scalar_t, typename acc_t>
void scale_row(scalar_t* __restrict__ x, int64_t n, acc_t g) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t q = 0; q < n; ++q) x[q] *= g;
  } else {
    acc_t buf[kSwigluBlock];
    for (int64_t c = 0; c < n; c += kSwigluBlock) {
      const int64_t b = std::min(kSwigluBlock, n - c);
      to_acc(x + c, buf, b);
      for (int64_t q = 0; q < b; ++q) buf[q] *= g;
      from_acc(buf, x + c, b);
    }
  }
}

template <typename scalar_t, typename acc_t>
void gate_rows_t(scalar_t* ga, const scalar_t* act, const acc_t* gates, int64_t m, int64_t h, acc_t* grad_gates,
                 scalar_t* go, int64_t d) {
  for (int64_t r = 0; r < m; ++r) {
    scalar_t* gar = ga + r * h;
    const scalar_t* ar = act + r * h;
    acc_t lanes[kLanes] = {};
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      dot_lanes(gar, ar, h, lanes);
    } else {
      acc_t gb[kSwigluBlock], ab[kSwigluBlock];  // kSwigluBlock is a multiple of kLanes
      for (int64_t c = 0; c < h; c += kSwigluBlock) {
        const int64_t n = std::min(kSwigluBlock, h - c);
        to_acc(gar + c, gb, n);
        to_acc(ar + c, ab, n);
        dot_lanes(gb, ab, n, lanes);
      }
    }
    grad_gates[r] = sum_lanes(lanes);
    scale_row(gar, h, gates[r]);
    scale_row(go + r * d, d, gates[r]);
  }
}

// ---- entry points (external linkage, one set per ISA namespace)

void swiglu_fwd(at::ScalarType dtype, const void* h13, int64_t ld_h13, int64_t rows, int64_t h, void* act,
                int64_t ld_act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_swiglu_cpu", [&] {
    swiglu_fwd_t<scalar_t>(static_cast<const scalar_t*>(h13), ld_h13, rows, h, static_cast<scalar_t*>(act), ld_act);
  });
}

void swiglu_bwd(at::ScalarType dtype, const void* grad_act, int64_t ld_ga, const void* h13, int64_t ld_h13,
                int64_t rows, int64_t h, void* grad_h13, int64_t ld_gh13) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_swiglu_backward_cpu", [&] {
    swiglu_bwd_t<scalar_t>(static_cast<const scalar_t*>(grad_act), ld_ga, static_cast<const scalar_t*>(h13), ld_h13,
                           rows, h, static_cast<scalar_t*>(grad_h13), ld_gh13);
  });
}

void combine_rows(at::ScalarType dtype, const void* y, const int64_t* tokens, const void* gates, int64_t m, int64_t d,
                  void* acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_combine_rows_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    combine_rows_t<scalar_t, acc_t>(static_cast<const scalar_t*>(y), tokens, static_cast<const acc_t*>(gates), m, d,
                                    static_cast<acc_t*>(acc));
  });
}

void gate_rows(at::ScalarType dtype, void* ga, const void* act, const void* gates, int64_t m, int64_t h,
               void* grad_gates, void* go, int64_t d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "moe_gate_rows_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    gate_rows_t<scalar_t, acc_t>(static_cast<scalar_t*>(ga), static_cast<const scalar_t*>(act),
                                 static_cast<const acc_t*>(gates), m, h, static_cast<acc_t*>(grad_gates),
                                 static_cast<scalar_t*>(go), d);
  });
}

}  // namespace MOE_CPU_ISA
}  // namespace moe
