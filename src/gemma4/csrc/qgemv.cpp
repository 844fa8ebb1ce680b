// Weight-only int4 / int8 matrix x few-rows kernels for the decode step (AVX2 + FMA + F16C).
//
//   out[m, n] = sum_k x[m, k] * dequant(W)[n, k]        x: fp32/bf16/fp16 [M, K], out: [M, N] in x's dtype
//   (fp32 accumulation, rounded once at the end)
//
// Weights (see kernels.py): per output row, blocks of 32 along K; one fp16 scale per group of
// `group_size` weights (a multiple of 32).  int4: 16 bytes per block, byte j = (q[j]+8) | (q[j+16]+8) << 4.
// int8: plain int8 in [-127, 127] (as quantize() makes them: -128 would overflow the sign trick below).
//
// Scheme (llama.cpp's Q4_0 x Q8_0): each activation row is quantized per 32-block to int8 with its own
// float scale; every block is then an integer dot product on vpmaddubsw/vpmaddwd, converted to float
// once per block and accumulated with (weight scale x activation scale).  Decode is memory bound, so the
// aim is to read every weight byte once, as one sequential stream per thread, with few instructions per
// byte; everything that depends only on x is precomputed once per call.
//
// Only light headers: <torch/extension.h> (pybind + all of ATen) triples the first-use compile time.
// The ops are registered with the dispatcher as torch.ops.gemma4_kernels.qgemv, .dequant (prefill) and
// .gemv_bf16 (bf16 weights, decode), .rms_norm and .decode_attention.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <cstdint>
#include <memory>
#include <type_traits>

#if defined(__GNUC__)
#define INLINE __attribute__((always_inline))  // the per-block lambdas must not become calls
#define KEEP_IN_REGISTER(v) asm("" : "+x"(v))  // v is used from a register: no reload per use
#else
#define INLINE
#define KEEP_IN_REGISTER(v)
#endif

namespace {

constexpr int QK = 32;     // block length along K (weights and activations)
constexpr int MR = 8;      // at most this many activation rows per pass over a weight row (registers)
constexpr int PF = 2048;   // software prefetch distance in bytes: +15-25% over the hardware prefetcher alone
constexpr int ROWS = 16;   // weight rows whose scales are converted together

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
  int64_t M, nb, np;
  std::unique_ptr<int8_t[]> q;     // int8 path: [nb][M][32]; int4 path: [np][M][64] pair layout (below),
                                   //   then an odd last block [M][32]
  std::unique_ptr<uint8_t[]> qa;   // int8 path: |q| (vpmaddubsw wants one unsigned operand)
  std::unique_ptr<float[]> d;      // [M][nb] block scales
  std::unique_ptr<float[]> dp;     // int4 path: [np][M][8] = {d[2p] x4, d[2p+1] x4}, matching the int32 lanes
  std::unique_ptr<int32_t[]> off;  // int4 path: [np][M][8] = 8 * sum of q per lane: the nibbles' +8 offset
};

// 8 activations of type T -> floats (the decode step's activations are bf16 or fp32; no conversion pass).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {  // bf16 = the high half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

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

