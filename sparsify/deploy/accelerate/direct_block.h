// Direct sparse convolution, the path for block-structured weights: groups of 4 (or 2)
// consecutive output channels with one tap pattern, as magnitude pruning with block=[4, 1] leaves
// them. Each tap's input vectors are loaded once for the whole group. Included by direct_conv.cpp
// inside its anonymous namespace, after its vector helpers (vf, V, R, T, loadu, load_part, ...).
#pragma once

// The NV input vectors of one tap at p; MASKED: the last one's lanes past len are not read.
template <int NV, bool MASKED>
inline void load_tile(vf* x, const float* p, int64_t len) {
  for (int r = 0; r < (MASKED ? NV - 1 : NV); ++r) x[r] = loadu(p + V * r);
  if (MASKED) {
    const int64_t rest = len - V * (NV - 1);  // 1..V
#if defined(__AVX512F__)
    x[NV - 1] = (vf)_mm512_maskz_loadu_ps((__mmask16)(rest >= V ? 0xFFFFu : (1u << rest) - 1u), p + V * (NV - 1));
#else
    x[NV - 1] = load_part(p + V * (NV - 1), rest);
#endif
  }
}

// Adds taps k0..k1 to the tiles of a group of BO consecutive output channels with one tap pattern
// (block-structured weights; channel i's tile at t + i * T, its value of tap k at val[k + i * n],
// n: taps per channel): each tap loads its NV input vectors once and feeds BO x NV accumulators,
// BO FMAs per load instead of one. Every output is summed in the per-channel path's order.
template <int BO, int NV, bool MASKED>
inline void add_taps_block(float* t, const float* Pj, const int32_t* off, const float* val, int32_t k0,
                           int32_t k1, int64_t n, int64_t len) {
  vf a[BO][NV];
#pragma GCC unroll 8
  for (int i = 0; i < BO; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NV; ++r) a[i][r] = loadu(t + i * T + V * r);
  for (int32_t k = k0; k < k1; ++k) {
    vf x[NV];
    load_tile<NV, MASKED>(x, Pj + off[k], len);
#pragma GCC unroll 8
    for (int i = 0; i < BO; ++i) {
      const vf w = splat(val[k + i * n]);
#pragma GCC unroll 4
      for (int r = 0; r < NV; ++r) a[i][r] += w * x[r];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < BO; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NV; ++r) storeu(t + i * T + V * r, a[i][r]);
}

// Adds input channel block b of the group of gs (4 or 2) channels from o, tiles at t; returns gs.
template <int NV, bool MASKED>
inline int64_t add_group(float* t, int64_t gs, const float* Pj, const int32_t* off, const float* val,
                         const int32_t* blk, int64_t stride, int64_t o, int64_t b, int64_t len) {
  const int32_t k0 = blk[o * stride + b], k1 = blk[o * stride + b + 1];
  const int64_t n = blk[o * stride + stride - 1] - blk[o * stride];
  if (k0 == k1) return gs;
  if (gs == 4)
    add_taps_block<4, NV, MASKED>(t, Pj, off, val, k0, k1, n, len);
  else
    add_taps_block<2, NV, MASKED>(t, Pj, off, val, k0, k1, n, len);
  return gs;
}

// The block groups (groups: int32 (Cout,) or None) as a pointer (null: none), after checking that
// every group's channels have the same number of taps in every input channel block, stored one
// channel after the other (the offsets, equal for a group's channels, are the Python side's).
const int32_t* groups_of(const std::optional<at::Tensor>& groups, const at::Tensor& bl) {
  if (!groups.has_value() || !groups->defined()) return nullptr;
  const int64_t cout = bl.size(0), stride = bl.size(1);
  TORCH_CHECK(groups->scalar_type() == at::kInt && groups->dim() == 1 && groups->numel() == cout &&
                  groups->is_contiguous(), "direct sparse conv: groups must be a contiguous int32 (Cout,)");
  const int32_t *grp = groups->data_ptr<int32_t>(), *blk = bl.data_ptr<int32_t>();
  for (int64_t o = 0; o < cout;) {
    const int64_t gs = grp[o];
    TORCH_CHECK((gs == 1 || gs == 2 || gs == 4) && o + gs <= cout, "direct sparse conv: bad group size at ", o);
    const int64_t n = blk[o * stride + stride - 1] - blk[o * stride];
    for (int64_t i = 1; i < gs; ++i) {
      TORCH_CHECK(grp[o + i] == 0, "direct sparse conv: group of ", gs, " at ", o, " overlaps another");
      for (int64_t b = 0; b < stride; ++b)
        TORCH_CHECK(blk[(o + i) * stride + b] == blk[o * stride + b] + i * n,
                    "direct sparse conv: the channels of the group at ", o, " have different taps");
    }
    o += gs;
  }
  return grp;
}
