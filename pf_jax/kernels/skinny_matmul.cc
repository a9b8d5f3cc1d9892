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

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;               // rows of w per register tile
constexpr int kMaxTileM = 6;           // rows of x per register tile
constexpr int64_t kPrefetchRows = 16;  // how far ahead of the first tile w is prefetched (rows)

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

ffi::Error SkinnyMatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
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

// Both kernels: (XLA's intra-op pool, x, w) -> out, all float32.
auto MatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfSkinnyMatmulNT, SkinnyMatmulNT, MatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PfSkinnyMatmulNN, SkinnyMatmulNN, MatmulBinding());

// 1 if this CPU can run the kernel (checked before the target is registered).
extern "C" int pf_skinny_matmul_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
