// A .pte made by `python -m export.to_pte`: forward(input_ids[1, T], cache_position[T]) -> logits
// [1, T, vocab] over a static KV cache, and the constant methods that describe it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>

namespace spinquant {

class LlmProgram {
 public:
  // Loads the program and its forward method, so that a missing kernel fails here, not mid-run.
  explicit LlmProgram(const std::string& path);

  // The KV cache's length (get_max_context_len) and the most tokens one call takes (get_max_seq_len), as
  // ExecuTorch's own runner reads them.
  int64_t max_context_len() const { return max_context_len_; }
  int64_t longest_call() const { return longest_call_; }
  const std::vector<int64_t>& eos_ids() const { return eos_ids_; }

  // Runs `ids` at positions start..start+len-1 and returns the argmax of the last position's
  // logits (the first index of the maximum, as torch.argmax).
  int64_t greedy_next(const std::vector<int64_t>& ids, int64_t start);

 private:
  int64_t constant_int(const std::string& method);
  std::vector<int64_t> constant_ints(const std::string& method);

  std::unique_ptr<executorch::extension::Module> module_;
  int64_t max_context_len_ = 0;
  int64_t longest_call_ = 0;
  std::vector<int64_t> eos_ids_;
};

}  // namespace spinquant
