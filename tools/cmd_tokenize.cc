// `redknot tokenize`: text on stdin -> ids as a JSON list (or --decode: ids -> text).
#include <CLI/CLI.hpp>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "core/error.h"

namespace redknot::cli {

namespace {
struct TokenizeArgs {
  std::string model;
  bool decode = false, add_special = false;
};

int run_tokenize(const TokenizeArgs& a) {
  auto tok = load_tokenizer_for(a.model, nullptr);
  if (!tok) throw Error(a.model + ": no tokenizer found");
  std::string input = read_stdin();
  if (a.decode) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(input);
    } catch (const std::exception& e) {
      throw Error(std::string("stdin is not a JSON list of ids: ") + e.what());
    }
    if (!j.is_array()) throw Error("stdin is not a JSON list of ids");
    std::vector<int32_t> ids;
    for (auto& v : j) {
      if (!v.is_number_integer()) throw Error("stdin: '" + v.dump() + "' is not a token id");
      ids.push_back(v.get<int32_t>());
    }
    std::cout << tok->decode(ids);
  } else {
    std::cout << nlohmann::json(tok->encode(input, a.add_special)).dump() << "\n";
  }
  return 0;
}
}  // namespace

void add_tokenize_command(CLI::App& app, std::function<int()>& action) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* c = app.add_subcommand("tokenize", "Tokenize stdin (or --decode a JSON id list)");
  c->add_option("--model", a->model, "model dir, GGUF file or tokenizer.json")->required();
  c->add_flag("--decode", a->decode, "decode a JSON list of ids read from stdin");
  c->add_flag("--add-special", a->add_special, "add BOS etc. as the tokenizer config says");
  c->callback([a, &action] { action = [a] { return run_tokenize(*a); }; });
}

}  // namespace redknot::cli
