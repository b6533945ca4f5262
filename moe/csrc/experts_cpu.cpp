// CPU kernels of the grouped expert SwiGLU ops (see dispatch.h and moe/ops/reference.py for the semantics; the
// PyTorch reference is moe/nn/experts.py `_GroupedSwiGLU`).
//
// E SwiGLU FFNs over the expert-sorted rows x [N, d] (segment e = counts[e] consecutive rows):
//   h13 = x_e @ w13[e]^T,  act = silu(h13[:, :h]) * h13[:, h:],  out = act @ w2[e]^T.
//
// How the work is split over the T threads: the reference runs one multi-threaded GEMM per expert,
// and a GEMM of a few hundred rows splits poorly over threads (each thread packs the same weights and
// waits for the others; on the 2-core dev VM 2 threads reach ~1.7x one thread on these shapes). Here
// every thread runs single-threaded GEMMs on its own share instead (BLAS called from inside a
// parallel region runs sequentially):
// - row phase (forward; backward's grad_act, grad_h13, grad_x): the N rows are cut into T equal
//   contiguous ranges; a thread walks the expert segments its range overlaps and, per piece, runs
//   GEMM -> fused SwiGLU (experts_cpu_kernels.h) -> GEMM (cutting pieces smaller, to stay in L2,
//   measured slower: each GEMM call packs the expert's weights again);
// - weight phase (grad_w13, grad_w2: a sum over an expert's rows): each thread computes a block of
//   output rows of every expert's weight gradient, over the expert's full segment.
// Both phases give every thread the same FLOPs whatever the expert counts; no atomics, no partial sums.
// - backward with many small experts (64 or 128 of ~100-300 rows): each thread takes a contiguous
//   range of whole experts, cut where its rows come within 3% of an even share, and runs one expert's
//   five GEMMs back to back, so the expert's grad_out, grad_h13 and x rows are still in cache for
//   its weight gradients (the two phases above read them from memory twice). Measured at 128
//   experts of hidden 128, T=2048, 2 threads: the op's forward + backward 163 -> 153 ms.
// The routed op (routed_swiglu, at the end) runs the same phases on token rows: it gathers each
// piece's rows itself and adds the gated outputs back into the tokens' rows (permute and unpermute
// folded in).
//
// The GEMMs: in fp32 on the AVX2 build the op's own (gemm_cpu_kernels.h), which reads token rows in
// place through the routing index (no gathered copies), writes routed outputs and input gradients
// straight into the tokens' accumulator rows (no combine pass), prefetches the cold expert weights a
// panel ahead and streams the weight gradients; ATen's GEMM (on gathered copies) otherwise, and where
// MOE_CPU_GEMM=aten. At 128 experts of hidden 128, T=2048, d=512, 2 threads, the routed op's forward +
// backward takes 0.82x the time with the own GEMM (BENCHMARKS.md, issue 20, fifth session): MKL's
// packing of 128 experts' cold weights, its clearing of the fresh weight gradients, the row gathers and
// the combine were what the MoE spent beyond the dense FFN's GEMMs.
#include "dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace moe {

using at::Tensor;

namespace {

// Below this many FLOPs per thread, fewer threads: a parallel region costs a few microseconds.
constexpr int64_t kMinFlopsPerThread = int64_t(1) << 21;

struct Shapes {
  int64_t N, d, E, h;
};

Shapes check_shapes(const Tensor& x, const Tensor& w13, const Tensor& w2, const Tensor& counts, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, d], got ", x.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, op, ": w13 must be [E, 2h, d] and w2 [E, d, h], got ", w13.sizes(),
              " and ", w2.sizes());
  const int64_t N = x.size(0), d = x.size(1), E = w13.size(0), h = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * h && w13.size(2) == d && w2.size(0) == E && w2.size(1) == d, op,
              ": shapes do not match: x ", x.sizes(), ", w13 ", w13.sizes(), ", w2 ", w2.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && w13.scalar_type() == x.scalar_type() &&
                  w2.scalar_type() == x.scalar_type(),
              op, ": x, w13 and w2 must have the same floating dtype, got ", x.scalar_type(), ", ", w13.scalar_type(),
              ", ", w2.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == E, op, ": counts must be [E] = [", E, "], got ",
              counts.sizes());
  TORCH_CHECK(!at::isFloatingType(counts.scalar_type()) && counts.scalar_type() != at::kBool, op,
              ": counts must be an integer tensor");
  return {N, d, E, h};
}

// Segment starts: offs[e] .. offs[e + 1] are expert e's rows; checks the counts cover the N rows.
std::vector<int64_t> segment_offsets(const Tensor& counts, int64_t N, const char* op) {
  const Tensor c = counts.to(at::kCPU, at::kLong).contiguous();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  std::vector<int64_t> offs(static_cast<size_t>(c.numel()) + 1, 0);
  for (int64_t e = 0; e < c.numel(); ++e) {
    TORCH_CHECK(cp[e] >= 0, op, ": counts must be >= 0");
    offs[e + 1] = offs[e] + cp[e];
  }
  TORCH_CHECK(offs.back() == N, op, ": counts sum to ", offs.back(), " but x has ", N, " rows");
  return offs;
}

