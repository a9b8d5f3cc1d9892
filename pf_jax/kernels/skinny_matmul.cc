// out[M, N] = x[M, K] . w[N, K]^T in float32 for small M (decode steps: M = rows being sampled), on x86
// CPUs with AVX-512, as an XLA FFI custom call. See skinny_matmul.py for why and when it is used.
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

struct Job {
  const float* x;
  const float* w;
  float* out;
  int64_t m_dim, n_dim, k_dim, chunk_rows, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  // Claims and runs chunks until none are left. A task that starts after the last chunk was claimed
  // returns without touching the buffers, so the caller only waits for chunks, not for tasks.
  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t begin = c * chunk_rows, end = std::min(n_dim, begin + chunk_rows);
      Rows(x, m_dim, w, k_dim, out, n_dim, begin, end);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error SkinnyMatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || xd[1] != wd[1] || od[0] != xd[0] ||
      od[1] != wd[0])
    return ffi::Error::InvalidArgument("pf_skinny_matmul_nt: expected x [M, K], w [N, K], out [M, N]");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->out = out->typed_data();
  job->m_dim = xd[0];
  job->k_dim = xd[1];
  job->n_dim = wd[0];
  if (job->m_dim == 0 || job->n_dim == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~64 KiB..4 MiB of w per chunk: enough chunks to balance, few enough that claiming costs nothing.
  const int64_t row_bytes = job->k_dim * static_cast<int64_t>(sizeof(float));
  const int64_t max_rows = std::max<int64_t>(kRows, (int64_t{4} << 20) / row_bytes / kRows * kRows);
  const int64_t min_rows = std::max<int64_t>(kRows, (int64_t{64} << 10) / row_bytes / kRows * kRows);
  int64_t rows = (job->n_dim + 16 * threads - 1) / (16 * threads);
  rows = std::clamp((rows + kRows - 1) / kRows * kRows, min_rows, max_rows);
  job->chunk_rows = rows;
  job->chunks = (job->n_dim + rows - 1) / rows;
  const int64_t helpers = std::min(threads, job->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->finished.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PfSkinnyMatmulNT, SkinnyMatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 if this CPU can run the kernel (checked before the target is registered).
extern "C" int pf_skinny_matmul_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
