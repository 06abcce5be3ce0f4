#include "local_engine/tokenizer.hpp"

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>

namespace {

using tollgate::local_engine::load_llama2c_tokenizer;
using tollgate::local_engine::pre_tokenize;
using tollgate::local_engine::TextStream;
using tollgate::local_engine::Tokenizer;
using tollgate::local_engine::TokenizerKind;
using tollgate::local_engine::TokenType;
using tollgate::local_engine::Vocabulary;
using Ids = std::vector<std::int32_t>;
using Words = std::vector<std::string_view>;

const std::string kModels = TOLLGATE_SOURCE_DIR "/../shared/models/";

std::string read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  REQUIRE(file);
  std::ostringstream out;
  out << file.rdbuf();
  return out.str();
}

// A reference .ids file: ids separated by spaces, then the generator's
// "achieved tok/s: ..." line, which is not ids.
Ids read_reference_ids(const std::string& path) {
  std::istringstream in(read_file(path));
  Ids ids;
  std::string word;
  while (in >> word && word.find_first_not_of("0123456789") == std::string::npos) ids.push_back(std::stoi(word));
  return ids;
}

const Tokenizer& tok512() {
  static const Tokenizer tokenizer(load_llama2c_tokenizer(kModels + "tok512.bin"));
  return tokenizer;
}

const Tokenizer& llama2() {
  static const Tokenizer tokenizer(load_llama2c_tokenizer(kModels + "llama2-tokenizer.bin"));
  return tokenizer;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// llama2.c run.c's encode(), transcribed as plainly as possible: BOS, the
// dummy-prefix token, one token per UTF-8 character (else one per byte, id
// byte + 3), then merge the best-scoring adjacent pair (leftmost on ties)
// by rescanning until no pair is a piece.
Ids run_c_encode(const Vocabulary& vocab, const std::string& text) {
  std::map<std::string, std::int32_t> lookup;
  for (std::size_t id = 0; id < vocab.pieces.size(); ++id) lookup.emplace(vocab.pieces[id], std::int32_t(id));
  Ids tokens{1};
  if (text.empty()) return tokens;
  tokens.push_back(lookup.at("\xE2\x96\x81"));
  const std::string s = replace_all(text, " ", "\xE2\x96\x81");
  for (std::size_t i = 0; i < s.size();) {
    std::size_t length = 1;
    while (i + length < s.size() && length < 4 && (static_cast<unsigned char>(s[i + length]) & 0xC0) == 0x80) ++length;
    const auto found = lookup.find(s.substr(i, length));
    if (found != lookup.end()) {
      tokens.push_back(found->second);
    } else {
      for (std::size_t k = i; k < i + length; ++k) tokens.push_back(static_cast<unsigned char>(s[k]) + 3);
    }
    i += length;
  }
  while (true) {
    float best_score = -1e10f;
    std::int32_t best_id = -1;
    std::size_t best_index = 0;
    for (std::size_t i = 1; i + 1 < tokens.size(); ++i) {
      const auto found = lookup.find(vocab.pieces[tokens[i]] + vocab.pieces[tokens[i + 1]]);
      if (found != lookup.end() && vocab.scores[found->second] > best_score) {
        best_score = vocab.scores[found->second];
        best_id = found->second;
        best_index = i;
      }
    }
    if (best_id < 0) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + std::ptrdiff_t(best_index) + 1);
  }
  return tokens;
}

const std::vector<std::string> kSampleTexts = {
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "multi\nline\n\ntext\twith tabs\r\nand CRLF",
    "emoji: \xF0\x9F\x98\x80\xF0\x9F\x8E\x89 and \xF0\x9F\xA7\xAA!",
    "CJK: \xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C \xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1"
    "\xE3\x81\xAF",
    "accents: caf\xC3\xA9 na\xC3\xAFve \xC3\x85ngstr\xC3\xB6m",
    "<s> and </s> as plain text",
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
};

std::filesystem::path write_temp_file(const std::string& name, const std::string& bytes) {
  const auto path = std::filesystem::temp_directory_path() / ("tollgate_tokenizer_test_" + name);
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

template <typename T>
std::string raw_bytes(T value) {
  return std::string(reinterpret_cast<const char*>(&value), sizeof value);
}

std::string llama2c_record(float score, const std::string& piece) {
  return raw_bytes(score) + raw_bytes(std::int32_t(piece.size())) + piece;
}

std::string minimal_llama2c_file() {
  return raw_bytes(std::int32_t(7)) + llama2c_record(0, "<unk>") + llama2c_record(0, "\n<s>\n") +
         llama2c_record(0, "\n</s>\n") + llama2c_record(-1, " a");
}

}  // namespace

