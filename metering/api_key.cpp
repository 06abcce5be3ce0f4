#include "metering/api_key.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <array>
#include <memory>
#include <stdexcept>

namespace tollgate::metering {
namespace {

constexpr std::string_view kBase62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
constexpr std::size_t kRandomChars = 32;
constexpr std::size_t kPrefixChars = 8;

// 62 * 4 = 248: bytes at or above it are rejected so every character is equally likely.
constexpr unsigned kRejectFrom = 248;

std::string random_base62(std::size_t count) {
  std::string out;
  out.reserve(count);
  std::array<unsigned char, 64> buffer{};
  while (out.size() < count) {
    if (RAND_bytes(buffer.data(), static_cast<int>(buffer.size())) != 1) {
      throw std::runtime_error("RAND_bytes failed: no randomness for an API key");
    }
    for (unsigned char byte : buffer) {
      if (byte >= kRejectFrom) continue;
      out.push_back(kBase62[byte % kBase62.size()]);
      if (out.size() == count) break;
    }
  }
  return out;
}

}  // namespace

GeneratedKey generate_api_key(std::string_view kind) {
  std::string random = random_base62(kRandomChars);
  GeneratedKey key;
  key.plaintext = std::string(kind) + random;
  key.prefix = std::string(kind) + random.substr(0, kPrefixChars);
  key.sha256_hex = sha256_hex(key.plaintext);
  return key;
}

std::string sha256_hex(std::string_view data) {
  // Fetched once and one context per thread: OpenSSL 3's implicit fetch and a
  // fresh context per call cost several times the hash of a key.
  static EVP_MD* const sha256 = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  thread_local std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  if (!sha256 || !ctx || EVP_DigestInit_ex2(ctx.get(), sha256, nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), digest.data(), &length) != 1) {
    throw std::runtime_error("SHA-256 failed");
  }
  constexpr std::string_view kHex = "0123456789abcdef";
  std::string out;
  out.reserve(length * 2);
  for (unsigned int i = 0; i < length; ++i) {
    out.push_back(kHex[digest[i] >> 4]);
    out.push_back(kHex[digest[i] & 0x0f]);
  }
  return out;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace tollgate::metering
