// Grouped GEMMs for x86 CPUs with AVX-512 (and AVX512-BF16): the `avx512` backend of
// moe.kernels, in bfloat16 and float32.
//
// Why our own: the library GEMMs under torch.mm pack the whole weight into their own layout
// on every call (and oneDNN, for bfloat16, compiles a kernel for every new row count). An
// expert's group is 32-512 rows and routing changes the counts every step, so both costs
// land on every call. Here the weight is read in its stored layout, only cache-sized panels
// of the other operand are packed, and one compiled kernel serves every shape.
//
// The micro-kernel: C[r][0:32] += sum over k-words of A(r, kw) . B(kw, 0:32) with float32
// accumulators. A word is 32 bits: a pair of bfloat16 values along k (one `vdpbf16ps`
// multiplies a broadcast pair of A with 16 pairs of B) or one float32 (`vfmadd`). A is read
// where it lies (any row and word stride); B comes as a packed panel [k-words][32 columns].
// The forward reads the weight in place as A where the experts average few rows and packs it
// where they have many, or where one expert's own rows make that cheaper (gmm_x_wt); the
// input gradient packs the weight, a contiguous block of rows at a time where the experts
// have few rows, fetched ahead while the last block's multiplies run (gmm_x_w); the weight
// gradient packs both inputs and writes its weight-sized output once (gmm_at_b).
//
// Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int NR = 32;   // columns per micro-tile: two zmm registers of float32
constexpr int MR = 12;   // rows per micro-tile: 24 accumulators, 27 of 32 registers in use
constexpr int NC = 128;  // columns per task in x @ w (its packed weight panel stays in L2)
constexpr int OB = 96;   // weight rows per task in x @ w^T
constexpr int XB = 4;    // x^T panels per pass in x @ w^T (kept in L2 while the task's weight rows pass)

// Values of k per 32-bit word: a bfloat16 pair, or one float32.
template <typename T>
constexpr int KW = std::is_same_v<T, bf16> ? 2 : 1;

template <typename T>
int64_t words_for(int64_t k) { return (k + KW<T> - 1) / KW<T>; }

inline uint32_t load_word(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// B as the micro-kernel reads it: a packed panel [k-words][NR columns] (zeros past the last
// k and the last column).
struct PackedPanel {
  const uint32_t* b;
  template <int NV>
  void load(int64_t kw, bool, __m512i (&bv)[NV]) const {
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + kw * NR + 16 * v);
  }
  static void in_order(const __m512 (&row)[2], __m512& lo, __m512& hi) {
    lo = row[0];
    hi = row[1];
  }
};

// B as it lies: rows of the weight (row stride ld, k down the rows), the first cols <= NR
// columns, so that nothing is packed. A bfloat16 word row is built in registers from two
// rows (vpunpck{l,h}wd), which pairs the columns within 128-bit quarters: c[r][0] gets
// columns 0-3, 8-11, 16-19, 24-27 and c[r][1] the others (in_order puts them back).
// Each k step also fetches the panel's word row FETCH_WORDS_AHEAD further down (past the
// block: the next block's) into cache. The block fetched ahead as a whole (Ahead, in
// gmm_x_w_streamed_into) had not all arrived when its first row tile passed: at 32 rows per
// expert (128 experts, d=512, F=1024) the input gradients took 0.93-0.98x the time with this
// (bfloat16 and float32, both projections), at 64 rows 0.94-1.00x, at 32 rows of 8 experts
// level. The same layout with the weights held in cache had taken 0.92-0.96x.
constexpr int64_t FETCH_WORDS_AHEAD = 48;

template <typename T>
struct WeightRows {
  const T* b;
  int64_t ld;
  int cols;
  template <int NV>
  void load(int64_t kw, bool last_odd, __m512i (&bv)[NV]) const {
    static_assert(NV == 2, "a full panel");
    if constexpr (std::is_same_v<T, bf16>) {
      const __mmask32 m = cols >= 32 ? ~0u : (1u << cols) - 1;
      const bf16* row = b + 2 * kw * ld;
      _mm_prefetch((const char*)(row + 2 * FETCH_WORDS_AHEAD * ld), _MM_HINT_T0);
      _mm_prefetch((const char*)(row + (2 * FETCH_WORDS_AHEAD + 1) * ld), _MM_HINT_T0);
      const __m512i lo = _mm512_maskz_loadu_epi16(m, row);
      const __m512i hi = last_odd ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, row + ld);
      bv[0] = _mm512_unpacklo_epi16(lo, hi);
      bv[1] = _mm512_unpackhi_epi16(lo, hi);
    } else {
      const float* row = b + kw * ld;
      _mm_prefetch((const char*)(row + FETCH_WORDS_AHEAD * ld), _MM_HINT_T0);
      _mm_prefetch((const char*)(row + FETCH_WORDS_AHEAD * ld + 16), _MM_HINT_T0);
      bv[0] = _mm512_castps_si512(_mm512_maskz_loadu_ps(first_lanes(cols), row));
      bv[1] = _mm512_castps_si512(_mm512_maskz_loadu_ps(first_lanes(cols - 16), row + 16));
    }
  }
  static void in_order(const __m512 (&row)[2], __m512& lo, __m512& hi) {
    if constexpr (std::is_same_v<T, bf16>) {
      const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      lo = _mm512_permutex2var_ps(row[0], lo_idx, row[1]);
      hi = _mm512_permutex2var_ps(row[0], hi_idx, row[1]);
    } else {
      lo = row[0];
      hi = row[1];
    }
  }
};

// Memory fetched into cache ahead of its use by the micro-kernel: lines [first, end) of a
// region of rows, each 2^shift lines long, their starts stride bytes apart (a contiguous
// span: one row). A call fetches a line per k step from its start, or, in the micro-kernels
// built Spaced, one every 2^rate k steps. take(n) hands the next n lines to one call;
// spread(n, kwords) too, at the slowest rate that fetches them all in kwords k steps.
struct Ahead {
  const char* p = nullptr;
  int64_t first = 0, end = 0;
  int shift = 62;
  int64_t stride = 0;
  int rate = 0;

  static Ahead span(const void* p, int64_t bytes) {
    return {(const char*)p, 0, p && bytes > 0 ? (bytes + 63) / 64 : 0};
  }
  // rows rows of row_bytes each (the line count rounded up to a power of two).
  static Ahead rows(const void* p, int64_t rows, int64_t row_bytes, int64_t stride) {
    int shift = 0;
    while ((int64_t{64} << shift) < row_bytes) ++shift;
    return {(const char*)p, 0, rows << shift, shift, stride};
  }
  Ahead take(int64_t n) {
    Ahead part = *this;
    part.end = std::min(end, first + n);
    first = part.end;
    return part;
  }
  Ahead spread(int64_t n, int64_t kwords) {
    Ahead part = take(n);
    const int64_t got = part.lines();  // none once the lines run out: then no rate
    while (got > 0 && (kwords >> (part.rate + 1)) >= got) ++part.rate;
    return part;
  }
  int64_t lines() const { return std::max<int64_t>(0, end - first); }
  // Lines per call for `calls` calls of kwords k steps each: the lines over the first three
  // quarters of the calls (the last ones then have time to arrive), or kwords, a line per k
  // step from the start, where that takes less than a tenth of the calls (spread there, the
  // input gradient at 8 experts took 1.01-1.05x the time).
  int64_t per_call(int64_t calls, int64_t kwords) const {
    if (lines() * 10 < calls * kwords) return kwords;
    const int64_t spread_over = std::max<int64_t>(1, calls * 3 / 4);
    return std::min(kwords, (lines() + spread_over - 1) / spread_over);
  }
};

