#include "text.h"

#include <pytorch/tokenizers/hf_tokenizer.h>

#include "runner_error.h"

namespace spinquant {

Text::Text(const std::string& tokenizer_json) : tokenizer_(std::make_unique<tokenizers::HFTokenizer>()) {
  if (tokenizer_->load(tokenizer_json) != tokenizers::Error::Ok) {
    throw RunnerError("cannot load the tokenizer " + tokenizer_json + ": pass --tokenizer PATH/tokenizer.json");
  }
}

Text::~Text() = default;

std::vector<int64_t> Text::encode(const std::string& text) const {
  auto ids = tokenizer_->encode(text, /*bos=*/0, /*eos=*/0);
  if (!ids.ok()) {
    throw RunnerError("the tokenizer cannot encode the prompt");
  }
  return {ids.get().begin(), ids.get().end()};
}

std::string Text::piece(int64_t previous, int64_t token) const {
  auto text = tokenizer_->decode(static_cast<uint64_t>(previous), static_cast<uint64_t>(token));
  if (!text.ok()) {
    throw RunnerError("the tokenizer cannot decode token " + std::to_string(token));
  }
  return text.get();
}

}  // namespace spinquant
