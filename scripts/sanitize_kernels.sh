#!/usr/bin/env bash
# Build the C++ tests (kernels/cpu/test_transform.cpp, test_hadamard.cpp, test_e8p_linear.cpp) with AddressSanitizer and
# UndefinedBehaviorSanitizer, and run them. The build is incremental: a rerun recompiles only what
# changed. Set PYTHON to pick the interpreter whose executorch and cmake packages to use.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
prefix=$("$python" -c "import executorch.version as v, pathlib; print(pathlib.Path(v.__file__).parent / 'share' / 'cmake')")
cmake=$("$python" -c "import cmake; print(cmake.CMAKE_BIN_DIR)")/cmake
build=kernels/cpu/build/sanitize  # a developer's build beside the sources (git ignores build/)
log=$build/build.log
mkdir -p "$build"
"$cmake" -S kernels/cpu -B "$build" -DSPINQUANT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$prefix" > "$log" 2>&1 || { cat "$log"; exit 1; }
"$cmake" --build "$build" --target test_transform test_hadamard test_e8p_linear -j "$(nproc)" >> "$log" 2>&1 \
  || { cat "$log"; exit 1; }
for test in test_transform test_hadamard test_e8p_linear; do
  UBSAN_OPTIONS=print_stacktrace=1 "$build/$test"
done
