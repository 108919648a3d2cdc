// Weight-only quantized matmul on CPUs: y[m, n] = sum_k x[m, k] * W[n, k] with
//
//     W[n, k] = (q[n, k] - z[n, g]) * s[n, g],   g = k / group
//
// read from lowbit's packed layout as QuantizedWeight stores it: row-major codes,
// 4-bit two per byte (the even column in the low nibble), 8-bit one per byte;
// scales fp16 or fp32 [N, G]; zero points uint8 [N, G] or one default for
// symmetric weights. The last group may be shorter (ragged).
//
// Activations stay fp32 and products accumulate in fp32, so the result agrees
// with dequantize-then-matmul to fp32 rounding on every instruction set. Per
// group the kernel forms s * (sum_k q x - z * sum_k x): the integer codes meet
// the activations directly and the zero point costs one multiply per group.
//
// The instruction set is chosen at run time (AVX-512, AVX2 + FMA, or portable
// C++ that compiles anywhere, ARM included) and can be forced, so that tests
// check every path on one machine. Larger batches dequantize tiles of rows with
// the same code and hand them to the BLAS GEMM (wq_dequant below).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define LOWBIT_X86 1
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kChunk = 4;  // batch rows that share one pass over a weight row
constexpr int64_t kAhead = 4096;  // bytes of codes prefetched ahead of the row being read

struct Problem {
  const uint8_t* codes;
  const at::Half* half_scales;   // one of these two is set
  const float* float_scales;
  const uint8_t* zeros;          // nullptr: every zero point is default_zero
  float default_zero;
  const float* xa;               // 4-bit: even columns [M, K/2]; 8-bit: x [M, K]
  const float* xb;               // 4-bit: odd columns / 16 [M, K/2] (they meet the high nibble in place)
  const float* xsum;             // per-group sums of x [M, G]
  float* y;                      // [M, N]
  int64_t M, N, K, group, G;
};

inline float scale_of(const Problem& p, int64_t i) {
  return p.half_scales ? static_cast<float>(p.half_scales[i]) : p.float_scales[i];
}

#ifdef LOWBIT_X86
LOWBIT_AVX2 inline float scale_f16c(const Problem& p, int64_t i) {
  return p.half_scales ? _cvtsh_ss(p.half_scales[i].x) : p.float_scales[i];
}
#endif

inline float zero_of(const Problem& p, int64_t i) {
  return p.zeros ? static_cast<float>(p.zeros[i]) : p.default_zero;
}

// ------------------------------------------------------------------ portable C++
// Every row function adds sum over groups [g0, g1) of s * (sum_k q x - z * sum_k x)
// into y for batch rows m0 .. m0 + MB and weight row n. Eight partial sums per
// row let a compiler vectorize without reassociating (no fast-math needed).

template <int MB>
void int4_row_portable(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t hk = p.K / 2;
  const uint8_t* row = p.codes + n * hk;
  float total[MB] = {};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t j0 = g * (p.group / 2), j1 = std::min(hk, j0 + p.group / 2);
    float part[MB][8] = {};
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8)
      for (int m = 0; m < MB; ++m) {
        const float* e = p.xa + (m0 + m) * hk + j;
        const float* o = p.xb + (m0 + m) * hk + j;
        for (int u = 0; u < 8; ++u)
          part[m][u] += static_cast<float>(row[j + u] & 0x0F) * e[u] + static_cast<float>(row[j + u] & 0xF0) * o[u];
      }
    for (; j < j1; ++j)
      for (int m = 0; m < MB; ++m)
        part[m][0] += static_cast<float>(row[j] & 0x0F) * p.xa[(m0 + m) * hk + j] +
                      static_cast<float>(row[j] & 0xF0) * p.xb[(m0 + m) * hk + j];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    for (int m = 0; m < MB; ++m) {
      float dot = 0.f;
      for (int u = 0; u < 8; ++u) dot += part[m][u];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
}

