# spinquant_libpython: libpython's symbols, for the wheels' libraries that carry Python extension
# code (the LLM ops' plugin needs the executorch extension; pytorch tokenizers lives in one).
# The runner never starts Python; these libraries only need the symbols to resolve when loaded.
add_library(spinquant_libpython INTERFACE)
target_link_options(
  spinquant_libpython
  INTERFACE
  # The runner calls nothing in it, so the default --as-needed would drop it.
  "LINKER:--push-state,--no-as-needed,$<TARGET_FILE:Python3::Python>,--pop-state"
  "LINKER:-rpath,$<TARGET_FILE_DIR:Python3::Python>"
)
