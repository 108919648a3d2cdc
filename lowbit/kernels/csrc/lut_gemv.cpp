// Look-up-table matmul on CPUs for non-uniform weights: y[m, n] = sum_k x[m, k] * W[n, k] with
//
//     W[n, k] = T[n, g][q[n, k]],   g = k / group
//
// where T[n, g] holds the 2^bits values of row n's group g: a learned codebook (kind "lut", fp16 or
// fp32 [N, G, 2^bits]) or a shared codebook times the group's scale (nf4 / fp4: fp32 [2^bits] and
// scales fp16 or fp32 [N, G]). The codes are read as QuantizedWeight stores them: one little-endian
// bit stream, code i at bits [i * bits, (i + 1) * bits), which is what lowbit's packing gives for
// every width (2 and 4 bits fill bytes from the low end; 3 bits go eight to a 24-bit word). The last
// group may be shorter (ragged). The caller pads the stream with 8 zero bytes (kPad) so that the SIMD
// loads of the last codes never leave the buffer.
//
// Each group's table is formed in fp32 once (fp16 converted, or the shared values times the scale,
// the same products QuantizedWeight.dequantize forms), so the looked-up values are the dequantized
// weights exactly and the products accumulate in fp32: the result agrees with
// dequantize-then-matmul to fp32 rounding on every path. The table lives in registers: AVX2 looks
// 2- and 3-bit codes up with vpermps over 8 entries, and 4-bit codes with vpshufb over the table's
// bytes (fp16 tables, or a shared fp32 table; fp32 per-group tables take two vpermps halves blended
// on the code's top bit); AVX-512 uses one vpermps over all 16 entries. 2- and 3-bit tables are
// repeated to fill the register, so the bits above a code (its neighbours) never need masking. Up
// to 4 activation rows share one decoded weight vector; more rows (up to kMaxRows) loop over
// blocks of 4. Measured on a Zen 3 core (AVX2), the lookups, not the memory, bound a single row:
// about 12 G weights/s for 2, 3 and 4 bits.
//
// Kept outliers (CSR, QuantizedWeight.outliers) are added row by row in the same pass:
// y[m, n] += sum_j val[j] * x[m, col[j]].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int64_t kPad = 8;       // zero bytes the caller appends to the code stream
constexpr int64_t kMaxRows = 16;  // rows lut_gemv takes; more rows dequantize tiles for the BLAS GEMM
constexpr int kBlock = 4;         // activation rows that share one decoded weight vector

// Loops over the register arrays (rows, sums) unrolled early, so that the arrays stay in registers:
// GCC otherwise keeps them on the stack and stores every one on every step.
#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

struct Lut {
  const uint8_t* codes;         // the bit stream, padded
  const at::Half* half_tables;  // [N, G, L] per row / group: one of these two,
  const float* float_tables;    // or both null with `shared`
  const float* shared;          // [L]: the shared codebook, times the group's scale
  const at::Half* half_scales;  // [N, G] with `shared`: one of these two
  const float* float_scales;
  const int32_t* crow;  // outliers: [N + 1], [nnz], [nnz]; null when none
  const int32_t* col;
  const float* val;
  int64_t N, K, bits, L, group, G;
};

inline float scale_of(const Lut& p, int64_t i) {
  return p.half_scales ? static_cast<float>(p.half_scales[i]) : p.float_scales[i];
}

// Code i of the stream: bits <= 8, so it lies within the two bytes from bit i * bits.
inline uint32_t code_at(const uint8_t* codes, int64_t i, int64_t bits) {
  const int64_t bit = i * bits;
  const uint32_t two = codes[bit >> 3] | (static_cast<uint32_t>(codes[(bit >> 3) + 1]) << 8);
  return (two >> (bit & 7)) & ((1u << bits) - 1);
}

// Row n's group g as fp32 values t[0, L).
inline void table_of(const Lut& p, int64_t n, int64_t g, float* t) {
  const int64_t at = (n * p.G + g) * p.L;
  if (p.half_tables) {
    for (int64_t i = 0; i < p.L; ++i) t[i] = static_cast<float>(p.half_tables[at + i]);
  } else if (p.float_tables) {
    for (int64_t i = 0; i < p.L; ++i) t[i] = p.float_tables[at + i];
  } else {
    const float s = scale_of(p, n * p.G + g);
    for (int64_t i = 0; i < p.L; ++i) t[i] = p.shared[i] * s;
  }
}

// Scalar products of row n over columns [k0, k1) (inside one group, table t) for rows [m0, m0 + mb).
inline void scalar_span(const Lut& p, const float* t, const float* x, int64_t n, int64_t m0, int mb, int64_t k0,
                        int64_t k1, float* sums) {
  const int64_t base = n * p.K;
  for (int64_t k = k0; k < k1; ++k) {
    const float w = t[code_at(p.codes, base + k, p.bits)];
    for (int m = 0; m < mb; ++m) sums[m] += w * x[(m0 + m) * p.K + k];
  }
}

// ------------------------------------------------------------------ portable C++

// Row n over columns [c0, c1) for activation rows [m0, m0 + mb): the sums are added to y.
void row_portable(const Lut& p, const float* x, const float*, float* y, int64_t n, int64_t m0, int mb, int64_t c0,
                  int64_t c1) {
  float t[256];
  float sums[kBlock] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t g = c0 / p.group; g * p.group < c1; ++g) {
    table_of(p, n, g, t);
    scalar_span(p, t, x, n, m0, mb, std::max(c0, g * p.group), std::min(c1, (g + 1) * p.group), sums);
  }
  for (int m = 0; m < mb; ++m) y[(m0 + m) * p.N + n] += sums[m];
}

