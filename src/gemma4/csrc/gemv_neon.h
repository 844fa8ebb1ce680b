// ARM NEON (Armv8-A; with the dotprod extension where the build enables it: Raspberry Pi 5's Cortex-A76,
// Apple M-series, Graviton 2+) weight x few-rows products.  Torch-free; see gemv.h for the interface.
//
// Same scheme as the x86 kernels (llama.cpp's Q4_0 x Q8_0): activations rounded per 32-block to int8 with a
// float scale, then per block an integer dot product converted to float once and accumulated with (weight scale
// x activation scale).  sdot (vdotq_s32) sums 4 int8 products per lane in one instruction; without it,
// vmull_s8 / vmlal_s8 (two products <= 127 * 127 each fit int16) and a pairwise widening add.
// Activations stay in natural order: the int4 nibbles unpack to signed weights in two ops (and, shift, minus 8).
#pragma once
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

namespace gemv {

constexpr int QK = 32;  // block length along K (weights and activations)
constexpr int MR = 8;   // at most this many activation rows per pass over a weight row (registers)
constexpr int BR = 4;   // rows of x per pass for bf16 weights (two accumulators each)

template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) { return std::unique_ptr<T[]>(new T[n]); }  // uninitialized

inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float from_f16(uint16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }

// 4 activations of type T -> floats
inline float32x4_t load4(const float* x) { return vld1q_f32(x); }
inline float32x4_t load4(const bf16* x) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(x)), 16));
}
inline float32x4_t load4(const f16* x) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(x))));
}

struct Acts {
  int64_t M, nb;
  int bits;
  std::unique_ptr<int8_t[]> q;  // [M][K]
  std::unique_ptr<float[]> d;   // [M][nb] block scales
};

inline Acts make_acts(int64_t M, int64_t K, int bits) {
  Acts a;
  a.M = M; a.nb = K / QK; a.bits = bits;
  a.q = buffer<int8_t>(M * K);
  a.d = buffer<float>(M * a.nb);
  return a;
}

// 32 activations -> int8 with scale amax/127, rounded to nearest even (as the x86 kernels); returns the scale.
template <typename T>
inline float quant_block(const T* x, int8_t* q) {
  float32x4_t v[8];
  float32x4_t mx = vdupq_n_f32(0.0f);
  for (int i = 0; i < 8; ++i) {
    v[i] = load4(x + 4 * i);
    mx = vmaxq_f32(mx, vabsq_f32(v[i]));
  }
  const float amax = vmaxvq_f32(mx);
  const float d = amax * (1.0f / 127.0f);
  const float id = amax > 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < 8; i += 4) {
    const int16x8_t lo = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i], id))),
                                      vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], id))));
    const int16x8_t hi = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i + 2], id))),
                                      vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i + 3], id))));
    vst1q_s8(q + 4 * i, vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
  }
  return d;
}

template <typename T>
void quantize_rows(const T* x, int64_t m0, int64_t m1, Acts& a) {
  const int64_t nb = a.nb, K = nb * QK;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t b = 0; b < nb; ++b) a.d[m * nb + b] = quant_block(x + m * K + b * QK, a.q.get() + m * K + b * QK);
}

// sum over 32 int8 pairs, as 4 int32 lanes
inline int32x4_t dot32(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
#else
  int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
  p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));
  int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
  p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
  return vpadalq_s16(vpaddlq_s16(p0), p1);
#endif
}

// One weight row x R activation rows (from m0): out[r] = sum over blocks of dot * weight scale * act scale.
template <int R>
void dot_q(int bits, const uint8_t* w, const float* dw, const Acts& a, int64_t m0, float* out) {
  const int64_t nb = a.nb, K = nb * QK;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  const int8x16_t eight = vdupq_n_s8(8);
  float32x4_t acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    int8x16_t w0, w1;
    if (bits == 4) {
      const uint8x16_t wb = vld1q_u8(w + b * 16);
      w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(wb, low)), eight);  // elements 0-15
      w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(wb, 4)), eight);   // elements 16-31
    } else {
      w0 = vld1q_s8(reinterpret_cast<const int8_t*>(w) + b * QK);
      w1 = vld1q_s8(reinterpret_cast<const int8_t*>(w) + b * QK + 16);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q.get() + (m0 + r) * K + b * QK;
      const int32x4_t s = dot32(w0, w1, vld1q_s8(xq), vld1q_s8(xq + 16));
      acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), dw[b] * a.d[(m0 + r) * nb + b]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]);
}

using TileFn = void (*)(int, const uint8_t*, const float*, const Acts&, int64_t, float*);
constexpr TileFn kTiles[MR + 1] = {nullptr, dot_q<1>, dot_q<2>, dot_q<3>, dot_q<4>, dot_q<5>, dot_q<6>, dot_q<7>,
                                   dot_q<8>};

