// x86 (AVX2 + FMA + F16C; AVX-512 VNNI / BF16 where the build enables them) weight x few-rows products.
// Torch-free: pointers in, floats out through a `store(m, n, value)` callback, work split by the caller
// (qgemv.cpp runs these under at::parallel_for; standalone.cpp serially).  See gemv.h for the interface.
//
// Scheme (llama.cpp's Q4_0 x Q8_0): each activation row is quantized per 32-block to int8 with its own
// float scale; every block is then an integer dot product (vpmaddubsw/vpmaddwd on AVX2, one vpdpbusd per
// 32 bytes with VNNI), converted to float once per block and accumulated with (weight scale x activation
// scale).  Decode is memory bound, so the aim is to read every weight byte once, as one sequential stream
// per thread, with few instructions per byte; everything that depends only on x is precomputed once per call.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__)
#define INLINE __attribute__((always_inline))  // the per-block lambdas must not become calls
#define KEEP_IN_REGISTER(v) asm("" : "+x"(v))  // v is used from a register: no reload per use
#else
#define INLINE
#define KEEP_IN_REGISTER(v)
#endif

namespace gemv {

constexpr int QK = 32;     // block length along K (weights and activations)
constexpr int MR = 8;      // at most this many activation rows per pass over a weight row (registers)
constexpr int PF = 2048;   // software prefetch distance in bytes: +15-25% over the hardware prefetcher alone
constexpr int ROWS = 16;   // weight rows whose scales are converted together
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GEMV_WIDE 1        // int4: 512-bit vectors, 4 blocks (64 bytes of weights) per step
constexpr int G4 = 4;
#else
#define GEMV_WIDE 0
constexpr int G4 = 2;      // int4: 2 blocks (32 bytes of weights) per 256-bit step
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) { return std::unique_ptr<T[]>(new T[n]); }  // uninitialized

// ---------------------------------------------------------------------------------------------
// Activations: x [M, K] float -> per 32-block int8 + scale (Q8_0), plus what the kernels need from it.
// ---------------------------------------------------------------------------------------------
// Rows are interleaved per block, [block][row][...], so that a kernel walking R rows of one block addresses
// them at fixed offsets from one pointer (separate row pointers spill registers at R = 8).
struct Acts {
  int64_t M, nb, nu;
  int bits;
  std::unique_ptr<int8_t[]> q;     // int8 path: [nb][M][32]; int4 path: [nu][M][G4 * 32] unit layout (below),
                                   //   then the last nb % G4 blocks, [b][M][32]
  std::unique_ptr<uint8_t[]> qa;   // int8 path: |q| (vpmaddubsw wants one unsigned operand)
  std::unique_ptr<float[]> d;      // [M][nb] block scales
  std::unique_ptr<float[]> dp;     // int4 path: [nu][M][G4 * 4] = {d[G4 u] x4, d[G4 u + 1] x4, ...}: the int32 lanes
  std::unique_ptr<int32_t[]> off;  // int4 path: [nu][M][G4 * 4] = -8 * sum of q per lane: the nibbles' +8 offset
};

// 8 activations of type T -> floats (the decode step's activations are bf16 or fp32; no conversion pass).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const bf16* x) {  // bf16 = the high half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

// 32 activations -> int8 with scale amax/127, rounded to nearest; returns the scale.
template <typename T>
inline float quant_block(const T* x, __m256i* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax * (1.0f / 127.0f);
  const __m256 id = _mm256_set1_ps(amax > 0.0f ? 1.0f / d : 0.0f);
  __m256i i[4];
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // rounds to nearest even
  // packs work within 128-bit lanes; the permute restores element order.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  *q = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return d;
}

// int4 layout: blocks are taken in units of G4 (2 with 256-bit vectors, 4 with 512-bit ones) so that one weight
// load covers G4 blocks: w & 0xF = {blk 0 elems 0-15 | blk 1 elems 0-15 | ...}, w >> 4 = {blk 0 elems 16-31 |
// ...}.  The activation unit is stored to match: [lo16 of each block | hi16 of each block] (G4 * 32 bytes).
// The last nb % G4 blocks stay in natural order.
inline Acts make_acts(int64_t M, int64_t K, int bits) {
  Acts a;
  a.M = M; a.nb = K / QK; a.nu = a.nb / G4; a.bits = bits;
  a.q = buffer<int8_t>(M * K);
  a.d = buffer<float>(M * a.nb);
  if (bits == 8) a.qa = buffer<uint8_t>(M * K);
  if (bits == 4) { a.dp = buffer<float>(M * a.nu * G4 * 4); a.off = buffer<int32_t>(M * a.nu * G4 * 4); }
  return a;
}

