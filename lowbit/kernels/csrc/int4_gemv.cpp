// 4-bit weight-only GEMV for small batches on AVX-512 CPUs, reading lowbit's own
// packed layout directly: row-major codes, two per byte, the even column in the
// low nibble. A weight is (q - z) * s with one fp16 scale and one uint8 zero per
// group, so for each row n and group g
//
//     y[m, n] += s[n, g] * (sum_k q[n, k] * x[m, k]  -  z[n, g] * sum_k x[m, k])
//
// The inner sum runs in fp32 on integer codes; activations stay fp32 (no bf16
// rounding). Columns are pre-split into even and odd halves so that the low and
// high nibbles of 16 consecutive bytes meet 16 contiguous activations each.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

constexpr int kMaxBatch = 8;

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// M is a template parameter so that the accumulators live in registers.
template <int M>
void gemv_rows(const uint8_t* codes, const at::Half* scales, const uint8_t* zeros, const float* xe,
               const float* xo, const float* xsum, float* y, int64_t N, int64_t K, int64_t group,
               int64_t ngroups, int64_t row_begin, int64_t row_end) {
  const int64_t half_k = K / 2;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint8_t* row = codes + n * half_k;
    __m512 total[M];
    float offset[M];
    for (int64_t m = 0; m < M; ++m) {
      total[m] = _mm512_setzero_ps();
      offset[m] = 0.f;
    }
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t k0 = g * group;
      const int64_t k1 = std::min(K, k0 + group);
      // four independent accumulator chains per batch row hide the FMA latency
      __m512 acc[M][4];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
      int64_t k = k0;
      for (; k + 64 <= k1; k += 64) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2));
        const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0F));
        const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
        const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
        const __m512 f2 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
        const __m512 f3 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
        for (int m = 0; m < M; ++m) {
          const float* e = xe + m * half_k + k / 2;
          const float* o = xo + m * half_k + k / 2;
          acc[m][0] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(e), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(o), acc[m][1]);
          acc[m][2] = _mm512_fmadd_ps(f2, _mm512_loadu_ps(e + 16), acc[m][2]);
          acc[m][3] = _mm512_fmadd_ps(f3, _mm512_loadu_ps(o + 16), acc[m][3]);
        }
      }
      for (; k < k1; k += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
        const __m512 flo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
        const __m512 fhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
        for (int m = 0; m < M; ++m) {
          acc[m][0] = _mm512_fmadd_ps(flo, _mm512_loadu_ps(xe + m * half_k + k / 2), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(fhi, _mm512_loadu_ps(xo + m * half_k + k / 2), acc[m][1]);
        }
      }
      const float s = static_cast<float>(scales[n * ngroups + g]);
      const float zs = s * static_cast<float>(zeros[n * ngroups + g]);
      const __m512 vs = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
        offset[m] += zs * xsum[m * ngroups + g];
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = hsum(total[m]) - offset[m];
  }
}

#ifdef __AVX512BF16__
// The same sum with AVX512-BF16 dot products: codes 0..15 are exact in bf16, the
// activations are rounded to bf16, products accumulate in fp32. Per 64 weights:
// one widening load, two nibble masks, two table lookups and two dpbf16.
template <int M>
void gemv_rows_bf16(const uint8_t* codes, const at::Half* scales, const uint8_t* zeros, const uint16_t* xe,
                    const uint16_t* xo, const float* xsum, float* y, int64_t N, int64_t K, int64_t group,
                    int64_t ngroups, int64_t row_begin, int64_t row_end) {
  const int64_t half_k = K / 2;
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    const float v = static_cast<float>(i & 15);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    table[i] = static_cast<uint16_t>(bits >> 16);  // small integers are exact in bf16
  }
  const __m512i lut = _mm512_load_si512(table);
  const __m512i mask = _mm512_set1_epi16(0x0F);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint8_t* row = codes + n * half_k;
    __m512 total[M];
    float offset[M];
    for (int m = 0; m < M; ++m) {
      total[m] = _mm512_setzero_ps();
      offset[m] = 0.f;
    }
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t k0 = g * group;
      const int64_t k1 = std::min(K, k0 + group);
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      int64_t k = k0;
      for (; k + 64 <= k1; k += 64) {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2)));
        const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, mask), lut);
        const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
        for (int m = 0; m < M; ++m) {
          const uint16_t* e = xe + m * half_k + k / 2;
          const uint16_t* o = xo + m * half_k + k / 2;
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], lo, (__m512bh)_mm512_loadu_si512(e));
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], hi, (__m512bh)_mm512_loadu_si512(o));
        }
      }
      for (; k < k1; k += 32) {  // a 32-wide tail: half a vector, the upper lanes masked off
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2))));
        const __m512i lo = _mm512_maskz_permutexvar_epi16(0xFFFF, _mm512_and_si512(w, mask), lut);
        const __m512i hi = _mm512_maskz_permutexvar_epi16(0xFFFF, _mm512_srli_epi16(w, 4), lut);
        for (int m = 0; m < M; ++m) {
          const __m512i e = _mm512_maskz_loadu_epi16(0xFFFF, xe + m * half_k + k / 2);
          const __m512i o = _mm512_maskz_loadu_epi16(0xFFFF, xo + m * half_k + k / 2);
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)lo, (__m512bh)e);
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)hi, (__m512bh)o);
        }
      }
      const float s = static_cast<float>(scales[n * ngroups + g]);
      const float zs = s * static_cast<float>(zeros[n * ngroups + g]);
      const __m512 vs = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][0], acc[m][1]), vs, total[m]);
        offset[m] += zs * xsum[m * ngroups + g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = hsum(total[m]) - offset[m];
  }
}
#endif

}  // namespace

