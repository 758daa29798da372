#include <string_view>

#include "tokenizer/pipeline.h"
#include "tokenizer/tokenizer.h"

namespace redknot {
namespace {

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

}  // namespace

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special)
    : tok_(tok), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
  const std::string token = tok_.id_to_token(id);  // throws on an unknown id
  if (skip_special_ && tok_.is_special(id)) return {};
  ids_.push_back(id);
  // A run of <0xNN> byte tokens is decoded as one group (an invalid byte turns the whole group
  // into U+FFFD), so nothing after the run's start is final until the run ends.
  if (tok::byte_token_value(token) >= 0) return {};
  return flush(false);
}

std::string StreamDecoder::finish() {
  std::string out = flush(true);
  ids_.clear();
  prefix_ = read_ = 0;
  return out;
}

std::string StreamDecoder::flush(bool final) {
  if (read_ == ids_.size()) return {};
  const std::span<const int32_t> all(ids_);
  const std::string before = tok_.decode(all.subspan(prefix_, read_ - prefix_), skip_special_);
  const std::string now = tok_.decode(all.subspan(prefix_), skip_special_);
  // A trailing U+FFFD may be an incomplete character that the next token completes.
  if (!final && (now.size() <= before.size() || now.ends_with(kReplacementChar))) return {};
  if (!now.starts_with(before)) {
    if (!final) return {};  // not stable yet; wait for more ids
    return now.size() > before.size() ? now.substr(before.size()) : std::string();
  }
  std::string out = now.substr(before.size());
  prefix_ = read_;
  read_ = ids_.size();
  return out;
}

}  // namespace redknot
