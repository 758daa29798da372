#include "loader/gguf.h"

#include <cstring>
#include <limits>
#include <optional>
#include <set>

#include "core/error.h"
#include "loader/tensor_check.h"

namespace redknot {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as little-endian uint32
constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS

// Bounds-checked little-endian cursor over the mapped file.
class Reader {
 public:
  Reader(const std::string& path, const uint8_t* data, uint64_t size)
      : path_(path), data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename T>
  T read(const char* what) {
    if (remaining() < sizeof(T))
      throw Error(path_ + ": truncated GGUF file (reading " + what + " at offset " +
                  std::to_string(pos_) + " of " + std::to_string(size_) + ")");
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const char* what) {
    uint64_t n = read<uint64_t>(what);
    if (n > remaining())
      throw Error(path_ + ": truncated or corrupt GGUF file: " + what + " length " +
                  std::to_string(n) + " at offset " + std::to_string(pos_ - 8) +
                  " exceeds the file size");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  const std::string& path_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8:
      return "u8";
    case GgufType::I8:
      return "i8";
    case GgufType::U16:
      return "u16";
    case GgufType::I16:
      return "i16";
    case GgufType::U32:
      return "u32";
    case GgufType::I32:
      return "i32";
    case GgufType::F32:
      return "f32";
    case GgufType::Bool:
      return "bool";
    case GgufType::String:
      return "string";
    case GgufType::Array:
      return "array";
    case GgufType::U64:
      return "u64";
    case GgufType::I64:
      return "i64";
    case GgufType::F64:
      return "f64";
  }
  return "?";
}

// Smallest encoded size of one value of `t` (used to reject absurd counts before allocating).
uint64_t min_value_bytes(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::Bool:
      return 1;
    case GgufType::U16:
    case GgufType::I16:
      return 2;
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::F32:
      return 4;
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::F64:
    case GgufType::String:
      return 8;
    case GgufType::Array:
      return 12;
  }
  return 1;
}

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::F64); }

// Reads one scalar of type t into v (ints into v.i, floats into v.f, strings into v.s).
void read_scalar(Reader& r, GgufType t, GgufValue& v) {
  switch (t) {
    case GgufType::U8:
      v.i = r.read<uint8_t>("u8 value");
      break;
    case GgufType::I8:
      v.i = r.read<int8_t>("i8 value");
      break;
    case GgufType::U16:
      v.i = r.read<uint16_t>("u16 value");
      break;
    case GgufType::I16:
      v.i = r.read<int16_t>("i16 value");
      break;
    case GgufType::U32:
      v.i = r.read<uint32_t>("u32 value");
      break;
    case GgufType::I32:
      v.i = r.read<int32_t>("i32 value");
      break;
    case GgufType::U64: {
      uint64_t u = r.read<uint64_t>("u64 value");
      v.i = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                ? std::numeric_limits<int64_t>::max()
                : static_cast<int64_t>(u);
      break;
    }
    case GgufType::I64:
      v.i = r.read<int64_t>("i64 value");
      break;
    case GgufType::F32:
      v.f = r.read<float>("f32 value");
      break;
    case GgufType::F64:
      v.f = r.read<double>("f64 value");
      break;
    case GgufType::Bool:
      v.i = r.read<uint8_t>("bool value") != 0;
      break;
    case GgufType::String:
      v.s = r.read_string("string value");
      break;
    case GgufType::Array:
      break;  // handled by read_value
  }
}

void read_value(Reader& r, GgufType t, GgufValue& v, const std::string& path,
                const std::string& key, int depth) {
  v.type = t;
  if (t != GgufType::Array) {
    read_scalar(r, t, v);
    return;
  }
  if (depth > 4)
    throw Error(path + ": corrupt GGUF file: arrays nested too deeply in '" + key + "'");
  uint32_t et = r.read<uint32_t>("array element type");
  if (!valid_type(et))
    throw Error(path + ": corrupt GGUF file: metadata '" + key +
                "' has unknown array element type " + std::to_string(et));
  v.elem_type = static_cast<GgufType>(et);
  uint64_t n = r.read<uint64_t>("array length");
  if (n > r.remaining() / min_value_bytes(v.elem_type))
    throw Error(path + ": corrupt GGUF file: metadata array '" + key + "' claims " +
                std::to_string(n) + " elements, more than the file can hold");
  v.array_len = n;
  GgufValue e;
  switch (v.elem_type) {
    case GgufType::String:
      v.strings.reserve(n);
      for (uint64_t k = 0; k < n; ++k) v.strings.push_back(r.read_string("string array element"));
      break;
    case GgufType::F32:
    case GgufType::F64:
      v.floats.reserve(n);
      for (uint64_t k = 0; k < n; ++k) {
        read_scalar(r, v.elem_type, e);
        v.floats.push_back(e.f);
      }
      break;
    case GgufType::Array:
      for (uint64_t k = 0; k < n; ++k) read_value(r, GgufType::Array, e, path, key, depth + 1);
      break;
    default:
      v.ints.reserve(n);
      for (uint64_t k = 0; k < n; ++k) {
        read_scalar(r, v.elem_type, e);
        v.ints.push_back(e.i);
      }
  }
}

