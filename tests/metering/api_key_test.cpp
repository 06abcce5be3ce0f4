#include "metering/api_key.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <map>
#include <set>
#include <string_view>

using namespace tollgate::metering;

namespace {

bool is_base62(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

}  // namespace

TEST_CASE("generated keys have the documented format", "[metering][api_key]") {
  const GeneratedKey key = generate_api_key();
  REQUIRE(key.plaintext.size() == 3 + 32);
  CHECK(key.plaintext.rfind("tg-", 0) == 0);
  CHECK(std::all_of(key.plaintext.begin() + 3, key.plaintext.end(), is_base62));
  CHECK(key.prefix == key.plaintext.substr(0, 3 + 8));
  CHECK(key.sha256_hex == sha256_hex(key.plaintext));
  CHECK(key.sha256_hex.size() == 64);

  const GeneratedKey admin = generate_api_key("tga-");
  REQUIRE(admin.plaintext.size() == 4 + 32);
  CHECK(admin.plaintext.rfind("tga-", 0) == 0);
  CHECK(admin.prefix == admin.plaintext.substr(0, 4 + 8));
}

TEST_CASE("generated keys are unique and use the whole alphabet", "[metering][api_key]") {
  std::set<std::string> keys;
  std::set<std::string> prefixes;
  std::set<std::string> hashes;
  std::map<char, int> histogram;
  for (int i = 0; i < 1000; ++i) {
    const GeneratedKey key = generate_api_key();
    keys.insert(key.plaintext);
    prefixes.insert(key.prefix);
    hashes.insert(key.sha256_hex);
    for (std::size_t j = 3; j < key.plaintext.size(); ++j) ++histogram[key.plaintext[j]];
  }
  CHECK(keys.size() == 1000);
  CHECK(hashes.size() == 1000);
  // 8 base62 characters: a collision among 1000 prefixes is ~2e-9 likely.
  CHECK(prefixes.size() == 1000);
  // 32,000 characters over 62 symbols: ~516 each; a biased mapping shows up far outside this.
  CHECK(histogram.size() == 62);
  for (const auto& [c, count] : histogram) {
    INFO("character " << c);
    CHECK(count > 350);
    CHECK(count < 700);
  }
  // A byte % 62 mapping would favour the first 8 symbols (5/256 instead of 4/256):
  // ~5,000 instead of ~4,129 (sigma ~60).
  int first_eight = 0;
  for (char c : std::string_view("01234567")) first_eight += histogram[c];
  CHECK(first_eight < 4500);
}

TEST_CASE("sha256_hex matches known vectors", "[metering][api_key]") {
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST_CASE("constant_time_equal compares whole strings", "[metering][api_key]") {
  CHECK(constant_time_equal("", ""));
  CHECK(constant_time_equal("secret", "secret"));
  CHECK_FALSE(constant_time_equal("secret", "secreT"));
  CHECK_FALSE(constant_time_equal("secret", "secret2"));
  CHECK_FALSE(constant_time_equal("secret", ""));
}
