#include "loader/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <vector>

#include "core/error.h"

namespace redknot {
namespace {

using json = nlohmann::json;

bool parse_dtype(const std::string& s, DType* out) {
  if (s == "F32")
    *out = DType::F32;
  else if (s == "F16")
    *out = DType::F16;
  else if (s == "BF16")
    *out = DType::BF16;
  else if (s == "I32")
    *out = DType::I32;
  else if (s == "F8_E4M3")  // FP8 checkpoints (torch.float8_e4m3fn)
    *out = DType::F8_E4M3;
  else
    return false;
  return true;
}

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I32:
      return "I32";
    case DType::F8_E4M3:
      return "F8_E4M3";
    default:
      return nullptr;
  }
}

// A JSON number that must be a non-negative integer.
uint64_t get_u64(const json& v, const std::string& path, const std::string& what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0)
    return static_cast<uint64_t>(v.get<int64_t>());
  throw Error(path + ": " + what + " must be a non-negative integer, got " + v.dump());
}

struct Entry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

}  // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  SafetensorsFile out;
  out.file = MappedFile::open(path);
  const uint8_t* base = out.file->data();
  const uint64_t size = out.file->size();
  if (size < 8)
    throw Error(path + ": truncated safetensors file (" + std::to_string(size) +
                " bytes, the header length alone needs 8)");
  uint64_t header_len;
  std::memcpy(&header_len, base, 8);  // little-endian hosts only
  if (header_len > size - 8)
    throw Error(path + ": safetensors header length " + std::to_string(header_len) +
                " exceeds the file size " + std::to_string(size) + " (truncated or corrupt file)");
  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  json header;
  try {
    header = json::parse(hbegin, hbegin + header_len);
  } catch (const json::exception& e) {
    throw Error(path + ": invalid safetensors header JSON: " + e.what());
  }
  if (!header.is_object()) throw Error(path + ": invalid safetensors header: not a JSON object");

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (info.is_object())
        for (const auto& [k, v] : info.items())
          if (v.is_string()) out.metadata[k] = v.get<std::string>();
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets"))
      throw Error(path + ": " + where + " header entry needs dtype, shape and data_offsets");
    const json& jd = info["dtype"];
    if (!jd.is_string()) throw Error(path + ": " + where + " has a non-string dtype");
    Entry e{name, DType::F32, {}, 0, 0};
    if (!parse_dtype(jd.get<std::string>(), &e.dtype))
      throw Error(path + ": " + where + " has unsupported dtype '" + jd.get<std::string>() +
                  "' (supported: F32, F16, BF16, I32, F8_E4M3)");
    const json& js = info["shape"];
    if (!js.is_array() || js.size() > 8) throw Error(path + ": " + where + " has an invalid shape");
    uint64_t numel = 1;
    for (const json& d : js) {
      uint64_t v = get_u64(d, path, where + " shape dimension");
      if (v > (uint64_t{1} << 48) || __builtin_mul_overflow(numel, v, &numel))
        throw Error(path + ": " + where + " shape " + js.dump() + " is too large");
      e.shape.push_back(static_cast<int64_t>(v));
    }
    const json& jo = info["data_offsets"];
    if (!jo.is_array() || jo.size() != 2)
      throw Error(path + ": " + where + " data_offsets must be [begin, end]");
    e.begin = get_u64(jo[0], path, where + " data_offsets");
    e.end = get_u64(jo[1], path, where + " data_offsets");
    if (e.begin > e.end || e.end > data_size)
      throw Error(path + ": " + where + " data_offsets [" + std::to_string(e.begin) + ", " +
                  std::to_string(e.end) + ") lie outside the data section of " +
                  std::to_string(data_size) + " bytes (truncated or corrupt file)");
    uint64_t elem = static_cast<uint64_t>(dtype_bytes(e.dtype, 1));
    uint64_t bytes;
    if (__builtin_mul_overflow(numel, elem, &bytes) || bytes != e.end - e.begin)
      throw Error(path + ": " + where + " data_offsets span " + std::to_string(e.end - e.begin) +
                  " bytes but shape " + js.dump() + " of " + jd.get<std::string>() + " needs " +
                  std::to_string(numel * elem) + " bytes (size mismatch)");
    // Tensor treats an empty shape as "absent": a 0-d scalar becomes shape [1].
    if (e.shape.empty()) e.shape = {1};
    entries.push_back(std::move(e));
  }

  // Tensors must not share bytes.
  std::vector<const Entry*> sorted;
  for (const Entry& e : entries)
    if (e.end > e.begin) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < sorted.size(); ++i)
    if (sorted[i]->begin < sorted[i - 1]->end)
      throw Error(path + ": tensors '" + sorted[i - 1]->name + "' and '" + sorted[i]->name +
                  "' have overlapping data_offsets");

  std::shared_ptr<void> holder = out.file;
  for (Entry& e : entries) {
    const uint8_t* p = base + data_start + e.begin;
    const uint64_t elem = static_cast<uint64_t>(dtype_bytes(e.dtype, 1));
    Tensor t;
    if (reinterpret_cast<uintptr_t>(p) % elem == 0) {
      t = Tensor::view(const_cast<uint8_t*>(p), e.dtype, e.shape, holder, Device::Host);
    } else {  // misaligned for its element type: copy rather than hand out unaligned pointers
      t = Tensor::host(e.dtype, e.shape);
      if (e.end > e.begin) std::memcpy(t.raw(), p, e.end - e.begin);
    }
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

std::map<std::string, Tensor> read_safetensors_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::map<std::string, Tensor> tensors;
  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    const std::string ipath = index_path.string();
    json index;
    {
      std::ifstream in(index_path);
      if (!in) throw Error(ipath + ": cannot open");
      try {
        index = json::parse(in);
      } catch (const json::exception& e) {
        throw Error(ipath + ": invalid JSON: " + e.what());
      }
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw Error(ipath + ": missing 'weight_map' object");
    std::map<std::string, std::vector<std::string>> by_shard;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string())
        throw Error(ipath + ": weight_map entry '" + name + "' is not a string");
      std::string f = file.get<std::string>();
      // Shards live beside the index; refuse paths that escape the directory.
      if (f.empty() || f.find('/') != std::string::npos || f == "..")
        throw Error(ipath + ": weight_map entry '" + name + "' names an invalid shard '" + f + "'");
      by_shard[f].push_back(name);
    }
    if (by_shard.empty()) throw Error(ipath + ": weight_map is empty");
    for (const auto& [shard, names] : by_shard) {
      const std::string spath = (fs::path(dir) / shard).string();
      SafetensorsFile sf = read_safetensors(spath);
      for (const std::string& name : names) {
        auto it = sf.tensors.find(name);
        if (it == sf.tensors.end())
          throw Error(spath + ": tensor '" + name + "' listed in " + ipath + " is missing");
        tensors.emplace(name, std::move(it->second));
      }
    }
    return tensors;
  }
  if (fs::exists(single_path, ec)) return read_safetensors(single_path.string()).tensors;
  throw Error(dir + ": no model.safetensors or model.safetensors.index.json found");
}

void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const char* dt = safetensors_dtype(t.dtype());
    if (!dt)
      throw Error(path + ": cannot write tensor '" + name + "' of dtype " + dtype_name(t.dtype()));
    if (t.device() != Device::Host)
      throw Error(path + ": cannot write tensor '" + name + "': not a host tensor");
    if (t.empty() || (t.raw() == nullptr && t.numel() != 0))
      throw Error(path + ": cannot write tensor '" + name + "': absent (no shape or data)");
    const uint64_t bytes = static_cast<uint64_t>(t.nbytes());
    header[name] = {
        {"dtype", dt}, {"shape", t.shape()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(path + ": cannot open for writing");
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors)
    out.write(static_cast<const char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  out.flush();
  if (!out) throw Error(path + ": write failed");
}

}  // namespace redknot
