#include "server/chat_format.h"

#include "core/error.h"

namespace redknot::server {

ChatFamily detect_chat_family(const std::string& t) {
  if (t.find("<|im_start|>") != std::string::npos) return ChatFamily::kChatML;
  if (t.find("<|start_header_id|>") != std::string::npos) return ChatFamily::kLlama3;
  if (t.find("[INST]") != std::string::npos) return ChatFamily::kMistral;
  return ChatFamily::kPlain;
}

const char* chat_family_name(ChatFamily f) {
  switch (f) {
    case ChatFamily::kPlain:
      return "plain";
    case ChatFamily::kChatML:
      return "chatml";
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kMistral:
      return "mistral";
  }
  return "plain";
}

namespace {

std::string canonical_role(const std::string& r) {
  if (r == "user" || r == "assistant") return r;
  return "system";  // system, developer, tool: instructions/context the model reads
}

class Builder {
 public:
  explicit Builder(const Tokenizer& tok) : tok_(tok) {}

  // Special tokens written in the text (<|im_start|>, [INST]) are matched by the tokenizer.
  void segment(const std::string& text) {
    if (text.empty()) return;
    std::vector<int32_t> ids = tok_.encode(text, false);
    if (!bos_done_) {
      bos_done_ = true;
      if (want_bos_ && tok_.bos_id() >= 0) ids.insert(ids.begin(), tok_.bos_id());
    }
    out_.segments.push_back(std::move(ids));
    out_.segment_texts.push_back(text);
  }
  void query(const std::string& text) {
    std::vector<int32_t> ids = tok_.encode(text, false);
    if (!bos_done_) {
      bos_done_ = true;
      if (want_bos_ && tok_.bos_id() >= 0) ids.insert(ids.begin(), tok_.bos_id());
    }
    out_.query = std::move(ids);
    out_.query_text = text;
  }
  void set_bos(bool b) { want_bos_ = b; }
  SegmentedPrompt take() { return std::move(out_); }

 private:
  const Tokenizer& tok_;
  bool want_bos_ = true, bos_done_ = false;
  SegmentedPrompt out_;
};

// Index of the last user message, or -1.
int last_user(const std::vector<ChatMessage>& m) {
  for (int i = static_cast<int>(m.size()) - 1; i >= 0; --i)
    if (canonical_role(m[i].role) == "user") return i;
  return -1;
}

}  // namespace

SegmentedPrompt format_chat(const Tokenizer& tok, ChatFamily family,
                            const std::vector<ChatMessage>& messages,
                            const std::vector<std::string>& documents) {
  if (messages.empty()) throw Error("messages must not be empty");
  Builder b(tok);
  const int n = static_cast<int>(messages.size());
  switch (family) {
    case ChatFamily::kChatML: {
      b.set_bos(false);  // Qwen templates start with <|im_start|>, no BOS
      int i = 0;
      for (; i < n && canonical_role(messages[i].role) == "system"; ++i)
        b.segment("<|im_start|>system\n" + messages[i].content + "<|im_end|>\n");
      for (const std::string& d : documents) b.segment("<|im_start|>system\n" + d + "<|im_end|>\n");
      for (; i < n - 1; ++i)
        b.segment("<|im_start|>" + canonical_role(messages[i].role) + "\n" + messages[i].content +
                  "<|im_end|>\n");
      const ChatMessage& last = messages[n - 1];
      std::string q = "<|im_start|>" + canonical_role(last.role) + "\n" + last.content;
      q += "<|im_end|>\n<|im_start|>assistant\n";
      b.query(q);
      break;
    }
    case ChatFamily::kLlama3: {
      // "<|begin_of_text|>" is the BOS the template writes; the builder adds it once.
      auto turn = [](const std::string& role, const std::string& content) {
        return "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + content + "<|eot_id|>";
      };
      int i = 0;
      for (; i < n && canonical_role(messages[i].role) == "system"; ++i)
        b.segment(turn("system", messages[i].content));
      for (const std::string& d : documents) b.segment(turn("system", d));
      for (; i < n - 1; ++i) b.segment(turn(canonical_role(messages[i].role), messages[i].content));
      b.query(turn(canonical_role(messages[n - 1].role), messages[n - 1].content) +
              "<|start_header_id|>assistant<|end_header_id|>\n\n");
      break;
    }
    case ChatFamily::kMistral: {
      // Mistral has no system role: system text and documents open the first [INST].
      bool open = false;  // an [INST] is open and waits for its [/INST]
      auto ctx_segment = [&](const std::string& text) {
        b.segment((open ? "" : "[INST] ") + text + "\n\n");
        open = true;
      };
      int i = 0;
      for (; i < n && canonical_role(messages[i].role) == "system"; ++i)
        ctx_segment(messages[i].content);
      for (const std::string& d : documents) ctx_segment(d);
      for (; i < n; ++i) {
        std::string text;
        if (canonical_role(messages[i].role) == "assistant") {
          // The last assistant message is a prefix to continue: no </s>.
          text = " " + messages[i].content + (i == n - 1 ? "" : "</s>");
        } else {
          text = (open ? "" : "[INST] ") + messages[i].content + " [/INST]";
          open = false;
        }
        if (i == n - 1)
          b.query(text);
        else
          b.segment(text);
      }
      break;
    }
    case ChatFamily::kPlain: {
      const int q = last_user(messages);
      for (int i = 0; i < n; ++i)
        if (canonical_role(messages[i].role) == "system") b.segment(messages[i].content + "\n\n");
      for (const std::string& d : documents) b.segment(d + "\n\n");
      for (int i = 0; i < n; ++i) {
        const std::string role = canonical_role(messages[i].role);
        if (role == "system" || i == q) continue;
        if (i > q && q >= 0) break;  // turns after the question are folded below
        b.segment((role == "user" ? "User: " : "Assistant: ") + messages[i].content + "\n");
      }
      if (q >= 0) {
        std::string text = "Question: " + messages[q].content + "\nAnswer:";
        // An assistant message after the question is a prefix of the answer to continue.
        for (int i = q + 1; i < n; ++i)
          if (canonical_role(messages[i].role) == "assistant") text += " " + messages[i].content;
        b.query(text);
      } else {
        b.query("Answer:");
      }
      break;
    }
  }
  return b.take();
}

}  // namespace redknot::server
