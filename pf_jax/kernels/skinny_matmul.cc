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

#include <algorithm>
#include <atomic>
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

// The accumulator tile of product p (0 = hi.hi) of m-block c, with MB m-blocks of 4 / MB tiles each.
template <int MB>
constexpr int Acc(int c, int p) {
  constexpr int per_block = 4 / MB;
  return c * per_block + (p == 0 ? 0 : 1 + (p - 1) % (per_block - 1));
}

template <int MB>
PF_AMX void AmxRowsNT(const uint16_t* xt, int64_t m_dim, const float* w, int64_t k_dim, float* out, int64_t n_dim,
                      int64_t begin, int64_t end) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  static_assert(MB == 1 || MB == 2);
  constexpr int APM = 4 / MB;  // accumulator tiles per m-block
  const int64_t kc_n = (k_dim + 31) / 32, piece = kc_n * MB * 512;
  alignas(64) uint16_t abuf[2][3][16][32];
  alignas(64) float cbuf[16][16];
  alignas(64) uint16_t ix[32];
  for (int i = 0; i < 16; ++i) ix[i] = 2 * i + 1, ix[16 + i] = 32 + 2 * i + 1;
  const __m512i idx = _mm512_load_si512(ix);
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
      const uint16_t* xk = xt + kc * MB * 512;
      // The eight products (w piece i, x piece j), x piece outer. hi.hi goes to the m-block's first
      // accumulator, the seven corrections (< 2^-7 of it) to the others, round robin: the corrections'
      // roundings are then relative to their own size, and the big sum rounds as a float32 dot's would.
#define PF_AMX_M(c)                                 \
  _tile_loadd(7, xk + (c) * 512, 64);               \
  Dot<Acc<MB>(c, 0), 4>();                          \
  Dot<Acc<MB>(c, 1), 5>();                          \
  Dot<Acc<MB>(c, 2), 6>();                          \
  _tile_loadd(7, xk + piece + (c) * 512, 64);       \
  Dot<Acc<MB>(c, 3), 4>();                          \
  Dot<Acc<MB>(c, 4), 5>();                          \
  Dot<Acc<MB>(c, 5), 6>();                          \
  _tile_loadd(7, xk + 2 * piece + (c) * 512, 64);   \
  Dot<Acc<MB>(c, 6), 4>();                          \
  Dot<Acc<MB>(c, 7), 5>();
      if constexpr (MB > 0) { PF_AMX_M(0) }
      if constexpr (MB > 1) { PF_AMX_M(1) }
#undef PF_AMX_M
    }
    for (int c = 0; c < MB; ++c) {  // the corrections' sum, then the big one added once
      alignas(64) float part[16][16];
      for (int t = APM - 1; t >= 0; --t) {
        float* dst = t == APM - 1 ? &cbuf[0][0] : &part[0][0];
        switch (c * APM + t) {
          case 0: _tile_stored(0, dst, 64); break;
          case 1: _tile_stored(1, dst, 64); break;
          case 2: _tile_stored(2, dst, 64); break;
          default: _tile_stored(3, dst, 64); break;
        }
        if (t != APM - 1)
          for (int r = 0; r < 16; ++r)
            _mm512_store_ps(cbuf[r], _mm512_add_ps(_mm512_load_ps(cbuf[r]), _mm512_load_ps(part[r])));
      }
      const int ms = static_cast<int>(std::min<int64_t>(16, m_dim - c * 16));
      const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
      for (int m = 0; m < ms; ++m)  // column m of the [n, m] tile is row c * 16 + m of out
        _mm512_mask_storeu_ps(out + (c * 16 + m) * n_dim + n0, row_mask, _mm512_i32gather_ps(column, &cbuf[0][m], 4));
    }
  }
  _tile_release();
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
    const int64_t kc_n = (k_dim + 31) / 32;
    std::vector<uint16_t> xt_storage(3 * kc_n * (kAmxPassRows / 16) * 512 + 32);
    uint16_t* xt =
        reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(xt_storage.data()) + 63) & ~uintptr_t{63});
    rows = (rows + 15) / 16 * 16;  // whole 16-row blocks per chunk
    // one pass over w per up to kAmxPassRows rows of x, the rows shared evenly (33 rows: 17 + 16, not 32 + 1)
    const int64_t passes = (m_dim + kAmxPassRows - 1) / kAmxPassRows, pass_rows = (m_dim + passes - 1) / passes;
    for (int64_t g0 = 0; g0 < m_dim; g0 += pass_rows) {
      const int64_t mg = std::min(pass_rows, m_dim - g0);
      FormatXNT(xp + g0 * k_dim, mg, k_dim, xt);
      float* og = op + g0 * n_dim;
      ParallelFor(pool, (n_dim + rows - 1) / rows, [=](int64_t c) {
        const int64_t b = c * rows, e = std::min(n_dim, (c + 1) * rows);
        if (mg <= 16)
          AmxRowsNT<1>(xt, mg, wp, k_dim, og, n_dim, b, e);
        else
          AmxRowsNT<2>(xt, mg, wp, k_dim, og, n_dim, b, e);
      });
    }
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
