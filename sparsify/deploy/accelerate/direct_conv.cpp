// Direct sparse convolution on CPU (float32, NCHW), after Park et al., "Faster CNNs with direct
// sparse convolutions and guided pruning" (ICLR 2017): every non-zero weight w[o, c, ky, kx]
// adds w times a shifted, strided input plane into output plane o; zero weights cost nothing.
//
// Layout. The input is copied once per call into P (per image: C x phases x Hq x Wq): padded and,
// for stride s, split into its s x s phases (rows/columns congruent mod s), so that the input
// pixels one tap reads for consecutive outputs are consecutive floats. In P every tap is then one
// integer offset (computed by the Python side per input size), and output plane o, read row by
// row with row pitch Wq (the Wq - Wo extra columns are computed and dropped), is
//     out_o[j] = b_o + sum over taps t of o: v_t * P[off_t + j],  j = y * Wq + x
// a 1-D sum over a flat index. A tile of 16*R consecutive j stays in R vector registers while the
// taps of o are added; tiles are the outer loop, then blocks of input channels, then output
// channels, so the input rows under a tile for one channel block stay in cache across channels. Stride 1 without padding reads the input in
// place when no tap shifts along the width. 
// Threads split the tiles (and images), the output channels, or both: see partition().
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <ctime>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t V = 16;
constexpr int R = 4;  // vectors per tile: 64 outputs in flight, 4 independent FMA chains
constexpr int64_t T = V * R;

inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float v) { return vf{} + v; }

// The first n (< V) floats at p, zeros after: the last partial vector of a plane, where reading
// on could leave the buffer (the input read in place).
inline vf load_part(const float* p, int64_t n) {
#if defined(__AVX512F__)
  return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  vf v = vf{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

struct Geometry {
  int64_t N, C, H, W, Cout, Ho, Wo, Hq, Wq, sh, sw, ph, pw;
  std::vector<int64_t> phases;  // (py, px) pairs of the phases the taps read
  bool in_place;                // P is the input itself (stride 1, no padding)
  int64_t image() const { return C * static_cast<int64_t>(phases.size() / 2) * Hq * Wq; }
};

// P[n, c, phase (py, px), r, q] = x[n, c, r*sh + py - ph, q*sw + px - pw], 0 outside.
void fill(const float* x, float* P, const Geometry& g) {
  const int64_t nph = g.phases.size() / 2;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* xs = x + i * g.H * g.W;
      float* d = P + i * nph * g.Hq * g.Wq;
      for (int64_t f = 0; f < nph; ++f) {
        const int64_t py = g.phases[2 * f], px = g.phases[2 * f + 1];
        for (int64_t r = 0; r < g.Hq; ++r) {
          float* row = d + (f * g.Hq + r) * g.Wq;
          const int64_t yy = r * g.sh + py - g.ph;
          if (yy < 0 || yy >= g.H) {
            std::memset(row, 0, sizeof(float) * g.Wq);
            continue;
          }
          const float* src = xs + yy * g.W;
          if (g.sw == 1) {
            const int64_t q0 = std::min(g.Wq, std::max<int64_t>(0, g.pw - px));
            const int64_t q1 = std::max(q0, std::min(g.Wq, g.W + g.pw - px));
            std::memset(row, 0, sizeof(float) * q0);
            std::memcpy(row + q0, src + q0 + px - g.pw, sizeof(float) * (q1 - q0));
            std::memset(row + q1, 0, sizeof(float) * (g.Wq - q1));
          } else {
            for (int64_t q = 0; q < g.Wq; ++q) {
              const int64_t xx = q * g.sw + px - g.pw;
              row[q] = (xx >= 0 && xx < g.W) ? src[xx] : 0.f;
            }
          }
        }
      }
    }
  });
}

inline vf relu_v(vf a) { return a > 0 ? a : vf{}; }

