// Greedy generation over the KV cache: the prompt (prefill), then one token per step (decode),
// with the same stops as runner.generate.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "llm_program.h"

namespace spinquant {

struct GenerationStats {
  size_t prompt_tokens = 0;
  size_t new_tokens = 0;
  double time_to_first_token_s = 0;
  double prefill_tokens_per_s = 0;
  double decode_tokens_per_s = 0;  // NaN with fewer than two new tokens

  // The line runner.generate prints, so both runners' speeds read the same way.
  std::string line() const;
};

struct Generation {
  std::vector<int64_t> tokens;  // new tokens, without the end token
  GenerationStats stats;
};

// Stops at any of the program's end tokens, after max_new_tokens, or when the cache is full.
Generation generate_greedy(
    LlmProgram& program,
    const std::vector<int64_t>& prompt,
    int64_t max_new_tokens,
    const std::function<void(int64_t)>& on_token);

}  // namespace spinquant
