#include "local_engine/gguf.hpp"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace tollgate::local_engine {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using gguf::Value;
using gguf::ValueType;

// A directory of scratch files, removed with everything in it.
class ScratchDir {
 public:
  ScratchDir() : path_(fs::temp_directory_path() / ("tollgate-gguf-test-" + std::to_string(::getpid()))) {
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<char>& bytes, std::size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(n));
}

// Hand-assembled GGUF bytes, for files the writer would never produce.
class RawGguf {
 public:
  RawGguf& u8(std::uint8_t v) { return put(v); }
  RawGguf& u32(std::uint32_t v) { return put(v); }
  RawGguf& u64(std::uint64_t v) { return put(v); }
  RawGguf& f32(float v) { return put(v); }
  RawGguf& str(std::string_view s) {
    u64(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  RawGguf& header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
    bytes_.insert(bytes_.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(n_tensors).u64(n_kv);
  }
  // One tensor info: name, dims, type id, offset.
  RawGguf& tensor(std::string_view name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(ne.size()));
    for (auto n : ne) u64(n);
    return u32(type).u64(offset);
  }
  RawGguf& pad(std::size_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
    return *this;
  }
  RawGguf& zeros(std::size_t n) {
    bytes_.insert(bytes_.end(), n, 0);
    return *this;
  }
  void save(const std::string& path) const { write_bytes(path, bytes_, bytes_.size()); }

 private:
  template <typename T>
  RawGguf& put(T v) {
    const char* p = reinterpret_cast<const char*>(&v);
    bytes_.insert(bytes_.end(), p, p + sizeof v);
    return *this;
  }
  std::vector<char> bytes_;
};

std::string load_error(const std::string& path) {
  try {
    gguf::File file(path);
  } catch (const ModelError& e) {
    return e.what();
  }
  return "no error";
}

std::vector<float> random_values(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Reference dequantisation, written from the block layout in tensor.hpp.
std::vector<float> dequantize(const gguf::TensorInfo& t) {
  std::vector<float> out;
  std::size_t n = static_cast<std::size_t>(t.elements());
  if (t.type == DType::q8_0) {
    const auto* blocks = reinterpret_cast<const BlockQ8_0*>(t.data);
    for (std::size_t b = 0; b < n / 32; ++b) {
      for (int j = 0; j < 32; ++j) out.push_back(fp16_to_f32(blocks[b].scale) * blocks[b].q[j]);
    }
  } else {
    const auto* blocks = reinterpret_cast<const BlockQ4_0*>(t.data);
    for (std::size_t b = 0; b < n / 32; ++b) {
      float d = fp16_to_f32(blocks[b].scale);
      float block[32];
      for (int j = 0; j < 16; ++j) {
        block[j] = d * ((blocks[b].q[j] & 0x0f) - 8);
        block[j + 16] = d * ((blocks[b].q[j] >> 4) - 8);
      }
      out.insert(out.end(), block, block + 32);
    }
  }
  return out;
}

std::vector<gguf::Metadatum> every_type_metadata() {
  return {
      {"t.uint8", Value::unsigned_integer(ValueType::uint8, 200)},
      {"t.int8", Value::signed_integer(ValueType::int8, -100)},
      {"t.uint16", Value::unsigned_integer(ValueType::uint16, 60000)},
      {"t.int16", Value::signed_integer(ValueType::int16, -30000)},
      {"t.uint32", Value::u32(4000000000u)},
      {"t.int32", Value::i32(-2000000000)},
      {"t.float32", Value::f32(0.1f)},
      {"t.bool_true", Value::boolean(true)},
      {"t.bool_false", Value::boolean(false)},
      {"t.string", Value::string("h\xc3\xa9llo \xe2\x96\x81world")},
      {"t.empty_string", Value::string("")},
      {"t.uint64", Value::unsigned_integer(ValueType::uint64, 18000000000000000000ull)},
      {"t.int64", Value::signed_integer(ValueType::int64, -9000000000000000000ll)},
      {"t.float64", Value::real(ValueType::float64, 3.141592653589793)},
      {"t.strings", Value::strings({"<unk>", "", "\xe2\x96\x81the"})},
      {"t.floats", Value::floats({-1.5f, 0.0f, 1e-7f})},
      {"t.int32s", Value::int32s({1, -2, 3})},
      {"t.empty_array", Value::array(ValueType::uint16, {})},
      {"t.bools", Value::array(ValueType::boolean, {Value::boolean(true), Value::boolean(false)})},
      {"t.nested", Value::array(ValueType::array, {Value::int32s({1, 2}), Value::int32s({}),
                                                   Value::array(ValueType::string, {Value::string("x")})})},
  };
}

TEST_CASE("GGUF writer and reader round-trip metadata of every type and tensors of every type", "[gguf]") {
  ScratchDir dir;
  std::string path = dir.file("roundtrip.gguf");
  std::size_t alignment = GENERATE(std::size_t{32}, std::size_t{64});

  struct Original {
    std::string name;
    std::vector<std::int64_t> ne;
    DType type;
    std::vector<float> values;
  };
  std::vector<Original> originals = {
      {"f32", {5, 3}, DType::f32, {}},    {"f16", {7, 2}, DType::f16, {}},       {"bf16", {9}, DType::bf16, {}},
      {"q8_0", {64, 3}, DType::q8_0, {}}, {"q4_0", {96, 2, 2}, DType::q4_0, {}}, {"f32_after_q4", {3}, DType::f32, {}},
  };
  gguf::Writer writer(alignment);
  for (const auto& m : every_type_metadata()) writer.add(m.key, m.value);
  std::uint32_t seed = 1;
  for (auto& o : originals) {
    std::int64_t n = 1;
    for (auto d : o.ne) n *= d;
    o.values = random_values(static_cast<std::size_t>(n), seed++);
    writer.add_tensor(o.name, o.ne, o.type);
  }
  writer.write(path, [&](std::size_t t, std::int64_t row, float* out) {
    const auto& o = originals[t];
    std::memcpy(out, o.values.data() + row * o.ne[0], static_cast<std::size_t>(o.ne[0]) * sizeof(float));
  });

  gguf::File file(path);
  CHECK(file.version() == 3);
  CHECK(file.alignment() == alignment);
  CHECK(file.data_offset() % alignment == 0);

  auto expected = every_type_metadata();
  REQUIRE(file.metadata().size() == expected.size() + 1);
  CHECK(file.metadata()[0].key == "general.alignment");
  CHECK(file.metadata()[0].value == Value::u32(static_cast<std::uint32_t>(alignment)));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO(expected[i].key);
    CHECK(file.metadata()[i + 1].key == expected[i].key);
    CHECK(file.metadata()[i + 1].value == expected[i].value);
  }
  CHECK(file.get_string("t.string") == "h\xc3\xa9llo \xe2\x96\x81world");
  CHECK(file.get_integer("t.uint32") == 4000000000ll);
  CHECK(file.get_integer("t.int8") == -100);
  CHECK(file.get_real("t.float32") == Approx(0.1));
  CHECK(file.get_bool("t.bool_true") == true);
  CHECK(file.get_strings("t.strings") == std::vector<std::string>{"<unk>", "", "\xe2\x96\x81the"});
  CHECK(file.get_floats("t.floats") == std::vector<float>{-1.5f, 0.0f, 1e-7f});
  CHECK(file.get_integers("t.int32s") == std::vector<std::int64_t>{1, -2, 3});
  CHECK_FALSE(file.get_string("t.absent"));
  CHECK_THROWS_WITH(file.get_integer("t.uint64"), Contains("expected an integer"));  // beyond int64
  CHECK_THROWS_WITH(file.get_string("t.uint32"), Contains("'t.uint32' is uint32, expected a string"));
  CHECK_THROWS_AS(file.get_strings("t.floats"), ModelError);

  REQUIRE(file.tensors().size() == originals.size());
  for (std::size_t i = 0; i < originals.size(); ++i) {
    const auto& o = originals[i];
    const auto& t = file.tensors()[i];
    INFO(o.name);
    CHECK(t.name == o.name);
    CHECK(t.ne == o.ne);
    CHECK(t.type == o.type);
    CHECK(t.offset % alignment == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(t.data) % alignment == 0);
    CHECK(file.find_tensor(o.name) == &t);
    std::size_t n = o.values.size();
    if (o.type == DType::f32) {
      CHECK(std::memcmp(t.data, o.values.data(), n * sizeof(float)) == 0);
    } else if (o.type == DType::f16 || o.type == DType::bf16) {
      const auto* h = reinterpret_cast<const std::uint16_t*>(t.data);
      for (std::size_t j = 0; j < n; ++j) {
        if (o.type == DType::f16) {
          CHECK(h[j] == f32_to_fp16(o.values[j]));
          CHECK(fp16_to_f32(h[j]) == Approx(o.values[j]).epsilon(1e-3).margin(1e-4));
        } else {
          CHECK(h[j] == f32_to_bf16(o.values[j]));
          CHECK(bf16_to_f32(h[j]) == Approx(o.values[j]).epsilon(1e-2).margin(1e-3));
        }
      }
    } else {
      std::vector<float> back = dequantize(t);
      REQUIRE(back.size() == n);
      for (std::size_t b = 0; b < n / 32; ++b) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(o.values[b * 32 + j]));
        // One quantisation step (plus the fp16 scale's rounding) at most.
        float step = o.type == DType::q8_0 ? amax / 127.0f : amax / 8.0f;
        for (int j = 0; j < 32; ++j) {
          std::size_t k = b * 32 + j;
          CHECK(std::fabs(back[k] - o.values[k]) <= step * 1.01f + 1e-6f);
        }
      }
    }
  }
}

