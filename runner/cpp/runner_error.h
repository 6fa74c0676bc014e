// One exception type for failures the user can act on; main prints it as one line.
#pragma once

#include <stdexcept>
#include <string>

namespace spinquant {

class RunnerError : public std::runtime_error {
 public:
  explicit RunnerError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace spinquant