template <int MB>
void int8_row_portable(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const uint8_t* row = p.codes + n * p.K;
  float total[MB] = {};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    float part[MB][8] = {};
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8)
      for (int m = 0; m < MB; ++m) {
        const float* x = p.xa + (m0 + m) * p.K + k;
        for (int u = 0; u < 8; ++u) part[m][u] += static_cast<float>(row[k + u]) * x[u];
      }
    for (; k < k1; ++k)
      for (int m = 0; m < MB; ++m) part[m][0] += static_cast<float>(row[k]) * p.xa[(m0 + m) * p.K + k];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    for (int m = 0; m < MB; ++m) {
      float dot = 0.f;
      for (int u = 0; u < 8; ++u) dot += part[m][u];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
}

#ifdef LOWBIT_X86
// ------------------------------------------------------------------ AVX2 + FMA
// Per 32 weights (16 bytes): two zero-extending loads to 8 x int32, two masks
// (low nibble; high nibble in place, 16 q, against x / 16), four conversions and
// four FMAs per batch row. One or two rows keep four accumulators each (hiding
// the FMA latency), more rows two.

LOWBIT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LOWBIT_AVX2 inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <int MB>
LOWBIT_AVX2 void int4_row_avx2(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  constexpr int NA = MB <= 2 ? 4 : 2;
  const int64_t hk = p.K / 2, hg = p.group / 2;
  const uint8_t* row = p.codes + n * hk;
  const float* xa[MB];
  const float* xb[MB];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * hk;
    xb[m] = p.xb + (m0 + m) * hk;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  const __m256i low = _mm256_set1_epi32(0x0F), high = _mm256_set1_epi32(0xF0);
  __m256 total[MB];
  float extra[MB];
  for (int m = 0; m < MB; ++m) {
    total[m] = _mm256_setzero_ps();
    extra[m] = 0.f;
  }
  int64_t g = g0;
  if (hg <= 32 && hg % 8 == 0) {
    // small groups: the scale goes onto the converted codes (one multiply per vector)
    // instead of a reduction per group; the accumulators run across groups
    const int64_t gfull = std::min(g1, p.K / p.group);
    __m256 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (; g < gfull; ++g) {
      const int64_t j0 = g * hg;
      if (j0 % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + j0), _MM_HINT_T0);
      const float sc = scale_f16c(p, n * p.G + g);
      const __m256 vs = _mm256_set1_ps(sc);
      for (int64_t j = j0; j < j0 + hg; j += 8) {
        const __m256i b = load8_u8(row + j);
        const __m256 l = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low)), vs);
        const __m256 h = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, high)), vs);
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm256_fmadd_ps(l, _mm256_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      const float zs = sc * zero_of(p, n * p.G + g);
      for (int m = 0; m < MB; ++m) extra[m] -= zs * xs[m][g];
    }
    for (int m = 0; m < MB; ++m) total[m] = _mm256_add_ps(total[m], _mm256_add_ps(acc[m][0], acc[m][1]));
  }
  for (; g < g1; ++g) {
    const int64_t j0 = g * hg, j1 = std::min(hk, j0 + hg);
    for (int64_t o = j0; o < j1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m256 acc[MB][NA];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      const __m256i b0 = load8_u8(row + j), b1 = load8_u8(row + j + 8);
      const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));
      const __m256 h0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, high));
      const __m256 l1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
      const __m256 h1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, high));
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xa[m] + j), acc[m][0]);
        acc[m][1 % NA] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xb[m] + j), acc[m][1 % NA]);
        acc[m][2 % NA] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xa[m] + j + 8), acc[m][2 % NA]);
        acc[m][3 % NA] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xb[m] + j + 8), acc[m][3 % NA]);
      }
    }
    float tail[MB] = {};
    if (j < j1) {
      for (; j + 8 <= j1; j += 8) {
        const __m256i b = load8_u8(row + j);
        const __m256 l = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
        const __m256 h = _mm256_cvtepi32_ps(_mm256_and_si256(b, high));
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm256_fmadd_ps(l, _mm256_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      for (; j < j1; ++j)
        for (int m = 0; m < MB; ++m)
          tail[m] += static_cast<float>(row[j] & 0x0F) * xa[m][j] + static_cast<float>(row[j] & 0xF0) * xb[m][j];
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m256 vs = _mm256_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < NA; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      total[m] = _mm256_fmadd_ps(sum, vs, total[m]);
      extra[m] += s * tail[m] - zs * xs[m][g];
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += hsum256(total[m]) + extra[m];
}

template <int MB>
LOWBIT_AVX2 void int8_row_avx2(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  constexpr int NA = MB <= 2 ? 4 : 2;
  const uint8_t* row = p.codes + n * p.K;
  const float* xa[MB];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * p.K;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  __m256 total[MB];
  float extra[MB];
  for (int m = 0; m < MB; ++m) {
    total[m] = _mm256_setzero_ps();
    extra[m] = 0.f;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    for (int64_t o = k0; o < k1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m256 acc[MB][NA];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      __m256 w[4];
      for (int u = 0; u < 4; ++u) w[u] = _mm256_cvtepi32_ps(load8_u8(row + k + 8 * u));
      for (int m = 0; m < MB; ++m)
        for (int u = 0; u < 4; ++u)
          acc[m][u % NA] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(xa[m] + k + 8 * u), acc[m][u % NA]);
    }
    float tail[MB] = {};
    if (k < k1) {
      for (; k + 8 <= k1; k += 8) {
        const __m256 w = _mm256_cvtepi32_ps(load8_u8(row + k));
        for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xa[m] + k), acc[m][0]);
      }
      for (; k < k1; ++k)
        for (int m = 0; m < MB; ++m) tail[m] += static_cast<float>(row[k]) * xa[m][k];
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m256 vs = _mm256_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < NA; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      total[m] = _mm256_fmadd_ps(sum, vs, total[m]);
      extra[m] += s * tail[m] - zs * xs[m][g];
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += hsum256(total[m]) + extra[m];
}

// ------------------------------------------------------------------ AVX-512
// The same loops at 16 lanes: per 64 weights (32 bytes) two zero-extending loads
// to 16 x int32, four conversions, four FMAs per batch row; masked loads for a
// short tail.

LOWBIT_AVX512 inline __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int MB>
LOWBIT_AVX512 void int4_row_avx512(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t hk = p.K / 2, hg = p.group / 2;
  const uint8_t* row = p.codes + n * hk;
  const float* xa[MB];
  const float* xb[MB];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * hk;
    xb[m] = p.xb + (m0 + m) * hk;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  const __m512i low = _mm512_set1_epi32(0x0F), high = _mm512_set1_epi32(0xF0);
  __m512 total[MB];
  float extra[MB];
  for (int m = 0; m < MB; ++m) {
    total[m] = _mm512_setzero_ps();
    extra[m] = 0.f;
  }
  int64_t g = g0;
  if (hg <= 32 && hg % 16 == 0) {
    // small groups: the scale goes onto the converted codes (one multiply per vector)
    // instead of a reduction per group; the accumulators run across groups
    const int64_t gfull = std::min(g1, p.K / p.group);
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (; g < gfull; ++g) {
      const int64_t j0 = g * hg;
      if (j0 % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + j0), _MM_HINT_T0);
      const float sc = scale_f16c(p, n * p.G + g);
      const __m512 vs = _mm512_set1_ps(sc);
      for (int64_t j = j0; j < j0 + hg; j += 16) {
        const __m512i b = load16_u8(row + j);
        const __m512 l = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), vs);
        const __m512 h = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, high)), vs);
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm512_fmadd_ps(l, _mm512_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(h, _mm512_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      const float zs = sc * zero_of(p, n * p.G + g);
      for (int m = 0; m < MB; ++m) extra[m] -= zs * xs[m][g];
    }
    for (int m = 0; m < MB; ++m) total[m] = _mm512_add_ps(total[m], _mm512_add_ps(acc[m][0], acc[m][1]));
  }
  for (; g < g1; ++g) {
    const int64_t j0 = g * hg, j1 = std::min(hk, j0 + hg);
    for (int64_t o = j0; o < j1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
      const __m512i b0 = load16_u8(row + j), b1 = load16_u8(row + j + 16);
      const __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, low));
      const __m512 h0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, high));
      const __m512 l1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, low));
      const __m512 h1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, high));
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm512_fmadd_ps(l0, _mm512_loadu_ps(xa[m] + j), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(h0, _mm512_loadu_ps(xb[m] + j), acc[m][1]);
        acc[m][2] = _mm512_fmadd_ps(l1, _mm512_loadu_ps(xa[m] + j + 16), acc[m][2]);
        acc[m][3] = _mm512_fmadd_ps(h1, _mm512_loadu_ps(xb[m] + j + 16), acc[m][3]);
      }
    }
    for (; j < j1; j += 16) {  // 16 bytes or a masked remainder
      const int64_t left = std::min<int64_t>(16, j1 - j);
      const __mmask16 k = static_cast<__mmask16>((1u << left) - 1);
      const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, row + j));
      const __m512 l = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
      const __m512 h = _mm512_cvtepi32_ps(_mm512_and_si512(b, high));
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm512_fmadd_ps(l, _mm512_maskz_loadu_ps(k, xa[m] + j), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(h, _mm512_maskz_loadu_ps(k, xb[m] + j), acc[m][1]);
      }
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m512 vs = _mm512_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
      extra[m] -= zs * xs[m][g];
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(total[m]) + extra[m];
}

