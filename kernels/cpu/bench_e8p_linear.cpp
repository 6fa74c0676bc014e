// Times the E8P linear layer (e8p_linear.h) on one thread, beside a float32 matrix-vector product of the same
// shape (fixed_order.h's dot, what the weights would cost dense) for scale:
//
//   bench_e8p_linear <in> <out> [rows]
//
// prints "e8p <in> <out> <rows> <µs per call> <GB/s of codes read>" and "dense_f32 <in> <out> 1 <µs> <GB/s>".
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "e8p_linear.h"

namespace {

// Best time per call over 21 batches of at least 2 ms: the best, as other processes may share the machine.
double seconds_per_call(const std::function<void()>& call) {
  using clock = std::chrono::steady_clock;
  call();
  int batch = 1;
  for (;;) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) call();
    if (std::chrono::duration<double>(clock::now() - t0).count() > 0.002) break;
    batch *= 2;
  }
  double best = 1e30;
  for (int rep = 0; rep < 21; ++rep) {
    const auto t0 = clock::now();
    for (int i = 0; i < batch; ++i) call();
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count() / batch);
  }
  return best;
}

void print(const char* what, int64_t in, int64_t out, int64_t rows, double seconds, double bytes) {
  std::printf("%s %lld %lld %lld %.2f %.2f\n", what, static_cast<long long>(in), static_cast<long long>(out),
              static_cast<long long>(rows), seconds * 1e6, bytes / seconds / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s <in> <out> [rows]\n", argv[0]);
    return 2;
  }
  const int64_t in = std::atoll(argv[1]), out = std::atoll(argv[2]), rows = argc == 4 ? std::atoll(argv[3]) : 1;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(rows * in), y(rows * out), dense(in * out);
  std::vector<uint16_t> codes(out * in / 8);
  for (float& v : x) v = normal(gen);
  for (float& v : dense) v = normal(gen);
  for (uint16_t& c : codes) c = uint16_t(gen());
  auto scratch = spinquant::e8p_scratch(in);
  auto ours = [&] {
    spinquant::e8p_linear_outputs(x.data(), codes.data(), 0.5f, rows, in, out, 0, out, y.data(), scratch.get());
  };
  auto dense_matvec = [&] {
    for (int64_t o = 0; o < out; ++o) y[o] = spinquant::dot_in_fixed_order(x.data(), dense.data() + o * in, in);
  };
  std::printf("path %s\n", spinquant::kE8PPath);
  print("e8p", in, out, rows, seconds_per_call(ours), double(codes.size() * sizeof(uint16_t)));
  print("dense_f32", in, out, 1, seconds_per_call(dense_matvec), double(dense.size() * sizeof(float)));
  return y[0] == 12345.0f;  // y is used, so it is computed
}
