// Float32 matmuls for a small number M of rows (decode steps: M = rows being sampled) on x86 CPUs with
// AVX-512, as XLA FFI custom calls. See skinny_matmul.py for why and when they are used.
//
// ---- out[M, N] = x[M, K] . w[N, K]^T (w in [out, in] storage: the output head, i.e. the embedding) ----
//
// w is read once, front to back, in blocks of kRows rows; each block is held in L1 while every row of x
// (in tiles of up to 6) is dotted with it: 6 x 4 = 24 zmm accumulators along K, one horizontal sum per
// output. Software prefetch into L2 runs kPrefetchRows rows ahead of the first tile (the hardware
// streamers alone leave the cores waiting on memory). Work is split over XLA's intra-op thread pool in
// chunks of rows claimed from an atomic counter; the calling thread works too. Each output is one
// sequential sum over K in 16 lanes, so the result differs from XLA's dot by float32 rounding only.

#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// The AMX path needs the AMX intrinsics (GCC >= 11, clang >= 12) and Linux, which grants the tile state to
// a process that asks; elsewhere it is compiled out and the head keeps its FMA tiles (-DPF_NO_AMX: too).
#if defined(__linux__) && !defined(PF_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define PF_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PF_HAVE_AMX 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;               // rows of w per register tile
constexpr int kMaxTileM = 6;           // rows of x per register tile
constexpr int64_t kPrefetchRows = 16;  // how far ahead of the first tile w is prefetched (rows)
constexpr int64_t kAmxPassRows = 32;   // rows of x per AMX pass over w (the 8 tiles hold two 16-row blocks)
std::atomic<bool> g_amx{false};        // AMX usable (pf_skinny_matmul_enable_amx succeeded)
std::atomic<int64_t> g_amx_calls{0};   // calls that took the AMX path (for tests)

template <int TM, int TN, bool kPrefetch>
__attribute__((target("avx512f"), always_inline)) inline void Tile(const float* x, int64_t k_dim,
                                                                   const float* w, float* out,
                                                                   int64_t n_dim) {
  __m512 acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= k_dim; k += 16) {
    __m512 wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = _mm512_loadu_ps(w + j * k_dim + k);
    if (kPrefetch)
      for (int j = 0; j < TN; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + kPrefetchRows) * k_dim + k), _MM_HINT_T1);
    for (int i = 0; i < TM; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * k_dim + k);
      for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < k_dim) {  // the last K % 16 columns, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (k_dim - k)) - 1);
    __m512 wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * k_dim + k);
    for (int i = 0; i < TM; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * k_dim + k);
      for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) out[i * n_dim + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// TM rows of x (from row m) against TN rows of w; the first tile of a block prefetches, the others find
// the block in L1.
template <int TM, int TN>
__attribute__((target("avx512f"), always_inline)) inline void TileAt(const float* x, int64_t m, int64_t k_dim,
                                                                     const float* wb, float* ob,
                                                                     int64_t n_dim) {
  if (m == 0)
    Tile<TM, TN, true>(x + m * k_dim, k_dim, wb, ob + m * n_dim, n_dim);
  else
    Tile<TM, TN, false>(x + m * k_dim, k_dim, wb, ob + m * n_dim, n_dim);
}

// All rows of x against TN rows of w starting at w_row.
template <int TN>
__attribute__((target("avx512f"))) void Block(const float* x, int64_t m_dim, const float* w, int64_t k_dim,
                                              float* out, int64_t n_dim, int64_t w_row) {
  const float* wb = w + w_row * k_dim;
  float* ob = out + w_row;
  int64_t m = 0;
  for (; m + kMaxTileM <= m_dim; m += kMaxTileM) TileAt<kMaxTileM, TN>(x, m, k_dim, wb, ob, n_dim);
  switch (m_dim - m) {
    case 5: TileAt<5, TN>(x, m, k_dim, wb, ob, n_dim); break;
    case 4: TileAt<4, TN>(x, m, k_dim, wb, ob, n_dim); break;
    case 3: TileAt<3, TN>(x, m, k_dim, wb, ob, n_dim); break;
    case 2: TileAt<2, TN>(x, m, k_dim, wb, ob, n_dim); break;
    case 1: TileAt<1, TN>(x, m, k_dim, wb, ob, n_dim); break;
    default: break;
  }
}

void Rows(const float* x, int64_t m_dim, const float* w, int64_t k_dim, float* out, int64_t n_dim,
          int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + kRows <= end; n += kRows) Block<kRows>(x, m_dim, w, k_dim, out, n_dim, n);
  switch (end - n) {
    case 3: Block<3>(x, m_dim, w, k_dim, out, n_dim, n); break;
    case 2: Block<2>(x, m_dim, w, k_dim, out, n_dim, n); break;
    case 1: Block<1>(x, m_dim, w, k_dim, out, n_dim, n); break;
    default: break;
  }
}