// Runs f(part, parts) for part in [0, parts) on up to `parts` threads. The worker threads do not
// inherit the caller's thread-local dispatch state, so each excludes autograd itself: the GEMMs write
// into views of fresh outputs (out=) and must not be recorded, even when the inputs require grad.
template <typename F>
void run_parts(int64_t parts, const F& f) {
  if (parts <= 1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(int64_t(0), int64_t(1));
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = b; p < e; ++p) f(p, parts);
  });
}

int64_t num_parts(int64_t flops, int64_t max_parts) {
  const int64_t by_work = std::max<int64_t>(1, flops / kMinFlopsPerThread);
  return std::max<int64_t>(1, std::min({static_cast<int64_t>(at::get_num_threads()), by_work, max_parts}));
}

// Calls f(e, lo, hi) for each expert segment overlapping rows [r0, r1), clipped to it.
template <typename F>
void for_pieces(const std::vector<int64_t>& offs, int64_t r0, int64_t r1, const F& f) {
  const int64_t E = static_cast<int64_t>(offs.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = std::max(r0, offs[e]), hi = std::min(r1, offs[e + 1]);
    if (lo < hi) f(e, lo, hi);
  }
}

// Scratch memory of the backward (grad_act and grad_h13, never returned), kept per calling thread and
// reused across calls (grow-only, up to the largest layer seen): fresh pages for these large
// temporaries would cost page faults on every call (glibc maps blocks over 32 MiB anew each time).
// Returns one [rows, cols] tensor per entry of `shapes`, one after the other in the buffer.
std::vector<Tensor> scratch(const std::vector<std::pair<int64_t, int64_t>>& shapes, const at::TensorOptions& opts) {
  thread_local Tensor buffer;
  constexpr int64_t kAlign = 64;
  const int64_t es = static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
  int64_t bytes = 0;
  for (const auto& rc : shapes) bytes += (rc.first * rc.second * es + kAlign - 1) / kAlign * kAlign;
  if (!buffer.defined() || buffer.nbytes() < static_cast<size_t>(bytes + kAlign)) {
    buffer = Tensor();  // free the old one first
    buffer = at::empty({bytes + kAlign}, opts.dtype(at::kByte));
  }
  char* base = static_cast<char*>(buffer.mutable_data_ptr());
  base += (kAlign - reinterpret_cast<uintptr_t>(base) % kAlign) % kAlign;
  std::vector<Tensor> out;
  for (const auto& rc : shapes) {
    out.push_back(at::from_blob(base, {rc.first, rc.second}, opts));
    base += (rc.first * rc.second * es + kAlign - 1) / kAlign * kAlign;
  }
  return out;
}

// Whole experts per thread: boundaries b[0] = 0 < ... < b[parts] = E of `parts` contiguous expert
// ranges, b[p] the expert boundary nearest row N p / parts. Empty (use the row split instead) when
// that leaves a thread more than kMaxOwnerImbalance over its even share of rows: with a few large
// experts (8 experts top-2) a whole-expert split is uneven, with many small ones it is within ~1%.
constexpr double kMaxOwnerImbalance = 0.03;

std::vector<int64_t> expert_ranges(const std::vector<int64_t>& offs, int64_t parts) {
  const int64_t E = static_cast<int64_t>(offs.size()) - 1, N = offs.back();
  if (N == 0) return {};
  if (parts <= 1) return {0, E};
  std::vector<int64_t> b(static_cast<size_t>(parts) + 1, 0);
  b[parts] = E;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = N * p / parts;
    // first boundary at or past the target, then the nearer of it and the one before
    int64_t e = static_cast<int64_t>(std::lower_bound(offs.begin(), offs.end(), target) - offs.begin());
    if (e > 0 && target - offs[e - 1] < offs[e] - target) --e;
    b[p] = std::max(b[p - 1], std::min(e, E));
  }
  const double share = static_cast<double>(N) / static_cast<double>(parts);
  for (int64_t p = 0; p < parts; ++p) {
    if (static_cast<double>(offs[b[p + 1]] - offs[b[p]]) > share * (1.0 + kMaxOwnerImbalance)) return {};
  }
  return b;
}

// The most rows of one expert among experts [e0, e1).
int64_t max_segment(const std::vector<int64_t>& offs, int64_t e0, int64_t e1) {
  int64_t m = 0;
  for (int64_t e = e0; e < e1; ++e) m = std::max(m, offs[e + 1] - offs[e]);
  return m;
}

// The routed op's rows, from the routing index: the token, the (token, slot) pair and the gate (in the
// accumulation type) of each expert-sorted row r < N. dest_rows [T, k] must map the kept pairs one to
// one onto rows [0, N) (-1: dropped), as moe.ops.build_routing_index does.
struct RoutedRows {
  std::vector<int64_t> tokens, pairs;
  Tensor gates;  // [N], fp32 (fp64 for double x)
};

