// RAG evaluation data: JSONL (optionally gzip-compressed), one sample per line:
// {"segments": ["...", ...], "question": "...", "answers": ["...", ...], "task": "..."}.
// Segments are the reuse units; the prompt is built from them exactly as the model was trained.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "reuse/reuse_prefill.h"
#include "tokenizer/tokenizer.h"

namespace redknot {

struct RagSample {
  std::vector<std::string> segments;
  std::string question;
  std::vector<std::string> answers;
  std::string task;  // task family, "" when absent
  std::string id;    // the sample's "id", "" when absent (reports name rows by it)
};

// Reads up to `limit` samples (0: all). A bad line is an Error naming file and line number.
std::vector<RagSample> load_rag_dataset(const std::string& path, int64_t limit = 0);

// ids = [BOS] + tok(seg_1 + "\n\n") + ... + tok(seg_n + "\n\n") + tok("Question: q\nAnswer:")
SegmentedPrompt build_rag_prompt(const Tokenizer& tok, const RagSample& sample);

// SQuAD-style answer normalisation (lower case, no punctuation, no articles, single spaces)
// and metrics, max over the reference answers.
std::string normalize_answer(const std::string& s);
double exact_match(const std::string& prediction, const std::vector<std::string>& answers);
double f1_score(const std::string& prediction, const std::vector<std::string>& answers);

}  // namespace redknot
