#include "kernels/gemm.cuh"

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/common.cuh"

#ifdef __CUDACC__
#include <cublas_v2.h>  // types only: the library is opened at run time
#include <dlfcn.h>
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

// cuBLAS, opened at run time: the binary links no CUDA library dynamically,
// so it starts where none is installed; without it, the matmul kernels take
// prefill batches too.
struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  // cublasGemmEx is overloaded in C++ (cudaDataType or cublasComputeType_t): the C one.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  Cublas() {
    void* lib = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    }
    if (lib == nullptr) return;
    create = reinterpret_cast<decltype(create)>(dlsym(lib, "cublasCreate_v2"));
    destroy = reinterpret_cast<decltype(destroy)>(dlsym(lib, "cublasDestroy_v2"));
    set_stream = reinterpret_cast<decltype(set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    gemm_ex = reinterpret_cast<decltype(gemm_ex)>(dlsym(lib, "cublasGemmEx"));
  }
  bool loaded() const { return create && destroy && set_stream && gemm_ex; }
};

const Cublas& cublas() {
  static const Cublas library;
  return library;
}

// One handle per thread (the engine's), destroyed with it.
cublasHandle_t handle() {
  struct Handle {
    cublasHandle_t h = nullptr;
    Handle() { check(cublas().create(&h), "cublasCreate"); }
    ~Handle() { cublas().destroy(h); }
  };
  thread_local Handle handle;
  return handle.h;
}

void multiply(const void* a, const void* b, cudaDataType type, std::int64_t m, std::int64_t n, std::int64_t k,
              float* c, std::int64_t ldc, cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;
  cublasHandle_t h = handle();
  check(cublas().set_stream(h, stream), "cublasSetStream");
  check(cublas().gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
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
void multiply_now(const Element* a, const Element* b, std::int64_t m, std::int64_t n, std::int64_t k, float* c,
                  std::int64_t ldc) {
  for (std::int64_t j = 0; j < n; ++j) {
    for (std::int64_t i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (std::int64_t p = 0; p < k; ++p) sum += to_float(a[i * k + p]) * to_float(b[j * k + p]);
      c[j * ldc + i] = sum;
    }
  }
}

// Host work on the stream: recorded like a launch while a graph is captured.
template <typename Element>
void multiply(const Element* a, const Element* b, std::int64_t m, std::int64_t n, std::int64_t k, float* c,
              std::int64_t ldc) {
  if (simt::recording()) {
    simt::record([=] { multiply_now(a, b, m, n, k, c, ldc); });
  } else {
    multiply_now(a, b, m, n, k, c, ldc);
  }
}
#endif

}  // namespace

bool gemm_available() {
#ifdef __CUDACC__
  return cublas().loaded();
#else
  return true;  // the reference GEMM
#endif
}

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
  if (args.type == Type::f16) {  // already what cuBLAS takes: no tiles
#ifdef __CUDACC__
    multiply(args.w, x_half, CUDA_R_16F, args.rows, args.n, args.cols, args.y, args.rows, stream);
#else
    multiply(static_cast<const std::uint16_t*>(args.w), x_half, args.rows, args.n, args.cols, args.y, args.rows);
#endif
    return;
  }
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
