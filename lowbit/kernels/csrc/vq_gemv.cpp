// Vector-quantized matmul on CPUs (GPTVQ's weights, lowbit/formats/vector.py): y[m, n] = sum_k x[m, k] * W[n, k]
// with
//
//     W[n, v * D + c] = book[b(n, v)][q[n, v]][c],   c < D,
//
// vector v of row n (D consecutive columns) decoded from the codebook of its block (r rows by g columns).
//
// kernels/vq.py lays the indices out for this kernel once per weight (vq_units). A unit of 64 bytes holds R rows
// by P vectors, transposed so that one SIMD register holds one index per row: S-bit slots (S = 4, 6 or 8, the
// index width rounded up) as P = 8, 5 or 1 slots of a 32-bit word per row (R = 16 rows), or one byte per row for
// S = 8 (R = 64 rows). Units run (row block, chunk of P vectors, row group) so that the row groups of one
// codebook block are next to each other. Each group of g columns is padded to whole chunks (index 0) and so are
// the activations (zero columns, once per call), which keeps every chunk inside one codebook: the padded vector
// space has NVP = ng * gvp vectors per row. Where blocks are smaller than a row group, kernels/vq.py merges the
// codebooks a row group touches into one and offsets the slots into it, so every block here holds whole row
// groups (or there is only one).
//
// Decoding runs across rows: the 16 (or 64) indices of a unit's vector are looked up at once and each component
// is multiplied by the broadcast activation of its column. The tables are the codebooks in fp32 split by
// component ([book][D][2^S], entries past 2^(bits*D) zero), so the looked-up values are the dequantized weights
// exactly and the products accumulate in fp32: every path agrees with dequantize-then-matmul to fp32 rounding.
//
// - AVX-512: 4-bit slots with one vpermps over 16 entries, 6-bit slots with two vpermt2ps over 32 entries each
//   and a blend on the slot's bit 5; 8-bit slots (VBMI) with vpermt2b over the fp16 codebook's byte planes
//   (two 128-byte halves blended on bit 7), 64 rows a lookup, then vcvtph2ps. For one activation row, 2-D
//   codewords and blocks of at least 4 row groups, "pair tables" instead: per vector v the dot products
//   T_v[e] = book[e] . x[v] of all 2^S entries are formed once and shared by every row of the block, so one
//   lookup and one add cover 2 weights of 16 rows. GPTVQ's default block gives 2^(bits*D) rows per codebook,
//   as many rows as the tables have entries (64 for 3-bit weights).
// - AVX2: 8 rows at a time; 4-bit slots with vpermps over the two halves of each 16-entry table, blended on bit
//   3 (for one activation row and 2-D codewords over the pair table of each vector instead: 2.1x -> 4.5x fp32 on
//   one Zen 4 thread with the AVX2 path forced); wider slots gather: 2-D fp16 codewords as 32-bit (c0, c1) pairs (vpgatherdd, then vcvtph2ps), anything
//   else one fp32 component at a time.
// - Portable C++ for every layout, and the only path for 4-D codewords (their four tables per lookup would not
//   stay in registers) and for blocks that neither hold whole row groups nor merge into one codebook per row group.
//
// Up to kMaxRows activation rows run here, kBlock at a time sharing each decoded vector; more rows dequantize
// tiles for the BLAS GEMM (vq_dequant).

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
#define LOWBIT_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c")))
#endif

namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int64_t kMaxRows = 16;  // activation rows vq_gemv takes; more rows dequantize tiles for the GEMM
constexpr int kBlock = 4;         // activation rows that share one decoded vector
constexpr int64_t kUnit = 64;     // bytes per unit of indices

#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

struct Vq {
  const uint8_t* codes;   // the units
  const float* tables;    // [nbooks, D, E] fp32
  const uint8_t* planes;  // [nbooks, 2D, 256] byte planes of the fp16 codebook (S == 8), or null
  const int32_t* pairs;   // [nbooks, E] fp16 (c0, c1) pairs as 32-bit words (D == 2, fp16 books), or null
  int64_t N, K, D, S, E, R, P;  // E = 2^S table entries, R rows and P vectors a unit
  int64_t gv, gvp, ng, r;       // vectors per group (real, padded), groups, rows per codebook
  int64_t NVP, NC, NRG, rgpb;   // padded vectors per row, chunks per row, row groups, row groups per block
  bool simd;                    // every row group inside one codebook block (a SIMD path can run)
};

inline int64_t slots_per_word(int64_t S) { return S == 4 ? 8 : S == 6 ? 5 : 1; }

// Where the first unit of row group rg (chunk 0) starts, and the distance between its chunks.
inline int64_t unit_offset(const Vq& p, int64_t rg) {
  const int64_t b = rg / p.rgpb;
  return (b * p.rgpb * p.NC + (rg - b * p.rgpb)) * kUnit;
}

