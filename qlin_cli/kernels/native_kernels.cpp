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
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QLIN_AVX512 1
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
inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline void store_out(float* y, float v) { *y = v; }
inline void store_out(bf16* y, float v) {
  *y = std::isnan(v) ? bf16(0xFFFF, bf16::from_bits()) : bf16(v);  // c10's round to nearest even
}
#ifdef QLIN_AVX512
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
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

// xs[k] = x[k] / smooth[k] into buf (when smooth); lo, hi of the (smoothed) row
template <typename T>
void row_min_max(const T* x, const float* sm, float* buf, int64_t K, float& lo, float& hi) {
  int64_t k = 0;
  lo = INFINITY;
  hi = -INFINITY;
#ifdef QLIN_AVX512
  __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY);
  for (; k + 16 <= K; k += 16) {
    __m512 v = load16(x + k);
    if (sm) {
      v = _mm512_div_ps(v, _mm512_loadu_ps(sm + k));
      _mm512_storeu_ps(buf + k, v);
    }
    vmin = _mm512_min_ps(vmin, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  lo = _mm512_reduce_min_ps(vmin);
  hi = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < K; ++k) {
    float v = to_float(x[k]);
    if (sm) {
      v = v / sm[k];
      buf[k] = v;
    }
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
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
// pertoken_linear: the whole per-token int8 layer in one call, for few rows (kernels._Onednn runs
// it up to PT_MAX_ROWS rows, oneDNN's GEMM above). Bit for bit the three-call path (quantize_rows,
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
// least PT_MACS_PER_TASK multiply-adds, so a small layer runs on the calling thread alone.
// The scalar path (no AVX-512 VNNI; also exposed as _pertoken_linear_scalar for tests) computes
// the same integers and the same float operations: the same bits.

constexpr int64_t PT_MAX_ROWS = 16;             // rows this kernel takes; oneDNN's GEMM above
constexpr int64_t PT_MACS_PER_TASK = 1 << 22;   // multiply-adds a thread takes at least (~30 us here)
constexpr int64_t PT_NB = 16;                   // weight rows per block (one output vector)

struct PertokenArgs {
  const uint8_t* u;        // codes (M, ku), rows zero padded to ku (a multiple of 64)
  int64_t ku;
  const float *a, *c, *rowsum;   // (M,)
  const int8_t* w;         // (N, K)
  const float *scale, *wsum, *bias, *zs;  // (N,); bias and zs may be nullptr
  float* y;                // (M, N) float32 output, or nullptr when
  bf16* yb;                //   the output is bfloat16 (M, N)
  int64_t M, N, K;
};

inline float pt_output(const PertokenArgs& p, int64_t m, int64_t n, int32_t acc) {
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

#if defined(QLIN_AVX512) && defined(__AVX512VNNI__)
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

// acc[i * NR + r] += codes of row i . weight row r over k .. k + 63 (the weight's bytes in `live`):
// each weight vector is loaded once for the MB rows (one row: loaded where it is used, as 16
// weight vectors beside 16 accumulators would not fit in the 32 registers)
template <int MB>
__attribute__((always_inline)) inline void pt_step(__m512i* acc, const uint8_t* const* ur, const int8_t* const* wr,
                                                   int64_t k, __mmask64 live) {
  constexpr int NR = PT_NB / MB;
  // vpdpbusd (u8 codes x s8 weights) in place: the intrinsic's copy-and-add made GCC shuffle
  // every accumulator through other registers
  auto dot = [](__m512i& acc, __m512i x, __m512i w) { asm("vpdpbusd %[w], %[x], %[acc]" : [acc] "+v"(acc) : [x] "v"(x), [w] "v"(w)); };
  if (MB == 1) {
    const __m512i xv = _mm512_loadu_si512(ur[0] + k);
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) dot(acc[r], xv, _mm512_maskz_loadu_epi8(live, wr[r] + k));
    return;
  }
  __m512i wv[NR];
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi8(live, wr[r] + k);
  _Pragma("GCC unroll 16") for (int i = 0; i < MB; ++i) {
    const __m512i xv = _mm512_loadu_si512(ur[i] + k);
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) dot(acc[i * NR + r], xv, wv[r]);
  }
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
  for (int64_t k = 0; k < kmain; k += 64) pt_step<MB>(acc, ur, wr, k, ~0ULL);
  if (ktail) pt_step<MB>(acc, ur, wr, kmain, ~0ULL >> (64 - ktail));  // codes are zero padded
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
// bits on these CPUs. Here both operands are widened to int16 and multiplied by vpmaddwd: exact
// int32 sums, the same integers as the VNNI path, so the same bits out. A tile is MB rows of
// codes x NR = 8 / MB weight rows: 8 accumulators of 8 int32 lanes (k mod 16 pairs), summed by a
// transposing add tree into one vector of 8 outputs; k past the last multiple of 16 and the
// epilogue (pt_output, the scalar path's own function) run per output. Any number of rows: the
// same tiles for every M, so a row's result never depends on the batch.
constexpr int64_t PT2_NB = 8;   // outputs per tile (MB x NR)
constexpr int64_t PT2_MBLOCK = 64;  // rows of codes per pass over a thread's weight rows (L2)

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

// blocks [nb0, nb1) of 8 weight rows against all rows of codes, PT2_MBLOCK rows at a time (they
// stay in L2 while the blocks' weight rows pass): 4 rows a tile, then 2, then 1
void pertoken_blocks_avx2(const PertokenArgs& p, int64_t nb0, int64_t nb1) {
  const int64_t n_begin = nb0 * PT2_NB, n_end = std::min(p.N, nb1 * PT2_NB);
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

at::Tensor pertoken_linear_impl(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& wsum, const at::Tensor& bias, const at::Tensor& zs,
                                const at::Tensor& smooth, bool force_scalar) {
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
  TORCH_CHECK(vec(scale, false) && vec(wsum, false) && vec(bias, true) && vec(zs, true),
              "pertoken_linear: scale, wsum, bias and zs must be contiguous float32 (N,) (bias, zs may be empty)");
  const bool has_smooth = smooth.numel() > 0;
  TORCH_CHECK(!has_smooth || (smooth.dim() == 1 && smooth.size(0) == K && smooth.scalar_type() == at::kFloat &&
                              smooth.is_contiguous()), "pertoken_linear: smooth must be contiguous float32 (K,)");
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
  std::vector<uint8_t>& codes = few ? kept_codes : big_codes;
  std::vector<float>& rowp = few ? kept_rowp : big_rowp;
  if (static_cast<int64_t>(codes.size()) < M * ku) codes.resize(M * ku);
  if (static_cast<int64_t>(rowp.size()) < 3 * M) rowp.resize(3 * M);
  float *a = rowp.data(), *c = a + M, *rs = c + M;
  const float* sp = has_smooth ? smooth.data_ptr<float>() : nullptr;
  if (is_bf16)
    quantize_into(x.data_ptr<bf16>(), sp, M, K, codes.data(), ku, a, c, rs);
  else
    quantize_into(x.data_ptr<float>(), sp, M, K, codes.data(), ku, a, c, rs);
  PertokenArgs p{codes.data(), ku, a, c, rs, w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                 wsum.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
                 zs.numel() ? zs.data_ptr<float>() : nullptr, is_bf16 ? nullptr : y.data_ptr<float>(),
                 is_bf16 ? y.data_ptr<bf16>() : nullptr, M, N, K};
  const int64_t blocks = (N + PT_NB - 1) / PT_NB;
  const int64_t grain = std::max<int64_t>(1, PT_MACS_PER_TASK / std::max<int64_t>(M * K * PT_NB, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
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
  });
  return x_in.scalar_type() == x.scalar_type() ? y : y.to(x_in.scalar_type());
}

at::Tensor pertoken_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& wsum,
                           const at::Tensor& bias, const at::Tensor& zs, const at::Tensor& smooth) {
  return pertoken_linear_impl(x, w, scale, wsum, bias, zs, smooth, false);
}

at::Tensor pertoken_linear_scalar(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                  const at::Tensor& wsum, const at::Tensor& bias, const at::Tensor& zs,
                                  const at::Tensor& smooth) {
  return pertoken_linear_impl(x, w, scale, wsum, bias, zs, smooth, true);
}

// ---------------------------------------------------------------------------------------------
// lowbit_linear: y = x @ dequant(w).T (+ bias), n-bit weights with a scale (and zero point) per
// group of G consecutive input channels of an output row (lowbit.py has the reference).
//   x (M, K) float32; w uint8 (N, ceil(K/2)) two 4-bit codes per byte (element k in byte k/2, low
//   nibble for even k, code = q + 8), or int8 (N, K) for any width 2..8; scale (N, ceil(K/G));
//   zero point int8 (N, ceil(K/G)) or empty; bias (N,) or empty.
//   y[m, n] = sum_k w[n, k] * x[m, k] (+ bias[n]),  w[n, k] = float(q - z) * s  (float32, exact
//   to one rounding: the same float32 weight the reference dequantizes to).
// AVX-512: a 4-bit code indexes a 16-float table per (row, group), T[c] = (c - 8 - z) * s
// (vpermps reads only the low 4 bits, so no masking); int8 codes: (float(q) - z) * s.
// Loop order (one parallel region, over output rows n; a task takes whole rows):
//   n-block (64 rows when M <= LB_MB, else LB_NB) > k-block (LB_KB) > m-block (LB_MB x rows)
//   > pair of w rows (LB_NR) > k in 32-blocks,
//   with LB_MB x LB_NR float32 accumulators in registers: 32 codes of a weight row (16 bytes)
//   are decoded once per m-block (vpmovzxbd, a shift, two vpermps: the even and the odd
//   elements) and used for LB_MB x rows, whose k-block was copied once per m-block into an 8 KB
//   stack block with each 32-block split into its even and odd elements; an x vector is loaded
//   once for LB_NR weight rows. Group and k-block tails and group starts that are not multiples
//   of 32 run 16 (or fewer, masked) elements at a time in natural order. At each k-block's end
//   the 16 lanes are summed into y. The k-blocks are fixed (not sized by M) and every (m, n) has
//   its own accumulator, so a row of y does not depend on the other rows of x: batch invariant,
//   bit for bit, and independent of the thread count.
// The scalar path (no AVX-512; also exposed as _lowbit_linear_scalar so that tests run it) does
// the same math with another summation order (results equal to float rounding).

struct LowbitArgs {
  const float* x;
  const uint8_t* w;     // row n at w + n * wrow (bytes)
  const float* scale;   // (N, ngroups)
  const int8_t* zp;     // (N, ngroups) or nullptr
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N)
  int64_t M, N, K, G, ngroups, wrow;
  bool packed4;         // 4-bit codes, two per byte; else int8 (N, K)
};

constexpr int64_t LB_KB = 512;  // k per block: fixed, a multiple of 16 (the summation order)
constexpr int64_t LB_NB = 16;   // weight rows per n-block (large M: x's k-block stays in L2)
constexpr int LB_MB = 4;        // x rows per register block
constexpr int LB_NR = 2;        // weight rows per register block

inline float lb_weight(const LowbitArgs& a, int64_t n, int64_t k, float zq, float s) {
  // zq = the code's offset: 8 + z for 4-bit (codes are q + 8), z for int8
  const uint8_t* row = a.w + n * a.wrow;
  float c;
  if (a.packed4) {
    const uint8_t b = row[k >> 1];
    c = static_cast<float>((k & 1) ? (b >> 4) : (b & 15));
  } else {
    c = static_cast<float>(static_cast<int8_t>(row[k]));
  }
  return (c - zq) * s;
}

inline float lb_offset(const LowbitArgs& a, int64_t n, int64_t g) {
  const int z = a.zp ? static_cast<int>(a.zp[n * a.ngroups + g]) : 0;
  return static_cast<float>(a.packed4 ? z + 8 : z);
}

void lowbit_rows_scalar(const LowbitArgs& a, int64_t n0, int64_t n1) {
  // a row is decoded CH weights at a time, then used for every x row; 16 partial sums per
  // (m, n) (lane = k % 16) that the compiler can keep in vector registers (e.g. AVX2), summed
  // in a fixed order at the end of each chunk
  constexpr int64_t CH = 256;
  float wbuf[CH];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] = 0.0f;
    for (int64_t k0 = 0; k0 < a.K; k0 += CH) {
      const int64_t k1 = std::min(a.K, k0 + CH);
      for (int64_t k = k0; k < k1;) {
        const int64_t g = k / a.G, ge = std::min(k1, g * a.G + std::min(a.G, a.K - g * a.G));
        const float zq = lb_offset(a, n, g), s = a.scale[n * a.ngroups + g];
        for (; k < ge; ++k) wbuf[k - k0] = lb_weight(a, n, k, zq, s);
      }
      const int64_t len = k1 - k0;
      for (int64_t m = 0; m < a.M; ++m) {
        const float* xr = a.x + m * a.K + k0;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= len; k += 16)
          for (int j = 0; j < 16; ++j) acc[j] += wbuf[k + j] * xr[k + j];
        for (int j = 0; k + j < len; ++j) acc[j] += wbuf[k + j] * xr[k + j];
        float sum = 0.0f;
        for (int j = 0; j < 16; ++j) sum += acc[j];
        a.y[m * a.N + n] += sum;
      }
    }
    if (a.bias)
      for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] += a.bias[n];
  }
}