const char* ggml_type_name(uint32_t t) {
  static const char* const kNames[] = {
      "F32",     "F16",    "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1",
      "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
      "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
      "I8",      "I16",    "I32",     "I64",   "F64",    "IQ1_M", "BF16"};
  return t < sizeof(kNames) / sizeof(kNames[0]) ? kNames[t] : "unknown";
}

bool ggml_to_dtype(uint32_t t, DType* out) {
  switch (t) {
    case 0:
      *out = DType::F32;
      return true;
    case 1:
      *out = DType::F16;
      return true;
    case 8:
      *out = DType::Q8_0;
      return true;
    case 30:
      *out = DType::BF16;
      return true;
    default:
      return false;
  }
}

}  // namespace

bool GgufValue::is_int() const {
  switch (type) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::U16:
    case GgufType::I16:
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::Bool:
      return true;
    default:
      return false;
  }
}

Tensor GgufFile::view(const GgufTensorInfo& info) const {
  const uint8_t* p = file->data() + data_start + info.offset;
  return Tensor::view(const_cast<uint8_t*>(p), info.dtype, info.shape, file, Device::Host);
}

GgufFile read_gguf(const std::string& path) {
  GgufFile g;
  g.file = MappedFile::open(path);
  Reader r(path, g.file->data(), g.file->size());
  if (g.file->size() < 4 || r.read<uint32_t>("magic") != kGgufMagic)
    throw Error(path + ": not a GGUF file (bad magic)");
  g.version = r.read<uint32_t>("version");
  if (g.version == 1)
    throw Error(path + ": GGUF version 1 is not supported (versions 2 and 3 are)");
  if (g.version != 2 && g.version != 3)
    throw Error(path + ": unsupported GGUF version " + std::to_string(g.version) +
                " (versions 2 and 3, little-endian, are supported)");
  uint64_t n_tensors = r.read<uint64_t>("tensor count");
  uint64_t n_kv = r.read<uint64_t>("metadata count");
  // Each key/value needs >= 13 bytes and each tensor info >= 24: reject counts the file can't hold.
  if (n_kv > r.remaining() / 13)
    throw Error(path + ": corrupt GGUF file: metadata count " + std::to_string(n_kv) +
                " exceeds what the file can hold");
  if (n_tensors > r.remaining() / 24)
    throw Error(path + ": corrupt GGUF file: tensor count " + std::to_string(n_tensors) +
                " exceeds what the file can hold");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = r.read_string("metadata key");
    uint32_t t = r.read<uint32_t>("metadata type");
    if (!valid_type(t))
      throw Error(path + ": corrupt GGUF file: metadata '" + key + "' has unknown type " +
                  std::to_string(t));
    GgufValue v;
    read_value(r, static_cast<GgufType>(t), v, path, key, 0);
    if (!g.metadata.emplace(key, std::move(v)).second)
      throw Error(path + ": corrupt GGUF file: duplicate metadata key '" + key + "'");
  }

  if (auto it = g.metadata.find("general.alignment"); it != g.metadata.end()) {
    const GgufValue& a = it->second;
    if (!a.is_int() || a.i <= 0 || (a.i & (a.i - 1)) != 0 || a.i > (1 << 20))
      throw Error(path + ": general.alignment must be a power of two");
    g.alignment = static_cast<uint64_t>(a.i);
  }

  std::set<std::string> names;
  g.tensors.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo info;
    info.name = r.read_string("tensor name");
    if (!names.insert(info.name).second)
      throw Error(path + ": corrupt GGUF file: duplicate tensor '" + info.name + "'");
    uint32_t n_dims = r.read<uint32_t>("tensor rank");
    if (n_dims > kMaxDims)
      throw Error(path + ": tensor '" + info.name + "' has " + std::to_string(n_dims) +
                  " dimensions (at most 4)");
    std::vector<int64_t> ne(n_dims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t v = r.read<uint64_t>("tensor dimension");
      if (v > (uint64_t{1} << 48) || __builtin_mul_overflow(numel, v, &numel) ||
          numel > (uint64_t{1} << 48))
        throw Error(path + ": tensor '" + info.name + "' has an absurd dimension " +
                    std::to_string(v));
      ne[d] = static_cast<int64_t>(v);
    }
    info.shape.assign(ne.rbegin(), ne.rend());
    info.ggml_type = r.read<uint32_t>("tensor type");
    info.offset = r.read<uint64_t>("tensor offset");
    if (!ggml_to_dtype(info.ggml_type, &info.dtype))
      throw Error(path + ": tensor '" + info.name + "' has unsupported type " +
                  ggml_type_name(info.ggml_type) + " (" + std::to_string(info.ggml_type) +
                  "; supported: F32, F16, BF16, Q8_0)");
    if (info.dtype == DType::Q8_0 && (n_dims == 0 || ne[0] % kQ8Block != 0))
      throw Error(path + ": Q8_0 tensor '" + info.name + "' has a row length not divisible by 32");
    g.tensors.push_back(std::move(info));
  }

  // Data section starts at the next multiple of the alignment.
  uint64_t pos = r.pos();
  uint64_t data_start = (pos + g.alignment - 1) / g.alignment * g.alignment;
  const uint64_t size = g.file->size();
  if (data_start > size && !g.tensors.empty())
    throw Error(path + ": truncated GGUF file: no data section after the tensor infos");
  g.data_start = std::min(data_start, size);
  const uint64_t data_size = size - g.data_start;
  for (const GgufTensorInfo& info : g.tensors) {
    if (info.offset % g.alignment != 0)
      throw Error(path + ": tensor '" + info.name + "' data offset " + std::to_string(info.offset) +
                  " is not aligned to " + std::to_string(g.alignment));
    int64_t numel = 1;
    for (int64_t d : info.shape) numel *= d;
    uint64_t bytes = static_cast<uint64_t>(dtype_bytes(info.dtype, numel));
    if (info.offset > data_size || bytes > data_size - info.offset)
      throw Error(path + ": truncated GGUF file: tensor '" + info.name + "' at offset " +
                  std::to_string(info.offset) + " (" + std::to_string(bytes) +
                  " bytes) extends past the end of the file");
  }
  return g;
}

