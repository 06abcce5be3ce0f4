#include "backends/config_reader.hpp"

#include <catch2/catch.hpp>
#include <cstdlib>

using namespace std::chrono_literals;
using tollgate::backends::ConfigError;
using tollgate::backends::interpolate_env;
using tollgate::backends::parse_duration;
using tollgate::backends::parse_size;

TEST_CASE("parse_duration", "[backends][config]") {
  CHECK(parse_duration("250ms") == 250ms);
  CHECK(parse_duration("10s") == 10s);
  CHECK(parse_duration("1.5s") == 1500ms);
  CHECK(parse_duration("2m") == 2min);
  CHECK(parse_duration("1h") == 1h);
  CHECK(parse_duration("0s") == 0ms);
  CHECK(parse_duration("0ms") == 0ms);
  CHECK_FALSE(parse_duration(""));
  CHECK_FALSE(parse_duration("10"));
  CHECK_FALSE(parse_duration("s"));
  CHECK_FALSE(parse_duration("-1s"));
  CHECK_FALSE(parse_duration("10 s"));
  CHECK_FALSE(parse_duration("10sec"));
  CHECK_FALSE(parse_duration("5d"));
  CHECK_FALSE(parse_duration("1S"));
  // Not numbers a timeout can be, rather than undefined conversions.
  CHECK_FALSE(parse_duration("infs"));
  CHECK_FALSE(parse_duration("nanms"));
  CHECK_FALSE(parse_duration("1e300h"));
  CHECK_FALSE(parse_duration("1000000h"));  // over a century
  CHECK(parse_duration("8760h") == std::chrono::hours(8760));
}

TEST_CASE("parse_size", "[backends][config]") {
  CHECK(parse_size("1048576") == 1048576u);
  CHECK(parse_size("10B") == 10u);
  CHECK(parse_size("512KiB") == 512u * 1024);
  CHECK(parse_size("4MiB") == 4u * 1024 * 1024);
  CHECK(parse_size("1GiB") == 1024u * 1024 * 1024);
  CHECK(parse_size("1kB") == 1000u);
  CHECK(parse_size("1KB") == 1000u);
  CHECK(parse_size("1MB") == 1000u * 1000);
  CHECK(parse_size("2GB") == 2'000'000'000u);
  CHECK(parse_size("0") == 0u);
  CHECK_FALSE(parse_size(""));
  CHECK_FALSE(parse_size("MiB"));
  CHECK_FALSE(parse_size("-1"));
  CHECK_FALSE(parse_size("4 MiB"));
  CHECK_FALSE(parse_size("1.5MiB"));
  CHECK_FALSE(parse_size("1TiB"));
  CHECK_FALSE(parse_size("4mib"));
  // Sizes past 2^64 bytes are errors, not wrapped-around small numbers.
  CHECK_FALSE(parse_size("17179869184GiB"));
  CHECK_FALSE(parse_size("99999999999999999999"));
}

TEST_CASE("interpolate_env", "[backends][config]") {
  ::setenv("TG_UNIT_SET", "value", 1);
  ::setenv("TG_UNIT_EMPTY", "", 1);
  ::setenv("TG_UNIT_NESTED", "${TG_UNIT_SET}", 1);
  ::unsetenv("TG_UNIT_UNSET");

  CHECK(interpolate_env("plain text", "w") == "plain text");
  CHECK(interpolate_env("${TG_UNIT_SET}", "w") == "value");
  CHECK(interpolate_env("a-${TG_UNIT_SET}-b-${TG_UNIT_SET}", "w") == "a-value-b-value");
  CHECK(interpolate_env("${TG_UNIT_UNSET:-fallback}", "w") == "fallback");
  CHECK(interpolate_env("${TG_UNIT_UNSET:-}", "w") == "");
  CHECK(interpolate_env("${TG_UNIT_SET:-fallback}", "w") == "value");
  CHECK(interpolate_env("${TG_UNIT_EMPTY:-fallback}", "w") == "fallback");
  CHECK(interpolate_env("${TG_UNIT_UNSET:-a:-b}", "w") == "a:-b");
  CHECK(interpolate_env("$TG_UNIT_SET", "w") == "$TG_UNIT_SET");  // only the braced form
  // A value is not expanded again.
  CHECK(interpolate_env("${TG_UNIT_NESTED}", "w") == "${TG_UNIT_SET}");

  CHECK_THROWS_WITH(interpolate_env("x ${TG_UNIT_UNSET} y", "where"),
                    Catch::Contains("where") && Catch::Contains("TG_UNIT_UNSET"));
  CHECK_THROWS_WITH(interpolate_env("${TG_UNIT_EMPTY}", "where"), Catch::Contains("TG_UNIT_EMPTY"));
  CHECK_THROWS_AS(interpolate_env("${TG_UNIT_SET", "w"), ConfigError);
  CHECK_THROWS_AS(interpolate_env("${}", "w"), ConfigError);
  CHECK_THROWS_AS(interpolate_env("${:-x}", "w"), ConfigError);
}