#ifdef QLIN_AVX512
// 4-bit codes of 16 consecutive elements k.. (k even) of a row, as int32 lanes: 8 bytes, each
// byte twice, odd lanes shifted right by 4 (vpermps reads only the low 4 bits of an index)
inline __m512i lb_codes16(const uint8_t* row, int64_t k, int64_t len) {
  const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m128i b = len == 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (k >> 1)))
                              : _mm_maskz_loadu_epi8(__mmask16((1u << ((len + 1) >> 1)) - 1), row + (k >> 1));
  return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shift);
}

// Rows n..n+NR-1 of w against x rows m..m+MB-1 over k in [kb0, kb1); sums into y (= when kb0 is
// 0). xe: for 4-bit, the same x rows with each aligned 32-block of the k-block stored as its 16
// even then its 16 odd elements (row i at xe + i * LB_KB, k-block relative), so that a 32-block
// of codes decodes to two vectors in register order (no interleaving of weights).
template <bool P4, int MB, int NR>
void lowbit_block_avx512(const LowbitArgs& a, const float* xe, int64_t n, int64_t m, int64_t kb0, int64_t kb1) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const uint8_t* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = a.w + (n + r) * a.wrow;
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = a.x + (m + i) * a.K;
  for (int64_t g = kb0 / a.G; g < a.ngroups && g * a.G < kb1; ++g) {
    const int64_t gs = std::max(kb0, g * a.G), ge = std::min(kb1, g * a.G + std::min(a.G, a.K - g * a.G));
    // 4-bit: T[c] = (c - 8 - z) * s, the weight of code c; int8: w = (q - z) * s
    __m512 tab[NR], off[NR], scl[NR];
    for (int r = 0; r < NR; ++r) {
      off[r] = _mm512_set1_ps(lb_offset(a, n + r, g));
      scl[r] = _mm512_set1_ps(a.scale[(n + r) * a.ngroups + g]);
      if (P4) tab[r] = _mm512_mul_ps(_mm512_sub_ps(iota, off[r]), scl[r]);
    }
    int64_t k = gs;
    while (k < ge) {
      if (P4 && (k & 31) == 0 && ge - k >= 32) {  // the hot loop: whole 32-blocks
        const int64_t kend = k + ((ge - k) & ~int64_t(31));
        for (; k < kend; k += 32) {
          __m512 we[NR], wo[NR];
          for (int r = 0; r < NR; ++r) {
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + (k >> 1))));
            we[r] = _mm512_permutexvar_ps(c, tab[r]);                         // even k: low nibbles
            wo[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), tab[r]);  // odd k: high nibbles
          }
          for (int i = 0; i < MB; ++i) {
            const float* xk = xe + i * LB_KB + (k - kb0);
            const __m512 x0 = _mm512_loadu_ps(xk), x1 = _mm512_loadu_ps(xk + 16);
            for (int r = 0; r < NR; ++r) {
              acc[i][r] = _mm512_fmadd_ps(we[r], x0, acc[i][r]);
              acc[i][r] = _mm512_fmadd_ps(wo[r], x1, acc[i][r]);
            }
          }
        }
        continue;
      }
      if (!P4 && ge - k >= 16) {  // int8: whole 16-chunks
        const int64_t kend = k + ((ge - k) & ~int64_t(15));
        for (; k < kend; k += 16) {
          __m512 wv[NR];
          for (int r = 0; r < NR; ++r) {
            const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k))));
            wv[r] = _mm512_mul_ps(a.zp ? _mm512_sub_ps(c, off[r]) : c, scl[r]);
          }
          for (int i = 0; i < MB; ++i) {
            const __m512 xv = _mm512_loadu_ps(xr[i] + k);
            for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
          }
        }
        continue;
      }
      // a chunk of up to 16 in natural order: group and k-block tails, unaligned group starts
      const int64_t len = std::min<int64_t>(ge - k, std::min<int64_t>(16, 32 - (k & 31)));  // then 32-aligned
      const __mmask16 mask = len == 16 ? __mmask16(0xFFFF) : __mmask16((1u << len) - 1);
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r) {
        if (!P4) {
          const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, wr[r] + k)));
          wv[r] = _mm512_maskz_mul_ps(mask, _mm512_sub_ps(c, off[r]), scl[r]);
        } else if ((k & 1) == 0) {
          wv[r] = _mm512_maskz_permutexvar_ps(mask, lb_codes16(wr[r], k, len), tab[r]);
        } else {  // an odd start (a group size that is not even): one weight at a time
          alignas(64) float t[16] = {0};
          const float zq = lb_offset(a, n + r, g), s = a.scale[(n + r) * a.ngroups + g];
          for (int64_t j = 0; j < len; ++j) t[j] = lb_weight(a, n + r, k + j, zq, s);
          wv[r] = _mm512_load_ps(t);
        }
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, xr[i] + k);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
      k += len;
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) {
      float* out = a.y + (m + i) * a.N + n + r;
      const float sum = _mm512_reduce_add_ps(acc[i][r]);
      *out = kb0 == 0 ? sum : *out + sum;
    }
}

