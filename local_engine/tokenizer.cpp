#include "local_engine/tokenizer.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <queue>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace tollgate::local_engine {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";    // U+2581, SentencePiece's space
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------
// UTF-8

enum class Utf8Status { complete, incomplete, invalid };

struct Utf8Scan {
  Utf8Status status;
  std::size_t length;  // complete: the sequence; invalid: the bytes one U+FFFD replaces
};

// Looks at the sequence starting at s[i] (Unicode's "maximal subpart" rule
// decides how many bytes of an ill-formed sequence one U+FFFD stands for).
Utf8Scan scan_utf8(std::string_view s, std::size_t i) {
  const auto lead = static_cast<unsigned char>(s[i]);
  if (lead < 0x80) return {Utf8Status::complete, 1};
  std::size_t continuation = 0;
  unsigned char low = 0x80;
  unsigned char high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    continuation = 1;
  } else if (lead == 0xE0) {
    continuation = 2;
    low = 0xA0;  // overlong below U+0800
  } else if (lead == 0xED) {
    continuation = 2;
    high = 0x9F;  // surrogates
  } else if (lead >= 0xE1 && lead <= 0xEF) {
    continuation = 2;
  } else if (lead == 0xF0) {
    continuation = 3;
    low = 0x90;  // overlong below U+10000
  } else if (lead >= 0xF1 && lead <= 0xF3) {
    continuation = 3;
  } else if (lead == 0xF4) {
    continuation = 3;
    high = 0x8F;  // above U+10FFFF
  } else {
    return {Utf8Status::invalid, 1};
  }
  for (std::size_t k = 1; k <= continuation; ++k) {
    if (i + k >= s.size()) return {Utf8Status::incomplete, k};
    const auto byte = static_cast<unsigned char>(s[i + k]);
    if (byte < low || byte > high) return {Utf8Status::invalid, k};
    low = 0x80;
    high = 0xBF;
  }
  return {Utf8Status::complete, continuation + 1};
}

