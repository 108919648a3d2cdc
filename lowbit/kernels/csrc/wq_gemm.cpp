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
// On the x86 SIMD paths, 4-bit weights whose group is a multiple of 32 take an integer
// path instead (up to gemv_rows rows): each block of 128 activations is rounded to
// 23-bit integers against its largest magnitude (x ~ 2^e * v, |v| <= 2^22, the same
// relative precision as fp32 for the block's largest entries) and v is written as
// three signed byte digits, so the codes meet the activations in exact integer dot
// products (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw) and floats enter once per block:
// s * 2^e * ((D2 * 256 + D1) * 256 + D0). The zero-point term uses the sums of the
// same rounded activations, so the result is dequantize(W) @ x~ to fp32 rounding,
// x~ within 2^-23 of each block's largest |x|. Activations with a NaN or an Inf, or a
// block below 2^-100, take the float path. A single activation row (decode) runs four
// weight rows at once, so their dependency chains overlap and the digits load once.
//
// The instruction set is chosen at run time (AVX-512, AVX2 + FMA, NEON on AArch64, or
// portable C++ that compiles anywhere) and can be forced, so that tests check every path on
// one machine; LOWBIT_NO_TORCH builds the kernels without PyTorch for the standalone check
// (tests/native/wq_check.cpp), which runs the NEON path under qemu-aarch64. Larger batches dequantize tiles of rows with
// the same code and hand them to the BLAS GEMM (wq_dequant below).

#ifndef LOWBIT_NO_TORCH
#include <torch/extension.h>
#include <ATen/Parallel.h>
#else
// Built without PyTorch (LOWBIT_NO_TORCH: tests/native/wq_check.cpp includes this file to check
// the kernels on their own, e.g. the NEON path under qemu-aarch64): the few pieces of ATen the
// kernels use, minimal and serial.
#include <cstdint>
#include <cstring>
#include <stdexcept>
namespace at {
struct Half {  // IEEE binary16 bits
  uint16_t x;
  operator float() const {
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000) << 16;
    const int exp = (x >> 10) & 0x1F;
    uint32_t man = x & 0x3FF, bits;
    if (exp == 0x1F) {
      bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
      bits = sign | (static_cast<uint32_t>(exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = 113;
      while (!(man & 0x400)) {
        man <<= 1;
        --e;
      }
      bits = sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t, const F& f) {
  if (begin < end) f(begin, end);
}
}  // namespace at
#define TORCH_CHECK(cond, ...) \
  do {                         \
    if (!(cond)) throw std::runtime_error("lowbit kernel check failed: " #cond); \
  } while (0)
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Loops over small register arrays (accumulators, a tile's rows) unrolled early, so that the
// arrays stay in registers: GCC otherwise keeps such an array in memory and stores every
// element back on every step (measured: the AVX2 tile kernel spent as many stores as FMAs).
#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define LOWBIT_X86 1
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define LOWBIT_NEON 1  // Advanced SIMD: part of every AArch64 CPU
#endif

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };
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
  // the integer-digit path (4-bit, group a multiple of 32): activations as digits, see below
  const int8_t* digits;          // [M, 3, 2, hp]: digit, even / odd columns, byte column j = k / 2
  const float* block_scale;      // [M, NB]: 2^e of each block of 128 columns
  int64_t NB, hp;                // blocks per row; bytes per digit plane (64 * NB, plus a line of padding)
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
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const float* e = p.xa + (m0 + m) * hk + j;
        const float* o = p.xb + (m0 + m) * hk + j;
        for (int u = 0; u < 8; ++u)
          part[m][u] += static_cast<float>(row[j + u] & 0x0F) * e[u] + static_cast<float>(row[j + u] & 0xF0) * o[u];
      }
    for (; j < j1; ++j)
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        part[m][0] += static_cast<float>(row[j] & 0x0F) * p.xa[(m0 + m) * hk + j] +
                      static_cast<float>(row[j] & 0xF0) * p.xb[(m0 + m) * hk + j];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      float dot = 0.f;
      for (int u = 0; u < 8; ++u) dot += part[m][u];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
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
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const float* x = p.xa + (m0 + m) * p.K + k;
        for (int u = 0; u < 8; ++u) part[m][u] += static_cast<float>(row[k + u]) * x[u];
      }
    for (; k < k1; ++k)
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) part[m][0] += static_cast<float>(row[k]) * p.xa[(m0 + m) * p.K + k];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      float dot = 0.f;
      for (int u = 0; u < 8; ++u) dot += part[m][u];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
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
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * hk;
    xb[m] = p.xb + (m0 + m) * hk;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  const __m256i low = _mm256_set1_epi32(0x0F), high = _mm256_set1_epi32(0xF0);
  __m256 total[MB];
  float extra[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    total[m] = _mm256_setzero_ps();
    extra[m] = 0.f;
  }
  int64_t g = g0;
  if (hg <= 32 && hg % 8 == 0) {
    // small groups: the scale goes onto the converted codes (one multiply per vector)
    // instead of a reduction per group; the accumulators run across groups
    const int64_t gfull = std::min(g1, p.K / p.group);
    __m256 acc[MB][2];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (; g < gfull; ++g) {
      const int64_t j0 = g * hg;
      if (j0 % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + j0), _MM_HINT_T0);
      const float sc = scale_f16c(p, n * p.G + g);
      const __m256 vs = _mm256_set1_ps(sc);
      for (int64_t j = j0; j < j0 + hg; j += 8) {
        const __m256i b = load8_u8(row + j);
        const __m256 l = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low)), vs);
        const __m256 h = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, high)), vs);
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm256_fmadd_ps(l, _mm256_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      const float zs = sc * zero_of(p, n * p.G + g);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) extra[m] -= zs * xs[m][g];
    }
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[m] = _mm256_add_ps(total[m], _mm256_add_ps(acc[m][0], acc[m][1]));
  }
  for (; g < g1; ++g) {
    const int64_t j0 = g * hg, j1 = std::min(hk, j0 + hg);
    for (int64_t o = j0; o < j1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m256 acc[MB][NA];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      const __m256i b0 = load8_u8(row + j), b1 = load8_u8(row + j + 8);
      const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));
      const __m256 h0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, high));
      const __m256 l1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
      const __m256 h1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, high));
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
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
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm256_fmadd_ps(l, _mm256_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      for (; j < j1; ++j)
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
          tail[m] += static_cast<float>(row[j] & 0x0F) * xa[m][j] + static_cast<float>(row[j] & 0xF0) * xb[m][j];
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m256 vs = _mm256_set1_ps(s);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < NA; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      total[m] = _mm256_fmadd_ps(sum, vs, total[m]);
      extra[m] += s * tail[m] - zs * xs[m][g];
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += hsum256(total[m]) + extra[m];
}

template <int MB>
LOWBIT_AVX2 void int8_row_avx2(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  constexpr int NA = MB <= 2 ? 4 : 2;
  const uint8_t* row = p.codes + n * p.K;
  const float* xa[MB];
  const float* xs[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * p.K;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  __m256 total[MB];
  float extra[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    total[m] = _mm256_setzero_ps();
    extra[m] = 0.f;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    for (int64_t o = k0; o < k1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m256 acc[MB][NA];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      __m256 w[4];
      LOWBIT_UNROLL for (int u = 0; u < 4; ++u) w[u] = _mm256_cvtepi32_ps(load8_u8(row + k + 8 * u));
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        LOWBIT_UNROLL for (int u = 0; u < 4; ++u)
          acc[m][u % NA] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(xa[m] + k + 8 * u), acc[m][u % NA]);
    }
    float tail[MB] = {};
    if (k < k1) {
      for (; k + 8 <= k1; k += 8) {
        const __m256 w = _mm256_cvtepi32_ps(load8_u8(row + k));
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xa[m] + k), acc[m][0]);
      }
      for (; k < k1; ++k)
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) tail[m] += static_cast<float>(row[k]) * xa[m][k];
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m256 vs = _mm256_set1_ps(s);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < NA; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      total[m] = _mm256_fmadd_ps(sum, vs, total[m]);
      extra[m] += s * tail[m] - zs * xs[m][g];
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += hsum256(total[m]) + extra[m];
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
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * hk;
    xb[m] = p.xb + (m0 + m) * hk;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  const __m512i low = _mm512_set1_epi32(0x0F), high = _mm512_set1_epi32(0xF0);
  __m512 total[MB];
  float extra[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    total[m] = _mm512_setzero_ps();
    extra[m] = 0.f;
  }
  int64_t g = g0;
  if (hg <= 32 && hg % 16 == 0) {
    // small groups: the scale goes onto the converted codes (one multiply per vector)
    // instead of a reduction per group; the accumulators run across groups
    const int64_t gfull = std::min(g1, p.K / p.group);
    __m512 acc[MB][2];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (; g < gfull; ++g) {
      const int64_t j0 = g * hg;
      if (j0 % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + j0), _MM_HINT_T0);
      const float sc = scale_f16c(p, n * p.G + g);
      const __m512 vs = _mm512_set1_ps(sc);
      for (int64_t j = j0; j < j0 + hg; j += 16) {
        const __m512i b = load16_u8(row + j);
        const __m512 l = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), vs);
        const __m512 h = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, high)), vs);
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm512_fmadd_ps(l, _mm512_loadu_ps(xa[m] + j), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(h, _mm512_loadu_ps(xb[m] + j), acc[m][1]);
        }
      }
      const float zs = sc * zero_of(p, n * p.G + g);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) extra[m] -= zs * xs[m][g];
    }
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[m] = _mm512_add_ps(total[m], _mm512_add_ps(acc[m][0], acc[m][1]));
  }
  for (; g < g1; ++g) {
    const int64_t j0 = g * hg, j1 = std::min(hk, j0 + hg);
    for (int64_t o = j0; o < j1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m512 acc[MB][4];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      LOWBIT_UNROLL for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
      const __m512i b0 = load16_u8(row + j), b1 = load16_u8(row + j + 16);
      const __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, low));
      const __m512 h0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, high));
      const __m512 l1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, low));
      const __m512 h1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, high));
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
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
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm512_fmadd_ps(l, _mm512_maskz_loadu_ps(k, xa[m] + j), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(h, _mm512_maskz_loadu_ps(k, xb[m] + j), acc[m][1]);
      }
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m512 vs = _mm512_set1_ps(s);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
      extra[m] -= zs * xs[m][g];
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(total[m]) + extra[m];
}

template <int MB>
LOWBIT_AVX512 void int8_row_avx512(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const uint8_t* row = p.codes + n * p.K;
  const float* xa[MB];
  const float* xs[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    xa[m] = p.xa + (m0 + m) * p.K;
    xs[m] = p.xsum + (m0 + m) * p.G;
  }
  __m512 total[MB];
  float extra[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    total[m] = _mm512_setzero_ps();
    extra[m] = 0.f;
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    for (int64_t o = k0; o < k1; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead + o), _MM_HINT_T0);
    __m512 acc[MB][4];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      LOWBIT_UNROLL for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      __m512 w[4];
      LOWBIT_UNROLL for (int u = 0; u < 4; ++u) w[u] = _mm512_cvtepi32_ps(load16_u8(row + k + 16 * u));
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        LOWBIT_UNROLL for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(xa[m] + k + 16 * u), acc[m][u]);
    }
    for (; k < k1; k += 16) {
      const int64_t left = std::min<int64_t>(16, k1 - k);
      const __mmask16 mk = static_cast<__mmask16>((1u << left) - 1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, row + k)));
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, xa[m] + k), acc[m][0]);
    }
    const float s = scale_f16c(p, n * p.G + g), zs = s * zero_of(p, n * p.G + g);
    const __m512 vs = _mm512_set1_ps(s);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
      extra[m] -= zs * xs[m][g];
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(total[m]) + extra[m];
}
#endif  // LOWBIT_X86