std::string gguf_to_hf_name(const std::string& name) {
  static const std::map<std::string, std::string> kGlobal = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  static const std::map<std::string, std::string> kLayer = {
      {"attn_q", "self_attn.q_proj"},
      {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"},
      {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},
      {"attn_norm", "input_layernorm"},
      {"ffn_norm", "post_attention_layernorm"},
      {"attn_q_norm", "self_attn.q_norm"},
      {"attn_k_norm", "self_attn.k_norm"},
  };
  if (auto it = kGlobal.find(name); it != kGlobal.end()) return it->second;
  // blk.<N>.<part>.<weight|bias>
  if (name.rfind("blk.", 0) != 0) return "";
  size_t dot1 = name.find('.', 4);
  if (dot1 == std::string::npos || dot1 == 4) return "";
  std::string layer = name.substr(4, dot1 - 4);
  for (char c : layer)
    if (c < '0' || c > '9') return "";
  size_t dot2 = name.rfind('.');
  if (dot2 <= dot1) return "";
  std::string part = name.substr(dot1 + 1, dot2 - dot1 - 1);
  std::string suffix = name.substr(dot2 + 1);
  if (suffix != "weight" && suffix != "bias") return "";
  auto it = kLayer.find(part);
  if (it == kLayer.end()) return "";
  return "model.layers." + layer + "." + it->second + "." + suffix;
}

Tensor unpermute_rotary_rows(const Tensor& w, int64_t heads, int64_t head_dim) {
  if (w.rank() < 1 || w.dim(0) != heads * head_dim || head_dim % 2 != 0)
    throw Error("unpermute_rotary_rows: tensor " + w.describe() + " is not [" +
                std::to_string(heads) + " * " + std::to_string(head_dim) + ", ...]");
  Tensor out = Tensor::host(w.dtype(), w.shape());
  const int64_t cols = w.rank() == 1 ? 1 : w.numel() / w.dim(0);
  const int64_t row_bytes = dtype_bytes(w.dtype(), cols);
  const int64_t half = head_dim / 2;
  const auto* src = static_cast<const uint8_t*>(w.raw());
  auto* dst = static_cast<uint8_t*>(out.raw());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < 2; ++j)
      for (int64_t i = 0; i < half; ++i) {
        int64_t hf_row = h * head_dim + j * half + i;
        int64_t gguf_row = h * head_dim + 2 * i + j;
        std::memcpy(dst + hf_row * row_bytes, src + gguf_row * row_bytes, row_bytes);
      }
  return out;
}