template <bool P4, int NR>
void lowbit_block_rows(const LowbitArgs& a, const float* xe, int mb, int64_t n, int64_t m, int64_t kb0, int64_t kb1) {
  switch (mb) {
    case 4: lowbit_block_avx512<P4, 4, NR>(a, xe, n, m, kb0, kb1); break;
    case 3: lowbit_block_avx512<P4, 3, NR>(a, xe, n, m, kb0, kb1); break;
    case 2: lowbit_block_avx512<P4, 2, NR>(a, xe, n, m, kb0, kb1); break;
    default: lowbit_block_avx512<P4, 1, NR>(a, xe, n, m, kb0, kb1); break;
  }
}

template <bool P4>
void lowbit_rows_avx512(const LowbitArgs& a, int64_t n0, int64_t n1) {
  static_assert(LB_MB == 4 && LB_NR == 2 && LB_KB % 32 == 0, "lowbit_block_rows dispatches on these");
  alignas(64) float xe[LB_MB * LB_KB];  // 8 KB: x rows of a k-block, 32-blocks split even/odd
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  // few x rows: long runs of weight rows per x block; many: x's k-block (M * LB_KB) stays in L2
  const int64_t nb_rows = a.M <= LB_MB ? 64 : LB_NB;
  for (int64_t nb = n0; nb < n1; nb += nb_rows) {
    const int64_t nbe = std::min(n1, nb + nb_rows);
    for (int64_t kb0 = 0; kb0 < a.K; kb0 += LB_KB) {
      const int64_t kb1 = std::min(a.K, kb0 + LB_KB);
      for (int64_t m = 0; m < a.M; m += LB_MB) {
        const int mb = static_cast<int>(std::min<int64_t>(LB_MB, a.M - m));
        if (P4)
          for (int i = 0; i < mb; ++i)
            for (int64_t k = kb0; k + 32 <= kb1; k += 32) {
              const float* src = a.x + (m + i) * a.K + k;
              const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
              _mm512_store_ps(xe + i * LB_KB + (k - kb0), _mm512_permutex2var_ps(x0, even, x1));
              _mm512_store_ps(xe + i * LB_KB + (k - kb0) + 16, _mm512_permutex2var_ps(x0, odd, x1));
            }
        int64_t n = nb;
        if (mb == 1)  // one x row: four weight rows at a time, for more independent FMA chains
          for (; n + 4 <= nbe; n += 4) lowbit_block_avx512<P4, 1, 4>(a, xe, n, m, kb0, kb1);
        for (; n + LB_NR <= nbe; n += LB_NR) lowbit_block_rows<P4, LB_NR>(a, xe, mb, n, m, kb0, kb1);
        for (; n < nbe; ++n) lowbit_block_rows<P4, 1>(a, xe, mb, n, m, kb0, kb1);
      }
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t n = nb; n < nbe; ++n) {
        float* out = a.y + m * a.N + n;
        if (a.K == 0) *out = 0.0f;
        if (a.bias) *out += a.bias[n];
      }
  }
}
#endif

