// Each subcommand registers its options and, when chosen, sets `action` to its runner.
#pragma once
#include <functional>

namespace CLI {
class App;
}

namespace redknot::cli {
void add_generate_command(CLI::App& app, std::function<int()>& action);
void add_tokenize_command(CLI::App& app, std::function<int()>& action);
void add_bench_command(CLI::App& app, std::function<int()>& action);
void add_profile_command(CLI::App& app, std::function<int()>& action);
void add_eval_command(CLI::App& app, std::function<int()>& action);
void add_serve_command(CLI::App& app, std::function<int()>& action);
void add_init_model_command(CLI::App& app, std::function<int()>& action);
void add_make_profile_command(CLI::App& app, std::function<int()>& action);
void add_calibrate_command(CLI::App& app, std::function<int()>& action);
}  // namespace redknot::cli
