# spinquant_tokenizer: pytorch tokenizers, the C++ library ExecuTorch's own LLM runner uses, as
# the pytorch-tokenizers wheel carries it: its headers, and the compiled library inside its Python
# extension, which exports the C++ classes (its Python symbols resolve from libpython). The headers
# include re2's and nlohmann/json's, which the wheel does not ship: on Debian/Ubuntu
# `apt-get install libre2-dev nlohmann-json3-dev`. Nothing of re2 is linked from there: the
# extension carries its own.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c
          "import importlib.util as u; print(u.find_spec('pytorch_tokenizers').submodule_search_locations[0])"
  OUTPUT_VARIABLE _spinquant_tokenizers_dir
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _spinquant_tokenizers_found
  ERROR_QUIET
)
file(GLOB _spinquant_tokenizers_library "${_spinquant_tokenizers_dir}/pytorch_tokenizers_cpp*.so")
if(NOT _spinquant_tokenizers_found EQUAL 0 OR NOT _spinquant_tokenizers_library)
  message(FATAL_ERROR "the pytorch-tokenizers wheel (a dependency of executorch) is not installed for "
                      "${Python3_EXECUTABLE}: pip install pytorch-tokenizers, or configure with "
                      "-DSPINQUANT_RUNNER_TOKENIZER=OFF for token ids only")
endif()

find_path(SPINQUANT_RE2_INCLUDE_DIR re2/re2.h)
find_path(SPINQUANT_JSON_INCLUDE_DIR nlohmann/json.hpp)
if(NOT SPINQUANT_RE2_INCLUDE_DIR OR NOT SPINQUANT_JSON_INCLUDE_DIR)
  message(FATAL_ERROR "text prompts need the re2 and nlohmann/json headers: apt-get install libre2-dev "
                      "nlohmann-json3-dev, or configure with -DSPINQUANT_RUNNER_TOKENIZER=OFF for token ids only")
endif()

# Imported, so that CMake links the file by its path (its name is not lib*.so).
add_library(spinquant_tokenizer SHARED IMPORTED)
set_target_properties(spinquant_tokenizer PROPERTIES IMPORTED_LOCATION "${_spinquant_tokenizers_library}")
target_include_directories(
  spinquant_tokenizer SYSTEM INTERFACE "${_spinquant_tokenizers_dir}/include" "${SPINQUANT_RE2_INCLUDE_DIR}"
                                       "${SPINQUANT_JSON_INCLUDE_DIR}"
)
target_link_libraries(spinquant_tokenizer INTERFACE spinquant_libpython)
