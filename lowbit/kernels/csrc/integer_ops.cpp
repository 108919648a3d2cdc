// Fused integer elementwise ops of integer-only encoders (lowbit/kernels/integer.py):
// dyadic requantization, the integer softmax (I-BERT's polynomial exp or I-ViT's
// shift exp), I-LayerNorm with its integer Newton root, and the two integer GELUs.
//
// Each computes exactly what the composite PyTorch path computes, op for op, in
// int64: arithmetic right shift is floor division by a power of two, division
// of a possibly negative numerator by a positive divisor rounds down. Portable
// C++ (no intrinsics): the compiler vectorizes the inner loops where it can.
// Rows are split across threads with at::parallel_for.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

inline int64_t floordiv(int64_t a, int64_t b) {  // b > 0
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

inline int64_t shr(int64_t a, int64_t s) { return a >> s; }  // arithmetic on two's complement

inline int64_t clampv(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <typename In, typename Out>
void requant_rows(const In* x, Out* y, int64_t rows, int64_t cols, int64_t pre, const int64_t* m,
                  const int64_t* s, bool per_channel, const int64_t* bias, int64_t lo, int64_t hi) {
  // per-channel constants spelled out once, so the inner loop is branch-free (vectorizable where the
  // target has 64-bit multiplies and variable arithmetic shifts)
  std::vector<int64_t> mv(cols), sv(cols), hv(cols), bv(cols);
  for (int64_t c = 0; c < cols; ++c) {
    mv[c] = per_channel ? m[c] : m[0];
    sv[c] = per_channel ? s[c] : s[0];
    hv[c] = (int64_t(1) << sv[c]) >> 1;
    bv[c] = bias ? bias[c] : 0;
  }
  const int64_t* M = mv.data();
  const int64_t* S = sv.data();
  const int64_t* H = hv.data();
  const int64_t* B = bv.data();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In* xr = x + r * cols;
      Out* yr = y + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t v = (((int64_t(xr[c]) + B[c]) >> pre) * M[c] + H[c]) >> S[c];
        yr[c] = static_cast<Out>(v < lo ? lo : (v > hi ? hi : v));
      }
    }
  });
}

template <typename In>
torch::Tensor requant_in(const torch::Tensor& x, int64_t pre, const torch::Tensor& m, const torch::Tensor& s,
                         const torch::Tensor& bias, int64_t lo, int64_t hi, torch::ScalarType out_type) {
  const int64_t cols = x.size(-1), rows = x.numel() / std::max<int64_t>(cols, 1);
  const bool per_channel = m.numel() > 1;
  TORCH_CHECK(!per_channel || m.numel() == cols, "requant: one multiplier per channel of the last axis");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == cols, "requant: one bias per channel of the last axis");
  auto y = torch::empty(x.sizes(), x.options().dtype(out_type));
  const In* xp = x.data_ptr<In>();
  const int64_t* mp = m.data_ptr<int64_t>();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* bp = bias.numel() ? bias.data_ptr<int64_t>() : nullptr;
  if (out_type == torch::kInt8)
    requant_rows(xp, y.data_ptr<int8_t>(), rows, cols, pre, mp, sp, per_channel, bp, lo, hi);
  else if (out_type == torch::kInt32)
    requant_rows(xp, y.data_ptr<int32_t>(), rows, cols, pre, mp, sp, per_channel, bp, lo, hi);
  else
    requant_rows(xp, y.data_ptr<int64_t>(), rows, cols, pre, mp, sp, per_channel, bp, lo, hi);
  return y;
}

}  // namespace

// y = clamp((((x + bias) >> pre) * m + 2^(s-1)) >> s, lo, hi), m and s one per tensor or per last-axis
// channel, bias (optional) per channel.
torch::Tensor requant(torch::Tensor x, int64_t pre, torch::Tensor m, torch::Tensor s, torch::Tensor bias, int64_t lo,
                      int64_t hi, torch::ScalarType out_type) {
  x = x.contiguous();
  m = m.to(torch::kInt64).contiguous();
  s = s.to(torch::kInt64).contiguous();
  bias = bias.to(torch::kInt64).contiguous();
  switch (x.scalar_type()) {
    case torch::kInt8: return requant_in<int8_t>(x, pre, m, s, bias, lo, hi, out_type);
    case torch::kInt32: return requant_in<int32_t>(x, pre, m, s, bias, lo, hi, out_type);
    case torch::kInt64: return requant_in<int64_t>(x, pre, m, s, bias, lo, hi, out_type);
    default: TORCH_CHECK(false, "requant takes int8/int32/int64 tensors");
  }
}

