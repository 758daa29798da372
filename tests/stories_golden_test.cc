// stories260K (a real trained Llama, GGUF) generates its golden greedy text from BOS, on every
// CPU backend; the llama2.c README text is the oracle.
#include "engine/generate.h"
#include "test_support.h"
#include "tokenizer/tokenizer.h"

namespace redknot::testing {
namespace {

// From ../shared/models/stories260K/README.md (reproduced there with an independent forward).
const char* kGolden =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high";

class StoriesGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(StoriesGolden, GreedyFromBos) {
  RK_REQUIRE_SHARED("models/stories260K/stories260K.gguf");
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("models/stories260K/stories260K.gguf"));
  ASSERT_TRUE(ck.gguf_vocab.has_value());
  auto tok = Tokenizer::from_gguf(*ck.gguf_vocab);
  auto backend = create_backend(GetParam());
  Model model(ck, *backend);
  ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), 256, model.inv_freq());
  GenerateOptions opts;
  opts.max_tokens = 60;
  opts.stop_at_eos = true;
  GenerateResult r = generate(model, kv, 0, {tok->bos_id()}, opts);
  std::string text = tok->decode(r.ids);
  ASSERT_GE(text.size(), std::string(kGolden).size()) << text;
  EXPECT_EQ(text.substr(0, std::string(kGolden).size()), kGolden);
}

INSTANTIATE_TEST_SUITE_P(Backends, StoriesGolden, ::testing::Values("cpu", "reference"));

}  // namespace
}  // namespace redknot::testing
