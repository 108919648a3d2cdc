// Integer-activation linear for AVX2 CPUs: 2-8 bit integer activations times 8- or
// 4-bit weight codes, exact integer accumulation, rescaled to fp32.
//
// Weights are read as lowbit stores them (QuantizedWeight.packed): row-major codes,
// one byte each at 8 bits, two per byte at 4 bits (even column in the low nibble),
// with a scale and an integer zero point per (row, weight group). Activations are
// quantized here (per token at run time, or with static per-tensor / per-group
// scales and zero points) into signed codes a = q - z.
//
// Products use the unsigned codes w; the zero point enters once per segment
// through the activation row sums:  sum a (w - z) = sum a w - z sum a.
//
// - 8-bit symmetric weights (codes 1..255) x symmetric activations (-128..127):
//   `vpmaddubsw` on |a| (as unsigned, 128 included) and sign(w - 128, a), at most
//   2 * 128 * 127 = 32512 per pair (no saturation), widened by `vpmaddwd` with ones.
// - 4-bit codes x symmetric activations: `vpmaddubsw` on u8 codes x s8 activations.
//   A pair is at most 15 * 128 * 2 = 3840, so several steps add up in int16 before
//   one `vpmaddwd` widens them: about twice the products per multiply instruction.
// - Otherwise (asymmetric activations, |a| up to 255, or 8-bit codes of 0): codes and
//   activations widened to int16, `vpmaddwd` (exact int16 x int16 -> int32).
//
// K is cut into segments where the weight group or the activation group changes;
// per (row, output, segment) the integer sum is converted to float once:
//
//   y[m, n] = row_scale[m] * sum_s scale_w[n, g(s)] scale_a[s] (sum_{k in s} a[m, k] w[n, k] - z[n, g(s)] sum_{k in s} a[m, k])
//             + bias[n]
//
// Threads split the output columns; each keeps a block of weight rows in L2 and
// sweeps every activation row tile over K in blocks that keep the tile in L1.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlockK = 1024;  // columns per cache block

struct Segment {
  int64_t k0, k1, wg;
  float a_scale;
};

template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return row[k];
  } else {
    return (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
  }
}

// Where activation column k lives in a row: in order for 8-bit weights; for 4-bit
// weights each 64-column block holds its 32 even columns, then its 32 odd ones, so
// that the low and high nibbles of 32 code bytes meet 32 contiguous activations each.
template <int BITS>
inline int64_t act_index(int64_t k) {
  if constexpr (BITS == 8) {
    return k;
  } else {
    const int64_t r = k & 63;
    return (k - r) + ((r & 1) ? 32 + (r >> 1) : (r >> 1));
  }
}

template <typename A>
struct Problem {
  const A* xq;             // [M, ld] activation codes a = q - z, laid out per act_index
  int64_t ld;
  const int32_t* rowsum;   // [M, nseg] sums of a over each segment
  const float* row_scale;  // [M]
  int64_t M, K, N;
  const uint8_t* codes;    // packed weight rows
  int64_t row_bytes;
  const uint8_t* zeros;    // [N, ngroups]
  const float* w_scale;    // [N, ngroups]
  int64_t ngroups;
  const Segment* segs;
  int64_t nseg;
  const float* bias;
  float* y;
};

// 16 low and 16 high nibbles of 16 code bytes as one vector of 32 unsigned bytes.
inline __m256i nibbles32(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
  return _mm256_blend_epi32(lo, hi, 0xF0);
}

// Integer sums over [k0, k1) for one MR x NR tile, into iacc (8 int32 lanes each).
// Columns outside whole vector steps go through the scalar loop.
template <int BITS, typename A, int MR, int NR>
struct Dot;

template <int MR, int NR>
struct Dot<8, int16_t, MR, NR> {
  static int64_t run(const uint8_t* const* rows, const int16_t* const* xs, int64_t k0, int64_t k1,
                     __m256i (&iacc)[MR][NR]) {
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      __m256i w[NR];
      for (int j = 0; j < NR; ++j)
        w[j] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + k)));
      for (int i = 0; i < MR; ++i) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + k));
        for (int j = 0; j < NR; ++j) iacc[i][j] = _mm256_add_epi32(iacc[i][j], _mm256_madd_epi16(a, w[j]));
      }
    }
    return k;
  }
};