template <int MB>
LOWBIT_AVX512 void int8_row_avx512(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const uint8_t* row = p.codes + n * p.K;
  const float* xa[MB];
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * p.K;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  __m512 total[MB];
  float extra[MB];
  for (int m = 0; m < MB; ++m) {
    total[m] = _mm512_setzero_ps();
    extra[m] = 0.f;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    for (int64_t o = k0; o < k1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      __m512 w[4];
      for (int u = 0; u < 4; ++u) w[u] = _mm512_cvtepi32_ps(load16_u8(row + k + 16 * u));
      for (int m = 0; m < MB; ++m)
        for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(xa[m] + k + 16 * u), acc[m][u]);
    }
    for (; k < k1; k += 16) {
      const int64_t left = std::min<int64_t>(16, k1 - k);
      const __mmask16 mk = static_cast<__mmask16>((1u << left) - 1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, row + k)));
      for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, xa[m] + k), acc[m][0]);
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m512 vs = _mm512_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
      extra[m] -= zs * xs[m][g];
    }
  }
  for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(total[m]) + extra[m];
}
#endif  // LOWBIT_X86

// ------------------------------------------------------------------ dispatch

bool isa_available(int64_t isa) {
  if (isa == kPortable) return true;
#ifdef LOWBIT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

int64_t best_isa() {
  static const int64_t best = isa_available(kAvx512) ? kAvx512 : isa_available(kAvx2) ? kAvx2 : kPortable;
  return best;
}

using RowFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);