char32_t decode_sequence(std::string_view s, std::size_t i, std::size_t length) {
  const auto lead = static_cast<unsigned char>(s[i]);
  if (length == 1) return lead;
  char32_t value = lead & (0x7F >> length);
  for (std::size_t k = 1; k < length; ++k) value = (value << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return value;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Appends the valid part of `bytes` to `out`, ill-formed sequences as U+FFFD;
// returns where an incomplete final sequence starts (bytes.size() if none).
// With `flush_incomplete` that tail is replaced too.
std::size_t append_valid_utf8(std::string& out, std::string_view bytes, bool flush_incomplete) {
  std::size_t i = 0;
  while (i < bytes.size()) {
    const Utf8Scan scan = scan_utf8(bytes, i);
    if (scan.status == Utf8Status::complete) {
      out.append(bytes.substr(i, scan.length));
    } else if (scan.status == Utf8Status::incomplete && !flush_incomplete) {
      return i;
    } else {
      out.append(kReplacement);
    }
    i += scan.length;
  }
  return bytes.size();
}

struct CodePoint {
  char32_t value;  // U+FFFD for a byte that is not valid UTF-8
  std::size_t offset;
};

// The code points of `text`; a final entry at text.size() marks the end.
std::vector<CodePoint> code_points(std::string_view text) {
  std::vector<CodePoint> out;
  out.reserve(text.size() + 1);
  std::size_t i = 0;
  while (i < text.size()) {
    const Utf8Scan scan = scan_utf8(text, i);
    if (scan.status == Utf8Status::complete) {
      out.push_back({decode_sequence(text, i, scan.length), i});
      i += scan.length;
    } else {
      out.push_back({U'\uFFFD', i});
      i += 1;
    }
  }
  out.push_back({0, text.size()});
  return out;
}

// ---------------------------------------------------------------------------
// Unicode categories for the pre-tokenizer. There is no Unicode database
// here, so \p{L} and \p{N} are approximated: ASCII is exact; beyond it the
// letters and digits of the common scripts (Latin, Greek, Cyrillic, Armenian,
// Hebrew, Arabic, Devanagari, Bengali, Thai, Georgian, Hangul, kana, CJK
// ideographs, fullwidth forms) count, in ranges that may include a few
// unassigned or symbol code points. Combining marks are not letters, as in
// Unicode. Whitespace is Unicode's White_Space property, exactly.

struct CodeRange {
  char32_t first;
  char32_t last;
};

constexpr CodeRange kLetterRanges[] = {
    {0x00AA, 0x00AA}, {0x00B5, 0x00B5}, {0x00BA, 0x00BA},   {0x00C0, 0x00D6},   {0x00D8, 0x00F6}, {0x00F8, 0x02C1},
    {0x02C6, 0x02D1}, {0x02E0, 0x02E4}, {0x02EC, 0x02EC},   {0x02EE, 0x02EE},   {0x0370, 0x0374}, {0x0376, 0x0377},
    {0x037A, 0x037D}, {0x037F, 0x037F}, {0x0386, 0x0386},   {0x0388, 0x03F5},   {0x03F7, 0x0481}, {0x048A, 0x052F},
    {0x0531, 0x0556}, {0x0559, 0x0559}, {0x0560, 0x0588},   {0x05D0, 0x05EA},   {0x05EF, 0x05F2}, {0x0620, 0x064A},
    {0x066E, 0x066F}, {0x0671, 0x06D3}, {0x06D5, 0x06D5},   {0x06E5, 0x06E6},   {0x06EE, 0x06EF}, {0x06FA, 0x06FC},
    {0x06FF, 0x06FF}, {0x0904, 0x0939}, {0x093D, 0x093D},   {0x0950, 0x0950},   {0x0958, 0x0961}, {0x0971, 0x0980},
    {0x0985, 0x09B9}, {0x0E01, 0x0E30}, {0x0E32, 0x0E33},   {0x0E40, 0x0E46},   {0x10A0, 0x10FA}, {0x10FC, 0x10FF},
    {0x1100, 0x11FF}, {0x1E00, 0x1FBC}, {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FCC},   {0x1FD0, 0x1FDB}, {0x1FE0, 0x1FEC},
    {0x1FF2, 0x1FFC}, {0x2C00, 0x2CE4}, {0x3005, 0x3006},   {0x3031, 0x3035},   {0x303B, 0x303C}, {0x3041, 0x3096},
    {0x309D, 0x309F}, {0x30A1, 0x30FA}, {0x30FC, 0x30FF},   {0x3105, 0x312F},   {0x3131, 0x318E}, {0x31A0, 0x31BF},
    {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0x9FFF},   {0xA000, 0xA48C},   {0xA640, 0xA66E}, {0xA722, 0xA788},
    {0xA78B, 0xA7FF}, {0xAC00, 0xD7A3}, {0xF900, 0xFAFF},   {0xFB00, 0xFB06},   {0xFE70, 0xFEFC}, {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A}, {0xFF66, 0xFFDC}, {0x20000, 0x2FA1F}, {0x30000, 0x3134F},
};

constexpr CodeRange kNumberRanges[] = {
    {0x00B2, 0x00B3}, {0x00B9, 0x00B9}, {0x00BC, 0x00BE}, {0x0660, 0x0669}, {0x06F0, 0x06F9}, {0x07C0, 0x07C9},
    {0x0966, 0x096F}, {0x09E6, 0x09EF}, {0x0E50, 0x0E59}, {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089},
    {0x2150, 0x2189}, {0x2460, 0x249B}, {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x3007, 0x3007}, {0x3021, 0x3029},
    {0x3038, 0x303A}, {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F}, {0x3251, 0x325F}, {0x3280, 0x3289},
    {0x32B1, 0x32BF}, {0xFF10, 0xFF19},
};

template <std::size_t N>
bool in_ranges(const CodeRange (&ranges)[N], char32_t cp) {
  const auto* it = std::upper_bound(std::begin(ranges), std::end(ranges), cp,
                                    [](char32_t value, const CodeRange& range) { return value < range.first; });
  return it != std::begin(ranges) && cp <= std::prev(it)->last;
}

bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
  return in_ranges(kLetterRanges, cp);
}

bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(kNumberRanges, cp);
}

bool is_whitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// ---------------------------------------------------------------------------
// GPT-2 pre-tokenizer: hand-written matchers for the regular expressions
//   gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//           ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   qwen2:  llama3 with \p{N} (single digits)
// Each alternative is tried in order at the current position, with the
// backtracking the regex engine would do spelled out.

enum class PreTokenizer { gpt2, llama3, qwen2 };

