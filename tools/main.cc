// redknot: the command-line entry point (generate, tokenize, bench, ...).
#include <CLI/CLI.hpp>
#include <iostream>

#include "commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"RedKnot: head-aware long-context LLM inference"};
  app.require_subcommand(1);
  std::function<int()> action;
  redknot::cli::add_generate_command(app, action);
  redknot::cli::add_tokenize_command(app, action);
  redknot::cli::add_bench_command(app, action);
  redknot::cli::add_profile_command(app, action);
  redknot::cli::add_eval_command(app, action);
  redknot::cli::add_serve_command(app, action);
  redknot::cli::add_init_model_command(app, action);
  redknot::cli::add_make_profile_command(app, action);
  redknot::cli::add_calibrate_command(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return action ? action() : 0;
  } catch (const redknot::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