template <int MB>
RowFn row_fn(int64_t bits, int64_t isa) {
#ifdef LOWBIT_X86
  if (isa == kAvx512) return bits == 4 ? int4_row_avx512<MB> : int8_row_avx512<MB>;
  if (isa == kAvx2) return bits == 4 ? int4_row_avx2<MB> : int8_row_avx2<MB>;
#endif
  return bits == 4 ? int4_row_portable<MB> : int8_row_portable<MB>;
}

RowFn row_fn_for(int64_t rows, int64_t bits, int64_t isa) {
  switch (rows) {
    case 1: return row_fn<1>(bits, isa);
    case 2: return row_fn<2>(bits, isa);
    case 3: return row_fn<3>(bits, isa);
    default: return row_fn<4>(bits, isa);
  }
}

int64_t resolve_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= kAvx512, "unknown instruction set ", isa);
  TORCH_CHECK(isa_available(isa), "this CPU lacks the instructions of the requested kernel path (",
              isa == kAvx512 ? "avx512" : "avx2", ")");
  return isa;
}

void check_weights(const torch::Tensor& codes, const torch::Tensor& scales, const c10::optional<torch::Tensor>& zeros,
                   int64_t N, int64_t K, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "the weight-only kernel runs 4- and 8-bit codes, not ", bits);
  TORCH_CHECK(bits != 4 || K % 2 == 0, "4-bit rows must have an even length K (got ", K, ")");
  TORCH_CHECK(group > 0 && (bits != 4 || group % 2 == 0), "the group size must be positive (and even for 4-bit)");
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(codes.numel() == N * K * bits / 8, "codes hold ", codes.numel(), " bytes, ", N * K * bits / 8,
              " are needed for ", N, "x", K, " ", bits, "-bit codes");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf || scales.scalar_type() == torch::kFloat, "scales: fp16 or fp32");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * G, "scales must be contiguous [N, ceil(K / group)]");
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() && zeros->numel() == N * G,
                "zero points must be contiguous uint8 [N, ceil(K / group)]");
  }
}