// Runs fn(0), ..., fn(chunks - 1) on the calling thread and up to threads - 1 tasks of XLA's pool, each
// claiming chunks from an atomic counter. A task that starts after the last chunk was claimed returns
// without calling fn, so the caller only waits for chunks, not for tasks (the pool may run tasks late,
// or inline, or on one thread).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, Fn fn) {
  struct State {
    State(Fn f, int64_t n) : fn(std::move(f)), chunks(n) {}
    Fn fn;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    void Work() {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
        fn(c);
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn), chunks);
  const int64_t helpers = std::min(std::max<int64_t>(1, pool.num_threads()), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->finished.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

#if PF_HAVE_AMX
// ---- The same product on AMX tiles (Sapphire Rapids and later), float32-exact ----
//
// AMX multiplies bf16 tiles into float32 ones, 16x faster per core than AVX-512 FMAs. Every float32 v is
// split exactly into three bf16 pieces by truncation: hi = v's top 16 bits, mid = the top 16 bits of
// v - hi, lo = v - hi - mid (at most 8 significant bits left, so lo is a bf16 too); relative to v, mid is
// below 2^-7 and lo below 2^-15. Of the nine products of w's and x's pieces, all but lo.lo (< 2^-30) are
// accumulated in float32: each product is then exact to float32's rounding, and the dot has the error of
// a float32 sum (tests/test_kernels.py). The usual six-product scheme ("bf16x6", XLA's HIGHEST on bf16
// hardware) also drops mid.lo and lo.mid (< 2^-21 each) and measured ~2.5x float32's error on single
// products; the two more tiles cost ~3% of the head's time.
//
// Layout: C^T = w . x^T, so that w is the A operand in its own row order: for each block of 16 rows of w
// and each chunk of 32 along K, the 16 x 32 block is split into three A tiles (a staging buffer in L1,
// double-buffered); x^T was split and laid out as B tiles once per call (FormatXNT). Each 16-row block of
// x (MB = 1 or 2 of them: 32 rows) has 4 / MB accumulator tiles: one for the hi.hi products, the others
// for the corrections, so that successive products into one tile do not wait on each other either. More
// rows than 32 take several passes over w, each streaming it again: 1.1-1.2x the FMA tiles at 48-64 rows,
// none at 33-40. A finished [16 w rows, 16 x rows] tile is written to out transposed, by gathers.

#define PF_AMX __attribute__((target("avx512f,avx512bw,avx512dq,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline uint32_t Bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float FromBits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// x [M, K] -> B tiles [3][KC][MB][16][32] bf16: piece j of x[c*16 + m][kc*32 + 2r + t] at [j][kc][c][r][2m + t].
void FormatXNT(const float* x, int64_t m_dim, int64_t k_dim, uint16_t* xt) {
  const int64_t kc_n = (k_dim + 31) / 32, mb = (m_dim + 15) / 16;
  std::fill(xt, xt + 3 * kc_n * mb * 512, uint16_t{0});
  for (int64_t m = 0; m < m_dim; ++m)
    for (int64_t k = 0; k < k_dim; ++k) {
      float v = x[m * k_dim + k];
      const int64_t at = ((k / 32) * mb + m / 16) * 512 + ((k % 32) / 2) * 32 + 2 * (m % 16) + k % 2;
      for (int j = 0; j < 3; ++j) {
        const uint32_t hi = Bits(v) & 0xFFFF0000u;
        xt[j * kc_n * mb * 512 + at] = static_cast<uint16_t>(hi >> 16);
        v -= FromBits(hi);
      }
    }
}

// All eight tiles 16 rows x 64 bytes (palette 1), for this thread.
PF_AMX inline void ConfigureTiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// Split3's permutation: the high 16 bits of each float of a, then of each float of b.
PF_AMX inline __m512i HighHalves() {
  alignas(64) uint16_t ix[32];
  for (int i = 0; i < 16; ++i) ix[i] = 2 * i + 1, ix[16 + i] = 32 + 2 * i + 1;
  return _mm512_load_si512(ix);
}

PF_AMX inline void Split3(__m512 a, __m512 b, __m512i idx, uint16_t* d0, uint16_t* d1, uint16_t* d2) {
  const __m512 m = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  _mm512_store_si512(d0, _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b)));
  a = _mm512_sub_ps(a, _mm512_and_ps(a, m));
  b = _mm512_sub_ps(b, _mm512_and_ps(b, m));
  _mm512_store_si512(d1, _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b)));
  a = _mm512_sub_ps(a, _mm512_and_ps(a, m));
  b = _mm512_sub_ps(b, _mm512_and_ps(b, m));
  _mm512_store_si512(d2, _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b)));
}

// dst += A(a) . B(tmm7); tile numbers must be literals in the instruction, so they are spelled out.
template <int D, int A>
PF_AMX inline void Dot() {
  static_assert(D >= 0 && D < 4 && A >= 4 && A < 7);
#define PF_DOT(d, a) if constexpr (D == d && A == a) _tile_dpbf16ps(d, a, 7);
  PF_DOT(0, 4) PF_DOT(0, 5) PF_DOT(0, 6) PF_DOT(1, 4) PF_DOT(1, 5) PF_DOT(1, 6)
  PF_DOT(2, 4) PF_DOT(2, 5) PF_DOT(2, 6) PF_DOT(3, 4) PF_DOT(3, 5) PF_DOT(3, 6)
#undef PF_DOT
}

// dst += A(tmm7) . B(b): x's piece in tile 7, w's pieces in tiles 4-6.
template <int D, int B>
PF_AMX inline void DotB() {
  static_assert(D >= 0 && D < 4 && B >= 4 && B < 7);
#define PF_DOT(d, b) if constexpr (D == d && B == b) _tile_dpbf16ps(d, 7, b);
  PF_DOT(0, 4) PF_DOT(0, 5) PF_DOT(0, 6) PF_DOT(1, 4) PF_DOT(1, 5) PF_DOT(1, 6)
  PF_DOT(2, 4) PF_DOT(2, 5) PF_DOT(2, 6) PF_DOT(3, 4) PF_DOT(3, 5) PF_DOT(3, 6)
#undef PF_DOT
}