TEST_CASE("llama2.c tokenizer file loads as a SentencePiece vocabulary", "[tokenizer]") {
  const Vocabulary& vocab = tok512().vocabulary();
  CHECK(vocab.kind == TokenizerKind::sentencepiece);
  REQUIRE(tok512().size() == 512);
  CHECK(vocab.pieces[0] == "<unk>");
  CHECK(vocab.pieces[1] == "<s>");
  CHECK(vocab.pieces[2] == "</s>");
  CHECK(vocab.pieces[13] == "<0x0A>");
  CHECK(vocab.pieces[259] == "\xE2\x96\x81t");  // " t" in the file
  CHECK(vocab.scores[260] == -1.0f);
  CHECK(vocab.types[0] == TokenType::unknown);
  CHECK(vocab.types[1] == TokenType::control);
  CHECK(vocab.types[2] == TokenType::control);
  CHECK(vocab.types[3] == TokenType::byte);
  CHECK(vocab.types[258] == TokenType::byte);
  CHECK(vocab.types[259] == TokenType::normal);
  CHECK(vocab.bos == 1);
  CHECK(vocab.eos == 2);
  CHECK(vocab.unk == 0);
  CHECK(llama2().size() == 32000);
  CHECK(llama2().vocabulary().pieces[29871] == "\xE2\x96\x81");
}

TEST_CASE("malformed llama2.c tokenizer files are rejected with a reason", "[tokenizer]") {
  const std::string good = minimal_llama2c_file();
  const auto good_path = write_temp_file("good", good);
  const Vocabulary minimal = load_llama2c_tokenizer(good_path.string());
  std::filesystem::remove(good_path);
  CHECK(minimal.pieces == std::vector<std::string>{"<unk>", "<s>", "</s>",
                                                   "\xE2\x96\x81"
                                                   "a"});

  const auto rejects = [](const std::string& name, const std::string& bytes, const std::string& reason) {
    const auto path = write_temp_file(name, bytes);
    CHECK_THROWS_WITH(load_llama2c_tokenizer(path.string()), Catch::Contains(reason));
    std::filesystem::remove(path);
  };
  rejects("empty", "", "truncated in the header");
  rejects("short_header", std::string("\x07\x00", 2), "truncated in the header");
  rejects("truncated_piece", good.substr(0, good.size() - 1), "truncated in token 3");
  rejects("truncated_length", good.substr(0, good.size() - 4), "truncated in token 3");
  rejects("negative_length", good + raw_bytes(0.0f) + raw_bytes(std::int32_t(-5)), "length -5");
  rejects("huge_length", good + raw_bytes(0.0f) + raw_bytes(std::int32_t(0x7FFFFFFF)), "length 2147483647");
  rejects("bad_max_length", raw_bytes(std::int32_t(-1)) + good.substr(4), "max_token_length -1");
  rejects("too_few_tokens", raw_bytes(std::int32_t(7)) + llama2c_record(0, "<unk>"), "need unk, BOS and EOS");
  rejects("nan_score", good + llama2c_record(std::numeric_limits<float>::quiet_NaN(), "b"), "not finite");
  CHECK_THROWS_WITH(load_llama2c_tokenizer(kModels + "no-such-file.bin"), Catch::Contains("cannot open"));
}

TEST_CASE("a vocabulary the tokenizer cannot use is rejected", "[tokenizer]") {
  Vocabulary vocab = load_llama2c_tokenizer(kModels + "tok512.bin");
  SECTION("scores missing") {
    vocab.scores.pop_back();
    CHECK_THROWS_AS(Tokenizer(vocab), std::invalid_argument);
  }
  SECTION("BOS outside") {
    vocab.bos = 512;
    CHECK_THROWS_AS(Tokenizer(vocab), std::invalid_argument);
  }
  SECTION("types of the wrong length") {
    vocab.types.resize(3);
    CHECK_THROWS_AS(Tokenizer(vocab), std::invalid_argument);
  }
}