inline const uint8_t* unit0(const Vq& p, int64_t rg) { return p.codes + unit_offset(p, rg); }

inline int64_t chunk_stride(const Vq& p, int64_t rg) {
  const int64_t b = rg / p.rgpb;
  return std::min(p.rgpb, p.NRG - b * p.rgpb) * kUnit;
}

// Slot j of row i of a unit.
inline uint32_t slot(const Vq& p, const uint8_t* unit, int64_t i, int64_t j) {
  if (p.S == 8) return unit[i];
  uint32_t word;
  std::memcpy(&word, unit + 4 * i, 4);
  return (word >> (p.S * j)) & ((1u << p.S) - 1);
}

// ------------------------------------------------------------------ portable C++

// Rows of row group rg for activation rows [m0, m0 + mb): the sums are added to y.
void group_portable(const Vq& p, const float* xp, float* y, int64_t rg, int64_t m0, int mb) {
  const int64_t XW = p.NVP * p.D;
  const uint8_t* at = unit0(p, rg);
  const int64_t stride = chunk_stride(p, rg);
  for (int64_t i = 0; i < p.R && rg * p.R + i < p.N; ++i) {
    const int64_t n = rg * p.R + i;
    const int64_t book0 = n / p.r * p.ng;
    float sums[kBlock] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t c = 0; c < p.NC; ++c) {
      for (int64_t j = 0; j < p.P; ++j) {
        const int64_t v = c * p.P + j;
        const float* t = p.tables + (book0 + v / p.gvp) * p.D * p.E + slot(p, at + c * stride, i, j);
        for (int64_t d = 0; d < p.D; ++d)
          for (int m = 0; m < mb; ++m) sums[m] += t[d * p.E] * xp[(m0 + m) * XW + v * p.D + d];
      }
    }
    for (int m = 0; m < mb; ++m) y[(m0 + m) * p.N + n] += sums[m];
  }
}

#ifdef LOWBIT_X86
// ------------------------------------------------------------------ AVX2 + FMA + F16C

// Lanes = 8 rows. How the AVX2 path finds a vector's components: 4-bit slots look them up in registers (vpermps
// over the fp32 table's two halves of 8, blended on the slot's bit 3); wider slots gather, 2-D fp16 codewords
// as (c0, c1) pairs in one 32-bit word, anything else one fp32 component at a time.
enum Avx2Mode : int { kPermute = 0, kGatherPairs = 1, kGatherComps = 2 };

// The slot of vector j of rows [8h, 8h + 8) of a unit (bits above it left in place: callers mask or ignore them).
template <int S>
LOWBIT_AVX2 inline __m256i avx2_words(const uint8_t* unit, int h, int j) {
  if (S == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(unit + 8 * h)));
  return _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 32 * h)), S * j);
}

LOWBIT_AVX2 inline void avx2_add_rows(float* y, __m256 sum, int64_t valid) {
  alignas(32) float s[8];
  _mm256_store_ps(s, sum);
  for (int64_t i = 0; i < std::min<int64_t>(8, valid); ++i) y[i] += s[i];
}