at::Tensor lowbit_linear_impl(const at::Tensor& x, const at::Tensor& w, int64_t bits, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t group_size, const at::Tensor& bias,
                              bool force_scalar) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "lowbit_linear: x must be a contiguous float32 CPU (M, K) tensor (convert bf16/fp16 first), got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group_size >= 1, "lowbit_linear: group_size must be >= 1, got ", group_size);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.is_cpu(), "lowbit_linear: w must be a contiguous 2-D CPU tensor");
  const int64_t N = w.size(0);
  const bool packed4 = w.scalar_type() == at::kByte;
  if (packed4) {
    TORCH_CHECK(bits == 4, "lowbit_linear: a uint8 w holds packed 4-bit codes (bits=4), got bits=", bits,
                "; pass other widths as int8 (N, K)");
    TORCH_CHECK(w.size(1) == (K + 1) / 2, "lowbit_linear: packed 4-bit w must be (N, ceil(K/2)) = (", N, ", ",
                (K + 1) / 2, "), got ", w.sizes());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar, "lowbit_linear: w must be uint8 (packed 4-bit) or int8, got ",
                w.scalar_type());
    TORCH_CHECK(bits >= 2 && bits <= 8, "lowbit_linear: bits must be in 2..8 for an int8 w, got ", bits);
    TORCH_CHECK(w.size(1) == K, "lowbit_linear: int8 w must be (N, K) with K = ", K, ", got ", w.sizes());
  }
  const int64_t ngroups = K == 0 ? 0 : (K - 1) / group_size + 1;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == ngroups &&
                  scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.is_cpu(),
              "lowbit_linear: scale must be contiguous float32 (N, ceil(K/group_size)) = (", N, ", ", ngroups,
              "), got ", scale.scalar_type(), " ", scale.sizes());
  const bool has_z = zero_point.numel() > 0;
  if (has_z)
    TORCH_CHECK(zero_point.dim() == 2 && zero_point.size(0) == N && zero_point.size(1) == ngroups &&
                    zero_point.scalar_type() == at::kChar && zero_point.is_contiguous() && zero_point.is_cpu(),
                "lowbit_linear: zero_point must be contiguous int8 (", N, ", ", ngroups, ") or empty, got ",
                zero_point.scalar_type(), " ", zero_point.sizes());
  const bool has_b = bias.numel() > 0;
  if (has_b)
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.scalar_type() == at::kFloat &&
                    bias.is_contiguous() && bias.is_cpu(),
                "lowbit_linear: bias must be contiguous float32 (", N, ",) or empty, got ", bias.scalar_type(), " ",
                bias.sizes());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  LowbitArgs a{x.data_ptr<float>(), reinterpret_cast<const uint8_t*>(w.data_ptr()), scale.data_ptr<float>(),
               has_z ? zero_point.data_ptr<int8_t>() : nullptr, has_b ? bias.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), M, N, K, group_size, ngroups, w.size(1), packed4};
  // a task takes at least WORK_PER_TASK * 8 multiply-adds (whole rows of w)
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK * 8 / std::max<int64_t>(M * K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
#ifdef QLIN_AVX512
    if (!force_scalar) {
      packed4 ? lowbit_rows_avx512<true>(a, begin, end) : lowbit_rows_avx512<false>(a, begin, end);
      return;
    }
#endif
    lowbit_rows_scalar(a, begin, end);
  });
  return y;
}

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& w, int64_t bits, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t group_size, const at::Tensor& bias) {
  return lowbit_linear_impl(x, w, bits, scale, zero_point, group_size, bias, false);
}