RoutedRows routed_rows(const Tensor& dest_rows, const Tensor& gate_weights, int64_t T, int64_t N,
                       at::ScalarType acc_dtype, const char* op) {
  const Tensor dest = checked_dest_rows(dest_rows, op);
  TORCH_CHECK(dest.size(0) == T, op, ": dest_rows must have a row per token of x (", T, "), got ", dest.sizes());
  TORCH_CHECK(gate_weights.sizes() == dest.sizes() && at::isFloatingType(gate_weights.scalar_type()), op,
              ": gate_weights must be floating [T, k] = ", dest.sizes(), ", got ", gate_weights.sizes(), " ",
              gate_weights.scalar_type());
  const int64_t pairs = dest.numel(), k = dest.size(1);
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  RoutedRows out{std::vector<int64_t>(N), std::vector<int64_t>(N, -1), at::empty({N}, gate_weights.options().dtype(acc_dtype))};
  bool ok = true;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t r = dp[i];
    if (r < 0) {
      ok &= r == -1;
      continue;
    }
    if (r >= N || out.pairs[r] != -1) {
      ok = false;
      break;
    }
    out.pairs[r] = i;
  }
  for (int64_t r = 0; r < N && ok; ++r) ok &= out.pairs[r] >= 0;
  TORCH_CHECK(ok, op, ": dest_rows must map the kept (token, slot) pairs one to one onto the rows [0, ", N,
              ") that counts sums to (-1 for dropped pairs)");
  const Tensor gw = gate_weights.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "moe_routed_gates", [&] {
    const scalar_t* g = gw.const_data_ptr<scalar_t>();
    scalar_t* o = out.gates.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < N; ++r) {
      out.tokens[r] = out.pairs[r] / k;
      o[r] = g[out.pairs[r]];
    }
  });
  return out;
}

at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// fp32 with the compiled GEMM (the AVX2 build): the GEMMs read token rows in place through their row
// indices and write the routed outputs straight into the tokens' accumulator rows (gemm_cpu_kernels.h).
// Otherwise (fp64, bf16, fp16, the baseline build) ATen's GEMM on gathered copies.
bool compiled_gemm(const CpuRowKernels& k, at::ScalarType dtype) {
  return dtype == at::kFloat && k.sgemm != nullptr && own_gemm_in_use();
}

const float* f32(const Tensor& t) { return t.const_data_ptr<float>(); }
float* f32_mut(const Tensor& t) { return t.mutable_data_ptr<float>(); }

// A 2-D fp32 view as a GEMM operand: rows with unit column stride, or the transpose of such.
bool as_operand(const Tensor& t, GemmOperand& op) {
  if (t.stride(1) == 1 || t.size(1) == 1) {
    op = GemmOperand{f32(t), t.stride(0), false, nullptr};
    return true;
  }
  if (t.stride(0) == 1 || t.size(0) == 1) {
    op = GemmOperand{f32(t), t.stride(1), true, nullptr};
    return true;
  }
  return false;
}

// out = a @ b (2-D views, out with unit column stride): the own GEMM where `own`, else ATen's. stream:
// out is written once and not read soon (weight gradients).
void mm(const CpuRowKernels& k, bool own, Tensor& out, const Tensor& a, const Tensor& b, bool stream = false) {
  GemmOperand ga{}, gb{};
  if (own && out.stride(1) == 1 && as_operand(a, ga) && as_operand(b, gb)) {
    k.sgemm(a.size(0), b.size(1), a.size(1), ga, gb, GemmOutput{f32_mut(out), out.stride(0), nullptr, nullptr, false, stream});
  } else {
    at::mm_out(out, a, b);
  }
}

// dst rows [m, d] (contiguous) <- x rows rows[0..m) (x contiguous [T, d])
void gather_rows(const char* x, const int64_t* rows, int64_t m, int64_t row_bytes, char* dst) {
  for (int64_t r = 0; r < m; ++r) std::memcpy(dst + r * row_bytes, x + rows[r] * row_bytes, row_bytes);
}

