#include "llm_program.h"

#include <numeric>

#include <executorch/extension/tensor/tensor.h>

#include "runner_error.h"

namespace spinquant {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::from_blob;
using executorch::runtime::Error;

namespace {

std::string describe(Error error) {
  if (error == Error::OperatorMissing) {
    // ExecuTorch logs the operator's name just above; the usual cause is a kernel library
    // that was not linked (or was linked without --whole-archive).
    return "the program calls an operator this runner has no kernel for (named in the log above)";
  }
  return executorch::runtime::to_string(error);
}

}  // namespace

LlmProgram::LlmProgram(const std::string& path)
    : module_(std::make_unique<Module>(path, Module::LoadMode::Mmap)) {
  if (Error error = module_->load(); error != Error::Ok) {
    throw RunnerError("cannot load " + path + ": " + describe(error));
  }
  if (Error error = module_->load_method("forward"); error != Error::Ok) {
    throw RunnerError("cannot load the forward method of " + path + ": " + describe(error));
  }
  max_context_len_ = constant_int("get_max_context_len");
  longest_call_ = constant_int("get_max_seq_len");
  eos_ids_ = constant_ints("get_eos_ids");
}

int64_t LlmProgram::constant_int(const std::string& method) {
  auto values = constant_ints(method);
  if (values.size() != 1) {
    throw RunnerError("the program's " + method + " returns " + std::to_string(values.size()) + " values, not 1");
  }
  return values[0];
}

std::vector<int64_t> LlmProgram::constant_ints(const std::string& method) {
  auto result = module_->execute(method);
  if (!result.ok()) {
    throw RunnerError("the program has no usable " + method + " method (" + describe(result.error()) +
                      "): was it made by python -m export.to_pte?");
  }
  std::vector<int64_t> values;
  for (const auto& value : result.get()) {
    values.push_back(value.toInt());
  }
  return values;
}

int64_t LlmProgram::greedy_next(const std::vector<int64_t>& ids, int64_t start) {
  const auto length = static_cast<executorch::aten::SizesType>(ids.size());
  std::vector<int64_t> tokens(ids);  // from_blob wants mutable memory
  std::vector<int64_t> positions(ids.size());
  std::iota(positions.begin(), positions.end(), start);
  auto input_ids = from_blob(tokens.data(), {1, length}, ScalarType::Long);
  auto cache_position = from_blob(positions.data(), {length}, ScalarType::Long);
  auto result = module_->forward({input_ids, cache_position});
  if (!result.ok()) {
    throw RunnerError("forward failed at position " + std::to_string(start) + ": " + describe(result.error()));
  }
  const auto& logits = result.get()[0].toTensor();
  if (logits.scalar_type() != ScalarType::Float || logits.dim() != 3) {
    throw RunnerError("forward returned logits that are not float32 [1, T, vocab]");
  }
  const int64_t vocab = logits.size(2);
  const float* last = logits.const_data_ptr<float>() + (logits.size(1) - 1) * vocab;
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (last[i] > last[best]) {
      best = i;
    }
  }
  return best;
}

}  // namespace spinquant