// The epilogue: writes the n valid outputs of a tile (flat index j0.., row pitch Wq) into plane o
// (row pitch Wo), adding the residual plane rp (same layout as o; null: none) and then applying
// the ReLU, in that order, as the unfused `relu(conv(x) + residual)` does.
inline void store_tile(const float* tile, int64_t j0, int64_t n, float* o, const float* rp, bool relu,
                       const Geometry& g) {
  if (g.Wq == g.Wo && n == T) {  // whole rows, a whole tile: vectors straight through
    for (int r = 0; r < R; ++r) {
      vf v = loadu(tile + V * r);
      if (rp) v += loadu(rp + j0 + V * r);
      storeu(o + j0 + V * r, relu ? relu_v(v) : v);
    }
    return;
  }
  int64_t y = j0 / g.Wq, x = j0 % g.Wq, i = 0;
  while (i < n) {
    const int64_t seg = std::min(g.Wq - x, n - i);
    if (x < g.Wo) {
      const int64_t m = std::min(seg, g.Wo - x), at = y * g.Wo + x;
      for (int64_t k = 0; k < m; ++k) {
        float v = tile[i + k];
        if (rp) v += rp[at + k];
        o[at + k] = (relu && !(v > 0.f)) ? 0.f : v;
      }
    }
    i += seg;
    ++y;
    x = 0;
  }
}

// acc[0..NV) += taps k0..k1 at the tile Pj: NV vectors, the ones holding the tile's len outputs
// (a plane's last tile may need fewer than R: 14x14 = 3 whole tiles and one of a single vector).
// MASKED: the input is read in place and this is the plane's last tile: the last vector's lanes
// past len are not read (reading on could leave the buffer).
template <int NV, bool MASKED>
inline void add_taps(float* t, const float* Pj, const int32_t* off, const float* val, int32_t k0, int32_t k1,
                     int64_t len) {
  vf acc[NV];
  for (int r = 0; r < NV; ++r) acc[r] = loadu(t + V * r);
  if (NV == 4 && !MASKED) {  // the common case, written out: four named accumulators compile to
    vf a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];  // a tighter loop than the array below
    for (int32_t k = k0; k < k1; ++k) {
      const float* p = Pj + off[k];
      const vf w = splat(val[k]);
      a0 += w * loadu(p);
      a1 += w * loadu(p + V);
      a2 += w * loadu(p + 2 * V);
      a3 += w * loadu(p + 3 * V);
    }
    storeu(t, a0); storeu(t + V, a1); storeu(t + 2 * V, a2); storeu(t + 3 * V, a3);
    return;
  }
  vf a[NV];
  for (int r = 0; r < NV; ++r) a[r] = acc[r];
  const int64_t rest = len - V * (NV - 1);  // lanes of the last vector, 1..V
#if defined(__AVX512F__)
  const __mmask16 m = (__mmask16)(rest >= V ? 0xFFFFu : (1u << rest) - 1u);
#endif
  for (int32_t k = k0; k < k1; ++k) {
    const float* p = Pj + off[k];
    const vf w = splat(val[k]);
    for (int r = 0; r < (MASKED ? NV - 1 : NV); ++r) a[r] += w * loadu(p + V * r);
    if (MASKED) {
#if defined(__AVX512F__)
      a[NV - 1] += w * (vf)_mm512_maskz_loadu_ps(m, p + V * (NV - 1));
#else
      a[NV - 1] += w * load_part(p + V * (NV - 1), rest);
#endif
    }
  }
  for (int r = 0; r < NV; ++r) storeu(t + V * r, a[r]);
}

#include "direct_block.h"  // the kernel for block-structured weights
constexpr int64_t OCB = 32;  // output channels whose tiles stay in L1 while a channel block is added

