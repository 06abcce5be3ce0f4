#include "gateway/cli.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gateway/admin.hpp"
#include "gateway/config.hpp"
#include "gateway/server.hpp"
#include "local_engine/engine.hpp"
#include "local_engine/model.hpp"
#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

constexpr const char* kUsage = R"(tollgate — LLM API gateway and metering proxy

usage:
  tollgate serve [--config FILE] [--listen HOST:PORT] [--db FILE]
  tollgate keys create --user NAME [--rpm N] [--tpm N] [--rpd N] [--tpd N]
                       [--tokens-per-month N] [--models a,b] [--expires DATE] [--db FILE]
  tollgate keys list [--user NAME] [--db FILE]
  tollgate keys revoke PREFIX [--db FILE]
  tollgate users list [--db FILE]
  tollgate users limits NAME [--rpm N] [--tpm N] [--rpd N] [--tpd N] [--tokens-per-month N] [--db FILE]
  tollgate usage [--user NAME] [--since DATE] [--by-day] [--by-model] [--json] [--db FILE]
  tollgate generate --model FILE [--tokenizer FILE] [--prompt TEXT] [--max-tokens N]
                    [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ids]
                    [--device auto|cpu|cuda|cuda-emulated]
  tollgate model info FILE [--device D]
                                   architecture, sizes and tensor types of a model file,
                                   and the device that would run it
  tollgate model init [--out FILE] [--preset demo|bench-100m|bench-1b] [--type f32|f16|bf16|q8_0|q4_0] [--seed S]
                                   write a random-weight GGUF (for demos and benchmarks)
  tollgate migrate --from FILE.db --to postgresql://...
                                   copy a SQLite installation into an empty PostgreSQL database
  tollgate config default          print the embedded default configuration
  tollgate config check FILE       validate a configuration file

Every command that reads the database takes --db FILE (or a postgresql:// URL),
or --config FILE to use the file's `database` (default ./tollgate.db). DATE is YYYY-MM-DD[THH:MM[:SS]] UTC.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parsed "--name value" options and "--flag" switches, plus positionals.
class Args {
 public:
  Args(int argc, char** argv, int first, const std::vector<std::string>& flags) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) == 0) {
        std::string name = a.substr(2);
        if (auto eq = name.find('='); eq != std::string::npos) {
          options_[name.substr(0, eq)] = name.substr(eq + 1);
        } else if (std::find(flags.begin(), flags.end(), name) != flags.end()) {
          options_[name] = "";
        } else if (i + 1 < argc) {
          options_[name] = argv[++i];
        } else {
          throw UsageError("option --" + name + " needs a value");
        }
      } else {
        positionals_.push_back(a);
      }
    }
  }

  std::optional<std::string> take(const std::string& name) {
    auto it = options_.find(name);
    if (it == options_.end()) return std::nullopt;
    auto v = it->second;
    options_.erase(it);
    return v;
  }
  bool flag(const std::string& name) { return take(name).has_value(); }
  std::optional<std::int64_t> number(const std::string& name) {
    auto v = take(name);
    if (!v) return std::nullopt;
    std::int64_t n = 0;
    auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (ec != std::errc() || end != v->data() + v->size() || n < 0) {
      throw UsageError("--" + name + " needs a non-negative integer, got '" + *v + "'");
    }
    return n;
  }
  std::optional<double> real(const std::string& name) {
    auto v = take(name);
    if (!v) return std::nullopt;
    try {
      std::size_t used = 0;
      double d = std::stod(*v, &used);
      if (used == v->size()) return d;
    } catch (const std::exception&) {
    }
    throw UsageError("--" + name + " needs a number, got '" + *v + "'");
  }
  std::vector<std::string>& positionals() { return positionals_; }
  // Anything left over is a mistake worth naming.
  void finish() {
    if (!options_.empty()) throw UsageError("unknown option --" + options_.begin()->first);
  }

 private:
  std::map<std::string, std::string> options_;
  std::vector<std::string> positionals_;
};

