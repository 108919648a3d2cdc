// The nearest codebook entry of every vector under a per-dimension weighted squared distance:
// k-means' E-step for GPTVQ's codebooks (lowbit/formats/vector.py), fused so that no [n, E]
// score tensor is ever written.
//
// For each vector x (d components, weights w) of block b, the score of entry e is
//     s_e = sum_j w_j * ((x_j - c_ej) * (x_j - c_ej))
// formed left to right from 0, and the answer is the lowest e with the smallest s_e (torch.argmin's
// rule). The file is compiled with -ffp-contract=off, so no multiply-add is fused and every SIMD
// lane performs exactly the scalar operations in that order: the AVX-512, AVX2 and portable
// builds of the same loop give identical indices, and so does PyTorch's direct form of the sum.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <int D>
__attribute__((always_inline)) inline void assign_range(const float* x, const float* w, const float* ct, int64_t e_count,
                                                        int64_t begin, int64_t end, int64_t* out, float* score) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * D;
    const float* wi = w + i * D;
    float xv[D], wv[D];
    for (int j = 0; j < D; ++j) {
      xv[j] = xi[j];
      wv[j] = wi[j];
    }
#pragma omp simd
    for (int64_t e = 0; e < e_count; ++e) {
      float s = 0.0f;
      for (int j = 0; j < D; ++j) {
        const float t = xv[j] - ct[j * e_count + e];
        s = s + wv[j] * (t * t);
      }
      score[e] = s;
    }
    float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
    for (int64_t e = 0; e < e_count; ++e) m = score[e] < m ? score[e] : m;
    int32_t best = int32_t(e_count);
#pragma omp simd reduction(min : best)
    for (int32_t e = 0; e < int32_t(e_count); ++e) best = (score[e] == m && e < best) ? e : best;
    out[i] = best < e_count ? best : 0;  // every score NaN: entry 0
  }
}

using Fn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t*, float*);

template <int D>
void assign_portable(const float* x, const float* w, const float* ct, int64_t e_count, int64_t begin, int64_t end,
                     int64_t* out, float* score) {
  assign_range<D>(x, w, ct, e_count, begin, end, out, score);
}

#if defined(__x86_64__) || defined(_M_X64)
template <int D>
__attribute__((target("avx2"))) void assign_avx2(const float* x, const float* w, const float* ct, int64_t e_count,
                                                 int64_t begin, int64_t end, int64_t* out, float* score) {
  assign_range<D>(x, w, ct, e_count, begin, end, out, score);
}

template <int D>
__attribute__((target("avx512f"))) void assign_avx512(const float* x, const float* w, const float* ct, int64_t e_count,
                                                      int64_t begin, int64_t end, int64_t* out, float* score) {
  assign_range<D>(x, w, ct, e_count, begin, end, out, score);
}
#endif

// 0 portable, 1 AVX2, 2 AVX-512; -1 the best this CPU has.
int best_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
#endif
  return 0;
}

template <int D>
Fn pick(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == 2) return assign_avx512<D>;
  if (isa == 1) return assign_avx2<D>;
#endif
  return assign_portable<D>;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names{"portable"};
  const int best = best_isa();
  if (best >= 1) names.push_back("avx2");
  if (best >= 2) names.push_back("avx512");
  return names;
}

// x, w: float32 [B, n, d]; books: float32 [B, E, d] -> int64 [B, n].
torch::Tensor vq_assign(torch::Tensor x, torch::Tensor w, torch::Tensor books, int64_t isa) {
  TORCH_CHECK(x.dim() == 3 && w.sizes() == x.sizes(), "vq_assign: x and w must both be [B, n, d]");
  TORCH_CHECK(books.dim() == 3 && books.size(0) == x.size(0) && books.size(2) == x.size(2),
              "vq_assign: books must be [B, E, d] for x [B, n, d]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat &&
                  books.scalar_type() == torch::kFloat,
              "vq_assign: float32 tensors expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && books.device().is_cpu(), "vq_assign: CPU tensors expected");
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2), E = books.size(1);
  TORCH_CHECK(E > 0, "vq_assign: empty codebooks");
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= best_isa(), "vq_assign: this CPU lacks the requested instruction set");
  Fn fn = nullptr;
  switch (d) {
    case 1: fn = pick<1>(int(isa)); break;
    case 2: fn = pick<2>(int(isa)); break;
    case 4: fn = pick<4>(int(isa)); break;
    default: TORCH_CHECK(false, "vq_assign: vectors of 1, 2 or 4 components, not ", d);
  }
  x = x.contiguous();
  w = w.contiguous();
  auto ct = books.transpose(1, 2).contiguous();  // [B, d, E]: entries contiguous per component
  auto out = torch::empty({B, n}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* cp = ct.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / E);
  at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(E);
    while (begin < end) {
      const int64_t b = begin / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      fn(xp + b * n * d, wp + b * n * d, cp + b * d * E, E, begin - b * n, stop - b * n, op + b * n, score.data());
      begin = stop;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq_assign", &vq_assign, "nearest codebook entries under a weighted squared distance", py::arg("x"),
        py::arg("w"), py::arg("books"), py::arg("isa") = -1);
  m.def("available_isas", &available_isas, "instruction sets this CPU runs vq_assign with");
}
