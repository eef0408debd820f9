// qlin's fused per-token kernels (CPU), built once per machine by native.py.
//
// quantize_rows: one parallel region over the rows of x (M, K) float32; per row, SmoothQuant's
//   division (optional), then min/max, then uint8 codes, bit-identical to the torch-op path
//   (kernels._Fbgemm per token + fbgemm's own input quantization):
//     width = max(hi - lo, MIN_SCALE); inv = 1 / width; t = (x - lo) * inv;
//     u = clamp(rne(t * INV_S), 0, 255) with INV_S = 1.f / float(1.0 / 255) (fbgemm's reciprocal);
//   returns u (M, K), a = width / 255 and c = lo (x ~ a * u + c), and the row sums of u.
// epilogue_: one parallel region, in place (or into `out`):
//     y[m, n] = a[m] * (y[m, n] - rowsum[m] * zs[n]) + c[m] * wsum[n] + b[n]
//   (zs = weight scale * zero point: asymmetric weights only).
// pertoken_linear: both, with the GEMM between them, in one call for a few rows (below).
//
// Built with -ffp-contract=off so that the quantize pass's mul/sub never become an FMA (that would
// change codes); the epilogue uses explicit FMAs. Small row blocks run on one thread (grain).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>  // lowbit_linear's AVX2 path
#endif
#if defined(QLIN_SIMDE_AVX512)
// Tests only (tests/other_build.py): the AVX-512 and VNNI loops built for a CPU without them, each
// intrinsic taken from SIMDe's portable versions, so that a machine without AVX-512 checks those
// loops' bits against its scalar loops and the torch references. Never a build qlin runs models on.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define QLIN_AVX512 1
#ifndef QLIN_SIMDE_NO_VNNI  // (by hand: an AVX-512 CPU without VNNI, such as Skylake-SP)
#define QLIN_AVX512_VNNI 1
#endif
// What SIMDe 0.8 lacks or does otherwise than the instructions, lane by lane as Intel's guide
// defines them: conversions it has no version of, and masked loads and stores that touch only the
// lanes their mask names (SIMDe's read and write the whole vector: past the end of a row).
namespace qlin_simde {
template <class To, class From, class Out, class In>
inline Out convert(In a) {  // lane i of the result: To(lane i of a), as many lanes as `a` has
  constexpr int N = sizeof(In) / sizeof(From);
  From in[N];
  To out[sizeof(Out) / sizeof(To)] = {};
  std::memcpy(in, &a, sizeof(a));
  for (int i = 0; i < N; ++i) out[i] = static_cast<To>(in[i]);
  Out r;
  std::memcpy(&r, out, sizeof(r));
  return r;
}
template <class T, class V, class Mask>
inline V maskz_loadu(Mask k, const void* p) {
  T v[sizeof(V) / sizeof(T)] = {};
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(T)); ++i)
    if ((k >> i) & 1) std::memcpy(&v[i], static_cast<const T*>(p) + i, sizeof(T));
  V r;
  std::memcpy(&r, v, sizeof(r));
  return r;
}
template <class T, class V, class Mask>
inline void mask_storeu(void* p, Mask k, V a) {
  T v[sizeof(V) / sizeof(T)];
  std::memcpy(v, &a, sizeof(a));
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(T)); ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<T*>(p) + i, &v[i], sizeof(T));
}
inline int reduce_add_epi32(__m512i a) {  // the adds wrap, as the instructions' do
  uint32_t v[16], sum = 0;
  std::memcpy(v, &a, sizeof(a));
  for (uint32_t x : v) sum += x;
  return static_cast<int>(sum);
}
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {  // one rounding a lane, as vfmadd
  float x[16], y[16], z[16];
  std::memcpy(x, &a, sizeof(a));
  std::memcpy(y, &b, sizeof(b));
  std::memcpy(z, &c, sizeof(c));
  for (int i = 0; i < 16; ++i) x[i] = std::fma(x[i], y[i], z[i]);
  std::memcpy(&a, x, sizeof(a));
  return a;
}
}  // namespace qlin_simde
#if !defined(__FMA__)  // SIMDe multiplies and adds apart (two roundings) on a CPU without FMA
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps(a, b, c) (qlin_simde::fmadd_ps(a, b, c))
#endif
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_mask_storeu_epi16
#define _mm512_cvtepi32_epi16(a) (qlin_simde::convert<int16_t, int32_t, __m256i>(a))
#define _mm512_cvtepi32_epi8(a) (qlin_simde::convert<int8_t, int32_t, __m128i>(a))
#define _mm512_cvtepi8_epi32(a) (qlin_simde::convert<int32_t, int8_t, __m512i>(a))
#define _mm512_cvtepu8_epi32(a) (qlin_simde::convert<int32_t, uint8_t, __m512i>(a))
#define _mm512_maskz_loadu_epi8(k, p) (qlin_simde::maskz_loadu<int8_t, __m512i>(k, p))
#define _mm512_maskz_loadu_ps(k, p) (qlin_simde::maskz_loadu<float, __m512>(k, p))
#define _mm512_mask_storeu_ps(p, k, a) (qlin_simde::mask_storeu<float, __m512>(p, k, a))
#define _mm256_mask_storeu_epi16(p, k, a) (qlin_simde::mask_storeu<int16_t, __m256i>(p, k, a))
#define _mm512_reduce_add_epi32(a) (qlin_simde::reduce_add_epi32(a))
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QLIN_AVX512 1
#if defined(__AVX512VNNI__)
#define QLIN_AVX512_VNNI 1
#endif
#endif

namespace {

constexpr float MIN_SCALE = 9.094947017729282e-13f;  // 2**-40, primitives.MIN_SCALE
constexpr int64_t WORK_PER_TASK = 32768;             // elements a thread takes at least

float inv_s_fbgemm() {
  volatile float s = static_cast<float>(1.0 / 255.0);
  return 1.0f / s;
}

// Rows are float32 or bfloat16 (T): a bf16 value is read as the float32 it is exactly (its 16 bits
// above 16 zero bits), so a bf16 row gets the codes of its float32 copy, bit for bit, without
// that copy. Outputs are written as float32, or rounded to bf16 as a tensor's .to(bfloat16)
// rounds on CPU (round to nearest even; NaN -> 0xFFFF, ATen's vectorized conversion), so
// y.to(bfloat16) and a bf16 output are the same bits.
using bf16 = at::BFloat16;
using f16 = at::Half;  // the low-bit kernels' scales where they are float16 values (converted exactly)
inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline float to_float(f16 v) { return static_cast<float>(v); }
inline void store_out(float* y, float v) { *y = v; }
inline void store_out(bf16* y, float v) {
  *y = std::isnan(v) ? bf16(0xFFFF, bf16::from_bits()) : bf16(v);  // c10's round to nearest even
}
#ifdef QLIN_AVX512
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const f16* x) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __m512 load16(const bf16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// store_out's rounding on 16 lanes: round to nearest even in integers, NaN -> 0xFFFF
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(float* y, __m512 v, __mmask16 m = 0xFFFF) { _mm512_mask_storeu_ps(y, m, v); }
inline void store16(bf16* y, __m512 v, __mmask16 m = 0xFFFF) { _mm256_mask_storeu_epi16(y, m, to_bf16(v)); }
#endif

#if defined(__AVX2__) && !defined(QLIN_AVX512)
#define QLIN_AVX2_ROWS 1  // quantize_into's AVX2 loops (a decode step's codes: ~10-20 us a layer in scalar)
#endif
#if defined(__AVX2__)  // (also in AVX-512 builds: the static rows' loop)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
#if defined(__F16C__)
inline __m256 load8(const f16* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
#endif
inline __m256 load8(const bf16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// the low byte of each of the 8 int32 lanes of i (codes in [0, 255]) into u[0 .. 8)
inline void store_codes8(uint8_t* u, __m256i i) {
  const __m256i bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                         0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(i, bytes), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(u), _mm256_castsi256_si128(b));
}
inline int64_t sum8(__m256i acc) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int64_t total = 0;
  for (int j = 0; j < 8; ++j) total += lanes[j];
  return total;
}
#endif

// a vector loop's lanes into lo, hi in lane order, compared as the scalar loop compares
inline void merge_lanes(const float* mins, const float* maxs, int lanes, float& lo, float& hi) {
  for (int j = 0; j < lanes; ++j) {
    lo = mins[j] < lo ? mins[j] : lo;
    hi = maxs[j] > hi ? maxs[j] : hi;
  }
}

// xs[k] = x[k] / smooth[k] into buf (when smooth); lo, hi of the (smoothed) row
template <typename T>
void row_min_max(const T* x, const float* sm, float* buf, int64_t K, float& lo, float& hi) {
  int64_t k = 0;
  lo = INFINITY;
  hi = -INFINITY;
  auto scan = [&](int64_t from) {
    for (int64_t t = from; t < K; ++t) {
      float v = to_float(x[t]);
      if (sm) {
        v = v / sm[t];
        buf[t] = v;
      }
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
  };
#ifdef QLIN_AVX2_ROWS
  // (both vector loops) lane by lane as the scalar loop compares (vminps(v, acc) is `v < acc ? v :
  // acc`: a NaN is skipped), then the lanes in order; -0.0 and 0.0 compare equal, so a row whose
  // lo or hi is a zero is scanned again in the scalar loop's order (below): the first one met
  __m256 vmin = _mm256_set1_ps(INFINITY), vmax = _mm256_set1_ps(-INFINITY);
  for (; k + 8 <= K; k += 8) {
    __m256 v = load8(x + k);
    if (sm) {
      v = _mm256_div_ps(v, _mm256_loadu_ps(sm + k));
      _mm256_storeu_ps(buf + k, v);
    }
    vmin = _mm256_min_ps(v, vmin);
    vmax = _mm256_max_ps(v, vmax);
  }
  alignas(32) float mins[8], maxs[8];
  _mm256_store_ps(mins, vmin);
  _mm256_store_ps(maxs, vmax);
  merge_lanes(mins, maxs, 8, lo, hi);
#endif
#ifdef QLIN_AVX512
  __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY);
  for (; k + 16 <= K; k += 16) {
    __m512 v = load16(x + k);
    if (sm) {
      v = _mm512_div_ps(v, _mm512_loadu_ps(sm + k));
      _mm512_storeu_ps(buf + k, v);
    }
    vmin = _mm512_min_ps(v, vmin);
    vmax = _mm512_max_ps(v, vmax);
  }
  alignas(64) float mins[16], maxs[16];
  _mm512_store_ps(mins, vmin);
  _mm512_store_ps(maxs, vmax);
  merge_lanes(mins, maxs, 16, lo, hi);
#endif
  scan(k);
#if defined(QLIN_AVX2_ROWS) || defined(QLIN_AVX512)
  if (k > 0 && (lo == 0.0f || hi == 0.0f)) {
    lo = INFINITY;
    hi = -INFINITY;
    scan(0);
  }
#endif
}

// u[k] = clamp(rne(((x[k] - lo) * inv) * inv_s), 0, 255); returns the sum of u
template <typename T>
int64_t quantize_row(const T* x, uint8_t* u, int64_t K, float lo, float inv, float inv_s) {
  int64_t k = 0, total = 0;
#ifdef QLIN_AVX512
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv), vs = _mm512_set1_ps(inv_s);
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  __m512i acc = _mm512_setzero_si512();
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load16(x + k), vlo), vinv), vs);
    __m512i i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), zero), top);  // rne
    acc = _mm512_add_epi32(acc, i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(i));
  }
  total = _mm512_reduce_add_epi32(acc);
#endif
#ifdef QLIN_AVX2_ROWS
  {  // the same operations; vcvtps2dq rounds to nearest even as nearbyint does (default MXCSR)
    const __m256 vlo = _mm256_set1_ps(lo), vinv = _mm256_set1_ps(inv), vs = _mm256_set1_ps(inv_s);
    const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
    __m256i acc = _mm256_setzero_si256();
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(load8(x + k), vlo), vinv), vs);
      const __m256i i = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), zero), top);
      acc = _mm256_add_epi32(acc, i);
      store_codes8(u + k, i);
    }
    total = sum8(acc);
  }
#endif
  for (; k < K; ++k) {
    float r = std::nearbyint(((to_float(x[k]) - lo) * inv) * inv_s);
    r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
    const int32_t i = static_cast<int32_t>(r);
    total += i;
    u[k] = static_cast<uint8_t>(i);
  }
  return total;
}

// per row of x (M, K): its codes into u (M, ku), zero padded from K to ku (>= K), a = width / 255,
// c = lo and the codes' sum; one parallel region over the rows
template <typename T>
void quantize_into(const T* x, const float* sm, int64_t M, int64_t K, uint8_t* u, int64_t ku, float* a,
                   float* c, float* rowsum) {
  const float inv_s = inv_s_fbgemm();
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // the smoothed row, kept between calls
    if (sm && static_cast<int64_t>(buf.size()) < K) buf.resize(K);
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * K;
      float lo, hi;
      row_min_max(row, sm, buf.data(), K, lo, hi);
      float width = hi - lo;
      width = width < MIN_SCALE ? MIN_SCALE : width;
      const float inv = 1.0f / width;
      const int64_t total = sm ? quantize_row(buf.data(), u + m * ku, K, lo, inv, inv_s)
                               : quantize_row(row, u + m * ku, K, lo, inv, inv_s);
      std::fill(u + m * ku + K, u + (m + 1) * ku, uint8_t(0));
      a[m] = width / 255.0f;
      c[m] = lo;
      rowsum[m] = static_cast<float>(total);
    }
  });
}