// The forward over expert-sorted rows. routed == nullptr: x [N, d] holds the rows, out is [N, d]. Else x
// is [T, d] token rows: each piece's rows are gathered into a per-thread buffer (routed->tokens), and the
// expert outputs are not kept but added, times their gates, into per-thread [T, d] accumulators (in the
// accumulation type) summed into out [T, d] at the end.
std::tuple<Tensor, Tensor, Tensor> forward_rows(const Tensor& x_in, const RoutedRows* routed, const Shapes& s,
                                                const std::vector<int64_t>& offs, const Tensor& w13_in,
                                                const Tensor& w2_in) {
  const Tensor x = x_in.contiguous(), w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const auto opts = x.options();
  const int64_t T = x.size(0);
  // (plain at::empty: the transparent-huge-page hint of the dispatch ops' outputs made these timings
  // vary more here, without a gain)
  Tensor h13 = at::empty({s.N, 2 * s.h}, opts), act = at::empty({s.N, s.h}, opts);
  if (s.N == 0 || s.d == 0 || s.h == 0) {
    h13.zero_();
    act.zero_();
    return {at::zeros({routed ? T : s.N, s.d}, opts), h13, act};
  }
  const CpuRowKernels& k = cpu_row_kernels();
  const at::ScalarType dtype = x.scalar_type();
  const int64_t es = static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* h13p = static_cast<char*>(h13.mutable_data_ptr());
  char* actp = static_cast<char*>(act.mutable_data_ptr());
  const int64_t max_piece = max_segment(offs, 0, static_cast<int64_t>(offs.size()) - 1);
  const int64_t parts = num_parts(6 * s.N * s.d * s.h, s.N);
  const int64_t* tokens = routed ? routed->tokens.data() : nullptr;
  const char* gates = routed ? static_cast<const char*>(routed->gates.const_data_ptr()) : nullptr;
  const int64_t ges = routed ? static_cast<int64_t>(routed->gates.element_size()) : 0;
  Tensor out = routed ? at::zeros({parts, T, s.d}, opts.dtype(acc_type(dtype))) : at::empty({s.N, s.d}, opts);
  const bool own = compiled_gemm(k, dtype);
  run_parts(parts, [&](int64_t p, int64_t) {
    const int64_t mp = std::min(max_piece, s.N / parts + 1);
    const std::vector<Tensor> buf = routed && !own ? scratch({{mp, s.d}, {mp, s.d}}, opts) : std::vector<Tensor>{};
    for_pieces(offs, s.N * p / parts, s.N * (p + 1) / parts, [&](int64_t e, int64_t lo, int64_t hi) {
      const int64_t m = hi - lo;
      if (own) {  // h13 = x rows @ w13[e]^T; SwiGLU; out rows (or the tokens' rows += gate *) act @ w2[e]^T
        k.sgemm(m, 2 * s.h, s.d, GemmOperand{routed ? f32(x) : f32(x) + lo * s.d, s.d, false, routed ? tokens + lo : nullptr},
                GemmOperand{f32(w13) + e * 2 * s.h * s.d, s.d, true, nullptr},
                GemmOutput{f32_mut(h13) + lo * 2 * s.h, 2 * s.h, nullptr, nullptr, false, false});
        k.swiglu_fwd(dtype, h13p + lo * 2 * s.h * es, 2 * s.h, m, s.h, actp + lo * s.h * es, s.h);
        const GemmOutput to = routed ? GemmOutput{f32_mut(out) + p * T * s.d, s.d, tokens + lo, f32(routed->gates) + lo, true, false}
                                     : GemmOutput{f32_mut(out) + lo * s.d, s.d, nullptr, nullptr, false, false};
        k.sgemm(m, s.d, s.h, GemmOperand{f32(act) + lo * s.h, s.h, false, nullptr},
                GemmOperand{f32(w2) + e * s.d * s.h, s.h, true, nullptr}, to);
        return;
      }
      Tensor x_rows = routed ? buf[0].narrow(0, 0, m) : x.narrow(0, lo, m);
      if (routed) gather_rows(xp, tokens + lo, m, s.d * es, static_cast<char*>(x_rows.mutable_data_ptr()));
      Tensor h13_rows = h13.narrow(0, lo, m), act_rows = act.narrow(0, lo, m);
      at::mm_out(h13_rows, x_rows, w13.select(0, e).t());
      k.swiglu_fwd(dtype, h13p + lo * 2 * s.h * es, 2 * s.h, m, s.h, actp + lo * s.h * es, s.h);
      Tensor out_rows = routed ? buf[1].narrow(0, 0, m) : out.narrow(0, lo, m);
      at::mm_out(out_rows, act_rows, w2.select(0, e).t());
      if (routed) {
        k.combine_rows(dtype, out_rows.const_data_ptr(), tokens + lo, gates + lo * ges, m, s.d,
                       out.select(0, p).mutable_data_ptr());
      }
    });
  });
  if (routed) out = (parts == 1 ? out.select(0, 0) : out.sum(0)).to(dtype);
  return {out, h13, act};
}

// What a routed backward adds: the gathered rows' tokens, their gates, and where each row's gate
// gradient goes (grad_gates [N], accumulation type).
struct RoutedGrad {
  const RoutedRows& rows;
  Tensor grad_gates;
};