// HB eighths of a row group per pass (as many as the 16 registers hold sums for). kGatherPairs: the lanes hold
// (row, component) and each row's sum is two neighbouring lanes, added at the end.
template <int S, int D, int MODE, int MB>
LOWBIT_AVX2 void group_avx2(const Vq& p, const float* xp, float* y, int64_t rg, int64_t m0, int) {
  constexpr int P = S == 4 ? 8 : S == 6 ? 5 : 1, E = 1 << S, R = S == 8 ? 64 : 16;
  constexpr int HB = std::max(1, std::min(R / 8, 4 / MB));
  const int64_t XW = p.NVP * D;
  const uint8_t* at = unit0(p, rg);
  const int64_t stride = chunk_stride(p, rg);
  const int64_t book0 = rg / p.rgpb * p.ng;  // the layout's blocks are the codebooks' here
  for (int h0 = 0; h0 < R / 8 && rg * R + 8 * h0 < p.N; h0 += HB) {
    __m256 acc[MB][HB][2];
    LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
      LOWBIT_UNROLL for (int h = 0; h < HB; ++h) acc[m][h][0] = acc[m][h][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.ng; ++g) {
      const float* tables = p.tables + (book0 + g) * D * E;
      const int* pairs = MODE == kGatherPairs ? p.pairs + (book0 + g) * E : nullptr;
      __m256 t[D][2];
      if (MODE == kPermute)
        LOWBIT_UNROLL for (int d = 0; d < D; ++d) t[d][0] = _mm256_loadu_ps(tables + d * E), t[d][1] = _mm256_loadu_ps(tables + d * E + 8);
      for (int64_t c = g * p.gvp / P; c < (g + 1) * p.gvp / P; ++c) {
        const uint8_t* unit = at + c * stride;
        const float* xv = xp + m0 * XW + c * P * D;
        LOWBIT_UNROLL for (int j = 0; j < P; ++j) {
          LOWBIT_UNROLL for (int h = 0; h < HB; ++h) {
            const __m256i words = avx2_words<S>(unit, h0 + h, j);
            if (MODE == kGatherPairs) {
              const __m256i w = _mm256_i32gather_epi32(pairs, _mm256_and_si256(words, _mm256_set1_epi32(E - 1)), 4);
              const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(w)), hi = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
              LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
                // (x[2v], x[2v + 1]) in every pair of lanes
                const __m256 xx = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xv + m * XW + 2 * j)));
                acc[m][h][0] = _mm256_fmadd_ps(lo, xx, acc[m][h][0]);
                acc[m][h][1] = _mm256_fmadd_ps(hi, xx, acc[m][h][1]);
              }
            } else {
              const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(words, 28));  // bit 3 to the sign
              LOWBIT_UNROLL for (int d = 0; d < D; ++d) {
                const __m256 w = MODE == kPermute
                    ? _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[d][0], words), _mm256_permutevar8x32_ps(t[d][1], words), upper)
                    : _mm256_i32gather_ps(tables + d * E, _mm256_and_si256(words, _mm256_set1_epi32(E - 1)), 4);
                LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
                  acc[m][h][(j * D + d) & 1] = _mm256_fmadd_ps(w, _mm256_set1_ps(xv[m * XW + j * D + d]), acc[m][h][(j * D + d) & 1]);
              }
            }
          }
        }
      }
    }
    LOWBIT_UNROLL for (int h = 0; h < HB; ++h) {
      const int64_t row = rg * R + 8 * (h0 + h);
      if (row >= p.N) break;
      LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
        __m256 sum;
        if (MODE == kGatherPairs) {  // hadd: rows 0 1 4 5 | 2 3 6 7
          sum = _mm256_permutevar8x32_ps(_mm256_hadd_ps(acc[m][h][0], acc[m][h][1]), _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
        } else {
          sum = _mm256_add_ps(acc[m][h][0], acc[m][h][1]);
        }
        avx2_add_rows(y + (m0 + m) * p.N + row, sum, p.N - row);
      }
    }
  }
}

// One activation row, 2-D codewords, 4-bit slots (GPTVQ's 2-bit pairs): per vector j of a chunk the pair table
// T_j[e] = book[e][0] x[2j] + book[e][1] x[2j + 1] of the 16 entries is formed in two registers and looked up for
// both eighths of the row group, one vpermps pair, one blend and one add per 8 rows and 2 weights where decoding
// each component takes two of each and an FMA (the same sums to fp32 rounding).
LOWBIT_AVX2 void group_pairs_avx2(const Vq& p, const float* xp, float* y, int64_t rg, int64_t, int) {
  constexpr int P = 8, E = 16;
  const uint8_t* at = unit0(p, rg);
  const int64_t stride = chunk_stride(p, rg);
  const int64_t book0 = rg / p.rgpb * p.ng;
  __m256 acc[2][2];
  LOWBIT_UNROLL for (int h = 0; h < 2; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.ng; ++g) {
    const float* book = p.tables + (book0 + g) * 2 * E;
    const __m256 c0lo = _mm256_loadu_ps(book), c0hi = _mm256_loadu_ps(book + 8);
    const __m256 c1lo = _mm256_loadu_ps(book + E), c1hi = _mm256_loadu_ps(book + E + 8);
    for (int64_t c = g * p.gvp / P; c < (g + 1) * p.gvp / P; ++c) {
      const uint8_t* unit = at + c * stride;
      const float* xv = xp + c * P * 2;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 32));
      LOWBIT_UNROLL for (int j = 0; j < P; ++j) {
        const __m256 x0 = _mm256_broadcast_ss(xv + 2 * j), x1 = _mm256_broadcast_ss(xv + 2 * j + 1);
        const __m256 tlo = _mm256_fmadd_ps(c1lo, x1, _mm256_mul_ps(c0lo, x0));
        const __m256 thi = _mm256_fmadd_ps(c1hi, x1, _mm256_mul_ps(c0hi, x0));
        LOWBIT_UNROLL for (int h = 0; h < 2; ++h) {
          const __m256i words = _mm256_srli_epi32(h == 0 ? w0 : w1, 4 * j);
          const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(words, 28));  // bit 3 to the sign
          const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, words), _mm256_permutevar8x32_ps(thi, words),
                                            upper);
          acc[h][j & 1] = _mm256_add_ps(acc[h][j & 1], v);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int h = 0; h < 2; ++h) {
    const int64_t row = rg * 16 + 8 * h;
    if (row >= p.N) break;
    avx2_add_rows(y + row, _mm256_add_ps(acc[h][0], acc[h][1]), p.N - row);
  }
}

