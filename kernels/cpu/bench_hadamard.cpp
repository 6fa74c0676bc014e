// Times the kernel function exactly as the runtime calls it (checks and thread pool included,
// no program around it) and a memcpy of the same bytes, for benchmarks/hadamard.py.
//
//   bench_hadamard <n> <rows> [threads]
//
// prints "<what> <threads> <seconds per call>" lines, what being "ours" or "memcpy" (float32):
// ours on one thread, then on the thread pool, resized to `threads` when given; and a last line
// "vector_add 1 <seconds>", the time of one 32-byte vector addition at full throughput, from
// which the benchmark draws its arithmetic floor.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>

#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/runtime.h>

#include "hadamard_transform.h"
#include "op_hadamard_transform.h"

// threadpool.h is not in the wheel; these declare two functions libexecutorch_threadpool.so
// exports, to size the pool the way ExecuTorch's own benchmarks do.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;

namespace {

// Best time per call over 31 batches, each long enough (≥ 0.5 ms) for the clock to resolve it
// and short enough to fit between preemptions; the best rather than the mean, since other
// processes may share the machine.
double seconds_per_call(const std::function<void()>& call) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < 3; ++i) call();
  int batch = 1;
  for (;;) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) call();
    if (std::chrono::duration<double>(clock::now() - t0).count() > 0.0005) break;
    batch *= 2;
  }
  double best = 1e30;
  for (int rep = 0; rep < 31; ++rep) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) call();
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count() / batch);
  }
  return best;
}

// Eight independent chains of vector additions keep every adder busy; float additions cannot be
// reassociated without -ffast-math, so the compiler keeps every one of them.
double seconds_per_vector_add(float step) {
  using V = spinquant::detail::Vec<float>::type;
  constexpr int kChains = 8;
  constexpr long kIterations = 1L << 22;
  V acc[kChains] = {};
  const V inc = V{} + step;
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < kIterations; ++i) {
      for (int c = 0; c < kChains; ++c) acc[c] += inc;
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  float sink = 0;
  for (const V& a : acc) sink += a[0];
  if (sink == -1.0f) std::printf("%g\n", sink);  // the sums are used, so they are computed
  return best / (kIterations * kChains);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s <n> <rows> [threads]\n", argv[0]);
    return 2;
  }
  executorch::runtime::runtime_init();
  if (argc == 4) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(std::atoi(argv[3]));
  TensorImpl::SizesType sizes[2] = {std::atoi(argv[2]), std::atoi(argv[1])};
  TensorImpl::DimOrderType dim_order[2] = {0, 1};
  TensorImpl::StridesType strides[2] = {sizes[1], 1};
  const size_t count = size_t(sizes[0]) * sizes[1];
  const size_t bytes = count * sizeof(float);
  // Input and output half a page apart modulo 4096: with glibc's memcpy on AMD, a destination
  // a few bytes past the source modulo a page (as two malloc'd blocks often are) runs up to
  // 20x slower, which would flatter the kernel against it.
  const size_t offset = (bytes + 4095) / 4096 * 4096 + 2048;
  std::unique_ptr<float[]> arena(new float[(offset + bytes) / sizeof(float) + 1024]);
  float* x_data = arena.get();
  float* out_data = arena.get() + offset / sizeof(float);
  std::mt19937 gen(0);
  std::normal_distribution<float> dist;
  for (size_t i = 0; i < count; ++i) x_data[i] = dist(gen);
  TensorImpl x_impl(ScalarType::Float, 2, sizes, x_data, dim_order, strides);
  TensorImpl out_impl(ScalarType::Float, 2, sizes, out_data, dim_order, strides);
  Tensor x(&x_impl), out(&out_impl);
  executorch::runtime::KernelRuntimeContext ctx;
  auto ours = [&] { spinquant::native::hadamard_transform_out(ctx, x, out); };
  auto copy = [&] { std::memcpy(out_data, x_data, bytes); };

  {
    executorch::extension::threadpool::NoThreadPoolGuard one_thread;
    std::printf("ours 1 %.9g\n", seconds_per_call(ours));
  }
  std::printf("ours %lld %.9g\n", static_cast<long long>(executorch::extension::get_thread_count()),
              seconds_per_call(ours));
  std::printf("memcpy 1 %.9g\n", seconds_per_call(copy));
  std::printf("vector_add 1 %.9g\n", seconds_per_vector_add(x_data[0]));
  return ctx.failure_state() == executorch::runtime::Error::Ok ? 0 : 1;
}
