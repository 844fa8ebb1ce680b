// The CPU kernels as PyTorch ops: weight x few-rows products for the decode step (int4 / int8 / bf16 weights),
// dequantization for prefill, RMSNorm and decode attention.  The products' core is torch-free (gemv.h, one
// implementation per instruction set); this file checks the tensors, splits the work between threads and
// registers the ops.  It is compiled once per instruction set (gemma4.hardware.ISAS, kernels.py), each build
// registering its ops under its own namespace, torch.ops.GEMMA4_OPS (gemma4_avx2, gemma4_avx512_bf16, ...),
// so that one process can load and compare several.  RMSNorm, decode attention and gelu_mul have x86 versions
// only: elsewhere ops.py runs them in PyTorch.
//
// Only light headers: <torch/extension.h> (pybind + all of ATen) triples the first-use compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>

#include "gemv.h"

#ifndef GEMMA4_OPS
#define GEMMA4_OPS gemma4_kernels
#endif

namespace {

using gemv::buffer;
using gemv::MR;
using gemv::QK;

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

// Writes fp32 sums into out [M, N] in its dtype (fp32, bf16 rounded to nearest, fp16).
struct Store {
  void* base;
  int64_t N;
  at::ScalarType dtype;
  void operator()(int64_t m, int64_t n, float v) const {
    if (dtype == at::kFloat) static_cast<float*>(base)[m * N + n] = v;
    else if (dtype == at::kBFloat16) static_cast<at::BFloat16*>(base)[m * N + n] = at::BFloat16(v);
    else static_cast<at::Half*>(base)[m * N + n] = at::Half(v);
  }
};

// Weight rows per thread: one contiguous chunk each, so each thread streams its own part of the weights;
// under ~256 KB of weights the work stays on one thread (waking a second one costs a few microseconds).
int64_t row_grain(int64_t N, int64_t bytes_per_row, int64_t min_rows) {
  const int64_t nthreads = at::get_num_threads();
  return std::max<int64_t>((N + nthreads - 1) / nthreads, std::max<int64_t>(min_rows, (256 * 1024) / bytes_per_row));
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

  gemv::Acts a = gemv::make_acts(M, K, static_cast<int>(bits));
  // Small (M*K floats): a second thread only when there is enough of it to pay for a parallel region.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    if (x.scalar_type() == at::kFloat)
      gemv::quantize_rows(x.data_ptr<float>(), m0, m1, a);
    else if (x.scalar_type() == at::kBFloat16)
      gemv::quantize_rows(reinterpret_cast<const gemv::bf16*>(x.data_ptr<at::BFloat16>()), m0, m1, a);
    else
      gemv::quantize_rows(reinterpret_cast<const gemv::f16*>(x.data_ptr<at::Half>()), m0, m1, a);
  });
  const uint8_t* w = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const Store store{out.data_ptr(), N, out.scalar_type()};
  at::parallel_for(0, N, row_grain(N, (bits == 4 ? K / 2 : K) * M, 1), [&](int64_t n0, int64_t n1) {
    gemv::qgemv_rows(a, w, s, group_size, n0, n1, store);
  });
  return out;
}

// bf16 weights x few rows (decode steps of bf16 models), fp32 sums rounded once to bf16.
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
  const gemv::Bf16X p = gemv::prepare_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K);
  const uint16_t* wbase = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const Store store{out.data_ptr(), N, out.scalar_type()};
  at::parallel_for(0, N, row_grain(N, K * 2 * M, 2), [&](int64_t n0, int64_t n1) {
    gemv::gemv_bf16_rows(p, wbase, n0, n1, store);
  });
  return out;
}

// W = q * scale as [N, K] (fp32 or bf16), for prefill's GEMM.  dequant_into writes into a given contiguous
// buffer: prefill reuses one for every slice of every weight (a fresh 4 MB buffer each was ~1 GB of new pages,
// i.e. page faults, per 512-token int4 prefill).
void dequant_into(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size,
                  at::Tensor& out) {
  const int64_t K = check_weight(qweight, scales, bits, group_size);
  const int64_t N = qweight.size(0);
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == N && out.size(1) == K,
              "dequant_into: out must be a contiguous float32 or bfloat16 [", N, ", ", K, "] tensor");
  const uint8_t* w = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
    if (out.scalar_type() == at::kFloat)
      gemv::dequant_rows(w, s, static_cast<int>(bits), K, group_size, n0, n1, out.data_ptr<float>() + n0 * K);
    else
      gemv::dequant_rows(w, s, static_cast<int>(bits), K, group_size, n0, n1,
                         reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + n0 * K);
  });
}