TEST_CASE("the reference prompt encodes to the reference ids", "[tokenizer]") {
  const Ids reference = read_reference_ids(kModels + "reference/stories260K-The_cat-t0-n256.ids");
  REQUIRE(reference.size() == 212);
  // " The", " c", "at" are the prompt; the generation starts with " and".
  const Ids prompt(reference.begin(), reference.begin() + 3);
  CHECK(tok512().decode({1, prompt[0], prompt[1], prompt[2]}) == "The cat");
  CHECK(tok512().token_bytes(reference[3]) == " and");

  CHECK(tok512().encode("The cat", true) == Ids{1, 291, 280, 294});
  CHECK(tok512().encode("The cat", true) == Ids{1, prompt[0], prompt[1], prompt[2]});
  CHECK(tok512().encode("The cat", false) == Ids{291, 280, 294});
  CHECK(tok512().encode("", true) == Ids{1});
  CHECK(tok512().encode("", false).empty());
}

TEST_CASE("decoding the reference ids reproduces the reference text", "[tokenizer]") {
  // The generator ends its output with one newline of its own, after the
  // last token; the decoded ids are the text without it.
  for (const std::string name : {"stories260K-The_cat-t0-n256", "stories260K-no-prompt-t0-n256"}) {
    INFO(name);
    Ids ids{1};
    const Ids reference = read_reference_ids(kModels + "reference/" + name + ".ids");
    REQUIRE(reference.size() > 200);
    ids.insert(ids.end(), reference.begin(), reference.end());
    const std::string text = read_file(kModels + "reference/" + name + ".txt");
    REQUIRE(text.ends_with('\n'));
    const std::string expected = text.substr(0, text.size() - 1);
    CHECK(tok512().decode(ids) == expected);

    TextStream stream(tok512(), true);
    std::string streamed;
    for (std::size_t i = 1; i < ids.size(); ++i) streamed += stream.push(ids[i]);
    streamed += stream.finish();
    CHECK(streamed == expected);
  }
  CHECK(read_file(kModels + "reference/stories260K-no-prompt-t0-n256.txt").starts_with("Once upon a time, there was"));
}

TEST_CASE("Llama 2 vocabulary gives the known SentencePiece ids", "[tokenizer]") {
  CHECK(llama2().encode("Hello world", true) == Ids{1, 15043, 3186});
  CHECK(llama2().encode("hello", true) == Ids{1, 22172});
  // No piece for the test tube emoji: "▁", then its four bytes (id = byte + 3).
  CHECK(llama2().encode("\xF0\x9F\xA7\xAA", true) == Ids{1, 29871, 243, 162, 170, 173});
  CHECK(tok512().encode("\xF0\x9F\xA7\xAA", false) == Ids{410, 243, 162, 170, 173});
}

TEST_CASE("SentencePiece encoding agrees with llama2.c's greedy rescan", "[tokenizer]") {
  std::vector<std::string> texts = kSampleTexts;
  std::string long_text;
  while (long_text.size() < 1500) long_text += kSampleTexts[long_text.size() % kSampleTexts.size()] + " ";
  texts.push_back(long_text);
  for (const Tokenizer* tokenizer : {&tok512(), &llama2()}) {
    for (const std::string& text : texts) {
      INFO(text);
      CHECK(tokenizer->encode(text, true) == run_c_encode(tokenizer->vocabulary(), text));
    }
  }
}

TEST_CASE("SentencePiece merges the best score first, the leftmost pair on ties", "[tokenizer]") {
  Vocabulary vocab;
  vocab.pieces = {"<unk>", "<s>", "</s>", "a", "b", "ab", "bb"};
  vocab.scores = {0, 0, 0, 0, 0, -1, -1};
  vocab.add_space_prefix = false;
  CHECK(Tokenizer(vocab).encode("abb", false) == Ids{5, 4});
  vocab.scores[6] = -0.5f;
  CHECK(Tokenizer(vocab).encode("abb", false) == Ids{3, 6});
  // No piece and no byte pieces: the unknown token.
  CHECK(Tokenizer(vocab).encode("acb", false) == Ids{3, 0, 4});
  CHECK(Tokenizer(vocab).decode({1, 3, 0, 4}) == "ab");
}

