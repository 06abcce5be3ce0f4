// GGUF (v2/v3, little-endian) model files: a bounds-checked reader over a
// read-only memory mapping, and a streaming writer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "local_engine/gguf_blocks.hpp"
#include "local_engine/model.hpp"
#include "local_engine/tensor.hpp"

namespace tollgate::local_engine {

// A whole file mapped read-only; throws ModelError if it cannot be opened,
// is empty, or cannot be mapped.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

namespace gguf {

// GGUF metadata value type ids.
enum class ValueType : std::uint32_t {
  uint8 = 0,
  int8 = 1,
  uint16 = 2,
  int16 = 3,
  uint32 = 4,
  int32 = 5,
  float32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  uint64 = 10,
  int64 = 11,
  float64 = 12,
};

std::string_view value_type_name(ValueType type);

// One metadata value of any GGUF type; arrays hold values of one element type
// (possibly arrays themselves).
struct Value {
  using Array = std::vector<Value>;

  ValueType type = ValueType::uint32;
  ValueType element_type = ValueType::uint32;  // arrays only (kept for empty arrays)
  // uint8..uint64 as uint64_t, int8..int64 as int64_t, float32/float64 as double.
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string, Array> data;

  bool operator==(const Value&) const = default;

  static Value unsigned_integer(ValueType type, std::uint64_t v);  // uint8/16/32/64
  static Value signed_integer(ValueType type, std::int64_t v);     // int8/16/32/64
  static Value real(ValueType type, double v);                     // float32/64
  static Value u32(std::uint32_t v) { return unsigned_integer(ValueType::uint32, v); }
  static Value i32(std::int32_t v) { return signed_integer(ValueType::int32, v); }
  static Value f32(float v) { return real(ValueType::float32, v); }
  static Value boolean(bool v);
  static Value string(std::string v);
  static Value array(ValueType element_type, Array items);
  static Value strings(const std::vector<std::string>& items);
  static Value floats(const std::vector<float>& items);
  static Value int32s(const std::vector<std::int32_t>& items);

  // Integer of any width, if it fits; nullopt for other types.
  std::optional<std::int64_t> as_integer() const;
  std::optional<double> as_real() const;  // float32/float64
  const std::string* as_string() const;
  const Array* as_array() const;
};

struct Metadatum {
  std::string key;
  Value value;
};

// A tensor as the file describes it. ne[0] is the contiguous dimension, so as
// a Tensor it has cols = ne[0] and rows = the product of the others.
struct TensorInfo {
  std::string name;
  std::vector<std::int64_t> ne;
  // The engine's type; for a block type it converts at load (`blocks`), the
  // type it converts to (Q8_0).
  DType type = DType::f32;
  std::optional<BlockType> blocks;
  std::uint64_t offset = 0;  // from the start of the data section
  const std::byte* data = nullptr;
  std::size_t bytes = 0;

  std::int64_t cols() const { return ne.empty() ? 1 : ne[0]; }
  std::int64_t rows() const;
  std::int64_t elements() const { return rows() * cols(); }
  std::string_view type_name() const { return blocks ? layout(*blocks).name : dtype_name(type); }
  // The data as the engine reads it; not for a tensor in `blocks`, whose
  // data must be converted first.
  Tensor tensor() const { return Tensor{type, data, rows(), cols()}; }
};

inline constexpr std::uint32_t kDefaultAlignment = 32;

// A parsed GGUF file. Everything is validated on construction (magic, version,
// counts against the bytes left, value types, tensor types, dimensions,
// alignment, data within the file); failures are ModelErrors that name the
// file, the item being read and the offset.
class File {
 public:
  explicit File(const std::string& path);
  explicit File(std::shared_ptr<const MappedFile> mapping);

  std::uint32_t version() const { return version_; }
  std::size_t alignment() const { return alignment_; }
  std::size_t data_offset() const { return data_offset_; }
  const std::vector<Metadatum>& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::shared_ptr<const MappedFile>& mapping() const { return mapping_; }
  const std::string& path() const { return mapping_->path(); }

  const Value* find(std::string_view key) const;
  const TensorInfo* find_tensor(std::string_view name) const;

  // Typed look-ups: nullopt when the key is absent, ModelError naming the key
  // when it holds another type.
  std::optional<std::string> get_string(std::string_view key) const;
  std::optional<std::int64_t> get_integer(std::string_view key) const;
  std::optional<double> get_real(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::vector<std::string>> get_strings(std::string_view key) const;
  std::optional<std::vector<float>> get_floats(std::string_view key) const;
  std::optional<std::vector<std::int64_t>> get_integers(std::string_view key) const;

 private:
  std::shared_ptr<const MappedFile> mapping_;
  std::uint32_t version_ = 0;
  std::size_t alignment_ = kDefaultAlignment;
  std::size_t data_offset_ = 0;
  std::vector<Metadatum> metadata_;
  std::vector<TensorInfo> tensors_;
};

// Fills `out` (ne[0] floats) with row `row` of tensor number `tensor`, in the
// order the tensors were added. Called once per row, in file order.
using RowSource = std::function<void(std::size_t tensor, std::int64_t row, float* out)>;

// Writes a GGUF v3 file. Tensor data is produced row by row from f32 (converted
// to F16/BF16 or quantised to Q8_0/Q4_0), so a model never needs a second copy
// in memory.
class Writer {
 public:
  explicit Writer(std::size_t alignment = kDefaultAlignment);

  // Keys must be unique; general.alignment is written by the writer itself.
  void add(std::string key, Value value);
  // Throws std::invalid_argument for empty or non-positive shapes, duplicate
  // names, or a quantised type whose ne[0] is not a multiple of 32.
  void add_tensor(std::string name, std::vector<std::int64_t> ne, DType type);
  // A tensor of a block type the writer cannot encode, as its blocks (for
  // tests of the loader's conversions); the row source is not asked for it.
  void add_tensor_blocks(std::string name, std::vector<std::int64_t> ne, BlockType type, std::vector<std::byte> data);

  // Throws std::runtime_error when the file cannot be written.
  void write(const std::string& path, const RowSource& rows) const;

 private:
  struct PendingTensor {
    std::string name;
    std::vector<std::int64_t> ne;
    DType type;
    std::optional<BlockType> blocks;  // then `data` holds them
    std::vector<std::byte> data;
  };
  void check_new_tensor(const std::string& name, const std::vector<std::int64_t>& ne, std::int64_t block) const;
  std::size_t alignment_;
  std::vector<Metadatum> metadata_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace gguf
}  // namespace tollgate::local_engine
