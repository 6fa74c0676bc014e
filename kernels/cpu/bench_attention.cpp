// Times one decode step's attention over the int8 KV cache (kv_attention.h's attend_group) on one thread: every layer's
// query heads against `positions` cached positions, as spinquant::attend_kv_cache.out runs them without its checks.
//
//   bench_attention <layers> <kv_heads> <group> <head_dim> <positions>
//
// prints "attention <layers> <kv_heads> <group> <head_dim> <positions> <µs per step>" (the demo: 30 3 3 64 144).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "kv_attention.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s <layers> <kv_heads> <group> <head_dim> <positions>\n", argv[0]);
    return 2;
  }
  const int64_t layers = std::atoll(argv[1]), kv_heads = std::atoll(argv[2]), group = std::atoll(argv[3]);
  const int64_t dim = std::atoll(argv[4]), positions = std::atoll(argv[5]), width = dim + spinquant::kScaleBytes;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  // Each layer its own cache, as in the program: a step reads them all, not one layer's from cache 30 times.
  std::vector<int8_t> k(layers * positions * kv_heads * width), v(k.size());
  std::vector<float> row(dim), q(kv_heads * group * dim), out(q.size());
  for (int8_t* cache : {k.data(), v.data()}) {
    for (int64_t r = 0; r < layers * positions * kv_heads; ++r) {
      for (float& x : row) x = normal(gen);
      spinquant::quantize_row(row.data(), dim, cache + r * width);
    }
  }
  for (float& x : q) x = normal(gen);
  auto scores = std::make_unique<float[]>(group * positions);
  auto weights = std::make_unique<float[]>(4 * group);
  auto step = [&] {
    for (int64_t layer = 0; layer < layers; ++layer) {
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t first = (layer * positions * kv_heads + h) * width;
        const spinquant::CacheView<int8_t> cache{k.data() + first, v.data() + first, positions, kv_heads * width};
        spinquant::attend_group(q.data() + h * group * dim, group, cache, dim, 0.125f, scores.get(), weights.get(),
                                out.data() + h * group * dim);
      }
    }
  };
  // Best of 200 steps: the best, as other processes may share the machine.
  step();
  double best = 1e30;
  for (int rep = 0; rep < 200; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("attention %lld %lld %lld %lld %lld %.1f\n", static_cast<long long>(layers), static_cast<long long>(kv_heads),
              static_cast<long long>(group), static_cast<long long>(dim), static_cast<long long>(positions), best * 1e6);
  return out[0] == 12345.0f;  // out is used, so it is computed
}
