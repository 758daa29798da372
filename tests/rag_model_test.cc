// The shipped RAG model through the eval harness on a slice of the committed 4K eval set: the
// engine must answer like the trained model does (EM floor), and naive reuse must not beat full
// prefill on the cross-document family.
#include "eval/rag_eval.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

TEST(RagModel, FullPrefillAnswersTheEvalSlice) {
  const std::string dir = std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k";
  const std::string data = std::string(REDKNOT_SOURCE_DIR) + "/data/eval/rag-4k.jsonl.gz";
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(dir);
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  auto tok = Tokenizer::from_hf_file(dir + "/tokenizer.json");
  std::vector<RagSample> samples = load_rag_dataset(data, 8);
  EvalOptions opts;
  opts.reuse.mode = ReuseMode::Full;
  EvalReport full = run_rag_eval(model, ck, *tok, samples, opts);
  // Run 3 scores 78.5 EM on the whole 4K set with full attention (model card).
  EXPECT_GE(full.em, 0.5) << full.to_json().dump();
  EXPECT_EQ(full.n, 8);
  EXPECT_GT(full.flops, 0);

  opts.reuse.mode = ReuseMode::Naive;
  EvalReport naive = run_rag_eval(model, ck, *tok, samples, opts);
  EXPECT_LT(naive.flops, 0.1 * full.flops) << "naive recomputes only the question";
  if (full.per_task.count("dependent"))
    EXPECT_LE(naive.per_task["dependent"].em, full.per_task["dependent"].em);
  EXPECT_GT(naive.reused_tokens, 0);
}

}  // namespace
}  // namespace redknot::testing
