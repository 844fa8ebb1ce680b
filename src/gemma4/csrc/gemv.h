// Weight x few-rows products for the decode step, and weight dequantization for prefill: the kernels' core,
// free of torch so that it builds standalone (standalone.cpp, the ARM test under qemu).  One implementation per
// instruction set, chosen by the compiler flags of the build (gemma4.hardware.ISAS): gemv_x86.h (AVX2, AVX-512
// VNNI / BF16) or gemv_neon.h (NEON, dotprod).  Every one offers:
//
//   Acts make_acts(M, K, bits);                  quantize_rows(const T* x, m0, m1, Acts&)   T: float, bf16, f16
//   qgemv_rows(acts, qweight, scale_bits, group_size, n0, n1, store)   int4 / int8 weights x activations
//   Bf16X prepare_bf16(x_bits, M, K);            gemv_bf16_rows(prepared, w_bits, n0, n1, store)
//   dequant_rows<float or uint16_t (bf16)>(qweight, scale_bits, bits, K, group_size, n0, n1, out)
//
// store(m, n, v) takes out[m, n] as an fp32 sum; callers split [0, N) between threads (rows of weights).
//
//   out[m, n] = sum_k x[m, k] * dequant(W)[n, k]        fp32 accumulation, rounded once by the caller
//
// Weights (see kernels.py): per output row, blocks of 32 along K; one fp16 scale per group of `group_size`
// weights (a multiple of 32).  int4: 16 bytes per block, byte j = (q[j]+8) | (q[j+16]+8) << 4 (Q4_0's order).
// int8: plain int8 in [-127, 127] (as quantize() makes them: -128 would overflow the AVX2 sign trick).
#pragma once
#include <cstdint>

namespace gemv {
struct bf16 { uint16_t bits; };  // activation types, by their bits
struct f16 { uint16_t bits; };
}  // namespace gemv

#if defined(__x86_64__) || defined(_M_X64)
#include "gemv_x86.h"
#elif defined(__aarch64__) || defined(_M_ARM64)
#include "gemv_neon.h"
#else
#error "gemma4 kernels: x86-64 (AVX2) or ARM64 (NEON) only"
#endif