// The backward with whole experts per thread (`owners` from expert_ranges): each thread runs one
// expert's five GEMMs back to back, so its grad_out, x and grad_h13 rows are still in cache for the
// weight gradients. routed == nullptr: go, x and grad_x are [N, d], grad_x written in place. Else go
// and x are [T, d], gathered per expert; the gate gradients and the gates' scaling are taken from the
// activation gradient (gate_rows), and grad_x is [parts, T, d] in the accumulation type, thread p
// adding each row's input gradient to its token's row of grad_x[p].
void backward_whole_experts(const Tensor& go, const Tensor& x, const RoutedGrad* routed, const Tensor& w13,
                            const Tensor& w2, const Tensor& h13, const Tensor& act, const Shapes& s,
                            const std::vector<int64_t>& offs, const std::vector<int64_t>& owners,
                            const Tensor& grad_x, const Tensor& grad_w13, const Tensor& grad_w2) {
  const CpuRowKernels& k = cpu_row_kernels();
  const at::ScalarType dtype = x.scalar_type();
  const auto opts = x.options();
  const int64_t es = static_cast<int64_t>(x.element_size());
  const char* h13p = static_cast<const char*>(h13.const_data_ptr());
  const char* actp = static_cast<const char*>(act.const_data_ptr());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const char* gop = static_cast<const char*>(go.const_data_ptr());
  const int64_t* tokens = routed ? routed->rows.tokens.data() : nullptr;
  const char* gates = routed ? static_cast<const char*>(routed->rows.gates.const_data_ptr()) : nullptr;
  char* grad_gates = routed ? static_cast<char*>(routed->grad_gates.mutable_data_ptr()) : nullptr;
  const int64_t ges = routed ? static_cast<int64_t>(routed->grad_gates.element_size()) : 0;
  const bool own = compiled_gemm(k, dtype);
  run_parts(static_cast<int64_t>(owners.size()) - 1, [&](int64_t p, int64_t) {
    const int64_t mr = max_segment(offs, owners[p], owners[p + 1]);
    std::vector<std::pair<int64_t, int64_t>> shapes{{mr, s.h}, {mr, 2 * s.h}};
    if (routed && own) shapes.push_back({mr, s.h});  // act rows times the gates
    if (routed && !own) shapes.insert(shapes.end(), {{mr, s.d}, {mr, s.d}, {mr, s.d}});  // x, grad_x, grad_out rows
    const std::vector<Tensor> buf = scratch(shapes, opts);
    char* bap = static_cast<char*>(buf[0].mutable_data_ptr());
    char* bgp = static_cast<char*>(buf[1].mutable_data_ptr());
    for (int64_t e = owners[p]; e < owners[p + 1]; ++e) {
      const int64_t lo = offs[e], c = offs[e + 1] - offs[e];
      Tensor gw13 = grad_w13.select(0, e), gw2 = grad_w2.select(0, e);
      if (c == 0) {
        gw13.zero_();
        gw2.zero_();
        continue;
      }
      if (own) {  // the five GEMMs reading x and grad_out rows in place (routed: through the tokens)
        const int64_t* tok = routed ? tokens + lo : nullptr;
        const float* x_rows = routed ? f32(x) : f32(x) + lo * s.d;
        const float* go_rows = routed ? f32(go) : f32(go) + lo * s.d;
        const float* gh = f32(buf[1]);
        const float* act_rows = f32(act) + lo * s.h;
        k.sgemm(c, s.h, s.d, GemmOperand{go_rows, s.d, false, tok}, GemmOperand{f32(w2) + e * s.d * s.h, s.h, false, nullptr},
                GemmOutput{f32_mut(buf[0]), s.h, nullptr, nullptr, false, false});
        if (routed) {  // the gates' gradients; grad_act and a copy of act times the gates (grad_w2 = go^T (gate act))
          float* gated_act = f32_mut(buf[2]);
          std::memcpy(gated_act, act_rows, static_cast<size_t>(c * s.h) * sizeof(float));
          k.gate_rows(dtype, bap, act_rows, gates + lo * ges, c, s.h, grad_gates + lo * ges, gated_act, s.h);
          act_rows = gated_act;
        }
        k.swiglu_bwd(dtype, bap, s.h, h13p + lo * 2 * s.h * es, 2 * s.h, c, s.h, bgp, 2 * s.h);
        const GemmOutput gx = routed ? GemmOutput{f32_mut(grad_x) + p * x.size(0) * s.d, s.d, tok, nullptr, true, false}
                                     : GemmOutput{f32_mut(grad_x) + lo * s.d, s.d, nullptr, nullptr, false, false};
        k.sgemm(c, s.d, 2 * s.h, GemmOperand{gh, 2 * s.h, false, nullptr},
                GemmOperand{f32(w13) + e * 2 * s.h * s.d, s.d, false, nullptr}, gx);
        k.sgemm(2 * s.h, s.d, c, GemmOperand{gh, 2 * s.h, true, nullptr}, GemmOperand{x_rows, s.d, false, tok},
                GemmOutput{f32_mut(gw13), s.d, nullptr, nullptr, false, true});
        k.sgemm(s.d, s.h, c, GemmOperand{go_rows, s.d, true, tok}, GemmOperand{act_rows, s.h, false, nullptr},
                GemmOutput{f32_mut(gw2), s.h, nullptr, nullptr, false, true});
        continue;
      }
      Tensor ga = buf[0].narrow(0, 0, c), gh = buf[1].narrow(0, 0, c);
      Tensor x_e = routed ? buf[2].narrow(0, 0, c) : x.narrow(0, lo, c);
      Tensor gx_e = routed ? buf[3].narrow(0, 0, c) : grad_x.narrow(0, lo, c);
      Tensor go_e = routed ? buf[4].narrow(0, 0, c) : go.narrow(0, lo, c);
      if (routed) {
        gather_rows(xp, tokens + lo, c, s.d * es, static_cast<char*>(x_e.mutable_data_ptr()));
        gather_rows(gop, tokens + lo, c, s.d * es, static_cast<char*>(go_e.mutable_data_ptr()));
      }
      at::mm_out(ga, go_e, w2.select(0, e));
      if (routed) {  // the gates' gradients, then grad_act and grad_out times the gates
        k.gate_rows(dtype, bap, actp + lo * s.h * es, gates + lo * ges, c, s.h, grad_gates + lo * ges,
                    go_e.mutable_data_ptr(), s.d);
      }
      k.swiglu_bwd(dtype, bap, s.h, h13p + lo * 2 * s.h * es, 2 * s.h, c, s.h, bgp, 2 * s.h);
      at::mm_out(gx_e, gh, w13.select(0, e));
      at::mm_out(gw13, gh.t(), x_e);
      at::mm_out(gw2, go_e.t(), act.narrow(0, lo, c));
      if (routed) {
        k.combine_rows(dtype, gx_e.const_data_ptr(), tokens + lo, nullptr, c, s.d, grad_x.select(0, p).mutable_data_ptr());
      }
    }
  });
}

