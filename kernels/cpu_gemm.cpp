// Grouped bfloat16 GEMMs for CPUs with AVX512-BF16: the `avx512` backend of moe.kernels.
//
// Why our own: oneDNN, which runs torch's bfloat16 matmuls on the CPU, packs the whole
// weight into its blocked layout on every call and compiles a kernel for every new row
// count. An expert's group is 32-512 rows, and routing changes the counts every step, so
// both costs land on every call. Here the weight is read in its stored layout and only
// small panels are packed into cache, and one compiled kernel serves every shape.
//
// The micro-kernel: C[r][0:32] += sum over k-pairs of A(r, kp) . B(kp, 0:32), where one
// `vdpbf16ps` multiplies a broadcast pair of A's bfloat16 values with 16 pairs of B's and
// accumulates in float32. A is read where it lies (any row and pair stride); B comes as a
// packed panel [k-pairs][32 columns] of pairs. Each GEMM below picks which operand plays A
// so that the large one (the weight, or the weight gradient's output) needs no packing.
//
// Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int NR = 32;   // columns per micro-tile: two zmm registers of float32
constexpr int MR = 12;   // rows per micro-tile: 24 accumulators, 27 of 32 registers in use
constexpr int NC = 128;  // columns per task in x @ w (its packed weight panel stays in L2)
constexpr int OB = 96;   // weight rows per task in x @ w^T

using bf16 = uint16_t;

inline uint32_t load_pair(const bf16* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc[2r], acc[2r+1] = row r of the tile. A pair (r, kp) is at a + r*a_rs + kp*a_ks;
// k_odd adds one last k whose partner is zero (B's packed panel holds zeros there).
template <int R>
void micro(const bf16* a, int64_t a_rs, int64_t a_ks, int64_t kpairs, bool k_odd,
           const uint32_t* b, __m512* acc) {
  __m512 c[R][2];
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * NR);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * NR + 16);
    const bf16* ak = a + kp * a_ks;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      __m512bh av = (__m512bh)_mm512_set1_epi32(load_pair(ak + r * a_rs));
      c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
    }
  }
  if (k_odd) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kpairs * NR);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kpairs * NR + 16);
    const bf16* ak = a + kpairs * a_ks;
    for (int r = 0; r < R; ++r) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((uint32_t)ak[r * a_rs]);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[2 * r] = c[r][0];
    acc[2 * r + 1] = c[r][1];
  }
}

using MicroFn = void (*)(const bf16*, int64_t, int64_t, int64_t, bool, const uint32_t*, __m512*);
constexpr MicroFn MICRO[MR + 1] = {nullptr,    &micro<1>, &micro<2>,  &micro<3>,  &micro<4>,
                                   &micro<5>,  &micro<6>, &micro<7>,  &micro<8>,  &micro<9>,
                                   &micro<10>, &micro<11>, &micro<12>};

