// spinquant::quantize_kv_rows.out and spinquant::attend_kv_cache.out: the program's KV cache in int8
// rows (kv_attention.h), and attention over a float32 or int8 cache. ExecuTorch's llama::custom_sdpa
// takes 65 µs per layer for one decode query at a 144-token context on this project's x86 CPU, most of
// it in its tiling for long queries; its int8 variant runs torchao's int8 matmul, scalar off arm64.
#include <memory>

#include "kernel_util.h"

#include "kv_attention.h"

namespace spinquant::native {

namespace {

constexpr const char* kQuantize = "spinquant::quantize_kv_rows.out";
constexpr const char* kAttend = "spinquant::attend_kv_cache.out";

// (query row, KV head) tasks per thread-pool task: about 32k multiply-adds, more than waking a thread costs.
int64_t grain_tasks(int64_t positions, int64_t dim, int64_t group) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, positions * dim * group));
}

template <typename Row>
bool attend(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t start, float scale, Tensor& out) {
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t slots = k_cache.size(1), kv_heads = k_cache.size(2), width = k_cache.size(3);
  const int64_t group = heads / kv_heads;
  const float* queries = q.const_data_ptr<float>();
  const Row* keys = k_cache.const_data_ptr<Row>();
  const Row* values = v_cache.const_data_ptr<Row>();
  float* result = out.mutable_data_ptr<float>();
  const int64_t tasks = batch * seq * kv_heads;  // each: one query row's heads that share one KV head
  return ::executorch::extension::parallel_for(0, tasks, grain_tasks(start + seq, dim, group), [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scores(new float[group * (start + seq)]), weights(new float[4 * group]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv_head = task % kv_heads, i = (task / kv_heads) % seq, b = task / (kv_heads * seq);
      const int64_t first = (b * slots * kv_heads + kv_head) * width;  // position 0 of this KV head
      const CacheView<Row> cache{keys + first, values + first, start + i + 1, kv_heads * width};
      const int64_t row = task * group * dim;  // q and out are (batch, seq, heads, dim): a KV head's query heads are adjacent
      attend_group(queries + row, group, cache, dim, scale, scores.get(), weights.get(), result + row);
    }
  });
}

}  // namespace

Tensor& quantize_kv_rows_out(KernelRuntimeContext& ctx, const Tensor& x, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.scalar_type() == ScalarType::Float && is_plain(x), InvalidArgument, out,
                      "%s: the input must be a contiguous float32 tensor of at least one dimension", kQuantize);
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Char && out.dim() == x.dim(), InvalidArgument, out,
                      "%s: out must be int8 with the input's dimensions, has %s", kQuantize, toString(out.scalar_type()));
  const int64_t dim = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, resize_with_last_dim(out, x, dim + kScaleBytes) == Error::Ok && is_plain(out),
                      InvalidArgument, out, "%s: out cannot take the rows' shape", kQuantize);
  const float* src = x.const_data_ptr<float>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  const int64_t rows = dim ? x.numel() / dim : 0;
  for (int64_t r = 0; r < rows; ++r) quantize_row(src + r * dim, dim, dst + r * (dim + kScaleBytes));
  return out;
}

Tensor& attend_kv_cache_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            int64_t start_pos, double scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, InvalidArgument, out,
                      "%s: q and the caches must be (batch, positions, heads, head_dim)", kAttend);
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "%s: q and out must be float32", kAttend);
  const ScalarType row = k_cache.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx, (row == ScalarType::Float || row == ScalarType::Char) && v_cache.scalar_type() == row,
                      InvalidArgument, out, "%s: the caches must both be float32 or both int8, are %s and %s", kAttend,
                      toString(row), toString(v_cache.scalar_type()));
  const int64_t dim = q.size(3), width = dim + (row == ScalarType::Char ? kScaleBytes : 0);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == q.size(0) && k_cache.size(3) == width,
                      InvalidArgument, out, "%s: the caches must be (batch, positions, kv_heads, %lld)", kAttend,
                      static_cast<long long>(width));
  ET_KERNEL_CHECK_MSG(ctx, k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0, InvalidArgument, out,
                      "%s: %lld query heads cannot share %lld KV heads", kAttend, static_cast<long long>(q.size(2)),
                      static_cast<long long>(k_cache.size(2)));
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + q.size(1) <= k_cache.size(1), InvalidArgument, out,
                      "%s: positions %lld..%lld are outside the cache's %lld", kAttend, static_cast<long long>(start_pos),
                      static_cast<long long>(start_pos + q.size(1)), static_cast<long long>(k_cache.size(1)));
  ET_KERNEL_CHECK_MSG(ctx, is_plain(q) && is_plain(k_cache) && is_plain(v_cache), InvalidArgument, out,
                      "%s: q and the caches must be contiguous", kAttend);
  ET_KERNEL_CHECK_MSG(ctx, resize_tensor(out, q.sizes()) == Error::Ok && is_plain(out), InvalidArgument, out,
                      "%s: out cannot take q's shape", kAttend);
  if (q.numel() == 0) return out;
  const bool ok = row == ScalarType::Char ? attend<int8_t>(q, k_cache, v_cache, start_pos, scale, out)
                                          : attend<float>(q, k_cache, v_cache, start_pos, scale, out);
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "%s: the thread pool failed to run the rows", kAttend);
  return out;
}

}  // namespace spinquant::native

EXECUTORCH_LIBRARY(spinquant, "quantize_kv_rows.out", spinquant::native::quantize_kv_rows_out);
EXECUTORCH_LIBRARY(spinquant, "attend_kv_cache.out", spinquant::native::attend_kv_cache_out);
