#include "loader/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/mmap_file.h"
#include "loader/test_util.h"

namespace redknot {
namespace {

using namespace testing_util;

const std::string kStoriesGguf = kShared + "/models/stories260K/stories260K.gguf";
const std::string kStoriesBin = kShared + "/models/stories260K/stories260K.bin";

// Builds GGUF files byte by byte for the crafted-input tests.
class GgufBuilder {
 public:
  template <typename T>
  static std::string pod(T v) {
    return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  static std::string str(const std::string& s) { return pod<uint64_t>(s.size()) + s; }

  void kv_u32(const std::string& k, uint32_t v) { add_kv(k, 4, pod(v)); }
  void kv_f32(const std::string& k, float v) { add_kv(k, 6, pod(v)); }
  void kv_str(const std::string& k, const std::string& v) { add_kv(k, 8, str(v)); }
  void kv_raw(const std::string& k, uint32_t type, const std::string& payload) {
    add_kv(k, type, payload);
  }
  void kv_str_array(const std::string& k, const std::vector<std::string>& v) {
    std::string p = pod<uint32_t>(8) + pod<uint64_t>(v.size());
    for (const auto& s : v) p += str(s);
    add_kv(k, 9, p);
  }
  // ne is GGUF order (fastest first).
  void tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
              const std::string& bytes) {
    while (data_.size() % 32) data_ += '\0';
    infos_ += str(name) + pod<uint32_t>(ne.size());
    for (uint64_t d : ne) infos_ += pod(d);
    infos_ += pod(type) + pod<uint64_t>(data_.size());
    data_ += bytes;
    ++n_tensors_;
  }
  std::string build(uint32_t version = 3) const {
    std::string out =
        "GGUF" + pod(version) + pod<uint64_t>(n_tensors_) + pod<uint64_t>(n_kv_) + meta_ + infos_;
    while (out.size() % 32) out += '\0';
    return out + data_;
  }