// c[r][v] = columns 16v..16v+15 of row r of the tile. Word (r, kw) of A is at a + r*a_rs + kw*a_ks
// (strides in elements); k_odd (bfloat16 only) adds one last k whose partner is zero. NV = 1
// computes the first 16 columns only: for a panel's last columns where 16 or fewer are wanted
// (experts with 33-48 rows would waste a third of their forward's multiplies otherwise:
// 0.88-0.91x the time at 128 experts). epilogue(r, c[r]) takes each row of the tile from
// registers when the sums are done. ahead: what the call fetches into cache (see Ahead).
template <typename T, int R, int NV, bool Spaced, typename B, typename Epilogue>
inline __attribute__((always_inline)) void micro_tile(const T* a, int64_t a_rs, int64_t a_ks, int64_t kwords,
                                                      bool k_odd, const B& b, const Ahead& ahead, Epilogue epilogue) {
  // The loops over c outside the k loop are unrolled by pragma: otherwise GCC keeps c on the
  // stack, zeroing it there and copying it out through it after the k loop, about 80
  // cycles a call. Where the groups are short (the weight gradient at 128 experts: 16 k
  // steps a call) that was 18% of the GEMM.
  __m512 c[R][NV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  // One k step: B's word row kw times A's words a_word(r), row by row.
  auto step = [&](int64_t kw, bool last_odd, auto a_word) {
    __m512i bv[NV];
    b.load(kw, last_odd, bv);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<T, bf16>) {
        __m512bh av = (__m512bh)_mm512_set1_epi32(a_word(r));
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, (__m512bh)bv[v]);
      } else {
        __m512 av = _mm512_set1_ps(a_word(r));
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, _mm512_castsi512_ps(bv[v]), c[r][v]);
      }
    }
  };
  // ahead's fields as locals: GCC 12 dropped every prefetch that read them from the struct in
  // the loop (as a member function or not).
  const char* const pf = ahead.p;
  const int64_t pf_first = ahead.first, pf_end = ahead.end, pf_stride = ahead.stride;
  const int pf_shift = ahead.shift, pf_rate = Spaced ? ahead.rate : 0;
  const int64_t pf_mask = (int64_t{1} << pf_shift) - 1, pf_every = (int64_t{1} << pf_rate) - 1;
  // Spaced: for the calls of the input gradients that spread their lines (Ahead::per_call):
  // the next weight panel or block, fetched a line per k step from a task's start, came from
  // memory in a burst that held up the multiplies' own loads (spread over the task: 0.93-0.98x
  // the time of the in-projection's input gradient at 32-128 experts, the streamed
  // out-projection's 0.92-0.97x at 128; bfloat16). Only there: the two more operations a k
  // step cost 1-6% where every call fetches a line per k step (forward, float32).
  for (int64_t kw = 0; kw < kwords; ++kw) {
    const T* ak = a + kw * a_ks;
    if constexpr (Spaced) {
      if (const int64_t i = pf_first + (kw >> pf_rate); i < pf_end && (kw & pf_every) == 0)
        _mm_prefetch(pf + (i >> pf_shift) * pf_stride + ((i & pf_mask) << 6), _MM_HINT_T0);
    } else if (const int64_t i = pf_first + kw; i < pf_end) {
      _mm_prefetch(pf + (i >> pf_shift) * pf_stride + ((i & pf_mask) << 6), _MM_HINT_T0);
    }
    if constexpr (std::is_same_v<T, bf16>) step(kw, false, [&](int r) { return load_word(ak + r * a_rs); });
    else step(kw, false, [&](int r) { return ak[r * a_rs]; });
  }
  if constexpr (std::is_same_v<T, bf16>) {
    const bf16* ak = a + kwords * a_ks;
    if (k_odd) step(kwords, true, [&](int r) { return (uint32_t)ak[r * a_rs]; });
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) epilogue(r, c[r]);
}

// The tile to acc: acc[2r], acc[2r+1] = row r.
template <typename T, int R, int NV, bool Spaced>
void micro(const T* a, int64_t a_rs, int64_t a_ks, int64_t kwords, bool k_odd, const uint32_t* b, __m512* acc,
           Ahead ahead) {
  micro_tile<T, R, NV, Spaced>(a, a_rs, a_ks, kwords, k_odd, PackedPanel{b}, ahead, [&](int r, const __m512(&row)[NV]) {
    for (int v = 0; v < NV; ++v) acc[2 * r + v] = row[v];
  });
}

// {nullptr, instance(1), ..., instance(MR)}: a kernel's instance for each row count, to pick
// at run time; instance(r) returns the one for r rows (an std::integral_constant).
template <typename Instance, size_t... Rs>
constexpr auto by_rows(Instance instance, std::index_sequence<Rs...>) {
  using Fn = decltype(instance(std::integral_constant<int, 1>{}));
  return std::array<Fn, MR + 1>{nullptr, instance(std::integral_constant<int, Rs + 1>{})...};
}
template <typename Instance>
constexpr auto by_rows(Instance instance) {
  return by_rows(instance, std::make_index_sequence<MR>{});
}

// MICRO<T, Spaced>[cols <= 16][R]: the micro-kernel for R rows and up to 32 (or 16) columns.
template <typename T, bool Spaced = false>
constexpr std::array MICRO = {by_rows([](auto r) { return &micro<T, decltype(r)::value, 2, Spaced>; }),
                              by_rows([](auto r) { return &micro<T, decltype(r)::value, 1, Spaced>; })};

// A micro-kernel call on R rows of A stored row-major (row stride ld, k along the row), for
// the first cols columns of the panel b; Spaced where ahead fetches at a slower rate.
template <typename T>
void micro_rows(int R, int cols, const T* a, int64_t ld, int64_t k, const uint32_t* b, __m512* acc,
                Ahead ahead = {}) {
  const auto& table = ahead.rate > 0 ? MICRO<T, true> : MICRO<T, false>;
  table[cols <= 16][R](a, ld, KW<T>, k / KW<T>, KW<T> == 2 && (k & 1), b, acc, ahead);
}

// Rows x cols of the tile to c (row stride ldc), as bfloat16 or float32.
template <typename Out>
void store_tile(const __m512* acc, int rows, int cols, Out* c, int64_t ldc) {
  const __mmask16 m0 = first_lanes(cols), m1 = first_lanes(cols - 16);
  for (int r = 0; r < rows; ++r) {
    store16(c + r * ldc, acc[2 * r], m0);
    store16(c + r * ldc + 16, acc[2 * r + 1], m1);
  }
}

// A full row of a tile (NR columns) with streaming stores, which write memory without
// reading the lines first; where the row is not 64-byte aligned, ordinary stores.
inline void stream_row(bf16* c, __m512 lo, __m512 hi) {
  __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  if (reinterpret_cast<uintptr_t>(c) % 64 == 0) _mm512_stream_si512((__m512i*)c, v);
  else _mm512_storeu_si512(c, v);
}

inline void stream_row(float* c, __m512 lo, __m512 hi) {
  if (reinterpret_cast<uintptr_t>(c) % 64 == 0) {
    _mm512_stream_ps(c, lo);
    _mm512_stream_ps(c + 16, hi);
  } else {
    _mm512_storeu_ps(c, lo);
    _mm512_storeu_ps(c + 16, hi);
  }
}

// Outputs at least this large are written with streaming stores where a tile row covers whole
// lines (written_past_caches). An ordinary store first reads each line it writes (write
// allocate); an output larger than the two cores' L2 caches leaves them again before it is
// read, so that read is wasted. A/B, Zen 4, bfloat16: the GEMMs alone with 2-16 MB outputs
// (x @ w^T packed, x @ w; 1, 8 and 32 experts) 0.90-0.96x the time, the streamed x @ w at
// 64-128 experts 0.99x; the layer, forward and backward (T=4096, d=512, F=1024) 0.95-0.98x at
// 8 and 32 experts, level at 128 (its forward stores transposed tiles, not streamed), `small`'s
// layer under autocast 0.95-0.98x, float32 level within the noise (0.95-1.05x).
constexpr int64_t STREAM_BYTES = 2 << 20;