// Static activations (a calibrated scale s_x and zero point z_x; `d` = s_x, or s_x * smooth[k]
// as int_mm.py multiplies them, `per_k`): the int_mm kernel's codes, q = clamp(rne(x / d) + z_x,
// -128, 127) in float as torch computes them (a NaN: 0, as torch's conversion to int8 gives),
// stored as u = q + 128 for the unsigned GEMMs; returns the sum of u
template <typename T>
int64_t quantize_row_static(const T* x, const float* d, bool per_k, float zx, uint8_t* u, int64_t K) {
  int64_t k = 0, total = 0;
#if defined(__AVX2__)  // AVX2 and AVX-512 builds (auto runs static layers here on CPUs without VNNI, Skylake-SP too)
  {
    const __m256 vz = _mm256_set1_ps(zx), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f),
                 vd = _mm256_set1_ps(per_k ? 0.0f : d[0]);
    const __m256i off = _mm256_set1_epi32(128);
    __m256i acc = _mm256_setzero_si256();
    for (; k + 8 <= K; k += 8) {
      __m256 v = _mm256_div_ps(load8(x + k), per_k ? _mm256_loadu_ps(d + k) : vd);
      v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
      v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));         // a NaN stays NaN (the second operand)
      v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
      const __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(v), off);
      acc = _mm256_add_epi32(acc, i);
      store_codes8(u + k, i);
    }
    total = sum8(acc);
  }
#endif
  for (; k < K; ++k) {
    float r = std::nearbyint(to_float(x[k]) / d[per_k ? k : 0]) + zx;
    r = r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
    const int32_t i = (r == r ? static_cast<int32_t>(r) : 0) + 128;
    total += i;
    u[k] = static_cast<uint8_t>(i);
  }
  return total;
}

template <typename T>
void quantize_static_into(const T* x, const float* d, bool per_k, float zx, int64_t M, int64_t K, uint8_t* u,
                          int64_t ku, float* rowsum) {
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      rowsum[m] = static_cast<float>(quantize_row_static(x + m * K, d, per_k, zx, u + m * ku, K));  // exact: K < 65536
      std::fill(u + m * ku + K, u + (m + 1) * ku, uint8_t(0));
    }
  });
}

std::vector<at::Tensor> quantize_rows(const at::Tensor& x, const at::Tensor& smooth) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous() && x.is_cpu(),
              "quantize_rows: x must be a contiguous float32 or bfloat16 CPU (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  const bool has_smooth = smooth.numel() > 0;
  if (has_smooth)
    TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K && smooth.scalar_type() == at::kFloat &&
                    smooth.is_contiguous(), "quantize_rows: smooth must be contiguous float32 (K,)");
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kByte));
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor a = at::empty({M}, f32), c = at::empty({M}, f32), rs = at::empty({M}, f32);
  const float* sp = has_smooth ? smooth.data_ptr<float>() : nullptr;
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *ap = a.data_ptr<float>(), *cp = c.data_ptr<float>(), *rp = rs.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16)
    quantize_into(x.data_ptr<bf16>(), sp, M, K, qp, K, ap, cp, rp);
  else
    quantize_into(x.data_ptr<float>(), sp, M, K, qp, K, ap, cp, rp);
  return {q, a, c, rs};
}

// epilogue_'s operands: y (M, N) float32 (GEMM output), per row a, c, rowsum, per column wsum, bias, zs
struct EpilogueArgs {
  const float *y, *a, *c, *wsum, *bias, *zs, *rowsum;  // bias, zs may be nullptr
  int64_t N;
};

template <typename T>
void epilogue_rows(const EpilogueArgs& e, T* op, int64_t M) {
  const int64_t N = e.N;
  const float *yp = e.y, *ap = e.a, *cp = e.c, *wp = e.wsum, *bp = e.bias, *zp = e.zs, *rp = e.rowsum;
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = yp + m * N;
      T* orow = op + m * N;
      const float am = ap[m], cm = cp[m], rm = -rp[m];
      int64_t n = 0;
#ifdef QLIN_AVX512
      const __m512 va = _mm512_set1_ps(am), vc = _mm512_set1_ps(cm), vr = _mm512_set1_ps(rm);
      for (; n + 16 <= N; n += 16) {
        __m512 v = _mm512_loadu_ps(row + n);
        if (zp) v = _mm512_fmadd_ps(vr, _mm512_loadu_ps(zp + n), v);
        __m512 t = bp ? _mm512_fmadd_ps(vc, _mm512_loadu_ps(wp + n), _mm512_loadu_ps(bp + n))
                      : _mm512_mul_ps(vc, _mm512_loadu_ps(wp + n));
        store16(orow + n, _mm512_fmadd_ps(va, v, t));
      }
#endif
      for (; n < N; ++n) {
        float v = row[n];
        if (zp) v = std::fma(rm, zp[n], v);
        const float t = bp ? std::fma(cm, wp[n], bp[n]) : cm * wp[n];
        store_out(orow + n, std::fma(am, v, t));
      }
    }
  });
}

at::Tensor epilogue_(at::Tensor y, const at::Tensor& a, const at::Tensor& c, const at::Tensor& wsum,
                     const at::Tensor& bias, const at::Tensor& rowsum, const at::Tensor& zs,
                     const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous(),
              "epilogue_: y must be contiguous float32 (M, N)");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(a.numel() == M && c.numel() == M && rowsum.numel() == M && wsum.numel() == N,
              "epilogue_: shapes do not fit");
  const bool has_b = bias.numel() > 0, has_z = zs.numel() > 0;
  TORCH_CHECK(!has_b || (bias.numel() == N && bias.scalar_type() == at::kFloat), "epilogue_: bias");
  TORCH_CHECK(!has_z || (zs.numel() == N && zs.scalar_type() == at::kFloat), "epilogue_: zero points");
  at::Tensor dst = out.has_value() ? *out : y;
  TORCH_CHECK((dst.scalar_type() == at::kFloat || dst.scalar_type() == at::kBFloat16) && dst.size(0) == M &&
                  dst.size(1) == N && dst.stride(1) == 1 && dst.stride(0) == N,
              "epilogue_: out must be contiguous float32 or bfloat16 (M, N)");
  EpilogueArgs e{y.data_ptr<float>(), a.data_ptr<float>(), c.data_ptr<float>(), wsum.data_ptr<float>(),
                 has_b ? bias.data_ptr<float>() : nullptr, has_z ? zs.data_ptr<float>() : nullptr,
                 rowsum.data_ptr<float>(), N};
  if (dst.scalar_type() == at::kBFloat16)
    epilogue_rows(e, dst.data_ptr<bf16>(), M);
  else
    epilogue_rows(e, dst.data_ptr<float>(), M);
  return dst;
}

// ---------------------------------------------------------------------------------------------
// pertoken_linear: the whole per-token int8 layer in one call, any number of rows (the `pertoken`
// kernel runs it at every row count; `onednn` up to PT_MAX_ROWS rows, oneDNN's GEMM above). Bit for bit the three-call path (quantize_rows,
// onednn.qlinear_pointwise with input scale 1 and weight scales s, epilogue_):
//   codes u, a, c, rowsum: quantize_rows' own loops (row_min_max, quantize_row);
//   acc[m, n] = sum_k u[m, k] * qw[n, k]   (int32, exact: the order does not matter);
//   y = float(acc) * s[n]                  (what oneDNN writes: one rounding each);
//   then epilogue_'s operations, in its order, on 16 outputs while they are in registers.
// The weight is the layer's own int8 (N, K), read in place: no second copy beside oneDNN's.
// AVX-512 VNNI: for a block of 16 weight rows and one row of codes, 16 accumulators of
// vpdpbusd (u8 x s8, 64 k a step); their lanes are summed by a transposing add tree into one
// vector of 16 outputs. Codes live in a thread-local buffer kept between calls, zero padded to a
// multiple of 64 (the weight's tail is a masked load). Threads follow the work: a task takes at
// least PT_MACS_PER_TASK multiply-adds, so a small layer runs on the calling thread alone, and
// threads take chunks of blocks from a shared counter.
// The scalar path (no AVX-512 VNNI; also exposed as _pertoken_linear_scalar for tests) computes
// the same integers and the same float operations: the same bits.

constexpr int64_t PT_MAX_ROWS = 16;             // rows this kernel takes; oneDNN's GEMM above
// multiply-adds a thread takes at least (~20 us on one AVX2 core): at one row that is 256 KB of
// weights, so a decode step's 2048 x 2048 or 256 x 2048 layer is split over 2 threads (at 1 << 22
// they ran on one thread, at half the machine's memory bandwidth)
constexpr int64_t PT_MACS_PER_TASK = 1 << 18;
constexpr int64_t PT_NB = 16;                   // weight rows per block (one output vector)

struct PertokenArgs {
  const uint8_t* u;        // codes (M, ku), rows zero padded to ku (a multiple of 64)
  int64_t ku;
  const float *a, *c, *rowsum;   // (M,)
  const int8_t* w;         // (N, K)
  const float *scale, *wsum, *bias, *zs;  // (N,); bias and zs may be nullptr
  const int32_t* wsum_i;   // (N,) sum_k w[n, k] where w holds no -128 (the AVX2 one-row tile's), or nullptr
  const int8_t* xs;        // with wsum_i on AVX2 without VNNI: the codes shifted, x = u - 128 (M, ku),
  const uint8_t* xa;       //   and |x| (128 for x = -128), once per call (pertoken_shifted_codes)
  // static activations (static_linear): scale holds s_x * s[n], rowsum the codes' sums; corr[n] =
  // o * sum_k w[n, k] - K * o * z[n] with o = 128 + z_x (int32, wrapping as int_mm's sums do),
  // zw[n] = z[n] (asymmetric weights) or nullptr. corr is nullptr for per-token layers.
  const int32_t *corr, *zw;
  float* y;                // (M, N) float32 output, or nullptr when
  bf16* yb;                //   the output is bfloat16 (M, N)
  int64_t M, N, K;
};

inline float pt_output(const PertokenArgs& p, int64_t m, int64_t n, int32_t acc) {
  if (p.corr) {  // static: sum_k (u - o) * (w - z) = sum_k (q - z_x) * (w - z), then int_mm.py's two roundings
    uint32_t t = static_cast<uint32_t>(acc) - static_cast<uint32_t>(p.corr[n]);
    if (p.zw) t -= static_cast<uint32_t>(p.zw[n]) * static_cast<uint32_t>(static_cast<int32_t>(p.rowsum[m]));
    const float v = static_cast<float>(static_cast<int32_t>(t)) * p.scale[n];
    return p.bias ? v + p.bias[n] : v;
  }
  float v = static_cast<float>(acc) * p.scale[n];
  if (p.zs) v = std::fma(-p.rowsum[m], p.zs[n], v);
  const float t = p.bias ? std::fma(p.c[m], p.wsum[n], p.bias[n]) : p.c[m] * p.wsum[n];
  return std::fma(p.a[m], v, t);
}

void pertoken_blocks_scalar(const PertokenArgs& p, int64_t nb0, int64_t nb1) {
  for (int64_t n = nb0 * PT_NB; n < std::min(p.N, nb1 * PT_NB); ++n) {
    const int8_t* wr = p.w + n * p.K;
    for (int64_t m = 0; m < p.M; ++m) {
      const uint8_t* ur = p.u + m * p.ku;
      int32_t acc = 0;
      for (int64_t k = 0; k < p.K; ++k) acc += static_cast<int32_t>(ur[k]) * static_cast<int32_t>(wr[k]);
      const float v = pt_output(p, m, n, acc);
      p.yb ? store_out(p.yb + m * p.N + n, v) : store_out(p.y + m * p.N + n, v);
    }
  }
}

#if defined(QLIN_AVX512_VNNI)
#define QLIN_VNNI 1
// out lane j = the sum of the 16 lanes of v[j]
__attribute__((always_inline)) inline __m512i pt_sum16(const __m512i* v) {
  __m512i s1[8], s2[4], s3[2];
  _Pragma("GCC unroll 16") for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a, b, a, b] partial sums of v[2i], v[2i+1]
    s1[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  _Pragma("GCC unroll 16") for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a, b, c, d] of v[4i..4i+3]
    s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s1[2 * i], s1[2 * i + 1]), _mm512_unpackhi_epi64(s1[2 * i], s1[2 * i + 1]));
  _Pragma("GCC unroll 16") for (int i = 0; i < 2; ++i)  // 128-bit lanes: [v0-3, v0-3, v4-7, v4-7] (of 8i..)
    s3[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                             _mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s3[0], s3[1], 0x88), _mm512_shuffle_i32x4(s3[0], s3[1], 0xDD));
}

// vpdpbusd (u8 codes x s8 weights) in place: the intrinsic's copy-and-add made GCC shuffle every
// accumulator through other registers
__attribute__((always_inline)) inline void pt_dot(__m512i& acc, __m512i x, __m512i w) {
#ifdef QLIN_SIMDE_AVX512
  acc = _mm512_dpbusd_epi32(acc, x, w);
#else
  asm("vpdpbusd %[w], %[x], %[acc]" : [acc] "+v"(acc) : [x] "v"(x), [w] "v"(w));
#endif
}

// acc[i * NR + r] += codes of row i . weight row r over k .. k + 63 (the weight's bytes in `live`),
// MB = 2 or 4: each weight vector is loaded once for the MB rows (one row: pt_rows)
template <int MB>
__attribute__((always_inline)) inline void pt_step(__m512i* acc, const uint8_t* const* ur, const int8_t* const* wr,
                                                   int64_t k, __mmask64 live) {
  constexpr int NR = PT_NB / MB;
  __m512i wv[NR];
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi8(live, wr[r] + k);
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
    const __m512i xv = _mm512_loadu_si512(ur[i] + k);
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) pt_dot(acc[i * NR + r], xv, wv[r]);
  }
}

