// Weight-only int4 / int8 matrix x few-rows kernels for the decode step (AVX2 + FMA + F16C).
//
//   out[m, n] = sum_k x[m, k] * dequant(W)[n, k]        x: float32 [M, K], out: float32 [M, N]
//
// Weights (see kernels.py): per output row, blocks of 32 along K; one fp16 scale per group of
// `group_size` weights (a multiple of 32).  int4: 16 bytes per block, byte j = (q[j]+8) | (q[j+16]+8) << 4.
// int8: plain int8.
//
// Scheme (llama.cpp's Q4_0 x Q8_0): each activation row is quantized per 32-block to int8 with its own
// float scale, then every block is an integer dot product on vpmaddubsw/vpmaddwd, converted to float
// once per block and accumulated with (weight scale x activation scale).  Decode is memory bound
// (M = 1: ~4 bytes of weights per multiply-add at 18 GB/s), so the aim is to touch every weight byte once
// with few instructions; everything that depends only on x is precomputed once per call.
//
// Only light headers: <torch/extension.h> (pybind + all of ATen) triples the first-use compile time.
// The op is registered with the dispatcher as torch.ops.gemma4_kernels.qgemv.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <vector>

namespace {

constexpr int QK = 32;      // block length along K (weights and activations)

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

// ---------------------------------------------------------------------------------------------
// Activations: x [M, K] float -> per 32-block int8 + scale (Q8_0), plus what the kernels precompute.
// ---------------------------------------------------------------------------------------------
struct Acts {
  int64_t M = 0, K = 0, nb = 0, np = 0;
  std::vector<int8_t> q;     // [M][K]: int8 values; int4 path: pair-interleaved layout (below)
  std::vector<uint8_t> qa;   // int8 path: |q| (vpmaddubsw wants one unsigned operand)
  std::vector<float> d;      // [M][nb]: block scales
  std::vector<float> dpair;  // int4 path: [M][np][8] = {d[2p] x4, d[2p+1] x4}, matching the int32 lanes
  std::vector<float> c;      // int4 path: [M][nb] = 8 * d * sum(q): the +8 nibble offset, corrected once per row
};

// Quantizes 32 floats to int8 with scale amax/127 (round to nearest); returns scale and sum of q.
inline float quant_block(const float* x, int8_t* q, int* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i i[4];
  for (int j = 0; j < 4; ++j)
    i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  *sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
  // packs work within 128-bit lanes; the final permute restores element order.
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  return d;
}

// int4 layout: blocks are taken in pairs (2p, 2p+1) so that one 32-byte weight load covers two blocks:
// w & 0xF = {blk 2p elems 0-15 | blk 2p+1 elems 0-15}, w >> 4 = {blk 2p elems 16-31 | blk 2p+1 elems 16-31}.
// The activation pair is stored to match: [2p lo16 | 2p+1 lo16 | 2p hi16 | 2p+1 hi16] (64 bytes).
// An odd last block stays in natural order.
void quantize_acts(const float* x, int64_t M, int64_t K, int bits, Acts& a) {
  a.M = M; a.K = K; a.nb = K / QK; a.np = a.nb / 2;
  const int64_t nb = a.nb, np = a.np;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  if (bits == 8) a.qa.resize(M * K);
  if (bits == 4) { a.dpair.resize(M * np * 8); a.c.resize(M * nb); }
  // Small (M*K floats); more than one thread only when there is enough of it to pay for a parallel region.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    alignas(32) int8_t tmp[QK];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        int sum;
        const float d = quant_block(x + m * K + b * QK, tmp, &sum);
        a.d[m * nb + b] = d;
        int8_t* dst = a.q.data() + m * K;
        if (bits == 8) {
          std::memcpy(dst + b * QK, tmp, QK);
          const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.qa.data() + m * K + b * QK), _mm256_abs_epi8(v));
        } else {
          a.c[m * nb + b] = 8.0f * d * static_cast<float>(sum);
          if (b < 2 * np) {
            const int64_t p = b / 2, odd = b & 1;
            std::memcpy(dst + p * 64 + odd * 16, tmp, 16);
            std::memcpy(dst + p * 64 + 32 + odd * 16, tmp + 16, 16);
            for (int j = 0; j < 4; ++j) a.dpair[(m * np + p) * 8 + odd * 4 + j] = d;
          } else {
            std::memcpy(dst + b * QK, tmp, QK);
          }
        }
      }
    }
  });
}

