#include "kv/head_profile.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace redknot {

HeadProfile::HeadProfile(int32_t num_layers, int32_t num_kv_heads)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      heads_(static_cast<size_t>(num_layers) * num_kv_heads) {}

HeadProfile HeadProfile::slice_heads(int32_t head0, int32_t n) const {
  if (head0 < 0 || n < 1 || head0 + n > num_kv_heads_)
    throw Error("head profile: kv heads [" + std::to_string(head0) + ", " +
                std::to_string(head0 + n) + ") outside its " + std::to_string(num_kv_heads_));
  HeadProfile p(num_layers_, n);
  for (int32_t l = 0; l < num_layers_; ++l)
    for (int32_t h = 0; h < n; ++h) p.at(l, h) = at(l, head0 + h);
  p.params = params;
  p.placement = placement;
  p.placement_ranks = placement_ranks;
  p.whole_ = std::make_shared<const HeadProfile>(whole());
  return p;
}

HeadProfile HeadProfile::native(const ModelConfig& cfg) {
  HeadProfile p(static_cast<int32_t>(cfg.num_layers), static_cast<int32_t>(cfg.num_kv_heads));
  if (cfg.sliding_window > 0)
    for (HeadSpec& h : p.heads_)
      h = {HeadClass::Local, static_cast<int32_t>(cfg.sliding_window), 0};
  return p;
}

HeadProfile HeadProfile::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw Error(path + ": cannot open head profile");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw Error(path + ": head profile is not valid JSON: " + e.what());
  }
  return from_json(j, path);
}

HeadProfile HeadProfile::from_json(const nlohmann::json& j, const std::string& src) {
  auto fail = [&](const std::string& what) { throw Error(src + ": head profile: " + what); };
  if (!j.is_object()) fail("top level must be an object");
  for (const char* k : {"num_layers", "num_kv_heads", "heads"})
    if (!j.contains(k)) fail(std::string("missing \"") + k + "\"");
  if (!j["num_layers"].is_number_integer() || !j["num_kv_heads"].is_number_integer())
    fail("num_layers and num_kv_heads must be integers");
  const int64_t L = j["num_layers"].get<int64_t>(), H = j["num_kv_heads"].get<int64_t>();
  if (L <= 0 || H <= 0 || L > 4096 || H > 4096) fail("num_layers/num_kv_heads out of range");
  const auto& rows = j["heads"];
  if (!rows.is_array() || static_cast<int64_t>(rows.size()) != L)
    fail("\"heads\" must be a list of num_layers (" + std::to_string(L) + ") rows");
  HeadProfile p(static_cast<int32_t>(L), static_cast<int32_t>(H));
  for (int64_t l = 0; l < L; ++l) {
    if (!rows[l].is_array() || static_cast<int64_t>(rows[l].size()) != H)
      fail("layer " + std::to_string(l) + " must list num_kv_heads (" + std::to_string(H) +
           ") heads");
    for (int64_t h = 0; h < H; ++h) {
      const auto& e = rows[l][h];
      const std::string where = "layer " + std::to_string(l) + " head " + std::to_string(h);
      if (!e.is_object() || !e.contains("class") || !e["class"].is_string())
        fail(where + ": needs \"class\": \"global\" or \"local\"");
      HeadSpec& s = p.at(static_cast<int32_t>(l), static_cast<int32_t>(h));
      const std::string cls = e["class"];
      if (cls == "global") {
        s.cls = HeadClass::Global;
      } else if (cls == "local") {
        s.cls = HeadClass::Local;
      } else {
        fail(where + ": unknown class \"" + cls + "\"");
      }
      auto get_int = [&](const char* k, int64_t def) -> int64_t {
        if (!e.contains(k)) return def;
        if (!e[k].is_number_integer()) fail(where + ": \"" + k + "\" must be an integer");
        return e[k].get<int64_t>();
      };
      int64_t w = get_int("window", 0), sk = get_int("sink", 0);
      if (w < 0 || w > (int64_t{1} << 30) || sk < 0 || sk > (int64_t{1} << 30))
        fail(where + ": window/sink out of range");
      if (s.cls == HeadClass::Local && w < 1) fail(where + ": a local head needs window >= 1");
      s.window = s.cls == HeadClass::Local ? static_cast<int32_t>(w) : 0;
      s.sink = s.cls == HeadClass::Local ? static_cast<int32_t>(sk) : 0;
      for (auto [k, dst] :
           {std::pair{"score", &s.score}, std::pair{"prefix_shift", &s.prefix_shift},
            std::pair{"edge_mass", &s.edge_mass}})
        if (e.contains(k) && e[k].is_number()) *dst = e[k].get<double>();
    }
  }
  if (j.contains("params")) p.params = j["params"];
  if (j.contains("placement")) {  // optional: files without it keep the original head order
    const auto& pl = j["placement"];
    if (!pl.is_object() || !pl.contains("ranks") || !pl["ranks"].is_number_integer() ||
        !pl.contains("perm") || !pl["perm"].is_array() ||
        static_cast<int64_t>(pl["perm"].size()) != L)
      fail("\"placement\" needs integer \"ranks\" and \"perm\": one row per layer");
    const int64_t R = pl["ranks"].get<int64_t>();
    if (R < 1 || R > 4096) fail("placement ranks out of range");
    p.placement_ranks = static_cast<int32_t>(R);
    for (int64_t l = 0; l < L; ++l) {
      const auto& row = pl["perm"][l];
      const std::string where = "placement layer " + std::to_string(l);
      if (!row.is_array() || static_cast<int64_t>(row.size()) != H)
        fail(where + " must list num_kv_heads heads");
      std::vector<int32_t> perm;
      std::vector<bool> seen(H, false);
      for (const auto& v : row) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= H ||
            seen[v.get<int64_t>()])
          fail(where + " is not a permutation of 0.." + std::to_string(H - 1));
        seen[v.get<int64_t>()] = true;
        perm.push_back(v.get<int32_t>());
      }
      p.placement.push_back(std::move(perm));
    }
  }
  return p;
}

