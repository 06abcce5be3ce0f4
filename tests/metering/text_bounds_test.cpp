#include "metering/text_bounds.hpp"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

using namespace tollgate::metering;

TEST_CASE("truncate_utf8 never cuts a multi-byte character in two", "[metering][text]") {
  CHECK(truncate_utf8("abc", 10) == "abc");
  CHECK(truncate_utf8("abcdef", 3) == "abc");
  const std::string euro = "\xE2\x82\xAC";  // 3 bytes
  const std::string s = "a" + euro + euro;  // 7 bytes
  CHECK(truncate_utf8(s, 7) == s);
  CHECK(truncate_utf8(s, 6) == "a" + euro);
  CHECK(truncate_utf8(s, 5) == "a" + euro);
  CHECK(truncate_utf8(s, 4) == "a" + euro);
  CHECK(truncate_utf8(s, 3) == "a");
  CHECK(truncate_utf8(s, 1) == "a");
  CHECK(truncate_utf8(s, 0).empty());
  const std::string emoji = "\xF0\x9F\x98\x80";  // 4 bytes
  CHECK(truncate_utf8(emoji + emoji, 7) == emoji);
  CHECK(valid_utf8(std::string(truncate_utf8(std::string(300, 'x') + euro, 299))));
}

TEST_CASE("excerpt keeps a short string whole and marks a long one as cut", "[metering][text]") {
  CHECK(excerpt("gpt-4o") == "gpt-4o");
  CHECK(excerpt(std::string(64, 'm')) == std::string(64, 'm'));
  CHECK(excerpt(std::string(1'000'000, 'm')) == std::string(64, 'm') + "…");
}

TEST_CASE("valid_utf8 refuses malformed sequences", "[metering][text]") {
  CHECK(valid_utf8(""));
  CHECK(valid_utf8("plain ascii"));
  CHECK(valid_utf8("J\xC3\xBCrgen \xE2\x82\xAC \xF0\x9F\x98\x80"));
  CHECK_FALSE(valid_utf8("\xC3"));              // truncated
  CHECK_FALSE(valid_utf8("\xC0\xAF"));          // overlong '/'
  CHECK_FALSE(valid_utf8("\xE0\x80\xAF"));      // overlong
  CHECK_FALSE(valid_utf8("\xED\xA0\x80"));      // surrogate
  CHECK_FALSE(valid_utf8("\xF4\x90\x80\x80"));  // past U+10FFFF
  CHECK_FALSE(valid_utf8("\xFF"));
  CHECK_FALSE(valid_utf8("a\x80z"));  // a lone continuation byte
}

TEST_CASE("user_name_problem accepts ordinary names and names every refusal", "[metering][text]") {
  for (const std::string& ok :
       std::vector<std::string>{"alice", "team-a", "Jürgen Müller", "svc:billing@prod", "a", std::string(128, 'n')}) {
    CHECK_FALSE(user_name_problem(ok));
  }
  struct Bad {
    std::string name;
    std::string says;
  };
  for (const auto& bad : std::initializer_list<Bad>{
           {"", "empty"},
           {std::string(129, 'n'), "at most 128 bytes"},
           {std::string(100'000, 'n'), "at most 128 bytes"},
           {"ali\rce", "control"},
           {"ali\nce", "control"},
           {std::string("ali\0ce", 6), "control"},
           {"tab\there", "control"},
           {"del\x7F", "control"},
           {"c1\xC2\x85", "control"},  // NEL
           {"bad\xFFutf8", "UTF-8"},
           {" alice", "whitespace"},
           {"alice ", "whitespace"},
       }) {
    auto problem = user_name_problem(bad.name);
    REQUIRE(problem);
    CHECK_THAT(*problem, Catch::Contains(bad.says));
  }
}

TEST_CASE("printable escapes what a terminal would act on and keeps the rest", "[metering][text]") {
  using tollgate::metering::printable;
  CHECK(printable("gpt-4o mini") == "gpt-4o mini");
  CHECK(printable("echo\n\x1b[31mred") == "echo\\n\\x1b[31mred");
  CHECK(printable(std::string_view("a\0b", 3)) == "a\\x00b");
  CHECK(printable("tab\there\r") == "tab\\there\\r");
  CHECK(printable("back\\slash") == "back\\\\slash");
  CHECK(printable("\x7f") == "\\x7f");
  CHECK(printable("caf\xc3\xa9 \xe6\x97\xa5\xf0\x9f\x98\x80") == "caf\xc3\xa9 \xe6\x97\xa5\xf0\x9f\x98\x80");
  CHECK(printable("\xc2\x9b"
                  "31m") == "\\xc2\\x9b31m");          // C1 CSI
  CHECK(printable("bad\xff\xc3") == "bad\\xff\\xc3");  // not UTF-8, cut sequence
}