// int4 layout: blocks are taken in pairs (2p, 2p+1) so that one 32-byte weight load covers two blocks:
// w & 0xF = {blk 2p elems 0-15 | blk 2p+1 elems 0-15}, w >> 4 = {blk 2p elems 16-31 | blk 2p+1 elems 16-31}.
// The activation pair is stored to match: [2p lo16 | 2p+1 lo16 | 2p hi16 | 2p+1 hi16] (64 bytes).
// An odd last block stays in natural order.
template <typename T>
Acts quantize_acts(const T* x, int64_t M, int64_t K, int bits) {
  Acts a;
  a.M = M; a.nb = K / QK; a.np = a.nb / 2;
  const int64_t nb = a.nb, np = a.np;
  a.q = buffer<int8_t>(M * K);
  a.d = buffer<float>(M * nb);
  if (bits == 8) a.qa = buffer<uint8_t>(M * K);
  if (bits == 4) { a.dp = buffer<float>(M * np * 8); a.off = buffer<int32_t>(M * np * 8); }
  // Small (M*K floats): a second thread only when there is enough of it to pay for a parallel region.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xm = x + m * K;
      int64_t b = 0;
      if (bits == 4) {
        for (; b + 2 <= nb; b += 2) {
          __m256i v0, v1;
          a.d[m * nb + b] = quant_block(xm + b * QK, &v0);
          a.d[m * nb + b + 1] = quant_block(xm + (b + 1) * QK, &v1);
          const __m256i lo = _mm256_permute2x128_si256(v0, v1, 0x20), hi = _mm256_permute2x128_si256(v0, v1, 0x31);
          const int64_t i = b / 2 * M + m;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.get() + i * 64), lo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.get() + i * 64 + 32), hi);
          _mm256_storeu_ps(a.dp.get() + i * 8, _mm256_set_m128(_mm_set1_ps(a.d[m * nb + b + 1]), _mm_set1_ps(a.d[m * nb + b])));
          // 8 * q summed per int32 lane, exactly as the kernel's lanes sum nibble * q
          const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(eight, lo), _mm256_maddubs_epi16(eight, hi));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.off.get() + i * 8), _mm256_madd_epi16(s, ones));
        }
      }
      for (; b < nb; ++b) {  // int8, or int4's odd last block: natural order
        __m256i v;
        a.d[m * nb + b] = quant_block(xm + b * QK, &v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.get() + (b * M + m) * QK), v);
        if (bits == 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.qa.get() + (b * M + m) * QK), _mm256_abs_epi8(v));
      }
    }
  });
  return a;
}

// Weight scales of `rows` consecutive rows (fp16, one per group of `bpg` 32-blocks) -> one float per 32-block.
// Vectorized for bpg = 1, 2, 4, 8 (group 32 ... 256): a weight row streams in ~50 ns, so a scalar loop here
// (~24 conversions per row at group 64) made the whole product 2x slower.
void convert_scales(const uint16_t* s, int64_t rows, int64_t nb, int64_t bpg, float* out) {
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

// int4, per block pair: 1 load + 3 ops to unpack, then per activation row 2 vpmaddubsw (unsigned nibble x
// signed activation) + add + vpmaddwd + sub (the +8 offset, precomputed) + cvt + mul + fma.
// Two accumulator sets (even / odd pairs) when R is small, to hide the FMA latency.
template <int R>
void dot_q4(const uint8_t* w, const float* dw, const Acts& a, int64_t m0, float* out) {
  constexpr int NA = R <= 4 ? 2 : 1;
  const int64_t M = a.M, nb = a.nb, np = a.np;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[NA][R];
  for (int u = 0; u < NA; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
  auto pair = [&](int64_t p, __m256* acc) INLINE {
    const __m256i wb = load(w + p * 32);
    const __m256i wlo = _mm256_and_si256(wb, low);
    const __m256i whi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), low);
    const __m256 dwv = _mm256_set_m128(_mm_broadcast_ss(dw + 2 * p + 1), _mm_broadcast_ss(dw + 2 * p));
    const int8_t* xq = a.q.get() + (p * M + m0) * 64;
    const int32_t* xo = a.off.get() + (p * M + m0) * 8;
    const float* xd = a.dp.get() + (p * M + m0) * 8;
    for (int r = 0; r < R; ++r) {
      const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(wlo, load(xq + r * 64)),
                                         _mm256_maddubs_epi16(whi, load(xq + r * 64 + 32)));
      const __m256i i = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), load(xo + r * 8));
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_loadu_ps(xd + r * 8));
      acc[r] = _mm256_fmadd_ps(f, dwv, acc[r]);
    }
  };
  int64_t p = 0;
  for (; p + 2 <= np; p += 2) {  // 64 bytes of weights = one cache line per iteration
    prefetch(w + p * 32 + PF);
    pair(p, acc[0]);
    pair(p + 1, acc[NA - 1]);
  }
  if (p < np) pair(p, acc[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum(NA == 2 ? _mm256_add_ps(acc[0][r], acc[NA - 1][r]) : acc[0][r]);
  if (nb & 1) {  // odd last block, natural layout: signed weights via the sign trick
    const int64_t b = nb - 1;
    const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
    const __m256i wv = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low),
                                       _mm256_set1_epi8(8));
    for (int r = 0; r < R; ++r) {
      const __m256i x = load(a.q.get() + np * M * 64 + (m0 + r) * QK);
      const __m256i s = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv));
      out[r] += dw[b] * a.d[(m0 + r) * nb + b] * static_cast<float>(hsum_i32(_mm256_madd_epi16(s, ones)));
    }
  }
}

