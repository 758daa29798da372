// Chat prompts as token segments. The template family is detected from the tokenizer's
// chat_template string and formatted by hand (no Jinja engine): ChatML (Qwen), Llama-3,
// Mistral [INST], or a plain "Question: ...\nAnswer:" format for models without a template (the
// RAG model's training format). Every message and every document is tokenized alone: segments
// are the unit of chunk reuse.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace redknot::server {

enum class ChatFamily { kPlain, kChatML, kLlama3, kMistral };
ChatFamily detect_chat_family(const std::string& chat_template);
const char* chat_family_name(ChatFamily f);

struct ChatMessage {
  std::string role;  // system | user | assistant (tool/developer are treated as system)
  std::string content;
};

struct SegmentedPrompt {
  std::vector<std::vector<int32_t>> segments;  // system, documents, earlier turns
  std::vector<int32_t> query;                  // last user turn + generation prompt
  std::vector<std::string> segment_texts;      // for debugging / reuse keys later
  std::string query_text;
};

// Throws redknot::Error on invalid UTF-8 (from the tokenizer) or when there is no message.
SegmentedPrompt format_chat(const Tokenizer& tok, ChatFamily family,
                            const std::vector<ChatMessage>& messages,
                            const std::vector<std::string>& documents);

}  // namespace redknot::server
