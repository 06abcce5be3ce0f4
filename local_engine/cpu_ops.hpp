// The CPU device's numeric kernels: vectorised (AVX2/FMA/AVX-VNNI chosen at run time
// where the CPU has them, a portable fallback otherwise; only the fallback is
// built off x86-64) and multi-threaded over a ThreadPool. The reference every other device is tested against.
#pragma once

#include <cstdint>
#include <string>

#include "local_engine/tensor.hpp"
#include "local_engine/thread_pool.hpp"

namespace tollgate::local_engine::cpu {

// Instruction sets the dispatched kernels (matmul, dot, axpy, attend) exist for.
// avx2_vnni is avx2_fma plus AVX-VNNI for the Q8_0/Q4_0 matmul; avx512_vnni
// avx2_fma plus a 512-bit AVX-512 VNNI Q8_0 matmul (and AVX-VNNI for Q4_0
// where the CPU has it); amx avx512_vnni with AMX tile products for Q8_0
// batches of 16 tokens or more. Results are bit-identical to avx2_fma on all.
enum class Isa { portable, avx2_fma, avx2_vnni, avx512_vnni, amx };

// Whether this CPU (and OS) can run kernels built for isa (AVX2, FMA and F16C;
// for avx2_vnni also AVX-VNNI; for avx512_vnni also AVX-512 F/BW/VL/VNNI with
// zmm state enabled by the OS; for amx also AMX-TILE/INT8, with the tile state
// granted to the process, which the first call asks Linux for). Off x86-64
// only portable.
bool isa_supported(Isa isa);
// What the dispatched kernels use: the best supported, unless the environment
// variable TOLLGATE_CPU caps it (for comparisons and benchmarks): "portable"
// forces the fallback, "avx2" AVX2 without VNNI, "avx2_vnni" no AVX-512,
// "avx512_vnni" no AMX.
// Decided once per process.
Isa active_isa();
// "avx2+fma+avx512vnni+amx", "avx2+fma+avx512vnni", "avx2+fma+avxvnni",
// "avx2+fma" or "portable": active_isa() by name.
std::string features();

// y = x · Wᵀ for a batch: x is n x w.cols (f32, row-major), y is n x w.rows.
// W may be F32, F16, BF16, Q8_0 or Q4_0; quantised weights are never
// dequantised whole (Q8_0/Q4_0 take x quantised to Q8_0 per row, as ggml does).
// Each weight row is read once for the whole batch. No allocation once warm.
// Each y[t][r] is computed the same way whatever n is: a row of a batch is
// bit-identical to that row computed alone.
void matmul(ThreadPool& pool, const Tensor& w, const float* x, std::int64_t n, float* y);
// The same on an explicit instruction set (isa_supported(isa) must hold).
void matmul(ThreadPool& pool, const Tensor& w, const float* x, std::int64_t n, float* y, Isa isa);

// Bytes interleave_q8_0 writes for a Q8_0 w: its rows' bytes, the row count
// rounded up to a whole group of 16.
std::size_t interleaved_bytes(const Tensor& w);
// Q8_0 w's rows in the layout the matmul kernels read them in, for
// Tensor::interleaved: rearranging them once at load saves doing it on every
// call. out needs interleaved_bytes(w) bytes; any alignment.
void interleave_q8_0(const Tensor& w, std::byte* out);

// One row of any tensor type as f32 (embedding lookup).
void dequantize_row(const Tensor& t, std::int64_t row, float* out);

void rmsnorm(float* out, const float* x, const float* weight, std::int64_t n, float eps);
// Rotates adjacent pairs (v[2i], v[2i+1]) of each head by pos * theta^(-2i/head_dim).
void rope(float* v, std::int64_t n_heads, std::int64_t head_dim, std::int64_t pos, float theta);
float dot(const float* a, const float* b, std::int64_t n);
float dot(const float* a, const float* b, std::int64_t n, Isa isa);
void axpy(float a, const float* x, float* y, std::int64_t n);  // y += a * x
void axpy(float a, const float* x, float* y, std::int64_t n, Isa isa);
// One query head's attention over len cached positions: key and value of
// position p start at keys + slots[p] * stride and values + slots[p] * stride
// (head_dim floats each). scores (len floats) is scratch and ends holding the
// softmax weights of scale * q·k_p (max-subtracted); out (head_dim floats) =
// their weighted sum of the values. The result depends only on the inputs.
void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out);
void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out, Isa isa);
void scale(float* x, float a, std::int64_t n);
void softmax(float* x, std::int64_t n);  // in place, max-subtracted
// gate = silu(gate) * up; off the portable path with a vectorised exp, so
// results differ from it by a few ulp (each element's the same wherever it is).
void silu_mul(float* gate, const float* up, std::int64_t n);
void silu_mul(float* gate, const float* up, std::int64_t n, Isa isa);
void add(float* y, const float* x, std::int64_t n);  // y += x

// Row quantisation (n a multiple of 32), for the GGUF writer and for
// activations; both round exactly as ggml's reference quantisers do.
void quantize_row_q8_0(const float* x, BlockQ8_0* out, std::int64_t n);
void quantize_row_q4_0(const float* x, BlockQ4_0* out, std::int64_t n);

}  // namespace tollgate::local_engine::cpu