// The backward with the rows split evenly over the threads (a few large, uneven experts): a row phase
// (grad_act, grad_h13, grad_x) over equal row ranges, then a weight phase in which each thread computes
// a block of output rows of every expert's weight gradients. go, x and grad_x are [N, d]; with routed,
// go holds the gathered grad_out rows (scaled by the gates in place in the row phase, for the weight
// phase) and the gate gradients go to routed->grad_gates.
void backward_row_split(const Tensor& go, const Tensor& x, const RoutedGrad* routed, const Tensor& w13,
                        const Tensor& w2, const Tensor& h13, const Tensor& act, const Shapes& s,
                        const std::vector<int64_t>& offs, const Tensor& grad_x, const Tensor& grad_w13,
                        const Tensor& grad_w2) {
  const CpuRowKernels& k = cpu_row_kernels();
  const at::ScalarType dtype = x.scalar_type();
  const int64_t es = static_cast<int64_t>(x.element_size());
  const char* h13p = static_cast<const char*>(h13.const_data_ptr());
  const char* actp = static_cast<const char*>(act.const_data_ptr());
  const std::vector<Tensor> tmp = scratch({{s.N, s.h}, {s.N, 2 * s.h}}, x.options());
  const Tensor &grad_act = tmp[0], &grad_h13 = tmp[1];
  char* gap = static_cast<char*>(grad_act.mutable_data_ptr());
  char* gh13p = static_cast<char*>(grad_h13.mutable_data_ptr());
  char* gop = routed ? static_cast<char*>(go.mutable_data_ptr()) : nullptr;  // scaled in place: routed only
  const bool own = compiled_gemm(k, dtype);
  const char* gates = routed ? static_cast<const char*>(routed->rows.gates.const_data_ptr()) : nullptr;
  char* grad_gates = routed ? static_cast<char*>(routed->grad_gates.mutable_data_ptr()) : nullptr;
  const int64_t ges = routed ? static_cast<int64_t>(routed->grad_gates.element_size()) : 0;

  // Row phase: grad_act = grad_out @ w2[e]; grad_h13 = SwiGLU backward; grad_x = grad_h13 @ w13[e].
  run_parts(num_parts(6 * s.N * s.d * s.h, s.N), [&](int64_t p, int64_t parts) {
    for_pieces(offs, s.N * p / parts, s.N * (p + 1) / parts, [&](int64_t e, int64_t lo, int64_t hi) {
      const int64_t m = hi - lo;
      Tensor ga_rows = grad_act.narrow(0, lo, m);
      mm(k, own, ga_rows, go.narrow(0, lo, m), w2.select(0, e));
      if (routed) {
        k.gate_rows(dtype, gap + lo * s.h * es, actp + lo * s.h * es, gates + lo * ges, m, s.h,
                    grad_gates + lo * ges, gop + lo * s.d * es, s.d);
      }
      k.swiglu_bwd(dtype, gap + lo * s.h * es, s.h, h13p + lo * 2 * s.h * es, 2 * s.h, m, s.h,
                   gh13p + lo * 2 * s.h * es, 2 * s.h);
      Tensor gx_rows = grad_x.narrow(0, lo, m);
      mm(k, own, gx_rows, grad_h13.narrow(0, lo, m), w13.select(0, e));
    });
  });

  // Weight phase: part p computes rows [2h p / P, 2h (p + 1) / P) of every grad_w13[e] and rows
  // [d p / P, d (p + 1) / P) of every grad_w2[e], each a GEMM over the expert's whole segment.
  const int64_t max_parts = std::min(2 * s.h, s.d);
  run_parts(num_parts(6 * s.N * s.d * s.h, max_parts), [&](int64_t p, int64_t parts) {
    const int64_t j0 = 2 * s.h * p / parts, j1 = 2 * s.h * (p + 1) / parts;
    const int64_t i0 = s.d * p / parts, i1 = s.d * (p + 1) / parts;
    for (int64_t e = 0; e < s.E; ++e) {
      const int64_t lo = offs[e], c = offs[e + 1] - offs[e];
      Tensor gw13 = grad_w13.select(0, e).narrow(0, j0, j1 - j0);
      Tensor gw2 = grad_w2.select(0, e).narrow(0, i0, i1 - i0);
      if (c == 0) {
        gw13.zero_();
        gw2.zero_();
        continue;
      }
      mm(k, own, gw13, grad_h13.narrow(0, lo, c).narrow(1, j0, j1 - j0).t(), x.narrow(0, lo, c), true);
      mm(k, own, gw2, go.narrow(0, lo, c).narrow(1, i0, i1 - i0).t(), act.narrow(0, lo, c), true);
    }
  });
}