Problem weights_problem(const torch::Tensor& codes, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& zeros, int64_t N, int64_t K, int64_t bits, int64_t group) {
  Problem p{};
  p.codes = codes.data_ptr<uint8_t>();
  if (scales.scalar_type() == torch::kHalf) p.half_scales = scales.data_ptr<at::Half>();
  else p.float_scales = scales.data_ptr<float>();
  p.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  p.default_zero = static_cast<float>(1 << (bits - 1));
  p.N = N;
  p.K = K;
  p.group = group;
  p.G = (K + group - 1) / group;
  return p;
}

// ------------------------------------------------------------------ dequantized tiles
// (q - z) * s, the same float operations as QuantizedWeight.dequantize, so the
// values are bit-identical to it, in the weight's own column order (the nibbles'
// even and odd columns interleaved in registers).

void dequant_rows_portable(const Problem& p, int64_t bits, int64_t n0, int64_t n1, float* out) {
  const int64_t hk = p.K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
      const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        for (int64_t j = k0 / 2; j < k1 / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        for (int64_t k = k0; k < k1; ++k) o[k] = (static_cast<float>(b[k]) - z) * s;
      }
    }
  }
}

#ifdef LOWBIT_X86
LOWBIT_AVX2 void dequant_rows_avx2(const Problem& p, int64_t bits, int64_t n0, int64_t n1, float* out) {
  const int64_t hk = p.K / 2;
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
      const float s = scale_f16c(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        int64_t j = k0 / 2;
        for (; j + 8 <= k1 / 2; j += 8) {
          const __m256i v = load8_u8(b + j);
          const __m256 l = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
          const __m256 h = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
          const __m256 wl = _mm256_mul_ps(_mm256_sub_ps(l, vz), vs), wh = _mm256_mul_ps(_mm256_sub_ps(h, vz), vs);
          const __m256 a = _mm256_unpacklo_ps(wl, wh), c = _mm256_unpackhi_ps(wl, wh);  // columns interleaved
          _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
          _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
        }
        for (; j < k1 / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8)
          _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(load8_u8(b + k)), vz), vs));
        for (; k < k1; ++k) o[k] = (static_cast<float>(b[k]) - z) * s;
      }
    }
  }
}