TEST_CASE("SentencePiece round trips text, with byte fallback", "[tokenizer]") {
  for (const Tokenizer* tokenizer : {&tok512(), &llama2()}) {
    for (const std::string& text : kSampleTexts) {
      INFO(text);
      CHECK(tokenizer->decode(tokenizer->encode(text, true)) == text);
    }
  }
  // A long prompt: the merge queue keeps this fast.
  std::string long_text;
  while (long_text.size() < 12000)
    long_text += "Tim and his friends played together, every day. \xE4\xB8\x96\xE7\x95\x8C\n";
  const Ids ids = llama2().encode(long_text, true);
  CHECK(ids.size() < long_text.size() / 2);
  CHECK(llama2().decode(ids) == long_text);
}

TEST_CASE("SentencePiece special tokens are parsed only when asked", "[tokenizer]") {
  const Tokenizer& tokenizer = llama2();
  const std::int32_t hi = 7251;  // "▁hi"
  REQUIRE(tokenizer.encode("hi", false) == Ids{hi});
  // The space prefix starts each run of text after a special token, as llama.cpp does.
  CHECK(tokenizer.encode("<s>hi</s>", false, true) == Ids{1, hi, 2});
  CHECK(tokenizer.encode("hi</s>hi", true, true) == Ids{1, hi, 2, hi});
  const Ids literal = tokenizer.encode("</s>", false, false);
  CHECK(literal.size() > 1);
  CHECK(std::find(literal.begin(), literal.end(), 2) == literal.end());
  CHECK(tokenizer.decode(literal) == " </s>");
  CHECK(tokenizer.decode({1, hi, 2}) == "hi");
}

TEST_CASE("token bytes and the end of generation", "[tokenizer]") {
  CHECK(tok512().token_bytes(1).empty());
  CHECK(tok512().token_bytes(2).empty());
  CHECK(tok512().token_bytes(0).empty());
  CHECK(tok512().token_bytes(13) == "\n");
  CHECK(tok512().token_bytes(291) == " The");
  CHECK(tok512().token_bytes(-1).empty());
  CHECK(tok512().token_bytes(512).empty());
  CHECK(tok512().ends_generation(2));
  CHECK_FALSE(tok512().ends_generation(1));
  CHECK_FALSE(tok512().ends_generation(291));
  // Only a piece directly after BOS loses its space.
  CHECK(tok512().decode({291, 1, 291, 291}) == " TheThe The");
}

TEST_CASE("TextStream emits only whole UTF-8 characters", "[tokenizer]") {
  const Tokenizer& tokenizer = llama2();
  const Ids bytes = {243, 162, 170, 173};  // F0 9F A7 AA: the test tube emoji

  SECTION("an emoji split across byte tokens comes out once, whole") {
    TextStream stream(tokenizer, false);
    CHECK(stream.push(15043) == " Hello");
    CHECK(stream.push(bytes[0]).empty());
    CHECK(stream.push(bytes[1]).empty());
    CHECK(stream.push(bytes[2]).empty());
    CHECK(stream.push(bytes[3]) == "\xF0\x9F\xA7\xAA");
    CHECK(stream.finish().empty());
  }
  SECTION("invalid bytes become U+FFFD") {
    TextStream stream(tokenizer, false);
    CHECK(stream.push(0xFF + 3) == "\xEF\xBF\xBD");
    CHECK(stream.push(0xE2 + 3).empty());              // could start a character
    CHECK(stream.push(3186) == "\xEF\xBF\xBD world");  // ... but did not
    CHECK(stream.push(0x80 + 3) == "\xEF\xBF\xBD");    // a lone continuation byte
    CHECK(stream.push(bytes[0]).empty());
    CHECK(stream.push(bytes[1]).empty());
    CHECK(stream.finish() == "\xEF\xBF\xBD");  // cut off at the end
  }
  SECTION("after BOS the first piece loses its leading space") {
    TextStream stream(tok512(), true);
    CHECK(stream.push(291) == "The");
    CHECK(stream.push(280) == " c");
  }
  SECTION("decode replaces invalid bytes too") {
    CHECK(tokenizer.decode({15043, 0xFF + 3, bytes[0]}) == " Hello\xEF\xBF\xBD\xEF\xBF\xBD");
  }
}

// ---------------------------------------------------------------------------
// GPT-2 byte-level BPE on a vocabulary built here.

