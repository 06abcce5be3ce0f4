#include "kernels/gemm.cuh"

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/common.cuh"

#ifdef __CUDACC__
#include <cublas_v2.h>
#endif

namespace tollgate::kernels::TG_KERNEL_NS {

static __global__ void dequantize_to_half(const void* w, Type type, std::int64_t first, std::int64_t rows,
                                          std::int64_t cols, std::uint16_t* out) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const __half h = __float2half(load_element(w, type, first + i / cols, cols, i % cols));
  memcpy(out + i, &h, sizeof h);
}

void to_half(const void* w, Type type, std::int64_t first, std::int64_t rows, std::int64_t cols, std::uint16_t* out,
             cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  TG_LAUNCH(dequantize_to_half, blocks_for(rows * cols, 256), 256, 0, stream)(w, type, first, rows, cols, out);
}

namespace {

// C[j * ldc + i] = Σ_p A[i * k + p] · B[j * k + p] for i < m, j < n: with
// A = W's rows and B = x's rows, C is y (row-major, ldc = W's rows).
#ifdef __CUDACC__
void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(what) + " failed: cuBLAS status " + std::to_string(static_cast<int>(status)));
  }
}

// One handle per thread (the engine's), destroyed with it.
cublasHandle_t handle() {
  struct Handle {
    cublasHandle_t h = nullptr;
    Handle() { check(cublasCreate(&h), "cublasCreate"); }
    ~Handle() { cublasDestroy(h); }
  };
  thread_local Handle handle;
  return handle.h;
}

void multiply(const void* a, const void* b, cudaDataType type, std::int64_t m, std::int64_t n, std::int64_t k,
              float* c, std::int64_t ldc, cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;
  cublasHandle_t h = handle();
  check(cublasSetStream(h, stream), "cublasSetStream");
  check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                     &alpha, a, type, static_cast<int>(k), b, type, static_cast<int>(k), &beta, c, CUDA_R_32F,
                     static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}
#else
// The reference GEMM standing in for cuBLAS: F32 accumulation in k order.
template <typename Element>
float to_float(Element e) {
  if constexpr (std::is_same_v<Element, float>) {
    return e;
  } else {
    return half_bits_to_float(e);
  }
}

template <typename Element>
void multiply(const Element* a, const Element* b, std::int64_t m, std::int64_t n, std::int64_t k, float* c,
              std::int64_t ldc) {
  for (std::int64_t j = 0; j < n; ++j) {
    for (std::int64_t i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (std::int64_t p = 0; p < k; ++p) sum += to_float(a[i * k + p]) * to_float(b[j * k + p]);
      c[j * ldc + i] = sum;
    }
  }
}
#endif

}  // namespace

void gemm(const GemmArgs& args, cudaStream_t stream) {
  if (args.n <= 0 || args.rows <= 0) return;
  if (args.type == Type::f32) {
#ifdef __CUDACC__
    multiply(args.w, args.x, CUDA_R_32F, args.rows, args.n, args.cols, args.y, args.rows, stream);
#else
    (void)stream;
    multiply(static_cast<const float*>(args.w), args.x, args.rows, args.n, args.cols, args.y, args.rows);
#endif
    return;
  }
  auto* x_half = static_cast<std::uint16_t*>(args.workspace);
  auto* tile = x_half + args.n * args.cols;
  to_half(args.x, Type::f32, 0, args.n, args.cols, x_half, stream);
  const std::int64_t tile_rows = gemm_tile_rows(args.rows, args.cols);
  for (std::int64_t first = 0; first < args.rows; first += tile_rows) {
    const std::int64_t rows = first + tile_rows <= args.rows ? tile_rows : args.rows - first;
    to_half(args.w, args.type, first, rows, args.cols, tile, stream);
#ifdef __CUDACC__
    multiply(tile, x_half, CUDA_R_16F, rows, args.n, args.cols, args.y + first, args.rows, stream);
#else
    multiply(tile, x_half, rows, args.n, args.cols, args.y + first, args.rows);
#endif
  }
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