// The column order of the AVX2 byte-lookup path (below), kept outside it: plain C++.
enum Planes : int { kHalfPlanes = 0, kFloatPlanes = 1 };

// Column (within a chunk of 32) of lane e of weight vector v, for each kind of planes.
inline int chunk_order(int planes, int v, int e) {
  if (planes == kHalfPlanes) return (v >> 1) * 16 + 2 * e + (v & 1);
  return 2 * (4 * v + e % 4) + e / 4;
}

void interleave32(const float* x, float* xi, int64_t M, int64_t K, int planes) {
  int order[32];
  LOWBIT_UNROLL for (int v = 0; v < 4; ++v)
    for (int e = 0; e < 8; ++e) order[8 * v + e] = chunk_order(planes, v, e);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = xi + m * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
      for (int j = 0; j < 32; ++j) dst[k + j] = src[k + order[j]];
    for (; k < K; ++k) dst[k] = src[k];
  }
}

#ifdef LOWBIT_X86
// ------------------------------------------------------------------ AVX2 + FMA + F16C
// A chunk is 8 codes (bits bytes, byte-aligned when K * bits is a multiple of 8): the 32 bits from
// its first byte are broadcast and shifted per lane so that lane j holds code j in its low bits.

struct Avx2Table {
  __m256 lo, hi;  // 4 bits: entries 0-7 and 8-15; 3 bits: lo only; 2 bits: lo = entries 0-3 twice
};

LOWBIT_AVX2 inline __m256 load8(const Lut& p, const void* at, bool half) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(at)))
              : _mm256_loadu_ps(static_cast<const float*>(at));
}

LOWBIT_AVX2 inline __m128 load4(const void* at, bool half) {
  return half ? _mm_cvtph_ps(_mm_loadl_epi64(static_cast<const __m128i*>(at)))
              : _mm_loadu_ps(static_cast<const float*>(at));
}

// The L values at `at` (fp16 or fp32) laid out for the lookups.
LOWBIT_AVX2 inline Avx2Table avx2_load(const Lut& p, const void* at, bool half) {
  Avx2Table t;
  if (p.bits == 2) {
    const __m128 a = load4(at, half);
    t.lo = _mm256_set_m128(a, a);
    t.hi = t.lo;
  } else {
    t.lo = load8(p, at, half);
    t.hi = p.bits == 4 ? load8(p, static_cast<const char*>(at) + 8 * (half ? 2 : 4), half) : t.lo;
  }
  return t;
}

LOWBIT_AVX2 inline Avx2Table avx2_table(const Lut& p, const Avx2Table& shared, int64_t n, int64_t g) {
  const int64_t at = (n * p.G + g) * p.L;
  if (p.half_tables) return avx2_load(p, p.half_tables + at, true);
  if (p.float_tables) return avx2_load(p, p.float_tables + at, false);
  const int64_t i = n * p.G + g;
  const __m256 s = _mm256_set1_ps(p.half_scales ? _cvtsh_ss(p.half_scales[i].x) : p.float_scales[i]);
  return {_mm256_mul_ps(shared.lo, s), _mm256_mul_ps(shared.hi, s)};
}

template <int BITS>
LOWBIT_AVX2 inline __m256 avx2_lookup(const uint8_t* at, const Avx2Table& t) {
  const __m256i word = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(at)));
  const __m256i shift = BITS == 4   ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                        : BITS == 3 ? _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)
                                    : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i idx = _mm256_srlv_epi32(word, shift);  // vpermps reads the low 3 bits of each lane
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
  if (BITS != 4) return lo;
  // the code's top bit (bit 3) moved to the sign bit picks the upper half
  const __m256i top = _mm256_sllv_epi32(word, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
  return _mm256_blendv_ps(lo, _mm256_permutevar8x32_ps(t.hi, idx), _mm256_castsi256_ps(top));
}

LOWBIT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS, int MB>
LOWBIT_AVX2 void row_avx2(const Lut& p, const float* x, const float*, float* y, int64_t n, int64_t m0, int,
                          int64_t c0, int64_t c1) {
  constexpr int kAcc = MB == 1 ? 4 : 2;  // chunks per step, each with its own sums: hides the FMA latency
  const int64_t K = p.K;
  const uint8_t* row = p.codes + n * K * BITS / 8;
  Avx2Table shared{};
  if (!p.half_tables && !p.float_tables) shared = avx2_load(p, p.shared, false);
  __m256 acc[MB][kAcc];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
  float sums[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) sums[m] = 0.f;
  const float* xr = x + m0 * K;
  for (int64_t g = c0 / p.group; g * p.group < c1; ++g) {
    const Avx2Table t = avx2_table(p, shared, n, g);
    const int64_t k0 = std::max(c0, g * p.group), k1 = std::min(c1, (g + 1) * p.group);
    int64_t ka = std::min(k1, (k0 + 7) & ~int64_t{7}), kb = std::max(ka, k1 & ~int64_t{7});
    if (ka > k0 || kb < k1) {  // codes outside whole chunks (a group boundary inside a chunk)
      alignas(32) float tt[16];
      _mm256_store_ps(tt, t.lo);
      _mm256_store_ps(tt + 8, t.hi);
      scalar_span(p, tt, x, n, m0, MB, k0, ka, sums);
      scalar_span(p, tt, x, n, m0, MB, kb, k1, sums);
    }
    // pointers stepped in the loops: index arithmetic would cost more than the lookups
    const uint8_t* cp = row + ka / 8 * BITS;
    const float* xp = xr + ka;
    int64_t k = ka;
    for (; k + 8 * kAcc <= kb; k += 8 * kAcc, cp += BITS * kAcc, xp += 8 * kAcc) {
      __m256 w[kAcc];
      LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) w[a] = avx2_lookup<BITS>(cp + BITS * a, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a)
          acc[m][a] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(xp + m * K + 8 * a), acc[m][a]);
    }
    for (; k < kb; k += 8, cp += BITS, xp += 8) {
      const __m256 w0 = avx2_lookup<BITS>(cp, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + m * K), acc[m][0]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    __m256 sum = acc[m][0];
    for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
    y[(m0 + m) * p.N + n] += hsum(sum) + sums[m];
  }
}

