// CPU kernels of the token-dispatch ops (see dispatch.h and moe/ops/reference.py for the semantics).
//
// - routing_index: parallel counting sort of the (token, slot) pairs by expert: per-chunk
//   histograms -> per-(chunk, expert) rank bases -> each chunk places its pairs. Stable by
//   construction (pairs are walked in flat order t * k + j). With a capacity and a priority, only
//   experts that overflow select their top-`capacity` pairs (std::nth_element on (key, position):
//   a selection, not a sort); the kept pairs are then laid out in token order.
// - permute / unpermute / unpermute-backward: the row kernels of dispatch_cpu_kernels.h (built for
//   the baseline ISA here and for AVX2+F16C in dispatch_cpu_avx2.cpp, chosen at run time):
//   permute copies each token row once to each kept row; unpermute (and permute-backward) is a
//   per-token gather-sum written once, accumulated in fp32 (fp64 for double) in the order
//   j = 0..k-1, no atomics -> bitwise deterministic; unpermute-backward writes each grad_y row and
//   accumulates the grad_w dot product in the same pass.
#include "dispatch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOE_HAVE_SSE2 1
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

// The row kernels, baseline instruction set (dispatch_cpu_avx2.cpp builds them again for AVX2).
#define MOE_CPU_ISA base
#include "dispatch_cpu_kernels.h"
#include "experts_cpu_kernels.h"
#include "router_cpu_kernels.h"
#undef MOE_CPU_ISA

namespace moe {

using at::Tensor;

// ------------------------------------------------------------------------------------- helpers

Tensor checked_dest_rows(const Tensor& dest_rows, const char* op) {
  TORCH_CHECK(dest_rows.dim() == 2, op, ": dest_rows must be [T, k], got ", dest_rows.sizes());
  TORCH_CHECK(!at::isFloatingType(dest_rows.scalar_type()) && !at::isComplexType(dest_rows.scalar_type()),
              op, ": dest_rows must be an integer tensor");
  return dest_rows.to(at::kLong).contiguous();
}

Rows as_rows(const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "expected a tensor with at least one dimension");
  const int64_t n0 = t.size(0);
  int64_t row_numel = 1;
  for (int64_t i = 1; i < t.dim(); ++i) row_numel *= t.size(i);
  // Are the trailing dims one dense block (size-1 dims may have any stride)?
  bool dense = true;
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 1; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) {
      dense = false;
      break;
    }
    expected *= t.size(i);
  }
  // Reading rows through any dim-0 stride is fine (even overlapping rows, e.g. an expanded x).
  if (dense && n0 > 0 && row_numel > 0) return {t, n0 == 1 ? row_numel : t.stride(0), row_numel};
  Tensor c = t.contiguous();
  return {c, row_numel, row_numel};
}

namespace {

void check_dest_range(const int64_t* dest, int64_t n, int64_t num_rows, const char* op) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= (dest[i] >= -1) & (dest[i] < num_rows);
  TORCH_CHECK(ok, op, ": dest_rows holds a row outside [-1, ", num_rows, ")");
}

