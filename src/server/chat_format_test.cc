// Chat prompt formatting: family detection and the segment layout (each message and document
// tokenized alone) on the stories260K GGUF tokenizer (plain format, BOS first).
#include "server/chat_format.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "loader/checkpoint.h"

namespace redknot::server {
namespace {

TEST(ChatFormat, DetectsFamilies) {
  EXPECT_EQ(detect_chat_family("{% for m in messages %}<|im_start|>{{ m.role }}"),
            ChatFamily::kChatML);
  EXPECT_EQ(detect_chat_family("<|start_header_id|>' + message['role']"), ChatFamily::kLlama3);
  EXPECT_EQ(detect_chat_family("{{ '[INST] ' + message['content'] }}"), ChatFamily::kMistral);
  EXPECT_EQ(detect_chat_family(""), ChatFamily::kPlain);
}

TEST(ChatFormat, PlainFormatSegments) {
  const std::string path = std::string(REDKNOT_SHARED_DIR) + "/models/stories260K/stories260K.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "not found: " << path;
  Checkpoint ck = load_checkpoint(path);
  auto tok = Tokenizer::from_gguf(*ck.gguf_vocab);
  std::vector<ChatMessage> msgs = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Who is Lily?"}};
  SegmentedPrompt p = format_chat(*tok, ChatFamily::kPlain, msgs, {"Lily is a girl."});
  ASSERT_EQ(p.segment_texts.size(), 4u);
  EXPECT_EQ(p.segment_texts[0], "Be brief.\n\n");
  EXPECT_EQ(p.segment_texts[1], "Lily is a girl.\n\n");
  EXPECT_EQ(p.segment_texts[2], "User: Hi\n");
  EXPECT_EQ(p.segment_texts[3], "Assistant: Hello\n");
  EXPECT_EQ(p.query_text, "Question: Who is Lily?\nAnswer:");
  // BOS opens the first segment only; every segment is the tokenization of its own text.
  EXPECT_EQ(p.segments[0].front(), tok->bos_id());
  EXPECT_EQ(std::vector<int32_t>(p.segments[0].begin() + 1, p.segments[0].end()),
            tok->encode("Be brief.\n\n"));
  EXPECT_EQ(p.segments[1], tok->encode("Lily is a girl.\n\n"));
  EXPECT_EQ(p.query, tok->encode("Question: Who is Lily?\nAnswer:"));
  EXPECT_THROW(format_chat(*tok, ChatFamily::kPlain, {}, {}), Error);
}

TEST(ChatFormat, TemplatedFamiliesShape) {
  const std::string path = std::string(REDKNOT_SHARED_DIR) + "/models/stories260K/stories260K.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "not found: " << path;
  Checkpoint ck = load_checkpoint(path);
  auto tok = Tokenizer::from_gguf(*ck.gguf_vocab);  // texts only: special tokens are not checked
  std::vector<ChatMessage> msgs = {{"system", "S"}, {"user", "Q"}};
  SegmentedPrompt c = format_chat(*tok, ChatFamily::kChatML, msgs, {"D"});
  EXPECT_EQ(c.segment_texts, (std::vector<std::string>{"<|im_start|>system\nS<|im_end|>\n",
                                                       "<|im_start|>system\nD<|im_end|>\n"}));
  EXPECT_EQ(c.query_text, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
  SegmentedPrompt l = format_chat(*tok, ChatFamily::kLlama3, msgs, {});
  EXPECT_EQ(l.query_text,
            "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  SegmentedPrompt m = format_chat(*tok, ChatFamily::kMistral, msgs, {"D"});
  EXPECT_EQ(m.segment_texts, (std::vector<std::string>{"[INST] S\n\n", "D\n\n"}));
  EXPECT_EQ(m.query_text, "Q [/INST]");
}

}  // namespace
}  // namespace redknot::server
