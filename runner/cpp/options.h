// The command line: which program, which prompt (token ids or text), how many new tokens.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace spinquant {

struct Options {
  std::string pte;
  std::optional<std::vector<int64_t>> ids;  // --ids: the prompt as token ids
  std::optional<std::string> prompt;        // --prompt: the prompt as text
  std::string tokenizer;                    // tokenizer.json; default: beside the .pte
  int64_t max_new_tokens = 128;
};

std::string usage();

// Throws RunnerError for a bad command line; returns nullopt for --help.
std::optional<Options> parse_options(int argc, char** argv);

}  // namespace spinquant