// at::empty for an op output that is about to be written in full. A large output that comes back as
// fresh, never-touched pages (glibc mmaps blocks > 32 MiB and unmaps them on free, so every call
// page-faults its output again: ~2 us per 4 KiB page here) asks for transparent huge pages, so first
// touch faults 2 MiB at a time: ~4x cheaper. Memory the allocator reuses (already resident) is left
// alone: the hint would only make khugepaged busy. A hint only; MOE_NO_THP_HINT=1 turns it off.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool disabled = [] {
    const char* env = std::getenv("MOE_NO_THP_HINT");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr()), e = b + t.nbytes();
  const uintptr_t hb = (b + kHuge - 1) & ~(kHuge - 1), he = e & ~(kHuge - 1);
  if (!disabled && t.nbytes() >= (size_t(8) << 20) && he > hb) {
    unsigned char resident = 1;
    if (mincore(reinterpret_cast<void*>(hb), 4096, &resident) == 0 && (resident & 1) == 0)
      (void)madvise(reinterpret_cast<void*>(hb), he - hb, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------- row-kernel choice

namespace {

const CpuRowKernels kBaseKernels{"base",         &base::gather_sum, &base::unpermute_bwd,
                                 &base::permute, &base::swiglu_fwd, &base::swiglu_bwd, &base::combine_rows, &base::gate_rows,
                                 &base::topk_vectors, base::kLanesF, nullptr};

bool cpu_supports_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  // FMA for the expert GEMM (gemm_cpu_kernels.h); every AVX2 CPU in use has it
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<const CpuRowKernels*>& active_kernels() {
  static std::atomic<const CpuRowKernels*> active{[] {
    const char* env = std::getenv("MOE_CPU_ISA");
    if (env != nullptr && std::string(env) == "base") return &kBaseKernels;
    const CpuRowKernels* avx2 = avx2_row_kernels();
    return avx2 != nullptr && cpu_supports_avx2() ? avx2 : &kBaseKernels;
  }()};
  return active;
}

}  // namespace

const CpuRowKernels& cpu_row_kernels() { return *active_kernels().load(std::memory_order_relaxed); }

bool set_cpu_isa(const std::string& isa) {
  if (isa == "base") {
    active_kernels().store(&kBaseKernels);
    return true;
  }
  if (isa == "avx2" && avx2_row_kernels() != nullptr && cpu_supports_avx2()) {
    active_kernels().store(avx2_row_kernels());
    return true;
  }
  return false;
}

bool cpu_has_avx512f() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool own_gemm_by_default(const char* env, bool avx512f) {
  if (env != nullptr && std::string(env) == "aten") return false;
  if (env != nullptr && std::string(env) == "own") return true;
  // The own GEMM is AVX2: 8 fp32 lanes per FMA. On an AVX-512 CPU ATen's BLAS (MKL, oneDNN) runs
  // 16-lane FMAs, on cores with two 512-bit FMA units twice the own kernel's peak, and the own GEMM was
  // only measured faster than MKL on AVX2 CPUs; so there ATen's stays the default.
  return !avx512f;
}

namespace {
std::atomic<bool>& own_gemm_wanted() {
  static std::atomic<bool> wanted{own_gemm_by_default(std::getenv("MOE_CPU_GEMM"), cpu_has_avx512f())};
  return wanted;
}
}  // namespace

bool own_gemm_in_use() {
  return own_gemm_wanted().load(std::memory_order_relaxed) && cpu_row_kernels().sgemm != nullptr;
}

const char* cpu_gemm() { return own_gemm_in_use() ? "own" : "aten"; }

bool set_cpu_gemm(const std::string& name) {
  if (name != "own" && name != "aten") return false;
  own_gemm_wanted().store(name == "own");
  return name == "aten" || cpu_row_kernels().sgemm != nullptr;
}

// --------------------------------------------------------------------------------- routing index

std::tuple<Tensor, Tensor, Tensor> routing_index_cpu(const Tensor& expert_indices, int64_t num_experts,
                                                    std::optional<int64_t> capacity,
                                                    const std::optional<Tensor>& priority) {
  TORCH_CHECK(expert_indices.dim() == 2, "routing_index: expert_indices must be [T, k], got ",
              expert_indices.sizes());
  TORCH_CHECK(!at::isFloatingType(expert_indices.scalar_type()) && expert_indices.scalar_type() != at::kBool,
              "routing_index: expert_indices must be an integer tensor, got ", expert_indices.scalar_type());
  TORCH_CHECK(num_experts >= 1, "routing_index: num_experts must be >= 1");
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0, "routing_index: capacity must be >= 0");
  const int64_t T = expert_indices.size(0), k = expert_indices.size(1), n = T * k, E = num_experts;
  const Tensor ei = expert_indices.to(at::kLong).contiguous();
  const int64_t* ex = ei.const_data_ptr<int64_t>();
  const auto lopts = ei.options();
  Tensor dest = at::empty({T, k}, lopts);
  int64_t* dst = dest.mutable_data_ptr<int64_t>();

  // Pass 1: per-chunk histograms (chunk = contiguous range of flat pairs).
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 16384));
  const int64_t chunk = (n + nchunks - 1) / std::max<int64_t>(nchunks, 1);
  std::vector<int64_t> hist(static_cast<size_t>(nchunks * E), 0);
  std::vector<char> bad(static_cast<size_t>(nchunks), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * E;
      bool ok = true;
      for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) {
        const int64_t e = ex[i];
        const bool in = (e >= 0) & (e < E);
        ok &= in;
        h[in ? e : 0] += in;
      }
      bad[c] = !ok;
    }
  });
  for (char b : bad) TORCH_CHECK(!b, "routing_index: expert index outside [0, ", E, ")");

  // Per-(chunk, expert) base ranks; counts; kept counts; expert offsets in the permuted buffer.
  std::vector<int64_t> counts(static_cast<size_t>(E), 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t* h = hist.data() + c * E;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t v = h[e];
      h[e] = counts[e];  // exclusive prefix over chunks
      counts[e] += v;
    }
  }
  const int64_t cap = capacity.has_value() ? *capacity : n;
  Tensor tpe = at::empty({E}, lopts);
  int64_t* kept = tpe.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offset(static_cast<size_t>(E));
  int64_t num_rows = 0;
  bool overflow = false;
  for (int64_t e = 0; e < E; ++e) {
    kept[e] = std::min(counts[e], cap);
    overflow |= counts[e] > cap;
    offset[e] = num_rows;
    num_rows += kept[e];
  }
  Tensor src = at::empty({num_rows}, lopts);
  int64_t* srcp = src.mutable_data_ptr<int64_t>();

  const bool by_priority = overflow && priority.has_value();
  if (!by_priority) {
    // Pass 2: each chunk places its pairs; the rank of a pair in its expert is its position
    // among that expert's pairs in flat order; ranks >= capacity are dropped.
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<int64_t> run(static_cast<size_t>(E));
      for (int64_t c = cb; c < ce; ++c) {
        std::copy(hist.begin() + c * E, hist.begin() + (c + 1) * E, run.begin());
        for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) {
          const int64_t e = ex[i];
          const int64_t r = run[e]++;
          if (r < kept[e]) {
            const int64_t row = offset[e] + r;
            dst[i] = row;
            srcp[row] = i / k;
          } else {
            dst[i] = -1;
          }
        }
      }
    });
    return {tpe, dest, src};
  }

  // Priority path. Pass 2: stable bucket of the flat pair indices by expert.
  const Tensor& pr_in = *priority;
  TORCH_CHECK(pr_in.numel() == n, "routing_index: priority must have T * k = ", n, " elements, got ",
              pr_in.numel());
  const Tensor pr = pr_in.reshape({-1}).to(pr_in.options().dtype(at::kFloat)).contiguous();
  const float* prp = pr.const_data_ptr<float>();
  std::vector<int64_t> bucket_start(static_cast<size_t>(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) bucket_start[e + 1] = bucket_start[e] + counts[e];
  std::vector<int64_t> order(static_cast<size_t>(n));
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int64_t> run(static_cast<size_t>(E));
    for (int64_t c = cb; c < ce; ++c) {
      for (int64_t e = 0; e < E; ++e) run[e] = bucket_start[e] + hist[c * E + e];
      for (int64_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i) order[run[ex[i]]++] = i;
    }
  });
  // Pass 3, per expert: an overflowing expert keeps its `cap` pairs of highest (key, -position)
  // (nth_element: linear-time selection), then every expert lays out its kept pairs in token order.
  std::vector<char> keep(static_cast<size_t>(n), 0);
  at::parallel_for(0, E, 1, [&](int64_t eb, int64_t ee) {
    std::vector<std::pair<uint32_t, int64_t>> sel;
    for (int64_t e = eb; e < ee; ++e) {
      const int64_t* b = order.data() + bucket_start[e];
      const int64_t cnt = counts[e];
      const bool all = cnt <= cap;
      if (!all && cap > 0) {
        sel.resize(static_cast<size_t>(cnt));
        for (int64_t p = 0; p < cnt; ++p) sel[p] = {priority_key(prp[b[p]]), b[p]};
        std::nth_element(sel.begin(), sel.begin() + (cap - 1), sel.end(),
                         [](const std::pair<uint32_t, int64_t>& a, const std::pair<uint32_t, int64_t>& c) {
                           return a.first > c.first || (a.first == c.first && a.second < c.second);
                         });
        for (int64_t p = 0; p < cap; ++p) keep[sel[p].second] = 1;
      }
      int64_t row = offset[e];
      for (int64_t p = 0; p < cnt; ++p) {
        const int64_t i = b[p];
        if (all || keep[i]) {
          dst[i] = row;
          srcp[row] = i / k;
          ++row;
        } else {
          dst[i] = -1;
        }
      }
    }
  });
  return {tpe, dest, src};
}