bool written_past_caches(const at::Tensor& y) { return y.nbytes() >= STREAM_BYTES; }

// store_tile, with full rows streamed where stream (see STREAM_BYTES).
template <typename Out>
void store_tile(const __m512* acc, int rows, int cols, Out* c, int64_t ldc, bool stream) {
  if (!stream || cols < NR) return store_tile(acc, rows, cols, c, ldc);
  for (int r = 0; r < rows; ++r) stream_row(c + r * ldc, acc[2 * r], acc[2 * r + 1]);
}

// The micro-kernel for a full tile streamed to c (row stride ldc) straight from registers:
// the weight gradient's, whose tiles at 128 experts sum only 16 k-words each, so that a
// pass through acc would cost a tenth of the multiplies.
template <typename T, typename Out, int R>
void micro_stream(const T* a, int64_t a_rs, int64_t a_ks, int64_t kwords, const uint32_t* b, Out* c, int64_t ldc) {
  micro_tile<T, R, 2, false>(a, a_rs, a_ks, kwords, false, PackedPanel{b}, Ahead{},
                      [&](int r, const __m512(&row)[2]) { stream_row(c + r * ldc, row[0], row[1]); });
}

// MICRO_STREAM<T, Out>[R]: micro_stream for R rows.
template <typename T, typename Out>
constexpr auto MICRO_STREAM = by_rows([](auto r) { return &micro_stream<T, Out, decltype(r)::value>; });

// The micro-kernel for a full panel added to float32 sums (row stride lds): the input
// gradient's at few rows per expert, B a packed panel or a weight's rows as they lie.
template <typename T, typename B, bool Spaced, int R>
void micro_add(const T* a, int64_t a_rs, int64_t kwords, bool k_odd, B b, Ahead ahead, float* sums, int64_t lds) {
  micro_tile<T, R, 2, Spaced>(a, a_rs, KW<T>, kwords, k_odd, b, ahead, [&](int r, const __m512(&row)[2]) {
    __m512 lo, hi;
    B::in_order(row, lo, hi);
    float* s = sums + r * lds;
    _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), lo));
    _mm512_storeu_ps(s + 16, _mm512_add_ps(_mm512_loadu_ps(s + 16), hi));
  });
}

// MICRO_ADD<T, B, Spaced>[R]: micro_add for R rows.
template <typename T, typename B, bool Spaced>
constexpr auto MICRO_ADD = by_rows([](auto r) { return &micro_add<T, B, Spaced, decltype(r)::value>; });

// r as an array in memory, for a loop that indexes it by a run-time count: such an index into
// r itself would keep all of r in memory, not only on that path.
inline std::array<__m512, 16> in_memory(const __m512 (&r)[16]) {
  std::array<__m512, 16> a;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) a[i] = r[i];
  return a;
}

// Sixteen rows of 16 float32 transposed in registers: afterwards r[j] holds column j. Inlined,
// and its callers' loops over r unrolled, so that r stays in registers: as a call, r went
// through the stack twice per 16 x 16 block (the forward 1.03-1.05x the time at 32 and 128
// experts).
inline __attribute__((always_inline)) void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: (r_i, r_i+1) pairs of columns
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // per lane: rows i..i+3 of one column each
    auto lo = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    auto hi = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
    r[i] = lo(t[i], t[i + 2]);
    r[i + 1] = hi(t[i], t[i + 2]);
    r[i + 2] = lo(t[i + 1], t[i + 3]);
    r[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  // r[4q + c], 128-bit lane L: rows 4q..4q+3 of column c + 4L. Gather the four q per column.
  for (int c = 0; c < 4; ++c) {
    __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[c + 8] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[c + 4] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// The tile transposed: element (r, j) to c[j * ldc + r], sixteen columns at a time through
// registers. Still the forward's largest overhead: 4-32% of its time at I=256-512.
// spill: the caller lets all 16 lanes be written (zeros past `rows`, overwritten by its next
// tile), so that each store is a plain one, not a masked one (see store16).
template <typename Out>
void store_tile_transposed(const __m512* acc, int rows, int cols, Out* c, int64_t ldc, bool spill) {
  const __mmask16 m = spill ? (__mmask16)0xFFFF : first_lanes(rows);
  for (int h = 0; h * 16 < cols; ++h) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? acc[2 * i + h] : _mm512_setzero_ps();
    transpose16(r);
    const int n = std::min(16, cols - 16 * h);
    if (n == 16) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) store16(c + (16 * h + j) * ldc, r[j], m);
    } else {
      const auto part = in_memory(r);
      for (int j = 0; j < n; ++j) store16(c + (16 * h + j) * ldc, part[j], m);
    }
  }
}

// 16 values (the first lanes of m) as 32-bit lanes: float32 as they are, or bfloat16 in the
// low halves, from bfloat16 or from float32 rounded to nearest even (as .to() rounds).
template <typename T>
__m512i load_lanes(const bf16* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
template <typename T>
__m512i load_lanes(const float* p, __mmask16 m) {
  __m512 v = _mm512_maskz_loadu_ps(m, p);
  if constexpr (std::is_same_v<T, bf16>) return _mm512_cvtepu16_epi32(to_bf16(v));
  return _mm512_castps_si512(v);
}

// n float32 values rounded to bfloat16.
void round_to_bf16(const float* src, int64_t n, bf16* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = first_lanes((int)std::min<int64_t>(16, n - i));
    store16(dst + i, load16(src + i, m), m);
  }
}

// src (k rows x cols, row stride ld; S = bfloat16 or float32) into panels of NR columns of
// T words, zero-padded: dst[p][kw][j] = src[kw][p*NR + j] for float32, and the pair
// (src[2kw][p*NR + j], src[2kw + 1][p*NR + j]) for bfloat16. Panels panel_stride words apart
// (default: kwords * NR, back to back).
template <typename T, typename S>
void pack_rows(const S* src, int64_t ld, int64_t k, int64_t cols, uint32_t* dst, int64_t panel_stride = -1) {
  const int64_t kwords = words_for<T>(k);
  if (panel_stride < 0) panel_stride = kwords * NR;
  for (int64_t p = 0; p * NR < cols; ++p) {
    const int w = (int)std::min<int64_t>(NR, cols - p * NR);
    uint32_t* d = dst + p * panel_stride;
    for (int64_t kw = 0; kw < kwords; ++kw) {
      const S* r0 = src + KW<T> * kw * ld + p * NR;
      for (int h = 0; h < 2; ++h) {
        const __mmask16 m = first_lanes(w - 16 * h);
        __m512i v = load_lanes<T>(r0 + 16 * h, m);
        if constexpr (std::is_same_v<T, bf16>) {
          __m512i hi = 2 * kw + 1 < k ? load_lanes<T>(r0 + ld + 16 * h, m) : _mm512_setzero_si512();
          v = _mm512_or_si512(v, _mm512_slli_epi32(hi, 16));
        }
        _mm512_storeu_si512(d + kw * NR + 16 * h, v);
      }
    }
  }
}