// Quantizes rows [m0, m1) of x [M, K] into `a` (from make_acts).
template <typename T>
void quantize_rows(const T* x, int64_t m0, int64_t m1, Acts& a) {
  const int64_t M = a.M, nb = a.nb, K = nb * QK;
  const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  for (int64_t m = m0; m < m1; ++m) {
    const T* xm = x + m * K;
    int64_t b = 0;
    if (a.bits == 4) {
      for (; b + G4 <= nb; b += G4) {
        __m256i v[G4];
        for (int j = 0; j < G4; ++j) a.d[m * nb + b + j] = quant_block(xm + (b + j) * QK, &v[j]);
        const int64_t i = b / G4 * M + m;
        int8_t* q = a.q.get() + i * G4 * QK;
        float* dp = a.dp.get() + i * G4 * 4;
        for (int j = 0; j < G4; j += 2) {  // low halves of blocks j, j+1, then (G4 * 16 bytes on) their high halves
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j * 16), _mm256_permute2x128_si256(v[j], v[j + 1], 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + G4 * 16 + j * 16),
                              _mm256_permute2x128_si256(v[j], v[j + 1], 0x31));
          _mm256_storeu_ps(dp + j * 4, _mm256_set_m128(_mm_set1_ps(a.d[m * nb + b + j + 1]),
                                                       _mm_set1_ps(a.d[m * nb + b + j])));
        }
        // -8 * q summed per int32 lane, exactly as the kernel's lanes sum nibble * q
        for (int j = 0; j < G4; j += 2) {
          const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(eight, load(q + j * 16)),
                                             _mm256_maddubs_epi16(eight, load(q + G4 * 16 + j * 16)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.off.get() + i * G4 * 4 + j * 4),
                              _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(s, ones)));
        }
      }
    }
    for (; b < nb; ++b) {  // int8, or int4's last nb % G4 blocks: natural order
      __m256i v;
      a.d[m * nb + b] = quant_block(xm + b * QK, &v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.get() + (b * M + m) * QK), v);
      if (a.bits == 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.qa.get() + (b * M + m) * QK), _mm256_abs_epi8(v));
    }
  }
}