// The accumulator tile of product p (0 = hi.hi) of m-block c, with MB m-blocks of 4 / MB tiles each.
template <int MB>
constexpr int Acc(int c, int p) {
  constexpr int per_block = 4 / MB;
  return c * per_block + (p == 0 ? 0 : 1 + (p - 1) % (per_block - 1));
}

// dst += x's piece (tile 7) times w's piece (tile W, 4-6), w in the operand place of the layout: A for the
// head (C^T = w . x^T), B for the packed projections (C = x . w).
template <bool kWIsA, int D, int W>
PF_AMX inline void Product() {
  if constexpr (kWIsA)
    Dot<D, W>();
  else
    DotB<D, W>();
}

// The eight products of one K chunk for m-block C, x's three pieces at xk + j * piece (w's are in tiles
// 4-6), x piece outer. hi.hi goes to the m-block's first accumulator, the seven corrections (< 2^-7 of it)
// to the others, round robin: the corrections' roundings are then relative to their own size, and the big
// sum rounds as a float32 dot's would.
template <int MB, bool kWIsA, int C>
PF_AMX inline void EightProducts(const uint16_t* xk, int64_t piece) {
  _tile_loadd(7, xk + C * 512, 64);
  Product<kWIsA, Acc<MB>(C, 0), 4>();
  Product<kWIsA, Acc<MB>(C, 1), 5>();
  Product<kWIsA, Acc<MB>(C, 2), 6>();
  _tile_loadd(7, xk + piece + C * 512, 64);
  Product<kWIsA, Acc<MB>(C, 3), 4>();
  Product<kWIsA, Acc<MB>(C, 4), 5>();
  Product<kWIsA, Acc<MB>(C, 5), 6>();
  _tile_loadd(7, xk + 2 * piece + C * 512, 64);
  Product<kWIsA, Acc<MB>(C, 6), 4>();
  Product<kWIsA, Acc<MB>(C, 7), 5>();
}

template <int MB, bool kWIsA>
PF_AMX inline void ChunkProducts(const uint16_t* xk, int64_t piece) {
  EightProducts<MB, kWIsA, 0>(xk, piece);
  if constexpr (MB > 1) EightProducts<MB, kWIsA, 1>(xk, piece);
}

// m-block c's accumulators summed into sum: the corrections' tiles first, then the hi.hi tile once.
template <int MB>
PF_AMX void SumAccumulators(int c, float (*sum)[16]) {
  constexpr int APM = 4 / MB;  // accumulator tiles per m-block
  alignas(64) float part[16][16];
  for (int t = APM - 1; t >= 0; --t) {
    float* dst = t == APM - 1 ? &sum[0][0] : &part[0][0];
    switch (c * APM + t) {
      case 0: _tile_stored(0, dst, 64); break;
      case 1: _tile_stored(1, dst, 64); break;
      case 2: _tile_stored(2, dst, 64); break;
      default: _tile_stored(3, dst, 64); break;
    }
    if (t != APM - 1)
      for (int r = 0; r < 16; ++r)
        _mm512_store_ps(sum[r], _mm512_add_ps(_mm512_load_ps(sum[r]), _mm512_load_ps(part[r])));
  }
}

template <int MB>
PF_AMX void AmxRowsNT(const uint16_t* xt, int64_t m_dim, const float* w, int64_t k_dim, float* out, int64_t n_dim,
                      int64_t begin, int64_t end) {
  ConfigureTiles();
  static_assert(MB == 1 || MB == 2);
  const int64_t kc_n = (k_dim + 31) / 32, piece = kc_n * MB * 512;
  alignas(64) uint16_t abuf[2][3][16][32];
  alignas(64) float cbuf[16][16];
  const __m512i idx = HighHalves();
  const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
  for (int64_t n0 = begin; n0 < end; n0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - n0));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < kc_n; ++kc) {
      const int64_t k = kc * 32, kn = std::min<int64_t>(32, k_dim - k);
      const __mmask16 ma = kn >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << kn) - 1);
      const __mmask16 mb = kn >= 32 ? 0xFFFF : kn <= 16 ? 0 : static_cast<__mmask16>((1u << (kn - 16)) - 1);
      auto& ab = abuf[kc & 1];
      for (int r = 0; r < 16; ++r) {
        __m512 a = _mm512_setzero_ps(), b = a;
        if (r < rows) {
          const float* wr = w + (n0 + r) * k_dim + k;
          a = _mm512_maskz_loadu_ps(ma, wr);
          b = _mm512_maskz_loadu_ps(mb, wr + 16);
          _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * k_dim), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * k_dim + 16), _MM_HINT_T1);
        }
        Split3(a, b, idx, ab[0][r], ab[1][r], ab[2][r]);
      }
      _tile_loadd(4, ab[0], 64);
      _tile_loadd(5, ab[1], 64);
      _tile_loadd(6, ab[2], 64);
      ChunkProducts<MB, true>(xt + kc * MB * 512, piece);
    }
    for (int c = 0; c < MB; ++c) {
      SumAccumulators<MB>(c, cbuf);
      const int ms = static_cast<int>(std::min<int64_t>(16, m_dim - c * 16));
      const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
      for (int m = 0; m < ms; ++m)  // column m of the [n, m] tile is row c * 16 + m of out
        _mm512_mask_storeu_ps(out + (c * 16 + m) * n_dim + n0, row_mask, _mm512_i32gather_ps(column, &cbuf[0][m], 4));
    }
  }
  _tile_release();
}

