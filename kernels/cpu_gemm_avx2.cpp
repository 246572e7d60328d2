// Grouped GEMMs for x86 CPUs with AVX2 and FMA but without AVX512-BF16 (AMD Zen 1-3, most
// Intel client chips): the `avx2` backend of moe.kernels, for bfloat16 and float32 rows.
//
// Why our own: per-expert torch.mm (the `loop` backend) packs each expert's weight again on
// every call and, for bfloat16 on a CPU without bfloat16 instructions, runs a generic GEMM
// far below the float32 rate. Here everything is float32 arithmetic: bfloat16 values widen
// exactly, the products and sums are float32 (as the avx512 kernels and the GPUs sum), and
// the output is rounded once. One compiled kernel serves every row count.
//
// The micro-kernel: C[0:R][0:16] (R <= 6 rows, 12 ymm accumulators) += A(r, k) * B(k, 0:16)
// with A read where it lies (any row and k stride, float32: the caller widens bfloat16 rows
// once per call, one pass over them, small next to the GEMM's I multiplies per value) and B a packed float32 panel [k][16]. Each
// task, an expert and a block of output columns, packs its block of B once (widening
// bfloat16) into a thread's buffer sized to stay in L2, and runs every row of its group
// against it; in the forward, an expert with few rows instead reads its weight in place
// (see weight_as_a).
//
// Shape legend: N rows in expert order, E experts, I inner dim, O output dim, K the
// reduction of one GEMM.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;

constexpr int MR = 6;   // rows per micro-tile: 12 accumulators, 2 B vectors and a broadcast: 15 of 16 ymm
constexpr int NR = 16;  // columns per micro-tile: two ymm of float32
// A task's packed block of B, in floats: 256 KB, half of a Zen 3 core's L2, so that it stays
// there while the task's rows pass (its column count follows from K).
constexpr int64_t BLOCK_FLOATS = 64 * 1024;
constexpr int64_t MAX_BLOCK_COLS = 256;

// 8 values widened to float32: bfloat16 is the high half of a float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }

// 8 float32 to bfloat16, rounded to nearest even as .to() rounds (NaN stays a quiet NaN).
inline __m128i to_bf16(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The first n (0..8) lanes, as a mask for maskstore.
inline __m256i first_lanes(int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
}

// cols (1..16) values of a tile row to c.
inline void store_row(float* c, __m256 lo, __m256 hi, int cols) {
  if (cols == NR) {
    _mm256_storeu_ps(c, lo);
    _mm256_storeu_ps(c + 8, hi);
    return;
  }
  _mm256_maskstore_ps(c, first_lanes(cols), lo);
  if (cols > 8) _mm256_maskstore_ps(c + 8, first_lanes(cols - 8), hi);
}
inline void store_row(bf16* c, __m256 lo, __m256 hi, int cols) {
  alignas(32) std::array<__m128i, 2> v = {to_bf16(lo), to_bf16(hi)};
  if (cols == NR) std::memcpy(c, v.data(), 32);
  else std::memcpy(c, v.data(), 2 * cols);
}

// R (1..6) rows of a tile C = A @ B over K, 16 columns; row r goes to epilogue(r, lo, hi)
// (columns 0-7, 8-15). A(r, k) is a[r * a_rs + k * a_ks]; B(k, 0:16) is b[k * ldb:][0:16],
// float32 (a packed panel, ldb 16, or a float32 weight's rows as they lie) or bfloat16 (a
// weight's rows, widened as they are read). The accumulators are named registers, not an
// array: GCC keeps an array of twelve in memory and stores every one on every k step. Fewer
// than six rows repeat the last row's reads.
template <typename S, typename Epilogue>
inline __attribute__((always_inline)) void micro(const float* a, int64_t a_rs, int64_t a_ks, int64_t K, const S* b,
                                                 int64_t ldb, int R, Epilogue epilogue) {
  const float* a0 = a;
  const float* a1 = a + std::min(1, R - 1) * a_rs;
  const float* a2 = a + std::min(2, R - 1) * a_rs;
  const float* a3 = a + std::min(3, R - 1) * a_rs;
  const float* a4 = a + std::min(4, R - 1) * a_rs;
  const float* a5 = a + std::min(5, R - 1) * a_rs;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    const int64_t o = k * a_ks;
    const __m256 b0 = load8(b), b1 = load8(b + 8);
    __m256 av = _mm256_broadcast_ss(a0 + o);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + o);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + o);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + o);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + o);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + o);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  epilogue(0, c00, c01);
  if (R > 1) epilogue(1, c10, c11);
  if (R > 2) epilogue(2, c20, c21);
  if (R > 3) epilogue(3, c30, c31);
  if (R > 4) epilogue(4, c40, c41);
  if (R > 5) epilogue(5, c50, c51);
}

