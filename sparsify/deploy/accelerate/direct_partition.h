// Direct sparse convolution: how one call's work is split between threads. Included by
// direct_conv.cpp inside its anonymous namespace, after Geometry and the tile constants (T).
#pragma once

// Vectors tile `tile` of a plane of L outputs (row pitch included) computes: a plane's last tile
// runs only the vectors its outputs fill.
inline int64_t tile_vectors(int64_t L, int64_t tile) { return (std::min(T, L - tile * T) + V - 1) / V; }

// One thread's share: the work units (image n, tile) u0..u1 (unit u = n * tiles + tile) times
// the output channels o0..o1.
struct Part {
  int64_t u0, u1, o0, o1;
};

// Splits the units into su groups and the output channels into nt / su groups (su divides nt).
// A unit costs the vectors its tile computes (a plane's last tile may run fewer); an output channel costs
// its taps plus, per tile, what is paid once per channel (bias, ReLU, store: ~4 taps) and per
// non-empty channel block (~2 taps: reloading and storing the tile's accumulators). Among the
// splits whose busiest thread has at most 3% more work than the best one's, the one whose
// busiest thread reads the fewest bytes wins: a thread reads the taps of its channels (8 bytes
// each) and the input under its units, so splitting the units suits large maps with few taps
// (early layers, batches), splitting the channels small maps with many taps (late layers).
// su = -1: choose; else that su (no split when it does not fit).
// grp (may be null): the block groups (see conv()), never split; a tap costs half in a group.
std::vector<Part> partition(const int32_t* blk, int64_t nb, const Geometry& g, int64_t nt, int64_t force_su,
                            const int32_t* grp) {
  const int64_t stride = nb + 1, L = g.Ho * g.Wq, tiles = (L + T - 1) / T, U = g.N * tiles;
  std::vector<int64_t> ucum(U + 1, 0);  // prefix sums of the units' costs: the vectors they compute
  for (int64_t u = 0; u < U; ++u) ucum[u + 1] = ucum[u] + tile_vectors(L, u % tiles);
  auto unit_bound = [&](int64_t i, int64_t su) {  // the unit where group i of su starts (cost-balanced)
    const double target = double(ucum[U]) * i / su;
    int64_t u = std::lower_bound(ucum.begin(), ucum.end(), static_cast<int64_t>(target + 0.5)) - ucum.begin();
    return std::min<int64_t>(U - (su - i), std::max<int64_t>(u, i));  // every group keeps a unit
  };
  const double in_bytes = 4.0 * g.N * (g.in_place ? g.C * g.H * g.W : g.image());
  std::vector<int64_t> cum(g.Cout + 1, 0);  // prefix sums of the channel costs (in half taps)
  for (int64_t o = 0; o < g.Cout; ++o) {
    int64_t c = (!grp || grp[o] == 1 ? 2 : 1) * (blk[o * stride + nb] - blk[o * stride]) + 8;
    for (int64_t b = 0; b < nb; ++b) c += 4 * (blk[o * stride + b + 1] > blk[o * stride + b]);
    cum[o + 1] = cum[o] + c;
  }
  auto taps = [&](int64_t o0, int64_t o1) { return o1 > o0 ? blk[(o1 - 1) * stride + nb] - blk[o0 * stride] : 0; };
  struct Candidate {
    std::vector<Part> parts;
    double work, bytes;  // of the busiest thread
  };
  std::vector<Candidate> cands;
  for (int64_t su = nt; su >= 1; --su) {
    if (nt % su || (force_su > 0 && su != force_su) || (su > 1 && U < su)) continue;
    const int64_t sc = nt / su;
    std::vector<int64_t> ob(sc + 1, g.Cout);  // channel groups of about equal cost
    ob[0] = 0;
    for (int64_t k = 1, o = 0; k < sc; ++k) {
      const double target = double(cum[g.Cout]) * k / sc;
      while (o < g.Cout && cum[o] < target) ++o;
      if (o > ob[k - 1] + 1 && target - cum[o - 1] < cum[o] - target) --o;  // the nearer boundary
      while (grp && o < g.Cout && grp[o] == 0) --o;  // to the start of its group
      ob[k] = o;
    }
    Candidate c{{}, 0, 0};
    for (int64_t i = 0; i < su; ++i)
      for (int64_t k = 0; k < sc; ++k) {
        const Part p{unit_bound(i, su), unit_bound(i + 1, su), ob[k], ob[k + 1]};
        c.work = std::max(c.work, double(ucum[p.u1] - ucum[p.u0]) * double(cum[p.o1] - cum[p.o0]));
        c.bytes = std::max(c.bytes, 8.0 * taps(p.o0, p.o1) + in_bytes * (p.u1 - p.u0) / U);
        c.parts.push_back(p);
      }
    cands.push_back(std::move(c));
  }
  double least = 0;
  for (const Candidate& c : cands) least = (&c == &cands[0]) ? c.work : std::min(least, c.work);
  const Candidate* best = nullptr;
  for (const Candidate& c : cands)
    if (c.work <= 1.03 * least && (!best || c.bytes < best->bytes)) best = &c;
  return best ? best->parts : std::vector<Part>{};
}
