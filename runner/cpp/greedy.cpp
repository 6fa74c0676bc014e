#include "greedy.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "runner_error.h"

namespace spinquant {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// In chunks of the longest call the program takes, as runner.pte.PteProgram.prefill feeds them: both runners
// then compute the same logits.
int64_t prefill(LlmProgram& program, const std::vector<int64_t>& prompt) {
  const auto chunk_len = static_cast<size_t>(program.longest_call());
  int64_t next = -1;
  for (size_t start = 0; start < prompt.size(); start += chunk_len) {
    const size_t end = std::min(prompt.size(), start + chunk_len);
    std::vector<int64_t> chunk(prompt.begin() + start, prompt.begin() + end);
    next = program.greedy_next(chunk, static_cast<int64_t>(start));
  }
  return next;
}

}  // namespace

std::string GenerationStats::line() const {
  char text[256];
  std::snprintf(
      text, sizeof(text),
      "prompt %zu tokens, generated %zu; time to first token %.0f ms; prefill %.1f tokens/s; decode %.1f tokens/s",
      prompt_tokens, new_tokens, time_to_first_token_s * 1000, prefill_tokens_per_s, decode_tokens_per_s);
  return text;
}

Generation generate_greedy(
    LlmProgram& program,
    const std::vector<int64_t>& prompt,
    int64_t max_new_tokens,
    const std::function<void(int64_t)>& on_token) {
  const int64_t max_len = program.max_context_len();
  const auto prompt_len = static_cast<int64_t>(prompt.size());
  if (prompt_len < 1 || prompt_len >= max_len) {
    throw RunnerError("the prompt has " + std::to_string(prompt_len) + " tokens; the program holds 1 to " +
                      std::to_string(max_len - 1));
  }
  const auto& ends = program.eos_ids();
  Generation out;
  const auto start = Clock::now();
  int64_t token = prefill(program, prompt);
  const auto first_token_at = Clock::now();
  while (static_cast<int64_t>(out.tokens.size()) < max_new_tokens) {
    if (std::find(ends.begin(), ends.end(), token) != ends.end()) {
      break;
    }
    out.tokens.push_back(token);
    on_token(token);
    const int64_t position = prompt_len + static_cast<int64_t>(out.tokens.size()) - 1;
    if (position + 1 >= max_len || static_cast<int64_t>(out.tokens.size()) == max_new_tokens) {
      break;  // the cache is full, or no further token is wanted: skip its forward
    }
    token = program.greedy_next({token}, position);
  }
  const auto end = Clock::now();
  const double prefill_s = seconds(start, first_token_at);
  const double decode_s = seconds(first_token_at, end);
  const size_t n = out.tokens.size();
  out.stats = {prompt.size(), n, prefill_s, prompt.size() / prefill_s,
               n > 1 && decode_s > 0 ? (n - 1) / decode_s : std::nan("")};
  return out;
}

}  // namespace spinquant