// Weight scales of `rows` consecutive rows (fp16, one per group of `bpg` 32-blocks) -> one float per 32-block.
// Vectorized for bpg = 1, 2, 4, 8 (group 32 ... 256): a weight row streams in ~50 ns, so a scalar loop here
// (~24 conversions per row at group 64) made the whole product 2x slower.
inline void convert_scales(const uint16_t* s, int64_t rows, int64_t nb, int64_t bpg, float* out) {
  const int64_t n = rows * nb / bpg;  // groups
  int64_t g = 0;
  if (bpg == 1 || bpg == 2 || bpg == 4 || bpg == 8) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i shift = _mm256_set1_epi32(bpg == 1 ? 0 : bpg == 2 ? 1 : bpg == 4 ? 2 : 3);
    for (; g + 8 <= n; g += 8) {  // 8 groups -> bpg vectors; lane j of vector k holds group (8k + j) / bpg
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g)));
      for (int64_t k = 0; k < bpg; ++k) {
        const __m256i idx = _mm256_srlv_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(8 * k))), shift);
        _mm256_storeu_ps(out + g * bpg + 8 * k, _mm256_permutevar8x32_ps(v, idx));
      }
    }
  }
  for (; g < n; ++g) {
    const float v = _cvtsh_ss(s[g]);
    for (int64_t j = 0; j < bpg; ++j) out[g * bpg + j] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels: one weight row x R activation rows (R <= 8 accumulators in registers), so each unpacked
// weight block serves all R rows.  One weight row at a time keeps the weight reads a single sequential
// stream: interleaving 2-4 rows (to share activation loads) measured 30-50% slower here.
// ---------------------------------------------------------------------------------------------

// int4, per unit of G4 blocks: 1 load + 3 ops to unpack, then per activation row 2 vpmaddubsw (unsigned nibble x
// signed activation) + add + vpmaddwd + add (the +8 offset, precomputed) + cvt + mul + fma; with VNNI two
// vpdpbusd starting from the offset replace the first five (the same integer sums: no int16 step to saturate).
// With AVX-512 a unit is 4 blocks in 512-bit vectors (64 bytes of weights): half the instructions per weight
// byte of the 256-bit pairs, which left the one-row product compute-bound at about half the read bandwidth.
// Two accumulator sets (even / odd units) when R is small, to hide the FMA latency.
#if GEMV_WIDE
using VF = __m512;
using VI = __m512i;
inline VI load_v(const void* p) { return _mm512_loadu_si512(p); }
inline VF loadf_v(const float* p) { return _mm512_loadu_ps(p); }
inline float hsum_v(VF v) { return _mm512_reduce_add_ps(v); }
inline VI and_v(VI a, VI b) { return _mm512_and_si512(a, b); }
#define V(op) _mm512_##op
#else
using VF = __m256;
using VI = __m256i;
inline VI load_v(const void* p) { return load(p); }
inline VF loadf_v(const float* p) { return _mm256_loadu_ps(p); }
inline float hsum_v(VF v) { return hsum(v); }
inline VI and_v(VI a, VI b) { return _mm256_and_si256(a, b); }
#define V(op) _mm256_##op
#endif

template <int R>
void dot_q4(const uint8_t* w, const float* dw, const Acts& a, int64_t m0, float* out) {
  constexpr int NA = R <= 4 ? 2 : 1;
  constexpr int UB = G4 * 16;  // weight bytes per unit
  const int64_t M = a.M, nb = a.nb, nu = a.nu;
  const VI low = V(set1_epi8)(0x0F);
  [[maybe_unused]] const VI ones = V(set1_epi16)(1);
  VF acc[NA][R];
  for (int u = 0; u < NA; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = V(setzero_ps)();
  auto unit = [&](int64_t p, VF* acc) INLINE {
    const VI wb = load_v(w + p * UB);
    const VI wlo = and_v(wb, low);
    const VI whi = and_v(V(srli_epi16)(wb, 4), low);
#if GEMV_WIDE  // {dw[4p] x4, ..., dw[4p + 3] x4}
    const VF dwv = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                         _mm512_castps128_ps512(_mm_loadu_ps(dw + G4 * p)));
#else
    const VF dwv = _mm256_set_m128(_mm_broadcast_ss(dw + 2 * p + 1), _mm_broadcast_ss(dw + 2 * p));
#endif
    const int8_t* xq = a.q.get() + (p * M + m0) * G4 * QK;
    const int32_t* xo = a.off.get() + (p * M + m0) * G4 * 4;
    const float* xd = a.dp.get() + (p * M + m0) * G4 * 4;
    for (int r = 0; r < R; ++r) {
#if defined(__AVX512VNNI__)
      const VI i = V(dpbusd_epi32)(V(dpbusd_epi32)(load_v(xo + r * G4 * 4), wlo, load_v(xq + r * G4 * QK)),
                                   whi, load_v(xq + r * G4 * QK + G4 * 16));
#else
      const VI s = V(add_epi16)(V(maddubs_epi16)(wlo, load_v(xq + r * G4 * QK)),
                                V(maddubs_epi16)(whi, load_v(xq + r * G4 * QK + G4 * 16)));
      const VI i = V(add_epi32)(V(madd_epi16)(s, ones), load_v(xo + r * G4 * 4));
#endif
      const VF f = V(mul_ps)(V(cvtepi32_ps)(i), loadf_v(xd + r * G4 * 4));
      acc[r] = V(fmadd_ps)(f, dwv, acc[r]);
    }
  };
  int64_t p = 0;
  for (; p + 2 <= nu; p += 2) {
    prefetch(w + p * UB + PF);
    if (UB * 2 > 64) prefetch(w + p * UB + PF + 64);
    unit(p, acc[0]);
    unit(p + 1, acc[NA - 1]);
  }
  if (p < nu) unit(p, acc[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum_v(NA == 2 ? V(add_ps)(acc[0][r], acc[NA - 1][r]) : acc[0][r]);
  const __m256i low8 = _mm256_set1_epi8(0x0F), ones8 = _mm256_set1_epi16(1);
  for (int64_t b = nu * G4; b < nb; ++b) {  // the last nb % G4 blocks, natural layout: the sign trick
    const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
    const __m256i wv = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low8),
                                       _mm256_set1_epi8(8));
    for (int r = 0; r < R; ++r) {
      const __m256i x = load(a.q.get() + (b * M + m0 + r) * QK);
      const __m256i s = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv));
      out[r] += dw[b] * a.d[(m0 + r) * nb + b] * static_cast<float>(hsum_i32(_mm256_madd_epi16(s, ones8)));
    }
  }
}
#undef V