namespace {

// GPT-2's byte-to-unicode table, written out again independently.
std::string gpt2_encode_bytes(std::string_view bytes) {
  std::string out;
  for (char c : bytes) {
    const auto b = static_cast<unsigned char>(c);
    unsigned cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174))) {
      unsigned shifted = 0;
      for (unsigned k = 0; k < b; ++k) {
        if (!((k >= 33 && k <= 126) || (k >= 161 && k <= 172) || (k >= 174))) ++shifted;
      }
      cp = 256 + shifted;
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

struct Gpt2Fixture {
  Vocabulary vocab;
  std::map<std::string, std::int32_t> ids;  // by raw text

  explicit Gpt2Fixture(const std::string& pre) {
    vocab.kind = TokenizerKind::gpt2;
    vocab.pre = pre;
    for (int b = 0; b < 256; ++b) add(std::string(1, static_cast<char>(b)));
    // Merges in rank order, each given as the raw texts of its two halves.
    const std::vector<std::pair<std::string, std::string>> merges = {
        {"h", "e"}, {"l", "l"},     {"he", "ll"}, {"hell", "o"}, {" ", "w"}, {"o", "r"},  {" w", "or"},
        {"l", "d"}, {" wor", "ld"}, {"b", "c"},   {"a", "b"},    {"1", "2"}, {"12", "3"}, {"123", "4"},
        {"'", "t"}, {"n", "'"},     {" ", " "},   {"\n", "\n"},  {"d", "o"}, {"do", "n"},
    };
    for (const auto& [left, right] : merges) {
      vocab.merges.push_back(gpt2_encode_bytes(left) + " " + gpt2_encode_bytes(right));
      add(left + right);
    }
    vocab.types.assign(vocab.pieces.size(), TokenType::normal);
    vocab.bos = add_special("<|begin_of_text|>");
    vocab.eos = add_special("<|end_of_text|>");
    vocab.eot = add_special("<|eot_id|>");
    vocab.unk = -1;
  }

  std::int32_t add(const std::string& raw) {
    const auto id = std::int32_t(vocab.pieces.size());
    vocab.pieces.push_back(gpt2_encode_bytes(raw));
    ids[raw] = id;
    return id;
  }

  std::int32_t add_special(const std::string& text) {
    const auto id = std::int32_t(vocab.pieces.size());
    vocab.pieces.push_back(text);
    vocab.types.push_back(TokenType::control);
    return id;
  }

  Ids of(std::initializer_list<std::string> raws) const {
    Ids out;
    for (const std::string& raw : raws) out.push_back(ids.at(raw));
    return out;
  }
};

}  // namespace

TEST_CASE("GPT-2 pre-tokenizer splits like its regular expressions", "[tokenizer][gpt2]") {
  SECTION("contractions: llama3 ignores case, GPT-2 does not") {
    CHECK(pre_tokenize("I'm don't WE'LL", "llama-bpe") == Words{"I", "'m", " don", "'t", " WE", "'LL"});
    CHECK(pre_tokenize("I'm don't WE'LL", "default") == Words{"I", "'m", " don", "'t", " WE", "'", "LL"});
  }
  SECTION("digits: three at a time for llama3, one for qwen2, a run for GPT-2") {
    CHECK(pre_tokenize("12345 67", "llama3") == Words{"123", "45", " ", "67"});
    CHECK(pre_tokenize("12345 67", "qwen2") == Words{"1", "2", "3", "4", "5", " ", "6", "7"});
    CHECK(pre_tokenize("12345 67", "gpt2") == Words{"12345", " 67"});
    CHECK(pre_tokenize("x1", "llama3") == Words{"x", "1"});
  }
  SECTION("spaces: the last of a run goes to the next word") {
    CHECK(pre_tokenize("a  b", "gpt2") == Words{"a", " ", " b"});
    CHECK(pre_tokenize("a   ", "gpt2") == Words{"a", "   "});
    CHECK(pre_tokenize("a  b", "llama3") == Words{"a", " ", " b"});
    CHECK(pre_tokenize("\tx", "llama3") == Words{"\tx"});
    CHECK(pre_tokenize("\tx", "gpt2") == Words{"\t", "x"});
  }
  SECTION("newlines: llama3 keeps a whitespace run up to its last line break") {
    CHECK(pre_tokenize("a\n\nb", "llama3") == Words{"a", "\n\n", "b"});
    CHECK(pre_tokenize("x  \n  y", "llama3") == Words{"x", "  \n", " ", " y"});
    CHECK(pre_tokenize("hi!!\n\nok", "llama3") == Words{"hi", "!!\n\n", "ok"});
    CHECK(pre_tokenize("hi!!\n\nok", "gpt2") == Words{"hi", "!!", "\n", "\n", "ok"});
  }
  SECTION("non-ASCII letters and symbols") {
    CHECK(pre_tokenize("h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C", "llama3") ==
          Words{"h\xC3\xA9llo", " \xE4\xB8\x96\xE7\x95\x8C"});
    CHECK(pre_tokenize("a \xF0\x9F\x8E\x89\xF0\x9F\x8E\x89 b", "llama3") ==
          Words{"a", " \xF0\x9F\x8E\x89\xF0\x9F\x8E\x89", " b"});
    CHECK(pre_tokenize("\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, 42", "gpt2") ==
          Words{"\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82", ",", " 42"});
  }
  CHECK(pre_tokenize("", "llama3").empty());
}

