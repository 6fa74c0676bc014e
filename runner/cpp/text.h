// Text in and out through a tokenizer.json: encoded with pytorch tokenizers' HFTokenizer, the
// library ExecuTorch's own LLM runner uses (text.cpp), or refused when the runner was built
// without it (text_unavailable.cpp).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tokenizers {
class HFTokenizer;
}

namespace spinquant {

class Text {
 public:
  explicit Text(const std::string& tokenizer_json);
  ~Text();

  // Without special tokens, as runner.generate encodes a plain prompt.
  std::vector<int64_t> encode(const std::string& text) const;

  // The text `token` adds after `previous` (bytes of a character may come over several tokens).
  std::string piece(int64_t previous, int64_t token) const;

 private:
  std::unique_ptr<tokenizers::HFTokenizer> tokenizer_;
};

}  // namespace spinquant