// int8, per block, per activation row: sign(w, x) + vpmaddubsw(|x|, .) + vpmaddwd (with VNNI one vpdpbusd)
// + cvt + fma with the combined scale comb[m][b] = weight scale x activation scale (one broadcast load).
template <int R>
void dot_q8(const int8_t* w, const float* comb, const Acts& a, int64_t m0, float* out) {
  constexpr int NA = R <= 4 ? 2 : 1;
  const int64_t M = a.M, nb = a.nb;
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NA][R];
  for (int u = 0; u < NA; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* acc) INLINE {
    const __m256i wv = load(w + b * QK);
    const int8_t* xq = a.q.get() + (b * M + m0) * QK;
    const uint8_t* xa = a.qa.get() + (b * M + m0) * QK;
    for (int r = 0; r < R; ++r) {
#if defined(__AVX512VNNI__)
      const __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), load(xa + r * QK),
                                            _mm256_sign_epi8(wv, load(xq + r * QK)));
#else
      const __m256i i = _mm256_madd_epi16(
          _mm256_maddubs_epi16(load(xa + r * QK), _mm256_sign_epi8(wv, load(xq + r * QK))), ones);
#endif
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i),
                               _mm256_broadcast_ss(comb + (m0 + r) * nb + b), acc[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch(w + b * QK + PF);
    block(b, acc[0]);
    block(b + 1, acc[NA - 1]);
  }
  if (b < nb) block(b, acc[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum(NA == 2 ? _mm256_add_ps(acc[0][r], acc[NA - 1][r]) : acc[0][r]);
}

template <int R>
void tile(int bits, const uint8_t* w, const float* dw, const float* comb, const Acts& a, int64_t m0, float* out) {
  if (bits == 4) dot_q4<R>(w, dw, a, m0, out);
  else dot_q8<R>(reinterpret_cast<const int8_t*>(w), comb, a, m0, out);
}

using TileFn = void (*)(int, const uint8_t*, const float*, const float*, const Acts&, int64_t, float*);
constexpr TileFn kTiles[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// out[m, n] for weight rows [n0, n1) and every activation row: store(m, n, value) receives the fp32 sums.
// `scales` is the fp16 bits of [N, K / group_size]; w the packed rows of [N, K].
template <typename Store>
void qgemv_rows(const Acts& a, const uint8_t* wbase, const uint16_t* sbase, int64_t group_size, int64_t n0,
                int64_t n1, Store store) {
  const int64_t M = a.M, nb = a.nb, K = nb * QK, bpg = group_size / QK, bits = a.bits;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  const int64_t ntiles = (M + MR - 1) / MR;  // M split into nearly equal tiles of at most MR rows
  auto dw = buffer<float>(ROWS * nb);
  auto comb = buffer<float>(bits == 8 ? M * nb : 0);
  float res[MR];
  for (int64_t n = n0; n < n1; ++n) {
    const float* dwn = dw.get() + (n - n0) % ROWS * nb;
    if ((n - n0) % ROWS == 0)
      convert_scales(sbase + n * (K / group_size), std::min<int64_t>(ROWS, n1 - n), nb, bpg, dw.get());
    if (bits == 8) {  // comb[m][b] = dw[b] * d[m][b]
      for (int64_t i = 0; i < M * nb; i += nb) {
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8)
          _mm256_storeu_ps(comb.get() + i + b, _mm256_mul_ps(_mm256_loadu_ps(dwn + b), _mm256_loadu_ps(a.d.get() + i + b)));
        for (; b < nb; ++b) comb[i + b] = dwn[b] * a.d[i + b];
      }
    }
    int64_t m0 = 0;
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r = (M - m0) / (ntiles - t);
      kTiles[r](static_cast<int>(bits), wbase + n * row_bytes, dwn, comb.get(), a, m0, res);
      for (int64_t j = 0; j < r; ++j) store(m0 + j, n, res[j]);
      m0 += r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 weights x few rows: out[m, n] = sum_k x[m, k] * W[n, k], W and x bf16 (fp32 accumulation, one rounding).
// PyTorch's emulated bf16 F.linear (CPUs without bf16 arithmetic) reads one row at ~19 GB/s and runs 8 rows
// ~7x slower than one; this reads one row at ~25 GB/s and 8 rows in ~2.9x (benchmarks/bench_kernels.py).
// ---------------------------------------------------------------------------------------------
// AVX2: a 32-byte load of 16 bf16 values widens to fp32 as two vectors in two cheap ops, no shuffle: the even
// elements by a shift (v << 16 in each 32-bit lane), the odd ones by a mask (v & 0xFFFF0000). x gets the
// same split, so the products pair up; a dot product does not care about the order.
//   One row of x (a single stream's decode step) is bound by the weight stream: x stays bf16, one weight row
//     a pass, 4 accumulators.
//   2+ rows: x is widened to fp32 once per call, in tiles of <= 4 rows, each laid out [K / 16][r][8 even,
//     8 odd] as one block; two weight rows x one tile a pass (8 accumulators), so the inner loop is FMAs on
//     loads, each x load serving both weight rows (~80% of the FMA peak at 8 rows).
// AVX-512 BF16: vdpbf16ps multiplies the 16 bf16 pairs and adds them to 8 fp32 sums in one instruction (each
//   product exact, as two FMAs would compute it): x stays bf16 in the same tiles, no widening.
// Prefetch (`ahead`): 1 = the same rows PF / 2 ahead; 2 = the next NW rows (a two-row pass reads two streams,
// which the hardware prefetcher alone served 10-15% slower); 0 = none (a later tile, over rows now cached).
inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// 16 bf16 values -> their even elements and their odd ones as fp32 (see above)
inline __m256 even_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_bf16(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// out[j * MR + r] = the sum of every lane of acc[.][j][r] (the accumulator sets of NW weight rows x R rows)
template <int NA, int NW, int R>
inline void sum_lanes(const __m256 (&acc)[NA][NW][R], float* out) {
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      __m256 v = acc[0][j][r];
      for (int u = 1; u < NA; ++u) v = _mm256_add_ps(v, acc[u][j][r]);
      out[j * MR + r] = hsum(v);
    }
}

template <int NW, int R, typename X>
void dot_bf16(const uint16_t* w, const X* x, int64_t K, float* out, int ahead) {
  constexpr bool kF32 = std::is_same_v<X, float>;
  constexpr int NA = kF32 ? 1 : 4;  // independent accumulator sets: with one row, hide the FMA latency
  __m256 acc[NA][NW][R];
  for (int u = 0; u < NA; ++u)
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) acc[u][j][r] = _mm256_setzero_ps();
  auto chunk = [&](int64_t c, int u) INLINE {
    __m256 we[NW], wo[NW];
    for (int j = 0; j < NW; ++j) {
      const __m256i v = load(w + j * K + c * 16);
      we[j] = even_bf16(v);
      wo[j] = odd_bf16(v);
    }
    const X* xc = x + c * R * 16;
    if constexpr (kF32) {
      for (int r = 0; r < R; ++r) {
        __m256 xe = _mm256_loadu_ps(xc + r * 16);
        KEEP_IN_REGISTER(xe);  // else GCC folds the load into each of the NW FMAs: NW loads (-20% at NW = 2)
        for (int j = 0; j < NW; ++j) acc[0][j][r] = _mm256_fmadd_ps(we[j], xe, acc[0][j][r]);
      }
      for (int r = 0; r < R; ++r) {
        __m256 xo = _mm256_loadu_ps(xc + r * 16 + 8);
        KEEP_IN_REGISTER(xo);
        for (int j = 0; j < NW; ++j) acc[0][j][r] = _mm256_fmadd_ps(wo[j], xo, acc[0][j][r]);
      }
    } else {
      for (int r = 0; r < R; ++r) {
        const __m256i v = load(xc + r * 16);
        const __m256 xe = even_bf16(v), xo = odd_bf16(v);
        for (int j = 0; j < NW; ++j) acc[u % NA][j][r] = _mm256_fmadd_ps(we[j], xe, acc[u % NA][j][r]);
        for (int j = 0; j < NW; ++j) acc[(u + 1) % NA][j][r] = _mm256_fmadd_ps(wo[j], xo, acc[(u + 1) % NA][j][r]);
      }
    }
  };
  const int64_t nc = K / 16;
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {  // 64 bytes of each weight row = one cache line per iteration
    if (ahead == 1)
      for (int j = 0; j < NW; ++j) prefetch(w + j * K + c * 16 + PF / 2);
    else if (ahead == 2)  // the next NW rows are contiguous: NW lines of them per NW lines read here
      for (int j = 0; j < NW; ++j) prefetch(w + NW * K + (c * NW + j * 2) * 16);
    chunk(c, 0);
    chunk(c + 1, 2);
  }
  if (c < nc) chunk(c, 0);
  sum_lanes(acc, out);
  const int64_t tail = K - nc * 16;
  for (int64_t k = 0; k < tail; ++k)  // K not a multiple of 16 (no Gemma 4 width): x's tail is [R][K % 16]
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) {
        const X xk = x[nc * R * 16 + r * tail + k];
        float xv;
        if constexpr (kF32) xv = xk;
        else xv = from_bf16(xk);
        out[j * MR + r] += from_bf16(w[j * K + nc * 16 + k]) * xv;
      }
}

#if defined(__AVX512BF16__)
// NW weight rows x R rows of bf16 x in tiles [K / 16][R][16] (then the tail [R][K % 16]): one vdpbf16ps per
// 16 products.
template <int NW, int R>
void dot_bf16_dp(const uint16_t* w, const uint16_t* x, int64_t K, float* out, int ahead) {
  constexpr int NA = R == 1 ? 4 : 1;  // one row: independent sums hide the latency
  __m256 acc[NA][NW][R];
  for (int u = 0; u < NA; ++u)
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) acc[u][j][r] = _mm256_setzero_ps();
  auto chunk = [&](int64_t c, int u) INLINE {
    __m256i wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load(w + j * K + c * 16);
    const uint16_t* xc = x + c * R * 16;
    for (int r = 0; r < R; ++r) {
      __m256i xv = load(xc + r * 16);
      KEEP_IN_REGISTER(xv);
      for (int j = 0; j < NW; ++j)
        acc[u % NA][j][r] = _mm256_dpbf16_ps(acc[u % NA][j][r], (__m256bh)wv[j], (__m256bh)xv);
    }
  };
  const int64_t nc = K / 16;
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4) {  // 128 bytes of each weight row per iteration
    for (int half = 0; half < 2; ++half) {
      if (ahead == 1)
        for (int j = 0; j < NW; ++j) prefetch(w + j * K + (c + 2 * half) * 16 + PF / 2);
      else if (ahead == 2)
        for (int j = 0; j < NW; ++j) prefetch(w + NW * K + ((c + 2 * half) * NW + j * 2) * 16);
    }
    chunk(c, 0);
    chunk(c + 1, 1);
    chunk(c + 2, 2);
    chunk(c + 3, 3);
  }
  for (; c < nc; ++c) chunk(c, 0);
  sum_lanes(acc, out);
  const int64_t tail = K - nc * 16;
  for (int64_t k = 0; k < tail; ++k)
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r)
        out[j * MR + r] += from_bf16(w[j * K + nc * 16 + k]) * from_bf16(x[nc * R * 16 + r * tail + k]);
}
// One weight row x one row of x, in 512-bit vdpbf16ps with every cache line prefetched 2 KB ahead: 25.5 GB/s over
// a [12288, 1536] weight on two threads where the 256-bit dot_bf16_dp<1, 1> read 21.7 (the decode step of a
// single stream is bound by this read).
inline float dot_bf16_row(const uint16_t* w, const uint16_t* x, int64_t K) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {  // 256 bytes of the weight row
    for (int line = 0; line < 4; ++line) prefetch(reinterpret_cast<const char*>(w + k) + 2048 + 64 * line);
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + k + 32 * u),
                                (__m512bh)_mm512_loadu_si512(x + k + 32 * u));
  }
  for (; k + 32 <= K; k += 32)
    acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (; k < K; ++k) sum += from_bf16(w[k]) * from_bf16(x[k]);
  return sum;
}

