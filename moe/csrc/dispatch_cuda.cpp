// Torch binding of the CUDA token-dispatch kernels (dispatch_kernels.cu): registers the CUDA
// implementations of torch.ops.moe.*. Compiled only when torch is a CUDA build (setup.py adds it to
// a CUDAExtension and defines MOE_WITH_CUDA).
//
// Differences from the CPU kernels: dest_rows is not range-checked (that would need a device sync).
// routing_index runs without a host sync when nothing can be dropped (no capacity, or one >= T * k:
// the buffer then has T * k rows, known on the host), so a dropless MoE layer never waits for the
// device and can be captured in a CUDA graph; an expert index outside [0, E) is then reported by a
// device-side assert, as torch's indexing ops do. With a capacity that can drop, it syncs once to
// size source_tokens (like the reference's int(kept.sum())) and raises a host error for bad indices.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dispatch.h"
#include "dispatch_kernels.h"

namespace moe {
namespace {

using at::Tensor;

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "moe CUDA kernel ", what, " failed: ", cuda::error_string(err));
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "moe dispatch ops support float32/float64/float16/bfloat16, got ", t);
  }
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": tensors on different devices: ", a.device(), " and ", b.device());
}

std::tuple<Tensor, Tensor, Tensor> routing_index_cuda(const Tensor& expert_indices, int64_t num_experts,
                                                     std::optional<int64_t> capacity,
                                                     const std::optional<Tensor>& priority) {
  TORCH_CHECK(expert_indices.dim() == 2, "routing_index: expert_indices must be [T, k], got ", expert_indices.sizes());
  TORCH_CHECK(!at::isFloatingType(expert_indices.scalar_type()) && expert_indices.scalar_type() != at::kBool,
              "routing_index: expert_indices must be an integer tensor");
  TORCH_CHECK(num_experts >= 1 && num_experts <= cuda::kMaxExperts, "routing_index: CUDA supports 1 <= num_experts <= ",
              cuda::kMaxExperts, ", got ", num_experts);
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0, "routing_index: capacity must be >= 0");
  const c10::cuda::CUDAGuard guard(expert_indices.device());
  const int64_t T = expert_indices.size(0), k = expert_indices.size(1), n = T * k, E = num_experts;
  TORCH_CHECK(n < (int64_t(1) << 31), "routing_index: T * k must be < 2^31");
  const Tensor ei = expert_indices.to(at::kLong).contiguous();
  const auto lopts = ei.options();
  Tensor tpe = at::empty({E}, lopts);
  Tensor dest = at::empty({T, k}, lopts);
  if (n == 0) {
    tpe.zero_();
    return {tpe, dest, at::empty({0}, lopts)};
  }
  void* stream = current_stream();
  const cuda::RoutingChunking ch = cuda::routing_chunking(n);
  Tensor hist = at::empty({E * ch.num_chunks}, lopts.dtype(at::kInt));
  Tensor counts = at::empty({E}, lopts), offsets = at::empty({E}, lopts), bucket_start = at::empty({E}, lopts);
  Tensor info = at::zeros({3}, lopts);
  const int64_t cap = capacity.has_value() ? *capacity : -1;
  check(cuda::routing_count(ei.const_data_ptr<int64_t>(), n, E, cap, ch, hist.mutable_data_ptr<int32_t>(),
                            counts.mutable_data_ptr<int64_t>(), tpe.mutable_data_ptr<int64_t>(),
                            offsets.mutable_data_ptr<int64_t>(), bucket_start.mutable_data_ptr<int64_t>(),
                            info.mutable_data_ptr<int64_t>(), stream),
        "routing_count");
  int64_t num_rows = n;
  bool over_capacity = false;
  if (cap >= 0 && cap < n) {
    const Tensor info_cpu = info.cpu();  // the one sync: rows of the permuted buffer
    const int64_t* inf = info_cpu.const_data_ptr<int64_t>();
    TORCH_CHECK(inf[2] == 0, "routing_index: expert index outside [0, ", E, ")");
    num_rows = inf[0];
    over_capacity = inf[1] != 0;
  } else {
    check(cuda::routing_check(info.const_data_ptr<int64_t>(), E, stream), "routing_check");
  }
  Tensor src = at::empty({num_rows}, lopts);
  if (over_capacity && priority.has_value()) {
    const Tensor& p = *priority;
    TORCH_CHECK(p.numel() == n, "routing_index: priority must have T * k = ", n, " elements, got ", p.numel());
    check_same_device(p, expert_indices, "routing_index");
    const Tensor pr = p.reshape({-1}).to(at::kFloat).contiguous();
    Tensor order = at::empty({n}, lopts);
    Tensor thresh = at::empty({E}, lopts.dtype(at::kInt));
    Tensor take_eq = at::empty({E}, lopts);
    check(cuda::routing_assign_priority(ei.const_data_ptr<int64_t>(), pr.const_data_ptr<float>(), n, k, E, cap, ch,
                                        hist.const_data_ptr<int32_t>(), counts.const_data_ptr<int64_t>(),
                                        offsets.const_data_ptr<int64_t>(), bucket_start.const_data_ptr<int64_t>(),
                                        order.mutable_data_ptr<int64_t>(),
                                        reinterpret_cast<uint32_t*>(thresh.mutable_data_ptr<int32_t>()),
                                        take_eq.mutable_data_ptr<int64_t>(), dest.mutable_data_ptr<int64_t>(),
                                        src.mutable_data_ptr<int64_t>(), stream),
          "routing_assign_priority");
  } else {
    check(cuda::routing_assign(ei.const_data_ptr<int64_t>(), n, k, E, ch, hist.const_data_ptr<int32_t>(),
                               tpe.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                               dest.mutable_data_ptr<int64_t>(), src.mutable_data_ptr<int64_t>(), stream),
          "routing_assign");
  }
  return {tpe, dest, src};
}

