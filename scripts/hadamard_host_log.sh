#!/usr/bin/env bash
# bench_hadamard on another machine, for `benchmarks/hadamard.py --idle-host-log LOG`.
#
#   scripts/hadamard_host_log.sh build DIR   # here: a portable (x86-64-v3) bench_hadamard and
#                                            # the two ExecuTorch libraries it needs, into DIR
#   DIR/run.sh > LOG                         # there: three rounds over every size and row count
#
# The benchmark keeps each case's best round, as bench_hadamard keeps its best batch.
set -euo pipefail
[ "${1:-}" = build ] && [ -n "${2:-}" ] || { echo "usage: $0 build DIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
out=$(mkdir -p "$2" && cd "$2" && pwd)
python=${PYTHON:-python}
root=$("$python" -c "import executorch.version as v, pathlib; print(pathlib.Path(v.__file__).parent)")
cmake=$("$python" -c "import cmake; print(cmake.CMAKE_BIN_DIR)")/cmake
build=kernels/cpu/build/portable
flags=(-DSPINQUANT_NATIVE_ARCH=OFF -DCMAKE_CXX_FLAGS=-march=x86-64-v3
       "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc")
"$cmake" -S kernels/cpu -B "$build" -DCMAKE_PREFIX_PATH="$root/share/cmake" "${flags[@]}" > "$build.log" 2>&1 \
  || { cat "$build.log"; exit 1; }
"$cmake" --build "$build" --target bench_hadamard -j "$(nproc)" >> "$build.log" 2>&1 || { cat "$build.log"; exit 1; }
cp "$build/bench_hadamard" "$root/lib/libexecutorch.so" "$root/lib/libexecutorch_threadpool.so" "$out/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD
echo "# bench_hadamard <n> <rows> 2, built with -DSPINQUANT_NATIVE_ARCH=OFF -DCMAKE_CXX_FLAGS=-march=x86-64-v3 (static libstdc++); best of 3 rounds"
lscpu | grep -E "^CPU\(s\)|Model name|Thread\(s\) per core|L2 cache|L3 cache"
grep -o -w 'avx2\|avx512f\|fma' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
uptime
for round in 1 2 3; do
  for n in 1536 2048 8192 14336 28672; do
    for rows in 1 64 2048; do echo "n=$n rows=$rows $(./bench_hadamard $n $rows 2 2>/dev/null | tr '\n' ' ')"; done
  done
done
RUN
chmod +x "$out/run.sh"
echo "built $out: copy it to the other machine and run $out/run.sh there"