// One row of codes against the NR weight rows of a tile, each row whole before the next
// (acc[r] += codes . weight row r over all k): the tile's NR * K bytes are one sequential stream
// instead of NR strided ones, and the stream `PT_PREFETCH` bytes ahead is fetched meanwhile, so
// that the multiply-adds overlap the reads (AMD EPYC Zen 5, 2 threads, one token: -1 to +15% GB/s
// over the k-interleaved tile by shape and minute, RESULTS.md "Issue 24 on an AMD EPYC Zen 5").
// The same int32 sums in another order.
constexpr int64_t PT_PREFETCH = 4096;
template <int R>
__attribute__((always_inline)) inline void pt_row(__m512i* acc, const uint8_t* ur, const int8_t* wr, int64_t kmain,
                                                  int64_t ktail) {
  for (int64_t k = 0; k < kmain; k += 64) {
    // never faults, past the weight's end too (the address computed as an integer, not a pointer)
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wr + k) + PT_PREFETCH), _MM_HINT_T0);
    pt_dot(acc[R], _mm512_loadu_si512(ur + k), _mm512_loadu_si512(wr + k));
  }
  if (ktail) pt_dot(acc[R], _mm512_loadu_si512(ur + kmain), _mm512_maskz_loadu_epi8(~0ULL >> (64 - ktail), wr + kmain));
}
template <int... R>
__attribute__((always_inline)) inline void pt_rows(__m512i* acc, const uint8_t* ur, const int8_t* const* wr, int64_t kmain,
                                                   int64_t ktail, std::integer_sequence<int, R...>) {
  (pt_row<R>(acc, ur, wr[R], kmain, ktail), ...);
}

// MB rows of codes from m0 against NR = 16 / MB weight rows from n0 (rows <= NR of them live):
// MB x NR accumulators, vector i = (row i / NR, weight row i % NR), summed into one vector whose
// lane j holds output (m0 + j / NR, n0 + j % NR); epilogue_'s operations on it (see pt_output)
template <int MB>
void pertoken_tile_vnni(const PertokenArgs& p, int64_t m0, int64_t n0, int64_t rows) {
  constexpr int NR = PT_NB / MB;
  const int64_t ktail = p.K % 64, kmain = p.K - ktail;
  const int8_t* wr[NR];  // rows past N repeat the last one; their outputs are not stored
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) wr[r] = p.w + (n0 + std::min<int64_t>(r, rows - 1)) * p.K;
  const uint8_t* ur[MB];
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) ur[i] = p.u + (m0 + i) * p.ku;
  __m512i acc[PT_NB];
// (fixed-count loops unrolled before GCC looks at them: the arrays stay in registers)
  _Pragma("GCC unroll 16") for (int i = 0; i < PT_NB; ++i) acc[i] = _mm512_setzero_si512();
  if constexpr (MB == 1) {
    pt_rows(acc, ur[0], wr, kmain, ktail, std::make_integer_sequence<int, NR>{});
  } else {
    for (int64_t k = 0; k < kmain; k += 64) pt_step<MB>(acc, ur, wr, k, ~0ULL);
    if (ktail) pt_step<MB>(acc, ur, wr, kmain, ~0ULL >> (64 - ktail));  // codes are zero padded
  }
  if (p.corr) {  // static: the integer corrections and two roundings per output (pt_output)
    alignas(64) int32_t sums[PT_NB];
    _mm512_store_si512(sums, pt_sum16(acc));
    for (int j = 0; j < PT_NB; ++j) {  // lane j: output (m0 + j / NR, n0 + j % NR)
      const int64_t m = m0 + j / NR, n = n0 + j % NR;
      if (j % NR >= rows) continue;
      const float v = pt_output(p, m, n, sums[j]);
      p.yb ? store_out(p.yb + m * p.N + n, v) : store_out(p.y + m * p.N + n, v);
    }
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i in = _mm512_and_si512(lane, _mm512_set1_epi32(NR - 1)), im = _mm512_srli_epi32(lane, NR == 16 ? 4 : NR == 8 ? 3 : 2);
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1), rowmask = static_cast<__mmask16>((1u << MB) - 1);
  auto per_n = [&](const float* v) { return _mm512_permutexvar_ps(in, _mm512_maskz_loadu_ps(live, v + n0)); };
  auto per_m = [&](const float* v) { return _mm512_permutexvar_ps(im, _mm512_maskz_loadu_ps(rowmask, v + m0)); };
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(pt_sum16(acc)), per_n(p.scale));
  if (p.zs) v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), per_m(p.rowsum)), per_n(p.zs), v);
  const __m512 c = per_m(p.c), ws = per_n(p.wsum);
  const __m512 t = p.bias ? _mm512_fmadd_ps(c, ws, per_n(p.bias)) : _mm512_mul_ps(c, ws);
  const __m512 out = _mm512_fmadd_ps(per_m(p.a), v, t);
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {  // lanes i * NR .. to the front, then the live ones stored
    const __m512 row = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(i * NR)), out);
    const int64_t at = (m0 + i) * p.N + n0;
    p.yb ? store16(p.yb + at, row, live) : store16(p.y + at, row, live);
  }
}

// rows [mb, me) of codes, in MB-row tiles, against weight rows [nb, ne), NR at a time: the NR
// weight rows (NR * K bytes) stay in L1 while every tile of codes passes them
template <int MB>
void pertoken_tiles_vnni(const PertokenArgs& p, int64_t mb, int64_t me, int64_t nb, int64_t ne) {
  constexpr int64_t NR = PT_NB / MB;
  for (int64_t n = nb; n < ne; n += NR)
    for (int64_t m = mb; m < me; m += MB) pertoken_tile_vnni<MB>(p, m, n, std::min(NR, ne - n));
}

// blocks [nb0, nb1) of 16 weight rows against all rows of codes: 4 at a time, then 2, then 1
void pertoken_blocks_vnni(const PertokenArgs& p, int64_t nb0, int64_t nb1) {
  const int64_t m4 = p.M / 4 * 4, m2 = m4 + (p.M - m4) / 2 * 2, n_end = std::min(p.N, nb1 * PT_NB);
  for (int64_t nb = nb0 * PT_NB; nb < n_end; nb += PT_NB) {
    const int64_t ne = std::min(n_end, nb + PT_NB);
    pertoken_tiles_vnni<4>(p, 0, m4, nb, ne);
    pertoken_tiles_vnni<2>(p, m4, m2, nb, ne);
    pertoken_tiles_vnni<1>(p, m2, p.M, nb, ne);
  }
}
#endif

#if defined(__AVX2__) && !defined(QLIN_VNNI)
#include <immintrin.h>
#define QLIN_AVX2_INT8 1
// AVX2 without VNNI (e.g. AMD Zen 1-3, Intel before Cascade Lake): vpmaddubsw (u8 x s8) would
// saturate int16 pair sums with full-range codes, which is why oneDNN and fbgemm keep codes to 7
// bits on these CPUs. Where the caller gives the weight's integer row sums (weights without -128,
// p.wsum_i) every tile takes vpmaddubsw on shifted codes whose pair sums cannot saturate
// (pertoken_tile_sign_avx2); otherwise both operands are widened to int16 and multiplied by
// vpmaddwd (pertoken_tile_avx2). Both give exact int32 sums, the same integers as the VNNI path,
// so the same bits out. A tile is MB rows of codes x NR = 8 / MB weight rows: 8 accumulators of
// 8 int32 lanes, summed by a transposing add tree into one vector of 8 outputs; k past the last
// multiple of the vector width and the epilogue (pt_output, the scalar path's own function) run
// per output. Any number of rows: the same integers for every M, whichever tile computes them,
// so a row's result never depends on the batch.
constexpr int64_t PT2_NB = 8;   // outputs per tile (MB x NR)
constexpr int64_t PT2_MBLOCK = 64;  // rows of codes per pass over a thread's weight rows (L2)
// bytes ahead that the 2- and 4-row sign tiles fetch each weight stream (as PT_PREFETCH on VNNI):
// each tile of a step reads only its own rows, so the step's streams stop and start by turns,
// which the hardware prefetchers follow less well (AMD EPYC Zen 3, 2 threads, weights from
// memory, alternated twice: 4 rows 270/277 -> 242/230 us a 2048 x 2048 layer, 3372/3734 ->
// 3206/2860 the 32000 x 2048 head, 2 rows within the noise; the one-row tile, which reads all 8
// streams at once, took 10-30% longer with it in one A/B and as long in the minute's bandwidth
// terms: it has none)
constexpr int64_t PT2_PREFETCH = 4096;

// lane j = the sum of the 8 int32 lanes of v[j]
__attribute__((always_inline)) inline __m256i pt2_sum8(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

template <int MB>
void pertoken_tile_avx2(const PertokenArgs& p, int64_t m0, int64_t n0, int64_t rows) {
  constexpr int NR = PT2_NB / MB;
  const int64_t kmain = p.K / 16 * 16;
  const int8_t* wr[NR];  // rows past N repeat the last one; their outputs are not stored
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) wr[r] = p.w + (n0 + std::min<int64_t>(r, rows - 1)) * p.K;
  const uint8_t* ur[MB];
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) ur[i] = p.u + (m0 + i) * p.ku;
  __m256i acc[PT2_NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < PT2_NB; ++i) acc[i] = _mm256_setzero_si256();
  auto widen_w = [](const int8_t* q) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))); };
  auto widen_u = [](const uint8_t* q) { return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))); };
  for (int64_t k = 0; k < kmain; k += 16) {
    if (MB == 1) {  // a weight vector is widened where it is used (8 of them would not fit beside 8 sums)
      const __m256i xv = widen_u(ur[0] + k);
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(xv, widen_w(wr[r] + k)));
      continue;
    }
    __m256i wv[NR];
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) wv[r] = widen_w(wr[r] + k);
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
      const __m256i xv = widen_u(ur[i] + k);
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
        acc[i * NR + r] = _mm256_add_epi32(acc[i * NR + r], _mm256_madd_epi16(xv, wv[r]));
    }
  }
  alignas(32) int32_t sums[PT2_NB];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), pt2_sum8(acc));
  for (int j = 0; j < PT2_NB; ++j) {  // lane j: output (m0 + j / NR, n0 + j % NR)
    const int i = j / NR, r = j % NR;
    if (r >= rows) continue;
    int32_t total = sums[j];
    for (int64_t k = kmain; k < p.K; ++k) total += static_cast<int32_t>(ur[i][k]) * static_cast<int32_t>(wr[r][k]);
    const int64_t m = m0 + i, n = n0 + r;
    const float v = pt_output(p, m, n, total);
    p.yb ? store_out(p.yb + m * p.N + n, v) : store_out(p.y + m * p.N + n, v);
  }
}

// MB rows of codes from m0 against NR = 8 / MB weight rows with vpmaddubsw (32 multiply-adds an
// instruction, twice vpmaddwd's), for weights without -128 (p.wsum_i, their integer row sums,
// given): the codes are shifted to x = u - 128 in [-128, 127] and the product taken as
// |x| * sign(w, x), so that vpmaddubsw's int16 pair sums are at most 2 * 128 * 127 = 32512 and
// never saturate (sign(w, x) negates w, exact for w in [-127, 127]); vpmaddwd by ones widens them
// to int32. Then sum_k u * w = sum_k x * w + 128 * sum_k w: the same int32 as the other paths (no
// sum here leaves int32 for K < 65536, as theirs), so the same bits out. No operand is widened
// across lanes (vpmovsxbw, vpmovzxbw: one a cycle on AMD Zen 3, the limit of pertoken_tile_avx2):
// 4 x 2 at 62-65 G multiply-adds/s a core from cache against 36 (AMD EPYC Zen 3, by hand). The
// shifted codes and their absolute values are read from p.xs and p.xa, made once per call
// (pertoken_shifted_codes; Zen 3, 2 threads, 4 rows: 8-11% less time a layer, from cache). The
// NR weight rows are any rows (`n`, the first `live` of them stored; the others repeat a live
// one): rows of pertoken_streams_avx2's streams.
template <int MB>
void pertoken_tile_sign_avx2(const PertokenArgs& p, int64_t m0, const int64_t* n, int live) {
  constexpr int NR = PT2_NB / MB;
  const int64_t kmain = p.K / 32 * 32;
  const int8_t* wr[NR];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) wr[r] = p.w + n[r] * p.K;
  const uint8_t* ur[MB];
  const int8_t* xr[MB];
  const uint8_t* ar[MB];
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
    ur[i] = p.u + (m0 + i) * p.ku;
    xr[i] = p.xs + (m0 + i) * p.ku;
    ar[i] = p.xa + (m0 + i) * p.ku;
  }
  __m256i acc[PT2_NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < PT2_NB; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < kmain; k += 32) {
    if (MB > 1 && !(k & 32))  // each stream PT2_PREFETCH bytes ahead, a cache line at a time
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wr[r] + k) + PT2_PREFETCH), _MM_HINT_T0);
    __m256i wv[NR];
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + k));
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k));
      const __m256i ax = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[i] + k));
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
        acc[i * NR + r] = _mm256_add_epi32(acc[i * NR + r],
                                           _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], x)), ones));
    }
  }
  alignas(32) int32_t sums[PT2_NB];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), pt2_sum8(acc));
  for (int j = 0; j < PT2_NB; ++j) {  // lane j: output (m0 + j / NR, n[j % NR])
    const int i = j / NR, r = j % NR;
    if (r >= live) continue;
    // the tail as sum u * w and sum w: GCC 12.2 at -O3 with AVX-VNNI or AVX-512 VNNI (-march=native
    // on Alder Lake and later, Zen 5) vectorizes `total += (u - 128) * w` into vpdpbusd wrongly, as the sum
    // of u * w without the - 128 (tests/test_pertoken_kernel.py caught it in the AVX2 build on a Zen 5)
    int32_t tail = 0, tail_w = 0;
    for (int64_t k = kmain; k < p.K; ++k) {
      tail += static_cast<int32_t>(ur[i][k]) * static_cast<int32_t>(wr[r][k]);
      tail_w += wr[r][k];
    }
    const int32_t total = sums[j] + 128 * (p.wsum_i[n[r]] - tail_w) + tail;  // |each term| < 2**31 for K < 65536
    const int64_t m = m0 + i;
    const float v = pt_output(p, m, n[r], total);
    p.yb ? store_out(p.yb + m * p.N + n[r], v) : store_out(p.y + m * p.N + n[r], v);
  }
}