// --------------------------------------------------------------------------------------- permute

Tensor permute_cpu(const Tensor& x, const Tensor& dest_rows, int64_t num_rows) {
  const Tensor dest = checked_dest_rows(dest_rows, "permute");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) == dest.size(0), "permute: x must have T = ", dest.size(0),
              " rows, got ", x.sizes());
  TORCH_CHECK(num_rows >= 0, "permute: num_rows must be >= 0");
  const int64_t T = dest.size(0), k = dest.size(1);
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  check_dest_range(dp, T * k, num_rows, "permute");
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = num_rows;
  Tensor out = empty_output(sizes, x.options());
  if (out.numel() == 0) return out;
  const Rows xr = as_rows(x);
  const int64_t es = static_cast<int64_t>(x.element_size());
  cpu_row_kernels().permute(static_cast<const char*>(xr.tensor.const_data_ptr()), xr.row_stride * es, dp, T, k,
                            num_rows, xr.row_numel * es, static_cast<char*>(out.mutable_data_ptr()));
  return out;
}

// ------------------------------------------------------------------------------------- unpermute

namespace {

Tensor weights_as(const Tensor& gate_weights, const Tensor& dest, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(gate_weights.sizes() == dest.sizes(), op, ": gate_weights must be [T, k] = ", dest.sizes(),
              ", got ", gate_weights.sizes());
  TORCH_CHECK(at::isFloatingType(gate_weights.scalar_type()), op, ": gate_weights must be floating point");
  // Like the reference, the weights are rounded to the dtype of y before use.
  return gate_weights.to(dtype).contiguous();
}

}  // namespace

