// Chat messages to a prompt, in the format a model was tuned on: the common
// templates are recognised from GGUF's tokenizer.chat_template source.
#pragma once

#include <string>
#include <vector>

#include "local_engine/tokenizer.hpp"

namespace tollgate::local_engine {

struct ChatTurn {
  std::string role;  // system | user | assistant | ...
  std::string content;
};

enum class ChatFormat { llama2, llama3, chatml, zephyr, gemma, plain };

// Recognises a template by its markers; `plain` when empty or unknown.
ChatFormat detect_chat_format(const std::string& jinja_source);
const char* chat_format_name(ChatFormat format);

// Whether render_chat writes BOS itself (llama2), so the prompt is encoded
// without adding another.
bool chat_format_writes_bos(ChatFormat format);

// The prompt, ending with the assistant's opening so generation answers, as
// segments for Tokenizer::encode: the template's markers are special tokens,
// the turns' contents never are (a user who writes "<|im_end|>" gets text, not
// a turn boundary). `bos` is the vocabulary's BOS piece where a format writes
// it itself (llama2's "<s>").
std::vector<TextSegment> render_chat_segments(ChatFormat format, const std::vector<ChatTurn>& turns,
                                              const std::string& bos);
// The same prompt as one string (for display and tests).
std::string render_chat(ChatFormat format, const std::vector<ChatTurn>& turns, const std::string& bos);

}  // namespace tollgate::local_engine