// 4-bit codes with fp16 tables or a shared table (the common case) take byte lookups instead: a
// chunk is 32 codes (16 bytes), their nibbles byte indices for vpshufb over the table's bytes
// held as planes (plane b: byte b of each of the 16 entries, in both 128-bit lanes). fp16 tables
// need two planes, and vcvtph2ps turns the looked-up halves into fp32; a shared fp32 table needs
// four, interleaved back into floats, and the group's scale multiplies the group's sum (the same
// products to fp32 rounding). The lookups yield a fixed permutation of the chunk's columns (see
// chunk_order), which the activations are put in once per call.

// The two byte planes of 16 fp16 entries.
LOWBIT_AVX2 inline void half_planes(const at::Half* t, __m256i* planes) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12,
                                         14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xD8);  // [lo 0-15 | hi 0-15]
  planes[0] = _mm256_permute2x128_si256(q, q, 0x00);
  planes[1] = _mm256_permute2x128_si256(q, q, 0x11);
}

// The four byte planes of 16 fp32 entries (once per row: not on the hot path).
LOWBIT_AVX2 inline void float_planes(const float* t, __m256i* planes) {
  uint8_t bytes[64], plane[16];
  std::memcpy(bytes, t, 64);
  for (int b = 0; b < 4; ++b) {
    for (int i = 0; i < 16; ++i) plane[i] = bytes[4 * i + b];
    planes[b] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(plane)));
  }
}

template <int PLANES>
LOWBIT_AVX2 inline void nibble_lookup(const uint8_t* at, const __m256i* planes, __m256* w) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  // lane 0: the low nibbles (even columns), lane 1: the high nibbles (odd columns)
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0F));
  if (PLANES == kHalfPlanes) {
    const __m256i lo = _mm256_shuffle_epi8(planes[0], idx), hi = _mm256_shuffle_epi8(planes[1], idx);
    const __m256i h0 = _mm256_unpacklo_epi8(lo, hi), h1 = _mm256_unpackhi_epi8(lo, hi);
    w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h0));
    w[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1));
    w[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(h1));
    w[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1));
  } else {
    const __m256i b0 = _mm256_shuffle_epi8(planes[0], idx), b1 = _mm256_shuffle_epi8(planes[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(planes[2], idx), b3 = _mm256_shuffle_epi8(planes[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  }
}

// One chunk of 32 codes times MB activation rows (K apart), into each row's kAcc sums.
template <int PLANES, int MB, int kAcc>
LOWBIT_AVX2 inline void nibble_chunk(const uint8_t* cp, const __m256i* planes, const float* xp, int64_t K,
                                     __m256 (*acc)[kAcc]) {
  __m256 w[4];
  nibble_lookup<PLANES>(cp, planes, w);
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    LOWBIT_UNROLL for (int v = 0; v < 4; ++v)
      acc[m][v % kAcc] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xp + m * K + 8 * v), acc[m][v % kAcc]);
}

template <int PLANES, int MB>
LOWBIT_AVX2 void row_nibble_avx2(const Lut& p, const float* x, const float* xi, float* y, int64_t n, int64_t m0, int,
                                 int64_t c0, int64_t c1) {
  constexpr int kAcc = MB == 1 ? 4 : 2;  // independent sums per row: enough to hide the FMA latency
  const int64_t K = p.K;
  const uint8_t* row = p.codes + n * K / 2;
  __m256i planes[4];
  alignas(32) float tt[16];
  if (PLANES == kFloatPlanes) {
    float_planes(p.shared, planes);
    std::memcpy(tt, p.shared, sizeof tt);
  }
  __m256 total[MB], acc[MB][kAcc];
  float sums[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps(), sums[m] = 0.f;
  const float* xr = xi + m0 * K;
  bool started = false;
  for (int64_t g = c0 / p.group; g * p.group < c1; ++g) {
    float s = 1.f;
    if (PLANES == kHalfPlanes) {
      half_planes(p.half_tables + (n * p.G + g) * 16, planes);
    } else {
      s = p.half_scales ? _cvtsh_ss(p.half_scales[n * p.G + g].x) : p.float_scales[n * p.G + g];
    }
    const int64_t k0 = std::max(c0, g * p.group), k1 = std::min(c1, (g + 1) * p.group);
    const int64_t ka = std::min(k1, (k0 + 31) & ~int64_t{31}), kb = std::max(ka, k1 & ~int64_t{31});
    if (ka > k0 || kb < k1) {  // codes outside whole chunks: scalar, with the group's values
      float part[MB];
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) part[m] = 0.f;
      float vals[16];
      if (PLANES == kHalfPlanes) {
        for (int i = 0; i < 16; ++i) vals[i] = static_cast<float>(p.half_tables[(n * p.G + g) * 16 + i]);
      } else {
        for (int i = 0; i < 16; ++i) vals[i] = tt[i] * s;
      }
      scalar_span(p, vals, x, n, m0, MB, k0, ka, part);
      scalar_span(p, vals, x, n, m0, MB, kb, k1, part);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) sums[m] += part[m];
    }
    if (ka >= kb) continue;
    // fp16 tables hold the weights themselves: the sums run on over the groups; a shared table's
    // group sums are scaled one by one
    if (PLANES == kFloatPlanes || !started) {
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
      started = true;
    }
    const uint8_t* cp = row + ka / 2;
    const float* xp = xr + ka;
    for (int64_t k = ka; k < kb; k += 32, cp += 16, xp += 32) {
      nibble_chunk<PLANES, MB, kAcc>(cp, planes, xp, K, acc);
    }
    if (PLANES == kFloatPlanes) {
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        __m256 sum = acc[m][0];
        LOWBIT_UNROLL for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
        total[m] = _mm256_fmadd_ps(sum, _mm256_set1_ps(s), total[m]);
      }
    }
  }
  if (PLANES == kHalfPlanes && started) {
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) total[m] = _mm256_add_ps(total[m], acc[m][a]);
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) y[(m0 + m) * p.N + n] += hsum(total[m]) + sums[m];
}