Tensor unpermute_cpu(const Tensor& y, const Tensor& dest_rows, const std::optional<Tensor>& gate_weights) {
  const Tensor dest = checked_dest_rows(dest_rows, "unpermute");
  TORCH_CHECK(y.dim() >= 1, "unpermute: y must have at least one dimension");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "unpermute: y must be floating point, got ", y.scalar_type());
  const int64_t T = dest.size(0), k = dest.size(1), R = y.size(0);
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  check_dest_range(dp, T * k, R, "unpermute");
  std::vector<int64_t> sizes = y.sizes().vec();
  sizes[0] = T;
  Tensor out = empty_output(sizes, y.options());
  Tensor w;
  if (gate_weights.has_value()) w = weights_as(*gate_weights, dest, y.scalar_type(), "unpermute");
  if (out.numel() == 0) return out;
  const Rows yr = as_rows(y);
  cpu_row_kernels().gather_sum(y.scalar_type(), yr.tensor.const_data_ptr(), yr.row_stride, dp,
                               w.defined() ? w.const_data_ptr() : nullptr, T, k, yr.row_numel, out.mutable_data_ptr());
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_cpu(const Tensor& grad_out, const Tensor& y, const Tensor& dest_rows,
                                                  const Tensor& gate_weights) {
  const Tensor dest = checked_dest_rows(dest_rows, "unpermute_backward");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "unpermute_backward: y must be floating point");
  const int64_t T = dest.size(0), k = dest.size(1), R = y.size(0);
  TORCH_CHECK(grad_out.dim() == y.dim() && grad_out.size(0) == T &&
                  grad_out.sizes().slice(1) == y.sizes().slice(1),
              "unpermute_backward: grad_out must be [T, ...] = [", T, ", ", y.sizes().slice(1), "], got ",
              grad_out.sizes());
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  check_dest_range(dp, T * k, R, "unpermute_backward");
  const Tensor w = weights_as(gate_weights, dest, y.scalar_type(), "unpermute_backward");
  const Tensor g = grad_out.to(y.scalar_type());
  Tensor grad_y = empty_output(y.sizes(), y.options());
  const at::ScalarType acc_dtype = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_w = at::empty({T, k}, y.options().dtype(acc_dtype));
  const int64_t row_numel = y.numel() / std::max<int64_t>(R, 1);
  if (T * k > 0 && (row_numel == 0 || R == 0)) grad_w.zero_();
  if (y.numel() > 0 && T > 0) {
    const Rows gr = as_rows(g);
    const Rows yr = as_rows(y);
    cpu_row_kernels().unpermute_bwd(y.scalar_type(), gr.tensor.const_data_ptr(), gr.row_stride,
                                    yr.tensor.const_data_ptr(), yr.row_stride, dp, w.const_data_ptr(), T, k,
                                    yr.row_numel, R, grad_y.mutable_data_ptr(), grad_w.mutable_data_ptr());
  }
  return {grad_y, grad_w.to(gate_weights.scalar_type())};
}

}  // namespace moe