// The tile's rows to c (row stride ldc), the first cols columns.
template <typename Out>
auto rows_to(Out* c, int64_t ldc, int cols) {
  return [=](int r, __m256 lo, __m256 hi) { store_row(c + r * ldc, lo, hi, cols); };
}

// Rows [0, rows) of C = A @ B, A(r, k) = a[r * a_rs + k * a_ks], B a packed block of panels
// (K x 16 floats each) covering width columns, to c (row stride ldc).
template <typename Out>
void rows_times_block(const float* a, int64_t a_rs, int64_t a_ks, int64_t rows, int64_t K, const float* block,
                      int64_t width, Out* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < rows; m0 += MR) {
    const int R = (int)std::min<int64_t>(MR, rows - m0);
    for (int64_t p = 0; p * NR < width; ++p) {
      const int cols = (int)std::min<int64_t>(NR, width - p * NR);
      micro(a + m0 * a_rs, a_rs, a_ks, K, block + p * K * NR, NR, R, rows_to(c + m0 * ldc + p * NR, ldc, cols));
    }
  }
}

// B(k, j) = src[k * ld + j] for k < K, j < width, packed into panels [K][16] (zeros past
// width). round: a float32 source rounded to bfloat16 first (autocast's weight under
// bfloat16 rows).
template <typename S>
void pack_rows(const S* src, int64_t ld, int64_t K, int64_t width, bool round, float* dst) {
  for (int64_t p = 0; p * NR < width; ++p) {
    const int cols = (int)std::min<int64_t>(NR, width - p * NR);
    float* panel = dst + p * K * NR;
    for (int64_t k = 0; k < K; ++k) {
      const S* row = src + k * ld + p * NR;
      float* out = panel + k * NR;
      if (cols == NR) {
        _mm256_store_ps(out, load8(row));
        _mm256_store_ps(out + 8, load8(row + 8));
      } else {
        for (int j = 0; j < NR; ++j) out[j] = j < cols ? widen(row[j]) : 0.0f;
      }
    }
  }
  if (std::is_same_v<S, float> && round)
    for (int64_t i = 0; i < (width + NR - 1) / NR * NR * K; ++i) dst[i] = static_cast<float>(bf16(dst[i]));
}

// 8 rows of 8 float32 transposed in registers: afterwards r[j] holds column j.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      u[4 * i + h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 2 + h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
    }
  // u[0..3]: columns (0, 2, 1, 3) of rows 0-3 in each 128-bit half; u[4..7] of rows 4-7.
  const int order[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[order[j]], u[4 + order[j]], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[order[j]], u[4 + order[j]], 0x31);
  }
}

// B(k, j) = src[j * ld + k] (rows of an nn.Linear weight, k along each row) for k < K, j <
// width, packed into panels [K][16]: 8 x 8 blocks transposed in registers.
template <typename S>
void pack_transposed(const S* src, int64_t ld, int64_t K, int64_t width, bool round, float* dst) {
  for (int64_t p = 0; p * NR < width; ++p) {
    const int cols = (int)std::min<int64_t>(NR, width - p * NR);
    float* panel = dst + p * K * NR;
    const S* rows = src + p * NR * ld;
    int64_t k = 0;
    if (cols == NR) {
      for (; k + 8 <= K; k += 8)
        for (int h = 0; h < 2; ++h) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = load8(rows + (8 * h + j) * ld + k);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k + i) * NR + 8 * h, r[i]);
        }
    }
    for (; k < K; ++k)
      for (int j = 0; j < NR; ++j) panel[k * NR + j] = j < cols ? widen(rows[j * ld + k]) : 0.0f;
  }
  if (std::is_same_v<S, float> && round)
    for (int64_t i = 0; i < (width + NR - 1) / NR * NR * K; ++i) dst[i] = static_cast<float>(bf16(dst[i]));
}

// Columns per task for a reduction of K: the packed block stays within BLOCK_FLOATS.
int64_t block_cols(int64_t K) {
  return std::clamp<int64_t>(BLOCK_FLOATS / std::max<int64_t>(K, 1) / NR * NR, NR, MAX_BLOCK_COLS);
}

// A thread's buffers, kept between calls (grow-only; 32-byte aligned for the loads): slot 0
// a task's packed block of B, slot 1 the forward's packed rows of one expert.
float* thread_buffer(int slot, int64_t floats) {
  thread_local std::array<std::vector<float>, 2> kept;
  std::vector<float>& buffer = kept[slot];
  if ((int64_t)buffer.size() < floats + 8) buffer.resize(floats + 8);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((32 - address % 32) % 32) / sizeof(float);
}