#ifdef LOWBIT_NEON
// ------------------------------------------------------------------ NEON (AArch64)
// The same loops at four lanes: per 32 weights (16 bytes) the low nibbles and the high
// nibbles in place (16 q, against x / 16), each widened to four float32x4, and eight FMAs per
// batch row into two accumulators.

inline void widen_u8(uint8x16_t b, float32x4_t* f) {
  const uint16x8_t a = vmovl_u8(vget_low_u8(b)), c = vmovl_high_u8(b);
  f[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(a)));
  f[1] = vcvtq_f32_u32(vmovl_high_u16(a));
  f[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(c)));
  f[3] = vcvtq_f32_u32(vmovl_high_u16(c));
}

template <int MB>
void int4_row_neon(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t hk = p.K / 2;
  const uint8_t* row = p.codes + n * hk;
  const uint8x16_t low = vdupq_n_u8(0x0F), high = vdupq_n_u8(0xF0);
  float total[MB] = {};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t j0 = g * (p.group / 2), j1 = std::min(hk, j0 + p.group / 2);
    float32x4_t acc[MB][2];
    float tail[MB] = {};
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      const uint8x16_t b = vld1q_u8(row + j);
      float32x4_t l[4], h[4];
      widen_u8(vandq_u8(b, low), l);
      widen_u8(vandq_u8(b, high), h);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const float* e = p.xa + (m0 + m) * hk + j;
        const float* o = p.xb + (m0 + m) * hk + j;
        LOWBIT_UNROLL for (int u = 0; u < 4; ++u) {
          acc[m][0] = vfmaq_f32(acc[m][0], l[u], vld1q_f32(e + 4 * u));
          acc[m][1] = vfmaq_f32(acc[m][1], h[u], vld1q_f32(o + 4 * u));
        }
      }
    }
    for (; j < j1; ++j)
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        tail[m] += static_cast<float>(row[j] & 0x0F) * p.xa[(m0 + m) * hk + j] +
                   static_cast<float>(row[j] & 0xF0) * p.xb[(m0 + m) * hk + j];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const float dot = vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1])) + tail[m];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
}

template <int MB>
void int8_row_neon(const Problem& p, int64_t n, int64_t m0, int64_t g0, int64_t g1) {
  const uint8_t* row = p.codes + n * p.K;
  float total[MB] = {};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    float32x4_t acc[MB][2];
    float tail[MB] = {};
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      float32x4_t w[4];
      widen_u8(vld1q_u8(row + k), w);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const float* x = p.xa + (m0 + m) * p.K + k;
        LOWBIT_UNROLL for (int u = 0; u < 4; ++u) acc[m][u & 1] = vfmaq_f32(acc[m][u & 1], w[u], vld1q_f32(x + 4 * u));
      }
    }
    for (; k < k1; ++k)
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) tail[m] += static_cast<float>(row[k]) * p.xa[(m0 + m) * p.K + k];
    const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const float dot = vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1])) + tail[m];
      total[m] += s * (dot - z * p.xsum[(m0 + m) * p.G + g]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += total[m];
}
#endif  // LOWBIT_NEON

// ------------------------------------------------------------------ integer-digit path
// 4-bit codes, groups a multiple of 32: per block of 128 columns (64 code bytes) the
// integer dot products of the codes with each of the three activation digits, then
// one float stage per block. A block holds one group, or two when the group is 64
// ("split": columns 0-63 and 64-127 take their own scale), or four when it is 32 (each
// quarter's scale a vector over the int32 lanes of its 32 columns).

// How a block's scales vary (the rows kernels' MODE): kOneScale (a group per block or more), kHalves (groups of
// an odd multiple of 64 columns: the block's halves), kQuarters (an odd multiple of 32: its quarters).
enum ScaleMode : int { kOneScale = 0, kHalves = 1, kQuarters = 2 };

constexpr int64_t kFar = 32768;  // bytes of codes prefetched into L2 ahead of the row being read

// The groups of a row's blocks without a division per block: each block is `parts` parts of
// 128 / parts columns (halves of 64 by default, quarters of 32 for groups of an odd multiple
// of 32), and a group spans `per` parts (a group of 64 or 192 columns starts inside a block:
// "split", the halves take their own scales). `start` says that a group begins at the part
// (its zero-point term is added there, once).
struct GroupWalk {
  int64_t g, r, per, G;
  GroupWalk(const Problem& p, int64_t b0, int64_t parts = 2)
      : per(std::max<int64_t>(1, p.group / (128 / parts))), G(p.G) {
    g = parts * b0 / per;
    r = parts * b0 % per;
  }
  // the group of the next part, and whether it starts there
  inline int64_t next(bool& start) {
    const int64_t cur = std::min(g, G - 1);
    start = r == 0 && g < G;
    if (++r == per) {
      r = 0;
      ++g;
    }
    return cur;
  }
};

template <int MB>
inline void add_zero_term(const Problem& p, int64_t n, int64_t m0, int64_t g, float s, float* extra) {
  const float sz = s * zero_of(p, n * p.G + g);
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) extra[m] -= sz * p.xsum[(m0 + m) * p.G + g];
}

#ifdef LOWBIT_X86
// The float side of up to 16 blocks, ahead of their integer work: per batch row the
// products scale * 2^e of each block's two halves (equal unless split), and the
// zero-point terms of the groups that start there. Scalar, any group layout.
constexpr int kChunkBlocks = 16;

template <int MB>
LOWBIT_AVX2 void chunk_scales(const Problem& p, int64_t n, int64_t m0, GroupWalk& walk, int64_t c0, int64_t cn,
                              float (*sa)[kChunkBlocks], float (*sb)[kChunkBlocks], float* extra) {
  for (int64_t i = 0; i < cn; ++i) {
    bool start_a, start_b;
    const int64_t ga = walk.next(start_a), gb = walk.next(start_b);
    const float a = scale_f16c(p, n * p.G + ga), b = scale_f16c(p, n * p.G + gb);
    if (start_a) add_zero_term<MB>(p, n, m0, ga, a, extra);
    if (start_b && gb != ga) add_zero_term<MB>(p, n, m0, gb, b, extra);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const float bs = p.block_scale[(m0 + m) * p.NB + c0 + i];
      sa[m][i] = a * bs;
      sb[m][i] = b * bs;
    }
  }
}

// Groups of 128 (one per block): eight blocks' scales and zero-point terms per vector
// operation; the zero-point terms gather in ex and are subtracted once per row.
template <int MB>
LOWBIT_AVX2 void chunk_scales_g128_avx2(const Problem& p, int64_t n, int64_t m0, int64_t c0, int64_t cn,
                                        float (*sa)[kChunkBlocks], __m256* ex, float* extra) {
  const int64_t at = n * p.G + c0;
  int64_t i = 0;
  for (; i + 8 <= cn; i += 8) {
    const __m256 s = p.half_scales
                         ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.half_scales + at + i)))
                         : _mm256_loadu_ps(p.float_scales + at + i);
    const __m256 z = p.zeros ? _mm256_cvtepi32_ps(load8_u8(p.zeros + at + i)) : _mm256_set1_ps(p.default_zero);
    const __m256 sz = _mm256_mul_ps(s, z);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      ex[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(p.xsum + (m0 + m) * p.G + c0 + i), ex[m]);
      _mm256_storeu_ps(sa[m] + i, _mm256_mul_ps(s, _mm256_loadu_ps(p.block_scale + (m0 + m) * p.NB + c0 + i)));
    }
  }
  for (; i < cn; ++i) {
    const float s = scale_f16c(p, at + i);
    add_zero_term<MB>(p, n, m0, c0 + i, s, extra);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) sa[m][i] = s * p.block_scale[(m0 + m) * p.NB + c0 + i];
  }
}

// Groups of an odd multiple of 32 columns (32, 96, 160, ...): a block's four quarters of 32 columns take their
// own scales. In the integer sums an int32 lane holds 8 columns (8i .. 8i + 7 of a 128-column block on AVX-512,
// of a 64-column half on AVX2), so a quarter is 4 lanes and its scale is a lane vector. sq[m][i][q]: scale * 2^e
// of quarter q of block c0 + i for batch row m; the zero-point terms of the groups that start there go to extra.
// `walk` steps over quarters (GroupWalk with four parts a block).
template <int MB>
LOWBIT_AVX2 void chunk_scales_quarters(const Problem& p, int64_t n, int64_t m0, GroupWalk& walk, int64_t c0,
                                       int64_t cn, float (*sq)[kChunkBlocks][4], float* extra) {
  for (int64_t i = 0; i < cn; ++i) {
    float s[4];
    for (int q = 0; q < 4; ++q) {
      bool start;
      const int64_t g = walk.next(start);
      s[q] = scale_f16c(p, n * p.G + g);
      if (start) add_zero_term<MB>(p, n, m0, g, s[q], extra);
    }
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      const float bs = p.block_scale[(m0 + m) * p.NB + c0 + i];
      for (int q = 0; q < 4; ++q) sq[m][i][q] = s[q] * bs;
    }
  }
}

// Groups of 32 (four per block): chunk_scales_quarters eight groups per vector operation, the zero-point terms
// gathered in ex and subtracted once per row (as chunk_scales_g128_avx2 does for groups of 128).
template <int MB>
LOWBIT_AVX2 void chunk_scales_g32_avx2(const Problem& p, int64_t n, int64_t m0, int64_t c0, int64_t cn,
                                       float (*sq)[kChunkBlocks][4], __m256* ex, float* extra) {
  const int64_t at = n * p.G + 4 * c0, ng = std::min<int64_t>(4 * cn, p.G - 4 * c0);  // the chunk's groups
  int64_t j = 0;
  for (; j + 8 <= ng; j += 8) {  // blocks i = j / 4 and i + 1
    const __m256 s = p.half_scales
                         ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.half_scales + at + j)))
                         : _mm256_loadu_ps(p.float_scales + at + j);
    const __m256 z = p.zeros ? _mm256_cvtepi32_ps(load8_u8(p.zeros + at + j)) : _mm256_set1_ps(p.default_zero);
    const __m256 sz = _mm256_mul_ps(s, z);
    const int64_t i = j / 4;
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
      ex[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(p.xsum + (m0 + m) * p.G + 4 * c0 + j), ex[m]);
      const float* bs = p.block_scale + (m0 + m) * p.NB + c0 + i;
      _mm256_storeu_ps(sq[m][i], _mm256_mul_ps(s, _mm256_set_m128(_mm_set1_ps(bs[1]), _mm_set1_ps(bs[0]))));
    }
  }
  for (; j < 4 * cn; ++j) {  // the rest, and quarters past the last group (the row's short last block)
    const int64_t g = std::min<int64_t>(4 * c0 + j, p.G - 1);
    const float sc = scale_f16c(p, n * p.G + g);
    if (j < ng) add_zero_term<MB>(p, n, m0, g, sc, extra);
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) sq[m][j / 4][j % 4] = sc * p.block_scale[(m0 + m) * p.NB + c0 + j / 4];
  }
}

// Quarters 2h and 2h + 1 of a block as the lanes of an AVX2 half (lanes 0-3, 4-7).
LOWBIT_AVX2 inline __m256 quarter_lanes_avx2(const float* q4, int h) {
  return _mm256_set_m128(_mm_set1_ps(q4[2 * h + 1]), _mm_set1_ps(q4[2 * h]));
}

// Three digits' int16 pair sums into one float lane each: (D2 * 256 + D1) * 256 + D0 in int32.
LOWBIT_AVX2 inline __m256 combine_avx2(const __m256i* t, __m256i ones, __m256i c256) {
  const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(t[2], c256), _mm256_madd_epi16(t[1], ones));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(hi, 8), _mm256_madd_epi16(t[0], ones)));
}

