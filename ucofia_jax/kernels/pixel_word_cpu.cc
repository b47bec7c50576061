// Level 3 of UCoFiA (patch-word alignment, SPEC §6) after the GEMM, as one fused CPU kernel.
//
// Input G 't w v p' (words x selected tokens for every (text, video) pair, the layout the GEMM
// produces), output 't v' = 0.5 * (sentence->pixel + video->word), exactly the maths of
// ucofia_jax/ops/similarity.py:pixel_word without masks:
//
//   pixel_level[w] = sum_p G[w,p] * ISA_p(G[w,:]; pixel_mat_weight)
//   video2word     = sum_w pixel_level[w] * ISA_w(pixel_level; word_mat_weight2)
//   word_level[p]  = sum_w G[w,p] * ISA_w(G[:,p]; word_mat_weight)
//   sent2pixel     = sum_p word_level[p] * ISA_p(word_level; pixel_mat_weight2)
//   ISA_a(s; W)    = softmax_a(softmax_a(s / tau) ._a W / tau),  (x ._a W)_i = sum_j x_j W_ji
//
// Why a kernel: XLA:CPU runs each ISA direction as its own fusion over the whole 15 MB G block
// of a 50 x 50 pair block, plus a 't v p w' transpose for the word direction: ~3.5 ns (wall, 2
// cores) per element of G per direction at 1k x 1k. Here each pair's 32 x 48 tile of G is read
// once and both directions and both second stages run on it in L1 (~3 ns per element for all of
// it), every softmax "vertically": the softmax axis is the row index and 16 independent columns
// share one AVX-512 vector, so no reduction crosses SIMD lanes. The second-stage ISAs (over the
// words / tokens of one pair) are batched over the videos of the block the same way.
//
// Numerics follow the XLA path: scale by 1 / tau, max-shift, exp, multiply by 1 / sum. x / tau
// is computed as x * (1 / tau) (at most one ulp apart for tau = 0.01, see VerticalIsa); exp is
// a Cephes-style polynomial (<= 2 ulp; results below FLT_MIN are flushed to 0, which
// moves a softmax by < 1e-38 of its largest term). Sums run in a different order than XLA's,
// so results agree to float32 rounding (tests: rtol 1e-5 on the level, see
// tests/test_pixel_word_kernel.py), not bitwise.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline VecF Splat(float x) { return VecF{} + x; }
inline VecF Max(VecF a, VecF b) { return a > b ? a : b; }

// exp(x) for x <= 0 (arguments are max-shifted); Cephes expf.
inline VecF ExpNonPositive(VecF x) {
  const VecF lo = Splat(-87.33654f);
  const VecI underflow = x < lo;
  x = underflow ? lo : x;  // not Max(x, lo): a NaN must stay NaN
  const VecF magic = Splat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  VecF n = (x * Splat(1.44269504088896341f) + magic) - magic;
  VecF r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  VecF y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * r * r + r + Splat(1.0f);
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  VecF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y = y * scale;
  return underflow ? Splat(0.0f) : y;
}

// q[i][c] = sum_j p[j][c] * w[j][i] for NB column vectors (row stride `ld` vectors). Four output
// rows x NB columns of accumulators, so that FMA latency is hidden and every broadcast w[j][i]
// and every p[j][c] load feeds several FMAs.
template <int NB>
inline void ContractFirstIndex(const VecF* p, int ld, int rows, const float* w, VecF* q) {
  int i = 0;
  for (; i + 4 <= rows; i += 4) {
    VecF acc[4][NB];
    for (int k = 0; k < 4; ++k)
      for (int c = 0; c < NB; ++c) acc[k][c] = Splat(0.0f);
    for (int j = 0; j < rows; ++j) {
      const float* wj = w + j * rows + i;
      for (int c = 0; c < NB; ++c) {
        const VecF pj = p[j * ld + c];
        for (int k = 0; k < 4; ++k) acc[k][c] += pj * wj[k];
      }
    }
    for (int k = 0; k < 4; ++k)
      for (int c = 0; c < NB; ++c) q[(i + k) * ld + c] = acc[k][c];
  }
  for (; i < rows; ++i) {
    VecF acc[NB];
    for (int c = 0; c < NB; ++c) acc[c] = Splat(0.0f);
    for (int j = 0; j < rows; ++j)
      for (int c = 0; c < NB; ++c) acc[c] += p[j * ld + c] * w[j * rows + i];
    for (int c = 0; c < NB; ++c) q[i * ld + c] = acc[c];
  }
}

