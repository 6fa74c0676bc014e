// spinquant_runner: greedy generation with a .pte from `python -m export.to_pte`, in C++ as an
// app runs it. See ../README.md.
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#include "greedy.h"
#include "llm_program.h"
#include "options.h"
#include "runner_error.h"
#include "text.h"

namespace spinquant {
namespace {

std::string joined(const std::vector<int64_t>& ids) {
  std::ostringstream out;
  for (size_t i = 0; i < ids.size(); ++i) {
    out << (i ? "," : "") << ids[i];
  }
  return out.str();
}

void require_file(const std::string& path, const std::string& what) {
  if (!std::ifstream(path).good()) {
    throw RunnerError(what + " not found: " + path);
  }
}

int run(const Options& options) {
  require_file(options.pte, "program");
  std::optional<Text> text;
  std::vector<int64_t> prompt;
  if (options.prompt) {
    require_file(options.tokenizer, "tokenizer");
    text.emplace(options.tokenizer);
    prompt = text->encode(*options.prompt);
  } else {
    prompt = *options.ids;
  }
  LlmProgram program(options.pte);
  int64_t previous = prompt.empty() ? 0 : prompt.back();
  auto stream_text = [&](int64_t token) {
    if (text) {
      std::cout << text->piece(previous, token) << std::flush;
      previous = token;
    }
  };
  const Generation generation = generate_greedy(program, prompt, options.max_new_tokens, stream_text);
  std::cout << (text ? "" : joined(generation.tokens)) << std::endl;
  std::cerr << "generated ids: " << joined(generation.tokens) << "\n" << generation.stats.line() << std::endl;
  return 0;
}

}  // namespace
}  // namespace spinquant

int main(int argc, char** argv) {
  try {
    const auto options = spinquant::parse_options(argc, argv);
    if (!options) {
      std::cout << spinquant::usage();
      return 0;
    }
    return spinquant::run(*options);
  } catch (const spinquant::RunnerError& e) {
    std::cerr << "spinquant_runner: error: " << e.what() << "\n";
    return 2;
  }
}
