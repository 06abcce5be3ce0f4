// Fresh databases on a real PostgreSQL server owned by the test binary, so that
// store tests can run against PostgreSQL as they do against a SQLite file.
#pragma once

#include <string>

namespace tollgate::metering::test {

// A fresh, empty database on this test binary's own PostgreSQL server, as a
// URL "postgresql://tollgate@127.0.0.1:PORT/NAME". The server is started on
// first use (initdb + pg_ctl in a new temp directory, on a free loopback port),
// and stopped and removed when the process exits. Throws std::runtime_error with
// a clear message (including the server log tail) when it cannot start.
std::string fresh_postgres_database();

// Stops this binary's server (connections are cut), and starts it again on the
// same port with the same databases.
void stop_postgres();
void start_postgres_again();

}  // namespace tollgate::metering::test