PreTokenizer pre_tokenizer_for(std::string_view pre) {
  if (pre == "llama-bpe" || pre == "llama3") return PreTokenizer::llama3;
  if (pre == "qwen2") return PreTokenizer::qwen2;
  return PreTokenizer::gpt2;
}

class WordMatcher {
 public:
  WordMatcher(const std::vector<CodePoint>& cps, PreTokenizer style) : cps_(cps), n_(cps.size() - 1), style_(style) {}

  // The end (code point index) of the word that starts at `i`.
  std::size_t match(std::size_t i) const {
    if (const std::size_t end = contraction(i); end != i) return end;
    if (style_ == PreTokenizer::gpt2) {
      const std::size_t k = i + (value(i) == U' ' ? 1 : 0);
      if (letter(k)) return run(k, &WordMatcher::letter);
      if (number(k)) return run(k, &WordMatcher::number);
      if (other(k)) return run(k, &WordMatcher::other);
    } else {
      if (letter(i)) return run(i, &WordMatcher::letter);
      if (!newline(i) && !number(i) && letter(i + 1)) return run(i + 1, &WordMatcher::letter);
      if (number(i)) {
        const std::size_t max_digits = style_ == PreTokenizer::llama3 ? 3 : 1;
        std::size_t k = i;
        while (k - i < max_digits && number(k)) ++k;
        return k;
      }
      const std::size_t k = i + (value(i) == U' ' ? 1 : 0);
      if (other(k)) return run(run(k, &WordMatcher::other), &WordMatcher::newline);
      // \s*[\r\n]+ : the whitespace run up to its last line break.
      for (std::size_t end = run(i, &WordMatcher::space); end > i; --end) {
        if (newline(end - 1)) return end;
      }
    }
    const std::size_t end = run(i, &WordMatcher::space);
    if (end == i) return i + 1;
    // \s+(?!\S) leaves the last space to the word that follows; else \s+.
    if (end < n_ && end - i > 1) return end - 1;
    return end;
  }

 private:
  char32_t value(std::size_t k) const { return k < n_ ? cps_[k].value : 0; }
  bool letter(std::size_t k) const { return k < n_ && is_letter(cps_[k].value); }
  bool number(std::size_t k) const { return k < n_ && is_number(cps_[k].value); }
  bool space(std::size_t k) const { return k < n_ && is_whitespace(cps_[k].value); }
  bool newline(std::size_t k) const { return k < n_ && (cps_[k].value == U'\r' || cps_[k].value == U'\n'); }
  bool other(std::size_t k) const { return k < n_ && !letter(k) && !number(k) && !space(k); }

  std::size_t run(std::size_t k, bool (WordMatcher::*predicate)(std::size_t) const) const {
    while ((this->*predicate)(k)) ++k;
    return k;
  }

  std::size_t contraction(std::size_t i) const {
    if (value(i) != U'\'' || i + 1 >= n_) return i;
    const bool fold_case = style_ != PreTokenizer::gpt2;
    const auto lower = [&](std::size_t k) {
      const char32_t c = value(k);
      return fold_case && c >= U'A' && c <= U'Z' ? c + 32 : c;
    };
    const char32_t first = lower(i + 1);
    if (first == U's' || first == U't' || first == U'm' || first == U'd') return i + 2;
    const char32_t second = i + 2 < n_ ? lower(i + 2) : 0;
    if ((first == U'r' && second == U'e') || (first == U'v' && second == U'e') || (first == U'l' && second == U'l')) {
      return i + 3;
    }
    return i;
  }

  const std::vector<CodePoint>& cps_;
  std::size_t n_;
  PreTokenizer style_;
};

std::vector<std::string_view> split_words(std::string_view text, PreTokenizer style) {
  const std::vector<CodePoint> cps = code_points(text);
  const WordMatcher matcher(cps, style);
  std::vector<std::string_view> words;
  const std::size_t n = cps.size() - 1;
  for (std::size_t i = 0; i < n;) {
    const std::size_t end = matcher.match(i);
    words.push_back(text.substr(cps[i].offset, cps[end].offset - cps[i].offset));
    i = end;
  }
  return words;
}

// GPT-2's reversible map from bytes to printable code points: printable
// Latin-1 bytes stand for themselves, the rest take U+0100 onwards.
std::array<char32_t, 256> gpt2_byte_to_unicode() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