// pack_rows with the loops turned, panel p at dst + p * panel_stride: each source row is read
// once, start to end, and every panel written a word row at a time. With panels a power of
// two apart those writes share a few cache sets and evict each other (1.3-1.4x the time of
// the input-gradient GEMM at 128 experts); one more line between them: 0.75-0.99x the time
// of pack_rows' order (the least with a float32 weight).
template <typename T, typename S>
void pack_rows_by_row(const S* src, int64_t ld, int64_t k, int64_t cols, uint32_t* dst, int64_t panel_stride) {
  const int64_t kwords = words_for<T>(k);
  for (int64_t kw = 0; kw < kwords; ++kw) {
    const S* r0 = src + KW<T> * kw * ld;
    const bool pair = std::is_same_v<T, bf16> && 2 * kw + 1 < k;
    for (int64_t p = 0; p * NR < cols; ++p) {
      const int w = (int)std::min<int64_t>(NR, cols - p * NR);
      uint32_t* d = dst + p * panel_stride + kw * NR;
      for (int h = 0; h < 2; ++h) {
        const __mmask16 m = first_lanes(w - 16 * h);
        __m512i v = load_lanes<T>(r0 + p * NR + 16 * h, m);
        if (pair) v = _mm512_or_si512(v, _mm512_slli_epi32(load_lanes<T>(r0 + ld + p * NR + 16 * h, m), 16));
        _mm512_storeu_si512(d + 16 * h, v);
      }
    }
  }
}

// One panel: rows (<= NR) of src (k along the row, row stride ld) transposed by words,
// zero-padded: dst[kw][j] = word kw of row j. Sixteen rows by sixteen words at a time
// through registers. fetch: each load's line 16 rows further on is fetched into L2 (see
// gmm_x_wt_packed_into).
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t k, uint32_t* dst, bool fetch = false) {
  const int64_t kwords = words_for<T>(k), full = k / KW<T>;
  for (int h = 0; h < NR / 16; ++h) {
    for (int64_t kw0 = 0; kw0 < full; kw0 += 16) {
      const int n = (int)std::min<int64_t>(16, full - kw0);
      const __mmask16 lanes = first_lanes(n);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * h + i;
        if (fetch) _mm_prefetch((const char*)(src + (row + 16) * ld + KW<T> * kw0), _MM_HINT_T1);
        r[i] = row < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(lanes, src + row * ld + KW<T> * kw0))
                          : _mm512_setzero_ps();
      }
      transpose16(r);
      if (n == 16) {
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (kw0 + c) * NR + 16 * h, r[c]);
      } else {
        const auto part = in_memory(r);
        for (int c = 0; c < n; ++c) _mm512_storeu_ps(dst + (kw0 + c) * NR + 16 * h, part[c]);
      }
    }
  }
  if (full < kwords)  // bfloat16 with k odd: the last word holds one value
    for (int j = 0; j < NR; ++j) dst[full * NR + j] = j < rows ? (uint32_t)src[j * ld + k - 1] : 0;
}

// Group bounds [0, offsets...] on the host (the tensor is on the CPU: no sync involved).
std::vector<int64_t> group_bounds(const at::Tensor& offsets) {
  auto off = offsets.to(at::kLong).contiguous();
  std::vector<int64_t> b(off.numel() + 1, 0);
  for (int64_t e = 0; e < off.numel(); ++e) b[e + 1] = off.data_ptr<int64_t>()[e];
  return b;
}

// The experts one pass of a GEMM computes, where two kernels share the experts of one call
// (gmm_x_wt): all of them when empty.
using Experts = std::vector<char>;

int64_t rows_of(const std::vector<int64_t>& b, const Experts& mine, int64_t e) {
  return mine.empty() || mine[e] ? b[e + 1] - b[e] : 0;
}

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

void check(const at::Tensor& t, const char* name) {
  const bool dtype_ok = is_bf16(t) || t.scalar_type() == at::kFloat;
  TORCH_CHECK(dtype_ok && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous bfloat16 or float32 CPU tensor");
}

// Packing buffers, kept per calling thread and slot between calls (grow-only: at most the
// size of the largest activation packed, about as large as that activation). Fresh buffers
// every call made the float32 layer 1.85x slower at E=32, k=2 (1077 -> 486 ms a step once
// kept): the OS zeroes new pages on first touch.
at::Tensor scratch(int64_t n, int slot) {
  thread_local std::array<at::Tensor, 2> kept;
  if (!kept[slot].defined() || kept[slot].numel() < n) kept[slot] = at::empty({std::max<int64_t>(n, 1)}, at::kInt);
  return kept[slot];
}
uint32_t* words(const at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

// A task's cost in rows beyond its own: packing or streaming its share of the weight, which
// takes as long whatever its rows (about 16 rows' multiplies at d=512, F=1024).
constexpr int64_t TASK_ROWS = 16;

// body(t0, t1) over tasks [0, n) split into one contiguous range per thread of about equal
// cost, not of equal count: a task with rows(t) rows costs rows(t) + TASK_ROWS, an empty one
// nothing. Routing is skewed in training: at the `small` preset's start one expert takes
// 2000 of a layer's 4096 rows and half the experts 3900, so equal counts left one thread
// with nearly all the work.
template <typename Rows, typename Body>
void parallel_by_rows(int64_t n, Rows rows, Body body) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + (rows(t) > 0 ? rows(t) + TASK_ROWS : 0);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  // Range i ends at the task boundary nearest to i / threads of the total cost.
  auto boundary = [&](int64_t i) -> int64_t {
    if (i == threads) return n;
    const int64_t target = prefix[n] * i / threads;
    const int64_t t = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    return t > 0 && target - prefix[t - 1] < prefix[t] - target ? t - 1 : t;
  };
  at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = i == 0 ? 0 : boundary(i), t1 = boundary(i + 1);
      if (t0 < t1) body(t0, t1);
    }
  });
}

// Rows of A a multiple of 4 KB apart all fall into one set of the L1 cache (64 sets of 64-byte
// lines), and a micro-kernel call's 12 rows then evict each other on every k step: the input
// gradient with 2F = 2048 bfloat16 columns ran at 315-381 GFLOP/s, with 2032 or 2064 at
// 426-433 (Zen 4, 8 experts; with the copy 387-404). Such rows are copied first, to a stride
// that is not such a multiple (RowCopy).
constexpr int64_t L1_SET_SPAN = 4096;

template <typename T>
struct RowCopy {
  int64_t src_ld;  // the source's row stride
  int64_t ld;      // the copy's row stride, or 0 where the rows are used where they lie
  std::unique_ptr<T[]> rows;  // not zeroed: every row is copied before it is read
  int64_t capacity = 0;
  const T* kept_block = nullptr;  // the block of rows whose first `kept` are in `rows`
  int64_t kept = 0;

  RowCopy(int64_t src_ld, int64_t max_cols)
      : src_ld(src_ld), ld(src_ld * (int64_t)sizeof(T) % L1_SET_SPAN == 0 ? spread(max_cols) : 0) {}

  // A row stride of whole lines for cols values that is not a multiple of L1_SET_SPAN.
  static int64_t spread(int64_t cols) {
    int64_t bytes = (cols * (int64_t)sizeof(T) + 63) / 64 * 64;
    if (bytes % L1_SET_SPAN == 0) bytes += 64;
    return bytes / (int64_t)sizeof(T);
  }

  // Room for n rows (their contents are not kept when it grows).
  void fit(int64_t n) {
    if (capacity < n * ld) {
      capacity = n * ld;
      rows.reset(new T[capacity]);
    }
  }

  // n rows x cols from src as A reads them: {first element, row stride}.
  std::pair<const T*, int64_t> of(const T* src, int64_t n, int64_t cols) {
    if (!ld) return {src, src_ld};
    kept_block = nullptr;
    fit(n);
    for (int64_t r = 0; r < n; ++r) std::memcpy(&rows[r * ld], src + r * src_ld, cols * sizeof(T));
    return {rows.get(), ld};
  }