// ------------------------------------------------------------------ AVX-512

LOWBIT_AVX512 inline void avx512_add_rows(float* y, __m512 sum, int64_t valid) {
  const __mmask16 k = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  _mm512_mask_storeu_ps(y, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, y), sum));
}

// Entry idx (low S bits of each lane) of one component's table t (2^S / 16 registers); `upper`: the lanes whose
// slot has bit 5 set, which take the upper half of a 64-entry table.
template <int S>
LOWBIT_AVX512 inline __m512 avx512_lookup(const __m512* t, __m512i idx, __mmask16 upper) {
  if (S == 4) return _mm512_permutexvar_ps(idx, t[0]);
  return _mm512_mask_blend_ps(upper, _mm512_permutex2var_ps(t[0], idx, t[1]), _mm512_permutex2var_ps(t[2], idx, t[3]));
}

// 4- and 6-bit slots: 16 rows, each component looked up across the rows and multiplied by its column's activation.
template <int S, int D, int MB>
LOWBIT_AVX512 void group_avx512(const Vq& p, const float* xp, float* y, int64_t rg, int64_t m0, int) {
  constexpr int P = S == 4 ? 8 : 5, E = 1 << S, Q = E / 16, NA = MB == 1 ? 4 : 2;
  const int64_t XW = p.NVP * D;
  const uint8_t* at = unit0(p, rg);
  const int64_t stride = chunk_stride(p, rg);
  const int64_t book0 = rg / p.rgpb * p.ng;
  __m512 acc[MB][NA];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    LOWBIT_UNROLL for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512 t[D][Q];
    LOWBIT_UNROLL for (int d = 0; d < D; ++d)
      LOWBIT_UNROLL for (int q = 0; q < Q; ++q) t[d][q] = _mm512_loadu_ps(p.tables + ((book0 + g) * D + d) * E + 16 * q);
    const uint8_t* unit = at + g * p.gvp / P * stride;
    const float* xv = xp + m0 * XW + g * p.gvp * D;
    for (int64_t c = 0; c < p.gvp / P; ++c, unit += stride, xv += P * D) {
      const __m512i words = _mm512_loadu_si512(unit);
      LOWBIT_UNROLL for (int j = 0; j < P; ++j) {
        const __m512i idx = _mm512_srli_epi32(words, S * j);
        const __mmask16 upper = S == 6 ? _mm512_test_epi32_mask(words, _mm512_set1_epi32(32 << (S * j))) : 0;
        LOWBIT_UNROLL for (int d = 0; d < D; ++d) {
          const __m512 w = avx512_lookup<S>(t[d], idx, upper);
          LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
            acc[m][(j * D + d) % NA] = _mm512_fmadd_ps(w, _mm512_set1_ps(xv[m * XW + j * D + d]), acc[m][(j * D + d) % NA]);
        }
      }
    }
  }
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
    __m512 sum = acc[m][0];
    LOWBIT_UNROLL for (int a = 1; a < NA; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
    avx512_add_rows(y + (m0 + m) * p.N + rg * 16, sum, p.N - rg * 16);
  }
}