// x = u - 128 (u ^ 0x80 read as int8) and |x| for `n` codes (a multiple of 32): the sign tiles'
// operands, made once per call instead of in every tile that meets a row (there they were 2 of
// the ~5 vector operations per 32 codes, row and weight row pair: AMD EPYC Zen 3, by hand, a
// 4 x 2 tile from cache 62 -> 70 G multiply-adds/s a core)
void pertoken_shifted_codes(const uint8_t* u, int64_t n, int8_t* xs, uint8_t* xa) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i)), flip);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + i), x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xa + i), _mm256_abs_epi8(x));  // -128 -> 0x80: 128 unsigned
  }
}

// All rows of codes against weight rows [n_begin, n_end) with the row sums given (every tile
// vpmaddubsw's, pertoken_tile_sign_avx2): the rows cut into 8 runs of adjacent rows, and a step
// takes the next row of each run, 8 rows that the step's 4-, 2- and 1-row tiles share (from L1).
// A run's rows are one stretch of memory, so a thread reads 8 long sequential streams, which the
// hardware prefetchers follow; 8 adjacent rows a step are 8 strided streams of K bytes that
// restart every step (AMD EPYC Zen 1, 2 threads, one row, 2048 x 2048: ~19 GB/s against ~16
// with the prefetches they needed; RESULTS.md "pertoken-decode"). Rows of codes PT2_MBLOCK at a
// time (they stay in L2 while the weight rows pass). Which tile computes a row changes none of
// its bits.
void pertoken_streams_avx2(const PertokenArgs& p, int64_t n_begin, int64_t n_end) {
  const int64_t rows = n_end - n_begin, run = (rows + PT2_NB - 1) / PT2_NB;
  for (int64_t mb = 0; mb < p.M; mb += PT2_MBLOCK) {
    const int64_t me = std::min(p.M, mb + PT2_MBLOCK);
    const int64_t m4 = mb + (me - mb) / 4 * 4, m2 = m4 + (me - m4) / 2 * 2;
    for (int64_t t = 0; t < run; ++t) {
      int64_t n[PT2_NB];  // the step's rows, the last live one repeated past them
      int live = 0;
      for (int64_t j = 0; j < PT2_NB; ++j)
        if (j * run + t < rows) n[live++] = n_begin + j * run + t;
      for (int j = live; j < PT2_NB; ++j) n[j] = n[live - 1];
      for (int r = 0; r < live; r += 2)
        for (int64_t m = mb; m < m4; m += 4) pertoken_tile_sign_avx2<4>(p, m, n + r, std::min(2, live - r));
      for (int r = 0; r < live; r += 4)
        for (int64_t m = m4; m < m2; m += 2) pertoken_tile_sign_avx2<2>(p, m, n + r, std::min(4, live - r));
      for (int64_t m = m2; m < me; ++m) pertoken_tile_sign_avx2<1>(p, m, n, live);
    }
  }
}

// blocks [nb0, nb1) of 8 weight rows against all rows of codes: with the row sums given, in
// streams (pertoken_streams_avx2); otherwise the vpmaddwd tiles on each block's 8 adjacent rows,
// PT2_MBLOCK rows of codes at a time: 4 rows a tile, then 2, then 1
void pertoken_blocks_avx2(const PertokenArgs& p, int64_t nb0, int64_t nb1) {
  const int64_t n_begin = nb0 * PT2_NB, n_end = std::min(p.N, nb1 * PT2_NB);
  if (p.wsum_i) {
    pertoken_streams_avx2(p, n_begin, n_end);
    return;
  }
  for (int64_t mb = 0; mb < p.M; mb += PT2_MBLOCK) {
    const int64_t me = std::min(p.M, mb + PT2_MBLOCK);
    const int64_t m4 = mb + (me - mb) / 4 * 4, m2 = m4 + (me - m4) / 2 * 2;
    for (int64_t nb = n_begin; nb < n_end; nb += PT2_NB) {
      const int64_t ne = std::min(n_end, nb + PT2_NB);
      for (int64_t n = nb; n < ne; n += 2)
        for (int64_t m = mb; m < m4; m += 4) pertoken_tile_avx2<4>(p, m, n, std::min<int64_t>(2, ne - n));
      for (int64_t n = nb; n < ne; n += 4)
        for (int64_t m = m4; m < m2; m += 2) pertoken_tile_avx2<2>(p, m, n, std::min<int64_t>(4, ne - n));
      for (int64_t m = m2; m < me; ++m) pertoken_tile_avx2<1>(p, m, nb, ne - nb);
    }
  }
}
#endif

// static_linear's activations: the divisor d (one value, or K: `per_k`), z_x, and the epilogue's
// integer corrections (PertokenArgs)
struct StaticAct {
  const float* d;
  bool per_k;
  float zx;
  const int32_t *corr, *zw;
};

at::Tensor pertoken_linear_impl(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& wsum, const at::Tensor& bias, const at::Tensor& zs,
                                const at::Tensor& smooth, const at::Tensor& wsum_i, bool force_scalar,
                                const StaticAct* st = nullptr) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_cpu(), "pertoken_linear: x must be a 2-D CPU (M, K) tensor");
  // float32 and bfloat16 rows are read as they are, and the output has their dtype; others
  // (float16) are converted to float32 and back
  const bool is_bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = (is_bf16 ? x_in : x_in.to(at::kFloat)).contiguous();  // no copy when it is already
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kChar && w.is_contiguous(),
              "pertoken_linear: w must be contiguous int8 (N, K) with K = ", K);
  auto vec = [N](const at::Tensor& t, bool optional) {
    return (optional && t.numel() == 0) ||
           (t.dim() == 1 && t.size(0) == N && t.scalar_type() == at::kFloat && t.is_contiguous());
  };
  TORCH_CHECK(vec(scale, false) && vec(wsum, st != nullptr) && vec(bias, true) && vec(zs, true),
              "pertoken_linear: scale, wsum, bias and zs must be contiguous float32 (N,) (bias, zs may be empty)");
  const bool has_smooth = smooth.numel() > 0;
  TORCH_CHECK(!has_smooth || (smooth.dim() == 1 && smooth.size(0) == K && smooth.scalar_type() == at::kFloat &&
                              smooth.is_contiguous()), "pertoken_linear: smooth must be contiguous float32 (K,)");
  TORCH_CHECK(wsum_i.numel() == 0 || (wsum_i.dim() == 1 && wsum_i.size(0) == N && wsum_i.scalar_type() == at::kInt &&
                                      wsum_i.is_contiguous() && K < 65536),
              "pertoken_linear: wsum_i must be contiguous int32 (N,) (or empty), and K < 65536");
  at::Tensor y = at::empty({M, N}, x.options());  // float32 or bfloat16, as x
  if (M == 0 || N == 0) return x_in.scalar_type() == x.scalar_type() ? y : y.to(x_in.scalar_type());
  // codes (M, ku) and a, c, rowsum: a thread-local buffer kept between calls for a few rows, a
  // fresh one for many (so that one long prompt does not keep megabytes per thread)
  thread_local std::vector<uint8_t> kept_codes;
  thread_local std::vector<float> kept_rowp;
  std::vector<uint8_t> big_codes;
  std::vector<float> big_rowp;
  const int64_t ku = (K + 63) / 64 * 64;
  const bool few = M <= PT_MAX_ROWS;
#ifdef QLIN_AVX2_INT8
  // the sign tiles' shifted codes and their absolute values after the codes (M * ku bytes each)
  const int64_t shifted = !force_scalar && wsum_i.numel() ? 2 * M * ku : 0;
#else
  const int64_t shifted = 0;
#endif
  std::vector<uint8_t>& codes = few ? kept_codes : big_codes;
  std::vector<float>& rowp = few ? kept_rowp : big_rowp;
  if (static_cast<int64_t>(codes.size()) < M * ku + shifted) codes.resize(M * ku + shifted);
  if (static_cast<int64_t>(rowp.size()) < 3 * M) rowp.resize(3 * M);
  float *a = rowp.data(), *c = a + M, *rs = c + M;
  const float* sp = has_smooth ? smooth.data_ptr<float>() : nullptr;
  auto quantize = [&](const auto* xp) {  // the rows' codes: static parameters, or each row's range
    if (st) quantize_static_into(xp, st->d, st->per_k, st->zx, M, K, codes.data(), ku, rs);
    else quantize_into(xp, sp, M, K, codes.data(), ku, a, c, rs);
  };
  if (is_bf16) quantize(x.data_ptr<bf16>());
  else quantize(x.data_ptr<float>());
  int8_t* xs = shifted ? reinterpret_cast<int8_t*>(codes.data() + M * ku) : nullptr;
  uint8_t* xa = shifted ? codes.data() + 2 * M * ku : nullptr;
#ifdef QLIN_AVX2_INT8
  if (shifted)
    at::parallel_for(0, M, std::max<int64_t>(1, WORK_PER_TASK / ku), [&](int64_t m0, int64_t m1) {
      pertoken_shifted_codes(codes.data() + m0 * ku, (m1 - m0) * ku, xs + m0 * ku, xa + m0 * ku);
    });
#endif
  PertokenArgs p{codes.data(), ku, a, c, rs, w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                 wsum.numel() ? wsum.data_ptr<float>() : nullptr, bias.numel() ? bias.data_ptr<float>() : nullptr,
                 zs.numel() ? zs.data_ptr<float>() : nullptr, wsum_i.numel() ? wsum_i.data_ptr<int32_t>() : nullptr,
                 xs, xa, st ? st->corr : nullptr, st ? st->zw : nullptr,
                 is_bf16 ? nullptr : y.data_ptr<float>(),
                 is_bf16 ? y.data_ptr<bf16>() : nullptr, M, N, K};
  const int64_t blocks = (N + PT_NB - 1) / PT_NB;
  const int64_t grain = std::max<int64_t>(1, PT_MACS_PER_TASK / std::max<int64_t>(M * K * PT_NB, 1));
  // Threads take chunks of blocks from a shared counter until none is left: at a few rows
  // (memory-bound) `grain` blocks at least and 1/8 of a thread's share at most, so a thread
  // slowed down (by another process on its core, or by its memory) does not hold the others up
  // at the end; at more rows a thread's whole share, one contiguous range as a static split
  // gives (the AVX2 path's passes of PT2_MBLOCK rows of codes over it). Which thread computes a
  // block changes no bit of it.
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (blocks + grain - 1) / grain);
  const int64_t chunk = M <= 4 ? std::max(grain, blocks / std::max<int64_t>(8 * tasks, 1))
                               : (blocks + tasks - 1) / std::max<int64_t>(tasks, 1);
  std::atomic<int64_t> next{0};
  auto run = [&](int64_t begin, int64_t end) {
#ifdef QLIN_VNNI
    if (!force_scalar) {
      pertoken_blocks_vnni(p, begin, end);
      return;
    }
#endif
#ifdef QLIN_AVX2_INT8
    if (!force_scalar) {  // blocks of 16 rows are two of the AVX2 path's 8
      pertoken_blocks_avx2(p, begin * (PT_NB / PT2_NB), end * (PT_NB / PT2_NB));
      return;
    }
#endif
    pertoken_blocks_scalar(p, begin, end);
  };
  if (tasks <= 1) {
    run(0, blocks);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
      for (int64_t b = next.fetch_add(chunk); b < blocks; b = next.fetch_add(chunk)) run(b, std::min(blocks, b + chunk));
    });
  }
  return x_in.scalar_type() == x.scalar_type() ? y : y.to(x_in.scalar_type());
}

at::Tensor pertoken_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& wsum,
                           const at::Tensor& bias, const at::Tensor& zs, const at::Tensor& smooth,
                           const at::Tensor& wsum_i) {
  return pertoken_linear_impl(x, w, scale, wsum, bias, zs, smooth, wsum_i, false);
}

at::Tensor pertoken_linear_scalar(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                  const at::Tensor& wsum, const at::Tensor& bias, const at::Tensor& zs,
                                  const at::Tensor& smooth, const at::Tensor& wsum_i) {
  return pertoken_linear_impl(x, w, scale, wsum, bias, zs, smooth, wsum_i, true);
}

// static_linear: a static int8 layer (calibrated activation scale and zero point) through
// pertoken_linear's GEMMs, bit for bit what the int_mm kernel computes (int_mm.py):
//   q = clamp(rne(x / d) + z_x, -128, 127), d = s_x (or s_x * smooth, given per k);
//   acc[m, n] = sum_k (q[m, k] - z_x) * (w[n, k] - z[n])   (int32, exact below K = 33026);
//   y = float(acc) * (s_x * s[n]) (+ b[n]): two roundings, as int_mm.py's mul_ and add_.
// The GEMMs take u = q + 128 (unsigned codes) and the corrections come after (pt_output):
//   acc = sum u * w - z[n] * sum u - (o * sum_k w[n, k] - K * o * z[n]),  o = 128 + z_x.
at::Tensor static_linear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out_scale,
                              const at::Tensor& corr, const at::Tensor& zw, const at::Tensor& bias,
                              const at::Tensor& divisor, int64_t zero_point, const at::Tensor& wsum_i,
                              bool force_scalar) {
  TORCH_CHECK(w.dim() == 2 && x.dim() == 2 && x.size(1) == w.size(1) && w.size(1) < 65536,
              "static_linear: w must be (N, K) and x (M, K) with K < 65536");
  const int64_t N = w.size(0), K = w.size(1);
  auto ints = [N](const at::Tensor& t) {
    return t.dim() == 1 && t.size(0) == N && t.scalar_type() == at::kInt && t.is_contiguous();
  };
  TORCH_CHECK(ints(corr) && (zw.numel() == 0 || ints(zw)),
              "static_linear: corr and zw must be contiguous int32 (N,) (zw may be empty)");
  TORCH_CHECK(divisor.dim() == 1 && (divisor.size(0) == 1 || divisor.size(0) == K) &&
                  divisor.scalar_type() == at::kFloat && divisor.is_contiguous(),
              "static_linear: divisor must be contiguous float32 (1,) or (K,)");
  TORCH_CHECK(zero_point >= -128 && zero_point <= 127, "static_linear: zero_point must be in [-128, 127]");
  const StaticAct st{divisor.data_ptr<float>(), divisor.size(0) != 1, static_cast<float>(zero_point),
                     corr.data_ptr<int32_t>(), zw.numel() ? zw.data_ptr<int32_t>() : nullptr};
  const at::Tensor none = at::empty({0}, w.options().dtype(at::kFloat));
  return pertoken_linear_impl(x, w, out_scale, none, bias, none, none, wsum_i, force_scalar, &st);
}

