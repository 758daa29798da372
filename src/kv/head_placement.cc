#include "kv/head_placement.h"

#include <algorithm>
#include <map>
#include <numeric>

#include "core/error.h"

namespace redknot {

namespace {

// Heads per rank, or 0 when the heads are replicated (H < R) or there is one rank.
int32_t heads_per_rank(int32_t H, int32_t R) {
  if (R < 1) throw Error("head placement: ranks must be >= 1");
  if (R == 1 || H < R) return 0;
  if (H % R != 0)
    throw Error("head placement: " + std::to_string(H) + " kv heads do not split over " +
                std::to_string(R) + " ranks");
  return H / R;
}

std::vector<int32_t> identity(int32_t H) {
  std::vector<int32_t> p(H);
  std::iota(p.begin(), p.end(), 0);
  return p;
}

// One layer: heads of equal class and size form a group; groups are dealt out largest first,
// each rank getting floor or ceil of the group. The extra heads go to the ranks with the most
// free slots (which keeps slot counts within one of each other, so every group fits), then the
// fewest bytes in this layer, then the fewest global heads and bytes over the layers planned so
// far (`cum_*`, so that the extras rotate and the totals stay even too), then the lowest rank.
// Each head stays on its own rank while that rank's share of
// its group lasts; the rest fill the remaining shares in rank order.
std::vector<int32_t> plan_layer(const HeadProfile& p, int32_t l, int32_t R, int32_t per_rank,
                                int64_t tokens, std::vector<int64_t>& cum_globals,
                                std::vector<int64_t>& cum_bytes) {
  const int32_t H = p.num_kv_heads();
  // Key: (local?, kept tokens) with the largest first; the global group leads.
  std::map<std::pair<bool, int64_t>, std::vector<int32_t>> groups;
  for (int32_t h = 0; h < H; ++h) {
    const HeadSpec& s = p.at(l, h);
    groups[{s.is_local(), -s.kept_tokens(tokens)}].push_back(h);
  }
  std::vector<int32_t> free_slots(R, per_rank);
  std::vector<int64_t> bytes(R, 0);
  std::vector<std::vector<int32_t>> owned(R);
  for (const auto& [key, heads] : groups) {
    const int32_t n = static_cast<int32_t>(heads.size());
    std::vector<int32_t> share(R, n / R);
    std::vector<int32_t> order(R);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      if (free_slots[a] != free_slots[b]) return free_slots[a] > free_slots[b];
      if (bytes[a] != bytes[b]) return bytes[a] < bytes[b];
      if (cum_globals[a] != cum_globals[b]) return cum_globals[a] < cum_globals[b];
      return cum_bytes[a] < cum_bytes[b];
    });
    for (int32_t i = 0; i < n % R; ++i) ++share[order[i]];
    std::vector<int32_t> movers;
    for (int32_t h : heads) {
      const int32_t home = h / per_rank;
      if (share[home] > 0) {
        --share[home];
        owned[home].push_back(h);
      } else {
        movers.push_back(h);
      }
    }
    int32_t r = 0;
    for (int32_t h : movers) {
      while (share[r] == 0) ++r;
      --share[r];
      owned[r].push_back(h);
    }
    for (int32_t q = 0; q < R; ++q) {
      free_slots[q] = per_rank - static_cast<int32_t>(owned[q].size());
      bytes[q] = 0;
      for (int32_t h : owned[q]) bytes[q] += p.at(l, h).kept_tokens(tokens);
    }
  }
  std::vector<int32_t> perm;
  for (int32_t q = 0; q < R; ++q) {
    for (int32_t h : owned[q]) cum_globals[q] += !p.at(l, h).is_local();
    cum_bytes[q] += bytes[q];
  }
  for (auto& o : owned) {
    std::sort(o.begin(), o.end());  // a rank's heads in their old order
    perm.insert(perm.end(), o.begin(), o.end());
  }
  return perm;
}

RankBalance ratios(const std::vector<int64_t>& globals, const std::vector<int64_t>& kv) {
  auto ratio = [](const std::vector<int64_t>& v) {
    const int64_t sum = std::accumulate(v.begin(), v.end(), int64_t{0});
    if (sum == 0) return 1.0;
    return static_cast<double>(*std::max_element(v.begin(), v.end())) * v.size() /
           static_cast<double>(sum);
  };
  return {ratio(globals), ratio(kv)};
}

}  // namespace

std::vector<std::vector<int32_t>> plan_head_placement(const HeadProfile& profile,
                                                      const PlacementOptions& opts) {
  const int32_t H = profile.num_kv_heads(), R = opts.ranks;
  const int32_t per_rank = heads_per_rank(H, R);
  std::vector<std::vector<int32_t>> perm;
  std::vector<int64_t> cum_globals(R, 0), cum_bytes(R, 0);
  for (int32_t l = 0; l < profile.num_layers(); ++l)
    perm.push_back(per_rank == 0
                       ? identity(H)
                       : plan_layer(profile, l, R, per_rank, opts.tokens, cum_globals, cum_bytes));
  return perm;
}

HeadProfile permute_profile(const HeadProfile& profile,
                            const std::vector<std::vector<int32_t>>& perm, int32_t ranks) {
  const int32_t L = profile.num_layers(), H = profile.num_kv_heads();
  if (static_cast<int32_t>(perm.size()) != L) throw Error("head placement: one row per layer");
  HeadProfile out(L, H);
  out.params = profile.params;
  out.placement_ranks = ranks;
  for (int32_t l = 0; l < L; ++l) {
    if (static_cast<int32_t>(perm[l].size()) != H)
      throw Error("head placement: layer " + std::to_string(l) + " needs " + std::to_string(H) +
                  " heads");
    std::vector<bool> seen(H, false);
    std::vector<int32_t> row;
    for (int32_t i = 0; i < H; ++i) {
      const int32_t old = perm[l][i];
      if (old < 0 || old >= H || seen[old])
        throw Error("head placement: layer " + std::to_string(l) + " is not a permutation");
      seen[old] = true;
      out.at(l, i) = profile.at(l, old);
      row.push_back(profile.placement.empty() ? old : profile.placement[l][old]);
    }
    out.placement.push_back(std::move(row));
  }
  return out;
}

PlacementReport placement_report(const HeadProfile& profile, const PlacementOptions& opts) {
  const int32_t H = profile.num_kv_heads(), R = opts.ranks;
  const int32_t per_rank = heads_per_rank(H, R);
  PlacementReport rep;
  rep.ranks = R;
  std::vector<int64_t> total_g(R, 0), total_kv(R, 0);
  for (int32_t l = 0; l < profile.num_layers(); ++l) {
    std::vector<int64_t> g(R, 0), kv(R, 0);
    for (int32_t h = 0; h < H; ++h) {
      const HeadSpec& s = profile.at(l, h);
      const bool global = !s.is_local();
      // Replicated heads: every rank holds and runs all of them.
      for (int32_t r = 0; r < R; ++r) {
        if (per_rank != 0 && h / per_rank != r) continue;
        g[r] += global;
        kv[r] += s.kept_tokens(opts.tokens);
      }
    }
    rep.layers.push_back(ratios(g, kv));
    rep.worst_layer.globals = std::max(rep.worst_layer.globals, rep.layers.back().globals);
    rep.worst_layer.kv = std::max(rep.worst_layer.kv, rep.layers.back().kv);
    for (int32_t r = 0; r < R; ++r) total_g[r] += g[r], total_kv[r] += kv[r];
  }
  rep.total = ratios(total_g, total_kv);
  return rep;
}

}  // namespace redknot