// One activation row, 2-D codewords, 4- or 6-bit slots: the pair tables T_v[e] = book[e][0] x[2v] + book[e][1]
// x[2v + 1] of a chunk's P vectors, formed once per row block and looked up by each of its row groups. A thread
// runs row groups [rg0, rg1); `sums` holds their running sums (16 per row group).
template <int S>
LOWBIT_AVX512 void pair_tables_avx512(const Vq& p, const float* xp, float* y, int64_t rg0, int64_t rg1, float* sums) {
  constexpr int P = S == 4 ? 8 : 5, E = 1 << S, Q = E / 16;
  for (int64_t b = rg0 / p.rgpb; b * p.rgpb < rg1; ++b) {  // the layout's blocks are the codebooks' here
    const int64_t a0 = std::max(rg0, b * p.rgpb), a1 = std::min(rg1, (b + 1) * p.rgpb);
    const int64_t stride = chunk_stride(p, a0);
    const uint8_t* at = unit0(p, a0);
    std::fill(sums, sums + (a1 - a0) * 16, 0.f);
    for (int64_t c = 0; c < p.NC; ++c) {
      const float* book = p.tables + (b * p.ng + c * P / p.gvp) * 2 * E;
      __m512 t[P][Q];
      LOWBIT_UNROLL for (int j = 0; j < P; ++j) {
        const __m512 x0 = _mm512_set1_ps(xp[2 * (c * P + j)]), x1 = _mm512_set1_ps(xp[2 * (c * P + j) + 1]);
        LOWBIT_UNROLL for (int q = 0; q < Q; ++q)
          t[j][q] = _mm512_fmadd_ps(_mm512_loadu_ps(book + E + 16 * q), x1, _mm512_mul_ps(_mm512_loadu_ps(book + 16 * q), x0));
      }
      const uint8_t* unit = at + c * stride;
      for (int64_t a = 0; a < a1 - a0; ++a, unit += kUnit) {
        const __m512i words = _mm512_loadu_si512(unit);
        __m512 s0 = _mm512_loadu_ps(sums + 16 * a), s1 = _mm512_setzero_ps();
        LOWBIT_UNROLL for (int j = 0; j < P; ++j) {
          const __m512i idx = _mm512_srli_epi32(words, S * j);
          const __mmask16 upper = S == 6 ? _mm512_test_epi32_mask(words, _mm512_set1_epi32(32 << (S * j))) : 0;
          if (j & 1) s1 = _mm512_add_ps(s1, avx512_lookup<S>(t[j], idx, upper));
          else s0 = _mm512_add_ps(s0, avx512_lookup<S>(t[j], idx, upper));
        }
        _mm512_storeu_ps(sums + 16 * a, _mm512_add_ps(s0, s1));
      }
    }
    for (int64_t a = a0; a < a1; ++a) avx512_add_rows(y + a * 16, _mm512_loadu_ps(sums + 16 * (a - a0)), p.N - a * 16);
  }
}

// 8-bit slots (VBMI): 64 rows, one byte each. Each component's fp16 values come from two byte planes (low and
// high bytes of the 256 entries, 4 registers each: vpermt2b reads 7 bits, bit 7 picks the half), interleaved into
// halves and converted. unpacklo/hi work within 128-bit lanes, so the four registers of fp32 values hold the rows
// in the order row_of() gives.
inline int row_of(int q, int lane) { return (q & 1) * 32 + (q >> 1) * 8 + (lane < 8 ? lane : lane + 8); }