  // Rows [r, r + n) of the block_rows x cols block at `block`, as `of` gives them, each row
  // copied once while the block stays the same: an expert's rows are A for each column block
  // of its output in turn (gmm_rows_into). Copied again for each, they took the input
  // gradient of the in-projection (2F = 2048 columns) from 382-409 to 356-394 GFLOP/s (8
  // and 32 experts, k=1 and 2). Blocks over KEPT_BYTES are copied as `of` does.
  static constexpr int64_t KEPT_BYTES = 8 << 20;
  std::pair<const T*, int64_t> of_block(const T* block, int64_t block_rows, int64_t r, int64_t n, int64_t cols) {
    if (!ld) return {block + r * src_ld, src_ld};
    if (block_rows * ld * (int64_t)sizeof(T) > KEPT_BYTES) return of(block + r * src_ld, n, cols);
    if (block != kept_block) {
      kept_block = block;
      kept = 0;
      fit(block_rows);
    }
    for (; kept < r + n; ++kept) std::memcpy(&rows[kept * ld], block + kept * src_ld, cols * sizeof(T));
    return {rows.get() + r * ld, ld};
  }
};

at::Tensor output_rows(const at::Tensor& x, int64_t cols, int64_t covered, bool out_float32 = false) {
  auto y = at::empty({x.size(0), cols}, out_float32 ? x.options().dtype(at::kFloat) : x.options());
  if (covered < x.size(0)) y.narrow(0, covered, x.size(0) - covered).zero_();
  return y;
}

// A float32 weight with bfloat16 rows (autocast's master copy) is rounded to bfloat16 inside
// the kernels, a block at a time in cache, instead of as a whole new tensor before them:
// that cast and the cast of the bfloat16 gradient back were 14% of a small bfloat16 CPU
// training step.

// y[g] = x[g] @ w[e]^T with w [E, O, I] (the nn.Linear layout): computed as y^T = w @ x^T,
// so the weight is A, read in place (a float32 one under bfloat16 rows rounded a block of MR
// rows at a time), and x^T is packed once per group.
// x[g]^T of every group in panels of NR rows (pack_transposed): group e's panels are
// first_panel[e]..first_panel[e + 1] of xt, kwords * NR words each.
struct GroupPanels {
  std::vector<int64_t> first_panel;
  uint32_t* xt;
};

template <typename T>
GroupPanels pack_group_panels(const at::Tensor& x, const std::vector<int64_t>& b, const Experts& mine) {
  const int64_t I = x.size(1), E = (int64_t)b.size() - 1, kwords = words_for<T>(I);
  std::vector<int64_t> first_panel(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) first_panel[e + 1] = first_panel[e] + (rows_of(b, mine, e) + NR - 1) / NR;
  uint32_t* xt = words(scratch(first_panel[E] * kwords * NR, 0));  // kept: stays valid
  const T* xp = data<T>(x);
  // Each panel's first row and its group's end, so the packing splits by panel, not expert.
  std::vector<int64_t> panel_row(first_panel[E]), group_end(first_panel[E]);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t p = first_panel[e]; p < first_panel[e + 1]; ++p) {
      panel_row[p] = b[e] + (p - first_panel[e]) * NR;
      group_end[p] = b[e + 1];
    }
  at::parallel_for(0, first_panel[E], 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t rows = std::min<int64_t>(NR, group_end[p] - panel_row[p]);
      pack_transposed<T>(xp + panel_row[p] * I, I, rows, I, &xt[p * kwords * NR]);
    }
  });
  return {std::move(first_panel), xt};
}

template <typename T, typename W, typename Out>
void gmm_x_wt_into(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& b, at::Tensor& y,
                   const Experts& mine) {
  const int64_t I = x.size(1), E = w.size(0), O = w.size(1), kwords = words_for<T>(I);
  const GroupPanels panels = pack_group_panels<T>(x, b, mine);
  const std::vector<int64_t>& first_panel = panels.first_panel;
  const uint32_t* xt = panels.xt;
  const W* wp = data<W>(w);
  Out* yp = data<Out>(y);
  const int64_t blocks = (O + OB - 1) / OB;
  auto rows = [&](int64_t t) { return (first_panel[t / blocks + 1] - first_panel[t / blocks]) * NR; };
  parallel_by_rows(E * blocks, rows, [&](int64_t t0, int64_t t1) {
    __m512 acc[2 * MR];
    std::vector<T> rounded(std::is_same_v<T, W> ? 0 : OB * I);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / blocks, panels = first_panel[e + 1] - first_panel[e];
      const int64_t o_begin = t % blocks * OB, o_end = std::min(O, o_begin + OB);
      if (panels == 0) continue;
      const T* a_block;
      if constexpr (std::is_same_v<T, W>) {
        a_block = wp + (e * O + o_begin) * I;
      } else {
        round_to_bf16(wp + (e * O + o_begin) * I, (o_end - o_begin) * I, rounded.data());
        a_block = rounded.data();
      }
      for (int64_t p0 = 0; p0 < panels; p0 += XB) {
        for (int64_t o0 = o_begin; o0 < o_end; o0 += MR) {
          const int R = (int)std::min<int64_t>(MR, o_end - o0);
          for (int64_t p = p0; p < std::min(panels, p0 + XB); ++p) {
            // Fetch weight rows ahead while this pass's panels run (the rows are contiguous,
            // also across tasks and experts): with small groups each weight row is used for
            // one panel only and would otherwise come from memory on demand. A bfloat16
            // weight: the next MR rows. A float32 one, rounded a block at a time: the same
            // rows of the next task's block, so that its rounding pass reads them from cache.
            // A micro-kernel call fetches one line per k step: the first panels share it.
            const int64_t ahead = std::is_same_v<T, W> ? e * O + o0 + R : e * O + o_end + (o0 - o_begin);
            const int64_t span = ahead < E * O ? std::min<int64_t>(MR, E * O - ahead) * I * (int64_t)sizeof(W) : 0;
            const int64_t fetched = (p - p0) * kwords * 64;  // by this pass's earlier panels
            const bool fetch = fetched < span && (std::is_same_v<T, W> || t + 1 < t1);
            const int64_t r0 = p * NR;
            const int cols = (int)std::min<int64_t>(NR, b[e + 1] - b[e] - r0);
            micro_rows<T>(R, cols, a_block + (o0 - o_begin) * I, I, I, &xt[(first_panel[e] + p) * kwords * NR], acc,
                          fetch ? Ahead::span((const char*)(wp + ahead * I) + fetched, span - fetched) : Ahead{});
            // Rows o0 + R.. of the output belong to this task's next tile, stored after this one.
            const bool spill = o0 + 16 <= o_end;
            store_tile_transposed(acc, R, cols, yp + (b[e] + r0) * O + o0, O, spill);
          }
        }
      }
    }
  });
}

