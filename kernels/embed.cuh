// Embedding lookup: out row t = row ids[t] of `table` (any Type) as f32.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void embed(const void* table, Type type, std::int64_t cols, const std::int32_t* ids, std::int64_t n,
                         float* out, cudaStream_t stream))
}  // namespace tollgate::kernels
