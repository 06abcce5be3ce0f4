#include "metering/metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>

namespace tollgate::metering {

namespace {

bool is_name_start(char c, bool colon_ok) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon_ok && c == ':');
}

bool is_name_char(char c, bool colon_ok) { return is_name_start(c, colon_ok) || (c >= '0' && c <= '9'); }

// Metric names: [a-zA-Z_:][a-zA-Z0-9_:]*; label names: [a-zA-Z_][a-zA-Z0-9_]*.
bool valid_name(std::string_view name, bool colon_ok) {
  if (name.empty() || !is_name_start(name.front(), colon_ok)) return false;
  return std::all_of(name.begin() + 1, name.end(), [&](char c) { return is_name_char(c, colon_ok); });
}

void check_label_names(const std::string& metric, const std::vector<std::string>& names, bool histogram) {
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& n = names[i];
    // "__" names are reserved for Prometheus itself; "le" carries histogram bucket bounds.
    if (!valid_name(n, false) || n.starts_with("__") || (histogram && n == "le")) {
      throw std::invalid_argument("metric " + metric + ": invalid label name \"" + n + "\"");
    }
    if (std::find(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(i), n) !=
        names.begin() + static_cast<std::ptrdiff_t>(i)) {
      throw std::invalid_argument("metric " + metric + ": duplicate label name \"" + n + "\"");
    }
  }
}

std::string escape_help(std::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

void append_header(std::string& out, const std::string& name, const std::string& help, std::string_view type) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += escape_help(help);
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

// `name{l1="v1",...,extra="value"} sample\n`; no braces when there are no labels.
void append_sample(std::string& out, std::string_view name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& label_values, double value, std::string_view extra_label = {},
                   std::string_view extra_value = {}) {
  out += name;
  if (!label_names.empty() || !extra_label.empty()) {
    out += '{';
    bool first = true;
    auto add = [&](std::string_view n, std::string_view v) {
      if (!first) out += ',';
      first = false;
      out += n;
      out += "=\"";
      out += escape_label_value(v);
      out += '"';
    };
    for (std::size_t i = 0; i < label_names.size(); ++i) add(label_names[i], label_values[i]);
    if (!extra_label.empty()) add(extra_label, extra_value);
    out += '}';
  }
  out += ' ';
  out += format_sample_value(value);
  out += '\n';
}

void render_family(std::string& out, const Family<Counter>& f) {
  append_header(out, f.name(), f.help(), "counter");
  f.for_each([&](const std::vector<std::string>& values, const Counter& c) {
    append_sample(out, f.name(), f.label_names(), values, c.value());
  });
}

void render_family(std::string& out, const Family<Gauge>& f) {
  append_header(out, f.name(), f.help(), "gauge");
  f.for_each([&](const std::vector<std::string>& values, const Gauge& g) {
    append_sample(out, f.name(), f.label_names(), values, g.value());
  });
}

void render_family(std::string& out, const Family<Histogram>& f) {
  append_header(out, f.name(), f.help(), "histogram");
  const std::string bucket = f.name() + "_bucket";
  const std::string sum = f.name() + "_sum";
  const std::string count = f.name() + "_count";
  f.for_each([&](const std::vector<std::string>& values, const Histogram& h) {
    const std::vector<std::uint64_t> cumulative = h.cumulative_counts();
    const double total = static_cast<double>(cumulative.back());
    for (std::size_t i = 0; i < h.bounds().size(); ++i) {
      append_sample(out, bucket, f.label_names(), values, static_cast<double>(cumulative[i]), "le",
                    format_sample_value(h.bounds()[i]));
    }
    append_sample(out, bucket, f.label_names(), values, total, "le", "+Inf");
    append_sample(out, sum, f.label_names(), values, h.sum());
    append_sample(out, count, f.label_names(), values, total);
  });
}

}  // namespace

void Counter::inc(double v) { value_.fetch_add(v, std::memory_order_relaxed); }

void Gauge::add(double v) { value_.fetch_add(v, std::memory_order_relaxed); }

Histogram::Histogram(const std::vector<double>& upper_bounds) : bounds_(upper_bounds) {
  if (std::any_of(bounds_.begin(), bounds_.end(), [](double b) { return std::isnan(b); })) {
    throw std::invalid_argument("histogram bucket bound is NaN");
  }
  std::sort(bounds_.begin(), bounds_.end());
  bounds_.erase(std::unique(bounds_.begin(), bounds_.end()), bounds_.end());
  // The +Inf bucket is always rendered; an explicit one would duplicate it.
  if (!bounds_.empty() && std::isinf(bounds_.back()) && bounds_.back() > 0) bounds_.pop_back();
  counts_ = std::make_unique<std::atomic<std::uint64_t>[]>(bounds_.size() + 1);
}