at::Tensor lowbit_linear_scalar(const at::Tensor& x, const at::Tensor& w, int64_t bits, const at::Tensor& scale,
                                const at::Tensor& zero_point, int64_t group_size, const at::Tensor& bias) {
  return lowbit_linear_impl(x, w, bits, scale, zero_point, group_size, bias, true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "per-row uint8 codes, scale, offset and code sums");
  m.def("epilogue_", &epilogue_, "y = a * (y - rowsum * zs) + c * wsum + b, in place or into out");
  m.def("pertoken_linear", &pertoken_linear, "the per-token int8 layer in one call, few rows (kernels._Onednn)");
  m.def("_pertoken_linear_scalar", &pertoken_linear_scalar, "pertoken_linear's portable path (for tests)");
  m.attr("pertoken_max_rows") = PT_MAX_ROWS;
#if defined(QLIN_VNNI)
  m.attr("pertoken_isa") = "avx512_vnni";
#elif defined(QLIN_AVX2_INT8)
  m.attr("pertoken_isa") = "avx2";
#else
  m.attr("pertoken_isa") = "scalar";
#endif
  m.def("lowbit_linear", &lowbit_linear, "y = x @ dequant(w).T + bias, n-bit group-wise weights (lowbit.py)");
  m.def("_lowbit_linear_scalar", &lowbit_linear_scalar, "lowbit_linear's portable path (for tests)");
#ifdef QLIN_AVX512
  m.attr("lowbit_avx512") = true;
#else
  m.attr("lowbit_avx512") = false;
#endif
}