// One weight row x R rows of x [R][K] (as given, no tiles), in 512-bit vdpbf16ps, the weight row prefetched
// 2 KB ahead as in dot_bf16_row: a k+1-row verification step reads the weights at one row's speed, where the
// 256-bit tiled dot_bf16_dp over two streams read them ~30% slower (the x rows stay in L1/L2).
template <int R>
void dot_bf16_rows(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
  constexpr int NA = R < 4 ? 2 : 1;  // fewer rows: two sums per row hide the latency
  __m512 acc[NA][R];
  for (int u = 0; u < NA; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {  // 256 bytes of the weight row
    for (int line = 0; line < 4; ++line) prefetch(reinterpret_cast<const char*>(w + k) + 2048 + 64 * line);
    for (int u = 0; u < 4; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int r = 0; r < R; ++r)
        acc[u % NA][r] = _mm512_dpbf16_ps(acc[u % NA][r], wv, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32 * u));
    }
  }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int r = 0; r < R; ++r)
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], wv, (__m512bh)_mm512_loadu_si512(x + r * K + k));
  }
  for (int r = 0; r < R; ++r) {
    __m512 v = acc[0][r];
    if constexpr (NA == 2) v = _mm512_add_ps(v, acc[1][r]);
    float sum = _mm512_reduce_add_ps(v);
    for (int64_t t = k; t < K; ++t) sum += from_bf16(w[t]) * from_bf16(x[r * K + t]);
    out[r] = sum;
  }
}
constexpr int ROWS512 = 8;  // up to this many rows of x take dot_bf16_rows
using Rows512Fn = void (*)(const uint16_t*, const uint16_t*, int64_t, float*);
constexpr Rows512Fn kBf16Rows[ROWS512 + 1] = {nullptr, dot_bf16_rows<1>, dot_bf16_rows<2>, dot_bf16_rows<3>,
    dot_bf16_rows<4>, dot_bf16_rows<5>, dot_bf16_rows<6>, dot_bf16_rows<7>, dot_bf16_rows<8>};