TEST_CASE("GPT-2 BPE applies merges by rank within words", "[tokenizer][gpt2]") {
  const Gpt2Fixture fixture("llama-bpe");
  const Tokenizer tokenizer(fixture.vocab);
  CHECK(tokenizer.encode("hello world", false) == fixture.of({"hello", " world"}));
  CHECK(tokenizer.encode("hello world", true) ==
        Ids{fixture.vocab.bos, fixture.ids.at("hello"), fixture.ids.at(" world")});
  // "b c" ranks before "a b".
  CHECK(tokenizer.encode("abc", false) == fixture.of({"a", "bc"}));
  CHECK(tokenizer.encode("ab", false) == fixture.of({"ab"}));
  // Merges do not cross the pre-tokenizer's words.
  CHECK(tokenizer.encode("1234", false) == fixture.of({"123", "4"}));
  CHECK(tokenizer.encode("don't", false) == fixture.of({"don", "'t"}));
  CHECK(tokenizer.encode("a  b", false) == fixture.of({"a", " ", " ", "b"}));
  CHECK(tokenizer.encode("a   b", false) == fixture.of({"a", "  ", " ", "b"}));
  CHECK(tokenizer.encode("a\n\nb", false) == fixture.of({"a", "\n\n", "b"}));

  const Gpt2Fixture gpt2("gpt2");
  const Tokenizer plain(gpt2.vocab);
  CHECK(plain.encode("1234", false) == gpt2.of({"1234"}));
}

TEST_CASE("GPT-2 special tokens and round trips", "[tokenizer][gpt2]") {
  const Gpt2Fixture fixture("llama3");
  const Tokenizer tokenizer(fixture.vocab);
  const std::int32_t bos = fixture.vocab.bos;
  const std::int32_t eot = *fixture.vocab.eot;

  const std::string chat = "<|begin_of_text|>hello<|eot_id|> world";
  CHECK(tokenizer.encode(chat, false, true) == Ids{bos, fixture.ids.at("hello"), eot, fixture.ids.at(" world")});
  const Ids literal = tokenizer.encode(chat, false, false);
  CHECK(std::find(literal.begin(), literal.end(), eot) == literal.end());
  CHECK(tokenizer.decode(literal) == chat);
  CHECK(tokenizer.decode(tokenizer.encode(chat, false, true)) == "hello world");

  CHECK(tokenizer.ends_generation(eot));
  CHECK(tokenizer.ends_generation(fixture.vocab.eos));
  CHECK_FALSE(tokenizer.ends_generation(bos));
  CHECK(tokenizer.token_bytes(fixture.ids.at(" world")) == " world");
  CHECK(tokenizer.token_bytes(eot).empty());

  for (const std::string& text : kSampleTexts) {
    INFO(text);
    CHECK(tokenizer.decode(tokenizer.encode(text, true)) == text);
  }
  std::string all_bytes_valid;
  for (int c = 0; c < 0x80; ++c) all_bytes_valid += static_cast<char>(c);
  all_bytes_valid += "\xC2\x80\xDF\xBF\xE0\xA0\x80\xEF\xBF\xBF\xF0\x90\x80\x80\xF4\x8F\xBF\xBF";
  CHECK(tokenizer.decode(tokenizer.encode(all_bytes_valid, false)) == all_bytes_valid);

  TextStream stream(tokenizer, true);
  std::string streamed;
  for (std::int32_t id : tokenizer.encode(" \xF0\x9F\xA7\xAA ok", false)) streamed += stream.push(id);
  CHECK(streamed == " \xF0\x9F\xA7\xAA ok");  // after_bos strips only for SentencePiece
}
