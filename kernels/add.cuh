// The residual add: y += x, count floats.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void add(float* y, const float* x, std::int64_t count, cudaStream_t stream))
}  // namespace tollgate::kernels
