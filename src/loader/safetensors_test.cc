#include "loader/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <random>

#include "loader/test_util.h"

namespace redknot {
namespace {

using namespace testing_util;

// Raw safetensors bytes: 8-byte length, header text, data.
std::string raw_file(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

TEST(Safetensors, WriteReadRoundTrip) {
  TempDir dir;
  std::map<std::string, Tensor> in;
  in["a"] = Tensor::from_f32({1.f, -2.5f, 3.f, 4.f, 5.f, 6.f}, {2, 3});
  in["ids"] = Tensor::from_i32({7, -8, 9}, {3});
  Tensor b = Tensor::host(DType::BF16, {4});
  const float bvals[4] = {1.f, 0.5f, -3.f, 1e10f};
  convert_from_f32(bvals, DType::BF16, b.raw(), 4);
  in["b"] = b;
  in["one"] = Tensor::from_f32({42.f}, {1});
  const std::string path = dir.file("rt.safetensors");
  write_safetensors(path, in, {{"format", "pt"}});

  // Header length is a multiple of 8 so f32 data stays aligned.
  std::string bytes = read_bytes(path);
  uint64_t hlen;
  std::memcpy(&hlen, bytes.data(), 8);
  EXPECT_EQ(hlen % 8, 0u);

  SafetensorsFile f = read_safetensors(path);
  EXPECT_EQ(f.metadata.at("format"), "pt");
  ASSERT_EQ(f.tensors.size(), 4u);
  const Tensor& a = f.tensors.at("a");
  EXPECT_EQ(a.dtype(), DType::F32);
  EXPECT_EQ(a.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a.data<float>()[1], -2.5f);
  EXPECT_EQ(a.data<float>()[5], 6.f);
  EXPECT_EQ(f.tensors.at("ids").dtype(), DType::I32);
  EXPECT_EQ(f.tensors.at("ids").data<int32_t>()[1], -8);
  const Tensor& rb = f.tensors.at("b");
  EXPECT_EQ(rb.dtype(), DType::BF16);
  EXPECT_EQ(std::memcmp(rb.raw(), b.raw(), 8), 0);
  EXPECT_EQ(f.tensors.at("one").shape(), (std::vector<int64_t>{1}));
  EXPECT_EQ(f.tensors.at("one").data<float>()[0], 42.f);
  // Views into the mapping, not copies.
  const uint8_t* lo = f.file->data();
  for (const auto& [name, t] : f.tensors) {
    auto p = static_cast<const uint8_t*>(t.raw());
    EXPECT_GE(p, lo) << name;
    EXPECT_LE(p + t.nbytes(), lo + f.file->size()) << name;
    EXPECT_EQ(t.holder().get(), f.file.get()) << name;
  }
}

TEST(Safetensors, RefModelTensorsAreViews) {
  SafetensorsFile f = read_safetensors(ref_dir("llama3-tiny") + "/model.safetensors");
  EXPECT_EQ(f.tensors.size(), 30u);
  const Tensor& e = f.tensors.at("model.embed_tokens.weight");
  EXPECT_EQ(e.shape(), (std::vector<int64_t>{512, 128}));
  const uint8_t* lo = f.file->data();
  for (const auto& [name, t] : f.tensors) {
    auto p = static_cast<const uint8_t*>(t.raw());
    EXPECT_TRUE(p >= lo && p + t.nbytes() <= lo + f.file->size()) << name;
  }
  // The first tensor starts right after the header.
  uint64_t hlen;
  std::memcpy(&hlen, lo, 8);
  EXPECT_EQ(static_cast<const uint8_t*>(f.tensors.at("lm_head.weight").raw()), lo + 8 + hlen);
}

TEST(Safetensors, ScalarBecomesShapeOne) {
  TempDir dir;
  float v = 3.25f;
  write_bytes(dir.file("s.safetensors"),
              raw_file(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}   )",
                       std::string(reinterpret_cast<char*>(&v), 4)));
  SafetensorsFile f = read_safetensors(dir.file("s.safetensors"));
  EXPECT_EQ(f.tensors.at("s").shape(), (std::vector<int64_t>{1}));
  EXPECT_EQ(f.tensors.at("s").data<float>()[0], 3.25f);
}

TEST(Safetensors, MisalignedDataIsCopiedNotViewed) {
  TempDir dir;
  // Header of odd length: f32 data starts at an address not divisible by 4.
  std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  if ((8 + header.size()) % 4 == 0) header += " ";
  float vals[2] = {1.5f, -7.f};
  write_bytes(dir.file("m.safetensors"),
              raw_file(header, std::string(reinterpret_cast<char*>(vals), 8)));
  SafetensorsFile f = read_safetensors(dir.file("m.safetensors"));
  const Tensor& x = f.tensors.at("x");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.raw()) % 4, 0u);
  EXPECT_EQ(x.data<float>()[0], 1.5f);
  EXPECT_EQ(x.data<float>()[1], -7.f);
}