// ---- out[M, N] = x[M, K] . w[K, N] on AMX tiles, w packed once (PackNN) for many calls ----
//
// The projections' weights are [in, out] = [K, N]; AMX wants the B operand with K-pairs interleaved
// ("VNNI": B row r holds (w[2r][n], w[2r+1][n]) for 16 n). PackNN lays w out as [N/16][K/2][16][2]
// float32 (K padded to 32, N to 16, with zeros), so that each 16-column block is one contiguous stream
// and each 16 x 32 slice of it is one B tile's worth in order. The matmul then splits w's pieces on the
// fly (Split3, as the head), x's pieces once per call as A tiles, and the C tiles are out's own rows:
// no transposed stores.
//
// Where the time goes (16 rows, [640, 2048], two threads, from a harness with parts compiled out): with
// w in L2 the split and the tile products each take about half, and they do not overlap; with w coming
// from memory the kernel takes ~1.6x a plain read of the packed stream (which reaches the machine's
// bandwidth), and prefetch distance (2-32 KiB, L1 or L2) or 2 MiB pages change that by 5% at most. The
// FMA kernel (matmul_nn) on the same weight from memory takes ~1.5x this one.

// x [M, K] -> A tiles [3][KC][MB][16][32] bf16: piece j of x[c*16 + m][kc*32 + i] at [j][kc][c][m][i].
PF_AMX void FormatXNN(const float* x, int64_t m_dim, int64_t k_dim, int64_t mb, uint16_t* xa) {
  const __m512i idx = HighHalves();
  const int64_t kc_n = (k_dim + 31) / 32, piece = kc_n * mb * 512;
  for (int64_t kc = 0; kc < kc_n; ++kc) {
    const int64_t k = kc * 32, kn = std::min<int64_t>(32, k_dim - k);
    const __mmask16 ma = kn >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << kn) - 1);
    const __mmask16 mb_ = kn >= 32 ? 0xFFFF : kn <= 16 ? 0 : static_cast<__mmask16>((1u << (kn - 16)) - 1);
    for (int64_t r = 0; r < mb * 16; ++r) {
      __m512 a = _mm512_setzero_ps(), b = a;
      if (r < m_dim) {
        a = _mm512_maskz_loadu_ps(ma, x + r * k_dim + k);
        b = _mm512_maskz_loadu_ps(mb_, x + r * k_dim + k + 16);
      }
      uint16_t* d = xa + (kc * mb + r / 16) * 512 + (r % 16) * 32;
      Split3(a, b, idx, d, d + piece, d + 2 * piece);
    }
  }
}

// How far ahead of the block being split the stream is prefetched (floats: 8 KiB). Measured with the
// weights coming from memory: 2-32 KiB ahead, into L1 or L2, all within 5%; none 3% slower.
constexpr int64_t kPackedPrefetch = 2048;

template <int MB>
PF_AMX void AmxPackedNN(const uint16_t* xa, int64_t m_dim, int64_t kc_n, const float* wp, float* out,
                        int64_t n_dim, int64_t nb0, int64_t nb1) {
  ConfigureTiles();
  static_assert(MB == 1 || MB == 2);
  const int64_t piece = kc_n * MB * 512;
  alignas(64) uint16_t bbuf[2][3][16][32];
  alignas(64) float cbuf[16][16];
  const __m512i idx = HighHalves();
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const float* wb = wp + nb * kc_n * 512;
    for (int64_t kc = 0; kc < kc_n; ++kc) {
      auto& bb = bbuf[kc & 1];
      const float* src = wb + kc * 512;
      for (int r = 0; r < 16; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(src + kPackedPrefetch + 32 * r), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(src + kPackedPrefetch + 32 * r + 16), _MM_HINT_T0);
        Split3(_mm512_loadu_ps(src + 32 * r), _mm512_loadu_ps(src + 32 * r + 16), idx, bb[0][r], bb[1][r], bb[2][r]);
      }
      _tile_loadd(4, bb[0], 64);
      _tile_loadd(5, bb[1], 64);
      _tile_loadd(6, bb[2], 64);
      ChunkProducts<MB, false>(xa + kc * MB * 512, piece);
    }
    const int64_t cols = std::min<int64_t>(16, n_dim - nb * 16);
    const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
    for (int c = 0; c < MB; ++c) {
      SumAccumulators<MB>(c, cbuf);
      const int ms = static_cast<int>(std::min<int64_t>(16, m_dim - c * 16));
      for (int m = 0; m < ms; ++m)
        _mm512_mask_storeu_ps(out + (c * 16 + m) * n_dim + nb * 16, col_mask, _mm512_load_ps(cbuf[m]));
    }
  }
  _tile_release();
}

