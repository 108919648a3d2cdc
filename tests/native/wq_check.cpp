// lowbit's weight-only CPU kernels checked on their own, without PyTorch: every path this CPU
// runs (portable; AVX2 and AVX-512 on x86; NEON on AArch64) against a float64 reference.
//   - dequantized blocks (whole rows, and a column range written with a row stride) must be
//     bit-identical to (q - z) * s computed in scalar float, as QuantizedWeight.dequantize does;
//   - the GEMV row kernels (1-5 activation rows), the integer-digit kernels (x86) and the fused
//     dequantize-GEMM (x86) must agree with float64 to 1e-5 of each output's |x| @ |W|.
// tests/test_native_kernels.py builds it for this CPU, and for AArch64 (static, Debian's
// aarch64-linux-gnu-g++) to run under qemu-aarch64, which is how the NEON path is checked on an
// x86 machine. Exit status 0 when every check passes.
#define LOWBIT_NO_TORCH 1
#include "wq_gemm.cpp"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

struct Case {
  int bits, group, K, N;
  bool sym, half;
};

int failures = 0, checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

std::string name(int64_t isa) {
  return isa == kPortable ? "portable" : isa == kAvx2 ? "avx2" : isa == kAvx512 ? "avx512" : "neon";
}

void check_case(const Case& c, std::mt19937& rng) {
  const int64_t N = c.N, K = c.K, G = (K + c.group - 1) / c.group;
  std::uniform_int_distribution<int> byte(0, 255), zero(0, (1 << c.bits) - 1), mant(0, 1023), ex(5, 12);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> codes(static_cast<size_t>(N * K * c.bits / 8));
  for (auto& b : codes) b = static_cast<uint8_t>(byte(rng));
  std::vector<at::Half> hs(static_cast<size_t>(N * G));
  std::vector<float> fs(hs.size());
  for (size_t i = 0; i < hs.size(); ++i) {  // fp16 scales 2^-ex * (1 + m / 1024), the same values as fp32
    hs[i].x = static_cast<uint16_t>(((15 - ex(rng)) << 10) | mant(rng));
    fs[i] = static_cast<float>(hs[i]);
  }
  std::vector<uint8_t> zeros(static_cast<size_t>(N * G));
  for (auto& z : zeros) z = static_cast<uint8_t>(zero(rng));
  Problem p{};
  p.codes = codes.data();
  if (c.half) p.half_scales = hs.data();
  else p.float_scales = fs.data();
  p.zeros = c.sym ? nullptr : zeros.data();
  p.default_zero = static_cast<float>(1 << (c.bits - 1));
  p.N = N;
  p.K = K;
  p.group = c.group;
  p.G = G;
  // the reference weight, (q - z) * s in scalar float
  std::vector<float> w(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int q = c.bits == 8 ? codes[n * K + k] : (codes[(n * K + k) / 2] >> (4 * (k % 2))) & 15;
      const float s = fs[n * G + k / c.group], z = c.sym ? p.default_zero : static_cast<float>(zeros[n * G + k / c.group]);
      w[n * K + k] = (static_cast<float>(q) - z) * s;
    }
  char tag[160];
  std::snprintf(tag, sizeof tag, "int%d g%d K=%d N=%d %s %s scales", c.bits, c.group, c.K, c.N, c.sym ? "sym" : "asym",
                c.half ? "fp16" : "fp32");
  for (int64_t isa : {kPortable, kAvx2, kAvx512, kNeon}) {
    if (!isa_available(isa)) continue;
    const std::string at_isa = std::string(tag) + " " + name(isa);
    // dequantized blocks: whole rows, then rows 1.. and an even column range with a wider stride
    std::vector<float> out(static_cast<size_t>(N * K));
    dequant_block(p, c.bits, isa, 0, N, 0, K, out.data(), K);
    expect(std::memcmp(out.data(), w.data(), out.size() * sizeof(float)) == 0, at_isa + ": dequantized rows");
    const int64_t k0 = 2 * (K / 6), k1 = K - 2, ld = K + 3;
    std::vector<float> part(static_cast<size_t>(N * ld), -1.f);
    dequant_block(p, c.bits, isa, 1, N, k0, k1, part.data(), ld);
    bool same = true;
    for (int64_t n = 1; n < N; ++n)
      for (int64_t k = k0; k < k1; ++k) same &= part[(n - 1) * ld + (k - k0)] == w[n * K + k];
    expect(same, at_isa + ": dequantized column range");
    // the GEMV kernels, then (x86) the digit kernels and the fused GEMM
    for (int64_t M : {1, 2, 3, 4, 5, 9, 40}) {
      std::vector<float> x(static_cast<size_t>(M * K));
      for (auto& v : x) v = normal(rng);
      std::vector<double> ref(static_cast<size_t>(M * N)), mag(ref.size());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double a = 0, b = 0;
          for (int64_t k = 0; k < K; ++k) {
            a += static_cast<double>(x[m * K + k]) * w[n * K + k];
            b += std::fabs(static_cast<double>(x[m * K + k]) * w[n * K + k]);
          }
          ref[m * N + n] = a;
          mag[m * N + n] = b;
        }
      auto worst = [&](const std::vector<float>& y) {
        double e = 0;
        for (size_t i = 0; i < ref.size(); ++i) e = std::max(e, std::fabs(y[i] - ref[i]) / std::max(mag[i], 1e-30));
        return e;
      };
      char rows[64];
      std::snprintf(rows, sizeof rows, ", %lld rows", static_cast<long long>(M));
      Problem q = p;
      q.M = M;
      std::vector<float> scratch, y(static_cast<size_t>(M * N), 0.f);
      prepare_floats(q, x.data(), c.bits, scratch);
      q.y = y.data();
      for (int64_t n = 0; n < N; ++n) {
        int64_t m = 0;
        for (; m + kChunk <= M; m += kChunk) row_fn_for(kChunk, c.bits, isa)(q, n, m, 0, G);
        if (m < M) row_fn_for(M % kChunk, c.bits, isa)(q, n, m, 0, G);
      }
      const double e = worst(y);
      expect(e < 1e-5, at_isa + rows + ": GEMV error " + std::to_string(e));
#ifdef LOWBIT_X86
      if (isa == kPortable) continue;
      if (c.bits == 4 && c.group % 32 == 0) {  // the integer-digit kernels
        Problem d = p;
        d.M = M;
        std::vector<int8_t> digits;
        std::vector<float> bscale, xsum(static_cast<size_t>(M * G));
        std::vector<float> yd(static_cast<size_t>(M * N), 0.f);
        expect(prepare_digits(d, x.data(), isa, digits, bscale, xsum.data()), at_isa + rows + ": digits prepared");
        d.xsum = xsum.data();
        d.y = yd.data();
        for (int64_t n = 0; n < N; ++n) {
          int64_t m = 0;
          for (; m + kChunk <= M; m += kChunk) digits_fn_for(kChunk, isa)(d, n, m, 0, d.NB);
          if (m < M) digits_fn_for(M % kChunk, isa)(d, n, m, 0, d.NB);
        }
        const double ed = worst(yd);
        expect(ed < 1e-5, at_isa + rows + ": digit GEMV error " + std::to_string(ed));
      }
      if (isa == kAvx512 && c.bits == 4 && c.group % 128 == 0 && amx_usable()) {  // the digit GEMM on AMX tiles
        std::vector<float> ya(static_cast<size_t>(M * N), -7.f);
        Problem a = p;
        a.M = M;
        expect(amx_digit_gemm(a, x.data(), ya.data()), at_isa + rows + ": AMX digits prepared");
        const double ea = worst(ya);
        expect(ea < 1e-5, at_isa + rows + ": AMX digit GEMM error " + std::to_string(ea));
      }
      std::vector<float> yf(static_cast<size_t>(M * N));
      Problem f = p;
      f.M = M;
      fused_gemm(f, c.bits, isa, x.data(), nullptr, yf.data());
      const double ef = worst(yf);
      expect(ef < 1e-5, at_isa + rows + ": fused GEMM error " + std::to_string(ef));
#endif
    }
  }
}

}  // namespace

int main() {
  std::printf("paths:");
  for (int64_t isa : {kPortable, kAvx2, kAvx512, kNeon})
    if (isa_available(isa)) std::printf(" %s", name(isa).c_str());
#ifdef LOWBIT_X86
  if (amx_usable()) std::printf(" +amx");
#endif
  std::printf("\n");
  std::mt19937 rng(7);
  const Case cases[] = {
      {4, 128, 300, 13, false, true},  {4, 128, 1100, 37, false, false}, {4, 256, 1024, 19, true, true}, {4, 64, 288, 9, true, true},
      {4, 32, 300, 13, true, false},   {4, 96, 300, 6, false, true},    {4, 8, 64, 5, true, true},
      {4, 300, 300, 4, false, false},  {8, 64, 300, 13, false, true},   {8, 300, 300, 7, true, false},
      {4, 160, 1000, 9, false, true},  {4, 32, 4200, 7, false, false},  {4, 96, 4200, 5, true, true},
      {8, 24, 100, 5, true, true},
  };
  for (const Case& c : cases) check_case(c, rng);
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures ? 1 : 0;
}