// Column c of softmax_r(in / tau) before normalisation: e[r][c] = exp(in[r][c] / tau - max),
// returns 1 / sum_r e[r][c]. `e` may be `in` (computed in place).
inline VecF ExpColumn(const VecF* in, VecF* e, int rows, int nv, int c, VecF inv_tau) {
  VecF m = e[c] = in[c] * inv_tau;
  for (int r = 1; r < rows; ++r) m = Max(m, e[r * nv + c] = in[r * nv + c] * inv_tau);
  VecF s = Splat(0.0f);
  for (int r = 0; r < rows; ++r) s += (e[r * nv + c] = ExpNonPositive(e[r * nv + c] - m));
  return Splat(1.0f) / s;
}

// Vertical ISA: x [rows][cols] (cols padded to whole vectors, `nv` vectors per row), the
// softmax axis is the row index. out[c] = sum_r x[r][c] * ISA_r(x[:, c]; w)[r].
// w [rows][rows] row-major, contracted on its first index. p, q: scratch [rows][nv] vectors.
void VerticalIsa(const VecF* x, int rows, int nv, const float* w, float tau, VecF* p, VecF* q,
                 VecF* out) {
  // x * (1 / tau), not x / tau: a vector division costs several multiplies, and for
  // tau = 0.01 the two differ by at most one float32 ulp (1 / fl(0.01) rounds to 100).
  const VecF inv_tau = Splat(1.0f / tau);
  for (int c = 0; c < nv; ++c) {                       // p = softmax_r(x / tau)
    const VecF inv = ExpColumn(x, p, rows, nv, c, inv_tau);
    for (int r = 0; r < rows; ++r) p[r * nv + c] *= inv;
  }
  for (int c = 0; c < nv; c += 4) {                    // q = p ._r w
    switch (std::min(nv - c, 4)) {
      case 1: ContractFirstIndex<1>(p + c, nv, rows, w, q + c); break;
      case 2: ContractFirstIndex<2>(p + c, nv, rows, w, q + c); break;
      case 3: ContractFirstIndex<3>(p + c, nv, rows, w, q + c); break;
      default: ContractFirstIndex<4>(p + c, nv, rows, w, q + c); break;
    }
  }
  for (int c = 0; c < nv; ++c) {                       // out = sum_r x * softmax_r(q / tau)
    const VecF inv = ExpColumn(q, q, rows, nv, c, inv_tau);
    VecF acc = Splat(0.0f);
    for (int r = 0; r < rows; ++r) acc += x[r * nv + c] * (q[r * nv + c] * inv);
    out[c] = acc;
  }
}

inline int Vectors(int n) { return (n + kLanes - 1) / kLanes; }

struct Dims {
  int64_t t, w, v, p;
};