template <int MR, int NR>
struct Dot<4, int16_t, MR, NR> {
  static int64_t run(const uint8_t* const* rows, const int16_t* const* xs, int64_t k0, int64_t k1,
                     __m256i (&iacc)[MR][NR]) {
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      const int64_t off = k & 63, base = k - off;  // even half at base + off/2, odd half 32 later
      __m256i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        const __m256i w = nibbles32(rows[j] + k / 2);
        lo[j] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w));
        hi[j] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1));
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + base + off / 2));
        const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + base + 32 + off / 2));
        for (int j = 0; j < NR; ++j)
          iacc[i][j] = _mm256_add_epi32(iacc[i][j],
                                        _mm256_add_epi32(_mm256_madd_epi16(e, lo[j]), _mm256_madd_epi16(o, hi[j])));
      }
    }
    return k;
  }
};

// 8-bit symmetric weights (codes 1..255, so w = code - 128 lies in [-127, 127]) and
// symmetric activations (-128..127): |a| * sign(w, a) = a * w in `vpmaddubsw` without
// saturation (|a| = 128 reads as unsigned 128; 2 * 128 * 127 = 32512), widened at once
// by `vpmaddwd` with ones. Against the int16 path it halves the activation bytes loaded
// and needs no widening of the codes.
template <int MR, int NR>
struct Dot<8, int8_t, MR, NR> {
  static int64_t run(const uint8_t* const* rows, const int8_t* const* xs, int64_t k0, int64_t k1,
                     __m256i (&iacc)[MR][NR]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      __m256i w[NR];
      for (int j = 0; j < NR; ++j)
        w[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + k)), flip);
      for (int i = 0; i < MR; ++i) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + k));
        const __m256i ua = _mm256_abs_epi8(a);
        for (int j = 0; j < NR; ++j)
          iacc[i][j] = _mm256_add_epi32(
              iacc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(w[j], a)), ones));
      }
    }
    return k;
  }
};

// 4-bit codes x int8 activations: 64 columns per step. 32 code bytes give 32 low
// nibbles (even columns) and 32 high ones (odd columns), multiplied against the
// block's even and odd activations. A step adds at most 2 * 3840 to an int16 lane,
// so four steps (30720) accumulate before widening.
template <int MR, int NR>
struct Dot<4, int8_t, MR, NR> {
  // 32 columns: half a block, its even and odd activations 32 apart
  static void half(const uint8_t* const* rows, const int8_t* const* xs, int64_t k, __m256i (&iacc)[MR][NR]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t off = k & 63, base = k - off;
    __m256i w[NR];
    for (int j = 0; j < NR; ++j) w[j] = nibbles32(rows[j] + k / 2);
    for (int i = 0; i < MR; ++i) {
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs[i] + base + off / 2));
      const __m128i o = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs[i] + base + 32 + off / 2));
      const __m256i a = _mm256_inserti128_si256(_mm256_castsi128_si256(e), o, 1);
      for (int j = 0; j < NR; ++j)
        iacc[i][j] = _mm256_add_epi32(iacc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], a), ones));
    }
  }

  static int64_t run(const uint8_t* const* rows, const int8_t* const* xs, int64_t k0, int64_t k1,
                     __m256i (&iacc)[MR][NR]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    int64_t k = k0;
    if ((k & 63) && k + 32 <= k1) {  // start in the middle of a block
      half(rows, xs, k, iacc);
      k += 32;
    }
    while (k + 64 <= k1) {
      const int64_t steps = std::min<int64_t>(4, (k1 - k) / 64);
      __m256i acc16[MR][NR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc16[i][j] = _mm256_setzero_si256();
      for (int64_t s = 0; s < steps; ++s, k += 64) {
        __m256i lo[NR], hi[NR];
        for (int j = 0; j < NR; ++j) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + k / 2));
          lo[j] = _mm256_and_si256(b, mask);
          hi[j] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        }
        for (int i = 0; i < MR; ++i) {
          const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + k));
          const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[i] + k + 32));
          for (int j = 0; j < NR; ++j)
            acc16[i][j] = _mm256_add_epi16(
                acc16[i][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], e), _mm256_maddubs_epi16(hi[j], o)));
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) iacc[i][j] = _mm256_add_epi32(iacc[i][j], _mm256_madd_epi16(acc16[i][j], ones));
    }
    if (k + 32 <= k1) {
      half(rows, xs, k, iacc);
      k += 32;
    }
    return k;
  }
};