// ---------------------------------------------------------------------------
// BPE over a linked list of symbols with a priority queue of adjacent pairs,
// as llama.cpp's llm_tokenizer_spm/bpe do. A queued pair whose symbols have
// changed since is stale: symbols only grow (or vanish), so their combined
// length no longer matches.

struct Symbol {
  std::size_t start;
  std::size_t length;  // 0 once merged into its left neighbour
  int prev;
  int next;
  std::int32_t id;  // sentencepiece: the piece; -1 for a byte-fallback symbol that never merges
};

template <typename Priority>
struct Bigram {
  Priority priority;  // score (higher first) or merge rank (lower first)
  int left;
  int right;
  std::size_t length;
  std::int32_t id;
};

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIndex = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

// Runs merges on `symbols` of `text`; `find_pair(text_of_left, text_of_right)`
// returns the merge's priority and resulting id, or nullopt.
template <typename Priority, typename Better, typename FindPair>
void merge_symbols(std::string_view text, std::vector<Symbol>& symbols, Better better, FindPair find_pair) {
  using Pair = Bigram<Priority>;
  const auto after = [&](const Pair& a, const Pair& b) {
    if (a.priority != b.priority) return better(b.priority, a.priority);
    return a.left > b.left;
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(after)> queue(after);
  const auto try_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[left];
    const Symbol& r = symbols[right];
    if (l.id < 0 || r.id < 0) return;
    const auto found = find_pair(text.substr(l.start, l.length), text.substr(r.start, r.length));
    if (found) queue.push(Pair{found->first, left, right, l.length + r.length, found->second});
  };
  for (int i = 1; i < static_cast<int>(symbols.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Pair pair = queue.top();
    queue.pop();
    Symbol& left = symbols[pair.left];
    Symbol& right = symbols[pair.right];
    if (left.length == 0 || right.length == 0 || left.length + right.length != pair.length) continue;
    left.length += right.length;
    left.id = pair.id;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = pair.left;
    try_add(left.prev, pair.left);
    try_add(pair.left, left.next);
  }
}

bool parse_byte_piece(std::string_view piece, unsigned char& byte) {
  if (piece.size() != 6 || !piece.starts_with("<0x") || piece[5] != '>') return false;
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    value *= 16;
    if (c >= '0' && c <= '9') {
      value += c - '0';
    } else if (c >= 'A' && c <= 'F') {
      value += c - 'A' + 10;
    } else {
      return false;
    }
  }
  byte = static_cast<unsigned char>(value);
  return true;
}

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (true) {
    const std::size_t found = text.find(from, i);
    out.append(text.substr(i, found - i));
    if (found == std::string_view::npos) break;
    out.append(to);
    i = found + from.size();
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------

struct Tokenizer::Impl {
  Vocabulary vocab;
  std::vector<TokenType> types;                                       // vocab.types, or derived when it has none
  StringIndex piece_ids;                                              // first id of each piece
  std::array<std::int32_t, 256> byte_ids{};                           // sentencepiece byte fallback, -1 when missing
  std::array<std::vector<std::int32_t>, 256> specials_by_first_byte;  // longest first
  // gpt2
  PreTokenizer pre = PreTokenizer::gpt2;
  bool ignore_merges = false;  // llama3: a word that is a piece is not merged
  StringIndex merge_ranks;     // "a b" -> rank
  std::array<char32_t, 256> byte_to_unicode{};
  std::array<std::int16_t, 324> unicode_to_byte{};  // GPT-2's map tops out at U+0143

  struct Fragment {
    std::string_view text;
    std::int32_t special = -1;
  };

  std::int32_t find_piece(std::string_view piece) const {
    const auto it = piece_ids.find(piece);
    return it == piece_ids.end() ? -1 : it->second;
  }

  bool valid_id(std::int32_t id) const { return id >= 0 && id < static_cast<std::int32_t>(vocab.pieces.size()); }

  std::vector<Fragment> split_special(std::string_view text, bool parse_special) const {
    std::vector<Fragment> fragments;
    if (!parse_special) {
      if (!text.empty()) fragments.push_back({text, -1});
      return fragments;
    }
    std::size_t raw_start = 0;
    for (std::size_t i = 0; i < text.size();) {
      std::int32_t match = -1;
      for (std::int32_t id : specials_by_first_byte[static_cast<unsigned char>(text[i])]) {
        if (text.substr(i).starts_with(vocab.pieces[id])) {
          match = id;
          break;
        }
      }
      if (match < 0) {
        ++i;
        continue;
      }
      if (i > raw_start) fragments.push_back({text.substr(raw_start, i - raw_start), -1});
      fragments.push_back({{}, match});
      i += vocab.pieces[match].size();
      raw_start = i;
    }
    if (raw_start < text.size()) fragments.push_back({text.substr(raw_start), -1});
    return fragments;
  }

  void encode_sentencepiece(std::string_view raw, bool space_prefix, std::vector<std::int32_t>& out) const {
    std::string text = space_prefix ? std::string(kSpaceMark) : std::string();
    text += replace_all(raw, " ", kSpaceMark);

    std::vector<Symbol> symbols;
    const auto add_symbol = [&](std::size_t start, std::size_t length, std::int32_t id) {
      const int index = static_cast<int>(symbols.size());
      symbols.push_back({start, length, index - 1, index + 1, id});
    };
    for (std::size_t i = 0; i < text.size();) {
      const Utf8Scan scan = scan_utf8(text, i);
      const std::size_t length = scan.status == Utf8Status::complete ? scan.length : 1;
      if (const std::int32_t id = find_piece(std::string_view(text).substr(i, length)); id >= 0) {
        add_symbol(i, length, id);
      } else {
        // Byte fallback: these tokens never merge, as in llama2.c, whose
        // merge lookups would see "<0xAB>" pieces.
        for (std::size_t k = i; k < i + length; ++k) add_symbol(k, 1, -1);
      }
      i += length;
    }
    if (symbols.empty()) return;
    symbols.back().next = -1;

    merge_symbols<float>(
        text, symbols, std::greater<float>{},
        [&](std::string_view left, std::string_view right) -> std::optional<std::pair<float, std::int32_t>> {
          // Adjacent symbols are adjacent in `text`: the pair is one view.
          const std::string_view both(left.data(), left.size() + right.size());
          const std::int32_t id = find_piece(both);
          if (id < 0) return std::nullopt;
          return std::pair{vocab.scores[id], id};
        });

    for (int i = 0; i >= 0 && i < static_cast<int>(symbols.size()); i = symbols[i].next) {
      const Symbol& symbol = symbols[i];
      if (symbol.id >= 0) {
        out.push_back(symbol.id);
        continue;
      }
      const std::int32_t byte_id = byte_ids[static_cast<unsigned char>(text[symbol.start])];
      if (byte_id >= 0) {
        out.push_back(byte_id);
      } else if (vocab.unk >= 0) {
        out.push_back(vocab.unk);
      }
    }
  }

  void encode_gpt2(std::string_view raw, std::vector<std::int32_t>& out) const {
    std::string mapped;
    std::string key;
    for (std::string_view word : split_words(raw, pre)) {
      mapped.clear();
      for (char c : word) append_utf8(mapped, byte_to_unicode[static_cast<unsigned char>(c)]);
      if (ignore_merges) {
        if (const std::int32_t id = find_piece(mapped); id >= 0) {
          out.push_back(id);
          continue;
        }
      }
      std::vector<Symbol> symbols;
      for (std::size_t i = 0; i < mapped.size();) {
        const std::size_t length = scan_utf8(mapped, i).length;
        const int index = static_cast<int>(symbols.size());
        symbols.push_back({i, length, index - 1, index + 1, 0});
        i += length;
      }
      symbols.back().next = -1;
      merge_symbols<std::int32_t>(
          mapped, symbols, std::less<std::int32_t>{},
          [&](std::string_view left, std::string_view right) -> std::optional<std::pair<std::int32_t, std::int32_t>> {
            key.assign(left);
            key += ' ';
            key.append(right);
            const auto it = merge_ranks.find(key);
            if (it == merge_ranks.end()) return std::nullopt;
            return std::pair{it->second, 0};
          });
      for (int i = 0; i >= 0; i = symbols[i].next) {
        const std::string_view text = std::string_view(mapped).substr(symbols[i].start, symbols[i].length);
        if (const std::int32_t id = find_piece(text); id >= 0) {
          out.push_back(id);
          continue;
        }
        // A merge without its piece (a broken vocabulary): one token per character.
        for (std::size_t k = 0; k < text.size();) {
          const std::size_t length = scan_utf8(text, k).length;
          const std::int32_t id = find_piece(text.substr(k, length));
          if (id >= 0) {
            out.push_back(id);
          } else if (vocab.unk >= 0) {
            out.push_back(vocab.unk);
          }
          k += length;
        }
      }
    }
  }

  std::string gpt2_bytes(std::string_view piece) const {
    std::string out;
    const std::vector<CodePoint> cps = code_points(piece);
    for (std::size_t i = 0; i + 1 < cps.size(); ++i) {
      const char32_t cp = cps[i].value;
      if (cp < unicode_to_byte.size() && unicode_to_byte[cp] >= 0) {
        out += static_cast<char>(unicode_to_byte[cp]);
      } else {
        out.append(piece.substr(cps[i].offset, cps[i + 1].offset - cps[i].offset));
      }
    }
    return out;
  }
};

Tokenizer::Tokenizer(Vocabulary vocab) : impl_(std::make_unique<Impl>()) {
  Impl& impl = *impl_;
  const std::size_t n = vocab.pieces.size();
  if (n == 0) throw std::invalid_argument("tokenizer: the vocabulary has no pieces");
  if (n > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
    throw std::invalid_argument("tokenizer: the vocabulary is too large");
  if (!vocab.types.empty() && vocab.types.size() != n) {
    throw std::invalid_argument("tokenizer: " + std::to_string(vocab.types.size()) + " token types for " +
                                std::to_string(n) + " pieces");
  }
  if (vocab.kind == TokenizerKind::sentencepiece) {
    if (vocab.scores.size() != n) {
      throw std::invalid_argument("tokenizer: " + std::to_string(vocab.scores.size()) + " scores for " +
                                  std::to_string(n) + " pieces");
    }
    if (!std::all_of(vocab.scores.begin(), vocab.scores.end(), [](float s) { return std::isfinite(s); })) {
      throw std::invalid_argument("tokenizer: a score is not finite");
    }
  }
  const auto check_id = [&](std::int32_t id, const char* what) {
    if (id < -1 || id >= static_cast<std::int32_t>(n)) {
      throw std::invalid_argument(std::string("tokenizer: ") + what + " id " + std::to_string(id) +
                                  " is outside the vocabulary");
    }
  };
  check_id(vocab.bos, "BOS");
  check_id(vocab.eos, "EOS");
  check_id(vocab.unk, "unknown-token");
  if (vocab.eot) check_id(*vocab.eot, "end-of-turn");
  if (vocab.eot && *vocab.eot < 0) vocab.eot.reset();

  impl.types = vocab.types;
  if (impl.types.empty()) {
    // Without types the special ids still must not print.
    impl.types.assign(n, TokenType::normal);
    unsigned char byte = 0;
    for (std::size_t id = 0; id < n; ++id) {
      if (vocab.kind == TokenizerKind::sentencepiece && parse_byte_piece(vocab.pieces[id], byte)) {
        impl.types[id] = TokenType::byte;
      }
    }
    for (std::int32_t id : {vocab.bos, vocab.eos, vocab.eot.value_or(-1)}) {
      if (id >= 0) impl.types[id] = TokenType::control;
    }
    if (vocab.unk >= 0) impl.types[vocab.unk] = TokenType::unknown;
  }

  impl.piece_ids.reserve(n);
  impl.byte_ids.fill(-1);
  for (std::size_t id = 0; id < n; ++id) {
    const auto token = static_cast<std::int32_t>(id);
    impl.piece_ids.emplace(vocab.pieces[id], token);
    unsigned char byte = 0;
    if (impl.types[id] == TokenType::byte && parse_byte_piece(vocab.pieces[id], byte) && impl.byte_ids[byte] < 0) {
      impl.byte_ids[byte] = token;
    }
    const bool special = impl.types[id] == TokenType::control || impl.types[id] == TokenType::user_defined;
    if (special && !vocab.pieces[id].empty()) {
      impl.specials_by_first_byte[static_cast<unsigned char>(vocab.pieces[id][0])].push_back(token);
    }
  }
  for (auto& candidates : impl.specials_by_first_byte) {
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](std::int32_t a, std::int32_t b) { return vocab.pieces[a].size() > vocab.pieces[b].size(); });
  }

  if (vocab.kind == TokenizerKind::gpt2) {
    impl.pre = pre_tokenizer_for(vocab.pre);
    impl.ignore_merges = impl.pre == PreTokenizer::llama3;
    impl.merge_ranks.reserve(vocab.merges.size());
    for (std::size_t rank = 0; rank < vocab.merges.size(); ++rank) {
      const std::string& merge = vocab.merges[rank];
      const std::size_t space = merge.find(' ', 1);
      if (space == std::string::npos || space + 1 >= merge.size()) {
        throw std::invalid_argument("tokenizer: merge " + std::to_string(rank) + " (\"" + merge +
                                    "\") is not two pieces separated by a space");
      }
      impl.merge_ranks.emplace(merge, static_cast<std::int32_t>(rank));
    }
    impl.byte_to_unicode = gpt2_byte_to_unicode();
    impl.unicode_to_byte.fill(-1);
    for (int b = 0; b < 256; ++b) impl.unicode_to_byte[impl.byte_to_unicode[b]] = static_cast<std::int16_t>(b);
  }
  impl.vocab = std::move(vocab);
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  return encode(std::vector<TextSegment>{{std::string(text), parse_special}}, add_bos);
}