// int8, per block, per activation row: sign(w, x) + vpmaddubsw(|x|, .) + vpmaddwd + cvt + fma with the
// combined scale comb[m][b] = weight scale x activation scale (one broadcast load).
template <int R>
void dot_q8(const int8_t* w, const float* comb, const Acts& a, int64_t m0, float* out) {
  constexpr int NA = R <= 4 ? 2 : 1;
  const int64_t M = a.M, nb = a.nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NA][R];
  for (int u = 0; u < NA; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* acc) INLINE {
    const __m256i wv = load(w + b * QK);
    const int8_t* xq = a.q.get() + (b * M + m0) * QK;
    const uint8_t* xa = a.qa.get() + (b * M + m0) * QK;
    for (int r = 0; r < R; ++r) {
      const __m256i s = _mm256_maddubs_epi16(load(xa + r * QK), _mm256_sign_epi8(wv, load(xq + r * QK)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)),
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

// Checks (qweight, scales) and returns K.
int64_t check_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "gemma4_kernels: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % QK == 0, "gemma4_kernels: group_size must be a positive multiple of 32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.is_cpu(),
              "gemma4_kernels: qweight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "gemma4_kernels: qweight must be uint8 for bits=4 and int8 for bits=8");
  const int64_t K = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(K % group_size == 0, "gemma4_kernels: K=", K, " is not a multiple of group_size=", group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.is_cpu() &&
                  scales.size(0) == qweight.size(0) && scales.size(1) == K / group_size,
              "gemma4_kernels: scales must be a contiguous float16 tensor of shape [N, K/group_size]");
  return K;
}

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                 int64_t group_size) {
  const int64_t K = check_weight(qweight, scales, bits, group_size);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "qgemv: x must be a contiguous 2-D float32, bfloat16 or float16 CPU tensor");
  TORCH_CHECK(x.size(1) == K, "qgemv: x has ", x.size(1), " features, the weight K=", K);
  const int64_t M = x.size(0), N = qweight.size(0);

  at::Tensor out = at::empty({M, N}, x.options());  // in x's dtype: saves the caller a cast (~5 us)
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();

  const int ib = static_cast<int>(bits);
  const Acts a = x.scalar_type() == at::kFloat      ? quantize_acts(x.data_ptr<float>(), M, K, ib)
                 : x.scalar_type() == at::kBFloat16 ? quantize_acts(x.data_ptr<at::BFloat16>(), M, K, ib)
                                                    : quantize_acts(x.data_ptr<at::Half>(), M, K, ib);
  const int64_t nb = K / QK, bpg = group_size / QK;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* sbase = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  void* obase = out.data_ptr();
  const at::ScalarType odt = out.scalar_type();
  auto store = [&](int64_t i, float v) {
    if (odt == at::kFloat) static_cast<float*>(obase)[i] = v;
    else if (odt == at::kBFloat16) static_cast<at::BFloat16*>(obase)[i] = at::BFloat16(v);  // round to nearest
    else static_cast<at::Half*>(obase)[i] = at::Half(v);
  };
  const int64_t ntiles = (M + MR - 1) / MR;  // M split into nearly equal tiles of at most MR rows

  // One contiguous chunk of rows per thread, so each thread streams its own part of the weights;
  // under ~256 KB of weights the work stays on one thread (waking a second one costs a few microseconds).
  const int64_t nthreads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(1, (256 * 1024) / (row_bytes * M));
  const int64_t grain = std::max<int64_t>((N + nthreads - 1) / nthreads, min_rows);

  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
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
        for (int64_t j = 0; j < r; ++j) store((m0 + j) * N + n, res[j]);
        m0 += r;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// bf16 weights x few rows: out[m, n] = sum_k x[m, k] * W[n, k], W and x bf16 (fp32 accumulation, one rounding).