// Adds, for one tile, the taps of output channels ob..oe (their tiles at obuf, T floats apart),
// input channel block by block (see conv()); grp: the block groups or null (see conv()).
template <int NV, bool MASKED>
void add_channel_block(float* obuf, const float* Pj, const int32_t* off, const int32_t* blk, int64_t nb,
                       const float* val, int64_t ob, int64_t oe, int64_t len, const int32_t* grp) {
  const int64_t stride = nb + 1;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t o = ob; o < oe; ++o) {
      if (grp && grp[o] > 1) {  // its channels' tiles are consecutive in obuf
        o += add_group<NV, MASKED>(obuf + (o - ob) * T, grp[o], Pj, off, val, blk, stride, o, b, len) - 1;
        continue;
      }
      const int32_t k0 = blk[o * stride + b], k1 = blk[o * stride + b + 1];
      if (k0 != k1) add_taps<NV, MASKED>(obuf + (o - ob) * T, Pj, off, val, k0, k1, len);
    }
}

// The instance for a tile of len outputs: its vectors, and masked where the input is read in
// place (a copied input has slack to read whole vectors from).
typedef void (*ChannelBlockFn)(float*, const float*, const int32_t*, const int32_t*, int64_t, const float*, int64_t,
                               int64_t, int64_t, const int32_t*);
inline ChannelBlockFn channel_block_fn(int64_t len, bool in_place) {
  static const ChannelBlockFn fns[2][4] = {
      {add_channel_block<1, false>, add_channel_block<2, false>, add_channel_block<3, false>,
       add_channel_block<4, false>},
      {add_channel_block<1, true>, add_channel_block<2, true>, add_channel_block<3, true>,
       add_channel_block<4, true>}};
  static_assert(R == 4, "channel_block_fn holds instances for 1..4 vectors");
  return fns[in_place && len < T][(len + V - 1) / V - 1];
}

#include "direct_partition.h"  // Part, partition(): the split between threads

// Per-part CPU time of the last conv2d call (ns), recorded while profiling is on: the time each
// thread spends on its share, without the wait at the end, so the balance and the cost of
// splitting can be measured on a machine whose cores are shared (wall clock cannot).
std::atomic<bool> profiling{false};
std::atomic<int64_t> profile_su{-1};  // while profiling: the unit groups to force (-1: choose)
std::vector<int64_t> part_ns, part_thread;

inline int64_t thread_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// blk[o * (nb + 1) + b]: the first tap of output channel o in input channel block b (taps are
// sorted by channel), so each tile adds one block of input channels at a time to OCB output
// tiles: the input rows under the tile for that block (a few KB) stay in L1 while they are reused
// by every output channel, instead of the whole tile column over all channels (tens of KB, L2).
// grp (null: none): per output channel 4 or 2 where a block group starts (direct_block.h), 1 alone, 0 inside.
void conv(const float* P, const int32_t* off, const int32_t* blk, int64_t nb, const float* val,
          const float* bias, const float* res, float* out, const Geometry& g, bool relu, const int32_t* grp) {
  const int64_t L = g.Ho * g.Wq, plane = g.Ho * g.Wo, img = g.in_place ? g.C * g.H * g.W : g.image();
  const int64_t tiles = (L + T - 1) / T;
  const bool prof = profiling.load(std::memory_order_relaxed);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Part> parts = partition(blk, nb, g, nt, prof ? profile_su.load() : -1, grp);
  if (parts.empty()) parts = partition(blk, nb, g, nt, -1, grp);  // the forced split does not fit
  if (prof) {
    part_ns.assign(parts.size(), 0);
    part_thread.assign(parts.size(), -1);
  }
  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t pb, int64_t pe) {
    alignas(64) float obuf[OCB * T];
    for (int64_t pi = pb; pi < pe; ++pi) {
      const Part& part = parts[pi];
      const int64_t t_start = prof ? thread_ns() : 0;
      for (int64_t u = part.u0; u < part.u1; ++u) {
        const int64_t n = u / tiles, j0 = (u % tiles) * T;
        const float* Pn = P + n * img;
        float* outn = out + n * g.Cout * plane;
        const int64_t len = std::min(T, L - j0);
        const ChannelBlockFn add_block = channel_block_fn(len, g.in_place);
        const float* Pj = Pn + j0;
        for (int64_t ob = part.o0, oe; ob < part.o1; ob = oe) {
          oe = std::min(part.o1, ob + OCB);
          while (grp && oe < part.o1 && grp[oe] == 0) --oe;  // a group stays in one chunk
          for (int64_t o = ob; o < oe; ++o) {
            const vf b = splat(bias ? bias[o] : 0.f);
            for (int r = 0; r < R; ++r) storeu(obuf + (o - ob) * T + V * r, b);
          }
          add_block(obuf, Pj, off, blk, nb, val, ob, oe, len, grp);
          for (int64_t o = ob; o < oe; ++o)
            store_tile(obuf + (o - ob) * T, j0, len, outn + o * plane,
                       res ? res + (n * g.Cout + o) * plane : nullptr, relu, g);
        }
      }
      if (prof) {
        part_ns[pi] = thread_ns() - t_start;
        part_thread[pi] = at::get_thread_num();
      }
    }
  });
}

