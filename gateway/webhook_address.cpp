#include "gateway/webhook_address.hpp"

#include <array>
#include <cstdint>

namespace tollgate::gateway {
namespace {

struct V4Range {
  std::uint32_t network;
  int prefix;
};

constexpr std::uint32_t v4(std::uint32_t a, std::uint32_t b, std::uint32_t c, std::uint32_t d) {
  return a << 24 | b << 16 | c << 8 | d;
}

// Special-purpose IPv4 blocks (RFC 6890 and its updates) that are not
// reachable public destinations.
constexpr std::array kNonPublicV4{
    V4Range{v4(0, 0, 0, 0), 8},        // "this network", 0.0.0.0 included
    V4Range{v4(10, 0, 0, 0), 8},       // private
    V4Range{v4(100, 64, 0, 0), 10},    // CGNAT shared space
    V4Range{v4(127, 0, 0, 0), 8},      // loopback
    V4Range{v4(169, 254, 0, 0), 16},   // link-local, cloud metadata at 169.254.169.254
    V4Range{v4(172, 16, 0, 0), 12},    // private
    V4Range{v4(192, 0, 0, 0), 24},     // IETF protocol assignments
    V4Range{v4(192, 0, 2, 0), 24},     // documentation
    V4Range{v4(192, 88, 99, 0), 24},   // 6to4 relay anycast
    V4Range{v4(192, 168, 0, 0), 16},   // private
    V4Range{v4(198, 18, 0, 0), 15},    // benchmarking
    V4Range{v4(198, 51, 100, 0), 24},  // documentation
    V4Range{v4(203, 0, 113, 0), 24},   // documentation
    V4Range{v4(224, 0, 0, 0), 4},      // multicast
    V4Range{v4(240, 0, 0, 0), 4},      // reserved, 255.255.255.255 broadcast included
};

bool is_public_v4(std::uint32_t address) {
  for (const auto& range : kNonPublicV4) {
    std::uint32_t mask = ~std::uint32_t{0} << (32 - range.prefix);
    if ((address & mask) == range.network) return false;
  }
  return true;
}

std::uint32_t v4_at(const boost::asio::ip::address_v6::bytes_type& b, int offset) {
  return std::uint32_t{b[offset]} << 24 | std::uint32_t{b[offset + 1]} << 16 | std::uint32_t{b[offset + 2]} << 8 |
         std::uint32_t{b[offset + 3]};
}

bool starts_with(const boost::asio::ip::address_v6::bytes_type& b, std::initializer_list<std::uint8_t> prefix) {
  int i = 0;
  for (auto byte : prefix) {
    if (b[i++] != byte) return false;
  }
  return true;
}

bool is_public_v6(const boost::asio::ip::address_v6& address) {
  auto b = address.to_bytes();
  // IPv4 embedded in IPv6 reaches that IPv4 address: judge the IPv4 one.
  if (starts_with(b, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff})) return is_public_v4(v4_at(b, 12));     // mapped
  if (starts_with(b, {0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0})) return is_public_v4(v4_at(b, 12));  // NAT64
  if (starts_with(b, {0x20, 0x02})) return is_public_v4(v4_at(b, 2));                                    // 6to4
  // Global unicast is 2000::/3; everything else (::, ::1, IPv4-compatible,
  // 64:ff9b:1::/48, 100::/64, fc00::/7, fe80::/10, fec0::/10, ff00::/8) is not.
  if ((b[0] & 0xe0) != 0x20) return false;
  if (starts_with(b, {0x20, 0x01, 0, 0})) return false;        // Teredo: its IPv4 end is obfuscated
  if (starts_with(b, {0x20, 0x01, 0x0d, 0xb8})) return false;  // documentation
  return true;
}

}  // namespace

bool is_public_address(const boost::asio::ip::address& address) {
  if (address.is_v4()) return is_public_v4(address.to_v4().to_uint());
  return is_public_v6(address.to_v6());
}

}  // namespace tollgate::gateway