void Histogram::observe(double v) {
  // NaN compares false with every bound; like client_golang, it lands in +Inf.
  const std::size_t i =
      std::isnan(v) ? bounds_.size()
                    : static_cast<std::size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<std::uint64_t> Histogram::cumulative_counts() const {
  std::vector<std::uint64_t> out(bounds_.size() + 1);
  std::uint64_t running = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

template <class Series>
Family<Series>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                       std::function<std::unique_ptr<Series>()> make)
    : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)), make_(std::move(make)) {
  // A family without labels has exactly one series; create it now so it renders as 0.
  if (label_names_.empty()) series_.emplace(std::vector<std::string>{}, make_());
}

template <class Series>
Series& Family<Series>::labels(std::initializer_list<std::string_view> values) {
  if (values.size() == label_names_.size()) {
    std::lock_guard lock(mutex_);
    if (auto it = series_.find(values); it != series_.end()) return *it->second;
  }
  return labels(std::vector<std::string>(values.begin(), values.end()));
}

template <class Series>
Series& Family<Series>::labels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    throw std::invalid_argument("metric " + name_ + " takes " + std::to_string(label_names_.size()) +
                                " label values, got " + std::to_string(values.size()));
  }
  std::lock_guard lock(mutex_);
  auto it = series_.find(values);
  if (it == series_.end()) it = series_.emplace(values, make_()).first;
  return *it->second;
}

template <class Series>
void Family<Series>::for_each(const std::function<void(const std::vector<std::string>&, const Series&)>& f) const {
  std::lock_guard lock(mutex_);
  for (const auto& [values, series] : series_) f(values, *series);
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

void Registry::check_new_name(const std::string& name) const {
  if (!valid_name(name, true)) throw std::invalid_argument("invalid metric name \"" + name + "\"");
  auto taken = [&](const auto& families) {
    return std::any_of(families.begin(), families.end(), [&](const auto& f) { return f->name() == name; });
  };
  if (taken(counters_) || taken(gauges_) || taken(histograms_)) {
    throw std::invalid_argument("metric " + name + " is already registered");
  }
}

Family<Counter>& Registry::counter(std::string name, std::string help, std::vector<std::string> label_names) {
  std::lock_guard lock(mutex_);
  check_new_name(name);
  check_label_names(name, label_names, false);
  auto& family = *counters_.emplace_back(std::make_unique<Family<Counter>>(
      std::move(name), std::move(help), std::move(label_names), [] { return std::make_unique<Counter>(); }));
  family_renderers_.emplace_back([&family](std::string& out) { render_family(out, family); });
  return family;
}

Family<Gauge>& Registry::gauge(std::string name, std::string help, std::vector<std::string> label_names) {
  std::lock_guard lock(mutex_);
  check_new_name(name);
  check_label_names(name, label_names, false);
  auto& family = *gauges_.emplace_back(std::make_unique<Family<Gauge>>(
      std::move(name), std::move(help), std::move(label_names), [] { return std::make_unique<Gauge>(); }));
  family_renderers_.emplace_back([&family](std::string& out) { render_family(out, family); });
  return family;
}

Family<Histogram>& Registry::histogram(std::string name, std::string help, std::vector<std::string> label_names,
                                       std::vector<double> upper_bounds) {
  std::lock_guard lock(mutex_);
  check_new_name(name);
  check_label_names(name, label_names, true);
  const Histogram validated(upper_bounds);  // throws on bad bounds before anything is registered
  auto& family = *histograms_.emplace_back(std::make_unique<Family<Histogram>>(
      std::move(name), std::move(help), std::move(label_names),
      [bounds = validated.bounds()] { return std::make_unique<Histogram>(bounds); }));
  family_renderers_.emplace_back([&family](std::string& out) { render_family(out, family); });
  return family;
}

void Registry::add_collector(std::function<void(std::string& out)> collector) {
  std::lock_guard lock(mutex_);
  collectors_.push_back(std::move(collector));
}

std::string Registry::render() const {
  std::string out;
  std::lock_guard lock(mutex_);
  for (const auto& render_family : family_renderers_) render_family(out);
  for (const auto& collect : collectors_) collect(out);
  return out;
}

std::string escape_label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string format_sample_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // Integers below 2^53 are exact in a double: print them as integers, so a
  // counter of 100000 reads "100000", not "1e+05".
  constexpr double kExactIntegers = 9007199254740992.0;
  if (std::trunc(v) == v && std::fabs(v) < kExactIntegers) {
    return std::to_string(static_cast<std::int64_t>(v));
  }
  // Shortest round-trip digits in %g style, as client_golang formats them.
  char buf[32];
  const auto result = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::general);
  return std::string(buf, result.ptr);
}

std::vector<double> latency_buckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace tollgate::metering