// Runs pass(g0, mg, xs) for x's rows g0 .. g0 + mg - 1, in passes of up to kAmxPassRows rows shared evenly
// (33 rows: 17 + 16, not 32 + 1), each streaming w once; xs: 64-byte aligned room for one pass's three bf16
// pieces of x, reused by every pass.
template <typename Pass>
void AmxPasses(int64_t m_dim, int64_t k_dim, Pass pass) {
  const int64_t kc_n = (k_dim + 31) / 32;
  std::vector<uint16_t> storage(3 * kc_n * (kAmxPassRows / 16) * 512 + 32);
  uint16_t* xs = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  const int64_t passes = (m_dim + kAmxPassRows - 1) / kAmxPassRows, pass_rows = (m_dim + passes - 1) / passes;
  for (int64_t g0 = 0; g0 < m_dim; g0 += pass_rows) pass(g0, std::min(pass_rows, m_dim - g0), xs);
}
#endif  // PF_HAVE_AMX

// use_amx: take the AMX path if AMX is enabled. For which row counts it pays is the caller's choice
// (skinny_matmul.py: amx_pays), so that both paths can be run and compared in one process.
ffi::Error SkinnyMatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out, bool use_amx) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || xd[1] != wd[1] || od[0] != xd[0] ||
      od[1] != wd[0])
    return ffi::Error::InvalidArgument("pf_skinny_matmul_nt: expected x [M, K], w [N, K], out [M, N]");
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = wd[0];
  if (m_dim == 0 || n_dim == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~64 KiB..4 MiB of w per chunk: enough chunks to balance, few enough that claiming costs nothing.
  const int64_t row_bytes = k_dim * static_cast<int64_t>(sizeof(float));
  const int64_t max_rows = std::max<int64_t>(kRows, (int64_t{4} << 20) / row_bytes / kRows * kRows);
  const int64_t min_rows = std::max<int64_t>(kRows, (int64_t{64} << 10) / row_bytes / kRows * kRows);
  int64_t rows = (n_dim + 16 * threads - 1) / (16 * threads);
  rows = std::clamp((rows + kRows - 1) / kRows * kRows, min_rows, max_rows);
#if PF_HAVE_AMX
  if (use_amx && g_amx.load(std::memory_order_relaxed)) {
    g_amx_calls.fetch_add(1, std::memory_order_relaxed);
    rows = (rows + 15) / 16 * 16;  // whole 16-row blocks per chunk
    AmxPasses(m_dim, k_dim, [&](int64_t g0, int64_t mg, uint16_t* xt) {
      FormatXNT(xp + g0 * k_dim, mg, k_dim, xt);
      float* og = op + g0 * n_dim;
      ParallelFor(pool, (n_dim + rows - 1) / rows, [=](int64_t c) {
        const int64_t b = c * rows, e = std::min(n_dim, (c + 1) * rows);
        if (mg <= 16)
          AmxRowsNT<1>(xt, mg, wp, k_dim, og, n_dim, b, e);
        else
          AmxRowsNT<2>(xt, mg, wp, k_dim, og, n_dim, b, e);
      });
    });
    return ffi::Error::Success();
  }
#else
  (void)use_amx;
#endif
  ParallelFor(pool, (n_dim + rows - 1) / rows, [=](int64_t c) {
    Rows(xp, m_dim, wp, k_dim, op, n_dim, c * rows, std::min(n_dim, (c + 1) * rows));
  });
  return ffi::Error::Success();
}

// ---- out[M, N] = x[M, K] . w[K, N] (w in its [in, out] storage layout: the layers' projections) ----
//
// Tiles of up to 6 rows of x by 64 columns of w (4 zmm): per k, 4 loads of w's row k, one broadcast of
// x[m, k] per row, 24 FMAs. K is walked in chunks of kKChunk rows so that the 16 KiB panel of w stays in
// L1 for the later row tiles; partial sums go through out between chunks. The first row tile prefetches
// w kPrefetchK rows ahead into L2: a column block reads one 256-byte piece per row of w, a new page every
// row, which the hardware streamers do not follow.

constexpr int kColVecs = 4;
constexpr int64_t kCols = 16 * kColVecs;
constexpr int64_t kKChunk = 64;
constexpr int64_t kPrefetchK = 16;

template <int TM, int TN, bool kPrefetch>
__attribute__((target("avx512f"), always_inline)) inline void TileNN(const float* x, int64_t k_dim,
                                                                     const float* w, int64_t n_dim, float* out,
                                                                     int64_t k0, int64_t k1, bool accumulate,
                                                                     __mmask16 last) {
  __m512 acc[TM][TN];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j) {
      const __mmask16 mk = j == TN - 1 ? last : __mmask16(0xFFFF);
      acc[i][j] = accumulate ? _mm512_maskz_loadu_ps(mk, out + i * n_dim + 16 * j) : _mm512_setzero_ps();
    }
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = w + k * n_dim;
    __m512 wv[TN];
    for (int j = 0; j < TN; ++j)
      wv[j] = _mm512_maskz_loadu_ps(j == TN - 1 ? last : __mmask16(0xFFFF), wk + 16 * j);
    if (kPrefetch)
      for (int j = 0; j < TN; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchK * n_dim + 16 * j), _MM_HINT_T1);
    for (int i = 0; i < TM; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * k_dim + k]);
      for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TN; ++j)
      _mm512_mask_storeu_ps(out + i * n_dim + 16 * j, j == TN - 1 ? last : __mmask16(0xFFFF), acc[i][j]);
}