// Weight scales of one row (fp16, one per group) -> one float per 32-block.
inline void row_scales(const uint16_t* s, int64_t nb, int64_t bpg, float* out) {
  if (bpg == 1) {
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8)
      _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b))));
    for (; b < nb; ++b) out[b] = _cvtsh_ss(s[b]);
  } else {
    for (int64_t g = 0; g < nb / bpg; ++g) {
      const float v = _cvtsh_ss(s[g]);
      for (int64_t j = 0; j < bpg; ++j) out[g * bpg + j] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels: NR weight rows x MR activation rows, all NR*MR accumulators in registers.
// Several weight rows at once give independent FMA chains and share the activation loads (M = 1);
// several activation rows share each unpacked weight block (M > 1).
// ---------------------------------------------------------------------------------------------
struct Rows {
  const uint8_t* w;   // first weight row
  int64_t w_stride;   // bytes between weight rows
  const float* dw;    // [NR][nb] weight scales per 32-block
  const float* comb;  // int8: [NR][M][nb] weight scale x activation scale, at activation row m0
  int64_t comb_stride;
};

// int4, per block pair: 1 load + 3 ops to unpack a weight row, then per activation row
// 2 vpmaddubsw (unsigned nibble x signed activation) + add + vpmaddwd + cvt + mul + fma.
// The nibbles are used unsigned (0..15); the -8 offset is subtracted once per output (Acts::c).
template <int NR, int MR>
void dot_q4(const Rows& R, const Acts& a, int64_t m0, float* out /* [NR][MR] */) {
  const int64_t K = a.K, nb = a.nb, np = a.np;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + m0 * K;
  const float* xd = a.dpair.data() + m0 * np * 8;
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    for (int i = 0; i < NR; ++i) {
      if (dbg_pf && (p & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(R.w + i * R.w_stride + p * 32 + dbg_pf), _MM_HINT_T0);
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(R.w + i * R.w_stride + p * 32));
      const __m256i wlo = _mm256_and_si256(wb, low);
      const __m256i whi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), low);
      const float* dw = R.dw + i * nb + 2 * p;
      const __m256 dwv = _mm256_set_m128(_mm_broadcast_ss(dw + 1), _mm_broadcast_ss(dw));
      for (int r = 0; r < MR; ++r) {
        const int8_t* xr = xq + r * K + p * 64;
        const __m256i s = _mm256_add_epi16(
            _mm256_maddubs_epi16(wlo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_maddubs_epi16(whi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)),
                                       _mm256_loadu_ps(xd + (r * np + p) * 8));
        acc[i][r] = _mm256_fmadd_ps(f, dwv, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) out[i * MR + r] = hsum(acc[i][r]);
  if (nb & 1) {  // odd last block, natural layout
    const int64_t b = nb - 1;
    for (int i = 0; i < NR; ++i) {
      const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(R.w + i * R.w_stride + b * 16));
      const __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w16, 4), w16), low);
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
        const int dot = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones));
        out[i * MR + r] += R.dw[i * nb + b] * a.d[(m0 + r) * nb + b] * static_cast<float>(dot);
      }
    }
  }
}

// int8, per block, per activation row: sign(w, x) + vpmaddubsw(|x|, .) + vpmaddwd + cvt + fma with
// the combined scale (one broadcast load).
template <int NR, int MR>
void dot_q8(const Rows& R, const Acts& a, int64_t m0, float* out /* [NR][MR] */) {
  const int64_t K = a.K, nb = a.nb;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + m0 * K;
  const uint8_t* xa = a.qa.data() + m0 * K;
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int i = 0; i < NR; ++i) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(R.w + i * R.w_stride + b * QK));
      for (int r = 0; r < MR; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
        const __m256i ax = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + r * K + b * QK));
        const __m256i s = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, x));
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)),
                                    _mm256_broadcast_ss(R.comb + i * R.comb_stride + r * nb + b), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < MR; ++r) out[i * MR + r] = hsum(acc[i][r]);
}

using DotFn = void (*)(const Rows&, const Acts&, int64_t, float*);

// Which (NR, MR) kernels exist: NR * MR <= 8 accumulators (16 ymm registers in all).
template <template <int, int> class Sel>
constexpr DotFn pick(int nr, int mr) {
  return nr == 4 ? (mr == 1 ? Sel<4, 1>::f : Sel<4, 2>::f)
       : nr == 2 ? (mr == 1 ? Sel<2, 1>::f : mr == 2 ? Sel<2, 2>::f : mr == 3 ? Sel<2, 3>::f : Sel<2, 4>::f)
       : (mr == 1 ? Sel<1, 1>::f : mr == 2 ? Sel<1, 2>::f : mr == 3 ? Sel<1, 3>::f : mr == 4 ? Sel<1, 4>::f
          : mr == 5 ? Sel<1, 5>::f : mr == 6 ? Sel<1, 6>::f : mr == 7 ? Sel<1, 7>::f : Sel<1, 8>::f);
}
template <int NR, int MR> struct Q4 { static constexpr DotFn f = dot_q4<NR, MR>; };
template <int NR, int MR> struct Q8 { static constexpr DotFn f = dot_q8<NR, MR>; };