// The totals of up to eight int32 vectors, one per lane (missing ones count as zero).
inline __m256i hsum8(const __m256i* v, int n) {
  __m256i x[8];
  for (int i = 0; i < 8; ++i) x[i] = i < n ? v[i] : _mm256_setzero_si256();
  const __m256i h01 = _mm256_hadd_epi32(x[0], x[1]), h23 = _mm256_hadd_epi32(x[2], x[3]);
  const __m256i h45 = _mm256_hadd_epi32(x[4], x[5]), h67 = _mm256_hadd_epi32(x[6], x[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// acc[i][j] += the tile's contribution of segments [s0, s1). Lane i * NR + j of one float
// vector carries output (i, j): per segment the integer sums are reduced and scaled at once.
template <int BITS, typename A, int MR, int NR>
inline void tile(const Problem<A>& p, int64_t m0, int64_t n0, int64_t s0, int64_t s1, float* acc, int64_t ld_acc) {
  static_assert(MR * NR <= 8, "a tile's outputs must fit in one vector");
  __m256 facc = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = p.codes + (n0 + j) * p.row_bytes;
  const A* xs[MR];
  for (int i = 0; i < MR; ++i) xs[i] = p.xq + (m0 + i) * p.ld;
  constexpr int64_t align = BITS == 8 ? 1 : 32;  // vector steps start on these columns
  // the signed 8-bit path multiplies code - 128, so its zero point moves by 128
  constexpr int zshift = (BITS == 8 && std::is_same_v<A, int8_t>) ? 128 : 0;

  for (int64_t si = s0; si < s1; ++si) {
    const Segment& s = p.segs[si];
    __m256i iacc[MR][NR];
    int32_t itail[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        iacc[i][j] = _mm256_setzero_si256();
        itail[i][j] = 0;
      }
    auto scalar = [&](int64_t from, int64_t to) {
      for (int64_t k = from; k < to; ++k) {
        const int64_t a = act_index<BITS>(k);
        for (int j = 0; j < NR; ++j) {
          const int w = code_at<BITS>(rows[j], k) - zshift;
          for (int i = 0; i < MR; ++i) itail[i][j] += static_cast<int32_t>(xs[i][a]) * w;
        }
      }
    };
    const int64_t head = std::min(s.k1, (s.k0 + align - 1) / align * align);
    scalar(s.k0, head);
    const int64_t done = Dot<BITS, A, MR, NR>::run(rows, xs, head, s.k1, iacc);
    scalar(done, s.k1);
    alignas(32) float sc[8] = {}, corr[8] = {};
    for (int j = 0; j < NR; ++j) {
      const int64_t g = (n0 + j) * p.ngroups + s.wg;
      const float scale = p.w_scale[g] * s.a_scale;
      const float z = static_cast<float>(p.zeros[g] - zshift);
      for (int i = 0; i < MR; ++i) {
        const float rs = static_cast<float>(p.rowsum[(m0 + i) * p.nseg + si]);
        sc[i * NR + j] = scale;
        corr[i * NR + j] = (static_cast<float>(itail[i][j]) - z * rs) * scale;
      }
    }
    const __m256 sums = _mm256_cvtepi32_ps(hsum8(&iacc[0][0], MR * NR));
    facc = _mm256_add_ps(facc, _mm256_fmadd_ps(sums, _mm256_load_ps(sc), _mm256_load_ps(corr)));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, facc);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * ld_acc + j] += out[i * NR + j];
}

// A tile of mr <= MR rows.
template <int BITS, typename A, int MR, int NR>
inline void tile_rows(const Problem<A>& p, int64_t mr, int64_t m0, int64_t n0, int64_t s0, int64_t s1, float* acc,
                      int64_t ld_acc) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_rows<BITS, A, MR - 1, NR>(p, mr, m0, n0, s0, s1, acc, ld_acc);
  }
  tile<BITS, A, MR, NR>(p, m0, n0, s0, s1, acc, ld_acc);
}