namespace {

// exp(x * S) for integer x <= 0; kind 0 = I-BERT polynomial, 1 = I-ViT shift form.
inline int64_t int_exp(int64_t x, int64_t kind, int64_t x0, int64_t b, int64_t c, int64_t max_shift) {
  if (kind == 1) x = x + shr(x, 1) - shr(x, 4);
  x = std::max(x, -max_shift * x0);
  const int64_t z = floordiv(-x, x0);
  const int64_t r = x + z * x0;
  if (kind == 0) {
    const int64_t t = r + b;
    return shr(t * t + c, z);
  }
  return shr((shr(r, 1) + x0) * (int64_t(1) << 16), z);
}

}  // namespace

// Softmax over the last axis of integer scores [rows, T]; keep: [batch, T] key mask (or empty),
// rows_per_batch rows share one keep row. Probabilities at scale 2^-bits, as int32.
torch::Tensor softmax(torch::Tensor x, torch::Tensor keep, int64_t rows_per_batch, int64_t kind, int64_t x0,
                      int64_t b, int64_t c, int64_t max_shift, int64_t bits) {
  x = x.to(torch::kInt64).contiguous();
  const bool masked = keep.defined() && keep.numel() > 0;
  if (masked) keep = keep.to(torch::kInt64).contiguous();
  const int64_t t = x.size(-1), rows = x.numel() / std::max<int64_t>(t, 1);
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kInt32));
  const int64_t* xp = x.data_ptr<int64_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  const int64_t* kp = masked ? keep.data_ptr<int64_t>() : nullptr;
  const int64_t top = (int64_t(1) << bits) - 1, neg = -(int64_t(1) << 40);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> e(t);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* xr = xp + r * t;
      const int64_t* kr = masked ? kp + (r / rows_per_batch) * t : nullptr;
      int64_t mx = INT64_MIN;
      for (int64_t j = 0; j < t; ++j) mx = std::max(mx, (kr && kr[j] == 0) ? neg : xr[j]);
      int64_t total = 0;
      for (int64_t j = 0; j < t; ++j) {
        const int64_t v = (kr && kr[j] == 0) ? neg : xr[j];
        e[j] = (kr && kr[j] == 0) ? 0 : int_exp(v - mx, kind, x0, b, c, max_shift);
        total += e[j];
      }
      for (int64_t j = 0; j < t; ++j) {
        const int64_t p = floordiv(e[j] * (int64_t(1) << (bits + 1)) + total, total * 2);
        yp[r * t + j] = static_cast<int32_t>(clampv(p, 0, top));
      }
    }
  });
  return y;
}

// I-LayerNorm over the last axis: integer mean and variance, Newton root from 2^start_bits, fixed-point
// normalize (2^frac), integer affine, then round-shift by s and clamp. Output int8 or int32.
torch::Tensor layernorm(torch::Tensor x, int64_t eps, int64_t up, int64_t frac, torch::Tensor gamma,
                        torch::Tensor beta, int64_t s, int64_t lo, int64_t hi, int64_t start_bits, int64_t iterations,
                        torch::ScalarType out_type) {
  x = x.to(torch::kInt64).contiguous();
  gamma = gamma.to(torch::kInt64).contiguous();
  beta = beta.to(torch::kInt64).contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  auto y64 = torch::empty(x.sizes(), x.options());
  const int64_t* xp = x.data_ptr<int64_t>();
  int64_t* yp = y64.data_ptr<int64_t>();
  const int64_t* gp = gamma.data_ptr<int64_t>();
  const int64_t* bp = beta.data_ptr<int64_t>();
  const int64_t half = (int64_t(1) << s) >> 1;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> yv(n);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* xr = xp + r * n;
      int64_t total = 0;
      for (int64_t j = 0; j < n; ++j) total += xr[j];
      const int64_t mean = floordiv(total + n / 2, n);
      int64_t sq = 0;
      for (int64_t j = 0; j < n; ++j) {
        yv[j] = (xr[j] - mean) * (int64_t(1) << up);
        sq += yv[j] * yv[j];
      }
      const int64_t var = floordiv(sq, n) + eps;
      int64_t root = int64_t(1) << start_bits;
      for (int64_t i = 0; i < iterations; ++i)
        root = std::max<int64_t>(std::min(root, shr(root + floordiv(var, root), 1)), 1);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t normed = floordiv(yv[j] * (int64_t(1) << (frac + 1)) + root, root * 2);
        yp[r * n + j] = clampv(shr(normed * gp[j] + bp[j] + half, s), lo, hi);
      }
    }
  });
  return y64.to(out_type);
}