 private:
  void add_kv(const std::string& k, uint32_t type, const std::string& payload) {
    meta_ += str(k) + pod(type) + payload;
    ++n_kv_;
  }
  std::string meta_, infos_, data_;
  uint64_t n_kv_ = 0, n_tensors_ = 0;
};

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

std::vector<float> random_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> out(t.numel());
  convert_to_f32(t.dtype(), t.raw(), out.data(), t.numel());
  return out;
}

// A complete one-layer llama: dim 32, 2 heads of 16, 1 kv head, ffn 32, vocab 4, no output.weight.
// q is Q8_0, k is F16, everything else F32. `skip` drops one tensor.
GgufBuilder tiny_llama(const std::string& skip = "", const std::string& arch = "llama") {
  GgufBuilder b;
  b.kv_str("general.architecture", arch);
  b.kv_u32("llama.embedding_length", 32);
  b.kv_u32("llama.block_count", 1);
  b.kv_u32("llama.feed_forward_length", 32);
  b.kv_u32("llama.attention.head_count", 2);
  b.kv_u32("llama.attention.head_count_kv", 1);
  b.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  b.kv_f32("llama.rope.freq_base", 5000.f);
  b.kv_u32("llama.context_length", 256);
  b.kv_str("tokenizer.ggml.model", "gpt2");
  b.kv_str_array("tokenizer.ggml.tokens", {"a", "b", "ab", "<eos>"});
  b.kv_str_array("tokenizer.ggml.merges", {"a b"});
  b.kv_u32("tokenizer.ggml.eos_token_id", 3);
  b.kv_u32("tokenizer.ggml.bos_token_id", 0xFFFFFFFFu);
  auto f32 = [&](const std::string& name, std::vector<uint64_t> ne, uint32_t seed) {
    if (name == skip) return;
    size_t n = 1;
    for (uint64_t d : ne) n *= d;
    b.tensor(name, ne, 0, f32_bytes(random_values(n, seed)));
  };
  f32("token_embd.weight", {32, 4}, 1);
  f32("output_norm.weight", {32}, 2);
  f32("blk.0.attn_norm.weight", {32}, 3);
  f32("blk.0.ffn_norm.weight", {32}, 4);
  if (skip != "blk.0.attn_q.weight") {
    // Q8_0 rows: 32 rows of one block each; scale 1/64, quants = row * 3 + position pattern.
    std::string q;
    for (int r = 0; r < 32; ++r) {
      q += GgufBuilder::pod<uint16_t>(f32_to_f16(1.f / 64));
      for (int i = 0; i < 32; ++i) q += static_cast<char>(static_cast<int8_t>(r * 3 - 40 + i % 5));
    }
    b.tensor("blk.0.attn_q.weight", {32, 32}, 8, q);
  }
  {
    std::vector<float> k = random_values(16 * 32, 6);
    std::string kb;
    for (float x : k) kb += GgufBuilder::pod<uint16_t>(f32_to_f16(x));
    b.tensor("blk.0.attn_k.weight", {32, 16}, 1, kb);
  }
  f32("blk.0.attn_v.weight", {32, 16}, 7);
  f32("blk.0.attn_output.weight", {32, 32}, 8);
  f32("blk.0.ffn_gate.weight", {32, 32}, 9);
  f32("blk.0.ffn_up.weight", {32, 32}, 10);
  f32("blk.0.ffn_down.weight", {32, 32}, 11);
  return b;
}

// ---- stories260K: real weights, checked against the llama2.c export of the same model ----

struct Llama2c {
  int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  std::vector<float> w;
  size_t embed, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final;
};

Llama2c read_llama2c(const std::string& path) {
  std::string bytes = read_bytes(path);
  Llama2c m{};
  int32_t h[7];
  std::memcpy(h, bytes.data(), sizeof(h));
  m.dim = h[0], m.hidden = h[1], m.layers = h[2], m.heads = h[3], m.kv_heads = h[4];
  m.vocab = std::abs(h[5]), m.seq_len = h[6];
  m.w.resize((bytes.size() - sizeof(h)) / 4);
  std::memcpy(m.w.data(), bytes.data() + sizeof(h), m.w.size() * 4);
  const size_t D = m.dim, L = m.layers, KV = m.dim / m.heads * m.kv_heads, F = m.hidden;
  size_t off = 0;
  auto take = [&](size_t n) {
    size_t o = off;
    off += n;
    return o;
  };
  m.embed = take(m.vocab * D);
  m.rms_att = take(L * D);
  m.wq = take(L * D * D);
  m.wk = take(L * KV * D);
  m.wv = take(L * KV * D);
  m.wo = take(L * D * D);
  m.rms_ffn = take(L * D);
  m.w1 = take(L * F * D);
  m.w2 = take(L * D * F);
  m.w3 = take(L * F * D);
  m.rms_final = take(D);
  return m;
}

void expect_equal_f32(const Tensor& t, const float* want, const std::string& what) {
  ASSERT_EQ(t.dtype(), DType::F32) << what;
  EXPECT_EQ(std::memcmp(t.raw(), want, t.nbytes()), 0) << what << " differs";
}

TEST(GgufStories, ConfigAndVocab) {
  Checkpoint ck = load_checkpoint(kStoriesGguf);
  const ModelConfig& c = ck.config;
  EXPECT_EQ(ck.path, kStoriesGguf);
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_NEAR(c.rms_norm_eps, 1e-5, 1e-10);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_FALSE(c.tie_word_embeddings);  // output.weight is stored
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
  ASSERT_TRUE(ck.gguf_vocab.has_value());
  const GgufVocab& v = *ck.gguf_vocab;
  EXPECT_EQ(v.model, "llama");
  ASSERT_EQ(v.tokens.size(), 512u);
  EXPECT_EQ(v.tokens[0], "<unk>");
  EXPECT_EQ(v.tokens[1], "<s>");
  EXPECT_EQ(v.tokens[3], "<0x00>");
  EXPECT_EQ(v.scores.size(), 512u);
  ASSERT_EQ(v.token_types.size(), 512u);
  EXPECT_EQ(v.token_types[0], 2);
  EXPECT_EQ(v.token_types[1], 3);
  EXPECT_EQ(v.token_types[3], 6);
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unk_id, 0);
  EXPECT_EQ(v.pad_id, -1);  // stored as 0xFFFFFFFF
  EXPECT_TRUE(v.add_bos);
  EXPECT_TRUE(v.add_space_prefix);
  EXPECT_TRUE(v.merges.empty());
}

