// Token-dispatch ops of moe._C: declarations shared by the CPU kernels, the op registration and the
// CUDA binding. The semantics are those of the PyTorch reference in moe/ops/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace moe {

// (tokens_per_expert [E], dest_rows [T, k], source_tokens [rows]), all int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_index_cpu(
    const at::Tensor& expert_indices, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& priority);

// out[dest_rows[t, j]] = x[t] for every kept (t, j); out has num_rows rows.
at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& dest_rows, int64_t num_rows);

// out[t] = sum_j w[t, j] * y[dest_rows[t, j]] over kept slots (w = 1 when gate_weights is None).
at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& dest_rows,
                         const std::optional<at::Tensor>& gate_weights);

// (grad_y, grad_w): grad_y[dest[t, j]] = w[t, j] * grad_out[t];
// grad_w[t, j] = <grad_out[t], y[dest[t, j]]> (0 for dropped slots), in gate_weights' dtype.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y,
                                                          const at::Tensor& dest_rows,
                                                          const at::Tensor& gate_weights);

// ---- grouped expert SwiGLU (experts_cpu.cpp; semantics: moe/nn/experts.py `_GroupedSwiGLU`)

// x [N, d] expert-sorted rows (counts [E] int, summing to N), w13 [E, 2h, d], w2 [E, d, h] ->
// (out [N, d], h13 [N, 2h], act [N, h]); h13 and act are what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_cpu(const at::Tensor& x, const at::Tensor& w13,
                                                                  const at::Tensor& w2, const at::Tensor& counts);

// -> (grad_x [N, d], grad_w13 [E, 2h, d], grad_w2 [E, d, h]); experts with no rows get zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& counts, const at::Tensor& h13, const at::Tensor& act);

// permute, experts and weighted combine in one op (unpermute(grouped_swiglu(permute(x)), gate_weights)):
// x [T, d] token rows, dest_rows and gate_weights [T, k] as unpermute takes them, counts [E] summing to
// num_rows -> (out [T, d], h13 [N, 2h], act [N, h]); the backward -> (grad_x [T, d], grad_gate_weights
// [T, k] in gate_weights' dtype, grad_w13, grad_w2).
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_swiglu_cpu(const at::Tensor& x, const at::Tensor& dest_rows,
                                                                 const at::Tensor& gate_weights, const at::Tensor& w13,
                                                                 const at::Tensor& w2, const at::Tensor& counts,
                                                                 int64_t num_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_swiglu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dest_rows, const at::Tensor& gate_weights,
    const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& counts, const at::Tensor& h13,
    const at::Tensor& act);

// ---- routers' top-k selection (router_cpu.cpp; reference: torch.topk)

// scores [T, E] floating -> [T, k] int64: the k largest per row, descending, ties in index order, NaN first.
at::Tensor topk_indices_cpu(const at::Tensor& scores, int64_t k);

// ---- CPU row kernels, one set per instruction set (dispatch_cpu_kernels.h)

// An fp32 operand of the CPU GEMM: element (r, c) of the [R, C] matrix it stands for is
// p[(idx ? idx[o] : o) * ld + i] with (o, i) = (r, c), or (c, r) when trans. idx lets the GEMM read
// token rows in place (the gather folded into its packing).
struct GemmOperand {
  const float* p;
  int64_t ld;
  bool trans;
  const int64_t* idx;
};
// Where the GEMM's [M, N] result goes: row i at p + (idx ? idx[i] : i) * ld, times alpha[i] (nullptr: 1),
// stored or (accumulate) added. stream: write-once output, stored around the caches (when not accumulating
// and K fits one pass); for weight gradients nobody reads until the optimizer.
struct GemmOutput {
  float* p;
  int64_t ld;
  const int64_t* idx;
  const float* alpha;
  bool accumulate;
  bool stream;
};