// PyTorch's bf16 F.linear reads one row at ~19 GB/s here and runs 8 rows ~7x slower than one (an emulated
// bf16 GEMM); this reads one row at ~25 GB/s, 2 rows in the same time and 8 in ~2.9x on a half-speed day
// (benchmarks/bench_kernels.py), where 8 rows are compute-bound.
// ---------------------------------------------------------------------------------------------
// A 32-byte load of 16 bf16 values widens to fp32 as two vectors in two cheap ops, no shuffle: the even
// elements by a shift (v << 16 in each 32-bit lane), the odd ones by a mask (v & 0xFFFF0000). x gets the
// same split, so the products pair up; a dot product does not care about the order.
//   One row of x (a single stream's decode step) is bound by the weight stream: x stays bf16, one weight row
//     a pass, 4 accumulators.
//   2+ rows: x is widened to fp32 once per call, in tiles of <= 4 rows, each laid out [K / 16][r][8 even,
//     8 odd] as one block; two weight rows x one tile a pass (8 accumulators), so the inner loop is FMAs on
//     loads, each x load serving both weight rows. One weight row x 8 rows of bf16 x widened per weight row
//     (before 2026-11-23) ran 8 rows at ~60% of the FMA peak; this runs them at ~80% (1.2-1.5x for 2-16
//     rows, the same fp32 sums to the bit for 8; README "Serving" lists the variants measured).
// Prefetch (`ahead`): 1 = the same rows PF / 2 ahead; 2 = the next NW rows (a two-row pass reads two streams,
// which the hardware prefetcher alone served 10-15% slower); 0 = none (a later tile, over rows now cached).
inline float from_bf16(uint16_t b) { return static_cast<float>(at::BFloat16(b, at::BFloat16::from_bits())); }
// 16 bf16 values -> their even elements and their odd ones as fp32 (see above)
inline __m256 even_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_bf16(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
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
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      __m256 v = acc[0][j][r];
      for (int u = 1; u < NA; ++u) v = _mm256_add_ps(v, acc[u][j][r]);
      out[j * MR + r] = hsum(v);
    }
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

constexpr int BR = 4;  // rows of x per tile: two weight rows x 4 rows = 8 accumulators of 16 registers
using Bf16Fn = void (*)(const uint16_t*, const float*, int64_t, float*, int);
// [r]: a tile of r rows of x over two weight rows, or over one (the odd last row of a thread's range)
constexpr Bf16Fn kBf16Pair[BR + 1] = {nullptr, dot_bf16<2, 1, float>, dot_bf16<2, 2, float>, dot_bf16<2, 3, float>,
                                      dot_bf16<2, 4, float>};
constexpr Bf16Fn kBf16One[BR + 1] = {nullptr, dot_bf16<1, 1, float>, dot_bf16<1, 2, float>, dot_bf16<1, 3, float>,
                                     dot_bf16<1, 4, float>};