namespace {

const GgufValue* find_meta(const GgufFile& g, const std::string& key) {
  auto it = g.metadata.find(key);
  return it == g.metadata.end() ? nullptr : &it->second;
}

int64_t meta_int(const GgufFile& g, const std::string& path, const std::string& key,
                 std::optional<int64_t> fallback) {
  const GgufValue* v = find_meta(g, key);
  if (!v) {
    if (fallback) return *fallback;
    throw Error(path + ": missing GGUF metadata '" + key + "'");
  }
  if (!v->is_int())
    throw Error(path + ": GGUF metadata '" + key + "' must be an integer, not " +
                gguf_type_name(v->type));
  return v->i;
}

double meta_float(const GgufFile& g, const std::string& path, const std::string& key,
                  double fallback) {
  const GgufValue* v = find_meta(g, key);
  if (!v) return fallback;
  if (v->is_float()) return v->f;
  if (v->is_int()) return static_cast<double>(v->i);
  throw Error(path + ": GGUF metadata '" + key + "' must be a number");
}

// Token ids stored as u32 use 0xFFFFFFFF for "none".
int32_t meta_token_id(const GgufFile& g, const std::string& path, const std::string& key) {
  int64_t v = meta_int(g, path, key, -1);
  return (v < 0 || v > std::numeric_limits<int32_t>::max()) ? -1 : static_cast<int32_t>(v);
}

bool meta_bool(const GgufFile& g, const std::string& path, const std::string& key, bool fallback) {
  const GgufValue* v = find_meta(g, key);
  if (!v) return fallback;
  if (!v->is_int()) throw Error(path + ": GGUF metadata '" + key + "' must be a bool");
  return v->i != 0;
}

GgufVocab read_vocab(const GgufFile& g, const std::string& path) {
  GgufVocab vocab;
  if (const GgufValue* m = find_meta(g, "tokenizer.ggml.model"); m && m->type == GgufType::String)
    vocab.model = m->s;
  if (const GgufValue* t = find_meta(g, "tokenizer.ggml.tokens")) {
    if (t->type != GgufType::Array || t->elem_type != GgufType::String)
      throw Error(path + ": tokenizer.ggml.tokens must be an array of strings");
    vocab.tokens = t->strings;
  }
  const size_t n = vocab.tokens.size();
  if (const GgufValue* s = find_meta(g, "tokenizer.ggml.scores")) {
    if (s->type != GgufType::Array || s->floats.size() != n)
      throw Error(path + ": tokenizer.ggml.scores must be " + std::to_string(n) + " floats");
    vocab.scores.assign(s->floats.begin(), s->floats.end());
  }
  if (const GgufValue* s = find_meta(g, "tokenizer.ggml.token_type")) {
    if (s->type != GgufType::Array || s->ints.size() != n)
      throw Error(path + ": tokenizer.ggml.token_type must be " + std::to_string(n) + " integers");
    for (int64_t v : s->ints) vocab.token_types.push_back(static_cast<int32_t>(v));
  }
  if (const GgufValue* s = find_meta(g, "tokenizer.ggml.merges")) {
    if (s->type != GgufType::Array || s->elem_type != GgufType::String)
      throw Error(path + ": tokenizer.ggml.merges must be an array of strings");
    vocab.merges = s->strings;
  }
  vocab.bos_id = meta_token_id(g, path, "tokenizer.ggml.bos_token_id");
  vocab.eos_id = meta_token_id(g, path, "tokenizer.ggml.eos_token_id");
  vocab.unk_id = meta_token_id(g, path, "tokenizer.ggml.unknown_token_id");
  vocab.pad_id = meta_token_id(g, path, "tokenizer.ggml.padding_token_id");
  const bool spm = vocab.model == "llama";
  vocab.add_bos = meta_bool(g, path, "tokenizer.ggml.add_bos_token", spm);
  vocab.add_space_prefix = meta_bool(g, path, "tokenizer.ggml.add_space_prefix", spm);
  for (int32_t* id : {&vocab.bos_id, &vocab.eos_id, &vocab.unk_id, &vocab.pad_id})
    if (*id >= static_cast<int64_t>(n) && n > 0) *id = -1;  // out of range: treat as absent
  return vocab;
}

}  // namespace