TEST(GgufStories, TensorsMatchLlama2c) {
  Checkpoint ck = load_checkpoint(kStoriesGguf);
  Llama2c m = read_llama2c(kStoriesBin);
  ASSERT_EQ(m.dim, 64);
  ASSERT_EQ(m.layers, 5);
  ASSERT_EQ(m.vocab, 512);
  const int64_t D = m.dim, F = m.hidden, hd = D / m.heads, KV = hd * m.kv_heads;
  EXPECT_EQ(ck.tensors.size(), 3u + 9u * 5u);
  expect_equal_f32(ck.get("model.embed_tokens.weight"), &m.w[m.embed], "embed");
  expect_equal_f32(ck.get("lm_head.weight"), &m.w[m.embed], "lm_head (copy of embed)");
  expect_equal_f32(ck.get("model.norm.weight"), &m.w[m.rms_final], "final norm");
  EXPECT_EQ(ck.get("model.embed_tokens.weight").shape(), (std::vector<int64_t>{512, 64}));
  for (int64_t l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    expect_equal_f32(ck.get(p + "input_layernorm.weight"), &m.w[m.rms_att + l * D],
                     p + "attn norm");
    expect_equal_f32(ck.get(p + "post_attention_layernorm.weight"), &m.w[m.rms_ffn + l * D],
                     p + "ffn norm");
    expect_equal_f32(ck.get(p + "self_attn.v_proj.weight"), &m.w[m.wv + l * KV * D], p + "wv");
    expect_equal_f32(ck.get(p + "self_attn.o_proj.weight"), &m.w[m.wo + l * D * D], p + "wo");
    expect_equal_f32(ck.get(p + "mlp.gate_proj.weight"), &m.w[m.w1 + l * F * D], p + "w1");
    expect_equal_f32(ck.get(p + "mlp.down_proj.weight"), &m.w[m.w2 + l * D * F], p + "w2");
    expect_equal_f32(ck.get(p + "mlp.up_proj.weight"), &m.w[m.w3 + l * F * D], p + "w3");
    EXPECT_EQ(ck.get(p + "mlp.down_proj.weight").shape(), (std::vector<int64_t>{64, 172}));
    EXPECT_EQ(ck.get(p + "self_attn.k_proj.weight").shape(), (std::vector<int64_t>{32, 64}));
    // Q/K: llama2.c rows are interleaved like GGUF; HF row h*hd + j*hd/2 + i = row h*hd + 2i + j.
    for (auto [name, heads, base] : {std::tuple{"q_proj", m.heads, m.wq + l * D * D},
                                     std::tuple{"k_proj", m.kv_heads, m.wk + l * KV * D}}) {
      const Tensor& t = ck.get(p + "self_attn." + name + ".weight");
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t j = 0; j < 2; ++j)
          for (int64_t i = 0; i < hd / 2; ++i) {
            const float* want = &m.w[base + (h * hd + 2 * i + j) * D];
            const float* got = t.data<float>() + (h * hd + j * hd / 2 + i) * D;
            ASSERT_EQ(std::memcmp(got, want, D * 4), 0) << p << name << " head " << h;
          }
    }
  }
}