TEST(Safetensors, TruncatedFile) {
  TempDir dir;
  std::string good = read_bytes(ref_dir("qwen2-tiny") + "/model.safetensors");
  const std::string p = dir.file("cut.safetensors");
  write_bytes(p, good.substr(0, good.size() - 100));
  expect_error([&] { read_safetensors(p); }, {p, "outside the data section"});
  write_bytes(p, good.substr(0, 5));
  expect_error([&] { read_safetensors(p); }, {p, "truncated"});
  write_bytes(p, "");
  expect_error([&] { read_safetensors(p); }, {p, "truncated"});
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir dir;
  const std::string p = dir.file("h.safetensors");
  std::string bytes = raw_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "abcd");
  uint64_t huge = 1ull << 40;
  std::memcpy(bytes.data(), &huge, 8);
  write_bytes(p, bytes);
  expect_error([&] { read_safetensors(p); }, {p, "header length", "exceeds"});
  huge = ~0ull;  // would overflow 8 + len
  std::memcpy(bytes.data(), &huge, 8);
  write_bytes(p, bytes);
  expect_error([&] { read_safetensors(p); }, {p, "header length"});
}

TEST(Safetensors, LyingOffsets) {
  TempDir dir;
  const std::string p = dir.file("o.safetensors");
  // End beyond the file.
  write_bytes(p,
              raw_file(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'x'", "outside the data section"});
  // Size disagrees with shape.
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'x'", "size mismatch"});
  // begin > end.
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'x'", "data_offsets"});
  // Overlapping tensors.
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                          "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "overlapping"});
  // Shape whose element count overflows 64 bits.
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296,16],)"
                          R"("data_offsets":[0,8]}})",
                          "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'x'"});
  // Negative offsets / dims.
  write_bytes(p,
              raw_file(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "non-negative"});
}

TEST(Safetensors, InvalidJsonAndBadEntries) {
  TempDir dir;
  const std::string p = dir.file("j.safetensors");
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32",)", "1234"));
  expect_error([&] { read_safetensors(p); }, {p, "invalid safetensors header JSON"});
  write_bytes(p, raw_file(R"([1,2,3])", ""));
  expect_error([&] { read_safetensors(p); }, {p, "not a JSON object"});
  write_bytes(p, raw_file(R"({"x":{"dtype":"F32","shape":[1]}})", "1234"));
  expect_error([&] { read_safetensors(p); }, {p, "'x'", "data_offsets"});
}

// F8_E4M3 (FP8 checkpoints) from raw bytes written as a torch exporter lays them out, and back
// through the writer.
TEST(Safetensors, Fp8E4m3Tensors) {
  TempDir dir;
  const std::string p = dir.file("fp8.safetensors");
  const std::string header = R"({"w":{"dtype":"F8_E4M3","shape":[2,3],"data_offsets":[0,6]}})";
  const std::string data("\x38\xC0\x7E\x01\x00\xFE", 6);  // 1, -2, 448, 2^-9, 0, -448
  write_bytes(p, raw_file(header, data));
  SafetensorsFile f = read_safetensors(p);
  const Tensor& w = f.tensors.at("w");
  ASSERT_EQ(w.dtype(), DType::F8_E4M3);
  EXPECT_EQ(w.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w.nbytes(), 6);
  std::vector<float> v(6);
  convert_to_f32(w.dtype(), w.raw(), v.data(), 6);
  EXPECT_EQ(v, (std::vector<float>{1.f, -2.f, 448.f, std::ldexp(1.f, -9), 0.f, -448.f}));
  const std::string p2 = dir.file("fp8b.safetensors");
  write_safetensors(p2, {{"w", w}});
  SafetensorsFile g = read_safetensors(p2);
  ASSERT_EQ(g.tensors.at("w").dtype(), DType::F8_E4M3);
  EXPECT_EQ(std::memcmp(g.tensors.at("w").raw(), data.data(), 6), 0);
}