std::vector<int64_t> owner_ranges(const Shapes& s, const std::vector<int64_t>& offs) {
  if (s.N == 0 || s.d == 0 || s.h == 0) return {};
  const int64_t parts = num_parts(6 * s.N * s.d * s.h, s.N);
  if (parts > s.E) return {};  // fewer experts than threads: the row split keeps every thread busy
  return expert_ranges(offs, parts);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> grouped_swiglu_cpu(const Tensor& x_in, const Tensor& w13_in, const Tensor& w2_in,
                                                      const Tensor& counts) {
  const Shapes s = check_shapes(x_in, w13_in, w2_in, counts, "grouped_swiglu");
  return forward_rows(x_in, nullptr, s, segment_offsets(counts, s.N, "grouped_swiglu"), w13_in, w2_in);
}

std::tuple<Tensor, Tensor, Tensor> grouped_swiglu_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                                                               const Tensor& w13_in, const Tensor& w2_in,
                                                               const Tensor& counts, const Tensor& h13_in,
                                                               const Tensor& act_in) {
  const Shapes s = check_shapes(x_in, w13_in, w2_in, counts, "grouped_swiglu_backward");
  const std::vector<int64_t> offs = segment_offsets(counts, s.N, "grouped_swiglu_backward");
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && h13_in.dim() == 2 && h13_in.size(0) == s.N &&
                  h13_in.size(1) == 2 * s.h && act_in.dim() == 2 && act_in.size(0) == s.N && act_in.size(1) == s.h,
              "grouped_swiglu_backward: grad_out must be [N, d], h13 [N, 2h] and act [N, h]");
  const at::ScalarType dtype = x_in.scalar_type();
  const Tensor x = x_in.contiguous(), w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const Tensor go = grad_out_in.to(dtype).contiguous(), h13 = h13_in.to(dtype).contiguous(),
               act = act_in.to(dtype).contiguous();
  const auto opts = x.options();
  Tensor grad_x = at::empty({s.N, s.d}, opts);
  Tensor grad_w13 = at::empty(w13.sizes(), opts), grad_w2 = at::empty(w2.sizes(), opts);
  if (s.N == 0 || s.d == 0 || s.h == 0) {
    grad_x.zero_();
    grad_w13.zero_();
    grad_w2.zero_();
    return {grad_x, grad_w13, grad_w2};
  }
  // Many small experts: whole experts per thread; else the row split.
  const std::vector<int64_t> owners = owner_ranges(s, offs);
  if (!owners.empty()) {
    backward_whole_experts(go, x, nullptr, w13, w2, h13, act, s, offs, owners, grad_x, grad_w13, grad_w2);
  } else {
    backward_row_split(go, x, nullptr, w13, w2, h13, act, s, offs, grad_x, grad_w13, grad_w2);
  }
  return {grad_x, grad_w13, grad_w2};
}

// ---- permute, experts and weighted combine in one op: x [T, d] token rows, dest_rows [T, k] and
// gate_weights [T, k] as unpermute takes them (moe.ops RoutingIndex), the expert-sorted segments given
// by counts. The forward gathers each piece's token rows into a small per-thread buffer (x stays in
// cache) instead of reading a materialised [N, d] permuted copy, and adds each expert output row, times
// its gate, into its token's row (per-thread accumulators) instead of writing [N, d] for unpermute to
// read back. The backward gathers grad_out's rows per expert the same way; the gate's gradient
// <grad_out[t], y[r]> is taken as <grad_out[t] @ w2[e], act[r]> from the activation gradient the expert
// backward computes anyway, so the expert outputs y are neither kept nor recomputed; each row's input
// gradient is summed into its token's grad_x row (fp32 per-thread accumulators). A few uneven experts
// (the row split) take permuted copies of x and grad_out and a scatter-add.