at::Tensor static_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out_scale, const at::Tensor& corr,
                         const at::Tensor& zw, const at::Tensor& bias, const at::Tensor& divisor, int64_t zero_point,
                         const at::Tensor& wsum_i) {
  return static_linear_impl(x, w, out_scale, corr, zw, bias, divisor, zero_point, wsum_i, false);
}

at::Tensor static_linear_scalar(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out_scale,
                                const at::Tensor& corr, const at::Tensor& zw, const at::Tensor& bias,
                                const at::Tensor& divisor, int64_t zero_point, const at::Tensor& wsum_i) {
  return static_linear_impl(x, w, out_scale, corr, zw, bias, divisor, zero_point, wsum_i, true);
}

// the low-bit kernels' scale panels: float32, or float16 where every scale is a float16 value
inline bool float_or_half(const at::Tensor& s) {
  return s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf;
}
// their data as one of two pointers (the other nullptr)
inline std::pair<const float*, const f16*> scale_data(const at::Tensor& s) {
  if (s.scalar_type() == at::kHalf) return {nullptr, s.data_ptr<f16>()};
  return {s.data_ptr<float>(), nullptr};
}

// ---------------------------------------------------------------------------------------------
// lowbit_linear: weight-only layers (lowbit.py packs the operands and holds the reference):
//   y[m, n] = sum_k w[n, k] * x[m, k] (+ bias[n]),  w[n, k] = float(q[n, k] - z[n, g]) * s[n, g],
//   g = k / G (the last group may be shorter; G = K is per channel), q of 2 to 8 bits.
// The weights live in the kernel's own layout, "panels" of 16 output rows, k-major, so that one
// 16-byte load gives 16 outputs' weights at one k (an outer product, no horizontal sums):
//   codes: int8 (P, K, 16) (q), or for bits <= 4 uint8 (P, ceil(K/2), 16), byte j of row r
//          holding u = q + 8 of k = 2j in its low nibble and of k = 2j + 1 in its high nibble;
//   scale: float32 (P, ngroups, 16); zq: int8 (P, ngroups, 16), z (+ 8 for nibbles), or empty;
//   P = ceil(N / 16); the rows past N are padding (never stored).
// The math, the same on every path (scalar, AVX2, AVX-512) and for every M:
//   grouped (more than one group): the weight is dequantized exactly as the reference does it,
//   float(q - z) * s, one rounding (symmetric nibbles as fma(float(u), s, -8 s), the same number:
//   8 s is exact); each output is ONE chain of FMAs over k = 0, 1, ..., K - 1 from 0.0f, then
//   + bias;
//   per channel (one group): the chain runs over the exact integers float(q - z), and the scale
//   comes once at the end, fma(chain, s, bias) (or chain * s): a weight costs a widening, a
//   conversion and the FMA, not also a multiply (int8 weight-only at one token was bound by
//   those operations on AVX2, not by memory: RESULTS.md "pertoken-decode").
// So a row of y depends on its row of x only and on nothing else (not M, not the blocking, not
// the thread count, not the instruction set): batch invariant bit for bit, and the scalar path
// gives the same bits as the vector ones. Only the summation order (and, for one group, where the
// scale is applied) differs from the reference's F.linear (results equal to float rounding).
// Two ways through the same math, chosen by M:
//   M <= LB_DIRECT (decode): the codes are dequantized in registers and used at once by every
//     row of x (one pass over the weights, at the memory bound);
//   larger M (prefill): per chunk of LB_MC rows of x, per k-block of KC and per panel group, the
//     weights are dequantized once into a float buffer (L1-sized) that a float micro-kernel
//     (MB rows x NP * 16 outputs of accumulators) reads for every row block: a float GEMM whose
//     B operand costs a dequantization per LB_MC rows instead of 4 bytes of memory per weight.
// Threads take whole groups of 4 panels (64 rows); a task takes at least LB_WORK_PER_TASK
// weight-uses, so a small layer runs on the calling thread alone.

namespace lb {

constexpr int64_t PR = 16;                     // output rows per panel
constexpr int64_t LB_DIRECT = 4;               // rows of x up to which weights are dequantized in registers
constexpr int64_t LB_MC = 128;                 // rows of x per chunk (buffered path)
constexpr int64_t LB_WORK_PER_TASK = 1 << 20;  // weight uses a thread takes at least
constexpr int64_t LB_BLOCK = 4;                // panels per task unit

struct Args {
  const float* x;        // (M, K)
  const uint8_t* w;      // panels, panel p at w + p * pbytes
  const float* scale;    // (P, ngroups, 16), or nullptr when
  const f16* scale_h;    //   they are float16 values, held as float16 (half the bytes)
  const int8_t* zq;      // (P, ngroups, 16) or nullptr
  const float* bias;     // (N,) or nullptr
  float* y;              // (M, N)
  int64_t M, N, K, G, ngroups, P, pbytes;
  bool p4;               // nibbles (bits <= 4), else int8
};

inline int live_rows(const Args& a, int64_t p) { return static_cast<int>(std::min<int64_t>(PR, a.N - p * PR)); }
inline const uint8_t* code_row(const Args& a, int64_t p, int64_t k, bool p4) {
  return a.w + p * a.pbytes + (p4 ? (k >> 1) : k) * PR;
}

// ---- the portable path: 16 lanes as plain arrays (std::fma: the same bits as the vector paths)
struct VScalar {
  struct W { float v[PR]; };
  struct GP { float s[PR], o[PR]; int32_t z[PR]; };
  static constexpr int NP_BUF = 1, MB_BUF = 4;
  static constexpr int64_t KC = 256;
  static int np_direct(int, bool) { return 1; }
  static W zero() { W w; for (int r = 0; r < PR; ++r) w.v[r] = 0.0f; return w; }
  static W load(const float* p) { W w; for (int r = 0; r < PR; ++r) w.v[r] = p[r]; return w; }
  static W load(const f16* p) { W w; for (int r = 0; r < PR; ++r) w.v[r] = to_float(p[r]); return w; }
  static void store(float* p, const W& w) { for (int r = 0; r < PR; ++r) p[r] = w.v[r]; }
  static W fma(const W& w, float x, const W& acc) {
    W o; for (int r = 0; r < PR; ++r) o.v[r] = std::fma(w.v[r], x, acc.v[r]); return o;
  }
  static W add(const W& a, const W& b) { W o; for (int r = 0; r < PR; ++r) o.v[r] = a.v[r] + b.v[r]; return o; }
  static W mul(const W& a, const W& b) { W o; for (int r = 0; r < PR; ++r) o.v[r] = a.v[r] * b.v[r]; return o; }
  static W fmaw(const W& a, const W& b, const W& c) {
    W o; for (int r = 0; r < PR; ++r) o.v[r] = std::fma(a.v[r], b.v[r], c.v[r]); return o;
  }
  template <bool P4, bool ZP, bool PC, class S> static GP params(const S* s, const int8_t* z) {
    GP g;
    const W sv = PC ? zero() : load(s);
    for (int r = 0; r < PR; ++r) {
      g.s[r] = sv.v[r];
      g.o[r] = -8.0f * sv.v[r];
      g.z[r] = ZP ? z[r] : (PC && P4 ? 8 : 0);
    }
    return g;
  }
  template <bool P4, bool ZP, bool PC> static W deq(const uint8_t* c, int half, const GP& g) {
    W w;
    for (int r = 0; r < PR; ++r) {
      const int32_t q = P4 ? (c[r] >> (4 * half)) & 15 : static_cast<int32_t>(static_cast<int8_t>(c[r]));
      if (PC) w.v[r] = static_cast<float>(q - g.z[r]);
      else if (ZP) w.v[r] = static_cast<float>(q - g.z[r]) * g.s[r];
      else if (P4) w.v[r] = std::fma(static_cast<float>(q), g.s[r], g.o[r]);
      else w.v[r] = static_cast<float>(q) * g.s[r];
    }
    return w;
  }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QLIN_LB_AVX2 1
// ---- AVX2: a panel row is two 8-lane vectors
struct VAvx2 {
  struct W { __m256 a, b; };
  struct GP { W s, o; __m256i za, zb; };
  static constexpr int NP_BUF = 1, MB_BUF = 6;  // 6 x 2 accumulators + 2 weights + 1 broadcast = 15 of 16 registers
  static constexpr int64_t KC = 256;            // a panel's k-block: 16 KB of floats
  // panels a decode tile takes: each output is one FMA chain (4 cycles a step on Zen 3), so a tile
  // needs 8 vectors of chains to keep both FMA units busy, which symmetric int8 per channel (`bare`:
  // no scale or zero point in registers) affords at 1 and 2 rows (AMD EPYC Zen 3, 2 threads, one
  // token: 74-95% -> 92-103% of the read bandwidth, two tokens 54-67% -> 66-88%); grouped and
  // nibble panels keep their parameters in registers too and ran no faster with 4 (or 2 at M = 2)
  static int np_direct(int mb, bool bare) { return mb == 1 ? (bare ? 4 : 2) : mb == 2 && bare ? 2 : 1; }
  static W zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static W load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static W load(const f16* p) { return {load8(p), load8(p + 8)}; }
  static void store(float* p, const W& w) { _mm256_storeu_ps(p, w.a); _mm256_storeu_ps(p + 8, w.b); }
  static W fma(const W& w, float x, const W& acc) {
    const __m256 xv = _mm256_set1_ps(x);
    return {_mm256_fmadd_ps(w.a, xv, acc.a), _mm256_fmadd_ps(w.b, xv, acc.b)};
  }
  static W add(const W& a, const W& b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
  static W mul(const W& a, const W& b) { return {_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
  static W fmaw(const W& a, const W& b, const W& c) { return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
  template <bool P4, bool ZP, bool PC, class S> static GP params(const S* s, const int8_t* z) {
    GP g;
    if (!PC) {
      g.s = load(s);
      const __m256 m8 = _mm256_set1_ps(-8.0f);
      g.o = {_mm256_mul_ps(m8, g.s.a), _mm256_mul_ps(m8, g.s.b)};
    }
    if (ZP) {
      g.za = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z)));
      g.zb = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8)));
    } else if (PC && P4) {
      g.za = g.zb = _mm256_set1_epi32(8);
    }
    return g;
  }
  template <bool P4, bool ZP, bool PC> static __m256 deq8(const uint8_t* c, int half, const __m256& s, const __m256& o, const __m256i& z) {
    __m256i q;
    if (P4) {
      q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
      q = half ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, _mm256_set1_epi32(15));
    } else {
      q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    }
    if (PC) return _mm256_cvtepi32_ps(ZP || P4 ? _mm256_sub_epi32(q, z) : q);
    if (ZP) return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, z)), s);
    if (P4) return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, o);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
  }
  template <bool P4, bool ZP, bool PC> static W deq(const uint8_t* c, int half, const GP& g) {
    return {deq8<P4, ZP, PC>(c, half, g.s.a, g.o.a, g.za), deq8<P4, ZP, PC>(c + 8, half, g.s.b, g.o.b, g.zb)};
  }
};
#endif

#ifdef QLIN_AVX512
// ---- AVX-512: a panel row is one 16-lane vector
struct VAvx512 {
  struct W { __m512 v; };
  struct GP { __m512 s, o; __m512i z; };
  static constexpr int NP_BUF = 4, MB_BUF = 6;  // 6 x 4 accumulators + 4 weights + 1 broadcast = 29 of 32 registers
  static constexpr int64_t KC = 128;            // 4 panels' k-block: 32 KB of floats
  static int np_direct(int, bool) { return 4; }
  static W zero() { return {_mm512_setzero_ps()}; }
  static W load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static W load(const f16* p) { return {load16(p)}; }
  static void store(float* p, const W& w) { _mm512_storeu_ps(p, w.v); }
  static W fma(const W& w, float x, const W& acc) { return {_mm512_fmadd_ps(w.v, _mm512_set1_ps(x), acc.v)}; }
  static W add(const W& a, const W& b) { return {_mm512_add_ps(a.v, b.v)}; }
  static W mul(const W& a, const W& b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static W fmaw(const W& a, const W& b, const W& c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  template <bool P4, bool ZP, bool PC, class S> static GP params(const S* s, const int8_t* z) {
    GP g;
    if (!PC) {
      g.s = load(s).v;
      g.o = _mm512_mul_ps(_mm512_set1_ps(-8.0f), g.s);
    }
    if (ZP) g.z = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
    else if (PC && P4) g.z = _mm512_set1_epi32(8);
    return g;
  }
  template <bool P4, bool ZP, bool PC> static W deq(const uint8_t* c, int half, const GP& g) {
    __m512i q;
    if (P4) {
      q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
      q = half ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
    } else {
      q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    }
    if (PC) return {_mm512_cvtepi32_ps(ZP || P4 ? _mm512_sub_epi32(q, g.z) : q)};
    if (ZP) return {_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, g.z)), g.s)};
    if (P4) return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(q), g.s, g.o)};
    return {_mm512_mul_ps(_mm512_cvtepi32_ps(q), g.s)};
  }
};
#endif