TEST_CASE("GGUF writer rejects what the reader would reject", "[gguf]") {
  gguf::Writer writer;
  writer.add("a", Value::u32(1));
  CHECK_THROWS_AS(writer.add("a", Value::u32(2)), std::invalid_argument);
  CHECK_THROWS_AS(writer.add("general.alignment", Value::u32(64)), std::invalid_argument);
  Value inconsistent = Value::array(ValueType::int32, {Value::string("x")});
  CHECK_THROWS_AS(writer.add("b", inconsistent), std::invalid_argument);
  CHECK_THROWS_AS(writer.add_tensor("q", {48, 2}, DType::q8_0), std::invalid_argument);
  CHECK_THROWS_AS(writer.add_tensor("z", {4, 0}, DType::f32), std::invalid_argument);
  writer.add_tensor("t", {4}, DType::f32);
  CHECK_THROWS_AS(writer.add_tensor("t", {4}, DType::f32), std::invalid_argument);
  CHECK_THROWS_AS(gguf::Writer(12), std::invalid_argument);
}

TEST_CASE("GGUF reader: a file truncated anywhere is a ModelError", "[gguf]") {
  ScratchDir dir;
  std::string path = dir.file("whole.gguf");
  gguf::Writer writer;
  writer.add("general.architecture", Value::string("llama"));
  writer.add("tokenizer.ggml.tokens", Value::strings({"<unk>", "<s>", "</s>", "hello"}));
  writer.add("nested", Value::array(ValueType::array, {Value::floats({1.0f, 2.0f})}));
  writer.add_tensor("a", {32, 2}, DType::q8_0);
  writer.add_tensor("b", {3}, DType::f32);
  writer.write(path, [](std::size_t, std::int64_t, float* out) { out[0] = 1.0f; });
  std::vector<char> bytes = read_bytes(path);
  REQUIRE_NOTHROW(gguf::File(path));

  std::string cut = dir.file("cut.gguf");
  int failures = 0;
  for (std::size_t n = 0; n < bytes.size(); n += (n < 64 ? 1 : 3)) {
    write_bytes(cut, bytes, n);
    std::string error = load_error(cut);
    INFO("cut at " << n << ": " << error);
    CHECK(error != "no error");
    CHECK_THAT(error, Contains(cut));
    ++failures;
  }
  CHECK(failures > 100);
  write_bytes(cut, bytes, bytes.size() - 1);
  CHECK_THAT(load_error(cut), Contains("tensor 'b'") && Contains("past the end of the file"));
  write_bytes(cut, bytes, 30);
  CHECK_THAT(load_error(cut), Contains("4 metadata entries cannot fit"));
  write_bytes(cut, bytes, 76);  // inside the second key
  CHECK_THAT(load_error(cut),
             Contains("metadata entry 1: truncated: key needs 20 bytes, 11 left (at offset 65 of 76)"));
}