// Every group of [c0, c1) whole and a multiple of 32 columns (g32, g64, g128, ...): the lookups and products
// of row_avx2 / row_nibble_avx2 without their per-group bookkeeping (ragged spans, tails, the chunk bounds),
// which at 64 columns a group cost as much as the lookups (the same finding as row_avx512_whole).
template <int BITS, int MB>
LOWBIT_AVX2 void row_avx2_whole(const Lut& p, const float* x, const float*, float* y, int64_t n, int64_t m0, int,
                                int64_t c0, int64_t c1) {
  constexpr int kAcc = MB == 1 ? 4 : 2;
  const int64_t K = p.K;
  const uint8_t* cp = p.codes + n * K * BITS / 8 + c0 / 8 * BITS;
  Avx2Table shared{};
  if (!p.half_tables && !p.float_tables) shared = avx2_load(p, p.shared, false);
  __m256 acc[MB][kAcc];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
  const float* xp = x + m0 * K + c0;
  for (int64_t g = c0 / p.group, g1 = c1 / p.group; g < g1; ++g) {
    const Avx2Table t = avx2_table(p, shared, n, g);
    const uint8_t* end = cp + p.group / 8 * BITS;
    for (; cp < end; cp += BITS * kAcc, xp += 8 * kAcc) {
      __m256 w[kAcc];
      LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) w[a] = avx2_lookup<BITS>(cp + BITS * a, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a)
          acc[m][a] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(xp + m * K + 8 * a), acc[m][a]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    __m256 sum = acc[m][0];
    LOWBIT_UNROLL for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
    y[(m0 + m) * p.N + n] += hsum(sum);
  }
}

template <int PLANES, int MB>
LOWBIT_AVX2 void row_nibble_avx2_whole(const Lut& p, const float* x, const float* xi, float* y, int64_t n, int64_t m0,
                                       int, int64_t c0, int64_t c1) {
  (void)x;
  constexpr int kAcc = MB == 1 ? 4 : 2;
  const int64_t K = p.K;
  const uint8_t* cp = p.codes + n * K / 2 + c0 / 2;
  const float* xp = xi + m0 * K + c0;
  __m256i planes[4];
  if (PLANES == kFloatPlanes) float_planes(p.shared, planes);
  __m256 total[MB], acc[MB][kAcc];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    total[m] = _mm256_setzero_ps();
    LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
  }
  for (int64_t g = c0 / p.group, g1 = c1 / p.group; g < g1; ++g) {
    // fp16 tables hold the weights themselves: their sums run on over the groups; a shared table's group sums
    // are scaled one by one (the same products as row_nibble_avx2)
    if (PLANES == kHalfPlanes) half_planes(p.half_tables + (n * p.G + g) * 16, planes);
    const uint8_t* end = cp + p.group / 2;
    for (; cp < end; cp += 16, xp += 32) {
      nibble_chunk<PLANES, MB, kAcc>(cp, planes, xp, K, acc);
    }
    if (PLANES == kFloatPlanes) {
      const int64_t i = n * p.G + g;
      const __m256 sc = _mm256_set1_ps(p.half_scales ? _cvtsh_ss(p.half_scales[i].x) : p.float_scales[i]);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        __m256 sum = acc[m][0];
        LOWBIT_UNROLL for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
        total[m] = _mm256_fmadd_ps(sum, sc, total[m]);
        LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
      }
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    if (PLANES == kHalfPlanes)
      LOWBIT_UNROLL for (int a = 0; a < kAcc; ++a) total[m] = _mm256_add_ps(total[m], acc[m][a]);
    y[(m0 + m) * p.N + n] += hsum(total[m]);
  }
}

// ------------------------------------------------------------------ AVX-512
// A chunk is 16 codes. Lane 2j holds code j and lane 2j + 1 code 8 + j (the two halves of the
// chunk interleaved, which makes every width one broadcast and one shift), so the activations are
// interleaved the same way once per call (`xi`); vpermps reads the low 4 bits of each lane.

LOWBIT_AVX512 inline __m512 avx512_load(const Lut& p, const void* at, bool half) {
  if (p.bits == 4)
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(at)))
                : _mm512_loadu_ps(static_cast<const float*>(at));
  if (p.bits == 3) {
    const __m256 a = half ? _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(at)))
                          : _mm256_loadu_ps(static_cast<const float*>(at));
    return _mm512_insertf32x8(_mm512_castps256_ps512(a), a, 1);
  }
  const __m128 a = half ? _mm_cvtph_ps(_mm_loadl_epi64(static_cast<const __m128i*>(at)))
                        : _mm_loadu_ps(static_cast<const float*>(at));
  return _mm512_broadcast_f32x4(a);
}