// TM rows of x (from row m) against the column block of w at c0, over K rows [k0, k1); as TileAt, the
// first row tile prefetches.
template <int TM, int TN>
__attribute__((target("avx512f"), always_inline)) inline void TileNNAt(const float* x, int64_t m, int64_t k_dim,
                                                                       const float* w, int64_t n_dim, float* out,
                                                                       int64_t c0, int64_t k0, int64_t k1,
                                                                       __mmask16 last) {
  const float* xm = x + m * k_dim;
  float* om = out + m * n_dim + c0;
  if (m == 0)
    TileNN<TM, TN, true>(xm, k_dim, w + c0, n_dim, om, k0, k1, k0 > 0, last);
  else
    TileNN<TM, TN, false>(xm, k_dim, w + c0, n_dim, om, k0, k1, k0 > 0, last);
}

// All rows of x against the column block of TN vectors of w at c0.
template <int TN>
__attribute__((target("avx512f"))) void ColumnBlockNN(const float* x, int64_t m_dim, int64_t k_dim,
                                                      const float* w, int64_t n_dim, float* out, int64_t c0,
                                                      __mmask16 last) {
  for (int64_t k0 = 0; k0 < k_dim; k0 += kKChunk) {
    const int64_t k1 = std::min(k_dim, k0 + kKChunk);
    int64_t m = 0;
    for (; m + kMaxTileM <= m_dim; m += kMaxTileM)
      TileNNAt<kMaxTileM, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last);
    switch (m_dim - m) {
      case 5: TileNNAt<5, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last); break;
      case 4: TileNNAt<4, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last); break;
      case 3: TileNNAt<3, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last); break;
      case 2: TileNNAt<2, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last); break;
      case 1: TileNNAt<1, TN>(x, m, k_dim, w, n_dim, out, c0, k0, k1, last); break;
      default: break;
    }
  }
}

void ColumnBlocksNN(const float* x, int64_t m_dim, int64_t k_dim, const float* w, int64_t n_dim, float* out,
                    int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * kCols, cols = std::min(kCols, n_dim - c0);
    const int vecs = static_cast<int>((cols + 15) / 16);
    const __mmask16 last = cols % 16 ? static_cast<__mmask16>((1u << (cols % 16)) - 1) : __mmask16(0xFFFF);
    switch (vecs) {
      case 4: ColumnBlockNN<4>(x, m_dim, k_dim, w, n_dim, out, c0, last); break;
      case 3: ColumnBlockNN<3>(x, m_dim, k_dim, w, n_dim, out, c0, last); break;
      case 2: ColumnBlockNN<2>(x, m_dim, k_dim, w, n_dim, out, c0, last); break;
      default: ColumnBlockNN<1>(x, m_dim, k_dim, w, n_dim, out, c0, last); break;
    }
  }
}

ffi::Error SkinnyMatmulNN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || xd[1] != wd[0] || od[0] != xd[0] ||
      od[1] != wd[1])
    return ffi::Error::InvalidArgument("pf_skinny_matmul_nn: expected x [M, K], w [K, N], out [M, N]");
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = wd[1];
  if (m_dim == 0 || n_dim == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  if (k_dim == 0) {
    std::fill(op, op + m_dim * n_dim, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t blocks = (n_dim + kCols - 1) / kCols;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_chunk = std::max<int64_t>(1, (blocks + 4 * threads - 1) / (4 * threads));
  ParallelFor(pool, (blocks + per_chunk - 1) / per_chunk, [=](int64_t c) {
    ColumnBlocksNN(xp, m_dim, k_dim, wp, n_dim, op, c * per_chunk, std::min(blocks, (c + 1) * per_chunk));
  });
  return ffi::Error::Success();
}

// [w_0 | w_1 | ...] (each [K, N_i], side by side: N = sum N_i) -> [ceil(N / 16), KP / 2, 16, 2] (KP = K
// rounded up to 32; zeros in the padding): the layout of PackedMatmulNN. Row pairs outer, so that each
// chunk of blocks reads runs of every row; a block that straddles two inputs merges masked loads.
struct PackSource {
  const float* w;
  int64_t n, offset;  // columns, first global column
};

__attribute__((target("avx512f"))) void PackColumns(const std::vector<PackSource>& sources, int64_t k_dim,
                                                    int64_t kp2, float* out, int64_t nb0, int64_t nb1) {
  alignas(64) static constexpr int32_t lo_ix[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static constexpr int32_t hi_ix[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i lo = _mm512_loadu_si512(lo_ix), hi = _mm512_loadu_si512(hi_ix);
  size_t first = 0;  // the first source that reaches this chunk's columns
  while (first < sources.size() && sources[first].offset + sources[first].n <= nb0 * 16) ++first;
  for (int64_t kp = 0; kp < kp2; ++kp) {
    const int64_t r0 = 2 * kp, r1 = r0 + 1;
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t c0 = nb * 16;
      __m512 a = _mm512_setzero_ps(), b = a;
      for (size_t i = first; i < sources.size() && sources[i].offset < c0 + 16; ++i) {
        const PackSource& src = sources[i];
        const int64_t from = std::max(c0, src.offset), to = std::min(c0 + 16, src.offset + src.n);
        if (from >= to) continue;
        const __mmask16 mask = static_cast<__mmask16>(((1u << (to - from)) - 1) << (from - c0));
        // lanes from - c0 .. to - c0 take this source's columns from - offset .. to - offset, in order (an
        // expand-load, so that no pointer before the source's first column is formed)
        const float* first = src.w + (from - src.offset);
        if (r0 < k_dim) a = _mm512_mask_expandloadu_ps(a, mask, first + r0 * src.n);
        if (r1 < k_dim) b = _mm512_mask_expandloadu_ps(b, mask, first + r1 * src.n);
      }
      float* dst = out + (nb * kp2 + kp) * 32;
      _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, lo, b));
      _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, hi, b));
    }
  }
}

