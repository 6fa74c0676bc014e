# spinquant_llm_ops: ExecuTorch's LLM ops (llama::update_cache.out, llama::custom_sdpa.out) as the
# executorch wheel carries them. The wheel's only library that registers them with the runtime is
# extension/llm/custom_ops/libcustom_ops_aot_lib.so, the plugin `import
# executorch.extension.llm.custom_ops` loads: it also registers them with PyTorch, so it needs
# libtorch and the wheel's Python extension, and through that libpython's symbols. It links the
# shared libexecutorch.so, so its kernels land in the runner's one registry. A phone build compiles
# ExecuTorch's `custom_ops` target from source instead (../README.md) and needs none of this.
#
# custom_sdpa calls sgemm_, which both libexecutorch_kernels_optimized.so (ExecuTorch's Eigen BLAS,
# as on a phone) and libtorch_cpu.so define. The runner links the first directly and libtorch only
# through this library, so the loader takes ExecuTorch's; the Python runtime takes libtorch's,
# which can flip a near-tied greedy token (runner/README.md).
set(SPINQUANT_LLM_OPS_LIBRARY
    "${EXECUTORCH_RUNTIME_LIBRARY_DIR}/../extension/llm/custom_ops/libcustom_ops_aot_lib.so"
    CACHE FILEPATH "The library that registers llama::update_cache.out and llama::custom_sdpa.out"
)
if(NOT EXISTS "${SPINQUANT_LLM_OPS_LIBRARY}")
  message(FATAL_ERROR "ExecuTorch's LLM ops library is not at ${SPINQUANT_LLM_OPS_LIBRARY}: "
                      "pass -DSPINQUANT_LLM_OPS_LIBRARY=<library registering llama::custom_sdpa.out>")
endif()
get_filename_component(_spinquant_llm_ops_dir "${SPINQUANT_LLM_OPS_LIBRARY}" DIRECTORY)

add_library(spinquant_llm_ops INTERFACE)
target_link_libraries(spinquant_llm_ops INTERFACE executorch::runtime spinquant_libpython)
target_link_options(
  spinquant_llm_ops
  INTERFACE
  # Registration only: nothing references it, so the default --as-needed would drop it.
  "LINKER:--push-state,--no-as-needed,${SPINQUANT_LLM_OPS_LIBRARY},--pop-state"
  "LINKER:-rpath,${_spinquant_llm_ops_dir}"
)