// I-BERT's i-GELU (kind 0) or I-ViT's ShiftGELU (kind 1) of integer x, as int64 (scale in GeluConstants).
torch::Tensor gelu(torch::Tensor x, int64_t kind, int64_t b, int64_t c, int64_t x0, int64_t max_shift,
                   int64_t frac_bits) {
  x = x.to(torch::kInt64).contiguous();
  auto y = torch::empty_like(x);
  const int64_t* xp = x.data_ptr<int64_t>();
  int64_t* yp = y.data_ptr<int64_t>();
  at::parallel_for(0, x.numel(), 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t v = xp[i];
      if (kind == 0) {
        const int64_t sgn = (v > 0) - (v < 0);
        const int64_t t = std::min(v < 0 ? -v : v, -b) + b;
        const int64_t erf = sgn * (t * t + c);
        yp[i] = (v * -1) * (erf + c);
      } else {
        const int64_t t = v + shr(v, 1) + shr(v, 3) + shr(v, 4);
        const int64_t top = std::max<int64_t>(t, 0);
        const int64_t e1 = int_exp(t - top, 1, x0, 0, 0, max_shift);
        const int64_t e0 = int_exp(-top, 1, x0, 0, 0, max_shift);
        yp[i] = v * floordiv(e1 * (int64_t(1) << frac_bits), e0 + e1);
      }
    }
  });
  return y;
}

namespace {

template <typename A>
void bmm_nt_impl(const A* a, const int8_t* b, int32_t* c, int64_t batch, int64_t m, int64_t n, int64_t k) {
  at::parallel_for(0, batch * m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / m;
      const A* ar = a + r * k;
      const int8_t* bb = b + bi * n * k;
      int32_t* cr = c + r * n;
      for (int64_t j = 0; j < n; ++j) {
        const int8_t* br = bb + j * k;
        int32_t acc = 0;
        for (int64_t t = 0; t < k; ++t) acc += int32_t(ar[t]) * int32_t(br[t]);
        cr[j] = acc;
      }
    }
  });
}

}  // namespace

// c[..., i, j] = sum_t a[..., i, t] b[..., j, t]: a int8 or uint8 [B, M, K], b int8 [B, N, K], exact int32.
torch::Tensor bmm_nt(torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(a.dim() >= 2 && b.dim() == a.dim(), "bmm_nt takes batched matrices of the same rank");
  TORCH_CHECK(b.scalar_type() == torch::kInt8, "bmm_nt: b must be int8");
  TORCH_CHECK(a.size(-1) == b.size(-1), "bmm_nt: a and b disagree on the summed axis");
  a = a.contiguous();
  b = b.contiguous();
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-2);
  const int64_t batch = a.numel() / std::max<int64_t>(m * k, 1);
  TORCH_CHECK(b.numel() == batch * n * k, "bmm_nt: a and b disagree on the batch");
  auto sizes = a.sizes().vec();
  sizes.back() = n;
  auto c = torch::empty(sizes, a.options().dtype(torch::kInt32));
  if (a.scalar_type() == torch::kUInt8)
    bmm_nt_impl(a.data_ptr<uint8_t>(), b.data_ptr<int8_t>(), c.data_ptr<int32_t>(), batch, m, n, k);
  else if (a.scalar_type() == torch::kInt8)
    bmm_nt_impl(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), c.data_ptr<int32_t>(), batch, m, n, k);
  else
    TORCH_CHECK(false, "bmm_nt: a must be int8 or uint8");
  return c;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("bmm_nt", &bmm_nt, "batched int8 a @ b^T, int32");
  mod.def("requant", &requant, "dyadic requantization");
  mod.def("softmax", &softmax, "integer softmax");
  mod.def("layernorm", &layernorm, "integer LayerNorm");
  mod.def("gelu", &gelu, "integer GELU");
}