LOWBIT_AVX512 void dequant_rows_avx512(const Problem& p, int64_t bits, int64_t n0, int64_t n1, float* out) {
  const int64_t hk = p.K / 2;
  const __m512i low = _mm512_set1_epi32(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
      const float s = scale_f16c(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        int64_t j = k0 / 2;
        for (; j + 16 <= k1 / 2; j += 16) {
          const __m512i v = load16_u8(b + j);
          const __m512 wl = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), vz), vs);
          const __m512 wh = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vz), vs);
          _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(wl, lo_idx, wh));  // columns interleaved
          _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(wl, hi_idx, wh));
        }
        for (; j < k1 / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        for (int64_t k = k0; k < k1; k += 16) {
          const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, k1 - k)) - 1);
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, b + k)));
          _mm512_mask_storeu_ps(o + k, mk, _mm512_mul_ps(_mm512_sub_ps(w, vz), vs));
        }
      }
    }
  }
}
#endif

void dequant_rows(const Problem& p, int64_t bits, int64_t isa, int64_t n0, int64_t n1, float* out) {
#ifdef LOWBIT_X86
  if (isa == kAvx512) return dequant_rows_avx512(p, bits, n0, n1, out);
  if (isa == kAvx2) return dequant_rows_avx2(p, bits, n0, n1, out);
#endif
  dequant_rows_portable(p, bits, n0, n1, out);
}

// Rows [n0, n1) dequantized into out (contiguous [n1 - n0, K], written in place).
void dequant_into(const Problem& p, int64_t bits, int64_t isa, int64_t n0, int64_t n1, torch::Tensor& out) {
  float* o = out.data_ptr<float>();
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) { dequant_rows(p, bits, isa, a, b, o + (a - n0) * p.K); });
}

}  // namespace

// y = x @ W^T for x: fp32 [M, K] (any M; meant for a few rows, where the weight
// bytes dominate). isa: -1 for the best this CPU has, 0 portable, 1 AVX2, 2 AVX-512.
torch::Tensor wq_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                      c10::optional<torch::Tensor> bias, int64_t N, int64_t bits, int64_t group, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check_weights(codes, scales, zeros, N, K, bits, group);
  isa = resolve_isa(isa);
  x = x.contiguous();
  Problem p = weights_problem(codes, scales, zeros, N, K, bits, group);
  p.M = M;
  const int64_t G = p.G;
  // per-group sums of x, and for 4-bit the even columns and the odd columns / 16 (exact,
  // to meet the high nibble in place): plain loops into a scratch buffer kept per thread,
  // since a decode step calls this hundreds of times with one row
  thread_local std::vector<float> scratch;
  const int64_t half = bits == 4 ? M * (K / 2) : 0;
  scratch.resize(static_cast<size_t>(M * G + 2 * half));
  float* xsum = scratch.data();
  const float* px = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;  // the zero-point term's sum, kept accurate: it can cancel against the codes' sum
      for (int64_t k = g * group, k1 = std::min(K, (g + 1) * group); k < k1; ++k) acc += px[m * K + k];
      xsum[m * G + g] = static_cast<float>(acc);
    }
  if (bits == 4) {
    float* xe = xsum + M * G;
    float* xo = xe + half;
    for (int64_t i = 0; i < half; ++i) {
      xe[i] = px[2 * i];
      xo[i] = px[2 * i + 1] * 0.0625f;
    }
    p.xa = xe;
    p.xb = xo;
  } else {
    p.xa = px;
  }
  p.xsum = xsum;
  torch::Tensor y;
  if (bias.has_value()) {  // the kernel adds into y: starting from the bias fuses it
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N, "bias must be fp32 [N]");
    y = bias->reshape({1, N}).repeat({M, 1});  // a fresh tensor: never the bias itself
  } else {
    y = torch::zeros({M, N}, x.options());
  }
  p.y = y.data_ptr<float>();
  if (M == 0 || N == 0) return y;
  const RowFn full = row_fn_for(kChunk, bits, isa);
  const RowFn rest = row_fn_for(M % kChunk, bits, isa);
  // blocks of whole groups whose activations (all rows) stay in L1 while weight rows stream by
  const int64_t gblock = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * group * 4));
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t g0 = 0; g0 < G; g0 += gblock) {
      const int64_t g1 = std::min(G, g0 + gblock);
      for (int64_t n = n0; n < n1; ++n) {
        int64_t m = 0;
        for (; m + kChunk <= M; m += kChunk) full(p, n, m, g0, g1);
        if (m < M) rest(p, n, m, g0, g1);
      }
    }
  });
  return y;
}