std::vector<std::int32_t> Tokenizer::encode(const std::vector<TextSegment>& segments, bool add_bos) const {
  const Impl& impl = *impl_;
  std::vector<std::int32_t> out;
  if (add_bos && impl.vocab.bos >= 0) out.push_back(impl.vocab.bos);
  // llama.cpp's rule: the space prefix goes before text at the start and
  // after each special token, as SentencePiece sees each such run alone.
  bool after_special = true;
  std::string run;  // ordinary text since the last special token, across segments
  const auto flush = [&] {
    if (run.empty()) return;
    if (impl.vocab.kind == TokenizerKind::sentencepiece) {
      impl.encode_sentencepiece(run, impl.vocab.add_space_prefix && after_special, out);
    } else {
      impl.encode_gpt2(run, out);
    }
    run.clear();
    after_special = false;
  };
  for (const TextSegment& segment : segments) {
    for (const Impl::Fragment& fragment : impl.split_special(segment.text, segment.parse_special)) {
      if (fragment.special < 0) {
        run.append(fragment.text);
        continue;
      }
      flush();
      out.push_back(fragment.special);
      after_special = true;
    }
  }
  flush();
  return out;
}

std::string Tokenizer::token_bytes(std::int32_t id) const {
  const Impl& impl = *impl_;
  if (!impl.valid_id(id)) return {};
  const std::string& piece = impl.vocab.pieces[id];
  switch (impl.types[id]) {
    case TokenType::control:
    case TokenType::unknown:
    case TokenType::unused:
      return {};
    case TokenType::user_defined:
      return piece;
    case TokenType::byte:
      if (unsigned char byte = 0; impl.vocab.kind == TokenizerKind::sentencepiece && parse_byte_piece(piece, byte)) {
        return std::string(1, static_cast<char>(byte));
      }
      break;
    case TokenType::normal:
      break;
  }
  if (impl.vocab.kind == TokenizerKind::gpt2) return impl.gpt2_bytes(piece);
  return replace_all(piece, kSpaceMark, " ");
}