// Rotary on interleaved pairs with the GGUF weights must give the same attention scores as
// rotate-half with the converted weights (what HF-style model code computes).
TEST(GgufStories, RotateHalfOnConvertedWeightsMatchesInterleavedRope) {
  Checkpoint ck = load_checkpoint(kStoriesGguf);
  GgufFile raw = read_gguf(kStoriesGguf);
  auto raw_tensor = [&](const std::string& n) {
    for (const auto& info : raw.tensors)
      if (info.name == n) return raw.view(info);
    throw Error("no " + n);
  };
  const int64_t D = 64, hd = 8, heads = 8, kvh = 4;
  std::vector<float> x1 = random_values(D, 11), x2 = random_values(D, 12);
  auto matvec = [&](const Tensor& w, const std::vector<float>& x) {
    std::vector<float> y(w.dim(0));
    for (int64_t r = 0; r < w.dim(0); ++r)
      for (int64_t c = 0; c < D; ++c) y[r] += w.data<float>()[r * D + c] * x[c];
    return y;
  };
  auto rope = [&](std::vector<float> v, int64_t pos, bool interleaved) {
    for (int64_t h = 0; h < static_cast<int64_t>(v.size()) / hd; ++h)
      for (int64_t i = 0; i < hd / 2; ++i) {
        double a = pos * std::pow(10000.0, -2.0 * i / hd);
        int64_t i0 = h * hd + (interleaved ? 2 * i : i);
        int64_t i1 = h * hd + (interleaved ? 2 * i + 1 : i + hd / 2);
        float u = v[i0], w = v[i1];
        v[i0] = static_cast<float>(u * std::cos(a) - w * std::sin(a));
        v[i1] = static_cast<float>(u * std::sin(a) + w * std::cos(a));
      }
    return v;
  };
  const Tensor gq = raw_tensor("blk.2.attn_q.weight"), gk = raw_tensor("blk.2.attn_k.weight");
  const Tensor& hq = ck.get("model.layers.2.self_attn.q_proj.weight");
  const Tensor& hk = ck.get("model.layers.2.self_attn.k_proj.weight");
  auto q_g = rope(matvec(gq, x1), 7, true), k_g = rope(matvec(gk, x2), 3, true);
  auto q_h = rope(matvec(hq, x1), 7, false), k_h = rope(matvec(hk, x2), 3, false);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kh = h / (heads / kvh);
    double sg = 0, sh = 0;
    for (int64_t d = 0; d < hd; ++d) {
      sg += q_g[h * hd + d] * k_g[kh * hd + d];
      sh += q_h[h * hd + d] * k_h[kh * hd + d];
    }
    EXPECT_NEAR(sg, sh, 1e-5 * (1 + std::fabs(sg))) << "head " << h;
  }
}

TEST(GgufStories, NonRotaryTensorsAreViewsIntoTheMapping) {
  Checkpoint ck = load_checkpoint(kStoriesGguf);
  const Tensor& e = ck.get("model.embed_tokens.weight");
  auto file = std::static_pointer_cast<MappedFile>(e.holder());
  for (const auto& [name, t] : ck.tensors) {
    const bool rotary =
        name.find("q_proj") != std::string::npos || name.find("k_proj") != std::string::npos;
    if (rotary) {
      EXPECT_NE(t.holder().get(), file.get()) << name;  // owned converted copy
      continue;
    }
    EXPECT_EQ(t.holder().get(), file.get()) << name;
    auto p = static_cast<const uint8_t*>(t.raw());
    EXPECT_TRUE(p >= file->data() && p + t.nbytes() <= file->data() + file->size()) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 4, 0u) << name;
  }
}

TEST(GgufStories, MetadataAndInfos) {
  GgufFile g = read_gguf(kStoriesGguf);
  EXPECT_EQ(g.version, 3u);
  EXPECT_EQ(g.alignment, 32u);
  EXPECT_EQ(g.tensors.size(), 48u);
  EXPECT_EQ(g.metadata.size(), 19u);
  EXPECT_EQ(g.data_start % 32, 0u);
  EXPECT_EQ(g.metadata.at("general.architecture").s, "llama");
  EXPECT_EQ(g.metadata.at("llama.block_count").i, 5);
  EXPECT_EQ(g.metadata.at("tokenizer.ggml.tokens").array_len, 512u);
  EXPECT_EQ(g.tensors[0].name, "token_embd.weight");
  EXPECT_EQ(g.tensors[0].shape, (std::vector<int64_t>{512, 64}));
}