// f(k, j, w) for k = k0 .. k1 - 1 in order, w the dequantized weights of panel p0 + j at k (for
// one k, panels in order; a nibble pair's two k for one panel before the next panel: each
// output still sees k in order, and fewer registers are live)
template <class V, bool P4, bool ZP, bool PC, int NP, class F>
__attribute__((always_inline)) inline void walk(const Args& a, int64_t p0, int64_t k0, int64_t k1, F&& f) {
  using W = typename V::W;
  for (int64_t g = k0 / a.G; g < a.ngroups && g * a.G < k1; ++g) {
    const int64_t ks = std::max(k0, g * a.G), ke = std::min(k1, std::min(a.K, (g + 1) * a.G));
    typename V::GP gp[NP];
    _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) {
      const int64_t at = ((p0 + j) * a.ngroups + g) * PR;
      const int8_t* z = ZP ? a.zq + at : nullptr;
      gp[j] = a.scale_h ? V::template params<P4, ZP, PC>(a.scale_h + at, z) : V::template params<P4, ZP, PC>(a.scale + at, z);
    }
    int64_t k = ks;
    if (P4) {
      if (k < ke && (k & 1)) {  // a group that starts on an odd k (an odd group size)
        _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j)
          f(k, j, V::template deq<P4, ZP, PC>(code_row(a, p0 + j, k, true), 1, gp[j]));
        ++k;
      }
      for (; k + 2 <= ke; k += 2) {
        _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) {
          const uint8_t* c = code_row(a, p0 + j, k, true);
          const W lo = V::template deq<P4, ZP, PC>(c, 0, gp[j]);
          f(k, j, lo);
          const W hi = V::template deq<P4, ZP, PC>(c, 1, gp[j]);
          f(k + 1, j, hi);
        }
      }
      if (k < ke)  // a group that ends on an even k
        _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j)
          f(k, j, V::template deq<P4, ZP, PC>(code_row(a, p0 + j, k, true), 0, gp[j]));
    } else {
      for (; k < ke; ++k)
        _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j)
          f(k, j, V::template deq<P4, ZP, PC>(code_row(a, p0 + j, k, false), 0, gp[j]));
    }
  }
}

// y tile: rows m0 .. m0 + MB, panels p0 .. p0 + NP (rows past N not stored); when `last`, per
// channel (PC) times the scale, then + bias (one FMA with a bias)
template <class V, bool PC, int MB, int NP>
__attribute__((always_inline)) inline void store_tile(const Args& a, int64_t m0, int64_t p0, typename V::W (&acc)[MB][NP],
                                                      bool last) {
  using W = typename V::W;
  _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) {
    const int live = live_rows(a, p0 + j);
    alignas(64) float t[PR];
    W b = V::zero(), s = V::zero();
    if (last && a.bias) {
      if (live == PR) b = V::load(a.bias + (p0 + j) * PR);
      else { std::fill(t, t + PR, 0.0f); std::copy(a.bias + (p0 + j) * PR, a.bias + (p0 + j) * PR + live, t); b = V::load(t); }
    }
    if (PC && last) s = a.scale_h ? V::load(a.scale_h + (p0 + j) * PR) : V::load(a.scale + (p0 + j) * PR);  // (P, 1, 16)
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
      const W v = !last ? acc[i][j]
                  : PC ? (a.bias ? V::fmaw(acc[i][j], s, b) : V::mul(acc[i][j], s))
                       : (a.bias ? V::add(acc[i][j], b) : acc[i][j]);
      float* dst = a.y + (m0 + i) * a.N + (p0 + j) * PR;
      if (live == PR) V::store(dst, v);
      else { V::store(t, v); std::copy(t, t + live, dst); }
    }
  }
}

template <class V, int MB, int NP>
__attribute__((always_inline)) inline void load_tile(const Args& a, int64_t m0, int64_t p0, typename V::W (&acc)[MB][NP]) {
  _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) {
    const int live = live_rows(a, p0 + j);
    alignas(64) float t[PR] = {0};
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
      const float* src = a.y + (m0 + i) * a.N + (p0 + j) * PR;
      if (live == PR) acc[i][j] = V::load(src);
      else { std::copy(src, src + live, t); acc[i][j] = V::load(t); }
    }
  }
}

// decode: rows m0 .. m0 + MB of x against panels p0 .. p0 + NP over all of K, in registers
template <class V, bool P4, bool ZP, bool PC, int MB, int NP>
void direct_tile(const Args& a, int64_t m0, int64_t p0) {
  using W = typename V::W;
  W acc[MB][NP];
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) acc[i][j] = V::zero();
  const float* xr[MB];
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) xr[i] = a.x + (m0 + i) * a.K;
  walk<V, P4, ZP, PC, NP>(a, p0, 0, a.K, [&](int64_t k, int j, const W& w) __attribute__((always_inline)) {
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) acc[i][j] = V::fma(w, xr[i][k], acc[i][j]);
  });
  store_tile<V, PC, MB, NP>(a, m0, p0, acc, true);
}

template <class V, bool P4, bool ZP, bool PC, int MB>
void direct_rows(const Args& a, int64_t pb, int64_t pe) {
  int64_t p = pb;
  const int np = V::np_direct(MB, PC && !P4 && !ZP);
  if (np == 4) for (; p + 4 <= pe; p += 4) direct_tile<V, P4, ZP, PC, MB, 4>(a, 0, p);
  if (np == 2) for (; p + 2 <= pe; p += 2) direct_tile<V, P4, ZP, PC, MB, 2>(a, 0, p);
  for (; p < pe; ++p) direct_tile<V, P4, ZP, PC, MB, 1>(a, 0, p);
}

// prefill: dequantize panels p0 .. p0 + NP over [k0, k1) into buf (k-major, NP * 16 floats per k)
template <class V, bool P4, bool ZP, bool PC, int NP>
void dequant_block(const Args& a, int64_t p0, int64_t k0, int64_t k1, float* buf) {
  walk<V, P4, ZP, PC, NP>(a, p0, k0, k1, [&](int64_t k, int j, const typename V::W& w) __attribute__((always_inline)) {
    V::store(buf + (k - k0) * NP * PR + j * PR, w);
  });
}

// the float micro-kernel: rows m0 .. m0 + MB against the buffer's NP panels over [k0, k1)
template <class V, bool PC, int MB, int NP>
void micro(const Args& a, const float* buf, int64_t m0, int64_t p0, int64_t k0, int64_t k1) {
  using W = typename V::W;
  W acc[MB][NP];
  if (k0 == 0) {
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i)
      _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) acc[i][j] = V::zero();
  } else {
    load_tile<V, MB, NP>(a, m0, p0, acc);
  }
  const float* xr[MB];
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) xr[i] = a.x + (m0 + i) * a.K;
  for (int64_t k = k0; k < k1; ++k) {
    W w[NP];
    const float* src = buf + (k - k0) * NP * PR;
    _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) w[j] = V::load(src + j * PR);
    _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) {
      const float xv = xr[i][k];
      _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) acc[i][j] = V::fma(w[j], xv, acc[i][j]);
    }
  }
  store_tile<V, PC, MB, NP>(a, m0, p0, acc, k1 == a.K);
}

template <class V, bool PC, int NP>
void micro_rows(const Args& a, const float* buf, int64_t mb, int64_t me, int64_t p0, int64_t k0, int64_t k1) {
  constexpr int MB = V::MB_BUF;
  int64_t m = mb;
  for (; m + MB <= me; m += MB) micro<V, PC, MB, NP>(a, buf, m, p0, k0, k1);
  switch (me - m) {
    case 5: micro<V, PC, 5 < MB ? 5 : 1, NP>(a, buf, m, p0, k0, k1); break;
    case 4: micro<V, PC, 4 < MB ? 4 : 1, NP>(a, buf, m, p0, k0, k1); break;
    case 3: micro<V, PC, 3, NP>(a, buf, m, p0, k0, k1); break;
    case 2: micro<V, PC, 2, NP>(a, buf, m, p0, k0, k1); break;
    case 1: micro<V, PC, 1, NP>(a, buf, m, p0, k0, k1); break;
    default: break;
  }
}

template <class V, bool P4, bool ZP, bool PC>
void buffered_rows(const Args& a, int64_t pb, int64_t pe) {
  constexpr int NB = V::NP_BUF;
  constexpr int64_t KC = V::KC;
  thread_local std::vector<float> store;
  if (static_cast<int64_t>(store.size()) < KC * NB * PR + 16) store.resize(KC * NB * PR + 16);
  float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
  for (int64_t mc = 0; mc < a.M; mc += LB_MC) {
    const int64_t me = std::min(a.M, mc + LB_MC);
    for (int64_t k0 = 0; k0 < a.K; k0 += KC) {
      const int64_t k1 = std::min(a.K, k0 + KC);
      int64_t p = pb;
      for (; p + NB <= pe; p += NB) {
        dequant_block<V, P4, ZP, PC, NB>(a, p, k0, k1, buf);
        micro_rows<V, PC, NB>(a, buf, mc, me, p, k0, k1);
      }
      for (; p < pe; ++p) {
        dequant_block<V, P4, ZP, PC, 1>(a, p, k0, k1, buf);
        micro_rows<V, PC, 1>(a, buf, mc, me, p, k0, k1);
      }
    }
  }
}

template <class V, bool P4, bool ZP, bool PC>
void rows_by_m(const Args& a, int64_t pb, int64_t pe) {
  switch (a.M) {
    case 1: direct_rows<V, P4, ZP, PC, 1>(a, pb, pe); return;
    case 2: direct_rows<V, P4, ZP, PC, 2>(a, pb, pe); return;
    case 3: direct_rows<V, P4, ZP, PC, 3>(a, pb, pe); return;
    case 4: direct_rows<V, P4, ZP, PC, 4>(a, pb, pe); return;
    default: buffered_rows<V, P4, ZP, PC>(a, pb, pe); return;
  }
}

template <class V, bool P4, bool ZP>
void rows(const Args& a, int64_t pb, int64_t pe) {
  if (a.K == 0) {  // y = bias (or 0)
    typename V::W acc[1][1] = {{V::zero()}};
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t p = pb; p < pe; ++p) store_tile<V, false, 1, 1>(a, m, p, acc, true);
    return;
  }
  if (a.ngroups == 1) rows_by_m<V, P4, ZP, true>(a, pb, pe);
  else rows_by_m<V, P4, ZP, false>(a, pb, pe);
}

template <class V>
void run(const Args& a, int64_t pb, int64_t pe) {
  if (a.p4) a.zq ? rows<V, true, true>(a, pb, pe) : rows<V, true, false>(a, pb, pe);
  else a.zq ? rows<V, false, true>(a, pb, pe) : rows<V, false, false>(a, pb, pe);
}

enum Path : int64_t { AUTO = 0, SCALAR = 1, AVX2 = 2, AVX512 = 3 };

std::vector<std::string> paths() {
  std::vector<std::string> out{"scalar"};
#ifdef QLIN_LB_AVX2
  out.push_back("avx2");
#endif
#ifdef QLIN_AVX512
  out.push_back("avx512");
#endif
  return out;
}

}  // namespace lb

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zq,
                         const at::Tensor& bias, int64_t N, int64_t K, int64_t group_size, int64_t path) {
  using namespace lb;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu() && x.size(1) == K,
              "lowbit_linear: x must be a contiguous float32 CPU (M, K) tensor with K = ", K, " (convert bf16/fp16 "
              "first), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(N >= 0 && group_size >= 1, "lowbit_linear: N must be >= 0 and group_size >= 1, got ", N, ", ", group_size);
  const int64_t M = x.size(0), P = (N + PR - 1) / PR, ngroups = K == 0 ? 0 : (K - 1) / group_size + 1;
  const bool p4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(p4 || codes.scalar_type() == at::kChar, "lowbit_linear: codes must be uint8 (nibbles) or int8, got ",
              codes.scalar_type());
  const int64_t krows = p4 ? (K + 1) / 2 : K;
  TORCH_CHECK(codes.dim() == 3 && codes.size(0) == P && codes.size(1) == krows && codes.size(2) == PR &&
                  codes.is_contiguous() && codes.is_cpu(),
              "lowbit_linear: codes must be contiguous panels (ceil(N/16), ", p4 ? "ceil(K/2)" : "K", ", 16) = (", P,
              ", ", krows, ", 16), got ", codes.sizes());
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == P && scale.size(1) == ngroups && scale.size(2) == PR &&
                  float_or_half(scale) && scale.is_contiguous() && scale.is_cpu(),
              "lowbit_linear: scale must be contiguous float32 or float16 (ceil(N/16), ceil(K/group_size), 16) = (",
              P, ", ", ngroups, ", 16), got ", scale.scalar_type(), " ", scale.sizes());
  const bool has_z = zq.numel() > 0;
  TORCH_CHECK(!has_z || (zq.sizes() == scale.sizes() && zq.scalar_type() == at::kChar && zq.is_contiguous()),
              "lowbit_linear: zq must be contiguous int8 of scale's shape, or empty, got ", zq.scalar_type(), " ",
              zq.sizes());
  const bool has_b = bias.numel() > 0;
  TORCH_CHECK(!has_b || (bias.dim() == 1 && bias.size(0) == N && bias.scalar_type() == at::kFloat &&
                         bias.is_contiguous()),
              "lowbit_linear: bias must be contiguous float32 (", N, ",) or empty, got ", bias.scalar_type(), " ",
              bias.sizes());
  TORCH_CHECK(path >= AUTO && path <= AVX512, "lowbit_linear: path must be 0 (auto) .. 3, got ", path);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const auto [sf, sh] = scale_data(scale);
  const Args a{x.data_ptr<float>(), reinterpret_cast<const uint8_t*>(codes.data_ptr()), sf, sh,
               has_z ? zq.data_ptr<int8_t>() : nullptr, has_b ? bias.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), M, N, K, group_size, ngroups, P, krows * PR, p4};
  void (*fn)(const Args&, int64_t, int64_t) = &run<VScalar>;