// The packed weights are written once per decode loop into memory XLA has just allocated (fresh pages):
// at 4 KiB a page, the first-touch faults cost more than the copy (~1 us each: ~100 ms for Gemma 3 270M's
// 400 MB). Asking Linux for transparent huge pages on the buffer's whole 2 MiB pages makes them 512x
// fewer. A hint: where THP is off ("never") or unavailable it changes nothing.
void AdviseHugePages(void* p, int64_t bytes) {
#if defined(__linux__)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

ffi::Error PackNN(ffi::ThreadPool pool, ffi::RemainingArgs ws, ffi::ResultBuffer<ffi::F32> out) {
  const auto od = out->dimensions();
  std::vector<PackSource> sources;
  int64_t k_dim = -1, n_dim = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || w->dimensions().size() != 2 || (k_dim >= 0 && w->dimensions()[0] != k_dim))
      return ffi::Error::InvalidArgument("pf_pack_nn: expected float32 weights [K, N_i] with one K");
    k_dim = w->dimensions()[0];
    sources.push_back({w->typed_data(), w->dimensions()[1], n_dim});
    n_dim += w->dimensions()[1];
  }
  if (sources.empty() || od.size() != 4 || od[0] != (n_dim + 15) / 16 || od[1] != (k_dim + 31) / 32 * 16 ||
      od[2] != 16 || od[3] != 2)
    return ffi::Error::InvalidArgument("pf_pack_nn: expected out [ceil(N/16), ceil(K/32)*16, 16, 2]");
  const int64_t blocks = od[0], kp2 = od[1];
  float* op = out->typed_data();
  AdviseHugePages(op, blocks * kp2 * 32 * static_cast<int64_t>(sizeof(float)));
  const int64_t per_chunk = 16;  // 1 KiB runs of each row
  ParallelFor(pool, (blocks + per_chunk - 1) / per_chunk, [=, &sources](int64_t c) {
    PackColumns(sources, k_dim, kp2, op, c * per_chunk, std::min(blocks, (c + 1) * per_chunk));
  });
  return ffi::Error::Success();
}

// out [M, N] = x [M, K] . w, with w packed by PackNN: [ceil(N/16), KP/2, 16, 2]. AMX only (the caller
// packs only where AMX is enabled: skinny_matmul.py).
ffi::Error PackedMatmulNN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2 || od[0] != xd[0] || wd[0] != (od[1] + 15) / 16 ||
      wd[1] != (xd[1] + 31) / 32 * 16 || wd[2] != 16 || wd[3] != 2)
    return ffi::Error::InvalidArgument(
        "pf_packed_matmul_nn: expected x [M, K], w [ceil(N/16), ceil(K/32)*16, 16, 2], out [M, N]");
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = od[1];
  if (m_dim == 0 || n_dim == 0) return ffi::Error::Success();
#if PF_HAVE_AMX
  if (!g_amx.load(std::memory_order_relaxed))
    return ffi::Error::Internal("pf_packed_matmul_nn: AMX is not enabled in this process");
  g_amx_calls.fetch_add(1, std::memory_order_relaxed);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t kc_n = (k_dim + 31) / 32, blocks = wd[0];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_chunk = std::max<int64_t>(1, (blocks + 4 * threads - 1) / (4 * threads));
  AmxPasses(m_dim, k_dim, [&](int64_t g0, int64_t mg, uint16_t* xa) {
    const int64_t mb = (mg + 15) / 16;
    FormatXNN(xp + g0 * k_dim, mg, k_dim, mb, xa);
    float* og = op + g0 * n_dim;
    ParallelFor(pool, (blocks + per_chunk - 1) / per_chunk, [=](int64_t c) {
      const int64_t b = c * per_chunk, e = std::min(blocks, (c + 1) * per_chunk);
      if (mb == 1)
        AmxPackedNN<1>(xa, mg, kc_n, wp, og, n_dim, b, e);
      else
        AmxPackedNN<2>(xa, mg, kc_n, wp, og, n_dim, b, e);
    });
  });
  return ffi::Error::Success();
#else
  (void)pool;
  return ffi::Error::Internal("pf_packed_matmul_nn: built without AMX");
#endif
}

// ---- One decode step's attention, reading the stacked KV cache in place ----
//
// out[b, h] = sum_s p[s] v[layer, b, s, h / G], p = softmax_s(scale * q[b, h] . k[layer, b, s, h / G]) over
// the slots s with allowed[b, s] (G query heads per kv head; no slot allowed: uniform over all slots, as
// pf_jax.models.decoder.attention). XLA's version slices the layer's keys and values out of the [L, ...]
// cache at every step (a copy of both) before two small batched dots. Work: one (row, kv head) per chunk.
constexpr int kMaxGroup = 8;  // query heads per kv head held at once