// Output columns [c0, c1) in blocks of weight rows that stay in L2.
template <int BITS, typename A, int MR, int NR>
void columns(const Problem<A>& p, const std::vector<std::pair<int64_t, int64_t>>& kblocks, int64_t c0, int64_t c1) {
  const int64_t rows_per_block = std::max<int64_t>(NR, ((384 * 1024) / std::max<int64_t>(p.row_bytes, 1)) / NR * NR);
  std::vector<float> acc;
  for (int64_t b0 = c0; b0 < c1; b0 += rows_per_block) {
    const int64_t b1 = std::min(c1, b0 + rows_per_block);
    const int64_t width = b1 - b0;
    acc.resize(static_cast<size_t>(MR * width));
    for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, p.M - m0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (const auto& kb : kblocks) {
        int64_t n = b0;
        for (; n + NR <= b1; n += NR)
          tile_rows<BITS, A, MR, NR>(p, mr, m0, n, kb.first, kb.second, &acc[n - b0], width);
        for (; n < b1; ++n) tile_rows<BITS, A, MR, 1>(p, mr, m0, n, kb.first, kb.second, &acc[n - b0], width);
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* out = p.y + (m0 + i) * p.N;
        const float rs = p.row_scale[m0 + i];
        for (int64_t n = b0; n < b1; ++n) out[n] = acc[i * width + (n - b0)] * rs + (p.bias ? p.bias[n] : 0.f);
      }
    }
  }
}

template <int BITS, typename A>
void gemm(const Problem<A>& p, const std::vector<std::pair<int64_t, int64_t>>& kblocks) {
  constexpr int64_t kUnit = 8;  // output columns handed to a thread at a time
  const int64_t units = (p.N + kUnit - 1) / kUnit;
  at::parallel_for(0, units, 16, [&](int64_t u0, int64_t u1) {
    const int64_t c0 = u0 * kUnit, c1 = std::min(p.N, u1 * kUnit);
    if (p.M == 1)  // bound by reading weights: more columns per tile keep more loads in flight
      columns<BITS, A, 1, 4>(p, kblocks, c0, c1);
    else
      columns<BITS, A, 4, 2>(p, kblocks, c0, c1);
  });
}

struct ActSpec {
  const int64_t* perm;     // [K] or null
  const float* premul;     // [K] or null
  int mode;                // 0 dynamic per row, 1 dynamic per tensor, 2 static per group
  bool symmetric;
  int qmax;
  const int64_t* bounds;   // [G + 1]
  const float* g_scale;    // [G]
  const int32_t* g_zero;   // [G]
  int64_t ngroups;
};

// Range of v[0, n) including 0.
inline void range_of(const float* v, int64_t n, float& lo, float& hi) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 x = _mm256_loadu_ps(v + k);
    vlo = _mm256_min_ps(vlo, x);
    vhi = _mm256_max_ps(vhi, x);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, vlo);
  _mm256_store_ps(h, vhi);
  lo = 0.f;
  hi = 0.f;
  for (int i = 0; i < 8; ++i) {
    lo = std::min(lo, l[i]);
    hi = std::max(hi, h[i]);
  }
  for (; k < n; ++k) {
    lo = std::min(lo, v[k]);
    hi = std::max(hi, v[k]);
  }
}

// q[k] = clamp(round(v[k] / scale) + zero, lo_code, hi_code) - zero for k in [k0, k1): the same
// IEEE division and round-half-to-even as the scalar (and torch) formula, eight at a time.
inline void quantize_span(const float* v, int32_t* q, int64_t k0, int64_t k1, float scale, float zero, float lo_code,
                          float hi_code) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero);
  const __m256 vlo = _mm256_set1_ps(lo_code), vhi = _mm256_set1_ps(hi_code);
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 t = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, vz), vlo), vhi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_cvtps_epi32(_mm256_sub_ps(t, vz)));
  }
  for (; k < k1; ++k) {
    const float t = std::min(std::max(std::nearbyint(v[k] / scale) + zero, lo_code), hi_code);
    q[k] = static_cast<int32_t>(t - zero);
  }
}