Checkpoint load_gguf_checkpoint(const std::string& path) {
  GgufFile g = read_gguf(path);
  const GgufValue* arch = find_meta(g, "general.architecture");
  if (!arch || arch->type != GgufType::String)
    throw Error(path + ": missing GGUF metadata 'general.architecture'");
  if (arch->s != "llama")
    throw Error(path + ": unsupported GGUF architecture '" + arch->s + "' (supported: llama)");

  Checkpoint ck;
  ck.path = path;
  ModelConfig& c = ck.config;
  c.arch = Arch::Llama;
  c.hidden_size = meta_int(g, path, "llama.embedding_length", std::nullopt);
  c.num_layers = meta_int(g, path, "llama.block_count", std::nullopt);
  c.intermediate_size = meta_int(g, path, "llama.feed_forward_length", std::nullopt);
  c.num_heads = meta_int(g, path, "llama.attention.head_count", std::nullopt);
  c.num_kv_heads = meta_int(g, path, "llama.attention.head_count_kv", c.num_heads);
  c.head_dim = meta_int(g, path, "llama.attention.key_length",
                        c.num_heads > 0 ? c.hidden_size / c.num_heads : 0);
  int64_t rot = meta_int(g, path, "llama.rope.dimension_count", c.head_dim);
  if (rot != c.head_dim)
    throw Error(path + ": partial rotary embeddings (rope.dimension_count " + std::to_string(rot) +
                " != head_dim " + std::to_string(c.head_dim) + ") are not supported");
  c.rms_norm_eps = meta_float(g, path, "llama.attention.layer_norm_rms_epsilon", 1e-5);
  c.rope_theta = meta_float(g, path, "llama.rope.freq_base", 10000.0);
  c.max_position_embeddings = meta_int(g, path, "llama.context_length", 2048);
  if (const GgufValue* st = find_meta(g, "llama.rope.scaling.type");
      st && st->type == GgufType::String && st->s != "none") {
    if (st->s != "linear")
      throw Error(path + ": unsupported GGUF rope scaling '" + st->s + "' (supported: linear)");
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = meta_float(g, path, "llama.rope.scaling.factor", 1.0);
  }

  ck.gguf_vocab = read_vocab(g, path);
  const GgufVocab& vocab = *ck.gguf_vocab;
  c.vocab_size = !vocab.tokens.empty() ? static_cast<int64_t>(vocab.tokens.size())
                                       : meta_int(g, path, "llama.vocab_size", 0);
  c.bos_token_id = vocab.bos_id;
  if (vocab.eos_id >= 0) c.eos_token_ids = {vocab.eos_id};

  bool has_output = false;
  for (const GgufTensorInfo& info : g.tensors) {
    if (info.name == "rope_freqs.weight")
      throw Error(path +
                  ": tensor 'rope_freqs.weight' (per-frequency rope factors, llama3 "
                  "scaling baked into GGUF) is not supported");
    if (info.name == "output.weight") has_output = true;
  }
  c.tie_word_embeddings = !has_output;
  c.validate(path);

  for (const GgufTensorInfo& info : g.tensors) {
    std::string hf = gguf_to_hf_name(info.name);
    Tensor t = g.view(info);
    // Q/K rows: interleaved rotary pairs -> HF rotate-half order.
    const bool is_q =
        hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias");
    const bool is_k =
        hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias");
    if (is_q || is_k) {
      const int64_t heads = is_q ? c.num_heads : c.num_kv_heads;
      if (t.rank() < 1 || t.dim(0) != heads * c.head_dim)
        throw Error(path + ": tensor '" + info.name + "' has shape " + shape_str(t.shape()) +
                    ", expected " + std::to_string(heads * c.head_dim) + " rows");
      t = unpermute_rotary_rows(t, heads, c.head_dim);
    }
    ck.tensors.emplace(hf.empty() ? info.name : hf, std::move(t));
  }
  check_checkpoint_tensors(c, ck.tensors, path);
  return ck;
}

}  // namespace redknot