std::string Tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  const bool sentencepiece = impl_->vocab.kind == TokenizerKind::sentencepiece;
  std::string bytes;
  std::int32_t previous = -1;
  for (std::int32_t id : ids) {
    std::string piece = token_bytes(id);
    if (sentencepiece && previous == impl_->vocab.bos && previous >= 0 && piece.starts_with(' ')) piece.erase(0, 1);
    bytes += piece;
    previous = id;
  }
  std::string out;
  append_valid_utf8(out, bytes, true);
  return out;
}

bool Tokenizer::ends_generation(std::int32_t id) const {
  return (id >= 0 && id == impl_->vocab.eos) || (impl_->vocab.eot && id == *impl_->vocab.eot);
}

const Vocabulary& Tokenizer::vocabulary() const { return impl_->vocab; }

std::int32_t Tokenizer::size() const { return static_cast<std::int32_t>(impl_->vocab.pieces.size()); }

// ---------------------------------------------------------------------------

TextStream::TextStream(const Tokenizer& tokenizer, bool after_bos)
    : tokenizer_(&tokenizer), strip_space_(after_bos && tokenizer.vocabulary().kind == TokenizerKind::sentencepiece) {}

std::string TextStream::push(std::int32_t id) {
  const Vocabulary& vocab = tokenizer_->vocabulary();
  std::string piece = tokenizer_->token_bytes(id);
  if (strip_space_ && piece.starts_with(' ')) piece.erase(0, 1);
  strip_space_ = vocab.kind == TokenizerKind::sentencepiece && vocab.bos >= 0 && id == vocab.bos;
  pending_ += piece;
  std::string out;
  const std::size_t held = append_valid_utf8(out, pending_, false);
  pending_.erase(0, held);
  return out;
}

