#include "loader/init_model.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>

#include "core/error.h"
#include "core/thread_pool.h"
#include "loader/hf_config.h"

namespace redknot {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t tensor_key(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return mix64(mix64(seed ^ 0x5EEDC0DEull) ^ h);
}

inline float uniform_at(uint64_t key, int64_t i) {
  const uint64_t x = mix64(key + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull);
  // 24 random bits -> [-1, 1) exactly representable in f32.
  return static_cast<float>(static_cast<int32_t>(x >> 40) - (1 << 23)) * (1.0f / (1 << 23));
}

DType stored_dtype(const WeightSpec& w, DType dtype) { return w.keep_f32 ? DType::F32 : dtype; }

uint64_t spec_bytes(const WeightSpec& w, DType dtype) {
  return static_cast<uint64_t>(dtype_bytes(stored_dtype(w, dtype), w.numel()));
}

const char* st_dtype(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::BF16:
      return "BF16";
    default:
      throw Error(std::string("init-model: cannot write dtype ") + dtype_name(t));
  }
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(p.string() + ": cannot open for writing");
  f << text;
  f.flush();
  if (!f) throw Error(p.string() + ": write failed");
}

json read_json(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(p.string() + ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw Error(p.string() + ": invalid JSON: " + e.what());
  }
}

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};

// Writes one shard: header, then every tensor generated chunk by chunk; a chunk is written by a
// helper thread while the next one is generated.
void write_shard(const fs::path& path, const std::vector<const WeightSpec*>& specs,
                 const InitModelOptions& o, ThreadPool& pool, InitModelProgress& prog) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const WeightSpec* w : specs) {
    const uint64_t b = spec_bytes(*w, o.dtype);
    header[w->name] = {{"dtype", st_dtype(stored_dtype(*w, o.dtype))},
                       {"shape", w->shape},
                       {"data_offsets", {offset, offset + b}}};
    offset += b;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  const std::string p = path.string();
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(p.c_str(), "wb"));
  if (!f) throw Error(p + ": cannot open for writing");
  auto put = [&](const void* data, size_t n) {
    if (n && std::fwrite(data, 1, n, f.get()) != n) throw Error(p + ": write failed (disk full?)");
  };
  const uint64_t len = text.size();
  put(&len, 8);
  put(text.data(), text.size());

  const int64_t chunk = std::max<int64_t>(1024, o.chunk_elems);
  std::vector<uint8_t> bufs[2] = {std::vector<uint8_t>(chunk * 4), std::vector<uint8_t>(chunk * 4)};
  std::future<void> pending;
  int cur = 0;
  for (const WeightSpec* w : specs) {
    const DType dt = stored_dtype(*w, o.dtype);
    const uint64_t key = tensor_key(o.seed, w->name);
    const int64_t n = w->numel();
    for (int64_t s = 0; s < n; s += chunk) {
      const int64_t m = std::min(chunk, n - s);
      uint8_t* out = bufs[cur].data();
      pool.parallel_for(m, 1 << 16, [&](int64_t b, int64_t e) {
        if (dt == DType::F32) {
          float* d = reinterpret_cast<float*>(out);
          for (int64_t i = b; i < e; ++i)
            d[i] = w->init == WeightSpec::Init::Ones ? 1.0f : w->amplitude * uniform_at(key, s + i);
        } else {
          uint16_t* d = reinterpret_cast<uint16_t*>(out);
          for (int64_t i = b; i < e; ++i)
            d[i] = f32_to_bf16(
                w->init == WeightSpec::Init::Ones ? 1.0f : w->amplitude * uniform_at(key, s + i));
        }
      });
      if (pending.valid()) pending.get();  // rethrows a write error
      const size_t nbytes = static_cast<size_t>(dtype_bytes(dt, m));
      pending = std::async(std::launch::async, [&put, out, nbytes] { put(out, nbytes); });
      cur ^= 1;
    }
    if (pending.valid()) pending.get();
    prog.tensors_done += 1;
    prog.bytes_done += spec_bytes(*w, o.dtype);
    if (o.progress) o.progress(prog);
  }
  if (pending.valid()) pending.get();
  if (std::fflush(f.get()) != 0) throw Error(p + ": write failed (disk full?)");
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) throw Error(p + ": write failed (disk full?)");
}

const char* kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json",
                                 "special_tokens_map.json", "tokenizer.model"};

bool is_model_file(const std::string& name) {
  return name == "config.json" || name == "model.safetensors.index.json" ||
         name == "redknot_init.json" || name.ends_with(".safetensors");
}

}  // namespace

float init_uniform(uint64_t seed, const std::string& name, int64_t i) {
  return uniform_at(tensor_key(seed, name), i);
}

int64_t tokenizer_json_vocab(const std::string& path) {
  const json j = read_json(path);
  int64_t hi = -1;
  if (j.contains("model") && j["model"].is_object() && j["model"].contains("vocab")) {
    const json& v = j["model"]["vocab"];
    if (v.is_object()) {
      for (const auto& [tok, id] : v.items())
        if (id.is_number_integer()) hi = std::max<int64_t>(hi, id.get<int64_t>());
    } else if (v.is_array()) {  // Unigram: [[piece, score], ...]
      hi = std::max<int64_t>(hi, static_cast<int64_t>(v.size()) - 1);
    }
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const json& t : j["added_tokens"])
      if (t.is_object() && t.contains("id") && t["id"].is_number_integer())
        hi = std::max<int64_t>(hi, t["id"].get<int64_t>());
  if (hi < 0) throw Error(path + ": no vocabulary found in tokenizer.json");
  return hi + 1;
}