template <int D, int MB>
LOWBIT_VBMI void group_planes(const Vq& p, const float* xp, float* y, int64_t rg, int64_t m0, int) {
  const int64_t XW = p.NVP * D;
  const uint8_t* at = unit0(p, rg);
  const int64_t stride = chunk_stride(p, rg);
  const int64_t book0 = rg / p.rgpb * p.ng;
  __m512 acc[MB][4];
  LOWBIT_UNROLL for (int m = 0; m < MB; ++m)
    LOWBIT_UNROLL for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ng; ++g) {
    const uint8_t* planes = p.planes + (book0 + g) * 2 * D * 256;
    const uint8_t* unit = at + g * p.gvp * stride;
    const float* xv = xp + m0 * XW + g * p.gvp * D;
    for (int64_t c = 0; c < p.gvp; ++c, unit += stride, xv += D) {
      const __m512i idx = _mm512_loadu_si512(unit);
      const __mmask64 upper = _mm512_movepi8_mask(idx);
      LOWBIT_UNROLL for (int d = 0; d < D; ++d) {
        __m512i bytes[2];
        LOWBIT_UNROLL for (int half = 0; half < 2; ++half) {
          const uint8_t* t = planes + (2 * d + half) * 256;
          const __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(t), idx, _mm512_loadu_si512(t + 64));
          const __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), idx, _mm512_loadu_si512(t + 192));
          bytes[half] = _mm512_mask_blend_epi8(upper, lo, hi);
        }
        const __m512i h0 = _mm512_unpacklo_epi8(bytes[0], bytes[1]), h1 = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
        const __m512 w[4] = {_mm512_cvtph_ps(_mm512_castsi512_si256(h0)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h0, 1)),
                             _mm512_cvtph_ps(_mm512_castsi512_si256(h1)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h1, 1))};
        LOWBIT_UNROLL for (int m = 0; m < MB; ++m) {
          const __m512 xb = _mm512_set1_ps(xv[m * XW + d]);
          LOWBIT_UNROLL for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_fmadd_ps(w[q], xb, acc[m][q]);
        }
      }
    }
  }
  const int64_t valid = std::min<int64_t>(64, p.N - rg * 64);
  alignas(64) float s[16];
  for (int m = 0; m < MB; ++m) {
    float* yr = y + (m0 + m) * p.N + rg * 64;
    for (int q = 0; q < 4; ++q) {
      _mm512_store_ps(s, acc[m][q]);
      for (int lane = 0; lane < 16; ++lane)
        if (row_of(q, lane) < valid) yr[row_of(q, lane)] += s[lane];
    }
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

bool has_vbmi() {
#ifdef LOWBIT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

int64_t resolve_isa(int64_t isa) {
  static const int64_t best = isa_available(kAvx512) ? kAvx512 : isa_available(kAvx2) ? kAvx2 : kPortable;
  if (isa < 0) return best;
  TORCH_CHECK(isa_available(isa), "lowbit's vq kernel cannot run instruction set ", isa, " on this CPU");
  return isa;
}

// The path that runs this weight: portable where no SIMD path fits it (4-D codewords, row groups across
// codebook blocks); 8-bit slots on AVX-512 need VBMI and an fp16 codebook, or else take the AVX2 path.
int64_t path_for(const Vq& p, int64_t isa) {
  if (!p.simd || p.D > 2) return kPortable;
  if (isa == kAvx512 && p.S == 8 && !(p.planes && has_vbmi())) return kAvx2;
  return isa;
}

using GroupFn = void (*)(const Vq&, const float*, float*, int64_t, int64_t, int);

template <int D, int MB>
GroupFn group_fn(const Vq& p, int64_t path) {
#ifdef LOWBIT_X86
  if (path == kAvx512) {
    if (p.S == 8) return group_planes<D, MB>;
    return p.S == 4 ? group_avx512<4, D, MB> : group_avx512<6, D, MB>;
  }
  if (path == kAvx2) {
    if (p.S == 4 && D == 2 && MB == 1) return group_pairs_avx2;
    if (p.S == 4) return group_avx2<4, D, kPermute, MB>;
    if (D == 2 && p.pairs) return p.S == 6 ? group_avx2<6, 2, kGatherPairs, MB> : group_avx2<8, 2, kGatherPairs, MB>;
    return p.S == 6 ? group_avx2<6, D, kGatherComps, MB> : group_avx2<8, D, kGatherComps, MB>;
  }
#endif
  (void)p;
  (void)path;
  return group_portable;
}

template <int D>
GroupFn group_fn_for(int mb, const Vq& p, int64_t path) {
  switch (mb) {
    case 1: return group_fn<D, 1>(p, path);
    case 2: return group_fn<D, 2>(p, path);
    case 3: return group_fn<D, 3>(p, path);
    default: return group_fn<D, 4>(p, path);
  }
}

GroupFn select_fn(int mb, const Vq& p, int64_t path) {
  if (path == kPortable) return group_portable;
  return p.D == 1 ? group_fn_for<1>(mb, p, path) : group_fn_for<2>(mb, p, path);
}

// The integers of the layout: N, K, D, S, gv, gvp, ng, r, rgpb, simd (kernels/vq.py).
Vq layout_of(const std::vector<int64_t>& layout) {
  TORCH_CHECK(layout.size() == 10, "the layout is N, K, D, S, gv, gvp, ng, r, rgpb, simd");
  Vq p{};
  p.N = layout[0], p.K = layout[1], p.D = layout[2], p.S = layout[3], p.gv = layout[4], p.gvp = layout[5];
  p.ng = layout[6], p.r = layout[7], p.rgpb = layout[8], p.simd = layout[9] != 0;
  TORCH_CHECK(p.S == 4 || p.S == 6 || p.S == 8, "slots are 4, 6 or 8 bits, got ", p.S);
  TORCH_CHECK(p.D >= 1 && p.D <= 4 && p.N >= 0 && p.K >= 0 && p.r > 0 && p.ng >= 0, "invalid vq layout");
  p.E = int64_t{1} << p.S, p.R = p.S == 8 ? 64 : 16, p.P = slots_per_word(p.S);
  TORCH_CHECK(p.gvp % p.P == 0 && p.gvp >= p.gv && p.rgpb > 0, "groups must be padded to whole chunks");
  p.NVP = p.ng * p.gvp, p.NC = p.NVP / p.P, p.NRG = (p.N + p.R - 1) / p.R;
  return p;
}

Vq make_vq(const torch::Tensor& codes, const torch::Tensor& tables, const c10::optional<torch::Tensor>& planes,
           const c10::optional<torch::Tensor>& pairs, const std::vector<int64_t>& layout) {
  Vq p = layout_of(layout);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == p.NRG * p.NC * kUnit,
              "codes must be the contiguous uint8 units of the layout");
  const int64_t nbooks = (p.N + p.r - 1) / p.r * p.ng;
  TORCH_CHECK(tables.scalar_type() == torch::kFloat && tables.is_contiguous() && tables.numel() == nbooks * p.D * p.E,
              "tables must be contiguous fp32 [", nbooks, ", ", p.D, ", ", p.E, "]");
  p.codes = codes.data_ptr<uint8_t>();
  p.tables = tables.data_ptr<float>();
  if (planes.has_value()) {
    TORCH_CHECK(p.S == 8 && planes->scalar_type() == torch::kUInt8 && planes->is_contiguous() &&
                    planes->numel() == nbooks * 2 * p.D * 256,
                "planes must be contiguous uint8 [nbooks, 2D, 256] for 8-bit slots");
    p.planes = planes->data_ptr<uint8_t>();
  }
  if (pairs.has_value()) {
    TORCH_CHECK(p.D == 2 && pairs->scalar_type() == torch::kInt && pairs->is_contiguous() && pairs->numel() == nbooks * p.E,
                "pairs must be contiguous int32 [nbooks, E] for 2-D codewords");
    p.pairs = pairs->data_ptr<int32_t>();
  }
  return p;
}

// x [M, K] to the padded vector space: [M, NVP * D], each group's columns at its padded place, zeros between.
void pad_activations(const Vq& p, const float* x, int64_t M, float* xp) {
  const int64_t XW = p.NVP * p.D, G = p.gv * p.D, GP = p.gvp * p.D;
  std::fill(xp, xp + M * XW, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < p.ng; ++g) {
      const int64_t k0 = g * G, k1 = std::min(p.K, k0 + G);
      if (k1 > k0) std::memcpy(xp + m * XW + g * GP, x + m * p.K + k0, (k1 - k0) * sizeof(float));
    }
}

}  // namespace

