// A small Prometheus registry: counters, gauges and histograms with labels,
// rendered in the text exposition format (version 0.0.4). Thread-safe; the hot
// path is a lock-free atomic update once a series is looked up.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate::metering {

class Counter {
 public:
  void inc(double v = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void set(double v) { value_.store(v, std::memory_order_relaxed); }
  void add(double v);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  explicit Histogram(const std::vector<double>& upper_bounds);
  void observe(double v);
  // Snapshot for rendering: cumulative counts per bound, then +Inf; sum.
  std::vector<std::uint64_t> cumulative_counts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> counts_;  // bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

// Orders label-value lists, and lets a list of views find a stored list
// without building one: the per-request lookups allocate nothing.
struct LabelValuesLess {
  using is_transparent = void;
  template <class A, class B>
  bool operator()(const A& a, const B& b) const {
    return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end(),
                                        [](std::string_view x, std::string_view y) { return x < y; });
  }
};

// All series of one metric name, keyed by label values (in label-name order).
template <class Series>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::function<std::unique_ptr<Series>()> make);
  // Finds or creates the series; the reference stays valid for the registry's life.
  Series& labels(std::initializer_list<std::string_view> values);
  Series& labels(const std::vector<std::string>& values);

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  // Calls f(label_values, series) for each series in a stable order.
  void for_each(const std::function<void(const std::vector<std::string>&, const Series&)>& f) const;

 private:
  std::string name_, help_;
  std::vector<std::string> label_names_;
  std::function<std::unique_ptr<Series>()> make_;
  mutable std::mutex mutex_;
  std::map<std::vector<std::string>, std::unique_ptr<Series>, LabelValuesLess> series_;
};

class Registry {
 public:
  Family<Counter>& counter(std::string name, std::string help, std::vector<std::string> label_names = {});
  Family<Gauge>& gauge(std::string name, std::string help, std::vector<std::string> label_names = {});
  Family<Histogram>& histogram(std::string name, std::string help, std::vector<std::string> label_names,
                               std::vector<double> upper_bounds);
  // A collector appends complete metric families (HELP, TYPE, samples) at render
  // time: for values read on demand, such as process statistics.
  void add_collector(std::function<void(std::string& out)> collector);

  std::string render() const;

 private:
  mutable std::mutex mutex_;
  // Registration order is rendering order.
  std::vector<std::unique_ptr<Family<Counter>>> counters_;
  std::vector<std::unique_ptr<Family<Gauge>>> gauges_;
  std::vector<std::unique_ptr<Family<Histogram>>> histograms_;
  std::vector<std::function<void(std::string&)>> collectors_;
  // One renderer per family, in registration order whatever the family's type.
  std::vector<std::function<void(std::string&)>> family_renderers_;

  void check_new_name(const std::string& name) const;  // requires mutex_
};

// process_resident_memory_bytes, process_virtual_memory_bytes,
// process_cpu_seconds_total, process_open_fds, process_max_fds,
// process_start_time_seconds (read from /proc at render time).
void add_process_collector(Registry& registry);

// Helpers for collectors and tests.
std::string escape_label_value(std::string_view v);
std::string format_sample_value(double v);  // Prometheus float formatting (+Inf, NaN, integers without exponent)

// Bucket bounds in seconds suited to request latencies from 100 µs to 60 s.
std::vector<double> latency_buckets();

}  // namespace tollgate::metering