// x: fp32 [M, K]; codes: uint8 [N * K / 2]; scales: fp16 [N, ngroups]; zeros: uint8 [N, ngroups].
// use_bf16 selects the AVX512-BF16 path (activations rounded to bf16) where it was compiled in.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                        int64_t N, int64_t group, bool use_bf16) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be fp32 [M, K]");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && zeros.scalar_type() == torch::kUInt8, "codes/zeros: uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf, "scales must be fp16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= kMaxBatch, "int4_gemv handles at most ", kMaxBatch, " rows");
  TORCH_CHECK(K % 32 == 0 && group % 32 == 0, "K and the group size must be multiples of 32");
  const int64_t ngroups = (K + group - 1) / group;
  TORCH_CHECK(codes.numel() == N * K / 2 && scales.numel() == N * ngroups && zeros.numel() == N * ngroups,
              "codes, scales and zeros do not match N, K and the group size");
  x = x.contiguous();
  // even / odd columns, and per-group activation sums for the zero-point term
  auto xv = x.view({M, K / 2, 2});
  auto xsum = torch::nn::functional::pad(x, torch::nn::functional::PadFuncOptions({0, ngroups * group - K}))
                  .view({M, ngroups, group})
                  .sum(-1)
                  .contiguous();
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  const float* ps = xsum.data_ptr<float>();
  float* py = y.data_ptr<float>();
#ifdef __AVX512BF16__
  if (use_bf16) {
    auto xe = xv.select(2, 0).to(torch::kBFloat16).contiguous();
    auto xo = xv.select(2, 1).to(torch::kBFloat16).contiguous();
    const uint16_t* pe = reinterpret_cast<const uint16_t*>(xe.data_ptr<at::BFloat16>());
    const uint16_t* po = reinterpret_cast<const uint16_t*>(xo.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      switch (M) {
#define LOWBIT_ROWS(B) \
  case B:              \
    return gemv_rows_bf16<B>(c, s, z, pe, po, ps, py, N, K, group, ngroups, begin, end);
        LOWBIT_ROWS(1) LOWBIT_ROWS(2) LOWBIT_ROWS(3) LOWBIT_ROWS(4)
        LOWBIT_ROWS(5) LOWBIT_ROWS(6) LOWBIT_ROWS(7) LOWBIT_ROWS(8)
#undef LOWBIT_ROWS
      }
    });
    return y;
  }
#endif
  auto xe = xv.select(2, 0).contiguous();
  auto xo = xv.select(2, 1).contiguous();
  const float* pe = xe.data_ptr<float>();
  const float* po = xo.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    switch (M) {
#define LOWBIT_ROWS(B) \
  case B:              \
    return gemv_rows<B>(c, s, z, pe, po, ps, py, N, K, group, ngroups, begin, end);
      LOWBIT_ROWS(1) LOWBIT_ROWS(2) LOWBIT_ROWS(3) LOWBIT_ROWS(4)
      LOWBIT_ROWS(5) LOWBIT_ROWS(6) LOWBIT_ROWS(7) LOWBIT_ROWS(8)
#undef LOWBIT_ROWS
    }
  });
  return y;
}

bool has_bf16_path() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, "4-bit weight-only GEMV (AVX-512)");
  m.def("has_bf16_path", &has_bf16_path, "whether the AVX512-BF16 path was compiled in");
}