using XT = uint16_t;  // what the tiles hold: bf16 bits
#else
constexpr int ROWS512 = 0;
using XT = float;  // widened x
#endif

constexpr int BR = 4;  // rows of x per tile: two weight rows x 4 rows = 8 accumulators of 16 registers
using Bf16Fn = void (*)(const uint16_t*, const XT*, int64_t, float*, int);
// [r]: a tile of r rows of x over two weight rows, or over one (the odd last row of a thread's range)
#if defined(__AVX512BF16__)
constexpr Bf16Fn kBf16Pair[BR + 1] = {nullptr, dot_bf16_dp<2, 1>, dot_bf16_dp<2, 2>, dot_bf16_dp<2, 3>, dot_bf16_dp<2, 4>};
constexpr Bf16Fn kBf16One[BR + 1] = {nullptr, dot_bf16_dp<1, 1>, dot_bf16_dp<1, 2>, dot_bf16_dp<1, 3>, dot_bf16_dp<1, 4>};
#else
constexpr Bf16Fn kBf16Pair[BR + 1] = {nullptr, dot_bf16<2, 1, float>, dot_bf16<2, 2, float>, dot_bf16<2, 3, float>,
                                      dot_bf16<2, 4, float>};
constexpr Bf16Fn kBf16One[BR + 1] = {nullptr, dot_bf16<1, 1, float>, dot_bf16<1, 2, float>, dot_bf16<1, 3, float>,
                                     dot_bf16<1, 4, float>};