__attribute__((target("avx512f"))) void AttendRow(const float* q, const float* k, const float* v, const bool* allowed,
                                                  float* out, int64_t s_dim, int64_t kvh, int64_t group, int64_t dh,
                                                  float scale, float* p) {
  // p: [group][s_dim] scratch. k, v: this row's slot 0 of this kv head; slot stride kvh * dh.
  const int64_t stride = kvh * dh;
  const __mmask16 tail = static_cast<__mmask16>(dh % 16 ? (1u << (dh % 16)) - 1 : 0xFFFF);
  const int64_t vecs = (dh + 15) / 16;
  bool any = false;
  for (int64_t s = 0; s < s_dim; ++s) any |= allowed[s];
  for (int64_t g = 0; g < group; ++g) {
    float* pg = p + g * s_dim;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < s_dim; ++s) {
      if (any && !allowed[s]) continue;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < vecs; ++j) {
        const __mmask16 m = j == vecs - 1 ? tail : __mmask16(0xFFFF);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + g * dh + 16 * j), _mm512_maskz_loadu_ps(m, k + s * stride + 16 * j), acc);
      }
      pg[s] = _mm512_reduce_add_ps(acc) * scale;
      top = std::max(top, pg[s]);
    }
    float total = 0.0f;
    for (int64_t s = 0; s < s_dim; ++s) {
      pg[s] = any && !allowed[s] ? 0.0f : any ? std::exp(pg[s] - top) : 1.0f;
      total += pg[s];
    }
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < s_dim; ++s) pg[s] *= inv;
  }
  for (int64_t j0 = 0; j0 < vecs; j0 += 4) {  // 64 columns of v at a time, every query head of the group
    const int nv = static_cast<int>(std::min<int64_t>(4, vecs - j0));
    __m512 acc[kMaxGroup][4];
    for (int64_t g = 0; g < group; ++g)
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < s_dim; ++s) {
      if (any && !allowed[s]) continue;
      __m512 vv[4];
      for (int j = 0; j < nv; ++j)
        vv[j] = _mm512_maskz_loadu_ps(j0 + j == vecs - 1 ? tail : __mmask16(0xFFFF), v + s * stride + 16 * (j0 + j));
      for (int64_t g = 0; g < group; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g * s_dim + s]);
        for (int j = 0; j < nv; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vv[j], acc[g][j]);
      }
    }
    for (int64_t g = 0; g < group; ++g)
      for (int j = 0; j < nv; ++j)
        _mm512_mask_storeu_ps(out + g * dh + 16 * (j0 + j), j0 + j == vecs - 1 ? tail : __mmask16(0xFFFF), acc[g][j]);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, ffi::Buffer<ffi::S32> layer,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ad = allowed.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || vd.size() != 5 || ad.size() != 2 || layer.element_count() != 1 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || kd[1] != qd[0] || kd[4] != qd[2] || ad[0] != qd[0] ||
      ad[1] != kd[2] || qd[1] % kd[3] != 0 || qd[1] / kd[3] > kMaxGroup || out->dimensions().size() != 3 ||
      !std::equal(qd.begin(), qd.end(), out->dimensions().begin()))
    return ffi::Error::InvalidArgument(
        "pf_decode_attention: expected q [B, H, Dh], k and v [L, B, S, KVH, Dh] with H / KVH <= 8, allowed [B, S], "
        "a layer index, out [B, H, Dh]");
  const int64_t b_dim = qd[0], h_dim = qd[1], dh = qd[2], l_dim = kd[0], s_dim = kd[2], kvh = kd[3];
  const int64_t group = h_dim / kvh, l = layer.typed_data()[0];
  if (l < 0 || l >= l_dim) return ffi::Error::InvalidArgument("pf_decode_attention: layer index out of range");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data() + l * b_dim * s_dim * kvh * dh;
  const float* vp = v.typed_data() + l * b_dim * s_dim * kvh * dh;
  const bool* ap = allowed.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, b_dim * kvh, [=](int64_t c) {
    const int64_t b = c / kvh, kv = c % kvh;
    std::vector<float> p(group * s_dim);
    const int64_t at = (b * s_dim * kvh + kv) * dh;  // [b, slot 0, kv]
    AttendRow(qp + (b * h_dim + kv * group) * dh, kp + at, vp + at, ap + b * s_dim, op + (b * h_dim + kv * group) * dh,
              s_dim, kvh, group, dh, scale, p.data());
  });
  return ffi::Error::Success();
}

// Both kernels: (XLA's intra-op pool, x, w) -> out, all float32; the head also takes the attribute "amx".
auto MatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfSkinnyMatmulNT, SkinnyMatmulNT, MatmulBinding().Attr<bool>("amx"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfSkinnyMatmulNN, SkinnyMatmulNN, MatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfPackedMatmulNN, PackedMatmulNN, MatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfPackNN, PackNN,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<ffi::Buffer<ffi::F32>>());

// 1 if this CPU can run the kernel (checked before the target is registered).
extern "C" int pf_skinny_matmul_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

// 1 if this CPU has AMX tiles with bf16 and the kernel grants this process their use (Linux asks each
// process to request the 8 KiB tile state, ARCH_REQ_XCOMP_PERM); from then on the head may take AMX.
extern "C" int pf_skinny_matmul_enable_amx() {
#if !PF_HAVE_AMX
  return 0;
#else
  if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512dq")) return 0;
  unsigned a, b, c, d;
  // CPUID.(7,0):EDX bits 22 and 24: AMX-BF16, AMX-TILE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return 0;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return 0;
  g_amx.store(true);
  return 1;
#endif
}

// How many head calls took the AMX path so far.
extern "C" int64_t pf_skinny_matmul_amx_calls() { return g_amx_calls.load(); }