TEST_CASE("GGUF reader: corrupt headers and metadata are ModelErrors naming what is wrong", "[gguf]") {
  ScratchDir dir;
  std::string path = dir.file("bad.gguf");
  auto error_of = [&](const RawGguf& raw) {
    raw.save(path);
    return load_error(path);
  };

  std::vector<char> not_gguf = {'G', 'G', 'M', 'L', 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  write_bytes(path, not_gguf, not_gguf.size());
  CHECK_THAT(load_error(path), Contains("bad magic"));
  write_bytes(path, not_gguf, 0);
  CHECK_THAT(load_error(path), Contains("empty file"));
  CHECK_THAT(load_error(dir.file("missing.gguf")), Contains("cannot open"));

  CHECK_THAT(error_of(RawGguf().header(0, 0, 1)), Contains("version 1 is not supported"));
  CHECK_THAT(error_of(RawGguf().header(0, 0, 0x03000000)), Contains("big-endian"));
  CHECK_THAT(error_of(RawGguf().header(std::uint64_t{1} << 60, 0)), Contains("tensors cannot fit"));
  CHECK_THAT(error_of(RawGguf().header(0, ~std::uint64_t{0})), Contains("metadata entries cannot fit"));
  // A key whose length runs past the end: no allocation of that size.
  CHECK_THAT(error_of(RawGguf().header(0, 1).u64(std::uint64_t{1} << 62).zeros(16)),
             Contains("metadata entry 0") && Contains("truncated: key needs"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("k").u32(13).u32(0)),
             Contains("metadata 'k'") && Contains("unknown value type id 13"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("k").u32(9).u32(4).u64(std::uint64_t{1} << 40).zeros(64)),
             Contains("metadata 'k'") && Contains("cannot fit"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("k").u32(9).u32(99).u64(1)), Contains("unknown value type id 99"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("k").u32(9).u32(8).u64(2).str("a").u64(1000).str("b")),
             Contains("truncated: string value"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("k").u32(7).u8(2)), Contains("neither 0 nor 1"));
  CHECK_THAT(error_of(RawGguf().header(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2)),
             Contains("metadata 'k'") && Contains("duplicate key"));
  RawGguf deep;
  deep.header(0, 1).str("deep").u32(9);
  for (int i = 0; i < 20; ++i) deep.u32(9).u64(1);
  CHECK_THAT(error_of(deep), Contains("nested deeper"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("general.alignment").u32(4).u32(12)), Contains("not a power of two"));
  CHECK_THAT(error_of(RawGguf().header(0, 1).str("general.alignment").u32(5).u32(32)), Contains("must be uint32"));
}

TEST_CASE("GGUF reader: bad tensor infos are ModelErrors naming the tensor", "[gguf]") {
  ScratchDir dir;
  std::string path = dir.file("bad.gguf");
  auto error_of = [&](std::string_view name, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t offset,
                      std::size_t data_bytes) {
    RawGguf raw;
    raw.header(1, 0).tensor(name, std::move(ne), type, offset).pad(32).zeros(data_bytes);
    raw.save(path);
    return load_error(path);
  };

  CHECK(error_of("ok", {8, 2}, 0, 0, 64) == "no error");
  CHECK_THAT(error_of("blk.0.attn_q.weight", {256, 2}, 10, 0, 4096),
             Contains("tensor 'blk.0.attn_q.weight'") && Contains("type Q2_K (10) is not supported"));
  CHECK(error_of("k", {256, 2}, 12, 0, 288) == "no error");  // Q4_K: 144 bytes per 256 values
  CHECK_THAT(error_of("k", {128, 2}, 12, 0, 288), Contains("tensor 'k'") && Contains("not a multiple of 256"));
  CHECK_THAT(error_of("k", {256, 2}, 14, 0, 400), Contains("past the end of the file"));  // Q6_K needs 420
  CHECK_THAT(error_of("w", {8, 2}, 77, 0, 64), Contains("tensor 'w'") && Contains("unknown tensor type id 77"));
  CHECK_THAT(error_of("w", {8, 2}, 0, 16, 128), Contains("not a multiple of the alignment 32"));
  CHECK_THAT(error_of("w", {8, 2}, 0, 32, 64), Contains("tensor 'w'") && Contains("past the end of the file"));
  CHECK_THAT(error_of("w", {8, 2}, 0, std::uint64_t{1} << 63, 64), Contains("past the end of the file"));
  CHECK_THAT(error_of("w", {8, 0}, 0, 0, 64), Contains("zero or too large"));
  CHECK_THAT(error_of("w", {std::uint64_t{1} << 40, std::uint64_t{1} << 40}, 0, 0, 64), Contains("too large"));
  CHECK_THAT(error_of("w", {1, 1, 1, 1, 1}, 0, 0, 64), Contains("5 dimensions"));
  CHECK_THAT(error_of("w", {48}, 8, 0, 64), Contains("not a multiple of 32"));

  RawGguf twice;
  twice.header(2, 0).tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad(32).zeros(64);
  twice.save(path);
  CHECK_THAT(load_error(path), Contains("duplicate tensor name"));
}

}  // namespace
}  // namespace tollgate::local_engine