LOWBIT_AVX512 inline __m512 avx512_table(const Lut& p, __m512 shared, int64_t n, int64_t g) {
  const int64_t at = (n * p.G + g) * p.L;
  if (p.half_tables) return avx512_load(p, p.half_tables + at, true);
  if (p.float_tables) return avx512_load(p, p.float_tables + at, false);
  const int64_t i = n * p.G + g;
  return _mm512_mul_ps(shared, _mm512_set1_ps(p.half_scales ? _cvtsh_ss(p.half_scales[i].x) : p.float_scales[i]));
}

template <int BITS>
LOWBIT_AVX512 inline __m512 avx512_lookup(const uint8_t* at, __m512 t) {
  __m512i word, shift;
  if (BITS == 4) {  // 64 bits: even lanes hold codes 0-7, odd lanes codes 8-15
    int64_t both;
    std::memcpy(&both, at, 8);
    word = _mm512_set1_epi64(both);
    shift = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  } else if (BITS == 3) {  // two 24-bit halves: bytes 0-2 to even lanes, bytes 3-5 to odd lanes
    int32_t lo, hi;
    std::memcpy(&lo, at, 4);
    std::memcpy(&hi, at + 3, 4);
    word = _mm512_mask_set1_epi32(_mm512_set1_epi32(lo), 0xAAAA, hi);
    shift = _mm512_setr_epi32(0, 0, 3, 3, 6, 6, 9, 9, 12, 12, 15, 15, 18, 18, 21, 21);
  } else {
    word = _mm512_castps_si512(_mm512_set1_ps(*reinterpret_cast<const float*>(at)));
    shift = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  }
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(word, shift), t);
}

// SCALED (a shared table times each group's scale: nf4, fp4, the grids): the lookups read the shared
// table itself and each group's sums are multiplied by its scale once, so no lookup waits on the
// scale's load and conversion (the same products to fp32 rounding, as on the AVX2 byte path).
template <int BITS, int MB, bool SCALED>
LOWBIT_AVX512 void row_avx512(const Lut& p, const float* x, const float* xi, float* y, int64_t n, int64_t m0, int,
                              int64_t c0, int64_t c1) {
  const int64_t K = p.K;
  const uint8_t* row = p.codes + n * K * BITS / 8;
  __m512 shared = _mm512_setzero_ps();
  if (!p.half_tables && !p.float_tables) shared = avx512_load(p, p.shared, false);
  // four accumulators per activation row: one row's FMAs would otherwise wait on each other's latency
  __m512 a0[MB], a1[MB], a2[MB], a3[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();
  float sums[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) sums[m] = 0.f;
  const float* xr = xi + m0 * K;
  __m512 b0[MB], b1[MB], b2[MB], b3[MB];  // SCALED: the group's own sums
  for (int64_t g = c0 / p.group; g * p.group < c1; ++g) {
    const __m512 t = SCALED ? shared : avx512_table(p, shared, n, g);
    const int64_t k0 = std::max(c0, g * p.group), k1 = std::min(c1, (g + 1) * p.group);
    int64_t ka = std::min(k1, (k0 + 15) & ~int64_t{15}), kb = std::max(ka, k1 & ~int64_t{15});
    if (ka > k0 || kb < k1) {
      alignas(64) float tt[16];
      _mm512_store_ps(tt, SCALED ? avx512_table(p, shared, n, g) : t);
      scalar_span(p, tt, x, n, m0, MB, k0, ka, sums);
      scalar_span(p, tt, x, n, m0, MB, kb, k1, sums);
    }
    if (SCALED) {
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) b0[m] = b1[m] = b2[m] = b3[m] = _mm512_setzero_ps();
    }
    __m512* c0a = SCALED ? b0 : a0;
    __m512* c1a = SCALED ? b1 : a1;
    __m512* c2a = SCALED ? b2 : a2;
    __m512* c3a = SCALED ? b3 : a3;
    const uint8_t* cp = row + ka / 8 * BITS;
    const float* xp = xr + ka;
    int64_t k = ka;
    for (; k + 64 <= kb; k += 64, cp += 8 * BITS, xp += 64) {
      const __m512 w0 = avx512_lookup<BITS>(cp, t);
      const __m512 w1 = avx512_lookup<BITS>(cp + 2 * BITS, t);
      const __m512 w2 = avx512_lookup<BITS>(cp + 4 * BITS, t);
      const __m512 w3 = avx512_lookup<BITS>(cp + 6 * BITS, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        c0a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * K), c0a[m]);
        c1a[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + m * K + 16), c1a[m]);
        c2a[m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + m * K + 32), c2a[m]);
        c3a[m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + m * K + 48), c3a[m]);
      }
    }
    for (; k + 32 <= kb; k += 32, cp += 4 * BITS, xp += 32) {
      const __m512 w0 = avx512_lookup<BITS>(cp, t);
      const __m512 w1 = avx512_lookup<BITS>(cp + 2 * BITS, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        c0a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * K), c0a[m]);
        c1a[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + m * K + 16), c1a[m]);
      }
    }
    if (k < kb) {
      const __m512 w0 = avx512_lookup<BITS>(cp, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) c0a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * K), c0a[m]);
    }
    if (SCALED) {
      const int64_t i = n * p.G + g;
      const __m512 sc = _mm512_set1_ps(p.half_scales ? _cvtsh_ss(p.half_scales[i].x) : p.float_scales[i]);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
        a0[m] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(b0[m], b1[m]), _mm512_add_ps(b2[m], b3[m])), sc, a0[m]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m]));
    y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(acc) + sums[m];
  }
}