// Sum of q[k0, k1).
inline int32_t sum_span(const int32_t* q, int64_t k0, int64_t k1) {
  __m256i acc = _mm256_setzero_si256();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) acc = _mm256_add_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k)));
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
  int32_t total = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
  for (; k < k1; ++k) total += q[k];
  return total;
}

// Narrow int32 codes (already in range) to A, in order.
template <typename A>
inline void narrow(const int32_t* q, A* out, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k + 8));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // 16 int16 in order
    if constexpr (std::is_same_v<A, int16_t>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), w);
    } else {
      const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(lo, hi));
    }
  }
  for (; k < n; ++k) out[k] = static_cast<A>(q[k]);
}

// Quantize x [M, K] into a = q - z (layout per act_index, row stride ld), with per-segment row sums.
// v[k] = x[perm[k]] * premul[perm[k]]; groups are contiguous in the permuted order.
template <int BITS, typename A>
void quantize_rows(const float* x, int64_t M, int64_t K, const ActSpec& a, const std::vector<Segment>& segs, A* xq,
                   int64_t ld, int32_t* rowsum, float* row_scale) {
  // symmetric: q in [-qmax - 1, qmax] (scale absmax / qmax, so only a clipped static input reaches
  // -qmax - 1); asymmetric: q in [0, 2 qmax + 1] with zero point z
  const float hi_code = a.symmetric ? static_cast<float>(a.qmax) : static_cast<float>(2 * a.qmax + 1);
  const float lo_code = a.symmetric ? -static_cast<float>(a.qmax) - 1.f : 0.f;
  auto range_params = [&](float lo, float hi, float& scale, float& zero) {
    if (a.symmetric) {
      scale = std::max(std::max(std::fabs(lo), std::fabs(hi)), 1e-8f) / static_cast<float>(a.qmax);
      zero = 0.f;
    } else {
      scale = std::max(hi - lo, 1e-8f) / hi_code;  // lo <= 0 <= hi already
      zero = std::min(std::max(std::nearbyint(-lo / scale), 0.f), hi_code);
    }
  };
  auto values = [&](const float* row, float* v) {
    if (a.perm) {
      for (int64_t k = 0; k < K; ++k) v[k] = a.premul ? row[a.perm[k]] * a.premul[a.perm[k]] : row[a.perm[k]];
    } else if (a.premul) {
      for (int64_t k = 0; k < K; ++k) v[k] = row[k] * a.premul[k];
    } else {
      std::copy(row, row + K, v);
    }
  };
  float t_scale = 1.f, t_zero = 0.f;
  if (a.mode == 1) {
    float lo = 0.f, hi = 0.f;
    std::vector<float> v(K);
    for (int64_t m = 0; m < M; ++m) {
      values(x + m * K, v.data());
      float l, h;
      range_of(v.data(), K, l, h);
      lo = std::min(lo, l);
      hi = std::max(hi, h);
    }
    range_params(lo, hi, t_scale, t_zero);
  }
  const int64_t nseg = static_cast<int64_t>(segs.size());
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> v(K);
    std::vector<int32_t> q(K);
    for (int64_t m = r0; m < r1; ++m) {
      values(x + m * K, v.data());
      if (a.mode == 2) {
        for (int64_t g = 0; g < a.ngroups; ++g)
          quantize_span(v.data(), q.data(), a.bounds[g], a.bounds[g + 1], a.g_scale[g],
                        static_cast<float>(a.g_zero[g]), lo_code, hi_code);
        row_scale[m] = 1.f;
      } else {
        float scale = t_scale, zero = t_zero;
        if (a.mode == 0) {
          float lo, hi;
          range_of(v.data(), K, lo, hi);
          range_params(lo, hi, scale, zero);
        }
        quantize_span(v.data(), q.data(), 0, K, scale, zero, lo_code, hi_code);
        row_scale[m] = scale;
      }
      A* out = xq + m * ld;
      if constexpr (BITS == 8) {
        narrow(q.data(), out, K);
        std::fill(out + K, out + ld, A(0));
      } else {
        std::fill(out, out + ld, A(0));
        for (int64_t k = 0; k < K; ++k) out[act_index<BITS>(k)] = static_cast<A>(q[k]);
      }
      for (int64_t s = 0; s < nseg; ++s) rowsum[m * nseg + s] = sum_span(q.data(), segs[s].k0, segs[s].k1);
    }
  });
}

