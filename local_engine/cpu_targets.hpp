// Internal to the CPU device: the instruction sets the x86 kernel files
// compile their functions for, one attribute per Isa level. Per function, not
// -m flags per file, so code the compiler emits once for the whole binary
// (inline functions from headers) never needs them. Only those files include
// this; CMake builds them only for x86-64 and then defines
// TOLLGATE_X86_KERNELS for the dispatcher (cpu_ops.cpp).
#pragma once

#if !defined(__x86_64__)
#error "the x86 kernels are built only for x86-64: set CMAKE_SYSTEM_PROCESSOR when cross-compiling"
#endif

// Isa::avx2_fma.
#define TOLLGATE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// Isa::avx2_vnni.
#define TOLLGATE_TARGET_AVX2_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
// Isa::avx512_vnni.
#define TOLLGATE_TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
// Isa::amx: no AVX-512 VNNI, which its kernel does not use.
#define TOLLGATE_TARGET_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
