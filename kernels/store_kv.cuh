// Writes n tokens' keys and values (kv_dim floats each) into their cache
// slots: keys/values are one layer's storage, slot s at s * kv_dim.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void store_kv(float* keys, float* values, const float* k, const float* v, const std::int64_t* slots,
                            std::int64_t n, std::int64_t kv_dim, cudaStream_t stream))
}  // namespace tollgate::kernels