TEST(Safetensors, UnsupportedDtype) {
  TempDir dir;
  const std::string p = dir.file("d.safetensors");
  write_bytes(p, raw_file(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'w'", "unsupported dtype 'F64'"});
  write_bytes(
      p, raw_file(R"({"w":{"dtype":"F8_E5M2","shape":[8],"data_offsets":[0,8]}})", "12345678"));
  expect_error([&] { read_safetensors(p); }, {p, "'w'", "unsupported dtype 'F8_E5M2'"});
}

TEST(Safetensors, MissingFile) {
  expect_error([] { read_safetensors("/nonexistent/x.safetensors"); },
               {"/nonexistent/x.safetensors"});
}

TEST(Safetensors, ShardedIndex) {
  TempDir dir;
  std::map<std::string, Tensor> s1, s2;
  s1["a"] = Tensor::from_f32({1, 2}, {2});
  s2["b"] = Tensor::from_f32({3}, {1});
  s2["c"] = Tensor::from_f32({4, 5, 6}, {3});
  write_safetensors(dir.file("model-00001-of-00002.safetensors"), s1);
  write_safetensors(dir.file("model-00002-of-00002.safetensors"), s2);
  nlohmann::json index = {{"metadata", {{"total_size", 24}}},
                          {"weight_map",
                           {{"a", "model-00001-of-00002.safetensors"},
                            {"b", "model-00002-of-00002.safetensors"},
                            {"c", "model-00002-of-00002.safetensors"}}}};
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  auto t = read_safetensors_dir(dir.str());
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t.at("a").data<float>()[1], 2.f);
  EXPECT_EQ(t.at("b").data<float>()[0], 3.f);
  EXPECT_EQ(t.at("c").data<float>()[2], 6.f);

  // A name listed in the index but absent from its shard.
  index["weight_map"]["d"] = "model-00001-of-00002.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  expect_error([&] { read_safetensors_dir(dir.str()); },
               {"model-00001-of-00002.safetensors", "'d'", "missing"});
  // A shard path escaping the directory.
  index["weight_map"]["d"] = "../evil.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  expect_error([&] { read_safetensors_dir(dir.str()); }, {"index.json", "invalid shard"});
  // Missing shard file.
  index["weight_map"]["d"] = "model-00003-of-00002.safetensors";
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
  expect_error([&] { read_safetensors_dir(dir.str()); }, {"model-00003-of-00002.safetensors"});
}

TEST(Safetensors, WriterRejectsQ8) {
  TempDir dir;
  std::map<std::string, Tensor> m;
  m["q"] = Tensor::host(DType::Q8_0, {32});
  expect_error([&] { write_safetensors(dir.file("q.safetensors"), m); }, {"q.safetensors", "'q'"});
  std::map<std::string, Tensor> absent;
  absent["none"] = Tensor();
  expect_error([&] { write_safetensors(dir.file("n.safetensors"), absent); },
               {"n.safetensors", "'none'", "absent"});
}

// Random byte corruption of the header: reading either succeeds or throws Error.
TEST(Safetensors, RandomHeaderCorruptionNeverCrashes) {
  TempDir dir;
  const std::string good = read_bytes(ref_dir("qwen3-tiny") + "/model.safetensors");
  uint64_t hlen;
  std::memcpy(&hlen, good.data(), 8);
  const std::string p = dir.file("fuzz.safetensors");
  std::mt19937 rng(99);
  int errors = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string bad = good;
    for (int k = 0; k < 1 + iter % 3; ++k)
      bad[rng() % (8 + hlen)] = static_cast<char>("0123456789[]{},:\"-e\xff"[rng() % 20]);
    write_bytes(p, bad);
    try {
      read_safetensors(p);
    } catch (const Error& e) {
      ++errors;
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace redknot