// y[g] = x[g] @ B_e with x as A, read in place, and B_e packed one panel of NC columns per
// task by pack(e, c0, width, panel): the kernel of both weight layouts below. source(e, c0,
// width) -> Ahead: what that packing reads, fetched into cache for a thread's next task while
// the multiplies of its current one run; with Spread, over most of them (see micro_tile).
template <typename T, typename Out, bool Spread, typename Pack, typename Source>
void gmm_rows_into(const at::Tensor& x, int64_t E, int64_t O, const std::vector<int64_t>& b, at::Tensor& y, Pack pack,
                   Source source, const Experts& mine = {}) {
  const int64_t I = x.size(1), kwords = words_for<T>(I);
  const T* xp = data<T>(x);
  Out* yp = data<Out>(y);
  const int64_t blocks = (O + NC - 1) / NC;
  const bool stream = written_past_caches(y);
  // Fewer (expert, column block) tasks than two per thread (the router's logits: one group,
  // one block): each also split by rows, each part packing its block again.
  const int64_t splits = std::max<int64_t>(1, 2 * at::get_num_threads() / std::max<int64_t>(1, E * blocks));
  auto task_rows = [&](int64_t t) { return rows_of(b, mine, t / splits / blocks) / splits; };
  parallel_by_rows(E * blocks * splits, task_rows, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> panel(kwords * NC);
    RowCopy<T> a_copy(I, I);
    __m512 acc[2 * MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t task = t / splits, part = t % splits, e = task / blocks, all_rows = rows_of(b, mine, e);
      const int64_t c0 = task % blocks * NC, width = std::min<int64_t>(NC, O - c0);
      const int64_t r_begin = all_rows * part / splits, rows = all_rows * (part + 1) / splits - r_begin;
      if (rows == 0) continue;
      pack(e, c0, width, panel.data());
      Ahead ahead;
      const int64_t next = (t + 1) / splits;
      if (t + 1 < t1 && next != task) ahead = source(next / blocks, next % blocks * NC, std::min<int64_t>(NC, O - next % blocks * NC));
      const int64_t per_call = Spread ? ahead.per_call((rows + MR - 1) / MR * ((width + NR - 1) / NR), kwords) : 0;
      for (int64_t m0 = r_begin; m0 < r_begin + rows; m0 += MR) {
        const int R = (int)std::min<int64_t>(MR, r_begin + rows - m0);
        const auto [a, lda] = a_copy.of_block(xp + (b[e] + r_begin) * I, rows, m0 - r_begin, R, I);
        for (int64_t p = 0; p * NR < width; ++p) {
          const int cols = (int)std::min<int64_t>(NR, width - p * NR);
          // Not Spread: a line per k step from each call's start, the last call's few lines too.
          const Ahead fetch = Spread ? ahead.spread(per_call, kwords) : ahead.take(kwords);
          micro_rows<T>(R, cols, a, lda, I, &panel[p * kwords * NR], acc, fetch);
          store_tile(acc, R, cols, yp + (b[e] + m0) * O + c0 + p * NR, O, stream);
        }
      }
    }
    if (stream) _mm_sfence();  // streaming stores are visible to other threads only after a fence
  });
}

// Of the weight per block in gmm_x_w_streamed_into (see there).
constexpr int64_t BLOCK_BYTES = 256 << 10;
constexpr int64_t MAX_BLOCK_BYTES = 512 << 10;
constexpr int64_t MIN_BLOCK_WORDS = 128;