// x [R, K] bf16 -> fp32 [K / 16][R][8 even, 8 odd] (then the tail, [R][K % 16])
void widen_x(const uint16_t* x, int64_t R, int64_t K, float* xf) {
  const int64_t nc = K / 16, tail = K - nc * 16;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      const __m256i v = load(x + r * K + c * 16);
      _mm256_storeu_ps(xf + (c * R + r) * 16, even_bf16(v));
      _mm256_storeu_ps(xf + (c * R + r) * 16 + 8, odd_bf16(v));
    }
    for (int64_t k = 0; k < tail; ++k)
      xf[nc * R * 16 + r * tail + k] = from_bf16(x[r * K + nc * 16 + k]);
  }
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.is_cpu() && w.scalar_type() == at::kBFloat16,
              "gemv_bf16: w must be a contiguous 2-D bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.is_cpu() && x.scalar_type() == at::kBFloat16,
              "gemv_bf16: x must be a contiguous 2-D bfloat16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "gemv_bf16: x has ", K, " features, the weight ", w.size(1));
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const uint16_t* xbits = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wbase = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* obf = out.data_ptr<at::BFloat16>();
  const int64_t nthreads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(2, (256 * 1024) / (K * 2 * M));
  const int64_t grain = std::max<int64_t>((N + nthreads - 1) / nthreads, min_rows);
  if (M == 1) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      float res[MR];
      for (int64_t n = n0; n < n1; ++n) {
        dot_bf16<1, 1, uint16_t>(wbase + n * K, xbits, K, res, 1);
        obf[n] = at::BFloat16(res[0]);
      }
    });
    return out;
  }
  const int64_t ntiles = (M + BR - 1) / BR;  // nearly equal tiles of at most BR rows
  auto tile_rows = [&](int64_t t, int64_t m0) { return (M - m0) / (ntiles - t); };
  // Tile t is one contiguous block at row m0 (16 rows of a 12288-wide x interleaved together spread each
  // tile over 786 KB, past L2: 0.95x).
  auto xbuf = buffer<float>(M * K + 16);  // 64-byte aligned below: a 32-byte load never splits a cache line
  float* xf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xbuf.get()) + 63) & ~uintptr_t{63});
  for (int64_t t = 0, m0 = 0; t < ntiles; m0 += tile_rows(t, m0), ++t)
    widen_x(xbits + m0 * K, tile_rows(t, m0), K, xf + m0 * K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float res[2 * MR];
    for (int64_t n = n0; n < n1; n += 2) {
      const int64_t here = std::min<int64_t>(2, n1 - n);
      for (int64_t t = 0, m0 = 0; t < ntiles; m0 += tile_rows(t, m0), ++t) {
        const int64_t r = tile_rows(t, m0);
        // The first tile streams the weight rows and prefetches the next ones; later tiles find them cached.
        (here == 2 ? kBf16Pair : kBf16One)[r](wbase + n * K, xf + m0 * K, K, res, t > 0 ? 0 : here == 2 ? 2 : 1);
        for (int64_t j = 0; j < here; ++j)
          for (int64_t i = 0; i < r; ++i) obf[(m0 + i) * N + n + j] = at::BFloat16(res[j * MR + i]);
      }
    }
  });
  return out;
}

// W = q * scale as float32 [N, K], for prefill's GEMM.  PyTorch's own uint8 -> float conversion and broadcast
// multiply run at ~0.5 G elements/s here (45 ms for a [6144, 1536] weight); this is bound by the writes.
// dequant_into writes into a given fp32 [N, K] buffer: prefill reuses one for every slice of every weight
// (a fresh 4 MB buffer each was ~1 GB of new pages, i.e. page faults, per 512-token int4 prefill).
void dequant_into(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                  at::Tensor& out) {
  const int64_t K = check_weight(qweight, scales, bits, group_size);
  const int64_t N = qweight.size(0), nb = K / QK, bpg = group_size / QK, row_bytes = bits == 4 ? K / 2 : K;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == K, "dequant_into: out must be a contiguous float32 [", N, ", ", K, "] tensor");
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* sbase = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* obase = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
    const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wbase + n * row_bytes;
      float* o = obase + n * K;
      for (int64_t b = 0; b < nb; ++b) {
        __m256i q;  // 32 signed values
        if (bits == 4) {
          const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
          q = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low), eight);
        } else {
          q = load(w + b * QK);
        }
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(sbase[n * (nb / bpg) + b / bpg]));
        const __m128i h[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
        for (int j = 0; j < 4; ++j) {
          const __m128i part = j & 1 ? _mm_srli_si128(h[j / 2], 8) : h[j / 2];
          _mm256_storeu_ps(o + b * QK + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d));
        }
      }
    }
  });
}