std::vector<std::vector<size_t>> plan_shards(const std::vector<WeightSpec>& specs, DType dtype,
                                             uint64_t max_shard_bytes) {
  std::vector<std::vector<size_t>> shards;
  uint64_t cur = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t b = spec_bytes(specs[i], dtype);
    if (shards.empty() || (cur > 0 && cur + b > max_shard_bytes)) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += b;
  }
  return shards;
}

InitModelResult init_model_dir(const InitModelOptions& o) {
  if (o.dtype != DType::BF16 && o.dtype != DType::F32)
    throw Error("init-model: --dtype must be bf16 or f32");
  if (o.max_shard_bytes == 0) throw Error("init-model: --max-shard-bytes must be positive");
  if (o.out_dir.empty()) throw Error("init-model: no output directory");
  const std::string src = o.out_dir + "/config.json";
  ModelConfig cfg = parse_hf_config(o.config, src);
  cfg.validate(src);

  // Tokenizer first: a mismatch must fail before gigabytes are written.
  std::vector<fs::path> tok_files;
  if (!o.tokenizer_dir.empty()) {
    const fs::path td(o.tokenizer_dir);
    const fs::path tj = fs::is_regular_file(td) ? td : td / "tokenizer.json";
    if (!fs::is_regular_file(tj))
      throw Error(o.tokenizer_dir + ": no tokenizer.json (pass a directory holding one)");
    const int64_t tv = tokenizer_json_vocab(tj.string());
    if (tv > cfg.vocab_size)
      throw Error(tj.string() + ": the tokenizer has ids up to " + std::to_string(tv - 1) +
                  ", beyond the config's vocab_size " + std::to_string(cfg.vocab_size) +
                  " (wrong tokenizer for this model?)");
    for (const char* name : kTokenizerFiles) {
      const fs::path p = tj.parent_path() / name;
      if (fs::is_regular_file(p)) tok_files.push_back(p);
    }
  }

  const std::vector<WeightSpec> specs = weight_specs(cfg);
  const auto plan = plan_shards(specs, o.dtype, o.max_shard_bytes);
  InitModelResult res;
  for (const WeightSpec& w : specs) {
    res.parameters += w.numel();
    res.bytes += spec_bytes(w, o.dtype);
  }

  const fs::path out(o.out_dir);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out))
    throw Error(o.out_dir + ": cannot create the output directory" +
                (ec ? ": " + ec.message() : std::string()));
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(out))
    if (e.is_regular_file() && is_model_file(e.path().filename().string())) old.push_back(e.path());
  if (!old.empty() && !o.force)
    throw Error(o.out_dir + ": already holds a model (" + old.front().filename().string() +
                "); pass --force to overwrite it");
  for (const fs::path& p : old) fs::remove(p, ec);

  const fs::space_info sp = fs::space(out, ec);
  const uint64_t need = res.bytes + (uint64_t{1} << 20) * plan.size();
  if (!ec && sp.available < need)
    throw Error(o.out_dir + ": needs " + std::to_string(need / 1000000) + " MB of weights, only " +
                std::to_string(sp.available / 1000000) + " MB free");

  ThreadPool pool(o.threads);
  InitModelProgress prog;
  prog.tensors_total = static_cast<int64_t>(specs.size());
  prog.bytes_total = res.bytes;
  prog.num_shards = static_cast<int>(plan.size());
  json weight_map = json::object();
  for (size_t s = 0; s < plan.size(); ++s) {
    const std::string name = shard_name(s, plan.size());
    std::vector<const WeightSpec*> shard;
    for (size_t i : plan[s]) {
      shard.push_back(&specs[i]);
      weight_map[specs[i].name] = name;
    }
    prog.shard = static_cast<int>(s + 1);
    write_shard(out / name, shard, o, pool, prog);
    res.shards.push_back(name);
  }

  for (const fs::path& p : tok_files) {
    // The source may be read-only (shared data): replace rather than overwrite, and leave the
    // copy writable by its owner so that a later --force can replace it again.
    const fs::path dst = out / p.filename();
    fs::remove(dst, ec);
    fs::copy_file(p, dst, ec);
    if (ec) throw Error(p.string() + ": cannot copy to " + o.out_dir + ": " + ec.message());
    fs::permissions(dst, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add, ec);
  }

  json init = o.provenance.is_object() ? o.provenance : json::object();
  init["seed"] = o.seed;
  init["dtype"] = dtype_name(o.dtype);
  init["parameters"] = res.parameters;
  init["bytes"] = res.bytes;
  init["max_shard_bytes"] = o.max_shard_bytes;
  init["shards"] = res.shards;
  init["tokenizer"] = o.tokenizer_dir;
  init["weights"] =
      "random: matrices U(-a, a) with a = 1/sqrt(fan_in), embedding a = 1, biases a = 0.1 (f32), "
      "norms 1; element i of tensor T = splitmix64(seed, FNV-1a(T), i)";
  write_text(out / "redknot_init.json", init.dump(2) + "\n");
  json index = {{"metadata", {{"total_size", res.bytes}}}, {"weight_map", weight_map}};
  write_text(out / "model.safetensors.index.json", index.dump(2) + "\n");
  write_text(out / "config.json", o.config.dump(2) + "\n");
  return res;
}

}  // namespace redknot
