#include "options.h"

#include <sstream>

#include "runner_error.h"

namespace spinquant {

namespace {

int64_t parse_int(const std::string& flag, const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw RunnerError(flag + " " + text + ": not an integer");
  }
  return value;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ',');) {
    ids.push_back(parse_int("--ids", item));
  }
  if (ids.empty()) {
    throw RunnerError("--ids: give at least one token id, as 1,2,3");
  }
  return ids;
}

std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

std::string usage() {
  return "usage: spinquant_runner --pte MODEL.pte (--ids 1,2,3 | --prompt TEXT [--tokenizer tokenizer.json])\n"
         "                        [--max-new-tokens N]\n"
         "Greedy generation with a .pte from python -m export.to_pte. Prints the new text (--prompt) or\n"
         "token ids (--ids) on stdout; the new token ids and the prefill/decode speed on stderr.\n";
}

std::optional<Options> parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      return std::nullopt;
    }
    if (i + 1 >= argc) {
      throw RunnerError(flag + ": unknown option or missing value");
    }
    const std::string value = argv[++i];
    if (flag == "--pte") {
      options.pte = value;
    } else if (flag == "--ids") {
      options.ids = parse_ids(value);
    } else if (flag == "--prompt") {
      options.prompt = value;
    } else if (flag == "--tokenizer") {
      options.tokenizer = value;
    } else if (flag == "--max-new-tokens") {
      options.max_new_tokens = parse_int(flag, value);
    } else {
      throw RunnerError(flag + ": unknown option");
    }
  }
  if (options.pte.empty()) {
    throw RunnerError("--pte is required");
  }
  if (options.ids.has_value() == options.prompt.has_value()) {
    throw RunnerError("give exactly one of --ids and --prompt");
  }
  if (options.max_new_tokens < 0) {
    throw RunnerError("--max-new-tokens " + std::to_string(options.max_new_tokens) + " must be at least 0");
  }
  if (options.tokenizer.empty()) {
    options.tokenizer = directory_of(options.pte) + "/tokenizer.json";
  }
  return options;
}

}  // namespace spinquant
