# Our kernels (Hadamard, KV cache, RMSNorm, SiLU, RoPE) as a static library inside ExecuTorch's own CMake build, for a phone: pass
#
#   -DCMAKE_PROJECT_executorch_INCLUDE=<this file>
#
# to the configure of an ExecuTorch source checkout (the tag of the executorch wheel that made the
# .pte). CMake includes this file right after ExecuTorch's project() call, so the target below is
# part of that build; the ExecuTorch targets it links are defined later, which CMake allows (it
# resolves target names when it generates). Use spinquant_kernels_et as
#   - Android: -DEXECUTORCH_JNI_CUSTOM_LIBRARY=spinquant_kernels_et (linked whole-archive into
#     libexecutorch_jni.so, the AAR's native library);
#   - iOS: `cmake --build ... --target spinquant_kernels_et`, then -force_load the archive.
# See runner/README.md. Not built in this repository's CI: it has no NDK, Xcode or ExecuTorch
# source tree.
add_library(spinquant_kernels_et STATIC "${CMAKE_CURRENT_LIST_DIR}/cpu/op_hadamard_transform.cpp"
                                        "${CMAKE_CURRENT_LIST_DIR}/cpu/op_kv_cache.cpp"
                                        "${CMAKE_CURRENT_LIST_DIR}/cpu/op_rms_norm.cpp"
                                        "${CMAKE_CURRENT_LIST_DIR}/cpu/op_silu_mul.cpp"
                                        "${CMAKE_CURRENT_LIST_DIR}/cpu/op_rope.cpp")
target_include_directories(spinquant_kernels_et PRIVATE "${CMAKE_CURRENT_LIST_DIR}/cpu")
target_compile_features(spinquant_kernels_et PUBLIC cxx_std_17)
# The in-tree names, without the executorch:: prefix of the wheel's package. extension_threadpool
# brings ET_USE_THREADPOOL, so the kernel's rows are spread over ExecuTorch's thread pool.
target_link_libraries(spinquant_kernels_et PUBLIC executorch_core extension_threadpool)