// AVX2: vpmaddubsw multiplies code bytes (unsigned) by digit bytes (signed) and adds
// pairs into int16 (at most 2 * 15 * 128, four such sums stay below 2^15), vpmaddwd
// widens to int32.
template <int MB>
LOWBIT_AVX2 void int4_digits_avx2(const Problem& p, int64_t n, int64_t m0, int64_t b0, int64_t b1) {
  const int64_t hk = p.K / 2, hp = p.hp;
  const uint8_t* row = p.codes + n * hk;
  const bool quarters = p.group % 64 != 0;  // an odd number of quarters per group
  const bool split = !quarters && p.group % 128 != 0;  // an odd number of halves per group
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256i = _mm256_set1_epi16(256);
  const bool g128 = p.group == 128;
  float extra[MB] = {};
  alignas(32) float sa[MB][kChunkBlocks];
  alignas(32) float sb[MB][kChunkBlocks];
  alignas(32) float sq[MB][kChunkBlocks][4];
  GroupWalk walk(p, b0);
  GroupWalk qwalk(p, b0, 4);
  __m256 total[MB], ex[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[m] = ex[m] = _mm256_setzero_ps();
  for (int64_t c0 = b0; c0 < b1; c0 += kChunkBlocks) {
    const int64_t cn = std::min<int64_t>(kChunkBlocks, b1 - c0);
    if (g128) chunk_scales_g128_avx2<MB>(p, n, m0, c0, cn, sa, ex, extra);
    else if (p.group == 32) chunk_scales_g32_avx2<MB>(p, n, m0, c0, cn, sq, ex, extra);
    else if (quarters) chunk_scales_quarters<MB>(p, n, m0, qwalk, c0, cn, sq, extra);
    else chunk_scales<MB>(p, n, m0, walk, c0, cn, sa, sb, extra);
    for (int64_t i = 0; i < cn; ++i) {
      const int64_t j0 = 64 * (c0 + i);
      _mm_prefetch(reinterpret_cast<const char*>(row + j0 + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + j0 + kFar), _MM_HINT_T1);
      __m256i v0, v1;
      if (j0 + 64 <= hk) {
        v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j0));
        v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j0 + 32));
      } else {  // the row's last, short block: its digits beyond K are zero
        alignas(32) uint8_t tail[64] = {};
        std::memcpy(tail, row + j0, static_cast<size_t>(hk - j0));
        v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail + 32));
      }
      const __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
      const __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const int8_t* d = p.digits + (m0 + m) * 6 * hp + j0;
        __m256i t0[3], t1[3];
        LOWBIT_UNROLL for (int e = 0; e < 3; ++e) {
          const int8_t* de = d + 2 * e * hp;
          const int8_t* dodd = de + hp;
          t0[e] = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(de))),
              _mm256_maddubs_epi16(hi0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dodd))));
          t1[e] = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(de + 32))),
              _mm256_maddubs_epi16(hi1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dodd + 32))));
        }
        // int32 lanes ((D2 * 256 + D1) * 256 + D0): vpmaddwd by 256 scales D2 on the way, and
        // |lane| < 4 * 15 * (64 * 2^16 + 128 * 2^8 + 128) < 2^29
        if (quarters) {
          total[m] = _mm256_fmadd_ps(combine_avx2(t0, ones, c256i), quarter_lanes_avx2(sq[m][i], 0), total[m]);
          total[m] = _mm256_fmadd_ps(combine_avx2(t1, ones, c256i), quarter_lanes_avx2(sq[m][i], 1), total[m]);
        } else if (split) {
          const __m256 fa = combine_avx2(t0, ones, c256i), fb = combine_avx2(t1, ones, c256i);
          total[m] = _mm256_fmadd_ps(fa, _mm256_broadcast_ss(&sa[m][i]), total[m]);
          total[m] = _mm256_fmadd_ps(fb, _mm256_broadcast_ss(&sb[m][i]), total[m]);
        } else {
          __m256i t[3];
          LOWBIT_UNROLL for (int e = 0; e < 3; ++e) t[e] = _mm256_add_epi16(t0[e], t1[e]);
          total[m] = _mm256_fmadd_ps(combine_avx2(t, ones, c256i), _mm256_broadcast_ss(&sa[m][i]), total[m]);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n] += hsum256(total[m]) + (extra[m] - hsum256(ex[m]));
}

// One activation row against NR weight rows at once (as int4_digits_avx512_rows below).
template <int NR, int MODE>
LOWBIT_AVX2 inline void digits_block_avx2(const uint8_t* row, int64_t hk, int64_t j0, const int8_t* d, int64_t hp,
                                          const float (*sa)[kChunkBlocks], const float (*sb)[kChunkBlocks],
                                          const float (*sq)[kChunkBlocks][4], int64_t i, int64_t near, int64_t far,
                                          __m256* total) {
  // per 64-column half: its six digit vectors load once for the NR rows (in registers: 16 ymm hold them, a
  // row's codes and its three sums), and each row's sums are combined and scaled per half. Measured on Zen 4
  // against loading all twelve per row and combining once per block: 18.6-18.8 -> 17.2-17.4 cycles per 128
  // weights per row (4096 x 4096, a standalone loop over the kernel).
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
  const int64_t step = hp / 32;  // one digit plane, in vectors
  for (int h = 0; h < 2; ++h) {
    const __m256i* dh = reinterpret_cast<const __m256i*>(d + 32 * h);
    const __m256i d0e = _mm256_loadu_si256(dh), d0o = _mm256_loadu_si256(dh + step);
    const __m256i d1e = _mm256_loadu_si256(dh + 2 * step), d1o = _mm256_loadu_si256(dh + 3 * step);
    const __m256i d2e = _mm256_loadu_si256(dh + 4 * step), d2o = _mm256_loadu_si256(dh + 5 * step);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const uint8_t* src = row + r * hk + j0;
      if (h == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(src + near), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(src + far), _MM_HINT_T1);
      }
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      __m256i t[3];
      t[0] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, d0e), _mm256_maddubs_epi16(hi, d0o));
      t[1] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, d1e), _mm256_maddubs_epi16(hi, d1o));
      t[2] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, d2e), _mm256_maddubs_epi16(hi, d2o));
      const __m256 vs = MODE == kQuarters ? quarter_lanes_avx2(sq[r][i], h)
                                          : _mm256_broadcast_ss(MODE == kHalves && h == 1 ? &sb[r][i] : &sa[r][i]);
      total[r] = _mm256_fmadd_ps(combine_avx2(t, ones, c256), vs, total[r]);
    }
  }
}

// AVX-VNNI (the VEX vpdpbusd of AVX2-only Intel cores since Alder Lake): the AVX-512 rows
// kernel's Horner chain on each 32-byte half of a block, one instruction per 32 byte products
// where vpmaddubsw needs an add and a widening.
#define LOWBIT_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))

template <int NR, int MODE>
LOWBIT_AVXVNNI inline void digits_block_avxvnni(const uint8_t* row, int64_t hk, int64_t j0, const int8_t* d,
                                                int64_t hp, const float (*sa)[kChunkBlocks],
                                                const float (*sb)[kChunkBlocks], const float (*sq)[kChunkBlocks][4],
                                                int64_t i, int64_t near, int64_t far, __m256* total) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t step = hp / 32;  // one digit plane, in vectors
  LOWBIT_UNROLL for (int h = 0; h < 2; ++h) {  // each half's six digit vectors load once for the NR rows
    const __m256i* dh = reinterpret_cast<const __m256i*>(d + 32 * h);
    const __m256i d0e = _mm256_loadu_si256(dh), d0o = _mm256_loadu_si256(dh + step);
    const __m256i d1e = _mm256_loadu_si256(dh + 2 * step), d1o = _mm256_loadu_si256(dh + 3 * step);
    const __m256i d2e = _mm256_loadu_si256(dh + 4 * step), d2o = _mm256_loadu_si256(dh + 5 * step);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const uint8_t* src = row + r * hk + j0;
      if (h == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(src + near), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(src + far), _MM_HINT_T1);
      }
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      // (D2 * 256 + D1) * 256 + D0 per int32 lane of 8 columns: below 2^29
      __m256i t = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, d2e), hi, d2o);
      t = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_slli_epi32(t, 8), lo, d1e), hi, d1o);
      t = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_slli_epi32(t, 8), lo, d0e), hi, d0o);
      const __m256 vs = MODE == kQuarters ? quarter_lanes_avx2(sq[r][i], h)
                                          : _mm256_broadcast_ss(MODE == kHalves && h == 1 ? &sb[r][i] : &sa[r][i]);
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), vs, total[r]);
    }
  }
}

template <int NR, int MODE, bool VNNI = false>
LOWBIT_AVX2 void int4_digits_avx2_rows(const Problem& p, int64_t n, int64_t b0, int64_t b1) {
  const int64_t hk = p.K / 2, hp = p.hp;
  const bool g128 = p.group == 128;
  const int64_t span = NR * hk;
  const int64_t near = span * std::max<int64_t>(1, (kAhead + span - 1) / span);
  const int64_t far = span * std::max<int64_t>(1, (kFar + span - 1) / span);
  const int64_t whole = std::min(b1, hk / 64);  // blocks before the row's short last one
  float extra[NR] = {};
  alignas(32) float sa[NR][kChunkBlocks];
  alignas(32) float sb[NR][kChunkBlocks];
  alignas(32) float sq[NR][kChunkBlocks][4];
  GroupWalk walk(p, b0);
  GroupWalk qwalk(p, b0, 4);
  __m256 total[NR], ex[NR];
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r) total[r] = ex[r] = _mm256_setzero_ps();
  const uint8_t* row = p.codes + n * hk;
  alignas(32) uint8_t tails[NR * 64];  // the short last block of each row, zero beyond K
  for (int64_t c0 = b0; c0 < b1; c0 += kChunkBlocks) {
    const int64_t cn = std::min<int64_t>(kChunkBlocks, b1 - c0);
    if (g128) {
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) chunk_scales_g128_avx2<1>(p, n + r, 0, c0, cn, sa + r, ex + r, extra + r);
    } else if (MODE == kQuarters && p.group == 32) {
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) chunk_scales_g32_avx2<1>(p, n + r, 0, c0, cn, sq + r, ex + r, extra + r);
    } else if (MODE == kQuarters) {
      GroupWalk w = qwalk;
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
        w = qwalk;
        chunk_scales_quarters<1>(p, n + r, 0, w, c0, cn, sq + r, extra + r);
      }
      qwalk = w;
    } else {
      GroupWalk w = walk;
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
        w = walk;
        chunk_scales<1>(p, n + r, 0, w, c0, cn, sa + r, sb + r, extra + r);
      }
      walk = w;
    }
    const int64_t cw = std::max<int64_t>(0, std::min(cn, whole - c0));
    const auto block = VNNI ? digits_block_avxvnni<NR, MODE> : digits_block_avx2<NR, MODE>;
    for (int64_t i = 0; i < cw; ++i)
      block(row, hk, 64 * (c0 + i), p.digits + 64 * (c0 + i), hp, sa, sb, sq, i, near, far, total);
    for (int64_t i = cw; i < cn; ++i) {
      const int64_t j0 = 64 * (c0 + i);
      std::memset(tails, 0, sizeof(tails));
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) std::memcpy(tails + 64 * r, row + r * hk + j0, static_cast<size_t>(hk - j0));
      block(tails, 64, 0, p.digits + j0, hp, sa, sb, sq, i, 0, 0, total);
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r) p.y[n + r] += hsum256(total[r]) + (extra[r] - hsum256(ex[r]));
}

// AVX-512 VNNI: one vpdpbusd multiplies 64 code bytes by 64 digit bytes and adds each
// four products into an int32 lane; lane i holds columns 8i .. 8i + 7 of the block, so
// with split groups lanes 0-7 and 8-15 take the two halves' scales. Groups of 128 (one
// per block) get their chunk's scales and zero-point terms in a few vector operations.
#define LOWBIT_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