nlohmann::json HeadProfile::to_json() const {
  nlohmann::json j;
  j["num_layers"] = num_layers_;
  j["num_kv_heads"] = num_kv_heads_;
  j["global_fraction"] = global_fraction();
  nlohmann::json rows = nlohmann::json::array();
  for (int32_t l = 0; l < num_layers_; ++l) {
    nlohmann::json row = nlohmann::json::array();
    for (int32_t h = 0; h < num_kv_heads_; ++h) {
      const HeadSpec& s = at(l, h);
      row.push_back({{"class", s.cls == HeadClass::Global ? "global" : "local"},
                     {"window", s.window},
                     {"sink", s.sink},
                     {"score", s.score},
                     {"prefix_shift", s.prefix_shift},
                     {"edge_mass", s.edge_mass}});
    }
    rows.push_back(row);
  }
  j["heads"] = rows;
  j["params"] = params.is_null() ? nlohmann::json::object() : params;
  if (!placement.empty()) j["placement"] = {{"ranks", placement_ranks}, {"perm", placement}};
  return j;
}

void HeadProfile::save(const std::string& path) const {
  std::ofstream f(path);
  if (!f) throw Error(path + ": cannot write head profile");
  f << to_json().dump(1) << "\n";
  if (!f) throw Error(path + ": write failed");
}

void HeadProfile::check_matches(const ModelConfig& cfg, const std::string& source) const {
  if (num_layers_ != cfg.num_layers || num_kv_heads_ != cfg.num_kv_heads)
    throw Error(source + ": head profile is for " + std::to_string(num_layers_) + " layers x " +
                std::to_string(num_kv_heads_) + " kv heads, the model has " +
                std::to_string(cfg.num_layers) + " x " + std::to_string(cfg.num_kv_heads));
}

double HeadProfile::global_fraction() const {
  if (heads_.empty()) return 1.0;
  return static_cast<double>(
             std::count_if(heads_.begin(), heads_.end(),
                           [](const HeadSpec& h) { return h.cls == HeadClass::Global; })) /
         heads_.size();
}

bool HeadProfile::all_global() const { return global_fraction() == 1.0; }

int32_t HeadProfile::last_global_layer() const {
  for (int32_t l = num_layers_ - 1; l >= 0; --l)
    for (int32_t h = 0; h < num_kv_heads_; ++h)
      if (at(l, h).cls == HeadClass::Global) return l;
  return -1;
}

namespace {
int64_t pages_of(int64_t tokens, int32_t page_size) { return (tokens + page_size - 1) / page_size; }
}  // namespace

int64_t HeadProfile::pages_for(int64_t tokens, int32_t page_size,
                               int32_t slack_pages_per_head) const {
  int64_t pages = 0;
  for (const HeadSpec& h : heads_)
    pages += pages_of(h.kept_tokens(tokens), page_size) + slack_pages_per_head;
  return pages;
}

int64_t HeadProfile::peak_pages_for(int64_t tokens, int32_t page_size) const {
  const int64_t all = pages_of(tokens, page_size);
  int64_t pages = 0;
  for (const HeadSpec& h : heads_)
    pages +=
        h.is_local() ? std::min(all, pages_of(int64_t{h.sink} + h.window, page_size) + 2) : all;
  return pages;
}

}  // namespace redknot