Tensor permute_cuda(const Tensor& x, const Tensor& dest_rows, int64_t num_rows) {
  const Tensor dest = checked_dest_rows(dest_rows, "permute");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) == dest.size(0), "permute: x must have T = ", dest.size(0), " rows, got ",
              x.sizes());
  TORCH_CHECK(num_rows >= 0, "permute: num_rows must be >= 0");
  check_same_device(x, dest, "permute");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = num_rows;
  Tensor out = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const Rows xr = as_rows(x);
  const int64_t es = static_cast<int64_t>(x.element_size());
  check(cuda::permute(xr.tensor.const_data_ptr(), xr.row_stride * es, dest.const_data_ptr<int64_t>(), dest.size(0),
                      dest.size(1), xr.row_numel * es, out.mutable_data_ptr(), current_stream()),
        "permute");
  return out;
}

Tensor unpermute_cuda(const Tensor& y, const Tensor& dest_rows, const std::optional<Tensor>& gate_weights) {
  const Tensor dest = checked_dest_rows(dest_rows, "unpermute");
  TORCH_CHECK(y.dim() >= 1 && at::isFloatingType(y.scalar_type()), "unpermute: y must be a floating tensor");
  check_same_device(y, dest, "unpermute");
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t T = dest.size(0), k = dest.size(1);
  std::vector<int64_t> sizes = y.sizes().vec();
  sizes[0] = T;
  Tensor out = at::empty(sizes, y.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor w;
  if (gate_weights.has_value()) {
    TORCH_CHECK(gate_weights->sizes() == dest.sizes(), "unpermute: gate_weights must be [T, k] = ", dest.sizes(),
                ", got ", gate_weights->sizes());
    check_same_device(*gate_weights, y, "unpermute");
    w = gate_weights->to(y.scalar_type()).contiguous();  // rounded to y's dtype, like the reference
  }
  if (out.numel() == 0) return out;
  if (y.size(0) == 0) return out.zero_();
  const Rows yr = as_rows(y);
  check(cuda::gather_sum(dtype_of(y.scalar_type()), yr.tensor.const_data_ptr(), yr.row_stride,
                         dest.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr() : nullptr, T, k,
                         yr.row_numel, out.mutable_data_ptr(), current_stream()),
        "gather_sum");
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_cuda(const Tensor& grad_out, const Tensor& y, const Tensor& dest_rows,
                                                   const Tensor& gate_weights) {
  const Tensor dest = checked_dest_rows(dest_rows, "unpermute_backward");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "unpermute_backward: y must be floating point");
  const int64_t T = dest.size(0), k = dest.size(1);
  TORCH_CHECK(grad_out.dim() == y.dim() && grad_out.size(0) == T && grad_out.sizes().slice(1) == y.sizes().slice(1),
              "unpermute_backward: grad_out must be [T, ...] matching y, got ", grad_out.sizes());
  TORCH_CHECK(gate_weights.sizes() == dest.sizes(), "unpermute_backward: gate_weights must be [T, k]");
  check_same_device(y, dest, "unpermute_backward");
  check_same_device(y, grad_out, "unpermute_backward");
  const c10::cuda::CUDAGuard guard(y.device());
  const Tensor w = gate_weights.to(y.scalar_type()).contiguous();
  const Tensor g = grad_out.to(y.scalar_type());
  Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::Contiguous));
  const at::ScalarType acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_w = at::empty({T, k}, y.options().dtype(acc));
  if (y.numel() == 0 || T == 0) {
    grad_w.zero_();
  } else {
    const Rows gr = as_rows(g);
    const Rows yr = as_rows(y);
    check(cuda::unpermute_backward(dtype_of(y.scalar_type()), gr.tensor.const_data_ptr(), gr.row_stride,
                                   yr.tensor.const_data_ptr(), yr.row_stride, dest.const_data_ptr<int64_t>(),
                                   w.const_data_ptr(), T, k, yr.row_numel, grad_y.mutable_data_ptr(),
                                   grad_w.mutable_data_ptr(), current_stream()),
          "unpermute_backward");
  }
  return {grad_y, grad_w.to(gate_weights.scalar_type())};
}

}  // namespace
}  // namespace moe

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("routing_index", &moe::routing_index_cuda);
  m.impl("permute", &moe::permute_cuda);
  m.impl("unpermute", &moe::unpermute_cuda);
  m.impl("unpermute_backward", &moe::unpermute_backward_cuda);
}
