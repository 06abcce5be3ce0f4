#include "local_engine/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <unordered_set>

#include "local_engine/cpu_ops.hpp"

namespace tollgate::local_engine {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw ModelError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw ModelError(path + ": not a regular file");
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw ModelError(path + ": empty file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file open
  if (p == MAP_FAILED) throw ModelError(path + ": cannot map: " + std::strerror(map_errno));
  data_ = static_cast<const std::byte*>(p);
}

MappedFile::~MappedFile() { ::munmap(const_cast<std::byte*>(data_), size_); }

namespace gguf {
namespace {

constexpr std::uint32_t kMagic = 0x46554747;  // "GGUF" read little-endian
constexpr std::uint32_t kMaxDims = 4;         // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;
// Each decoded value takes far more memory than its encoding, so arrays are
// capped well above any real vocabulary (256K tokens, a few 100K merges).
constexpr std::uint64_t kMaxArrayLength = std::uint64_t{1} << 22;
constexpr std::uint64_t kMaxMetadataValues = std::uint64_t{1} << 23;
// Dimensions and element counts above this are corrupt, not large models; the
// bound also keeps every byte-count product far from overflow.
constexpr std::int64_t kMaxElements = std::int64_t{1} << 48;

// ggml type ids: the supported ones, and names for the rest so an error says
// which type a file uses.
struct GgmlType {
  std::uint32_t id;
  std::string_view name;
  std::optional<DType> dtype;
};
constexpr GgmlType kGgmlTypes[] = {
    {0, "F32", DType::f32},    {1, "F16", DType::f16}, {2, "Q4_0", DType::q4_0}, {3, "Q4_1", {}},
    {6, "Q5_0", {}},           {7, "Q5_1", {}},        {8, "Q8_0", DType::q8_0}, {9, "Q8_1", {}},
    {10, "Q2_K", {}},          {11, "Q3_K", {}},       {12, "Q4_K", {}},         {13, "Q5_K", {}},
    {14, "Q6_K", {}},          {15, "Q8_K", {}},       {16, "IQ2_XXS", {}},      {17, "IQ2_XS", {}},
    {18, "IQ3_XXS", {}},       {19, "IQ1_S", {}},      {20, "IQ4_NL", {}},       {21, "IQ3_S", {}},
    {22, "IQ2_S", {}},         {23, "IQ4_XS", {}},     {24, "I8", {}},           {25, "I16", {}},
    {26, "I32", {}},           {27, "I64", {}},        {28, "F64", {}},          {29, "IQ1_M", {}},
    {30, "BF16", DType::bf16}, {34, "TQ1_0", {}},      {35, "TQ2_0", {}},        {39, "MXFP4", {}},
};

std::uint32_t ggml_type_id(DType type) {
  for (const auto& t : kGgmlTypes) {
    if (t.dtype == type) return t.id;
  }
  return 0;
}

// Smallest encoding of one value of a type: bounds an array's count by the
// bytes left before anything is allocated for it.
std::size_t min_encoded_size(ValueType type) {
  switch (type) {
    case ValueType::uint8:
    case ValueType::int8:
    case ValueType::boolean:
      return 1;
    case ValueType::uint16:
    case ValueType::int16:
      return 2;
    case ValueType::uint32:
    case ValueType::int32:
    case ValueType::float32:
      return 4;
    case ValueType::uint64:
    case ValueType::int64:
    case ValueType::float64:
    case ValueType::string:
      return 8;
    case ValueType::array:
      return 12;
  }
  return 1;
}

bool known_value_type(std::uint32_t id) { return id <= static_cast<std::uint32_t>(ValueType::float64); }

// Reads the file front to back. Every read checks the bytes left first; a
// failure names the file, what was being read and the offset.
class Parser {
 public:
  explicit Parser(const MappedFile& file) : file_(file) {}

  [[noreturn]] void fail(const std::string& what) const {
    std::string message = file_.path() + ": ";
    if (!context_.empty()) message += context_ + ": ";
    message += what + " (at offset " + std::to_string(pos_) + " of " + std::to_string(file_.size()) + ")";
    throw ModelError(message);
  }