static int dbg_nr = getenv("QG_NR") ? atoi(getenv("QG_NR")) : 4;
static int dbg_pf = getenv("QG_PF") ? atoi(getenv("QG_PF")) : 0;
inline int rows_for(int64_t mr) { return mr <= 2 ? dbg_nr : mr <= 4 ? 2 : 1; }

constexpr int G = 4;  // weight rows prepared together (the largest NR)

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                 int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "qgemv: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % QK == 0, "qgemv: group_size must be a positive multiple of 32");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "qgemv: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.is_cpu(),
              "qgemv: qweight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "qgemv: qweight must be uint8 for bits=4 and int8 for bits=8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % group_size == 0, "qgemv: K=", K, " is not a multiple of group_size=", group_size);
  TORCH_CHECK(qweight.size(1) == (bits == 4 ? K / 2 : K), "qgemv: qweight shape ", qweight.sizes(),
              " does not match K=", K);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.is_cpu() && scales.size(0) == N && scales.size(1) == K / group_size,
              "qgemv: scales must be a contiguous float16 tensor of shape [N, K/group_size]");

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) { out.zero_(); return out; }

  Acts a;
  quantize_acts(x.data_ptr<float>(), M, K, static_cast<int>(bits), a);

  const int64_t nb = K / QK, bpg = group_size / QK, ng = K / group_size;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  const uint8_t* wbase = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* sbase = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* obase = out.data_ptr<float>();

  // M is split into nearly equal tiles of at most 8 rows.
  const int64_t ntiles = (M + 7) / 8;
  // One contiguous chunk of rows per thread (each thread streams its own part of the weights);
  // small matrices stay on one thread: a parallel region costs more than streaming 256 KB.
  const int64_t nthreads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(G, (256 * 1024) / std::max<int64_t>(1, row_bytes * M));
  const int64_t grain = std::max<int64_t>((N + nthreads - 1) / nthreads, min_rows);

  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> dw(G * nb), comb(bits == 8 ? G * M * nb : 0);
    float res[G * 8];
    for (int64_t n = n0; n < n1; n += G) {
      const int64_t g = std::min<int64_t>(G, n1 - n);
      for (int64_t i = 0; i < g; ++i) {
        row_scales(sbase + (n + i) * ng, nb, bpg, dw.data() + i * nb);
        if (bits == 8) {
          for (int64_t m = 0; m < M; ++m) {
            const float* xd = a.d.data() + m * nb;
            const float* wd = dw.data() + i * nb;
            float* cm = comb.data() + (i * M + m) * nb;
            int64_t b = 0;
            for (; b + 8 <= nb; b += 8)
              _mm256_storeu_ps(cm + b, _mm256_mul_ps(_mm256_loadu_ps(wd + b), _mm256_loadu_ps(xd + b)));
            for (; b < nb; ++b) cm[b] = wd[b] * xd[b];
          }
        }
      }
      int64_t m0 = 0;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t mr = (M - m0) / (ntiles - t);
        for (int64_t i = 0; i < g;) {
          const int nr = g - i >= rows_for(mr) ? rows_for(mr) : 1;
          const Rows R{wbase + (n + i) * row_bytes, row_bytes, dw.data() + i * nb,
                       bits == 8 ? comb.data() + (i * M + m0) * nb : nullptr, M * nb};
          (bits == 4 ? pick<Q4>(nr, mr) : pick<Q8>(nr, mr))(R, a, m0, res);
          for (int j = 0; j < nr; ++j) {
            for (int64_t r = 0; r < mr; ++r) {
              float v = res[j * mr + r];
              if (bits == 4) {  // the +8 nibble offset: subtract sum_b dw[b] * 8 * d[b] * sum(q_b)
                const float* c = a.c.data() + (m0 + r) * nb;
                const float* wd = dw.data() + (i + j) * nb;
                __m256 s = _mm256_setzero_ps();
                int64_t b = 0;
                for (; b + 8 <= nb; b += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(wd + b), _mm256_loadu_ps(c + b), s);
                float corr = hsum(s);
                for (; b < nb; ++b) corr += wd[b] * c[b];
                v -= corr;
              }
              obase[(m0 + r) * N + n + i + j] = v;
            }
          }
          i += nr;
        }
        m0 += mr;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gemma4_kernels, m) {
  m.def("qgemv(Tensor x, Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor", &qgemv);
}
