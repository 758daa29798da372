#include "core/batch.h"

#include <string>

#include "core/error.h"

namespace redknot {

void Batch::add_sequence(SeqId seq, const std::vector<int32_t>& toks, int32_t start_pos,
                         bool last_logits, bool all_logits) {
  SeqSpan span{seq, size(), static_cast<int64_t>(toks.size())};
  for (size_t i = 0; i < toks.size(); ++i) {
    tokens.push_back(toks[i]);
    positions.push_back(start_pos + static_cast<int32_t>(i));
    if (all_logits) logit_rows.push_back(span.begin + static_cast<int64_t>(i));
  }
  if (!all_logits && last_logits && !toks.empty()) logit_rows.push_back(size() - 1);
  spans.push_back(span);
}

void Batch::validate(int64_t vocab_size) const {
  if (tokens.size() != positions.size())
    throw Error("batch: tokens and positions differ in length");
  int64_t covered = 0;
  for (size_t s = 0; s < spans.size(); ++s) {
    const SeqSpan& sp = spans[s];
    if (sp.begin != covered || sp.count <= 0)
      throw Error("batch: sequence spans must be contiguous and non-empty");
    for (size_t o = 0; o < s; ++o)
      if (spans[o].seq == sp.seq) throw Error("batch: sequence appears twice");
    for (int64_t i = sp.begin + 1; i < sp.begin + sp.count; ++i)
      if (positions[i] <= positions[i - 1])
        throw Error("batch: positions of a sequence must increase");
    covered += sp.count;
  }
  if (covered != size()) throw Error("batch: spans do not cover the batch");
  for (int32_t t : tokens)
    if (t < 0 || t >= vocab_size)
      throw Error("token id " + std::to_string(t) + " outside the vocabulary [0, " +
                  std::to_string(vocab_size) + ")");
  for (int32_t p : positions)
    if (p < 0) throw Error("batch: negative position");
  for (int64_t r : logit_rows)
    if (r < 0 || r >= size()) throw Error("batch: logit row out of range");
}

}  // namespace redknot
