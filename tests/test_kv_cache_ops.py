"""The KV cache's operators (kernels/kv_cache_ops.py and kernels/cpu/op_kv_cache.cpp) against dense float64 references."""

import pytest
import torch
from torch import nn

import kernels
from kernels.kv_cache_ops import SCALE_BYTES, dequantize_rows, quantize_rows
from spinquant.quant import fake_quantize


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """One query row and head at a time in float64: query i at position start + i sees keys 0..start + i."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    group = q.shape[2] // k.shape[2]
    for i in range(q.shape[1]):
        for h in range(q.shape[2]):
            keys, values = k[0, : start + i + 1, h // group], v[0, : start + i + 1, h // group]
            weights = torch.softmax(keys @ q[0, i, h] * scale, dim=0)
            out[0, i, h] = weights @ values
    return out


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference).norm() / reference.norm())


def caches(positions: int, kv_heads: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 1, positions, kv_heads, dim, generator=g)
    k[..., 3] *= 20  # an outlier channel, as unrotated keys have
    return k, v


def test_int8_rows_are_symmetric_fake_quantization_of_the_row():
    x = caches(40, 3, 64, seed=0)[0]
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (1, 40, 3, 64 + SCALE_BYTES)
    assert torch.equal(dequantize_rows(rows), fake_quantize(x, 8, 0, symmetric=True, narrow=True))


@pytest.mark.parametrize("seq, start", [(1, 0), (1, 37), (5, 0), (4, 20)])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_eager_attention_matches_dense_float64(kind, seq, start):
    k, v = caches(48, 3, 64, seed=1)
    q = torch.randn(1, seq, 9, 64, generator=torch.Generator().manual_seed(2))
    k_cache, v_cache = (quantize_rows(k), quantize_rows(v)) if kind == "int8" else (k, v)
    out = torch.ops.spinquant.attend_kv_cache(q, k_cache, v_cache, start, 0.125)
    expected = dense_attention(q, dequantize_rows(k_cache), dequantize_rows(v_cache), start, 0.125)
    assert out.shape == q.shape and relative_error(out, expected) <= 2e-6


def test_attention_ignores_positions_after_the_query():
    k, v = caches(48, 3, 64, seed=3)
    q = torch.randn(1, 2, 9, 64)
    later = v.clone()
    later[:, 12:] = 1e6  # positions 12.. are beyond the queries at 10 and 11
    assert torch.equal(torch.ops.spinquant.attend_kv_cache(q, k, v, 10, 0.125), torch.ops.spinquant.attend_kv_cache(q, k, later, 10, 0.125))


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.randn(1, 1, 9, 64), torch.zeros(1, 8, 3, 64, dtype=torch.float16)), TypeError, "float32 or both int8"),
    (lambda: (torch.randn(1, 1, 9, 64), torch.zeros(1, 8, 3, 64, dtype=torch.int8)), ValueError, "does not fit"),
    (lambda: (torch.randn(1, 1, 8, 64), torch.zeros(1, 8, 3, 64)), ValueError, "does not fit"),
])
def test_bad_caches_name_the_op(make, error, words):
    q, cache = make()
    with pytest.raises(error, match=words):
        torch.ops.spinquant.attend_kv_cache(q, cache, cache, 0, 0.125)


# ---- the C++ kernels inside ExecuTorch programs ----


@pytest.fixture(scope="module")
def runtime():
    kernels.load_into_executorch_runtime()


class Attend(nn.Module):
    def forward(self, q, k_cache, v_cache, position):
        start = position.item()
        torch._check(start >= 0)
        torch._check(start + q.shape[1] <= k_cache.shape[1])
        return torch.ops.spinquant.attend_kv_cache(q, k_cache, v_cache, start, 0.125)


class Quantize(nn.Module):
    def forward(self, x):
        return torch.ops.spinquant.quantize_kv_rows(x)


def run_program(module: nn.Module, inputs: tuple) -> torch.Tensor:
    from executorch.exir import to_edge

    program = to_edge(torch.export.export(module, inputs)).to_executorch().buffer
    assert kernels.build.needs_our_kernels(program)
    return kernels.load_program(program).methods["forward"].execute(list(inputs))[0]


def test_cpp_quantize_writes_the_eager_rows_byte_for_byte(runtime):
    x = caches(33, 3, 64, seed=4)[0].contiguous()
    assert torch.equal(run_program(Quantize(), (x,)), quantize_rows(x))


@pytest.mark.parametrize("seq, start", [(1, 0), (1, 200), (7, 0), (6, 250)])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_cpp_attention_matches_dense_float64(runtime, kind, seq, start):
    """Long enough a context that the thread pool splits the heads; the last case fills the cache."""
    k, v = caches(256, 3, 64, seed=5)
    q = torch.randn(1, seq, 9, 64, generator=torch.Generator().manual_seed(6))
    k_cache, v_cache = (quantize_rows(k), quantize_rows(v)) if kind == "int8" else (k, v)
    out = run_program(Attend(), (q, k_cache, v_cache, torch.tensor([start])))
    expected = dense_attention(q, dequantize_rows(k_cache), dequantize_rows(v_cache), start, 0.125)
    assert out.shape == q.shape and relative_error(out, expected) <= 2e-6


@pytest.mark.parametrize("heads, kv_heads, dim", [(10, 2, 36), (8, 1, 64), (4, 4, 20)])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_cpp_attention_any_group_and_head_dim(runtime, kind, heads, kv_heads, dim):
    """Groups of 5, 8 and 1 query heads go through a block of positions in passes of 4 (AVX-512) or 2 and a rest; head
    dims of 36 and 20 leave a tail after the eight-lane chunks."""
    k, v = caches(67, kv_heads, dim, seed=7)
    q = torch.randn(1, 3, heads, dim, generator=torch.Generator().manual_seed(8))
    k_cache, v_cache = (quantize_rows(k), quantize_rows(v)) if kind == "int8" else (k, v)
    out = run_program(Attend(), (q, k_cache, v_cache, torch.tensor([60])))
    expected = dense_attention(q, dequantize_rows(k_cache), dequantize_rows(v_cache), 60, 0.125)
    assert out.shape == q.shape and relative_error(out, expected) <= 2e-6