#ifdef QLIN_LB_AVX2
  if (path == AUTO || path == AVX2) fn = &run<VAvx2>;
#endif
#ifdef QLIN_AVX512
  if (path == AUTO || path == AVX512) fn = &run<VAvx512>;
#endif
  TORCH_CHECK(path == AUTO || path == SCALAR || fn != &run<VScalar>, "lowbit_linear: path ", path,
              " is not built for this CPU");
  const int64_t blocks = (P + LB_BLOCK - 1) / LB_BLOCK;
  const int64_t uses = LB_BLOCK * PR * std::max<int64_t>(K, 1) * (std::min<int64_t>(M, LB_MC) + 4);
  const int64_t grain = std::max<int64_t>(1, LB_WORK_PER_TASK / uses);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(a, b0 * LB_BLOCK, std::min(P, b1 * LB_BLOCK));
  });
  return y;
}


// ---------------------------------------------------------------------------------------------
// lowbit_dynamic_linear: grouped B-bit weights (2 <= B <= 8) times per-token int8 activations in
// one call (W4A8 at 4 bits; lowbit_dynamic.py packs the operands and holds the torch-op reference):
//   codes u, a, c of each row: quantize_rows' own loops (x ~ a[m] * u + c[m], u in [0, 255]);
//   acc[m, n, g] = sum_{k in g} u[m, k] * (q[n, k] - z[n, g])       (int32, exact);
//   v[m, n] = fma(float(acc[m, n, g]), s[n, g], v[m, n]) over g = 0, 1, ... from 0.0f;
//   y[m, n] = fma(a[m], v, c[m] * wsum[n])  (with a bias: fma(a[m], v, fma(c[m], wsum[n], b[n]))),
//   wsum[n] = the dequantized weight's row sum (computed once when packing).
// The integers are the same on every path and the float operations are the same ones in the same
// order, so the scalar, AVX2 and AVX-512 paths give the same bits, and a row's result never
// depends on the other rows (batch invariant).
// Layout ("dot panels", lowbit_dynamic.py): panels of 16 output rows (as lowbit_linear's); K in
// units of 4 consecutive k of one group: a group takes UG = ceil(G / 4) units (the last group
// ceil(L / 4)), positions past a group's end are padding where the codes are 0. One unit of a panel:
//   B <= 4: 32 bytes, byte 4i + j holding q + 8 of row i (low nibble) and of row 8 + i (high
//           nibble) at the unit's k j: AND and a shift give rows 0-7 and rows 8-15 as u8 x s8
//           operands of vpmaddubsw / vpdpbusd (4 k of one row side by side);
//   B >= 5: 64 bytes, byte 4r + j = q of row r at the unit's k j (int8).
// One 32-bit broadcast of a row's 4 codes meets a unit. AVX2 without VNNI: vpmaddubsw (u8 x s8,
// pairs summed into int16) is exact for nibbles (2 * 255 * 15 = 7650, four units 30600 < 32767:
// summed in int16 for up to 4 units, then vpmaddwd by ones into int32); 5-8 bit weights are
// widened to int16 (vpmaddwd, exact for 8 bits; vpmaddubsw could saturate at 8 bits). AVX-512
// VNNI: vpdpbusd on 16 rows at once. Zero points (and the nibbles' + 8) are one subtraction per
// group: acc -= zq[n, g] * sum_{k in g} u[m, k].

namespace ld {

constexpr int64_t PR = 16;                     // output rows per panel
constexpr int64_t LD_MC = 64;                  // rows of codes per pass over a thread's panels
constexpr int64_t LD_BLOCK = 4;                // panels per task unit
constexpr int64_t LD_WORK_PER_TASK = 1 << 18;  // multiply-adds a thread takes at least (at 1 << 20 a
                                               // decode step's 256 x 2048 layer ran on one thread: 43 us
                                               // against 31 on two, AMD EPYC Zen 1)
// bytes ahead that the AVX2 tiles fetch each panel stream, a cache line every other unit (a
// thread's panels are one stretch of memory, so this runs on into its next panel): AMD EPYC Zen 3,
// 2 threads, 4-bit G = 32, weights from memory, alternated twice, one token 0-10% less time a
// layer, two tokens 20-30% (2048 x 2048: 110/106 -> 84/83 us), four 25-37% (5632 x 2048:
// 580/485 -> 372/363 us): the multi-row tiles, which spend more time a byte, had left the
// hardware prefetchers behind
constexpr int64_t LD_PREFETCH = 4096;
constexpr int LD_STREAMS = 2;  // panels a decode tile reads side by side (Zen 1, 2 threads, 4-bit G=32,
                               // 5632 x 2048: 1: 13.9 GB/s, 2: 16.6-17.6, 3: 17.0, 4: 15.9, 8: 11.1)

struct Args {
  const uint8_t* u;      // codes (M, ku), ku = 4 U, zero in the padding
  int64_t ku;
  const int32_t* usum;   // (M, ngroups): sum of a row's codes over each group
  const float *a, *c;    // (M,)
  const uint8_t* w;      // (P, U, ub)
  const float* scale;    // (P, ngroups, 16), or nullptr when
  const f16* scale_h;    //   they are float16 values, held as float16 (half the bytes)
  const int8_t* zq;      // (P, ngroups, 16) or nullptr (then z = 0; nibbles: 8)
  const float* wsum;     // (N,)
  const float* bias;     // (N,) or nullptr
  float* y;              // (M, N) float32, or nullptr when
  bf16* yb;              //   the output is bfloat16
  int64_t M, N, ngroups, UG, U, P, ub;
  bool p4;               // nibbles (B <= 4), else int8
};

inline int64_t unit_end(const Args& a, int64_t g) { return std::min(a.U, (g + 1) * a.UG); }
inline const uint8_t* unit(const Args& a, int64_t p, int64_t t) { return a.w + (p * a.U + t) * a.ub; }
inline int32_t codes4(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }
// scale `at` as float32 (a float16 one converted exactly)
inline float scale_at(const Args& a, int64_t at) {
  return a.scale_h ? to_float(a.scale_h[at]) : a.scale[at];
}

// the epilogue of 16 outputs of row m in panel p (v: their sums over the groups); rows past N not stored
inline void store_row(const Args& a, int64_t m, int64_t p, const float* v) {
  const int64_t n0 = p * PR, live = std::min(PR, a.N - n0);
  for (int64_t r = 0; r < live; ++r) {
    const int64_t n = n0 + r;
    const float t = a.bias ? std::fma(a.c[m], a.wsum[n], a.bias[n]) : a.c[m] * a.wsum[n];
    const float out = std::fma(a.a[m], v[r], t);
    a.yb ? store_out(a.yb + m * a.N + n, out) : store_out(a.y + m * a.N + n, out);
  }
}

// ---- the portable path: one row of codes, one output at a time
template <int MB>
void tile_scalar(const Args& a, int64_t p, int64_t m0) {
  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    const uint8_t* ur = a.u + m * a.ku;
    float v[PR] = {0};
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const int64_t t0 = g * a.UG, t1 = unit_end(a, g);
      const int32_t us = a.usum[m * a.ngroups + g];
      for (int r = 0; r < PR; ++r) {
        int32_t acc = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const uint8_t* blk = unit(a, p, t);
          for (int j = 0; j < 4; ++j) {
            const int32_t q = a.p4 ? (r < 8 ? blk[r * 4 + j] & 15 : blk[(r - 8) * 4 + j] >> 4)
                                   : static_cast<int32_t>(static_cast<int8_t>(blk[r * 4 + j]));
            acc += static_cast<int32_t>(ur[t * 4 + j]) * q;
          }
        }
        const int64_t at = (p * a.ngroups + g) * PR + r;
        acc -= (a.zq ? static_cast<int32_t>(a.zq[at]) : (a.p4 ? 8 : 0)) * us;
        v[r] = std::fma(static_cast<float>(acc), scale_at(a, at), v[r]);
      }
    }
    store_row(a, m, p, v);
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QLIN_LD_AVX2 1
// 8 scales from `at` as float32 (float16 ones converted exactly, vcvtph2ps)
inline __m256 scales8(const Args& a, int64_t at) { return a.scale_h ? load8(a.scale_h + at) : load8(a.scale + at); }

// v[i][h] = fma(float(acc - zq * usum), s, v[i][h]) for rows 8h .. 8h + 7 of the panel
template <int MB>
__attribute__((always_inline)) inline void finish_group_avx2(const Args& a, int64_t p, int64_t g, int64_t m0,
                                                             __m256i (&acc)[MB][2], __m256 (&v)[MB][2]) {
  const int64_t at = (p * a.ngroups + g) * PR;
  const __m256 s0 = scales8(a, at), s1 = scales8(a, at + 8);
  __m256i z0 = _mm256_setzero_si256(), z1 = z0;
  if (a.zq) {
    z0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zq + at)));
    z1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.zq + at + 8)));
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
    const __m256i us = _mm256_set1_epi32(a.usum[(m0 + i) * a.ngroups + g]);
    __m256i c0 = acc[i][0], c1 = acc[i][1];
    if (a.zq) {
      c0 = _mm256_sub_epi32(c0, _mm256_mullo_epi32(z0, us));
      c1 = _mm256_sub_epi32(c1, _mm256_mullo_epi32(z1, us));
    } else if (a.p4) {
      const __m256i u8 = _mm256_slli_epi32(us, 3);
      c0 = _mm256_sub_epi32(c0, u8);
      c1 = _mm256_sub_epi32(c1, u8);
    }
    v[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c0), s0, v[i][0]);
    v[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), s1, v[i][1]);
  }
}

template <int MB>
__attribute__((always_inline)) inline void store_avx2(const Args& a, int64_t p, int64_t m0, __m256 (&v)[MB][2]) {
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
    alignas(32) float t[PR];
    _mm256_store_ps(t, v[i][0]);
    _mm256_store_ps(t + 8, v[i][1]);
    store_row(a, m0 + i, p, t);
  }
}

// nibbles: vpmaddubsw into int16 for up to 4 units (exact), then vpmaddwd by ones into int32;
// MB rows of codes from m0 against NS panels pn[0 .. NS), one unit of each panel in turn (a
// unit's broadcast codes serve every panel). NS > 1 is decode's: NS sequential streams. Each
// panel's integers and float operations are the same whatever MB and NS: the same bits.
template <int MB, int NS>
void tiles_avx2_p4(const Args& a, const int64_t* pn, int64_t m0) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* ur[MB];
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) ur[i] = a.u + (m0 + i) * a.ku;
  const uint8_t* base[NS];
  _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j) base[j] = unit(a, pn[j], 0);
  __m256 v[NS][MB][2];
  _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j)
    _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) v[j][i][0] = v[j][i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.ngroups; ++g) {
    const int64_t t1 = unit_end(a, g);
    __m256i acc[NS][MB][2], s16[NS][MB][2];
    _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j)
      _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i)
        acc[j][i][0] = acc[j][i][1] = s16[j][i][0] = s16[j][i][1] = _mm256_setzero_si256();
    // one unit into the int16 sums
    auto step = [&](int64_t t) __attribute__((always_inline)) {
      if (!(t & 1))
        _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base[j] + t * a.ub) + LD_PREFETCH), _MM_HINT_T0);
      __m256i xb[MB];
      _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) xb[i] = _mm256_set1_epi32(codes4(ur[i] + t * 4));
      _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base[j] + t * a.ub));
        const __m256i lo = _mm256_and_si256(c, low4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
        _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
          s16[j][i][0] = _mm256_add_epi16(s16[j][i][0], _mm256_maddubs_epi16(xb[i], lo));
          s16[j][i][1] = _mm256_add_epi16(s16[j][i][1], _mm256_maddubs_epi16(xb[i], hi));
        }
      }
    };
    auto flush = [&]() __attribute__((always_inline)) {
      _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j)
        _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
          acc[j][i][0] = _mm256_add_epi32(acc[j][i][0], _mm256_madd_epi16(s16[j][i][0], ones));
          acc[j][i][1] = _mm256_add_epi32(acc[j][i][1], _mm256_madd_epi16(s16[j][i][1], ones));
          s16[j][i][0] = s16[j][i][1] = _mm256_setzero_si256();
        }
    };
    int64_t t = g * a.UG;
    for (; t + 4 <= t1; t += 4) {  // whole chunks of 4 units, unrolled
      step(t);
      step(t + 1);
      step(t + 2);
      step(t + 3);
      flush();
    }
    if (t < t1) {
      for (; t < t1; ++t) step(t);
      flush();
    }
    _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j) finish_group_avx2<MB>(a, pn[j], g, m0, acc[j], v[j]);
  }
  _Pragma("GCC unroll 4") for (int j = 0; j < NS; ++j) store_avx2<MB>(a, pn[j], m0, v[j]);
}

template <int MB>
void tile_avx2_p4(const Args& a, int64_t p, int64_t m0) {
  tiles_avx2_p4<MB, 1>(a, &p, m0);
}

// 5-8 bits: int8 widened to int16, vpmaddwd (exact); four vectors of 4 rows x 2 k-pair sums per
// unit, summed across pairs (hadd) and put back in row order once per group
template <int MB>
void tile_avx2_i8(const Args& a, int64_t p, int64_t m0) {
  const uint8_t* ur[MB];
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) ur[i] = a.u + (m0 + i) * a.ku;
  __m256 v[MB][2];
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) v[i][0] = v[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.ngroups; ++g) {
    const int64_t t1 = unit_end(a, g);
    __m256i part[MB][4];
    _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i)
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) part[i][j] = _mm256_setzero_si256();
    for (int64_t t = g * a.UG; t < t1; ++t) {
      const uint8_t* blk = unit(a, p, t);
      __m256i w[4];
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)
        w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * j)));
      _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
        const __m256i xw = _mm256_cvtepu8_epi16(_mm_set1_epi32(codes4(ur[i] + t * 4)));
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)
          part[i][j] = _mm256_add_epi32(part[i][j], _mm256_madd_epi16(xw, w[j]));
      }
    }
    __m256i acc[MB][2];
    _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {  // [r0 r1 r4 r5 | r2 r3 r6 r7] -> rows in order
      acc[i][0] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(part[i][0], part[i][1]), 0xD8);
      acc[i][1] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(part[i][2], part[i][3]), 0xD8);
    }
    finish_group_avx2<MB>(a, p, g, m0, acc, v);
  }
  store_avx2<MB>(a, p, m0, v);
}