template <int MB>
LOWBIT_AVX512VNNI void chunk_scales_g128(const Problem& p, int64_t n, int64_t m0, int64_t c0, int64_t cn,
                                         float (*sa)[kChunkBlocks], __m512* ex) {
  const __mmask16 km = static_cast<__mmask16>((1u << cn) - 1);
  const int64_t at = n * p.G + c0;
  const __m512 s = p.half_scales ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, p.half_scales + at))
                                 : _mm512_maskz_loadu_ps(km, p.float_scales + at);
  const __m512 z = p.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(km, p.zeros + at)))
                           : _mm512_set1_ps(p.default_zero);
  const __m512 sz = _mm512_mul_ps(s, z);
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    ex[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(km, p.xsum + (m0 + m) * p.G + c0), ex[m]);
    _mm512_storeu_ps(sa[m], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(km, p.block_scale + (m0 + m) * p.NB + c0)));
  }
}

// The four quarters' scales of a block as AVX-512 lanes (lanes 4q .. 4q + 3: quarter q).
LOWBIT_AVX512VNNI inline __m512 quarter_lanes_avx512(const float* q4) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                               _mm512_castps128_ps512(_mm_loadu_ps(q4)));
}

template <int MB>
LOWBIT_AVX512VNNI void int4_digits_avx512(const Problem& p, int64_t n, int64_t m0, int64_t b0, int64_t b1) {
  const int64_t hk = p.K / 2, hp = p.hp;
  const uint8_t* row = p.codes + n * hk;
  const bool quarters = p.group % 64 != 0;  // an odd number of quarters per group
  const bool split = !quarters && p.group % 128 != 0;  // an odd number of halves per group
  const bool g128 = p.group == 128;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  float extra[MB] = {};
  alignas(64) float sa[MB][kChunkBlocks];
  alignas(64) float sb[MB][kChunkBlocks];
  alignas(64) float sq[MB][kChunkBlocks][4];
  GroupWalk walk(p, b0);
  GroupWalk qwalk(p, b0, 4);
  __m512 total[MB], ex[MB];
  __m256 ex32[MB];  // groups of 32: their zero-point terms
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[m] = ex[m] = _mm512_setzero_ps(), ex32[m] = _mm256_setzero_ps();
  for (int64_t c0 = b0; c0 < b1; c0 += kChunkBlocks) {
    const int64_t cn = std::min<int64_t>(kChunkBlocks, b1 - c0);
    if (g128) chunk_scales_g128<MB>(p, n, m0, c0, cn, sa, ex);
    else if (p.group == 32) chunk_scales_g32_avx2<MB>(p, n, m0, c0, cn, sq, ex32, extra);
    else if (quarters) chunk_scales_quarters<MB>(p, n, m0, qwalk, c0, cn, sq, extra);
    else chunk_scales<MB>(p, n, m0, walk, c0, cn, sa, sb, extra);
    for (int64_t i = 0; i < cn; ++i) {
      const int64_t j0 = 64 * (c0 + i);
      _mm_prefetch(reinterpret_cast<const char*>(row + j0 + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + j0 + kFar), _MM_HINT_T1);
      const __m512i v = j0 + 64 <= hk ? _mm512_loadu_si512(row + j0)
                                      : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - (hk - j0)), row + j0);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const int8_t* d = p.digits + (m0 + m) * 6 * hp + j0;
        // Horner in int32: ((D2 * 256) + D1) * 256 + D0, |lane| < 8 * 15 * (64 * 2^16 + 128 * 2^8 + 128) < 2^30
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(d + 4 * hp));
        a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512(d + 5 * hp));
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512(d + 2 * hp));
        a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512(d + 3 * hp));
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512(d));
        a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512(d + hp));
        const __m512 f = _mm512_cvtepi32_ps(a);
        const __m512 vs = quarters ? quarter_lanes_avx512(sq[m][i])
                          : split  ? _mm512_insertf32x8(_mm512_set1_ps(sa[m][i]), _mm256_set1_ps(sb[m][i]), 1)
                                   : _mm512_set1_ps(sa[m][i]);
        total[m] = _mm512_fmadd_ps(f, vs, total[m]);
      }
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    p.y[(m0 + m) * p.N + n] +=
        _mm512_reduce_add_ps(total[m]) + (extra[m] - _mm512_reduce_add_ps(ex[m]) - hsum256(ex32[m]));
}

// One activation row (decode) against NR weight rows at once: the six digit vectors are
// loaded once per block for all NR rows, and the rows' dependency chains (six vpdpbusd
// in a row each) interleave, where one row alone waits on its own chain. Codes are
// prefetched NR rows ahead at the same columns (the rows that come next).
template <int NR, int MODE>
LOWBIT_AVX512VNNI inline void digits_block_avx512(const uint8_t* row, int64_t hk, int64_t j0, __mmask64 keep,
                                                  const int8_t* d, int64_t hp, const float (*sa)[kChunkBlocks],
                                                  const float (*sb)[kChunkBlocks], const float (*sq)[kChunkBlocks][4],
                                                  int64_t i, int64_t near, int64_t far, __m512* total) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i d0e = _mm512_loadu_si512(d), d0o = _mm512_loadu_si512(d + hp);
  const __m512i d1e = _mm512_loadu_si512(d + 2 * hp), d1o = _mm512_loadu_si512(d + 3 * hp);
  const __m512i d2e = _mm512_loadu_si512(d + 4 * hp), d2o = _mm512_loadu_si512(d + 5 * hp);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const uint8_t* src = row + r * hk + j0;
    _mm_prefetch(reinterpret_cast<const char*>(src + near), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(src + far), _MM_HINT_T1);
    const __m512i v = _mm512_maskz_loadu_epi8(keep, src);
    const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    // Horner in int32: (D2 * 256 + D1) * 256 + D0, |lane| < 8 * 15 * (64 * 2^16 + 128 * 2^8 + 128) < 2^29
    __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, d2e), hi, d2o);
    a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), lo, d1e), hi, d1o);
    a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), lo, d0e), hi, d0o);
    const __m512 vs = MODE == kQuarters ? quarter_lanes_avx512(sq[r][i])
                      : MODE == kHalves   ? _mm512_insertf32x8(_mm512_set1_ps(sa[r][i]), _mm256_set1_ps(sb[r][i]), 1)
                                          : _mm512_set1_ps(sa[r][i]);
    total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), vs, total[r]);
  }
}

template <int NR, int MODE>
LOWBIT_AVX512VNNI void int4_digits_avx512_rows(const Problem& p, int64_t n, int64_t b0, int64_t b1) {
  const int64_t hk = p.K / 2, hp = p.hp;
  const uint8_t* row = p.codes + n * hk;
  const bool g128 = p.group == 128;
  const int64_t span = NR * hk;
  const int64_t near = span * std::max<int64_t>(1, (kAhead + span - 1) / span);
  const int64_t far = span * std::max<int64_t>(1, (kFar + span - 1) / span);
  const int64_t whole = std::min(b1, hk / 64);  // blocks before the row's short last one
  const __mmask64 tail = (~0ULL) >> (64 - (hk % 64 == 0 ? 64 : hk % 64));
  float extra[NR] = {};
  alignas(64) float sa[NR][kChunkBlocks];
  alignas(64) float sb[NR][kChunkBlocks];
  alignas(64) float sq[NR][kChunkBlocks][4];
  GroupWalk walk(p, b0);
  GroupWalk qwalk(p, b0, 4);
  __m512 total[NR], ex[NR];
  __m256 ex32[NR];  // groups of 32: their zero-point terms
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r) total[r] = ex[r] = _mm512_setzero_ps(), ex32[r] = _mm256_setzero_ps();
  for (int64_t c0 = b0; c0 < b1; c0 += kChunkBlocks) {
    const int64_t cn = std::min<int64_t>(kChunkBlocks, b1 - c0);
    if (g128) {
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) chunk_scales_g128<1>(p, n + r, 0, c0, cn, sa + r, ex + r);
    } else if (MODE == kQuarters && p.group == 32) {
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) chunk_scales_g32_avx2<1>(p, n + r, 0, c0, cn, sq + r, ex32 + r, extra + r);
    } else if (MODE == kQuarters) {
      GroupWalk w = qwalk;
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
        w = qwalk;
        chunk_scales_quarters<1>(p, n + r, 0, w, c0, cn, sq + r, extra + r);
      }
      qwalk = w;
    } else {
      GroupWalk w = walk;
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
        w = walk;
        chunk_scales<1>(p, n + r, 0, w, c0, cn, sa + r, sb + r, extra + r);
      }
      walk = w;
    }
    const int64_t cw = std::max<int64_t>(0, std::min(cn, whole - c0));
    for (int64_t i = 0; i < cw; ++i)
      digits_block_avx512<NR, MODE>(row, hk, 64 * (c0 + i), ~0ULL, p.digits + 64 * (c0 + i), hp, sa, sb, sq, i,
                                    near, far, total);
    for (int64_t i = cw; i < cn; ++i)  // the short last block: codes beyond K read as zero
      digits_block_avx512<NR, MODE>(row, hk, 64 * (c0 + i), tail, p.digits + 64 * (c0 + i), hp, sa, sb, sq, i,
                                    near, far, total);
  }
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r)
    p.y[n + r] += _mm512_reduce_add_ps(total[r]) + (extra[r] - _mm512_reduce_add_ps(ex[r]) - hsum256(ex32[r]));
}

// Several activation rows (a small batch, a short prefill), groups of 128: a register tile
// of four weight rows by MB activation rows, so each code vector is unpacked once for MB
// rows and each digit vector serves four weight rows. The zero-point terms are left to
// one small GEMM afterwards (digit_gemm_avx512 below), so a tile only sums scale * 2^e *
// (integer dot product) per block.
template <int MB>
LOWBIT_AVX512VNNI void digits_tile_avx512(const Problem& p, int64_t n, int64_t m0, int64_t b0, int64_t b1) {
  constexpr int NR = 4;
  const int64_t hk = p.K / 2, hp = p.hp;
  const uint8_t* row = p.codes + n * hk;
  const int64_t whole = std::min(b1, hk / 64);
  const __mmask64 tail = (~0ULL) >> (64 - (hk % 64 == 0 ? 64 : hk % 64));
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  alignas(64) float sa[NR][MB][kChunkBlocks];
  __m512 total[NR][MB];
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r)
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t c0 = b0; c0 < b1; c0 += kChunkBlocks) {
    const int64_t cn = std::min<int64_t>(kChunkBlocks, b1 - c0);
    const __mmask16 km = static_cast<__mmask16>((1u << cn) - 1);
    LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
      const int64_t at = (n + r) * p.G + c0;
      const __m512 sc = p.half_scales ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, p.half_scales + at))
                                      : _mm512_maskz_loadu_ps(km, p.float_scales + at);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        _mm512_store_ps(sa[r][m], _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(km, p.block_scale + (m0 + m) * p.NB + c0)));
    }
    for (int64_t i = 0; i < cn; ++i) {
      const int64_t j0 = 64 * (c0 + i);
      const __mmask64 keep = c0 + i < whole ? ~0ULL : tail;
      __m512i lo[NR], hi[NR];
      LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
        const __m512i v = _mm512_maskz_loadu_epi8(keep, row + r * hk + j0);
        lo[r] = _mm512_and_si512(v, m4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        const int8_t* d = p.digits + (m0 + m) * 6 * hp + j0;
        const __m512i d0e = _mm512_loadu_si512(d), d0o = _mm512_loadu_si512(d + hp);
        const __m512i d1e = _mm512_loadu_si512(d + 2 * hp), d1o = _mm512_loadu_si512(d + 3 * hp);
        const __m512i d2e = _mm512_loadu_si512(d + 4 * hp), d2o = _mm512_loadu_si512(d + 5 * hp);
        LOWBIT_UNROLL for (int r = 0; r < NR; ++r) {
          __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], d2e), hi[r], d2o);
          a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), lo[r], d1e), hi[r], d1o);
          a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), lo[r], d0e), hi[r], d0o);
          total[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sa[r][m][i]), total[r][m]);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < NR; ++r)
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n + r] += _mm512_reduce_add_ps(total[r][m]);
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
#ifdef LOWBIT_NEON
  if (isa == kNeon) return true;
#endif
  return false;
}

