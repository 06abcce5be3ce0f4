#include "local_engine/chat_template.hpp"

#include <optional>
#include <string_view>
#include <utility>

namespace tollgate::local_engine {
namespace {

bool contains(const std::string& text, std::string_view marker) { return text.find(marker) != std::string::npos; }

// Formats that have no system role take it as a preamble of the next user
// turn; several system turns in a row are joined.
class SystemPreamble {
 public:
  void add(const std::string& content) {
    if (text_) {
      *text_ += "\n\n";
      *text_ += content;
    } else {
      text_ = content;
    }
  }
  // The held system text (if any), emptied.
  std::optional<std::string> take() { return std::exchange(text_, std::nullopt); }
  bool pending() const { return text_.has_value(); }

 private:
  std::optional<std::string> text_;
};

// The prompt as it is built: template markup (where special tokens count)
// and what the caller wrote (where they are ordinary text), in order.
class PromptBuilder {
 public:
  void markup(std::string_view text) { append(text, true); }
  void content(std::string_view text) { append(text, false); }
  std::vector<TextSegment> take() { return std::move(segments_); }

 private:
  void append(std::string_view text, bool special) {
    if (text.empty()) return;
    if (segments_.empty() || segments_.back().parse_special != special) segments_.push_back({{}, special});
    segments_.back().text.append(text);
  }
  std::vector<TextSegment> segments_;
};

// <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
void render_llama2(PromptBuilder& out, const std::vector<ChatTurn>& turns, const std::string& bos) {
  SystemPreamble system;
  bool any = false;
  const auto user_turn = [&](const std::string& content) {
    out.markup(bos + "[INST] ");
    if (auto preamble = system.take()) {
      out.markup("<<SYS>>\n");
      out.content(*preamble);
      out.markup("\n<</SYS>>\n\n");
    }
    out.content(content);
    out.markup(" [/INST]");
    any = true;
  };
  for (const ChatTurn& turn : turns) {
    if (turn.role == "system") {
      system.add(turn.content);
    } else if (turn.role == "assistant") {
      out.markup(" ");
      out.content(turn.content);
      out.markup(" </s>");
      any = true;
    } else {
      user_turn(turn.content);
    }
  }
  if (system.pending() || !any) user_turn("");
}

// <|begin_of_text|> is BOS, which the encoder adds.
void render_llama3(PromptBuilder& out, const std::vector<ChatTurn>& turns) {
  for (const ChatTurn& turn : turns) {
    out.markup("<|start_header_id|>" + turn.role + "<|end_header_id|>\n\n");
    out.content(turn.content);
    out.markup("<|eot_id|>");
  }
  out.markup("<|start_header_id|>assistant<|end_header_id|>\n\n");
}

void render_chatml(PromptBuilder& out, const std::vector<ChatTurn>& turns) {
  for (const ChatTurn& turn : turns) {
    out.markup("<|im_start|>" + turn.role + "\n");
    out.content(turn.content);
    out.markup("<|im_end|>\n");
  }
  out.markup("<|im_start|>assistant\n");
}

void render_zephyr(PromptBuilder& out, const std::vector<ChatTurn>& turns) {
  for (const ChatTurn& turn : turns) {
    out.markup("<|" + turn.role + "|>\n");
    out.content(turn.content);
    out.markup("</s>\n");
  }
  out.markup("<|assistant|>\n");
}

// Gemma has only user and model turns; a system text opens the next user turn.
void render_gemma(PromptBuilder& out, const std::vector<ChatTurn>& turns) {
  SystemPreamble system;
  const auto user_turn = [&](const std::string& content) {
    out.markup("<start_of_turn>user\n");
    if (auto preamble = system.take()) {
      out.content(*preamble);
      out.markup("\n\n");
    }
    out.content(content);
    out.markup("<end_of_turn>\n");
  };
  for (const ChatTurn& turn : turns) {
    if (turn.role == "system") {
      system.add(turn.content);
    } else if (turn.role == "assistant") {
      out.markup("<start_of_turn>model\n");
      out.content(turn.content);
      out.markup("<end_of_turn>\n");
    } else {
      user_turn(turn.content);
    }
  }
  if (system.pending()) user_turn("");
  out.markup("<start_of_turn>model\n");
}

// For a model without a known template: one "Role: content" line per turn
// ("System:", "User:", "Assistant:", other roles capitalised likewise), then
// "Assistant:" for the model to continue.
void render_plain(PromptBuilder& out, const std::vector<ChatTurn>& turns) {
  for (const ChatTurn& turn : turns) {
    std::string role = turn.role;
    if (!role.empty() && role[0] >= 'a' && role[0] <= 'z') role[0] = static_cast<char>(role[0] - 'a' + 'A');
    out.markup(role + ": ");
    out.content(turn.content);
    out.markup("\n");
  }
  out.markup("Assistant:");
}

}  // namespace

ChatFormat detect_chat_format(const std::string& jinja_source) {
  if (contains(jinja_source, "<|start_header_id|>")) return ChatFormat::llama3;
  if (contains(jinja_source, "<|im_start|>")) return ChatFormat::chatml;
  if (contains(jinja_source, "<start_of_turn>")) return ChatFormat::gemma;
  // Zephyr ends turns with EOS, written literally or as eos_token; Phi-3
  // also has <|user|> but ends turns with <|end|>.
  if (contains(jinja_source, "<|user|>") && !contains(jinja_source, "<|end|>") &&
      (contains(jinja_source, "</s>") || contains(jinja_source, "eos_token"))) {
    return ChatFormat::zephyr;
  }
  if (contains(jinja_source, "[INST]")) return ChatFormat::llama2;
  return ChatFormat::plain;
}

const char* chat_format_name(ChatFormat format) {
  switch (format) {
    case ChatFormat::llama2:
      return "llama2";
    case ChatFormat::llama3:
      return "llama3";
    case ChatFormat::chatml:
      return "chatml";
    case ChatFormat::zephyr:
      return "zephyr";
    case ChatFormat::gemma:
      return "gemma";
    case ChatFormat::plain:
      return "plain";
  }
  return "plain";
}

bool chat_format_writes_bos(ChatFormat format) { return format == ChatFormat::llama2; }

std::vector<TextSegment> render_chat_segments(ChatFormat format, const std::vector<ChatTurn>& turns,
                                              const std::string& bos) {
  PromptBuilder out;
  switch (format) {
    case ChatFormat::llama2:
      render_llama2(out, turns, bos);
      break;
    case ChatFormat::llama3:
      render_llama3(out, turns);
      break;
    case ChatFormat::chatml:
      render_chatml(out, turns);
      break;
    case ChatFormat::zephyr:
      render_zephyr(out, turns);
      break;
    case ChatFormat::gemma:
      render_gemma(out, turns);
      break;
    case ChatFormat::plain:
      render_plain(out, turns);
      break;
  }
  return out.take();
}

std::string render_chat(ChatFormat format, const std::vector<ChatTurn>& turns, const std::string& bos) {
  std::string text;
  for (const auto& segment : render_chat_segments(format, turns, bos)) text += segment.text;
  return text;
}

}  // namespace tollgate::local_engine
