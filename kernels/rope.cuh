// Rotary position embedding, in place, on q (n x n_heads*head_dim) and k
// (n x n_kv_heads*head_dim): each adjacent pair (v[2i], v[2i+1]) of a head
// turns by positions[t] * theta^(-2i/head_dim) (the Llama layout of GGUF and
// llama2.c files).
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void rope(float* q, float* k, const std::int32_t* positions, std::int64_t n, std::int64_t n_heads,
                        std::int64_t n_kv_heads, std::int64_t head_dim, float theta, cudaStream_t stream))
}  // namespace tollgate::kernels
