// Text for a runner built with SPINQUANT_RUNNER_TOKENIZER=OFF: token ids only.
#include "text.h"

#include "runner_error.h"

// A complete type for Text's unique_ptr member to destroy; never constructed.
namespace tokenizers {
class HFTokenizer {};
}  // namespace tokenizers

namespace spinquant {

Text::Text(const std::string&) {
  throw RunnerError("this runner was built without a tokenizer (SPINQUANT_RUNNER_TOKENIZER=OFF): pass --ids");
}

Text::~Text() = default;

std::vector<int64_t> Text::encode(const std::string&) const { return {}; }

std::string Text::piece(int64_t, int64_t) const { return {}; }

}  // namespace spinquant