  void set_context(std::string context) { context_ = std::move(context); }
  std::size_t pos() const { return pos_; }
  std::size_t left() const { return file_.size() - pos_; }

  void need(std::size_t n, std::string_view what) const {
    if (n > left()) {
      fail("truncated: " + std::string(what) + " needs " + std::to_string(n) + " bytes, " + std::to_string(left()) +
           " left");
    }
  }

  template <typename T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, file_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(std::string_view what) {
    auto length = read<std::uint64_t>(what);
    need(length, what);  // before allocating
    std::string s(reinterpret_cast<const char*>(file_.data() + pos_), length);
    pos_ += length;
    return s;
  }

  ValueType read_value_type(std::string_view what) {
    auto id = read<std::uint32_t>(what);
    if (!known_value_type(id)) {
      pos_ -= sizeof id;
      fail("unknown value type id " + std::to_string(id) + " for " + std::string(what));
    }
    return static_cast<ValueType>(id);
  }

  Value read_value(ValueType type, int depth) {
    switch (type) {
      case ValueType::uint8:
        return Value::unsigned_integer(type, read<std::uint8_t>("uint8 value"));
      case ValueType::int8:
        return Value::signed_integer(type, read<std::int8_t>("int8 value"));
      case ValueType::uint16:
        return Value::unsigned_integer(type, read<std::uint16_t>("uint16 value"));
      case ValueType::int16:
        return Value::signed_integer(type, read<std::int16_t>("int16 value"));
      case ValueType::uint32:
        return Value::unsigned_integer(type, read<std::uint32_t>("uint32 value"));
      case ValueType::int32:
        return Value::signed_integer(type, read<std::int32_t>("int32 value"));
      case ValueType::uint64:
        return Value::unsigned_integer(type, read<std::uint64_t>("uint64 value"));
      case ValueType::int64:
        return Value::signed_integer(type, read<std::int64_t>("int64 value"));
      case ValueType::float32:
        return Value::real(type, read<float>("float32 value"));
      case ValueType::float64:
        return Value::real(type, read<double>("float64 value"));
      case ValueType::boolean: {
        auto b = read<std::uint8_t>("bool value");
        if (b > 1) {
          --pos_;
          fail("bool value " + std::to_string(b) + " is neither 0 nor 1");
        }
        return Value::boolean(b == 1);
      }
      case ValueType::string:
        return Value::string(read_string("string value"));
      case ValueType::array:
        return read_array(depth);
    }
    fail("unreachable value type");
  }

  Value read_array(int depth) {
    if (depth >= kMaxArrayDepth) fail("arrays nested deeper than " + std::to_string(kMaxArrayDepth));
    ValueType element_type = read_value_type("array element type");
    auto count = read<std::uint64_t>("array length");
    if (count > left() / min_encoded_size(element_type)) {
      fail("array of " + std::to_string(count) + " " + std::string(value_type_name(element_type)) +
           " values cannot fit in the " + std::to_string(left()) + " bytes left");
    }
    if (count > kMaxArrayLength || count > kMaxMetadataValues - values_read_) {
      fail("array of " + std::to_string(count) + " values is longer than this reader accepts");
    }
    values_read_ += count;
    Value::Array items;
    items.reserve(count);
    for (std::uint64_t i = 0; i < count; ++i) items.push_back(read_value(element_type, depth + 1));
    return Value::array(element_type, std::move(items));
  }

  void align_to(std::size_t alignment) { pos_ = (pos_ + alignment - 1) / alignment * alignment; }