template <typename Store>
void qgemv_rows(const Acts& a, const uint8_t* wbase, const uint16_t* sbase, int64_t group_size, int64_t n0,
                int64_t n1, Store store) {
  const int64_t M = a.M, nb = a.nb, K = nb * QK, bpg = group_size / QK, groups = K / group_size;
  const int64_t row_bytes = a.bits == 4 ? K / 2 : K;
  const int64_t ntiles = (M + MR - 1) / MR;
  auto dw = buffer<float>(nb);
  float res[MR];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) dw[b] = from_f16(sbase[n * groups + b / bpg]);
    int64_t m0 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r = (M - m0) / (ntiles - t);
      kTiles[r](a.bits, wbase + n * row_bytes, dw.get(), a, m0, res);
      for (int64_t j = 0; j < r; ++j) store(m0 + j, n, res[j]);
      m0 += r;
    }
  }
}

// bf16 weights: x widened to fp32 once per call; each weight row's 8 bf16 values widen in two shifts.
struct Bf16X {
  int64_t M, K;
  std::unique_ptr<float[]> xf;  // [M][K]
};

inline Bf16X prepare_bf16(const uint16_t* x, int64_t M, int64_t K) {
  Bf16X p{M, K, buffer<float>(std::max<int64_t>(1, M * K))};
  for (int64_t i = 0; i < M * K; ++i) p.xf[i] = from_bf16(x[i]);
  return p;
}

template <int R>
void dot_bf16(const uint16_t* w, const float* x, int64_t K, float* out) {
  float32x4_t acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const uint16x8_t wv = vld1q_u16(w + k);
    const float32x4_t wl = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(wv), 16));
    const float32x4_t wh = vreinterpretq_f32_u32(vshll_high_n_u16(wv, 16));
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vfmaq_f32(acc[r][0], wl, vld1q_f32(x + r * K + k));
      acc[r][1] = vfmaq_f32(acc[r][1], wh, vld1q_f32(x + r * K + k + 4));
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
    for (int64_t j = k; j < K; ++j) out[r] += from_bf16(w[j]) * x[r * K + j];
  }
}

using Bf16Fn = void (*)(const uint16_t*, const float*, int64_t, float*);
constexpr Bf16Fn kBf16[BR + 1] = {nullptr, dot_bf16<1>, dot_bf16<2>, dot_bf16<3>, dot_bf16<4>};

template <typename Store>
void gemv_bf16_rows(const Bf16X& p, const uint16_t* wbase, int64_t n0, int64_t n1, Store store) {
  const int64_t M = p.M, K = p.K, ntiles = (M + BR - 1) / BR;
  float res[BR];
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m0 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r = (M - m0) / (ntiles - t);
      kBf16[r](wbase + n * K, p.xf.get() + m0 * K, K, res);
      for (int64_t j = 0; j < r; ++j) store(m0 + j, n, res[j]);
      m0 += r;
    }
  }
}

// W = q * scale for weight rows [n0, n1), written as rows of K values (fp32, or bf16 bits rounded to nearest
// even) from `out`.
template <typename O>
void dequant_rows(const uint8_t* wbase, const uint16_t* sbase, int bits, int64_t K, int64_t group_size,
                  int64_t n0, int64_t n1, O* out) {
  const int64_t nb = K / QK, bpg = group_size / QK, row_bytes = bits == 4 ? K / 2 : K;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  const int8x16_t eight = vdupq_n_s8(8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = wbase + n * row_bytes;
    O* o = out + (n - n0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      int8x16_t q[2];
      if (bits == 4) {
        const uint8x16_t wb = vld1q_u8(w + b * 16);
        q[0] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(wb, low)), eight);
        q[1] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(wb, 4)), eight);
      } else {
        q[0] = vld1q_s8(reinterpret_cast<const int8_t*>(w) + b * QK);
        q[1] = vld1q_s8(reinterpret_cast<const int8_t*>(w) + b * QK + 16);
      }
      const float d = from_f16(sbase[n * (nb / bpg) + b / bpg]);
      for (int h = 0; h < 2; ++h) {
        const int16x8_t wide[2] = {vmovl_s8(vget_low_s8(q[h])), vmovl_s8(vget_high_s8(q[h]))};
        for (int j = 0; j < 4; ++j) {
          const int16x4_t part = j & 1 ? vget_high_s16(wide[j / 2]) : vget_low_s16(wide[j / 2]);
          const float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(part)), d);
          O* dst = o + b * QK + h * 16 + 4 * j;
          if constexpr (std::is_same_v<O, float>) {
            vst1q_f32(dst, v);
          } else {
            const uint32x4_t u = vreinterpretq_u32_f32(v);
            const uint32x4_t r = vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)));
            vst1_u16(dst, vshrn_n_u32(r, 16));
          }
        }
      }
    }
  }
}

}  // namespace gemv