template <int MB>
void tile_avx2(const Args& a, int64_t p, int64_t m0) {
  a.p4 ? tile_avx2_p4<MB>(a, p, m0) : tile_avx2_i8<MB>(a, p, m0);
}

// one row of codes (M = 1) against nibble panels [pb, pe): the panels cut into NS runs of adjacent
// panels, a tile taking the next panel of each run, so a thread reads NS long sequential streams
// (as pertoken's decode tile does); the panels left over one at a time
template <int NS>
void panels1_streams_avx2(const Args& a, int64_t pb, int64_t pe) {
  const int64_t run = (pe - pb) / NS;
  int64_t pn[NS];
  for (int64_t i = 0; i < run; ++i) {
    for (int j = 0; j < NS; ++j) pn[j] = pb + j * run + i;
    tiles_avx2_p4<1, NS>(a, pn, 0);
  }
  for (int64_t p = pb + NS * run; p < pe; ++p) tile_avx2_p4<1>(a, p, 0);
}
#endif

#ifdef QLIN_VNNI
// AVX-512 VNNI (run in the tests on an AMD EPYC Zen 5, and under SIMDe elsewhere, tests/other_build.py):
// vpdpbusd on a unit of 16 rows x 4 k, one int32 lane per row
template <int MB>
void tile_vnni(const Args& a, int64_t p, int64_t m0) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* ur[MB];
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) ur[i] = a.u + (m0 + i) * a.ku;
  __m512 v[MB];
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) v[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.ngroups; ++g) {
    const int64_t t1 = unit_end(a, g);
    __m512i acc[MB];
    _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t t = g * a.UG; t < t1; ++t) {
      __m512i w;
      if (a.p4) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit(a, p, t)));
        w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(c, low4)),
                               _mm256_and_si256(_mm256_srli_epi16(c, 4), low4), 1);
      } else {
        w = _mm512_loadu_si512(unit(a, p, t));
      }
      _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i)
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(codes4(ur[i] + t * 4)), w);
    }
    const int64_t at = (p * a.ngroups + g) * PR;
    const __m512 s = a.scale_h ? load16(a.scale_h + at) : load16(a.scale + at);
    const __m512i z = a.zq ? _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zq + at)))
                           : _mm512_set1_epi32(a.p4 ? 8 : 0);
    _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
      const __m512i us = _mm512_set1_epi32(a.usum[(m0 + i) * a.ngroups + g]);
      const __m512i c = _mm512_sub_epi32(acc[i], _mm512_mullo_epi32(z, us));
      v[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, v[i]);
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MB; ++i) {
    alignas(64) float t[PR];
    _mm512_store_ps(t, v[i]);
    store_row(a, m0 + i, p, t);
  }
}
#endif

using Tile = void (*)(const Args&, int64_t, int64_t);
// panels [pb, pe) for every row, LD_MC rows of codes at a time (they stay in L2 while the panels
// pass), in tiles of 4 rows (T4, where given: the VNNI path, whose 32 registers hold four rows'
// sums; one weight unit unpacked for all four: at 4 tokens 1.4-1.7x the GB/s of two 2-row tiles
// on the Zen 5, 1.05-1.1x at 8-16), 2 and 1
template <Tile T2, Tile T1, Tile T4 = nullptr>
void panels(const Args& a, int64_t pb, int64_t pe) {
  for (int64_t mc = 0; mc < a.M; mc += LD_MC) {
    const int64_t me = std::min(a.M, mc + LD_MC);
    for (int64_t p = pb; p < pe; ++p) {
      int64_t m = mc;
      if constexpr (T4 != nullptr)
        for (; m + 4 <= me; m += 4) T4(a, p, m);
      for (; m + 2 <= me; m += 2) T2(a, p, m);
      if (m < me) T1(a, p, m);
    }
  }
}

std::vector<std::string> paths() {
  std::vector<std::string> out{"scalar"};
#ifdef QLIN_LD_AVX2
  out.push_back("avx2");
#endif
#ifdef QLIN_VNNI
  out.push_back("avx512_vnni");
#endif
  return out;
}

}  // namespace ld

at::Tensor lowbit_dynamic_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scale,
                                 const at::Tensor& zq, const at::Tensor& wsum, const at::Tensor& bias,
                                 const at::Tensor& smooth, int64_t N, int64_t K, int64_t group_size, int64_t path) {
  using namespace ld;
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_cpu() && x_in.size(1) == K,
              "lowbit_dynamic_linear: x must be a 2-D CPU (M, K) tensor with K = ", K, ", got ", x_in.sizes());
  const bool is_bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = (is_bf16 ? x_in : x_in.to(at::kFloat)).contiguous();  // no copy when it is already
  TORCH_CHECK(N >= 0 && K >= 1 && group_size >= 1, "lowbit_dynamic_linear: N >= 0, K >= 1 and group_size >= 1, got ",
              N, ", ", K, ", ", group_size);
  const int64_t M = x.size(0), P = (N + PR - 1) / PR, ngroups = (K - 1) / group_size + 1;
  const int64_t UG = (group_size + 3) / 4, last = K - (ngroups - 1) * group_size;
  const int64_t U = (ngroups - 1) * UG + (last + 3) / 4;
  const bool p4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(p4 || codes.scalar_type() == at::kChar, "lowbit_dynamic_linear: codes must be uint8 (nibbles) or int8");
  const int64_t ub = p4 ? 32 : 64;
  TORCH_CHECK(codes.dim() == 3 && codes.size(0) == P && codes.size(1) == U && codes.size(2) == ub &&
                  codes.is_contiguous() && codes.is_cpu(),
              "lowbit_dynamic_linear: codes must be contiguous dot panels (", P, ", ", U, ", ", ub, "), got ",
              codes.sizes());
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == P && scale.size(1) == ngroups && scale.size(2) == PR &&
                  float_or_half(scale) && scale.is_contiguous(),
              "lowbit_dynamic_linear: scale must be contiguous float32 or float16 (", P, ", ", ngroups, ", 16)");
  const bool has_z = zq.numel() > 0, has_b = bias.numel() > 0, has_smooth = smooth.numel() > 0;
  TORCH_CHECK(!has_z || (zq.sizes() == scale.sizes() && zq.scalar_type() == at::kChar && zq.is_contiguous()),
              "lowbit_dynamic_linear: zq must be contiguous int8 of scale's shape, or empty");
  auto vec = [](const at::Tensor& t, int64_t n) {
    return t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.is_contiguous();
  };
  TORCH_CHECK(vec(wsum, N) && (!has_b || vec(bias, N)) && (!has_smooth || vec(smooth, K)),
              "lowbit_dynamic_linear: wsum and bias must be contiguous float32 (N,), smooth (K,) (bias, smooth may "
              "be empty)");
  // int32 sums: |acc| <= G * 255 * (|q| + |zq|) <= G * 255 * 272
  TORCH_CHECK(std::min(group_size, K) <= (int64_t(1) << 31) / (255 * 272),
              "lowbit_dynamic_linear: groups of more than ", (int64_t(1) << 31) / (255 * 272),
              " inputs could overflow int32 sums");
  TORCH_CHECK(path >= 0 && path <= 3, "lowbit_dynamic_linear: path must be 0 (auto) .. 3, got ", path);
  at::Tensor y = at::empty({M, N}, x.options());  // float32 or bfloat16, as x
  if (M == 0 || N == 0) return x_in.scalar_type() == x.scalar_type() ? y : y.to(x_in.scalar_type());
  // codes (M, ku), a, c, and the group sums: thread-local buffers kept between calls for a few
  // rows, fresh ones for many
  thread_local std::vector<uint8_t> kept_codes;
  thread_local std::vector<float> kept_rowp;
  thread_local std::vector<int32_t> kept_usum;
  std::vector<uint8_t> big_codes;
  std::vector<float> big_rowp;
  std::vector<int32_t> big_usum;
  const int64_t ku = 4 * U;
  const bool few = M <= PT_MAX_ROWS;
  std::vector<uint8_t>& ucodes = few ? kept_codes : big_codes;
  std::vector<float>& rowp = few ? kept_rowp : big_rowp;
  std::vector<int32_t>& usum = few ? kept_usum : big_usum;
  if (static_cast<int64_t>(ucodes.size()) < M * ku) ucodes.resize(M * ku);
  if (static_cast<int64_t>(rowp.size()) < 3 * M) rowp.resize(3 * M);
  if (static_cast<int64_t>(usum.size()) < M * ngroups) usum.resize(M * ngroups);
  float *ap = rowp.data(), *cp = ap + M, *rs = cp + M;
  const float* sp = has_smooth ? smooth.data_ptr<float>() : nullptr;
  uint8_t* up = ucodes.data();
  if (is_bf16)
    quantize_into(x.data_ptr<bf16>(), sp, M, K, up, ku, ap, cp, rs);
  else
    quantize_into(x.data_ptr<float>(), sp, M, K, up, ku, ap, cp, rs);
  // each group to its units (only when G is not a multiple of 4), then the group sums
  int32_t* usp = usum.data();
  const int64_t G = group_size;
  at::parallel_for(0, M, std::max<int64_t>(1, WORK_PER_TASK / ku), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      uint8_t* row = up + m * ku;
      if (G % 4 && ngroups > 1) {
        for (int64_t g = ngroups - 1; g >= 1; --g)  // right to left: a group's units start at or after its k
          std::memmove(row + g * UG * 4, row + g * G, std::min(G, K - g * G));
        for (int64_t g = 0; g < ngroups; ++g)
          std::fill(row + g * UG * 4 + std::min(G, K - g * G), row + std::min(ku, (g + 1) * UG * 4), uint8_t(0));
      }
      for (int64_t g = 0; g < ngroups; ++g) {
        int32_t s = 0;
        const uint8_t* q = row + g * UG * 4;
        for (int64_t k = 0, n = std::min(G, K - g * G); k < n; ++k) s += q[k];
        usp[m * ngroups + g] = s;
      }
    }
  });
  const auto [sf, sh] = scale_data(scale);
  const Args a{up, ku, usp, ap, cp, reinterpret_cast<const uint8_t*>(codes.data_ptr()), sf, sh,
               has_z ? zq.data_ptr<int8_t>() : nullptr, wsum.data_ptr<float>(), has_b ? bias.data_ptr<float>() : nullptr,
               is_bf16 ? nullptr : y.data_ptr<float>(), is_bf16 ? y.data_ptr<bf16>() : nullptr,
               M, N, ngroups, UG, U, P, ub, p4};
  void (*const scalar)(const Args&, int64_t, int64_t) = &panels<tile_scalar<2>, tile_scalar<1>>;
  void (*fn)(const Args&, int64_t, int64_t) = scalar;
#ifdef QLIN_LD_AVX2
  if (path == 0 || path == 2) fn = M == 1 && p4 ? &panels1_streams_avx2<LD_STREAMS> : &panels<tile_avx2<2>, tile_avx2<1>>;
#endif
#ifdef QLIN_VNNI
  if (path == 0 || path == 3) fn = &panels<tile_vnni<2>, tile_vnni<1>, tile_vnni<4>>;
#endif
  TORCH_CHECK(path == 0 || path == 1 || fn != scalar, "lowbit_dynamic_linear: path ",
              path, " is not built for this CPU");
  const int64_t blocks = (P + LD_BLOCK - 1) / LD_BLOCK;
  const int64_t uses = LD_BLOCK * PR * ku * std::min<int64_t>(M, LD_MC);
  const int64_t grain = std::max<int64_t>(1, LD_WORK_PER_TASK / std::max<int64_t>(uses, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(a, b0 * LD_BLOCK, std::min(P, b1 * LD_BLOCK));
  });
  return x_in.scalar_type() == x.scalar_type() ? y : y.to(x_in.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "per-row uint8 codes, scale, offset and code sums");
  m.def("epilogue_", &epilogue_, "y = a * (y - rowsum * zs) + c * wsum + b, in place or into out");
  m.def("pertoken_linear", &pertoken_linear, "the per-token int8 layer in one call, any rows (kernels pertoken, onednn)");
  m.def("_pertoken_linear_scalar", &pertoken_linear_scalar, "pertoken_linear's portable path (for tests)");
  m.def("static_linear", &static_linear, "a static int8 layer in one call, any rows (kernel pertoken; int_mm's bits)");
  m.def("_static_linear_scalar", &static_linear_scalar, "static_linear's portable path (for tests)");
  m.attr("pertoken_max_rows") = PT_MAX_ROWS;
#if defined(QLIN_VNNI)
  m.attr("pertoken_isa") = "avx512_vnni";
#elif defined(QLIN_AVX2_INT8)
  m.attr("pertoken_isa") = "avx2";
#else
  m.attr("pertoken_isa") = "scalar";
#endif
  m.def("lowbit_linear", &lowbit_linear, "y = x @ dequant(w).T + bias, weight-only panels (lowbit.py)");
  m.def("lowbit_dynamic_linear", &lowbit_dynamic_linear,
        "grouped low-bit weights x per-token int8 activations, an integer dot per group (lowbit_dynamic.py)");
  m.attr("lowbit_dynamic_paths") = ld::paths();  // instruction sets built here, for its `path` (tests)
  m.attr("lowbit_paths") = lb::paths();  // instruction sets built here, for lowbit_linear's `path` (tests)
#ifdef QLIN_AVX512
  m.attr("lowbit_avx512") = true;
#else
  m.attr("lowbit_avx512") = false;
#endif
}