Geometry geometry_of(at::IntArrayRef xs, const at::Tensor& blocks, at::IntArrayRef geometry) {
  TORCH_CHECK(geometry.size() >= 11 && geometry.size() % 2 == 1, "direct sparse conv: bad geometry");
  Geometry g;
  g.N = xs[0]; g.C = xs[1]; g.H = xs[2]; g.W = xs[3];
  g.Cout = geometry[0]; g.Ho = geometry[1]; g.Wo = geometry[2]; g.Hq = geometry[3]; g.Wq = geometry[4];
  g.sh = geometry[5]; g.sw = geometry[6]; g.ph = geometry[7]; g.pw = geometry[8];
  g.phases.assign(geometry.begin() + 9, geometry.end());
  TORCH_CHECK(blocks.scalar_type() == at::kInt && blocks.dim() == 2 && blocks.size(0) == g.Cout &&
                  blocks.size(1) >= 2, "direct sparse conv: blocks must be int32 (Cout, nb + 1)");
  g.in_place = g.phases.size() == 2 && g.phases[0] == 0 && g.phases[1] == 0 && g.sh == 1 && g.sw == 1 &&
               g.ph == 0 && g.pw == 0 && g.Hq == g.H && g.Wq == g.W && g.Wq == g.Wo;
  return g;
}

// The split conv2d makes for `threads` threads on an input of shape x_shape, one row per thread:
// (first unit, end unit, first output channel, end output channel, taps x output positions,
// taps x positions computed: whole vectors, as the kernel runs a partial last vector at full width).
// spatial_groups: -1 as conv2d chooses, else that many unit groups. For measuring the balance.
at::Tensor direct_partition(const at::Tensor& blocks, at::IntArrayRef x_shape, at::IntArrayRef geometry,
                            int64_t threads, int64_t spatial_groups, const std::optional<at::Tensor>& groups) {
  TORCH_CHECK(x_shape.size() == 4 && threads >= 1, "direct sparse conv partition: a 4-D shape, threads >= 1");
  const Geometry g = geometry_of(x_shape, blocks, geometry);
  const at::Tensor bl = blocks.contiguous();
  const int32_t* blk = bl.data_ptr<int32_t>();
  const int64_t nb = bl.size(1) - 1, L = g.Ho * g.Wq, tiles = (L + T - 1) / T;
  const std::vector<Part> parts = partition(blk, nb, g, threads, spatial_groups, groups_of(groups, bl));
  TORCH_CHECK(!parts.empty(), "direct sparse conv partition: no split into ", spatial_groups, " unit groups");
  at::Tensor res = at::empty({static_cast<int64_t>(parts.size()), 6}, bl.options().dtype(at::kLong));
  int64_t* r = res.data_ptr<int64_t>();
  for (const Part& p : parts) {
    int64_t positions = 0, computed = 0;
    for (int64_t u = p.u0; u < p.u1; ++u) {
      positions += std::min(T, L - (u % tiles) * T);
      computed += V * tile_vectors(L, u % tiles);
    }
    const int64_t taps = p.o1 > p.o0 ? blk[(p.o1 - 1) * (nb + 1) + nb] - blk[p.o0 * (nb + 1)] : 0;
    *r++ = p.u0; *r++ = p.u1; *r++ = p.o0; *r++ = p.o1; *r++ = positions * taps; *r++ = computed * taps;
  }
  return res;
}

