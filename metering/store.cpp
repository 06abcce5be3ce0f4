#include "metering/store.hpp"

namespace tollgate::metering {

bool is_postgres_url(std::string_view database) {
  return database.starts_with("postgresql://") || database.starts_with("postgres://");
}

std::unique_ptr<Store> open_store(const std::string& database) {
  return is_postgres_url(database) ? open_postgres_store(database) : open_sqlite_store(database);
}

}  // namespace tollgate::metering
