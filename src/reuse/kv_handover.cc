#include "reuse/kv_handover.h"

#include <xxhash.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace redknot {
namespace {

// Manifest (host byte order): magic[8] "RKPDHND\0", u32 version, u32 dtype, u64 model_fp, u32
// layers, u32 kv_heads, u32 head_dim, u32 tokens, i32 first_token, u32 0, i32 token_ids[tokens],
// i32 positions[tokens], per head: u32 class, i32 window, i32 sink, u32 rows, u64 XXH3 of its
// shard; u64 XXH3 of all the preceding bytes.
constexpr char kMagic[8] = {'R', 'K', 'P', 'D', 'H', 'N', 'D', '\0'};
constexpr uint32_t kVersion = 1;
constexpr int64_t kFixed = 48;
constexpr int64_t kPerHead = 24;

template <typename T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename T>
T get(const std::string& s, int64_t off) {
  T v;
  std::memcpy(&v, s.data() + off, sizeof(T));
  return v;
}

std::string prefix_of(uint64_t fp, const std::string& handle) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, fp);
  return "rk:pd:" + std::string(buf) + ":" + handle;
}

bool fail(std::string* error, const std::string& what) {
  if (error) *error = what;
  return false;
}

}  // namespace

std::optional<HandoverBytes> export_kv(PagedKvCache& kv, SeqId seq, std::span<const int32_t> tokens,
                                       int32_t first_token, RemoteKv& remote, uint64_t model_fp,
                                       const std::string& handle, std::string* error) {
  const HeadProfile& prof = kv.profile();
  const int32_t L = prof.num_layers(), H = prof.num_kv_heads();
  const DType dt = kv.pool().backend().act_dtype();
  const int64_t hd = kv.pool().head_dim(), rb = dtype_bytes(dt, hd);
  const std::string pre = prefix_of(model_fp, handle);
  const std::vector<int32_t>& positions = kv.token_positions(seq);
  if (tokens.size() != positions.size()) {
    fail(error, "the sequence holds " + std::to_string(positions.size()) + " tokens, not " +
                    std::to_string(tokens.size()));
    return std::nullopt;
  }
  std::string m;
  m.append(kMagic, 8);
  put(m, kVersion);
  put(m, static_cast<uint32_t>(dt));
  put(m, model_fp);
  for (uint32_t v : {uint32_t(L), uint32_t(H), uint32_t(hd), uint32_t(positions.size())}) put(m, v);
  put(m, first_token);
  put(m, uint32_t{0});
  m.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 4);
  m.append(reinterpret_cast<const char*>(positions.data()), positions.size() * 4);
  std::vector<std::pair<std::string, std::string>> kvs;
  HandoverBytes out;
  out.tokens = static_cast<int32_t>(positions.size());
  out.first_token = first_token;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      Tensor k, v;
      std::vector<int32_t> pos;
      kv.read(seq, l, h, k, v, pos);  // f32 host: exact for f32/bf16/f16 act dtypes
      const int64_t n = static_cast<int64_t>(pos.size());
      std::string shard(static_cast<size_t>(n * 4 + 2 * n * rb), '\0');
      std::memcpy(shard.data(), pos.data(), n * 4);
      convert_from_f32(k.data<float>(), dt, shard.data() + n * 4, n * hd);
      convert_from_f32(v.data<float>(), dt, shard.data() + n * 4 + n * rb, n * hd);
      const HeadSpec& hs = prof.at(l, h);
      put(m, static_cast<uint32_t>(hs.cls));
      put(m, hs.window);
      put(m, hs.sink);
      put(m, static_cast<uint32_t>(n));
      put(m, static_cast<uint64_t>(XXH3_64bits(shard.data(), shard.size())));
      out.rows += n;
      out.bytes += static_cast<int64_t>(shard.size());
      kvs.emplace_back(pre + ":" + std::to_string(l) + ":" + std::to_string(h), std::move(shard));
    }
  put(m, static_cast<uint64_t>(XXH3_64bits(m.data(), m.size())));
  out.bytes += static_cast<int64_t>(m.size());
  out.token_major_bytes = int64_t{out.tokens} * L * H * 2 * rb;
  kvs.emplace_back(pre + ":m", std::move(m));  // last: an importer looks for it first
  if (remote.put_many(kvs) != RemoteKv::Status::Ok) {
    fail(error, "remote write failed (" + remote.describe() + ")");
    return std::nullopt;
  }
  return out;
}