// Every group of [c0, c1) whole and a multiple of 64 columns (per-channel rows, g64, g128, ...): the same
// lookups and products as row_avx512 without its per-group bookkeeping (ragged spans, tails), which cost
// about as much as the lookups themselves at 64 columns a group. Each group's table is avx512_table's: the
// stored values, or for nf4 / fp4 and the grids the shared table times the group's scale, the products
// QuantizedWeight.dequantize forms; so the lookups give the dequantized weights exactly.
template <int BITS, int MB>
LOWBIT_AVX512 void row_avx512_whole(const Lut& p, const float* x, const float* xi, float* y, int64_t n, int64_t m0,
                                    int, int64_t c0, int64_t c1) {
  (void)x;
  const int64_t K = p.K;
  const uint8_t* cp = p.codes + n * K * BITS / 8 + c0 / 8 * BITS;
  __m512 shared = _mm512_setzero_ps();
  if (!p.half_tables && !p.float_tables) shared = avx512_load(p, p.shared, false);
  __m512 a0[MB], a1[MB], a2[MB], a3[MB];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();
  const float* xp = xi + m0 * K + c0;
  for (int64_t g = c0 / p.group, g1 = c1 / p.group; g < g1; ++g) {
    const __m512 t = avx512_table(p, shared, n, g);
    const uint8_t* end = cp + p.group / 8 * BITS;
    for (; cp < end; cp += 8 * BITS, xp += 64) {
      const __m512 w0 = avx512_lookup<BITS>(cp, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * K), a0[m]);
      const __m512 w1 = avx512_lookup<BITS>(cp + 2 * BITS, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + m * K + 16), a1[m]);
      const __m512 w2 = avx512_lookup<BITS>(cp + 4 * BITS, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a2[m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + m * K + 32), a2[m]);
      const __m512 w3 = avx512_lookup<BITS>(cp + 6 * BITS, t);
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) a3[m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + m * K + 48), a3[m]);
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m]));
    y[(m0 + m) * p.N + n] += _mm512_reduce_add_ps(acc);
  }
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

int64_t resolve_isa(int64_t isa) {
  static const int64_t best = isa_available(kAvx512) ? kAvx512 : isa_available(kAvx2) ? kAvx2 : kPortable;
  if (isa < 0) return best;
  TORCH_CHECK(isa_available(isa), "lowbit's LUT kernel cannot run instruction set ", isa, " on this CPU");
  return isa;
}

using RowFn = void (*)(const Lut&, const float*, const float*, float*, int64_t, int64_t, int, int64_t, int64_t);

// The byte-lookup planes the AVX2 path uses for this weight (-1: none, vpermps lookups instead).
int nibble_planes(const Lut& p, int64_t isa) {
  if (isa != kAvx2 || p.bits != 4) return -1;
  return p.half_tables ? kHalfPlanes : p.shared ? kFloatPlanes : -1;
}

template <int MB>
RowFn row_fn(const Lut& p, int64_t isa) {
#ifdef LOWBIT_X86
  const int64_t bits = p.bits;
  if (isa == kAvx512) {
    if (!p.half_tables && !p.float_tables)
      return bits == 4 ? row_avx512<4, MB, true> : bits == 3 ? row_avx512<3, MB, true> : row_avx512<2, MB, true>;
    return bits == 4 ? row_avx512<4, MB, false> : bits == 3 ? row_avx512<3, MB, false> : row_avx512<2, MB, false>;
  }
  const int planes = nibble_planes(p, isa);
  if (planes >= 0) return planes == kHalfPlanes ? row_nibble_avx2<kHalfPlanes, MB> : row_nibble_avx2<kFloatPlanes, MB>;
  if (isa == kAvx2) return bits == 4 ? row_avx2<4, MB> : bits == 3 ? row_avx2<3, MB> : row_avx2<2, MB>;
#endif
  (void)p;
  (void)isa;
  return row_portable;
}

// Whether a whole-group loop (row_avx512_whole, row_avx2_whole, row_nibble_avx2_whole) runs this weight.
// AVX-512: groups of 64 or 128 columns, with a shared table (nf4, fp4, the grids) or 3-bit codes. Measured on
// Zen 4 (one thread, 4096 x 4096): nf4 g64 1.29 -> 0.80 ms, bcq3 g128 1.18 -> 0.90 ms; per-channel rows and
// groups of 512 ran slower on it (0.64 -> 1.17 ms), and so did 4-bit per-group tables (lut4 g128 1.05 ->
// 1.11-1.36 ms), so those keep row_avx512. AVX2 (one activation row; see whole_fn): groups of a multiple of 32
// columns up to 128. Measured on Zen 4 with the AVX2 path forced (one thread, 4096 x 4096, x fp32 before -> after):
// lut4 g128 2.39 -> 2.87x, nf4 g64 1.97 -> 2.83x, bcq3 g128 2.80 -> 4.25x, bcq4 g128 2.38 -> 2.92x.
bool whole_groups(const Lut& p, int64_t isa) {
  if (isa == kAvx2) return p.group % 32 == 0 && p.group <= 128;
  return isa == kAvx512 && (p.group == 64 || p.group == 128) && (p.shared || p.bits == 3);
}

