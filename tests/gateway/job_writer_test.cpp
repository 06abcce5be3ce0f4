// The jobs table's group commit (gateway/job_writer.hpp) on a real SQLite
// file: writes queued together commit in one transaction and each is
// answered; a write the store refuses fails alone; a broken store fails its
// batch and the writer goes on; threads writing at once all land.
#include <catch2/catch.hpp>

#include <sqlite3.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "gateway/job_writer.hpp"
#include "metering/store.hpp"
#include "../metering/temp_database.hpp"

namespace {

using tollgate::gateway::JobWriter;
using tollgate::metering::JobRecord;
using tollgate::metering::JobState;
using tollgate::metering::JobWrite;
using tollgate::metering::open_sqlite_store;
using tollgate::metering::test::TempDatabase;

JobWrite insert(std::string id) {
  JobWrite w;
  w.insert = true;
  w.record.id = std::move(id);
  w.record.endpoint = "e";
  w.record.user_id = 1;
  w.record.key_id = 1;
  w.record.request = R"({"input":{"prompt":"p"}})";
  w.record.created_at = 1'000;
  w.record.execution_timeout_ms = 60'000;
  w.record.ttl_ms = 60'000;
  return w;
}

JobWrite finish(std::string id) {
  auto w = insert(std::move(id));
  w.insert = false;
  w.record.state = JobState::completed;
  w.record.output = R"({"text":"done"})";
  w.record.finished_at = 2'000;
  w.record.expires_at = 62'000;
  return w;
}

}  // namespace

TEST_CASE("job writes queued together commit in one transaction, and each is answered", "[gateway][jobs]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  JobWriter writer(*store);
  std::vector<std::uint64_t> tickets;
  for (int i = 0; i < 50; ++i) tickets.push_back(writer.enqueue(insert("job-" + std::to_string(i))));
  tickets.push_back(writer.enqueue(finish("job-7")));
  // The last ticket's hop commits them all; the hops behind it find theirs done.
  CHECK(writer.commit_through(tickets.back()));
  CHECK(writer.transactions() == 1);
  for (auto t : tickets) CHECK(writer.commit_through(t));
  CHECK(writer.transactions() == 1);

  auto other = open_sqlite_store(db.path());  // on disk, seen by another connection
  for (int i = 0; i < 50; ++i) CHECK(other->find_job("job-" + std::to_string(i)));
  auto done = other->find_job("job-7");
  REQUIRE(done);
  CHECK(done->state == JobState::completed);  // the update came after its insert
  CHECK(done->output == R"({"text":"done"})");

  // Alone, a write is its own batch.
  CHECK(writer.commit_through(writer.enqueue(insert("job-alone"))));
  CHECK(writer.transactions() == 2);
}

TEST_CASE("a job write the store refuses fails alone, the rest of its batch commits", "[gateway][jobs]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  JobWriter writer(*store);
  auto first = writer.enqueue(insert("job-a"));
  auto duplicate = writer.enqueue(insert("job-a"));  // the id exists by then
  auto other = writer.enqueue(insert("job-b"));
  auto update = writer.enqueue(finish("job-b"));
  CHECK_FALSE(writer.commit_through(duplicate));
  CHECK(writer.commit_through(first));
  CHECK(writer.commit_through(other));
  CHECK(writer.commit_through(update));
  CHECK(writer.transactions() == 1);
  CHECK(store->find_job("job-a"));
  REQUIRE(store->find_job("job-b"));
  CHECK(store->find_job("job-b")->state == JobState::completed);
  // A failure is reported once, to its own caller; asking again is not a success either.
  CHECK_FALSE(writer.commit_through(duplicate + 100));
}

TEST_CASE("a broken store fails the whole batch, and the writer goes on when it mends", "[gateway][jobs]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  JobWriter writer(*store);
  REQUIRE(writer.commit_through(writer.enqueue(insert("job-before"))));
  // Another connection moves the table away: the batch cannot be written.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(db.path().c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "ALTER TABLE jobs RENAME TO jobs_away", nullptr, nullptr, nullptr) == SQLITE_OK);
  auto a = writer.enqueue(insert("job-x"));
  auto b = writer.enqueue(insert("job-y"));
  CHECK_FALSE(writer.commit_through(b));
  CHECK_FALSE(writer.commit_through(a));
  REQUIRE(sqlite3_exec(other, "ALTER TABLE jobs_away RENAME TO jobs", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(other);
  CHECK_FALSE(store->find_job("job-x"));
  CHECK(writer.commit_through(writer.enqueue(insert("job-after"))));
  CHECK(store->find_job("job-after"));
}

TEST_CASE("threads writing jobs at once all land, each update after its insert", "[gateway][jobs]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  JobWriter writer(*store);
  constexpr int kThreads = 4, kEach = 200;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        auto id = "job-" + std::to_string(t) + "-" + std::to_string(i);
        if (!writer.commit_through(writer.enqueue(insert(id)))) ++failures;
        if (!writer.commit_through(writer.enqueue(finish(id)))) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  auto other = open_sqlite_store(db.path());
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kEach; i += 37) {
      auto job = other->find_job("job-" + std::to_string(t) + "-" + std::to_string(i));
      REQUIRE(job);
      CHECK(job->state == JobState::completed);
    }
  }
  CHECK(other->unfinished_jobs().empty());
}