std::string database_path(Args& args) {
  auto db = args.take("db");
  auto config = args.take("config");
  if (db) return *db;
  if (config) return load_config_file(*config).database;
  return "./tollgate.db";
}

metering::Limits read_limits(Args& args) {
  metering::Limits l;
  l.requests_per_minute = args.number("rpm");
  l.tokens_per_minute = args.number("tpm");
  l.requests_per_day = args.number("rpd");
  l.tokens_per_day = args.number("tpd");
  l.tokens_per_month = args.number("tokens-per-month");
  return l;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::string limit_text(const metering::Limits& l) {
  std::string s;
  auto add = [&](const char* name, const std::optional<std::int64_t>& v) {
    if (v) s += (s.empty() ? "" : " ") + std::string(name) + "=" + std::to_string(*v);
  };
  add("rpm", l.requests_per_minute);
  add("tpm", l.tokens_per_minute);
  add("rpd", l.requests_per_day);
  add("tpd", l.tokens_per_day);
  add("tokens-per-month", l.tokens_per_month);
  return s.empty() ? "-" : s;
}

std::string time_text(const std::optional<metering::EpochMs>& t) {
  if (!t) return "-";
  return metering::day_string(*t);
}

int serve(Args& args) {
  auto config_path = args.take("config");
  auto listen = args.take("listen");
  auto db = args.take("db");
  args.finish();
  Config config = config_path ? load_config_file(*config_path) : embedded_default_config();
  if (listen) {
    auto a = parse_listen(*listen);
    if (!a) throw UsageError("--listen needs HOST:PORT, got '" + *listen + "'");
    config.listen = *a;
  }
  if (db) config.database = *db;
  return run_server(config);
}

int keys_create(Args& args) {
  KeyRequest request;
  auto user = args.take("user");
  if (!user) throw UsageError("keys create needs --user NAME");
  request.user = *user;
  request.limits = read_limits(args);
  if (auto models = args.take("models")) request.models = split_commas(*models);
  if (auto expires = args.take("expires")) {
    request.expires_at = metering::parse_utc_time(*expires);
    if (!request.expires_at) throw UsageError("--expires needs YYYY-MM-DD[THH:MM[:SS]], got '" + *expires + "'");
  }
  auto db = database_path(args);
  args.finish();
  // Checked before the database is opened (or created) for nothing.
  if (auto problem = metering::user_name_problem(request.user)) throw metering::StoreError(*problem);
  auto store = metering::open_store(db);
  auto created = create_key(*store, request);
  const auto& k = created.key;
  std::cout << "created key " << k.prefix << " for user " << k.user_name << " (limits: " << limit_text(k.limits)
            << "; models: " << (k.models.empty() ? "all" : boost::json::serialize(key_json(k)["models"]))
            << "; expires: " << time_text(k.expires_at) << ")\n"
            << "this is the only time the key is shown:\n"
            << created.plaintext << std::endl;
  return 0;
}

int keys_list(Args& args) {
  auto user = args.take("user");
  auto db = database_path(args);
  args.finish();
  auto store = metering::open_store(db);
  std::printf("%-14s %-20s %-10s %-10s %-10s %-20s %s\n", "PREFIX", "USER", "CREATED", "EXPIRES", "REVOKED", "MODELS",
              "LIMITS");
  for (const auto& k : store->list_keys(user ? std::optional<std::string_view>(*user) : std::nullopt)) {
    std::string models;
    for (const auto& m : k.models) models += (models.empty() ? "" : ",") + m;
    std::printf("%-14s %-20s %-10s %-10s %-10s %-20s %s\n", k.prefix.c_str(), metering::printable(k.user_name).c_str(),
                metering::day_string(k.created_at).c_str(), time_text(k.expires_at).c_str(),
                time_text(k.revoked_at).c_str(), models.empty() ? "all" : metering::printable(models).c_str(),
                limit_text(k.limits).c_str());
  }
  return 0;
}

int keys_revoke(Args& args) {
  auto db = database_path(args);
  args.finish();
  if (args.positionals().size() != 1) throw UsageError("keys revoke needs exactly one PREFIX");
  auto store = metering::open_store(db);
  auto key = store->revoke_key(args.positionals()[0], metering::now_ms());
  std::cout << "revoked key " << key.prefix << " of user " << key.user_name << std::endl;
  return 0;
}

int users_list(Args& args) {
  auto db = database_path(args);
  args.finish();
  auto store = metering::open_store(db);
  std::printf("%-24s %-10s %s\n", "USER", "CREATED", "LIMITS");
  for (const auto& u : store->list_users()) {
    std::printf("%-24s %-10s %s\n", u.name.c_str(), metering::day_string(u.created_at).c_str(),
                limit_text(u.limits).c_str());
  }
  return 0;
}

int users_limits(Args& args) {
  auto limits = read_limits(args);
  auto db = database_path(args);
  args.finish();
  if (args.positionals().size() != 1) throw UsageError("users limits needs exactly one NAME");
  const auto& name = args.positionals()[0];
  if (auto problem = metering::user_name_problem(name)) throw metering::StoreError(*problem);
  auto store = metering::open_store(db);
  auto user = store->ensure_user(name);
  store->set_user_limits(user.name, limits);
  std::cout << "limits of user " << user.name << ": " << limit_text(limits) << std::endl;
  return 0;
}

int usage(Args& args) {
  metering::UsageQuery query;
  if (auto user = args.take("user")) query.user = *user;
  if (auto since = args.take("since")) {
    query.since = metering::parse_utc_time(*since);
    if (!query.since) throw UsageError("--since needs YYYY-MM-DD, got '" + *since + "'");
  }
  query.by_day = args.flag("by-day");
  query.by_model = args.flag("by-model");
  bool as_json = args.flag("json");
  auto db = database_path(args);
  args.finish();
  auto store = metering::open_store(db);
  auto rows = store->usage(query);
  if (as_json) {
    boost::json::array data;
    for (const auto& r : rows) data.push_back(usage_row_json(r));
    std::cout << boost::json::serialize(boost::json::object{{"object", "list"}, {"data", data}}) << std::endl;
    return 0;
  }
  std::printf("%-24s %-10s %-24s %10s %8s %14s %14s\n", "USER", "DAY", "MODEL", "REQUESTS", "ERRORS", "PROMPT_TOK",
              "COMPLETION_TOK");
  for (const auto& r : rows) {
    // A model name is the client's string: escaped. By model, "-" is a call
    // that named none (refused before its body was read); otherwise "*" is all.
    const std::string model = !r.model.empty() ? metering::printable(r.model) : query.by_model ? "-" : "*";
    std::printf("%-24s %-10s %-24s %10lld %8lld %14lld %14lld\n", metering::printable(r.user).c_str(),
                r.day.empty() ? "*" : r.day.c_str(), model.c_str(), static_cast<long long>(r.requests),
                static_cast<long long>(r.errors), static_cast<long long>(r.prompt_tokens),
                static_cast<long long>(r.completion_tokens));
  }
  return 0;
}

namespace le = local_engine;

// Runs one request through the engine and prints its text as it streams (or,
// with --ids, the prompt ids after BOS and the generated ids, as llama2.c's
// reference files list them).
int generate(Args& args) {
  auto model_path = args.take("model");
  if (!model_path) throw UsageError("generate needs --model FILE");
  auto tokenizer_path = args.take("tokenizer").value_or("");
  auto prompt = args.take("prompt").value_or("");
  auto max_tokens = args.number("max-tokens").value_or(256);
  le::SamplingParams sampling;
  sampling.temperature = static_cast<float>(args.real("temperature").value_or(1.0));
  sampling.top_p = static_cast<float>(args.real("top-p").value_or(1.0));
  sampling.top_k = static_cast<std::int32_t>(args.number("top-k").value_or(0));
  auto seed = args.number("seed");
  sampling.seed = seed ? static_cast<std::uint64_t>(*seed) : std::random_device{}();
  bool print_ids = args.flag("ids");
  auto device_name = args.take("device").value_or("auto");
  args.finish();

  std::string why;
  auto device = le::make_device(device_name, 0, why);
  std::fprintf(stderr, "tollgate: %s\n", why.c_str());
  auto model = le::load_model(*model_path, tokenizer_path);
  le::Tokenizer tokenizer(model.vocab);
  le::GenerationRequest request;
  request.prompt = tokenizer.encode(prompt, model.vocab.add_bos);
  request.sampling = sampling;
  request.max_tokens = max_tokens;
  le::EngineConfig config;
  config.max_num_seqs = 1;
  // Room for exactly this request. The file's context length is advice, not
  // a wall: past it the engine warns.
  // --max-tokens 0: until EOS, within the engine's default length.
  if (max_tokens > 0) config.max_model_len = static_cast<std::int64_t>(request.prompt.size()) + max_tokens + 1;
  le::Engine engine(std::move(model), config, std::move(device));

  std::mutex mutex;
  std::condition_variable finished;
  std::optional<le::GenerationEvent> last;
  auto started = std::chrono::steady_clock::now();
  auto prompt_ids = request.prompt;
  auto submission = engine.submit(std::move(request), [&](le::GenerationEvent e) {
    if (e.type == le::GenerationEvent::Type::text) {
      if (!print_ids) std::cout << e.text << std::flush;
      return;
    }
    std::lock_guard lock(mutex);
    last = std::move(e);
    finished.notify_one();
  });
  if (submission.refusal != le::Engine::Refusal::none) throw std::runtime_error(submission.message);
  std::unique_lock lock(mutex);
  finished.wait(lock, [&] { return last.has_value(); });
  if (last->type == le::GenerationEvent::Type::error) throw std::runtime_error(last->error);
  auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (print_ids) {
    std::string line;
    bool skip_bos = !prompt_ids.empty() && prompt_ids.front() == engine.model().vocab.bos;
    for (std::size_t i = skip_bos ? 1 : 0; i < prompt_ids.size(); ++i) line += std::to_string(prompt_ids[i]) + " ";
    for (auto t : last->tokens) line += std::to_string(t) + " ";
    if (!line.empty()) line.pop_back();
    std::cout << line;
  }
  std::cout << std::endl;
  std::fprintf(stderr, "tollgate: %lld prompt + %lld generated tokens in %.3f s (%.1f tokens/s) on %s; finish: %s\n",
               static_cast<long long>(last->prompt_tokens), static_cast<long long>(last->completion_tokens), took,
               static_cast<double>(last->completion_tokens) / took, engine.device_name().c_str(),
               last->finish_reason.c_str());
  return 0;
}

int model_command(const std::string& sub, Args& args) {
  if (sub == "info") {
    auto device_name = args.take("device").value_or("auto");
    args.finish();
    if (args.positionals().size() != 1) throw UsageError("model info needs exactly one FILE");
    std::cout << le::describe_model_file(args.positionals()[0]);
    std::string why;
    auto device = le::make_device(device_name, 0, why);
    std::cout << "device: " << device->name() << "  (" << why << ")\n";
    return 0;
  }
  if (sub == "init") {
    auto out = args.take("out").value_or("./tollgate-demo.gguf");
    auto preset = args.take("preset").value_or("demo");
    auto type_name = args.take("type");
    auto seed = static_cast<std::uint64_t>(args.number("seed").value_or(42));
    args.finish();
    if (preset == "demo") {
      if (type_name) throw UsageError("--type applies to the bench presets; the demo model is Q8_0");
      le::write_demo_model(out);
    } else if (preset == "bench-100m" || preset == "bench-1b") {
      le::Hyperparams p;
      if (preset == "bench-100m") {
        // Llama-shaped, ~134M parameters: what bench/ measures decode on.
        p.dim = 768;
        p.hidden_dim = 2048;
        p.n_layers = 12;
        p.n_heads = 12;
        p.n_kv_heads = 12;
      } else {
        // TinyLlama-1.1B's shape: too large for any CPU cache, so decode is
        // bound by memory, as with a real model.
        p.dim = 2048;
        p.hidden_dim = 5632;
        p.n_layers = 22;
        p.n_heads = 32;
        p.n_kv_heads = 4;
      }
      p.vocab_size = 32000;
      p.context_length = 2048;
      std::map<std::string, le::DType> types = {{"f32", le::DType::f32},
                                                {"f16", le::DType::f16},
                                                {"bf16", le::DType::bf16},
                                                {"q8_0", le::DType::q8_0},
                                                {"q4_0", le::DType::q4_0}};
      auto type = types.find(type_name.value_or("f32"));
      if (type == types.end()) throw UsageError("--type must be one of f32, f16, bf16, q8_0, q4_0");
      le::write_random_llama_gguf(out, p, type->second, seed, "tollgate-" + preset);
    } else {
      throw UsageError("--preset must be demo, bench-100m or bench-1b");
    }
    std::cout << out << std::endl;
    return 0;
  }
  throw UsageError("unknown command 'model " + sub + "'");
}

int dispatch(int argc, char** argv) {
  std::string command = argc > 1 ? argv[1] : "";
  std::string sub = argc > 2 ? argv[2] : "";
  const std::vector<std::string> flags = {"json", "by-day", "by-model"};
  if (command == "serve") {
    Args args(argc, argv, 2, flags);
    return serve(args);
  }
  if (command == "keys" || command == "users") {
    Args args(argc, argv, 3, flags);
    if (command == "keys" && sub == "create") return keys_create(args);
    if (command == "keys" && sub == "list") return keys_list(args);
    if (command == "keys" && sub == "revoke") return keys_revoke(args);
    if (command == "users" && sub == "list") return users_list(args);
    if (command == "users" && sub == "limits") return users_limits(args);
    throw UsageError("unknown command '" + command + " " + sub + "'");
  }
  if (command == "usage") {
    Args args(argc, argv, 2, flags);
    return usage(args);
  }
  if (command == "generate") {
    Args args(argc, argv, 2, {"ids"});
    return generate(args);
  }
  if (command == "model") {
    Args args(argc, argv, 3, flags);
    return model_command(sub, args);
  }
  if (command == "migrate") {
    Args args(argc, argv, 2, flags);
    auto from = args.take("from");
    auto to = args.take("to");
    if (!from || !to) throw UsageError("migrate needs --from FILE.db and --to postgresql://...");
    args.finish();
    if (!args.positionals().empty()) throw UsageError("migrate takes no positional arguments");
    for (const auto& [table, rows] : metering::copy_sqlite_to_postgres(*from, *to)) {
      std::cout << table << ": " << rows << " rows\n";
    }
    std::cout << "migrated " << *from << " to PostgreSQL" << std::endl;
    return 0;
  }
  if (command == "config" && sub == "default") {
    std::cout << embedded_default_yaml();
    return 0;
  }
  if (command == "config" && sub == "check") {
    if (argc != 4) throw UsageError("config check needs exactly one FILE");
    load_config_file(argv[3]);
    std::cout << argv[3] << ": ok" << std::endl;
    return 0;
  }
  if (command == "help" || command == "--help" || command == "-h") {
    std::cout << kUsage;
    return 0;
  }
  throw UsageError(command.empty() ? "no command given" : "unknown command '" + command + "'");
}

}  // namespace

int run_cli(int argc, char** argv) {
  try {
    return dispatch(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "tollgate: " << e.what() << "\n\n" << kUsage;
    return 2;
  } catch (const ConfigError& e) {
    std::cerr << "tollgate: configuration error: " << e.what() << "\n";
    return 1;
  } catch (const metering::StoreError& e) {
    std::cerr << "tollgate: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tollgate: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace tollgate::gateway