TEST(GgufNames, Mapping) {
  EXPECT_EQ(gguf_to_hf_name("token_embd.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(gguf_to_hf_name("output.weight"), "lm_head.weight");
  EXPECT_EQ(gguf_to_hf_name("output_norm.weight"), "model.norm.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.12.attn_q.weight"), "model.layers.12.self_attn.q_proj.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.3.ffn_gate.weight"), "model.layers.3.mlp.gate_proj.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.3.ffn_norm.weight"),
            "model.layers.3.post_attention_layernorm.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.3.attn_norm.weight"), "model.layers.3.input_layernorm.weight");
  EXPECT_EQ(gguf_to_hf_name("blk.x.attn_q.weight"), "");
  EXPECT_EQ(gguf_to_hf_name("rope_freqs.weight"), "");
}

// ---- crafted files ----

TEST(GgufCrafted, Q8AndF16RotaryRowsAreReorderedWithoutDequantising) {
  TempDir dir;
  const std::string p = dir.file("tiny.gguf");
  write_bytes(p, tiny_llama().build(2));  // version 2 is accepted too
  Checkpoint ck = load_checkpoint(p);
  EXPECT_TRUE(ck.config.tie_word_embeddings);
  EXPECT_FALSE(ck.has("lm_head.weight"));
  EXPECT_DOUBLE_EQ(ck.config.rope_theta, 5000.0);
  EXPECT_EQ(ck.config.head_dim, 16);
  EXPECT_EQ(ck.config.vocab_size, 4);
  EXPECT_EQ(ck.config.bos_token_id, -1);
  EXPECT_EQ(ck.gguf_vocab->model, "gpt2");
  EXPECT_EQ(ck.gguf_vocab->merges, (std::vector<std::string>{"a b"}));
  EXPECT_FALSE(ck.gguf_vocab->add_bos);
  EXPECT_FALSE(ck.gguf_vocab->add_space_prefix);

  GgufFile raw = read_gguf(p);
  for (const auto& info : raw.tensors) {
    if (info.name != "blk.0.attn_q.weight" && info.name != "blk.0.attn_k.weight") continue;
    const bool q = info.name == "blk.0.attn_q.weight";
    const Tensor& conv = ck.get(q ? "model.layers.0.self_attn.q_proj.weight"
                                  : "model.layers.0.self_attn.k_proj.weight");
    EXPECT_EQ(conv.dtype(), q ? DType::Q8_0 : DType::F16);
    EXPECT_EQ(conv.shape(), (std::vector<int64_t>{q ? 32 : 16, 32}));
    std::vector<float> g = to_f32(raw.view(info)), h = to_f32(conv);
    const int64_t heads = q ? 2 : 1, hd = 16;
    for (int64_t hh = 0; hh < heads; ++hh)
      for (int64_t j = 0; j < 2; ++j)
        for (int64_t i = 0; i < hd / 2; ++i)
          for (int64_t c = 0; c < 32; ++c)
            ASSERT_EQ(h[(hh * hd + j * hd / 2 + i) * 32 + c], g[(hh * hd + 2 * i + j) * 32 + c]);
  }
}

TEST(GgufCrafted, MissingTensorAndWrongArch) {
  TempDir dir;
  const std::string p = dir.file("m.gguf");
  write_bytes(p, tiny_llama("blk.0.ffn_up.weight").build());
  expect_error([&] { load_checkpoint(p); },
               {p, "missing tensor 'model.layers.0.mlp.up_proj.weight'"});
  write_bytes(p, tiny_llama("", "gpt2").build());
  expect_error([&] { load_checkpoint(p); }, {p, "unsupported GGUF architecture 'gpt2'"});
}

TEST(GgufCrafted, UnsupportedTensorType) {
  TempDir dir;
  GgufBuilder b;
  b.kv_str("general.architecture", "llama");
  b.tensor("blk.0.attn_q.weight", {256, 1}, 12, std::string(144, '\0'));  // Q4_K
  const std::string p = dir.file("q4k.gguf");
  write_bytes(p, b.build());
  expect_error([&] { read_gguf(p); }, {p, "'blk.0.attn_q.weight'", "unsupported type Q4_K"});
}