at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  const int64_t K = check_weight(qweight, scales, bits, group_size);
  at::Tensor out = at::empty({qweight.size(0), K}, qweight.options().dtype(at::kFloat));
  dequant_into(qweight, scales, bits, group_size, out);
  return out;
}

// Gemma's RMSNorm per row of x [R, D], in fp32 as the reference computes it: x * (mean(x^2) + eps)^-0.5, then
// * weight, rounded once to x's dtype (fp32 or bf16).  One op where F.rms_norm runs six (pow, mean, add,
// rsqrt, mul, mul): a decode step runs ~250 norms on rows of 256-1536 values, and each ATen op costs more
// in dispatch than in arithmetic (13.7 ms of norms per E2B step -> 1.5 ms).  The sum of squares is taken
// in a different order than torch's mean, so the scale may differ from the reference's in the last fp32 bit.
template <typename T>
void rms_norm_rows(const T* x, const float* w, T* out, int64_t r0, int64_t r1, int64_t D, float eps) {
  const int64_t D8 = D - D % 8;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    T* o = out + r * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < D8; k += 8) {
      const __m256 v = load8(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float ss = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (int64_t k = D8; k < D; ++k) ss += static_cast<float>(xr[k]) * static_cast<float>(xr[k]);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t k = 0; k < D; ++k) {
      const float v = static_cast<float>(xr[k]) * scale;
      o[k] = static_cast<T>(w ? v * w[k] : v);
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16),
              "rms_norm: x must be a contiguous float32 or bfloat16 CPU tensor");
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  std::unique_ptr<float[]> wf;
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous() && w.is_cpu() &&
                    (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                "rms_norm: weight must be a contiguous 1-D float32 or bfloat16 CPU tensor of ", D, " values");
    wf = buffer<float>(D);
    if (w.scalar_type() == at::kFloat) {
      std::copy_n(w.data_ptr<float>(), D, wf.get());
    } else {
      const at::BFloat16* wb = w.data_ptr<at::BFloat16>();
      for (int64_t k = 0; k < D; ++k) wf[k] = static_cast<float>(wb[k]);
    }
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (R == 0) return out;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / D), [&](int64_t r0, int64_t r1) {
    if (dtype == at::kFloat)
      rms_norm_rows(x.data_ptr<float>(), wf.get(), out.data_ptr<float>(), r0, r1, D, e);
    else
      rms_norm_rows(x.data_ptr<at::BFloat16>(), wf.get(), out.data_ptr<at::BFloat16>(), r0, r1, D, e);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Attention of a few queries over the K/V cache (decode): out = softmax(masked q k^T) v, no 1/sqrt(D) scale
// (Gemma 4's q / k norms fix the logit scale).  One pass over K and V per KV head serves all its query rows
// (query heads x new tokens), in fp32 from fp32 or bf16 K/V, with no copies: as ATen ops (bmm, mask, softmax,
// bmm, and a cast for bf16) a decode step of E2B spent ~13 ms in attention; the K/V reads need ~2.
// Keys are split into fixed chunks of KCHUNK, merged by their max and sum (flash-decoding): the two
// threads share one long sequence, and a row's result does not depend on what else is in the batch.
// ---------------------------------------------------------------------------------------------
constexpr int64_t KCHUNK = 128;  // keys per task
constexpr int64_t VBLOCK = 16;   // keys per pass of the p v product (their V rows stay in L1)

// e^x for x <= 0 (scores minus their row max), Cephes' expf: ~1 ulp.  Masked keys are zeroed by the caller.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// scores[r][s] = q[r] . k[s] for RT rows (q: fp32 rows of D), keys s < n.
template <int RT, typename T>
void qk_tile(const float* q, int64_t D, const T* k, int64_t ks, int64_t n, float* scores, int64_t sstride) {
  for (int64_t s = 0; s < n; ++s) {
    const T* kr = k + s * ks;
    __m256 acc[RT];
    for (int r = 0; r < RT; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(kr + d);
      for (int r = 0; r < RT; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), kv, acc[r]);
    }
    for (int r = 0; r < RT; ++r) scores[r * sstride + s] = hsum(acc[r]);
  }
}