inline __mmask16 first_lanes(int n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // round to nearest even

// Rows x cols of the tile to c (row stride ldc), as bfloat16 or float32.
void store_tile(const __m512* acc, int rows, int cols, bf16* c, int64_t ldc) {
  __mmask16 m0 = first_lanes(cols), m1 = first_lanes(cols - 16);
  for (int r = 0; r < rows; ++r) {
    _mm256_mask_storeu_epi16(c + r * ldc, m0, to_bf16(acc[2 * r]));
    _mm256_mask_storeu_epi16(c + r * ldc + 16, m1, to_bf16(acc[2 * r + 1]));
  }
}

void store_tile(const __m512* acc, int rows, int cols, float* c, int64_t ldc) {
  __mmask16 m0 = first_lanes(cols), m1 = first_lanes(cols - 16);
  for (int r = 0; r < rows; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[2 * r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[2 * r + 1]);
  }
}

// 16 values (the first lanes of m) widened to the low halves of 32-bit lanes, from
// bfloat16 as they are or from float32 rounded to bfloat16 (to nearest even, as .to() does).
inline __m512i load_as_pair_halves(const bf16* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_as_pair_halves(const float* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(to_bf16(_mm512_maskz_loadu_ps(m, p)));
}

// n float32 values rounded to bfloat16.
void round_to_bf16(const float* src, int64_t n, bf16* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = first_lanes((int)std::min<int64_t>(16, n - i));
    _mm256_mask_storeu_epi16(dst + i, m, to_bf16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// The tile transposed: element (r, j) to c[j * ldc + r].
void store_tile_transposed(const __m512* acc, int rows, int cols, bf16* c, int64_t ldc) {
  alignas(64) bf16 t[MR][NR];
  for (int r = 0; r < rows; ++r) {
    _mm256_store_si256((__m256i*)&t[r][0], to_bf16(acc[2 * r]));
    _mm256_store_si256((__m256i*)&t[r][16], to_bf16(acc[2 * r + 1]));
  }
  for (int j = 0; j < cols; ++j)
    for (int r = 0; r < rows; ++r) c[j * ldc + r] = t[r][j];
}

// Row pairs of src (rows x cols, row stride ld) into panels of NR columns, zero-padded:
// dst[p][kp][j] = (src[2kp][p*NR + j], src[2kp + 1][p*NR + j]), in bfloat16.
template <typename T>
void pack_row_pairs(const T* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* dst) {
  int64_t kpairs = (rows + 1) / 2;
  for (int64_t p = 0; p * NR < cols; ++p) {
    int w = (int)std::min<int64_t>(NR, cols - p * NR);
    uint32_t* d = dst + p * kpairs * NR;
    for (int64_t kp = 0; kp < kpairs; ++kp) {
      const T* r0 = src + 2 * kp * ld + p * NR;
      bool second = 2 * kp + 1 < rows;
      for (int h = 0; h < 2; ++h) {
        __mmask16 m = first_lanes(w - 16 * h);
        __m512i lo = load_as_pair_halves(r0 + 16 * h, m);
        __m512i hi = second ? load_as_pair_halves(r0 + ld + 16 * h, m) : _mm512_setzero_si512();
        _mm512_storeu_si512(d + kp * NR + 16 * h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

// Panels of NR rows of src (rows x k, row stride ld), transposed by pairs, zero-padded:
// dst[p][kp][j] = (src[p*NR + j][2kp], src[p*NR + j][2kp + 1]).
void pack_transposed_pairs(const bf16* src, int64_t ld, int64_t rows, int64_t k, uint32_t* dst) {
  int64_t kpairs = (k + 1) / 2, full = k / 2;
  for (int64_t p = 0; p * NR < rows; ++p) {
    uint32_t* d = dst + p * kpairs * NR;
    for (int j = 0; j < NR; ++j) {
      int64_t r = p * NR + j;
      if (r >= rows) {
        for (int64_t kp = 0; kp < kpairs; ++kp) d[kp * NR + j] = 0;
        continue;
      }
      const bf16* s = src + r * ld;
      for (int64_t kp = 0; kp < full; ++kp) d[kp * NR + j] = load_pair(s + 2 * kp);
      if (k & 1) d[full * NR + j] = s[k - 1];
    }
  }
}

// Group bounds [0, offsets...] on the host (the tensor is on the CPU: no sync involved).
std::vector<int64_t> group_bounds(const at::Tensor& offsets) {
  auto off = offsets.to(at::kLong).contiguous();
  std::vector<int64_t> b(off.numel() + 1, 0);
  for (int64_t e = 0; e < off.numel(); ++e) b[e + 1] = off.data_ptr<int64_t>()[e];
  return b;
}

const bf16* data(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }
bf16* data_mut(at::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }

void check(const at::Tensor& t, const char* name, bool float32_ok = false) {
  const bool dtype_ok = t.scalar_type() == at::kBFloat16 || (float32_ok && t.scalar_type() == at::kFloat);
  TORCH_CHECK(dtype_ok && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous ",
              float32_ok ? "bfloat16 or float32" : "bfloat16", " CPU tensor");
}

// Packing buffers: uninitialized, and from torch's allocator, which gives large ones huge
// pages where enabled (moe sets THP_MEM_ALLOC_ENABLE), so first touch costs few page faults.
at::Tensor scratch(int64_t words) { return at::empty({std::max<int64_t>(words, 1)}, at::kInt); }
uint32_t* words(const at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

at::Tensor output_rows(const at::Tensor& x, int64_t cols, int64_t covered) {
  auto y = at::empty({x.size(0), cols}, x.options());
  if (covered < x.size(0)) y.narrow(0, covered, x.size(0) - covered).zero_();
  return y;
}

}  // namespace

// A float32 weight (autocast's master copy) is rounded to bfloat16 inside the kernels, a
// block at a time in cache, instead of as a whole new tensor before them: that cast and the
// cast of the bfloat16 gradient back were 14% of a small bfloat16 CPU training step.

// y[g] = x[g] @ w[e]^T with w [E, O, I] (the nn.Linear layout): computed as y^T = w @ x^T,
// so the weight is A, read in place (a float32 one rounded a block of MR rows at a time),
// and x^T is packed once per group.
at::Tensor gmm_x_wt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check(x, "x");
  check(w, "w", true);
  const bool w32 = w.scalar_type() == at::kFloat;
  const int64_t I = x.size(1), E = w.size(0), O = w.size(1), kpairs = (I + 1) / 2;
  auto b = group_bounds(offsets);
  auto y = output_rows(x, O, b[E]);
  std::vector<int64_t> first_panel(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) first_panel[e + 1] = first_panel[e] + (b[e + 1] - b[e] + NR - 1) / NR;
  auto xt_buffer = scratch(first_panel[E] * kpairs * NR);
  uint32_t* xt = words(xt_buffer);
  const bf16* xp = data(x);
  bf16* yp = data_mut(y);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e)
      pack_transposed_pairs(xp + b[e] * I, I, b[e + 1] - b[e], I, &xt[first_panel[e] * kpairs * NR]);
  });
  const int64_t blocks = (O + OB - 1) / OB;
  at::parallel_for(0, E * blocks, 1, [&](int64_t t0, int64_t t1) {
    __m512 acc[2 * MR];
    std::vector<bf16> rounded(w32 ? MR * I : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / blocks, rows = b[e + 1] - b[e];
      if (rows == 0) continue;
      for (int64_t o0 = t % blocks * OB; o0 < std::min(O, (t % blocks + 1) * OB); o0 += MR) {
        const int R = (int)std::min<int64_t>(MR, O - o0);
        const bf16* a = w32 ? rounded.data() : data(w) + (e * O + o0) * I;
        if (w32) round_to_bf16(w.data_ptr<float>() + (e * O + o0) * I, R * I, rounded.data());
        for (int64_t p = 0; p < first_panel[e + 1] - first_panel[e]; ++p) {
          MICRO[R](a, I, 2, I / 2, I & 1, &xt[(first_panel[e] + p) * kpairs * NR], acc);
          const int cols = (int)std::min<int64_t>(NR, rows - p * NR);
          store_tile_transposed(acc, R, cols, yp + (b[e] + p * NR) * O + o0, O);
        }
      }
    }
  });
  return y;
}

// y[g] = x[g] @ w[e] with w [E, I, O] contiguous: x is A, read in place; the weight is
// packed by row pairs, one panel of NC columns per task.
at::Tensor gmm_x_w(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check(x, "x");
  check(w, "w", true);
  const int64_t I = x.size(1), E = w.size(0), O = w.size(2), kpairs = (I + 1) / 2;
  auto b = group_bounds(offsets);
  auto y = output_rows(x, O, b[E]);
  const bf16* xp = data(x);
  bf16* yp = data_mut(y);
  const int64_t blocks = (O + NC - 1) / NC;
  at::parallel_for(0, E * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> panel(kpairs * NC);
    __m512 acc[2 * MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / blocks, rows = b[e + 1] - b[e];
      const int64_t c0 = t % blocks * NC, width = std::min<int64_t>(NC, O - c0);
      if (rows == 0) continue;
      if (w.scalar_type() == at::kFloat)
        pack_row_pairs(w.data_ptr<float>() + e * I * O + c0, O, I, width, panel.data());
      else
        pack_row_pairs(data(w) + e * I * O + c0, O, I, width, panel.data());
      for (int64_t m0 = 0; m0 < rows; m0 += MR) {
        const int R = (int)std::min<int64_t>(MR, rows - m0);
        for (int64_t p = 0; p * NR < width; ++p) {
          MICRO[R](xp + (b[e] + m0) * I, I, 2, I / 2, I & 1, &panel[p * kpairs * NR], acc);
          const int cols = (int)std::min<int64_t>(NR, width - p * NR);
          store_tile(acc, R, cols, yp + (b[e] + m0) * O + c0 + p * NR, O);
        }
      }
    }
  });
  return y;
}

// dw[e] = a[g]^T @ c[g] -> [E, P, Q] (the weight gradient), in bfloat16 or, for a float32
// weight, in float32 straight from the accumulators. Both are packed by row pairs (the
// group's rows are the reduction); a^T plays A with its pairs broadcast from the pack.
template <typename Out>
void gmm_at_b_into(const at::Tensor& a, const at::Tensor& c, const std::vector<int64_t>& b, Out* dp) {
  const int64_t P = a.size(1), Q = c.size(1), E = (int64_t)b.size() - 1;
  std::vector<int64_t> first_pair(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) first_pair[e + 1] = first_pair[e] + (b[e + 1] - b[e] + 1) / 2;
  const int64_t p_panels = (P + NR - 1) / NR, q_panels = (Q + NR - 1) / NR;
  auto a_buffer = scratch(first_pair[E] * p_panels * NR), c_buffer = scratch(first_pair[E] * q_panels * NR);
  uint32_t *apack = words(a_buffer), *cpack = words(c_buffer);
  const bf16 *ap = data(a), *cp = data(c);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t rows = b[e + 1] - b[e];
      pack_row_pairs(ap + b[e] * P, P, rows, P, &apack[first_pair[e] * p_panels * NR]);
      pack_row_pairs(cp + b[e] * Q, Q, rows, Q, &cpack[first_pair[e] * q_panels * NR]);
    }
  });
  // Tasks: (expert, panel of NR rows of a^T). The a panel stays in cache while every
  // column panel of c passes by.
  at::parallel_for(0, E * p_panels, 1, [&](int64_t t0, int64_t t1) {
    __m512 acc[2 * MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / p_panels, pp = t % p_panels, kpairs = first_pair[e + 1] - first_pair[e];
      const int64_t r_end = std::min(P, (pp + 1) * NR);
      Out* out = dp + e * P * Q;
      if (kpairs == 0) {  // an empty group: exact zeros
        std::memset(out + pp * NR * Q, 0, (r_end - pp * NR) * Q * sizeof(Out));
        continue;
      }
      const uint32_t* a_panel = &apack[(first_pair[e] * p_panels + pp * kpairs) * NR];
      const uint32_t* c_e = &cpack[first_pair[e] * q_panels * NR];
      for (int64_t q = 0; q < q_panels; ++q) {
        const int cols = (int)std::min<int64_t>(NR, Q - q * NR);
        for (int64_t r0 = pp * NR; r0 < r_end; r0 += MR) {
          // Pair kp of row r of a^T is word kp*NR + r % NR of its panel.
          const int R = (int)std::min<int64_t>(MR, r_end - r0);
          const bf16* a_rows = reinterpret_cast<const bf16*>(a_panel + r0 % NR);
          MICRO[R](a_rows, 2, 2 * NR, kpairs, false, c_e + q * kpairs * NR, acc);
          store_tile(acc, R, cols, out + r0 * Q + q * NR, Q);
        }
      }
    }
  });
}

at::Tensor gmm_at_b(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offsets, bool out_float32) {
  check(a, "a");
  check(c, "c");
  auto b = group_bounds(offsets);
  auto dw = at::empty({offsets.size(0), a.size(1), c.size(1)}, a.options().dtype(out_float32 ? at::kFloat : at::kBFloat16));
  if (out_float32)
    gmm_at_b_into(a, c, b, dw.data_ptr<float>());
  else
    gmm_at_b_into(a, c, b, data_mut(dw));
  return dw;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gmm_x_wt", &gmm_x_wt, "y[g] = x[g] @ w[e]^T, w [E, O, I]");
  m.def("gmm_x_w", &gmm_x_w, "y[g] = x[g] @ w[e], w [E, I, O]");
  m.def("gmm_at_b", &gmm_at_b, "dw[e] = a[g]^T @ c[g], in float32 if out_float32");
}