TEST(GgufCrafted, TruncatedAndBadMagic) {
  TempDir dir;
  const std::string good = read_bytes(kStoriesGguf);
  const std::string p = dir.file("cut.gguf");
  for (size_t cut : {size_t{3}, size_t{20}, size_t{5000}, size_t{14000}, good.size() - 100}) {
    SCOPED_TRACE(cut);
    write_bytes(p, good.substr(0, cut));
    expect_error([&] { load_checkpoint(p); }, {p});
    if (cut > 4) expect_error([&] { read_gguf(p); }, {p, "truncated"});
  }
  std::string bad = good;
  bad[0] = 'X';
  write_bytes(p, bad);
  expect_error([&] { read_gguf(p); }, {p, "bad magic"});
  bad = good;
  bad[4] = 1;  // version 1
  write_bytes(p, bad);
  expect_error([&] { read_gguf(p); }, {p, "version 1"});
  bad[4] = 77;
  write_bytes(p, bad);
  expect_error([&] { read_gguf(p); }, {p, "version 77"});
}

TEST(GgufCrafted, AbsurdCountsDoNotAllocate) {
  TempDir dir;
  const std::string p = dir.file("absurd.gguf");
  using B = GgufBuilder;
  // Tensor count 2^60.
  write_bytes(p, "GGUF" + B::pod<uint32_t>(3) + B::pod<uint64_t>(1ull << 60) + B::pod<uint64_t>(0) +
                     std::string(64, '\0'));
  expect_error([&] { read_gguf(p); }, {p, "tensor count"});
  // Metadata count 2^62.
  write_bytes(p, "GGUF" + B::pod<uint32_t>(3) + B::pod<uint64_t>(0) + B::pod<uint64_t>(1ull << 62) +
                     std::string(64, '\0'));
  expect_error([&] { read_gguf(p); }, {p, "metadata count"});
  // Key string length 2^62.
  write_bytes(p, "GGUF" + B::pod<uint32_t>(3) + B::pod<uint64_t>(0) + B::pod<uint64_t>(1) +
                     B::pod<uint64_t>(1ull << 62) + std::string(64, 'k'));
  expect_error([&] { read_gguf(p); }, {p, "length"});
  // Array of 2^61 u32.
  {
    B b;
    b.kv_raw("big", 9, B::pod<uint32_t>(4) + B::pod<uint64_t>(1ull << 61) + std::string(16, '\0'));
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'big'", "elements"});
  }
  // Array of 2^40 strings.
  {
    B b;
    b.kv_raw("strs", 9, B::pod<uint32_t>(8) + B::pod<uint64_t>(1ull << 40) + std::string(16, '\0'));
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'strs'"});
  }
  // Unknown value type.
  {
    B b;
    b.kv_raw("odd", 99, "");
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'odd'", "unknown type"});
  }
  // Absurd dimensions whose product overflows.
  {
    B b;
    b.tensor("x", {1ull << 40, 1ull << 40}, 0, "");
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'x'", "absurd"});
  }
  // Tensor data beyond the end of the file.
  {
    B b;
    b.tensor("y", {1000}, 0, std::string(16, '\0'));
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'y'", "past the end"});
  }
  // Five dimensions.
  {
    B b;
    b.tensor("z", {1, 1, 1, 1, 1}, 0, std::string(4, '\0'));
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "'z'", "dimensions"});
  }
  // Bad alignment.
  {
    B b;
    b.kv_u32("general.alignment", 3);
    write_bytes(p, b.build());
    expect_error([&] { read_gguf(p); }, {p, "alignment"});
  }
}

// Random byte corruption of the header region: loading either succeeds or throws Error.
TEST(GgufCrafted, RandomCorruptionNeverCrashes) {
  TempDir dir;
  const std::string good = read_bytes(kStoriesGguf);
  const std::string p = dir.file("fuzz.gguf");
  std::mt19937 rng(1234);
  int errors = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string bad = good;
    const uint64_t header_end = 14200;  // metadata + tensor infos of stories260K
    for (int k = 0; k < 1 + iter % 4; ++k) {
      size_t pos = rng() % header_end;
      bad[pos] = static_cast<char>(iter % 3 == 0 ? 0xff : rng() & 0xff);
    }
    write_bytes(p, bad);
    try {
      Checkpoint ck = load_checkpoint(p);
      EXPECT_EQ(ck.config.num_layers, 5);
    } catch (const Error& e) {
      ++errors;
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace redknot
