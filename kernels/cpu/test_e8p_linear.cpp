// Checks the E8P linear layer (e8p_linear.h) against a float64 reference built without its tables: the 256 patterns
// enumerated again as spinquant.e8p.abs_patterns defines them, each code decoded in double from its bits, the
// product summed in double. Every linear of SmolLM2-135M and Llama 3.2 1B at 1, 3 and 17 rows, plus a matrix of all
// 2^16 codes and odd numbers of groups. No ExecuTorch: the Python tests also build it for each x86 path (-march
// flags) and for arm64 under qemu (NEON), and scripts/sanitize_kernels.sh under ASan/UBSan.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "e8p_linear.h"
#include "test_reference.h"

using spinquant::testing::expect;
using spinquant::testing::random_rows;

namespace {

using Pattern = std::array<double, 8>;

// spinquant.e8p.abs_patterns(): entries in {½, 3/2, 5/2}, in lexicographic order, those of norm² ≤ 10, then the
// first 29 of norm² 12 that have five 3/2 and three ½.
std::vector<Pattern> reference_patterns() {
  std::vector<Pattern> inside, norm12;
  for (int i = 0; i < 6561; ++i) {  // 3^8 tuples, the first coordinate the most significant digit
    Pattern p;
    double norm = 0;
    for (int j = 7, rest = i; j >= 0; --j, rest /= 3) norm += (p[j] = 0.5 + rest % 3) * p[j];
    if (norm <= 10) inside.push_back(p);
    if (norm == 12 && std::count(p.begin(), p.end(), 1.5) == 5) norm12.push_back(p);
  }
  inside.insert(inside.end(), norm12.begin(), norm12.begin() + (256 - inside.size()));
  return inside;
}

// spinquant.e8p.decode, from the bits.
Pattern reference_decode(const std::vector<Pattern>& patterns, uint16_t code) {
  const Pattern& p = patterns[code & 0xFF];
  const int sum = int(std::accumulate(p.begin(), p.end(), 0.0));
  const int first = (__builtin_popcount((code >> 8) & 0x7F) + sum) & 1;
  Pattern w;
  for (int j = 0; j < 8; ++j) {
    const bool negative = j == 0 ? first : (code >> (7 + j)) & 1;
    w[j] = (negative ? -p[j] : p[j]) + ((code >> 15) ? 0.25 : -0.25);
  }
  return w;
}

void check_every_code_decodes(const std::vector<Pattern>& patterns) {
  int wrong = 0;
  for (int code = 0; code < 1 << 16; ++code) {
    const uint64_t quarters = spinquant::detail::decode_quarters(uint16_t(code));
    const Pattern w = reference_decode(patterns, uint16_t(code));
    for (int j = 0; j < 8; ++j) wrong += int8_t(quarters >> (8 * j)) != 4 * w[j];
  }
  expect(wrong == 0, "decode_quarters vs the bits' definition, every code", 1 << 16);
}

// out·in/8 codes: all 2^16 values in a random order, repeated (a random subset when fewer).
std::vector<uint16_t> random_codes(int64_t count, unsigned seed) {
  std::vector<uint16_t> all(1 << 16);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(seed));
  std::vector<uint16_t> codes(count);
  for (int64_t i = 0; i < count; ++i) codes[i] = all[i % all.size()];
  return codes;
}

std::vector<double> reference_linear(const std::vector<Pattern>& patterns, const std::vector<float>& x,
                                     const std::vector<uint16_t>& codes, double scale, int64_t rows, int64_t in,
                                     int64_t out) {
  std::vector<double> y(rows * out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t g = 0; g < in / 8; ++g) {
      const Pattern w = reference_decode(patterns, codes[o * (in / 8) + g]);
      for (int64_t r = 0; r < rows; ++r) {
        for (int j = 0; j < 8; ++j) y[r * out + o] += double(x[r * in + 8 * g + j]) * w[j];
      }
    }
  }
  for (double& v : y) v *= scale;
  return y;
}

std::vector<float> run_linear(const std::vector<float>& x, const std::vector<uint16_t>& codes, float scale,
                              int64_t rows, int64_t in, int64_t out) {
  std::vector<float> y(rows * out);
  auto scratch = spinquant::e8p_scratch(in);
  const int64_t middle = out / 3;  // two calls, as the thread pool splits outputs
  spinquant::e8p_linear_outputs(x.data(), codes.data(), scale, rows, in, out, 0, middle, y.data(), scratch.get());
  spinquant::e8p_linear_outputs(x.data(), codes.data(), scale, rows, in, out, middle, out, y.data(), scratch.get());
  return y;
}

// max |y - reference| / max |reference|, over the first `rows` rows.
double relative_error(const std::vector<float>& y, const std::vector<double>& reference, int64_t rows, int64_t out) {
  double err = 0, largest = 0;
  for (int64_t i = 0; i < rows * out; ++i) {
    err = std::max(err, std::abs(double(y[i]) - reference[i]));
    largest = std::max(largest, std::abs(reference[i]));
  }
  return err / largest;
}

void check_linear(const std::vector<Pattern>& patterns, int64_t in, int64_t out) {
  constexpr int64_t kMostRows = 17;
  const float scale = 0.37f;  // not a power of two, so that it rounds
  const auto x64 = random_rows(kMostRows, in, unsigned(in * 31 + out));
  const std::vector<float> x(x64.begin(), x64.end());
  const auto codes = random_codes(out * in / 8, unsigned(in + out));
  const auto reference = reference_linear(patterns, x, codes, scale, kMostRows, in, out);
  const long long shape = in * 100000 + out;  // failures print it as n: in, then out in five digits
  std::vector<float> one_row;
  for (int64_t rows : {int64_t(1), int64_t(3), kMostRows}) {
    const auto y = run_linear(x, codes, scale, rows, in, out);
    expect(relative_error(y, reference, rows, out) <= 1e-4, rows == 1 ? "one row vs float64" : "rows vs float64",
           shape);
    if (rows == 1) {
      one_row = y;
    } else {  // decoding on the fly and from the decoded row sum in the same order: the same bits
      expect(std::equal(one_row.begin(), one_row.end(), y.begin()), "row 0 of many == the row alone, bitwise",
             shape);
    }
  }
}

}  // namespace

int main() {
  std::printf("path: %s\n", spinquant::kE8PPath);
  const auto patterns = reference_patterns();
  check_every_code_decodes(patterns);
  // (in, out): SmolLM2-135M's q/o, k/v, gate/up and down; Llama 3.2 1B's; all 2^16 codes; 1 and 3 groups.
  const int64_t shapes[][2] = {{576, 576},   {576, 192},   {576, 1536},  {1536, 576}, {2048, 2048}, {2048, 512},
                               {2048, 8192}, {8192, 2048}, {2048, 256},  {8, 5},      {24, 7}};
  for (const auto& s : shapes) check_linear(patterns, s[0], s[1]);
  return spinquant::testing::report();
}