// y = x @ W^T (+ bias) for x fp32 [M, K], M <= kMaxRows.
torch::Tensor vq_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor tables, c10::optional<torch::Tensor> planes,
                      c10::optional<torch::Tensor> pairs, c10::optional<torch::Tensor> bias, std::vector<int64_t> layout,
                      int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  const Vq p = make_vq(codes, tables, planes, pairs, layout);
  const int64_t M = x.size(0);
  TORCH_CHECK(x.size(1) == p.K, "x has ", x.size(1), " columns, the weight ", p.K);
  TORCH_CHECK(M <= kMaxRows, "vq_gemv takes at most ", kMaxRows, " rows, got ", M);
  const int64_t path = path_for(p, resolve_isa(isa));
  x = x.contiguous();
  torch::Tensor y;
  if (bias.has_value()) {  // the kernels add into y: starting from the bias fuses it
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == p.N, "bias must be fp32 [N]");
    y = bias->reshape({1, p.N}).repeat({M, 1});
  } else {
    y = torch::zeros({M, p.N}, x.options());
  }
  if (M == 0 || p.N == 0) return y;
  thread_local std::vector<float> padded;
  padded.resize(static_cast<size_t>(M * p.NVP * p.D));
  pad_activations(p, x.data_ptr<float>(), M, padded.data());
  const float* xp = padded.data();
  float* py = y.data_ptr<float>();
#ifdef LOWBIT_X86
  // pair tables pay for themselves from about 4 row groups per codebook block (measured on Zen 4; GPTVQ's
  // default block gives 3-bit weights 4, 2-bit weights 1)
  if (M == 1 && path == kAvx512 && p.D == 2 && p.S != 8 && std::min(p.rgpb, p.NRG) >= 4) {
    at::parallel_for(0, p.NRG, 4, [&](int64_t rg0, int64_t rg1) {
      std::vector<float> sums(static_cast<size_t>(std::min(rg1 - rg0, p.rgpb) * 16));
      if (p.S == 4) pair_tables_avx512<4>(p, xp, py, rg0, rg1, sums.data());
      else pair_tables_avx512<6>(p, xp, py, rg0, rg1, sums.data());
    });
    return y;
  }
#endif
  const GroupFn full = select_fn(kBlock, p, path), rest = select_fn(static_cast<int>(M % kBlock), p, path);
  at::parallel_for(0, p.NRG, 4, [&](int64_t rg0, int64_t rg1) {
    for (int64_t rg = rg0; rg < rg1; ++rg) {
      int64_t m = 0;
      for (; m + kBlock <= M; m += kBlock) full(p, xp, py, rg, m, kBlock);
      if (m < M) rest(p, xp, py, rg, m, static_cast<int>(M - m));
    }
  });
  return y;
}