// One text: all videos of the block. g points at G[t] ('w v p').
void OneText(const float* g, const Dims& d, const float* pixel_w, const float* word_w2,
             const float* word_w, const float* pixel_w2, float tau, float* out) {
  const int nw = d.w, np = d.p, nv_v = Vectors(d.v);
  const int nvp = Vectors(np), nvw = Vectors(nw);
  const int rows_max = std::max(nw, np);
  // Per-pair tiles: words-major [w][p] (word direction) and tokens-major [p][w] (pixel dir.).
  std::vector<VecF> tile_wp(nw * nvp), tile_pw(np * nvw);
  std::vector<VecF> scratch_p(rows_max * std::max(std::max(nvp, nvw), nv_v));
  std::vector<VecF> scratch_q(scratch_p.size());
  std::vector<VecF> pixel_level(nvw), word_level(nvp);
  // Second stage, batched over videos: [w][v] and [p][v].
  std::vector<VecF> pixel_level_wv(nw * nv_v), word_level_pv(np * nv_v);
  std::vector<VecF> v2w(nv_v), s2p(nv_v);
  float* tw = reinterpret_cast<float*>(tile_wp.data());
  float* tp = reinterpret_cast<float*>(tile_pw.data());
  std::memset(tw, 0, sizeof(VecF) * tile_wp.size());
  std::memset(tp, 0, sizeof(VecF) * tile_pw.size());
  std::memset(pixel_level_wv.data(), 0, sizeof(VecF) * pixel_level_wv.size());
  std::memset(word_level_pv.data(), 0, sizeof(VecF) * word_level_pv.size());
  float* plw = reinterpret_cast<float*>(pixel_level_wv.data());
  float* wlp = reinterpret_cast<float*>(word_level_pv.data());
  const int ldw = nvp * kLanes, ldp = nvw * kLanes, ldv = nv_v * kLanes;
  for (int v = 0; v < d.v; ++v) {
    for (int w = 0; w < nw; ++w) {
      const float* row = g + (static_cast<int64_t>(w) * d.v + v) * np;
      std::memcpy(tw + w * ldw, row, sizeof(float) * np);
      for (int p = 0; p < np; ++p) tp[p * ldp + w] = row[p];
    }
    // word direction: softmax over words for every token -> word_level[p]
    VerticalIsa(tile_wp.data(), nw, nvp, word_w, tau, scratch_p.data(), scratch_q.data(),
                word_level.data());
    // pixel direction: softmax over tokens for every word -> pixel_level[w]
    VerticalIsa(tile_pw.data(), np, nvw, pixel_w, tau, scratch_p.data(), scratch_q.data(),
                pixel_level.data());
    const float* wl = reinterpret_cast<const float*>(word_level.data());
    const float* pl = reinterpret_cast<const float*>(pixel_level.data());
    for (int p = 0; p < np; ++p) wlp[p * ldv + v] = wl[p];
    for (int w = 0; w < nw; ++w) plw[w * ldv + v] = pl[w];
  }
  VerticalIsa(pixel_level_wv.data(), nw, nv_v, word_w2, tau, scratch_p.data(),
              scratch_q.data(), v2w.data());
  VerticalIsa(word_level_pv.data(), np, nv_v, pixel_w2, tau, scratch_p.data(),
              scratch_q.data(), s2p.data());
  const float* a = reinterpret_cast<const float*>(s2p.data());
  const float* b = reinterpret_cast<const float*>(v2w.data());
  for (int v = 0; v < d.v; ++v) out[v] = 0.5f * (a[v] + b[v]);
}

// Runs fn(i) for i in [0, n) on the caller and the XLA intra-op pool. The state is shared so
// that pool tasks which start after the caller returned find no work and touch nothing freed.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < n) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

ffi::Error PixelWordImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                         ffi::Buffer<ffi::F32> pixel_w, ffi::Buffer<ffi::F32> word_w2,
                         ffi::Buffer<ffi::F32> word_w, ffi::Buffer<ffi::F32> pixel_w2,
                         ffi::Buffer<ffi::F32> tau, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = g.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("G must be 't w v p'");
  const Dims d{dims[0], dims[1], dims[2], dims[3]};
  auto square = [](const ffi::Buffer<ffi::F32>& m, int64_t n) {
    return m.dimensions().size() == 2 && m.dimensions()[0] == n && m.dimensions()[1] == n;
  };
  if (!square(pixel_w, d.p) || !square(pixel_w2, d.p) || !square(word_w, d.w) ||
      !square(word_w2, d.w))
    return ffi::Error::InvalidArgument("ISA matrices do not match G's word/token axes");
  const float t = tau.typed_data()[0];
  const float* gp = g.typed_data();
  float* o = out->typed_data();
  const int64_t per_text = d.w * d.v * d.p;
  ParallelFor(pool, d.t, [&, gp, o](int64_t i) {
    OneText(gp + i * per_text, d, pixel_w.typed_data(), word_w2.typed_data(),
            word_w.typed_data(), pixel_w2.typed_data(), t, o + i * d.v);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UcofiaPixelWordIsa, PixelWordImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // G 't w v p'
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pixel_mat_weight [p, p]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // word_mat_weight2 [w, w]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // word_mat_weight [w, w]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pixel_mat_weight2 [p, p]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // tau []
                                  .Ret<ffi::Buffer<ffi::F32>>());  // 't v'
