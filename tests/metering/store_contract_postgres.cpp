// The store contract on PostgreSQL: each database a new one on this test
// binary's own server (temp_postgres.hpp), which goes when the binary exits.
#include "tests/metering/store_contract.hpp"
#include "tests/metering/temp_postgres.hpp"

namespace tollgate::metering::test {

ContractDatabase::ContractDatabase() : location_(fresh_postgres_database()) {}

ContractDatabase::~ContractDatabase() = default;

}  // namespace tollgate::metering::test