template <int BITS, typename A>
torch::Tensor run(const torch::Tensor& x, const ActSpec& act, const std::vector<Segment>& segs,
                  const std::vector<std::pair<int64_t, int64_t>>& kblocks, const torch::Tensor& codes, int64_t N,
                  int64_t row_bytes, const torch::Tensor& zeros, const torch::Tensor& w_scale, int64_t ngroups,
                  const float* bias) {
  const int64_t M = x.size(0), K = x.size(1);
  // 4-bit: whole 64-column blocks; a row stride off powers of two keeps rows in different L1 sets
  const int64_t ld = (BITS == 8 ? K : (K + 63) / 64 * 64) + 64 / static_cast<int64_t>(sizeof(A));
  const auto dtype = std::is_same_v<A, int8_t> ? torch::kChar : torch::kShort;
  const int64_t nseg = static_cast<int64_t>(segs.size());
  auto xq = torch::empty({M, ld}, x.options().dtype(dtype));
  auto rowsum = torch::empty({M, nseg}, x.options().dtype(torch::kInt));
  auto row_scale = torch::empty({M}, x.options());
  A* pxq = reinterpret_cast<A*>(xq.data_ptr());
  quantize_rows<BITS, A>(x.data_ptr<float>(), M, K, act, segs, pxq, ld, rowsum.data_ptr<int32_t>(),
                         row_scale.data_ptr<float>());
  auto y = torch::empty({M, N}, x.options());
  Problem<A> p{pxq, ld, rowsum.data_ptr<int32_t>(), row_scale.data_ptr<float>(), M, K, N, codes.data_ptr<uint8_t>(),
               row_bytes, zeros.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), ngroups, segs.data(), nseg, bias,
               y.data_ptr<float>()};
  gemm<BITS, A>(p, kblocks);
  return y;
}

}  // namespace

