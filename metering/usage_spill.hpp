// Usage rows kept on local disk while the store cannot take them: past the
// writer's in-memory bound, and whatever is left when it stops with the store
// unreachable. The next writer on the same file (this run or the next) writes
// them to the store, oldest first.
//
// One line per row, tab-separated, text escaped. Rows already written to the
// store may be written again after a crash in the middle of a replay: on
// PostgreSQL their request ids make that harmless.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "metering/types.hpp"

namespace tollgate::metering {

class UsageSpill {
 public:
  // Rows a previous run left in `path` are pending. The file is created at the
  // first append and removed when nothing in it is pending.
  explicit UsageSpill(std::string path);

  // Appends and hands the bytes to the OS (no fsync: a crash of the process
  // loses nothing, a crash of the machine may lose the last rows).
  void append(std::span<const UsageEvent> rows);
  // Up to `max` of the oldest pending rows; lines that do not parse (cut by a
  // crash) are skipped and counted.
  std::vector<UsageEvent> peek(std::size_t max);
  // The rows of the last peek are in the store: they stop being pending.
  void consume();

  std::size_t pending() const { return pending_; }
  std::uint64_t skipped() const { return skipped_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::uint64_t read_offset_ = 0;  // bytes before the oldest pending row
  std::uint64_t peek_end_ = 0;     // where the last peek stopped
  std::size_t peeked_lines_ = 0;   // lines the last peek read, parsed or not
  std::size_t pending_ = 0;        // lines after read_offset_
  std::uint64_t skipped_ = 0;
};

// One row as a spill line (no newline) and back; nullopt for a line that is not one.
std::string spill_line(const UsageEvent& e);
std::optional<UsageEvent> parse_spill_line(std::string_view line);

}  // namespace tollgate::metering