#endif

// x [R, K] bf16 -> the tile layout [K / 16][R][16] (then the tail [R][K % 16]): fp32 [8 even, 8 odd] per 16
// on AVX2, the bf16 values themselves with BF16 dot products.
inline void tile_x(const uint16_t* x, int64_t R, int64_t K, XT* xt) {
  const int64_t nc = K / 16, tail = K - nc * 16;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
#if defined(__AVX512BF16__)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xt + (c * R + r) * 16), load(x + r * K + c * 16));
#else
      const __m256i v = load(x + r * K + c * 16);
      _mm256_storeu_ps(xt + (c * R + r) * 16, even_bf16(v));
      _mm256_storeu_ps(xt + (c * R + r) * 16 + 8, odd_bf16(v));
#endif
    }
    for (int64_t k = 0; k < tail; ++k) {
      const uint16_t v = x[r * K + nc * 16 + k];
      if constexpr (std::is_same_v<XT, float>) xt[nc * R * 16 + r * tail + k] = from_bf16(v);
      else xt[nc * R * 16 + r * tail + k] = v;
    }
  }
}

// x [M, K] bf16 made ready for `gemv_bf16_rows`: M <= 1 uses x as it is; more rows are tiled once per call,
// tile t one contiguous block at row m0 (16 rows of a 12288-wide x interleaved together spread each tile over
// 786 KB, past L2: 0.95x).
struct Bf16X {
  int64_t M, K, ntiles;
  const uint16_t* x;
  std::unique_ptr<XT[]> buf;
  XT* xt;  // 64-byte aligned: a 32-byte load never splits a cache line
  int64_t tile_rows(int64_t t, int64_t m0) const { return (M - m0) / (ntiles - t); }
};