// acc[r][:] += sum over keys s < n of p[r][s] v[s][:], for RT rows.
template <int RT, typename T>
void pv_tile(const float* p, int64_t pstride, const T* v, int64_t vs, int64_t n, int64_t D, float* acc) {
  for (int64_t s0 = 0; s0 < n; s0 += VBLOCK) {
    const int64_t s1 = std::min(n, s0 + VBLOCK);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 a[RT];
      for (int r = 0; r < RT; ++r) a[r] = _mm256_loadu_ps(acc + r * D + d);
      for (int64_t s = s0; s < s1; ++s) {
        const __m256 vv = load8(v + s * vs + d);
        for (int r = 0; r < RT; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * pstride + s), vv, a[r]);
      }
      for (int r = 0; r < RT; ++r) _mm256_storeu_ps(acc + r * D + d, a[r]);
    }
  }
}

template <typename T>
using QKFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, float*, int64_t);
template <typename T>
using PVFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, int64_t, float*);
template <typename T>
constexpr QKFn<T> kQK[MR + 1] = {nullptr, qk_tile<1, T>, qk_tile<2, T>, qk_tile<3, T>, qk_tile<4, T>,
                                 qk_tile<5, T>, qk_tile<6, T>, qk_tile<7, T>, qk_tile<8, T>};
template <typename T>
constexpr PVFn<T> kPV[MR + 1] = {nullptr, pv_tile<1, T>, pv_tile<2, T>, pv_tile<3, T>, pv_tile<4, T>,
                                 pv_tile<5, T>, pv_tile<6, T>, pv_tile<7, T>, pv_tile<8, T>};

// One chunk of keys [s0, s0 + n) for the R rows of one KV head: leaves the rows' max score m[r], sum of
// e^(score - m) l[r] and unnormalized output acc[r][D].  mask(r, s): whether row r sees key s.
template <typename T, typename Mask>
void attend_chunk(const float* q, int64_t R, int64_t D, const T* k, int64_t ks, const T* v, int64_t vs,
                  int64_t s0, int64_t n, Mask mask, float* scores, float* m, float* l, float* acc) {
  for (int64_t r = 0; r < R; r += MR) {
    const int rt = static_cast<int>(std::min<int64_t>(MR, R - r));
    kQK<T>[rt](q + r * D, D, k + s0 * ks, ks, n, scores + r * n, n);
  }
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores + r * n;
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; ++s) {
      if (!mask(r, s0 + s)) sr[s] = -INFINITY;
      else mx = std::max(mx, sr[s]);
    }
    m[r] = mx;
    if (mx == -INFINITY) {  // no key of this chunk is seen: it adds nothing
      std::fill_n(sr, n, 0.0f);
      l[r] = 0.0f;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
    __m256 sum = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      const __m256 x = _mm256_loadu_ps(sr + s);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, mv)), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(sr + s, e);
      sum = _mm256_add_ps(sum, e);
    }
    float tail = 0.0f;
    for (; s < n; ++s) tail += sr[s] = sr[s] == -INFINITY ? 0.0f : std::exp(sr[s] - mx);
    l[r] = hsum(sum) + tail;
  }
  std::fill_n(acc, R * D, 0.0f);
  for (int64_t r = 0; r < R; r += MR) {
    const int rt = static_cast<int>(std::min<int64_t>(MR, R - r));
    kPV<T>[rt](scores + r * n, n, v + s0 * vs, vs, n, D, acc + r * D);
  }
}