int64_t best_isa() {
  static const int64_t best = isa_available(kAvx512) ? kAvx512
                              : isa_available(kAvx2)   ? kAvx2
                              : isa_available(kNeon)   ? kNeon
                                                       : kPortable;
  return best;
}

using RowFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);

template <int MB>
RowFn row_fn(int64_t bits, int64_t isa) {
#ifdef LOWBIT_X86
  if (isa == kAvx512) return bits == 4 ? int4_row_avx512<MB> : int8_row_avx512<MB>;
  if (isa == kAvx2) return bits == 4 ? int4_row_avx2<MB> : int8_row_avx2<MB>;
#endif
#ifdef LOWBIT_NEON
  if (isa == kNeon) return bits == 4 ? int4_row_neon<MB> : int8_row_neon<MB>;
#endif
  return bits == 4 ? int4_row_portable<MB> : int8_row_portable<MB>;
}

bool has_avx512_vnni() {
#ifdef LOWBIT_X86
  __builtin_cpu_init();
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni;
#else
  return false;
#endif
}

// The digit kernels exist for the x86 SIMD paths only (prepare_digits declines elsewhere):
// written in portable C++ the byte products cost more than the fp32 loop they replace.
// AVX-VNNI for the AVX2 path's batch-1 digit kernel; tests turn it off to check the
// vpmaddubsw kernel that AVX2 CPUs without it run.
bool avx_vnni_allowed = true;

bool has_avx_vnni() {
#ifdef LOWBIT_X86
  __builtin_cpu_init();
  static const bool vnni = __builtin_cpu_supports("avxvnni");
  return vnni && avx_vnni_allowed;
#else
  return false;
#endif
}

// Whether the AVX2 path may use AVX-VNNI (where the CPU has it); returns the previous setting.
[[maybe_unused]] bool allow_avx_vnni(bool allow) {
  const bool before = avx_vnni_allowed;
  avx_vnni_allowed = allow;
  return before;
}

template <int MB>
RowFn digits_fn(int64_t isa) {
#ifdef LOWBIT_X86
  if (isa == kAvx512 && has_avx512_vnni()) return int4_digits_avx512<MB>;
  return int4_digits_avx2<MB>;  // AVX2, and AVX-512 without VNNI: vpmaddubsw
#else
  (void)isa;
  return nullptr;
#endif
}

// NR weight rows at once against a single activation row; nullptr where the path has none.
using RowsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);
constexpr int kRows = 4;

template <int MODE>
[[maybe_unused]] RowsFn digits_rows_fn_mode(int64_t isa) {
#ifdef LOWBIT_X86
  if (isa == kAvx512 && has_avx512_vnni()) return int4_digits_avx512_rows<kRows, MODE>;
  if (isa == kAvx2 && has_avx_vnni()) return int4_digits_avx2_rows<kRows, MODE, true>;
  if (isa == kAvx512 || isa == kAvx2) return int4_digits_avx2_rows<kRows, MODE>;
#endif
  (void)isa;
  return nullptr;
}

[[maybe_unused]] RowsFn digits_rows_fn(int64_t isa, int64_t group) {
  if (group % 64 != 0) return digits_rows_fn_mode<kQuarters>(isa);
  return group % 128 != 0 ? digits_rows_fn_mode<kHalves>(isa) : digits_rows_fn_mode<kOneScale>(isa);
}

RowFn digits_fn_for(int64_t rows, int64_t isa) {
  switch (rows) {
    case 1: return digits_fn<1>(isa);
    case 2: return digits_fn<2>(isa);
    case 3: return digits_fn<3>(isa);
    default: return digits_fn<4>(isa);
  }
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
  TORCH_CHECK(isa <= kNeon, "unknown instruction set ", isa);
  TORCH_CHECK(isa_available(isa), "this CPU lacks the instructions of the requested kernel path (",
              isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "neon", ")");
  return isa;
}

#ifndef LOWBIT_NO_TORCH
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
#endif  // LOWBIT_NO_TORCH

// ------------------------------------------------------------------ dequantized tiles
// (q - z) * s, the same float operations as QuantizedWeight.dequantize, so the
// values are bit-identical to it, in the weight's own column order (the nibbles'
// even and odd columns interleaved in registers). A block is rows [n0, n1) by columns
// [k0, k1) (k0, k1 even for 4-bit), written to out with row stride ld; each row walks
// the groups the column range meets, the first and last possibly in part.

void dequant_block_portable(const Problem& p, int64_t bits, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                            float* out, int64_t ld) {
  const int64_t hk = p.K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * ld - k0;
    for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
      const int64_t a = std::max(k0, g * p.group), e = std::min(k1, (g + 1) * p.group);
      const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        for (int64_t j = a / 2; j < e / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        for (int64_t k = a; k < e; ++k) o[k] = (static_cast<float>(b[k]) - z) * s;
      }
    }
  }
}

#ifdef LOWBIT_X86
LOWBIT_AVX2 void dequant_block_avx2(const Problem& p, int64_t bits, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                                    float* out, int64_t ld) {
  const int64_t hk = p.K / 2;
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * ld - k0;
    for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
      const int64_t a = std::max(k0, g * p.group), e = std::min(k1, (g + 1) * p.group);
      const float s = scale_f16c(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        int64_t j = a / 2;
        for (; j + 8 <= e / 2; j += 8) {
          const __m256i v = load8_u8(b + j);
          const __m256 l = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
          const __m256 h = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
          const __m256 wl = _mm256_mul_ps(_mm256_sub_ps(l, vz), vs), wh = _mm256_mul_ps(_mm256_sub_ps(h, vz), vs);
          const __m256 lo = _mm256_unpacklo_ps(wl, wh), hi = _mm256_unpackhi_ps(wl, wh);  // columns interleaved
          _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
        for (; j < e / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        int64_t k = a;
        for (; k + 8 <= e; k += 8)
          _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(load8_u8(b + k)), vz), vs));
        for (; k < e; ++k) o[k] = (static_cast<float>(b[k]) - z) * s;
      }
    }
  }
}

LOWBIT_AVX512 void dequant_block_avx512(const Problem& p, int64_t bits, int64_t n0, int64_t n1, int64_t k0,
                                        int64_t k1, float* out, int64_t ld) {
  const int64_t hk = p.K / 2;
  const __m512i low = _mm512_set1_epi32(0x0F);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * ld - k0;
    for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
      const int64_t a = std::max(k0, g * p.group), e = std::min(k1, (g + 1) * p.group);
      const float s = scale_f16c(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        int64_t j = a / 2;
        for (; j + 16 <= e / 2; j += 16) {
          const __m512i v = load16_u8(b + j);
          const __m512 wl = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), vz), vs);
          const __m512 wh = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vz), vs);
          _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(wl, lo_idx, wh));  // columns interleaved
          _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(wl, hi_idx, wh));
        }
        for (; j < e / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        for (int64_t k = a; k < e; k += 16) {
          const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, e - k)) - 1);
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, b + k)));
          _mm512_mask_storeu_ps(o + k, mk, _mm512_mul_ps(_mm512_sub_ps(w, vz), vs));
        }
      }
    }
  }
}
#endif

#ifdef LOWBIT_NEON
void dequant_block_neon(const Problem& p, int64_t bits, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out,
                        int64_t ld) {
  const int64_t hk = p.K / 2;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * ld - k0;
    for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
      const int64_t a = std::max(k0, g * p.group), e = std::min(k1, (g + 1) * p.group);
      const float s = scale_of(p, n * p.G + g), z = zero_of(p, n * p.G + g);
      const float32x4_t vs = vdupq_n_f32(s), vz = vdupq_n_f32(z);
      if (bits == 4) {
        const uint8_t* b = p.codes + n * hk;
        int64_t j = a / 2;
        for (; j + 16 <= e / 2; j += 16) {
          const uint8x16_t v = vld1q_u8(b + j);
          float32x4_t l[4], h[4];
          widen_u8(vandq_u8(v, low), l);
          widen_u8(vshrq_n_u8(v, 4), h);
          LOWBIT_UNROLL for (int u = 0; u < 4; ++u) {  // (q - z) * s, then the even and odd columns interleaved
            const float32x4_t wl = vmulq_f32(vsubq_f32(l[u], vz), vs), wh = vmulq_f32(vsubq_f32(h[u], vz), vs);
            vst1q_f32(o + 2 * (j + 4 * u), vzip1q_f32(wl, wh));
            vst1q_f32(o + 2 * (j + 4 * u) + 4, vzip2q_f32(wl, wh));
          }
        }
        for (; j < e / 2; ++j) {
          o[2 * j] = (static_cast<float>(b[j] & 15) - z) * s;
          o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
        }
      } else {
        const uint8_t* b = p.codes + n * p.K;
        int64_t k = a;
        for (; k + 16 <= e; k += 16) {
          float32x4_t w[4];
          widen_u8(vld1q_u8(b + k), w);
          LOWBIT_UNROLL for (int u = 0; u < 4; ++u) vst1q_f32(o + k + 4 * u, vmulq_f32(vsubq_f32(w[u], vz), vs));
        }
        for (; k < e; ++k) o[k] = (static_cast<float>(b[k]) - z) * s;
      }
    }
  }
}
#endif

void dequant_block(const Problem& p, int64_t bits, int64_t isa, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                   float* out, int64_t ld) {
#ifdef LOWBIT_X86
  if (isa == kAvx512) return dequant_block_avx512(p, bits, n0, n1, k0, k1, out, ld);
  if (isa == kAvx2) return dequant_block_avx2(p, bits, n0, n1, k0, k1, out, ld);
#endif
#ifdef LOWBIT_NEON
  if (isa == kNeon) return dequant_block_neon(p, bits, n0, n1, k0, k1, out, ld);
#endif
  dequant_block_portable(p, bits, n0, n1, k0, k1, out, ld);
}

#ifndef LOWBIT_NO_TORCH
// Rows [n0, n1) dequantized into out (contiguous [n1 - n0, K], written in place).
void dequant_into(const Problem& p, int64_t bits, int64_t isa, int64_t n0, int64_t n1, torch::Tensor& out) {
  float* o = out.data_ptr<float>();
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    dequant_block(p, bits, isa, a, b, 0, p.K, o + (a - n0) * p.K, p.K);
  });
}
#endif

}  // namespace

// The activations of the fp32-products kernels: per-group sums of x ([M, G] at the start of
// scratch) and, for 4-bit codes, the even columns and the odd columns / 16 (exact: they meet the
// high nibble in place); p.xa / p.xb point into scratch (8-bit: p.xa is x itself).
void prepare_floats(Problem& p, const float* px, int64_t bits, std::vector<float>& scratch) {
  const int64_t M = p.M, K = p.K, G = p.G, group = p.group;
  const int64_t half = bits == 4 ? M * (K / 2) : 0;
  scratch.resize(static_cast<size_t>(M * G + 2 * half));
  float* xsum = scratch.data();
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
}

// A block's exponent: the e with max |x| < 2^(e + 22); false for a block too small for the
// scale 2^-e to be a float (max |x| < 2^-100; such rows take the float path).
inline bool block_exponent(float mx, int& e) {
  e = 0;
  if (mx == 0.f) return true;
  if (mx < 0x1p-100f) return false;
  std::frexp(mx, &e);  // mx < 2^e
  e -= 22;
  return true;
}