inline Bf16X prepare_bf16(const uint16_t* x, int64_t M, int64_t K) {
  Bf16X p{M, K, (M + BR - 1) / BR, x, nullptr, nullptr};
  if (M <= 1 || M <= ROWS512) return p;
  p.buf = buffer<XT>(M * K + 32);
  p.xt = reinterpret_cast<XT*>((reinterpret_cast<uintptr_t>(p.buf.get()) + 63) & ~uintptr_t{63});
  for (int64_t t = 0, m0 = 0; t < p.ntiles; m0 += p.tile_rows(t, m0), ++t)
    tile_x(x + m0 * K, p.tile_rows(t, m0), K, p.xt + m0 * K);
  return p;
}

// out[m, n] for weight rows [n0, n1) of w [N, K] bf16: store(m, n, fp32 sum).
template <typename Store>
void gemv_bf16_rows(const Bf16X& p, const uint16_t* wbase, int64_t n0, int64_t n1, Store store) {
  const int64_t K = p.K;
  float res[2 * MR];
  if (p.M == 1) {
    for (int64_t n = n0; n < n1; ++n) {
#if defined(__AVX512BF16__)
      res[0] = dot_bf16_row(wbase + n * K, p.x, K);
#else
      dot_bf16<1, 1, uint16_t>(wbase + n * K, p.x, K, res, 1);
#endif
      store(0, n, res[0]);
    }
    return;
  }
#if defined(__AVX512BF16__)
  if (p.M <= ROWS512) {
    for (int64_t n = n0; n < n1; ++n) {
      kBf16Rows[p.M](wbase + n * K, p.x, K, res);
      for (int64_t m = 0; m < p.M; ++m) store(m, n, res[m]);
    }
    return;
  }
#endif
  for (int64_t n = n0; n < n1; n += 2) {
    const int64_t here = std::min<int64_t>(2, n1 - n);
    for (int64_t t = 0, m0 = 0; t < p.ntiles; m0 += p.tile_rows(t, m0), ++t) {
      const int64_t r = p.tile_rows(t, m0);
      // The first tile streams the weight rows and prefetches the next ones; later tiles find them cached.
      (here == 2 ? kBf16Pair : kBf16One)[r](wbase + n * K, p.xt + m0 * K, K, res, t > 0 ? 0 : here == 2 ? 2 : 1);
      for (int64_t j = 0; j < here; ++j)
        for (int64_t i = 0; i < r; ++i) store(m0 + i, n + j, res[j * MR + i]);
    }
  }
}

// fp32 -> bf16 bits, rounded to nearest even (the values here are finite).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// W = q * scale for weight rows [n0, n1), written as rows of K values (fp32, or bf16 bits) from `out`:
// prefill's GEMM operand.  PyTorch's own uint8 -> float conversion and broadcast multiply run at ~0.5 G
// elements/s (45 ms for a [6144, 1536] weight); this is bound by the writes.
template <typename O>
void dequant_rows(const uint8_t* wbase, const uint16_t* sbase, int bits, int64_t K, int64_t group_size,
                  int64_t n0, int64_t n1, O* out) {
  const int64_t nb = K / QK, bpg = group_size / QK, row_bytes = bits == 4 ? K / 2 : K;
  const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = wbase + n * row_bytes;
    O* o = out + (n - n0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i q;  // 32 signed values
      if (bits == 4) {
        const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
        q = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low), eight);
      } else {
        q = load(w + b * QK);
      }
#if defined(__AVX512BF16__)
      if constexpr (!std::is_same_v<O, float>) {  // 32 values in 16-lane halves, rounded by vcvtne2ps2bf16:
        // the same nearest-even bf16 as below (q * scale is a normal fp32: no flush to zero), 3x the speed
        const __m512 d16 = _mm512_set1_ps(_cvtsh_ss(sbase[n * (nb / bpg) + b / bpg]));
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d16);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))),
                                        d16);
        _mm512_storeu_si512(o + b * QK, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
        continue;
      }
#endif
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(sbase[n * (nb / bpg) + b / bpg]));
      const __m128i h[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
      for (int j = 0; j < 4; ++j) {
        const __m128i part = j & 1 ? _mm_srli_si128(h[j / 2], 8) : h[j / 2];
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
        if constexpr (std::is_same_v<O, float>) {
          _mm256_storeu_ps(o + b * QK + 8 * j, v);
        } else {  // round to nearest even in integer ops: (u + 0x7FFF + bit 16 of u) >> 16, then pack
          const __m256i u = _mm256_castps_si256(v);
          const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
              _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
          const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + b * QK + 8 * j), packed);
        }
      }
    }
  }
}

}  // namespace gemv
