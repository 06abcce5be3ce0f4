// Greedy sampling on the device: out[r] = the first index of row r's largest
// value (NaN never wins), as the CPU sampler picks.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {
TG_KERNEL_API(void argmax(const float* logits, std::int64_t rows, std::int64_t cols, std::int32_t* out,
                          cudaStream_t stream))
}  // namespace tollgate::kernels