std::tuple<Tensor, Tensor, Tensor> routed_swiglu_cpu(const Tensor& x_in, const Tensor& dest_rows,
                                                     const Tensor& gate_weights, const Tensor& w13_in,
                                                     const Tensor& w2_in, const Tensor& counts, int64_t num_rows) {
  const char* op = "routed_swiglu";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [T, d], got ", x_in.sizes());
  // shapes checked as for the permuted rows: an [N, d] view of the same width
  const Shapes s = check_shapes(x_in.new_empty({1, x_in.size(1)}).expand({num_rows, x_in.size(1)}), w13_in, w2_in,
                                counts, op);
  const std::vector<int64_t> offs = segment_offsets(counts, s.N, op);
  const RoutedRows routed = routed_rows(dest_rows, gate_weights, x_in.size(0), s.N, acc_type(x_in.scalar_type()), op);
  return forward_rows(x_in, &routed, s, offs, w13_in, w2_in);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> routed_swiglu_backward_cpu(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& dest_rows, const Tensor& gate_weights,
    const Tensor& w13_in, const Tensor& w2_in, const Tensor& counts, const Tensor& h13_in, const Tensor& act_in) {
  const char* op = "routed_swiglu_backward";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [T, d], got ", x_in.sizes());
  TORCH_CHECK(h13_in.dim() == 2 && act_in.dim() == 2, op, ": h13 must be [N, 2h] and act [N, h]");
  const int64_t T = x_in.size(0), N = h13_in.size(0);
  const Shapes s = check_shapes(x_in.new_empty({1, x_in.size(1)}).expand({N, x_in.size(1)}), w13_in, w2_in, counts, op);
  const std::vector<int64_t> offs = segment_offsets(counts, s.N, op);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && h13_in.size(1) == 2 * s.h && act_in.size(0) == s.N &&
                  act_in.size(1) == s.h,
              op, ": grad_out must be [T, d] like x, h13 [N, 2h] and act [N, h]");
  const at::ScalarType dtype = x_in.scalar_type(), acc_dtype = acc_type(dtype);
  RoutedGrad routed{routed_rows(dest_rows, gate_weights, T, s.N, acc_dtype, op), at::zeros({s.N}, x_in.options().dtype(acc_dtype))};
  const Tensor x = x_in.contiguous(), w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const Tensor go = grad_out_in.to(dtype).contiguous(), h13 = h13_in.to(dtype).contiguous(),
               act = act_in.to(dtype).contiguous();
  const auto opts = x.options();
  Tensor grad_x, grad_w13 = at::empty(w13.sizes(), opts), grad_w2 = at::empty(w2.sizes(), opts);
  const std::vector<int64_t> owners = owner_ranges(s, offs);
  if (s.N == 0 || s.d == 0 || s.h == 0) {
    grad_x = at::zeros({T, s.d}, opts);
    grad_w13.zero_();
    grad_w2.zero_();
  } else if (!owners.empty()) {
    const int64_t parts = static_cast<int64_t>(owners.size()) - 1;
    Tensor acc = at::zeros({parts, T, s.d}, opts.dtype(acc_dtype));  // one grad_x accumulator per thread
    backward_whole_experts(go, x, &routed, w13, w2, h13, act, s, offs, owners, acc, grad_w13, grad_w2);
    grad_x = (parts == 1 ? acc.select(0, 0) : acc.sum(0)).to(dtype);
  } else {
    // a few uneven experts: permuted copies of x and grad_out, the row split, a scatter-add
    const Tensor tokens =
        at::from_blob(const_cast<int64_t*>(routed.rows.tokens.data()), {s.N}, at::TensorOptions().dtype(at::kLong));
    const Tensor x_rows = x.index_select(0, tokens), go_rows = go.index_select(0, tokens);
    Tensor gx_rows = at::empty({s.N, s.d}, opts);
    backward_row_split(go_rows, x_rows, &routed, w13, w2, h13, act, s, offs, gx_rows, grad_w13, grad_w2);
    grad_x = at::zeros({T, s.d}, opts.dtype(acc_dtype)).index_add_(0, tokens, gx_rows.to(acc_dtype)).to(dtype);
  }
  // each row's gate gradient to its (token, slot) pair; dropped pairs get zero
  Tensor grad_gates = at::zeros({gate_weights.numel()}, opts.dtype(acc_dtype));
  const Tensor pairs =
      at::from_blob(const_cast<int64_t*>(routed.rows.pairs.data()), {s.N}, at::TensorOptions().dtype(at::kLong));
  grad_gates.index_copy_(0, pairs, routed.grad_gates);
  return {grad_x, grad_gates.view(gate_weights.sizes()).to(gate_weights.scalar_type()), grad_w13, grad_w2};
}

}  // namespace moe