template <typename T>
void decode_attention_impl(const float* q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                           int64_t H, int64_t T_, float* out) {
  const int64_t B = k.size(0), K = k.size(1), S = k.size(2), D = k.size(3), G = H / K, R = G * T_;
  const int64_t nchunks = (S + KCHUNK - 1) / KCHUNK, items = B * K;
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  const bool* mp = mask.data_ptr<bool>();
  const int64_t mb = mask.stride(0), mt = mask.stride(2), ms = mask.stride(3);
  // per (item, chunk): m [R], l [R], acc [R][D]
  auto part = buffer<float>(items * nchunks * R * (D + 2));
  at::parallel_for(0, items * nchunks, 1, [&](int64_t t0, int64_t t1) {
    auto scores = buffer<float>(R * KCHUNK);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t item = task / nchunks, c = task % nchunks, b = item / K, h = item % K;
      const int64_t s0 = c * KCHUNK, n = std::min(KCHUNK, S - s0);
      const bool* mrow = mp + b * mb;
      auto seen = [&](int64_t r, int64_t s) { return mrow[(r % T_) * mt + s * ms]; };  // row r = (g, t)
      float* pm = part.get() + task * R * (D + 2);
      attend_chunk(q + (b * H + h * G) * T_ * D, R, D, kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                   vp + b * v.stride(0) + h * v.stride(1), v.stride(2), s0, n, seen, scores.get(), pm, pm + R,
                   pm + 2 * R);
    }
  });
  // Merge the chunks in order: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
  at::parallel_for(0, items * R, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t item = i / R, r = i % R;
      const float* first = part.get() + item * nchunks * R * (D + 2);
      auto mof = [&](int64_t c) { return first[c * R * (D + 2) + r]; };
      float M = -INFINITY;
      for (int64_t c = 0; c < nchunks; ++c) M = std::max(M, mof(c));
      float* o = out + (item * R + r) * D;  // [B, K, G, T, D] = [B, H, T, D]
      std::fill_n(o, D, 0.0f);
      if (M == -INFINITY) continue;  // a row that sees no key: zeros
      float L = 0.0f;
      for (int64_t c = 0; c < nchunks; ++c) {
        const float* pc = first + c * R * (D + 2);
        if (pc[r] == -INFINITY) continue;
        const float w = std::exp(pc[r] - M);
        L += w * pc[R + r];
        const float* a = pc + 2 * R + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= L;
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  auto fp = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; };
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "decode_attention: q [B, H, T, D], k and v [B, K, S, D], mask [B, 1, T, S]");
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && mask.is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(fp(q) && fp(k) && k.scalar_type() == v.scalar_type(),
              "decode_attention: q, k, v must be float32 or bfloat16 (k and v alike)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && K > 0 && H % K == 0,
              "decode_attention: k and v must be [B, K, S, D] with K dividing the ", H, " query heads");
  TORCH_CHECK(D % 8 == 0 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: head dim must be a multiple of 8, contiguous in k and v");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T &&
                  mask.size(3) == S, "decode_attention: mask must be bool [B, 1, T, S]");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, T, D}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(q.scalar_type());
  if (S == 0) return out.zero_().to(q.scalar_type());
  if (k.scalar_type() == at::kFloat)
    decode_attention_impl<float>(qf.data_ptr<float>(), k, v, mask, H, T, out.data_ptr<float>());
  else
    decode_attention_impl<at::BFloat16>(qf.data_ptr<float>(), k, v, mask, H, T, out.data_ptr<float>());
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

}  // namespace

// Schemas, then CPU implementations (not CompositeImplicit: torch.compile needs a fake kernel for the ops,
// which kernels.py registers, and a composite op may not have one).
TORCH_LIBRARY(gemma4_kernels, m) {
  m.def("qgemv(Tensor x, Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("dequant(Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("dequant_into(Tensor qweight, Tensor scales, int bits, int group_size, Tensor(a!) out) -> ()");
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma4_kernels, CPU, m) {
  m.impl("qgemv", &qgemv);
  m.impl("dequant", &dequant);
  m.impl("dequant_into", &dequant_into);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
}