#ifdef LOWBIT_X86
// Four vectors of eight int32 (columns 0-31 of a plane, in order) as 32 signed bytes in order.
LOWBIT_AVX2 inline __m256i pack32_avx2(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The same digits with AVX2 (bit-identical: the same power-of-two scaling, cvtps rounds to
// nearest even as the scalar path does).
LOWBIT_AVX2 bool row_digits_avx2(const Problem& p, const float* x, int8_t* d, float* bscale, double* gsum) {
  const int64_t K = p.K;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i fix = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  for (int64_t b = 0; b < p.NB; ++b) {
    const int64_t k0 = 128 * b, n = std::min<int64_t>(128, K - k0);
    alignas(32) float buf[128];
    const float* src = x + k0;
    if (n < 128) {  // the short last block, zero beyond K
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, src, static_cast<size_t>(n) * sizeof(float));
      src = buf;
    }
    __m256 mx = _mm256_setzero_ps();
    for (int k = 0; k < 128; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + k)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    int e;
    if (!block_exponent(_mm_cvtss_f32(m4), e)) return false;
    bscale[b] = std::ldexp(1.f, e);
    const __m256 up = _mm256_set1_ps(std::ldexp(1.f, -e));
    // even and odd columns, 8 of each per 16 columns: planes[0] even, planes[1] odd
    __m256i v[2][8];
    __m256i quarter_sum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};  // columns 32q .. 32q + 31 of the block
    for (int j = 0; j < 8; ++j) {
      const __m256 a = _mm256_loadu_ps(src + 16 * j), c = _mm256_loadu_ps(src + 16 * j + 8);
      const __m256 even = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, c, 0x88), fix);
      const __m256 odd = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, c, 0xDD), fix);
      v[0][j] = _mm256_cvtps_epi32(_mm256_mul_ps(even, up));
      v[1][j] = _mm256_cvtps_epi32(_mm256_mul_ps(odd, up));
      quarter_sum[j / 2] = _mm256_add_epi32(quarter_sum[j / 2], _mm256_add_epi32(v[0][j], v[1][j]));
    }
    int8_t* de = d + 64 * b;
    for (int plane = 0; plane < 2; ++plane)
      LOWBIT_UNROLL for (int q = 0; q < 2; ++q) {  // columns 32q .. 32q + 31 of the plane
        __m256i d0[4], d1[4], d2[4];
        LOWBIT_UNROLL for (int t = 0; t < 4; ++t) {
          const __m256i w = v[plane][4 * q + t];
          d0[t] = _mm256_srai_epi32(_mm256_slli_epi32(w, 24), 24);
          const __m256i r = _mm256_srai_epi32(_mm256_sub_epi32(w, d0[t]), 8);
          d1[t] = _mm256_srai_epi32(_mm256_slli_epi32(r, 24), 24);
          d2[t] = _mm256_srai_epi32(_mm256_sub_epi32(r, d1[t]), 8);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(de + plane * p.hp + 32 * q), pack32_avx2(d0[0], d0[1], d0[2], d0[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(de + (2 + plane) * p.hp + 32 * q),
                            pack32_avx2(d1[0], d1[1], d1[2], d1[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(de + (4 + plane) * p.hp + 32 * q),
                            pack32_avx2(d2[0], d2[1], d2[2], d2[3]));
      }
    for (int q = 0; q < 4 && k0 + 32 * q < K; ++q) {  // groups are multiples of 32 columns
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(quarter_sum[q]), _mm256_extracti128_si256(quarter_sum[q], 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      gsum[(k0 + 32 * q) / p.group] += static_cast<double>(_mm_cvtsi128_si32(s4)) * bscale[b];
    }
  }
  return true;
}
#endif

// The activations of the integer-digit path: per block of 128 columns the exponent e
// with |x| < 2^(e + 22), v = round(x / 2^e) as three signed bytes (v = d0 + 256 d1 +
// 65536 d2), and the group sums of the rounded values. False (nothing usable written) when
// x holds a NaN or an Inf, or a block too small to scale (those take the float path).
bool prepare_digits(Problem& p, const float* px, int64_t isa, std::vector<int8_t>& digits,
                    std::vector<float>& block_scale, float* xsum) {
  const int64_t M = p.M, K = p.K;
#ifdef LOWBIT_X86
  if (isa != kAvx2 && isa != kAvx512) return false;
  p.NB = (K + 127) / 128;
  p.hp = 64 * p.NB + 64;  // a line of padding per plane: planes 4 KiB apart would share L1 sets
  digits.resize(static_cast<size_t>(M * 6 * p.hp));
  block_scale.resize(static_cast<size_t>(M * p.NB));
  std::atomic<bool> ok{true};
  // rows in parallel from 32 on (a large batch for the AMX digit GEMM); each writes its own rows
  at::parallel_for(0, M, 32, [&](int64_t m0, int64_t m1) {
    thread_local std::vector<double> gsum;
    for (int64_t m = m0; m < m1 && ok.load(std::memory_order_relaxed); ++m) {
      const float* x = px + m * K;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) finite &= std::isfinite(x[k]);
      gsum.assign(static_cast<size_t>(p.G), 0.0);  // the groups' sums of the rounded values
      if (!finite || !row_digits_avx2(p, x, digits.data() + m * 6 * p.hp, block_scale.data() + m * p.NB, gsum.data())) {
        ok = false;
        return;
      }
      for (int64_t g = 0; g < p.G; ++g) xsum[m * p.G + g] = static_cast<float>(gsum[g]);
    }
  });
  if (!ok) return false;
  p.digits = digits.data();
  p.block_scale = block_scale.data();
  return true;
#else
  (void)p, (void)px, (void)isa, (void)digits, (void)block_scale, (void)xsum, (void)M, (void)K;
  return false;
#endif
}

#if defined(LOWBIT_X86) && !defined(LOWBIT_NO_TORCH)
// The digit path for more than four activation rows in groups of 128 (AVX-512 VNNI): tiles of
// four weight rows by two activation rows over blocks of 16 x 128 columns, rows of the batch
// in slabs whose digits stay in L2; then y -= xsum @ (s * z)^T, the zero-point terms of every
// row and group in one GEMM.
void digit_gemm_avx512(const Problem& p, const torch::Tensor& scales, const c10::optional<torch::Tensor>& zeros,
                       torch::Tensor& y) {
  constexpr int NR = 4;
  constexpr int64_t kSlab = 32, kSpan = 16, kGroupsPerChunk = 16;  // rows per slab, blocks per span
  const int64_t M = p.M, N = p.N;
  const int64_t groups = N / NR;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t s0 = 0; s0 < M; s0 += kSlab) {
      const int64_t s1 = std::min(M, s0 + kSlab);
      for (int64_t b0 = 0; b0 < p.NB; b0 += kSpan) {
        const int64_t b1 = std::min(p.NB, b0 + kSpan);
        for (int64_t c0 = g0; c0 < g1; c0 += kGroupsPerChunk) {
          // a pair of activation rows' digits (2 x 16 blocks, 12 KiB) stays in L1 while the
          // chunk's codes (16 x 4 rows x 16 blocks, 64 KiB) come from L2
          const int64_t c1 = std::min(g1, c0 + kGroupsPerChunk);
          int64_t m = s0;
          for (; m + 2 <= s1; m += 2)
            for (int64_t gr = c0; gr < c1; ++gr) digits_tile_avx512<2>(p, NR * gr, m, b0, b1);
          if (m < s1)
            for (int64_t gr = c0; gr < c1; ++gr) digits_tile_avx512<1>(p, NR * gr, m, b0, b1);
        }
      }
    }
  });
  // rows beyond the last group of four: the one-row kernels, which add their own zero-point terms
  const int64_t rest = N - NR * groups;
  if (rest > 0) {
    const RowFn full = digits_fn_for(kChunk, kAvx512), part = digits_fn_for(M % kChunk, kAvx512);
    for (int64_t n = NR * groups; n < N; ++n) {
      int64_t m = 0;
      for (; m + kChunk <= M; m += kChunk) full(p, n, m, 0, p.NB);
      if (m < M) part(p, n, m, 0, p.NB);
    }
  }
  // the zero-point terms of the tiled rows: y[:, :NR * groups] -= xsum @ (s * z)^T
  if (groups > 0) {
    auto s = scales.narrow(0, 0, NR * groups).to(torch::kFloat);
    auto sz = zeros.has_value() ? s * zeros->narrow(0, 0, NR * groups).to(torch::kFloat) : s * p.default_zero;
    auto xs = torch::from_blob(const_cast<float*>(p.xsum), {M, p.G}, torch::dtype(torch::kFloat));
    auto part = y.narrow(1, 0, NR * groups);
    part.sub_(at::mm(xs, sz.t()));
  }
}
#endif

// ------------------------------------------------------------------ fused dequantize-GEMM
// Batches past the GEMV kernels, on the x86 SIMD paths: blocks of kFusedN weight rows by
// kFusedK columns are dequantized (bit-identical to QuantizedWeight.dequantize) into a
// buffer that stays in L2, and a register-tiled FMA kernel multiplies them by the
// activations, packed once per call as panels of W columns of x (k-major, 16 V rows of x per
// k on AVX-512, 8 V on AVX2). A tile holds R weight rows by W activation rows of y^T in
// registers: per k, V vector loads of x, R broadcasts of a weight and R * V FMAs. The
// weight never exists whole in fp32 and is read as stored (4 or 8 bits), where
// dequantize-then-BLAS writes every fp32 tile out and the BLAS packs it again. Products
// and sums are fp32, as in any GEMM.
constexpr int64_t kFusedN = 96, kFusedK = 1024;  // a dequantized block of weights: 384 KiB, in L2
constexpr int64_t kFusedLd = kFusedK + 16;       // its row stride: rows 4 KiB apart would share L1 sets
constexpr int64_t kFusedSteps = 128;             // columns per tile pass: a panel's x (32 KiB) stays in L1

