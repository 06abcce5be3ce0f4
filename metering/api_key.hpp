// API key generation and hashing. A key is "tg-" followed by 32 base62
// characters (~190 bits from OpenSSL's CSPRNG); only its SHA-256 is stored.
#pragma once

#include <string>
#include <string_view>

namespace tollgate::metering {

struct GeneratedKey {
  std::string plaintext;   // shown once, never stored
  std::string prefix;      // "tg-" + first 8 random characters, for display
  std::string sha256_hex;  // what the store keeps
};

GeneratedKey generate_api_key(std::string_view kind = "tg-");
std::string sha256_hex(std::string_view data);
// Constant-time comparison of two equal-length strings (false when lengths differ).
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace tollgate::metering