struct CpuRowKernels {
  const char* isa;
  void (*gather_sum)(at::ScalarType dtype, const void* y, int64_t y_stride, const int64_t* dest, const void* w,
                     int64_t T, int64_t k, int64_t d, void* out);
  void (*unpermute_bwd)(at::ScalarType dtype, const void* g, int64_t g_stride, const void* y, int64_t y_stride,
                        const int64_t* dest, const void* w, int64_t T, int64_t k, int64_t d, int64_t R, void* grad_y,
                        void* grad_w);
  void (*permute)(const char* x, int64_t x_stride_bytes, const int64_t* dest, int64_t T, int64_t k, int64_t R,
                  int64_t row_bytes, char* out);
  // Fused SwiGLU over `rows` rows (experts_cpu_kernels.h), run by the calling thread; strides in elements.
  void (*swiglu_fwd)(at::ScalarType dtype, const void* h13, int64_t ld_h13, int64_t rows, int64_t h, void* act,
                     int64_t ld_act);
  void (*swiglu_bwd)(at::ScalarType dtype, const void* grad_act, int64_t ld_ga, const void* h13, int64_t ld_h13,
                     int64_t rows, int64_t h, void* grad_h13, int64_t ld_gh13);
  // The gates of routed rows (experts_cpu_kernels.h): acc[tokens[r]] += gate[r] * y[r] (gates nullptr: 1);
  // grad_gates[r] = <ga[r], act[r]>, then ga[r] and go[r] scaled by gate[r]. gates, grad_gates and acc
  // in the accumulation type (fp32; fp64 for double); rows contiguous.
  void (*combine_rows)(at::ScalarType dtype, const void* y, const int64_t* tokens, const void* gates, int64_t m,
                       int64_t d, void* acc);
  void (*gate_rows)(at::ScalarType dtype, void* ga, const void* act, const void* gates, int64_t m, int64_t h,
                    void* grad_gates, void* go, int64_t d);
  // Top-k of fp32 scores s[t * token_stride + e * expert_stride] for tokens [t0, t1) (router_cpu_kernels.h),
  // whole vectors of topk_lanes tokens only, k <= kTopkMaxK; out [T, k] int64, row t at out + t * k.
  void (*topk_vectors)(const float* s, int64_t token_stride, int64_t expert_stride, int64_t t0, int64_t t1, int64_t E,
                       int64_t k, int64_t* out);
  int64_t topk_lanes;
  // fp32 GEMM of the expert ops (gemm_cpu_kernels.h), nullptr in the baseline build (the ops call ATen's).
  void (*sgemm)(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B, const GemmOutput& C);
};
constexpr int64_t kTopkMaxK = 16;  // the vector top-k keeps k (score, index) vectors in registers
// AVX2 + F16C build (dispatch_cpu_avx2.cpp), or nullptr when it could not be compiled.
const CpuRowKernels* avx2_row_kernels();
// The kernels in use: AVX2 when this CPU has it (MOE_CPU_ISA=base in the environment forces the
// baseline); set_cpu_isa("base" | "avx2") switches at run time (tests), false if unavailable.
const CpuRowKernels& cpu_row_kernels();
bool set_cpu_isa(const std::string& isa);
// Which GEMM the fp32 expert ops use where the kernels in use have one (cpu_row_kernels().sgemm): "own"
// or "aten". The default (own_gemm_by_default) is the own GEMM on CPUs without AVX-512 and ATen's on CPUs
// with it; MOE_CPU_GEMM=own|aten in the environment chooses; set_cpu_gemm switches at run time, for
// tests and A/B benchmarks. cpu_gemm() names the one in use: "aten" also when the kernels have none.
bool cpu_has_avx512f();
bool own_gemm_by_default(const char* env, bool avx512f);
const char* cpu_gemm();
bool set_cpu_gemm(const std::string& name);
// The fp32 expert ops run cpu_row_kernels().sgemm (cpu_gemm() == "own").
bool own_gemm_in_use();

// ---- helpers shared by the CPU and CUDA bindings (defined in dispatch_cpu.cpp)

// Checks dest_rows is [T, k] and returns it as contiguous int64.
at::Tensor checked_dest_rows(const at::Tensor& dest_rows, const char* op);

// A view of `t` whose rows (dim 0) each hold one contiguous block of row_numel elements, row i
// starting at data_ptr + i * row_stride. Copies (contiguous()) only when a row is not contiguous.
struct Rows {
  at::Tensor tensor;
  int64_t row_stride;  // elements
  int64_t row_numel;
};
Rows as_rows(const at::Tensor& t);

// Orderable key of a float priority: larger priority -> larger key; NaN is the largest (as in
// torch.sort) and -0.0 == +0.0.
// (Integer-only, so -ffast-math cannot fold the NaN / -0.0 cases; dispatch_kernels.cu has the same.)
inline uint32_t priority_key(float f) {
  uint32_t u;
  static_assert(sizeof(u) == sizeof(f), "float is 32-bit");
  __builtin_memcpy(&u, &f, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) return 0xffffffffu;  // NaN
  if ((u << 1) == 0u) u = 0u;                                                             // -0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace moe