#ifdef LOWBIT_X86
template <int R, int V>
LOWBIT_AVX512 void fused_tile_avx512(const float* w, int64_t ldw, const float* xt, int64_t kc, float* c, int64_t ldc,
                                     bool first) {
  __m512 acc[R][V];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc + 16 * v);
  const float* wr[R];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r) wr[r] = w + r * ldw;
  for (int64_t k = 0; k < kc; ++k) {
    __m512 a[V];
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_ps(xt + (16 * V) * k + 16 * v);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(wr[r][k]);
      LOWBIT_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(b, a[v], acc[r][v]);
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int R, int V>
LOWBIT_AVX2 void fused_tile_avx2(const float* w, int64_t ldw, const float* xt, int64_t kc, float* c, int64_t ldc,
                                 bool first) {
  __m256 acc[R][V];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8 * v);
  const float* wr[R];
  LOWBIT_UNROLL for (int r = 0; r < R; ++r) wr[r] = w + r * ldw;
  for (int64_t k = 0; k < kc; ++k) {
    __m256 a[V];
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_ps(xt + (8 * V) * k + 8 * v);
    LOWBIT_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(wr[r] + k);
      LOWBIT_UNROLL for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(b, a[v], acc[r][v]);
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < R; ++r)
    LOWBIT_UNROLL for (int v = 0; v < V; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);
constexpr int kTileRows = 6;  // R: 6 x 4 zmm (AVX-512) or 6 x 2 ymm (AVX2) accumulators

template <int V>
TileFn tile_fn_avx512(int r) {
  switch (r) {
    case 1: return fused_tile_avx512<1, V>;
    case 2: return fused_tile_avx512<2, V>;
    case 3: return fused_tile_avx512<3, V>;
    case 4: return fused_tile_avx512<4, V>;
    case 5: return fused_tile_avx512<5, V>;
    default: return fused_tile_avx512<6, V>;
  }
}

template <int V>
TileFn tile_fn_avx2(int r) {
  switch (r) {
    case 1: return fused_tile_avx2<1, V>;
    case 2: return fused_tile_avx2<2, V>;
    case 3: return fused_tile_avx2<3, V>;
    case 4: return fused_tile_avx2<4, V>;
    case 5: return fused_tile_avx2<5, V>;
    default: return fused_tile_avx2<6, V>;
  }
}

// The tile kernel for r weight rows and v vectors of activation rows.
TileFn tile_fn(int64_t isa, int r, int v) {
  if (isa == kAvx512) {
    switch (v) {
      case 1: return tile_fn_avx512<1>(r);
      case 2: return tile_fn_avx512<2>(r);
      case 3: return tile_fn_avx512<3>(r);
      default: return tile_fn_avx512<4>(r);
    }
  }
  return v == 1 ? tile_fn_avx2<1>(r) : tile_fn_avx2<2>(r);
}

// y = x @ W^T (+ bias) for x fp32 [M, K], on the AVX2 or AVX-512 path.
void fused_gemm(const Problem& p, int64_t bits, int64_t isa, const float* x, const float* bias, float* y) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t lanes = isa == kAvx512 ? 16 : 8, vmax = isa == kAvx512 ? 4 : 2;
  const int64_t width = lanes * vmax;  // activation rows per panel
  const int64_t panels = (M + width - 1) / width;
  // the panels of x: panel i holds rows [i * width, ...) as [K][lanes * v], zero beyond M
  thread_local std::vector<float> packed;
  std::vector<int64_t> start(static_cast<size_t>(panels) + 1, 0), vecs(static_cast<size_t>(panels));
  for (int64_t i = 0; i < panels; ++i) {
    const int64_t rows = std::min(width, M - i * width);
    vecs[i] = (rows + lanes - 1) / lanes;
    start[i + 1] = start[i] + K * lanes * vecs[i];
  }
  packed.resize(static_cast<size_t>(start[panels]));
  float* xt = packed.data();
  constexpr int64_t kStrip = 64;  // columns per pass: the strip's panel rows stay in L1
  at::parallel_for(0, panels * ((K + kStrip - 1) / kStrip), 1, [&](int64_t a, int64_t b) {
    const int64_t strips = (K + kStrip - 1) / kStrip;
    for (int64_t t = a; t < b; ++t) {
      const int64_t i = t / strips, k0 = (t % strips) * kStrip, k1 = std::min(K, k0 + kStrip);
      const int64_t w = lanes * vecs[i], m0 = i * width, rows = std::min(width, M - m0);
      float* dst = xt + start[i];
      for (int64_t j = 0; j < w; ++j) {
        if (j < rows) {
          const float* src = x + (m0 + j) * K;
          for (int64_t k = k0; k < k1; ++k) dst[k * w + j] = src[k];
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k * w + j] = 0.f;
        }
      }
    }
  });
  const int64_t mpad = start[panels] / K;  // activation rows with the padding
  const int64_t blocks = (N + kFusedN - 1) / kFusedN;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> wbuf, ct;
    wbuf.resize(static_cast<size_t>(kFusedN * kFusedLd));
    ct.resize(static_cast<size_t>(kFusedN * mpad));  // y^T of the block's weight rows
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kFusedN, nr = std::min(kFusedN, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kFusedK) {
        const int64_t kc = std::min(kFusedK, K - k0);
        dequant_block(p, bits, isa, n0, n0 + nr, k0, k0 + kc, wbuf.data(), kFusedLd);
        for (int64_t s0 = 0; s0 < kc; s0 += kFusedSteps) {
          const int64_t sc = std::min(kFusedSteps, kc - s0);
          for (int64_t i = 0; i < panels; ++i) {
            const int v = static_cast<int>(vecs[i]);
            const float* xp = xt + start[i] + (k0 + s0) * lanes * v;
            float* cp = ct.data() + start[i] / K;
            for (int64_t r0 = 0; r0 < nr; r0 += kTileRows) {
              const int r = static_cast<int>(std::min<int64_t>(kTileRows, nr - r0));
              tile_fn(isa, r, v)(wbuf.data() + r0 * kFusedLd + s0, kFusedLd, xp, sc, cp + r0 * mpad, mpad,
                                 k0 + s0 == 0);
            }
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        float* out = y + m * N + n0;
        for (int64_t r = 0; r < nr; ++r) out[r] = ct[r * mpad + m] + (bias ? bias[n0 + r] : 0.f);
      }
    }
  });
}
#endif

#ifdef LOWBIT_X86
// ------------------------------------------------------------------ AMX: the digit GEMM on tiles
// Large batches on CPUs with AMX-INT8 (Intel since Sapphire Rapids), 4-bit codes in groups of a
// multiple of 128: the integer-digit arithmetic of the GEMV kernels on the tile unit. Per block
// of 128 columns, each activation digit plane (16 activation rows x 64 signed bytes, read in
// place from prepare_digits' layout) meets the codes' nibble plane of 16 weight rows (unsigned,
// rearranged so that each 4-byte group of columns of a weight row is one column of the tile:
// a 16 x 16 transpose of 32-bit words) in tdpbsud, which sums 64 exact byte products into int32
// per output. Three digits each get their own accumulator tile (a digit's block sum stays below
// 2^18; their Horner sum would not fit int32), two activation tiles of 16 rows share each weight
// tile: six accumulators, one activation tile, one weight tile. After each block the six tiles
// are combined in fp32 ((C2 * 256 + C1) * 256 + C0, rounding once per block as fp32 does), times
// scale * 2^e, into y; the zero-point terms s * z * (sum of the rounded activations of the group)
// are subtracted where a group starts. The result is dequantize(W) @ x~ to fp32 rounding, x~ the
// activations rounded to 23 bits against each block's largest |x|, as on the GEMV digit path.
#define LOWBIT_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

bool amx_allowed = true;  // tests and benchmarks turn it off to time the other paths

// AMX-INT8 usable here: the CPU has it and Linux lets this process use the tile state
// (ARCH_REQ_XCOMP_PERM for XTILEDATA; a VM whose kernel does not grant it gets the other paths).
bool amx_usable() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-tile") || !isa_available(kAvx512))
      return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok && amx_allowed;
#else
  return false;
#endif
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// 16 vectors of 16 dwords transposed in place (v[i][j] <- v[j][i]).
LOWBIT_AMX inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // v[4q + c], lane L, now holds column 4L + c of rows 4q .. 4q + 3: a 4 x 4 transpose of lanes
  LOWBIT_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512i a = v[i], b = v[4 + i], c = v[8 + i], d = v[12 + i];
    const __m512i ab_lo = _mm512_shuffle_i32x4(a, b, 0x88), ab_hi = _mm512_shuffle_i32x4(a, b, 0xDD);
    const __m512i cd_lo = _mm512_shuffle_i32x4(c, d, 0x88), cd_hi = _mm512_shuffle_i32x4(c, d, 0xDD);
    t[i] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
    t[8 + i] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
    t[4 + i] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
  }
  // t[4L + c] is output row 4L + c: lane L of rows 0-3, 4-7, 8-11, 12-15 of column 4L + c
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// Weight rows n0 .. n0 + 15 (zero beyond N) of block b as two weight tiles (low and high nibbles):
// row r of a tile holds, for each weight row n, its codes of columns 4r .. 4r + 3 of the plane.
LOWBIT_AMX void amx_weight_tiles(const Problem& p, int64_t n0, int64_t b, uint8_t* lo, uint8_t* hi) {
  const int64_t hk = p.K / 2, j0 = 64 * b;
  const __mmask64 keep = j0 + 64 <= hk ? ~0ULL : (~0ULL) >> (64 - (hk - j0));
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512i l[16], h[16];
  for (int n = 0; n < 16; ++n) {
    const __m512i v = n0 + n < p.N ? _mm512_maskz_loadu_epi8(keep, p.codes + (n0 + n) * hk + j0) : _mm512_setzero_si512();
    l[n] = _mm512_and_si512(v, m4);
    h[n] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  }
  transpose16(l);
  transpose16(h);
  for (int r = 0; r < 16; ++r) {
    _mm512_store_si512(lo + 64 * r, l[r]);
    _mm512_store_si512(hi + 64 * r, h[r]);
  }
}

// y[m0:m1, 16 nb0 : 16 nb1] (weight rows in blocks of 16; m0, m1 multiples of 32, digits and block
// scales padded with zeros to m1 rows). y is [M, N] fp32, written (not added to).
LOWBIT_AMX void amx_digit_gemm_rows(const Problem& p, const int8_t* tiles, int64_t m0, int64_t m1, int64_t nb0,
                                    int64_t nb1, float* y) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int64_t M = p.M, N = p.N;
  alignas(64) uint8_t wt[2][16 * 64];
  alignas(64) int32_t cb[6][16 * 16];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int64_t n0 = 16 * nb;
    const __mmask16 ncols = n0 + 16 <= N ? 0xFFFF : static_cast<__mmask16>((1u << (N - n0)) - 1);
    {
      const int64_t mc = m0, mend = m1;
      for (int64_t m = mc; m < std::min(mend, M); ++m) _mm512_mask_storeu_ps(y + m * N + n0, ncols, _mm512_setzero_ps());
      for (int64_t b = 0; b < p.NB; ++b) {
        amx_weight_tiles(p, n0, b, wt[0], wt[1]);
        const int64_t g = 128 * b / p.group;
        const bool starts = 128 * b == g * p.group;
        // the 16 weight rows' scale, and scale * zero, of group g
        alignas(64) float sv[16], szv[16];
        for (int n = 0; n < 16; ++n) {
          const int64_t row = std::min(n0 + n, N - 1);
          sv[n] = scale_f16c(p, row * p.G + g);
          szv[n] = sv[n] * zero_of(p, row * p.G + g);
        }
        const __m512 s = _mm512_load_ps(sv), sz = _mm512_load_ps(szv);
        for (int64_t mt = mc; mt < mend; mt += 32) {
          _tile_zero(2);
          _tile_zero(3);
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int plane = 0; plane < 2; ++plane) {
            _tile_loadd(1, wt[plane], 64);
            // digit e of rows mt .. mt + 15 into tile 2 + e, of rows mt + 16 .. + 31 into tile 5 + e
            const int8_t* a = tiles + ((mt / 16 * p.NB + b) * 6 + plane) * 1024;
            const int64_t next = p.NB * 6 * 1024;  // the next 16 rows
            _tile_loadd(0, a, 64);
            _tile_dpbsud(2, 0, 1);
            _tile_loadd(0, a + 2 * 1024, 64);
            _tile_dpbsud(3, 0, 1);
            _tile_loadd(0, a + 4 * 1024, 64);
            _tile_dpbsud(4, 0, 1);
            _tile_loadd(0, a + next, 64);
            _tile_dpbsud(5, 0, 1);
            _tile_loadd(0, a + next + 2 * 1024, 64);
            _tile_dpbsud(6, 0, 1);
            _tile_loadd(0, a + next + 4 * 1024, 64);
            _tile_dpbsud(7, 0, 1);
          }
          _tile_stored(2, cb[0], 64);
          _tile_stored(3, cb[1], 64);
          _tile_stored(4, cb[2], 64);
          _tile_stored(5, cb[3], 64);
          _tile_stored(6, cb[4], 64);
          _tile_stored(7, cb[5], 64);
          for (int half = 0; half < 2; ++half)
            for (int r = 0; r < 16; ++r) {
              const int64_t m = mt + 16 * half + r;
              if (m >= M) break;
              const int32_t* c = cb[3 * half];
              __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(cb[3 * half + 2] + 16 * r));
              f = _mm512_fmadd_ps(f, _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(_mm512_load_si512(cb[3 * half + 1] + 16 * r)));
              f = _mm512_fmadd_ps(f, _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r)));
              float* out = y + m * N + n0;
              __m512 acc = _mm512_maskz_loadu_ps(ncols, out);
              acc = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(p.block_scale[m * p.NB + b])), acc);
              if (starts) acc = _mm512_fnmadd_ps(sz, _mm512_set1_ps(p.xsum[m * p.G + g]), acc);
              _mm512_mask_storeu_ps(out, ncols, acc);
            }
        }
      }
    }
  }
  _tile_release();
}

