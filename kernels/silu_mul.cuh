// The feed-forward gate: gate = silu(gate) * up = gate / (1 + e^-gate) * up.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void silu_mul(float* gate, const float* up, std::int64_t count, cudaStream_t stream))
}  // namespace tollgate::kernels