 private:
  const MappedFile& file_;
  std::size_t pos_ = 0;
  std::uint64_t values_read_ = 0;
  std::string context_;
};

const GgmlType* find_ggml_type(std::uint32_t id) {
  for (const auto& t : kGgmlTypes) {
    if (t.id == id) return &t;
  }
  return nullptr;
}

std::string in_quotes(std::string_view s) { return "'" + std::string(s) + "'"; }

}  // namespace

std::string_view value_type_name(ValueType type) {
  switch (type) {
    case ValueType::uint8:
      return "uint8";
    case ValueType::int8:
      return "int8";
    case ValueType::uint16:
      return "uint16";
    case ValueType::int16:
      return "int16";
    case ValueType::uint32:
      return "uint32";
    case ValueType::int32:
      return "int32";
    case ValueType::float32:
      return "float32";
    case ValueType::boolean:
      return "bool";
    case ValueType::string:
      return "string";
    case ValueType::array:
      return "array";
    case ValueType::uint64:
      return "uint64";
    case ValueType::int64:
      return "int64";
    case ValueType::float64:
      return "float64";
  }
  return "?";
}

namespace {

template <typename T>
Value scalar_value(ValueType type, T v) {
  Value value;
  value.type = type;
  value.data.emplace<T>(std::move(v));
  return value;
}

}  // namespace

Value Value::unsigned_integer(ValueType type, std::uint64_t v) { return scalar_value(type, v); }
Value Value::signed_integer(ValueType type, std::int64_t v) { return scalar_value(type, v); }
Value Value::real(ValueType type, double v) { return scalar_value(type, v); }
Value Value::boolean(bool v) { return scalar_value(ValueType::boolean, v); }
Value Value::string(std::string v) { return scalar_value(ValueType::string, std::move(v)); }
Value Value::array(ValueType element_type, Array items) {
  Value value = scalar_value(ValueType::array, std::move(items));
  value.element_type = element_type;
  return value;
}

Value Value::strings(const std::vector<std::string>& items) {
  Array values;
  values.reserve(items.size());
  for (const auto& s : items) values.push_back(string(s));
  return array(ValueType::string, std::move(values));
}

Value Value::floats(const std::vector<float>& items) {
  Array values;
  values.reserve(items.size());
  for (float f : items) values.push_back(f32(f));
  return array(ValueType::float32, std::move(values));
}

Value Value::int32s(const std::vector<std::int32_t>& items) {
  Array values;
  values.reserve(items.size());
  for (std::int32_t i : items) values.push_back(i32(i));
  return array(ValueType::int32, std::move(values));
}

std::optional<std::int64_t> Value::as_integer() const {
  if (const auto* u = std::get_if<std::uint64_t>(&data)) {
    if (*u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
    return static_cast<std::int64_t>(*u);
  }
  if (const auto* i = std::get_if<std::int64_t>(&data)) return *i;
  return std::nullopt;
}

std::optional<double> Value::as_real() const {
  if (const auto* d = std::get_if<double>(&data)) return *d;
  return std::nullopt;
}

const std::string* Value::as_string() const { return std::get_if<std::string>(&data); }
const Value::Array* Value::as_array() const { return std::get_if<Array>(&data); }

std::int64_t TensorInfo::rows() const {
  std::int64_t rows = 1;
  for (std::size_t i = 1; i < ne.size(); ++i) rows *= ne[i];
  return rows;
}

File::File(const std::string& path) : File(std::make_shared<const MappedFile>(path)) {}

File::File(std::shared_ptr<const MappedFile> mapping) : mapping_(std::move(mapping)) {
  Parser in(*mapping_);
  in.set_context("header");
  auto magic = in.read<std::uint32_t>("magic");
  if (magic != kMagic) in.fail("not a GGUF file (bad magic)");
  version_ = in.read<std::uint32_t>("version");
  if (version_ == 1) in.fail("GGUF version 1 is not supported (only 2 and 3)");
  if (version_ != 2 && version_ != 3) {
    bool big_endian = __builtin_bswap32(version_) == 2 || __builtin_bswap32(version_) == 3;
    in.fail("unsupported GGUF version " + std::to_string(version_) + (big_endian ? " (a big-endian file?)" : ""));
  }
  auto n_tensors = in.read<std::uint64_t>("tensor count");
  auto n_kv = in.read<std::uint64_t>("metadata count");
  // A key-value pair takes at least 13 bytes, a tensor info at least 24.
  if (n_kv > in.left() / 13) in.fail(std::to_string(n_kv) + " metadata entries cannot fit in the file");
  if (n_tensors > in.left() / 24) in.fail(std::to_string(n_tensors) + " tensors cannot fit in the file");

  metadata_.reserve(n_kv);
  std::unordered_set<std::string> keys;
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    in.set_context("metadata entry " + std::to_string(i));
    std::string key = in.read_string("key");
    in.set_context("metadata " + in_quotes(key));
    ValueType type = in.read_value_type("value type");
    Value value = in.read_value(type, 0);
    if (!keys.insert(key).second) in.fail("duplicate key");
    metadata_.push_back({std::move(key), std::move(value)});
  }

  in.set_context("metadata 'general.alignment'");
  if (const Value* a = find("general.alignment")) {
    if (a->type != ValueType::uint32) in.fail("must be uint32, not " + std::string(value_type_name(a->type)));
    auto alignment = static_cast<std::size_t>(*a->as_integer());
    // At least 8 so that F32 data stays aligned for the engine's loads.
    if (alignment < 8 || !std::has_single_bit(alignment)) {
      in.fail("alignment " + std::to_string(alignment) + " is not a power of two of at least 8");
    }
    alignment_ = alignment;
  }

  tensors_.reserve(n_tensors);
  std::unordered_set<std::string> names;
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    in.set_context("tensor info " + std::to_string(i));
    TensorInfo t;
    t.name = in.read_string("name");
    in.set_context("tensor " + in_quotes(t.name));
    if (!names.insert(t.name).second) in.fail("duplicate tensor name");
    auto n_dims = in.read<std::uint32_t>("dimension count");
    if (n_dims == 0 || n_dims > kMaxDims) {
      in.fail(std::to_string(n_dims) + " dimensions (must be 1.." + std::to_string(kMaxDims) + ")");
    }
    std::int64_t elements = 1;
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      auto n = in.read<std::uint64_t>("dimension");
      if (n == 0 || n > static_cast<std::uint64_t>(kMaxElements) ||
          static_cast<std::int64_t>(n) > kMaxElements / elements) {
        in.fail("dimension " + std::to_string(d) + " of " + std::to_string(n) + " is zero or too large");
      }
      elements *= static_cast<std::int64_t>(n);
      t.ne.push_back(static_cast<std::int64_t>(n));
    }
    auto type_id = in.read<std::uint32_t>("type");
    const GgmlType* type = find_ggml_type(type_id);
    if (type == nullptr) in.fail("unknown tensor type id " + std::to_string(type_id));
    t.blocks = block_type_of(type_id);
    if (!type->dtype && !t.blocks) {
      in.fail("type " + std::string(type->name) + " (" + std::to_string(type_id) +
              ") is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
    }
    t.type = t.blocks ? DType::q8_0 : *type->dtype;
    const std::int64_t block = t.blocks                                           ? layout(*t.blocks).values
                               : (t.type == DType::q8_0 || t.type == DType::q4_0) ? kQuantBlock
                                                                                  : 1;
    if (t.ne[0] % block != 0) {
      in.fail(std::string(type->name) + " row length " + std::to_string(t.ne[0]) + " is not a multiple of " +
              std::to_string(block));
    }
    t.offset = in.read<std::uint64_t>("data offset");
    if (t.offset % alignment_ != 0) {
      in.fail("data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
              std::to_string(alignment_));
    }
    t.bytes = static_cast<std::size_t>(t.rows()) *
              (t.blocks ? static_cast<std::size_t>(t.cols() / layout(*t.blocks).values) * layout(*t.blocks).bytes
                        : row_bytes(t.type, t.cols()));
    tensors_.push_back(std::move(t));
  }