namespace tollgate::local_engine {
namespace {

using gguf::BlockType;

std::vector<float> decode(BlockType type, const std::vector<std::uint8_t>& block) {
  REQUIRE(block.size() == gguf::layout(type).bytes);
  std::vector<float> out(static_cast<std::size_t>(gguf::layout(type).values));
  gguf::dequantize_blocks(type, reinterpret_cast<const std::byte*>(block.data()), gguf::layout(type).values,
                          out.data());
  return out;
}

void put_half(std::vector<std::uint8_t>& b, std::size_t at, float value) {
  auto h = f32_to_fp16(value);
  std::memcpy(b.data() + at, &h, 2);
}

// Sub-block scales and mins of Q4_K/Q5_K, packed as ggml packs them: six bits
// each; 0-3 in bytes 0-3 / 4-7, 4-7 in the nibbles of bytes 8-11 with their
// top two bits in the top bits of bytes 0-3 / 4-7.
void put_scales(std::vector<std::uint8_t>& b, const int (&scale)[8], const int (&min)[8]) {
  std::uint8_t* s = b.data() + 4;
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<std::uint8_t>(scale[j] | ((scale[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<std::uint8_t>(min[j] | ((min[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<std::uint8_t>((scale[j + 4] & 15) | ((min[j + 4] & 15) << 4));
  }
}

}  // namespace

TEST_CASE("ggml block types decode with ggml's layouts", "[gguf]") {
  SECTION("Q4_1: nibbles of byte j are values j and j + 16, times d, plus m") {
    std::vector<std::uint8_t> b(20);
    put_half(b, 0, 0.5f);
    put_half(b, 2, -1.0f);
    for (int j = 0; j < 16; ++j) b[4 + j] = static_cast<std::uint8_t>(j | ((15 - j) << 4));
    auto y = decode(BlockType::q4_1, b);
    for (int j = 0; j < 16; ++j) {
      CHECK(y[j] == 0.5f * j - 1.0f);
      CHECK(y[j + 16] == 0.5f * (15 - j) - 1.0f);
    }
  }
  SECTION("Q5_0 and Q5_1: bit i of the 32 high bits is value i's fifth bit") {
    std::vector<std::uint8_t> b0(22);
    put_half(b0, 0, 0.25f);
    const std::uint32_t high = 0x8000'0001u | (1u << 17);  // values 0, 17 and 31
    std::memcpy(b0.data() + 2, &high, 4);
    for (int j = 0; j < 16; ++j) b0[6 + j] = 0x21;  // low nibble 1, high nibble 2
    auto y0 = decode(BlockType::q5_0, b0);
    CHECK(y0[0] == 0.25f * (17 - 16));
    CHECK(y0[1] == 0.25f * (1 - 16));
    CHECK(y0[16] == 0.25f * (2 - 16));
    CHECK(y0[17] == 0.25f * (18 - 16));
    CHECK(y0[31] == 0.25f * (18 - 16));
    CHECK(y0[30] == 0.25f * (2 - 16));

    std::vector<std::uint8_t> b1(24);
    put_half(b1, 0, 2.0f);
    put_half(b1, 2, 0.5f);
    std::memcpy(b1.data() + 4, &high, 4);
    for (int j = 0; j < 16; ++j) b1[8 + j] = 0x21;
    auto y1 = decode(BlockType::q5_1, b1);
    CHECK(y1[0] == 2.0f * 17 + 0.5f);
    CHECK(y1[5] == 2.0f * 1 + 0.5f);
    CHECK(y1[17] == 2.0f * 18 + 0.5f);
    CHECK(y1[20] == 2.0f * 2 + 0.5f);
  }
  SECTION("Q4_K and Q5_K: eight sub-blocks of 32, d * scale * q - dmin * min") {
    const int scale[8] = {1, 5, 9, 13, 17, 33, 47, 63};
    const int min[8] = {0, 2, 4, 6, 20, 40, 50, 63};
    for (BlockType type : {BlockType::q4_k, BlockType::q5_k}) {
      const bool five = type == BlockType::q5_k;
      INFO(gguf::layout(type).name);
      std::vector<std::uint8_t> b(gguf::layout(type).bytes);
      put_half(b, 0, 0.5f);
      put_half(b, 2, 0.25f);
      put_scales(b, scale, min);
      const std::size_t qs = five ? 48 : 16;
      for (int i = 0; i < 128; ++i) b[qs + i] = static_cast<std::uint8_t>((i % 16) | (((i * 7) % 16) << 4));
      if (five) {
        for (int l = 0; l < 32; ++l) b[16 + l] = static_cast<std::uint8_t>(l * 37);
      }
      auto y = decode(type, b);
      // Value v: sub-block v / 32; byte 32 (v / 64) + v % 32 holds it, in its
      // low nibble for even sub-blocks, high for odd; the fifth bit is bit
      // (sub-block) of high byte v % 32.
      for (int v = 0; v < 256; ++v) {
        const int sub = v / 32;
        const int byte = 32 * (v / 64) + v % 32;
        const int stored = b[qs + static_cast<std::size_t>(byte)];
        int q = sub % 2 == 0 ? stored & 15 : stored >> 4;
        if (five && ((b[16 + static_cast<std::size_t>(v % 32)] >> sub) & 1)) q += 16;
        INFO("value " << v);
        CHECK(y[static_cast<std::size_t>(v)] ==
              0.5f * static_cast<float>(scale[sub]) * static_cast<float>(q) - 0.25f * static_cast<float>(min[sub]));
      }
    }
  }
  SECTION("Q6_K: low nibbles, high bit pairs, 16 int8 scales, then d") {
    std::vector<std::uint8_t> b(210);
    for (int i = 0; i < 128; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i * 13 + 5);
    for (int i = 0; i < 64; ++i) b[128 + static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i * 29 + 3);
    for (int i = 0; i < 16; ++i) b[192 + static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i - 8);
    put_half(b, 208, 0.125f);
    auto y = decode(BlockType::q6_k, b);
    // Value v: half n = v / 128, quarter k = (v % 128) / 32, l = v % 32. Low
    // nibble (k < 2) or high nibble of byte 64 n + l + 32 (k % 2); bits 2k and
    // 2k + 1 of byte 32 n + l of the high part; scale 8 n + l / 16 + 2 k.
    for (int v = 0; v < 256; ++v) {
      const int n = v / 128, k = (v % 128) / 32, l = v % 32;
      const int low = b[static_cast<std::size_t>(64 * n + l + 32 * (k % 2))];
      const int nibble = k < 2 ? low & 15 : low >> 4;
      const int top = (b[128 + static_cast<std::size_t>(32 * n + l)] >> (2 * k)) & 3;
      const int q = (nibble | (top << 4)) - 32;
      const auto s = static_cast<std::int8_t>(b[192 + static_cast<std::size_t>(8 * n + l / 16 + 2 * k)]);
      INFO("value " << v);
      CHECK(y[static_cast<std::size_t>(v)] == 0.125f * static_cast<float>(s) * static_cast<float>(q));
    }
  }
  SECTION("type ids and sizes") {
    CHECK(gguf::block_type_of(12) == BlockType::q4_k);
    CHECK(gguf::block_type_of(14) == BlockType::q6_k);
    CHECK(gguf::block_type_of(8) == std::nullopt);  // Q8_0 is computed in, not converted
    CHECK(gguf::layout(BlockType::q5_k).bytes == 176);
  }
}

}  // namespace tollgate::local_engine
