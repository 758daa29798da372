// A forward batch: tokens of one or more sequences, each sequence's tokens contiguous and in
// increasing position order (continuous batching puts prefill chunks and decode steps together).
#pragma once
#include <cstdint>
#include <vector>

namespace redknot {

using SeqId = int32_t;

// Tokens [begin, begin + count) of the batch belong to `seq`.
struct SeqSpan {
  SeqId seq = 0;
  int64_t begin = 0;
  int64_t count = 0;
};

struct Batch {
  std::vector<int32_t> tokens;     // [T]
  std::vector<int32_t> positions;  // [T]
  std::vector<SeqSpan> spans;      // one per sequence present
  // Batch rows whose logits are wanted, in output order (e.g. the last token of each sequence).
  std::vector<int64_t> logit_rows;
  // Selective recompute: every position is already cached in its sequence; the forward
  // replaces those tokens' K/V in place instead of appending (CacheBlend, EPIC).
  bool overwrite = false;
  // >= 0: no later token reads these tokens' K/V past this layer (dead-row skipping,
  // ForwardOptions::kv_only_from_layer), so a store may keep nothing for them in deeper layers
  // (which hold only local heads). -1: every layer.
  int32_t last_stored_layer = -1;

  int64_t size() const { return static_cast<int64_t>(tokens.size()); }

  // Appends `tokens` of `seq` at positions start_pos, start_pos + 1, ...; adds the last row to
  // logit_rows when `last_logits`, every row when `all_logits`.
  void add_sequence(SeqId seq, const std::vector<int32_t>& tokens, int32_t start_pos,
                    bool last_logits = true, bool all_logits = false);

  // Throws Error when spans/positions/logit rows are inconsistent.
  void validate(int64_t vocab_size) const;
};

}  // namespace redknot