// Turns the per-thread timing on or off; returns, for each part of the last conv2d call made
// while it was on, its CPU ns and the thread that ran it (int64 (parts, 2); the copy into the
// padded input not included).
// spatial_groups: force that many unit groups while profiling (-1: the usual choice).
at::Tensor direct_profile(bool enable, int64_t spatial_groups) {
  profiling.store(enable);
  profile_su.store(spatial_groups);
  at::Tensor res = at::empty({static_cast<int64_t>(part_ns.size()), 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* r = res.data_ptr<int64_t>();
  for (size_t i = 0; i < part_ns.size(); ++i) {
    r[2 * i] = part_ns[i];
    r[2 * i + 1] = part_thread[i];
  }
  return res;
}

// x: (N, C, H, W) float32; off: int32 tap offsets into one image of P; blocks: int32 (Cout, nb + 1),
// first tap of each output channel in each input channel block, then its end; values: float32 taps;
// geometry: [Cout, Ho, Wo, Hq, Wq, sh, sw, ph, pw, py0, px0, py1, px1, ...]; residual: added to the
// output before the ReLU (a residual connection), of the output's shape.
at::Tensor direct_conv2d(const at::Tensor& x_, const at::Tensor& off, const at::Tensor& blocks,
                         const at::Tensor& values, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef geometry, bool relu, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& groups) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "direct sparse conv: a 4-D float32 CPU input is needed, got ", x_.sizes(), " ", x_.scalar_type());
  TORCH_CHECK(off.scalar_type() == at::kInt && blocks.scalar_type() == at::kInt && blocks.dim() == 2 &&
                  values.scalar_type() == at::kFloat && off.numel() == values.numel(),
              "direct sparse conv: int32 offsets/blocks and float32 values of one length are needed");
  const at::Tensor x = x_.contiguous();
  const Geometry g = geometry_of(x.sizes(), blocks, geometry);
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  at::Tensor Pbuf;
  const float* P = x.data_ptr<float>();
  if (!g.in_place) {
    // slack: the dropped columns of the last rows read up to Wq floats past the last plane, and
    // the last tile up to T past the last output
    Pbuf = at::empty({g.N * g.image() + g.Wq + 2 * T}, x.options());
    fill(x.data_ptr<float>(), Pbuf.data_ptr<float>(), g);
    P = Pbuf.data_ptr<float>();
  }
  const at::Tensor bl = blocks.contiguous(), of = off.contiguous(), va = values.contiguous();
  at::Tensor b;
  const int32_t* grp = groups_of(groups, bl);
  if (bias.has_value() && bias->defined()) b = bias->contiguous().to(at::kFloat);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == at::kFloat &&
                    residual->device().is_cpu(),
                "direct sparse conv: the residual must be float32 on the CPU and of the output's shape ",
                out.sizes(), ", got ", residual->sizes(), " ", residual->scalar_type());
    r = residual->contiguous();
  }
  conv(P, of.data_ptr<int32_t>(), bl.data_ptr<int32_t>(), bl.size(1) - 1, va.data_ptr<float>(),
       b.defined() ? b.data_ptr<float>() : nullptr, r.defined() ? r.data_ptr<float>() : nullptr,
       out.data_ptr<float>(), g, relu, grp);
  return out;
}

}  // namespace

TORCH_LIBRARY(sparsify_direct, m) {
  m.def("conv2d(Tensor x, Tensor offsets, Tensor blocks, Tensor values, Tensor? bias, int[] geometry, "
        "bool relu, Tensor? residual=None, Tensor? groups=None) -> Tensor", &direct_conv2d);
  m.def("partition(Tensor blocks, int[] x_shape, int[] geometry, int threads, int spatial_groups, "
        "Tensor? groups=None) -> Tensor", &direct_partition);
  m.def("profile(bool enable, int spatial_groups=-1) -> Tensor", &direct_profile);
}