  in.align_to(alignment_);
  data_offset_ = in.pos();
  for (auto& t : tensors_) {
    std::size_t available = data_offset_ <= mapping_->size() ? mapping_->size() - data_offset_ : 0;
    if (t.offset > available || t.bytes > available - t.offset) {
      in.set_context("tensor " + in_quotes(t.name));
      in.fail("data [" + std::to_string(data_offset_ + t.offset) + ", " +
              std::to_string(data_offset_ + t.offset + t.bytes) + ") extends past the end of the file");
    }
    t.data = mapping_->data() + data_offset_ + t.offset;
  }
}

const Value* File::find(std::string_view key) const {
  for (const auto& m : metadata_) {
    if (m.key == key) return &m.value;
  }
  return nullptr;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

namespace {

[[noreturn]] void wrong_type(const File& file, std::string_view key, const Value& v, std::string_view wanted) {
  throw ModelError(file.path() + ": metadata " + in_quotes(key) + " is " + std::string(value_type_name(v.type)) +
                   ", expected " + std::string(wanted));
}

}  // namespace

std::optional<std::string> File::get_string(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (const auto* s = v->as_string()) return *s;
  wrong_type(*this, key, *v, "a string");
}

std::optional<std::int64_t> File::get_integer(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (auto i = v->as_integer()) return i;
  wrong_type(*this, key, *v, "an integer (up to 2^63)");
}

std::optional<double> File::get_real(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (auto d = v->as_real()) return d;
  wrong_type(*this, key, *v, "float32 or float64");
}

std::optional<bool> File::get_bool(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (const auto* b = std::get_if<bool>(&v->data)) return *b;
  wrong_type(*this, key, *v, "a bool");
}

std::optional<std::vector<std::string>> File::get_strings(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  const auto* items = v->as_array();
  if (items == nullptr || v->element_type != ValueType::string) wrong_type(*this, key, *v, "an array of strings");
  std::vector<std::string> out;
  out.reserve(items->size());
  for (const auto& item : *items) out.push_back(*item.as_string());
  return out;
}

std::optional<std::vector<float>> File::get_floats(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  const auto* items = v->as_array();
  if (items == nullptr || (v->element_type != ValueType::float32 && v->element_type != ValueType::float64)) {
    wrong_type(*this, key, *v, "an array of floats");
  }
  std::vector<float> out;
  out.reserve(items->size());
  for (const auto& item : *items) out.push_back(static_cast<float>(*item.as_real()));
  return out;
}

std::optional<std::vector<std::int64_t>> File::get_integers(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return std::nullopt;
  const auto* items = v->as_array();
  if (items == nullptr || v->element_type == ValueType::array || v->element_type == ValueType::string ||
      v->element_type == ValueType::boolean || v->element_type == ValueType::float32 ||
      v->element_type == ValueType::float64) {
    wrong_type(*this, key, *v, "an array of integers");
  }
  std::vector<std::int64_t> out;
  out.reserve(items->size());
  for (const auto& item : *items) {
    auto i = item.as_integer();
    if (!i) throw ModelError(path() + ": metadata " + in_quotes(key) + " holds an integer beyond 2^63");
    out.push_back(*i);
  }
  return out;
}

// ---- Writer ----

namespace {

// Buffered output that turns stream failures into one exception naming the file.
class OutputFile {
 public:
  explicit OutputFile(const std::string& path) : path_(path), out_(path, std::ios::binary | std::ios::trunc) {
    if (!out_) throw std::runtime_error(path + ": cannot create: " + std::strerror(errno));
  }

  void bytes(const void* p, std::size_t n) {
    out_.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
    written_ += n;
  }
  template <typename T>
  void scalar(T v) {
    bytes(&v, sizeof v);
  }
  void string(std::string_view s) {
    scalar<std::uint64_t>(s.size());
    bytes(s.data(), s.size());
  }
  void pad_to(std::size_t alignment) {
    static constexpr char kZeros[64] = {};
    std::size_t n = (alignment - written_ % alignment) % alignment;
    while (n > 0) {
      std::size_t chunk = std::min(n, sizeof kZeros);
      bytes(kZeros, chunk);
      n -= chunk;
    }
  }
  std::size_t written() const { return written_; }
  void close() {
    out_.close();
    if (!out_) throw std::runtime_error(path_ + ": write failed: " + std::strerror(errno));
  }

 private:
  std::string path_;
  std::ofstream out_;
  std::size_t written_ = 0;
};

void write_value(OutputFile& out, const Value& v) {
  switch (v.type) {
    case ValueType::uint8:
      return out.scalar(static_cast<std::uint8_t>(std::get<std::uint64_t>(v.data)));
    case ValueType::uint16:
      return out.scalar(static_cast<std::uint16_t>(std::get<std::uint64_t>(v.data)));
    case ValueType::uint32:
      return out.scalar(static_cast<std::uint32_t>(std::get<std::uint64_t>(v.data)));
    case ValueType::uint64:
      return out.scalar(std::get<std::uint64_t>(v.data));
    case ValueType::int8:
      return out.scalar(static_cast<std::int8_t>(std::get<std::int64_t>(v.data)));
    case ValueType::int16:
      return out.scalar(static_cast<std::int16_t>(std::get<std::int64_t>(v.data)));
    case ValueType::int32:
      return out.scalar(static_cast<std::int32_t>(std::get<std::int64_t>(v.data)));
    case ValueType::int64:
      return out.scalar(std::get<std::int64_t>(v.data));
    case ValueType::float32:
      return out.scalar(static_cast<float>(std::get<double>(v.data)));
    case ValueType::float64:
      return out.scalar(std::get<double>(v.data));
    case ValueType::boolean:
      return out.scalar<std::uint8_t>(std::get<bool>(v.data) ? 1 : 0);
    case ValueType::string:
      return out.string(std::get<std::string>(v.data));
    case ValueType::array: {
      const auto& items = std::get<Value::Array>(v.data);
      out.scalar(static_cast<std::uint32_t>(v.element_type));
      out.scalar<std::uint64_t>(items.size());
      for (const auto& item : items) write_value(out, item);
      return;
    }
  }
}

// A value whose variant alternative matches its declared type, recursively;
// anything else would write a file the reader rejects.
bool consistent(const Value& v) {
  switch (v.type) {
    case ValueType::uint8:
    case ValueType::uint16:
    case ValueType::uint32:
    case ValueType::uint64:
      return std::holds_alternative<std::uint64_t>(v.data);
    case ValueType::int8:
    case ValueType::int16:
    case ValueType::int32:
    case ValueType::int64:
      return std::holds_alternative<std::int64_t>(v.data);
    case ValueType::float32:
    case ValueType::float64:
      return std::holds_alternative<double>(v.data);
    case ValueType::boolean:
      return std::holds_alternative<bool>(v.data);
    case ValueType::string:
      return std::holds_alternative<std::string>(v.data);
    case ValueType::array: {
      const auto* items = v.as_array();
      if (items == nullptr) return false;
      for (const auto& item : *items) {
        if (item.type != v.element_type || !consistent(item)) return false;
      }
      return true;
    }
  }
  return false;
}

void encode_row(DType type, const float* x, std::int64_t n, std::vector<std::byte>& out) {
  out.resize(row_bytes(type, n));
  switch (type) {
    case DType::f32:
      std::memcpy(out.data(), x, out.size());
      return;
    case DType::f16:
    case DType::bf16: {
      auto* h = reinterpret_cast<std::uint16_t*>(out.data());
      for (std::int64_t i = 0; i < n; ++i) h[i] = type == DType::f16 ? f32_to_fp16(x[i]) : f32_to_bf16(x[i]);
      return;
    }
    case DType::q8_0:
      cpu::quantize_row_q8_0(x, reinterpret_cast<BlockQ8_0*>(out.data()), n);
      return;
    case DType::q4_0:
      cpu::quantize_row_q4_0(x, reinterpret_cast<BlockQ4_0*>(out.data()), n);
      return;
  }
}

}  // namespace

Writer::Writer(std::size_t alignment) : alignment_(alignment) {
  if (alignment < 8 || !std::has_single_bit(alignment)) {
    throw std::invalid_argument("GGUF alignment must be a power of two of at least 8");
  }
}

void Writer::add(std::string key, Value value) {
  if (key == "general.alignment") throw std::invalid_argument("general.alignment is set by the writer");
  if (!consistent(value)) throw std::invalid_argument("metadata '" + key + "': value does not match its type");
  for (const auto& m : metadata_) {
    if (m.key == key) throw std::invalid_argument("duplicate metadata key '" + key + "'");
  }
  metadata_.push_back({std::move(key), std::move(value)});
}

void Writer::check_new_tensor(const std::string& name, const std::vector<std::int64_t>& ne, std::int64_t block) const {
  if (ne.empty() || ne.size() > kMaxDims) throw std::invalid_argument("tensor '" + name + "': 1 to 4 dimensions");
  for (auto n : ne) {
    if (n <= 0) throw std::invalid_argument("tensor '" + name + "': dimensions must be positive");
  }
  if (ne[0] % block != 0) {
    throw std::invalid_argument("tensor '" + name + "': quantised rows need a multiple of " + std::to_string(block) +
                                " elements");
  }
  for (const auto& t : tensors_) {
    if (t.name == name) throw std::invalid_argument("duplicate tensor name '" + name + "'");
  }
}

void Writer::add_tensor(std::string name, std::vector<std::int64_t> ne, DType type) {
  check_new_tensor(name, ne, type == DType::q8_0 || type == DType::q4_0 ? kQuantBlock : 1);
  tensors_.push_back({std::move(name), std::move(ne), type, std::nullopt, {}});
}

void Writer::add_tensor_blocks(std::string name, std::vector<std::int64_t> ne, BlockType type,
                               std::vector<std::byte> data) {
  const BlockLayout& l = layout(type);
  check_new_tensor(name, ne, l.values);
  std::int64_t elements = 1;
  for (auto n : ne) elements *= n;
  if (data.size() != static_cast<std::size_t>(elements / l.values) * l.bytes) {
    throw std::invalid_argument("tensor '" + name + "': " + std::to_string(data.size()) + " bytes of " +
                                std::string(l.name) + " blocks for " + std::to_string(elements) + " values");
  }
  tensors_.push_back({std::move(name), std::move(ne), DType::q8_0, type, std::move(data)});
}

void Writer::write(const std::string& path, const RowSource& rows) const {
  OutputFile out(path);
  out.scalar(kMagic);
  out.scalar<std::uint32_t>(3);
  out.scalar<std::uint64_t>(tensors_.size());
  out.scalar<std::uint64_t>(metadata_.size() + 1);
  out.string("general.alignment");
  out.scalar(static_cast<std::uint32_t>(ValueType::uint32));
  out.scalar(static_cast<std::uint32_t>(alignment_));
  for (const auto& m : metadata_) {
    out.string(m.key);
    out.scalar(static_cast<std::uint32_t>(m.value.type));
    write_value(out, m.value);
  }

  std::uint64_t offset = 0;
  for (const auto& t : tensors_) {
    out.string(t.name);
    out.scalar(static_cast<std::uint32_t>(t.ne.size()));
    std::int64_t n_rows = 1;
    for (auto n : t.ne) out.scalar(static_cast<std::uint64_t>(n));
    for (std::size_t d = 1; d < t.ne.size(); ++d) n_rows *= t.ne[d];
    out.scalar(t.blocks ? layout(*t.blocks).ggml_id : ggml_type_id(t.type));
    out.scalar(offset);
    std::uint64_t bytes = t.blocks ? t.data.size() : static_cast<std::uint64_t>(n_rows) * row_bytes(t.type, t.ne[0]);
    offset += (bytes + alignment_ - 1) / alignment_ * alignment_;
  }

  std::vector<float> row;
  std::vector<std::byte> encoded;
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    out.pad_to(alignment_);
    if (t.blocks) {
      out.bytes(t.data.data(), t.data.size());
      continue;
    }
    std::int64_t n_rows = 1;
    for (std::size_t d = 1; d < t.ne.size(); ++d) n_rows *= t.ne[d];
    row.assign(static_cast<std::size_t>(t.ne[0]), 0.0f);
    for (std::int64_t r = 0; r < n_rows; ++r) {
      rows(i, r, row.data());
      encode_row(t.type, row.data(), t.ne[0], encoded);
      out.bytes(encoded.data(), encoded.size());
    }
  }
  out.close();
}

}  // namespace gguf
}  // namespace tollgate::local_engine