std::optional<HandoverBytes> import_kv(PagedKvCache& kv, SeqId seq, std::span<const int32_t> tokens,
                                       RemoteKv& remote, uint64_t model_fp,
                                       const std::string& handle, std::string* error) {
  const HeadProfile& prof = kv.profile();
  const int32_t L = prof.num_layers(), H = prof.num_kv_heads();
  const DType dt = kv.pool().backend().act_dtype();
  const int64_t hd = kv.pool().head_dim(), rb = dtype_bytes(dt, hd);
  const std::string pre = prefix_of(model_fp, handle);
  std::string m;
  const RemoteKv::Status st = remote.get(pre + ":m", &m);
  if (st != RemoteKv::Status::Ok) {
    fail(error, st == RemoteKv::Status::Missing ? "no such handle" : "remote read failed");
    return std::nullopt;
  }
  const int64_t size = static_cast<int64_t>(m.size());
  if (size < kFixed + 8 || std::memcmp(m.data(), kMagic, 8) != 0 ||
      XXH3_64bits(m.data(), size - 8) != get<uint64_t>(m, size - 8)) {
    fail(error, "corrupt handover manifest");
    return std::nullopt;
  }
  const uint32_t n_tok = get<uint32_t>(m, 36);
  if (get<uint32_t>(m, 8) != kVersion || get<uint32_t>(m, 12) != static_cast<uint32_t>(dt) ||
      get<uint64_t>(m, 16) != model_fp || get<uint32_t>(m, 24) != uint32_t(L) ||
      get<uint32_t>(m, 28) != uint32_t(H) || get<uint32_t>(m, 32) != uint32_t(hd) ||
      n_tok > (1u << 26) || size != kFixed + int64_t{n_tok} * 8 + int64_t{L} * H * kPerHead + 8) {
    fail(error, "handover of another model, dtype or geometry");
    return std::nullopt;
  }
  if (n_tok != tokens.size() ||
      std::memcmp(m.data() + kFixed, tokens.data(), tokens.size() * 4) != 0) {
    fail(error, "handover of another prompt");
    return std::nullopt;
  }
  std::vector<int32_t> positions(n_tok);
  std::memcpy(positions.data(), m.data() + kFixed + int64_t{n_tok} * 4, int64_t{n_tok} * 4);
  const int64_t heads_at = kFixed + int64_t{n_tok} * 8;
  std::vector<std::string> keys;
  std::vector<RemoteKv::Range> ranges;
  std::vector<uint32_t> rows(static_cast<size_t>(L) * H);
  for (int i = 0; i < L * H; ++i) {
    const int64_t o = heads_at + int64_t{i} * kPerHead;
    const HeadSpec& hs = prof.at(i / H, i % H);
    // The importer's heads must keep what the exporter's kept: the same classes.
    if (get<uint32_t>(m, o) != static_cast<uint32_t>(hs.cls) ||
        get<int32_t>(m, o + 4) != hs.window || get<int32_t>(m, o + 8) != hs.sink) {
      fail(error, "handover of another head profile");
      return std::nullopt;
    }
    rows[i] = get<uint32_t>(m, o + 12);
    ranges.push_back({pre + ":" + std::to_string(i / H) + ":" + std::to_string(i % H), 0,
                      int64_t{rows[i]} * (4 + 2 * rb)});
  }
  std::vector<std::string> got;
  if (remote.get_ranges(ranges, &got) != RemoteKv::Status::Ok) {
    fail(error, "remote read failed");
    return std::nullopt;
  }
  HandoverBytes out;
  out.tokens = static_cast<int32_t>(n_tok);
  out.first_token = get<int32_t>(m, 40);
  out.bytes = size;
  std::vector<std::vector<int32_t>> head_pos(static_cast<size_t>(L) * H);
  std::vector<Tensor> ks, vs;
  for (int i = 0; i < L * H; ++i) {
    const std::string& s = got[i];
    const int64_t n = rows[i];
    if (static_cast<int64_t>(s.size()) != ranges[i].len ||
        XXH3_64bits(s.data(), s.size()) !=
            get<uint64_t>(m, heads_at + int64_t{i} * kPerHead + 16)) {
      fail(error, "corrupt or missing handover shard (layer " + std::to_string(i / H) + ", head " +
                      std::to_string(i % H) + ")");
      return std::nullopt;
    }
    head_pos[i].resize(n);
    std::memcpy(head_pos[i].data(), s.data(), n * 4);
    Tensor k = Tensor::host(dt, {n, hd}), v = Tensor::host(dt, {n, hd});
    std::memcpy(k.raw(), s.data() + n * 4, n * rb);
    std::memcpy(v.raw(), s.data() + n * 4 + n * rb, n * rb);
    ks.push_back(std::move(k));
    vs.push_back(std::move(v));
    out.rows += n;
    out.bytes += static_cast<int64_t>(s.size());
  }
  out.token_major_bytes = int64_t{n_tok} * L * H * 2 * rb;
  kv.import_sequence(seq, std::move(positions), head_pos, ks, vs);
  return out;
}

}  // namespace redknot
