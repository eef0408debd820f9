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
//
// Built with -ffp-contract=off so that the quantize pass's mul/sub never become an FMA (that would
// change codes); the epilogue uses explicit FMAs. Small row blocks run on one thread (grain).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <memory>
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

// xs[k] = x[k] / smooth[k] into buf (when smooth); lo, hi of the (smoothed) row
void row_min_max(const float* x, const float* sm, float* buf, int64_t K, float& lo, float& hi) {
  int64_t k = 0;
  lo = INFINITY;
  hi = -INFINITY;
#ifdef QLIN_AVX512
  __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY);
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
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
    float v = x[k];
    if (sm) {
      v = v / sm[k];
      buf[k] = v;
    }
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
}

// u[k] = clamp(rne(((x[k] - lo) * inv) * inv_s), 0, 255); returns the sum of u
int64_t quantize_row(const float* x, uint8_t* u, int64_t K, float lo, float inv, float inv_s) {
  int64_t k = 0, total = 0;
#ifdef QLIN_AVX512
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv), vs = _mm512_set1_ps(inv_s);
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  __m512i acc = _mm512_setzero_si512();
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + k), vlo), vinv), vs);
    __m512i i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), zero), top);  // rne
    acc = _mm512_add_epi32(acc, i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(i));
  }
  total = _mm512_reduce_add_epi32(acc);
#endif
  for (; k < K; ++k) {
    float r = std::nearbyint(((x[k] - lo) * inv) * inv_s);
    r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
    const int32_t i = static_cast<int32_t>(r);
    total += i;
    u[k] = static_cast<uint8_t>(i);
  }
  return total;
}

std::vector<at::Tensor> quantize_rows(const at::Tensor& x, const at::Tensor& smooth) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "quantize_rows: x must be a contiguous float32 CPU (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  const bool has_smooth = smooth.numel() > 0;
  if (has_smooth)
    TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K && smooth.scalar_type() == at::kFloat &&
                    smooth.is_contiguous(), "quantize_rows: smooth must be contiguous float32 (K,)");
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor a = at::empty({M}, x.options()), c = at::empty({M}, x.options()),
             rs = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = has_smooth ? smooth.data_ptr<float>() : nullptr;
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *ap = a.data_ptr<float>(), *cp = c.data_ptr<float>(), *rp = rs.data_ptr<float>();
  const float inv_s = inv_s_fbgemm();
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buf(has_smooth ? new float[K] : nullptr);
    for (int64_t m = begin; m < end; ++m) {
      const float* row = xp + m * K;
      float lo, hi;
      row_min_max(row, sp, buf.get(), K, lo, hi);
      float width = hi - lo;
      width = width < MIN_SCALE ? MIN_SCALE : width;
      const int64_t total = quantize_row(has_smooth ? buf.get() : row, qp + m * K, K, lo, 1.0f / width, inv_s);
      ap[m] = width / 255.0f;
      cp[m] = lo;
      rp[m] = static_cast<float>(total);
    }
  });
  return {q, a, c, rs};
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
  TORCH_CHECK(dst.scalar_type() == at::kFloat && dst.size(0) == M && dst.size(1) == N &&
                  dst.stride(1) == 1 && dst.stride(0) == N, "epilogue_: out must be contiguous (M, N)");
  const float* yp = y.data_ptr<float>();
  float* op = dst.data_ptr<float>();
  const float *ap = a.data_ptr<float>(), *cp = c.data_ptr<float>(), *wp = wsum.data_ptr<float>();
  const float* bp = has_b ? bias.data_ptr<float>() : nullptr;
  const float* zp = has_z ? zs.data_ptr<float>() : nullptr;
  const float* rp = rowsum.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, WORK_PER_TASK / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = yp + m * N;
      float* orow = op + m * N;
      const float am = ap[m], cm = cp[m], rm = -rp[m];
      int64_t n = 0;
#ifdef QLIN_AVX512
      const __m512 va = _mm512_set1_ps(am), vc = _mm512_set1_ps(cm), vr = _mm512_set1_ps(rm);
      for (; n + 16 <= N; n += 16) {
        __m512 v = _mm512_loadu_ps(row + n);
        if (zp) v = _mm512_fmadd_ps(vr, _mm512_loadu_ps(zp + n), v);
        __m512 t = bp ? _mm512_fmadd_ps(vc, _mm512_loadu_ps(wp + n), _mm512_loadu_ps(bp + n))
                      : _mm512_mul_ps(vc, _mm512_loadu_ps(wp + n));
        _mm512_storeu_ps(orow + n, _mm512_fmadd_ps(va, v, t));
      }
#endif
      for (; n < N; ++n) {
        float v = row[n];
        if (zp) v = std::fma(rm, zp[n], v);
        const float t = bp ? std::fma(cm, wp[n], bp[n]) : cm * wp[n];
        orow[n] = std::fma(am, v, t);
      }
    }
  });
  return dst;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "per-row uint8 codes, scale, offset and code sums");
  m.def("epilogue_", &epilogue_, "y = a * (y - rowsum * zs) + c * wsum + b, in place or into out");
}