// x: fp32 [M, K]. codes: uint8, the packed rows of an [N, K] code matrix at `bits` (8 or 4).
// zeros: uint8 [N, ngroups]; w_scale: fp32 [N, ngroups]; weight group `group` along K (ragged last).
// Activations: mode 0 dynamic per token, 1 dynamic per tensor, 2 static per group with
// a_bounds int64 [G + 1] (in permuted order), a_scale fp32 [G], a_zero int32 [G].
// perm (int64 [K]) and premul (fp32 [K]) may be empty. codes_nonzero: every 8-bit code is >= 1
// (true of symmetric weights), which allows the signed-int8 path.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, int64_t bits, int64_t N, torch::Tensor zeros,
                          torch::Tensor w_scale, int64_t group, int64_t mode, bool act_symmetric, int64_t act_qmax,
                          torch::Tensor a_bounds, torch::Tensor a_scale, torch::Tensor a_zero, torch::Tensor perm,
                          torch::Tensor premul, c10::optional<torch::Tensor> bias, bool codes_nonzero) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  TORCH_CHECK(bits == 8 || bits == 4, "weights must be 8- or 4-bit codes");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && zeros.scalar_type() == torch::kUInt8, "codes/zeros: uint8");
  TORCH_CHECK(w_scale.scalar_type() == torch::kFloat, "w_scale must be fp32");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  TORCH_CHECK(act_qmax >= 1 && act_qmax <= 127, "act_qmax must be 1..127");
  x = x.contiguous();
  const int64_t K = x.size(1);
  TORCH_CHECK(bits == 8 || K % 2 == 0, "4-bit rows must hold an even number of codes");
  const int64_t row_bytes = bits == 8 ? K : K / 2;
  TORCH_CHECK(codes.numel() >= N * row_bytes, "codes hold fewer than N rows of K codes");
  TORCH_CHECK(group >= 1, "group must be positive");
  const int64_t ngroups = (K + group - 1) / group;
  TORCH_CHECK(zeros.numel() == N * ngroups && w_scale.numel() == N * ngroups, "zeros/w_scale must be [N, ngroups]");
  const bool has_perm = perm.numel() > 0, has_premul = premul.numel() > 0;
  TORCH_CHECK(!has_perm || (perm.numel() == K && perm.scalar_type() == torch::kLong), "perm must be int64 [K]");
  TORCH_CHECK(!has_premul || (premul.numel() == K && premul.scalar_type() == torch::kFloat), "premul: fp32 [K]");
  int64_t ga = 1;
  std::vector<int64_t> act_cuts = {0, K};
  std::vector<float> act_scales = {1.f};
  std::vector<int32_t> act_zeros = {0};
  if (mode == 2) {
    ga = a_scale.numel();
    TORCH_CHECK(a_bounds.numel() == ga + 1 && a_bounds.scalar_type() == torch::kLong, "a_bounds: int64 [G + 1]");
    TORCH_CHECK(a_scale.scalar_type() == torch::kFloat && a_zero.scalar_type() == torch::kInt && a_zero.numel() == ga,
                "a_scale fp32 [G], a_zero int32 [G]");
    const int64_t* b = a_bounds.data_ptr<int64_t>();
    TORCH_CHECK(b[0] == 0 && b[ga] == K, "a_bounds must run from 0 to K");
    for (int64_t g = 0; g < ga; ++g) TORCH_CHECK(b[g] <= b[g + 1], "a_bounds must not decrease");
    act_cuts.assign(b, b + ga + 1);
    act_scales.assign(a_scale.data_ptr<float>(), a_scale.data_ptr<float>() + ga);
    act_zeros.assign(a_zero.data_ptr<int32_t>(), a_zero.data_ptr<int32_t>() + ga);
    for (float s : act_scales) TORCH_CHECK(s > 0 && std::isfinite(s), "activation scales must be positive");
  }
  // segments: every weight-group and activation-group boundary, and at most kBlockK columns
  // (int32 sums of products up to 255 * 255 stay far from overflow)
  std::vector<Segment> segs;
  {
    std::vector<int64_t> cuts(act_cuts.begin(), act_cuts.end());
    for (int64_t k = group; k < K; k += group) cuts.push_back(k);
    for (int64_t k = kBlockK; k < K; k += kBlockK) cuts.push_back(k);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    int64_t ag = 0;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      const int64_t k0 = cuts[i], k1 = cuts[i + 1];
      while (act_cuts[ag + 1] <= k0) ++ag;
      segs.push_back({k0, k1, k0 / group, act_scales[ag]});
    }
  }
  // blocks of consecutive segments covering about kBlockK columns each, so that an activation
  // tile stays in L1 while the weight rows pass; a single tile needs no blocking, and whole
  // rows stream from memory faster than pieces of them
  std::vector<std::pair<int64_t, int64_t>> kblocks;
  const int64_t M = x.size(0);
  if (M <= 4) kblocks.emplace_back(0, static_cast<int64_t>(segs.size()));
  for (size_t i = 0; M > 4 && i < segs.size();) {
    size_t j = i;
    int64_t width = 0;
    while (j < segs.size() && (j == i || width + (segs[j].k1 - segs[j].k0) <= kBlockK)) {
      width += segs[j].k1 - segs[j].k0;
      ++j;
    }
    kblocks.emplace_back(static_cast<int64_t>(i), static_cast<int64_t>(j));
    i = j;
  }
  const ActSpec act{has_perm ? perm.data_ptr<int64_t>() : nullptr, has_premul ? premul.data_ptr<float>() : nullptr,
                    static_cast<int>(mode), act_symmetric, static_cast<int>(act_qmax), act_cuts.data(),
                    act_scales.data(), act_zeros.data(), ga};
  torch::Tensor b;
  const float* pb = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias must hold N values");
    pb = b.data_ptr<float>();
  }
  auto zc = zeros.contiguous();
  auto sc = w_scale.contiguous();
  auto cc = codes.contiguous();
  if (bits == 8 && act_symmetric && codes_nonzero)
    return run<8, int8_t>(x, act, segs, kblocks, cc, N, row_bytes, zc, sc, ngroups, pb);
  if (bits == 8) return run<8, int16_t>(x, act, segs, kblocks, cc, N, row_bytes, zc, sc, ngroups, pb);
  if (act_symmetric) return run<4, int8_t>(x, act, segs, kblocks, cc, N, row_bytes, zc, sc, ngroups, pb);
  return run<4, int16_t>(x, act, segs, kblocks, cc, N, row_bytes, zc, sc, ngroups, pb);
}