// y[g] = x[g] @ w[e] with w [E, I, O] contiguous, for experts with few rows (see gmm_x_w):
// the weight a block of KB rows at a time across all its columns (contiguous, fetched into
// cache while the previous block's multiplies run), the group's sums kept in float32 between
// blocks. Packing a panel of columns over all rows (gmm_x_w_into) reads the weight in strided
// pieces, well below the memory's speed, with nothing to overlap it: at 32 rows per expert
// that took as long as the multiplies. A weight in the rows' dtype is read as it lies
// (WeightRows); packing each block first was 20% of this GEMM at 128 experts (A/B, both
// projections, k=1: 0.84-0.87x the time without it, k=2 0.91x). A float32 weight under
// bfloat16 rows is packed, rounded as it goes.
template <typename T, typename W>
void gmm_x_w_streamed_into(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& b, at::Tensor& y) {
  const int64_t I = x.size(1), E = w.size(0), O = w.size(2);
  const int64_t panels = (O + NR - 1) / NR, width = panels * NR;  // sums' row stride
  // Rows per block, even, so that a block never splits a bfloat16 pair: BLOCK_BYTES of the
  // weight, and at most 256 rows. Read as it lies, a block sets only the k-steps of a
  // micro-kernel call and the span fetched ahead, and it grows to MIN_BLOCK_WORDS k-words a
  // call within MAX_BLOCK_BYTES: a call's sums are added to memory after its k-steps, and 64
  // k-words a call took 1.02-1.03x the time of 128 (the out-projection's input gradient, d=512,
  // F=1024, 128 experts: bfloat16 128 rows of 2 KB, float32 64 of 4 KB). Past that, the block
  // and the next one fetched ahead fill the 1 MB L2: float32 256 rows of 2 KB took 1.02-1.05x
  // the time of 128 (the in-projection's, 64 and 128 experts), 1 MB blocks 0.98-1.22x that of
  // 512 KB. And 512 rows of a 512-column bfloat16 weight took 1.02-1.06x the time of 256 (64
  // and 128 experts; the layer at 128 experts 0.98-0.99x the time with the cap).
  constexpr bool in_place = std::is_same_v<T, W>;
  const int64_t row_bytes = std::max<int64_t>(1, O * (int64_t)sizeof(W));
  const int64_t fill = in_place ? std::min(MIN_BLOCK_WORDS * KW<T>, MAX_BLOCK_BYTES / row_bytes) : 0;
  const int64_t KB = std::clamp<int64_t>(std::max(BLOCK_BYTES / row_bytes, fill) & ~int64_t{1}, 2, 256);
  const T* xp = data<T>(x);
  const W* wp = data<W>(w);
  T* yp = data<T>(y);
  const bool stream = written_past_caches(y);
  // Tasks: an expert's rows, or parts of them where a group holds more than half a thread's
  // share of all rows (skewed routing), so that the threads can share it; each part streams
  // the weight again.
  struct Part {
    int64_t e, row0, rows;
  };
  const int64_t cap = std::max<int64_t>(8 * MR, b[E] / (2 * at::get_num_threads()));
  std::vector<Part> parts;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = b[e + 1] - b[e], n = (rows + cap - 1) / cap;
    for (int64_t i = 0; i < n; ++i) parts.push_back({e, b[e] + rows * i / n, rows * (i + 1) / n - rows * i / n});
  }
  parallel_by_rows((int64_t)parts.size(), [&](int64_t t) { return parts[t].rows; }, [&](int64_t t0, int64_t t1) {
    // Panels a line more than a power of two apart: the packing writes all of them at once.
    const int64_t panel_stride = words_for<T>(KB) * NR + 16;
    std::vector<uint32_t> packed(in_place ? 0 : panel_stride * panels);
    std::vector<float> sums;
    RowCopy<T> x_copy(I, KB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = parts[t].e, row0 = parts[t].row0, rows = parts[t].rows;
      sums.assign(rows * width, 0.0f);
      for (int64_t k0 = 0; k0 < I; k0 += KB) {
        const int64_t k = std::min(KB, I - k0), kwords = words_for<T>(k);
        if constexpr (!in_place) pack_rows_by_row<T>(wp + (e * I + k0) * O, O, k, O, packed.data(), panel_stride);
        // The next block (of this expert, or the next task's first) into cache, a line per
        // k step of the multiplies below.
        const int64_t next = k0 + KB < I ? e * I + k0 + KB : t + 1 < t1 ? parts[t + 1].e * I : E * I;
        const int64_t next_bytes = std::min(KB, E * I - next) * O * (int64_t)sizeof(W);
        Ahead ahead = Ahead::span(wp + next * O, next_bytes);
        const int64_t per_call = ahead.per_call(panels * ((rows + MR - 1) / MR), kwords);
        const auto [x_block, ldx] = x_copy.of(xp + row0 * I + k0, rows, k);
        for (int64_t p = 0; p < panels; ++p) {
          const int cols = (int)std::min<int64_t>(NR, O - p * NR);
          for (int64_t m0 = 0; m0 < rows; m0 += MR) {
            const int R = (int)std::min<int64_t>(MR, rows - m0);
            const T* a = x_block + m0 * ldx;
            const Ahead fetch = ahead.spread(per_call, kwords);
            float* s = &sums[m0 * width + p * NR];
            const bool k_odd = KW<T> == 2 && (k & 1);
            auto add_tile = [&](auto b) {
              const auto& table = fetch.rate > 0 ? MICRO_ADD<T, decltype(b), true> : MICRO_ADD<T, decltype(b), false>;
              table[R](a, ldx, k / KW<T>, k_odd, b, fetch, s, width);
            };
            if constexpr (in_place) add_tile(WeightRows<T>{wp + (e * I + k0) * O + p * NR, O, cols});
            else add_tile(PackedPanel{&packed[p * panel_stride]});
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = &sums[r * width];
        int64_t c = 0;
        if (stream)
          for (; c + NR <= O; c += NR)
            stream_row(yp + (row0 + r) * O + c, _mm512_loadu_ps(row + c), _mm512_loadu_ps(row + c + 16));
        for (; c < O; c += 16) store16(yp + (row0 + r) * O + c, _mm512_loadu_ps(row + c), first_lanes(O - c));
      }
    }
    if (stream) _mm_sfence();
  });
}

// y[g] = x[g] @ w[e] with w [E, I, O] contiguous: the weight's columns packed as they lie,
// the next task's panel (strided rows) fetched ahead: at 128 and 256 rows per expert (A/B,
// Zen 4, 32 experts, k=1 and 2) 0.93-0.98x the time of the out-projection's input gradient,
// the in-projection's 0.99-1.00x.
template <typename T, typename W>
void gmm_x_w_into(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& b, at::Tensor& y) {
  const int64_t I = x.size(1), O = w.size(2);
  const W* wp = data<W>(w);
  gmm_rows_into<T, T, /*Spread=*/true>(
      x, w.size(0), O, b, y,
      [&](int64_t e, int64_t c0, int64_t width, uint32_t* panel) { pack_rows<T>(wp + e * I * O + c0, O, I, width, panel); },
      [&](int64_t e, int64_t c0, int64_t width) {  // the panel's rows: strided
        return Ahead::rows(wp + e * I * O + c0, I, width * (int64_t)sizeof(W), O * (int64_t)sizeof(W));
      });
}

// y[g] = x[g] @ w[e]^T with w [E, O, I] (the nn.Linear layout) for experts with many rows
// (see gmm_x_wt): the weight's rows packed transposed (a float32 one rounded to bfloat16
// first, a task's rows at a time), so the rows are read in place and the output stored as it
// lies, with no transposed tiles.
template <typename T, typename W, typename Out>
void gmm_x_wt_packed_into(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& b, at::Tensor& y,
                          const Experts& mine) {
  const int64_t I = x.size(1), O = w.size(1), kwords = words_for<T>(I);
  const W* wp = data<W>(w);
  gmm_rows_into<T, Out, /*Spread=*/false>(x, w.size(0), O, b, y, [&](int64_t e, int64_t c0, int64_t width, uint32_t* panel) {
    const W* rows = wp + (e * O + c0) * I;
    thread_local std::vector<T> rounded;
    const T* src;
    // The weight rows come from memory where the tasks have few rows: the last task's
    // multiplies fetched little of them ahead. The packing then fetches as it goes: at 4-12
    // rows per expert 0.78-0.90x the time of the forward packed without (128 experts, both
    // projections); at 28 rows and more it cost 1-3%.
    bool fetch = false;
    if constexpr (std::is_same_v<T, W>) {
      src = rows;
      fetch = b[e + 1] - b[e] < 16;
    } else {
      rounded.resize(width * I);
      round_to_bf16(rows, width * I, rounded.data());
      src = rounded.data();
    }
    for (int64_t p = 0; p * NR < width; ++p)
      pack_transposed<T>(src + p * NR * I, I, std::min<int64_t>(NR, width - p * NR), I, panel + p * kwords * NR, fetch);
  }, [&](int64_t e, int64_t c0, int64_t width) {  // the task's weight rows: contiguous
    return Ahead::span(wp + (e * O + c0) * I, width * I * (int64_t)sizeof(W));
  }, mine);
}

// dw[e] = a[g]^T @ c[g] -> [E, P, Q] (the weight gradient), in the rows' dtype or, for a
// float32 weight under bfloat16 rows, in float32 straight from the accumulators. Both are
// packed (the group's rows are the reduction); a^T plays A, its words broadcast from the pack.
template <typename T, typename Out>
void gmm_at_b_into(const at::Tensor& a, const at::Tensor& c, const std::vector<int64_t>& b, Out* dp) {
  const int64_t P = a.size(1), Q = c.size(1), E = (int64_t)b.size() - 1;
  std::vector<int64_t> first_word(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) first_word[e + 1] = first_word[e] + words_for<T>(b[e + 1] - b[e]);
  const int64_t p_panels = (P + NR - 1) / NR, q_panels = (Q + NR - 1) / NR;
  auto a_buffer = scratch(first_word[E] * p_panels * NR, 0), c_buffer = scratch(first_word[E] * q_panels * NR, 1);
  uint32_t *apack = words(a_buffer), *cpack = words(c_buffer);
  const T *ap = data<T>(a), *cp = data<T>(c);
  // Packing tasks: (expert, its next CHUNK words), so that one large group (the router's
  // weight gradient) packs on every thread too.
  constexpr int64_t CHUNK = 256;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t w0 = 0; w0 < first_word[e + 1] - first_word[e]; w0 += CHUNK) chunks.emplace_back(e, w0);
  at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [e, w0] = chunks[i];
      const int64_t kwords = first_word[e + 1] - first_word[e], r0 = b[e] + KW<T> * w0;
      const int64_t rows = std::min<int64_t>(KW<T> * CHUNK, b[e + 1] - r0);
      pack_rows<T>(ap + r0 * P, P, rows, P, &apack[(first_word[e] * p_panels + w0) * NR], kwords * NR);
      pack_rows<T>(cp + r0 * Q, Q, rows, Q, &cpack[(first_word[e] * q_panels + w0) * NR], kwords * NR);
    }
  });
  // Tasks: (expert, panel of NR rows of a^T). The a panel stays in cache while every
  // column panel of c passes by.
  auto rows = [&](int64_t t) { return KW<T> * (first_word[t / p_panels + 1] - first_word[t / p_panels]); };
  parallel_by_rows(E * p_panels, rows, [&](int64_t t0, int64_t t1) {
    __m512 acc[2 * MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / p_panels, pp = t % p_panels, kwords = first_word[e + 1] - first_word[e];
      const int64_t r_end = std::min(P, (pp + 1) * NR);
      Out* out = dp + e * P * Q;
      if (kwords == 0) {  // an empty group: exact zeros
        std::memset(out + pp * NR * Q, 0, (r_end - pp * NR) * Q * sizeof(Out));
        continue;
      }
      const uint32_t* a_panel = &apack[(first_word[e] * p_panels + pp * kwords) * NR];
      const uint32_t* c_e = &cpack[first_word[e] * q_panels * NR];
      for (int64_t q = 0; q < q_panels; ++q) {
        const int cols = (int)std::min<int64_t>(NR, Q - q * NR);
        for (int64_t r0 = pp * NR; r0 < r_end; r0 += MR) {
          // Word kw of row r of a^T is word kw*NR + r % NR of its panel.
          const int R = (int)std::min<int64_t>(MR, r_end - r0);
          const T* a_rows = reinterpret_cast<const T*>(a_panel + r0 % NR);
          const uint32_t* c_panel = c_e + q * kwords * NR;
          // The gradient is weight-sized and written once: past the caches at E=128 (a
          // streaming store saves the read of each line: 3-10% of this GEMM there).
          if (cols == NR) {
            MICRO_STREAM<T, Out>[R](a_rows, KW<T>, KW<T> * NR, kwords, c_panel, out + r0 * Q + q * NR, Q);
          } else {
            MICRO<T>[cols <= 16][R](a_rows, KW<T>, KW<T> * NR, kwords, false, c_panel, acc, Ahead{});
            store_tile(acc, R, cols, out + r0 * Q + q * NR, Q);
          }
        }
      }
    }
    _mm_sfence();  // streaming stores are visible to other threads only after a fence
  });
}

