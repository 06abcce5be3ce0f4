// Which addresses a webhook may reach: the SSRF classifier of webhook.cpp,
// a pure function with its own test table.
#pragma once

#include <boost/asio/ip/address.hpp>

namespace tollgate::gateway {

// False for loopback, unspecified, private (RFC 1918, fc00::/7), link-local
// (the 169.254.169.254 metadata address included), CGNAT, multicast,
// broadcast, documentation, benchmark and reserved ranges, and for IPv6 that
// embeds such an IPv4 address (mapped, NAT64 64:ff9b::/96, 6to4 2002::/16);
// IPv6 outside 2000::/3, and Teredo, is not public either.
bool is_public_address(const boost::asio::ip::address& address);

}  // namespace tollgate::gateway