// y = x @ W^T on the tiles (fp32 [M, N], written); false where the activations hold a NaN or an
// Inf, or a block too small to scale (the caller takes another path).
bool amx_digit_gemm(Problem& p, const float* x, float* y) {
  thread_local std::vector<int8_t> digits;
  thread_local std::vector<float> block_scale, xsum;
  xsum.resize(static_cast<size_t>(p.M * p.G));
  if (!prepare_digits(p, x, kAvx512, digits, block_scale, xsum.data())) return false;
  const int64_t mpad = (p.M + 31) / 32 * 32;  // whole pairs of 16-row tiles; the padding is zero
  digits.resize(static_cast<size_t>(mpad * 6 * p.hp));
  std::fill(digits.begin() + p.M * 6 * p.hp, digits.end(), 0);
  block_scale.resize(static_cast<size_t>(mpad * p.NB));
  std::fill(block_scale.begin() + p.M * p.NB, block_scale.end(), 0.f);
  p.digits = digits.data();
  p.block_scale = block_scale.data();
  p.xsum = xsum.data();
  // the digits as whole tiles, 1 KiB each and contiguous: [16-row block][block of 128][digit, plane]
  // [16 rows][64 bytes] (read in place, a tile's rows would lie 6 K / 2 bytes apart, all in one L1 set)
  thread_local std::vector<int8_t> tiles;
  tiles.resize(static_cast<size_t>(mpad / 16 * p.NB * 6 * 1024));
  // (thread_local buffers are named by pointer inside the parallel regions: there the name would
  // be the worker thread's own)
  int8_t* const tp = tiles.data();
  const int8_t* const dp = digits.data();
  at::parallel_for(0, mpad / 16, 1, [&](int64_t a, int64_t b) {
    for (int64_t mb = a; mb < b; ++mb)
      for (int64_t blk = 0; blk < p.NB; ++blk)
        for (int64_t t = 0; t < 6; ++t)
          for (int64_t r = 0; r < 16; ++r)
            std::memcpy(tp + ((mb * p.NB + blk) * 6 + t) * 1024 + 64 * r,
                        dp + (16 * mb + r) * 6 * p.hp + t * p.hp + 64 * blk, 64);
  });
  // chunks of activation rows whose digits (6 planes of K / 2 bytes a row) stay in L2 while every
  // weight block passes: the codes are read once per chunk, the digits once
  const int64_t chunk = std::max<int64_t>(32, (1 << 20) / (6 * p.hp) / 32 * 32);
  for (int64_t m0 = 0; m0 < mpad; m0 += chunk) {
    const int64_t m1 = std::min(mpad, m0 + chunk);
    at::parallel_for(0, (p.N + 15) / 16, 4,
                     [&](int64_t a, int64_t b) { amx_digit_gemm_rows(p, tp, m0, m1, a, b, y); });
  }
  return true;
}
#endif

// Which kernel takes how many batch rows, measured on 4096 x 4096 g128, one thread
// (benchmarks/gemv.py; for the AVX2 path with MKL held to AVX2, as on a CPU without AVX-512):
// - up to gemv_rows, wq_gemv: 16 for 4-bit groups of 128 on AVX-512 VNNI (the register-tiled
//   digit GEMM, 2.7x fp32 at 8 rows, 1.9x at 16), 8 for other multiples of 32 there, else 4 (the AVX2
//   digit kernel gives 3.4x at 4 rows but 1.3x at 8, where the fused GEMM gives 1.6x);
// - up to fused_rows, the fused dequantize-GEMM: 192 on AVX-512 (1.5x fp32 at 32 rows, 1.1x
//   at 128, 1.0x at 192) and on AVX2 (Zen 4, AVX2-held MKL: 1.30x at 32 and 64 rows, 1.14x at
//   128, 1.19x at 192, where tiles + BLAS gave 1.06x / 1.05x / 1.00x / 1.06x; before its tile
//   kept the accumulators in registers it ran 0.6x from 32 rows, hence an earlier limit of 48);
// - beyond, dequantized tiles + BLAS (0.9x to 1.0x: the BLAS's own work plus the dequantization).
// Where AMX-INT8 runs (and for 4-bit groups of a multiple of 128), every batch past the GEMV
// kernels takes the digit GEMM on AMX tiles instead: 2.2x fp32 at 16 rows, 2.6x at 32, 1.9x at
// 64, 1.0-2.5x from 128 to 2048 (this VM's AMX timings vary run to run).
constexpr int64_t kDigitGemmRows = 16;
constexpr int64_t kAmxRows = kDigitGemmRows + 1;  // the AMX digit GEMM past the GEMV kernels, where it runs

int64_t gemv_rows(int64_t bits, int64_t group, int64_t isa, bool allow_digits) {
  isa = resolve_isa(isa);
  // groups of 128 take the register-tiled digit GEMM up to 16 rows; other groups the per-row digit kernels up to 8
  // (Zen 4, one thread: g64 at 12 and 16 rows 14.4 / 18.6 ms against 9.7 ms for the fused GEMM; g32 even at 12)
  if (allow_digits && bits == 4 && group % 32 == 0 && isa == kAvx512 && has_avx512_vnni())
    return group == 128 ? kDigitGemmRows : 8;
  return 4;
}

int64_t fused_rows(int64_t isa) {
  isa = resolve_isa(isa);
  return isa == kAvx512 || isa == kAvx2 ? 192 : 0;
}

#ifndef LOWBIT_NO_TORCH
// y = x @ W^T for x: fp32 [M, K] (any M; meant for a few rows, where the weight
// bytes dominate). isa: -1 for the best this CPU has, 0 portable, 1 AVX2, 2 AVX-512.
torch::Tensor wq_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                      c10::optional<torch::Tensor> bias, int64_t N, int64_t bits, int64_t group, int64_t isa,
                      bool allow_digits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  check_weights(codes, scales, zeros, N, K, bits, group);
  isa = resolve_isa(isa);
  x = x.contiguous();
  Problem p = weights_problem(codes, scales, zeros, N, K, bits, group);
  p.M = M;
  const int64_t G = p.G;
  const float* px = x.data_ptr<float>();
  // scratch buffers kept per thread: a decode step calls this hundreds of times with one row
  thread_local std::vector<float> scratch;
  thread_local std::vector<int8_t> digits;
  thread_local std::vector<float> block_scale;
  const bool use_digits = allow_digits && bits == 4 && group % 32 == 0 && M > 0 && (isa == kAvx2 || isa == kAvx512) &&
                          [&] {
                            scratch.resize(static_cast<size_t>(M * G));
                            return prepare_digits(p, px, isa, digits, block_scale, scratch.data());
                          }();
  if (!use_digits) prepare_floats(p, px, bits, scratch);
  p.xsum = scratch.data();
  torch::Tensor y;
  if (bias.has_value()) {  // the kernel adds into y: starting from the bias fuses it
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N, "bias must be fp32 [N]");
    y = bias->reshape({1, N}).repeat({M, 1});  // a fresh tensor: never the bias itself
  } else {
    y = torch::zeros({M, N}, x.options());
  }
  p.y = y.data_ptr<float>();
  if (M == 0 || N == 0) return y;
#ifdef LOWBIT_X86
  if (use_digits && group == 128 && M > kChunk && isa == kAvx512 && has_avx512_vnni()) {
    digit_gemm_avx512(p, scales, zeros, y);
    return y;
  }
#endif
  const RowFn full = use_digits ? digits_fn_for(kChunk, isa) : row_fn_for(kChunk, bits, isa);
  const RowFn rest = use_digits ? digits_fn_for(M % kChunk, isa) : row_fn_for(M % kChunk, bits, isa);
  // blocks of columns whose activations (all rows) stay in L1 while weight rows stream by:
  // whole groups on the float path, blocks of 128 columns on the digit path
  const int64_t units = use_digits ? p.NB : G;
  const int64_t unit_bytes = use_digits ? M * 128 * 3 : M * group * 4;
  const int64_t ublock = std::max<int64_t>(use_digits ? 16 : 1, 32768 / std::max<int64_t>(1, unit_bytes));
  const RowsFn many = use_digits && M == 1 ? digits_rows_fn(isa, group) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t u0 = 0; u0 < units; u0 += ublock) {
      const int64_t u1 = std::min(units, u0 + ublock);
      int64_t n = n0;
      if (many) for (; n + kRows <= n1; n += kRows) many(p, n, u0, u1);
      for (; n < n1; ++n) {
        int64_t m = 0;
        for (; m + kChunk <= M; m += kChunk) full(p, n, m, u0, u1);
        if (m < M) rest(p, n, m, u0, u1);
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

// y = x @ W^T for larger batches: the fused dequantize-GEMM (see fused_rows), or tiles of
// `tile` weight rows dequantized and multiplied by the BLAS GEMM, so the fp32 weight never
// exists whole.
torch::Tensor wq_gemm_tiled(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                            c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> bias, int64_t N,
                            int64_t bits, int64_t group, int64_t tile, int64_t isa, int64_t fused, int64_t amx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  TORCH_CHECK(tile > 0, "tile must be positive");
  const int64_t M = x.size(0), K = x.size(1);
  check_weights(codes, scales, zeros, N, K, bits, group);
  isa = resolve_isa(isa);
  Problem p = weights_problem(codes, scales, zeros, N, K, bits, group);
  x = x.contiguous();
  if (bias.has_value()) TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N, "bias must be fp32 [N]");
#ifdef LOWBIT_X86
  // amx: the digit GEMM on AMX tiles (4-bit, groups of a multiple of 128, the AVX-512 path, a CPU
  // and kernel that allow AMX): 1 always, 0 never, -1 from amx_rows on
  if (amx != 0 && isa == kAvx512 && bits == 4 && group % 128 == 0 && M > 0 && N > 0 && (amx == 1 || M >= kAmxRows) &&
      amx_usable()) {
    auto y = torch::empty({M, N}, x.options());
    p.M = M;
    if (amx_digit_gemm(p, x.data_ptr<float>(), y.data_ptr<float>())) return bias.has_value() ? y.add_(*bias) : y;
  }
  // fused: 1 always (on the x86 SIMD paths), 0 never, -1 up to fused_rows
  if ((isa == kAvx2 || isa == kAvx512) && (fused == 1 || (fused == -1 && M <= fused_rows(isa))) && M > 0 && N > 0 &&
      K > 0) {
    auto y = torch::empty({M, N}, x.options());
    p.M = M;
    auto b = bias.has_value() ? bias->contiguous() : torch::Tensor();
    fused_gemm(p, bits, isa, x.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
    return y;
  }
#endif
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

bool amx_usable_py() {
#ifdef LOWBIT_X86
  return amx_usable();
#else
  return false;
#endif
}

bool allow_amx(bool allow) {
#ifdef LOWBIT_X86
  const bool before = amx_allowed;
  amx_allowed = allow;
  return before;
#else
  (void)allow;
  return false;
#endif
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"portable"};
  if (isa_available(kAvx2)) out.push_back("avx2");
  if (isa_available(kAvx512)) out.push_back("avx512");
  if (isa_available(kNeon)) out.push_back("neon");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_gemv", &wq_gemv, "weight-only 4/8-bit matmul for small batches (fp32 activations)", py::arg("x"),
        py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("N"), py::arg("bits"),
        py::arg("group"), py::arg("isa"), py::arg("allow_digits") = true);
  m.def("has_avx_vnni", &has_avx_vnni, "whether the AVX2 path uses AVX-VNNI here");
  m.def("allow_avx_vnni", &allow_avx_vnni, "let the AVX2 path use AVX-VNNI where the CPU has it (for tests)");
  m.def("gemv_rows", &gemv_rows, "the most rows wq_gemv should take for this layout and path");
  m.def("wq_dequant", &wq_dequant, "dequantize rows of a 4/8-bit weight to fp32");
  m.def("wq_gemm_tiled", &wq_gemm_tiled,
        "weight-only matmul for large batches: a fused dequantize-GEMM (x86 SIMD) or dequantized tiles + BLAS",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("N"),
        py::arg("bits"), py::arg("group"), py::arg("tile"), py::arg("isa"), py::arg("fused") = -1, py::arg("amx") = -1);
  m.def("amx_usable", &amx_usable_py, "whether the AMX digit GEMM runs here (and is allowed)");
  m.def("allow_amx", &allow_amx, "let large batches use the AMX digit GEMM where the CPU has it (for tests)");
  m.def("fused_rows", &fused_rows, "the most rows the fused dequantize-GEMM takes on a path (auto)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows (a decode step's norms)");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs the kernels with");
}
#endif  // LOWBIT_NO_TORCH