// Checks x and w, then calls body(T{}, W{}) with the element types of the rows and the
// weight: bfloat16 rows with a bfloat16 or float32 weight, float32 rows with a float32 one.
template <typename Body>
void with_dtypes(const at::Tensor& x, const at::Tensor& w, Body body) {
  check(x, "x");
  check(w, "w");
  TORCH_CHECK(is_bf16(x) || !is_bf16(w), "float32 rows need a float32 weight");
  if (!is_bf16(x)) body(float{}, float{});
  else if (is_bf16(w)) body(bf16{}, bf16{});
  else body(bf16{}, float{});
}

}  // namespace

// The weight is read in place (gmm_x_wt_into) unless the experts average many rows: then
// packing each weight panel once for all of its expert's rows (gmm_x_wt_packed_into, the
// next task's rows fetched ahead) costs less than packing the rows and storing transposed
// tiles. A/B of the two in one process (forward, 2 cores, d=512, F=1024): from 128 rows per
// expert on 0.86-0.97x the time (bfloat16 or float32 weight, bfloat16 or float32 rows; the
// `small` preset's 128 rows at d=256 0.80-0.90x); at 64 level; at 32 1.00-1.16x. Without
// the fetching ahead, packing took twice the time at 32-64 rows and lost below 256.
constexpr int64_t PACKED_ROWS = 128;

// Below that average, an expert's weight is still packed where its own rows make that
// cheaper. In place, its rows go in 16-lane vectors, so a group costs whole 16-row blocks
// (33 rows as much as 48, and a last odd vector nearly as much as a pair); packed, its rows
// go 12 at a time through the micro-kernel after a packing pass over its weight, partly
// hidden behind the multiplies. Measured: the forward of both projections, bfloat16, d=512,
// F=1024, 128 experts of r rows each, 2-core Zen 4, in ms for all 128 experts (a packed row
// costs about 1 ms there): in place 1 + 32.3 per pair of vectors + 20 for an odd one (23.5 if
// it is the only one), r = 16, 32, 48, 64, 80, 96: 24.5, 33.0, 51.5, 64.7, 85.0, 96.5; packed
// max(6.4 + r, 17 + 0.6 r), r = 4, 8, 12, 20, 40, 72, 128: 19.2, 21.0, 23.7, 28.2, 45.9,
// 77.8, 134.5 (float32: about twice the times, in the same ratios). Packed where that model
// says at least 5% less (1-10 rows, 17-24, 33-44, 49-55), and above 64 rows, as before:
// there the two were within a few percent (uniform), and packing measured 0.85-0.93x with
// skewed routing. Against the model this replaces (packed at 33-36, 49-60 and 65+ rows
// only), the forward at 128 experts (both projections, A/B in one process): bfloat16 k=1
// 0.97x the time with uniform routing, 0.91-0.94x skewed (Dirichlet 0.3, 1.0), k=2
// 0.97-0.99x; float32 k=1 0.91-0.95x, k=2 0.97-1.01x; at 64 experts 0.99-1.01x.
bool pack_costs_less(int64_t rows) {
  if (rows > 64) return true;
  const int64_t vectors = (rows + 15) / 16;
  const double in_place = 1.0 + 32.3 * (double)(vectors / 2) + (vectors == 1 ? 23.5 : vectors % 2 ? 20.0 : 0.0);
  const double packed = std::max(6.4 + (double)rows, 17.0 + 0.6 * (double)rows);
  return packed < 0.95 * in_place;
}

// out_float32: y in float32 straight from the accumulators (the router's logits).
at::Tensor gmm_x_wt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, bool out_float32) {
  auto b = group_bounds(offsets);
  auto y = output_rows(x, w.size(1), b.back(), out_float32);
  const int64_t E = w.size(0);
  Experts packed(E), in_place(E);
  int64_t n_packed = 0;
  const bool pack_all = x.size(0) / std::max<int64_t>(E, 1) >= PACKED_ROWS;
  for (int64_t e = 0; e < E; ++e) {
    packed[e] = pack_all || pack_costs_less(b[e + 1] - b[e]);
    in_place[e] = !packed[e];
    n_packed += packed[e];
  }
  with_dtypes(x, w, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    auto run = [&](auto out) {
      using Out = decltype(out);
      if (n_packed > 0) gmm_x_wt_packed_into<T, W, Out>(x, w, b, y, n_packed == E ? Experts{} : packed);
      if (n_packed < E) gmm_x_wt_into<T, W, Out>(x, w, b, y, n_packed == 0 ? Experts{} : in_place);
    };
    if constexpr (std::is_same_v<T, float>) run(float{});
    else if (out_float32) run(float{});
    else run(bf16{});
  });
  return y;
}

// The weight is packed a block of rows at a time (gmm_x_w_streamed_into) where the experts
// average few rows, else a panel of columns per task (gmm_x_w_into). A/B in one process (2
// cores, d=512, F=1024, the input gradient of both projections): a bfloat16 weight at 32 rows
// per expert 0.72-0.97x the time, at 64 0.92-0.97x, at 128 1.02-1.09x; a float32 one (autocast's
// master copy, rounded as it is packed) 0.68-0.85x at 32 and 64 rows, 0.85-0.90x at 128;
// float32 rows 0.60-0.65x at 32, 0.92x at 128, 1.05-1.06x at 512.
at::Tensor gmm_x_w(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  auto b = group_bounds(offsets);
  auto y = output_rows(x, w.size(2), b.back());
  const int64_t rows_per_expert = x.size(0) / std::max<int64_t>(w.size(0), 1);
  const bool streamed = rows_per_expert < (is_bf16(w) ? 128 : 256);
  with_dtypes(x, w, [&](auto t, auto wt) {
    if (streamed) gmm_x_w_streamed_into<decltype(t), decltype(wt)>(x, w, b, y);
    else gmm_x_w_into<decltype(t), decltype(wt)>(x, w, b, y);
  });
  return y;
}

at::Tensor gmm_at_b(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offsets, bool out_float32) {
  check(a, "a");
  check(c, "c");
  TORCH_CHECK(a.scalar_type() == c.scalar_type(), "a and c differ in dtype");
  auto b = group_bounds(offsets);
  const bool float_out = out_float32 || !is_bf16(a);
  auto dw = at::empty({offsets.size(0), a.size(1), c.size(1)}, a.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (!is_bf16(a)) gmm_at_b_into<float>(a, c, b, dw.data_ptr<float>());
  else if (float_out) gmm_at_b_into<bf16>(a, c, b, dw.data_ptr<float>());
  else gmm_at_b_into<bf16>(a, c, b, data<bf16>(dw));
  return dw;
}

// cpu_rows.cpp, cpu_router.cpp and cpu_activation.cpp, built into the same module.
void add_row_ops(pybind11::module_& m);
void add_router_ops(pybind11::module_& m);
void add_activation_ops(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gmm_x_wt", &gmm_x_wt, "y[g] = x[g] @ w[e]^T, w [E, O, I], in float32 if out_float32");
  m.def("gmm_x_w", &gmm_x_w, "y[g] = x[g] @ w[e], w [E, I, O]");
  m.def("gmm_at_b", &gmm_at_b, "dw[e] = a[g]^T @ c[g], in float32 if out_float32");
  add_row_ops(m);
  add_router_ops(m);
  add_activation_ops(m);
}