// The whole-group loop for mb rows (the caller checked that every group of the column block is whole).
template <int MB>
RowFn whole_fn(const Lut& p, int64_t isa) {
#ifdef LOWBIT_X86
  const int64_t bits = p.bits;
  if (isa == kAvx2) {
    // with more rows the per-group loop keeps up: measured at 4 rows, 4-bit tables ran 10-15% slower whole
    if constexpr (MB > 1) {
      return row_fn<MB>(p, isa);
    } else {
      const int planes = nibble_planes(p, isa);
      if (planes >= 0)
        return planes == kHalfPlanes ? row_nibble_avx2_whole<kHalfPlanes, 1> : row_nibble_avx2_whole<kFloatPlanes, 1>;
      return bits == 4 ? row_avx2_whole<4, 1> : bits == 3 ? row_avx2_whole<3, 1> : row_avx2_whole<2, 1>;
    }
  }
  return bits == 4 ? row_avx512_whole<4, MB> : bits == 3 ? row_avx512_whole<3, MB> : row_avx512_whole<2, MB>;
#else
  (void)p;
  (void)isa;
  return row_portable;
#endif
}

RowFn whole_fn_for(int mb, const Lut& p, int64_t isa) {
  switch (mb) {
    case 1: return whole_fn<1>(p, isa);
    case 2: return whole_fn<2>(p, isa);
    case 3: return whole_fn<3>(p, isa);
    default: return whole_fn<4>(p, isa);
  }
}

RowFn row_fn_for(int mb, const Lut& p, int64_t isa) {
  switch (mb) {
    case 1: return row_fn<1>(p, isa);
    case 2: return row_fn<2>(p, isa);
    case 3: return row_fn<3>(p, isa);
    default: return row_fn<4>(p, isa);
  }
}

void check_layout(const torch::Tensor& codes, const torch::Tensor& table, const c10::optional<torch::Tensor>& scale,
                  int64_t N, int64_t K, int64_t bits, int64_t group) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2 to 8, got ", bits);
  TORCH_CHECK(group > 0 && N >= 0 && K >= 0, "invalid layout: N ", N, ", K ", K, ", group ", group);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(codes.numel() >= (N * K * bits + 7) / 8 + kPad, "codes must hold the packed stream and ", kPad,
              " bytes of padding");
  TORCH_CHECK(table.is_contiguous(), "the table must be contiguous");
  const int64_t L = int64_t{1} << bits, G = (K + group - 1) / group;
  if (scale.has_value()) {
    TORCH_CHECK(table.scalar_type() == torch::kFloat && table.numel() == L, "a shared table is fp32 [", L, "]");
    TORCH_CHECK(scale->is_contiguous() && scale->numel() == N * G, "scales must be contiguous [", N, ", ", G, "]");
    TORCH_CHECK(scale->scalar_type() == torch::kHalf || scale->scalar_type() == torch::kFloat, "scales: fp16 or fp32");
  } else {
    TORCH_CHECK(table.numel() == N * G * L, "tables must be [", N, ", ", G, ", ", L, "]");
    TORCH_CHECK(table.scalar_type() == torch::kHalf || table.scalar_type() == torch::kFloat, "tables: fp16 or fp32");
  }
}

Lut make_lut(const torch::Tensor& codes, const torch::Tensor& table, const c10::optional<torch::Tensor>& scale,
             int64_t N, int64_t K, int64_t bits, int64_t group) {
  check_layout(codes, table, scale, N, K, bits, group);
  Lut p{};
  p.codes = codes.data_ptr<uint8_t>();
  if (scale.has_value()) {
    p.shared = table.data_ptr<float>();
    if (scale->scalar_type() == torch::kHalf) p.half_scales = scale->data_ptr<at::Half>();
    else p.float_scales = scale->data_ptr<float>();
  } else if (table.scalar_type() == torch::kHalf) {
    p.half_tables = table.data_ptr<at::Half>();
  } else {
    p.float_tables = table.data_ptr<float>();
  }
  p.N = N, p.K = K, p.bits = bits, p.L = int64_t{1} << bits, p.group = group, p.G = (K + group - 1) / group;
  return p;
}

void set_outliers(Lut& p, const c10::optional<torch::Tensor>& crow, const c10::optional<torch::Tensor>& col,
                  const c10::optional<torch::Tensor>& val) {
  if (!crow.has_value()) return;
  TORCH_CHECK(col.has_value() && val.has_value(), "outliers need crow, col and val");
  TORCH_CHECK(crow->scalar_type() == torch::kInt && crow->is_contiguous() && crow->numel() == p.N + 1,
              "outlier crow must be contiguous int32 [N + 1]");
  TORCH_CHECK(col->scalar_type() == torch::kInt && col->is_contiguous(), "outlier col must be contiguous int32");
  TORCH_CHECK(val->scalar_type() == torch::kFloat && val->is_contiguous() && val->numel() == col->numel(),
              "outlier val must be contiguous fp32, one per column");
  p.crow = crow->data_ptr<int32_t>();
  p.col = col->data_ptr<int32_t>();
  p.val = val->data_ptr<float>();
  TORCH_CHECK(p.crow[0] == 0 && p.crow[p.N] == val->numel(), "outlier crow does not span the values");
}

inline void add_outliers(const Lut& p, const float* x, float* y, int64_t M, int64_t n) {
  const int32_t j0 = p.crow[n], j1 = p.crow[n + 1];
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * p.K;
    float s[4] = {0.f, 0.f, 0.f, 0.f};  // four sums: the adds do not wait on each other
    int32_t j = j0;
    for (; j + 4 <= j1; j += 4)
      for (int u = 0; u < 4; ++u) s[u] += p.val[j + u] * xm[p.col[j + u]];
    for (; j < j1; ++j) s[0] += p.val[j] * xm[p.col[j]];
    y[m * p.N + n] += (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// The activations with each whole chunk of 16 columns interleaved as the AVX-512 lookups produce
// the weights: position 2j holds column j, position 2j + 1 column 8 + j.
void interleave16(const float* x, float* xi, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = xi + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int j = 0; j < 8; ++j) dst[k + 2 * j] = src[k + j], dst[k + 2 * j + 1] = src[k + 8 + j];
    for (; k < K; ++k) dst[k] = src[k];
  }
}

}  // namespace