// Weight rows [n0, n1) as fp32 [n1 - n0, K]: what vector.dequantize gives, bit for bit.
torch::Tensor vq_dequant(torch::Tensor codes, torch::Tensor tables, std::vector<int64_t> layout, int64_t n0, int64_t n1) {
  const Vq p = make_vq(codes, tables, c10::nullopt, c10::nullopt, layout);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= p.N, "row range out of bounds");
  auto out = torch::empty({n1 - n0, p.K}, torch::dtype(torch::kFloat));
  float* po = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const int64_t rg = n / p.R, i = n % p.R, book0 = n / p.r * p.ng;
      const uint8_t* at = unit0(p, rg);
      const int64_t stride = chunk_stride(p, rg);
      float* dst = po + (n - n0) * p.K;
      for (int64_t g = 0; g < p.ng; ++g) {
        const float* t = p.tables + (book0 + g) * p.D * p.E;
        const int64_t k0 = g * p.gv * p.D, chunks = p.gvp / p.P;
        for (int64_t c = 0; c < chunks; ++c) {
          const uint8_t* unit = at + (g * chunks + c) * stride;
          uint32_t word = unit[i];  // 8-bit slots: the byte; else the row's word of P slots
          if (p.S != 8) std::memcpy(&word, unit + 4 * i, 4);
          for (int64_t j = 0; j < p.P; ++j, word >>= p.S) {
            const int64_t k = k0 + (c * p.P + j) * p.D;
            if (c * p.P + j >= p.gv || k >= p.K) break;
            const float* w = t + (word & (p.E - 1));
            for (int64_t d = 0; d < p.D && k + d < p.K; ++d) dst[k + d] = w[d * p.E];
          }
        }
      }
    }
  });
  return out;
}

// The units of the layout from the stored index stream (index v of row n at bits [(n * vectors + v) * width, ...),
// little-endian), each index plus its row's offset (merged codebooks); rows past N and padding vectors index 0.
torch::Tensor vq_units(torch::Tensor stream, std::vector<int64_t> layout, int64_t width, int64_t vectors,
                       c10::optional<torch::Tensor> offsets) {
  TORCH_CHECK(stream.scalar_type() == torch::kUInt8 && stream.is_contiguous(), "the index stream must be contiguous uint8");
  TORCH_CHECK(width >= 1 && width <= 8 && vectors >= 0, "indices are 1 to 8 bits");
  const Vq p = layout_of(layout);
  TORCH_CHECK(stream.numel() * 8 >= p.N * vectors * width, "the stream holds fewer than N x vectors indices");
  const int32_t* off = nullptr;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == torch::kInt && offsets->is_contiguous() && offsets->numel() == p.N,
                "offsets must be contiguous int32 [N]");
    off = offsets->data_ptr<int32_t>();
  }
  auto units = torch::zeros({p.NRG * p.NC * kUnit}, torch::kUInt8);
  uint8_t* dst = units.data_ptr<uint8_t>();
  const uint8_t* src = stream.data_ptr<uint8_t>();
  const int64_t nbytes = stream.numel(), chunks = p.gvp / p.P;
  at::parallel_for(0, p.N, 64, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const int64_t rg = n / p.R, i = n % p.R, stride = chunk_stride(p, rg);
      uint8_t* at = dst + unit_offset(p, rg);
      for (int64_t g = 0; g < p.ng; ++g)
        for (int64_t c = 0; c < chunks; ++c) {
          uint8_t* unit = at + (g * chunks + c) * stride;
          uint32_t word = 0;
          for (int64_t j = 0; j < p.P; ++j) {
            const int64_t v = g * p.gv + c * p.P + j;
            if (c * p.P + j >= p.gv || v >= vectors) break;
            const int64_t bit = (n * vectors + v) * width, byte = bit >> 3;
            const uint32_t two = src[byte] | (byte + 1 < nbytes ? static_cast<uint32_t>(src[byte + 1]) << 8 : 0u);
            const uint32_t code = ((two >> (bit & 7)) & ((1u << width) - 1)) + (off ? off[n] : 0);
            TORCH_CHECK(code < static_cast<uint32_t>(p.E), "an index does not fit its slot");
            word |= code << (p.S * j);
          }
          if (p.S == 8) unit[i] = static_cast<uint8_t>(word);
          else std::memcpy(unit + 4 * i, &word, 4);
        }
    }
  });
  return units;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"portable"};
  if (isa_available(kAvx2)) out.push_back("avx2");
  if (isa_available(kAvx512)) out.push_back("avx512");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq_gemv", &vq_gemv, "vector-quantized matmul for up to 16 rows (fp32 activations and sums)", py::arg("x"),
        py::arg("codes"), py::arg("tables"), py::arg("planes"), py::arg("pairs"), py::arg("bias"), py::arg("layout"),
        py::arg("isa"));
  m.def("vq_dequant", &vq_dequant, "dequantize rows of a vector-quantized weight to fp32");
  m.def("vq_units", &vq_units, "the kernel's index units from the stored index stream");
  m.def("path", [](torch::Tensor codes, torch::Tensor tables, c10::optional<torch::Tensor> planes,
                   c10::optional<torch::Tensor> pairs, std::vector<int64_t> layout, int64_t isa) {
    static const char* names[] = {"portable", "avx2", "avx512"};
    return std::string(names[path_for(make_vq(codes, tables, planes, pairs, layout), resolve_isa(isa))]);
  }, "the instruction set that runs this weight for the asked one");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs the kernel with");
  m.def("max_rows", [] { return kMaxRows; }, "the most rows vq_gemv takes");
}
