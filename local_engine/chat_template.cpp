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

// <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
std::string render_llama2(const std::vector<ChatTurn>& turns, const std::string& bos) {
  std::string out;
  SystemPreamble system;
  const auto user_turn = [&](const std::string& content) {
    out += bos + "[INST] ";
    if (auto preamble = system.take()) out += "<<SYS>>\n" + *preamble + "\n<</SYS>>\n\n";
    out += content + " [/INST]";
  };
  for (const ChatTurn& turn : turns) {
    if (turn.role == "system") {
      system.add(turn.content);
    } else if (turn.role == "assistant") {
      out += " " + turn.content + " </s>";
    } else {
      user_turn(turn.content);
    }
  }
  if (system.pending() || out.empty()) user_turn("");
  return out;
}

// <|begin_of_text|> is BOS, which the encoder adds.
std::string render_llama3(const std::vector<ChatTurn>& turns) {
  std::string out;
  for (const ChatTurn& turn : turns) {
    out += "<|start_header_id|>" + turn.role + "<|end_header_id|>\n\n" + turn.content + "<|eot_id|>";
  }
  return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
}

std::string render_chatml(const std::vector<ChatTurn>& turns) {
  std::string out;
  for (const ChatTurn& turn : turns) out += "<|im_start|>" + turn.role + "\n" + turn.content + "<|im_end|>\n";
  return out + "<|im_start|>assistant\n";
}

std::string render_zephyr(const std::vector<ChatTurn>& turns) {
  std::string out;
  for (const ChatTurn& turn : turns) out += "<|" + turn.role + "|>\n" + turn.content + "</s>\n";
  return out + "<|assistant|>\n";
}

// Gemma has only user and model turns; a system text opens the next user turn.
std::string render_gemma(const std::vector<ChatTurn>& turns) {
  std::string out;
  SystemPreamble system;
  const auto user_turn = [&](const std::string& content) {
    out += "<start_of_turn>user\n";
    if (auto preamble = system.take()) out += *preamble + "\n\n";
    out += content + "<end_of_turn>\n";
  };
  for (const ChatTurn& turn : turns) {
    if (turn.role == "system") {
      system.add(turn.content);
    } else if (turn.role == "assistant") {
      out += "<start_of_turn>model\n" + turn.content + "<end_of_turn>\n";
    } else {
      user_turn(turn.content);
    }
  }
  if (system.pending()) user_turn("");
  return out + "<start_of_turn>model\n";
}

// For a model without a known template: one "Role: content" line per turn
// ("System:", "User:", "Assistant:", other roles capitalised likewise), then
// "Assistant:" for the model to continue.
std::string render_plain(const std::vector<ChatTurn>& turns) {
  std::string out;
  for (const ChatTurn& turn : turns) {
    std::string role = turn.role;
    if (!role.empty() && role[0] >= 'a' && role[0] <= 'z') role[0] = static_cast<char>(role[0] - 'a' + 'A');
    out += role + ": " + turn.content + "\n";
  }
  return out + "Assistant:";
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

std::string render_chat(ChatFormat format, const std::vector<ChatTurn>& turns, const std::string& bos) {
  switch (format) {
    case ChatFormat::llama2:
      return render_llama2(turns, bos);
    case ChatFormat::llama3:
      return render_llama3(turns);
    case ChatFormat::chatml:
      return render_chatml(turns);
    case ChatFormat::zephyr:
      return render_zephyr(turns);
    case ChatFormat::gemma:
      return render_gemma(turns);
    case ChatFormat::plain:
      return render_plain(turns);
  }
  return render_plain(turns);
}

}  // namespace tollgate::local_engine
