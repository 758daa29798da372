// Helpers shared by the end-to-end tests: paths to ../shared and running a model over ids.
#pragma once
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/builtin.h"
#include "kv/contiguous_kv_cache.h"
#include "loader/checkpoint.h"
#include "loader/safetensors.h"
#include "model/model.h"

namespace redknot::testing {

// REDKNOT_SHARED_DIR in the environment overrides the configured path, so that a test binary
// built here can run on the GPU machine against a carried copy of the data.
inline std::string shared_path(const std::string& rel) {
  const char* env = std::getenv("REDKNOT_SHARED_DIR");
  return std::string(env != nullptr && *env != '\0' ? env : REDKNOT_SHARED_DIR) + "/" + rel;
}

#define RK_REQUIRE_SHARED(rel)                                        \
  if (!std::filesystem::exists(::redknot::testing::shared_path(rel))) \
  GTEST_SKIP() << "shared test data not found: " << ::redknot::testing::shared_path(rel)

inline const std::vector<std::string>& refs_models() {
  static const std::vector<std::string> names = {"llama3-tiny", "mistral-tiny", "mistral-swa-tiny",
                                                 "qwen2-tiny",  "qwen3-tiny",   "qwen3-tiny-bf16"};
  return names;
}

inline std::vector<int32_t> to_ids(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}

// Logits of every position of `ids` as one sequence, prefilled in chunks of `chunk` tokens.
// Returns host f32 [ids, vocab].
inline Tensor run_logits(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& ids,
                         int64_t chunk) {
  const int64_t V = model.config().vocab_size, T = static_cast<int64_t>(ids.size());
  Tensor out = Tensor::host(DType::F32, {T, V});
  if (!kv.has_sequence(seq)) kv.add_sequence(seq);
  for (int64_t s = 0; s < T; s += chunk) {
    int64_t e = std::min(T, s + chunk);
    Batch b;
    b.add_sequence(seq, std::vector<int32_t>(ids.begin() + s, ids.begin() + e),
                   kv.next_position(seq), true, true);
    Tensor l = model.forward(b, kv);
    std::memcpy(out.data<float>() + s * V, l.data<float>(), l.nbytes());
  }
  return out;
}

// The reference logits of sequence i: every position (`logits.i`) or the stored positions of long
// sequences (`logits_at.i` at `positions.i`). logits: [positions, vocab]
struct RefLogits {
  std::vector<int32_t> positions;
  Tensor logits;
};
inline RefLogits reference_logits(const SafetensorsFile& ref, int i, int64_t num_ids) {
  RefLogits r;
  const std::string n = std::to_string(i);
  if (ref.tensors.count("logits." + n)) {
    r.logits = ref.tensors.at("logits." + n);
    for (int32_t p = 0; p < static_cast<int32_t>(num_ids); ++p) r.positions.push_back(p);
  } else {
    r.logits = ref.tensors.at("logits_at." + n);
    r.positions = to_ids(ref.tensors.at("positions." + n));
  }
  return r;
}

// Runs the `redknot` binary (REDKNOT_CLI_PATH) with `args`, stdin from `stdin_text`.
struct CliResult {
  int status = -1;
  std::string out;  // stdout and stderr together
};
inline CliResult run_cli(const std::string& args, const std::string& stdin_text = "") {
#ifdef REDKNOT_CLI_PATH
  // One file per call: ctest runs several CLI-driving tests at once, and a shared name let one
  // test's empty stdin replace another's input.
  static std::atomic<int> calls{0};
  std::string in_path = ::testing::TempDir();
  in_path.append("/cli_stdin_").append(std::to_string(::getpid()));
  in_path.append("_").append(std::to_string(calls.fetch_add(1))).append(".txt");
  std::ofstream(in_path, std::ios::binary) << stdin_text;
  const std::string cmd = std::string(REDKNOT_CLI_PATH) + " " + args + " < " + in_path + " 2>&1";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  std::remove(in_path.c_str());
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
#else
  return {-1, "built without the CLI"};
#endif
}

}  // namespace redknot::testing
