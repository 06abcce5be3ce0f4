// RMSNorm of n rows of `dim`: out = x / sqrt(mean(x²) + eps) * weight.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void rmsnorm(const float* x, const float* weight, std::int64_t n, std::int64_t dim, float eps, float* out,
                           cudaStream_t stream))
}  // namespace tollgate::kernels