at::Tensor dequant(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  const int64_t K = check_weight(qweight, scales, bits, group_size);
  at::Tensor out = at::empty({qweight.size(0), K}, qweight.options().dtype(at::kFloat));
  dequant_into(qweight, scales, bits, group_size, out);
  return out;
}

#if defined(__AVX2__)
using gemv::hsum;
using gemv::load8;
inline __m256 load8(const at::BFloat16* x) { return gemv::load8(reinterpret_cast<const gemv::bf16*>(x)); }

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

// e^x, Cephes' expf: ~1 ulp on [-87, 88], clamped outside.  Attention's masked keys are zeroed by the caller.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
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
// ---------------------------------------------------------------------------------------------
// gate = gelu_tanh(gate) * up, in place: the gated MLP's activation (and the PLE gate's) in one pass where
// ATen runs two (gelu, mul), each step as ATen orders it: 0.5 x (1 + tanh(b (x + k x^3))), rounded to the
// dtype, times up.  tanh(u) = sign(u) (1 - 2 / (1 + e^{2|u|})) is correctly rounded near +-1 as ATen's (Sleef)
// is, so 1 + tanh keeps the same (few) bits where x < -3: a more accurate x / (1 + e^{-2u}) differed from
// ATen in 7.5% of bf16 values.  ATen's tanh gelu alone took 5-10 ms on a [512, 6144] bf16 tensor.
inline __m256 gelu8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f), x3)));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 au = _mm256_andnot_ps(sign, u);
  const __m256 s = _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_add_ps(au, au))));
  const __m256 t = _mm256_or_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), s), _mm256_and_ps(sign, u));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}

inline float gelu1(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
  return 0.5f * x * (1.0f + std::tanh(u));
}

// fp32 -> bf16 rounded to nearest even, as at::BFloat16(float), left in the high half of each lane.
inline __m256i bf16_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd),
                          _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline void store8(at::BFloat16* o, __m256 v) {
  const __m256i u = _mm256_srli_epi32(bf16_high(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}
template <typename T>
inline __m256 round_to(__m256 v) {  // v as a T holds it
  if constexpr (std::is_same_v<T, float>) return v;
  else return _mm256_castsi256_ps(bf16_high(v));
}

template <typename T>
void gelu_mul_range(T* g, const T* u, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) store8(g + i, _mm256_mul_ps(round_to<T>(gelu8(load8(g + i))), load8(u + i)));
  for (; i < i1; ++i) g[i] = static_cast<T>(static_cast<float>(static_cast<T>(gelu1(static_cast<float>(g[i])))) *
                                            static_cast<float>(u[i]));
}

void gelu_mul(at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.is_cpu() && up.is_cpu() && gate.is_contiguous() && up.is_contiguous() &&
                  gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() &&
                  (gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16),
              "gelu_mul: gate and up must be contiguous float32 or bfloat16 CPU tensors of one shape and dtype");
  const bool bf16 = gate.scalar_type() == at::kBFloat16;
  at::parallel_for(0, gate.numel(), 16384, [&](int64_t i0, int64_t i1) {
    if (bf16)
      gelu_mul_range(gate.data_ptr<at::BFloat16>(), up.data_ptr<at::BFloat16>(), i0, i1);
    else
      gelu_mul_range(gate.data_ptr<float>(), up.data_ptr<float>(), i0, i1);
  });
}
#endif  // __AVX2__

}  // namespace

// Schemas, then CPU implementations (not CompositeImplicit: torch.compile needs a fake kernel for the ops,
// which kernels.py registers, and a composite op may not have one).  LIBRARY expands GEMMA4_OPS first.
#define LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
LIBRARY(GEMMA4_OPS, m) {
  m.def("qgemv(Tensor x, Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("dequant(Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("dequant_into(Tensor qweight, Tensor scales, int bits, int group_size, Tensor(a!) out) -> ()");
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
#if defined(__AVX2__)
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("gelu_mul(Tensor(a!) gate, Tensor up) -> ()");
#endif
}

LIBRARY_IMPL(GEMMA4_OPS, CPU, m) {
  m.impl("qgemv", &qgemv);
  m.impl("dequant", &dequant);
  m.impl("dequant_into", &dequant_into);
  m.impl("gemv_bf16", &gemv_bf16);
#if defined(__AVX2__)
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
  m.impl("gelu_mul", &gelu_mul);
#endif
}