// y = x @ W^T (+ bias) (+ x @ S^T for the outliers S) for x fp32 [M, K], M <= kMaxRows.
torch::Tensor lut_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor table, c10::optional<torch::Tensor> scale,
                       c10::optional<torch::Tensor> crow, c10::optional<torch::Tensor> col,
                       c10::optional<torch::Tensor> val, c10::optional<torch::Tensor> bias, int64_t N, int64_t bits,
                       int64_t group, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= kMaxRows, "lut_gemv takes at most ", kMaxRows, " rows, got ", M);
  Lut p = make_lut(codes, table, scale, N, K, bits, group);
  set_outliers(p, crow, col, val);
  isa = resolve_isa(isa);
  // the SIMD paths read whole chunks from byte boundaries: every row must start on one
  if (bits > 4 || (K * bits) % 8 != 0) isa = kPortable;
  x = x.contiguous();
  torch::Tensor y;
  if (bias.has_value()) {  // the kernels add into y: starting from the bias fuses it
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N, "bias must be fp32 [N]");
    y = bias->reshape({1, N}).repeat({M, 1});
  } else {
    y = torch::zeros({M, N}, x.options());
  }
  if (M == 0 || N == 0) return y;
  const float* px = x.data_ptr<float>();
  const float* pxi = px;
  thread_local std::vector<float> interleaved;
  if (isa == kAvx512 || nibble_planes(p, isa) >= 0) {
    interleaved.resize(static_cast<size_t>(M * K));
    if (isa == kAvx512) interleave16(px, interleaved.data(), M, K);
    else interleave32(px, interleaved.data(), M, K, nibble_planes(p, isa));
    pxi = interleaved.data();
  }
  float* py = y.data_ptr<float>();
  RowFn full = row_fn_for(kBlock, p, isa), rest = row_fn_for(static_cast<int>(M % kBlock), p, isa);
  if (whole_groups(p, isa) && K % group == 0) {
    full = whole_fn_for(kBlock, p, isa);
    rest = whole_fn_for(static_cast<int>(M % kBlock), p, isa);
  }
  // whole rows, one after another: the codes stream in order, which the hardware prefetchers follow. Blocks
  // of columns that kept every activation row in L1 read each weight row in slices instead and measured up to
  // twice as slow from 3 rows on (Zen 4, one thread, 4096 x 4096: bcq3 g128 at 4 rows 4.13 -> 2.90 ms, lut4
  // g128 7.74 -> 4.49 ms; at 8 rows 10.3 -> 5.6 ms and 13.3 -> 6.1 ms); the activations come from L2 instead.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + kBlock <= M; m += kBlock) full(p, px, pxi, py, n, m, kBlock, 0, K);
      if (m < M) rest(p, px, pxi, py, n, m, static_cast<int>(M - m), 0, K);
    }
    if (p.crow)
      for (int64_t n = n0; n < n1; ++n) add_outliers(p, px, py, M, n);
  });
  return y;
}

// The dense part of weight rows [n0, n1) as fp32 [n1 - n0, K] (no outliers): what
// QuantizedWeight.dequantize gives before the outliers are added, bit for bit.
torch::Tensor lut_dequant(torch::Tensor codes, torch::Tensor table, c10::optional<torch::Tensor> scale, int64_t N,
                          int64_t K, int64_t bits, int64_t group, int64_t n0, int64_t n1) {
  const Lut p = make_lut(codes, table, scale, N, K, bits, group);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "row range out of bounds");
  auto out = torch::empty({n1 - n0, K}, torch::dtype(torch::kFloat));
  float* po = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    float t[256];
    for (int64_t n = a; n < b; ++n) {
      float* dst = po + (n - n0) * K;
      for (int64_t g = 0; g < p.G; ++g) {
        table_of(p, n, g, t);
        const int64_t k1 = std::min(K, (g + 1) * group);
        for (int64_t k = g * group; k < k1; ++k) dst[k] = t[code_at(p.codes, n * K + k, bits)];
      }
    }
  });
  return out;
}

// y[m, n] += sum_j val[j] * x[m, col[j]] over row n's outliers (CSR), in place; returns y.
torch::Tensor csr_add(torch::Tensor y, torch::Tensor x, torch::Tensor crow, torch::Tensor col, torch::Tensor val) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be contiguous fp32 [M, N]");
  Lut p{};
  p.N = y.size(1), p.K = x.size(1);
  set_outliers(p, crow, col, val);
  const int64_t M = x.size(0);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, p.N, 64, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) add_outliers(p, px, py, M, n);
  });
  return y;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"portable"};
  if (isa_available(kAvx2)) out.push_back("avx2");
  if (isa_available(kAvx512)) out.push_back("avx512");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemv", &lut_gemv, "look-up-table matmul for up to 16 rows (fp32 activations, outliers added)",
        py::arg("x"), py::arg("codes"), py::arg("table"), py::arg("scale"), py::arg("crow"), py::arg("col"),
        py::arg("val"), py::arg("bias"), py::arg("N"), py::arg("bits"), py::arg("group"), py::arg("isa"));
  m.def("lut_dequant", &lut_dequant, "dequantize rows of a look-up-table weight to fp32 (no outliers)");
  m.def("csr_add", &csr_add, "y += x @ S^T for sparse CSR outliers S, in place");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs the kernel with");
  m.def("max_rows", [] { return kMaxRows; }, "the most rows lut_gemv takes");
  m.def("pad_bytes", [] { return kPad; }, "zero bytes the code stream must be padded with");
}