std::string TextStream::finish() {
  std::string out;
  append_valid_utf8(out, pending_, true);
  pending_.clear();
  return out;
}

// ---------------------------------------------------------------------------

std::string valid_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  append_valid_utf8(out, bytes, true);
  return out;
}

Vocabulary load_llama2c_tokenizer(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("llama2.c tokenizer " + path + ": cannot open the file");
  // Far above any real vocabulary; keeps a wrong path from filling memory.
  constexpr std::streamoff kMaxFileSize = 256 << 20;
  file.seekg(0, std::ios::end);
  const std::streamoff size = file.tellg();
  if (size < 0 || size > kMaxFileSize) {
    throw std::runtime_error("llama2.c tokenizer " + path + ": not a tokenizer file (size " + std::to_string(size) +
                             ")");
  }
  file.seekg(0);
  std::string data(static_cast<std::size_t>(size), '\0');
  if (!file.read(data.data(), size)) throw std::runtime_error("llama2.c tokenizer " + path + ": read failed");

  std::size_t offset = 0;
  const auto fail = [&](const std::string& why) {
    throw std::runtime_error("llama2.c tokenizer " + path + ": " + why + " (at byte " + std::to_string(offset) + ")");
  };
  const auto read = [&](void* out, std::size_t bytes, const std::string& what) {
    if (data.size() - offset < bytes) fail("truncated in " + what);
    std::memcpy(out, data.data() + offset, bytes);
    offset += bytes;
  };

  std::int32_t max_token_length = 0;
  read(&max_token_length, sizeof max_token_length, "the header");
  if (max_token_length <= 0 || max_token_length > (1 << 16)) {
    fail("implausible max_token_length " + std::to_string(max_token_length));
  }

  Vocabulary vocab;
  vocab.kind = TokenizerKind::sentencepiece;
  while (offset < data.size()) {
    const std::string what = "token " + std::to_string(vocab.pieces.size());
    float score = 0;
    std::int32_t length = 0;
    read(&score, sizeof score, what);
    read(&length, sizeof length, what);
    if (!std::isfinite(score)) fail(what + " has a score that is not finite");
    if (length < 0 || length > max_token_length) {
      fail(what + " has length " + std::to_string(length) + ", outside 0.." + std::to_string(max_token_length));
    }
    std::string piece(static_cast<std::size_t>(length), '\0');
    read(piece.data(), piece.size(), what);
    vocab.pieces.push_back(replace_all(piece, " ", kSpaceMark));
    vocab.scores.push_back(score);
  }
  if (vocab.pieces.size() < 3) fail("only " + std::to_string(vocab.pieces.size()) + " tokens, need unk, BOS and EOS");

  vocab.unk = 0;
  vocab.bos = 1;
  vocab.eos = 2;
  vocab.types.assign(vocab.pieces.size(), TokenType::normal);
  vocab.types[0] = TokenType::unknown;
  vocab.types[1] = TokenType::control;
  vocab.types[2] = TokenType::control;
  // The exporter wrote BOS/EOS as "\n<s>\n"; keep SentencePiece's "<s>" so
  // parse_special finds them in text.
  for (std::size_t id = 0; id < 3; ++id) {
    std::string& piece = vocab.pieces[id];
    const std::size_t first = piece.find_first_not_of("\n\r\t ");
    const std::size_t last = piece.find_last_not_of("\n\r\t ");
    piece = first == std::string::npos ? std::string() : piece.substr(first, last - first + 1);
  }
  for (std::size_t id = 3; id < vocab.pieces.size(); ++id) {
    if (unsigned char byte = 0; parse_byte_piece(vocab.pieces[id], byte)) vocab.types[id] = TokenType::byte;
  }
  return vocab;
}

std::vector<std::string_view> pre_tokenize(std::string_view text, std::string_view pre) {
  return split_words(text, pre_tokenizer_for(pre));
}

}  // namespace tollgate::local_engine