// The dequantized weight rows [n0, n1): fp32 [n1 - n0, K], in the weight's own column order.
torch::Tensor wq_dequant(torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros, int64_t N,
                         int64_t K, int64_t bits, int64_t group, int64_t n0, int64_t n1, int64_t isa) {
  check_weights(codes, scales, zeros, N, K, bits, group);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "row range out of bounds");
  Problem p = weights_problem(codes, scales, zeros, N, K, bits, group);
  auto out = torch::empty({n1 - n0, K}, torch::dtype(torch::kFloat));
  dequant_into(p, bits, resolve_isa(isa), n0, n1, out);
  return out;
}

// y = x @ W^T for larger batches: tiles of `tile` weight rows are dequantized
// (in cache) and multiplied by the BLAS GEMM, so the fp32 weight never exists whole.
torch::Tensor wq_gemm_tiled(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                            c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> bias, int64_t N,
                            int64_t bits, int64_t group, int64_t tile, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  TORCH_CHECK(tile > 0, "tile must be positive");
  const int64_t M = x.size(0), K = x.size(1);
  check_weights(codes, scales, zeros, N, K, bits, group);
  isa = resolve_isa(isa);
  Problem p = weights_problem(codes, scales, zeros, N, K, bits, group);
  x = x.contiguous();
  // one tile buffer per thread, kept between calls: a fresh one would cost page faults every call
  thread_local torch::Tensor buffer;
  const int64_t rows = std::min(N, tile);
  if (!buffer.defined() || buffer.numel() < rows * K) buffer = torch::empty({rows * K}, torch::dtype(torch::kFloat));
  if (N <= tile) {
    auto w = buffer.narrow(0, 0, N * K).view({N, K});
    dequant_into(p, bits, isa, 0, N, w);
    return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  }
  auto y = torch::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    auto w = buffer.narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
    dequant_into(p, bits, isa, n0, n1, w);
    auto out = y.narrow(1, n0, n1 - n0);
    if (bias.has_value()) at::addmm_out(out, bias->narrow(0, n0, n1 - n0), x, w.t());
    else at::mm_out(out, x, w.t());
  }
  return y;
}

// RMSNorm of the rows of x [M, K] as transformers' Llama computes it in fp32:
// x * rsqrt(mean(x^2) + eps) * weight, the mean accumulated in double. One pass per row: a
// decode step normalizes two rows per layer, where the eight-operation tensor expression costs
// more than its arithmetic.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "rms_norm: fp32 tensors");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.numel() == K, "rms_norm: weight has ", weight.numel(), " entries, rows have ", K);
  auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t M = K ? xc.numel() / K : 0;
  const float* px = xc.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  float* py = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = px + m * K;
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(r[k]) * r[k];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(K) + eps));
    for (int64_t k = 0; k < K; ++k) py[m * K + k] = pw[k] * (r[k] * inv);
  }
  return y;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"portable"};
  if (isa_available(kAvx2)) out.push_back("avx2");
  if (isa_available(kAvx512)) out.push_back("avx512");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_gemv", &wq_gemv, "weight-only 4/8-bit matmul for small batches (fp32 activations)");
  m.def("wq_dequant", &wq_dequant, "dequantize rows of a 4/8-bit weight to fp32");
  m.def("wq_gemm_tiled", &wq_gemm_tiled, "weight-only matmul for large batches: dequantized tiles + BLAS GEMM");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows (a decode step's norms)");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs the kernels with");
}