// body(t0, t1) over tasks [0, n) split into one contiguous range per thread of about equal
// cost (cost(t) each, an empty task nothing): routing is skewed in training, and equal
// counts would leave one thread with most of the rows.
template <typename Cost, typename Body>
void parallel_by_cost(int64_t n, Cost cost, Body body) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + cost(t);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  auto boundary = [&](int64_t i) -> int64_t {
    if (i == threads) return n;
    return std::lower_bound(prefix.begin(), prefix.end(), prefix[n] * i / threads) - prefix.begin();
  };
  at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = i == 0 ? 0 : boundary(i), t1 = boundary(i + 1);
      if (t0 < t1) body(t0, t1);
    }
  });
}

std::vector<int64_t> group_bounds(const at::Tensor& offsets, int64_t N) {
  TORCH_CHECK(offsets.dim() == 1, "offsets must be 1-D");
  auto ends = offsets.to(at::kLong).contiguous();
  std::vector<int64_t> b{0};
  for (int64_t i = 0; i < ends.numel(); ++i) b.push_back(ends.data_ptr<int64_t>()[i]);
  for (size_t i = 1; i < b.size(); ++i)
    TORCH_CHECK(b[i - 1] <= b[i] && b[i] <= N, "offsets must be non-decreasing and at most the row count");
  return b;
}

void check(const at::Tensor& t, const char* name) {
  const bool ok = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat;
  TORCH_CHECK(ok && t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous bfloat16 or float32 CPU tensor");
}

template <typename Body>
void with_type(const at::Tensor& t, Body body) {
  if (t.scalar_type() == at::kBFloat16) body(bf16{});
  else body(float{});
}

}  // namespace

// Packing a block of the weight costs about as much as PACK_ROWS rows' multiplies (an
// estimate), whatever the expert's rows. In the forward, experts with few rows avoid it where that pays: the
// weight's rows (float32, as they lie; autocast's rounded weight is packed) are A against
// the expert's rows packed transposed, 16 to a panel (so a group costs whole 16-row panels),
// and the output is stored transposed. Measured once each (forward of the
// in-projection, d=512, F=1024, float32, 2 cores): 128 experts 95 -> 78 ms, 32 experts
// 78 -> 65 ms. The input gradient's weight [E, I, O]
// read in place as B instead of packed took 1.1-1.8x the time: its rows are O floats apart,
// 2 KB at O=512, and fall into a few cache sets.
constexpr int64_t PACK_ROWS = 8;
constexpr int64_t WEIGHT_AS_A_MAX_ROWS = 128;  // its packed rows: at most 128 x I floats

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

bool weight_as_a(int64_t rows) {
  return rows > 0 && rows <= WEIGHT_AS_A_MAX_ROWS && round_up(rows, NR) <= round_up(rows, MR) + PACK_ROWS;
}

// y[rows, o0:o0+R] of the forward with the weight as A: tile row r (weight row o0 + r) holds
// the outputs of the panel's rows j < cols, stored transposed.
template <typename Out>
auto columns_to(Out* y, int64_t O) {
  return [=](int r, __m256 lo, __m256 hi, int cols) {
    alignas(32) float v[NR];
    _mm256_store_ps(v, lo);
    _mm256_store_ps(v + 8, hi);
    for (int j = 0; j < cols; ++j) y[j * O + r] = static_cast<Out>(v[j]);
  };
}