// Per-token symmetric 8-bit codes of v = (x - shift) * premul (each optional), as the Python
// reference computes them (ActFormat: scale = max(|min|, |max|, 1e-8) / 127 over the row with 0
// included, q = round-half-even(v / scale) clamped to [-128, 127]), for an int8 GEMM run elsewhere
// (torch._int_mm): one pass per row instead of eight tensor operations over the whole input.
std::vector<torch::Tensor> quantize_tokens_int8(torch::Tensor x, c10::optional<torch::Tensor> shift,
                                                c10::optional<torch::Tensor> premul) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: fp32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  torch::Tensor sh, pm;
  if (shift.has_value()) {
    sh = shift->contiguous();
    TORCH_CHECK(sh.scalar_type() == torch::kFloat && sh.numel() == K, "shift: fp32 [K]");
  }
  if (premul.has_value()) {
    pm = premul->contiguous();
    TORCH_CHECK(pm.scalar_type() == torch::kFloat && pm.numel() == K, "premul: fp32 [K]");
  }
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto scales = torch::empty({M}, x.options());
  const float* px = x.data_ptr<float>();
  const float* ps = shift.has_value() ? sh.data_ptr<float>() : nullptr;
  const float* pp = premul.has_value() ? pm.data_ptr<float>() : nullptr;
  int8_t* pc = codes.data_ptr<int8_t>();
  float* pscale = scales.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> v(K);
    std::vector<int32_t> q(K);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = px + m * K;
      for (int64_t k = 0; k < K; ++k) {
        float t = ps ? row[k] - ps[k] : row[k];
        v[k] = pp ? t * pp[k] : t;
      }
      float lo, hi;
      range_of(v.data(), K, lo, hi);
      const float scale = std::max(std::max(std::fabs(lo), std::fabs(hi)), 1e-8f) / 127.f;
      quantize_span(v.data(), q.data(), 0, K, scale, 0.f, -128.f, 127.f);
      narrow(q.data(), pc + m * K, K);
      pscale[m] = scale;
    }
  });
  return {codes, scales};
}

// y[m, n] = acc[m, n] * row_scale[m] * col_scale[n] (+ bias[n]) in one pass: the epilogue of an
// int8 GEMM done elsewhere (torch._int_mm), which as separate tensor operations costs four
// passes over the output and fresh allocations, more than the GEMM itself at large batches.
torch::Tensor rescale_int32(torch::Tensor acc, torch::Tensor row_scale, torch::Tensor col_scale,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt && acc.is_contiguous(), "acc: contiguous int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat && row_scale.numel() == M, "row_scale: fp32 [M]");
  TORCH_CHECK(col_scale.scalar_type() == torch::kFloat && col_scale.numel() == N, "col_scale: fp32 [N]");
  if (bias.has_value()) TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N, "bias: fp32 [N]");
  auto rs = row_scale.contiguous(), cs = col_scale.contiguous();
  auto y = torch::empty({M, N}, acc.options().dtype(torch::kFloat));
  const int32_t* a = acc.data_ptr<int32_t>();
  const float* r = rs.data_ptr<float>();
  const float* c = cs.data_ptr<float>();
  const float* b = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  float* o = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* am = a + m * N;
      float* om = o + m * N;
      const float sm = r[m];
      if (b) {
        for (int64_t n = 0; n < N; ++n) om[n] = static_cast<float>(am[n]) * sm * c[n] + b[n];
      } else {
        for (int64_t n = 0; n < N; ++n) om[n] = static_cast<float>(am[n]) * sm * c[n];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_tokens_int8", &quantize_tokens_int8, "per-token symmetric int8 codes and scales of an fp32 input");
  m.def("rescale_int32", &rescale_int32, "int32 GEMM output times row and column scales (+ bias) as fp32");
  m.def("int8_linear", &int8_linear, "int activations x 8/4-bit weight codes, exact integer accumulation (AVX2)");
}
