// The CPU row kernels of dispatch_cpu_kernels.h built for AVX2 + F16C (256-bit vectors, hardware
// fp16 <-> fp32 conversion), selected at run time by cpu_row_kernels() when the CPU has them. The
// rest of the extension keeps the compiler's baseline ISA, so the module still loads anywhere.
// No FMA in the row kernels: their results are bitwise identical to the baseline build. The fp32 expert GEMM
// (gemm_cpu_kernels.h), which the baseline leaves to ATen, is built for AVX2 + FMA.
#include "dispatch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOE_HAVE_SSE2 1
#define MOE_CPU_F16C 1
#define MOE_CPU_ISA avx2

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif

#include "dispatch_cpu_kernels.h"
#include "experts_cpu_kernels.h"
#include "router_cpu_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The expert GEMM needs FMA (the row kernels above stay without it, bitwise equal to the baseline).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "gemm_cpu_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace moe {
namespace {
const CpuRowKernels kAvx2Kernels{"avx2",         &avx2::gather_sum, &avx2::unpermute_bwd,
                                 &avx2::permute, &avx2::swiglu_fwd, &avx2::swiglu_bwd, &avx2::combine_rows, &avx2::gate_rows,
                                 &avx2::topk_vectors, avx2::kLanesF, &avx2::sgemm};
}
const CpuRowKernels* avx2_row_kernels() { return &kAvx2Kernels; }
}  // namespace moe

#else

namespace moe {
const CpuRowKernels* avx2_row_kernels() { return nullptr; }
}  // namespace moe

#endif