// y[g] = x[g] @ B_e with x float32 [N, I], B_e = w[e]^T for w [E, O, I] (transposed) or w[e]
// for w [E, I, O]; y in out_dtype, rows past the groups zero. round_w: a float32 weight is
// rounded to bfloat16 first (it stands for autocast's bfloat16 copy).
at::Tensor gmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, bool transposed, bool out_bf16,
               bool round_w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [N, I]");
  check(w, "w");
  const int64_t N = x.size(0), I = x.size(1), E = w.size(0), O = transposed ? w.size(1) : w.size(2);
  TORCH_CHECK(w.dim() == 3 && (transposed ? w.size(2) : w.size(1)) == I, "w does not match x's inner dim");
  const auto b = group_bounds(offsets, N);
  TORCH_CHECK((int64_t)b.size() == E + 1, "one offset per expert");
  auto y = at::empty({N, O}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (b.back() < N) y.narrow(0, b.back(), N - b.back()).zero_();
  const int64_t nc = block_cols(I), blocks = (O + nc - 1) / nc;
  const float* xp = x.data_ptr<float>();
  auto run = [&](auto w_type, auto out_type) {
    using W = decltype(w_type);
    using Out = decltype(out_type);
    const W* wp = reinterpret_cast<const W*>(w.data_ptr());
    Out* yp = reinterpret_cast<Out*>(y.data_ptr());
    auto rows = [&](int64_t t) { return b[t / blocks + 1] - b[t / blocks]; };
    // A task's cost: its rows, plus its packing.
    parallel_by_cost(E * blocks, [&](int64_t t) { return rows(t) > 0 ? rows(t) + PACK_ROWS : 0; }, [&](int64_t t0, int64_t t1) {
      float* block = thread_buffer(0, I * nc);
      int64_t packed_rows_of = -1;  // the expert whose rows the rows buffer holds
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t e = t / blocks, c0 = t % blocks * nc, width = std::min(nc, O - c0), M = rows(t);
        if (M == 0) continue;
        const float* xe = xp + b[e] * I;
        Out* ye = yp + b[e] * O + c0;
        if (transposed && !round_w && std::is_same_v<W, float> && weight_as_a(M)) {
          float* xt = thread_buffer(1, I * round_up(M, NR));
          if (packed_rows_of != e) pack_transposed(xe, I, I, M, false, xt);
          packed_rows_of = e;
          const float* we = reinterpret_cast<const float*>(wp) + (e * O + c0) * I;
          for (int64_t o0 = 0; o0 < width; o0 += MR) {
            const int R = (int)std::min<int64_t>(MR, width - o0);
            for (int64_t p = 0; p * NR < M; ++p) {
              const int cols = (int)std::min<int64_t>(NR, M - p * NR);
              auto store = columns_to(ye + p * NR * O + o0, O);
              micro(we + o0 * I, I, 1, I, xt + p * I * NR, NR, R, [&](int r, __m256 lo, __m256 hi) { store(r, lo, hi, cols); });
            }
          }
          continue;
        }
        if (transposed) pack_transposed(wp + (e * O + c0) * I, I, I, width, round_w, block);
        else pack_rows(wp + e * I * O + c0, O, I, width, round_w, block);
        rows_times_block(xe, I, 1, M, I, block, width, ye, O);
      }
    });
  };
  with_type(w, [&](auto wt) {
    if (out_bf16) run(wt, bf16{});
    else run(wt, float{});
  });
  return y;
}

// dw[e] = a[g]^T @ c[g] -> [E, P, Q] for a float32 [N, P] and c [N, Q] (bfloat16 or float32);
// an empty group's dw is zero; in bfloat16 if out_bf16, else float32.
at::Tensor gmm_at_b(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offsets, bool out_bf16) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 2, "a must be contiguous float32 [N, P]");
  check(c, "c");
  TORCH_CHECK(c.dim() == 2 && c.size(0) == a.size(0), "a and c must have the same rows");
  const int64_t N = a.size(0), P = a.size(1), Q = c.size(1);
  const auto b = group_bounds(offsets, N);
  const int64_t E = (int64_t)b.size() - 1;
  auto dw = at::empty({E, P, Q}, a.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const float* ap = a.data_ptr<float>();
  // Tasks: (expert, block of Q columns), the block's columns sized by the largest group.
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) largest = std::max(largest, b[e + 1] - b[e]);
  const int64_t nc = block_cols(largest), blocks = (Q + nc - 1) / nc;
  auto run = [&](auto c_type, auto out_type) {
    using C = decltype(c_type);
    using Out = decltype(out_type);
    const C* cp = reinterpret_cast<const C*>(c.data_ptr());
    Out* dp = reinterpret_cast<Out*>(dw.data_ptr());
    // Every task writes P rows: an empty group's costs its zeroing.
    parallel_by_cost(E * blocks, [&](int64_t t) { return b[t / blocks + 1] - b[t / blocks] + MR; }, [&](int64_t t0, int64_t t1) {
      float* block = thread_buffer(0, std::max<int64_t>(largest, 1) * nc);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t e = t / blocks, c0 = t % blocks * nc, width = std::min(nc, Q - c0), K = b[e + 1] - b[e];
        Out* out = dp + e * P * Q + c0;
        if (K == 0) {
          for (int64_t p = 0; p < P; ++p) std::memset(out + p * Q, 0, width * sizeof(Out));
          continue;
        }
        pack_rows(cp + b[e] * Q + c0, Q, K, width, false, block);
        // A(p, k) = a[b[e] + k][p]: row stride 1, k stride P.
        rows_times_block(ap + b[e] * P, 1, P, P, K, block, width, out, Q);
      }
    });
  };
  with_type(c, [&](auto ct) {
    if (out_bf16) run(ct, bf16{});
    else run(ct, float{});
  });
  return dw;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gmm", &gmm, "y[g] = x[g] @ w[e] (w[e]^T if transposed), x float32");
  m.def("gmm_at_b", &gmm_at_b, "dw[e] = a[g]^T @ c[g], a float32");
}
